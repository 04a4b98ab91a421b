//! One TLS session over a stream socket: rustls's buffered connection, driven by the
//! socket's owned-buffer operations (no blocking `std::io`).
//!
//! # Record order
//!
//! TLS records carry sequence numbers, so ciphertext must reach the socket in exactly the
//! order rustls made it. Every path that makes ciphertext (a write, a batch from the
//! [`OutputStream`](crate::OutputStream), an alert or key update produced while reading,
//! `close_notify`) does so synchronously and queues it on [`Tx`] in the same step; one
//! sender task sends that queue in order. No lock is held across an await.
//!
//! # Cancellation
//!
//! Receives and sends run in tasks of their own: a dropped read leaves its receive
//! running, and the next read picks the ciphertext up; a dropped write leaves the records
//! it queued to be sent whole. So a timeout around a read or write never tears a record.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io::{self, BufRead, IoSlice, Write};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use bytes::{Buf, Bytes};
use pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::config::ClientCert;
use super::errors::{self, Side, Situation};
use super::{Certificate, ProtectionLevel, TlsInfo};
use crate::driver::ops::{self, BatchReport, Progress};
use crate::driver::SharedFd;
use crate::runtime::JoinHandle;
use crate::{Error, Result, SocketErrorStatus};

/// Ciphertext asked of the kernel per receive: from `RECV_MIN`, doubled while receives
/// fill it (a bulk transfer), halved while they use under a quarter of it, so an idle or
/// chatty connection keeps a small buffer and a fast one gets few large receives.
const RECV_MIN: usize = 16 * 1024;
const RECV_MAX: usize = 256 * 1024;
/// Plaintext encrypted per step of a large write; two steps are in flight at most.
const WRITE_CHUNK: usize = 64 * 1024;
/// Bytes a TLS record adds to its plaintext, at most (header, nonce, tag, padding).
const RECORD_OVERHEAD: usize = 5 + 8 + 16 + 256;
/// The largest plaintext in one record.
const MAX_FRAGMENT: usize = 16 * 1024;
/// Plaintext handed to rustls per step of [`TlsSession::seal`]: four full records.
const SEAL_STEP: usize = 4 * MAX_FRAGMENT;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshaking,
    Ready,
    Failed,
}

/// A TLS session on one socket. Shared (`Rc`) by the socket and its input and output
/// streams; dropping the last handle sends `close_notify` and stops the pending receive.
pub(crate) struct TlsSession {
    conn: RefCell<Connection>,
    side: Side,
    client_cert: Option<Arc<ClientCert>>,
    fd: SharedFd,
    phase: Cell<Phase>,
    /// The first fatal failure; every later operation reports a copy of it.
    failure: RefCell<Option<Error>>,
    /// `close_notify` has been queued: nothing more may be written.
    write_closed: Cell<bool>,
    rx: RefCell<Rx>,
    /// One reader at a time drives the receive side.
    read_turn: Turn,
    /// Decrypted bytes a reader took and gave back unread (a dropped
    /// [`InputStream`](crate::InputStream)'s buffer): handed out before rustls's.
    unread: RefCell<Bytes>,
    tx: Rc<Tx>,
}

/// The receive side: ciphertext not yet taken by rustls, and the receive in flight.
struct Rx {
    /// Received ciphertext; `buf[pos..]` is not yet fed to rustls.
    buf: Vec<u8>,
    pos: usize,
    /// The receive running in its own task, if one is.
    recv: Option<JoinHandle<(io::Result<usize>, Vec<u8>)>>,
    /// The peer closed its side of the TCP connection.
    eof: bool,
    /// Bytes the next receive asks for (`RECV_MIN..=RECV_MAX`).
    size: usize,
}

