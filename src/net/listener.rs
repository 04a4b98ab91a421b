//! StreamSocketListener: accepts TCP connections.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_core::Stream;

use super::backoff::{self, Backoff};
use super::bind::bind_retrying;
use super::control::{StreamOptions, StreamSocketControl};
use super::stream::sock_addr;
use super::turn::Turnstile;
use super::{new_socket, refuse_multicast_listener, Detached, SocketKind, StreamSocket};
use crate::driver::accept::{self, Acceptor};
use crate::driver::SharedFd;
use crate::host::{parse_service, resolve_blocking, HostName, Protocol};
use crate::runtime::coop;
use crate::{Error, Result};

/// Connections the kernel may hold waiting to be accepted.
const BACKLOG: i32 = 1024;

/// Listens for TCP connections, like Windows.Networking.Sockets.StreamSocketListener.
///
/// On io_uring one multishot accept takes connections in the background, so `accept`
/// usually finds one waiting. It holds at most [`max_pending`](Self::set_max_pending)
/// connections the program has not taken (128 by default), then pauses until the
/// program has taken them down to half; the rest wait in the kernel's listen backlog
/// (1024). On epoll, and where the kernel lacks multishot accept, a connection is
/// accepted only when the program asks.
///
/// When the process runs out of descriptors (or the system of descriptors or memory),
/// `accept` returns the error (`TooManyOpenFiles`, ...) and the next `accept` waits
/// before it tries again: [`ACCEPT_BACKOFF_FIRST`](Self::ACCEPT_BACKOFF_FIRST),
/// doubling with each failure in a row up to
/// [`ACCEPT_BACKOFF_MAX`](Self::ACCEPT_BACKOFF_MAX), none after a success. So a loop
/// that logs the error and calls `accept` again cannot spin, and the runtime's other
/// tasks, timers and signals keep running meanwhile. [`accept_stats`](Self::accept_stats)
/// counts the failures.
///
/// # Examples
///
/// ```
/// use ringsock::{HostName, StreamSocket, StreamSocketListener};
///
/// ringsock::block_on(async {
///     let listener = StreamSocketListener::bind_host(&HostName::new("127.0.0.1")?, "0")?;
///     let addr = listener.local_addr()?;
///     assert_ne!(addr.port(), 0);
///     let client = StreamSocket::new();
///     client.connect_addr(addr).await?;
///     let server_side = listener.accept().await?;
///     assert_eq!(server_side.peer_addr()?, client.local_addr()?);
///     Ok::<_, ringsock::Error>(())
/// })?;
/// # Ok::<_, ringsock::Error>(())
/// ```
pub struct StreamSocketListener {
    fd: SharedFd,
    acceptor: RefCell<Acceptor>,
    /// One accept at a time uses the acceptor; the others wait here in turn.
    turn: Turnstile,
    /// Options given to every accepted socket.
    options: StreamOptions,
    /// The wait before the next accept after running out of descriptors or memory.
    backoff: RefCell<Backoff>,
    /// Accepts that failed for lack of descriptors or memory.
    exhausted: Cell<u64>,
}

/// What a listener holds and how its accepts went ([`StreamSocketListener::accept_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AcceptStats {
    /// Connections accepted in the background (io_uring's multishot accept) that
    /// `accept` has not taken yet: each is an open descriptor. At most `max_pending`,
    /// plus what the kernel hands over before a pause takes effect. Always 0 on epoll
    /// and without multishot accept.
    pub pending: usize,
    /// A background accept runs: the kernel hands connections over without a call to
    /// `accept`. False while it is paused at `max_pending`, and on epoll.
    pub background: bool,
    /// Accepts that failed because descriptors or memory ran out (EMFILE, ENFILE,
    /// ENOBUFS, ENOMEM).
    pub exhausted: u64,
    /// How long the next `accept` waits before it tries, after such failures in a row;
    /// zero once an accept succeeded.
    pub backoff: Duration,
}

impl StreamSocketListener {
    /// The default of [`set_max_pending`](Self::set_max_pending).
    pub const DEFAULT_MAX_PENDING: usize = accept::DEFAULT_MAX_PENDING;
    /// The wait before the next `accept` after one failed for lack of descriptors or
    /// memory.
    pub const ACCEPT_BACKOFF_FIRST: Duration = backoff::FIRST;
    /// The longest such wait: each failure in a row doubles it up to this.
    pub const ACCEPT_BACKOFF_MAX: Duration = backoff::MAX;

