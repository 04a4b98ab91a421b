//! The demo's comparison of batched and per-write sends: tcp-batch with 64-byte messages
//! in groups of 64, sent three ways — ringsock's flush, the same writes each awaited
//! before the next, and std with one system call per write — each run sized to take
//! under a second, then one small table.
//!
//! ```no_run
//! use ringsock_cli::bench::{compare, Impl};
//!
//! let comparison = compare::run(Impl::RingsockUring, false)?;
//! print!("{}", comparison.table());
//! # Ok::<_, ringsock::Error>(())
//! ```

use std::time::Duration;

use ringsock::Result;

use super::matrix::{fmt_rate, render};
use super::options::{Impl, Options, Pattern, Workload};
use super::report::Report;

/// Message size of the comparison.
pub const SIZE: usize = 64;
/// Writes per group.
pub const BATCH: usize = 64;
/// Messages of the short run that sizes each measured run.
const PROBE: u64 = (64 * BATCH) as u64;
/// About how long each measured run takes.
const RUN_TIME: Duration = Duration::from_millis(700);
/// The longest run, whatever the probe said.
const MAX_COUNT: u64 = 8_000_000;

/// One way of sending the same messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Way {
    /// Its row in the table.
    pub label: &'static str,
    /// Who sends.
    pub imp: Impl,
    /// How a group is awaited (ringsock only).
    pub pattern: Pattern,
}

/// The three ways, with `ringsock` (`RingsockUring` or `RingsockEpoll`) for the first
/// two.
pub fn ways(ringsock: Impl) -> [Way; 3] {
    [
        Way {
            label: "ringsock: 64 writes, then one flush",
            imp: ringsock,
            pattern: Pattern::Flush,
        },
        Way {
            label: "ringsock: each write awaited alone",
            imp: ringsock,
            pattern: Pattern::PerWrite,
        },
        Way {
            label: "std: one system call per write",
            imp: Impl::StdPerWrite,
            pattern: Pattern::Flush,
        },
    ]
}

/// One line saying what [`run`] compares, for `ringsock`.
pub fn title(ringsock: Impl) -> String {
    let engine = match ringsock {
        Impl::RingsockEpoll => "epoll",
        _ => "io_uring",
    };
    format!(
        "batched vs per-write: {SIZE}-byte TCP messages in groups of {BATCH} to a plain std \
         receiver, ringsock on {engine}"
    )
}

/// What the comparison measured: one report per way, in [`ways`] order.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The ringsock impl compared.
    pub ringsock: Impl,
    /// Each way and its measured run.
    pub rows: Vec<(Way, Report)>,
}

fn options(way: &Way, count: u64, pin: bool) -> Options {
    let mut options = Options::new(Workload::TcpBatch, way.imp);
    options.pin = pin;
    options.size = SIZE;
    options.batch = BATCH;
    options.pattern = way.pattern;
    options.count = count;
    // Only the order of the first messages of a group: this is a demo, not a test.
    options.verify_stride = BATCH as u64;
    options
}

/// Runs the comparison on this thread (pinned to CPU 0 where it may, the receivers on
/// CPU 1), with a
/// progress bar on stderr when `progress` is set (hidden anyway when stderr is not a
/// terminal). A few seconds in all: a short probe per way sizes its measured run.
pub fn run(ringsock: Impl, progress: bool) -> Result<Comparison> {
    let ways = ways(ringsock);
    let bar = if progress {
        indicatif::ProgressBar::new(2 * ways.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:24} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    // Pinned where the machine lets this thread run on CPU 0; else as the scheduler likes.
    let pin = super::cpu::pin_to(super::cpu::MEASURED_CPU).is_ok();
    let mut rows = Vec::with_capacity(ways.len());
    for way in ways {
        bar.set_message(way.label);
        let probe = super::run(&options(&way, PROBE, pin))?;
        bar.inc(1);
        let count = match probe.msgs_per_s() {
            Some(rate) => ((rate * RUN_TIME.as_secs_f64()) as u64).clamp(PROBE, MAX_COUNT),
            None => PROBE,
        };
        let report = super::run(&options(&way, count, pin))?;
        bar.inc(1);
        rows.push((way, report));
    }
    bar.finish_and_clear();
    Ok(Comparison { ringsock, rows })
}

impl Comparison {
    /// The table: messages/s, system calls per message and the speed-up over std, one
    /// row per way; a failed run shows its error under the table.
    pub fn table(&self) -> String {
        let base = self
            .rows
            .iter()
            .find(|(way, _)| way.imp == Impl::StdPerWrite)
            .and_then(|(_, report)| report.msgs_per_s());
        let mut rows = vec![vec![
            "tcp-batch, 64 B x 64".to_string(),
            "msgs/s".to_string(),
            "syscalls/msg".to_string(),
            "speed-up".to_string(),
        ]];
        let mut notes = Vec::new();
        for (way, report) in &self.rows {
            let rate = report.msgs_per_s();
            let calls = report
                .syscalls_per_msg()
                .map_or("-".into(), |x| format!("{x:.3}"));
            let speedup = match (rate, base) {
                (Some(rate), Some(base)) if base > 0.0 => format!("{:.1}x", rate / base),
                _ => "-".into(),
            };
            rows.push(vec![way.label.to_string(), fmt_rate(rate), calls, speedup]);
            if let Some(error) = &report.error {
                notes.push(format!("{}: failed: {error}\n", way.label));
            }
        }
        let mut out = render(&rows);
        for note in notes {
            out.push_str(&note);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_way_and_the_speedups() {
        let rows = ways(Impl::RingsockEpoll)
            .into_iter()
            .zip([4_000_000.0, 200_000.0, 100_000.0])
            .map(|(way, rate)| {
                let mut report = Report::new(&options(&way, 1000, false));
                report.secs = Some(1000.0 / rate);
                report.delivered = 1000;
                report.syscalls = Some(if way.pattern == Pattern::Flush {
                    16
                } else {
                    1000
                });
                (way, report)
            })
            .collect();
        let table = Comparison {
            ringsock: Impl::RingsockEpoll,
            rows,
        }
        .table();
        assert!(table.contains("msgs/s"), "{table}");
        assert!(table.contains("40.0x"), "{table}");
        assert!(table.contains("2.0x"), "{table}");
        assert!(table.contains("1.0x"), "{table}");
        assert_eq!(table.lines().count(), 2 + 3, "{table}");
        assert!(title(Impl::RingsockEpoll).ends_with("on epoll"));
    }
}
