//! Datagram operations as io_uring SQEs: the receive ring (multishot IORING_OP_RECVMSG
//! with IOSQE_BUFFER_SELECT over a provided buffer ring, Linux 6.0; incrementally
//! consumed where the kernel can, so small datagrams share a buffer), single sends
//! (IORING_OP_SEND with a destination, Linux 6.0) and batches (a linked chain of SEND
//! and SENDMSG, with a UDP_SEGMENT control message for GSO runs).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use io_uring::{opcode, types};

use super::buf_ring::BufRing;
use super::post_to::SendMsgTo;
use super::recv_tap::RecvTap;
use super::recvmsg_out::{take_filled, template, NAME_LEN, RECVMSG_OUT};
use super::{ChainOp, Completion, Handle, MultiOp, Op};
use crate::buf::IoBuf;
use crate::driver::batch::{BatchReport, Progress};
use crate::driver::buf_pool::BufPool;
use crate::driver::caps::Capability;
use crate::driver::cmsg::{SendControl, SendMeta};
use crate::driver::fd::FdRef;
use crate::driver::forward::Forwarding;
use crate::driver::gso::{
    gso_refused, link_iovecs, plan_links, settle_suspect, GsoSuspect, Link, MmsgBatch, Targets,
};
use crate::driver::posted::PostLedger;
use crate::driver::recv::{AfterRecv, RecvCounters, RecvDatagram, RingConfig};
use crate::driver::recv_mmsg::{Drained, MmsgReceiver, BURST, QUIET, QUIET_WAKES};
use crate::driver::ring_layout::{header_room, Layout, BEFORE_CONTROL};
use crate::driver::send_many::{self, SendMany};
use crate::driver::sockaddr::RawAddr;

/// Most links in one send chain: a chain must fit the submission queue.
const MAX_LINKS: usize = 256;

/// The op data of a multishot receive: the msghdr the kernel reads (name and control
/// lengths), the socket, and the pool whose ring it selects from, all kept until the
/// final CQE (see `buf_ring`'s memory-safety section).
struct RecvOp {
    fd: FdRef,
    msghdr: libc::msghdr,
    _pool: Rc<BufPool>,
}

/// How the receiver gets datagrams now.
///
/// A multishot receive keeps a wait entry on the socket for as long as it is armed, and
/// the sender's kernel path calls it for every datagram it queues: under a flood that
/// costs the sending side about a tenth of its throughput (perf, udp-recv: 12% of the
/// sending core in `sock_def_readable`'s wake-up under the wait-queue lock; recvmmsg
/// with a one-shot poll 1.55-1.58M datagrams/s against 1.40M for the multishot). So
/// the multishot serves sparse traffic, where it needs no system call per wake, and
/// bursts are drained with `recvmmsg`, which leaves no wait entry behind while it
/// keeps up.
enum Mode {
    /// The multishot RECVMSG on the kernel's buffer ring.
    Multishot,
    /// The multishot was asked to end; its last completions are still coming. Then the
    /// ring is unregistered and the buffers it held are the free list's.
    Stopping,
    /// `recvmmsg` into the pool's free list; a one-shot POLL_ADD waits for data.
    Drain,
}

/// What one step of [`Receiver::poll_recv`] came to.
enum Step {
    Continue,
    /// A completion was delivered, nothing more is queued and the waker is kept: this
    /// wake is over, as with `Pending`, without one more poll to say so.
    Drained,
    Pending,
    Failed(io::Error),
}

