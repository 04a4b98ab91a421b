//! StreamSocket: a TCP connection with owned-buffer reads and writes.

use std::cell::OnceCell;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::close::Closing;
use super::control::{StreamOptions, StreamSocketControl};
use super::ending;
use super::timeouts::{self, TimeoutKind};
use super::transport::Transport;
use super::turn::Turnstile;
use super::{new_socket, resolve, Detached, InputStream, OutputStream, SocketKind};
use crate::buf::{fill_spare, init_bytes, BufResult, IoBuf, IoBufMut};
use crate::driver::{ops, SharedFd};
use crate::host::{HostName, Protocol};
use crate::runtime;
use crate::runtime::coop;
use crate::tls::session::TlsSession;
use crate::tls::{self, ProtectionLevel, TlsAcceptor, TlsInfo};
use crate::{Error, Result};

/// A TCP connection, like Windows.Networking.Sockets.StreamSocket.
///
/// Dropping it closes the connection: at once when nothing is left to deliver, else
/// gracefully in the background (queued writes sent, then the FIN, until the peer has
/// acknowledged everything), aborted with a RST after the
/// [linger timeout](StreamSocketControl::set_linger_timeout) (5 s by default). Its
/// input and output streams end with it. [`close`](Self::close) does the same and says
/// how it went; [`abort`](Self::abort) resets at once. Timeouts (connect, idle, read,
/// write, TLS handshake) are set on its [`control`](Self::control).
///
/// With the `tokio` feature it implements tokio's `AsyncRead`/`AsyncWrite`, with
/// `futures-io` the futures ones (plain or TLS): receives land in a buffer the socket
/// owns and are copied out, writes are copies queued on its
/// [`output_stream`](Self::output_stream) and sent at once. Inside a tokio program, use it
/// within a `ringsock::tokio::Driver`'s `run_until`.
///
/// # Examples
///
/// ```
/// use ringsock::{HostName, StreamSocket, StreamSocketListener};
///
/// ringsock::block_on(async {
///     let listener = StreamSocketListener::bind_host(&HostName::new("127.0.0.1")?, "0")?;
///     let port = listener.local_addr()?.port().to_string();
///     let socket = StreamSocket::new();
///     socket.control().set_no_delay(true)?;
///     socket.connect(&HostName::new("127.0.0.1")?, &port).await?;
///     let accepted = listener.accept().await?;
///     socket.write_all(b"ping".to_vec()).await.0?;
///     let (n, buf) = accepted.read(Vec::with_capacity(16)).await;
///     assert_eq!(&buf[..n?], b"ping");
///     Ok::<_, ringsock::Error>(())
/// })?;
/// # Ok::<_, ringsock::Error>(())
/// ```
pub struct StreamSocket {
    fd: OnceCell<SharedFd>,
    options: StreamOptions,
    /// The one output stream of the connection, made on first use; every
    /// `output_stream()` is a handle to it.
    output: OnceCell<OutputStream>,
    /// Set when a TLS handshake starts; from then on every read and write goes through it.
    tls: OnceCell<Rc<TlsSession>>,
    /// The output stream once TLS has started (the plain one stays plain).
    tls_output: OnceCell<OutputStream>,
    /// One `write` or `write_all` at a time: a `write_all` takes several sends when the
    /// kernel takes part of its buffer, and another call's send between two of them
    /// would land in the middle of its bytes.
    writing: Turnstile,
    /// The state of the poll-based read and write traits, made on first use: their
    /// receive in flight and its buffer, owned here and not by the caller.
    /// In a cell so that a detach (`&self`) can take the bytes it holds.
    #[cfg(any(feature = "tokio", feature = "futures-io"))]
    poll_io: std::cell::RefCell<Option<Box<super::poll_io::PollIo>>>,
}

