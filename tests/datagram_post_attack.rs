//! Posted sends (`DatagramSocket::post_to_addr`) used carelessly, on both drivers: the
//! socket, the ring a posted forward was lent from, or the runtime dropped or detached
//! while posts are in flight; several tasks posting and settling at once; dual-stack
//! destinations; a grouped socket. Every post is booked, receive buffers come back, no
//! waiter is left behind, and nothing is written into freed memory. The whole file runs
//! under an allocator that poisons freed blocks and checks the poison stayed intact
//! (see `util::poison`).

mod util;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;

use ringsock::runtime::Builder;
use ringsock::{Backend, DatagramGroup, DatagramSocket, PostStats, Runtime, SocketErrorStatus};

#[global_allocator]
static ALLOC: util::poison::PoisonAlloc = util::poison::PoisonAlloc;

fn assert_no_corruption(what: &str) {
    assert_eq!(
        util::poison::corrupted(),
        0,
        "{what}: memory was written after it was freed"
    );
}

async fn settle(socket: &DatagramSocket) {
    util::must("posts settle", socket.settle_posts())
        .await
        .unwrap();
}

/// Every Ok post is in exactly one of the books once none is in flight.
fn assert_booked(posts: PostStats, posted: u64, what: &str) {
    assert_eq!(posts.in_flight, 0, "{what}: {posts:?}");
    assert_eq!(
        posts.sent + posts.dropped + posts.failed,
        posted,
        "{what}: {posts:?}"
    );
}

fn runtime(backend: Backend) -> Option<Runtime> {
    util::build_or_skip(Builder::new().backend(backend), backend)
}

/// Two tasks awaiting `settle_posts` on the same socket at once both finish: the
/// ledger must wake every waiter, not only the last one that polled.
#[test]
fn two_tasks_settling_at_once_both_finish() {
    util::on_each_backend(|_backend: Backend| async move {
        let sender = Rc::new(util::bound_loopback());
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        for i in 0..8u8 {
            sender.post_to_addr(vec![i; 32], to_sink).unwrap();
        }
        let first = {
            let sender = sender.clone();
            ringsock::spawn(async move { sender.settle_posts().await })
        };
        let second = {
            let sender = sender.clone();
            ringsock::spawn(async move { sender.settle_posts().await })
        };
        util::must("the second waiter settles", second)
            .await
            .unwrap();
        util::must("the first waiter settles", first).await.unwrap();
        assert_booked(sender.post_stats(), 8, "two waiters");
        for i in 0..8u8 {
            assert_eq!(&util::recv_datagram(&sink).await[..], &[i; 32][..]);
        }
    });
}

/// A waiter dropped before the posts settle leaves nothing behind that stops a later
/// waiter (a stale waker in the books), and posts from a spawned task settle when
/// awaited from another.
#[test]
fn posts_from_a_task_settle_from_another_and_a_dropped_waiter_is_harmless() {
    util::on_each_backend(|_backend: Backend| async move {
        let sender = Rc::new(util::bound_loopback());
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        let poster = {
            let sender = sender.clone();
            ringsock::spawn(async move {
                for i in 0..100u32 {
                    sender
                        .post_to_addr(i.to_le_bytes().to_vec(), to_sink)
                        .unwrap();
                }
            })
        };
        util::must("the posting task ends", poster).await;
        {
            let mut waiter = Box::pin(sender.settle_posts());
            // Polled once (pending on io_uring, its waker in the books), then dropped.
            let _ = util::poll_once(waiter.as_mut()).await;
        }
        settle(&sender).await;
        assert_booked(sender.post_stats(), 100, "posted from a task");
        assert_eq!(sender.post_stats().sent, 100);
        for i in 0..100u32 {
            assert_eq!(&util::recv_datagram(&sink).await[..], &i.to_le_bytes()[..]);
        }
    });
}

