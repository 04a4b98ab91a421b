//! Hostile use of the datagram API, on both drivers: batches that are empty, huge, to
//! many or unreachable destinations, oversized payloads, forwards dropped in flight,
//! extreme ring shapes and send options, and sockets used where they do not belong.
//! Bad input must come back as a `ringsock::Error`; nothing may panic, hang, leak or
//! lose or corrupt bytes.

mod util;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use ringsock::runtime::Builder;
use ringsock::{
    Backend, Datagram, DatagramSocket, Ecn, OutgoingDatagram, ReceiveRing, SendOptions,
    SocketErrorStatus, TrafficClass,
};

use util::{must, poll_once, yield_now};

const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn bound_v4() -> DatagramSocket {
    let socket = DatagramSocket::new();
    socket.bind_addr(SocketAddr::new(V4, 0)).unwrap();
    socket
}

fn with_ring(buffers: u16, buffer_size: usize) -> DatagramSocket {
    let socket = DatagramSocket::new();
    socket
        .control()
        .set_receive_ring(ReceiveRing {
            buffers,
            buffer_size,
        })
        .unwrap();
    socket.bind_addr(SocketAddr::new(V4, 0)).unwrap();
    socket
}

async fn recv(socket: &DatagramSocket) -> Datagram {
    must("a datagram arrives", socket.recv()).await.unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn send_many_empty_and_oversized_and_unreachable() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = bound_v4();
        let sink = bound_v4();
        let to = sink.local_addr().unwrap();
        let empty: Vec<OutgoingDatagram> = Vec::new();
        assert!(sender.send_many(empty).await.unwrap().is_empty());

        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        let port0_addr = SocketAddr::new(V4, 0);
        let batch = vec![
            OutgoingDatagram::new(vec![1u8; 100], to),
            OutgoingDatagram::new(vec![2u8; 65_508], to),
            OutgoingDatagram::new(vec![3u8; 0], to),
            OutgoingDatagram::new(vec![4u8; 10], v6),
            OutgoingDatagram::new(vec![5u8; 10], port0_addr),
            OutgoingDatagram::new(vec![6u8; 65_507], to),
            OutgoingDatagram::new(vec![7u8; 70_000], to),
            OutgoingDatagram::new(vec![8u8; 100], to),
        ];
        let results = must("send_many", sender.send_many(batch)).await.unwrap();
        assert_eq!(results.len(), 8, "{backend}");
        assert_eq!(results[0].as_ref().unwrap(), &100);
        let too_long = results[1].as_ref().unwrap_err();
        assert_eq!(too_long.raw_os_error(), Some(libc::EMSGSIZE), "{backend}");
        assert_eq!(results[2].as_ref().unwrap(), &0);
        assert!(results[3].is_err());
        let port0 = results[4].as_ref().unwrap_err();
        assert_eq!(
            port0.status(),
            SocketErrorStatus::InvalidArgument,
            "{port0}"
        );
        let (alone, _) = sender.send_to_addr(b"p".to_vec(), port0_addr).await;
        let alone = alone.unwrap_err();
        assert_eq!(
            alone.status(),
            SocketErrorStatus::InvalidArgument,
            "{alone}"
        );
        let stream = sender
            .output_stream_to_addr(port0_addr)
            .map(drop)
            .unwrap_err();
        assert_eq!(
            stream.status(),
            SocketErrorStatus::InvalidArgument,
            "{stream}"
        );
        assert_eq!(results[5].as_ref().unwrap(), &65_507);
        assert!(results[6].is_err());
        assert_eq!(results[7].as_ref().unwrap(), &100);
        for (len, byte) in [(100, 1u8), (0, 3), (65_507, 6), (100, 8)] {
            let got = recv(&sink).await;
            assert_eq!(got.len(), len, "{backend}");
            assert!(got.iter().all(|b| *b == byte), "{backend}");
        }
    });
}

#[test]
fn recv_batch_max_zero() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = bound_v4();
        let sink = bound_v4();
        let to = sink.local_addr().unwrap();
        for i in 0..3u8 {
            sender.send_to_addr(vec![i; 4], to).await.0.unwrap();
        }
        let mut out = vec![recv(&sink).await];
        let n = must("recv_batch 0", sink.recv_batch(&mut out, 0)).await;
        let err = n.expect_err("recv_batch(max 0) must not take a datagram");
        assert_eq!(
            err.status(),
            SocketErrorStatus::InvalidArgument,
            "{backend}"
        );
        assert_eq!(out.len(), 1, "{backend}: recv_batch(max 0) appended");
        // The two datagrams are still there, for a batch that may take them, and the
        // datagram already in `out` stays first.
        let mut taken = 0;
        while taken < 2 {
            taken += must("recv_batch", sink.recv_batch(&mut out, 8))
                .await
                .unwrap();
        }
        assert_eq!(taken, 2, "{backend}");
        let firsts: Vec<u8> = out.iter().map(|d| d[0]).collect();
        assert_eq!(firsts, [0, 1, 2], "{backend}");
    });
}

