//! The plain std sides of udp-relay: the generator that sends each flow's datagrams to
//! the relay, the sink that checks and times what the relay forwards, and the clocks and
//! kernel counters they read. Both are plain threads on the peer CPU; only the relay
//! between them differs from one implementation to another.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use socket2::SockAddr;

use super::cpu::{self, CpuSample};
use super::options::Rate;
use super::peer::{bench_error, PEER_WAIT};
use super::relay_traffic::{self as traffic, Checked};
use super::report::Latency;
use super::udp_peer::{self, UDP_IDLE};

/// Datagrams per `sendmmsg` of the generator at `--rate max`, and slots per `recvmmsg`
/// of the sink.
pub const BATCH: usize = 64;
/// The first 2% of the packets are warm-up: their latency is not recorded.
const WARMUP_PERCENT: u64 = 2;
/// How often the generator sends the end markers until the relay has returned.
const MARKER_EVERY: Duration = Duration::from_millis(20);
/// How long the blocked sink waits before it looks at the clock again.
const SINK_TICK: Duration = Duration::from_millis(50);
/// The sink gives up when nothing at all arrived for this long.
const SINK_NOTHING: Duration = Duration::from_secs(60);

/// CLOCK_MONOTONIC in nanoseconds: the clock of the send stamps and the receive times.
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local `ts`.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The CPU-time clock of one thread (user + system, ns), readable from other threads.
#[derive(Debug, Clone, Copy)]
pub struct ThreadClock(libc::clockid_t);

impl ThreadClock {
    /// The clock of the calling thread.
    pub fn of_this_thread() -> io::Result<ThreadClock> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self is the live calling thread; the id goes into a live local.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(ThreadClock(clock))
    }

    /// The thread's CPU time so far, in ns (while the thread lives).
    pub fn now_ns(self) -> u64 {
        clock_ns(self.0)
    }
}

/// What the generator, the sink and the relay tell each other.
#[derive(Debug, Default)]
pub struct Shared {
    /// Datagrams sent so far (final once `gen_done`).
    pub sent: AtomicU64,
    /// The generator has stopped sending data.
    pub gen_done: AtomicBool,
    /// CLOCK_MONOTONIC ns of the first send and of the end of sending.
    pub first_ns: AtomicU64,
    /// See `first_ns`.
    pub gen_end_ns: AtomicU64,
    /// The relay thread's CPU clock at the first send.
    pub relay_cpu_start_ns: AtomicU64,
    /// The sink has stopped counting; the generator then sends the end markers.
    pub sink_done: AtomicBool,
    /// The relay has returned; the generator stops sending markers.
    pub relay_done: AtomicBool,
    /// /proc/stat at the first send.
    pub cpu_before: Mutex<Option<CpuSample>>,
}

/// What the generator sends: `count` datagrams of `size` bytes round robin over the
/// relay's flow addresses, at `rate`.
#[derive(Debug, Clone)]
pub struct Traffic {
    /// The relay's address of each flow.
    pub relay_addrs: Vec<SocketAddr>,
    /// Datagram size.
    pub size: usize,
    /// Datagrams in all.
    pub count: u64,
    /// Packets per second in total, or as fast as the generator can.
    pub rate: Rate,
    /// Pin to the peer CPU.
    pub pin: bool,
}

/// The generator thread's body: waits for `ready`, sends the traffic, then, once the
/// sink is done, an end marker to every relay address every 20 ms until the relay has
/// returned.
pub fn generate(
    traffic: &Traffic,
    ready: mpsc::Receiver<()>,
    shared: &Shared,
    relay_clock: ThreadClock,
) -> io::Result<()> {
    cpu::pin_peer(traffic.pin);
    let socket = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let sent = ready
        .recv_timeout(PEER_WAIT)
        .map_err(|_| bench_error("generator: the relay never became ready"))
        .and_then(|()| send_traffic(&socket, traffic, shared, relay_clock));
    shared.gen_end_ns.store(mono_ns(), Ordering::Release);
    shared.gen_done.store(true, Ordering::Release);
    let markers = send_markers(&socket, traffic, shared);
    sent.and(markers)
}

