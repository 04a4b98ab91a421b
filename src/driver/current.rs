//! Which driver drives this thread now, and the errors for using one that does not.
//!
//! Every driver gets an id from a process-wide counter (never its address, which a later
//! driver may reuse). The runtime marks its driver current while it runs
//! ([`enter`]); an engine compares the id its socket or operation was registered with
//! against [`is_current`] before it touches its ring or epoll set, so an operation
//! polled under another runtime can never take that runtime's completions.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Error;

/// A driver's identity, unique in the process for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DriverId(u64);

impl DriverId {
    /// A fresh id.
    pub(crate) fn next() -> DriverId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        DriverId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

thread_local! {
    /// The id of the driver whose runtime runs on this thread; 0 when none does.
    static CURRENT: Cell<u64> = const { Cell::new(0) };
}

/// True when `id`'s runtime is the one running on this thread.
#[inline]
pub(crate) fn is_current(id: DriverId) -> bool {
    CURRENT.with(|current| current.get() == id.0)
}

/// The raw id of the driver running on this thread (0 when none does), for a caller that
/// only needs to notice when it changes.
#[inline]
pub(crate) fn current_raw() -> u64 {
    CURRENT.with(Cell::get)
}

/// Makes `id` current until the guard drops, which restores the one before (runtimes
/// nest when one `block_on` runs inside another runtime's task).
pub(crate) fn enter(id: DriverId) -> EnterGuard {
    let previous = CURRENT.with(|current| current.replace(id.0));
    EnterGuard { previous }
}

/// Restores the previous current driver when dropped.
pub(crate) struct EnterGuard {
    previous: u64,
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        CURRENT.with(|current| current.set(self.previous));
    }
}

/// The error for using something of driver `owner` where it does not run.
pub(crate) fn wrong_runtime(owner: DriverId) -> io::Error {
    let message = CURRENT.with(|current| match current.get() {
        0 => format!(
            "this socket or operation belongs to ringsock runtime {}, and no ringsock \
             runtime is running on this thread",
            owner.0
        ),
        other => format!(
            "this socket or operation belongs to ringsock runtime {}, but runtime {other} \
             is running on this thread",
            owner.0
        ),
    });
    io::Error::other(Error::wrong_runtime(message))
}

/// The error for using something whose runtime was dropped.
pub(crate) fn runtime_gone(owner: DriverId) -> io::Error {
    io::Error::other(Error::wrong_runtime(format!(
        "the ringsock runtime {} this socket or operation belongs to was dropped",
        owner.0
    )))
}

/// The error for needing a runtime where none runs.
pub(crate) fn no_runtime() -> io::Error {
    io::Error::other(Error::wrong_runtime(
        "no ringsock runtime is running on this thread",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SocketErrorStatus;

    #[test]
    fn ids_are_unique_and_entering_nests() {
        let (a, b) = (DriverId::next(), DriverId::next());
        assert_ne!(a, b);
        assert!(!is_current(a));
        {
            let _outer = enter(a);
            assert!(is_current(a));
            {
                let _inner = enter(b);
                assert!(is_current(b) && !is_current(a));
            }
            assert!(is_current(a));
        }
        assert!(!is_current(a));
    }

    #[test]
    fn misuse_errors_carry_their_status() {
        let id = DriverId::next();
        for err in [wrong_runtime(id), runtime_gone(id), no_runtime()] {
            assert_eq!(
                SocketErrorStatus::from_io(&err),
                SocketErrorStatus::WrongRuntime
            );
        }
    }
}
