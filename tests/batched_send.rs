//! OutputStream batches: exact bytes under forced short sends, resets mid-batch, empty
//! flushes and dropped streams — on both drivers.

mod util;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;

use bytes::Bytes;
use ringsock::{SocketErrorStatus, StreamSocket};

/// Checksum of a byte stream, cheap and order-sensitive (FNV-1a, 64 bit).
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A deterministic generator for sizes and counts.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A std receiver with a tiny receive buffer that reads in small, varying chunks, so the
/// sender's sends come back short and its chains get cut. Returns (bytes, checksum).
fn slow_receiver() -> (SocketAddr, JoinHandle<(u64, u64)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    socket2::SockRef::from(&listener)
        .set_recv_buffer_size(4096)
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut rng = Rng(7);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let mut sum = Fnv::new();
        loop {
            let want = 1 + rng.below(buf.len() as u64) as usize;
            let n = stream.read(&mut buf[..want]).unwrap();
            if n == 0 {
                return (total, sum.0);
            }
            total += n as u64;
            sum.update(&buf[..n]);
        }
    });
    (addr, receiver)
}

/// A stream connected to a fresh [`slow_receiver`], with a 4 KiB send buffer when
/// `squeezed` (so sends come back short), and the receiver's thread.
async fn stream_to_slow_receiver(squeezed: bool) -> (StreamSocket, JoinHandle<(u64, u64)>) {
    let (addr, receiver) = slow_receiver();
    let socket = StreamSocket::new();
    if squeezed {
        socket.control().set_send_buffer_size(4096).unwrap();
    }
    socket.connect_addr(addr).await.unwrap();
    (socket, receiver)
}

/// A payload of `len` bytes that differs from its neighbours (stream position encoded).
fn payload(position: u64, len: usize) -> Bytes {
    let mut bytes = util::pseudo_random_bytes(position, len.min(256));
    bytes.resize(len, (position % 251) as u8);
    if len >= 8 {
        bytes[..8].copy_from_slice(&position.to_le_bytes());
    }
    Bytes::from(bytes)
}

#[test]
fn byte_exact_stream_under_forced_short_sends() {
    // 100,000 flushes in release (what CI runs); fewer in debug so a plain `cargo test`
    // stays quick. Mostly small writes with rare large ones (up to 256 KiB) keep the
    // total near 1 GB in release.
    let flushes = if cfg!(debug_assertions) {
        3_000
    } else {
        100_000
    };
    util::on_each_backend(|backend| async move {
        let (socket, receiver) = stream_to_slow_receiver(true).await;
        let output = socket.output_stream();
        let mut rng = Rng(backend as u64 + 1);
        let mut sent = Fnv::new();
        let mut position = 0u64;
        for _ in 0..flushes {
            let writes = 1 + rng.below(64);
            let lens: Vec<usize> = (0..writes)
                .map(|_| {
                    if rng.below(400) == 0 {
                        1 + rng.below(256 * 1024) as usize
                    } else {
                        1 + rng.below(64) as usize
                    }
                })
                .collect();
            // Half the flushes write slices of one buffer, end to end in memory, which
            // the engine joins into shared iovecs; the rest write separate buffers.
            let whole = (rng.below(2) == 0).then(|| payload(position, lens.iter().sum()));
            let mut at = 0;
            for len in lens {
                let data = match &whole {
                    Some(whole) => whole.slice(at..at + len),
                    None => payload(position, len),
                };
                at += len;
                sent.update(&data);
                position += len as u64;
                output.write(data).await.unwrap();
            }
            output.flush().await.unwrap();
            assert_eq!(
                output.pending_writes(),
                0,
                "flush returned with writes pending"
            );
        }
        let stats = output.stats();
        assert_eq!(stats.batches, flushes);
        if backend == ringsock::Backend::Epoll {
            // Non-blocking sendmsg into 4 KiB buffers comes back short; each was resumed.
            assert!(stats.short_send_recoveries > 0, "{stats:?}");
        }
        drop(output);
        socket.shutdown_write().await.unwrap();
        let (received, checksum) = receiver.join().unwrap();
        assert_eq!(received, position, "byte count on {backend}");
        assert_eq!(checksum, sent.0, "stream checksum on {backend}");
    });
}

#[test]
fn more_writes_than_one_sendmsg_takes_stay_in_order() {
    // 3,000 writes in one flush: more than the 1,024 iovecs a sendmsg carries, so io_uring
    // sends a linked chain and epoll several sendmsgs. Every fourth payload goes out as
    // two writes, slices of one buffer end to end (one iovec), so link boundaries and the
    // short sends of a 4 KiB send buffer fall inside joined iovecs too.
    util::on_each_backend(|backend| async move {
        let (socket, receiver) = stream_to_slow_receiver(true).await;
        let output = socket.output_stream();
        let mut sent = Fnv::new();
        let mut position = 0u64;
        let mut handles = Vec::new();
        for i in 0..3_000u64 {
            let len = 8 + (i % 300) as usize;
            let data = match i % 4 {
                0 => {
                    let pair = payload(position, len + 1 + (i % 7) as usize);
                    let (first, second) = (pair.slice(..len), pair.slice(len..));
                    for part in [first, second] {
                        sent.update(&part);
                        position += part.len() as u64;
                        handles.push(output.write(part).await.unwrap());
                    }
                    continue;
                }
                _ => payload(position, len),
            };
            sent.update(&data);
            position += data.len() as u64;
            handles.push(output.write(data).await.unwrap());
        }
        output.flush().await.unwrap();
        for handle in handles {
            assert!(matches!(handle.result(), Some(Ok(()))));
        }
        assert!(output.stats().batches >= 1);
        drop(output);
        drop(socket);
        let (received, checksum) = receiver.join().unwrap();
        assert_eq!((received, checksum), (position, sent.0), "on {backend}");
    });
}

