//! A careless or hostile user of stream sockets and listeners: options the kernel
//! refuses, connections reset before they are accepted, concurrent calls on one socket,
//! connects given up half-way, empty writes.

mod util;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ringsock::{SocketErrorStatus, StreamSocket};

/// Sends `bytes` from one end and checks that the other end reads exactly them.
async fn carries(from: &StreamSocket, to: &StreamSocket, bytes: &[u8]) {
    from.write_all(bytes.to_vec()).await.0.expect("write");
    assert_eq!(util::read_exact(to, bytes.len()).await, bytes);
}

/// Awaits `operation`, a call on a stream of a socket that was dropped or closed, and
/// checks that it fails with OperationAborted.
async fn aborted<T: std::fmt::Debug>(
    what: &str,
    operation: impl std::future::Future<Output = ringsock::Result<T>>,
) {
    let err = util::must(what, operation).await.expect_err(what);
    assert_eq!(
        err.status(),
        SocketErrorStatus::OperationAborted,
        "{what}: {err}"
    );
}

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
        // The kernel keeps whole seconds: a fraction is dropped, and the getter says so.
        accepted
            .control()
            .set_keep_alive(Some(Duration::from_millis(1999)))
            .expect("1.999 s");
        assert_eq!(
            accepted.control().keep_alive(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(kernel_keep_alive(&accepted), Some(Duration::from_secs(1)));
        accepted.control().set_keep_alive(None).expect("off");
        assert_eq!(kernel_keep_alive(&accepted), None);
        // Both ends still carry bytes.
        carries(&accepted, &unconnected, b"ok").await;
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
            carries(&server, &client, b"new").await;
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
            aborted(&format!("{backend}: the waiting read"), reading).await;
        }
        aborted("read after the drop", input.read_line()).await;
        let sent = async {
            output.write(b"late".to_vec()).await?;
            output.flush().await
        };
        aborted("write after the drop", sent).await;
        // The peer sees the end while the streams are still held, and nothing after it.
        let got = util::must("the peer's end of stream", util::read_to_end(&server)).await;
        assert!(got.is_empty(), "{backend}: {got:?}");
    });
}

