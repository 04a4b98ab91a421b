//! The provided buffer ring (IORING_REGISTER_PBUF_RING, Linux 5.19): buffers the kernel
//! picks from when a receive with IOSQE_BUFFER_SELECT completes, so a multishot
//! receive needs no buffer of its own per datagram.
//!
//! # Memory safety
//!
//! The ring is a page-aligned array of `struct io_uring_buf { addr, len, bid, resv }`
//! whose first entry's `resv` doubles as the ring's `tail`. The program writes entries
//! and then publishes the new tail with a Release store; the kernel reads entries up to
//! the tail and fills the buffers they name. This module extends the driver's invariant
//! (see [`super`]) with:
//!
//! > A buffer's memory and the ring's memory stay mapped while any operation that may
//! > select from the ring's group is in flight, and until the ring is unregistered.
//! > A buffer goes onto the ring only while no datagram holds it, and the kernel
//! > writes only bytes of it that no datagram shows.
//!
//! - The buffer pool ([`BufPool`](crate::driver::buf_pool::BufPool)) is reference
//!   counted; every multishot receive holds a clone in its op data, which the driver
//!   keeps until the op's final CQE (also when the receiver is dropped early), and every
//!   lent datagram holds one too. So the memory outlives the kernel's and the program's
//!   last use.
//! - When the last clone goes, the pool hands both mappings to the driver's retire list
//!   instead of unmapping them. The driver unregisters the group (IORING_UNREGISTER_PBUF_RING)
//!   in its next `park` and only then unmaps; if unregistering fails the memory is leaked,
//!   never freed under the kernel. When the driver itself is gone (it waited for every
//!   CQE before going), nothing can select from the ring any more, and the memory is
//!   freed at once.
//! - A buffer id is pushed back on the ring only when its last holder is dropped
//!   (`BufPool::release`); an id the kernel reports while it is not on the ring is
//!   refused.
//! - A ring may be unregistered while its pool lives ([`BufRing::unregister`]), so that
//!   the program can hand the buffers to `recvmmsg` instead; only once no operation may
//!   select from the group (the receiver waits for its multishot's final CQE first).
//!   The kernel then forgets every entry, and the buffers it had not filled are the
//!   program's again. [`BufRing::register_again`] starts the ring afresh (head and
//!   tail 0).
//!
//! # Incremental consumption
//!
//! A ring registered with IOU_PBUF_RING_INC (Linux 6.12) and a `min_left`
//! ([`Capability::IncrementalBuffers`](crate::driver::Capability::IncrementalBuffers))
//! lends each buffer to many receives: each completion takes the bytes it used from
//! where the previous one stopped, and IORING_CQE_F_BUF_MORE says the kernel keeps the
//! buffer for the next one. It gives the buffer up (a completion without that flag)
//! once fewer than `min_left` bytes are left. For a multishot RECVMSG that is the rule
//! that keeps datagrams whole: with `min_left` at least its header plus the largest
//! datagram, the kernel never starts a datagram where it would not fit. (Without
//! `min_left` it would use the tail anyway: truncating the datagram, or failing the
//! receive with EFAULT when not even the header fits.)
//!
//! This adds to the rules above:
//!
//! - The kernel writes the head entry's `addr` and `len` back as it consumes; the
//!   program writes entries only past the published tail, as before, and reads the
//!   kernel's `addr` only to check its own count of a buffer's receive point
//!   ([`BufRing::entry_addr`]).
//! - A buffer the kernel keeps may already hold datagrams the program has been lent:
//!   they lie before the receive point, and the kernel writes only at or after it. The
//!   pool tracks the receive point of every buffer from the completions, in order, and
//!   refuses a completion when the kernel's entry shows a point behind it.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};

use super::Driver;
use crate::driver::buf_pool::KernelRing;
use crate::driver::mapping::Mapping;

/// `struct io_uring_buf` (include/uapi/linux/io_uring.h); 16 bytes.
#[repr(C)]
struct RawEntry {
    addr: u64,
    len: u32,
    bid: u16,
    /// In entry 0: the ring's tail (`struct io_uring_buf_ring`).
    resv: u16,
}

