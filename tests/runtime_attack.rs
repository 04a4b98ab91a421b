//! Attacks on the runtime contract from the safe API, the way a careless user would
//! misuse it: futures moved between runtimes and past their runtime's end, sockets
//! detached while operations on them are queued or in flight, runtimes dropped with
//! buffers the kernel is filling. Each must end with an error or work; none may hang,
//! lose or misplace bytes, or let the kernel write into freed memory (the file runs
//! under the poisoning allocator, see `util::poison`).

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::pin::pin;
use std::task::Poll;

use ringsock::runtime::Builder;
use ringsock::{Backend, DatagramSocket, Runtime, SocketErrorStatus, StreamSocket};

use util::{must, poll_once, BACKENDS};

#[global_allocator]
static ALLOC: util::poison::PoisonAlloc = util::poison::PoisonAlloc;

fn runtime(backend: Backend) -> Option<Runtime> {
    util::build_or_skip(Builder::new().backend(backend), backend)
}

/// An unpinned pool of `threads` threads on `backend`; `None` where the engine is missing.
fn pool(backend: Backend, threads: usize) -> Option<ringsock::runtime::Pool> {
    runtime(backend)?;
    let pool = ringsock::runtime::Pool::builder()
        .threads(threads)
        .pin_threads(false)
        .runtime(Builder::new().backend(backend))
        .build()
        .expect("pool");
    Some(pool)
}

fn assert_no_corruption(what: &str) {
    assert_eq!(
        util::poison::corrupted(),
        0,
        "{what}: memory was written after it was freed"
    );
}

fn assert_wrong_runtime<T: std::fmt::Debug>(result: ringsock::Result<T>, what: &str) {
    match result {
        Err(err) => assert_eq!(
            err.status(),
            SocketErrorStatus::WrongRuntime,
            "{what}: {err}"
        ),
        Ok(value) => panic!("{what}: worked on the wrong runtime: {value:?}"),
    }
}

/// A ringsock stream connected to a std peer, made on the current runtime.
async fn stream_with_std_peer() -> (StreamSocket, TcpStream) {
    let listener = util::std_listener();
    let addr = listener.local_addr().unwrap();
    let socket = StreamSocket::new();
    must("connect", socket.connect_addr(addr)).await.unwrap();
    let (peer, _) = listener.accept().unwrap();
    (socket, peer)
}

/// Tests here count the process's descriptors: they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A read queued in this round (polled once, not yet handed to the kernel) when its
/// socket is detached in the same round: it must not go on reading the socket after it
/// left the runtime. The bytes the peer sends afterwards belong to whoever adopts it.
#[test]
fn a_read_queued_when_its_socket_is_detached_steals_nothing() {
    let _serial = serial();
    for backend in BACKENDS {
        let Some(rt) = runtime(backend) else {
            continue;
        };
        rt.block_on(async {
            let (socket, mut peer) = stream_with_std_peer().await;
            let mut read = pin!(socket.read(Vec::with_capacity(64)));
            assert!(poll_once(read.as_mut()).await.is_pending());
            let detached = must("detach", socket.detach()).await.unwrap();
            let mut adopted = TcpStream::from(detached.into_fd());
            adopted.set_nonblocking(false).unwrap();
            adopted.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
            peer.write_all(b"for the adopter").unwrap();
            // The old handle's read ends (it was cancelled) without taking the bytes.
            let (result, buf) = must("the detached read", read).await;
            assert!(
                result.is_err(),
                "{backend}: a read on a detached socket took {:?}",
                String::from_utf8_lossy(&buf)
            );
            let mut got = [0u8; 15];
            adopted
                .read_exact(&mut got)
                .unwrap_or_else(|err| panic!("{backend}: the adopter lost its bytes: {err}"));
            assert_eq!(&got, b"for the adopter");
        });
        assert_no_corruption("queued read then detach");
    }
}

/// The same with the read handed to the kernel (a park in between) before the detach.
#[test]
fn a_read_in_flight_when_its_socket_is_detached_steals_nothing() {
    let _serial = serial();
    for backend in BACKENDS {
        let Some(rt) = runtime(backend) else {
            continue;
        };
        rt.block_on(async {
            let (socket, mut peer) = stream_with_std_peer().await;
            let mut read = pin!(socket.read(Vec::with_capacity(64)));
            assert!(poll_once(read.as_mut()).await.is_pending());
            util::yield_now().await;
            let detached = must("detach", socket.detach()).await.unwrap();
            let mut adopted = TcpStream::from(detached.into_fd());
            adopted.set_nonblocking(false).unwrap();
            adopted.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
            peer.write_all(b"for the adopter").unwrap();
            let (result, _) = must("the detached read", read).await;
            assert!(result.is_err(), "{backend}: a detached socket still read");
            let mut got = [0u8; 15];
            adopted.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"for the adopter");
        });
        assert_no_corruption("in-flight read then detach");
    }
}

