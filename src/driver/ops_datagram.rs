//! The datagram operations of the driver contract, dispatched to the current engine:
//! a receive ring (multishot RECVMSG over a provided buffer ring on io_uring, `recvmmsg`
//! into a buffer pool on epoll), single sends, and batched sends (a linked chain of
//! SEND/SENDMSG on io_uring, `sendmmsg` on epoll; UDP GSO for runs of equal-sized
//! datagrams on both).
//!
//! Also the driver-neutral pieces both engines share: the GSO run plan, the UDP_SEGMENT
//! control message, GRO splitting and socket-address parsing.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::buf_pool::{BufPool, LentBuf};
use super::iovec::append_joined;
use super::ops::{BatchReport, Progress};
use super::sockaddr::RawAddr;
use super::{poll, uring, DriverKind, SharedFd};
use crate::buf::IoBuf;
use crate::runtime;

/// `SOL_UDP` option / control message: GSO segment size (Linux 4.18).
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
/// `SOL_UDP` option / control message: receive GRO super-datagrams (Linux 5.0).
pub(crate) const UDP_GRO: libc::c_int = 104;
/// Most segments ringsock puts in one GSO send (the kernel takes 64 since 4.18, 128
/// since 6.2; quinn-udp also uses 64).
pub(crate) const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload over IPv4 (65535 - 20 - 8); also the cap of one GSO send.
pub(crate) const MAX_UDP_PAYLOAD_V4: usize = 65507;
/// Largest UDP payload over IPv6 without jumbograms (65535 - 8).
pub(crate) const MAX_UDP_PAYLOAD_V6: usize = 65527;
/// Bytes of a `cmsghdr` (64-bit Linux) and of a control buffer for one u16 or i32 value.
const CMSG_HDR: usize = std::mem::size_of::<libc::cmsghdr>();
/// CMSG_SPACE(sizeof(u16)) = CMSG_SPACE(sizeof(int)) on 64-bit Linux, in u64 words.
pub(crate) const CMSG_WORDS: usize = (CMSG_HDR + 8) / 8;

/// Shape of a receive ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingConfig {
    /// Buffers (a power of two).
    pub(crate) buffers: u16,
    /// Payload bytes one buffer holds.
    pub(crate) buffer_size: usize,
    /// UDP_GRO is on: buffers may hold super-datagrams, split on delivery.
    pub(crate) gro: bool,
}

/// One received datagram, its bytes lent from the receive ring.
pub(crate) struct RecvDatagram {
    pub(crate) buf: LentBuf,
    pub(crate) addr: Option<SocketAddr>,
    /// The datagram was larger than the buffer: `buf` holds its first bytes only.
    pub(crate) truncated: bool,
    /// The datagram's real length (equal to `buf.len()` unless truncated).
    pub(crate) original_len: usize,
}

/// What a receiver did, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecvCounters {
    pub(crate) datagrams: u64,
    pub(crate) truncated: u64,
    /// Times the ring ran dry (ENOBUFS on io_uring, no free buffer on epoll).
    pub(crate) ring_empty: u64,
    /// Multishot receives armed again after the kernel ended one (io_uring).
    pub(crate) rearms: u64,
    /// Receive completions or `recvmmsg` calls that delivered datagrams.
    pub(crate) deliveries: u64,
    /// GRO super-datagrams split into datagrams.
    pub(crate) gro_splits: u64,
    /// Times the receiver stopped leaving a wait on the socket while it drains, because
    /// datagrams came in bursts (io_uring: the multishot receive gave way to
    /// `recvmmsg`; epoll: the socket leaves the epoll set while it is drained).
    pub(crate) burst_switches: u64,
}

/// The receiving side of one datagram socket, on the current engine.
pub(crate) enum Receiver {
    Uring(uring::datagram::Receiver),
    Poll(poll::datagram::Receiver),
}

impl Receiver {
    pub(crate) fn new(config: RingConfig) -> io::Result<Receiver> {
        match runtime::current_kind()? {
            DriverKind::Uring => uring::datagram::Receiver::new(config).map(Receiver::Uring),
            DriverKind::Epoll => poll::datagram::Receiver::new(config).map(Receiver::Poll),
        }
    }

    /// Moves up to `max` received datagrams into `out`. Ready once at least one arrived
    /// (or with an error concerning this attempt only); the receiver goes on afterwards.
    pub(crate) fn poll_recv(
        &mut self,
        fd: &SharedFd,
        cx: &mut Context<'_>,
        out: &mut Vec<RecvDatagram>,
        max: usize,
    ) -> Poll<io::Result<()>> {
        match self {
            Receiver::Uring(receiver) => receiver.poll_recv(fd, cx, out, max.max(1)),
            Receiver::Poll(receiver) => receiver.poll_recv(fd, cx, out, max.max(1)),
        }
    }