#[test]
fn receive_ring_shapes() {
    util::on_each_receive_path(|backend: Backend| async move {
        for (buffers, size) in [
            (0u16, 64usize),
            (32769, 64),
            (65535, 64),
            (8, 0),
            (8, ReceiveRing::WHOLE + 1),
            (8, 1 << 33),
            (8, usize::MAX),
        ] {
            let socket = DatagramSocket::new();
            let ring = ReceiveRing {
                buffers,
                buffer_size: size,
            };
            let err = socket.control().set_receive_ring(ring).unwrap_err();
            assert_eq!(
                err.status(),
                SocketErrorStatus::InvalidArgument,
                "{backend}: {ring:?}"
            );
            assert_eq!(socket.control().receive_ring(), ReceiveRing::default());
            // The memory of a ring nobody can set is still never less than its slots.
            assert!(ring.memory() >= size.min(usize::MAX / 2), "{ring:?}");
        }
        for (buffers, size) in [(1u16, 1usize), (32768, 1), (2, ReceiveRing::WHOLE)] {
            let socket = with_ring(buffers, size);
            let to = socket.local_addr().unwrap();
            let sender = bound_v4();
            sender.send_to_addr(vec![9u8; 3], to).await.0.unwrap();
            let got = recv(&socket).await;
            assert_eq!(&got[..], &[9u8; 3][..size.min(3)], "{backend}: {size}");
            assert_eq!(got.is_truncated(), size < 3);
            assert_eq!(got.original_len(), 3);
        }
    });
}

#[test]
fn far_future_transmit_time_dropped_sends_nothing() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = bound_v4();
        let sink = bound_v4();
        let to = sink.local_addr().unwrap();
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let options = SendOptions::default().with_transmit_time(far);
        {
            let mut send = pin!(sender.send_to_addr_with(b"late".to_vec(), to, &options));
            assert!(poll_once(send.as_mut()).await.is_pending());
        }
        {
            let batch = vec![OutgoingDatagram::new(&b"late"[..], to).with_options(options)];
            let mut send = pin!(sender.send_many(batch));
            assert!(poll_once(send.as_mut()).await.is_pending());
        }
        // Far past: now.
        let past = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now);
        let options = SendOptions::default().with_transmit_time(past);
        sender
            .send_to_addr_with(b"now".to_vec(), to, &options)
            .await
            .0
            .unwrap();
        assert_eq!(&recv(&sink).await[..], b"now", "{backend}");
        // Kernel pacing: the time goes to the kernel (loopback's qdisc sends at once).
        sender.control().set_kernel_pacing(true).unwrap();
        for (at, text) in [(past, &b"k1"[..]), (far, b"k2")] {
            let options = SendOptions::default().with_transmit_time(at);
            let (sent, _) = sender.send_to_addr_with(text.to_vec(), to, &options).await;
            assert_eq!(sent.unwrap(), 2, "{backend}");
            assert_eq!(&recv(&sink).await[..], text, "{backend}");
        }
        let err = TrafficClass::new(64, Ecn::Ce).unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument);
        assert_eq!(TrafficClass::new(63, Ecn::Ce).unwrap().to_byte(), 0xff);
    });
}

#[test]
fn wrong_source_addresses() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = bound_v4();
        let sink = bound_v4();
        let to = sink.local_addr().unwrap();
        let v6 = SendOptions {
            source: Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ..SendOptions::default()
        };
        let r = sender.send_to_addr_with(b"x".to_vec(), to, &v6).await.0;
        assert_eq!(r.unwrap_err().status(), SocketErrorStatus::InvalidArgument);
        let foreign = SendOptions {
            source: Some("192.0.2.1".parse().unwrap()),
            ..SendOptions::default()
        };
        // A source this host does not own: the kernel's error, for that datagram only.
        let r = sender
            .send_to_addr_with(b"x".to_vec(), to, &foreign)
            .await
            .0;
        let err = r.expect_err("sent from 192.0.2.1");
        assert!(
            err.to_string().contains("from 192.0.2.1"),
            "{backend}: {err}"
        );
        let batch = vec![
            OutgoingDatagram::new(&b"a"[..], to),
            OutgoingDatagram::new(&b"b"[..], to).with_options(foreign),
            OutgoingDatagram::new(&b"c"[..], to),
        ];
        let r = sender.send_many(batch).await.unwrap();
        assert!(r[0].is_ok() && r[2].is_ok(), "{backend}: {r:?}");
        let err = r[1].as_ref().expect_err("sent from 192.0.2.1");
        assert!(
            err.to_string().contains("from 192.0.2.1"),
            "{backend}: {err}"
        );
        assert_eq!(&recv(&sink).await[..], b"a");
        assert_eq!(&recv(&sink).await[..], b"c");
        // Another IP version in a batch: the whole batch is refused, nothing sent.
        let batch = vec![
            OutgoingDatagram::new(&b"n"[..], to),
            OutgoingDatagram::new(&b"n"[..], to).with_options(v6),
        ];
        let err = sender.send_many(batch).await.unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument);
        // reply_to without receive-destination: plain
        let d = {
            sender.send_to_addr(b"q".to_vec(), to).await.0.unwrap();
            recv(&sink).await
        };
        let opts = SendOptions::reply_to(&d);
        assert_eq!(opts, SendOptions::default());
        sink.send_to_addr_with(b"r".to_vec(), d.remote_addr(), &opts)
            .await
            .0
            .unwrap();
        assert_eq!(&recv(&sender).await[..], b"r");
        // Toggling after the ring started.
        assert!(sink.control().set_receive_destination(true).is_err());
        assert!(sink.control().set_receive_traffic_class(true).is_err());
        assert!(sink.control().set_receive_timestamps(true).is_err());
        assert!(sink
            .control()
            .set_receive_ring(ReceiveRing::default())
            .is_err());
        assert!(sink.control().set_gro(true).is_err());
    });
}

