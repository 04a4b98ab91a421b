//! DatagramSocket: UDP with a receive ring, batched sends, port sharing and multicast.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Deref;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod forwarding;

use super::bind::bind_retrying;
use super::control::{buffer_size, set_buffer_size, SocketBuffer};

use futures_core::Stream;

use super::meta::{OutgoingDatagram, SendOptions, TrafficClass};
use super::stream::sock_addr;
use super::transport::Transport;
use super::turn::Turnstile;
use super::{new_socket, resolve, Detached, OutputStream};
use crate::buf::{BufResult, IoBuf};
use crate::driver::forward::{Forward, Forwarding};
use crate::driver::ops_datagram::{
    self, canonical, for_family, monotonic_ns, AfterRecv, Carried, PostLedger, Receiver,
    RecvDatagram, RecvWants, RingConfig, SendMeta, MAX_UDP_PAYLOAD_V4, MAX_UDP_PAYLOAD_V6, UDP_GRO,
};
use crate::driver::SharedFd;
use crate::host::{parse_service, resolve_blocking, HostName, Protocol};
use crate::runtime::coop;
use crate::{Error, Result, SocketErrorStatus};

/// Shape of a socket's receive ring: how large a datagram it keeps whole, and how many
/// of those it holds at least.
///
/// The default receives every UDP datagram whole (up to 65,507 bytes over IPv4, 65,527
/// over IPv6) in 4 MiB per socket ([`memory`](Self::memory)): 64 slots of 64 KiB, each
/// with room for what io_uring writes before a datagram. The memory is mapped when the
/// first receive sets the ring up; pages the kernel never writes are never allocated.
///
/// On io_uring the ring is a provided buffer ring (IORING_REGISTER_PBUF_RING, Linux 5.19)
/// fed by one multishot receive (Linux 6.0); on epoll a pool `recvmmsg` fills. Where the
/// kernel consumes buffers incrementally (io_uring,
/// [`Capability::IncrementalBuffers`](crate::Capability::IncrementalBuffers)), four slots
/// make one buffer that the kernel packs with datagrams until fewer than a header and
/// `buffer_size` bytes are left, so the same memory holds hundreds of small datagrams per
/// buffer (about 14,000 of 172 bytes by default) where one datagram per slot holds 64.
/// The kernel is then given four buffers at a time, more once a burst runs it dry, so a
/// busy socket cycles through about 1 MiB of warm memory rather than all 4 MiB.
/// Either way a received [`Datagram`] lends its buffer and gives it back when the last
/// datagram in it is dropped; a program that holds every buffer leaves the kernel to
/// queue (and, past the socket's receive buffer, drop) new datagrams, counted in
/// [`ReceiveStats::dropped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveRing {
    /// Datagrams of `buffer_size` bytes the ring holds at least; rounded up to a power of
    /// two, 1..=32768 (default 64).
    pub buffers: u16,
    /// Payload bytes a datagram keeps, 1..=65,536 (default 65,536: every UDP datagram
    /// whole, so a larger size could never be filled). Only a ring made smaller cuts
    /// datagrams: a longer one is delivered truncated to this
    /// size, flagged ([`Datagram::is_truncated`]) and counted
    /// ([`ReceiveStats::truncated`]).
    pub buffer_size: usize,
}

impl Default for ReceiveRing {
    fn default() -> Self {
        ReceiveRing {
            buffers: 64,
            buffer_size: ReceiveRing::WHOLE,
        }
    }
}

impl ReceiveRing {
    /// A `buffer_size` that keeps every UDP datagram whole: 64 KiB.
    pub const WHOLE: usize = 65_536;

    /// The default ring: every UDP datagram whole, also GRO super-datagrams. (It was
    /// larger than the default before the default took every datagram whole.)
    pub fn large() -> ReceiveRing {
        ReceiveRing::default()
    }

    /// Bytes of memory the ring takes: its cap, whichever engine fills it. Receive
    /// metadata ([`DatagramSocketControl::set_receive_destination`] and the like) adds
    /// up to 152 bytes per slot for the kernel's control messages.
    pub fn memory(&self) -> usize {
        ops_datagram::ring_memory(self.buffers, self.buffer_size, 0)
    }
}

/// Counters of a socket's receive ring (see [`DatagramSocket::receive_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Datagrams received (GRO segments count one each), those forwarded included.
    pub datagrams: u64,
    /// Of those, datagrams the socket sent on by itself
    /// ([`DatagramSocket::forward_received`]) instead of delivering them; what became
    /// of each send is in [`DatagramSocket::post_stats`].
    pub forwarded: u64,
    /// Of those, datagrams longer than the ring's `buffer_size`, delivered truncated
    /// (only with a ring made smaller than the default).
    pub truncated: u64,
    /// Times the ring ran dry because the program held every buffer (ENOBUFS on
    /// io_uring, which ends the multishot receive); the receiver resumed once a buffer
    /// came back and the program received again.
    pub ring_empty: u64,
    /// Times the receiver's standing receive was started again: after the kernel ended
    /// it (a dry ring), or when the receiver came back to it from draining a burst.
    pub receive_restarts: u64,
    /// Multishot receive completions and `recvmmsg` calls that delivered data.
    pub deliveries: u64,
    /// GRO super-datagrams taken apart.
    pub gro_splits: u64,
    /// Datagrams whose control messages did not all fit (MSG_CTRUNC): the descriptor
    /// has receive options on that this socket does not know of (set on it directly,
    /// say SO_TIMESTAMPING or IP_RECVTTL), whose messages crowd out the metadata asked
    /// for. Metadata may be missing from those datagrams.
    pub control_truncated: u64,
    /// Bursts the receiver drained: times datagrams came faster than it slept and woke,
    /// so it stopped leaving a standing wait on the socket (which makes the sender's
    /// kernel path call it for every datagram it queues) and read the queue in batches
    /// instead. It goes back after 8 wakes in a row that find fewer than 4 datagrams.
    pub bursts_drained: u64,
    /// Datagrams the kernel dropped on this socket before it was read, because its
    /// receive queue was full: this is where datagrams are lost while the ring is dry
    /// (SO_MEMINFO's drop counter).
    pub dropped: u64,
    /// Buffers in the ring (with incremental buffers, each spans four slots).
    pub buffers: usize,
    /// Buffers held by datagrams the program has not dropped yet.
    pub buffers_lent: usize,
    /// Buffers the kernel (or the next `recvmmsg`) can still fill, a buffer it is
    /// part-way through included: 0 means the ring is dry until the program drops a
    /// datagram.
    pub buffers_free: usize,
    /// Buffers held by datagrams being forwarded without a copy ([`Datagram::into_forward`]);
    /// at most a quarter of the ring's (at least one, never the last).
    pub buffers_forwarding: usize,
}

/// What became of the datagrams a socket posted ([`DatagramSocket::post_to_addr`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostStats {
    /// Posted datagrams whose send has not completed yet.
    pub in_flight: usize,
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams dropped because the socket's send buffer was full (EAGAIN, ENOBUFS):
    /// a post never waits for room.
    pub dropped: u64,
    /// Datagrams the kernel refused for any other reason.
    pub failed: u64,
    /// The reason of the last of those.
    pub last_error: Option<SocketErrorStatus>,
}

/// Options of a datagram socket, applied when its socket is created and at once after.
#[derive(Debug)]
struct DatagramOptions {
    receive_buffer_size: Cell<Option<usize>>,
    send_buffer_size: Cell<Option<usize>>,
    hop_limit: Cell<Option<u32>>,
    broadcast: Cell<bool>,
    dont_fragment: Cell<bool>,
    multicast_only: Cell<bool>,
    multicast_loop: Cell<Option<bool>>,
    multicast_hop_limit: Cell<Option<u32>>,
    traffic_class: Cell<Option<TrafficClass>>,
    gro: Cell<bool>,
    gso: Rc<Cell<bool>>,
    ring: Cell<ReceiveRing>,
    receive_destination: Cell<bool>,
    receive_traffic_class: Cell<bool>,
    receive_timestamps: Cell<bool>,
    kernel_pacing: Cell<bool>,
}

impl Default for DatagramOptions {
    fn default() -> Self {
        DatagramOptions {
            receive_buffer_size: Cell::new(None),
            send_buffer_size: Cell::new(None),
            hop_limit: Cell::new(None),
            broadcast: Cell::new(false),
            dont_fragment: Cell::new(false),
            multicast_only: Cell::new(false),
            multicast_loop: Cell::new(None),
            multicast_hop_limit: Cell::new(None),
            traffic_class: Cell::new(None),
            gro: Cell::new(false),
            gso: Rc::new(Cell::new(true)),
            ring: Cell::new(ReceiveRing::default()),
            receive_destination: Cell::new(false),
            receive_traffic_class: Cell::new(false),
            receive_timestamps: Cell::new(false),
            kernel_pacing: Cell::new(false),
        }
    }
}