/// Forwards posted by the socket that lent them, which is dropped at once: the data
/// arrives exact, and nothing is written after free when the ring is gone.
#[test]
fn a_socket_dropped_with_its_own_forwards_in_flight() {
    util::on_each_backend(|_backend: Backend| async move {
        let source = util::bound_loopback();
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        for round in 0..20u64 {
            let relay = util::small_ring_loopback();
            let sent = util::pseudo_random_bytes(round, 100 + round as usize * 50);
            let forward = util::forward_through(&source, &relay, sent.clone()).await;
            relay.post_to_addr(forward, to_sink).unwrap();
            drop(relay);
            let got = util::recv_datagram(&sink).await;
            assert_eq!(&got[..], &sent[..], "round {round}");
        }
        assert_no_corruption("relay dropped with its forwards in flight");
    });
}

/// A forward lent by one socket and posted by another; the lending socket is dropped
/// (or detached) while the post is in flight. The post completes, and the buffer goes
/// back to a ring whose socket is gone without a write into freed memory.
#[test]
fn the_lending_socket_dropped_while_another_posts_its_forward() {
    util::on_each_backend(|_backend: Backend| async move {
        let source = util::bound_loopback();
        let poster = util::bound_loopback();
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        for round in 0..20u64 {
            let relay = util::small_ring_loopback();
            let sent = util::pseudo_random_bytes(round, 1 + round as usize * 97);
            let forward = util::forward_through(&source, &relay, sent.clone()).await;
            poster.post_to_addr(forward, to_sink).unwrap();
            // Every other round the lender is detached (its ring let go) instead.
            let detached = (round % 2 == 1).then(|| relay.detach().unwrap());
            drop(relay);
            settle(&poster).await;
            drop(detached);
            let got = util::recv_datagram(&sink).await;
            assert_eq!(&got[..], &sent[..], "round {round}");
        }
        assert_booked(poster.post_stats(), 20, "lender dropped");
        assert_eq!(poster.post_stats().sent, 20);
        assert_no_corruption("lending socket dropped");
    });
}

/// The runtime dropped with forwards posted and in flight: the sockets outlive it, the
/// posts are all booked, and the buffers go back without a write into freed memory.
#[test]
fn the_runtime_dropped_with_forwards_in_flight() {
    for backend in util::BACKENDS {
        let Some(rt) = runtime(backend) else {
            continue;
        };
        let (source, relay, sink) = rt.block_on(async {
            let source = util::bound_loopback();
            let relay = util::small_ring_loopback();
            let sink = util::bound_loopback();
            for round in 0..6u64 {
                let sent = util::pseudo_random_bytes(round, 700);
                source
                    .send_to_addr(sent, relay.local_addr().unwrap())
                    .await
                    .0
                    .unwrap();
            }
            for _ in 0..6 {
                let forward = util::recv_datagram(&relay).await.into_forward();
                relay
                    .post_to_addr(forward, sink.local_addr().unwrap())
                    .unwrap();
            }
            // Every socket outlives the block_on: dropping one reaps the ring.
            (source, relay, sink)
        });
        if backend == Backend::Uring {
            assert!(
                relay.post_stats().in_flight > 0,
                "the drop meets them in flight"
            );
        }
        drop(rt);
        assert_booked(relay.post_stats(), 6, "runtime dropped");
        assert_eq!(relay.receive_stats().buffers_forwarding, 0, "{backend}");
        drop((source, relay, sink));
        assert_no_corruption("runtime dropped with forwards in flight");
    }
}

