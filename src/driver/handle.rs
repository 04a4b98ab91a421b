//! The driver a runtime owns: one of the two engines, started once, and the thread's
//! current driver while the runtime runs.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::task::Waker;
use std::time::Duration;

use super::backend::{Backend, DriverConfig, DriverKind};
use super::caps::Capabilities;
use super::current::{self, DriverId};
use super::stats::DriverStats;
use super::unpark::Unparker;
use super::{poll, uring};

/// A runtime's driver. Cloning it clones a handle: sockets and operations hold one, so
/// they always reach the driver they were registered with.
#[derive(Clone)]
pub(crate) enum Driver {
    Uring(uring::Handle),
    Poll(poll::Handle),
}

thread_local! {
    /// The driver of the runtime running on this thread, for sockets used for the first
    /// time (they bind to it).
    static CURRENT: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

impl Driver {
    /// Starts the engine `backend` asks for. With `Auto`, a failed io_uring start is not an
    /// error: the reason comes back beside the epoll driver so the runtime can report it.
    pub(crate) fn new(
        backend: Backend,
        config: DriverConfig,
    ) -> crate::Result<(Driver, Option<String>)> {
        let uring_config = uring::Config {
            ring_entries: config.ring_entries,
            disabled: config.disabled,
            notify: config.notify,
        };
        let epoll = || {
            poll::Shared::start()
                .map(Driver::Poll)
                .map_err(|err| crate::Error::io("start the epoll driver", err))
        };
        match backend {
            Backend::Epoll => Ok((epoll()?, None)),
            Backend::Uring => match uring::Shared::start(uring_config) {
                Ok(driver) => Ok((Driver::Uring(driver), None)),
                Err(reason) => Err(crate::Error::io(
                    "io_uring was forced (backend uring) but cannot start",
                    reason,
                )),
            },
            Backend::Auto => match uring::Shared::start(uring_config) {
                Ok(driver) => Ok((Driver::Uring(driver), None)),
                Err(reason) => {
                    let why = format!("io_uring unavailable ({reason}); using epoll");
                    Ok((epoll()?, Some(why)))
                }
            },
        }
    }

    pub(crate) fn kind(&self) -> DriverKind {
        match self {
            Driver::Uring(_) => DriverKind::Uring,
            Driver::Poll(_) => DriverKind::Epoll,
        }
    }

    pub(crate) fn id(&self) -> DriverId {
        match self {
            Driver::Uring(driver) => driver.id(),
            Driver::Poll(driver) => driver.id(),
        }
    }

    /// Makes this driver the thread's current one until the guard drops.
    pub(crate) fn enter(&self) -> EnterGuard {
        let previous = CURRENT.with(|current| current.replace(Some(self.clone())));
        EnterGuard {
            _id: current::enter(self.id()),
            previous,
        }
    }

    /// Submits queued work and waits, in one system call, for progress or the timeout.
    /// `Some(Duration::ZERO)` only submits and collects what is already there.
    pub(crate) fn park(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Driver::Uring(driver) => {
                let mut d = driver.borrow()?;
                d.park(timeout)?;
                let dead = d.take_dead();
                drop(d);
                release_uring(driver, dead);
                driver.after_dispatch();
            }
            Driver::Poll(driver) => {
                driver.borrow()?.park(timeout)?;
                driver.after_turn();
            }
        };
        Ok(())
    }

    /// Collects what is ready without waiting (for a loop that spins before it parks);
    /// true when something arrived.
    pub(crate) fn poll_completions(&self) -> io::Result<bool> {
        match self {
            Driver::Uring(driver) => {
                let mut d = driver.borrow()?;
                let any = d.poll_completions()?;
                let dead = d.take_dead();
                drop(d);
                release_uring(driver, dead);
                driver.after_dispatch();
                Ok(any)
            }
            Driver::Poll(driver) => {
                let any = driver.borrow()?.poll_completions()?;
                driver.after_turn();
                Ok(any)
            }
        }
    }

    /// A descriptor another event loop can wait on: it turns readable when this driver
    /// has completions (io_uring: the eventfd registered with the ring) or events
    /// (epoll: the epoll descriptor itself) to collect with [`turn`](Self::turn). The
    /// io_uring driver must have been started with `DriverConfig::notify`.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn notify_fd(&self) -> io::Result<OwnedFd> {
        match self {
            Driver::Uring(driver) => driver.borrow()?.notify_fd(),
            Driver::Poll(driver) => driver.borrow()?.notify_fd(),
        }
    }

    /// Submits what the tasks queued and collects what is there, without waiting; with
    /// `collect` false (nothing was signalled) an io_uring with nothing queued makes no
    /// system call, and epoll none at all. True when something arrived.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn turn(&self, collect: bool) -> io::Result<bool> {
        match self {
            Driver::Uring(driver) => {
                let mut d = driver.borrow()?;
                let any = d.turn(collect)?;
                let dead = d.take_dead();
                drop(d);
                release_uring(driver, dead);
                driver.after_dispatch();
                Ok(any)
            }
            Driver::Poll(driver) if collect => {
                let any = driver.borrow()?.turn()?;
                driver.after_turn();
                Ok(any)
            }
            Driver::Poll(_) => Ok(false),
        }
    }

    pub(crate) fn unparker(&self) -> io::Result<Unparker> {
        Ok(match self {
            Driver::Uring(driver) => driver.borrow()?.unparker(),
            Driver::Poll(driver) => driver.borrow()?.unparker(),
        })
    }

    /// System calls so far; `None` while the driver is busy (re-entered).
    pub(crate) fn stats(&self) -> Option<DriverStats> {
        match self {
            Driver::Uring(driver) => driver.borrow().ok().map(|d| d.stats()),
            Driver::Poll(driver) => driver.borrow().ok().map(|d| d.stats()),
        }
    }

    /// What the io_uring engine found and uses (none on epoll).
    pub(crate) fn capabilities(&self) -> Capabilities {
        match self {
            Driver::Uring(driver) => driver
                .borrow()
                .map(|d| d.capabilities())
                .unwrap_or_default(),
            Driver::Poll(_) => Capabilities::none(),
        }
    }

    /// The io_uring setup flags in use, if this is io_uring.
    pub(crate) fn setup_flags(&self) -> Option<&'static str> {
        match self {
            Driver::Uring(driver) => driver.borrow().ok().map(|d| d.setup_flags()),
            Driver::Poll(_) => None,
        }
    }

    /// Takes every task waker the driver holds, for a runtime shutting down: dropping
    /// them lets the tasks waiting on I/O be dropped. Operations stay in flight.
    pub(crate) fn take_wakers(&self) -> Vec<Waker> {
        match self {
            Driver::Uring(driver) => driver
                .borrow()
                .map(|mut d| d.take_wakers())
                .unwrap_or_default(),
            Driver::Poll(driver) => driver
                .borrow()
                .map(|mut d| d.take_wakers())
                .unwrap_or_default(),
        }
    }

    /// The runtime is going: cancels and reaps every operation in flight; from now on
    /// the driver's sockets and operations report that their runtime was dropped.
    pub(crate) fn shutdown(&self) {
        match self {
            Driver::Uring(driver) => {
                let dead = match driver.borrow() {
                    Ok(mut d) => {
                        d.shutdown();
                        d.take_dead()
                    }
                    Err(_) => uring::Released::default(),
                };
                // What wakers dropped during the last reap, freed with the rest.
                driver.after_dispatch();
                release_uring(driver, dead);
            }
            Driver::Poll(driver) => {
                if let Ok(mut driver) = driver.borrow() {
                    driver.shutdown();
                }
            }
        }
    }
}

/// Runs `f` with the driver of the runtime running on this thread, if any.
pub(crate) fn with_current<R>(f: impl FnOnce(&Driver) -> R) -> Option<R> {
    CURRENT.with(|current| current.borrow().as_ref().map(f))
}

/// Drops what the driver released, now that it is not borrowed (a drop may use it: a
/// buffer goes back onto its ring), then gives the emptied list and post boxes back to
/// `driver` for its next turn.
fn release_uring(driver: &uring::Handle, mut dead: uring::Released) {
    if dead.is_empty() {
        return;
    }
    dead.release();
    if let Ok(mut d) = driver.borrow() {
        d.give_back_dead(dead);
    }
}

/// Restores the previous current driver when dropped.
pub(crate) struct EnterGuard {
    _id: current::EnterGuard,
    previous: Option<Driver>,
}

impl Drop for EnterGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|current| *current.borrow_mut() = previous);
    }
}
