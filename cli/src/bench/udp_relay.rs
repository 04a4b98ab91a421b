//! udp-relay: the ringsock relay, measured between the plain generator and sink of
//! [`relay_peers`](super::relay_peers), and the run that checks the books and reports.
//!
//! The relay is what a program would write, on the runtime's defaults, one of three
//! ways ([`RelayLoop`]). By default each flow's socket forwards by itself
//! ([`DatagramSocket::forward_received`]: on io_uring the driver sends each datagram on
//! as it reaps it), and a task per flow waits for the end marker, the one datagram the
//! rule keeps. Or one task per flow, or one loop over a [`DatagramGroup`] of every
//! flow's socket, takes what the receive rings hold (a multishot receive on io_uring)
//! and forwards each datagram from the socket it came in on to the sink without copying
//! the bytes out of the ring ([`Datagram::into_forward`]): a lone datagram as one send
//! ([`DatagramSocket::post_to_addr`]), more in one batched send
//! ([`DatagramSocket::send_many`]). Its sockets' receive rings keep what a media relay
//! would size them for ([`Options::relay_ring_bytes`]): an MTU's worth per datagram,
//! where the default's 64 KiB per datagram spreads 64 sockets' buffers over more memory
//! than the caches hold.

use std::future::{poll_fn, Future};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use ringsock::{
    Datagram, DatagramGroup, DatagramSocket, Error, Forward, Forwarding, OutgoingDatagram,
    ReceiveRing, Result, SocketErrorStatus,
};
use serde_json::{json, Value};

use super::join_peer;
use super::options::{Options, Rate, RelayLoop};
use super::relay_peers::{self, Expect, Shared, SinkOutcome, ThreadClock, Traffic};
use super::relay_traffic;
use super::report::{round, Report, RunError};
use super::udp::io_error;
use super::udp_peer;

/// Datagrams a flow takes from its ring and forwards in one batch.
const FORWARD_BATCH: usize = 64;

/// Datagrams the grouped relay takes from its sockets in one call.
const GROUP_BATCH: usize = 256;

/// Runs udp-relay with the ringsock relay of `o.imp` on this thread.
pub(crate) fn run(o: &Options) -> Result<Report> {
    let backend = o
        .imp
        .backend()
        .ok_or_else(|| Error::invalid_input("udp-relay measures the ringsock relays"))?;
    let runtime = o.runtime(backend)?;
    // Two descriptors per flow (the socket and the generator's handle), the sink's, the
    // runtime's and the threads' few.
    let needed = 2 * o.flows as u64 + 64;
    let room = udp_peer::make_room_for_descriptors(needed)
        .map_err(io_error("raise the descriptor limit"))?;
    if let Some(limit) = room {
        return Err(Error::io(
            format!(
                "udp-relay with {} flows needs about {needed} open descriptors, and this \
                 process may open {limit} (ulimit -n)",
                o.flows
            ),
            std::io::Error::from_raw_os_error(libc::EMFILE),
        ));
    }
    let mut relay_sockets = Vec::with_capacity(o.flows);
    let mut second_handles = Vec::with_capacity(o.flows);
    let mut relay_addrs = Vec::with_capacity(o.flows);
    for _ in 0..o.flows {
        let socket = udp_peer::receiver_socket(false).map_err(io_error("relay socket"))?;
        second_handles.push(socket.try_clone().map_err(io_error("relay socket"))?);
        relay_addrs.push(socket.local_addr().map_err(io_error("local address"))?);
        relay_sockets.push(socket);
    }
    let sink = udp_peer::receiver_socket(false).map_err(io_error("sink socket"))?;
    let sink_addr = sink.local_addr().map_err(io_error("local address"))?;
    let rcvbuf = udp_peer::recv_buffer(&sink);
    let clock = ThreadClock::of_this_thread().map_err(io_error("the relay thread's CPU clock"))?;
    let shared = Arc::new(Shared::default());
    let (ready, go) = mpsc::channel();
    let traffic = Traffic {
        relay_addrs,
        size: o.size,
        count: o.count,
        rate: o.rate,
        pin: o.pin,
    };
    let generator = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("relay-generator".into())
            .spawn(move || relay_peers::generate(&traffic, go, &shared, clock))
            .map_err(io_error("start the generator thread"))?
    };
    let expect = Expect {
        size: o.size,
        count: o.count,
        flows: o.flows,
        pin: o.pin,
    };
    let sink_thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("relay-sink".into())
            .spawn(move || relay_peers::sink(&sink, &second_handles, expect, &shared, clock))
            .map_err(io_error("start the sink thread"))?
    };
    let calls_before = runtime.driver_stats();
    let ring = ReceiveRing {
        buffer_size: o.relay_ring_bytes(),
        ..ReceiveRing::default()
    };
    let relayed = match o.relay {
        RelayLoop::Group => runtime.block_on(relay_grouped(relay_sockets, ring, sink_addr, ready)),
        RelayLoop::Tasks => runtime.block_on(relay(relay_sockets, ring, sink_addr, ready)),
        RelayLoop::Forward => {
            runtime.block_on(relay_forwarding(relay_sockets, ring, sink_addr, ready))
        }
    };
    let calls = runtime.driver_stats();
    let calls = RelayCalls {
        enters: calls.enter_calls - calls_before.enter_calls,
        all: calls.syscalls() - calls_before.syscalls(),
    };
    shared.relay_done.store(true, Ordering::Release);
    let generated = join_peer(generator, "generator");
    let sunk = join_peer(sink_thread, "sink");
    Ok(report(o, &shared, relayed, generated, sunk, rcvbuf, calls))
}

