//! A stream socket's traffic clock: when bytes last moved, and since when a write has
//! waited without the kernel taking any. The stream operations keep it; the socket
//! layer's watchdog reads it to expire idle connections and stalled writes.
//!
//! The clock is read only while a timeout needs it ([`Activity::track`]), so sockets
//! without one pay a flag test per operation.

use std::cell::Cell;
use std::task::Waker;
use std::time::{Duration, Instant};

/// The traffic clock of one socket.
pub(crate) struct Activity {
    tracking: Cell<bool>,
    /// The write timeout the watcher enforces, if any: a write starting is news for it
    /// when it would otherwise wake too late to catch that write stalling.
    write_limit: Cell<Option<Duration>>,
    /// The watchdog waiting for news, and when it wakes on its own (`None`: never).
    watcher: Cell<Option<Waker>>,
    watcher_wakes: Cell<Option<Instant>>,
    /// When a byte was last received or sent (or tracking began).
    last_traffic: Cell<Instant>,
    /// Write operations in flight on the socket.
    writes_pending: Cell<u32>,
    /// When the writes in flight last made progress, or the first of them began.
    write_progress: Cell<Instant>,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        let now = Instant::now();
        Activity {
            tracking: Cell::new(false),
            write_limit: Cell::new(None),
            watcher: Cell::new(None),
            watcher_wakes: Cell::new(None),
            last_traffic: Cell::new(now),
            writes_pending: Cell::new(0),
            write_progress: Cell::new(now),
        }
    }

    /// Starts reading the clock, counting from now, for a watcher that enforces
    /// `write_limit` (and maybe an idle limit).
    pub(crate) fn track(&self, write_limit: Option<Duration>) {
        if !self.tracking.replace(true) {
            let now = Instant::now();
            self.last_traffic.set(now);
            self.write_progress.set(now);
        }
        self.write_limit.set(write_limit);
    }

    /// Wakes `waker` at the next news (see [`poke`](Self::poke)); the watcher wakes by
    /// itself at `wakes` meanwhile.
    pub(crate) fn watch_with(&self, waker: &Waker, wakes: Option<Instant>) {
        self.watcher.set(Some(waker.clone()));
        self.watcher_wakes.set(wakes);
    }

    /// Wakes the watcher, e.g. because its limits changed.
    pub(crate) fn poke(&self) {
        self.watcher_wakes.set(None);
        if let Some(waker) = self.watcher.take() {
            waker.wake();
        }
    }

    /// Bytes were received.
    #[inline]
    pub(crate) fn received(&self) {
        if self.tracking.get() {
            self.last_traffic.set(Instant::now());
        }
    }

    /// The kernel took bytes of a write.
    #[inline]
    pub(crate) fn sent(&self) {
        if self.tracking.get() {
            let now = Instant::now();
            self.last_traffic.set(now);
            self.write_progress.set(now);
        }
    }

    /// A write operation starts; it counts as waiting until the guard drops.
    #[inline]
    pub(crate) fn write_begins(&self) -> WriteInFlight<'_> {
        let pending = self.writes_pending.get();
        if pending == 0 && self.tracking.get() {
            let now = Instant::now();
            self.write_progress.set(now);
            // At most one wake per write limit: a watcher due before this write could
            // stall looks at it then.
            if let Some(limit) = self.write_limit.get() {
                let stalls_at = now.checked_add(limit);
                if self
                    .watcher_wakes
                    .get()
                    .is_none_or(|wakes| Some(wakes) > stalls_at)
                {
                    self.poke();
                }
            }
        }
        self.writes_pending.set(pending + 1);
        WriteInFlight { activity: self }
    }

    /// When bytes last moved either way.
    pub(crate) fn last_traffic(&self) -> Instant {
        self.last_traffic.get()
    }

    /// Since when the writes in flight have waited without progress; `None` when no
    /// write is in flight.
    pub(crate) fn write_stalled_since(&self) -> Option<Instant> {
        (self.writes_pending.get() > 0).then(|| self.write_progress.get())
    }
}

/// A write in flight (see [`Activity::write_begins`]).
pub(crate) struct WriteInFlight<'a> {
    activity: &'a Activity,
}

impl Drop for WriteInFlight<'_> {
    fn drop(&mut self) {
        let pending = &self.activity.writes_pending;
        pending.set(pending.get() - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_in_flight_are_counted_and_progress_resets_the_stall() {
        let activity = Activity::new();
        assert_eq!(activity.write_stalled_since(), None);
        activity.track(Some(Duration::from_secs(1)));
        let first = activity.write_begins();
        let began = activity
            .write_stalled_since()
            .expect("a write is in flight");
        {
            let _second = activity.write_begins();
            assert_eq!(
                activity.write_stalled_since(),
                Some(began),
                "joins the stall"
            );
        }
        activity.sent();
        assert!(activity.write_stalled_since().unwrap() >= began);
        assert!(activity.last_traffic() >= began);
        drop(first);
        assert_eq!(activity.write_stalled_since(), None);
    }

    #[test]
    fn a_write_starting_wakes_a_watcher_that_would_wake_too_late() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::task::Wake;

        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let activity = Activity::new();
        activity.track(Some(Duration::from_secs(60)));
        // A watcher with no deadline of its own must hear of the write.
        activity.watch_with(&waker, None);
        drop(activity.write_begins());
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        // One due sooner than the write could stall is left asleep.
        activity.watch_with(&waker, Some(Instant::now()));
        drop(activity.write_begins());
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        // Without a write limit, writes are no news.
        activity.track(None);
        activity.watch_with(&waker, None);
        drop(activity.write_begins());
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn untracked_sockets_do_not_read_the_clock() {
        let activity = Activity::new();
        let before = activity.last_traffic();
        activity.received();
        activity.sent();
        assert_eq!(activity.last_traffic(), before);
    }
}
