//! The stream operations of the driver contract, dispatched to the engine the socket
//! belongs to.
//!
//! Upper layers call only these. Results are `io::Result`; the net layer adds context and
//! turns them into [`crate::Error`].

use std::future::poll_fn;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::task::Context;

use bytes::Bytes;

pub(crate) use super::batch::{BatchReport, Progress};
use super::iovec::{iovecs_into, keep_spare_iovecs, sendmsg, take_spare_iovecs, IOV_MAX};
use super::socket::{Binding, SharedFd};
use super::{poll, uring};
use crate::buf::{IoBuf, IoBufMut};

/// Never raise SIGPIPE: a write to a closed connection is an error (EPIPE), not a signal
/// that kills the program.
const SEND_FLAGS: i32 = libc::MSG_NOSIGNAL;

/// Connects `fd` to `addr`.
pub(crate) async fn connect(fd: &SharedFd, addr: SocketAddr) -> io::Result<()> {
    match fd.binding()? {
        Binding::Uring(driver) => uring::net::connect(driver, fd.fd(), addr).await,
        Binding::Poll(reg) => poll::net::connect(reg, fd.fd(), addr).await,
    }
}

/// Reads once into the spare capacity of `buf`; `Ok(0)` is end of stream.
pub(crate) async fn recv<B: IoBufMut>(fd: &SharedFd, buf: B) -> (io::Result<usize>, B) {
    recv_until(fd, buf, |_| None).await
}

