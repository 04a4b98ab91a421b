//! The tunnel's data path and timers.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::handshake::{Handshake, Outcome, INIT, RESPONSE};
use super::session::{data_tag, OpenError, Session, DATA, DATA_HEADER, TAG_LEN};
use super::timers::{Due, Intervals, Timers};
use super::PresharedKey;
use crate::net::{Datagram, DatagramSocket, OutputStream};
use crate::tun::{Room, TunDevice, TunFrame};
use crate::Result;

/// How a [`Tunnel`] runs.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// The UDP address to listen on.
    pub listen: SocketAddr,
    /// The peer's UDP address; without it, learned from the first data message that
    /// authenticates.
    pub peer: Option<SocketAddr>,
    /// The pre-shared key.
    pub key: PresharedKey,
    /// Most frames or datagrams handled per batch (default 64).
    pub batch: usize,
    /// A side that received but has sent nothing for this long sends an empty message,
    /// so its peer knows the session lives (default 1 s).
    pub keepalive: Duration,
    /// A side that sent data but heard nothing authentic for this long starts a new
    /// handshake: its peer may have restarted (default 3 s).
    pub rehandshake_after: Duration,
    /// An unanswered Init is sent again, with a new random, after this long
    /// (default 500 ms).
    pub handshake_retry: Duration,
}

impl TunnelConfig {
    /// The defaults, with these addresses and key.
    pub fn new(listen: SocketAddr, peer: Option<SocketAddr>, key: PresharedKey) -> TunnelConfig {
        TunnelConfig {
            listen,
            peer,
            key,
            batch: 64,
            keepalive: Duration::from_secs(1),
            rehandshake_after: Duration::from_secs(3),
            handshake_retry: Duration::from_millis(500),
        }
    }
}

/// A tunnel's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Packets sealed and sent.
    pub tx_packets: u64,
    /// Their bytes (inner packets).
    pub tx_bytes: u64,
    /// Packets dropped because no session was up yet.
    pub tx_no_session: u64,
    /// TUN frames that could not be segmented (dropped).
    pub tx_bad_frames: u64,
    /// Batches the socket refused (their packets dropped).
    pub tx_send_errors: u64,
    /// Packets opened and written to the TUN.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Empty (keepalive) messages received.
    pub rx_keepalives: u64,
    /// Datagrams whose tag did not verify (tampered, or another key): dropped.
    pub rx_auth_failed: u64,
    /// Datagrams replayed or too old for the window: dropped.
    pub rx_replayed: u64,
    /// Datagrams too short, truncated or of no known type: dropped.
    pub rx_malformed: u64,
    /// Data messages for a session this side does not have (sent before this side
    /// restarted, or garbage): dropped.
    pub rx_unknown_session: u64,
    /// Handshake messages whose MAC did not verify (another key): dropped.
    pub handshakes_rejected: u64,
    /// Inits sent.
    pub handshakes_initiated: u64,
    /// Inits answered.
    pub handshakes_answered: u64,
    /// Sessions established (as initiator) or confirmed (as responder).
    pub sessions: u64,
    /// Times the peer's address changed.
    pub roams: u64,
    /// Frames the TUN refused.
    pub tun_write_errors: u64,
}

