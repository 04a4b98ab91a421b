//! tokio's `AsyncRead`/`AsyncWrite` on [`StreamSocket`] (plain or TLS).
//!
//! Receives go into a buffer the socket owns and are copied out; writes are copies
//! queued on the socket's output stream and sent at once (later ones join the batch
//! while one is in flight). A caller that stops polling leaves nothing of its own
//! with the kernel and loses no byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::StreamSocket;

impl AsyncRead for StreamSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_read_with(cx, |received| {
                let n = received.len().min(buf.remaining());
                buf.put_slice(&received[..n]);
                n
            })
            .map_ok(drop)
    }
}

impl AsyncWrite for StreamSocket {
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

    /// Sends what was written, then the FIN (after a TLS `close_notify`); the socket
    /// can still read.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_shutdown_write(cx)
    }
}
