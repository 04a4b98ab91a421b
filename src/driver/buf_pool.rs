//! Receive buffers lent to datagrams: a pool of equal-sized buffers in one mapping, cut
//! as [`Layout`] says.
//!
//! A buffer is free (on the pool's free list, for the next `recvmmsg`) or held, counted
//! in `refs`, by any of:
//!
//! - the kernel's provided buffer ring ([`KernelRing`], which the io_uring engine
//!   implements), while the buffer is on it: the kernel fills it from its receive point on;
//! - a `recvmmsg` in progress that claimed it;
//! - the program: one [`LentBuf`] per datagram in it (several when the kernel packs
//!   datagrams into a buffer, or a GRO super-datagram is split).
//!
//! A buffer goes back to the refill side (the kernel ring while it is registered, else
//! the free list) only when its last hold is dropped. The kernel fills a buffer only
//! while it is on the ring and only past its receive point; the datagrams lent from it
//! lie before that point. A buffer the kernel reports while it is not on the ring, or
//! bytes past its end, are refused as an error rather than read: no bytes a datagram
//! shows can be overwritten while it lives.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::io;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::rc::Rc;
use std::task::Waker;

pub(crate) use super::mapping::Mapping;
use super::ring_layout::Layout;

/// A ring of buffer entries the kernel selects receive buffers from, as the pool uses it.
///
/// The engine that has such rings implements it and registers the ring itself; the pool
/// only fills entries and hands the ring its memory to free when it goes. Kept as a
/// trait so that this shared module depends on no engine.
pub(crate) trait KernelRing: std::any::Any {
    /// Whether the kernel knows the ring now (it selects from it only then).
    fn is_registered(&self) -> bool;
    /// The buffer group id operations select from.
    fn group(&self) -> u16;
    /// Writes an entry for buffer `bid` at `addr`, `len` bytes; visible to the kernel
    /// after [`publish`](Self::publish). Returns the entry's index.
    fn push(&self, bid: u16, addr: u64, len: u32) -> u16;
    /// The address entry `index` shows now (the kernel moves it with incremental
    /// consumption).
    fn entry_addr(&self, index: u16) -> Option<u64>;
    /// Makes every pushed entry visible to the kernel.
    fn publish(&self);
    /// Takes the buffers' memory, to free only once the kernel has forgotten the ring.
    fn retire(&mut self, buffers: Mapping);
}

/// Buffers a kernel ring that consumes them incrementally starts with (see
/// `BufPool::ring_target`): one being filled and the next, with room to spare.
const INCREMENTAL_RING_START: u16 = 4;

/// Equal-sized receive buffers, each on the refill side or held (by datagrams, by the
/// kernel ring, or by a `recvmmsg` in progress), never both.
pub(crate) struct BufPool {
    /// Freed in Drop, after the kernel ring (if any) says the kernel is done with it.
    memory: ManuallyDrop<Mapping>,
    layout: Layout,
    /// Per buffer, what the pool knows of it: one array, so that a receive, a datagram's
    /// hold and its release touch one cache line of the pool rather than one per fact
    /// (a relay over many sockets visits each pool too rarely to find it cached).
    buffers: Box<[BufferState]>,
    /// The kernel's provided buffer ring (io_uring): the refill side while registered.
    ring: Option<Box<dyn KernelRing>>,
    /// Bytes of each buffer the ring offers the kernel (at most the stride).
    ring_len: u32,
    /// With incremental consumption, the kernel reports where it stopped in a buffer's
    /// ring entry: checked against `filled`.
    incremental: bool,
    /// The refill side otherwise: buffers for the next `recvmmsg`. While the kernel ring
    /// is registered, the reserve behind it: buffers past [`ring_target`](Self::ring_target)
    /// wait here, the one freed last on top, to go on the ring when the kernel leaves one.
    free: RefCell<Vec<u16>>,
    /// Buffers on the kernel ring now.
    on_ring: Cell<usize>,
    /// Buffers the ring is kept at. With incremental consumption a buffer holds hundreds
    /// of small datagrams, so a few on the ring take any burst the socket's queue does
    /// and the kernel sweeps over few buffers, warm in the cache, instead of over the
    /// whole pool (4 MiB per socket by default: a relay over many sockets touched fresh
    /// memory with every datagram). Doubled each time the ring runs dry while buffers
    /// wait in the reserve; every buffer without incremental consumption.
    ring_target: Cell<usize>,
    /// A receiver that found no buffer and waits for one to come back.
    waiter: Cell<Option<Waker>>,
    /// Buffers with at least one datagram lent to a send.
    loaned_buffers: Cell<usize>,
}