/// Every kind of operation in flight (a read into a Vec, a 32 MiB write to a peer that
/// does not read, a flush of that much, an accept, a datagram receive from the ring, a
/// batch receive) when its runtime is dropped: each future then ends with WrongRuntime
/// under another runtime, nothing hangs, no descriptor stays open after everything is
/// dropped, and nothing was written into freed memory. Repeated, so a leak shows.
#[test]
fn operations_in_flight_when_their_runtime_is_dropped_end_cleanly_and_leak_nothing() {
    let _serial = serial();
    const ROUNDS: usize = 200;
    const BIG: usize = 32 << 20;
    let big = bytes::Bytes::from(vec![7u8; BIG]);
    for backend in BACKENDS {
        if runtime(backend).is_none() {
            continue;
        }
        let before = open_fds();
        for round in 0..ROUNDS {
            let a = runtime(backend).unwrap();
            let listener = util::loopback_listener();
            let udp = DatagramSocket::new();
            udp.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            // `server` is read from (its peer `quiet` never writes); `client` writes to
            // `peer`, which never reads.
            let (client, server, quiet, peer) = a.block_on(async {
                let (quiet, server) = util::connected_pair(&listener).await;
                let (client, peer) = stream_with_std_peer().await;
                (client, server, quiet, peer)
            });
            let output = client.output_stream();
            let mut read = Box::pin(server.read(Vec::with_capacity(4096)));
            let mut write = Box::pin(client.write_all(vec![1u8; BIG]));
            let mut accept = Box::pin(listener.accept());
            let mut recv = Box::pin(udp.recv());
            let mut batch_out = Vec::new();
            a.block_on(async {
                assert!(poll_once(read.as_mut()).await.is_pending());
                assert!(poll_once(write.as_mut()).await.is_pending());
                assert!(poll_once(accept.as_mut()).await.is_pending());
                assert!(poll_once(recv.as_mut()).await.is_pending());
                // The kernel takes over: the write fills the socket buffers.
                util::yield_now().await;
                util::yield_now().await;
                output.try_write(big.clone()).unwrap();
            });
            if round % 2 == 0 {
                drop(a);
                let b = runtime(backend).unwrap();
                b.block_on(async {
                    let Poll::Ready((r, buf)) = poll_once(read.as_mut()).await else {
                        panic!("{backend}: read waited after its runtime was dropped");
                    };
                    assert_wrong_runtime(r, "read");
                    assert_eq!(buf.capacity(), 4096);
                    let Poll::Ready((w, buf)) = poll_once(write.as_mut()).await else {
                        panic!("{backend}: write waited after its runtime was dropped");
                    };
                    assert_wrong_runtime(w, "write_all");
                    assert_eq!(buf.len(), BIG);
                    let Poll::Ready(acc) = poll_once(accept.as_mut()).await else {
                        panic!("{backend}: accept waited after its runtime was dropped");
                    };
                    assert_wrong_runtime(acc.map(drop), "accept");
                    let Poll::Ready(got) = poll_once(recv.as_mut()).await else {
                        panic!("{backend}: recv waited after its runtime was dropped");
                    };
                    assert_wrong_runtime(got.map(drop), "recv");
                    let flushed = must("flush", output.flush()).await;
                    assert_wrong_runtime(flushed, "flush");
                    let batch = must("recv_batch", udp.recv_batch(&mut batch_out, 8)).await;
                    assert_wrong_runtime(batch, "recv_batch");
                });
            } else {
                // Dropped with the runtime still alive and then the runtime goes.
                drop((read, write, accept, recv));
                drop(a);
                drop(output);
                drop((client, server, quiet, listener, udp, peer));
                continue;
            }
            drop((read, write, accept, recv));
            drop(output);
            drop((client, server, quiet, listener, udp, peer));
        }
        assert_eq!(open_fds(), before, "{backend}: descriptors leaked");
        assert_no_corruption("operations in flight when the runtime was dropped");
    }
}

/// A task that panics on a pool thread ends alone: its handle says OperationAborted,
/// a task of the same thread waiting on a socket is served on, and work sent to that
/// thread afterwards runs. A `make` that panics ends its own job only.
#[test]
fn a_task_that_panics_leaves_its_pool_thread_serving() {
    let _serial = serial();
    for backend in BACKENDS {
        let Some(pool) = pool(backend, 1) else {
            continue;
        };
        let handle = pool.handle();
        // A task of the thread, waiting for a datagram while the other one panics.
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = receiver.local_addr().unwrap();
        let waiting = handle
            .spawn_on(0, move || async move {
                let socket = DatagramSocket::from_std(receiver).unwrap();
                let datagram = socket.recv().await.unwrap();
                datagram.as_ref().to_vec()
            })
            .unwrap();
        let doomed = handle
            .spawn_on(0, || async { panic!("a task panics on the pool thread") })
            .unwrap();
        let ended: ringsock::Result<()> =
            ringsock::block_on(async { must("doomed", doomed).await });
        let err = ended.expect_err("a panicked task gave an output");
        assert_eq!(err.status(), SocketErrorStatus::OperationAborted, "{err}");
        let made_badly = handle
            .spawn_on(0, || -> std::future::Ready<()> { panic!("make panics") })
            .unwrap();
        let later = handle.spawn_on(0, || async { 1 }).unwrap();
        ringsock::block_on(async {
            let err = must("the job whose make panicked", made_badly)
                .await
                .expect_err("a make that panicked gave an output");
            assert_eq!(err.status(), SocketErrorStatus::OperationAborted, "{err}");
            assert_eq!(must("work after the panics", later).await.unwrap(), 1);
        });
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(b"still served", to)
            .unwrap();
        let got = ringsock::block_on(async { must("the waiting task", waiting).await });
        assert_eq!(got.unwrap(), b"still served", "{backend}");
        drop(pool);
    }
}

