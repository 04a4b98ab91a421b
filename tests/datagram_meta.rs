//! What a datagram carries beside its bytes, on both drivers: the traffic class sent is
//! the one received (single sends, output streams with GSO runs, batches to many
//! peers), the destination address and interface of each datagram, receive timestamps,
//! batches to 64 destinations, and (in a network namespace of two addresses) a
//! wildcard server answering from the address each request came to.

mod util;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use ringsock::{Backend, DatagramSocket, Ecn, OutgoingDatagram, SendOptions, TrafficClass};
use util::netns::{self, Netns};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

fn bound(ip: IpAddr) -> DatagramSocket {
    let socket = DatagramSocket::new();
    socket.bind_addr(SocketAddr::new(ip, 0)).unwrap();
    socket
}

fn ef(ecn: Ecn) -> TrafficClass {
    TrafficClass::new(TrafficClass::DSCP_EF, ecn).unwrap()
}

#[test]
fn the_traffic_class_received_is_the_one_sent() {
    util::on_each_receive_path(|_backend: Backend| async move {
        // IPv4, IPv6, and IPv4 through a dual-stack socket (`None`).
        for (server_ip, client_ip) in [(Some(V4), V4), (Some(V6), V6), (None, V4)] {
            let server = match server_ip {
                Some(ip) => bound(ip),
                None => {
                    let dual = DatagramSocket::new();
                    dual.bind("0").unwrap();
                    dual
                }
            };
            server.control().set_receive_traffic_class(true).unwrap();
            let to = SocketAddr::new(client_ip, server.local_addr().unwrap().port());
            let client = bound(client_ip);
            let classes = [
                ef(Ecn::Ect0),
                ef(Ecn::Ect1),
                TrafficClass::new(10, Ecn::Ce).unwrap(),
                TrafficClass::new(0, Ecn::NotEct).unwrap(),
            ];
            // One datagram each.
            for class in classes {
                let options = SendOptions::default().with_traffic_class(class);
                client
                    .send_to_addr_with(b"one".to_vec(), to, &options)
                    .await
                    .0
                    .unwrap();
                let got = util::recv_datagram(&server).await;
                assert_eq!(&got[..], b"one");
                assert_eq!(got.traffic_class(), Some(class), "to {to}");
            }
            // An output stream: a GSO run of equal datagrams keeps the class.
            let class = ef(Ecn::Ect0);
            let options = SendOptions::default().with_traffic_class(class);
            let stream = client.output_stream_to_addr_with(to, &options).unwrap();
            for i in 0..8u8 {
                stream.write(vec![i; 100]).await.unwrap();
            }
            stream.flush().await.unwrap();
            // One GSO send carried all eight, control messages and all.
            assert_eq!(stream.stats().kernel_operations, 1, "to {to}");
            for i in 0..8u8 {
                let got = util::recv_datagram(&server).await;
                assert_eq!(&got[..], &[i; 100][..]);
                assert_eq!(got.traffic_class(), Some(class));
            }
            // A batch: each datagram its own class.
            let batch = classes
                .iter()
                .map(|class| {
                    OutgoingDatagram::new(vec![class.to_byte(); 50], to)
                        .with_options(SendOptions::default().with_traffic_class(*class))
                })
                .collect();
            let results = client.send_many(batch).await.unwrap();
            assert!(results.iter().all(|r| matches!(r, Ok(50))), "{results:?}");
            for class in classes {
                let got = util::recv_datagram(&server).await;
                assert_eq!(got[0], class.to_byte());
                assert_eq!(got.traffic_class(), Some(class));
            }
        }
    });
}

#[test]
fn metadata_is_absent_unless_asked_for() {
    util::on_each_backend(|_backend: Backend| async move {
        let server = bound(V4);
        let client = bound(V4);
        let to = server.local_addr().unwrap();
        let options = SendOptions::default().with_traffic_class(ef(Ecn::Ect0));
        client
            .send_to_addr_with(b"x".to_vec(), to, &options)
            .await
            .0
            .unwrap();
        let got = util::recv_datagram(&server).await;
        assert_eq!(got.traffic_class(), None);
        assert_eq!(got.local_ip(), None);
        assert_eq!(got.interface_index(), None);
        assert_eq!(got.timestamp(), None);
        assert_eq!(got.gro_segment_size(), None);
        // Asked for too late: the ring has no room for it.
        assert!(server.control().set_receive_destination(true).is_err());
        assert!(server.control().set_receive_timestamps(true).is_err());
    });
}

