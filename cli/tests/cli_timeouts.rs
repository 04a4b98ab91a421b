//! `ringsock echo-server --idle-timeout`, `--write-timeout` and `--handshake-timeout`
//! against clients that say nothing, stop talking, stop reading, or trickle a TLS hello:
//! each is closed after its timeout and counted, on both drivers. Short timeouts; the tests check that the close and the
//! count happened, never how long they took.

#[path = "../../tests/tls_certs/mod.rs"]
mod tls_certs;
mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use tls_certs::{Ca, LeafOptions, TempDir};
use util::echo_server::EchoServer;

const BACKENDS: [&str; 2] = ["uring", "epoll"];

/// The longest a step that must happen may take before the test fails.
const MUST_HAPPEN: Duration = Duration::from_secs(20);

fn connect(port: &str) -> TcpStream {
    let stream = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    stream.set_read_timeout(Some(MUST_HAPPEN)).unwrap();
    stream
}

/// Waits for the server to close `stream`: an end of stream or a reset. Panics if it
/// is still open after MUST_HAPPEN.
fn closed_by_server(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(_) => panic!("the echo server sent something unasked"),
        Err(err) if err.kind() == ErrorKind::WouldBlock => {
            panic!("the server did not close the connection within {MUST_HAPPEN:?}")
        }
        // A reset is a close too.
        Err(_) => {}
    }
}

/// The count after `kind` in the server's `timeouts: ...` line at exit.
fn count(log: &str, kind: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|line| line.starts_with("timeouts: "))
        .unwrap_or_else(|| panic!("no timeouts line in\n{log}"));
    let at = line
        .find(&format!("{kind} "))
        .unwrap_or_else(|| panic!("no {kind} in {line:?}"));
    line[at + kind.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn silent_and_idle_clients_are_closed_after_the_idle_timeout() {
    for backend in BACKENDS {
        let server = EchoServer::start_logged(
            &[
                "--tcp",
                "127.0.0.1:0",
                "--idle-timeout",
                "0.2",
                "--backend",
                backend,
            ],
            &["tcp"],
        );
        // Connects and never sends a byte.
        let mut silent = connect(server.port());
        // Talks once, then goes quiet.
        let mut idle = connect(server.port());
        idle.write_all(b"one line\n").unwrap();
        let mut echoed = [0u8; 9];
        idle.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"one line\n");
        closed_by_server(&mut silent);
        closed_by_server(&mut idle);
        let (status, log) = server.stop_logged();
        assert!(status.success(), "{backend}: {status:?}\n{log}");
        assert_eq!(count(&log, "idle"), 2, "{backend}:\n{log}");
        // Counted, never a line per connection.
        assert!(!log.contains("connection:"), "{backend}:\n{log}");
    }
}

/// A client that sends and never reads: the echo fills its buffers and the server's,
/// the server's writes make no progress, and the write timeout closes the connection
/// (counted as a write timeout), while a client that reads its echo is served on.
#[test]
fn a_client_that_stops_reading_is_closed_after_the_write_timeout() {
    for backend in BACKENDS {
        let server = EchoServer::start_logged(
            &[
                "--tcp",
                "127.0.0.1:0",
                "--idle-timeout",
                "0",
                "--write-timeout",
                "0.3",
                "--backend",
                backend,
            ],
            &["tcp"],
        );
        let mut stuck = connect(server.port());
        stuck.set_write_timeout(Some(MUST_HAPPEN)).unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        // Bounded: the buffers both ways hold a few MiB; 1 GiB is never reached.
        let refused = (0..16_384).find_map(|_| stuck.write_all(&chunk).err());
        let refused = refused.expect("1 GiB sent and never read, yet the server took it all");
        assert_ne!(
            refused.kind(),
            ErrorKind::WouldBlock,
            "{backend}: the server did not close the connection within {MUST_HAPPEN:?}"
        );
        // A client that reads its echo is not affected.
        let mut reader = connect(server.port());
        reader.write_all(b"still served\n").unwrap();
        let mut echoed = [0u8; 13];
        reader.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"still served\n");
        drop(reader);
        let (status, log) = server.stop_logged();
        assert!(status.success(), "{backend}: {status:?}\n{log}");
        assert_eq!(count(&log, "write"), 1, "{backend}:\n{log}");
    }
}

/// A server certificate for localhost in a fresh directory.
fn server_certificate() -> (TempDir, String, String) {
    let dir = TempDir::new("cli-timeouts");
    let ca = Ca::new("cli timeouts CA");
    let (cert, key) = ca
        .leaf(&["localhost", "127.0.0.1"], LeafOptions::default())
        .write(dir.path(), "server");
    (dir, cert.display().to_string(), key.display().to_string())
}

