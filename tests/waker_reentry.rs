//! A waker the engine calls (a program's own `Wake`, wrapping the task's) that uses
//! sockets from inside `wake`: both engines call wakers once they have let go of
//! themselves, so a post, a `detach`, a poll of an operation in flight work there as in
//! the task (they once failed with `ResourceBusy`, or on io_uring ended the process),
//! and sockets it drops there close in that turn.

mod util;

use std::cell::RefCell;
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use ringsock::{DatagramSocket, SocketErrorStatus};

thread_local! {
    /// The socket the waker uses, and where its posts go.
    static TARGET: RefCell<Option<(Rc<DatagramSocket>, SocketAddr)>> = const { RefCell::new(None) };
    /// What each call inside `wake` returned: `None` for success, else the status.
    static OUTCOMES: RefCell<Vec<Option<SocketErrorStatus>>> = const { RefCell::new(Vec::new()) };
}

/// Wraps the task's waker; its `wake` first posts a datagram on the target socket and,
/// when `detach` is set, tries to detach it (dropping what a successful one returns
/// would close the socket, so a success is kept aside).
struct Reentering {
    task: Mutex<Option<Waker>>,
    detach: bool,
}

thread_local! {
    static DETACHED: RefCell<Vec<ringsock::net::Detached>> = const { RefCell::new(Vec::new()) };
}

impl WrapsTask for Reentering {
    fn task(&self) -> &Mutex<Option<Waker>> {
        &self.task
    }
}

impl Wake for Reentering {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        TARGET.with(|target| {
            let Some((socket, to)) = target.borrow().clone() else {
                return;
            };
            let posted = socket
                .post_to_addr(b"from a waker".to_vec(), to)
                .err()
                .map(|(err, _)| err.status());
            OUTCOMES.with(|o| o.borrow_mut().push(posted));
            if self.detach {
                match socket.detach() {
                    Ok(detached) => {
                        DETACHED.with(|d| d.borrow_mut().push(detached));
                        OUTCOMES.with(|o| o.borrow_mut().push(None));
                    }
                    Err(err) => OUTCOMES.with(|o| o.borrow_mut().push(Some(err.status()))),
                }
            }
        });
        if let Some(task) = self.task.lock().unwrap().as_ref() {
            task.wake_by_ref();
        }
    }
}

/// A waker of this file's: it does its work in `wake`, then wakes the task's waker it
/// keeps here.
trait WrapsTask: Wake + Send + Sync + 'static {
    fn task(&self) -> &Mutex<Option<Waker>>;
}

/// Polls `future` with `waker` in place of the task's (which `waker` wakes after).
struct Under<F, W> {
    future: Pin<Box<F>>,
    waker: Arc<W>,
}

impl<F: Future, W: WrapsTask> Future for Under<F, W> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        *self.waker.task().lock().unwrap() = Some(cx.waker().clone());
        let waker = Waker::from(self.waker.clone());
        self.future.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[test]
fn a_socket_used_inside_the_engines_wake_works_there_and_after() {
    util::on_each_receive_path(|backend| async move {
        for detach in [false, true] {
            let socket = Rc::new(DatagramSocket::new());
            socket.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = socket.local_addr().unwrap();
            let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            sink.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
            let sink_addr = sink.local_addr().unwrap();
            TARGET.with(|t| *t.borrow_mut() = Some((socket.clone(), sink_addr)));
            OUTCOMES.with(|o| o.borrow_mut().clear());

            let receiver = socket.clone();
            let receive = Under {
                future: Box::pin(async move { receiver.recv().await.map(|d| d.to_vec()) }),
                waker: Arc::new(Reentering {
                    task: Mutex::new(None),
                    detach,
                }),
            };
            let task = ringsock::spawn(receive);
            // The receive waits (armed, its waker with the engine) before the datagram.
            for _ in 0..3 {
                util::yield_now().await;
            }
            UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .send_to(b"first", addr)
                .unwrap();
            let first = util::must("the first datagram", task).await;
            TARGET.with(|t| *t.borrow_mut() = None);
            let outcomes = OUTCOMES.with(|o| o.borrow().clone());
            assert!(!outcomes.is_empty(), "{backend}: the waker never ran");
            assert!(
                outcomes.iter().all(Option::is_none),
                "{backend}, detach {detach}: {outcomes:?}"
            );
            let detached = DETACHED.with(|d| d.borrow_mut().pop());
            if detached.is_some() {
                // The engine let it go: the socket here is gone, as a detach says.
                assert_eq!(
                    first.unwrap_err().status(),
                    SocketErrorStatus::UnsupportedOperation
                );
                continue;
            }
            assert_eq!(first.unwrap(), b"first", "{backend}, detach {detach}");

            // Whatever failed inside the wake, the socket works on here.
            UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .send_to(b"second", addr)
                .unwrap();
            let second = util::must("the second datagram", socket.recv())
                .await
                .unwrap();
            assert_eq!(second.data(), b"second", "{backend}, detach {detach}");
            let (sent, _) = socket.send_to_addr(b"reply".to_vec(), sink_addr).await;
            sent.unwrap();
            socket.settle_posts().await.unwrap();
            let posts = socket.post_stats();
            let mut got = vec![0u8; 64];
            // The posts that went, then the reply, in order.
            for _ in 0..posts.sent {
                let (n, _) = sink.recv_from(&mut got).unwrap();
                assert_eq!(&got[..n], b"from a waker");
            }
            let (n, _) = sink.recv_from(&mut got).unwrap();
            assert_eq!(&got[..n], b"reply", "{backend}, detach {detach}");
            if detach {
                let detached = socket.detach().expect("a detach outside any wake");
                drop(detached);
            }
        }
    });
}

