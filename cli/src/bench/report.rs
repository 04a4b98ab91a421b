//! The result of one run and its JSON line (the format `docs/benchmarks.md` defines).

use ringsock::SocketErrorStatus;
use serde_json::{json, Value};

use super::cpu::{self, CpuSample};
use super::options::{Options, Pattern, Workload};

/// Why a run failed: a status, as every ringsock failure has, and what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct RunError {
    /// The status (`Unknown` for a failed check of the bench itself, such as order lost).
    pub status: SocketErrorStatus,
    /// One line: the `error` field of the JSON line.
    pub message: String,
    /// More about it (the `detail` field), e.g. which message broke the order.
    pub detail: Option<String>,
}

impl RunError {
    /// A failure with `status`.
    pub fn new(status: SocketErrorStatus, message: impl Into<String>) -> RunError {
        RunError {
            status,
            message: message.into(),
            detail: None,
        }
    }

    /// The same failure with `detail`.
    pub fn with_detail(mut self, detail: impl Into<String>) -> RunError {
        self.detail = Some(detail.into());
        self
    }

    /// A ringsock error, keeping its status.
    pub fn from_error(err: &ringsock::Error) -> RunError {
        RunError::new(err.status(), err.to_string())
    }

    /// The same failure with `what` in front of its message.
    pub fn context(mut self, what: impl std::fmt::Display) -> RunError {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)?;
        match &self.detail {
            Some(detail) => write!(f, ": {detail}"),
            None => Ok(()),
        }
    }
}

/// Round-trip percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

impl Latency {
    /// Percentiles of round-trip times given in nanoseconds (hdrhistogram, 3 significant
    /// digits). `None` when there are none.
    pub fn from_nanos(rtts_ns: &[u64]) -> Option<Latency> {
        if rtts_ns.is_empty() {
            return None;
        }
        let mut histogram =
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).ok()?;
        for &ns in rtts_ns {
            // Saturates at the top bound instead of failing.
            histogram.saturating_record(ns.max(1));
        }
        let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Some(Latency {
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
        })
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The run's options.
    pub options: Options,
    /// Measured time: tcp-batch first write to last byte received; echo: wall time of
    /// the measured round trips. `None` when the run failed.
    pub secs: Option<f64>,
    /// Messages (round trips) the peer really got, in order.
    pub delivered: u64,
    /// Round-trip percentiles (echo workloads).
    pub latency: Option<Latency>,
    /// System calls counted on the measured side during the measured phase.
    pub syscalls: Option<u64>,
    /// Messages the syscalls are divided by (M, or every echoed message for a server).
    pub syscall_msgs: u64,
    /// What went wrong, if anything; rates are then null.
    pub error: Option<RunError>,
    /// Diagnostic keys appended to the JSON line (CPU time, busy fractions).
    pub extra: Vec<(&'static str, Value)>,
}

impl Report {
    /// An empty report for `options`, to be filled in.
    pub fn new(options: &Options) -> Report {
        Report {
            options: options.clone(),
            secs: None,
            delivered: 0,
            latency: None,
            syscalls: None,
            syscall_msgs: options.count,
            error: None,
            extra: Vec::new(),
        }
    }

    /// A failed run: the options, what was delivered, and why.
    pub fn failed(options: &Options, delivered: u64, error: RunError) -> Report {
        let mut report = Report::new(options);
        report.delivered = delivered;
        report.error = Some(error);
        report
    }

    /// Messages (round trips) per second, `None` for a failed run.
    pub fn msgs_per_s(&self) -> Option<f64> {
        let secs = self.valid_secs()?;
        Some(self.rate_count() as f64 / secs)
    }

    /// Megabytes (10^6) per second in one direction, of the messages the rate counts.
    pub fn mb_per_s(&self) -> Option<f64> {
        let secs = self.valid_secs()?;
        Some(self.rate_count() as f64 * self.options.size as f64 / secs / 1e6)
    }

