//! What operations released at their final completion: dropped once the driver is let
//! go (a buffer's drop may run any code, including code that uses the driver), and the
//! boxes of posted sends kept, emptied, for the next post. The wakers of the operations
//! that completed wait here too, and are woken once the driver is let go: a program's
//! own waker may use its sockets, or poll an operation, and then finds the driver free.
//!
//! A relay posts a send for every datagram it forwards; a new box per post and its free
//! at the completion were a tenth of its user-space time.

use std::any::{Any, TypeId};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::task::Waker;

/// Emptied post boxes a driver keeps for reuse: a burst of posts in flight at once
/// leaves no more behind than this.
const MAX_SPARE_POSTS: usize = 1024;

/// Empties a posted send's box (`Box<Option<T>>` as `dyn Any`) in place: drops what it
/// held, keeps the allocation.
pub(crate) type Emptier = fn(&mut dyn Any);

/// The [`Emptier`] of posts whose data is a `T`.
pub(crate) fn empty_post<T: 'static>(cell: &mut dyn Any) {
    if let Some(cell) = cell.downcast_mut::<Option<T>>() {
        *cell = None;
    }
}

/// Data released during one turn of the driver.
#[derive(Default)]
pub(crate) struct Released {
    /// The data of operations that are over, to drop.
    data: Vec<Box<dyn Any>>,
    /// Posted sends' boxes, each with the function that empties it.
    posts: Vec<(Box<dyn Any>, Emptier)>,
    /// Wakers of operations that completed.
    wakers: Vec<Waker>,
}

impl Released {
    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty() && self.posts.is_empty() && self.wakers.is_empty()
    }

    /// Whether wakers wait to be woken: a turn must not sleep in the kernel before it
    /// wakes them (a completion reaped outside a turn, by a cancel or a full queue,
    /// leaves nothing in the ring to end the sleep).
    pub(crate) fn has_wakes(&self) -> bool {
        !self.wakers.is_empty()
    }

    /// The wakers not yet woken, for a runtime shutting down (see
    /// `Driver::take_wakers`).
    pub(crate) fn take_wakes(&mut self) -> Vec<Waker> {
        std::mem::take(&mut self.wakers)
    }

    pub(crate) fn push_wake(&mut self, waker: Waker) {
        self.wakers.push(waker);
    }

    pub(crate) fn push(&mut self, data: Box<dyn Any>) {
        self.data.push(data);
    }

    pub(crate) fn push_post(&mut self, cell: Box<dyn Any>, empty: Emptier) {
        self.posts.push((cell, empty));
    }

    /// Drops everything released, the posted sends' data included, and wakes the
    /// wakers (call it with the driver let go); the boxes stay, empty, for
    /// [`Spares::keep`]. A waker that panics does not keep the others from waking: the
    /// first panic goes on once every one was woken.
    pub(crate) fn release(&mut self) {
        self.data.clear();
        for (cell, empty) in &mut self.posts {
            empty(&mut **cell);
        }
        let mut panicked = None;
        for waker in self.wakers.drain(..) {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| waker.wake())) {
                panicked.get_or_insert(panic);
            }
        }
        if let Some(panic) = panicked {
            resume_unwind(panic);
        }
    }
}

/// What a driver keeps between turns: a list with room for the next turn's releases,
/// and emptied post boxes.
#[derive(Default)]
pub(crate) struct Spares {
    lists: Option<Released>,
    /// Emptied post boxes by the type they hold (a program may post several kinds of
    /// buffer, or sends with and without control data, in turn).
    posts: Vec<(TypeId, Vec<Box<dyn Any>>)>,
    /// Boxes in `posts`, over every type.
    kept: usize,
}

impl Spares {
    /// An empty [`Released`], with the room an earlier turn's had.
    pub(crate) fn take_list(&mut self) -> Released {
        self.lists.take().unwrap_or_default()
    }

