//! The virtio-net header that comes before every packet on a TUN queue opened with
//! IFF_VNET_HDR: what offload the packet carries and where its checksum is to be
//! completed.

/// Bytes of the header on the queue (`struct virtio_net_hdr`).
pub const VNET_HDR_LEN: usize = 10;

/// `flags`: the checksum is partial; complete it from `csum_start` (see
/// [`VnetHeader::csum_start`]).
pub const NEEDS_CSUM: u8 = 1;

/// The kind of super-segment a packet is (`gso_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    /// A plain packet.
    None,
    /// A TCP over IPv4 super-segment.
    TcpV4,
    /// A TCP over IPv6 super-segment.
    TcpV6,
    /// A UDP super-datagram (USO): segments are datagrams of their own.
    UdpL4,
}

const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
/// The ECN bit a TCP super-segment may carry besides its type.
const GSO_ECN: u8 = 0x80;

/// A parsed virtio-net header (little-endian on the queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetHeader {
    /// [`NEEDS_CSUM`] or 0.
    pub flags: u8,
    /// What the packet is.
    pub gso_type: GsoType,
    /// Bytes of the IP and transport headers (a hint).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed part starts (the transport header).
    pub csum_start: u16,
    /// Where the checksum field is, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// The header of a plain, fully checksummed packet.
    pub const PLAIN: VnetHeader = VnetHeader {
        flags: 0,
        gso_type: GsoType::None,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Parses the first [`VNET_HDR_LEN`] bytes; `None` if they are too few or name a
    /// type this reader did not declare (TUNSETOFFLOAD makes the kernel send no other).
    pub fn parse(bytes: &[u8]) -> Option<VnetHeader> {
        let bytes = bytes.get(..VNET_HDR_LEN)?;
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let gso_type = match bytes[1] & !GSO_ECN {
            GSO_NONE => GsoType::None,
            GSO_TCPV4 => GsoType::TcpV4,
            GSO_TCPV6 => GsoType::TcpV6,
            GSO_UDP_L4 => GsoType::UdpL4,
            _ => return None,
        };
        Some(VnetHeader {
            flags: bytes[0],
            gso_type,
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// The header as the queue takes it.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let gso_type = match self.gso_type {
            GsoType::None => GSO_NONE,
            GsoType::TcpV4 => GSO_TCPV4,
            GsoType::TcpV6 => GSO_TCPV6,
            GsoType::UdpL4 => GSO_UDP_L4,
        };
        let mut out = [0u8; VNET_HDR_LEN];
        out[0] = self.flags;
        out[1] = gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out
    }

    /// Whether the checksum is partial.
    pub fn needs_csum(&self) -> bool {
        self.flags & NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let header = VnetHeader {
            flags: NEEDS_CSUM,
            gso_type: GsoType::TcpV6,
            hdr_len: 72,
            gso_size: 1388,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(VnetHeader::parse(&header.to_bytes()), Some(header));
    }

    #[test]
    fn ecn_bit_is_accepted_and_unknown_types_are_not() {
        let mut bytes = VnetHeader::PLAIN.to_bytes();
        bytes[1] = GSO_TCPV4 | GSO_ECN;
        assert_eq!(VnetHeader::parse(&bytes).unwrap().gso_type, GsoType::TcpV4);
        bytes[1] = 3; // VIRTIO_NET_HDR_GSO_UDP (UFO): never declared
        assert_eq!(VnetHeader::parse(&bytes), None);
        assert_eq!(VnetHeader::parse(&bytes[..9]), None);
    }
}
