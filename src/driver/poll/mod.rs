//! The portable engine: readiness from epoll (through mio), then plain non-blocking calls.
//!
//! Every socket is registered on first use, edge-triggered, for both directions (a
//! datagram receiver draining bursts takes it out of the set meanwhile, see
//! [`suspend_events`]; it is added back before any task waits). A direction is assumed
//! ready until a call says `EAGAIN`; then the task waits for the next edge. The runtime
//! is single-threaded and events are only read in `park`, so between a call's `EAGAIN`
//! and the wait no edge can be missed: it is reported by the next `epoll_wait`.

use std::cell::{RefCell, RefMut};
use std::future::poll_fn;
use std::io;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;

use super::current::{self, DriverId};
use super::fd::FdRef;
use super::stats::DriverStats;
use super::unpark::Unparker;

pub(crate) mod datagram;
pub(crate) mod file;
pub(crate) mod net;

const WAKE_TOKEN: Token = Token(usize::MAX);

/// While tasks stay runnable, look at epoll once in this many rounds (as tokio's
/// event_interval does).
const BUSY_POLL_INTERVAL: u32 = 61;

/// Read or write readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Read,
    Write,
}

#[derive(Default)]
struct Readiness {
    ready: [bool; 2],
    waiters: [Vec<Waker>; 2],
    /// In the epoll set now; false while events are suspended (see [`suspend_events`]).
    registered: bool,
}

impl Readiness {
    /// Wakes every task waiting on the socket (call it with the driver let go).
    fn wake_all(self) {
        for waiters in self.waiters {
            waiters.into_iter().for_each(Waker::wake);
        }
    }
}

/// The epoll driver of one runtime.
pub(crate) struct Driver {
    poll: mio::Poll,
    events: Events,
    waker: Arc<mio::Waker>,
    slots: Slab<Readiness>,
    stats: DriverStats,
    /// Consecutive parks with a zero timeout.
    busy_rounds: u32,
    /// The runtime is gone: sockets registered here say so.
    shut_down: bool,
    /// Wakers of the tasks this turn found ready, woken once the driver is let go
    /// ([`Shared::after_turn`]): a program's own waker may use its sockets.
    woken: Vec<Waker>,
}

/// A runtime's epoll driver, shared by its runtime and its sockets' registrations.
pub(crate) type Handle = Rc<Shared>;

/// The driver behind a [`Handle`], with its identity.
pub(crate) struct Shared {
    id: DriverId,
    driver: RefCell<Driver>,
    /// Slots of registrations dropped while the driver was busy waking tasks (by a
    /// waker it called): forgotten at the end of that turn, not kept until the runtime
    /// goes.
    dropped_in_dispatch: RefCell<Vec<usize>>,
}

impl Shared {
    pub(crate) fn start() -> io::Result<Handle> {
        Ok(Rc::new(Shared {
            id: DriverId::next(),
            driver: RefCell::new(Driver::new()?),
            dropped_in_dispatch: RefCell::new(Vec::new()),
        }))
    }

    /// Ends a turn, with the driver let go: wakes the tasks it found ready (a waker that
    /// panics does not keep the others from waking: the first panic goes on after),
    /// then forgets the registrations they dropped.
    pub(crate) fn after_turn(&self) {
        let woken = match self.borrow() {
            // Taken only when it holds wakers: its room stays for the next turn.
            Ok(mut d) if !d.woken.is_empty() => Some(std::mem::take(&mut d.woken)),
            Ok(_) => None,
            Err(_) => return,
        };
        let Some(mut woken) = woken else {
            self.forget_dropped();
            return;
        };
        let mut panicked = None;
        for waker in woken.drain(..) {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| waker.wake())) {
                panicked.get_or_insert(panic);
            }
        }
        // The list's room back for the next turn, unless a wake made a new one.
        if let Ok(mut d) = self.borrow() {
            if d.woken.is_empty() {
                d.woken = woken;
            }
        }
        self.forget_dropped();
        if let Some(panic) = panicked {
            resume_unwind(panic);
        }
    }

    /// Forgets the slots of registrations dropped while the driver was busy, and wakes
    /// the tasks that still waited on them (outside the driver), so they see the
    /// socket gone.
    pub(crate) fn forget_dropped(&self) {
        let dropped = std::mem::take(&mut *self.dropped_in_dispatch.borrow_mut());
        if dropped.is_empty() {
            return;
        }
        let removed: Vec<Readiness> = match self.borrow() {
            Ok(mut d) => dropped
                .into_iter()
                .filter_map(|slot| d.slots.try_remove(slot))
                .collect(),
            Err(_) => {
                self.dropped_in_dispatch.borrow_mut().extend(dropped);
                Vec::new()
            }
        };
        for readiness in removed {
            readiness.wake_all();
        }
    }

    pub(crate) fn id(&self) -> DriverId {
        self.id
    }

    /// Runs `f` with the driver, if it is the one driving this thread and still running;
    /// the misuse error otherwise.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Driver) -> R) -> io::Result<R> {
        if !current::is_current(self.id) {
            return Err(self.misuse());
        }
        let mut driver = self.borrow()?;
        if driver.shut_down {
            return Err(current::runtime_gone(self.id));
        }
        Ok(f(&mut driver))
    }

    /// The driver, wherever this thread stands (drops, the runtime itself).
    pub(crate) fn borrow(&self) -> io::Result<RefMut<'_, Driver>> {
        self.driver.try_borrow_mut().map_err(|_| {
            io::Error::new(
                io::ErrorKind::ResourceBusy,
                "the epoll driver is busy: a waker it is calling used the socket (do \
                     socket work in the task the waker wakes, not in the waker)",
            )
        })
    }

    fn misuse(&self) -> io::Error {
        match self.driver.try_borrow() {
            Ok(driver) if driver.shut_down => current::runtime_gone(self.id),
            _ => current::wrong_runtime(self.id),
        }
    }
}

