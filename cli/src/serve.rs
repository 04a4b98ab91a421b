//! `echo-server` on a pool of threads: where its sockets come from (bound here, passed
//! by a service manager, or handed over by the process it replaces), one share of them
//! per thread, and the signals that stop it or hand everything to a new copy of itself
//! (hot restart).

use std::future::{poll_fn, Future};
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use ringsock::net::{self, Detached, SocketKind};
use ringsock::runtime::{Builder, Pool, RemoteJoinHandle};
use ringsock::tls::TlsAcceptor;
use ringsock::{DatagramSocket, Error, SocketErrorStatus, StreamSocketListener, TimeoutCounts};

use crate::conn_limit::ConnectionLimit;
use crate::conn_limit::ServerLimit;
use crate::{
    echo_connection, first_of, flush_stdout, timeouts_line, udp_echo, EchoLogs,
    TIMEOUT_REPORT_EVERY,
};

/// What the signal thread asks of every serving thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    Serve,
    /// SIGINT or SIGTERM: stop at once.
    Stop,
    /// SIGUSR2: hand copies of the sockets to a new process, serving on meanwhile.
    HandOver,
    /// The new process took the sockets and serves: stop taking new work, finish the
    /// open connections.
    HandedOver,
}

/// The process-wide request, with every thread's waker.
struct Control {
    state: Mutex<(Ask, Vec<Waker>)>,
    /// The hand-over channel while this process waits on it (`--inherit`): a stop shuts
    /// it down, since the blocking read it sits in sees no waker.
    taking_over: Mutex<Option<UnixStream>>,
}

impl Control {
    fn new() -> Arc<Control> {
        Arc::new(Control {
            state: Mutex::new((Ask::Serve, Vec::new())),
            taking_over: Mutex::new(None),
        })
    }

    fn set(&self, ask: Ask) {
        let wakers = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.0 = ask;
            std::mem::take(&mut state.1)
        };
        if ask == Ask::Stop {
            let channel = self.taking_over.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(channel) = channel.as_ref() {
                let _ = channel.shutdown(std::net::Shutdown::Read);
            }
        }
        wakers.into_iter().for_each(Waker::wake);
    }

    fn stop_asked(&self) -> bool {
        self.asked() == Ask::Stop
    }

    /// Lets a stop end the wait on the hand-over `channel` (its reads then see the end
    /// of the stream) until [`taken_over`](Self::taken_over).
    fn taking_over(&self, channel: &UnixStream) -> ringsock::Result<()> {
        let watched = channel
            .try_clone()
            .map_err(|err| Error::io("take the handed-over sockets", err))?;
        *self.taking_over.lock().unwrap_or_else(|p| p.into_inner()) = Some(watched);
        // A stop that came before the channel was there to shut down.
        if self.stop_asked() {
            let _ = channel.shutdown(std::net::Shutdown::Read);
        }
        Ok(())
    }

    fn taken_over(&self) {
        self.taking_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Resolves once something other than serving is asked.
    async fn changed(&self) -> Ask {
        self.until(|ask| ask != Ask::Serve).await
    }

    /// Resolves once a stop is asked (also after a hand-over was).
    async fn stopped(&self) {
        self.until(|ask| ask == Ask::Stop).await;
    }

    /// Resolves once this process has no more datagrams to take: the new one took the
    /// sockets, or a stop was asked.
    async fn udp_done(&self) {
        self.until(|ask| matches!(ask, Ask::HandedOver | Ask::Stop))
            .await;
    }

    /// The hand-over asked is over: `HandedOver` once the new process took the sockets,
    /// `Serve` again when it failed. A stop asked meanwhile stays.
    fn hand_over_ended(&self, outcome: Ask) {
        if self.asked() == Ask::HandOver {
            self.set(outcome);
        }
    }

    /// Resolves with the request once `done` says it is the one waited for.
    async fn until(&self, done: impl Fn(Ask) -> bool) -> Ask {
        poll_fn(|cx| {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if done(state.0) {
                return Poll::Ready(state.0);
            }
            if !state.1.iter().any(|w| w.will_wake(cx.waker())) {
                state.1.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    fn asked(&self) -> Ask {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Turns SIGINT/SIGTERM into `Stop` and SIGUSR2 into `HandOver`, on a thread of its
    /// own. A restart the program file cannot make (it was deleted) is refused before
    /// any socket leaves, and the server serves on. A second SIGINT/SIGTERM ends the
    /// process as the signal would: an operator who asks twice means it.
    fn install_signals(self: &Arc<Control>) -> ringsock::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR2])
            .map_err(|err| Error::io("install signal handlers", err))?;
        let control = self.clone();
        std::thread::Builder::new()
            .name("ringsock-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if signal != SIGUSR2 {
                        if control.asked() == Ask::Stop {
                            let _ = signal_hook::low_level::emulate_default_handler(signal);
                        }
                        control.set(Ask::Stop);
                        continue;
                    }
                    if control.asked() != Ask::Serve {
                        continue;
                    }
                    match restart_program() {
                        Ok(_) => control.set(Ask::HandOver),
                        Err(err) => {
                            eprintln!("restart refused: {err}; serving on");
                        }
                    }
                }
            })
            .map_err(|err| Error::io("start the signal thread", err))?;
        Ok(())
    }
}

