//! A socket that forwards what it receives by itself (`forward_received`), on both
//! drivers and every io_uring receive path (the driver's own forwarding on the multishot
//! receive, with and without incremental buffers, and the socket's receive forwarding
//! where io_uring drains with `recvmmsg`): the bytes arrive exact and every datagram is
//! accounted for while the ring goes round, what the rule keeps reaches the program in
//! order, and a rule that could never send is refused.

mod util;

use std::future::Future;
use std::net::SocketAddr;

use ringsock::{
    runtime::Builder, Backend, Capability, DatagramSocket, Forwarding, ReceiveRing,
    SocketErrorStatus,
};

/// The first byte of a datagram the relay keeps for itself.
const KEEP: u8 = 0xFF;

fn keep_marked(data: &[u8]) -> bool {
    data.first() == Some(&KEEP)
}

/// A std source, a relay forwarding to a sink all but what [`keep_marked`] keeps, and
/// the relay's address.
struct Path {
    source: std::net::UdpSocket,
    relay: DatagramSocket,
    sink: DatagramSocket,
    to_relay: SocketAddr,
}

fn path_keeping_marked() -> Path {
    let source = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = util::bound_loopback();
    let sink = util::bound_loopback();
    let to_sink = sink.local_addr().unwrap();
    relay
        .forward_received(Forwarding::to(to_sink).delivering(keep_marked))
        .unwrap();
    Path {
        to_relay: relay.local_addr().unwrap(),
        source,
        relay,
        sink,
    }
}

/// Runs `test` on every receive path, and on io_uring without multishot receives.
fn on_each_forwarding_path<F, Fut>(test: F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    util::on_each_receive_path(&test);
    let builder = Builder::new()
        .backend(Backend::Uring)
        .disable(Capability::MultishotRecv);
    util::on_runtime_of(builder, Backend::Uring, &test);
}

/// Datagram `seq` of a test: its sequence number, then bytes that depend on it; those
/// the relay keeps start with [`KEEP`].
fn numbered(seq: u32, len: usize, keep: bool) -> Vec<u8> {
    let mut data = util::pseudo_random_bytes(u64::from(seq), len.max(5));
    data[0] = if keep { KEEP } else { 0 };
    data[1..5].copy_from_slice(&seq.to_le_bytes());
    data
}

fn seq_of(data: &[u8]) -> u32 {
    u32::from_le_bytes(data[1..5].try_into().unwrap())
}

/// Receives `count` datagrams on `sink`, checking each against [`numbered`]; returns
/// their sequence numbers in arrival order.
async fn take_numbered(sink: &DatagramSocket, from: SocketAddr, count: usize) -> Vec<u32> {
    let mut seqs = Vec::with_capacity(count);
    for _ in 0..count {
        let got = util::recv_datagram(sink).await;
        assert_eq!(got.remote_addr(), from);
        let seq = seq_of(&got);
        assert_eq!(
            &got[..],
            &numbered(seq, got.len(), false)[..],
            "datagram {seq}"
        );
        seqs.push(seq);
    }
    seqs
}

#[test]
fn a_forwarding_socket_sends_everything_on_and_delivers_what_the_rule_keeps() {
    on_each_forwarding_path(|backend| async move {
        let source = util::bound_loopback();
        let relay = util::small_ring_loopback();
        let sink = util::bound_loopback();
        let to_relay = relay.local_addr().unwrap();
        let to_sink = sink.local_addr().unwrap();
        relay
            .forward_received(Forwarding::to(to_sink).delivering(keep_marked))
            .unwrap();
        assert_eq!(relay.forwarding().unwrap().destination(), to_sink);
        let rounds = 60u32;
        let per_round = 10u32;
        let relay = std::rc::Rc::new(relay);
        let from = source.local_addr().unwrap();
        // The program's side of the relay: it sees only what the rule keeps.
        let kept = ringsock::spawn({
            let relay = relay.clone();
            async move {
                let mut kept = Vec::new();
                while kept.len() < rounds as usize {
                    let datagram = util::recv_datagram(&relay).await;
                    assert_eq!(datagram.remote_addr(), from);
                    kept.push(seq_of(&datagram));
                }
                kept
            }
        });
        let mut forwarded = Vec::new();
        for round in 0..rounds {
            for i in 0..per_round {
                let seq = round * per_round + i;
                // Last: the program's receive, which the forwarding runs in, stops
                // after the last one it keeps.
                let keep = i == per_round - 1;
                let len = 5 + (seq as usize * 53) % 1400;
                let data = numbered(seq, len, keep);
                source.send_to_addr(data, to_relay).await.0.unwrap();
            }
            forwarded.extend(take_numbered(&sink, to_relay, per_round as usize - 1).await);
        }
        let kept = kept.await;
        let expect_kept: Vec<u32> = (0..rounds).map(|r| r * per_round + per_round - 1).collect();
        assert_eq!(kept, expect_kept, "on {backend}: kept in order");
        forwarded.sort_unstable();
        let expect: Vec<u32> = (0..rounds * per_round)
            .filter(|seq| seq % per_round != per_round - 1)
            .collect();
        assert_eq!(forwarded, expect, "on {backend}: each forwarded once");
        relay.settle_posts().await.unwrap();
        let posts = relay.post_stats();
        let sent = u64::from(rounds * (per_round - 1));
        assert_eq!((posts.sent, posts.dropped, posts.failed), (sent, 0, 0));
        let stats = relay.receive_stats();
        assert_eq!(stats.forwarded, sent, "{stats:?}");
        assert_eq!(stats.datagrams, u64::from(rounds * per_round), "{stats:?}");
        assert_eq!((stats.buffers_lent, stats.buffers_forwarding), (0, 0));
    });
}