/// Pools of absurd sizes are refused with InvalidArgument, not a panic.
#[test]
fn a_pool_of_absurd_size_is_refused() {
    let _serial = serial();
    for threads in [0, ringsock::runtime::MAX_THREADS + 1, usize::MAX] {
        let err = ringsock::runtime::Pool::builder()
            .threads(threads)
            .build()
            .expect_err("an absurd pool");
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
    }
}

/// A socket detached from a runtime of one engine is adopted by a runtime of the other
/// and carries on byte exact, in both directions.
#[test]
fn a_socket_detached_from_one_engine_is_adopted_by_the_other() {
    let _serial = serial();
    for (from, to) in [
        (Backend::Uring, Backend::Epoll),
        (Backend::Epoll, Backend::Uring),
    ] {
        let (Some(a), Some(b)) = (runtime(from), runtime(to)) else {
            continue;
        };
        let (detached, mut peer) = a.block_on(async {
            let (socket, mut peer) = stream_with_std_peer().await;
            peer.write_all(b"before").unwrap();
            assert_eq!(util::read_exact(&socket, 6).await, b"before");
            let mut read = pin!(socket.read(Vec::with_capacity(16)));
            assert!(poll_once(read.as_mut()).await.is_pending());
            let detached = must("detach", socket.detach()).await.unwrap();
            let (result, _) = must("the cancelled read", read).await;
            assert!(result.is_err(), "{from}: a detached read went on");
            (detached, peer)
        });
        drop(a);
        b.block_on(async {
            let socket = detached.into_stream().unwrap();
            peer.write_all(b"after").unwrap();
            assert_eq!(util::read_exact(&socket, 5).await, b"after", "{from}->{to}");
            socket.write_all(b"back".to_vec()).await.0.unwrap();
        });
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"back");
        assert_no_corruption("adopted by the other engine");
    }
}

/// A JoinHandle whose runtime was dropped with its task unfinished, awaited on another
/// runtime: it panics, as documented, saying why (not async-task's "polled after
/// completion", which points nowhere).
#[test]
fn a_join_handle_outliving_its_runtime_says_why() {
    let _serial = serial();
    for backend in BACKENDS {
        let Some(a) = runtime(backend) else {
            continue;
        };
        let handle = a.spawn(std::future::pending::<u8>());
        drop(a);
        let b = runtime(backend).unwrap();
        b.block_on(async {
            let outcome = catch_unwind_polls(handle).await;
            let message =
                util::panic_message(outcome.expect_err("awaiting a dropped task gave an output"));
            assert!(
                message.contains("runtime was dropped"),
                "{backend}: unclear panic: {message}"
            );
        });
    }
}

/// A JoinHandle awaited, its task unfinished, inside another runtime's `block_on` on
/// the same thread: its task cannot run there, so the wait would never end; it panics at
/// once saying why, instead of hanging. A finished task's output is taken anywhere.
#[test]
fn a_join_handle_awaited_in_another_runtime_says_why_instead_of_hanging() {
    let _serial = serial();
    for backend in BACKENDS {
        let (Some(a), Some(b)) = (runtime(backend), runtime(backend)) else {
            continue;
        };
        let unfinished = a.spawn(async { 7u8 });
        b.block_on(async {
            // The bound only turns a regression (the old hang) into a failure.
            let waited = ringsock::runtime::timeout(
                std::time::Duration::from_secs(10),
                catch_unwind_polls(unfinished),
            )
            .await;
            let outcome = waited.unwrap_or_else(|_| panic!("{backend}: the await hung"));
            let message = util::panic_message(outcome.expect_err("the task cannot have run"));
            assert!(
                message.contains("another runtime"),
                "{backend}: unclear panic: {message}"
            );
        });
        // Its own runtime awaits the next one as usual; once finished, any runtime may
        // take the output.
        let finished = a.spawn(async { 8u8 });
        assert_eq!(
            a.block_on(async { a.spawn(async { 9u8 }).await }),
            9,
            "{backend}"
        );
        assert!(finished.is_finished(), "{backend}");
        assert_eq!(b.block_on(finished), 8, "{backend}");
    }
}

