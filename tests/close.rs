//! How stream connections end, on both drivers: a graceful close delivers every queued
//! byte then the end of stream, a close past its timeout aborts, an abort resets, and a
//! socket dropped anywhere (in its runtime, outside any, after its runtime) never hangs
//! or panics.

mod tls_certs;
mod util;

use std::time::Duration;

use ringsock::runtime::Builder;
use ringsock::tls::{ProtectionLevel, TlsAcceptor};
use ringsock::{HostName, SocketErrorStatus, StreamSocket};
use tls_certs::Ca;

/// Queues `total` bytes on `socket`'s output stream, without flushing.
async fn queue(socket: &StreamSocket, total: usize) -> Vec<u8> {
    let data = util::pseudo_random_bytes(total as u64, total);
    let output = socket.output_stream();
    for chunk in data.chunks(256 * 1024) {
        drop(output.write(chunk.to_vec()).await.unwrap());
    }
    data
}

#[test]
fn a_graceful_close_delivers_every_queued_byte_then_the_end() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let data = queue(&client, 4 << 20).await;
        let (closed, got) =
            util::join(client.close(util::MUST_HAPPEN), util::read_to_end(&server)).await;
        closed.unwrap();
        assert!(
            got == data,
            "{} of {} bytes, then the end",
            got.len(),
            data.len()
        );
        assert_eq!(server.control().timeout_counts().close, 0);
        // A socket that never connected closes at once.
        StreamSocket::new()
            .close(Duration::from_millis(1))
            .await
            .unwrap();
    });
}

/// An output stream kept past its socket's close: a write fails at once saying the
/// socket is gone (not accepted, to fail at the flush), and `try_write` gives the
/// buffer back.
#[test]
fn a_write_after_the_socket_was_closed_fails_at_once() {
    util::on_each_backend(|backend| async move {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let output = client.output_stream();
        client.close(util::MUST_HAPPEN).await.unwrap();
        assert!(util::read_to_end(&server).await.is_empty(), "{backend}");
        let Err(err) = output.write(b"late".to_vec()).await else {
            panic!("{backend}: a write after close was accepted");
        };
        assert_eq!(
            err.status(),
            SocketErrorStatus::OperationAborted,
            "{backend}"
        );
        assert!(err.to_string().contains("socket"), "{backend}: {err}");
        let Err(back) = output.try_write(b"later".to_vec()) else {
            panic!("{backend}: try_write after close queued");
        };
        assert_eq!(&back[..], b"later", "{backend}");
    });
}

#[test]
fn a_graceful_close_through_tls_ends_with_close_notify() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("close CA");
        let acceptor = TlsAcceptor::new(ca.server()).unwrap();
        let listener = util::loopback_listener();
        let port = listener.local_addr().unwrap().port().to_string();
        let client = StreamSocket::new();
        client.control().set_trusted_roots(ca.roots()).unwrap();
        let host = HostName::new("localhost").unwrap();
        let (connected, accepted) = util::join(
            client.connect_with(&host, &port, ProtectionLevel::Tls13),
            async {
                let server = listener.accept().await.unwrap();
                server.accept_tls(&acceptor).await.map(|()| server)
            },
        )
        .await;
        connected.unwrap();
        let server = accepted.unwrap();
        let data = queue(&client, 1 << 20).await;
        let (closed, got) =
            util::join(client.close(util::MUST_HAPPEN), util::read_to_end(&server)).await;
        closed.unwrap();
        // read_to_end panics on an error: a truncation (no close_notify) would be one.
        assert!(got == data, "{} of {} bytes", got.len(), data.len());
    });
}

#[test]
fn a_close_past_its_timeout_aborts_and_says_so() {
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        // A small window: the peer's buffers fill long before the queued data is out.
        socket2::SockRef::from(&listener)
            .set_recv_buffer_size(4096)
            .unwrap();
        let (client, peer) = util::pair_with_std_peer(&listener).await;
        queue(&client, 2 << 20).await;
        let result = util::must("close", client.close(Duration::from_millis(200))).await;
        assert_eq!(
            result.expect_err("the peer reads nothing").status(),
            SocketErrorStatus::ConnectionTimedOut
        );
        let (_, end) = util::must("the peer sees the abort", util::std_peer_end(peer)).await;
        assert_eq!(end, Some(SocketErrorStatus::ConnectionResetByPeer));
    });
}

