//! Segmentation, coalescing and checksums on hand-built packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Bytes;

use super::ip::{self, TCP_ACK, TCP_CWR, TCP_FIN, TCP_PSH, TCP_SYN};
use super::segment::{complete_checksum, segment, Room};
use super::vnet::{GsoType, VnetHeader, NEEDS_CSUM, VNET_HDR_LEN};
use super::{checksum, Coalescer};

const V4_SRC: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const V4_DST: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last)
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A TCP segment with correct lengths and checksums.
struct Tcp {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    id: u16,
    options: Vec<u8>,
}

impl Tcp {
    fn v4() -> Tcp {
        Tcp {
            src: V4_SRC.into(),
            dst: V4_DST.into(),
            sport: 40000,
            dport: 5201,
            seq: 0xfffff000,
            ack: 77,
            flags: TCP_ACK,
            id: 0xfffe,
            options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
        }
    }

    fn v6() -> Tcp {
        Tcp {
            src: v6(1).into(),
            dst: v6(2).into(),
            ..Tcp::v4()
        }
    }

    fn build(&self, payload: &[u8]) -> Vec<u8> {
        let tcp_len = 20 + self.options.len();
        let mut tcp = vec![0u8; tcp_len];
        tcp[0..2].copy_from_slice(&self.sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
        tcp[12] = ((tcp_len / 4) as u8) << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&501u16.to_be_bytes());
        tcp[20..].copy_from_slice(&self.options);
        tcp.extend_from_slice(payload);
        wrap(self.src, self.dst, 6, self.id, tcp)
    }
}

/// An IP packet around `transport`, whose checksum is filled in.
fn wrap(src: IpAddr, dst: IpAddr, protocol: u8, id: u16, transport: Vec<u8>) -> Vec<u8> {
    let mut packet = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[1] = 0x10;
            h[4..6].copy_from_slice(&id.to_be_bytes());
            h[6] = 0x40;
            h[8] = 64;
            h[9] = protocol;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[6] = protocol;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            h
        }
        _ => unreachable!(),
    };
    packet.extend_from_slice(&transport);
    let info = ip::parse_lenient(&packet);
    let len = packet.len();
    ip::set_ip_len(&mut packet, &info, len);
    let info = ip::parse(&packet).unwrap();
    ip::fill_transport_checksum(&mut packet, &info, info.header_len);
    packet
}

fn udp(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&5353u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(payload);
    wrap(src, dst, 17, 1, udp)
}

/// Every checksum in `packet` verifies.
fn assert_checksums(packet: &[u8]) {
    let info = ip::parse(packet).expect("an IP packet");
    assert_eq!(
        info.header_len + (ip::ip_len(packet, &info) - info.header_len),
        packet.len()
    );
    if !info.v6 {
        assert_eq!(
            checksum::finish(checksum::add(0, &packet[..20])),
            0,
            "IPv4 header checksum"
        );
    }
    let transport = &packet[info.header_len..];
    let sum = checksum::pseudo_header(info.src, info.dst, info.protocol, transport.len() as u32);
    assert_eq!(
        checksum::finish(checksum::add(sum, transport)),
        0,
        "transport checksum"
    );
}

fn tso_header(v6: bool, headers: usize, ip_len: usize, gso_size: u16) -> VnetHeader {
    VnetHeader {
        flags: NEEDS_CSUM,
        gso_type: if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 },
        hdr_len: headers as u16,
        gso_size,
        csum_start: ip_len as u16,
        csum_offset: 16,
    }
}

/// Makes the kernel's form of a super-segment: lengths over everything, the TCP
/// checksum partial (the pseudo-header sum only).
fn as_partial(mut packet: Vec<u8>) -> Vec<u8> {
    let info = ip::parse(&packet).unwrap();
    let at = info.header_len;
    let sum = checksum::pseudo_header(
        info.src,
        info.dst,
        info.protocol,
        (packet.len() - at) as u32,
    );
    let field = at + if info.protocol == 6 { 16 } else { 6 };
    packet[field..field + 2].copy_from_slice(&checksum::fold(sum).to_be_bytes());
    packet
}