/// Polls `future` to its end, catching a panic in any of its polls.
async fn catch_unwind_polls<F: std::future::Future>(future: F) -> std::thread::Result<F::Output> {
    let mut future = Box::pin(future);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

/// A listener detached while an accept on it is queued (same round) or in flight, with
/// connections pending before and arriving after: every connection is accepted exactly
/// once, by the old accept (if it had completed) or by the adopting listener on another
/// runtime; none is lost or reset.
#[test]
fn a_listener_detached_with_an_accept_queued_or_in_flight_loses_no_connection() {
    let _serial = serial();
    const BEFORE: usize = 4;
    const AFTER: usize = 4;
    for backend in BACKENDS {
        for turn_first in [false, true] {
            let (Some(a), Some(b)) = (runtime(backend), runtime(backend)) else {
                continue;
            };
            let listener = a.block_on(async { util::loopback_listener() });
            let addr = listener.local_addr().unwrap();
            let mut clients: Vec<TcpStream> = (0..BEFORE)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            let (detached, old) = a.block_on(async {
                let mut accept = pin!(listener.accept());
                let mut old = Vec::new();
                match poll_once(accept.as_mut()).await {
                    Poll::Ready(socket) => old.push(socket.unwrap()),
                    Poll::Pending => {
                        if turn_first {
                            util::yield_now().await;
                        }
                        let detached = listener.detach().unwrap();
                        match must("the old accept", accept).await {
                            Ok(socket) => old.push(socket),
                            Err(err) => assert_ne!(
                                err.status(),
                                SocketErrorStatus::WrongRuntime,
                                "{backend}: {err}"
                            ),
                        }
                        for socket in &old {
                            socket.write_all(b"hi".to_vec()).await.0.unwrap();
                        }
                        return (detached, old);
                    }
                }
                let detached = listener.detach().unwrap();
                for socket in &old {
                    socket.write_all(b"hi".to_vec()).await.0.unwrap();
                }
                (detached, old)
            });
            clients.extend((0..AFTER).map(|_| TcpStream::connect(addr).unwrap()));
            b.block_on(async {
                let adopted = detached.into_listener().unwrap();
                for _ in old.len()..BEFORE + AFTER {
                    let socket = must("accept after adopting", adopted.accept())
                        .await
                        .unwrap();
                    socket.write_all(b"hi".to_vec()).await.0.unwrap();
                }
            });
            for (i, client) in clients.iter_mut().enumerate() {
                client.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
                let mut hi = [0u8; 2];
                client
                    .read_exact(&mut hi)
                    .unwrap_or_else(|e| panic!("{backend} client {i}: {e}"));
                assert_eq!(&hi, b"hi");
            }
            drop(old);
            drop((a, b));
        }
    }
    assert_no_corruption("listener detached with accepts in flight");
}

/// A stream detached while a 32 MiB flush runs in another task: the detach waits for
/// the queued bytes (as documented), the adopter's bytes come after them, and the peer
/// sees every byte once, in order.
#[test]
fn a_stream_detached_while_a_flush_runs_keeps_the_byte_order() {
    let _serial = serial();
    const BIG: usize = 32 << 20;
    for backend in BACKENDS {
        let (Some(a), Some(b)) = (runtime(backend), runtime(backend)) else {
            continue;
        };
        let (detached, reader) = a.block_on(async {
            let (socket, mut peer) = stream_with_std_peer().await;
            let reader = std::thread::spawn(move || {
                let mut all = Vec::new();
                peer.read_to_end(&mut all).map(|_| all)
            });
            let output = socket.output_stream();
            let data = bytes::Bytes::from(util::pseudo_random_bytes(3, BIG));
            output.write(data).await.unwrap();
            let flusher = ringsock::spawn(async move { output.flush().await });
            util::yield_now().await;
            let detached = must("detach", socket.detach()).await.unwrap();
            let flushed = must("flush", flusher).await;
            assert!(flushed.is_ok(), "{backend}: {flushed:?}");
            (detached, reader)
        });
        drop(a);
        b.block_on(async {
            let socket = detached.into_stream().unwrap();
            socket.write_all(b"tail".to_vec()).await.0.unwrap();
            socket.shutdown_write().await.unwrap();
        });
        let all = reader.join().unwrap().unwrap();
        assert_eq!(all.len(), BIG + 4, "{backend}");
        assert!(
            all[..BIG] == util::pseudo_random_bytes(3, BIG)[..],
            "{backend}"
        );
        assert_eq!(&all[BIG..], b"tail");
        drop(b);
    }
}

/// A read started inside a tokio Driver's `run_until`, kept in a tokio task after the
/// Driver is dropped: polled by tokio, it ends with WrongRuntime (its runtime was
/// dropped) and its buffer, and never hangs.
#[test]
fn a_tokio_task_polling_a_read_after_its_driver_dropped_gets_wrong_runtime() {
    let _serial = serial();
    for backend in BACKENDS {
        let tokio = util::tokio_rt::tokio_runtime();
        let local = tokio::task::LocalSet::new();
        local.block_on(&tokio, async {
            let Some(mut driver) = util::tokio_rt::driver_or_skip(backend) else {
                return;
            };
            let (mut read, _client) = driver
                .run_until(async {
                    let listener = util::loopback_listener();
                    let (client, server) = util::connected_pair(&listener).await;
                    let mut read = Box::pin(async move {
                        let (result, buf) = server.read(Vec::with_capacity(32)).await;
                        (result, buf.capacity())
                    });
                    assert!(poll_once(read.as_mut()).await.is_pending());
                    tokio::task::yield_now().await;
                    (read, client)
                })
                .await;
            drop(driver);
            let task = tokio::task::spawn_local(async move { read.as_mut().await });
            let (result, capacity) = tokio::time::timeout(util::MUST_HAPPEN, task)
                .await
                .expect("a read whose driver was dropped hung")
                .unwrap();
            assert_wrong_runtime(result, "read after the Driver was dropped");
            assert_eq!(capacity, 32);
        });
        assert_no_corruption("tokio driver dropped");
    }
}

/// Two Drivers on one thread, one's `run_until` nested in the other's: the inner one's
/// sockets work, the outer one's fail with WrongRuntime there and work again once the
/// inner `run_until` returns.
#[test]
fn two_tokio_drivers_nested_on_one_thread_keep_their_sockets_apart() {
    let _serial = serial();
    for backend in BACKENDS {
        let tokio = util::tokio_rt::tokio_runtime();
        tokio.block_on(async {
            let (Some(mut outer), Some(mut inner)) = (
                util::tokio_rt::driver_or_skip(backend),
                util::tokio_rt::driver_or_skip(backend),
            ) else {
                return;
            };
            outer
                .run_until(async {
                    let listener = util::loopback_listener();
                    let (a_client, a_server) = util::connected_pair(&listener).await;
                    inner
                        .run_until(async {
                            let listener = util::loopback_listener();
                            let (b_client, b_server) = util::connected_pair(&listener).await;
                            b_client.write_all(b"inner".to_vec()).await.0.unwrap();
                            assert_eq!(util::read_exact(&b_server, 5).await, b"inner");
                            let (w, _) = a_client.write(b"x".to_vec()).await;
                            assert_wrong_runtime(w, "outer socket inside the inner driver");
                        })
                        .await;
                    a_client.write_all(b"outer".to_vec()).await.0.unwrap();
                    assert_eq!(util::read_exact(&a_server, 5).await, b"outer");
                })
                .await;
        });
        assert_no_corruption("nested tokio drivers");
    }
}

/// A careless user moves the Pool into one of its own tasks and drops it there: the
/// other threads stop, the dropping thread cannot join itself; the program must not
/// hang, and the handle of that task must end.
#[test]
fn a_pool_dropped_inside_its_own_task_does_not_hang() {
    let _serial = serial();
    for backend in BACKENDS {
        let Some(pool) = pool(backend, 2) else {
            continue;
        };
        let handle = pool.handle();
        let inside = handle
            .spawn_on(0, move || async move {
                drop(pool);
                7
            })
            .unwrap();
        let got =
            ringsock::block_on(async { must("the task that dropped the pool", inside).await });
        // Either output is fine; what matters is that it ended.
        let _ = got;
        let after = handle.spawn_on(1, || async { 1 });
        if let Ok(after) = after {
            let got = ringsock::block_on(async { must("work after the drop", after).await });
            assert!(got.is_err(), "{backend}: a stopped pool ran a task");
        }
    }
}

/// A thousand runtimes dropped with a read into a Vec, a datagram receive on the
/// receive ring and a write the peer does not take all in flight: the descriptors come
/// back, memory does not grow with the rounds, nothing is written into freed memory.
#[test]
fn a_thousand_runtimes_dropped_with_buffers_in_the_kernel_leak_nothing() {
    let _serial = serial();
    const ROUNDS: usize = 1000;
    const WARMUP: usize = 400;
    for backend in BACKENDS {
        if runtime(backend).is_none() {
            continue;
        }
        let fds = open_fds();
        let mut rss_after_warmup = 0;
        for round in 0..ROUNDS {
            // The poisoning allocator's quarantine fills over the first few hundred
            // rounds; after that, memory a round keeps would show as growth.
            if round == WARMUP {
                rss_after_warmup = rss_kib();
            }
            let a = runtime(backend).unwrap();
            let kept = a.block_on(async {
                let listener = util::loopback_listener();
                let (quiet, server) = util::connected_pair(&listener).await;
                let (client, peer) = stream_with_std_peer().await;
                let udp = DatagramSocket::new();
                udp.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
                let to = udp.local_addr().unwrap();
                let sender = DatagramSocket::new();
                sender.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
                let server = std::rc::Rc::new(server);
                let reader = server.clone();
                ringsock::spawn(async move {
                    let _ = reader.read(Vec::with_capacity(65536)).await;
                });
                let receiver = std::rc::Rc::new(udp);
                let r = receiver.clone();
                ringsock::spawn(async move {
                    loop {
                        if r.recv().await.is_err() {
                            break;
                        }
                    }
                });
                let writer = std::rc::Rc::new(client);
                let w = writer.clone();
                ringsock::spawn(async move {
                    let _ = w.write_all(vec![9u8; 2 << 20]).await;
                });
                for _ in 0..3 {
                    sender
                        .send_to_addr(b"in the ring".to_vec(), to)
                        .await
                        .0
                        .unwrap();
                }
                util::yield_now().await;
                util::yield_now().await;
                (quiet, server, writer, receiver, sender, peer)
            });
            drop(a);
            drop(kept);
        }
        assert_eq!(open_fds(), fds, "{backend}: descriptors leaked");
        let grown = rss_kib().saturating_sub(rss_after_warmup);
        assert!(
            grown < 256 * 1024,
            "{backend}: memory grew {grown} KiB over the rounds"
        );
        assert_no_corruption("a thousand runtimes dropped");
    }
}

fn rss_kib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A Driver made in one tokio runtime and polled by another (the first kept alive, or
/// dropped): its descriptors are in the first one's reactor only, so it cannot work
/// there. It must say so with the documented panic, not wait forever (epoll) or
/// report a failed reactor.
#[test]
fn a_tokio_driver_polled_by_another_tokio_runtime_says_so() {
    let _serial = serial();
    for backend in BACKENDS {
        for keep_first in [true, false] {
            let first = util::tokio_rt::tokio_runtime();
            let Some(mut driver) =
                first.block_on(async { util::tokio_rt::driver_or_skip(backend) })
            else {
                continue;
            };
            let first = keep_first.then_some(first);
            let second = util::tokio_rt::tokio_runtime();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                second.block_on(async {
                    tokio::time::timeout(util::MUST_HAPPEN, driver.run_until(async { 5 })).await
                })
            }));
            let panic = match outcome {
                Ok(result) => {
                    panic!("{backend}: run_until under another tokio runtime: {result:?}")
                }
                Err(panic) => panic,
            };
            let message = util::panic_message(panic);
            assert!(
                message.contains("outside the tokio runtime the Driver was created in"),
                "{backend} (first runtime kept: {keep_first}): {message}"
            );
            drop(driver);
            drop(first);
        }
    }
}

