//! The wait before the next accept after one failed because the process or the system
//! ran out of descriptors or memory.
//!
//! Such a failure is not about one connection. Linux reserves the new descriptor before
//! it looks at the accept queue, so the next accept fails the same way at once, with or
//! without a connection waiting, until something else closes a descriptor; a server that
//! retries at once spins. So after the first such failure each accept waits first: 5 ms,
//! doubling with each failure in a row up to 500 ms, and back to none after a success.
//! The first failure is reported at once, so the program can react (close idle
//! connections, say); serving resumes at most 500 ms after descriptors free up, and a
//! failed attempt costs one system call.
//!
//! The other classic answer, a spare descriptor closed to accept and drop the waiting
//! connection (libev's and libuv's trick), is not used: it turns a shortage that lasts a
//! moment into refused clients that would have been served a few milliseconds later,
//! costs a descriptor per listener, and races with every other thread of the process for
//! the slot it frees. Connections meanwhile wait in the kernel's accept queue, which is
//! bounded by the listen backlog.

use std::io;
use std::time::{Duration, Instant};

/// The wait after the first failure.
pub(crate) const FIRST: Duration = Duration::from_millis(5);
/// The longest wait.
pub(crate) const MAX: Duration = Duration::from_millis(500);

/// True for the failures that mean descriptors or memory ran out (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM), not that one connection went wrong.
pub(crate) fn is_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The back-off of one listener.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    /// The current wait; zero after a success.
    delay: Duration,
    /// When the next accept may try.
    resume_at: Option<Instant>,
}

impl Backoff {
    /// An accept failed for lack of resources at `now`: the next one waits longer.
    pub(crate) fn failed(&mut self, now: Instant) -> Duration {
        self.delay = if self.delay.is_zero() {
            FIRST
        } else {
            self.delay.saturating_mul(2).min(MAX)
        };
        self.resume_at = Some(now + self.delay);
        self.delay
    }

    /// An accept succeeded: no more waiting.
    pub(crate) fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    /// When the next accept may try; `None` when it may try at once.
    pub(crate) fn resume_at(&self) -> Option<Instant> {
        self.resume_at
    }

    /// The current wait; zero when the last accept did not fail for lack of resources.
    pub(crate) fn delay(&self) -> Duration {
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_from_5_ms_to_at_most_500_ms() {
        let mut backoff = Backoff::default();
        let now = Instant::now();
        assert_eq!(backoff.resume_at(), None);
        let waits: Vec<_> = (0..10).map(|_| backoff.failed(now).as_millis()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 500, 500, 500]);
        assert_eq!(backoff.resume_at(), Some(now + MAX));
        assert_eq!(backoff.delay(), MAX);
    }

    #[test]
    fn a_success_resets_it() {
        let mut backoff = Backoff::default();
        let now = Instant::now();
        backoff.failed(now);
        backoff.failed(now);
        backoff.succeeded();
        assert_eq!(backoff.resume_at(), None);
        assert_eq!(backoff.delay(), Duration::ZERO);
        assert_eq!(backoff.failed(now), FIRST);
        assert_eq!(backoff.resume_at(), Some(now + FIRST));
    }

    #[test]
    fn only_running_out_counts() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(
                is_exhaustion(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [libc::ECONNABORTED, libc::EPERM, libc::EINTR, libc::EAGAIN] {
            assert!(
                !is_exhaustion(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(!is_exhaustion(&io::Error::other("no errno")));
    }
}