impl TunnelStats {
    /// Every counter with its name, for printing.
    pub fn fields(&self) -> [(&'static str, u64); 18] {
        [
            ("tx_packets", self.tx_packets),
            ("tx_bytes", self.tx_bytes),
            ("tx_no_session", self.tx_no_session),
            ("tx_bad_frames", self.tx_bad_frames),
            ("tx_send_errors", self.tx_send_errors),
            ("rx_packets", self.rx_packets),
            ("rx_bytes", self.rx_bytes),
            ("rx_keepalives", self.rx_keepalives),
            ("rx_auth_failed", self.rx_auth_failed),
            ("rx_replayed", self.rx_replayed),
            ("rx_malformed", self.rx_malformed),
            ("rx_unknown_session", self.rx_unknown_session),
            ("handshakes_rejected", self.handshakes_rejected),
            ("handshakes_initiated", self.handshakes_initiated),
            ("handshakes_answered", self.handshakes_answered),
            ("sessions", self.sessions),
            ("roams", self.roams),
            ("tun_write_errors", self.tun_write_errors),
        ]
    }
}

/// A point-to-point tunnel between a TUN queue and a UDP socket (see the module).
pub struct Tunnel {
    inner: Rc<Inner>,
}

struct Inner {
    tun: TunDevice,
    socket: DatagramSocket,
    config: TunnelConfig,
    state: RefCell<State>,
    stats: Cell<TunnelStats>,
}

struct State {
    handshake: Handshake,
    /// The session data is sealed with.
    current: Option<Session>,
    /// The responder's newest session, until data authenticates under it.
    pending: Option<Session>,
    /// The session `current` replaced: what the peer sealed before it switched still
    /// opens (nothing is sealed with it any more).
    previous: Option<Session>,
    peer: Option<SocketAddr>,
    output: Option<(SocketAddr, OutputStream)>,
    timers: Timers,
}

/// Receive failures in a row after which the socket counts as broken.
const MAX_RECEIVE_FAILURES: u32 = 1000;

/// Room the seal needs around each packet.
const ROOM: Room = Room {
    headroom: DATA_HEADER,
    tailroom: TAG_LEN,
};

impl Tunnel {
    /// A tunnel over `tun`, listening on `config.listen` (don't-fragment on, UDP GRO on
    /// receive). Call [`run`](Self::run) on the runtime the TUN belongs to.
    pub fn new(tun: TunDevice, config: TunnelConfig) -> Result<Tunnel> {
        let socket = DatagramSocket::new();
        let control = socket.control();
        control.set_dont_fragment(true)?;
        control.set_gro(true)?;
        control.set_receive_buffer_size(4 << 20)?;
        control.set_send_buffer_size(4 << 20)?;
        socket.bind_addr(config.listen)?;
        let now = Instant::now();
        let state = State {
            handshake: Handshake::new(config.key.as_bytes()),
            current: None,
            pending: None,
            previous: None,
            peer: config.peer,
            output: None,
            timers: Timers::new(now),
        };
        Ok(Tunnel {
            inner: Rc::new(Inner {
                tun,
                socket,
                config,
                state: RefCell::new(state),
                stats: Cell::new(TunnelStats::default()),
            }),
        })
    }

    /// The UDP address the tunnel listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.inner.socket.local_addr()
    }

    /// The TUN queue.
    pub fn device(&self) -> &TunDevice {
        &self.inner.tun
    }

    /// The counters.
    pub fn stats(&self) -> TunnelStats {
        self.inner.stats.get()
    }

