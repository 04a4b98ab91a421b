//! Received datagrams: the shape of a receive ring, a datagram lent from it, the
//! receiver's counters, and how a filled buffer becomes datagrams (GRO splitting
//! included). Shared by both engines.
#![allow(unsafe_code)]

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;

use super::buf_pool::{BufPool, LentBuf};
pub(crate) use super::cmsg::{RecvMeta, UDP_GRO};

pub(crate) use super::ring_layout::RingConfig;

thread_local! {
    /// Datagrams delivered on this thread, by either engine (a GRO super-datagram once):
    /// how many a wake of the event loop brought tells it whether its sleeps gather
    /// traffic (see `Spin::Adaptive`).
    static DELIVERED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Datagrams delivered on this thread so far (wrapping).
pub(crate) fn delivered_here() -> u64 {
    DELIVERED.with(std::cell::Cell::get)
}

fn count_delivered(count: u64) {
    DELIVERED.with(|delivered| delivered.set(delivered.get().wrapping_add(count)));
}

/// A received datagram's bytes.
pub(crate) enum Payload {
    /// Lent from the receive ring of the socket that received it.
    Lent(LentBuf),
    /// Owned: the datagram came along when its socket moved to this runtime or process.
    Owned(Bytes),
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Lent(buf) => buf,
            Payload::Owned(bytes) => bytes,
        }
    }
}

/// A received datagram not yet taken when its socket detached: its bytes copied out of
/// the ring, so that it can go wherever the socket goes (`Send`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Carried {
    pub(crate) data: Bytes,
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) truncated: bool,
    pub(crate) original_len: usize,
    pub(crate) meta: RecvMeta,
    /// The old owner's forwarding rule kept it for the program (see
    /// [`RecvDatagram::kept`]).
    pub(crate) kept: bool,
}

impl RecvDatagram {
    /// A copy that can leave this runtime.
    pub(crate) fn carry(&self) -> Carried {
        Carried {
            data: Bytes::copy_from_slice(&self.buf),
            addr: self.addr,
            truncated: self.truncated,
            original_len: self.original_len as usize,
            meta: self.meta,
            kept: self.kept,
        }
    }
}

impl Carried {
    /// The datagram again, owning its bytes.
    pub(crate) fn into_received(self) -> RecvDatagram {
        RecvDatagram {
            buf: Payload::Owned(self.data),
            addr: self.addr,
            truncated: self.truncated,
            original_len: datagram_len(self.original_len),
            meta: self.meta,
            kept: self.kept,
        }
    }
}

/// `len` as a datagram length: no datagram is longer than `u32::MAX` bytes.
fn datagram_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// What a receive that returned datagrams left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterRecv {
    /// The socket was found empty and the receiver keeps the poll's waker: it wakes
    /// when the next datagram comes, so a poll before then would only find nothing.
    Waiting,
    /// More may be ready now (the call's `max` was met, or the receive stopped at an
    /// error it drops): poll again before waiting.
    MayHaveMore,
}

/// One received datagram, its bytes lent from the receive ring (or carried along).
pub(crate) struct RecvDatagram {
    pub(crate) buf: Payload,
    pub(crate) addr: Option<SocketAddr>,
    /// The datagram was larger than the buffer: `buf` holds its first bytes only.
    pub(crate) truncated: bool,
    /// The datagram's real length (equal to `buf.len()` unless truncated). A `u32`
    /// (no datagram is longer) keeps the struct within 128 bytes, which the compiler
    /// moves inline rather than by a `memmove` call: a relay moves each one several
    /// times.
    pub(crate) original_len: u32,
    /// What the kernel reported beside it (empty unless the socket asked).
    pub(crate) meta: RecvMeta,
    /// The socket's forwarding rule has kept it for the program already (inside the
    /// io_uring driver): the socket's receive does not ask the rule again.
    pub(crate) kept: bool,
}

/// What a receiver did, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecvCounters {
    pub(crate) datagrams: u64,
    pub(crate) truncated: u64,
    /// Times the ring ran dry (ENOBUFS on io_uring, no free buffer on epoll).
    pub(crate) ring_empty: u64,
    /// Standing receives started again: io_uring's multishot after the kernel ended it
    /// or after a burst; epoll's place in the set after a burst.
    pub(crate) receive_restarts: u64,
    /// Receive completions or `recvmmsg` calls that delivered datagrams.
    pub(crate) deliveries: u64,
    /// GRO super-datagrams split into datagrams.
    pub(crate) gro_splits: u64,
    /// Datagrams whose control messages did not all fit (MSG_CTRUNC).
    pub(crate) control_truncated: u64,
    /// Times the receiver stopped leaving a wait on the socket while it drains, because
    /// datagrams came in bursts (io_uring: the multishot receive gave way to
    /// `recvmmsg`; epoll: the socket leaves the epoll set while it is drained).
    pub(crate) bursts_drained: u64,
    /// Datagrams sent on by the socket's [`Forwarding`](super::forward::Forwarding)
    /// rule rather than delivered (counted in `datagrams` too).
    pub(crate) forwarded: u64,
}

