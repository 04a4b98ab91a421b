//! A tunnel's shared state: what the threads of one tunnel share, and each thread's
//! lock-free copy of it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::config::TunnelConfig;
use super::handshake::{Handshake, Verifier};
use super::session::Session;
use super::timers::Timers;
use crate::net::DatagramSocket;
use crate::Result;

/// What the threads of one tunnel share: the handshake, the sessions, the peer's
/// address, the timers, and the UDP address every thread's socket is bound to.
///
/// Several threads run one tunnel by each [`join`](Self::join)ing a group with its own
/// queue of a multi-queue TUN ([`TunDevice::open_queue`](crate::tun::TunDevice::open_queue), or
/// [`TunDevice::create`](crate::tun::TunDevice::create) of the same name on that thread) and its own UDP socket, bound
/// with SO_REUSEPORT to the group's address: the kernel spreads flows over the queues
/// and the peer's datagrams over the sockets, and whichever thread a packet reaches
/// handles it under the one session. Where every member's thread is pinned to a CPU
/// (as a [`Pool`](crate::runtime::Pool) pins them), datagrams go to the member of the
/// CPU that received them rather than by the hash of their addresses, which would send
/// all of one peer's to one socket. Members stay for the group's life: a member that
/// leaves takes its place in that routing with it. `Send` and cheap to clone.
///
/// ```no_run
/// use ringsock::runtime::Pool;
/// use ringsock::tun::{TunDevice, TunOptions};
/// use ringsock::tunnel::{PresharedKey, TunnelConfig, TunnelGroup};
///
/// let key = PresharedKey::from_bytes([7; 32]);
/// let group = TunnelGroup::new(TunnelConfig::new("0.0.0.0:51820".parse()?, None, key));
/// let pool = Pool::builder().threads(2).build()?;
/// let runs = pool.handle().spawn_on_each(move |_thread| {
///     let group = group.clone();
///     async move {
///         let tunnel = group.join(TunDevice::create("tun0", TunOptions::default())?)?;
///         tunnel.run().await
///     }
/// })?;
/// # drop(runs);
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct TunnelGroup {
    pub(super) shared: Arc<Shared>,
}

pub(super) struct Shared {
    pub(super) config: TunnelConfig,
    /// Bind with SO_REUSEPORT (a group of several threads), or alone (one thread).
    reuse_port: bool,
    members: Mutex<Members>,
    pub(super) keys: Mutex<Keys>,
    /// Bumped (under `keys`' lock) at each change of `keys` but the handshake, so a
    /// member sees with one load whether its copy is still current.
    pub(super) epoch: AtomicU64,
    pub(super) timers: Timers,
    /// Checks handshake messages before `keys` is locked.
    pub(super) verifier: Verifier,
}

/// The group's sockets, in bind order (the SO_REUSEPORT group's order).
#[derive(Default)]
struct Members {
    /// The address the first member bound, which the others join.
    addr: Option<SocketAddr>,
    /// The CPU each member's thread is pinned to, if it is.
    cpus: Vec<Option<usize>>,
}

/// The sessions and the peer, changed only by handshakes, the first data under a new
/// session, and a peer that moved: rare events, under a lock.
pub(super) struct Keys {
    pub(super) handshake: Handshake,
    /// The session data is sealed with.
    pub(super) current: Option<Arc<Session>>,
    /// The responder's newest session, until data authenticates under it.
    pub(super) pending: Option<Arc<Session>>,
    /// The session `current` replaced: what the peer sealed before it switched still
    /// opens (nothing is sealed with it any more).
    pub(super) previous: Option<Arc<Session>>,
    pub(super) peer: Option<SocketAddr>,
}

/// A member's copy of [`Keys`] (without the handshake) as of `epoch`: what the data
/// path reads, with no lock.
#[derive(Default)]
pub(super) struct View {
    pub(super) epoch: u64,
    pub(super) current: Option<Arc<Session>>,
    pub(super) pending: Option<Arc<Session>>,
    pub(super) previous: Option<Arc<Session>>,
    pub(super) peer: Option<SocketAddr>,
}

impl TunnelGroup {
    /// A group with no member yet; the first to join binds `config.listen`.
    pub fn new(config: TunnelConfig) -> TunnelGroup {
        TunnelGroup::with_port_sharing(config, true)
    }