/// A datagram socket detached while a receive is queued (same round) or in flight on
/// its receive ring: the datagrams sent before and after the detach all come out of the
/// adopting socket on another runtime (or the old receive, if it had completed), each
/// once, whole.
#[test]
fn a_datagram_socket_detached_with_a_receive_queued_or_in_flight_loses_nothing() {
    let _serial = serial();
    for backend in BACKENDS {
        for turn_first in [false, true] {
            let (Some(a), Some(b)) = (runtime(backend), runtime(backend)) else {
                continue;
            };
            let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let (detached, mut got) = a.block_on(async {
                let udp = DatagramSocket::new();
                udp.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
                let to = udp.local_addr().unwrap();
                sender.connect(to).unwrap();
                sender.send(b"d0").unwrap();
                let first = must("first", udp.recv()).await.unwrap();
                let mut got = vec![first.data().to_vec()];
                sender.send(b"d1").unwrap();
                let mut recv = pin!(udp.recv());
                if let Poll::Ready(d) = poll_once(recv.as_mut()).await {
                    got.push(d.unwrap().data().to_vec());
                    return (udp.detach().unwrap(), got);
                }
                if turn_first {
                    util::yield_now().await;
                }
                let detached = udp.detach().unwrap();
                if let Ok(d) = must("the old receive", recv).await {
                    got.push(d.data().to_vec());
                }
                (detached, got)
            });
            sender.send(b"d2").unwrap();
            b.block_on(async {
                let adopted = detached.into_datagram().unwrap();
                while got.len() < 3 {
                    let d = must("receive after adopting", adopted.recv())
                        .await
                        .unwrap();
                    got.push(d.data().to_vec());
                }
            });
            got.sort();
            assert_eq!(got, [b"d0", b"d1", b"d2"], "{backend} turn {turn_first}");
            drop((a, b));
        }
    }
    assert_no_corruption("datagram socket detached with receives in flight");
}