/// The program a restart starts: this one's file, or after an upgrade replaced it (the
/// running image then reads as "(deleted)"), the new file at its path. No executable
/// file there is an error, found before any socket is handed over.
fn restart_program() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe()?;
    let exe = match exe.as_os_str().as_bytes().strip_suffix(b" (deleted)") {
        Some(path) => std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path)),
        None => exe,
    };
    let not_runnable = |why: String| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no program to restart at {}: {why}", exe.display()),
        )
    };
    let meta = std::fs::metadata(&exe).map_err(|err| not_runnable(err.to_string()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(not_runnable("not an executable file".into()));
    }
    Ok(exe)
}

/// Each thread's timeout counts so far, for the periodic report.
type CountsBoard = Mutex<Vec<TimeoutCounts>>;

/// What every serving thread needs, shared.
pub(crate) struct Settings {
    pub(crate) acceptor: Option<TlsAcceptor>,
    pub(crate) idle_timeout: Option<std::time::Duration>,
    pub(crate) write_timeout: Option<std::time::Duration>,
    /// Connections the server (all its threads) serves at once.
    pub(crate) connections: ServerLimit,
    /// Echoes a second per UDP source address (0: no limit).
    pub(crate) udp_rate: u32,
}

/// One thread's share of the sockets.
#[derive(Default)]
struct Share {
    listeners: Vec<Detached>,
    datagrams: Vec<Detached>,
}

/// What a serving thread gives back: its timeout counts.
struct Served {
    counts: TimeoutCounts,
}

/// Where the sockets come from, and the command line to restart with.
pub(crate) struct Start {
    pub(crate) tcp: Option<SocketAddr>,
    pub(crate) udp: Option<SocketAddr>,
    pub(crate) threads: usize,
    /// The channel the process being replaced hands its sockets over on.
    pub(crate) inherit: Option<RawFd>,
    /// Sockets must come from a service manager (`--activated`).
    pub(crate) activated: bool,
    pub(crate) runtime: Builder,
}