/// Sends the start of a ClientHello a byte at a time, and never the rest, until the
/// server closes the connection.
fn trickle_a_client_hello(stream: &mut TcpStream) {
    // A handshake record announcing 512 bytes, then a ClientHello header.
    let hello = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 1024];
    // Bounded: 400 rounds of at least 50 ms is MUST_HAPPEN.
    for round in 0..400 {
        if stream
            .write_all(&hello[round % hello.len()..][..1])
            .is_err()
        {
            return;
        }
        match stream.read(&mut buf) {
            // The server answers nothing before the hello is complete: any byte is its
            // closing alert, and an end or a reset is the close.
            Ok(_) => return closed_by_server_after_alert(stream),
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
    panic!("the server kept a trickled handshake open for {MUST_HAPPEN:?}");
}

fn closed_by_server_after_alert(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(MUST_HAPPEN)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[test]
fn tls_clients_that_never_finish_the_handshake_are_closed_after_the_handshake_timeout() {
    let (_dir, cert, key) = server_certificate();
    for backend in BACKENDS {
        let server = EchoServer::start_logged(
            &[
                "--tcp",
                "127.0.0.1:0",
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--handshake-timeout",
                "0.2",
                // Never: only the handshake timeout can close these.
                "--idle-timeout",
                "0",
                "--backend",
                backend,
            ],
            &["tcp"],
        );
        let mut silent = connect(server.port());
        let mut trickling = connect(server.port());
        trickle_a_client_hello(&mut trickling);
        closed_by_server(&mut silent);
        let (status, log) = server.stop_logged();
        assert!(status.success(), "{backend}: {status:?}\n{log}");
        assert_eq!(count(&log, "handshake"), 2, "{backend}:\n{log}");
        assert_eq!(count(&log, "idle"), 0, "{backend}:\n{log}");
        assert!(!log.contains("connection:"), "{backend}:\n{log}");
    }
}

#[test]
fn timeouts_that_are_not_seconds_are_usage_errors() {
    for (flag, value) in [
        ("--idle-timeout", "-1"),
        ("--idle-timeout", "soon"),
        ("--handshake-timeout", "NaN"),
        ("--handshake-timeout", "1e30"),
        ("--write-timeout", "-0.5"),
        ("--write-timeout", "inf"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .args(["echo-server", "--tcp", "127.0.0.1:0", flag, value])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{flag} {value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `ringsock ARGS`; fails the test if it has not exited within MUST_HAPPEN.
fn run_bounded(args: &[&str]) -> std::process::Output {
    let child = Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(args)
        .env_remove("RINGSOCK_BACKEND")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let (sender, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match exited.recv_timeout(MUST_HAPPEN) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // SAFETY: kill has no memory-safety preconditions; pid is our child, which
            // the waiting thread reaps.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("ringsock {args:?} did not exit within {MUST_HAPPEN:?}");
        }
    }
}

/// A TCP server that takes the connection (the kernel's backlog does) and never answers,
/// in plain TCP or at the TLS handshake: the echo client gives up after `--timeout`
/// with ConnectionTimedOut, instead of waiting forever.
#[test]
fn echo_client_gives_up_on_a_silent_tcp_server() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port().to_string();
    for backend in BACKENDS {
        for tls in [false, true] {
            let mut args = vec![
                "echo-client",
                "127.0.0.1",
                &port,
                "--timeout",
                "0.2",
                "--backend",
                backend,
            ];
            if tls {
                args.push("--tls");
            }
            let out = run_bounded(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(
                stderr.starts_with("error: ConnectionTimedOut: ") && stderr.lines().count() == 1,
                "{args:?}: {stderr}"
            );
        }
    }
}

/// A timeout above zero but under a nanosecond would round to zero, which means never:
/// a usage error instead, on both engines; 0 itself still means never and serves.
#[test]
fn a_timeout_under_a_nanosecond_is_a_usage_error_not_never() {
    for backend in BACKENDS {
        for flag in ["--idle-timeout", "--handshake-timeout", "--write-timeout"] {
            let out = util::output_within(
                Command::new(env!("CARGO_BIN_EXE_ringsock"))
                    .args(["echo-server", "--tcp", "127.0.0.1:0", "--backend", backend])
                    .args([flag, "1e-10"])
                    .env_remove("RINGSOCK_BACKEND"),
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{backend} {flag}: {stderr}");
            assert!(stderr.contains("nanosecond"), "{backend} {flag}: {stderr}");
        }
        let server = EchoServer::start(
            &[
                "--tcp",
                "127.0.0.1:0",
                "--idle-timeout",
                "0",
                "--backend",
                backend,
            ],
            &["tcp"],
        );
        assert!(server.stop().success(), "{backend}");
    }
}