/// A socket's receive ring on io_uring: a multishot RECVMSG feeds datagrams into the
/// ring's buffers until the kernel ends it (then it is armed again, after a buffer has
/// come back if the ring had run dry); bursts are drained with `recvmmsg` (see
/// [`Mode`]). With [`Capability::IncrementalBuffers`] the kernel packs datagrams into
/// each buffer one after the other and keeps it until fewer than a header and the ring's
/// `capacity` bytes are left (see `buf_ring`), so every datagram still arrives whole.
pub(crate) struct Receiver {
    driver: Handle,
    pub(crate) pool: Rc<BufPool>,
    op: Option<MultiOp>,
    /// The one-shot poll of `Mode::Drain`.
    readable: Option<Op<FdRef>>,
    mode: Mode,
    /// The kernel has multishot receives and buffer rings (and they are not disabled):
    /// else the receiver stays in `Mode::Drain`.
    multishot: bool,
    mmsg: MmsgReceiver,
    control_len: usize,
    /// The last multishot ended with ENOBUFS: re-arm only once a buffer is back.
    starved: bool,
    armed_once: bool,
    /// Datagrams found since the receiver last had nothing ready.
    burst: u32,
    /// Drain wakes in a row that found few datagrams (see `QUIET`).
    quiet_wakes: u32,
    /// The multishot was asked to end (`Mode::Stopping`): the cancel is queued.
    cancel_queued: bool,
    counters: RecvCounters,
    /// While the socket forwards: the driver's side of the receive, which takes the
    /// multishot's datagrams as they are reaped (see `recv_tap`).
    tap: Option<Rc<RecvTap>>,
}

