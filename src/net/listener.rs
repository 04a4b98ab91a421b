//! StreamSocketListener: accepts TCP connections.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;

use super::bind::bind_retrying;
use super::control::{StreamOptions, StreamSocketControl};
use super::stream::sock_addr;
use super::turn::Turnstile;
use super::{new_socket, StreamSocket};
use crate::driver::ops::Acceptor;
use crate::driver::SharedFd;
use crate::host::{parse_service, resolve_blocking, HostName, Protocol};
use crate::{Error, Result};

/// Connections the kernel may hold waiting to be accepted.
const BACKLOG: i32 = 1024;

/// Listens for TCP connections, like Windows.Networking.Sockets.StreamSocketListener.
///
/// On io_uring one multishot accept serves every connection until the kernel ends it;
/// it is re-armed on the next `accept`.
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
}

impl StreamSocketListener {
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
            fd: None,
        }
    }

    /// The next connection (a ConnectionReceived event).
    ///
    /// An error such as TooManyOpenFiles concerns that attempt only: the listener keeps
    /// working and the next `accept` tries again.
    pub async fn accept(&self) -> Result<StreamSocket> {
        let _turn = self.turn.take().await;
        let fd = poll_fn(|cx| self.acceptor.borrow_mut().poll_accept(&self.fd, cx))
            .await
            .map_err(|err| Error::io("accept", err))?;
        StreamSocket::accepted(fd, &self.options)
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