/// Operations polled once on runtime A (in flight there), then polled inside runtime B
/// nested in A's own `block_on` (same thread): a connect, a batch receive, a batch send
/// and a send_to each end with WrongRuntime under B, and after all are dropped the
/// sockets still work on A.
#[test]
fn operations_in_flight_on_a_polled_under_a_nested_b_fail_and_a_goes_on() {
    let _serial = serial();
    for backend in BACKENDS {
        let (Some(a), Some(b)) = (runtime(backend), runtime(backend)) else {
            continue;
        };
        a.block_on(async {
            let listener = util::loopback_listener();
            let addr = listener.local_addr().unwrap();
            let udp = DatagramSocket::new();
            udp.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            let to = udp.local_addr().unwrap();
            let client = StreamSocket::new();
            let mut connect = Box::pin(client.connect_addr(addr));
            let mut batch_out = Vec::new();
            let mut batch = Box::pin(udp.recv_batch(&mut batch_out, 16));
            let many: Vec<_> = (0..4u8)
                .map(|i| ringsock::net::OutgoingDatagram::new(vec![i; 8], to))
                .collect();
            let mut send_many = Box::pin(udp.send_many(many));
            let mut send_to = Box::pin(udp.send_to_addr(vec![9u8; 8], to));
            let connect_done = poll_once(connect.as_mut()).await.is_ready();
            let batch_done = poll_once(batch.as_mut()).await.is_ready();
            let _ = poll_once(send_many.as_mut()).await;
            let _ = poll_once(send_to.as_mut()).await;
            b.block_on(async {
                if !connect_done {
                    let Poll::Ready(r) = poll_once(connect.as_mut()).await else {
                        panic!("{backend}: connect waited under B");
                    };
                    assert_wrong_runtime(r, "connect under B");
                }
                if !batch_done {
                    let Poll::Ready(r) = poll_once(batch.as_mut()).await else {
                        panic!("{backend}: recv_batch waited under B");
                    };
                    assert_wrong_runtime(r, "recv_batch under B");
                }
            });
            drop((connect, batch, send_many, send_to));
            drop(batch_out);
            // A goes on: the datagrams sent (or not) do not matter; the socket works.
            udp.send_to_addr(b"still".to_vec(), to).await.0.unwrap();
            loop {
                let d = must("A receives", udp.recv()).await.unwrap();
                if d.data() == b"still" {
                    break;
                }
            }
            let server = StreamSocket::new();
            server.connect_addr(addr).await.unwrap();
            let accepted = must("accept", listener.accept()).await.unwrap();
            drop((server, accepted, client));
        });
        assert_no_corruption("nested runtime polls");
    }
}

