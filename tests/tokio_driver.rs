//! ringsock inside tokio (`ringsock::tokio::Driver`): the driver's descriptor wakes
//! tokio, tasks and timers run, tokio tasks dropped mid-read lose nothing, and sockets
//! used where their driver is not current fail with WrongRuntime.

mod tls_certs;
mod util;

use std::io::{Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use ringsock::{SocketErrorStatus, StreamSocket};
use util::tokio_rt::{on_each_driver_in_tokio, with_each_driver_in_tokio};

/// A blocking std peer echoing `rounds` one-byte messages: each byte comes back only
/// after it arrived, so ringsock's read is often already waiting in the kernel when
/// the answer comes, and nothing else is going on in tokio to wake the thread.
#[test]
fn a_lone_pending_read_wakes_tokio() {
    const ROUNDS: usize = 500;
    on_each_driver_in_tokio(|backend| async move {
        let peer_listener = util::std_listener();
        let (socket, mut peer) = util::pair_with_std_peer(&peer_listener).await;
        let peer = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            for _ in 0..ROUNDS {
                peer.read_exact(&mut byte).expect("peer read");
                peer.write_all(&byte).expect("peer write");
            }
        });
        for round in 0..ROUNDS {
            let sent = [round as u8];
            socket.write_all(sent.to_vec()).await.0.expect("write");
            let echoed = util::read_exact(&socket, 1).await;
            assert_eq!(echoed, sent, "round {round} on {backend}");
        }
        util::join_thread(peer).await;
    });
}

/// The same without any ringsock timer armed and without tokio's clock: only the
/// driver's descriptor can wake the thread when the answer arrives.
#[test]
fn a_pending_read_completes_with_no_timer_anywhere() {
    for backend in util::BACKENDS {
        let tokio = util::tokio_rt::tokio_runtime();
        tokio.block_on(async {
            let Some(mut driver) = util::tokio_rt::driver_or_skip(backend) else {
                return;
            };
            driver
                .run_until(async {
                    let listener = util::std_listener();
                    let addr = listener.local_addr().unwrap();
                    let socket = StreamSocket::new();
                    socket.connect_addr(addr).await.expect("connect");
                    let (mut peer, _) = listener.accept().expect("accept");
                    let (go, ready) = std::sync::mpsc::channel::<()>();
                    let peer = std::thread::spawn(move || {
                        ready.recv().expect("go");
                        // Sent from another thread while the read waits, however the
                        // threads interleave.
                        peer.write_all(b"late").expect("peer write");
                        peer
                    });
                    let reading = socket.read(Vec::with_capacity(16));
                    go.send(()).unwrap();
                    let (result, buf) = reading.await;
                    let n = result.expect("read");
                    assert_eq!(&buf[..n], &b"late"[..n]);
                    assert!(n > 0, "end of stream on {backend}");
                    drop(peer.join().expect("peer thread"));
                })
                .await;
        });
    }
}

#[test]
fn ringsock_timers_and_tasks_run_inside_tokio() {
    on_each_driver_in_tokio(|backend| async move {
        let start = Instant::now();
        ringsock::runtime::sleep(Duration::from_millis(5)).await;
        assert!(start.elapsed() >= Duration::from_millis(5));
        let task = ringsock::spawn(async move {
            ringsock::runtime::sleep(Duration::from_millis(1)).await;
            backend
        });
        assert_eq!(util::must("spawned task", task).await, backend);
        // tokio's timers run beside ringsock's.
        tokio::time::sleep(Duration::from_millis(1)).await;
    });
}

#[test]
fn ringsock_sockets_in_spawn_local_tasks_of_a_local_set_inside_the_driver() {
    on_each_driver_in_tokio(|_| async {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let server = tokio::task::spawn_local(async move {
                    let socket = listener.accept().await.expect("accept");
                    util::echo(socket).await
                });
                let client = util::connect(addr).await;
                util::round_trip(&client, b"through a LocalSet").await;
                client.shutdown_write().await.expect("shutdown");
                assert_eq!(server.await.expect("server task"), 18);
            })
            .await;
    });
}

