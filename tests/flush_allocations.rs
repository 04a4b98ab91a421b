//! A flush in steady state costs one submission and no allocation: the stream's sender
//! task lives between flushes, and the iovec arrays and message headers of a send are
//! reused. Counted with a global allocator that counts the allocations of the thread
//! that flushes.

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Read;
use std::net::TcpListener;

use bytes::Bytes;
use ringsock::StreamSocket;

/// Counts allocations per thread, so the receiving thread's do not count.
struct CountingAlloc;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call goes to the system allocator unchanged; the count is a
// thread-local `Cell` of a const-initialised u64, which needs no allocation itself.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Flushes that let every buffer, queue and table reach its steady size first.
const WARM_UP: u64 = 500;
/// Flushes counted.
const COUNTED: u64 = 2_000;

async fn write_and_flush(output: &ringsock::OutputStream, message: &Bytes) {
    output.write(message.clone()).await.unwrap();
    output.flush().await.unwrap();
}

/// Four copied writes per flush: gathered in the stream's own buffer, which is reused.
async fn copy_and_flush(output: &ringsock::OutputStream, message: &Bytes) {
    for _ in 0..4 {
        output.write_copy(message).await.unwrap();
    }
    output.flush().await.unwrap();
}

#[test]
fn a_flush_in_steady_state_allocates_nothing() {
    flushes_allocate_nothing(false);
}

#[test]
fn a_flush_of_copied_writes_in_steady_state_allocates_nothing() {
    flushes_allocate_nothing(true);
}

fn flushes_allocate_nothing(copies: bool) {
    let writes_per_flush = if copies { 4 } else { 1 };
    util::on_each_backend(|backend| async move {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return total,
                    Ok(n) => total += n as u64,
                    Err(err) => panic!("reader: {err}"),
                }
            }
        });
        let socket = StreamSocket::new();
        socket.connect_addr(addr).await.unwrap();
        let output = socket.output_stream();
        let message = Bytes::from_static(b"sixteen bytes!!\n");
        let flush = |output, message| async move {
            if copies {
                copy_and_flush(output, message).await;
            } else {
                write_and_flush(output, message).await;
            }
        };
        for _ in 0..WARM_UP {
            flush(&output, &message).await;
        }
        let before = allocations();
        for _ in 0..COUNTED {
            flush(&output, &message).await;
        }
        let allocated = allocations() - before;
        eprintln!("{backend:?}: {allocated} allocations in {COUNTED} flushes");
        // A spawned sender task, a boxed operation or a fresh iovec array per flush would
        // each make this at least COUNTED; a rare regrowth somewhere is allowed.
        assert!(
            allocated <= COUNTED / 100,
            "{backend:?}: {allocated} allocations in {COUNTED} flushes"
        );
        assert_eq!(output.stats().batches, WARM_UP + COUNTED);
        drop(output);
        drop(socket);
        let total = reader.join().unwrap();
        assert_eq!(
            total,
            (WARM_UP + COUNTED) * writes_per_flush * message.len() as u64
        );
    });
}

/// A relay's loop: a datagram received, forwarded from the ring by a post (no future),
/// the posts settled now and then. Steady state allocates nothing: no box per post, no
/// list per turn, no waker clone.
#[test]
fn forwarding_by_posts_in_steady_state_allocates_nothing() {
    use ringsock::{Datagram, DatagramSocket};
    util::on_each_backend(|backend| async move {
        let relay = DatagramSocket::new();
        relay.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // A forward that never arrives fails the test rather than hanging it.
        sink.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let sink_addr = sink.local_addr().unwrap();
        let generator = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut received: Vec<Datagram> = Vec::with_capacity(8);
        let mut forwarded = 0u64;
        let relay_one = async |received: &mut Vec<Datagram>| {
            generator.send_to(b"one datagram", relay_addr).unwrap();
            relay.recv_batch(received, 8).await.unwrap();
            for datagram in received.drain(..) {
                relay
                    .post_to_addr(datagram.into_forward(), sink_addr)
                    .map_err(|(err, _)| err)
                    .unwrap();
            }
            relay.settle_posts().await.unwrap();
            // The sink is read so that its queue never fills (a drop is no failure, but
            // the count below checks that each one went).
            let mut buf = [0u8; 64];
            assert_eq!(sink.recv(&mut buf).unwrap(), 12);
        };
        for _ in 0..WARM_UP {
            relay_one(&mut received).await;
            forwarded += 1;
        }
        let before = allocations();
        for _ in 0..COUNTED {
            relay_one(&mut received).await;
            forwarded += 1;
        }
        let allocated = allocations() - before;
        eprintln!("{backend:?}: {allocated} allocations in {COUNTED} forwards");
        assert!(
            allocated <= COUNTED / 100,
            "{backend:?}: {allocated} allocations in {COUNTED} forwards"
        );
        assert_eq!(relay.post_stats().sent, forwarded);
    });
}