/// Runs the echo server until SIGINT/SIGTERM (exits 0), or until SIGUSR2 has handed
/// every socket to a new copy of this process and the open connections have ended.
pub(crate) fn run(start: Start, settings: Settings) -> ringsock::Result<()> {
    // The passed descriptors are claimed before this process opens any of its own: a
    // LISTEN_FDS naming more than were passed then finds them closed, instead of taking
    // (and closing) the signal thread's.
    let inherited = start.inherit.map(unix_stream_from).transpose()?;
    let activated = match inherited {
        Some(_) => Vec::new(),
        None => net::activated_sockets()?,
    };
    let control = Control::new();
    control.install_signals()?;
    let (sockets, lines, handed_over_on) = match sockets(&start, activated, inherited, &control) {
        Ok(found) => found,
        // SIGINT or SIGTERM while waiting for the sockets ended the wait: a stop, as
        // asked, not a failure.
        Err(_) if control.stop_asked() => return Ok(()),
        Err(err) => return Err(err),
    };
    let threads = start.threads.max(1);
    POOL_THREADS.store(threads, std::sync::atomic::Ordering::Release);
    let mut shares: Vec<Share> = (0..threads).map(|_| Share::default()).collect();
    let listens = sockets
        .iter()
        .any(|socket| socket.kind() == SocketKind::Listener);
    for (i, socket) in sockets.into_iter().enumerate() {
        let share = &mut shares[i % threads];
        match socket.kind() {
            SocketKind::Listener => share.listeners.push(socket),
            SocketKind::Datagram => share.datagrams.push(socket),
            SocketKind::Stream => {
                return Err(Error::invalid_input(
                    "an echo server is given listeners and datagram sockets, not connections",
                ))
            }
        }
    }
    let pool = Pool::builder()
        .threads(threads)
        .runtime(start.runtime.clone())
        .build()?;
    let settings = Arc::new(settings);
    let board: Arc<CountsBoard> = Arc::new(Mutex::new(vec![TimeoutCounts::default(); threads]));
    let (ready, adopted) = std::sync::mpsc::channel::<()>();
    let handle = pool.handle();
    let servers: Vec<RemoteJoinHandle<ringsock::Result<Served>>> = shares
        .into_iter()
        .enumerate()
        .map(|(thread, share)| {
            let settings = settings.clone();
            let control = control.clone();
            let board = board.clone();
            let ready = ready.clone();
            handle.spawn_on(thread, move || {
                serve_thread(thread, share, settings, control, board, ready)
            })
        })
        .collect::<ringsock::Result<_>>()?;
    drop(ready);
    // Everything the server holds for its whole life is open before it says it listens.
    let main = Builder::new().backend(ringsock::Backend::Epoll).build()?;
    // Ready once every thread has its sockets: then say where it listens.
    let all_ready = (0..threads).all(|_| adopted.recv().is_ok());
    // Only a TCP server takes connections: a UDP one needs no descriptor beyond its own.
    let few_spare = spare_descriptors().filter(|(spare, _)| listens && *spare < FEW_SPARE);
    if let Some((spare, limit)) = few_spare {
        // With none to spare a listener never takes a connection (nothing it holds can
        // come free before it has one), and would only log failed accepts for ever.
        if spare == 0 {
            return Err(Error::io(
                format!(
                    "serve tcp: no descriptor is left for connections (the limit is \
                     {limit}): raise it (ulimit -n)"
                ),
                std::io::Error::from_raw_os_error(libc::EMFILE),
            ));
        }
        // It serves, accepting as descriptors come free; but with few to spare it
        // serves few at once, and the log alone would not say why.
        let descriptors = if spare == 1 {
            "descriptor is"
        } else {
            "descriptors are"
        };
        eprintln!(
            "warning: only {spare} {descriptors} left for connections (the limit is \
             {limit}): raise it (ulimit -n) to serve more than a few at once"
        );
    }
    if all_ready {
        // The process this one replaces serves until told: it stops taking new work now.
        if let Some(channel) = &handed_over_on {
            let _ = (&*channel).write_all(&[SERVING]);
        }
        // A closed stdout (a supervisor that stopped reading, say) must not stop the
        // server: the lines are for whoever listens.
        let mut stdout = std::io::stdout().lock();
        for line in &lines {
            let _ = writeln!(stdout, "{line}");
        }
        drop(stdout);
        flush_stdout();
    }
    main.block_on(async {
        let mut counts = TimeoutCounts::default();
        let mut failure = None;
        let report = report_timeouts(&board);
        let mut report = std::pin::pin!(report);
        for server in servers {
            let server = std::pin::pin!(server);
            let mut server = server;
            let result = poll_fn(|cx| {
                let _ = report.as_mut().poll(cx);
                server.as_mut().poll(cx)
            })
            .await;
            match result.and_then(|served| served) {
                Ok(served) => {
                    add(&mut counts, served.counts);
                }
                Err(err) => failure = Some(err),
            }
        }
        if listens {
            eprintln!("{}", timeouts_line(counts));
        }
        stop_a_restart_under_way();
        match failure {
            Some(err) => Err(err),
            None => Ok(()),
        }
    })
}

/// A hot restart in progress: the new process started and not yet serving, or the stop
/// that came first.
#[derive(Default)]
struct Restarting {
    /// The new process, until it says it serves.
    child: Option<u32>,
    /// This process is ending: no new process may start.
    stopping: bool,
}

static RESTARTING: Mutex<Restarting> = Mutex::new(Restarting {
    child: None,
    stopping: false,
});

fn restarting() -> std::sync::MutexGuard<'static, Restarting> {
    RESTARTING.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process ends (a stop, SIGTERM say, came during a hot restart): a new process
/// whose hand-over this one has not confirmed yet (it may have just said it serves) is
/// stopped too, and none starts after this; the stop asked of this server is the whole
/// server's. One whose hand-over was confirmed is the server now, as the
/// `restart: handed ...` line said.
fn stop_a_restart_under_way() {
    let mut restart = restarting();
    restart.stopping = true;
    if let Some(pid) = restart.child.take() {
        let pid_t = libc::pid_t::try_from(pid).unwrap_or(0);
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's,
        // not yet reaped (its restart thread waits on it only after this).
        if pid_t > 0 && unsafe { libc::kill(pid_t, libc::SIGTERM) } == 0 {
            eprintln!(
                "restart: stopped with this process, before the hand-over was done: process {pid}"
            );
        }
    }
}