impl StreamSocket {
    /// An unconnected socket: set its [`control`](Self::control) options, then
    /// [`connect`](Self::connect).
    pub fn new() -> StreamSocket {
        StreamSocket {
            fd: OnceCell::new(),
            options: StreamOptions::default(),
            output: OnceCell::new(),
            tls: OnceCell::new(),
            tls_output: OnceCell::new(),
            writing: Turnstile::default(),
            #[cfg(any(feature = "tokio", feature = "futures-io"))]
            poll_io: std::cell::RefCell::new(None),
        }
    }

    /// Resolves `host` and connects to the first of its addresses that accepts, trying
    /// each in turn (like ConnectAsync(HostName, String)).
    ///
    /// `service` is a port number or a service name from /etc/services. When every
    /// address fails, the error is the last address's, so its status
    /// (ConnectionRefused, NetworkIsUnreachable, ...) says why.
    pub async fn connect(&self, host: &HostName, service: &str) -> Result<()> {
        if self.fd.get().is_some() {
            return Err(Error::invalid_input("the socket is already connected"));
        }
        let addrs = resolve(host, service, Protocol::Tcp).await?;
        let mut last = None;
        for addr in addrs {
            match self.try_connect(addr).await {
                Ok(fd) => return self.connected(fd),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| Error::NoAddresses {
            host: host.to_string(),
        }))
    }

    /// Connects like [`connect`](Self::connect), then, unless `level` is
    /// [`ProtectionLevel::PlainSocket`], runs a TLS handshake that checks the server's
    /// certificate against the trusted roots (the system's, or those set with
    /// [`StreamSocketControl::set_trusted_roots`]) and against `host`
    /// (ConnectAsync(HostName, String, SocketProtectionLevel)).
    ///
    /// A client certificate set with [`StreamSocketControl::set_client_certificate`] is
    /// presented if the server asks for one. A failed handshake is an
    /// [`Error::Tls`] whose status says why, e.g. `CertificateUntrustedRoot`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use ringsock::{HostName, ProtectionLevel, StreamSocket};
    ///
    /// ringsock::block_on(async {
    ///     let socket = StreamSocket::new();
    ///     socket.connect_with(&HostName::new("example.com")?, "443", ProtectionLevel::Tls13).await?;
    ///     assert_eq!(socket.tls_info().unwrap().protection_level, ProtectionLevel::Tls13);
    ///     Ok::<_, ringsock::Error>(())
    /// })?;
    /// # Ok::<_, ringsock::Error>(())
    /// ```
    pub async fn connect_with(
        &self,
        host: &HostName,
        service: &str,
        level: ProtectionLevel,
    ) -> Result<()> {
        self.connect(host, service).await?;
        if level == ProtectionLevel::PlainSocket {
            return Ok(());
        }
        self.upgrade_to_tls(level, host).await
    }

    /// Turns this connected plain socket into a TLS client (UpgradeToSslAsync): the
    /// server's certificate must be valid for `validation_host`. Take the
    /// [`input_stream`](Self::input_stream) and [`output_stream`](Self::output_stream)
    /// after this returns: streams taken before keep reading and writing plain bytes.
    pub async fn upgrade_to_tls(
        &self,
        level: ProtectionLevel,
        validation_host: &HostName,
    ) -> Result<()> {
        let fd = self.fd()?;
        let roots = self.options.trusted_roots.borrow().clone();
        let identity = self.options.client_certificate.borrow().clone();
        let (config, client_cert) =
            tls::config::client_config(level, roots.as_ref(), identity.as_ref())?;
        let name = tls::config::server_name(validation_host)?;
        let session = TlsSession::client(fd.clone(), config, name, client_cert)?;
        let limit = self.options.timeouts.handshake.get();
        self.handshake(session, limit).await
    }