#[test]
fn destination_interface_and_timestamp_are_reported() {
    let lo = loopback_index();
    util::on_each_receive_path(|_backend: Backend| async move {
        for (ip, dual) in [(V4, false), (V6, false), (V4, true)] {
            let server = if dual {
                let socket = DatagramSocket::new();
                socket.bind("0").unwrap();
                socket
            } else {
                bound(ip)
            };
            let control = server.control();
            control.set_receive_destination(true).unwrap();
            control.set_receive_timestamps(true).unwrap();
            control.set_receive_traffic_class(true).unwrap();
            let to = SocketAddr::new(ip, server.local_addr().unwrap().port());
            let client = bound(ip);
            let before = SystemTime::now();
            client.send_to_addr(b"hi".to_vec(), to).await.0.unwrap();
            let got = util::recv_datagram(&server).await;
            let after = SystemTime::now();
            assert_eq!(got.local_ip(), Some(ip), "dual {dual}");
            assert_eq!(got.interface_index(), Some(lo));
            assert_eq!(got.remote_addr(), client.local_addr().unwrap());
            let stamp = got.timestamp().expect("a receive timestamp");
            // The kernel stamped it between the send and the receive (a second of slack
            // for a clock step).
            let slack = Duration::from_secs(1);
            assert!(
                stamp + slack >= before && stamp <= after + slack,
                "{stamp:?}"
            );
            assert_eq!(got.traffic_class(), Some(TrafficClass::default()));
        }
    });
}

fn loopback_index() -> u32 {
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    assert_ne!(index, 0, "no loopback interface");
    index
}

#[test]
fn a_batch_to_64_destinations_delivers_each_datagram_to_its_own_peer() {
    util::on_each_backend(|_backend: Backend| async move {
        let peers: Vec<DatagramSocket> = (0..64).map(|_| bound(V4)).collect();
        let sender = bound(V4);
        // Two equal datagrams per peer: GSO would take both in one send, but never
        // across two peers.
        let mut batch = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            let to = peer.local_addr().unwrap();
            for copy in 0..2u8 {
                let mut data = vec![i as u8; 64];
                data[0] = copy;
                batch.push(OutgoingDatagram::new(data, to));
            }
        }
        let results = sender.send_many(batch).await.unwrap();
        assert_eq!(results.len(), 128);
        assert!(results.iter().all(|r| matches!(r, Ok(64))), "{results:?}");
        for (i, peer) in peers.iter().enumerate() {
            for copy in 0..2u8 {
                let got = util::recv_datagram(peer).await;
                assert_eq!(got.len(), 64);
                assert_eq!(got[0], copy, "peer {i}");
                assert!(got[1..].iter().all(|&b| b == i as u8), "peer {i}");
                assert_eq!(got.remote_addr(), sender.local_addr().unwrap());
            }
        }
        assert_eq!(
            sender
                .send_many(Vec::<OutgoingDatagram>::new())
                .await
                .unwrap()
                .len(),
            0
        );
    });
}

#[test]
fn a_failed_destination_fails_only_its_own_datagrams() {
    util::on_each_backend(|_backend: Backend| async move {
        let peer = bound(V4);
        let to = peer.local_addr().unwrap();
        let sender = bound(V4);
        // An IPv6 destination on an IPv4 socket fails in the kernel (EAFNOSUPPORT),
        // between two good ones.
        let nowhere = SocketAddr::new(V6, 9);
        let batch = vec![
            OutgoingDatagram::new(Bytes::from_static(b"a"), to),
            OutgoingDatagram::new(Bytes::from_static(b"b"), nowhere),
            OutgoingDatagram::new(Bytes::from_static(b"c"), to),
        ];
        let results = sender.send_many(batch).await.unwrap();
        assert!(matches!(results[0], Ok(1)));
        assert!(results[1].is_err(), "{results:?}");
        assert!(matches!(results[2], Ok(1)));
        assert_eq!(&util::recv_datagram(&peer).await[..], b"a");
        assert_eq!(&util::recv_datagram(&peer).await[..], b"c");
        // Options that cannot apply are refused before anything is sent.
        let wrong = SendOptions {
            source: Some(V6),
            ..SendOptions::default()
        };
        let batch = vec![OutgoingDatagram::new(Bytes::from_static(b"d"), to).with_options(wrong)];
        assert!(sender.send_many(batch).await.is_err());
    });
}

