//! Reads and writes on a descriptor that is not a socket (a TUN queue): non-blocking
//! `read(2)` and `write(2)` retried on readiness.
#![allow(unsafe_code)]

use std::io;

use super::{Direction, Registration};
use crate::buf::{IoBuf, IoBufMut};
use crate::driver::fd::FdRef;

fn check(result: isize) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as usize)
    }
}

/// One non-blocking read into the spare capacity of `buf`; `WouldBlock` when nothing
/// waits. The caller waits for readiness (see [`Registration::poll_ready`]).
pub(crate) fn try_read<B: IoBufMut>(
    reg: &Registration,
    fd: &FdRef,
    buf: &mut B,
) -> io::Result<usize> {
    reg.count_io_call();
    crate::driver::file_io::read_now(fd, buf)
}

/// Writes the initialised bytes of `buf` in one `write(2)`, waiting for readiness while
/// the descriptor says EAGAIN.
pub(crate) async fn write<B: IoBuf>(reg: &Registration, fd: &FdRef, buf: &B) -> io::Result<usize> {
    reg.retry(Direction::Write, || {
        // SAFETY: reads `bytes_init` initialised bytes of a live buffer.
        check(unsafe { libc::write(fd.raw(), buf.stable_ptr().cast(), buf.bytes_init()) })
    })
    .await
}
