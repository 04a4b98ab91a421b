//! `ringsock echo-server` run as a server is run: every datagram echoed whole, replies
//! from the address each request came to on a wildcard address, and a restart on the
//! same ports right after the old process ended, by SIGTERM or SIGKILL, on both drivers.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use util::echo_server::{EchoServer, Setup};
use util::tunnel_pair::{netns, Pair, A_OUTER, B_OUTER};

const BACKENDS: [&str; 2] = ["uring", "epoll"];

/// How long a reply may take before the test fails instead of hanging.
const REPLY_WAIT: Duration = Duration::from_secs(20);

/// A size of every class, up to the IPv4 maximum.
const SIZES_V4: [usize; 9] = [0, 1, 171, 2048, 2049, 4096, 9000, 32768, 65_507];
/// The IPv6 maximum (65,535 minus the UDP header).
const MAX_V6: usize = 65_527;

/// Datagram `seq` of `len` bytes: a pattern that differs per datagram and per byte.
fn payload(seq: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ seq.wrapping_mul(101) ^ (i >> 8)) as u8)
        .collect()
}

fn addr(ip: &str, port: &str) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// Sends each of `sizes` to `server` and expects it back whole before the next.
fn udp_echoes(server: SocketAddr, sizes: &[usize]) {
    let local = if server.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let client = UdpSocket::bind(local).unwrap();
    client.set_read_timeout(Some(REPLY_WAIT)).unwrap();
    let mut buf = vec![0u8; 65_536];
    for (seq, &len) in sizes.iter().enumerate() {
        let sent = payload(seq, len);
        assert_eq!(client.send_to(&sent, server).unwrap(), len);
        let (got, from) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|err| panic!("no echo of {len} bytes: {err}"));
        assert_eq!(from, server);
        assert_eq!(got, len, "echo of a {len}-byte datagram");
        assert!(buf[..got] == sent[..], "echo of {len} bytes differs");
    }
}

/// One line to the TCP echo server and back.
fn tcp_echoes(server: SocketAddr) {
    let mut stream = TcpStream::connect(server).unwrap();
    stream.set_read_timeout(Some(REPLY_WAIT)).unwrap();
    stream.write_all(b"hello again\n").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"hello again\n");
}

#[test]
fn udp_echo_server_echoes_every_size_whole() {
    for backend in BACKENDS {
        let server = EchoServer::start(&["--udp", "127.0.0.1:0", "--backend", backend], &["udp"]);
        udp_echoes(addr("127.0.0.1", server.port()), &SIZES_V4);
        let (status, log) = server.stop_logged();
        assert!(status.success(), "{backend}: {log}");
        // No connections, so no word of connection timeouts.
        assert!(!log.contains("timeouts:"), "{backend}: {log}");

        let server = EchoServer::start(&["--udp", "[::1]:0", "--backend", backend], &["udp"]);
        let mut sizes = SIZES_V4.to_vec();
        sizes.push(MAX_V6);
        udp_echoes(addr("[::1]", server.port()), &sizes);
        assert!(server.stop().success(), "{backend}");
    }
}