impl Rx {
    fn new() -> Rx {
        Rx {
            buf: Vec::new(),
            pos: 0,
            recv: None,
            eof: false,
            size: RECV_MIN,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// A buffer for the next receive, reusing the last one unless it is far too large.
    fn next_buffer(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        self.pos = 0;
        if buf.capacity() > 2 * self.size {
            buf = Vec::new();
        }
        buf.clear();
        buf.reserve(self.size);
        buf
    }

    /// Adapts the receive size to what the last receive of `asked` bytes got.
    fn received(&mut self, got: usize, asked: usize) {
        if got >= asked {
            self.size = (self.size * 2).min(RECV_MAX);
        } else if got < asked / 4 {
            self.size = (self.size / 2).max(RECV_MIN);
        }
    }
}

impl TlsSession {
    /// A client session that will check the server's certificate against `name`.
    pub(crate) fn client(
        fd: SharedFd,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        client_cert: Arc<ClientCert>,
    ) -> Result<TlsSession> {
        let conn = ClientConnection::new(config, name)
            .map_err(|err| Error::tls(SocketErrorStatus::TlsHandshakeFailed, err.to_string()))?;
        Ok(TlsSession::new(
            fd,
            Connection::Client(conn),
            Side::Client,
            Some(client_cert),
        ))
    }

    /// A server session.
    pub(crate) fn server(fd: SharedFd, config: Arc<ServerConfig>) -> Result<TlsSession> {
        let conn = ServerConnection::new(config)
            .map_err(|err| Error::tls(SocketErrorStatus::TlsHandshakeFailed, err.to_string()))?;
        Ok(TlsSession::new(
            fd,
            Connection::Server(conn),
            Side::Server,
            None,
        ))
    }

    fn new(
        fd: SharedFd,
        mut conn: Connection,
        side: Side,
        client_cert: Option<Arc<ClientCert>>,
    ) -> TlsSession {
        // Back-pressure is ours (WRITE_CHUNK, the OutputStream's bounds): rustls takes a
        // whole batch at once and encrypts it into full records.
        conn.set_buffer_limit(None);
        TlsSession {
            conn: RefCell::new(conn),
            side,
            client_cert,
            fd: fd.clone(),
            phase: Cell::new(Phase::Handshaking),
            failure: RefCell::new(None),
            write_closed: Cell::new(false),
            rx: RefCell::new(Rx::new()),
            read_turn: Turn::default(),
            unread: RefCell::new(Bytes::new()),
            tx: Rc::new(Tx::new(fd)),
        }
    }

    /// Fails with `WrongRuntime` where the socket's runtime does not run (another
    /// runtime, none, or after it was dropped). Every entry point asks first, before it
    /// changes anything: the session's receive and send run as tasks of its own runtime,
    /// which a call elsewhere must neither start there nor wait on, and a misused call
    /// must leave the session whole for its own runtime.
    fn on_its_runtime(&self, what: &str) -> Result<()> {
        self.fd
            .binding()
            .map(drop)
            .map_err(|err| Error::io(what, err))
    }

    /// Runs the handshake to its end. On failure the peer is sent an alert saying why
    /// (when the socket still works), and the session stays failed.
    pub(crate) async fn handshake(&self) -> Result<()> {
        self.on_its_runtime("TLS handshake")?;
        let _turn = self.read_turn.take().await;
        match self.drive_handshake().await {
            Ok(()) => {
                self.phase.set(Phase::Ready);
                Ok(())
            }
            Err(err) => {
                self.phase.set(Phase::Failed);
                let err = self.fail(err);
                // Let the alert that explains the failure reach the peer; its own
                // failure adds nothing to the error we already have.
                let _ = self.tx.wait(self.tx.queued()).await;
                Err(err)
            }
        }
    }

    async fn drive_handshake(&self) -> Result<()> {
        loop {
            self.queue_output()?;
            if !self.conn.borrow().is_handshaking() {
                break;
            }
            let ended = {
                let rx = self.rx.borrow();
                rx.eof && rx.pending().is_empty()
            };
            if ended {
                return Err(self.closed_during_handshake());
            }
            self.receive().await?;
        }
        // The last flight (a client's Finished, a server's session tickets).
        self.tx.wait(self.tx.queued()).await
    }

    fn closed_during_handshake(&self) -> Error {
        let at = self.situation();
        if at.side == Side::Client && at.certificate_requested && !at.has_certificate {
            return errors::map(
                &rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
                at,
            );
        }
        Error::tls(
            SocketErrorStatus::TlsHandshakeFailed,
            "the peer closed the connection during the TLS handshake",
        )
    }

    fn situation(&self) -> Situation {
        Situation {
            side: self.side,
            handshaking: self.phase.get() == Phase::Handshaking,
            certificate_requested: self.client_cert.as_ref().is_some_and(|c| c.requested()),
            has_certificate: self.client_cert.as_ref().is_some_and(|c| c.has_identity()),
        }
    }

    /// Records the first failure and returns `err`.
    fn fail(&self, err: Error) -> Error {
        let mut failure = self.failure.borrow_mut();
        if failure.is_none() {
            *failure = Some(duplicate(&err));
        }
        err
    }

    fn check_usable(&self) -> Result<()> {
        if let Some(err) = self.failure.borrow().as_ref() {
            return Err(duplicate(err));
        }
        match self.phase.get() {
            Phase::Ready => Ok(()),
            Phase::Handshaking => Err(Error::invalid_input(
                "the TLS handshake has not finished on this socket (still running, or \
                 given up on: a cancelled handshake leaves the socket unusable)",
            )),
            Phase::Failed => Err(Error::tls(
                SocketErrorStatus::TlsHandshakeFailed,
                "the TLS handshake failed on this socket",
            )),
        }
    }

    /// Moves whatever rustls wants to send onto the send queue.
    fn queue_output(&self) -> Result<()> {
        let mut out = Vec::new();
        drain_tls(&mut self.conn.borrow_mut(), &mut out)?;
        self.tx.push(out);
        Ok(())
    }

    /// One step of the receive side: feeds ciphertext already received to rustls, or
    /// receives more first. Alerts and key updates rustls answers with are queued.
    async fn receive(&self) -> Result<()> {
        let need_more = {
            let rx = self.rx.borrow();
            rx.pending().is_empty() && !rx.eof
        };
        if need_more {
            self.recv_more().await?;
        }
        self.feed()
    }

    /// Waits for the receive in flight (starting one if none is), keeping what it got.
    async fn recv_more(&self) -> Result<()> {
        {
            let mut rx = self.rx.borrow_mut();
            if rx.recv.is_none() {
                let buf = rx.next_buffer();
                let fd = self.fd.clone();
                rx.recv = Some(crate::runtime::spawn(
                    async move { ops::recv(&fd, buf).await },
                ));
            }
        }
        let polled = poll_fn(|cx| {
            // A read moved elsewhere while its receive was in flight (or whose runtime
            // went meanwhile) is told so; the receive stays the session's.
            self.fd.binding()?;
            let mut rx = self.rx.borrow_mut();
            match rx.recv.as_mut() {
                Some(recv) => Pin::new(recv).poll(cx).map(Ok),
                None => Poll::Ready(Ok((Err(io::ErrorKind::Other.into()), Vec::new()))),
            }
        })
        .await;
        let (result, buf) = polled.map_err(|err| Error::io("TLS read", err))?;
        let mut rx = self.rx.borrow_mut();
        rx.recv = None;
        let asked = buf.capacity();
        rx.buf = buf;
        rx.pos = 0;
        match result {
            Ok(0) => {
                rx.eof = true;
                Ok(())
            }
            Ok(n) => {
                rx.received(n, asked);
                Ok(())
            }
            Err(err) => {
                drop(rx);
                Err(self.fail(Error::io("TLS receive", err)))
            }
        }
    }

    /// Hands received ciphertext to rustls (or the end of the stream, once everything
    /// before it is taken) and processes it, stopping when rustls's plaintext buffer is
    /// full so a reader drains it first.
    fn feed(&self) -> Result<()> {
        let mut conn = self.conn.borrow_mut();
        let mut rx = self.rx.borrow_mut();
        let mut result = Ok(());
        loop {
            let pending = rx.pending();
            let at_end = pending.is_empty();
            if at_end && !rx.eof {
                break;
            }
            let mut slice = pending;
            let read = conn.read_tls(&mut slice);
            if let Ok(n) = read {
                rx.pos += n;
            }
            if let Err(err) = conn.process_new_packets() {
                result = Err(errors::map(&err, self.situation()));
                break;
            }
            let waiting = plaintext_waiting(&mut conn);
            match read {
                // Rustls's plaintext buffer is full: the reader drains it first.
                Err(_) if waiting => break,
                // Anything else that stops rustls taking bytes is fatal.
                Err(err) => {
                    result = Err(Error::tls(self.situation_status(), err.to_string()));
                    break;
                }
                Ok(0) => break,
                Ok(_) => {}
            }
            if at_end || rx.pending().is_empty() || conn.wants_write() || waiting {
                break;
            }
        }
        drop(rx);
        let mut out = Vec::new();
        let drained = drain_tls(&mut conn, &mut out);
        drop(conn);
        self.tx.push(out);
        drained?;
        result.map_err(|err| self.fail(err))
    }

    /// The status of a failure no certificate status covers.
    fn situation_status(&self) -> SocketErrorStatus {
        match self.phase.get() {
            Phase::Handshaking => SocketErrorStatus::TlsHandshakeFailed,
            _ => SocketErrorStatus::TlsProtocolError,
        }
    }

    /// Reads decrypted bytes through `copy`, which takes what fits from a slice and says
    /// how much it took. Returns the count; 0 once the peer sent `close_notify`.
    pub(crate) async fn read_with(&self, copy: &mut dyn FnMut(&[u8]) -> usize) -> Result<usize> {
        self.on_its_runtime("TLS read")?;
        let _turn = self.read_turn.take().await;
        {
            let mut unread = self.unread.borrow_mut();
            if !unread.is_empty() {
                let n = copy(&unread).min(unread.len());
                unread.advance(n);
                return Ok(n);
            }
        }
        loop {
            self.check_usable()?;
            match take_plaintext(&mut self.conn.borrow_mut(), copy) {
                Plaintext::Copied(n) => return Ok(n),
                Plaintext::End => return Ok(0),
                Plaintext::Truncated => {
                    return Err(Error::connection_closed(
                        "TLS read: the peer closed the connection without close_notify",
                    ))
                }
                Plaintext::Wait => {}
            }
            self.receive().await?;
        }
    }

    /// Puts decrypted `bytes` back in front of what the next read hands out.
    pub(crate) fn unread(&self, bytes: Bytes) {
        crate::buf::prepend(&mut self.unread.borrow_mut(), bytes);
    }

    /// Encrypts `len` bytes of `plaintext`, taken as one stream from byte `from` (small
    /// pieces share records), queues the records, and returns the send-queue position to
    /// wait for.
    fn seal(&self, plaintext: &[&[u8]], from: usize, len: usize) -> Result<u64> {
        self.check_usable()?;
        if self.write_closed.get() {
            return Err(Error::io(
                "TLS write",
                io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "this side of the TLS session is closed (close_notify sent)",
                ),
            ));
        }
        let total = from + len;
        let mut out = buffer_pool::take(len + (len / MAX_FRAGMENT + 1) * RECORD_OVERHEAD);
        let mut conn = self.conn.borrow_mut();
        let mut done = from;
        while done < total {
            // A few records at a time, drained before the next: rustls allocates each
            // record, and freeing them as we go lets the allocator reuse the same memory
            // (a whole batch's worth at once was returned to the kernel and faulted back).
            let slices = io_slices_from(plaintext, done, SEAL_STEP.min(total - done));
            let n = conn
                .writer()
                .write_vectored(&slices)
                .map_err(|err| Error::io("TLS encrypt", err))?;
            if n == 0 {
                return Err(Error::io(
                    "TLS encrypt",
                    io::Error::new(io::ErrorKind::WriteZero, "rustls took no plaintext"),
                ));
            }
            done += n;
            drain_tls(&mut conn, &mut out)?;
        }
        drop(conn);
        Ok(self.tx.push(out))
    }

    /// Encrypts and sends every byte of `data`.
    pub(crate) async fn write_all(&self, data: &[u8]) -> Result<()> {
        self.send_pieces(&[data]).await
    }

    /// Encrypts and sends `pieces` as one stream, a step of [`WRITE_CHUNK`] at a time:
    /// the next step is encrypted while the previous one is being sent, so the sender
    /// and the network (and the peer decrypting) work at the same time. Anything up to
    /// one step is sealed and submitted at once.
    async fn send_pieces(&self, pieces: &[&[u8]]) -> Result<()> {
        self.on_its_runtime("TLS write")?;
        let total: usize = pieces.iter().map(|piece| piece.len()).sum();
        let mut in_flight = None;
        let mut from = 0;
        while from < total {
            let len = WRITE_CHUNK.min(total - from);
            let target = self.seal(pieces, from, len)?;
            from += len;
            if let Some(previous) = in_flight.replace(target) {
                self.tx.wait(previous).await?;
            }
        }
        match in_flight {
            Some(target) => self.tx.wait(target).await,
            None => self.check_usable(),
        }
    }

    /// The [`OutputStream`](crate::OutputStream)'s hook: one batch of plaintext writes is
    /// encrypted into records together (small writes share records) and those records
    /// are submitted together: as one submission up to [`WRITE_CHUNK`] of plaintext,
    /// pipelined in steps of that size beyond.
    /// On failure no write of the batch counts as sent: a TLS stream cannot resume after a
    /// partly sent record.
    pub(crate) async fn send_batch(
        &self,
        bufs: Vec<Bytes>,
        report: &mut BatchReport,
    ) -> (io::Result<()>, Progress, Vec<Bytes>) {
        let before = self.tx.counters();
        let pieces: Vec<&[u8]> = bufs.iter().map(|buf| &buf[..]).collect();
        let result = self.send_pieces(&pieces).await;
        drop(pieces);
        let after = self.tx.counters();
        report.operations += after.0 - before.0;
        report.short_send_recoveries += after.1 - before.1;
        match result {
            Ok(()) => {
                let progress = Progress {
                    first: bufs.len(),
                    skip: 0,
                };
                (Ok(()), progress, bufs)
            }
            Err(err) => (Err(io::Error::from(err)), Progress::default(), bufs),
        }
    }

    /// Whether encrypted records wait to be sent (a `close_notify` not yet made is not
    /// one: without it the peer sees a FIN, not lost data).
    pub(crate) fn has_unsent_records(&self) -> bool {
        self.tx.pending()
    }

    /// Whether closing the session still has something to send: its `close_notify` (a
    /// healthy session that has not sent it) or records queued.
    pub(crate) fn has_unsent(&self) -> bool {
        let healthy = self.phase.get() == Phase::Ready && self.failure.borrow().is_none();
        (healthy && !self.write_closed.get()) || self.tx.pending()
    }

    /// The handshake was given up on (it timed out): the session fails with `why` from
    /// now on.
    pub(crate) fn give_up(&self, why: Error) {
        if self.phase.get() == Phase::Handshaking {
            self.phase.set(Phase::Failed);
        }
        self.fail(why);
    }

    /// Sends `close_notify` (once) and waits until everything queued before it is sent.
    pub(crate) async fn close_write(&self) -> Result<()> {
        self.on_its_runtime("TLS close")?;
        if !self.write_closed.replace(true) {
            self.conn.borrow_mut().send_close_notify();
            self.queue_output()?;
        }
        self.tx.wait(self.tx.queued()).await
    }

    /// What the handshake agreed on, once it has finished.
    pub(crate) fn info(&self) -> Option<TlsInfo> {
        if self.phase.get() != Phase::Ready {
            return None;
        }
        let conn = self.conn.borrow();
        let protection_level = match conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => ProtectionLevel::Tls13,
            _ => ProtectionLevel::Tls12,
        };
        let cipher_suite = conn
            .negotiated_cipher_suite()
            .and_then(|suite| suite.suite().as_str())
            .unwrap_or("unknown");
        let peer_certificates = conn
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|cert| Certificate::from_der(cert.as_ref()))
            .collect();
        let server_name = match &*conn {
            Connection::Server(server) => server.server_name().map(str::to_owned),
            Connection::Client(_) => None,
        };
        Some(TlsInfo {
            protection_level,
            cipher_suite,
            peer_certificates,
            server_name,
        })
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        if let Some(recv) = self.rx.get_mut().recv.take() {
            recv.abort();
        }
        // Close the session the way TLS asks, so the peer can tell the end from a
        // truncation; the sender task keeps the socket open until the alert is out.
        let healthy = self.phase.get() == Phase::Ready && self.failure.get_mut().is_none();
        // Only where its own runtime runs: its sender is a task there.
        if healthy && !self.write_closed.get() && self.fd.binding().is_ok() {
            self.write_closed.set(true);
            let conn = self.conn.get_mut();
            conn.send_close_notify();
            let mut out = Vec::new();
            if drain_tls(conn, &mut out).is_ok() {
                self.tx.push(out);
            }
        }
    }
}