impl Receiver {
    pub(crate) fn new(driver: &Handle, config: RingConfig) -> io::Result<Receiver> {
        let caps = driver.with(|d| d.capabilities())?;
        let multishot =
            caps.contains(Capability::BufferRing) && caps.contains(Capability::MultishotRecv);
        let incremental = multishot && caps.contains(Capability::IncrementalBuffers);
        // Only what the socket asked for: every byte of it is written before every
        // datagram.
        let control_len = config.wants.control_len();
        let layout = Layout::new(&config, incremental);
        // What the kernel writes per datagram: its header, the name, the control message
        // and the payload; the slot's header room holds the first three.
        let header = RECVMSG_OUT + NAME_LEN + control_len;
        debug_assert_eq!(RECVMSG_OUT + NAME_LEN, BEFORE_CONTROL);
        debug_assert!(header <= header_room(control_len));
        let whole = header.saturating_add(layout.capacity);
        // Incrementally: the kernel fills a buffer datagram after datagram and gives it
        // up once fewer bytes are left than a header and `capacity` (min_left), so it
        // never starts a datagram it could not hold. Else one datagram per buffer, the
        // kernel offered only the bytes `recvmmsg` would take in drain mode.
        let (ring_len, min_left) = if incremental {
            (layout.stride, Some(whole))
        } else {
            (whole, None)
        };
        if ring_len > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "receive buffer too large",
            ));
        }
        let pool = if multishot {
            let pool = driver.with(|d| -> io::Result<BufPool> {
                let ring = BufRing::register(d, layout.buffers, min_left.map(|n| n as u32))?;
                BufPool::new(layout, Some((Box::new(ring), ring_len as u32, incremental)))
            })??;
            pool.fill();
            pool
        } else {
            BufPool::new(layout, None)?
        };
        Ok(Receiver {
            driver: driver.clone(),
            pool: Rc::new(pool),
            op: None,
            readable: None,
            mode: if multishot {
                Mode::Multishot
            } else {
                Mode::Drain
            },
            multishot,
            mmsg: MmsgReceiver::new(config.wants),
            control_len,
            starved: false,
            armed_once: false,
            burst: 0,
            quiet_wakes: 0,
            cancel_queued: false,
            counters: RecvCounters::default(),
            tap: None,
        })
    }

    /// What the receiver did, the forwarding driver's share included.
    pub(crate) fn counters(&self) -> RecvCounters {
        match &self.tap {
            Some(tap) => self.counters.plus(tap.counters()),
            None => self.counters,
        }
    }

    /// Forwards by `rule` inside the driver from the next multishot on (the socket's
    /// receive forwards what comes to it meanwhile), or stops (`None`). `ledger` books
    /// the forwards. Where the receiver drains with `recvmmsg` instead, the socket's
    /// receive does all of it.
    pub(crate) fn set_forwarding(
        &mut self,
        fd: &FdRef,
        rule: Option<Forwarding>,
        ledger: &Rc<PostLedger>,
    ) {
        match &self.tap {
            Some(tap) => tap.set_rule(rule),
            None if rule.is_some() && self.multishot => {
                let registered = self.driver.register_file(fd);
                self.tap = Some(RecvTap::new(
                    fd,
                    &self.pool,
                    self.control_len,
                    ledger,
                    rule,
                    registered,
                ));
            }
            None => {}
        }
    }

    /// Moves what the tap delivered into the ready queue, after what waits there (it is
    /// all older than what the receiver takes in next); a failure it met comes back.
    fn take_tapped(&mut self) -> Option<io::Error> {
        let tap = self.tap.as_ref()?;
        tap.hand_over(self.mmsg.ready_mut())
    }

    /// Goes on with a panic of the forwarding rule the driver caught, here in the
    /// calling task; what the tap delivered is in the ready queue first, so nothing is
    /// lost with it.
    pub(crate) fn raise_rule_panic(&mut self) {
        let Some(tap) = self.tap.as_ref() else {
            return;
        };
        let panic = tap.take_panic();
        if let Some(panic) = panic {
            let _ = self.take_tapped();
            std::panic::resume_unwind(panic);
        }
    }

    fn arm(&mut self, fd: &FdRef) -> io::Result<()> {
        let bgid = self
            .pool
            .bgid()
            .expect("an io_uring pool has a buffer group");
        let data = RecvOp {
            fd: fd.clone(),
            msghdr: template(self.control_len),
            _pool: self.pool.clone(),
        };
        // SAFETY: the SQE points to the boxed msghdr, owned by the op (or its parked data)
        // until the final CQE; the buffers it selects belong to the pool the same data
        // keeps alive (buf_ring's rule).
        let op = unsafe {
            MultiOp::submit(&self.driver, data, false, None, |data| {
                // MSG_TRUNC: the header's payloadlen is the datagram's real length.
                opcode::RecvMsgMulti::new(types::Fd(data.fd.raw()), &data.msghdr, bgid)
                    .flags(libc::MSG_TRUNC as u32)
                    .build()
            })?
        };
        if let Some(tap) = &self.tap {
            // Before the kernel can complete it: the SQE is only queued.
            op.set_tap(tap.clone())?;
        }
        if self.armed_once {
            self.counters.receive_restarts += 1;
        }
        self.armed_once = true;
        self.op = Some(op);
        Ok(())
    }

    pub(crate) fn poll_recv(
        &mut self,
        fd: &FdRef,
        cx: &mut Context<'_>,
        out: &mut Vec<RecvDatagram>,
        max: usize,
    ) -> Poll<io::Result<AfterRecv>> {
        let start = out.len();
        // Before anything is taken: the panic leaves every datagram where it was.
        self.raise_rule_panic();
        loop {
            if let Some(err) = self.take_tapped() {
                if out.len() == start {
                    return Poll::Ready(Err(err));
                }
            }
            // What waits in the ready queue (recvmmsg's datagrams, a completion's past
            // `max`: a GRO one may carry dozens) is older than anything received next,
            // so it goes first; the caller never gets more than `max`.
            self.mmsg
                .take_ready(out, max.saturating_sub(out.len() - start));
            if out.len() - start >= max {
                return Poll::Ready(Ok(AfterRecv::MayHaveMore));
            }
            let step = match self.mode {
                Mode::Multishot | Mode::Stopping => self.step_multishot(fd, cx, out),
                Mode::Drain => self.step_drain(fd, cx),
            };
            if out.len() - start > max {
                // A completion delivers into `out` itself, not through the ready queue:
                // one copy of each datagram fewer, into memory the caller has cached.
                // What passes `max` waits (the queue was empty: the take above had room
                // for all of it), ahead of anything received later.
                let over = out.drain(start + max..);
                self.mmsg.ready_mut().extend(over);
            }
            let got = out.len() > start || self.mmsg.has_ready();
            match step {
                Step::Continue => {}
                Step::Drained => {
                    self.mmsg
                        .take_ready(out, max.saturating_sub(out.len() - start));
                    if out.len() == start {
                        // The completion carried no datagram; the waker is kept.
                        return Poll::Pending;
                    }
                    return Poll::Ready(Ok(if self.mmsg.has_ready() {
                        AfterRecv::MayHaveMore
                    } else {
                        AfterRecv::Waiting
                    }));
                }
                // Keep the datagrams; an error is lost like a recvmmsg's error after its
                // first message (the receiver goes on).
                Step::Pending | Step::Failed(_) if got => {
                    self.mmsg
                        .take_ready(out, max.saturating_sub(out.len() - start));
                    // A pending step kept the waker; what the queue still holds (over
                    // `max`) or a dropped error leaves more to take now.
                    let waiting = matches!(step, Step::Pending) && !self.mmsg.has_ready();
                    return Poll::Ready(Ok(if waiting {
                        AfterRecv::Waiting
                    } else {
                        AfterRecv::MayHaveMore
                    }));
                }
                Step::Pending => return Poll::Pending,
                Step::Failed(err) => return Poll::Ready(Err(err)),
            }
        }
    }

    /// Every datagram received and not taken: the completions the multishot still
    /// holds (its final one is in: the caller reaped it), then the ready queue.
    pub(crate) fn take_received(&mut self) -> Vec<RecvDatagram> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        // A failure of the tap is dropped: the datagrams before and after it still count.
        let _ = self.take_tapped();
        self.mmsg.take_ready(&mut out, usize::MAX);
        if let Some(mut op) = self.op.take() {
            while let Poll::Ready(Ok(Some(completion))) = op.poll_next(&mut cx) {
                // A failed completion carries no datagram; the rest still count.
                let _ = self.complete(completion, &mut out);
            }
        }
        out
    }

    /// One multishot completion (or the arming, or the end of a stopping multishot).
    fn step_multishot(
        &mut self,
        fd: &FdRef,
        cx: &mut Context<'_>,
        out: &mut Vec<RecvDatagram>,
    ) -> Step {
        if self.op.is_none() {
            if matches!(self.mode, Mode::Stopping) {
                self.enter_drain();
                return Step::Continue;
            }
            if self.starved && self.pool.available() == 0 {
                // Every buffer is lent: the kernel keeps datagrams in the socket's
                // queue meanwhile (and counts what overflows it).
                self.pool.wait_for_buffer(cx.waker());
                return Step::Pending;
            }
            self.starved = false;
            if let Err(err) = self.arm(fd) {
                return Step::Failed(err);
            }
        }
        let op = self.op.as_mut().expect("armed above");
        match op.poll_next_keeping_waker(cx) {
            Poll::Ready(Err(misuse)) => Step::Failed(misuse),
            Poll::Ready(Ok(Some((completion, kept)))) => {
                let before = self.counters.datagrams;
                let result = self.complete(completion, out);
                self.count_found(before);
                match result {
                    // Every completion there was is taken: a lone datagram costs one
                    // poll, not a second one that would only find the queue empty.
                    Ok(()) if kept => {
                        self.end_multishot_wake();
                        Step::Drained
                    }
                    Ok(()) => Step::Continue,
                    Err(err) => Step::Failed(err),
                }
            }
            Poll::Ready(Ok(None)) => {
                // Ended by the kernel (the ring ran dry, say) in the middle of a burst:
                // drain instead of arming it again.
                self.op = None;
                self.switch_on_burst();
                Step::Continue
            }
            Poll::Pending => {
                self.end_multishot_wake();
                Step::Pending
            }
        }
    }

    /// Nothing more was queued on the running multishot: after a burst it is cancelled
    /// (the receiver moves on to `recvmmsg`), as it is while stopping.
    fn end_multishot_wake(&mut self) {
        let stop = self.switch_on_burst();
        if stop || (matches!(self.mode, Mode::Stopping) && !self.cancel_queued) {
            if let Some(op) = &self.op {
                // Asked again on a later wake if the submission queue was full.
                self.cancel_queued = op.cancel();
            }
        }
    }

    /// Ends a wake of the multishot (nothing more was ready, or it ended): after a burst,
    /// the receiver moves on to `recvmmsg`. True when it did.
    fn switch_on_burst(&mut self) -> bool {
        let burst = std::mem::take(&mut self.burst);
        if matches!(self.mode, Mode::Multishot) && burst >= BURST {
            self.mode = Mode::Stopping;
            self.cancel_queued = false;
            return true;
        }
        false
    }

    /// Adds the datagrams delivered since the counter read `before` to this wake's.
    fn count_found(&mut self, before: u64) {
        let found = (self.counters.datagrams - before).min(u32::MAX as u64) as u32;
        self.burst = self.burst.saturating_add(found);
    }

    /// The multishot is over, so nothing selects from the ring any more: the buffers it
    /// held go to the free list for `recvmmsg`. If the kernel refuses, the multishot is
    /// armed again.
    fn enter_drain(&mut self) {
        debug_assert!(self.op.is_none(), "the multishot must be over");
        let pool = &self.pool;
        // SAFETY: the multishot, the only operation that selects from this pool's ring,
        // has posted its final CQE (`op` is None in Mode::Stopping).
        let detached = self
            .driver
            .with(|d| unsafe { pool.detach_ring(|ring: &BufRing| ring.unregister(d)) });
        self.mode = match detached {
            Ok(Ok(())) => {
                self.counters.bursts_drained += 1;
                Mode::Drain
            }
            _ => Mode::Multishot,
        };
        self.burst = 0;
        self.quiet_wakes = 0;
    }

    /// Back to the multishot: the free list goes onto the ring, registered again. If the
    /// kernel refuses, the receiver stays with `recvmmsg`.
    fn leave_drain(&mut self) -> bool {
        if !self.multishot {
            return false;
        }
        let pool = &self.pool;
        let attached = self
            .driver
            .with(|d| pool.attach_ring(|ring: &BufRing| ring.register_again(d)));
        self.quiet_wakes = 0;
        self.burst = 0;
        if matches!(attached, Ok(Ok(()))) {
            self.mode = Mode::Multishot;
            self.starved = false;
            true
        } else {
            false
        }
    }

    /// One `recvmmsg`, or the wait for the socket to become readable.
    fn step_drain(&mut self, fd: &FdRef, cx: &mut Context<'_>) -> Step {
        if let Some(readable) = self.readable.as_mut() {
            match Pin::new(readable).poll(cx) {
                Poll::Ready((Err(misuse), _)) => {
                    self.readable = None;
                    return Step::Failed(misuse);
                }
                // Whatever the poll reported (readable, an error condition), the next
                // recvmmsg tells.
                Poll::Ready((Ok(_), _)) => self.readable = None,
                Poll::Pending => return Step::Pending,
            }
        }
        let before = self.counters.datagrams;
        let drained = self.mmsg.receive(fd.raw(), &self.pool, &mut self.counters);
        if !matches!(drained, Ok(Drained::NoBuffers)) {
            let _ = self.driver.with(|d| d.count_io_call());
        }
        self.count_found(before);
        match drained {
            Ok(Drained::More) => {
                self.starved = false;
                Step::Continue
            }
            Ok(Drained::Empty) => {
                self.starved = false;
                // The socket is empty: this wake is over.
                if std::mem::take(&mut self.burst) < QUIET {
                    self.quiet_wakes += 1;
                } else {
                    self.quiet_wakes = 0;
                }
                if self.quiet_wakes >= QUIET_WAKES && self.leave_drain() {
                    return Step::Continue;
                }
                match poll_readable(&self.driver, fd) {
                    Ok(op) => {
                        self.readable = Some(op);
                        Step::Continue
                    }
                    Err(err) => Step::Failed(err),
                }
            }
            Ok(Drained::NoBuffers) => {
                if !self.starved {
                    self.counters.ring_empty += 1;
                    self.starved = true;
                }
                self.pool.wait_for_buffer(cx.waker());
                Step::Pending
            }
            Err(err) => Step::Failed(err),
        }
    }

    /// Delivers the datagram a multishot completion carries into `out`.
    fn complete(&mut self, completion: Completion, out: &mut Vec<RecvDatagram>) -> io::Result<()> {
        match completion.into_result() {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => {
                // The ring ran dry; the multishot has ended (no IORING_CQE_F_MORE).
                self.counters.ring_empty += 1;
                self.starved = true;
                self.pool.ran_dry();
                return Ok(());
            }
            // The multishot was cancelled: Mode::Stopping goes on to recvmmsg next.
            Err(err) if err.raw_os_error() == Some(libc::ECANCELED) => return Ok(()),
            Err(err) => return Err(err),
        }
        take_filled(
            &self.pool,
            self.control_len,
            completion,
            &mut self.counters,
            out,
        )
    }
}

