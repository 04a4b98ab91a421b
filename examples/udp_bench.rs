//! The UDP workloads of ../shared/BENCHMARKS.md (udp-batch, udp-recv, udp-echo-rtt),
//! measured side on CPU 0 and the plain std peer on CPU 1, one JSON line per run in the
//! `ringsock bench` format. Written to move into `ringsock bench` once its module is on
//! main (see the report of the udp branch).
//!
//! ```sh
//! cargo run --release --example udp_bench -- udp-batch ringsock-uring 172 64 600000
//! cargo run --release --example udp_bench -- udp-batch ringsock-uring 172 64 600000 mixed
//! cargo run --release --example udp_bench -- udp-recv ringsock-uring 1200 64 300000 [gro]
//! cargo run --release --example udp_bench -- udp-echo-rtt std-per-write 172 1 50000
//! ```
#![allow(unsafe_code)]

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ringsock::runtime::{timeout, Builder};
use ringsock::{Backend, DatagramSocket, ReceiveRing};
use serde_json::json;

const FILL: u8 = 0xA5;
const IDLE: Duration = Duration::from_millis(500);
const WARMUP: u64 = 1000;
const RCVBUF: usize = 64 << 20;

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn stamp(buf: &mut [u8], seq: u64) {
    let n = buf.len().min(8);
    buf[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
}

fn seq_of(buf: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = buf.len().min(8);
    bytes[..n].copy_from_slice(&buf[..n]);
    u64::from_le_bytes(bytes)
}

/// CPU 0 busy and total jiffies from /proc/stat.
fn cpu0() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu0 "))
        .unwrap_or("cpu0 0");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn backend(imp: &str) -> Option<Backend> {
    match imp {
        "ringsock-uring" => Some(Backend::Uring),
        "ringsock-epoll" => Some(Backend::Epoll),
        "std-per-write" => None,
        other => panic!("unknown impl {other}"),
    }
}

/// Sizes of a batch run: all `size`, or (mixed) pseudo-random in size/2..=size*3/2.
fn sizes(size: usize, count: u64, mixed: bool) -> Vec<usize> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..count)
        .map(|_| {
            if !mixed {
                return size;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (size / 2 + (state % (size as u64 + 1)) as usize).max(8)
        })
        .collect()
}

/// The plain receiver of udp-batch: counts datagrams until `count` or 500 ms idle.
fn std_receiver(count: u64) -> (SocketAddr, std::thread::JoinHandle<u64>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    sock.set_recv_buffer_size(RCVBUF).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let sock: UdpSocket = sock.into();
    sock.set_read_timeout(Some(IDLE)).unwrap();
    let addr = sock.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        pin(1);
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while got < count {
            match sock.recv(&mut buf) {
                Ok(_) => got += 1,
                Err(_) => break,
            }
        }
        got
    });
    (addr, handle)
}

fn udp_batch(imp: &str, size: usize, batch: usize, count: u64, mixed: bool) -> serde_json::Value {
    let (dest, receiver) = std_receiver(count);
    let sizes = sizes(size, count, mixed);
    let syscalls;
    let secs = match backend(imp) {
        Some(backend) => {
            let runtime = Builder::new().backend(backend).build().unwrap();
            let secs = runtime.block_on(async {
                let socket = DatagramSocket::new();
                let output = socket.output_stream_to_addr(dest).unwrap();
                let mut bufs: Vec<Vec<u8>> = Vec::new();
                let start = Instant::now();
                for (first, chunk) in (0..count).step_by(batch).zip(sizes.chunks(batch)) {
                    for (j, &len) in chunk.iter().enumerate() {
                        let mut buf = bufs.pop().unwrap_or_default();
                        buf.clear();
                        buf.resize(len, FILL);
                        stamp(&mut buf, first + j as u64);
                        output.write(buf).await.unwrap();
                    }
                    output.flush().await.unwrap();
                }
                start.elapsed().as_secs_f64()
            });
            syscalls = Some(runtime.driver_stats().syscalls());
            secs
        }
        None => {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut buf = vec![FILL; 65536];
            let start = Instant::now();
            for (seq, &len) in sizes.iter().enumerate() {
                stamp(&mut buf[..len], seq as u64);
                socket.send_to(&buf[..len], dest).unwrap();
            }
            syscalls = Some(count);
            start.elapsed().as_secs_f64()
        }
    };
    let delivered = receiver.join().unwrap();
    json!({"impl": imp, "workload": "udp-batch", "size": size, "batch": batch, "count": count,
        "mixed": mixed, "secs": secs, "msgs_per_s": count as f64 / secs,
        "mb_per_s": sizes.iter().sum::<usize>() as f64 / secs / 1e6, "delivered": delivered,
        "p50_us": null, "p99_us": null, "p999_us": null,
        "syscalls_per_msg": syscalls.map(|s| s as f64 / count as f64)})
}

