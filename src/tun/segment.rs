//! GSO in user space: a super-segment read from a TUN queue with its virtio-net header,
//! cut into the plain packets the wire carries (sequence numbers, IP ids, lengths and
//! checksums fixed), and a partial checksum completed.

use std::fmt;

use super::ip::{self, PROTO_TCP, PROTO_UDP, TCP_CWR, TCP_FIN, TCP_PSH};
use super::vnet::{GsoType, VnetHeader};

/// Why a packet from a TUN queue could not be taken apart (it is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentError(&'static str);

impl SegmentError {
    pub(crate) fn new(why: &'static str) -> SegmentError {
        SegmentError(why)
    }
}

impl fmt::Display for SegmentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot segment the packet: {}", self.0)
    }
}

impl std::error::Error for SegmentError {}

/// Where each packet goes: a new buffer with `headroom` zero bytes before the packet and
/// capacity for `tailroom` more after it, for a tunnel to seal in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct Room {
    /// Bytes reserved before each packet.
    pub headroom: usize,
    /// Spare capacity after each packet.
    pub tailroom: usize,
}

impl Room {
    fn buffer(&self, packet_len: usize) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.headroom + packet_len + self.tailroom);
        buf.resize(self.headroom, 0);
        buf
    }
}

/// Turns `packet`, read after the virtio-net header `hdr`, into plain packets and hands
/// each to `emit` (see [`Room`]); returns how many. A plain packet is copied as it is
/// (its partial checksum completed if `hdr` says so); a TCP or UDP super-segment becomes
/// `gso_size`-byte segments.
pub fn segment(
    hdr: &VnetHeader,
    packet: &[u8],
    room: Room,
    emit: &mut dyn FnMut(Vec<u8>),
) -> Result<usize, SegmentError> {
    match hdr.gso_type {
        GsoType::None => {
            let mut buf = room.buffer(packet.len());
            buf.extend_from_slice(packet);
            if hdr.needs_csum() {
                complete_checksum(&mut buf[room.headroom..], hdr)?;
            }
            emit(buf);
            Ok(1)
        }
        GsoType::TcpV4 | GsoType::TcpV6 | GsoType::UdpL4 => split(hdr, packet, room, emit),
    }
}

/// Completes a partial checksum: the field holds the pseudo-header sum; the sum from
/// `csum_start` to the end goes in, complemented.
pub fn complete_checksum(packet: &mut [u8], hdr: &VnetHeader) -> Result<(), SegmentError> {
    let start = hdr.csum_start as usize;
    let field = start + hdr.csum_offset as usize;
    if field + 2 > packet.len() {
        return Err(SegmentError("checksum offset past the packet"));
    }
    let sum = super::checksum::add(0, &packet[start..]);
    let mut value = super::checksum::finish(sum);
    let udp = ip::parse(packet).is_some_and(|info| info.protocol == PROTO_UDP);
    if value == 0 && udp {
        value = 0xffff;
    }
    packet[field..field + 2].copy_from_slice(&value.to_be_bytes());
    Ok(())
}

fn split(
    hdr: &VnetHeader,
    packet: &[u8],
    room: Room,
    emit: &mut dyn FnMut(Vec<u8>),
) -> Result<usize, SegmentError> {
    let info = ip::parse(packet).ok_or(SegmentError("not a whole IP packet"))?;
    let packet = &packet[..ip::ip_len(packet, &info)];
    let tcp = matches!(hdr.gso_type, GsoType::TcpV4 | GsoType::TcpV6);
    let expected = if tcp { PROTO_TCP } else { PROTO_UDP };
    if info.protocol != expected {
        return Err(SegmentError("the protocol is not the one the header names"));
    }
    if info.v6 != (hdr.gso_type == GsoType::TcpV6) && tcp {
        return Err(SegmentError(
            "the IP version is not the one the header names",
        ));
    }
    let at = info.header_len;
    let transport_len = if tcp {
        ip::tcp_header_len(packet, at).ok_or(SegmentError("a cut TCP header"))?
    } else if at + 8 <= packet.len() {
        8
    } else {
        return Err(SegmentError("a cut UDP header"));
    };
    let headers = at + transport_len;
    let gso_size = hdr.gso_size as usize;
    if gso_size == 0 {
        return Err(SegmentError("a segment size of zero"));
    }
    let payload = &packet[headers..];
    if payload.is_empty() {
        // Nothing to cut: the packet goes as it is, with its checksum.
        let mut buf = room.buffer(packet.len());
        buf.extend_from_slice(packet);
        ip::fill_transport_checksum(&mut buf[room.headroom..], &info, at);
        emit(buf);
        return Ok(1);
    }
    let count = payload.len().div_ceil(gso_size);
    let first_seq = if tcp { ip::u32_at(packet, at + 4) } else { 0 };
    let first_id = u16::from_be_bytes([packet[4], packet[5]]);
    for (i, chunk) in payload.chunks(gso_size).enumerate() {
        let len = headers + chunk.len();
        let mut buf = room.buffer(len);
        buf.extend_from_slice(&packet[..headers]);
        buf.extend_from_slice(chunk);
        let seg = &mut buf[room.headroom..];
        if !info.v6 {
            // Each segment gets the next IP id, as the kernel's GSO does.
            seg[4..6].copy_from_slice(&first_id.wrapping_add(i as u16).to_be_bytes());
        }
        ip::set_ip_len(seg, &info, len);
        if tcp {
            fix_tcp_segment(seg, at, first_seq, i, gso_size, i + 1 == count);
        } else {
            let udp_len = (8 + chunk.len()) as u16;
            seg[at + 4..at + 6].copy_from_slice(&udp_len.to_be_bytes());
        }
        ip::fill_transport_checksum(seg, &info, at);
        emit(buf);
    }
    Ok(count)
}

/// Sequence number and flags of segment `index`: FIN and PSH belong to the last segment
/// only, CWR to the first only.
fn fix_tcp_segment(
    seg: &mut [u8],
    at: usize,
    first_seq: u32,
    index: usize,
    size: usize,
    last: bool,
) {
    let seq = first_seq.wrapping_add((index * size) as u32);
    seg[at + 4..at + 8].copy_from_slice(&seq.to_be_bytes());
    let mut flags = seg[at + 13];
    if !last {
        flags &= !(TCP_FIN | TCP_PSH);
    }
    if index > 0 {
        flags &= !TCP_CWR;
    }
    seg[at + 13] = flags;
}
