//! DatagramSocket tests that need a network of their own: multicast to sockets sharing a
//! port (in this process and in another one), and datagrams dropped on purpose by an
//! nftables rule. Each creates a network namespace (root, iproute2, nftables); where it
//! cannot, it prints "skipped: <why>" and returns.

mod util;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use ringsock::runtime::timeout;
use ringsock::{Backend, DatagramSocket, SocketErrorStatus};
use util::netns::{self, Netns};

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 7, 7);
/// Set in the child process of `multicast_reaches_every_sharer`.
const CHILD_ENV: &str = "RINGSOCK_TEST_MULTICAST_CHILD";

fn sharer(port: u16) -> DatagramSocket {
    let socket = DatagramSocket::new();
    socket.control().set_multicast_only(true).unwrap();
    socket
        .bind_addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
        .unwrap();
    socket.join_multicast_group(IpAddr::V4(GROUP)).unwrap();
    socket
}

/// The child's part: share the port, say "ready", print the one datagram it gets.
fn child(port: u16) {
    let runtime = ringsock::Runtime::new().unwrap();
    runtime.block_on(async {
        let socket = sharer(port);
        println!("ready");
        let datagram = timeout(Duration::from_secs(30), socket.recv())
            .await
            .expect("child: no multicast datagram within 30 s")
            .unwrap();
        println!("got {}", datagram.text().unwrap());
    });
}

#[test]
fn multicast_reaches_every_sharer() {
    if let Ok(port) = std::env::var(CHILD_ENV) {
        return child(port.parse().unwrap());
    }
    let Some(netns) = multicast_netns("mcast") else {
        return;
    };
    let name = netns.name().to_owned();
    netns.run(move || {
        for backend in util::BACKENDS {
            let name = name.clone();
            util::on_backend(backend, &move |backend: Backend| {
                let name = name.clone();
                async move {
                    // Two sockets here on one port...
                    let first = sharer(0);
                    let port = first.local_addr().unwrap().port();
                    let second = sharer(port);
                    // ... and one in another process.
                    let exe = std::env::current_exe().unwrap();
                    let mut process = Command::new("ip")
                        .args(["netns", "exec", &name])
                        .arg(exe)
                        .args([
                            "--exact",
                            "multicast_reaches_every_sharer",
                            "--nocapture",
                            "--test-threads=1",
                        ])
                        .env(CHILD_ENV, port.to_string())
                        .env("RINGSOCK_BACKEND", backend.to_string())
                        .stdout(Stdio::piped())
                        .spawn()
                        .unwrap();
                    let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
                    let mut wait_for = |prefix: &str| loop {
                        let line = lines
                            .next()
                            .unwrap_or_else(|| panic!("child ended before {prefix:?}"))
                            .unwrap();
                        // libtest may print "test NAME ... " on the same line first.
                        if let Some(at) = line.find(prefix) {
                            return line[at + prefix.len()..].to_owned();
                        }
                    };
                    wait_for("ready");

                    let sender = DatagramSocket::new();
                    sender.control().set_multicast_loop(true).unwrap();
                    sender.control().set_multicast_hop_limit(1).unwrap();
                    let to = SocketAddr::new(IpAddr::V4(GROUP), port);
                    sender
                        .send_to_addr(b"to the group".to_vec(), to)
                        .await
                        .0
                        .unwrap();

                    for socket in [&first, &second] {
                        let datagram = socket.recv().await.unwrap();
                        assert_eq!(datagram.text().unwrap(), "to the group");
                    }
                    assert_eq!(wait_for("got "), "to the group");
                    assert!(process.wait().unwrap().success());

                    // Leaving works once.
                    first.leave_multicast_group(IpAddr::V4(GROUP)).unwrap();
                    assert!(first.leave_multicast_group(IpAddr::V4(GROUP)).is_err());
                }
            });
        }
    });
}

