//! tcp-batch: M messages of S bytes over one TCP connection, in groups of B, to the plain
//! std receiver; plain or through TLS 1.3 (`--tls`). Timed from the first write to the
//! receiver holding all M*S bytes.

use std::future::{poll_fn, Future};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::pin::Pin;
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::Instant;

use ringsock::net::WriteHandle;
use ringsock::tls::ProtectionLevel;
use ringsock::{Error, HostName, OutputStream, Result, SocketErrorStatus, StreamSocket};
use serde_json::json;

use super::group::{groups, GroupBuffer};
use super::options::{Options, Pattern};
use super::peer::{self, RxOutcome, FILL};
use super::report::Report;
use super::tls::{self, StdTlsSender};
use super::{cpu, join_peer, RunError};

/// Runs tcp-batch for `o.imp`.
pub(crate) fn run(o: &Options) -> Result<Report> {
    match o.imp.backend() {
        Some(backend) => run_ringsock(o, backend),
        None => run_std_per_write(o),
    }
}

/// What the sender side measured.
struct Sent {
    start: Instant,
    cpu_before: cpu::CpuSample,
    result: Result<()>,
    syscalls: u64,
    cpu_secs: f64,
    short_sends: u64,
}

// The sending socket stays open until the receiver has everything: closing a socket
// with unread input (a TLS 1.3 server's session tickets) resets the connection and
// throws away what the kernel had not sent yet. After a failed send it is closed at
// once, so that the receiver sees the end of the stream.

fn run_ringsock(o: &Options, backend: ringsock::Backend) -> Result<Report> {
    let runtime = o.runtime(backend)?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("local address", e))?;
    runtime.block_on(async {
        let socket = StreamSocket::new();
        socket.control().set_no_delay(true)?;
        if o.tls {
            socket.control().set_trusted_roots(tls::trusted_roots()?)?;
        }
        socket.connect_addr(addr).await?;
        // The connection is already in the backlog: this accept does not block.
        let (server, _) = listener.accept().map_err(|e| Error::io("accept", e))?;
        let rx = start_receiver(server, o)?;
        if o.tls {
            // The receiver's first reads run the server side of the handshake.
            let name = HostName::new(tls::SERVER_NAME)?;
            socket.upgrade_to_tls(ProtectionLevel::Tls13, &name).await?;
        }
        let output = socket.output_stream();
        let stats = ringsock::runtime::driver_stats().unwrap_or_default();
        let cpu_before = cpu::CpuSample::now();
        let cpu0 = cpu::thread_cpu_secs();
        let start = Instant::now();
        let result = send_groups(&output, o).await;
        let cpu_secs = cpu::thread_cpu_secs() - cpu0;
        let after = ringsock::runtime::driver_stats().unwrap_or_default();
        let sent = Sent {
            start,
            cpu_before,
            syscalls: after.syscalls() - stats.syscalls(),
            cpu_secs,
            short_sends: output.stats().short_send_recoveries,
            result,
        };
        let open = sent.result.is_ok().then_some((output, socket));
        // Nothing is left for this runtime to do: blocking it on the join is fine.
        let report = finish(o, sent, rx);
        drop(open);
        Ok(report)
    })
}

/// The baseline's sender: one blocking `write` per message (through TLS: one record
/// and one `write` per message).
enum StdSender {
    Plain(TcpStream, u64),
    Tls(Box<StdTlsSender>),
}

impl StdSender {
    fn send(&mut self, msg: &[u8]) -> std::io::Result<()> {
        match self {
            StdSender::Plain(stream, calls) => peer::write_all_counted(stream, msg, calls),
            StdSender::Tls(sender) => sender.write_message(msg),
        }
    }

    fn calls(&self) -> u64 {
        match self {
            StdSender::Plain(_, calls) => *calls,
            StdSender::Tls(sender) => sender.calls(),
        }
    }
}

fn run_std_per_write(o: &Options) -> Result<Report> {
    let (client, server) = std_pair()?;
    let rx = start_receiver(server, o)?;
    let mut sender = if o.tls {
        StdSender::Tls(Box::new(StdTlsSender::handshake(client)?))
    } else {
        StdSender::Plain(client, 0)
    };
    let mut msg = vec![FILL; o.size];
    let cpu_before = cpu::CpuSample::now();
    let cpu0 = cpu::thread_cpu_secs();
    let start = Instant::now();
    let mut result = Ok(());
    for seq in 0..o.count {
        peer::stamp(&mut msg, seq);
        if let Err(err) = sender.send(&msg) {
            result = Err(Error::io("write", err));
            break;
        }
    }
    let cpu_secs = cpu::thread_cpu_secs() - cpu0;
    let sent = Sent {
        start,
        cpu_before,
        syscalls: sender.calls(),
        cpu_secs,
        short_sends: 0,
        result,
    };
    let open = sent.result.is_ok().then_some(sender);
    let report = finish(o, sent, rx);
    drop(open);
    Ok(report)
}

/// A connected pair of std sockets with TCP_NODELAY on both ends.
pub(crate) fn std_pair() -> Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("local address", e))?;
    let client = TcpStream::connect(addr).map_err(|e| Error::io("connect", e))?;
    let (server, _) = listener.accept().map_err(|e| Error::io("accept", e))?;
    for stream in [&client, &server] {
        stream
            .set_nodelay(true)
            .map_err(|e| Error::io("set TCP_NODELAY", e))?;
    }
    Ok((client, server))
}

type Receiver = JoinHandle<std::io::Result<RxOutcome>>;