    pub(crate) fn counters(&self) -> RecvCounters {
        match self {
            Receiver::Uring(receiver) => receiver.counters,
            Receiver::Poll(receiver) => receiver.counters,
        }
    }

    /// The pool: buffers in all, and how many the program holds.
    pub(crate) fn pool(&self) -> &Rc<BufPool> {
        match self {
            Receiver::Uring(receiver) => &receiver.pool,
            Receiver::Poll(receiver) => &receiver.pool,
        }
    }
}

/// Sends one datagram to `addr` (or to the connected peer).
pub(crate) async fn send_to<B: IoBuf>(
    fd: &SharedFd,
    buf: B,
    addr: Option<SocketAddr>,
) -> (io::Result<usize>, B) {
    match runtime::current_kind() {
        Ok(DriverKind::Uring) => uring::datagram::send_to(fd, buf, addr).await,
        Ok(DriverKind::Epoll) => poll::datagram::send_to(fd, buf, addr).await,
        Err(err) => (Err(err), buf),
    }
}

/// Sends every buffer of `bufs` as its own datagram, in order, to `dest` (or to the
/// connected peer), with as few kernel operations as the engine allows. Runs of
/// equal-sized datagrams go out as one UDP GSO send while `gso` is true; a GSO send the
/// kernel or device refuses turns `gso` off and is sent again datagram by datagram.
///
/// Returns how far it got (`Progress::first` datagrams sent; `skip` is always 0) and the
/// error that stopped it: that datagram, and the ones after it, were not sent.
pub(crate) async fn send_batch(
    fd: &SharedFd,
    bufs: Vec<Bytes>,
    dest: Option<SocketAddr>,
    gso: &Cell<bool>,
    report: &mut BatchReport,
) -> (io::Result<()>, Progress, Vec<Bytes>) {
    match runtime::current_kind() {
        Ok(DriverKind::Uring) => uring::datagram::send_batch(fd, bufs, dest, gso, report).await,
        Ok(DriverKind::Epoll) => poll::datagram::send_batch(fd, bufs, dest, gso, report).await,
        Err(err) => (Err(err), Progress::default(), bufs),
    }
}