/// A one-shot IORING_OP_POLL_ADD for POLLIN: completes once the socket is readable, and
/// leaves no wait entry on it afterwards.
fn poll_readable(driver: &Handle, fd: &FdRef) -> io::Result<Op<FdRef>> {
    // SAFETY: a poll points to no memory; the op keeps the descriptor open.
    let op = unsafe {
        Op::submit(driver, fd.clone(), |fd| {
            opcode::PollAdd::new(types::Fd(fd.raw()), libc::POLLIN as u32).build()
        })
    };
    op.map_err(|(err, _)| err)
}

/// A one-shot IORING_OP_POLL_ADD for POLLOUT: completes once the socket's send buffer
/// has room again.
fn poll_writable(driver: &Handle, fd: &FdRef) -> io::Result<Op<FdRef>> {
    // SAFETY: a poll points to no memory; the op keeps the descriptor open.
    let op = unsafe {
        Op::submit(driver, fd.clone(), |fd| {
            opcode::PollAdd::new(types::Fd(fd.raw()), libc::POLLOUT as u32).build()
        })
    };
    op.map_err(|(err, _)| err)
}

/// See [`crate::driver::ops_datagram::send_many`]: `sendmmsg` straight from the task
/// (one call per batch while the send buffer has room; measured faster than a linked
/// chain, see `mmsg_first`), and a one-shot POLLOUT while it is full.
pub(crate) async fn send_many<B: AsRef<[u8]>>(
    driver: &Handle,
    fd: &FdRef,
    mut many: SendMany<B>,
) -> io::Result<SendMany<B>> {
    loop {
        match many.step(fd.raw()) {
            send_many::Step::Done => return Ok(many),
            send_many::Step::Progress => {
                driver.with(|d| d.count_io_call())?;
            }
            send_many::Step::WouldBlock => {
                driver.with(|d| d.count_io_call())?;
                let (polled, _) = poll_writable(driver, fd)?.await;
                polled.and_then(Completion::into_result)?;
            }
        }
    }
}