#[test]
fn outside_any_runtime() {
    for backend in util::BACKENDS {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let to = SocketAddr::new(V4, 9);
        // Never on a runtime.
        let fresh = DatagramSocket::new();
        let mut send = pin!(fresh.send_to_addr(b"x".to_vec(), to));
        match send.as_mut().poll(&mut cx) {
            Poll::Ready((r, _)) => {
                assert_eq!(r.unwrap_err().status(), SocketErrorStatus::WrongRuntime)
            }
            Poll::Pending => panic!("pending"),
        }
        let batch = vec![OutgoingDatagram::new(&b"x"[..], to)];
        let mut many = pin!(fresh.send_many(batch));
        match many.as_mut().poll(&mut cx) {
            Poll::Ready(r) => {
                assert_eq!(r.unwrap_err().status(), SocketErrorStatus::WrongRuntime)
            }
            Poll::Pending => panic!("pending"),
        }
        let mut rx = pin!(fresh.recv());
        match rx.as_mut().poll(&mut cx) {
            Poll::Ready(r) => {
                assert_eq!(r.unwrap_err().status(), SocketErrorStatus::WrongRuntime)
            }
            Poll::Pending => panic!("pending"),
        }
        // Paced, outside.
        let options =
            SendOptions::default().with_transmit_time(Instant::now() + Duration::from_secs(3600));
        let mut paced = pin!(fresh.send_to_addr_with(b"x".to_vec(), to, &options));
        match paced.as_mut().poll(&mut cx) {
            Poll::Ready((r, _)) => {
                assert_eq!(r.unwrap_err().status(), SocketErrorStatus::WrongRuntime)
            }
            Poll::Pending => panic!("pending"),
        }
        // On a runtime, then another.
        let Some(a) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let Some(b) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let relay = with_ring(8, 2048);
        let sink = bound_v4();
        let sink_addr = sink.local_addr().unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let forward = a.block_on(async {
            relay
                .send_to_addr(b"abc".to_vec(), relay_addr)
                .await
                .0
                .unwrap();
            recv(&relay).await.into_forward()
        });
        b.block_on(async {
            let batch = vec![OutgoingDatagram::new(&b"x"[..], sink_addr)];
            let r = relay.send_many(batch).await;
            assert_eq!(r.unwrap_err().status(), SocketErrorStatus::WrongRuntime);
            let mut out = Vec::new();
            let r = relay.recv_batch(&mut out, 4).await;
            assert_eq!(r.unwrap_err().status(), SocketErrorStatus::WrongRuntime);
            // The forward goes out through a socket of B.
            let other = bound_v4();
            let (r, forward) = other.send_to_addr(forward, sink_addr).await;
            assert_eq!(r.unwrap(), 3);
            drop(forward);
            assert_eq!(&recv(&sink).await[..], b"abc");
        });
        a.block_on(async {
            assert_eq!(relay.receive_stats().buffers_forwarding, 0);
            assert_eq!(relay.receive_stats().buffers_lent, 0);
        });
        let _ = backend;
    }
}

#[test]
fn dropped_futures_leak_nothing() {
    util::on_each_backend(|backend: Backend| async move {
        let relay = with_ring(8, 2048);
        let sender = bound_v4();
        let sink = bound_v4();
        let relay_addr = relay.local_addr().unwrap();
        let sink_addr = sink.local_addr().unwrap();
        // Warm up.
        sender
            .send_to_addr(b"w".to_vec(), relay_addr)
            .await
            .0
            .unwrap();
        drop(recv(&relay).await);
        let fds = open_fds();
        for i in 0..10_000u32 {
            {
                let mut r = pin!(relay.recv());
                let _ = poll_once(r.as_mut()).await;
            }
            if i % 4 == 0 {
                sender
                    .send_to_addr(i.to_be_bytes().to_vec(), relay_addr)
                    .await
                    .0
                    .unwrap();
                let f = recv(&relay).await.into_forward();
                let mut s = pin!(relay.send_to_addr(f, sink_addr));
                let _ = poll_once(s.as_mut()).await;
            }
            {
                let mut s = pin!(sender.send_to_addr(b"d".to_vec(), sink_addr));
                let _ = poll_once(s.as_mut()).await;
            }
            if i % 64 == 0 {
                // Drain the sink.
                loop {
                    let mut out = Vec::new();
                    let ready = poll_once(pin!(sink.recv_batch(&mut out, 1024)).as_mut()).await;
                    if !matches!(ready, Poll::Ready(Ok(_))) {
                        break;
                    }
                }
            }
        }
        // Sends dropped in flight give their forwards back once the driver reaps them.
        must("the forwards come back", async {
            while relay.receive_stats().buffers_lent != 0 {
                yield_now().await;
            }
        })
        .await;
        let stats = relay.receive_stats();
        assert_eq!(stats.buffers_forwarding, 0, "{backend}: {stats:?}");
        assert_eq!(stats.buffers_free, stats.buffers, "{backend}: {stats:?}");
        // A leak per round would be thousands; the other tests of this process, running
        // in parallel, hold fewer than a hundred.
        assert!(
            open_fds() < fds + 1000,
            "{backend}: {fds} -> {}",
            open_fds()
        );
    });
}

