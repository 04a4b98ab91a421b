//! The UDP data-path workloads: udp-batch (the measured side sends batches to the plain
//! receiver) and udp-recv (the measured side receives the plain sender's GSO flood).
//! udp-echo-rtt is in `udp_echo`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ringsock::runtime::timeout;
use ringsock::{Backend, DatagramSocket, Error, Result, SocketErrorStatus};

use super::cpu::{self, CpuSample};
use super::group::{groups, GroupBuffer};
use super::join_peer;
use super::options::Options;
use super::peer::{self, FILL, PEER_WAIT};
use super::report::{round, Report, RunError};
use super::udp_peer::{self, Counted, UDP_IDLE};
use super::udp_sharded;

pub(super) fn io_error(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |err| Error::io(what, err)
}

/// The system calls the current runtime has counted so far.
pub(super) fn driver_syscalls() -> u64 {
    ringsock::runtime::driver_stats()
        .unwrap_or_default()
        .syscalls()
}

// ------------------------------------------------------------------ udp-batch

/// What the udp-batch sender measured.
struct Sent {
    secs: f64,
    cpu_before: CpuSample,
    cpu_after: CpuSample,
    cpu_secs: f64,
    syscalls: u64,
    result: Result<()>,
}

/// Runs udp-batch: M datagrams of S bytes in groups of B to the plain receiver; the send
/// rate, and what arrived.
pub(crate) fn run_batch(o: &Options) -> Result<Report> {
    // The peer must not lose what it is sent: past net.core.rmem_max where it can.
    let socket = udp_peer::receiver_socket(true).map_err(io_error("receive socket"))?;
    let dest = socket.local_addr().map_err(io_error("local address"))?;
    let rcvbuf = udp_peer::recv_buffer(&socket);
    // A second handle: the kernel's drop counter is read after the receiver is done.
    let counter = socket.try_clone().map_err(io_error("receive socket"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let rx = udp_peer::spawn_counter(socket, o.size, o.count, o.pin, stop.clone())
        .map_err(io_error("start the receiver thread"))?;
    let sent = match o.imp.backend() {
        Some(backend) => o
            .runtime(backend)
            .and_then(|rt| rt.block_on(ringsock_sender(o, dest))),
        None => std_sender(o, dest),
    };
    if !matches!(sent, Ok(Sent { result: Ok(()), .. })) {
        stop.store(true, Ordering::Release);
    }
    let rx = join_peer(rx, "receiver");
    let sent = sent?;
    let mut report = Report::new(o);
    report.syscalls = Some(sent.syscalls);
    report.push_per_msg("cpu_us_per_msg", sent.cpu_secs, o.count);
    report.push_busy(&sent.cpu_before, &sent.cpu_after);
    report.push("rcvbuf", rcvbuf);
    if let Err(err) = sent.result {
        report.error = Some(RunError::from_error(&err).context("sender"));
    }
    let rx = match rx {
        Ok(rx) => rx,
        Err(err) => {
            let err = RunError::new(SocketErrorStatus::Unknown, err.to_string());
            report.error.get_or_insert(err.context("receiver"));
            return Ok(report);
        }
    };
    report.delivered = rx.delivered;
    report.secs = Some(sent.secs);
    report.push("lost", o.count.saturating_sub(rx.delivered));
    report.push("rx_kernel_drops", udp_peer::kernel_drops(&counter));
    report.push_per_msg("rx_cpu_us_per_msg", rx.cpu_secs, rx.delivered);
    check_well_formed(&mut report, &rx);
    Ok(report)
}

/// A run whose receiver got malformed datagrams failed.
fn check_well_formed(report: &mut Report, rx: &Counted) {
    if rx.bad > 0 && report.error.is_none() {
        let message = format!("{} malformed datagrams", rx.bad);
        report.error = Some(RunError::new(SocketErrorStatus::Unknown, message));
    }
}

/// The ringsock sender: B writes queued on the socket's OutputStream, then one flush.
async fn ringsock_sender(o: &Options, dest: SocketAddr) -> Result<Sent> {
    let socket = DatagramSocket::new();
    let output = socket.output_stream_to_addr(dest)?;
    let mut buffers = GroupBuffer::new(o.size, o.batch).with_gap(o.gapped);
    let calls = driver_syscalls();
    let cpu_before = CpuSample::now();
    let cpu0 = cpu::thread_cpu_secs();
    let start = Instant::now();
    let send = async {
        for (first, n) in groups(o.count, o.batch) {
            let group = buffers.take(first, n);
            for j in 0..n {
                // Issued, not awaited one by one (as tcp-batch's flush pattern).
                if let Err(message) = output.try_write(buffers.message(&group, j)) {
                    output.write(message).await?;
                }
            }
            output.flush().await?;
            buffers.recycle(group);
        }
        Ok(())
    };
    let result = send.await;
    Ok(Sent {
        secs: start.elapsed().as_secs_f64(),
        cpu_after: CpuSample::now(),
        cpu_secs: cpu::thread_cpu_secs() - cpu0,
        syscalls: driver_syscalls() - calls,
        cpu_before,
        result,
    })
}

/// The baseline: one blocking `send_to` per datagram.
fn std_sender(o: &Options, dest: SocketAddr) -> Result<Sent> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(io_error("bind"))?;
    let mut msg = vec![FILL; o.size];
    let mut calls = 0u64;
    let cpu_before = CpuSample::now();
    let cpu0 = cpu::thread_cpu_secs();
    let start = Instant::now();
    let mut result = Ok(());
    'send: for seq in 0..o.count {
        peer::stamp(&mut msg, seq);
        loop {
            calls += 1;
            match socket.send_to(&msg, dest) {
                Ok(_) => break,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => {
                    result = Err(Error::io("send_to", err));
                    break 'send;
                }
            }
        }
    }
    Ok(Sent {
        secs: start.elapsed().as_secs_f64(),
        cpu_after: CpuSample::now(),
        cpu_secs: cpu::thread_cpu_secs() - cpu0,
        syscalls: calls,
        cpu_before,
        result,
    })
}

