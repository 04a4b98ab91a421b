//! A socket as the layers above the driver hold it: its descriptor and, from its first
//! use on a runtime, its binding to that runtime's driver.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};

use super::activity::Activity;
use super::current::{self, DriverId};
use super::dropped_read::DroppedRead;
use super::fd::FdRef;
use super::handle::{with_current, Driver};
use super::{poll, uring};

/// A socket shared by the handles that use it. The descriptor is closed when the last
/// clone and the last operation on it are gone (see [`FdRef`]).
#[derive(Clone)]
pub(crate) struct SharedFd {
    inner: Rc<Inner>,
}

/// In C order, the fields every operation reads first, so that they share the first
/// cache line: with many sockets each one is visited too rarely to stay cached.
#[repr(C)]
struct Inner {
    /// The socket was taken off its runtime ([`SharedFd::detach`]): this handle no
    /// longer uses it.
    detached: Cell<bool>,
    /// Whether `ended` is set, for the check every operation makes.
    is_ended: Cell<bool>,
    /// This side shut its sending direction down (so EPIPE is ours, not the peer's).
    write_shut: Cell<bool>,
    /// A write stopped part-way because its runtime was dropped: the peer must not take
    /// what it got for the whole stream.
    write_cut: Cell<bool>,
    /// The peer's reset was reported to a call. Linux reports it to one call only, and
    /// a receive after it finds an end of stream: that end is the reset, not the peer's
    /// orderly close.
    reset_seen: Cell<bool>,
    /// Declared before `fd`, so it is dropped first: an epoll registration is released
    /// while its descriptor is still open.
    binding: OnceCell<Binding>,
    fd: FdRef,
    /// Why the connection was ended on this side (a timeout expired, it was aborted):
    /// every operation from then on fails with it. Set once.
    ended: RefCell<Option<crate::Error>>,
    activity: Activity,
    /// Bytes of the connection received before it came to this handle (read ahead by the
    /// handle it was detached from, not yet read by anyone): receives take them first.
    carried: RefCell<Bytes>,
    /// Receives dropped in flight, oldest first (see [`DroppedRead`]).
    dropped_reads: RefCell<VecDeque<Box<dyn DroppedRead>>>,
    /// Stream receives waiting now (a TLS handshake must not start under one: it
    /// would take the handshake's bytes).
    reads_waiting: Cell<u32>,
    /// The error a dropped receive took (after the carried bytes): the next receive's.
    carried_error: RefCell<Option<io::Error>>,
    /// A `write` or `write_all` sends straight to the kernel: an output stream's batch
    /// waits for it, so that its bytes do not land in the middle of the call's.
    direct_write: Cell<bool>,
    /// Output stream senders waiting for the direct write to end.
    after_direct_write: RefCell<Vec<Waker>>,
}

/// A direct write under way on a socket ([`SharedFd::direct_write`]); its drop lets the
/// output streams' batches go.
pub(crate) struct DirectWrite<'a> {
    fd: &'a SharedFd,
}

impl Drop for DirectWrite<'_> {
    fn drop(&mut self) {
        // Dropped while the runtime goes: the write stopped at an await, unfinished (a
        // write that returned did so while its runtime ran), and the rest will never
        // be sent.
        if crate::runtime::dropping() {
            self.fd.inner.write_cut.set(true);
        }
        self.fd.inner.direct_write.set(false);
        let waiting = std::mem::take(&mut *self.fd.inner.after_direct_write.borrow_mut());
        for waker in waiting {
            waker.wake();
        }
    }
}

/// A stream receive under way (see [`SharedFd::reading`]).
pub(crate) struct Reading<'a> {
    fd: &'a SharedFd,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let waiting = &self.fd.inner.reads_waiting;
        waiting.set(waiting.get() - 1);
    }
}

/// The driver a socket belongs to, for its whole life.
pub(crate) enum Binding {
    Uring(uring::Handle),
    Poll(poll::Registration),
}

impl Binding {
    fn id(&self) -> DriverId {
        match self {
            Binding::Uring(driver) => driver.id(),
            Binding::Poll(registration) => registration.driver().id(),
        }
    }

    /// Why this socket cannot be used here: its runtime is not the one running, or
    /// was dropped.
    fn misuse(&self) -> io::Error {
        let checked = match self {
            Binding::Uring(driver) => driver.with(|_| ()),
            Binding::Poll(registration) => registration.driver().with(|_| ()),
        };
        checked
            .err()
            .unwrap_or_else(|| current::wrong_runtime(self.id()))
    }
}