    /// The peer's address, configured or learned.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.inner.state.borrow().peer
    }

    /// Whether a session is up.
    pub fn has_session(&self) -> bool {
        self.inner.state.borrow().current.is_some()
    }

    /// Moves packets both ways until a read from the TUN or the socket fails for good.
    /// Dropping the future stops the tunnel.
    pub async fn run(&self) -> Result<()> {
        let mut outbound = pin!(self.inner.outbound());
        let mut inbound = pin!(self.inner.inbound());
        let mut timers = pin!(self.inner.timers());
        poll_fn(|cx| {
            for future in [
                outbound.as_mut().poll(cx),
                inbound.as_mut().poll(cx),
                timers.as_mut().poll(cx),
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
    fn count(&self, change: impl FnOnce(&mut TunnelStats)) {
        let mut stats = self.stats.get();
        change(&mut stats);
        self.stats.set(stats);
    }

    /// TUN to UDP: frames cut into packets, sealed, sent in one batch per read.
    async fn outbound(&self) -> Result<()> {
        let mut frames: Vec<TunFrame> = Vec::with_capacity(self.config.batch);
        let mut sealed: Vec<Bytes> = Vec::with_capacity(self.config.batch * 4);
        loop {
            self.tun.recv_batch(&mut frames, self.config.batch).await?;
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
                self.state.borrow_mut().output = None;
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
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let (Some(session), Some(peer)) = (state.current.as_mut(), state.peer) else {
            let n = frames.len() as u64;
            self.count(|s| s.tx_no_session += n);
            return None;
        };
        let mut stats = self.stats.get();
        for frame in frames.iter() {
            let result = frame.segments(ROOM, &mut |mut buf| {
                let len = buf.len() - DATA_HEADER;
                if session.seal(&mut buf).is_some() {
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
        let now = Instant::now();
        state.timers.sent_data(now);
        match &state.output {
            Some((addr, output)) if *addr == peer => Some(output.clone()),
            _ => {
                let output = self.socket.output_stream_to_addr(peer).ok()?;
                state.output = Some((peer, output.clone()));
                Some(output)
            }
        }
    }

    /// UDP to TUN: datagrams opened, written in one batch per receive.
    async fn inbound(&self) -> Result<()> {
        let mut datagrams: Vec<Datagram> = Vec::with_capacity(self.config.batch);
        let mut scratch: Vec<u8> = Vec::with_capacity(65536);
        let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
        let mut failures_in_a_row = 0u32;
        loop {
            if let Err(err) = self
                .socket
                .recv_batch(&mut datagrams, self.config.batch)
                .await
            {
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
                self.state.borrow_mut().timers.received(Instant::now());
            }
            for (reply, to) in replies.drain(..) {
                let _ = self.socket.send_to_addr(reply, to).await;
                self.state.borrow_mut().timers.sent(Instant::now());
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
        let mut state = self.state.borrow_mut();
        match state.handshake.receive(msg) {
            Outcome::Answer { reply, session } => {
                state.pending = Some(session);
                replies.push((reply, from));
                self.count(|s| s.handshakes_answered += 1);
            }
            Outcome::AnswerAgain(reply) => replies.push((reply, from)),
            Outcome::Established(mut session) => {
                // Confirm at once with an empty message, so the responder switches to
                // this session before it has data of its own to send.
                let mut confirm = vec![0u8; DATA_HEADER];
                if session.seal(&mut confirm).is_some() {
                    let to = state.peer.unwrap_or(from);
                    replies.push((confirm, to));
                }
                state.previous = state.current.replace(session);
                state.timers.received(Instant::now());
                self.count(|s| s.sessions += 1);
            }
            Outcome::Rejected => self.count(|s| s.handshakes_rejected += 1),
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
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let in_pending = state.pending.as_ref().is_some_and(|s| s.recv_tag() == tag);
        let session = if in_pending {
            state.pending.as_mut()
        } else {
            let matches = |s: &&mut Session| s.recv_tag() == tag;
            match state.current.as_mut().filter(matches) {
                Some(session) => Some(session),
                None => state.previous.as_mut().filter(matches),
            }
        };
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
        if in_pending {
            state.previous = std::mem::replace(&mut state.current, state.pending.take());
            self.count(|s| s.sessions += 1);
        }
        if state.peer != Some(from) {
            if state.peer.is_some() {
                self.count(|s| s.roams += 1);
            }
            state.peer = Some(from);
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

    /// Handshakes (first, retried, after silence) and keepalives.
    async fn timers(&self) -> Result<()> {
        let tick = (self.config.handshake_retry / 4).max(Duration::from_millis(20));
        loop {
            let message = self.due_message(Instant::now());
            if let Some((message, to)) = message {
                let (result, _) = self.socket.send_to_addr(message, to).await;
                if result.is_ok() {
                    self.state.borrow_mut().timers.sent(Instant::now());
                }
            }
            crate::runtime::sleep(tick).await;
        }
    }

    /// The Init or keepalive due now, if any, and where it goes.
    fn due_message(&self, now: Instant) -> Option<(Vec<u8>, SocketAddr)> {
        let mut state = self.state.borrow_mut();
        let state = &mut *state;
        let peer = state.peer?;
        let intervals = Intervals {
            keepalive: self.config.keepalive,
            rehandshake_after: self.config.rehandshake_after,
            handshake_retry: self.config.handshake_retry,
        };
        match state.timers.due(now, state.current.is_some(), &intervals) {
            Due::Handshake => {
                state.timers.initiated(now);
                self.count(|s| s.handshakes_initiated += 1);
                Some((state.handshake.initiate(), peer))
            }
            Due::Keepalive => {
                let session = state.current.as_mut()?;
                let mut keepalive = vec![0u8; DATA_HEADER];
                session.seal(&mut keepalive)?;
                Some((keepalive, peer))
            }
            Due::Nothing => None,
        }
    }
}
