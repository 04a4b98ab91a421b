//! Misuse of the safe API: futures and sockets used on a runtime they do not belong to,
//! after their runtime was dropped, on two threads at once, and cancels racing the
//! completions of reused slots. Each gets a `WrongRuntime` error or works; none may take
//! another runtime's completion, hang, or let the kernel write into freed memory. The
//! whole file runs under an allocator that poisons freed blocks and checks the poison
//! stayed intact (see `util::poison`).

mod util;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::Poll;

use ringsock::runtime::Builder;
use ringsock::{Backend, DatagramSocket, Runtime, SocketErrorStatus, StreamSocket};

use util::{connected_pair, loopback_listener, must, poll_once, read_exact, BACKENDS};

#[global_allocator]
static ALLOC: util::poison::PoisonAlloc = util::poison::PoisonAlloc;

fn runtime(backend: Backend) -> Option<Runtime> {
    util::build_or_skip(Builder::new().backend(backend), backend)
}

/// A connected pair made on `runtime`, so both belong to it.
fn pair_on(runtime: &Runtime) -> (StreamSocket, StreamSocket) {
    runtime.block_on(async {
        let listener = loopback_listener();
        connected_pair(&listener).await
    })
}

/// Two runtimes of `backend` on this thread.
fn two_runtimes(backend: Backend) -> Option<(Runtime, Runtime)> {
    Some((runtime(backend)?, runtime(backend)?))
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

fn assert_no_corruption(what: &str) {
    assert_eq!(
        util::poison::corrupted(),
        0,
        "{what}: memory was written after it was freed"
    );
}

/// A read started on runtime A and polled inside runtime B's `block_on` (where B has a
/// completion of its own waiting) ends with WrongRuntime and its own buffer; the bytes
/// the peer sends afterwards arrive whole on A, and nothing was written into freed
/// memory.
#[test]
fn a_read_polled_under_another_runtime_fails_and_takes_nothing() {
    for backend in BACKENDS {
        let Some((a, b)) = two_runtimes(backend) else {
            continue;
        };
        let (client, server) = pair_on(&a);
        let mut read = Box::pin(server.read(Vec::with_capacity(64)));
        a.block_on(async {
            assert!(poll_once(read.as_mut()).await.is_pending());
        });
        let (result, buf) = b.block_on(async {
            // B's own traffic: a completion B will reap while A's read is polled here.
            let listener = loopback_listener();
            let (b_client, b_server) = connected_pair(&listener).await;
            b_client.write_all(b"B's seven".to_vec()).await.0.unwrap();
            let got = read_exact(&b_server, 9).await;
            assert_eq!(got, b"B's seven");
            b_client.write_all(b"more".to_vec()).await.0.unwrap();
            match poll_once(read.as_mut()).await {
                Poll::Ready(outcome) => outcome,
                Poll::Pending => panic!("{backend}: polled on the wrong runtime, it waited"),
            }
        });
        assert_wrong_runtime(result, "read polled on runtime B");
        assert!(
            buf.is_empty(),
            "{backend}: the buffer came back filled: {buf:?}"
        );
        drop(buf);
        drop(read);
        a.block_on(async {
            client.write_all(b"for A".to_vec()).await.0.unwrap();
            let got = must("A reads its bytes", read_exact(&server, 5)).await;
            assert_eq!(got, b"for A", "{backend}");
        });
        assert_no_corruption(&format!("{backend}: read polled on another runtime"));
    }
}

/// A socket bound to runtime A, used inside runtime B: every kind of call fails with
/// WrongRuntime at once (nothing is submitted on either), and the socket still works on
/// A afterwards.
#[test]
fn a_socket_used_from_two_runtimes_fails_on_the_other() {
    for backend in BACKENDS {
        let Some((a, b)) = two_runtimes(backend) else {
            continue;
        };
        let listener = loopback_listener();
        let udp = DatagramSocket::new();
        udp.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let (client, server) = a.block_on(async {
            let pair = connected_pair(&listener).await;
            udp.send_to_addr(b"bind".to_vec(), udp_addr)
                .await
                .0
                .unwrap();
            let datagram = must("A receives", udp.recv()).await.unwrap();
            assert_eq!(datagram.data(), b"bind");
            pair
        });
        b.block_on(async {
            let (read, _) = must("read on B", server.read(Vec::with_capacity(8))).await;
            assert_wrong_runtime(read, "read");
            let (write, _) = must("write on B", client.write(b"x".to_vec())).await;
            assert_wrong_runtime(write, "write");
            let output = client.output_stream();
            // Not even queued: a flush at home must not send it.
            let queued = must("queue on B", output.write("queued")).await;
            assert_wrong_runtime(queued.map(drop), "queue");
            assert!(
                output.try_write("queued").is_err(),
                "{backend}: try_write on B"
            );
            assert_wrong_runtime(must("flush on B", output.flush()).await, "flush");
            let accepted = must("accept on B", listener.accept()).await;
            assert_wrong_runtime(accepted.map(drop), "accept");
            let (sent, _) = must("send on B", udp.send_to_addr(b"x".to_vec(), udp_addr)).await;
            assert_wrong_runtime(sent, "send_to");
            let received = must("recv on B", udp.recv()).await;
            assert_wrong_runtime(received.map(drop), "recv");
        });
        a.block_on(async {
            let new_client = util::connect(listener.local_addr().unwrap()).await;
            let accepted = must("accept on A", listener.accept()).await.unwrap();
            new_client.write_all(b"ok".to_vec()).await.0.unwrap();
            assert_eq!(read_exact(&accepted, 2).await, b"ok", "{backend}");
            udp.send_to_addr(b"back".to_vec(), udp_addr)
                .await
                .0
                .unwrap();
            let datagram = must("A receives again", udp.recv()).await.unwrap();
            assert_eq!(datagram.data(), b"back", "{backend}");
            drop((client, server));
        });
        assert_no_corruption(&format!("{backend}: socket on two runtimes"));
    }
}

/// A socket whose runtime was dropped says so on the next runtime; a read future that
/// was in flight when the runtime went gives its buffer back with the same status.
#[test]
fn a_socket_after_its_runtime_was_dropped_says_so() {
    for backend in BACKENDS {
        let Some(a) = runtime(backend) else {
            continue;
        };
        let (client, server) = pair_on(&a);
        let mut read = Box::pin(server.read(Vec::with_capacity(64)));
        a.block_on(async {
            assert!(poll_once(read.as_mut()).await.is_pending());
        });
        drop(a);
        let Some(b) = runtime(backend) else {
            continue;
        };
        b.block_on(async {
            let Poll::Ready((result, buf)) = poll_once(read.as_mut()).await else {
                panic!("{backend}: a read whose runtime was dropped waited");
            };
            assert_wrong_runtime(result, "read in flight when its runtime was dropped");
            assert!(buf.is_empty());
            let (write, _) = client.write(b"late".to_vec()).await;
            match write {
                Err(err) => {
                    assert_eq!(err.status(), SocketErrorStatus::WrongRuntime);
                    assert!(err.to_string().contains("dropped"), "{err}");
                }
                Ok(n) => panic!("{backend}: a write after the runtime was dropped sent {n}"),
            }
        });
        drop(read);
        drop((client, server));
        assert_no_corruption(&format!("{backend}: runtime dropped"));
    }
}

/// A future polled with no ringsock runtime at all (a foreign executor) fails the same
/// way instead of waiting forever.
#[test]
fn a_future_polled_outside_any_runtime_fails() {
    for backend in BACKENDS {
        let Some(a) = runtime(backend) else {
            continue;
        };
        let (_client, server) = pair_on(&a);
        let mut read = pin!(server.read(Vec::with_capacity(16)));
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match read.as_mut().poll(&mut cx) {
            Poll::Ready((result, _)) => assert_wrong_runtime(result, "read with no runtime"),
            Poll::Pending => panic!("{backend}: a read with no runtime waited"),
        }
        assert_no_corruption(&format!("{backend}: no runtime"));
    }
}

/// Two runtimes on two threads, each echoing its own traffic at full speed: every byte
/// arrives exactly where it was sent.
#[test]
fn two_runtimes_on_two_threads_keep_their_bytes_apart() {
    for backend in BACKENDS {
        if runtime(backend).is_none() {
            continue;
        }
        let threads: Vec<_> = (0..2u8)
            .map(|id| {
                std::thread::spawn(move || {
                    let rt = runtime(backend).expect("started above");
                    rt.block_on(async {
                        let listener = loopback_listener();
                        let (client, server) = connected_pair(&listener).await;
                        let echo = ringsock::spawn(util::echo(server));
                        let data = util::pseudo_random_bytes(u64::from(id) + 7, 4 << 20);
                        for chunk in data.chunks(64 * 1024) {
                            util::round_trip(&client, chunk).await;
                        }
                        drop(client);
                        must("echo ends", echo).await
                    })
                })
            })
            .collect();
        for thread in threads {
            assert_eq!(thread.join().expect("thread"), 4 << 20, "{backend}");
        }
        assert_no_corruption(&format!("{backend}: two threads"));
    }
}

/// Thousands of reads started and dropped while a peer keeps writing a counting
/// sequence: cancels race completions, and every slot is reused at once. Whatever the
/// completed reads got must be in order (bytes of dropped reads are lost, never
/// misplaced): a completion landing on the wrong slot would show bytes out of order or
/// bytes nobody sent.
#[test]
fn cancels_racing_completions_of_reused_slots_misplace_nothing() {
    const ROUNDS: usize = 4000;
    for backend in BACKENDS {
        let Some(rt) = runtime(backend) else {
            continue;
        };
        rt.block_on(async {
            let listener = loopback_listener();
            let (client, server) = connected_pair(&listener).await;
            let writer = ringsock::spawn(async move {
                let mut next = 0u32;
                for _ in 0..ROUNDS {
                    let chunk: Vec<u8> = (0..16).flat_map(|i| (next + i).to_be_bytes()).collect();
                    next += 16;
                    if client.write_all(chunk).await.0.is_err() {
                        break;
                    }
                    util::yield_now().await;
                }
                next
            });
            let mut chunks = Vec::new();
            for round in 0..ROUNDS {
                let mut read = Box::pin(server.read(Vec::with_capacity(37 + round % 64)));
                let mut polled = poll_once(read.as_mut()).await;
                if polled.is_pending() && round % 2 == 0 {
                    // Let the loop turn once: the completion may come in, or not yet.
                    util::yield_now().await;
                    polled = poll_once(read.as_mut()).await;
                }
                // Pending here: dropped in flight (cancelled, or completed unseen).
                if let Poll::Ready((result, buf)) = polled {
                    let n = result.expect("read");
                    chunks.push(buf[..n].to_vec());
                }
            }
            must("writer", writer).await;
            check_chunks_in_order(&chunks, backend);
        });
        drop(rt);
        assert_no_corruption(&format!("{backend}: cancel races"));
    }
}

/// Datagram receives raced the same way: every datagram that comes out is one that was
/// sent, whole, and in sending order.
#[test]
fn datagram_receives_dropped_in_flight_misplace_nothing() {
    const ROUNDS: u32 = 3000;
    for backend in BACKENDS {
        let Some(rt) = runtime(backend) else {
            continue;
        };
        rt.block_on(async {
            let receiver = DatagramSocket::new();
            receiver.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            let to: SocketAddr = receiver.local_addr().unwrap();
            let sender = DatagramSocket::new();
            sender.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            let mut last = None;
            for seq in 0..ROUNDS {
                let payload: Vec<u8> = seq.to_be_bytes().repeat(1 + (seq % 40) as usize);
                sender.send_to_addr(payload, to).await.0.unwrap();
                let mut recv = Box::pin(receiver.recv());
                if let Poll::Ready(datagram) = poll_once(recv.as_mut()).await {
                    let datagram = datagram.expect("recv");
                    let data = datagram.data();
                    let got = u32::from_be_bytes(data[..4].try_into().unwrap());
                    assert_eq!(data, &got.to_be_bytes().repeat(1 + (got % 40) as usize));
                    assert!(
                        last.is_none_or(|last| got > last),
                        "{backend}: {got} after {last:?}"
                    );
                    assert!(got <= seq, "{backend}: datagram {got} before it was sent");
                    last = Some(got);
                }
            }
        });
        drop(rt);
        assert_no_corruption(&format!("{backend}: datagram cancel races"));
    }
}

/// Byte `at` of the stream the writer sends: 4-byte big-endian counters 0, 1, 2, ...
fn stream_byte(at: u64) -> u8 {
    ((at / 4) as u32).to_be_bytes()[(at % 4) as usize]
}

/// Checks that each chunk a read returned is a piece of the writer's stream, and that
/// the pieces come in stream order without overlapping (pieces taken by reads that were
/// dropped are simply missing).
fn check_chunks_in_order(chunks: &[Vec<u8>], backend: Backend) {
    let mut end = 0u64;
    let mut checked = 0;
    for chunk in chunks.iter().filter(|chunk| chunk.len() >= 8) {
        // Where in the stream the chunk starts: read a counter at each alignment.
        let start = (0..4).find_map(|align| {
            let value = u32::from_be_bytes(chunk[align..align + 4].try_into().unwrap());
            let start = (u64::from(value) * 4).checked_sub(align as u64)?;
            let matches = chunk
                .iter()
                .enumerate()
                .all(|(i, &byte)| byte == stream_byte(start + i as u64));
            matches.then_some(start)
        });
        let Some(start) = start else {
            panic!(
                "{backend}: a read returned bytes that are not a piece of the stream: {chunk:?}"
            );
        };
        assert!(
            start >= end,
            "{backend}: a piece at byte {start} came after the piece ending at {end}"
        );
        end = start + chunk.len() as u64;
        checked += 1;
    }
    assert!(checked > 0, "{backend}: no read completed while polled");
}

/// A timer polled where no ringsock runtime runs would never be woken: it says so (as
/// `spawn` does) rather than firing at once and turning a program's waits and timeouts
/// into a busy loop. One already due is simply ready.
#[test]
fn a_timer_polled_outside_any_runtime_says_so_rather_than_firing_early() {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut due = pin!(ringsock::runtime::sleep(std::time::Duration::ZERO));
    assert!(due.as_mut().poll(&mut cx).is_ready());
    let later = std::panic::catch_unwind(|| {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut sleep = pin!(ringsock::runtime::sleep(std::time::Duration::from_secs(60)));
        let _ = sleep.as_mut().poll(&mut cx);
    });
    let message = util::panic_message(later.expect_err("a sleep polled outside a runtime"));
    assert!(message.contains("outside a ringsock runtime"), "{message}");
}

/// A task's handle awaited by another executor on the thread of the task's runtime,
/// while that runtime is not running: the task could never run, so the poll says so
/// instead of the program hanging.
#[test]
fn a_join_handle_awaited_under_another_executor_on_its_runtime_s_thread_says_so() {
    for backend in BACKENDS {
        let Some(runtime) = runtime(backend) else {
            continue;
        };
        let handle = runtime.spawn(async { 5 });
        let tokio = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let awaited =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tokio.block_on(handle)));
        assert!(awaited.is_err(), "{backend}: it waited for ever, or ran");
        // Awaited inside its own runtime, a handle works.
        let handle = runtime.spawn(async { 6 });
        assert_eq!(runtime.block_on(handle), 6, "{backend}");
    }
}