/// What the plaintext side of rustls had for a reader.
enum Plaintext {
    Copied(usize),
    /// The peer closed the session with `close_notify` and everything was read.
    End,
    /// The TCP stream ended without `close_notify`.
    Truncated,
    /// Nothing yet.
    Wait,
}

/// Copies decrypted bytes out through `copy` until it is full or nothing is left.
fn take_plaintext(conn: &mut Connection, copy: &mut dyn FnMut(&[u8]) -> usize) -> Plaintext {
    let mut total = 0;
    loop {
        let mut reader = conn.reader();
        let (taken, offered) = match reader.fill_buf() {
            Ok([]) if total == 0 => return Plaintext::End,
            Ok([]) => return Plaintext::Copied(total),
            Ok(chunk) => (copy(chunk), chunk.len()),
            Err(_) if total > 0 => return Plaintext::Copied(total),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Plaintext::Wait,
            Err(_) => return Plaintext::Truncated,
        };
        reader.consume(taken);
        total += taken;
        if taken < offered {
            return Plaintext::Copied(total);
        }
    }
}

fn plaintext_waiting(conn: &mut Connection) -> bool {
    conn.reader()
        .fill_buf()
        .is_ok_and(|chunk| !chunk.is_empty())
}

/// Appends every record rustls has ready to send to `out`.
fn drain_tls(conn: &mut Connection, out: &mut Vec<u8>) -> Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)
            .map_err(|err| Error::io("TLS write", err))?;
    }
    Ok(())
}

