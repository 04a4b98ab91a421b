//! One value handed from any thread to one awaiting task: the output of a blocking job,
//! or of a task spawned on another thread of a pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// A new channel for one value.
pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Pending(None)),
    });
    (Sender(Some(slot.clone())), Receiver(slot))
}

struct Slot<T> {
    state: Mutex<State<T>>,
}

enum State<T> {
    /// Not sent; the waker of the task that last polled.
    Pending(Option<Waker>),
    /// Sent: `None` when the sender went without a value (its work panicked, or its
    /// task was dropped).
    Done(Option<T>),
    /// Taken, or the receiver is gone.
    Closed,
}

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while the lock is held; a poisoned lock still holds a state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends the value; dropped without sending, it tells the receiver none will come.
pub(crate) struct Sender<T>(Option<Arc<Slot<T>>>);

impl<T> Sender<T> {
    /// Hands `value` over and wakes the receiver; if the receiver is gone, `value` is
    /// dropped here, outside the lock.
    pub(crate) fn send(mut self, value: T) {
        if let Some(slot) = self.0.take() {
            finish(&slot, Some(value));
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            finish(&slot, None);
        }
    }
}

fn finish<T>(slot: &Slot<T>, value: Option<T>) {
    let mut state = slot.lock();
    match std::mem::replace(&mut *state, State::Closed) {
        State::Pending(waker) => {
            *state = State::Done(value);
            drop(state);
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        other => {
            drop(state);
            drop(other);
            drop(value);
        }
    }
}

/// Awaits the value: `Some` once sent, `None` when the sender went without one.
pub(crate) struct Receiver<T>(Arc<Slot<T>>);

impl<T> Receiver<T> {
    /// Gives up on the value; true if it had not come yet (the sender will drop it).
    pub(crate) fn close(&self) -> bool {
        let previous = std::mem::replace(&mut *self.0.lock(), State::Closed);
        matches!(previous, State::Pending(_))
    }
}

impl<T> Future for Receiver<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = self.0.lock();
        match &mut *state {
            State::Pending(Some(waker)) if waker.will_wake(cx.waker()) => Poll::Pending,
            State::Pending(waker) => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            State::Done(_) => match std::mem::replace(&mut *state, State::Closed) {
                State::Done(value) => Poll::Ready(value),
                _ => unreachable!("matched Done above"),
            },
            // Only reachable by polling again after Ready.
            State::Closed => Poll::Ready(None),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Closed first: a sender that finishes later drops its value instead of waking
        // a task that is gone. The value, if it came, is dropped outside the lock.
        let previous = std::mem::replace(&mut *self.0.lock(), State::Closed);
        drop(previous);
    }
}
