//! `ringsock`: the demo, an echo server and client, and the benchmarks.
//!
//! Thin over the library: it parses flags, calls ringsock, and turns every failure into
//! one line `error: <SocketErrorStatus>: <what happened>` with exit status 1.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand};
use ringsock::runtime::Builder;
use ringsock::tls::{Identity, ProtectionLevel, TlsAcceptor, TrustedRoots};
use ringsock::{
    Backend, Capability, DatagramSocket, DriverKind, Ecn, Error, HostName, Runtime, SendOptions,
    StreamSocket, StreamSocketListener, TimeoutCounts, TrafficClass,
};
use ringsock_cli::bench::{
    self, matrix::MatrixOptions, Impl, Options, Pattern, RelayLoop, Workload,
};

// Printing never panics (see `ringsock_cli::out`): these shadow the standard macros
// here and in every module declared below.
macro_rules! println {
    () => { ringsock_cli::out::line(format_args!("")) };
    ($($arg:tt)*) => { ringsock_cli::out::line(format_args!($($arg)*)) };
}
macro_rules! print {
    ($($arg:tt)*) => { ringsock_cli::out::text(format_args!($($arg)*)) };
}
macro_rules! eprintln {
    () => { ringsock_cli::out::error_line(format_args!("")) };
    ($($arg:tt)*) => { ringsock_cli::out::error_line(format_args!($($arg)*)) };
}

mod conn_limit;
mod echo_limit;
mod log_limit;
mod serve;
mod tunnel;

use log_limit::RateLimitedLog;

/// The interval of the echo server's rate-limited log lines.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(
    name = "ringsock",
    version,
    about = "Windows.Networking.Sockets-style sockets on io_uring: demo, echo, benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The TCP and UDP echo examples of the Windows.Networking.Sockets documentation in
    /// one process, then batched vs per-write sends side by side (the default command).
    Demo(BackendArg),
    /// Echoes every byte back on every TCP connection, and every UDP datagram back to
    /// its sender, until SIGINT or SIGTERM. Out of descriptors, it waits and tries again
    /// (5 ms, doubling up to 500 ms). Errors a peer can provoke are logged at most a few
    /// lines a second per kind, then one line with the count of the others.
    EchoServer(EchoServerArgs),
    /// Sends one line (TCP) or one datagram (--udp) to an echo server and prints the reply.
    EchoClient(EchoClientArgs),
    /// Benchmarks (the workloads and the JSON line: docs/benchmarks.md in the
    /// repository): with --json one run and one JSON line, else the default matrix and a
    /// table.
    Bench(BenchArgs),
    /// A point-to-point VPN tunnel: IP packets between a TUN interface and a UDP peer,
    /// sealed with ChaCha20-Poly1305 under keys a handshake derives from a pre-shared
    /// key, until SIGINT or SIGTERM.
    Tunnel(tunnel::TunnelArgs),
    /// The tunnel benchmark's baseline: one system call per packet, fixed keys (for
    /// measuring only; it reuses nonces across restarts).
    #[command(hide = true)]
    TunnelBaseline(tunnel::BaselineArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// One run: print exactly one JSON line (else: the default matrix and a table).
    #[arg(long)]
    json: bool,
    /// Workload (repeatable in the matrix as a filter).
    #[arg(long, value_enum)]
    workload: Vec<Workload>,
    /// Implementation measured (repeatable in the matrix as a filter; default for a
    /// run: ringsock-uring).
    #[arg(long = "impl", value_enum)]
    imp: Vec<Impl>,
    /// Message size in bytes (default: tcp-batch 1024, udp-batch, udp-recv and udp-relay
    /// 172; fixed: tcp-echo 64, udp-echo-rtt 172; UDP at most 65507; udp-relay
    /// 24..=8192).
    #[arg(long, value_parser = clap::value_parser!(u64).range(8..=bench::options::MAX_SIZE as u64))]
    size: Option<u64>,
    /// Messages per group (udp-recv: datagrams per GSO send of the flood, at most 128).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=bench::options::MAX_BATCH as u64))]
    batch: u64,
    /// Messages or datagrams (batch workloads, udp-recv) or measured round trips
    /// (echo); default: the suite's count. At most 10,000,000 for the echo workloads
    /// and 1,000,000,000 for udp-relay, which keep something per message.
    #[arg(long, value_parser = at_least_one)]
    count: Option<u64>,
    /// tcp-echo-conns: connections (default 64).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=bench::options::MAX_CONNS as u64))]
    conns: Option<u64>,
    /// tcp-echo-conns and udp-recv, ringsock impls: serving threads, each with its own
    /// runtime and SO_REUSEPORT socket (pinned to CPUs 0.. with --pin on); the JSON
    /// line's `conns_per_thread` / `datagrams_per_thread` shows how the kernel spread
    /// the load (udp-recv's flood then comes from 16 flows). tunnel, ringsock impls:
    /// each tunnel's `--threads`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=bench::options::MAX_THREADS as u64))]
    threads: Option<u64>,
    /// udp-relay: flows, one relay socket each (1..=1024; default 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=bench::options::MAX_FLOWS as u64))]
    flows: Option<u64>,
    /// udp-relay: packets per second over all flows (one sendto each, in 1 ms ticks), or
    /// max (sendmmsg groups of 64 as fast as they go); default 20000. The default count
    /// is 10 s worth, 2,000,000 at max.
    #[arg(long, value_name = "R|max")]
    rate: Option<bench::Rate>,
    /// udp-relay: the ringsock relay as sockets that forward by themselves
    /// (forward_received), as one task per flow forwarding each datagram, or as one loop
    /// over a DatagramGroup of the flows' sockets.
    #[arg(long, value_enum, default_value_t = RelayLoop::Forward)]
    relay: RelayLoop,
    /// udp-relay, ringsock relays: payload bytes each relay socket's receive ring keeps
    /// per datagram (1..=65536; default 2048 or --size if larger: what a media relay
    /// whose packets fit the path MTU would set; 65536 is the library's default ring,
    /// which keeps any UDP datagram whole).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..=65_536))]
    relay_ring: Option<u64>,
    /// Measured side on CPU 0 and the plain std peer on CPU 1.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pin: String,
    /// tcp-batch, ringsock impls: flush per group, wait-all on the write handles, or
    /// each write awaited alone.
    #[arg(long, value_enum, default_value_t = Pattern::Flush)]
    pattern: Pattern,
    /// tcp-batch: the receiver checks every Nth message's sequence number (wait-all:
    /// always every message).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    verify_stride: u64,
    /// tcp-batch: through TLS 1.3 (a rustls receiver; the bench's built-in test
    /// certificate for localhost).
    #[arg(long)]
    tls: bool,
    /// tcp-batch, udp-batch: leave a byte between a group's messages in memory, so no
    /// two writes can share an iovec (measures the engine without joining them).
    #[arg(long)]
    gapped: bool,
    /// udp-recv, ringsock impls: UDP_GRO on the receiving socket; its receive ring takes
    /// the merged super-datagrams apart.
    #[arg(long)]
    gro: bool,
    /// ringsock impls: microseconds the runtime spins on its completions before every
    /// sleep in the kernel (0: never). Trades CPU for wake-up latency. Without it
    /// RINGSOCK_SPIN applies, else the runtime's default: while recent waits average under
    /// 30 us, spin about twice that average. The JSON's `spin` field says which ran.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    spin_us: Option<u64>,
    /// tunnel, ringsock impls: the tunnels without offloads (plain packets).
    #[arg(long)]
    no_offload: bool,
    /// Watchdog for one run: give up after this many seconds (0: never).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Matrix: multiply every default count by this.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Matrix: rounds (impls alternate within a row); the table shows medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeat: u64,
    /// Matrix: also print each run's JSON line.
    #[arg(long)]
    raw: bool,
}