/// `pieces` as I/O slices, skipping the first `skip` bytes, `limit` bytes at most.
fn io_slices_from<'a>(pieces: &[&'a [u8]], mut skip: usize, mut limit: usize) -> Vec<IoSlice<'a>> {
    let mut slices = Vec::new();
    for piece in pieces {
        if limit == 0 {
            break;
        }
        if skip >= piece.len() {
            skip -= piece.len();
            continue;
        }
        let end = piece.len().min(skip.saturating_add(limit));
        slices.push(IoSlice::new(&piece[skip..end]));
        limit -= end - skip;
        skip = 0;
    }
    slices
}

/// A fresh copy of a stored failure (Error is not Clone: it may hold an io::Error).
fn duplicate(err: &Error) -> Error {
    match err {
        Error::Tls { status, message } => Error::tls(*status, message.clone()),
        Error::Io { context, source } => match source.raw_os_error() {
            Some(errno) => Error::from_errno(context.clone(), errno),
            None => Error::io(
                context.clone(),
                io::Error::new(source.kind(), source.to_string()),
            ),
        },
        Error::ConnectionClosed { context } => Error::connection_closed(context.clone()),
        other => Error::tls(other.status(), other.to_string()),
    }
}

/// The send side: ciphertext queued in order, and one sender task that sends it.
struct Tx {
    fd: SharedFd,
    state: RefCell<TxState>,
}

