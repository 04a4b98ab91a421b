//! UDP GSO on the sending side: which datagrams of a batch go out together, the
//! UDP_SEGMENT control message, and `sendmmsg` batches. Shared by both engines.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::cmsg::{SendControl, SendMeta};
use super::iovec::append_joined;
use super::sockaddr::RawAddr;

/// Most segments ringsock puts in one GSO send (the kernel takes 64 since 4.18, 128
/// since 6.2; quinn-udp also uses 64).
pub(crate) const GSO_MAX_SEGMENTS: usize = 64;
/// Largest UDP payload over IPv4 (65535 - 20 - 8); also the cap of one GSO send.
pub(crate) const MAX_UDP_PAYLOAD_V4: usize = 65507;
/// Largest UDP payload over IPv6 without jumbograms (65535 - 8).
pub(crate) const MAX_UDP_PAYLOAD_V6: usize = 65527;

/// Where the datagrams of a batch go and what each carries. A GSO run never spans two
/// destinations or two metadata.
#[derive(Clone, Copy)]
pub(crate) enum Targets<'a> {
    /// Every datagram to one destination (`None`: the connected peer), with one
    /// metadata.
    One(Option<SocketAddr>, SendMeta),
    /// Datagram `i` to `list[i]`.
    Each(&'a [(SocketAddr, SendMeta)]),
}

impl Targets<'_> {
    /// Destination and metadata of datagram `i`.
    pub(crate) fn get(&self, i: usize) -> (Option<SocketAddr>, SendMeta) {
        match self {
            Targets::One(dest, meta) => (*dest, *meta),
            Targets::Each(list) => (Some(list[i].0), list[i].1),
        }
    }

    /// Datagrams `a` and `b` go to the same place with the same metadata.
    fn same(&self, a: usize, b: usize) -> bool {
        match self {
            Targets::One(..) => true,
            Targets::Each(list) => list[a] == list[b],
        }
    }

    /// The control data of a send starting at datagram `i` (`segment` for a GSO run).
    pub(crate) fn control(&self, i: usize, segment: Option<u16>) -> SendControl {
        SendControl::new(&self.get(i).1, segment)
    }
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
/// with its UDP_SEGMENT control message), each with its destination and metadata.
///
/// Built completely before use: the headers point into the iovec, control and address
/// storage of this struct (heap memory that does not move with it), and the iovecs into
/// the caller's buffers, which must outlive every [`send`](Self::send) and not change.
pub(crate) struct MmsgBatch {
    /// Read by the kernel through `headers`.
    _iovecs: Vec<libc::iovec>,
    _controls: Vec<SendControl>,
    _addrs: Vec<RawAddr>,
    headers: Vec<libc::mmsghdr>,
}

