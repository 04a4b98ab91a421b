//! Thread-per-core: a pool of runtimes, one per thread, each with its own ring (or
//! epoll set), and a `Send` handle to start work on any of them from anywhere.
//!
//! Sockets never move between threads on their own (they belong to one runtime): work
//! is started on a thread by sending a closure that makes the future there, and sockets
//! cross threads detached (see [`crate::net::Detached`]).

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::oneshot;
use super::Builder;
use crate::driver::affinity;
use crate::{Error, Result};

/// A piece of work a pool thread runs inside its runtime.
type Job = Box<dyn FnOnce() + Send>;

/// Most threads a pool may have: far more than a program has cores to give them, and
/// few enough to refuse a count that could only exhaust memory or the thread limit.
pub const MAX_THREADS: usize = 4096;

/// Builds a [`Pool`].
#[derive(Debug, Clone, Default)]
pub struct PoolBuilder {
    threads: Option<usize>,
    runtime: Builder,
    pin: Option<bool>,
}

impl PoolBuilder {
    /// How many threads (each with its own runtime), 1 to [`MAX_THREADS`]; default: one
    /// per CPU this process may run on.
    pub fn threads(mut self, threads: usize) -> PoolBuilder {
        self.threads = Some(threads);
        self
    }

    /// The settings of every thread's runtime (backend, spin, ring size, ...).
    pub fn runtime(mut self, runtime: Builder) -> PoolBuilder {
        self.runtime = runtime;
        self
    }

    /// Pins thread `i` to the `i`-th CPU this process may run on, so the kernel's
    /// per-CPU routing of connections and datagrams reaches the thread of that CPU.
    /// Default: pinned when there are no more threads than CPUs.
    pub fn pin_threads(mut self, pin: bool) -> PoolBuilder {
        self.pin = Some(pin);
        self
    }

    /// Starts every thread and its runtime; fails (stopping the threads already
    /// started) when one runtime cannot start or a thread cannot be started, or when
    /// `threads` is 0 or over [`MAX_THREADS`].
    pub fn build(self) -> Result<Pool> {
        let cpus = affinity::allowed_cpus();
        let threads = match self.threads {
            Some(0) => return Err(Error::invalid_input("a pool needs at least one thread")),
            Some(threads) if threads > MAX_THREADS => {
                return Err(Error::invalid_input(format!(
                    "a pool of {threads} threads: at most {MAX_THREADS}"
                )))
            }
            Some(threads) => threads,
            None => cpus.len().max(1),
        };
        let pin = self.pin.unwrap_or(threads <= cpus.len());
        let workers = (0..threads)
            .map(|index| Worker {
                inbox: Mutex::new(Inbox::default()),
                cpu: if pin { cpus.get(index).copied() } else { None },
                runtime: std::sync::OnceLock::new(),
            })
            .collect();
        let shared = Arc::new(Shared {
            workers,
            next: AtomicUsize::new(0),
        });
        let mut pool = Pool {
            handle: PoolHandle {
                shared: shared.clone(),
            },
            threads: Vec::with_capacity(threads),
        };
        let (ready, started) = mpsc::channel();
        for index in 0..threads {
            let shared = shared.clone();
            let builder = self.runtime.clone();
            let ready = ready.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ringsock-{index}"))
                .spawn(move || run_worker(&shared, index, builder, ready))
                .map_err(|err| Error::io("start a pool thread", err))?;
            pool.threads.push(thread);
        }
        drop(ready);
        for _ in 0..threads {
            match started.recv() {
                Ok(Ok(())) => {}
                // Dropping the pool stops and joins the threads that did start.
                Ok(Err(err)) => return Err(err),
                Err(_) => {
                    return Err(Error::io(
                        "start a pool thread",
                        std::io::ErrorKind::Other.into(),
                    ))
                }
            }
        }
        Ok(pool)
    }
}

/// A pool of runtimes, one per thread. Dropping it stops every thread: their tasks are
/// dropped, their drivers cancel and reap what is in flight, and the threads are joined
/// (dropped by a task of its own, the pool joins the others; that task's thread stops
/// once the task returns).
///
/// A task whose future panics while it is dropped (in its `Drop`) aborts the process,
/// as async-task does for every executor built on it: a panic cannot cross the drop.
///
/// A task that panics ends alone, as a thread would: the panic is printed, its handle
/// says `OperationAborted`, and the other tasks and sockets of its thread go on.
///
/// # Examples
///
/// ```
/// use ringsock::runtime::Pool;
///
/// let pool = Pool::builder().threads(2).build()?;
/// let handle = pool.handle();
/// let answers: Vec<_> = (0..2)
///     .map(|thread| handle.spawn_on(thread, move || async move { thread * 10 }))
///     .collect::<Result<_, _>>()?;
/// let got: Vec<usize> = ringsock::block_on(async {
///     let mut got = Vec::new();
///     for answer in answers {
///         got.push(answer.await?);
///     }
///     Ok::<_, ringsock::Error>(got)
/// })?;
/// assert_eq!(got, [0, 10]);
/// # Ok::<_, ringsock::Error>(())
/// ```
pub struct Pool {
    handle: PoolHandle,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    /// A pool with one thread per CPU (see [`PoolBuilder`]).
    pub fn new() -> Result<Pool> {
        Pool::builder().build()
    }