/// `block_on` of a runtime called inside one of its own tasks panics as documented;
/// the panic caught, the runtime and its sockets go on working.
#[test]
fn block_on_inside_its_own_task_panics_and_the_runtime_goes_on() {
    let _serial = serial();
    for backend in BACKENDS {
        let Some(rt) = runtime(backend) else {
            continue;
        };
        let rt = std::rc::Rc::new(rt);
        let (client, server) = rt.block_on(async {
            let listener = util::loopback_listener();
            util::connected_pair(&listener).await
        });
        let inner = rt.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                let task = ringsock::spawn(async move { inner.block_on(async { 1 }) });
                task.await
            })
        }));
        let panic = outcome.expect_err("block_on inside its own task worked");
        let message = util::panic_message(panic);
        assert!(
            message.contains("block_on called inside block_on"),
            "{message}"
        );
        rt.block_on(async {
            client.write_all(b"after".to_vec()).await.0.unwrap();
            assert_eq!(util::read_exact(&server, 5).await, b"after", "{backend}");
        });
        drop((client, server));
        drop(rt);
        assert_no_corruption("block_on in its own task");
    }
}

/// Datagrams lent from the receive ring and held by the program while thousands more
/// pass through the ring, then past the drop of their socket and runtime: their bytes
/// never change (the kernel does not reuse a held buffer, and the memory outlives the
/// driver that registered it).
#[test]
fn held_datagrams_keep_their_bytes_while_the_ring_turns_and_after_the_runtime_goes() {
    let _serial = serial();
    const HELD: usize = 8;
    const MORE: u32 = 5000;
    for backend in BACKENDS {
        let Some(rt) = runtime(backend) else {
            continue;
        };
        let held = rt.block_on(async {
            let udp = DatagramSocket::new();
            udp.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            let to = udp.local_addr().unwrap();
            let sender = DatagramSocket::new();
            sender.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            let mut held = Vec::new();
            for i in 0..HELD {
                sender
                    .send_to_addr(vec![i as u8; 100 + i], to)
                    .await
                    .0
                    .unwrap();
                held.push(must("held", udp.recv()).await.unwrap());
            }
            for seq in 0..MORE {
                let payload = vec![0xEE; 64 + (seq % 900) as usize];
                sender.send_to_addr(payload, to).await.0.unwrap();
                if seq % 4 == 3 {
                    while let Poll::Ready(d) = poll_once(pin!(udp.recv())).await {
                        assert!(d.unwrap().data().iter().all(|&b| b == 0xEE));
                    }
                }
                for (i, d) in held.iter().enumerate() {
                    assert!(
                        d.data().len() == 100 + i && d.data().iter().all(|&b| b == i as u8),
                        "{backend}: a held datagram changed"
                    );
                }
            }
            held
        });
        drop(rt);
        for (i, d) in held.iter().enumerate() {
            assert!(
                d.data().len() == 100 + i && d.data().iter().all(|&b| b == i as u8),
                "{backend}: a held datagram changed after its runtime went"
            );
        }
        drop(held);
        assert_no_corruption("held datagrams");
    }
}

/// A JoinHandle is `Send` when its output is: aborted from another thread, the task
/// (and the socket it holds, mid-read) is dropped on its own runtime's thread; the peer
/// sees the connection end.
#[test]
fn a_join_handle_aborted_from_another_thread_drops_the_task_at_home() {
    let _serial = serial();
    for backend in BACKENDS {
        let Some(rt) = runtime(backend) else {
            continue;
        };
        rt.block_on(async {
            let listener = util::loopback_listener();
            let (client, server) = util::connected_pair(&listener).await;
            let task = ringsock::spawn(async move {
                let (result, _) = server.read(Vec::with_capacity(16)).await;
                result.map_err(|err| err.to_string())
            });
            util::yield_now().await;
            let aborter = std::thread::spawn(move || task.abort());
            // The abort reaches this loop from the other thread: the read ends, the
            // socket closes, the client reads end of stream.
            let (read, _) = must("end of stream", client.read(Vec::with_capacity(16))).await;
            assert_eq!(read.unwrap(), 0, "{backend}");
            aborter.join().unwrap();
        });
        drop(rt);
        assert_no_corruption("abort from another thread");
    }
}