impl Driver {
    fn new() -> io::Result<Driver> {
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), WAKE_TOKEN)?;
        Ok(Driver {
            poll,
            events: Events::with_capacity(1024),
            waker: Arc::new(waker),
            slots: Slab::with_capacity(256),
            stats: DriverStats::default(),
            busy_rounds: 0,
            shut_down: false,
            woken: Vec::new(),
        })
    }

    /// The runtime is going: sockets registered here fail with "runtime dropped" from
    /// now on. Nothing is in flight on epoll, so nothing needs waiting for.
    pub(crate) fn shutdown(&mut self) {
        self.shut_down = true;
    }

    pub(crate) fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Takes every waiting task's waker (see `super::Driver::take_wakers`).
    pub(crate) fn take_wakers(&mut self) -> Vec<Waker> {
        let mut wakers = std::mem::take(&mut self.woken);
        for (_, readiness) in self.slots.iter_mut() {
            for waiters in &mut readiness.waiters {
                wakers.append(waiters);
            }
        }
        wakers
    }

    pub(crate) fn unparker(&self) -> Unparker {
        Unparker::Mio(self.waker.clone())
    }

    /// One `epoll_wait`, then wake every task whose socket became ready.
    ///
    /// A zero timeout means tasks are still runnable: then most rounds skip the
    /// `epoll_wait`, which could only report readiness that no runnable task waits for
    /// yet, and one round in [`BUSY_POLL_INTERVAL`] looks, so waiting tasks are not
    /// starved. This halves the system calls of a busy batched sender.
    pub(crate) fn park(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // Tasks found ready by a turn that failed before it woke them: not a sleep now.
        let timeout = if self.woken.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        if timeout == Some(Duration::ZERO) {
            self.busy_rounds += 1;
            if self.busy_rounds % BUSY_POLL_INTERVAL != 0 {
                return Ok(());
            }
        } else {
            self.busy_rounds = 0;
        }
        self.wait_events(timeout).map(drop)
    }

    /// One `epoll_wait`; wakes the tasks waiting for what it reports. Returns whether
    /// any event came.
    fn wait_events(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        self.stats.enter_calls += 1;
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(err) => return Err(err),
        }
        let any = !self.events.is_empty();
        for event in self.events.iter() {
            if event.token() == WAKE_TOKEN {
                continue;
            }
            let Some(slot) = self.slots.get_mut(event.token().0) else {
                continue;
            };
            // Errors and hang-ups make both directions "ready": the next call reports them.
            let failed = event.is_error();
            if event.is_readable() || event.is_read_closed() || failed {
                slot.ready[0] = true;
                self.woken.append(&mut slot.waiters[0]);
            }
            if event.is_writable() || event.is_write_closed() || failed {
                slot.ready[1] = true;
                self.woken.append(&mut slot.waiters[1]);
            }
        }
        Ok(any)
    }

    /// One `epoll_wait` that does not wait; returns whether a task was woken. For
    /// spinning (each call is a system call here: epoll has no shared-memory flag).
    pub(crate) fn poll_completions(&mut self) -> io::Result<bool> {
        self.wait_events(Some(Duration::ZERO))
    }

    /// A duplicate of the epoll descriptor, for another event loop to wait on (it is
    /// readable while events are ready).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn notify_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsRawFd;
        super::notify::duplicate(self.poll.as_raw_fd())
    }

    /// Collects every event ready now. Nested in another epoll set, this one reports a
    /// new edge there only when its ready list grows, so it is emptied, not sampled.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn turn(&mut self) -> io::Result<bool> {
        let mut any = false;
        loop {
            any |= self.wait_events(Some(Duration::ZERO))?;
            if self.events.iter().count() < self.events.capacity() {
                return Ok(any);
            }
        }
    }

    /// Puts the socket (back) into the epoll set. Adding it reports its current state,
    /// so nothing that became ready while it was out is missed.
    fn add_to_epoll(&mut self, raw: RawFd, slot: usize) -> io::Result<()> {
        let Some(readiness) = self.slots.get_mut(slot) else {
            return Ok(());
        };
        if readiness.registered {
            return Ok(());
        }
        let interest = Interest::READABLE | Interest::WRITABLE;
        self.stats.io_calls += 1;
        self.poll
            .registry()
            .register(&mut SourceFd(&raw), Token(slot), interest)?;
        readiness.registered = true;
        Ok(())
    }
}

