//! The socket broker from the outside: `echo-server` started by socket activation serves
//! the sockets it was given, and a hot restart (SIGUSR2) hands every listening socket to
//! a new copy of the server while clients keep connecting: none refused, none reset.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use util::echo_server::EchoServer;
use util::MUST_HAPPEN;

const BACKENDS: [&str; 2] = ["uring", "epoll"];

/// Reads exactly `buf.len()` bytes, trying again after EINTR.
fn read_all(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match stream.read(&mut buf[at..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// One connection: connect, send a line, read it back, close.
fn one_echo(addr: SocketAddr, line: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(MUST_HAPPEN))?;
    stream.write_all(line)?;
    let mut back = vec![0u8; line.len()];
    read_all(&mut stream, &mut back)?;
    if back != line {
        return Err(std::io::Error::other("the echo differs"));
    }
    Ok(())
}

#[test]
fn an_activated_echo_server_serves_descriptors_3_and_4() {
    for backend in BACKENDS {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (tcp_addr, udp_addr) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
        let (tcp_fd, udp_fd) = (tcp.as_raw_fd(), udp.as_raw_fd());
        let mut command = Command::new("sh");
        command
            .args(["-c", "LISTEN_PID=$$ LISTEN_FDS=2 exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_ringsock"))
            .args(["echo-server", "--activated", "--backend", backend])
            .env_remove("RINGSOCK_BACKEND")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: dup and dup2 are async-signal-safe, as a pre_exec hook must be.
        unsafe {
            command.pre_exec(move || {
                // Through spare numbers first, in case the sources sit on 3 or 4.
                let (a, b) = (libc::dup(tcp_fd), libc::dup(udp_fd));
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        drop((tcp, udp));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut said: Vec<String> = (0..2).map(|_| lines.next().unwrap().unwrap()).collect();
        said.sort();
        assert_eq!(
            said,
            [
                format!("listening tcp {tcp_addr}"),
                format!("listening udp {udp_addr}")
            ],
            "{backend}"
        );
        one_echo(tcp_addr, b"activated\n").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(MUST_HAPPEN)).unwrap();
        client.send_to(b"datagram", udp_addr).unwrap();
        let mut buf = [0u8; 16];
        let n = loop {
            match client.recv(&mut buf) {
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other.unwrap(),
            }
        };
        assert_eq!(&buf[..n], b"datagram", "{backend}");
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert!(child.wait().unwrap().success(), "{backend}");
    }
}

/// A UDP socket passed unbound (port 0) is refused: served, it would receive nothing.
#[test]
fn an_activated_udp_socket_bound_to_no_port_is_refused() {
    let unbound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    let fd = unbound.as_raw_fd();
    for backend in BACKENDS {
        let mut command = activated_server(1, fd, backend);
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
        assert!(
            stderr.contains("bound to no port") && !stderr.contains("panicked"),
            "{backend}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{backend}: it said it listens");
    }
}

#[test]
fn activated_without_sockets_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(["echo-server", "--activated"])
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("InvalidArgument") && stderr.contains("LISTEN_FDS"),
        "{stderr}"
    );
}

/// `--inherit` on a channel whose other end lies (a count of 4 billion sockets, then
/// nothing; a count of one, then garbage; a count of none, which once left the server
/// running silently with nothing to serve): a clear error and exit 1, never an abort
/// (the count once sized an allocation of 378 GB) or a hang.
#[test]
fn a_lying_hand_over_channel_is_a_clear_error() {
    for backend in BACKENDS {
        for (message, expected) in [
            (
                u32::MAX.to_le_bytes().to_vec(),
                "announced 4294967295 sockets",
            ),
            (
                [&1u32.to_le_bytes()[..], b"garbage!!"].concat(),
                "not a ringsock",
            ),
            (vec![0u8; 64], "announced no sockets"),
        ] {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            (&ours).write_all(&message).unwrap();
            drop(ours);
            // A copy that, unlike its source, is not close-on-exec: the server inherits it.
            // SAFETY: dup only makes a new descriptor (or fails with -1, checked below).
            let inherited = unsafe { libc::dup(theirs.as_raw_fd()) };
            assert!(inherited >= 0, "dup: {}", std::io::Error::last_os_error());
            // SAFETY: just made above, owned by nothing else.
            let inherited = unsafe { std::os::fd::OwnedFd::from_raw_fd(inherited) };
            let out = util::output_within(
                Command::new(env!("CARGO_BIN_EXE_ringsock"))
                    .args(["echo-server", "--tcp", "127.0.0.1:0", "--backend", backend])
                    .arg(format!("--inherit={}", inherited.as_raw_fd()))
                    .env_remove("RINGSOCK_BACKEND")
                    .stdin(Stdio::null()),
            );
            drop((inherited, theirs));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
            assert!(
                stderr.contains(expected) && !stderr.contains("panicked"),
                "{backend}: {stderr}"
            );
        }
    }
}

/// `--inherit` naming a descriptor that is no hand-over channel (a standard stream, one
/// not open, a file, a UDP socket) is refused with a clear error before the server opens
/// anything of its own: it can neither take its own signal pipe and wait there for ever
/// nor close stderr and die without a word.
#[test]
fn inherit_of_a_descriptor_that_is_no_hand_over_channel_is_refused() {
    let file = std::fs::File::open(env!("CARGO_BIN_EXE_ringsock")).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let passed = [file.as_raw_fd(), udp.as_raw_fd()];
    for backend in BACKENDS {
        for (fd, expected) in [
            (0, "is a standard stream"),
            (1, "is a standard stream"),
            (2, "is a standard stream"),
            (-5, "is no descriptor number"),
            (900, "is not open"),
            (passed[0], "is not a Unix stream socket"),
            (passed[1], "is not a Unix stream socket"),
        ] {
            let mut command = Command::new(env!("CARGO_BIN_EXE_ringsock"));
            command
                .args(["echo-server", "--tcp", "127.0.0.1:0", "--backend", backend])
                .arg(format!("--inherit={fd}"))
                .env_remove("RINGSOCK_BACKEND")
                .stdin(Stdio::null());
            // SAFETY: the hook calls only fcntl, async-signal-safe as pre_exec requires.
            unsafe {
                command.pre_exec(move || {
                    for fd in passed {
                        libc::fcntl(fd, libc::F_SETFD, 0);
                    }
                    Ok(())
                });
            }
            let mut child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + MUST_HAPPEN;
            while child.try_wait().unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "{backend} fd {fd}: still running"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{backend} fd {fd}: {stderr}");
            assert!(
                stderr.contains(expected) && !stderr.contains("panicked"),
                "{backend} fd {fd}: {stderr}"
            );
        }
    }
}

/// A launcher whose LISTEN_FDS names more descriptors than it passed: the server says
/// which one is missing and exits 1. It claims them before it opens descriptors of its
/// own, so it cannot take (and close) its signal thread's for a passed one.
#[test]
fn activated_with_fewer_descriptors_than_listen_fds_says_which_is_missing() {
    for backend in BACKENDS {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_fd = tcp.as_raw_fd();
        let mut command = activated_server(3, tcp_fd, backend);
        let out = command.output().unwrap();
        drop(tcp);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
        assert!(
            stderr.contains("descriptor 4, which is not open") && !stderr.contains("panicked"),
            "{backend}: {stderr}"
        );
    }
}

/// `echo-server --activated` as a service manager starts it with `listen_fds` in
/// LISTEN_FDS and only `passed` given, as descriptor 3.
fn activated_server(listen_fds: usize, passed: std::os::fd::RawFd, backend: &str) -> Command {
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            &format!("LISTEN_PID=$$ LISTEN_FDS={listen_fds} exec \"$0\" \"$@\""),
        ])
        .arg(env!("CARGO_BIN_EXE_ringsock"))
        .args(["echo-server", "--activated", "--backend", backend])
        .env_remove("RINGSOCK_BACKEND")
        .stdin(Stdio::null());
    // SAFETY: dup, dup2 and close are async-signal-safe, as a pre_exec hook must be.
    unsafe {
        command.pre_exec(move || {
            // Through a spare number, in case the source sits on 3; the spare is closed.
            let spare = libc::dup(passed);
            if spare < 0 || libc::dup2(spare, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if spare != 3 {
                libc::close(spare);
            }
            Ok(())
        });
    }
    command
}

/// A hot restart whose program was deleted is refused before any socket leaves: the
/// server says so and serves on, the open connection and new ones alike, until SIGTERM.
#[test]
fn a_hot_restart_without_a_program_to_start_is_refused_and_the_server_serves_on() {
    for backend in BACKENDS {
        let name = format!("failed-restart-{}-{backend}", std::process::id());
        let (dir, exe) = linked_binary(std::ffi::OsStr::new(&name));
        let server = serve_tcp_from(&exe, backend);
        let addr: SocketAddr = format!("127.0.0.1:{}", server.port()).parse().unwrap();
        let mut open = Talker::open(addr, backend);
        open.echo(b"before\n");
        std::fs::remove_dir_all(&dir).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGUSR2) };
        server.wait_for_stderr("the refused restart", |lines| {
            lines.iter().any(|line| line.starts_with("restart refused"))
        });
        open.echo(b"after\n");
        one_echo(addr, b"a new connection\n").unwrap();
        // SAFETY: as above.
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGTERM) };
        let status = server.wait_exit(MUST_HAPPEN);
        assert!(status.success(), "{backend}: {status:?}");
    }
}