/// `struct io_uring_buf_reg` (include/uapi/linux/io_uring.h) with `min_left`, the field
/// the io-uring crate does not know yet: 40 bytes, as the kernel reads them.
#[repr(C)]
#[derive(Default)]
struct BufReg {
    ring_addr: u64,
    ring_entries: u32,
    bgid: u16,
    flags: u16,
    /// Read by kernels that know it; older ones refuse a non-zero value (EINVAL).
    min_left: u32,
    resv: [u32; 5],
}

/// IORING_REGISTER_PBUF_RING.
const REGISTER_PBUF_RING: libc::c_uint = 22;
/// IOU_PBUF_RING_INC: buffers are consumed incrementally (Linux 6.12).
const PBUF_RING_INC: u16 = 2;

/// Registers an incrementally consumed buffer ring of `entries` at `ring_addr` under
/// `bgid`, whose buffers the kernel gives up once fewer than `min_left` bytes are left.
///
/// # Safety
///
/// The ring memory (page-aligned, `entries` entries) and every buffer it will name stay
/// mapped until the group is unregistered or the io_uring is gone.
pub(crate) unsafe fn register_incremental(
    ring_fd: RawFd,
    ring_addr: u64,
    entries: u16,
    bgid: u16,
    min_left: u32,
) -> io::Result<()> {
    let reg = BufReg {
        ring_addr,
        ring_entries: entries as u32,
        bgid,
        flags: PBUF_RING_INC,
        min_left,
        ..BufReg::default()
    };
    // SAFETY: io_uring_register reads one `struct io_uring_buf_reg` (40 bytes) from
    // `reg`, which lives across the call; the memory it names is the caller's promise.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring_fd,
            REGISTER_PBUF_RING,
            std::ptr::from_ref(&reg),
            1 as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The first buffer group id used (see `Registry::new`).
const FIRST_GROUP: u16 = 64;

/// Most entries one provided buffer ring may have (the kernel's limit).
pub(crate) const MAX_ENTRIES: u16 = 32768;

/// A registered provided buffer ring of one buffer group.
pub(crate) struct BufRing {
    /// `None` once retired.
    memory: Option<Mapping>,
    entries: u16,
    tail: Cell<u16>,
    bgid: u16,
    /// False between [`unregister`](Self::unregister) and
    /// [`register_again`](Self::register_again): the kernel knows no entry.
    registered: Cell<bool>,
    /// Incremental consumption: the `min_left` the ring is registered with.
    min_left: Option<u32>,
    retired: Rc<Retired>,
}

impl BufRing {
    /// Maps a ring of `entries` (a power of two up to 32768) and registers it with the
    /// driver's io_uring under a fresh group id; with `min_left`, incrementally consumed
    /// (see the module's section on it).
    pub(crate) fn register(
        driver: &mut Driver,
        entries: u16,
        min_left: Option<u32>,
    ) -> io::Result<BufRing> {
        if !entries.is_power_of_two() || entries > MAX_ENTRIES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a buffer ring needs a power of two up to {MAX_ENTRIES} entries, not {entries}"
                ),
            ));
        }
        let memory = Mapping::new(entries as usize * std::mem::size_of::<RawEntry>())?;
        let bgid = driver.buf_rings.allocate()?;
        let ring = BufRing {
            memory: Some(memory),
            entries,
            tail: Cell::new(0),
            bgid,
            registered: Cell::new(false),
            min_left,
            retired: driver.buf_rings.retired.clone(),
        };
        // On failure the ring was never registered: dropping it only frees the id and
        // the memory.
        ring.register_again(driver)?;
        Ok(ring)
    }

    /// Registers the ring with the kernel, empty (head and tail 0).
    pub(crate) fn register_again(&self, driver: &mut Driver) -> io::Result<()> {
        let Some(memory) = &self.memory else {
            return Err(io::Error::other("the buffer ring was retired"));
        };
        if self.registered.get() {
            return Ok(());
        }
        self.tail.set(0);
        self.publish();
        driver.count_io_call();
        // SAFETY: the mapping is page-aligned, holds `entries` entries, and stays mapped
        // until the group is unregistered (see the module's memory-safety section).
        let registered = unsafe {
            match self.min_left {
                Some(min_left) => register_incremental(
                    driver.ring.as_raw_fd(),
                    memory.as_ptr() as u64,
                    self.entries,
                    self.bgid,
                    min_left,
                ),
                None => driver.ring.submitter().register_buf_ring_with_flags(
                    memory.as_ptr() as u64,
                    self.entries,
                    self.bgid,
                    0,
                ),
            }
        };
        registered.map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("registering a provided buffer ring (IORING_REGISTER_PBUF_RING, Linux 5.19): {err}"),
            )
        })?;
        self.registered.set(true);
        Ok(())
    }

    /// Makes the kernel forget the ring and every entry on it.
    ///
    /// # Safety
    ///
    /// No operation may select from the group any more (the module's memory-safety
    /// section): the program hands the buffers the kernel had not filled to `recvmmsg`
    /// next, and a selection after this would write into one of them.
    pub(crate) unsafe fn unregister(&self, driver: &mut Driver) -> io::Result<()> {
        if !self.registered.get() {
            return Ok(());
        }
        driver.count_io_call();
        driver.ring.submitter().unregister_buf_ring(self.bgid)?;
        self.registered.set(false);
        Ok(())
    }

    /// Whether the kernel knows the ring now.
    pub(crate) fn is_registered(&self) -> bool {
        self.registered.get()
    }

    /// The buffer group id SQEs select from.
    pub(crate) fn bgid(&self) -> u16 {
        self.bgid
    }

    /// Writes an entry for buffer `bid` at the local tail; the kernel sees it after
    /// [`publish`](Self::publish). Returns the entry's index (for
    /// [`entry_addr`](Self::entry_addr)).
    pub(crate) fn push(&self, bid: u16, addr: u64, len: u32) -> u16 {
        let tail = self.tail.get();
        let index = tail & (self.entries - 1);
        let Some(memory) = &self.memory else {
            return index;
        };
        let entry = memory
            .as_ptr()
            .cast::<RawEntry>()
            .wrapping_add(index as usize);
        // SAFETY: `index < entries`, so the entry is inside the mapping. Only the fields
        // addr/len/bid are written through raw pointers (no reference to the entry is made,
        // so entry 0's `resv`, the tail, is not touched). The kernel reads entries only up
        // to the published tail, and this slot is past it.
        unsafe {
            std::ptr::addr_of_mut!((*entry).addr).write(addr);
            std::ptr::addr_of_mut!((*entry).len).write(len);
            std::ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail.set(tail.wrapping_add(1));
        index
    }

    /// The `addr` of entry `index` as the kernel last wrote it: with incremental
    /// consumption, the receive point of the buffer it is consuming.
    pub(crate) fn entry_addr(&self, index: u16) -> Option<u64> {
        let memory = self.memory.as_ref()?;
        let entry = memory
            .as_ptr()
            .cast::<RawEntry>()
            .wrapping_add((index & (self.entries - 1)) as usize);
        // SAFETY: the index is masked into the mapping; a volatile read of the aligned
        // u64, because the kernel writes it (under its ring lock, before it posts the
        // completion the caller has already reaped).
        Some(unsafe { std::ptr::addr_of!((*entry).addr).read_volatile() })
    }

    /// Makes every pushed entry visible to the kernel (Release store of the tail).
    pub(crate) fn publish(&self) {
        let Some(memory) = &self.memory else {
            return;
        };
        let tail_ptr = memory
            .as_ptr()
            .wrapping_add(std::mem::offset_of!(RawEntry, resv))
            .cast::<AtomicU16>();
        // SAFETY: the tail is the aligned u16 at offset 14 of the page-aligned mapping;
        // the kernel reads it with an Acquire load, and only this thread writes it.
        unsafe { (*tail_ptr).store(self.tail.get(), Ordering::Release) };
    }

    /// Hands the ring and its buffers' memory to the driver, which unregisters the group
    /// before unmapping both (or frees them now when the driver is gone).
    pub(crate) fn retire(&mut self, buffers: Mapping) {
        self.retire_with(Some(buffers));
    }

    fn retire_with(&mut self, buffers: Option<Mapping>) {
        let Some(ring) = self.memory.take() else {
            return;
        };
        let retired = RetiredRing {
            bgid: self.bgid,
            registered: self.registered.get(),
            _ring: ring,
            _buffers: buffers,
        };
        if self.retired.driver_alive.get() {
            self.retired.list.borrow_mut().push(retired);
        }
        // Else: the driver waited for every CQE before it went, so no operation can
        // select from this group any more; `retired` is dropped (unmapped) here.
    }
}

