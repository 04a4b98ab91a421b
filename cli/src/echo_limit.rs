//! How many echoes each source address gets: a token bucket per source, so that one
//! forged datagram that sets two echo servers answering each other (each echo's source
//! the other's address) dies out as soon as they answer each other faster than the
//! limit, and a flood from forged sources gets at most the limit back per address.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::time::Instant;

/// Buckets the sources share: a fixed table, so that datagrams from ever new (forged)
/// addresses cost no memory; two sources in one bucket share its limit.
const BUCKETS: usize = 4096;

/// Echoes per second each source address gets, with bursts of as many.
pub(crate) struct EchoLimit {
    per_second: u32,
    buckets: Box<[Bucket]>,
    /// Keyed at random per server, so that a sender cannot pick addresses that share a
    /// bucket with a victim's.
    keys: RandomState,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    filled: Instant,
}

impl EchoLimit {
    /// `per_second` echoes a second per source; `None` for 0, no limit.
    pub(crate) fn new(per_second: u32) -> Option<EchoLimit> {
        if per_second == 0 {
            return None;
        }
        let full = Bucket {
            tokens: f64::from(per_second),
            filled: Instant::now(),
        };
        Some(EchoLimit {
            per_second,
            buckets: vec![full; BUCKETS].into_boxed_slice(),
            keys: RandomState::new(),
        })
    }

    /// The limit, echoes per second per source.
    pub(crate) fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Whether `from` may have one more echo at `now` (and takes it if so).
    pub(crate) fn allow(&mut self, from: SocketAddr, now: Instant) -> bool {
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let index = (self.keys.hash_one(from) % BUCKETS as u64) as usize;
        let rate = f64::from(self.per_second);
        let bucket = &mut self.buckets[index];
        let elapsed = now.saturating_duration_since(bucket.filled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.filled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_burst_then_the_rate() {
        let mut limit = EchoLimit::new(100).unwrap();
        let start = Instant::now();
        let from = addr("127.0.0.1:7002");
        let burst = (0..1000).filter(|_| limit.allow(from, start)).count();
        assert_eq!(burst, 100);
        // A quarter second later: a quarter of the rate more.
        let later = start + Duration::from_millis(250);
        let more = (0..1000).filter(|_| limit.allow(from, later)).count();
        assert_eq!(more, 25);
        // A long pause refills the bucket only to its size.
        let much_later = later + Duration::from_secs(3600);
        let refilled = (0..1000).filter(|_| limit.allow(from, much_later)).count();
        assert_eq!(refilled, 100);
    }

    #[test]
    fn sources_have_buckets_of_their_own_and_mapped_addresses_are_the_same_source() {
        let mut limit = EchoLimit::new(10).unwrap();
        let now = Instant::now();
        let first = addr("127.0.0.1:7002");
        assert_eq!((0..20).filter(|_| limit.allow(first, now)).count(), 10);
        let mapped = addr("[::ffff:127.0.0.1]:7002");
        assert!(
            !limit.allow(mapped, now),
            "the same source, written as IPv6"
        );
        // Another source (barring a shared bucket, one chance in 4096).
        let other = (7003..7010)
            .map(|port| SocketAddr::new(first.ip(), port))
            .find(|&other| limit.allow(other, now));
        assert!(other.is_some(), "every other source was limited too");
    }

    #[test]
    fn zero_is_no_limit() {
        assert!(EchoLimit::new(0).is_none());
    }
}
