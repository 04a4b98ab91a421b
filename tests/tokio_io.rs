//! tokio's and futures-io's AsyncRead/AsyncWrite on StreamSocket inside a tokio driver:
//! exact bytes both ways, a tokio-util codec, reads dropped mid-way losing nothing, and
//! shutdown sending the FIN.

mod util;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ringsock::StreamSocket;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Framed, LinesCodec};
use util::tokio_rt::on_each_driver_in_tokio;

/// Echoes with tokio's own copy over the socket's traits until end of stream, then
/// shuts its sending side down.
async fn tokio_echo(socket: StreamSocket) -> u64 {
    let (mut reader, mut writer) = tokio::io::split(socket);
    let copied = tokio::io::copy(&mut reader, &mut writer)
        .await
        .expect("echo copy");
    writer.shutdown().await.expect("echo shutdown");
    copied
}

#[test]
fn megabytes_both_ways_through_tokio_traits_are_exact() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let (mut client, server) = util::connected_pair(&listener).await;
        let echo = ringsock::spawn(tokio_echo(server));
        let data = util::pseudo_random_bytes(7, 3 << 20);
        let (received, sent) = tokio::join!(
            async {
                // Uneven pieces, so writes and reads never line up.
                let (mut reader, mut writer) = tokio::io::split(&mut client);
                let writing = async {
                    for piece in data.chunks(70_001) {
                        writer.write_all(piece).await.expect("write_all");
                    }
                    writer.flush().await.expect("flush");
                    writer.shutdown().await.expect("shutdown");
                };
                let reading = async {
                    let mut received = Vec::new();
                    reader
                        .read_to_end(&mut received)
                        .await
                        .expect("read_to_end");
                    received
                };
                tokio::join!(writing, reading).1
            },
            async { util::must("echo", echo).await }
        );
        assert_eq!(received.len(), data.len(), "on {backend}");
        assert!(received == data, "the echo differs on {backend}");
        assert_eq!(sent, data.len() as u64);
    });
}

#[test]
fn a_lines_codec_framed_over_a_stream_socket() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let server = ringsock::spawn(async move {
            let mut lines = Framed::new(server, LinesCodec::new());
            let mut count = 0;
            while let Some(line) = lines.next().await {
                let line = line.expect("server line");
                lines.send(line.to_uppercase()).await.expect("server send");
                count += 1;
            }
            count
        });
        let mut lines = Framed::new(client, LinesCodec::new());
        for i in 0..200 {
            lines
                .send(format!("line {i} on {backend}"))
                .await
                .expect("send");
            let back = lines.next().await.expect("a reply").expect("reply line");
            assert_eq!(
                back,
                format!("LINE {i} ON {}", backend.to_string().to_uppercase())
            );
        }
        // Ending the client's side ends the server's loop.
        lines.get_mut().shutdown().await.expect("shutdown");
        assert_eq!(util::must("server", server).await, 200);
    });
}

/// A read dropped while its receive waits (tokio's timeout gives up on it) keeps the
/// receive in the socket; the bytes it brings go to the next read.
#[test]
fn reads_dropped_mid_way_lose_nothing() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let (mut client, server) = util::connected_pair(&listener).await;
        for round in 0..50u8 {
            let mut buf = [0u8; 16];
            let gave_up =
                tokio::time::timeout(Duration::ZERO, AsyncReadExt::read(&mut client, &mut buf))
                    .await;
            assert!(
                gave_up.is_err(),
                "round {round}: a read completed with nothing sent"
            );
            let message = [round; 5];
            server.write_all(message.to_vec()).await.0.expect("write");
            let mut got = [0u8; 5];
            client.read_exact(&mut got).await.expect("read_exact");
            assert_eq!(got, message, "round {round} on {backend}");
        }
    });
}

/// Shutdown sends what was written, then the FIN; reading goes on afterwards.
#[test]
fn shutdown_sends_everything_then_end_of_stream() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let (mut client, server) = util::connected_pair(&listener).await;
        AsyncWriteExt::write_all(&mut client, b"last words")
            .await
            .expect("write");
        client.shutdown().await.expect("shutdown");
        let got = util::read_to_end(&server).await;
        assert_eq!(got, b"last words", "on {backend}");
        server.write_all(b"reply".to_vec()).await.0.expect("reply");
        server.shutdown_write().await.expect("server shutdown");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap_or_else(|err| {
            panic!("read after shutdown on {backend}: {err}");
        });
        assert_eq!(reply, b"reply");
        let err = AsyncWriteExt::write_all(&mut client, b"more")
            .await
            .expect_err("write after shutdown");
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    });
}

#[test]
fn futures_io_traits_round_trip() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let (mut client, server) = util::connected_pair(&listener).await;
        let echo = ringsock::spawn(util::echo(server));
        let data = util::pseudo_random_bytes(11, 256 * 1024);
        futures_util::io::AsyncWriteExt::write_all(&mut client, &data)
            .await
            .expect("write_all");
        futures_util::io::AsyncWriteExt::close(&mut client)
            .await
            .expect("close");
        let mut back = Vec::new();
        futures_util::io::AsyncReadExt::read_to_end(&mut client, &mut back)
            .await
            .expect("read_to_end");
        assert!(back == data, "the echo differs on {backend}");
        assert_eq!(util::must("echo", echo).await, data.len());
    });
}

