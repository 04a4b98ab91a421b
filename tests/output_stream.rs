//! OutputStream: queued writes, flush, write handles, back-pressure, failures.

mod util;

use bytes::Bytes;
use ringsock::net::OutputStreamConfig;
use ringsock::SocketErrorStatus;

/// `count` writes of pseudo-random sizes (1..=700 bytes) and contents, and their
/// concatenation.
fn writes(seed: u64, count: usize) -> (Vec<Bytes>, Vec<u8>) {
    let sizes = util::pseudo_random_bytes(seed, count * 2);
    let mut all = Vec::new();
    let bufs = (0..count)
        .map(|i| {
            let len = 1 + (u16::from_le_bytes([sizes[2 * i], sizes[2 * i + 1]]) % 700) as usize;
            let buf = util::pseudo_random_bytes(seed * 100_000 + i as u64, len);
            all.extend_from_slice(&buf);
            Bytes::from(buf)
        })
        .collect();
    (bufs, all)
}

#[test]
fn writes_then_flush_deliver_every_byte_in_order() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        // More writes than one sendmsg takes (1024 iovecs), so io_uring chains them.
        let mut expected = Vec::new();
        let mut queued = 0u64;
        for (round, count) in [(1u64, 3000usize), (2, 1), (3, 1025)] {
            let (bufs, all) = writes(round, count);
            for buf in bufs {
                drop(out.write(buf).await.expect("queue a write"));
            }
            queued += count as u64;
            assert_eq!(out.pending_writes(), count as u64, "queued, not yet sent");
            let (flushed, got) =
                util::join(out.flush(), util::read_exact(&server, all.len())).await;
            flushed.expect("flush");
            assert!(got == all, "round {round}: bytes differ from the writes");
            assert_eq!(out.pending_writes(), 0);
            expected.extend_from_slice(&all);
        }
        let stats = out.stats();
        assert_eq!(stats.writes, queued);
        assert_eq!(stats.bytes, expected.len() as u64);
        assert!(stats.batches >= 3, "{stats:?}");
    });
}

#[test]
fn flush_with_nothing_queued_returns_at_once() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        let mut flush = std::pin::pin!(out.flush());
        match util::poll_once(flush.as_mut()).await {
            std::task::Poll::Ready(result) => result.expect("empty flush"),
            std::task::Poll::Pending => panic!("a flush with nothing queued waited"),
        }
        assert_eq!(out.stats().batches, 0, "nothing was sent");

        // Once everything has been sent, the next flush has nothing to wait for either.
        drop(out.write(&b"once"[..]).await.unwrap());
        out.flush().await.expect("flush");
        let mut flush = std::pin::pin!(out.flush());
        assert!(matches!(
            util::poll_once(flush.as_mut()).await,
            std::task::Poll::Ready(Ok(()))
        ));
        assert_eq!(util::read_exact(&server, 4).await, b"once");
    });
}

#[test]
fn write_handle_awaited_alone_sends_its_write() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        let first = out.write(&b"first "[..]).await.unwrap();
        let second = out.write(&b"second"[..]).await.unwrap();
        // Queued without a system call: nothing has been sent.
        assert_eq!(out.pending_writes(), 2);
        assert_eq!(out.stats().batches, 0);
        assert!(first.result().is_none() && second.result().is_none());

        // Awaiting the second handle, without any flush, sends it and what precedes it.
        util::must("write handle", second)
            .await
            .expect("second write");
        assert!(matches!(first.result(), Some(Ok(()))));
        assert_eq!(util::read_exact(&server, 12).await, b"first second");
        util::must("write handle", first)
            .await
            .expect("first write");
        assert_eq!(out.pending_writes(), 0);

        // And a lone write awaited through its handle.
        let third = out.write(vec![3u8; 100_000]).await.unwrap();
        let (result, got) = util::join(third, util::read_exact(&server, 100_000)).await;
        result.expect("third write");
        assert_eq!(got, vec![3u8; 100_000]);
    });
}

#[test]
fn every_output_stream_of_a_socket_is_the_same_stream() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let a = client.output_stream();
        let b = client.output_stream();
        drop(a.write(&b"from a, "[..]).await.unwrap());
        drop(b.write(&b"from b"[..]).await.unwrap());
        // One stream: b's flush sends a's earlier write too, in order.
        util::must("flush", b.flush()).await.expect("flush");
        assert_eq!(a.pending_writes(), 0, "a's write was sent by b's flush");
        assert_eq!(util::read_exact(&server, 14).await, b"from a, from b");
        assert_eq!(a.stats(), b.stats());
    });
}