#[derive(Args, Clone)]
struct BackendArg {
    /// Engine: uring, epoll or auto (default: RINGSOCK_BACKEND, else auto).
    #[arg(long)]
    backend: Option<Backend>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("listen").required(true).multiple(true).args(["tcp", "udp", "activated"])))]
struct EchoServerArgs {
    /// TCP address to listen on, e.g. 127.0.0.1:0 (port 0 picks a free port); a
    /// link-local IPv6 address with its interface, by name or index: [fe80::1%eth0]:0.
    #[arg(long, value_name = "ADDR:PORT", value_parser = listen_addr)]
    tcp: Option<SocketAddr>,
    /// UDP address to echo datagrams on, e.g. 127.0.0.1:0. Datagrams from a port below
    /// 1024 (a service's), or from an address the server receives on (on a wildcard
    /// address: any of this host's with its port), are dropped and logged: an echo to
    /// them could go round for ever.
    #[arg(long, value_name = "ADDR:PORT", value_parser = listen_addr)]
    udp: Option<SocketAddr>,
    /// Echo at most N datagrams a second to each source address, in bursts of up to N
    /// (0: no limit); the rest are dropped and counted in the log. A forged datagram that
    /// sets this server and another echo server answering each other dies out once they
    /// answer faster than this, and forged sources get no more than this each.
    #[arg(long, value_name = "N", default_value = "10000")]
    udp_rate: u32,
    /// Serve TLS on --tcp with this certificate chain (PEM, end-entity first).
    #[arg(long, value_name = "FILE", requires_all = ["tcp", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require TLS clients to present a certificate signed by one of these CAs (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Serve at most N TCP connections at once (default: no limit but the descriptor
    /// limit). Further connections are not accepted until one ends: they wait, with their
    /// handshake done by the kernel, in its listen backlog (1024; the server takes none
    /// it does not serve); past that the kernel drops new SYNs and clients retry.
    /// Nothing is shed.
    #[arg(long, value_name = "N", requires = "tcp", value_parser = at_least_one)]
    max_connections: Option<u64>,
    /// Close a TCP connection after this many seconds without a byte either way (0:
    /// never). Closed connections are counted, not logged one by one.
    #[arg(long, value_name = "SECS", default_value = "60")]
    idle_timeout: Seconds,
    /// Close a TCP connection whose echo has made no progress for this many seconds: a
    /// client that sends but does not read, or reads a byte now and then, holds no
    /// buffers past it (0: never). Counted with the other timeouts.
    #[arg(long, value_name = "SECS", default_value = "30")]
    write_timeout: Seconds,
    /// TLS: close a connection whose handshake has not finished after this many seconds,
    /// however slowly the client sends it (0: never).
    #[arg(long, value_name = "SECS", default_value = "10")]
    handshake_timeout: Seconds,
    /// Serve on N threads, each with its own runtime and its own SO_REUSEPORT socket
    /// for --tcp and --udp (default: one per CPU; 1 with --max-connections, which bounds
    /// the whole server on any number of threads, and on one takes no client from the
    /// kernel before it has room for it).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
    /// Serve the sockets a service manager passed (systemd socket activation:
    /// LISTEN_FDS, LISTEN_PID, descriptors from 3 on) instead of binding. Started that
    /// way, the server uses them even without this flag, in place of --tcp and --udp.
    #[arg(long)]
    activated: bool,
    /// Used by a hot restart (SIGUSR2): the descriptor the old process hands its sockets
    /// over on.
    #[arg(long, hide = true, value_name = "FD")]
    inherit: Option<i32>,
    #[command(flatten)]
    backend: BackendArg,
}

/// A timeout given in seconds on the command line (fractions allowed); 0 means never.
#[derive(Clone, Copy, Debug)]
struct Seconds(Option<Duration>);

impl std::str::FromStr for Seconds {
    type Err = String;

