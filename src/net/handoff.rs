//! Sockets in and out of a runtime: detached from one and adopted by another thread's
//! runtime, handed to another process and back (the socket broker, over SCM_RIGHTS), and
//! taken from a service manager at start (systemd socket activation).

use std::fmt;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use bytes::Bytes;

use crate::driver::ops_datagram::Carried;
use crate::driver::scm;
use crate::{DatagramSocket, Error, Result, StreamSocket, StreamSocketListener};

/// What kind of socket a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A TCP connection (a [`StreamSocket`]).
    Stream,
    /// A listening TCP socket (a [`StreamSocketListener`]).
    Listener,
    /// A UDP socket (a [`DatagramSocket`]).
    Datagram,
}

impl SocketKind {
    fn code(self) -> u8 {
        match self {
            SocketKind::Stream => 1,
            SocketKind::Listener => 2,
            SocketKind::Datagram => 3,
        }
    }

    fn from_code(code: u8) -> Option<SocketKind> {
        match code {
            1 => Some(SocketKind::Stream),
            2 => Some(SocketKind::Listener),
            3 => Some(SocketKind::Datagram),
            _ => None,
        }
    }
}

/// A socket taken off its runtime, owned by nothing but this value: `Send`, so another
/// thread's runtime can adopt it ([`into_stream`](Self::into_stream) and its siblings
/// on that thread), or another process can (see [`send_detached`]).
///
/// A listener carries the connections the kernel had accepted for it but the program
/// had not taken yet; the adopting listener hands them out first.
pub struct Detached {
    fd: OwnedFd,
    kind: SocketKind,
    accepted: Vec<OwnedFd>,
    /// A datagram socket's datagrams received and not yet taken.
    datagrams: Vec<Carried>,
    /// A stream's bytes received ahead and not yet read.
    bytes: Bytes,
    /// A stream whose peer's reset was reported on its way here: its reads after the
    /// carried bytes are that reset, not an end of stream (Linux tells one call only).
    reset: bool,
}

impl Detached {
    pub(crate) fn new(fd: OwnedFd, kind: SocketKind, accepted: Vec<OwnedFd>) -> Detached {
        Detached {
            fd,
            kind,
            accepted,
            datagrams: Vec::new(),
            bytes: Bytes::new(),
            reset: false,
        }
    }

    /// The same, for a stream whose peer's reset was reported already.
    pub(crate) fn with_reset(mut self, reset: bool) -> Detached {
        self.reset = reset;
        self
    }

    /// The same, carrying a stream's bytes received ahead and not yet read.
    pub(crate) fn with_bytes(mut self, bytes: Bytes) -> Detached {
        self.bytes = bytes;
        self
    }

    /// Bytes a stream carries: received before it detached (by the poll-based read
    /// traits, ahead of the caller) and not yet read, read first from the socket that
    /// adopts it.
    pub fn carried_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The same, carrying a datagram socket's received datagrams.
    pub(crate) fn with_datagrams(mut self, datagrams: Vec<Carried>) -> Detached {
        self.datagrams = datagrams;
        self
    }

    /// Datagrams it carries: received before it detached and not yet taken, handed out
    /// first by the socket that adopts it.
    pub fn carried_datagrams(&self) -> usize {
        self.datagrams.len()
    }

    /// Takes a descriptor made elsewhere (inherited, received, from std): its kind is
    /// read from the socket itself (type, protocol, and whether it listens), and it is
    /// made non-blocking. A descriptor that is not a TCP or UDP socket is an error.
    pub fn from_fd(fd: OwnedFd) -> Result<Detached> {
        let kind = kind_of(fd.as_fd())?;
        socket2::SockRef::from(&fd)
            .set_nonblocking(true)
            .map_err(|err| Error::io("make the socket non-blocking", err))?;
        Ok(Detached::new(fd, kind, Vec::new()))
    }

    /// What kind of socket it is.
    pub fn kind(&self) -> SocketKind {
        self.kind
    }

    /// Connections a listener brought along, not yet taken.
    pub fn accepted_count(&self) -> usize {
        self.accepted.len()
    }

    /// Adopts it as a [`StreamSocket`] of the runtime running on this thread (or, made
    /// outside one, of the first runtime that uses it).
    pub fn into_stream(self) -> Result<StreamSocket> {
        self.expect(SocketKind::Stream)?;
        StreamSocket::adopt(self.fd, self.bytes, self.reset)
    }