/// A restart whose new process starts but never serves (here the program at the path
/// is one that exits at once, as a new server given a broken certificate would) is
/// refused after the fact: the old server gave the new one copies of its sockets and
/// still holds them, so it serves on, its open connections and new ones alike.
#[test]
fn a_hot_restart_whose_new_server_fails_leaves_the_old_one_serving() {
    use std::os::unix::fs::PermissionsExt;
    for backend in BACKENDS {
        let name = format!("dead-restart-{}-{backend}", std::process::id());
        let (dir, exe) = linked_binary(std::ffi::OsStr::new(&name));
        let server = serve_tcp_from(&exe, backend);
        let addr: SocketAddr = format!("127.0.0.1:{}", server.port()).parse().unwrap();
        let mut open = Talker::open(addr, backend);
        open.echo(b"before\n");
        let broken = dir.join("ringsock.broken");
        std::fs::write(&broken, "#!/bin/sh\nexit 3\n").unwrap();
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&broken, &exe).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGUSR2) };
        server.wait_for_stderr("the failed restart", |lines| {
            lines.iter().any(|line| line.starts_with("restart failed"))
        });
        let said = server.stderr().join("\n");
        assert!(said.contains("serving on"), "{backend}: {said}");
        open.echo(b"after\n");
        one_echo(addr, b"a new connection\n").unwrap();
        // A second try, once the program is whole again, hands over.
        std::fs::remove_file(&exe).unwrap();
        std::fs::hard_link(env!("CARGO_BIN_EXE_ringsock"), &exe).unwrap();
        let new_pid = hand_over(&server);
        one_echo(addr, b"served by the new one\n").unwrap();
        // SAFETY: as above.
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGTERM) };
        let status = server.wait_exit(MUST_HAPPEN);
        assert!(status.code().is_some(), "{backend}: {status:?}");
        drop(open);
        // SAFETY: as above; the pid is the new server's, which the old one started.
        unsafe { libc::kill(new_pid, libc::SIGTERM) };
        wait_gone(new_pid, backend);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// While the new copy of a hot restart takes its time to start, the old server keeps