/// The relay: one task per flow; returns the datagrams forwarded once every flow has
/// seen its end marker. `ready` goes to the generator once every receive is armed.
async fn relay(
    sockets: Vec<UdpSocket>,
    ring: ReceiveRing,
    sink: SocketAddr,
    ready: mpsc::Sender<()>,
) -> Result<u64> {
    let mut flows = Vec::with_capacity(sockets.len());
    for socket in sockets {
        let socket = relay_socket(socket, ring)?;
        flows.push(ringsock::spawn(forward_flow(socket, sink)));
    }
    flows_forwarded(flows, ready).await
}

/// Once every flow has armed its receive, tells the generator (`ready`); then waits for
/// every flow and returns how many datagrams they forwarded, or the first error.
async fn flows_forwarded(
    flows: Vec<ringsock::runtime::JoinHandle<Result<u64>>>,
    ready: mpsc::Sender<()>,
) -> Result<u64> {
    // The flows were queued before this task sleeps, so each has set up its receive
    // ring and armed its receive by the time the sleep ends.
    ringsock::runtime::sleep(Duration::from_millis(1)).await;
    let _ = ready.send(());
    let mut forwarded = 0;
    let mut failed = None;
    for flow in flows {
        match flow.await {
            Ok(n) => forwarded += n,
            Err(err) => {
                failed.get_or_insert(err);
            }
        }
    }
    match failed {
        Some(err) => Err(err),
        None => Ok(forwarded),
    }
}

/// The relay as sockets that forward by themselves: every datagram but the end marker
/// goes on to `sink` as the engine receives it; one task per flow waits for the marker
/// and for its forwards to settle.
async fn relay_forwarding(
    sockets: Vec<UdpSocket>,
    ring: ReceiveRing,
    sink: SocketAddr,
    ready: mpsc::Sender<()>,
) -> Result<u64> {
    let rule = Forwarding::to(sink).delivering(relay_traffic::is_end);
    let mut flows = Vec::with_capacity(sockets.len());
    for socket in sockets {
        let socket = relay_socket(socket, ring)?;
        socket.forward_received(rule)?;
        flows.push(ringsock::spawn(async move {
            // The marker is kept: it comes after every datagram of the flow. The only
            // other datagram the socket delivers is one its ring cut.
            let kept = socket.recv().await?;
            if !relay_traffic::is_end(&kept) {
                let why = format!(
                    "a datagram of {} bytes was cut to {}: the ring cannot forward it",
                    kept.original_len(),
                    kept.len()
                );
                return Err(Error::io("relay", std::io::Error::other(why)));
            }
            settled_posts(&socket).await
        }));
    }
    flows_forwarded(flows, ready).await
}

