//! StreamSocket: connecting, reading, writing, half-close, bulk and concurrent transfers.

mod util;

use std::rc::Rc;

use ringsock::{Error, HostName, SocketErrorStatus, StreamSocket, StreamSocketListener};

#[test]
fn echo_of_a_line() {
    util::on_each_backend(|_| async {
        let listener =
            StreamSocketListener::bind_host(&HostName::new("127.0.0.1").unwrap(), "0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await.unwrap();
            let mut input = socket.input_stream();
            let line = input.read_line().await.unwrap().unwrap();
            socket
                .write_all(format!("{line}\n").into_bytes())
                .await
                .0
                .unwrap();
            line
        });
        let socket = StreamSocket::new();
        socket
            .connect(&HostName::new("localhost").unwrap(), &port)
            .await
            .unwrap();
        socket
            .write_all(b"Hello, World!\n".to_vec())
            .await
            .0
            .unwrap();
        let reply = socket.input_stream().read_line().await.unwrap();
        assert_eq!(reply.as_deref(), Some("Hello, World!"));
        assert_eq!(util::must("server", server).await, "Hello, World!");
    });
}

/// Connections open at once in `thousand_concurrent_connections_echo_exactly`.
const CONNECTIONS: usize = 1000;
/// Bytes each of them echoes.
const PER_CONNECTION: usize = 64 * 1024;

#[test]
fn thousand_concurrent_connections_echo_exactly() {
    // Each connection is two descriptors in this process, plus the listener and rings.
    util::raise_nofile(2 * CONNECTIONS as u64 + 64);
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let server = util::spawn_echo_server(listener, CONNECTIONS);
        // Every client waits here once connected: all of them are open at the same time.
        let all_connected = util::Barrier::new(CONNECTIONS);
        let clients: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                let all_connected = all_connected.clone();
                ringsock::spawn(async move {
                    let socket = Rc::new(util::connect(addr).await);
                    all_connected.wait().await;
                    let data = util::pseudo_random_bytes(i as u64, PER_CONNECTION);
                    // Writing on its own task: the echo comes back while we still send.
                    let writer = ringsock::spawn({
                        let socket = socket.clone();
                        async move {
                            let (result, data) = socket.write_all(data).await;
                            result.expect("client write");
                            socket.shutdown_write().await.expect("client shutdown");
                            data
                        }
                    });
                    let echoed = util::read_to_end(&socket).await;
                    let data = writer.await;
                    assert_eq!(echoed.len(), data.len(), "connection {i}: length");
                    assert!(echoed == data, "connection {i}: echo differs");
                })
            })
            .collect();
        for (i, client) in clients.into_iter().enumerate() {
            util::must(&format!("connection {i}"), client).await;
        }
        util::must("echo server", server).await;
    });
}

/// Size of the one-way transfer: 256 MiB in every build (a debug build moves it on both
/// drivers in well under a second, so there is no need to shrink it).
const ONE_WAY_BYTES: usize = 256 << 20;
/// Unit of the one-way transfer: a chunk index followed by a fixed pseudo-random block.
const CHUNK: usize = 1 << 20;

#[test]
fn one_way_transfer_arrives_complete_and_in_order() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        // Each chunk is the same pseudo-random block with its index in the first 8 bytes:
        // a lost, repeated, reordered or corrupted byte anywhere changes what is compared.
        let block = Rc::new(util::pseudo_random_bytes(7, CHUNK));
        let sender = ringsock::spawn({
            let block = block.clone();
            async move {
                let mut chunk = block.to_vec();
                for index in 0..(ONE_WAY_BYTES / CHUNK) as u64 {
                    chunk[..8].copy_from_slice(&index.to_le_bytes());
                    let (result, back) = client.write_all(chunk).await;
                    result.expect("sender write");
                    chunk = back;
                }
                client.shutdown_write().await.expect("sender shutdown");
            }
        });
        let mut received = 0usize;
        let mut buf = Vec::with_capacity(256 * 1024);
        loop {
            buf.clear();
            let (result, back) = server.read(buf).await;
            buf = back;
            let n = result.expect("receiver read");
            if n == 0 {
                break;
            }
            // Compare piece by piece, splitting at chunk boundaries.
            let mut piece = &buf[..n];
            while !piece.is_empty() {
                let offset = received % CHUNK;
                let index = (received / CHUNK) as u64;
                let len = piece.len().min(CHUNK - offset);
                let mut expected = block[offset..offset + len].to_vec();
                let header = index.to_le_bytes();
                for (i, byte) in expected.iter_mut().enumerate().take(8 - offset.min(8)) {
                    *byte = header[offset + i];
                }
                assert!(
                    piece[..len] == expected[..],
                    "content differs in the {len} bytes from offset {received}"
                );
                received += len;
                piece = &piece[len..];
            }
            assert!(received <= ONE_WAY_BYTES, "more bytes than were sent");
        }
        assert_eq!(received, ONE_WAY_BYTES);
        util::must("sender", sender).await;
    });
}

