//! The datagram operations of the driver contract, dispatched to the engine the socket
//! belongs to: a receive ring (multishot RECVMSG over a provided buffer ring on
//! io_uring, `recvmmsg` into a buffer pool on epoll), single sends, and batched sends
//! (a linked chain of SEND/SENDMSG on io_uring, `sendmmsg` on epoll; UDP GSO for runs of
//! equal-sized datagrams on both).

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::batch::{BatchReport, Progress};
use super::buf_pool::BufPool;
pub(crate) use super::cmsg::{monotonic_ns, RecvWants, SendMeta};
pub(crate) use super::forward::Forwarding;
pub(crate) use super::gso::{MAX_UDP_PAYLOAD_V4, MAX_UDP_PAYLOAD_V6};
pub(crate) use super::posted::PostLedger;
pub(crate) use super::recv::{
    AfterRecv, Carried, RecvCounters, RecvDatagram, RecvMeta, RingConfig, UDP_GRO,
};
pub(crate) use super::ring_layout::ring_memory;
use super::send_many::SendMany;
pub(crate) use super::sockaddr::{canonical, for_family};
use super::socket::{Binding, SharedFd};
use super::{poll, uring};
use crate::buf::IoBuf;

/// The receiving side of one datagram socket, on the current engine.
pub(crate) enum Receiver {
    Uring(uring::datagram::Receiver),
    Poll(poll::datagram::Receiver),
}

impl Receiver {
    /// A receiver for `fd` on the driver it belongs to.
    pub(crate) fn new(fd: &SharedFd, config: RingConfig) -> io::Result<Receiver> {
        match fd.binding()? {
            Binding::Uring(driver) => {
                uring::datagram::Receiver::new(driver, config).map(Receiver::Uring)
            }
            Binding::Poll(_) => poll::datagram::Receiver::new(config).map(Receiver::Poll),
        }
    }

    /// Moves up to `max` received datagrams into `out`. Ready once at least one arrived
    /// (or with an error concerning this attempt only); the receiver goes on afterwards.
    /// With datagrams, it also says whether the receiver now waits with `cx`'s waker
    /// (a caller polling many sockets need not poll this one again until it wakes).
    pub(crate) fn poll_recv(
        &mut self,
        fd: &SharedFd,
        cx: &mut Context<'_>,
        out: &mut Vec<RecvDatagram>,
        max: usize,
    ) -> Poll<io::Result<AfterRecv>> {
        let binding = match fd.binding() {
            Ok(binding) => binding,
            Err(err) => return Poll::Ready(Err(err)),
        };
        match (self, binding) {
            (Receiver::Uring(receiver), Binding::Uring(_)) => {
                receiver.poll_recv(fd.fd(), cx, out, max.max(1))
            }
            (Receiver::Poll(receiver), Binding::Poll(reg)) => {
                receiver.poll_recv(reg, fd.fd(), cx, out, max.max(1))
            }
            _ => unreachable!("a receiver is made for the driver its socket is bound to"),
        }
    }

    /// Every datagram received and not yet taken, for a socket leaving this runtime:
    /// call once its operations were cancelled and reaped (`SharedFd::detach`), so every
    /// completion is in. The receiver receives nothing more.
    pub(crate) fn take_received(&mut self) -> Vec<RecvDatagram> {
        match self {
            Receiver::Uring(receiver) => receiver.take_received(),
            Receiver::Poll(receiver) => receiver.take_received(),
        }
    }

    pub(crate) fn counters(&self) -> RecvCounters {
        match self {
            Receiver::Uring(receiver) => receiver.counters(),
            Receiver::Poll(receiver) => receiver.counters,
        }
    }

    /// Goes on with a panic of the forwarding rule that the io_uring driver caught, in
    /// the calling task (elsewhere the rule runs in the task and panics there).
    pub(crate) fn raise_rule_panic(&mut self) {
        if let Receiver::Uring(receiver) = self {
            receiver.raise_rule_panic();
        }
    }

