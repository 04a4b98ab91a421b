//! Ending a driver's wait from another thread.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Ends a driver's `park` from any thread: a write to the eventfd its ring reads, or
/// mio's waker on the epoll set.
#[derive(Clone)]
pub(crate) enum Unparker {
    EventFd(Arc<OwnedFd>),
    Mio(Arc<mio::Waker>),
}

impl Unparker {
    pub(crate) fn unpark(&self) {
        match self {
            Unparker::EventFd(fd) => {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a live local to a descriptor this Unparker
                // keeps open. EAGAIN (counter saturated) already means a wake is pending.
                let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            }
            // A failed wake leaves the loop to its next timer; nothing better to do here.
            Unparker::Mio(waker) => drop(waker.wake()),
        }
    }
}
