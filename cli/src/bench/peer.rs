//! The plain std peers every implementation is measured against, the same for all so that
//! "the same workload" means the same code on the other side: the blocking tcp-batch
//! receiver with its order check, the blocking echo server, and the tcp-echo-conns client.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cpu;

/// Every byte of a message after its 8-byte sequence header: a header read from fill
/// bytes (a misaligned or reordered stream) can never look like a valid number.
pub const FILL: u8 = 0xA5;
/// The tcp-batch receiver's read buffer.
pub const RX_BUF: usize = 256 * 1024;
/// How long a peer waits for data or for the other side before it gives up.
pub const PEER_WAIT: Duration = Duration::from_secs(10);
/// Echo round trips before the measured ones (tcp-echo-conns: ceil(this / C) per
/// connection).
pub const ECHO_WARMUP: u64 = 1000;

/// Writes `seq` as the little-endian header of `msg`.
#[inline]
pub fn stamp(msg: &mut [u8], seq: u64) {
    msg[..8].copy_from_slice(&seq.to_le_bytes());
}

/// The sequence header of `msg`.
#[inline]
pub fn read_seq(msg: &[u8]) -> u64 {
    let mut header = [0u8; 8];
    header.copy_from_slice(&msg[..8]);
    u64::from_le_bytes(header)
}

/// A message of `size` bytes carrying `seq`, the rest [`FILL`].
pub fn message(size: usize, seq: u64) -> Vec<u8> {
    let mut msg = vec![FILL; size];
    stamp(&mut msg, seq);
    msg
}

/// An error of the bench itself (a peer's check, a timeout), as an `io::Error`.
pub fn bench_error(message: impl Into<String>) -> io::Error {
    io::Error::other(message.into())
}

// ------------------------------------------------------------------ tcp-batch receiver

/// What the tcp-batch receiver got.
#[derive(Debug)]
pub struct RxOutcome {
    /// When the last expected byte arrived (or the receiver stopped).
    pub end: Instant,
    /// Bytes received.
    pub bytes: u64,
    /// Complete messages received before the first one found out of order.
    pub in_order: u64,
    /// The first order violation, if any: the header found and the one expected.
    pub order_lost: Option<String>,
    /// The stream ended before every byte arrived.
    pub short: Option<String>,
    /// `read` calls that returned data.
    pub reads: u64,
    /// CPU time the receiver thread used.
    pub cpu_secs: f64,
}

/// Starts the plain blocking receiver on its own thread (on the peer CPU when `pin`):
/// it reads into a 256 KiB buffer until it has `count * size` bytes, checking the
/// sequence header of every `stride`-th message.
///
/// `stream` is the accepted std socket, or a rustls server over it (tcp-batch `--tls`);
/// give the socket a read timeout ([`PEER_WAIT`]) first, so that a stalled sender ends
/// the run instead of hanging it.
///
/// After an order violation it stops checking but reads on to the end of the stream, so
/// the sender finishes normally and the run reports what it delivered in order.
pub fn spawn_receiver<R: Read + Send + 'static>(
    stream: R,
    size: usize,
    count: u64,
    stride: u64,
    pin: bool,
) -> io::Result<JoinHandle<io::Result<RxOutcome>>> {
    std::thread::Builder::new()
        .name("bench-rx".into())
        .spawn(move || {
            cpu::pin_peer(pin);
            receive(stream, size, count, stride.max(1))
        })
}

