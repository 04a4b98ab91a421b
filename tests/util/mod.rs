//! Shared test helpers: every test runs once per driver, bounded in time.
#![allow(dead_code)]

use std::future::{poll_fn, Future};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use ringsock::runtime::{timeout, Builder};
use ringsock::{
    Backend, Datagram, DatagramSocket, Forward, JoinHandle, ReceiveRing, Runtime, StreamSocket,
    StreamSocketListener,
};

pub mod child;
pub mod netns;
pub mod poison;
pub mod tokio_rt;

/// The longest any one test body may run on one driver before it counts as a hang.
pub const TEST_LIMIT: Duration = Duration::from_secs(120);

/// How long a wait for something that must happen may take before the test fails
/// (instead of hanging until TEST_LIMIT). Never used to make something happen.
pub const MUST_HAPPEN: Duration = Duration::from_secs(20);

/// The drivers every test runs on.
pub const BACKENDS: [Backend; 2] = [Backend::Uring, Backend::Epoll];

/// Runs `test` on a fresh runtime of each driver, failing (not hanging) past TEST_LIMIT.
/// Where io_uring cannot start, says so and skips that driver instead of passing silently.
pub fn on_each_backend<F, Fut>(test: F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in BACKENDS {
        on_backend(backend, &test);
    }
}

/// Runs `test` on each driver (see [`on_each_backend`]), each on a thread inside a
/// network namespace of its own, deleted after; says "skipped" where none can be made.
/// One namespace per driver: what the kernel tears down after a test (an interface
/// whose last descriptor an io_uring worker let go of) cannot meet the next driver's.
pub fn on_each_backend_in_netns<F, Fut>(tag: &str, test: F)
where
    F: Fn(Backend) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()>,
{
    let test = std::sync::Arc::new(test);
    for backend in BACKENDS {
        let test = test.clone();
        match netns::Netns::create(tag) {
            Ok(netns) => netns.run(move || on_backend(backend, &*test)),
            Err(why) => return netns::skip(&why),
        }
    }
}

/// Runs `test` on each driver, then once more on io_uring without incremental buffers
/// (`Capability::IncrementalBuffers` disabled): the receive ring's fallback layout, one
/// datagram per buffer, which kernels before that feature get.
pub fn on_each_receive_path<F, Fut>(test: F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    on_each_backend(&test);
    let builder = Builder::new()
        .backend(Backend::Uring)
        .disable(ringsock::Capability::IncrementalBuffers);
    on_runtime_of(builder, Backend::Uring, &test);
}

/// Runs `test` on one driver (see [`on_each_backend`]).
pub fn on_backend<F, Fut>(backend: Backend, test: &F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    on_runtime_of(Builder::new().backend(backend), backend, test);
}

/// Runs `test` like [`on_backend`], on the runtime `builder` (set to `backend`) makes.
pub fn on_runtime_of<F, Fut>(builder: Builder, backend: Backend, test: &F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(runtime) = build_or_skip(builder, backend) else {
        return;
    };
    runtime.block_on(async {
        if timeout(TEST_LIMIT, test(backend)).await.is_err() {
            panic!("test did not finish within {TEST_LIMIT:?} on {backend}");
        }
    });
}

/// The runtime `builder` (set to `backend`) makes; `None`, said on stderr, where io_uring
/// cannot start and CI does not require it (`RINGSOCK_REQUIRE_URING`).
pub fn build_or_skip(builder: Builder, backend: Backend) -> Option<Runtime> {
    match builder.build() {
        Ok(runtime) => Some(runtime),
        Err(err)
            if backend == Backend::Uring
                && std::env::var_os("RINGSOCK_REQUIRE_URING").is_none() =>
        {
            eprintln!("skipped on io_uring: {err}");
            None
        }
        Err(err) => panic!("cannot start the {backend} runtime: {err}"),
    }
}

/// A datagram socket bound to an ephemeral port on 127.0.0.1.
pub fn bound_loopback() -> DatagramSocket {
    let socket = DatagramSocket::new();
    socket
        .bind_addr(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))
        .unwrap();
    socket
}

