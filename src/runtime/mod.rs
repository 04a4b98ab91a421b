//! A single-threaded executor per thread, parked in one call into its driver.
//!
//! Tasks are [`async_task`] tasks on a local run queue. The loop runs every ready task,
//! then parks in ONE system call (an `io_uring_enter` that submits and waits, or an
//! `epoll_wait`) with the next timer as its timeout, then fires due timers.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_task::Runnable;

use crate::driver::{
    Backend, Capabilities, Capability, Driver, DriverConfig, DriverKind, DriverStats, Unparker,
};

/// The most submission queue entries an io_uring may have (IORING_MAX_ENTRIES).
const MAX_RING_ENTRIES: u32 = 32768;

pub(crate) mod blocking;
pub(crate) mod coop;
#[cfg(feature = "tokio")]
pub(crate) mod external;
mod oneshot;
mod pool;
mod spin;
mod tasks;
mod time;

pub use pool::{Pool, PoolBuilder, PoolHandle, RemoteJoinHandle, MAX_THREADS};
pub use spin::Spin;
pub use time::{sleep, sleep_until, timeout, Elapsed, Sleep};
pub(crate) use time::{sleep_lenient, sleep_until_lenient, timeout_lenient};

/// Builds a [`Runtime`] with chosen options.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    backend: Option<Backend>,
    ring_entries: Option<u32>,
    spin: Option<Spin>,
    disabled: Capabilities,
    resolve_timeout: Option<Duration>,
}

impl Builder {
    /// A builder with the defaults: backend from `RINGSOCK_BACKEND`, else `auto`; spin
    /// from `RINGSOCK_SPIN`, else [`Spin::Adaptive`] (30 µs).
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Forces the engine, overriding `RINGSOCK_BACKEND`.
    pub fn backend(mut self, backend: Backend) -> Builder {
        self.backend = Some(backend);
        self
    }

    /// How the loop spins before it sleeps, overriding `RINGSOCK_SPIN` (default
    /// [`Spin::Adaptive`], 30 µs; times above one second count as one second). On io_uring a spin costs no system call while nothing
    /// is ready (the kernel flags pending work in shared memory); on epoll each check is
    /// an `epoll_wait`.
    pub fn spin(mut self, spin: Spin) -> Builder {
        self.spin = Some(spin.capped());
        self
    }

    /// Before every sleep in the kernel, checks for completions for up to `spin` first
    /// ([`Spin::Fixed`]; zero is [`Spin::Off`]): for latency-critical paths (a VoIP
    /// relay, a request/response hop) on a core of their own.
    pub fn spin_before_park(self, spin: Duration) -> Builder {
        self.spin(if spin.is_zero() {
            Spin::Off
        } else {
            Spin::Fixed(spin)
        })
    }

    /// Submission queue size of the io_uring: 1 to 32768 (default 1024; the kernel
    /// rounds it up to a power of two). A value out of range fails [`build`](Self::build)
    /// with `InvalidArgument`, whichever backend is chosen.
    pub fn ring_entries(mut self, entries: u32) -> Builder {
        self.ring_entries = Some(entries);
        self
    }

    /// Keeps the io_uring engine from using `cap` even where the kernel has it, so that
    /// part runs its fallback (as on an older kernel). Adds to the capabilities named in
    /// `RINGSOCK_DISABLE` (comma-separated, e.g. `multishot-accept,buffer-ring`). No
    /// effect on epoll.
    pub fn disable(mut self, cap: Capability) -> Builder {
        self.disabled = self.disabled.with(cap);
        self
    }

    /// How long a name lookup ([`host::resolve`](crate::host::resolve), and the
    /// connects and sends given a [`HostName`](crate::HostName)) may take before it fails
    /// with `ConnectionTimedOut`; default
    /// [`DEFAULT_RESOLVE_TIMEOUT`](crate::host::DEFAULT_RESOLVE_TIMEOUT), 5 s. Zero is
    /// refused by [`build`](Self::build).
    pub fn resolve_timeout(mut self, timeout: Duration) -> Builder {
        self.resolve_timeout = Some(timeout);
        self
    }