/// Starts a TCP and UDP echo server, has it serve once on each (so its multishot accept
/// and receive are armed), ends it with `end`, then starts another on the same ports.
fn restart_on_the_same_ports(backend: &str, end: impl Fn(EchoServer, SocketAddr, SocketAddr)) {
    let first = EchoServer::start(
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
    let tcp = addr("127.0.0.1", &first.ports[0]);
    let udp = addr("127.0.0.1", &first.ports[1]);
    tcp_echoes(tcp);
    udp_echoes(udp, &[100]);
    end(first, tcp, udp);
    // The new process binds both ports on its first start (EchoServer::start fails
    // the test if it does not print both `listening` lines).
    let (tcp_arg, udp_arg) = (tcp.to_string(), udp.to_string());
    let again = EchoServer::start(
        &["--tcp", &tcp_arg, "--udp", &udp_arg, "--backend", backend],
        &["tcp", "udp"],
    );
    assert_eq!(
        again.ports,
        [tcp.port().to_string(), udp.port().to_string()]
    );
    // Many connections and flows: the kernel spreads them over the new server's
    // SO_REUSEPORT sockets, and any that went to a socket the old process still held
    // would be reset or lost.
    for _ in 0..16 {
        tcp_echoes(tcp);
        udp_echoes(udp, &[100]);
    }
    udp_echoes(udp, &[100, 65_507]);
    assert!(again.stop().success(), "{backend}");
}

#[test]
fn a_server_restarted_right_after_sigkill_gets_its_ports() {
    for backend in BACKENDS {
        restart_on_the_same_ports(backend, |server, _, _| {
            // On io_uring the kernel tears the dead process's ring down after it is gone,
            // and its armed operations hold both sockets a few milliseconds longer: the
            // new server's bind waits them out.
            let status = server.kill();
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{backend}");
        });
    }
}

#[test]
fn a_server_stopped_with_sigterm_frees_its_ports_at_once() {
    for backend in BACKENDS {
        restart_on_the_same_ports(backend, |server, tcp, udp| {
            assert!(server.stop().success(), "{backend}");
            // A clean exit cancels and reaps every operation first: a bind with no
            // retry succeeds right away (std's listener sets SO_REUSEADDR, as ours).
            let listener = TcpListener::bind(tcp)
                .unwrap_or_else(|err| panic!("{backend}: TCP port still held: {err}"));
            let socket = UdpSocket::bind(udp)
                .unwrap_or_else(|err| panic!("{backend}: UDP port still held: {err}"));
            drop((listener, socket));
        });
    }
}

/// The server side's second addresses, on prefixes of their own: replying to the
/// client (on A_OUTER's prefix, or fd71::/64) the kernel would pick the first address.
const A_SECOND: &str = "192.168.72.1";
const A_FIRST_V6: &str = "fd71::1";
const A_SECOND_V6: &str = "fd72::1";
const B_V6: &str = "fd71::2";

#[test]
fn udp_echo_server_on_a_wildcard_replies_from_the_address_asked() {
    let pair = match Pair::create("usrc") {
        Ok(pair) => pair,
        Err(why) => return netns::skip(&why),
    };
    let a_addrs = [
        format!("{A_SECOND}/24"),
        format!("{A_FIRST_V6}/64"),
        format!("{A_SECOND_V6}/64"),
    ];
    let mut setup: Vec<Result<String, String>> = a_addrs
        .iter()
        .map(|net| {
            pair.a
                .exec(&["ip", "addr", "add", net, "dev", "rsva", "nodad"])
        })
        .collect();
    setup.push(pair.b.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{B_V6}/64"),
        "dev",
        "rsvb",
        "nodad",
    ]));
    setup.push(
        pair.b
            .exec(&["ip", "route", "add", "192.168.72.0/24", "dev", "rsvb"]),
    );
    setup.push(
        pair.b
            .exec(&["ip", "route", "add", "fd72::/64", "dev", "rsvb"]),
    );
    if let Some(Err(why)) = setup.into_iter().find(Result::is_err) {
        return netns::skip(&why);
    }
    let clients = pair.b.run(|| {
        let v4 = UdpSocket::bind(format!("{B_OUTER}:0")).unwrap();
        let v6 = UdpSocket::bind(format!("[{B_V6}]:0")).unwrap();
        for client in [&v4, &v6] {
            client.set_read_timeout(Some(REPLY_WAIT)).unwrap();
        }
        (v4, v6)
    });
    for backend in BACKENDS {
        for wildcard in ["0.0.0.0:0", "[::]:0"] {
            let server = EchoServer::start_with(
                &["--udp", wildcard, "--backend", backend, "--threads", "1"],
                &["udp"],
                Setup {
                    netns: Some(pair.a.name()),
                    ..Setup::default()
                },
            );
            let mut asks = vec![(&clients.0, A_OUTER), (&clients.0, A_SECOND)];
            if wildcard.starts_with('[') {
                asks.extend([(&clients.1, A_FIRST_V6), (&clients.1, A_SECOND_V6)]);
            }
            for (client, ip) in asks {
                let to: SocketAddr = match ip.contains(':') {
                    true => format!("[{ip}]:{}", server.port()).parse().unwrap(),
                    false => addr(ip, server.port()),
                };
                client.send_to(ip.as_bytes(), to).unwrap();
                let mut buf = [0u8; 64];
                let (got, from) = client
                    .recv_from(&mut buf)
                    .unwrap_or_else(|err| panic!("{backend} {wildcard}: no echo from {to}: {err}"));
                assert_eq!(&buf[..got], ip.as_bytes());
                assert_eq!(from, to, "{backend} {wildcard}: the reply came from {from}");
            }
            server.stop();
        }
    }
}