/// A UDP socket, like Windows.Networking.Sockets.DatagramSocket.
///
/// Create it, set its [`control`](Self::control) options, then [`bind`](Self::bind)
/// (BindServiceNameAsync) or [`connect`](Self::connect) (ConnectAsync); sending to an
/// address from an unbound socket binds it to a port the kernel picks.
///
/// Receiving (MessageReceived) goes through a receive ring: [`messages`](Self::messages)
/// is a stream of [`Datagram`]s, [`recv_batch`](Self::recv_batch) takes everything
/// ready at once. Sending in batches goes through [`output_stream`](Self::output_stream)
/// (connected) or [`output_stream_to`](Self::output_stream_to) (GetOutputStreamAsync):
/// queue datagrams with `write`, send them with one `flush`.
///
/// # Examples
///
/// ```
/// use ringsock::{DatagramSocket, HostName};
///
/// ringsock::block_on(async {
///     let server = DatagramSocket::new();
///     server.bind_host(&HostName::new("127.0.0.1")?, "0")?;
///     let port = server.local_addr()?.port().to_string();
///
///     let client = DatagramSocket::new();
///     client.send_to(b"ping".to_vec(), &HostName::new("127.0.0.1")?, &port).await.0?;
///
///     let request = server.recv().await?;
///     assert_eq!(&request[..], b"ping");
///     server.send_to_addr(b"pong".to_vec(), request.remote_addr()).await.0?;
///     assert_eq!(&client.recv().await?[..], b"pong");
///     Ok::<_, ringsock::Error>(())
/// })?;
/// # Ok::<_, ringsock::Error>(())
/// ```
pub struct DatagramSocket {
    fd: OnceCell<SharedFd>,
    ipv6: Cell<bool>,
    options: DatagramOptions,
    receiver: RefCell<Option<Receiver>>,
    /// Datagrams received before the socket came to this runtime, or taken by a
    /// [`Messages`] stream dropped before it handed them out: handed out first.
    carried: RefCell<VecDeque<RecvDatagram>>,
    /// One receive call at a time uses the receiver; the others wait here in turn.
    turn: Turnstile,
    /// The socket receives through a [`DatagramGroup`](super::DatagramGroup) only.
    grouped: Cell<bool>,
    /// The books of posted sends; every posted send's slot holds a clone.
    posts: Rc<PostLedger>,
    /// Where a `recv` or `recv_batch` poll puts what the receiver hands over, kept
    /// between calls: a list made per call cost a malloc and a free per `recv`.
    recv_scratch: Cell<Vec<RecvDatagram>>,
    /// What the socket forwards by itself (see `forward_received`).
    forwarding: Cell<Option<Forwarding>>,
    /// Datagrams the socket's receive forwarded (the io_uring driver counts its own).
    forwarded: Cell<u64>,
    /// One receive's datagrams while the rule sorts them, kept for its room.
    forward_scratch: Cell<Vec<RecvDatagram>>,
    /// The forwards of one receive on their way out, kept for its room.
    forward_out: Cell<Vec<Forward>>,
}

impl DatagramSocket {
    /// A socket not yet bound or connected.
    pub fn new() -> DatagramSocket {
        DatagramSocket {
            fd: OnceCell::new(),
            ipv6: Cell::new(false),
            options: DatagramOptions::default(),
            receiver: RefCell::new(None),
            carried: RefCell::new(VecDeque::new()),
            turn: Turnstile::default(),
            grouped: Cell::new(false),
            posts: Rc::default(),
            recv_scratch: Cell::new(Vec::new()),
            forwarding: Cell::new(None),
            forwarded: Cell::new(0),
            forward_scratch: Cell::new(Vec::new()),
            forward_out: Cell::new(Vec::new()),
        }
    }