    /// Takes back a list [`Released::release`] emptied, and keeps its post boxes (empty)
    /// up to the bound; the others are freed.
    pub(crate) fn keep(&mut self, mut emptied: Released) {
        debug_assert!(emptied.data.is_empty() && emptied.wakers.is_empty());
        for (cell, _) in emptied.posts.drain(..) {
            if self.kept == MAX_SPARE_POSTS {
                // Freed: it holds nothing any more.
                continue;
            }
            let kind = Any::type_id(&*cell);
            match self.posts.iter_mut().find(|(of, _)| *of == kind) {
                Some((_, boxes)) => boxes.push(cell),
                None => self.posts.push((kind, vec![cell])),
            }
            self.kept += 1;
        }
        let roomier = self.lists.as_ref().is_none_or(|kept| {
            emptied.data.capacity() + emptied.posts.capacity() + emptied.wakers.capacity()
                > kept.data.capacity() + kept.posts.capacity() + kept.wakers.capacity()
        });
        if roomier {
            self.lists = Some(emptied);
        }
    }

    /// An emptied box for a post of a `T`, if one is kept.
    pub(crate) fn post_box<T: 'static>(&mut self) -> Option<Box<Option<T>>> {
        let kind = TypeId::of::<Option<T>>();
        let (_, boxes) = self.posts.iter_mut().find(|(of, _)| *of == kind)?;
        let cell = boxes.pop()?;
        self.kept -= 1;
        cell.downcast::<Option<T>>().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    /// Counts its wakes; panics on them when told to.
    struct Counting {
        wakes: AtomicUsize,
        panics: bool,
    }

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
            assert!(!self.panics, "a waker that panics");
        }
    }

    #[test]
    fn released_wakers_all_wake_and_a_panic_among_them_comes_out_after() {
        let counting = |panics| {
            Arc::new(Counting {
                wakes: AtomicUsize::new(0),
                panics,
            })
        };
        let (first, panicking, last) = (counting(false), counting(true), counting(false));
        let mut released = Released::default();
        for waker in [&first, &panicking, &last] {
            released.push_wake(Waker::from(waker.clone()));
        }
        assert!(!released.is_empty());
        let outcome = catch_unwind(AssertUnwindSafe(|| released.release()));
        assert!(outcome.is_err(), "the waker's panic goes on");
        for waker in [&first, &panicking, &last] {
            assert_eq!(waker.wakes.load(Ordering::SeqCst), 1);
        }
        assert!(released.is_empty());
    }

    #[test]
    fn a_released_post_is_emptied_and_its_box_reused() {
        let held = Rc::new(());
        let mut released = Released::default();
        let cell: Box<Option<Rc<()>>> = Box::new(Some(held.clone()));
        let address = &*cell as *const Option<Rc<()>>;
        released.push_post(cell, empty_post::<Rc<()>>);
        released.push(Box::new(held.clone()));
        assert_eq!(Rc::strong_count(&held), 3);
        released.release();
        // Both dropped what they held: the data freed, the post's box emptied.
        assert_eq!(Rc::strong_count(&held), 1);
        let mut spares = Spares::default();
        spares.keep(released);
        let reused = spares.post_box::<Rc<()>>().expect("kept");
        assert!(reused.is_none());
        assert_eq!(&*reused as *const Option<Rc<()>>, address);
        // Posts of two types in turn each get a box of their own type.
        spares.keep(posts_of(
            [
                Box::new(None::<Rc<()>>) as Box<dyn Any>,
                Box::new(None::<u64>) as Box<dyn Any>,
            ]
            .into_iter(),
        ));
        assert!(spares.post_box::<u64>().is_some());
        assert!(spares.post_box::<u64>().is_none());
        assert!(spares.post_box::<Rc<()>>().is_some());
        assert!(spares.post_box::<Rc<()>>().is_none());
    }

    fn posts_of(boxes: impl Iterator<Item = Box<dyn Any>>) -> Released {
        let mut released = Released::default();
        for cell in boxes {
            released.push_post(cell, empty_post::<u8>);
        }
        released.release();
        released
    }

    #[test]
    fn spare_posts_are_bounded() {
        let mut spares = Spares::default();
        spares.keep(posts_of(
            (0..MAX_SPARE_POSTS + 10).map(|_| Box::new(None::<u8>) as Box<dyn Any>),
        ));
        let mut kept = 0;
        while spares.post_box::<u8>().is_some() {
            kept += 1;
        }
        assert_eq!(kept, MAX_SPARE_POSTS);
    }
}
