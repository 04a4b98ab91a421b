//! `ringsock tunnel` between two network namespaces, on both drivers: traffic passes
//! byte-exact without outer fragments; forged, replayed, truncated and garbage
//! datagrams are dropped and counted; a wrong key passes nothing; restarts and address
//! changes are followed; SIGTERM removes the interface.

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use util::tunnel_pair::netns::skip;
use util::tunnel_pair::{
    ip_counters, ping, ping_until, Pair, TunnelProc, A_INNER, A_OUTER, B_INNER, B_OUTER, TUN,
};

const BACKENDS: [&str; 2] = ["uring", "epoll"];

fn pair(tag: &str) -> Option<Pair> {
    match Pair::create(tag) {
        Ok(pair) => Some(pair),
        Err(why) => {
            skip(&why);
            None
        }
    }
}

/// A's tunnel: listening alone on `listen`.
fn start_a(pair: &Pair, backend: &str, key: &std::path::Path, listen: &str) -> TunnelProc {
    start_a_on(pair, backend, key, listen, "1")
}

/// A's tunnel on `threads` threads.
fn start_a_on(
    pair: &Pair,
    backend: &str,
    key: &std::path::Path,
    listen: &str,
    threads: &str,
) -> TunnelProc {
    let args = [
        "--tun",
        TUN,
        "--listen",
        listen,
        "--key",
        key.to_str().unwrap(),
        "--threads",
        threads,
    ];
    TunnelProc::start(&pair.a, backend, &args, Some(A_INNER))
}

/// B's tunnel: on any address of its namespace, with `peer` as its peer.
fn start_b(pair: &Pair, backend: &str, key: &std::path::Path, peer: &str) -> TunnelProc {
    start_b_on(pair, backend, key, peer, "1")
}

/// B's tunnel on `threads` threads.
fn start_b_on(
    pair: &Pair,
    backend: &str,
    key: &std::path::Path,
    peer: &str,
    threads: &str,
) -> TunnelProc {
    let key = key.to_str().unwrap();
    let args = [
        "--tun",
        TUN,
        "--listen",
        "0.0.0.0:0",
        "--peer",
        peer,
        "--key",
        key,
        "--threads",
        threads,
    ];
    TunnelProc::start(&pair.b, backend, &args, Some(B_INNER))
}

const A_LISTEN: &str = "192.168.71.1:51820";

/// A on A_LISTEN listening alone; B with A as its peer; their keys made from the
/// lengths of `key_a` and `key_b`.
fn tunnels(pair: &Pair, backend: &str, key_a: &str, key_b: &str) -> (TunnelProc, TunnelProc) {
    let a_key = pair.key("a.key", key_a.len() as u8);
    let b_key = pair.key("b.key", key_b.len() as u8);
    let a = start_a(pair, backend, &a_key, A_LISTEN);
    let b = start_b(pair, backend, &b_key, A_LISTEN);
    (a, b)
}

/// Deterministic bytes (xorshift), so a corrupted byte is found where it went wrong.
fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Sends `data` over TCP from namespace B to A's address `to` (inside the tunnel);
/// what A received.
fn transfer(pair: &Pair, to: std::net::IpAddr, data: Vec<u8>) -> Vec<u8> {
    let (port_tx, port_rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            pair.a.run(move || {
                let listener = TcpListener::bind((to, 0)).unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                let (mut conn, _) = listener.accept().unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut got = Vec::new();
                conn.read_to_end(&mut got).unwrap();
                got
            })
        });
        let port: u16 = port_rx.recv().unwrap();
        pair.b.run(move || {
            let addr = SocketAddr::new(to, port);
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
            conn.set_write_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            conn.write_all(&data).unwrap();
        });
        server.join().unwrap()
    })
}

/// Sends `conns` different patterns of `len` bytes at once, one TCP connection each, from
/// namespace B to A's address `to`; what A received on each, in the order sent.
fn parallel_transfers(pair: &Pair, to: std::net::IpAddr, conns: usize, len: usize) -> Vec<bool> {
    let (port_tx, port_rx) = mpsc::channel();
    let data = move |i: usize| {
        let mut data = pattern(len);
        data.iter_mut().for_each(|b| *b ^= i as u8);
        data
    };
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            pair.a.run(move || {
                let listener = TcpListener::bind((to, 0)).unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                let readers: Vec<_> = (0..conns)
                    .map(|_| {
                        let (mut conn, _) = listener.accept().unwrap();
                        std::thread::spawn(move || {
                            conn.set_read_timeout(Some(Duration::from_secs(20)))
                                .unwrap();
                            let mut index = [0u8; 1];
                            conn.read_exact(&mut index).unwrap();
                            let mut got = Vec::new();
                            conn.read_to_end(&mut got).unwrap();
                            (index[0] as usize, got)
                        })
                    })
                    .collect();
                let mut got: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
                got.sort_by_key(|(index, _)| *index);
                got
            })
        });
        let port: u16 = port_rx.recv().unwrap();
        pair.b.run(move || {
            let writers: Vec<_> = (0..conns)
                .map(|i| {
                    std::thread::spawn(move || {
                        let addr = SocketAddr::new(to, port);
                        let mut conn =
                            TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
                        conn.set_write_timeout(Some(Duration::from_secs(20)))
                            .unwrap();
                        conn.write_all(&[i as u8]).unwrap();
                        conn.write_all(&data(i)).unwrap();
                    })
                })
                .collect();
            writers.into_iter().for_each(|w| w.join().unwrap());
        });
        let got = server.join().unwrap();
        assert_eq!(got.len(), conns);
        got.into_iter()
            .enumerate()
            .map(|(i, (index, bytes))| index == i && bytes == data(i))
            .collect()
    })
}

fn frag_counters(pair: &Pair) -> Vec<u64> {
    [&pair.a, &pair.b]
        .iter()
        .flat_map(|ns| {
            let c = ip_counters(ns);
            [c["FragCreates"], c["ReasmReqds"], c["FragFails"]]
        })
        .collect()
}

#[test]
fn ping_and_a_64_mib_transfer_pass_byte_exact_without_outer_fragments() {
    for backend in BACKENDS {
        let Some(pair) = pair("tp") else { return };
        let (a, b) = tunnels(&pair, backend, "k", "k");
        assert!(
            ping_until(&pair.b, A_INNER, 5),
            "{backend}: no ping through the tunnel"
        );

        let before = frag_counters(&pair);
        let data = pattern(64 << 20);
        let got = transfer(&pair, A_INNER.parse().unwrap(), data.clone());
        assert!(
            got == data,
            "{backend}: {} of {} bytes, or different",
            got.len(),
            data.len()
        );
        // Packets of exactly the TUN's MTU (1420 = 1392 + 28), don't-fragment set.
        assert!(
            ping(&pair.b, A_INNER, &["-M", "do", "-s", "1392"]),
            "{backend}: MTU-sized ping"
        );
        assert!(
            ping(&pair.b, A_INNER, &["-s", "16"]),
            "{backend}: small ping"
        );
        assert_eq!(
            frag_counters(&pair),
            before,
            "{backend}: IP fragments on the veth"
        );
        // One byte over the MTU with don't-fragment is refused at the TUN; without it,
        // the inner packet is fragmented and reassembled, and the tunnel carries it.
        assert!(
            !ping(&pair.b, A_INNER, &["-M", "do", "-s", "1393"]),
            "{backend}"
        );
        assert!(
            ping(&pair.b, A_INNER, &["-s", "3000"]),
            "{backend}: a 3000-byte ping"
        );

        let stats_b = b.stop();
        let stats_a = a.stop();
        assert!(stats_a["rx_bytes"] >= 64 << 20, "{backend}: {stats_a:?}");
        assert_eq!(stats_b["tx_send_errors"], 0, "{backend}: {stats_b:?}");
        for key in ["rx_auth_failed", "rx_replayed", "rx_malformed"] {
            assert_eq!(stats_a[key], 0, "{backend}: {key} {stats_a:?}");
        }
    }
}