#[test]
fn a_stream_of_forwards_goes_round_the_ring_many_times_with_exact_bytes() {
    on_each_forwarding_path(|backend| async move {
        let source = util::bound_loopback();
        let relay = util::small_ring_loopback();
        let sink = util::bound_loopback();
        let to_relay = relay.local_addr().unwrap();
        let to_sink = sink.local_addr().unwrap();
        relay.forward_received(Forwarding::to(to_sink)).unwrap();
        let relay = std::rc::Rc::new(relay);
        // A receive waits on the relay all along, as the rule asks; nothing is kept.
        let waiting = ringsock::spawn({
            let relay = relay.clone();
            async move { relay.recv().await.map(|d| d.len()) }
        });
        let count = 1000u32;
        let mut seen = vec![false; count as usize];
        for seq in 0..count {
            let len = 5 + (seq as usize * 131) % 2043;
            source
                .send_to_addr(numbered(seq, len, false), to_relay)
                .await
                .0
                .unwrap();
            for got in take_numbered(&sink, to_relay, 1).await {
                assert!(!std::mem::replace(&mut seen[got as usize], true));
            }
        }
        relay.settle_posts().await.unwrap();
        let stats = relay.receive_stats();
        assert_eq!(stats.forwarded, u64::from(count), "on {backend}: {stats:?}");
        assert_eq!(relay.post_stats().sent, u64::from(count));
        assert!(stats.buffers <= 8, "{stats:?}");
        assert_eq!((stats.buffers_lent, stats.buffers_forwarding), (0, 0));
        // Stopped, the relay delivers again: its waiting receive gets the next one.
        relay.stop_forwarding().unwrap();
        assert!(relay.forwarding().is_none());
        source
            .send_to_addr(numbered(count, 40, false), to_relay)
            .await
            .0
            .unwrap();
        assert_eq!(waiting.await.unwrap(), 40);
        assert_eq!(relay.receive_stats().forwarded, u64::from(count));
    });
}

#[test]
fn a_datagram_the_ring_cut_is_delivered_flagged_not_forwarded() {
    on_each_forwarding_path(|backend| async move {
        let source = util::bound_loopback();
        let relay = DatagramSocket::new();
        let ring = ReceiveRing {
            buffers: 8,
            buffer_size: 100,
        };
        relay.control().set_receive_ring(ring).unwrap();
        relay.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let sink = util::bound_loopback();
        let to_relay = relay.local_addr().unwrap();
        let to_sink = sink.local_addr().unwrap();
        relay.forward_received(Forwarding::to(to_sink)).unwrap();
        let receive = std::pin::pin!(util::recv_datagram(&relay));
        source
            .send_to_addr(numbered(1, 60, false), to_relay)
            .await
            .0
            .unwrap();
        source
            .send_to_addr(numbered(2, 300, false), to_relay)
            .await
            .0
            .unwrap();
        let cut = receive.await;
        assert!(cut.is_truncated(), "on {backend}");
        assert_eq!(cut.original_len(), 300);
        assert_eq!(seq_of(&cut), 2);
        assert_eq!(take_numbered(&sink, to_relay, 1).await, vec![1]);
        relay.settle_posts().await.unwrap();
        let stats = relay.receive_stats();
        assert_eq!((stats.forwarded, stats.truncated), (1, 1), "{stats:?}");
    });
}

fn refused_as(socket: &DatagramSocket, to: SocketAddr, status: SocketErrorStatus) {
    let err = socket.forward_received(Forwarding::to(to)).unwrap_err();
    assert_eq!(err.status(), status, "to {to}: {err}");
    assert!(socket.forwarding().is_none());
}

fn ipv4_mapped(addr: SocketAddr) -> std::net::IpAddr {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().into(),
        v6 => v6,
    }
}

