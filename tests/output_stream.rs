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
        let refused = out.try_write(vec![9u8; 10]).expect_err("queue full");
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

#[test]
fn copied_writes_arrive_in_order_among_owned_ones_and_complete_with_them() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        let (bufs, all) = writes(21, 3000);
        let mut handles = Vec::new();
        for (i, buf) in bufs.iter().enumerate() {
            // Runs of copies between owned writes, and a copy of nothing now and then.
            let handle = match i % 7 {
                3 => out.write(buf.clone()).await,
                5 => out.write_copy(&[]).await,
                _ => out.write_copy(buf).await,
            }
            .expect("queue a write");
            if i % 250 == 0 {
                handles.push(handle);
            }
        }
        assert_eq!(out.pending_writes(), 3000);
        let (flushed, got) = util::join(
            out.flush(),
            util::read_exact(
                &server,
                all.len() - {
                    // The writes replaced by empty copies.
                    bufs.iter()
                        .enumerate()
                        .filter(|(i, _)| i % 7 == 5)
                        .map(|(_, b)| b.len())
                        .sum::<usize>()
                },
            ),
        )
        .await;
        flushed.expect("flush");
        let expected: Vec<u8> = bufs
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 7 != 5)
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        assert!(got == expected, "bytes differ from the writes");
        for handle in handles {
            assert!(matches!(handle.result(), Some(Ok(()))));
        }
        assert_eq!(out.stats().writes, 3000);
        assert_eq!(out.stats().bytes, expected.len() as u64);
    });
}

#[test]
fn a_run_of_copies_larger_than_the_socket_buffers_completes_only_when_all_of_it_is_sent() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        const WRITES: usize = 8192;
        const SIZE: usize = 4096;
        out.set_config(OutputStreamConfig {
            max_pending_bytes: 2 * WRITES * SIZE,
            max_pending_writes: 2 * WRITES,
        })
        .unwrap();
        let mut expected = Vec::with_capacity(WRITES * SIZE);
        let mut first = None;
        for i in 0..WRITES {
            let buf = util::pseudo_random_bytes(i as u64, SIZE);
            let handle = out.try_write_copy(&buf).expect("room for every write");
            expected.extend_from_slice(&buf);
            first.get_or_insert(handle);
        }
        let first = first.unwrap();
        // 32 MiB cannot all go before the server reads: the flush waits, and the first
        // write of the run is not reported sent before the run's last byte is.
        let mut flush = Box::pin(out.flush());
        assert!(util::poll_once(flush.as_mut()).await.is_pending());
        assert!(
            first.result().is_none(),
            "reported sent with bytes still queued"
        );
        let (flushed, got) = util::join(flush, util::read_exact(&server, expected.len())).await;
        flushed.expect("flush");
        assert!(got == expected, "bytes differ from the writes");
        util::must("the first write", first).await.expect("sent");
    });
}

#[test]
fn try_write_copy_says_none_when_full_or_closed_and_write_copy_says_why() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        out.set_config(OutputStreamConfig {
            max_pending_bytes: 1000,
            max_pending_writes: 4,
        })
        .unwrap();
        for i in 0..4u8 {
            assert!(out.try_write_copy(&[i; 10]).is_some(), "write {i} fits");
        }
        assert!(out.try_write_copy(&[9; 10]).is_none(), "the queue is full");
        out.flush().await.expect("flush");
        let mut sent = Vec::new();
        (0..4u8).for_each(|i| sent.extend_from_slice(&[i; 10]));
        assert_eq!(util::read_exact(&server, 40).await, sent);

        client.close(util::MUST_HAPPEN).await.unwrap();
        assert!(out.try_write_copy(b"late").is_none());
        let err = out.write_copy(b"late").await.expect_err("closed");
        assert_eq!(err.status(), SocketErrorStatus::OperationAborted, "{err}");
    });
}

