//! DatagramSocket on both drivers: echo, sizes, truncation, ring exhaustion, batched
//! sends (GSO and not), GRO, IPv6, port sharing in one process.

mod util;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use ringsock::runtime::timeout;
use ringsock::{Backend, DatagramSocket, HostName, ReceiveRing, SocketErrorStatus};

fn localhost4() -> HostName {
    HostName::new("127.0.0.1").unwrap()
}

fn bound(host: &str) -> DatagramSocket {
    let socket = DatagramSocket::new();
    socket.control().set_receive_buffer_size(4 << 20).unwrap();
    socket
        .bind_host(&HostName::new(host).unwrap(), "0")
        .unwrap();
    socket
}

/// Datagram `seq` of `len` bytes: a pseudo-random pattern seeded by the sequence number,
/// its first 4 bytes (when there is room) the sequence number itself.
fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut bytes = util::pseudo_random_bytes(seq as u64 + 1, len);
    let head = seq.to_le_bytes();
    let n = len.min(4);
    bytes[..n].copy_from_slice(&head[..n]);
    bytes
}

/// Echoes every datagram back to its sender until dropped.
fn spawn_echo(server: DatagramSocket) -> ringsock::JoinHandle<()> {
    ringsock::spawn(async move {
        let mut batch = Vec::new();
        loop {
            batch.clear();
            server.recv_batch(&mut batch, 64).await.unwrap();
            for datagram in batch.drain(..) {
                assert!(!datagram.is_truncated());
                let to = datagram.remote_addr();
                let copy = datagram.to_vec();
                drop(datagram);
                server.send_to_addr(copy, to).await.0.unwrap();
            }
        }
    })
}

#[test]
fn echo_of_ten_thousand_random_sizes() {
    util::on_each_backend(|_| async {
        let server = bound("127.0.0.1");
        let server_addr = server.local_addr().unwrap();
        let echo = spawn_echo(server);

        let client = bound("127.0.0.1");
        let output = client.output_stream_to_addr(server_addr).unwrap();
        let sizes = util::pseudo_random_bytes(99, 20_000);
        let mut seq = 0u32;
        const TOTAL: u32 = 10_000;
        const WINDOW: u32 = 32;
        while seq < TOTAL {
            let mut expected = Vec::new();
            for _ in 0..WINDOW.min(TOTAL - seq) {
                let len = 1
                    + (u16::from_le_bytes([sizes[2 * seq as usize], sizes[2 * seq as usize + 1]])
                        as usize
                        % 1472);
                let bytes = payload(seq, len);
                expected.push(bytes.clone());
                output.write(bytes).await.unwrap();
                seq += 1;
            }
            output.flush().await.unwrap();
            let mut got = Vec::new();
            let mut batch = Vec::new();
            while got.len() < expected.len() {
                batch.clear();
                client.recv_batch(&mut batch, 64).await.unwrap();
                for datagram in batch.drain(..) {
                    assert_eq!(datagram.remote_addr(), server_addr);
                    assert!(!datagram.is_truncated());
                    got.push(datagram.to_vec());
                }
            }
            // Compared as multisets: every byte of every datagram, nothing twice.
            expected.sort();
            got.sort();
            assert_eq!(got.len(), expected.len());
            assert!(got == expected, "echoed datagrams differ around seq {seq}");
        }
        let stats = client.receive_stats();
        assert_eq!(stats.datagrams, TOTAL as u64);
        assert_eq!(stats.truncated, 0);
        assert_eq!(stats.buffers_lent, 0);
        echo.abort();
    });
}

#[test]
fn largest_ipv4_datagram_on_loopback() {
    util::on_each_backend(|_| async {
        let receiver = bound("127.0.0.1");
        receiver
            .control()
            .set_receive_ring(ReceiveRing::large())
            .unwrap();
        let sender = DatagramSocket::new();
        let bytes = payload(7, 65_507);
        let (sent, _) = sender
            .send_to_addr(bytes.clone(), receiver.local_addr().unwrap())
            .await;
        assert_eq!(sent.unwrap(), 65_507);
        let datagram = receiver.recv().await.unwrap();
        assert_eq!(datagram.len(), 65_507);
        assert!(datagram.data() == &bytes[..]);
        assert_eq!(
            datagram.remote_addr().port(),
            sender.local_addr().unwrap().port()
        );
    });
}

