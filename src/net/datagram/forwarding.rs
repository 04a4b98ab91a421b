//! A socket that forwards what it receives by itself ([`Forwarding`]): the rule, and
//! the forwarding its receive does for the datagrams the engine hands it (io_uring's
//! driver forwards the rest as it reaps them, see the driver's `recv_tap`).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::task::{Context, Poll};

use super::{check_destination, DatagramSocket};
use crate::driver::forward::{Forward, Forwarding};
use crate::driver::ops_datagram::{self, canonical, for_family, AfterRecv, RecvDatagram};
use crate::driver::SharedFd;
use crate::{Error, Result};

/// Receive steps one poll may spend forwarding before it lets other tasks run: under
/// a flood a socket that forwards everything never finds itself empty.
const FORWARD_ROUNDS: usize = 16;

/// Datagrams a receive takes in at most while the socket forwards: its forwards go out
/// together (GSO runs on epoll), whatever the caller takes.
const FORWARD_BATCH: usize = 64;

impl DatagramSocket {
    /// Forwards what this socket receives by itself: every datagram (but those
    /// `forwarding` keeps for the program) goes on to its destination from this socket
    /// as it comes in, without a copy of its bytes where the ring allows (as
    /// [`Datagram::into_forward`](crate::Datagram::into_forward) and
    /// [`post_to_addr`](Self::post_to_addr) do), and without a task of the program
    /// woken for it. On io_uring the driver sends each one on as it reaps the receive,
    /// from the first receive after this call. The forwards are posted sends: counted
    /// in [`post_stats`](Self::post_stats) (a full send buffer drops a datagram there)
    /// and in [`ReceiveStats::forwarded`](crate::ReceiveStats::forwarded), awaited by
    /// [`settle_posts`](Self::settle_posts). A datagram a smaller ring cut is never
    /// forwarded: it is delivered, flagged.
    ///
    /// Forwarding runs as part of the socket's receive: keep a receive waiting on it
    /// ([`recv`](Self::recv), [`recv_batch`](Self::recv_batch), [`messages`](Self::messages)
    /// or its [`DatagramGroup`](crate::DatagramGroup)), which returns the datagrams
    /// kept for the program. A new call replaces the rule; see
    /// [`stop_forwarding`](Self::stop_forwarding).
    ///
    /// Fails, changing nothing, on a destination the socket could never send to (port
    /// 0: InvalidArgument; an IPv6 destination on an IPv4 socket, or an IPv4 one on an
    /// IPv6 socket that sends IPv6 only — bound to one IPv6 address, or IPV6_V6ONLY:
    /// AddressFamilyNotSupported), on the socket's own address — its port on the
    /// unspecified address, and bound to the wildcard its port on any address of this
    /// host (InvalidArgument: what it forwards would come back to it; a multicast group
    /// is not judged, as the socket may join it later) — on a socket not bound yet
    /// (InvalidArgument:
    /// it receives nothing), and while the socket is busy in a receive (ResourceBusy:
    /// set it from a task, not from a waker).
    ///
    /// ```no_run
    /// use ringsock::{DatagramSocket, Forwarding, Runtime};
    ///
    /// Runtime::new()?.block_on(async {
    ///     let relay = DatagramSocket::new();
    ///     relay.bind_addr("127.0.0.1:0".parse().unwrap())?;
    ///     let peer = "127.0.0.1:5004".parse().unwrap();
    ///     // Everything to the peer but "bye", which ends the relay.
    ///     relay.forward_received(Forwarding::to(peer).delivering(|data| data == b"bye"))?;
    ///     let bye = relay.recv().await?;
    ///     relay.settle_posts().await?;
    ///     println!("{} forwarded before {:?}", relay.receive_stats().forwarded, bye);
    ///     # Ok::<_, ringsock::Error>(())
    /// })?;
    /// # Ok::<_, ringsock::Error>(())
    /// ```
    pub fn forward_received(&self, forwarding: Forwarding) -> Result<()> {
        let to = forwarding.destination();
        check_destination(to)?;
        // A socket that never bound receives nothing: a rule on it would wait forever.
        let unbound = || Error::invalid_input(format!("forward to {to}: bind the socket first"));
        let fd = self.fd().map_err(|_| unbound())?;
        let local = self.local_addr()?;
        if local.port() == 0 {
            return Err(unbound());
        }
        let target = for_family(to, self.ipv6.get());
        if target.is_ipv6() && !self.ipv6.get() {
            let what = format!("forward to {to}: the socket is IPv4");
            return Err(Error::from_errno(what, libc::EAFNOSUPPORT));
        }
        if canonical(to).is_ipv4() && self.ipv6.get() && !reaches_ipv4(fd, local) {
            let what = format!("forward to {to}: the socket, on {local}, sends IPv6 only");
            return Err(Error::from_errno(what, libc::EAFNOSUPPORT));
        }
        let own = is_own_address(local, to).map_err(|err| {
            Error::io(
                format!("forward to {to}: tell whether it is this host's"),
                err,
            )
        })?;
        if own {
            return Err(Error::invalid_input(format!(
                "forward to {to}: that is the socket's own address (what it forwards \
                 would come back to it)"
            )));
        }
        self.set_forwarding(fd, Some(forwarding.with_destination(target)))
    }