#[test]
fn an_unconnected_socket_fails_clearly_through_the_traits() {
    on_each_driver_in_tokio(|_| async {
        let mut socket = StreamSocket::new();
        let err = AsyncWriteExt::write_all(&mut socket, b"x")
            .await
            .expect_err("not connected");
        assert!(err.to_string().contains("not connected"), "{err}");
        let mut buf = [0u8; 4];
        let err = AsyncReadExt::read(&mut socket, &mut buf)
            .await
            .expect_err("not connected");
        assert!(err.to_string().contains("not connected"), "{err}");
    });
}

/// The traits used where the socket's driver is not current fail with WrongRuntime,
/// and the socket goes on working where it belongs.
#[test]
fn the_traits_outside_run_until_are_wrong_runtime() {
    util::tokio_rt::with_each_driver_in_tokio(|backend, mut driver| async move {
        let (mut client, server) = driver
            .run_until(async {
                let listener = util::loopback_listener();
                util::connected_pair(&listener).await
            })
            .await;
        let err = AsyncWriteExt::write_all(&mut client, b"outside")
            .await
            .expect_err("a write outside run_until");
        assert_eq!(
            ringsock::SocketErrorStatus::from_io(&err),
            ringsock::SocketErrorStatus::WrongRuntime,
            "{err} on {backend}"
        );
        let mut buf = [0u8; 8];
        let err = AsyncReadExt::read(&mut client, &mut buf)
            .await
            .expect_err("a read outside run_until");
        assert_eq!(
            ringsock::SocketErrorStatus::from_io(&err),
            ringsock::SocketErrorStatus::WrongRuntime,
            "{err} on {backend}"
        );
        driver
            .run_until(async {
                AsyncWriteExt::write_all(&mut client, b"inside")
                    .await
                    .expect("write");
                AsyncWriteExt::flush(&mut client).await.expect("flush");
                assert_eq!(util::read_exact(&server, 6).await, b"inside");
            })
            .await;
    });
}

/// Bytes written through tokio's AsyncWrite (queued on the socket's output stream) and
/// then through the socket's own `write_all` and `write` reach the peer in the order
/// they were written.
#[test]
fn async_write_then_the_sockets_own_writes_keep_the_order() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let (mut client, server) = util::connected_pair(&listener).await;
        let first = vec![b'A'; 4 << 20];
        let reader = ringsock::spawn(async move { util::read_to_end(&server).await });
        AsyncWriteExt::write_all(&mut client, &first)
            .await
            .expect("AsyncWrite");
        let (result, _) = StreamSocket::write_all(&client, vec![b'B'; 1000]).await;
        result.expect("write_all");
        AsyncWriteExt::write_all(&mut client, b"C")
            .await
            .expect("AsyncWrite");
        let (result, _) = StreamSocket::write(&client, vec![b'D'; 10]).await;
        assert!(result.expect("write") > 0);
        AsyncWriteExt::shutdown(&mut client)
            .await
            .expect("shutdown");
        let received = util::must("the peer's bytes", reader).await;
        let mut expected = first;
        expected.extend_from_slice(&[b'B'; 1000]);
        expected.push(b'C');
        assert!(
            received.starts_with(&expected)
                && received[expected.len()..].iter().all(|&b| b == b'D'),
            "{backend}: {} bytes, first B at {:?}",
            received.len(),
            received.iter().position(|&b| b == b'B')
        );
    });
}

/// Bytes AsyncRead received ahead of its caller (it asks the kernel for 64 KiB at a
/// time) come first for the socket's own `read` and for an `InputStream`: nothing is
/// skipped or reordered when a program switches from one to the other.
#[test]
fn the_sockets_own_reads_after_async_read_get_the_bytes_it_read_ahead() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let (writer, mut reader) = util::connected_pair(&listener).await;
        let data = util::pseudo_random_bytes(11, 200_000);
        let sent = data.clone();
        let sending = ringsock::spawn(async move {
            let (result, _) = writer.write_all(sent).await;
            result.expect("write_all");
            writer.shutdown_write().await.expect("shutdown_write");
        });
        let mut first = [0u8; 10];
        AsyncReadExt::read_exact(&mut reader, &mut first)
            .await
            .expect("read_exact");
        let mut received = first.to_vec();
        let (result, buf) = reader.read(Vec::with_capacity(1000)).await;
        let n = result.expect("read");
        received.extend_from_slice(&buf[..n]);
        let mut input = reader.input_stream();
        let piece = input.read_exact(7).await.expect("InputStream");
        received.extend_from_slice(&piece);
        drop(input);
        received.extend(util::read_to_end(&reader).await);
        util::must("the writer", sending).await;
        assert_eq!(received.len(), data.len(), "{backend}");
        assert!(received == data, "{backend}: bytes skipped or reordered");
    });
}

/// A receive AsyncRead left in flight (polled once, nothing there yet) does not take
/// bytes away from the socket's own `read` that comes next.
#[test]
fn a_receive_async_read_left_in_flight_gives_its_bytes_to_the_next_read() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let (writer, mut reader) = util::connected_pair(&listener).await;
        {
            let mut buf = [0u8; 16];
            let mut pending = std::pin::pin!(AsyncReadExt::read(&mut reader, &mut buf));
            assert!(util::poll_once(pending.as_mut()).await.is_pending());
        }
        let (result, _) = writer.write_all(b"after the poll".to_vec()).await;
        result.expect("write_all");
        let got = util::must("the bytes", util::read_exact(&reader, 14)).await;
        assert_eq!(got, b"after the poll", "{backend}");
    });
}