/// A second echo server on a port a first one serves (the same command line run twice)
/// fails with AddressAlreadyInUse, on one thread or several, for TCP and UDP: before, it
/// joined the first one's SO_REUSEPORT group and the kernel gave it part of the first
/// one's clients, neither saying a word.
#[test]
fn a_second_server_on_a_port_one_serves_is_refused() {
    for backend in BACKENDS {
        let first = EchoServer::start(
            &[
                "--tcp",
                "127.0.0.1:0",
                "--udp",
                "127.0.0.1:0",
                "--threads",
                "2",
                "--backend",
                backend,
            ],
            &["tcp", "udp"],
        );
        let (tcp, udp) = (&first.ports[0], &first.ports[1]);
        for (kind, port) in [("--tcp", tcp), ("--udp", udp)] {
            for threads in ["1", "2"] {
                let out = util::output_within(
                    std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
                        .args(["echo-server", kind, &format!("127.0.0.1:{port}")])
                        .args(["--threads", threads, "--backend", backend])
                        .env_remove("RINGSOCK_BACKEND"),
                );
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "{backend} {kind} {threads}: {stderr}"
                );
                assert!(
                    stderr.contains("error: AddressAlreadyInUse: "),
                    "{backend} {kind} {threads}: {stderr}"
                );
            }
        }
        // The first one still serves both.
        tcp_echoes(addr("127.0.0.1", tcp));
        udp_echoes(addr("127.0.0.1", udp), &[172]);
        assert!(first.stop().success(), "{backend}");
    }
}

/// Sends `payload` to 127.0.0.1:`port` as a datagram whose source is 127.0.0.1:`port`
/// itself, as a forger would.
fn forge_from_itself(port: u16, payload: &[u8]) {
    forge(([127, 0, 0, 1], port), ([127, 0, 0, 1], port), payload);
}