#[test]
fn oversized_datagram_is_message_too_long() {
    util::on_each_backend(|_| async {
        let receiver = bound("127.0.0.1");
        let to = receiver.local_addr().unwrap();
        let sender = DatagramSocket::new();
        let (result, _) = sender.send_to_addr(vec![0u8; 65_508], to).await;
        assert_eq!(
            result.unwrap_err().status(),
            SocketErrorStatus::MessageTooLong
        );

        let output = sender.output_stream_to_addr(to).unwrap();
        let err = output
            .write(vec![0u8; 65_508])
            .await
            .expect_err("refused at write");
        assert_eq!(err.status(), SocketErrorStatus::MessageTooLong);
        assert_eq!(output.pending_writes(), 0, "nothing was queued");
        // The stream is still usable.
        output.write(vec![1u8; 10]).await.unwrap();
        output.flush().await.unwrap();
        assert_eq!(receiver.recv().await.unwrap().len(), 10);
    });
}

/// A host name whose only addresses are of the other family than the socket's: the
/// status connect would give (AddressFamilyNotSupported), not "no addresses".
#[test]
fn a_host_of_the_other_family_is_address_family_not_supported() {
    util::on_each_backend(|_| async {
        let socket = bound("127.0.0.1");
        let v6_only = HostName::new("::1").unwrap();
        let (result, _) = socket.send_to(b"x".to_vec(), &v6_only, "9").await;
        let err = result.unwrap_err();
        assert_eq!(
            err.status(),
            SocketErrorStatus::AddressFamilyNotSupported,
            "{err}"
        );
        let Err(err) = socket.output_stream_to(&v6_only, "9").await else {
            panic!("an IPv4 socket made a stream to an IPv6-only host");
        };
        assert_eq!(
            err.status(),
            SocketErrorStatus::AddressFamilyNotSupported,
            "{err}"
        );
    });
}

#[test]
fn a_ring_made_smaller_truncates_counts_and_reports_alike() {
    util::on_each_receive_path(|_| async {
        let receiver = DatagramSocket::new();
        receiver
            .control()
            .set_receive_ring(ReceiveRing {
                buffers: 16,
                buffer_size: 100,
            })
            .unwrap();
        receiver.bind_host(&localhost4(), "0").unwrap();
        let to = receiver.local_addr().unwrap();
        let sender = DatagramSocket::new();
        let big = payload(1, 300);
        for _ in 0..3 {
            sender.send_to_addr(big.clone(), to).await.0.unwrap();
        }
        sender.send_to_addr(payload(2, 50), to).await.0.unwrap();

        // recv, recv_batch and messages() all hand the cut datagram out flagged.
        let cut = receiver.recv().await.unwrap();
        let mut batch = Vec::new();
        while batch.is_empty() {
            receiver.recv_batch(&mut batch, 1).await.unwrap();
        }
        let mut messages = receiver.messages();
        let streamed = messages.next().await.unwrap();
        for datagram in [&cut, &batch[0], &streamed] {
            assert!(datagram.is_truncated());
            assert_eq!(datagram.original_len(), 300);
            // Exactly the configured size is kept.
            assert_eq!(datagram.len(), 100);
            assert!(datagram.data() == &big[..100]);
        }
        let whole = messages.next().await.unwrap();
        assert!(!whole.is_truncated());
        assert_eq!(whole.original_len(), 50);
        assert!(whole.data() == &payload(2, 50)[..]);
        drop(messages);
        assert_eq!(receiver.receive_stats().truncated, 3);
        sender.send_to_addr(payload(3, 101), to).await.0.unwrap();
        let one_over = receiver.recv().await.unwrap();
        assert!(one_over.is_truncated());
        assert_eq!(one_over.original_len(), 101);
        sender.send_to_addr(payload(4, 100), to).await.0.unwrap();
        let fits = receiver.recv().await.unwrap();
        assert!(!fits.is_truncated());
        assert!(fits.data() == &payload(4, 100)[..]);
        drop((cut, batch, streamed, whole, one_over, fits));

        // The same limit while a burst is drained (recvmmsg on both drivers): 100 bytes
        // fit, 101 do not.
        const BURST: u32 = 40;
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for seq in 0..BURST {
            plain
                .send_to(&payload(seq, 100 + seq as usize % 2), to)
                .unwrap();
        }
        let mut seq = 0;
        let mut batch = Vec::new();
        while seq < BURST {
            batch.clear();
            receiver.recv_batch(&mut batch, 16).await.unwrap();
            for datagram in batch.drain(..) {
                let sent = payload(seq, 100 + seq as usize % 2);
                assert_eq!(datagram.is_truncated(), sent.len() > 100, "datagram {seq}");
                assert_eq!(datagram.original_len(), sent.len());
                assert!(datagram.data() == &sent[..100]);
                seq += 1;
            }
        }
        let stats = receiver.receive_stats();
        assert_eq!(stats.truncated, 4 + BURST as u64 / 2, "{stats:?}");
        assert!(stats.bursts_drained >= 1, "{stats:?}");
    });
}