/// The sockets to serve: handed over by the process this one replaces, passed by a
/// service manager, or bound here (one SO_REUSEPORT member per thread).
fn sockets(
    start: &Start,
    activated: Vec<net::Activated>,
    inherited: Option<UnixStream>,
    control: &Control,
) -> ringsock::Result<(Vec<Detached>, Vec<String>, Option<UnixStream>)> {
    let mut channel = None;
    let sockets = if let Some(inherited) = inherited {
        let (sockets, from) = take_over(inherited, control)?;
        channel = Some(from);
        sockets
    } else {
        if activated.is_empty() && start.activated {
            return Err(Error::invalid_input(
                "--activated: no sockets were passed (LISTEN_FDS and LISTEN_PID name none for this process)",
            ));
        }
        if !activated.is_empty() && (start.tcp.is_some() || start.udp.is_some()) {
            eprintln!(
                "note: serving the {} sockets passed at start, not --tcp/--udp",
                activated.len()
            );
        }
        if activated.is_empty() {
            let mut sockets = Vec::new();
            let threads = start.threads.max(1);
            // Exclusive: a second echo server started on a port one already serves must
            // fail, not join its SO_REUSEPORT group and take part of its clients.
            if let Some(addr) = start.tcp {
                sockets
                    .extend(net::bind_reuse_port_exclusive(addr, threads, SocketKind::Listener)?.1);
            }
            if let Some(addr) = start.udp {
                sockets
                    .extend(net::bind_reuse_port_exclusive(addr, threads, SocketKind::Datagram)?.1);
            }
            sockets
        } else {
            for passed in &activated {
                refuse_unbound_datagram(&passed.socket)?;
            }
            activated.into_iter().map(|a| a.socket).collect()
        }
    };
    // One line per address, not per SO_REUSEPORT member.
    let mut lines = Vec::new();
    for socket in &sockets {
        let line = listening_line(socket)?;
        if !lines.contains(&line) {
            lines.push(line);
        }
    }
    Ok((sockets, lines, channel))
}

/// A UDP socket passed without a port can receive nothing: served, it would say
/// `listening udp 0.0.0.0:0` and never echo a datagram.
fn refuse_unbound_datagram(socket: &Detached) -> ringsock::Result<()> {
    if socket.kind() != SocketKind::Datagram {
        return Ok(());
    }
    let local = socket2::SockRef::from(socket)
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_socket());
    match local {
        Some(addr) if addr.port() != 0 => Ok(()),
        _ => Err(Error::invalid_input(format!(
            "--activated: a UDP socket passed (descriptor {}) is bound to no port: it can \
             receive nothing",
            std::os::fd::AsRawFd::as_raw_fd(socket)
        ))),
    }
}

/// Fewer spare descriptors than this at start-up get a warning.
const FEW_SPARE: u64 = 8;

/// Descriptors this process may still open, and its limit (RLIMIT_NOFILE's soft
/// value); None where /proc does not say or there is no limit.
fn spare_descriptors() -> Option<(u64, u64)> {
    // From the kernel, not /proc/self/limits: reading a file takes a descriptor, and with
    // none to spare that is exactly what fails.
    let mut limits = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limits) } != 0
        || limits.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let limit = limits.rlim_cur;
    let open = match std::fs::read_dir("/proc/self/fd") {
        // The directory listing itself holds one descriptor while it counts.
        Ok(entries) => (entries.count() as u64).saturating_sub(1),
        // Not even one to open the listing with.
        Err(err) if err.raw_os_error() == Some(libc::EMFILE) => limit,
        Err(_) => return None,
    };
    Some((limit.saturating_sub(open), limit))
}

/// `listening KIND ADDR`, which the server prints once it serves on the socket.
fn listening_line(socket: &Detached) -> ringsock::Result<String> {
    let local = socket2::SockRef::from(socket)
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_socket())
        .ok_or_else(|| Error::invalid_input("a socket to serve has no IP address"))?;
    let kind = if socket.kind() == SocketKind::Datagram {
        "udp"
    } else {
        "tcp"
    };
    Ok(format!("listening {kind} {local}"))
}

/// Most sockets a hot restart hands over: a listener and a datagram socket for each of
/// at most 1024 threads, or the sockets activation passed (at most 1024), with room to
/// spare.
const MAX_HANDED_OVER: usize = 8192;

/// Takes the sockets the process being replaced sends over `fd`: a count, then each.
/// A stop asked meanwhile ends the wait with an error.
fn take_over(
    channel: UnixStream,
    control: &Control,
) -> ringsock::Result<(Vec<Detached>, UnixStream)> {
    control.taking_over(&channel)?;
    let taken = take_over_from(&channel);
    control.taken_over();
    Ok((taken?, channel))
}