#[test]
fn a_stream_of_a_closed_socket_says_it_was_closed_and_of_a_dropped_one_dropped() {
    util::on_each_backend(|backend| async move {
        let listener = util::loopback_listener();
        for (how, says) in [("close", "closed"), ("drop", "dropped")] {
            let (client, _server) = util::connected_pair(&listener).await;
            let output = client.output_stream();
            match how {
                "close" => util::must("close", client.close(Duration::from_secs(5)))
                    .await
                    .unwrap(),
                _ => drop(client),
            }
            let err = util::must("a write after it", output.write(b"late".to_vec()))
                .await
                .expect_err("a write after the socket ended");
            assert_eq!(
                err.status(),
                SocketErrorStatus::OperationAborted,
                "{backend}"
            );
            assert!(
                err.to_string().contains(says),
                "{backend}: after {how}: {err}"
            );
        }
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

/// Whether `result`, an accept, is the connection from `peer`; panics on an error a
/// reset connection cannot explain.
fn is_from(result: ringsock::Result<StreamSocket>, peer: SocketAddr) -> Option<StreamSocket> {
    match result {
        Ok(socket) if socket.peer_addr().ok() == Some(peer) => Some(socket),
        Ok(_) => None,
        Err(err) => {
            assert!(
                matches!(
                    err.status(),
                    SocketErrorStatus::ConnectionResetByPeer
                        | SocketErrorStatus::SoftwareCausedConnectionAbort
                ),
                "{err}"
            );
            None
        }
    }
}

#[test]
fn connections_reset_before_they_are_accepted_do_not_stop_the_listener() {
    util::on_each_backend(|backend| async move {
        const RESET: usize = 50;
        // The resets come before the first accept, or while one waits (on io_uring the
        // background accept is running then and takes them as they come).
        for armed in [false, true] {
            let listener = util::loopback_listener();
            let addr = listener.local_addr().unwrap();
            let mut first = Box::pin(listener.accept());
            if armed {
                assert!(util::poll_once(first.as_mut()).await.is_pending());
            }
            for _ in 0..RESET {
                util::reset(std::net::TcpStream::connect(addr).expect("connect"));
            }
            let mut good = std::net::TcpStream::connect(addr).expect("connect");
            std::io::Write::write_all(&mut good, b"hello").expect("write");
            let good_addr = good.local_addr().unwrap();
            // Each reset connection is handed out (it fails on use) or refused with a
            // status of its own; either way the accept after it goes on to the next
            // one, and the one that stayed arrives with its bytes.
            let mut accepted = is_from(util::must("accept", first).await, good_addr);
            for _ in 0..RESET {
                if accepted.is_some() {
                    break;
                }
                accepted = is_from(util::must("accept", listener.accept()).await, good_addr);
            }
            let accepted = accepted
                .unwrap_or_else(|| panic!("{backend} armed={armed}: the good one never came"));
            assert_eq!(util::read_exact(&accepted, 5).await, b"hello");
            assert_eq!(listener.accept_stats().exhausted, 0);
            // And the listener still takes new connections.
            let (client, server) = util::connected_pair(&listener).await;
            carries(&client, &server, b"next").await;
        }
    });
}

#[test]
fn a_connect_given_up_half_way_leaves_the_socket_free_to_connect_again() {
    util::on_each_backend(|backend| async move {
        // A listener nobody accepts on, with the shortest backlog: once its queue is
        // full the kernel drops further SYNs, so a connect to it stays pending.
        let stuck = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        stuck
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .expect("bind");
        stuck.listen(0).expect("listen");
        let stuck_addr = stuck.local_addr().unwrap().as_socket().unwrap();
        // Fill the queue: connect until one stays pending.
        let mut fillers = Vec::new();
        let mut full = false;
        // Bounded: the queue of a backlog-0 listener holds a connection or two.
        for _ in 0..8 {
            let filler = StreamSocket::new();
            {
                let mut connecting = std::pin::pin!(filler.connect_addr(stuck_addr));
                full = true;
                for _ in 0..8 {
                    if let std::task::Poll::Ready(done) = util::poll_once(connecting.as_mut()).await
                    {
                        done.expect("a connect into the queue");
                        full = false;
                        break;
                    }
                    util::yield_now().await;
                }
            }
            if full {
                break;
            }
            fillers.push(filler);
        }
        assert!(full, "{backend}: the queue never filled");
        let socket = StreamSocket::new();
        {
            let mut connecting = std::pin::pin!(socket.connect_addr(stuck_addr));
            assert!(
                util::poll_once(connecting.as_mut()).await.is_pending(),
                "{backend}: a connect to a full queue completed"
            );
        }
        assert_eq!(
            socket.local_addr().unwrap_err().status(),
            SocketErrorStatus::InvalidArgument
        );
        let listener = util::loopback_listener();
        util::must(
            "connect again",
            socket.connect_addr(listener.local_addr().unwrap()),
        )
        .await
        .expect("a connect given up leaves nothing behind");
        let server = util::must("accept", listener.accept())
            .await
            .expect("accept");
        assert_eq!(socket.peer_addr().unwrap(), listener.local_addr().unwrap());
        carries(&socket, &server, b"ok").await;
    });
}

#[test]
fn two_reads_waiting_on_one_socket_split_the_bytes_and_lose_none() {
    util::on_each_backend(|backend| async move {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        // `join` polls the reads first, so both wait before the bytes are sent.
        let ((first, second), written) = util::join(
            util::join(
                client.read(Vec::with_capacity(4)),
                client.read(Vec::with_capacity(4)),
            ),
            server.write_all(b"abcdefgh".to_vec()),
        )
        .await;
        written.0.expect("write");
        let first = first.1[..first.0.expect("first read")].to_vec();
        let second = second.1[..second.0.expect("second read")].to_vec();
        let joined = [first.clone(), second.clone()].concat();
        let swapped = [second, first].concat();
        assert!(
            joined == b"abcdefgh" || swapped == b"abcdefgh",
            "{backend}: {joined:?}"
        );
    });
}

#[test]
fn two_connects_racing_on_one_socket_leave_exactly_one_connection() {
    util::on_each_backend(|backend| async move {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let socket = StreamSocket::new();
        let (a, b) = util::join(socket.connect_addr(addr), socket.connect_addr(addr)).await;
        let lost = match (a, b) {
            (Ok(()), Err(err)) | (Err(err), Ok(())) => err,
            other => panic!("{backend}: {other:?}"),
        };
        assert_eq!(lost.status(), SocketErrorStatus::InvalidArgument, "{lost}");
        assert!(lost.to_string().contains("already connected"), "{lost}");
        // The loser's connection was closed; the winner's carries the bytes.
        let local = socket.local_addr().unwrap();
        socket.write_all(b"won".to_vec()).await.0.expect("write");
        for _ in 0..2 {
            let server = util::must("accept", listener.accept())
                .await
                .expect("accept");
            if server.peer_addr().ok() == Some(local) {
                assert_eq!(util::read_exact(&server, 3).await, b"won");
                return;
            }
        }
        panic!("{backend}: the winner's connection never arrived");
    });
}

#[test]
fn a_scope_naming_no_interface_is_network_unreachable_by_index_as_by_name() {
    util::on_each_backend(|backend| async move {
        // 999999 and "nosuchif0" name no interface here; both must say so alike, for a
        // listener and for a connection.
        for scope in ["999999", "nosuchif0"] {
            let host = ringsock::HostName::new(&format!("fe80::1%{scope}")).expect("valid");
            let err = ringsock::StreamSocketListener::bind_host(&host, "0")
                .map(drop)
                .expect_err("no such interface");
            assert_eq!(
                err.status(),
                SocketErrorStatus::NetworkIsUnreachable,
                "{backend} bind %{scope}: {err}"
            );
            let err = util::must("connect", StreamSocket::new().connect(&host, "80"))
                .await
                .expect_err("no such interface");
            assert_eq!(
                err.status(),
                SocketErrorStatus::NetworkIsUnreachable,
                "{backend} connect %{scope}: {err}"
            );
        }
    });
}

#[test]
fn a_link_local_address_without_a_scope_is_refused_saying_so() {
    util::on_each_backend(|backend| async move {
        // The kernel's answer would be a bare EINVAL ("Invalid argument").
        for name in ["fe80::1", "fe80::1%0", "[febf::1]"] {
            let host = ringsock::HostName::new(name).expect("valid");
            let connected = util::must("connect", StreamSocket::new().connect(&host, "80")).await;
            let bound = ringsock::StreamSocketListener::bind_host(&host, "0").map(drop);
            for err in [connected.expect_err("connect"), bound.expect_err("bind")] {
                assert_eq!(
                    err.status(),
                    SocketErrorStatus::InvalidArgument,
                    "{backend} {name}: {err}"
                );
                assert!(err.to_string().contains("needs the interface"), "{err}");
            }
        }
    });
}

#[test]
fn streams_end_once_a_socket_with_queued_writes_is_dropped_or_closed() {
    util::on_each_backend(|backend| async move {
        let listener = util::loopback_listener();
        for close in [false, true] {
            let (client, server) = util::connected_pair(&listener).await;
            let mut input = client.input_stream();
            let output = client.output_stream();
            // Queued, not flushed: the close delivers it, then the end.
            output.write(b"last".to_vec()).await.expect("queue");
            let mut reading = std::pin::pin!(input.read(16));
            assert!(util::poll_once(reading.as_mut()).await.is_pending());
            if close {
                let closing = client.close(util::MUST_HAPPEN);
                util::must("close", closing).await.expect("close");
            } else {
                drop(client);
            }
            let got = util::must("the peer's read", util::read_to_end(&server)).await;
            assert_eq!(got, b"last", "{backend} close={close}");
            aborted(
                &format!("{backend} close={close}: the waiting read"),
                reading,
            )
            .await;
        }
    });
}

#[test]
fn writes_racing_on_one_socket_never_land_in_each_others_middle() {
    util::on_each_backend(|backend| async move {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        // A small send buffer, so each write_all takes many partial sends.
        client.control().set_send_buffer_size(64 * 1024).unwrap();
        let size = 4 << 20;
        let writes = util::join(
            util::join(
                client.write_all(vec![b'a'; size]),
                client.write_all(vec![b'b'; size]),
            ),
            client.write(b"c".to_vec()),
        );
        let ((((first, _), (second, _)), (single, _)), got) =
            util::join(writes, util::read_exact(&server, 2 * size + 1)).await;
        first.expect("first write_all");
        second.expect("second write_all");
        assert_eq!(single.expect("write"), 1);
        // Three runs: each call's bytes arrive together.
        let runs = 1 + got.windows(2).filter(|pair| pair[0] != pair[1]).count();
        assert_eq!(runs, 3, "{backend}: the writes interleaved");
    });
}

#[test]
fn the_longest_line_holds_whether_a_long_line_comes_whole_or_in_pieces() {
    util::on_each_backend(|backend| async move {
        let listener = util::std_listener();
        let (socket, mut peer) = util::pair_with_std_peer(&listener).await;
        let mut input = socket.input_stream();
        input.set_max_line_length(10);
        // A short segment: the line and its newline come in one read.
        let whole = b"twenty bytes of line\n";
        // A long one: it may come in many.
        let mut long = vec![b'x'; 60_000];
        long.push(b'\n');
        for line in [&whole[..], &long] {
            peer.write_all(line).unwrap();
            let err = util::must("a long line", input.read_line())
                .await
                .expect_err("a line over the limit");
            assert_eq!(
                err.status(),
                SocketErrorStatus::InvalidArgument,
                "{backend}: {err}"
            );
            // Its bytes stay for read() to skip.
            let mut skipped = 0;
            while skipped < line.len() {
                let chunk = util::must("skip", input.read(line.len() - skipped))
                    .await
                    .unwrap();
                assert!(!chunk.is_empty());
                skipped += chunk.len();
            }
        }
        peer.write_all(b"0123456789\r\nshort\n").unwrap();
        let at_limit = util::must("a line at the limit", input.read_line()).await;
        assert_eq!(
            at_limit.unwrap().as_deref(),
            Some("0123456789"),
            "{backend}"
        );
        let short = util::must("a short line", input.read_line()).await;
        assert_eq!(short.unwrap().as_deref(), Some("short"), "{backend}");
    });
}
