//! The echo workloads: tcp-echo-rtt (the measured side is the client of one connection)
//! and tcp-echo-conns (the measured side is the echo server of C connections).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ringsock::runtime::timeout;
use ringsock::{Error, Result, SocketErrorStatus, StreamSocket, StreamSocketListener};

use super::options::{Options, ECHO_SIZE};
use super::peer::{self, ConnsOutcome, ECHO_WARMUP, FILL};
use super::report::{Latency, Report, RunError};
use super::tcp_batch::std_pair;
use super::{cpu, join_peer};

// ------------------------------------------------------------------ tcp-echo-rtt

/// What an echo client measured (tcp-echo-rtt and udp-echo-rtt).
pub(crate) struct Client {
    /// Round-trip times of the measured round trips, nanoseconds.
    pub(crate) rtts_ns: Vec<u64>,
    /// Wall time of the measured round trips.
    pub(crate) secs: f64,
    /// System calls the client made during them.
    pub(crate) syscalls: u64,
    /// CPU time the client thread used during them.
    pub(crate) cpu_secs: f64,
}

/// Runs tcp-echo-rtt: 1,000 warm-up round trips, then `o.count` measured ones, each a
/// 64-byte message sent and its echo read back in full.
pub(crate) fn run_rtt(o: &Options) -> Result<Report> {
    let total = ECHO_WARMUP + o.count;
    let (client, echo) = match o.imp.backend() {
        Some(backend) => {
            let runtime = o.runtime(backend)?;
            let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind", e))?;
            let addr = listener
                .local_addr()
                .map_err(|e| Error::io("local address", e))?;
            runtime.block_on(async {
                let socket = StreamSocket::new();
                socket.control().set_no_delay(true)?;
                socket.connect_addr(addr).await?;
                let (server, _) = listener.accept().map_err(|e| Error::io("accept", e))?;
                let echo = start_echo_server(server, o.pin)?;
                let client = ringsock_rtt_client(&socket, o.count).await;
                Ok::<_, Error>((client, echo))
            })?
        }
        None => {
            let (stream, server) = std_pair()?;
            let echo = start_echo_server(server, o.pin)?;
            (std_rtt_client(stream, o.count), echo)
        }
    };
    let echoed = join_peer(echo, "echo server");
    Ok(rtt_report(o, client, echoed, total))
}

/// The report of an echo-rtt run: the client's measurements, checked against what the
/// echo server says it echoed (`total`: warm-up and measured round trips).
pub(crate) fn rtt_report(
    o: &Options,
    client: Result<Client>,
    echoed: std::io::Result<u64>,
    total: u64,
) -> Report {
    let mut report = Report::new(o);
    let client = match client {
        Ok(client) => client,
        Err(err) => {
            report.error = Some(RunError::from_error(&err).context("client"));
            return report;
        }
    };
    match echoed {
        Ok(n) if n == total => {}
        Ok(n) => {
            let message = format!("the echo server echoed {n}, expected {total}");
            report.error = Some(RunError::new(SocketErrorStatus::Unknown, message));
        }
        Err(err) => report.error = Some(RunError::new(SocketErrorStatus::Unknown, err.to_string())),
    }
    report.delivered = client.rtts_ns.len() as u64;
    report.secs = Some(client.secs);
    report.latency = Latency::from_nanos(&client.rtts_ns);
    report.syscalls = Some(client.syscalls);
    report.push_per_msg("cpu_us_per_msg", client.cpu_secs, o.count);
    report
}

fn start_echo_server(
    server: TcpStream,
    pin: bool,
) -> Result<std::thread::JoinHandle<std::io::Result<u64>>> {
    server
        .set_nodelay(true)
        .map_err(|e| Error::io("set TCP_NODELAY", e))?;
    peer::spawn_echo_server(server, ECHO_SIZE, pin)
        .map_err(|e| Error::io("start the echo thread", e))
}

