//! The tunnel's data path and timers, on one thread or on several that share one
//! session ([`TunnelGroup`]).

use std::cell::{Cell, RefCell, RefMut};
use std::future::{poll_fn, Future};
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;

use super::config::TunnelConfig;
use super::group::{lock, Shared, TunnelGroup, View};
use super::handshake::{Outcome, Refused, INIT, RESPONSE};
use super::session::{data_tag, OpenError, Session, DATA, DATA_HEADER, TAG_LEN};
use super::stats::TunnelStats;
use super::timers::{Due, Intervals};
use crate::net::{Datagram, DatagramSocket, OutputStream};
use crate::tun::{Room, TunDevice, TunFrame};
use crate::Result;

impl TunnelGroup {
    /// A member on this thread: the queue `tun` and a new UDP socket (don't-fragment on,
    /// UDP GRO on receive) bound with SO_REUSEPORT to the group's address (the first
    /// member binds `config.listen`, and its port is everyone's; one another socket
    /// holds is AddressAlreadyInUse, as the group shares its port with no one else).
    /// The first member also runs the group's timers. Call [`Tunnel::run`] on the
    /// runtime the TUN belongs to.
    pub fn join(&self, tun: TunDevice) -> Result<Tunnel> {
        let batch = self.shared.config.batch;
        // 0 would take nothing (the socket refuses such a receive, the loop would spin
        // on it); a huge one would ask for its buffers up front.
        if !(1..=MAX_BATCH).contains(&batch) {
            return Err(crate::Error::invalid_input(format!(
                "a tunnel's batch is 1 to {MAX_BATCH} frames or datagrams, not {batch}"
            )));
        }
        let config = &self.shared.config;
        if let Some(peer) = config.peer {
            unreachable_from(config.listen, peer)?;
        }
        let (socket, leader, lane) = self.bind_member()?;
        Ok(Tunnel::member(
            tun,
            socket,
            self.shared.clone(),
            leader,
            lane,
        ))
    }
}

/// A peer the listening address can never send to: an IPv4 one from a specific IPv6
/// address or from `[::]` bound IPv6-only is not, and an IPv6 one from any IPv4
/// address. Caught here, where every handshake would otherwise fail unseen.
fn unreachable_from(listen: SocketAddr, peer: SocketAddr) -> Result<()> {
    let peer_ip = peer.ip().to_canonical();
    let reachable = match (listen.ip(), peer_ip) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => true,
        // A dual-stack wildcard reaches IPv4 peers through mapped addresses.
        (IpAddr::V6(listen), IpAddr::V4(_)) => {
            listen.is_unspecified() || listen.to_ipv4_mapped().is_some()
        }
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    };
    if reachable {
        return Ok(());
    }
    Err(crate::Error::invalid_input(format!(
        "the tunnel listens on {listen} and cannot send to its peer {peer}: use addresses \
         of one family (or listen on [::] for both)"
    )))
}

/// A point-to-point tunnel between a TUN queue and a UDP socket (see the module): the
/// whole tunnel ([`new`](Self::new)), or one thread's part of a [`TunnelGroup`].
pub struct Tunnel {
    inner: Rc<Inner>,
}

struct Inner {
    tun: TunDevice,
    socket: DatagramSocket,
    shared: Arc<Shared>,
    /// Runs the timers (the group's first member): one Init or keepalive, not one per
    /// thread.
    leader: bool,
    /// The counter lane this member seals under (its place in the group): its
    /// messages leave in counter order, so the peer's window per lane sees little
    /// reordering however the threads interleave.
    lane: usize,
    view: RefCell<View>,
    output: RefCell<Option<(SocketAddr, OutputStream)>>,
    stats: Cell<TunnelStats>,
}

/// The largest [`TunnelConfig::batch`]: as many datagrams as one receive takes.
const MAX_BATCH: usize = 1024;

