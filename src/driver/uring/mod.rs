//! The io_uring engine.
//!
//! # Memory safety
//!
//! The kernel reads and writes an operation's memory (buffers, socket addresses, `msghdr`s,
//! iovec arrays) after the submitting call has returned, until that operation's final
//! completion queue entry (CQE) arrives. Rust's ownership cannot see the kernel, so this
//! module upholds one invariant by hand:
//!
//! > Everything an SQE points to is owned by the driver's operation table, in the slot
//! > whose key the SQE carries, from the moment the SQE is pushed until the slot's final
//! > CQE has been reaped.
//!
//! - [`Op`] boxes its data and hands the box to the slot when it pushes the SQE; the
//!   future keeps only the driver's handle and the key. It takes the box back only once
//!   the final CQE is in. A dropped future marks the slot ignored and asks the kernel to
//!   cancel; the slot frees the data when the final CQE arrives.
//! - A key is a slot index and a generation ([`table`]); the generation changes each time
//!   the slot is reused, so a late CQE or an ASYNC_CANCEL never reaches the next user of
//!   the slot.
//! - Every operation holds the handle of the driver it was pushed to, and checks that
//!   this driver is the one driving the thread before it touches the table. Polled
//!   anywhere else, it cancels on its own driver and waits there for its final CQE
//!   ([`Driver::abandon`]) before it gives its buffer back with a `WrongRuntime` error:
//!   it never takes another driver's completion.
//! - [`Driver::shutdown`] (the runtime is dropped) cancels everything in flight and
//!   reaps until nothing is; if the kernel stops answering, the table is leaked rather
//!   than freed under it.
//! - Provided buffer rings (multishot receives) add one rule, written out in
//!   [`buf_ring`]: ring and buffer memory stay mapped while an op may select from the
//!   group, and are unmapped only after the group is unregistered; a buffer returns to
//!   the ring only when the datagram that holds it is dropped.

#![allow(unsafe_code)]

use std::any::Any;
use std::cell::{RefCell, RefMut};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::caps::{Capabilities, Capability};
use super::current::{self, DriverId};
use super::fd::FdRef;
use super::gso::gso_refused;
use super::notify;
use super::stats::DriverStats;
use super::unpark::Unparker;

pub(crate) mod accept;
pub(crate) mod buf_ring;
pub(crate) mod datagram;
pub(crate) mod file;
pub(crate) mod fixed_files;
pub(crate) mod net;
mod op;
pub(crate) mod post_to;
mod probe;
pub(crate) mod recv_tap;
mod recvmsg_out;
mod released;
mod table;
pub(crate) mod tap;

use fixed_files::{FixedFiles, RegisteredFile};
pub(crate) use op::{post, post_many, ChainOp, MultiOp, Op};
pub(crate) use released::Released;
use released::Spares;
pub(crate) use table::Completion;
use table::{Key, Slot, State, Table};
use tap::Tap;

/// `user_data` of async-cancel SQEs: their completions carry nothing we wait for.
const CANCEL_TOKEN: u64 = u64::MAX;
/// `user_data` of the read on the wake-up eventfd.
const WAKE_TOKEN: u64 = u64::MAX - 1;
/// How long one wait for a cancelled operation's final completion may take, and how
/// many such waits [`Driver::abandon`] and [`Driver::shutdown`] make before they give up.
/// Cancelling a socket operation completes at once; the bound only keeps a kernel that
/// stopped answering from hanging the thread.
const REAP_WAIT: Duration = Duration::from_millis(100);
const REAP_ROUNDS: u32 = 100;

/// The setup a driver is built with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) ring_entries: u32,
    /// Capabilities not to use even where the kernel has them.
    pub(crate) disabled: Capabilities,
    /// Register an eventfd the kernel signals on completions (see [`Driver::notify_fd`]).
    pub(crate) notify: bool,
}

/// A runtime's io_uring driver, shared by its runtime, its sockets and their
/// operations (all on one thread).
pub(crate) type Handle = Rc<Shared>;

/// The driver behind a [`Handle`], with its identity.
pub(crate) struct Shared {
    id: DriverId,
    driver: RefCell<Driver>,
    /// Operations dropped while the driver was busy dispatching (by a waker it called):
    /// ignored at the end of that turn, so their cancel goes with the next submission
    /// rather than their descriptors and buffers staying until the driver goes.
    dropped_in_dispatch: RefCell<Vec<(Key, bool)>>,
    /// Wakers of operations polled while the driver was busy dispatching (by a waker it
    /// called): woken at the end of that turn, when a poll can look at their slots.
    polled_in_dispatch: RefCell<Vec<Waker>>,
    /// Slots of the file table let go of while the driver was busy: emptied at the end
    /// of that turn.
    files_to_unregister: RefCell<Vec<u32>>,
}

impl Shared {
    /// Starts a driver (see [`Driver::new`]).
    pub(crate) fn start(config: Config) -> io::Result<Handle> {
        let mut driver = Driver::new(config)?;
        if config.notify && !driver.start_notify()? {
            // Deferred completions do not signal the eventfd on this kernel, so a loop
            // waiting on it would sleep through them: run without DEFER_TASKRUN.
            let config = Config {
                disabled: config.disabled.with(Capability::DeferTaskrun),
                ..config
            };
            driver = Driver::new(config)?;
            driver.start_notify()?;
        }
        Ok(Rc::new(Shared {
            id: DriverId::next(),
            driver: RefCell::new(driver),
            dropped_in_dispatch: RefCell::new(Vec::new()),
            polled_in_dispatch: RefCell::new(Vec::new()),
            files_to_unregister: RefCell::new(Vec::new()),
        }))
    }

