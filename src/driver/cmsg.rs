//! Control messages of datagrams, both ways, in one place: what a receive asks the
//! kernel to write beside each datagram (and how much room that takes), the typed
//! [`RecvMeta`] parsed from it, and the typed encoder of what a send attaches (source
//! address, traffic class, GSO segment size). Shared by both engines.
#![allow(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Bytes of a `cmsghdr` (64-bit Linux).
pub(crate) const CMSG_HDR: usize = std::mem::size_of::<libc::cmsghdr>();
/// `SOL_UDP` option / control message: GSO segment size (Linux 4.18).
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
/// `SOL_UDP` option / control message: receive GRO super-datagrams (Linux 5.0).
pub(crate) const UDP_GRO: libc::c_int = 104;
/// `SOL_SOCKET` option / control message: a datagram's transmit time (Linux 4.19).
pub(crate) const SO_TXTIME: libc::c_int = 61;

/// CMSG_SPACE: a control message of `data` bytes with its header, 8-aligned.
const fn space(data: usize) -> usize {
    CMSG_HDR + data.next_multiple_of(8)
}

/// What a receiver asks the kernel to report beside each datagram. Each item costs
/// control room in every slot of the receive ring, so it is there only when asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecvWants {
    /// UDP_GRO: the segment size of a super-datagram.
    pub(crate) gro: bool,
    /// IP_PKTINFO / IPV6_RECVPKTINFO: destination address and interface.
    pub(crate) destination: bool,
    /// IP_RECVTOS / IPV6_RECVTCLASS: the traffic class byte (DSCP and ECN).
    pub(crate) traffic_class: bool,
    /// SO_TIMESTAMPNS: the kernel's receive time.
    pub(crate) timestamp: bool,
}

impl RecvWants {
    /// Control bytes the kernel may write per datagram for these items: 0 when none.
    pub(crate) fn control_len(&self) -> usize {
        let mut len = 0;
        if self.gro {
            len += space(std::mem::size_of::<libc::c_int>());
        }
        if self.destination {
            // An IPv6 socket reports IPv4 datagrams with a v4-mapped in6_pktinfo and an
            // in_pktinfo, which alone says where a reply to a broadcast leaves from.
            len += space(std::mem::size_of::<libc::in6_pktinfo>());
            len += space(std::mem::size_of::<libc::in_pktinfo>());
        }
        if self.traffic_class {
            // IPV6_TCLASS is an int; IP_TOS a byte, padded to the same space.
            len += space(std::mem::size_of::<libc::c_int>());
        }
        if self.timestamp {
            len += space(std::mem::size_of::<libc::timespec>());
        }
        len
    }
}

/// `ip` where a reply may leave from it: not a multicast group nor the IPv4 broadcast
/// address (a subnet's broadcast address takes IP_PKTINFO's `ipi_spec_dst` to tell).
pub(crate) fn unicast(ip: IpAddr) -> Option<IpAddr> {
    let group = match ip {
        IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_multicast(),
    };
    (!group).then_some(ip)
}

/// What the kernel reported beside one received datagram. Fields are empty unless asked
/// for (see [`RecvWants`]); kept small, as every received datagram carries one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecvMeta {
    /// The datagram's destination address (IPv4 as IPv4, also on an IPv6 socket).
    pub(crate) destination: Option<IpAddr>,
    /// The local address a reply leaves from: for IPv4 the one the kernel picked for
    /// the datagram (`ipi_spec_dst`: the receiving interface's own address when the
    /// datagram went to a broadcast or multicast address), for IPv6 the destination
    /// unless it is a multicast group. None where neither is known.
    pub(crate) reply_source: Option<IpAddr>,
    /// The traffic class byte: DSCP in the upper six bits, ECN in the lower two.
    pub(crate) tos: Option<u8>,
    /// The interface it came in on; 0 when not reported.
    pub(crate) interface: u32,
    /// The kernel's receive time, nanoseconds since the Unix epoch; 0 when not reported.
    pub(crate) timestamp_ns: u64,
    /// The GRO segment size of the super-datagram it came in; 0 when it came alone.
    pub(crate) gro_segment: u16,
}

