//! The default matrix of `ringsock bench` (without `--json`): every workload, size and
//! impl, each run in a child process of the same binary (`bench --json ...`) so runs do
//! not disturb each other, with a progress bar; then one table row per workload and size.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use ringsock::{Error, Result};
use serde_json::Value;

use super::options::{Impl, Options, Workload};

/// What the matrix runs.
#[derive(Debug, Clone)]
pub struct MatrixOptions {
    /// Every default count is multiplied by this.
    pub scale: f64,
    /// Passed to every run (`--pin on|off`).
    pub pin: bool,
    /// Only these workloads (all when empty).
    pub workloads: Vec<Workload>,
    /// Only these impls (all when empty).
    pub impls: Vec<Impl>,
    /// Rounds: each round runs every cell once, impls alternating within a row; the
    /// table shows medians.
    pub repeat: usize,
    /// Show a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Each run's watchdog (`--timeout`, seconds; 0: none).
    pub timeout: u64,
}

impl Default for MatrixOptions {
    fn default() -> Self {
        MatrixOptions {
            scale: 1.0,
            pin: true,
            workloads: Vec::new(),
            impls: Vec::new(),
            repeat: 1,
            progress: true,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// One workload, size and impl, with the JSON line of each of its runs.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The workload.
    pub workload: Workload,
    /// Message size.
    pub size: usize,
    /// Through TLS (tcp-batch `--tls`).
    pub tls: bool,
    /// The impl.
    pub imp: Impl,
    /// The count every run used.
    pub count: u64,
    /// One JSON value per run (an `error` key when it failed).
    pub runs: Vec<Value>,
}

impl Cell {
    /// The row's name: the workload, with " tls" through TLS.
    pub fn label(&self) -> String {
        if self.tls {
            format!("{} tls", self.workload)
        } else {
            self.workload.to_string()
        }
    }

    /// Median of a numeric field over the runs that did not fail.
    pub fn median(&self, field: &str) -> Option<f64> {
        let mut xs: Vec<f64> = self
            .runs
            .iter()
            .filter(|v| v.get("error").is_none())
            .filter_map(|v| v.get(field).and_then(Value::as_f64))
            .collect();
        if xs.is_empty() {
            return None;
        }
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        Some(if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        })
    }

    /// The first error among the runs, with how many failed.
    pub fn failure(&self) -> Option<String> {
        let failed: Vec<&Value> = self
            .runs
            .iter()
            .filter(|v| v.get("error").is_some())
            .collect();
        let first = failed.first()?;
        let message = first["error"].as_str().unwrap_or("?");
        Some(format!(
            "{}/{} failed: {message}",
            failed.len(),
            self.runs.len()
        ))
    }
}

/// Every cell of a matrix run.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Cells in row order, impls in column order within a row.
    pub cells: Vec<Cell>,
    /// The impls, in column order.
    pub impls: Vec<Impl>,
    /// Wall time of the whole matrix.
    pub secs: f64,
}

/// A run's watchdog when none is given, seconds (as `bench --timeout`).
pub const DEFAULT_TIMEOUT: u64 = 60;

/// The largest `--scale`: the default counts are sized for runs of about a second, and a
/// run at 100 times that meets the default watchdog already.
pub const MAX_SCALE: f64 = 100.0;

/// Sizes of the matrix's tcp-batch rows through TLS.
pub const TLS_SIZES: [usize; 1] = [1024];

