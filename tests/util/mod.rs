//! Shared test helpers: every test runs once per driver, bounded in time.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use ringsock::runtime::{timeout, Builder};
use ringsock::Backend;

/// The longest any one test body may run on one driver before it counts as a hang.
pub const TEST_LIMIT: Duration = Duration::from_secs(120);

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

/// Runs `test` on one driver (see [`on_each_backend`]).
pub fn on_backend<F, Fut>(backend: Backend, test: &F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = match Builder::new().backend(backend).build() {
        Ok(runtime) => runtime,
        Err(err)
            if backend == Backend::Uring
                && std::env::var_os("RINGSOCK_REQUIRE_URING").is_none() =>
        {
            eprintln!("skipped on io_uring: {err}");
            return;
        }
        Err(err) => panic!("cannot start the {backend} runtime: {err}"),
    };
    runtime.block_on(async {
        if timeout(TEST_LIMIT, test(backend)).await.is_err() {
            panic!("test did not finish within {TEST_LIMIT:?} on {backend}");
        }
    });
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