/// Counts its wakes.
struct CountingWaker(std::sync::atomic::AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_sleep_moved_to_another_runtime_leaves_that_runtime_s_timers_alone() {
    use ringsock::runtime::sleep_until;
    use std::time::{Duration, Instant};
    let _serial = serial();
    for backend in BACKENDS {
        let (Some(home), Some(other)) = (runtime(backend), runtime(backend)) else {
            continue;
        };
        // Both runtimes' first timer, with one deadline.
        let at = Instant::now() + Duration::from_millis(50);
        let mut moved = Box::pin(sleep_until(at));
        home.block_on(async {
            assert!(poll_once(moved.as_mut()).await.is_pending());
        });
        let woken = other.block_on(async {
            let counter = std::sync::Arc::new(CountingWaker(Default::default()));
            let waker = std::task::Waker::from(counter.clone());
            let mut own = pin!(sleep_until(at));
            let polled = std::future::Future::poll(
                own.as_mut(),
                &mut std::task::Context::from_waker(&waker),
            );
            assert!(polled.is_pending());
            // The sleep of the other runtime, polled here and dropped: it must not take
            // this runtime's timer for its own.
            assert!(poll_once(moved.as_mut()).await.is_pending());
            drop(moved);
            // Due after `own`: by the time it fires, `own` has been woken.
            must("a later sleep", sleep_until(at + Duration::from_millis(1))).await;
            counter.0.load(std::sync::atomic::Ordering::SeqCst)
        });
        assert_eq!(woken, 1, "{backend}: the sleep's own timer was lost");
    }
}

/// The smallest submission queues the builder takes still send any batch: a stream
/// flush that needs several linked sends, and a datagram flush of many sizes (many
/// links), arrive whole and in order.
#[test]
fn the_smallest_rings_send_batches_that_need_long_chains() {
    // Its sockets would count as leaks in a test counting descriptors meanwhile.
    let _serial = serial();
    for backend in BACKENDS {
        for entries in [1, 8] {
            let builder = Builder::new().backend(backend).ring_entries(entries);
            util::on_runtime_of(builder, backend, &|backend: Backend| async move {
                let listener = util::loopback_listener();
                let (client, server) = util::connected_pair(&listener).await;
                // Every other slice of one buffer: no two writes share an iovec, so the
                // flush needs more iovecs than one sendmsg takes.
                let (writes, size) = (5000, 100);
                let source = bytes::Bytes::from(util::pseudo_random_bytes(7, writes * size * 2));
                let reader =
                    ringsock::spawn(async move { util::read_exact(&server, writes * size).await });
                let output = client.output_stream();
                let mut expected = Vec::with_capacity(writes * size);
                for i in 0..writes {
                    let piece = source.slice(i * 2 * size..i * 2 * size + size);
                    expected.extend_from_slice(&piece);
                    output.write(piece).await.unwrap();
                }
                output.flush().await.unwrap();
                let got = reader.await;
                assert!(
                    got == expected,
                    "{backend}, {entries} entries: stream bytes"
                );

                let receiver = util::bound_loopback();
                receiver.control().set_receive_buffer_size(8 << 20).unwrap();
                let sender = util::bound_loopback();
                let to = receiver.local_addr().unwrap();
                let datagrams = sender.output_stream_to_addr(to).unwrap();
                // Sizes that differ from one to the next: no GSO run, a link each.
                let sized = |i: usize| vec![i as u8; 100 + (i % 7) * 3];
                for i in 0..300 {
                    datagrams.write(sized(i)).await.unwrap();
                }
                datagrams.flush().await.unwrap();
                for i in 0..300 {
                    let datagram = util::recv_datagram(&receiver).await;
                    assert_eq!(datagram.as_ref(), sized(i), "{backend}, {entries} entries");
                }
            });
        }
    }
}

/// A pool dropped by one of its own tasks stops without a panic: the other threads are
/// joined, the dropping thread ends once the task returns, and the task's output still
/// reaches its handle.
#[test]
fn a_pool_dropped_by_its_own_task_stops_cleanly() {
    let _serial = serial();
    for backend in BACKENDS {
        let Some(pool) = pool(backend, 2) else {
            continue;
        };
        let handle = pool.handle();
        let (dropped, was_dropped) = std::sync::mpsc::channel();
        let task = handle
            .spawn_on(1, move || async move {
                drop(pool);
                dropped.send(()).unwrap();
                7
            })
            .unwrap();
        was_dropped
            .recv_timeout(util::MUST_HAPPEN)
            .expect("the task went on after dropping its pool");
        let output = ringsock::block_on(async { must("the task", task).await });
        assert_eq!(output.unwrap(), 7, "{backend}");
        let refused = handle.spawn_on(0, || async {});
        assert!(refused.is_err(), "{backend}: a stopped pool took work");
    }
}

/// A pool task that awaits, inside a `block_on` of its own, a task it started on its
/// own pool thread waits for a task that cannot run (that thread's runtime is blocked
/// in the nested `block_on`): the handle says so (`WrongRuntime`) instead of waiting
/// for ever, as a `JoinHandle` in that place does.
#[test]
fn a_pool_handle_awaited_where_its_task_cannot_run_is_an_error_not_a_hang() {
    let _serial = serial();
    for backend in BACKENDS {
        let Some(pool) = pool(backend, 1) else {
            continue;
        };
        let handle = pool.handle();
        let inner = handle.clone();
        let outer = handle
            .spawn_on(0, move || async move {
                let stuck = inner.spawn_on(0, || async { 1 }).unwrap();
                ringsock::block_on(stuck)
            })
            .unwrap();
        let result = ringsock::block_on(async { must("the outer task", outer).await }).unwrap();
        let err = result.expect_err("a task that cannot run gave an output");
        assert_eq!(
            err.status(),
            SocketErrorStatus::WrongRuntime,
            "{backend}: {err}"
        );
        // The thread serves on.
        let later = handle.spawn_on(0, || async { 2 }).unwrap();
        let got = ringsock::block_on(async { must("later", later).await });
        assert_eq!(got.unwrap(), 2, "{backend}");
    }
}