    /// Starts the runtime on this thread.
    ///
    /// Fails when the backend named here or in `RINGSOCK_BACKEND` cannot start (for
    /// example `uring` where seccomp forbids io_uring), when a setting is out of range
    /// (ring entries, a zero resolve timeout), or when `RINGSOCK_BACKEND`,
    /// `RINGSOCK_SPIN` or `RINGSOCK_DISABLE` is invalid.
    pub fn build(self) -> crate::Result<Runtime> {
        self.build_for(false)
    }

    /// Starts a runtime another event loop turns (see `external`): its driver can be
    /// waited on through a descriptor.
    #[cfg(feature = "tokio")]
    pub(crate) fn build_turned_from_outside(self) -> crate::Result<Runtime> {
        self.build_for(true)
    }

    fn build_for(self, outside: bool) -> crate::Result<Runtime> {
        let resolve_timeout = self
            .resolve_timeout
            .unwrap_or(crate::host::DEFAULT_RESOLVE_TIMEOUT);
        if resolve_timeout.is_zero() {
            return Err(crate::Error::invalid_input(
                "the resolve timeout must be longer than zero",
            ));
        }
        let backend = match self.backend {
            Some(backend) => backend,
            None => Backend::from_env()?.unwrap_or_default(),
        };
        let spin = match self.spin {
            Some(spin) => spin,
            None => Spin::from_env()?.unwrap_or_default(),
        };
        let mut config = DriverConfig::default();
        if let Some(entries) = self.ring_entries {
            if !(1..=MAX_RING_ENTRIES).contains(&entries) {
                return Err(crate::Error::invalid_input(format!(
                    "ring_entries must be 1 to {MAX_RING_ENTRIES}, not {entries}"
                )));
            }
            config.ring_entries = entries;
        }
        let disabled = Capabilities::disabled_by_env()?;
        config.disabled = self.disabled.iter().fold(disabled, Capabilities::with);
        config.notify = outside;
        let (driver, fallback) = Driver::new(backend, config)?;
        let kind = driver.kind();
        let unparker = driver
            .unparker()
            .map_err(|err| crate::Error::io("start the driver", err))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            owner: thread_token(),
            unparker,
            #[cfg(feature = "tokio")]
            outer: outside.then(Default::default),
        });
        Ok(Runtime {
            inner: Rc::new(Inner {
                driver,
                kind,
                fallback,
                shared,
                timers: RefCell::new(time::Timers::default()),
                running: Cell::new(false),
                spin,
                waits: Cell::new(spin::Waits::default()),
                delivered_at_wait: Cell::new(0),
                slept: Cell::new(false),
                resolve_timeout,
                tasks: Rc::default(),
                broken: Cell::new(false),
                dropping: Cell::new(false),
            }),
        })
    }
}

/// One thread's executor and driver. Not `Send`: it lives and runs on the thread that
/// built it.
pub struct Runtime {
    inner: Rc<Inner>,
}

struct Inner {
    driver: Driver,
    kind: DriverKind,
    fallback: Option<String>,
    shared: Arc<Shared>,
    timers: RefCell<time::Timers>,
    running: Cell<bool>,
    /// How long to look for completions before sleeping in the kernel.
    spin: Spin,
    /// How long the loop waited for something to happen lately (kept for
    /// [`Spin::Adaptive`]).
    waits: Cell<spin::Waits>,
    /// Datagrams this thread had taken in when the loop last began to wait.
    delivered_at_wait: Cell<u64>,
    /// The loop's last wait was a sleep in the kernel (not a spin's catch).
    slept: Cell<bool>,
    /// How long a name lookup may take.
    resolve_timeout: Duration,
    /// Every task not yet finished, so dropping the runtime drops them all.
    tasks: Rc<tasks::Tasks>,
    /// The driver failed for good (the panic `block_on` raised then is not a task's).
    broken: Cell<bool>,
    /// The runtime is being dropped: its tasks' futures are dropped unfinished.
    dropping: Cell<bool>,
}

