//! TUN devices on the engine, with offloads: super-segments cut into packets on the way
//! out of the device ([`segment()`]), and TCP segments joined into super-segments on the
//! way in ([`Coalescer`]), as wireguard-go does in user space.
//!
//! - [`TunDevice`]: one queue of a TUN interface, read in batches, written in batches
//!   with a flush, on io_uring or epoll.
//! - [`vnet`]: the virtio-net header of a queue opened with offloads.
//! - [`segment`](mod@segment), [`Coalescer`], [`checksum`]: the pure functions behind
//!   them, usable on any buffer.

pub mod checksum;
mod coalesce;
mod device;
mod ip;
pub mod segment;
#[cfg(test)]
mod tests;
pub mod vnet;

pub use coalesce::{CoalesceStats, Coalescer};
pub use device::{open_blocking, TunDevice, TunFrame, TunOffloads, TunOptions, TunStats};
pub use ip::{PROTO_TCP, PROTO_UDP};
pub use segment::{segment, Room, SegmentError};
pub use vnet::{GsoType, VnetHeader, VNET_HDR_LEN};