#[test]
fn copied_writes_on_a_datagram_socket_stay_one_datagram_each() {
    util::on_each_backend(|_| async {
        let receiver = util::bound_loopback();
        let sender = util::bound_loopback();
        let out = sender
            .output_stream_to_addr(receiver.local_addr().unwrap())
            .unwrap();
        let sizes = [1usize, 300, 0, 1200, 7];
        for (i, &len) in sizes.iter().enumerate() {
            drop(out.write_copy(&vec![i as u8; len]).await.expect("queue"));
        }
        out.flush().await.expect("flush");
        for (i, &len) in sizes.iter().enumerate() {
            let datagram = util::recv_datagram(&receiver).await;
            assert_eq!(datagram.as_ref(), &vec![i as u8; len][..], "datagram {i}");
        }
        let err = out
            .write_copy(&vec![0u8; 70_000])
            .await
            .expect_err("too large");
        assert_eq!(err.status(), SocketErrorStatus::MessageTooLong, "{err}");
    });
}

#[test]
fn a_dual_stack_datagram_stream_to_an_ipv4_peer_refuses_what_ipv4_cannot_carry() {
    util::on_each_backend(|_| async {
        let receiver = util::bound_loopback();
        let to = receiver.local_addr().unwrap();
        let sender = ringsock::DatagramSocket::new();
        sender.bind_addr("[::]:0".parse().unwrap()).unwrap();
        let unconnected = sender.output_stream_to_addr(to).unwrap();
        let connected_socket = ringsock::DatagramSocket::new();
        connected_socket
            .bind_addr("[::]:0".parse().unwrap())
            .unwrap();
        connected_socket.connect_addr(to).await.unwrap();
        let connected = connected_socket.output_stream().unwrap();
        for out in [&unconnected, &connected] {
            // Refused when written, not at the flush (which would break the stream and
            // lose the writes after it).
            drop(out.write(&b"first"[..]).await.unwrap());
            let err = out
                .write(vec![0u8; 65_508])
                .await
                .expect_err("too large for IPv4");
            assert_eq!(err.status(), SocketErrorStatus::MessageTooLong, "{err}");
            assert!(out.try_write(vec![0u8; 65_508]).is_err());
            drop(out.write(vec![3u8; 65_507]).await.unwrap());
            out.flush().await.expect("flush");
            assert_eq!(util::recv_datagram(&receiver).await.as_ref(), b"first");
            assert_eq!(util::recv_datagram(&receiver).await.len(), 65_507);
        }
    });
}

#[test]
fn shutdown_write_sends_the_queued_writes_before_the_fin() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        drop(out.write(&b"queued, "[..]).await.unwrap());
        drop(out.write_copy(b"not flushed").await.unwrap());
        client.shutdown_write().await.expect("shutdown");
        let got = util::must(
            "the queued writes, then end of stream",
            util::read_to_end(&server),
        )
        .await;
        assert_eq!(got, b"queued, not flushed");
        // The sending side is closed: a later write fails at once, and says so.
        let err = out
            .write(&b"late"[..])
            .await
            .expect_err("a write after shutdown_write");
        assert_eq!(err.status(), SocketErrorStatus::BrokenPipe, "{err}");
        assert!(err.to_string().contains("shut down"), "{err}");
        assert!(out.try_write(&b"late"[..]).is_err());
        assert!(out.try_write_copy(b"late").is_none());
    });
}

#[test]
fn shutdown_write_on_a_reset_connection_fails_with_the_reset_and_sends_nothing() {
    util::on_each_backend(|backend| async move {
        let listener = util::std_listener();
        let (client, peer) = util::pair_with_std_peer(&listener).await;
        util::reset(peer);
        // The reset has come once a read says so.
        let (read, _) = util::must("the reset", client.read(Vec::with_capacity(16))).await;
        let err = read.expect_err("a read after the peer's reset");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{backend}: {err}"
        );
        // Writes queued after it: shutdown_write tries to send them first, and fails.
        let out = client.output_stream();
        let queued = out.write_copy(b"never sent").await;
        let err = util::must("shutdown_write", client.shutdown_write())
            .await
            .expect_err("shutdown_write on a reset connection");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{backend}: {err}"
        );
        // The queued write reports its failure too (when it was queued at all).
        if let Ok(handle) = queued {
            let sent = util::must("the queued write's result", handle).await;
            assert!(
                sent.is_err(),
                "{backend}: a write on a reset connection was sent"
            );
        }
        // A second shutdown_write fails again, at once.
        let again = util::must("shutdown_write again", client.shutdown_write()).await;
        assert!(again.is_err(), "{backend}: the second shutdown_write");
    });
}
