//! Datagram operations on the epoll engine: `recvmmsg` into the receive pool's buffers,
//! `sendto`, and `sendmmsg` batches (GSO runs as one message each).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::{Direction, Registration};
use crate::buf::IoBuf;
use crate::driver::batch::{BatchReport, Progress};
use crate::driver::buf_pool::BufPool;
use crate::driver::cmsg::{SendControl, SendMeta};
use crate::driver::fd::FdRef;
use crate::driver::gso::{gso_refused, plan_links, settle_suspect, GsoSuspect, MmsgBatch, Targets};
use crate::driver::posted::PostLedger;
use crate::driver::recv::{AfterRecv, RecvCounters, RecvDatagram, RingConfig};
use crate::driver::recv_mmsg::{Drained, MmsgReceiver, BURST, QUIET, QUIET_WAKES};
use crate::driver::ring_layout::Layout;
use crate::driver::send_many::{self, SendMany};
use crate::driver::sockaddr::RawAddr;

/// Most messages one `sendmmsg` takes (UIO_MAXIOV).
const SEND_SLOTS: usize = 1024;
fn check(result: isize) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as usize)
    }
}

/// A socket's receive ring on epoll: the same pool of lent buffers as on io_uring, one
/// datagram per buffer, filled by `recvmmsg` up to 64 at a time.
pub(crate) struct Receiver {
    pub(crate) pool: Rc<BufPool>,
    mmsg: MmsgReceiver,
    starved: bool,
    /// Datagrams since the socket was last found empty.
    burst: u32,
    /// Wakes find bursts: the socket leaves the epoll set while it is drained (see
    /// [`suspend_events`]), as the io_uring receiver leaves its multishot.
    bursty: bool,
    /// Quiet wakes in a row (see `QUIET`).
    quiet_wakes: u32,
    pub(crate) counters: RecvCounters,
}

impl Receiver {
    pub(crate) fn new(config: RingConfig) -> io::Result<Receiver> {
        let pool = BufPool::new(Layout::new(&config, false), None)?;
        Ok(Receiver {
            pool: Rc::new(pool),
            mmsg: MmsgReceiver::new(config.wants),
            starved: false,
            burst: 0,
            bursty: false,
            quiet_wakes: 0,
            counters: RecvCounters::default(),
        })
    }

    pub(crate) fn poll_recv(
        &mut self,
        reg: &Registration,
        fd: &FdRef,
        cx: &mut Context<'_>,
        out: &mut Vec<RecvDatagram>,
        max: usize,
    ) -> Poll<io::Result<AfterRecv>> {
        let start = out.len();
        loop {
            self.mmsg
                .take_ready(out, max.saturating_sub(out.len() - start));
            let got = out.len() > start;
            if out.len() - start >= max {
                return Poll::Ready(Ok(AfterRecv::MayHaveMore));
            }
            match reg.poll_ready(Direction::Read, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => {
                    return Poll::Ready(if got {
                        Ok(AfterRecv::MayHaveMore)
                    } else {
                        Err(err)
                    })
                }
                // Everything ready was taken (the caller's `max` was not met) and the
                // registration keeps the waker.
                Poll::Pending => {
                    return if got {
                        Poll::Ready(Ok(AfterRecv::Waiting))
                    } else {
                        Poll::Pending
                    }
                }
            }
            if self.bursty {
                reg.suspend_events();
            }
            let before = self.counters.datagrams;
            let drained = self.mmsg.receive(fd.raw(), &self.pool, &mut self.counters);
            if !matches!(drained, Ok(Drained::NoBuffers)) {
                reg.count_io_call();
            }
            let found = (self.counters.datagrams - before).min(u32::MAX as u64) as u32;
            self.burst = self.burst.saturating_add(found);
            match drained {
                Ok(Drained::More) => self.starved = false,
                Ok(Drained::Empty) => {
                    self.starved = false;
                    self.end_wake();
                    // A datagram arriving from now on raises a new edge, which the next
                    // epoll_wait reports.
                    reg.clear_ready(Direction::Read);
                }
                Ok(Drained::NoBuffers) => {
                    // Every buffer is lent: datagrams wait in the socket's queue meanwhile.
                    if !self.starved {
                        self.counters.ring_empty += 1;
                        self.starved = true;
                    }
                    self.pool.wait_for_buffer(cx.waker());
                    return if got {
                        Poll::Ready(Ok(AfterRecv::Waiting))
                    } else {
                        Poll::Pending
                    };
                }
                Err(err) => {
                    return Poll::Ready(if got {
                        Ok(AfterRecv::MayHaveMore)
                    } else {
                        Err(err)
                    })
                }
            }
        }
    }
}

