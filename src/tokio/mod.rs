//! ringsock inside tokio programs (feature `tokio`).
//!
//! A [`Driver`] is a ringsock runtime that a tokio runtime turns: created on a tokio
//! thread, it waits in tokio's own reactor (io_uring: an eventfd registered with the
//! ring; epoll: the epoll descriptor) instead of parking the thread. Inside
//! [`Driver::run_until`] (or [`run`]), ringsock sockets are awaited like tokio's own,
//! beside tokio's sockets, timers, channels and `spawn_local` tasks, and
//! [`ringsock::spawn`](crate::spawn) and [`runtime::sleep`](crate::runtime::sleep) work.
//!
//! ```
//! # let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! # tokio.block_on(async {
//! use ringsock::{HostName, StreamSocket, StreamSocketListener};
//!
//! let mut driver = ringsock::tokio::Driver::new()?;
//! driver
//!     .run_until(async {
//!         let listener = StreamSocketListener::bind_host(&HostName::new("127.0.0.1")?, "0")?;
//!         let addr = listener.local_addr()?;
//!         let client = StreamSocket::new();
//!         let (accepted, connected) = tokio::join!(listener.accept(), client.connect_addr(addr));
//!         let (_server, ()) = (accepted?, connected?);
//!         Ok::<_, ringsock::Error>(())
//!     })
//!     .await?;
//! # Ok::<_, ringsock::Error>(())
//! # }).unwrap();
//! ```
//!
//! # Where sockets may be used
//!
//! Sockets belong to the driver that was current when they were first used, and it is
//! current only inside its `run_until`. Used anywhere else — outside it, in a tokio task
//! polled by the scheduler rather than by the future given to `run_until`, or under
//! another driver — every operation fails with
//! [`SocketErrorStatus::WrongRuntime`](crate::SocketErrorStatus::WrongRuntime), never
//! hangs. A `tokio::task::LocalSet` run inside `run_until` (`local.run_until(..)`) polls
//! its `spawn_local` tasks there, so they may use the driver's sockets too.

mod io;

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use ::tokio::io::unix::AsyncFd;

use crate::driver::notify::{self, TimerFd};
use crate::runtime::external::{Step, Stepper};
use crate::runtime::{Builder, Runtime};
use crate::{DriverKind, DriverStats, Error, Result};

/// Times a poll of [`RunUntil`] goes round when the driver keeps signalling, before it
/// yields to tokio's other tasks.
const POLL_ROUNDS: u32 = 8;

/// A ringsock runtime turned by the tokio runtime of the thread that created it.
///
/// Not `Send`: it lives on that thread, like a `LocalSet`. It waits in the reactor of the
/// tokio runtime it was created in, so that runtime must be the one that polls
/// [`run_until`](Self::run_until). Dropping it drops the ringsock tasks it runs and
/// cancels what is still in flight.
pub struct Driver {
    runtime: Runtime,
    notify: AsyncFd<OwnedFd>,
    timer: AsyncFd<TimerFd>,
    /// When the timer descriptor is set to expire, if it is.
    armed: Option<Instant>,
    /// The tokio runtime whose reactor waits on `notify` and `timer`.
    tokio: ::tokio::runtime::Id,
}

impl Driver {
    /// A driver with the default options (engine from `RINGSOCK_BACKEND`, else `auto`).
    ///
    /// Fails outside a tokio runtime, or when the engine cannot start.
    ///
    /// # Panics
    ///
    /// When the tokio runtime was built without I/O (`enable_io`), as tokio's own
    /// sockets do.
    pub fn new() -> Result<Driver> {
        Driver::with_builder(Builder::new())
    }

    /// A driver with `builder`'s options (backend, ring entries, disabled capabilities,
    /// resolve timeout; the spin setting does not apply: tokio decides when to sleep).
    ///
    /// On io_uring the ring registers an eventfd the kernel signals at each completion.
    /// Where the kernel does not signal it for deferred completions, the ring is set up
    /// without DEFER_TASKRUN ([`ring_setup`](Self::ring_setup) says which).
    pub fn with_builder(builder: Builder) -> Result<Driver> {
        let Ok(tokio) = ::tokio::runtime::Handle::try_current() else {
            return Err(Error::wrong_runtime(
                "ringsock::tokio::Driver must be created inside a tokio runtime",
            ));
        };
        let tokio = tokio.id();
        let runtime = builder.build_turned_from_outside()?;
        let notify = runtime
            .notify_fd()
            .map_err(|err| Error::io("get the driver's descriptor", err))?;
        let notify = notify::register_readable(notify)
            .map_err(|err| Error::io("register the driver with tokio", err))?;
        let timer = TimerFd::new()
            .and_then(notify::register_readable)
            .map_err(|err| Error::io("register the driver's timer with tokio", err))?;
        Ok(Driver {
            runtime,
            notify,
            timer,
            armed: None,
            tokio,
        })
    }

