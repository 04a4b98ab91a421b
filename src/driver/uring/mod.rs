//! The io_uring engine.
//!
//! # Memory safety
//!
//! The kernel reads and writes an operation's memory (buffers, socket addresses, `msghdr`s,
//! iovec arrays) after the submitting call has returned, until that operation's completion
//! queue entry (CQE) arrives. Rust's ownership cannot see the kernel, so this module
//! upholds one invariant by hand:
//!
//! > Everything an SQE points to is owned by the operation table entry for that SQE (or by
//! > the future that owns that entry) from the moment the SQE is pushed until its last CQE
//! > has been reaped.
//!
//! - [`Op`] owns its data in a `Box` (so pointers in the SQE survive moves of the future)
//!   and a slot in the driver's [`Slab`] of lifecycles, keyed by the SQE's `user_data`.
//! - When the future is dropped before completion, its data moves into the slot as
//!   `Lifecycle::Ignored`, an async cancel is submitted, and the data is freed only when
//!   the final CQE for that slot arrives. The data includes a clone of the [`SharedFd`],
//!   so the descriptor is not closed (and its number not reused) while the kernel uses it.
//! - When the driver itself is dropped, it cancels every operation in flight and waits for
//!   all their completions before the table is freed; if the kernel refuses to tell, the
//!   table is leaked rather than freed under it.
//! - Provided buffer rings (multishot receives) add one rule, written out in
//!   [`buf_ring`]: ring and buffer memory stay mapped while an op may select from the
//!   group, and are unmapped only after the group is unregistered; a buffer returns to
//!   the ring only when the datagram that holds it is dropped.
//!
//! [`SharedFd`]: crate::driver::SharedFd

#![allow(unsafe_code)]

use std::any::Any;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use slab::Slab;

use super::{DriverConfig, DriverStats, Unparker};

pub(crate) mod buf_ring;
pub(crate) mod datagram;
pub(crate) mod net;
mod op;

pub(crate) use op::{ChainOp, MultiOp, Op};

/// `user_data` of async-cancel SQEs: their completions carry nothing we wait for.
const CANCEL_TOKEN: u64 = u64::MAX;
/// `user_data` of the read on the wake-up eventfd.
const WAKE_TOKEN: u64 = u64::MAX - 1;

/// What the kernel returned for one SQE.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    /// The CQE's `res`: a count or a descriptor when non-negative, `-errno` otherwise.
    pub(crate) result: i32,
    pub(crate) flags: u32,
}

impl Completion {
    /// The one place a CQE result becomes an error. Special cases callers rely on:
    /// `ECANCELED` means the operation was cancelled or a linked chain was cut after an
    /// earlier entry failed; `ENOBUFS` on a buffer-select receive means the provided buffer
    /// ring is empty.
    pub(crate) fn into_result(self) -> io::Result<u32> {
        if self.result >= 0 {
            Ok(self.result as u32)
        } else {
            Err(io::Error::from_raw_os_error(-self.result))
        }
    }

    /// True when a multishot operation will post more completions.
    pub(crate) fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

enum Lifecycle {
    /// Submitted; the waker of the future waiting for it, once it has been polled.
    Pending(Option<Waker>),
    /// The (single) completion arrived before the future came back for it.
    Completed(Completion),
    /// A multishot operation: completions queue up until the future takes them.
    Multi {
        queue: VecDeque<Completion>,
        waker: Option<Waker>,
        finished: bool,
    },
    /// The future was dropped: the data waits here for the final CQE.
    Ignored {
        _data: Box<dyn Any>,
        /// Results are descriptors (multishot accept) that nobody will take: close them.
        close_results: bool,
    },
}

/// The io_uring driver of one runtime.
pub(crate) struct Driver {
    ring: IoUring,
    ops: Slab<Lifecycle>,
    stats: DriverStats,
    wake_fd: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    wake_armed: bool,
    /// The ring's setup flags, for diagnostics.
    setup: &'static str,
    /// Provided buffer groups and the rings waiting to be unregistered.
    buf_rings: buf_ring::Registry,
}

impl Driver {
    /// Sets the ring up with the best flags the kernel accepts and checks that every opcode
    /// ringsock uses is there.
    pub(crate) fn new(config: DriverConfig) -> io::Result<Driver> {
        let entries = config.ring_entries.max(8);
        let (ring, setup) = build_ring(entries)?;
        probe_opcodes(&ring)?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        let wake_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Driver {
            ring,
            ops: Slab::with_capacity(256),
            stats: DriverStats::default(),
            wake_fd,
            wake_buf: Box::new(0),
            wake_armed: false,
            setup,
            buf_rings: buf_ring::Registry::new(),
        })
    }

