//! GRO in user space: consecutive segments of one TCP flow joined into one
//! super-segment with a virtio-net header, so the kernel takes many packets in one
//! write to the TUN queue.

use std::net::IpAddr;

use bytes::Bytes;

use super::checksum;
use super::ip::{self, IpInfo, PROTO_TCP, TCP_ACK, TCP_PSH};
use super::vnet::{GsoType, VnetHeader, NEEDS_CSUM, VNET_HDR_LEN};

/// The largest IP packet a super-segment may become.
const MAX_SUPER_LEN: usize = 65535;
/// Most segments joined into one (the kernel's GSO limit of 64 keeps clear of every
/// device's segment budget).
const MAX_SEGMENTS: usize = 64;

/// Counters of a [`Coalescer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoalesceStats {
    /// Packets pushed.
    pub packets: u64,
    /// Frames written out (a super-segment or a plain packet each).
    pub frames: u64,
    /// Packets that joined a super-segment behind its first.
    pub joined: u64,
}

/// What makes two segments one flow: addresses, ports and the acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    src: IpAddr,
    dst: IpAddr,
    ports: u32,
    ack: u32,
}

/// A super-segment being built.
struct Flow {
    key: FlowKey,
    info: IpInfo,
    /// The virtio-net header's room, then the first packet's headers, then payloads.
    frame: Vec<u8>,
    /// Transport header bytes.
    tcp_len: usize,
    /// Payload bytes of the first segment: every other but the last has as many.
    gso_size: usize,
    segments: usize,
    next_seq: u32,
    /// A short or PSH segment ended it: nothing may join any more.
    closed: bool,
}

impl Flow {
    fn headers(&self) -> usize {
        VNET_HDR_LEN + self.info.header_len + self.tcp_len
    }

    /// Whether `packet` (with its parsed parts) can be appended.
    fn accepts(&self, packet: &[u8], seg: &Segment) -> bool {
        if self.closed || seg.key != self.key || seg.seq != self.next_seq {
            return false;
        }
        if seg.payload_len > self.gso_size || self.segments >= MAX_SEGMENTS {
            return false;
        }
        if self.frame.len() - VNET_HDR_LEN + seg.payload_len > MAX_SUPER_LEN {
            return false;
        }
        // Everything in the headers but lengths, ids, checksums, sequence number and
        // PSH must match: IP version, TOS/traffic class, TTL/hop limit, DF, TCP window
        // and options.
        let first = &self.frame[VNET_HDR_LEN..self.headers()];
        let at = seg.info.header_len;
        if seg.info.v6 != self.info.v6 || seg.tcp_len != self.tcp_len {
            return false;
        }
        let ip_same = if seg.info.v6 {
            packet[..4] == first[..4] && packet[6..8] == first[6..8]
        } else {
            seg.info.header_len == self.info.header_len
                && packet[1] == first[1]
                && packet[6] & 0x40 == first[6] & 0x40
                && packet[8] == first[8]
        };
        let flags_ok = packet[at + 13] & !TCP_PSH == first[at + 13] & !TCP_PSH;
        ip_same
            && flags_ok
            && packet[at + 14..at + 16] == first[at + 14..at + 16]
            && packet[at + 18..at + seg.tcp_len] == first[at + 18..at + seg.tcp_len]
    }
}

/// A TCP segment's parts, as far as coalescing cares.
struct Segment {
    info: IpInfo,
    key: FlowKey,
    seq: u32,
    tcp_len: usize,
    payload_len: usize,
}

/// Reads the parts of a packet that may be coalesced: TCP with payload, only ACK (and
/// PSH) set, no IP fragment, IPv4 without options.
fn coalescable(packet: &[u8]) -> Option<Segment> {
    let info = ip::parse(packet)?;
    if info.protocol != PROTO_TCP || info.fragment || (!info.v6 && info.header_len != 20) {
        return None;
    }
    let at = info.header_len;
    let tcp_len = ip::tcp_header_len(packet, at)?;
    let len = ip::ip_len(packet, &info);
    let payload_len = len.checked_sub(at + tcp_len).filter(|n| *n > 0)?;
    if packet[at + 13] & !TCP_PSH != TCP_ACK {
        return None;
    }
    Some(Segment {
        key: FlowKey {
            src: info.src,
            dst: info.dst,
            ports: ip::u32_at(packet, at),
            ack: ip::u32_at(packet, at + 8),
        },
        seq: ip::u32_at(packet, at + 4),
        info,
        tcp_len,
        payload_len,
    })
}