/// A loopback datagram socket whose receive ring holds 8 buffers of 2 KiB, so that the
/// ring goes round often and the datagrams it lends are few.
pub fn small_ring_loopback() -> DatagramSocket {
    let socket = DatagramSocket::new();
    let ring = ReceiveRing {
        buffers: 8,
        buffer_size: 2048,
    };
    socket.control().set_receive_ring(ring).unwrap();
    socket
        .bind_addr(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0))
        .unwrap();
    socket
}

/// Sends `payload` from `source` to `relay` and takes it there as a [`Forward`] (lent
/// from `relay`'s ring).
pub async fn forward_through(
    source: &DatagramSocket,
    relay: &DatagramSocket,
    payload: Vec<u8>,
) -> Forward {
    let to_relay = relay.local_addr().unwrap();
    source.send_to_addr(payload, to_relay).await.0.unwrap();
    recv_datagram(relay).await.into_forward()
}

/// The next datagram on `socket`, which must arrive within [`MUST_HAPPEN`].
pub async fn recv_datagram(socket: &DatagramSocket) -> Datagram {
    timeout(MUST_HAPPEN, socket.recv())
        .await
        .expect("a datagram must arrive")
        .unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Awaits `future`, failing the test with `what` if it has not finished within
/// [`MUST_HAPPEN`]: a hang becomes a message naming the step that hung.
pub async fn must<F: Future>(what: &str, future: F) -> F::Output {
    match timeout(MUST_HAPPEN, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: did not finish within {MUST_HAPPEN:?}"),
    }
}

/// Polls `future` exactly once with the current task's context.
pub async fn poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
    let mut future = Some(future);
    poll_fn(|cx| Poll::Ready(future.take().expect("polled once").poll(cx))).await
}

