//! What a datagram carries beside its bytes: the traffic class (DSCP and ECN) and, on
//! the way out, the source address; and a datagram of a batch to many destinations.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Instant;

use bytes::Bytes;

use crate::{Error, Result};

/// The ECN codepoint of a datagram (RFC 3168): the low two bits of the traffic class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Ecn {
    /// Not ECN-capable transport (0b00).
    #[default]
    NotEct,
    /// ECN-capable transport, codepoint 1 (0b01; L4S).
    Ect1,
    /// ECN-capable transport, codepoint 0 (0b10).
    Ect0,
    /// Congestion experienced (0b11).
    Ce,
}

impl Ecn {
    /// The codepoint from the two low bits of `bits`.
    pub fn from_bits(bits: u8) -> Ecn {
        match bits & 0b11 {
            0b00 => Ecn::NotEct,
            0b01 => Ecn::Ect1,
            0b10 => Ecn::Ect0,
            _ => Ecn::Ce,
        }
    }

    /// The two bits of the codepoint.
    pub fn bits(self) -> u8 {
        match self {
            Ecn::NotEct => 0b00,
            Ecn::Ect1 => 0b01,
            Ecn::Ect0 => 0b10,
            Ecn::Ce => 0b11,
        }
    }
}

impl FromStr for Ecn {
    type Err = Error;

    /// `not-ect`, `ect0`, `ect1` or `ce`.
    fn from_str(text: &str) -> Result<Ecn> {
        match text.to_ascii_lowercase().as_str() {
            "not-ect" => Ok(Ecn::NotEct),
            "ect0" => Ok(Ecn::Ect0),
            "ect1" => Ok(Ecn::Ect1),
            "ce" => Ok(Ecn::Ce),
            _ => Err(Error::invalid_input(format!(
                "ECN codepoint {text:?}: expected not-ect, ect0, ect1 or ce"
            ))),
        }
    }
}

impl fmt::Display for Ecn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ecn::NotEct => "not-ect",
            Ecn::Ect0 => "ect0",
            Ecn::Ect1 => "ect1",
            Ecn::Ce => "ce",
        })
    }
}

/// The traffic class of a datagram: the IPv4 TOS byte or the IPv6 Traffic Class, a
/// DSCP (upper six bits) and an ECN codepoint (lower two). VoIP audio is DSCP 46,
/// Expedited Forwarding (RFC 8837).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TrafficClass {
    dscp: u8,
    ecn: Ecn,
}

impl TrafficClass {
    /// DSCP Expedited Forwarding (46), for interactive audio (RFC 8837).
    pub const DSCP_EF: u8 = 46;

    /// A traffic class of `dscp` (0..=63) and `ecn`.
    pub fn new(dscp: u8, ecn: Ecn) -> Result<TrafficClass> {
        if dscp > 63 {
            return Err(Error::invalid_input(format!(
                "DSCP {dscp} is out of range (0..=63)"
            )));
        }
        Ok(TrafficClass { dscp, ecn })
    }

    /// The traffic class of a TOS / Traffic Class byte.
    pub fn from_byte(byte: u8) -> TrafficClass {
        TrafficClass {
            dscp: byte >> 2,
            ecn: Ecn::from_bits(byte),
        }
    }

    /// The TOS / Traffic Class byte.
    pub fn to_byte(self) -> u8 {
        (self.dscp << 2) | self.ecn.bits()
    }

    /// The Differentiated Services codepoint (0..=63).
    pub fn dscp(self) -> u8 {
        self.dscp
    }

    /// The ECN codepoint.
    pub fn ecn(self) -> Ecn {
        self.ecn
    }
}