    /// Operation `key` was dropped while the driver was busy: it is ignored (see
    /// [`Driver::ignore`]) once the driver is free, by [`ignore_dropped`](Self::ignore_dropped).
    pub(crate) fn ignore_later(&self, key: Key, close_results: bool) {
        self.dropped_in_dispatch
            .borrow_mut()
            .push((key, close_results));
    }

    /// Whether the driver is the one driving this thread and is busy dispatching: a
    /// waker it called is polling one of its operations.
    pub(crate) fn dispatching_here(&self) -> bool {
        current::is_current(self.id) && self.driver.try_borrow_mut().is_err()
    }

    /// An operation was polled while the driver was busy (see
    /// [`dispatching_here`](Self::dispatching_here)): its slot cannot be looked at now,
    /// so `waker` is woken once the driver is free, by
    /// [`after_dispatch`](Self::after_dispatch), and polls it then.
    pub(crate) fn wake_after_dispatch(&self, waker: &Waker) {
        self.polled_in_dispatch.borrow_mut().push(waker.clone());
    }

    /// Ends a turn: ignores the operations dropped while the driver was busy (what the
    /// kernel is done with is dropped here, outside the driver) and wakes the ones
    /// polled meanwhile.
    pub(crate) fn after_dispatch(&self) {
        self.ignore_dropped();
        self.unregister_files_let_go();
        let polled = std::mem::take(&mut *self.polled_in_dispatch.borrow_mut());
        polled.into_iter().for_each(Waker::wake);
    }

    /// Ignores the operations dropped while the driver was busy; what the kernel is
    /// done with is dropped here, outside the driver.
    fn ignore_dropped(&self) {
        let dropped = std::mem::take(&mut *self.dropped_in_dispatch.borrow_mut());
        if dropped.is_empty() {
            return;
        }
        let mut done = Vec::new();
        match self.borrow() {
            Ok(mut d) => done.extend(
                dropped
                    .into_iter()
                    .filter_map(|(key, close_results)| d.ignore(key, close_results)),
            ),
            Err(_) => self.dropped_in_dispatch.borrow_mut().extend(dropped),
        }
        drop(done);
    }

    /// Puts `fd`'s file into the ring's file table (see [`fixed_files`]): none where
    /// the driver is not this thread's or is busy, or the table is full or missing.
    pub(crate) fn register_file(self: &Rc<Self>, fd: &FdRef) -> Option<RegisteredFile> {
        let mut driver = self.checked().ok()?;
        let slot = driver.register_file(fd.raw())?;
        Some(RegisteredFile::new(slot, Rc::downgrade(self)))
    }

    /// Empties `slot` of the file table now, or at the end of the turn when the driver
    /// is busy.
    fn unregister_file(&self, slot: u32) {
        match self.driver.try_borrow_mut() {
            Ok(mut driver) => driver.unregister_file(slot),
            Err(_) => self.files_to_unregister.borrow_mut().push(slot),
        }
    }

    fn unregister_files_let_go(&self) {
        let slots = std::mem::take(&mut *self.files_to_unregister.borrow_mut());
        for slot in slots {
            self.unregister_file(slot);
        }
    }

    pub(crate) fn id(&self) -> DriverId {
        self.id
    }

    /// Runs `f` with the driver, if it is the one driving this thread and still running;
    /// the misuse error otherwise.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Driver) -> R) -> io::Result<R> {
        Ok(f(&mut *self.checked()?))
    }

    /// The driver, if it is the one driving this thread and still running; the misuse
    /// error otherwise.
    pub(crate) fn checked(&self) -> io::Result<RefMut<'_, Driver>> {
        if !current::is_current(self.id) {
            return Err(self.misuse());
        }
        let driver = self.borrow()?;
        if driver.shut_down {
            return Err(current::runtime_gone(self.id));
        }
        Ok(driver)
    }

    /// The driver, wherever this thread stands: for drops, which must release what they
    /// hold whichever runtime runs, and for the runtime itself.
    pub(crate) fn borrow(&self) -> io::Result<RefMut<'_, Driver>> {
        self.driver.try_borrow_mut().map_err(|_| {
            io::Error::new(
                io::ErrorKind::ResourceBusy,
                "the io_uring driver is busy: a waker it is calling used the socket (do \
                     socket work in the task the waker wakes, not in the waker)",
            )
        })
    }

    /// Why this driver cannot be used from here: gone, or not the one running.
    pub(crate) fn misuse(&self) -> io::Error {
        match self.driver.try_borrow() {
            Ok(driver) if driver.shut_down => current::runtime_gone(self.id),
            _ => current::wrong_runtime(self.id),
        }
    }
}