/// The GSO flood sender of udp-recv (the peers' `--flood gso`): 64 segments per send.
fn gso_flood(dest: SocketAddr, size: usize, count: u64) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        pin(1);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let k = 64.min(65507 / size).max(1);
        let mut buf = vec![FILL; size * k];
        let raw = socket2::SockAddr::from(dest);
        let start = Instant::now();
        let mut seq = 0u64;
        while seq < count {
            let n = (count - seq).min(k as u64) as usize;
            for j in 0..n {
                stamp(&mut buf[j * size..(j + 1) * size], seq + j as u64);
            }
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: n * size,
            };
            let mut control = [0u64; 3];
            // SAFETY: a msghdr over live locals; the cmsg fits the 24-byte control buffer.
            let rc = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_name = raw.as_ptr() as *mut libc::c_void;
                msg.msg_namelen = raw.len();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                if n > 1 {
                    msg.msg_control = control.as_mut_ptr().cast();
                    msg.msg_controllen = 24;
                    let cm = libc::CMSG_FIRSTHDR(&msg);
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = 103; // UDP_SEGMENT
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm) as *mut u16, size as u16);
                }
                libc::sendmsg(sock.as_raw_fd(), &msg, 0)
            };
            assert!(rc >= 0, "GSO send: {}", std::io::Error::last_os_error());
            seq += n as u64;
        }
        start.elapsed().as_secs_f64()
    })
}

fn udp_recv(imp: &str, size: usize, count: u64, gro: bool) -> serde_json::Value {
    let backend = backend(imp).expect("udp-recv measures a ringsock receiver");
    let runtime = Builder::new().backend(backend).build().unwrap();
    let socket = DatagramSocket::new();
    socket.control().set_receive_buffer_size(RCVBUF).unwrap();
    if gro {
        socket.control().set_gro(true).unwrap();
    } else {
        socket
            .control()
            .set_receive_ring(ReceiveRing {
                buffers: 1024,
                buffer_size: 2048.max(size),
            })
            .unwrap();
    }
    socket.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
    let dest = socket.local_addr().unwrap();
    let (delivered, bad, secs, busy, stats) = runtime.block_on(async {
        // Set the ring up before the sender starts.
        let _ = timeout(Duration::from_millis(1), socket.recv()).await;
        let (b0, t0) = cpu0();
        let sender = gso_flood(dest, size, count);
        let mut batch = Vec::with_capacity(256);
        let (mut delivered, mut bad) = (0u64, 0u64);
        let mut first = None;
        let mut last = Instant::now();
        while delivered < count {
            let wait = if first.is_none() {
                Duration::from_secs(10)
            } else {
                IDLE
            };
            match timeout(wait, socket.recv_batch(&mut batch, 256)).await {
                Ok(result) => result.unwrap(),
                Err(_) => break,
            };
            first.get_or_insert_with(Instant::now);
            for d in batch.drain(..) {
                if d.len() != size || d.is_truncated() || seq_of(&d) >= count {
                    bad += 1;
                }
                delivered += 1;
            }
            last = Instant::now();
        }
        let (b1, t1) = cpu0();
        let _ = sender.join();
        let secs = last.duration_since(first.unwrap_or(last)).as_secs_f64();
        (
            delivered,
            bad,
            secs,
            (b1 - b0) as f64 / (t1 - t0).max(1) as f64,
            socket.receive_stats(),
        )
    });
    json!({"impl": imp, "workload": "udp-recv", "size": size, "batch": 64, "count": count,
        "gro": gro, "secs": secs, "msgs_per_s": delivered as f64 / secs,
        "mb_per_s": (delivered as usize * size) as f64 / secs / 1e6, "delivered": delivered,
        "lost": count - delivered, "bad": bad, "cpu0_busy": busy,
        "cpu0_us_per_msg": busy * secs * 1e6 / delivered.max(1) as f64,
        "ring_empty": stats.ring_empty, "rearms": stats.rearms, "kernel_drops": stats.dropped,
        "deliveries": stats.deliveries, "gro_splits": stats.gro_splits,
        "p50_us": null, "p99_us": null, "p999_us": null})
}

