//! The books of datagrams posted on a socket: sent without a future waiting for each,
//! their outcomes counted as the completions (or the direct calls) come back.
//!
//! A relay forwards thousands of datagrams a second and acts on none of their results
//! one by one; awaiting each send costs a future, a waker and a wake per datagram. A
//! posted send costs its submission only, and what happened to it lands here.

use std::cell::{Cell, RefCell};
use std::io;
use std::task::{Context, Poll, Waker};

/// Posted datagrams a socket may have in flight at once: a program that posts without
/// ever letting the runtime turn gets an error rather than an unbounded queue.
pub(crate) const MAX_POSTS_IN_FLIGHT: usize = 4096;

/// One socket's posted sends: how many are out, and what became of the others.
#[derive(Debug, Default)]
pub(crate) struct PostLedger {
    in_flight: Cell<usize>,
    sent: Cell<u64>,
    dropped: Cell<u64>,
    failed: Cell<u64>,
    last_error: Cell<Option<i32>>,
    /// A posted GSO send failed for a reason GSO may cause (see `gso_refused`): the
    /// socket's forwarding posts datagram by datagram from then on.
    gso_refused: Cell<bool>,
    /// The tasks waiting for `in_flight` to reach zero: every one of them, since any
    /// number of tasks may await `settle_posts` on the same socket at once (keeping
    /// only the last would leave the others waiting forever).
    settled: RefCell<Vec<Waker>>,
}

/// What the books say at one moment (see [`PostLedger::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PostCounts {
    pub(crate) in_flight: usize,
    pub(crate) sent: u64,
    pub(crate) dropped: u64,
    pub(crate) failed: u64,
    pub(crate) last_error: Option<i32>,
}

