//! When a tunnel sends a message of its own: an Init (no session yet, or the peer has
//! gone silent while data went out, so it may have restarted), or a keepalive (the peer
//! sends but hears nothing back, and would otherwise start over).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The stamp of a time that never happened.
const NEVER: u64 = 0;

/// The intervals the timers run on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Intervals {
    pub(crate) keepalive: Duration,
    pub(crate) rehandshake_after: Duration,
    pub(crate) handshake_retry: Duration,
}

impl Intervals {
    /// How often the timers look: a quarter of the shortest interval (each is then late
    /// by at most a quarter), at most every 20 ms. Of the retry alone, a long retry
    /// (say 10 s on a slow link) made keepalives seconds late, and the peer, hearing
    /// nothing for its 3 s, handshook again.
    pub(crate) fn tick(&self) -> Duration {
        let shortest = self
            .keepalive
            .min(self.rehandshake_after)
            .min(self.handshake_retry);
        (shortest / 4).max(Duration::from_millis(20))
    }
}

/// What is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    Handshake,
    Keepalive,
    Nothing,
}

/// When things last happened, shared by every thread of a tunnel: each time is an
/// atomic (nanoseconds since `start`, plus one; 0 = never) that only moves forward, so
/// the data path records an event with one `fetch_max` and no lock.
#[derive(Debug)]
pub(crate) struct Timers {
    start: Instant,
    last_init: AtomicU64,
    /// The last message that authenticated (data, keepalive, or a handshake answer).
    last_recv: AtomicU64,
    last_data_sent: AtomicU64,
    /// The last message of any kind sent.
    last_sent: AtomicU64,
}

impl Timers {
    pub(crate) fn new(now: Instant) -> Timers {
        Timers {
            start: now,
            last_init: AtomicU64::new(NEVER),
            last_recv: AtomicU64::new(1),
            last_data_sent: AtomicU64::new(NEVER),
            last_sent: AtomicU64::new(1),
        }
    }

    fn mark(&self, time: &AtomicU64, now: Instant) {
        let nanos = now.saturating_duration_since(self.start).as_nanos();
        let stamp = u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1;
        // Relaxed: a time orders no other memory; threads only need the latest to win.
        time.fetch_max(stamp, Ordering::Relaxed);
    }

    fn get(&self, time: &AtomicU64) -> Option<Instant> {
        match time.load(Ordering::Relaxed) {
            NEVER => None,
            stamp => Some(self.start + Duration::from_nanos(stamp - 1)),
        }
    }

    pub(crate) fn received(&self, now: Instant) {
        self.mark(&self.last_recv, now);
    }

    pub(crate) fn sent(&self, now: Instant) {
        self.mark(&self.last_sent, now);
    }

    pub(crate) fn sent_data(&self, now: Instant) {
        self.mark(&self.last_data_sent, now);
        self.mark(&self.last_sent, now);
    }

    pub(crate) fn initiated(&self, now: Instant) {
        self.mark(&self.last_init, now);
        self.mark(&self.last_sent, now);
    }