/// The cells `options` selects, with the count each runs.
pub fn plan(options: &MatrixOptions) -> Vec<Cell> {
    let selected = |w: &Workload| options.workloads.is_empty() || options.workloads.contains(w);
    let impls = columns(options);
    let mut cells = Vec::new();
    // udp-relay is not in the default matrix; asked for, it runs at its defaults.
    let relay = options
        .workloads
        .contains(&Workload::UdpRelay)
        .then_some(Workload::UdpRelay);
    let workloads: Vec<Workload> = Workload::ALL.into_iter().chain(relay).collect();
    for workload in workloads.iter().filter(|w| selected(w)) {
        let mut rows: Vec<(usize, bool)> = workload
            .matrix_sizes()
            .iter()
            .map(|&size| (size, false))
            .collect();
        if *workload == Workload::TcpBatch {
            rows.extend(TLS_SIZES.iter().map(|&size| (size, true)));
        }
        for (size, tls) in rows {
            for &imp in &impls {
                // Only ringsock relays are measured in udp-relay.
                if *workload == Workload::UdpRelay && imp.backend().is_none() {
                    continue;
                }
                let mut run = Options::new(*workload, imp);
                run.size = size;
                run.tls = tls;
                let count = run.default_count() as f64;
                cells.push(Cell {
                    workload: *workload,
                    size,
                    tls,
                    imp,
                    count: (count * options.scale).max(1.0) as u64,
                    runs: Vec::new(),
                });
            }
        }
    }
    cells
}

fn columns(options: &MatrixOptions) -> Vec<Impl> {
    Impl::ALL
        .into_iter()
        .filter(|imp| options.impls.is_empty() || options.impls.contains(imp))
        .collect()
}

/// Checks that every cell's run is one the single-run command takes (a `--scale` may
/// push a count past its workload's limit): the first that is not, named.
pub fn check(options: &MatrixOptions, cells: &[Cell]) -> std::result::Result<(), String> {
    if cells.is_empty() {
        let names = |names: Vec<&str>| match names.is_empty() {
            true => "(any)".to_string(),
            false => names.join(", "),
        };
        return Err(format!(
            "the matrix has no run of --workload {} with --impl {}: no implementation \
             listed runs any of those workloads",
            names(options.workloads.iter().map(|w| w.name()).collect()),
            names(options.impls.iter().map(|i| i.name()).collect()),
        ));
    }
    for cell in cells {
        let mut run = Options::new(cell.workload, cell.imp);
        run.size = cell.size;
        run.tls = cell.tls;
        run.count = cell.count;
        if let Err(why) = run.validate() {
            return Err(format!(
                "--scale {}: the {} row at {} B would run {} messages: {why}",
                options.scale,
                cell.label(),
                cell.size,
                cell.count
            ));
        }
    }
    Ok(())
}

/// The arguments of the child run of `cell`.
pub fn child_args(cell: &Cell, options: &MatrixOptions) -> Vec<String> {
    let mut args: Vec<String> = vec!["bench".into(), "--json".into()];
    let pairs = [
        ("--workload", cell.workload.name().to_string()),
        ("--impl", cell.imp.name().to_string()),
        ("--size", cell.size.to_string()),
        ("--batch", "64".to_string()),
        ("--count", cell.count.to_string()),
        ("--pin", if options.pin { "on" } else { "off" }.to_string()),
        ("--timeout", options.timeout.to_string()),
    ];
    for (flag, value) in pairs {
        args.push(flag.into());
        args.push(value);
    }
    if cell.tls {
        args.push("--tls".into());
    }
    args
}

