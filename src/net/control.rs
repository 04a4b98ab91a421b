//! Socket options, set like StreamSocketControl: before connecting, or on a live socket.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use super::timeouts::{check_limit, TimeoutCounts, Timeouts};
use crate::driver::SharedFd;
use crate::tls::{Identity, TrustedRoots};
use crate::{Error, Result};

/// Options a [`StreamSocket`](super::StreamSocket) applies when it connects.
pub(crate) struct StreamOptions {
    pub(crate) no_delay: Cell<bool>,
    pub(crate) keep_alive: Cell<Option<Duration>>,
    pub(crate) send_buffer_size: Cell<Option<usize>>,
    pub(crate) receive_buffer_size: Cell<Option<usize>>,
    /// Presented when a TLS server asks for a client certificate.
    pub(crate) client_certificate: RefCell<Option<Identity>>,
    /// Roots a TLS server's certificate must chain to; `None` means the system's.
    pub(crate) trusted_roots: RefCell<Option<TrustedRoots>>,
    /// A TLS handshake has started: the TLS options can no longer change.
    pub(crate) tls_started: Cell<bool>,
    /// Shared with the socket's input streams and its watchdog.
    pub(crate) timeouts: Rc<Timeouts>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            // As in Windows.Networking.Sockets: latency first, Nagle off.
            no_delay: Cell::new(true),
            keep_alive: Cell::new(None),
            send_buffer_size: Cell::new(None),
            receive_buffer_size: Cell::new(None),
            client_certificate: RefCell::new(None),
            trusted_roots: RefCell::new(None),
            tls_started: Cell::new(false),
            timeouts: Rc::default(),
        }
    }
}

impl StreamOptions {
    /// The options of a socket a listener with these options accepted: a copy, whose
    /// expired timeouts count into the listener's counts.
    pub(crate) fn for_accepted(&self) -> StreamOptions {
        StreamOptions {
            no_delay: self.no_delay.clone(),
            keep_alive: self.keep_alive.clone(),
            send_buffer_size: self.send_buffer_size.clone(),
            receive_buffer_size: self.receive_buffer_size.clone(),
            client_certificate: self.client_certificate.clone(),
            trusted_roots: self.trusted_roots.clone(),
            tls_started: Cell::new(false),
            timeouts: Rc::new(self.timeouts.for_accepted()),
        }
    }

    /// Applies every option to `fd`.
    pub(crate) fn apply(&self, fd: &SharedFd) -> Result<()> {
        let sock = fd.sock();
        sock.set_nodelay(self.no_delay.get())
            .map_err(|e| Error::io("set TCP_NODELAY", e))?;
        apply_keep_alive(fd, self.keep_alive.get())?;
        if let Some(size) = self.send_buffer_size.get() {
            sock.set_send_buffer_size(size)
                .map_err(|e| Error::io("set SO_SNDBUF", e))?;
        }
        if let Some(size) = self.receive_buffer_size.get() {
            sock.set_recv_buffer_size(size)
                .map_err(|e| Error::io("set SO_RCVBUF", e))?;
        }
        Ok(())
    }
}

/// The longest keep-alive idle time Linux accepts (MAX_TCP_KEEPIDLE), in seconds.
const MAX_KEEP_ALIVE_IDLE_SECS: u64 = 32767;

fn apply_keep_alive(fd: &SharedFd, idle: Option<Duration>) -> Result<()> {
    let sock = fd.sock();
    match idle {
        None => sock
            .set_keepalive(false)
            .map_err(|e| Error::io("set SO_KEEPALIVE", e)),
        Some(idle) => {
            let params = socket2::TcpKeepalive::new().with_time(idle);
            sock.set_tcp_keepalive(&params)
                .map_err(|e| Error::io("set TCP keepalive", e))
        }
    }
}

/// The options of one stream socket, like StreamSocket.Control. Set them before
/// `connect`; on a connected socket a setter applies at once.
pub struct StreamSocketControl<'a> {
    pub(crate) options: &'a StreamOptions,
    /// A stream socket's descriptor, read at each call: a control taken before the
    /// connect applies what it is told after it to the connected socket.
    pub(crate) connected: Option<&'a std::cell::OnceCell<SharedFd>>,
    /// A listener's own socket: buffer sizes go on it too, so that connections take
    /// them from their first segment (the window their SYN-ACK offers), not only once
    /// accepted.
    pub(crate) listening: Option<&'a SharedFd>,
}