#[test]
fn a_rule_that_could_never_send_is_refused_and_changes_nothing() {
    util::on_each_backend(|backend| async move {
        let relay = util::bound_loopback();
        let port_zero = Forwarding::to("127.0.0.1:0".parse().unwrap());
        let err = relay.forward_received(port_zero).unwrap_err();
        assert_eq!(
            err.status(),
            SocketErrorStatus::InvalidArgument,
            "on {backend}"
        );
        let ipv6 = Forwarding::to("[::1]:9".parse().unwrap());
        let err = relay.forward_received(ipv6).unwrap_err();
        assert_eq!(
            err.status(),
            SocketErrorStatus::AddressFamilyNotSupported,
            "on {backend}: {err}"
        );
        // Itself, by its address or, bound to the wildcard, by its port on loopback: a
        // loop that would never end.
        let itself = Forwarding::to(relay.local_addr().unwrap());
        let err = relay.forward_received(itself).unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        let wildcard = DatagramSocket::new();
        wildcard.bind_addr("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = wildcard.local_addr().unwrap().port();
        let itself = Forwarding::to(SocketAddr::from(([127, 0, 0, 2], port)));
        let err = wildcard.forward_received(itself).unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        // The unspecified address is this host: the socket's own port there comes back.
        let port = relay.local_addr().unwrap().port();
        refused_as(
            &relay,
            SocketAddr::from(([0, 0, 0, 0], port)),
            SocketErrorStatus::InvalidArgument,
        );
        // A socket that never bound receives nothing to forward.
        let unbound = DatagramSocket::new();
        let err = unbound
            .forward_received(Forwarding::to(relay.local_addr().unwrap()))
            .unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        assert!(unbound.forwarding().is_none());
        assert!(unbound.local_addr().is_err(), "no socket was made for it");
        // An IPv6 socket on one IPv6 address cannot send to IPv4.
        let ipv6_only = DatagramSocket::new();
        if ipv6_only.bind_addr("[::1]:0".parse().unwrap()).is_ok() {
            let ipv4 = relay.local_addr().unwrap();
            let mapped = SocketAddr::from((ipv4_mapped(ipv4), ipv4.port()));
            for to in [ipv4, mapped] {
                refused_as(&ipv6_only, to, SocketErrorStatus::AddressFamilyNotSupported);
            }
            let port = ipv6_only.local_addr().unwrap().port();
            let unspecified = SocketAddr::from(([0u16; 8], port));
            refused_as(&ipv6_only, unspecified, SocketErrorStatus::InvalidArgument);
        }
        assert!(relay.forwarding().is_none());
        // Nothing was forwarded: a datagram still comes to the program.
        let source = util::bound_loopback();
        source
            .send_to_addr(b"hello".to_vec(), relay.local_addr().unwrap())
            .await
            .0
            .unwrap();
        assert_eq!(&util::recv_datagram(&relay).await[..], b"hello");
        assert_eq!(relay.receive_stats().forwarded, 0);
    });
}

#[test]
fn an_ipv6_socket_forwards_to_an_ipv4_destination() {
    util::on_each_backend(|backend| async move {
        let relay = DatagramSocket::new();
        if relay.bind_addr("[::]:0".parse().unwrap()).is_err() {
            eprintln!("skipped on {backend}: no IPv6");
            return;
        }
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        relay.forward_received(Forwarding::to(to_sink)).unwrap();
        let relay = std::rc::Rc::new(relay);
        let _waiting = ringsock::spawn({
            let relay = relay.clone();
            async move { relay.recv().await.map(|d| d.len()) }
        });
        let source = util::bound_loopback();
        let port = relay.local_addr().unwrap().port();
        source
            .send_to_addr(
                numbered(7, 64, false),
                SocketAddr::from(([127, 0, 0, 1], port)),
            )
            .await
            .0
            .unwrap();
        let got = util::recv_datagram(&sink).await;
        assert_eq!(seq_of(&got), 7, "on {backend}");
        assert_eq!(got.remote_addr().port(), port);
    });
}

#[test]
fn a_detached_socket_carries_what_it_had_not_forwarded_and_forwards_no_more() {
    on_each_forwarding_path(|backend| async move {
        let Path {
            source,
            relay,
            sink,
            to_relay,
        } = path_keeping_marked();
        for seq in 0..5 {
            source.send_to(&numbered(seq, 50, false), to_relay).unwrap();
        }
        source.send_to(&numbered(5, 50, true), to_relay).unwrap();
        let kept = util::recv_datagram(&relay).await;
        assert_eq!(seq_of(&kept), 5, "on {backend}");
        let mut forwarded = take_numbered(&sink, to_relay, 5).await;
        forwarded.sort_unstable();
        assert_eq!(forwarded, vec![0, 1, 2, 3, 4]);
        // Sent with no turn of the runtime between them and the detach: the io_uring
        // driver reaps them while it lets go of the socket.
        for seq in 6..11 {
            source.send_to(&numbered(seq, 50, false), to_relay).unwrap();
        }
        let detached = relay.detach().unwrap();
        assert!(relay.forwarding().is_none());
        let adopted = detached.into_datagram().unwrap();
        assert!(adopted.forwarding().is_none());
        for seq in 6..11 {
            let got = util::recv_datagram(&adopted).await;
            assert_eq!(seq_of(&got), seq, "on {backend}");
        }
        // Nothing more went to the sink: the next datagram there is the source's own.
        source.send_to(b"last", sink.local_addr().unwrap()).unwrap();
        assert_eq!(
            &util::recv_datagram(&sink).await[..],
            b"last",
            "on {backend}"
        );
        relay.settle_posts().await.unwrap();
        assert_eq!(relay.post_stats().sent, 5);
    });
}

#[test]
fn a_gro_super_datagram_is_forwarded_as_its_segments() {
    on_each_forwarding_path(|backend| async move {
        let relay = DatagramSocket::new();
        relay.control().set_gro(true).unwrap();
        relay.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let sink = util::bound_loopback();
        let to_relay = relay.local_addr().unwrap();
        let to_sink = sink.local_addr().unwrap();
        relay
            .forward_received(Forwarding::to(to_sink).delivering(keep_marked))
            .unwrap();
        let relay = std::rc::Rc::new(relay);
        let waiting = ringsock::spawn({
            let relay = relay.clone();
            async move { util::recv_datagram(&relay).await.len() }
        });
        let sender = util::bound_loopback();
        // Equal sizes in one flush: GSO sends, which loopback GRO hands over whole.
        let output = sender.output_stream_to_addr(to_relay).unwrap();
        for seq in 0..64 {
            output.write(numbered(seq, 1000, false)).await.unwrap();
        }
        output.flush().await.unwrap();
        let mut seqs = take_numbered(&sink, to_relay, 64).await;
        seqs.sort_unstable();
        assert_eq!(seqs, (0..64).collect::<Vec<u32>>(), "on {backend}");
        sender
            .send_to_addr(numbered(64, 30, true), to_relay)
            .await
            .0
            .unwrap();
        assert_eq!(waiting.await, 30);
        relay.settle_posts().await.unwrap();
        let stats = relay.receive_stats();
        assert_eq!(stats.forwarded, 64, "{stats:?}");
        assert_eq!(relay.post_stats().sent, 64);
        assert_eq!((stats.buffers_lent, stats.buffers_forwarding), (0, 0));
    });
}

/// A burst larger than a tiny ring's completion queue: the kernel ends the multishot
/// receive on the datagram it could not post a completion for, and the socket must
/// start another one without waiting for the program.
#[test]
fn a_burst_that_overflows_the_completion_queue_keeps_forwarding() {
    let test = |backend| async move {
        let source = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay = util::bound_loopback();
        let sink = util::bound_loopback();
        let to_relay = relay.local_addr().unwrap();
        let to_sink = sink.local_addr().unwrap();
        // Room for the whole burst in both sockets' queues: nothing may be dropped there.
        for socket in [&relay, &sink] {
            socket.control().set_receive_buffer_size(4 << 20).unwrap();
        }
        relay
            .forward_received(Forwarding::to(to_sink).delivering(keep_marked))
            .unwrap();
        let relay = std::rc::Rc::new(relay);
        let waiting = ringsock::spawn({
            let relay = relay.clone();
            async move { seq_of(&util::recv_datagram(&relay).await) }
        });
        // The first one through says the receive is armed.
        source.send_to(&numbered(0, 100, false), to_relay).unwrap();
        assert_eq!(take_numbered(&sink, to_relay, 1).await, vec![0]);
        let burst = 300;
        for seq in 1..=burst {
            source
                .send_to(&numbered(seq, 100, false), to_relay)
                .unwrap();
        }
        let mut seqs = take_numbered(&sink, to_relay, burst as usize).await;
        assert_eq!(
            relay.receive_stats().dropped + sink.receive_stats().dropped,
            0
        );
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=burst).collect::<Vec<u32>>(), "on {backend}");
        source
            .send_to(&numbered(burst + 1, 100, true), to_relay)
            .unwrap();
        assert_eq!(waiting.await, burst + 1);
        relay.settle_posts().await.unwrap();
        assert_eq!(relay.post_stats().sent, u64::from(burst) + 1);
    };
    for backend in util::BACKENDS {
        let builder = Builder::new().backend(backend).ring_entries(4);
        util::on_runtime_of(builder, backend, &test);
    }
}

