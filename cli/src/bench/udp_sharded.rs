//! udp-recv on a pool: `--threads N` runtimes, each receiving on its own SO_REUSEPORT
//! socket of one sharded group, the flood spread over several flows so that the
//! kernel's flow hash reaches every thread.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ringsock::runtime::timeout;
use ringsock::{Backend, DatagramSocket, Error, Result};

use super::cpu::{self, CpuSample};
use super::options::Options;
use super::peer::PEER_WAIT;
use super::udp::{driver_syscalls, receive_counted, start_flood, Flood, Received, RECV_BATCH};
use super::udp_peer::{self, Counted, UDP_IDLE};

/// What one thread received.
struct Shard {
    rx: Counted,
    syscalls: u64,
    kernel_drops: u64,
    rcvbuf: Option<usize>,
}

/// Receives the flood on `o.threads` threads; the flood starts once every thread's ring
/// is set up, and each thread stops when all threads together have every datagram, or
/// when it has had none for [`UDP_IDLE`] (the rest were lost or went elsewhere).
pub(super) fn receiver(
    o: &Options,
    backend: Backend,
    ready: mpsc::Sender<()>,
    go: mpsc::Receiver<()>,
) -> Result<(Received, Flood)> {
    let pool = o.pool(backend)?;
    let (threads, size, count, gro) = (o.threads, o.size, o.count, o.gro);
    let armed = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(Mutex::new(Some(ready)));
    let serve = move |_thread: usize, socket: DatagramSocket| {
        let (armed, delivered, ready) = (armed.clone(), delivered.clone(), ready.clone());
        async move {
            socket.control().set_receive_buffer_size(udp_peer::RCVBUF)?;
            if gro {
                socket.control().set_gro(true)?;
            }
            let rcvbuf = socket.control().receive_buffer_size().ok();
            // The first receive sets the ring up (and arms the receive) before the flood.
            let _ = timeout(Duration::from_millis(1), socket.recv()).await;
            let calls = driver_syscalls();
            let cpu0 = cpu::thread_cpu_secs();
            if armed.fetch_add(1, Ordering::AcqRel) + 1 == threads {
                if let Some(ready) = ready.lock().ok().and_then(|mut r| r.take()) {
                    let _ = ready.send(());
                }
            }
            let mut rx = Counted::default();
            let mut batch = Vec::with_capacity(RECV_BATCH);
            let started = Instant::now();
            while delivered.load(Ordering::Acquire) < count {
                let wait = if rx.first.is_none() {
                    // Another thread may take the whole flood: give up on a share only
                    // once the flood has had its time.
                    PEER_WAIT.saturating_sub(started.elapsed()).max(UDP_IDLE)
                } else {
                    UDP_IDLE
                };
                match receive_counted(&socket, &mut batch, wait, &mut rx, size, count).await? {
                    Some(n) => delivered.fetch_add(n, Ordering::AcqRel),
                    None => break,
                };
            }
            rx.cpu_secs = cpu::thread_cpu_secs() - cpu0;
            Ok::<_, Error>(Shard {
                rx,
                syscalls: driver_syscalls() - calls,
                kernel_drops: socket.receive_stats().dropped,
                rcvbuf,
            })
        }
    };
    let sharded =
        DatagramSocket::bind_sharded(SocketAddr::from(([127, 0, 0, 1], 0)), &pool.handle(), serve)?;
    let flood = start_flood(o, sharded.addr, go)?;
    let cpu_before = CpuSample::now();
    let shards = ringsock::block_on(async {
        let mut shards = Vec::new();
        for server in sharded.servers {
            shards.push(
                server
                    .await
                    .and_then(|adopted| adopted)
                    .and_then(|shard| shard),
            );
        }
        shards
    });
    let cpu_after = CpuSample::now();
    let mut received = Received {
        rx: Counted::default(),
        cpu_before,
        cpu_after,
        syscalls: 0,
        rcvbuf: None,
        kernel_drops: Some(0),
        ring: Vec::new(),
        per_thread: Some(Vec::new()),
    };
    for shard in shards {
        let shard = shard?;
        let rx = &mut received.rx;
        rx.delivered += shard.rx.delivered;
        rx.bad += shard.rx.bad;
        rx.cpu_secs += shard.rx.cpu_secs;
        rx.first = rx.first.into_iter().chain(shard.rx.first).min();
        rx.last = rx.last.into_iter().chain(shard.rx.last).max();
        received.syscalls += shard.syscalls;
        received.kernel_drops = received.kernel_drops.map(|n| n + shard.kernel_drops);
        received.rcvbuf = received.rcvbuf.or(shard.rcvbuf);
        if let Some(spread) = received.per_thread.as_mut() {
            spread.push(shard.rx.delivered);
        }
    }
    Ok((received, flood))
}