    /// Binds to `service` (a port number, "0" for any free port, or a UDP service name)
    /// on every local address: IPv6 and IPv4 together where the system has IPv6, else
    /// IPv4 (BindServiceNameAsync).
    pub fn bind(&self, service: &str) -> Result<()> {
        let port = parse_service(service, Protocol::Udp)?;
        let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        match self.bind_with(any6, true) {
            Err(err) if err.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                self.bind_addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            }
            other => other,
        }
    }

    /// Binds to `service` at the first address of `host` that accepts
    /// (BindEndpointAsync).
    pub fn bind_host(&self, host: &HostName, service: &str) -> Result<()> {
        let port = parse_service(service, Protocol::Udp)?;
        let mut last = None;
        for addr in resolve_blocking(host, port)? {
            match self.bind_addr(addr) {
                Ok(()) => return Ok(()),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| Error::NoAddresses {
            host: host.to_string(),
        }))
    }

    /// Binds to one socket address.
    ///
    /// Every bind retries a port in use for up to 250 ms before it fails with
    /// AddressAlreadyInUse, so that a server restarted right after its predecessor was
    /// killed gets the port the dying process still holds. Port sharing between live
    /// sockets is [`set_multicast_only`](DatagramSocketControl::set_multicast_only)
    /// (SO_REUSEADDR and SO_REUSEPORT); without it no such option is set.
    pub fn bind_addr(&self, addr: SocketAddr) -> Result<()> {
        self.bind_with(addr, false)
    }

    fn bind_with(&self, addr: SocketAddr, dual_stack: bool) -> Result<()> {
        if self.fd.get().is_some() {
            return Err(Error::invalid_input(
                "the socket is already bound or connected",
            ));
        }
        let socket = self.create(&addr, dual_stack)?;
        bind_retrying(&socket, addr).map_err(|err| Error::io(format!("bind {addr}"), err))?;
        self.install(socket, addr.is_ipv6())
    }

    /// A new socket for `addr`'s family with every option applied.
    fn create(&self, addr: &SocketAddr, dual_stack: bool) -> Result<socket2::Socket> {
        let socket = new_socket(addr, socket2::Type::DGRAM)?;
        if dual_stack {
            socket
                .set_only_v6(false)
                .map_err(|err| Error::io("set IPV6_V6ONLY", err))?;
        }
        crate::driver::sockopt::receive_joined_groups_only(socket.as_raw_fd(), addr.is_ipv6())
            .map_err(|err| Error::io("set IP_MULTICAST_ALL", err))?;
        if self.options.multicast_only.get() {
            socket
                .set_reuse_address(true)
                .map_err(|err| Error::io("set SO_REUSEADDR", err))?;
            socket
                .set_reuse_port(true)
                .map_err(|err| Error::io("set SO_REUSEPORT", err))?;
        }
        Ok(socket)
    }

    fn install(&self, socket: socket2::Socket, ipv6: bool) -> Result<()> {
        let fd = SharedFd::new(OwnedFd::from(socket));
        self.ipv6.set(ipv6);
        self.control_for(Some(&fd)).apply_all()?;
        self.fd
            .set(fd)
            .map_err(|_| Error::invalid_input("the socket is already bound or connected"))
    }

    /// The socket, created (unbound) for `addr`'s family if there is none yet.
    fn socket_for(&self, addr: &SocketAddr) -> Result<&SharedFd> {
        if self.fd.get().is_none() {
            let socket = self.create(addr, false)?;
            self.install(socket, addr.is_ipv6())?;
        }
        self.fd()
    }

    /// Binds `addr` with SO_REUSEADDR and SO_REUSEPORT as one member of a group of
    /// sockets that share it. The `first` member of a group with a given port first
    /// waits out a socket a process that just ended still holds there (see
    /// `wait_until_free`), so the group does not join that dying socket's; a port
    /// still held after that is AddressAlreadyInUse: the group shares it with no one
    /// else (another process's sockets would take part of its datagrams, and its CPU
    /// routing would replace theirs).
    pub(crate) fn bind_shared(&self, addr: SocketAddr, first: bool) -> Result<()> {
        if first {
            let free = super::bind::wait_until_free(addr, socket2::Type::DGRAM)
                .map_err(|err| Error::io(format!("bind {addr}"), err))?;
            if !free {
                return Err(Error::io(
                    format!("bind {addr}: another socket holds the port"),
                    std::io::Error::from_raw_os_error(libc::EADDRINUSE),
                ));
            }
        }
        self.options.multicast_only.set(true);
        self.bind_addr(addr)
    }

    /// Routes each datagram of this socket's SO_REUSEPORT group to the member whose
    /// index (in bind order) is the position of the receiving CPU in `cpus`, so a
    /// datagram is handled on the CPU that received it.
    pub(crate) fn route_group_by_cpu(&self, cpus: &[usize]) -> Result<()> {
        crate::driver::sockopt::route_reuseport_by_cpu(self.fd()?.raw(), cpus)
            .map_err(|err| Error::io("attach the CPU routing program", err))
    }

    fn fd(&self) -> Result<&SharedFd> {
        self.fd
            .get()
            .ok_or_else(|| Error::invalid_input("the socket is not bound or connected"))
    }

    /// Picks the address of `addrs` this socket can reach: any when it has no socket
    /// yet, else one of its family (IPv4 on a dual-stack IPv6 socket too).
    fn pick(&self, host: &HostName, addrs: Vec<SocketAddr>) -> Result<SocketAddr> {
        let usable = |addr: &SocketAddr| match self.fd.get() {
            None => true,
            Some(_) => self.ipv6.get() || addr.is_ipv4(),
        };
        if addrs.is_empty() {
            return Err(Error::NoAddresses {
                host: host.to_string(),
            });
        }
        addrs.iter().copied().find(usable).ok_or_else(|| {
            Error::io(
                format!("{host} has only IPv6 addresses, and this socket is IPv4"),
                std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
            )
        })
    }

    /// Sets the default remote end (ConnectAsync): `send` and
    /// [`output_stream`](Self::output_stream) then go there, and only datagrams from it
    /// are received. Tries each address of `host` in turn.
    pub async fn connect(&self, host: &HostName, service: &str) -> Result<()> {
        let addrs = resolve(host, service, Protocol::Udp).await?;
        let mut last = None;
        for addr in addrs {
            match self.connect_addr(addr).await {
                Ok(()) => return Ok(()),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| Error::NoAddresses {
            host: host.to_string(),
        }))
    }

    /// Sets the default remote end to one socket address. Port 0 is InvalidArgument:
    /// no datagram can go there.
    pub async fn connect_addr(&self, addr: SocketAddr) -> Result<()> {
        if addr.port() == 0 {
            return Err(Error::invalid_input(format!(
                "connect to {addr}: port 0 is no destination"
            )));
        }
        let fd = self.socket_for(&addr)?;
        let target = for_family(addr, self.ipv6.get());
        // A UDP connect only records the peer: it completes at once, without traffic.
        fd.sock()
            .connect(&target.into())
            .map_err(|err| Error::io(format!("connect to {addr}"), err))
    }

    /// Sends `buf` as one datagram to the connected remote end.
    pub async fn send<B: IoBuf>(&self, buf: B) -> BufResult<usize, B> {
        self.send_with(buf, &SendOptions::default()).await
    }

    /// Sends `buf` as one datagram to the connected remote end, with `options` (source
    /// address, traffic class).
    pub async fn send_with<B: IoBuf>(&self, buf: B, options: &SendOptions) -> BufResult<usize, B> {
        let (fd, meta) = match self
            .fd()
            .and_then(|fd| Ok((fd, self.connected_meta(options)?)))
        {
            Ok(found) => found,
            Err(err) => return (Err(err), buf),
        };
        self.pace(options).await;
        let (result, buf) = coop::budgeted(ops_datagram::send_to(fd, buf, None, &meta)).await;
        let context = send_context(None, meta.source);
        (result.map_err(|err| Error::io(context, err)), buf)
    }

    /// The driver's form of `options` for datagrams to `dest` (as the socket's family
    /// writes it): IPv4 control messages for IPv4 and v4-mapped destinations.
    fn send_meta(&self, options: &SendOptions, dest: SocketAddr) -> Result<SendMeta> {
        let ipv4 = canonical(dest).is_ipv4();
        if let Some(source) = options.source {
            let source_v4 = match source {
                IpAddr::V4(_) => true,
                IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
            };
            if source_v4 != ipv4 {
                return Err(Error::invalid_input(format!(
                    "source address {source} cannot send to {dest}: another IP version"
                )));
            }
            if !self.ipv6.get() && !source_v4 {
                return Err(Error::invalid_input(format!(
                    "source address {source} on an IPv4 socket"
                )));
            }
        }
        let kernel_paces = self.options.kernel_pacing.get();
        Ok(SendMeta {
            source: options.source,
            tos: options.traffic_class.map(TrafficClass::to_byte),
            txtime: options
                .transmit_at
                .filter(|_| kernel_paces)
                .map(monotonic_ns),
            ipv4,
        })
    }

    /// Waits for `options`' transmit time, unless the kernel paces this socket.
    async fn pace(&self, options: &SendOptions) {
        if let Some(at) = options.transmit_at {
            if !self.options.kernel_pacing.get() {
                crate::runtime::sleep_until_lenient(at).await;
            }
        }
    }

    /// [`send_meta`](Self::send_meta) for the connected peer.
    fn connected_meta(&self, options: &SendOptions) -> Result<SendMeta> {
        if *options == SendOptions::default() {
            return Ok(SendMeta::default());
        }
        self.send_meta(options, self.peer_addr()?)
    }

    /// Sends `buf` as one datagram to `service` at `host` (the first of its addresses
    /// this socket can reach).
    pub async fn send_to<B: IoBuf>(
        &self,
        buf: B,
        host: &HostName,
        service: &str,
    ) -> BufResult<usize, B> {
        let addr = match resolve(host, service, Protocol::Udp).await {
            Ok(addrs) => self.pick(host, addrs),
            Err(err) => Err(err),
        };
        match addr {
            Ok(addr) => self.send_to_addr(buf, addr).await,
            Err(err) => (Err(err), buf),
        }
    }

    /// Sends `buf` as one datagram to `addr`.
    pub async fn send_to_addr<B: IoBuf>(&self, buf: B, addr: SocketAddr) -> BufResult<usize, B> {
        self.send_to_addr_with(buf, addr, &SendOptions::default())
            .await
    }

    /// Sends `buf` as one datagram to `addr` with `options`: from a source address of
    /// this host (a reply from the address the request came to:
    /// [`SendOptions::reply_to`]), with a traffic class (DSCP and ECN).
    pub async fn send_to_addr_with<B: IoBuf>(
        &self,
        buf: B,
        addr: SocketAddr,
        options: &SendOptions,
    ) -> BufResult<usize, B> {
        if let Err(err) = check_destination(addr) {
            return (Err(err), buf);
        }
        let fd = match self.socket_for(&addr) {
            Ok(fd) => fd,
            Err(err) => return (Err(err), buf),
        };
        let meta = match self.send_meta(options, addr) {
            Ok(meta) => meta,
            Err(err) => return (Err(err), buf),
        };
        self.pace(options).await;
        let target = for_family(addr, self.ipv6.get());
        let (result, buf) =
            coop::budgeted(ops_datagram::send_to(fd, buf, Some(target), &meta)).await;
        (
            result.map_err(|err| Error::io(send_context(Some(addr), meta.source), err)),
            buf,
        )
    }

    /// Sends `buf` as one datagram to `addr` without waiting for it: the send is
    /// submitted with the runtime's next turn, the buffer is dropped when the kernel is
    /// done with it (a [`Forward`](crate::Forward) gives its receive buffer back to the
    /// ring then), and its result is counted in [`post_stats`](Self::post_stats) instead
    /// of returned. For a relay or a media server that forwards many datagrams and acts
    /// on none of the results one by one: no future, no waker, no wake per datagram.
    ///
    /// A post never waits: a datagram the socket's send buffer has no room for is
    /// dropped and counted, as the kernel drops a datagram on a full receive queue.
    /// [`settle_posts`](Self::settle_posts) waits until every posted datagram is out.
    /// Posts keep their place among the socket's other sends: a datagram sent after a
    /// post, by any call, leaves after it (but for a forwarding GSO run the path
    /// refused, which goes again one by one at a later turn: see
    /// [`forward_received`](Self::forward_received)).
    ///
    /// Fails, with nothing sent and the buffer given back, on port 0 (InvalidArgument), an IPv6 destination on an
    /// IPv4 socket (AddressFamilyNotSupported), a socket of another runtime
    /// (WrongRuntime), a datagram over the UDP maximum (MessageTooLong), and when 4,096
    /// posted datagrams are still in flight (NoBufferSpace: the program posts without
    /// letting the runtime turn). What the kernel refuses only when it sends (an
    /// IPv6-only socket to an IPv4 address, a send cancelled because the socket was
    /// detached or dropped first) is counted as failed, with its reason.
    ///
    /// ```no_run
    /// use ringsock::{DatagramSocket, Runtime};
    ///
    /// Runtime::new()?.block_on(async {
    ///     let socket = DatagramSocket::new();
    ///     socket.bind_addr("127.0.0.1:0".parse().unwrap())?;
    ///     let sink = "127.0.0.1:9".parse().unwrap();
    ///     loop {
    ///         let datagram = socket.recv().await?;
    ///         socket
    ///             .post_to_addr(datagram.into_forward(), sink)
    ///             .map_err(|(err, _)| err)?;
    ///     }
    ///     # Ok::<_, ringsock::Error>(())
    /// })?;
    /// # Ok::<_, ringsock::Error>(())
    /// ```
    pub fn post_to_addr<B: IoBuf>(
        &self,
        buf: B,
        addr: SocketAddr,
    ) -> std::result::Result<(), (Error, B)> {
        let context = || send_context(Some(addr), None);
        if let Err(err) = check_destination(addr) {
            return Err((err, buf));
        }
        let fd = match self.socket_for(&addr) {
            Ok(fd) => fd,
            Err(err) => return Err((err, buf)),
        };
        let target = for_family(addr, self.ipv6.get());
        // The limit is the destination's: the kernel would refuse more only in the
        // completion, where nobody looks.
        let max = max_payload_to(target);
        if buf.bytes_init() > max {
            let what = format!("{}: {} bytes, at most {max}", context(), buf.bytes_init());
            return Err((Error::from_errno(what, libc::EMSGSIZE), buf));
        }
        if target.is_ipv6() && !self.ipv6.get() {
            // The kernel would refuse it only in the completion, where nobody looks.
            return Err((Error::from_errno(context(), libc::EAFNOSUPPORT), buf));
        }
        ops_datagram::post_to(fd, buf, target, &self.posts)
            .map_err(|(err, buf)| (Error::io(format!("post: {}", context()), err), buf))
    }

    /// What became of the datagrams this socket posted.
    pub fn post_stats(&self) -> PostStats {
        let counts = self.posts.counts();
        PostStats {
            in_flight: counts.in_flight,
            sent: counts.sent,
            dropped: counts.dropped,
            failed: counts.failed,
            last_error: counts.last_error.map(SocketErrorStatus::from_errno),
        }
    }

    /// Waits until no datagram this socket posted is in flight (each sent, dropped or
    /// failed, see [`post_stats`](Self::post_stats)). Posts in flight complete only as
    /// their runtime turns, so awaited under another runtime this fails with
    /// WrongRuntime instead of waiting for it.
    pub async fn settle_posts(&self) -> Result<()> {
        if self.posts.counts().in_flight == 0 {
            return Ok(());
        }
        if let Some(fd) = self.fd.get() {
            fd.binding()
                .map_err(|err| Error::io("wait for posted datagrams", err))?;
        }
        poll_fn(|cx| self.posts.poll_settled(cx)).await;
        Ok(())
    }

    /// The largest datagram the socket can send where its output streams go: to `dest`,
    /// else to the connected peer.
    fn max_payload(&self, dest: Option<SocketAddr>) -> usize {
        match dest.or_else(|| self.peer_addr().ok()) {
            Some(to) => max_payload_to(to),
            None if self.ipv6.get() => MAX_UDP_PAYLOAD_V6,
            None => MAX_UDP_PAYLOAD_V4,
        }
    }

    /// A batching writer to the connected remote end: each `write` queues one datagram,
    /// `flush` sends every queued datagram in one submission (a linked SQE chain on
    /// io_uring, one `sendmmsg` on epoll; runs of equal-sized datagrams as single UDP GSO
    /// sends). Each call returns a new stream.
    ///
    /// A stream keeps the order of its writes, so a send that fails ends it as it ends a
    /// byte stream: every write from the failed one on fails with that status (say
    /// `ConnectionRefused`, after an ICMP port unreachable on a connected socket), and so
    /// does every later one. The socket goes on: a new stream sends again. A sender that
    /// expects such refusals from time to time (a peer that restarts) and wants each
    /// datagram's own result uses [`send_many`](Self::send_many) or
    /// [`send_to_addr`](Self::send_to_addr) instead.
    pub fn output_stream(&self) -> Result<OutputStream> {
        self.output_stream_with(&SendOptions::default())
    }

    /// [`output_stream`](Self::output_stream) whose every datagram carries `options`
    /// (source address, traffic class); GSO runs keep them.
    pub fn output_stream_with(&self, options: &SendOptions) -> Result<OutputStream> {
        let fd = self.fd()?;
        self.peer_addr()?;
        no_stream_pacing(options)?;
        let meta = self.connected_meta(options)?;
        Ok(self.stream_to(fd, None, meta))
    }

    /// A batching writer whose datagrams go to `service` at `host`
    /// (GetOutputStreamAsync); binds the socket to a free port first if needed.
    pub async fn output_stream_to(&self, host: &HostName, service: &str) -> Result<OutputStream> {
        let addrs = resolve(host, service, Protocol::Udp).await?;
        let addr = self.pick(host, addrs)?;
        self.output_stream_to_addr(addr)
    }

    /// A batching writer whose datagrams go to `addr`.
    pub fn output_stream_to_addr(&self, addr: SocketAddr) -> Result<OutputStream> {
        self.output_stream_to_addr_with(addr, &SendOptions::default())
    }

    /// A batching writer whose datagrams go to `addr`, each carrying `options` (source
    /// address, traffic class); GSO runs keep them.
    pub fn output_stream_to_addr_with(
        &self,
        addr: SocketAddr,
        options: &SendOptions,
    ) -> Result<OutputStream> {
        no_stream_pacing(options)?;
        check_destination(addr)?;
        let fd = self.socket_for(&addr)?;
        let meta = self.send_meta(options, addr)?;
        Ok(self.stream_to(fd, Some(for_family(addr, self.ipv6.get())), meta))
    }

    fn stream_to(&self, fd: &SharedFd, dest: Option<SocketAddr>, meta: SendMeta) -> OutputStream {
        OutputStream::with_transport(
            Some(fd.clone()),
            Transport::Datagram {
                dest,
                meta,
                gso: self.options.gso.clone(),
                max_payload: self.max_payload(dest),
                posts: self.posts.clone(),
            },
        )
    }

    /// Sends each datagram of `batch` to its own destination, with its own options, in
    /// one flush: one `sendmmsg` (while the send buffer has room) of one message per
    /// run of datagrams to the same destination with the same options, a UDP GSO send
    /// where their sizes allow (see
    /// [`set_segmentation_offload`](DatagramSocketControl::set_segmentation_offload)).
    ///
    /// Datagrams with a transmit time ([`SendOptions::transmit_at`]) leave at it, in
    /// order: the runtime holds each run of one time until then (or, with
    /// [`set_kernel_pacing`](DatagramSocketControl::set_kernel_pacing), the kernel does);
    /// a GSO send never mixes two times.
    ///
    /// Returns each datagram's result in order: the bytes sent, or why that datagram
    /// (and the others of its message) was not sent; the rest of the batch goes on. The
    /// error is for the batch as a whole: options that cannot apply to a destination
    /// (an IPv6 source for an IPv4 peer), or a socket that cannot send at all; then
    /// nothing was sent. A socket that stops sending after a run of a paced batch went
    /// out (detached while a later run waits for its time) fails only the datagrams
    /// not yet sent, each with that error.
    pub async fn send_many<B: AsRef<[u8]>>(
        &self,
        batch: Vec<OutgoingDatagram<B>>,
    ) -> Result<Vec<Result<usize>>> {
        let Some(first) = batch.first() else {
            return Ok(Vec::new());
        };
        let fd = self.socket_for(&first.to)?;
        let count = batch.len();
        let mut bufs = Vec::with_capacity(count);
        let mut targets = Vec::with_capacity(count);
        let mut times = Vec::with_capacity(count);
        for datagram in batch {
            let meta = self.send_meta(&datagram.options, datagram.to)?;
            targets.push((for_family(datagram.to, self.ipv6.get()), meta));
            times.push(datagram.options.transmit_at);
            bufs.push(datagram.data);
        }
        let mut results = Vec::with_capacity(count);
        let kernel_paces = self.options.kernel_pacing.get();
        let mut bufs = bufs.into_iter();
        let mut from = 0;
        while from < count {
            // Paced by the runtime: each run of one transmit time goes out at its time,
            // in order, so no datagram leaves early and no GSO send mixes two times.
            let mut to = count;
            if !kernel_paces {
                let time = times[from];
                to = from + times[from..].iter().take_while(|t| **t == time).count();
                if let Some(at) = time {
                    crate::runtime::sleep_until_lenient(at).await;
                }
            }
            let run: Vec<B> = bufs.by_ref().take(to - from).collect();
            let sent = match ops_datagram::send_many(
                fd,
                run,
                targets[from..to].to_vec(),
                &self.options.gso,
                &self.posts,
            )
            .await
            {
                Ok((sent, _sent_bufs)) => sent,
                Err(err) if from == 0 => return Err(Error::io("send", err)),
                Err(err) => {
                    // Earlier runs went out (the socket was detached while a later one
                    // waited for its time, say): an error for the whole batch would
                    // tell the caller to send them again. Only the rest failed.
                    let err = Error::io("send", err);
                    results.extend((from..count).map(|_| Err(err.clone())));
                    break;
                }
            };
            results.extend(sent.into_iter().zip(&targets[from..to]).map(
                |(result, &(to, meta))| {
                    let to = canonical(to);
                    result.map_err(|err| match check_destination(to) {
                        // The kernel's EINVAL for it says less.
                        Err(bad) => bad,
                        Ok(()) => Error::io(send_context(Some(to), meta.source), err),
                    })
                },
            ));
            from = to;
        }
        Ok(results)
    }

    /// The next datagram (one MessageReceived), whole. Only a ring made smaller than the
    /// default ([`ReceiveRing`]) cuts a datagram: it comes flagged
    /// ([`Datagram::is_truncated`], [`Datagram::original_len`]), as from
    /// [`recv_batch`](Self::recv_batch) and [`messages`](Self::messages), and counted in
    /// [`ReceiveStats::truncated`].
    pub async fn recv(&self) -> Result<Datagram> {
        let mut one = None;
        self.recv_into(1, |datagram| one = Some(datagram)).await?;
        one.ok_or_else(|| Error::io("receive", std::io::ErrorKind::UnexpectedEof.into()))
    }

    /// Waits until at least one datagram is there, then appends the datagrams the
    /// socket has taken in, up to `max`, to `out` and returns how many: what one receive
    /// step brought (one `recvmmsg` of up to 64, or the multishot receive's completions
    /// reaped on io_uring), not all the kernel may queue meanwhile, so call it in a
    /// loop. A datagram a smaller ring cut comes flagged ([`Datagram::is_truncated`]),
    /// as from [`recv`](Self::recv). A `max` of 0 is an InvalidArgument error: the call
    /// would wait for a datagram it cannot take.
    pub async fn recv_batch(&self, out: &mut Vec<Datagram>, max: usize) -> Result<usize> {
        if max == 0 {
            return Err(Error::invalid_input(
                "recv_batch with max 0: it takes at least one datagram",
            ));
        }
        let before = out.len();
        self.recv_into(max, |datagram| out.push(datagram)).await?;
        Ok(out.len() - before)
    }

    /// Every received datagram, as a stream (MessageReceived); never ends. Items are
    /// errors for receive failures (such as an ICMP port unreachable on a connected
    /// socket); the stream goes on after them. Datagrams a smaller ring cut come flagged,
    /// as from [`recv`](Self::recv).
    pub fn messages(&self) -> Messages<'_> {
        Messages {
            socket: self,
            ready: VecDeque::new(),
            pending: None,
        }
    }

    /// Waits for datagrams and hands up to `max` of them to `take`, in order.
    async fn recv_into(&self, max: usize, mut take: impl FnMut(Datagram)) -> Result<()> {
        if self.grouped.get() {
            return Err(Error::invalid_input(
                "the socket is in a DatagramGroup: receive through the group",
            ));
        }
        let fd = self.fd()?.clone();
        let _turn = self.turn.take().await;
        let receive = poll_fn(|cx| {
            // Out of its cell for the poll: a receive re-entered from a waker finds it
            // empty and grows its own.
            let mut raw = self.recv_scratch.take();
            let polled = self.poll_recv(&fd, cx, &mut raw, max);
            for datagram in raw.drain(..) {
                take(Datagram::from(datagram));
            }
            self.recv_scratch.set(raw);
            polled.map_ok(|_| ())
        });
        coop::budgeted(receive).await
    }

    /// Marks the socket as received through a group (or no longer).
    pub(super) fn set_grouped(&self, grouped: bool) {
        self.grouped.set(grouped);
    }

    /// Gives back a datagram its group took from it and could not hand out (the call
    /// unwound): the socket hands it out first. Called newest first.
    pub(super) fn put_back(&self, datagram: Datagram) {
        self.carried.borrow_mut().push_front(datagram.inner);
    }

    /// One receive step for the socket's group: no turn is taken, as the group is the
    /// socket's only receiver. With datagrams it says whether the socket now waits with
    /// `cx`'s waker, so the group polls it again only once it wakes.
    pub(super) fn poll_recv_grouped(
        &self,
        cx: &mut Context<'_>,
        out: &mut Vec<RecvDatagram>,
        max: usize,
    ) -> Poll<Result<AfterRecv>> {
        match self.fd() {
            Ok(fd) => self.poll_recv(fd, cx, out, max),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    /// One receive step: what the receiver (or, first, what the socket carried along)
    /// hands over, the receiver set up on the first.
    fn poll_received(
        &self,
        fd: &SharedFd,
        cx: &mut Context<'_>,
        out: &mut Vec<RecvDatagram>,
        max: usize,
    ) -> Poll<Result<AfterRecv>> {
        {
            let mut carried = self.carried.borrow_mut();
            if !carried.is_empty() {
                let n = max.max(1).min(carried.len());
                out.extend(carried.drain(..n));
                return Poll::Ready(Ok(AfterRecv::MayHaveMore));
            }
        }
        let mut receiver = self.receiver.borrow_mut();
        if receiver.is_none() {
            let ring = self.options.ring.get();
            let config = RingConfig {
                buffers: ring.buffers.clamp(1, 32768).next_power_of_two(),
                buffer_size: ring.buffer_size.max(1),
                wants: RecvWants {
                    gro: self.options.gro.get(),
                    destination: self.options.receive_destination.get(),
                    traffic_class: self.options.receive_traffic_class.get(),
                    timestamp: self.options.receive_timestamps.get(),
                },
            };
            match Receiver::new(fd, config) {
                Ok(mut new) => {
                    if let Some(rule) = self.forwarding.get() {
                        new.set_forwarding(fd, Some(rule), &self.posts);
                    }
                    *receiver = Some(new);
                }
                Err(err) => {
                    // A socket that left this handle has no ring to set up: say receive.
                    let context = match fd.is_detached() {
                        true => "receive",
                        false => "set up the receive ring",
                    };
                    return Poll::Ready(Err(Error::io(context, err)));
                }
            }
        }
        let receiver = receiver.as_mut().expect("created above");
        receiver
            .poll_recv(fd, cx, out, max)
            .map_err(|err| Error::io("receive", err))
    }

    /// The receive ring's counters, with the kernel's drop count for this socket.
    pub fn receive_stats(&self) -> ReceiveStats {
        let mut stats = ReceiveStats::default();
        if let Some(receiver) = self.receiver.borrow().as_ref() {
            let counters = receiver.counters();
            stats.datagrams = counters.datagrams;
            stats.truncated = counters.truncated;
            stats.ring_empty = counters.ring_empty;
            stats.receive_restarts = counters.receive_restarts;
            stats.deliveries = counters.deliveries;
            stats.gro_splits = counters.gro_splits;
            stats.control_truncated = counters.control_truncated;
            stats.bursts_drained = counters.bursts_drained;
            stats.forwarded = counters.forwarded + self.forwarded.get();
            stats.buffers = receiver.pool().layout().buffers as usize;
            stats.buffers_lent = receiver.pool().lent();
            stats.buffers_free = receiver.pool().available();
            stats.buffers_forwarding = receiver.pool().loaned_buffers();
        }
        if let Some(fd) = self.fd.get() {
            stats.dropped = ops_datagram::socket_drops(fd).unwrap_or(0);
        }
        stats
    }

    /// Joins the multicast group `group` on the default interface (IP_ADD_MEMBERSHIP /
    /// IPV6_ADD_MEMBERSHIP). A socket receives the groups it joined only, not those other
    /// sockets of the host joined on its port (IP_MULTICAST_ALL is off), and a group it
    /// left stops coming though another socket still holds it.
    pub fn join_multicast_group(&self, group: IpAddr) -> Result<()> {
        self.check_multicast_group(group, "join")?;
        let fd = self.fd()?;
        let sock = fd.sock();
        match group {
            IpAddr::V4(v4) => sock.join_multicast_v4(&v4, &Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(v6) => sock.join_multicast_v6(&v6, 0),
        }
        .map_err(|err| {
            let already = err.raw_os_error() == Some(libc::EADDRINUSE);
            let why = if already {
                ": this socket is in it already"
            } else {
                ""
            };
            Error::io(format!("join multicast group {group}{why}"), err)
        })
    }

    /// Leaves a multicast group joined with [`join_multicast_group`](Self::join_multicast_group).
    pub fn leave_multicast_group(&self, group: IpAddr) -> Result<()> {
        self.check_multicast_group(group, "leave")?;
        let fd = self.fd()?;
        let sock = fd.sock();
        match group {
            IpAddr::V4(v4) => sock.leave_multicast_v4(&v4, &Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(v6) => sock.leave_multicast_v6(&v6, 0),
        }
        .map_err(|err| {
            let never = err.raw_os_error() == Some(libc::EADDRNOTAVAIL);
            let why = if never {
                ": this socket did not join it"
            } else {
                ""
            };
            Error::io(format!("leave multicast group {group}{why}"), err)
        })
    }

    /// Refuses what the kernel would refuse with a misleading errno: an address that is
    /// no multicast group (EINVAL, "not supported"), an IPv6 group on an IPv4 socket
    /// (ENOPROTOOPT, "protocol not available").
    fn check_multicast_group(&self, group: IpAddr, verb: &str) -> Result<()> {
        if !group.is_multicast() {
            return Err(Error::invalid_input(format!(
                "{verb} multicast group {group}: not a multicast address (224.0.0.0/4, ff00::/8)"
            )));
        }
        if group.is_ipv6() && self.fd.get().is_some() && !self.ipv6.get() {
            return Err(Error::io(
                format!("{verb} multicast group {group}: an IPv6 group on an IPv4 socket"),
                std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
            ));
        }
        Ok(())
    }

    /// The local address, with the real port when bound to port 0.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        sock_addr(self.fd()?.sock().local_addr(), "local address").map(canonical)
    }

    /// The connected remote end.
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        sock_addr(self.fd()?.sock().peer_addr(), "peer address").map(canonical)
    }

    /// The socket's options (DatagramSocket.Control).
    pub fn control(&self) -> DatagramSocketControl<'_> {
        self.control_for(None)
    }

    fn control_for<'a>(&'a self, fd: Option<&'a SharedFd>) -> DatagramSocketControl<'a> {
        DatagramSocketControl {
            options: &self.options,
            socket: self,
            installing: fd,
        }
    }
}

