//! Buffers described for vectored system calls.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

use bytes::Bytes;

/// Most iovecs one `writev`/`sendmsg` takes (UIO_MAXIOV).
pub(crate) const IOV_MAX: usize = 1024;

thread_local! {
    /// An iovec array for the next vectored send on this thread (empty; its capacity
    /// is what is kept), so that a stream that keeps flushing allocates nothing.
    static SPARE_IOVECS: std::cell::Cell<Vec<libc::iovec>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The thread's spare iovec array (empty): give it back with [`keep_spare_iovecs`] once
/// the send that used it is over.
pub(crate) fn take_spare_iovecs() -> Vec<libc::iovec> {
    SPARE_IOVECS.with(|spare| spare.take())
}

/// Keeps `iovecs`' capacity for the thread's next send; the entries, which point into
/// buffers it must not outlive, are cleared first.
pub(crate) fn keep_spare_iovecs(mut iovecs: Vec<libc::iovec>) {
    iovecs.clear();
    SPARE_IOVECS.with(|spare| spare.set(iovecs));
}

/// One `sendmsg` of `iovecs` on `fd` with `flags`: the bytes the kernel took.
///
/// One entry goes out with `send`, which the kernel takes without copying in a message
/// header and importing an iovec array: a stream flushed after every small write makes
/// one such call per write.
pub(crate) fn sendmsg(fd: RawFd, iovecs: &mut [libc::iovec], flags: i32) -> io::Result<usize> {
    if let [only] = iovecs {
        // SAFETY: the entry describes a buffer alive for the call (`iovecs_into`'s
        // contract); the kernel only reads it.
        let n = unsafe { libc::send(fd, only.iov_base, only.iov_len, flags) };
        return if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        };
    }
    // SAFETY: msghdr is plain old data; zero is its empty value.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = iovecs.as_mut_ptr();
    header.msg_iovlen = iovecs.len();
    // SAFETY: the header points at `iovecs`, whose entries the caller built over buffers
    // alive for the call (`iovecs_into`'s contract); the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &header, flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Longest iovec built by joining neighbours: far below the kernel's per-call cap, so a
/// joined entry never becomes the reason a send is refused.
const MAX_JOINED_LEN: usize = 1 << 30;

/// iovecs over `bufs[first..]` (at most `limit` of them), the first skipping `skip`
/// bytes already sent. They point into the Bytes' heap memory: valid while `bufs` lives
/// and is not changed.
///
/// Buffers that sit end to end in memory (slices of one buffer, written in order) share
/// one iovec, and empty ones get none: the kernel walks fewer entries, and a batch of
/// many small slices needs fewer system calls or links. Each buffer keeps its own
/// ownership; only the description is joined.
///
/// They go into `out`, which is cleared first: a caller that keeps the vector between
/// sends allocates nothing once it has grown.
pub(crate) fn iovecs_into(
    out: &mut Vec<libc::iovec>,
    bufs: &[Bytes],
    first: usize,
    skip: usize,
    limit: usize,
) {
    out.clear();
    if let Some((head, rest)) = bufs.get(first..).and_then(|tail| tail.split_first()) {
        let head = &head[skip.min(head.len())..];
        let tail = rest.iter().map(|buf| &buf[..]);
        append_joined(out, std::iter::once(head).chain(tail), limit);
    }
}

/// Appends at most `limit` iovecs over `bufs` to `out`, joining neighbours that sit end to
/// end in memory (never with an entry that was in `out` before) and skipping empty ones;
/// returns how many it appended. A stream send, or one GSO datagram run (which the
/// kernel cuts by segment size, not by iovec), may be described this way.
pub(crate) fn append_joined<'a>(
    out: &mut Vec<libc::iovec>,
    bufs: impl IntoIterator<Item = &'a [u8]>,
    limit: usize,
) -> usize {
    let start = out.len();
    for buf in bufs {
        if buf.is_empty() {
            continue;
        }
        if let Some(last) = out[start..].last_mut() {
            let end = (last.iov_base as *const u8).wrapping_add(last.iov_len);
            if end == buf.as_ptr() && last.iov_len + buf.len() <= MAX_JOINED_LEN {
                last.iov_len += buf.len();
                continue;
            }
            if out.len() - start == limit {
                break;
            }
        } else if limit == 0 {
            break;
        }
        out.push(libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        });
    }
    out.len() - start
}

#[cfg(test)]
mod tests {
    fn iovecs(bufs: &[Bytes], first: usize, skip: usize, limit: usize) -> Vec<libc::iovec> {
        let mut out = Vec::new();
        iovecs_into(&mut out, bufs, first, skip, limit);
        out
    }

    use super::*;

    /// `parts` as slices of one buffer with a byte between neighbours: never end to end,
    /// whatever the allocator does.
    fn apart(parts: &[&str]) -> Vec<Bytes> {
        let whole = Bytes::from(parts.join("_").into_bytes());
        let mut at = 0;
        parts
            .iter()
            .map(|part| {
                let slice = whole.slice(at..at + part.len());
                at += part.len() + 1;
                slice
            })
            .collect()
    }

    #[test]
    fn skips_into_the_first_buffer_and_stops_at_the_limit() {
        let bufs = apart(&["abc", "de", "fgh", "i"]);
        let iov = iovecs(&bufs, 1, 1, 2);
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len, 1);
        assert_eq!(iov[0].iov_base as *const u8, bufs[1][1..].as_ptr());
        assert_eq!(iov[1].iov_len, 3);
    }

    #[test]
    fn slices_end_to_end_share_one_iovec() {
        let whole = Bytes::from(b"0123456789_xy".to_vec());
        let bufs = vec![
            whole.slice(0..3),
            whole.slice(3..3),
            whole.slice(3..6),
            whole.slice(11..13),
            whole.slice(6..10),
        ];
        let iov = iovecs(&bufs, 0, 1, 8);
        let lens: Vec<usize> = iov.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [5, 2, 4]);
        assert_eq!(iov[0].iov_base as *const u8, whole[1..].as_ptr());
    }

    #[test]
    fn the_limit_counts_iovecs_not_buffers() {
        let whole = Bytes::from(b"abcdef_gh_ij".to_vec());
        let mut bufs: Vec<Bytes> = (0..6).map(|i| whole.slice(i..i + 1)).collect();
        bufs.push(whole.slice(7..9));
        bufs.push(whole.slice(10..12));
        let iov = iovecs(&bufs, 0, 0, 2);
        let lens: Vec<usize> = iov.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [6, 2]);
        assert!(iovecs(&bufs, bufs.len(), 0, 2).is_empty());
    }

    #[test]
    fn appending_never_joins_with_what_was_there() {
        let whole = Bytes::from(b"abcdef".to_vec());
        let mut out = Vec::new();
        assert_eq!(append_joined(&mut out, [&whole[0..2], &whole[2..3]], 8), 1);
        assert_eq!(append_joined(&mut out, [&whole[3..4], &whole[4..6]], 8), 1);
        let lens: Vec<usize> = out.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [3, 3]);
    }
}