    /// Ring setup flags in use ("single-issuer+defer-taskrun", "coop-taskrun" or "plain").
    #[allow(dead_code)]
    pub(crate) fn setup_flags(&self) -> &'static str {
        self.setup
    }

    pub(crate) fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Counts a data-path system call made directly, outside the ring (sendmmsg for
    /// mixed-size datagram batches).
    pub(crate) fn count_io_call(&mut self) {
        self.stats.io_calls += 1;
    }

    /// Takes the wakers of every operation in flight (see `super::Driver::take_wakers`).
    pub(crate) fn take_wakers(&mut self) -> Vec<Waker> {
        let mut wakers = Vec::new();
        for (_, state) in self.ops.iter_mut() {
            if let Lifecycle::Pending(waker) | Lifecycle::Multi { waker, .. } = state {
                wakers.extend(waker.take());
            }
        }
        wakers
    }

    pub(crate) fn unparker(&self) -> Unparker {
        Unparker::EventFd(self.wake_fd.clone())
    }

    /// Pushes one SQE and returns its slot; the SQE's `user_data` is set here.
    ///
    /// # Safety
    ///
    /// Everything `entry` points to must stay valid until the slot's final completion has
    /// been reaped: the caller hands it to an [`Op`] (or keeps it in the slot as
    /// `Ignored`).
    pub(crate) unsafe fn push(
        &mut self,
        entry: squeue::Entry,
        multishot: bool,
    ) -> io::Result<usize> {
        let slot = self.ops.insert(if multishot {
            Lifecycle::Multi {
                queue: VecDeque::new(),
                waker: None,
                finished: false,
            }
        } else {
            Lifecycle::Pending(None)
        });
        let entry = entry.user_data(slot as u64);
        // SAFETY: the caller guarantees the entry's memory outlives its completion.
        if let Err(err) = unsafe { self.push_entries(std::slice::from_ref(&entry)) } {
            self.ops.remove(slot);
            return Err(err);
        }
        Ok(slot)
    }

    /// Pushes a linked chain all-or-nothing: IO_LINK on every entry but the last, one slot
    /// per entry. The chain must go to the kernel in one submission (a chain ends at each
    /// submit), so it is pushed whole or, when the queue lacks room, after a flush.
    ///
    /// # Safety
    ///
    /// As for [`Driver::push`], for every entry.
    pub(crate) unsafe fn push_chain(
        &mut self,
        entries: &mut [squeue::Entry],
    ) -> io::Result<Vec<usize>> {
        let last = entries.len().saturating_sub(1);
        let mut slots = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter_mut().enumerate() {
            let slot = self.ops.insert(Lifecycle::Pending(None));
            slots.push(slot);
            let mut linked = entry.clone().user_data(slot as u64);
            if i != last {
                linked = linked.flags(squeue::Flags::IO_LINK);
            }
            *entry = linked;
        }
        // SAFETY: the caller guarantees the entries' memory outlives their completions.
        if let Err(err) = unsafe { self.push_entries(entries) } {
            for slot in &slots {
                self.ops.remove(*slot);
            }
            return Err(err);
        }
        Ok(slots)
    }

    /// # Safety
    ///
    /// As for [`Driver::push`].
    unsafe fn push_entries(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
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

    /// Polls a single-shot slot: its completion once it has arrived.
    pub(crate) fn poll_slot(&mut self, slot: usize, cx: &mut Context<'_>) -> Poll<Completion> {
        match self.ops.get_mut(slot) {
            Some(Lifecycle::Completed(completion)) => {
                let completion = *completion;
                self.ops.remove(slot);
                Poll::Ready(completion)
            }
            Some(Lifecycle::Pending(waker)) => {
                set_waker(waker, cx);
                Poll::Pending
            }
            _ => unreachable!("slot {slot} polled in a state it cannot be in"),
        }
    }

    /// Polls a multishot slot: the next completion, or `None` when it has finished (the
    /// slot is then released).
    pub(crate) fn poll_multi(
        &mut self,
        slot: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Completion>> {
        match self.ops.get_mut(slot) {
            Some(Lifecycle::Multi {
                queue,
                waker,
                finished,
            }) => {
                if let Some(completion) = queue.pop_front() {
                    return Poll::Ready(Some(completion));
                }
                if *finished {
                    self.ops.remove(slot);
                    return Poll::Ready(None);
                }
                set_waker(waker, cx);
                Poll::Pending
            }
            _ => unreachable!("multishot slot {slot} polled in a state it cannot be in"),
        }
    }

    /// The future owning `slot` went away: keep `data` until the final CQE and cancel the
    /// op. Returns the data when the kernel is already done with it, for the caller to drop
    /// outside the driver (a drop must never run while the driver is borrowed).
    pub(crate) fn ignore(
        &mut self,
        slot: usize,
        data: Box<dyn Any>,
        close_results: bool,
    ) -> Option<Box<dyn Any>> {
        let state = self.ops.get_mut(slot)?;
        match state {
            Lifecycle::Completed(_) => {
                self.ops.remove(slot);
                Some(data)
            }
            Lifecycle::Multi {
                queue, finished, ..
            } => {
                if close_results {
                    close_descriptors(queue.drain(..));
                }
                if *finished {
                    self.ops.remove(slot);
                    return Some(data);
                }
                *state = Lifecycle::Ignored {
                    _data: data,
                    close_results,
                };
                self.cancel(slot);
                None
            }
            Lifecycle::Pending(_) => {
                *state = Lifecycle::Ignored {
                    _data: data,
                    close_results,
                };
                self.cancel(slot);
                None
            }
            Lifecycle::Ignored { .. } => Some(data),
        }
    }

    /// Asks the kernel to end the operation in `slot` (an AsyncCancel SQE, submitted
    /// with the next `park`); false when the SQE could not be queued. The caller owns
    /// the slot: it has not seen the final CQE.
    pub(crate) fn cancel(&mut self, slot: usize) -> bool {
        let entry = opcode::AsyncCancel::new(slot as u64)
            .build()
            .user_data(CANCEL_TOKEN);
        // SAFETY: an async cancel points to no memory.
        // On failure the op runs to its natural end; its data waits in the slot meanwhile.
        unsafe { self.push_entries(std::slice::from_ref(&entry)) }.is_ok()
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
        // for this read's completion before it is freed (see Drop).
        if unsafe { self.push_entries(std::slice::from_ref(&entry)) }.is_ok() {
            self.wake_armed = true;
        }
    }

    /// Submits queued SQEs and waits, in one `io_uring_enter`, for a completion or the
    /// timeout; then dispatches every completion.
    pub(crate) fn park(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.arm_wake();
        let ready = !self.ring.completion().is_empty();
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
            Some(wait) => {
                let ts = types::Timespec::from(wait);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.stats.enter_calls += 1;
                self.ring.submitter().submit_with_args(1, &args).map(drop)
            }
            None => {
                self.stats.enter_calls += 1;
                self.ring.submit_and_wait(1).map(drop)
            }
        };
        match result {
            Ok(()) => {}
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) => {}
            Err(err) => return Err(err),
        }
        self.reap();
        if self.buf_rings.has_retired() {
            self.drain_retired_rings();
        }
        Ok(())
    }

    /// Collects completions that are ready without waiting: none of the system call's
    /// cost when nothing is pending (the kernel's TASKRUN flag and the CQ ring are read
    /// from shared memory). Returns whether any completion arrived. For spinning.
    pub(crate) fn poll_completions(&mut self) -> io::Result<bool> {
        let sq = self.ring.submission();
        let enter = !sq.is_empty() || sq.taskrun() || sq.cq_overflow();
        drop(sq);
        if enter {
            self.stats.enter_calls += 1;
            match self.ring.submit() {
                Ok(_) => {}
                Err(err) if matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {
                }
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
            ..
        } = self;
        for cqe in ring.completion() {
            let completion = Completion {
                result: cqe.result(),
                flags: cqe.flags(),
            };
            match cqe.user_data() {
                CANCEL_TOKEN => {}
                WAKE_TOKEN => *wake_armed = false,
                slot => complete(ops, slot as usize, completion),
            }
        }
    }
}

fn complete(ops: &mut Slab<Lifecycle>, slot: usize, completion: Completion) {
    let Some(state) = ops.get_mut(slot) else {
        return;
    };
    match state {
        Lifecycle::Pending(waker) => {
            let waker = waker.take();
            *state = Lifecycle::Completed(completion);
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        Lifecycle::Multi {
            queue,
            waker,
            finished,
        } => {
            if !completion.more() {
                *finished = true;
            }
            queue.push_back(completion);
            if let Some(waker) = waker.take() {
                waker.wake();
            }
        }
        Lifecycle::Ignored { close_results, .. } => {
            if *close_results {
                close_descriptors(std::iter::once(completion));
            }
            if !completion.more() {
                ops.remove(slot);
            }
        }
        Lifecycle::Completed(_) => {}
    }
}

fn set_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
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
        // Completions nobody came back for need nothing from the kernel: forget them.
        // Everything else is in flight: ask the kernel to cancel it.
        self.ops.retain(|_, state| match state {
            Lifecycle::Completed(_) => false,
            Lifecycle::Multi { finished, .. } => !*finished,
            Lifecycle::Pending(_) | Lifecycle::Ignored { .. } => true,
        });
        let slots: Vec<usize> = self.ops.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            self.cancel(slot);
        }
        let wake = opcode::AsyncCancel::new(WAKE_TOKEN)
            .build()
            .user_data(CANCEL_TOKEN);
        // SAFETY: an async cancel points to no memory.
        let _ = unsafe { self.push_entries(std::slice::from_ref(&wake)) };
        // The futures of pending slots are gone or will never be polled again: mark them
        // ignored so their final completions release the slots.
        for (_, state) in self.ops.iter_mut() {
            if let Lifecycle::Pending(_) | Lifecycle::Multi { .. } = state {
                *state = Lifecycle::Ignored {
                    _data: Box::new(()),
                    close_results: false,
                };
            }
        }
        while !self.ops.is_empty() || self.wake_armed {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(err) if matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {
                }
                Err(_) => {
                    // The kernel may still hold pointers into the table: never free it.
                    std::mem::forget(std::mem::take(&mut self.ops));
                    std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
                    return;
                }
            }
            self.reap();
        }
        self.close_buf_rings();
    }
}