/// A tokio task blocked in a read is aborted; the bytes sent afterwards go to the next
/// read of the same socket, none lost to the dropped one, and the loop goes on.
#[test]
fn aborting_a_tokio_task_mid_read_loses_nothing() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        let client = Rc::new(client);
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                for round in 0..50u8 {
                    let reader = client.clone();
                    let (started, waiting) = tokio::sync::oneshot::channel();
                    let task = tokio::task::spawn_local(async move {
                        let read = reader.read(Vec::with_capacity(64));
                        started.send(()).unwrap();
                        read.await
                    });
                    waiting.await.unwrap();
                    // One more turn: the read is submitted (io_uring) or waiting for
                    // readiness (epoll) when the task is aborted.
                    tokio::task::yield_now().await;
                    task.abort();
                    let outcome = task.await;
                    assert!(outcome.unwrap_err().is_cancelled(), "round {round}");
                    // The cancel reaches the kernel before anything is sent.
                    tokio::task::yield_now().await;
                    let message = vec![round; 3];
                    server.write_all(message.clone()).await.0.expect("write");
                    let got = util::read_exact(&client, 3).await;
                    assert_eq!(got, message, "round {round} on {backend}");
                }
            })
            .await;
    });
}

/// Dropping the whole `run_until` future mid-read (tokio's timeout gives up on it)
/// cancels the read on its own driver; the driver runs the next `run_until` as before.
#[test]
fn dropping_run_until_mid_read_cancels_and_the_driver_goes_on() {
    with_each_driver_in_tokio(|backend, mut driver| async move {
        let (client, server) = driver
            .run_until(async {
                let listener = util::loopback_listener();
                util::connected_pair(&listener).await
            })
            .await;
        let gave_up = tokio::time::timeout(
            Duration::from_millis(1),
            driver.run_until(client.read(Vec::with_capacity(64))),
        )
        .await;
        assert!(gave_up.is_err(), "a read with nothing sent completed");
        driver
            .run_until(async {
                server.write_all(b"after".to_vec()).await.0.expect("write");
                let got = util::read_exact(&client, 5).await;
                assert_eq!(got, b"after", "on {backend}");
            })
            .await;
    });
}

#[test]
fn sockets_used_where_their_driver_is_not_current_are_wrong_runtime() {
    with_each_driver_in_tokio(|backend, mut driver| async move {
        let (client, server) = driver
            .run_until(async {
                let listener = util::loopback_listener();
                util::connected_pair(&listener).await
            })
            .await;

        // On the same tokio thread, outside the driver's run_until.
        let (result, _) = client.read(Vec::with_capacity(8)).await;
        let err = result.expect_err("a read outside run_until");
        assert_eq!(err.status(), SocketErrorStatus::WrongRuntime, "{err}");
        assert!(
            err.to_string().contains("no ringsock runtime is running"),
            "{err}"
        );

        // Under another driver on the same thread.
        let Some(mut other) = util::tokio_rt::driver_or_skip(backend) else {
            return;
        };
        let (result, _) = other.run_until(server.write(b"x".to_vec())).await;
        let err = result.expect_err("a write under another driver");
        assert_eq!(err.status(), SocketErrorStatus::WrongRuntime, "{err}");

        // In a tokio task polled by tokio's scheduler, not by run_until.
        let local = tokio::task::LocalSet::new();
        let client = Rc::new(client);
        let outside = client.clone();
        let err = driver
            .run_until(local.run_until(async {
                // The LocalSet is polled inside run_until here: this one works.
                let ok = tokio::task::spawn_local(async move {
                    let (result, _) = outside.write(b"y".to_vec()).await;
                    result
                });
                ok.await.unwrap().expect("write inside run_until")
            }))
            .await;
        assert_eq!(err, 1);
        let outside = client.clone();
        let err = local
            .run_until(async move {
                let (result, _) = outside.write(b"z".to_vec()).await;
                result.expect_err("a write in a LocalSet outside run_until")
            })
            .await;
        assert_eq!(err.status(), SocketErrorStatus::WrongRuntime, "{err}");

        // And it still works where it belongs.
        driver
            .run_until(async {
                let got = util::read_exact(&server, 1).await;
                assert_eq!(got, b"y");
            })
            .await;
    });
}