fn panics_on_13_bytes(data: &[u8]) -> bool {
    if data.len() == 13 {
        panic!("the rule panicked");
    }
    keep_marked(data)
}

/// A rule that panics: the panic goes on in the task that receives, the datagram it
/// panicked on comes to the program's next receive, and the socket goes on forwarding.
#[test]
fn a_rule_that_panics_panics_in_the_receiving_task_and_loses_nothing() {
    for backend in util::BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let source = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
        let relay = runtime.block_on(async {
            let relay = util::bound_loopback();
            let rule = Forwarding::to(sink.local_addr().unwrap()).delivering(panics_on_13_bytes);
            relay.forward_received(rule).unwrap();
            relay
        });
        let to_relay = relay.local_addr().unwrap();
        for (seq, len) in [(0, 100), (1, 13), (2, 100)] {
            source
                .send_to(&numbered(seq, len, false), to_relay)
                .unwrap();
        }
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime
                .block_on(relay.recv())
                .map(|datagram| datagram.len())
        }));
        let panic = first.expect_err("the rule's panic reaches the receive");
        assert_eq!(
            util::panic_message(panic),
            "the rule panicked",
            "on {backend}"
        );
        runtime.block_on(async {
            let judged = util::recv_datagram(&relay).await;
            assert_eq!((seq_of(&judged), judged.len()), (1, 13), "on {backend}");
            source.send_to(&numbered(3, 10, true), to_relay).unwrap();
            assert_eq!(seq_of(&util::recv_datagram(&relay).await), 3);
            relay.settle_posts().await.unwrap();
        });
        let mut forwarded = Vec::new();
        let mut buf = [0u8; 200];
        for _ in 0..2 {
            let (len, _) = sink.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..len], &numbered(seq_of(&buf), len, false)[..]);
            forwarded.push(seq_of(&buf));
        }
        forwarded.sort_unstable();
        assert_eq!(forwarded, vec![0, 2], "on {backend}");
        assert_eq!(relay.post_stats().sent, 2);
    }
}