/// One datagram to `addr`, or to the connected peer: IORING_OP_SEND (with a destination
/// it is a sendto, Linux 6.0), or SENDMSG with the address in its header where the kernel
/// lacks [`Capability::SendTo`] or `meta` attaches control messages.
pub(crate) async fn send_to<B: IoBuf>(
    driver: &Handle,
    fd: &FdRef,
    buf: B,
    addr: Option<SocketAddr>,
    meta: &SendMeta,
) -> (io::Result<usize>, B) {
    let send_to = match driver.with(|d| d.capabilities().contains(Capability::SendTo)) {
        Ok(send_to) => send_to,
        Err(misuse) => return (Err(misuse), buf),
    };
    if (addr.is_some() && !send_to) || !meta.is_empty() {
        return send_msg_to(driver, fd, buf, addr, meta).await;
    }
    let data = (fd.clone(), buf, addr.map(RawAddr::from_socket_addr));
    // SAFETY: the SQE points into the buffer (stable memory, IoBuf's contract) and the
    // boxed address, both owned by the op.
    let op = unsafe {
        Op::submit(driver, data, |(fd, buf, addr)| {
            let len = buf.bytes_init().min(u32::MAX as usize) as u32;
            let mut send = opcode::Send::new(types::Fd(fd.raw()), buf.stable_ptr(), len)
                .flags(libc::MSG_NOSIGNAL);
            if let Some(addr) = addr {
                send = send.dest_addr(addr.as_ptr()).dest_addr_len(addr.len);
            }
            send.build()
        })
    };
    match op {
        Ok(op) => {
            let (completion, (_, buf, _)) = op.await;
            let sent = completion.and_then(Completion::into_result);
            (sent.map(|n| n as usize), buf)
        }
        Err((err, (_, buf, _))) => (Err(err), buf),
    }
}