impl RecvCounters {
    /// Both counts together.
    pub(crate) fn plus(self, other: RecvCounters) -> RecvCounters {
        RecvCounters {
            datagrams: self.datagrams + other.datagrams,
            truncated: self.truncated + other.truncated,
            ring_empty: self.ring_empty + other.ring_empty,
            receive_restarts: self.receive_restarts + other.receive_restarts,
            deliveries: self.deliveries + other.deliveries,
            gro_splits: self.gro_splits + other.gro_splits,
            control_truncated: self.control_truncated + other.control_truncated,
            bursts_drained: self.bursts_drained + other.bursts_drained,
            forwarded: self.forwarded + other.forwarded,
        }
    }
}

/// Turns the bytes of one received datagram (or GRO super-datagram) into datagrams:
/// one, or with GRO (`meta.gro_segment`) one per segment, each taking a hold on the
/// buffer and a copy of `meta`. `offset` and `len` place the payload in the buffer.
///
/// # Safety
///
/// - The caller holds `bid` (a claim, or the kernel ring's hold) until this returns.
/// - `offset + len` is within the buffer, the kernel wrote those bytes, and it will not
///   write them again while the buffer is held.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn deliver(
    pool: &Rc<BufPool>,
    bid: u16,
    offset: usize,
    len: usize,
    original_len: usize,
    truncated: bool,
    addr: Option<SocketAddr>,
    meta: RecvMeta,
    counters: &mut RecvCounters,
    out: &mut Vec<RecvDatagram>,
) {
    match meta.gro_segment as usize {
        segment if segment > 0 && !truncated && segment < len => {
            counters.gro_splits += 1;
            let pieces = len.div_ceil(segment);
            // Its pieces came as one: a wake that brings one super-datagram is no
            // sign of traffic gathering while the loop sleeps.
            count_delivered(1);
            for piece in 0..pieces {
                let start = offset + piece * segment;
                let size = segment.min(offset + len - start);
                counters.datagrams += 1;
                pool.add_ref(bid);
                out.push(RecvDatagram {
                    // SAFETY: the hold just taken is this piece's; inside the written
                    // bytes (caller's contract).
                    buf: Payload::Lent(unsafe { LentBuf::new(pool.clone(), bid, start, size) }),
                    addr,
                    truncated: false,
                    original_len: datagram_len(size),
                    meta,
                    kept: false,
                });
            }
        }
        _ => {
            counters.datagrams += 1;
            count_delivered(1);
            if truncated {
                counters.truncated += 1;
            }
            pool.add_ref(bid);
            out.push(RecvDatagram {
                // SAFETY: the hold just taken; the caller's bytes.
                buf: Payload::Lent(unsafe { LentBuf::new(pool.clone(), bid, offset, len) }),
                addr,
                truncated,
                original_len: datagram_len(original_len),
                meta,
                kept: false,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{DatagramSocket, HostName};

    #[test]
    fn a_received_datagram_fits_the_inline_move() {
        // A relay moves each datagram from the ring to its batch to its send; beyond 128
        // bytes every move is a memmove call (a tenth of a relay's user-space time).
        assert!(std::mem::size_of::<super::RecvDatagram>() <= 128);
        assert!(std::mem::size_of::<crate::Datagram>() <= 128);
    }

    #[test]
    fn every_datagram_taken_in_counts_as_delivered_on_this_thread() {
        crate::runtime::on_each_backend(|| async {
            let localhost = HostName::new("127.0.0.1").unwrap();
            let receiver = DatagramSocket::new();
            receiver.bind_host(&localhost, "0").unwrap();
            let sender = DatagramSocket::new();
            sender.bind_host(&localhost, "0").unwrap();
            let to = receiver.local_addr().unwrap();
            let before = super::delivered_here();
            for seq in 0..40u8 {
                sender.send_to_addr(vec![seq; 100], to).await.0.unwrap();
            }
            let mut batch = Vec::new();
            let mut received = 0;
            while received < 40 {
                batch.clear();
                received += receiver.recv_batch(&mut batch, 64).await.unwrap();
            }
            assert_eq!(super::delivered_here().wrapping_sub(before), 40);
        });
    }
}