    /// Listens on `service` (a port number, "0" for any free port, or a service name) on
    /// every local address: IPv6 and IPv4 together where the system has IPv6, else IPv4
    /// (BindServiceNameAsync).
    pub fn bind(service: &str) -> Result<StreamSocketListener> {
        let port = parse_service(service, Protocol::Tcp)?;
        let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        match Self::bind_addr_with(any6, true) {
            Err(err) if err.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                Self::bind_addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            }
            other => other,
        }
    }

    /// Listens on `service` at the first address `host` resolves to
    /// (BindEndpointAsync).
    ///
    /// This call is not async, so a DNS name is resolved on the calling thread
    /// ([`resolve_blocking`]), without the resolver pool's timeout: the loop waits for
    /// the system resolver meanwhile. Give an IP literal, or resolve the name first with
    /// [`resolve`](crate::host::resolve) and bind with [`bind_addr`](Self::bind_addr).
    pub fn bind_host(host: &HostName, service: &str) -> Result<StreamSocketListener> {
        let port = parse_service(service, Protocol::Tcp)?;
        let addrs = resolve_blocking(host, port)?;
        let mut last = None;
        for addr in addrs {
            match Self::bind_addr(addr) {
                Ok(listener) => return Ok(listener),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| Error::NoAddresses {
            host: host.to_string(),
        }))
    }

    /// Listens on one socket address.
    ///
    /// Every bind retries a port in use for up to 250 ms before it fails with
    /// AddressAlreadyInUse, so that a server restarted right after its predecessor was
    /// killed gets the port the dying process still holds (SO_REUSEADDR, which every
    /// listener sets, covers the old connections' TIME_WAIT, not a listener).
    pub fn bind_addr(addr: SocketAddr) -> Result<StreamSocketListener> {
        Self::bind_addr_with(addr, false)
    }

    fn bind_addr_with(addr: SocketAddr, dual_stack: bool) -> Result<StreamSocketListener> {
        refuse_multicast_listener(addr)?;
        let socket = new_socket(&addr, socket2::Type::STREAM)?;
        // Restarting a server must not wait for old connections' TIME_WAIT to pass.
        socket
            .set_reuse_address(true)
            .map_err(|err| Error::io("set SO_REUSEADDR", err))?;
        if dual_stack {
            socket
                .set_only_v6(false)
                .map_err(|err| Error::io("set IPV6_V6ONLY", err))?;
        }
        bind_retrying(&socket, addr).map_err(|err| Error::io(format!("bind {addr}"), err))?;
        socket
            .listen(BACKLOG)
            .map_err(|err| Error::io(format!("listen on {addr}"), err))?;
        Ok(StreamSocketListener {
            fd: SharedFd::new(OwnedFd::from(socket)),
            acceptor: RefCell::new(Acceptor::new()),
            turn: Turnstile::default(),
            options: StreamOptions::default(),
            backoff: RefCell::new(Backoff::default()),
            exhausted: Cell::new(0),
        })
    }

    /// The address it listens on, with the real port when bound to port 0.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        sock_addr(self.fd.sock().local_addr(), "local address")
    }

    /// Options applied to every accepted socket (StreamSocketListener.Control).
    pub fn control(&self) -> StreamSocketControl<'_> {
        StreamSocketControl {
            options: &self.options,
            connected: None,
            listening: Some(&self.fd),
        }
    }

    /// The next connection (a ConnectionReceived event).
    ///
    /// An error concerns that attempt only: the listener keeps working and the next
    /// `accept` tries again. After `TooManyOpenFiles` (or another shortage of
    /// descriptors or memory) the next `accept` first waits out the back-off (see the
    /// type's documentation), so calling it again at once cannot spin.
    pub async fn accept(&self) -> Result<StreamSocket> {
        let _turn = self.turn.take().await;
        let resume_at = self.backoff.borrow().resume_at();
        if let Some(resume_at) = resume_at {
            crate::runtime::sleep_until_lenient(resume_at).await;
        }
        self.acceptor.borrow_mut().begin();
        let accepted = coop::budgeted(poll_fn(|cx| {
            self.acceptor.borrow_mut().poll_accept(&self.fd, cx)
        }))
        .await;
        match accepted {
            Ok(fd) => {
                self.backoff.borrow_mut().succeeded();
                StreamSocket::accepted(fd, &self.options)
            }
            Err(err) => {
                if backoff::is_exhaustion(&err) {
                    self.exhausted.set(self.exhausted.get() + 1);
                    self.backoff.borrow_mut().failed(Instant::now());
                }
                Err(Error::io("accept", err))
            }
        }
    }

    /// Sets how many connections a background accept may take from the kernel before
    /// the program asks for them (default [`DEFAULT_MAX_PENDING`](Self::DEFAULT_MAX_PENDING)).
    /// Each is an open descriptor, so this bounds what a flood of connections costs a
    /// program that does not keep up. Once that many wait, the background accept pauses
    /// (connections the kernel hands over before the pause takes effect are kept) and
    /// resumes when `accept` has taken them down to half; meanwhile new connections wait
    /// in the kernel's listen backlog. It applies from the next time the background
    /// accept starts. Only io_uring with multishot accept takes connections in the
    /// background; elsewhere a connection is accepted when the program asks.
    ///
    /// 0 is `InvalidArgument`.
    pub fn set_max_pending(&self, max_pending: usize) -> Result<()> {
        if max_pending == 0 {
            return Err(Error::invalid_input(
                "max_pending must be at least 1 connection",
            ));
        }
        self.acceptor.borrow_mut().set_max_pending(max_pending);
        Ok(())
    }

    /// The bound set by [`set_max_pending`](Self::set_max_pending).
    pub fn max_pending(&self) -> usize {
        self.acceptor.borrow().max_pending()
    }

    /// What the listener holds and how its accepts went.
    pub fn accept_stats(&self) -> AcceptStats {
        let held = self.acceptor.borrow().held();
        AcceptStats {
            pending: held.pending,
            background: held.background,
            exhausted: self.exhausted.get(),
            backoff: self.backoff.borrow().delay(),
        }
    }

    /// Every connection, as a stream; ends never (errors are items).
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming {
            listener: self,
            pending: None,
        }
    }
}

