//! How long the loop looks for completions before it sleeps in the kernel.

use std::time::Duration;

/// Whether the loop looks for completions for a while before it sleeps in the kernel.
///
/// A sleeping CPU takes tens of microseconds to wake on a virtual machine; a round trip
/// whose answer comes back in less than that is faster when the loop watches for it
/// than when the kernel has to wake it. Spinning trades CPU time for that latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spin {
    /// Sleep as soon as nothing is ready.
    Off,
    /// Look for up to this long before every sleep.
    Fixed(Duration),
    /// Look only while events have lately come back sooner than this (a moving average
    /// of the waits), and then for about twice that average, never longer than this.
    /// A loop in a fast exchange (a round trip, a send's completion, a burst of
    /// datagrams) catches the next event without a wake-up; one that waits longer (an
    /// idle server, a relay at a few thousand packets per second) sleeps at once, and the
    /// end of a burst costs a spin of twice the gaps inside it, not the whole limit.
    Adaptive(Duration),
}

/// Shortest adaptive spin: a few system calls' worth, so a loop whose events come back
/// at once still looks once or twice before it pays for a sleep.
const MIN_ADAPTIVE_SPIN: Duration = Duration::from_micros(4);

/// Longest spin the runtime accepts: beyond it spinning buys no latency worth the CPU.
pub(super) const MAX_SPIN: Duration = Duration::from_secs(1);

impl Spin {
    /// The same policy with its time capped at [`MAX_SPIN`] (one second).
    pub(super) fn capped(self) -> Spin {
        match self {
            Spin::Off => Spin::Off,
            Spin::Fixed(spin) => Spin::Fixed(spin.min(MAX_SPIN)),
            Spin::Adaptive(spin) => Spin::Adaptive(spin.min(MAX_SPIN)),
        }
    }

    /// How long to spin before the next sleep, given the moving average of the waits.
    pub(super) fn budget(self, recent_wait: Duration) -> Option<Duration> {
        match self {
            Spin::Off => None,
            Spin::Fixed(spin) => Some(spin),
            Spin::Adaptive(limit) if recent_wait < limit => {
                Some((recent_wait * 2).clamp(MIN_ADAPTIVE_SPIN.min(limit), limit))
            }
            Spin::Adaptive(_) => None,
        }
    }

    /// Whether the waits are measured for the moving average.
    pub(super) fn measures_waits(self) -> bool {
        matches!(self, Spin::Adaptive(_))
    }

    /// The moving average after one more wait: recent waits weigh most, and a wait counts
    /// for at most twice the limit, so a few fast round trips after an idle spell,
    /// however long, bring the spin back.
    pub(super) fn blend(self, recent_wait: Duration, wait: Duration) -> Duration {
        let cap = match self {
            Spin::Adaptive(limit) => limit * 2,
            Spin::Off | Spin::Fixed(_) => wait,
        };
        (recent_wait * 3 + wait.min(cap)) / 4
    }
}

impl Default for Spin {
    /// Adaptive, up to 30 µs: about what a wake-up costs on a virtual machine. A
    /// round trip that comes back within it is watched for rather than slept through;
    /// waits longer than that cost more CPU spun than slept, so they sleep.
    fn default() -> Spin {
        Spin::Adaptive(Duration::from_micros(30))
    }
}

impl Spin {
    /// `RINGSOCK_SPIN`: `off`, `adaptive`, or microseconds to spin before every sleep
    /// (`0` is off). `None` when unset.
    pub fn from_env() -> crate::Result<Option<Spin>> {
        match std::env::var("RINGSOCK_SPIN") {
            Ok(value) => value.parse().map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(crate::Error::invalid_input(
                "RINGSOCK_SPIN is not valid UTF-8",
            )),
        }
    }
}

impl std::fmt::Display for Spin {
    /// `off`, `50us` (fixed) or `adaptive-30us`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spin::Off => f.write_str("off"),
            Spin::Fixed(spin) => write!(f, "{}us", spin.as_micros()),
            Spin::Adaptive(spin) => write!(f, "adaptive-{}us", spin.as_micros()),
        }
    }
}