    /// Runs `future` with this driver current: ringsock sockets, tasks and timers used
    /// in it belong to this driver. Tasks spawned with [`crate::spawn`] run while some
    /// `run_until` of this driver runs.
    ///
    /// # Panics
    ///
    /// The returned future panics when polled inside a ringsock `block_on` (of any
    /// runtime: tokio's executor, whose reactor alone sees the driver's descriptors,
    /// does not run there), when polled outside the tokio runtime the driver was created
    /// in (elsewhere it would wait forever), or
    /// when the driver fails in a way that leaves it unusable (the ring or
    /// epoll descriptor broke), as [`Runtime::block_on`] does.
    pub fn run_until<F: Future>(&mut self, future: F) -> RunUntil<'_, F> {
        let stepper = self.runtime.stepper();
        RunUntil {
            driver: self,
            future: Some(Box::pin(future)),
            stepper,
        }
    }

    /// The engine this driver runs on.
    pub fn driver_kind(&self) -> DriverKind {
        self.runtime.driver_kind()
    }

    /// Why `auto` fell back to epoll, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.runtime.fallback_reason()
    }

    /// The io_uring setup flags in use; `None` on epoll.
    pub fn ring_setup(&self) -> Option<&'static str> {
        self.runtime.ring_setup()
    }

    /// System calls the driver has made so far.
    pub fn driver_stats(&self) -> DriverStats {
        self.runtime.driver_stats()
    }

    /// Whether the driver's descriptor turned readable; clears it when it did.
    fn notified(&self, cx: &mut Context<'_>) -> bool {
        match self.notify.poll_read_ready(cx) {
            Poll::Ready(Ok(mut guard)) => {
                guard.clear_ready();
                // The eventfd's count (io_uring) would keep it readable; epoll's
                // descriptor is emptied by the turn that follows.
                if self.runtime.driver_kind() == DriverKind::Uring {
                    notify::take_count(guard.get_inner());
                }
                true
            }
            Poll::Ready(Err(err)) => panic!("ringsock: tokio's reactor failed: {err}"),
            Poll::Pending => false,
        }
    }

    /// Whether the timer expired; clears it when it did.
    fn timer_fired(&mut self, cx: &mut Context<'_>) -> bool {
        match self.timer.poll_read_ready(cx) {
            Poll::Ready(Ok(mut guard)) => {
                guard.clear_ready();
                notify::take_count(guard.get_inner());
                self.armed = None;
                true
            }
            Poll::Ready(Err(err)) => panic!("ringsock: tokio's reactor failed: {err}"),
            Poll::Pending => false,
        }
    }

    /// Sets the timer descriptor for the runtime's next timer, unless it already is.
    fn arm(&mut self, after: Option<std::time::Duration>) {
        let Some(after) = after else { return };
        let deadline = Instant::now() + after;
        if self.armed.is_some_and(|armed| armed <= deadline) {
            return;
        }
        if let Err(err) = self.timer.get_ref().set(Some(after)) {
            panic!("ringsock: cannot set the driver's timer: {err}");
        }
        self.armed = Some(deadline);
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("kind", &self.driver_kind())
            .field("ring_setup", &self.ring_setup())
            .finish()
    }
}

/// Runs `future` on a new [`Driver`] for this tokio thread, then drops the driver (and
/// the ringsock tasks still running on it).
pub async fn run<F: Future>(future: F) -> Result<F::Output> {
    let mut driver = Driver::new()?;
    Ok(driver.run_until(future).await)
}

/// The future of [`Driver::run_until`].
pub struct RunUntil<'a, F: Future> {
    driver: &'a mut Driver,
    future: Option<Pin<Box<F>>>,
    stepper: Stepper,
}

impl<F: Future> Future for RunUntil<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let driver = &mut *this.driver;
        let here = ::tokio::runtime::Handle::try_current().map(|tokio| tokio.id());
        if here.ok() != Some(driver.tokio) {
            panic!(
                "ringsock: Driver::run_until polled outside the tokio runtime the Driver was created in"
            );
        }
        // A ringsock block_on holds the thread: tokio's reactor, which alone sees the
        // driver's descriptors, does not run, and nothing would wake this future.
        if crate::runtime::block_on_runs_here() {
            panic!(
                "ringsock: Driver::run_until polled inside a ringsock block_on: it runs \
                 under tokio's executor, which cannot run meanwhile"
            );
        }
        let mut collect = driver.notified(cx);
        for _ in 0..POLL_ROUNDS {
            let future = this
                .future
                .as_mut()
                .expect("RunUntil polled after it finished")
                .as_mut();
            let step = driver
                .runtime
                .step(&this.stepper, future, cx.waker(), collect);
            let step = match step {
                Ok(step) => step,
                Err(err) => panic!(
                    "ringsock: the {} driver failed: {err}",
                    driver.driver_kind()
                ),
            };
            match step {
                Step::Ready(output) => {
                    this.future = None;
                    return Poll::Ready(output);
                }
                Step::Yielded => return Poll::Pending,
                Step::Idle(next) => driver.arm(next),
            }
            // Registers the task with tokio for both descriptors unless one is ready.
            collect = driver.notified(cx);
            let fired = driver.timer_fired(cx);
            if !collect && !fired {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<F: Future> Drop for RunUntil<'_, F> {
    fn drop(&mut self) {
        // The future's operations cancel on their own driver when it is current.
        let _enter = self.driver.runtime.enter_if_idle();
        self.future = None;
    }
}

impl<F: Future> std::fmt::Debug for RunUntil<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunUntil")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}
