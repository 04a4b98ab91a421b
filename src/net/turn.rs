//! One caller at a time: an accept or a receive that owns a multishot operation's
//! results takes its turn here, and the others wait.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// A turn that tasks take one after another.
#[derive(Default)]
pub(crate) struct Turnstile {
    busy: Cell<bool>,
    waiting: RefCell<Vec<Waker>>,
}

impl Turnstile {
    /// Waits until no one else holds the turn, then holds it until the guard drops.
    pub(crate) async fn take(&self) -> Turn<'_> {
        poll_fn(|cx| {
            if self.busy.get() {
                let mut waiting = self.waiting.borrow_mut();
                if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                    waiting.push(cx.waker().clone());
                }
                Poll::Pending
            } else {
                self.busy.set(true);
                Poll::Ready(())
            }
        })
        .await;
        Turn { turnstile: self }
    }
}

/// Holds the turn; passes it on when dropped.
pub(crate) struct Turn<'a> {
    turnstile: &'a Turnstile,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.turnstile.busy.set(false);
        // Wake every waiter, not just the first: a waiter may have been dropped (its
        // call cancelled), and waking only it would leave the live ones asleep for good.
        // The first to run takes the turn; the rest wait again.
        let waiting = std::mem::take(&mut *self.turnstile.waiting.borrow_mut());
        waiting.into_iter().for_each(Waker::wake);
    }
}