/// Loopback with a 1280-byte MTU: datagrams of 1300 bytes go out as IP fragments one by
/// one, but a GSO send of them is refused (its segments exceed the path). The forwards
/// the kernel refused as a GSO run are sent again one by one: none is lost.
#[test]
fn forwards_a_path_cannot_carry_as_gso_go_one_by_one() {
    for backend in util::BACKENDS {
        let netns = match util::netns::Netns::create("fwdmtu") {
            Ok(netns) => netns,
            Err(why) => return util::netns::skip(&why),
        };
        netns
            .exec(&["ip", "link", "set", "lo", "mtu", "1280"])
            .unwrap();
        netns.run(move || {
            util::on_backend(backend, &|backend| async move {
                let source = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let sink = util::bound_loopback();
                sink.control().set_receive_buffer_size(4 << 20).unwrap();
                let relay = util::bound_loopback();
                relay.control().set_receive_buffer_size(4 << 20).unwrap();
                let to_relay = relay.local_addr().unwrap();
                let to_sink = sink.local_addr().unwrap();
                relay
                    .forward_received(Forwarding::to(to_sink).delivering(keep_marked))
                    .unwrap();
                let relay = std::rc::Rc::new(relay);
                let waiting = ringsock::spawn({
                    let relay = relay.clone();
                    async move { seq_of(&util::recv_datagram(&relay).await) }
                });
                let burst = 40;
                // Sent with no turn of the runtime between: reaped together, a GSO run.
                for seq in 0..burst {
                    source
                        .send_to(&numbered(seq, 1300, false), to_relay)
                        .unwrap();
                }
                let mut seqs = take_numbered(&sink, to_relay, burst as usize).await;
                seqs.sort_unstable();
                assert_eq!(seqs, (0..burst).collect::<Vec<u32>>(), "on {backend}");
                source
                    .send_to(&numbered(burst, 20, true), to_relay)
                    .unwrap();
                assert_eq!(waiting.await, burst);
                relay.settle_posts().await.unwrap();
                let posts = relay.post_stats();
                assert_eq!(
                    (posts.sent, posts.failed),
                    (u64::from(burst), 0),
                    "{posts:?}"
                );
            });
        });
    }
}

#[test]
fn kept_datagrams_of_a_burst_come_one_receive_at_a_time_in_order() {
    on_each_forwarding_path(|backend| async move {
        let Path {
            source,
            relay,
            sink,
            to_relay,
        } = path_keeping_marked();
        // Kept and forwarded in turn, all queued before the relay takes any.
        for seq in 0..20 {
            source
                .send_to(&numbered(seq, 60, seq % 2 == 0), to_relay)
                .unwrap();
        }
        for seq in (0..20).step_by(2) {
            let kept = util::recv_datagram(&relay).await;
            assert_eq!(seq_of(&kept), seq, "on {backend}");
        }
        let mut forwarded = take_numbered(&sink, to_relay, 10).await;
        forwarded.sort_unstable();
        assert_eq!(forwarded, (1..20).step_by(2).collect::<Vec<u32>>());
        relay.settle_posts().await.unwrap();
        assert_eq!(relay.post_stats().sent, 10);
        assert_eq!(relay.receive_stats().forwarded, 10);
    });
}

static RULE_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn counted_keep_marked(data: &[u8]) -> bool {
    RULE_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    keep_marked(data)
}

#[test]
fn the_rule_is_asked_once_per_datagram() {
    on_each_forwarding_path(|backend| async move {
        let source = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay = util::bound_loopback();
        let to_relay = relay.local_addr().unwrap();
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rule = Forwarding::to(sink.local_addr().unwrap()).delivering(counted_keep_marked);
        relay.forward_received(rule).unwrap();
        let before = RULE_CALLS.load(std::sync::atomic::Ordering::Relaxed);
        for seq in 0..64 {
            source.send_to(&numbered(seq, 40, true), to_relay).unwrap();
        }
        for seq in 0..64 {
            assert_eq!(
                seq_of(&util::recv_datagram(&relay).await),
                seq,
                "on {backend}"
            );
        }
        let calls = RULE_CALLS.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert_eq!(calls, 64, "on {backend}");
    });
}