impl MmsgBatch {
    pub(crate) fn new<B: AsRef<[u8]>>(
        bufs: &[B],
        links: &[Link],
        targets: &Targets<'_>,
    ) -> MmsgBatch {
        let (mut iovecs, counts) = link_iovecs(bufs, links.iter());
        // One control per link that needs one; one address per batch (`One`) or per
        // link (`Each`). Sized first: the headers point into them.
        let mut controls: Vec<SendControl> = links
            .iter()
            .map(|link| targets.control(link.first, link.segment))
            .filter(|control| !control.is_empty())
            .collect();
        let mut addrs: Vec<RawAddr> = match targets {
            Targets::One(dest, _) => dest.iter().map(|d| RawAddr::from_socket_addr(*d)).collect(),
            Targets::Each(_) => links
                .iter()
                .filter_map(|link| targets.get(link.first).0)
                .map(RawAddr::from_socket_addr)
                .collect(),
        };
        // SAFETY: mmsghdr is plain old data; zero is its empty value.
        let mut headers: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; links.len()];
        let (mut iov_at, mut control_at) = (0, 0);
        for (i, ((link, header), count)) in
            links.iter().zip(headers.iter_mut()).zip(counts).enumerate()
        {
            let msg = &mut header.msg_hdr;
            msg.msg_iov = iovecs[iov_at..].as_mut_ptr();
            msg.msg_iovlen = count;
            iov_at += count;
            if link.segment.is_some() || !targets.get(link.first).1.is_empty() {
                let control = &mut controls[control_at];
                msg.msg_control = control.as_ptr();
                msg.msg_controllen = control.len();
                control_at += 1;
            }
            let addr = match targets {
                Targets::One(..) => addrs.first_mut(),
                Targets::Each(_) => addrs.get_mut(i),
            };
            if let Some(addr) = addr {
                msg.msg_name = addr.as_mut_ptr().cast();
                msg.msg_namelen = addr.len;
            }
        }
        MmsgBatch {
            _iovecs: iovecs,
            _controls: controls,
            _addrs: addrs,
            headers,
        }
    }

    /// How many messages there are.
    pub(crate) fn len(&self) -> usize {
        self.headers.len()
    }

    /// One `sendmmsg` of the messages from `at` on; how many the kernel took. A full
    /// send buffer is `WouldBlock`, also on a socket made blocking behind our back.
    pub(crate) fn send(&mut self, fd: RawFd, at: usize) -> io::Result<usize> {
        let count = self.headers.len().saturating_sub(at);
        // SAFETY: every header from `at` points to storage of this struct and to iovecs
        // over the caller's live buffers (the struct's contract); the kernel reads them
        // only during the call.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                self.headers.as_mut_ptr().add(at),
                count as libc::c_uint,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
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
pub(crate) fn link_iovecs<'a, B: AsRef<[u8]>>(
    bufs: &[B],
    links: impl Iterator<Item = &'a Link>,
) -> (Vec<libc::iovec>, Vec<usize>) {
    let mut iovecs = Vec::with_capacity(bufs.len());
    let counts = links
        .map(|link| {
            let datagrams = bufs[link.first..link.first + link.count].iter();
            append_joined(&mut iovecs, datagrams.map(|buf| buf.as_ref()), usize::MAX)
        })
        .collect();
    (iovecs, counts)
}

