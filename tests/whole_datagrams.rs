//! The default receive ring takes every legal datagram whole, on every receive path:
//! io_uring with incremental buffers (small datagrams packed into shared buffers),
//! io_uring without them, and epoll.

mod util;

use ringsock::runtime::Builder;
use ringsock::{Backend, Capability, DatagramSocket, HostName, ReceiveRing};

/// A size of every class: empty, tiny, either side of the old 2 KiB buffers, a page,
/// a jumbo frame, half and all of the IPv4 maximum.
const SIZES_V4: [usize; 9] = [0, 1, 171, 2048, 2049, 4096, 9000, 32768, 65_507];
/// The IPv6 maximum (65,535 minus the 8-byte UDP header; no jumbograms).
const MAX_V6: usize = 65_527;

/// Datagram `seq` of `len` bytes: pseudo-random, its first 4 bytes (where there is
/// room) the sequence number.
fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut bytes = util::pseudo_random_bytes(seq as u64 + 1, len);
    let n = len.min(4);
    bytes[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
    bytes
}

fn bound(host: &str) -> DatagramSocket {
    let socket = DatagramSocket::new();
    socket
        .bind_host(&HostName::new(host).unwrap(), "0")
        .unwrap();
    socket
}

/// How a test takes the next datagram.
#[derive(Debug, Clone, Copy)]
enum Api {
    Recv,
    RecvBatch,
    Messages,
}

/// Sends each of `sizes` and receives it with `api` before the next, checking that it
/// arrives whole.
async fn round_trip_sizes(receiver: &DatagramSocket, sizes: &[usize], api: Api) {
    let sender = bound(if receiver.local_addr().unwrap().is_ipv6() {
        "::1"
    } else {
        "127.0.0.1"
    });
    let to = receiver.local_addr().unwrap();
    let mut messages = receiver.messages();
    let mut batch = Vec::new();
    for (seq, &len) in sizes.iter().enumerate() {
        let sent = payload(seq as u32, len);
        let (result, _) = sender.send_to_addr(sent.clone(), to).await;
        assert_eq!(result.unwrap(), len, "send {len}");
        let datagram = match api {
            Api::Recv => util::must("recv", receiver.recv()).await.unwrap(),
            Api::Messages => util::must("messages", messages.next()).await.unwrap(),
            Api::RecvBatch => {
                while batch.is_empty() {
                    util::must("recv_batch", receiver.recv_batch(&mut batch, 8))
                        .await
                        .unwrap();
                }
                assert_eq!(batch.len(), 1, "one datagram was sent");
                batch.pop().unwrap()
            }
        };
        assert!(!datagram.is_truncated(), "{len} bytes via {api:?}");
        assert_eq!(datagram.len(), len, "via {api:?}");
        assert_eq!(datagram.original_len(), len);
        assert!(
            datagram.data() == &sent[..],
            "{len} bytes via {api:?} differ"
        );
        assert_eq!(datagram.remote_addr(), sender.local_addr().unwrap());
    }
}

#[test]
fn every_size_arrives_whole_through_recv_recv_batch_and_messages() {
    util::on_each_receive_path(|_| async {
        let mut sizes_v6 = SIZES_V4.to_vec();
        sizes_v6.push(MAX_V6);
        for api in [Api::Recv, Api::RecvBatch, Api::Messages] {
            let v4 = bound("127.0.0.1");
            round_trip_sizes(&v4, &SIZES_V4, api).await;
            let v6 = bound("::1");
            round_trip_sizes(&v6, &sizes_v6, api).await;
            for socket in [v4, v6] {
                let stats = socket.receive_stats();
                assert_eq!(stats.truncated, 0, "{stats:?}");
                assert_eq!(stats.buffers_lent, 0, "{stats:?}");
            }
        }
    });
}

/// A program may hold far more datagrams than the buffers the kernel is given at a time
/// (io_uring keeps a few of the ring's shared buffers with the kernel and the rest in
/// reserve): 40 of the largest, each received before the next is sent and all kept,
/// arrive whole, and the ring gives them up when they are dropped.
#[test]
fn a_program_holding_many_of_the_largest_datagrams_gets_every_one_whole() {
    util::on_each_receive_path(|_| async {
        const HELD: u32 = 40;
        let receiver = bound("127.0.0.1");
        let to = receiver.local_addr().unwrap();
        let sender = bound("127.0.0.1");
        let mut held = Vec::new();
        for seq in 0..HELD {
            let (sent, _) = sender.send_to_addr(payload(seq, 65_507), to).await;
            assert_eq!(sent.unwrap(), 65_507);
            while held.len() <= seq as usize {
                util::must("recv_batch", receiver.recv_batch(&mut held, 8))
                    .await
                    .unwrap();
            }
        }
        for (seq, datagram) in held.iter().enumerate() {
            assert!(
                datagram.data() == &payload(seq as u32, 65_507)[..],
                "datagram {seq} differs"
            );
        }
        drop(held);
        let stats = receiver.receive_stats();
        assert_eq!(stats.datagrams, HELD as u64, "{stats:?}");
        assert_eq!((stats.truncated, stats.dropped), (0, 0), "{stats:?}");
        assert_eq!(stats.buffers_lent, 0, "{stats:?}");
        assert_eq!(stats.buffers_free, stats.buffers, "{stats:?}");
        // The ring had room for every one: it never ran dry on the way.
        assert_eq!(stats.ring_empty, 0, "{stats:?}");
    });
}

