//! Work that must block (name resolution) runs on a small pool of threads and wakes the
//! loop when done, so the single-threaded loop never stalls on it.
//!
//! The pool is bounded twice: at most `threads` threads, started when work arrives and
//! ending after `idle` without any, and at most `queue` jobs waiting for one. A job that
//! does not fit is refused at once ([`Refused::QueueFull`]) rather than queued without
//! limit. A [`Task`] dropped before its job starts takes the job out of the queue; one
//! dropped while its job runs leaves the thread to finish it, and the output is dropped
//! there: a blocking call cannot be interrupted, only ignored.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};

use super::oneshot;
use std::time::{Duration, Instant};

/// How big a [`Pool`] may grow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Threads running at once, at most; at least one is used.
    pub(crate) threads: usize,
    /// Jobs waiting for a thread, at most.
    pub(crate) queue: usize,
    /// How long a thread waits for a job before it ends.
    pub(crate) idle: Duration,
}

/// A bounded pool of threads for blocking calls.
pub(crate) struct Pool {
    /// Names the threads, e.g. in `/proc/self/task/*/comm` and in debuggers.
    name: &'static str,
    limits: Limits,
    state: Mutex<State>,
    /// Signalled when a job is queued for an idle thread.
    work: Condvar,
    /// Signalled whenever the counters change, so tests can wait for a state.
    #[cfg(test)]
    changed: Condvar,
}

/// What the pool's threads and callers share, under the pool's lock.
#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    next_id: u64,
    /// Threads started and not yet ended.
    threads: usize,
    /// Threads waiting for a job.
    idle: usize,
    /// Jobs a thread is running.
    running: usize,
    /// The most threads alive at once so far.
    peak_threads: usize,
}

/// A queued job: its closure runs the caller's work and stores the output.
struct Job {
    id: u64,
    run: Box<dyn FnOnce() + Send>,
}

/// Counters of a [`Pool`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolStats {
    pub(crate) threads: usize,
    pub(crate) peak_threads: usize,
    pub(crate) queued: usize,
    pub(crate) running: usize,
}

/// Why [`Pool::submit`] did not take a job.
#[derive(Debug)]
pub(crate) enum Refused {
    /// `capacity` jobs are already waiting.
    QueueFull { capacity: usize },
    /// No thread runs and none could be started.
    Spawn(io::Error),
}

/// The pending output of a job submitted to a [`Pool`]. Dropping it abandons the job.
#[must_use = "a task does nothing unless awaited; dropping it abandons the job"]
pub(crate) struct Task<T> {
    pool: Arc<Pool>,
    id: u64,
    output: oneshot::Receiver<T>,
}

/// The work of a [`Task`] panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Panicked;

impl Pool {
    /// An empty pool; threads start as jobs arrive.
    pub(crate) fn new(name: &'static str, limits: Limits) -> Pool {
        Pool {
            name,
            limits: Limits {
                threads: limits.threads.max(1),
                ..limits
            },
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            #[cfg(test)]
            changed: Condvar::new(),
        }
    }

    /// Queues `work` for a pool thread; its output comes back through the [`Task`].
    ///
    /// Starts a thread when every running one is busy and the limit allows. Fails at
    /// once when the queue is full, or when no thread runs and none can be started.
    pub(crate) fn submit<T, W>(self: &Arc<Self>, work: W) -> Result<Task<T>, Refused>
    where
        T: Send + 'static,
        W: FnOnce() -> T + Send + 'static,
    {
        let (sender, output) = oneshot::channel();
        let run = Box::new(move || {
            // A panic must still end the wait (the sender is dropped without a value), or
            // the awaiting task would hang.
            if let Ok(value) = catch_unwind(AssertUnwindSafe(work)) {
                sender.send(value);
            }
        });
        let mut state = self.lock();
        if state.queue.len() >= self.limits.queue {
            return Err(Refused::QueueFull {
                capacity: self.limits.queue,
            });
        }
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back(Job { id, run });
        if state.idle > 0 {
            self.work.notify_one();
        }
        // Idle threads that have not woken yet still count as idle: more jobs than that
        // need a new thread, if the limit allows.
        if state.queue.len() > state.idle && state.threads < self.limits.threads {
            if let Err(err) = self.spawn(&mut state) {
                if state.threads == 0 {
                    state.queue.retain(|job| job.id != id);
                    return Err(Refused::Spawn(err));
                }
                // The threads that run will get to the job.
            }
        }
        self.changed();
        Ok(Task {
            pool: self.clone(),
            id,
            output,
        })
    }

    /// The counters now.
    pub(crate) fn stats(&self) -> PoolStats {
        self.lock().stats()
    }

