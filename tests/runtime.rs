//! The runtime: driver choice, timers, cross-thread wakes, teardown with work in flight.

mod util;

use std::io::Read;
use std::time::{Duration, Instant};

use ringsock::runtime::{sleep, timeout, Builder};
use ringsock::{Backend, DriverKind, HostName, StreamSocket, StreamSocketListener};

#[test]
fn a_forced_backend_is_the_one_that_runs() {
    let epoll = Builder::new().backend(Backend::Epoll).build().unwrap();
    assert_eq!(epoll.driver_kind(), DriverKind::Epoll);
    assert!(epoll.fallback_reason().is_none());
    match Builder::new().backend(Backend::Uring).build() {
        Ok(uring) => assert_eq!(uring.driver_kind(), DriverKind::Uring),
        Err(err) => eprintln!("skipped: io_uring unavailable here: {err}"),
    }
}

#[test]
fn backend_names_parse_and_bad_ones_are_errors() {
    assert_eq!("uring".parse::<Backend>().unwrap(), Backend::Uring);
    assert_eq!("epoll".parse::<Backend>().unwrap(), Backend::Epoll);
    assert_eq!("auto".parse::<Backend>().unwrap(), Backend::Auto);
    let err = "kqueue".parse::<Backend>().unwrap_err();
    assert_eq!(err.status(), ringsock::SocketErrorStatus::InvalidArgument);
    assert!(err.to_string().contains("kqueue"), "{err}");
}

#[test]
fn timers_fire_in_deadline_order_and_timeouts_cancel() {
    util::on_each_backend(|_| async {
        let order = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, ms) in [(0, 30u64), (1, 10), (2, 20)] {
            let order = order.clone();
            tasks.push(ringsock::spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                order.borrow_mut().push(i);
            }));
        }
        for task in tasks {
            task.await;
        }
        assert_eq!(*order.borrow(), vec![1, 2, 0]);

        let start = Instant::now();
        let outcome = timeout(Duration::from_millis(20), sleep(Duration::from_secs(3600))).await;
        assert!(outcome.is_err());
        assert!(start.elapsed() >= Duration::from_millis(20));
        let err: ringsock::Error = outcome.unwrap_err().into();
        assert_eq!(
            err.status(),
            ringsock::SocketErrorStatus::ConnectionTimedOut
        );
    });
}

#[test]
fn a_wake_from_another_thread_reaches_the_parked_loop() {
    util::on_each_backend(|_| async {
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        let worker = std::thread::spawn(move || rx.recv().unwrap() * 2);
        tx.send(21).unwrap();
        assert_eq!(util::join_thread(worker).await, 42);
    });
}

#[test]
fn dropping_a_runtime_with_operations_in_flight_finishes() {
    for backend in util::BACKENDS {
        let Ok(runtime) = Builder::new().backend(backend).build() else {
            eprintln!("skipped on {backend}: cannot start");
            continue;
        };
        let (listener, client) = runtime.block_on(async {
            let listener =
                StreamSocketListener::bind_host(&HostName::new("127.0.0.1").unwrap(), "0").unwrap();
            let client = StreamSocket::new();
            client
                .connect_addr(listener.local_addr().unwrap())
                .await
                .unwrap();
            (listener, client)
        });
        let client = std::rc::Rc::new(client);
        let reader = client.clone();
        // A read that never completes (the peer never writes), and an accept that never
        // completes: both in flight when the runtime goes away.
        runtime.spawn(async move {
            let _ = reader.read(Vec::with_capacity(4096)).await;
        });
        let listener = std::rc::Rc::new(listener);
        let acceptor = listener.clone();
        runtime.spawn(async move {
            let _ = acceptor.accept().await;
            let _ = acceptor.accept().await;
        });
        runtime.block_on(sleep(Duration::from_millis(5)));
        drop(runtime);
        drop(client);
        drop(listener);
    }
}

