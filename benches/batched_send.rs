//! Batched sends over loopback: B writes then one flush, against one await per write and
//! against one blocking std `write_all` per message, over batch size x message size x
//! driver (the way quinn-udp's throughput bench loops over GSO x GRO).
//!
//! One iteration sends one group of B messages and returns when the kernel has taken
//! them; a plain std thread drains the other end. Throughput is in messages.
//!
//! ```sh
//! cargo bench --bench batched_send                 # everything, a few minutes on 2 cores
//! cargo bench --bench batched_send -- 64B/uring    # a filter
//! ```
//!
//! `ringsock bench` measures the full workload (first write to last byte received, the
//! peer pinned); this bench is for quick A/B comparisons of the send path.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringsock::runtime::Builder;
use ringsock::{Backend, Runtime, StreamSocket};

const BATCHES: [usize; 4] = [1, 8, 64, 256];
const SIZES: [usize; 3] = [64, 1024, 16384];

/// How a ringsock group is awaited.
#[derive(Clone, Copy)]
enum Pattern {
    /// B writes, then one flush.
    Flush,
    /// Each write's handle awaited before the next write.
    AwaitEach,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Flush => "flush",
            Pattern::AwaitEach => "await-each",
        }
    }
}

/// A plain std thread that reads and discards until end of stream.
fn drain(mut stream: TcpStream) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    })
}

/// `batch` messages of `size` bytes, slices of one buffer.
fn messages(size: usize, batch: usize) -> Vec<Bytes> {
    let all = Bytes::from(vec![0xA5u8; size * batch]);
    (0..batch)
        .map(|j| all.slice(j * size..(j + 1) * size))
        .collect()
}

/// A ringsock connection to a draining std thread, on its own runtime.
struct RingsockConn {
    runtime: Runtime,
    socket: Option<StreamSocket>,
    drain: Option<JoinHandle<u64>>,
}

impl RingsockConn {
    fn new(backend: Backend) -> Option<RingsockConn> {
        let runtime = match Builder::new().backend(backend).build() {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("skipped {backend}: {err}");
                return None;
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local address");
        let socket = runtime.block_on(async {
            let socket = StreamSocket::new();
            socket.connect_addr(addr).await.expect("connect");
            socket
        });
        let (server, _) = listener.accept().expect("accept");
        server.set_nodelay(true).expect("TCP_NODELAY");
        Some(RingsockConn {
            runtime,
            socket: Some(socket),
            drain: Some(drain(server)),
        })
    }

    /// Sends `iters` groups; the time they took.
    fn send(&self, msgs: &[Bytes], pattern: Pattern, iters: u64) -> Duration {
        let output = self.socket.as_ref().expect("connected").output_stream();
        self.runtime.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                match pattern {
                    Pattern::Flush => {
                        for msg in msgs {
                            output.write(msg.clone()).await.expect("write");
                        }
                        output.flush().await.expect("flush");
                    }
                    Pattern::AwaitEach => {
                        for msg in msgs {
                            let handle = output.write(msg.clone()).await.expect("write");
                            handle.await.expect("write completes");
                        }
                    }
                }
            }
            start.elapsed()
        })
    }
}

impl Drop for RingsockConn {
    fn drop(&mut self) {
        drop(self.socket.take());
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

/// A blocking std connection to a draining std thread.
struct StdConn {
    stream: Option<TcpStream>,
    drain: Option<JoinHandle<u64>>,
}

impl StdConn {
    fn new() -> StdConn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        server.set_nodelay(true).expect("TCP_NODELAY");
        StdConn {
            stream: Some(stream),
            drain: Some(drain(server)),
        }
    }

    fn send(&mut self, msgs: &[Bytes], iters: u64) -> Duration {
        let stream = self.stream.as_mut().expect("connected");
        let start = Instant::now();
        for _ in 0..iters {
            for msg in msgs {
                stream.write_all(msg).expect("write");
            }
        }
        start.elapsed()
    }
}

impl Drop for StdConn {
    fn drop(&mut self) {
        drop(self.stream.take());
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

fn batched_send(c: &mut Criterion) {
    for size in SIZES {
        let mut group = c.benchmark_group(format!("batched_send/{size}B"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(600));
        for batch in BATCHES {
            let msgs = messages(size, batch);
            group.throughput(Throughput::Elements(batch as u64));
            for (backend, name) in [(Backend::Uring, "uring"), (Backend::Epoll, "epoll")] {
                let Some(conn) = RingsockConn::new(backend) else {
                    continue;
                };
                for pattern in [Pattern::Flush, Pattern::AwaitEach] {
                    let id = BenchmarkId::new(format!("{name}/{}", pattern.name()), batch);
                    group.bench_with_input(id, &msgs, |b, msgs| {
                        b.iter_custom(|iters| conn.send(msgs, pattern, iters))
                    });
                }
            }
            let mut std_conn = StdConn::new();
            let id = BenchmarkId::new("std/per-write", batch);
            group.bench_with_input(id, &msgs, |b, msgs| {
                b.iter_custom(|iters| std_conn.send(msgs, iters))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, batched_send);
criterion_main!(benches);
