//! Futures dropped while their operation is in flight: reads, writes, accepts, flushes,
//! line reads. Whatever is given up on, the connection must stay exact afterwards, and on
//! io_uring a dropped operation's buffer must stay alive until its completion arrives.

mod util;

use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use ringsock::runtime::timeout;
use ringsock::{StreamSocket, StreamSocketListener};

/// Bytes of every write that is dropped in flight.
const DROPPED_WRITE: usize = 64;
/// The only byte dropped writes carry, so any other byte before the marker is garbage.
const DROPPED_BYTE: u8 = 0xAA;
/// Ends the dropped writes' bytes; an echo of everything after it follows.
const MARKER: u8 = 0x00;
/// What a buffer freed too early would be reused for, to make such a bug visible.
const DECOY_BYTE: u8 = 0x55;

/// Reads bytes that must all be DROPPED_BYTE up to MARKER, then echoes the rest until
/// end of stream. Returns how many DROPPED_BYTEs arrived.
async fn count_then_echo(socket: StreamSocket) -> usize {
    let mut dropped = 0usize;
    let mut echoing = false;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut total = 0usize;
    // Bounded: every round takes at least one byte, up to the limit, or ends.
    loop {
        assert!(
            total <= util::READ_TO_END_LIMIT,
            "more than the client sends"
        );
        buf.clear();
        let (result, back) = socket.read(buf).await;
        buf = back;
        let n = result.expect("server read");
        if n == 0 {
            break;
        }
        total += n;
        let mut start = 0;
        if !echoing {
            match buf[..n].iter().position(|&b| b != DROPPED_BYTE) {
                None => {
                    dropped += n;
                    continue;
                }
                Some(pos) => {
                    assert_eq!(
                        buf[pos],
                        MARKER,
                        "byte {} of the dropped writes is {:#04x}: not from any write",
                        dropped + pos,
                        buf[pos]
                    );
                    dropped += pos;
                    start = pos + 1;
                    echoing = true;
                }
            }
        }
        if start < n {
            socket
                .write_all(buf[start..n].to_vec())
                .await
                .0
                .expect("server echo");
        }
    }
    dropped
}

/// Starts a read and a write and drops both after one poll, `rounds` times, letting the
/// loop turn every `yield_every` rounds. Returns (bytes known to have been sent, bytes
/// attempted).
async fn drop_reads_and_writes(
    client: &StreamSocket,
    rounds: usize,
    yield_every: usize,
) -> (usize, usize) {
    let mut known_sent = 0;
    let mut decoys = Vec::new();
    for round in 0..rounds {
        // Nothing is sent to the client before the marker: every read must wait.
        let read = timeout(Duration::ZERO, client.read(Vec::with_capacity(256))).await;
        assert!(
            read.is_err(),
            "round {round}: a read completed with no data sent"
        );

        match timeout(
            Duration::ZERO,
            client.write(vec![DROPPED_BYTE; DROPPED_WRITE]),
        )
        .await
        {
            // Completed on the first poll (epoll with room): known to be sent.
            Ok((result, _)) => known_sent += result.expect("write"),
            // Dropped in flight: the kernel may still send it, from the buffer the
            // dropped op must keep. Allocate over where it would be if freed too early.
            Err(_) => decoys.push(vec![DECOY_BYTE; DROPPED_WRITE]),
        }
        if (round + 1) % yield_every == 0 {
            util::yield_now().await;
            decoys.clear();
        }
    }
    (known_sent, rounds * DROPPED_WRITE)
}

#[test]
fn hundred_thousand_dropped_reads_and_writes_leave_the_connection_exact() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        listener
            .control()
            .set_receive_buffer_size(16 * 1024)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let client = StreamSocket::new();
        client.control().set_send_buffer_size(16 * 1024).unwrap();
        util::must("connect", client.connect_addr(addr))
            .await
            .unwrap();
        let server = util::must("accept", listener.accept()).await.unwrap();

        // 1. Nobody reads: fill the buffers until a write has to wait, then drop ops that
        //    all wait in the kernel, with a long run between turns of the loop.
        let mut known_sent = 0;
        let mut attempted = 0;
        let chunk = vec![DROPPED_BYTE; 64 * 1024];
        let mut full = false;
        for _ in 0..1024 {
            attempted += chunk.len();
            let mut write = Box::pin(client.write(chunk.clone()));
            let mut outcome = util::poll_once(write.as_mut()).await;
            if outcome.is_pending() {
                util::yield_now().await;
                outcome = util::poll_once(write.as_mut()).await;
            }
            match outcome {
                std::task::Poll::Ready((result, _)) => known_sent += result.expect("fill"),
                std::task::Poll::Pending => {
                    full = true;
                    break;
                }
            }
        }
        assert!(full, "the socket buffers fill up");
        let (known, tried) = drop_reads_and_writes(&client, 10_000, 2_500).await;
        known_sent += known;
        attempted += tried;

        // 2. The server drains while ops are started and dropped, often with room.
        let server = ringsock::spawn(count_then_echo(server));
        let (known, tried) = drop_reads_and_writes(&client, 40_000, 64).await;
        known_sent += known;
        attempted += tried;

        // 3. The same connection is exact afterwards: the marker, then an echo.
        let data = util::pseudo_random_bytes(42, 1 << 20);
        let mut message = vec![MARKER];
        message.extend_from_slice(&data);
        let (written, echoed) = util::must(
            "echo after the dropped ops",
            util::join(
                client.write_all(message),
                util::read_exact(&client, data.len()),
            ),
        )
        .await;
        written.0.expect("write after the dropped ops");
        assert!(echoed == data, "the echo after the dropped ops differs");
        client.shutdown_write().await.unwrap();
        let dropped = util::must("server", server).await;
        assert!(
            known_sent <= dropped && dropped <= attempted,
            "{dropped} bytes of dropped writes arrived; {known_sent} were known sent, \
             {attempted} attempted"
        );
        assert_eq!(util::read_to_end(&client).await, b"");

        // 4. And a fresh connection on the same runtime works too.
        let echo_server = util::spawn_echo_server(listener, 1);
        let fresh = util::connect(addr).await;
        util::round_trip(&fresh, &util::pseudo_random_bytes(43, 256 * 1024)).await;
        util::must("echo server", echo_server).await;
    });
}