fn payload(i: usize, len: usize) -> Vec<u8> {
    util::pseudo_random_bytes(i as u64 + 1, len)
}

#[test]
fn send_many_ten_thousand_in_order() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = bound_v4();
        let sink = DatagramSocket::new();
        sink.control().set_receive_buffer_size(8 << 20).unwrap();
        sink.bind_addr(SocketAddr::new(V4, 0)).unwrap();
        let to = sink.local_addr().unwrap();
        let count = 10_000;
        let batch: Vec<OutgoingDatagram> = (0..count)
            .map(|i| {
                let mut p = (i as u32).to_be_bytes().to_vec();
                p.extend_from_slice(&payload(i, i % 97));
                OutgoingDatagram::new(p, to)
            })
            .collect();
        let lens: Vec<usize> = batch.iter().map(|d| d.data.len()).collect();
        let results = must("send_many", sender.send_many(batch)).await.unwrap();
        assert_eq!(results.len(), count);
        for (i, r) in results.iter().enumerate() {
            assert_eq!(*r.as_ref().unwrap(), lens[i], "{backend} {i}");
        }
        // On loopback a datagram is queued or counted dropped by the time its send
        // returned: every one not dropped is there, in order.
        let dropped = sink.receive_stats().dropped as usize;
        let mut got = Vec::new();
        let mut out = Vec::new();
        while got.len() < count - dropped {
            out.clear();
            must("batch", sink.recv_batch(&mut out, 512)).await.unwrap();
            got.extend(out.drain(..).map(|d| d.to_vec()));
        }
        let mut last = None;
        for d in &got {
            let i = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            assert!(last.is_none_or(|last| i > last), "{backend}: out of order");
            assert_eq!(&d[4..], &payload(i, i % 97)[..], "{backend}: {i}");
            last = Some(i);
        }
        if dropped == 0 {
            assert_eq!(last, Some(count - 1));
        }
    });
}

#[test]
fn send_many_to_seventy_destinations_and_odd_gso_runs() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = bound_v4();
        let sinks: Vec<DatagramSocket> = (0..70).map(|_| bound_v4()).collect();
        let mut batch = Vec::new();
        let mut expect: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 70];
        for (k, sink) in sinks.iter().enumerate() {
            let to = sink.local_addr().unwrap();
            // Equal sizes, a larger one in the middle, a smaller one, equal again.
            for (j, len) in [1000, 1000, 1000, 1500, 1000, 1000, 999, 1000, 1000]
                .into_iter()
                .enumerate()
            {
                let p = payload(k * 100 + j, len);
                expect[k].push(p.clone());
                batch.push(OutgoingDatagram::new(p, to));
            }
        }
        let results = must("send_many", sender.send_many(batch)).await.unwrap();
        assert!(results.iter().all(|r| r.is_ok()), "{backend}: {results:?}");
        for (k, sink) in sinks.iter().enumerate() {
            for (j, want) in expect[k].iter().enumerate() {
                let got = recv(sink).await;
                assert_eq!(&got[..], &want[..], "{backend}: sink {k} datagram {j}");
                assert_eq!(got.gro_segment_size(), None);
            }
        }
    });
}