/// A group whose sockets' rule panics: each panic goes on from `recv_batch`, and what
/// the group had taken from the other sockets in that call comes in the next ones.
#[test]
fn a_group_of_forwarding_sockets_loses_nothing_when_a_rule_panics() {
    for backend in util::BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let source = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rule = Forwarding::to(sink.local_addr().unwrap()).delivering(panics_on_13_bytes);
        let group = runtime.block_on(async {
            let sockets: Vec<DatagramSocket> = (0..3).map(|_| util::bound_loopback()).collect();
            for socket in &sockets {
                socket.forward_received(rule).unwrap();
            }
            ringsock::DatagramGroup::new(sockets)
        });
        for index in 0..3 {
            let to = group.socket(index).local_addr().unwrap();
            source
                .send_to(&numbered(index as u32, 30, true), to)
                .unwrap();
            source
                .send_to(&numbered(10 + index as u32, 13, false), to)
                .unwrap();
        }
        let mut got = Vec::new();
        let mut panics = 0;
        while got.len() < 6 {
            let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runtime.block_on(async {
                    let mut out = Vec::new();
                    let taking = group.recv_batch(&mut out, 64);
                    ringsock::runtime::timeout(util::MUST_HAPPEN, taking)
                        .await
                        .expect("the group must hand out what its sockets hold")
                        .unwrap();
                    out.into_iter()
                        .map(|(index, datagram)| (index, seq_of(&datagram)))
                        .collect::<Vec<_>>()
                })
            }));
            match taken {
                Ok(taken) => got.extend(taken),
                Err(panic) => {
                    assert_eq!(util::panic_message(panic), "the rule panicked");
                    panics += 1;
                    assert!(panics <= 3, "on {backend}: a panic per socket at most");
                }
            }
        }
        got.sort_unstable();
        let expect: Vec<(usize, u32)> = (0..3)
            .flat_map(|i| [(i, i as u32), (i, 10 + i as u32)])
            .collect();
        assert_eq!(got, expect, "on {backend}");
        assert!(panics >= 1, "on {backend}");
    }
}

/// A panic of the rule that the io_uring driver caught while no receive ran goes on at
/// `detach`, before it takes anything: the socket stays whole, and a second detach
/// hands every datagram over.
#[test]
fn a_rule_panic_pending_at_detach_goes_on_before_anything_is_taken() {
    for backend in util::BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let source = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (relay, marker) = runtime.block_on(async {
            let relay = util::bound_loopback();
            let rule = Forwarding::to(sink.local_addr().unwrap()).delivering(panics_on_13_bytes);
            relay.forward_received(rule).unwrap();
            (relay, util::bound_loopback())
        });
        let to_relay = relay.local_addr().unwrap();
        source.send_to(&numbered(0, 30, true), to_relay).unwrap();
        runtime.block_on(async {
            // Its receive arms the relay's standing receive.
            assert_eq!(seq_of(&util::recv_datagram(&relay).await), 0);
        });
        source.send_to(&numbered(1, 30, true), to_relay).unwrap();
        source.send_to(&numbered(2, 13, false), to_relay).unwrap();
        source.send_to(b"m", marker.local_addr().unwrap()).unwrap();
        // The marker's turn reaps the relay's datagrams too: they came first.
        runtime.block_on(async { util::recv_datagram(&marker).await });
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(async { relay.detach() })
        }));
        let detached = match first {
            Ok(detached) => detached.unwrap(),
            Err(panic) => {
                assert_eq!(
                    util::panic_message(panic),
                    "the rule panicked",
                    "on {backend}"
                );
                assert_eq!(relay.local_addr().unwrap(), to_relay, "still whole");
                runtime.block_on(async { relay.detach() }).unwrap()
            }
        };
        let seqs = runtime.block_on(async {
            let adopted = detached.into_datagram().unwrap();
            let mut seqs = Vec::new();
            for _ in 0..2 {
                seqs.push(seq_of(&util::recv_datagram(&adopted).await));
            }
            seqs
        });
        assert_eq!(seqs, vec![1, 2], "on {backend}");
    }
}

/// What a rule kept for the program stays kept on the socket's next owner: a rule set
/// there judges only what comes after.
#[test]
fn what_the_rule_kept_stays_kept_after_a_detach() {
    on_each_forwarding_path(|backend| async move {
        let Path {
            source,
            relay,
            sink,
            to_relay,
        } = path_keeping_marked();
        for seq in 0..3 {
            source.send_to(&numbered(seq, 40, true), to_relay).unwrap();
        }
        assert_eq!(seq_of(&util::recv_datagram(&relay).await), 0);
        let adopted = relay.detach().unwrap().into_datagram().unwrap();
        let everything = Forwarding::to(sink.local_addr().unwrap());
        adopted.forward_received(everything).unwrap();
        // 1 and 2 were kept before the detach: the new rule does not judge them.
        for seq in 1..3 {
            let kept = util::recv_datagram(&adopted).await;
            assert_eq!(seq_of(&kept), seq, "on {backend}");
        }
        // 3 comes after, and goes on while a receive waits.
        let adopted = std::rc::Rc::new(adopted);
        let _waiting = ringsock::spawn({
            let adopted = adopted.clone();
            async move { adopted.recv().await.map(|datagram| datagram.len()) }
        });
        source.send_to(&numbered(3, 40, true), to_relay).unwrap();
        assert_eq!(take_numbered_any(&sink, to_relay).await, 3, "on {backend}");
    });
}

