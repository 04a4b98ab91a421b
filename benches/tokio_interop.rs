//! ringsock inside tokio, beside ringsock on its own runtime and beside tokio's own
//! TcpStream, over loopback against a plain std thread:
//!
//! - `tcp_echo_rtt`: one iteration is one 64-byte message written and its echo read
//!   back in full (the time is the round trip).
//! - `tcp_batch`: one iteration is 64 messages of 1 KiB sent and flushed (ringsock: 64
//!   queued writes, one flush; tokio: one `write_all` per message); a std thread drains
//!   the other end. Throughput is in messages.
//!
//! Columns: `ringsock-{uring,epoll}` (own runtime), `tokio+ringsock-{uring,epoll}`
//! (a `ringsock::tokio::Driver` on a current-thread tokio runtime, the owned-buffer API),
//! `tokio+ringsock-uring-traits` (the same through tokio's AsyncRead/AsyncWrite), and
//! `tokio-tcpstream`.
//!
//! ```sh
//! cargo bench --bench tokio_interop
//! cargo bench --bench tokio_interop -- tcp_echo_rtt   # a filter
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringsock::runtime::Builder;
use ringsock::{Backend, StreamSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO_SIZE: usize = 64;
const BATCH: usize = 64;
const MESSAGE: usize = 1024;

/// What the std thread at the other end does.
#[derive(Clone, Copy)]
enum Peer {
    /// Echoes everything back.
    Echo,
    /// Reads and discards.
    Drain,
}

/// A listener whose one connection is served by a std thread.
fn std_peer(peer: Peer) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if let Peer::Echo = peer {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    (addr, thread)
}

fn batch_messages() -> Vec<Bytes> {
    let all = Bytes::from(vec![0xA5u8; MESSAGE * BATCH]);
    (0..BATCH)
        .map(|j| all.slice(j * MESSAGE..(j + 1) * MESSAGE))
        .collect()
}

/// `iters` iterations of `peer`'s workload on a ringsock socket; time of the loop.
async fn ringsock_loop(addr: SocketAddr, peer: Peer, iters: u64) -> Duration {
    let socket = StreamSocket::new();
    socket.control().set_no_delay(true).unwrap();
    socket.connect_addr(addr).await.expect("connect");
    let output = socket.output_stream();
    let messages = batch_messages();
    let mut ping = vec![0x5Au8; ECHO_SIZE];
    let mut pong = Vec::with_capacity(ECHO_SIZE);
    let start = Instant::now();
    for _ in 0..iters {
        match peer {
            Peer::Echo => {
                let (written, back) = socket.write_all(ping).await;
                ping = back;
                written.expect("write");
                pong.clear();
                while pong.len() < ECHO_SIZE {
                    let (read, back) = socket.read(pong).await;
                    pong = back;
                    assert!(read.expect("read") > 0, "echo closed");
                }
            }
            Peer::Drain => {
                for message in &messages {
                    output.write(message.clone()).await.expect("queue");
                }
                output.flush().await.expect("flush");
            }
        }
    }
    start.elapsed()
}

/// The same through tokio's traits on a ringsock socket or a tokio TcpStream.
async fn traits_loop<S>(mut stream: S, peer: Peer, iters: u64) -> Duration
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ping = vec![0x5Au8; ECHO_SIZE];
    let mut pong = vec![0u8; ECHO_SIZE];
    let messages = batch_messages();
    let start = Instant::now();
    for _ in 0..iters {
        match peer {
            Peer::Echo => {
                stream.write_all(&ping).await.expect("write");
                stream.read_exact(&mut pong).await.expect("read");
            }
            Peer::Drain => {
                for message in &messages {
                    stream.write_all(message).await.expect("write");
                }
                stream.flush().await.expect("flush");
            }
        }
    }
    start.elapsed()
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// One measured run of `iters` iterations against a fresh std peer.
fn run(column: &str, peer: Peer, iters: u64) -> Option<Duration> {
    let (addr, thread) = std_peer(peer);
    let elapsed = match column {
        "ringsock-uring" | "ringsock-epoll" => {
            let backend = if column.ends_with("uring") {
                Backend::Uring
            } else {
                Backend::Epoll
            };
            let runtime = Builder::new().backend(backend).build().ok()?;
            runtime.block_on(ringsock_loop(addr, peer, iters))
        }
        "tokio+ringsock-uring" | "tokio+ringsock-epoll" | "tokio+ringsock-uring-traits" => {
            let backend = if column.contains("uring") {
                Backend::Uring
            } else {
                Backend::Epoll
            };
            let traits = column.ends_with("traits");
            tokio_runtime().block_on(async {
                let builder = Builder::new().backend(backend);
                let mut driver = ringsock::tokio::Driver::with_builder(builder).ok()?;
                Some(
                    driver
                        .run_until(async {
                            if !traits {
                                return ringsock_loop(addr, peer, iters).await;
                            }
                            let socket = StreamSocket::new();
                            socket.control().set_no_delay(true).unwrap();
                            socket.connect_addr(addr).await.expect("connect");
                            traits_loop(socket, peer, iters).await
                        })
                        .await,
                )
            })?
        }
        "tokio-tcpstream" => tokio_runtime().block_on(async {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).unwrap();
            traits_loop(stream, peer, iters).await
        }),
        other => unreachable!("no column {other}"),
    };
    thread.join().expect("peer thread");
    Some(elapsed)
}

const COLUMNS: [&str; 6] = [
    "ringsock-uring",
    "ringsock-epoll",
    "tokio+ringsock-uring",
    "tokio+ringsock-epoll",
    "tokio+ringsock-uring-traits",
    "tokio-tcpstream",
];

fn bench(c: &mut Criterion) {
    for (name, peer, elements) in [
        ("tcp_echo_rtt", Peer::Echo, 1),
        ("tcp_batch", Peer::Drain, BATCH as u64),
    ] {
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(elements));
        for column in COLUMNS {
            if run(column, peer, 1).is_none() {
                eprintln!("{name}/{column}: skipped (the engine cannot start here)");
                continue;
            }
            group.bench_function(column, |b| {
                b.iter_custom(|iters| run(column, peer, iters).expect("started before"))
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = bench
}
criterion_main!(benches);
