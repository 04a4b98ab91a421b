//! The `ringsock` binary, run as a user would, on both drivers.

mod util;

use std::process::{Command, Output};

use util::echo_server::EchoServer;

fn ringsock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(args)
        .env_remove("RINGSOCK_BACKEND")
        .output()
        .expect("run ringsock")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const BACKENDS: [(&str, &str); 2] = [("uring", "io_uring"), ("epoll", "epoll")];

#[test]
fn the_demo_runs_the_echo_examples_and_names_its_driver() {
    for (backend, driver) in BACKENDS {
        let out = ringsock(&["demo", "--backend", backend]);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{backend}: {stdout}{}",
            text(&out.stderr)
        );
        for line in [
            "client is trying to connect...",
            "client connected",
            "server received the request: \"Hello, World!\"",
            "client received the response: \"Hello, World!\"",
            "client closed its socket",
            "server closed its socket",
        ] {
            assert!(
                stdout.contains(line),
                "{backend}: missing {line:?} in\n{stdout}"
            );
        }
        assert!(stdout.starts_with("server is listening"), "{stdout}");
        assert!(stdout.contains(&format!("driver: {driver}")), "{stdout}");
        check_batching_table(&stdout, driver);
    }
}

/// The demo's last story: batched vs per-write, a table with a row per way (the
/// figures are measured, never checked).
fn check_batching_table(stdout: &str, driver: &str) {
    let title = stdout
        .lines()
        .find(|l| l.starts_with("batched vs per-write: 64-byte TCP messages in groups of 64"))
        .unwrap_or_else(|| panic!("no comparison title in\n{stdout}"));
    assert!(title.contains(&format!("ringsock on {driver}")), "{title}");
    let header = stdout
        .lines()
        .find(|l| l.starts_with("tcp-batch, 64 B x 64"))
        .unwrap_or_else(|| panic!("no table header in\n{stdout}"));
    for column in ["msgs/s", "syscalls/msg", "speed-up"] {
        assert!(header.contains(column), "{header}");
    }
    for row in [
        "ringsock: 64 writes, then one flush",
        "ringsock: each write awaited alone",
        "std: one system call per write",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in\n{stdout}"));
        // A rate, system calls per message and a speed-up: measured, so only present.
        assert_eq!(line[row.len()..].split_whitespace().count(), 3, "{line}");
        assert!(line.ends_with('x'), "{line}");
    }
    assert!(!stdout.contains("failed:"), "{stdout}");
}

#[test]
fn no_arguments_runs_the_demo() {
    let out = ringsock(&[]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("client received the response: \"Hello, World!\""));
}