impl SharedFd {
    /// Wraps a new socket. Made while a runtime runs, it belongs to that runtime's
    /// driver from now on (an accepted socket belongs where its listener does); made
    /// outside any runtime, to the first that uses it.
    pub(crate) fn new(fd: OwnedFd) -> SharedFd {
        let socket = SharedFd {
            inner: Rc::new(Inner {
                binding: OnceCell::new(),
                fd: FdRef::new(fd),
                write_shut: Cell::new(false),
                write_cut: Cell::new(false),
                reset_seen: Cell::new(false),
                detached: Cell::new(false),
                ended: RefCell::new(None),
                is_ended: Cell::new(false),
                activity: Activity::new(),
                carried: RefCell::new(Bytes::new()),
                carried_error: RefCell::new(None),
                direct_write: Cell::new(false),
                after_direct_write: RefCell::new(Vec::new()),
                dropped_reads: RefCell::new(VecDeque::new()),
                reads_waiting: Cell::new(0),
            }),
        };
        // Failing here (an epoll registration refused) leaves the socket unbound: its
        // first use tries again and reports the error.
        let _ = socket.binding();
        socket
    }

    /// A handle that does not keep the socket open.
    pub(crate) fn downgrade(&self) -> WeakFd {
        WeakFd(Rc::downgrade(&self.inner))
    }

    /// The socket's traffic clock.
    pub(crate) fn activity(&self) -> &Activity {
        &self.inner.activity
    }

    /// Ends the connection on this side for `why`: from now on every operation fails
    /// with it (operations in flight when their completion comes back; the caller wakes
    /// them, e.g. with a shutdown). False if it was ended already (the first reason stays).
    pub(crate) fn end(&self, why: crate::Error) -> bool {
        if self.inner.is_ended.replace(true) {
            return false;
        }
        *self.inner.ended.borrow_mut() = Some(why);
        true
    }

    /// Why the connection was ended, as the error operations report, if it was.
    /// Whether the connection was ended on this side.
    #[inline]
    pub(crate) fn is_ended(&self) -> bool {
        self.inner.is_ended.get()
    }

    /// Why the connection was ended on this side, as it was said (status and words).
    pub(crate) fn ended_why(&self) -> Option<crate::Error> {
        if !self.inner.is_ended.get() {
            return None;
        }
        self.inner.ended.borrow().clone()
    }

    #[inline]
    pub(crate) fn ended(&self) -> Option<io::Error> {
        if !self.inner.is_ended.get() {
            return None;
        }
        self.inner.ended.borrow().clone().map(io::Error::from)
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.inner.fd.raw()
    }

    /// Whether another handle (a clone) holds this socket too, so dropping this one does
    /// not close it.
    pub(crate) fn is_shared(&self) -> bool {
        Rc::strong_count(&self.inner) > 1
    }