/// A socket detached with posts (forwards of its own ring and plain buffers) in flight:
/// every post is booked, the ring's buffers came back, a post after the detach fails
/// with its buffer, and the adopted socket posts on.
#[test]
fn a_socket_detached_with_posts_in_flight() {
    util::on_each_backend(|backend: Backend| async move {
        let source = util::bound_loopback();
        let relay = util::small_ring_loopback();
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        for round in 0..6u64 {
            let sent = util::pseudo_random_bytes(round, 300);
            source
                .send_to_addr(sent, relay.local_addr().unwrap())
                .await
                .0
                .unwrap();
        }
        for _ in 0..6 {
            let forward = util::recv_datagram(&relay).await.into_forward();
            relay.post_to_addr(forward, to_sink).unwrap();
            relay.post_to_addr(b"plain".to_vec(), to_sink).unwrap();
        }
        if backend == Backend::Uring {
            // The sends wait for the next turn: the detach meets them in flight.
            assert!(relay.post_stats().in_flight > 0);
        }
        let detached = relay.detach().unwrap();
        assert_booked(relay.post_stats(), 12, "detached");
        assert_eq!(relay.receive_stats().buffers_forwarding, 0, "{backend}");
        let (_, back) = relay.post_to_addr(b"after".to_vec(), to_sink).unwrap_err();
        assert_eq!(back, b"after");
        let adopted = detached.into_datagram().unwrap();
        adopted.post_to_addr(b"adopted".to_vec(), to_sink).unwrap();
        settle(&adopted).await;
        assert_eq!(adopted.post_stats().sent, 1);
        // Whatever went out before the detach arrived whole; "adopted" comes last.
        loop {
            let got = util::recv_datagram(&sink).await;
            if &got[..] == b"adopted" {
                break;
            }
            assert!(got.len() == 300 || &got[..] == b"plain", "{}", got.len());
        }
        drop(relay);
        assert_no_corruption("detached with posts in flight");
    });
}

/// Dual stack: an IPv6 socket on `[::]` posts to an IPv4 peer, an IPv4 socket posts to
/// a v4-mapped IPv6 address, and an unbound socket is made by its first post as by its
/// first send.
#[test]
fn dual_stack_destinations_and_a_post_before_bind() {
    util::on_each_backend(|_backend: Backend| async move {
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        let mapped = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
            to_sink.port(),
        );

        let any6 = DatagramSocket::new();
        any6.bind_addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0))
            .unwrap();
        any6.post_to_addr(b"six to four".to_vec(), to_sink).unwrap();
        any6.post_to_addr(b"six to mapped".to_vec(), mapped)
            .unwrap();
        settle(&any6).await;
        assert_eq!(any6.post_stats().sent, 2, "{:?}", any6.post_stats());
        assert_eq!(&util::recv_datagram(&sink).await[..], b"six to four");
        assert_eq!(&util::recv_datagram(&sink).await[..], b"six to mapped");

        let four = util::bound_loopback();
        four.post_to_addr(b"four to mapped".to_vec(), mapped)
            .unwrap();
        settle(&four).await;
        assert_eq!(four.post_stats().sent, 1, "{:?}", four.post_stats());
        let got = util::recv_datagram(&sink).await;
        assert_eq!(&got[..], b"four to mapped");
        assert_eq!(got.remote_addr(), four.local_addr().unwrap());

        // Unbound: the first post makes the socket, as the first send would.
        let lazy = DatagramSocket::new();
        lazy.post_to_addr(b"lazy".to_vec(), to_sink).unwrap();
        settle(&lazy).await;
        assert_eq!(lazy.post_stats().sent, 1);
        let from = lazy.local_addr().unwrap();
        assert!(from.is_ipv4() && from.port() != 0, "{from}");
        let got = util::recv_datagram(&sink).await;
        assert_eq!(&got[..], b"lazy");
        assert_eq!(got.remote_addr().port(), from.port());
        // And it answers to the address it was given.
        lazy.send_to_addr(b"then a send".to_vec(), to_sink)
            .await
            .0
            .unwrap();
        assert_eq!(&util::recv_datagram(&sink).await[..], b"then a send");
    });
}

/// An IPv6 socket posting to an IPv4 (or v4-mapped) peer meets the IPv4 limit at the
/// call, with its buffer back, as the docs say of a datagram over the UDP maximum:
/// the kernel would refuse it only in the completion, where nobody looks.
#[test]
fn an_ipv6_socket_posting_to_ipv4_meets_the_ipv4_limit_at_the_call() {
    util::on_each_backend(|_backend: Backend| async move {
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        let mapped = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
            to_sink.port(),
        );
        let any6 = DatagramSocket::new();
        any6.bind_addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0))
            .unwrap();
        for to in [to_sink, mapped] {
            let (err, back) = any6.post_to_addr(vec![1u8; 65_508], to).unwrap_err();
            assert_eq!(
                err.status(),
                SocketErrorStatus::MessageTooLong,
                "{to}: {err}"
            );
            assert_eq!(back.len(), 65_508);
        }
        any6.post_to_addr(vec![2u8; 65_507], to_sink).unwrap();
        settle(&any6).await;
        let posts = any6.post_stats();
        assert_eq!((posts.sent, posts.failed), (1, 0), "{posts:?}");
        assert_eq!(util::recv_datagram(&sink).await.len(), 65_507);
    });
}