#[test]
fn an_abort_resets_the_connection() {
    util::on_each_backend(|_| async {
        // With nothing queued, and with a write queued that never went out.
        for queued in [false, true] {
            let listener = util::loopback_listener();
            let (client, server) = util::connected_pair(&listener).await;
            if queued {
                queue(&client, 1 << 20).await;
            }
            client.abort();
            let (result, _) = util::must("read", server.read(Vec::with_capacity(64))).await;
            assert_eq!(
                result.expect_err("a reset, not an end of stream").status(),
                SocketErrorStatus::ConnectionResetByPeer,
                "queued: {queued}"
            );
        }
        // A std peer sees ECONNRESET too.
        let listener = util::std_listener();
        let (client, peer) = util::pair_with_std_peer(&listener).await;
        client.abort();
        let (read, end) = util::must("the peer sees the abort", util::std_peer_end(peer)).await;
        assert_eq!(
            (read, end),
            (0, Some(SocketErrorStatus::ConnectionResetByPeer))
        );
    });
}

/// An abort resets the connection at once even while an input or an output stream of
/// the socket (which hold its descriptor) is alive, its bytes all acknowledged: before,
/// the RST waited for the last of them to go.
#[test]
fn an_abort_resets_the_connection_while_its_streams_are_held() {
    util::on_each_backend(|_| async {
        for keep in ["input", "output"] {
            let listener = util::std_listener();
            let (client, peer) = util::pair_with_std_peer(&listener).await;
            client.write_all(b"hi".to_vec()).await.0.unwrap();
            let held = match keep {
                "input" => (Some(client.input_stream()), None),
                _ => (None, Some(client.output_stream())),
            };
            client.abort();
            let (read, end) = util::must("the peer sees the abort", util::std_peer_end(peer)).await;
            assert_eq!(
                (read, end),
                (2, Some(SocketErrorStatus::ConnectionResetByPeer)),
                "holding the {keep} stream"
            );
            drop(held);
        }
    });
}

#[test]
fn a_close_counts_on_the_listener_of_an_accepted_socket() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        // The client never reads what the server queues, and its window is small.
        let client = StreamSocket::new();
        client.control().set_receive_buffer_size(4096).unwrap();
        util::must(
            "connect",
            client.connect_addr(listener.local_addr().unwrap()),
        )
        .await
        .unwrap();
        let server = util::must("accept", listener.accept()).await.unwrap();
        queue(&server, 2 << 20).await;
        let result = util::must("close", server.close(Duration::from_millis(200))).await;
        assert_eq!(
            result.unwrap_err().status(),
            SocketErrorStatus::ConnectionTimedOut
        );
        assert_eq!(listener.control().timeout_counts().close, 1);
        drop(client);
    });
}

#[test]
fn dropping_outside_its_runtime_or_after_it_neither_hangs_nor_panics() {
    for backend in util::BACKENDS {
        let Ok(runtime) = Builder::new().backend(backend).build() else {
            if std::env::var_os("RINGSOCK_REQUIRE_URING").is_some() {
                panic!("cannot start the {backend} runtime");
            }
            continue;
        };
        // Each socket has writes queued in its output stream and a peer that reads nothing.
        let make = || {
            runtime.block_on(async {
                let listener = util::loopback_listener();
                let (client, server) = util::connected_pair(&listener).await;
                queue(&client, 8 << 20).await;
                (client, server)
            })
        };
        // Outside any runtime.
        let (client, server) = make();
        drop(client);
        drop(server);
        // In another runtime.
        let (client, server) = make();
        Builder::new()
            .backend(backend)
            .build()
            .unwrap()
            .block_on(async move {
                drop(client);
                drop(server);
            });
        // After its runtime is gone.
        let (client, server) = make();
        drop(runtime);
        drop(client);
        drop(server);
    }
}

/// A runtime dropped while its writes are unsent (a dropped socket still closing with
/// data queued, a task in `write_all`): the peer gets a reset, not a FIN that would pass
/// the part it got for the whole stream.
#[test]
fn a_runtime_dropped_with_writes_unsent_resets_the_connection() {
    const TOTAL: usize = 32 << 20;
    for backend in util::BACKENDS {
        for how in ["a dropped socket closing", "a task in write_all"] {
            let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend)
            else {
                return;
            };
            let listener = util::std_listener();
            let peer = runtime.block_on(async {
                let (socket, peer) = util::pair_with_std_peer(&listener).await;
                if how == "a dropped socket closing" {
                    let output = socket.output_stream();
                    output.write(vec![7u8; TOTAL]).await.unwrap();
                    drop(output);
                    drop(socket);
                } else {
                    let started = std::rc::Rc::new(std::cell::Cell::new(false));
                    let writing = started.clone();
                    ringsock::spawn(async move {
                        writing.set(true);
                        let _ = socket.write_all(vec![7u8; TOTAL]).await;
                    });
                    // The task has run into its write (it cannot finish: the peer
                    // reads nothing) once this wait ends.
                    std::future::poll_fn(|cx| {
                        if started.get() {
                            return std::task::Poll::Ready(());
                        }
                        cx.waker().wake_by_ref();
                        std::task::Poll::Pending
                    })
                    .await;
                }
                peer
            });
            drop(runtime);
            let (got, end) = read_to_end_of(peer);
            let what = format!("{backend:?}, {how}: {} of {TOTAL} bytes", got.len());
            assert!(got.len() < TOTAL, "{what}");
            assert_eq!(
                end.map_err(|err| err.kind()),
                Err(std::io::ErrorKind::ConnectionReset),
                "{what}"
            );
        }
    }
}