    /// Runs the server side of a TLS handshake on this accepted socket with `acceptor`'s
    /// certificate and client-certificate policy. Afterwards
    /// [`tls_info`](Self::tls_info) tells the verified client certificate, if any.
    ///
    /// A handshake not finished within the acceptor's
    /// [handshake timeout](crate::tls::TlsAcceptorBuilder::handshake_timeout) (10 s by
    /// default; the socket's own, if one is set on its control) fails with
    /// `ConnectionTimedOut` and closes the connection, however the client trickles its
    /// bytes.
    pub async fn accept_tls(&self, acceptor: &TlsAcceptor) -> Result<()> {
        let fd = self.fd()?;
        let session = TlsSession::server(fd.clone(), acceptor.config.clone())?;
        let limit = self
            .options
            .timeouts
            .handshake
            .get()
            .or(acceptor.handshake_timeout);
        self.handshake(session, limit).await
    }

    /// Starts TLS with `session` and runs its handshake within `limit`.
    async fn handshake(&self, session: TlsSession, limit: Option<Duration>) -> Result<()> {
        // Before the session is attached: a call from another runtime changes nothing.
        let fd = self.fd()?;
        fd.binding().map_err(|err| Error::io("start TLS", err))?;
        // A poll-based read given up on (a tokio `select!`) is the socket's, not the
        // program's, to drop: what it and the bytes read ahead took goes to the session
        // first, in order.
        self.hand_back_read_ahead(fd);
        let session = self.start_tls(session)?;
        let Some(limit) = limit else {
            return session.handshake().await;
        };
        match runtime::timeout_lenient(limit, session.handshake()).await {
            Ok(done) => done,
            Err(_) => {
                let fd = self.fd()?;
                let timeouts = &self.options.timeouts;
                timeouts::expire(fd, timeouts, TimeoutKind::Handshake, limit);
                let err = fd.ended().map(Error::from).unwrap_or_else(|| {
                    Error::timed_out(format!("TLS handshake not finished within {limit:?}"))
                });
                session.give_up(err.clone());
                Err(err)
            }
        }
    }

    fn start_tls(&self, session: TlsSession) -> Result<&Rc<TlsSession>> {
        if self.tls.get().is_some() {
            return Err(Error::invalid_input(
                "TLS was already started on this socket",
            ));
        }
        // A plain read waiting now would take the handshake's bytes (and lose them for
        // the session): refused until it ends or is dropped.
        if self.fd()?.is_reading() {
            return Err(Error::from_errno(
                "start TLS: a plain read is waiting on this socket; end or drop it first",
                libc::EBUSY,
            ));
        }
        self.options.tls_started.set(true);
        let _ = self.tls.set(Rc::new(session));
        self.tls
            .get()
            .ok_or_else(|| Error::invalid_input("TLS was already started on this socket"))
    }

    /// What the TLS handshake agreed on (version, cipher suite, the peer's certificate);
    /// `None` on a plain socket or before the handshake has finished.
    pub fn tls_info(&self) -> Option<TlsInfo> {
        self.tls.get().and_then(|session| session.info())
    }

    /// Connects to one socket address. Port 0 is InvalidArgument: nothing listens there.
    pub async fn connect_addr(&self, addr: SocketAddr) -> Result<()> {
        if self.fd.get().is_some() {
            return Err(Error::invalid_input("the socket is already connected"));
        }
        let fd = self.try_connect(addr).await?;
        self.connected(fd)
    }

    /// Keeps the socket of a successful connect, and starts watching its timeouts.
    fn connected(&self, fd: SharedFd) -> Result<()> {
        // Only a connect sets it: a second connect fails before it gets here, or here.
        self.fd
            .set(fd)
            .map_err(|_| Error::invalid_input("the socket is already connected"))?;
        self.options.timeouts.watch(self.fd()?);
        Ok(())
    }

    /// A new socket connected to `host` and `service`, with default options.
    pub async fn connect_to(host: &HostName, service: &str) -> Result<StreamSocket> {
        let socket = StreamSocket::new();
        socket.connect(host, service).await?;
        Ok(socket)
    }