impl Drop for BufRing {
    /// A ring dropped without its pool (the pool failed to build) is retired too.
    fn drop(&mut self) {
        self.retire_with(None);
    }
}

/// A buffer ring nobody uses any more, waiting for the driver to unregister it.
pub(crate) struct RetiredRing {
    bgid: u16,
    /// Unregistered already: nothing to tell the kernel.
    registered: bool,
    _ring: Mapping,
    _buffers: Option<Mapping>,
}

/// Rings waiting to be unregistered, shared by the driver and its rings.
#[derive(Default)]
pub(crate) struct Retired {
    list: RefCell<Vec<RetiredRing>>,
    driver_alive: Cell<bool>,
}

/// The driver's buffer groups: id allocation and retirement.
pub(crate) struct Registry {
    next: u32,
    free: Vec<u16>,
    retired: Rc<Retired>,
}

impl Registry {
    pub(crate) fn new() -> Registry {
        let retired = Rc::new(Retired::default());
        retired.driver_alive.set(true);
        Registry {
            // Linux 6.0-6.8 keep groups below 64 in a fixed array and do not reset a
            // group's head when it is registered again, so a ring registered anew under
            // such an id would be read from the old head, past entries that name
            // buffers the program holds. Groups from 64 up are allocated afresh.
            next: FIRST_GROUP as u32,
            free: Vec::new(),
            retired,
        }
    }