#[test]
fn dropping_a_runtime_drops_its_pending_tasks_and_closes_their_sockets() {
    util::on_each_backend(|backend| async move {
        let listener = util::std_listener();
        // A runtime of its own, dropped while its tasks still wait: one on a read in the
        // driver, one on a timer.
        let runtime = Builder::new().backend(backend).build().unwrap();
        let peers = runtime.block_on(async {
            let (reader, reader_peer) = util::pair_with_std_peer(&listener).await;
            let (sleeper, sleeper_peer) = util::pair_with_std_peer(&listener).await;
            ringsock::spawn(async move {
                let _ = reader.read(Vec::with_capacity(8)).await;
                panic!("nothing is ever sent to this socket");
            });
            ringsock::spawn(async move {
                sleep(Duration::from_secs(3600)).await;
                drop(sleeper);
            });
            util::yield_now().await;
            [reader_peer, sleeper_peer]
        });
        drop(runtime);

        // Their futures were dropped with the runtime, closing their sockets: each peer
        // reads end of stream (the read gives up after MUST_HAPPEN instead of hanging).
        for (i, mut peer) in peers.into_iter().enumerate() {
            peer.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
            let mut buf = [0u8; 8];
            // A thread with io_uring work may see EINTR in a blocking call: retry those.
            let read = (0..100)
                .map(|_| peer.read(&mut buf))
                .find(|r| !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::Interrupted));
            match read {
                Some(Ok(n)) => assert_eq!(n, 0, "task {i}"),
                Some(Err(err)) => panic!("task {i}: its socket was not closed: {err}"),
                None => panic!("task {i}: every read was interrupted"),
            }
        }
    });
}

#[test]
fn a_time_too_long_for_the_clock_waits_instead_of_panicking() {
    util::on_each_backend(|_| async {
        assert_eq!(timeout(Duration::MAX, async { 7 }).await, Ok(7));
        let mut forever = std::pin::pin!(sleep(Duration::MAX));
        assert!(util::poll_once(forever.as_mut()).await.is_pending());
        assert!(forever.deadline() > Instant::now() + Duration::from_secs(3600));
    });
}

#[test]
fn the_resolve_timeout_is_checked_and_any_length_works() {
    let err = Builder::new()
        .resolve_timeout(Duration::ZERO)
        .build()
        .err()
        .expect("a zero resolve timeout is refused");
    assert_eq!(err.status(), ringsock::SocketErrorStatus::InvalidArgument);
    assert!(err.to_string().contains("resolve timeout"), "{err}");
    for backend in util::BACKENDS {
        // Longer than the clock can add: no panic, it just never runs out.
        let builder = Builder::new()
            .backend(backend)
            .resolve_timeout(Duration::MAX);
        util::on_runtime_of(builder, backend, &|_| async {
            let host = HostName::new("localhost").unwrap();
            let lookup = ringsock::host::resolve(&host, 80);
            let addrs = util::must("lookup of localhost", lookup).await.unwrap();
            assert!(
                addrs.iter().all(|addr| addr.ip().is_loopback()),
                "{addrs:?}"
            );
        });
    }
}

/// A task that waits on nothing any runtime holds (its only waker is its own) is still
/// dropped with its runtime: what it owns, a socket here, is closed, and a task awaiting
/// its output elsewhere hears that it ended.
#[test]
fn dropping_a_runtime_drops_tasks_that_wait_on_nothing() {
    for backend in util::BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let peer = util::std_listener();
        let addr = peer.local_addr().unwrap();
        let socket = runtime.block_on(async {
            let socket = StreamSocket::new();
            socket.connect_addr(addr).await.unwrap();
            socket
        });
        let handle = runtime.spawn(async move {
            let _held = socket;
            std::future::pending::<()>().await;
        });
        // Let it run once, so it waits on `pending()` rather than sitting in the queue.
        runtime.block_on(util::yield_now());
        let (mut accepted, _) = peer.accept().unwrap();
        drop(handle);
        drop(runtime);
        // The socket the task held is closed: the peer reads end of stream at once.
        accepted.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
        let mut buf = [0u8; 8];
        let n = loop {
            match accepted.read(&mut buf) {
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other.unwrap(),
            }
        };
        assert_eq!(n, 0, "{backend}: the task's socket is still open");
    }
}

/// A loop that polls a receive only under zero timeouts never waits for anything: each
/// due timer spends its task's budget, so it still yields, the engine still turns, and
/// the datagrams already sent arrive (on io_uring the receive completes only in a turn).
#[test]
fn a_loop_of_zero_timeouts_still_lets_the_engine_turn() {
    util::on_each_backend(|backend| async move {
        let sink = ringsock::DatagramSocket::new();
        sink.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = sink.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..10u32 {
            sender.send_to(&i.to_be_bytes(), to).unwrap();
        }
        let mut got = Vec::new();
        // Bounded by tries, not time: without yields no timer could end the test.
        for _ in 0..1_000_000 {
            if let Ok(datagram) = timeout(Duration::ZERO, sink.recv()).await {
                got.push(datagram.unwrap().to_vec());
                if got.len() == 10 {
                    break;
                }
            }
        }
        let expected: Vec<Vec<u8>> = (0..10u32).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(got, expected, "{backend}");
    });
}