    async fn try_connect(&self, addr: SocketAddr) -> Result<SharedFd> {
        // The kernel would answer ECONNREFUSED, as if a server had refused: there is none.
        if addr.port() == 0 {
            return Err(Error::invalid_input(format!(
                "connect to {addr}: port 0 is no destination"
            )));
        }
        let socket = new_socket(&addr, socket2::Type::STREAM)?;
        let fd = SharedFd::new(OwnedFd::from(socket));
        self.options.apply(&fd)?;
        let connecting = ops::connect(&fd, addr);
        let connected = match self.options.timeouts.connect.get() {
            None => connecting.await,
            // Dropping the connect on time-out cancels it; the socket goes with it.
            Some(limit) => match runtime::timeout_lenient(limit, connecting).await {
                Ok(connected) => connected,
                Err(_) => {
                    self.options.timeouts.count(TimeoutKind::Connect);
                    return Err(Error::timed_out(format!(
                        "connect to {addr}: no answer within {limit:?}"
                    )));
                }
            },
        };
        connected.map_err(|err| Error::io(format!("connect to {addr}"), err))?;
        Ok(fd)
    }

    /// Wraps a socket the listener accepted.
    pub(crate) fn accepted(fd: OwnedFd, options: &StreamOptions) -> Result<StreamSocket> {
        let fd = SharedFd::new(fd);
        options.apply(&fd)?;
        let socket = StreamSocket {
            fd: OnceCell::new(),
            options: options.for_accepted(),
            output: OnceCell::new(),
            tls: OnceCell::new(),
            tls_output: OnceCell::new(),
            writing: Turnstile::default(),
            #[cfg(any(feature = "tokio", feature = "futures-io"))]
            poll_io: std::cell::RefCell::new(None),
        };
        socket.connected(fd)?;
        Ok(socket)
    }

    /// The poll-based traits' state, made on first use.
    #[cfg(any(feature = "tokio", feature = "futures-io"))]
    pub(super) fn poll_io(&mut self) -> &mut super::poll_io::PollIo {
        self.poll_io.get_mut().get_or_insert_with(Default::default)
    }

