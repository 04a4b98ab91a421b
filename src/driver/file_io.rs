//! A direct non-blocking `read(2)` into an owned buffer, shared by both engines: epoll
//! reads this way on readiness, io_uring drains what is already queued after a READ
//! completes (a burst costs one call per packet instead of a trip through the ring).
#![allow(unsafe_code)]

use std::io;

use super::fd::FdRef;
use crate::buf::IoBufMut;

/// One non-blocking read into the spare capacity of `buf`; `WouldBlock` when nothing
/// waits. The bytes read are marked initialised.
pub(crate) fn read_now<B: IoBufMut>(fd: &FdRef, buf: &mut B) -> io::Result<usize> {
    let init = buf.bytes_init();
    let spare = buf.bytes_total() - init;
    // SAFETY: writes at most `spare` bytes into the buffer's spare capacity, which
    // IoBufMut's contract makes writable memory.
    let n = unsafe { libc::read(fd.raw(), buf.stable_mut_ptr().add(init).cast(), spare) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote `n` bytes after the initialised part.
    unsafe { buf.set_init(init + n as usize) };
    Ok(n as usize)
}
