//! Every task of a runtime that has not finished, so that dropping the runtime drops
//! them all: a task waiting on something no runtime holds (a channel whose sender lives
//! on, `std::future::pending()`) would otherwise never be dropped, and what it owns
//! (sockets, the sender of another task's output) would live on after the runtime.

use std::cell::RefCell;
use std::rc::Rc;
use std::task::Waker;

use slab::Slab;

/// The wakers of a runtime's unfinished tasks.
#[derive(Default)]
pub(crate) struct Tasks {
    wakers: RefCell<Slab<Waker>>,
    /// The runtime is dropping: entries are taken, not removed one by one.
    closed: std::cell::Cell<bool>,
}

impl Tasks {
    /// Where the next task's waker will go; the task's future carries this key.
    pub(crate) fn next_key(&self) -> usize {
        self.wakers.borrow().vacant_key()
    }

    /// Keeps `waker` (its task's own) until the task finishes or is dropped.
    pub(crate) fn insert(&self, waker: Waker) -> usize {
        self.wakers.borrow_mut().insert(waker)
    }

    /// Wakes every unfinished task and forgets them, for a runtime being dropped: each
    /// is scheduled once more, and the runtime drops what is scheduled.
    pub(crate) fn wake_all(&self) -> bool {
        self.closed.set(true);
        let wakers: Vec<Waker> = self.wakers.borrow_mut().drain().collect();
        let any = !wakers.is_empty();
        wakers.into_iter().for_each(Waker::wake);
        any
    }

    fn remove(&self, key: usize) {
        if !self.closed.get() {
            let removed = self.wakers.borrow_mut().try_remove(key);
            // Dropped outside the borrow: it may be the last reference to its task.
            drop(removed);
        }
    }
}

/// Held by a task's future: takes the task out of [`Tasks`] when the future finishes
/// or is dropped.
pub(crate) struct Registered {
    tasks: Rc<Tasks>,
    key: usize,
}

impl Registered {
    pub(crate) fn new(tasks: Rc<Tasks>, key: usize) -> Registered {
        Registered { tasks, key }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.tasks.remove(self.key);
    }
}