fn udp_echo_rtt(imp: &str, size: usize, count: u64) -> serde_json::Value {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server_addr = server.local_addr().unwrap();
    let total = WARMUP + count;
    let echo = std::thread::spawn(move || {
        pin(1);
        let mut buf = vec![0u8; 65536];
        for _ in 0..total {
            let (n, from) = server.recv_from(&mut buf).unwrap();
            server.send_to(&buf[..n], from).unwrap();
        }
    });
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut msg = vec![FILL; size];
    let syscalls;
    let secs = match backend(imp) {
        Some(backend) => {
            let runtime = Builder::new().backend(backend).build().unwrap();
            let secs = runtime.block_on(async {
                let socket = DatagramSocket::new();
                socket.connect_addr(server_addr).await.unwrap();
                let mut start = Instant::now();
                for i in 0..total {
                    if i == WARMUP {
                        start = Instant::now();
                    }
                    stamp(&mut msg, i);
                    let t = Instant::now();
                    let (sent, back) = socket.send(std::mem::take(&mut msg)).await;
                    msg = back;
                    sent.unwrap();
                    let reply = socket.recv().await.unwrap();
                    let dt = t.elapsed().as_nanos() as u64;
                    assert!(reply.len() == size && seq_of(&reply) == i, "wrong echo");
                    if i >= WARMUP {
                        hist.record(dt).unwrap();
                    }
                }
                start.elapsed().as_secs_f64()
            });
            syscalls = Some(runtime.driver_stats().syscalls());
            secs
        }
        None => {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.connect(server_addr).unwrap();
            let mut buf = vec![0u8; 65536];
            let mut start = Instant::now();
            for i in 0..total {
                if i == WARMUP {
                    start = Instant::now();
                }
                stamp(&mut msg, i);
                let t = Instant::now();
                socket.send(&msg).unwrap();
                let n = socket.recv(&mut buf).unwrap();
                let dt = t.elapsed().as_nanos() as u64;
                assert!(n == size && seq_of(&buf) == i, "wrong echo");
                if i >= WARMUP {
                    hist.record(dt).unwrap();
                }
            }
            syscalls = Some(2 * total);
            start.elapsed().as_secs_f64()
        }
    };
    echo.join().unwrap();
    let us = |q: f64| (hist.value_at_quantile(q) as f64 / 1000.0 * 100.0).round() / 100.0;
    json!({"impl": imp, "workload": "udp-echo-rtt", "size": size, "batch": 1, "count": count,
        "secs": secs, "msgs_per_s": count as f64 / secs, "mb_per_s": (count as usize * size) as f64 / secs / 1e6,
        "delivered": hist.len(), "p50_us": us(0.5), "p99_us": us(0.99), "p999_us": us(0.999),
        "syscalls_per_msg": syscalls.map(|s| s as f64 / total as f64)})
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let workload = get(0, "udp-batch");
    let imp = get(1, "ringsock-uring");
    let size: usize = get(2, "172").parse().unwrap();
    let batch: usize = get(3, "64").parse().unwrap();
    let count: u64 = get(4, "600000").parse().unwrap();
    let flag = get(5, "");
    pin(0);
    let line = match workload.as_str() {
        "udp-batch" => udp_batch(&imp, size, batch, count, flag == "mixed"),
        "udp-recv" => udp_recv(&imp, size, count, flag == "gro"),
        "udp-echo-rtt" => udp_echo_rtt(&imp, size, count),
        other => panic!("unknown workload {other}"),
    };
    println!("{line}");
}