/// The next datagram on `sink`, from `from`, whatever its mark; its sequence number.
async fn take_numbered_any(sink: &DatagramSocket, from: SocketAddr) -> u32 {
    let got = util::recv_datagram(sink).await;
    assert_eq!(got.remote_addr(), from);
    seq_of(&got)
}

/// A rule set from under another runtime's `block_on` only records the rule: the
/// socket's own runtime forwards by it, and a receive polled under the other runtime
/// is WrongRuntime, as anywhere.
#[test]
fn a_rule_set_under_another_runtime_is_the_sockets_own_runtimes_to_run() {
    for backend in util::BACKENDS {
        let Some(home) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let Some(other) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let source = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (relay, sink) =
            home.block_on(async { (util::bound_loopback(), util::bound_loopback()) });
        let to_relay = relay.local_addr().unwrap();
        let rule = Forwarding::to(sink.local_addr().unwrap()).delivering(keep_marked);
        other.block_on(async {
            relay.forward_received(rule).unwrap();
            let err = relay.recv().await.unwrap_err();
            assert_eq!(
                err.status(),
                SocketErrorStatus::WrongRuntime,
                "on {backend}"
            );
        });
        source.send_to(&numbered(0, 50, false), to_relay).unwrap();
        source.send_to(&numbered(1, 50, true), to_relay).unwrap();
        home.block_on(async {
            assert_eq!(
                seq_of(&util::recv_datagram(&relay).await),
                1,
                "on {backend}"
            );
            assert_eq!(take_numbered(&sink, to_relay, 1).await, vec![0]);
            relay.settle_posts().await.unwrap();
            assert_eq!(relay.post_stats().sent, 1);
        });
    }
}

/// The io_uring driver sends a forwarding socket's datagrams through the ring's file
/// table, which keeps the socket open whatever becomes of its descriptor: dropped, the
/// socket must still give its port back.
#[test]
fn a_dropped_forwarding_socket_gives_its_port_back() {
    on_each_forwarding_path(|backend| async move {
        let Path {
            source,
            relay,
            sink,
            to_relay,
        } = path_keeping_marked();
        // The relay forwards while the program receives: until the datagram it keeps.
        let relay = std::rc::Rc::new(relay);
        let kept = ringsock::spawn({
            let relay = relay.clone();
            async move { seq_of(&util::recv_datagram(&relay).await) }
        });
        let count = 20u32;
        for seq in 0..count {
            source.send_to(&numbered(seq, 64, false), to_relay).unwrap();
        }
        source
            .send_to(&numbered(count, 64, true), to_relay)
            .unwrap();
        let mut seqs = take_numbered(&sink, to_relay, count as usize).await;
        seqs.sort_unstable();
        assert_eq!(seqs, (0..count).collect::<Vec<_>>(), "on {backend}");
        assert_eq!(kept.await, count);
        relay.settle_posts().await.unwrap();
        drop(relay);
        // The multishot receive ends at its cancel's completion, in a later turn of the
        // runtime: each miss lets the runtime turn once more (a datagram round trip).
        let to_sink = sink.local_addr().unwrap();
        let mut turns = 0;
        let rebound = loop {
            match std::net::UdpSocket::bind(to_relay) {
                Ok(socket) => break socket,
                Err(err) if turns < 100 => {
                    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
                    turns += 1;
                    sink.send_to_addr(vec![1u8; 8], to_sink).await.0.unwrap();
                    util::recv_datagram(&sink).await;
                }
                Err(err) => panic!("on {backend}: the port is still taken: {err}"),
            }
        };
        assert_eq!(rebound.local_addr().unwrap(), to_relay);
    });
}

