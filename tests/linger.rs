//! Sockets dropped with data queued for a peer that never reads: after the linger
//! timeout every descriptor and every buffer is released, on both drivers. A test
//! binary of its own, with one test, because it counts the whole process's descriptors
//! and heap.

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use ringsock::StreamSocket;

/// The system allocator, counting the bytes allocated and not yet freed.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is
// only arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded; `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded; `ptr` came from `alloc` with this layout.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

const SOCKETS: usize = 50;
const QUEUED: usize = 3 << 20;

#[test]
fn dropped_sockets_with_data_for_a_silent_peer_release_descriptors_and_memory() {
    util::on_each_backend(|backend| async move {
        let listener = util::std_listener();
        // Small buffers both ways, so the data stays in this process, not the kernel.
        socket2::SockRef::from(&listener)
            .set_recv_buffer_size(4096)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let descriptors = open_descriptors();
        let heap = LIVE_BYTES.load(Ordering::Relaxed);
        let mut peers = Vec::new();
        for i in 0..SOCKETS {
            let client = StreamSocket::new();
            client.control().set_send_buffer_size(4096).unwrap();
            client
                .control()
                .set_linger_timeout(Duration::from_millis(300))
                .unwrap();
            util::must("connect", client.connect_addr(addr))
                .await
                .unwrap();
            peers.push(listener.accept().unwrap().0);
            // Half queue through the output stream, half are stuck in write_all.
            let data = vec![i as u8; QUEUED];
            if i % 2 == 0 {
                drop(client.output_stream().write(data).await.unwrap());
                drop(client);
            } else {
                let stuck = ringsock::spawn(async move {
                    let _ = client.write_all(data).await;
                    drop(client);
                });
                // Gives the write a turn to fill the kernel's buffers, then drops it.
                util::yield_now().await;
                util::yield_now().await;
                stuck.abort();
            }
        }
        let held = LIVE_BYTES.load(Ordering::Relaxed) - heap;
        assert!(
            held > (SOCKETS * QUEUED / 4) as isize,
            "the data is queued: {held} bytes"
        );

        // The peers stay open (and never read); only the dropped sockets must go.
        let released = || {
            let descriptors_now = open_descriptors();
            let heap_now = LIVE_BYTES.load(Ordering::Relaxed) - heap;
            (descriptors_now <= descriptors + SOCKETS, heap_now)
        };
        let mut rounds = 0;
        loop {
            let (closed, heap_now) = released();
            // Slack for what the runtime keeps (buffer pools, its tables).
            if closed && heap_now < (8 << 20) {
                break;
            }
            rounds += 1;
            assert!(
                rounds < 2000,
                "on {backend}: {} descriptors (at most {} expected), {heap_now} bytes held",
                open_descriptors(),
                descriptors + SOCKETS
            );
            ringsock::runtime::sleep(Duration::from_millis(10)).await;
        }
        drop(peers);
    });
}