/// A socket of a `DatagramGroup` posts the forwards the group receives.
#[test]
fn a_grouped_socket_posts_what_the_group_receives() {
    util::on_each_backend(|_backend: Backend| async move {
        let group = DatagramGroup::new(vec![
            util::small_ring_loopback(),
            util::small_ring_loopback(),
        ]);
        let source = util::bound_loopback();
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        for (i, socket) in group.sockets().iter().enumerate() {
            source
                .send_to_addr(vec![i as u8; 64], socket.local_addr().unwrap())
                .await
                .0
                .unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 2 {
            util::must("the group receives", group.recv_batch(&mut got, 2))
                .await
                .unwrap();
        }
        for (index, datagram) in got {
            group
                .socket(index)
                .post_to_addr(datagram.into_forward(), to_sink)
                .unwrap();
        }
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(util::recv_datagram(&sink).await[0]);
        }
        seen.sort();
        assert_eq!(seen, [0, 1]);
        for socket in group.sockets() {
            settle(socket).await;
            assert_booked(socket.post_stats(), 1, "grouped");
            assert_eq!(socket.receive_stats().buffers_forwarding, 0);
        }
    });
}

/// A full send buffer: posts of large datagrams to a peer that never reads, without a
/// turn in between. Every Ok post is booked once settled, the cap holds, and refused
/// posts give their buffer back.
#[test]
fn a_full_send_buffer_books_every_post() {
    util::on_each_backend(|_backend: Backend| async move {
        let sender = util::bound_loopback();
        sender.control().set_send_buffer_size(4096).unwrap();
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        let mut posted = 0u64;
        for round in 0..3 {
            for i in 0..5000u32 {
                let buf = vec![(i % 251) as u8; 1400];
                match sender.post_to_addr(buf, to_sink) {
                    Ok(()) => posted += 1,
                    Err((err, back)) => {
                        assert_eq!(err.status(), SocketErrorStatus::NoBufferSpace, "{err}");
                        assert_eq!(back.len(), 1400);
                    }
                }
                assert!(sender.post_stats().in_flight <= 4096);
            }
            settle(&sender).await;
            assert_booked(sender.post_stats(), posted, &format!("round {round}"));
        }
        let posts = sender.post_stats();
        assert_eq!(posts.failed, 0, "{posts:?}");
    });
}

/// io_uring without a destination on SEND (`Capability::SendTo` disabled, as on kernels
/// before 6.0): posts go as SENDMSG, whose header points into the slot's own data.
/// Forwards and plain buffers, to IPv4 and IPv6 peers, arrive exact from the right
/// address, every post is booked, and nothing is written after free.
#[test]
fn posts_as_sendmsg_where_send_takes_no_destination() {
    let builder = Builder::new()
        .backend(Backend::Uring)
        .disable(ringsock::Capability::SendTo);
    util::on_runtime_of(builder, Backend::Uring, &|_backend: Backend| async move {
        let source = util::bound_loopback();
        let relay = util::small_ring_loopback();
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        for round in 0..40u64 {
            let sent = util::pseudo_random_bytes(round, 1 + round as usize * 31);
            let forward = util::forward_through(&source, &relay, sent.clone()).await;
            relay.post_to_addr(forward, to_sink).unwrap();
            relay.post_to_addr(sent.clone(), to_sink).unwrap();
            for _ in 0..2 {
                let got = util::recv_datagram(&sink).await;
                assert_eq!(&got[..], &sent[..], "round {round}");
                assert_eq!(got.remote_addr(), relay.local_addr().unwrap());
            }
        }
        settle(&relay).await;
        assert_booked(relay.post_stats(), 80, "sendmsg");
        assert_eq!(relay.post_stats().sent, 80);
        assert_eq!(relay.receive_stats().buffers_forwarding, 0);

        let six = DatagramSocket::new();
        six.bind_addr("[::1]:0".parse().unwrap()).unwrap();
        let sink6 = DatagramSocket::new();
        sink6.bind_addr("[::1]:0".parse().unwrap()).unwrap();
        six.post_to_addr(b"over six".to_vec(), sink6.local_addr().unwrap())
            .unwrap();
        settle(&six).await;
        let got = util::recv_datagram(&sink6).await;
        assert_eq!(&got[..], b"over six");
        assert_eq!(got.remote_addr(), six.local_addr().unwrap());
        drop(relay);
        assert_no_corruption("posts as SENDMSG");
    });
}

