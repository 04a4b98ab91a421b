//! The plain std UDP peers: the udp-batch receiver, the GSO flood sender of udp-recv and
//! the udp-echo-rtt echo server; and the counting receive loop that the udp-batch receiver
//! and the measured std-per-write receiver of udp-recv share.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cpu;
use super::peer::{bench_error, read_seq, stamp, FILL, PEER_WAIT};

/// The receive buffer every UDP receiver asks for (SO_RCVBUF; the kernel caps it at
/// net.core.rmem_max, then doubles it).
pub const RCVBUF: usize = 64 << 20;
/// A receiver that has had datagrams stops after this long without a new one: the
/// rest were lost.
pub const UDP_IDLE: Duration = Duration::from_millis(500);
/// How often a blocked receiver looks at the clock and its stop flag.
const TICK: Duration = Duration::from_millis(50);

/// A std UDP socket bound to 127.0.0.1 (any port) with a [`RCVBUF`] receive buffer; with
/// `force`, SO_RCVBUFFORCE first, which lets root go past net.core.rmem_max (for a peer
/// that must not lose what the measured side sends).
pub fn receiver_socket(force: bool) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let forced = force && {
        let bytes = libc::c_int::try_from(RCVBUF).unwrap_or(libc::c_int::MAX);
        // SAFETY: setsockopt reads a c_int from a live local of that size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    };
    if !forced {
        socket.set_recv_buffer_size(RCVBUF)?;
    }
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    Ok(socket.into())
}

/// The receive buffer the kernel really gave `socket`, in bytes.
pub fn recv_buffer(socket: &UdpSocket) -> Option<usize> {
    socket2::SockRef::from(socket).recv_buffer_size().ok()
}

/// `SO_MEMINFO` (Linux 3.9): the socket's memory counters, an array of u32 indexed by
/// `SK_MEMINFO_*`.
const SO_MEMINFO: libc::c_int = 55;

/// Datagrams the kernel dropped on `socket`, mostly because its receive queue was full
/// (`SO_MEMINFO`'s `SK_MEMINFO_DROPS`).
pub fn kernel_drops(socket: &UdpSocket) -> Option<u64> {
    const DROPS: usize = libc::SK_MEMINFO_DROPS as usize;
    let mut info = [0u32; DROPS + 1];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a live array of that size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // A kernel with fewer counters leaves the drop counter out.
    (rc == 0 && len as usize >= std::mem::size_of_val(&info)).then_some(u64::from(info[DROPS]))
}

/// Whether a received datagram is one the sender sent: exactly `size` bytes, with a
/// sequence number below `count`.
#[inline]
pub fn well_formed(datagram: &[u8], size: usize, count: u64) -> bool {
    datagram.len() == size && read_seq(datagram) < count
}

/// What a counting receiver got.
#[derive(Debug, Default)]
pub struct Counted {
    /// Datagrams received (well formed or not).
    pub delivered: u64,
    /// Of those, datagrams of the wrong size or with a sequence number out of range.
    pub bad: u64,
    /// When the first datagram came.
    pub first: Option<Instant>,
    /// When the last one came.
    pub last: Option<Instant>,
    /// `recv` calls (system calls), idle ones included.
    pub calls: u64,
    /// CPU time the receiving thread used.
    pub cpu_secs: f64,
}

/// Receives with one blocking `recv` per datagram until `count` came, until
/// [`UDP_IDLE`] passed without one after the first (the rest were lost), until
/// [`PEER_WAIT`] passed before any, or once `stop` is set.
pub fn count_datagrams(
    socket: &UdpSocket,
    size: usize,
    count: u64,
    stop: Option<&AtomicBool>,
) -> io::Result<Counted> {
    socket.set_read_timeout(Some(TICK))?;
    let cpu0 = cpu::thread_cpu_secs();
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    let mut got = Counted::default();
    while got.delivered < count {
        got.calls += 1;
        match socket.recv(&mut buf) {
            Ok(n) => {
                if !well_formed(&buf[..n], size, count) {
                    got.bad += 1;
                }
                got.delivered += 1;
                let now = Instant::now();
                got.first.get_or_insert(now);
                got.last = Some(now);
            }
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                let idle = match got.last {
                    Some(last) => last.elapsed() >= UDP_IDLE,
                    None => start.elapsed() >= PEER_WAIT,
                };
                if idle || stop.is_some_and(|s| s.load(Ordering::Acquire)) {
                    break;
                }
            }
            Err(err) => return Err(err),
        }
    }
    got.cpu_secs = cpu::thread_cpu_secs() - cpu0;
    Ok(got)
}