#[test]
fn a_paced_datagram_never_arrives_before_its_time() {
    util::on_each_backend(|_backend: Backend| async move {
        let server = bound(V4);
        let client = bound(V4);
        let to = server.local_addr().unwrap();
        let start = Instant::now();
        let past = start
            .checked_sub(Duration::from_millis(500))
            .unwrap_or(start);
        let at = |ms: u64| start + Duration::from_millis(ms);
        // One by one: a time in the past goes at once, a future one not before it.
        for time in [past, at(30), at(60)] {
            let options = SendOptions::default().with_transmit_time(time);
            client
                .send_to_addr_with(b"t".to_vec(), to, &options)
                .await
                .0
                .unwrap();
            util::recv_datagram(&server).await;
            assert!(Instant::now() >= time);
        }
        // A batch: each run of one time leaves at it, in order; equal datagrams of one
        // time may share a GSO send, never two times.
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let times = [None, None, Some(at(20)), Some(at(20)), Some(at(40)), None];
        let batch = times
            .iter()
            .enumerate()
            .map(|(i, time)| {
                let options = SendOptions {
                    transmit_at: *time,
                    ..SendOptions::default()
                };
                OutgoingDatagram::new(vec![i as u8; 100], to).with_options(options)
            })
            .collect();
        let results = client.send_many(batch).await.unwrap();
        assert!(results.iter().all(|r| matches!(r, Ok(100))), "{results:?}");
        for (i, time) in times.iter().enumerate() {
            let got = util::recv_datagram(&server).await;
            assert_eq!(got[0], i as u8);
            if let Some(time) = time {
                assert!(Instant::now() >= *time, "datagram {i} came early");
            }
        }
        // A transmit time is per datagram, not per stream.
        let options = SendOptions::default().with_transmit_time(at(0));
        assert!(client.output_stream_to_addr_with(to, &options).is_err());
    });
}

#[test]
fn kernel_pacing_attaches_the_transmit_time() {
    util::on_each_backend(|_backend: Backend| async move {
        let server = bound(V4);
        let client = DatagramSocket::new();
        client.control().set_kernel_pacing(true).unwrap();
        client
            .bind_addr(SocketAddr::new(V4, 0))
            .expect("SO_TXTIME with CLOCK_MONOTONIC needs no privilege");
        assert!(client.control().kernel_pacing());
        let to = server.local_addr().unwrap();
        // The kernel takes the SCM_TXTIME message; loopback has no fq or etf qdisc, so
        // it sends at once. Only the delivery is checked: the timing is the qdisc's.
        let soon = Instant::now() + Duration::from_millis(200);
        let options = SendOptions::default()
            .with_transmit_time(soon)
            .with_traffic_class(ef(Ecn::Ect0));
        client
            .send_to_addr_with(b"paced".to_vec(), to, &options)
            .await
            .0
            .unwrap();
        assert_eq!(&util::recv_datagram(&server).await[..], b"paced");
        let batch = (0..4u8)
            .map(|i| OutgoingDatagram::new(vec![i; 10], to).with_options(options))
            .collect();
        let results = client.send_many(batch).await.unwrap();
        assert!(results.iter().all(|r| matches!(r, Ok(10))), "{results:?}");
        for i in 0..4u8 {
            assert_eq!(&util::recv_datagram(&server).await[..], &[i; 10][..]);
        }
    });
}