/// The io_uring driver of one runtime.
pub(crate) struct Driver {
    ring: IoUring,
    ops: Table,
    stats: DriverStats,
    wake_fd: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    wake_armed: bool,
    /// The eventfd registered with the ring (IORING_REGISTER_EVENTFD) when another
    /// event loop waits for this driver.
    notify: Option<OwnedFd>,
    /// The ring's setup flags, for diagnostics.
    setup: &'static str,
    caps: Capabilities,
    /// Provided buffer groups and the rings waiting to be unregistered.
    buf_rings: buf_ring::Registry,
    /// Data of operations whose futures were dropped, released by their final CQE, and
    /// the wakers of operations that completed: freed and woken by the runtime after it
    /// lets go of the driver, since a buffer's drop or a program's own waker may run any
    /// code, including code that uses the driver.
    dead: Released,
    /// Room for the next turn's releases, and emptied boxes for posted sends.
    spares: Spares,
    /// The taps that took completions and hold work back for once the completion
    /// queue is read (see [`Tap::flush`]), in the order they took them.
    taps_to_flush: Vec<Rc<dyn Tap>>,
    /// The taps are being flushed: a reap that pushing entries forced (a full queue)
    /// leaves its taps to the flush under way, which keeps the kernel's order.
    flushing_taps: bool,
    /// The ring's file table: sockets that forward by themselves send through it.
    files: FixedFiles,
    /// Every operation was cancelled and reaped: the runtime is gone.
    shut_down: bool,
}

impl Driver {
    /// Sets the ring up with the best flags the kernel accepts, checks that every opcode
    /// ringsock needs is there, and probes the optional capabilities by trying them.
    fn new(config: Config) -> io::Result<Driver> {
        let probed = probe::kernel_capabilities()?;
        let (ring, setup, setup_caps) = probe::build_ring(config.ring_entries, config.disabled)?;
        probe::check_opcodes(&ring)?;
        let caps = Capabilities::from_iter(probed.iter().chain(setup_caps.iter())).intersection(
            Capabilities::from_iter(
                super::caps::Capability::ALL
                    .into_iter()
                    .filter(|cap| !config.disabled.contains(*cap)),
            ),
        );
        let wake_fd = Arc::new(notify::eventfd()?);
        Ok(Driver {
            ring,
            ops: Table::with_capacity(256),
            stats: DriverStats::default(),
            wake_fd,
            wake_buf: Box::new(0),
            wake_armed: false,
            notify: None,
            setup,
            caps,
            buf_rings: buf_ring::Registry::new(),
            dead: Released::default(),
            spares: Spares::default(),
            taps_to_flush: Vec::new(),
            flushing_taps: false,
            files: FixedFiles::default(),
            shut_down: false,
        })
    }

    /// Registers an eventfd the kernel signals when it posts completions, for another
    /// event loop to wait on. Returns false when the ring defers its completions
    /// (DEFER_TASKRUN) and this kernel does not signal the eventfd for them: such a ring
    /// is no use to a loop that sleeps until the eventfd says so.
    fn start_notify(&mut self) -> io::Result<bool> {
        let fd = notify::eventfd()?;
        self.ring.submitter().register_eventfd(fd.as_raw_fd())?;
        self.notify = Some(fd);
        if !self.caps.contains(Capability::DeferTaskrun) {
            return Ok(true);
        }
        self.deferred_completions_signal()
    }

    /// Tries it: a poll is armed on one end of a fresh socket pair, the other end
    /// written, and the registered eventfd read before anything enters the ring to run
    /// deferred work. (A socket, not an eventfd, wakes the poll: an eventfd signalled
    /// from inside another eventfd's wake-up is signalled later, asynchronously.)
    fn deferred_completions_signal(&mut self) -> io::Result<bool> {
        let (target, mut trigger) = std::os::unix::net::UnixStream::pair()?;
        let poll = opcode::PollAdd::new(types::Fd(target.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(CANCEL_TOKEN);
        // SAFETY: a poll points to no memory; `target` stays open until its completion
        // is reaped below.
        unsafe { self.push_entries(std::slice::from_ref(&poll)) }?;
        self.ring.submit()?;
        let notify = self.notify.as_ref().expect("registered by the caller");
        notify::take_count(notify);
        io::Write::write_all(&mut trigger, &[1])?;
        let signalled = notify::take_count(notify) > 0;
        // Runs the deferred work: the poll's completion is posted, and ignored by `reap`.
        for _ in 0..REAP_ROUNDS {
            self.wait(REAP_WAIT)?;
            let done = !self.ring.completion().is_empty();
            self.reap();
            if done {
                break;
            }
        }
        if let Some(notify) = &self.notify {
            notify::take_count(notify);
        }
        Ok(signalled)
    }

    /// A duplicate of the registered eventfd (see [`start_notify`](Self::start_notify)).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn notify_fd(&self) -> io::Result<OwnedFd> {
        match &self.notify {
            Some(fd) => fd.try_clone(),
            None => Err(io::Error::other(
                "this io_uring driver was started without an eventfd to notify",
            )),
        }
    }

    /// Ring setup flags in use, e.g. "single-issuer+defer-taskrun+taskrun-flag".
    pub(crate) fn setup_flags(&self) -> &'static str {
        self.setup
    }

    /// `fd`'s file in a slot of the ring's file table, if there is room.
    fn register_file(&mut self, fd: RawFd) -> Option<u32> {
        if self.shut_down {
            return None;
        }
        self.files.install(&self.ring.submitter(), fd)
    }

    /// Empties `slot`, once every queued entry (some may name it) is submitted.
    fn unregister_file(&mut self, slot: u32) {
        if self.shut_down {
            return;
        }
        for _ in 0..3 {
            if self.ring.submission().is_empty() {
                self.files.remove(&self.ring.submitter(), slot);
                return;
            }
            self.stats.enter_calls += 1;
            if let Err(err) = self.ring.submit() {
                if !is_transient(&err) {
                    break;
                }
            }
        }
        // Entries that may name the slot were not taken: emptying it would fail them.
        // It stays taken, and its file open, until the ring goes.
    }

