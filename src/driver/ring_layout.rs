//! How a receive ring's memory is cut up: the one place that decides how large its
//! buffers are, how many there are, and where `recvmmsg` puts each datagram. Shared by
//! both engines, so the ring's memory is the same whichever receives.
//!
//! The ring is `datagrams` slots of `capacity` payload bytes plus their header room
//! ([`header_room`]): that product is its memory, mapped once when the first receive sets it up. How the slots
//! are grouped into buffers depends on how the kernel fills them:
//!
//! - One slot per buffer (epoll, and io_uring without incremental buffers): the kernel's
//!   ring or `recvmmsg` puts one datagram in each buffer.
//! - [`SHARED_SLOTS`] slots per buffer (io_uring with
//!   [`Capability::IncrementalBuffers`](crate::driver::Capability::IncrementalBuffers)):
//!   the multishot receive packs datagrams one after the other into a buffer until less
//!   than a header and `capacity` bytes are left, so a buffer holds hundreds of small
//!   datagrams; while bursts are drained with `recvmmsg`, each of its slots takes one.

use super::cmsg::RecvWants;

/// Shape of a receive ring, as the program asked for it (the engine lays it out with
/// [`Layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingConfig {
    /// Datagrams of `buffer_size` the ring holds at least (a power of two).
    pub(crate) buffers: u16,
    /// Payload bytes a datagram keeps; a longer one is truncated.
    pub(crate) buffer_size: usize,
    /// What the kernel reports beside each datagram: UDP_GRO (buffers may hold
    /// super-datagrams, split on delivery) and the metadata the program asked for.
    pub(crate) wants: RecvWants,
}

/// Room in each slot beside the payload for what the io_uring multishot receive writes
/// before it, when the socket asks for no metadata: `struct io_uring_recvmsg_out` (16
/// bytes), the source address (32) and a UDP_GRO control message (32), rounded up to a
/// cache line. The stride it gives a 64 KiB slot (65,664 bytes) is not a multiple of the
/// page size, so the starts of consecutive datagrams do not all fall into the same cache
/// set.
pub(crate) const HEADER_ROOM: usize = 128;

/// What the multishot receive writes before the control data: its header and the name.
pub(crate) const BEFORE_CONTROL: usize = 16 + 32;

/// The header room of a slot whose datagrams carry `control` bytes of control data:
/// [`HEADER_ROOM`] unless the metadata asked for needs more, so a socket that asks for
/// none keeps the ring it had.
pub(crate) fn header_room(control: usize) -> usize {
    HEADER_ROOM.max((BEFORE_CONTROL + control).next_multiple_of(64))
}

/// Slots an incrementally consumed buffer spans. Four 64 KiB slots make a buffer of
/// 256 KiB, of which about 192 KiB take small datagrams before fewer than 64 KiB are
/// left and the kernel moves on: a ring of 64 slots packs about 14,000 datagrams of
/// 172 bytes (896 per buffer) into 16 buffers, where one datagram per slot holds 64. More slots per
/// buffer pack more, but a buffer goes back to the kernel only once every datagram in it
/// is dropped, and `recvmmsg` can take only whole free buffers.
pub(crate) const SHARED_SLOTS: u16 = 4;

/// The shape of one socket's receive pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Buffers in the pool (a power of two).
    pub(crate) buffers: u16,
    /// Bytes from one buffer's start to the next.
    pub(crate) stride: usize,
    /// Slots per buffer: datagrams one `recvmmsg` may put in it.
    pub(crate) slots: u16,
    /// Bytes from one slot's start to the next.
    pub(crate) slot_stride: usize,
    /// Payload bytes a datagram keeps: a longer one is delivered truncated to this.
    pub(crate) capacity: usize,
}

impl Layout {
    /// The pool for `config`; `shared` when the kernel consumes buffers incrementally.
    pub(crate) fn new(config: &RingConfig, shared: bool) -> Layout {
        let datagrams = config.buffers.max(1);
        let capacity = config.buffer_size.max(1);
        let slot_stride = slot_stride(capacity, config.wants.control_len());
        // `datagrams` is a power of two, so both are.
        let slots = if shared {
            SHARED_SLOTS.min(datagrams)
        } else {
            1
        };
        Layout {
            buffers: datagrams / slots,
            stride: slot_stride.saturating_mul(slots as usize),
            slots,
            slot_stride,
            capacity,
        }
    }

    /// Bytes the pool maps.
    pub(crate) fn memory(&self) -> usize {
        self.stride.saturating_mul(self.buffers as usize)
    }
}

/// Bytes one slot of `capacity` payload bytes and `control` bytes of control data takes.
/// Saturates rather than wraps: a stride that cannot be mapped fails the mapping, where a
/// wrapped one would lay every buffer over the same few bytes.
fn slot_stride(capacity: usize, control: usize) -> usize {
    capacity
        .saturating_add(header_room(control))
        .checked_next_multiple_of(64)
        .unwrap_or(usize::MAX)
}

/// The memory of a ring of `datagrams` slots (rounded up to a power of two, as the
/// socket does) of `capacity` bytes, with `control` bytes of control data per datagram:
/// the same for every layout of it.
pub(crate) fn ring_memory(datagrams: u16, capacity: usize, control: usize) -> usize {
    let datagrams = datagrams.clamp(1, 32768).next_power_of_two() as usize;
    slot_stride(capacity.max(1), control).saturating_mul(datagrams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(buffers: u16, buffer_size: usize) -> RingConfig {
        RingConfig {
            buffers,
            buffer_size,
            wants: RecvWants::default(),
        }
    }

    #[test]
    fn shared_buffers_keep_the_memory_and_hold_the_largest_datagram() {
        for (buffers, size) in [(64, 65_536), (1, 65_536), (2, 100), (512, 2048)] {
            let one = Layout::new(&config(buffers, size), false);
            let shared = Layout::new(&config(buffers, size), true);
            assert_eq!(one.memory(), shared.memory(), "{buffers} x {size}");
            assert_eq!(one.memory(), ring_memory(buffers, size, 0));
            assert_eq!(one.slots, 1);
            assert_eq!(
                shared.buffers as usize * shared.slots as usize,
                buffers as usize
            );
            assert!(
                shared.stride >= size + 80,
                "a buffer holds header and payload"
            );
        }
        let default = Layout::new(&config(64, 65_536), true);
        assert_eq!((default.buffers, default.slots), (16, 4));
        assert_eq!(default.slot_stride, 65_664);
        assert_eq!(default.memory(), 4_202_496);
        // Metadata adds header room only when asked, and GRO alone fits the default.
        let mut all = config(64, 65_536);
        all.wants = RecvWants {
            gro: true,
            destination: true,
            traffic_class: true,
            timestamp: true,
        };
        assert_eq!(Layout::new(&all, true).slot_stride, 65_536 + 256);
        all.wants = RecvWants {
            gro: true,
            ..RecvWants::default()
        };
        assert_eq!(Layout::new(&all, true).slot_stride, 65_664);
    }
}