/// Receives one datagram at a time, each sent just before, holding them all until the
/// ring is dry (`buffers_free` 0): how many that takes depends on how the engine packs
/// them, at least `at_least`.
async fn fill_the_ring(
    receiver: &DatagramSocket,
    sender: &DatagramSocket,
    len: usize,
    at_least: usize,
) -> Vec<ringsock::Datagram> {
    let to = receiver.local_addr().unwrap();
    let mut held = Vec::new();
    // Bounded: a ring of a few KiB slots holds far fewer than 1,000 of these.
    for seq in 0..1000u32 {
        // (The first receive sets the ring up.)
        if seq > 0 && receiver.receive_stats().buffers_free == 0 {
            break;
        }
        sender.send_to_addr(payload(seq, len), to).await.0.unwrap();
        // One at a time: the socket's tiny queue holds only a few.
        while held.len() <= seq as usize {
            util::must("a datagram into a ring with room", async {
                receiver.recv_batch(&mut held, 64).await.unwrap()
            })
            .await;
        }
    }
    let stats = receiver.receive_stats();
    assert_eq!(stats.buffers_free, 0, "{stats:?}");
    assert_eq!(stats.buffers_lent, stats.buffers, "{stats:?}");
    assert!(held.len() >= at_least, "{} held", held.len());
    held
}

#[test]
fn a_stalled_receiver_flooded_past_its_ring_resumes_and_counts_drops() {
    util::on_each_receive_path(|_| async {
        const RING: usize = 8;
        const MORE: u32 = 200;
        let receiver = DatagramSocket::new();
        receiver
            .control()
            .set_receive_ring(ReceiveRing {
                buffers: RING as u16,
                buffer_size: 2048,
            })
            .unwrap();
        // The smallest receive queue the kernel allows: a few datagrams.
        receiver.control().set_receive_buffer_size(1).unwrap();
        receiver.bind_host(&localhost4(), "0").unwrap();
        let to = receiver.local_addr().unwrap();
        let sender = DatagramSocket::new();

        // The program stalls holding every buffer: the ring is dry.
        let mut held = fill_the_ring(&receiver, &sender, 1000, RING).await;
        let first_flood = held.len() as u32;
        for seq in first_flood..first_flood + MORE {
            sender.send_to_addr(payload(seq, 1000), to).await.0.unwrap();
        }
        // With every buffer held nothing can be delivered (on io_uring the kernel ends
        // the multishot receive with ENOBUFS).
        assert!(timeout(Duration::from_millis(100), receiver.recv())
            .await
            .is_err());
        let stats = receiver.receive_stats();
        assert!(stats.ring_empty >= 1, "{stats:?}");

        // Give the buffers back: the receiver resumes by itself.
        let mut seen: HashSet<u32> = HashSet::new();
        for datagram in held.drain(..) {
            let seq = u32::from_le_bytes(datagram[..4].try_into().unwrap());
            assert!(datagram.data() == &payload(seq, 1000)[..]);
            assert!(seen.insert(seq));
        }
        let mut received = 0u64;
        loop {
            let dropped = receiver.receive_stats().dropped;
            if received + dropped >= MORE as u64 {
                assert_eq!(received + dropped, MORE as u64);
                assert!(dropped > 0, "the tiny queue must have overflowed");
                break;
            }
            if let Ok(datagram) = timeout(Duration::from_millis(200), receiver.recv()).await {
                let datagram = datagram.unwrap();
                let seq = u32::from_le_bytes(datagram[..4].try_into().unwrap());
                assert!(
                    datagram.data() == &payload(seq, 1000)[..],
                    "datagram {seq} corrupted"
                );
                assert!(seen.insert(seq), "datagram {seq} delivered twice");
                received += 1;
            }
        }
        assert!(received > 0);
        // Reception goes on as before.
        sender.send_to_addr(payload(7, 1000), to).await.0.unwrap();
        let next = util::must("a datagram after the stall", receiver.recv())
            .await
            .unwrap();
        assert!(next.data() == &payload(7, 1000)[..]);
        drop(next);
        assert_eq!(receiver.receive_stats().buffers_lent, 0);
    });
}

/// Datagram `seq` of the switching tests: 60..=259 bytes.
fn switching_payload(seq: u32) -> Vec<u8> {
    payload(seq, 60 + (seq as usize * 37) % 200)
}

