//! Just enough IPv4/IPv6 and TCP/UDP header reading and writing for segmentation and
//! coalescing. IPv6 extension headers are not walked: such packets pass unchanged.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::checksum;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
/// IP protocol numbers.
pub const PROTO_UDP: u8 = 17;

/// TCP flag bits (byte 13 of the header).
pub(crate) const TCP_FIN: u8 = 0x01;
#[cfg(test)]
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_PSH: u8 = 0x08;
pub(crate) const TCP_ACK: u8 = 0x10;
pub(crate) const TCP_CWR: u8 = 0x80;

/// Where an IP packet's parts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpInfo {
    pub(crate) v6: bool,
    /// Bytes of the IP header: the transport header starts here.
    pub(crate) header_len: usize,
    pub(crate) protocol: u8,
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    /// IPv4: more fragments set or a fragment offset (a fragment is never coalesced).
    pub(crate) fragment: bool,
}

/// Reads the IP header of `packet`; `None` if it is not a whole IPv4/IPv6 header or the
/// packet is shorter than its header says.
pub(crate) fn parse(packet: &[u8]) -> Option<IpInfo> {
    match packet.first()? >> 4 {
        4 => {
            let header_len = ((packet[0] & 0x0f) as usize) * 4;
            if header_len < 20 || packet.len() < header_len {
                return None;
            }
            let total = u16::from_be_bytes([packet[2], packet[3]]) as usize;
            if total < header_len || total > packet.len() {
                return None;
            }
            let src: [u8; 4] = packet[12..16].try_into().ok()?;
            let dst: [u8; 4] = packet[16..20].try_into().ok()?;
            let frag = u16::from_be_bytes([packet[6], packet[7]]);
            Some(IpInfo {
                v6: false,
                header_len,
                protocol: packet[9],
                src: IpAddr::V4(Ipv4Addr::from(src)),
                dst: IpAddr::V4(Ipv4Addr::from(dst)),
                fragment: frag & 0x3fff != 0,
            })
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let payload = u16::from_be_bytes([packet[4], packet[5]]) as usize;
            if 40 + payload > packet.len() {
                return None;
            }
            let src: [u8; 16] = packet[8..24].try_into().ok()?;
            let dst: [u8; 16] = packet[24..40].try_into().ok()?;
            Some(IpInfo {
                v6: true,
                header_len: 40,
                protocol: packet[6],
                src: IpAddr::V6(Ipv6Addr::from(src)),
                dst: IpAddr::V6(Ipv6Addr::from(dst)),
                fragment: false,
            })
        }
        _ => None,
    }
}

/// The packet's length as its IP header says (trailing bytes beyond it are padding).
pub(crate) fn ip_len(packet: &[u8], info: &IpInfo) -> usize {
    if info.v6 {
        40 + u16::from_be_bytes([packet[4], packet[5]]) as usize
    } else {
        u16::from_be_bytes([packet[2], packet[3]]) as usize
    }
}

/// Sets the IP length field for a packet of `len` bytes (header included) and, on IPv4,
/// recomputes the header checksum.
pub(crate) fn set_ip_len(packet: &mut [u8], info: &IpInfo, len: usize) {
    if info.v6 {
        packet[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        refresh_ipv4_checksum(packet, info.header_len);
    }
}

/// Recomputes an IPv4 header's checksum.
pub(crate) fn refresh_ipv4_checksum(packet: &mut [u8], header_len: usize) {
    packet[10] = 0;
    packet[11] = 0;
    let sum = checksum::finish(checksum::add(0, &packet[..header_len]));
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Bytes of the TCP header at `at`, if it is whole and sane.
pub(crate) fn tcp_header_len(packet: &[u8], at: usize) -> Option<usize> {
    let len = ((*packet.get(at + 12)? >> 4) as usize) * 4;
    (len >= 20 && at + len <= packet.len()).then_some(len)
}

pub(crate) fn u32_at(packet: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(packet[at..at + 4].try_into().expect("4 bytes"))
}

/// Computes the TCP or UDP checksum of the transport part (from `at` to the end) and
/// stores it; UDP's zero becomes 0xffff (zero means "no checksum").
pub(crate) fn fill_transport_checksum(packet: &mut [u8], info: &IpInfo, at: usize) {
    let field = at + if info.protocol == PROTO_TCP { 16 } else { 6 };
    packet[field] = 0;
    packet[field + 1] = 0;
    let len = (packet.len() - at) as u32;
    let sum = checksum::pseudo_header(info.src, info.dst, info.protocol, len);
    let mut value = checksum::finish(checksum::add(sum, &packet[at..]));
    if value == 0 && info.protocol == PROTO_UDP {
        value = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&value.to_be_bytes());
}

/// Parses a packet whose length field is not set yet (tests build packets this way).
#[cfg(test)]
pub(crate) fn parse_lenient(packet: &[u8]) -> IpInfo {
    let mut copy = packet.to_vec();
    if copy[0] >> 4 == 4 {
        let len = copy.len() as u16;
        copy[2..4].copy_from_slice(&len.to_be_bytes());
    } else {
        let len = (copy.len() - 40) as u16;
        copy[4..6].copy_from_slice(&len.to_be_bytes());
    }
    parse(&copy).expect("a built packet")
}
