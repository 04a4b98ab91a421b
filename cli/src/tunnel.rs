//! `ringsock tunnel`: a point-to-point tunnel between a TUN interface and a UDP peer
//! (the library's `ringsock::tunnel`), until SIGINT or SIGTERM.

use std::future::{poll_fn, Future};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Poll, Waker};

use clap::Args;
use ringsock::runtime::{Builder, Pool, RemoteJoinHandle};
use ringsock::tun::{TunDevice, TunOffloads, TunOptions};
use ringsock::tunnel::{PresharedKey, Tunnel, TunnelConfig, TunnelGroup, TunnelStats};
use ringsock_cli::bench::{self, Options};

use super::{runtime, BackendArg, StopSignal};

/// The MTU the TUN gets by default: a 1500-byte path less the tunnel's overhead over
/// IPv6 (80 bytes, as WireGuard reserves), so sealed packets need no fragmenting.
const DEFAULT_MTU: u32 = 1420;

#[derive(Args)]
pub(crate) struct TunnelArgs {
    /// The TUN interface to create, or to attach to if it exists (then it stays when
    /// the tunnel exits; one it created is removed).
    #[arg(long, value_name = "NAME")]
    tun: String,
    /// The UDP address to listen on, e.g. 0.0.0.0:51820 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// The peer's UDP address. Without it, the peer is learned from the first data
    /// message that authenticates, and followed when its address changes.
    #[arg(long, value_name = "ADDR:PORT")]
    peer: Option<SocketAddr>,
    /// A file holding the pre-shared key: 32 bytes as 64 hexadecimal characters
    /// (e.g. from `openssl rand -hex 32`). Both ends use the same key.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// MTU of the TUN interface (inner packets); sealed packets are 56 bytes larger over
    /// IPv4, 76 over IPv6, and are sent with don't-fragment.
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

/// Most threads: one TUN queue and one socket each; more than cores only costs.
const MAX_THREADS: u32 = 64;

/// Runs the tunnel until SIGINT or SIGTERM; prints `tunnel NAME udp IP:PORT` once it
/// listens and `tunnel stats {...}` (its counters, JSON, summed over its threads) when
/// it stops.
pub(crate) fn tunnel(args: TunnelArgs) -> ringsock::Result<()> {
    let key = PresharedKey::from_file(&args.key)?;
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
        on_threads(&args, options, config, &stop)
    }
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
        let tun = TunDevice::create(&args.tun, options)?;
        let tunnel = Tunnel::new(tun, config)?;
        announce(tunnel.device(), tunnel.local_addr()?);
        let result = until_stopped(tunnel.run(), stop.wait()).await;
        print_stats(&tunnel.stats());
        result
    })
}

/// What each thread's member of the tunnel gives back: how it ended, and its counters.
type MemberEnd = (ringsock::Result<()>, TunnelStats);