// ------------------------------------------------------------------ udp-recv

/// What the measured receiver got, and what it cost.
pub(super) struct Received {
    pub(super) rx: Counted,
    pub(super) cpu_before: CpuSample,
    pub(super) cpu_after: CpuSample,
    pub(super) syscalls: u64,
    pub(super) rcvbuf: Option<usize>,
    pub(super) kernel_drops: Option<u64>,
    /// Receive-ring counters (ringsock): (key, value).
    pub(super) ring: Vec<(&'static str, u64)>,
    /// Sharded: datagrams each thread received, in thread order.
    pub(super) per_thread: Option<Vec<u64>>,
}

/// Runs udp-recv: the plain flood sends `o.count` datagrams of `o.size` bytes as GSO
/// sends of `o.batch`; the measured side receives them on this thread.
pub(crate) fn run_recv(o: &Options) -> Result<Report> {
    let (ready, go) = mpsc::channel();
    let received = match o.imp.backend() {
        Some(backend) if o.threads > 1 => udp_sharded::receiver(o, backend, ready, go),
        Some(backend) => ringsock_receiver(o, backend, ready, go),
        None => std_receiver(o, ready, go),
    };
    let (received, flood) = received?;
    let flood = join_peer(flood, "flood sender");
    let mut report = Report::new(o);
    let rx = &received.rx;
    report.delivered = rx.delivered;
    report.syscall_msgs = rx.delivered;
    report.syscalls = Some(received.syscalls);
    if let (Some(first), Some(last)) = (rx.first, rx.last) {
        report.secs = Some((last - first).as_secs_f64());
    }
    report.push("lost", o.count.saturating_sub(rx.delivered));
    match &flood {
        Ok(flood) if flood.secs > 0.0 => {
            report.push("sender_msgs_per_s", round(o.count as f64 / flood.secs, 1))
        }
        _ => report.push("sender_msgs_per_s", serde_json::Value::Null),
    }
    report.push_busy(&received.cpu_before, &received.cpu_after);
    report.push_per_msg("cpu_us_per_msg", rx.cpu_secs, rx.delivered);
    let cpu0_secs = received
        .cpu_before
        .busy_secs_until(&received.cpu_after, cpu::MEASURED_CPU);
    match cpu0_secs {
        Some(secs) => report.push_per_msg("cpu0_us_per_msg", secs, rx.delivered),
        None => report.push("cpu0_us_per_msg", serde_json::Value::Null),
    }
    if let Some(spread) = &received.per_thread {
        report.push("threads", spread.len());
        report.push("datagrams_per_thread", spread.clone());
        report.push("flows", SHARDED_FLOWS);
    }
    report.push("kernel_drops", received.kernel_drops);
    report.push("rcvbuf", received.rcvbuf);
    for (key, value) in &received.ring {
        report.push(key, *value);
    }
    if let Err(err) = flood {
        let err = RunError::new(SocketErrorStatus::Unknown, err.to_string());
        report.error = Some(err.context("sender"));
    }
    check_well_formed(&mut report, rx);
    Ok(report)
}

pub(super) type Flood = std::thread::JoinHandle<std::io::Result<udp_peer::Flood>>;

/// Flows the flood uses against a sharded receiver: the kernel picks a thread's socket
/// by each flow's hash, so one flow would reach one thread only.
pub(super) const SHARDED_FLOWS: usize = 16;

pub(super) fn start_flood(o: &Options, dest: SocketAddr, go: mpsc::Receiver<()>) -> Result<Flood> {
    let flows = if o.threads > 1 { SHARDED_FLOWS } else { 1 };
    udp_peer::spawn_gso_flood(dest, o.size, o.count, o.batch, flows, o.pin, go)
        .map_err(io_error("start the flood thread"))
}

/// Takes one `recv_batch` of the flood within `wait` and counts it into `rx`, checking
/// each datagram (`size` bytes, a sequence number below `count`): how many came, or
/// `None` when the wait passed with none.
pub(super) async fn receive_counted(
    socket: &DatagramSocket,
    batch: &mut Vec<ringsock::Datagram>,
    wait: Duration,
    rx: &mut Counted,
    size: usize,
    count: u64,
) -> Result<Option<u64>> {
    match timeout(wait, socket.recv_batch(batch, RECV_BATCH)).await {
        Ok(result) => result?,
        Err(_) => return Ok(None),
    };
    let now = Instant::now();
    rx.first.get_or_insert(now);
    rx.last = Some(now);
    let n = batch.len() as u64;
    for datagram in batch.drain(..) {
        if datagram.is_truncated() || !udp_peer::well_formed(&datagram, size, count) {
            rx.bad += 1;
        }
    }
    rx.delivered += n;
    Ok(Some(n))
}

/// Datagrams the ringsock receiver takes per `recv_batch`.
pub(super) const RECV_BATCH: usize = 64;

/// The ringsock receiver: `recv_batch` on the socket's receive ring (a multishot
/// receive into a provided-buffer ring on io_uring, `recvmmsg` on epoll).
fn ringsock_receiver(
    o: &Options,
    backend: Backend,
    ready: mpsc::Sender<()>,
    go: mpsc::Receiver<()>,
) -> Result<(Received, Flood)> {
    let runtime = o.runtime(backend)?;
    let socket = DatagramSocket::new();
    socket.control().set_receive_buffer_size(udp_peer::RCVBUF)?;
    // The default receive ring, as a program gets it: every datagram whole, 4 MiB.
    if o.gro {
        socket.control().set_gro(true)?;
    }
    socket.bind_addr(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let flood = start_flood(o, socket.local_addr()?, go)?;
    let rcvbuf = socket.control().receive_buffer_size().ok();
    let (size, count) = (o.size, o.count);
    let received = runtime.block_on(async {
        // The first receive sets the ring up (and arms the receive) before the flood.
        let _ = timeout(Duration::from_millis(1), socket.recv()).await;
        let calls = driver_syscalls();
        let cpu_before = CpuSample::now();
        let cpu0 = cpu::thread_cpu_secs();
        let _ = ready.send(());
        let mut rx = Counted::default();
        // As many as one recvmmsg takes (the recvmmsg peer's 64 too): the datagrams of a
        // batch hold their buffers until it is checked, and 256 at a time measured worse
        // here (in a noisy hour, 6 alternating rounds each: a median of 0.85 µs of
        // receiver CPU per datagram and kernel drops in 5 runs, against 0.70 µs and 2).
        let mut batch = Vec::with_capacity(RECV_BATCH);
        while rx.delivered < count {
            let wait = if rx.first.is_none() {
                PEER_WAIT
            } else {
                UDP_IDLE
            };
            if receive_counted(&socket, &mut batch, wait, &mut rx, size, count)
                .await?
                .is_none()
            {
                break;
            }
        }
        rx.cpu_secs = cpu::thread_cpu_secs() - cpu0;
        let cpu_after = CpuSample::now();
        let syscalls = driver_syscalls() - calls;
        let stats = socket.receive_stats();
        Ok::<_, Error>(Received {
            rx,
            cpu_before,
            cpu_after,
            syscalls,
            rcvbuf,
            kernel_drops: Some(stats.dropped),
            per_thread: None,
            ring: vec![
                ("ring_empty", stats.ring_empty),
                ("receive_restarts", stats.receive_restarts),
                ("deliveries", stats.deliveries),
                ("gro_splits", stats.gro_splits),
                ("bursts_drained", stats.bursts_drained),
            ],
        })
    })?;
    Ok((received, flood))
}

/// The baseline receiver: one blocking `recv` per datagram.
fn std_receiver(
    o: &Options,
    ready: mpsc::Sender<()>,
    go: mpsc::Receiver<()>,
) -> Result<(Received, Flood)> {
    // As the ringsock socket: SO_RCVBUF, capped at net.core.rmem_max.
    let socket = udp_peer::receiver_socket(false).map_err(io_error("receive socket"))?;
    let dest = socket.local_addr().map_err(io_error("local address"))?;
    let flood = start_flood(o, dest, go)?;
    let cpu_before = CpuSample::now();
    let _ = ready.send(());
    let rx =
        udp_peer::count_datagrams(&socket, o.size, o.count, None).map_err(io_error("receive"))?;
    let cpu_after = CpuSample::now();
    let received = Received {
        syscalls: rx.calls,
        rx,
        cpu_before,
        cpu_after,
        rcvbuf: udp_peer::recv_buffer(&socket),
        kernel_drops: udp_peer::kernel_drops(&socket),
        ring: Vec::new(),
        per_thread: None,
    };
    Ok((received, flood))
}