impl Receiver {
    /// Every datagram received and not taken (read by a `recvmmsg` beyond what the
    /// caller took then).
    pub(crate) fn take_received(&mut self) -> Vec<RecvDatagram> {
        let mut out = Vec::new();
        self.mmsg.take_ready(&mut out, usize::MAX);
        out
    }

    /// The socket was found empty: judges the wake that ends here.
    fn end_wake(&mut self) {
        let burst = std::mem::take(&mut self.burst);
        if burst >= BURST {
            if !self.bursty {
                self.counters.bursts_drained += 1;
            }
            self.bursty = true;
            self.quiet_wakes = 0;
        } else if burst < QUIET && self.bursty {
            self.quiet_wakes += 1;
            if self.quiet_wakes >= QUIET_WAKES {
                // Back in the epoll set: the standing wait starts again.
                self.counters.receive_restarts += 1;
                self.bursty = false;
                self.quiet_wakes = 0;
            }
        } else {
            self.quiet_wakes = 0;
        }
    }
}

/// One datagram to `addr`, or to the connected peer (`sendto`; `sendmsg` when `meta`
/// attaches control messages).
pub(crate) async fn send_to<B: IoBuf>(
    reg: &Registration,
    fd: &FdRef,
    buf: B,
    addr: Option<SocketAddr>,
    meta: &SendMeta,
) -> (io::Result<usize>, B) {
    if !meta.is_empty() {
        return send_msg_to(reg, fd, buf, addr, meta).await;
    }
    let raw = addr.map(RawAddr::from_socket_addr);
    let result = reg
        .retry(Direction::Write, || send_now(fd, &buf, raw.as_ref()))
        .await;
    (result, buf)
}

