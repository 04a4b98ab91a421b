//! Errors of real connections and the statuses they map to: refused connections and
//! peers that reset mid-stream, with exactly the errno Linux gives at each step.

mod util;

use std::pin::pin;
use std::task::Poll;

use ringsock::{Error, HostName, SocketErrorStatus, StreamSocket};

/// Port 0 is nobody's: a connect there is InvalidArgument, not the ConnectionRefused the
/// kernel answers as if a server had refused, by address and by host name alike, and the
/// socket can connect elsewhere after.
#[test]
fn connect_to_port_zero_is_invalid_argument() {
    util::on_each_backend(|backend| async move {
        let socket = StreamSocket::new();
        let err = util::must(
            "connect_addr",
            socket.connect_addr("127.0.0.1:0".parse().unwrap()),
        )
        .await
        .expect_err("port 0");
        assert_eq!(
            err.status(),
            SocketErrorStatus::InvalidArgument,
            "{backend}: {err}"
        );
        assert!(err.to_string().contains("port 0"), "{backend}: {err}");
        let host = HostName::new("localhost").unwrap();
        let err = util::must("connect", socket.connect(&host, "0"))
            .await
            .expect_err("port 0");
        assert_eq!(
            err.status(),
            SocketErrorStatus::InvalidArgument,
            "{backend}: {err}"
        );
        let listener = util::std_listener();
        let addr = listener.local_addr().unwrap();
        util::must("connect_addr", socket.connect_addr(addr))
            .await
            .unwrap();
    });
}

#[test]
fn connect_to_a_closed_port_is_refused() {
    util::on_each_backend(|_| async {
        let port = util::free_port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));

        let socket = StreamSocket::new();
        let err = util::must("connect_addr", socket.connect_addr(addr))
            .await
            .expect_err("nothing listens there");
        assert_eq!(err.status(), SocketErrorStatus::ConnectionRefused, "{err}");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED));
        let text = err.to_string();
        assert!(text.starts_with(&format!("connect to {addr}: ")), "{text}");
        assert!(!text.contains('\n'), "{text}");

        // The same through a host name and a service, and the socket stays unconnected
        // (a failed connect leaves it usable for another attempt).
        let host = HostName::new("127.0.0.1").unwrap();
        let err = util::must("connect", socket.connect(&host, &port.to_string()))
            .await
            .expect_err("nothing listens there");
        assert_eq!(err.status(), SocketErrorStatus::ConnectionRefused, "{err}");
        let err = socket.peer_addr().expect_err("still unconnected");
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");

        let err = util::must(
            "connect_to",
            StreamSocket::connect_to(&host, &port.to_string()),
        )
        .await
        .expect_err("nothing listens there");
        assert_eq!(err.status(), SocketErrorStatus::ConnectionRefused, "{err}");

        // The status survives a trip through std::io::Error and back.
        let io: std::io::Error = err.into();
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            Error::from(io).status(),
            SocketErrorStatus::ConnectionRefused
        );
    });
}

#[test]
fn reset_while_a_read_waits_fails_the_read_with_connection_reset() {
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        let (client, mut peer) = util::pair_with_std_peer(&listener).await;
        // Mid-stream: some data first, read exactly.
        std::io::Write::write_all(&mut peer, b"before the reset").unwrap();
        assert_eq!(util::read_exact(&client, 16).await, b"before the reset");

        // A read waiting in the kernel when the RST comes.
        let mut read = pin!(client.read(Vec::with_capacity(64)));
        assert!(util::poll_once(read.as_mut()).await.is_pending());
        util::yield_now().await;
        util::reset(peer);
        let (result, buf) = util::must("read woken by the reset", read).await;
        let err = result.expect_err("read after the peer reset");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{err}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET));
        assert!(buf.is_empty(), "nothing was read");

        // Linux reports the reset once; afterwards reads find an end of stream and
        // writes get EPIPE. ringsock reports both as the reset they come from: a program
        // must not take a connection cut short for one its peer finished.
        for _ in 0..2 {
            let (result, _) = client.read(Vec::with_capacity(64)).await;
            let err = result.expect_err("read after the reported reset");
            assert_eq!(
                err.status(),
                SocketErrorStatus::ConnectionResetByPeer,
                "{err}"
            );
        }
        let err = client
            .input_stream()
            .read_line()
            .await
            .expect_err("read_line after the reported reset");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{err}"
        );
        let (result, _) = client.write(b"too late".to_vec()).await;
        let err = result.expect_err("write after the reset");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{err}"
        );
    });
}