impl RecvMeta {
    /// Reads every control message of `control` (as the kernel wrote it: aligned
    /// headers, each followed by its data). Malformed bytes end the walk; what was read
    /// before them stays.
    pub(crate) fn parse(control: &[u8]) -> RecvMeta {
        let mut meta = RecvMeta::default();
        let mut offset = 0;
        while offset + CMSG_HDR <= control.len() {
            // SAFETY: `offset + CMSG_HDR <= len`: the header is inside the slice; it is
            // read unaligned because the slice carries no alignment promise.
            let header = unsafe {
                control
                    .as_ptr()
                    .add(offset)
                    .cast::<libc::cmsghdr>()
                    .read_unaligned()
            };
            let len = header.cmsg_len;
            if len < CMSG_HDR || offset + len > control.len() {
                break;
            }
            let data = &control[offset + CMSG_HDR..offset + len];
            meta.read(header.cmsg_level, header.cmsg_type, data);
            offset += len.next_multiple_of(8);
        }
        meta
    }

    fn read(&mut self, level: libc::c_int, kind: libc::c_int, data: &[u8]) {
        match (level, kind) {
            (libc::SOL_UDP, UDP_GRO) => {
                if let Some(segment) = int(data) {
                    self.gro_segment = u16::try_from(segment).unwrap_or(0);
                }
            }
            (libc::SOL_IP, libc::IP_PKTINFO)
                if data.len() >= std::mem::size_of::<libc::in_pktinfo>() =>
            {
                // SAFETY: the data holds a whole in_pktinfo; read unaligned.
                let info = unsafe { data.as_ptr().cast::<libc::in_pktinfo>().read_unaligned() };
                self.interface = info.ipi_ifindex as u32;
                let ip = Ipv4Addr::from(info.ipi_addr.s_addr.to_ne_bytes());
                self.destination = Some(IpAddr::V4(ip));
                let local = Ipv4Addr::from(info.ipi_spec_dst.s_addr.to_ne_bytes());
                // Comes after IPV6_PKTINFO on a dual-stack socket, and knows better.
                self.reply_source = (!local.is_unspecified()).then_some(IpAddr::V4(local));
            }
            (libc::SOL_IPV6, libc::IPV6_PKTINFO)
                if data.len() >= std::mem::size_of::<libc::in6_pktinfo>() =>
            {
                // SAFETY: the data holds a whole in6_pktinfo; read unaligned.
                let info = unsafe { data.as_ptr().cast::<libc::in6_pktinfo>().read_unaligned() };
                self.interface = info.ipi6_ifindex;
                let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                let destination = match ip.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(ip),
                };
                self.destination = Some(destination);
                if self.reply_source.is_none() {
                    self.reply_source = unicast(destination);
                }
            }
            // IP_TOS comes as one byte (IP_RECVTOS); IPV6_TCLASS as an int.
            (libc::SOL_IP, libc::IP_TOS) => {
                if let Some(&tos) = data.first() {
                    self.tos = Some(tos);
                }
            }
            (libc::SOL_IPV6, libc::IPV6_TCLASS) => {
                if let Some(class) = int(data) {
                    self.tos = Some(class as u8);
                }
            }
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS)
                if data.len() >= std::mem::size_of::<libc::timespec>() =>
            {
                // SAFETY: the data holds a whole timespec; read unaligned.
                let time = unsafe { data.as_ptr().cast::<libc::timespec>().read_unaligned() };
                self.timestamp_ns = (time.tv_sec as u64)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(time.tv_nsec as u64);
            }
            _ => {}
        }
    }
}

fn int(data: &[u8]) -> Option<i32> {
    let bytes: [u8; 4] = data.get(..4)?.try_into().ok()?;
    Some(i32::from_ne_bytes(bytes))
}