/// A socket gets the groups it joined, not every group a socket of the host joined on
/// its port (Linux's IP_MULTICAST_ALL default), and a group it left stops coming while
/// another socket still holds it.
#[test]
fn a_socket_gets_only_the_groups_it_joined() {
    const OTHER: Ipv4Addr = Ipv4Addr::new(239, 255, 7, 8);
    let Some(netns) = multicast_netns("mcjoin") else {
        return;
    };
    netns.run(|| {
        util::on_each_backend(|backend| async move {
            let joined = sharer(0);
            let port = joined.local_addr().unwrap().port();
            // Shares the port; joins only OTHER, later.
            let bystander = DatagramSocket::new();
            bystander.control().set_multicast_only(true).unwrap();
            bystander
                .bind_addr(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
                .unwrap();
            let sender = DatagramSocket::new();
            sender.control().set_multicast_loop(true).unwrap();
            sender.control().set_multicast_hop_limit(1).unwrap();
            let send = |group: Ipv4Addr, text: &'static str| {
                let to = SocketAddr::new(IpAddr::V4(group), port);
                let sender = &sender;
                async move {
                    sender
                        .send_to_addr(text.as_bytes().to_vec(), to)
                        .await
                        .0
                        .unwrap()
                }
            };
            send(GROUP, "group").await;
            expect_next(&joined, "the member's datagram", "group", backend).await;
            // The bystander's first datagram is the one of the group it joins now: the
            // earlier one, of a group it never joined, did not come to it.
            bystander.join_multicast_group(IpAddr::V4(OTHER)).unwrap();
            send(OTHER, "other").await;
            expect_next(&bystander, "the bystander's datagram", "other", backend).await;
            // Left while the bystander holds OTHER: the leaver gets no more of it. Its
            // next datagram is the one of the group it still holds.
            joined.join_multicast_group(IpAddr::V4(OTHER)).unwrap();
            joined.leave_multicast_group(IpAddr::V4(OTHER)).unwrap();
            send(OTHER, "other again").await;
            expect_next(&bystander, "the bystander's second", "other again", backend).await;
            send(GROUP, "group again").await;
            expect_next(&joined, "the member's second", "group again", backend).await;

            // Wrong joins and leaves say what is wrong with them.
            let twice = joined.join_multicast_group(IpAddr::V4(GROUP)).unwrap_err();
            assert_eq!(
                twice.status(),
                SocketErrorStatus::AddressAlreadyInUse,
                "{twice}"
            );
            assert!(twice.to_string().contains("in it already"), "{twice}");
            let never = joined.leave_multicast_group(IpAddr::V4(OTHER)).unwrap_err();
            assert_eq!(
                never.status(),
                SocketErrorStatus::CannotAssignRequestedAddress,
                "{never}"
            );
            assert!(never.to_string().contains("did not join"), "{never}");
            for unicast in [IpAddr::V4(Ipv4Addr::LOCALHOST), "::1".parse().unwrap()] {
                let err = joined.join_multicast_group(unicast).unwrap_err();
                assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
                let err = joined.leave_multicast_group(unicast).unwrap_err();
                assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
            }
            let v6 = joined
                .join_multicast_group("ff02::1".parse().unwrap())
                .unwrap_err();
            assert_eq!(
                v6.status(),
                SocketErrorStatus::AddressFamilyNotSupported,
                "{v6}"
            );
        });
    });
}

/// A namespace whose loopback carries multicast (it does only with the flag and a
/// route); `None`, said, where namespaces cannot be made.
fn multicast_netns(tag: &str) -> Option<Netns> {
    let netns = match Netns::create(tag) {
        Ok(netns) => netns,
        Err(why) => {
            netns::skip(&why);
            return None;
        }
    };
    netns
        .exec(&["ip", "link", "set", "lo", "multicast", "on"])
        .unwrap();
    netns
        .exec(&["ip", "route", "add", "224.0.0.0/4", "dev", "lo"])
        .unwrap();
    Some(netns)
}

/// Checks that `socket`'s next datagram is `text`: each came to the one socket that
/// should have it.
async fn expect_next(socket: &DatagramSocket, what: &str, text: &str, backend: Backend) {
    let got = util::must(what, socket.recv()).await.unwrap();
    assert_eq!(got.text().unwrap(), text, "{what}, {backend}");
}