/// One flow: what its ring holds, up to [`FORWARD_BATCH`], forwarded to `sink` in one
/// batch from the socket it arrived on, until the end marker; returns how many.
async fn forward_flow(socket: DatagramSocket, sink: SocketAddr) -> Result<u64> {
    let mut received: Vec<Datagram> = Vec::with_capacity(FORWARD_BATCH);
    // Kept while it only ever holds a lone datagram, the common case at many flows.
    let mut batch = Vec::with_capacity(FORWARD_BATCH);
    let mut forwarded = 0u64;
    loop {
        socket.recv_batch(&mut received, FORWARD_BATCH).await?;
        let mut ended = false;
        for datagram in received.drain(..) {
            // The marker comes after every datagram of the flow: nothing after it counts.
            if relay_traffic::is_end(&datagram) {
                ended = true;
                break;
            }
            batch.push(OutgoingDatagram::of(datagram.into_forward(), sink));
        }
        match batch.pop() {
            None => {}
            // A lone datagram posted: on io_uring a SEND that goes out in the loop's next
            // submission with the other flows' sends, where `send_many` makes a
            // `sendmmsg` call of its own (64 flows at 20k packets/s: 12.1 against 15.0 µs
            // of relay CPU per packet), and the flow receives again without waiting for it.
            Some(one) if batch.is_empty() => post(&socket, one.data, sink).await?,
            Some(last) => {
                batch.push(last);
                let run = std::mem::replace(&mut batch, Vec::with_capacity(FORWARD_BATCH));
                for result in socket.send_many(run).await? {
                    result?;
                    forwarded += 1;
                }
            }
        }
        if ended {
            return Ok(forwarded + settled_posts(&socket).await?);
        }
    }
}

/// The relay as one loop over a [`DatagramGroup`]: what every woken socket holds, each
/// socket's datagrams forwarded from it, the sends in flight while the loop receives
/// again. A lone datagram is posted ([`DatagramSocket::post_to_addr`]: no future, waker
/// or wake of its own), a run of them goes in one batch (GSO where sizes allow).
async fn relay_grouped(
    sockets: Vec<UdpSocket>,
    ring: ReceiveRing,
    sink: SocketAddr,
    ready: mpsc::Sender<()>,
) -> Result<u64> {
    let mut members = Vec::with_capacity(sockets.len());
    for socket in sockets {
        members.push(relay_socket(socket, ring)?);
    }
    let group = DatagramGroup::new(members);
    let mut ended = vec![false; group.len()];
    let mut flows_left = group.len();
    let mut received: Vec<(usize, Datagram)> = Vec::with_capacity(GROUP_BATCH);
    // One socket's datagrams on their way; a lone one leaves it empty, with its room.
    let mut run: Vec<OutgoingDatagram<Forward>> = Vec::new();
    // Polls only the sends whose completion woke it, not every send in flight.
    let mut in_flight: FuturesUnordered<SendRun<'_>> = FuturesUnordered::new();
    let mut forwarded = 0u64;
    let mut armed = false;
    while flows_left > 0 || !in_flight.is_empty() {
        let got = {
            let mut receive = std::pin::pin!(group.recv_batch(&mut received, GROUP_BATCH));
            poll_fn(|cx| {
                while let Poll::Ready(Some(sent)) = in_flight.poll_next_unpin(cx) {
                    match sent {
                        Ok(n) => forwarded += n,
                        Err(err) => return Poll::Ready(Err(err)),
                    }
                }
                if flows_left == 0 {
                    return if in_flight.is_empty() {
                        Poll::Ready(Ok(false))
                    } else {
                        Poll::Pending
                    };
                }
                let polled = receive.as_mut().poll(cx).map_ok(|_| true);
                if !armed {
                    // The first poll armed every socket's receive: the generator may start.
                    armed = true;
                    let _ = ready.send(());
                }
                polled
            })
            .await?
        };
        if !got {
            break;
        }
        let mut run_socket = usize::MAX;
        for (index, datagram) in received.drain(..) {
            if ended[index] {
                continue;
            }
            if relay_traffic::is_end(&datagram) {
                ended[index] = true;
                flows_left -= 1;
                continue;
            }
            if index != run_socket && !run.is_empty() {
                forward_run(&group, run_socket, &mut run, sink, &mut in_flight).await?;
            }
            run_socket = index;
            run.push(OutgoingDatagram::of(datagram.into_forward(), sink));
        }
        if !run.is_empty() {
            forward_run(&group, run_socket, &mut run, sink, &mut in_flight).await?;
        }
    }
    for index in 0..group.len() {
        forwarded += settled_posts(group.socket(index)).await?;
    }
    Ok(forwarded)
}