fn split(header: &VnetHeader, packet: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    segment(header, packet, Room::default(), &mut |seg| out.push(seg)).unwrap();
    out
}

fn tcp_payload(packet: &[u8]) -> &[u8] {
    let info = ip::parse(packet).unwrap();
    let at = info.header_len;
    &packet[at + ip::tcp_header_len(packet, at).unwrap()..]
}

#[test]
fn tcp_v4_super_segment_is_cut_into_valid_segments() {
    let mut tcp = Tcp::v4();
    tcp.flags = TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR;
    let data = payload(3500, 7);
    let packet = as_partial(tcp.build(&data));
    let header = tso_header(false, 20 + 32, 20, 1000);
    let segments = split(&header, &packet);
    assert_eq!(segments.len(), 4);
    let mut joined = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        assert_checksums(seg);
        let at = 20;
        assert_eq!(
            ip::u32_at(seg, at + 4),
            tcp.seq.wrapping_add(1000 * i as u32),
            "seq wraps"
        );
        assert_eq!(
            u16::from_be_bytes([seg[4], seg[5]]),
            tcp.id.wrapping_add(i as u16),
            "IP id"
        );
        let flags = seg[at + 13];
        assert_eq!(
            flags & (TCP_FIN | TCP_PSH) != 0,
            i == 3,
            "FIN and PSH on the last only"
        );
        assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR on the first only");
        assert_eq!(seg.len(), 52 + if i == 3 { 500 } else { 1000 });
        joined.extend_from_slice(tcp_payload(seg));
    }
    assert_eq!(joined, data);
}

#[test]
fn tcp_v6_super_segment_is_cut_into_valid_segments() {
    let data = payload(2801, 3);
    let packet = as_partial(Tcp::v6().build(&data));
    let segments = split(&tso_header(true, 72, 40, 1400), &packet);
    assert_eq!(segments.len(), 3);
    for seg in &segments {
        assert_checksums(seg);
        assert_eq!(
            u16::from_be_bytes([seg[4], seg[5]]) as usize,
            seg.len() - 40
        );
    }
    let joined: Vec<u8> = segments
        .iter()
        .flat_map(|s| tcp_payload(s).to_vec())
        .collect();
    assert_eq!(joined, data);
}

#[test]
fn udp_super_datagram_is_cut_into_datagrams() {
    let data = payload(3000, 9);
    let packet = as_partial(udp(V4_SRC.into(), V4_DST.into(), &data));
    let header = VnetHeader {
        flags: NEEDS_CSUM,
        gso_type: GsoType::UdpL4,
        hdr_len: 28,
        gso_size: 1200,
        csum_start: 20,
        csum_offset: 6,
    };
    let segments = split(&header, &packet);
    assert_eq!(segments.len(), 3);
    let mut joined = Vec::new();
    for seg in &segments {
        assert_checksums(seg);
        assert_eq!(
            u16::from_be_bytes([seg[24], seg[25]]) as usize,
            seg.len() - 20
        );
        joined.extend_from_slice(&seg[28..]);
    }
    assert_eq!(joined, data);
}

#[test]
fn partial_checksum_of_a_plain_packet_is_completed() {
    for packet in [
        Tcp::v4().build(&payload(333, 1)),
        Tcp::v6().build(&payload(64, 2)),
        udp(v6(1).into(), v6(2).into(), &payload(99, 4)),
    ] {
        let info = ip::parse(&packet).unwrap();
        let offset = if info.protocol == 6 { 16 } else { 6 };
        let header = VnetHeader {
            flags: NEEDS_CSUM,
            gso_type: GsoType::None,
            hdr_len: 0,
            gso_size: 0,
            csum_start: info.header_len as u16,
            csum_offset: offset,
        };
        let out = split(&header, &as_partial(packet.clone()));
        assert_eq!(out, vec![packet]);
    }
}

#[test]
fn room_is_left_before_and_after_each_segment() {
    let packet = as_partial(Tcp::v4().build(&payload(2500, 5)));
    let room = Room {
        headroom: 16,
        tailroom: 16,
    };
    let mut out = Vec::new();
    segment(&tso_header(false, 52, 20, 1000), &packet, room, &mut |s| {
        out.push(s)
    })
    .unwrap();
    for buf in &out {
        assert!(buf[..16].iter().all(|b| *b == 0));
        assert!(buf.capacity() >= buf.len() + 16);
        assert_checksums(&buf[16..]);
    }
}