#[test]
fn wait_all_on_handles_keeps_the_byte_order() {
    // The Windows guide's Task.WaitAll pattern: writes issued, then all awaited together, no flush.
    util::on_each_backend(|backend| async move {
        let (socket, receiver) = stream_to_slow_receiver(false).await;
        let output = socket.output_stream();
        let mut sent = Fnv::new();
        let mut position = 0u64;
        for _ in 0..20 {
            let mut handles = Vec::new();
            for _ in 0..16 {
                let data = payload(position, 16 * 1024);
                sent.update(&data);
                position += data.len() as u64;
                handles.push(output.write(data).await.unwrap());
            }
            // Await in reverse, to make sure no handle sends out of turn.
            for handle in handles.into_iter().rev() {
                handle.await.unwrap();
            }
        }
        drop(output);
        drop(socket);
        let (received, checksum) = receiver.join().unwrap();
        assert_eq!((received, checksum), (position, sent.0), "on {backend}");
    });
}

#[test]
fn flush_with_nothing_queued_returns_at_once() {
    util::on_each_backend(|_| async {
        let (socket, receiver) = stream_to_slow_receiver(false).await;
        let output = socket.output_stream();
        output.flush().await.unwrap();
        assert_eq!(output.stats().batches, 0);
        output.write(&b"x"[..]).await.unwrap();
        output.flush().await.unwrap();
        output.flush().await.unwrap();
        assert_eq!(output.stats().batches, 1);
        drop(output);
        drop(socket);
        assert_eq!(receiver.join().unwrap().0, 1);
    });
}

#[test]
fn a_reset_mid_batch_fails_the_flush_and_every_unsent_write() {
    util::on_each_backend(|backend| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&listener)
            .set_recv_buffer_size(4096)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut first = [0u8; 1];
            stream.read_exact(&mut first).unwrap();
            // Abortive close: the client gets a reset, not an orderly end.
            socket2::SockRef::from(&stream)
                .set_linger(Some(std::time::Duration::ZERO))
                .unwrap();
            drop::<TcpStream>(stream);
        });
        let socket = StreamSocket::new();
        socket.control().set_send_buffer_size(4096).unwrap();
        socket.connect_addr(addr).await.unwrap();
        let output = socket.output_stream();
        // Far more than the socket buffers hold: the batch cannot finish before the reset.
        let mut handles = Vec::new();
        for i in 0..64u64 {
            handles.push(output.write(payload(i, 1024 * 1024)).await.unwrap());
        }
        let err = output.flush().await.unwrap_err();
        server.join().unwrap();
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "flush on {backend}: {err}"
        );
        let last = handles.pop().unwrap().await.unwrap_err();
        assert_eq!(last.status(), SocketErrorStatus::ConnectionResetByPeer);
        // Writes after the failure fail the same way, at once.
        let late = output.write(&b"late"[..]).await.unwrap();
        assert_eq!(
            late.await.unwrap_err().status(),
            SocketErrorStatus::ConnectionResetByPeer
        );
        assert_eq!(
            output.flush().await.unwrap_err().status(),
            SocketErrorStatus::ConnectionResetByPeer
        );
    });
}

#[test]
fn dropping_the_stream_mid_flush_still_delivers_every_queued_byte() {
    // The flush future, the OutputStream and the socket are all dropped while the kernel
    // still reads the batch's buffers. The driver keeps them until the completions arrive,
    // and the queued writes still go out, exactly.
    util::on_each_backend(|backend| async move {
        let (socket, receiver) = stream_to_slow_receiver(true).await;
        let output = socket.output_stream();
        let mut sent = Fnv::new();
        let mut position = 0u64;
        for _ in 0..32 {
            let data = payload(position, 64 * 1024);
            sent.update(&data);
            position += data.len() as u64;
            output.write(data).await.unwrap();
        }
        // Start the flush, let it run a little, then give up on it.
        let outcome =
            ringsock::runtime::timeout(std::time::Duration::from_millis(1), output.flush()).await;
        assert!(outcome.is_err() || outcome.unwrap().is_ok());
        let more = payload(position, 1000);
        sent.update(&more);
        position += more.len() as u64;
        output.write(more).await.unwrap();
        drop(output);
        drop(socket);
        // The sender task still runs on this runtime: wait without blocking its loop.
        let (received, checksum) = util::join_thread(receiver).await;
        assert_eq!((received, checksum), (position, sent.0), "on {backend}");
    });
}
