//! `--max-connections`: at most N connections served at once.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Slots for connections being served; `None` for no limit. Meant for one task that
/// waits for a slot (the accept loop) and any number of tasks that hold one.
pub struct ConnectionLimit {
    limit: Option<usize>,
    state: Rc<RefCell<State>>,
}

#[derive(Default)]
struct State {
    served: usize,
    waiter: Option<Waker>,
    /// Waits for the last connection to end ([`ConnectionLimit::wait_idle`]).
    idle_waiter: Option<Waker>,
}

/// A connection being served; frees its slot when dropped.
pub struct Slot {
    state: Rc<RefCell<State>>,
}

impl ConnectionLimit {
    pub fn new(limit: Option<usize>) -> ConnectionLimit {
        ConnectionLimit {
            limit,
            state: Rc::default(),
        }
    }

    /// The limit, when every slot is taken.
    pub fn full(&self) -> Option<usize> {
        self.limit
            .filter(|limit| self.state.borrow().served >= *limit)
    }

    /// Waits for a free slot and takes it.
    pub async fn acquire(&self) -> Slot {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if self.limit.is_some_and(|limit| state.served >= limit) {
                state.waiter = Some(cx.waker().clone());
                return Poll::Pending;
            }
            state.served += 1;
            Poll::Ready(())
        })
        .await;
        Slot {
            state: self.state.clone(),
        }
    }
}

impl ConnectionLimit {
    /// Resolves once no connection is served any more.
    pub async fn wait_idle(&self) {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.served == 0 {
                return Poll::Ready(());
            }
            state.idle_waiter = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (waiter, idle) = {
            let mut state = self.state.borrow_mut();
            state.served -= 1;
            let idle = if state.served == 0 {
                state.idle_waiter.take()
            } else {
                None
            };
            (state.waiter.take(), idle)
        };
        waiter.into_iter().chain(idle).for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::Context;

    #[test]
    fn a_slot_is_free_again_when_its_connection_ends() {
        let limit = ConnectionLimit::new(Some(2));
        let mut cx = Context::from_waker(Waker::noop());
        let first = ringsock::block_on(limit.acquire());
        let _second = ringsock::block_on(limit.acquire());
        assert_eq!(limit.full(), Some(2));
        let mut third = pin!(limit.acquire());
        assert!(third.as_mut().poll(&mut cx).is_pending());
        drop(first);
        let Poll::Ready(third) = third.as_mut().poll(&mut cx) else {
            panic!("a slot was freed");
        };
        assert_eq!(limit.full(), Some(2));
        drop(third);
        assert_eq!(limit.full(), None);
    }

    #[test]
    fn no_limit_never_waits() {
        let limit = ConnectionLimit::new(None);
        let slots: Vec<_> = (0..1000)
            .map(|_| ringsock::block_on(limit.acquire()))
            .collect();
        assert_eq!(limit.full(), None);
        drop(slots);
    }
}