    /// The descriptor, while this handle lives.
    pub(crate) fn borrow_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.fd.borrow()
    }

    /// The descriptor, for operations to keep open while the kernel uses it.
    pub(crate) fn fd(&self) -> &FdRef {
        &self.inner.fd
    }

    /// A borrowed socket2 view, for socket options and addresses.
    pub(crate) fn sock(&self) -> socket2::SockRef<'_> {
        self.inner.fd.sock()
    }

    pub(crate) fn mark_write_shut(&self) {
        self.inner.write_shut.set(true);
    }

    /// Whether a write stopped part-way when its runtime was dropped.
    pub(crate) fn write_cut(&self) -> bool {
        self.inner.write_cut.get()
    }

    /// Counts a stream receive as waiting until the guard is dropped.
    pub(crate) fn reading(&self) -> Reading<'_> {
        self.inner
            .reads_waiting
            .set(self.inner.reads_waiting.get() + 1);
        Reading { fd: self }
    }

    /// Whether a stream receive is waiting now.
    pub(crate) fn is_reading(&self) -> bool {
        self.inner.reads_waiting.get() > 0
    }

    /// Marks a direct write under way until the guard is dropped (see `direct_write`).
    pub(crate) fn direct_write(&self) -> DirectWrite<'_> {
        self.inner.direct_write.set(true);
        DirectWrite { fd: self }
    }

    /// Whether a direct write is under way: a batch must not go out now.
    pub(crate) fn is_direct_write(&self) -> bool {
        self.inner.direct_write.get()
    }

    /// Ready once no direct write is under way.
    pub(crate) fn poll_no_direct_write(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.inner.direct_write.get() {
            return Poll::Ready(());
        }
        let mut waiting = self.inner.after_direct_write.borrow_mut();
        if !waiting.iter().any(|waker| waker.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
        }
        Poll::Pending
    }

    pub(crate) fn is_write_shut(&self) -> bool {
        self.inner.write_shut.get()
    }

    /// Remembers that a call was told of the peer's reset.
    pub(crate) fn mark_reset(&self) {
        self.inner.reset_seen.set(true);
    }

    /// Whether a call was told of the peer's reset.
    pub(crate) fn was_reset(&self) -> bool {
        self.inner.reset_seen.get()
    }

    /// Whether the socket belongs to a runtime that does not run here (or was taken off
    /// its runtime). Unlike [`binding`](Self::binding) it binds nothing: a socket no
    /// runtime has used yet is no other runtime's.
    pub(crate) fn is_elsewhere(&self) -> bool {
        self.inner.detached.get()
            || self
                .inner
                .binding
                .get()
                .is_some_and(|binding| !current::is_current(binding.id()))
    }

    /// The driver this socket belongs to. The first use binds it to the driver of the
    /// runtime running on this thread; after that, using it where another runtime runs
    /// (or none, or after its runtime was dropped) is the `WrongRuntime` error.
    pub(crate) fn binding(&self) -> io::Result<&Binding> {
        if self.inner.detached.get() {
            return Err(detached());
        }
        if let Some(binding) = self.inner.binding.get() {
            if current::is_current(binding.id()) {
                return Ok(binding);
            }
            return Err(binding.misuse());
        }
        let binding = with_current(|driver| match driver {
            Driver::Uring(driver) => Ok(Binding::Uring(driver.clone())),
            Driver::Poll(driver) => {
                poll::Registration::new(driver, &self.inner.fd).map(Binding::Poll)
            }
        })
        .ok_or_else(current::no_runtime)??;
        Ok(self.inner.binding.get_or_init(|| binding))
    }
}

impl SharedFd {
    /// Takes the socket off its runtime: every operation in flight on it there is
    /// cancelled and reaped (io_uring) or its epoll registration removed, this handle and
    /// its clones stop using it (their calls fail; their descriptor number names
    /// /dev/null from then on), and a new descriptor for the same socket comes back,
    /// owned by the caller, for another runtime or process.
    pub(crate) fn detach(&self) -> io::Result<OwnedFd> {
        if self.inner.detached.get() {
            return Err(detached());
        }
        if let Some(binding) = self.inner.binding.get() {
            if !current::is_current(binding.id()) {
                return Err(binding.misuse());
            }
        }
        // The new descriptor first: without one (the process is out of descriptors) the
        // socket stays here, working, instead of leaving with nowhere to go.
        let owned = self.inner.fd.try_clone()?;
        // Never used on a runtime, nothing of any driver's holds it.
        if let Some(binding) = self.inner.binding.get() {
            match binding {
                Binding::Uring(driver) => driver.with(|d| d.cancel_fd(self.raw()))??,
                Binding::Poll(registration) => registration.release()?,
            }
        }
        self.inner.detached.set(true);
        self.inner.fd.let_go();
        Ok(owned)
    }

    /// Keeps a receive dropped in flight (see [`DroppedRead`]). Those already done give
    /// their bytes to the carried ones first, so a program that keeps dropping reads
    /// without reading holds only the ones still in flight.
    pub(crate) fn keep_dropped_read(&self, read: Box<dyn DroppedRead>) {
        let _ = self.poll_dropped_reads(&mut Context::from_waker(Waker::noop()));
        self.inner.dropped_reads.borrow_mut().push_back(read);
    }

    /// Whether a dropped receive may still hold bytes for the next one.
    pub(crate) fn has_dropped_reads(&self) -> bool {
        !self.inner.dropped_reads.borrow().is_empty()
    }