    fn from_str(text: &str) -> Result<Seconds, String> {
        let secs: f64 = text
            .parse()
            .map_err(|_| format!("{text:?} is not a number of seconds"))?;
        if !(secs.is_finite() && secs >= 0.0) {
            return Err(format!(
                "{text:?} is not a number of seconds (0 means never)"
            ));
        }
        match Duration::try_from_secs_f64(secs) {
            // Rounded down to zero it would mean never, the opposite of what was asked.
            Ok(limit) if limit.is_zero() && secs > 0.0 => Err(format!(
                "{text:?} is less than a nanosecond (0 means never)"
            )),
            Ok(limit) => Ok(Seconds((!limit.is_zero()).then_some(limit))),
            Err(err) => Err(format!("{text:?}: {err}")),
        }
    }
}

/// `echo-client --timeout`: a positive number of seconds a `Duration` holds (a parse
/// error, so a usage error, rather than a panic for `1e300`).
fn reply_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("{text:?} is not a positive number of seconds"));
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(wait) if wait.is_zero() => Err(format!("{text:?} is less than a nanosecond")),
        Ok(wait) => Ok(wait),
        Err(err) => Err(format!("{text:?}: {err}")),
    }
}

#[derive(Args)]
struct EchoClientArgs {
    /// Host name or IP address of the server.
    host: String,
    /// Port number or service name.
    port: String,
    /// The line (or datagram) to send; over TCP without a line break.
    #[arg(long, default_value = "Hello, World!")]
    message: String,
    /// Send one UDP datagram instead of a TCP line.
    #[arg(long)]
    udp: bool,
    /// How long to wait for the reply, in seconds (default: 2 for UDP; 10 for TCP,
    /// counted from the connect, the TLS handshake included).
    #[arg(long, value_name = "SECONDS", value_parser = reply_timeout)]
    timeout: Option<Duration>,
    /// UDP: the DSCP of the datagram (0..=63; 46 is Expedited Forwarding, for audio).
    #[arg(long, requires = "udp", value_parser = clap::value_parser!(u8).range(0..=63))]
    dscp: Option<u8>,
    /// UDP: the ECN codepoint of the datagram: not-ect, ect0, ect1 or ce.
    #[arg(long, requires = "udp", value_name = "CODEPOINT")]
    ecn: Option<Ecn>,
    /// Connect with TLS, checking the server's certificate against the system's roots
    /// (or --ca) and the host name (or --server-name).
    #[arg(long, conflicts_with = "udp")]
    tls: bool,
    /// TLS: trust these CAs (PEM bundle) instead of the system's roots.
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
    /// TLS: the client certificate chain (PEM) to present when the server asks for one.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "client_key"])]
    client_cert: Option<PathBuf>,
    /// TLS: the private key of --client-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// TLS: the name the server's certificate must carry (default: HOST).
    #[arg(long, value_name = "NAME", requires = "tls")]
    server_name: Option<String>,
    /// TLS: the lowest version accepted, Tls12 (default) or Tls13.
    #[arg(long, value_name = "LEVEL", requires = "tls", value_parser = tls_level)]
    tls_level: Option<ProtectionLevel>,
    #[command(flatten)]
    backend: BackendArg,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(usage) => return print_usage(&usage),
    };
    // What these print is what they are run for (a benchmark's JSON line or table, the
    // demo's exchange): lost, the command did not do its job. A server's or tunnel's
    // lines are for whoever listens, and a reader that went away does not fail them.
    let output_is_the_product = matches!(
        cli.command,
        None | Some(Command::Demo(_)) | Some(Command::Bench(_))
    );
    let status = run(cli);
    if !output_is_the_product {
        return status;
    }
    match ringsock_cli::out::lost_output() {
        Some(lost) => {
            let err = Error::io("write the output", lost);
            eprintln!("error: {}: {err}", err.status());
            ExitCode::FAILURE
        }
        None => status,
    }
}

fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        None => demo(BackendArg { backend: None }),
        Some(Command::Demo(args)) => demo(args),
        Some(Command::EchoServer(args)) => echo_server(args),
        Some(Command::EchoClient(args)) => echo_client(args),
        Some(Command::Bench(args)) => return bench_command(args),
        Some(Command::Tunnel(args)) => tunnel::tunnel(args),
        Some(Command::TunnelBaseline(args)) => tunnel::baseline(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}: {err}", err.status());
            ExitCode::FAILURE
        }
    }
}

fn runtime(backend: &BackendArg) -> ringsock::Result<Runtime> {
    let mut builder = Builder::new();
    if let Some(backend) = backend.backend {
        builder = builder.backend(backend);
    }
    let runtime = builder.build()?;
    if let Some(reason) = runtime.fallback_reason() {
        eprintln!("note: {reason}");
    }
    Ok(runtime)
}

/// The TCP echo example of the Windows.Networking.Sockets documentation: a listener and a
/// client in one process.
fn demo(backend: BackendArg) -> ringsock::Result<()> {
    let runtime = runtime(&backend)?;
    runtime.block_on(async {
        let listener = StreamSocketListener::bind_host(&HostName::new("localhost")?, "0")?;
        let port = listener.local_addr()?.port().to_string();
        println!("server is listening on port {port}...");
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await?;
            let request = socket.input_stream().read_line().await?.unwrap_or_default();
            println!("server received the request: \"{request}\"");
            let output = socket.output_stream();
            output.write(format!("{request}\n")).await?;
            output.flush().await?;
            println!("server sent back the response: \"{request}\"");
            drop(socket);
            drop(listener);
            println!("server closed its socket");
            Ok::<_, Error>(())
        });

        let client = async {
            let host = HostName::new("localhost")?;
            println!("client is trying to connect...");
            let socket = StreamSocket::new();
            socket.connect(&host, &port).await?;
            println!("client connected");
            let request = "Hello, World!";
            let output = socket.output_stream();
            output.write(format!("{request}\n")).await?;
            output.flush().await?;
            println!("client sent the request: \"{request}\"");
            let response = socket.input_stream().read_line().await?.unwrap_or_default();
            println!("client received the response: \"{response}\"");
            drop(socket);
            println!("client closed its socket");
            Ok::<_, Error>(())
        };
        if let Err(err) = client.await {
            // The server side failing first (out of descriptors in accept, say) is the
            // cause; the client's refused connection only follows from it.
            if server.is_finished() {
                server.await?;
            }
            return Err(err);
        }
        server.await?;
        udp_demo().await
    })?;
    let kind = runtime.driver_kind();
    println!("driver: {kind}");
    if let Some(setup) = runtime.ring_setup() {
        let found = runtime.capabilities();
        let missing: Vec<&str> = Capability::ALL
            .into_iter()
            .filter(|cap| !found.contains(*cap))
            .map(Capability::name)
            .collect();
        println!("io_uring setup: {setup}");
        println!("io_uring capabilities: {found}");
        if !missing.is_empty() {
            println!(
                "io_uring without (their fallbacks run instead): {}",
                missing.join(" ")
            );
        }
    }
    drop(runtime);
    batching_demo(kind)
}