    /// Stops forwarding: every datagram received from now on is delivered. Forwards in
    /// flight still complete (see [`settle_posts`](Self::settle_posts)).
    pub fn stop_forwarding(&self) -> Result<()> {
        match self.fd.get() {
            Some(fd) => self.set_forwarding(fd, None),
            None => Ok(()),
        }
    }

    /// The rule the socket forwards by, if any (its destination as the socket's family
    /// writes it: IPv4 addresses mapped into IPv6 on an IPv6 socket).
    pub fn forwarding(&self) -> Option<Forwarding> {
        self.forwarding.get()
    }

    fn set_forwarding(&self, fd: &SharedFd, rule: Option<Forwarding>) -> Result<()> {
        let mut receiver = self.receiver.try_borrow_mut().map_err(|_| {
            Error::io(
                "set forwarding",
                std::io::Error::new(
                    std::io::ErrorKind::ResourceBusy,
                    "the socket is in the middle of a receive",
                ),
            )
        })?;
        let old = self.forwarding.replace(rule);
        if old.map(|old| old.destination()) != rule.map(|rule| rule.destination()) {
            // A refusal of GSO said something of the old path, not of the new one.
            self.posts.forget_gso_refused();
        }
        if let Some(receiver) = receiver.as_mut() {
            receiver.set_forwarding(fd, rule, &self.posts);
        }
        Ok(())
    }

    /// Sends `forwards` on to `to` as posts: a lone one as one send, more together (GSO
    /// runs on epoll); what cannot go is booked as dropped or failed.
    fn send_forwards(&self, fd: &SharedFd, forwards: &mut Vec<Forward>, to: SocketAddr) {
        let count = forwards.len();
        let unsent = match count {
            0 => return,
            1 => {
                let one = forwards.pop().expect("one there");
                ops_datagram::post_to(fd, one, to, &self.posts)
                    .err()
                    .map(|(err, _)| (err, 1))
            }
            _ => ops_datagram::post_many_to(fd, forwards, to, &self.posts)
                .err()
                .map(|err| (err, count)),
        };
        forwards.clear();
        if let Some((err, count)) = unsent {
            let errno = err.raw_os_error().unwrap_or(libc::EIO);
            (0..count).for_each(|_| self.posts.count_unsent(errno));
        }
    }

    /// Gives the receiver `rule`, if there is one and it is free (a detach runs from a
    /// task, never inside a receive's poll).
    pub(super) fn tell_receiver_forwarding(&self, fd: &SharedFd, rule: Option<Forwarding>) {
        if let Ok(mut receiver) = self.receiver.try_borrow_mut() {
            if let Some(receiver) = receiver.as_mut() {
                receiver.set_forwarding(fd, rule, &self.posts);
            }
        }
    }