#[derive(Default)]
struct TxState {
    queue: Vec<Bytes>,
    /// Buffers queued so far; buffer `n` (counting from 1) is sent once `sent >= n`.
    queued: u64,
    sent: u64,
    failure: Option<Error>,
    sending: bool,
    waiters: Vec<Waker>,
    operations: u64,
    short_send_recoveries: u64,
}

impl Tx {
    fn new(fd: SharedFd) -> Tx {
        Tx {
            fd,
            state: RefCell::new(TxState::default()),
        }
    }

    /// Queues `bytes` (nothing if empty) and makes sure the sender runs; returns the
    /// position to wait for.
    fn push(self: &Rc<Self>, bytes: Vec<u8>) -> u64 {
        let mut state = self.state.borrow_mut();
        if bytes.is_empty() || state.failure.is_some() {
            return state.queued;
        }
        state.queue.push(Bytes::from(bytes));
        state.queued += 1;
        let position = state.queued;
        if !state.sending {
            state.sending = true;
            let tx = self.clone();
            crate::runtime::spawn(async move { tx.run().await });
        }
        position
    }

    fn queued(&self) -> u64 {
        self.state.borrow().queued
    }

    /// Whether records wait to be sent (after a failure none will be).
    fn pending(&self) -> bool {
        let state = self.state.borrow();
        state.failure.is_none() && state.sent < state.queued
    }