/// Batched sends against one send per write: a few seconds of tcp-batch, 64-byte
/// messages in groups of 64, on the demo's engine (the bench module does the work).
fn batching_demo(kind: DriverKind) -> ringsock::Result<()> {
    let ringsock = match kind {
        DriverKind::Uring => Impl::RingsockUring,
        DriverKind::Epoll => Impl::RingsockEpoll,
    };
    println!();
    println!("{} (a few seconds)...", bench::compare::title(ringsock));
    flush_stdout();
    let comparison = bench::compare::run(ringsock, true)?;
    print!("{}", comparison.table());
    Ok(())
}

/// The UDP echo example of the same documentation: a server socket echoes a message back to
/// the client's port; the client sends through a second socket's output stream.
async fn udp_demo() -> ringsock::Result<()> {
    let server = DatagramSocket::new();
    println!("server is about to bind...");
    server.bind("0")?;
    let server_port = server.local_addr()?.port().to_string();
    println!("server is bound to port number {server_port}");
    let client = DatagramSocket::new();
    println!("client is about to bind...");
    client.bind("0")?;
    let client_port = client.local_addr()?.port().to_string();
    println!("client is bound to port number {client_port}");

    let server_task = ringsock::spawn(async move {
        let message = server.recv().await?;
        let request = message.text()?.trim().to_owned();
        println!("server received the request: \"{request}\"");
        let output = server
            .output_stream_to(&message.remote_host(), &client_port)
            .await?;
        output.write(format!("{request}\n")).await?;
        output.flush().await?;
        println!("server sent back the response: \"{request}\"");
        drop(server);
        println!("server closed its socket");
        Ok::<_, Error>(())
    });

    let request = "Hello, World!";
    {
        let sender = DatagramSocket::new();
        let output = sender
            .output_stream_to(&HostName::new("localhost")?, &server_port)
            .await?;
        output.write(format!("{request}\n")).await?;
        output.flush().await?;
    }
    println!("client sent the request: \"{request}\"");
    let response = ringsock::runtime::timeout(Duration::from_secs(2), client.recv())
        .await
        .map_err(|_| Error::timed_out("waiting for the UDP response"))??;
    println!(
        "client received the response: \"{}\"",
        response.text()?.trim()
    );
    drop(client);
    println!("client closed its socket");
    server_task.await
}

/// The acceptor for `--tls-cert`/`--tls-key` (and `--client-ca`), if TLS was asked for.
fn tls_acceptor(args: &EchoServerArgs) -> ringsock::Result<Option<TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let mut builder = TlsAcceptor::builder(Identity::from_pem_files(cert, key)?)
        .handshake_timeout(args.handshake_timeout.0);
    if let Some(ca) = &args.client_ca {
        builder = builder.require_client_certificate(TrustedRoots::from_pem_file(ca)?);
    }
    builder.build().map(Some)
}

