//! A StreamSocket driven by polls: the state behind tokio's and futures-io's
//! `AsyncRead`/`AsyncWrite` (implemented in `crate::tokio::io` and here).
//!
//! Those traits lend the caller's buffer for one poll only, while a receive on io_uring
//! keeps its buffer until its completion. So every receive goes into a buffer this state
//! owns, and the bytes are copied out when they are there; every write is a copy queued
//! on the socket's [`OutputStream`](super::OutputStream). A caller that stops polling
//! leaves nothing of its own with the kernel, and loses nothing: a receive in flight
//! stays here for the next poll, and what it brought is handed out by the next reads.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::StreamSocket;
use crate::buf::BufResult;
use crate::Result;

/// Bytes asked of the kernel per receive.
const RECEIVE_SIZE: usize = 64 * 1024;

type Owned<T> = Pin<Box<dyn Future<Output = T>>>;

/// What the poll-based traits keep between polls.
#[derive(Default)]
pub(crate) struct PollIo {
    /// A receive in flight, into a buffer it owns.
    receiving: Option<Owned<BufResult<usize, Vec<u8>>>>,
    /// Bytes received and not yet handed out: `received[start..]`.
    received: Vec<u8>,
    start: usize,
    /// The sending side's shutdown in flight.
    shutting_down: Option<Owned<Result<()>>>,
    /// The shutdown is done.
    shut_down: bool,
}

impl PollIo {
    /// Appends to `out` the bytes received and not handed out yet, for a socket that
    /// detached: those buffered here, then what a receive in flight brought. The socket
    /// has left its driver, so that receive is complete (io_uring reaped its cancel) or
    /// fails without reading (epoll): one poll settles it.
    pub(crate) fn take_unread(&mut self, out: &mut bytes::BytesMut) {
        out.extend_from_slice(&self.received[self.start..]);
        self.start = self.received.len();
        if let Some(mut receiving) = self.receiving.take() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready((Ok(_), buf)) = receiving.as_mut().poll(&mut cx) {
                out.extend_from_slice(&buf);
            }
        }
    }
}

impl PollIo {
    /// For a read that does not go through these traits: the bytes received and not yet
    /// handed out, which it must get first. A receive in flight is dropped; the socket
    /// keeps what the kernel gives it for that read, behind these bytes.
    pub(crate) fn take_read_ahead(&mut self) -> bytes::Bytes {
        self.receiving = None;
        let ahead = bytes::Bytes::copy_from_slice(&self.received[self.start..]);
        self.start = self.received.len();
        ahead
    }
}

impl StreamSocket {
    /// Hands received bytes to `copy` (which takes what fits and says how many it took),
    /// receiving first when none are buffered; 0 bytes at end of stream.
    pub(crate) fn poll_read_with(
        &mut self,
        cx: &mut Context<'_>,
        copy: impl FnOnce(&[u8]) -> usize,
    ) -> Poll<io::Result<usize>> {
        if self.poll_io().start == self.poll_io().received.len() {
            let receiving = match self.poll_io().receiving.take() {
                Some(receiving) => receiving,
                None => {
                    let state = self.poll_io();
                    let mut buf = std::mem::take(&mut state.received);
                    state.start = 0;
                    buf.clear();
                    buf.reserve(RECEIVE_SIZE);
                    self.read_owned(buf)
                }
            };
            let state = self.poll_io();
            let mut receiving = receiving;
            match receiving.as_mut().poll(cx) {
                Poll::Pending => {
                    state.receiving = Some(receiving);
                    return Poll::Pending;
                }
                Poll::Ready((result, buf)) => {
                    state.received = buf;
                    state.start = 0;
                    if let Err(err) = result {
                        state.received.clear();
                        return Poll::Ready(Err(err.into()));
                    }
                }
            }
        }
        let state = self.poll_io();
        let taken = copy(&state.received[state.start..]);
        state.start += taken;
        Poll::Ready(Ok(taken))
    }

    /// The socket's driver is the one running here (the output stream's sender is a task
    /// of it): `WrongRuntime` otherwise, or "not connected".
    fn check_usable_here(&self) -> io::Result<()> {
        self.fd()?.binding()?;
        Ok(())
    }

    /// Queues a copy of `buf` on the socket's output stream and starts sending it.
    pub(crate) fn poll_write_copy(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.check_usable_here()?;
        if self.poll_io().shut_down || self.poll_io().shutting_down.is_some() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the sending side was shut down",
            )));
        }
        self.output_stream()
            .poll_write_copy(buf, cx)
            .map_err(io::Error::from)
    }

    /// Ready once every byte accepted so far has been sent.
    pub(crate) fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.fd().is_err() {
            return Poll::Ready(Ok(()));
        }
        self.check_usable_here()?;
        self.output_stream()
            .poll_flushed(cx)
            .map_err(io::Error::from)
    }

    /// Sends what was accepted, then shuts the sending side down (after a TLS
    /// `close_notify`); reading goes on.
    pub(crate) fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.poll_io().shut_down {
            return Poll::Ready(Ok(()));
        }
        if self.poll_io().shutting_down.is_none() {
            std::task::ready!(self.poll_flush_all(cx))?;
            let shutdown = self.shutdown_owned();
            self.poll_io().shutting_down = Some(shutdown);
        }
        let state = self.poll_io();
        let shutting_down = state
            .shutting_down
            .as_mut()
            .expect("set above or by an earlier poll");
        let result = std::task::ready!(shutting_down.as_mut().poll(cx));
        state.shutting_down = None;
        state.shut_down = result.is_ok();
        Poll::Ready(result.map_err(io::Error::from))
    }
}

#[cfg(feature = "futures-io")]
mod futures_io_traits {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use crate::StreamSocket;

    /// Reads through a buffer the socket owns (see the module's docs).
    impl futures_io::AsyncRead for StreamSocket {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().poll_read_with(cx, |received| {
                let n = received.len().min(buf.len());
                buf[..n].copy_from_slice(&received[..n]);
                n
            })
        }
    }

    /// Writes are copies queued on the socket's output stream, sent at once.
    impl futures_io::AsyncWrite for StreamSocket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().poll_write_copy(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().poll_flush_all(cx)
        }

        fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().poll_shutdown_write(cx)
        }
    }
}
