//! A tunnel's counters.

/// A tunnel's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Packets sealed and sent.
    pub tx_packets: u64,
    /// Their bytes (inner packets).
    pub tx_bytes: u64,
    /// Packets dropped because no session was up yet.
    pub tx_no_session: u64,
    /// TUN frames that could not be segmented (dropped).
    pub tx_bad_frames: u64,
    /// Sends the socket refused: batches of data (their packets dropped), handshakes
    /// and keepalives (retried on their timers).
    pub tx_send_errors: u64,
    /// Packets opened and written to the TUN.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Empty (keepalive) messages received.
    pub rx_keepalives: u64,
    /// Datagrams whose tag did not verify (tampered, or another key): dropped.
    pub rx_auth_failed: u64,
    /// Datagrams replayed or too old for the window: dropped.
    pub rx_replayed: u64,
    /// Datagrams too short, truncated or of no known type: dropped.
    pub rx_malformed: u64,
    /// Data messages for a session this side does not have (sent before this side
    /// restarted, or garbage): dropped.
    pub rx_unknown_session: u64,
    /// Handshake messages whose MAC did not verify (another key): dropped.
    pub handshakes_rejected: u64,
    /// Authentic Inits not answered: no newer than one taken before, or this side's
    /// own sent back (recorded and replayed); and authentic Responses to an Init this
    /// side does not wait for (replayed, or late): dropped.
    pub handshakes_replayed: u64,
    /// Inits sent.
    pub handshakes_initiated: u64,
    /// Inits answered.
    pub handshakes_answered: u64,
    /// Sessions established (as initiator) or confirmed (as responder).
    pub sessions: u64,
    /// Times the peer's address changed.
    pub roams: u64,
    /// Frames the TUN refused.
    pub tun_write_errors: u64,
}

impl TunnelStats {
    /// The sum of two threads' counters, field by field.
    pub fn sum(&self, other: &TunnelStats) -> TunnelStats {
        let TunnelStats {
            tx_packets,
            tx_bytes,
            tx_no_session,
            tx_bad_frames,
            tx_send_errors,
            rx_packets,
            rx_bytes,
            rx_keepalives,
            rx_auth_failed,
            rx_replayed,
            rx_malformed,
            rx_unknown_session,
            handshakes_rejected,
            handshakes_replayed,
            handshakes_initiated,
            handshakes_answered,
            sessions,
            roams,
            tun_write_errors,
        } = *other;
        TunnelStats {
            tx_packets: self.tx_packets + tx_packets,
            tx_bytes: self.tx_bytes + tx_bytes,
            tx_no_session: self.tx_no_session + tx_no_session,
            tx_bad_frames: self.tx_bad_frames + tx_bad_frames,
            tx_send_errors: self.tx_send_errors + tx_send_errors,
            rx_packets: self.rx_packets + rx_packets,
            rx_bytes: self.rx_bytes + rx_bytes,
            rx_keepalives: self.rx_keepalives + rx_keepalives,
            rx_auth_failed: self.rx_auth_failed + rx_auth_failed,
            rx_replayed: self.rx_replayed + rx_replayed,
            rx_malformed: self.rx_malformed + rx_malformed,
            rx_unknown_session: self.rx_unknown_session + rx_unknown_session,
            handshakes_rejected: self.handshakes_rejected + handshakes_rejected,
            handshakes_replayed: self.handshakes_replayed + handshakes_replayed,
            handshakes_initiated: self.handshakes_initiated + handshakes_initiated,
            handshakes_answered: self.handshakes_answered + handshakes_answered,
            sessions: self.sessions + sessions,
            roams: self.roams + roams,
            tun_write_errors: self.tun_write_errors + tun_write_errors,
        }
    }

    /// Every counter with its name, for printing.
    pub fn fields(&self) -> [(&'static str, u64); 19] {
        [
            ("tx_packets", self.tx_packets),
            ("tx_bytes", self.tx_bytes),
            ("tx_no_session", self.tx_no_session),
            ("tx_bad_frames", self.tx_bad_frames),
            ("tx_send_errors", self.tx_send_errors),
            ("rx_packets", self.rx_packets),
            ("rx_bytes", self.rx_bytes),
            ("rx_keepalives", self.rx_keepalives),
            ("rx_auth_failed", self.rx_auth_failed),
            ("rx_replayed", self.rx_replayed),
            ("rx_malformed", self.rx_malformed),
            ("rx_unknown_session", self.rx_unknown_session),
            ("handshakes_rejected", self.handshakes_rejected),
            ("handshakes_replayed", self.handshakes_replayed),
            ("handshakes_initiated", self.handshakes_initiated),
            ("handshakes_answered", self.handshakes_answered),
            ("sessions", self.sessions),
            ("roams", self.roams),
            ("tun_write_errors", self.tun_write_errors),
        ]
    }
}