/// Receive failures in a row after which the socket counts as broken.
const MAX_RECEIVE_FAILURES: u32 = 1000;

/// Room the seal needs around each packet.
const ROOM: Room = Room {
    headroom: DATA_HEADER,
    tailroom: TAG_LEN,
};

impl Tunnel {
    /// One member of the group `shared`, with its queue and its bound socket.
    pub(super) fn member(
        tun: TunDevice,
        socket: DatagramSocket,
        shared: Arc<Shared>,
        leader: bool,
        lane: usize,
    ) -> Tunnel {
        Tunnel {
            inner: Rc::new(Inner {
                tun,
                socket,
                shared,
                leader,
                lane,
                view: RefCell::new(View::default()),
                output: RefCell::new(None),
                stats: Cell::new(TunnelStats::default()),
            }),
        }
    }

    /// A tunnel over `tun` alone, listening on `config.listen` (don't-fragment on, UDP
    /// GRO on receive; no port sharing). Call [`run`](Self::run) on the runtime the TUN
    /// belongs to.
    pub fn new(tun: TunDevice, config: TunnelConfig) -> Result<Tunnel> {
        TunnelGroup::with_port_sharing(config, false).join(tun)
    }

    /// The UDP address the tunnel listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.inner.socket.local_addr()
    }

    /// The TUN queue.
    pub fn device(&self) -> &TunDevice {
        &self.inner.tun
    }

    /// This thread's counters (a group's are the sum of its members').
    pub fn stats(&self) -> TunnelStats {
        self.inner.stats.get()
    }

    /// The group this tunnel is a member of (one made by [`new`](Self::new) shares no
    /// port: another member could not bind).
    pub fn group(&self) -> TunnelGroup {
        TunnelGroup {
            shared: self.inner.shared.clone(),
        }
    }

    /// The peer's address, configured or learned.
    pub fn peer(&self) -> Option<SocketAddr> {
        lock(&self.inner.shared.keys).peer
    }

    /// Whether a session is up.
    pub fn has_session(&self) -> bool {
        lock(&self.inner.shared.keys).current.is_some()
    }

    /// Moves packets both ways until a read from the TUN or the socket fails for good.
    /// Dropping the future stops the tunnel (this member of a group; the others go on).
    pub async fn run(&self) -> Result<()> {
        let mut outbound = pin!(self.inner.outbound());
        let mut inbound = pin!(self.inner.inbound());
        let mut timers = pin!(self.inner.timers());
        poll_fn(|cx| {
            // The timers first: a due tick uses a unit of the task's budget, which a bulk
            // transfer in either direction could otherwise spend in every poll, and the
            // keepalives and rekeying would wait as long as the load lasts.
            for future in [
                timers.as_mut().poll(cx),
                outbound.as_mut().poll(cx),
                inbound.as_mut().poll(cx),
            ] {
                if let Poll::Ready(result) = future {
                    return Poll::Ready(result);
                }
            }
            Poll::Pending
        })
        .await
    }
}

impl Inner {
    fn config(&self) -> &TunnelConfig {
        &self.shared.config
    }

    fn count(&self, change: impl FnOnce(&mut TunnelStats)) {
        let mut stats = self.stats.get();
        change(&mut stats);
        self.stats.set(stats);
    }