/// The part other threads may touch: the run queue and the way to wake the loop.
struct Shared {
    queue: Mutex<VecDeque<Runnable>>,
    owner: usize,
    unparker: Unparker,
    /// The outer loop's task, for a runtime turned from outside: woken at every
    /// schedule, since a task may be woken on this thread while no step runs.
    #[cfg(feature = "tokio")]
    outer: Option<Arc<external::OuterWaker>>,
}

impl Shared {
    /// Whether the runtime is turned from outside (a tokio `Driver`), not by `block_on`.
    fn turned_from_outside(&self) -> bool {
        #[cfg(feature = "tokio")]
        let outside = self.outer.is_some();
        #[cfg(not(feature = "tokio"))]
        let outside = false;
        outside
    }

    fn schedule(&self, runnable: Runnable) {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push_back(runnable);
        #[cfg(feature = "tokio")]
        if let Some(outer) = &self.outer {
            outer.wake();
            return;
        }
        if thread_token() != self.owner {
            self.unparker.unpark();
        }
    }

    fn pop(&self) -> Option<Runnable> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop_front()
    }

    fn queued(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }
}

thread_local! {
    static CONTEXT: RefCell<Option<Rc<Inner>>> = const { RefCell::new(None) };
    static THREAD_MARK: u8 = const { 0 };
}

/// A number unique to the calling thread while it lives, cheap to read.
fn thread_token() -> usize {
    THREAD_MARK.with(|mark| mark as *const u8 as usize)
}

/// Which runtime, on which thread: what a task's handle needs to tell that it is
/// awaited where its task can never run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RuntimeIdentity {
    runtime: usize,
    thread: usize,
}

impl RuntimeIdentity {
    /// Whether this poll runs on that runtime's thread under another runtime (a
    /// `block_on` nested in one of its tasks): that runtime cannot run meanwhile, so
    /// neither can a task of it that this poll waits for.
    pub(crate) fn is_blocked_here(self) -> bool {
        thread_token() == self.thread
            && CONTEXT.with(|context| {
                context
                    .borrow()
                    .as_ref()
                    .is_some_and(|current| Rc::as_ptr(current) as usize != self.runtime)
            })
    }
}

impl Runtime {
    /// This runtime and the thread it runs on (see [`RuntimeIdentity`]).
    pub(crate) fn identity(&self) -> RuntimeIdentity {
        RuntimeIdentity {
            runtime: Rc::as_ptr(&self.inner) as usize,
            thread: thread_token(),
        }
    }

    /// A runtime with the default options (see [`Builder::new`]).
    pub fn new() -> crate::Result<Runtime> {
        Builder::new().build()
    }

    /// The engine this runtime runs on.
    pub fn driver_kind(&self) -> DriverKind {
        self.inner.kind
    }