/// Two namespaces joined by a veth pair: the server's end `rsm0` has two addresses of
/// each family on two prefixes, the client's end `rsm1` one on the first prefix and a
/// route to the second. Replying to the client, the kernel picks the first prefix's
/// address by itself.
fn two_address_pair() -> Option<(Netns, Netns)> {
    let (server, client) = match (Netns::create("msrv"), Netns::create("mcli")) {
        (Ok(server), Ok(client)) => (server, client),
        (Err(why), _) | (_, Err(why)) => {
            netns::skip(&why);
            return None;
        }
    };
    let moved = [
        "ip",
        "link",
        "add",
        "rsm0",
        "netns",
        server.name(),
        "type",
        "veth",
        "peer",
        "name",
        "rsm1",
        "netns",
        client.name(),
    ];
    let server_setup: [&[&str]; 5] = [
        &["ip", "addr", "add", "10.77.0.1/24", "dev", "rsm0"],
        &["ip", "addr", "add", "10.78.0.2/24", "dev", "rsm0"],
        &["ip", "addr", "add", "fd77::1/64", "dev", "rsm0", "nodad"],
        &["ip", "addr", "add", "fd78::2/64", "dev", "rsm0", "nodad"],
        &["ip", "link", "set", "rsm0", "up"],
    ];
    let client_setup: [&[&str]; 5] = [
        &["ip", "addr", "add", "10.77.0.9/24", "dev", "rsm1"],
        &["ip", "addr", "add", "fd77::9/64", "dev", "rsm1", "nodad"],
        &["ip", "link", "set", "rsm1", "up"],
        &["ip", "route", "add", "10.78.0.0/24", "dev", "rsm1"],
        &["ip", "route", "add", "fd78::/64", "dev", "rsm1"],
    ];
    let done = run_ip(&moved)
        .and_then(|()| {
            server_setup
                .iter()
                .try_for_each(|args| server.exec(args).map(drop))
        })
        .and_then(|()| {
            client_setup
                .iter()
                .try_for_each(|args| client.exec(args).map(drop))
        });
    match done {
        Ok(()) => Some((server, client)),
        Err(why) => {
            netns::skip(&why);
            None
        }
    }
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[test]
fn a_wildcard_server_replies_from_the_address_each_request_came_to() {
    let Some((server_ns, client_ns)) = two_address_pair() else {
        return;
    };
    // The client's sockets live in its namespace; the test drives them from the
    // server's, as ringsock sockets of each runtime.
    let clients = client_ns.run(|| {
        let v4 = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let v6 = std::net::UdpSocket::bind("[::]:0").unwrap();
        (v4, v6)
    });
    server_ns.run(move || {
        let device = interface_index("rsm0");
        assert_ne!(device, 0);
        util::on_each_backend(|_backend: Backend| {
            let (v4, v6) = (
                clients.0.try_clone().unwrap(),
                clients.1.try_clone().unwrap(),
            );
            async move {
                let v4 = DatagramSocket::from_std(v4).unwrap();
                let v6 = DatagramSocket::from_std(v6).unwrap();
                let cases = [
                    ("0.0.0.0", &v4, "10.78.0.2"),
                    ("::", &v6, "fd78::2"),
                    // IPv4 through a dual-stack server.
                    ("::", &v4, "10.78.0.2"),
                ];
                for (wildcard, client, server_ip) in cases {
                    let server = DatagramSocket::new();
                    if wildcard == "::" {
                        server.bind("0").unwrap();
                    } else {
                        let any = SocketAddr::new(wildcard.parse().unwrap(), 0);
                        server.bind_addr(any).unwrap();
                    }
                    server.control().set_receive_destination(true).unwrap();
                    let port = server.local_addr().unwrap().port();
                    let server_ip: IpAddr = server_ip.parse().unwrap();
                    let to = SocketAddr::new(server_ip, port);
                    for plain in [true, false] {
                        client.send_to_addr(vec![plain as u8], to).await.0.unwrap();
                        let request = util::recv_datagram(&server).await;
                        assert_eq!(request.local_ip(), Some(server_ip));
                        assert_eq!(request.interface_index(), Some(device));
                        let options = if plain {
                            SendOptions::default()
                        } else {
                            SendOptions::reply_to(&request)
                        };
                        let back = request.remote_addr();
                        server
                            .send_to_addr_with(request.to_vec(), back, &options)
                            .await
                            .0
                            .unwrap();
                        let reply = util::recv_datagram(client).await;
                        if plain {
                            // Without a source the kernel answers from the other
                            // address: the case the option exists for.
                            assert_ne!(reply.remote_addr().ip(), server_ip);
                        } else {
                            assert_eq!(reply.remote_addr(), to);
                        }
                    }
                }
            }
        });
    });
}

fn interface_index(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

/// A receive option set on the descriptor behind the socket's back (IP_RECVTTL here)
/// adds control messages the ring has no room for: each such datagram is counted as
/// control-truncated, and still arrives whole.
#[test]
fn control_messages_that_do_not_fit_are_counted() {
    use std::os::fd::AsRawFd;
    util::on_each_backend(|backend| async move {
        let receiver = bound(V4);
        receiver.control().set_receive_traffic_class(true).unwrap();
        let on: libc::c_int = 1;
        // SAFETY: passes a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                receiver.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVTTL,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{backend}");
        let to = receiver.local_addr().unwrap();
        let sender = bound(V4);
        for seq in 0..3u8 {
            sender.send_to_addr(vec![seq; 50], to).await.0.unwrap();
            let got = util::recv_datagram(&receiver).await;
            assert_eq!(got.data(), &[seq; 50][..], "{backend}");
        }
        assert_eq!(receiver.receive_stats().control_truncated, 3, "{backend}");
        // A socket whose options all fit counts none.
        let plain = bound(V4);
        plain.control().set_receive_traffic_class(true).unwrap();
        let to = plain.local_addr().unwrap();
        sender.send_to_addr(vec![7; 50], to).await.0.unwrap();
        util::recv_datagram(&plain).await;
        assert_eq!(plain.receive_stats().control_truncated, 0, "{backend}");
    });
}

/// The socket's own traffic class marks what it sends without one of its own — sends,
/// posts, output streams and its forwards — on IPv4, IPv6 and IPv4 through a dual-stack
/// socket; a datagram's own class wins; `None` goes back to 0. Set before the socket
/// exists, it is applied when it is made.
#[test]
fn the_sockets_traffic_class_marks_its_sends_and_forwards() {
    util::on_each_receive_path(|_backend: Backend| async move {
        let audio = ef(Ecn::Ect0);
        for (relay_ip, peer_ip) in [(Some(V4), V4), (Some(V6), V6), (None, V4)] {
            let sink = bound(peer_ip);
            sink.control().set_receive_traffic_class(true).unwrap();
            let to = sink.local_addr().unwrap();
            let relay = DatagramSocket::new();
            relay.control().set_traffic_class(Some(audio)).unwrap();
            match relay_ip {
                Some(ip) => relay.bind_addr(SocketAddr::new(ip, 0)).unwrap(),
                None => relay.bind("0").unwrap(),
            }
            assert_eq!(relay.control().traffic_class(), Some(audio));
            relay.send_to_addr(b"send".to_vec(), to).await.0.unwrap();
            relay.post_to_addr(b"post".to_vec(), to).unwrap();
            let stream = relay.output_stream_to_addr(to).unwrap();
            stream.write(b"stream".to_vec()).await.unwrap();
            stream.flush().await.unwrap();
            let own = TrafficClass::new(8, Ecn::NotEct).unwrap();
            let options = SendOptions::default().with_traffic_class(own);
            relay
                .send_to_addr_with(b"own".to_vec(), to, &options)
                .await
                .0
                .unwrap();
            // Forwarded: in from a plain source, out to the sink.
            let port = relay.local_addr().unwrap().port();
            relay
                .forward_received(ringsock::Forwarding::to(to).delivering(|data| data == b"end"))
                .unwrap();
            let source = bound(peer_ip);
            let relay_at = SocketAddr::new(peer_ip, port);
            source
                .send_to_addr(b"forwarded".to_vec(), relay_at)
                .await
                .0
                .unwrap();
            source
                .send_to_addr(b"end".to_vec(), relay_at)
                .await
                .0
                .unwrap();
            assert_eq!(&util::recv_datagram(&relay).await[..], b"end");
            relay.settle_posts().await.unwrap();
            for (data, class) in [
                (&b"send"[..], audio),
                (b"post", audio),
                (b"stream", audio),
                (b"own", own),
                (b"forwarded", audio),
            ] {
                let got = util::recv_datagram(&sink).await;
                assert_eq!(&got[..], data, "from {relay_ip:?}");
                assert_eq!(
                    got.traffic_class(),
                    Some(class),
                    "{data:?} from {relay_ip:?}"
                );
            }
            relay.control().set_traffic_class(None).unwrap();
            relay.send_to_addr(b"plain".to_vec(), to).await.0.unwrap();
            let got = util::recv_datagram(&sink).await;
            assert_eq!(got.traffic_class(), Some(TrafficClass::from_byte(0)));
        }
    });
}