fn echo_server(args: EchoServerArgs) -> ringsock::Result<()> {
    let acceptor = tls_acceptor(&args)?;
    if acceptor.is_some() {
        let clients = match &args.client_ca {
            Some(ca) => format!("client certificates required (CA {})", ca.display()),
            None => "no client certificates".to_owned(),
        };
        eprintln!("tls: on tcp, {clients}");
    }
    let threads = match args.threads {
        Some(threads) => threads as usize,
        // With a limit, each further thread's listener may hold one accepted client while
        // the server is full: one thread by default takes none before it has room.
        None if args.max_connections.is_some() => 1,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut runtime = Builder::new();
    if let Some(backend) = args.backend.backend {
        runtime = runtime.backend(backend);
    }
    if args.max_connections.is_some() {
        // A multishot accept keeps taking connections while the server is full, and the
        // kernel hands it its whole accept queue in one go, again and again before the
        // pause lands: a flood left thousands of descriptors open past the limit. One
        // ACCEPT per call holds none the server has not asked for.
        runtime = runtime.disable(ringsock::Capability::MultishotAccept);
    }
    serve::run(
        serve::Start {
            tcp: args.tcp,
            udp: args.udp,
            threads,
            inherit: args.inherit,
            activated: args.activated,
            runtime,
        },
        serve::Settings {
            acceptor,
            idle_timeout: args.idle_timeout.0,
            write_timeout: args.write_timeout.0,
            connections: conn_limit::ServerLimit::new(args.max_connections.map(|n| n as usize)),
            udp_rate: args.udp_rate,
        },
    )
}

/// `--tls-level`: a TLS version (PlainSocket is no TLS level).
fn tls_level(text: &str) -> Result<ProtectionLevel, String> {
    match text.parse::<ProtectionLevel>() {
        Ok(ProtectionLevel::PlainSocket) | Err(_) => Err("Tls12 or Tls13".to_owned()),
        Ok(level) => Ok(level),
    }
}

/// An address to listen on: `IP:PORT`, or `[IPv6%SCOPE]:PORT` whose scope names the
/// interface by name (`eth0`) or index, as the server's link-local error suggests.
fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let scoped = text
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("]:"))
        .filter(|(host, _)| host.contains('%'));
    let Some((host, port)) = scoped else {
        return Err("not an IP:PORT or [IPv6%SCOPE]:PORT address".to_owned());
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    let host = HostName::new(host).map_err(|err| err.to_string())?;
    if host.ip().is_none() {
        return Err(format!("{} is not an IP address", host.raw_name()));
    }
    ringsock::host::resolve_blocking(&host, port)
        .map_err(|err| err.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{} names no address", host.raw_name()))
}

/// The echo server's stderr lines that peers can provoke, each kind rate-limited.
struct EchoLogs {
    accept: RateLimitedLog,
    connection: RateLimitedLog,
    limit: RateLimitedLog,
    udp: RateLimitedLog,
}

impl EchoLogs {
    fn new() -> EchoLogs {
        EchoLogs {
            accept: RateLimitedLog::new("accept", 1, LOG_INTERVAL),
            connection: RateLimitedLog::new("connection", 5, LOG_INTERVAL),
            limit: RateLimitedLog::new("connections", 1, LOG_INTERVAL),
            udp: RateLimitedLog::new("udp", 5, LOG_INTERVAL),
        }
    }

    /// The summaries still due, before the server ends.
    fn flush(&self) {
        for log in [&self.accept, &self.connection, &self.limit, &self.udp] {
            log.flush();
        }
    }
}

/// How often the echo server says how many connections its timeouts closed, when that
/// changed.
const TIMEOUT_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The connections closed by each timeout, e.g. `timeouts: idle 3, handshake 1, write 0`.
fn timeouts_line(counts: TimeoutCounts) -> String {
    format!(
        "timeouts: idle {}, handshake {}, write {}",
        counts.idle, counts.handshake, counts.write
    )
}

/// Sends every datagram back to its sender, taking every ready datagram at once. On a
/// wildcard address each reply leaves from the address its request came to (a client
/// behind a NAT, or of a multi-homed host, drops a reply from another one).
///
/// Returns once `stop` is ready, and only while it waits for datagrams: a batch taken
/// is echoed whole first, and a receive given up loses nothing (it stays in the ring).
async fn udp_echo(
    socket: &DatagramSocket,
    log: &RateLimitedLog,
    udp_rate: u32,
    stop: impl Future<Output = ()>,
) {
    let mut echo = UdpEcho::new(socket, log, udp_rate);
    let mut stop = std::pin::pin!(stop);
    let mut batch = Vec::with_capacity(64);
    let mut failures = 0u32;
    loop {
        batch.clear();
        let received = {
            let mut receive = std::pin::pin!(socket.recv_batch(&mut batch, 64));
            poll_fn(|cx| match stop.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => receive.as_mut().poll(cx).map(Some),
            })
            .await
        };
        let Some(received) = received else {
            return;
        };
        if let Err(err) = received {
            // Per datagram (an ICMP error, say): the socket goes on. But an error that
            // comes back at once every time (no memory for the receive ring) would spin
            // this loop without ever yielding, deaf to SIGTERM: after the first, wait
            // before the next try, as the listener does after a failed accept.
            log.line(format!("receive: {}: {err}", err.status()));
            if failures > 0 {
                let wait = StreamSocketListener::ACCEPT_BACKOFF_FIRST
                    .saturating_mul(1 << (failures - 1).min(16))
                    .min(StreamSocketListener::ACCEPT_BACKOFF_MAX);
                ringsock::runtime::sleep(wait).await;
            }
            failures = failures.saturating_add(1);
            continue;
        }
        failures = 0;
        let now = std::time::Instant::now();
        for datagram in batch.drain(..) {
            echo.reply(datagram, now).await;
        }
    }
}

/// The echo of one socket's datagrams: what may be echoed, and the reply.
struct UdpEcho<'a> {
    socket: &'a DatagramSocket,
    log: &'a RateLimitedLog,
    local: Option<SocketAddr>,
    limit: Option<echo_limit::EchoLimit>,
}

impl<'a> UdpEcho<'a> {
    fn new(socket: &'a DatagramSocket, log: &'a RateLimitedLog, udp_rate: u32) -> UdpEcho<'a> {
        let local = socket.local_addr().ok();
        let wildcard = local.is_some_and(|addr| addr.ip().is_unspecified());
        if wildcard {
            if let Err(err) = socket.control().set_receive_destination(true) {
                log.line(format!("replies leave from any address: {err}"));
            }
        }
        UdpEcho {
            socket,
            log,
            local,
            limit: echo_limit::EchoLimit::new(udp_rate),
        }
    }

    /// Echoes `datagram` to its sender, unless it must not be.
    async fn reply(&mut self, datagram: ringsock::Datagram, now: std::time::Instant) {
        let to = datagram.remote_addr();
        if let Some(why) = self.local.and_then(|local| reflection(&datagram, local)) {
            self.log
                .line(format!("dropped a datagram from {to}: {why}"));
            return;
        }
        if let Some(limit) = self.limit.as_mut() {
            if !limit.allow(to, now) {
                self.log.line(format!(
                    "dropped a datagram from {to}: over {} a second from one source",
                    limit.per_second()
                ));
                return;
            }
        }
        let options = SendOptions::reply_to(&datagram);
        let (sent, _) = self
            .socket
            .send_to_addr_with(datagram.to_vec(), to, &options)
            .await;
        if let Err(err) = sent {
            self.log
                .line(format!("send to {to}: {}: {err}", err.status()));
        }
    }
}

/// Why a datagram must not be echoed, if it must not: its source is an address this
/// server receives on (a forged datagram that would have the server echo to itself for
/// ever: on a wildcard address, from any address of this host with the server's port),
/// or a port below 1024, where services live and clients do not send from (a forged
/// datagram that would set this server and another service, an NTP or another echo
/// server say, answering each other for ever).
fn reflection(datagram: &ringsock::Datagram, local: SocketAddr) -> Option<&'static str> {
    let from = datagram.remote_addr();
    if from.port() < 1024 {
        return Some("a service port (no client sends from one; an answer could loop)");
    }
    let ip = from.ip().to_canonical();
    let own = from.port() == local.port()
        && match local.ip().is_unspecified() {
            true => is_this_hosts(ip),
            false => ip == local.ip().to_canonical(),
        };
    own.then_some("this server's own address (the echo would come back to it for ever)")
}