    /// Counted system calls per message.
    pub fn syscalls_per_msg(&self) -> Option<f64> {
        let calls = self.syscalls?;
        (self.syscall_msgs > 0).then(|| calls as f64 / self.syscall_msgs as f64)
    }

    fn valid_secs(&self) -> Option<f64> {
        self.secs.filter(|s| *s > 0.0 && self.error.is_none())
    }

    /// Batch workloads: M per second (for udp-batch the send rate: what arrived is
    /// `delivered`); udp-recv: datagrams received per second; echo workloads: completed
    /// round trips per second; tunnel: datagrams of the flood delivered per second.
    fn rate_count(&self) -> u64 {
        match self.options.workload {
            Workload::TcpBatch | Workload::UdpBatch => self.options.count,
            Workload::UdpRecv
            | Workload::TcpEchoRtt
            | Workload::UdpEchoRtt
            | Workload::TcpEchoConns
            | Workload::Tunnel
            | Workload::UdpRelay => self.delivered,
        }
    }

    /// Appends a diagnostic key.
    pub fn push(&mut self, key: &'static str, value: impl Into<Value>) {
        self.extra.push((key, value.into()));
    }

    /// Appends `key`: `secs` spread over `n` messages, in microseconds per message
    /// (null when `n` is 0).
    pub fn push_per_msg(&mut self, key: &'static str, secs: f64, n: u64) {
        let value = (n > 0).then(|| round(secs * 1e6 / n as f64, 4));
        self.push(key, value.map_or(Value::Null, |x| json!(x)));
    }

    /// Appends `cpu0_busy` and `cpu1_busy`: how busy the measured CPU and the peer's CPU
    /// were between two samples (which side set the pace; CPU 0 also runs softirq work
    /// not charged to any thread).
    pub fn push_busy(&mut self, before: &CpuSample, after: &CpuSample) {
        self.push_busy_fractions(
            before.busy_until(after, cpu::MEASURED_CPU),
            before.busy_until(after, cpu::peer_cpu()),
        );
    }

    /// Appends `cpu0_busy` and `cpu1_busy` measured elsewhere (null where unknown).
    pub fn push_busy_fractions(&mut self, cpu0: Option<f64>, cpu1: Option<f64>) {
        let busy = |x: Option<f64>| x.map_or(Value::Null, |x| json!(round(x, 3)));
        self.push("cpu0_busy", busy(cpu0));
        self.push("cpu1_busy", busy(cpu1));
    }

    /// The fields in the order `docs/benchmarks.md` lists them, then the non-default
    /// options and diagnostics.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        let o = &self.options;
        if o.workload == Workload::UdpRelay {
            return self.relay_fields();
        }
        let num = |x: Option<f64>, digits: i32| x.map_or(Value::Null, |x| json!(round(x, digits)));
        let lat = |f: fn(&Latency) -> f64| num(self.latency.as_ref().map(f), 2);
        let mut fields = vec![
            ("impl", json!(o.imp.name())),
            ("workload", json!(o.workload.name())),
            ("size", json!(o.size)),
            ("batch", json!(o.batch)),
            ("count", json!(o.count)),
            ("secs", num(self.valid_secs(), 6)),
            ("msgs_per_s", num(self.msgs_per_s(), 1)),
            ("mb_per_s", num(self.mb_per_s(), 2)),
            ("delivered", json!(self.delivered)),
            ("p50_us", lat(|l| l.p50_us)),
            ("p99_us", lat(|l| l.p99_us)),
            ("p999_us", lat(|l| l.p999_us)),
            ("syscalls_per_msg", num(self.syscalls_per_msg(), 5)),
        ];
        if o.workload == Workload::TcpEchoConns || o.conns != 1 {
            fields.push(("conns", json!(o.conns)));
        }
        if o.pattern != Pattern::Flush {
            fields.push(("pattern", json!(o.pattern.name())));
        }
        if o.tls {
            fields.push(("tls", json!("1.3")));
        }
        if !o.pin {
            fields.push(("pin", json!("off")));
        }
        if o.gapped {
            fields.push(("gapped", json!(true)));
        }
        if o.gro {
            fields.push(("gro", json!(true)));
        }
        if let Some(spin) = o.effective_spin() {
            fields.push(("spin", json!(spin.to_string())));
        }
        if o.workload == Workload::TcpBatch && o.effective_stride() != 1 {
            fields.push(("verify_stride", json!(o.effective_stride())));
        }
        self.push_tail(&mut fields);
        fields
    }