/// accepting: a client that connects meanwhile is echoed at once, not held in the
/// listen backlog until the new copy serves or fails.
#[test]
fn a_hot_restart_keeps_accepting_while_the_new_server_starts() {
    use std::os::unix::fs::PermissionsExt;
    for backend in BACKENDS {
        let name = format!("slow-restart-{}-{backend}", std::process::id());
        let (dir, exe) = linked_binary(std::ffi::OsStr::new(&name));
        let server = serve_tcp_from(&exe, backend);
        let addr: SocketAddr = format!("127.0.0.1:{}", server.port()).parse().unwrap();
        let (started, gate) = (dir.join("started"), dir.join("gate"));
        let gate_c = std::ffi::CString::new(gate.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(gate_c.as_ptr(), 0o600) }, 0);
        // The "new server": says it started, then waits at the gate, then fails.
        let slow = dir.join("ringsock.slow");
        let script = format!(
            "#!/bin/sh\ntouch '{}'\nread line < '{}'\nexit 3\n",
            started.display(),
            gate.display()
        );
        std::fs::write(&slow, script).unwrap();
        std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&slow, &exe).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGUSR2) };
        let deadline = Instant::now() + MUST_HAPPEN;
        while !started.exists() {
            assert!(
                Instant::now() < deadline,
                "{backend}: the new server never started"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        one_echo(addr, b"while the new one starts\n").unwrap();
        let said = server.stderr().join("\n");
        assert!(
            !said.contains("restart failed"),
            "{backend}: the echo waited for the hand-over to end: {said}"
        );
        // Let the new server fail: the old one serves on.
        std::fs::write(&gate, "go\n").unwrap();
        server.wait_for_stderr("the failed restart", |lines| {
            lines.iter().any(|line| line.starts_with("restart failed"))
        });
        one_echo(addr, b"after\n").unwrap();
        // SAFETY: as above.
        unsafe { libc::kill(server.pid() as libc::pid_t, libc::SIGTERM) };
        let status = server.wait_exit(MUST_HAPPEN);
        assert!(status.success(), "{backend}: {status:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// An upgrade in place: the program's file is replaced (as a package manager does, a
/// new file renamed over the old), then SIGUSR2 starts the new file, not the deleted
/// image, and hands it the listener. The old server, holding a connection that keeps
/// talking, still ends on SIGTERM at once rather than when the connection does.
#[test]
fn a_hot_restart_after_an_upgrade_starts_the_new_program_and_sigterm_ends_the_old() {
    for backend in BACKENDS {
        let name = format!("upgrade-restart-{}-{backend}", std::process::id());
        let (dir, exe) = linked_binary(std::ffi::OsStr::new(&name));
        let old = serve_tcp_from(&exe, backend);
        let addr: SocketAddr = format!("127.0.0.1:{}", old.port()).parse().unwrap();
        let mut open = Talker::open(addr, backend);
        open.echo(b"before\n");
        let upgrade = dir.join("ringsock.new");
        std::fs::copy(env!("CARGO_BIN_EXE_ringsock"), &upgrade).unwrap();
        std::fs::rename(&upgrade, &exe).unwrap();
        let new_pid = hand_over(&old);
        let program = std::fs::read_link(format!("/proc/{new_pid}/exe")).unwrap();
        assert_eq!(
            program, exe,
            "{backend}: the new server runs the upgraded file"
        );
        one_echo(addr, b"served by the new one\n").unwrap();
        // The old one still serves its connection, and stops when told to.
        open.echo(b"still open\n");
        // SAFETY: as above.
        unsafe { libc::kill(old.pid() as libc::pid_t, libc::SIGTERM) };
        let status = old.wait_exit(MUST_HAPPEN);
        assert!(status.code().is_some(), "{backend}: {status:?}");
        drop(open);
        // SAFETY: as above; the pid is the new server's, which the old one started.
        unsafe { libc::kill(new_pid, libc::SIGTERM) };
        wait_gone(new_pid, backend);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A connection to the server at `addr` whose every line must come back.
struct Talker {
    stream: TcpStream,
    backend: String,
}

impl Talker {
    fn open(addr: SocketAddr, backend: &str) -> Talker {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(MUST_HAPPEN)).unwrap();
        Talker {
            stream,
            backend: backend.to_owned(),
        }
    }

    fn echo(&mut self, line: &[u8]) {
        self.stream.write_all(line).unwrap();
        let mut back = vec![0u8; line.len()];
        read_all(&mut self.stream, &mut back).unwrap();
        assert_eq!(back, line, "{}", self.backend);
    }
}

/// Sends `old` SIGUSR2 and waits for it to hand its sockets over; the new server's pid.
fn hand_over(old: &EchoServer) -> i32 {
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(old.pid() as libc::pid_t, libc::SIGUSR2) };
    old.wait_for_stderr("the hand-over", |lines| {
        lines.iter().any(|line| line.starts_with("restart: handed"))
    });
    old.stderr()
        .iter()
        .find_map(|line| line.strip_prefix("restart: handed"))
        .and_then(|rest| rest.rsplit(' ').next())
        .and_then(|pid| pid.parse().ok())
        .expect("the new server's pid")
}

/// Waits until process `pid` has ended (gone, or a zombie of its dead parent).
fn wait_gone(pid: i32, backend: &str) {
    let deadline = Instant::now() + MUST_HAPPEN;
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            Instant::now() < deadline,
            "{backend}: process {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGUSR2 under a steady stream of connections: the old server hands its listeners to
/// a new copy of itself and ends once its own connections are done; every connection
/// made meanwhile is served by one or the other.
#[test]
fn a_hot_restart_refuses_and_resets_no_connection() {
    const CONNECTIONS: usize = 1500;
    for backend in BACKENDS {
        let old = EchoServer::start(
            &[
                "--tcp",
                "127.0.0.1:0",
                "--threads",
                "2",
                "--backend",
                backend,
            ],
            &["tcp"],
        );
        let addr: SocketAddr = format!("127.0.0.1:{}", old.port()).parse().unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let client = {
            let done = done.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let started = Instant::now();
                for i in 0..CONNECTIONS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let line = format!("connection {i}\n");
                    if let Err(err) = one_echo(addr, line.as_bytes()) {
                        failures.push(format!("connection {i}: {err}"));
                    }
                    done.fetch_add(1, Ordering::Release);
                }
                (failures, started.elapsed())
            })
        };
        // Restart once a good part of the connections went through the old server.
        let deadline = Instant::now() + MUST_HAPPEN;
        while done.load(Ordering::Acquire) < CONNECTIONS / 3 {
            assert!(Instant::now() < deadline, "{backend}: the client is stuck");
            std::thread::yield_now();
        }
        let new_pid = hand_over(&old);
        let (failures, _) = client.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "{backend}: {} of {CONNECTIONS} connections failed across the restart: {:?}; stderr:\n{}",
            failures.len(),
            &failures[..failures.len().min(5)],
            old.stderr().join("\n")
        );
        // The old server ends by itself once its connections are done.
        assert!(
            old.wait_exit(MUST_HAPPEN).success(),
            "{backend}: the old server"
        );
        // The new one serves alone now, then stops on SIGTERM.
        one_echo(addr, b"after the restart\n").unwrap();
        // SAFETY: as above; the pid is the new server's, which the old one started.
        unsafe { libc::kill(new_pid, libc::SIGTERM) };
        wait_gone(new_pid, backend);
    }
}