/// What a sent datagram carries beyond its bytes and destination, per datagram
/// ([`DatagramSocket::send_to_addr_with`](super::DatagramSocket::send_to_addr_with),
/// [`OutgoingDatagram`]) or per batch
/// ([`DatagramSocket::output_stream_to_addr_with`](super::DatagramSocket::output_stream_to_addr_with)).
/// The default attaches nothing, and sends as a plain datagram does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SendOptions {
    /// The source address (IP_PKTINFO / IPV6_PKTINFO): a local address of the host. A
    /// server bound to a wildcard address answers a request from the address it came
    /// to ([`Datagram::local_ip`](super::Datagram::local_ip)), which a client behind a
    /// NAT or talking to a multi-homed host needs. An address the host does not own
    /// fails that datagram with the kernel's error (such as NetworkIsUnreachable), whose
    /// message names the source.
    pub source: Option<IpAddr>,
    /// The traffic class (IP_TOS / IPV6_TCLASS): DSCP and ECN.
    pub traffic_class: Option<TrafficClass>,
    /// When the datagram leaves (pacing), per datagram only: never before. The
    /// runtime's timers release it, or, on a socket with
    /// [`set_kernel_pacing`](super::DatagramSocketControl::set_kernel_pacing), the
    /// kernel (SO_TXTIME). A time in the past sends at once.
    pub transmit_at: Option<Instant>,
}

impl SendOptions {
    /// Options of a reply to `datagram`: from the address it was sent to, if the socket
    /// reports it ([`set_receive_destination`]); for a datagram sent to a broadcast
    /// address or a multicast group, from the receiving interface's own address (IPv4)
    /// or from whatever address the kernel picks (IPv6): a group is no source.
    ///
    /// [`set_receive_destination`]: super::DatagramSocketControl::set_receive_destination
    pub fn reply_to(datagram: &super::Datagram) -> SendOptions {
        SendOptions {
            source: datagram.reply_source(),
            ..SendOptions::default()
        }
    }

    /// These options with the datagram leaving at `at`, not before.
    pub fn with_transmit_time(mut self, at: Instant) -> SendOptions {
        self.transmit_at = Some(at);
        self
    }

    /// These options with `class` as the traffic class.
    pub fn with_traffic_class(mut self, class: TrafficClass) -> SendOptions {
        self.traffic_class = Some(class);
        self
    }
}

/// One datagram of a batch to many destinations
/// ([`DatagramSocket::send_many`](super::DatagramSocket::send_many)). The payload is
/// any bytes: `Bytes` by default, or a received datagram's own
/// ([`Forward`](crate::Forward), sent on without a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingDatagram<B = Bytes> {
    /// The payload.
    pub data: B,
    /// Where it goes.
    pub to: SocketAddr,
    /// What it carries besides.
    pub options: SendOptions,
}

impl OutgoingDatagram {
    /// `data` to `to`, with no options.
    pub fn new(data: impl Into<Bytes>, to: SocketAddr) -> OutgoingDatagram {
        OutgoingDatagram::of(data.into(), to)
    }
}

impl<B> OutgoingDatagram<B> {
    /// `data` (any bytes, such as a [`Forward`](crate::Forward)) to `to`, with no
    /// options.
    pub fn of(data: B, to: SocketAddr) -> OutgoingDatagram<B> {
        OutgoingDatagram {
            data,
            to,
            options: SendOptions::default(),
        }
    }

    /// This datagram with `options`.
    pub fn with_options(mut self, options: SendOptions) -> OutgoingDatagram<B> {
        self.options = options;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traffic_class_bytes_round_trip() {
        let ef = TrafficClass::new(TrafficClass::DSCP_EF, Ecn::Ect0).unwrap();
        assert_eq!(ef.to_byte(), 0xba);
        assert_eq!(TrafficClass::from_byte(0xba), ef);
        for byte in 0..=255u8 {
            assert_eq!(TrafficClass::from_byte(byte).to_byte(), byte);
        }
        assert!(TrafficClass::new(64, Ecn::NotEct).is_err());
        for ecn in [Ecn::NotEct, Ecn::Ect0, Ecn::Ect1, Ecn::Ce] {
            assert_eq!(ecn.to_string().parse::<Ecn>().unwrap(), ecn);
        }
        assert!("ect2".parse::<Ecn>().is_err());
    }
}