fn check_in_order(datagram: &[u8], expected_seq: &mut u32) {
    assert!(
        datagram == &switching_payload(*expected_seq)[..],
        "datagram {} missing, reordered or corrupted",
        *expected_seq
    );
    *expected_seq += 1;
}

#[test]
fn bursts_and_single_datagrams_switch_the_receive_path_without_loss() {
    util::on_each_backend(|_backend| async move {
        const BURST: u32 = 1500;
        let receiver = bound("127.0.0.1");
        let to = receiver.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (mut sent, mut expected) = (0u32, 0u32);
        let mut batch = Vec::new();
        for round in 0..3u64 {
            // A burst, queued before the receiver looks: the multishot finds it all
            // ready at once, and the io_uring receiver moves to recvmmsg meanwhile.
            for _ in 0..BURST {
                sender.send_to(&switching_payload(sent), to).unwrap();
                sent += 1;
            }
            while expected < sent {
                if round == 1 {
                    // One at a time: recvmmsg takes more than asked and keeps the rest.
                    check_in_order(&receiver.recv().await.unwrap(), &mut expected);
                } else {
                    batch.clear();
                    receiver.recv_batch(&mut batch, 100).await.unwrap();
                    for datagram in &batch {
                        check_in_order(datagram, &mut expected);
                    }
                }
            }
            // Single datagrams, each received before the next is sent: the receiver
            // goes back to the multishot.
            for _ in 0..20 {
                sender.send_to(&switching_payload(sent), to).unwrap();
                sent += 1;
                check_in_order(&receiver.recv().await.unwrap(), &mut expected);
            }
            // Each burst switched once: the single datagrams had switched back.
            let stats = receiver.receive_stats();
            assert_eq!(stats.bursts_drained, round + 1, "{stats:?}");
            assert_eq!(stats.receive_restarts, round + 1, "{stats:?}");
        }
        drop(batch);
        let stats = receiver.receive_stats();
        assert_eq!(stats.datagrams, sent as u64, "{stats:?}");
        assert_eq!(stats.dropped, 0, "{stats:?}");
        assert_eq!(stats.buffers_lent, 0, "{stats:?}");
    });
}

/// Whether an epoll instance of this process watches descriptor `fd`
/// (/proc/self/fdinfo lists an epoll's watched descriptors as `tfd:` lines).
fn watched_by_epoll(fd: i32) -> bool {
    let mut watched = false;
    for entry in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in info.lines() {
            let Some(rest) = line.strip_prefix("tfd:") else {
                continue;
            };
            if rest.split_whitespace().next() == Some(fd.to_string().as_str()) {
                watched = true;
            }
        }
    }
    watched
}

/// The descriptor of a bound IPv4 UDP socket of this process, found through its port
/// (/proc/net/udp gives the socket's inode, /proc/self/fd the descriptor).
fn socket_fd(socket: &DatagramSocket) -> i32 {
    let port = format!(":{:04X}", socket.local_addr().unwrap().port());
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    let inode = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(1).is_some_and(|local| local.ends_with(&port)))
        .and_then(|fields| fields.get(9).map(|inode| inode.to_string()))
        .expect("the socket is in /proc/net/udp");
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .find(|entry| {
            std::fs::read_link(entry.path()).is_ok_and(|link| link.to_string_lossy() == target)
        })
        .and_then(|entry| entry.file_name().to_str()?.parse().ok())
        .expect("the socket's descriptor")
}

#[test]
fn a_burst_smaller_than_the_ring_switches_while_a_datagram_is_held() {
    util::on_each_backend(|backend| async move {
        // Fewer datagrams than buffers: the multishot does not run dry, so the io_uring
        // receiver has to cancel it (and wait for its end) before it drains.
        const BURST: u32 = 100;
        let receiver = bound("127.0.0.1");
        let to = receiver.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for seq in 0..BURST {
            sender.send_to(&switching_payload(seq), to).unwrap();
        }
        let held = receiver.recv().await.unwrap();
        let mut expected = 1;
        let mut batch = Vec::new();
        while expected < BURST {
            batch.clear();
            receiver.recv_batch(&mut batch, 10).await.unwrap();
            for datagram in &batch {
                check_in_order(datagram, &mut expected);
            }
        }
        assert_eq!(receiver.receive_stats().bursts_drained, 1);
        if backend == Backend::Epoll {
            // Bursty: while it drains, the socket is out of the epoll set...
            let fd = socket_fd(&receiver);
            for seq in BURST..2 * BURST {
                sender.send_to(&switching_payload(seq), to).unwrap();
            }
            batch.clear();
            receiver.recv_batch(&mut batch, 10).await.unwrap();
            assert!(!watched_by_epoll(fd), "a draining receiver left a wait");
            for datagram in &batch {
                check_in_order(datagram, &mut expected);
            }
            while expected < 2 * BURST {
                check_in_order(&receiver.recv().await.unwrap(), &mut expected);
            }
            // ...and back in it while a receive waits.
            assert!(timeout(Duration::from_millis(5), receiver.recv())
                .await
                .is_err());
            assert!(watched_by_epoll(fd), "a waiting receiver is not in the set");
        }
        drop(batch);
        // Back to the sparse way (io_uring: the ring registered again and the multishot
        // armed), still holding the first datagram.
        for _ in 0..12 {
            sender.send_to(&switching_payload(expected), to).unwrap();
            check_in_order(&receiver.recv().await.unwrap(), &mut expected);
        }
        let stats = receiver.receive_stats();
        if backend == Backend::Uring {
            assert_eq!(stats.receive_restarts, 1, "{stats:?}");
        }
        // The held buffer was never handed to the kernel or to recvmmsg meanwhile.
        check_in_order(&held, &mut 0);
        assert_eq!(stats.buffers_lent, 1, "{stats:?}");
        drop(held);
        assert_eq!(receiver.receive_stats().buffers_lent, 0);
    });
}