fn take_over_from(channel: &UnixStream) -> ringsock::Result<Vec<Detached>> {
    // The parent writes the whole hand-over at once: one that stalls half-way must not
    // leave this copy waiting for ever, holding what it took.
    channel
        .set_read_timeout(Some(HAND_OVER_WITHIN))
        .map_err(|err| Error::io("take the handed-over sockets", err))?;
    let mut count = [0u8; 4];
    std::io::Read::read_exact(&mut &*channel, &mut count).map_err(|err| {
        if matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            Error::timed_out(format!(
                "--inherit: the process being replaced sent no sockets within {} s",
                HAND_OVER_WITHIN.as_secs()
            ))
        } else {
            Error::io("take the handed-over sockets", err)
        }
    })?;
    let count = u32::from_le_bytes(count) as usize;
    // A count of none would leave a server running with nothing to serve.
    if count == 0 {
        return Err(Error::invalid_input(
            "--inherit: the channel announced no sockets: nothing to serve",
        ));
    }
    // The count comes from the other end of the channel: never an allocation of its size.
    if count > MAX_HANDED_OVER {
        return Err(Error::invalid_input(format!(
            "--inherit: the channel announced {count} sockets, more than a server hands over"
        )));
    }
    let taken = (0..count).map(|_| net::recv_detached(channel)).collect();
    // The channel stays open to say SERVING and to hand over again: its later waits are
    // bounded where they happen.
    channel
        .set_read_timeout(None)
        .map_err(|err| Error::io("take the handed-over sockets", err))?;
    taken
}

/// How long the copy a hot restart starts waits for each part of the hand-over: the
/// process being replaced sends it as soon as the copy runs.
const HAND_OVER_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Claims the hand-over channel `--inherit` names, before this process opens anything
/// of its own: only a Unix stream socket past the standard streams is taken, so a wrong
/// number can neither take a descriptor of this process nor close stderr.
fn unix_stream_from(fd: RawFd) -> ringsock::Result<UnixStream> {
    let refuse = |why: &str| {
        Err(Error::invalid_input(format!(
            "--inherit: descriptor {fd} {why}; it is the hand-over channel an echo server \
             passes to the copy it starts on SIGUSR2, not an option to set by hand"
        )))
    };
    if fd < 0 {
        return refuse("is no descriptor number");
    }
    if fd <= libc::STDERR_FILENO {
        return refuse("is a standard stream");
    }
    // SAFETY: fcntl on any number is harmless; it tells whether the number is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return refuse("is not open");
    }
    // SAFETY: the descriptor is open (checked above) and only borrowed for the two
    // reads below, while nothing can close it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&borrowed);
    let is_unix_stream = socket.domain().is_ok_and(|d| d == socket2::Domain::UNIX)
        && socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM);
    if !is_unix_stream {
        return refuse("is not a Unix stream socket");
    }
    // SAFETY: the process being replaced passed this descriptor to this one for the
    // hand-over alone: open, a Unix stream socket (checked above), claimed before this
    // process opened any descriptor of its own, so nothing else here owns it.
    let channel = unsafe { UnixStream::from_raw_fd(fd) };
    Ok(channel)
}