/// The plain receiver on `server` (a rustls server over it with `--tls`).
fn start_receiver(server: TcpStream, o: &Options) -> Result<Receiver> {
    server
        .set_nodelay(true)
        .map_err(|e| Error::io("set TCP_NODELAY", e))?;
    server
        .set_read_timeout(Some(peer::PEER_WAIT))
        .map_err(|e| Error::io("set SO_RCVTIMEO", e))?;
    let stream: Box<dyn Read + Send> = if o.tls {
        Box::new(tls::server_stream(server)?)
    } else {
        Box::new(server)
    };
    peer::spawn_receiver(stream, o.size, o.count, o.effective_stride(), o.pin)
        .map_err(|e| Error::io("start the receiver thread", e))
}

/// Joins the receiver and turns both sides' results into the report.
fn finish(o: &Options, sent: Sent, rx: Receiver) -> Report {
    let rx = join_peer(rx, "receiver");
    let mut report = Report::new(o);
    report.syscalls = Some(sent.syscalls);
    report.push_per_msg("cpu_us_per_msg", sent.cpu_secs, o.count);
    if o.imp.backend().is_some() && fault_swap() {
        report.push("fault", "swap");
    }
    if o.imp.backend().is_some() && o.pattern == Pattern::Flush && copies(o.size) {
        report.push("writes", "copy");
    }
    if sent.short_sends > 0 {
        report.push("short_send_recoveries", sent.short_sends);
    }
    let rx = match rx {
        Ok(rx) => rx,
        Err(err) => {
            report.error = Some(match sent.result {
                Err(sender) => RunError::from_error(&sender).context(format!("sender ({err})")),
                Ok(()) => RunError::new(SocketErrorStatus::Unknown, err.to_string()),
            });
            return report;
        }
    };
    report.delivered = rx.in_order;
    report.secs = Some((rx.end - sent.start).as_secs_f64());
    // Which side set the pace. CPU 0 also runs the loopback softirq (partly in
    // ksoftirqd, not charged to the sender thread), so /proc/stat says more than the
    // threads' own CPU times.
    report.push_busy(&sent.cpu_before, &cpu::CpuSample::now());
    report.push_per_msg("rx_cpu_us_per_msg", rx.cpu_secs, o.count);
    report.push(
        "rx_bytes_per_read",
        json!((rx.bytes as f64 / rx.reads.max(1) as f64).round()),
    );
    if let Some(detail) = rx.order_lost {
        let lost = RunError::new(SocketErrorStatus::Unknown, "order lost");
        report.error = Some(lost.with_detail(detail));
    } else if let Err(err) = sent.result {
        report.error = Some(RunError::from_error(&err).context("sender"));
    } else if let Some(short) = rx.short {
        report.error = Some(RunError::new(SocketErrorStatus::ConnectionClosed, short));
    }
    report
}

/// Sends the M messages, group by group, the way `o.pattern` says.
pub(crate) async fn send_groups(output: &OutputStream, o: &Options) -> Result<()> {
    let mut buffers = GroupBuffer::new(o.size, o.batch)
        .with_gap(o.gapped)
        .with_swap(fault_swap());
    let mut handles: Vec<WriteHandle> = Vec::with_capacity(o.batch);
    for (first, n) in groups(o.count, o.batch) {
        let group = buffers.take(first, n);
        match o.pattern {
            Pattern::Flush if copies(o.size) => {
                // Small messages as a program writes them from its own memory: copied,
                // gathered by the stream into one buffer.
                for j in 0..n {
                    let message = buffers.message_bytes(&group, j);
                    if output.try_write_copy(message).is_none() {
                        output.write_copy(message).await?;
                    }
                }
                output.flush().await?;
            }
            Pattern::Flush => {
                // As in the documented batched pattern: writes are issued, not awaited one
                // by one; only a full queue (never, with the default bounds) makes one
                // wait.
                for j in 0..n {
                    if let Err(message) = output.try_write(buffers.message(&group, j)) {
                        output.write(message).await?;
                    }
                }
                output.flush().await?;
            }
            Pattern::WaitAll => {
                for j in 0..n {
                    handles.push(output.write(buffers.message(&group, j)).await?);
                }
                wait_all(&mut handles).await?;
            }
            Pattern::PerWrite => {
                for j in 0..n {
                    output.write(buffers.message(&group, j)).await?.await?;
                }
            }
        }
        buffers.recycle(group);
    }
    Ok(())
}

/// Largest message the flush pattern sends as a copy ([`OutputStream::write_copy`]) rather
/// than as a `Bytes` of its own: below it a copy costs less than a reference count.
pub(crate) const COPY_MAX: usize = 1024;

/// Whether messages of `size` bytes go out as copies in the flush pattern.
pub(crate) fn copies(size: usize) -> bool {
    size <= COPY_MAX
}

/// Awaits every handle together (Task.WaitAll); the first error, once all are done.
async fn wait_all(handles: &mut Vec<WriteHandle>) -> Result<()> {
    let mut first_error = None;
    poll_fn(|cx| {
        handles.retain_mut(|handle| match Pin::new(handle).poll(cx) {
            Poll::Ready(result) => {
                if let Err(err) = result {
                    first_error.get_or_insert(err);
                }
                false
            }
            Poll::Pending => true,
        });
        if handles.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    first_error.map_or(Ok(()), Err)
}

/// The test hook `RINGSOCK_BENCH_FAULT=swap`: the ringsock sender sends messages 1 and 2
/// swapped, so the whole "order lost" path (receiver, JSON line, exit status) can be
/// checked end to end. Never set in a measurement.
pub(crate) fn fault_swap() -> bool {
    std::env::var_os("RINGSOCK_BENCH_FAULT").is_some_and(|v| v == "swap")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_pair_connects() {
        let (a, b) = std_pair().unwrap();
        assert_eq!(a.peer_addr().unwrap(), b.local_addr().unwrap());
    }
}