#[test]
fn a_burst_larger_than_the_ring_waits_for_buffers_and_loses_nothing() {
    util::on_each_receive_path(|_| async move {
        const RING: usize = 16;
        const BURST: u32 = 600;
        let receiver = DatagramSocket::new();
        receiver
            .control()
            .set_receive_ring(ReceiveRing {
                buffers: RING as u16,
                buffer_size: 512,
            })
            .unwrap();
        receiver.control().set_receive_buffer_size(4 << 20).unwrap();
        receiver.bind_host(&localhost4(), "0").unwrap();
        let to = receiver.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for seq in 0..BURST {
            sender.send_to(&switching_payload(seq), to).unwrap();
        }
        let mut expected = 0u32;
        let mut held = Vec::new();
        let mut starved_once = false;
        while expected < BURST {
            // Hold datagrams until no buffer is free (or the burst is all in): nothing
            // more can come until they are back.
            loop {
                receiver.recv_batch(&mut held, 64).await.unwrap();
                let done = expected + held.len() as u32 == BURST;
                if done || receiver.receive_stats().buffers_free == 0 {
                    break;
                }
            }
            if !starved_once && receiver.receive_stats().buffers_free == 0 {
                assert!(held.len() >= RING);
                assert!(timeout(Duration::from_millis(50), receiver.recv())
                    .await
                    .is_err());
                assert!(receiver.receive_stats().ring_empty >= 1);
                starved_once = true;
            }
            for datagram in held.drain(..) {
                check_in_order(&datagram, &mut expected);
            }
        }
        assert!(starved_once);
        let stats = receiver.receive_stats();
        assert_eq!(stats.datagrams, BURST as u64, "{stats:?}");
        assert_eq!(stats.dropped, 0, "{stats:?}");
        assert_eq!(stats.buffers_lent, 0, "{stats:?}");
        assert!(stats.bursts_drained >= 1, "{stats:?}");
    });
}

#[test]
fn batched_sends_keep_each_datagram_whole() {
    util::on_each_backend(|_| async {
        // `joined`: every datagram a slice of one buffer, end to end in memory, so the
        // engine may describe a GSO run with one iovec but must not join across sends.
        for (gso, joined) in [(true, false), (false, false), (true, true), (false, true)] {
            let receiver = bound("127.0.0.1");
            let sender = DatagramSocket::new();
            sender.control().set_segmentation_offload(gso);
            sender
                .connect_addr(receiver.local_addr().unwrap())
                .await
                .unwrap();
            let output = sender.output_stream().unwrap();
            // 64 equal sizes (one GSO run), then a mixed tail, then an empty datagram.
            let mut sizes = vec![172usize; 64];
            sizes.extend([1400, 1400, 20, 1, 900, 900, 900, 0]);
            let datagrams: Vec<Bytes> = if joined {
                let whole: Vec<u8> = (sizes.iter().enumerate())
                    .flat_map(|(seq, &len)| payload(seq as u32, len))
                    .collect();
                let whole = Bytes::from(whole);
                let mut at = 0;
                (sizes.iter())
                    .map(|&len| {
                        at += len;
                        whole.slice(at - len..at)
                    })
                    .collect()
            } else {
                (sizes.iter().enumerate())
                    .map(|(seq, &len)| Bytes::from(payload(seq as u32, len)))
                    .collect()
            };
            let mut handles = Vec::new();
            for datagram in datagrams {
                handles.push(output.write(datagram).await.unwrap());
            }
            output.flush().await.unwrap();
            for handle in handles {
                handle.await.unwrap();
            }
            let stats = output.stats();
            assert_eq!(stats.writes, sizes.len() as u64);
            assert_eq!(stats.batches, 1);
            if gso {
                assert!(
                    stats.kernel_operations < sizes.len() as u64 / 4,
                    "{stats:?}"
                );
            }
            // Copied out: more datagrams than the default ring holds at once on epoll.
            let mut got = Vec::new();
            let mut batch = Vec::new();
            while got.len() < sizes.len() {
                receiver.recv_batch(&mut batch, 128).await.unwrap();
                got.extend(batch.drain(..).map(|datagram| datagram.to_vec()));
            }
            for (seq, (datagram, &len)) in got.iter().zip(&sizes).enumerate() {
                assert_eq!(
                    datagram.len(),
                    len,
                    "datagram {seq} (gso {gso}, joined {joined})"
                );
                assert!(datagram[..] == payload(seq as u32, len)[..]);
            }
        }
    });
}

