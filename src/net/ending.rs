//! Ending a connection from this side at once: an abort (RST) or a shutdown of both
//! directions that wakes every operation in flight. Used by close, the timeouts' watchdog
//! and drop.

use std::net::Shutdown;
use std::time::Duration;

use crate::driver::{sockopt, SharedFd};
use crate::Error;

/// Aborts the connection: RST to the peer now (the kernel's disconnect), whatever
/// handles (input and output streams) still hold the descriptor, queued data dropped;
/// every operation on it fails with `why` from now on, and those in flight are woken.
/// Where the disconnect is refused, the RST goes when the descriptor closes (zero
/// linger), and in-flight operations are woken by a shutdown of the receiving side
/// (which sends nothing), and of the sending side too if data is queued.
pub(crate) fn abort(fd: &SharedFd, why: Error) {
    fd.end(why);
    // SO_LINGER and shutdown act on the socket, not on this descriptor: on a detached
    // one they would reset the connection its new owner serves.
    if fd.is_detached() {
        return;
    }
    let sock = fd.sock();
    let _ = sock.set_linger(Some(Duration::ZERO));
    // The reset goes now, not when the last handle (an input or output stream the
    // program still holds) closes the descriptor.
    if sockopt::reset_connection(fd.raw()).is_ok() {
        fd.mark_write_shut();
        return;
    }
    let _ = sock.shutdown(Shutdown::Read);
    if sockopt::unacknowledged_bytes(fd.raw()).is_ok_and(|bytes| bytes > 0) {
        fd.mark_write_shut();
        let _ = sock.shutdown(Shutdown::Write);
    }
}

/// Closes an ended connection's both directions now, waking every operation in flight
/// (they fail with the ending): the peer gets a FIN, or, when data is still queued for
/// it, a RST once the descriptor closes (so a peer that does not read cannot keep that
/// data, and the kernel's memory, alive).
pub(crate) fn shut_now(fd: &SharedFd) {
    if fd.is_detached() {
        return;
    }
    let sock = fd.sock();
    if sockopt::unacknowledged_bytes(fd.raw()).is_ok_and(|bytes| bytes > 0) {
        let _ = sock.set_linger(Some(Duration::ZERO));
    }
    fd.mark_write_shut();
    let _ = sock.shutdown(Shutdown::Both);
}
