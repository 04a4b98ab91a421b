//! Posted sends (`DatagramSocket::post_to_addr`), on both drivers and the io_uring ring
//! without incremental buffers: nobody awaits them, yet every one is accounted for
//! (sent, dropped on a full send buffer, or failed with its reason), forwarded bytes
//! arrive exact while the receive ring recycles, a post never outlives its books, and
//! misuse fails at the call with nothing sent.

mod util;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ringsock::runtime::Builder;
use ringsock::{Backend, DatagramSocket, SocketErrorStatus};

async fn settle(socket: &DatagramSocket) {
    util::must("posts settle", socket.settle_posts())
        .await
        .unwrap();
}

#[test]
fn posted_forwards_arrive_exact_while_the_ring_recycles() {
    util::on_each_receive_path(|_backend: Backend| async move {
        let source = util::bound_loopback();
        let relay = util::small_ring_loopback();
        let sink = util::bound_loopback();
        let to_relay = relay.local_addr().unwrap();
        let to_sink = sink.local_addr().unwrap();
        let rounds = 300u64;
        for round in 0..rounds {
            let len = 1 + (round as usize * 37) % 1500;
            let sent = util::pseudo_random_bytes(round, len);
            source.send_to_addr(sent.clone(), to_relay).await.0.unwrap();
            let forward = util::recv_datagram(&relay).await.into_forward();
            relay.post_to_addr(forward, to_sink).unwrap();
            let got = util::recv_datagram(&sink).await;
            assert_eq!(&got[..], &sent[..], "round {round}");
            assert_eq!(got.remote_addr(), to_relay);
        }
        settle(&relay).await;
        let posts = relay.post_stats();
        assert_eq!((posts.sent, posts.dropped, posts.failed), (rounds, 0, 0));
        assert_eq!((posts.in_flight, posts.last_error), (0, None));
        let ring = relay.receive_stats();
        assert_eq!((ring.buffers_forwarding, ring.buffers_lent), (0, 0));
    });
}

#[test]
fn posts_to_64_peers_in_one_turn_each_reach_their_own_peer() {
    util::on_each_backend(|_backend: Backend| async move {
        let sender = util::bound_loopback();
        let peers: Vec<DatagramSocket> = (0..64).map(|_| util::bound_loopback()).collect();
        for (i, peer) in peers.iter().enumerate() {
            let payload = util::pseudo_random_bytes(i as u64, 100 + i);
            sender
                .post_to_addr(payload, peer.local_addr().unwrap())
                .unwrap();
        }
        settle(&sender).await;
        assert_eq!(sender.post_stats().sent, 64);
        for (i, peer) in peers.iter().enumerate() {
            let got = util::recv_datagram(peer).await;
            assert_eq!(&got[..], &util::pseudo_random_bytes(i as u64, 100 + i)[..]);
            assert_eq!(got.remote_addr(), sender.local_addr().unwrap());
        }
    });
}

#[test]
fn what_a_post_refuses_fails_at_the_call_with_nothing_sent() {
    util::on_each_backend(|_backend: Backend| async move {
        let socket = util::bound_loopback();
        let peer = util::bound_loopback();
        let to_peer = peer.local_addr().unwrap();

        let port_zero = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let (err, back) = socket.post_to_addr(b"x".to_vec(), port_zero).unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        assert_eq!(back, b"x", "a refused post gives its buffer back");

        let too_long = vec![7u8; 65_508];
        let (err, back) = socket.post_to_addr(too_long, to_peer).unwrap_err();
        assert_eq!(back.len(), 65_508);
        assert_eq!(err.status(), SocketErrorStatus::MessageTooLong, "{err}");

        let v6 = "[::1]:9".parse().unwrap();
        let (err, _) = socket.post_to_addr(b"x".to_vec(), v6).unwrap_err();
        assert_eq!(
            err.status(),
            SocketErrorStatus::AddressFamilyNotSupported,
            "{err}"
        );

        // The largest legal datagram goes whole.
        socket.post_to_addr(vec![9u8; 65_507], to_peer).unwrap();
        settle(&socket).await;
        assert_eq!(util::recv_datagram(&peer).await.len(), 65_507);
        let posts = socket.post_stats();
        assert_eq!((posts.sent, posts.failed, posts.in_flight), (1, 0, 0));
    });
}