#[test]
fn malformed_super_segments_are_errors_not_panics() {
    let packet = as_partial(Tcp::v4().build(&payload(3000, 5)));
    let good = tso_header(false, 52, 20, 1000);
    let zero = VnetHeader {
        gso_size: 0,
        ..good
    };
    assert!(segment(&zero, &packet, Room::default(), &mut |_| {}).is_err());
    let v6_kind = VnetHeader {
        gso_type: GsoType::TcpV6,
        ..good
    };
    assert!(segment(&v6_kind, &packet, Room::default(), &mut |_| {}).is_err());
    let udp_kind = VnetHeader {
        gso_type: GsoType::UdpL4,
        ..good
    };
    assert!(segment(&udp_kind, &packet, Room::default(), &mut |_| {}).is_err());
    let far = VnetHeader {
        gso_type: GsoType::None,
        csum_start: 4000,
        ..good
    };
    assert!(segment(&far, &packet, Room::default(), &mut |_| {}).is_err());
    for cut in [0, 1, 19, 20, 30, 51] {
        assert!(
            segment(&good, &packet[..cut], Room::default(), &mut |_| {}).is_err(),
            "{cut}"
        );
    }
    // Garbage of every length under every header: never a panic.
    let mut state = 0x1234_5678u32;
    for len in 0..200 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        for header in [good, zero, v6_kind, udp_kind, VnetHeader::PLAIN] {
            let _ = segment(&header, &bytes, Room::default(), &mut |_| {});
        }
        let mut coalescer = Coalescer::new();
        coalescer.push(&bytes);
        coalescer.finish(&mut Vec::new());
    }
}

fn coalesce(packets: &[Vec<u8>]) -> Vec<Bytes> {
    let mut coalescer = Coalescer::new();
    for packet in packets {
        coalescer.push(packet);
    }
    let mut out = Vec::new();
    coalescer.finish(&mut out);
    out
}

/// A frame's header and, as the kernel would complete it, its packet.
fn open_frame(frame: &[u8]) -> (VnetHeader, Vec<u8>) {
    let header = VnetHeader::parse(frame).unwrap();
    let mut packet = frame[VNET_HDR_LEN..].to_vec();
    if header.needs_csum() {
        complete_checksum(&mut packet, &header).unwrap();
    }
    (header, packet)
}

#[test]
fn segments_of_one_flow_become_one_super_segment_and_split_back_the_same() {
    for tcp in [Tcp::v4(), Tcp::v6()] {
        let mut tcp = tcp;
        tcp.flags = TCP_ACK | TCP_PSH;
        let ip_len = if matches!(tcp.src, IpAddr::V6(_)) {
            40
        } else {
            20
        };
        let data = payload(5000, 11);
        let original = as_partial(tcp.build(&data));
        let header = tso_header(ip_len == 40, ip_len + 32, ip_len, 1300);
        let segments = split(&header, &original);
        assert_eq!(segments.len(), 4);

        let frames = coalesce(&segments);
        assert_eq!(frames.len(), 1, "one flow, in order: one frame");
        let (got, packet) = open_frame(&frames[0]);
        assert_eq!(got.gso_type, header.gso_type);
        assert_eq!(got.gso_size, 1300);
        assert_eq!(got.csum_start as usize, ip_len);
        assert_eq!(got.csum_offset, 16);
        assert_eq!(got.hdr_len as usize, ip_len + 32);
        assert_checksums(&packet);
        assert_eq!(tcp_payload(&packet), &data[..]);
        assert_ne!(
            packet[ip_len + 13] & TCP_PSH,
            0,
            "the last segment's PSH is kept"
        );

        // The frame, read back as the kernel would hand it over, splits into the very
        // same segments.
        let again = split(&got, &frames[0][VNET_HDR_LEN..]);
        assert_eq!(again, segments);
    }
}

