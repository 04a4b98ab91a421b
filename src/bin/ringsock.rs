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

use clap::{ArgGroup, Args, Parser, Subcommand};
use ringsock::runtime::Builder;
use ringsock::tls::{Identity, ProtectionLevel, TlsAcceptor, TrustedRoots};
use ringsock::{
    Backend, DatagramSocket, Error, HostName, Runtime, StreamSocket, StreamSocketListener,
};

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
    /// The seed's echo examples in one process (the default command).
    Demo(BackendArg),
    /// Echoes every byte back on every TCP connection, and every UDP datagram back to
    /// its sender, until SIGINT or SIGTERM.
    EchoServer(EchoServerArgs),
    /// Sends one line (TCP) or one datagram (--udp) to an echo server and prints the reply.
    EchoClient(EchoClientArgs),
}

#[derive(Args, Clone)]
struct BackendArg {
    /// Engine: uring, epoll or auto (default: RINGSOCK_BACKEND, else auto).
    #[arg(long)]
    backend: Option<Backend>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("listen").required(true).multiple(true).args(["tcp", "udp"])))]
struct EchoServerArgs {
    /// TCP address to listen on, e.g. 127.0.0.1:0 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR:PORT")]
    tcp: Option<SocketAddr>,
    /// UDP address to echo datagrams on, e.g. 127.0.0.1:0.
    #[arg(long, value_name = "ADDR:PORT")]
    udp: Option<SocketAddr>,
    /// Serve TLS on --tcp with this certificate chain (PEM, end-entity first).
    #[arg(long, value_name = "FILE", requires_all = ["tcp", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require TLS clients to present a certificate signed by one of these CAs (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArg,
}

#[derive(Args)]
struct EchoClientArgs {
    /// Host name or IP address of the server.
    host: String,
    /// Port number or service name.
    port: String,
    /// The line (or datagram) to send.
    #[arg(long, default_value = "Hello, World!")]
    message: String,
    /// Send one UDP datagram instead of a TCP line.
    #[arg(long)]
    udp: bool,
    /// UDP: how long to wait for the reply, in seconds.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    timeout: f64,
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
    #[arg(long, value_name = "LEVEL", requires = "tls")]
    tls_level: Option<ProtectionLevel>,
    #[command(flatten)]
    backend: BackendArg,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => demo(BackendArg { backend: None }),
        Some(Command::Demo(args)) => demo(args),
        Some(Command::EchoServer(args)) => echo_server(args),
        Some(Command::EchoClient(args)) => echo_client(args),
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

/// The seed's TCP echo example: a listener and a client in one process.
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
        server.await?;
        udp_demo().await
    })?;
    println!("driver: {}", runtime.driver_kind());
    Ok(())
}

/// The seed's UDP echo example: a server socket echoes a message back to the client's
/// port; the client sends through a second socket's output stream.
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
    let mut builder = TlsAcceptor::builder(Identity::from_pem_files(cert, key)?);
    if let Some(ca) = &args.client_ca {
        builder = builder.require_client_certificate(TrustedRoots::from_pem_file(ca)?);
    }
    builder.build().map(Some)
}