impl Drop for DatagramSocket {
    fn drop(&mut self) {
        // The receive ring's multishot receive holds the socket open. On io_uring that
        // lasts until the loop reaps the receive's last completion, a turn or more
        // later: meanwhile the address stays taken (a new socket cannot bind it) and
        // the kernel queues datagrams nobody reads. Cancelled and reaped while the ring
        // still owns it (a receive first dropped is cancelled on its own and may not
        // have ended when a second cancel finds nothing to wait for), it ends now, and
        // the socket closes with its last handle, as on epoll.
        if let Some(fd) = self.fd.get() {
            fd.cancel_in_flight_if_last();
        }
        self.receiver.get_mut().take();
    }
}

impl Default for DatagramSocket {
    fn default() -> Self {
        DatagramSocket::new()
    }
}

impl fmt::Debug for DatagramSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramSocket")
            .field("local", &self.local_addr().ok())
            .field("peer", &self.peer_addr().ok())
            .finish()
    }
}

/// A received datagram (the MessageReceived event's arguments): its bytes, lent from the
/// socket's receive ring, and who sent it. The ring buffer goes back when this is
/// dropped; copy the bytes out (`to_vec`) to keep them longer without holding the ring.
pub struct Datagram {
    inner: RecvDatagram,
}

impl Datagram {
    /// The payload (the first bytes only, if [`is_truncated`](Self::is_truncated)).
    pub fn data(&self) -> &[u8] {
        &self.inner.buf
    }