#[test]
fn send_many_mixed_families() {
    util::on_each_backend(|backend: Backend| async move {
        let v4_sink = bound_v4();
        let v6_sink = DatagramSocket::new();
        v6_sink.bind_addr("[::1]:0".parse().unwrap()).unwrap();
        let to4 = v4_sink.local_addr().unwrap();
        let to6 = v6_sink.local_addr().unwrap();
        let mapped = SocketAddr::new(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), to4.port());
        // Dual stack, unbound first: bind("0").
        let dual = DatagramSocket::new();
        dual.bind("0").unwrap();
        let batch = vec![
            OutgoingDatagram::new(&b"a4"[..], to4),
            OutgoingDatagram::new(&b"a6"[..], to6),
            OutgoingDatagram::new(&b"am"[..], mapped),
            OutgoingDatagram::new(&b"b4"[..], to4),
        ];
        let r = must("dual", dual.send_many(batch.clone())).await.unwrap();
        assert!(r.iter().all(|r| r.is_ok()), "{backend}: {r:?}");
        assert_eq!(&recv(&v4_sink).await[..], b"a4");
        assert_eq!(&recv(&v4_sink).await[..], b"am");
        assert_eq!(&recv(&v4_sink).await[..], b"b4");
        assert_eq!(&recv(&v6_sink).await[..], b"a6");
        // An unbound socket made for the first destination: IPv4. The IPv6 destination
        // fails alone; the IPv4-mapped one is IPv4 and goes.
        for socket in [DatagramSocket::new(), bound_v4()] {
            let r = must("v4", socket.send_many(batch.clone())).await.unwrap();
            assert_eq!(r.len(), 4);
            assert_eq!(*r[0].as_ref().unwrap(), 2, "{backend}");
            let err = r[1].as_ref().unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EAFNOSUPPORT),
                "{backend}: {err}"
            );
            assert_eq!(*r[2].as_ref().unwrap(), 2, "{backend}: {:?}", r[2]);
            assert_eq!(*r[3].as_ref().unwrap(), 2, "{backend}");
            for want in [&b"a4"[..], b"am", b"b4"] {
                assert_eq!(&recv(&v4_sink).await[..], want, "{backend}");
            }
            // One datagram to the mapped address alone, too.
            let (sent, _) = socket.send_to_addr(b"m1".to_vec(), mapped).await;
            assert_eq!(sent.unwrap(), 2, "{backend}");
            assert_eq!(&recv(&v4_sink).await[..], b"m1", "{backend}");
        }
        // An unbound socket whose first destination is IPv6: dual-stack.
        let fresh6 = DatagramSocket::new();
        let mut b6 = batch.clone();
        b6.rotate_left(1);
        let r = must("fresh6", fresh6.send_many(b6)).await.unwrap();
        assert!(r.iter().all(|r| r.is_ok()), "{backend}: {r:?}");
        assert_eq!(&recv(&v6_sink).await[..], b"a6", "{backend}");
        for want in [&b"am"[..], b"b4", b"a4"] {
            assert_eq!(&recv(&v4_sink).await[..], want, "{backend}");
        }
    });
}

#[test]
fn forwards_in_flight_when_the_relay_goes() {
    util::on_each_receive_path(|backend: Backend| async move {
        let source = bound_v4();
        let relay = with_ring(8, 2048);
        let sink = DatagramSocket::new();
        sink.control().set_receive_buffer_size(1 << 20).unwrap();
        sink.bind_addr(SocketAddr::new(V4, 0)).unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let sink_addr = sink.local_addr().unwrap();
        let n = 8;
        for i in 0..n {
            source
                .send_to_addr(payload(i, 1200), relay_addr)
                .await
                .0
                .unwrap();
        }
        let mut forwards = Vec::new();
        for _ in 0..n {
            forwards.push(recv(&relay).await.into_forward());
        }
        let zero_copy = forwards.iter().filter(|f| f.is_zero_copy()).count();
        // A quarter of the ring (at least one buffer) is lent; the rest were copied.
        assert!(zero_copy >= 1, "{backend}");
        let stats = relay.receive_stats();
        assert!(
            stats.buffers_forwarding <= (stats.buffers / 4).max(1),
            "{stats:?}"
        );
        // Every send started (SQE queued / attempted), then the relay is dropped.
        let other = bound_v4();
        let mut sends: Vec<_> = forwards
            .into_iter()
            .map(|f| Box::pin(other.send_to_addr(f, sink_addr)))
            .collect();
        let mut done = Vec::new();
        for s in sends.iter_mut() {
            done.push(match poll_once(s.as_mut()).await {
                Poll::Ready((r, _)) => Some(r.unwrap()),
                Poll::Pending => None,
            });
        }
        drop(relay);
        // Half dropped in flight, half finished.
        let mut sent = 0;
        for (i, (s, done)) in sends.into_iter().zip(done).enumerate() {
            if done.is_some() {
                sent += 1;
            } else if i % 2 == 0 {
                let (r, f) = must("send", s).await;
                assert_eq!(r.unwrap(), 1200);
                drop(f);
                sent += 1;
            }
        }
        let mut got = Vec::new();
        while got.len() < sent {
            got.push(recv(&sink).await.to_vec());
        }
        for d in &got {
            assert!(
                (0..n).any(|i| payload(i, 1200) == *d),
                "{backend}: corrupted"
            );
        }
    });
}

#[test]
fn forward_outlives_its_runtime() {
    for backend in util::BACKENDS {
        let Some(a) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let relay = with_ring(8, 2048);
        let relay_addr = relay.local_addr().unwrap();
        let forward = a.block_on(async {
            relay
                .send_to_addr(payload(7, 999), relay_addr)
                .await
                .0
                .unwrap();
            recv(&relay).await.into_forward()
        });
        drop(a);
        // The relay's ring is gone with its runtime; the forward still reads its bytes.
        assert_eq!(forward.data(), &payload(7, 999)[..]);
        drop(relay);
        assert_eq!(forward.data(), &payload(7, 999)[..]);
        let Some(b) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        b.block_on(async {
            let sink = bound_v4();
            let out = bound_v4();
            let (r, f) = out.send_to_addr(forward, sink.local_addr().unwrap()).await;
            assert_eq!(r.unwrap(), 999);
            drop(f);
            assert_eq!(&recv(&sink).await[..], &payload(7, 999)[..]);
        });
    }
}

