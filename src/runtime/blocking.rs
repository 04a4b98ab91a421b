//! Work that must block (name resolution) runs on its own thread and wakes the loop when
//! done, so the single-threaded loop never stalls on it.

use std::future::poll_fn;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

struct Slot<T> {
    output: Option<T>,
    waker: Option<Waker>,
    finished: bool,
}

/// Runs `work` on a new thread and waits for its result without blocking the loop.
pub(crate) async fn spawn_blocking<T, W>(work: W) -> io::Result<T>
where
    T: Send + 'static,
    W: FnOnce() -> T + Send + 'static,
{
    let slot = Arc::new(Mutex::new(Slot {
        output: None,
        waker: None,
        finished: false,
    }));
    let theirs = slot.clone();
    std::thread::Builder::new()
        .name("ringsock-blocking".into())
        .spawn(move || {
            // A panic must still end the wait, or the awaiting task would hang.
            let output = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).ok();
            let waker = {
                let mut slot = theirs.lock().unwrap_or_else(|p| p.into_inner());
                slot.output = output;
                slot.finished = true;
                slot.waker.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        })?;
    poll_fn(|cx| {
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(output) = slot.output.take() {
            return Poll::Ready(Ok(output));
        }
        if slot.finished {
            return Poll::Ready(Err(io::Error::other("blocking work panicked")));
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}
