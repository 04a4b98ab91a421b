//! Receive buffers lent to datagrams: a pool of equal-sized buffers in one mapping.
//!
//! Every buffer is in one of two hands at any moment:
//!
//! - the refill side: the kernel's provided buffer ring
//!   ([`BufRing`](super::uring::buf_ring::BufRing)) while it is registered (io_uring's
//!   multishot receive), else the pool's free list (`recvmmsg`); or
//! - the program: one or more [`LentBuf`]s (more than one when a GRO super-datagram is
//!   split into its datagrams), counted in `refs`.
//!
//! A buffer goes back to the refill side only when its last `LentBuf` is dropped, and a
//! buffer id the refill side hands out while the program still holds it is refused as an
//! error rather than read: no buffer is ever lent twice, and no bytes a datagram shows
//! can be overwritten while it lives.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::io;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::ptr::NonNull;
use std::rc::Rc;
use std::task::Waker;

use super::uring::buf_ring::BufRing;

/// An anonymous, page-aligned memory mapping, unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps at least `len` bytes, zeroed, rounded up to whole pages.
    pub(crate) fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = len.max(1).next_multiple_of(page);
        // SAFETY: an anonymous private mapping without an address hint touches no existing
        // memory; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; whoever drops a Mapping has
        // made sure nothing (kernel included) uses it any more (see BufPool's Drop).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Equal-sized receive buffers, each lent at most once at a time.
pub(crate) struct BufPool {
    /// Freed in Drop, after the kernel ring (if any) says the kernel is done with it.
    memory: ManuallyDrop<Mapping>,
    stride: usize,
    count: u16,
    /// Per buffer: how many `LentBuf`s (or receiver claims) hold it; 0 = refill side.
    refs: Box<[Cell<u16>]>,
    /// The kernel's provided buffer ring (io_uring); it is the refill side while it is
    /// registered.
    ring: Option<BufRing>,
    /// Bytes of each buffer the ring offers the kernel (at most `stride`).
    ring_len: u32,
    /// The refill side otherwise: buffers for the next `recvmmsg`.
    free: RefCell<Vec<u16>>,
    /// Buffers on the refill side, as far as the program has seen.
    available: Cell<usize>,
    /// A receiver that found no buffer and waits for one to come back.
    waiter: Cell<Option<Waker>>,
}

impl BufPool {
    /// `count` buffers of `stride` bytes, on the free list; with a kernel ring (and the
    /// bytes of each buffer it offers), the caller then hands them to it with
    /// [`BufPool::fill`].
    pub(crate) fn new(
        count: u16,
        stride: usize,
        ring: Option<(BufRing, u32)>,
    ) -> io::Result<BufPool> {
        let memory = Mapping::new(count as usize * stride)?;
        let (ring, ring_len) = match ring {
            Some((ring, len)) => (Some(ring), len.min(stride as u32)),
            None => (None, 0),
        };
        Ok(BufPool {
            ring_len,
            memory: ManuallyDrop::new(memory),
            stride,
            count,
            refs: (0..count).map(|_| Cell::new(0)).collect(),
            ring,
            free: RefCell::new((0..count).rev().collect()),
            available: Cell::new(count as usize),
            waiter: Cell::new(None),
        })
    }

    /// Moves every buffer of the free list onto the kernel ring (registered).
    pub(crate) fn fill(&self) {
        let Some(ring) = self.kernel_ring() else {
            return;
        };
        let mut free = self.free.borrow_mut();
        for bid in free.drain(..) {
            ring.push(bid, self.buffer_ptr(bid) as u64, self.ring_len);
        }
        ring.publish();
    }

    /// The kernel ring while it is the refill side.
    fn kernel_ring(&self) -> Option<&BufRing> {
        self.ring.as_ref().filter(|ring| ring.is_registered())
    }

