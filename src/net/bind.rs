//! Binding a port that a process which just ended may still hold.
//!
//! A killed io_uring program's ring is torn down by the kernel after the process is
//! gone, asynchronously, and the operations still armed in it (a multishot accept or
//! receive) keep their sockets, and so their ports, for a few milliseconds more
//! (measured here: 10-17 ms). A supervisor that restarts the program at once would see
//! its bind fail with EADDRINUSE. So a bind that finds its port in use tries again for a
//! short while before it reports AddressAlreadyInUse; any other error is reported at
//! once. A port a live socket holds is still refused, only [`BIND_RETRY`] later.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a bind keeps trying a port in use before it gives up.
pub(crate) const BIND_RETRY: Duration = Duration::from_millis(250);
/// The first pause between tries; each next one doubles, up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(16);

/// Binds `socket` to `addr`, trying again for up to [`BIND_RETRY`] while the port is in
/// use. The wait blocks the calling thread (binding is synchronous), and only when the
/// port is taken.
pub(crate) fn bind_retrying(socket: &socket2::Socket, addr: SocketAddr) -> io::Result<()> {
    let address = addr.into();
    let mut deadline = None;
    let mut pause = FIRST_PAUSE;
    loop {
        let err = match socket.bind(&address) {
            Ok(()) => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EADDRINUSE) => err,
            Err(err) => return Err(err),
        };
        let now = Instant::now();
        let deadline = *deadline.get_or_insert(now + BIND_RETRY);
        if now >= deadline {
            return Err(err);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Waits up to [`BIND_RETRY`] for no other socket to hold `addr`, before a group of
/// SO_REUSEPORT sockets binds it; returns whether it is free.
///
/// A SO_REUSEPORT bind does not fail on a port a killed process's ring still holds: it
/// joins that socket's group (same user), and the kernel then hands part of the
/// connections or datagrams to a socket about to be closed, which resets or loses them.
/// So the group first waits the dying socket out, with a probe bound without
/// SO_REUSEPORT. A port still held after the wait belongs to a live process that shares
/// it on purpose, and the group joins it as asked.
pub(crate) fn wait_until_free(addr: SocketAddr, ty: socket2::Type) -> io::Result<bool> {
    if addr.port() == 0 {
        return Ok(true);
    }
    let protocol = if ty == socket2::Type::STREAM {
        socket2::Protocol::TCP
    } else {
        socket2::Protocol::UDP
    };
    let probe = socket2::Socket::new(socket2::Domain::for_address(addr), ty, Some(protocol))?;
    if ty == socket2::Type::STREAM {
        // Connections in TIME_WAIT do not hold a port for a listener; a listening socket
        // still does.
        probe.set_reuse_address(true)?;
    }
    match bind_retrying(&probe, addr) {
        Ok(()) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::EADDRINUSE) => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, UdpSocket};

    #[test]
    fn a_port_a_live_socket_holds_is_refused_after_the_retries() {
        let holder = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = holder.local_addr().unwrap();
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        let err = bind_retrying(&socket, addr).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
        drop(holder);
        bind_retrying(&socket, addr).unwrap();
    }

    #[test]
    fn a_port_shared_on_purpose_is_reported_held_after_the_wait() {
        let holder = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        holder.set_reuse_port(true).unwrap();
        holder
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        holder.listen(8).unwrap();
        let addr = holder.local_addr().unwrap().as_socket().unwrap();
        assert!(!wait_until_free(addr, socket2::Type::STREAM).unwrap());
        drop(holder);
        assert!(wait_until_free(addr, socket2::Type::STREAM).unwrap());
        assert!(wait_until_free(addr, socket2::Type::DGRAM).unwrap());
    }
}