/// A relay socket on this runtime, its receive ring shaped as `ring`.
fn relay_socket(socket: UdpSocket, ring: ReceiveRing) -> Result<DatagramSocket> {
    let socket = DatagramSocket::from_std(socket)?;
    socket.control().set_receive_ring(ring)?;
    Ok(socket)
}

/// Waits for `socket`'s posts to settle: how many the kernel took; an error if any was
/// dropped or failed (the books would not balance).
async fn settled_posts(socket: &DatagramSocket) -> Result<u64> {
    socket.settle_posts().await?;
    let posts = socket.post_stats();
    if posts.dropped + posts.failed > 0 {
        let from = socket.local_addr()?;
        let why = format!(
            "from {from}: {} posted datagrams dropped, {} failed (last: {:?})",
            posts.dropped, posts.failed, posts.last_error
        );
        return Err(Error::io("relay", std::io::Error::other(why)));
    }
    Ok(posts.sent)
}

/// Posts `one` to `sink` from `socket`; when the socket already has the most posts in
/// flight it allows, waits for them to settle first.
async fn post(socket: &DatagramSocket, one: Forward, sink: SocketAddr) -> Result<()> {
    match socket.post_to_addr(one, sink) {
        Err((err, one)) if err.status() == SocketErrorStatus::NoBufferSpace => {
            socket.settle_posts().await?;
            socket.post_to_addr(one, sink).map_err(|(err, _)| err)
        }
        posted => posted.map_err(|(err, _)| err),
    }
}

/// Forwards (and takes out of `run`) one socket's run of datagrams: a lone one posted,
/// more in one batch whose future joins `in_flight`. Waits only when the socket already
/// has the most posts in flight it allows, for them to settle.
async fn forward_run<'a>(
    group: &'a DatagramGroup,
    index: usize,
    run: &mut Vec<OutgoingDatagram<Forward>>,
    sink: SocketAddr,
    in_flight: &mut FuturesUnordered<SendRun<'a>>,
) -> Result<()> {
    let socket = group.socket(index);
    if run.len() > 1 {
        in_flight.push(send_run(socket, std::mem::take(run)));
        return Ok(());
    }
    let one = run.pop().expect("a run holds a datagram").data;
    post(socket, one, sink).await
}

/// One socket's batch of datagrams on its way.
type SendRun<'a> = Pin<Box<dyn Future<Output = Result<u64>> + 'a>>;

/// Forwards one socket's run of datagrams in one batch.
fn send_run(socket: &DatagramSocket, run: Vec<OutgoingDatagram<Forward>>) -> SendRun<'_> {
    Box::pin(async move {
        let mut n = 0;
        for result in socket.send_many(run).await? {
            result?;
            n += 1;
        }
        Ok(n)
    })
}

/// System calls the relay's runtime made during the run (its setup included).
pub(crate) struct RelayCalls {
    /// io_uring_enter or epoll_wait.
    enters: u64,
    /// Those and every direct I/O call.
    all: u64,
}