    /// Why `auto` fell back to epoll, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.inner.fallback.as_deref()
    }

    /// System calls the driver has made so far.
    pub fn driver_stats(&self) -> DriverStats {
        self.inner.driver.stats().unwrap_or_default()
    }

    /// The kernel features this runtime's io_uring engine found and uses (none on
    /// epoll); what is missing runs its fallback.
    pub fn capabilities(&self) -> Capabilities {
        self.inner.driver.capabilities()
    }

    /// The io_uring setup flags in use, e.g. `single-issuer+defer-taskrun+taskrun-flag`;
    /// `None` on epoll.
    pub fn ring_setup(&self) -> Option<&'static str> {
        self.inner.driver.setup_flags()
    }

    /// Runs `future` to completion on this thread, along with the tasks it spawns.
    ///
    /// # Panics
    ///
    /// When called from inside this runtime's own `block_on` (from one of its tasks), or
    /// when the driver fails in a way that leaves it unusable (the ring or epoll
    /// descriptor broke).
    ///
    /// Another runtime's `block_on` may run inside one of this runtime's tasks, but this
    /// runtime's tasks and sockets stand still until it returns: a future there that
    /// waits on one of them never ends. Give a second runtime a thread of its own.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let _enter = self.enter();
        let main = Arc::new(MainWaker {
            woken: AtomicBool::new(true),
            shared: self.inner.shared.clone(),
        });
        let waker = Waker::from(main.clone());
        let mut cx = Context::from_waker(&waker);
        let mut future = pin!(future);
        // Datagrams another runtime took in on this thread meanwhile are not this one's.
        self.inner
            .delivered_at_wait
            .set(crate::driver::recv::delivered_here());
        self.inner.slept.set(false);
        loop {
            if main.woken.swap(false, Ordering::AcqRel) {
                if let Poll::Ready(output) = coop::with_budget(|| future.as_mut().poll(&mut cx)) {
                    return output;
                }
            }
            self.run_ready_tasks();
            let mut busy = main.woken.load(Ordering::Acquire) || self.inner.shared.queued() > 0;
            // The clock is read only when a timer or the spin needs it: a busy sender goes
            // round this loop a few times per batch.
            let timers_armed = !self.inner.timers.borrow().is_empty();
            let waiting = !busy;
            let policy = self.inner.spin;
            let (spin, measure) = if waiting {
                let mut waits = self.inner.waits.get();
                if policy.measures_waits() {
                    let delivered = crate::driver::recv::delivered_here();
                    let since =
                        delivered.wrapping_sub(self.inner.delivered_at_wait.replace(delivered));
                    policy.record_wake(&mut waits, since, self.inner.slept.get());
                }
                let spin = policy.budget(&mut waits);
                self.inner.waits.set(waits);
                (spin, policy.measures_wait(&waits))
            } else {
                (None, false)
            };
            let now = (timers_armed || spin.is_some() || measure).then(Instant::now);
            let mut missed = false;
            if let (Some(spin), Some(now)) = (spin, now) {
                let end = self.spin(now, spin, &main);
                busy = end == SpinEnd::Caught;
                missed = end == SpinEnd::Missed;
            }
            let timeout = match now {
                _ if busy => Some(Duration::ZERO),
                // After a spin the clock has moved on: the timer is nearer by that much.
                Some(_) if timers_armed && spin.is_some() => {
                    self.inner.timers.borrow().next_timeout(Instant::now())
                }
                Some(now) if timers_armed => self.inner.timers.borrow().next_timeout(now),
                _ => None,
            };
            if waiting {
                self.inner.slept.set(timeout != Some(Duration::ZERO));
            }
            if let Err(err) = self.inner.driver.park(timeout) {
                self.driver_failed(err);
            }
            if let (true, Some(now)) = (measure, now) {
                let mut waits = self.inner.waits.get();
                policy.record(&mut waits, now.elapsed(), missed);
                self.inner.waits.set(waits);
            }
            if timers_armed {
                let due = self.inner.timers.borrow_mut().take_due(Instant::now());
                due.into_iter().for_each(Waker::wake);
            }
        }
    }

    /// Ends `block_on` for a driver that broke (its ring or epoll descriptor): nothing
    /// can run on it any more.
    fn driver_failed(&self, err: std::io::Error) -> ! {
        self.inner.broken.set(true);
        panic!("ringsock: the {} driver failed: {err}", self.inner.kind);
    }

    /// Whether the driver failed for good: a `block_on` that panicked then cannot be
    /// entered again usefully, where one a task's panic unwound through can.
    pub(crate) fn is_broken(&self) -> bool {
        self.inner.broken.get()
    }

    /// Looks for completions until something is ready, the spin time is over or a timer
    /// is due, and says which came first.
    fn spin(&self, now: Instant, spin: Duration, main: &MainWaker) -> SpinEnd {
        let mut deadline = now + spin;
        let mut at_deadline = SpinEnd::Missed;
        if let Some(timer) = self.inner.timers.borrow().next_timeout(now) {
            if timer < spin {
                deadline = now + timer;
                at_deadline = SpinEnd::TimerDue;
            }
        }
        loop {
            match self.inner.driver.poll_completions() {
                Ok(true) => return SpinEnd::Caught,
                Ok(false) => {}
                Err(err) => self.driver_failed(err),
            }
            if main.woken.load(Ordering::Acquire) || self.inner.shared.queued() > 0 {
                return SpinEnd::Caught;
            }
            if Instant::now() >= deadline {
                return at_deadline;
            }
            std::hint::spin_loop();
        }
    }

    /// Runs the tasks that are ready now; tasks they wake run in the next round, after the
    /// driver has submitted what this round queued.
    fn run_ready_tasks(&self) {
        let ready = self.inner.shared.queued();
        for _ in 0..ready {
            match self.inner.shared.pop() {
                Some(runnable) => {
                    coop::with_budget(|| runnable.run());
                }
                None => break,
            }
        }
    }

    /// Spawns a task on this runtime; it runs while some `block_on` of this runtime runs.
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        spawn_on(&self.inner, future)
    }

    fn enter(&self) -> EnterGuard {
        assert!(
            !self.inner.running.replace(true),
            "ringsock: block_on called inside block_on on the same thread"
        );
        let previous = CONTEXT.with(|context| context.replace(Some(self.inner.clone())));
        EnterGuard {
            _driver: self.inner.driver.enter(),
            inner: self.inner.clone(),
            previous,
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Tasks' futures may cancel operations when dropped: they hold their driver's
        // handle; the context is set so a task's drop code sees its own runtime.
        self.inner.dropping.set(true);
        let previous = CONTEXT.with(|context| context.replace(Some(self.inner.clone())));
        let driver_guard = self.inner.driver.enter();
        // Drop every task, not only those queued to run: a task waiting on a waker held
        // by the driver, a timer, or nothing at all would otherwise live on, its sockets
        // open, after the runtime is gone. Waking a task schedules it one last time, and
        // dropping that runnable drops its future (async-task), whose drop may wake or
        // even spawn others: repeat until nothing is left. Each round drops at least one
        // runnable or waker, so it ends, unless each dropped task spawns another without
        // end (a program's endless chain: it runs on here as it would have run on).
        loop {
            let woken = self.inner.tasks.wake_all();
            while let Some(runnable) = self.inner.shared.pop() {
                drop(runnable);
            }
            let mut wakers = self.inner.timers.borrow_mut().take_all();
            wakers.extend(self.inner.driver.take_wakers());
            if wakers.is_empty() && !woken {
                break;
            }
            // Outside the borrows: a dropped waker may schedule its task.
            drop(wakers);
        }
        // Every task is gone: cancel and reap what is still in flight (operations of
        // futures kept outside the runtime), so nothing of this runtime's stays with the
        // kernel; those futures then report that their runtime was dropped.
        self.inner.driver.shutdown();
        drop(driver_guard);
        CONTEXT.with(|context| context.replace(previous));
    }
}

