//! Thread-per-core serving: one SO_REUSEPORT socket per pool thread on the same address,
//! so the kernel spreads connections and flows over the threads with no lock between
//! them.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use super::bind::wait_until_free;
use super::{new_socket, refuse_multicast_listener, Detached, SocketKind};
use crate::driver::sockopt;
use crate::runtime::{PoolHandle, RemoteJoinHandle};
use crate::{DatagramSocket, Error, Result, StreamSocketListener};

/// A sharded socket group at work: the address it is bound to and each thread's task
/// (in thread order), whose output is what the serving future returned, or the error
/// that kept that thread from adopting its socket.
#[derive(Debug)]
pub struct Sharded<T> {
    /// The address every member is bound to (the real port when asked for port 0).
    pub addr: SocketAddr,
    /// Each thread's serving task.
    pub servers: Vec<RemoteJoinHandle<Result<T>>>,
}

/// How many connections a sharded listener's socket may queue in the kernel.
const BACKLOG: i32 = 1024;

/// Binds `count` sockets of `kind` (a listener or a datagram socket) on `addr`, all with
/// SO_REUSEPORT, so the kernel spreads connections or flows over them; with port 0 the
/// first picks the port and the others join it. Returns the address bound and the
/// sockets, detached (to be adopted on the threads that will serve them), in group
/// order. `SocketKind::Stream` is refused, and so is a `count` of 0.
///
/// With a given port, the group first waits up to 250 ms for no other socket to hold
/// it: a process killed a moment ago may still hold it (its io_uring ring is torn down
/// after it is gone), and joining that socket's group would hand it connections that
/// are reset when it closes. A port still held after the wait is shared with a live
/// process on purpose, and the group joins it.
pub fn bind_reuse_port(
    addr: SocketAddr,
    count: usize,
    kind: SocketKind,
) -> Result<(SocketAddr, Vec<Detached>)> {
    bind_group(addr, count, kind, false)
}

/// [`bind_reuse_port`] for a group that shares its port with no one else: after the
/// same wait for a dying socket, a port a live socket still holds fails with
/// `AddressAlreadyInUse` instead of being joined. For a server that must not start on
/// a port another one serves (a second copy started by mistake would take part of the
/// first one's connections or datagrams, and neither would say so).
pub fn bind_reuse_port_exclusive(
    addr: SocketAddr,
    count: usize,
    kind: SocketKind,
) -> Result<(SocketAddr, Vec<Detached>)> {
    bind_group(addr, count, kind, true)
}

/// Binds `count` sockets of `kind` (a listener or a datagram socket) on `addr`, all with
/// SO_REUSEPORT; with port 0 the first picks the port and the others join it. Returns
/// the address bound and the sockets, detached, in group order. A socket a process that
/// just ended still holds on the port is waited out first (see `wait_until_free`); one
/// still held after that is joined, or with `exclusive` refused.
fn bind_group(
    addr: SocketAddr,
    count: usize,
    kind: SocketKind,
    exclusive: bool,
) -> Result<(SocketAddr, Vec<Detached>)> {
    if kind == SocketKind::Stream {
        return Err(Error::invalid_input(
            "a connected stream cannot be bound to share a port",
        ));
    }
    if count == 0 {
        return Err(Error::invalid_input(
            "a group of 0 sockets sharing a port: bind at least one",
        ));
    }
    let ty = match kind {
        SocketKind::Datagram => socket2::Type::DGRAM,
        _ => {
            refuse_multicast_listener(addr)?;
            socket2::Type::STREAM
        }
    };
    let free = wait_until_free(addr, ty).map_err(|err| Error::io(format!("bind {addr}"), err))?;
    if exclusive && !free {
        return Err(Error::io(
            format!("bind {addr}: another socket holds the port"),
            std::io::Error::from_raw_os_error(libc::EADDRINUSE),
        ));
    }
    let mut bound = addr;
    // The descriptor limit ends a count too large long before memory would.
    let mut group = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let socket = new_socket(&bound, ty)?;
        let set = |what, result: std::io::Result<()>| result.map_err(|err| Error::io(what, err));
        set("set SO_REUSEADDR", socket.set_reuse_address(true))?;
        set("set SO_REUSEPORT", socket.set_reuse_port(true))?;
        socket
            .bind(&bound.into())
            .map_err(|err| Error::io(format!("bind {bound}"), err))?;
        if kind == SocketKind::Listener {
            socket
                .listen(BACKLOG)
                .map_err(|err| Error::io(format!("listen on {bound}"), err))?;
        }
        if bound.port() == 0 {
            bound = socket
                .local_addr()
                .ok()
                .and_then(|addr| addr.as_socket())
                .ok_or_else(|| Error::invalid_input("the bound address is not an IP address"))?;
        }
        group.push(Detached::new(OwnedFd::from(socket), kind, Vec::new()));
    }
    Ok((bound, group))
}

