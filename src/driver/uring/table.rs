//! The operation table: for each operation in flight, who waits for it and the memory
//! its SQE points to, under a key whose generation changes each time a slot is reused.
//!
//! A key travels in the SQE's `user_data` (index in the low 32 bits, generation in the
//! high 31), so a completion or an ASYNC_CANCEL for an operation that is over can never
//! land on the next operation that reuses its slot: the generations differ.

use std::any::Any;
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::Waker;

use io_uring::cqueue;

use super::released::Emptier;
use super::tap::Tap;
use crate::driver::posted::PostLedger;

/// Generations wrap below this bit, so no key is ever `u64::MAX` or `u64::MAX - 1`,
/// the `user_data` of the driver's own entries.
const GENERATION_MASK: u32 = 0x7fff_ffff;

/// What the kernel returned for one SQE.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    /// The CQE's `res`: a count or a descriptor when non-negative, `-errno` otherwise.
    pub(crate) result: i32,
    pub(crate) flags: u32,
}

impl Completion {
    /// The one place a CQE result becomes an error. Special cases callers rely on:
    /// `ECANCELED` means the operation was cancelled or a linked chain was cut after an
    /// earlier entry failed; `ENOBUFS` on a buffer-select receive means the provided buffer
    /// ring is empty.
    pub(crate) fn into_result(self) -> std::io::Result<u32> {
        if self.result >= 0 {
            Ok(self.result as u32)
        } else {
            Err(std::io::Error::from_raw_os_error(-self.result))
        }
    }

    /// True when a multishot operation will post more completions.
    pub(crate) fn more(&self) -> bool {
        cqueue::more(self.flags)
    }
}

/// An operation's place in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    pub(crate) fn user_data(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    pub(crate) fn from_user_data(user_data: u64) -> Key {
        Key {
            index: user_data as u32,
            generation: (user_data >> 32) as u32,
        }
    }
}

/// Who is waiting for an operation, and what came back.
pub(crate) enum State {
    /// Submitted; the waker of the future waiting for it, once it has been polled.
    Pending(Option<Waker>),
    /// The (single) completion arrived before the future came back for it.
    Completed(Completion),
    /// A multishot operation: completions queue up until the future takes them.
    Multi {
        queue: VecDeque<Completion>,
        /// The waker of the last poll that waits; kept after a wake, so the next poll of
        /// the same task clones nothing.
        waker: Option<Waker>,
        /// The waker waits for the next completion: a poll left it (Pending, or a
        /// completion that drained the queue and kept it). A wake disarms it, so a task
        /// that turned to other work is woken once, not on every completion after.
        armed: bool,
        finished: bool,
        /// Once this many completions wait in `queue`, the driver cancels the operation
        /// (see [`State::multi`]).
        queue_limit: usize,
        /// The driver cancelled it for reaching `queue_limit`.
        paused: bool,
        /// Takes the completions that carry a value in place of `queue` (see [`Tap`]);
        /// errors and the end still queue for the owner.
        tap: Option<Rc<dyn Tap>>,
    },
    /// A send nobody waits for ([`post`](super::op::post)): its result goes to the
    /// socket's books and the slot is released at once.
    Posted {
        ledger: Rc<PostLedger>,
        /// Datagrams the send carries (more than one: a GSO send), each booked with its
        /// result.
        datagrams: u32,
        /// Where the send goes back if the kernel refuses a GSO send (see
        /// [`Tap::refused`]).
        refused_to: Option<Rc<dyn Tap>>,
        /// Empties the slot's data once released, for the box to carry the next post.
        empty: Emptier,
    },
    /// The future was dropped: the slot lives on until the final completion.
    Ignored {
        /// Results are descriptors (multishot accept) that nobody will take: close them.
        close_results: bool,
    },
}

impl State {
    /// A multishot operation's state. With a `queue_limit`, the driver pauses the
    /// operation (cancels it) when that many completions wait untaken, so a multishot
    /// whose results cost something (an accepted descriptor each) cannot pile them up
    /// while nobody takes them. The cancel's own final completion (`ECANCELED`) is not
    /// queued: it carries nothing for the owner.
    pub(crate) fn multi(queue_limit: Option<usize>) -> State {
        State::Multi {
            queue: VecDeque::new(),
            waker: None,
            armed: false,
            finished: false,
            queue_limit: queue_limit.unwrap_or(usize::MAX).max(1),
            paused: false,
            tap: None,
        }
    }

