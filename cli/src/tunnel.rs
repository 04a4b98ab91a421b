//! `ringsock tunnel`: a point-to-point tunnel between a TUN interface and a UDP peer
//! (the library's `ringsock::tunnel`), until SIGINT or SIGTERM.

use std::future::{poll_fn, Future};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::task::Poll;
use std::time::{Duration, Instant};

use clap::Args;
use ringsock::tun::{TunDevice, TunOffloads, TunOptions};
use ringsock::tunnel::{PresharedKey, Tunnel, TunnelConfig, TunnelStats};
use ringsock::Error;
use ringsock_cli::bench::{self, Options};

use super::{runtime, BackendArg, StopSignal};

mod threads;

/// The MTU the TUN gets by default: a 1500-byte path less the tunnel's overhead over
/// IPv6 (80 bytes, as WireGuard reserves), so sealed packets need no fragmenting.
const DEFAULT_MTU: u32 = 1420;

#[derive(Args)]
pub(crate) struct TunnelArgs {
    /// The TUN interface to create, or to attach to if it exists (then it stays when
    /// the tunnel exits, with the MTU and state it had with one thread; one it created
    /// is removed). More than one thread needs one made multi_queue. One that another
    /// process (another tunnel) has open is refused. A template such as vpn%d makes a new interface, the
    /// kernel picking the number; the ready line names it.
    #[arg(long, value_name = "NAME")]
    tun: String,
    /// The UDP address to listen on, e.g. 0.0.0.0:51820 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The peer's UDP address. Without it, the peer is learned from the first data
    /// message that authenticates, and followed when its address changes.
    #[arg(long, value_name = "ADDR:PORT", value_parser = peer_addr)]
    peer: Option<SocketAddr>,
    /// A file holding the pre-shared key: 32 bytes as 64 hexadecimal characters
    /// (e.g. from `openssl rand -hex 32`). Both ends use the same key.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// MTU of the TUN interface (inner packets); sealed packets are 60 bytes larger over
    /// IPv4, 80 over IPv6, and are sent with don't-fragment.
    #[arg(long, default_value_t = DEFAULT_MTU, value_parser = clap::value_parser!(u32).range(576..=65000))]
    mtu: u32,
    /// Run without offloads: no virtio-net header, one plain packet per read and write.
    #[arg(long)]
    no_offload: bool,
    /// Threads, 1 to 64: each runs its own runtime with its own queue of the
    /// (multi-queue) TUN and its own UDP socket on the --listen address (SO_REUSEPORT);
    /// all share one session, so the kernel spreads flows over the threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_THREADS as i64))]
    threads: u32,
    #[command(flatten)]
    backend: BackendArg,
}

/// `--peer`: an address datagrams can be sent to (no port 0, no 0.0.0.0 or ::), else
/// every send would fail and the tunnel would wait for nothing.
fn peer_addr(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("{text:?} is not an ADDR:PORT such as 192.0.2.1:51820"))?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(format!(
            "{addr} cannot be sent to: give the peer's address and port"
        ));
    }
    Ok(addr)
}

/// Most threads: one TUN queue and one socket each; more than cores only costs.
const MAX_THREADS: u32 = 64;