/// Starts the udp-batch receiver on its own thread (on the peer CPU when `pin`): it
/// counts datagrams as [`count_datagrams`] does; `stop` ends it early (the sender
/// failed).
pub fn spawn_counter(
    socket: UdpSocket,
    size: usize,
    count: u64,
    pin: bool,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<io::Result<Counted>>> {
    std::thread::Builder::new()
        .name("bench-udp-rx".into())
        .spawn(move || {
            cpu::pin_peer(pin);
            count_datagrams(&socket, size, count, Some(&stop))
        })
}

/// What the flood sender did.
#[derive(Debug)]
pub struct Flood {
    /// From its first send to its last.
    pub secs: f64,
    /// `sendmsg` calls.
    pub sends: u64,
}

/// Starts the udp-recv flood on its own thread (on the peer CPU when `pin`): once `ready`
/// says the receiver is set up, `count` datagrams of `size` bytes, each stamped with its
/// sequence number, go to `dest` as UDP GSO sends of `segments` datagrams (at most 65,507
/// bytes each) from `flows` blocking std sockets (each its own port, so its own flow),
/// one GSO send each in turn.
pub fn spawn_gso_flood(
    dest: SocketAddr,
    size: usize,
    count: u64,
    segments: usize,
    flows: usize,
    pin: bool,
    ready: mpsc::Receiver<()>,
) -> io::Result<JoinHandle<io::Result<Flood>>> {
    std::thread::Builder::new()
        .name("bench-udp-flood".into())
        .spawn(move || {
            cpu::pin_peer(pin);
            let sockets = (0..flows.max(1))
                .map(|_| UdpSocket::bind("127.0.0.1:0"))
                .collect::<io::Result<Vec<_>>>()?;
            ready
                .recv_timeout(PEER_WAIT)
                .map_err(|_| bench_error("flood: the receiver never became ready"))?;
            flood(&sockets, dest, size, count, segments)
        })
}

fn flood(
    sockets: &[UdpSocket],
    dest: SocketAddr,
    size: usize,
    count: u64,
    segments: usize,
) -> io::Result<Flood> {
    let k = segments.min(super::options::MAX_DATAGRAM / size).max(1);
    let segment = u16::try_from(size).map_err(|_| bench_error("flood: datagram too large"))?;
    let mut buf = vec![FILL; size * k];
    let dest = socket2::SockAddr::from(dest);
    let start = Instant::now();
    let mut sends = 0u64;
    let mut seq = 0u64;
    while seq < count {
        let n = (count - seq).min(k as u64) as usize;
        for j in 0..n {
            stamp(&mut buf[j * size..], seq + j as u64);
        }
        let gso = (n > 1).then_some(segment);
        // The same number of GSO sends from every flow.
        let socket = &sockets[(seq / k as u64) as usize % sockets.len()];
        loop {
            sends += 1;
            match send_gso(socket, &buf[..n * size], gso, &dest) {
                Ok(_) => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                // The device queue is full for a moment: let it drain.
                Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => {
                    std::thread::sleep(Duration::from_micros(50))
                }
                Err(err) => {
                    return Err(io::Error::new(
                        err.kind(),
                        format!("flood: UDP GSO send of {n} x {size} bytes: {err}"),
                    ))
                }
            }
        }
        seq += n as u64;
    }
    Ok(Flood {
        secs: start.elapsed().as_secs_f64(),
        sends,
    })
}

/// Bytes of a control buffer for one `UDP_SEGMENT` message (CMSG_SPACE of a u16).
// SAFETY: CMSG_SPACE is arithmetic on its argument; it touches no memory.
const SEGMENT_CONTROL_LEN: usize =
    unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;

/// The control buffer of one GSO send, aligned for the `cmsghdr` at its start.
#[repr(C)]
struct SegmentControl {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; SEGMENT_CONTROL_LEN],
}