    /// The sender's address (RemoteAddress and RemotePort). IPv4 senders on a
    /// dual-stack socket are shown as IPv4.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner
            .addr
            .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
    }

    /// The sender's address as a [`HostName`].
    pub fn remote_host(&self) -> HostName {
        HostName::from(self.remote_addr().ip())
    }

    /// True when the datagram was longer than the ring's `buffer_size` (only with a ring
    /// made smaller than the default): [`data`](Self::data) holds only its first bytes
    /// and [`original_len`](Self::original_len) says how many it had.
    pub fn is_truncated(&self) -> bool {
        self.inner.truncated
    }

    /// The datagram's real length.
    pub fn original_len(&self) -> usize {
        self.inner.original_len as usize
    }

    /// The address the datagram was sent to, one of this host's (IPv4 shown as IPv4 on a
    /// dual-stack socket), when the socket reports it
    /// ([`set_receive_destination`](DatagramSocketControl::set_receive_destination)).
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.inner.meta.destination
    }

    /// The local address a reply to it leaves from (see [`SendOptions::reply_to`]).
    pub(crate) fn reply_source(&self) -> Option<IpAddr> {
        self.inner.meta.reply_source
    }

    /// The index of the interface the datagram came in on, when the socket reports the
    /// destination ([`set_receive_destination`](DatagramSocketControl::set_receive_destination)).
    pub fn interface_index(&self) -> Option<u32> {
        (self.inner.meta.interface != 0).then_some(self.inner.meta.interface)
    }

    /// The datagram's traffic class (DSCP and ECN), when the socket reports it
    /// ([`set_receive_traffic_class`](DatagramSocketControl::set_receive_traffic_class)).
    pub fn traffic_class(&self) -> Option<TrafficClass> {
        self.inner.meta.tos.map(TrafficClass::from_byte)
    }

    /// When the kernel received the datagram (the system clock), when the socket reports
    /// it ([`set_receive_timestamps`](DatagramSocketControl::set_receive_timestamps)).
    pub fn timestamp(&self) -> Option<SystemTime> {
        let ns = self.inner.meta.timestamp_ns;
        (ns != 0).then(|| UNIX_EPOCH + Duration::from_nanos(ns))
    }

    /// The segment size of the GRO super-datagram this datagram was cut from (with
    /// [`set_gro`](DatagramSocketControl::set_gro)); `None` when it came alone.
    pub fn gro_segment_size(&self) -> Option<usize> {
        let segment = self.inner.meta.gro_segment as usize;
        (segment != 0).then_some(segment)
    }

    /// The payload, to send on (to another address, on this socket or another) without
    /// a copy: the send reads it in the receive ring, whose buffer comes back once the
    /// send is done. Copied instead when forwarded datagrams hold a quarter of the ring
    /// already (see [`Forward`]).
    ///
    /// ```
    /// # use ringsock::DatagramSocket;
    /// # async fn relay(inside: &DatagramSocket, outside: &DatagramSocket, peer: std::net::SocketAddr) -> ringsock::Result<()> {
    /// let datagram = inside.recv().await?;
    /// outside.send_to_addr(datagram.into_forward(), peer).await.0?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_forward(self) -> Forward {
        Forward::from_payload(self.inner.buf)
    }

    /// The payload as UTF-8 text (DataReader.ReadString).
    pub fn text(&self) -> Result<&str> {
        std::str::from_utf8(self.data())
            .map_err(|err| Error::invalid_input(format!("datagram is not valid UTF-8: {err}")))
    }
}