pub(crate) struct EnterGuard {
    /// Declared first so the driver stops being current before the context goes.
    _driver: crate::driver::handle::EnterGuard,
    inner: Rc<Inner>,
    previous: Option<Rc<Inner>>,
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        self.inner.running.set(false);
        let previous = self.previous.take();
        CONTEXT.with(|context| context.replace(previous));
    }
}

/// How a spin before a sleep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpinEnd {
    /// Work came: a completion, a woken task.
    Caught,
    /// The spin time passed with nothing: the look was CPU for nothing.
    Missed,
    /// A timer fell due first.
    TimerDue,
}

/// Wakes `block_on`'s own future: a flag the loop checks, plus an unpark when the wake
/// comes from another thread.
struct MainWaker {
    woken: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for MainWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if thread_token() != self.shared.owner {
            self.shared.unparker.unpark();
        }
    }
}

/// A spawned task. Awaiting it gives the task's output; dropping it lets the task run on
/// (detached), unlike `async_task::Task`.
///
/// # Panics
///
/// Awaiting it panics when the task was dropped unfinished with its runtime (the
/// runtime was dropped while the handle lived on): there is no output to give. And
/// when it is awaited, unfinished, inside another runtime's `block_on` on this thread:
/// its task runs only in its own runtime, which cannot run while the other one waits,
/// so the wait would never end.
pub struct JoinHandle<T> {
    task: Option<async_task::FallibleTask<T>>,
    /// The runtime the task runs on and its thread (their addresses, unique while they
    /// live: a handle outliving them finds its task dropped first), to tell
    /// awaiting it in another runtime there. (Awaited on another thread, the handle
    /// waits for a runtime that may well be running.)
    runtime: (usize, usize),
    /// The task's runtime is turned from outside (a tokio `Driver`): its tasks run in
    /// steps another executor interleaves with its own, so awaiting the handle under
    /// that executor is fine.
    turned_from_outside: bool,
}

