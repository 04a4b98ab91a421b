//! `--max-connections`: at most N connections served at once, over every thread.
//!
//! Each thread accepts from a listener of its own (SO_REUSEPORT), which the kernel fills
//! by a hash of the client's address: a share of N per thread would serve up to
//! threads × ⌈N / threads⌉ together, and turn a client away on a full thread while
//! another had room. So the count is the server's, and an accept loop takes a slot only
//! once it has a connection (a slot held while waiting in accept would keep a client of
//! another thread waiting for a client of its own).

use std::cell::Cell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// The server's limit, shared by its threads; `None` inside for no limit.
#[derive(Clone, Default)]
pub struct ServerLimit(Option<Arc<Shared>>);

struct Shared {
    limit: usize,
    state: Mutex<SharedState>,
}

#[derive(Default)]
struct SharedState {
    served: usize,
    /// Accept loops (of any thread) waiting for room.
    waiters: Vec<Waker>,
}

impl ServerLimit {
    pub fn new(limit: Option<usize>) -> ServerLimit {
        ServerLimit(limit.map(|limit| {
            Arc::new(Shared {
                limit,
                state: Mutex::default(),
            })
        }))
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready when a connection may be served (taking its slot if `take`); else the task
    /// waits to be woken by the next slot freed.
    fn poll_room(&self, take: bool, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state();
        if state.served < self.limit {
            if take {
                state.served += 1;
            }
            return Poll::Ready(());
        }
        if !state.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            state.waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// One thread's view of the limit: the server's slots, and the connections this thread
/// serves (a hand-over waits for those to end).
pub struct ConnectionLimit {
    server: Option<Arc<Shared>>,
    here: Rc<Here>,
}

#[derive(Default)]
struct Here {
    served: Cell<usize>,
    /// Waits for this thread's last connection to end ([`ConnectionLimit::wait_idle`]).
    idle_waiter: Cell<Option<Waker>>,
}

/// A connection being served; frees its slot when dropped.
pub struct Slot {
    server: Option<Arc<Shared>>,
    here: Rc<Here>,
}

impl ConnectionLimit {
    pub fn new(server: &ServerLimit) -> ConnectionLimit {
        ConnectionLimit {
            server: server.0.clone(),
            here: Rc::default(),
        }
    }

    /// The limit, when every slot of the server is taken.
    pub fn full(&self) -> Option<usize> {
        let server = self.server.as_ref()?;
        (server.state().served >= server.limit).then_some(server.limit)
    }

    /// Waits until the server may serve one more connection, without taking the slot.
    pub async fn room(&self) {
        if let Some(server) = &self.server {
            poll_fn(|cx| server.poll_room(false, cx)).await;
        }
    }

    /// Waits for a free slot and takes it.
    pub async fn acquire(&self) -> Slot {
        if let Some(server) = &self.server {
            poll_fn(|cx| server.poll_room(true, cx)).await;
        }
        self.here.served.set(self.here.served.get() + 1);
        Slot {
            server: self.server.clone(),
            here: self.here.clone(),
        }
    }

    /// Resolves once this thread serves no connection any more.
    pub async fn wait_idle(&self) {
        poll_fn(|cx| {
            if self.here.served.get() == 0 {
                return Poll::Ready(());
            }
            self.here.idle_waiter.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let served = self.here.served.get() - 1;
        self.here.served.set(served);
        if served == 0 {
            if let Some(idle) = self.here.idle_waiter.take() {
                idle.wake();
            }
        }
        if let Some(server) = &self.server {
            let waiters = {
                let mut state = server.state();
                state.served -= 1;
                std::mem::take(&mut state.waiters)
            };
            // Every waiting loop looks: the one whose client came first takes the slot,
            // the others wait again.
            waiters.into_iter().for_each(Waker::wake);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;

    #[test]
    fn a_slot_is_free_again_when_its_connection_ends() {
        let server = ServerLimit::new(Some(2));
        let limit = ConnectionLimit::new(&server);
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
    fn the_limit_is_the_servers_over_every_thread() {
        let server = ServerLimit::new(Some(3));
        let threads: Vec<_> = (0..2).map(|_| ConnectionLimit::new(&server)).collect();
        let mut cx = Context::from_waker(Waker::noop());
        let mut held: Vec<Slot> = (0..3)
            .map(|n| ringsock::block_on(threads[n % 2].acquire()))
            .collect();
        for thread in &threads {
            assert_eq!(thread.full(), Some(3));
            assert!(pin!(thread.room()).as_mut().poll(&mut cx).is_pending());
        }
        // Room waits take no slot: thread 1 gets the slot thread 0's connection frees.
        let mut room = pin!(threads[1].room());
        assert!(room.as_mut().poll(&mut cx).is_pending());
        held.remove(0);
        assert!(room.as_mut().poll(&mut cx).is_ready());
        assert_eq!(threads[0].full(), None);
        let _slot = ringsock::block_on(threads[1].acquire());
        assert_eq!(threads[0].full(), Some(3));
    }

    #[test]
    fn a_thread_is_idle_when_its_own_connections_end() {
        let server = ServerLimit::new(Some(4));
        let (one, other) = (ConnectionLimit::new(&server), ConnectionLimit::new(&server));
        let mut cx = Context::from_waker(Waker::noop());
        let mine = ringsock::block_on(one.acquire());
        let _theirs = ringsock::block_on(other.acquire());
        let mut idle = pin!(one.wait_idle());
        assert!(idle.as_mut().poll(&mut cx).is_pending());
        drop(mine);
        assert!(idle.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn no_limit_never_waits() {
        let limit = ConnectionLimit::new(&ServerLimit::new(None));
        let slots: Vec<_> = (0..1000)
            .map(|_| ringsock::block_on(limit.acquire()))
            .collect();
        assert_eq!(limit.full(), None);
        drop(slots);
    }
}