#[test]
fn a_control_taken_early_sees_the_socket_as_it_is() {
    util::on_each_backend(|backend: Backend| async move {
        let socket = DatagramSocket::new();
        let control = socket.control();
        socket.bind_addr(SocketAddr::new(V4, 0)).unwrap();
        control.set_hop_limit(7).unwrap();
        assert_eq!(control.hop_limit().unwrap(), 7, "{backend}");
        assert!(control.set_multicast_only(true).is_err(), "{backend}");
        let to = socket.local_addr().unwrap();
        socket.send_to_addr(b"x".to_vec(), to).await.0.unwrap();
        recv(&socket).await;
        let small = ReceiveRing {
            buffers: 8,
            buffer_size: 16,
        };
        assert!(control.set_receive_ring(small).is_err(), "{backend}");
        assert!(control.set_receive_destination(true).is_err(), "{backend}");
        assert_eq!(socket.control().receive_ring(), ReceiveRing::default());
    });
}

/// A ring of one buffer: a forward lent from it would leave the ring dry (the next
/// receive waits until the forward is dropped), which the loan cap promises never
/// happens; so its datagrams are copied.
#[test]
fn forwarding_never_takes_the_last_buffer() {
    util::on_each_receive_path(|backend: Backend| async move {
        let source = bound_v4();
        let relay = with_ring(1, 2048);
        let to = relay.local_addr().unwrap();
        source.send_to_addr(payload(1, 100), to).await.0.unwrap();
        let forward = recv(&relay).await.into_forward();
        assert_eq!(forward.data(), &payload(1, 100)[..]);
        let stats = relay.receive_stats();
        assert_eq!(stats.buffers, 1, "{backend}");
        assert!(!forward.is_zero_copy(), "{backend}: {stats:?}");
        assert_eq!(stats.buffers_free, 1, "{backend}: {stats:?}");
        // The ring still receives while the forward is held.
        source.send_to_addr(payload(2, 100), to).await.0.unwrap();
        assert_eq!(&recv(&relay).await[..], &payload(2, 100)[..], "{backend}");
        drop(forward);
    });
}

/// A relay detached while a forward of its own datagram is being sent on it, and while
/// it holds received datagrams: the send ends (sent or with an error, its forward given
/// back), the datagrams not taken come along, and the adopted socket receives on.
#[test]
fn detached_with_a_forward_in_flight() {
    for backend in util::BACKENDS {
        let Some(a) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let Some(b) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let relay = with_ring(8, 2048);
        let sink = bound_v4();
        let source = bound_v4();
        let relay_addr = relay.local_addr().unwrap();
        let sink_addr = sink.local_addr().unwrap();
        let detached = a.block_on(async {
            for i in 0..3 {
                source
                    .send_to_addr(payload(i, 300), relay_addr)
                    .await
                    .0
                    .unwrap();
            }
            let forward = recv(&relay).await.into_forward();
            let mut send = pin!(relay.send_to_addr(forward, sink_addr));
            let first = poll_once(send.as_mut()).await;
            let detached = relay.detach().unwrap();
            let (result, forward) = match first {
                Poll::Ready(done) => done,
                Poll::Pending => must("the send ends", send).await,
            };
            if let Ok(n) = result {
                assert_eq!(n, 300, "{backend}");
            }
            assert_eq!(forward.data(), &payload(0, 300)[..], "{backend}");
            drop(forward);
            let (late, _) = relay.send_to_addr(b"late".to_vec(), sink_addr).await;
            assert!(late.is_err(), "{backend}: a detached handle sent");
            detached
        });
        drop(relay);
        b.block_on(async {
            let adopted = detached.into_datagram().unwrap();
            for i in 1..3 {
                assert_eq!(&recv(&adopted).await[..], &payload(i, 300)[..], "{backend}");
            }
            let source = bound_v4();
            source
                .send_to_addr(payload(9, 5), relay_addr)
                .await
                .0
                .unwrap();
            assert_eq!(&recv(&adopted).await[..], &payload(9, 5)[..], "{backend}");
        });
        drop(a);
    }
}

#[test]
fn a_dropped_socket_frees_its_address_at_once() {
    util::on_each_backend(|backend| async move {
        for received_first in [false, true] {
            let socket = bound_v4();
            let addr = socket.local_addr().unwrap();
            if received_first {
                let sender = bound_v4();
                sender.send_to_addr(b"one".to_vec(), addr).await.0.unwrap();
                assert_eq!(&socket.recv().await.unwrap()[..], b"one");
            }
            // The receive ring armed and a receive waiting when the socket goes (on
            // io_uring its multishot receive used to hold the socket until the loop
            // turned, so the address stayed taken).
            {
                let mut receive = pin!(socket.recv());
                assert!(poll_once(receive.as_mut()).await.is_pending());
            }
            drop(socket);
            let again = DatagramSocket::new();
            again.bind_addr(addr).unwrap_or_else(|err| {
                panic!("{backend} (received first: {received_first}): rebind: {err}")
            });
            let sender = bound_v4();
            sender.send_to_addr(b"two".to_vec(), addr).await.0.unwrap();
            assert_eq!(&again.recv().await.unwrap()[..], b"two", "{backend}");
        }
    });
}