/// What a send attaches to a datagram beyond its bytes and destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SendMeta {
    /// The source address (IP_PKTINFO / IPV6_PKTINFO): the reply leaves from the
    /// address the request came to.
    pub(crate) source: Option<IpAddr>,
    /// The traffic class byte (IP_TOS / IPV6_TCLASS).
    pub(crate) tos: Option<u8>,
    /// The transmit time for the kernel to pace by (SCM_TXTIME, CLOCK_MONOTONIC
    /// nanoseconds), on a socket with SO_TXTIME on.
    pub(crate) txtime: Option<u64>,
    /// The datagram goes over IPv4 (also from an IPv6 socket, to a v4-mapped address):
    /// the control messages are IPv4's.
    pub(crate) ipv4: bool,
}

impl SendMeta {
    /// True when nothing is attached.
    pub(crate) fn is_empty(&self) -> bool {
        self.source.is_none() && self.tos.is_none() && self.txtime.is_none()
    }
}

/// `at` on CLOCK_MONOTONIC, in nanoseconds (the clock `Instant` reads on Linux, and the
/// one SO_TXTIME is set to): for an SCM_TXTIME transmit time.
pub(crate) fn monotonic_ns(at: std::time::Instant) -> u64 {
    let now = std::time::Instant::now();
    // SAFETY: timespec is plain old data; zero is a valid value.
    let mut spec: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: writes one timespec into a live one; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut spec) };
    let mono = (spec.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(spec.tv_nsec as u64);
    if at >= now {
        mono.saturating_add((at - now).as_nanos().min(u64::MAX as u128) as u64)
    } else {
        mono.saturating_sub((now - at).as_nanos().min(u64::MAX as u128) as u64)
    }
}

/// Words of the largest send control data: an in6_pktinfo (40 bytes), a traffic class
/// (24), a transmit time (24) and a UDP_SEGMENT (24).
const SEND_WORDS: usize = 14;

/// The control data of one send, built by [`SendControl::new`]: aligned for `cmsghdr`,
/// and self-contained, so a header can point into it while it sits still.
#[derive(Clone, Copy)]
pub(crate) struct SendControl {
    words: [u64; SEND_WORDS],
    len: usize,
}

