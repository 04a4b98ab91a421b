//! Log lines a peer can provoke (a reset connection, a failed accept), at most a few a
//! second: the others are counted and summed up in one line when the second is over, so
//! a hostile client cannot fill the disk through stderr.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Which lines of one kind are printed: the first `burst` of an interval; the others are
/// held back and counted, and their count is due when the interval ends.
#[derive(Debug)]
pub struct LineBudget {
    burst: u32,
    interval: Duration,
    window: Option<Window>,
}

#[derive(Debug)]
struct Window {
    ends: Instant,
    printed: u32,
    held: u64,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Print it.
    Print,
    /// Hold it back. `Some(at)` for the first one held in an interval: the summary of
    /// the interval is due at `at`.
    Hold(Option<Instant>),
}

impl LineBudget {
    pub fn new(burst: u32, interval: Duration) -> LineBudget {
        LineBudget {
            burst,
            interval,
            window: None,
        }
    }

    /// One line at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        // An interval over with nothing held back leaves nothing to report: start anew.
        if self
            .window
            .as_ref()
            .is_some_and(|window| now >= window.ends && window.held == 0)
        {
            self.window = None;
        }
        let interval = self.interval;
        let window = self.window.get_or_insert_with(|| Window {
            ends: now + interval,
            printed: 0,
            held: 0,
        });
        if window.printed < self.burst {
            window.printed += 1;
            return Admit::Print;
        }
        window.held += 1;
        Admit::Hold((window.held == 1).then_some(window.ends))
    }

    /// The summary is due at `now`: the number of lines held back. When there were
    /// some, the next interval starts now with its budget spent, so a flood that goes
    /// on gives one summary per interval and no other line.
    pub fn summarize(&mut self, now: Instant) -> u64 {
        let Some(window) = self.window.as_mut() else {
            return 0;
        };
        let held = window.held;
        if held == 0 {
            self.window = None;
        } else {
            *window = Window {
                ends: now + self.interval,
                printed: self.burst,
                held: 0,
            };
        }
        held
    }
}

/// One kind of stderr line (`KIND: DETAIL`) under a [`LineBudget`]. A summary reads
/// `KIND: N more in the last 1s, the last: DETAIL`. Shared by the tasks of one runtime;
/// a summary is printed by a task of that runtime when it is due.
#[derive(Clone)]
pub struct RateLimitedLog {
    inner: Rc<RefCell<Inner>>,
}

struct Inner {
    kind: &'static str,
    budget: LineBudget,
    interval: Duration,
    /// The detail of the last line held back.
    last_held: String,
}

impl RateLimitedLog {
    /// At most `burst` lines of `kind` per `interval`, then a summary.
    pub fn new(kind: &'static str, burst: u32, interval: Duration) -> RateLimitedLog {
        RateLimitedLog {
            inner: Rc::new(RefCell::new(Inner {
                kind,
                budget: LineBudget::new(burst, interval),
                interval,
                last_held: String::new(),
            })),
        }
    }

    /// Prints `KIND: DETAIL`, or holds it back for the summary.
    pub fn line(&self, detail: String) {
        let mut inner = self.inner.borrow_mut();
        match inner.budget.admit(Instant::now()) {
            Admit::Print => eprintln!("{}: {detail}", inner.kind),
            Admit::Hold(due) => {
                inner.last_held = detail;
                if let Some(at) = due {
                    let log = self.clone();
                    ringsock::spawn(async move {
                        ringsock::runtime::sleep_until(at).await;
                        log.flush();
                    });
                }
            }
        }
    }

    /// Prints the summary of the lines held back, if there are any: when it is due, and
    /// before the program ends.
    pub fn flush(&self) {
        let mut inner = self.inner.borrow_mut();
        let held = inner.budget.summarize(Instant::now());
        if held > 0 {
            eprintln!(
                "{}: {held} more in the last {:?}, the last: {}",
                inner.kind, inner.interval, inner.last_held
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_lines_of_an_interval_print_and_the_rest_are_counted() {
        let mut budget = LineBudget::new(3, SECOND);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(budget.admit(t0), Admit::Print);
        }
        // The first line held back says when the summary is due; the others do not.
        assert_eq!(budget.admit(t0), Admit::Hold(Some(t0 + SECOND)));
        for _ in 0..9_999 {
            assert_eq!(budget.admit(t0), Admit::Hold(None));
        }
        assert_eq!(budget.summarize(t0 + SECOND), 10_000);
    }

    #[test]
    fn a_flood_that_goes_on_gives_one_summary_per_interval() {
        let mut budget = LineBudget::new(1, SECOND);
        let t0 = Instant::now();
        assert_eq!(budget.admit(t0), Admit::Print);
        assert_eq!(budget.admit(t0), Admit::Hold(Some(t0 + SECOND)));
        let t1 = t0 + SECOND;
        assert_eq!(budget.summarize(t1), 1);
        // The next interval's budget is spent: its lines only count.
        assert_eq!(budget.admit(t1), Admit::Hold(Some(t1 + SECOND)));
        assert_eq!(budget.admit(t1), Admit::Hold(None));
        assert_eq!(budget.summarize(t1 + SECOND), 2);
    }

    #[test]
    fn after_a_quiet_interval_lines_print_again() {
        let mut budget = LineBudget::new(1, SECOND);
        let t0 = Instant::now();
        assert_eq!(budget.admit(t0), Admit::Print);
        assert_eq!(budget.admit(t0), Admit::Hold(Some(t0 + SECOND)));
        assert_eq!(budget.summarize(t0 + SECOND), 1);
        // Nothing in the interval after the summary: it ends with nothing to say.
        assert_eq!(budget.summarize(t0 + 2 * SECOND), 0);
        assert_eq!(budget.admit(t0 + 3 * SECOND), Admit::Print);
        // An interval that held nothing back also ends by itself.
        assert_eq!(budget.admit(t0 + 5 * SECOND), Admit::Print);
    }

    #[test]
    fn lines_after_the_end_but_before_the_summary_go_into_it() {
        let mut budget = LineBudget::new(1, SECOND);
        let t0 = Instant::now();
        budget.admit(t0);
        budget.admit(t0);
        assert_eq!(budget.admit(t0 + 2 * SECOND), Admit::Hold(None));
        assert_eq!(budget.summarize(t0 + 2 * SECOND), 2);
    }
}
