//! The engines: io_uring and the portable readiness fallback, behind one contract.
//!
//! # The contract every driver fulfils
//!
//! A driver lives on one thread, inside one [`Runtime`](crate::runtime::Runtime), and
//! provides:
//!
//! - `park(timeout)`: submit whatever operations the tasks queued, then wait in ONE system
//!   call until at least one completion or readiness event arrives, the timeout passes, or
//!   another thread unparks it; then wake the tasks whose operations progressed.
//! - An [`Unparker`] another thread can use to end a `park` early.
//! - The operations in [`ops`]: accept, connect, recv, send, vectored send, datagram
//!   send/receive, shutdown. Each takes owned buffers and gives them back, so the upper
//!   layers are written once and never name io_uring or epoll.
//! - [`DriverStats`]: counts of the system calls it made, so benchmarks count, not guess.
//!
//! Dispatch is static: [`Driver`] is an enum of the two engines, and [`ops`] matches on
//! the kind of the current runtime's driver.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

pub(crate) mod buf_pool;
pub(crate) mod iovec;
pub(crate) mod ops;
pub(crate) mod ops_datagram;
pub(crate) mod poll;
pub(crate) mod recv_mmsg;
pub(crate) mod sockaddr;
pub(crate) mod uring;

/// Which engine a runtime should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// io_uring when the kernel allows it, else epoll (the default).
    #[default]
    Auto,
    /// io_uring only; starting fails with a clear error where it is unavailable.
    Uring,
    /// The readiness-based epoll engine.
    Epoll,
}

impl Backend {
    /// The choice named by `RINGSOCK_BACKEND` (`uring`, `epoll`, `auto`), if set.
    ///
    /// An unknown value is an error rather than a silent default, so a typo in CI cannot
    /// quietly test the wrong engine.
    pub fn from_env() -> crate::Result<Option<Backend>> {
        match std::env::var("RINGSOCK_BACKEND") {
            Ok(value) => value.parse().map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(crate::Error::invalid_input(
                "RINGSOCK_BACKEND is not valid UTF-8",
            )),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Backend> {
        match s {
            "auto" => Ok(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Backend::Uring),
            "epoll" | "poll" => Ok(Backend::Epoll),
            other => Err(crate::Error::invalid_input(format!(
                "unknown backend {other:?}: expected uring, epoll or auto"
            ))),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        })
    }
}

/// The engine a runtime actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// io_uring.
    Uring,
    /// epoll readiness.
    Epoll,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Uring => "io_uring",
            DriverKind::Epoll => "epoll",
        })
    }
}

/// System calls a driver made; read them with [`crate::runtime::driver_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Calls that entered the kernel to submit work or wait for it: `io_uring_enter` on
    /// io_uring, `epoll_wait` on epoll.
    pub enter_calls: u64,
    /// Other system calls made directly: on epoll every send, recv, sendmsg, sendmmsg,
    /// recvmmsg and `epoll_ctl`; on io_uring the sendmmsg of a multi-send datagram
    /// batch, the recvmmsg of a receiver draining a burst and the `io_uring_register`
    /// calls that take its buffer ring back and give it again (all else is SQEs).
    pub io_calls: u64,
    /// Submission queue entries pushed (io_uring only).
    pub sqes: u64,
}

impl DriverStats {
    /// Every system call counted: entries into the kernel plus direct I/O calls.
    pub fn syscalls(&self) -> u64 {
        self.enter_calls + self.io_calls
    }
}

/// Tunables of a driver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DriverConfig {
    pub(crate) ring_entries: u32,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig { ring_entries: 1024 }
    }
}

/// One of the two engines. Made once per runtime, so the size difference between the
/// variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Driver {
    Uring(uring::Driver),
    Poll(poll::Driver),
}