/// Joins the packets of a batch, TCP flow by flow, into frames for a TUN queue opened
/// with IFF_VNET_HDR: push every packet of the batch, then [`finish`](Self::finish).
/// A packet that cannot join anything goes out on its own, with a plain header; order
/// within a flow is kept.
#[derive(Default)]
pub struct Coalescer {
    flows: Vec<Flow>,
    /// Frames in the order their first packet came.
    ready: Vec<Pending>,
    stats: CoalesceStats,
}

enum Pending {
    Flow(usize),
    Plain(Bytes),
}

impl Coalescer {
    /// An empty coalescer.
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// The counters so far.
    pub fn stats(&self) -> CoalesceStats {
        self.stats
    }

    /// Adds one plain IP packet (its checksums complete).
    pub fn push(&mut self, packet: &[u8]) {
        self.stats.packets += 1;
        let Some(seg) = coalescable(packet) else {
            self.push_plain(packet);
            return;
        };
        let packet = &packet[..seg.info.header_len + seg.tcp_len + seg.payload_len];
        if let Some(flow) = self.flows.iter_mut().rev().find(|f| f.key == seg.key) {
            if flow.accepts(packet, &seg) {
                let payload = &packet[seg.info.header_len + seg.tcp_len..];
                flow.frame.extend_from_slice(payload);
                flow.segments += 1;
                flow.next_seq = seg.seq.wrapping_add(seg.payload_len as u32);
                let at = VNET_HDR_LEN + seg.info.header_len;
                if packet[seg.info.header_len + 13] & TCP_PSH != 0 {
                    flow.frame[at + 13] |= TCP_PSH;
                    flow.closed = true;
                }
                if seg.payload_len < flow.gso_size {
                    flow.closed = true;
                }
                self.stats.joined += 1;
                return;
            }
            // Out of order or different: this flow's super-segment is done, so a later
            // packet cannot overtake it.
            flow.closed = true;
        }
        let mut frame = Vec::with_capacity(VNET_HDR_LEN + MAX_SUPER_LEN);
        frame.resize(VNET_HDR_LEN, 0);
        frame.extend_from_slice(packet);
        let closed = packet[seg.info.header_len + 13] & TCP_PSH != 0;
        self.ready.push(Pending::Flow(self.flows.len()));
        self.flows.push(Flow {
            key: seg.key,
            info: seg.info,
            frame,
            tcp_len: seg.tcp_len,
            gso_size: seg.payload_len,
            segments: 1,
            next_seq: seg.seq.wrapping_add(seg.payload_len as u32),
            closed,
        });
    }

    fn push_plain(&mut self, packet: &[u8]) {
        let mut frame = Vec::with_capacity(VNET_HDR_LEN + packet.len());
        frame.extend_from_slice(&VnetHeader::PLAIN.to_bytes());
        frame.extend_from_slice(packet);
        self.ready.push(Pending::Plain(Bytes::from(frame)));
    }

    /// Moves every frame, header first, to `out`, in the order their first packets
    /// came, and starts over.
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        let mut flows: Vec<Option<Flow>> = self.flows.drain(..).map(Some).collect();
        for pending in self.ready.drain(..) {
            self.stats.frames += 1;
            match pending {
                Pending::Plain(frame) => out.push(frame),
                Pending::Flow(index) => {
                    let flow = flows[index].take().expect("each flow is ready once");
                    out.push(Bytes::from(finish_flow(flow)));
                }
            }
        }
    }
}

/// The frame of a flow: one segment goes as it came; several become a super-segment
/// whose lengths cover them all and whose TCP checksum is left partial (the
/// pseudo-header sum), completed by the kernel.
fn finish_flow(flow: Flow) -> Vec<u8> {
    let mut frame = flow.frame;
    if flow.segments == 1 {
        frame[..VNET_HDR_LEN].copy_from_slice(&VnetHeader::PLAIN.to_bytes());
        return frame;
    }
    let info = flow.info;
    let packet = &mut frame[VNET_HDR_LEN..];
    let len = packet.len();
    ip::set_ip_len(packet, &info, len);
    let at = info.header_len;
    let tcp_total = (len - at) as u32;
    let pseudo = checksum::fold(checksum::pseudo_header(
        info.src, info.dst, PROTO_TCP, tcp_total,
    ));
    packet[at + 16..at + 18].copy_from_slice(&pseudo.to_be_bytes());
    let header = VnetHeader {
        flags: NEEDS_CSUM,
        gso_type: if info.v6 {
            GsoType::TcpV6
        } else {
            GsoType::TcpV4
        },
        hdr_len: (at + flow.tcp_len) as u16,
        gso_size: flow.gso_size as u16,
        csum_start: at as u16,
        csum_offset: 16,
    };
    frame[..VNET_HDR_LEN].copy_from_slice(&header.to_bytes());
    frame
}