#[test]
fn a_gap_or_another_flow_starts_a_new_frame() {
    let tcp = Tcp::v4();
    let segments = split(
        &tso_header(false, 52, 20, 1000),
        &as_partial(tcp.build(&payload(4000, 1))),
    );
    let mut other = Tcp::v4();
    other.sport = 40001;
    let other_packet = other.build(&payload(1000, 2));
    // 0, 1, 3 (gap), other flow, 2: the gap ends the first frame.
    let order = vec![
        segments[0].clone(),
        segments[1].clone(),
        segments[3].clone(),
        other_packet.clone(),
        segments[2].clone(),
    ];
    let frames = coalesce(&order);
    let opened: Vec<(VnetHeader, Vec<u8>)> = frames.iter().map(|f| open_frame(f)).collect();
    assert_eq!(opened.len(), 4);
    assert_eq!(opened[0].0.gso_type, GsoType::TcpV4);
    assert_eq!(tcp_payload(&opened[0].1).len(), 2000);
    assert_eq!(opened[1].0, VnetHeader::PLAIN);
    assert_eq!(opened[1].1, segments[3]);
    assert_eq!(opened[2].1, other_packet);
    assert_eq!(opened[3].1, segments[2]);
    for (_, packet) in &opened {
        assert_checksums(packet);
    }
}

#[test]
fn control_segments_and_other_protocols_pass_alone() {
    let mut syn = Tcp::v4();
    syn.flags = TCP_SYN;
    let syn = syn.build(&[]);
    let ack_only = Tcp::v4().build(&[]);
    let datagram = udp(V4_SRC.into(), V4_DST.into(), &payload(172, 3));
    let mut ack = Tcp::v4();
    ack.ack = 78;
    let data1 = Tcp::v4().build(&payload(100, 1));
    let data2 = ack.build(&payload(100, 1));
    let packets = vec![syn, ack_only, datagram, data1, data2];
    let frames = coalesce(&packets);
    assert_eq!(
        frames.len(),
        packets.len(),
        "nothing joins: a new ack is a new flow"
    );
    for (frame, packet) in frames.iter().zip(&packets) {
        assert_eq!(&frame[..VNET_HDR_LEN], &VnetHeader::PLAIN.to_bytes());
        assert_eq!(&frame[VNET_HDR_LEN..], &packet[..]);
    }
}

#[test]
fn a_short_segment_or_psh_ends_the_super_segment() {
    let mut tcp = Tcp::v4();
    let first = tcp.build(&payload(1000, 1));
    tcp.seq = tcp.seq.wrapping_add(1000);
    let short = tcp.build(&payload(500, 2));
    tcp.seq = tcp.seq.wrapping_add(500);
    let after_short = tcp.build(&payload(1000, 3));
    let frames = coalesce(&[first, short, after_short.clone()]);
    assert_eq!(frames.len(), 2);
    let (_, packet) = open_frame(&frames[0]);
    assert_eq!(tcp_payload(&packet).len(), 1500);
    assert_eq!(&frames[1][VNET_HDR_LEN..], &after_short[..]);

    let mut tcp = Tcp::v4();
    tcp.flags = TCP_ACK | TCP_PSH;
    let pushed = tcp.build(&payload(1000, 1));
    tcp.flags = TCP_ACK;
    tcp.seq = tcp.seq.wrapping_add(1000);
    let next = tcp.build(&payload(1000, 2));
    assert_eq!(coalesce(&[pushed, next]).len(), 2);
}

#[test]
fn super_segments_stop_below_64_kib() {
    let mut tcp = Tcp::v4();
    let mut packets = Vec::new();
    for i in 0..100 {
        packets.push(tcp.build(&payload(1400, i)));
        tcp.seq = tcp.seq.wrapping_add(1400);
    }
    let frames = coalesce(&packets);
    assert!(frames.len() >= 3);
    let mut joined = Vec::new();
    for frame in &frames {
        assert!(frame.len() - VNET_HDR_LEN <= 65535);
        let (_, packet) = open_frame(frame);
        assert_checksums(&packet);
        joined.extend_from_slice(tcp_payload(&packet));
    }
    let expected: Vec<u8> = packets
        .iter()
        .flat_map(|p| tcp_payload(p).to_vec())
        .collect();
    assert_eq!(joined, expected);
}