    /// What to send now: an Init while there is no session, or once data went out and
    /// nothing authentic came back for `rehandshake_after` (at most one Init per
    /// `handshake_retry`); else a keepalive when something came in since this side last
    /// sent and it has been quiet for `keepalive`.
    pub(crate) fn due(&self, now: Instant, has_session: bool, intervals: &Intervals) -> Due {
        let last_recv = self.get(&self.last_recv).unwrap_or(self.start);
        let last_sent = self.get(&self.last_sent).unwrap_or(self.start);
        let since_init = self
            .get(&self.last_init)
            .map_or(Duration::MAX, |at| now.saturating_duration_since(at));
        let silent = now.saturating_duration_since(last_recv);
        let unanswered = self
            .get(&self.last_data_sent)
            .is_some_and(|at| at > last_recv);
        let want_handshake = !has_session || (unanswered && silent >= intervals.rehandshake_after);
        if want_handshake && since_init >= intervals.handshake_retry {
            return Due::Handshake;
        }
        let quiet = now.saturating_duration_since(last_sent);
        if has_session && last_recv > last_sent && quiet >= intervals.keepalive {
            return Due::Keepalive;
        }
        Due::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVALS: Intervals = Intervals {
        keepalive: Duration::from_secs(1),
        rehandshake_after: Duration::from_secs(3),
        handshake_retry: Duration::from_millis(500),
    };

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn the_timers_look_often_enough_for_the_shortest_interval() {
        assert_eq!(INTERVALS.tick(), Duration::from_millis(125));
        let slow_retry = Intervals {
            handshake_retry: Duration::from_secs(10),
            ..INTERVALS
        };
        assert_eq!(slow_retry.tick(), Duration::from_millis(250));
        let never = Intervals {
            keepalive: Duration::MAX,
            rehandshake_after: Duration::MAX,
            handshake_retry: Duration::MAX,
        };
        assert_eq!(never.tick(), Duration::MAX / 4);
        let zero = Intervals {
            keepalive: Duration::ZERO,
            ..INTERVALS
        };
        assert_eq!(zero.tick(), Duration::from_millis(20));
    }

    #[test]
    fn without_a_session_an_init_goes_out_and_is_retried() {
        let t0 = Instant::now();
        let timers = Timers::new(t0);
        assert_eq!(timers.due(t0, false, &INTERVALS), Due::Handshake);
        timers.initiated(t0);
        assert_eq!(timers.due(at(t0, 499), false, &INTERVALS), Due::Nothing);
        assert_eq!(timers.due(at(t0, 500), false, &INTERVALS), Due::Handshake);
    }

    #[test]
    fn data_sent_into_silence_starts_a_new_handshake() {
        let t0 = Instant::now();
        let timers = Timers::new(t0);
        timers.initiated(t0);
        timers.received(at(t0, 10));
        timers.sent_data(at(t0, 20));
        assert_eq!(timers.due(at(t0, 3009), true, &INTERVALS), Due::Nothing);
        assert_eq!(timers.due(at(t0, 3010), true, &INTERVALS), Due::Handshake);
        // An answer in time: no handshake, only the keepalive that acknowledges it.
        timers.received(at(t0, 2000));
        assert_eq!(timers.due(at(t0, 3010), true, &INTERVALS), Due::Keepalive);
    }

    #[test]
    fn a_side_that_only_receives_sends_keepalives() {
        let t0 = Instant::now();
        let timers = Timers::new(t0);
        timers.received(at(t0, 100));
        assert_eq!(timers.due(at(t0, 999), true, &INTERVALS), Due::Nothing);
        assert_eq!(timers.due(at(t0, 1000), true, &INTERVALS), Due::Keepalive);
        timers.sent(at(t0, 1000));
        // Still receiving: the next one a second later.
        timers.received(at(t0, 1500));
        assert_eq!(timers.due(at(t0, 1999), true, &INTERVALS), Due::Nothing);
        assert_eq!(timers.due(at(t0, 2000), true, &INTERVALS), Due::Keepalive);
        // Nothing received since the last send: nothing to acknowledge.
        timers.sent(at(t0, 2000));
        assert_eq!(timers.due(at(t0, 9000), true, &INTERVALS), Due::Nothing);
        // No keepalive without a session.
        timers.received(at(t0, 9001));
        assert_eq!(timers.due(at(t0, 20000), false, &INTERVALS), Due::Handshake);
    }

    #[test]
    fn a_steady_one_way_flow_with_keepalives_back_never_rehandshakes() {
        let t0 = Instant::now();
        let sender = Timers::new(t0);
        sender.initiated(t0);
        for second in 1..20u64 {
            sender.sent_data(at(t0, second * 1000));
            // The receiver's keepalive each second.
            sender.received(at(t0, second * 1000 + 1));
            assert_eq!(
                sender.due(at(t0, second * 1000 + 2), true, &INTERVALS),
                Due::Nothing
            );
        }
    }
}
