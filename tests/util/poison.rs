//! A global allocator that catches writes into freed memory, including the kernel's.
//!
//! Sanitizers cannot see the kernel writing into a buffer the program freed (io_uring
//! writes from kernel context, after the submitting call returned). This allocator
//! fills every freed block with a poison byte and keeps it out of circulation in a
//! quarantine; a block leaves the quarantine (and is really freed) only after its poison
//! was checked intact. [`corrupted`] checks every block still in quarantine. A test that
//! misuses the API, then lets the kernel run, then finds no corruption has shown that no
//! buffer was freed under the kernel.
//!
//! Use it in a test file with `#[global_allocator] static A: util::poison::PoisonAlloc`.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// What a freed block is filled with.
const POISON: u8 = 0xA5;
/// Freed blocks kept out of circulation at once.
const QUARANTINE: usize = 16 * 1024;
/// Blocks larger than this are poisoned and checked only in their first and last
/// `LARGE_EDGE` bytes, so big buffers do not make every free slow.
const LARGE: usize = 1 << 20;
const LARGE_EDGE: usize = 64 * 1024;

#[derive(Clone, Copy)]
struct Freed {
    ptr: *mut u8,
    layout: Layout,
}

struct Quarantine {
    blocks: [Freed; QUARANTINE],
    next: usize,
    len: usize,
}

struct Shared(UnsafeCell<Quarantine>);

// SAFETY: the quarantine is only touched while LOCK is held.
unsafe impl Sync for Shared {}

static LOCK: AtomicBool = AtomicBool::new(false);
static CORRUPTED: AtomicUsize = AtomicUsize::new(0);
static QUARANTINED: Shared = Shared(UnsafeCell::new(Quarantine {
    blocks: [Freed {
        ptr: std::ptr::null_mut(),
        layout: Layout::new::<u8>(),
    }; QUARANTINE],
    next: 0,
    len: 0,
}));

/// See the module.
pub struct PoisonAlloc;

fn lock() {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::hint::spin_loop();
    }
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

/// The byte ranges of a block that carry poison.
fn poisoned_ranges(size: usize) -> [(usize, usize); 2] {
    if size <= LARGE {
        [(0, size), (size, size)]
    } else {
        [(0, LARGE_EDGE), (size - LARGE_EDGE, size)]
    }
}

/// # Safety
///
/// `block.ptr` is a live allocation of `block.layout`, owned by the quarantine.
unsafe fn intact(block: Freed) -> bool {
    poisoned_ranges(block.layout.size())
        .iter()
        .all(|&(from, to)| {
            // SAFETY: the range lies inside the block (the caller's contract).
            let bytes = unsafe { std::slice::from_raw_parts(block.ptr.add(from), to - from) };
            bytes.iter().all(|&b| b == POISON)
        })
}

// SAFETY: every block comes from System with the layout it is freed with; a freed block
// is neither returned again nor freed until it leaves the quarantine.
unsafe impl GlobalAlloc for PoisonAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        for (from, to) in poisoned_ranges(layout.size()) {
            // SAFETY: the caller frees a live block of `layout`; the range is inside it.
            unsafe { std::ptr::write_bytes(ptr.add(from), POISON, to - from) };
        }
        lock();
        // SAFETY: LOCK is held.
        let quarantine = unsafe { &mut *QUARANTINED.0.get() };
        let slot = quarantine.next;
        let evicted = (quarantine.len == QUARANTINE).then(|| quarantine.blocks[slot]);
        quarantine.blocks[slot] = Freed { ptr, layout };
        quarantine.next = (slot + 1) % QUARANTINE;
        quarantine.len = (quarantine.len + 1).min(QUARANTINE);
        unlock();
        if let Some(old) = evicted {
            // SAFETY: the evicted block left the quarantine, which owned it.
            if !unsafe { intact(old) } {
                CORRUPTED.fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: the block came from System with this layout and nobody holds it.
            unsafe { System.dealloc(old.ptr, old.layout) };
        }
    }
}

/// How many freed blocks were written to after they were freed, checking every block
/// still in quarantine now.
pub fn corrupted() -> usize {
    lock();
    // SAFETY: LOCK is held.
    let quarantine = unsafe { &*QUARANTINED.0.get() };
    let found = quarantine.blocks[..quarantine.len]
        .iter()
        // SAFETY: blocks in the quarantine are owned by it and live.
        .filter(|block| !unsafe { intact(**block) })
        .count();
    unlock();
    found + CORRUPTED.load(Ordering::Relaxed)
}