    /// Takes the buffers back from the kernel: the ring is unregistered (by `unregister`,
    /// given the ring), and every buffer the program does not hold goes on the free list.
    ///
    /// # Safety
    ///
    /// No operation may select from the ring any more (see `buf_ring`'s memory-safety
    /// section): the free list's buffers go to `recvmmsg` next.
    pub(crate) unsafe fn detach_ring(
        &self,
        unregister: impl FnOnce(&BufRing) -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(ring) = self.kernel_ring() else {
            return Ok(());
        };
        unregister(ring)?;
        let mut free = self.free.borrow_mut();
        free.clear();
        free.extend(
            (0..self.count)
                .rev()
                .filter(|&bid| self.refs[bid as usize].get() == 0),
        );
        Ok(())
    }

    /// Registers the ring again and moves the free list onto it.
    pub(crate) fn attach_ring(
        &self,
        register: impl FnOnce(&BufRing) -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(ring) = &self.ring else {
            return Err(io::Error::other("this pool has no kernel ring"));
        };
        if !ring.is_registered() {
            register(ring)?;
        }
        self.fill();
        Ok(())
    }

    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    pub(crate) fn count(&self) -> u16 {
        self.count
    }

    /// The kernel ring's group id, on io_uring.
    pub(crate) fn bgid(&self) -> Option<u16> {
        self.ring.as_ref().map(BufRing::bgid)
    }

    /// Buffers on the refill side (the kernel ring or the free list).
    pub(crate) fn available(&self) -> usize {
        self.available.get()
    }

    /// Start of buffer `bid`.
    pub(crate) fn buffer_ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.count);
        self.memory
            .as_ptr()
            .wrapping_add(bid as usize * self.stride)
    }

    /// Takes buffer `bid` from the refill side: the kernel reported it filled. Refuses a
    /// buffer the program holds.
    pub(crate) fn claim(&self, bid: u16) -> io::Result<()> {
        let refs = self.refs.get(bid as usize).ok_or_else(|| {
            io::Error::other(format!(
                "buffer id {bid} is outside the ring of {}",
                self.count
            ))
        })?;
        if refs.get() != 0 {
            return Err(io::Error::other(format!(
                "buffer {bid} was handed out while still lent (refused)"
            )));
        }
        refs.set(1);
        self.available.set(self.available.get().saturating_sub(1));
        Ok(())
    }

    /// One more holder of a claimed buffer (a further GRO segment).
    pub(crate) fn add_ref(&self, bid: u16) {
        let refs = &self.refs[bid as usize];
        debug_assert!(refs.get() > 0);
        refs.set(refs.get() + 1);
    }

    /// Drops one hold on `bid`; the last one gives the buffer back to the refill side
    /// and wakes a receiver waiting for buffers.
    pub(crate) fn release(&self, bid: u16) {
        let refs = &self.refs[bid as usize];
        match refs.get() {
            0 => debug_assert!(false, "buffer {bid} released twice"),
            1 => {
                refs.set(0);
                match self.kernel_ring() {
                    Some(ring) => {
                        ring.push(bid, self.buffer_ptr(bid) as u64, self.ring_len);
                        ring.publish();
                    }
                    None => self.free.borrow_mut().push(bid),
                }
                self.available.set(self.available.get() + 1);
                if let Some(waker) = self.waiter.take() {
                    waker.wake();
                }
            }
            n => refs.set(n - 1),
        }
    }

    /// Claims up to `max` buffers off the free list into `bids` in one go (for
    /// `recvmmsg`); none while the kernel ring holds the free buffers.
    pub(crate) fn pop_free_into(&self, bids: &mut Vec<u16>, max: usize) {
        if self.kernel_ring().is_some() {
            return;
        }
        let mut free = self.free.borrow_mut();
        let take = max.min(free.len());
        let from = free.len() - take;
        for bid in free.drain(from..).rev() {
            self.refs[bid as usize].set(1);
            bids.push(bid);
        }
        self.available
            .set(self.available.get().saturating_sub(take));
    }

    /// Gives back buffers [`pop_free_into`](Self::pop_free_into) claimed that received
    /// nothing, so that they are taken next in the same order.
    pub(crate) fn unpop_free(&self, bids: &[u16]) {
        let mut free = self.free.borrow_mut();
        for &bid in bids.iter().rev() {
            debug_assert_eq!(self.refs[bid as usize].get(), 1, "buffer {bid} was lent");
            self.refs[bid as usize].set(0);
            free.push(bid);
        }
        self.available.set(self.available.get() + bids.len());
    }

    /// Wakes `waker` when a buffer comes back.
    pub(crate) fn wait_for_buffer(&self, waker: &Waker) {
        self.waiter.set(Some(waker.clone()));
    }

    /// How many buffers the program holds right now.
    pub(crate) fn lent(&self) -> usize {
        self.refs.iter().filter(|r| r.get() != 0).count()
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: `memory` is taken exactly once, here.
        let memory = unsafe { ManuallyDrop::take(&mut self.memory) };
        match &mut self.ring {
            // The kernel may know the buffers' addresses until the ring is unregistered:
            // the ring hands the memory to the driver, which frees it after that.
            Some(ring) => ring.retire(memory),
            None => drop(memory),
        }
    }
}