    /// The limits the pool was made with (at least one thread).
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Starts one thread; the caller holds the lock, so the counters stay exact.
    fn spawn(self: &Arc<Self>, state: &mut State) -> io::Result<()> {
        let pool = self.clone();
        std::thread::Builder::new()
            .name(self.name.to_owned())
            .spawn(move || pool.serve())?;
        state.threads += 1;
        state.peak_threads = state.peak_threads.max(state.threads);
        Ok(())
    }

    /// A pool thread: runs queued jobs until none has come for `idle`.
    fn serve(&self) {
        let mut state = self.lock();
        let mut idle_since = None;
        loop {
            if let Some(job) = state.queue.pop_front() {
                idle_since = None;
                state.running += 1;
                drop(state);
                (job.run)();
                state = self.lock();
                state.running -= 1;
                self.changed();
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            let Some(left) = self.limits.idle.checked_sub(since.elapsed()) else {
                break;
            };
            state.idle += 1;
            // The deadline is kept across wake-ups, so a spurious one does not extend it.
            state = match self.work.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
            state.idle -= 1;
        }
        state.threads -= 1;
        self.changed();
    }

    /// Takes job `id` out of the queue if it is still there (else it runs or ran).
    fn cancel(&self, id: u64) {
        let mut state = self.lock();
        let Some(index) = state.queue.iter().position(|job| job.id == id) else {
            return;
        };
        let job = state.queue.remove(index);
        self.changed();
        drop(state);
        // The closure owns the caller's work: drop it outside the lock.
        drop(job);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock and panics in them are caught, so a poisoned lock
        // only means a panic between two counter updates; the counters are still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells tests waiting in [`Pool::wait_until`] that the counters changed. Called
    /// with the lock held, so a waiter cannot miss the change.
    #[cfg(test)]
    fn changed(&self) {
        self.changed.notify_all();
    }

    #[cfg(not(test))]
    fn changed(&self) {}

    /// Waits until `done` holds for the counters, or `limit` has passed; true if it holds.
    #[cfg(test)]
    pub(crate) fn wait_until(&self, limit: Duration, done: impl Fn(PoolStats) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        loop {
            if done(state.stats()) {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = match self.changed.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl State {
    fn stats(&self) -> PoolStats {
        PoolStats {
            threads: self.threads,
            peak_threads: self.peak_threads,
            queued: self.queue.len(),
            running: self.running,
        }
    }
}

impl<T> Future for Task<T> {
    type Output = Result<T, Panicked>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.output)
            .poll(cx)
            .map(|output| output.ok_or(Panicked))
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        // Closed first: a job already running then drops its output instead of waking
        // a task that is gone.
        if self.output.close() {
            self.pool.cancel(self.id);
        }
    }
}

impl<T> fmt::Debug for Task<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task").field("id", &self.id).finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::task::Waker;

    /// How long a wait for something that must happen may take before the test fails;
    /// never used to make anything happen.
    pub(crate) const MUST_HAPPEN: Duration = Duration::from_secs(20);

    /// The far end of work made by [`gated`]: hears when it starts, lets it finish.
    pub(crate) struct Gate {
        started: mpsc::Receiver<()>,
        release: mpsc::Sender<()>,
    }

    impl Gate {
        /// Blocks until the work runs on a pool thread.
        pub(crate) fn wait_started(&self) {
            self.started
                .recv_timeout(MUST_HAPPEN)
                .expect("the work did not start");
        }

        /// Lets the work return.
        pub(crate) fn open(&self) {
            let _ = self.release.send(());
        }

        /// True once the work was dropped without ever running.
        pub(crate) fn dropped_unrun(&self) -> bool {
            self.started.recv_timeout(MUST_HAPPEN) == Err(mpsc::RecvTimeoutError::Disconnected)
        }
    }

    /// Work that says when it starts, then blocks until its gate opens and returns what
    /// `output` makes: a stand-in for a blocking call that takes as long as a test needs.
    pub(crate) fn gated<T, M>(output: M) -> (Gate, impl FnOnce() -> T + Send + 'static)
    where
        M: FnOnce() -> T + Send + 'static,
    {
        let (started_tx, started) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let work = move || {
            let _ = started_tx.send(());
            let _ = release_rx.recv();
            output()
        };
        (Gate { started, release }, work)
    }

    fn pool(threads: usize, queue: usize, idle: Duration) -> Arc<Pool> {
        Arc::new(Pool::new(
            "ringsock-test",
            Limits {
                threads,
                queue,
                idle,
            },
        ))
    }

    /// Gives `pool` a job that runs until its gate opens, once it has started.
    fn busy(pool: &Arc<Pool>) -> (Gate, Task<u32>) {
        let (gate, work) = gated(|| 0);
        let task = pool.submit(work).unwrap();
        gate.wait_started();
        (gate, task)
    }

    /// An output that says when it is dropped.
    struct DropSignal(mpsc::Sender<()>);

    impl Drop for DropSignal {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    /// Blocks this thread until `task` is done (the pool wakes it from its thread).
    fn wait<T>(mut task: Task<T>) -> Result<T, Panicked> {
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let deadline = Instant::now() + MUST_HAPPEN;
        loop {
            if let Poll::Ready(output) = Pin::new(&mut task).poll(&mut Context::from_waker(&waker))
            {
                return output;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("the task did not finish within MUST_HAPPEN");
            std::thread::park_timeout(left);
        }
    }

    #[test]
    fn outputs_come_back_and_panics_end_the_wait() {
        let pool = pool(2, 8, Duration::from_secs(10));
        let tasks: Vec<_> = (0..6)
            .map(|i| pool.submit(move || i * 10).unwrap())
            .collect();
        let outputs: Vec<_> = tasks.into_iter().map(|t| wait(t).unwrap()).collect();
        assert_eq!(outputs, [0, 10, 20, 30, 40, 50]);
        let task = pool.submit(|| -> u32 { panic!("work panics") }).unwrap();
        assert_eq!(wait(task), Err(Panicked));
        // The thread that caught the panic serves on.
        assert_eq!(wait(pool.submit(|| 7).unwrap()), Ok(7));
        let stats = pool.stats();
        assert!((1..=2).contains(&stats.peak_threads), "{stats:?}");
    }

    #[test]
    fn never_more_threads_than_the_limit() {
        let pool = pool(3, 64, Duration::from_secs(10));
        let mut tasks = Vec::new();
        let mut gates = Vec::new();
        for i in 0..8 {
            let (gate, work) = gated(move || i);
            tasks.push(pool.submit(work).unwrap());
            gates.push(gate);
        }
        // Three run, five wait: the limit is reached and held.
        for gate in &gates[..3] {
            gate.wait_started();
        }
        assert!(pool.wait_until(MUST_HAPPEN, |s| s.running == 3 && s.queued == 5));
        assert_eq!(pool.stats().threads, 3);
        gates.iter().for_each(Gate::open);
        let outputs: Vec<_> = tasks.into_iter().map(|t| wait(t).unwrap()).collect();
        assert_eq!(outputs, (0..8).collect::<Vec<_>>());
        assert_eq!(pool.stats().peak_threads, 3);
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        let pool = pool(1, 2, Duration::from_secs(10));
        let (running, first) = busy(&pool);
        let queued: Vec<_> = (0..2).map(|_| pool.submit(|| 1).unwrap()).collect();
        match pool.submit(|| 1) {
            Err(Refused::QueueFull { capacity: 2 }) => {}
            other => panic!("expected a full queue, got {other:?}"),
        }
        // Room again once the thread takes the next job.
        running.open();
        assert_eq!(wait(first), Ok(0));
        for task in queued {
            assert_eq!(wait(task), Ok(1));
        }
        assert_eq!(wait(pool.submit(|| 2).unwrap()), Ok(2));
    }

    #[test]
    fn a_task_dropped_before_its_job_starts_leaves_the_queue() {
        let pool = pool(1, 4, Duration::from_secs(10));
        let (running, first) = busy(&pool);
        let (never, never_work) = gated(|| 1);
        let second = pool.submit(never_work).unwrap();
        assert_eq!(pool.stats().queued, 1);
        drop(second);
        assert_eq!(pool.stats().queued, 0);
        assert!(never.dropped_unrun());
        running.open();
        assert_eq!(wait(first), Ok(0));
    }

    #[test]
    fn a_task_dropped_while_its_job_runs_discards_the_output() {
        let pool = pool(1, 4, Duration::from_secs(10));
        let (dropped_tx, dropped) = mpsc::channel();
        let (gate, work) = gated(move || DropSignal(dropped_tx));
        let mut task = pool.submit(work).unwrap();
        gate.wait_started();
        let poll = Pin::new(&mut task).poll(&mut Context::from_waker(Waker::noop()));
        assert!(poll.is_pending());
        drop(task);
        gate.open();
        // The output is dropped on the pool thread, which then serves the next job.
        dropped.recv_timeout(MUST_HAPPEN).unwrap();
        assert_eq!(wait(pool.submit(|| 3).unwrap()), Ok(3));
        assert!(pool.wait_until(MUST_HAPPEN, |s| s.running == 0 && s.queued == 0));
    }

    #[test]
    fn idle_threads_end_and_new_work_starts_one_again() {
        let pool = pool(2, 4, Duration::from_millis(1));
        assert_eq!(wait(pool.submit(|| 1).unwrap()), Ok(1));
        assert!(pool.wait_until(MUST_HAPPEN, |s| s.threads == 0));
        assert_eq!(wait(pool.submit(|| 2).unwrap()), Ok(2));
        assert_eq!(pool.stats().peak_threads, 1);
    }
}
