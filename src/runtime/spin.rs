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
    /// Look only while events have lately come back within this (a moving average of
    /// the waits), and then for about three times that average, never longer than twice
    /// this. A loop in a fast exchange (a round trip, a send's completion, a burst of
    /// datagrams) catches the next event without a wake-up; one whose events come
    /// further apart (an idle server, a relay at a few thousand packets per second)
    /// sleeps at once, and the end of a burst costs a spin of a few gaps, not the whole
    /// limit. A look that catches nothing was CPU for nothing: after one the loop sleeps
    /// through the next wait, after each further one through twice as many (up to 64),
    /// and spins again once a look catches its event; the idle time after such a look
    /// does not count in the average. So a burst (a relay fed every millisecond, each
    /// burst ending in a look that finds nothing) ends in a look of a few of its own
    /// gaps, and a round trip that was late once costs one sleep. A loop that
    /// sleeps looks once in a while (every 64th wait, for this long): a sleep makes every
    /// wait look a wake-up longer than it was, so without the look a fast exchange that
    /// slowed once would never be seen to be fast again. A loop whose spins often end
    /// with nothing caught (4 of its last 32) is fed in bursts, where a sleep would
    /// gather the next burst into one wake-up anyway: it stops spinning and only looks
    /// every 16th wait, and a look that catches its event lets it spin again, until the
    /// next miss. A loop that a probe let spin and that misses often again within 16
    /// spins (the next burst's end) probes twice as far apart, up to every 256th wait;
    /// 16 spins without that bring its probes back to every 16th wait.
    ///
    /// A loop fed datagrams faster than it wakes (a relay, one burst after another)
    /// would spin through every short gap, where a sleep costs less CPU and gathers the
    /// datagrams that come meanwhile into one wake-up. So a loop that spins and takes in
    /// datagrams sleeps instead after 64 spins, to see what the sleep brings, and again
    /// after twice as many spins each time the sleep brought one datagram, up to once
    /// every 1,024 spins: more than one datagram says its sleeps gather, and it stops
    /// spinning, probes included (and, once it spins again, tests after 64 spins). Any
    /// other sleep that wakes to more than one datagram (after a miss, or while the
    /// average or a probe's gap keeps the loop asleep) says the same. Sixteen wakes
    /// that bring a single datagram each (a round trip, or traffic that thinned out),
    /// or eight that bring none (the datagrams stopped), with none bringing more, let
    /// it spin again. A round trip loses four spins in its first thousand and then one
    /// in 1,024 to the test; one whose answer is several datagrams (not GRO's pieces of
    /// one) looks like traffic that gathers, and sleeps.
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

    /// How long to spin before the next sleep, given what the waits were.
    pub(super) fn budget(self, waits: &mut Waits) -> Option<Duration> {
        waits.probing = false;
        waits.spinning = false;
        waits.test_sleeping = false;
        match self {
            Spin::Off => None,
            Spin::Fixed(spin) => Some(spin),
            Spin::Adaptive(_) if waits.gathering => None,
            Spin::Adaptive(_) if waits.test_sleeps > 0 => {
                waits.test_sleeps -= 1;
                waits.test_sleeping = true;
                None
            }
            Spin::Adaptive(limit)
                if waits.recent <= limit && waits.missed == 0 && !waits.misses_often() =>
            {
                waits.spins_untested += 1;
                if waits.spins_untested >= waits.gather_test_gap() && waits.datagrams_lately {
                    waits.spins_untested = 0;
                    waits.datagrams_lately = false;
                    waits.test_sleeps = GATHER_TEST_SLEEPS - 1;
                    waits.test_sleeping = true;
                    return None;
                }
                waits.unspun = 0;
                waits.spinning = true;
                Some((waits.recent * 3).clamp(MIN_ADAPTIVE_SPIN.min(limit), limit * 2))
            }
            Spin::Adaptive(limit) => {
                waits.unspun += 1;
                // A loop the misses stopped probes at its own pace: its quick looks after
                // a miss are what kept missing.
                let look_every = if waits.misses_often() {
                    waits.missed.max(waits.probe_gap())
                } else if waits.missed > 0 {
                    waits.missed
                } else {
                    PROBE_EVERY
                };
                if waits.unspun < look_every {
                    return None;
                }
                waits.unspun = 0;
                waits.probing = true;
                waits.spinning = true;
                waits.probing_after_misses = waits.misses_often();
                Some(limit)
            }
        }
    }

    /// Tells the policy, at the start of a wait, how many datagrams the loop took in
    /// since the previous one, and whether it slept then (rather than catching its event
    /// in a spin or having work at once): what a sleep gathers decides whether the loop
    /// spins (see [`Spin::Adaptive`]).
    pub(super) fn record_wake(self, waits: &mut Waits, datagrams: u64, slept: bool) {
        let Spin::Adaptive(_) = self else {
            return;
        };
        if datagrams > 0 {
            waits.datagrams_lately = true;
        }
        if !slept {
            return;
        }
        if std::mem::take(&mut waits.test_sleeping) {
            match datagrams {
                // The sleep ended on something else (a send's completion): the next one
                // tests, if the test has sleeps left.
                0 => {}
                // One datagram: a round trip, whose next tests come further apart.
                1 => {
                    waits.test_sleeps = 0;
                    waits.gather_test_gap = (waits.gather_test_gap() * 2).min(GATHER_TEST_EVERY);
                }
                _ => {
                    waits.test_sleeps = 0;
                    waits.start_gathering();
                }
            }
        } else if !waits.gathering && datagrams > 1 {
            // Any sleep that gathered says the same as a test that did: a relay whose
            // test sleeps happened to bring one datagram each, or that the probes and
            // misses keep sleeping (so that it seldom reaches a test), spun away a few
            // per cent of its CPU in catches that took longer than its work.
            waits.start_gathering();
        } else if waits.gathering {
            match datagrams {
                0 => waits.empty_wakes += 1,
                1 => waits.single_wakes += 1,
                _ => {
                    waits.single_wakes = 0;
                    waits.empty_wakes = 0;
                }
            }
            // One datagram a wake (a round trip), or none (the datagrams stopped, and
            // what wakes the loop now may be a round trip of another kind): spin again.
            if waits.single_wakes >= SINGLE_WAKES_TO_SPIN
                || waits.empty_wakes >= EMPTY_WAKES_TO_SPIN
            {
                waits.gathering = false;
                waits.spins_untested = 0;
            }
        }
    }

    /// Whether the waits are measured for the moving average.
    pub(super) fn measures_waits(self) -> bool {
        matches!(self, Spin::Adaptive(_))
    }

    /// Whether the coming wait, as [`budget`](Self::budget) left `waits`, counts in the
    /// average: a sleep chosen over a spin (a gathering loop's, a test's) does not, and
    /// then the clock is not read for it (a relay that gathers waits a dozen times a
    /// millisecond, and two reads a wait were a tenth of its user-space time).
    pub(super) fn measures_wait(self, waits: &Waits) -> bool {
        self.measures_waits() && !waits.test_sleeping && !waits.gathering
    }

    /// Takes one more wait into the moving average: recent waits weigh most, and a wait
    /// counts for at most twice the limit, so a few fast round trips after an idle spell,
    /// however long, bring the spin back. A look that caught its event restarts the
    /// average from that wait: the exchange is fast again. `missed`: the loop looked
    /// before this wait and the look ended with nothing caught.
    pub(super) fn record(self, waits: &mut Waits, wait: Duration, missed: bool) {
        let Spin::Adaptive(limit) = self else {
            return;
        };
        let probing = std::mem::take(&mut waits.probing);
        if !self.measures_wait(waits) {
            // A sleep the loop chose over a spin is a wake-up longer than the events
            // were apart: counted, it would stop the spin it tests.
            return;
        }
        if std::mem::take(&mut waits.spinning) {
            waits.spin_misses = (waits.spin_misses << 1) | u32::from(missed);
            waits.judge_probation();
        }
        if missed {
            // A look from a loop already sleeping by the average keeps to its own pace.
            waits.missed = if probing && waits.missed == 0 {
                PROBE_EVERY
            } else {
                (waits.missed * 2).clamp(2, PROBE_EVERY)
            };
            waits.unspun = 0;
            // The wait went on past the look: idle time after a burst, say, which says
            // nothing of how soon events come while they come.
            return;
        } else if probing && wait <= limit {
            waits.recent = wait;
            waits.missed = 0;
            // Caught by a probe of a loop the misses stopped: it spins again, with one
            // miss forgiven, so that bursts (one more miss) stop it again at once, while
            // a round trip that was late a few times spins on as those misses age out.
            if std::mem::take(&mut waits.probing_after_misses) {
                waits.spin_misses &= waits.spin_misses.wrapping_sub(1);
                waits.probation_spins = 1;
            }
            return;
        }
        waits.recent = (waits.recent * 3 + wait.min(limit * 2)) / 4;
    }
}