impl PostLedger {
    /// Takes a place for one more send; an error once [`MAX_POSTS_IN_FLIGHT`] are out.
    pub(crate) fn begin(&self) -> io::Result<()> {
        let out = self.in_flight.get();
        if out >= MAX_POSTS_IN_FLIGHT {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        self.in_flight.set(out + 1);
        Ok(())
    }

    /// Gives back a place taken by [`begin`](Self::begin) for a send that never went out
    /// (its submission failed and the caller got the error instead).
    pub(crate) fn abort(&self) {
        self.finish(&mut Waker::wake);
    }

    /// Books a datagram a direct call sent (no place was taken for it).
    pub(crate) fn count_sent(&self) {
        bump(&self.sent);
    }

    /// Books a datagram that never became a send, for `errno` (no place was taken): a
    /// full ledger (ENOBUFS) is a drop, anything else a failure.
    pub(crate) fn count_unsent(&self, errno: i32) {
        if errno == libc::ENOBUFS || errno == libc::EAGAIN {
            bump(&self.dropped);
        } else {
            bump(&self.failed);
            self.last_error.set(Some(errno));
        }
    }

    /// Books the result of a send that went out: a byte count, or `-errno`. A full send
    /// buffer (EAGAIN, ENOBUFS) is a drop, as the kernel drops a datagram on a full
    /// receive queue; anything else is a failure, and the last one is kept.
    pub(crate) fn settle(&self, result: i32) {
        self.settle_waking(result, &mut Waker::wake);
    }

    /// [`settle`](Self::settle), handing the wakers of the tasks waiting for the posts to
    /// settle to `wake` (the io_uring driver wakes them once it has let go of itself).
    pub(crate) fn settle_waking(&self, result: i32, wake: &mut dyn FnMut(Waker)) {
        if result >= 0 {
            bump(&self.sent);
        } else if result == -libc::EAGAIN || result == -libc::ENOBUFS {
            bump(&self.dropped);
        } else {
            bump(&self.failed);
            self.last_error.set(Some(-result));
        }
        self.finish(wake);
    }

    /// [`settle_waking`](Self::settle_waking) for the `datagrams` of one GSO send, which
    /// share its result; a refusal GSO may have caused is remembered.
    pub(crate) fn settle_gso_waking(
        &self,
        result: i32,
        datagrams: u32,
        wake: &mut dyn FnMut(Waker),
    ) {
        if datagrams > 1 && result < 0 {
            let refused = io::Error::from_raw_os_error(-result);
            if super::gso::gso_refused(&refused) {
                self.gso_refused.set(true);
            }
        }
        for _ in 0..datagrams {
            self.settle_waking(result, wake);
        }
    }

    /// Remembers that a posted GSO send was refused for a reason GSO may cause.
    pub(crate) fn note_gso_refused(&self) {
        self.gso_refused.set(true);
    }

    /// GSO sends may be tried again (the posts go somewhere else now).
    pub(crate) fn forget_gso_refused(&self) {
        self.gso_refused.set(false);
    }

    /// Whether a posted GSO send was refused for a reason GSO may cause.
    pub(crate) fn gso_refused(&self) -> bool {
        self.gso_refused.get()
    }

    /// [`settle`](Self::settle) for a direct call's result.
    pub(crate) fn settle_io(&self, result: io::Result<usize>) {
        match result {
            Ok(_) => self.settle(0),
            Err(err) => self.settle(-err.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn finish(&self, wake: &mut dyn FnMut(Waker)) {
        let out = self.in_flight.get().saturating_sub(1);
        self.in_flight.set(out);
        if out == 0 {
            // Taken out first: a wake runs no code of ours, but the books stay unborrowed
            // whatever it does.
            let mut waiting = std::mem::take(&mut *self.settled.borrow_mut());
            for waker in waiting.drain(..) {
                wake(waker);
            }
            // The list's room back for the next wait, unless a wake added a waiter.
            let mut settled = self.settled.borrow_mut();
            if settled.is_empty() {
                *settled = waiting;
            }
        }
    }

    /// Whether a posted send is out (queued for the kernel, or not yet given back).
    pub(crate) fn has_in_flight(&self) -> bool {
        self.in_flight.get() > 0
    }

    /// Ready once no posted send is in flight.
    pub(crate) fn poll_settled(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.in_flight.get() == 0 {
            return Poll::Ready(());
        }
        let mut waiting = self.settled.borrow_mut();
        // A task polled again is not added twice; one whose future was dropped stays
        // until the next settlement, and gets a wake it ignores.
        if !waiting.iter().any(|waker| waker.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
        }
        Poll::Pending
    }

    pub(crate) fn counts(&self) -> PostCounts {
        PostCounts {
            in_flight: self.in_flight.get(),
            sent: self.sent.get(),
            dropped: self.dropped.get(),
            failed: self.failed.get(),
            last_error: self.last_error.get(),
        }
    }
}

fn bump(counter: &Cell<u64>) {
    counter.set(counter.get() + 1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn results_land_in_their_counters() {
        let ledger = PostLedger::default();
        for _ in 0..4 {
            ledger.begin().unwrap();
        }
        ledger.settle(172);
        ledger.settle(-libc::EAGAIN);
        ledger.settle(-libc::ECONNREFUSED);
        ledger.settle_io(Err(io::Error::from_raw_os_error(libc::ENOBUFS)));
        let counts = ledger.counts();
        assert_eq!(
            (counts.in_flight, counts.sent, counts.dropped, counts.failed),
            (0, 1, 2, 1)
        );
        assert_eq!(counts.last_error, Some(libc::ECONNREFUSED));
    }

    #[test]
    fn the_cap_refuses_and_an_abort_gives_the_place_back() {
        let ledger = PostLedger::default();
        for _ in 0..MAX_POSTS_IN_FLIGHT {
            ledger.begin().unwrap();
        }
        let refused = ledger.begin().unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ENOBUFS));
        ledger.abort();
        ledger.begin().unwrap();
        assert_eq!(ledger.counts().in_flight, MAX_POSTS_IN_FLIGHT);
        assert_eq!(ledger.counts().sent, 0);
    }

    #[test]
    fn the_last_settlement_wakes_the_waiter() {
        let ledger = PostLedger::default();
        let flag = Arc::new(Flag(Default::default()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(ledger.poll_settled(&mut cx).is_ready());
        ledger.begin().unwrap();
        ledger.begin().unwrap();
        assert!(ledger.poll_settled(&mut cx).is_pending());
        ledger.settle(1);
        assert!(!flag.0.load(std::sync::atomic::Ordering::SeqCst));
        ledger.settle(1);
        assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
        assert!(ledger.poll_settled(&mut cx).is_ready());
    }

    #[test]
    fn every_waiter_is_woken_not_only_the_last() {
        let ledger = PostLedger::default();
        let flags: Vec<_> = (0..2).map(|_| Arc::new(Flag(Default::default()))).collect();
        ledger.begin().unwrap();
        for flag in &flags {
            let waker = Waker::from(flag.clone());
            assert!(ledger
                .poll_settled(&mut Context::from_waker(&waker))
                .is_pending());
        }
        ledger.settle(1);
        for flag in &flags {
            assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
        }
    }
}