impl Driver {
    /// Starts the engine `backend` asks for. With `Auto`, a failed io_uring start is not an
    /// error: the reason comes back beside the epoll driver so the runtime can report it.
    pub(crate) fn new(
        backend: Backend,
        config: DriverConfig,
    ) -> crate::Result<(Driver, Option<String>)> {
        match backend {
            Backend::Epoll => Ok((Driver::Poll(poll::Driver::new()?), None)),
            Backend::Uring => match uring::Driver::new(config) {
                Ok(driver) => Ok((Driver::Uring(driver), None)),
                Err(reason) => Err(crate::Error::io(
                    "io_uring was forced (backend uring) but cannot start",
                    reason,
                )),
            },
            Backend::Auto => match uring::Driver::new(config) {
                Ok(driver) => Ok((Driver::Uring(driver), None)),
                Err(reason) => {
                    let why = format!("io_uring unavailable ({reason}); using epoll");
                    Ok((Driver::Poll(poll::Driver::new()?), Some(why)))
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

    /// Submits queued work and waits, in one system call, for progress or the timeout.
    /// `Some(Duration::ZERO)` only submits and collects what is already there.
    pub(crate) fn park(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Driver::Uring(driver) => driver.park(timeout),
            Driver::Poll(driver) => driver.park(timeout),
        }
    }

    /// Collects what is ready without waiting (for a loop that spins before it parks);
    /// true when something arrived.
    pub(crate) fn poll_completions(&mut self) -> io::Result<bool> {
        match self {
            Driver::Uring(driver) => driver.poll_completions(),
            Driver::Poll(driver) => driver.poll_completions(),
        }
    }

    pub(crate) fn unparker(&self) -> Unparker {
        match self {
            Driver::Uring(driver) => driver.unparker(),
            Driver::Poll(driver) => driver.unparker(),
        }
    }

    pub(crate) fn stats(&self) -> DriverStats {
        match self {
            Driver::Uring(driver) => driver.stats(),
            Driver::Poll(driver) => driver.stats(),
        }
    }

    /// Takes every task waker the driver holds, for a runtime shutting down: dropping
    /// them lets the tasks waiting on I/O be dropped. Operations stay in flight.
    pub(crate) fn take_wakers(&mut self) -> Vec<std::task::Waker> {
        match self {
            Driver::Uring(driver) => driver.take_wakers(),
            Driver::Poll(driver) => driver.take_wakers(),
        }
    }
}

/// Ends a driver's `park` from any thread.
#[derive(Clone)]
pub(crate) enum Unparker {
    EventFd(Arc<OwnedFd>),
    Mio(Arc<mio::Waker>),
}

impl Unparker {
    pub(crate) fn unpark(&self) {
        match self {
            Unparker::EventFd(fd) => uring::write_eventfd(fd.as_raw_fd()),
            // A failed wake leaves the loop to its next timer; nothing better to do here.
            Unparker::Mio(waker) => drop(waker.wake()),
        }
    }
}

/// A socket shared by the handles that use it and by the operations in flight on it.
///
/// The descriptor is closed when the last clone is dropped. An io_uring operation holds a
/// clone until its completion arrives — even when the future that started it was dropped —
/// so the kernel never works on a descriptor number that was closed and reused.
#[derive(Clone)]
pub(crate) struct SharedFd {
    inner: Rc<FdInner>,
}

struct FdInner {
    fd: OwnedFd,
    /// The epoll driver's registration, made on first use.
    poll_slot: Cell<Option<usize>>,
    /// This side shut its sending direction down (so EPIPE is ours, not the peer's).
    write_shut: Cell<bool>,
}

impl SharedFd {
    pub(crate) fn new(fd: OwnedFd) -> SharedFd {
        SharedFd {
            inner: Rc::new(FdInner {
                fd,
                poll_slot: Cell::new(None),
                write_shut: Cell::new(false),
            }),
        }
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }

    pub(crate) fn poll_slot(&self) -> Option<usize> {
        self.inner.poll_slot.get()
    }

    pub(crate) fn set_poll_slot(&self, slot: usize) {
        self.inner.poll_slot.set(Some(slot));
    }

    pub(crate) fn mark_write_shut(&self) {
        self.inner.write_shut.set(true);
    }

    pub(crate) fn is_write_shut(&self) -> bool {
        self.inner.write_shut.get()
    }

    /// A borrowed socket2 view, for socket options and addresses.
    pub(crate) fn sock(&self) -> socket2::SockRef<'_> {
        socket2::SockRef::from(&self.inner.fd)
    }
}

impl Drop for FdInner {
    fn drop(&mut self) {
        if let Some(slot) = self.poll_slot.get() {
            poll::release_slot(slot);
        }
    }
}

impl fmt::Debug for SharedFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedFd({})", self.raw())
    }
}