    /// (kernel operations, short-send recoveries) so far.
    fn counters(&self) -> (u64, u64) {
        let state = self.state.borrow();
        (state.operations, state.short_send_recoveries)
    }

    /// Resolves once everything up to `position` is sent, or with the send failure.
    async fn wait(&self, position: u64) -> Result<()> {
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.sent >= position {
                return Poll::Ready(Ok(()));
            }
            if let Some(err) = &state.failure {
                return Poll::Ready(Err(duplicate(err)));
            }
            state.waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The sender task: sends the queue, everything queued so far as one batch, until it
    /// is empty.
    async fn run(self: Rc<Self>) {
        loop {
            let batch = {
                let mut state = self.state.borrow_mut();
                if state.queue.is_empty() {
                    state.sending = false;
                    return;
                }
                std::mem::take(&mut state.queue)
            };
            let count = batch.len() as u64;
            let mut report = BatchReport::default();
            let total = batch.iter().map(Bytes::len).sum();
            let (result, _, sent) =
                ops::send_stream_batch(&self.fd, batch, total, &mut report).await;
            sent.into_iter().for_each(buffer_pool::give_back);
            let mut state = self.state.borrow_mut();
            state.operations += report.operations;
            state.short_send_recoveries += report.short_send_recoveries;
            match result {
                Ok(()) => state.sent += count,
                Err(err) => {
                    state.failure = Some(Error::io("TLS send", err));
                    state.queue.clear();
                    state.sending = false;
                    state.waiters.drain(..).for_each(Waker::wake);
                    return;
                }
            }
            state.waiters.drain(..).for_each(Waker::wake);
        }
    }
}

/// Ciphertext buffers kept for reuse by the sessions of this thread: a fresh large buffer
/// per batch costs page faults that showed up as the sender's largest cost. Bounded per
/// thread (not per connection), so idle connections hold nothing.
mod buffer_pool {
    use std::cell::RefCell;