/// Counter of the drop rule in the namespace's nftables chain.
fn nft_dropped(netns: &Netns) -> u64 {
    let listing = netns
        .exec(&["nft", "list", "chain", "inet", "ringsock", "out"])
        .unwrap();
    let at = listing
        .find("counter packets ")
        .expect("rule with a counter");
    listing[at + "counter packets ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn datagrams_dropped_on_purpose_are_counted_and_the_rest_arrive_intact() {
    let netns = match Netns::create("loss") {
        Ok(netns) => netns,
        Err(why) => return netns::skip(&why),
    };
    let table = netns
        .exec(&["nft", "add", "table", "inet", "ringsock"])
        .and_then(|_| {
            netns.exec(&[
                "nft",
                "add chain inet ringsock out { type filter hook input priority 0; policy accept; }",
            ])
        });
    if let Err(why) = table {
        return netns::skip(&format!(
            "nftables unavailable ({why}); CI installs the nftables package"
        ));
    }
    let netns = std::sync::Arc::new(netns);
    let inside = netns.clone();
    netns.run(move || {
        util::on_each_backend(|_| {
            let netns = inside.clone();
            async move {
                const TOTAL: u32 = 3000;
                let receiver = DatagramSocket::new();
                receiver.control().set_receive_buffer_size(4 << 20).unwrap();
                receiver.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
                let to = receiver.local_addr().unwrap();
                netns.exec(&["nft", "flush", "chain", "inet", "ringsock", "out"]).unwrap();
                let rule = format!(
                    "add rule inet ringsock out udp dport {} numgen random mod 10 == 0 counter drop",
                    to.port()
                );
                netns.exec(&["nft", &rule]).unwrap();

                let sender = DatagramSocket::new();
                // On loopback a GSO super-datagram stays one packet until the receiving
                // socket, so nftables would count (and drop) runs, not datagrams.
                sender.control().set_segmentation_offload(false);
                let output = sender.output_stream_to_addr(to).unwrap();
                let sizes = util::pseudo_random_bytes(5, TOTAL as usize);
                let expected = |seq: u32| {
                    let len = 4 + sizes[seq as usize] as usize * 5;
                    let mut bytes = util::pseudo_random_bytes(1000 + seq as u64, len);
                    bytes[..4].copy_from_slice(&seq.to_le_bytes());
                    bytes
                };
                let mut seen = HashSet::new();
                let mut batch = Vec::new();
                for first in (0..TOTAL).step_by(64) {
                    for seq in first..(first + 64).min(TOTAL) {
                        output.write(expected(seq)).await.unwrap();
                    }
                    output.flush().await.unwrap();
                    // Drain as we go, so the socket's queue never overflows.
                    while let Ok(result) = timeout(Duration::ZERO, receiver.recv_batch(&mut batch, 256)).await {
                        result.unwrap();
                    }
                }
                let dropped_by_rule = nft_dropped(&netns);
                assert!(dropped_by_rule > 0, "the rule drops about 10%");
                loop {
                    for datagram in batch.drain(..) {
                        let seq = u32::from_le_bytes(datagram[..4].try_into().unwrap());
                        assert!(seq < TOTAL);
                        assert!(datagram.data() == &expected(seq)[..], "datagram {seq} corrupted");
                        assert!(seen.insert(seq), "datagram {seq} received twice");
                    }
                    let socket_drops = receiver.receive_stats().dropped;
                    let accounted = seen.len() as u64 + dropped_by_rule + socket_drops;
                    assert!(accounted <= TOTAL as u64);
                    if accounted == TOTAL as u64 {
                        break;
                    }
                    match timeout(Duration::from_secs(2), receiver.recv_batch(&mut batch, 256)).await {
                        Ok(result) => {
                            result.unwrap();
                        }
                        Err(_) => eprintln!(
                            "waiting: received {} nftables {dropped_by_rule} socket {socket_drops}",
                            seen.len(),
                        ),
                    }
                }
                let lost = TOTAL as u64 - seen.len() as u64;
                println!(
                    "sent {TOTAL}, received {}, lost {lost} (nftables dropped {dropped_by_rule})",
                    seen.len()
                );
                assert_eq!(lost, dropped_by_rule + receiver.receive_stats().dropped);
            }
        });
    });
}

/// A server bound to 0.0.0.0 answers a datagram sent to its subnet's broadcast address
/// from its own address on that subnet (`SendOptions::reply_to`): the broadcast address
/// is no source, and a reply from it fails. On 0.0.0.0 and on a dual-stack [::], both
/// engines, an interface of the test's own namespace.
#[test]
fn a_reply_to_a_broadcast_leaves_from_the_interface_address() {
    let netns = match Netns::create("bcast") {
        Ok(netns) => netns,
        Err(why) => return netns::skip(&why),
    };
    for args in [
        &[
            "ip", "link", "add", "bc0", "type", "veth", "peer", "name", "bc1",
        ][..],
        &[
            "ip",
            "addr",
            "add",
            "10.77.0.1/24",
            "brd",
            "+",
            "dev",
            "bc0",
        ],
        &["ip", "link", "set", "bc1", "up"],
        &["ip", "link", "set", "bc0", "up"],
    ] {
        netns.exec(args).unwrap();
    }
    netns.run(|| {
        util::on_each_backend(|backend| async move {
            for wildcard in ["0.0.0.0:0", "[::]:0"] {
                let backend = format!("{backend} {wildcard}");
                let server = DatagramSocket::new();
                server.control().set_receive_destination(true).unwrap();
                server.bind_addr(wildcard.parse().unwrap()).unwrap();
                let port = server.local_addr().unwrap().port();
                let client = DatagramSocket::new();
                client.control().set_broadcast(true).unwrap();
                client.bind_addr("10.77.0.1:0".parse().unwrap()).unwrap();
                let broadcast = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 255)), port);
                client
                    .send_to_addr(b"who".to_vec(), broadcast)
                    .await
                    .0
                    .unwrap();
                let request = util::recv_datagram(&server).await;
                assert_eq!(
                    request.local_ip(),
                    Some(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 255))),
                    "{backend}"
                );
                let options = ringsock::SendOptions::reply_to(&request);
                let (sent, _) = server
                    .send_to_addr_with(b"me".to_vec(), request.remote_addr(), &options)
                    .await;
                sent.unwrap_or_else(|err| panic!("{backend}: the reply failed: {err}"));
                let reply = util::recv_datagram(&client).await;
                assert_eq!(reply.data(), b"me", "{backend}");
                assert_eq!(
                    reply.remote_addr(),
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1)), port),
                    "{backend}"
                );
            }
        });
    });
}