#[test]
fn two_threads_each_side_pass_ping_and_parallel_transfers_byte_exact() {
    for backend in BACKENDS {
        let Some(pair) = pair("tm") else { return };
        let key = pair.key("k", 1);
        let a = start_a_on(&pair, backend, &key, A_LISTEN, "2");
        let b = start_b_on(&pair, backend, &key, A_LISTEN, "2");
        // One queue per thread on each side.
        for ns in [&pair.a, &pair.b] {
            let queues = ns
                .exec(&["ls", &format!("/sys/class/net/{TUN}/queues")])
                .unwrap();
            assert!(queues.contains("rx-1"), "{backend}: {queues}");
        }
        assert!(
            ping_until(&pair.b, A_INNER, 5),
            "{backend}: no ping through the tunnel"
        );
        // 8 connections of 2 MiB: the kernel picks a queue per flow, so both threads
        // of each side seal and open.
        let exact = parallel_transfers(&pair, A_INNER.parse().unwrap(), 8, 2 << 20);
        assert!(exact.iter().all(|&ok| ok), "{backend}: {exact:?}");
        assert!(ping(&pair.a, B_INNER, &[]), "{backend}: ping from A");

        let stats_b = b.stop();
        let stats_a = a.stop();
        assert!(stats_a["rx_bytes"] >= 16 << 20, "{backend}: {stats_a:?}");
        for stats in [&stats_a, &stats_b] {
            for key in ["rx_auth_failed", "rx_replayed", "rx_malformed"] {
                assert_eq!(stats[key], 0, "{backend}: {key} {stats:?}");
            }
            assert_eq!(stats["sessions"], 1, "{backend}: one handshake {stats:?}");
        }
        assert!(
            pair.a.exec(&["ip", "link", "show", TUN]).is_err(),
            "{backend}: the interface A created outlived its threads"
        );
    }
}

/// A UDP relay in A's namespace between B and A's tunnel, which keeps the datagrams B
/// sends and can inject others.
struct Relay {
    socket: UdpSocket,
    tunnel: SocketAddr,
    b: Option<SocketAddr>,
    /// B's data datagrams.
    seen: Vec<Vec<u8>>,
    /// B's Inits.
    inits: Vec<Vec<u8>>,
    /// A's Responses.
    responses: Vec<Vec<u8>>,
    /// Sent to A's tunnel just before the Response A sends to each Init of B's is
    /// passed on to B: it is in A's socket before B can have answered that Response.
    before_response: Option<Vec<u8>>,
    /// An Init of B's went to A, and the Response to it has not come back yet.
    init_passed: bool,
}

impl Relay {
    /// A relay on A's veth address in front of A's tunnel at A_LISTEN, and its address
    /// for B's `--peer`.
    fn new(pair: &Pair) -> (Relay, String) {
        let socket = pair.a.run(move || UdpSocket::bind((A_OUTER, 0)).unwrap());
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let addr = socket.local_addr().unwrap().to_string();
        let relay = Relay {
            socket,
            tunnel: A_LISTEN.parse().unwrap(),
            b: None,
            seen: Vec::new(),
            inits: Vec::new(),
            responses: Vec::new(),
            before_response: None,
            init_passed: false,
        };
        (relay, addr)
    }

    /// Forwards both ways for `rounds` datagrams or until quiet.
    fn pump(&mut self, rounds: usize) {
        let mut buf = vec![0u8; 65536];
        for _ in 0..rounds {
            let Ok((n, from)) = self.socket.recv_from(&mut buf) else {
                return;
            };
            if from == self.tunnel {
                if buf[0] == 2 {
                    self.responses.push(buf[..n].to_vec());
                }
                if let (2, true, Some(inject)) = (buf[0], self.init_passed, &self.before_response) {
                    let _ = self.socket.send_to(inject, self.tunnel);
                    self.init_passed = false;
                }
                if let Some(b) = self.b {
                    let _ = self.socket.send_to(&buf[..n], b);
                }
            } else {
                self.b = Some(from);
                match buf[0] {
                    1 => {
                        self.inits.push(buf[..n].to_vec());
                        self.init_passed = true;
                    }
                    4 if n > 32 => self.seen.push(buf[..n].to_vec()),
                    _ => {}
                }
                let _ = self.socket.send_to(&buf[..n], self.tunnel);
            }
        }
    }

    /// Pings A from B through the relay (see [`ping_until`]), forwarding meanwhile.
    fn ping_through(&mut self, pair: &Pair, rounds: usize) -> bool {
        std::thread::scope(|scope| {
            let pinger = scope.spawn(|| ping_until(&pair.b, A_INNER, rounds));
            while !pinger.is_finished() {
                self.pump(10);
            }
            pinger.join().unwrap()
        })
    }
}

/// A on A_LISTEN on `a_threads` threads, a relay in front of it, and B with the relay
/// as its peer, once a ping passes through.
fn through_relay(
    pair: &Pair,
    backend: &str,
    key: &std::path::Path,
    a_threads: &str,
) -> (TunnelProc, Relay, TunnelProc) {
    let a = start_a_on(pair, backend, key, A_LISTEN, a_threads);
    let (mut relay, relay_addr) = Relay::new(pair);
    let b = start_b(pair, backend, key, &relay_addr);
    assert!(
        relay.ping_through(pair, 5),
        "{backend}: no ping through the relay"
    );
    (a, relay, b)
}