    pub(super) fn with_port_sharing(config: TunnelConfig, reuse_port: bool) -> TunnelGroup {
        let verifier = Verifier::new(config.key.as_bytes());
        let keys = Keys {
            handshake: Handshake::new(config.key.as_bytes()),
            current: None,
            pending: None,
            previous: None,
            // As datagrams' senders are shown (IPv4 as IPv4 on a dual-stack socket): a
            // peer configured as [::ffff:a.b.c.d] that never moves is not a roam.
            peer: config
                .peer
                .map(|peer| SocketAddr::new(peer.ip().to_canonical(), peer.port())),
        };
        TunnelGroup {
            shared: Arc::new(Shared {
                config,
                reuse_port,
                members: Mutex::new(Members::default()),
                keys: Mutex::new(keys),
                epoch: AtomicU64::new(1),
                timers: Timers::new(Instant::now()),
                verifier,
            }),
        }
    }

    /// A new member's UDP socket (don't-fragment on, UDP GRO on receive) bound with
    /// SO_REUSEPORT to the group's address (the first member binds `config.listen`, and
    /// its port is everyone's), whether it leads (runs the timers), and its lane.
    pub(super) fn bind_member(&self) -> Result<(DatagramSocket, bool, usize)> {
        let shared = &self.shared;
        let socket = DatagramSocket::new();
        let control = socket.control();
        control.set_dont_fragment(true)?;
        control.set_gro(true)?;
        control.set_receive_buffer_size(4 << 20)?;
        control.set_send_buffer_size(4 << 20)?;
        let (leader, lane) = {
            let mut members = lock(&shared.members);
            let lane = members.cpus.len();
            let leader = members.addr.is_none();
            let addr = members.addr.unwrap_or(shared.config.listen);
            if shared.reuse_port {
                socket.bind_shared(addr, leader)?;
            } else {
                socket.bind_addr(addr)?;
            }
            let bound = socket.local_addr()?;
            let cpu = crate::driver::affinity::pinned_cpu();
            // One peer is one UDP flow, which SO_REUSEPORT's hash sends to one socket
            // (and the TUN then steers every inner flow's replies to that thread's
            // queue): routed by the CPU that received them instead, datagrams reach the
            // thread of that CPU, so inner flows spread as the peer's threads send them.
            let cpus: Option<Vec<usize>> = members.cpus.iter().copied().chain([cpu]).collect();
            if let (true, Some(cpus)) = (shared.reuse_port && lane > 0, cpus) {
                socket.route_group_by_cpu(&cpus)?;
            }
            // Recorded once nothing can fail: the member's index is its socket's.
            members.cpus.push(cpu);
            if leader {
                members.addr = Some(bound);
            }
            (leader, lane)
        };
        Ok((socket, leader, lane))
    }

    /// The UDP address the members are bound to, once one is.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        lock(&self.shared.members).addr
    }

    /// The peer's address, configured or learned (an IPv4-mapped IPv6 address as IPv4).
    pub fn peer(&self) -> Option<SocketAddr> {
        lock(&self.shared.keys).peer
    }

    /// Whether a session is up.
    pub fn has_session(&self) -> bool {
        lock(&self.shared.keys).current.is_some()
    }
}

impl std::fmt::Debug for TunnelGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelGroup")
            .field("local_addr", &self.local_addr())
            .finish()
    }
}

/// Locks `mutex`; what it guards is consistent between any two statements, so a panic
/// elsewhere while it was held leaves it usable.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Changes the keys, and tells every member to refresh its view.
    pub(super) fn change<R>(&self, keys: &mut Keys, change: impl FnOnce(&mut Keys) -> R) -> R {
        let result = change(keys);
        self.epoch.fetch_add(1, Ordering::Release);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::PresharedKey;

    #[test]
    fn a_peer_configured_ipv4_mapped_is_kept_as_its_datagrams_will_show_it() {
        let key = PresharedKey::from_hex(&"11".repeat(32)).unwrap();
        let config = TunnelConfig::new(
            "[::]:0".parse().unwrap(),
            Some("[::ffff:10.9.0.2]:51820".parse().unwrap()),
            key,
        );
        let group = TunnelGroup::new(config);
        assert_eq!(group.peer(), Some("10.9.0.2:51820".parse().unwrap()));
    }
}