impl SendControl {
    /// The control messages for `meta` and, for a GSO send, `segment`.
    pub(crate) fn new(meta: &SendMeta, segment: Option<u16>) -> SendControl {
        let mut control = SendControl {
            words: [0; SEND_WORDS],
            len: 0,
        };
        if let Some(source) = meta.source {
            if meta.ipv4 {
                let v4 = match source {
                    IpAddr::V4(v4) => v4,
                    // Checked by the socket layer; an IPv6 source cannot send IPv4.
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
                };
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                control.push(libc::SOL_IP, libc::IP_PKTINFO, info);
            } else {
                let v6 = match source {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                control.push(libc::SOL_IPV6, libc::IPV6_PKTINFO, info);
            }
        }
        if let Some(tos) = meta.tos {
            let value = tos as libc::c_int;
            if meta.ipv4 {
                control.push(libc::SOL_IP, libc::IP_TOS, value);
            } else {
                control.push(libc::SOL_IPV6, libc::IPV6_TCLASS, value);
            }
        }
        if let Some(at) = meta.txtime {
            control.push(libc::SOL_SOCKET, SO_TXTIME, at);
        }
        if let Some(segment) = segment {
            control.push(libc::SOL_UDP, UDP_SEGMENT, segment);
        }
        control
    }

    /// Appends one control message carrying `value`.
    fn push<T: Copy>(&mut self, level: libc::c_int, kind: libc::c_int, value: T) {
        let size = std::mem::size_of::<T>();
        let needed = space(size);
        assert!(
            self.len + needed <= SEND_WORDS * 8,
            "send control data overflows its buffer"
        );
        let header = libc::cmsghdr {
            cmsg_len: CMSG_HDR + size,
            cmsg_level: level,
            cmsg_type: kind,
        };
        // SAFETY: checked above: header and data end inside `words`; `len` is a multiple
        // of 8, so the header is aligned; the data is written unaligned.
        unsafe {
            let base = self.words.as_mut_ptr().cast::<u8>().add(self.len);
            base.cast::<libc::cmsghdr>().write(header);
            base.add(CMSG_HDR).cast::<T>().write_unaligned(value);
        }
        self.len += needed;
    }

    /// True when there is nothing to attach.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the control data starts, for `msg_control` (null when empty).
    pub(crate) fn as_ptr(&self) -> *mut libc::c_void {
        if self.len == 0 {
            std::ptr::null_mut()
        } else {
            self.words.as_ptr() as *mut libc::c_void
        }
    }

    /// The length for `msg_controllen`.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    fn bytes(&self) -> Vec<u8> {
        self.words
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .take(self.len)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Control data as the kernel would write it, built with the send encoder.
    fn written(meta: &SendMeta, segment: Option<u16>) -> Vec<u8> {
        SendControl::new(meta, segment).bytes()
    }

    #[test]
    fn gro_control_message_is_found() {
        let bytes = written(&SendMeta::default(), Some(1400));
        assert_eq!(bytes.len(), CMSG_HDR + 8);
        // The UDP_SEGMENT layout is UDP_GRO's but for the type and the width.
        let mut control = bytes.clone();
        control[..8].copy_from_slice(&(CMSG_HDR + 4).to_ne_bytes());
        control[12..16].copy_from_slice(&UDP_GRO.to_ne_bytes());
        control[CMSG_HDR..CMSG_HDR + 4].copy_from_slice(&1400i32.to_ne_bytes());
        assert_eq!(RecvMeta::parse(&control).gro_segment, 1400);
        assert_eq!(RecvMeta::parse(&[]), RecvMeta::default());
        assert_eq!(RecvMeta::parse(&[0xff; 7]), RecvMeta::default());
        // A length running past the end stops the walk without a panic.
        let mut cut = control.clone();
        cut[0] = 200;
        assert_eq!(RecvMeta::parse(&cut), RecvMeta::default());
    }

    #[test]
    fn pktinfo_and_traffic_class_round_trip_on_both_families() {
        let v6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap();
        let meta = SendMeta {
            source: Some(IpAddr::V6(v6)),
            tos: Some(0xb8 | 2),
            txtime: Some(7),
            ipv4: false,
        };
        let parsed = RecvMeta::parse(&written(&meta, Some(1200)));
        assert_eq!(parsed.destination, Some(IpAddr::V6(v6)));
        assert_eq!(parsed.tos, Some(0xba));
        // IPv4 on a dual-stack socket comes v4-mapped and is shown as IPv4.
        let mapped = SendMeta {
            source: Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))),
            ipv4: false,
            ..SendMeta::default()
        };
        let parsed = RecvMeta::parse(&written(&mapped, None));
        assert_eq!(
            parsed.destination,
            Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)))
        );
        assert_eq!(parsed.tos, None);
    }

    #[test]
    fn room_grows_only_with_what_is_asked() {
        assert_eq!(RecvWants::default().control_len(), 0);
        let gro = RecvWants {
            gro: true,
            ..RecvWants::default()
        };
        assert_eq!(gro.control_len(), 24);
        let all = RecvWants {
            gro: true,
            destination: true,
            traffic_class: true,
            timestamp: true,
        };
        assert_eq!(all.control_len(), 24 + 40 + 32 + 24 + 32);
        let full = SendMeta {
            source: Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            tos: Some(1),
            txtime: Some(1),
            ipv4: false,
        };
        assert_eq!(SendControl::new(&full, Some(9)).len(), SEND_WORDS * 8);
        assert!(SendControl::new(&SendMeta::default(), None).is_empty());
    }
}