thread_local! {
    /// Sockets the waker drops.
    static VICTIMS: RefCell<Vec<DatagramSocket>> = const { RefCell::new(Vec::new()) };
}

/// Wraps the task's waker; its `wake` first drops [`VICTIMS`].
struct Dropping(Mutex<Option<Waker>>);

impl WrapsTask for Dropping {
    fn task(&self) -> &Mutex<Option<Waker>> {
        &self.0
    }
}

impl Wake for Dropping {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        drop(VICTIMS.with(|victims| std::mem::take(&mut *victims.borrow_mut())));
        if let Some(task) = self.0.lock().unwrap().as_ref() {
            task.wake_by_ref();
        }
    }
}

/// Sockets with their receives armed, dropped inside the engine's wake: their receives
/// end and their descriptors close in that turn's wake of the loop, not when the
/// runtime goes (their ports free again is what shows it).
#[test]
fn sockets_dropped_inside_the_engines_wake_close() {
    util::on_each_receive_path(|backend| async move {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ports = Vec::new();
        for _ in 0..3 {
            let victim = DatagramSocket::new();
            victim.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            let at = victim.local_addr().unwrap();
            client.send_to(b"one", at).unwrap();
            // Received: its receive (a multishot on io_uring) is armed from now on.
            util::must("a victim's datagram", victim.recv())
                .await
                .unwrap();
            ports.push(at);
            VICTIMS.with(|victims| victims.borrow_mut().push(victim));
        }
        let socket = Rc::new(DatagramSocket::new());
        socket.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let receiver = socket.clone();
        let task = ringsock::spawn(Under {
            future: Box::pin(async move { receiver.recv().await.map(|d| d.to_vec()) }),
            waker: Arc::new(Dropping(Mutex::new(None))),
        });
        for _ in 0..3 {
            util::yield_now().await;
        }
        client.send_to(b"wake", addr).unwrap();
        assert_eq!(util::must("the wake", task).await.unwrap(), b"wake");
        assert!(
            VICTIMS.with(|victims| victims.borrow().is_empty()),
            "{backend}"
        );
        util::must("the victims' ports to be free again", async {
            while !ports.iter().all(|at| std::net::UdpSocket::bind(at).is_ok()) {
                util::yield_now().await;
            }
        })
        .await;
    });
}

/// What a waker polls from inside `wake`: a read in flight on another connection.
type Victim = Pin<Box<dyn Future<Output = ringsock::Result<Vec<u8>>>>>;

/// What a poll of the [`Victim`] inside `wake` gave: `None` while pending, else the
/// bytes read or the status it failed with.
type PolledInWake = Option<Result<Vec<u8>, SocketErrorStatus>>;

thread_local! {
    /// The read the waker polls, kept while it is pending.
    static IN_FLIGHT: RefCell<Option<Victim>> = const { RefCell::new(None) };
    /// What each poll inside `wake` gave.
    static POLLED_IN_WAKE: RefCell<Vec<PolledInWake>> = const { RefCell::new(Vec::new()) };
}

/// Wraps the task's waker; its `wake` first polls [`IN_FLIGHT`]: with the task's waker,
/// or (`nested`) inside `block_on` of a runtime of its own, as a waker that drives other
/// work might.
struct PollingInFlight {
    task: Mutex<Option<Waker>>,
    nested: bool,
}

impl WrapsTask for PollingInFlight {
    fn task(&self) -> &Mutex<Option<Waker>> {
        &self.task
    }
}

