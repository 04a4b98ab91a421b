//! Descriptors across processes: SCM_RIGHTS over a Unix socket, and the descriptors a
//! service manager hands a process at start (systemd socket activation).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The most descriptors one SCM_RIGHTS message carries (the kernel's SCM_MAX_FD).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 253;

/// Control room for `count` descriptors, in u64 words (aligned for `cmsghdr`).
fn control_words(count: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    let bytes = unsafe { libc::CMSG_SPACE((count * std::mem::size_of::<RawFd>()) as u32) };
    (bytes as usize).div_ceil(8)
}

/// Sends `data` with `fds` attached (at most [`MAX_FDS_PER_MESSAGE`]) in one `sendmsg`
/// on the Unix socket `channel`; blocks (or fails with WouldBlock) as the socket does.
/// The descriptors stay open here: the receiver gets new ones for the same files.
pub(crate) fn send_with_fds(
    channel: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_FDS_PER_MESSAGE} descriptors per message"),
        ));
    }
    let mut control = vec![0u64; control_words(fds.len())];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; zero is its empty value.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = control.len() * 8;
        // SAFETY: the control buffer holds CMSG_SPACE for `fds.len()` descriptors, so the
        // first header and its data fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: the header points at the live iovec, data and control buffer above.
        let sent = unsafe { libc::sendmsg(channel.as_raw_fd(), &header, libc::MSG_NOSIGNAL) };
        if sent >= 0 {
            if (sent as usize) < data.len() {
                // A Unix stream socket takes a short message only when its buffer is
                // nearly full; the descriptors went with the first byte.
                return send_rest(channel, &data[sent as usize..]);
            }
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn send_rest(channel: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: sends from a live slice.
        let sent = unsafe {
            libc::send(
                channel.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if sent < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        data = &data[sent as usize..];
    }
    Ok(())
}

/// Receives into `buf` and takes any descriptors attached (close-on-exec), in one
/// `recvmsg` on `channel`; returns the bytes read and the descriptors.
pub(crate) fn recv_with_fds(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = vec![0u64; control_words(MAX_FDS_PER_MESSAGE)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; zero is its empty value.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = control.len() * 8;
    let received = loop {
        // SAFETY: the header points at the live iovec over `buf` and the control buffer.
        let n = unsafe { libc::recvmsg(channel.as_raw_fd(), &mut header, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of well-formed control messages;
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk them within that length.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    // Each is a new descriptor the kernel installed for this process.
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    // The control buffer has room for the most one message carries, so descriptors are
    // cut off (MSG_CTRUNC) only when this process could not take them all: it is out of
    // descriptors. Those that arrived are closed with `fds`.
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    Ok((received, fds))
}

/// The first descriptor a service manager passes (SD_LISTEN_FDS_START).
pub(crate) const LISTEN_FDS_START: RawFd = 3;

/// Takes ownership of descriptors `3..3 + count`, as socket activation passes them to
/// this process, and marks them close-on-exec. `None` when they were taken already: they
/// are taken once per process.
///
/// Every descriptor is looked at, and must pass `check`, before any is taken: a number
/// that is not open, or not what the launcher would pass, means the variables are wrong,
/// and taking the others would close descriptors that belong to something else of this
/// process (its runtime's epoll or io_uring descriptor, say). Then none is taken and a
/// later call may try again.
pub(crate) fn claim_listen_fds(
    count: usize,
    check: impl Fn(BorrowedFd<'_>) -> crate::Result<()>,
) -> crate::Result<Option<Vec<OwnedFd>>> {
    static CLAIMED: AtomicBool = AtomicBool::new(false);
    if CLAIMED.swap(true, Ordering::AcqRel) {
        return Ok(None);
    }
    let raws: Vec<RawFd> = (0..count).map(|i| LISTEN_FDS_START + i as RawFd).collect();
    let checked = raws.iter().try_for_each(|&raw| {
        // SAFETY: fcntl on any number is harmless; it tells whether it is open.
        if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
            return Err(crate::Error::invalid_input(format!(
                "LISTEN_FDS names descriptor {raw}, which is not open"
            )));
        }
        // SAFETY: `raw` is open (checked above) and stays open while `check` looks at
        // it: nothing here closes it, and the launcher passed it to this process.
        check(unsafe { BorrowedFd::borrow_raw(raw) })
    });
    if let Err(err) = checked {
        CLAIMED.store(false, Ordering::Release);
        return Err(err);
    }
    let mut fds = Vec::with_capacity(count);
    for raw in raws {
        // SAFETY: fcntl on any number is harmless; the check above found it open.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
        // SAFETY: as above.
        unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        // SAFETY: the caller found LISTEN_PID naming this process, so its launcher passed
        // these descriptors to it; each passed `check` above, and CLAIMED makes this the
        // one place that takes them.
        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    Ok(Some(fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_cross_a_unix_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let (p, q) = UnixStream::pair().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[p.as_fd(), q.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        // The received descriptors are the same sockets: bytes cross them.
        let p2 = UnixStream::from(fds.into_iter().next().unwrap());
        use std::io::{Read, Write};
        (&p2).write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        (&q).read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        drop(p);
    }

    #[test]
    fn too_many_descriptors_are_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..=MAX_FDS_PER_MESSAGE).map(|_| a.as_fd()).collect();
        let err = send_with_fds(a.as_fd(), b"x", &fds).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