fn send_markers(socket: &UdpSocket, traffic: &Traffic, shared: &Shared) -> io::Result<()> {
    let waited = Instant::now();
    while !shared.sink_done.load(Ordering::Acquire) {
        if waited.elapsed() > 3 * PEER_WAIT {
            return Err(bench_error("generator: the sink never finished"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let marker = traffic::end_marker(traffic.size);
    let waited = Instant::now();
    while !shared.relay_done.load(Ordering::Acquire) {
        if waited.elapsed() > PEER_WAIT {
            return Err(bench_error(
                "generator: the relay did not return within 10 s of the end markers",
            ));
        }
        for addr in &traffic.relay_addrs {
            send_one(socket, &marker, *addr)?;
        }
        std::thread::sleep(MARKER_EVERY);
    }
    Ok(())
}

fn send_one(socket: &UdpSocket, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
    loop {
        match socket.send_to(datagram, to) {
            Ok(n) if n == datagram.len() => return Ok(()),
            Ok(n) => return Err(bench_error(format!("short datagram send: {n} bytes"))),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

fn send_traffic(
    socket: &UdpSocket,
    traffic: &Traffic,
    shared: &Shared,
    relay_clock: ThreadClock,
) -> io::Result<()> {
    // Ticks of 1 ms need a wake-up close to the deadline, not the default 50 us late.
    // SAFETY: PR_SET_TIMERSLACK takes a plain number; no memory is passed.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000, 0, 0, 0) };
    *shared.cpu_before.lock().unwrap_or_else(|e| e.into_inner()) = Some(CpuSample::now());
    shared
        .relay_cpu_start_ns
        .store(relay_clock.now_ns(), Ordering::Release);
    let start = mono_ns();
    shared.first_ns.store(start, Ordering::Release);
    match traffic.rate {
        Rate::PerSecond(rate) => send_paced(socket, traffic, rate, start, shared),
        Rate::Max => send_flat_out(socket, traffic, shared),
    }
}

/// At tick k (1 ms each from the first send) the packets up to ceil(rate (k+1) / 1000)
/// in all, one `sendto` each stamped just before it; a late tick is caught up at once.
fn send_paced(
    socket: &UdpSocket,
    traffic: &Traffic,
    rate: u64,
    start: u64,
    shared: &Shared,
) -> io::Result<()> {
    let flows = traffic.relay_addrs.len();
    let mut buf = vec![0u8; traffic.size];
    let mut sent = 0u64;
    let mut tick = 0u64;
    while sent < traffic.count {
        let due = traffic
            .count
            .min(rate.saturating_mul(tick + 1).div_ceil(1000));
        while sent < due {
            let (flow, seq) = traffic::packet(sent, flows);
            traffic::fill(&mut buf, flow, seq);
            traffic::stamp(&mut buf, mono_ns());
            send_one(socket, &buf, traffic.relay_addrs[flow as usize])?;
            sent += 1;
            shared.sent.store(sent, Ordering::Release);
        }
        tick += 1;
        let next = start + tick * 1_000_000;
        if sent < traffic.count && mono_ns() < next {
            sleep_until_ns(next);
        }
    }
    Ok(())
}

fn sleep_until_ns(deadline: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a live timespec; no remaining time is asked for (null).
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

/// `sendmmsg` groups of [`BATCH`] as fast as they go, one stamp per group.
fn send_flat_out(socket: &UdpSocket, traffic: &Traffic, shared: &Shared) -> io::Result<()> {
    let size = traffic.size;
    let flows = traffic.relay_addrs.len();
    let addrs: Vec<SockAddr> = traffic
        .relay_addrs
        .iter()
        .map(|a| SockAddr::from(*a))
        .collect();
    let mut bufs = vec![0u8; size * BATCH];
    let base = bufs.as_mut_ptr();
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|j| libc::iovec {
            // SAFETY: slot j of BATCH slots of `size` bytes lies inside `bufs`.
            iov_base: unsafe { base.add(j * size) }.cast(),
            iov_len: size,
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; all zeroes is an empty message.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut sent = 0u64;
    while sent < traffic.count {
        let n = ((traffic.count - sent) as usize).min(BATCH);
        for j in 0..n {
            let (flow, seq) = traffic::packet(sent + j as u64, flows);
            // SAFETY: slot j lies inside `bufs`, and no other reference to it is live.
            let buf = unsafe { std::slice::from_raw_parts_mut(base.add(j * size), size) };
            traffic::fill(buf, flow, seq);
            let to = &addrs[flow as usize];
            let hdr = &mut msgs[j].msg_hdr;
            hdr.msg_name = to.as_ptr() as *mut libc::c_void;
            hdr.msg_namelen = to.len();
            hdr.msg_iov = &mut iovs[j];
            hdr.msg_iovlen = 1;
        }
        let now = mono_ns();
        for j in 0..n {
            // SAFETY: as above.
            let buf = unsafe { std::slice::from_raw_parts_mut(base.add(j * size), size) };
            traffic::stamp(buf, now);
        }
        let mut done = 0usize;
        while done < n {
            // SAFETY: msgs[done..n] point at iovecs, buffers and addresses that outlive
            // the call; the kernel only reads them (and writes msg_len).
            let rc = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    msgs.as_mut_ptr().add(done),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            done += rc as usize;
        }
        sent += n as u64;
        shared.sent.store(sent, Ordering::Release);
    }
    Ok(())
}

/// What the sink counted, and the counters it read when it stopped.
#[derive(Debug, Default)]
pub struct SinkOutcome {
    /// Distinct good datagrams.
    pub received: u64,
    /// Every datagram that arrived, good or not.
    pub arrivals: u64,
    /// Wrong length, truncated, wrong pattern, flow or sequence out of range.
    pub corrupt: u64,
    /// A packet that had arrived before.
    pub duplicates: u64,
    /// Arrived after a higher sequence number of its flow.
    pub reordered: u64,
    /// One-way latency, the warm-up left out.
    pub latency: Option<Latency>,
    /// CLOCK_MONOTONIC ns of the last arrival (0: none).
    pub last_ns: u64,
    /// The relay thread's CPU clock when the sink stopped.
    pub relay_cpu_end_ns: u64,
    /// /proc/stat when the sink stopped.
    pub cpu_after: CpuSample,
    /// Kernel drops (SO_MEMINFO) summed over the relay sockets.
    pub relay_drops: u64,
    /// Bytes still queued on the relay sockets when the sink stopped.
    pub relay_queued: u64,
    /// Kernel drops of the sink socket.
    pub sink_drops: u64,
}

/// What the sink expects.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Datagram size.
    pub size: usize,
    /// Datagrams sent in all.
    pub count: u64,
    /// Flows.
    pub flows: usize,
    /// Pin to the peer CPU.
    pub pin: bool,
}

/// The sink thread's body: blocking `recvmmsg` on `sink` until every datagram came, or
/// until [`UDP_IDLE`] after the later of the generator's end and the last arrival; then
/// reads the relay thread's CPU clock and the drop counters of `relay_sockets` (second
/// handles of the relay's sockets) and of the sink.
pub fn sink(
    sink: &UdpSocket,
    relay_sockets: &[UdpSocket],
    expect: Expect,
    shared: &Shared,
    relay_clock: ThreadClock,
) -> io::Result<SinkOutcome> {
    cpu::pin_peer(expect.pin);
    let counted = count(sink, expect, shared);
    let mut outcome = match counted {
        Ok(outcome) => outcome,
        Err(err) => {
            shared.sink_done.store(true, Ordering::Release);
            return Err(err);
        }
    };
    outcome.relay_cpu_end_ns = relay_clock.now_ns();
    outcome.cpu_after = CpuSample::now();
    shared.sink_done.store(true, Ordering::Release);
    for socket in relay_sockets {
        let (drops, queued) = accounting(socket)?;
        outcome.relay_drops += drops;
        outcome.relay_queued += queued;
    }
    outcome.sink_drops = accounting(sink)?.0;
    Ok(outcome)
}

/// The receive-buffer slot of the sink: room for a longer datagram than expected, so
/// one is seen as too long rather than cut to size.
fn slot_size(size: usize) -> usize {
    (size + 64).next_power_of_two().max(2048)
}

fn count(socket: &UdpSocket, expect: Expect, shared: &Shared) -> io::Result<SinkOutcome> {
    socket.set_read_timeout(Some(SINK_TICK))?;
    let Expect {
        size, count, flows, ..
    } = expect;
    let slot = slot_size(size);
    let mut bufs = vec![0u8; slot * BATCH];
    let per_flow: Vec<u64> = (0..flows)
        .map(|f| traffic::flow_count(count, flows, f))
        .collect();
    let mut seen = vec![0u64; count.div_ceil(64) as usize];
    // Per flow: the highest sequence number seen, plus one (0: none yet).
    let mut top = vec![0u64; flows];
    let warm = count * WARMUP_PERCENT / 100;
    let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| bench_error(e.to_string()))?;
    let mut out = SinkOutcome::default();
    let start = mono_ns();
    let base = bufs.as_mut_ptr();
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|j| libc::iovec {
            // SAFETY: slot j of BATCH slots of `slot` bytes lies inside `bufs`.
            iov_base: unsafe { base.add(j * slot) }.cast(),
            iov_len: slot,
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; all zeroes is an empty message.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    while out.arrivals < count {
        for (msg, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
            msg.msg_hdr.msg_flags = 0;
        }
        // SAFETY: each of the BATCH messages points at one live iovec over its own slot
        // of `bufs`; all outlive the call, which writes only into them.
        let rc = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let now = mono_ns();
        if rc <= 0 {
            let err = io::Error::last_os_error();
            let idle = matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            );
            if rc < 0 && !idle {
                return Err(err);
            }
            if shared.gen_done.load(Ordering::Acquire) {
                let since = out
                    .last_ns
                    .max(shared.gen_end_ns.load(Ordering::Acquire))
                    .max(start);
                if now.saturating_sub(since) >= UDP_IDLE.as_nanos() as u64 {
                    break;
                }
            } else if out.arrivals == 0
                && now.saturating_sub(start) > SINK_NOTHING.as_nanos() as u64
            {
                break;
            }
            continue;
        }
        for (j, msg) in msgs.iter().enumerate().take(rc as usize) {
            out.arrivals += 1;
            let len = (msg.msg_len as usize).min(slot);
            // SAFETY: the kernel wrote `len` bytes (at most a slot) into slot j of `bufs`,
            // which nothing else refers to until the next recvmmsg.
            let buf = unsafe { std::slice::from_raw_parts(base.add(j * slot), len) };
            let whole = msg.msg_hdr.msg_flags & libc::MSG_TRUNC == 0;
            let checked = whole.then(|| traffic::check(buf, size)).flatten();
            let Some(Checked { flow, seq, sent_ns }) = checked else {
                out.corrupt += 1;
                continue;
            };
            let flow = flow as usize;
            if flow >= flows || seq >= per_flow[flow] {
                out.corrupt += 1;
                continue;
            }
            let g = seq * flows as u64 + flow as u64;
            let (word, bit) = ((g / 64) as usize, 1u64 << (g % 64));
            if seen[word] & bit != 0 {
                out.duplicates += 1;
                continue;
            }
            seen[word] |= bit;
            out.received += 1;
            if seq + 1 < top[flow] {
                out.reordered += 1;
            } else {
                top[flow] = seq + 1;
            }
            if g >= warm {
                histogram.saturating_record(now.saturating_sub(sent_ns).max(1));
            }
        }
        out.last_ns = now;
    }
    if !histogram.is_empty() {
        let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        out.latency = Some(Latency {
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
        });
    }
    Ok(out)
}

/// Kernel drops (SO_MEMINFO) and bytes queued (FIONREAD) of `socket`.
fn accounting(socket: &UdpSocket) -> io::Result<(u64, u64)> {
    let drops = udp_peer::kernel_drops(socket)
        .ok_or_else(|| bench_error("the kernel does not report SO_MEMINFO drops"))?;
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into the live local `queued`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD, &mut queued) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((drops, queued.max(0) as u64))
}