    /// What this driver found and uses.
    pub(crate) fn capabilities(&self) -> Capabilities {
        self.caps
    }

    pub(crate) fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Most entries one linked chain may have: the submission queue takes a chain whole
    /// or not at all, and a runtime may be built with a queue of a single entry.
    pub(crate) fn max_chain(&self) -> usize {
        self.ring.params().sq_entries() as usize
    }

    /// Counts a data-path system call made directly, outside the ring (sendmmsg for
    /// mixed-size datagram batches).
    pub(crate) fn count_io_call(&mut self) {
        self.stats.io_calls += 1;
    }

    /// Takes the wakers of every operation in flight, for a runtime shutting down:
    /// dropping them lets the tasks waiting on I/O be dropped.
    pub(crate) fn take_wakers(&mut self) -> Vec<Waker> {
        let mut wakers = self.dead.take_wakes();
        for (_, slot) in self.ops.iter_mut() {
            if let State::Pending(waker) | State::Multi { waker, .. } = &mut slot.state {
                wakers.extend(waker.take());
            }
        }
        wakers
    }

    /// Data released and wakers of completed operations since the last call, to be
    /// dropped and woken once the driver is let go.
    pub(crate) fn take_dead(&mut self) -> Released {
        if self.dead.is_empty() {
            // Most turns of a spinning loop complete nothing: no swap, and the caller
            // needs no second borrow of the driver to give the list back.
            return Released::default();
        }
        let spare = self.spares.take_list();
        std::mem::replace(&mut self.dead, spare)
    }

    /// Takes back a list from [`take_dead`](Self::take_dead) once released, so a loop
    /// that releases data every turn (posted sends) grows no new list every turn, and
    /// keeps the posted sends' emptied boxes for the next posts.
    pub(crate) fn give_back_dead(&mut self, emptied: Released) {
        self.spares.keep(emptied);
    }