    fn allocate(&mut self) -> io::Result<u16> {
        if let Some(bgid) = self.free.pop() {
            return Ok(bgid);
        }
        if self.next > u16::MAX as u32 {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "every io_uring buffer group id is in use: at most 65,472 datagram sockets \
                 of one runtime receive at a time (a socket dropped while a Datagram of it \
                 is held keeps its id until that Datagram goes)",
            ));
        }
        self.next += 1;
        Ok((self.next - 1) as u16)
    }

    /// True when rings wait to be unregistered.
    pub(crate) fn has_retired(&self) -> bool {
        !self.retired.list.borrow().is_empty()
    }
}

impl Driver {
    /// Unregisters retired rings, then unmaps them (leaks them if the kernel refuses).
    pub(crate) fn drain_retired_rings(&mut self) {
        let list = std::mem::take(&mut *self.buf_rings.retired.list.borrow_mut());
        for ring in list {
            if !ring.registered {
                self.buf_rings.free.push(ring.bgid);
                continue;
            }
            match self.ring.submitter().unregister_buf_ring(ring.bgid) {
                Ok(()) => {
                    self.buf_rings.free.push(ring.bgid);
                    drop(ring);
                }
                // The kernel may still know the addresses: never unmap them.
                Err(_) => std::mem::forget(ring),
            }
        }
    }

    /// Called last in the driver's Drop: later retirements free their memory at once.
    pub(crate) fn close_buf_rings(&mut self) {
        self.drain_retired_rings();
        self.buf_rings.retired.driver_alive.set(false);
    }
}

impl KernelRing for BufRing {
    fn is_registered(&self) -> bool {
        BufRing::is_registered(self)
    }

    fn group(&self) -> u16 {
        self.bgid()
    }

    fn push(&self, bid: u16, addr: u64, len: u32) -> u16 {
        BufRing::push(self, bid, addr, len)
    }

    fn entry_addr(&self, index: u16) -> Option<u64> {
        BufRing::entry_addr(self, index)
    }

    fn publish(&self) {
        BufRing::publish(self)
    }

    fn retire(&mut self, buffers: Mapping) {
        BufRing::retire(self, buffers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_group_ids_is_no_buffer_space_and_a_freed_id_is_used_again() {
        let mut registry = Registry::new();
        let ids = (FIRST_GROUP as u32..=u16::MAX as u32).count();
        for expected in FIRST_GROUP..=u16::MAX {
            assert_eq!(registry.allocate().unwrap(), expected);
        }
        assert_eq!(ids, 65_472, "the count the error and the README give");
        let err = crate::Error::io("set up the receive ring", registry.allocate().unwrap_err());
        assert_eq!(
            err.status(),
            crate::SocketErrorStatus::NoBufferSpace,
            "{err}"
        );
        assert!(err.to_string().contains("65,472"), "{err}");
        registry.free.push(100);
        assert_eq!(registry.allocate().unwrap(), 100);
    }
}