/// Gives the loop one turn: it runs the other ready tasks and parks once (submitting
/// what was queued and collecting what completed) before this task goes on.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Runs both futures concurrently on this task; returns both outputs.
pub async fn join<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    let mut out_a = None;
    let mut out_b = None;
    poll_fn(|cx| {
        if out_a.is_none() {
            if let Poll::Ready(out) = a.as_mut().poll(cx) {
                out_a = Some(out);
            }
        }
        if out_b.is_none() {
            if let Poll::Ready(out) = b.as_mut().poll(cx) {
                out_b = Some(out);
            }
        }
        if out_a.is_some() && out_b.is_some() {
            Poll::Ready((out_a.take().unwrap(), out_b.take().unwrap()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// The next item of a stream.
pub async fn next<S: futures_core::Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// A listener on 127.0.0.1 with a port chosen by the kernel.
pub fn loopback_listener() -> StreamSocketListener {
    StreamSocketListener::bind_addr((Ipv4Addr::LOCALHOST, 0).into()).expect("bind 127.0.0.1:0")
}

/// A client connected to `addr`.
pub async fn connect(addr: SocketAddr) -> StreamSocket {
    let socket = StreamSocket::new();
    must("connect", socket.connect_addr(addr))
        .await
        .unwrap_or_else(|err| panic!("connect to {addr}: {err}"));
    socket
}

/// A connected pair: (client, the listener's side of it).
pub async fn connected_pair(listener: &StreamSocketListener) -> (StreamSocket, StreamSocket) {
    let client = connect(listener.local_addr().unwrap()).await;
    let server = must("accept", listener.accept()).await.expect("accept");
    assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
    (client, server)
}

/// A port on 127.0.0.1 that nothing listens on: bound by the kernel's choice, then
/// released.
pub fn free_port() -> u16 {
    let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().unwrap().port()
}

/// Reads exactly `n` bytes with `StreamSocket::read`, in chunks of up to 64 KiB; panics
/// on an error or an early end of stream.
pub async fn read_exact(socket: &StreamSocket, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    // Bounded: every round adds at least one byte or returns.
    while out.len() < n {
        let want = (n - out.len()).min(64 * 1024);
        let (result, buf) = socket.read(Vec::with_capacity(want)).await;
        match result {
            Ok(0) => panic!("end of stream after {} of {n} bytes", out.len()),
            Ok(got) => out.extend_from_slice(&buf[..got]),
            Err(err) => panic!("read after {} of {n} bytes: {err}", out.len()),
        }
    }
    out
}

/// The most [`read_to_end`] accepts before it fails: no test sends more to one socket.
pub const READ_TO_END_LIMIT: usize = 64 << 20;

/// Reads until end of stream; panics on an error or past [`READ_TO_END_LIMIT`] bytes.
pub async fn read_to_end(socket: &StreamSocket) -> Vec<u8> {
    let mut out = Vec::new();
    // Bounded: every round adds at least one byte, up to the limit, or returns.
    while out.len() <= READ_TO_END_LIMIT {
        let (result, buf) = socket.read(Vec::with_capacity(64 * 1024)).await;
        match result {
            Ok(0) => return out,
            Ok(got) => out.extend_from_slice(&buf[..got]),
            Err(err) => panic!("read after {} bytes: {err}", out.len()),
        }
    }
    panic!("more than {READ_TO_END_LIMIT} bytes before end of stream")
}

/// Echoes everything `socket` receives back to it until end of stream, then closes its
/// sending side. Returns the number of bytes echoed (at most READ_TO_END_LIMIT).
pub async fn echo(socket: StreamSocket) -> usize {
    let mut total = 0;
    let mut buf = Vec::with_capacity(64 * 1024);
    // Bounded: every round echoes at least one byte, up to the limit, or ends.
    loop {
        assert!(
            total <= READ_TO_END_LIMIT,
            "echoed more than any test sends"
        );
        buf.clear();
        let (result, back) = socket.read(buf).await;
        buf = back;
        match result.expect("echo server read") {
            0 => break,
            n => total += n,
        }
        let (result, back) = socket.write_all(buf).await;
        result.expect("echo server write");
        buf = back;
    }
    socket.shutdown_write().await.expect("echo server shutdown");
    total
}

/// Serves the next `connections` connections of `listener` with [`echo`], each on its
/// own task; the handle finishes once it has accepted them all.
pub fn spawn_echo_server(listener: StreamSocketListener, connections: usize) -> JoinHandle<()> {
    ringsock::spawn(async move {
        for _ in 0..connections {
            let socket = listener.accept().await.expect("echo server accept");
            ringsock::spawn(echo(socket));
        }
    })
}

/// Sends `data` and expects exactly the same bytes back (the peer runs [`echo`]); writes
/// and reads at the same time so neither side's buffers can fill up and stall both.
pub async fn round_trip(socket: &StreamSocket, data: &[u8]) {
    let (written, echoed) = join(
        socket.write_all(data.to_vec()),
        read_exact(socket, data.len()),
    )
    .await;
    written.0.expect("round trip write");
    assert!(echoed == data, "echo differs from what was sent");
}

/// A plain std listener on 127.0.0.1, for a peer whose socket options the test controls.
/// Its accept gives up after MUST_HAPPEN rather than block the test forever.
pub fn std_listener() -> StdListener {
    let listener = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    socket2::SockRef::from(&listener)
        .set_read_timeout(Some(MUST_HAPPEN))
        .expect("SO_RCVTIMEO");
    listener
}

/// Connects a ringsock client to a std listener and takes the std side of it. The
/// kernel completes the handshake without the server's accept, so after `connect` the
/// blocking accept returns at once.
pub async fn pair_with_std_peer(listener: &StdListener) -> (StreamSocket, StdStream) {
    let client = connect(listener.local_addr().unwrap()).await;
    let (peer, addr) = listener.accept().expect("std accept");
    assert_eq!(addr, client.local_addr().unwrap());
    (client, peer)
}

/// Reads a std peer until its connection ends: the bytes read, and the status of the
/// error that ended it (None for a clean end of stream). Each read waits at most
/// MUST_HAPPEN before the test fails.
pub fn std_read_until_end(peer: &mut StdStream) -> (usize, Option<ringsock::SocketErrorStatus>) {
    use std::io::Read;
    peer.set_read_timeout(Some(MUST_HAPPEN))
        .expect("SO_RCVTIMEO");
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        match peer.read(&mut buf) {
            Ok(0) => return (total, None),
            Ok(n) => total += n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the connection did not end within {MUST_HAPPEN:?}")
            }
            Err(err) => return (total, Some(ringsock::SocketErrorStatus::from_io(&err))),
        }
    }
}

/// [`std_read_until_end`] on a thread of its own, so the loop's tasks keep running.
pub async fn std_peer_end(mut peer: StdStream) -> (usize, Option<ringsock::SocketErrorStatus>) {
    join_thread(std::thread::spawn(move || std_read_until_end(&mut peer))).await
}

/// Closes `peer` with SO_LINGER 0, so the kernel sends a RST instead of a FIN.
pub fn reset(peer: StdStream) {
    socket2::SockRef::from(&peer)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(peer);
}

/// Raises this process's soft RLIMIT_NOFILE to at least `min` (up to the hard limit);
/// panics if the hard limit is lower.
pub fn raise_nofile(min: u64) {
    let (soft, hard) = nofile_limit();
    if soft >= min {
        return;
    }
    assert!(
        hard >= min,
        "RLIMIT_NOFILE hard limit {hard} is below the {min} descriptors this test needs"
    );
    set_nofile_soft(min.max(soft));
}

/// The (soft, hard) RLIMIT_NOFILE.
pub fn nofile_limit() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the local struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
    // rlim_t is u64 here but not on every target.
    #[allow(clippy::unnecessary_cast)]
    (limit.rlim_cur as u64, limit.rlim_max as u64)
}

/// Lowers the soft RLIMIT_NOFILE to a little above the highest descriptor in use and
/// takes every descriptor free under it but `free`: the files returned hold them. The
/// caller restores the limit (see [`nofile_limit`]) when it is done.
pub fn hog_descriptors(free: usize) -> Vec<std::fs::File> {
    let highest = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .expect("some descriptors are open");
    let limit = highest + 1 + 32 + free as u64;
    set_nofile_soft(limit);
    let mut hogs = Vec::new();
    // Bounded: fewer than `limit` descriptors are free under the new limit.
    for _ in 0..limit {
        match std::fs::File::open("/dev/null") {
            Ok(file) => hogs.push(file),
            Err(err) if err.raw_os_error() == Some(libc::EMFILE) => break,
            Err(err) => panic!("open /dev/null: {err}"),
        }
    }
    assert!(
        std::fs::File::open("/dev/null").is_err(),
        "descriptors left"
    );
    hogs.truncate(hogs.len() - free);
    hogs
}

/// Sets the soft RLIMIT_NOFILE, keeping the hard one.
pub fn set_nofile_soft(soft: u64) {
    let (_, hard) = nofile_limit();
    let limit = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the local struct it is given.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// A single-use barrier for tasks of one runtime: `wait` returns once `count` tasks
/// are waiting.
#[derive(Clone)]
pub struct Barrier {
    state: std::rc::Rc<std::cell::RefCell<(usize, Vec<std::task::Waker>)>>,
}

impl Barrier {
    pub fn new(count: usize) -> Barrier {
        Barrier {
            state: std::rc::Rc::new(std::cell::RefCell::new((count, Vec::new()))),
        }
    }

    pub async fn wait(&self) {
        {
            let mut state = self.state.borrow_mut();
            assert!(
                state.0 > 0,
                "more tasks at the barrier than it was made for"
            );
            state.0 -= 1;
            if state.0 == 0 {
                state.1.drain(..).for_each(std::task::Waker::wake);
            }
        }
        poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if state.0 == 0 {
                Poll::Ready(())
            } else {
                state.1.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// Waits for a std thread without blocking the runtime's loop (tasks keep running).
pub async fn join_thread<T: Send + 'static>(handle: std::thread::JoinHandle<T>) -> T {
    use std::sync::{Arc, Mutex};
    use std::task::{Poll, Waker};
    type Slot<T> = Arc<Mutex<(Option<std::thread::Result<T>>, Option<Waker>)>>;
    let slot: Slot<T> = Arc::new(Mutex::new((None, None)));
    let theirs = slot.clone();
    std::thread::spawn(move || {
        let result = handle.join();
        let waker = {
            let mut slot = theirs.lock().unwrap();
            slot.0 = Some(result);
            slot.1.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    });
    let result = std::future::poll_fn(|cx| {
        let mut slot = slot.lock().unwrap();
        match slot.0.take() {
            Some(result) => Poll::Ready(result),
            None => {
                slot.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
    .await;
    match result {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The text a panic carried (a `String` or a `&str` payload).
pub fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}