#[test]
fn gro_takes_super_datagrams_apart() {
    util::on_each_backend(|_| async {
        let receiver = DatagramSocket::new();
        receiver.control().set_gro(true).unwrap();
        receiver.bind_host(&localhost4(), "0").unwrap();
        let sender = DatagramSocket::new();
        let output = sender
            .output_stream_to_addr(receiver.local_addr().unwrap())
            .unwrap();
        for seq in 0..64 {
            output.write(payload(seq, 1000)).await.unwrap();
        }
        output.flush().await.unwrap();
        let mut got = Vec::new();
        while got.len() < 64 {
            receiver.recv_batch(&mut got, 64).await.unwrap();
        }
        assert_eq!(got.len(), 64);
        for (seq, datagram) in got.iter().enumerate() {
            assert!(
                datagram.data() == &payload(seq as u32, 1000)[..],
                "segment {seq}"
            );
        }
        let stats = receiver.receive_stats();
        assert!(stats.gro_splits >= 1, "{stats:?}");
        assert_eq!(stats.datagrams, 64);
        drop(got);
        assert_eq!(receiver.receive_stats().buffers_lent, 0);

        // One at a time: a super-datagram's other segments wait for the next calls.
        for seq in 64..128 {
            output.write(payload(seq, 1000)).await.unwrap();
        }
        output.flush().await.unwrap();
        for seq in 64..128 {
            let datagram = receiver.recv().await.unwrap();
            assert!(datagram.data() == &payload(seq, 1000)[..], "segment {seq}");
        }
        assert_eq!(receiver.receive_stats().datagrams, 128);
    });
}

#[test]
fn ipv6_and_dual_stack() {
    util::on_each_backend(|_| async {
        let v6 = bound("::1");
        assert!(v6.local_addr().unwrap().is_ipv6());
        let client = DatagramSocket::new();
        let port = v6.local_addr().unwrap().port().to_string();
        client
            .send_to(b"over v6".to_vec(), &HostName::new("::1").unwrap(), &port)
            .await
            .0
            .unwrap();
        let datagram = v6.recv().await.unwrap();
        assert_eq!(datagram.text().unwrap(), "over v6");
        assert_eq!(
            datagram.remote_addr().port(),
            client.local_addr().unwrap().port()
        );
        assert_eq!(datagram.remote_host(), HostName::new("::1").unwrap());

        // A dual-stack socket (bind "0") receives IPv4 and shows the sender as IPv4.
        let any = DatagramSocket::new();
        any.bind("0").unwrap();
        let port = any.local_addr().unwrap().port();
        let v4 = DatagramSocket::new();
        v4.send_to(b"over v4".to_vec(), &localhost4(), &port.to_string())
            .await
            .0
            .unwrap();
        let datagram = any.recv().await.unwrap();
        assert_eq!(datagram.remote_host(), localhost4());
        assert_eq!(
            datagram.remote_addr().port(),
            v4.local_addr().unwrap().port()
        );
        // ... and answers it with the IPv4 address as given.
        any.send_to_addr(b"reply".to_vec(), datagram.remote_addr())
            .await
            .0
            .unwrap();
        assert_eq!(v4.recv().await.unwrap().text().unwrap(), "reply");
    });
}

