//! A runtime turned by another event loop (tokio's, see `crate::tokio`): instead of
//! parking in its driver, it runs one bounded step each time the outer loop polls it,
//! and the outer loop sleeps on the driver's notify descriptor and a timer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use super::Runtime;

/// Rounds of one step before it yields to the outer loop, so a busy runtime does not
/// starve the outer loop's other tasks.
const STEP_ROUNDS: u32 = 32;

/// The waker of the outer loop's task that turns the runtime: woken whenever a task of
/// the runtime is scheduled, from whichever thread.
#[derive(Default)]
pub(crate) struct OuterWaker(Mutex<Option<Waker>>);

impl OuterWaker {
    fn register(&self, waker: &Waker) {
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !slot
            .as_ref()
            .is_some_and(|current| current.will_wake(waker))
        {
            *slot = Some(waker.clone());
        }
    }

    pub(crate) fn wake(&self) {
        let slot = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(waker) = slot.as_ref() {
            waker.wake_by_ref();
        }
    }
}

/// How a step ended.
pub(crate) enum Step<T> {
    /// The future finished.
    Ready(T),
    /// Work is left; the outer task was woken to come back after the others ran.
    Yielded,
    /// Nothing to do until the notify descriptor turns readable, a waker fires, or the
    /// next timer (in this long) is due.
    Idle(Option<Duration>),
}

/// The waker of the future a step polls: a flag the step reads, and a wake of the
/// outer task.
struct MainFlag {
    woken: AtomicBool,
    outer: Arc<OuterWaker>,
}

impl Wake for MainFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.outer.wake();
    }
}

/// What one run of a future on an externally turned runtime keeps between steps.
pub(crate) struct Stepper {
    main: Arc<MainFlag>,
    waker: Waker,
}

impl Runtime {
    /// A stepper for one future; the runtime must have been built turned from outside.
    pub(crate) fn stepper(&self) -> Stepper {
        let outer = self
            .inner
            .shared
            .outer
            .clone()
            .expect("a runtime built to be turned from outside");
        let main = Arc::new(MainFlag {
            woken: AtomicBool::new(true),
            outer,
        });
        Stepper {
            waker: Waker::from(main.clone()),
            main,
        }
    }

    /// One bounded step: collects what the driver has (entering the ring for deferred
    /// completions when `collect`), fires due timers, polls `future` if it was woken,
    /// runs the ready tasks, and submits what they queued, until nothing is left to do
    /// or the rounds are used up.
    ///
    /// # Panics
    ///
    /// When the runtime is already running on this thread (a step inside its own
    /// `block_on` or step).
    pub(crate) fn step<F: Future + ?Sized>(
        &self,
        stepper: &Stepper,
        mut future: Pin<&mut F>,
        outer: &Waker,
        mut collect: bool,
    ) -> io::Result<Step<F::Output>> {
        let _enter = self.enter();
        let inner = &self.inner;
        if let Some(slot) = &inner.shared.outer {
            slot.register(outer);
        }
        for _ in 0..STEP_ROUNDS {
            inner.driver.turn(collect)?;
            collect = false;
            self.fire_due_timers();
            if stepper.main.woken.swap(false, Ordering::AcqRel) {
                let mut cx = Context::from_waker(&stepper.waker);
                if let Poll::Ready(output) =
                    super::coop::with_budget(|| future.as_mut().poll(&mut cx))
                {
                    // What the future queued last goes to the kernel now, not at the
                    // next step, which may never come.
                    inner.driver.turn(false)?;
                    return Ok(Step::Ready(output));
                }
            }
            self.run_ready_tasks();
            let arrived = inner.driver.turn(false)?;
            let busy =
                arrived || stepper.main.woken.load(Ordering::Acquire) || inner.shared.queued() > 0;
            if !busy {
                let timers = inner.timers.borrow();
                let next = match timers.is_empty() {
                    true => None,
                    false => timers.next_timeout(Instant::now()),
                };
                return Ok(Step::Idle(next));
            }
        }
        outer.wake_by_ref();
        Ok(Step::Yielded)
    }

    /// The descriptor the outer loop waits on (see `Driver::notify_fd`).
    pub(crate) fn notify_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.inner.driver.notify_fd()
    }

    /// Enters the runtime unless it is running already, for dropping a future in its
    /// context (its operations cancel on their own driver).
    pub(crate) fn enter_if_idle(&self) -> Option<super::EnterGuard> {
        (!self.inner.running.get()).then(|| self.enter())
    }

    fn fire_due_timers(&self) {
        let due = {
            let mut timers = self.inner.timers.borrow_mut();
            if timers.is_empty() {
                return;
            }
            timers.take_due(Instant::now())
        };
        due.into_iter().for_each(Waker::wake);
    }
}