/// Whether `ip` is an address of this host: one a socket can bind to. Asked only of
/// datagrams from the server's own port, which clients do not send from. Only the
/// kernel's "not an address here" says no: a test that could not be made (out of
/// descriptors, say) counts as yes, so that a forged datagram cannot start an echo
/// loop just when the server is short of descriptors.
fn is_this_hosts(ip: std::net::IpAddr) -> bool {
    match std::net::UdpSocket::bind(SocketAddr::new(ip, 0)) {
        Ok(_) => true,
        Err(err) => err.raw_os_error() != Some(libc::EADDRNOTAVAIL),
    }
}

/// Echoes until the client half-closes, then closes this side.
async fn echo_connection(socket: &StreamSocket) -> ringsock::Result<()> {
    let mut buf = Vec::with_capacity(64 * 1024);
    loop {
        buf.clear();
        let (read, back) = socket.read(buf).await;
        buf = back;
        if read? == 0 {
            return match socket.shutdown_write().await {
                // The client is gone altogether (a reset came after its FIN, say, for
                // an echo it did not read): nothing is left to close, and nothing the
                // server did wrong.
                Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
                done => done,
            };
        }
        let (written, back) = socket.write_all(buf).await;
        buf = back;
        written?;
    }
}

/// A number of 1 or more, said so when it is not (clap's own range message names the
/// largest u64).
fn at_least_one(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(count) => Ok(count),
        Err(err) => Err(format!("{err} (a whole number of 1 or more)")),
    }
}

fn echo_client(args: EchoClientArgs) -> ringsock::Result<()> {
    // The reply is read as one line: a line break in the message would cut it short
    // without a word (and a trailing \r would be taken for part of the line's end).
    if !args.udp && args.message.contains(['\n', '\r']) {
        usage_error_in(
            "echo-client",
            "--message is one line over TCP: it cannot hold a line break (\\n or \\r)",
        );
    }
    let host = HostName::new(&args.host)?;
    let runtime = runtime(&args.backend)?;
    if args.udp {
        return runtime.block_on(udp_echo_client(&host, &args));
    }
    let wait = args.timeout.unwrap_or(TCP_REPLY_TIMEOUT);
    runtime.block_on(async {
        let socket = StreamSocket::new();
        // A server that accepts and never answers (or a TLS handshake it never finishes)
        // would otherwise hold the client forever.
        let reply = ringsock::runtime::timeout(wait, tcp_exchange(&socket, &host, &args))
            .await
            .map_err(|_| {
                Error::timed_out(format!(
                    "no reply from {host} port {} within {wait:?}",
                    args.port
                ))
            })??;
        if args.tls {
            close_tls(&socket, &mut socket.input_stream()).await;
        }
        print_reply(&reply, &args.message)?;
        check_echo(&reply, &args.message, !args.tls)
    })
}

/// A reply that is not the message sent, byte for byte, fails the client (after it was
/// shown): the other end is no echo server, or not one speaking this protocol (a TLS
/// server asked without `--tls` answers with a TLS alert).
fn check_echo(reply: &[u8], message: &str, tls_would_help: bool) -> ringsock::Result<()> {
    if reply == message.as_bytes() {
        return Ok(());
    }
    // Only a plain TCP exchange could have been a TLS server: TLS runs over TCP, and a
    // client that used it was answered in it.
    let hint = if tls_would_help {
        ", or one that speaks another protocol (a TLS server needs --tls)"
    } else {
        ""
    };
    Err(Error::io(
        "check the reply",
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the reply ({} bytes) is not the message sent ({} bytes): not an echo \
                 server{hint}",
                reply.len(),
                message.len()
            ),
        ),
    ))
}

/// `reply` safe for a terminal and true to its bytes: control characters (a hostile
/// server's escape sequences, a carriage return or line feed that would overwrite the
/// line or fake one of this tool's) and invisible format characters (bidi overrides
/// that reorder what the terminal shows, zero-width ones that hide text) as `\xNN` or
/// `\u{N}` escapes, bytes that are not UTF-8 as `\xNN`, the rest as it is. A reply that
/// is the message sent (`echoed`) keeps its line feeds and tabs: they are the user's own.
fn printable(reply: &[u8], echoed: bool) -> String {
    let mut shown = String::with_capacity(reply.len() + 16);
    for chunk in reply.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                c if !c.is_control() && !is_invisible_format(c) => shown.push(c),
                '\n' | '\t' if echoed => shown.push(c),
                c if (c as u32) < 0x80 => shown.push_str(&format!("\\x{:02x}", c as u32)),
                c => shown.push_str(&format!("\\u{{{:x}}}", c as u32)),
            }
        }
        for byte in chunk.invalid() {
            shown.push_str(&format!("\\x{byte:02x}"));
        }
    }
    shown
}

/// Unicode's format characters (category Cf) a terminal shows as nothing while they
/// change what is around them: bidi embeddings, overrides and isolates, zero-width
/// spaces and joiners, the soft hyphen, the byte order mark, interlinear annotations
/// and tags.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    )
}

/// How long a TCP echo-client waits for its reply when `--timeout` is not given: longer
/// than UDP's, since it covers the connect and a TLS handshake too.
const TCP_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects (with TLS if asked), sends the line and reads the reply line.
async fn tcp_exchange(
    socket: &StreamSocket,
    host: &HostName,
    args: &EchoClientArgs,
) -> ringsock::Result<Vec<u8>> {
    if args.tls {
        let control = socket.control();
        if let Some(ca) = &args.ca {
            control.set_trusted_roots(TrustedRoots::from_pem_file(ca)?)?;
        }
        if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
            control.set_client_certificate(Identity::from_pem_files(cert, key)?)?;
        }
    }
    socket.connect(host, &args.port).await?;
    if args.tls {
        let name = match &args.server_name {
            Some(name) => HostName::new(name)?,
            None => host.clone(),
        };
        let level = args.tls_level.unwrap_or(ProtectionLevel::Tls12);
        socket.upgrade_to_tls(level, &name).await?;
    }
    let (written, _) = socket
        .write_all(format!("{}\n", args.message).into_bytes())
        .await;
    written?;
    read_reply_line(&mut socket.input_stream(), args.message.len()).await
}