    /// Ready once every dropped receive is done, their bytes, in order, behind the
    /// carried ones.
    pub(crate) fn poll_dropped_reads(&self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            // Out of the cell while polled: the driver may wake tasks meanwhile.
            let Some(mut read) = self.inner.dropped_reads.borrow_mut().pop_front() else {
                return Poll::Ready(());
            };
            match read.poll_taken(cx) {
                Poll::Ready(Ok(bytes)) => {
                    if !bytes.is_empty() {
                        crate::buf::append(&mut self.inner.carried.borrow_mut(), bytes);
                    }
                }
                Poll::Ready(Err(err)) => {
                    if err.raw_os_error() == Some(libc::ECONNRESET) {
                        self.mark_reset();
                    }
                    // A receive after it would not have run: nothing comes after it.
                    self.inner.carried_error.borrow_mut().get_or_insert(err);
                }
                Poll::Pending => {
                    self.inner.dropped_reads.borrow_mut().push_front(read);
                    return Poll::Pending;
                }
            }
        }
    }

    /// Sets the bytes a receive hands out before it asks the kernel (see `carried`).
    pub(crate) fn set_carried(&self, bytes: Bytes) {
        *self.inner.carried.borrow_mut() = bytes;
    }

    /// Moves carried bytes into the spare room of `buf`: how many (0 when none are left).
    pub(crate) fn take_carried<B: crate::buf::IoBufMut>(&self, buf: &mut B) -> usize {
        let mut carried = self.inner.carried.borrow_mut();
        if carried.is_empty() {
            return 0;
        }
        let n = crate::buf::fill_spare(buf, &carried);
        carried.advance(n);
        n
    }

    /// The error a dropped receive took, once the carried bytes are out: the next
    /// receive reports it.
    pub(crate) fn take_carried_error(&self) -> Option<io::Error> {
        if !self.inner.carried.borrow().is_empty() {
            return None;
        }
        self.inner.carried_error.borrow_mut().take()
    }

    /// Puts `bytes` back in front of the carried ones: bytes a reader took from the
    /// socket and never handed out, so the next receive gets them first, in order.
    pub(crate) fn unread(&self, bytes: Bytes) {
        crate::buf::prepend(&mut self.inner.carried.borrow_mut(), bytes);
    }

    /// Every carried byte not received yet, taken out (for a detach, which has reaped
    /// every operation in flight first: the dropped receives are done).
    pub(crate) fn take_all_carried(&self) -> Bytes {
        let mut cx = Context::from_waker(Waker::noop());
        // Pending only if the kernel never gave one back; its bytes cannot come then.
        if self.poll_dropped_reads(&mut cx).is_pending() {
            self.inner.dropped_reads.borrow_mut().clear();
        }
        std::mem::take(&mut *self.inner.carried.borrow_mut())
    }

    /// The socket was detached: it belongs to another runtime or process now, so this
    /// handle must not end it (an abort, a shutdown) on its way out.
    pub(crate) fn is_detached(&self) -> bool {
        self.inner.detached.get()
    }
}

impl SharedFd {
    /// Cancels and reaps this socket's io_uring operations now, so that the descriptor
    /// closes with the last handle rather than when the loop next reaps their final
    /// completions. Best effort: nothing to do on epoll, off the socket's runtime, or
    /// once the socket was detached (its operations were reaped then).
    pub(crate) fn cancel_in_flight(&self) {
        if self.inner.detached.get() {
            return;
        }
        if let Some(Binding::Uring(driver)) = self.inner.binding.get() {
            // A driver that is not this thread's, borrowed, or shut down refuses; its
            // operations then end the usual way.
            let _ = driver.with(|d| d.cancel_fd(self.raw()));
        }
    }
}

impl SharedFd {
    /// [`cancel_in_flight`](Self::cancel_in_flight) when no other handle shares the
    /// socket (an output stream taken from it goes on sending with it).
    pub(crate) fn cancel_in_flight_if_last(&self) {
        if Rc::strong_count(&self.inner) == 1 {
            self.cancel_in_flight();
        }
    }
}

/// The error for a socket handle whose socket was detached.
fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "the socket was detached from this handle (handed to another runtime or process)",
    )
}

/// A [`SharedFd`] that does not keep the socket open (for a watchdog).
pub(crate) struct WeakFd(Weak<Inner>);

impl WeakFd {
    /// The socket, if something still holds it.
    pub(crate) fn upgrade(&self) -> Option<SharedFd> {
        self.0.upgrade().map(|inner| SharedFd { inner })
    }
}

impl fmt::Debug for SharedFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedFd({})", self.raw())
    }
}