impl From<RecvDatagram> for Datagram {
    fn from(inner: RecvDatagram) -> Datagram {
        Datagram { inner }
    }
}

impl Deref for Datagram {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.data()
    }
}

impl AsRef<[u8]> for Datagram {
    fn as_ref(&self) -> &[u8] {
        self.data()
    }
}

impl fmt::Debug for Datagram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datagram")
            .field("from", &self.remote_addr())
            .field("len", &self.data().len())
            .field("truncated", &self.is_truncated())
            .finish()
    }
}

type RecvFuture<'a> = Pin<Box<dyn std::future::Future<Output = Result<Vec<Datagram>>> + 'a>>;

/// The stream of received datagrams from [`DatagramSocket::messages`]. It takes every
/// ready datagram at once from the ring and hands them out one by one.
pub struct Messages<'a> {
    socket: &'a DatagramSocket,
    ready: VecDeque<Datagram>,
    pending: Option<RecvFuture<'a>>,
}

/// Datagrams a `Messages` stream takes from the ring at a time.
const STREAM_BATCH: usize = 64;

impl Stream for Messages<'_> {
    type Item = Result<Datagram>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(datagram) = self.ready.pop_front() {
            return Poll::Ready(Some(Ok(datagram)));
        }
        let socket = self.socket;
        let pending = self.pending.get_or_insert_with(|| {
            Box::pin(async move {
                let mut batch = Vec::with_capacity(STREAM_BATCH);
                socket.recv_batch(&mut batch, STREAM_BATCH).await?;
                Ok(batch)
            })
        });
        match pending.as_mut().poll(cx) {
            Poll::Ready(result) => {
                self.pending = None;
                match result {
                    Ok(batch) => {
                        self.ready.extend(batch);
                        match self.ready.pop_front() {
                            Some(datagram) => Poll::Ready(Some(Ok(datagram))),
                            None => {
                                cx.waker().wake_by_ref();
                                Poll::Pending
                            }
                        }
                    }
                    Err(err) => Poll::Ready(Some(Err(err))),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Messages<'_> {
    /// Datagrams taken from the ring and not handed out go back to the socket, ahead of
    /// what it holds: `socket.messages().next()` takes a whole batch for one datagram,
    /// and the rest would otherwise be lost with the stream.
    fn drop(&mut self) {
        let mut carried = self.socket.carried.borrow_mut();
        for datagram in self.ready.drain(..).rev() {
            carried.push_front(datagram.inner);
        }
    }
}

impl Messages<'_> {
    /// The next datagram; `messages().next()` without a stream-extension crate.
    pub async fn next(&mut self) -> Result<Datagram> {
        poll_fn(|cx| Pin::new(&mut *self).poll_next(cx))
            .await
            .unwrap_or_else(|| Err(Error::invalid_input("the message stream ended")))
    }
}

/// The options of one datagram socket, like DatagramSocket.Control
/// (DatagramSocketControl). Set them before binding; on a live socket a setter applies
/// at once.
///
/// A control reads the socket's state when a setter runs, not when the control was
/// taken: one taken before `bind` applies its options to the bound socket, and one taken
/// before the first receive refuses what must be set before it.
pub struct DatagramSocketControl<'a> {
    options: &'a DatagramOptions,
    socket: &'a DatagramSocket,
    /// The descriptor being installed: its options are applied before the socket holds it.
    installing: Option<&'a SharedFd>,
}

