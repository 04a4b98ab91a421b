//! Accepting connections, with a bound on how many the program holds without having
//! asked for them.
//!
//! - io_uring with multishot accept: one SQE takes connections in the background, so
//!   `accept` usually finds one waiting. Each is an open descriptor, so the background
//!   accept stops ("pauses") once `max_pending` wait untaken: the driver cancels it
//!   when its queue reaches the limit, and completions the kernel posts before the
//!   cancel lands are kept (the slack). It starts again once the program has taken the
//!   waiting connections down to half, so a program that keeps up never sees it pause
//!   and one that does not is not handed a new multishot per connection.
//! - The kernel hands a multishot accept every connection its accept queue holds in one
//!   go (it accepts until the queue is empty). So a multishot is armed only where the
//!   queue (TCP_INFO) fits in the room left under `max_pending`; while a burst waits
//!   there, connections are taken one ACCEPT per call instead, as where the kernel lacks
//!   multishot accept. For the same reason the slack is what arrived since the loop's
//!   last turn: a few connections for a loop that keeps turning, dozens in a flood from
//!   another process, at worst the listen backlog.
//! - io_uring without multishot accept: one ACCEPT per call; an accept whose caller went
//!   away keeps its operation, so at most one connection is held.
//! - epoll: `accept4` when the program asks; nothing is held.
//!
//! The kernel's own listen backlog (connections it completed and holds until someone
//! accepts them) is separate, and set by `listen`.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::caps::Capability;
use super::fd::FdRef;
use super::socket::{Binding, SharedFd};
use super::{poll, sockopt, uring};

/// The default bound on connections taken from the kernel before the program asks.
pub(crate) const DEFAULT_MAX_PENDING: usize = 128;

/// What an acceptor holds for the program.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Held {
    /// Connections accepted in the background and not yet taken.
    pub(crate) pending: usize,
    /// A background accept runs and may take more.
    pub(crate) background: bool,
}

/// Accepts connections on a listening socket. Poll-based so the listener can keep it
/// between calls: a dropped `accept` future loses no connection the kernel already
/// accepted.
pub(crate) struct Acceptor {
    /// Multishot accepts, oldest first. All but the last have ended (paused, or ended by
    /// the kernel) and only hold connections not yet taken; the last may still run.
    multishots: VecDeque<uring::MultiOp>,
    single: Option<uring::Op<FdRef>>,
    max_pending: usize,
    /// Connections accepted before the listener came to this runtime, handed out first.
    adopted: VecDeque<OwnedFd>,
}

impl Acceptor {
    pub(crate) fn new() -> Acceptor {
        Acceptor::with_accepted(Vec::new())
    }

    /// An acceptor that first hands out `accepted`, the connections a listener brought
    /// from the runtime (or process) it left.
    pub(crate) fn with_accepted(accepted: Vec<OwnedFd>) -> Acceptor {
        Acceptor {
            multishots: VecDeque::new(),
            single: None,
            max_pending: DEFAULT_MAX_PENDING,
            adopted: accepted.into(),
        }
    }

    /// The connections the kernel accepted but nobody took yet, for a listener leaving
    /// this runtime: call after its operations were cancelled and reaped
    /// ([`SharedFd::detach`]), so every completion is in.
    pub(crate) fn take_accepted(&mut self) -> Vec<OwnedFd> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut accepted: Vec<OwnedFd> = self.adopted.drain(..).collect();
        for op in self.multishots.iter_mut() {
            while let Poll::Ready(Ok(Some(completion))) = op.poll_next(&mut cx) {
                accepted.extend(uring::net::accepted(completion).ok());
            }
        }
        if let Some(op) = self.single.as_mut() {
            if let Poll::Ready((Ok(completion), _)) = Pin::new(op).poll(&mut cx) {
                self.single = None;
                accepted.extend(uring::net::accepted(completion).ok());
            }
        }
        accepted
    }

    /// Sets the bound (at least 1); it applies from the next time a background accept
    /// is armed.
    pub(crate) fn set_max_pending(&mut self, max_pending: usize) {
        self.max_pending = max_pending.max(1);
    }

    pub(crate) fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// What is held now.
    pub(crate) fn held(&self) -> Held {
        Held {
            pending: self.pending(),
            background: self.running(),
        }
    }

    /// The next connection's socket.
    pub(crate) fn poll_accept(
        &mut self,
        fd: &SharedFd,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<OwnedFd>> {
        if let Some(accepted) = self.adopted.pop_front() {
            return Poll::Ready(Ok(accepted));
        }
        match fd.binding() {
            Err(err) => Poll::Ready(Err(err)),
            Ok(Binding::Poll(reg)) => loop {
                match reg.poll_ready(poll::Direction::Read, cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => return Poll::Pending,
                }
                match poll::net::try_accept(reg, fd.fd()) {
                    Ok((new, _)) => return Poll::Ready(Ok(new)),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        reg.clear_ready(poll::Direction::Read)
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Poll::Ready(Err(err)),
                }
            },
            Ok(Binding::Uring(driver)) => {
                let multishot =
                    driver.with(|d| d.capabilities().contains(Capability::MultishotAccept));
                match multishot {
                    Err(err) => Poll::Ready(Err(err)),
                    Ok(true) => self.poll_bounded(driver, fd.fd(), cx),
                    Ok(false) => self.poll_single(driver, fd.fd(), cx),
                }
            }
        }
    }

    /// Connections accepted in the background and not yet taken.
    fn pending(&self) -> usize {
        self.multishots.iter().map(|op| op.status().0).sum()
    }

    /// An accept is in flight: a multishot that may take more, or a single ACCEPT.
    fn running(&self) -> bool {
        self.single.is_some() || self.multishots.back().is_some_and(|op| !op.status().1)
    }

    /// Multishot accept within `max_pending` (see the module documentation).
    fn poll_bounded(
        &mut self,
        driver: &uring::Handle,
        fd: &FdRef,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<OwnedFd>> {
        // Bounded: the second round finds an accept armed by the first.
        loop {
            if let Err(err) = self.arm_if_due(driver, fd) {
                return Poll::Ready(Err(err));
            }
            if let Some(taken) = self.take_held(cx) {
                if taken.is_ok() {
                    // Taking this one may bring the rest down to half: resume now, not
                    // at the next call. A failure shows again at the next call.
                    let _ = self.arm_if_due(driver, fd);
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
                Poll::Ready(Ok(Some(completion))) => return Some(uring::net::accepted(completion)),
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
    fn arm_if_due(&mut self, driver: &uring::Handle, fd: &FdRef) -> io::Result<()> {
        if self.running() {
            return Ok(());
        }
        let held = self.pending();
        if held > self.max_pending / 2 {
            return Ok(());
        }
        let room = self.max_pending - held;
        // Unknown counts as a burst: one connection per call is always within bounds.
        let waiting = sockopt::listen_queue_len(fd.raw()).map_or(usize::MAX, |n| n as usize);
        if waiting <= room {
            self.multishots
                .push_back(uring::net::accept_multi(driver, fd, room)?);
        } else if held == 0 {
            self.single = Some(uring::net::accept_op(driver, fd)?);
        }
        Ok(())
    }

    fn poll_single(
        &mut self,
        driver: &uring::Handle,
        fd: &FdRef,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<OwnedFd>> {
        if self.single.is_none() {
            match uring::net::accept_op(driver, fd) {
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
                Poll::Ready(completion.and_then(uring::net::accepted))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