    /// Tells the receiver the socket's forwarding rule (`None`: it stopped). The io_uring
    /// receiver then forwards inside the driver, as it reaps the datagrams; elsewhere
    /// the socket's receive forwards what it takes in.
    pub(crate) fn set_forwarding(
        &mut self,
        fd: &SharedFd,
        rule: Option<Forwarding>,
        ledger: &Rc<PostLedger>,
    ) {
        if let Receiver::Uring(receiver) = self {
            receiver.set_forwarding(fd.fd(), rule, ledger);
        }
    }

    /// The pool: buffers in all, and how many the program holds.
    pub(crate) fn pool(&self) -> &Rc<BufPool> {
        match self {
            Receiver::Uring(receiver) => &receiver.pool,
            Receiver::Poll(receiver) => &receiver.pool,
        }
    }
}

/// Sends one datagram to `addr` (or to the connected peer), with `meta`'s control
/// messages.
pub(crate) async fn send_to<B: IoBuf>(
    fd: &SharedFd,
    buf: B,
    addr: Option<SocketAddr>,
    meta: &SendMeta,
) -> (io::Result<usize>, B) {
    match fd.binding() {
        Ok(Binding::Uring(driver)) => {
            uring::datagram::send_to(driver, fd.fd(), buf, addr, meta).await
        }
        Ok(Binding::Poll(reg)) => poll::datagram::send_to(reg, fd.fd(), buf, addr, meta).await,
        Err(err) => (Err(err), buf),
    }
}

/// Posts `buf` as one datagram to `addr`: it goes out without a future waiting for
/// it, and its result lands in `ledger`. An error here means it was not posted (a socket
/// of another runtime, too many posts in flight, a full submission queue that could not
/// be flushed); the buffer then comes back with it.
pub(crate) fn post_to<B: IoBuf>(
    fd: &SharedFd,
    buf: B,
    addr: SocketAddr,
    ledger: &Rc<PostLedger>,
) -> Result<(), (io::Error, B)> {
    let binding = match fd.binding() {
        Ok(binding) => binding,
        Err(err) => return Err((err, buf)),
    };
    if let Err(err) = ledger.begin() {
        return Err((err, buf));
    }
    let posted = match binding {
        Binding::Uring(driver) => uring::post_to::post_to(driver, fd.fd(), buf, addr, ledger),
        Binding::Poll(reg) => poll::datagram::post_to(reg, fd.fd(), buf, addr, ledger),
    };
    if posted.is_err() {
        ledger.abort();
    }
    posted
}

/// Posts `bufs` as datagrams to `addr`, nobody waiting for them, their results booked
/// in `ledger`: on epoll runs of equal lengths as GSO sends, in `sendmmsg` calls now; on
/// io_uring one posted send each. An error concerns them all (nothing was sent): a
/// socket of another runtime, or 4,096 posts in flight on io_uring.
pub(crate) fn post_many_to<B: IoBuf + AsRef<[u8]>>(
    fd: &SharedFd,
    bufs: &mut Vec<B>,
    addr: SocketAddr,
    ledger: &Rc<PostLedger>,
) -> io::Result<()> {
    match fd.binding()? {
        Binding::Poll(reg) => {
            let posted = poll::datagram::post_many_to(reg, fd.fd(), bufs, addr, ledger);
            bufs.clear();
            posted
        }
        Binding::Uring(_) => {
            for buf in bufs.drain(..) {
                if let Err((err, _unsent)) = post_to(fd, buf, addr, ledger) {
                    ledger.count_unsent(err.raw_os_error().unwrap_or(libc::EIO));
                }
            }
            Ok(())
        }
    }
}

/// On io_uring, sends the socket's posted datagrams still in the submission queue
/// before a send the task makes by a direct system call (`sendmmsg`): the program
/// posted them first, so they must not arrive after it. The epoll engine sends a post
/// at once.
fn after_posts(driver: &uring::Handle, posts: &PostLedger) -> io::Result<()> {
    if posts.has_in_flight() {
        driver.with(|d| d.submit_queued())??;
    }
    Ok(())
}