/// [`send_to`] as SENDMSG: for kernels without a destination on SEND, and for control
/// messages.
async fn send_msg_to<B: IoBuf>(
    driver: &Handle,
    fd: &FdRef,
    buf: B,
    addr: Option<SocketAddr>,
    meta: &SendMeta,
) -> (io::Result<usize>, B) {
    let data = SendMsgTo::new(fd, buf, addr, meta);
    // SAFETY: the header points at the iovec and address in the boxed data, and the iovec
    // at the buffer's stable memory (IoBuf's contract); the op owns all of it.
    let op = unsafe { Op::submit(driver, data, |data| data.entry(libc::MSG_NOSIGNAL)) };
    match op {
        Ok(op) => {
            let (completion, data) = op.await;
            let sent = completion.and_then(Completion::into_result);
            (sent.map(|n| n as usize), data.buf)
        }
        Err((err, data)) => (Err(err), data.buf),
    }
}

/// The data of one send chain, built whole before it is boxed: the iovecs point into
/// the Bytes' heap memory, the headers into the iovec, control and address heap
/// allocations, so moving this struct moves nothing the kernel reads.
struct SendChain {
    fd: FdRef,
    bufs: Vec<Bytes>,
    links: Vec<Link>,
    /// Read by the kernel through `headers`.
    #[allow(dead_code)]
    iovecs: Vec<libc::iovec>,
    /// Read by the kernel through `headers`.
    #[allow(dead_code)]
    controls: Vec<SendControl>,
    /// One per link that carries control data (a GSO run, or metadata); None for plain
    /// single datagrams, which use SEND.
    headers: Vec<Option<libc::msghdr>>,
    addr: Box<Option<RawAddr>>,
}