/// More forwarding sockets than the io_uring driver's file table has slots (1024): the
/// sockets past it send through their descriptors, and every one forwards.
#[test]
fn more_forwarding_sockets_than_the_file_table_holds_all_forward() {
    const RELAYS: usize = 1100;
    util::raise_nofile(RELAYS as u64 * 2 + 256);
    on_each_forwarding_path(|backend| async move {
        let source = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        let mut relays = Vec::with_capacity(RELAYS);
        let mut waiting = Vec::with_capacity(RELAYS);
        for _ in 0..RELAYS {
            let relay = std::rc::Rc::new(util::small_ring_loopback());
            relay
                .forward_received(Forwarding::to(to_sink).delivering(keep_marked))
                .unwrap();
            // Each forwards while its program receives: until the datagram it keeps.
            waiting.push(ringsock::spawn({
                let relay = relay.clone();
                async move { seq_of(&util::recv_datagram(&relay).await) }
            }));
            relays.push(relay);
        }
        let mut seen = vec![false; RELAYS];
        // In rounds the sink's receive buffer holds whole.
        for (round, chunk) in relays.chunks(64).enumerate() {
            for (offset, relay) in chunk.iter().enumerate() {
                let seq = (round * 64 + offset) as u32;
                let to_relay = relay.local_addr().unwrap();
                source.send_to(&numbered(seq, 64, false), to_relay).unwrap();
                source.send_to(&numbered(seq, 64, true), to_relay).unwrap();
            }
            for _ in 0..chunk.len() {
                let got = util::recv_datagram(&sink).await;
                let seq = seq_of(&got) as usize;
                assert_eq!(got.remote_addr(), relays[seq].local_addr().unwrap());
                assert_eq!(&got[..], &numbered(seq as u32, 64, false)[..]);
                assert!(!std::mem::replace(&mut seen[seq], true), "{seq} twice");
            }
        }
        for (index, kept) in waiting.into_iter().enumerate() {
            assert_eq!(kept.await, index as u32, "on {backend}");
        }
        for relay in &relays {
            relay.settle_posts().await.unwrap();
            assert_eq!(relay.receive_stats().forwarded, 1, "on {backend}");
            assert_eq!(relay.post_stats().sent, 1, "on {backend}");
        }
    });
}

/// A forwarding socket that outlives its runtime, beside another of its sockets (which
/// keeps the io_uring driver's ring open): dropped, it still gives its port back at
/// once, as its descriptor closes. The driver gives its file table up when it goes.
#[test]
fn a_forwarding_socket_dropped_after_its_runtime_gives_its_port_back() {
    for backend in util::BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let (relay, sink, to_relay) = runtime.block_on(async {
            let Path {
                source,
                relay,
                sink,
                to_relay,
            } = path_keeping_marked();
            source.send_to(&numbered(0, 64, false), to_relay).unwrap();
            source.send_to(&numbered(1, 64, true), to_relay).unwrap();
            assert_eq!(seq_of(&util::recv_datagram(&relay).await), 1);
            assert_eq!(take_numbered(&sink, to_relay, 1).await, [0]);
            (relay, sink, to_relay)
        });
        drop(runtime);
        drop(relay);
        let rebound = std::net::UdpSocket::bind(to_relay);
        assert!(rebound.is_ok(), "on {backend}: {rebound:?}");
        drop(sink);
    }
}

/// A socket on the wildcard address is its port on every address of the host: a rule
/// that sends there loops, one that sends to another host's address on that port does
/// not — also where any address may be bound (`ip_nonlocal_bind`, usual beside
/// keepalived), and for a link-local address, whose scope names the interface.
#[test]
fn a_wildcard_socket_refuses_its_port_on_any_address_of_the_host() {
    util::on_each_backend_in_netns("fwdown", |backend| async move {
        let setup: [&[&str]; 4] = [
            &[
                "link", "add", "rsf0", "type", "veth", "peer", "name", "rsf1",
            ],
            &["addr", "add", "10.79.0.1/24", "dev", "rsf0"],
            &["addr", "add", "fe80::abcd/64", "dev", "rsf0", "nodad"],
            &["link", "set", "rsf0", "up"],
        ];
        for args in setup {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}");
        }
        // This thread's namespace's setting: /proc/sys/net is the opener's namespace.
        std::fs::write("/proc/sys/net/ipv4/ip_nonlocal_bind", "1").unwrap();
        let refused = |relay: &DatagramSocket, to: SocketAddr| {
            let err = relay.forward_received(Forwarding::to(to)).unwrap_err();
            assert_eq!(
                err.status(),
                SocketErrorStatus::InvalidArgument,
                "to {to} on {backend}: {err}"
            );
            assert!(relay.forwarding().is_none());
        };
        let relay = DatagramSocket::new();
        relay.bind_addr("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = relay.local_addr().unwrap().port();
        refused(&relay, SocketAddr::from(([10, 79, 0, 1], port)));
        let elsewhere = SocketAddr::from(([10, 79, 0, 2], port));
        relay.forward_received(Forwarding::to(elsewhere)).unwrap();
        let other_port = SocketAddr::from(([10, 79, 0, 1], port.wrapping_add(1).max(1)));
        relay.forward_received(Forwarding::to(other_port)).unwrap();
        assert_eq!(
            relay.forwarding().map(|rule| rule.destination()),
            Some(other_port)
        );

        let dual = DatagramSocket::new();
        dual.bind_addr("[::]:0".parse().unwrap()).unwrap();
        let port = dual.local_addr().unwrap().port();
        let name = std::ffi::CString::new("rsf0").unwrap();
        // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        let link_local = "fe80::abcd".parse().unwrap();
        refused(
            &dual,
            std::net::SocketAddrV6::new(link_local, port, 0, index).into(),
        );
        refused(&dual, SocketAddr::from(([10, 79, 0, 1], port)));
        let elsewhere = SocketAddr::from(([0xfe80, 0, 0, 0, 0, 0, 0, 0xabce], port));
        dual.forward_received(Forwarding::to(elsewhere)).unwrap();
    });
}