/// What the adaptive spin knows of the loop's recent waits.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Waits {
    /// Moving average of the waits.
    recent: Duration,
    /// Sleeps in a row without a spin.
    unspun: u32,
    /// The coming wait follows a look taken while the loop was sleeping.
    probing: bool,
    /// After looks that caught nothing: the loop looks only every this many waits
    /// (0: it spins by the average alone).
    missed: u32,
    /// The coming wait follows a spin (a look by the average, or a probe).
    spinning: bool,
    /// The last 32 spins, newest in the lowest bit: 1 for one that caught nothing.
    spin_misses: u32,
    /// The coming wait follows a probe taken because the spins missed often.
    probing_after_misses: bool,
    /// Spins since a probe's catch let the loop spin again, while fewer than
    /// [`PROBATION_SPINS`] (0: not on probation).
    probation_spins: u32,
    /// Waits between the probes of a loop the misses stopped, beyond
    /// [`PROBE_AFTER_MISSES`] (0: that).
    stopped_probe_gap: u32,
    /// Spins since the last test of what a sleep gathers.
    spins_untested: u32,
    /// Spins between tests now (0: [`GATHER_TEST_FIRST`]).
    gather_test_gap: u32,
    /// Datagrams came in since the last test: a loop without any has nothing to test.
    datagrams_lately: bool,
    /// The coming wait is a test sleep in place of a spin.
    test_sleeping: bool,
    /// Sleeps the test may still take, when one ended with no datagram.
    test_sleeps: u32,
    /// Sleeps gather more than one datagram: the loop does not spin.
    gathering: bool,
    /// Wakes, while gathering, that brought one datagram since one brought more.
    single_wakes: u32,
    /// Wakes, while gathering, that brought none since one brought more than one.
    empty_wakes: u32,
}

