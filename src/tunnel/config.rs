//! How a tunnel runs: its addresses, key, batch size and timer intervals.

use std::net::SocketAddr;
use std::time::Duration;

use super::PresharedKey;

/// How a [`Tunnel`](super::Tunnel) runs.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// The UDP address to listen on.
    pub listen: SocketAddr,
    /// The peer's UDP address; without it, learned from the first data message that
    /// authenticates.
    pub peer: Option<SocketAddr>,
    /// The pre-shared key.
    pub key: PresharedKey,
    /// Most frames or datagrams handled per batch (default 64; 1 to 1024, else joining
    /// is an InvalidArgument error).
    pub batch: usize,
    /// A side that received but has sent nothing for this long sends an empty message,
    /// so its peer knows the session lives (default 1 s).
    pub keepalive: Duration,
    /// A side that sent data but heard nothing authentic for this long starts a new
    /// handshake: its peer may have restarted (default 3 s).
    pub rehandshake_after: Duration,
    /// An unanswered Init is sent again, with a new random, after this long
    /// (default 500 ms).
    pub handshake_retry: Duration,
}

impl TunnelConfig {
    /// The defaults, with these addresses and key.
    pub fn new(listen: SocketAddr, peer: Option<SocketAddr>, key: PresharedKey) -> TunnelConfig {
        TunnelConfig {
            listen,
            peer,
            key,
            batch: 64,
            keepalive: Duration::from_secs(1),
            rehandshake_after: Duration::from_secs(3),
            handshake_retry: Duration::from_millis(500),
        }
    }
}