#[test]
fn dropped_accepts_lose_no_connection() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        for _ in 0..1000 {
            let accept = timeout(Duration::ZERO, listener.accept()).await;
            assert!(accept.is_err(), "nothing has connected yet");
        }
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(util::connect(addr).await);
        }
        for (i, client) in clients.iter().enumerate() {
            let server = util::must("accept", listener.accept()).await.unwrap();
            assert_eq!(
                server.peer_addr().unwrap(),
                client.local_addr().unwrap(),
                "connection {i}"
            );
        }
    });
}

#[test]
fn accept_cancelled_while_queued_does_not_stall_the_others() {
    util::on_each_backend(|_| async {
        let listener = Rc::new(util::loopback_listener());
        let addr = listener.local_addr().unwrap();
        let spawn_accept = |listener: &Rc<StreamSocketListener>| {
            let listener = listener.clone();
            ringsock::spawn(async move { listener.accept().await.unwrap().peer_addr().unwrap() })
        };
        // The first takes the listener's turn; the others queue behind it.
        let first = spawn_accept(&listener);
        let cancelled = spawn_accept(&listener);
        let third = spawn_accept(&listener);
        util::yield_now().await;
        cancelled.abort();

        let one = util::connect(addr).await;
        let two = util::connect(addr).await;
        let got = [
            util::must("first accept", first).await,
            util::must("accept queued behind a cancelled one", third).await,
        ];
        assert_eq!(got, [one.local_addr().unwrap(), two.local_addr().unwrap()]);
    });
}

#[test]
fn dropped_flush_does_not_cut_the_batch() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let out = client.output_stream();
        let mut expected = Vec::new();
        for i in 0..2000u32 {
            let buf = util::pseudo_random_bytes(u64::from(i), 1 + (i as usize % 300));
            expected.extend_from_slice(&buf);
            drop(out.write(buf).await.unwrap());
        }
        // Dropped after it started sending, and again after the kernel took some.
        assert!(timeout(Duration::ZERO, out.flush()).await.is_err());
        util::yield_now().await;
        let _ = timeout(Duration::ZERO, out.flush()).await;
        let (flushed, got) =
            util::join(out.flush(), util::read_exact(&server, expected.len())).await;
        flushed.expect("flush");
        assert!(got == expected, "bytes differ from the writes");
    });
}

#[test]
fn dropped_line_read_keeps_the_bytes_already_buffered() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let mut input = client.input_stream();

        server.write_all(b"hel".to_vec()).await.0.unwrap();
        assert_eq!(&input.read_exact(1).await.unwrap()[..], b"h");
        assert_eq!(input.buffered(), b"el");
        // No newline yet: read_line waits for more and is dropped while it waits.
        assert!(timeout(Duration::ZERO, input.read_line()).await.is_err());
        assert_eq!(input.buffered(), b"el", "bytes already received were lost");
        server.write_all(b"lo\nwor".to_vec()).await.0.unwrap();
        let line = util::must("read_line", input.read_line()).await.unwrap();
        assert_eq!(line.as_deref(), Some("ello"));

        // The same for read_exact, which needs more than is buffered.
        assert!(timeout(Duration::ZERO, input.read_exact(5)).await.is_err());
        assert_eq!(input.buffered(), b"wor");
        server.write_all(b"ld".to_vec()).await.0.unwrap();
        let word = util::must("read_exact", input.read_exact(5)).await.unwrap();
        assert_eq!(&word[..], b"world");
    });
}

#[test]
fn reads_dropped_with_bytes_waiting_lose_none_and_keep_the_order() {
    util::on_each_backend(|backend| async move {
        let listener = util::std_listener();
        let (socket, mut peer) = util::pair_with_std_peer(&listener).await;
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for round in 0..300u32 {
            let chunk = round.to_le_bytes().repeat(1 + round as usize % 7);
            std::io::Write::write_all(&mut peer, &chunk).unwrap();
            expected.extend_from_slice(&chunk);
            // Polled once and dropped with the bytes waiting: on io_uring the receive is
            // queued then, and the kernel runs it before the cancel that follows it.
            let drops = 1 + round as usize % 3;
            for _ in 0..drops {
                let mut read = std::pin::pin!(socket.read(Vec::with_capacity(16)));
                if let Poll::Ready((result, buf)) = util::poll_once(read.as_mut()).await {
                    result.unwrap();
                    got.extend_from_slice(&buf);
                }
            }
            if round % 5 == 4 && got.len() < expected.len() {
                let (result, buf) = util::must("a read", socket.read(Vec::with_capacity(8))).await;
                assert!(result.unwrap() > 0, "{backend}: end of stream");
                got.extend_from_slice(&buf);
            }
        }
        while got.len() < expected.len() {
            let read = socket.read(Vec::with_capacity(4096));
            let (result, buf) = util::must("the bytes left", read).await;
            assert!(result.unwrap() > 0, "{backend}: end of stream");
            got.extend_from_slice(&buf);
        }
        assert!(
            got == expected,
            "{backend}: the bytes differ from what was sent"
        );
    });
}