/// A hot restart of a server whose arguments are not all UTF-8 (here its program's own
/// path; a `--tls-cert` path would do the same): the new copy gets them as they were and
/// takes over, instead of the old one panicking as it reads them.
#[test]
fn a_hot_restart_with_arguments_that_are_not_utf8_hands_over() {
    use std::os::unix::ffi::OsStrExt;
    for backend in BACKENDS {
        let mut name = format!("restart-\u{0}-{}-{backend}", std::process::id()).into_bytes();
        // A byte that is never UTF-8 where the NUL placeholder was.
        let at = name.iter().position(|&b| b == 0).unwrap();
        name[at] = 0xff;
        let (dir, exe) = linked_binary(std::ffi::OsStr::from_bytes(&name));
        let old = serve_tcp_from(&exe, backend);
        let addr: SocketAddr = format!("127.0.0.1:{}", old.port()).parse().unwrap();
        one_echo(addr, b"before\n").unwrap();
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(old.pid() as libc::pid_t, libc::SIGUSR2) };
        old.wait_for_stderr("the hand-over or its failure", |lines| {
            lines.iter().any(|line| {
                line.starts_with("restart")
                    || line.contains("panicked")
                    || line.starts_with("error:")
            })
        });
        let stderr = old.stderr();
        let new_pid: i32 = stderr
            .iter()
            .find_map(|line| line.strip_prefix("restart: handed"))
            .and_then(|rest| rest.rsplit(' ').next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("{backend}: no hand-over; stderr:\n{}", stderr.join("\n")));
        assert!(
            old.wait_exit(MUST_HAPPEN).success(),
            "{backend}: the old server"
        );
        // The new copy serves on the same port, then stops on SIGTERM.
        one_echo(addr, b"after\n").unwrap();
        // SAFETY: as above; the pid is the new server's, which the old one started.
        unsafe { libc::kill(new_pid, libc::SIGTERM) };
        wait_gone(new_pid, backend);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Whether process `pid` catches `signal` (its handler is installed).
fn catches(pid: u32, signal: libc::c_int) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// A server waiting for the sockets of a hot restart from a process that never sends
/// them (stuck, or stopped; before the count, or after it) still stops on SIGTERM, and
/// exits 0, instead of sitting in the read with the signal caught and ignored.
#[test]
fn sigterm_ends_the_wait_for_a_hand_over_that_never_comes() {
    for backend in BACKENDS {
        for sent in [&[][..], &1u32.to_le_bytes()[..]] {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            (&ours).write_all(sent).unwrap();
            let mut child = server_inheriting(backend, theirs);
            // Once it catches SIGTERM, the signal is the server's to handle.
            let deadline = Instant::now() + MUST_HAPPEN;
            while !catches(child.id(), libc::SIGTERM) {
                assert!(Instant::now() < deadline, "{backend}: no SIGTERM handler");
                std::thread::sleep(Duration::from_millis(5));
            }
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let what = format!("{backend}, {sent:?} sent: SIGTERM to stop the server");
            let (status, stderr) = exit_of(&mut child, MUST_HAPPEN, &what);
            assert!(
                status.success(),
                "{backend}, {sent:?} sent: {status:?} {stderr}"
            );
            drop(ours);
        }
    }
}

/// A process being replaced that stalls in the hand-over (sends nothing, or the count
/// and then nothing) and keeps the channel open: the copy gives up with
/// `ConnectionTimedOut` and exits 1 rather than waiting for ever on what it holds.
#[test]
fn a_hand_over_that_stalls_times_out() {
    let mut waiting = Vec::new();
    let count_of_one = 1u32.to_le_bytes();
    for backend in BACKENDS {
        for sent in [&[][..], &count_of_one[..]] {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            (&ours).write_all(sent).unwrap();
            let child = server_inheriting(backend, theirs);
            // `ours` stays open: the channel neither ends nor says anything more.
            waiting.push((backend, sent, child, ours));
        }
    }
    // The copies wait side by side: the test takes one timeout, not four.
    for (backend, sent, mut child, ours) in waiting {
        let what = format!("{backend}, {sent:?} sent: the copy to give up the hand-over");
        let (status, stderr) = exit_of(&mut child, 3 * MUST_HAPPEN, &what);
        assert_eq!(status.code(), Some(1), "{backend}, {sent:?}: {stderr}");
        assert!(
            stderr.contains("ConnectionTimedOut") && !stderr.contains("panicked"),
            "{backend}, {sent:?}: {stderr}"
        );
        drop(ours);
    }
}

/// `echo-server --tcp 127.0.0.1:0 --inherit=FD` on `backend`, FD a copy of `theirs`
/// (the hand-over channel's end, which the test's own copy closes), stderr piped.
fn server_inheriting(backend: &str, theirs: std::os::unix::net::UnixStream) -> std::process::Child {
    // A copy that, unlike its source, is not close-on-exec: the server inherits it.
    // SAFETY: dup only makes a new descriptor (or fails with -1, checked below).
    let inherited = unsafe { libc::dup(theirs.as_raw_fd()) };
    assert!(inherited >= 0, "dup: {}", std::io::Error::last_os_error());
    // SAFETY: just made above, owned by nothing else.
    let inherited = unsafe { std::os::fd::OwnedFd::from_raw_fd(inherited) };
    Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(["echo-server", "--tcp", "127.0.0.1:0", "--backend", backend])
        .arg(format!("--inherit={}", inherited.as_raw_fd()))
        .env_remove("RINGSOCK_BACKEND")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit (polled), at most `within`: its status and stderr. Killed,
/// and the test failed with `what`, if it does not.
fn exit_of(
    child: &mut std::process::Child,
    within: Duration,
    what: &str,
) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, util::stderr_of(child))
}