/// The reply line as bytes (without its `\n` or `\r\n`), whatever they are: a reply
/// that is not UTF-8 is still shown and compared, not taken for a usage error. A reply
/// that grows far past the message without a line end is cut off: it is no echo.
async fn read_reply_line(
    input: &mut ringsock::InputStream,
    message_len: usize,
) -> ringsock::Result<Vec<u8>> {
    let most = message_len.saturating_mul(4).max(4096);
    let mut line = Vec::new();
    loop {
        // Up to the line end if it is buffered, so what follows it stays unread; else one
        // byte, which reads what the peer sent into the buffer.
        let buffered = input.buffered();
        let take = match buffered.iter().position(|&b| b == b'\n') {
            Some(end) => end + 1,
            None => buffered.len().max(1),
        };
        let piece = input.read(take).await?;
        if piece.is_empty() {
            if line.is_empty() {
                return Err(Error::connection_closed("waiting for the reply"));
            }
            return Ok(line);
        }
        line.extend_from_slice(&piece);
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
        if line.len() > most {
            return Ok(line);
        }
    }
}

/// The reply on stdout: a stdout that cannot take it (a full disk, a reader gone) is
/// this command's failure, not a panic.
fn print_reply(reply: &[u8], message: &str) -> ringsock::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", printable(reply, reply == message.as_bytes()))
        .and_then(|()| stdout.flush())
        .map_err(|err| Error::io("write the reply to stdout", err))
}

/// Ends a TLS connection the way TLS asks: our close_notify, then the server's (for two
/// seconds at most), so neither side sees a truncation or a reset.
async fn close_tls(socket: &StreamSocket, input: &mut ringsock::InputStream) {
    if socket.shutdown_write().await.is_err() {
        return;
    }
    let drain = async { while let Ok(Some(_)) = input.read_line().await {} };
    let _ = ringsock::runtime::timeout(Duration::from_secs(2), drain).await;
}

/// How long a UDP echo-client waits for its reply when `--timeout` is not given.
const UDP_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// One datagram to the server; its reply within the timeout, or ConnectionTimedOut.
async fn udp_echo_client(host: &HostName, args: &EchoClientArgs) -> ringsock::Result<()> {
    let wait = args.timeout.unwrap_or(UDP_REPLY_TIMEOUT);
    let socket = DatagramSocket::new();
    socket.connect(host, &args.port).await?;
    let mut options = SendOptions::default();
    if args.dscp.is_some() || args.ecn.is_some() {
        let class = TrafficClass::new(args.dscp.unwrap_or(0), args.ecn.unwrap_or_default())?;
        options = options.with_traffic_class(class);
    }
    let (sent, _) = socket
        .send_with(args.message.clone().into_bytes(), &options)
        .await;
    sent?;
    let server = socket
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| host.to_string());
    let reply = ringsock::runtime::timeout(wait, socket.recv())
        .await
        .map_err(|_| Error::timed_out(format!("no UDP reply from {server} within {wait:?}")))?
        // An ICMP answer (a closed port: ConnectionRefused) names the server it came for.
        .map_err(|err| match err.raw_os_error() {
            Some(code) => Error::io(
                format!("receive the reply from {server}"),
                std::io::Error::from_raw_os_error(code),
            ),
            None => err,
        })?;
    print_reply(reply.data(), &args.message)?;
    check_echo(reply.data(), &args.message, false)
}

/// `ringsock bench`: one run (`--json`) or the matrix.
fn bench_command(args: BenchArgs) -> ExitCode {
    if args.workload == [Workload::Tunnel] && !args.json {
        let (repeat, raw) = (args.repeat, args.raw);
        let args = BenchArgs {
            repeat: 1,
            raw: false,
            ..args
        };
        return tunnel::bench_table(bench_options(&args), repeat, raw);
    }
    if args.json {
        bench_one(&args)
    } else {
        bench_matrix(&args)
    }
}

/// What clap had to say instead of a command line to run: help and version on standard
/// output with status 0, a usage error on standard error with status 2. Help nobody
/// received (a closed pipe, a full disk) is a failure, as any lost output of a command
/// run for what it prints.
fn print_usage(usage: &clap::Error) -> ExitCode {
    use std::io::Write;
    let printed = usage.print().and_then(|()| match usage.use_stderr() {
        true => std::io::stderr().flush(),
        false => std::io::stdout().flush(),
    });
    match printed {
        Ok(()) => ExitCode::from(u8::try_from(usage.exit_code()).unwrap_or(1)),
        Err(lost) => {
            let err = Error::io("write the usage text", lost);
            eprintln!("error: {}: {err}", err.status());
            ExitCode::FAILURE
        }
    }
}

/// A usage error of `ringsock bench`: clap's format, exit status 2.
fn usage_error(message: impl std::fmt::Display) -> ! {
    usage_error_in("bench", message)
}

/// A usage error of the subcommand `name`: clap's format, exit status 2.
fn usage_error_in(name: &str, message: impl std::fmt::Display) -> ! {
    let mut command = Cli::command();
    // Built, the subcommand knows its full name ("ringsock bench") for the usage line.
    command.build();
    let sub = command.find_subcommand_mut(name).cloned();
    let mut command = sub.unwrap_or(command);
    command
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}