#[test]
fn connect_sets_the_peer_and_local_address() {
    util::on_each_backend(|_| async {
        let server = bound("127.0.0.1");
        let port = server.local_addr().unwrap().port().to_string();
        let client = DatagramSocket::new();
        client.connect(&localhost4(), &port).await.unwrap();
        assert_eq!(client.peer_addr().unwrap(), server.local_addr().unwrap());
        assert_ne!(client.local_addr().unwrap().port(), 0);
        client.send(b"hello".to_vec()).await.0.unwrap();
        let request = server.recv().await.unwrap();
        assert_eq!(request.remote_addr(), client.local_addr().unwrap());
        // GetOutputStreamAsync(remote host, port) on the server side.
        let reply = server
            .output_stream_to(
                &request.remote_host(),
                &request.remote_addr().port().to_string(),
            )
            .await
            .unwrap();
        reply.write(b"world".to_vec()).await.unwrap();
        reply.flush().await.unwrap();
        let mut messages = client.messages();
        assert_eq!(messages.next().await.unwrap().text().unwrap(), "world");
        // Unconnected sockets have no output_stream().
        assert_eq!(
            DatagramSocket::new()
                .output_stream()
                .err()
                .unwrap()
                .status(),
            SocketErrorStatus::InvalidArgument
        );
    });
}

#[test]
fn control_options_apply() {
    util::on_each_backend(|_| async {
        let socket = DatagramSocket::new();
        let control = socket.control();
        control.set_hop_limit(7).unwrap();
        control.set_broadcast(true).unwrap();
        control.set_dont_fragment(true).unwrap();
        control.set_send_buffer_size(1 << 16).unwrap();
        assert_eq!(
            control.set_hop_limit(0).unwrap_err().status(),
            SocketErrorStatus::InvalidArgument
        );
        socket.bind_host(&localhost4(), "0").unwrap();
        let control = socket.control();
        assert_eq!(control.hop_limit().unwrap(), 7);
        assert!(control.send_buffer_size().unwrap() >= 1 << 16);
        assert!(control.dont_fragment());
        assert_eq!(
            control.set_multicast_only(true).unwrap_err().status(),
            SocketErrorStatus::InvalidArgument
        );
        // Don't-fragment: a datagram over the loopback MTU (65536) cannot go out.
        let v6 = DatagramSocket::new();
        v6.control().set_dont_fragment(true).unwrap();
        v6.bind_host(&HostName::new("::1").unwrap(), "0").unwrap();
        let to = v6.local_addr().unwrap();
        let (result, _) = v6.send_to_addr(vec![0u8; 65_527], to).await;
        assert_eq!(
            result.unwrap_err().status(),
            SocketErrorStatus::MessageTooLong
        );
    });
}

#[test]
fn port_sharing_in_one_process() {
    util::on_each_backend(|_| async {
        let first = DatagramSocket::new();
        first.control().set_multicast_only(true).unwrap();
        first.bind_host(&localhost4(), "0").unwrap();
        let addr: SocketAddr = first.local_addr().unwrap();
        let second = DatagramSocket::new();
        second.control().set_multicast_only(true).unwrap();
        second.bind_addr(addr).unwrap();
        // A socket that does not share is refused.
        let third = DatagramSocket::new();
        assert_eq!(
            third.bind_addr(addr).unwrap_err().status(),
            SocketErrorStatus::AddressAlreadyInUse
        );
        // Unicast datagrams are spread over the sharers: each arrives exactly once.
        const SENDERS: u32 = 32;
        for seq in 0..SENDERS {
            let sender = DatagramSocket::new();
            sender.send_to_addr(payload(seq, 64), addr).await.0.unwrap();
        }
        let mut seen = HashSet::new();
        while seen.len() < SENDERS as usize {
            let mut batch = Vec::new();
            for socket in [&first, &second] {
                if let Ok(result) =
                    timeout(Duration::from_millis(20), socket.recv_batch(&mut batch, 64)).await
                {
                    result.unwrap();
                }
            }
            for datagram in batch {
                let seq = u32::from_le_bytes(datagram[..4].try_into().unwrap());
                assert!(datagram.data() == &payload(seq, 64)[..]);
                assert!(seen.insert(seq), "datagram {seq} arrived twice");
            }
        }
    });
}

#[test]
fn dropping_a_receiving_socket_is_clean() {
    util::on_each_backend(|_| async {
        // Many sockets with armed receive rings, dropped with and without datagrams held:
        // the driver retires each ring after its multishot ends.
        let mut kept = Vec::new();
        for round in 0..50u32 {
            let socket = bound("127.0.0.1");
            let sender = DatagramSocket::new();
            sender
                .send_to_addr(payload(round, 32), socket.local_addr().unwrap())
                .await
                .0
                .unwrap();
            let datagram = socket.recv().await.unwrap();
            if round % 2 == 0 {
                kept.push(datagram); // outlives its socket
            }
            drop(socket);
        }
        for (i, datagram) in kept.iter().enumerate() {
            assert!(datagram.data() == &payload(2 * i as u32, 32)[..]);
        }
    });
}