/// Runs `serve(thread, socket)` on every thread of `pool`, each with its own member of
/// the group.
fn serve_group<S, F, Fut>(
    pool: &PoolHandle,
    group: Vec<Detached>,
    adopt: fn(Detached) -> Result<S>,
    serve: F,
) -> Result<Vec<RemoteJoinHandle<Result<Fut::Output>>>>
where
    S: 'static,
    F: Fn(usize, S) -> Fut + Send + Clone + 'static,
    Fut: Future + 'static,
    Fut::Output: Send + 'static,
{
    group
        .into_iter()
        .enumerate()
        .map(|(thread, member)| {
            let serve = serve.clone();
            pool.spawn_on(thread, move || async move {
                let socket = adopt(member)?;
                Ok(serve(thread, socket).await)
            })
        })
        .collect()
}

impl StreamSocketListener {
    /// Listens on `addr` with one SO_REUSEPORT listener per thread of `pool`, and runs
    /// `serve(thread, listener)` on each thread with its own listener.
    ///
    /// Where the pool's threads are pinned (see [`PoolBuilder::pin_threads`]), a
    /// classic BPF program routes each connection to the listener of the CPU that
    /// received it, so a connection is served on the core its packets arrive on; else
    /// the kernel spreads connections by their address hash.
    ///
    /// [`PoolBuilder::pin_threads`]: crate::runtime::PoolBuilder::pin_threads
    pub fn bind_sharded<F, Fut>(
        addr: SocketAddr,
        pool: &PoolHandle,
        serve: F,
    ) -> Result<Sharded<Fut::Output>>
    where
        F: Fn(usize, StreamSocketListener) -> Fut + Send + Clone + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let (bound, group) = bind_group(addr, pool.threads(), SocketKind::Listener, false)?;
        let cpus: Option<Vec<usize>> = (0..pool.threads()).map(|t| pool.cpu_of(t)).collect();
        if let (Some(cpus), Some(first)) = (cpus, group.first()) {
            sockopt::route_reuseport_by_cpu(first.as_raw_fd(), &cpus)
                .map_err(|err| Error::io("attach the CPU routing program", err))?;
        }
        let servers = serve_group(pool, group, Detached::into_listener, serve)?;
        Ok(Sharded {
            addr: bound,
            servers,
        })
    }
}

impl DatagramSocket {
    /// Binds `addr` with one SO_REUSEPORT datagram socket per thread of `pool`, and runs
    /// `serve(thread, socket)` on each thread with its own socket. The kernel picks the
    /// socket by the hash of each datagram's addresses and ports, so all datagrams of
    /// one flow reach the same thread, in order. Returns the address bound and each
    /// thread's handle.
    pub fn bind_sharded<F, Fut>(
        addr: SocketAddr,
        pool: &PoolHandle,
        serve: F,
    ) -> Result<Sharded<Fut::Output>>
    where
        F: Fn(usize, DatagramSocket) -> Fut + Send + Clone + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let (bound, group) = bind_group(addr, pool.threads(), SocketKind::Datagram, false)?;
        let servers = serve_group(pool, group, Detached::into_datagram, serve)?;
        Ok(Sharded {
            addr: bound,
            servers,
        })
    }
}
