//! tcp-batch: M messages of S bytes over one TCP connection, in groups of B, to the plain
//! std receiver. Timed from the first write to the receiver holding all M*S bytes.

use std::future::{poll_fn, Future};
use std::net::{TcpListener, TcpStream};
use std::pin::Pin;
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use serde_json::json;

use super::options::{Options, Pattern};
use super::peer::{self, RxOutcome, FILL};
use super::report::{round, Report};
use super::{cpu, join_peer, RunError};
use crate::net::WriteHandle;
use crate::{Error, OutputStream, Result, SocketErrorStatus, StreamSocket};

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

fn run_ringsock(o: &Options, backend: crate::Backend) -> Result<Report> {
    let runtime = o.runtime(backend)?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("bind", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("local address", e))?;
    let (sent, rx) = runtime.block_on(async {
        let socket = StreamSocket::new();
        socket.control().set_no_delay(true)?;
        socket.connect_addr(addr).await?;
        // The connection is already in the backlog: this accept does not block.
        let (server, _) = listener.accept().map_err(|e| Error::io("accept", e))?;
        let rx = start_receiver(server, o)?;
        let output = socket.output_stream();
        let stats = crate::runtime::driver_stats().unwrap_or_default();
        let cpu_before = cpu::CpuSample::now();
        let cpu0 = cpu::thread_cpu_secs();
        let start = Instant::now();
        let result = send_groups(&output, o).await;
        let cpu_secs = cpu::thread_cpu_secs() - cpu0;
        let after = crate::runtime::driver_stats().unwrap_or_default();
        let sent = Sent {
            start,
            cpu_before,
            result,
            syscalls: after.syscalls() - stats.syscalls(),
            cpu_secs,
            short_sends: output.stats().short_send_recoveries,
        };
        Ok::<_, Error>((sent, rx))
    })?;
    // The socket is closed: the receiver finishes or sees the end of the stream.
    finish(o, sent, rx)
}