/// Most spins between two test sleeps of a loop that takes in datagrams: rare enough that
/// a round trip's percentiles up to the 99th never see one.
const GATHER_TEST_EVERY: u32 = 1024;

/// Spins before the first test sleep, and after a test that found the sleeps gather:
/// a relay fed in bursts (a spin or two at each burst's end) is found out within a few
/// dozen bursts, not a thousand. Each test that finds one datagram doubles the gap, up
/// to [`GATHER_TEST_EVERY`]: a round trip pays a handful of test sleeps in its first
/// thousand exchanges, then one per thousand.
const GATHER_TEST_FIRST: u32 = 64;

/// Sleeps one test may take: the first may end on the completion of a send the loop
/// had just queued, before any datagram could come.
const GATHER_TEST_SLEEPS: u32 = 2;

/// Wakes that bring one datagram each, with none bringing more, after which a loop
/// that gathered spins again. Not fewer: at the end of each burst a relay that has caught
/// up wakes to single datagrams a few times in a row (with four, 64 flows at 100k
/// packets/s went back to spinning up to twice a second); a round trip after
/// a burst sleeps through sixteen exchanges, a few hundred microseconds.
const SINGLE_WAKES_TO_SPIN: u32 = 16;

/// Wakes that bring no datagram, with none bringing more than one, after which a loop
/// that gathered spins again: its datagrams stopped (a program that turned to TCP
/// round trips after a burst must get its spin back).
const EMPTY_WAKES_TO_SPIN: u32 = 8;

/// Misses among the last 32 spins at which the loop stops spinning by the average.
const MISSES_TO_STOP: u32 = 4;

/// A loop the misses stopped probes once every this many waits: seldom enough that a
/// burst pattern spins through few bursts, soon enough that a round trip late a few
/// times in a row is slept through for a few round trips only.
const PROBE_AFTER_MISSES: u32 = 16;

/// Spins after a probe's catch within which a stop again counts against the probes.
const PROBATION_SPINS: u32 = 16;

/// Longest gap between the probes of a loop the misses keep stopping: a relay fed in
/// bursts, whose every resumption ends at the next burst's end, probes a few times a
/// second rather than every few bursts.
const MAX_PROBE_AFTER_MISSES: u32 = 256;

impl Waits {
    /// Sleeps gather datagrams: the loop stops spinning, probes included.
    fn start_gathering(&mut self) {
        self.gathering = true;
        // Once it spins again, the next test comes soon: the datagrams that gathered
        // once likely still come in bursts.
        self.gather_test_gap = GATHER_TEST_FIRST;
        self.single_wakes = 0;
        self.empty_wakes = 0;
    }

    fn gather_test_gap(&self) -> u32 {
        self.gather_test_gap.max(GATHER_TEST_FIRST)
    }

    fn probe_gap(&self) -> u32 {
        self.stopped_probe_gap.max(PROBE_AFTER_MISSES)
    }

    /// After a spin of a loop that a probe let spin again: misses that stop it again
    /// within [`PROBATION_SPINS`] say the pattern that stopped it is still there (a
    /// burst end), so its probes come twice as far apart; that many spins without say
    /// the events come back fast again (a round trip late a few times), and the gap is
    /// reset.
    fn judge_probation(&mut self) {
        if self.probation_spins == 0 {
            return;
        }
        if self.misses_often() {
            self.probation_spins = 0;
            self.stopped_probe_gap = (self.probe_gap() * 2).min(MAX_PROBE_AFTER_MISSES);
        } else if self.probation_spins >= PROBATION_SPINS {
            self.probation_spins = 0;
            self.stopped_probe_gap = PROBE_AFTER_MISSES;
        } else {
            self.probation_spins += 1;
        }
    }