/// One `sendmsg` of `payload` to `dest`; with `segment`, a UDP_SEGMENT control message
/// so that the kernel cuts it into datagrams of that size.
fn send_gso(
    socket: &UdpSocket,
    payload: &[u8],
    segment: Option<u16>,
    dest: &socket2::SockAddr,
) -> io::Result<usize> {
    let mut control = SegmentControl {
        _align: [],
        bytes: [0; SEGMENT_CONTROL_LEN],
    };
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain old data; all zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = dest.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = dest.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(segment) = segment {
        msg.msg_control = control.bytes.as_mut_ptr().cast();
        msg.msg_controllen = control.bytes.len();
        // SAFETY: msg_control points to CMSG_SPACE(sizeof(u16)) bytes aligned for a
        // cmsghdr, so CMSG_FIRSTHDR is that buffer and the header and its u16 fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            libc::CMSG_DATA(cmsg).cast::<u16>().write_unaligned(segment);
        }
    }
    // SAFETY: every pointer in `msg` (address, one iovec over `payload`, the control
    // buffer) points to live memory of the length given, for the duration of the call;
    // the kernel only reads them.
    let rc = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// Starts the udp-echo-rtt echo server on its own thread (on the peer CPU when `pin`):
/// one blocking `recv_from`, then `send_to` back, per datagram, until `stop` is set.
/// Returns the datagrams echoed.
pub fn spawn_echo_server(
    socket: UdpSocket,
    pin: bool,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<io::Result<u64>>> {
    std::thread::Builder::new()
        .name("bench-udp-echo".into())
        .spawn(move || {
            cpu::pin_peer(pin);
            socket.set_read_timeout(Some(TICK))?;
            let mut buf = vec![0u8; 65536];
            let mut echoed = 0u64;
            while !stop.load(Ordering::Acquire) {
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        socket.send_to(&buf[..n], from)?;
                        echoed += 1;
                    }
                    Err(err)
                        if matches!(
                            err.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(err) => return Err(err),
                }
            }
            Ok(echoed)
        })
}

/// Makes room for `needed` open descriptors: raises the soft RLIMIT_NOFILE up to the
/// hard one where it is lower (as servers do). `Some(hard limit)` where even that is
/// too low.
pub(crate) fn make_room_for_descriptors(needed: u64) -> std::io::Result<Option<u64>> {
    let mut limits = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limits) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limits.rlim_cur == libc::RLIM_INFINITY || limits.rlim_cur >= needed {
        return Ok(None);
    }
    if limits.rlim_max != libc::RLIM_INFINITY && limits.rlim_max < needed {
        return Ok(Some(limits.rlim_max));
    }
    let raised = libc::rlimit {
        rlim_cur: needed,
        rlim_max: limits.rlim_max,
    };
    // SAFETY: setrlimit reads one rlimit from the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::peer::message;

    #[test]
    fn the_counter_counts_and_checks() {
        let rx = receiver_socket(true).unwrap();
        let dest = rx.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let counter = spawn_counter(rx, 16, 10, false, stop).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..9 {
            tx.send_to(&message(16, i), dest).unwrap();
        }
        tx.send_to(&message(17, 9), dest).unwrap();
        let got = counter.join().unwrap().unwrap();
        assert_eq!((got.delivered, got.bad), (10, 1));
    }

    #[test]
    fn the_counter_stops_when_told() {
        let rx = receiver_socket(false).unwrap();
        let stop = Arc::new(AtomicBool::new(true));
        let got = count_datagrams(&rx, 16, 10, Some(&stop)).unwrap();
        assert_eq!(got.delivered, 0);
    }

    #[test]
    fn the_flood_delivers_every_datagram() {
        let rx = receiver_socket(true).unwrap();
        let dest = rx.local_addr().unwrap();
        let (ready, go) = mpsc::channel();
        let flood = spawn_gso_flood(dest, 100, 130, 64, 1, false, go).unwrap();
        ready.send(()).unwrap();
        let got = count_datagrams(&rx, 100, 130, None).unwrap();
        let flood = flood.join().unwrap().unwrap();
        assert_eq!((got.delivered, got.bad), (130, 0));
        assert_eq!(flood.sends, 3, "64 + 64 + 2");
        assert_eq!(kernel_drops(&rx), Some(0));
    }

    #[test]
    fn the_echo_server_echoes_until_stopped() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let echo = spawn_echo_server(server, false, stop.clone()).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"ping", addr).unwrap();
        let mut buf = [0u8; 16];
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        stop.store(true, Ordering::Release);
        assert_eq!(echo.join().unwrap().unwrap(), 1);
    }
}