#[test]
fn a_send_the_kernel_refuses_is_counted_with_its_reason() {
    util::on_each_backend(|_backend: Backend| async move {
        let socket = util::bound_loopback();
        // The limited broadcast address, on a socket without SO_BROADCAST: the kernel
        // refuses the send itself (EACCES), so nothing leaves the host.
        let broadcast = SocketAddr::new(IpAddr::V4(Ipv4Addr::BROADCAST), 9);
        socket.post_to_addr(b"x".to_vec(), broadcast).unwrap();
        settle(&socket).await;
        let posts = socket.post_stats();
        assert_eq!((posts.sent, posts.failed), (0, 1), "{posts:?}");
        assert!(posts.last_error.is_some(), "{posts:?}");
    });
}

/// A program that posts without ever letting the runtime turn meets the cap (on
/// io_uring, where the sends wait for the turn) rather than an unbounded queue, and
/// every post it made is in the books once they settle.
#[test]
fn posting_without_a_turn_meets_the_cap_and_every_post_is_booked() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = util::bound_loopback();
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        let mut posted = 0u64;
        let mut refused = 0u64;
        for i in 0..6000u32 {
            match sender.post_to_addr(i.to_le_bytes().to_vec(), to_sink) {
                Ok(()) => posted += 1,
                Err((err, back)) => {
                    assert_eq!(err.status(), SocketErrorStatus::NoBufferSpace, "{err}");
                    assert_eq!(back, i.to_le_bytes());
                    refused += 1;
                }
            }
            assert!(sender.post_stats().in_flight <= 4096);
        }
        if backend == Backend::Uring {
            assert!(refused > 0, "6,000 posts in one turn never met the cap");
        }
        assert_eq!(posted + refused, 6000);
        settle(&sender).await;
        let posts = sender.post_stats();
        assert_eq!(
            posts.sent + posts.dropped + posts.failed,
            posted,
            "{posts:?}"
        );
        assert_eq!(posts.failed, 0, "{posts:?}");
        // Room again once they settled.
        sender.post_to_addr(b"again".to_vec(), to_sink).unwrap();
        settle(&sender).await;
    });
}

/// A socket of runtime A posted from runtime B fails with WrongRuntime and books
/// nothing; back on A it posts as before.
#[test]
fn a_post_under_another_runtime_fails_and_books_nothing() {
    for backend in util::BACKENDS {
        let builder = || Builder::new().backend(backend);
        let (Some(a), Some(b)) = (
            util::build_or_skip(builder(), backend),
            util::build_or_skip(builder(), backend),
        ) else {
            continue;
        };
        let (sender, sink) = a.block_on(async {
            let sender = util::bound_loopback();
            let sink = util::bound_loopback();
            // First use binds the socket to A.
            sender
                .post_to_addr(b"on A".to_vec(), sink.local_addr().unwrap())
                .unwrap();
            settle(&sender).await;
            (sender, sink)
        });
        let to_sink = sink.local_addr().unwrap();
        b.block_on(async {
            let (err, back) = sender.post_to_addr(b"on B".to_vec(), to_sink).unwrap_err();
            assert_eq!(back, b"on B");
            assert_eq!(err.status(), SocketErrorStatus::WrongRuntime, "{err}");
            // Nothing in flight: nothing to wait for, wherever it is asked.
            sender.settle_posts().await.unwrap();
        });
        assert_eq!(sender.post_stats().sent, 1);
        assert_eq!(sender.post_stats().in_flight, 0);
        // In flight on A, awaited on B: an error, not a wait for A to turn.
        a.block_on(async {
            sender
                .post_to_addr(b"A in flight".to_vec(), to_sink)
                .unwrap();
        });
        // On io_uring the send waits for A's next turn; epoll made it at the call.
        let in_flight = sender.post_stats().in_flight;
        assert_eq!(
            in_flight,
            usize::from(backend == Backend::Uring),
            "{backend}"
        );
        if in_flight > 0 {
            b.block_on(async {
                let err = sender.settle_posts().await.unwrap_err();
                assert_eq!(err.status(), SocketErrorStatus::WrongRuntime, "{err}");
            });
        }
        a.block_on(async {
            sender.post_to_addr(b"A again".to_vec(), to_sink).unwrap();
            settle(&sender).await;
            assert_eq!(&util::recv_datagram(&sink).await[..], b"on A");
            assert_eq!(&util::recv_datagram(&sink).await[..], b"A in flight");
            assert_eq!(&util::recv_datagram(&sink).await[..], b"A again");
        });
    }
}

