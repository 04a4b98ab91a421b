//! A task's budget of operations that finish at once, so that a task whose every await
//! is ready (a socket that always has data, a member of a group that fails every call, a
//! send the kernel always takes) still lets the loop turn: the other tasks run, timers
//! fire, a signal is seen, and sockets whose readiness only the engine can learn are
//! looked at.
//!
//! The runtime gives each poll of a task (and of the future `block_on` runs) a budget;
//! each socket operation that completes uses one; once it is spent, the next operation
//! says Pending and wakes its task at once, which yields to the loop and comes back in
//! the next round. A timer that is due counts as such an operation too (a loop of zero
//! timeouts yields), except where the future it times out spent the budget: a timeout
//! always fires. Outside a runtime's poll (under another executor) the budget is
//! unlimited.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Operations a task may finish in one poll before it yields, as tokio gives its tasks.
const PER_POLL: u32 = 128;

/// The budget outside a runtime's poll: never spent.
const UNLIMITED: u32 = u32::MAX;

thread_local! {
    static BUDGET: Cell<u32> = const { Cell::new(UNLIMITED) };
}

/// Runs `poll` (one poll of a task) with a fresh budget, then restores the one before it.
pub(crate) fn with_budget<R>(poll: impl FnOnce() -> R) -> R {
    with_budget_of(PER_POLL, poll)
}

/// Runs `poll` with `budget`, then restores the one before it (also when `poll` panics).
fn with_budget_of<R>(budget: u32, poll: impl FnOnce() -> R) -> R {
    struct Restore(u32);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUDGET.with(|budget| budget.set(self.0));
        }
    }
    let _restore = Restore(BUDGET.with(|cell| cell.replace(budget)));
    poll()
}

/// Polls `future` unless this poll's budget is spent (then it is Pending, its task
/// woken to run again next round); a Ready result uses one unit of the budget.
pub(crate) fn poll_budgeted<F: Future>(
    future: Pin<&mut F>,
    cx: &mut Context<'_>,
) -> Poll<F::Output> {
    let left = BUDGET.with(Cell::get);
    if left == 0 {
        cx.waker().wake_by_ref();
        return Poll::Pending;
    }
    let polled = future.poll(cx);
    if polled.is_ready() {
        // Read again: an operation polled inside this one may have spent some.
        BUDGET.with(|budget| {
            let left = budget.get();
            if left != UNLIMITED {
                budget.set(left.saturating_sub(1));
            }
        });
    }
    polled
}

/// One operation that finished at once (a timer that is due) uses a unit of the budget;
/// with the budget spent it is Pending instead, its task woken to run again next round.
pub(crate) fn poll_proceed(cx: &mut Context<'_>) -> Poll<()> {
    BUDGET.with(|budget| match budget.get() {
        0 => {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
        UNLIMITED => Poll::Ready(()),
        left => {
            budget.set(left - 1);
            Poll::Ready(())
        }
    })
}

/// Whether this poll's budget has a unit left (always, outside a runtime's poll).
pub(crate) fn has_budget_remaining() -> bool {
    BUDGET.with(Cell::get) > 0
}

/// Runs `poll` without a budget, then restores the one before it: for a timer whose
/// future beside it spent the budget (see `time::within`), which must still fire.
pub(crate) fn unconstrained<R>(poll: impl FnOnce() -> R) -> R {
    with_budget_of(UNLIMITED, poll)
}

/// `future`, counted against its task's budget (see [`poll_budgeted`]).
pub(crate) async fn budgeted<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| poll_budgeted(future.as_mut(), cx)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    struct CountWakes(AtomicUsize);

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_poll_finishes_a_bounded_number_of_ready_operations_then_yields() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        with_budget(|| {
            for _ in 0..PER_POLL {
                let ready = std::pin::pin!(std::future::ready(()));
                assert!(poll_budgeted(ready, &mut cx).is_ready());
            }
            let ready = std::pin::pin!(std::future::ready(()));
            assert!(poll_budgeted(ready, &mut cx).is_pending());
            assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "woken to run again");
            // A nested poll (a task's poll inside another's) has its own, and the outer
            // one's is as it was once that returns.
            with_budget(|| {
                let ready = std::pin::pin!(std::future::ready(()));
                assert!(poll_budgeted(ready, &mut cx).is_ready());
            });
            let ready = std::pin::pin!(std::future::ready(()));
            assert!(poll_budgeted(ready, &mut cx).is_pending());
        });
        // Outside a runtime's poll nothing is counted.
        for _ in 0..10 * PER_POLL {
            let ready = std::pin::pin!(std::future::ready(()));
            assert!(poll_budgeted(ready, &mut cx).is_ready());
        }
    }

    #[test]
    fn pending_operations_spend_nothing() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes);
        let mut cx = Context::from_waker(&waker);
        with_budget(|| {
            for _ in 0..10 * PER_POLL {
                let pending = std::pin::pin!(std::future::pending::<()>());
                assert!(poll_budgeted(pending, &mut cx).is_pending());
            }
            let ready = std::pin::pin!(std::future::ready(()));
            assert!(poll_budgeted(ready, &mut cx).is_ready());
        });
    }
}