impl Wake for PollingInFlight {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let task = self.task.lock().unwrap().clone();
        if let (Some(task), Some(mut victim)) = (&task, IN_FLIGHT.with(|v| v.borrow_mut().take())) {
            let polled = if self.nested {
                let inner = ringsock::Runtime::new().expect("a runtime inside the waker");
                inner.block_on(util::poll_once(Pin::new(&mut victim)))
            } else {
                victim.as_mut().poll(&mut Context::from_waker(task))
            };
            match polled {
                Poll::Pending => {
                    POLLED_IN_WAKE.with(|p| p.borrow_mut().push(None));
                    IN_FLIGHT.with(|v| *v.borrow_mut() = Some(victim));
                }
                Poll::Ready(result) => POLLED_IN_WAKE.with(|p| {
                    p.borrow_mut()
                        .push(Some(result.map_err(|err| err.status())))
                }),
            }
        }
        if let Some(task) = task {
            task.wake_by_ref();
        }
    }
}

/// A read in flight on a connection of its own, polled by a [`PollingInFlight`] waker
/// the engine calls; then its peer sends "victim". Returns what the polls inside the
/// wake gave, the read if it is still in flight, and its socket.
async fn read_polled_inside_the_wake(
    backend: ringsock::Backend,
    nested: bool,
) -> (
    Vec<PolledInWake>,
    Option<Victim>,
    Rc<ringsock::StreamSocket>,
) {
    let listener = util::loopback_listener();
    let (waking_client, waking_server) = util::connected_pair(&listener).await;
    let (victim_client, victim_server) = util::connected_pair(&listener).await;
    let victim_server = Rc::new(victim_server);
    let reader = victim_server.clone();
    let mut victim: Victim = Box::pin(async move {
        let (read, buf) = reader.read(Vec::with_capacity(64)).await;
        read.map(|n| buf[..n].to_vec())
    });
    assert!(
        util::poll_once(Pin::new(&mut victim)).await.is_pending(),
        "{backend}"
    );
    IN_FLIGHT.with(|v| *v.borrow_mut() = Some(victim));
    POLLED_IN_WAKE.with(|p| p.borrow_mut().clear());

    let woken_read = Under {
        future: Box::pin(waking_server.read(Vec::with_capacity(16))),
        waker: Arc::new(PollingInFlight {
            task: Mutex::new(None),
            nested,
        }),
    };
    let write = async { waking_client.write_all(b"wake".to_vec()).await.0 };
    let ((read, _), written) = util::must("the wake", util::join(woken_read, write)).await;
    assert_eq!(read.unwrap(), 4, "{backend}");
    written.unwrap();

    let polled = POLLED_IN_WAKE.with(|p| p.borrow().clone());
    assert!(
        !polled.is_empty(),
        "{backend}: the waker never polled the read"
    );
    let (sent, _) = victim_client.write_all(b"victim".to_vec()).await;
    sent.unwrap();
    let in_flight = IN_FLIGHT.with(|v| v.borrow_mut().take());
    (polled, in_flight, victim_server)
}

/// A read in flight polled by a waker the engine calls (which on io_uring once ended the
/// process: the engine, busy calling the waker, looked like another runtime's, and the
/// read's buffer could not be taken back; epoll failed it busy) stays in flight and
/// completes with the bytes.
#[test]
fn an_operation_in_flight_polled_inside_the_engines_wake_stays_in_flight() {
    util::on_each_backend(|backend| async move {
        let (polled, in_flight, _socket) = read_polled_inside_the_wake(backend, false).await;
        assert!(polled.iter().all(Option::is_none), "{backend}: {polled:?}");
        let victim = in_flight.expect("still in flight");
        let got = util::must("the read in flight", victim).await.unwrap();
        assert_eq!(got, b"victim", "{backend}");
    });
}

/// The same read polled inside the wake under another runtime (which on io_uring ended
/// the process too): that is the misuse it is, WrongRuntime, and the connection goes on
/// with its bytes exact.
#[test]
fn an_operation_polled_under_another_runtime_inside_the_engines_wake_is_wrong_runtime() {
    util::on_each_backend(|backend| async move {
        let (polled, in_flight, socket) = read_polled_inside_the_wake(backend, true).await;
        assert!(in_flight.is_none(), "{backend}: {polled:?}");
        match polled.last() {
            Some(Some(Err(SocketErrorStatus::WrongRuntime))) => {}
            other => panic!("{backend}: {other:?}"),
        }
        let got = util::read_exact(&socket, 6).await;
        assert_eq!(got, b"victim", "{backend}");
    });
}