/// What the pool knows of one buffer.
#[derive(Default)]
struct BufferState {
    /// Its holders: one per `LentBuf`, one while it is on the kernel ring, one while a
    /// `recvmmsg` has claimed it. 0 = on the free list.
    refs: Cell<u32>,
    /// While it is on the ring: the bytes the kernel has filled (its receive point,
    /// which only moves past the first datagram with incremental consumption).
    filled: Cell<u32>,
    /// Its datagrams lent to sends ([`SendLoan`]).
    loans: Cell<u32>,
    /// The kernel ring's entry that names it, while it is on the ring.
    on_ring: Cell<Option<u16>>,
}

impl BufPool {
    /// The buffers of `layout`, on the free list; with a kernel ring (and the bytes of
    /// each buffer it offers, and whether the kernel consumes them incrementally), the
    /// caller then hands them to it with [`BufPool::fill`].
    pub(crate) fn new(
        layout: Layout,
        ring: Option<(Box<dyn KernelRing>, u32, bool)>,
    ) -> io::Result<BufPool> {
        let memory = Mapping::new(layout.memory())?;
        let count = layout.buffers;
        let (ring, ring_len, incremental): (Option<Box<dyn KernelRing>>, u32, bool) = match ring {
            Some((ring, len, incremental)) => {
                (Some(ring), len.min(layout.stride as u32), incremental)
            }
            None => (None, 0, false),
        };
        Ok(BufPool {
            memory: ManuallyDrop::new(memory),
            layout,
            buffers: (0..count).map(|_| BufferState::default()).collect(),
            ring,
            ring_len,
            incremental,
            free: RefCell::new((0..count).rev().collect()),
            on_ring: Cell::new(0),
            ring_target: Cell::new(match incremental {
                true => (INCREMENTAL_RING_START as usize).min(count as usize),
                false => count as usize,
            }),
            waiter: Cell::new(None),
            loaned_buffers: Cell::new(0),
        })
    }

    /// Moves buffers of the free list onto the kernel ring (registered) until it holds
    /// its target, the one freed last first.
    pub(crate) fn fill(&self) {
        let Some(ring) = self.kernel_ring() else {
            return;
        };
        let mut pushed = false;
        while self.on_ring.get() < self.ring_target.get() {
            let Some(bid) = self.free.borrow_mut().pop() else {
                break;
            };
            self.push_to_ring(ring, bid);
            pushed = true;
        }
        if pushed {
            ring.publish();
        }
    }

    /// The kernel ring ran dry (ENOBUFS): if buffers waited in the reserve, the ring was
    /// kept too small for this socket's bursts, so it keeps twice as many from now on.
    pub(crate) fn ran_dry(&self) {
        if self.kernel_ring().is_some() && !self.free.borrow().is_empty() {
            let all = self.layout.buffers as usize;
            self.ring_target
                .set((self.ring_target.get() * 2).clamp(1, all));
            self.fill();
        }
    }

    /// Buffers the kernel ring is kept at (see the field).
    #[cfg(test)]
    pub(crate) fn ring_target(&self) -> usize {
        self.ring_target.get()
    }

    /// Hands free buffer `bid` to the kernel ring (visible after `publish`).
    fn push_to_ring(&self, ring: &dyn KernelRing, bid: u16) {
        let index = ring.push(bid, self.buffer_ptr(bid) as u64, self.ring_len);
        self.buffers[bid as usize].refs.set(1);
        self.buffers[bid as usize].on_ring.set(Some(index));
        self.buffers[bid as usize].filled.set(0);
        self.on_ring.set(self.on_ring.get() + 1);
    }

    /// Buffer `bid` leaves the kernel ring (its hold is dropped by the caller).
    fn left_ring(&self, bid: u16) -> bool {
        let left = self.buffers[bid as usize].on_ring.take().is_some();
        if left {
            self.on_ring.set(self.on_ring.get() - 1);
        }
        left
    }

    /// The kernel ring while it is the refill side.
    fn kernel_ring(&self) -> Option<&dyn KernelRing> {
        self.ring.as_deref().filter(|ring| ring.is_registered())
    }