impl<'a> DatagramSocketControl<'a> {
    /// The socket's descriptor now (or the one being installed).
    fn fd(&self) -> Option<&'a SharedFd> {
        self.installing.or_else(|| self.socket.fd.get())
    }

    fn ipv6(&self) -> bool {
        self.socket.ipv6.get()
    }

    /// The receive ring is set up (by the first receive).
    fn receiving(&self) -> bool {
        self.socket.receiver.borrow().is_some()
    }

    fn apply_all(&self) -> Result<()> {
        if let Some(bytes) = self.options.receive_buffer_size.get() {
            self.set_receive_buffer_size(bytes)?;
        }
        if let Some(bytes) = self.options.send_buffer_size.get() {
            self.set_send_buffer_size(bytes)?;
        }
        if let Some(hops) = self.options.hop_limit.get() {
            self.set_hop_limit(hops)?;
        }
        if self.options.broadcast.get() {
            self.set_broadcast(true)?;
        }
        if self.options.dont_fragment.get() {
            self.set_dont_fragment(true)?;
        }
        if let Some(on) = self.options.multicast_loop.get() {
            self.set_multicast_loop(on)?;
        }
        if let Some(hops) = self.options.multicast_hop_limit.get() {
            self.set_multicast_hop_limit(hops)?;
        }
        if let Some(class) = self.options.traffic_class.get() {
            self.apply_traffic_class(class)?;
        }
        if self.options.gro.get() {
            self.apply_gro(true)?;
        }
        if self.options.receive_destination.get() {
            self.apply_receive_destination(true)?;
        }
        if self.options.receive_traffic_class.get() {
            self.apply_receive_traffic_class(true)?;
        }
        if self.options.receive_timestamps.get() {
            self.apply_receive_timestamps(true)?;
        }
        if self.options.kernel_pacing.get() {
            self.set_kernel_pacing(true)?;
        }
        Ok(())
    }

    /// Lets several sockets, in this and other processes, bind the same address and
    /// port (DatagramSocketControl.MulticastOnly): SO_REUSEADDR and SO_REUSEPORT. Every
    /// socket sharing the port must set it, before binding. Multicast and broadcast
    /// datagrams reach each of them; unicast ones are spread over them by the kernel.
    pub fn set_multicast_only(&self, on: bool) -> Result<()> {
        if self.fd().is_some() {
            return Err(Error::invalid_input(
                "multicast_only (port sharing) must be set before the socket is bound",
            ));
        }
        self.options.multicast_only.set(on);
        Ok(())
    }

    /// Whether port sharing is requested.
    pub fn multicast_only(&self) -> bool {
        self.options.multicast_only.get()
    }

    /// Requests a receive buffer of `bytes` (SO_RCVBUF, InboundBufferSizeInBytes; the
    /// kernel doubles it and caps it at net.core.rmem_max).
    pub fn set_receive_buffer_size(&self, bytes: usize) -> Result<()> {
        let wanted = &self.options.receive_buffer_size;
        set_buffer_size(wanted, self.fd(), SocketBuffer::Receive, bytes)
    }

    /// Requests a send buffer of `bytes` (SO_SNDBUF).
    pub fn set_send_buffer_size(&self, bytes: usize) -> Result<()> {
        let wanted = &self.options.send_buffer_size;
        set_buffer_size(wanted, self.fd(), SocketBuffer::Send, bytes)
    }

    /// The kernel's receive buffer size of a live socket.
    pub fn receive_buffer_size(&self) -> Result<usize> {
        buffer_size(self.live()?, SocketBuffer::Receive)
    }

    /// The kernel's send buffer size of a live socket.
    pub fn send_buffer_size(&self) -> Result<usize> {
        buffer_size(self.live()?, SocketBuffer::Send)
    }

    /// Hop limit of unicast datagrams (OutboundUnicastHopLimit): IP_TTL, or
    /// IPV6_UNICAST_HOPS on an IPv6 socket, and both on a dual-stack one (1..=255).
    pub fn set_hop_limit(&self, hops: u32) -> Result<()> {
        check_hops(hops)?;
        self.options.hop_limit.set(Some(hops));
        let Some(fd) = self.fd() else { return Ok(()) };
        let sock = fd.sock();
        if self.ipv6() {
            sock.set_unicast_hops_v6(hops)
                .map_err(|e| Error::io("set IPV6_UNICAST_HOPS", e))?;
            // A dual-stack socket sends IPv4 too, with IP_TTL (refused on a v6-only one).
            let _ = sock.set_ttl(hops);
            Ok(())
        } else {
            sock.set_ttl(hops).map_err(|e| Error::io("set IP_TTL", e))
        }
    }

    /// The traffic class, DSCP and ECN, of every datagram the socket sends that does not
    /// carry its own ([`SendOptions::with_traffic_class`]): IP_TOS, or IPV6_TCLASS on an
    /// IPv6 socket, and both on a dual-stack one. It marks the sends the socket makes by
    /// itself too — its forwards ([`DatagramSocket::forward_received`]) and posts — so a
    /// media relay marks what it forwards as audio (DSCP 46, RFC 8837) this way. `None`
    /// goes back to the kernel's default, 0.
    pub fn set_traffic_class(&self, class: Option<TrafficClass>) -> Result<()> {
        self.apply_traffic_class(class.unwrap_or(TrafficClass::from_byte(0)))?;
        self.options.traffic_class.set(class);
        Ok(())
    }

    /// The traffic class set with [`set_traffic_class`](Self::set_traffic_class).
    pub fn traffic_class(&self) -> Option<TrafficClass> {
        self.options.traffic_class.get()
    }

    fn apply_traffic_class(&self, class: TrafficClass) -> Result<()> {
        let value = libc::c_int::from(class.to_byte());
        self.set_on_both_levels(
            (libc::IP_TOS, "IP_TOS"),
            (libc::IPV6_TCLASS, "IPV6_TCLASS"),
            value,
        )
    }

    /// Sets option `v4` of IPPROTO_IP and, on an IPv6 socket, `v6` of IPPROTO_IPV6 to
    /// `value` (a live socket only: `apply_all` sets it on one made later). A
    /// dual-stack socket sends and receives IPv4 by the IPv4 option; an IPv6-only
    /// socket may refuse that one, which it never needs, so only the IPv6 option's
    /// failure counts there.
    fn set_on_both_levels(
        &self,
        (v4, v4_name): (libc::c_int, &str),
        (v6, v6_name): (libc::c_int, &str),
        value: libc::c_int,
    ) -> Result<()> {
        let Some(fd) = self.fd() else { return Ok(()) };
        let ip = ops_datagram::set_int_option(fd, libc::IPPROTO_IP, v4, value);
        if self.ipv6() {
            ops_datagram::set_int_option(fd, libc::IPPROTO_IPV6, v6, value)
                .map_err(|e| Error::io(format!("set {v6_name}"), e))
        } else {
            ip.map_err(|e| Error::io(format!("set {v4_name}"), e))
        }
    }

    /// The unicast hop limit of a live socket.
    pub fn hop_limit(&self) -> Result<u32> {
        let sock = self.live()?.sock();
        if self.ipv6() {
            sock.unicast_hops_v6()
                .map_err(|e| Error::io("get IPV6_UNICAST_HOPS", e))
        } else {
            sock.ttl().map_err(|e| Error::io("get IP_TTL", e))
        }
    }

    /// Allows sending to broadcast addresses (SO_BROADCAST).
    pub fn set_broadcast(&self, on: bool) -> Result<()> {
        self.options.broadcast.set(on);
        match self.fd() {
            Some(fd) => fd
                .sock()
                .set_broadcast(on)
                .map_err(|e| Error::io("set SO_BROADCAST", e)),
            None => Ok(()),
        }
    }

    /// Sets the don't-fragment bit (DontFragment): path MTU discovery on and no local
    /// fragmentation (IP_MTU_DISCOVER = IP_PMTUDISC_DO, or IPV6_MTU_DISCOVER and
    /// IPV6_DONTFRAG). A datagram larger than the path MTU then fails with
    /// MessageTooLong instead of being fragmented.
    pub fn set_dont_fragment(&self, on: bool) -> Result<()> {
        self.options.dont_fragment.set(on);
        let Some(fd) = self.fd() else { return Ok(()) };
        let set = |level, name, value| {
            ops_datagram::set_int_option(fd, level, name, value)
                .map_err(|e| Error::io("set don't-fragment", e))
        };
        if self.ipv6() {
            let mode = if on {
                libc::IPV6_PMTUDISC_DO
            } else {
                libc::IPV6_PMTUDISC_WANT
            };
            set(libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, mode)?;
            set(libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, on as libc::c_int)?;
            // A dual-stack socket sends IPv4 too.
            let mode = if on {
                libc::IP_PMTUDISC_DO
            } else {
                libc::IP_PMTUDISC_WANT
            };
            let _ = set(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, mode);
            Ok(())
        } else {
            let mode = if on {
                libc::IP_PMTUDISC_DO
            } else {
                libc::IP_PMTUDISC_WANT
            };
            set(libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, mode)
        }
    }

    /// Whether the don't-fragment bit was requested.
    pub fn dont_fragment(&self) -> bool {
        self.options.dont_fragment.get()
    }

    /// Whether multicast datagrams this socket sends loop back to local listeners
    /// (IP_MULTICAST_LOOP / IPV6_MULTICAST_LOOP; on by default).
    pub fn set_multicast_loop(&self, on: bool) -> Result<()> {
        self.options.multicast_loop.set(Some(on));
        let Some(fd) = self.fd() else { return Ok(()) };
        let sock = fd.sock();
        if self.ipv6() {
            sock.set_multicast_loop_v6(on)
                .map_err(|e| Error::io("set IPV6_MULTICAST_LOOP", e))?;
            let _ = sock.set_multicast_loop_v4(on);
            Ok(())
        } else {
            sock.set_multicast_loop_v4(on)
                .map_err(|e| Error::io("set IP_MULTICAST_LOOP", e))
        }
    }

    /// Hop limit of multicast datagrams this socket sends (IP_MULTICAST_TTL /
    /// IPV6_MULTICAST_HOPS; default 1: the local network only).
    pub fn set_multicast_hop_limit(&self, hops: u32) -> Result<()> {
        if hops > 255 {
            return Err(Error::invalid_input(format!(
                "multicast hop limit {hops} is out of range (0..=255)"
            )));
        }
        self.options.multicast_hop_limit.set(Some(hops));
        let Some(fd) = self.fd() else { return Ok(()) };
        let sock = fd.sock();
        if self.ipv6() {
            sock.set_multicast_hops_v6(hops)
                .map_err(|e| Error::io("set IPV6_MULTICAST_HOPS", e))?;
            let _ = sock.set_multicast_ttl_v4(hops);
            Ok(())
        } else {
            sock.set_multicast_ttl_v4(hops)
                .map_err(|e| Error::io("set IP_MULTICAST_TTL", e))
        }
    }

    /// The receive ring's shape; set before the first receive.
    pub fn set_receive_ring(&self, ring: ReceiveRing) -> Result<()> {
        if self.receiving() {
            return Err(Error::invalid_input(
                "the receive ring is set up by the first receive: configure it before",
            ));
        }
        if ring.buffers == 0
            || ring.buffers > 32768
            || ring.buffer_size == 0
            || ring.buffer_size > ReceiveRing::WHOLE
        {
            return Err(Error::invalid_input(format!(
                "receive ring of {} buffers of {} bytes: 1..=32768 buffers of 1..=65536 bytes",
                ring.buffers, ring.buffer_size
            )));
        }
        if self.options.gro.get() && ring.buffer_size < 65535 {
            return Err(Error::invalid_input(
                "with GRO on, the ring's buffer_size must be at least 65535 bytes (the default)",
            ));
        }
        self.options.ring.set(ring);
        Ok(())
    }

    /// The receive ring's shape.
    pub fn receive_ring(&self) -> ReceiveRing {
        self.options.ring.get()
    }

    /// Receives UDP GRO super-datagrams (UDP_GRO, Linux 5.0) and takes them apart into
    /// their datagrams: one receive for many datagrams from a GSO sender. Needs a ring
    /// whose `buffer_size` is at least 65535 bytes, as the default's is; set before the
    /// first receive.
    pub fn set_gro(&self, on: bool) -> Result<()> {
        if self.receiving() {
            return Err(Error::invalid_input("set GRO before the first receive"));
        }
        if on && self.options.ring.get().buffer_size < 65535 {
            return Err(Error::invalid_input(
                "GRO needs a receive ring whose buffer_size is at least 65535 bytes (the default)",
            ));
        }
        self.options.gro.set(on);
        self.apply_gro(on)
    }

    /// Whether the kernel may merge received datagrams (UDP_GRO), which the socket
    /// splits again.
    pub fn gro(&self) -> bool {
        self.options.gro.get()
    }

    fn apply_gro(&self, on: bool) -> Result<()> {
        match self.fd() {
            Some(fd) => ops_datagram::set_int_option(fd, libc::SOL_UDP, UDP_GRO, on as libc::c_int)
                .map_err(|e| Error::io("set UDP_GRO", e)),
            None => Ok(()),
        }
    }

    /// Reports on every received datagram the address it was sent to and the
    /// interface it came in on ([`Datagram::local_ip`], [`Datagram::interface_index`];
    /// IP_PKTINFO, and on an IPv6 socket IPV6_RECVPKTINFO, which covers IPv4 on a
    /// dual-stack socket too). A server bound to a wildcard address answers from that
    /// address, or from its interface's for a broadcast ([`SendOptions::reply_to`]).
    /// Costs 72 bytes of control room per datagram; set before the first receive.
    pub fn set_receive_destination(&self, on: bool) -> Result<()> {
        self.before_receiving("set_receive_destination")?;
        self.options.receive_destination.set(on);
        self.apply_receive_destination(on)
    }

    /// Whether received datagrams report their destination.
    pub fn receive_destination(&self) -> bool {
        self.options.receive_destination.get()
    }

    /// Reports on every received datagram its traffic class, DSCP and ECN
    /// ([`Datagram::traffic_class`]; IP_RECVTOS, and IPV6_RECVTCLASS on an IPv6 socket).
    /// Costs 24 bytes of control data per datagram; set before the first receive.
    pub fn set_receive_traffic_class(&self, on: bool) -> Result<()> {
        self.before_receiving("set_receive_traffic_class")?;
        self.options.receive_traffic_class.set(on);
        self.apply_receive_traffic_class(on)
    }

    /// Whether received datagrams report their traffic class.
    pub fn receive_traffic_class(&self) -> bool {
        self.options.receive_traffic_class.get()
    }

    /// Reports on every received datagram when the kernel received it
    /// ([`Datagram::timestamp`]; SO_TIMESTAMPNS, the system clock). Costs 32 bytes of
    /// control data per datagram; set before the first receive.
    pub fn set_receive_timestamps(&self, on: bool) -> Result<()> {
        self.before_receiving("set_receive_timestamps")?;
        self.options.receive_timestamps.set(on);
        self.apply_receive_timestamps(on)
    }

    /// Whether received datagrams report their receive time.
    pub fn receive_timestamps(&self) -> bool {
        self.options.receive_timestamps.get()
    }

    /// The receive ring has room for control data only as set up by the first receive.
    fn before_receiving(&self, what: &str) -> Result<()> {
        if self.receiving() {
            return Err(Error::invalid_input(format!(
                "{what}: receive metadata is set up by the first receive: set it before"
            )));
        }
        Ok(())
    }

    fn apply_receive_destination(&self, on: bool) -> Result<()> {
        let Some(fd) = self.fd() else { return Ok(()) };
        let (level, name, what) = if self.ipv6() {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVPKTINFO,
                "set IPV6_RECVPKTINFO",
            )
        } else {
            (libc::IPPROTO_IP, libc::IP_PKTINFO, "set IP_PKTINFO")
        };
        if self.ipv6() {
            // IPv4 datagrams on a dual-stack socket then say where a reply to a broadcast
            // leaves from; an IPv6-only socket may refuse the option, which it never needs.
            let _ = ops_datagram::set_int_option(
                fd,
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                on as libc::c_int,
            );
        }
        ops_datagram::set_int_option(fd, level, name, on as libc::c_int)
            .map_err(|e| Error::io(what, e))
    }

    fn apply_receive_traffic_class(&self, on: bool) -> Result<()> {
        self.set_on_both_levels(
            (libc::IP_RECVTOS, "IP_RECVTOS"),
            (libc::IPV6_RECVTCLASS, "IPV6_RECVTCLASS"),
            on as libc::c_int,
        )
    }

    fn apply_receive_timestamps(&self, on: bool) -> Result<()> {
        let Some(fd) = self.fd() else { return Ok(()) };
        ops_datagram::set_int_option(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            on as libc::c_int,
        )
        .map_err(|e| Error::io("set SO_TIMESTAMPNS", e))
    }

    /// Lets the kernel release datagrams at their transmit time
    /// ([`SendOptions::transmit_at`]): SO_TXTIME on the socket, an SCM_TXTIME control
    /// message on each datagram that has a time, and no wait in the runtime. Only an fq
    /// or etf qdisc on the outgoing interface honours the time; any other qdisc sends at
    /// once, silently. Off (the default), the runtime's timers hold each datagram until
    /// its time.
    pub fn set_kernel_pacing(&self, on: bool) -> Result<()> {
        if on {
            if let Some(fd) = self.fd() {
                ops_datagram::enable_txtime(fd).map_err(|e| Error::io("set SO_TXTIME", e))?;
            }
        }
        self.options.kernel_pacing.set(on);
        Ok(())
    }

    /// Whether the kernel paces datagrams by their transmit time.
    pub fn kernel_pacing(&self) -> bool {
        self.options.kernel_pacing.get()
    }

    /// Whether batched sends may use UDP GSO (UDP_SEGMENT, Linux 4.18) for runs of
    /// equal-sized datagrams (default on). Each datagram still arrives as its own
    /// datagram; ringsock turns GSO off by itself when the kernel or device refuses it.
    pub fn set_segmentation_offload(&self, on: bool) {
        self.options.gso.set(on);
    }

    /// Whether batched sends may use UDP GSO.
    pub fn segmentation_offload(&self) -> bool {
        self.options.gso.get()
    }

    fn live(&self) -> Result<&SharedFd> {
        self.fd()
            .ok_or_else(|| Error::invalid_input("the socket is not bound or connected"))
    }
}