/// A socket's place in one epoll driver: its readiness slot, released when the socket
/// goes. Made when the socket is first used on a runtime.
pub(crate) struct Registration {
    driver: Handle,
    slot: usize,
    raw: RawFd,
    /// The socket left the driver ([`Registration::release`]): the slot may belong to
    /// another socket now.
    released: std::cell::Cell<bool>,
}

impl Registration {
    /// Registers `fd` with `driver`, which must be the one driving this thread.
    pub(crate) fn new(driver: &Handle, fd: &FdRef) -> io::Result<Registration> {
        let raw = fd.raw();
        let slot = driver.with(|d| -> io::Result<usize> {
            let slot = d.slots.insert(Readiness {
                // Unknown until a call says EAGAIN: try first.
                ready: [true, true],
                waiters: Default::default(),
                registered: false,
            });
            if let Err(err) = d.add_to_epoll(raw, slot) {
                d.slots.remove(slot);
                return Err(err);
            }
            Ok(slot)
        })??;
        Ok(Registration {
            driver: driver.clone(),
            slot,
            raw,
            released: std::cell::Cell::new(false),
        })
    }

    pub(crate) fn driver(&self) -> &Handle {
        &self.driver
    }

    /// Counts one data-path system call made on this socket.
    pub(crate) fn count_io_call(&self) {
        let _ = self.driver.with(|d| d.stats.io_calls += 1);
    }

    /// Ready when `direction` may be ready; else keeps the task's waker for the next
    /// edge. The misuse error where this driver does not run.
    pub(crate) fn poll_ready(
        &self,
        direction: Direction,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        // Released, the slot may be another socket's now: neither its readiness nor the
        // descriptor may be used any more (a read woken by the release must not go on).
        if self.released.get() {
            return Poll::Ready(Err(released()));
        }
        let index = direction as usize;
        let (slot, raw) = (self.slot, self.raw);
        let outcome = self.driver.with(|d| {
            match d.slots.get(slot) {
                None => return Ok(true),
                Some(readiness) if readiness.ready[index] => return Ok(true),
                Some(_) => {}
            }
            // About to wait: the socket must be in the epoll set.
            d.add_to_epoll(raw, slot)?;
            let Some(readiness) = d.slots.get_mut(slot) else {
                return Ok(true);
            };
            let waiters = &mut readiness.waiters[index];
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Ok(false)
        });
        match outcome {
            Ok(Ok(true)) => Poll::Ready(Ok(())),
            Ok(Ok(false)) => Poll::Pending,
            Ok(Err(err)) | Err(err) => Poll::Ready(Err(err)),
        }
    }

    /// Takes the socket out of the epoll set until a task next waits on it (`poll_ready`
    /// puts it back). While it is in the set, the kernel calls epoll's wake-up for every
    /// datagram queued on it, on the sending side's core; a receiver draining a burst
    /// does not need those calls. Both directions count as ready meanwhile (calls are
    /// tried first). Does nothing while a task waits on the socket.
    pub(crate) fn suspend_events(&self) {
        if self.released.get() {
            return;
        }
        let (slot, raw) = (self.slot, self.raw);
        let _ = self.driver.with(|d| {
            let Some(readiness) = d.slots.get_mut(slot) else {
                return;
            };
            if !readiness.registered || readiness.waiters.iter().any(|w| !w.is_empty()) {
                return;
            }
            d.stats.io_calls += 1;
            if d.poll.registry().deregister(&mut SourceFd(&raw)).is_ok() {
                readiness.registered = false;
                readiness.ready = [true, true];
            }
        });
    }

