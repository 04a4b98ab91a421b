//! UDP GSO on the sending side: which datagrams of a batch go out together, the
//! UDP_SEGMENT control message, and `sendmmsg` batches. Shared by both engines.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use bytes::Bytes;

use super::iovec::append_joined;
use super::sockaddr::RawAddr;

/// `SOL_UDP` option / control message: GSO segment size (Linux 4.18).
pub(crate) const UDP_SEGMENT: libc::c_int = 103;
/// `SOL_UDP` option / control message: receive GRO super-datagrams (Linux 5.0).
/// Most segments ringsock puts in one GSO send (the kernel takes 64 since 4.18, 128
/// since 6.2; quinn-udp also uses 64).
pub(crate) const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload over IPv4 (65535 - 20 - 8); also the cap of one GSO send.
pub(crate) const MAX_UDP_PAYLOAD_V4: usize = 65507;
/// Largest UDP payload over IPv6 without jumbograms (65535 - 8).
pub(crate) const MAX_UDP_PAYLOAD_V6: usize = 65527;
/// Bytes of a `cmsghdr` (64-bit Linux) and of a control buffer for one u16 or i32 value.
pub(crate) const CMSG_HDR: usize = std::mem::size_of::<libc::cmsghdr>();
/// CMSG_SPACE(sizeof(u16)) = CMSG_SPACE(sizeof(int)) on 64-bit Linux, in u64 words.
pub(crate) const CMSG_WORDS: usize = (CMSG_HDR + 8) / 8;

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
    pub(crate) fn send(&mut self, fd: RawFd, at: usize) -> io::Result<usize> {
        let count = self.headers.len().saturating_sub(at);
        // SAFETY: every header from `at` points to storage of this struct and to iovecs
        // over the caller's live Bytes (the struct's contract); the kernel reads them
        // only during the call.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
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
}