#[test]
fn echo_client_and_server_talk_and_the_server_stops_on_sigterm() {
    for (server_backend, _) in BACKENDS {
        let server = EchoServer::start(
            &["--tcp", "127.0.0.1:0", "--backend", server_backend],
            &["tcp"],
        );
        for (client_backend, _) in BACKENDS {
            let out = ringsock(&[
                "echo-client",
                "127.0.0.1",
                server.port(),
                "--message",
                "ping from the test",
                "--backend",
                client_backend,
            ]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert_eq!(text(&out.stdout), "ping from the test\n");
        }
        let out = ringsock(&["echo-client", "localhost", server.port()]);
        assert_eq!(text(&out.stdout), "Hello, World!\n");
        let status = server.stop();
        assert!(status.success(), "server exit: {status:?}");
    }
}

#[test]
fn failures_are_one_status_line_and_exit_1() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port().to_string()
    };
    // A UDP port nobody has: the ICMP answer names the server.
    let closed_udp_port = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port().to_string()
    };
    let refused_udp =
        format!("error: ConnectionRefused: receive the reply from 127.0.0.1:{closed_udp_port}");
    let cases: [(&[&str], &str); 5] = [
        (
            &["echo-client", "127.0.0.1", &closed_port],
            "error: ConnectionRefused: ",
        ),
        (
            &["echo-client", "127.0.0.1", &closed_udp_port, "--udp"],
            &refused_udp,
        ),
        (
            &["echo-client", "bad_host!", "80"],
            "error: InvalidArgument: ",
        ),
        (
            &["echo-client", "127.0.0.1", "no-such-service"],
            "error: ClassTypeNotFound: ",
        ),
        (
            &["echo-client", "127.0.0.1", "99999"],
            "error: InvalidArgument: ",
        ),
    ];
    for (args, prefix) in cases {
        for (backend, _) in BACKENDS {
            let mut args = args.to_vec();
            args.extend(["--backend", backend]);
            let out = ringsock(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(stderr.starts_with(prefix), "{args:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["echo-client"][..],
        &["echo-server"],
        &["echo-server", "--tcp", "not-an-address"],
        &["demo", "--backend", "kqueue"],
        &["no-such-command"],
        &["echo-client", "127.0.0.1", "7", "--udp", "--dscp", "64"],
        &["echo-client", "127.0.0.1", "7", "--udp", "--ecn", "ect2"],
        &["echo-client", "127.0.0.1", "7", "--dscp", "46"],
        &[
            "echo-client",
            "127.0.0.1",
            "7",
            "--tls",
            "--tls-level",
            "PlainSocket",
        ],
        &["echo-server", "--tcp", "[fe80::1%no-such-if]:0"],
        &["echo-server", "--udp", "[fe80::1%lo]:port"],
    ] {
        let out = ringsock(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

/// A link-local address takes its interface by name, as the server's error for one
/// without it suggests: `lo` is index 1, and the bind fails for want of the address only.
#[test]
fn a_link_local_listen_address_takes_an_interface_name() {
    let out = ringsock(&["echo-server", "--tcp", "[fe80::1%lo]:0"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: CannotAssignRequestedAddress: bind [fe80::1%1]:0"),
        "{stderr}"
    );
}

#[test]
fn udp_echo_client_and_server() {
    for (server_backend, _) in BACKENDS {
        let server = EchoServer::start(
            &[
                "--tcp",
                "127.0.0.1:0",
                "--udp",
                "127.0.0.1:0",
                "--backend",
                server_backend,
            ],
            &["tcp", "udp"],
        );
        let (tcp, udp) = (&server.ports[0], &server.ports[1]);
        for (client_backend, _) in BACKENDS {
            let out = ringsock(&[
                "echo-client",
                "127.0.0.1",
                udp,
                "--udp",
                "--message",
                "a datagram",
                "--backend",
                client_backend,
            ]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert_eq!(text(&out.stdout), "a datagram\n");
        }
        // TCP is served beside it.
        let out = ringsock(&["echo-client", "127.0.0.1", tcp, "--message", "tcp too"]);
        assert_eq!(text(&out.stdout), "tcp too\n");
        assert!(server.stop().success());
    }
}

#[test]
fn udp_echo_client_sends_the_traffic_class_asked() {
    use ringsock::{DatagramSocket, Ecn, TrafficClass};
    let cases = [
        ("46", "ect0", TrafficClass::new(46, Ecn::Ect0).unwrap()),
        ("10", "ce", TrafficClass::new(10, Ecn::Ce).unwrap()),
        ("0", "ect1", TrafficClass::new(0, Ecn::Ect1).unwrap()),
        ("63", "not-ect", TrafficClass::new(63, Ecn::NotEct).unwrap()),
    ];
    for ((backend, _), (dscp, ecn, class)) in BACKENDS.iter().cycle().zip(cases) {
        let runtime = ringsock::Runtime::new().unwrap();
        runtime.block_on(async {
            let server = DatagramSocket::new();
            server.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            server.control().set_receive_traffic_class(true).unwrap();
            let port = server.local_addr().unwrap().port().to_string();
            let client = Command::new(env!("CARGO_BIN_EXE_ringsock"))
                .args([
                    "echo-client",
                    "127.0.0.1",
                    &port,
                    "--udp",
                    "--message",
                    "voice",
                ])
                .args(["--dscp", dscp, "--ecn", ecn, "--backend", backend])
                .env_remove("RINGSOCK_BACKEND")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let wait = std::time::Duration::from_secs(20);
            let request = ringsock::runtime::timeout(wait, server.recv())
                .await
                .expect("the client's datagram")
                .unwrap();
            assert_eq!(
                request.traffic_class(),
                Some(class),
                "{backend} {dscp} {ecn}"
            );
            let back = request.remote_addr();
            server.send_to_addr(request.to_vec(), back).await.0.unwrap();
            let out = client.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert_eq!(text(&out.stdout), "voice\n");
        });
    }
}

#[test]
fn a_lost_udp_reply_is_connection_timed_out() {
    // A socket that receives and never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port().to_string();
    for (backend, _) in BACKENDS {
        let out = ringsock(&[
            "echo-client",
            "127.0.0.1",
            &port,
            "--udp",
            "--timeout",
            "0.2",
            "--backend",
            backend,
        ]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.starts_with("error: ConnectionTimedOut: "),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[test]
fn the_demo_tells_the_udp_story_too() {
    let out = ringsock(&["demo"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for line in [
        "server is bound to port number",
        "client is bound to port number",
        "client sent the request: \"Hello, World!\"",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    // Both stories end with the response received.
    assert_eq!(
        stdout
            .matches("client received the response: \"Hello, World!\"")
            .count(),
        2,
        "{stdout}"
    );
}

/// `--timeout` is parsed with the other flags: a value no `Duration` holds (1e300 s, or
/// one under a nanosecond) is a usage error, not a panic or a zero wait.
#[test]
fn echo_client_timeouts_out_of_range_are_usage_errors() {
    for (backend, _) in BACKENDS {
        for timeout in [
            "1e300",
            "18446744073709551616",
            "0",
            "-1",
            "NaN",
            "inf",
            "1e-300",
        ] {
            let out = ringsock(&[
                "echo-client",
                "127.0.0.1",
                "9",
                "--udp",
                &format!("--timeout={timeout}"),
                "--backend",
                backend,
            ]);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{backend} {timeout}: {stderr}");
            assert!(
                stderr.contains("--timeout") && !stderr.contains("panicked"),
                "{backend} {timeout}: {stderr}"
            );
        }
    }
}

/// A stdout that cannot take the reply (here /dev/full) fails the client with exit 1
/// and a line saying so, on both engines, instead of a panic.
#[test]
fn echo_client_with_a_full_stdout_fails_cleanly() {
    for (backend, _) in BACKENDS {
        let server = EchoServer::start(&["--tcp", "127.0.0.1:0", "--backend", backend], &["tcp"]);
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .args([
                "echo-client",
                "127.0.0.1",
                server.port(),
                "--backend",
                backend,
            ])
            .env_remove("RINGSOCK_BACKEND")
            .stdout(full)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
        assert!(
            stderr.contains("write the reply to stdout") && !stderr.contains("panicked"),
            "{backend}: {stderr}"
        );
        assert!(server.stop().success(), "{backend}");
    }
}

fn dev_full() -> std::fs::File {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap()
}

/// A stdout that cannot be written (a full disk; a reader of a pipe that went away
/// fails the same way) loses the demo's and a benchmark's lines: they finish without a
/// panic, and exit 1 with a line saying the output was lost (their output is what they
/// are run for), as the echo client does.
#[test]
fn the_demo_and_a_benchmark_with_an_unwritable_stdout_fail_without_a_panic() {
    for (backend, _) in BACKENDS {
        for args in [
            &["demo", "--backend", backend][..],
            &[
                "bench",
                "--json",
                "--workload",
                "tcp-batch",
                "--count",
                "2000",
                "--impl",
                &format!("ringsock-{backend}"),
            ][..],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_ringsock"))
                .args(args)
                .env_remove("RINGSOCK_BACKEND")
                .stdout(dev_full())
                .output()
                .unwrap();
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(
                stderr.contains("write the output") && stderr.contains("No space left"),
                "{args:?}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        }
    }
}

/// Help nobody received is a failure, as the demo's lost lines are: `--help` and
/// `--version` into a full stdout exit 1 saying so, where into a pipe they print and exit
/// 0; a usage error keeps clap's status 2. (No engine runs: the command line is read
/// before a runtime starts.)
#[test]
fn help_and_version_into_a_full_stdout_fail() {
    for args in [
        &["--help"][..],
        &["bench", "--help"],
        &["-V"],
        &["echo-server", "-h"],
    ] {
        let lost = Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .args(args)
            .stdout(dev_full())
            .output()
            .unwrap();
        let stderr = text(&lost.stderr);
        assert_eq!(lost.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: NoBufferSpace: write the usage text")
                && stderr.contains("No space left"),
            "{args:?}: {stderr}"
        );
        let printed = Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(printed.status.code(), Some(0), "{args:?}");
        assert!(text(&printed.stdout).contains("ringsock"), "{args:?}");
    }
    let usage = Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(["bench", "--no-such-flag"])
        .stdout(dev_full())
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage.stderr));
    assert!(text(&usage.stderr).contains("--no-such-flag"));
}

/// An echo server whose stderr (its log) cannot be written still serves, and SIGTERM
/// still ends it with exit 0.
#[test]
fn an_echo_server_with_an_unwritable_log_serves_and_stops_cleanly() {
    use std::io::{BufRead, BufReader, Read, Write};
    for (backend, _) in BACKENDS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .args(["echo-server", "--tcp", "127.0.0.1:0", "--backend", backend])
            .env_remove("RINGSOCK_BACKEND")
            .stdout(std::process::Stdio::piped())
            .stderr(dev_full())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening tcp ")
            .unwrap_or_else(|| panic!("{backend}: {line:?}"))
            .to_string();
        let mut client = std::net::TcpStream::connect(&addr).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        client.write_all(b"hello").unwrap();
        let mut echoed = [0u8; 5];
        client.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"hello", "{backend}");
        drop(client);
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child,
        // not yet waited for.
        #[allow(unsafe_code)]
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0);
        let status = child.wait().unwrap();
        assert!(status.success(), "{backend}: {status}");
    }
}

/// A TCP message with a line break would come back cut at the break (only the first
/// line is read as the reply) with exit 0: it is refused as a usage error instead.
#[test]
fn a_tcp_message_with_a_line_break_is_a_usage_error_not_a_cut_reply() {
    for (backend, _) in BACKENDS {
        let server = EchoServer::start(
            &[
                "--tcp",
                "127.0.0.1:0",
                "--udp",
                "127.0.0.1:0",
                "--backend",
                backend,
            ],
            &["tcp", "udp"],
        );
        for message in ["first\nsecond", "ends in\r", "\n"] {
            let out = ringsock(&[
                "echo-client",
                "127.0.0.1",
                server.port(),
                "--message",
                message,
                "--backend",
                backend,
            ]);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{message:?}: {stderr}");
            assert!(stderr.contains("--message"), "{message:?}: {stderr}");
            assert!(out.stdout.is_empty(), "{message:?}: {}", text(&out.stdout));
        }
        // A datagram holds line breaks, and comes back whole.
        let out = ringsock(&[
            "echo-client",
            "127.0.0.1",
            &server.ports[1],
            "--udp",
            "--message",
            "first\nsecond",
            "--backend",
            backend,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "first\nsecond\n");
        assert!(server.stop().success(), "{backend}");
    }
}

/// A TCP server on a free port that reads one line and answers `reply`; its port, and
/// the line it read.
fn tcp_server_answering(reply: &'static [u8]) -> (String, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream).write_all(reply).unwrap();
        line
    });
    (port, server)
}

/// Replies are compared and shown as bytes: a reply that is not UTF-8 fails the
/// client with "not the message sent" (never a usage error), shown as `\xNN`; one whose
/// lossy text would equal the message (0xff against U+FFFD) fails too; a line feed or
/// tab inside a datagram's reply is escaped, so it cannot pass for this tool's own
/// output. TCP and UDP, both engines.
#[test]
fn replies_are_compared_and_shown_byte_for_byte() {
    for (backend, _) in BACKENDS {
        // TCP: a line of bytes that are no UTF-8.
        let (port, server) = tcp_server_answering(b"\xff\xfe\r\n");
        let out = ringsock(&[
            "echo-client",
            "127.0.0.1",
            &port,
            "--message",
            "hello",
            "--backend",
            backend,
        ]);
        server.join().unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
        assert_eq!(stdout, "\\xff\\xfe\n", "{backend}");
        assert!(
            stderr.contains("(2 bytes) is not the message sent (5 bytes)")
                && stderr.contains("needs --tls"),
            "{backend}: {stderr}"
        );

        // UDP: one byte 0xff for a message of U+FFFD, then a reply with a line feed and
        // a tab in it.
        for (message, reply, shown) in [
            ("\u{fffd}", &b"\xff"[..], "\\xff\n"),
            (
                "hello",
                &b"hello\nerror: fake\tline"[..],
                "hello\\x0aerror: fake\\x09line\n",
            ),
        ] {
            let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = server.local_addr().unwrap().port().to_string();
            let answer = std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                let (_, from) = server.recv_from(&mut buf).unwrap();
                server.send_to(reply, from).unwrap();
            });
            let out = ringsock(&[
                "echo-client",
                "127.0.0.1",
                &port,
                "--udp",
                "--message",
                message,
                "--backend",
                backend,
            ]);
            answer.join().unwrap();
            let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
            assert_eq!(
                out.status.code(),
                Some(1),
                "{backend} {message:?}: {stderr}"
            );
            assert_eq!(stdout, shown, "{backend} {message:?}");
            // No TLS hint: TLS does not run over UDP.
            assert!(
                stderr.contains("not the message sent") && !stderr.contains("--tls"),
                "{backend}: {stderr}"
            );
        }
    }
}

/// A server that answers with something other than the echo (here a line with a
/// terminal escape sequence, a carriage return, a right-to-left override and a
/// zero-width space, as a hostile one might) fails the client with exit 1 and says why;
/// the reply is shown with its control and invisible format characters escaped, so it
/// cannot drive the terminal or reorder and hide what it shows. Both engines.
#[test]
fn a_reply_that_is_not_the_echo_fails_the_client_and_is_shown_escaped() {
    for (backend, _) in BACKENDS {
        let (port, server) = tcp_server_answering("\x1b[31mnot\rit\u{202e}ti\u{200b}\n".as_bytes());
        let out = ringsock(&[
            "echo-client",
            "127.0.0.1",
            &port,
            "--message",
            "hello",
            "--backend",
            backend,
        ]);
        assert_eq!(server.join().unwrap(), "hello\n", "{backend}");
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
        assert_eq!(
            stdout, "\\x1b[31mnot\\x0dit\\u{202e}ti\\u{200b}\n",
            "{backend}"
        );
        assert!(
            stderr.contains("not the message sent"),
            "{backend}: {stderr}"
        );
    }
}
