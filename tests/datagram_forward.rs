//! Forward: a received datagram sent on without a copy, on both drivers (and the
//! io_uring receive ring without incremental buffers): the bytes arrive exact while the
//! ring's buffers go round many times, and datagrams lent to sends never hold more than
//! a quarter of the ring, so it never runs dry.

mod util;

use ringsock::{Backend, DatagramSocket, OutgoingDatagram};

#[test]
fn forwarding_keeps_the_bytes_exact_while_the_ring_recycles() {
    util::on_each_receive_path(|_backend: Backend| async move {
        let source = util::bound_loopback();
        let relay = util::small_ring_loopback();
        let other = util::bound_loopback();
        let sink = util::bound_loopback();
        let to_relay = relay.local_addr().unwrap();
        let to_sink = sink.local_addr().unwrap();
        let rounds = 300;
        for round in 0..rounds {
            let len = 1 + (round * 37) % 1500;
            let sent = util::pseudo_random_bytes(round as u64, len);
            source.send_to_addr(sent.clone(), to_relay).await.0.unwrap();
            let forward = util::recv_datagram(&relay).await.into_forward();
            assert!(forward.is_zero_copy(), "round {round}");
            // On from the relay itself, or from another socket.
            let out = if round % 2 == 0 { &relay } else { &other };
            let (result, forward) = out.send_to_addr(forward, to_sink).await;
            assert_eq!(result.unwrap(), len);
            assert_eq!(forward.data(), &sent[..]);
            drop(forward);
            let got = util::recv_datagram(&sink).await;
            assert_eq!(&got[..], &sent[..], "round {round}");
            assert_eq!(got.remote_addr(), out.local_addr().unwrap());
        }
        let stats = relay.receive_stats();
        assert_eq!(stats.datagrams, rounds as u64);
        assert_eq!(stats.buffers_forwarding, 0);
        assert_eq!(stats.buffers_lent, 0);
    });
}

#[test]
fn lent_datagrams_hold_at_most_a_quarter_of_the_ring() {
    util::on_each_receive_path(|_backend: Backend| async move {
        let source = util::bound_loopback();
        let relay = util::small_ring_loopback();
        let to_relay = relay.local_addr().unwrap();
        let mut held = Vec::new();
        for round in 0..3u8 {
            for i in 0..8u8 {
                source
                    .send_to_addr(vec![round, i], to_relay)
                    .await
                    .0
                    .unwrap();
            }
            // Every datagram kept as a Forward: the ring still takes the next ones.
            for i in 0..8u8 {
                let forward = util::recv_datagram(&relay).await.into_forward();
                assert_eq!(forward.data(), &[round, i]);
                held.push(forward);
                let stats = relay.receive_stats();
                let cap = (stats.buffers / 4).max(1);
                assert!(stats.buffers_forwarding <= cap, "{stats:?}");
                assert!(stats.buffers_forwarding >= 1, "{stats:?}");
            }
        }
        assert!(held.iter().any(|f| f.is_zero_copy()));
        if relay.receive_stats().buffers == 8 {
            // One datagram per buffer: only the first two could be lent.
            let lent = held.iter().filter(|f| f.is_zero_copy()).count();
            assert_eq!(lent, 2);
        }
        drop(held);
        assert_eq!(relay.receive_stats().buffers_forwarding, 0);
    });
}

#[test]
fn a_relay_forwards_a_burst_to_64_peers_in_one_batch() {
    util::on_each_receive_path(|_backend: Backend| async move {
        let source = util::bound_loopback();
        let relay = util::bound_loopback();
        let to_relay = relay.local_addr().unwrap();
        let peers: Vec<DatagramSocket> = (0..64).map(|_| util::bound_loopback()).collect();
        let payloads: Vec<Vec<u8>> = (0..64u64)
            .map(|i| util::pseudo_random_bytes(i, 100 + i as usize))
            .collect();
        for payload in &payloads {
            source
                .send_to_addr(payload.clone(), to_relay)
                .await
                .0
                .unwrap();
        }
        let mut batch = Vec::new();
        while batch.len() < 64 {
            let datagram = util::recv_datagram(&relay).await;
            let i = batch.len();
            let to = peers[i].local_addr().unwrap();
            batch.push(OutgoingDatagram::of(datagram.into_forward(), to));
        }
        assert!(batch.iter().any(|d| d.data.is_zero_copy()));
        let results = relay.send_many(batch).await.unwrap();
        for (i, result) in results.iter().enumerate() {
            assert_eq!(*result.as_ref().unwrap(), 100 + i, "datagram {i}");
        }
        // The batch is done with the ring's bytes: every buffer is back.
        let stats = relay.receive_stats();
        assert_eq!((stats.buffers_forwarding, stats.buffers_lent), (0, 0));
        for (peer, payload) in peers.iter().zip(&payloads) {
            let got = util::recv_datagram(peer).await;
            assert_eq!(&got[..], &payload[..]);
            assert_eq!(got.remote_addr(), to_relay);
        }
    });
}