    use bytes::Bytes;

    /// Buffers kept, at most.
    const KEEP: usize = 4;
    /// Larger buffers are freed, not kept.
    const MAX_CAPACITY: usize = 4 * 1024 * 1024;

    thread_local! {
        static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty buffer with room for `capacity` bytes.
    pub(super) fn take(capacity: usize) -> Vec<u8> {
        let mut buf = POOL
            .with(|pool| pool.borrow_mut().pop())
            .unwrap_or_default();
        buf.reserve(capacity);
        buf
    }

    /// Keeps the allocation behind `bytes` if nothing else shares it and there is room.
    pub(super) fn give_back(bytes: Bytes) {
        let Ok(unique) = bytes.try_into_mut() else {
            return;
        };
        let mut buf = Vec::from(unique);
        if buf.capacity() > MAX_CAPACITY {
            return;
        }
        buf.clear();
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < KEEP {
                pool.push(buf);
            }
        });
    }
}

/// Lets one task at a time through; the others wait for their turn.
#[derive(Default)]
struct Turn {
    busy: Cell<bool>,
    waiting: RefCell<Vec<Waker>>,
}

impl Turn {
    async fn take(&self) -> TurnGuard<'_> {
        poll_fn(|cx| {
            if self.busy.replace(true) {
                self.waiting.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        TurnGuard { turn: self }
    }
}

/// Holds a [`Turn`]; releasing it wakes every waiter, so a waiter that went away cannot
/// strand the others.
struct TurnGuard<'a> {
    turn: &'a Turn,
}

impl Drop for TurnGuard<'_> {
    fn drop(&mut self) {
        self.turn.busy.set(false);
        let waiting = std::mem::take(&mut *self.turn.waiting.borrow_mut());
        waiting.into_iter().for_each(Waker::wake);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_slices_skip_whole_and_partial_pieces() {
        let pieces: [&[u8]; 3] = [b"abc", b"", b"defg"];
        let joined = |slices: Vec<IoSlice<'_>>| -> Vec<u8> {
            slices.iter().flat_map(|s| s.iter().copied()).collect()
        };
        let all = usize::MAX;
        assert_eq!(joined(io_slices_from(&pieces, 0, all)), b"abcdefg");
        assert_eq!(joined(io_slices_from(&pieces, 2, all)), b"cdefg");
        assert_eq!(joined(io_slices_from(&pieces, 3, all)), b"defg");
        assert_eq!(joined(io_slices_from(&pieces, 5, all)), b"fg");
        assert!(io_slices_from(&pieces, 7, all).is_empty());
        assert_eq!(joined(io_slices_from(&pieces, 0, 2)), b"ab");
        assert_eq!(joined(io_slices_from(&pieces, 1, 3)), b"bcd");
        assert_eq!(joined(io_slices_from(&pieces, 2, 1)), b"c");
        assert!(io_slices_from(&pieces, 0, 0).is_empty());
    }