    /// A read like [`read`](Self::read) that owns everything it uses (descriptor, TLS
    /// session, timeouts), for a caller that keeps it across polls.
    #[cfg(any(feature = "tokio", feature = "futures-io"))]
    pub(super) fn read_owned(
        &self,
        mut buf: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = BufResult<usize, Vec<u8>>>>> {
        let fd = self.fd().cloned();
        let tls = self.tls.get().cloned();
        let timeouts = self.options.timeouts.clone();
        Box::pin(async move {
            let fd = match fd {
                Ok(fd) => fd,
                Err(err) => return (Err(err), buf),
            };
            if let Some(session) = tls {
                let mut copy = |plain: &[u8]| fill_spare(&mut buf, plain);
                let reading = session.read_with(&mut copy);
                let result = timeouts::within_read_timeout(&timeouts, reading).await;
                return (result, buf);
            }
            timeouts::recv_within(&fd, buf, &timeouts).await
        })
    }

    /// [`shutdown_write`](Self::shutdown_write) owning what it uses.
    #[cfg(any(feature = "tokio", feature = "futures-io"))]
    pub(super) fn shutdown_owned(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>> {
        let fd = self.fd().cloned();
        let tls = self.tls.get().cloned();
        Box::pin(async move {
            let fd = fd?;
            if let Some(session) = tls {
                session.close_write().await?;
            }
            ops::shutdown(&fd, Shutdown::Write)
                .await
                .map_err(|err| Error::io("shutdown", err))
        })
    }

    pub(crate) fn fd(&self) -> Result<&SharedFd> {
        self.fd
            .get()
            .ok_or_else(|| Error::invalid_input("the socket is not connected"))
    }

    /// The socket's options (StreamSocket.Control).
    pub fn control(&self) -> StreamSocketControl<'_> {
        StreamSocketControl {
            options: &self.options,
            connected: Some(&self.fd),
            listening: None,
        }
    }

    /// Reads once into the spare capacity of `buf` (`capacity - len` bytes at most) and
    /// returns how many bytes arrived; 0 means the peer closed its side in order. A peer
    /// that reset the connection is `ConnectionResetByPeer` for this read and every one
    /// after it (Linux tells one call only, then shows an end of stream). With a
    /// [read timeout](StreamSocketControl::set_read_timeout), a read that gets nothing in
    /// time fails with `ConnectionTimedOut` and loses nothing.
    pub async fn read<B: IoBufMut>(&self, mut buf: B) -> BufResult<usize, B> {
        let fd = match self.fd() {
            Ok(fd) => fd,
            Err(err) => return (Err(err), buf),
        };
        if buf.bytes_total() == buf.bytes_init() {
            return (
                Err(Error::invalid_input(
                    "read needs a buffer with spare capacity (Vec::with_capacity)",
                )),
                buf,
            );
        }
        self.hand_back_read_ahead(fd);
        let timeouts = &self.options.timeouts;
        if let Some(session) = self.tls.get() {
            let mut copy = |plain: &[u8]| fill_spare(&mut buf, plain);
            let reading = session.read_with(&mut copy);
            let result = coop::budgeted(timeouts::within_read_timeout(timeouts, reading)).await;
            return (result, buf);
        }
        coop::budgeted(timeouts::recv_within(fd, buf, timeouts)).await
    }

    /// Gives the bytes the poll-based read traits received ahead of their caller back to
    /// the socket (or its TLS session), so that a read of another kind gets them first.
    fn hand_back_read_ahead(&self, fd: &SharedFd) {
        #[cfg(any(feature = "tokio", feature = "futures-io"))]
        if let Some(state) = self.poll_io.borrow_mut().as_mut() {
            let ahead = state.take_read_ahead();
            if !ahead.is_empty() {
                match self.tls.get() {
                    Some(session) => session.unread(ahead),
                    None => fd.unread(ahead),
                }
            }
        }
        #[cfg(not(any(feature = "tokio", feature = "futures-io")))]
        let _ = fd;
    }

    /// Sends once; returns how many bytes the kernel took (possibly fewer than all).
    /// Through TLS every byte is encrypted and sent before this returns.
    ///
    /// Calls from several tasks take turns, as for [`write_all`](Self::write_all).
    pub async fn write<B: IoBuf>(&self, buf: B) -> BufResult<usize, B> {
        let fd = match self.fd() {
            Ok(fd) => fd,
            Err(err) => return (Err(err), buf),
        };
        let _turn = self.writing.take().await;
        if let Err(err) = self.send_queued_first().await {
            return (Err(err), buf);
        }
        let _direct = fd.direct_write();
        if let Some(session) = self.tls.get() {
            let result = coop::budgeted(session.write_all(init_bytes(&buf))).await;
            let len = buf.bytes_init();
            return (result.map(|()| len), buf);
        }
        let (result, buf) = coop::budgeted(ops::send(fd, buf)).await;
        (result.map_err(|err| Error::io("write", err)), buf)
    }

    /// Sends every byte of `buf`.
    ///
    /// Calls from several tasks on one socket take turns: the bytes of one `write_all`
    /// go out together, never with another's (or a [`write`](Self::write)'s) in their
    /// middle. A call dropped half-way leaves what it sent sent.
    pub async fn write_all<B: IoBuf>(&self, buf: B) -> BufResult<(), B> {
        let fd = match self.fd() {
            Ok(fd) => fd,
            Err(err) => return (Err(err), buf),
        };
        let _turn = self.writing.take().await;
        if let Err(err) = self.send_queued_first().await {
            return (Err(err), buf);
        }
        let _direct = fd.direct_write();
        if let Some(session) = self.tls.get() {
            let result = coop::budgeted(session.write_all(init_bytes(&buf))).await;
            return (result, buf);
        }
        let mut slice = Offset { buf, start: 0 };
        while slice.start < slice.buf.bytes_init() {
            let (result, back) = coop::budgeted(ops::send(fd, slice)).await;
            slice = back;
            match result {
                Ok(0) => {
                    return (
                        Err(Error::io("write", std::io::ErrorKind::WriteZero.into())),
                        slice.buf,
                    )
                }
                Ok(n) => slice.start += n,
                Err(err) => return (Err(Error::io("write", err)), slice.buf),
            }
        }
        (Ok(()), slice.buf)
    }

    /// Sends what the socket's output streams still hold (writes queued through them or
    /// through the poll-based write traits, which queue there), for a write or a FIN
    /// about to go straight to the kernel: bytes accepted earlier go out earlier.
    async fn send_queued_first(&self) -> Result<()> {
        for output in [self.output.get(), self.tls_output.get()]
            .into_iter()
            .flatten()
        {
            if output.has_unsent() {
                output.flush().await?;
            }
        }
        Ok(())
    }

    /// A reader over this connection with line reading (StreamReader.ReadLineAsync).
    ///
    /// Each call makes a new reader; one dropped with bytes it read ahead gives them back,
    /// so the next reader (or [`read`](Self::read)) gets them first.
    pub fn input_stream(&self) -> InputStream {
        if let Some(fd) = self.fd.get() {
            self.hand_back_read_ahead(fd);
        }
        InputStream::new(self.fd.get().cloned())
            .with_tls(self.tls.get().cloned())
            .with_timeouts(self.options.timeouts.clone())
    }

    /// A writer that queues writes and sends them together on `flush` (FlushAsync).
    ///
    /// Every call on a connected socket returns a handle to the same stream, so writes
    /// made through any of them keep one order. A [`write`](Self::write) /
    /// [`write_all`](Self::write_all) sends what the stream holds first, so bytes written
    /// earlier arrive earlier (the poll-based write traits queue here too); writes
    /// queued while one of them is under way may still go out beside it.
    ///
    /// Once TLS has started, this returns a stream that goes through it (each write and
    /// each batch is encrypted and sent whole); a handle taken before stays plain.
    pub fn output_stream(&self) -> OutputStream {
        match (self.fd.get(), self.tls.get()) {
            (Some(fd), Some(session)) => self
                .tls_output
                .get_or_init(|| {
                    let transport = Transport::Tls(session.clone());
                    OutputStream::with_transport(Some(fd.clone()), transport)
                })
                .clone(),
            (Some(fd), None) => self
                .output
                .get_or_init(|| OutputStream::new(Some(fd.clone())))
                .clone(),
            // Not connected: a stream whose writes fail; not kept, so that one made
            // after `connect` sends on the connection.
            (None, _) => OutputStream::new(None),
        }
    }

    /// Closes the sending direction (FIN); the peer reads end-of-stream, while this side
    /// can still read. Writes still queued in the socket's output streams are sent first
    /// (as [`close`](Self::close) sends them: a FIN ahead of them would lose them), waited
    /// for as a flush waits (within the write timeout, if one is set); a failure to send
    /// them is returned and no FIN goes. A stream that failed before holds nothing to
    /// send. Through TLS, `close_notify` is sent first.
    pub async fn shutdown_write(&self) -> Result<()> {
        let fd = self.fd()?;
        // After a `write_all` under way, not in the middle of its bytes.
        let _turn = self.writing.take().await;
        self.send_queued_first().await?;
        if let Some(session) = self.tls.get() {
            session.close_write().await?;
        }
        ops::shutdown(fd, Shutdown::Write)
            .await
            .map_err(|err| Error::io("shutdown", err))
    }

    /// Closes the connection gracefully within `timeout`: sends what is queued (writes
    /// of the output streams, a TLS `close_notify`), shuts the sending side down, then
    /// reads and discards what the peer still sends until the peer has acknowledged
    /// every byte and the FIN. Ok means the peer's TCP received everything.
    ///
    /// Past `timeout` it aborts (a RST; whatever is still queued is dropped) and fails
    /// with `ConnectionTimedOut`; a failure on the way (say, the peer reset) aborts too
    /// and is returned. It never blocks the thread (no SO_LINGER wait in `close`). The
    /// socket's input and output streams end with it (their calls fail with
    /// `OperationAborted`); the descriptor is released once they are gone too.
    pub async fn close(mut self, timeout: Duration) -> Result<()> {
        let Some(closing) = self.closing("the socket was closed") else {
            return Ok(());
        };
        if let Some(ended) = closing.fd.ended() {
            return Err(Error::from(ended));
        }
        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
        closing.graceful(deadline).await
    }

    /// Aborts the connection (SO_LINGER {on, 0}, then close): the peer gets a RST
    /// (`ConnectionResetByPeer`), and whatever is queued either way is dropped. Every
    /// operation still waiting on it (through its streams) fails.
    pub fn abort(mut self) {
        if let Some(closing) = self.closing("the connection was aborted") {
            ending::abort(
                &closing.fd,
                Error::from_errno("the connection was aborted", libc::ECONNABORTED),
            );
        }
    }

    /// Takes what closing the connection needs out of the socket, stopping its watchdog;
    /// `None` if it never connected.
    fn closing(&mut self, ended_by: &'static str) -> Option<Closing> {
        // A receive of the poll-based traits is cancelled before the close reads.
        #[cfg(any(feature = "tokio", feature = "futures-io"))]
        drop(self.poll_io.get_mut().take());
        self.options.timeouts.stop_watching();
        let fd = self.fd.take()?;
        let outputs = [self.output.take(), self.tls_output.take()];
        Some(Closing {
            fd,
            outputs: outputs.into_iter().flatten().collect(),
            tls: self.tls.take(),
            timeouts: self.options.timeouts.clone(),
            ended_by,
        })
    }

    /// The local address of a connected socket.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        sock_addr(self.fd()?.sock().local_addr(), "local address")
    }