impl<T> JoinHandle<T> {
    /// Stops the task: its future is dropped without running further.
    pub fn abort(mut self) {
        self.task.take();
    }

    /// True once the task has produced its output.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|task| task.is_finished())
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let polled = match self.task.as_mut() {
            Some(task) => Pin::new(task).poll(cx).map(|output| {
                output.unwrap_or_else(|| {
                    panic!("ringsock: a JoinHandle was awaited after its runtime was dropped with the task unfinished")
                })
            }),
            None => Poll::Pending,
        };
        if polled.is_pending() && self.awaited_in_another_runtime() {
            panic!(
                "ringsock: a JoinHandle was awaited inside another runtime's block_on: its \
                 task runs only in its own runtime, which cannot run meanwhile (await it \
                 under its own runtime)"
            );
        }
        if polled.is_pending() && self.awaited_under_a_foreign_executor_here() {
            panic!(
                "ringsock: a JoinHandle was awaited under another executor on its runtime's \
                 thread: its task runs only in its runtime's block_on, which cannot run \
                 meanwhile (await it inside that block_on, or from another thread)"
            );
        }
        polled
    }
}

impl<T> JoinHandle<T> {
    /// Whether another runtime than the task's runs this poll, on the task's thread.
    /// No runtime at all (a foreign executor, while the task's runtime is turned from
    /// outside) may be fine.
    fn awaited_in_another_runtime(&self) -> bool {
        let (runtime, thread) = self.runtime;
        thread_token() == thread
            && CONTEXT.with(|context| {
                context
                    .borrow()
                    .as_ref()
                    .is_some_and(|current| Rc::as_ptr(current) as usize != runtime)
            })
    }
}

impl<T> JoinHandle<T> {
    /// Whether no ringsock runtime runs this poll, on the task's own thread, while the
    /// task's runtime runs only in its own `block_on`: the executor polling the handle
    /// holds the thread, so the task can never run.
    fn awaited_under_a_foreign_executor_here(&self) -> bool {
        !self.turned_from_outside
            && self.runtime.1 == thread_token()
            && CONTEXT.with(|context| context.borrow().is_none())
    }
}

/// Whether a ringsock runtime runs on this thread now (a `block_on`, or a step of one
/// turned from outside).
pub(crate) fn is_running_here() -> bool {
    CONTEXT.with(|context| context.borrow().is_some())
}

/// Whether a ringsock `block_on` holds this thread now (not a step of a runtime turned
/// from outside, which another executor interleaves with its own work).
#[cfg(feature = "tokio")]
pub(crate) fn block_on_runs_here() -> bool {
    CONTEXT.with(|context| {
        context
            .borrow()
            .as_ref()
            .is_some_and(|inner| !inner.shared.turned_from_outside())
    })
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.detach();
        }
    }
}

fn spawn_on<F>(inner: &Rc<Inner>, future: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    let shared = inner.shared.clone();
    let key = inner.tasks.next_key();
    let registered = tasks::Registered::new(inner.tasks.clone(), key);
    let future = async move {
        let _registered = registered;
        future.await
    };
    let (runnable, task) =
        async_task::spawn_local(future, move |runnable| shared.schedule(runnable));
    inner.tasks.insert(runnable.waker());
    runnable.schedule();
    JoinHandle {
        task: Some(task.fallible()),
        runtime: (Rc::as_ptr(inner) as usize, thread_token()),
        turned_from_outside: inner.shared.turned_from_outside(),
    }
}