    /// The pool's kernel ring as the engine's own type `R`, which registers it.
    fn ring_as<R: KernelRing>(&self) -> io::Result<&R> {
        let ring: &dyn std::any::Any = self
            .ring
            .as_deref()
            .ok_or_else(|| io::Error::other("this pool has no kernel ring"))?;
        ring.downcast_ref::<R>()
            .ok_or_else(|| io::Error::other("this pool's kernel ring is of another engine"))
    }

    /// Takes the buffers back from the kernel: the ring is unregistered (by `unregister`,
    /// given the ring), and every buffer the program does not hold goes on the free list.
    ///
    /// # Safety
    ///
    /// No operation may select from the ring any more (the io_uring engine's buffer ring
    /// documents why): the free list's buffers go to `recvmmsg` next.
    pub(crate) unsafe fn detach_ring<R: KernelRing>(
        &self,
        unregister: impl FnOnce(&R) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.kernel_ring().is_none() {
            return Ok(());
        }
        unregister(self.ring_as::<R>()?)?;
        // From the last buffer down, so that the free list hands out the first first.
        for bid in (0..self.layout.buffers).rev() {
            if self.left_ring(bid) {
                self.drop_hold(bid);
            }
        }
        Ok(())
    }

    /// Registers the ring again and moves the free list onto it.
    pub(crate) fn attach_ring<R: KernelRing>(
        &self,
        register: impl FnOnce(&R) -> io::Result<()>,
    ) -> io::Result<()> {
        let ring = self.ring_as::<R>()?;
        if !ring.is_registered() {
            register(ring)?;
        }
        self.fill();
        Ok(())
    }

    /// The pool's shape.
    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The kernel ring's group id, on io_uring.
    pub(crate) fn bgid(&self) -> Option<u16> {
        self.ring.as_deref().map(|ring| ring.group())
    }

    /// Buffers the kernel ring or the next `recvmmsg` can still fill (a buffer the
    /// kernel is part-way through counts): none means the ring is dry until the program
    /// drops a datagram.
    pub(crate) fn available(&self) -> usize {
        self.free.borrow().len() + self.on_ring.get()
    }