/// Keeps `fd` open in the child that `command` starts (close-on-exec cleared there only).
fn keep_open_across_exec(command: &mut std::process::Command, fd: RawFd) {
    // SAFETY: the hook calls only fcntl, which is async-signal-safe, as a pre_exec hook
    // must be.
    unsafe {
        command.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn add(total: &mut TimeoutCounts, counts: TimeoutCounts) {
    total.connect += counts.connect;
    total.idle += counts.idle;
    total.read += counts.read;
    total.write += counts.write;
    total.handshake += counts.handshake;
    total.close += counts.close;
}

/// One thread: adopts its share, echoes on it until asked to stop or to hand over.
async fn serve_thread(
    thread: usize,
    share: Share,
    settings: Arc<Settings>,
    control: Arc<Control>,
    board: Arc<CountsBoard>,
    ready: std::sync::mpsc::Sender<()>,
) -> ringsock::Result<Served> {
    let logs = EchoLogs::new();
    let listeners: Vec<StreamSocketListener> = share
        .listeners
        .into_iter()
        .map(Detached::into_listener)
        .collect::<ringsock::Result<_>>()?;
    for listener in &listeners {
        let control = listener.control();
        control.set_idle_timeout(settings.idle_timeout)?;
        control.set_write_timeout(settings.write_timeout)?;
    }
    let datagrams: Vec<std::rc::Rc<DatagramSocket>> = share
        .datagrams
        .into_iter()
        .map(|socket| socket.into_datagram().map(std::rc::Rc::new))
        .collect::<ringsock::Result<_>>()?;
    let udp_tasks: Vec<_> = datagrams
        .iter()
        .map(|socket| {
            let socket = socket.clone();
            let log = logs.udp.clone();
            let udp_rate = settings.udp_rate;
            let control = control.clone();
            ringsock::spawn(
                async move { udp_echo(&socket, &log, udp_rate, control.udp_done()).await },
            )
        })
        .collect();
    if thread == 0 {
        if let Some(reason) = ringsock::runtime::current_fallback_reason() {
            eprintln!("note: {reason}");
        }
        if let Some(kind) = ringsock::runtime::current_driver_kind() {
            eprintln!("driver: {kind}");
        }
    }
    let _ = ready.send(());
    let open = ConnectionLimit::new(&settings.connections);
    // Clients accepted while the server was full, waiting for a slot: here, not in the
    // accept loops, which a hand-over or a stop drops.
    let parked = Parked::default();
    let publish = || async {
        loop {
            ringsock::runtime::sleep(TIMEOUT_REPORT_EVERY / 2).await;
            let mut counts = TimeoutCounts::default();
            for listener in &listeners {
                add(&mut counts, listener.control().timeout_counts());
            }
            board.lock().unwrap_or_else(|p| p.into_inner())[thread] = counts;
        }
    };
    // Serves until asked otherwise: accept loops never end, and a thread with none
    // (UDP only) waits here while its datagram tasks run. A hand-over that failed
    // comes back here: the server serves on.
    let accepting = || async {
        let loops = listeners
            .iter()
            .map(|listener| accept_loop(listener, &settings, &open, &parked, &logs));
        join_all(loops).await;
        std::future::pending::<()>().await
    };
    loop {
        let mut asked = Ask::Stop;
        first_of(first_of(accepting(), publish()), async {
            asked = control.changed().await;
        })
        .await;
        if asked != Ask::HandOver {
            break;
        }
        // Copies go to the new process; these stay and serve (connections accepted
        // too) until it says it serves, however long it takes to start, or fails.
        hand_over_from(copies_of(&listeners, &datagrams), &control);
        let mut outcome = Ask::Stop;
        first_of(first_of(accepting(), publish()), async {
            outcome = control.until(|ask| ask != Ask::HandOver).await;
        })
        .await;
        match outcome {
            Ask::Serve => continue,
            Ask::HandedOver => {
                // Its datagram tasks end at their next wait: no batch is cut.
                for task in udp_tasks {
                    task.await;
                }
                for socket in &datagrams {
                    echo_what_the_ring_holds(socket, &logs, settings.udp_rate).await;
                }
                serve_parked(&parked, &settings, &open, &logs).await;
                for listener in &listeners {
                    serve_what_was_accepted(listener, &settings, &open, &logs).await;
                }
                // Serve what was accepted before the hand-over to its end: those
                // connections are this process's. A stop ends that too.
                first_of(open.wait_idle(), control.stopped()).await;
            }
            _ => {}
        }
        break;
    }
    let mut counts = TimeoutCounts::default();
    for listener in &listeners {
        add(&mut counts, listener.control().timeout_counts());
    }
    logs.flush();
    Ok(Served { counts })
}

/// A copy of each socket (a new descriptor for it) to hand over, while these serve on.
fn copies_of(
    listeners: &[StreamSocketListener],
    datagrams: &[std::rc::Rc<DatagramSocket>],
) -> ringsock::Result<Vec<Detached>> {
    let fds = listeners
        .iter()
        .map(|listener| listener.as_fd())
        .chain(datagrams.iter().map(|socket| socket.as_fd()));
    fds.map(|fd| {
        let copy = fd
            .try_clone_to_owned()
            .map_err(|err| Error::io("copy a socket to hand over", err))?;
        Detached::from_fd(copy)
    })
    .collect()
}

/// Once the new process serves: the datagrams this socket's receive ring took from
/// the kernel and nobody echoed yet are echoed here before the socket closes (the
/// kernel's queue, shared with the new process, is its to read).
async fn echo_what_the_ring_holds(socket: &DatagramSocket, logs: &EchoLogs, udp_rate: u32) {
    let Ok(mut detached) = socket.detach() else {
        return;
    };
    // Each adoption may take a few more from the kernel before it is detached again;
    // the new process reads the same queue, so this ends within a few rounds.
    for _ in 0..8 {
        let carried = detached.carried_datagrams();
        if carried == 0 {
            return;
        }
        let Ok(adopted) = detached.into_datagram() else {
            return;
        };
        let mut echo = crate::UdpEcho::new(&adopted, &logs.udp, udp_rate);
        for _ in 0..carried {
            let wait = std::time::Duration::from_secs(1);
            match ringsock::runtime::timeout(wait, adopted.recv()).await {
                Ok(Ok(datagram)) => echo.reply(datagram, std::time::Instant::now()).await,
                _ => break,
            }
        }
        match adopted.detach() {
            Ok(again) => detached = again,
            Err(_) => return,
        }
    }
}

/// Once the new process serves: the connections this listener had taken from the
/// kernel's queue and not handed to the accept loop yet are served here (closing the
/// listener would reset them); the queue itself is the new process's.
async fn serve_what_was_accepted(
    listener: &StreamSocketListener,
    settings: &Settings,
    open: &ConnectionLimit,
    logs: &EchoLogs,
) {
    let Ok(detached) = listener.detach() else {
        return;
    };
    let accepted = detached.accepted_count();
    if accepted == 0 {
        return;
    }
    let Ok(adopted) = detached.into_listener() else {
        return;
    };
    for _ in 0..accepted {
        let slot = open.acquire().await;
        match adopted.accept().await {
            Ok(socket) => serve_connection(socket, settings, slot, logs),
            Err(_) => return,
        }
    }
}

/// Copies of every thread's sockets, gathered until each thread has given its share
/// (or failed to copy it).
struct Gathering {
    sockets: Vec<Detached>,
    threads: usize,
    failure: Option<Error>,
}

static HANDED: Mutex<Gathering> = Mutex::new(Gathering {
    sockets: Vec::new(),
    threads: 0,
    failure: None,
});

/// Adds one thread's copies; the last thread to arrive has the new process started and
/// the copies sent, on a thread of its own (the pool's threads serve on meanwhile),
/// which says how it ended through `control`.
fn hand_over_from(copies: ringsock::Result<Vec<Detached>>, control: &Arc<Control>) {
    let threads = POOL_THREADS.load(std::sync::atomic::Ordering::Acquire);
    let all = {
        let mut gathering = HANDED.lock().unwrap_or_else(|p| p.into_inner());
        match copies {
            Ok(mut copies) => gathering.sockets.append(&mut copies),
            Err(err) => {
                gathering.failure.get_or_insert(err);
            }
        }
        gathering.threads += 1;
        if gathering.threads < threads {
            return;
        }
        let failure = gathering.failure.take();
        gathering.threads = 0;
        (std::mem::take(&mut gathering.sockets), failure)
    };
    let control_here = control.clone();
    let restart = move || {
        let (sockets, failure) = all;
        let outcome = match failure {
            Some(err) => Err(err),
            None => restart_with(sockets),
        };
        match outcome {
            Ok(()) => control_here.hand_over_ended(Ask::HandedOver),
            Err(err) => {
                eprintln!("restart failed: {err}; serving on");
                control_here.hand_over_ended(Ask::Serve);
            }
        }
    };
    let started = std::thread::Builder::new()
        .name("ringsock-restart".into())
        .spawn(restart);
    if let Err(err) = started {
        eprintln!("restart failed: start its thread: {err}; serving on");
        control.hand_over_ended(Ask::Serve);
    }
}

/// How many threads serve, for the hand-over to know when every one has given its
/// sockets.
pub(crate) static POOL_THREADS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(1);

/// Starts a new copy of this process with the same arguments and hands it `sockets`.
fn restart_with(sockets: Vec<Detached>) -> ringsock::Result<()> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|err| Error::io("make the hand-over channel", err))?;
    let theirs_fd = theirs.as_raw_fd();
    let exe = restart_program().map_err(|err| Error::io("find this program", err))?;
    // As the OS holds them: a path that is not UTF-8 (a --tls-cert, the program's own
    // directory) is a valid argument, and `env::args` would panic on it.
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|arg| !arg.as_bytes().starts_with(b"--inherit"))
        .collect();
    let mut command = std::process::Command::new(exe);
    command.args(&args).arg(format!("--inherit={theirs_fd}"));
    keep_open_across_exec(&mut command, theirs_fd);
    let mut child = {
        // Under the lock: a stop either comes first (no process starts) or finds it.
        let mut restart = restarting();
        if restart.stopping {
            return Err(Error::connection_closed(
                "start the new server: this one is stopping",
            ));
        }
        let child = command
            .spawn()
            .map_err(|err| Error::io("start the new server", err))?;
        restart.child = Some(child.id());
        child
    };
    drop(theirs);
    let count = u32::try_from(sockets.len()).unwrap_or(u32::MAX);
    let handed = sockets.len();
    // Every failure from here on goes through the same end: the new process is killed
    // and reaped, and forgotten as a restart under way.
    let sent = std::io::Write::write_all(&mut &ours, &count.to_le_bytes())
        .map_err(|err| Error::io("hand the sockets over", err))
        .and_then(|()| {
            sockets
                .iter()
                .try_for_each(|socket| net::send_detached(&ours, socket))
        });
    let ready = sent.and_then(|()| wait_until_serving(&ours));
    let mut restart = restarting();
    if restart.child.take().is_none() {
        // A stop came first and stopped it (see stop_a_restart_under_way).
        drop(restart);
        let _ = child.wait();
        return Err(Error::connection_closed(
            "the new server was stopped with this one",
        ));
    }
    if let Err(err) = ready {
        drop(restart);
        // It never said it serves: it must not serve beside this process either.
        let _ = child.kill();
        let _ = child.wait();
        return Err(err);
    }
    // Said under the lock: a stop that comes now waits for the line, and leaves the new
    // process, which is the server from here on, alone.
    eprintln!("restart: handed {handed} sockets to process {}", child.id());
    Ok(())
}