fn receive(mut stream: impl Read, size: usize, count: u64, stride: u64) -> io::Result<RxOutcome> {
    let cpu0 = cpu::thread_cpu_secs();
    let mut reads = 0u64;
    let want = count * size as u64;
    let mut buf = vec![0u8; RX_BUF];
    let mut header = [0u8; 8];
    let mut pos = 0u64;
    // Where the stream stands: message `k`, `in_msg` bytes into it.
    let mut k = 0u64;
    let mut in_msg = 0usize;
    let mut next_check = 0u64;
    let mut order_lost: Option<String> = None;
    let mut in_order = 0u64;
    while pos < want {
        let n = match stream.read(&mut buf) {
            Ok(0) => {
                let short = format!("receiver: end of stream after {pos} of {want} bytes");
                return Ok(RxOutcome {
                    end: Instant::now(),
                    bytes: pos,
                    in_order: if order_lost.is_some() { in_order } else { k },
                    order_lost,
                    short: Some(short),
                    reads,
                    cpu_secs: cpu::thread_cpu_secs() - cpu0,
                });
            }
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(bench_error(format!(
                    "receiver: no data for {PEER_WAIT:?} after {pos} of {want} bytes"
                )))
            }
            Err(err) => return Err(err),
        };
        reads += 1;
        if pos + n as u64 > want {
            return Err(bench_error(format!(
                "receiver: got {} bytes, {want} were sent",
                pos + n as u64
            )));
        }
        pos += n as u64;
        if order_lost.is_some() {
            continue;
        }
        let chunk = &buf[..n];
        let mut off = 0usize;
        while off < n {
            if in_msg < 8 && k == next_check {
                let take = (8 - in_msg).min(n - off);
                header[in_msg..in_msg + take].copy_from_slice(&chunk[off..off + take]);
                off += take;
                in_msg += take;
                if in_msg == 8 {
                    let got = u64::from_le_bytes(header);
                    if got != k {
                        order_lost = Some(format!(
                            "message {k} carries sequence number {got:#x}, expected {k}"
                        ));
                        in_order = k;
                        break;
                    }
                    next_check += stride;
                }
            } else {
                let advance = (size - in_msg).min(n - off);
                off += advance;
                in_msg += advance;
            }
            if in_msg == size {
                in_msg = 0;
                k += 1;
            }
        }
    }
    Ok(RxOutcome {
        end: Instant::now(),
        bytes: pos,
        in_order: if order_lost.is_some() { in_order } else { k },
        order_lost,
        short: None,
        reads,
        cpu_secs: cpu::thread_cpu_secs() - cpu0,
    })
}

// ------------------------------------------------------------------ echo server

/// Starts the plain blocking echo server of tcp-echo-rtt on its own thread (on the peer
/// CPU when `pin`): `read_exact(size)` then `write_all` until end of stream. Returns the
/// messages echoed.
pub fn spawn_echo_server(
    stream: TcpStream,
    size: usize,
    pin: bool,
) -> io::Result<JoinHandle<io::Result<u64>>> {
    std::thread::Builder::new()
        .name("bench-echo".into())
        .spawn(move || {
            cpu::pin_peer(pin);
            echo_until_eof(stream, size, &mut 0)
        })
}

/// Echoes `size`-byte messages until end of stream; counts its read and write calls
/// into `calls`. Returns the messages echoed.
pub fn echo_until_eof(mut stream: TcpStream, size: usize, calls: &mut u64) -> io::Result<u64> {
    stream.set_read_timeout(Some(PEER_WAIT))?;
    let mut buf = vec![0u8; size];
    let mut echoed = 0u64;
    loop {
        if !read_exact_counted(&mut stream, &mut buf, calls)? {
            return Ok(echoed);
        }
        write_all_counted(&mut stream, &buf, calls)?;
        echoed += 1;
    }
}

/// `read_exact` that counts its `read` calls; false on end of stream before the first
/// byte (a clean close), an error on end of stream inside a message.
pub fn read_exact_counted(
    stream: &mut TcpStream,
    buf: &mut [u8],
    calls: &mut u64,
) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        *calls += 1;
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(bench_error(format!("no data for {PEER_WAIT:?}")))
            }
            Err(err) => return Err(err),
        }
    }
    Ok(true)
}