/// A runtime dropped while a closing socket's writes are all in the kernel, waiting
/// for a slow peer's acknowledgements: nothing written is lost, so the peer gets every
/// byte and the FIN, not a reset.
#[test]
fn a_runtime_dropped_after_the_writes_reached_the_kernel_delivers_them() {
    const TOTAL: usize = 256 << 10;
    for backend in util::BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            return;
        };
        // A small receive window: most of the data waits in the sender's kernel.
        let listener = util::std_listener();
        socket2::SockRef::from(&listener)
            .set_recv_buffer_size(4096)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = runtime.block_on(async {
            let client = StreamSocket::new();
            let peer = std::thread::spawn(move || listener.accept().unwrap().0);
            client.connect_addr(addr).await.unwrap();
            let peer = util::join_thread(peer).await;
            let output = client.output_stream();
            output.write(vec![5u8; TOTAL]).await.unwrap();
            drop(client);
            // Everything left the process: only the kernel holds what is unsent.
            util::must("the close to hand everything to the kernel", async {
                while output.pending_writes() > 0 {
                    ringsock::runtime::sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
            peer
        });
        drop(runtime);
        let (_, end) = read_to_end_of(peer);
        assert_eq!(end.map_err(|err| err.kind()), Ok(TOTAL), "{backend:?}");
    }
}

/// A TLS socket dropped healthy at the end of its runtime, everything written sent:
/// only its `close_notify` is missing, which loses nothing, so the peer reads every
/// byte and then the end without `close_notify` (`ConnectionClosed`), not a reset. The
/// same when its close ran a turn first and queued the `close_notify`: that record is
/// not the program's data, and a reset would throw away what the kernel still holds.
#[test]
fn a_tls_socket_dropped_with_its_runtime_is_not_reset() {
    const TOTAL: usize = 256 << 10;
    for (backend, turns) in util::BACKENDS.into_iter().flat_map(|b| [(b, 0), (b, 1)]) {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            return;
        };
        let ca = Ca::new("tls-drop");
        let server_config = ca.server();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || {
            let runtime = Builder::new().backend(backend).build().unwrap();
            runtime.block_on(async {
                let listener = util::loopback_listener();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let socket = listener.accept().await.unwrap();
                let acceptor = TlsAcceptor::new(server_config).unwrap();
                socket.accept_tls(&acceptor).await.unwrap();
                socket.write_all(b"hello\n".to_vec()).await.0.unwrap();
                let mut total = 0;
                loop {
                    let (result, _) = socket.read(Vec::with_capacity(64 << 10)).await;
                    match result {
                        Ok(0) => return (total, None),
                        Ok(n) => total += n,
                        Err(err) => return (total, Some(err.status())),
                    }
                }
            })
        });
        let addr = addr_rx.recv().unwrap();
        runtime.block_on(async {
            let client = StreamSocket::new();
            client.control().set_trusted_roots(ca.roots()).unwrap();
            let host = HostName::new("localhost").unwrap();
            client
                .connect_with(&host, &addr.port().to_string(), ProtectionLevel::Tls13)
                .await
                .unwrap();
            // Read past the session tickets: unread bytes at the close would make the
            // kernel reset the connection, whatever ringsock does.
            let hello = client.input_stream().read_line().await.unwrap();
            assert_eq!(hello.as_deref(), Some("hello"));
            client.write_all(vec![9u8; TOTAL]).await.0.unwrap();
            drop(client);
            for _ in 0..turns {
                util::yield_now().await;
            }
        });
        drop(runtime);
        let (got, end) = server.join().unwrap();
        let ends = [None, Some(SocketErrorStatus::ConnectionClosed)];
        assert!(
            got == TOTAL && ends.contains(&end),
            "{backend:?}, {turns} turns: {got} of {TOTAL} bytes, then {end:?}"
        );
        if turns == 0 {
            assert_eq!(
                end,
                Some(SocketErrorStatus::ConnectionClosed),
                "{backend:?}"
            );
        }
    }
}

/// Everything a std peer reads until the connection ends, and how it ended (failing the
/// test past MUST_HAPPEN rather than waiting for ever).
fn read_to_end_of(mut peer: std::net::TcpStream) -> (Vec<u8>, std::io::Result<usize>) {
    peer.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
    let mut got = Vec::new();
    let end = std::io::Read::read_to_end(&mut peer, &mut got);
    (got, end)
}
