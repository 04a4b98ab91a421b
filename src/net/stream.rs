//! StreamSocket: a TCP connection with owned-buffer reads and writes.

use std::cell::OnceCell;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::OwnedFd;

use super::control::{StreamOptions, StreamSocketControl};
use super::{new_socket, resolve, InputStream, OutputStream};
use crate::buf::{BufResult, IoBuf, IoBufMut};
use crate::driver::{ops, SharedFd};
use crate::host::{HostName, Protocol};
use crate::{Error, Result};

/// A TCP connection, like Windows.Networking.Sockets.StreamSocket.
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
}

impl StreamSocket {
    /// An unconnected socket: set its [`control`](Self::control) options, then
    /// [`connect`](Self::connect).
    pub fn new() -> StreamSocket {
        StreamSocket {
            fd: OnceCell::new(),
            options: StreamOptions::default(),
            output: OnceCell::new(),
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
                Ok(fd) => {
                    // Only this call sets it: a second connect fails above or here.
                    return self
                        .fd
                        .set(fd)
                        .map_err(|_| Error::invalid_input("the socket is already connected"));
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| Error::NoAddresses {
            host: host.to_string(),
        }))
    }

    /// Connects to one socket address.
    pub async fn connect_addr(&self, addr: SocketAddr) -> Result<()> {
        if self.fd.get().is_some() {
            return Err(Error::invalid_input("the socket is already connected"));
        }
        let fd = self.try_connect(addr).await?;
        self.fd
            .set(fd)
            .map_err(|_| Error::invalid_input("the socket is already connected"))
    }

    /// A new socket connected to `host` and `service`, with default options.
    pub async fn connect_to(host: &HostName, service: &str) -> Result<StreamSocket> {
        let socket = StreamSocket::new();
        socket.connect(host, service).await?;
        Ok(socket)
    }

    async fn try_connect(&self, addr: SocketAddr) -> Result<SharedFd> {
        let socket = new_socket(&addr, socket2::Type::STREAM)?;
        let fd = SharedFd::new(OwnedFd::from(socket));
        self.options.apply(&fd)?;
        ops::connect(&fd, addr)
            .await
            .map_err(|err| Error::io(format!("connect to {addr}"), err))?;
        Ok(fd)
    }

    /// Wraps a socket the listener accepted.
    pub(crate) fn accepted(fd: OwnedFd, options: &StreamOptions) -> Result<StreamSocket> {
        let fd = SharedFd::new(fd);
        options.apply(&fd)?;
        let socket = StreamSocket {
            fd: OnceCell::new(),
            options: options.clone(),
            output: OnceCell::new(),
        };
        let _ = socket.fd.set(fd);
        Ok(socket)
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
            fd: self.fd.get(),
        }
    }

    /// Reads once into the spare capacity of `buf` (`capacity - len` bytes at most) and
    /// returns how many bytes arrived; 0 means the peer closed its side.
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
        let (result, back) = ops::recv(fd, buf).await;
        buf = back;
        (result.map_err(|err| Error::io("read", err)), buf)
    }

    /// Sends once; returns how many bytes the kernel took (possibly fewer than all).
    pub async fn write<B: IoBuf>(&self, buf: B) -> BufResult<usize, B> {
        let fd = match self.fd() {
            Ok(fd) => fd,
            Err(err) => return (Err(err), buf),
        };
        let (result, buf) = ops::send(fd, buf).await;
        (result.map_err(|err| Error::io("write", err)), buf)
    }

    /// Sends every byte of `buf`.
    pub async fn write_all<B: IoBuf>(&self, buf: B) -> BufResult<(), B> {
        let fd = match self.fd() {
            Ok(fd) => fd,
            Err(err) => return (Err(err), buf),
        };
        let mut slice = Offset { buf, start: 0 };
        while slice.start < slice.buf.bytes_init() {
            let (result, back) = ops::send(fd, slice).await;
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

    /// A reader over this connection with line reading (StreamReader.ReadLineAsync).
    pub fn input_stream(&self) -> InputStream {
        InputStream::new(self.fd.get().cloned())
    }

    /// A writer that queues writes and sends them together on `flush` (FlushAsync).
    ///
    /// Every call on a connected socket returns a handle to the same stream, so writes
    /// made through any of them keep one order. Mixing it with [`write`](Self::write) /
    /// [`write_all`](Self::write_all) while a batch is in flight may interleave their
    /// bytes: use one or the other at a time.
    pub fn output_stream(&self) -> OutputStream {
        match self.fd.get() {
            Some(fd) => self
                .output
                .get_or_init(|| OutputStream::new(Some(fd.clone())))
                .clone(),
            // Not connected: a stream whose writes fail; not kept, so that one made
            // after `connect` sends on the connection.
            None => OutputStream::new(None),
        }
    }

    /// Closes the sending direction (FIN); the peer reads end-of-stream, while this side
    /// can still read.
    pub async fn shutdown_write(&self) -> Result<()> {
        let fd = self.fd()?;
        ops::shutdown(fd, Shutdown::Write)
            .await
            .map_err(|err| Error::io("shutdown", err))
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