/// One non-blocking `sendto` of `buf` to `to` (or to the connected peer).
fn send_now<B: IoBuf>(fd: &FdRef, buf: &B, to: Option<&RawAddr>) -> io::Result<usize> {
    let (name, name_len) = match to {
        Some(raw) => (raw.as_ptr(), raw.len),
        None => (std::ptr::null(), 0),
    };
    // SAFETY: reads `bytes_init` initialised bytes of a live buffer and, when given, a
    // valid sockaddr of `name_len` bytes.
    let n = unsafe {
        libc::sendto(
            fd.raw(),
            buf.stable_ptr().cast(),
            buf.bytes_init(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            name,
            name_len,
        )
    };
    check(n)
}

/// Posts `buf` as one datagram to `addr`, nobody waiting for it: one direct `sendto`
/// now, its result booked in `ledger`. A full send buffer is a drop, not a wait (as on
/// io_uring, whose posted send carries MSG_DONTWAIT).
pub(crate) fn post_to<B: IoBuf>(
    reg: &Registration,
    fd: &FdRef,
    buf: B,
    addr: SocketAddr,
    ledger: &PostLedger,
) -> Result<(), (io::Error, B)> {
    // Also the check that this driver runs the thread: the call goes out now.
    if let Err(err) = reg.driver().with(|d| d.stats.io_calls += 1) {
        return Err((err, buf));
    }
    let raw = RawAddr::from_socket_addr(addr);
    ledger.settle_io(send_now(fd, &buf, Some(&raw)));
    Ok(())
}

/// Posts `bufs` as datagrams to `addr`, nobody waiting for them: runs of equal lengths
/// as GSO sends, all in `sendmmsg` calls now, each datagram's result booked in `ledger`
/// (which holds no place for them). A full send buffer drops the rest; a GSO send
/// refused for a reason GSO may cause sends its datagrams one by one, and the socket's
/// posts go one by one from then on.
pub(crate) fn post_many_to<B: IoBuf + AsRef<[u8]>>(
    reg: &Registration,
    fd: &FdRef,
    bufs: &[B],
    addr: SocketAddr,
    ledger: &PostLedger,
) -> io::Result<()> {
    // Also the check that this driver runs the thread: the calls go out now.
    reg.driver().with(|_| ())?;
    let targets = Targets::One(Some(addr), SendMeta::default());
    let links = plan_links(bufs, 0, !ledger.gso_refused(), usize::MAX, &targets);
    let mut batch = MmsgBatch::new(bufs, &links, &targets);
    let mut at = 0;
    while at < links.len() {
        let _ = reg.driver().with(|d| d.stats.io_calls += 1);
        let sent = match batch.send(fd.raw(), at) {
            // The kernel takes at least one message or fails: none is as a full buffer.
            Ok(0) => Err(io::Error::from(io::ErrorKind::WouldBlock)),
            sent => sent,
        };
        match sent {
            Ok(sent) => {
                for link in &links[at..at + sent] {
                    (0..link.count).for_each(|_| ledger.count_sent());
                }
                at += sent;
            }
            Err(err) => {
                let link = links[at];
                if err.kind() == io::ErrorKind::WouldBlock {
                    // No room: the rest is dropped, as a post never waits.
                    let rest: usize = links[at..].iter().map(|link| link.count).sum();
                    (0..rest).for_each(|_| ledger.count_unsent(libc::EAGAIN));
                    return Ok(());
                }
                if link.count > 1 && gso_refused(&err) {
                    ledger.note_gso_refused();
                    let raw = RawAddr::from_socket_addr(addr);
                    for buf in &bufs[link.first..link.first + link.count] {
                        match send_now(fd, buf, Some(&raw)) {
                            Ok(_) => ledger.count_sent(),
                            Err(err) => {
                                ledger.count_unsent(err.raw_os_error().unwrap_or(libc::EIO))
                            }
                        }
                    }
                } else {
                    let errno = err.raw_os_error().unwrap_or(libc::EIO);
                    (0..link.count).for_each(|_| ledger.count_unsent(errno));
                }
                at += 1;
            }
        }
    }
    Ok(())
}

/// [`send_to`] with control messages, as one `sendmsg`.
async fn send_msg_to<B: IoBuf>(
    reg: &Registration,
    fd: &FdRef,
    buf: B,
    addr: Option<SocketAddr>,
    meta: &SendMeta,
) -> (io::Result<usize>, B) {
    let mut raw = addr.map(RawAddr::from_socket_addr);
    let control = SendControl::new(meta, None);
    let result = reg
        .retry(Direction::Write, || {
            let mut iovec = libc::iovec {
                iov_base: buf.stable_ptr() as *mut libc::c_void,
                iov_len: buf.bytes_init(),
            };
            // SAFETY: msghdr is plain old data; zero is its empty value.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_iov = &mut iovec;
            header.msg_iovlen = 1;
            if let Some(raw) = raw.as_mut() {
                header.msg_name = raw.as_mut_ptr().cast();
                header.msg_namelen = raw.len;
            }
            header.msg_control = control.as_ptr();
            header.msg_controllen = control.len();
            // SAFETY: the header points at the live iovec over `bytes_init` initialised
            // bytes, the address and the control data above, all alive for the call.
            let n = unsafe {
                libc::sendmsg(fd.raw(), &header, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            };
            check(n)
        })
        .await;
    (result, buf)
}

/// See [`crate::driver::ops_datagram::send_many`]: `sendmmsg` when the socket is
/// writable, again after each readiness edge while its send buffer is full.
pub(crate) async fn send_many<B: AsRef<[u8]>>(
    reg: &Registration,
    fd: &FdRef,
    mut many: SendMany<B>,
) -> io::Result<SendMany<B>> {
    loop {
        let step = reg
            .retry(Direction::Write, || match many.step(fd.raw()) {
                send_many::Step::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
                step => Ok(step),
            })
            .await?;
        if step == send_many::Step::Done {
            return Ok(many);
        }
    }
}

/// See [`crate::driver::ops_datagram::send_batch`]: `sendmmsg` calls of up to 1024
/// messages, each a datagram or a GSO run.
pub(crate) async fn send_batch(
    reg: &Registration,
    fd: &FdRef,
    bufs: Vec<Bytes>,
    dest: Option<SocketAddr>,
    meta: &SendMeta,
    gso: &Cell<bool>,
    report: &mut BatchReport,
) -> (io::Result<()>, Progress, Vec<Bytes>) {
    let mut progress = Progress::default();
    let mut rounds = 0u64;
    let targets = Targets::One(dest, *meta);
    let mut suspect: Option<GsoSuspect> = None;
    'plan: while progress.first < bufs.len() {
        if rounds > 0 {
            report.short_send_recoveries += 1;
        }
        rounds += 1;
        settle_suspect(&mut suspect, progress.first, gso);
        let use_gso = gso.get() && suspect.is_none();
        let links = plan_links(&bufs, progress.first, use_gso, SEND_SLOTS, &targets);
        let mut batch = MmsgBatch::new(&bufs, &links, &targets);
        let mut at = 0;
        while at < batch.len() {
            let result = reg
                .retry(Direction::Write, || batch.send(fd.raw(), at))
                .await;
            report.operations += 1;
            match result {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), progress, bufs),
                Ok(sent) => {
                    let sent = sent.min(links.len() - at);
                    let last = links[at + sent - 1];
                    progress.first = last.first + last.count;
                    at += sent;
                }
                Err(err) if links[at].segment.is_some() && gso_refused(&err) => {
                    suspect = Some(GsoSuspect::new(&links[at]));
                    continue 'plan;
                }
                Err(err) => return (Err(err), progress, bufs),
            }
        }
        drop(batch);
    }
    settle_suspect(&mut suspect, progress.first, gso);
    (Ok(()), progress, bufs)
}
