//! Sockets: TCP streams and listeners, UDP datagram sockets, and the batched output stream.

use std::net::SocketAddr;

use crate::host::{parse_service, HostName, Protocol};
use crate::{Error, Result};

mod backoff;
mod bind;
mod close;
mod control;
mod datagram;
mod ending;
mod group;
mod handoff;
mod input;
mod listener;
mod meta;
mod output;
#[cfg(any(feature = "tokio", feature = "futures-io"))]
mod poll_io;
mod shard;
mod stream;
mod timeouts;
mod transport;
pub(crate) mod turn;

pub use crate::driver::forward::{Forward, Forwarding};
pub use control::StreamSocketControl;
pub use datagram::{
    Datagram, DatagramSocket, DatagramSocketControl, Messages, PostStats, ReceiveRing, ReceiveStats,
};
pub use group::DatagramGroup;
pub use handoff::{
    activated_sockets, recv_detached, send_detached, Activated, Detached, SocketKind, MAX_ACCEPTED,
};
pub use input::InputStream;
pub use listener::{AcceptStats, Incoming, StreamSocketListener};
pub use meta::{Ecn, OutgoingDatagram, SendOptions, TrafficClass};
pub use output::{OutputStream, OutputStreamConfig, OutputStreamStats, WriteHandle};
pub use shard::{bind_reuse_port, bind_reuse_port_exclusive, Sharded};
pub use stream::StreamSocket;
pub use timeouts::{TimeoutCounts, DEFAULT_LINGER_TIMEOUT};

/// Resolves `host` and `service` to socket addresses: IP literals at once, names on the
/// bounded resolver pool with the runtime's timeout ([`crate::host::resolve`]).
pub(crate) async fn resolve(
    host: &HostName,
    service: &str,
    protocol: Protocol,
) -> Result<Vec<SocketAddr>> {
    let port = parse_service(service, protocol)?;
    crate::host::resolve(host, port).await
}

/// A new non-blocking, close-on-exec socket for `addr`'s family.
///
/// Fails with `InvalidArgument` for a link-local IPv6 address without a zone: the
/// kernel's answer to connecting or binding to one is a bare EINVAL.
/// A TCP listener on a multicast address: the kernel binds it, and it never gets a
/// connection (TCP has no multicast), so a server would wait forever without a word.
pub(crate) fn refuse_multicast_listener(addr: SocketAddr) -> Result<()> {
    if addr.ip().to_canonical().is_multicast() {
        return Err(Error::invalid_input(format!(
            "listen on {addr}: a multicast address takes no TCP connections"
        )));
    }
    Ok(())
}

pub(crate) fn new_socket(addr: &SocketAddr, ty: socket2::Type) -> Result<socket2::Socket> {
    if let SocketAddr::V6(v6) = addr {
        if (v6.ip().segments()[0] & 0xffc0) == 0xfe80 && v6.scope_id() == 0 {
            return Err(Error::invalid_input(format!(
                "{} is a link-local address: it needs the interface it is on as a \
                 nonzero scope, e.g. {}%eth0",
                v6.ip(),
                v6.ip()
            )));
        }
    }
    let domain = socket2::Domain::for_address(*addr);
    let protocol = if ty == socket2::Type::STREAM {
        socket2::Protocol::TCP
    } else {
        socket2::Protocol::UDP
    };
    let socket = socket2::Socket::new(domain, ty.nonblocking().cloexec(), Some(protocol))
        .map_err(|err| Error::io(format!("create a socket for {addr}"), err))?;
    Ok(socket)
}