    /// An emptied box a posted send of a `T` released, for the next post's data.
    pub(crate) fn spare_post_box<T: 'static>(&mut self) -> Option<Box<Option<T>>> {
        self.spares.post_box::<T>()
    }

    pub(crate) fn unparker(&self) -> Unparker {
        Unparker::EventFd(self.wake_fd.clone())
    }

    /// Pushes one SQE whose memory lives in `data`, and gives `data` to a new slot in
    /// `state` (`State::Pending(None)`, or [`State::multi`] for a multishot).
    ///
    /// # Safety
    ///
    /// Everything `entry` points to must be inside `data`'s heap allocation (or outlive
    /// the driver): the slot keeps `data` until the final completion.
    pub(crate) unsafe fn push(
        &mut self,
        entry: squeue::Entry,
        state: State,
        data: Box<dyn Any>,
    ) -> Result<Key, (io::Error, Box<dyn Any>)> {
        let key = self.ops.insert(Slot {
            state,
            data: Some(data),
        });
        let entry = entry.user_data(key.user_data());
        // SAFETY: the entry's memory is in the slot's data (the caller's contract).
        match unsafe { self.push_entries(std::slice::from_ref(&entry)) } {
            Ok(()) => Ok(key),
            Err(err) => {
                let slot = self.ops.remove(key).expect("just inserted");
                Err((err, slot.data.expect("just inserted")))
            }
        }
    }

    /// Pushes a linked chain all-or-nothing: IO_LINK on every entry but the last, one slot
    /// per entry, each slot holding what `data` makes (a clone of the chain's shared
    /// data). The chain goes to the kernel in one submission (a chain ends at each
    /// submit): pushed whole, or after a flush when the queue lacks room.
    ///
    /// # Safety
    ///
    /// Everything the entries point to must be inside the data every slot holds.
    pub(crate) unsafe fn push_chain(
        &mut self,
        entries: &mut [squeue::Entry],
        data: impl Fn() -> Box<dyn Any>,
    ) -> io::Result<Vec<Key>> {
        let last = entries.len().saturating_sub(1);
        let mut keys = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter_mut().enumerate() {
            let key = self.ops.insert(Slot {
                state: State::Pending(None),
                data: Some(data()),
            });
            keys.push(key);
            let mut linked = entry.clone().user_data(key.user_data());
            if i != last {
                linked = linked.flags(squeue::Flags::IO_LINK);
            }
            *entry = linked;
        }
        // SAFETY: every slot holds the data the entries point into.
        if let Err(err) = unsafe { self.push_entries(entries) } {
            for key in &keys {
                self.ops.remove(*key);
            }
            return Err(err);
        }
        Ok(keys)
    }

    /// # Safety
    ///
    /// As for [`Driver::push`].
    unsafe fn push_entries(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        if self.shut_down {
            return Err(io::Error::other("the io_uring driver was shut down"));
        }
        if entries.len() > self.ring.params().sq_entries() as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "chain longer than the submission queue",
            ));
        }
        loop {
            // SAFETY: forwarded from the caller.
            let pushed = unsafe { self.ring.submission().push_multiple(entries) }.is_ok();
            if pushed {
                self.stats.sqes += entries.len() as u64;
                return Ok(());
            }
            self.flush_submissions()?;
        }
    }

    /// Hands every queued SQE to the kernel now, for a send about to be made by a direct
    /// system call: the posted sends queued before it must leave first (a UDP send is
    /// issued as it is submitted).
    pub(crate) fn submit_queued(&mut self) -> io::Result<()> {
        while !self.ring.submission().is_empty() {
            self.flush_submissions()?;
        }
        Ok(())
    }

    /// Hands the queued SQEs to the kernel without waiting, to make room in the queue.
    fn flush_submissions(&mut self) -> io::Result<()> {
        self.stats.enter_calls += 1;
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                // The completion queue is full: take completions so the kernel can go on.
                self.reap();
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Polls a single-shot slot: its completion and data once the completion arrived
    /// (the slot is then released).
    pub(crate) fn poll_single(
        &mut self,
        key: Key,
        cx: &mut Context<'_>,
    ) -> Poll<(Completion, Box<dyn Any>)> {
        let slot = self
            .ops
            .get_mut(key)
            .expect("an operation's slot lives until its future takes it back");
        match &mut slot.state {
            State::Completed(completion) => {
                let completion = *completion;
                let slot = self.ops.remove(key).expect("present above");
                Poll::Ready((completion, slot.data.expect("kept until taken")))
            }
            State::Pending(waker) => {
                set_waker(waker, cx);
                Poll::Pending
            }
            _ => unreachable!("a single-shot slot is pending or completed"),
        }
    }

    /// Polls a multishot slot: the next completion, or `None` when it has finished (the
    /// slot is then released). With `keep_when_drained`, a completion that leaves none
    /// queued and the operation running also keeps `cx`'s waker for the next one (the
    /// flag beside it says so).
    pub(crate) fn poll_multi(
        &mut self,
        key: Key,
        cx: &mut Context<'_>,
        keep_when_drained: bool,
    ) -> Poll<Option<(Completion, bool)>> {
        let slot = self
            .ops
            .get_mut(key)
            .expect("a multishot slot lives until its future saw the end");
        let State::Multi {
            queue,
            waker,
            armed,
            finished,
            ..
        } = &mut slot.state
        else {
            unreachable!("a multishot slot is in the Multi state");
        };
        if let Some(completion) = queue.pop_front() {
            let kept = keep_when_drained && queue.is_empty() && !*finished;
            if kept {
                set_waker(waker, cx);
                *armed = true;
            }
            return Poll::Ready(Some((completion, kept)));
        }
        if *finished {
            let slot = self.ops.remove(key).expect("present above");
            if let Some(data) = slot.data {
                self.dead.push(data);
            }
            return Poll::Ready(None);
        }
        set_waker(waker, cx);
        *armed = true;
        Poll::Pending
    }

    /// The future owning `key` went away: the slot keeps the data until the final CQE,
    /// and the kernel is asked to cancel. Returns the data when the kernel is already
    /// done with it, for the caller to drop after it lets go of the driver.
    pub(crate) fn ignore(&mut self, key: Key, close_results: bool) -> Option<Box<dyn Any>> {
        let slot = self.ops.get_mut(key)?;
        match &mut slot.state {
            State::Multi { queue, .. } if close_results => close_descriptors(queue.drain(..)),
            State::Completed(completion) if close_results => {
                close_descriptors(std::iter::once(*completion))
            }
            _ => {}
        }
        if !slot.state.in_flight() {
            return self.ops.remove(key).and_then(|slot| slot.data);
        }
        slot.state = State::Ignored { close_results };
        self.cancel(key);
        None
    }

    /// Asks the kernel to end the operation at `key` (an ASYNC_CANCEL SQE, submitted with
    /// the next `park`); false when the SQE could not be queued. The caller owns the key:
    /// its slot has not seen the final CQE.
    pub(crate) fn cancel(&mut self, key: Key) -> bool {
        let entry = opcode::AsyncCancel::new(key.user_data())
            .build()
            .user_data(CANCEL_TOKEN);
        // SAFETY: an async cancel points to no memory.
        // On failure the op runs to its natural end; its data waits in the slot meanwhile.
        unsafe { self.push_entries(std::slice::from_ref(&entry)) }.is_ok()
    }

    /// Ends the operation at `key` now, for a future polled where its driver does not
    /// run: cancels it, then waits on this ring (a bounded number of times) for its final
    /// CQE, reaping and dispatching everything else that arrives meanwhile (a descriptor
    /// its completion carries is closed when `close_result`). Returns the slot's data, or `None` if the kernel never gave it back (the data then stays in the
    /// table, which is never freed under the kernel).
    pub(crate) fn abandon(&mut self, key: Key, close_result: bool) -> Option<Box<dyn Any>> {
        let mut asked = false;
        for _ in 0..REAP_ROUNDS {
            match self.ops.get_mut(key) {
                None => return None,
                Some(slot) if !slot.state.in_flight() => break,
                Some(_) => {}
            }
            if self.shut_down {
                return None;
            }
            if !asked {
                asked = self.cancel(key);
            }
            let _ = self.wait(REAP_WAIT);
            self.reap();
        }
        let slot = self.ops.get_mut(key)?;
        match slot.state {
            _ if slot.state.in_flight() => return None,
            State::Completed(completion) if close_result => {
                close_descriptors(std::iter::once(completion))
            }
            _ => {}
        }
        self.ops.remove(key).and_then(|slot| slot.data)
    }

    /// Cancels every operation in flight on descriptor `fd` and reaps until the kernel
    /// has given them all back (their futures see `ECANCELED`), for a socket leaving
    /// this driver: nothing of this ring may read from it or write for it afterwards.
    /// Synchronous (IORING_REGISTER_SYNC_CANCEL, Linux 6.0), else an ASYNC_CANCEL of
    /// every request on the descriptor (5.19) and a bounded wait for its completion.
    pub(crate) fn cancel_fd(&mut self, fd: RawFd) -> io::Result<()> {
        // An operation queued this round is not the kernel's yet: a cancel would miss it
        // and the next park would submit it, so it would go on using the socket after it
        // left. Hand the queue over first (a full completion queue is reaped and retried).
        while !self.ring.submission().is_empty() {
            self.flush_submissions()?;
        }
        let all = || types::CancelBuilder::fd(types::Fd(fd)).all();
        let synced = self
            .ring
            .submitter()
            .register_sync_cancel(Some(types::Timespec::from(REAP_WAIT * REAP_ROUNDS)), all());
        match synced {
            Ok(()) => {}
            // Nothing was in flight on it.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                let entry = opcode::AsyncCancel2::new(all())
                    .build()
                    .user_data(CANCEL_TOKEN);
                // SAFETY: an async cancel points to no memory.
                unsafe { self.push_entries(std::slice::from_ref(&entry)) }?;
                // Enough rounds for the cancel and the completions it causes to arrive.
                for _ in 0..3 {
                    self.wait(REAP_WAIT)?;
                    self.reap();
                }
            }
            Err(err) => return Err(err),
        }
        // Post whatever the cancels completed (deferred task work runs here).
        let _ = self.wait(Duration::ZERO);
        self.reap();
        Ok(())
    }

    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let buf: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        // SAFETY: `wake_buf` and `wake_fd` live as long as the driver, and the driver waits
        // for this read's completion before it is freed (see `shutdown`).
        if unsafe { self.push_entries(std::slice::from_ref(&entry)) }.is_ok() {
            self.wake_armed = true;
        }
    }

    /// Submits and waits up to `wait` for one completion, without dispatching.
    fn wait(&mut self, wait: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(wait);
        let args = types::SubmitArgs::new().timespec(&ts);
        self.stats.enter_calls += 1;
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(err) if is_transient(&err) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Submits queued SQEs and waits, in one `io_uring_enter`, for a completion or the
    /// timeout; then dispatches every completion.
    pub(crate) fn park(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if self.shut_down {
            return Err(io::Error::other("the io_uring driver was shut down"));
        }
        self.arm_wake();
        let ready = !self.ring.completion().is_empty() || self.dead.has_wakes();
        let timeout = if ready { Some(Duration::ZERO) } else { timeout };
        let result = match timeout {
            Some(wait) if wait.is_zero() => {
                let mut sq = self.ring.submission();
                let needed = !sq.is_empty() || sq.taskrun() || sq.cq_overflow();
                sq.sync();
                drop(sq);
                if needed {
                    self.stats.enter_calls += 1;
                    self.ring.submit().map(drop)
                } else {
                    Ok(())
                }
            }
            Some(wait) => self.wait(wait),
            None => {
                self.stats.enter_calls += 1;
                self.ring.submit_and_wait(1).map(drop)
            }
        };
        match result {
            Ok(()) => {}
            Err(err) if is_transient(&err) => {}
            Err(err) => return Err(err),
        }
        self.reap();
        if self.buf_rings.has_retired() {
            self.drain_retired_rings();
        }
        Ok(())
    }

    /// For a loop driven from outside: submits what is queued and collects what is there,
    /// without waiting. Enters the ring (with GETEVENTS, which runs deferred completion
    /// work) when `collect` says the eventfd was signalled, when entries are queued, or
    /// when the kernel flags pending work. True when completions arrived.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn turn(&mut self, collect: bool) -> io::Result<bool> {
        if self.shut_down {
            return Ok(false);
        }
        self.arm_wake();
        let mut sq = self.ring.submission();
        let enter = collect || !sq.is_empty() || sq.taskrun() || sq.cq_overflow();
        sq.sync();
        drop(sq);
        if enter {
            self.wait(Duration::ZERO)?;
        }
        let any = !self.ring.completion().is_empty();
        if any {
            self.reap();
        }
        if self.buf_rings.has_retired() {
            self.drain_retired_rings();
        }
        Ok(any)
    }

    /// Collects completions that are ready without waiting: none of the system call's
    /// cost when nothing is pending (the kernel's TASKRUN flag and the CQ ring are read
    /// from shared memory). Returns whether any completion arrived. For spinning.
    pub(crate) fn poll_completions(&mut self) -> io::Result<bool> {
        if self.shut_down {
            return Ok(false);
        }
        let sq = self.ring.submission();
        let enter = !sq.is_empty() || sq.taskrun() || sq.cq_overflow();
        drop(sq);
        if enter {
            self.stats.enter_calls += 1;
            match self.ring.submit() {
                Ok(_) => {}
                Err(err) if is_transient(&err) => {}
                Err(err) => return Err(err),
            }
        }
        if self.ring.completion().is_empty() {
            return Ok(false);
        }
        self.reap();
        Ok(true)
    }

    fn reap(&mut self) {
        let Driver {
            ring,
            ops,
            wake_armed,
            dead,
            taps_to_flush,
            ..
        } = self;
        // Multishots that reached their queue limit; rare, so no allocation otherwise.
        let mut to_pause = Vec::new();
        for cqe in ring.completion() {
            let completion = Completion {
                result: cqe.result(),
                flags: cqe.flags(),
            };
            match cqe.user_data() {
                CANCEL_TOKEN => {}
                WAKE_TOKEN => *wake_armed = false,
                user_data => {
                    let key = Key::from_user_data(user_data);
                    if complete(ops, dead, taps_to_flush, key, completion) == Reaped::Pause {
                        to_pause.push(key);
                    }
                }
            }
        }
        for key in to_pause {
            // The cancel goes in with the next submission. Completions the kernel posts
            // before it lands still queue; where the cancel could not be queued, the next
            // completion asks again.
            if !self.cancel(key) {
                if let Some(Slot {
                    state: State::Multi { paused, .. },
                    ..
                }) = self.ops.get_mut(key)
                {
                    *paused = false;
                }
            }
        }
        self.flush_taps();
    }

    /// Lets the taps that took completions do what they held back, in the order they
    /// took them.
    fn flush_taps(&mut self) {
        if self.flushing_taps || self.taps_to_flush.is_empty() {
            return;
        }
        self.flushing_taps = true;
        let mut flushing = Vec::new();
        // A flush that had to make room in the submission queue may have reaped more.
        while !self.taps_to_flush.is_empty() {
            std::mem::swap(&mut flushing, &mut self.taps_to_flush);
            for tap in flushing.drain(..) {
                tap.flush(self);
            }
        }
        // The room back for the next reap.
        self.taps_to_flush = flushing;
        self.flushing_taps = false;
    }

    /// Hands multishot `key`'s completions that carry a value to `tap` from now on.
    pub(crate) fn set_tap(&mut self, key: Key, new: Rc<dyn Tap>) {
        if let Some(Slot {
            state: State::Multi { tap, .. },
            ..
        }) = self.ops.get_mut(key)
        {
            *tap = Some(new);
        }
    }

    /// Completions of multishot `key` waiting to be taken that carry a value (a count or
    /// a descriptor), not an error.
    pub(crate) fn multi_values_waiting(&mut self, key: Key) -> Option<usize> {
        match &self.ops.get_mut(key)?.state {
            State::Multi { queue, .. } => {
                Some(queue.iter().filter(|done| done.result >= 0).count())
            }
            _ => None,
        }
    }

    /// How many completions a multishot's slot holds untaken, and whether the kernel
    /// has ended the operation; `None` once the slot is gone.
    pub(crate) fn multi_status(&mut self, key: Key) -> Option<(usize, bool)> {
        match &self.ops.get_mut(key)?.state {
            State::Multi {
                queue, finished, ..
            } => Some((queue.len(), *finished)),
            _ => None,
        }
    }

    /// The runtime is going: cancels every operation in flight and reaps until the kernel
    /// holds nothing of this driver's, then unregisters the buffer rings. Futures that
    /// outlive this find their data in their slots and a "runtime dropped" error. If the
    /// kernel stops answering, the table and the wake buffer are leaked, never freed.
    pub(crate) fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        for key in self.ops.in_flight() {
            self.cancel(key);
        }
        let wake = opcode::AsyncCancel::new(WAKE_TOKEN)
            .build()
            .user_data(CANCEL_TOKEN);
        // SAFETY: an async cancel points to no memory.
        let _ = unsafe { self.push_entries(std::slice::from_ref(&wake)) };
        let mut rounds = 0;
        while !self.ops.in_flight().is_empty() || self.wake_armed {
            rounds += 1;
            if rounds > REAP_ROUNDS || self.wait(REAP_WAIT).is_err() {
                // The kernel may still hold pointers into the table: never free it.
                std::mem::forget(std::mem::take(&mut self.ops));
                std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
                break;
            }
            self.reap();
            // Cancels queued while the submission queue was full go in now.
            if rounds % 8 == 0 {
                for key in self.ops.in_flight() {
                    self.cancel(key);
                }
            }
        }
        self.close_buf_rings();
        self.files.close(&self.ring.submitter());
        self.shut_down = true;
    }
}