/// `write_all` that counts its `write` calls.
pub fn write_all_counted(stream: &mut TcpStream, buf: &[u8], calls: &mut u64) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        *calls += 1;
        match stream.write(&buf[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ tcp-echo-conns client

/// What the tcp-echo-conns client measured.
#[derive(Debug)]
pub struct ConnsOutcome {
    /// Round-trip times of the measured phase, nanoseconds.
    pub rtts_ns: Vec<u64>,
    /// Wall time of the measured phase.
    pub secs: f64,
    /// Busy fraction of the measured CPU during the measured phase.
    pub cpu0_busy: Option<f64>,
    /// Busy fraction of the peer CPU.
    pub cpu1_busy: Option<f64>,
}

/// Round trips connection `i` of `conns` does in the measured phase.
pub fn conn_share(total: u64, conns: usize, i: usize) -> u64 {
    total / conns as u64 + u64::from((i as u64) < total % conns as u64)
}

/// Warm-up round trips per connection.
pub fn conn_warmup(conns: usize) -> u64 {
    ECHO_WARMUP.div_ceil(conns as u64)
}

/// Messages the server must have echoed: the warm-up of every connection plus `count`.
pub fn conns_total(count: u64, conns: usize) -> u64 {
    conn_warmup(conns) * conns as u64 + count
}

struct Conn {
    stream: mio::net::TcpStream,
    /// Round trips completed (warm-up and measured).
    done: u64,
    /// Round trips to complete by the end of the phase.
    until: u64,
    got: usize,
    sent_at: Instant,
    buf: [u8; 64],
    msg: [u8; 64],
}

/// Starts the plain client of tcp-echo-conns on its own thread (on the peer CPU when
/// `pin`): one thread, non-blocking sockets, one epoll wait for
/// up to C events, exactly one 64-byte message in flight per connection (stamp
/// `(conn << 40) | k`), each echo checked and its round trip (send start to echo
/// complete) recorded. After `ready`, a warm-up phase, then `count` measured round trips
/// spread evenly over the connections. Closes every connection at the end.
pub fn spawn_conns_client(
    streams: Vec<TcpStream>,
    count: u64,
    pin: bool,
    ready: mpsc::Receiver<()>,
) -> io::Result<JoinHandle<io::Result<ConnsOutcome>>> {
    std::thread::Builder::new()
        .name("bench-conns".into())
        .spawn(move || {
            cpu::pin_peer(pin);
            conns_client(streams, count, ready)
        })
}

fn conns_client(
    streams: Vec<TcpStream>,
    count: u64,
    ready: mpsc::Receiver<()>,
) -> io::Result<ConnsOutcome> {
    let c = streams.len();
    let mut poll = mio::Poll::new()?;
    let mut conns = Vec::with_capacity(c);
    for (i, stream) in streams.into_iter().enumerate() {
        stream.set_nonblocking(true)?;
        let mut stream = mio::net::TcpStream::from_std(stream);
        poll.registry()
            .register(&mut stream, mio::Token(i), mio::Interest::READABLE)?;
        conns.push(Conn {
            stream,
            done: 0,
            until: 0,
            got: 0,
            sent_at: Instant::now(),
            buf: [0; 64],
            msg: [FILL; 64],
        });
    }
    let mut events = mio::Events::with_capacity(c.max(1));
    ready
        .recv_timeout(PEER_WAIT)
        .map_err(|_| bench_error("client: the server never became ready"))?;
    let warm = conn_warmup(c);
    for conn in conns.iter_mut() {
        conn.until = warm;
    }
    conns_phase(&mut poll, &mut events, &mut conns, None)?;
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.until = warm + conn_share(count, c, i);
    }
    let mut rtts = Vec::with_capacity(count as usize);
    let before = cpu::CpuSample::now();
    let start = Instant::now();
    conns_phase(&mut poll, &mut events, &mut conns, Some(&mut rtts))?;
    let secs = start.elapsed().as_secs_f64();
    let after = cpu::CpuSample::now();
    drop(conns);
    Ok(ConnsOutcome {
        rtts_ns: rtts,
        secs,
        cpu0_busy: before.busy_until(&after, cpu::MEASURED_CPU),
        cpu1_busy: before.busy_until(&after, cpu::peer_cpu()),
    })
}

fn send_ping(conn: &mut Conn, id: u64) -> io::Result<()> {
    stamp(&mut conn.msg, (id << 40) | conn.done);
    let mut off = 0;
    let deadline = Instant::now() + PEER_WAIT;
    while off < conn.msg.len() {
        match conn.stream.write(&conn.msg[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            // One 64-byte message in flight never fills a socket buffer; if it ever
            // does, wait a little rather than register for writability.
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(bench_error("client: send blocked for 10 s"));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// One phase: every connection ping-pongs until it has completed `until` round trips.
fn conns_phase(
    poll: &mut mio::Poll,
    events: &mut mio::Events,
    conns: &mut [Conn],
    mut rtts: Option<&mut Vec<u64>>,
) -> io::Result<()> {
    let mut active = 0usize;
    for (i, conn) in conns.iter_mut().enumerate() {
        if conn.done < conn.until {
            conn.sent_at = Instant::now();
            send_ping(conn, i as u64)?;
            active += 1;
        }
    }
    let mut last_progress = Instant::now();
    while active > 0 {
        match poll.poll(events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
        if events.is_empty() {
            if last_progress.elapsed() >= PEER_WAIT {
                return Err(bench_error(format!(
                    "client: no echo for {PEER_WAIT:?} ({active} connections waiting)"
                )));
            }
            continue;
        }
        for event in events.iter() {
            let i = event.token().0;
            let conn = &mut conns[i];
            // Read what is there, never beyond the one message in flight.
            loop {
                let got = conn.got;
                match conn.stream.read(&mut conn.buf[got..]) {
                    Ok(0) => return Err(bench_error(format!("client: end of stream on {i}"))),
                    Ok(n) => {
                        if conn.done >= conn.until {
                            return Err(bench_error(format!("client: unexpected data on {i}")));
                        }
                        conn.got += n;
                        if conn.got == 64 {
                            break;
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(err),
                }
            }
            if conn.got < 64 {
                continue;
            }
            let now = Instant::now();
            let expect = ((i as u64) << 40) | conn.done;
            let got = read_seq(&conn.buf);
            if got != expect || conn.buf[8..] != conn.msg[8..] {
                return Err(bench_error(format!(
                    "client: connection {i} got {got:#x}, expected {expect:#x}"
                )));
            }
            if let Some(rtts) = rtts.as_deref_mut() {
                rtts.push((now - conn.sent_at).as_nanos() as u64);
            }
            conn.got = 0;
            conn.done += 1;
            last_progress = now;
            if conn.done < conn.until {
                conn.sent_at = now;
                send_ping(conn, i as u64)?;
            } else {
                active -= 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn receiver_accepts_the_right_stream() {
        let (mut tx, rx) = pair();
        let rx = spawn_receiver(rx, 16, 100, 1, false).unwrap();
        for i in 0..100 {
            tx.write_all(&message(16, i)).unwrap();
        }
        drop(tx);
        let out = rx.join().unwrap().unwrap();
        assert_eq!(out.in_order, 100);
        assert!(out.order_lost.is_none() && out.short.is_none());
    }

    #[test]
    fn receiver_catches_a_swap_and_counts_what_came_in_order() {
        let (mut tx, rx) = pair();
        let rx = spawn_receiver(rx, 16, 10, 1, false).unwrap();
        for i in [0, 1, 2, 4, 3, 5, 6, 7, 8, 9] {
            tx.write_all(&message(16, i)).unwrap();
        }
        drop(tx);
        let out = rx.join().unwrap().unwrap();
        assert_eq!(out.in_order, 3);
        assert!(out.order_lost.unwrap().contains("expected 3"));
        assert_eq!(out.bytes, 160);
    }

    #[test]
    fn receiver_reports_a_short_stream() {
        let (mut tx, rx) = pair();
        let rx = spawn_receiver(rx, 16, 10, 1, false).unwrap();
        for i in 0..4 {
            tx.write_all(&message(16, i)).unwrap();
        }
        drop(tx);
        let out = rx.join().unwrap().unwrap();
        assert_eq!(out.in_order, 4);
        assert!(out.short.is_some());
    }

    #[test]
    fn shares_add_up() {
        let total: u64 = (0..64).map(|i| conn_share(200_000, 64, i)).sum();
        assert_eq!(total, 200_000);
        assert_eq!(conns_total(1000, 64), 16 * 64 + 1000);
    }
}