    /// The remote address of a connected socket.
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        sock_addr(self.fd()?.sock().peer_addr(), "peer address")
    }
}

impl Drop for StreamSocket {
    fn drop(&mut self) {
        if let Some(closing) = self.closing("the socket was dropped") {
            closing.in_background();
        }
    }
}

impl Default for StreamSocket {
    fn default() -> Self {
        StreamSocket::new()
    }
}

impl std::fmt::Debug for StreamSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSocket")
            .field("local", &self.local_addr().ok())
            .field("peer", &self.peer_addr().ok())
            .finish()
    }
}

pub(crate) fn sock_addr(
    addr: std::io::Result<socket2::SockAddr>,
    what: &str,
) -> Result<SocketAddr> {
    let addr = addr.map_err(|err| Error::io(what, err))?;
    addr.as_socket()
        .ok_or_else(|| Error::invalid_input(format!("{what} is not an IP address")))
}

/// A buffer with its first `start` bytes already sent.
struct Offset<B> {
    buf: B,
    start: usize,
}

#[allow(unsafe_code)]
// SAFETY: points inside the wrapped buffer, whose memory is stable (IoBuf's contract);
// `start <= bytes_init` is kept by write_all.
unsafe impl<B: IoBuf> IoBuf for Offset<B> {
    fn stable_ptr(&self) -> *const u8 {
        self.buf.stable_ptr().wrapping_add(self.start)
    }
    fn bytes_init(&self) -> usize {
        self.buf.bytes_init() - self.start
    }
}