/// What the new process sends once every one of its threads serves.
const SERVING: u8 = b'S';

/// How long the new process may take to start and serve.
const START_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for the new process to say it serves ([`SERVING`]), at most [`START_WITHIN`].
fn wait_until_serving(channel: &UnixStream) -> ringsock::Result<()> {
    channel
        .set_read_timeout(Some(START_WITHIN))
        .map_err(|err| Error::io("wait for the new server", err))?;
    let mut said = [0u8; 1];
    match std::io::Read::read(&mut &*channel, &mut said) {
        Ok(1) if said[0] == SERVING => Ok(()),
        Ok(_) => Err(Error::connection_closed(
            "the new server ended before it served",
        )),
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Err(Error::timed_out(format!(
            "the new server did not serve within {START_WITHIN:?}"
        ))),
        Err(err) => Err(Error::io("wait for the new server", err)),
    }
}

/// Prints the whole server's timeout counts every [`TIMEOUT_REPORT_EVERY`] while they
/// change: one line however many connections expired, on however many threads.
async fn report_timeouts(board: &CountsBoard) {
    let mut reported = TimeoutCounts::default();
    loop {
        ringsock::runtime::sleep(TIMEOUT_REPORT_EVERY).await;
        let mut total = TimeoutCounts::default();
        for counts in board.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            add(&mut total, *counts);
        }
        if total != reported {
            eprintln!("{}", timeouts_line(total));
            reported = total;
        }
    }
}