/// Spawns a task on the runtime running on this thread.
///
/// # Panics
///
/// When no ringsock runtime is running on this thread.
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    CONTEXT.with(|context| match context.borrow().as_ref() {
        Some(inner) => spawn_on(inner, future),
        None => panic!("ringsock::spawn called outside a ringsock runtime"),
    })
}

/// Runs `future` on a new runtime for this thread (backend from `RINGSOCK_BACKEND`, else
/// `auto`).
///
/// # Panics
///
/// When the runtime cannot start; use [`Runtime::new`] to handle that as an error.
pub fn block_on<F: Future>(future: F) -> F::Output {
    match Runtime::new() {
        Ok(runtime) => runtime.block_on(future),
        Err(err) => panic!("ringsock: cannot start a runtime: {err}"),
    }
}

/// The engine of the runtime running on this thread, if any.
pub fn current_driver_kind() -> Option<DriverKind> {
    CONTEXT.with(|context| context.borrow().as_ref().map(|inner| inner.kind))
}

/// Whether the runtime current on this thread is being dropped: what its tasks were
/// doing stops here, unfinished.
pub(crate) fn dropping() -> bool {
    CONTEXT.with(|context| {
        context
            .borrow()
            .as_ref()
            .is_some_and(|inner| inner.dropping.get())
    })
}

/// Why the runtime running on this thread fell back to epoll (`auto` found io_uring
/// missing or forbidden), if it did; `None` outside a runtime too. For a runtime a pool
/// built, whose [`Runtime::fallback_reason`] the program cannot reach.
pub fn current_fallback_reason() -> Option<String> {
    CONTEXT.with(|context| context.borrow().as_ref()?.fallback.clone())
}

/// Whether the runtime running on this thread uses io_uring and has other tasks to run
/// in this round: an operation they queue goes into the same submission as one queued
/// now, where a system call made now would be one more.
pub(crate) fn ring_batches_this_round() -> bool {
    CONTEXT.with(|context| {
        context
            .borrow()
            .as_ref()
            .is_some_and(|inner| inner.kind == DriverKind::Uring && inner.shared.queued() > 0)
    })
}

/// System calls made so far by the driver of the runtime running on this thread.
pub fn driver_stats() -> Option<DriverStats> {
    CONTEXT.with(|context| context.borrow().as_ref()?.driver.stats())
}

/// The resolve timeout of the runtime running on this thread.
pub(crate) fn resolve_timeout() -> std::io::Result<Duration> {
    CONTEXT.with(|context| {
        let context = context.borrow();
        let inner = context
            .as_ref()
            .ok_or_else(crate::driver::current::no_runtime)?;
        Ok(inner.resolve_timeout)
    })
}

/// Runs `f` with the current runtime's timers.
fn with_timers<R>(f: impl FnOnce(&mut time::Timers) -> R) -> Option<R> {
    CONTEXT.with(|context| {
        let context = context.borrow();
        let inner = context.as_ref()?;
        let mut timers = inner.timers.try_borrow_mut().ok()?;
        Some(f(&mut timers))
    })
}

/// Runs `test` on a fresh runtime of each driver, for unit tests that need the loop.
/// Where io_uring cannot start, says so and skips it, unless `RINGSOCK_REQUIRE_URING`
/// is set (as in CI).
#[cfg(test)]
pub(crate) fn on_each_backend<F, Fut>(test: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in [Backend::Uring, Backend::Epoll] {
        match Builder::new().backend(backend).build() {
            Ok(runtime) => runtime.block_on(test()),
            Err(err)
                if backend == Backend::Uring
                    && std::env::var_os("RINGSOCK_REQUIRE_URING").is_none() =>
            {
                eprintln!("skipped on io_uring: {err}");
            }
            Err(err) => panic!("cannot start the {backend} runtime: {err}"),
        }
    }
}
