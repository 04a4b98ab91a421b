//! The operations of the driver contract on descriptors that are not sockets (TUN
//! queues), dispatched to the engine the descriptor belongs to: a packet reader and
//! batched packet writes.
//!
//! A TUN queue takes one packet per `write(2)` (`writev` joins its iovecs into one
//! packet), so a batch is on io_uring one WRITE SQE per packet, all submitted together
//! by the next park; on epoll one `write` per packet.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::socket::{Binding, SharedFd};
use super::{poll, uring};

/// Reads packets from one descriptor: on io_uring one READ kept in flight (so a packet
/// that arrives while the program works is read by the kernel meanwhile), and when it
/// completes, what else is queued is drained with direct non-blocking reads before the
/// next READ goes in, so packets come out in order and a burst costs one call per packet;
/// on epoll non-blocking reads until EAGAIN.
///
/// Poll-based, so its owner can keep it between calls: a dropped read future loses no
/// packet the kernel already read.
#[derive(Default)]
pub(crate) struct PacketReader {
    in_flight: Option<uring::file::ReadOp<Vec<u8>>>,
    /// The buffer of the last read that found nothing, for the next read.
    spare: Option<Vec<u8>>,
}

impl PacketReader {
    /// Appends up to `max` packets to `out`, each read into a buffer `new_buf` gives.
    /// Ready once at least one packet was read, or with the error of the read that
    /// failed (packets read before it stay in `out`).
    pub(crate) fn poll_read(
        &mut self,
        fd: &SharedFd,
        cx: &mut Context<'_>,
        new_buf: &mut dyn FnMut() -> Vec<u8>,
        out: &mut Vec<Vec<u8>>,
        max: usize,
    ) -> Poll<io::Result<()>> {
        let max = max.max(1);
        let start = out.len();
        match fd.binding() {
            Err(err) => Poll::Ready(Err(err)),
            Ok(Binding::Poll(reg)) => loop {
                if out.len() - start >= max {
                    return Poll::Ready(Ok(()));
                }
                match reg.poll_ready(poll::Direction::Read, cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending if out.len() > start => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
                let mut buf = take_buf(&mut self.spare, new_buf);
                match poll::file::try_read(reg, fd.fd(), &mut buf) {
                    Ok(_) => out.push(buf),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        self.spare = Some(buf);
                        reg.clear_ready(poll::Direction::Read)
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) if out.len() > start => return Poll::Ready(Ok(())),
                    Err(err) => return Poll::Ready(Err(err)),
                }
            },
            Ok(Binding::Uring(driver)) => loop {
                if self.in_flight.is_none() {
                    match uring::file::read_op(driver, fd.fd(), take_buf(&mut self.spare, new_buf))
                    {
                        Ok(op) => self.in_flight = Some(op),
                        Err((err, _)) => return Poll::Ready(Err(err)),
                    }
                }
                if out.len() - start >= max {
                    return Poll::Ready(Ok(()));
                }
                let op = self.in_flight.as_mut().expect("submitted above");
                match Pin::new(op).poll(cx) {
                    Poll::Ready((completion, (_, buf))) => {
                        self.in_flight = None;
                        match uring::file::read_done(completion, buf) {
                            (Ok(_), buf) => {
                                out.push(buf);
                                drain(driver, fd, &mut self.spare, new_buf, out, start + max);
                            }
                            (Err(err), _) if err.kind() == io::ErrorKind::Interrupted => {}
                            (Err(_), _) if out.len() > start => return Poll::Ready(Ok(())),
                            (Err(err), _) => return Poll::Ready(Err(err)),
                        }
                    }
                    Poll::Pending if out.len() > start => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            },
        }
    }
}

/// The buffer a read that found nothing left, else a new one.
fn take_buf(spare: &mut Option<Vec<u8>>, new_buf: &mut dyn FnMut() -> Vec<u8>) -> Vec<u8> {
    spare.take().unwrap_or_else(new_buf)
}

/// Reads what is already queued on `fd` with direct non-blocking reads, until EAGAIN
/// or `out` holds `limit` buffers.
fn drain(
    driver: &uring::Handle,
    fd: &SharedFd,
    spare: &mut Option<Vec<u8>>,
    new_buf: &mut dyn FnMut() -> Vec<u8>,
    out: &mut Vec<Vec<u8>>,
    limit: usize,
) {
    while out.len() < limit {
        let mut buf = take_buf(spare, new_buf);
        let _ = driver.with(|d| d.count_io_call());
        match super::file_io::read_now(fd.fd(), &mut buf) {
            Ok(_) => out.push(buf),
            Err(_) => {
                *spare = Some(buf);
                return;
            }
        }
    }
}

/// What a batch of packet writes did.
#[derive(Debug, Default)]
pub(crate) struct WriteOutcome {
    /// Packets the kernel took.
    pub(crate) written: usize,
    /// Packets it refused (each write stands alone: a refused packet does not stop the
    /// ones after it).
    pub(crate) refused: usize,
    /// Why the first refused packet was refused.
    pub(crate) first_error: Option<io::Error>,
    /// Kernel operations used (SQEs or `write` calls).
    pub(crate) operations: u64,
}

impl WriteOutcome {
    fn record(&mut self, result: io::Result<usize>) {
        match result {
            Ok(_) => self.written += 1,
            Err(err) => {
                self.refused += 1;
                self.first_error.get_or_insert(err);
            }
        }
    }
}

/// Writes each buffer as one packet, in order. The misuse error (wrong runtime) comes
/// back as `Err` with nothing written.
pub(crate) async fn write_packets(
    fd: &SharedFd,
    bufs: Vec<Bytes>,
) -> (io::Result<WriteOutcome>, Vec<Bytes>) {
    let mut outcome = WriteOutcome::default();
    match fd.binding() {
        Err(err) => (Err(err), bufs),
        Ok(Binding::Poll(reg)) => {
            for buf in &bufs {
                outcome.operations += 1;
                outcome.record(poll::file::write(reg, fd.fd(), buf).await);
            }
            (Ok(outcome), bufs)
        }
        Ok(Binding::Uring(driver)) => {
            let count = bufs.len();
            let mut ops = Vec::with_capacity(count);
            let mut back = Vec::with_capacity(count);
            for buf in bufs {
                match uring::file::write_op(driver, fd.fd(), buf) {
                    Ok(op) => ops.push(op),
                    Err((err, buf)) => {
                        // Nothing more can be submitted (a full table or a misuse):
                        // wait for what was, then report the rest as refused.
                        outcome.record(Err(err));
                        back.push(buf);
                    }
                }
            }
            let refused_at_submit = std::mem::take(&mut back);
            outcome.operations += ops.len() as u64;
            for op in ops {
                let (completion, (_, buf)) = op.await;
                outcome.record(completion.and_then(|c| c.into_result()).map(|n| n as usize));
                back.push(buf);
            }
            back.extend(refused_at_submit);
            (Ok(outcome), back)
        }
    }
}