fn echo_server(args: EchoServerArgs) -> ringsock::Result<()> {
    let acceptor = tls_acceptor(&args)?;
    let runtime = runtime(&args.backend)?;
    let stop = StopSignal::install()?;
    runtime.block_on(async {
        let listener = match args.tcp {
            Some(addr) => {
                let listener = StreamSocketListener::bind_addr(addr)?;
                println!("listening tcp {}", listener.local_addr()?);
                Some(listener)
            }
            None => None,
        };
        if let Some(addr) = args.udp {
            let socket = DatagramSocket::new();
            socket.bind_addr(addr)?;
            println!("listening udp {}", socket.local_addr()?);
            ringsock::spawn(async move { udp_echo(&socket).await });
        }
        flush_stdout();
        eprintln!("driver: {}", runtime.driver_kind());
        if acceptor.is_some() {
            let clients = match &args.client_ca {
                Some(ca) => format!("client certificates required (CA {})", ca.display()),
                None => "no client certificates".to_owned(),
            };
            eprintln!("tls: on tcp, {clients}");
        }
        let Some(listener) = listener else {
            stop.wait().await;
            return Ok(());
        };
        let serve = async {
            loop {
                match listener.accept().await {
                    Ok(socket) => {
                        let acceptor = acceptor.clone();
                        ringsock::spawn(async move {
                            // The handshake runs in the connection's own task, so a slow
                            // or hostile client holds up nobody else.
                            let served = match &acceptor {
                                Some(acceptor) => match socket.accept_tls(acceptor).await {
                                    Ok(()) => echo_connection(&socket).await,
                                    Err(err) => Err(err),
                                },
                                None => echo_connection(&socket).await,
                            };
                            if let Err(err) = served {
                                eprintln!("connection: {}: {err}", err.status());
                            }
                        });
                    }
                    // One failed accept (say, out of descriptors) must not end the server.
                    Err(err) => eprintln!("accept: {}: {err}", err.status()),
                }
            }
        };
        first_of(serve, stop.wait()).await;
        Ok(())
    })
}

/// Sends every datagram back to its sender, taking every ready datagram at once.
async fn udp_echo(socket: &DatagramSocket) {
    let mut batch = Vec::with_capacity(64);
    loop {
        batch.clear();
        if let Err(err) = socket.recv_batch(&mut batch, 64).await {
            // Per datagram (an ICMP error, say): the socket goes on.
            eprintln!("udp receive: {}: {err}", err.status());
            continue;
        }
        for datagram in batch.drain(..) {
            let to = datagram.remote_addr();
            let (sent, _) = socket.send_to_addr(datagram.to_vec(), to).await;
            if let Err(err) = sent {
                eprintln!("udp send to {to}: {}: {err}", err.status());
            }
        }
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
            return socket.shutdown_write().await;
        }
        let (written, back) = socket.write_all(buf).await;
        buf = back;
        written?;
    }
}

fn echo_client(args: EchoClientArgs) -> ringsock::Result<()> {
    let host = HostName::new(&args.host)?;
    let runtime = runtime(&args.backend)?;
    if args.udp {
        return runtime.block_on(udp_echo_client(&host, &args));
    }
    runtime.block_on(async {
        let socket = StreamSocket::new();
        if args.tls {
            let control = socket.control();
            if let Some(ca) = &args.ca {
                control.set_trusted_roots(TrustedRoots::from_pem_file(ca)?)?;
            }
            if let (Some(cert), Some(key)) = (&args.client_cert, &args.client_key) {
                control.set_client_certificate(Identity::from_pem_files(cert, key)?)?;
            }
        }
        socket.connect(&host, &args.port).await?;
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
        let mut input = socket.input_stream();
        let reply = match input.read_line().await? {
            Some(reply) => reply,
            None => return Err(Error::connection_closed("waiting for the reply")),
        };
        if args.tls {
            close_tls(&socket, &mut input).await;
        }
        println!("{reply}");
        Ok(())
    })
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

/// One datagram to the server; its reply within the timeout, or ConnectionTimedOut.
async fn udp_echo_client(host: &HostName, args: &EchoClientArgs) -> ringsock::Result<()> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(Error::invalid_input(format!(
            "--timeout {} is not a positive number of seconds",
            args.timeout
        )));
    }
    let wait = Duration::from_secs_f64(args.timeout);
    let socket = DatagramSocket::new();
    socket.connect(host, &args.port).await?;
    let (sent, _) = socket.send(args.message.clone().into_bytes()).await;
    sent?;
    let reply = ringsock::runtime::timeout(wait, socket.recv())
        .await
        .map_err(|_| {
            Error::timed_out(format!(
                "no UDP reply from {} within {wait:?}",
                socket
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| host.to_string())
            ))
        })??;
    println!("{}", String::from_utf8_lossy(reply.data()));
    Ok(())
}

fn flush_stdout() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
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