impl SendChain {
    fn new(
        fd: FdRef,
        bufs: Vec<Bytes>,
        links: Vec<Link>,
        dest: Option<SocketAddr>,
        meta: &SendMeta,
        send_to: bool,
    ) -> SendChain {
        let mut addr = Box::new(dest.map(RawAddr::from_socket_addr));
        // A SEND names a destination only where the kernel has Capability::SendTo.
        let addressed_send = dest.is_none() || send_to;
        let needs_header =
            |link: &Link| link.segment.is_some() || !meta.is_empty() || !addressed_send;
        let msg_links = links.iter().filter(|link| needs_header(link));
        let (iovecs, counts) = link_iovecs(&bufs, msg_links);
        let mut counts = counts.into_iter();
        let controls: Vec<SendControl> = links
            .iter()
            .filter(|link| needs_header(link))
            .map(|link| SendControl::new(meta, link.segment))
            .collect();
        let mut headers = Vec::with_capacity(links.len());
        let (mut iov_at, mut control_at) = (0, 0);
        for link in &links {
            if !needs_header(link) {
                headers.push(None);
                continue;
            }
            // SAFETY: msghdr is plain old data; zero is its empty value.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            let count = counts.next().unwrap_or(0);
            header.msg_iov = iovecs[iov_at..].as_ptr() as *mut libc::iovec;
            header.msg_iovlen = count;
            header.msg_control = controls[control_at].as_ptr();
            header.msg_controllen = controls[control_at].len();
            if let Some(addr) = addr.as_mut() {
                header.msg_name = addr.as_mut_ptr().cast();
                header.msg_namelen = addr.len;
            }
            iov_at += count;
            control_at += 1;
            headers.push(Some(header));
        }
        SendChain {
            fd,
            bufs,
            links,
            iovecs,
            controls,
            headers,
            addr,
        }
    }
}

/// See [`crate::driver::ops_datagram::send_batch`]: a linked chain per round (IO_LINK
/// keeps the datagrams in order even when one has to wait for send-buffer space).
/// Tries one non-blocking `sendmmsg` of every link; the number of links sent, or `None`
/// when it sent nothing (a full buffer, an error the chain will report properly).
///
/// Measured (udp-batch, 64 datagrams of mixed sizes per flush, 172 B average): a linked
/// chain of one SEND per datagram ran at about 245k datagrams/s, the unlinked io_uring
/// peer at 316k, and sendmmsg (the epoll driver's path) at 314-339k. With 64 datagrams
/// of 1400 B per flush (two GSO sends), the chain took two `io_uring_enter` per batch
/// and ran at 0.72-1.13M datagrams/s; one sendmmsg, one call, at 1.20-1.28M.
fn mmsg_first(
    driver: &Handle,
    fd: &FdRef,
    bufs: &[Bytes],
    links: &[Link],
    targets: &Targets<'_>,
    report: &mut BatchReport,
) -> Option<usize> {
    let mut batch = MmsgBatch::new(bufs, links, targets);
    let result = batch.send(fd.raw(), 0);
    report.operations += 1;
    let _ = driver.with(|d| d.count_io_call());
    match result {
        Ok(sent) if sent > 0 => Some(sent.min(links.len())),
        _ => None,
    }
}