/// A TLS read through tokio's AsyncRead whose receive was in flight when its driver
/// went: the next read is `WrongRuntime`, not an end of stream (`Ok(0)`) or a panic of
/// the receive task's handle; so is one with no receive in flight.
#[test]
fn a_tls_async_read_after_its_driver_went_is_wrong_runtime() {
    use tokio::io::AsyncReadExt;
    for receive_in_flight in [false, true] {
        with_each_driver_in_tokio(|backend, mut driver| async move {
            let ca = tls_certs::Ca::new("gone");
            let (mut client, server) = driver
                .run_until(async {
                    let (port, server) = tls_server(&ca, b"");
                    let mut client = StreamSocket::new();
                    client.control().set_trusted_roots(ca.roots()).unwrap();
                    let host = ringsock::HostName::new("localhost").unwrap();
                    let tls = ringsock::tls::ProtectionLevel::Tls13;
                    client.connect_with(&host, &port, tls).await.unwrap();
                    if receive_in_flight {
                        let mut byte = [0u8; 1];
                        let read = AsyncReadExt::read(&mut client, &mut byte);
                        let given_up = tokio::time::timeout(Duration::from_millis(5), read);
                        assert!(given_up.await.is_err(), "{backend}: nothing was sent");
                    }
                    (client, server.await)
                })
                .await;
            drop(driver);
            let mut byte = [0u8; 1];
            let err = AsyncReadExt::read(&mut client, &mut byte)
                .await
                .expect_err("a read after the driver went");
            let status = err
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<ringsock::Error>())
                .map(ringsock::Error::status);
            assert_eq!(
                status,
                Some(SocketErrorStatus::WrongRuntime),
                "{backend}: {err}"
            );
            drop(server);
        });
    }
}

/// TLS started after an AsyncRead was given up on (its receive still waiting inside
/// the socket, where the program cannot drop it): the upgrade goes through, the
/// handshake's bytes go to the session, and data flows.
#[test]
fn tls_starts_after_an_async_read_was_given_up_on() {
    use tokio::io::AsyncReadExt;
    with_each_driver_in_tokio(|backend, mut driver| async move {
        let ca = tls_certs::Ca::new("given-up");
        driver
            .run_until(async {
                let (port, server) = tls_server(&ca, b"secret\n");
                let mut client = StreamSocket::new();
                client.control().set_trusted_roots(ca.roots()).unwrap();
                let host = ringsock::HostName::new("localhost").unwrap();
                client.connect(&host, &port).await.unwrap();
                let mut byte = [0u8; 1];
                let read = AsyncReadExt::read(&mut client, &mut byte);
                let given_up = tokio::time::timeout(Duration::from_millis(5), read);
                assert!(given_up.await.is_err(), "{backend}: nothing was sent");
                let tls = ringsock::tls::ProtectionLevel::Tls13;
                client
                    .upgrade_to_tls(tls, &host)
                    .await
                    .unwrap_or_else(|err| panic!("{backend}: {err}"));
                let line = client.input_stream().read_line().await.unwrap();
                assert_eq!(line.as_deref(), Some("secret"), "{backend}");
                drop(server.await);
            })
            .await;
    });
}