/// Part of one claimed buffer, lent to a received datagram; gives the buffer back when
/// dropped.
pub(crate) struct LentBuf {
    pool: Rc<BufPool>,
    bid: u16,
    offset: u32,
    len: u32,
}

impl LentBuf {
    /// Wraps one hold on buffer `bid` (already claimed, or `add_ref`ed).
    ///
    /// # Safety
    ///
    /// - The caller holds one reference on `bid` and hands it to this LentBuf.
    /// - `offset + len <= stride`, and those bytes were written (by the kernel) before
    ///   the buffer was claimed.
    pub(crate) unsafe fn new(pool: Rc<BufPool>, bid: u16, offset: usize, len: usize) -> LentBuf {
        debug_assert!(offset + len <= pool.stride());
        LentBuf {
            pool,
            bid,
            offset: offset as u32,
            len: len as u32,
        }
    }
}

impl Deref for LentBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        let start = self
            .pool
            .buffer_ptr(self.bid)
            .wrapping_add(self.offset as usize);
        // SAFETY: the bytes are inside the pool's mapping (LentBuf::new's contract), were
        // written before the claim, and are not written again while this LentBuf holds
        // the buffer: the refill side gets it back only after the last hold is released.
        unsafe { std::slice::from_raw_parts(start, self.len as usize) }
    }
}

impl Drop for LentBuf {
    fn drop(&mut self) {
        self.pool.release(self.bid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_pool_lends_each_buffer_once() {
        let pool = Rc::new(BufPool::new(4, 64, None).unwrap());
        let mut taken = Vec::new();
        pool.pop_free_into(&mut taken, 3);
        assert_eq!(taken, [0, 1, 2]);
        // Given back unused, they are taken next in the same order.
        pool.unpop_free(&taken[1..]);
        assert_eq!(pool.available(), 3);
        taken.truncate(1);
        pool.pop_free_into(&mut taken, 8);
        assert_eq!(taken, [0, 1, 2, 3]);
        assert_eq!(pool.available(), 0);
        assert!(
            pool.claim(taken[0]).is_err(),
            "a lent buffer must be refused"
        );
        // SAFETY: each bid is claimed once and handed to exactly one LentBuf.
        let lent: Vec<LentBuf> = taken
            .iter()
            .map(|&bid| unsafe { LentBuf::new(pool.clone(), bid, 0, 8) })
            .collect();
        assert_eq!(pool.lent(), 4);
        drop(lent);
        assert_eq!(pool.available(), 4);
        assert_eq!(pool.lent(), 0);
    }

    #[test]
    fn shared_buffer_returns_after_last_segment() {
        let pool = Rc::new(BufPool::new(1, 64, None).unwrap());
        let mut one = Vec::new();
        pool.pop_free_into(&mut one, 1);
        let bid = one[0];
        pool.add_ref(bid);
        // SAFETY: two holds (claim + add_ref), one per LentBuf, inside the stride.
        let (a, b) = unsafe {
            (
                LentBuf::new(pool.clone(), bid, 0, 32),
                LentBuf::new(pool.clone(), bid, 32, 32),
            )
        };
        drop(a);
        assert_eq!(pool.available(), 0);
        drop(b);
        assert_eq!(pool.available(), 1);
    }
}