#[test]
fn forged_replayed_truncated_and_garbage_datagrams_are_dropped_and_counted() {
    for backend in BACKENDS {
        let Some(pair) = pair("tf") else { return };
        let key = pair.key("k", 1);
        let tunnel: SocketAddr = A_LISTEN.parse().unwrap();
        let (a, mut relay, b) = through_relay(&pair, backend, &key, "1");
        let sealed = relay.seen.last().expect("a data datagram").clone();

        // Injected from the relay's own address (the peer's), and from another socket.
        let other = pair.a.run(move || UdpSocket::bind((A_OUTER, 0)).unwrap());
        // The replay window is checked before the tag: a copy with a counter already
        // seen is a replay whatever else changed, so the forgeries take a fresh one.
        let fresh = |mut datagram: Vec<u8>| {
            datagram[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
            datagram
        };
        let mut tampered = sealed.clone();
        let at = tampered.len() - 20;
        tampered[at] ^= 0x40;
        let tampered = fresh(tampered);
        let mut forged_init = vec![1u8, 0, 0, 0];
        forged_init.extend_from_slice(&[0x5a; 80]);
        let injected: Vec<(Vec<u8>, &str)> = vec![
            (sealed.clone(), "replay"),
            (tampered, "tampered"),
            (fresh(sealed[..sealed.len() - 1].to_vec()), "truncated"),
            (sealed[..20].to_vec(), "cut to a header"),
            (vec![0x99; 200], "garbage"),
            (vec![4; 64], "garbage with the data type"),
            (forged_init, "forged init"),
            (Vec::new(), "empty"),
        ];
        for (datagram, _) in &injected {
            relay.socket.send_to(datagram, tunnel).unwrap();
            other.send_to(datagram, tunnel).unwrap();
        }
        assert!(
            relay.ping_through(&pair, 3),
            "{backend}: the tunnel stopped passing traffic"
        );
        let stats = a.stop();
        drop(b);
        assert_eq!(stats["rx_replayed"], 2, "{backend}: {stats:?}");
        assert_eq!(
            stats["rx_auth_failed"], 4,
            "{backend}: tampered and truncated: {stats:?}"
        );
        assert_eq!(
            stats["rx_malformed"], 6,
            "{backend}: header-only, garbage, empty: {stats:?}"
        );
        assert_eq!(stats["rx_unknown_session"], 2, "{backend}: {stats:?}");
        assert_eq!(stats["handshakes_rejected"], 2, "{backend}: {stats:?}");
        assert_eq!(
            stats["roams"], 0,
            "{backend}: nothing forged moved the peer: {stats:?}"
        );
    }
}

/// An Init recorded from B's first run, sent to A again as the restarted B (on another
/// port, as a restart with `--listen ...:0` is) handshakes — after A answered B's new
/// Init, before B's first data under it can arrive — is not answered: it does not
/// displace the session A holds for B's new Init, and B's data under it gets through.
/// (Answered, it did: B was kept out for as long as the copies came, as A's own Inits
/// went to B's old port.) A's Response to B's first run, sent to the new B, changes
/// nothing either; both copies are counted.
#[test]
fn a_recorded_init_replayed_while_a_restarted_peer_handshakes_does_not_keep_it_out() {
    for backend in BACKENDS {
        let Some(pair) = pair("ti") else { return };
        let key = pair.key("k", 1);
        let (a, relay, b) = through_relay(&pair, backend, &key, "1");
        let recorded = relay.inits.first().expect("B's Init").clone();
        let response = relay.responses.first().expect("A's Response").clone();
        b.stop();
        drop(relay);

        let (mut relay, relay_addr) = Relay::new(&pair);
        relay.before_response = Some(recorded);
        let b = start_b(&pair, backend, &key, &relay_addr);
        assert!(
            relay.ping_through(&pair, 5),
            "{backend}: the restarted B was kept out"
        );
        // B takes it before the replies of the ping after it.
        let to_b = relay.b.expect("B's address");
        relay.socket.send_to(&response, to_b).unwrap();
        assert!(
            relay.ping_through(&pair, 3),
            "{backend}: after the Response"
        );
        let stats_b = b.stop();
        assert!(
            stats_b["handshakes_replayed"] >= 1,
            "{backend}: the old Response reached B: {stats_b:?}"
        );
        assert_eq!(stats_b["sessions"], 1, "{backend}: {stats_b:?}");
        let stats_a = a.stop();
        assert!(
            stats_a["handshakes_replayed"] >= 1,
            "{backend}: the copy reached A: {stats_a:?}"
        );
        assert_eq!(
            stats_a["rx_unknown_session"], 0,
            "{backend}: B's data under the session A answered was refused: {stats_a:?}"
        );
        assert_eq!(stats_a["roams"], 1, "{backend}: B's new port: {stats_a:?}");
    }
}

#[test]
fn a_datagram_replayed_onto_either_thread_is_dropped_and_counted() {
    for backend in BACKENDS {
        let Some(pair) = pair("tq") else { return };
        let key = pair.key("k", 1);
        let tunnel: SocketAddr = A_LISTEN.parse().unwrap();
        let (a, mut relay, b) = through_relay(&pair, backend, &key, "2");
        let sealed = relay.seen.last().expect("a data datagram").clone();

        // A's two threads are pinned to CPUs and its sockets routed by the CPU that
        // received the datagram, which on a veth is the sender's: a copy sent from each
        // CPU reaches each thread, one of them not the thread that opened the original.
        // Without pinning (one CPU), the copies' 8 source ports spread them by hash.
        let cpus = allowed_cpus();
        for &cpu in &cpus {
            for _ in 0..8 {
                let sealed = sealed.clone();
                pair.a.run(move || {
                    pin_to(cpu);
                    let source = UdpSocket::bind((A_OUTER, 0)).unwrap();
                    source.send_to(&sealed, tunnel).unwrap();
                });
            }
        }
        let copies = cpus.len() as u64 * 8;
        relay.socket.send_to(&sealed, tunnel).unwrap();
        assert!(
            relay.ping_through(&pair, 3),
            "{backend}: the tunnel stopped passing traffic"
        );
        let stats = a.stop();
        drop(b);
        assert_eq!(stats["rx_replayed"], copies + 1, "{backend}: {stats:?}");
        assert_eq!(stats["rx_auth_failed"], 0, "{backend}: {stats:?}");
        assert_eq!(stats["roams"], 0, "{backend}: {stats:?}");
        assert_eq!(stats["sessions"], 1, "{backend}: {stats:?}");
    }
}

/// The CPUs this process may run on (at most the first two: A runs two threads).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain old data; zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of(cpu_set_t) bytes into `set`.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    assert_eq!(rc, 0, "sched_getaffinity");
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .take(2)
        .collect()
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain old data; zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` came from the allowed set, below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size given; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "sched_setaffinity");
}

#[test]
fn threads_out_of_range_are_refused_with_a_clear_message() {
    for threads in ["0", "100000", "many"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .args(["tunnel", "--tun", TUN, "--listen", "127.0.0.1:0"])
            .args(["--key", "/nonexistent", "--threads", threads])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{threads}: {stderr}");
        assert!(stderr.contains("--threads"), "{threads}: {stderr}");
        if threads != "many" {
            assert!(stderr.contains("1..=64"), "{threads}: {stderr}");
        }
    }
}

/// A peer no datagram can reach (port 0, an unspecified address, IPv6 from an IPv4
/// socket) is a usage error, not a tunnel whose every send fails unseen.
#[test]
fn a_peer_that_cannot_be_sent_to_is_a_usage_error() {
    for backend in BACKENDS {
        for (listen, peer, says) in [
            ("127.0.0.1:0", "127.0.0.1:0", "cannot be sent to"),
            ("127.0.0.1:0", "0.0.0.0:51820", "cannot be sent to"),
            ("127.0.0.1:0", "[::]:51820", "cannot be sent to"),
            ("127.0.0.1:0", "[::1]:51820", "is IPv6"),
            ("[::1]:0", "127.0.0.1:51820", "is IPv4"),
            ("[::1]:0", "[::ffff:127.0.0.1]:51820", "is IPv4"),
            ("127.0.0.1:0", "peer.example:51820", "not an ADDR:PORT"),
            ("127.0.0.1:0", "255.255.255.255:51820", "not one host"),
            ("127.0.0.1:0", "224.0.0.1:51820", "not one host"),
            ("[::]:0", "[::ffff:255.255.255.255]:51820", "not one host"),
            ("[::]:0", "[::ffff:224.0.0.1]:51820", "not one host"),
            ("127.0.0.1:51820", "127.0.0.1:51820", "own address"),
            ("0.0.0.0:51820", "127.0.0.1:51820", "own address"),
            ("[::]:51820", "[::1]:51820", "own address"),
            ("[::]:51820", "127.0.0.1:51820", "own address"),
        ] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
                .args(["tunnel", "--tun", TUN, "--listen", listen])
                .args([
                    "--key",
                    "/nonexistent",
                    "--peer",
                    peer,
                    "--backend",
                    backend,
                ])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{backend} {peer}: {stderr}");
            assert!(
                stderr.contains("--peer") && stderr.contains(says),
                "{backend} {peer}: {stderr}"
            );
        }
    }
}

/// The broadcast address of a network of the host is no peer (every send would fail
/// unseen): a usage error, while a host of that network is taken.
#[test]
fn a_peer_at_a_local_networks_broadcast_address_is_a_usage_error() {
    let Some(pair) = pair("tb") else { return };
    pair.a
        .exec(&[
            "ip",
            "addr",
            "add",
            "10.77.0.1/24",
            "brd",
            "+",
            "dev",
            "rsva",
        ])
        .unwrap();
    for backend in BACKENDS {
        for (peer, usage) in [("10.77.0.255:51820", true), ("10.77.0.9:51820", false)] {
            let args = [
                "--tun",
                "a/b",
                "--listen",
                "0.0.0.0:0",
                "--peer",
                peer,
                "--key",
                "/nonexistent",
            ];
            let out = tunnel_command_in(pair.a.name(), backend, &args)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            // A peer that passes goes on to the key, missing here: exit 1.
            let code = if usage { 2 } else { 1 };
            assert_eq!(out.status.code(), Some(code), "{backend} {peer}: {stderr}");
            assert_eq!(
                stderr.contains("broadcast address"),
                usage,
                "{backend} {peer}: {stderr}"
            );
        }
    }
}

/// An IPv4 peer written as IPv6 (`::ffff:a.b.c.d`) is the IPv4 host it names: an IPv4
/// socket reaches it, so the run goes on to the key (missing here).
#[test]
fn a_v4_mapped_peer_of_an_ipv4_socket_is_its_ipv4_host() {
    for backend in BACKENDS {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .args(["tunnel", "--tun", TUN, "--listen", "127.0.0.1:0"])
            .args([
                "--key",
                "/nonexistent",
                "--peer",
                "[::ffff:127.0.0.1]:51820",
            ])
            .args(["--backend", backend])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("is IPv6"), "{backend}: {stderr}");
        assert!(stderr.contains("/nonexistent"), "{backend}: {stderr}");
        assert_ne!(out.status.code(), Some(0), "{backend}: {stderr}");
    }
}

#[test]
fn a_wrong_key_passes_nothing_and_says_so() {
    for backend in BACKENDS {
        let Some(pair) = pair("tk") else { return };
        let (a, b) = tunnels(&pair, backend, "one", "other");
        assert!(
            !ping(&pair.b, A_INNER, &[]),
            "{backend}: traffic passed with the wrong key"
        );
        let stats_b = b.stop();
        let stats_a = a.stop();
        assert!(
            stats_a["handshakes_rejected"] >= 1,
            "{backend}: {stats_a:?}"
        );
        assert_eq!(stats_a["sessions"], 0, "{backend}: {stats_a:?}");
        assert_eq!(stats_a["rx_packets"], 0, "{backend}: {stats_a:?}");
        assert_eq!(stats_b["sessions"], 0, "{backend}: {stats_b:?}");
        assert!(stats_b["tx_no_session"] >= 1, "{backend}: {stats_b:?}");
        assert_eq!(stats_b["tx_packets"], 0, "{backend}: {stats_b:?}");
    }
}

#[test]
fn restarts_get_new_sessions_and_a_moved_peer_is_followed() {
    for backend in BACKENDS {
        let Some(pair) = pair("tr") else { return };
        let (a, b) = tunnels(&pair, backend, "k", "k");
        assert!(ping_until(&pair.b, A_INNER, 5), "{backend}: first ping");

        // B restarts: its new handshake makes new keys, so its counters may start over.
        b.stop();
        let b = start_b(&pair, backend, &pair.key("b.key", 1), A_LISTEN);
        assert!(
            ping_until(&pair.b, A_INNER, 5),
            "{backend}: ping after B restarted"
        );

        // A restarts: B hears nothing under its old session and handshakes again.
        let first_a = a.stop();
        assert_eq!(first_a["sessions"], 2, "{backend}: {first_a:?}");
        assert_eq!(
            first_a["rx_replayed"], 0,
            "{backend}: a nonce came back: {first_a:?}"
        );
        let a = start_a(&pair, backend, &pair.key("a.key", 1), A_LISTEN);
        assert!(
            ping_until(&pair.b, A_INNER, 10),
            "{backend}: ping after A restarted"
        );

        // B moves to another address: A follows once B's data authenticates from there.
        pair.b
            .exec(&["ip", "addr", "del", "192.168.71.2/24", "dev", "rsvb"])
            .unwrap();
        pair.b
            .exec(&["ip", "addr", "add", "192.168.71.3/24", "dev", "rsvb"])
            .unwrap();
        assert!(
            ping_until(&pair.b, A_INNER, 5),
            "{backend}: ping after B moved"
        );
        assert!(
            ping_until(&pair.a, B_INNER, 2),
            "{backend}: A reaches B at its new address"
        );
        let stats_a = a.stop();
        assert!(stats_a["roams"] >= 1, "{backend}: {stats_a:?}");
        assert_eq!(stats_a["rx_replayed"], 0, "{backend}: {stats_a:?}");
        let stats_b = b.stop();
        assert!(
            stats_b["sessions"] >= 2,
            "{backend}: B handshook again: {stats_b:?}"
        );
    }
}

/// SIGTERM deletes an interface the tunnel made; one that was there (multi-queue or
/// not) stays, with the MTU and state it had.
#[test]
fn sigterm_removes_the_interface_it_created_and_keeps_one_it_attached_to() {
    for backend in BACKENDS {
        let Some(pair) = pair("ts") else { return };
        let key = pair.key("k", 1);
        let args = on_loopback(TUN, key.to_str().unwrap());
        let a = TunnelProc::start(&pair.a, backend, &args, None);
        assert!(pair.a.exec(&["ip", "link", "show", TUN]).is_ok());
        a.stop();
        assert!(
            pair.a.exec(&["ip", "link", "show", TUN]).is_err(),
            "{backend}: still there"
        );

        pair.a
            .exec(&[
                "ip",
                "tuntap",
                "add",
                "dev",
                TUN,
                "mode",
                "tun",
                "multi_queue",
            ])
            .unwrap();
        let a = TunnelProc::start(&pair.a, backend, &args, None);
        a.stop();
        assert!(
            pair.a.exec(&["ip", "link", "show", TUN]).is_ok(),
            "{backend}: attached, kept"
        );
        // On two threads (two queues) too: the MTU and state it found come back.
        pair.a
            .exec(&["ip", "link", "set", TUN, "down", "mtu", "1300"])
            .unwrap();
        let mut two = args.to_vec();
        two.extend(["--threads", "2"]);
        sets_up_and_restores(&pair.a, backend, &two, "two threads");
        pair.a.exec(&["ip", "link", "del", TUN]).unwrap();

        // Made as `ip tuntap add` makes one by default (no multi_queue), down, with its
        // own MTU: one thread attaches to it, and leaves it as it found it.
        pair.a
            .exec(&["ip", "tuntap", "add", "dev", TUN, "mode", "tun"])
            .unwrap();
        pair.a
            .exec(&["ip", "link", "set", TUN, "mtu", "1300"])
            .unwrap();
        sets_up_and_restores(&pair.a, backend, &args, "one thread");
        // A tunnel that cannot have its port leaves the interface untouched too.
        let mut holder = std::process::Command::new("ip")
            .args(["netns", "exec", pair.a.name(), "python3", "-c"])
            .arg(
                "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                 s.bind(('127.0.0.1',47999))\nprint('bound',flush=True)\nsys.stdin.read()",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "bound", "{backend}");
        let busy = [
            "--tun",
            TUN,
            "--listen",
            "127.0.0.1:47999",
            "--key",
            key.to_str().unwrap(),
        ];
        let out = tunnel_command(&pair.a, backend, &busy).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
        assert!(
            stderr.contains("AddressAlreadyInUse"),
            "{backend}: {stderr}"
        );
        let untouched = pair.a.exec(&["ip", "link", "show", TUN]).unwrap();
        assert!(
            untouched.contains("mtu 1300") && !untouched.contains(",UP"),
            "{backend}: changed by a tunnel that failed: {untouched}"
        );
        drop(holder.stdin.take());
        holder.wait().unwrap();
        pair.a.exec(&["ip", "link", "del", TUN]).unwrap();
    }
}

#[test]
fn a_bad_key_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("ringsock-badkey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (contents, says) in [
        ("abcd\n", "64 hexadecimal characters"),
        (&"zz".repeat(32)[..], "not one"),
    ] {
        let path = dir.join("key");
        std::fs::write(&path, contents).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .args(["tunnel", "--tun", TUN, "--listen", "127.0.0.1:0", "--key"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("InvalidFile") && stderr.contains(says),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key file other users may read gets a note saying so (the tunnel goes on to its
/// next step, here a name the kernel refuses); one only its owner reads gets none.
#[test]
fn a_key_file_others_may_read_gets_a_note() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("ringsock-keymode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("key");
    std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
    for backend in BACKENDS {
        for (mode, noted) in [(0o644, true), (0o640, true), (0o600, false), (0o400, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let stderr = stopped_at_the_name(backend, &path);
            assert_eq!(
                stderr.contains(&format!("may be read by other users (mode {mode:o})")),
                noted,
                "{backend} {mode:o}: {stderr}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tunnel with the key file `key` and a name the kernel refuses: it reads the key,
/// says what it has to say of it, and stops at the name (exit 1). Its stderr.
fn stopped_at_the_name(backend: &str, key: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(["tunnel", "--tun", "a/b", "--listen", "127.0.0.1:0"])
        .args(["--backend", backend, "--key"])
        .arg(key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{backend} {key:?}: {stderr}");
    assert!(stderr.contains("a/b"), "{backend} {key:?}: {stderr}");
    stderr
}

/// An all-zero key (a placeholder left in place) gets a note saying anyone could guess
/// it; a random-looking one gets none. The tunnel goes on to its next step (here a name
/// the kernel refuses).
#[test]
fn an_all_zero_key_gets_a_note() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("ringsock-keyzero-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("key");
    for backend in BACKENDS {
        for (key, noted) in [("0".repeat(64), true), ("0a".repeat(32), false)] {
            std::fs::write(&path, format!("{key}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let stderr = stopped_at_the_name(backend, &path);
            assert_eq!(
                stderr.contains("all zeros"),
                noted,
                "{backend} {key}: {stderr}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An `--mtu` whose sealed packets are larger than the route to the peer takes (the
/// pair's veth: 1500) gets a warning naming the largest that fits; one that fits gets
/// none. (The tunnel then stops at a name the kernel refuses.)
#[test]
fn an_mtu_larger_than_the_route_to_the_peer_is_warned_about() {
    let Some(pair) = pair("tm") else { return };
    let peer = format!("{B_OUTER}:51820");
    let listen = format!("{A_OUTER}:0");
    for backend in BACKENDS {
        // Sealed over IPv4 a packet grows by 60 bytes: 1440 is the largest that fits.
        for (mtu, warned) in [
            ("9000", true),
            ("1441", true),
            ("1440", false),
            ("1420", false),
        ] {
            let args = [
                "--tun",
                "a/b",
                "--listen",
                &listen,
                "--peer",
                &peer,
                "--key",
                "/nonexistent",
                "--mtu",
                mtu,
            ];
            let out = tunnel_command_in(pair.a.name(), backend, &args)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{backend} {mtu}: {stderr}");
            assert_eq!(
                stderr.contains(&format!("warning: --mtu {mtu}")) && stderr.contains("--mtu 1440"),
                warned,
                "{backend} {mtu}: {stderr}"
            );
        }
    }
}

/// Whether `child` ends within 20 s (polled); killed if not.
fn ends_in_time(child: &mut std::process::Child) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// A key "file" that is a FIFO no one writes to is refused as empty at once (before,
/// the open waited for a writer forever); a pipe whose writer is there, as with
/// `--key <(cat key)`, is read (the tunnel then stops at the next step, here a name
/// the kernel refuses).
#[test]
fn a_key_fifo_without_a_writer_is_refused_and_a_pipe_with_one_is_read() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let dir = std::env::temp_dir().join(format!("ringsock-keyfifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("key");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    for backend in BACKENDS {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned here alone.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut writer = Some(std::fs::File::from(write_end));
        let key_text = format!("{}\n", "ab".repeat(32));
        writer
            .as_mut()
            .unwrap()
            .write_all(key_text.as_bytes())
            .unwrap();
        let pipe = format!("/proc/{}/fd/{}", std::process::id(), fds[0]);
        for (key, says) in [
            (fifo.to_str().unwrap(), "not 0 characters"),
            (&pipe[..], "1 to 15 bytes"),
        ] {
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
                .args(["tunnel", "--tun", "a/b", "--listen", "127.0.0.1:0"])
                .args(["--backend", backend, "--key", key])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            if key == pipe {
                // The key ends where the pipe does: when its writer closes, before or
                // after the tunnel opened it (this test holds the read end meanwhile).
                drop(writer.take());
            }
            assert!(ends_in_time(&mut child), "{backend} {key}: still waiting");
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{backend} {key}: {stderr}");
            assert!(stderr.contains(says), "{backend} {key}: {stderr}");
        }
        drop(read_end);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key file is read only as far as a key can go: /dev/zero and a 1 GiB (sparse) file
/// are refused at once, not read to the end (forever, or into a gigabyte of memory).
#[test]
fn a_key_file_that_never_ends_or_is_huge_is_refused_unread() {
    let dir = std::env::temp_dir().join(format!("ringsock-hugekey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let huge = dir.join("huge");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    for backend in BACKENDS {
        for path in [std::path::Path::new("/dev/zero"), &huge] {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"));
            command
                .args(["tunnel", "--tun", TUN, "--listen", "127.0.0.1:0"])
                .args(["--backend", backend, "--key"])
                .arg(path);
            // SAFETY: setrlimit is async-signal-safe, as a pre_exec hook must be.
            unsafe {
                command.pre_exec(|| {
                    // A reader that reads to the end fails fast out of memory instead of
                    // going on forever (the key is refused long before this matters).
                    let limit = libc::rlimit {
                        rlim_cur: 512 << 20,
                        rlim_max: 512 << 20,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let out = command.output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{backend} {path:?}: {stderr}");
            assert!(
                stderr.contains("InvalidFile") && stderr.contains("not over 4096 bytes"),
                "{backend} {path:?}: {stderr}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The arguments of a tunnel on `tun` with the key file `key`, listening on loopback.
fn on_loopback<'a>(tun: &'a str, key: &'a str) -> [&'a str; 6] {
    ["--tun", tun, "--listen", "127.0.0.1:0", "--key", key]
}

/// `ringsock tunnel ARGS --backend BACKEND` in `ns`.
fn tunnel_command(
    ns: &util::tunnel_pair::netns::Netns,
    backend: &str,
    args: &[&str],
) -> std::process::Command {
    tunnel_command_in(ns.name(), backend, args)
}

/// `ringsock tunnel ARGS --backend BACKEND` in the namespace named `ns`.
fn tunnel_command_in(ns: &str, backend: &str, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new("ip");
    command
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ringsock")])
        .arg("tunnel")
        .args(args)
        .args(["--backend", backend])
        .env_remove("RINGSOCK_BACKEND")
        .stdin(Stdio::null());
    command
}

/// Names the kernel refuses get a message saying what a name may hold; an interface
/// that exists and is no TUN (loopback, the veth) is refused as such, not as one
/// "another process has open" because its carrier is on, and stays.
#[test]
fn a_tun_name_the_kernel_refuses_or_no_tun_is_a_clear_error() {
    const NAME_RULE: &str = "1 to 15 bytes";
    const NO_TUN: &str = "is not a TUN interface";
    for backend in BACKENDS {
        let Some(pair) = pair("tn") else { return };
        let key = pair.key("k", 1);
        for (name, says) in [
            ("a/b", NAME_RULE),
            ("a:b", NAME_RULE),
            ("a b", NAME_RULE),
            (".", NAME_RULE),
            ("..", NAME_RULE),
            ("", NAME_RULE),
            ("sixteen-bytes-xx", NAME_RULE),
            ("a%d%d", "one %d"),
            ("a%s", "one %d"),
            ("a%", "one %d"),
            ("all", "reserved"),
            ("default", "reserved"),
            ("lo", NO_TUN),
            ("rsva", NO_TUN),
        ] {
            let args = on_loopback(name, key.to_str().unwrap());
            let out = tunnel_command(&pair.a, backend, &args).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{backend} {name:?}: {stderr}");
            assert!(
                stderr.contains("InvalidArgument") && stderr.contains(says),
                "{backend} {name:?}: {stderr}"
            );
        }
        assert!(
            pair.a.exec(&["ip", "link", "show", "rsva"]).is_ok(),
            "{backend}: the veth is still there"
        );
    }
}

/// A tunnel process: `ringsock tunnel ARGS` in the namespace named `ns`, its stderr to
/// `stderr`; its stdout after the first line, and that line (empty if it ended first).
fn spawned(
    ns: &str,
    backend: &str,
    args: &[&str],
    stderr: Stdio,
) -> (
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    String,
) {
    let mut child = tunnel_command_in(ns, backend, args)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    (child, stdout, line)
}

/// Runs `ringsock tunnel ARGS` in the namespace named `ns`, which must be refused: no
/// ready line, status 1 (one that started is stopped here rather than left running).
/// Its stderr.
fn refused(ns: &str, backend: &str, args: &[&str]) -> String {
    let (mut child, _, ready) = spawned(ns, backend, args, Stdio::piped());
    if !ready.is_empty() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(ready.is_empty(), "{backend} {args:?}: started: {ready}");
    assert_eq!(out.status.code(), Some(1), "{backend} {args:?}: {stderr}");
    stderr
}

/// A second tunnel on the interface a running one created is refused: attached, it
/// would take part of the first one's packets. The first goes on, and its SIGTERM
/// still removes the interface. So is a tunnel on an interface another program (here
/// this test) has a queue of open.
#[test]
fn a_second_tunnel_on_an_interface_in_use_is_refused() {
    for backend in BACKENDS {
        let Some(pair) = pair("tu") else { return };
        let key = pair.key("k", 1);
        let args = on_loopback(TUN, key.to_str().unwrap());
        let first = TunnelProc::start(&pair.a, backend, &args, None);
        for threads in ["1", "2"] {
            let mut second = args.to_vec();
            second.extend(["--threads", threads]);
            let stderr = refused(pair.a.name(), backend, &second);
            assert!(
                stderr.contains("error: ResourceBusy: ") && stderr.contains("another tunnel"),
                "{backend} {threads}: {stderr}"
            );
        }
        first.stop();
        assert!(
            pair.a.exec(&["ip", "link", "show", TUN]).is_err(),
            "{backend}: the interface outlived its tunnel"
        );

        let name = pair.a.name().to_owned();
        let key = key.to_str().unwrap().to_owned();
        let backend_name = backend.to_owned();
        let stderr = pair.a.run(move || {
            let runtime = ringsock::Runtime::new().unwrap();
            let options = ringsock::tun::TunOptions::default();
            let held = runtime
                .block_on(async { ringsock::tun::TunDevice::create("rstun1", options) })
                .expect("a queue of our own");
            let up = refused(&name, &backend_name, &on_loopback("rstun1", &key));
            // Down, it has no carrier to show the queue: the queue is found all the same.
            let status = std::process::Command::new("ip")
                .args(["link", "set", "rstun1", "down"])
                .status()
                .unwrap();
            assert!(status.success());
            let down = refused(&name, &backend_name, &on_loopback("rstun1", &key));
            drop(held);
            [up, down]
        });
        for stderr in stderr {
            assert!(
                stderr.contains("error: ResourceBusy: ") && stderr.contains("another process"),
                "{backend}: {stderr}"
            );
        }
    }
}

/// Two tunnels started at the same moment on one name: one runs, the other is refused
/// (before, both could pass the in-use check, the first one's interface not up yet,
/// and both ran on it, each with part of its packets).
#[test]
fn of_two_tunnels_started_at_once_on_one_name_one_runs() {
    for backend in BACKENDS {
        let Some(pair) = pair("tw") else { return };
        let key = pair.key("k", 1);
        let args = on_loopback(TUN, key.to_str().unwrap());
        for round in 0..5 {
            // Both started before either's first line is read.
            let mut children: Vec<_> = (0..2)
                .map(|_| {
                    tunnel_command(&pair.a, backend, &args)
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            let ready: Vec<bool> = children
                .iter_mut()
                .map(|child| {
                    let mut line = String::new();
                    BufReader::new(child.stdout.take().unwrap())
                        .read_line(&mut line)
                        .unwrap();
                    line.starts_with("tunnel ")
                })
                .collect();
            for child in &mut children {
                // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
            let errors: Vec<String> = children
                .into_iter()
                .map(|child| {
                    let out = child.wait_with_output().unwrap();
                    String::from_utf8_lossy(&out.stderr).into_owned()
                })
                .collect();
            assert_eq!(
                ready.iter().filter(|r| **r).count(),
                1,
                "{backend} round {round}: {errors:?}"
            );
            assert!(
                errors.iter().any(|e| e.contains("another tunnel")),
                "{backend} round {round}: {errors:?}"
            );
        }
    }
}

/// A tunnel on a UDP port another tunnel listens on is refused with
/// AddressAlreadyInUse, on one thread or several (before, one on several threads
/// joined the other's SO_REUSEPORT group, and the kernel gave it part of the first
/// one's datagrams).
#[test]
fn a_tunnel_on_a_port_another_one_listens_on_is_refused() {
    for backend in BACKENDS {
        for first_threads in ["1", "2"] {
            let Some(pair) = pair("ty") else { return };
            let (mut first, _stdout, ready) =
                started_on_loopback(&pair, backend, first_threads, Stdio::null());
            let listen = ready.trim().rsplit(' ').next().unwrap().to_owned();
            let key = pair.key("k2", 1);
            for threads in ["1", "2"] {
                let args = [
                    "--tun",
                    "rstun1",
                    "--listen",
                    &listen,
                    "--key",
                    key.to_str().unwrap(),
                    "--threads",
                    threads,
                ];
                let stderr = refused(pair.a.name(), backend, &args);
                assert!(
                    stderr.contains("AddressAlreadyInUse"),
                    "{backend} {first_threads} {threads}: {stderr}"
                );
            }
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
            assert_eq!(unsafe { libc::kill(first.id() as i32, libc::SIGTERM) }, 0);
            assert!(first.wait().unwrap().success(), "{backend}");
        }
    }
}

/// A template name (rsq%d) makes one new interface, the kernel picking its number,
/// which every thread's queue then opens (before, each thread made one of its own, the
/// others down, and what they read of the peer was lost); a second tunnel of the same
/// template runs beside it on the next one. Both go when stopped.
#[test]
fn a_template_name_makes_one_interface_for_all_threads() {
    for backend in BACKENDS {
        let Some(pair) = pair("tx") else { return };
        let key = pair.key("k", 1);
        let mut args = on_loopback("rsq%d", key.to_str().unwrap()).to_vec();
        args.extend(["--threads", "2"]);
        let mut children = Vec::new();
        for expected in ["rsq0", "rsq1"] {
            let (child, _, ready) = spawned(pair.a.name(), backend, &args, Stdio::null());
            children.push(child);
            assert!(
                ready.starts_with(&format!("tunnel {expected} udp ")),
                "{backend}: {ready:?}"
            );
            let queues = pair
                .a
                .exec(&["ls", &format!("/sys/class/net/{expected}/queues")])
                .unwrap();
            assert!(queues.contains("rx-1"), "{backend}: {queues}");
        }
        let links = pair.a.exec(&["ip", "-br", "link"]).unwrap();
        assert_eq!(links.matches("rsq").count(), 2, "{backend}: {links}");
        for mut child in children {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
            assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
            assert!(child.wait().unwrap().success(), "{backend}");
        }
        let links = pair.a.exec(&["ip", "-br", "link"]).unwrap();
        assert!(!links.contains("rsq"), "{backend}: {links}");
    }
}

/// A tunnel in A listening on loopback on `threads` threads, its stderr to `stderr`,
/// once it printed its ready line; its stdout after that line, and the line.
fn started_on_loopback(
    pair: &Pair,
    backend: &str,
    threads: &str,
    stderr: Stdio,
) -> (
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    String,
) {
    let key = pair.key("k", 1);
    let mut args = on_loopback(TUN, key.to_str().unwrap()).to_vec();
    args.extend(["--threads", threads]);
    let (child, stdout, ready) = spawned(pair.a.name(), backend, &args, stderr);
    assert!(
        ready.starts_with("tunnel "),
        "{backend} {threads}: {ready:?}"
    );
    (child, stdout, ready)
}

/// SIGINT or SIGTERM while the tunnel is still handshaking with a peer that never
/// answers (nothing listens on its port) ends it cleanly: status 0, its counters
/// printed, the interface it made removed, on one thread or two.
#[test]
fn a_signal_while_handshaking_ends_the_tunnel_cleanly() {
    for backend in BACKENDS {
        for (signal, threads) in [(libc::SIGINT, "1"), (libc::SIGTERM, "2")] {
            let Some(pair) = pair("th") else { return };
            let key = pair.key("k", 1);
            let mut args = on_loopback(TUN, key.to_str().unwrap()).to_vec();
            args.extend(["--peer", "127.0.0.1:9", "--threads", threads]);
            let (mut child, stdout, ready) = spawned(pair.a.name(), backend, &args, Stdio::piped());
            assert!(ready.starts_with("tunnel "), "{backend}: {ready:?}");
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
            assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
            let rest: Vec<String> = stdout.lines().map_while(Result::ok).collect();
            let status = child.wait().unwrap();
            let stderr = util::stderr_of(&mut child);
            assert!(status.success(), "{backend} {signal}: {status} {stderr}");
            assert!(!stderr.contains("panicked"), "{backend} {signal}: {stderr}");
            assert!(
                rest.iter().any(|line| line.starts_with("tunnel stats {")),
                "{backend} {signal}: {rest:?}"
            );
            assert!(
                pair.a.exec(&["ip", "link", "show", TUN]).is_err(),
                "{backend} {signal}: the interface outlived its tunnel"
            );
        }
    }
}

/// A TUN interface deleted under a running tunnel (`ip link del`) ends it with a
/// message that says so and exit status 1, on one thread or two: no hang, no panic.
#[test]
fn a_tun_deleted_under_the_tunnel_ends_it_with_a_clear_error() {
    for backend in BACKENDS {
        for threads in ["1", "2"] {
            let Some(pair) = pair("td") else { return };
            let (mut child, _stdout, _) =
                started_on_loopback(&pair, backend, threads, Stdio::piped());
            pair.a.exec(&["ip", "link", "del", TUN]).unwrap();
            assert!(
                ends_in_time(&mut child),
                "{backend} {threads}: still running without its interface"
            );
            let out = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{backend} {threads}: {stderr}");
            assert!(
                stderr.contains("NetworkIsDown") && stderr.contains(&format!("{TUN} was deleted")),
                "{backend} {threads}: {stderr}"
            );
            assert!(
                !stderr.contains("panicked"),
                "{backend} {threads}: {stderr}"
            );
        }
    }
}

/// A reader of the tunnel's stdout that goes away (`| head -1` once it has the ready
/// line) stops neither the tunnel nor its clean exit: SIGTERM still exits 0 and
/// removes the interface, though the stats line has nowhere to go.
#[test]
fn a_stdout_reader_that_goes_away_does_not_fail_the_tunnel() {
    for backend in BACKENDS {
        for threads in ["1", "2"] {
            let Some(pair) = pair("to") else { return };
            let (mut child, stdout, _) =
                started_on_loopback(&pair, backend, threads, Stdio::null());
            drop(stdout);
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
            assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
            let status = child.wait().unwrap();
            assert!(status.success(), "{backend} {threads}: {status}");
            assert!(
                pair.a.exec(&["ip", "link", "show", TUN]).is_err(),
                "{backend} {threads}: the interface outlived its tunnel"
            );
        }
    }
}

#[test]
fn the_tunnel_benchmark_runs_and_reports_its_fields() {
    // Namespaces must be possible here, as the benchmark makes its own.
    let Some(pair) = pair("tb") else { return };
    drop(pair);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(["bench", "--workload", "tunnel", "--json", "--count", "2000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(json["workload"], "tunnel");
    assert_eq!(json["offloads"], true);
    assert_eq!(json["tcp_bytes"], 256u64 << 20);
    // The tunnels' CPU is measured to the nanosecond: 2,000 datagrams take more than 0.
    for key in [
        "tcp_gbit_s",
        "tcp_tunnel_cpu_ns_per_byte",
        "udp_pps",
        "udp_tunnel_cpu_us_per_packet",
    ] {
        assert!(
            json[key].as_f64().is_some_and(|x| x > 0.0),
            "{key}: {stdout}"
        );
    }
    assert!(
        json["udp_delivered"].as_u64().is_some_and(|n| n > 0),
        "{stdout}"
    );

    // Both tunnels on two threads; the per-packet baseline has none to give.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(["bench", "--workload", "tunnel", "--json", "--count", "2000"])
        .args(["--threads", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(json["threads"], 2, "{stdout}");
    assert_eq!(json["tcp_bytes"], 256u64 << 20, "{stdout}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(["bench", "--workload", "tunnel", "--json", "--threads", "2"])
        .args(["--impl", "std-per-write"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "no threads for the baseline");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(["bench", "--workload", "tcp-batch", "--json", "--no-offload"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "--no-offload is for the tunnel workload"
    );
}

/// `ringsock bench --json --workload tunnel` with more packets than it sends before it
/// is stopped.
fn tunnel_bench() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"));
    command.args([
        "bench",
        "--json",
        "--workload",
        "tunnel",
        "--count",
        "100000000",
    ]);
    command
}

/// Polls `done` (a file that another process writes, say) every 2 ms until it holds;
/// fails with `what` after [`util::MUST_HAPPEN`].
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + util::MUST_HAPPEN;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `ip netns list`: the names starting with `tag`.
fn namespaces_of(tag: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(tag))
        .map(str::to_owned)
        .collect()
}

/// A tunnel bench its `--timeout` ends reports the timeout and exits 1, leaving neither
/// its namespaces nor its key file behind.
#[test]
fn a_tunnel_bench_its_timeout_ends_leaves_nothing_behind() {
    if let Err(why) = util::tunnel_pair::netns::Netns::create("bench-timeout") {
        skip(&why);
        return;
    }
    let child = tunnel_bench()
        .args(["--timeout", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tag = format!("rsb{}", child.id());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("--timeout"), "{line}");
    assert!(namespaces_of(&tag).is_empty(), "{:?}", namespaces_of(&tag));
    assert!(key_files_of(&tag).is_empty(), "the key file is left");
}

/// The key files a tunnel bench run tagged `tag` has in the temporary directory.
fn key_files_of(tag: &str) -> Vec<std::path::PathBuf> {
    let prefix = format!("{tag}-");
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".key")
        })
        .map(|entry| entry.path())
        .collect()
}

/// The bench writes its key to a new file only root can read, under a name nobody can
/// have prepared; what a run killed outright left behind (its namespaces, its key) is
/// deleted by the next run.
#[test]
fn a_tunnel_bench_writes_a_private_key_file_and_clears_what_killed_runs_left() {
    use std::os::unix::fs::PermissionsExt;
    if let Err(why) = util::tunnel_pair::netns::Netns::create("bench-leftovers") {
        skip(&why);
        return;
    }
    // A process id nobody has now: a child that has ended and been reaped.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let dead_tag = format!("rsb{dead}");
    for side in ["a", "b"] {
        let made = std::process::Command::new("ip")
            .args(["netns", "add", &format!("{dead_tag}{side}")])
            .status()
            .unwrap();
        assert!(made.success());
    }
    let stale_key = std::env::temp_dir().join(format!("{dead_tag}-0123456789abcdef.key"));
    std::fs::write(&stale_key, "stale").unwrap();
    // A file of a live process (this test's) with the same shape is left alone.
    let live_key = std::env::temp_dir().join(format!("rsb{}-live.key", std::process::id()));
    std::fs::write(&live_key, "live").unwrap();

    let mut child = tunnel_bench()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tag = format!("rsb{}", child.id());
    wait_until("the bench never set up", || {
        key_files_of(&tag).len() == 1 && namespaces_of(&tag).len() == 2
    });
    let key = key_files_of(&tag).remove(0);
    let meta = std::fs::symlink_metadata(&key).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(
        namespaces_of(&dead_tag).is_empty(),
        "{:?}",
        namespaces_of(&dead_tag)
    );
    assert!(!stale_key.exists(), "a killed run's key file is left");
    assert!(live_key.exists(), "a live process's file was deleted");
    std::fs::remove_file(&live_key).unwrap();
    end_and_check_nothing_is_left(&mut child, libc::SIGTERM);
}

/// A signal that ends `bench --workload tunnel` half-way, SIGHUP of a closed terminal
/// or SIGQUIT as much as SIGTERM, leaves neither its network namespaces nor its key
/// file behind, and the process ends as the signal says.
#[test]
fn a_tunnel_bench_ended_by_a_signal_leaves_nothing_behind() {
    if let Err(why) = util::tunnel_pair::netns::Netns::create("bench-signal") {
        skip(&why);
        return;
    }
    for signal in [libc::SIGHUP, libc::SIGQUIT, libc::SIGTERM] {
        let mut child = tunnel_bench()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let tag = format!("rsb{}", child.id());
        // Key written and both namespaces there: the run is under way.
        wait_until("the bench never set up", || {
            key_files_of(&tag).len() == 1 && namespaces_of(&tag).len() == 2
        });
        end_and_check_nothing_is_left(&mut child, signal);
    }
}

/// Sends `signal` to the tunnel bench `child`, which must end as the signal says and
/// leave neither its namespaces nor its key file behind.
fn end_and_check_nothing_is_left(child: &mut std::process::Child, signal: libc::c_int) {
    let tag = format!("rsb{}", child.id());
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + signal), "signal {signal}");
    assert!(
        namespaces_of(&tag).is_empty(),
        "signal {signal}: {:?}",
        namespaces_of(&tag)
    );
    assert!(
        key_files_of(&tag).is_empty(),
        "signal {signal}: the key file is left"
    );
}

/// The table (no `--json`) runs one tunnel after another in one process: a signal
/// during the second run still deletes that run's namespaces and key file (with a
/// watcher per run, the one that found nothing to delete ended the process first).
#[test]
fn a_tunnel_table_ended_by_a_signal_in_its_second_run_leaves_nothing_behind() {
    if let Err(why) = util::tunnel_pair::netns::Netns::create("bench-table-signal") {
        skip(&why);
        return;
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(["bench", "--workload", "tunnel", "--count", "2000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tag = format!("rsb{}", child.id());
    let set_up = || key_files_of(&tag).len() == 1 && namespaces_of(&tag).len() == 2;
    wait_until("the first run never set up", set_up);
    wait_until("the first run never ended", || {
        key_files_of(&tag).is_empty()
    });
    wait_until("the second run never set up", set_up);
    end_and_check_nothing_is_left(&mut child, libc::SIGINT);
}

/// A tunnel started with `args` on `TUN` (down, MTU 1300 before it) runs it up with
/// MTU 1420, and leaves it down with MTU 1300 again once stopped.
fn sets_up_and_restores(
    ns: &util::tunnel_pair::netns::Netns,
    backend: &str,
    args: &[&str],
    how: &str,
) {
    let tunnel = TunnelProc::start(ns, backend, args, None);
    let during = ns.exec(&["ip", "link", "show", TUN]).unwrap();
    assert!(
        during.contains("mtu 1420") && during.contains(",UP"),
        "{backend} {how}: {during}"
    );
    tunnel.stop();
    let after = ns.exec(&["ip", "link", "show", TUN]).unwrap();
    assert!(
        after.contains("mtu 1300") && !after.contains(",UP"),
        "{backend} {how}: not as it was: {after}"
    );
}

/// A `--mtu` too large for the route (1460 + 60 bytes sealed over a 1500-byte veth,
/// past the warning at start): the full-size packets the kernel refuses are said on
/// stderr while the tunnel runs, not only counted, and small ones still pass.
#[test]
fn sends_the_route_refuses_are_said_while_the_tunnel_runs() {
    for backend in BACKENDS {
        let Some(pair) = pair("te") else { return };
        let key = pair.key("k", 1);
        let key = key.to_str().unwrap();
        let a_args = [
            "--tun", TUN, "--listen", A_LISTEN, "--key", key, "--mtu", "1460",
        ];
        let a = TunnelProc::start(&pair.a, backend, &a_args, Some(A_INNER));
        let b_args = [
            "--tun",
            TUN,
            "--listen",
            "0.0.0.0:0",
            "--peer",
            A_LISTEN,
            "--key",
            key,
            "--mtu",
            "1460",
        ];
        let (mut b, _stdout, ready) = spawned(pair.b.name(), backend, &b_args, Stdio::piped());
        assert!(ready.starts_with("tunnel "), "{backend}: {ready}");
        pair.b
            .exec(&["ip", "addr", "add", &format!("{B_INNER}/24"), "dev", TUN])
            .unwrap();
        let (lines_tx, lines) = mpsc::channel();
        let stderr = b.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        assert!(
            ping_until(&pair.b, A_INNER, 5),
            "{backend}: small packets pass"
        );
        // 1460 bytes inside, don't-fragment: sealed, 1520 bytes the veth cannot take.
        assert!(
            !ping(&pair.b, A_INNER, &["-M", "do", "-s", "1432"]),
            "{backend}"
        );
        let said = loop {
            match lines.recv_timeout(util::MUST_HAPPEN) {
                Ok(line) if line.contains("could not be sent") => break line,
                Ok(_) => continue,
                Err(_) => panic!("{backend}: no line about the refused sends"),
            }
        };
        assert!(said.contains("--mtu"), "{backend}: {said}");
        let _ = b.kill();
        let _ = b.wait();
        a.stop();
    }
}
