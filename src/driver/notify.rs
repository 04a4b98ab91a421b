//! Descriptors another event loop can wait on for a driver: an eventfd the kernel signals
//! on completions, and a timerfd for the runtime's next timer. Engine-neutral.
#![allow(unsafe_code)]
// Only the eventfd serves a runtime without the `tokio` feature.
#![cfg_attr(not(feature = "tokio"), allow(dead_code))]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A new non-blocking, close-on-exec eventfd with a count of zero.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes the count of an eventfd or the expirations of a timerfd (both are read as one
/// `u64`); 0 when there was none. The descriptor must be non-blocking.
pub(crate) fn take_count(fd: &impl AsRawFd) -> u64 {
    let mut count: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local `u64`; `fd` is borrowed, so open.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    if n == 8 {
        count
    } else {
        0
    }
}

/// An owned duplicate of `raw`, a descriptor the caller keeps open during the call.
pub(crate) fn duplicate(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the caller keeps `raw` open for the duration of this call (it belongs to a
    // driver it borrows), and the borrow ends before this function returns.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    borrowed.try_clone_to_owned()
}

/// A monotonic timerfd, armed for one expiry at a time.
pub(crate) struct TimerFd {
    fd: OwnedFd,
}

impl TimerFd {
    /// A disarmed, non-blocking timerfd on the monotonic clock.
    pub(crate) fn new() -> io::Result<TimerFd> {
        // SAFETY: timerfd_create has no memory-safety preconditions; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by timerfd_create and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TimerFd { fd })
    }

    /// Expires once after `after` (at least one nanosecond, since zero disarms), or
    /// disarms with `None`.
    pub(crate) fn set(&self, after: Option<Duration>) -> io::Result<()> {
        let value = match after {
            Some(after) => {
                let after = after.max(Duration::from_nanos(1));
                libc::timespec {
                    tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                    tv_nsec: after.subsec_nanos() as libc::c_long,
                }
            }
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `spec` is a live local the call only reads; the old value is not asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Descriptor holders that own their descriptor for their whole life and always name
/// the same one: what tokio's `AsyncFd` needs of what it wraps.
#[cfg(feature = "tokio")]
pub(crate) trait OwnsFd: AsRawFd {}

#[cfg(feature = "tokio")]
impl OwnsFd for OwnedFd {}

#[cfg(feature = "tokio")]
impl OwnsFd for TimerFd {}

/// Registers `inner` with the current tokio reactor, for readability.
#[cfg(feature = "tokio")]
pub(crate) fn register_readable<T: OwnsFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `OwnsFd` types own their descriptor, keep it open until dropped and return
    // the same one from every `as_raw_fd`; the AsyncFd owns `inner` from here on.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|err| err.into_parts().1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventfd_count_is_taken_once() {
        let fd = eventfd().unwrap();
        assert_eq!(take_count(&fd), 0);
        let one: u64 = 3;
        // SAFETY: writes 8 bytes from a live local to an open eventfd.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        assert_eq!(take_count(&fd), 3);
        assert_eq!(take_count(&fd), 0);
    }

    #[test]
    fn a_disarmed_timer_never_counts() {
        let timer = TimerFd::new().unwrap();
        timer.set(Some(Duration::from_secs(3600))).unwrap();
        timer.set(None).unwrap();
        assert_eq!(take_count(&timer), 0);
    }
}
