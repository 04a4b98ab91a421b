//! Accepting on io_uring within a bound on connections held for the program (see
//! [`crate::driver::accept`] for the policy): multishot accept where the kernel has it,
//! one ACCEPT per call otherwise.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{net, Handle, MultiOp, Op};
use crate::driver::caps::Capability;
use crate::driver::fd::FdRef;
use crate::driver::sockopt;

/// The accepts in flight on one listener, and the connections they hold.
#[derive(Default)]
pub(crate) struct Acceptor {
    /// Multishot accepts, oldest first. All but the last have ended (paused, or ended by
    /// the kernel) and only hold connections not yet taken; the last may still run.
    multishots: VecDeque<MultiOp>,
    single: Option<Op<FdRef>>,
    /// The `accept` under way may still set aside one shortage of descriptors or memory
    /// that a background accept met before it began (see [`Acceptor::begin`]).
    may_retry_shortage: bool,
}

impl Acceptor {
    /// A program's `accept` begins. A multishot runs on between calls, and one that met
    /// EMFILE (or another shortage) while the program waited out its back-off holds that
    /// error: handed out now, it would say descriptors are short when they may have come
    /// back, and start a longer back-off. So one such held error is set aside, and the
    /// accept asks the kernel again; a shortage met then is reported.
    pub(crate) fn begin(&mut self) {
        self.may_retry_shortage = true;
    }

    /// The connections accepted and not taken, once every completion is in (the
    /// listener's operations were cancelled and reaped).
    pub(crate) fn take_accepted(&mut self, accepted: &mut Vec<OwnedFd>) {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for op in self.multishots.iter_mut() {
            while let Poll::Ready(Ok(Some(completion))) = op.poll_next(&mut cx) {
                accepted.extend(net::accepted(completion).ok());
            }
        }
        if let Some(op) = self.single.as_mut() {
            if let Poll::Ready((Ok(completion), _)) = Pin::new(op).poll(&mut cx) {
                self.single = None;
                accepted.extend(net::accepted(completion).ok());
            }
        }
    }

    /// The next connection, holding at most about `max_pending` for the program.
    pub(crate) fn poll_accept(
        &mut self,
        driver: &Handle,
        fd: &FdRef,
        max_pending: usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<OwnedFd>> {
        match driver.with(|d| d.capabilities().contains(Capability::MultishotAccept)) {
            Err(err) => Poll::Ready(Err(err)),
            Ok(true) => self.poll_bounded(driver, fd, max_pending, cx),
            Ok(false) => self.poll_single(driver, fd, cx),
        }
    }

    /// Connections accepted in the background and not yet taken.
    pub(crate) fn pending(&self) -> usize {
        self.multishots.iter().map(|op| op.status().0).sum()
    }

    /// Connections accepted in the background and not yet taken, as open descriptors: a
    /// failed accept waiting to be reported is not one.
    pub(crate) fn pending_descriptors(&self) -> usize {
        self.multishots.iter().map(|op| op.values_waiting()).sum()
    }

    /// An accept is in flight: a multishot that may take more, or a single ACCEPT.
    pub(crate) fn running(&self) -> bool {
        self.single.is_some() || self.multishots.back().is_some_and(|op| !op.status().1)
    }

    /// Multishot accept within `max_pending` (see the module documentation).
    fn poll_bounded(
        &mut self,
        driver: &Handle,
        fd: &FdRef,
        max_pending: usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<OwnedFd>> {
        // Bounded: the second round finds an accept armed by the first.
        loop {
            if let Err(err) = self.arm_if_due(driver, fd, max_pending) {
                return Poll::Ready(Err(err));
            }
            if let Some(taken) = self.take_held(cx) {
                let shortage = taken.as_ref().is_err_and(|err| {
                    matches!(
                        err.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    )
                });
                if shortage && std::mem::take(&mut self.may_retry_shortage) {
                    continue;
                }
                if taken.is_ok() {
                    // Taking this one may bring the rest down to half: resume now, not
                    // at the next call. A failure shows again at the next call.
                    let _ = self.arm_if_due(driver, fd, max_pending);
                }
                return Poll::Ready(taken);
            }
            if self.single.is_some() {
                return self.poll_single_in_flight(cx);
            }
            if !self.multishots.is_empty() {
                // The running multishot has nothing yet; its next completion wakes us.
                return Poll::Pending;
            }
        }
    }

    /// The oldest connection held, if any (or the error that ended a multishot).
    fn take_held(&mut self, cx: &mut Context<'_>) -> Option<io::Result<OwnedFd>> {
        while let Some(op) = self.multishots.front_mut() {
            match op.poll_next(cx) {
                Poll::Ready(Ok(Some(completion))) => return Some(net::accepted(completion)),
                Poll::Ready(Ok(None)) => {
                    self.multishots.pop_front();
                }
                Poll::Ready(Err(misuse)) => return Some(Err(misuse)),
                // Only the last multishot can still run, so it is the only one left.
                Poll::Pending => return None,
            }
        }
        None
    }

    /// Arms an accept when none runs and the program has taken the held connections
    /// down to half of `max_pending`: a multishot limited to the room left where the
    /// kernel's accept queue fits in it, else (with nothing held) one ACCEPT.
    fn arm_if_due(&mut self, driver: &Handle, fd: &FdRef, max_pending: usize) -> io::Result<()> {
        if self.running() {
            return Ok(());
        }
        let held = self.pending();
        if held > max_pending / 2 {
            return Ok(());
        }
        let room = max_pending - held;
        // Unknown counts as a burst: one connection per call is always within bounds.
        let waiting = sockopt::listen_queue_len(fd.raw()).map_or(usize::MAX, |n| n as usize);
        if waiting <= room {
            self.multishots
                .push_back(net::accept_multi(driver, fd, room)?);
        } else if held == 0 {
            self.single = Some(net::accept_op(driver, fd)?);
        }
        Ok(())
    }

    fn poll_single(
        &mut self,
        driver: &Handle,
        fd: &FdRef,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<OwnedFd>> {
        if self.single.is_none() {
            match net::accept_op(driver, fd) {
                Ok(op) => self.single = Some(op),
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
        self.poll_single_in_flight(cx)
    }

    /// The single ACCEPT in flight: its connection once it has one.
    fn poll_single_in_flight(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<OwnedFd>> {
        let op = self.single.as_mut().expect("an ACCEPT in flight");
        match Pin::new(op).poll(cx) {
            Poll::Ready((completion, _)) => {
                self.single = None;
                Poll::Ready(completion.and_then(net::accepted))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