    #[test]
    fn receive_size_adapts_within_bounds() {
        let mut rx = Rx::new();
        assert_eq!(rx.next_buffer().capacity(), RECV_MIN);
        for _ in 0..10 {
            let asked = rx.size;
            rx.received(asked, asked);
        }
        assert_eq!(rx.size, RECV_MAX);
        rx.received(RECV_MAX / 2, RECV_MAX);
        assert_eq!(rx.size, RECV_MAX, "half full keeps the size");
        for _ in 0..10 {
            let asked = rx.size;
            rx.received(10, asked);
        }
        assert_eq!(rx.size, RECV_MIN);
        // A buffer grown for bulk is not kept for a small receive.
        rx.buf = Vec::with_capacity(RECV_MAX);
        assert!(rx.next_buffer().capacity() < RECV_MAX);
    }

    #[test]
    fn duplicates_keep_status_and_text() {
        let cases = [
            Error::tls(SocketErrorStatus::CertificateExpired, "expired"),
            Error::from_errno("TLS send", libc::EPIPE),
            Error::connection_closed("TLS read"),
            Error::io("x", io::Error::new(io::ErrorKind::WriteZero, "zero")),
        ];
        for err in &cases {
            let copy = duplicate(err);
            assert_eq!(copy.status(), err.status());
            assert_eq!(copy.to_string(), err.to_string());
        }
    }
}