/// Sets an integer socket option.
pub(crate) fn set_int_option(
    fd: &SharedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.raw(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SO_MEMINFO` (Linux 3.9): the socket's memory counters.
const SO_MEMINFO: libc::c_int = 55;
/// Index of the drop counter in `SO_MEMINFO`'s array.
const SK_MEMINFO_DROPS: usize = 8;
/// Entries of `SO_MEMINFO`'s array (`SK_MEMINFO_VARS`).
const SK_MEMINFO_VARS: usize = 9;

/// Datagrams the kernel dropped on this socket, mostly because its receive queue was
/// full (`SO_MEMINFO`, SK_MEMINFO_DROPS).
pub(crate) fn socket_drops(fd: &SharedFd) -> io::Result<u64> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a live array of that size.
    let rc = unsafe {
        libc::getsockopt(
            fd.raw(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < (SK_MEMINFO_DROPS + 1) * 4 {
        return Err(io::Error::other("SO_MEMINFO without a drop counter"));
    }
    Ok(info[SK_MEMINFO_DROPS] as u64)
}

/// One kernel send of a batch: `count` datagrams from `bufs[first]`; with `segment`,
/// one GSO super-datagram cut into `segment`-byte datagrams (the last may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) first: usize,
    pub(crate) count: usize,
    pub(crate) segment: Option<u16>,
}

/// Datagrams described for one `sendmmsg`: a message per link (a datagram, or a GSO run
/// with its UDP_SEGMENT control message).
///
/// Built completely before use: the headers point into the iovec, control and address
/// storage of this struct (heap memory that does not move with it), and the iovecs into
/// the caller's Bytes, which must outlive every [`send`](Self::send).
pub(crate) struct MmsgBatch {
    /// Read by the kernel through `headers`.
    _iovecs: Vec<libc::iovec>,
    _controls: Vec<[u64; CMSG_WORDS]>,
    _addr: Option<Box<RawAddr>>,
    headers: Vec<libc::mmsghdr>,
}

impl MmsgBatch {
    pub(crate) fn new(bufs: &[Bytes], links: &[Link], dest: Option<SocketAddr>) -> MmsgBatch {
        let (mut iovecs, counts) = link_iovecs(bufs, links.iter());
        let mut controls: Vec<[u64; CMSG_WORDS]> = links
            .iter()
            .filter_map(|link| link.segment.map(gso_cmsg))
            .collect();
        let mut addr = dest.map(|dest| Box::new(RawAddr::from_socket_addr(dest)));
        // SAFETY: mmsghdr is plain old data; zero is its empty value.
        let mut headers: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; links.len()];
        let (mut iov_at, mut control_at) = (0, 0);
        for ((link, header), count) in links.iter().zip(headers.iter_mut()).zip(counts) {
            let msg = &mut header.msg_hdr;
            msg.msg_iov = iovecs[iov_at..].as_mut_ptr();
            msg.msg_iovlen = count;
            iov_at += count;
            if link.segment.is_some() {
                msg.msg_control = controls[control_at].as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of::<[u64; CMSG_WORDS]>();
                control_at += 1;
            }
            if let Some(addr) = addr.as_mut() {
                msg.msg_name = addr.as_mut_ptr().cast();
                msg.msg_namelen = addr.len;
            }
        }
        MmsgBatch {
            _iovecs: iovecs,
            _controls: controls,
            _addr: addr,
            headers,
        }
    }

    /// How many messages there are.
    pub(crate) fn len(&self) -> usize {
        self.headers.len()
    }

    /// One `sendmmsg` of the messages from `at` on; how many the kernel took. The
    /// socket is non-blocking: a full send buffer is `WouldBlock`.
    pub(crate) fn send(&mut self, fd: &SharedFd, at: usize) -> io::Result<usize> {
        let count = self.headers.len().saturating_sub(at);
        // SAFETY: every header from `at` points to storage of this struct and to iovecs
        // over the caller's live Bytes (the struct's contract); the kernel reads them
        // only during the call.
        let sent = unsafe {
            libc::sendmmsg(
                fd.raw(),
                self.headers.as_mut_ptr().add(at),
                count as libc::c_uint,
                libc::MSG_NOSIGNAL,
            )
        };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
    }
}

/// The iovecs of `links`, all in one vector, and how many each link has: a GSO run's
/// datagrams that sit end to end in memory share an iovec (the kernel cuts the run by its
/// segment size, not by iovec), so the kernel walks fewer entries.
pub(crate) fn link_iovecs<'a>(
    bufs: &[Bytes],
    links: impl Iterator<Item = &'a Link>,
) -> (Vec<libc::iovec>, Vec<usize>) {
    let mut iovecs = Vec::with_capacity(bufs.len());
    let counts = links
        .map(|link| {
            let datagrams = bufs[link.first..link.first + link.count].iter();
            append_joined(&mut iovecs, datagrams.map(|buf| &buf[..]), usize::MAX)
        })
        .collect();
    (iovecs, counts)
}

/// Splits `bufs[from..]` into at most `max_links` sends. With `gso`, a run of datagrams
/// of one size S (the last of a run may be shorter, as GSO allows), at most
/// [`GSO_MAX_SEGMENTS`] and [`MAX_UDP_PAYLOAD_V4`] bytes, becomes one link; everything
/// else is a link per datagram. Contents are never merged: the kernel cuts a GSO send
/// exactly at the datagram boundaries.
pub(crate) fn plan_links(bufs: &[Bytes], from: usize, gso: bool, max_links: usize) -> Vec<Link> {
    let mut links = Vec::new();
    let mut i = from;
    while i < bufs.len() && links.len() < max_links {
        let size = bufs[i].len();
        let mut count = 1;
        let mut total = size;
        if gso && size > 0 && size <= u16::MAX as usize {
            while i + count < bufs.len() && count < GSO_MAX_SEGMENTS {
                let next = bufs[i + count].len();
                if next == 0 || next > size || total + next > MAX_UDP_PAYLOAD_V4 {
                    break;
                }
                count += 1;
                total += next;
                if next < size {
                    break; // a shorter datagram can only end a GSO run
                }
            }
        }
        links.push(Link {
            first: i,
            count,
            segment: (count > 1).then_some(size as u16),
        });
        i += count;
    }
    links
}

/// A `SOL_UDP`/`UDP_SEGMENT` control message carrying `segment`, in u64 words (aligned
/// for `cmsghdr`).
pub(crate) fn gso_cmsg(segment: u16) -> [u64; CMSG_WORDS] {
    let mut words = [0u64; CMSG_WORDS];
    let header = libc::cmsghdr {
        cmsg_len: CMSG_HDR + std::mem::size_of::<u16>(),
        cmsg_level: libc::SOL_UDP,
        cmsg_type: UDP_SEGMENT,
    };
    let base = words.as_mut_ptr().cast::<u8>();
    // SAFETY: `words` is CMSG_HDR + 8 bytes, 8-aligned: room for the header and the u16
    // right after it (CMSG_DATA on Linux is the byte after the aligned header).
    unsafe {
        base.cast::<libc::cmsghdr>().write(header);
        base.add(CMSG_HDR).cast::<u16>().write_unaligned(segment);
    }
    words
}

/// True when a GSO send failed because of GSO itself (segment over the path MTU, too
/// many segments, no checksum offload, UDP-Lite or IPsec), so sending the same datagrams
/// one by one may work.
pub(crate) fn gso_refused(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMSGSIZE) | Some(libc::EINVAL) | Some(libc::EIO) | Some(libc::EOPNOTSUPP)
    )
}

/// The GRO segment size in received control data, if the kernel merged datagrams.
pub(crate) fn gro_segment(control: &[u8]) -> Option<usize> {
    let mut offset = 0;
    while offset + CMSG_HDR <= control.len() {
        // SAFETY: `offset + CMSG_HDR <= len`: the header is inside the slice; it is read
        // unaligned because the slice carries no alignment promise.
        let header = unsafe {
            control
                .as_ptr()
                .add(offset)
                .cast::<libc::cmsghdr>()
                .read_unaligned()
        };
        let len = header.cmsg_len;
        if len < CMSG_HDR || offset + len > control.len() {
            return None;
        }
        if header.cmsg_level == libc::SOL_UDP && header.cmsg_type == UDP_GRO && len >= CMSG_HDR + 4
        {
            let data = &control[offset + CMSG_HDR..offset + CMSG_HDR + 4];
            let segment = i32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
            return (segment > 0).then_some(segment as usize);
        }
        offset += len.next_multiple_of(8);
    }
    None
}

/// The socket address in `name` (a `sockaddr_in` or `sockaddr_in6` as the kernel wrote
/// it), with IPv4-mapped IPv6 addresses shown as IPv4.
// Inlined into the receive loops: the call itself cost as much as the IPv4 fast path
// (callgrind).
#[inline]
pub(crate) fn addr_from_bytes(name: &[u8]) -> Option<SocketAddr> {
    // The common case, read in place: every received datagram goes through here, and
    // the general path zeroes and copies a 128-byte sockaddr_storage first.
    // sockaddr_in: family (native order), port and address (network order).
    if let [f0, f1, p0, p1, a, b, c, d, ..] = *name {
        if i32::from(u16::from_ne_bytes([f0, f1])) == libc::AF_INET {
            let ip = std::net::Ipv4Addr::new(a, b, c, d);
            return Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be_bytes([p0, p1]),
            )));
        }
    }
    let mut raw = RawAddr::empty();
    let len = name
        .len()
        .min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: copies at most size_of(sockaddr_storage) bytes into the storage.
    unsafe {
        std::ptr::copy_nonoverlapping(
            name.as_ptr(),
            (&mut raw.storage as *mut libc::sockaddr_storage).cast::<u8>(),
            len,
        )
    };
    raw.len = len as libc::socklen_t;
    raw.to_socket_addr().map(canonical)
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports) as IPv4.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// `addr` as the socket's family needs it: IPv4 becomes IPv4-mapped on an IPv6 socket.
pub(crate) fn for_family(addr: SocketAddr, ipv6_socket: bool) -> SocketAddr {
    match (addr, ipv6_socket) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        (addr, _) => addr,
    }
}

/// Turns one filled, claimed buffer into datagrams: one, or with GRO one per segment
/// (each holding the buffer). `payload` is the offset and length of the data in the
/// buffer.
///
/// # Safety
///
/// - `bid` is claimed from `pool` (one hold), which this call takes over.
/// - `offset + len <= pool.stride()`, and the kernel wrote those bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn deliver(
    pool: &Rc<BufPool>,
    bid: u16,
    offset: usize,
    len: usize,
    original_len: usize,
    truncated: bool,
    addr: Option<SocketAddr>,
    gro: Option<usize>,
    counters: &mut RecvCounters,
    out: &mut Vec<RecvDatagram>,
) {
    match gro {
        Some(segment) if !truncated && segment < len => {
            counters.gro_splits += 1;
            let pieces = len.div_ceil(segment);
            for _ in 1..pieces {
                pool.add_ref(bid);
            }
            for piece in 0..pieces {
                let start = offset + piece * segment;
                let size = segment.min(offset + len - start);
                counters.datagrams += 1;
                out.push(RecvDatagram {
                    // SAFETY: one hold per piece (claim + add_ref above); inside the
                    // written bytes (caller's contract).
                    buf: unsafe { LentBuf::new(pool.clone(), bid, start, size) },
                    addr,
                    truncated: false,
                    original_len: size,
                });
            }
        }
        _ => {
            counters.datagrams += 1;
            if truncated {
                counters.truncated += 1;
            }
            out.push(RecvDatagram {
                // SAFETY: the caller's hold and bytes, handed over.
                buf: unsafe { LentBuf::new(pool.clone(), bid, offset, len) },
                addr,
                truncated,
                original_len,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(list: &[usize]) -> Vec<Bytes> {
        list.iter().map(|&n| Bytes::from(vec![0u8; n])).collect()
    }

    #[test]
    fn equal_sizes_make_one_gso_link() {
        let bufs = sizes(&[172; 64]);
        let links = plan_links(&bufs, 0, true, 32);
        assert_eq!(
            links,
            vec![Link {
                first: 0,
                count: 64,
                segment: Some(172)
            }]
        );
        let none = plan_links(&bufs, 0, false, 100);
        assert_eq!(none.len(), 64);
        assert!(none.iter().all(|l| l.count == 1 && l.segment.is_none()));
    }

    #[test]
    fn runs_end_at_a_shorter_datagram_and_at_the_payload_cap() {
        let bufs = sizes(&[100, 100, 50, 100, 200, 200, 0, 7]);
        let links = plan_links(&bufs, 0, true, 32);
        let shape: Vec<(usize, usize, Option<u16>)> = links
            .iter()
            .map(|l| (l.first, l.count, l.segment))
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 3, Some(100)),
                (3, 1, None),
                (4, 2, Some(200)),
                (6, 1, None),
                (7, 1, None)
            ]
        );
        // 1400-byte datagrams: 46 fit under 65507 bytes.
        let big = sizes(&[1400; 64]);
        let links = plan_links(&big, 0, true, 32);
        assert_eq!(links[0].count, 46);
        assert_eq!(links[1].count, 18);
        // The link cap is respected.
        assert_eq!(plan_links(&sizes(&[1, 2, 3, 4]), 1, true, 2).len(), 2);
    }

    #[test]
    fn gso_cmsg_round_trips_through_the_parser_layout() {
        let words = gso_cmsg(1200);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        // SAFETY: `bytes` holds a whole cmsghdr; read unaligned.
        let header = unsafe { bytes.as_ptr().cast::<libc::cmsghdr>().read_unaligned() };
        assert_eq!(header.cmsg_level, libc::SOL_UDP);
        assert_eq!(header.cmsg_type, UDP_SEGMENT);
        assert_eq!(
            u16::from_ne_bytes([bytes[CMSG_HDR], bytes[CMSG_HDR + 1]]),
            1200
        );
    }

    #[test]
    fn gro_control_message_is_found() {
        let mut control = vec![0u8; 24];
        let header = libc::cmsghdr {
            cmsg_len: CMSG_HDR + 4,
            cmsg_level: libc::SOL_UDP,
            cmsg_type: UDP_GRO,
        };
        // SAFETY: `control` has room for a cmsghdr; written unaligned.
        unsafe {
            control
                .as_mut_ptr()
                .cast::<libc::cmsghdr>()
                .write_unaligned(header)
        };
        control[CMSG_HDR..CMSG_HDR + 4].copy_from_slice(&1400i32.to_ne_bytes());
        assert_eq!(gro_segment(&control), Some(1400));
        assert_eq!(gro_segment(&[]), None);
        assert_eq!(gro_segment(&[0xff; 7]), None);
    }

    #[test]
    fn addresses_parse_and_mapped_ones_become_v4() {
        let v4: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let raw = RawAddr::from_socket_addr(v4);
        // SAFETY: the storage holds `len` initialised bytes of address.
        let bytes =
            unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len as usize) };
        assert_eq!(addr_from_bytes(bytes), Some(v4));
        let v6: SocketAddr = "[2001:db8::7]:443".parse().unwrap();
        let raw = RawAddr::from_socket_addr(v6);
        // SAFETY: the storage holds `len` initialised bytes of address.
        let bytes =
            unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len as usize) };
        assert_eq!(addr_from_bytes(bytes), Some(v6));
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        let raw = RawAddr::from_socket_addr(mapped);
        // SAFETY: as above.
        let bytes =
            unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len as usize) };
        assert_eq!(addr_from_bytes(bytes), Some(v4));
        assert_eq!(addr_from_bytes(&[]), None);
        let mapped = for_family(v4, true);
        assert!(mapped.is_ipv6());
        assert_eq!(canonical(mapped), v4);
        assert_eq!(for_family(v4, false), v4);
    }
}