impl std::str::FromStr for Spin {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Spin> {
        match s {
            "off" => Ok(Spin::Off),
            "adaptive" => Ok(Spin::default()),
            micros => match micros.parse::<u64>() {
                Ok(0) => Ok(Spin::Off),
                Ok(us) if us <= 1_000_000 => Ok(Spin::Fixed(Duration::from_micros(us))),
                _ => Err(crate::Error::invalid_input(format!(
                    "unknown spin {s:?}: expected off, adaptive or microseconds up to 1000000"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_spin_stops_after_long_waits_and_returns_after_fast_ones() {
        let limit = Duration::from_micros(30);
        let policy = Spin::Adaptive(limit);
        let mut recent = Duration::ZERO;
        assert!(policy.budget(recent).is_some());
        // An idle spell: long waits turn the spin off.
        for _ in 0..10 {
            recent = policy.blend(recent, Duration::from_secs(3600));
        }
        assert_eq!(policy.budget(recent), None);
        // Round trips of 15 us bring it back within a few waits, however long the spell.
        let mut waits = 0;
        while policy.budget(recent).is_none() {
            recent = policy.blend(recent, Duration::from_micros(15));
            waits += 1;
            assert!(waits <= 6, "the spin took {waits} waits to come back");
        }
        // Steady gaps of 40 us, a relay at 20k packets/s say, cost more spun than slept.
        for _ in 0..50 {
            recent = policy.blend(recent, Duration::from_micros(40));
        }
        assert_eq!(policy.budget(recent), None);
    }

    #[test]
    fn adaptive_spin_lasts_about_twice_the_recent_waits() {
        let policy = Spin::Adaptive(Duration::from_micros(30));
        let mut recent = Duration::from_micros(60);
        for _ in 0..50 {
            recent = policy.blend(recent, Duration::from_micros(5));
        }
        // Gaps of 5 us inside a burst: the spin after its last datagram is short.
        let budget = policy.budget(recent).unwrap();
        assert!(budget <= Duration::from_micros(11), "{budget:?}");
        assert!(budget >= MIN_ADAPTIVE_SPIN, "{budget:?}");
        for _ in 0..50 {
            recent = policy.blend(recent, Duration::from_micros(14));
        }
        let budget = policy.budget(recent).unwrap();
        assert!(budget >= Duration::from_micros(27), "{budget:?}");
        assert!(budget <= Duration::from_micros(30), "{budget:?}");
        // Nothing at all lately still looks at least a few system calls' worth.
        assert_eq!(policy.budget(Duration::ZERO), Some(MIN_ADAPTIVE_SPIN));
    }

    #[test]
    fn spin_times_are_capped() {
        assert_eq!(Spin::Fixed(Duration::MAX).capped(), Spin::Fixed(MAX_SPIN));
        assert_eq!(
            Spin::Adaptive(Duration::MAX).capped(),
            Spin::Adaptive(MAX_SPIN)
        );
        assert_eq!(Spin::Off.capped(), Spin::Off);
    }

    #[test]
    fn spin_policies_print_as_they_parse() {
        for spin in [Spin::Off, Spin::Fixed(Duration::from_micros(50))] {
            assert_eq!(
                spin.to_string()
                    .trim_end_matches("us")
                    .parse::<Spin>()
                    .unwrap(),
                spin
            );
        }
        assert_eq!(Spin::default().to_string(), "adaptive-30us");
    }

    #[test]
    fn spin_settings_parse() {
        assert_eq!("off".parse::<Spin>().unwrap(), Spin::Off);
        assert_eq!("0".parse::<Spin>().unwrap(), Spin::Off);
        assert_eq!("adaptive".parse::<Spin>().unwrap(), Spin::default());
        assert_eq!(
            "50".parse::<Spin>().unwrap(),
            Spin::Fixed(Duration::from_micros(50))
        );
        for bad in ["", "fast", "-1", "1000001", "10us"] {
            let err = bad.parse::<Spin>().unwrap_err();
            assert_eq!(
                err.status(),
                crate::SocketErrorStatus::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn fixed_and_off_ignore_the_waits() {
        let long = Duration::from_secs(1);
        let spin = Duration::from_micros(50);
        assert_eq!(Spin::Fixed(spin).budget(long), Some(spin));
        assert_eq!(Spin::Off.budget(Duration::ZERO), None);
        assert!(!Spin::Fixed(spin).measures_waits());
        assert!(Spin::Adaptive(spin).measures_waits());
    }
}