    /// A builder with the defaults.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// A handle that starts work on the pool's threads, from any thread.
    pub fn handle(&self) -> PoolHandle {
        self.handle.clone()
    }

    /// How many threads the pool has.
    pub fn threads(&self) -> usize {
        self.handle.threads()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for worker in self.handle.shared.workers.iter() {
            let waker = {
                let mut inbox = worker.lock();
                inbox.stopping = true;
                inbox.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        let here = std::thread::current().id();
        for thread in self.threads.drain(..) {
            // Dropped by a task of its own, a thread cannot wait for itself: it ends
            // (stopping is set) once that task returns.
            if thread.thread().id() == here {
                continue;
            }
            // A thread that panicked has nothing left to stop.
            let _ = thread.join();
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads())
            .finish()
    }
}

/// Starts work on a [`Pool`]'s threads; `Send`, cheap to clone.
#[derive(Clone)]
pub struct PoolHandle {
    shared: Arc<Shared>,
}

struct Shared {
    workers: Box<[Worker]>,
    /// Round-robin position of [`PoolHandle::spawn`].
    next: AtomicUsize,
}

struct Worker {
    inbox: Mutex<Inbox>,
    /// The CPU the thread is pinned to, if it is.
    cpu: Option<usize>,
    /// Its runtime, once started: a handle awaited under a `block_on` nested on that
    /// thread can tell its task will never run.
    runtime: std::sync::OnceLock<super::RuntimeIdentity>,
}

#[derive(Default)]
struct Inbox {
    jobs: VecDeque<Job>,
    /// Wakes the thread's loop when a job arrives.
    waker: Option<Waker>,
    stopping: bool,
}

impl Worker {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        // Jobs run outside the lock: a poisoned lock still holds a consistent inbox.
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PoolHandle {
    /// How many threads the pool has.
    pub fn threads(&self) -> usize {
        self.shared.workers.len()
    }

    /// The CPU thread `thread` is pinned to, if it is.
    pub fn cpu_of(&self, thread: usize) -> Option<usize> {
        self.shared
            .workers
            .get(thread)
            .and_then(|worker| worker.cpu)
    }

    /// Runs the future `make` makes as a task on thread `thread` (0-based), inside its
    /// runtime: `make` runs there, so the future may hold sockets of that runtime (it
    /// need not be `Send`; only `make` and the output cross threads).
    ///
    /// Fails with `InvalidArgument` for a thread the pool does not have, and with
    /// `OperationAborted` when the pool is stopping.
    pub fn spawn_on<F, Fut>(&self, thread: usize, make: F) -> Result<RemoteJoinHandle<Fut::Output>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let threads = self.threads();
        let worker = self.shared.workers.get(thread).ok_or_else(|| {
            Error::invalid_input(format!("thread {thread} of a pool of {threads} threads"))
        })?;
        let (sender, output) = oneshot::channel();
        let job: Job = Box::new(move || {
            let future = make();
            drop(super::spawn(async move { sender.send(future.await) }));
        });
        let waker = {
            let mut inbox = worker.lock();
            if inbox.stopping {
                return Err(stopped());
            }
            inbox.jobs.push_back(job);
            inbox.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(RemoteJoinHandle {
            output,
            runs_on: worker.runtime.get().copied(),
        })
    }

    /// Like [`spawn_on`](Self::spawn_on), on the next thread in turn.
    pub fn spawn<F, Fut>(&self, make: F) -> Result<RemoteJoinHandle<Fut::Output>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let thread = self.shared.next.fetch_add(1, Ordering::Relaxed) % self.threads();
        self.spawn_on(thread, make)
    }

    /// Runs `make(thread)`'s future on every thread; the handles in thread order.
    pub fn spawn_on_each<F, Fut>(&self, make: F) -> Result<Vec<RemoteJoinHandle<Fut::Output>>>
    where
        F: Fn(usize) -> Fut + Send + Clone + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        (0..self.threads())
            .map(|thread| {
                let make = make.clone();
                self.spawn_on(thread, move || make(thread))
            })
            .collect()
    }
}

impl fmt::Debug for PoolHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolHandle")
            .field("threads", &self.threads())
            .finish()
    }
}