/// Runs the tunnel until SIGINT or SIGTERM; prints `tunnel NAME udp IP:PORT` once it
/// listens and `tunnel stats {...}` (its counters, JSON, summed over its threads) when
/// it stops.
pub(crate) fn tunnel(mut args: TunnelArgs) -> ringsock::Result<()> {
    // An IPv4 host written as IPv6 (::ffff:a.b.c.d) is judged, and reached from an IPv4
    // socket, as the IPv4 host it is.
    if let (Some(peer), true) = (args.peer, args.listen.is_ipv4()) {
        args.peer = Some(SocketAddr::new(peer.ip().to_canonical(), peer.port()));
    }
    if let Some(peer) = args.peer {
        // An IPv4 socket cannot send to an IPv6 peer (an IPv6 one reaches IPv4 peers).
        if peer.is_ipv6() && args.listen.is_ipv4() {
            super::usage_error_in(
                "tunnel",
                format!(
                    "--peer {peer} is IPv6, --listen {} IPv4: listen on an IPv6 address",
                    args.listen
                ),
            );
        }
    }
    if let (Some(peer), std::net::IpAddr::V6(listen)) = (args.peer, args.listen.ip()) {
        // A socket bound to one IPv6 address sends from it alone: no IPv4 peer answers.
        let peer_is_ipv4 = peer.ip().to_canonical().is_ipv4();
        if peer_is_ipv4 && !listen.is_unspecified() && listen.to_ipv4_mapped().is_none() {
            super::usage_error_in(
                "tunnel",
                format!(
                    "--peer {peer} is IPv4, --listen {} an IPv6 address: listen on an IPv4 \
                     address or on [::]",
                    args.listen
                ),
            );
        }
    }
    if let Some(peer) = args.peer {
        if !is_unicast(peer.ip().to_canonical()) {
            super::usage_error_in(
                "tunnel",
                format!("--peer {peer} is not one host's address (broadcast or multicast)"),
            );
        }
        if is_broadcast_of_a_local_network(peer.ip().to_canonical()) {
            super::usage_error_in(
                "tunnel",
                format!(
                    "--peer {peer} is the broadcast address of a network of this host, not \
                     one host's address"
                ),
            );
        }
        if is_this_tunnel(args.listen, peer) {
            super::usage_error_in(
                "tunnel",
                format!(
                    "--peer {peer} is this tunnel's own address (--listen {}): it would only \
                     ever hear itself",
                    args.listen
                ),
            );
        }
        warn_if_larger_than_the_route(args.mtu, args.listen, peer);
    }
    let key = PresharedKey::from_file(&args.key)?;
    note_if_others_can_read(&args.key);
    note_if_a_placeholder(&args.key);
    // A name the kernel refuses is refused here, before it is claimed: two such runs at
    // once would be told the name is another tunnel's rather than what is wrong with it.
    TunDevice::check_name(&args.tun)?;
    let _claim = claim(&args.tun)?;
    refuse_if_in_use(&args.tun)?;
    let stop = StopSignal::install()?;
    let options = TunOptions {
        offloads: !args.no_offload,
        mtu: Some(args.mtu),
        ..TunOptions::default()
    };
    let config = TunnelConfig::new(args.listen, args.peer, key);
    if args.threads == 1 {
        one_thread(&args, options, config, &stop)
    } else {
        threads::run(&args, options, config, &stop)
    }
}

/// Whether `ip` names one host (not broadcast, multicast or unspecified).
fn is_unicast(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            !(v4.is_broadcast() || v4.is_multicast() || v4.is_unspecified())
        }
        std::net::IpAddr::V6(v6) => !(v6.is_multicast() || v6.is_unspecified()),
    }
}

/// Whether `peer` is where this tunnel listens: its port, and an address of this host
/// that `listen` covers (a socket can be bound to it).
fn is_this_tunnel(listen: SocketAddr, peer: SocketAddr) -> bool {
    let (listen_ip, peer_ip) = (listen.ip().to_canonical(), peer.ip().to_canonical());
    if peer.port() != listen.port() {
        return false;
    }
    let covers = match listen.ip() {
        _ if listen_ip == peer_ip => return true,
        std::net::IpAddr::V4(v4) => v4.is_unspecified() && peer_ip.is_ipv4(),
        // [::] takes IPv4 too (dual stack).
        std::net::IpAddr::V6(v6) => v6.is_unspecified(),
    };
    covers && std::net::UdpSocket::bind((peer_ip, 0)).is_ok()
}