/// Splits `bufs[from..]` into at most `max_links` sends. With `gso`, a run of datagrams
/// of one size S (the last of a run may be shorter, as GSO allows), at most
/// [`GSO_MAX_SEGMENTS`] and [`MAX_UDP_PAYLOAD_V4`] bytes, becomes one link; everything
/// else is a link per datagram. Contents are never merged: the kernel cuts a GSO send
/// exactly at the datagram boundaries. A run ends where the destination or the metadata
/// changes (`targets`).
pub(crate) fn plan_links<B: AsRef<[u8]>>(
    bufs: &[B],
    from: usize,
    gso: bool,
    max_links: usize,
    targets: &Targets<'_>,
) -> Vec<Link> {
    let mut links = Vec::new();
    let mut i = from;
    while i < bufs.len() && links.len() < max_links {
        let size = bufs[i].as_ref().len();
        let mut count = 1;
        let mut total = size;
        if gso && size > 0 && size <= u16::MAX as usize {
            while i + count < bufs.len() && count < GSO_MAX_SEGMENTS {
                let next = bufs[i + count].as_ref().len();
                if next == 0
                    || next > size
                    || total + next > MAX_UDP_PAYLOAD_V4
                    || !targets.same(i, i + count)
                {
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

/// A GSO run the kernel refused with an error GSO may cause ([`gso_refused`]), and so
/// may the datagrams themselves (EINVAL for port 0 or a source address the host lacks):
/// sent again datagram by datagram, its first datagram tells which. Only when that one
/// goes on its own was GSO to blame, and the socket stops using it; otherwise the error
/// was the datagrams' own and GSO goes on after the run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GsoSuspect {
    first: usize,
    end: usize,
}

/// What a [`GsoSuspect`]'s datagrams, sent one by one, showed so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GsoVerdict {
    /// Not known yet: the run goes on datagram by datagram.
    Pending,
    /// The first datagram went on its own: GSO was refused.
    Blamed,
    /// The first failed on its own too, and the whole run has its results.
    Cleared,
}

impl GsoSuspect {
    /// The refused run `link`.
    pub(crate) fn new(link: &Link) -> GsoSuspect {
        GsoSuspect {
            first: link.first,
            end: link.first + link.count,
        }
    }

    /// The run's first datagram.
    pub(crate) fn first(&self) -> usize {
        self.first
    }

    /// `first_sent`: whether the run's first datagram went on its own, once it has a
    /// result; `done`: datagrams of the batch with a result.
    pub(crate) fn judge(&self, first_sent: Option<bool>, done: usize) -> GsoVerdict {
        match first_sent {
            None => GsoVerdict::Pending,
            Some(true) => GsoVerdict::Blamed,
            Some(false) if done >= self.end => GsoVerdict::Cleared,
            Some(false) => GsoVerdict::Pending,
        }
    }
}

/// For a batch to one destination, which stops at its first failure: with the datagrams
/// before `sent` gone, a suspect run whose first datagram went blames GSO, which the
/// socket then stops using (a failure of that datagram ends the batch, GSO untouched).
pub(crate) fn settle_suspect(suspect: &mut Option<GsoSuspect>, sent: usize, gso: &Cell<bool>) {
    let Some(run) = *suspect else {
        return;
    };
    let first_sent = (sent > run.first).then_some(true);
    if run.judge(first_sent, sent) == GsoVerdict::Blamed {
        gso.set(false);
        *suspect = None;
    }
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
    use bytes::Bytes;

    const ONE: Targets<'static> = Targets::One(
        None,
        SendMeta {
            source: None,
            tos: None,
            txtime: None,
            ipv4: true,
        },
    );

    fn sizes(list: &[usize]) -> Vec<Bytes> {
        list.iter().map(|&n| Bytes::from(vec![0u8; n])).collect()
    }

    #[test]
    fn equal_sizes_make_one_gso_link() {
        let bufs = sizes(&[172; 64]);
        let links = plan_links(&bufs, 0, true, 32, &ONE);
        assert_eq!(
            links,
            vec![Link {
                first: 0,
                count: 64,
                segment: Some(172)
            }]
        );
        let none = plan_links(&bufs, 0, false, 100, &ONE);
        assert_eq!(none.len(), 64);
        assert!(none.iter().all(|l| l.count == 1 && l.segment.is_none()));
    }

    #[test]
    fn runs_end_at_a_shorter_datagram_and_at_the_payload_cap() {
        let bufs = sizes(&[100, 100, 50, 100, 200, 200, 0, 7]);
        let links = plan_links(&bufs, 0, true, 32, &ONE);
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
        let links = plan_links(&big, 0, true, 32, &ONE);
        assert_eq!(links[0].count, 46);
        assert_eq!(links[1].count, 18);
        // The link cap is respected.
        assert_eq!(plan_links(&sizes(&[1, 2, 3, 4]), 1, true, 2, &ONE).len(), 2);
    }

    #[test]
    fn runs_never_span_two_destinations_or_two_traffic_classes() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let plain = SendMeta::default();
        let marked = SendMeta {
            tos: Some(0xb8),
            ..plain
        };
        let later = SendMeta {
            txtime: Some(1),
            ..marked
        };
        let list = [
            (a, plain),
            (a, plain),
            (b, plain),
            (b, plain),
            (b, marked),
            (b, later),
        ];
        let bufs = sizes(&[100; 6]);
        let links = plan_links(&bufs, 0, true, 32, &Targets::Each(&list));
        let shape: Vec<(usize, usize)> = links.iter().map(|l| (l.first, l.count)).collect();
        assert_eq!(shape, vec![(0, 2), (2, 2), (4, 1), (5, 1)]);
    }

    #[test]
    fn a_refused_run_blames_gso_only_when_its_first_datagram_goes_alone() {
        let run = GsoSuspect::new(&Link {
            first: 4,
            count: 3,
            segment: Some(100),
        });
        assert_eq!(run.judge(None, 4), GsoVerdict::Pending);
        assert_eq!(run.judge(Some(true), 5), GsoVerdict::Blamed);
        assert_eq!(run.judge(Some(false), 5), GsoVerdict::Pending);
        assert_eq!(run.judge(Some(false), 7), GsoVerdict::Cleared);
        let gso = Cell::new(true);
        let mut suspect = Some(run);
        settle_suspect(&mut suspect, 4, &gso);
        assert!(
            gso.get() && suspect.is_some(),
            "nothing of the run went yet"
        );
        settle_suspect(&mut suspect, 5, &gso);
        assert!(!gso.get() && suspect.is_none(), "its first went alone");
    }
}