/// What reaping one completion asks of the driver.
#[derive(Debug, PartialEq, Eq)]
enum Reaped {
    Done,
    /// A multishot reached its queue limit: cancel it.
    Pause,
}

fn complete(
    ops: &mut Table,
    dead: &mut Released,
    taps_to_flush: &mut Vec<Rc<dyn Tap>>,
    key: Key,
    completion: Completion,
) -> Reaped {
    let Some(slot) = ops.get_mut(key) else {
        return Reaped::Done;
    };
    let mut reaped = Reaped::Done;
    let release = match &mut slot.state {
        State::Pending(waker) => {
            let waker = waker.take();
            slot.state = State::Completed(completion);
            if let Some(waker) = waker {
                dead.push_wake(waker);
            }
            false
        }
        State::Multi {
            queue,
            waker,
            armed,
            finished,
            queue_limit,
            paused,
            tap,
        } => {
            if !completion.more() {
                *finished = true;
            }
            if let (Some(tap), true) = (tap.as_ref(), completion.result >= 0) {
                let taken = tap.take(completion);
                if taken.holds {
                    list_to_flush(taps_to_flush, tap);
                }
                // The last completion wakes the owner whatever it carried: the operation
                // has ended (a full completion queue or an empty datagram ends a
                // multishot receive with a datagram) and waits for its owner to see
                // that and start another.
                let wake = taken.wake || *finished;
                if let (Some(waker), true) = (waker.as_ref(), wake && std::mem::take(armed)) {
                    dead.push_wake(waker.clone());
                }
                return reaped;
            }
            let end_of_pause = *paused && *finished && completion.result == -libc::ECANCELED;
            if !end_of_pause {
                queue.push_back(completion);
            }
            if !*finished && !*paused && queue.len() >= *queue_limit {
                *paused = true;
                reaped = Reaped::Pause;
            }
            // Also at the end of a pause: the owner may be waiting to arm a new one. The
            // waker stays for the next poll: a receive polled after each datagram would
            // otherwise clone it back every time (its owner's next poll replaces it if it
            // changed). Only a waiting one wakes, once until a poll waits again.
            if let (Some(waker), true) = (waker.as_ref(), std::mem::take(armed)) {
                dead.push_wake(waker.clone());
            }
            false
        }
        State::Ignored { close_results } => {
            if *close_results {
                close_descriptors(std::iter::once(completion));
            }
            !completion.more()
        }
        State::Posted {
            ledger,
            datagrams,
            refused_to,
            empty,
        } => {
            if let Some(tap) = refused_to.take() {
                let refused = io::Error::from_raw_os_error(-completion.result);
                if *datagrams > 1 && completion.result < 0 && gso_refused(&refused) {
                    ledger.note_gso_refused();
                    if let Some(data) = ops.remove(key).and_then(|slot| slot.data) {
                        tap.refused(data);
                        list_to_flush(taps_to_flush, &tap);
                    }
                    return reaped;
                }
            }
            ledger.settle_gso_waking(completion.result, *datagrams, &mut |waker| {
                dead.push_wake(waker)
            });
            let empty = *empty;
            if let Some(data) = ops.remove(key).and_then(|slot| slot.data) {
                dead.push_post(data, empty);
            }
            return reaped;
        }
        State::Completed(_) => false,
    };
    if release {
        if let Some(data) = ops.remove(key).and_then(|slot| slot.data) {
            dead.push(data);
        }
    }
    reaped
}