    /// True while the kernel may still post a completion for the slot.
    pub(crate) fn in_flight(&self) -> bool {
        match self {
            State::Pending(_) | State::Posted { .. } | State::Ignored { .. } => true,
            State::Multi { finished, .. } => !finished,
            State::Completed(_) => false,
        }
    }
}

/// One operation: its state and the memory its SQE points to, owned here from the push
/// until the final completion (or until the future takes it back after that).
pub(crate) struct Slot {
    pub(crate) state: State,
    pub(crate) data: Option<Box<dyn Any>>,
}

struct Entry {
    generation: u32,
    slot: Option<Slot>,
}

/// The slots, indexed by key.
#[derive(Default)]
pub(crate) struct Table {
    entries: Vec<Entry>,
    free: Vec<u32>,
    len: usize,
}

impl Table {
    pub(crate) fn with_capacity(capacity: usize) -> Table {
        Table {
            entries: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            len: 0,
        }
    }

    pub(crate) fn insert(&mut self, slot: Slot) -> Key {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let entry = &mut self.entries[index as usize];
            entry.generation = (entry.generation + 1) & GENERATION_MASK;
            entry.slot = Some(slot);
            return Key {
                index,
                generation: entry.generation,
            };
        }
        let index = u32::try_from(self.entries.len()).expect("fewer than 2^32 operations");
        self.entries.push(Entry {
            generation: 0,
            slot: Some(slot),
        });
        Key {
            index,
            generation: 0,
        }
    }

    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut Slot> {
        let entry = self.entries.get_mut(key.index as usize)?;
        if entry.generation != key.generation {
            return None;
        }
        entry.slot.as_mut()
    }

    pub(crate) fn remove(&mut self, key: Key) -> Option<Slot> {
        let entry = self.entries.get_mut(key.index as usize)?;
        if entry.generation != key.generation {
            return None;
        }
        let slot = entry.slot.take()?;
        self.free.push(key.index);
        self.len -= 1;
        Some(slot)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every live slot with its key.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (Key, &mut Slot)> {
        self.entries
            .iter_mut()
            .enumerate()
            .filter_map(|(index, entry)| {
                let key = Key {
                    index: index as u32,
                    generation: entry.generation,
                };
                entry.slot.as_mut().map(|slot| (key, slot))
            })
    }

    /// Keys of the slots the kernel may still complete.
    pub(crate) fn in_flight(&mut self) -> Vec<Key> {
        self.iter_mut()
            .filter(|(_, slot)| slot.state.in_flight())
            .map(|(key, _)| key)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Slot {
        Slot {
            state: State::Pending(None),
            data: None,
        }
    }

    #[test]
    fn a_reused_slot_has_a_new_generation() {
        let mut table = Table::default();
        let first = table.insert(pending());
        assert!(table.remove(first).is_some());
        let second = table.insert(pending());
        assert_ne!(first.user_data(), second.user_data());
        // The old key finds nothing: neither its completion nor its cancel can land here.
        assert!(table.get_mut(first).is_none());
        assert!(table.remove(first).is_none());
        assert!(table.get_mut(second).is_some());
        assert_eq!(Key::from_user_data(second.user_data()), second);
    }

    #[test]
    fn keys_never_collide_with_the_driver_tokens() {
        let mut table = Table::default();
        let key = table.insert(pending());
        table.entries[0].generation = GENERATION_MASK;
        table.remove(Key {
            index: key.index,
            generation: GENERATION_MASK,
        });
        let wrapped = table.insert(pending());
        assert_eq!(wrapped.generation, 0);
        assert!(
            Key {
                index: u32::MAX,
                generation: GENERATION_MASK
            }
            .user_data()
                < u64::MAX - 1
        );
    }

    #[test]
    fn in_flight_lists_what_the_kernel_may_still_complete() {
        let mut table = Table::default();
        let a = table.insert(pending());
        let b = table.insert(Slot {
            state: State::Completed(Completion {
                result: 0,
                flags: 0,
            }),
            data: None,
        });
        assert_eq!(table.in_flight(), vec![a]);
        assert!(table.remove(b).is_some());
        assert!(!table.is_empty());
    }
}