    /// Adopts it as a [`StreamSocketListener`]; the connections it brought come first.
    pub fn into_listener(self) -> Result<StreamSocketListener> {
        self.expect(SocketKind::Listener)?;
        StreamSocketListener::adopt(self.fd, self.accepted)
    }

    /// Adopts it as a [`DatagramSocket`].
    pub fn into_datagram(self) -> Result<DatagramSocket> {
        self.expect(SocketKind::Datagram)?;
        DatagramSocket::adopt(self.fd, self.datagrams)
    }

    /// The descriptor itself; a listener's accepted connections are closed, and what a
    /// stream or datagram socket carries (bytes, datagrams) is dropped.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    fn expect(&self, kind: SocketKind) -> Result<()> {
        if self.kind == kind {
            return Ok(());
        }
        Err(Error::invalid_input(format!(
            "the detached socket is a {:?}, not a {kind:?}",
            self.kind
        )))
    }
}

/// What kind of TCP or UDP socket `fd` is; any other descriptor is an error.
fn kind_of(fd: BorrowedFd<'_>) -> Result<SocketKind> {
    let raw = fd.as_raw_fd();
    let socket = socket2::SockRef::from(&fd);
    // EBADF on a descriptor that is open: one opened with O_PATH, which no call but a
    // few on the path itself accepts.
    let ty = socket.r#type().map_err(|err| match err.raw_os_error() {
        Some(libc::ENOTSOCK | libc::EBADF) => {
            Error::invalid_input(format!("descriptor {raw} is not a socket"))
        }
        _ => Error::io("read the socket type", err),
    })?;
    let domain = socket
        .domain()
        .map_err(|err| Error::io("read the socket family", err))?;
    if domain != socket2::Domain::IPV4 && domain != socket2::Domain::IPV6 {
        return Err(Error::invalid_input(format!(
            "descriptor {raw} is not an IPv4 or IPv6 socket"
        )));
    }
    let protocol = socket
        .protocol()
        .map_err(|err| Error::io("read the socket protocol", err))?;
    // MPTCP keeps TCP's stream semantics; anything else of the same type (UDP-Lite, SCTP,
    // ICMP echo sockets) does not behave as the adopting socket expects.
    let tcp = [Some(socket2::Protocol::TCP), Some(socket2::Protocol::MPTCP)];
    if ty == socket2::Type::DGRAM && protocol == Some(socket2::Protocol::UDP) {
        Ok(SocketKind::Datagram)
    } else if ty == socket2::Type::STREAM && tcp.contains(&protocol) {
        let listening = socket
            .is_listener()
            .map_err(|err| Error::io("read SO_ACCEPTCONN", err))?;
        Ok(if listening {
            SocketKind::Listener
        } else {
            SocketKind::Stream
        })
    } else {
        Err(Error::invalid_input(format!(
            "descriptor {raw} is not a TCP or UDP socket"
        )))
    }
}