/// The ringsock client: `write_all` of the ping, then reads until the 64-byte echo is in.
async fn ringsock_rtt_client(socket: &StreamSocket, count: u64) -> Result<Client> {
    let mut ping = vec![FILL; ECHO_SIZE];
    let mut pong = Vec::with_capacity(ECHO_SIZE);
    let mut rtts = Vec::with_capacity(count as usize);
    let mut start = Instant::now();
    let mut stats = ringsock::runtime::driver_stats().unwrap_or_default();
    let mut cpu0 = cpu::thread_cpu_secs();
    for i in 0..ECHO_WARMUP + count {
        if i == ECHO_WARMUP {
            stats = ringsock::runtime::driver_stats().unwrap_or_default();
            cpu0 = cpu::thread_cpu_secs();
            start = Instant::now();
        }
        peer::stamp(&mut ping, i);
        let sent_at = Instant::now();
        let (written, back) = socket.write_all(ping).await;
        ping = back;
        written?;
        pong.clear();
        while pong.len() < ECHO_SIZE {
            let (read, back) = socket.read(pong).await;
            pong = back;
            if read? == 0 {
                return Err(Error::connection_closed("waiting for the echo"));
            }
        }
        let rtt = sent_at.elapsed().as_nanos() as u64;
        check_echo(&pong, ECHO_SIZE, i)?;
        if i >= ECHO_WARMUP {
            rtts.push(rtt);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let after = ringsock::runtime::driver_stats().unwrap_or_default();
    Ok(Client {
        rtts_ns: rtts,
        secs,
        syscalls: after.syscalls() - stats.syscalls(),
        cpu_secs: cpu::thread_cpu_secs() - cpu0,
    })
}

/// The baseline client: blocking `write_all` then `read_exact`, counting the calls.
fn std_rtt_client(mut stream: TcpStream, count: u64) -> Result<Client> {
    let io = |e| Error::io("echo client", e);
    stream.set_read_timeout(Some(peer::PEER_WAIT)).map_err(io)?;
    let mut ping = vec![FILL; ECHO_SIZE];
    let mut pong = vec![0u8; ECHO_SIZE];
    let mut rtts = Vec::with_capacity(count as usize);
    let mut calls = 0u64;
    let mut start = Instant::now();
    let mut cpu0 = cpu::thread_cpu_secs();
    for i in 0..ECHO_WARMUP + count {
        if i == ECHO_WARMUP {
            calls = 0;
            cpu0 = cpu::thread_cpu_secs();
            start = Instant::now();
        }
        peer::stamp(&mut ping, i);
        let sent_at = Instant::now();
        peer::write_all_counted(&mut stream, &ping, &mut calls).map_err(io)?;
        if !peer::read_exact_counted(&mut stream, &mut pong, &mut calls).map_err(io)? {
            return Err(Error::connection_closed("waiting for the echo"));
        }
        let rtt = sent_at.elapsed().as_nanos() as u64;
        check_echo(&pong, ECHO_SIZE, i)?;
        if i >= ECHO_WARMUP {
            rtts.push(rtt);
        }
    }
    Ok(Client {
        rtts_ns: rtts,
        secs: start.elapsed().as_secs_f64(),
        syscalls: calls,
        cpu_secs: cpu::thread_cpu_secs() - cpu0,
    })
}

/// Checks an echo: `size` bytes carrying sequence number `seq`, then fill bytes.
pub(crate) fn check_echo(pong: &[u8], size: usize, seq: u64) -> Result<()> {
    if pong.len() != size {
        return Err(Error::io(
            "echo check",
            peer::bench_error(format!("got {} bytes, expected {size}", pong.len())),
        ));
    }
    let got = peer::read_seq(pong);
    if got != seq || pong[8..].iter().any(|&b| b != FILL) {
        return Err(Error::io(
            "echo check",
            peer::bench_error(format!("got sequence number {got:#x}, expected {seq}")),
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------ tcp-echo-conns

/// What the measured server did.
struct Served {
    echoed: u64,
    syscalls: Option<u64>,
    /// Sharded: connections each thread accepted, in thread order.
    conns_per_thread: Option<Vec<usize>>,
}

/// Runs tcp-echo-conns: the plain client thread drives C connections against the
/// measured echo server on this thread.
/// The std peers' listener, with the backlog ringsock's listener has: every client
/// connects before the server accepts one, and std's backlog of 128 left the 129th
/// and later waiting on SYN retries (--conns of 130 or more ran into the watchdog).
fn std_listener() -> Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| Error::io("socket", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| Error::io("SO_REUSEADDR", e))?;
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .map_err(|e| Error::io("bind", e))?;
    socket.listen(1024).map_err(|e| Error::io("listen", e))?;
    Ok(socket.into())
}

pub(crate) fn run_conns(o: &Options) -> Result<Report> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (served, client) = match o.imp.backend() {
        Some(backend) if o.threads > 1 => sharded_server(o, backend, ready_tx, ready_rx)?,
        Some(backend) => {
            let runtime = o.runtime(backend)?;
            let listener = StreamSocketListener::bind_addr(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            listener.control().set_no_delay(true)?;
            let clients = connect_clients(listener.local_addr()?, o.conns)?;
            let client = start_client(clients, o, ready_rx)?;
            let served = runtime.block_on(ringsock_server(&listener, o.conns, ready_tx));
            (served, client)
        }
        None => {
            let listener = std_listener()?;
            let addr = listener
                .local_addr()
                .map_err(|e| Error::io("local address", e))?;
            let clients = connect_clients(addr, o.conns)?;
            let client = start_client(clients, o, ready_rx)?;
            (std_server(&listener, o, ready_tx), client)
        }
    };
    let client = join_peer(client, "client");
    let mut report = Report::new(o);
    let total = peer::conns_total(o.count, o.conns);
    report.syscall_msgs = total;
    let out: ConnsOutcome = match (client, served) {
        (Err(err), _) => {
            let error = RunError::new(SocketErrorStatus::Unknown, err.to_string());
            report.error = Some(error);
            return Ok(report);
        }
        (Ok(_), Err(err)) => {
            report.error = Some(RunError::from_error(&err).context("server"));
            return Ok(report);
        }
        (Ok(out), Ok(served)) => {
            report.syscalls = served.syscalls;
            if let Some(spread) = served.conns_per_thread {
                report.push("threads", spread.len());
                report.push("conns_per_thread", spread);
            }
            if served.echoed != total {
                let message = format!("the server echoed {}, expected {total}", served.echoed);
                report.error = Some(RunError::new(SocketErrorStatus::Unknown, message));
            }
            out
        }
    };
    report.delivered = out.rtts_ns.len() as u64;
    report.secs = Some(out.secs);
    report.latency = Latency::from_nanos(&out.rtts_ns);
    report.push_busy_fractions(out.cpu0_busy, out.cpu1_busy);
    Ok(report)
}

/// C std connections to `addr`, TCP_NODELAY on; they complete in the listener's backlog.
fn connect_clients(addr: SocketAddr, conns: usize) -> Result<Vec<TcpStream>> {
    (0..conns)
        .map(|_| {
            let stream = TcpStream::connect(addr).map_err(|e| Error::io("connect", e))?;
            stream
                .set_nodelay(true)
                .map_err(|e| Error::io("set TCP_NODELAY", e))?;
            Ok(stream)
        })
        .collect()
}

/// The plain client thread of tcp-echo-conns.
type ClientThread = std::thread::JoinHandle<std::io::Result<ConnsOutcome>>;

fn start_client(
    clients: Vec<TcpStream>,
    o: &Options,
    ready: mpsc::Receiver<()>,
) -> Result<ClientThread> {
    peer::spawn_conns_client(clients, o.count, o.pin, ready)
        .map_err(|e| Error::io("start the client thread", e))
}

/// The ringsock server: accepts the C connections, a task per connection echoing
/// 64-byte messages until end of stream; counts the driver's system calls meanwhile.
async fn ringsock_server(
    listener: &StreamSocketListener,
    conns: usize,
    ready: mpsc::Sender<()>,
) -> Result<Served> {
    let mut sockets = Vec::with_capacity(conns);
    for _ in 0..conns {
        sockets.push(listener.accept().await?);
    }
    let stats = ringsock::runtime::driver_stats().unwrap_or_default();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|socket| ringsock::spawn(echo_connection(socket)))
        .collect();
    let _ = ready.send(());
    let mut echoed = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(n) => echoed += n,
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    if let Some(err) = first_error {
        return Err(err);
    }
    let after = ringsock::runtime::driver_stats().unwrap_or_default();
    Ok(Served {
        echoed,
        syscalls: Some(after.syscalls() - stats.syscalls()),
        conns_per_thread: None,
    })
}

/// How often a sharded thread with no connection coming looks whether the others have
/// taken the last one.
const SHARD_CHECK: Duration = Duration::from_millis(20);

/// What one serving thread of the sharded server did.
struct ShardServed {
    echoed: u64,
    accepted: usize,
    syscalls: u64,
}

/// The sharded ringsock server: `o.threads` threads, each a runtime with its own
/// SO_REUSEPORT listener, accepting until the C connections are all taken (by whichever
/// thread the kernel gave them to) and echoing on the thread that accepted.
fn sharded_server(
    o: &Options,
    backend: ringsock::Backend,
    ready: mpsc::Sender<()>,
    ready_rx: mpsc::Receiver<()>,
) -> Result<(Result<Served>, ClientThread)> {
    let pool = o.pool(backend)?;
    let conns = o.conns;
    let accepted = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(Mutex::new(Some(ready)));
    let serve = move |_thread: usize, listener: StreamSocketListener| {
        let (accepted, ready) = (accepted.clone(), ready.clone());
        async move {
            listener.control().set_no_delay(true)?;
            let mut tasks = Vec::new();
            while accepted.load(Ordering::Acquire) < conns {
                let socket = match timeout(SHARD_CHECK, listener.accept()).await {
                    Ok(socket) => socket?,
                    Err(_) => continue,
                };
                tasks.push(ringsock::spawn(echo_connection(socket)));
                if accepted.fetch_add(1, Ordering::AcqRel) + 1 == conns {
                    if let Some(ready) = ready.lock().ok().and_then(|mut r| r.take()) {
                        let _ = ready.send(());
                    }
                }
            }
            let before = ringsock::runtime::driver_stats().unwrap_or_default();
            let mut echoed = 0;
            let accepted = tasks.len();
            for task in tasks {
                echoed += task.await?;
            }
            let after = ringsock::runtime::driver_stats().unwrap_or_default();
            Ok::<_, Error>(ShardServed {
                echoed,
                accepted,
                syscalls: after.syscalls() - before.syscalls(),
            })
        }
    };
    let sharded = StreamSocketListener::bind_sharded(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &pool.handle(),
        serve,
    )?;
    let clients = connect_clients(sharded.addr, o.conns)?;
    let client = start_client(clients, o, ready_rx)?;
    let mut served = Served {
        echoed: 0,
        syscalls: Some(0),
        conns_per_thread: Some(Vec::new()),
    };
    let mut first_error = None;
    // The pool threads' outputs arrive through their handles, awaitable from here.
    let shards = ringsock::block_on(async {
        let mut shards = Vec::new();
        for server in sharded.servers {
            shards.push(server.await);
        }
        shards
    });
    for shard in shards {
        match shard.and_then(|adopted| adopted).and_then(|shard| shard) {
            Ok(shard) => {
                served.echoed += shard.echoed;
                served.syscalls = served.syscalls.map(|n| n + shard.syscalls);
                if let Some(spread) = served.conns_per_thread.as_mut() {
                    spread.push(shard.accepted);
                }
            }
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    Ok((first_error.map_or(Ok(served), Err), client))
}

/// Reads one whole 64-byte message, writes it back; until the client closes.
async fn echo_connection(socket: StreamSocket) -> Result<u64> {
    let mut buf = Vec::with_capacity(ECHO_SIZE);
    let mut echoed = 0;
    loop {
        buf.clear();
        while buf.len() < ECHO_SIZE {
            let (read, back) = socket.read(buf).await;
            buf = back;
            match read? {
                0 if buf.is_empty() => return Ok(echoed),
                0 => return Err(Error::connection_closed("inside a message")),
                _ => {}
            }
        }
        let (written, back) = socket.write_all(buf).await;
        buf = back;
        written?;
        echoed += 1;
    }
}

/// The baseline server: one blocking thread per connection, all on the measured CPU.
fn std_server(listener: &TcpListener, o: &Options, ready: mpsc::Sender<()>) -> Result<Served> {
    let mut threads = Vec::with_capacity(o.conns);
    for i in 0..o.conns {
        let (stream, _) = listener.accept().map_err(|e| Error::io("accept", e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io("set TCP_NODELAY", e))?;
        let pin = o.pin;
        let thread = std::thread::Builder::new()
            .name(format!("bench-echo{i}"))
            .spawn(move || {
                if pin {
                    let _ = cpu::pin_to(cpu::MEASURED_CPU);
                }
                let mut calls = 0;
                peer::echo_until_eof(stream, ECHO_SIZE, &mut calls).map(|n| (n, calls))
            })
            .map_err(|e| Error::io("start an echo thread", e))?;
        threads.push(thread);
    }
    let _ = ready.send(());
    let mut echoed = 0;
    let mut calls = 0;
    let mut first_error = None;
    for thread in threads {
        match join_peer(thread, "echo thread") {
            Ok((n, c)) => {
                echoed += n;
                calls += c;
            }
            Err(err) => {
                first_error.get_or_insert(err);
            }
        }
    }
    match first_error {
        Some(err) => Err(Error::io("echo thread", err)),
        None => Ok(Served {
            echoed,
            syscalls: Some(calls),
            conns_per_thread: None,
        }),
    }
}