#[test]
fn an_output_stream_outliving_its_socket_still_sends() {
    util::on_each_backend(|backend| async move {
        let sink = bound_v4();
        let socket = bound_v4();
        let output = socket
            .output_stream_to_addr(sink.local_addr().unwrap())
            .unwrap();
        {
            let mut receive = pin!(socket.recv());
            assert!(poll_once(receive.as_mut()).await.is_pending());
        }
        for i in 0..32u8 {
            output.write(vec![i; 100]).await.unwrap();
        }
        drop(socket);
        output.flush().await.unwrap();
        for i in 0..32u8 {
            let datagram = sink.recv().await.unwrap();
            assert_eq!(&datagram[..], &[i; 100][..], "{backend}");
        }
    });
}

#[test]
fn a_paced_batch_cut_short_after_its_first_run_reports_what_went() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = bound_v4();
        let sink = bound_v4();
        let to = sink.local_addr().unwrap();
        // The second run waits for its time; the socket is detached meanwhile. The
        // margin only has to outlast the first poll.
        let later = Instant::now() + Duration::from_secs(1);
        let batch = vec![
            OutgoingDatagram::new(&b"first"[..], to),
            OutgoingDatagram::new(&b"second"[..], to)
                .with_options(SendOptions::default().with_transmit_time(later)),
        ];
        let mut send = pin!(sender.send_many(batch));
        assert!(
            poll_once(send.as_mut()).await.is_pending(),
            "{backend}: the second run waits for its time"
        );
        assert_eq!(&recv(&sink).await[..], b"first", "{backend}");
        let _detached = sender.detach().unwrap();
        let results = must("the batch ends", send)
            .await
            .expect("the first datagram went: the batch as a whole did not fail");
        assert_eq!(results.len(), 2, "{backend}");
        assert_eq!(*results[0].as_ref().unwrap(), 5, "{backend}");
        assert!(results[1].is_err(), "{backend}: {results:?}");
    });
}

#[test]
fn a_message_stream_dropped_with_datagrams_taken_loses_none() {
    util::on_each_receive_path(|backend: Backend| async move {
        let socket = bound_v4();
        let to = socket.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind((V4, 0)).unwrap();
        for seq in 0u8..5 {
            sender.send_to(&[seq; 3], to).unwrap();
        }
        // A stream made for one datagram: it takes what the ring holds, hands out one,
        // and is dropped with the rest.
        let first = must("a datagram", socket.messages().next()).await.unwrap();
        assert_eq!(&first[..], &[0; 3], "{backend}");
        let mut messages = socket.messages();
        assert_eq!(
            &must("a datagram", messages.next()).await.unwrap()[..],
            &[1; 3]
        );
        drop(messages);
        for seq in 2u8..5 {
            assert_eq!(&recv(&socket).await[..], &[seq; 3], "{backend}");
        }
    });
}

#[test]
fn port_zero_is_no_destination_for_a_send_or_a_connect() {
    util::on_each_backend(|backend| async move {
        let socket = bound_v4();
        let zero = SocketAddr::new(V4, 0);
        let (sent, _) = socket.send_to_addr(b"x".to_vec(), zero).await;
        let err = sent.expect_err("a send to port 0");
        assert_eq!(
            err.status(),
            SocketErrorStatus::InvalidArgument,
            "{backend}: {err}"
        );
        let err = socket
            .connect_addr(zero)
            .await
            .expect_err("a connect to port 0");
        assert_eq!(
            err.status(),
            SocketErrorStatus::InvalidArgument,
            "{backend}: {err}"
        );
        // The socket is as it was: not connected, so a send without an address fails.
        let (sent, _) = socket.send(b"x".to_vec()).await;
        assert!(sent.is_err(), "{backend}: a send on an unconnected socket");
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
        let err = DatagramSocket::new()
            .connect_addr(v6)
            .await
            .expect_err("[::1]:0");
        assert_eq!(
            err.status(),
            SocketErrorStatus::InvalidArgument,
            "{backend}: {err}"
        );
    });
}