impl AsFd for Detached {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Detached {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl fmt::Debug for Detached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Detached")
            .field("fd", &self.fd.as_raw_fd())
            .field("kind", &self.kind)
            .field("accepted", &self.accepted.len())
            .field("datagrams", &self.datagrams.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// Every message starts with this, so garbage on the channel is refused, not trusted.
const MAGIC: &[u8; 4] = b"RSK1";
/// Header: magic, kind, then how many accepted connections follow (u32, little endian).
const HEADER: usize = 9;
/// The kind code of a stream whose carried bytes follow the header (a length, u32
/// little endian, then the bytes); a stream that carries none is sent as before.
const STREAM_WITH_BYTES: u8 = 4;
/// The same for a stream whose peer's reset was reported already; its byte count may
/// be 0.
const RESET_STREAM_WITH_BYTES: u8 = 5;
/// Most bytes a stream's hand-over carries: what the poll-based read traits receive at
/// once, many times over; a larger length on the channel is refused before it is read.
const MAX_CARRIED_BYTES: usize = 16 << 20;
/// Most accepted connections one hand-over carries, far more than a listener's backlog
/// holds by default: a larger count announced on the channel is refused before any
/// descriptor is taken, so a hostile peer cannot make this process take descriptors
/// until it has none left.
pub const MAX_ACCEPTED: usize = 1 << 16;

/// A failure reading the broker's channel; one that found nothing to read (its read
/// timeout passed, or it is non-blocking) is a time-out.
fn channel_error(err: std::io::Error) -> Error {
    match err.kind() {
        std::io::ErrorKind::WouldBlock => Error::timed_out(
            "take a socket handed over: nothing arrived within the channel's read timeout \
             (or the channel is non-blocking)",
        ),
        std::io::ErrorKind::UnexpectedEof => Error::connection_closed("take a socket handed over"),
        _ => Error::io("take a socket handed over", err),
    }
}

/// Hands `socket` to the process at the other end of `channel` (the socket broker):
/// its descriptor, and a listener's accepted connections, travel as SCM_RIGHTS; what a
/// stream or datagram socket carries (bytes, datagrams) follows as bytes; the connection
/// itself is untouched, so no byte is lost and nothing is reset. Blocking, as `channel`
/// is (the other side must be reading when much is carried). The other side takes it
/// with [`recv_detached`].
///
/// The other side gets descriptors of its own: once this returns Ok, drop `socket` (its
/// copies close, the socket lives on there). On an error `socket` is still whole and
/// the caller's to adopt again, so a peer that went away (`BrokenPipe`, never a
/// SIGPIPE) or a channel that stayed full (`ConnectionTimedOut`: its write timeout,
/// [`UnixStream::set_write_timeout`], bounds the wait) costs no connection; the
/// channel may then be out of step with its peer, and is best closed.
pub fn send_detached(channel: &UnixStream, socket: &Detached) -> Result<()> {
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(MAGIC);
    let reset = socket.kind == SocketKind::Stream && socket.reset;
    let with_bytes = socket.kind == SocketKind::Stream && (!socket.bytes.is_empty() || reset);
    header[4] = match (reset, with_bytes) {
        (true, _) => RESET_STREAM_WITH_BYTES,
        (false, true) => STREAM_WITH_BYTES,
        (false, false) => socket.kind.code(),
    };
    let count = u32::try_from(socket.accepted.len())
        .ok()
        .filter(|&count| count as usize <= MAX_ACCEPTED)
        .ok_or_else(|| Error::invalid_input("too many accepted connections to hand over"))?;
    header[5..].copy_from_slice(&count.to_le_bytes());
    // What follows the descriptors, made before anything is sent: a socket that cannot
    // be handed over is refused before the other side sees any of it.
    let mut section = Vec::new();
    if with_bytes {
        let len = u32::try_from(socket.bytes.len())
            .ok()
            .filter(|&len| len as usize <= MAX_CARRIED_BYTES)
            .ok_or_else(|| Error::invalid_input("too many carried bytes to hand over"))?;
        section.extend_from_slice(&len.to_le_bytes());
        section.extend_from_slice(&socket.bytes);
    }
    if socket.kind == SocketKind::Datagram {
        section = carried::encode(&socket.datagrams)?;
    }
    let mut fds: Vec<BorrowedFd<'_>> = vec![socket.fd.as_fd()];
    fds.extend(socket.accepted.iter().map(AsFd::as_fd));
    let send = |data: &[u8], fds: &[BorrowedFd<'_>]| {
        scm::send_with_fds(channel.as_fd(), data, fds).map_err(send_error)
    };
    let mut chunks = fds.chunks(scm::MAX_FDS_PER_MESSAGE);
    send(&header, chunks.next().unwrap_or(&[]))?;
    // More descriptors than one message carries: one byte per further message, so
    // each set of descriptors rides on a byte of its own.
    for chunk in chunks {
        send(b"+", chunk)?;
    }
    (&*channel).write_all(&section).map_err(send_error)
}

/// A failure writing the broker's channel; one that found it full (its write timeout
/// passed, or it is non-blocking) is a time-out.
fn send_error(err: std::io::Error) -> Error {
    match err.kind() {
        std::io::ErrorKind::WouldBlock => Error::timed_out(
            "hand a socket over: the channel stayed full through its write timeout (or it \
             is non-blocking)",
        ),
        _ => Error::io("hand a socket over", err),
    }
}

/// Takes a socket handed over with [`send_detached`] from `channel`.
///
/// Blocking, as `channel` is: a peer that sends nothing, or stops half-way, holds it as
/// long as the channel's read timeout ([`UnixStream::set_read_timeout`]), then it fails
/// with `ConnectionTimedOut`; without one, for ever. A message that is not a hand-over
/// (garbage, a descriptor that is not a TCP or UDP socket of the kind announced, more
/// than [`MAX_ACCEPTED`] connections, more or fewer descriptors than announced) fails
/// with `InvalidArgument`, an end of stream before its end with `ConnectionClosed`,
/// descriptors this process has no room for with `TooManyOpenFiles`. Whatever failed,
/// every descriptor it brought is closed; the channel is then out of step with its
/// peer, and is best closed.
///
/// The sender keeps its own descriptors for the socket, and they share its open file
/// (O_NONBLOCK included) with the ones taken here: take sockets only from a process
/// trusted with them, as it can still read, write or reconfigure them.
pub fn recv_detached(channel: &UnixStream) -> Result<Detached> {
    let mut header = [0u8; HEADER];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HEADER {
        let (n, more) =
            scm::recv_with_fds(channel.as_fd(), &mut header[got..]).map_err(channel_error)?;
        if n == 0 {
            return Err(Error::connection_closed("take a socket handed over"));
        }
        got += n;
        fds.extend(more);
    }
    if &header[..4] != MAGIC {
        return Err(Error::invalid_input(
            "not a ringsock socket hand-over on this channel",
        ));
    }
    let reset = header[4] == RESET_STREAM_WITH_BYTES;
    let with_bytes = header[4] == STREAM_WITH_BYTES || reset;
    let kind = if with_bytes {
        Some(SocketKind::Stream)
    } else {
        SocketKind::from_code(header[4])
    }
    .ok_or_else(|| Error::invalid_input("unknown socket kind in a hand-over"))?;
    let count = u32::from_le_bytes([header[5], header[6], header[7], header[8]]) as usize;
    if count > MAX_ACCEPTED || (count > 0 && kind != SocketKind::Listener) {
        return Err(Error::invalid_input(format!(
            "a hand-over of a {kind:?} announced {count} accepted connections"
        )));
    }
    while fds.len() < count + 1 {
        let mut byte = [0u8; 1];
        let (n, more) = scm::recv_with_fds(channel.as_fd(), &mut byte).map_err(channel_error)?;
        if n == 0 {
            return Err(Error::connection_closed("take a socket handed over"));
        }
        fds.extend(more);
    }
    if fds.len() != count + 1 {
        return Err(Error::invalid_input(format!(
            "a hand-over announced {} descriptors and carried {}",
            count + 1,
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    let fd = fds.next().expect("at least one, checked above");
    let mut detached = Detached::from_fd(fd)?;
    if detached.kind != kind {
        return Err(Error::invalid_input(format!(
            "a hand-over announced a {kind:?} and carried a {:?}",
            detached.kind
        )));
    }
    // The listener hands these out as connections: each must be one (a blocking pipe
    // handed out as a connection would stall the runtime that reads it).
    for fd in fds {
        let accepted = Detached::from_fd(fd)?;
        accepted.expect(SocketKind::Stream).map_err(|_| {
            Error::invalid_input(format!(
                "a listener's hand-over carried a {:?} as an accepted connection",
                accepted.kind
            ))
        })?;
        detached.accepted.push(accepted.fd);
    }
    if with_bytes {
        detached.bytes = read_carried_bytes(channel, reset)?;
        detached.reset = reset;
    }
    if kind == SocketKind::Datagram {
        detached.datagrams = carried::decode(&mut &*channel)?;
    }
    Ok(detached)
}

/// A stream's carried bytes, on the broker's channel: their length, then them.
/// Only a reset stream's may be empty: a stream with nothing to carry is sent without.
fn read_carried_bytes(channel: &UnixStream, may_be_empty: bool) -> Result<Bytes> {
    use std::io::Read;
    let mut len = [0u8; 4];
    (&*channel).read_exact(&mut len).map_err(channel_error)?;
    let len = u32::from_le_bytes(len) as usize;
    if (len == 0 && !may_be_empty) || len > MAX_CARRIED_BYTES {
        return Err(Error::invalid_input(format!(
            "a hand-over announced {len} carried bytes"
        )));
    }
    let mut bytes = vec![0u8; len];
    (&*channel).read_exact(&mut bytes).map_err(channel_error)?;
    Ok(Bytes::from(bytes))
}

/// The datagrams a datagram socket carries, on the broker's channel: after the header, a
/// count, then each datagram (sender, flags, lengths, what the kernel reported beside
/// it, bytes), little-endian.
mod carried {
    use std::io::Read;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use bytes::Bytes;

    use crate::driver::ops_datagram::Carried;
    use crate::{Error, Result};

    /// Most datagrams one hand-over carries: a receive ring's worth and then some, so a
    /// corrupt count cannot make the taker allocate without bound.
    const MAX_DATAGRAMS: u32 = 1 << 20;
    /// Largest datagram payload (IPv6's UDP maximum).
    const MAX_LEN: u32 = 65_535;
    /// Most payload bytes one hand-over carries in all, as for a stream's carried bytes
    /// (several full receive rings): the count and the length bounds alone would let a
    /// hostile peer make the taker hold 64 GiB.
    const MAX_TOTAL: usize = 4 * super::MAX_CARRIED_BYTES;
    /// A datagram's flags: longer than what came.
    const TRUNCATED: u8 = 1;
    /// A datagram's flags: the old owner's forwarding rule kept it for the program.
    const KEPT: u8 = 2;

    fn put_ip(out: &mut Vec<u8>, ip: Option<IpAddr>) {
        match ip {
            None => out.push(0),
            Some(IpAddr::V4(ip)) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            Some(IpAddr::V6(ip)) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
    }

    pub(super) fn encode(datagrams: &[Carried]) -> Result<Vec<u8>> {
        let count = u32::try_from(datagrams.len())
            .ok()
            .filter(|&n| n <= MAX_DATAGRAMS)
            .ok_or_else(|| Error::invalid_input("too many datagrams to hand over"))?;
        let total: usize = datagrams.iter().map(|d| d.data.len()).sum();
        if total > MAX_TOTAL {
            return Err(Error::invalid_input(format!(
                "{total} bytes of received datagrams to hand over: more than {MAX_TOTAL}"
            )));
        }
        let mut out = count.to_le_bytes().to_vec();
        for d in datagrams {
            put_ip(&mut out, d.addr.map(|a| a.ip()));
            out.extend_from_slice(&d.addr.map_or(0, |a| a.port()).to_le_bytes());
            out.push(u8::from(d.truncated) | u8::from(d.kept) << 1);
            out.extend_from_slice(&(d.original_len as u32).to_le_bytes());
            put_ip(&mut out, d.meta.destination);
            out.extend_from_slice(&d.meta.tos.map_or(u16::MAX, u16::from).to_le_bytes());
            out.extend_from_slice(&d.meta.interface.to_le_bytes());
            out.extend_from_slice(&d.meta.timestamp_ns.to_le_bytes());
            out.extend_from_slice(&d.meta.gro_segment.to_le_bytes());
            out.extend_from_slice(&(d.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&d.data);
        }
        Ok(out)
    }

    fn read<const N: usize>(from: &mut impl Read) -> Result<[u8; N]> {
        let mut bytes = [0u8; N];
        from.read_exact(&mut bytes).map_err(super::channel_error)?;
        Ok(bytes)
    }

    /// Bytes of the address a tag announces (none, IPv4, IPv6).
    fn ip_len(tag: u8) -> Result<usize> {
        match tag {
            0 => Ok(0),
            4 => Ok(4),
            6 => Ok(16),
            _ => Err(Error::invalid_input("a bad address in a hand-over")),
        }
    }

    fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
        match bytes.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(bytes).expect("4 bytes"),
            ))),
            16 => Some(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(bytes).expect("16 bytes"),
            ))),
            _ => None,
        }
    }

    /// Takes `N` bytes from the front of `bytes`.
    fn take<const N: usize>(bytes: &mut &[u8]) -> [u8; N] {
        let (head, rest) = bytes.split_at(N);
        *bytes = rest;
        head.try_into().expect("N bytes")
    }

    fn invalid(what: &str) -> Error {
        Error::invalid_input(format!("a hand-over carried {what}"))
    }

    /// Reads the datagrams back, each in four reads of the channel (its two addresses
    /// are of variable length), and refuses what the sender could not have written: a
    /// count, a length or a total over the bounds, or a datagram whose lengths, segment
    /// size or traffic class contradict each other.
    pub(super) fn decode(from: &mut impl Read) -> Result<Vec<Carried>> {
        let count = u32::from_le_bytes(read(from)?);
        if count > MAX_DATAGRAMS {
            return Err(invalid("too many datagrams"));
        }
        let mut datagrams = Vec::new();
        let mut total = 0usize;
        let mut fixed = [0u8; 16 + 2 + 1 + 4 + 1];
        let mut tail = [0u8; 16 + 2 + 4 + 8 + 2 + 4];
        for _ in 0..count {
            let sender_len = ip_len(read::<1>(from)?[0])?;
            // The sender's address, its port, the truncation flag, the original length
            // and the next address's tag.
            let first = &mut fixed[..sender_len + 8];
            from.read_exact(first).map_err(super::channel_error)?;
            let mut rest: &[u8] = first;
            let sender = ip_of(&rest[..sender_len]);
            rest = &rest[sender_len..];
            let port = u16::from_le_bytes(take(&mut rest));
            let flags = take::<1>(&mut rest)[0];
            if flags & !(TRUNCATED | KEPT) != 0 {
                return Err(invalid("unknown datagram flags"));
            }
            let truncated = flags & TRUNCATED != 0;
            let kept = flags & KEPT != 0;
            let original_len = u32::from_le_bytes(take(&mut rest)) as usize;
            let destination_len = ip_len(take::<1>(&mut rest)[0])?;
            // The destination, traffic class, interface, timestamp, segment size and
            // the payload's length.
            let second = &mut tail[..destination_len + 20];
            from.read_exact(second).map_err(super::channel_error)?;
            let mut rest: &[u8] = second;
            let destination = ip_of(&rest[..destination_len]);
            rest = &rest[destination_len..];
            let tos = u16::from_le_bytes(take(&mut rest));
            let interface = u32::from_le_bytes(take(&mut rest));
            let timestamp_ns = u64::from_le_bytes(take(&mut rest));
            let gro_segment = u16::from_le_bytes(take(&mut rest));
            let len = u32::from_le_bytes(take(&mut rest));
            if len > MAX_LEN {
                return Err(invalid("an oversized datagram"));
            }
            let len = len as usize;
            total += len;
            if total > MAX_TOTAL {
                return Err(invalid(&format!(
                    "more than {MAX_TOTAL} bytes of datagrams"
                )));
            }
            // Truncated: it was longer than what came; else exactly as long.
            let lengths_agree = match truncated {
                true => original_len > len,
                false => original_len == len,
            };
            if !lengths_agree {
                return Err(invalid(&format!(
                    "a datagram of {len} bytes with an original length of {original_len} \
                     (truncated: {truncated})"
                )));
            }
            // Whole, a segment of a GRO super-datagram is at most the segment size (a
            // truncated super-datagram comes uncut).
            if gro_segment != 0 && !truncated && len > usize::from(gro_segment) {
                return Err(invalid(&format!(
                    "a datagram of {len} bytes cut from segments of {gro_segment}"
                )));
            }
            let tos = match tos {
                u16::MAX => None,
                tos => Some(u8::try_from(tos).map_err(|_| invalid("a bad traffic class"))?),
            };
            let mut data = vec![0u8; len];
            from.read_exact(&mut data).map_err(super::channel_error)?;
            let meta = crate::driver::ops_datagram::RecvMeta {
                destination,
                // Not carried: a reply leaves from the destination if it is unicast.
                reply_source: destination.and_then(crate::driver::cmsg::unicast),
                tos,
                interface,
                timestamp_ns,
                gro_segment,
            };
            datagrams.push(Carried {
                data: Bytes::from(data),
                addr: sender.map(|ip| SocketAddr::new(ip, port)),
                truncated,
                original_len,
                meta,
                kept,
            });
        }
        Ok(datagrams)
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::driver::ops_datagram::RecvMeta;

        fn whole(len: usize) -> Carried {
            Carried {
                data: Bytes::from(vec![7u8; len]),
                addr: Some("192.0.2.1:5000".parse().unwrap()),
                truncated: false,
                original_len: len,
                kept: len % 2 == 0,
                meta: RecvMeta {
                    destination: Some("::1".parse().unwrap()),
                    reply_source: Some("::1".parse().unwrap()),
                    tos: Some(0xb8),
                    interface: 3,
                    timestamp_ns: 1,
                    gro_segment: 0,
                },
            }
        }

        #[test]
        fn datagrams_come_back_as_they_went() {
            let sent: Vec<Carried> = (0..50).map(whole).collect();
            let bytes = encode(&sent).unwrap();
            let back = decode(&mut &bytes[..]).unwrap();
            assert_eq!(back.len(), sent.len());
            for (a, b) in sent.iter().zip(&back) {
                assert_eq!(
                    (&a.data, a.addr, a.original_len, a.kept),
                    (&b.data, b.addr, b.original_len, b.kept)
                );
                assert_eq!(a.meta, b.meta);
            }
        }

        #[test]
        fn unknown_datagram_flags_are_refused() {
            let mut bytes = encode(&[whole(10)]).unwrap();
            // The count, the sender's tag and address, its port: then the flags.
            let flags = 4 + 1 + 4 + 2;
            assert_eq!(bytes[flags] & !(TRUNCATED | KEPT), 0);
            bytes[flags] |= 4;
            let err = decode(&mut &bytes[..]).unwrap_err();
            assert!(err.to_string().contains("flags"), "{err}");
        }

        #[test]
        fn more_than_the_total_is_refused_both_ways() {
            let count = MAX_TOTAL / MAX_LEN as usize + 1;
            let sent: Vec<Carried> = (0..count).map(|_| whole(MAX_LEN as usize)).collect();
            let err = encode(&sent).unwrap_err();
            assert!(err.to_string().contains("more than"), "{err}");
            // Written by hand, as a hostile peer would: refused at the datagram that
            // goes past the total, before its bytes are read.
            let within = encode(&sent[..count - 1]).unwrap();
            let mut bytes = (count as u32).to_le_bytes().to_vec();
            bytes.extend_from_slice(&within[4..]);
            let last = encode(&sent[..1]).unwrap();
            bytes.extend_from_slice(&last[4..]);
            let err = decode(&mut &bytes[..]).unwrap_err();
            assert!(err.to_string().contains("more than"), "{err}");
        }
    }
}

/// A socket a service manager passed at start.
#[derive(Debug)]
pub struct Activated {
    /// Its name from `LISTEN_FDNAMES` (systemd's `FileDescriptorName=`), if given.
    pub name: Option<String>,
    /// The socket, ready to adopt.
    pub socket: Detached,
}

/// The sockets passed by systemd socket activation (or any launcher that keeps its
/// contract): descriptors from 3 on, `LISTEN_FDS` of them, for the process named by
/// `LISTEN_PID`, with optional `LISTEN_FDNAMES` (colon-separated, one per descriptor).
///
/// As systemd's `sd_listen_fds` does, it returns none when `LISTEN_PID` or `LISTEN_FDS`
/// is absent or `LISTEN_PID` names another process (whatever the other variables say).
/// They are taken once per process: a second call returns none.
///
/// A variable that does not parse, `LISTEN_FDNAMES` with another count of names, a
/// descriptor that is not open or is not a TCP or UDP socket, are errors; then none is
/// taken or closed (they may belong to something else of this process), and a later
/// call may try again. Call it before the process opens sockets of its own: a
/// `LISTEN_FDS` larger than what was passed would otherwise name one of them.
pub fn activated_sockets() -> Result<Vec<Activated>> {
    let Ok(pid) = std::env::var("LISTEN_PID") else {
        return Ok(Vec::new());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| Error::invalid_input(format!("LISTEN_PID {pid:?} is not a process id")))?;
    if pid != std::process::id() {
        return Ok(Vec::new());
    }
    let Ok(count) = std::env::var("LISTEN_FDS") else {
        return Ok(Vec::new());
    };
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| Error::invalid_input(format!("LISTEN_FDS {count:?} is not a count")))?;
    if count > 1024 {
        return Err(Error::invalid_input(format!(
            "LISTEN_FDS {count} is more than a process is given"
        )));
    }
    let names: Vec<Option<String>> = match std::env::var("LISTEN_FDNAMES") {
        Ok(names) => {
            let names: Vec<_> = names
                .split(':')
                .map(|name| Some(name.to_owned()).filter(|name| !name.is_empty()))
                .collect();
            if names.len() != count {
                return Err(Error::invalid_input(format!(
                    "LISTEN_FDNAMES names {} descriptors and LISTEN_FDS passes {count}",
                    names.len()
                )));
            }
            names
        }
        Err(_) => vec![None; count],
    };
    let Some(fds) = scm::claim_listen_fds(count, |fd| kind_of(fd).map(drop))? else {
        return Ok(Vec::new());
    };
    fds.into_iter()
        .zip(names)
        .map(|(fd, name)| {
            Ok(Activated {
                name,
                socket: Detached::from_fd(fd)?,
            })
        })
        .collect()
}