/// Sends `bufs[i]` to `targets[i]`, every datagram in as few `sendmmsg` calls as the
/// send buffer allows (one message per destination run, a GSO run where sizes allow
/// while `gso` is true; a refusal that was GSO's own turns it off, see `GsoSuspect`).
/// Each datagram's result, in order: a failure concerns only the datagrams of its
/// message. The error is for the batch as a whole (a socket of another runtime, a
/// failed wait). The buffers are read during the calls only, and come back with the
/// results.
pub(crate) async fn send_many<B: AsRef<[u8]>>(
    fd: &SharedFd,
    bufs: Vec<B>,
    targets: Vec<(SocketAddr, SendMeta)>,
    gso: &Cell<bool>,
    posts: &PostLedger,
) -> io::Result<(Vec<io::Result<usize>>, Vec<B>)> {
    let many = SendMany::new(bufs, targets, gso.get());
    let many = match fd.binding()? {
        Binding::Uring(driver) => {
            after_posts(driver, posts)?;
            uring::datagram::send_many(driver, fd.fd(), many).await?
        }
        Binding::Poll(reg) => poll::datagram::send_many(reg, fd.fd(), many).await?,
    };
    if many.gso_was_refused() {
        gso.set(false);
    }
    Ok(many.into_parts())
}

/// Sends every buffer of `bufs` as its own datagram, in order, to `dest` (or to the
/// connected peer), each with `meta`'s control messages, with as few kernel operations as the engine allows. Runs of
/// equal-sized datagrams go out as one UDP GSO send while `gso` is true; a GSO send the
/// kernel or device refuses is sent again datagram by datagram, and turns `gso` off
/// when its first datagram then goes (the refusal was GSO's, not the datagrams').
///
/// Returns how far it got (`Progress::first` datagrams sent; `skip` is always 0) and the
/// error that stopped it: that datagram, and the ones after it, were not sent.
pub(crate) async fn send_batch(
    fd: &SharedFd,
    bufs: Vec<Bytes>,
    dest: Option<SocketAddr>,
    meta: &SendMeta,
    gso: &Cell<bool>,
    posts: &PostLedger,
    report: &mut BatchReport,
) -> (io::Result<()>, Progress, Vec<Bytes>) {
    match fd.binding() {
        Ok(Binding::Uring(driver)) => {
            if let Err(err) = after_posts(driver, posts) {
                return (Err(err), Progress::default(), bufs);
            }
            uring::datagram::send_batch(driver, fd.fd(), bufs, dest, meta, gso, report).await
        }
        Ok(Binding::Poll(reg)) => {
            poll::datagram::send_batch(reg, fd.fd(), bufs, dest, meta, gso, report).await
        }
        Err(err) => (Err(err), Progress::default(), bufs),
    }
}

/// Datagrams the kernel dropped on this socket, mostly because its receive queue was
/// full (`SO_MEMINFO`).
pub(crate) fn socket_drops(fd: &SharedFd) -> io::Result<u64> {
    super::sockopt::socket_drops(fd.raw())
}

/// Sets an integer socket option.
pub(crate) fn set_int_option(
    fd: &SharedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    super::sockopt::set_int_option(fd.raw(), level, name, value)
}

/// Whether an integer socket option is on; an option the kernel does not know is off.
pub(crate) fn option_is_on(fd: &SharedFd, level: libc::c_int, name: libc::c_int) -> bool {
    super::sockopt::int_option(fd.raw(), level, name).is_ok_and(|value| value != 0)
}

/// Turns SO_TXTIME on (see `sockopt::enable_txtime`).
pub(crate) fn enable_txtime(fd: &SharedFd) -> io::Result<()> {
    super::sockopt::enable_txtime(fd.raw())
}
