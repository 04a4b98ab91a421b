//! A task whose every await is ready at once — a socket that always has data, a group
//! member that fails every call — still lets its loop turn: other tasks and timers run,
//! and sockets only the engine can see becoming ready are seen (both drivers); a call the
//! budget turns away loses nothing. Each test runs on a thread of its own watched from
//! outside, since a starved runtime cannot time itself out.

mod util;

use std::cell::Cell;
use std::future::Future;
use std::io::Write;
use std::net::UdpSocket;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::task::Poll;
use std::time::Duration;

use ringsock::runtime::Builder;
use ringsock::{Backend, DatagramGroup, DatagramSocket};

/// Runs `test` on `backend` on a thread of its own; fails if it has not finished within
/// [`util::MUST_HAPPEN`] (the runtime's own timers are what a starved loop never fires).
fn watched<F, Fut>(backend: Backend, what: &str, test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
        return;
    };
    drop(runtime);
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = Builder::new().backend(backend).build().unwrap();
        runtime.block_on(test());
        let _ = done.send(());
    });
    finished
        .recv_timeout(util::MUST_HAPPEN)
        .unwrap_or_else(|_| panic!("{backend}: {what}: the loop never let the others run"));
}

/// A task that ticks a few timers, then says so.
fn ticker() -> Rc<Cell<bool>> {
    let ticked = Rc::new(Cell::new(false));
    let flag = ticked.clone();
    ringsock::runtime::spawn(async move {
        for _ in 0..5 {
            ringsock::runtime::sleep(Duration::from_millis(1)).await;
        }
        flag.set(true);
    });
    ticked
}

/// Keeps `peer`'s side of a stream writing until the flag is set, so that every small
/// read on the other side finds data. Once the reads stop, a full socket does not hold
/// the writer (nor a join of it, which holds the loop that would close the other end)
/// for ever: its writes time out.
fn flood(mut peer: std::net::TcpStream) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    peer.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writing = stop.clone();
    let writer = std::thread::spawn(move || {
        let chunk = [7u8; 64 * 1024];
        while !writing.load(Ordering::Relaxed) {
            if peer.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    (stop, writer)
}

#[test]
fn a_group_member_that_fails_every_call_lets_the_others_and_the_timers_through() {
    for backend in util::BACKENDS {
        watched(backend, "group with a failing member", || async {
            // Never bound: every receive on it fails at once.
            let failing = DatagramSocket::new();
            let good = util::bound_loopback();
            let to = good.local_addr().unwrap();
            let group = DatagramGroup::new(vec![failing, good]);
            let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
            for i in 0..10u8 {
                sender.send_to(&[i], to).unwrap();
            }
            let ticked = ticker();
            let mut got = Vec::new();
            let mut batch = Vec::new();
            let mut errors = 0u64;
            while got.len() < 10 || !ticked.get() {
                batch.clear();
                match group.recv_batch(&mut batch, 16).await {
                    Ok(_) => got.extend(batch.iter().map(|(index, d)| (*index, d.data()[0]))),
                    // As a careless loop does: try again at once.
                    Err(_) => errors += 1,
                }
            }
            let expected: Vec<(usize, u8)> = (0..10).map(|i| (1, i)).collect();
            assert_eq!(got, expected);
            assert!(errors > 0, "the failing member failed");
        });
    }
}

#[test]
fn a_read_loop_on_a_stream_that_always_has_data_lets_the_timers_through() {
    for backend in util::BACKENDS {
        watched(
            backend,
            "read loop on a stream that always has data",
            || async {
                let listener = util::std_listener();
                let (socket, peer) = util::pair_with_std_peer(&listener).await;
                let (stop, writer) = flood(peer);
                let ticked = ticker();
                let mut read = 0u64;
                while !ticked.get() {
                    let (got, _) = socket.read(Vec::with_capacity(16)).await;
                    read += got.unwrap() as u64;
                }
                stop.store(true, Ordering::Relaxed);
                drop(socket);
                writer.join().unwrap();
                assert!(read > 0);
            },
        );
    }
}

/// A timeout around a read loop that always finds data (it spends its task's whole
/// budget in every poll): the timeout still fires, and a timer of the same task polled
/// after such a loop too (a due timer spends budget, but never the last unit the
/// future beside it took).
#[test]
fn a_timeout_around_a_loop_that_spends_the_budget_still_fires() {
    for backend in util::BACKENDS {
        watched(
            backend,
            "timeout around a read loop that always has data",
            || async {
                let listener = util::std_listener();
                let (socket, peer) = util::pair_with_std_peer(&listener).await;
                let (stop, writer) = flood(peer);
                let reading = ringsock::runtime::timeout(Duration::from_millis(20), async {
                    loop {
                        let (got, _) = socket.read(Vec::with_capacity(16)).await;
                        got.unwrap();
                    }
                })
                .await;
                assert!(reading.is_err(), "the loop never ends by itself");
                stop.store(true, Ordering::Relaxed);
                drop(socket);
                writer.join().unwrap();
            },
        );
    }
}

#[test]
fn a_group_error_kept_for_the_next_call_survives_a_call_the_budget_turned_away() {
    for backend in util::BACKENDS {
        watched(backend, "deferred group error", || async {
            // Socket 0 has a datagram; socket 1 has an ICMP port unreachable waiting
            // (connected to a port nobody has, it sent there): the call that takes socket
            // 0's datagram meets socket 1's error, which comes only once, and keeps it
            // for the next call.
            let good = util::bound_loopback();
            let to = good.local_addr().unwrap();
            let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
            sender.send_to(b"first", to).unwrap();
            let nobody = UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let refused = UdpSocket::bind("127.0.0.1:0").unwrap();
            refused.connect(nobody).unwrap();
            refused.send(b"anyone?").unwrap();
            let refused = DatagramSocket::from_std(refused).unwrap();
            let group = DatagramGroup::new(vec![good, refused]);
            // A group of one never-bound socket: each of its calls fails at once, and
            // spends a unit of the poll's budget.
            let spender = DatagramGroup::new(vec![DatagramSocket::new()]);
            let mut out = Vec::new();
            let n = group.recv_batch(&mut out, 8).await.unwrap();
            assert_eq!(n, 1);
            assert_eq!(out[0].0, 0);
            assert_eq!(&*out[0].1, b"first");
            let mut spent = 0;
            let turned_away = std::future::poll_fn(|cx| {
                // In one poll: failing calls until the budget says Pending, then one
                // call of the group, polled once and dropped.
                loop {
                    let mut scratch = Vec::new();
                    let mut spend = std::pin::pin!(spender.recv_batch(&mut scratch, 1));
                    match spend.as_mut().poll(cx) {
                        Poll::Ready(got) => {
                            assert!(got.is_err());
                            spent += 1;
                        }
                        Poll::Pending => break,
                    }
                }
                let mut batch = Vec::new();
                let mut call = std::pin::pin!(group.recv_batch(&mut batch, 8));
                Poll::Ready(call.as_mut().poll(cx).is_pending())
            })
            .await;
            assert!(turned_away, "the budget turned the group call away");
            assert!(spent >= 1, "the failing calls spent the budget");
            util::yield_now().await;
            // The error was kept: without it the call would wait for a datagram.
            let err =
                ringsock::runtime::timeout(util::MUST_HAPPEN / 2, group.recv_batch(&mut out, 8))
                    .await
                    .expect("the kept error comes with the next call")
                    .unwrap_err();
            assert_eq!(
                err.status(),
                ringsock::SocketErrorStatus::ConnectionRefused,
                "{err}"
            );
        });
    }
}
