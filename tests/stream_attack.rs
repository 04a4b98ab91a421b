//! A careless or hostile user of stream sockets and listeners: options the kernel
//! refuses, connections reset before they are accepted, concurrent calls on one socket,
//! connects given up half-way, empty writes.

mod util;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ringsock::{SocketErrorStatus, StreamSocket};

/// The keep-alive idle time the kernel reports for `socket`.
fn kernel_keep_alive(socket: &StreamSocket) -> Option<Duration> {
    let sock = socket2::SockRef::from(socket);
    if !sock.keepalive().expect("SO_KEEPALIVE") {
        return None;
    }
    Some(sock.keepalive_time().expect("TCP_KEEPIDLE"))
}

#[test]
fn a_keep_alive_the_kernel_refuses_is_refused_at_once_and_changes_nothing() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let longest = Duration::from_secs(32767);
        let bad = [
            Duration::from_secs(32768),
            Duration::from_secs(u64::MAX),
            Duration::from_millis(999),
        ];
        // On a listener the option is only remembered: were a bad one kept, every
        // accepted connection would fail to take it and every accept would fail.
        let unconnected = StreamSocket::new();
        for control in [listener.control(), unconnected.control()] {
            for idle in bad {
                let err = control
                    .set_keep_alive(Some(idle))
                    .expect_err("out of range");
                assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
                assert!(err.to_string().contains("out of range"), "{err}");
                assert_eq!(control.keep_alive(), None, "{idle:?} was kept");
            }
            control.set_keep_alive(Some(longest)).expect("the longest");
        }
        util::must("connect", unconnected.connect_addr(addr))
            .await
            .expect("connect with the longest keep-alive");
        let accepted = util::must("accept", listener.accept())
            .await
            .expect("accept with the longest keep-alive");
        assert_eq!(kernel_keep_alive(&unconnected), Some(longest));
        assert_eq!(kernel_keep_alive(&accepted), Some(longest));

        // On a live socket a refused value leaves the kernel's and the getter's alone.
        for idle in bad {
            let err = accepted.control().set_keep_alive(Some(idle)).unwrap_err();
            assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
            assert_eq!(accepted.control().keep_alive(), Some(longest));
            assert_eq!(kernel_keep_alive(&accepted), Some(longest));
        }
        accepted.control().set_keep_alive(None).expect("off");
        assert_eq!(kernel_keep_alive(&accepted), None);
        // Both ends still carry bytes.
        accepted.write_all(b"ok".to_vec()).await.0.expect("write");
        assert_eq!(util::read_exact(&unconnected, 2).await, b"ok");
    });
}

/// What a listener was doing when it was dropped.
#[derive(Debug, Clone, Copy)]
enum LastUse {
    /// An accept was polled and given up.
    AcceptPending,
    /// An accept returned a connection.
    Accepted,
    /// Connections arrived that nobody took (on io_uring, accepted in the background).
    Untaken,
}

#[test]
fn a_dropped_listener_frees_its_address_at_once() {
    util::on_each_backend(|backend| async move {
        for last_use in [LastUse::AcceptPending, LastUse::Accepted, LastUse::Untaken] {
            let listener = util::loopback_listener();
            let addr = listener.local_addr().unwrap();
            let mut keep = Vec::new();
            match last_use {
                LastUse::AcceptPending => {
                    let mut accept = std::pin::pin!(listener.accept());
                    assert!(util::poll_once(accept.as_mut()).await.is_pending());
                }
                LastUse::Accepted => {
                    let (client, server) = util::connected_pair(&listener).await;
                    keep.extend([client, server]);
                }
                LastUse::Untaken => {
                    let (client, server) = util::connected_pair(&listener).await;
                    keep.extend([client, server]);
                    for _ in 0..3 {
                        keep.push(util::connect(addr).await);
                    }
                    util::yield_now().await;
                }
            }
            drop(listener);
            // Nothing listens any more: no handshake completes for a listener that is
            // gone, and the address is free for the next one (on io_uring an accept in
            // flight used to hold the socket until the loop turned).
            let refused = std::net::TcpStream::connect(addr).expect_err("nothing listens");
            assert_eq!(
                refused.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{backend} {last_use:?}"
            );
            let again = ringsock::StreamSocketListener::bind_addr(addr)
                .unwrap_or_else(|err| panic!("{backend} {last_use:?}: rebind: {err}"));
            let (client, server) = util::connected_pair(&again).await;
            server.write_all(b"new".to_vec()).await.0.expect("write");
            assert_eq!(util::read_exact(&client, 3).await, b"new");
        }
    });
}

#[test]
fn a_dropped_socket_ends_the_streams_taken_from_it_and_tells_the_peer() {
    util::on_each_backend(|backend| async move {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let mut input = client.input_stream();
        let output = client.output_stream();
        {
            // A read waiting on the stream when the socket goes.
            let mut reading = std::pin::pin!(input.read(16));
            assert!(util::poll_once(reading.as_mut()).await.is_pending());
            drop(client);
            let err = util::must("the waiting read", reading)
                .await
                .expect_err("the socket was dropped");
            assert_eq!(
                err.status(),
                SocketErrorStatus::OperationAborted,
                "{backend}: {err}"
            );
        }
        let err = input.read_line().await.expect_err("read after the drop");
        assert_eq!(err.status(), SocketErrorStatus::OperationAborted, "{err}");
        let sent = async {
            output.write(b"late".to_vec()).await?;
            output.flush().await
        };
        let err = util::must("write after the drop", sent)
            .await
            .expect_err("write after the drop");
        assert_eq!(err.status(), SocketErrorStatus::OperationAborted, "{err}");
        // The peer sees the end while the streams are still held, and nothing after it.
        let got = util::must("the peer's end of stream", util::read_to_end(&server)).await;
        assert!(got.is_empty(), "{backend}: {got:?}");
    });
}

#[test]
fn a_zero_byte_stream_read_returns_at_once_and_takes_nothing() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let mut input = client.input_stream();
        // Nothing has arrived: it must not wait for the peer.
        let empty = util::must("read(0)", input.read(0)).await.expect("read(0)");
        assert!(empty.is_empty());
        server.write_all(b"abc".to_vec()).await.0.expect("write");
        let got = util::must("read", input.read_exact(3)).await.expect("read");
        assert_eq!(&got[..], b"abc");
        let empty = util::must("read(0)", input.read(0)).await.expect("read(0)");
        assert!(empty.is_empty());
    });
}