/// Lists `tap` to flush at the end of the reap. A tap listed twice flushes nothing the
/// second time; completions of one socket mostly come together, so the last entry tells.
fn list_to_flush(taps_to_flush: &mut Vec<Rc<dyn Tap>>, tap: &Rc<dyn Tap>) {
    let listed = taps_to_flush
        .last()
        .is_some_and(|last| std::ptr::addr_eq(Rc::as_ptr(last), Rc::as_ptr(tap)));
    if !listed {
        taps_to_flush.push(tap.clone());
    }
}

fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Errors of `io_uring_enter` that only mean "look again".
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
    )
}

/// Closes accepted descriptors that no one will take.
fn close_descriptors(completions: impl Iterator<Item = Completion>) {
    for completion in completions {
        if completion.result >= 0 {
            // SAFETY: a non-negative accept result is a new descriptor owned by nobody.
            drop(unsafe { OwnedFd::from_raw_fd(completion.result as RawFd) });
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IORING_CQE_F_MORE (the io_uring crate keeps its constant private).
    /// Results are errors (-1), not descriptors, so nothing here has anything to close.
    const MORE: u32 = 1 << 1;

    /// Reaps `completion` for `key`, no tap involved.
    fn reap_one(ops: &mut Table, dead: &mut Released, key: Key, completion: Completion) -> Reaped {
        complete(ops, dead, &mut Vec::new(), key, completion)
    }

    fn accepted(result: i32, more: bool) -> Completion {
        Completion {
            result,
            flags: if more { MORE } else { 0 },
        }
    }

    /// The results queued in a multishot's slot, and whether it has ended.
    fn queued(ops: &mut Table, key: Key) -> (Vec<i32>, bool) {
        match &ops.get_mut(key).expect("live").state {
            State::Multi {
                queue, finished, ..
            } => (queue.iter().map(|c| c.result).collect(), *finished),
            _ => unreachable!("a multishot slot"),
        }
    }

    #[test]
    fn a_multishot_pauses_once_its_queue_reaches_the_limit() {
        let mut ops = Table::default();
        let mut dead = Released::default();
        let key = ops.insert(Slot {
            state: State::multi(Some(2)),
            data: None,
        });
        assert_eq!(
            reap_one(&mut ops, &mut dead, key, accepted(-1, true)),
            Reaped::Done
        );
        // The second completion reaches the limit: cancel, once.
        assert_eq!(
            reap_one(&mut ops, &mut dead, key, accepted(-1, true)),
            Reaped::Pause
        );
        // What the kernel posts before the cancel lands is kept, without a second cancel.
        assert_eq!(
            reap_one(&mut ops, &mut dead, key, accepted(-1, true)),
            Reaped::Done
        );
        // The cancel's own completion ends it and is not queued.
        assert_eq!(
            reap_one(&mut ops, &mut dead, key, accepted(-libc::ECANCELED, false)),
            Reaped::Done
        );
        assert_eq!(queued(&mut ops, key), (vec![-1, -1, -1], true));
    }

    #[test]
    fn a_multishot_without_a_limit_keeps_everything() {
        let mut ops = Table::default();
        let mut dead = Released::default();
        let key = ops.insert(Slot {
            state: State::multi(None),
            data: None,
        });
        for _ in 0..1000 {
            assert_eq!(
                reap_one(&mut ops, &mut dead, key, accepted(-1, true)),
                Reaped::Done
            );
        }
        // An ECANCELED it did not ask for is the owner's to see.
        reap_one(&mut ops, &mut dead, key, accepted(-libc::ECANCELED, false));
        let (results, ended) = queued(&mut ops, key);
        assert_eq!(
            (results.len(), results.last(), ended),
            (1001, Some(&-libc::ECANCELED), true)
        );
    }
}