    /// Whether the loop's spins often end with nothing caught: events that come in bursts
    /// (a relay fed every millisecond, whose every burst ends in a look that finds
    /// nothing), where a sleep would also gather the next burst into one wake-up. A
    /// round trip almost never misses (0.2 % of its spins here), a relay fed in bursts
    /// about every fifth. Until a probe catches its event, the loop then only probes.
    fn misses_often(&self) -> bool {
        self.spin_misses.count_ones() >= MISSES_TO_STOP
    }
}

/// A sleeping adaptive loop looks once every this many waits (see [`Spin::Adaptive`]).
const PROBE_EVERY: u32 = 64;

impl Default for Spin {
    /// Adaptive, for waits of up to 30 µs: about what a wake-up costs on a virtual
    /// machine. A round trip that comes back that soon is watched for rather than
    /// slept through; events further apart cost more CPU spun than slept, so the loop
    /// sleeps.
    fn default() -> Spin {
        Spin::Adaptive(Duration::from_micros(30))
    }
}

impl Spin {
    /// `RINGSOCK_SPIN`: `off`, `adaptive`, `adaptive-<N>us` (an adaptive limit of N
    /// microseconds), or microseconds to spin before every sleep (`50` or `50us`; `0` is
    /// off). `None` when unset.
    pub fn from_env() -> crate::Result<Option<Spin>> {
        match std::env::var("RINGSOCK_SPIN") {
            Ok(value) => value
                .parse()
                .map(Some)
                .map_err(|err: crate::Error| err.in_variable("RINGSOCK_SPIN")),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(crate::Error::invalid_input(
                "RINGSOCK_SPIN is not valid UTF-8",
            )),
        }
    }
}

impl std::fmt::Display for Spin {
    /// `off`, `50us` (fixed) or `adaptive-30us`; a time that is not a whole number of
    /// microseconds in nanoseconds (`500ns`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let time = |spin: &Duration| {
            if spin.subsec_nanos() % 1_000 == 0 {
                format!("{}us", spin.as_micros())
            } else {
                format!("{}ns", spin.as_nanos())
            }
        };
        match self {
            Spin::Off => f.write_str("off"),
            Spin::Fixed(spin) => f.write_str(&time(spin)),
            Spin::Adaptive(spin) => write!(f, "adaptive-{}", time(spin)),
        }
    }
}

impl std::str::FromStr for Spin {
    type Err = crate::Error;