    /// Records that a call on the socket said EAGAIN: wait for the next edge before
    /// trying again.
    pub(crate) fn clear_ready(&self, direction: Direction) {
        if self.released.get() {
            return;
        }
        let slot = self.slot;
        let _ = self.driver.with(|d| {
            if let Some(readiness) = d.slots.get_mut(slot) {
                readiness.ready[direction as usize] = false;
            }
        });
    }

    /// Runs the non-blocking call `attempt` until it does not say `EAGAIN`, waiting for
    /// `direction` readiness in between. Counts each attempt as a system call.
    pub(crate) async fn retry<T>(
        &self,
        direction: Direction,
        attempt: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        self.retry_until(direction, attempt, |_| None).await
    }

    /// [`retry`](Self::retry), giving up with `stop`'s error when it gives one while
    /// the call waits for readiness. Nothing is in flight in the kernel between
    /// attempts, so giving up loses nothing.
    pub(crate) async fn retry_until<T>(
        &self,
        direction: Direction,
        mut attempt: impl FnMut() -> io::Result<T>,
        mut stop: impl FnMut(&mut Context<'_>) -> Option<io::Error>,
    ) -> io::Result<T> {
        loop {
            poll_fn(|cx| match self.poll_ready(direction, cx) {
                Poll::Pending => stop(cx).map_or(Poll::Pending, |why| Poll::Ready(Err(why))),
                ready => ready,
            })
            .await?;
            self.count_io_call();
            match attempt() {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.clear_ready(direction),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl Registration {
    /// Takes the socket out of this driver for good, for a socket leaving it: out of the
    /// epoll set (its descriptor stays open, so the kernel would keep it there), its
    /// slot forgotten, and tasks still waiting woken so they see it is gone.
    pub(crate) fn release(&self) -> io::Result<()> {
        if self.released.get() {
            return Ok(());
        }
        let (slot, raw) = (self.slot, self.raw);
        // Nothing changes unless all of it succeeds: a release that failed (the driver
        // busy, the deregistration refused) leaves the socket working here.
        let removed = self.driver.with(|d| -> io::Result<Option<Readiness>> {
            let Some(registered) = d.slots.get(slot).map(|readiness| readiness.registered) else {
                return Ok(None);
            };
            if registered {
                d.stats.io_calls += 1;
                d.poll.registry().deregister(&mut SourceFd(&raw))?;
            }
            Ok(d.slots.try_remove(slot))
        })??;
        self.released.set(true);
        if let Some(readiness) = removed {
            readiness.wake_all();
        }
        Ok(())
    }
}

/// The error for an operation on a socket that left this driver.
fn released() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "the socket was detached from this handle (handed to another runtime or process)",
    )
}

impl Drop for Registration {
    /// Forgets the socket's readiness; the kernel removes a closed descriptor from epoll
    /// by itself. A task still waiting is woken, so it sees the socket is gone.
    fn drop(&mut self) {
        if self.released.get() {
            return;
        }
        let removed = match self.driver.borrow() {
            Ok(mut d) => d.slots.try_remove(self.slot),
            // Dropped by a waker the driver called: forgotten at the end of its turn.
            Err(_) => {
                self.driver.dropped_in_dispatch.borrow_mut().push(self.slot);
                None
            }
        };
        if let Some(readiness) = removed {
            readiness.wake_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    #[test]
    fn a_registration_dropped_while_the_driver_wakes_tasks_is_forgotten_after_the_turn() {
        let driver = Shared::start().unwrap();
        let _current = current::enter(driver.id());
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = FdRef::new(OwnedFd::from(socket));
        let registration = Registration::new(&driver, &fd).unwrap();
        assert_eq!(driver.driver.borrow().slots.len(), 1);
        {
            // As inside `wait_events`, where the wakers it calls run.
            let _busy = driver.borrow().unwrap();
            drop(registration);
        }
        assert_eq!(driver.driver.borrow().slots.len(), 1);
        driver.forget_dropped();
        assert!(driver.driver.borrow().slots.is_empty());
    }
}