/// The tunnel on `--threads` pool threads: thread 0 creates the interface (multi-queue)
/// and binds the address, then each other thread in turn attaches its own queue and
/// joins the address with SO_REUSEPORT; all share one session.
fn on_threads(
    args: &TunnelArgs,
    options: TunOptions,
    config: TunnelConfig,
    stop: &StopSignal,
) -> ringsock::Result<()> {
    let threads = args.threads as usize;
    let mut builder = Builder::new();
    if let Some(backend) = args.backend.backend {
        builder = builder.backend(backend);
    }
    let pool = Pool::builder().threads(threads).runtime(builder).build()?;
    let handle = pool.handle();
    let group = TunnelGroup::new(config);
    let halt = Halt::new(threads);
    let mut members: Vec<Option<RemoteJoinHandle<MemberEnd>>> = Vec::with_capacity(threads);
    let mut info: Option<TunDeviceInfo> = None;
    let mut ready_members = 0;
    for thread in 0..threads {
        let options = if thread == 0 {
            options
        } else {
            // The interface exists, with its MTU, and is up: only attach a queue.
            TunOptions {
                mtu: None,
                up: false,
                ..options
            }
        };
        let (ready, is_ready) = mpsc::channel();
        let (group, halt, name) = (group.clone(), halt.clone(), args.tun.clone());
        let member = handle.spawn_on(thread, move || async move {
            let joined = TunDevice::create(&name, options).and_then(|tun| group.join(tun));
            let tunnel = match joined {
                Ok(tunnel) => tunnel,
                Err(err) => return (Err(err), TunnelStats::default()),
            };
            let device = tunnel.device();
            let _ = ready.send((device.name().to_owned(), device.offloads()));
            drop(ready);
            let result = until_stopped(tunnel.run(), halt.wait(thread)).await;
            (result, tunnel.stats())
        })?;
        members.push(Some(member));
        match is_ready.recv() {
            Ok(device) => {
                info = info.or(Some(device));
                ready_members += 1;
            }
            // The member ended before it was ready: its error says why.
            Err(_) => break,
        }
    }
    let started = ready_members == threads;
    if let (true, Some((name, offloads)), Some(addr)) = (started, &info, group.local_addr()) {
        announce_parts(name, *offloads, addr);
    }
    let ends = ringsock::block_on(async {
        let mut ends: Vec<Option<MemberEnd>> = (0..members.len()).map(|_| None).collect();
        if started {
            // Until the signal, or until a member ends by itself (it failed).
            let mut stop = std::pin::pin!(stop.wait());
            poll_fn(|cx| {
                let mut ended = false;
                for (member, end) in members.iter_mut().zip(ends.iter_mut()) {
                    if let Some(handle) = member {
                        if let Poll::Ready(output) = std::pin::Pin::new(handle).poll(cx) {
                            *end = Some(member_end(output));
                            *member = None;
                            ended = true;
                        }
                    }
                }
                if ended {
                    return Poll::Ready(());
                }
                stop.as_mut().poll(cx)
            })
            .await;
        }
        halt.fire();
        for (member, end) in members.iter_mut().zip(ends.iter_mut()) {
            if let Some(handle) = member.take() {
                *end = Some(member_end(handle.await));
            }
        }
        ends
    });
    let mut result = Ok(());
    let mut stats = TunnelStats::default();
    for (thread, (end, member_stats)) in ends.into_iter().flatten().enumerate() {
        eprintln!(
            "note: thread {thread}: {} packets sealed, {} opened, {} replays dropped",
            member_stats.tx_packets, member_stats.rx_packets, member_stats.rx_replayed
        );
        stats = stats.sum(&member_stats);
        if result.is_ok() {
            result = end;
        }
    }
    if started {
        print_stats(&stats);
    }
    // Stops the threads and closes every queue: an interface thread 0 created goes.
    drop(pool);
    result
}

/// The device's name and offloads, as thread 0's member reports them.
type TunDeviceInfo = (String, TunOffloads);

fn member_end(output: ringsock::Result<MemberEnd>) -> MemberEnd {
    output.unwrap_or_else(|err| (Err(err), TunnelStats::default()))
}

/// Prints the line a user (or a test) waits for, and the offloads granted.
fn announce(device: &TunDevice, addr: SocketAddr) {
    announce_parts(device.name(), device.offloads(), addr);
}

fn announce_parts(name: &str, offloads: TunOffloads, addr: SocketAddr) {
    println!("tunnel {name} udp {addr}");
    let _ = std::io::stdout().flush();
    eprintln!(
        "note: {name} offloads: vnet_hdr={} checksum={} tso={} uso={}",
        offloads.vnet_hdr, offloads.checksum, offloads.tso, offloads.uso
    );
}

fn print_stats(stats: &TunnelStats) {
    let fields: Vec<String> = stats
        .fields()
        .iter()
        .map(|(name, value)| format!("\"{name}\":{value}"))
        .collect();
    println!("tunnel stats {{{}}}", fields.join(","));
    let _ = std::io::stdout().flush();
}

/// Stops every thread's member: each waits on its own slot, so one call wakes them all.
#[derive(Clone)]
struct Halt {
    state: Arc<Mutex<(bool, Vec<Option<Waker>>)>>,
}

impl Halt {
    fn new(threads: usize) -> Halt {
        Halt {
            state: Arc::new(Mutex::new((false, vec![None; threads]))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, Vec<Option<Waker>>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fire(&self) {
        let wakers = {
            let mut state = self.lock();
            state.0 = true;
            std::mem::take(&mut state.1)
        };
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
    }

    async fn wait(&self, thread: usize) {
        poll_fn(|cx| {
            let mut state = self.lock();
            if state.0 {
                return Poll::Ready(());
            }
            if let Some(slot) = state.1.get_mut(thread) {
                *slot = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// The tunnel's result if it ends by itself; `Ok` once the stop signal comes.
async fn until_stopped(
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