pub(crate) async fn send_batch(
    driver: &Handle,
    fd: &FdRef,
    mut bufs: Vec<Bytes>,
    dest: Option<SocketAddr>,
    meta: &SendMeta,
    gso: &Cell<bool>,
    report: &mut BatchReport,
) -> (io::Result<()>, Progress, Vec<Bytes>) {
    let mut progress = Progress::default();
    let mut rounds = 0u64;
    let targets = Targets::One(dest, *meta);
    let mut suspect: Option<GsoSuspect> = None;
    // A chain goes into the submission queue whole: never longer than the queue.
    let (max_links, send_to) =
        match driver.with(|d| (d.max_chain(), d.capabilities().contains(Capability::SendTo))) {
            Ok((queue, send_to)) => (MAX_LINKS.min(queue).max(1), send_to),
            Err(err) => return (Err(err), progress, bufs),
        };
    while progress.first < bufs.len() {
        if rounds > 0 {
            report.short_send_recoveries += 1;
        }
        rounds += 1;
        settle_suspect(&mut suspect, progress.first, gso);
        let use_gso = gso.get() && suspect.is_none();
        let links = plan_links(&bufs, progress.first, use_gso, max_links, &targets);
        if rounds == 1 && links.len() > 1 {
            // More than one send: datagrams of mixed sizes, which cannot share a GSO send,
            // or a run longer than one GSO send takes. A linked chain costs more than the
            // kernel's own batch call: each link after the first is issued from task
            // work, one more io_uring_enter (see mmsg_first). What sendmmsg could not
            // take goes on as a chain.
            if let Some(sent) = mmsg_first(driver, fd, &bufs, &links, &targets, report) {
                let last = links[sent - 1];
                progress.first = last.first + last.count;
                continue;
            }
        }
        let chain = SendChain::new(fd.clone(), bufs, links, dest, meta, send_to);
        // SAFETY: every SQE points into the chain's data (see SendChain), which the
        // ChainOp owns until each link's CQE.
        let op = unsafe {
            ChainOp::submit(driver, chain, |chain| {
                chain
                    .links
                    .iter()
                    .zip(&chain.headers)
                    .map(|(link, header)| match header {
                        Some(header) => opcode::SendMsg::new(types::Fd(chain.fd.raw()), header)
                            .flags(libc::MSG_NOSIGNAL as u32)
                            .build(),
                        None => {
                            let buf = &chain.bufs[link.first];
                            let mut send = opcode::Send::new(
                                types::Fd(chain.fd.raw()),
                                buf.as_ptr(),
                                buf.len() as u32,
                            )
                            .flags(libc::MSG_NOSIGNAL);
                            if let Some(addr) = chain.addr.as_ref() {
                                send = send.dest_addr(addr.as_ptr()).dest_addr_len(addr.len);
                            }
                            send.build()
                        }
                    })
                    .collect()
            })
        };
        let (completions, chain) = match op {
            Ok(op) => op.await,
            Err((err, chain)) => return (Err(err), progress, chain.bufs),
        };
        bufs = chain.bufs;
        let completions = match completions {
            Ok(completions) => completions,
            Err(misuse) => return (Err(misuse), progress, bufs),
        };
        report.operations += completions.len() as u64;
        let before = progress.first;
        let mut fell_back = false;
        for (link, completion) in chain.links.iter().zip(completions) {
            match completion.into_result() {
                Ok(_) => progress.first = link.first + link.count,
                // Cut after an earlier link failed or was refused: resubmit from here.
                Err(err) if err.raw_os_error() == Some(libc::ECANCELED) => break,
                Err(err) if link.segment.is_some() && gso_refused(&err) => {
                    // Perhaps GSO was refused: go on without it, from this link.
                    suspect = Some(GsoSuspect::new(link));
                    fell_back = true;
                    break;
                }
                Err(err) => return (Err(err), progress, bufs),
            }
        }
        if progress.first == before && !fell_back {
            // Cancelled from outside with nothing sent: do not spin.
            return (
                Err(io::Error::from_raw_os_error(libc::ECANCELED)),
                progress,
                bufs,
            );
        }
    }
    settle_suspect(&mut suspect, progress.first, gso);
    (Ok(()), progress, bufs)
}
