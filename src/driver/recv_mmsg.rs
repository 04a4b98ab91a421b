//! `recvmmsg` into the free slots of a receive pool: the epoll receiver's one path,
//! and the io_uring receiver's while datagrams come in bursts (see
//! `uring::datagram`). Takes up to 64 datagrams per call whatever the caller asked for
//! (the slots offered follow what recent calls found), and keeps the ones not asked for
//! yet: a program that reads one datagram at a time from a full queue still costs one
//! system call per 64 once the offer has grown.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;

use super::buf_pool::BufPool;
use super::cmsg::{RecvMeta, RecvWants};
use super::recv::{deliver, RecvCounters, RecvDatagram};
use super::sockaddr::addr_from_bytes;

/// A wake that finds at least this many datagrams ready means they arrive faster than
/// the loop sleeps and wakes: the receiver stops leaving a wait on the socket while it
/// drains (io_uring: the multishot receive; epoll: the socket's place in the epoll set).
pub(crate) const BURST: u32 = 8;
/// A wake that finds fewer datagrams than this is a quiet one; between `QUIET` and
/// `BURST` a receiver keeps the way it waits, so it does not switch back and forth.
pub(crate) const QUIET: u32 = BURST / 2;
/// After this many quiet wakes in a row, the receiver waits the sparse-traffic way again.
pub(crate) const QUIET_WAKES: u32 = 8;

/// Most datagrams one `recvmmsg` takes.
pub(crate) const RECV_SLOTS: usize = 64;
/// Fewest slots a call offers. Each slot offered costs a claimed buffer, a header written
/// and a claim given back when it stays empty: offering all 64 to a socket that gets one
/// datagram per wake cost about 7,000 instructions per datagram (callgrind, a relay over
/// 64 sockets), seven tenths of the receiver's user-space work.
const MIN_OFFER: usize = 4;

/// What one [`MmsgReceiver::receive`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Every slot offered was filled: the socket may hold more.
    More,
    /// The socket's queue was empty when the call returned (fewer datagrams than slots,
    /// or none): a datagram arriving later raises a new readiness event.
    Empty,
    /// Every buffer is lent to the program (or on the kernel's ring): no call was made.
    NoBuffers,
}

/// A receiver's `recvmmsg` state: address and control slots, and datagrams received but
/// not yet taken.
pub(crate) struct MmsgReceiver {
    // One entry per slot, `RECV_SLOTS` of each, allocated once: a call rewrites what
    // differs between calls (the buffer, and the lengths the kernel wrote back) instead
    // of building every header again from zero, which cost about 35 instructions per
    // datagram, a tenth of the receiver's user-space work (callgrind).
    names: Box<[libc::sockaddr_in6]>,
    /// `control_words` words of control room per slot (none unless asked for).
    controls: Box<[u64]>,
    control_words: usize,
    iovecs: Box<[libc::iovec]>,
    headers: Box<[libc::mmsghdr]>,
    /// The buffers claimed for the call.
    bids: Vec<u16>,
    /// Per slot of the call: its buffer and where in it the slot starts.
    slots: Vec<(u16, usize)>,
    /// Received, in order, not taken yet.
    ready: Vec<RecvDatagram>,
    /// Slots the next call offers: twice what recent calls found, doubled after a call
    /// that filled them all (the caller calls again at once then), halved at most per
    /// call so one quiet wake in a burst does not shrink it to nothing.
    offer: usize,
}

impl MmsgReceiver {
    /// A receiver with room for the control data `wants` asks for.
    pub(crate) fn new(wants: RecvWants) -> MmsgReceiver {
        let control_words = wants.control_len().div_ceil(8);
        // SAFETY: sockaddr_in6, iovec and mmsghdr are plain old data; zero is a valid
        // (empty) value of each.
        let (name, iovec, header) = unsafe {
            (
                std::mem::zeroed::<libc::sockaddr_in6>(),
                std::mem::zeroed::<libc::iovec>(),
                std::mem::zeroed::<libc::mmsghdr>(),
            )
        };
        MmsgReceiver {
            names: vec![name; RECV_SLOTS].into_boxed_slice(),
            controls: vec![0; control_words * RECV_SLOTS].into_boxed_slice(),
            control_words,
            iovecs: vec![iovec; RECV_SLOTS].into_boxed_slice(),
            headers: vec![header; RECV_SLOTS].into_boxed_slice(),
            bids: Vec::with_capacity(RECV_SLOTS),
            slots: Vec::with_capacity(RECV_SLOTS),
            ready: Vec::with_capacity(RECV_SLOTS),
            offer: MIN_OFFER,
        }
    }

    /// Moves up to `max` datagrams received earlier into `out`; how many it moved.
    pub(crate) fn take_ready(&mut self, out: &mut Vec<RecvDatagram>, max: usize) -> usize {
        let n = max.min(self.ready.len());
        if n == self.ready.len() {
            out.append(&mut self.ready);
        } else {
            out.extend(self.ready.drain(..n));
        }
        n
    }