/// A GSO run that fails for a reason of its own (port 0, a source address the host does
/// not have: EINVAL, which GSO can also cause) fails its datagrams only: the socket keeps
/// GSO, and its next flush of equal datagrams still goes out as one GSO send.
#[test]
fn a_gso_run_failing_for_its_own_reason_leaves_gso_on() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = bound_v4();
        let sink = bound_v4();
        let to = sink.local_addr().unwrap();
        assert!(sender.control().segmentation_offload(), "{backend}");
        let port_zero = SocketAddr::new(V4, 0);
        let batch = vec![
            OutgoingDatagram::new(vec![1u8; 100], to),
            OutgoingDatagram::new(vec![2u8; 100], port_zero),
            OutgoingDatagram::new(vec![3u8; 100], port_zero),
            OutgoingDatagram::new(vec![4u8; 100], to),
        ];
        let results = sender.send_many(batch).await.unwrap();
        let went: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(went, [true, false, false, true], "{backend}");
        assert!(
            sender.control().segmentation_offload(),
            "{backend}: a run to port 0 turned GSO off"
        );
        for expected in [1u8, 4] {
            assert_eq!(recv(&sink).await.as_ref(), [expected; 100], "{backend}");
        }

        let foreign = SendOptions {
            source: Some("192.0.2.1".parse().unwrap()),
            ..SendOptions::default()
        };
        let stream = sender.output_stream_to_addr_with(to, &foreign).unwrap();
        for _ in 0..4 {
            stream.write(vec![7u8; 100]).await.unwrap();
        }
        assert!(stream.flush().await.is_err(), "{backend}");
        assert!(
            sender.control().segmentation_offload(),
            "{backend}: a source the host lacks turned GSO off"
        );

        // Still one GSO send: a GRO receiver gets the 64 datagrams in one delivery.
        let gro = DatagramSocket::new();
        gro.control().set_gro(true).unwrap();
        gro.bind_addr(SocketAddr::new(V4, 0)).unwrap();
        let stream = sender
            .output_stream_to_addr(gro.local_addr().unwrap())
            .unwrap();
        for _ in 0..64 {
            stream.write(vec![9u8; 100]).await.unwrap();
        }
        stream.flush().await.unwrap();
        for _ in 0..64 {
            let datagram = recv(&gro).await;
            assert_eq!(datagram.as_ref(), [9u8; 100], "{backend}");
            assert_eq!(datagram.gro_segment_size(), Some(100), "{backend}");
        }
    });
}

/// A GSO send the kernel refuses for GSO's own sake (here SO_NO_CHECK, which GSO cannot
/// send with) still delivers every datagram, one by one, and the socket stops asking
/// for GSO.
#[test]
fn a_gso_send_refused_for_gso_itself_goes_datagram_by_datagram() {
    util::on_each_backend(|backend: Backend| async move {
        let sender = without_udp_checksums(bound_v4());
        let sink = bound_v4();
        let to = sink.local_addr().unwrap();
        let batch = (0..8u8)
            .map(|i| OutgoingDatagram::new(vec![i; 100], to))
            .collect();
        let results = sender.send_many(batch).await.unwrap();
        assert!(results.iter().all(Result::is_ok), "{backend}: {results:?}");
        for i in 0..8u8 {
            assert_eq!(recv(&sink).await.as_ref(), [i; 100], "{backend}");
        }
        assert!(
            !sender.control().segmentation_offload(),
            "{backend}: GSO refused for its own sake stays on"
        );

        let other = without_udp_checksums(bound_v4());
        let stream = other.output_stream_to_addr(to).unwrap();
        for i in 0..8u8 {
            stream.write(vec![i; 100]).await.unwrap();
        }
        stream.flush().await.unwrap();
        for i in 0..8u8 {
            assert_eq!(recv(&sink).await.as_ref(), [i; 100], "{backend}");
        }
        assert!(!other.control().segmentation_offload(), "{backend}");
    });
}

/// `socket` with SO_NO_CHECK: its datagrams leave without a UDP checksum, which the
/// kernel's GSO cannot do.
fn without_udp_checksums(socket: DatagramSocket) -> DatagramSocket {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a live local of that size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_NO_CHECK");
    socket
}

/// Where the kernel lacks IORING_OP_SEND with a destination (Capability::SendTo, Linux
/// 6.0; disabled here to stand for such a kernel), a flush to an address still sends:
/// a lone datagram and a run of mixed sizes alike go as SENDMSG with the address (the
/// batch path used to put the address on a plain SEND regardless).
#[test]
fn flushes_to_an_address_send_without_the_send_to_capability() {
    for backend in util::BACKENDS {
        let builder = Builder::new()
            .backend(backend)
            .disable(ringsock::Capability::SendTo);
        util::on_runtime_of(builder, backend, &|backend| async move {
            let receiver = util::bound_loopback();
            let to = receiver.local_addr().unwrap();
            let sender = DatagramSocket::new();
            let output = sender.output_stream_to_addr(to).unwrap();
            let sizes = [100usize, 7, 1200, 1200, 1200, 3];
            let mut sent = 0u32;
            for group in [&sizes[..1], &sizes[1..]] {
                for &len in group {
                    let mut datagram = vec![sent as u8; len];
                    datagram[0] = sent as u8;
                    output.write(datagram).await.unwrap();
                    sent += 1;
                }
                must("flush", output.flush()).await.unwrap();
            }
            for (seq, &len) in sizes.iter().enumerate() {
                let datagram = util::recv_datagram(&receiver).await;
                assert_eq!(datagram.len(), len, "{backend}: datagram {seq}");
                assert_eq!(datagram[0], seq as u8, "{backend}: datagram {seq}");
            }
        });
    }
}