    /// The member's view of the keys, refreshed if another thread (or this one) changed
    /// them since: one atomic load when nothing changed.
    fn view(&self) -> RefMut<'_, View> {
        let mut view = self.view.borrow_mut();
        if self.shared.epoch.load(Ordering::Acquire) != view.epoch {
            let keys = lock(&self.shared.keys);
            *view = View {
                epoch: self.shared.epoch.load(Ordering::Acquire),
                current: keys.current.clone(),
                pending: keys.pending.clone(),
                previous: keys.previous.clone(),
                peer: keys.peer,
            };
        }
        view
    }

    /// TUN to UDP: frames cut into packets, sealed, sent in one batch per read.
    async fn outbound(&self) -> Result<()> {
        let batch = self.config().batch;
        let mut frames: Vec<TunFrame> = Vec::with_capacity(batch);
        let mut sealed: Vec<Bytes> = Vec::with_capacity(batch * 4);
        loop {
            self.tun.recv_batch(&mut frames, batch).await?;
            let output = self.seal_frames(&mut frames, &mut sealed);
            for frame in frames.drain(..) {
                self.tun.recycle(frame);
            }
            let Some(output) = output else {
                sealed.clear();
                continue;
            };
            let mut failed = false;
            for packet in sealed.drain(..) {
                if output.write(packet).await.is_err() {
                    failed = true;
                }
            }
            if failed || output.flush().await.is_err() {
                // A refused batch (a datagram over the path MTU, a full buffer, an
                // unreachable peer) breaks the stream: the next batch gets a new one.
                self.count(|s| s.tx_send_errors += 1);
                *self.output.borrow_mut() = None;
            }
        }
    }

    /// Seals every packet of `frames` into `sealed`; the stream to send them on, or
    /// `None` (packets dropped and counted) without a session or a peer.
    fn seal_frames(
        &self,
        frames: &mut [TunFrame],
        sealed: &mut Vec<Bytes>,
    ) -> Option<OutputStream> {
        let view = self.view();
        let (Some(session), Some(peer)) = (view.current.as_deref(), view.peer) else {
            let n = frames.len() as u64;
            self.count(|s| s.tx_no_session += n);
            return None;
        };
        let mut stats = self.stats.get();
        for frame in frames.iter() {
            let result = frame.segments(ROOM, &mut |mut buf| {
                let len = buf.len() - DATA_HEADER;
                if session.seal(self.lane, &mut buf).is_some() {
                    stats.tx_packets += 1;
                    stats.tx_bytes += len as u64;
                    sealed.push(Bytes::from(buf));
                }
            });
            if result.is_err() {
                stats.tx_bad_frames += 1;
            }
        }
        self.stats.set(stats);
        self.shared.timers.sent_data(Instant::now());
        let mut output = self.output.borrow_mut();
        match &*output {
            Some((addr, stream)) if *addr == peer => Some(stream.clone()),
            _ => {
                let stream = self.socket.output_stream_to_addr(peer).ok()?;
                *output = Some((peer, stream.clone()));
                Some(stream)
            }
        }
    }

    /// UDP to TUN: datagrams opened, written in one batch per receive.
    async fn inbound(&self) -> Result<()> {
        let batch = self.config().batch;
        let mut datagrams: Vec<Datagram> = Vec::with_capacity(batch);
        let mut scratch: Vec<u8> = Vec::with_capacity(65536);
        let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
        let mut failures_in_a_row = 0u32;
        loop {
            if let Err(err) = self.socket.recv_batch(&mut datagrams, batch).await {
                // An ICMP error reported on the socket concerns one earlier send; the
                // socket goes on. A socket that fails every time is broken for good.
                failures_in_a_row += 1;
                if err.status() == crate::SocketErrorStatus::WrongRuntime
                    || failures_in_a_row >= MAX_RECEIVE_FAILURES
                {
                    return Err(err);
                }
                continue;
            }
            failures_in_a_row = 0;
            let mut authentic = false;
            for datagram in datagrams.drain(..) {
                authentic |= self.receive(&datagram, &mut scratch, &mut replies);
            }
            if authentic {
                self.shared.timers.received(Instant::now());
            }
            for (reply, to) in replies.drain(..) {
                let _ = self.socket.send_to_addr(reply, to).await;
                self.shared.timers.sent(Instant::now());
            }
            if self.tun.flush().await.is_err() {
                let errors = self.tun.stats().write_errors;
                self.count(|s| s.tun_write_errors = errors);
            }
        }
    }

    /// Handles one datagram; true if it was data that authenticated.
    fn receive(
        &self,
        datagram: &Datagram,
        scratch: &mut Vec<u8>,
        replies: &mut Vec<(Vec<u8>, SocketAddr)>,
    ) -> bool {
        let from = datagram.remote_addr();
        if datagram.is_truncated() {
            self.count(|s| s.rx_malformed += 1);
            return false;
        }
        match datagram.first() {
            Some(&DATA) => return self.receive_data(datagram, from, scratch),
            Some(&INIT) | Some(&RESPONSE) => self.receive_handshake(datagram, from, replies),
            _ => self.count(|s| s.rx_malformed += 1),
        }
        false
    }

    fn receive_handshake(
        &self,
        msg: &[u8],
        from: SocketAddr,
        replies: &mut Vec<(Vec<u8>, SocketAddr)>,
    ) {
        let shared = &*self.shared;
        if let Err(refused) = shared.verifier.check(msg) {
            self.count(|s| match refused {
                Refused::Malformed => s.rx_malformed += 1,
                Refused::Rejected => s.handshakes_rejected += 1,
            });
            return;
        }
        let mut keys = lock(&shared.keys);
        match keys.handshake.receive(msg) {
            Outcome::Answer { reply, session } => {
                shared.change(&mut keys, |keys| keys.pending = Some(Arc::new(session)));
                replies.push((reply, from));
                self.count(|s| s.handshakes_answered += 1);
            }
            Outcome::Established(session) => {
                // Confirm at once with an empty message, so the responder switches to
                // this session before it has data of its own to send.
                let mut confirm = vec![0u8; DATA_HEADER];
                if session.seal(self.lane, &mut confirm).is_some() {
                    let to = keys.peer.unwrap_or(from);
                    replies.push((confirm, to));
                }
                shared.change(&mut keys, |keys| {
                    keys.previous = keys.current.replace(Arc::new(session));
                });
                shared.timers.received(Instant::now());
                self.count(|s| s.sessions += 1);
            }
            Outcome::Rejected => self.count(|s| s.handshakes_rejected += 1),
            Outcome::Replayed => self.count(|s| s.handshakes_replayed += 1),
            Outcome::Ignored => {}
            Outcome::Malformed => self.count(|s| s.rx_malformed += 1),
        }
    }

    /// Opens a data message and queues its packet for the TUN; true if it authenticated.
    fn receive_data(&self, msg: &[u8], from: SocketAddr, scratch: &mut Vec<u8>) -> bool {
        let Some(tag) = data_tag(msg) else {
            self.count(|s| s.rx_malformed += 1);
            return false;
        };
        let view = self.view();
        let matches = |s: &&Arc<Session>| s.recv_tag() == tag;
        let in_pending = view.pending.as_ref().filter(matches);
        let session = in_pending
            .or_else(|| view.current.as_ref().filter(matches))
            .or_else(|| view.previous.as_ref().filter(matches));
        let Some(session) = session else {
            self.count(|s| s.rx_unknown_session += 1);
            return false;
        };
        scratch.clear();
        scratch.extend_from_slice(msg);
        let len = match session.open(scratch) {
            Ok(len) => len,
            Err(err) => {
                self.count(|s| match err {
                    OpenError::Malformed => s.rx_malformed += 1,
                    OpenError::Replayed => s.rx_replayed += 1,
                    OpenError::Forged => s.rx_auth_failed += 1,
                });
                return false;
            }
        };
        let promote = in_pending.cloned();
        let moved = view.peer != Some(from);
        drop(view);
        if promote.is_some() || moved {
            self.settle(promote, from);
        }
        if len == 0 {
            self.count(|s| s.rx_keepalives += 1);
            return true;
        }
        self.tun.write(&scratch[DATA_HEADER..DATA_HEADER + len]);
        self.count(|s| {
            s.rx_packets += 1;
            s.rx_bytes += len as u64;
        });
        true
    }

    /// After data authenticated: the pending session it opened under becomes current
    /// (unless another thread did that already), and the peer's address is `from`.
    fn settle(&self, promote: Option<Arc<Session>>, from: SocketAddr) {
        let shared = &*self.shared;
        let mut keys = lock(&shared.keys);
        let promote = promote.filter(|session| {
            keys.pending
                .as_ref()
                .is_some_and(|pending| Arc::ptr_eq(pending, session))
        });
        if promote.is_some() {
            shared.change(&mut keys, |keys| {
                keys.previous = std::mem::replace(&mut keys.current, keys.pending.take());
            });
            self.count(|s| s.sessions += 1);
        }
        if keys.peer != Some(from) {
            if keys.peer.is_some() {
                self.count(|s| s.roams += 1);
            }
            shared.change(&mut keys, |keys| keys.peer = Some(from));
        }
    }

    /// Handshakes (first, retried, after silence) and keepalives: on the group's first
    /// member only.
    async fn timers(&self) -> Result<()> {
        if !self.leader {
            return std::future::pending().await;
        }
        let tick = self.intervals().tick();
        loop {
            let message = self.due_message(Instant::now());
            if let Some((message, to)) = message {
                let (result, _) = self.socket.send_to_addr(message, to).await;
                match result {
                    Ok(_) => self.shared.timers.sent(Instant::now()),
                    // A handshake or keepalive the socket refused (the peer unreachable
                    // from the address the tunnel listens on, say): counted, retried.
                    Err(_) => self.count(|s| s.tx_send_errors += 1),
                }
            }
            crate::runtime::sleep_lenient(tick).await;
        }
    }

    fn intervals(&self) -> Intervals {
        let config = self.config();
        Intervals {
            keepalive: config.keepalive,
            rehandshake_after: config.rehandshake_after,
            handshake_retry: config.handshake_retry,
        }
    }

    /// The Init or keepalive due now, if any, and where it goes.
    fn due_message(&self, now: Instant) -> Option<(Vec<u8>, SocketAddr)> {
        let shared = &*self.shared;
        let mut keys = lock(&shared.keys);
        let peer = keys.peer?;
        match shared
            .timers
            .due(now, keys.current.is_some(), &self.intervals())
        {
            Due::Handshake => {
                shared.timers.initiated(now);
                self.count(|s| s.handshakes_initiated += 1);
                Some((keys.handshake.initiate(), peer))
            }
            Due::Keepalive => {
                let session = keys.current.as_ref()?;
                let mut keepalive = vec![0u8; DATA_HEADER];
                session.seal(self.lane, &mut keepalive)?;
                Some((keepalive, peer))
            }
            Due::Nothing => None,
        }
    }
}

#[cfg(test)]
mod family_tests {
    use super::unreachable_from;

    fn addr(text: &str) -> std::net::SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_peer_of_the_other_family_than_a_specific_listening_address_is_refused() {
        for (listen, peer) in [
            ("[::1]:0", "127.0.0.1:9"),
            ("[::1]:0", "[::ffff:127.0.0.1]:9"),
            ("127.0.0.1:0", "[::1]:9"),
            ("0.0.0.0:0", "[2001:db8::1]:9"),
        ] {
            let err = unreachable_from(addr(listen), addr(peer)).expect_err(listen);
            assert_eq!(err.status(), crate::SocketErrorStatus::InvalidArgument);
            assert!(err.to_string().contains("cannot send to its peer"), "{err}");
        }
        for (listen, peer) in [
            ("[::]:0", "127.0.0.1:9"),
            ("[::]:0", "[::1]:9"),
            ("[::ffff:127.0.0.1]:0", "127.0.0.1:9"),
            ("0.0.0.0:0", "[::ffff:10.0.0.1]:9"),
            ("127.0.0.1:0", "10.0.0.1:9"),
        ] {
            assert!(
                unreachable_from(addr(listen), addr(peer)).is_ok(),
                "{listen} {peer}"
            );
        }
    }
}