    /// `off`, `adaptive`, microseconds to spin before every sleep (`50`, `0` is off), or
    /// what a `Spin` of at most one second prints: `50us`, `500ns`, `adaptive-30us` (an
    /// adaptive limit of 30 us). Longer times are refused (the runtime takes no more).
    fn from_str(s: &str) -> crate::Result<Spin> {
        let invalid = || {
            crate::Error::invalid_input(format!(
                "unknown spin {s:?}: expected off, adaptive, adaptive-<N>us or microseconds \
                 up to 1000000 (50 or 50us; nanoseconds as 500ns)"
            ))
        };
        let time = |text: &str| -> crate::Result<Duration> {
            let (digits, nanos_each) = match text.strip_suffix("ns") {
                Some(digits) => (digits, 1),
                None => (text.strip_suffix("us").unwrap_or(text), 1_000),
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            match digits
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(nanos_each))
            {
                Some(nanos) if nanos <= MAX_SPIN.as_nanos() as u64 => {
                    Ok(Duration::from_nanos(nanos))
                }
                _ => Err(invalid()),
            }
        };
        match s {
            "off" => Ok(Spin::Off),
            "adaptive" => Ok(Spin::default()),
            _ => match s.strip_prefix("adaptive-") {
                Some(limit) => match time(limit)? {
                    limit if limit.is_zero() => Err(invalid()),
                    limit => Ok(Spin::Adaptive(limit)),
                },
                None => match time(s)? {
                    spin if spin.is_zero() => Ok(Spin::Off),
                    spin => Ok(Spin::Fixed(spin)),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits_of(recent: Duration) -> Waits {
        Waits {
            recent,
            ..Waits::default()
        }
    }

    #[test]
    fn adaptive_spin_stops_after_long_waits_and_returns_after_fast_ones() {
        let policy = Spin::Adaptive(Duration::from_micros(30));
        let mut waits = Waits::default();
        assert!(policy.budget(&mut waits).is_some());
        // An idle spell: long waits turn the spin off.
        for _ in 0..10 {
            policy.record(&mut waits, Duration::from_secs(3600), false);
        }
        assert_eq!(policy.budget(&mut waits), None);
        // Round trips of 15 us bring it back within a few waits, however long the spell.
        let mut count = 0;
        while policy.budget(&mut waits).is_none() {
            policy.record(&mut waits, Duration::from_micros(15), false);
            count += 1;
            assert!(count <= 6, "the spin took {count} waits to come back");
        }
        // Steady gaps of 40 us, a relay at 20k packets/s say, cost more spun than slept.
        for _ in 0..50 {
            policy.record(&mut waits, Duration::from_micros(40), false);
        }
        assert_eq!(policy.budget(&mut waits), None);
    }

    #[test]
    fn a_sleeping_adaptive_loop_looks_now_and_then_and_a_caught_event_brings_the_spin_back() {
        let limit = Duration::from_micros(30);
        let policy = Spin::Adaptive(limit);
        // Round trips that take a wake-up longer because the loop sleeps through them.
        let mut waits = waits_of(Duration::from_micros(60));
        let mut sleeps = 0;
        let probe = loop {
            match policy.budget(&mut waits) {
                Some(spin) => break spin,
                None => {
                    policy.record(&mut waits, Duration::from_micros(60), false);
                    sleeps += 1;
                }
            }
        };
        assert_eq!(sleeps, PROBE_EVERY - 1);
        assert_eq!(probe, limit);
        // The look caught the answer after 20 us: the loop spins again at once.
        policy.record(&mut waits, Duration::from_micros(20), false);
        assert_eq!(policy.budget(&mut waits), Some(Duration::from_micros(60)));
        // A look that finds nothing changes only the average.
        let mut waits = waits_of(Duration::from_micros(60));
        waits.unspun = PROBE_EVERY - 1;
        assert_eq!(policy.budget(&mut waits), Some(limit));
        policy.record(&mut waits, Duration::from_micros(45), true);
        assert_eq!(policy.budget(&mut waits), None);
    }

    #[test]
    fn a_look_that_catches_nothing_costs_a_short_look_at_the_next_burst_end() {
        let limit = Duration::from_micros(30);
        let policy = Spin::Adaptive(limit);
        // A relay fed a burst every millisecond: gaps of 5 us inside the burst, then a
        // look that finds nothing at its end and a sleep through the idle rest.
        let mut waits = waits_of(Duration::from_micros(5));
        for burst in 0..200 {
            for _ in 0..4 {
                policy.budget(&mut waits);
                policy.record(&mut waits, Duration::from_micros(5), false);
            }
            let end = policy.budget(&mut waits);
            // The idle time after the last miss did not lengthen this look: it lasts a
            // few in-burst gaps, not the limit.
            if let Some(look) = end {
                assert!(look <= Duration::from_micros(16), "burst {burst}: {look:?}");
            }
            policy.record(&mut waits, Duration::from_micros(900), end.is_some());
        }
    }

    #[test]
    fn a_late_round_trip_costs_one_sleep() {
        let limit = Duration::from_micros(30);
        let policy = Spin::Adaptive(limit);
        let mut waits = waits_of(Duration::from_micros(15));
        assert!(policy.budget(&mut waits).is_some());
        policy.record(&mut waits, Duration::from_micros(200), true);
        // The next wait is slept through, the one after looks.
        assert_eq!(policy.budget(&mut waits), None);
        policy.record(&mut waits, Duration::from_micros(60), false);
        assert_eq!(policy.budget(&mut waits), Some(limit));
        // It caught the answer: the loop spins by the average again.
        policy.record(&mut waits, Duration::from_micros(15), false);
        assert!(policy.budget(&mut waits).is_some());
        policy.record(&mut waits, Duration::from_micros(15), false);
        assert!(policy.budget(&mut waits).is_some());
        // Looks that keep missing come ever further apart, up to one in 64 waits.
        let mut waits = waits_of(Duration::from_micros(15));
        let mut looks = 0;
        for _ in 0..1000 {
            let looked = policy.budget(&mut waits).is_some();
            looks += usize::from(looked);
            policy.record(&mut waits, Duration::from_micros(25), looked);
        }
        assert!(looks <= 1000 / PROBE_EVERY as usize + 7, "{looks} looks");
    }

    #[test]
    fn spins_that_keep_missing_at_burst_ends_stop_until_a_probe_catches() {
        let limit = Duration::from_micros(30);
        let policy = Spin::Adaptive(limit);
        // A relay fed a burst every millisecond: four datagrams caught 5 us apart, then a
        // look at the burst's end that finds nothing, and the idle rest slept through.
        let mut waits = waits_of(Duration::from_micros(5));
        let mut spins_per_burst = Vec::new();
        for _ in 0..40 {
            let mut spins = 0;
            for _ in 0..4 {
                let spun = policy.budget(&mut waits).is_some();
                spins += usize::from(spun);
                policy.record(&mut waits, Duration::from_micros(5), false);
            }
            let end = policy.budget(&mut waits);
            spins += usize::from(end.is_some());
            policy.record(&mut waits, Duration::from_micros(900), end.is_some());
            spins_per_burst.push(spins);
        }
        // Four bursts ending in a miss stop the spin; after that only the probes look
        // (one in 16 waits), each caught one buying a burst or a few of spinning: less
        // than half the spins of a loop that spins through every burst (4 or 5 each).
        let later: usize = spins_per_burst[10..].iter().sum();
        assert!(
            later <= 30 * 5 / 2,
            "spins per burst after the first ten: {spins_per_burst:?}"
        );

        // A round trip that comes back in 15 us, late three times in a row once, spins
        // again after one probe.
        let mut waits = waits_of(Duration::from_micros(15));
        for _ in 0..4 {
            assert!(policy.budget(&mut waits).is_some());
            policy.record(&mut waits, Duration::from_micros(200), true);
            while policy.budget(&mut waits).is_none() {
                policy.record(&mut waits, Duration::from_micros(60), false);
            }
            policy.record(&mut waits, Duration::from_micros(15), false);
        }
        let mut slept = 0;
        while policy.budget(&mut waits).is_none() {
            policy.record(&mut waits, Duration::from_micros(60), false);
            slept += 1;
            assert!(slept <= PROBE_AFTER_MISSES, "no probe");
        }
        policy.record(&mut waits, Duration::from_micros(15), false);
        for _ in 0..100 {
            assert!(
                policy.budget(&mut waits).is_some(),
                "the round trip spins again"
            );
            policy.record(&mut waits, Duration::from_micros(15), false);
        }
    }

    #[test]
    fn probes_that_keep_leading_back_to_misses_come_ever_further_apart() {
        let limit = Duration::from_micros(30);
        let policy = Spin::Adaptive(limit);
        // A relay fed a burst every millisecond, whose looks catch its datagrams 25 us
        // apart and miss at every burst's end: each probe that catches buys spins that
        // end in a miss at the next burst's end.
        let mut waits = waits_of(Duration::from_micros(25));
        let mut spins_in_bursts = Vec::new();
        for _ in 0..400 {
            let mut spins = 0;
            for _ in 0..4 {
                let spun = policy.budget(&mut waits).is_some();
                spins += usize::from(spun);
                policy.record(&mut waits, Duration::from_micros(25), false);
            }
            let end = policy.budget(&mut waits);
            spins += usize::from(end.is_some());
            policy.record(&mut waits, Duration::from_micros(900), end.is_some());
            spins_in_bursts.push(spins);
        }
        // Once the gap has grown, a probe comes every 256 waits (about 50 bursts) and
        // buys a burst or a few of spinning: a few dozen spins in 200 bursts, where
        // probes every 16 waits would buy about 300, and spinning through every burst
        // 1,000.
        let late: usize = spins_in_bursts[200..].iter().sum();
        assert!(late <= 60, "spins in the last 200 bursts: {late}");
        assert_eq!(waits.probe_gap(), MAX_PROBE_AFTER_MISSES);

        // Round trips that come back in 15 us again: a probe catches one, the loop spins
        // on, and once the misses age out its next stop probes at the first gap again.
        let mut slept = 0;
        while policy.budget(&mut waits).is_none() {
            policy.record(&mut waits, Duration::from_micros(60), false);
            slept += 1;
            assert!(slept <= MAX_PROBE_AFTER_MISSES, "no probe");
        }
        policy.record(&mut waits, Duration::from_micros(15), false);
        for _ in 0..40 {
            assert!(policy.budget(&mut waits).is_some(), "the round trip spins");
            policy.record(&mut waits, Duration::from_micros(15), false);
        }
        assert_eq!(waits.probe_gap(), PROBE_AFTER_MISSES);
    }

    /// One wait of a loop that spins while it can: its budget, then `wait` and what the
    /// wake brought. Returns whether it spun.
    fn one_wait(policy: Spin, waits: &mut Waits, wait: Duration, datagrams: u64) -> bool {
        let spun = policy.budget(waits).is_some();
        policy.record(waits, wait, false);
        policy.record_wake(waits, datagrams, !spun);
        spun
    }

    #[test]
    fn a_loop_whose_sleeps_gather_datagrams_stops_spinning_until_they_come_one_by_one() {
        let policy = Spin::Adaptive(Duration::from_micros(30));
        let gap = Duration::from_micros(5);
        // A relay inside a long burst: each spin catches one datagram 5 us after the last.
        let mut waits = waits_of(gap);
        let mut spins = 0;
        while policy.budget(&mut waits).is_some() {
            policy.record(&mut waits, gap, false);
            policy.record_wake(&mut waits, 1, false);
            spins += 1;
            assert!(spins <= GATHER_TEST_FIRST, "no test sleep");
        }
        assert_eq!(spins, GATHER_TEST_FIRST - 1);
        policy.record(&mut waits, Duration::from_micros(40), false);
        // The test sleep woke to four datagrams: sleeping gathers, the loop stops spinning,
        // probes included, however short the gaps.
        let mut waits_after = waits;
        policy.record_wake(&mut waits_after, 4, true);
        for _ in 0..1000 {
            assert!(!one_wait(policy, &mut waits_after, gap, 3));
            // Nor is the clock read for the waits it would not count.
            assert!(!policy.measures_wait(&waits_after));
        }
        // The traffic thins out to one datagram per wake: after sixteen such wakes it spins,
        // and tests again after the first gap, not the longest.
        for wake in 0..SINGLE_WAKES_TO_SPIN {
            assert!(!one_wait(policy, &mut waits_after, gap, 1), "wake {wake}");
        }
        let mut spins = 0;
        while one_wait(policy, &mut waits_after, gap, 1) {
            spins += 1;
            assert!(spins < GATHER_TEST_FIRST, "no test sleep");
        }
        // A single datagram between wakes that gather does not end the gathering.
        let mut waits_mixed = waits;
        policy.record_wake(&mut waits_mixed, 2, true);
        for wake in 0..100 {
            let datagrams = if wake % 3 == 0 { 3 } else { 1 };
            assert!(!one_wait(policy, &mut waits_mixed, gap, datagrams));
        }
    }

    #[test]
    fn any_sleep_that_wakes_to_several_datagrams_stops_the_spin() {
        let policy = Spin::Adaptive(Duration::from_micros(30));
        let burst_gap = Duration::from_micros(5);
        // A relay that spins through a burst and misses at its end: the sleep after the
        // miss wakes to the next burst's first datagrams. Before its first test sleep,
        // it stops spinning.
        let mut waits = waits_of(burst_gap);
        assert!(policy.budget(&mut waits).is_some());
        policy.record(&mut waits, Duration::from_micros(900), true);
        policy.record_wake(&mut waits, 4, true);
        for wake in 0..1000 {
            assert!(
                !one_wait(policy, &mut waits, burst_gap, 3),
                "spun at wake {wake}"
            );
        }
        // A loop the average keeps asleep (waits of 60 us) would probe every 64th wait;
        // its sleeps wake to several datagrams each, so it does not.
        let mut waits = waits_of(Duration::from_micros(60));
        for wake in 0..1000 {
            let spun = one_wait(policy, &mut waits, Duration::from_micros(60), 2);
            assert!(!spun, "probed at wake {wake}");
        }
        // One datagram a wake, as a round trip's: the same loop looks now and then.
        let mut waits = waits_of(Duration::from_micros(60));
        let probed = (0..1000).any(|_| one_wait(policy, &mut waits, Duration::from_micros(60), 1));
        assert!(probed);
    }

    #[test]
    fn a_loop_that_gathered_and_then_gets_no_datagrams_spins_again() {
        let policy = Spin::Adaptive(Duration::from_micros(30));
        let round_trip = Duration::from_micros(19);
        let mut waits = waits_of(round_trip);
        waits.gathering = true;
        // A burst is over; what wakes the loop now is a TCP round trip's reply.
        let mut slept = 0;
        while !one_wait(policy, &mut waits, round_trip, 0) {
            slept += 1;
            assert!(slept <= EMPTY_WAKES_TO_SPIN, "still not spinning");
        }
        assert_eq!(slept, EMPTY_WAKES_TO_SPIN);
        for _ in 0..10 * GATHER_TEST_EVERY {
            assert!(one_wait(policy, &mut waits, round_trip, 0));
        }
        // Empty wakes between wakes that gather (sends' completions in a relay) do not
        // end the gathering.
        let mut waits = waits_of(round_trip);
        waits.gathering = true;
        for wake in 0..1000 {
            let datagrams = if wake % 4 == 0 { 3 } else { 0 };
            assert!(!one_wait(policy, &mut waits, round_trip, datagrams));
        }
    }

    #[test]
    fn a_round_trip_sleeps_once_per_test_and_spins_on() {
        let policy = Spin::Adaptive(Duration::from_micros(30));
        let round_trip = Duration::from_micros(19);
        // One reply per wake: a test sleep (a wake-up slower) finds one datagram.
        let mut waits = waits_of(round_trip);
        let mut sleeps = Vec::new();
        for wait in 0..10 * GATHER_TEST_EVERY {
            let spun = policy.budget(&mut waits).is_some();
            let took = if spun {
                round_trip
            } else {
                sleeps.push(wait);
                Duration::from_micros(60)
            };
            policy.record(&mut waits, took, false);
            policy.record_wake(&mut waits, 1, !spun);
        }
        // The test takes the place of the 64th spin, then of the 128th after it, and so
        // on to every 1,024th: four tests in the first thousand round trips, then one per
        // 1,024.
        let spins_between: Vec<u32> = sleeps.windows(2).map(|w| w[1] - w[0] - 1).collect();
        assert_eq!(sleeps[0], GATHER_TEST_FIRST - 1, "{sleeps:?}");
        assert_eq!(spins_between[..4], [127, 255, 511, 1023], "{sleeps:?}");
        assert!(
            spins_between[4..]
                .iter()
                .all(|&spins| spins == GATHER_TEST_EVERY - 1),
            "{sleeps:?}"
        );

        // A test sleep that ended on a send's completion, with no datagram, tests again
        // once; the reply then says round trip.
        let mut waits = waits_of(round_trip);
        waits.spins_untested = GATHER_TEST_FIRST - 1;
        waits.datagrams_lately = true;
        assert_eq!(policy.budget(&mut waits), None);
        policy.record(&mut waits, Duration::from_micros(2), false);
        policy.record_wake(&mut waits, 0, true);
        assert_eq!(policy.budget(&mut waits), None);
        policy.record(&mut waits, Duration::from_micros(60), false);
        policy.record_wake(&mut waits, 1, true);
        assert!(policy.budget(&mut waits).is_some());
        assert!(!waits.gathering);
    }

    #[test]
    fn a_loop_without_datagrams_never_sleeps_to_test() {
        let policy = Spin::Adaptive(Duration::from_micros(30));
        let round_trip = Duration::from_micros(19);
        // A TCP round trip: its reads are no datagrams.
        let mut waits = waits_of(round_trip);
        for wait in 0..10 * GATHER_TEST_EVERY {
            assert!(one_wait(policy, &mut waits, round_trip, 0), "wait {wait}");
        }
        // Fixed and off know nothing of datagrams.
        let mut waits = Waits::default();
        Spin::Fixed(round_trip).record_wake(&mut waits, 5, true);
        assert!(!waits.gathering && !waits.datagrams_lately);
    }

    #[test]
    fn adaptive_spin_lasts_a_few_recent_waits() {
        let policy = Spin::Adaptive(Duration::from_micros(30));
        let mut waits = waits_of(Duration::from_micros(60));
        for _ in 0..50 {
            policy.record(&mut waits, Duration::from_micros(5), false);
        }
        // Gaps of 5 us inside a burst: the spin after its last datagram is short.
        let budget = policy.budget(&mut waits).unwrap();
        assert!(budget <= Duration::from_micros(16), "{budget:?}");
        assert!(budget >= MIN_ADAPTIVE_SPIN, "{budget:?}");
        for _ in 0..50 {
            policy.record(&mut waits, Duration::from_micros(14), false);
        }
        let budget = policy.budget(&mut waits).unwrap();
        assert!(budget >= Duration::from_micros(40), "{budget:?}");
        assert!(budget <= Duration::from_micros(60), "{budget:?}");
        // Nothing at all lately still looks at least a few system calls' worth.
        let mut waits = Waits::default();
        assert_eq!(policy.budget(&mut waits), Some(MIN_ADAPTIVE_SPIN));
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
        for spin in [
            Spin::Off,
            Spin::Fixed(Duration::from_micros(50)),
            Spin::default(),
            Spin::Adaptive(Duration::from_micros(80)),
            Spin::Adaptive(Duration::from_nanos(500)),
            Spin::Fixed(Duration::from_nanos(1_500)),
            Spin::Adaptive(MAX_SPIN),
            Spin::Fixed(MAX_SPIN),
        ] {
            assert_eq!(spin.to_string().parse::<Spin>().unwrap(), spin);
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
        assert_eq!(
            "adaptive-80us".parse::<Spin>().unwrap(),
            Spin::Adaptive(Duration::from_micros(80))
        );
        assert_eq!(
            "500ns".parse::<Spin>().unwrap(),
            Spin::Fixed(Duration::from_nanos(500))
        );
        assert_eq!("0ns".parse::<Spin>().unwrap(), Spin::Off);
        for bad in [
            "",
            "fast",
            "-1",
            "+5",
            "1000001",
            "10 us",
            "us",
            "adaptive-",
            "adaptive-0us",
            "adaptive-1000001us",
            "adaptive-x",
            "ns",
            "1000000001ns",
            "adaptive-0ns",
            "18446744073709551615",
            "5usns",
        ] {
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
        let spin = Duration::from_micros(50);
        assert_eq!(
            Spin::Fixed(spin).budget(&mut waits_of(Duration::from_secs(1))),
            Some(spin)
        );
        assert_eq!(Spin::Off.budget(&mut Waits::default()), None);
        assert!(!Spin::Fixed(spin).measures_waits());
        assert!(Spin::Adaptive(spin).measures_waits());
    }
}