#[test]
fn reset_fails_the_next_write_and_every_write_after_it_with_connection_reset() {
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        let (client, peer) = util::pair_with_std_peer(&listener).await;
        client.write_all(b"hello".to_vec()).await.0.unwrap();
        util::reset(peer);

        // The RST may still be on its way: writes before it lands succeed. Bounded: it
        // is on loopback, so it lands long before this runs out.
        let mut first_error = None;
        for _ in 0..1000 {
            let (result, _) = util::must("write", client.write(b"x".to_vec())).await;
            if let Err(err) = result {
                first_error = Some(err);
                break;
            }
            util::yield_now().await;
        }
        let err = first_error.expect("a write fails once the RST has arrived");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{err}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::ECONNRESET));
        // Later writes get EPIPE from Linux; the cause is still the peer's reset.
        for _ in 0..3 {
            let (result, _) = client.write_all(b"again".to_vec()).await;
            let err = result.expect_err("write after the reported reset");
            assert_eq!(
                err.status(),
                SocketErrorStatus::ConnectionResetByPeer,
                "{err}"
            );
        }
        // The reset was reported by a write; reads say it too, not end of stream.
        let (result, _) = client.read(Vec::with_capacity(8)).await;
        let err = result.expect_err("read after the reported reset");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{err}"
        );
    });
}

#[test]
fn reset_while_a_write_waits_for_room_fails_the_write() {
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        // Small buffers so the peer, which never reads, fills up after a few writes.
        socket2::SockRef::from(&listener)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        let client = StreamSocket::new();
        client.control().set_send_buffer_size(16 * 1024).unwrap();
        util::must(
            "connect",
            client.connect_addr(listener.local_addr().unwrap()),
        )
        .await
        .unwrap();
        let (peer, _) = listener.accept().unwrap();

        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        let mut blocked = None;
        // Bounded: 16 KiB buffers on both sides hold far less than 64 MiB.
        for _ in 0..1024 {
            let mut write = Box::pin(client.write(chunk.clone()));
            let mut outcome = util::poll_once(write.as_mut()).await;
            if outcome.is_pending() {
                // Give io_uring a turn to submit it; a write with room completes in it.
                util::yield_now().await;
                outcome = util::poll_once(write.as_mut()).await;
            }
            match outcome {
                Poll::Ready((result, _)) => sent += result.expect("write before the reset"),
                Poll::Pending => {
                    blocked = Some(write);
                    break;
                }
            }
        }
        let write = blocked.expect("the socket buffers fill up");
        assert!(sent > 0);
        util::reset(peer);
        let (result, _) = util::must("write woken by the reset", write).await;
        let err = result.expect_err("write waiting when the peer reset");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{err}"
        );
        let (result, _) = client.write(b"x".to_vec()).await;
        let err = result.expect_err("write after the reported reset");
        assert_eq!(
            err.status(),
            SocketErrorStatus::ConnectionResetByPeer,
            "{err}"
        );
    });
}

/// Blocks until the kernel has taken the peer's RST for `socket` (poll shows an error or
/// hang-up), without taking the error: it is still there for the next call.
fn wait_for_the_reset_to_arrive(socket: &StreamSocket) {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + util::MUST_HAPPEN;
    loop {
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, 20) };
        if ready > 0 && pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the RST did not arrive"
        );
    }
}

/// A read given up at once (a zero timeout: "anything there now?") may still be the
/// call the kernel tells of a reset that arrived before it: the next read, and every
/// one after, is that reset, not an end of stream that would pass a cut-short stream
/// for a whole one (io_uring: the dropped receive's error used to be thrown away).
#[test]
fn a_reset_a_dropped_read_was_told_of_is_the_next_reads() {
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        let (client, peer) = util::pair_with_std_peer(&listener).await;
        util::reset(peer);
        wait_for_the_reset_to_arrive(&client);
        let quick = ringsock::runtime::timeout(
            std::time::Duration::ZERO,
            client.read(Vec::with_capacity(64)),
        )
        .await;
        if let Ok((result, _)) = quick {
            let err = result.expect_err("a read after the reset arrived");
            assert_eq!(err.status(), SocketErrorStatus::ConnectionResetByPeer);
        }
        for _ in 0..2 {
            let (result, _) = util::must("read", client.read(Vec::with_capacity(64))).await;
            let err = result.expect_err("a read after the reset");
            assert_eq!(
                err.status(),
                SocketErrorStatus::ConnectionResetByPeer,
                "{err}"
            );
        }
    });
}