/// A TLS server on loopback in a task of the running driver: its port, and its end of
/// the one connection it takes, once it has sent `greeting` (if any) through TLS.
fn tls_server(
    ca: &tls_certs::Ca,
    greeting: &'static [u8],
) -> (String, ringsock::JoinHandle<StreamSocket>) {
    let host = ringsock::HostName::new("127.0.0.1").unwrap();
    let listener = ringsock::StreamSocketListener::bind_host(&host, "0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let acceptor = ringsock::tls::TlsAcceptor::new(ca.server()).unwrap();
    let server = ringsock::spawn(async move {
        let socket = listener.accept().await.unwrap();
        socket.accept_tls(&acceptor).await.unwrap();
        if !greeting.is_empty() {
            socket.write_all(greeting.to_vec()).await.0.unwrap();
        }
        socket
    });
    (port, server)
}

#[test]
fn a_driver_outside_tokio_is_a_clear_error() {
    let err = ringsock::tokio::Driver::new().expect_err("no tokio runtime here");
    assert_eq!(err.status(), SocketErrorStatus::WrongRuntime);
    assert!(err.to_string().contains("inside a tokio runtime"), "{err}");
}

#[test]
fn ringsock_spawn_outside_run_until_is_a_clear_panic() {
    let tokio = util::tokio_rt::tokio_runtime();
    let caught = std::panic::catch_unwind(|| {
        tokio.block_on(async {
            let _driver = ringsock::tokio::Driver::new();
            ringsock::spawn(async {});
        })
    });
    let panic = caught.expect_err("spawn with no driver current");
    let message = util::panic_message(panic);
    assert!(message.contains("outside a ringsock runtime"), "{message}");
}

/// On io_uring the ring is set up with flags under which the eventfd is signalled for
/// every completion; which ones this kernel gave is printed for the record.
#[test]
fn the_io_uring_driver_reports_its_ring_setup() {
    let tokio = util::tokio_rt::tokio_runtime();
    tokio.block_on(async {
        let Some(driver) = util::tokio_rt::driver_or_skip(ringsock::Backend::Uring) else {
            return;
        };
        let setup = driver.ring_setup().expect("an io_uring driver has a setup");
        eprintln!("ring setup inside tokio: {setup}");
        assert_eq!(driver.driver_kind(), ringsock::DriverKind::Uring);
    });
}

/// Echo rounds with a std peer thread, on `driver`: a read waits in the kernel when the
/// answer arrives from another thread, and only the driver's descriptor can say so.
async fn ping_pong_with_a_std_peer(driver: &mut ringsock::tokio::Driver, rounds: usize) {
    driver
        .run_until(async {
            let peer_listener = util::std_listener();
            let (socket, mut peer) = util::pair_with_std_peer(&peer_listener).await;
            let peer = std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                for _ in 0..rounds {
                    peer.read_exact(&mut byte).expect("peer read");
                    peer.write_all(&byte).expect("peer write");
                }
            });
            for round in 0..rounds {
                let sent = [round as u8];
                socket.write_all(sent.to_vec()).await.0.expect("write");
                assert_eq!(util::read_exact(&socket, 1).await, sent, "round {round}");
            }
            util::join_thread(peer).await;
        })
        .await;
}

/// The ring flags used where the kernel does not signal the eventfd for deferred
/// completions: without DEFER_TASKRUN, completions are posted, and signalled, at once.
#[test]
fn without_defer_taskrun_a_lone_read_still_wakes_tokio() {
    let tokio = util::tokio_rt::tokio_runtime();
    tokio.block_on(async {
        let builder = ringsock::runtime::Builder::new()
            .backend(ringsock::Backend::Uring)
            .disable(ringsock::Capability::DeferTaskrun);
        let mut driver = match ringsock::tokio::Driver::with_builder(builder) {
            Ok(driver) => driver,
            Err(err) if std::env::var_os("RINGSOCK_REQUIRE_URING").is_none() => {
                eprintln!("skipped on io_uring: {err}");
                return;
            }
            Err(err) => panic!("cannot start io_uring inside tokio: {err}"),
        };
        let setup = driver.ring_setup().unwrap();
        assert!(!setup.contains("defer-taskrun"), "{setup}");
        let run = ping_pong_with_a_std_peer(&mut driver, 300);
        tokio::time::timeout(util::TEST_LIMIT, run)
            .await
            .expect("did not finish in time");
    });
}

/// In a multi-threaded tokio runtime the driver lives in `block_on`'s future, on the
/// calling thread; tokio's reactor runs on its workers and still wakes it.
#[test]
fn a_driver_in_block_on_of_a_multi_thread_runtime() {
    for backend in util::BACKENDS {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        tokio.block_on(async {
            let Some(mut driver) = util::tokio_rt::driver_or_skip(backend) else {
                return;
            };
            let run = ping_pong_with_a_std_peer(&mut driver, 300);
            tokio::time::timeout(util::TEST_LIMIT, run)
                .await
                .unwrap_or_else(|_| panic!("did not finish in time on {backend}"));
        });
    }
}

/// A connect by host name resolves on ringsock's blocking pool, whose answer comes
/// from another thread.
#[test]
fn connect_by_host_name_inside_tokio() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let port = listener.local_addr().unwrap().port().to_string();
        let socket = StreamSocket::new();
        let host = ringsock::HostName::new("localhost").unwrap();
        let (connected, accepted) = tokio::join!(socket.connect(&host, &port), listener.accept());
        connected.unwrap_or_else(|err| panic!("connect to localhost on {backend}: {err}"));
        let server = accepted.expect("accept");
        server.write_all(b"hi".to_vec()).await.0.expect("write");
        assert_eq!(util::read_exact(&socket, 2).await, b"hi");
    });
}