    /// The ready queue, for a receiver that delivers by other means (io_uring's
    /// multishot): what it appends is taken after what is there.
    pub(crate) fn ready_mut(&mut self) -> &mut Vec<RecvDatagram> {
        &mut self.ready
    }

    /// Datagrams received and not taken yet.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// One non-blocking `recvmmsg` into up to 64 free slots of `pool` (as many as recent
    /// calls suggest will be used); what it got
    /// waits for [`take_ready`](Self::take_ready). The caller counts the system call
    /// unless the answer is [`Drained::NoBuffers`].
    pub(crate) fn receive(
        &mut self,
        fd: RawFd,
        pool: &Rc<BufPool>,
        counters: &mut RecvCounters,
    ) -> io::Result<Drained> {
        self.bids.clear();
        self.slots.clear();
        let offer = self.offer;
        pool.claim_free(&mut self.bids, offer);
        let layout = *pool.layout();
        for &bid in &self.bids {
            for slot in 0..layout.slots as usize {
                self.slots.push((bid, slot * layout.slot_stride));
            }
        }
        self.slots.truncate(offer);
        if self.slots.is_empty() {
            return Ok(Drained::NoBuffers);
        }
        let capacity = layout.capacity;
        let slots = self.slots.len();
        let words = self.control_words;
        let control_room = words * 8;
        let slots_in_use = self
            .headers
            .iter_mut()
            .zip(&self.slots)
            .zip(self.names.iter_mut())
            .zip(self.iovecs.iter_mut());
        for (((header, &(bid, at)), name), iovec) in slots_in_use {
            *iovec = libc::iovec {
                iov_base: pool.buffer_ptr(bid).wrapping_add(at).cast(),
                iov_len: capacity,
            };
            let msg = &mut header.msg_hdr;
            msg.msg_name = std::ptr::from_mut(name).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            msg.msg_iov = iovec;
            msg.msg_iovlen = 1;
            msg.msg_flags = 0;
        }
        if words > 0 {
            let slots_in_use = self.headers.iter_mut().zip(self.controls.chunks_mut(words));
            for (header, control) in slots_in_use.take(slots) {
                header.msg_hdr.msg_control = control.as_mut_ptr().cast();
                header.msg_hdr.msg_controllen = control_room;
            }
        }
        // SAFETY: the first `slots` headers point to live name slots, control slots (with
        // GRO) and iovecs over `capacity` bytes of slots in claimed pool buffers (each
        // slot's stride holds more), all alive and untouched by us across the call.
        // MSG_TRUNC makes msg_len the datagram's real length.
        let received = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                slots as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            let err = io::Error::last_os_error();
            pool.release_claims(&self.bids);
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(Drained::Empty),
                io::ErrorKind::Interrupted => Ok(Drained::More),
                _ => Err(err),
            };
        }
        let received = (received as usize).min(slots);
        self.offer = if received == slots {
            (offer * 2).min(RECV_SLOTS)
        } else {
            (received * 2).clamp((offer / 2).max(MIN_OFFER), RECV_SLOTS)
        };
        if received > 0 {
            counters.deliveries += 1;
        }
        let filled = self.headers[..received]
            .iter()
            .zip(&self.slots)
            .zip(self.names.iter());
        for (j, ((header, &(bid, at)), name)) in filled.enumerate() {
            let real = header.msg_len as usize;
            let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || real > capacity;
            if header.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0 {
                counters.control_truncated += 1;
            }
            let name_len = (header.msg_hdr.msg_namelen as usize)
                .min(std::mem::size_of::<libc::sockaddr_in6>());
            // SAFETY: the kernel wrote `name_len` bytes of address into this slot.
            let name = unsafe {
                std::slice::from_raw_parts(
                    (name as *const libc::sockaddr_in6).cast::<u8>(),
                    name_len,
                )
            };
            let meta = if words > 0 {
                let control_len = header.msg_hdr.msg_controllen.min(control_room);
                // SAFETY: the kernel wrote `control_len` bytes of control data into this
                // slot's `words` words.
                let control = unsafe {
                    std::slice::from_raw_parts(
                        self.controls[j * words..].as_ptr().cast::<u8>(),
                        control_len,
                    )
                };
                RecvMeta::parse(control)
            } else {
                RecvMeta::default()
            };
            // SAFETY: `bid` is claimed (claim_free) until release_claims below; the kernel
            // wrote min(real, capacity) bytes at the slot's start, and nothing writes
            // there again until the buffer is free.
            unsafe {
                deliver(
                    pool,
                    bid,
                    at,
                    real.min(capacity),
                    real,
                    truncated,
                    addr_from_bytes(name),
                    meta,
                    counters,
                    &mut self.ready,
                )
            };
        }
        // The buffers that got datagrams stay held by them; the others are free again.
        pool.release_claims(&self.bids);
        Ok(if received < slots {
            Drained::Empty
        } else {
            Drained::More
        })
    }
}