fn run_std_per_write(o: &Options) -> Result<Report> {
    let (mut client, server) = std_pair()?;
    let rx = start_receiver(server, o)?;
    let mut msg = vec![FILL; o.size];
    let mut calls = 0u64;
    let cpu_before = cpu::CpuSample::now();
    let cpu0 = cpu::thread_cpu_secs();
    let start = Instant::now();
    let mut result = Ok(());
    for seq in 0..o.count {
        peer::stamp(&mut msg, seq);
        if let Err(err) = peer::write_all_counted(&mut client, &msg, &mut calls) {
            result = Err(Error::io("write", err));
            break;
        }
    }
    let cpu_secs = cpu::thread_cpu_secs() - cpu0;
    drop(client);
    let sent = Sent {
        start,
        cpu_before,
        result,
        syscalls: calls,
        cpu_secs,
        short_sends: 0,
    };
    finish(o, sent, rx)
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

fn start_receiver(
    server: TcpStream,
    o: &Options,
) -> Result<JoinHandle<std::io::Result<RxOutcome>>> {
    server
        .set_nodelay(true)
        .map_err(|e| Error::io("set TCP_NODELAY", e))?;
    peer::spawn_receiver(server, o.size, o.count, o.effective_stride(), o.pin)
        .map_err(|e| Error::io("start the receiver thread", e))
}

fn finish(o: &Options, sent: Sent, rx: JoinHandle<std::io::Result<RxOutcome>>) -> Result<Report> {
    let rx = join_peer(rx, "receiver");
    let mut report = Report::new(o);
    report.syscalls = Some(sent.syscalls);
    report.extra.push((
        "cpu_us_per_msg",
        json!(round(sent.cpu_secs * 1e6 / o.count as f64, 4)),
    ));
    if o.imp.backend().is_some() && fault_swap() {
        report.extra.push(("fault", json!("swap")));
    }
    if sent.short_sends > 0 {
        report
            .extra
            .push(("short_send_recoveries", json!(sent.short_sends)));
    }
    let rx = match rx {
        Ok(rx) => rx,
        Err(err) => {
            report.error = Some(match sent.result {
                Err(sender) => RunError::from_error(&sender).context(format!("sender ({err})")),
                Ok(()) => RunError::new(SocketErrorStatus::Unknown, err.to_string()),
            });
            return Ok(report);
        }
    };
    report.delivered = rx.in_order;
    report.secs = Some((rx.end - sent.start).as_secs_f64());
    // Which side set the pace. CPU 0 also runs the loopback softirq (partly in
    // ksoftirqd, not charged to the sender thread), so /proc/stat says more than the
    // threads' own CPU times.
    let after = cpu::CpuSample::now();
    let busy = |x: Option<f64>| x.map_or(serde_json::Value::Null, |x| json!(round(x, 3)));
    report.extra.push((
        "cpu0_busy",
        busy(sent.cpu_before.busy_until(&after, cpu::MEASURED_CPU)),
    ));
    report.extra.push((
        "cpu1_busy",
        busy(sent.cpu_before.busy_until(&after, cpu::peer_cpu())),
    ));
    report.extra.push((
        "rx_cpu_us_per_msg",
        json!(round(rx.cpu_secs * 1e6 / o.count as f64, 4)),
    ));
    report.extra.push((
        "rx_bytes_per_read",
        json!((rx.bytes as f64 / rx.reads.max(1) as f64).round()),
    ));
    if let Some(detail) = rx.order_lost {
        let lost = RunError::new(SocketErrorStatus::Unknown, "order lost");
        report.error = Some(lost.with_detail(detail));
    } else if let Err(err) = sent.result {
        report.error = Some(RunError::from_error(&err).context("sender"));
    } else if let Some(short) = rx.short {
        report.error = Some(RunError::new(SocketErrorStatus::ConnectionClosed, short));
    }
    Ok(report)
}

/// Sends the M messages, group by group, the way `o.pattern` says.
async fn send_groups(output: &OutputStream, o: &Options) -> Result<()> {
    let size = o.size;
    let mut groups = GroupBuffer::new(size, o.batch);
    let mut first = 0u64;
    let mut handles: Vec<WriteHandle> = Vec::with_capacity(o.batch);
    while first < o.count {
        let n = (o.count - first).min(o.batch as u64) as usize;
        let group = groups.take(first, n);
        let message = |j: usize| group.slice(j * size..(j + 1) * size);
        match o.pattern {
            Pattern::Flush => {
                // As the seed's batched pattern: writes are issued, not awaited one by
                // one; only a full queue (never, with the default bounds) makes one wait.
                for j in 0..n {
                    if let Err(message) = output.try_write(message(j)) {
                        output.write(message).await?;
                    }
                }
                output.flush().await?;
            }
            Pattern::WaitAll => {
                for j in 0..n {
                    handles.push(output.write(message(j)).await?);
                }
                wait_all(&mut handles).await?;
            }
            Pattern::PerWrite => {
                for j in 0..n {
                    output.write(message(j)).await?.await?;
                }
            }
        }
        groups.recycle(group);
        first += n as u64;
    }
    Ok(())
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

/// One group's messages in one buffer, reused once the stream has let go of it, so the
/// sender neither allocates nor fills per message (as the writev peer reuses its buffer).
struct GroupBuffer {
    size: usize,
    batch: usize,
    spare: Option<Bytes>,
    /// Test hook: the first group carries messages 1 and 2 swapped.
    swap: bool,
}

impl GroupBuffer {
    fn new(size: usize, batch: usize) -> GroupBuffer {
        GroupBuffer {
            size,
            batch,
            spare: None,
            swap: fault_swap(),
        }
    }

    /// The buffer with messages `first..first + n` stamped at the front.
    fn take(&mut self, first: u64, n: usize) -> Bytes {
        let mut buf = match self.spare.take().map(Bytes::try_into_mut) {
            Some(Ok(buf)) => buf,
            // Still referenced (or the first group): a new one.
            _ => {
                let mut buf = BytesMut::with_capacity(self.size * self.batch);
                buf.resize(self.size * self.batch, FILL);
                buf
            }
        };
        for j in 0..n {
            peer::stamp(&mut buf[j * self.size..], first + j as u64);
        }
        if self.swap && first == 0 && n >= 3 {
            peer::stamp(&mut buf[self.size..], 2);
            peer::stamp(&mut buf[2 * self.size..], 1);
        }
        buf.freeze()
    }

    fn recycle(&mut self, group: Bytes) {
        self.spare = Some(group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_buffer_is_reused_once_released() {
        let mut groups = GroupBuffer::new(16, 4);
        let g = groups.take(0, 4);
        let ptr = g.as_ptr();
        let slices: Vec<Bytes> = (0..4).map(|j| g.slice(j * 16..(j + 1) * 16)).collect();
        assert_eq!(peer::read_seq(&slices[3]), 3);
        drop(slices);
        groups.recycle(g);
        let g = groups.take(4, 2);
        assert_eq!(g.as_ptr(), ptr, "the released buffer is reused");
        assert_eq!(peer::read_seq(&g[16..]), 5);
        assert!(g[8..16].iter().all(|&b| b == FILL));
    }

    #[test]
    fn a_group_buffer_still_in_use_is_not_overwritten() {
        let mut groups = GroupBuffer::new(16, 4);
        let g = groups.take(0, 4);
        let held = g.slice(0..16);
        groups.recycle(g);
        let _next = groups.take(4, 4);
        assert_eq!(peer::read_seq(&held), 0);
    }

    #[test]
    fn std_pair_connects() {
        let (a, b) = std_pair().unwrap();
        assert_eq!(a.peer_addr().unwrap(), b.local_addr().unwrap());
    }
}
