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
//!   another process; no hard bound while the thread is busy, as the kernel keeps
//!   taking what arrives meanwhile (see the README).
//! - io_uring without multishot accept: one ACCEPT per call; an accept whose caller went
//!   away keeps its operation, so at most one connection is held.
//! - epoll: `accept4` when the program asks; nothing is held.
//!
//! The kernel's own listen backlog (connections it completed and holds until someone
//! accepts them) is separate, and set by `listen`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::task::{Context, Poll};

use super::socket::{Binding, SharedFd};
use super::{poll, uring};

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
    /// The io_uring accepts in flight and what they hold (idle on epoll).
    uring: uring::accept::Acceptor,
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
            uring: uring::accept::Acceptor::default(),
            max_pending: DEFAULT_MAX_PENDING,
            adopted: accepted.into(),
        }
    }

    /// The connections the kernel accepted but nobody took yet, for a listener leaving
    /// this runtime: call after its operations were cancelled and reaped
    /// ([`SharedFd::detach`]), so every completion is in.
    ///
    /// `listener` (the socket itself, by any descriptor) is then drained of the
    /// connections its queue holds, up to the bound: io_uring waits on a listener
    /// exclusively, so a connection whose wake-up went to the accept just cancelled is
    /// never signalled to anyone else (another process sharing the socket, the
    /// runtime that adopts it) and would wait in the queue until the next one came.
    pub(crate) fn take_accepted(&mut self, listener: BorrowedFd<'_>) -> Vec<OwnedFd> {
        let mut accepted: Vec<OwnedFd> = self.adopted.drain(..).collect();
        self.uring.take_accepted(&mut accepted);
        let socket = socket2::SockRef::from(&listener);
        // As every socket here is (a sharer may have made it blocking): an empty queue
        // is then WouldBlock, never a wait.
        let non_blocking = socket.set_nonblocking(true).is_ok();
        while non_blocking && accepted.len() < self.max_pending {
            let Ok((connection, _)) = socket.accept() else {
                break;
            };
            if connection.set_nonblocking(true).is_ok() {
                accepted.push(OwnedFd::from(connection));
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
            pending: self.uring.pending_descriptors(),
            background: self.uring.running(),
        }
    }

    /// A program's `accept` begins (see the io_uring acceptor's `begin`).
    pub(crate) fn begin(&mut self) {
        self.uring.begin();
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
            Ok(Binding::Poll(reg)) => poll::net::poll_accept(reg, fd.fd(), cx),
            Ok(Binding::Uring(driver)) => {
                self.uring
                    .poll_accept(driver, fd.fd(), self.max_pending, cx)
            }
        }
    }
}