/// Whether `ip` is the broadcast address of an IPv4 network of this host's interfaces
/// (255.255.255.255 is refused as no unicast address already).
fn is_broadcast_of_a_local_network(ip: std::net::IpAddr) -> bool {
    let std::net::IpAddr::V4(ip) = ip else {
        return false;
    };
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocated to `list` (on success only), freed
    // below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return false;
    }
    let mut found = false;
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs made, alive until freeifaddrs.
        let ifa = unsafe { &*entry };
        let broadcast = ifa.ifa_flags & libc::IFF_BROADCAST as libc::c_uint != 0;
        if broadcast && !ifa.ifa_ifu.is_null() {
            // SAFETY: with IFF_BROADCAST, ifa_ifu is the broadcast address (a sockaddr
            // the list owns); it is read as sockaddr_in only when its family says so.
            let family = unsafe { (*ifa.ifa_ifu).sa_family };
            if family == libc::AF_INET as libc::sa_family_t {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let addr = unsafe { &*(ifa.ifa_ifu as *const libc::sockaddr_in) };
                found |= std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)) == ip;
            }
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once, no node used after.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// Bytes a sealed packet adds to an inner one: IP and UDP headers, the tunnel's header
/// and tag (as `--mtu` says).
fn sealed_overhead(peer: SocketAddr) -> u32 {
    let overhead = if peer.ip().to_canonical().is_ipv4() {
        ringsock::tunnel::OVERHEAD_V4
    } else {
        ringsock::tunnel::OVERHEAD_V6
    };
    overhead as u32
}

/// Says so on stderr when the route to `peer` takes smaller packets than `--mtu` makes
/// once sealed: they leave with don't-fragment, so every inner packet that large would be
/// dropped, with nothing but a counter to say it.
fn warn_if_larger_than_the_route(mtu: u32, listen: SocketAddr, peer: SocketAddr) {
    let Some(route) = route_mtu(listen, peer) else {
        return;
    };
    let sealed = mtu + sealed_overhead(peer);
    if sealed > route {
        let _ = writeln!(
            std::io::stderr(),
            "warning: --mtu {mtu} makes sealed packets of up to {sealed} bytes, more than the \
             {route} the route to {peer} takes: larger inner packets will be dropped (use \
             --mtu {} or less)",
            route.saturating_sub(sealed_overhead(peer))
        );
    }
}

/// The MTU of the route from `listen`'s address to `peer` (IP_MTU of a UDP socket
/// connected there); None when the kernel does not say.
#[allow(unsafe_code)]
fn route_mtu(listen: SocketAddr, peer: SocketAddr) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let local = SocketAddr::new(listen.ip(), 0);
    let probe = std::net::UdpSocket::bind(local).ok()?;
    probe.connect(peer).ok()?;
    let (level, name) = if peer.is_ipv4() && listen.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (one c_int) into `value`, which
    // lives across the call, and `probe` is an open socket.
    let rc = unsafe {
        libc::getsockopt(
            probe.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(&mut value).cast(),
            &mut len,
        )
    };
    (rc == 0 && value > 0).then_some(value as u32)
}

/// Says so on stderr when the key is all zeros (a placeholder left in place): anyone
/// could guess it. A note, not an error: the tunnel runs.
fn note_if_a_placeholder(path: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let hex = text.trim();
    if !hex.is_empty() && hex.bytes().all(|b| b == b'0') {
        let _ = writeln!(
            std::io::stderr(),
            "note: the key in {} is all zeros, which anyone could guess: make one with \
             `openssl rand -hex 32`",
            path.display()
        );
    }
}

/// Says so on stderr when users other than the key file's owner may read it (as
/// `openssl rand -hex 32 > key` leaves it, under the usual umask): whoever reads the key
/// can read and forge the tunnel's traffic. A note, not an error: the tunnel runs.
fn note_if_others_can_read(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if meta.is_file() && mode & 0o077 != 0 {
        let _ = writeln!(
            std::io::stderr(),
            "note: the key file {} may be read by other users (mode {mode:o}): chmod 600 it",
            path.display()
        );
    }
}

