//! The Windows.Networking.Sockets guide's three ways to send many packets, side by side,
//! over loopback to a plain std receiver thread that checks every packet arrives in order:
//!
//! 1. one write at a time: each write awaited before the next ("not recommended");
//! 2. all writes issued, then every write's handle awaited together (Task.WaitAll);
//! 3. all writes issued, then one `flush` (FlushAsync): batched sends.
//!
//! ```sh
//! cargo run --release --example batched_send                  # 64-byte packets
//! cargo run --release --example batched_send -- 1024 100000   # size, packets
//! RINGSOCK_BACKEND=epoll cargo run --release --example batched_send
//! ```

use std::future::{poll_fn, Future};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use ringsock::net::WriteHandle;
use ringsock::{OutputStream, Runtime, StreamSocket};

/// Packets per group: written together, then awaited together.
const GROUP: usize = 64;

#[derive(Clone, Copy)]
enum Pattern {
    OneAtATime,
    WaitAll,
    Flush,
}

impl Pattern {
    fn describe(self) -> &'static str {
        match self {
            Pattern::OneAtATime => "one write at a time",
            Pattern::WaitAll => "writes, then wait-all",
            Pattern::Flush => "writes, then flush",
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let packets: usize = args.next().map_or(Ok(200_000), |s| s.parse())?;
    if size < 8 {
        return Err("packets carry an 8-byte sequence number: size must be at least 8".into());
    }
    let runtime = Runtime::new()?;
    println!(
        "{packets} packets of {size} bytes, groups of {GROUP}, driver {}\n",
        runtime.driver_kind()
    );
    println!(
        "{:<24} {:>9} {:>12} {:>10} {:>14}",
        "pattern", "time", "packets/s", "syscalls", "kernel ops"
    );
    for pattern in [Pattern::OneAtATime, Pattern::WaitAll, Pattern::Flush] {
        measure(&runtime, pattern, size, packets)?;
    }
    Ok(())
}

fn measure(
    runtime: &Runtime,
    pattern: Pattern,
    size: usize,
    packets: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (elapsed, syscalls, kernel_ops, receiver) = runtime.block_on(async {
        let socket = StreamSocket::new();
        socket.connect_addr(addr).await?;
        let (server, _) = listener.accept()?;
        let receiver = std::thread::spawn(move || receive(server, size, packets));
        let output = socket.output_stream();
        let before = runtime.driver_stats().syscalls();
        let start = Instant::now();
        send(&output, pattern, size, packets).await?;
        let elapsed = start.elapsed();
        let syscalls = runtime.driver_stats().syscalls() - before;
        Ok::<_, Box<dyn std::error::Error>>((
            elapsed,
            syscalls,
            output.stats().kernel_operations,
            receiver,
        ))
    })?;
    // The socket is closed: the receiver has its last bytes or sees the end.
    let received = receiver.join().map_err(|_| "the receiver panicked")??;
    assert_eq!(received, packets, "every packet arrived, in order");
    println!(
        "{:<24} {:>7.1}ms {:>12.0} {:>10} {:>14}",
        pattern.describe(),
        elapsed.as_secs_f64() * 1e3,
        packets as f64 / elapsed.as_secs_f64(),
        syscalls,
        kernel_ops
    );
    Ok(())
}

/// The packets, group by group; each group's packets are slices of one buffer.
async fn send(
    output: &OutputStream,
    pattern: Pattern,
    size: usize,
    packets: usize,
) -> ringsock::Result<()> {
    let mut sent = 0;
    while sent < packets {
        let n = (packets - sent).min(GROUP);
        let mut group = vec![0xA5u8; n * size];
        for j in 0..n {
            let seq = (sent + j) as u64;
            group[j * size..j * size + 8].copy_from_slice(&seq.to_le_bytes());
        }
        let group = Bytes::from(group);
        let packet = |j: usize| group.slice(j * size..(j + 1) * size);
        match pattern {
            Pattern::OneAtATime => {
                for j in 0..n {
                    // Awaiting the handle sends this write alone: a kernel transition
                    // per packet.
                    output.write(packet(j)).await?.await?;
                }
            }
            Pattern::WaitAll => {
                let mut pending = Vec::with_capacity(n);
                for j in 0..n {
                    pending.push(output.write(packet(j)).await?);
                }
                wait_all(pending).await?;
            }
            Pattern::Flush => {
                for j in 0..n {
                    output.write(packet(j)).await?;
                }
                output.flush().await?;
            }
        }
        sent += n;
    }
    Ok(())
}

/// Awaits every write together, like Task.WaitAll; the first error once all are done.
async fn wait_all(mut pending: Vec<WriteHandle>) -> ringsock::Result<()> {
    let mut first_error = None;
    poll_fn(|cx| {
        pending.retain_mut(|write| match Pin::new(write).poll(cx) {
            Poll::Ready(result) => {
                if let Err(err) = result {
                    first_error.get_or_insert(err);
                }
                false
            }
            Poll::Pending => true,
        });
        if pending.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    first_error.map_or(Ok(()), Err)
}

/// Reads everything, checking each packet's sequence number; the packets received.
fn receive(mut stream: TcpStream, size: usize, packets: usize) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut header = [0u8; 8];
    // Packet `received`, `offset` bytes into it.
    let (mut received, mut offset) = (0usize, 0usize);
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(received);
        }
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            let take = if offset < 8 {
                8 - offset
            } else {
                size - offset
            }
            .min(chunk.len());
            if offset < 8 {
                header[offset..offset + take].copy_from_slice(&chunk[..take]);
                if offset + take == 8 && u64::from_le_bytes(header) != received as u64 {
                    let message = format!("packet {received} arrived out of order");
                    return Err(std::io::Error::other(message));
                }
            }
            offset += take;
            chunk = &chunk[take..];
            if offset == size {
                received += 1;
                offset = 0;
            }
        }
        if received > packets {
            return Err(std::io::Error::other("more packets than were sent"));
        }
    }
}