/// Posts left in flight when `block_on` returns are not lost: the next turn of the
/// same runtime completes them, and dropping the runtime with posts in flight frees
/// their buffers only after the kernel is done.
#[test]
fn posts_outlive_the_block_on_that_made_them() {
    for backend in util::BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let (sender, sink) = runtime.block_on(async {
            let sender = util::bound_loopback();
            let sink = util::bound_loopback();
            for i in 0..100u8 {
                sender
                    .post_to_addr(vec![i; 64], sink.local_addr().unwrap())
                    .unwrap();
            }
            (sender, sink)
        });
        runtime.block_on(async {
            settle(&sender).await;
            assert_eq!(sender.post_stats().sent, 100);
            for i in 0..100u8 {
                assert_eq!(&util::recv_datagram(&sink).await[..], &[i; 64][..]);
            }
            sender
                .post_to_addr(b"last".to_vec(), sink.local_addr().unwrap())
                .unwrap();
        });
        drop(runtime);
        assert_eq!(sender.post_stats().in_flight, 0, "{backend}");
    }
}

/// Posts, awaited sends, `send_many` and an output stream's flush on one socket to one
/// peer: the datagrams arrive in the order the program sent them (on io_uring the
/// posts wait in the submission queue while the others are direct `sendmmsg` calls).
#[test]
fn posts_keep_their_place_before_sends_made_after_them() {
    util::on_each_backend(|_backend: Backend| async move {
        use ringsock::OutgoingDatagram;
        let sender = util::bound_loopback();
        let peer = util::bound_loopback();
        let to = peer.local_addr().unwrap();
        let numbered = |n: u32| n.to_le_bytes().to_vec();
        let mut next = 0u32;
        for _ in 0..3 {
            for _ in 0..5 {
                sender.post_to_addr(numbered(next), to).unwrap();
                next += 1;
            }
            let many = (next..next + 4)
                .map(|n| OutgoingDatagram::new(numbered(n), to))
                .collect();
            next += 4;
            for result in sender.send_many(many).await.unwrap() {
                result.unwrap();
            }
            sender.post_to_addr(numbered(next), to).unwrap();
            next += 1;
            // Two writes of one size and one of another: more than one send, so the
            // flush tries one sendmmsg first.
            let output = sender.output_stream_to_addr(to).unwrap();
            output.write(numbered(next)).await.unwrap();
            output.write(numbered(next + 1)).await.unwrap();
            output.write(vec![0xEE; 9]).await.unwrap();
            output.flush().await.unwrap();
            next += 2;
            sender.post_to_addr(numbered(next), to).unwrap();
            next += 1;
            sender.send_to_addr(numbered(next), to).await.0.unwrap();
            next += 1;
        }
        settle(&sender).await;
        let mut order = Vec::new();
        while order.len() < next as usize {
            let got = util::recv_datagram(&peer).await;
            if got.len() == 4 {
                order.push(u32::from_le_bytes(got[..].try_into().unwrap()));
            }
        }
        assert_eq!(order, (0..next).collect::<Vec<_>>());
    });
}
