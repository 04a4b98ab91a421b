//! A stream receive whose future was dropped while the kernel may still fill its
//! buffer: the socket keeps it until it is done, and hands out what it took first.

use std::task::{Context, Poll};

use bytes::Bytes;

/// A receive whose future was dropped in flight (an io_uring receive, cancelled on the
/// drop; the kernel may have run it first, in the same submission): whatever it took
/// from the socket came before anything a later receive asks the kernel for, so the
/// next receive waits for it and hands its bytes out first.
pub(crate) trait DroppedRead {
    /// Ready once the kernel is done with the receive: the bytes it took (none when the
    /// cancel came in time), or the socket's error it took. Linux reports an error such
    /// as a peer's reset to one call only, so the next receive must report it instead.
    fn poll_taken(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Bytes>>;
}