/// Runs the matrix with `exe` (this program) as the child; `on_line` sees each child's
/// JSON line as it arrives.
pub fn run(exe: &Path, options: &MatrixOptions, mut on_line: impl FnMut(&str)) -> Result<Matrix> {
    if !(options.scale > 0.0 && options.scale <= MAX_SCALE) {
        return Err(Error::invalid_input(format!(
            "--scale must be a number above 0 and at most {MAX_SCALE}"
        )));
    }
    let mut cells = plan(options);
    check(options, &cells).map_err(Error::invalid_input)?;
    let rounds = options.repeat.max(1);
    let bar = if options.progress {
        indicatif::ProgressBar::new((cells.len() * rounds) as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:32} {pos}/{len} [{elapsed}] {msg}")
    {
        bar.set_style(style);
    }
    let start = Instant::now();
    for round in 0..rounds {
        for cell in cells.iter_mut() {
            bar.set_message(format!(
                "{} {} B {} (round {}/{rounds})",
                cell.label(),
                cell.size,
                cell.imp,
                round + 1
            ));
            let (line, value) = run_child(exe, cell, options);
            bar.suspend(|| on_line(&line));
            cell.runs.push(value);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(Matrix {
        cells,
        impls: columns(options),
        secs: start.elapsed().as_secs_f64(),
    })
}

/// Runs one child; its JSON line as printed and parsed (a made-up line with an `error`
/// when the child printed none).
fn run_child(exe: &Path, cell: &Cell, options: &MatrixOptions) -> (String, Value) {
    let mut command = Command::new(exe);
    command.args(child_args(cell, options)).stdin(Stdio::null());
    super::netns::ends_with_this_process(&mut command);
    let output = command.output();
    let failed = |message: String| {
        let value = serde_json::json!({
            "impl": cell.imp.name(),
            "workload": cell.workload.name(),
            "size": cell.size,
            "error": message,
        });
        (value.to_string(), value)
    };
    let output = match output {
        Ok(output) => output,
        Err(err) => return failed(format!("cannot run {}: {err}", exe.display())),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let parsed = stdout.lines().rev().find_map(|line| {
        let value = serde_json::from_str::<Value>(line).ok()?;
        Some((line.to_string(), value))
    });
    match parsed {
        Some((line, value)) if output.status.success() || value.get("error").is_some() => {
            (line, value)
        }
        _ => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr.lines().last().unwrap_or("no output").to_string();
            failed(format!("{} ({})", last, output.status))
        }
    }
}

impl Matrix {
    /// Cells that had a failed run.
    pub fn failures(&self) -> usize {
        self.cells.iter().filter(|c| c.failure().is_some()).count()
    }

    /// The cell of `row`'s workload, size and TLS, for `imp`.
    fn cell(&self, row: &Cell, imp: Impl) -> Option<&Cell> {
        self.cells.iter().find(|c| {
            c.workload == row.workload && c.size == row.size && c.tls == row.tls && c.imp == imp
        })
    }

    /// The table: one row per workload and size, a column per impl, then the speed-up of
    /// each ringsock impl over the std-per-write baseline measured in the same run.
    pub fn table(&self) -> String {
        let mut header = vec!["workload".to_string(), "size".to_string()];
        header.extend(self.impls.iter().map(|imp| imp.name().to_string()));
        let baseline = self.impls.contains(&Impl::StdPerWrite);
        let ours: Vec<Impl> = self
            .impls
            .iter()
            .copied()
            .filter(|imp| *imp != Impl::StdPerWrite)
            .collect();
        if baseline {
            header.extend(ours.iter().map(|imp| speedup_name(*imp)));
        }
        let mut rows = vec![header];
        let mut notes = Vec::new();
        let mut seen = Vec::new();
        for cell in &self.cells {
            let key = (cell.workload, cell.size, cell.tls);
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let mut row = vec![cell.label(), cell.size.to_string()];
            for &imp in &self.impls {
                let text = match self.cell(cell, imp) {
                    Some(c) => {
                        if let Some(failure) = c.failure() {
                            notes.push(format!("{} {} B {}: {failure}", c.label(), c.size, imp));
                        }
                        cell_text(c)
                    }
                    None => "-".into(),
                };
                row.push(text);
            }
            if baseline {
                let base = self.cell(cell, Impl::StdPerWrite);
                for &imp in &ours {
                    let ratio = match (self.cell(cell, imp), base) {
                        (Some(ours), Some(base)) => speedup(ours, base),
                        _ => None,
                    };
                    row.push(ratio.map_or("-".into(), |r| format!("{r:.2}x")));
                }
            }
            rows.push(row);
        }
        let mut out = render(&rows);
        out.push_str(
            "\ntcp-batch, udp-batch: messages/s sent (system calls per message).\nudp-recv: \
             datagrams/s received (CPU 0 us per datagram, lost).\necho-rtt: p50 / p99 \
             round trip in us; tcp-echo-conns: round trips/s (p99 us).\nudp-relay \
             (flows 1, 20000/s): delivered/s (relay CPU us per packet, loss, p99 one-way \
             us).\nSpeed-up over \
             std-per-write: rate ratio; for echo-rtt the p50 ratio (std p50 / ours).\n",
        );
        let runs = self.cells.first().map_or(0, |c| c.runs.len());
        if runs > 1 {
            out.push_str(&format!("Medians of {runs} rounds, impls alternating.\n"));
        }
        for note in notes {
            out.push_str(&format!("FAILED {note}\n"));
        }
        out.push_str(&format!(
            "{} cells, {} with failures, {:.1} s\n",
            self.cells.len(),
            self.failures(),
            self.secs
        ));
        out
    }
}

fn speedup_name(imp: Impl) -> String {
    match imp {
        Impl::RingsockUring => "uring/std".into(),
        Impl::RingsockEpoll => "epoll/std".into(),
        Impl::StdPerWrite => "std/std".into(),
    }
}

fn speedup(ours: &Cell, base: &Cell) -> Option<f64> {
    match ours.workload {
        Workload::TcpEchoRtt | Workload::UdpEchoRtt => {
            Some(base.median("p50_us")? / ours.median("p50_us")?)
        }
        _ => Some(ours.median("msgs_per_s")? / base.median("msgs_per_s")?),
    }
}

fn cell_text(cell: &Cell) -> String {
    let rate = fmt_rate(cell.median("msgs_per_s"));
    let calls = || {
        cell.median("syscalls_per_msg")
            .map_or("-".into(), |x| format!("{x:.3}"))
    };
    // Median share of the datagrams that did not arrive, when any did not.
    let lost = || {
        let lost = cell.median("lost")?;
        (lost > 0.0).then(|| format!("{:.1}%", 100.0 * lost / cell.count.max(1) as f64))
    };
    let text = match cell.workload {
        Workload::TcpBatch => format!("{rate} ({})", calls()),
        Workload::UdpBatch => match lost() {
            Some(lost) => format!("{rate} ({}, lost {lost})", calls()),
            None => format!("{rate} ({})", calls()),
        },
        Workload::UdpRecv => {
            let cpu = cell
                .median("cpu0_us_per_msg")
                .map_or("-".into(), |x| format!("{x:.2}"));
            format!("{rate} ({cpu}, lost {})", lost().unwrap_or("0".into()))
        }
        Workload::TcpEchoRtt | Workload::UdpEchoRtt => format!(
            "{} / {}",
            fmt_num(cell.median("p50_us")),
            fmt_num(cell.median("p99_us"))
        ),
        Workload::TcpEchoConns => format!("{rate} ({})", fmt_num(cell.median("p99_us"))),
        Workload::Tunnel => format!("{rate} ({} Gbit/s TCP)", fmt_num(cell.median("tcp_gbit_s"))),
        Workload::UdpRelay => {
            let cpu = cell
                .median("relay_cpu_us_per_pkt")
                .map_or("-".into(), |x| format!("{x:.2}"));
            let lost = cell.median("loss_pct").unwrap_or(0.0);
            format!(
                "{} ({cpu}, lost {lost:.1}%, p99 {})",
                fmt_rate(cell.median("pps_delivered")),
                fmt_num(cell.median("lat_p99_us"))
            )
        }
    };
    if cell.failure().is_some() {
        format!("{text} !")
    } else {
        text
    }
}

/// A rate with a k or M suffix ("-" when unknown).
pub(crate) fn fmt_rate(x: Option<f64>) -> String {
    match x {
        Some(x) if x >= 1e6 => format!("{:.2}M", x / 1e6),
        Some(x) if x >= 1e3 => format!("{:.1}k", x / 1e3),
        Some(x) => format!("{x:.0}"),
        None => "-".into(),
    }
}

fn fmt_num(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.1}"))
}

/// A table: a rule under the header row, the first column left-aligned, the rest
/// right-aligned.
pub(crate) fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (n, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_default_plan_covers_every_workload_size_and_impl() {
        let cells = plan(&MatrixOptions::default());
        assert_eq!(cells.len(), (3 + 1 + 4 + 2 + 1 + 1 + 1) * 3);
        assert_eq!(cells.iter().filter(|c| c.tls).count(), 3);
        let scaled = plan(&MatrixOptions {
            scale: 0.01,
            ..MatrixOptions::default()
        });
        assert!(scaled.iter().all(|c| c.count >= 1));
        assert!(scaled[0].count < cells[0].count);
    }

    #[test]
    fn the_table_shows_medians_and_speedups() {
        let mut cells = plan(&MatrixOptions {
            workloads: vec![Workload::TcpBatch],
            ..MatrixOptions::default()
        });
        for cell in cells.iter_mut() {
            let rate = match cell.imp {
                Impl::StdPerWrite => 100_000.0,
                _ => 2_000_000.0,
            };
            for k in [0.9, 1.0, 1.1] {
                cell.runs
                    .push(json!({"msgs_per_s": rate * k, "syscalls_per_msg": 0.0156}));
            }
        }
        let matrix = Matrix {
            cells,
            impls: Impl::ALL.to_vec(),
            secs: 1.0,
        };
        let table = matrix.table();
        assert!(table.contains("2.00M (0.016)"), "{table}");
        assert!(table.contains("20.00x"), "{table}");
        assert!(table.contains("Medians of 3 rounds"));
        assert_eq!(matrix.failures(), 0);
    }

    #[test]
    fn udp_relay_runs_only_when_asked_for_and_only_on_ringsock() {
        let all = plan(&MatrixOptions::default());
        assert!(all.iter().all(|c| c.workload != Workload::UdpRelay));
        let relay = plan(&MatrixOptions {
            workloads: vec![Workload::UdpRelay],
            ..MatrixOptions::default()
        });
        let impls: Vec<Impl> = relay.iter().map(|c| c.imp).collect();
        assert_eq!(impls, [Impl::RingsockUring, Impl::RingsockEpoll]);
        assert!(relay.iter().all(|c| c.size == 172 && c.count == 200_000));
    }

    #[test]
    fn a_scale_that_pushes_a_count_past_its_limit_is_refused_by_name() {
        let options = MatrixOptions {
            scale: MAX_SCALE,
            workloads: vec![Workload::TcpEchoConns],
            ..MatrixOptions::default()
        };
        let cells = plan(&options);
        let err = check(&options, &cells).expect_err("past the echo limit");
        let message = err;
        assert!(
            message.contains("tcp-echo-conns") && message.contains("at most"),
            "{message}"
        );
        assert!(check(&MatrixOptions::default(), &plan(&MatrixOptions::default())).is_ok());
        // Filters that leave nothing to run are an error, not an empty table.
        let nothing = MatrixOptions {
            workloads: vec![Workload::UdpRelay],
            impls: vec![Impl::StdPerWrite],
            ..MatrixOptions::default()
        };
        let err = check(&nothing, &plan(&nothing)).expect_err("an empty plan");
        assert!(err.contains("no run"), "{err}");
    }

    #[test]
    fn child_args_name_every_option() {
        let cell = &plan(&MatrixOptions::default())[0];
        let options = MatrixOptions {
            pin: false,
            timeout: 7,
            ..MatrixOptions::default()
        };
        let args = child_args(cell, &options).join(" ");
        assert!(args.starts_with("bench --json --workload tcp-batch --impl ringsock-uring"));
        assert!(args.ends_with("--pin off --timeout 7"));
    }
}