/// A transmit time is per datagram: an output stream's options carry none.
fn no_stream_pacing(options: &SendOptions) -> Result<()> {
    if options.transmit_at.is_some() {
        return Err(Error::invalid_input(
            "a transmit time is per datagram: use send_to_addr_with or send_many",
        ));
    }
    Ok(())
}

/// What a failed send says it was: with the source address it asked for, which the
/// kernel's error for a source this host does not own (ENETUNREACH, EINVAL) never names.
fn send_context(to: Option<SocketAddr>, source: Option<IpAddr>) -> String {
    match (to, source) {
        (Some(to), Some(source)) => format!("send from {source} to {to}"),
        (Some(to), None) => format!("send to {to}"),
        (None, Some(source)) => format!("send from {source}"),
        (None, None) => "send".to_string(),
    }
}

/// A datagram needs a destination port: port 0 is InvalidArgument, not the kernel's
/// EINVAL (which ringsock reports as UnsupportedOperation).
fn check_destination(addr: SocketAddr) -> Result<()> {
    if addr.port() == 0 {
        return Err(Error::invalid_input(format!(
            "send to {addr}: port 0 is no destination"
        )));
    }
    Ok(())
}

fn check_hops(hops: u32) -> Result<()> {
    if hops == 0 || hops > 255 {
        return Err(Error::invalid_input(format!(
            "hop limit {hops} is out of range (1..=255)"
        )));
    }
    Ok(())
}

/// Sockets in and out: std, raw descriptors, and other runtimes.
impl DatagramSocket {
    /// Takes a std UDP socket (made non-blocking), bound or connected; it belongs to the
    /// runtime running on this thread, or to the first that uses it.
    pub fn from_std(socket: std::net::UdpSocket) -> Result<DatagramSocket> {
        Detached::from_fd(OwnedFd::from(socket))?.into_datagram()
    }

    /// Takes the socket off this runtime, for another thread's runtime or another
    /// process: its receive in flight is cancelled and reaped, and this handle becomes
    /// spent (its calls fail). Nothing received is lost: datagrams the kernel has queued
    /// on the socket stay there, and those already in this handle's receive ring and not
    /// yet taken come along (copied out of the ring), handed out first by whoever adopts
    /// it.
    pub fn detach(&self) -> Result<Detached> {
        let fd = self.fd()?;
        // A panic of the forwarding rule goes on now, with the socket still here and
        // every datagram in it, as from the receive it would have come out of.
        if let Ok(mut receiver) = self.receiver.try_borrow_mut() {
            if let Some(receiver) = receiver.as_mut() {
                receiver.raise_rule_panic();
            }
        }
        // What the driver reaps while it lets go of the socket is carried along, not
        // forwarded: nothing of this runtime's may send from the socket once it left.
        let rule = self.forwarding.take();
        self.tell_receiver_forwarding(fd, None);
        let owned = match fd.detach() {
            Ok(owned) => owned,
            Err(err) => {
                // The socket stays here, forwarding as before.
                self.forwarding.set(rule);
                self.tell_receiver_forwarding(fd, rule);
                return Err(Error::io("detach", err));
            }
        };
        let mut carried: Vec<Carried> = self
            .carried
            .borrow_mut()
            .drain(..)
            .map(|d| d.carry())
            .collect();
        if let Some(mut receiver) = self.receiver.borrow_mut().take() {
            carried.extend(receiver.take_received().iter().map(RecvDatagram::carry));
        }
        Ok(Detached::new(owned, super::SocketKind::Datagram, Vec::new()).with_datagrams(carried))
    }

    /// Wraps a UDP descriptor detached elsewhere, with its options as they are.
    pub(crate) fn adopt(fd: OwnedFd, carried: Vec<Carried>) -> Result<DatagramSocket> {
        let socket = socket2::Socket::from(fd);
        let ipv6 = socket
            .domain()
            .map_err(|err| Error::io("read the socket family", err))?
            == socket2::Domain::IPV6;
        let adopted = DatagramSocket::new();
        adopted.ipv6.set(ipv6);
        adopted
            .fd
            .set(SharedFd::new(OwnedFd::from(socket)))
            .map_err(|_| Error::invalid_input("the socket is already bound or connected"))?;
        adopted.take_kernel_options();
        adopted
            .carried
            .borrow_mut()
            .extend(carried.into_iter().map(Carried::into_received));
        Ok(adopted)
    }

    /// Takes over the receive options the descriptor already has (set by its last owner,
    /// or by the program before it handed the socket over): the receive ring makes room
    /// for their control data, and GRO's merged datagrams are split again, only when the
    /// socket knows of them.
    fn take_kernel_options(&self) {
        let Ok(fd) = self.fd() else { return };
        let on = |level, name| ops_datagram::option_is_on(fd, level, name);
        let ipv6 = self.ipv6.get();
        let options = &self.options;
        // A kernel that cannot say (getsockopt of UDP_GRO came after the option) may
        // merge: room for the segment size costs little, a merged datagram handed out
        // whole would be wrong data.
        let gro = match crate::driver::sockopt::int_option(fd.raw(), libc::SOL_UDP, UDP_GRO) {
            Ok(value) => value != 0,
            Err(err) => err.raw_os_error() == Some(libc::ENOPROTOOPT),
        };
        options.gro.set(gro);
        options.receive_destination.set(
            on(libc::IPPROTO_IP, libc::IP_PKTINFO)
                || (ipv6 && on(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)),
        );
        options.receive_traffic_class.set(
            on(libc::IPPROTO_IP, libc::IP_RECVTOS)
                || (ipv6 && on(libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS)),
        );
        options
            .receive_timestamps
            .set(on(libc::SOL_SOCKET, libc::SO_TIMESTAMPNS));
    }
}

impl AsRawFd for DatagramSocket {
    /// The descriptor, or -1 while the socket is neither bound nor connected.
    fn as_raw_fd(&self) -> RawFd {
        self.fd.get().map_or(-1, SharedFd::raw)
    }
}

impl AsFd for DatagramSocket {
    /// The descriptor.
    ///
    /// # Panics
    ///
    /// While the socket is neither bound nor connected: it has no descriptor yet.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd
            .get()
            .expect("DatagramSocket::as_fd: the socket is not bound or connected")
            .borrow_fd()
    }
}

/// The largest datagram `to` can be sent: an IPv4 peer (v4-mapped on an IPv6 socket)
/// takes no more than the IPv4 maximum.
fn max_payload_to(to: SocketAddr) -> usize {
    if canonical(to).is_ipv4() {
        MAX_UDP_PAYLOAD_V4
    } else {
        MAX_UDP_PAYLOAD_V6
    }
}