/// [`recv`] that gives up with `stop`'s error (a read timeout) when `stop` gives one
/// before anything arrived. On io_uring the receive is cancelled and its final
/// completion awaited, so bytes that arrived meanwhile are returned, not lost; on epoll
/// nothing is in flight while it waits. The buffer comes back either way.
pub(crate) async fn recv_until<B: IoBufMut>(
    fd: &SharedFd,
    mut buf: B,
    stop: impl FnMut(&mut Context<'_>) -> Option<io::Error>,
) -> (io::Result<usize>, B) {
    if let Some(ended) = fd.ended() {
        return (Err(ended), buf);
    }
    let _reading = fd.reading();
    // A receive dropped in flight took its bytes before anything asked for now: wait
    // for it (it was cancelled, so not for long) and hand them out first.
    if fd.has_dropped_reads() {
        poll_fn(|cx| fd.poll_dropped_reads(cx)).await;
    }
    // Bytes that came along with the socket were received before anything the kernel
    // still holds: they go first.
    let carried = fd.take_carried(&mut buf);
    if carried > 0 {
        return (Ok(carried), buf);
    }
    if let Some(err) = fd.take_carried_error() {
        return (Err(err), buf);
    }
    let (result, buf) = match fd.binding() {
        Ok(Binding::Uring(driver)) => {
            let keep = |read| fd.keep_dropped_read(read);
            uring::net::recv(driver, fd.fd(), buf, stop, &keep).await
        }
        Ok(Binding::Poll(reg)) => poll::net::recv(reg, fd.fd(), buf, stop).await,
        Err(err) => (Err(err), buf),
    };
    let result = match (result, fd.ended()) {
        (Ok(n), _) if n > 0 => {
            fd.activity().received();
            Ok(n)
        }
        // Once the connection was ended here, its end of stream (the shutdown that woke
        // the receive) and its errors are that ending.
        (_, Some(ended)) => Err(ended),
        // The end of stream after a reset is the reset: the peer did not finish, and a
        // program must not take what it got for the whole.
        (Ok(_), None) if fd.was_reset() => Err(io::Error::from_raw_os_error(libc::ECONNRESET)),
        // Detached while it waited: cancelled, as io_uring reports it (epoll found the
        // descriptor gone).
        (Err(_), None) if fd.is_detached() => Err(io::Error::from_raw_os_error(libc::ECANCELED)),
        (Err(err), None) => Err(note_reset(fd, err)),
        (end_of_stream, None) => end_of_stream,
    };
    (result, buf)
}

/// Remembers a reset `err` reports on `fd` (see [`SharedFd::was_reset`]).
fn note_reset(fd: &SharedFd, err: io::Error) -> io::Error {
    if err.raw_os_error() == Some(libc::ECONNRESET) {
        fd.mark_reset();
    }
    err
}

/// Sends once; the count may be short.
pub(crate) async fn send<B: IoBuf>(fd: &SharedFd, buf: B) -> (io::Result<usize>, B) {
    if let Some(ended) = fd.ended() {
        return (Err(ended), buf);
    }
    let writing = fd.activity().write_begins();
    let (result, buf) = match fd.binding() {
        Ok(Binding::Uring(driver)) => uring::net::send(driver, fd.fd(), buf, SEND_FLAGS).await,
        Ok(Binding::Poll(reg)) => poll::net::send(reg, fd.fd(), buf, SEND_FLAGS).await,
        Err(err) => (Err(err), buf),
    };
    drop(writing);
    let result = match result {
        Ok(n) => {
            if n > 0 {
                fd.activity().sent();
            }
            Ok(n)
        }
        Err(err) => Err(send_failure(fd, err)),
    };
    (result, buf)
}

/// What a failed send reports: the connection's ending if it was ended here, else the
/// error (EPIPE read as the peer's reset, see [`peer_reset`]).
fn send_failure(fd: &SharedFd, err: io::Error) -> io::Error {
    fd.ended()
        .unwrap_or_else(|| note_reset(fd, peer_reset(fd, err)))
}

/// Linux reports a reset to one call only (ECONNRESET); every send after it says EPIPE.
/// Unless this side shut its sending direction itself, EPIPE therefore means the peer
/// reset the connection, and is reported as such — whichever call happened to see it.
fn peer_reset(fd: &SharedFd, err: io::Error) -> io::Error {
    if err.raw_os_error() == Some(libc::EPIPE) && !fd.is_write_shut() {
        io::Error::from_raw_os_error(libc::ECONNRESET)
    } else {
        err
    }
}

/// Shuts down one or both directions.
pub(crate) async fn shutdown(fd: &SharedFd, how: Shutdown) -> io::Result<()> {
    if let Some(ended) = fd.ended() {
        return Err(ended);
    }
    let binding = fd.binding()?;
    if how != Shutdown::Read {
        fd.mark_write_shut();
    }
    match binding {
        Binding::Uring(driver) => uring::net::shutdown(driver, fd.fd(), how).await,
        Binding::Poll(_) => poll::net::shutdown(fd.fd(), how),
    }
}

/// Most links in one chain: keeps a chain well inside the submission queue.
const MAX_CHAIN_LINKS: usize = 32;

/// Sends every byte of `bufs` (`total` bytes) on a stream socket, in order, with as few
/// kernel transitions as the engine allows: on io_uring one `sendmsg` per 1024 iovecs,
/// linked into one chain with MSG_WAITALL; on epoll one `sendmsg` per 1024 iovecs (buffers
/// end to end in memory share an iovec). A short send or a chain cut after it is resumed
/// from the exact byte where it stopped.
///
/// Returns the progress reached (all of `bufs` unless there was an error) and the error.
pub(crate) async fn send_stream_batch(
    fd: &SharedFd,
    mut bufs: Vec<Bytes>,
    total: usize,
    report: &mut BatchReport,
) -> (io::Result<()>, Progress, Vec<Bytes>) {
    debug_assert_eq!(total, bufs.iter().map(Bytes::len).sum::<usize>());
    // Bytes not yet sent: a send that took them all ends the batch without walking it.
    let mut unsent = total;
    let mut progress = Progress::default();
    progress.advance(&bufs, 0);
    let binding = match fd.binding() {
        Ok(binding) => binding,
        Err(err) => return (Err(err), progress, bufs),
    };
    let _writing = fd.activity().write_begins();
    let mut rounds = 0u64;
    while !progress.done(&bufs) {
        if let Some(ended) = fd.ended() {
            return (Err(ended), progress, bufs);
        }
        if rounds > 0 {
            report.short_send_recoveries += 1;
        }
        rounds += 1;
        let (result, back) = match binding {
            Binding::Uring(driver) => {
                let flags = SEND_FLAGS | libc::MSG_WAITALL;
                let (result, back) = uring::net::sendmsg_stream(
                    driver,
                    fd.fd(),
                    bufs,
                    progress.first,
                    progress.skip,
                    flags,
                    MAX_CHAIN_LINKS,
                )
                .await;
                let outcome = result.and_then(|sent| match sent {
                    uring::net::StreamSend::One(completion) => {
                        report.operations += 1;
                        completion.into_result().map(|n| (n as usize, None))
                    }
                    uring::net::StreamSend::Chain(links) => Ok(chain_outcome(&links, report)),
                });
                (outcome, back)
            }
            Binding::Poll(reg) => {
                report.operations += 1;
                let (result, back) = poll::net::sendmsg_vectored(
                    reg,
                    fd.fd(),
                    bufs,
                    progress.first,
                    progress.skip,
                    SEND_FLAGS,
                )
                .await;
                (result.map(|n| (n, None)), back)
            }
        };
        bufs = back;
        match result {
            Ok((sent, error)) => {
                if sent > 0 {
                    fd.activity().sent();
                }
                if sent >= unsent {
                    progress = Progress {
                        first: bufs.len(),
                        skip: 0,
                    };
                } else {
                    progress.advance(&bufs, sent);
                }
                unsent = unsent.saturating_sub(sent);
                if let Some(err) = error {
                    return (Err(send_failure(fd, err)), progress, bufs);
                }
                if sent == 0 && !progress.done(&bufs) {
                    let err = io::ErrorKind::WriteZero.into();
                    return (Err(send_failure(fd, err)), progress, bufs);
                }
            }
            Err(err) => return (Err(send_failure(fd, err)), progress, bufs),
        }
    }
    (Ok(()), progress, bufs)
}

/// One nonblocking `sendmsg` of `bufs` from their start, made by the task that flushes:
/// a flush that finds its stream's sender idle sends this way without waking another
/// task or waiting for the engine's next turn (the cost a flush had over `writev`).
/// Nothing of the stream is in flight then, so the bytes keep their order.
///
/// `None` when it was not tried (the socket belongs to another runtime, or the
/// connection ended: the engine's path reports those) or the kernel took nothing for
/// want of room; else the bytes taken, or the error that broke the connection.
pub(crate) fn send_stream_now(fd: &SharedFd, bufs: &[Bytes]) -> Option<io::Result<usize>> {
    if fd.binding().is_err() || fd.ended().is_some() {
        return None;
    }
    let mut iovecs = take_spare_iovecs();
    iovecs_into(&mut iovecs, bufs, 0, 0, IOV_MAX);
    let result = sendmsg(fd.fd().raw(), &mut iovecs, SEND_FLAGS | libc::MSG_DONTWAIT);
    keep_spare_iovecs(iovecs);
    match result {
        Ok(0) => None,
        Ok(sent) => {
            fd.activity().sent();
            Some(Ok(sent))
        }
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            None
        }
        Err(err) => Some(Err(send_failure(fd, err))),
    }
}

/// Bytes a chain sent in order, and the error that stopped it, if one did. Links after a
/// short or failed one complete with ECANCELED and sent nothing; a short link without an
/// error is not an error: the caller resubmits from the new offset.
fn chain_outcome(
    links: &[uring::Completion],
    report: &mut BatchReport,
) -> (usize, Option<io::Error>) {
    report.operations += links.len() as u64;
    let mut sent = 0usize;
    for completion in links {
        match completion.into_result() {
            Ok(n) => sent += n as usize,
            Err(err) if err.raw_os_error() == Some(libc::ECANCELED) => return (sent, None),
            Err(err) => return (sent, Some(err)),
        }
    }
    (sent, None)
}