/// The JSON line's figures, and its error when a side failed or the books do not
/// balance: every datagram sent either arrived or was dropped by the kernel on a full
/// relay or sink socket, nothing stayed queued on a relay socket, and what the relay
/// forwarded either arrived or was dropped at the sink.
fn report(
    o: &Options,
    shared: &Shared,
    relayed: Result<u64>,
    generated: std::io::Result<()>,
    sunk: std::io::Result<SinkOutcome>,
    rcvbuf: Option<usize>,
    calls: RelayCalls,
) -> Report {
    let mut report = Report::new(o);
    let mut errors = Vec::new();
    let forwarded = relayed
        .map_err(|err| errors.push(format!("relay: {err}")))
        .ok();
    if let Err(err) = generated {
        errors.push(format!("generator: {err}"));
    }
    let sink = match sunk {
        Ok(sink) => sink,
        Err(err) => {
            errors.push(format!("sink: {err}"));
            report.error = Some(RunError::new(SocketErrorStatus::Unknown, errors.join("; ")));
            return report;
        }
    };
    let sent = shared.sent.load(Ordering::Acquire);
    if sink.corrupt > 0 {
        errors.push(format!("{} corrupt datagrams", sink.corrupt));
    }
    if sink.duplicates > 0 {
        errors.push(format!("{} duplicated datagrams", sink.duplicates));
    }
    if sink.relay_queued > 0 {
        errors.push(format!(
            "the relay stopped with {} bytes still queued on its sockets",
            sink.relay_queued
        ));
    }
    if sink.arrivals + sink.relay_drops + sink.sink_drops != sent {
        errors.push(format!(
            "accounting: arrived {} + relay socket drops {} + sink drops {} != sent {sent}",
            sink.arrivals, sink.relay_drops, sink.sink_drops
        ));
    }
    if let Some(n) = forwarded {
        if n != sink.arrivals + sink.sink_drops {
            errors.push(format!(
                "the relay forwarded {n}, the sink got {} and dropped {}",
                sink.arrivals, sink.sink_drops
            ));
        }
    }
    let first = shared.first_ns.load(Ordering::Acquire);
    let gen_end = shared.gen_end_ns.load(Ordering::Acquire);
    let end = if sink.last_ns > first {
        sink.last_ns
    } else {
        gen_end
    };
    let elapsed = end.saturating_sub(first) as f64 / 1e9;
    let send_secs = gen_end.saturating_sub(first) as f64 / 1e9;
    let cpu_ns = sink
        .relay_cpu_end_ns
        .saturating_sub(shared.relay_cpu_start_ns.load(Ordering::Acquire));
    let received = sink.received;
    let lost = sent.saturating_sub(received);
    let ratio = |x: f64, of: f64, digits: i32| {
        if of > 0.0 {
            json!(round(x / of, digits))
        } else {
            Value::Null
        }
    };
    let latency = |f: fn(&super::Latency) -> f64| {
        sink.latency
            .as_ref()
            .map_or(Value::Null, |l| json!(round(f(l), 2)))
    };
    report.delivered = received;
    report.latency = sink.latency;
    report.push("relay", o.relay.name());
    report.push("relay_ring_bytes", o.relay_ring_bytes());
    report.push("sent", sent);
    report.push("received", received);
    report.push("lost", lost);
    report.push("loss_pct", ratio(100.0 * lost as f64, sent as f64, 3));
    report.push("reordered", sink.reordered);
    report.push("corrupt", sink.corrupt + sink.duplicates);
    report.push("pps_delivered", ratio(received as f64, elapsed, 1));
    report.push(
        "relay_cpu_us_per_pkt",
        ratio(cpu_ns as f64 / 1e3, received as f64, 3),
    );
    report.push("relay_cpu_util", ratio(cpu_ns as f64 / 1e9, elapsed, 3));
    report.push("lat_p50_us", latency(|l| l.p50_us));
    report.push("lat_p99_us", latency(|l| l.p99_us));
    report.push("lat_p999_us", latency(|l| l.p999_us));
    report.push("elapsed_s", round(elapsed, 6));
    report.push("send_pps", ratio(sent as f64, send_secs, 1));
    report.push(
        "relay_syscalls_per_pkt",
        ratio(calls.all as f64, received as f64, 3),
    );
    report.push(
        "relay_enters_per_pkt",
        ratio(calls.enters as f64, received as f64, 3),
    );
    report.push("relay_sock_drops", sink.relay_drops);
    report.push("sink_drops", sink.sink_drops);
    report.push("rcvbuf", rcvbuf);
    let before = shared
        .cpu_before
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match before {
        Some(before) => report.push_busy(&before, &sink.cpu_after),
        None => report.push_busy_fractions(None, None),
    }
    if !errors.is_empty() {
        report.error = Some(RunError::new(SocketErrorStatus::Unknown, errors.join("; ")));
    }
    report
}

/// `rate_target` of the JSON line: the packets per second asked for, or "max".
pub(crate) fn rate_target(rate: Rate) -> Value {
    match rate {
        Rate::PerSecond(rate) => json!(rate),
        Rate::Max => json!("max"),
    }
}