impl<'a> StreamSocketControl<'a> {
    /// The connected socket's descriptor, once there is one.
    fn fd(&self) -> Option<&'a SharedFd> {
        self.connected.and_then(std::cell::OnceCell::get)
    }

    /// Disables Nagle's algorithm (TCP_NODELAY). On by default, as on Windows.
    pub fn set_no_delay(&self, no_delay: bool) -> Result<()> {
        self.options.no_delay.set(no_delay);
        match self.fd() {
            Some(fd) => fd
                .sock()
                .set_nodelay(no_delay)
                .map_err(|e| Error::io("set TCP_NODELAY", e)),
            None => Ok(()),
        }
    }

    /// Whether Nagle's algorithm is disabled.
    pub fn no_delay(&self) -> bool {
        self.options.no_delay.get()
    }

    /// Sends keep-alive probes after `idle` without traffic; `None` turns them off.
    ///
    /// `idle` counts in whole seconds, from 1 to 32767 (Linux's limit, about 9 hours); a
    /// fraction of a second is dropped, as the kernel keeps whole seconds only (and
    /// [`keep_alive`](Self::keep_alive) then says so); anything else is
    /// `InvalidArgument` and changes nothing. On a connected socket the value is kept
    /// only if the kernel took it.
    pub fn set_keep_alive(&self, idle: Option<Duration>) -> Result<()> {
        if let Some(idle) = idle {
            // Checked here because a value the kernel refuses would otherwise fail every
            // later connect, and every accept of a listener it was set on.
            if !(1..=MAX_KEEP_ALIVE_IDLE_SECS).contains(&idle.as_secs()) {
                return Err(Error::invalid_input(format!(
                    "keep-alive idle time {idle:?} is out of range \
                     (1 to {MAX_KEEP_ALIVE_IDLE_SECS} whole seconds)"
                )));
            }
        }
        let idle = idle.map(|idle| Duration::from_secs(idle.as_secs()));
        if let Some(fd) = self.fd() {
            apply_keep_alive(fd, idle)?;
        }
        self.options.keep_alive.set(idle);
        Ok(())
    }

    /// The keep-alive idle time, if keep-alive is on.
    pub fn keep_alive(&self) -> Option<Duration> {
        self.options.keep_alive.get()
    }

    /// Requests a send buffer of `bytes` (SO_SNDBUF; the kernel doubles and clamps it).
    ///
    /// On a listener it is set on the listening socket as well, which connections take
    /// it from before they are accepted.
    pub fn set_send_buffer_size(&self, bytes: usize) -> Result<()> {
        let wanted = &self.options.send_buffer_size;
        set_buffer_size(
            wanted,
            self.fd().or(self.listening),
            SocketBuffer::Send,
            bytes,
        )
    }

    /// Requests a receive buffer of `bytes` (SO_RCVBUF; the kernel doubles and clamps it).
    ///
    /// On a listener it is set on the listening socket as well: the window a new
    /// connection offers in its first segment then matches it already (set after the
    /// handshake, a smaller buffer would shrink under data already in flight).
    pub fn set_receive_buffer_size(&self, bytes: usize) -> Result<()> {
        let wanted = &self.options.receive_buffer_size;
        set_buffer_size(
            wanted,
            self.fd().or(self.listening),
            SocketBuffer::Receive,
            bytes,
        )
    }

    /// The kernel's send buffer size of a connected socket, or of a listening one.
    pub fn send_buffer_size(&self) -> Result<usize> {
        buffer_size(self.live()?, SocketBuffer::Send)
    }

    /// The kernel's receive buffer size of a connected socket, or of a listening one.
    pub fn receive_buffer_size(&self) -> Result<usize> {
        buffer_size(self.live()?, SocketBuffer::Receive)
    }

    /// The certificate and key presented when a TLS server asks for a client certificate
    /// (StreamSocketControl.ClientCertificate). Set it before the handshake
    /// ([`connect_with`](super::StreamSocket::connect_with) or
    /// [`upgrade_to_tls`](super::StreamSocket::upgrade_to_tls)); afterwards it is an error.
    pub fn set_client_certificate(&self, identity: Identity) -> Result<()> {
        self.before_tls("the client certificate")?;
        *self.options.client_certificate.borrow_mut() = Some(identity);
        Ok(())
    }

    /// The client certificate that will be (or was) presented, if one was set.
    pub fn client_certificate(&self) -> Option<Identity> {
        self.options.client_certificate.borrow().clone()
    }

    /// The authorities a TLS server's certificate must chain to, instead of the system's
    /// roots (a CA bundle). Set it before the handshake.
    pub fn set_trusted_roots(&self, roots: TrustedRoots) -> Result<()> {
        self.before_tls("the trusted roots")?;
        *self.options.trusted_roots.borrow_mut() = Some(roots);
        Ok(())
    }

    /// The authorities set with [`set_trusted_roots`](Self::set_trusted_roots), if any.
    pub fn trusted_roots(&self) -> Option<TrustedRoots> {
        self.options.trusted_roots.borrow().clone()
    }

    /// How long a connection attempt may wait for an answer before it fails with
    /// `ConnectionTimedOut` (counted in [`timeout_counts`](Self::timeout_counts)); each
    /// address of a host name gets this long. `None` (the default) leaves it to the
    /// kernel, which gives up after about two minutes of unanswered SYNs.
    pub fn set_connect_timeout(&self, limit: Option<Duration>) -> Result<()> {
        check_limit("connect timeout", limit)?;
        self.options.timeouts.connect.set(limit);
        Ok(())
    }

    /// The connect timeout, if one is set.
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.options.timeouts.connect.get()
    }

    /// Closes the connection when no byte has gone either way for `limit`: the calls
    /// waiting on it fail with `ConnectionTimedOut`, later ones too, and the peer gets a
    /// FIN (a RST if data is still queued for it). Bytes count when the kernel hands them
    /// over (a receive) or takes them (a send). `None` (the default): never.
    ///
    /// On a listener's control it applies to every socket the listener accepts, from the
    /// moment it is accepted (a TLS handshake counts as traffic too).
    pub fn set_idle_timeout(&self, limit: Option<Duration>) -> Result<()> {
        check_limit("idle timeout", limit)?;
        self.options.timeouts.idle.set(limit);
        self.rewatch("set the idle timeout")
    }

    /// The idle timeout, if one is set.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.options.timeouts.idle.get()
    }

    /// Fails a read (`read`, and the reads of the socket's
    /// [`InputStream`](super::InputStream)s) that gets nothing for `limit`, with
    /// `ConnectionTimedOut`. Only that read fails: the socket stays usable, and nothing
    /// is lost — bytes that arrive as the read gives up are returned by it, or by the
    /// next read (through TLS the receive goes on in the background). `None` (the
    /// default): never. A read takes the limit when it starts: one already waiting keeps
    /// the limit it started with (unlike the write timeout, which a waiting write takes
    /// up at once).
    pub fn set_read_timeout(&self, limit: Option<Duration>) -> Result<()> {
        check_limit("read timeout", limit)?;
        self.options.timeouts.read.set(limit);
        Ok(())
    }

    /// The read timeout, if one is set.
    pub fn read_timeout(&self) -> Option<Duration> {
        self.options.timeouts.read.get()
    }

    /// Closes the connection when a write (`write`, `write_all`, an
    /// [`OutputStream`](super::OutputStream) flush, a TLS record) waits `limit` without
    /// the kernel taking any of its bytes, so a peer that reads a byte now and then
    /// cannot hold the connection and its buffers: the write fails with
    /// `ConnectionTimedOut`, so does everything after it, and the queued data is dropped
    /// with a RST. Progress is a send completing: on io_uring a flush sends up to 1024
    /// buffers as one operation, so `limit` should cover the time the slowest peer you
    /// accept needs to take one such batch. `None` (the default): never.
    pub fn set_write_timeout(&self, limit: Option<Duration>) -> Result<()> {
        check_limit("write timeout", limit)?;
        self.options.timeouts.write.set(limit);
        self.rewatch("set the write timeout")
    }

    /// The write timeout, if one is set.
    pub fn write_timeout(&self) -> Option<Duration> {
        self.options.timeouts.write.get()
    }

    /// How long a TLS handshake this socket starts
    /// ([`connect_with`](super::StreamSocket::connect_with),
    /// [`upgrade_to_tls`](super::StreamSocket::upgrade_to_tls),
    /// [`accept_tls`](super::StreamSocket::accept_tls)) may take before it fails with
    /// `ConnectionTimedOut` and the connection is closed. `None` (the default): never
    /// for a client; for `accept_tls`, the acceptor's
    /// ([`TlsAcceptorBuilder::handshake_timeout`](crate::tls::TlsAcceptorBuilder::handshake_timeout),
    /// 10 s unless changed).
    pub fn set_tls_handshake_timeout(&self, limit: Option<Duration>) -> Result<()> {
        check_limit("TLS handshake timeout", limit)?;
        self.options.timeouts.handshake.set(limit);
        Ok(())
    }

    /// The TLS handshake timeout set on this socket, if one is.
    pub fn tls_handshake_timeout(&self) -> Option<Duration> {
        self.options.timeouts.handshake.get()
    }

    /// How long a dropped socket may go on delivering what it had queued (writes not
    /// yet sent, the kernel's send queue, a TLS `close_notify`) before it is aborted;
    /// default [`DEFAULT_LINGER_TIMEOUT`](super::DEFAULT_LINGER_TIMEOUT), 5 s. The
    /// delivery runs in a task of the socket's runtime and never blocks; see
    /// [`StreamSocket::close`](super::StreamSocket::close).
    pub fn set_linger_timeout(&self, limit: Duration) -> Result<()> {
        check_limit("linger timeout", Some(limit))?;
        self.options.timeouts.linger.set(limit);
        Ok(())
    }

    /// The linger timeout of a dropped socket.
    pub fn linger_timeout(&self) -> Duration {
        self.options.timeouts.linger.get()
    }

    /// The timeouts that expired so far: on this socket, or, on a listener's control,
    /// on every socket the listener accepted.
    pub fn timeout_counts(&self) -> TimeoutCounts {
        self.options.timeouts.counts()
    }

    /// A changed idle or write limit applies to a live connection at once.
    fn rewatch(&self, what: &str) -> Result<()> {
        let Some(fd) = self.fd() else { return Ok(()) };
        // The watchdog runs on the socket's runtime: it must be the one running here.
        fd.binding().map_err(|err| Error::io(what, err))?;
        self.options.timeouts.watch(fd);
        Ok(())
    }

    fn before_tls(&self, what: &str) -> Result<()> {
        if self.options.tls_started.get() {
            return Err(Error::invalid_input(format!(
                "{what} must be set before the TLS handshake starts"
            )));
        }
        Ok(())
    }

    /// The connected socket, or the listening one of a listener's control.
    fn live(&self) -> Result<&SharedFd> {
        self.fd()
            .or(self.listening)
            .ok_or_else(|| Error::invalid_input("the socket is not connected"))
    }
}