/// Sends `payload` to `to` as a datagram whose source is `from` (an address of this
/// host), as a forger would, through a raw socket bound to it (the tests run as root).
fn forge(from: ([u8; 4], u16), to: ([u8; 4], u16), payload: &[u8]) {
    let sockaddr = |ip: [u8; 4]| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let len_of = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    #[allow(unsafe_code)]
    // SAFETY: socket has no memory preconditions; the descriptor is closed below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP) };
    assert!(raw >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let source = sockaddr(from.0);
    #[allow(unsafe_code)]
    // SAFETY: the address is live for the call, with its length.
    let bound = unsafe { libc::bind(raw, (&source as *const libc::sockaddr_in).cast(), len_of) };
    assert_eq!(bound, 0, "raw bind: {}", std::io::Error::last_os_error());
    let len = (8 + payload.len()) as u16;
    let mut datagram = Vec::with_capacity(len as usize);
    datagram.extend_from_slice(&from.1.to_be_bytes()); // source port
    datagram.extend_from_slice(&to.1.to_be_bytes()); // destination port
    datagram.extend_from_slice(&len.to_be_bytes());
    datagram.extend_from_slice(&[0, 0]); // no checksum (allowed over IPv4)
    datagram.extend_from_slice(payload);
    let destination = sockaddr(to.0);
    #[allow(unsafe_code)]
    // SAFETY: the buffer and the address are live for the call, with their lengths.
    let sent = unsafe {
        libc::sendto(
            raw,
            datagram.as_ptr().cast(),
            datagram.len(),
            0,
            (&destination as *const libc::sockaddr_in).cast(),
            len_of,
        )
    };
    let err = std::io::Error::last_os_error();
    #[allow(unsafe_code)]
    // SAFETY: our own descriptor, closed once.
    unsafe {
        libc::close(raw)
    };
    assert_eq!(sent, datagram.len() as isize, "raw send: {err}");
}

/// On a wildcard address the server receives on every address of the host: a datagram
/// forged from another of them, with the server's port, would have it echo to itself.
#[test]
fn a_wildcard_udp_echo_server_does_not_answer_another_of_its_addresses() {
    for backend in BACKENDS {
        let server = EchoServer::start(
            &["--udp", "0.0.0.0:0", "--threads", "1", "--backend", backend],
            &["udp"],
        );
        let port: u16 = server.port().parse().unwrap();
        forge(([127, 0, 0, 2], port), ([127, 0, 0, 1], port), b"loop");
        server.wait_for_stderr(
            "the datagram from another of its addresses dropped",
            |lines| {
                lines.iter().any(|l| {
                    l.contains("dropped a datagram from 127.0.0.2") && l.contains("own address")
                })
            },
        );
        udp_echoes(addr("127.0.0.1", server.port()), &[0, 172]);
        assert!(server.stop().success(), "{backend}");
    }
}

/// Two echo servers on unprivileged ports, set answering each other by one datagram
/// forged from one to the other: the per-source limit drops it once they answer each
/// other faster than the limit, and the loop ends; clients are still served.
#[test]
fn a_forged_datagram_between_two_echo_servers_dies_at_the_rate_limit() {
    for backend in BACKENDS {
        let start = || {
            EchoServer::start(
                &[
                    "--udp",
                    "127.0.0.1:0",
                    "--udp-rate",
                    "100",
                    "--backend",
                    backend,
                ],
                &["udp"],
            )
        };
        let (first, second) = (start(), start());
        let ports: Vec<u16> = [&first, &second]
            .iter()
            .map(|server| server.port().parse().unwrap())
            .collect();
        forge(
            ([127, 0, 0, 1], ports[1]),
            ([127, 0, 0, 1], ports[0]),
            b"ping-pong",
        );
        let limited = |lines: &[String]| {
            lines
                .iter()
                .any(|l| l.contains("dropped a datagram") && l.contains("over 100 a second"))
        };
        // One of them drops it: the one datagram that went round is gone.
        let deadline = std::time::Instant::now() + util::MUST_HAPPEN;
        while !limited(&first.stderr()) && !limited(&second.stderr()) {
            assert!(
                std::time::Instant::now() < deadline,
                "{backend}: neither server dropped the datagram going round:\n{}\n{}",
                first.stderr().join("\n"),
                second.stderr().join("\n")
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for server in [&first, &second] {
            udp_echoes(addr("127.0.0.1", server.port()), &[172]);
        }
        assert!(first.stop().success(), "{backend}");
        assert!(second.stop().success(), "{backend}");
    }
}

#[test]
fn udp_echo_server_does_not_answer_its_own_address_or_a_service_port() {
    for backend in BACKENDS {
        let server = EchoServer::start(&["--udp", "127.0.0.1:0", "--backend", backend], &["udp"]);
        let port: u16 = server.port().parse().unwrap();
        let target = addr("127.0.0.1", server.port());
        // A forged datagram from the server's own address: its echo would come back to
        // it for ever.
        forge_from_itself(port, b"loop");
        server.wait_for_stderr("the datagram from its own address dropped", |lines| {
            lines.iter().any(|l| {
                l.contains("dropped a datagram from 127.0.0.1") && l.contains("own address")
            })
        });
        // A client on another loopback address with the server's port is a client.
        let neighbour = UdpSocket::bind(addr("127.0.0.2", server.port())).unwrap();
        neighbour.set_read_timeout(Some(REPLY_WAIT)).unwrap();
        neighbour.send_to(b"neighbour", target).unwrap();
        let mut buf = [0u8; 16];
        let (got, from) = neighbour.recv_from(&mut buf).expect("echoed");
        assert_eq!(
            (&buf[..got], from),
            (&b"neighbour"[..], target),
            "{backend}"
        );
        // A service port (below 1024): an answer could set two services talking for ever.
        let service = (600..1024)
            .find_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
            .expect("a free port below 1024 (the tests run as root)");
        service.send_to(b"loop", target).unwrap();
        server.wait_for_stderr("the datagram from a service port dropped", |lines| {
            lines
                .iter()
                .any(|l| l.contains("dropped a datagram") && l.contains("service port"))
        });
        // It was not answered, and a client is still served.
        service.set_nonblocking(true).unwrap();
        let answered = service.recv_from(&mut buf);
        assert!(answered.is_err(), "{backend}: answered {answered:?}");
        udp_echoes(target, &[0, 172]);
        assert!(server.stop().success(), "{backend}");
    }
}