    /// One receive step as the program sees it: what the receiver hands over, with what
    /// the forwarding rule sends on taken out. Ready with at least one datagram kept.
    pub(super) fn poll_recv(
        &self,
        fd: &SharedFd,
        cx: &mut Context<'_>,
        out: &mut Vec<RecvDatagram>,
        max: usize,
    ) -> Poll<Result<AfterRecv>> {
        let start = out.len();
        for _ in 0..FORWARD_ROUNDS {
            let Some(rule) = self.forwarding.get() else {
                return self.poll_received(fd, cx, out, max);
            };
            // More than the caller takes, so that what is forwarded goes in batches.
            let after = match self.poll_received(fd, cx, out, max.max(FORWARD_BATCH)) {
                Poll::Ready(Ok(after)) => after,
                other => return other,
            };
            self.forward_taken(fd, rule, out, start);
            if out.len() > start + max {
                // Kept past what the caller takes: first for the next receive.
                let mut carried = self.carried.borrow_mut();
                for datagram in out.drain(start + max..).rev() {
                    carried.push_front(datagram);
                }
                return Poll::Ready(Ok(AfterRecv::MayHaveMore));
            }
            if out.len() > start {
                return Poll::Ready(Ok(after));
            }
            if after == AfterRecv::Waiting {
                // The receiver keeps the waker for the next datagram.
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Sends on the datagrams of `out[start..]` that `rule` forwards, keeping the others
    /// in order. A rule that panics: the datagrams not sent on go back to the socket, to
    /// be handed out first (the one it panicked on as kept), and the panic goes on.
    fn forward_taken(
        &self,
        fd: &SharedFd,
        rule: Forwarding,
        out: &mut Vec<RecvDatagram>,
        start: usize,
    ) {
        let mut taken = self.forward_scratch.take();
        taken.extend(out.drain(start..));
        let mut forwards = self.forward_out.take();
        let mut panicked = None;
        for mut datagram in taken.drain(..) {
            if datagram.kept || panicked.is_some() {
                out.push(datagram);
                continue;
            }
            // AssertUnwindSafe: the rule only reads the datagram.
            match std::panic::catch_unwind(AssertUnwindSafe(|| rule.forwards(&datagram))) {
                Ok(true) => {}
                Ok(false) => {
                    // Asked once: what a later receive takes of it is not judged again.
                    datagram.kept = true;
                    out.push(datagram);
                    continue;
                }
                Err(panic) => {
                    panicked = Some(panic);
                    datagram.kept = true;
                    out.push(datagram);
                    continue;
                }
            }
            self.forwarded.set(self.forwarded.get() + 1);
            forwards.push(Forward::from_payload(datagram.buf));
        }
        self.forward_scratch.set(taken);
        self.send_forwards(fd, &mut forwards, rule.destination());
        self.forward_out.set(forwards);
        if let Some(panic) = panicked {
            let mut carried = self.carried.borrow_mut();
            for datagram in out.drain(start..).rev() {
                carried.push_front(datagram);
            }
            drop(carried);
            std::panic::resume_unwind(panic);
        }
    }
}

/// Whether an IPv6 socket on `local` can send to IPv4 peers: dual-stack and bound to
/// the wildcard (or to an IPv4 address, which `local` shows unmapped).
fn reaches_ipv4(fd: &SharedFd, local: SocketAddr) -> bool {
    let dual_stack = !fd.sock().only_v6().unwrap_or(false);
    dual_stack && (local.is_ipv4() || local.ip().is_unspecified())
}

/// Whether `to` is the socket on `local` itself: its address, or, bound to the
/// wildcard, its port on loopback or on any other address of this host. The
/// unspecified address is this host too (the kernel delivers it to the sender's own
/// address). A multicast group on its own port is not judged: whether that comes back
/// depends on groups the socket may join later.
fn is_own_address(local: SocketAddr, to: SocketAddr) -> io::Result<bool> {
    if local.port() != to.port() {
        return Ok(false);
    }
    let to = canonical(to);
    if to.ip().is_unspecified() {
        return Ok(true);
    }
    if !local.ip().is_unspecified() {
        return Ok(to.ip() == local.ip());
    }
    if to.ip().is_loopback() {
        return Ok(true);
    }
    if to.ip().is_multicast() {
        return Ok(false);
    }
    is_this_hosts(to)
}

/// Whether `to` names an address of this host: the kernel routes such a destination
/// through loopback, from that very address, so a socket connected to it is given it
/// as its own. (A bind test would say yes to every address where non-local binds are
/// allowed.) A destination with no route is no address of this host.
fn is_this_hosts(to: SocketAddr) -> io::Result<bool> {
    let any = match to {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let probe = std::net::UdpSocket::bind(any)?;
    match probe.connect(to) {
        Ok(()) => Ok(probe.local_addr()?.ip() == to.ip()),
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL | libc::EINVAL)
            ) =>
        {
            Ok(false)
        }
        Err(err) => Err(err),
    }
}