fn stopped() -> Error {
    Error::io(
        "start a task on a pool thread",
        std::io::Error::from_raw_os_error(libc::ECANCELED),
    )
}

/// The output of a task started on a pool thread; awaitable from any runtime (or any
/// executor). Dropping it leaves the task running.
#[must_use = "the task runs anyway; await this to get its output"]
pub struct RemoteJoinHandle<T> {
    output: oneshot::Receiver<T>,
    /// The runtime of the pool thread the task runs on.
    runs_on: Option<super::RuntimeIdentity>,
}

impl<T> Future for RemoteJoinHandle<T> {
    /// The task's output, or `OperationAborted` when the task was dropped before it
    /// finished (the pool stopped, or it panicked). Awaited inside a `block_on` nested
    /// on the task's own pool thread, where that thread's runtime (and so the task)
    /// cannot run, it is a `WrongRuntime` error instead of a wait for ever.
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let polled = Pin::new(&mut self.output)
            .poll(cx)
            .map(|output| output.ok_or_else(stopped));
        if polled.is_pending()
            && self
                .runs_on
                .is_some_and(|runtime| runtime.is_blocked_here())
        {
            return Poll::Ready(Err(Error::wrong_runtime(
                "a pool task's handle was awaited inside a block_on nested on that task's own \
                 pool thread: the thread's runtime, and so the task, cannot run meanwhile \
                 (await it in the pool thread's runtime, or from another thread)",
            )));
        }
        polled
    }
}

impl<T> fmt::Debug for RemoteJoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RemoteJoinHandle")
    }
}

/// A pool thread: pins itself, starts its runtime, then runs the jobs sent to it until
/// the pool stops.
fn run_worker(shared: &Shared, index: usize, builder: Builder, ready: mpsc::Sender<Result<()>>) {
    let worker = &shared.workers[index];
    if let Some(cpu) = worker.cpu {
        // Unpinned is slower, not wrong: go on if the kernel refuses.
        let _ = affinity::pin_current_thread(cpu);
    }
    let runtime = match builder.build() {
        Ok(runtime) => {
            let _ = worker.runtime.set(runtime.identity());
            let _ = ready.send(Ok(()));
            runtime
        }
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    drop(ready);
    // However the loop ends (the pool stops, or the driver breaks), the thread takes no
    // more work: later `spawn_on`s fail and jobs still queued are dropped, ending their
    // handles' wait, instead of waiting for a thread that is gone. Declared after
    // `runtime`, so it runs first, before its tasks drop.
    let _stop = StopOnExit(worker);
    // A task that panics unwinds through `block_on`, as on a runtime of one's own: the
    // panic hook has said so, its handle's wait ends with OperationAborted (its future
    // was dropped), and the thread's other tasks and sockets are served on by entering
    // the runtime again. Only a broken driver ends the thread.
    while catch_unwind(AssertUnwindSafe(|| runtime.block_on(serve_jobs(worker)))).is_err() {
        if runtime.is_broken() {
            break;
        }
    }
}

/// Starts the jobs sent to `worker` as they come, until the pool stops.
fn serve_jobs(worker: &Worker) -> impl Future<Output = ()> + '_ {
    poll_fn(move |cx| {
        let jobs = {
            let mut inbox = worker.lock();
            if inbox.stopping {
                // Jobs never started end their handles' wait (their senders drop).
                let unstarted = std::mem::take(&mut inbox.jobs);
                drop(inbox);
                drop(unstarted);
                return Poll::Ready(());
            }
            // Registered before the lock goes: a job pushed after it wakes this loop.
            inbox.waker = Some(cx.waker().clone());
            std::mem::take(&mut inbox.jobs)
        };
        for job in jobs {
            // A `make` that panics ends its own job only (its handle says
            // OperationAborted); the jobs after it still start.
            let _ = catch_unwind(AssertUnwindSafe(job));
        }
        Poll::Pending
    })
}

/// Marks a worker stopping when its thread's loop ends, normally or by a panic.
struct StopOnExit<'a>(&'a Worker);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        let unstarted = {
            let mut inbox = self.0.lock();
            inbox.stopping = true;
            inbox.waker = None;
            std::mem::take(&mut inbox.jobs)
        };
        // Outside the lock: dropping a job drops its sender, which may wake a waiter.
        drop(unstarted);
    }
}