/// A burst queued before the first receive, larger than the buffers the kernel is given
/// at first (a ring of 2 KiB datagrams: four shared buffers take a dozen), comes out
/// whole and in order: a ring that runs dry with buffers in reserve takes more.
#[test]
fn a_burst_past_the_buffers_the_kernel_holds_arrives_whole_and_in_order() {
    util::on_each_receive_path(|_| async {
        const BURST: u32 = 60;
        const LEN: usize = 1500;
        let receiver = DatagramSocket::new();
        receiver
            .control()
            .set_receive_ring(ReceiveRing {
                buffers: 64,
                buffer_size: 2048,
            })
            .unwrap();
        receiver.control().set_receive_buffer_size(1 << 20).unwrap();
        receiver
            .bind_host(&HostName::new("127.0.0.1").unwrap(), "0")
            .unwrap();
        let to = receiver.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for seq in 0..BURST {
            sender.send_to(&payload(seq, LEN), to).unwrap();
        }
        let mut next = 0u32;
        let mut batch = Vec::new();
        while next < BURST {
            util::must("recv_batch", receiver.recv_batch(&mut batch, 64))
                .await
                .unwrap();
            for datagram in batch.drain(..) {
                assert!(
                    datagram.data() == &payload(next, LEN)[..],
                    "datagram {next} differs or is out of order"
                );
                next += 1;
            }
        }
        let stats = receiver.receive_stats();
        assert_eq!(stats.datagrams, BURST as u64, "{stats:?}");
        assert_eq!((stats.truncated, stats.dropped), (0, 0), "{stats:?}");
    });
}

#[test]
fn the_default_ring_is_capped_at_four_mib() {
    let ring = ReceiveRing::default();
    assert_eq!(ring.buffer_size, ReceiveRing::WHOLE);
    assert!(ring.buffer_size >= MAX_V6);
    // 64 slots of 64 KiB and the room for io_uring's per-datagram header.
    assert_eq!(ring.memory(), 64 * (65_536 + 128));
    assert_eq!(ReceiveRing::large(), ring);
}

#[test]
fn small_datagrams_share_a_buffer_and_large_ones_still_arrive_whole() {
    let runtime = match Builder::new().backend(Backend::Uring).build() {
        Ok(runtime) => runtime,
        Err(err) if std::env::var_os("RINGSOCK_REQUIRE_URING").is_none() => {
            return eprintln!("skipped: io_uring cannot start: {err}")
        }
        Err(err) => panic!("cannot start io_uring: {err}"),
    };
    if !runtime
        .capabilities()
        .contains(Capability::IncrementalBuffers)
    {
        // A kernel before 6.12, or without the buffer ring's min_left: the fallback,
        // which every_size_arrives_whole_... covers, is all there is to test.
        return eprintln!("skipped: the kernel has no incremental buffers (with min_left)");
    }
    runtime.block_on(async {
        const DATAGRAMS: u32 = 300;
        let len = |seq: u32| {
            if seq % 50 == 49 {
                65_507
            } else {
                1 + (seq as usize * 37) % 200
            }
        };
        let receiver = bound("127.0.0.1");
        let to = receiver.local_addr().unwrap();
        let sender = bound("127.0.0.1");
        // One at a time, each received before the next is sent: sparse traffic, which
        // the multishot receive serves, packing datagram after datagram into a buffer.
        let mut held = Vec::new();
        for seq in 0..DATAGRAMS {
            sender
                .send_to_addr(payload(seq, len(seq)), to)
                .await
                .0
                .unwrap();
            while held.len() <= seq as usize {
                util::must("recv_batch", receiver.recv_batch(&mut held, 8))
                    .await
                    .unwrap();
            }
        }
        // Far more datagrams held than the ring has 64 KiB slots (64), in a few buffers.
        let stats = receiver.receive_stats();
        assert_eq!(stats.bursts_drained, 0, "{stats:?}");
        assert!(stats.buffers_lent <= 3, "{stats:?}");
        assert!(stats.buffers_free > 0, "{stats:?}");
        for (seq, datagram) in held.iter().enumerate() {
            let seq = seq as u32;
            assert!(!datagram.is_truncated(), "datagram {seq}");
            assert!(
                datagram.data() == &payload(seq, len(seq))[..],
                "datagram {seq} of {} bytes differs",
                len(seq)
            );
        }
        drop(held);
        let stats = receiver.receive_stats();
        assert_eq!(stats.buffers_lent, 0, "{stats:?}");
        assert_eq!(stats.truncated, 0, "{stats:?}");
    });
}

#[test]
fn the_fallback_is_used_when_incremental_buffers_are_disabled() {
    let builder = Builder::new()
        .backend(Backend::Uring)
        .disable(Capability::IncrementalBuffers);
    match builder.build() {
        Ok(runtime) => assert!(!runtime
            .capabilities()
            .contains(Capability::IncrementalBuffers)),
        Err(err) if std::env::var_os("RINGSOCK_REQUIRE_URING").is_none() => {
            eprintln!("skipped: io_uring cannot start: {err}")
        }
        Err(err) => panic!("cannot start io_uring: {err}"),
    }
    assert_eq!(
        "incremental-buffers".parse::<Capability>().unwrap(),
        Capability::IncrementalBuffers
    );
}
