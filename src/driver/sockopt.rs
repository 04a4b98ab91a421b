//! Socket options the engines and the socket API set or read directly.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

/// Sets an integer socket option.
pub(crate) fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SO_MEMINFO` (Linux 3.9): the socket's memory counters.
const SO_MEMINFO: libc::c_int = 55;
/// Index of the drop counter in `SO_MEMINFO`'s array.
const SK_MEMINFO_DROPS: usize = 8;
/// Entries of `SO_MEMINFO`'s array (`SK_MEMINFO_VARS`).
const SK_MEMINFO_VARS: usize = 9;

/// Datagrams the kernel dropped on this socket, mostly because its receive queue was
/// full (`SO_MEMINFO`, SK_MEMINFO_DROPS).
pub(crate) fn socket_drops(fd: RawFd) -> io::Result<u64> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a live array of that size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < (SK_MEMINFO_DROPS + 1) * 4 {
        return Err(io::Error::other("SO_MEMINFO without a drop counter"));
    }
    Ok(info[SK_MEMINFO_DROPS] as u64)
}

/// Bytes of a TCP socket's send queue the peer has not acknowledged yet, sent or not
/// (`SIOCOUTQ`; a FIN counts as one until it is acknowledged). 0 means everything
/// written, and the FIN if one was sent, has reached the peer.
pub(crate) fn unacknowledged_bytes(fd: RawFd) -> io::Result<usize> {
    let mut bytes: libc::c_int = 0;
    // SIOCOUTQ has TIOCOUTQ's number; libc names only the latter.
    // SAFETY: SIOCOUTQ writes one c_int into the live local it is given.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut bytes) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes.max(0) as usize)
}