/// While its tasks wait, the driver leaves the thread to tokio: no busy polling of the
/// ring or the epoll set (counted, not timed).
#[test]
fn a_waiting_driver_does_not_spin() {
    with_each_driver_in_tokio(|backend, mut driver| async move {
        driver
            .run_until(ringsock::runtime::sleep(Duration::from_millis(1)))
            .await;
        let before = driver.driver_stats().enter_calls;
        driver
            .run_until(ringsock::runtime::sleep(Duration::from_millis(30)))
            .await;
        let calls = driver.driver_stats().enter_calls - before;
        assert!(
            calls <= 4,
            "{calls} ring or epoll entries during one 30 ms wait on {backend}"
        );
    });
}

/// A driver dropped with a ringsock task still waiting in a read, after the tokio
/// runtime that turned it is gone: the read is cancelled and reaped, nothing panics, and
/// the peer sees the connection end.
#[test]
fn a_driver_outliving_its_tokio_runtime_drops_cleanly() {
    for backend in util::BACKENDS {
        let tokio = util::tokio_rt::tokio_runtime();
        let peer_listener = util::std_listener();
        let kept = tokio.block_on(async {
            let mut driver = util::tokio_rt::driver_or_skip(backend)?;
            driver
                .run_until(async {
                    let (socket, peer) = util::pair_with_std_peer(&peer_listener).await;
                    ringsock::spawn(async move {
                        let (result, _) = socket.read(Vec::with_capacity(64)).await;
                        result.expect("the read is dropped, never answered");
                    });
                    // One turn: the task's read is submitted before run_until returns.
                    tokio::task::yield_now().await;
                    Some(peer)
                })
                .await
                .map(|peer| (driver, peer))
        });
        drop(tokio);
        let Some((driver, peer)) = kept else { continue };
        drop(driver);
        let mut peer = peer;
        let (read, _) = util::std_read_until_end(&mut peer);
        assert_eq!(read, 0, "nothing was sent on {backend}");
    }
}

/// Posted datagrams inside tokio: nothing awaits them, yet the step that polled the
/// post submits it, and two waiters settle (a posting task of ringsock and the future
/// given to `run_until`), with every post sent.
#[test]
fn posts_inside_tokio_are_submitted_and_settle() {
    on_each_driver_in_tokio(|_backend| async move {
        let sender = Rc::new(util::bound_loopback());
        let sink = util::bound_loopback();
        let to_sink = sink.local_addr().unwrap();
        let task = {
            let sender = sender.clone();
            ringsock::spawn(async move {
                for i in 0..50u8 {
                    sender.post_to_addr(vec![i; 8], to_sink).unwrap();
                }
                sender.settle_posts().await
            })
        };
        util::must("the posting task settles", task).await.unwrap();
        util::must("posts settle", sender.settle_posts())
            .await
            .unwrap();
        let posts = sender.post_stats();
        assert_eq!((posts.sent, posts.in_flight), (50, 0), "{posts:?}");
        for i in 0..50u8 {
            assert_eq!(&util::recv_datagram(&sink).await[..], &[i; 8][..]);
        }
    });
}

/// Run inside a ringsock `block_on` (inside tokio's), the driver's future would wait for
/// ever: tokio's reactor, which alone sees its descriptors, does not run there.
#[test]
fn run_until_inside_a_ringsock_block_on_is_a_clear_panic() {
    let tokio = util::tokio_rt::tokio_runtime();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio.block_on(async {
            let mut driver = ringsock::tokio::Driver::new().unwrap();
            let runtime = ringsock::Runtime::new().unwrap();
            runtime.block_on(driver.run_until(async {
                ringsock::runtime::sleep(Duration::from_millis(5)).await;
            }));
        })
    }));
    let panic = caught.expect_err("run_until inside a ringsock block_on");
    let message = util::panic_message(panic);
    assert!(message.contains("inside a ringsock block_on"), "{message}");
}