/// Accepts and serves connections on `listener` until the task is dropped.
async fn accept_loop(
    listener: &StreamSocketListener,
    settings: &Settings,
    open: &ConnectionLimit,
    parked: &Parked,
    logs: &EchoLogs,
) {
    loop {
        // Clients an earlier loop accepted and left waiting go first.
        serve_parked(parked, settings, open, logs).await;
        if let Some(limit) = open.full() {
            logs.limit.line(format!(
                "{limit} served (--max-connections); new ones wait until one ends"
            ));
        }
        // A slot is taken once a client is there: this loop's thread may be the one the
        // kernel gives no client for a while.
        open.room().await;
        match listener.accept().await {
            Ok(socket) => {
                parked.borrow_mut().push_back(socket);
                serve_parked(parked, settings, open, logs).await;
            }
            // One failed accept (say, out of descriptors) must not end the server; the
            // listener waits before the next attempt, so this cannot spin.
            Err(err) => logs.accept.line(format!("{}: {err}", err.status())),
        }
    }
}

/// Accepted clients waiting for a slot, oldest first.
type Parked = std::cell::RefCell<std::collections::VecDeque<ringsock::StreamSocket>>;

/// Serves the parked clients as slots come free. A client leaves `parked` only with its
/// slot taken, so a wait dropped half-way (a hand-over, a stop) leaves it there.
async fn serve_parked(
    parked: &Parked,
    settings: &Settings,
    open: &ConnectionLimit,
    logs: &EchoLogs,
) {
    while !parked.borrow().is_empty() {
        let slot = open.acquire().await;
        let socket = parked.borrow_mut().pop_front();
        match socket {
            Some(socket) => serve_connection(socket, settings, slot, logs),
            // Another loop of this thread took it meanwhile.
            None => drop(slot),
        }
    }
}

/// Echoes on `socket` in a task of its own, holding `slot` until the connection ends.
fn serve_connection(
    socket: ringsock::StreamSocket,
    settings: &Settings,
    slot: crate::conn_limit::Slot,
    logs: &EchoLogs,
) {
    let acceptor = settings.acceptor.clone();
    let log = logs.connection.clone();
    ringsock::spawn(async move {
        // The handshake runs in the connection's own task, so a slow or hostile client
        // holds up nobody else.
        let served = match &acceptor {
            Some(acceptor) => match socket.accept_tls(acceptor).await {
                Ok(()) => echo_connection(&socket).await,
                Err(err) => Err(err),
            },
            None => echo_connection(&socket).await,
        };
        drop(socket);
        drop(slot);
        match served {
            // Counted on the listener, reported in bulk.
            Err(err) if err.status() == SocketErrorStatus::ConnectionTimedOut => {}
            Err(err) => log.line(format!("{}: {err}", err.status())),
            Ok(()) => {}
        }
    });
}

/// Polls every future until all are done.
async fn join_all<F: Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut futures: Vec<_> = futures.map(Box::pin).map(Some).collect();
    poll_fn(|cx| {
        for slot in futures.iter_mut() {
            if let Some(future) = slot {
                if future.as_mut().poll(cx).is_ready() {
                    *slot = None;
                }
            }
        }
        if futures.iter().all(Option::is_none) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}