    /// Start of buffer `bid`.
    pub(crate) fn buffer_ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.layout.buffers);
        self.memory
            .as_ptr()
            .wrapping_add(bid as usize * self.layout.stride)
    }

    /// The kernel reported `len` bytes written into buffer `bid` from the ring: returns
    /// where in the buffer they start (its receive point) and moves that past them.
    /// `more`: the kernel keeps the buffer for further receives (IORING_CQE_F_BUF_MORE),
    /// so its ring entry shows where it stopped, which must not be behind. Refuses a
    /// buffer that is not on the ring and bytes past its end: they are not read.
    pub(crate) fn kernel_filled(&self, bid: u16, len: usize, more: bool) -> io::Result<usize> {
        let not_on_ring = || {
            io::Error::other(format!(
                "buffer {bid} was reported filled while not on the kernel ring (refused)"
            ))
        };
        let buffer = self.buffers.get(bid as usize).ok_or_else(not_on_ring)?;
        let index = buffer.on_ring.get().ok_or_else(not_on_ring)?;
        let start = buffer.filled.get() as usize;
        let end = start.saturating_add(len);
        if end > self.ring_len as usize {
            return Err(io::Error::other(format!(
                "the kernel reported {len} bytes at {start} of a {}-byte buffer (refused)",
                self.ring_len
            )));
        }
        if more && self.incremental {
            // The kernel may be further on already (completions not reaped yet), but
            // never behind: behind, it would write over bytes lent to datagrams.
            let base = self.buffer_ptr(bid) as u64;
            let ours = base + end as u64;
            let kernels = self.ring.as_ref().and_then(|ring| ring.entry_addr(index));
            let agrees =
                kernels.is_some_and(|point| point >= ours && point <= base + self.ring_len as u64);
            if !agrees {
                return Err(io::Error::other(format!(
                    "buffer {bid}: the kernel's receive point is behind the completions (refused)"
                )));
            }
        }
        buffer.filled.set(end as u32);
        Ok(start)
    }

    /// The kernel is done with buffer `bid` (its last completion had no BUF_MORE): it
    /// leaves the ring, and returns to it once the datagrams in it are dropped.
    pub(crate) fn kernel_done(&self, bid: u16) {
        if self.left_ring(bid) {
            self.drop_hold(bid);
            self.fill();
        }
    }

    /// One more holder of a held buffer (a datagram in it).
    pub(crate) fn add_ref(&self, bid: u16) {
        let refs = &self.buffers[bid as usize].refs;
        debug_assert!(refs.get() > 0, "buffer {bid} is not held");
        refs.set(refs.get() + 1);
    }

    /// Drops one hold on `bid` (a datagram's); see [`BufPool::drop_hold`].
    pub(crate) fn release(&self, bid: u16) {
        self.drop_hold(bid);
    }

    /// Drops one hold on `bid`; the last one gives the buffer back to the refill side
    /// and wakes a receiver waiting for buffers.
    fn drop_hold(&self, bid: u16) {
        let refs = &self.buffers[bid as usize].refs;
        match refs.get() {
            0 => debug_assert!(false, "buffer {bid} released twice"),
            1 => {
                refs.set(0);
                match self.kernel_ring() {
                    Some(ring) if self.on_ring.get() < self.ring_target.get() => {
                        self.push_to_ring(ring, bid);
                        ring.publish();
                    }
                    _ => self.free.borrow_mut().push(bid),
                }
                if let Some(waker) = self.waiter.take() {
                    waker.wake();
                }
            }
            n => refs.set(n - 1),
        }
    }

    /// Claims free buffers into `bids` until they have at least `slots` slots (for
    /// `recvmmsg`), each held once; none while the kernel ring holds the free buffers.
    /// Give the claims back with [`release_claims`](Self::release_claims) once the
    /// datagrams received into them hold their buffers.
    pub(crate) fn claim_free(&self, bids: &mut Vec<u16>, slots: usize) {
        if self.kernel_ring().is_some() {
            return;
        }
        let per_buffer = self.layout.slots as usize;
        let mut free = self.free.borrow_mut();
        let take = slots.div_ceil(per_buffer).min(free.len());
        let from = free.len() - take;
        for bid in free.drain(from..).rev() {
            self.buffers[bid as usize].refs.set(1);
            bids.push(bid);
        }
    }

    /// Drops the holds [`claim_free`](Self::claim_free) took: buffers that received
    /// nothing go back to the free list, to be claimed next in the same order.
    pub(crate) fn release_claims(&self, bids: &[u16]) {
        for &bid in bids.iter().rev() {
            self.drop_hold(bid);
        }
    }

    /// Wakes `waker` when a buffer comes back.
    pub(crate) fn wait_for_buffer(&self, waker: &Waker) {
        self.waiter.set(Some(waker.clone()));
    }

    /// Most buffers datagrams lent to sends may hold: a quarter of the pool (at least
    /// one), never every buffer, so forwarding without a copy never drains the ring. A
    /// pool of one buffer lends none: its datagrams are copied.
    pub(crate) fn loan_cap(&self) -> usize {
        let buffers = self.layout.buffers as usize;
        (buffers / 4).max(1).min(buffers.saturating_sub(1))
    }

    /// Buffers held by datagrams lent to sends.
    pub(crate) fn loaned_buffers(&self) -> usize {
        self.loaned_buffers.get()
    }

    /// Counts one more datagram of `bid` lent to a send, if the cap allows: a buffer
    /// that has one already takes more freely.
    fn take_loan(&self, bid: u16) -> bool {
        let loans = &self.buffers[bid as usize].loans;
        if loans.get() == 0 {
            if self.loaned_buffers.get() >= self.loan_cap() {
                return false;
            }
            self.loaned_buffers.set(self.loaned_buffers.get() + 1);
        }
        loans.set(loans.get() + 1);
        true
    }

    fn end_loan(&self, bid: u16) {
        let loans = &self.buffers[bid as usize].loans;
        debug_assert!(loans.get() > 0, "buffer {bid}: a loan ended twice");
        loans.set(loans.get().saturating_sub(1));
        if loans.get() == 0 {
            self.loaned_buffers
                .set(self.loaned_buffers.get().saturating_sub(1));
        }
    }

    /// How many buffers hold datagrams the program has not dropped yet.
    pub(crate) fn lent(&self) -> usize {
        self.buffers
            .iter()
            .filter(|buffer| buffer.refs.get() > buffer.on_ring.get().is_some() as u32)
            .count()
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

/// Part of one held buffer, lent to a received datagram; drops its hold when dropped.
pub(crate) struct LentBuf {
    pool: Rc<BufPool>,
    bid: u16,
    offset: u32,
    len: u32,
}

impl LentBuf {
    /// Wraps one hold on buffer `bid` (taken with `add_ref`).
    ///
    /// # Safety
    ///
    /// - The caller holds one reference on `bid` and hands it to this LentBuf.
    /// - `offset + len` is within the buffer's stride, those bytes were written (by the
    ///   kernel) before the hold was taken, and the kernel does not write them again
    ///   while the buffer is held (they lie before its receive point).
    pub(crate) unsafe fn new(pool: Rc<BufPool>, bid: u16, offset: usize, len: usize) -> LentBuf {
        debug_assert!(offset + len <= pool.layout().stride);
        LentBuf {
            pool,
            bid,
            offset: offset as u32,
            len: len as u32,
        }
    }
}

impl LentBuf {
    /// Counts this datagram as lent to a send (its bytes go out without a copy, and its
    /// buffer comes back once the send is done with them), if the pool's cap allows:
    /// `None` when datagrams lent to sends hold [`BufPool::loan_cap`] buffers already.
    pub(crate) fn loan_for_send(&self) -> Option<SendLoan> {
        self.pool.take_loan(self.bid).then(|| SendLoan {
            pool: self.pool.clone(),
            bid: self.bid,
        })
    }
}

/// One datagram's bytes lent to a send, counted against the pool's cap until dropped
/// (with the datagram, which holds the buffer itself).
pub(crate) struct SendLoan {
    pool: Rc<BufPool>,
    bid: u16,
}

impl Drop for SendLoan {
    fn drop(&mut self) {
        self.pool.end_loan(self.bid);
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
    use crate::driver::ring_layout::RingConfig;

    fn pool(buffers: u16, shared: bool) -> Rc<BufPool> {
        let config = RingConfig {
            buffers,
            buffer_size: 64,
            wants: Default::default(),
        };
        Rc::new(BufPool::new(Layout::new(&config, shared), None).unwrap())
    }

    #[test]
    fn claimed_buffers_are_held_until_their_datagrams_are_dropped() {
        let pool = pool(4, false);
        let mut taken = Vec::new();
        pool.claim_free(&mut taken, 3);
        assert_eq!(taken, [0, 1, 2]);
        // Two received datagrams, the third buffer nothing.
        pool.add_ref(0);
        pool.add_ref(1);
        // SAFETY: one hold per LentBuf (add_ref above), inside the stride.
        let lent = unsafe {
            [
                LentBuf::new(pool.clone(), 0, 0, 8),
                LentBuf::new(pool.clone(), 1, 0, 8),
            ]
        };
        pool.release_claims(&taken);
        assert_eq!(pool.available(), 2);
        assert_eq!(pool.lent(), 2);
        assert!(
            pool.kernel_filled(0, 8, false).is_err(),
            "a buffer not on a kernel ring must be refused"
        );
        // The unused one is claimed next, then the untouched one.
        taken.clear();
        pool.claim_free(&mut taken, 8);
        assert_eq!(taken, [2, 3]);
        pool.release_claims(&taken);
        drop(lent);
        assert_eq!(pool.available(), 4);
        assert_eq!(pool.lent(), 0);
    }

    #[test]
    fn shared_buffers_give_recvmmsg_several_slots_each() {
        let pool = pool(8, true);
        assert_eq!(pool.layout().slots, 4);
        let mut taken = Vec::new();
        pool.claim_free(&mut taken, 5);
        assert_eq!(taken.len(), 2, "five slots need two buffers of four");
        pool.release_claims(&taken);
        assert_eq!(pool.available(), 2);
    }

    /// A kernel ring that remembers which buffers it was given, in order.
    #[derive(Default)]
    struct RecordingRing {
        pushed: RefCell<Vec<u16>>,
    }

    impl KernelRing for RecordingRing {
        fn is_registered(&self) -> bool {
            true
        }
        fn group(&self) -> u16 {
            0
        }
        fn push(&self, bid: u16, _addr: u64, _len: u32) -> u16 {
            let mut pushed = self.pushed.borrow_mut();
            pushed.push(bid);
            (pushed.len() - 1) as u16
        }
        fn entry_addr(&self, _index: u16) -> Option<u64> {
            None
        }
        fn publish(&self) {}
        fn retire(&mut self, buffers: Mapping) {
            drop(buffers);
        }
    }

    fn pushed(pool: &BufPool) -> Vec<u16> {
        pool.ring_as::<RecordingRing>()
            .unwrap()
            .pushed
            .borrow()
            .clone()
    }

    /// An incremental ring of 16 buffers, as a default socket's: the kernel is given
    /// four, and each one it finishes is replaced by the one freed last, so a steady
    /// receiver cycles through a few warm buffers and never touches the other twelve.
    fn incremental_pool() -> Rc<BufPool> {
        let config = RingConfig {
            buffers: 64,
            buffer_size: 64,
            wants: Default::default(),
        };
        let layout = Layout::new(&config, true);
        assert_eq!(layout.buffers, 16);
        let ring: Box<dyn KernelRing> = Box::new(RecordingRing::default());
        let pool = Rc::new(BufPool::new(layout, Some((ring, 64, true))).unwrap());
        pool.fill();
        pool
    }

    #[test]
    fn an_incremental_ring_keeps_a_few_buffers_and_reuses_the_warm_ones() {
        let pool = incremental_pool();
        assert_eq!(pushed(&pool), [0, 1, 2, 3]);
        assert_eq!(pool.available(), 16);
        // The kernel finishes buffer 0 while a datagram in it is still held: buffer 4
        // comes from the reserve, so the ring keeps four.
        pool.add_ref(0);
        // SAFETY: one hold (add_ref), inside the stride.
        let held = unsafe { LentBuf::new(pool.clone(), 0, 0, 8) };
        pool.kernel_done(0);
        assert_eq!(pushed(&pool), [0, 1, 2, 3, 4]);
        // Dropped, buffer 0 waits on top of the reserve (the ring has its four); a
        // buffer the kernel finishes with nothing in it held goes straight back.
        drop(held);
        pool.kernel_done(1);
        assert_eq!(pushed(&pool), [0, 1, 2, 3, 4, 1]);
        // One still held when the kernel finishes it is replaced by buffer 0, the one
        // freed last, not by a buffer no receive has touched.
        pool.add_ref(2);
        // SAFETY: one hold (add_ref), inside the stride.
        let held = unsafe { LentBuf::new(pool.clone(), 2, 0, 8) };
        pool.kernel_done(2);
        assert_eq!(pushed(&pool), [0, 1, 2, 3, 4, 1, 0]);
        drop(held);
        assert_eq!(pool.ring_target(), 4);
        assert_eq!(pool.available(), 16);
        assert_eq!(pool.lent(), 0);
    }

    #[test]
    fn a_ring_that_runs_dry_with_buffers_in_reserve_grows() {
        let pool = incremental_pool();
        // A burst filled all four before the program looked: every one held.
        let mut held = Vec::new();
        for bid in 0..4 {
            pool.add_ref(bid);
            // SAFETY: one hold (add_ref), inside the stride.
            held.push(unsafe { LentBuf::new(pool.clone(), bid, 0, 8) });
        }
        // Reaped in order, each finished buffer was replaced from the reserve; then the
        // ring ran dry all the same: the burst outran four.
        for bid in 0..4 {
            pool.kernel_done(bid);
        }
        assert_eq!(pushed(&pool)[4..], [4, 5, 6, 7]);
        pool.ran_dry();
        assert_eq!(pool.ring_target(), 8);
        assert_eq!(pushed(&pool)[8..], [8, 9, 10, 11]);
        pool.ran_dry();
        pool.ran_dry();
        assert_eq!(pool.ring_target(), 16, "never past the pool");
        assert_eq!(pool.available(), 12);
        drop(held);
        assert_eq!(pool.available(), 16);
        // With every buffer on the ring or held, a dry ring has nothing to grow with.
        let mut taken = Vec::new();
        pool.claim_free(&mut taken, 1);
        assert!(
            taken.is_empty(),
            "the ring is the refill side while registered"
        );
    }

    #[test]
    fn a_buffer_returns_after_its_last_datagram() {
        let pool = pool(1, false);
        let mut one = Vec::new();
        pool.claim_free(&mut one, 1);
        let bid = one[0];
        pool.add_ref(bid);
        pool.add_ref(bid);
        // SAFETY: two holds (add_ref), one per LentBuf, inside the stride.
        let (a, b) = unsafe {
            (
                LentBuf::new(pool.clone(), bid, 0, 32),
                LentBuf::new(pool.clone(), bid, 32, 32),
            )
        };
        pool.release_claims(&one);
        drop(a);
        assert_eq!(pool.available(), 0);
        drop(b);
        assert_eq!(pool.available(), 1);
    }
}