/// An empty datagram is a datagram: posted, it is sent and arrives empty.
#[test]
fn an_empty_post_is_an_empty_datagram() {
    util::on_each_backend(|_backend: Backend| async move {
        let sender = util::bound_loopback();
        let sink = util::bound_loopback();
        sender
            .post_to_addr(Vec::new(), sink.local_addr().unwrap())
            .unwrap();
        settle(&sender).await;
        assert_eq!(sender.post_stats().sent, 1, "{:?}", sender.post_stats());
        assert_eq!(util::recv_datagram(&sink).await.len(), 0);
    });
}

/// The bytes of a post whose owner, when dropped (once the send is done), posts the
/// next one on the same socket: a drop that re-enters the API from where the driver
/// releases a post's data. Every post goes out, in order.
struct Reposting {
    data: Vec<u8>,
    socket: Rc<DatagramSocket>,
    to: SocketAddr,
    left: u8,
}

// SAFETY: the bytes are the Vec's, on the heap: they stay put and unchanged while the
// value is owned, however it moves.
unsafe impl ringsock::buf::IoBuf for Reposting {
    fn stable_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.data.len()
    }
}

impl Drop for Reposting {
    fn drop(&mut self) {
        if self.left == 0 {
            return;
        }
        let next = Reposting {
            data: vec![self.left - 1; 16],
            socket: self.socket.clone(),
            to: self.to,
            left: self.left - 1,
        };
        self.socket
            .post_to_addr(next, self.to)
            .map_err(|(err, _)| err)
            .expect("a post from a released post's drop");
    }
}

#[test]
fn a_post_whose_release_posts_again() {
    util::on_each_backend(|_backend: Backend| async move {
        let sender = Rc::new(util::bound_loopback());
        let sink = util::bound_loopback();
        let to = sink.local_addr().unwrap();
        let first = Reposting {
            data: vec![20; 16],
            socket: sender.clone(),
            to,
            left: 20,
        };
        if let Err((err, _)) = sender.post_to_addr(first, to) {
            panic!("the first post: {err}");
        }
        for i in (0..=20u8).rev() {
            assert_eq!(&util::recv_datagram(&sink).await[..], &[i; 16][..]);
        }
        settle(&sender).await;
        assert_booked(sender.post_stats(), 21, "reposting");
        assert_eq!(sender.post_stats().sent, 21);
        assert_no_corruption("reposting");
    });
}

/// A forward received on runtime A, kept past A's drop, posted on runtime B: B frees
/// it after the send, when the ring it was lent from is long gone with its runtime.
#[test]
fn a_forward_of_a_dropped_runtime_posted_on_another() {
    for backend in util::BACKENDS {
        let (Some(a), Some(b)) = (runtime(backend), runtime(backend)) else {
            continue;
        };
        let sent = util::pseudo_random_bytes(7, 900);
        let (forward, relay) = a.block_on(async {
            let source = util::bound_loopback();
            let relay = util::small_ring_loopback();
            let forward = util::forward_through(&source, &relay, sent.clone()).await;
            (forward, relay)
        });
        drop(a);
        drop(relay);
        b.block_on(async {
            let poster = util::bound_loopback();
            let sink = util::bound_loopback();
            poster
                .post_to_addr(forward, sink.local_addr().unwrap())
                .unwrap();
            settle(&poster).await;
            assert_eq!(poster.post_stats().sent, 1, "{backend}");
            assert_eq!(&util::recv_datagram(&sink).await[..], &sent[..]);
        });
        drop(b);
        assert_no_corruption("a forward outliving its runtime");
    }
}
