//! DatagramGroup on both drivers: many sockets received in one loop, each datagram
//! tagged with its socket, none lost or reordered, the group's bounds and misuse.

mod util;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use ringsock::runtime::timeout;
use ringsock::{DatagramGroup, DatagramSocket, SocketErrorStatus};

fn bound_sockets(n: usize) -> Vec<DatagramSocket> {
    (0..n)
        .map(|_| {
            let socket = DatagramSocket::new();
            socket.control().set_receive_buffer_size(1 << 20).unwrap();
            socket.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            socket
        })
        .collect()
}

fn addresses(group: &DatagramGroup) -> Vec<SocketAddr> {
    group
        .sockets()
        .iter()
        .map(|socket| socket.local_addr().unwrap())
        .collect()
}

/// Socket `index`'s datagram `seq`: both numbers, then a filler that depends on them.
fn message(index: usize, seq: u32) -> Vec<u8> {
    let mut bytes = (index as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend((0..(index + seq as usize) % 300).map(|i| (i ^ index) as u8));
    bytes
}

fn std_sender() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

/// Receives through `group` until `count` datagrams came, at most `max` per call.
async fn receive(
    group: &DatagramGroup,
    count: usize,
    max: usize,
) -> Vec<(usize, ringsock::Datagram)> {
    let mut all = Vec::new();
    while all.len() < count {
        let before = all.len();
        let n = timeout(Duration::from_secs(20), group.recv_batch(&mut all, max))
            .await
            .expect("the group should deliver what was sent")
            .unwrap();
        assert_eq!(n, all.len() - before, "the count names what was appended");
        assert!(
            n >= 1 && n <= max,
            "a call takes 1..=max datagrams, took {n}"
        );
    }
    all
}

#[test]
fn every_socket_s_datagrams_come_tagged_with_its_index_whole_and_in_order() {
    util::on_each_receive_path(|backend| async move {
        // More than 64 sockets: the ready set spans two words.
        let group = DatagramGroup::new(bound_sockets(70));
        let to = addresses(&group);
        let sender = std_sender();
        const PER_SOCKET: u32 = 5;
        for seq in 0..PER_SOCKET {
            for (index, addr) in to.iter().enumerate() {
                sender.send_to(&message(index, seq), addr).unwrap();
            }
        }
        let all = receive(&group, to.len() * PER_SOCKET as usize, 64).await;
        assert_eq!(all.len(), to.len() * PER_SOCKET as usize, "{backend}");
        let mut next = vec![0u32; to.len()];
        for (index, datagram) in &all {
            assert_eq!(
                &datagram[..],
                &message(*index, next[*index])[..],
                "{backend}: socket {index}'s datagram {} wrong or out of order",
                next[*index]
            );
            assert_eq!(datagram.remote_addr(), sender.local_addr().unwrap());
            next[*index] += 1;
        }
        assert!(next.iter().all(|&n| n == PER_SOCKET), "{backend}: {next:?}");
    });
}

#[test]
fn a_call_takes_at_most_max_and_what_is_left_comes_with_the_next() {
    util::on_each_receive_path(|backend| async move {
        let group = DatagramGroup::new(bound_sockets(3));
        let to = addresses(&group);
        let sender = std_sender();
        for seq in 0..10 {
            for (index, addr) in to.iter().enumerate() {
                sender.send_to(&message(index, seq), addr).unwrap();
            }
        }
        let all = receive(&group, 30, 4).await;
        let mut per_socket = [0usize; 3];
        for (index, datagram) in &all {
            assert_eq!(
                &datagram[..],
                &message(*index, per_socket[*index] as u32)[..]
            );
            per_socket[*index] += 1;
        }
        assert_eq!(per_socket, [10, 10, 10], "{backend}");
        // Nothing more was sent: the next call waits (and is cut off here).
        let mut more = Vec::new();
        let waited = timeout(Duration::from_millis(50), group.recv_batch(&mut more, 4)).await;
        assert!(waited.is_err() && more.is_empty(), "{backend}: {more:?}");
    });
}

#[test]
fn a_lone_datagram_wakes_the_group_again_on_the_socket_it_just_drained() {
    util::on_each_receive_path(|backend| async move {
        // One datagram at a time, the group empty in between: each call's socket keeps
        // the waker of the poll that returned its datagram (the group polls it no
        // further), so a datagram on the same socket or another must wake the next call.
        let group = DatagramGroup::new(bound_sockets(8));
        let to = addresses(&group);
        let sender = std_sender();
        // Two in a row to each socket (0, 0, 3, 3, 6, 6, 1, 1...): every other datagram
        // goes to the socket the last call drained.
        let order = (0..240).map(|i: usize| (i / 2) * 3 % 8);
        for (seq, index) in order.enumerate() {
            sender
                .send_to(&message(index, seq as u32), to[index])
                .unwrap();
            let got = receive(&group, 1, 64).await;
            assert_eq!(got.len(), 1, "{backend}: one datagram was sent");
            assert_eq!(
                got[0].0, index,
                "{backend}: datagram {seq} came from its socket"
            );
            assert_eq!(&got[0].1[..], &message(index, seq as u32)[..], "{backend}");
        }
    });
}

#[test]
fn a_coalesced_burst_comes_through_the_group_whole_and_in_order_a_few_at_a_time() {
    util::on_each_backend(|backend| async move {
        // With GRO one receive completion carries several datagrams: more than a call's
        // `max`, so the socket must be polled again for the rest without a new wake. Six
        // stay under the burst that would switch the receiver to draining (whose own
        // wake would hide a socket left unpolled).
        let sockets = bound_sockets(2);
        sockets[0].control().set_gro(true).unwrap();
        let group = DatagramGroup::new(sockets);
        let to = addresses(&group);
        let sender = DatagramSocket::new();
        let output = sender.output_stream_to_addr(to[0]).unwrap();
        let equal_size = |seq: u32| {
            let mut bytes = message(0, seq);
            bytes.resize(1000, 0xa5);
            bytes
        };
        for seq in 0..6 {
            output.write(equal_size(seq)).await.unwrap();
        }
        output.flush().await.unwrap();
        let all = receive(&group, 6, 2).await;
        for (seq, (index, datagram)) in all.iter().enumerate() {
            assert_eq!(*index, 0, "{backend}");
            assert_eq!(
                &datagram[..],
                &equal_size(seq as u32)[..],
                "{backend}: {seq}"
            );
        }
        let stats = group.socket(0).receive_stats();
        assert!(stats.gro_splits >= 1, "{backend}: {stats:?}");
    });
}

#[test]
fn a_socket_in_a_group_receives_only_through_it_and_comes_back_with_nothing_lost() {
    util::on_each_backend(|backend| async move {
        let group = DatagramGroup::new(bound_sockets(2));
        let to = addresses(&group);
        let err = group.socket(0).recv().await.unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        assert!(err.to_string().contains("DatagramGroup"), "{err}");
        let mut batch = Vec::new();
        let err = group.socket(1).recv_batch(&mut batch, 8).await.unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");

        let sender = std_sender();
        for seq in 0..3 {
            sender.send_to(&message(0, seq), to[0]).unwrap();
        }
        let first = receive(&group, 1, 1).await;
        assert_eq!(first.len(), 1);
        assert_eq!(&first[0].1[..], &message(0, 0)[..], "{backend}");
        drop(first);

        let sockets = group.into_sockets();
        for seq in 1..3 {
            let datagram = timeout(Duration::from_secs(20), sockets[0].recv())
                .await
                .expect("the rest should still be there")
                .unwrap();
            assert_eq!(&datagram[..], &message(0, seq)[..], "{backend}");
        }
    });
}

#[test]
fn max_zero_an_empty_group_and_an_unbound_socket_are_errors_not_waits() {
    util::on_each_backend(|backend| async move {
        let group = DatagramGroup::new(bound_sockets(1));
        let mut out = Vec::new();
        let err = group.recv_batch(&mut out, 0).await.unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");

        let empty = DatagramGroup::new(Vec::new());
        assert!(empty.is_empty());
        let err = empty.recv_batch(&mut out, 8).await.unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");

        let mut sockets = bound_sockets(1);
        sockets.push(DatagramSocket::new());
        let with_unbound = DatagramGroup::new(sockets);
        let result = timeout(
            Duration::from_secs(20),
            with_unbound.recv_batch(&mut out, 8),
        )
        .await
        .expect("an unbound socket fails the call, it does not wait");
        let err = result.unwrap_err();
        assert_eq!(
            err.status(),
            SocketErrorStatus::InvalidArgument,
            "{backend}: {err}"
        );
        assert!(out.is_empty());
    });
}

#[test]
fn each_datagram_forwarded_without_copy_leaves_from_the_socket_it_came_in_on() {
    util::on_each_receive_path(|backend| async move {
        let group = DatagramGroup::new(bound_sockets(8));
        let to = addresses(&group);
        let client = DatagramSocket::new();
        client.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let client_addr = client.local_addr().unwrap();
        const ROUNDS: u32 = 50;
        for seq in 0..ROUNDS {
            for (index, addr) in to.iter().enumerate() {
                client
                    .send_to_addr(message(index, seq), *addr)
                    .await
                    .0
                    .unwrap();
            }
            let mut echoed = 0;
            while echoed < to.len() {
                let mut received = Vec::new();
                group.recv_batch(&mut received, 64).await.unwrap();
                for (index, datagram) in received {
                    assert_eq!(datagram.remote_addr(), client_addr);
                    let (sent, _) = group
                        .socket(index)
                        .send_to_addr(datagram.into_forward(), client_addr)
                        .await;
                    sent.unwrap();
                    echoed += 1;
                }
            }
            let mut back = vec![false; to.len()];
            for _ in 0..to.len() {
                let reply = client.recv().await.unwrap();
                let index = to
                    .iter()
                    .position(|addr| *addr == reply.remote_addr())
                    .expect("a reply from a socket of the group");
                assert_eq!(&reply[..], &message(index, seq)[..], "{backend}");
                assert!(!back[index], "{backend}: socket {index} answered twice");
                back[index] = true;
            }
        }
    });
}

#[test]
fn a_second_call_given_up_does_not_strand_the_first() {
    util::on_each_backend(|backend| async move {
        let group = std::rc::Rc::new(DatagramGroup::new(bound_sockets(2)));
        let to = addresses(&group);
        let first = {
            let group = group.clone();
            ringsock::spawn(async move {
                let mut got = Vec::new();
                group.recv_batch(&mut got, 8).await.unwrap();
                got.into_iter()
                    .map(|(i, d)| (i, d.to_vec()))
                    .collect::<Vec<_>>()
            })
        };
        // The first call is waiting on the sockets now.
        util::yield_now().await;
        // A second call from another task, given up before anything came: it must not
        // have taken the wake-up the first one waits for.
        {
            let mut other = Vec::new();
            let mut second = std::pin::pin!(group.recv_batch(&mut other, 8));
            assert!(util::poll_once(second.as_mut()).await.is_pending());
        }
        std_sender().send_to(&message(1, 0), to[1]).unwrap();
        let got = timeout(Duration::from_secs(20), first)
            .await
            .expect("the first call should be woken by the datagram");
        assert_eq!(got, vec![(1, message(1, 0))], "{backend}");
    });
}

#[test]
fn a_group_polled_under_another_runtime_fails_with_wrong_runtime_and_works_at_home() {
    for backend in util::BACKENDS {
        let Some(home) =
            util::build_or_skip(ringsock::runtime::Builder::new().backend(backend), backend)
        else {
            continue;
        };
        let Some(other) =
            util::build_or_skip(ringsock::runtime::Builder::new().backend(backend), backend)
        else {
            continue;
        };
        let group = DatagramGroup::new(bound_sockets(3));
        let to = addresses(&group);
        // Armed at home: every receive ring belongs to `home` now.
        home.block_on(async {
            let mut out = Vec::new();
            let mut call = std::pin::pin!(group.recv_batch(&mut out, 8));
            assert!(util::poll_once(call.as_mut()).await.is_pending());
        });
        let err = other.block_on(async {
            let mut out = Vec::new();
            let result = timeout(Duration::from_secs(20), group.recv_batch(&mut out, 8))
                .await
                .expect("another runtime's call fails, it does not wait");
            assert!(out.is_empty());
            result.unwrap_err()
        });
        assert_eq!(
            err.status(),
            SocketErrorStatus::WrongRuntime,
            "{backend}: {err}"
        );
        std_sender().send_to(&message(2, 0), to[2]).unwrap();
        let got = home.block_on(async {
            let mut out = Vec::new();
            timeout(Duration::from_secs(20), group.recv_batch(&mut out, 8))
                .await
                .expect("the group still receives at home")
                .unwrap();
            out.into_iter()
                .map(|(i, d)| (i, d.to_vec()))
                .collect::<Vec<_>>()
        });
        assert_eq!(got, vec![(2, message(2, 0))], "{backend}");
    }
}

#[test]
fn a_socket_that_keeps_failing_does_not_starve_the_sockets_after_it() {
    util::on_each_backend(|backend| async move {
        // Socket 0 is never bound: every poll of it fails.
        let mut sockets = vec![DatagramSocket::new()];
        sockets.extend(bound_sockets(1));
        let group = DatagramGroup::new(sockets);
        let to = group.socket(1).local_addr().unwrap();
        std_sender().send_to(&message(1, 0), to).unwrap();
        let got = timeout(util::MUST_HAPPEN, async {
            let mut out = Vec::new();
            let mut errors = 0;
            while out.is_empty() {
                match group.recv_batch(&mut out, 8).await {
                    Ok(_) => {}
                    Err(err) => {
                        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
                        errors += 1;
                    }
                }
                // A loop that goes on after errors, giving the runtime its turn.
                util::yield_now().await;
            }
            assert!(
                errors > 0,
                "{backend}: the unbound socket's error was reported"
            );
            out.into_iter()
                .map(|(i, d)| (i, d.to_vec()))
                .collect::<Vec<_>>()
        })
        .await
        .expect("the bound socket's datagram should come despite the failing one");
        assert_eq!(got, vec![(1, message(1, 0))], "{backend}");
    });
}

#[test]
fn a_busy_socket_does_not_starve_the_others_when_each_call_is_full() {
    util::on_each_receive_path(|backend| async move {
        let group = DatagramGroup::new(bound_sockets(3));
        let to = addresses(&group);
        let sender = std_sender();
        for seq in 0..32 {
            sender.send_to(&message(0, seq), to[0]).unwrap();
        }
        sender.send_to(&message(1, 0), to[1]).unwrap();
        sender.send_to(&message(2, 0), to[2]).unwrap();
        // One datagram per call: socket 0 could fill every call for 32 calls.
        let mut first = Vec::new();
        for _ in 0..8 {
            first.extend(receive(&group, 1, 1).await.into_iter().map(|(i, _)| i));
            util::yield_now().await;
        }
        assert!(
            first.contains(&1) && first.contains(&2),
            "{backend}: the first 8 datagrams came from sockets {first:?}"
        );
    });
}