#[test]
fn half_close_lets_the_server_answer_after_end_of_stream() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let server = ringsock::spawn(async move {
            // Everything up to end of stream, then an answer on the still open direction.
            let request = util::read_to_end(&server).await;
            let mut answer = b"got ".to_vec();
            answer.extend_from_slice(&request);
            server.write_all(answer).await.0.expect("server write");
            server.shutdown_write().await.expect("server shutdown");
            // After its own FIN the server still sees end of stream, not an error.
            let (n, _) = server.read(Vec::with_capacity(8)).await;
            assert_eq!(n.expect("read after both FINs"), 0);
        });
        client
            .write_all(b"request".to_vec())
            .await
            .0
            .expect("client write");
        client.shutdown_write().await.expect("client shutdown");
        assert_eq!(util::read_to_end(&client).await, b"got request");
        util::must("server", server).await;

        // Writing after shutdown_write fails with BrokenPipe (EPIPE), not silently.
        let (result, _) = client.write(b"late".to_vec()).await;
        let err = result.expect_err("write after shutdown_write");
        assert_eq!(err.status(), SocketErrorStatus::BrokenPipe, "{err}");
    });
}

#[test]
fn read_needs_spare_capacity() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        // Neither an empty Vec nor a full one may hang waiting for data it cannot take.
        for buf in [Vec::new(), vec![1u8; 16]] {
            let before = buf.clone();
            let (result, back) = util::must("read", client.read(buf)).await;
            let err = result.expect_err("read into a buffer without spare capacity");
            assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
            assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
            assert!(err.to_string().contains("spare capacity"), "{err}");
            assert_eq!(back, before, "the buffer comes back unchanged");
        }
        // The socket still works, and a read appends after the initialised part.
        server
            .write_all(b"abc".to_vec())
            .await
            .0
            .expect("server write");
        let mut buf = Vec::with_capacity(16);
        buf.extend_from_slice(b"xy");
        let (result, buf) = client.read(buf).await;
        assert_eq!(result.expect("read"), 3);
        assert_eq!(buf, b"xyabc");
    });
}

#[test]
fn unconnected_socket_reports_invalid_argument() {
    util::on_each_backend(|_| async {
        let socket = StreamSocket::new();
        let statuses = [
            socket.read(Vec::with_capacity(8)).await.0.map(drop),
            socket.write(b"x".to_vec()).await.0.map(drop),
            socket.write_all(b"x".to_vec()).await.0,
            socket.shutdown_write().await,
            socket.local_addr().map(drop),
            socket.peer_addr().map(drop),
            socket.output_stream().write(b"x".to_vec()).await.map(drop),
        ];
        for (i, result) in statuses.into_iter().enumerate() {
            let err = result.expect_err("operation on an unconnected socket");
            assert_eq!(
                err.status(),
                SocketErrorStatus::InvalidArgument,
                "{i}: {err}"
            );
            assert!(err.to_string().contains("not connected"), "{i}: {err}");
        }
        let err = socket
            .input_stream()
            .read_line()
            .await
            .expect_err("read_line on an unconnected socket");
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
    });
}

#[test]
fn connect_twice_is_rejected() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let socket = util::connect(addr).await;
        let local = socket.local_addr().unwrap();
        let err = socket
            .connect_addr(addr)
            .await
            .expect_err("second connect_addr");
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        let err = socket
            .connect(
                &HostName::new("127.0.0.1").unwrap(),
                &addr.port().to_string(),
            )
            .await
            .expect_err("second connect");
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        assert!(err.to_string().contains("already connected"), "{err}");
        // The first connection is untouched.
        assert_eq!(socket.local_addr().unwrap(), local);
        assert_eq!(socket.peer_addr().unwrap(), addr);
    });
}

#[test]
fn addresses_of_both_ends_match() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        assert_eq!(client.peer_addr().unwrap(), listener.local_addr().unwrap());
        assert_eq!(server.local_addr().unwrap(), listener.local_addr().unwrap());
        assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
        assert_ne!(client.local_addr().unwrap().port(), 0);
    });
}

#[test]
fn options_set_before_connect_apply_to_the_connection() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let socket = StreamSocket::new();
        assert!(socket.control().no_delay(), "Nagle is off by default");
        socket.control().set_no_delay(false).unwrap();
        socket.control().set_send_buffer_size(64 * 1024).unwrap();
        let err = socket.control().set_send_buffer_size(0).unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        let err = socket.control().send_buffer_size().unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        util::must("connect", socket.connect_addr(addr))
            .await
            .unwrap();
        assert!(!socket.control().no_delay());
        // Linux doubles the requested size for its bookkeeping.
        assert_eq!(socket.control().send_buffer_size().unwrap(), 128 * 1024);
    });
}

