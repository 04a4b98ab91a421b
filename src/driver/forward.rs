//! A received datagram's bytes sent on without a copy: the send reads them where the
//! kernel put them, in the receive ring, and the buffer goes back to the ring once the
//! send is done with them; and the rule a socket forwards by on its own. Shared by both
//! engines (a send takes any [`IoBuf`]).
#![allow(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;

use super::buf_pool::{LentBuf, SendLoan};
use super::recv::{Payload, RecvDatagram};
use crate::buf::IoBuf;

/// Where a socket sends on what it receives, by itself
/// ([`DatagramSocket::forward_received`](crate::DatagramSocket::forward_received)): every
/// datagram to one address, from the socket it arrived on, but those a test keeps for
/// the program.
#[derive(Clone, Copy)]
pub struct Forwarding {
    to: SocketAddr,
    deliver: Option<fn(&[u8]) -> bool>,
}

impl Forwarding {
    /// Every datagram on to `to`.
    pub fn to(to: SocketAddr) -> Forwarding {
        Forwarding { to, deliver: None }
    }

    /// The datagrams for which `deliver` returns true (a relay's control messages, an
    /// end marker) are received by the program as usual instead of forwarded. It is
    /// called with each datagram's payload as the engine takes it in, so it should be
    /// quick; it cannot reach the socket or the runtime.
    pub fn delivering(self, deliver: fn(&[u8]) -> bool) -> Forwarding {
        Forwarding {
            deliver: Some(deliver),
            ..self
        }
    }

    /// Where the datagrams go.
    pub fn destination(&self) -> SocketAddr {
        self.to
    }

    /// The same rule to `to` (the address as the socket's family writes it).
    pub(crate) fn with_destination(self, to: SocketAddr) -> Forwarding {
        Forwarding { to, ..self }
    }

    /// Whether `datagram` goes on: whole (a cut one cannot be sent as it came) and not
    /// kept for the program.
    pub(crate) fn forwards(&self, datagram: &RecvDatagram) -> bool {
        !datagram.truncated && !self.deliver.is_some_and(|deliver| deliver(&datagram.buf))
    }
}

impl fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarding")
            .field("to", &self.to)
            .field("delivering", &self.deliver.is_some())
            .finish()
    }
}

/// A received [`Datagram`](crate::Datagram)'s payload on its way out again
/// ([`Datagram::into_forward`](crate::Datagram::into_forward)): pass it to any send that takes an [`IoBuf`]
/// (`send_to_addr`, `send`, on this socket or another), which gives it back when it is
/// done, or put it in a batch to many peers
/// ([`OutgoingDatagram::of`](crate::OutgoingDatagram::of)); dropping it then returns the
/// receive buffer to the ring.
///
/// Datagrams lent to sends may hold at most a quarter of the ring's buffers (at least
/// one, but never the last: a ring of one buffer lends none), so forwarding never leaves
/// the ring dry; past that, a datagram's bytes are
/// copied and its buffer goes back at once ([`is_zero_copy`](Self::is_zero_copy) tells).
/// Where io_uring packs datagrams into shared buffers, a buffer spans four of the ring's
/// datagram slots (`receive_stats().buffers` says how many buffers there are), so a ring
/// of under 16 slots has too few buffers for a quarter: one buffer lent is then up to
/// half of it, and the kernel may find the ring dry sooner (the datagrams wait in the
/// socket's queue meanwhile, none is lost). Give a relay that forwards a larger ring.
pub struct Forward {
    body: Body,
}

enum Body {
    /// The bytes in the receive ring; the loan counts against the cap.
    Lent { buf: LentBuf, _loan: SendLoan },
    /// A copy: the cap was reached.
    Copied(Vec<u8>),
}

impl Forward {
    /// The bytes of a received datagram: lent if they are the ring's and the pool's cap
    /// allows, else copied.
    pub(crate) fn from_payload(payload: Payload) -> Forward {
        match payload {
            Payload::Lent(buf) => Forward::new(buf),
            // Carried from another runtime: already a copy of its own.
            Payload::Owned(bytes) => Forward {
                body: Body::Copied(bytes.to_vec()),
            },
        }
    }

    /// The bytes of `buf`, lent if the pool's cap allows, else copied (and `buf`
    /// dropped, which gives its buffer back).
    fn new(buf: LentBuf) -> Forward {
        let body = match buf.loan_for_send() {
            Some(loan) => Body::Lent { buf, _loan: loan },
            None => Body::Copied(buf.to_vec()),
        };
        Forward { body }
    }

    /// The bytes to send.
    pub fn data(&self) -> &[u8] {
        match &self.body {
            Body::Lent { buf, .. } => buf,
            Body::Copied(bytes) => bytes,
        }
    }

    /// True when the bytes are the receive ring's own, not a copy.
    pub fn is_zero_copy(&self) -> bool {
        matches!(self.body, Body::Lent { .. })
    }
}

// SAFETY: the bytes are the receive ring's (a mapping the datagram's pool keeps alive
// and does not hand back to the kernel while the datagram holds its buffer) or a Vec's
// heap allocation: neither moves with the value, and nothing writes them while it lives.
unsafe impl IoBuf for Forward {
    fn stable_ptr(&self) -> *const u8 {
        self.data().as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.data().len()
    }
}

impl AsRef<[u8]> for Forward {
    fn as_ref(&self) -> &[u8] {
        self.data()
    }
}

impl fmt::Debug for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forward")
            .field("len", &self.data().len())
            .field("zero_copy", &self.is_zero_copy())
            .finish()
    }
}
