//! Timers: sleeps and timeouts, fired by the loop after each park.
//!
//! The next deadline becomes the park's timeout (a timespec in the same `io_uring_enter`
//! that submits, or `epoll_wait`'s timeout), so a timer costs no system call of its own.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::with_timers;

/// What "never" is for a [`sleep`] whose deadline does not fit in an `Instant`.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Timer ids, unique in the process, not per runtime: a [`Sleep`] keeps its key when it
/// is polled or dropped under another runtime (it is `Send`), and a key that another
/// runtime's timer also had would make it take that timer's wake-up or remove it.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Pending timers, ordered by deadline.
#[derive(Default)]
pub(crate) struct Timers {
    entries: BTreeMap<(Instant, u64), Waker>,
}

impl Timers {
    fn insert(&mut self, deadline: Instant, waker: Waker) -> (Instant, u64) {
        let key = (deadline, NEXT_ID.fetch_add(1, Ordering::Relaxed));
        self.entries.insert(key, waker);
        key
    }

    /// No timer is pending.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How long the loop may park before the earliest timer is due.
    pub(crate) fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.entries
            .keys()
            .next()
            .map(|(deadline, _)| deadline.saturating_duration_since(now))
    }

    /// Removes and returns the wakers of every timer due at `now`.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<Waker> {
        let mut due = Vec::new();
        while let Some(entry) = self.entries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        due
    }

    /// Removes every timer and returns their wakers, for a runtime shutting down.
    pub(crate) fn take_all(&mut self) -> Vec<Waker> {
        std::mem::take(&mut self.entries).into_values().collect()
    }
}

/// A future that completes at a deadline. Polled in a ringsock task once it is due, it
/// uses a unit of the task's budget of operations that finish at once (as a socket
/// operation does), and is Pending for one more round of the loop when that budget is
/// spent: a task that only ever finds due timers still yields.
#[must_use = "futures do nothing unless awaited"]
pub struct Sleep {
    deadline: Instant,
    key: Option<(Instant, u64)>,
    /// The library's own waits, on sockets that fail with WrongRuntime outside their
    /// runtime anyway: polled where no runtime runs, such a sleep ends at once and lets
    /// the operation say so.
    lenient: bool,
}

/// Waits for `duration`. A duration too long for the clock to add (such as
/// `Duration::MAX`) waits for a hundred years instead of panicking.
///
/// # Panics
///
/// Polled before its deadline where no ringsock runtime runs (under another executor
/// alone): nothing there would wake it.
pub fn sleep(duration: Duration) -> Sleep {
    sleep_until(deadline_after(duration))
}

fn deadline_after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .or_else(|| now.checked_add(FOREVER))
        .unwrap_or(now)
}

/// [`sleep`] for the library's own waits: where no runtime runs it ends at once.
pub(crate) fn sleep_lenient(duration: Duration) -> Sleep {
    sleep_until_lenient(deadline_after(duration))
}

/// [`sleep_until`] for the library's own waits: where no runtime runs it ends at once.
pub(crate) fn sleep_until_lenient(deadline: Instant) -> Sleep {
    Sleep {
        lenient: true,
        ..sleep_until(deadline)
    }
}

/// Waits until `deadline`.
pub fn sleep_until(deadline: Instant) -> Sleep {
    Sleep {
        deadline,
        key: None,
        lenient: false,
    }
}

impl Sleep {
    /// When this sleep ends.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    fn unregister(&mut self) {
        if let Some(key) = self.key.take() {
            with_timers(|timers| timers.entries.remove(&key));
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            // A due timer is an operation that finished at once: a loop of zero timeouts
            // around a receive that waits must still yield, or the engine never gets
            // the turn that completes the receive.
            std::task::ready!(super::coop::poll_proceed(cx));
            self.unregister();
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        let previous = self.key.take();
        let key = with_timers(|timers| {
            // A fired timer is gone from the map: register again rather than miss a wake.
            if let Some(key) = previous {
                if let Some(waker) = timers.entries.get_mut(&key) {
                    if !waker.will_wake(cx.waker()) {
                        *waker = cx.waker().clone();
                    }
                    return key;
                }
            }
            timers.insert(deadline, cx.waker().clone())
        });
        match key {
            Some(key) => {
                self.key = Some(key);
                Poll::Pending
            }
            // No runtime runs here: nothing would ever wake this sleep. A timer that
            // fired early would turn a program's waits and timeouts into a busy loop.
            None if !self.lenient && !super::is_running_here() => panic!(
                "ringsock: runtime::sleep or timeout polled outside a ringsock runtime (run \
                 it inside block_on, a ringsock task, or a tokio Driver's run_until)"
            ),
            // The runtime's timers are busy (polled from inside them): end now rather
            // than hang.
            None => Poll::Ready(()),
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.unregister();
    }
}

/// A timeout ran out before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed {
    after: Duration,
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "timed out after {:?}", self.after)
    }
}

impl std::error::Error for Elapsed {}

impl From<Elapsed> for crate::Error {
    fn from(elapsed: Elapsed) -> crate::Error {
        crate::Error::timed_out(elapsed.to_string())
    }
}

/// Runs `future` for at most `duration`. On time-out the future is dropped, which
/// cancels the operation it was waiting for.
///
/// # Panics
///
/// As [`sleep`]: polled where no ringsock runtime runs, while `future` is pending.
pub async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    within(duration, future, sleep(duration)).await
}

/// [`timeout`] for the library's own waits: where no runtime runs, the time is up at
/// once.
pub(crate) async fn timeout_lenient<F: Future>(
    duration: Duration,
    future: F,
) -> Result<F::Output, Elapsed> {
    within(duration, future, sleep_lenient(duration)).await
}

async fn within<F: Future>(
    duration: Duration,
    future: F,
    sleep: Sleep,
) -> Result<F::Output, Elapsed> {
    let mut future = std::pin::pin!(future);
    let mut sleep = std::pin::pin!(sleep);
    std::future::poll_fn(|cx| {
        let had_budget = super::coop::has_budget_remaining();
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        // A future that spent the whole budget (one always ready, polled until the
        // budget said Pending) would otherwise leave none for the due timer, round after
        // round: the timeout would never fire. As tokio's Timeout does.
        let fired = if had_budget && !super::coop::has_budget_remaining() {
            super::coop::unconstrained(|| sleep.as_mut().poll(cx))
        } else {
            sleep.as_mut().poll(cx)
        };
        match fired {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed { after: duration })),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_timers_come_out_in_deadline_order() {
        let mut timers = Timers::default();
        let start = Instant::now();
        let waker = Waker::noop().clone();
        timers.insert(start + Duration::from_millis(20), waker.clone());
        timers.insert(start + Duration::from_millis(10), waker.clone());
        timers.insert(start + Duration::from_millis(30), waker);
        assert_eq!(timers.next_timeout(start), Some(Duration::from_millis(10)));
        assert_eq!(timers.take_due(start + Duration::from_millis(25)).len(), 2);
        assert_eq!(timers.next_timeout(start), Some(Duration::from_millis(30)));
        assert_eq!(
            timers.next_timeout(start + Duration::from_secs(1)),
            Some(Duration::ZERO)
        );
    }
}
