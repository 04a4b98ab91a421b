//! A point-to-point tunnel: IP packets between a [`TunDevice`](crate::tun::TunDevice) and a UDP peer, each
//! sealed with ChaCha20-Poly1305 under per-direction session keys that a one-round-trip
//! handshake derives from a pre-shared key and fresh randoms.
//!
//! - [`PresharedKey`]: the 32-byte key, as 64 hexadecimal characters in a file.
//! - [`TunnelGroup`]: one tunnel on several threads, each with its own TUN queue and
//!   its own SO_REUSEPORT socket, sharing one session (see there).
//! - [`Tunnel`]: the data path. Out: TUN frames (super-segments with offloads) cut
//!   into packets sized to the path, each sealed, sent as one batch (UDP GSO for runs of
//!   equal sizes) with don't-fragment set. In: datagrams opened (a forged, replayed,
//!   truncated or foreign datagram is dropped and counted, never written), TCP segments
//!   of a flow joined into super-segments, written to the TUN in one batch.
//! - What is authenticated: every handshake message (HMAC-SHA256 under a key derived
//!   from the pre-shared key; an Init no newer than the last one taken is a recorded
//!   copy, not answered) and every data message, its header included (the AEAD's
//!   associated data). A peer's address is learned, and followed when it moves, only
//!   from a data message that authenticates and is not a replay.

mod config;
mod endpoint;
mod group;
mod handshake;
mod key;
mod replay;
mod session;
mod stats;
mod timers;

pub use config::TunnelConfig;
pub use endpoint::Tunnel;
pub use group::TunnelGroup;
pub use key::PresharedKey;
// The TLS files are read the same way (a FIFO no one writes to must not hold the caller).
pub(crate) use key::read_limited;
pub use session::{DATA_HEADER, TAG_LEN};
pub use stats::TunnelStats;

/// Bytes a sealed packet adds to the IP packet it carries: the data header, the tag,
/// and the outer UDP header and IPv4 header (IPv6: 20 more).
pub const OVERHEAD_V4: usize = DATA_HEADER + TAG_LEN + 8 + 20;

/// [`OVERHEAD_V4`] over IPv6: its header is 20 bytes longer.
pub const OVERHEAD_V6: usize = OVERHEAD_V4 + 20;