/// One of a socket's two kernel buffers.
#[derive(Clone, Copy)]
pub(crate) enum SocketBuffer {
    Send,
    Receive,
}

impl SocketBuffer {
    fn option(self) -> &'static str {
        match self {
            SocketBuffer::Send => "SO_SNDBUF",
            SocketBuffer::Receive => "SO_RCVBUF",
        }
    }
}

/// Remembers `bytes` as the size wanted for `which` buffer (applied when the socket is
/// made) and, on a live socket, requests it now. The kernel doubles and clamps it.
pub(crate) fn set_buffer_size(
    wanted: &Cell<Option<usize>>,
    fd: Option<&SharedFd>,
    which: SocketBuffer,
    bytes: usize,
) -> Result<()> {
    if bytes == 0 || bytes > i32::MAX as usize {
        return Err(Error::invalid_input(format!(
            "buffer size {bytes} is out of range (1..={})",
            i32::MAX
        )));
    }
    wanted.set(Some(bytes));
    let Some(fd) = fd else { return Ok(()) };
    let sock = fd.sock();
    match which {
        SocketBuffer::Send => sock.set_send_buffer_size(bytes),
        SocketBuffer::Receive => sock.set_recv_buffer_size(bytes),
    }
    .map_err(|e| Error::io(format!("set {}", which.option()), e))
}

/// The size the kernel gave `which` buffer of a live socket.
pub(crate) fn buffer_size(fd: &SharedFd, which: SocketBuffer) -> Result<usize> {
    let sock = fd.sock();
    match which {
        SocketBuffer::Send => sock.send_buffer_size(),
        SocketBuffer::Receive => sock.recv_buffer_size(),
    }
    .map_err(|e| Error::io(format!("get {}", which.option()), e))
}