fn bench_options(args: &BenchArgs) -> Options {
    if args.workload.len() > 1 || args.imp.len() > 1 {
        usage_error("with --json, give at most one --workload and one --impl");
    }
    for (flag, given) in [
        ("--scale", args.scale != 1.0),
        ("--repeat", args.repeat != 1),
        ("--raw", args.raw),
    ] {
        if given {
            usage_error(format!("{flag} applies to the matrix (without --json)"));
        }
    }
    let workload = args.workload.first().copied().unwrap_or(Workload::TcpBatch);
    let imp = args.imp.first().copied().unwrap_or(Impl::RingsockUring);
    let mut options = Options::new(workload, imp);
    options.size = args.size.map_or(options.size, |s| s as usize);
    options.batch = args.batch as usize;
    options.pattern = args.pattern;
    options.relay = args.relay;
    options.relay_ring = args.relay_ring.map(|bytes| bytes as usize);
    options.tls = args.tls;
    options.gapped = args.gapped;
    options.gro = args.gro;
    options.conns = args.conns.map_or(options.conns, |c| c as usize);
    options.threads = args.threads.map_or(1, |t| t as usize);
    options.pin = args.pin == "on";
    options.verify_stride = args.verify_stride;
    options.tls = args.tls;
    options.spin_us = args.spin_us;
    options.offloads = !args.no_offload;
    options.flows = args.flows.map_or(1, |f| f as usize);
    options.rate = args.rate.unwrap_or_default();
    options.count = args.count.unwrap_or_else(|| options.default_count());
    if let Err(message) = options.validate() {
        usage_error(message);
    }
    options
}

fn bench_one(args: &BenchArgs) -> ExitCode {
    let options = bench_options(args);
    if args.timeout > 0 {
        let (watched, secs) = (options.clone(), args.timeout);
        let watchdog = std::thread::Builder::new()
            .name("bench-timeout".into())
            .spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(secs));
                let error = bench::RunError::new(
                    ringsock::SocketErrorStatus::ConnectionTimedOut,
                    format!("the run did not finish within {secs} s (--timeout)"),
                );
                let report = bench::Report::failed(&watched, 0, error.clone());
                println!("{}", report.to_json_line());
                flush_stdout();
                eprintln!("error: {error}");
                // What the run set up outside this process (the tunnel's namespaces)
                // goes with it.
                bench::netns::clean_up_now();
                std::process::exit(1);
            });
        if let Err(err) = watchdog {
            // No thread to keep the time (RLIMIT_NPROC, say): the run does not start.
            return bench_failed(&options, &Error::io("start the --timeout watchdog", err));
        }
    }
    let outcome = bench::run(&options);
    // A signal that stopped the run ends the process as it says, not as this outcome.
    bench::netns::wait_for_signal_cleanup();
    match outcome {
        Ok(report) => {
            println!("{}", report.to_json_line());
            flush_stdout();
            match &report.error {
                None => ExitCode::SUCCESS,
                Some(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(err) => bench_failed(&options, &err),
    }
}

/// The JSON line of a run that failed before it had figures, and the error on stderr.
fn bench_failed(options: &bench::Options, err: &Error) -> ExitCode {
    let error = bench::RunError::from_error(err);
    println!(
        "{}",
        bench::Report::failed(options, 0, error).to_json_line()
    );
    flush_stdout();
    eprintln!("error: {}: {err}", err.status());
    ExitCode::FAILURE
}

fn bench_matrix(args: &BenchArgs) -> ExitCode {
    let single = [
        ("--size", args.size.is_some()),
        ("--count", args.count.is_some()),
        ("--conns", args.conns.is_some()),
        ("--threads", args.threads.is_some()),
        ("--batch", args.batch != 64),
        ("--pattern", args.pattern != Pattern::Flush),
        ("--verify-stride", args.verify_stride != 1),
        ("--tls", args.tls),
        ("--gapped", args.gapped),
        ("--gro", args.gro),
        ("--spin-us", args.spin_us.is_some()),
        ("--flows", args.flows.is_some()),
        ("--rate", args.rate.is_some()),
        ("--relay", args.relay != RelayLoop::default()),
        ("--relay-ring", args.relay_ring.is_some()),
    ];
    for (flag, given) in single {
        if given {
            usage_error(format!(
                "{flag} applies to one run (--json); the matrix uses its own"
            ));
        }
    }
    if !(args.scale > 0.0 && args.scale <= bench::matrix::MAX_SCALE) {
        usage_error(format!(
            "--scale must be a number above 0 and at most {}",
            bench::matrix::MAX_SCALE
        ));
    }
    let options = MatrixOptions {
        scale: args.scale,
        pin: args.pin == "on",
        workloads: args.workload.clone(),
        impls: args.imp.clone(),
        repeat: args.repeat as usize,
        progress: true,
        timeout: args.timeout,
    };
    let cells = bench::matrix::plan(&options);
    if let Err(why) = bench::matrix::check(&options, &cells) {
        usage_error(why);
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(err) => {
            let err = Error::io("find this program", err);
            eprintln!("error: {}: {err}", err.status());
            return ExitCode::FAILURE;
        }
    };
    let raw = args.raw;
    let result = bench::matrix::run(&exe, &options, |line| {
        if raw {
            println!("{line}");
        }
    });
    match result {
        Ok(matrix) => {
            print!("{}", matrix.table());
            flush_stdout();
            if matrix.failures() == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "error: {}: {} cells had failed runs",
                    ringsock::SocketErrorStatus::Unknown,
                    matrix.failures()
                );
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("error: {}: {err}", err.status());
            ExitCode::FAILURE
        }
    }
}

fn flush_stdout() {
    ringsock_cli::out::flush();
}

/// Resolves with whichever future finishes first.
async fn first_of<A: Future<Output = ()>, B: Future<Output = ()>>(a: A, b: B) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() || b.as_mut().poll(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// SIGINT/SIGTERM as a future: a signal-hook thread sets a flag and wakes the loop.
struct StopSignal {
    state: Arc<(AtomicBool, Mutex<Option<Waker>>)>,
}

impl StopSignal {
    fn install() -> ringsock::Result<StopSignal> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(|err| Error::io("install signal handlers", err))?;
        let state = Arc::new((AtomicBool::new(false), Mutex::new(None::<Waker>)));
        let theirs = state.clone();
        std::thread::Builder::new()
            .name("ringsock-signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    theirs.0.store(true, Ordering::Release);
                    let waker = theirs.1.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                }
            })
            .map_err(|err| Error::io("start the signal thread", err))?;
        Ok(StopSignal { state })
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            *self.state.1.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
            if self.state.0.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}
