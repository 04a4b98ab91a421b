//! # ringsock
//!
//! The socket model of Windows.Networking.Sockets — [`StreamSocket`],
//! [`StreamSocketListener`], batched writes with a flush, [`HostName`], error statuses —
//! for Linux, on an io_uring engine, with an epoll engine behind the same API where
//! io_uring is not available.
//!
//! ```
//! use ringsock::{HostName, StreamSocket, StreamSocketListener};
//!
//! ringsock::block_on(async {
//!     // The server: echo one line back on each connection.
//!     let listener = StreamSocketListener::bind_host(&HostName::new("127.0.0.1")?, "0")?;
//!     let port = listener.local_addr()?.port().to_string();
//!     ringsock::spawn(async move {
//!         let socket = listener.accept().await?;
//!         let mut input = socket.input_stream();
//!         if let Some(request) = input.read_line().await? {
//!             socket.write_all(format!("{request}\n").into_bytes()).await.0?;
//!         }
//!         Ok::<_, ringsock::Error>(())
//!     });
//!
//!     // The client: send a line, read the echo.
//!     let socket = StreamSocket::new();
//!     socket.connect(&HostName::new("localhost")?, &port).await?;
//!     socket.write_all(b"Hello, World!\n".to_vec()).await.0?;
//!     let response = socket.input_stream().read_line().await?;
//!     assert_eq!(response.as_deref(), Some("Hello, World!"));
//!     Ok::<_, ringsock::Error>(())
//! })?;
//! # Ok::<_, ringsock::Error>(())
//! ```
//!
//! ## Layers
//!
//! - [`net`]: the sockets ([`StreamSocket`], [`StreamSocketListener`], [`DatagramSocket`],
//!   [`OutputStream`]).
//! - [`host`] and [`error`]: validated host names and service names, the bounded resolver;
//!   [`Error`] with its [`SocketErrorStatus`].
//! - [`tls`]: TLS on a [`StreamSocket`] with rustls: client certificates, server
//!   authentication, certificate statuses.
//! - [`tun`]: TUN devices on the engine, with offloads (super-segments cut into packets,
//!   TCP segments joined into super-segments in user space).
//! - [`tunnel`]: a point-to-point VPN tunnel between a TUN device and a UDP peer,
//!   ChaCha20-Poly1305 under keys a handshake derives from a pre-shared key.
//! - [`runtime`]: one single-threaded executor per thread, parked in one system call.
//! - `tokio` (feature `tokio`): a ringsock driver inside a tokio runtime,
//!   and tokio's `AsyncRead`/`AsyncWrite` on [`StreamSocket`].
//! - `driver` (private): the io_uring and epoll engines behind one contract.
//!
//! The `ringsock` command line — a demo, an echo server and client, and the benchmark
//! workloads of `ringsock bench` — is a crate of its own, `ringsock-cli` (in `cli/` of
//! the repository), built on this crate's public API only.
//!
//! The engine is chosen per runtime: `auto` (the default) uses io_uring and falls back to
//! epoll where io_uring cannot start; `RINGSOCK_BACKEND=uring|epoll|auto` or
//! [`runtime::Builder::backend`] force it.
//!
//! ## Dropped and forgotten operations
//!
//! An operation's buffers belong to it until the kernel is done with them, so no use of
//! this API lets the kernel write into memory the program got back. Dropping a pending
//! receive cancels it; bytes it had already taken stay with the socket for the next
//! receive (on io_uring a stream receive dropped in the poll that queued it may still
//! run before its cancel: the socket keeps it until it is done, and the next receive
//! hands out what it took first, in order). `std::mem::forget` on a pending operation is safe too, but nothing is told
//! to stop it: on io_uring a forgotten read still completes in the kernel, into the
//! operation's own buffer, and the bytes it took are lost to the program (on epoll a
//! read that was never resumed took nothing). Drop operations; do not forget them.

#![deny(unsafe_code)]
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(unsafe_op_in_unsafe_fn)]

pub mod buf;
mod driver;
pub mod error;
pub mod host;
pub mod net;
pub mod runtime;
pub mod tls;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod tun;
pub mod tunnel;

pub use driver::{Backend, Capabilities, Capability, DriverKind, DriverStats};
pub use error::{Error, Result, SocketErrorStatus};
pub use host::HostName;
pub use net::{
    AcceptStats, Datagram, DatagramGroup, DatagramSocket, DatagramSocketControl, Ecn, Forward,
    Forwarding, InputStream, OutgoingDatagram, OutputStream, PostStats, ReceiveRing, ReceiveStats,
    SendOptions, StreamSocket, StreamSocketControl, StreamSocketListener, TimeoutCounts,
    TrafficClass,
};
pub use runtime::{block_on, spawn, JoinHandle, Runtime};
pub use tls::ProtectionLevel;