/// Sockets in and out: std, raw descriptors, and other runtimes.
impl StreamSocket {
    /// Takes a connected std stream (made non-blocking); it belongs to the runtime
    /// running on this thread, or to the first that uses it.
    pub fn from_std(stream: std::net::TcpStream) -> Result<StreamSocket> {
        Detached::from_fd(OwnedFd::from(stream))?.into_stream()
    }

    /// Wraps a descriptor detached elsewhere (see [`Detached::into_stream`]); its reads
    /// hand out `carried` first.
    pub(crate) fn adopt(fd: OwnedFd, carried: Bytes, reset: bool) -> Result<StreamSocket> {
        let socket = StreamSocket::accepted(fd, &StreamOptions::default())?;
        socket.fd()?.set_carried(carried);
        if reset {
            socket.fd()?.mark_reset();
        }
        Ok(socket)
    }

    /// Takes the connection off this runtime, for another thread's runtime or another
    /// process: writes queued on its output stream are sent first, operations in flight
    /// on it (a read in another task, say) are cancelled, and handles made from it
    /// (input and output streams) stop working. Bytes not read yet stay in the kernel
    /// and are read by whoever adopts it; so are those the poll-based read traits
    /// (tokio's, futures') received ahead of the caller, which go along with it (see
    /// [`Detached::carried_bytes`]). An [`InputStream`]'s buffer stays with it
    /// ([`InputStream::buffered`]).
    ///
    /// Afterwards this socket is a spent handle: its calls fail, socket options
    /// included (its descriptor number names /dev/null, so it holds nothing of the
    /// socket, whose new owner alone decides when it ends). A TLS stream cannot be
    /// detached (its session state lives here): that is an `UnsupportedOperation` error
    /// and the socket stays as it was.
    pub async fn detach(&self) -> Result<Detached> {
        if self.tls.get().is_some() {
            return Err(Error::io(
                "detach",
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "a TLS stream cannot be detached: its session stays with this runtime",
                ),
            ));
        }
        let fd = self.fd()?.clone();
        if let Some(output) = self.output.get() {
            output.flush().await?;
        }
        let owned = fd.detach().map_err(|err| Error::io("detach", err))?;
        // Its idle and write limits are the new owner's business now.
        self.options.timeouts.stop_watching();
        let unread = self.unread(&fd);
        let detached = Detached::new(owned, SocketKind::Stream, Vec::new());
        Ok(detached.with_bytes(unread).with_reset(fd.was_reset()))
    }

    /// Bytes received and read by no one, for a detach: those the poll-based read
    /// traits hold (received before the rest), then those this socket was carried and
    /// has not handed out.
    fn unread(&self, fd: &SharedFd) -> Bytes {
        let mut unread = bytes::BytesMut::new();
        #[cfg(any(feature = "tokio", feature = "futures-io"))]
        if let Some(state) = self.poll_io.borrow_mut().as_mut() {
            state.take_unread(&mut unread);
        }
        unread.extend_from_slice(&fd.take_all_carried());
        unread.freeze()
    }

    /// The connection as a blocking std stream, taken off this runtime as
    /// [`detach`](Self::detach) does. Bytes the poll-based read traits received ahead of
    /// the caller have no place in a std stream and are dropped: read them first, or
    /// detach instead. A TLS socket cannot leave its session: that is
    /// `UnsupportedOperation`, and the socket, consumed by the call, is closed as if
    /// dropped (call [`detach`](Self::detach), which keeps it on an error, to find out
    /// first).
    pub async fn into_std(self) -> Result<std::net::TcpStream> {
        let stream = std::net::TcpStream::from(self.detach().await?.into_fd());
        stream
            .set_nonblocking(false)
            .map_err(|err| Error::io("make the socket blocking", err))?;
        Ok(stream)
    }
}

impl AsRawFd for StreamSocket {
    /// The descriptor, or -1 while the socket is not connected.
    fn as_raw_fd(&self) -> RawFd {
        self.fd.get().map_or(-1, SharedFd::raw)
    }
}

impl AsFd for StreamSocket {
    /// The descriptor.
    ///
    /// # Panics
    ///
    /// While the socket is not connected: it has no descriptor before `connect`.
    fn as_fd(&self) -> BorrowedFd<'_> {
        let fd = self
            .fd
            .get()
            .expect("StreamSocket::as_fd: the socket is not connected");
        // The SharedFd (and its descriptor) lives as long as `self`.
        fd.borrow_fd()
    }
}