/// Claims the TUN interface `name` for this process, for as long as the value lives:
/// a second `ringsock tunnel` on the same name in the same network namespace, started
/// at the same moment, would pass [`refuse_if_in_use`] too (the first one's carrier
/// shows only once its interface is up) and attach a queue of its own. The claim is
/// an abstract Unix socket: one per network namespace, gone with the process however
/// it ends. Where none can be bound for another reason, the carrier check alone stays.
/// A template (`vpn%d`) claims nothing: the kernel makes a new interface of it.
fn claim(name: &str) -> ringsock::Result<Option<std::os::unix::net::UnixDatagram>> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    if name.contains('%') {
        return Ok(None);
    }
    let Ok(addr) = SocketAddr::from_abstract_name(format!("ringsock tunnel --tun {name}")) else {
        return Ok(None);
    };
    match UnixDatagram::bind_addr(&addr) {
        Ok(socket) => Ok(Some(socket)),
        Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => Err(Error::io(
            format!(
                "open the TUN interface {name:?}: another tunnel of this network namespace \
                 is starting or running on it, and would get part of its packets"
            ),
            std::io::Error::from_raw_os_error(libc::EBUSY),
        )),
        Err(_) => Ok(None),
    }
}

/// How long an interface still in use may take to be let go: a tunnel killed just before
/// (SIGKILL) holds its queue a few milliseconds longer on io_uring.
const IN_USE_WAIT: Duration = Duration::from_millis(250);