    /// udp-relay's own line: what was asked for, then the figures the run pushed (in
    /// the order `docs/benchmarks.md` lists them).
    fn relay_fields(&self) -> Vec<(&'static str, Value)> {
        let o = &self.options;
        let mut fields = vec![
            ("impl", json!(o.imp.name())),
            ("workload", json!(o.workload.name())),
            ("size", json!(o.size)),
            ("flows", json!(o.flows)),
            ("rate_target", super::udp_relay::rate_target(o.rate)),
            ("count", json!(o.count)),
        ];
        if !o.pin {
            fields.push(("pin", json!("off")));
        }
        if let Some(spin) = o.effective_spin() {
            fields.push(("spin", json!(spin.to_string())));
        }
        self.push_tail(&mut fields);
        fields
    }

    /// The diagnostics, then the error.
    fn push_tail(&self, fields: &mut Vec<(&'static str, Value)>) {
        fields.extend(self.extra.iter().cloned());
        if let Some(error) = &self.error {
            if let Some(detail) = &error.detail {
                fields.push(("detail", json!(detail)));
            }
            fields.push(("error", json!(error.message)));
        }
    }

    /// The one JSON line, fields in the documented order.
    pub fn to_json_line(&self) -> String {
        let body: Vec<String> = self
            .fields()
            .into_iter()
            .map(|(key, value)| format!("{}:{}", json!(key), value))
            .collect();
        format!("{{{}}}", body.join(","))
    }
}

/// `x` rounded to `digits` decimals.
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::options::Impl;

    #[test]
    fn json_line_has_every_field_in_order() {
        let options = Options::new(Workload::TcpBatch, Impl::RingsockUring);
        let mut report = Report::new(&options);
        report.secs = Some(0.5);
        report.delivered = options.count;
        report.syscalls = Some(options.count / 64);
        let line = report.to_json_line();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["impl"], "ringsock-uring");
        assert_eq!(v["msgs_per_s"].as_f64(), Some(options.count as f64 * 2.0));
        assert_eq!(v["syscalls_per_msg"].as_f64(), Some(0.01563));
        assert!(v["p50_us"].is_null());
        let keys = [
            "impl",
            "workload",
            "size",
            "batch",
            "count",
            "secs",
            "msgs_per_s",
            "mb_per_s",
            "delivered",
            "p50_us",
            "p99_us",
            "p999_us",
            "syscalls_per_msg",
        ];
        let mut at = 0;
        for key in keys {
            let found = line[at..].find(&format!("\"{key}\":")).unwrap();
            at += found;
        }
        assert!(!line.contains('\n'));
    }

    #[test]
    fn a_failed_run_has_null_rates_and_its_error() {
        let options = Options::new(Workload::TcpBatch, Impl::RingsockUring);
        let lost = RunError::new(SocketErrorStatus::Unknown, "order lost");
        let mut report = Report::failed(&options, 10, lost);
        report.secs = Some(1.0);
        let v: Value = serde_json::from_str(&report.to_json_line()).unwrap();
        assert!(v["msgs_per_s"].is_null());
        assert_eq!(v["delivered"], 10);
        assert_eq!(v["error"], "order lost");
    }

    #[test]
    fn percentiles_in_microseconds() {
        let rtts: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let lat = Latency::from_nanos(&rtts).unwrap();
        assert!((lat.p50_us - 500.0).abs() < 1.0);
        assert!((lat.p99_us - 990.0).abs() < 1.0);
        assert!(Latency::from_nanos(&[]).is_none());
    }
}