/// Sets the ring up: SINGLE_ISSUER + DEFER_TASKRUN (Linux 6.1), else COOP_TASKRUN
/// (5.19), else no flags. Measured on a multishot receiver: DEFER_TASKRUN cut its CPU by
/// about a quarter.
/// Applies one combination of setup flags to a ring builder.
type SetupFlags = fn(&mut io_uring::Builder);

fn build_ring(entries: u32) -> io::Result<(IoUring, &'static str)> {
    let cq = entries.saturating_mul(8);
    // TASKRUN_FLAG (5.19) makes the kernel flag pending completion work in the shared
    // SQ ring, so a spinning loop can see it without a system call.
    let attempts: [(&str, SetupFlags); 4] = [
        ("single-issuer+defer-taskrun+taskrun-flag", |b| {
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag();
        }),
        ("single-issuer+defer-taskrun", |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        }),
        ("coop-taskrun+taskrun-flag", |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }),
        ("plain", |_| {}),
    ];
    let mut last = None;
    for (name, flags) in attempts {
        let mut builder = IoUring::builder();
        flags(&mut builder);
        match builder.setup_cqsize(cq).build(entries) {
            Ok(ring) => return Ok((ring, name)),
            Err(err) if is_forbidden(&err) => return Err(err),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no io_uring setup was accepted")))
}

/// Errors that no other flag combination will cure: io_uring is absent or forbidden.
fn is_forbidden(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOMEM)
    )
}

fn probe_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        (opcode::Accept::CODE, "ACCEPT"),
        (opcode::Connect::CODE, "CONNECT"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::Shutdown::CODE, "SHUTDOWN"),
        (opcode::Read::CODE, "READ"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel lacks IORING_OP_{name}"),
            ));
        }
    }
    Ok(())
}

/// Wakes a parked ring from another thread.
pub(crate) fn write_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to a descriptor the Unparker keeps open.
    // EAGAIN (counter saturated) already means a wake is pending.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}