/// The built binary, hard-linked into a fresh directory `name` beside it: the directory
/// and the link. A hard link, not a copy: a copy's file open for writing could be
/// inherited by a child another test forks meanwhile, and running it would fail
/// (ETXTBSY).
fn linked_binary(name: &std::ffi::OsStr) -> (std::path::PathBuf, std::path::PathBuf) {
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_ringsock"));
    let dir = built.with_file_name(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("ringsock");
    std::fs::hard_link(built, &exe).unwrap();
    (dir, exe)
}

/// An echo server run from `exe`, on one thread, TCP on a port the kernel picks.
fn serve_tcp_from(exe: &std::path::Path, backend: &str) -> EchoServer {
    EchoServer::start_with(
        &[
            "--tcp",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--backend",
            backend,
        ],
        &["tcp"],
        util::echo_server::Setup {
            exe: Some(exe),
            ..util::echo_server::Setup::default()
        },
    )
}

/// SIGTERM right behind SIGUSR2: the stop is the whole server's. Either the new copy
/// had already taken over (the old one says so, and it serves), or it is stopped with
/// the old one (which says so too), or none was started; never a copy that serves on
/// unannounced after the server was stopped. (Its stderr goes to a file: a copy that
/// lives on holds a pipe open.)
#[test]
fn a_stop_during_a_hot_restart_stops_the_new_copy_or_names_it() {
    for backend in BACKENDS {
        for round in 0..3 {
            let dir = std::env::temp_dir().join(format!(
                "ringsock-stop-restart-{}-{backend}-{round}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let log = dir.join("stderr");
            let mut server = Command::new(env!("CARGO_BIN_EXE_ringsock"))
                .args(["echo-server", "--tcp", "127.0.0.1:0", "--backend", backend])
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(server.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let addr: SocketAddr = line
                .trim()
                .strip_prefix("listening tcp ")
                .unwrap_or_else(|| panic!("{backend}: {line:?}"))
                .parse()
                .unwrap();
            let pid = server.id();
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR2) };
            // The stop comes once the new copy exists, likely before it serves.
            let deadline = Instant::now() + MUST_HAPPEN;
            let copies = loop {
                let copies = children_of(pid);
                if !copies.is_empty() {
                    break copies;
                }
                assert!(Instant::now() < deadline, "{backend}: no new copy started");
                std::thread::yield_now();
            };
            let _reaped = KillOnDrop(copies.clone());
            // SAFETY: as above.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            let status = server.wait().unwrap();
            assert!(status.success(), "{backend} {round}: {status:?}");
            let stderr = std::fs::read_to_string(&log).unwrap();
            let named = |prefix: &str| {
                stderr
                    .lines()
                    .find_map(|line| line.strip_prefix(prefix))
                    .and_then(|rest| rest.rsplit(' ').next())
                    .and_then(|pid| pid.parse::<i32>().ok())
            };
            if named("restart: handed").is_some() {
                one_echo(addr, b"served by the new copy\n").unwrap();
            } else {
                for copy in &copies {
                    wait_gone(*copy, backend);
                }
                let refused = TcpStream::connect(addr).map_err(|err| err.kind());
                assert_eq!(
                    refused.map(drop),
                    Err(std::io::ErrorKind::ConnectionRefused),
                    "{backend} {round}: something still serves:\n{stderr}"
                );
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

/// Stops the processes when dropped (the new copies a test started through its server).
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: kill has no memory-safety preconditions; a pid that ended already
            // (and was reaped by init) is at worst reused, which a test run makes unlikely.
            unsafe { libc::kill(*pid, libc::SIGTERM) };
        }
    }
}

/// The processes `pid` started (any of its threads).
fn children_of(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}