type AcceptFuture<'a> = Pin<Box<dyn Future<Output = Result<StreamSocket>> + 'a>>;

/// The stream of connections from [`StreamSocketListener::incoming`].
pub struct Incoming<'a> {
    listener: &'a StreamSocketListener,
    pending: Option<AcceptFuture<'a>>,
}

impl<'a> Stream for Incoming<'a> {
    type Item = Result<StreamSocket>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let listener = self.listener;
        let pending = self
            .pending
            .get_or_insert_with(|| Box::pin(listener.accept()));
        match pending.as_mut().poll(cx) {
            Poll::Ready(result) => {
                self.pending = None;
                Poll::Ready(Some(result))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for StreamSocketListener {
    fn drop(&mut self) {
        // An io_uring accept holds the listening socket open until its completion is
        // reaped, a loop turn or more after the drop: meanwhile the kernel would complete
        // handshakes nobody will accept, and a new listener on the same address would
        // fail with AddressAlreadyInUse (epoll closes at once). Reaping now closes it
        // with the last handle, as epoll does.
        self.fd.cancel_in_flight();
    }
}

/// Sockets in and out: std, raw descriptors, and other runtimes.
impl StreamSocketListener {
    /// Takes a listening std socket (made non-blocking); it belongs to the runtime
    /// running on this thread, or to the first that uses it.
    pub fn from_std(listener: std::net::TcpListener) -> Result<StreamSocketListener> {
        Detached::from_fd(OwnedFd::from(listener))?.into_listener()
    }

    /// Wraps a listening descriptor detached elsewhere; `accepted` are handed out first.
    pub(crate) fn adopt(fd: OwnedFd, accepted: Vec<OwnedFd>) -> Result<StreamSocketListener> {
        Ok(StreamSocketListener {
            fd: SharedFd::new(fd),
            acceptor: RefCell::new(Acceptor::with_accepted(accepted)),
            turn: Turnstile::default(),
            options: StreamOptions::default(),
            backoff: RefCell::new(Backoff::default()),
            exhausted: Cell::new(0),
        })
    }

    /// Takes the listener off this runtime, for another thread's runtime or another
    /// process: its accepts in flight are cancelled and reaped, and the connections the
    /// kernel had accepted but the program had not taken go along with it (the adopting
    /// listener hands them out first), so no connection is lost or reset. Afterwards this
    /// listener is a spent handle: its calls fail.
    pub fn detach(&self) -> Result<Detached> {
        let owned = self.fd.detach().map_err(|err| Error::io("detach", err))?;
        let accepted = self.acceptor.borrow_mut().take_accepted(owned.as_fd());
        Ok(Detached::new(owned, SocketKind::Listener, accepted))
    }

    /// The listener as a blocking std listener, taken off this runtime as
    /// [`detach`](Self::detach) does; connections it had accepted but not handed out
    /// are closed.
    pub fn into_std(self) -> Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::from(self.detach()?.into_fd());
        listener
            .set_nonblocking(false)
            .map_err(|err| Error::io("make the socket blocking", err))?;
        Ok(listener)
    }
}

impl AsRawFd for StreamSocketListener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.raw()
    }
}

impl AsFd for StreamSocketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.borrow_fd()
    }
}
