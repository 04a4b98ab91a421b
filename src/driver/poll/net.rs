//! Socket operations as non-blocking system calls retried on readiness.
//!
//! Receives and sends say MSG_DONTWAIT themselves rather than trust O_NONBLOCK: a socket
//! handed over (or taken from std) shares its open file, and so that flag, with whoever
//! else holds a descriptor for it, who may make it blocking; one blocking call would stall
//! every socket of the thread. (An accept has no such flag: a listener made blocking
//! behind our back still can.)
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::task::{Context, Poll};

use bytes::Bytes;

use super::{Direction, Registration};
use crate::buf::{IoBuf, IoBufMut};
use crate::driver::fd::FdRef;
use crate::driver::iovec::{iovecs_into, keep_spare_iovecs, sendmsg, take_spare_iovecs, IOV_MAX};
use crate::driver::sockaddr::RawAddr;

fn check(result: isize) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as usize)
    }
}

/// The next connection on listener `fd` once epoll says one waits.
pub(crate) fn poll_accept(
    reg: &Registration,
    fd: &FdRef,
    cx: &mut Context<'_>,
) -> Poll<io::Result<OwnedFd>> {
    loop {
        match reg.poll_ready(Direction::Read, cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Pending => return Poll::Pending,
        }
        match try_accept(reg, fd) {
            Ok((new, _)) => return Poll::Ready(Ok(new)),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => reg.clear_ready(Direction::Read),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Poll::Ready(Err(err)),
        }
    }
}

/// One non-blocking accept4; `WouldBlock` when no connection waits.
pub(crate) fn try_accept(
    reg: &Registration,
    fd: &FdRef,
) -> io::Result<(OwnedFd, Option<SocketAddr>)> {
    reg.count_io_call();
    {
        let mut addr = RawAddr::empty();
        // SAFETY: `addr` is writable storage of `addr.len` bytes that outlives the call.
        let new = unsafe {
            libc::accept4(
                fd.raw(),
                addr.as_mut_ptr(),
                &mut addr.len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        check(new as isize).map(|new| {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(new as i32) };
            (owned, addr.to_socket_addr())
        })
    }
}

pub(crate) async fn connect(reg: &Registration, fd: &FdRef, addr: SocketAddr) -> io::Result<()> {
    let raw = RawAddr::from_socket_addr(addr);
    // SAFETY: `raw` holds a valid sockaddr of `raw.len` bytes for the duration of the call.
    let started = unsafe { libc::connect(fd.raw(), raw.as_ptr(), raw.len) };
    if started == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINPROGRESS) {
        return Err(err);
    }
    reg.retry(Direction::Write, || match fd.sock().take_error() {
        Ok(Some(err)) => Err(err),
        Ok(None) => match fd.sock().peer_addr() {
            Ok(_) => Ok(()),
            // Not connected yet although writable was reported: wait for the next edge.
            Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(err) => Err(err),
        },
        Err(err) => Err(err),
    })
    .await
}

/// Receives once into the spare capacity of `buf`, giving up with `stop`'s error when it
/// gives one while nothing has arrived.
pub(crate) async fn recv<B: IoBufMut>(
    reg: &Registration,
    fd: &FdRef,
    mut buf: B,
    stop: impl FnMut(&mut Context<'_>) -> Option<io::Error>,
) -> (io::Result<usize>, B) {
    let result = reg
        .retry_until(
            Direction::Read,
            || {
                let init = buf.bytes_init();
                let spare = buf.bytes_total() - init;
                // SAFETY: writes at most `spare` bytes into the buffer's spare capacity.
                let n = unsafe {
                    libc::recv(
                        fd.raw(),
                        buf.stable_mut_ptr().add(init).cast(),
                        spare,
                        libc::MSG_DONTWAIT,
                    )
                };
                check(n)
            },
            stop,
        )
        .await;
    if let Ok(n) = result {
        let init = buf.bytes_init() + n;
        // SAFETY: the kernel wrote `n` bytes after the initialised part.
        unsafe { buf.set_init(init) };
    }
    (result, buf)
}

pub(crate) async fn send<B: IoBuf>(
    reg: &Registration,
    fd: &FdRef,
    buf: B,
    flags: i32,
) -> (io::Result<usize>, B) {
    let flags = flags | libc::MSG_DONTWAIT;
    let result = reg
        .retry(Direction::Write, || {
            // SAFETY: reads `bytes_init` initialised bytes of a live buffer.
            let n =
                unsafe { libc::send(fd.raw(), buf.stable_ptr().cast(), buf.bytes_init(), flags) };
            check(n)
        })
        .await;
    (result, buf)
}

/// One `sendmsg` of up to [`IOV_MAX`] iovecs (buffers end to end in memory share one)
/// from byte `skip` of `bufs[first]`.
pub(crate) async fn sendmsg_vectored(
    reg: &Registration,
    fd: &FdRef,
    bufs: Vec<Bytes>,
    first: usize,
    skip: usize,
    flags: i32,
) -> (io::Result<usize>, Vec<Bytes>) {
    // The array is taken from the thread's spare (and put back after), so a stream that
    // keeps flushing allocates nothing for its sends.
    let mut iovecs = take_spare_iovecs();
    iovecs_into(&mut iovecs, &bufs, first, skip, IOV_MAX);
    let flags = flags | libc::MSG_DONTWAIT;
    let result = reg
        .retry(Direction::Write, || sendmsg(fd.raw(), &mut iovecs, flags))
        .await;
    // Emptied before `bufs`, which its entries point into, go back to the caller.
    keep_spare_iovecs(iovecs);
    (result, bufs)
}

pub(crate) fn shutdown(fd: &FdRef, how: std::net::Shutdown) -> io::Result<()> {
    fd.sock().shutdown(how)
}