#[test]
fn full_queue_makes_write_wait_and_keeps_order() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        let err = out
            .set_config(OutputStreamConfig {
                max_pending_bytes: 0,
                max_pending_writes: 4,
            })
            .expect_err("zero bytes");
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        out.set_config(OutputStreamConfig {
            max_pending_bytes: 1000,
            max_pending_writes: 4,
        })
        .unwrap();

        // try_write gives the buffer back once four writes are pending.
        for i in 0..4u8 {
            assert!(out.try_write(vec![i; 10]).is_ok(), "write {i} fits");
        }
        let refused = out.try_write(vec![9u8; 10]).err().expect("queue full");
        assert_eq!(refused, vec![9u8; 10]);
        out.flush().await.expect("flush");
        assert_eq!(util::read_exact(&server, 40).await, {
            let mut v = Vec::new();
            (0..4u8).for_each(|i| v.extend_from_slice(&[i; 10]));
            v
        });

        // `write` waits for room instead: 500 writes through a queue of four, no flush
        // until the end, all delivered in order.
        let (bufs, all) = writes(11, 500);
        let writer = async {
            for buf in bufs {
                drop(out.write(buf).await.expect("write"));
                assert!(out.pending_writes() <= 4);
            }
            out.flush().await.expect("flush");
        };
        let ((), got) = util::join(writer, util::read_exact(&server, all.len())).await;
        assert!(got == all, "bytes differ from the writes");
    });
}

#[test]
fn dropping_the_socket_still_sends_queued_writes() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        // The last OutputStream gone, with the socket that keeps one: queued writes are
        // sent, then the connection closes, as a closed socket still delivers its send
        // buffer. A write handle still alive does not hold them back.
        for keep_a_handle in [false, true] {
            let (client, server) = util::connected_pair(&listener).await;
            let out = client.output_stream();
            drop(out.write(&b"queued "[..]).await.unwrap());
            let kept = out.write(&b"and kept"[..]).await.unwrap();
            drop(out);
            if !keep_a_handle {
                drop(kept);
                drop(client);
            } else {
                drop(client);
                assert!(kept.result().is_none(), "nothing flushed it yet");
                let got = util::must("queued writes", util::read_exact(&server, 15)).await;
                assert_eq!(got, b"queued and kept", "sent while a handle lives");
                util::must("the kept write", kept).await.unwrap();
            }
            let got = util::must("queued writes", util::read_to_end(&server)).await;
            let expected: &[u8] = if keep_a_handle {
                b""
            } else {
                b"queued and kept"
            };
            assert_eq!(got, expected, "keep_a_handle: {keep_a_handle}");
        }

        // The same while a batch is in flight: a write queued behind it is still sent.
        // The first write is larger than both socket buffers, so the flush cannot send
        // it at once (the rest is in flight) while the server reads nothing; the queue
        // is made large enough to take the second write meanwhile.
        const FIRST: usize = 32 << 20;
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        out.set_config(ringsock::net::OutputStreamConfig {
            max_pending_bytes: 2 * FIRST,
            ..Default::default()
        })
        .unwrap();
        drop(out.write(vec![1u8; FIRST]).await.unwrap());
        let mut flush = Box::pin(out.flush());
        assert!(util::poll_once(flush.as_mut()).await.is_pending());
        util::yield_now().await;
        drop(out.write(vec![2u8; 1000]).await.unwrap());
        drop(flush);
        drop(out);
        drop(client);
        let got = util::must("queued writes", util::read_to_end(&server)).await;
        assert_eq!(got.len(), FIRST + 1000);
        assert!(got[..FIRST].iter().all(|&b| b == 1) && got[FIRST..].iter().all(|&b| b == 2));
    });
}

#[test]
fn writes_after_a_reset_fail_with_the_resets_status() {
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        let (client, peer) = util::pair_with_std_peer(&listener).await;
        let out = client.output_stream();
        out.write(&b"hello"[..]).await.unwrap().await.unwrap();
        util::reset(peer);

        // Writes before the RST lands succeed; bounded, it is on loopback.
        let mut failure = None;
        for _ in 0..1000 {
            let handle = out.write(&b"x"[..]).await.expect("queue");
            if let Err(err) = util::must("flush", out.flush()).await {
                assert!(matches!(handle.result(), Some(Err(_))));
                failure = Some(err);
                break;
            }
            util::yield_now().await;
        }
        let err = failure.expect("a flush fails once the RST has arrived");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{err}"
        );

        // The stream is broken for good, and says why: the reset, not a later EPIPE.
        for _ in 0..3 {
            let handle = out.write(&b"more"[..]).await.expect("queue after failure");
            let err = handle.result().expect("known at once").unwrap_err();
            assert_eq!(
                err.status(),
                SocketErrorStatus::ConnectionResetByPeer,
                "{err}"
            );
            let err = util::must("handle", handle).await.unwrap_err();
            assert_eq!(
                err.status(),
                SocketErrorStatus::ConnectionResetByPeer,
                "{err}"
            );
            let err = util::must("flush", out.flush()).await.unwrap_err();
            assert_eq!(
                err.status(),
                SocketErrorStatus::ConnectionResetByPeer,
                "{err}"
            );
        }
    });
}