#[test]
fn a_receive_cancelled_while_queued_does_not_stall_the_others() {
    // Regression: the datagram socket's turn woke only the first waiter when passed on,
    // and a cancelled first waiter left every receive behind it asleep for good.
    util::on_each_backend(|_| async {
        let server = std::rc::Rc::new(bound("127.0.0.1"));
        let addr = server.local_addr().unwrap();
        let spawn_recv = |server: &std::rc::Rc<DatagramSocket>| {
            let server = server.clone();
            ringsock::spawn(async move { server.recv().await.unwrap().to_vec() })
        };
        // The first takes the receiver's turn; the others queue behind it.
        let first = spawn_recv(&server);
        let cancelled = spawn_recv(&server);
        let third = spawn_recv(&server);
        util::yield_now().await;
        cancelled.abort();

        let client = bound("127.0.0.1");
        for message in [&b"one"[..], &b"two"[..]] {
            let (sent, _) = client.send_to_addr(message.to_vec(), addr).await;
            sent.unwrap();
        }
        let got = [
            util::must("first receive", first).await,
            util::must("receive queued behind a cancelled one", third).await,
        ];
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec()]);
    });
}

/// A dual-stack socket's hop limit holds for the IPv4 datagrams it sends too (IP_TTL
/// beside IPV6_UNICAST_HOPS), as its multicast hop limit already did.
#[test]
fn a_dual_stack_socket_s_hop_limit_holds_for_ipv4_too() {
    util::on_each_backend(|backend| async move {
        let socket = DatagramSocket::new();
        socket.control().set_hop_limit(7).unwrap();
        socket.bind("0").unwrap();
        assert!(
            socket.local_addr().unwrap().is_ipv6(),
            "{backend}: dual-stack"
        );
        let sock = socket2::SockRef::from(&socket);
        assert_eq!(sock.unicast_hops_v6().unwrap(), 7, "{backend}");
        assert_eq!(sock.ttl().unwrap(), 7, "{backend}: IPv4's TTL");
        // Set after the bind, the same.
        socket.control().set_hop_limit(9).unwrap();
        assert_eq!(
            sock.ttl().unwrap(),
            9,
            "{backend}: IPv4's TTL after the bind"
        );
    });
}

/// A task that received from a socket and then waits for something else is woken by
/// that socket's next datagram at most once, not by every datagram after it: the
/// standing receive keeps its waker for the task's next receive, but wakes it only while
/// the task waits on it.
#[test]
fn a_socket_no_longer_waited_on_does_not_wake_its_task_per_datagram() {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::{Poll, Waker};
    const DATAGRAMS: usize = 50;
    util::on_each_receive_path(|backend| async move {
        let quiet = bound("127.0.0.1");
        let quiet_addr = quiet.local_addr().unwrap();
        let pacer = bound("127.0.0.1");
        let pacer_addr = pacer.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"first", quiet_addr).unwrap();
        assert_eq!(quiet.recv().await.unwrap().data(), b"first");
        // The task turns to a gate that another task opens after DATAGRAMS more datagrams
        // reached `quiet`, each in a turn of its own (the other task waits for a datagram
        // of its own on `pacer` after each).
        let polls = Rc::new(Cell::new(0usize));
        let open = Rc::new(Cell::new(false));
        let gate_waker: Rc<Cell<Option<Waker>>> = Rc::new(Cell::new(None));
        let pacing = {
            let (open, gate_waker) = (open.clone(), gate_waker.clone());
            ringsock::spawn(async move {
                for _ in 0..DATAGRAMS {
                    sender.send_to(b"more", quiet_addr).unwrap();
                    sender.send_to(b"turn", pacer_addr).unwrap();
                    pacer.recv().await.unwrap();
                }
                open.set(true);
                if let Some(waker) = gate_waker.take() {
                    waker.wake();
                }
            })
        };
        std::future::poll_fn(|cx| {
            polls.set(polls.get() + 1);
            if open.get() {
                return Poll::Ready(());
            }
            gate_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await;
        pacing.await;
        // The first poll, the wake the kept waker may give once, the gate's own wake.
        assert!(
            polls.get() <= 3,
            "{backend:?}: the gate was polled {} times for {DATAGRAMS} datagrams",
            polls.get()
        );
        // Nothing was lost meanwhile: the socket still holds every datagram.
        for _ in 0..DATAGRAMS {
            assert_eq!(quiet.recv().await.unwrap().data(), b"more");
        }
    });
}