/// Fails when another process has a queue of the TUN interface `name` open (its carrier
/// is on, or, while it is down, a process's descriptors name it): a second tunnel would attach a queue of its own, and the kernel would spread
/// the interface's packets over both. A supervisor's restart right after a SIGKILL
/// waits up to [`IN_USE_WAIT`] for the old queue to close.
fn refuse_if_in_use(name: &str) -> ringsock::Result<()> {
    // `name` passed TunDevice::check_name: one plain path component, no / or ..
    // Only a TUN or TAP has tun_flags: any other interface's carrier says nothing of a
    // tunnel, and the open says what it is instead.
    if !std::path::Path::new(&format!("/sys/class/net/{name}/tun_flags")).exists() {
        return Ok(());
    }
    let carrier = format!("/sys/class/net/{name}/carrier");
    // The carrier is on while a queue is open; a down interface has none to read, so
    // the queues open on it are looked for among the processes' descriptors.
    let in_use = || match std::fs::read_to_string(&carrier) {
        Ok(text) => text.trim() == "1",
        Err(_) => queue_open_elsewhere(name),
    };
    let start = Instant::now();
    while in_use() {
        if start.elapsed() >= IN_USE_WAIT {
            return Err(Error::io(
                format!(
                    "open the TUN interface {name:?}: another process (another tunnel?) \
                     has it open, and would get part of its packets"
                ),
                std::io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Whether a process of this network namespace has a queue of TUN interface `name`
/// open: a descriptor of `/dev/net/tun` whose fdinfo names it (`iff:`), in a process
/// one of whose threads is in this namespace (names are per namespace; a thread may
/// have entered one its process's first thread is not in). Processes whose descriptors
/// cannot be read are not counted.
fn queue_open_elsewhere(name: &str) -> bool {
    let Ok(our_netns) = std::fs::read_link("/proc/self/ns/net") else {
        return false;
    };
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return false;
    };
    processes.flatten().any(|process| {
        let is_pid = process
            .file_name()
            .to_str()
            .is_some_and(|pid| pid.bytes().all(|b| b.is_ascii_digit()));
        is_pid && holds_queue_of(&process.path(), name) && in_netns(&process.path(), &our_netns)
    })
}

/// Whether the process at `/proc/PID` has a TUN queue of interface `name` open.
fn holds_queue_of(process: &std::path::Path, name: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(process.join("fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        let is_tun = std::fs::read_link(fd.path())
            .is_ok_and(|target| target == std::path::Path::new("/dev/net/tun"));
        is_tun
            && std::fs::read_to_string(process.join("fdinfo").join(fd.file_name())).is_ok_and(
                |info| {
                    info.lines()
                        .filter_map(|line| line.strip_prefix("iff:"))
                        .any(|iff| iff.trim() == name)
                },
            )
    })
}

/// Whether a thread of the process at `/proc/PID` is in network namespace `netns`.
fn in_netns(process: &std::path::Path, netns: &std::path::Path) -> bool {
    let Ok(tasks) = std::fs::read_dir(process.join("task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|task| std::fs::read_link(task.path().join("ns/net")).is_ok_and(|ns| ns == netns))
}

/// The whole tunnel on this thread's runtime.
fn one_thread(
    args: &TunnelArgs,
    options: TunOptions,
    config: TunnelConfig,
    stop: &StopSignal,
) -> ringsock::Result<()> {
    let runtime = runtime(&args.backend)?;
    runtime.block_on(async {
        let (tun, found) = open_alone(&args.tun, options)?;
        // The interface is set up only once the tunnel has its socket: a port in use
        // leaves an interface that was there as it was.
        let tunnel = Tunnel::new(tun, config)?;
        let result = async {
            set_up(tunnel.device(), options)?;
            announce(tunnel.device(), tunnel.local_addr()?);
            let result = until_stopped(run_telling_send_errors(&tunnel, ""), stop.wait()).await;
            print_stats(&tunnel.stats());
            result
        }
        .await;
        found.restore(tunnel.device());
        result
    })
}

/// Gives the interface the MTU and state `options` ask for.
fn set_up(device: &TunDevice, options: TunOptions) -> ringsock::Result<()> {
    if let Some(mtu) = options.mtu {
        device.set_mtu(mtu)?;
    }
    if options.up {
        device.set_up(true)?;
    }
    Ok(())
}

/// How an interface the tunnel did not create was before it set it up.
struct FoundAs {
    mtu: Option<u32>,
    up: Option<bool>,
}

impl FoundAs {
    /// How `device` is now, if the tunnel did not create it (one it created goes with
    /// it, and needs nothing back).
    fn of(device: &TunDevice) -> FoundAs {
        match device.created() {
            true => FoundAs {
                mtu: None,
                up: None,
            },
            false => FoundAs {
                mtu: device.mtu().ok(),
                up: device.is_up().ok(),
            },
        }
    }

    /// Gives an interface that was there before the tunnel its MTU and state back.
    fn restore(self, device: &TunDevice) {
        if let Some(mtu) = self.mtu {
            let _ = device.set_mtu(mtu);
        }
        if self.up == Some(false) {
            let _ = device.set_up(false);
        }
    }
}

/// The one queue of a one-thread tunnel, its MTU and state untouched (see [`set_up`]):
/// an interface made without multi_queue (as `ip tuntap add` makes one) takes a queue
/// opened the same way, and one thread needs no more. An interface that was there keeps
/// what it was, to be given back at the end.
fn open_alone(name: &str, options: TunOptions) -> ringsock::Result<(TunDevice, FoundAs)> {
    let untouched = TunOptions {
        mtu: None,
        up: false,
        ..options
    };
    let tun = TunDevice::create(name, untouched).or_else(|first| {
        let single = TunOptions {
            multi_queue: false,
            ..untouched
        };
        TunDevice::create(name, single).map_err(|_| first)
    })?;
    let found = FoundAs::of(&tun);
    Ok((tun, found))
}

/// Prints the line a user (or a test) waits for, and the offloads granted.
fn announce(device: &TunDevice, addr: SocketAddr) {
    announce_parts(device.name(), device.offloads(), addr);
}

/// The tunnel's lines go out as they can: a reader that went away (`| head -1` once it
/// has the ready line), or a full disk, must not stop the tunnel, nor fail its exit.
pub(super) fn announce_parts(name: &str, offloads: TunOffloads, addr: SocketAddr) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "tunnel {name} udp {addr}").and_then(|()| stdout.flush());
    let _ = writeln!(
        std::io::stderr(),
        "note: {name} offloads: vnet_hdr={} checksum={} tso={} uso={}",
        offloads.vnet_hdr,
        offloads.checksum,
        offloads.tso,
        offloads.uso
    );
}

pub(super) fn print_stats(stats: &TunnelStats) {
    let fields: Vec<String> = stats
        .fields()
        .iter()
        .map(|(name, value)| format!("\"{name}\":{value}"))
        .collect();
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "tunnel stats {{{}}}", fields.join(",")).and_then(|()| stdout.flush());
}

/// How often a tunnel whose sends fail says so on stderr, at most.
const SEND_ERRORS_EVERY: Duration = Duration::from_secs(5);

/// Runs `tunnel`, and says on stderr, at most every [`SEND_ERRORS_EVERY`], how many
/// sealed packets the kernel refused to send since the last line: a `--mtu` larger than
/// the route takes (packets leave with don't-fragment) or a peer the route refuses drops
/// packets with nothing else to show for it than a counter printed at the end.
/// `whose` names the thread in the line where there are several (each counts its own).
pub(super) async fn run_telling_send_errors(tunnel: &Tunnel, whose: &str) -> ringsock::Result<()> {
    let watch = async {
        let mut told = tunnel.stats().tx_send_errors;
        loop {
            ringsock::runtime::sleep(SEND_ERRORS_EVERY).await;
            let now = tunnel.stats().tx_send_errors;
            if now > told {
                eprintln!(
                    "warning: {} sealed packets{whose} could not be sent in the last {} s \
                     (tx_send_errors): larger than the route to the peer takes (lower \
                     --mtu), or a peer the route refuses",
                    now - told,
                    SEND_ERRORS_EVERY.as_secs()
                );
            }
            told = now;
        }
    };
    let mut run = std::pin::pin!(tunnel.run());
    let mut watch = std::pin::pin!(watch);
    poll_fn(|cx| {
        // The watch first: its due timer takes a unit of the task's budget, which the
        // very traffic it reports on could spend in every poll.
        let _ = watch.as_mut().poll(cx);
        run.as_mut().poll(cx)
    })
    .await
}

/// The tunnel's result if it ends by itself; `Ok` once the stop signal comes.
pub(super) async fn until_stopped(
    run: impl Future<Output = ringsock::Result<()>>,
    stop: impl Future<Output = ()>,
) -> ringsock::Result<()> {
    let mut run = std::pin::pin!(run);
    let mut stop = std::pin::pin!(stop);
    poll_fn(|cx| {
        if let Poll::Ready(result) = run.as_mut().poll(cx) {
            return Poll::Ready(result);
        }
        stop.as_mut().poll(cx).map(Ok)
    })
    .await
}

#[derive(Args)]
pub(crate) struct BaselineArgs {
    #[arg(long)]
    tun: String,
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    peer: SocketAddr,
    #[arg(long)]
    key: PathBuf,
}

/// The benchmark's one-system-call-per-packet tunnel.
pub(crate) fn baseline(args: BaselineArgs) -> ringsock::Result<()> {
    ringsock_cli::bench::tunnel_baseline::run(&args.tun, args.listen, args.peer, &args.key)
}

/// `ringsock bench --workload tunnel` without --json: every variant `repeat` times
/// (at least 3), alternating, then the table of medians.
pub(crate) fn bench_table(options: Options, repeat: u64, raw: bool) -> ExitCode {
    let repeat = repeat.max(3);
    let mut print_raw = |report: &bench::Report| {
        if raw {
            println!("{}", report.to_json_line());
        }
    };
    match bench::tunnel::table(&options, repeat, &mut print_raw) {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {}: {err}", err.status());
            ExitCode::FAILURE
        }
    }
}