/// Lines that arrive together, read each through a new `input_stream()`: the one that
/// took them all gives the rest back when dropped, so none is lost and the order holds,
/// also for a plain `read` after it.
#[test]
fn an_input_stream_dropped_with_bytes_buffered_gives_them_back() {
    util::on_each_backend(|_| async {
        let listener =
            StreamSocketListener::bind_host(&HostName::new("127.0.0.1").unwrap(), "0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await.unwrap();
            // One write: the client's first read takes every line at once.
            socket
                .write_all(b"one\ntwo\nthree\ntail".to_vec())
                .await
                .0
                .unwrap();
            socket.shutdown_write().await.unwrap();
            socket
        });
        let socket = StreamSocket::new();
        socket
            .connect(&HostName::new("127.0.0.1").unwrap(), &port)
            .await
            .unwrap();
        let mut first = socket.input_stream();
        assert_eq!(first.read_line().await.unwrap().as_deref(), Some("one"));
        // One small write on loopback is one segment: the first fill took it all.
        assert_eq!(first.buffered(), b"two\nthree\ntail");
        drop(first);
        assert_eq!(
            socket.input_stream().read_line().await.unwrap().as_deref(),
            Some("two")
        );
        assert_eq!(
            socket.input_stream().read_line().await.unwrap().as_deref(),
            Some("three")
        );
        let (read, buf) = socket.read(Vec::with_capacity(64)).await;
        assert_eq!(&buf[..read.unwrap()], b"tail");
        let (read, _) = socket.read(Vec::with_capacity(64)).await;
        assert_eq!(read.unwrap(), 0, "end of stream after every byte");
        drop(server.await);
    });
}

/// A std peer that reads only once `go` says so, to the end: what a `write_all` to it
/// blocks on until then.
fn held_reader(
    mut peer: std::net::TcpStream,
) -> (
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<Vec<u8>>,
) {
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let reading = std::thread::spawn(move || {
        wait.recv_timeout(util::MUST_HAPPEN).expect("the go");
        peer.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
        let mut received = Vec::new();
        std::io::Read::read_to_end(&mut peer, &mut received).expect("read to the end");
        received
    });
    (go, reading)
}

/// Bytes a held-up `write_all` sends.
const BIG: usize = 8 << 20;

/// A client whose task writes [`BIG`] bytes with `write_all` to a peer that reads only
/// once `go` says so: the client, `go`, the peer's reading thread and the writing task.
async fn a_write_all_held_up(
    listener: &std::net::TcpListener,
) -> (
    Rc<StreamSocket>,
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<Vec<u8>>,
    ringsock::JoinHandle<ringsock::Result<()>>,
) {
    let (client, peer) = util::pair_with_std_peer(listener).await;
    let (go, reading) = held_reader(peer);
    let client = Rc::new(client);
    let writing = ringsock::spawn({
        let client = client.clone();
        async move { client.write_all(vec![b'A'; BIG]).await.0 }
    });
    util::yield_now().await;
    util::yield_now().await;
    (client, go, reading, writing)
}

/// Bytes queued on the output stream and flushed by another task while a `write_all`
/// waits for room go out after the whole of it, never in its middle (they landed at
/// about 4 MB of an 8 MB `write_all` on io_uring). Either order of the two is right.
#[test]
fn an_output_stream_flushed_during_a_write_all_does_not_land_inside_it() {
    util::on_each_backend(|backend| async move {
        let listener = util::std_listener();
        let (client, go, reading, writing) = a_write_all_held_up(&listener).await;
        let flushing = ringsock::spawn({
            let client = client.clone();
            async move {
                let output = client.output_stream();
                output.write(vec![b'B'; 100]).await.expect("write");
                output.flush().await.expect("flush");
            }
        });
        util::yield_now().await;
        util::yield_now().await;
        go.send(()).unwrap();
        util::must("write_all", writing).await.expect("write_all");
        util::must("flush", flushing).await;
        client.shutdown_write().await.expect("shutdown_write");
        let received = util::join_thread(reading).await;
        assert_eq!(received.len(), BIG + 100, "{backend}");
        let first_b = received.iter().position(|&b| b == b'B').unwrap();
        assert!(
            first_b == 0 || first_b == BIG,
            "{backend}: the flushed bytes landed at {first_b}, inside the write_all"
        );
    });
}

/// `shutdown_write` from another task while a `write_all` waits for room sends its FIN
/// after the last byte of it: the peer reads every byte, then the end of stream.
#[test]
fn shutdown_write_during_a_write_all_waits_for_its_last_byte() {
    util::on_each_backend(|backend| async move {
        let listener = util::std_listener();
        let (client, go, reading, writing) = a_write_all_held_up(&listener).await;
        let shutting = ringsock::spawn({
            let client = client.clone();
            async move { client.shutdown_write().await }
        });
        util::yield_now().await;
        util::yield_now().await;
        go.send(()).unwrap();
        util::must("write_all", writing)
            .await
            .expect("write_all, cut by the shutdown");
        util::must("shutdown_write", shutting)
            .await
            .expect("shutdown_write");
        let received = util::join_thread(reading).await;
        assert_eq!(received.len(), BIG, "{backend}");
    });
}
