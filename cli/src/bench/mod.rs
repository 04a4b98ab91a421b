//! The benchmark workloads of `ringsock bench`, exactly as `docs/benchmarks.md` in the
//! repository defines them, every implementation measured against the same plain std
//! peers.
//!
//! - [`options`]: what a run measures ([`Workload`], [`Impl`], [`Pattern`], [`Options`]).
//! - [`report`]: what it measured ([`Report`]) and its one JSON line.
//! - [`cpu`]: pinning (measured side on CPU 0, peer on CPU 1) and CPU accounting.
//! - [`peer`]: the plain std TCP receiver, echo server and client threads;
//!   [`udp_peer`]: the plain std UDP receiver, GSO flood sender and echo thread.
//! - `tcp_batch`, `tcp_echo`, `udp`, `udp_echo`: the workloads, by family; `group`: the batch
//!   senders' message buffers; [`tls`]: tcp-batch `--tls` (the built-in test certificate).
//! - [`tunnel`]: two namespaces, a tunnel in each, TCP and UDP through them; its
//!   one-system-call-per-packet baseline is [`tunnel_baseline`]; [`netns`] makes the
//!   namespaces.
//! - `udp_relay`: udp-relay, the ringsock relay between the plain generator and sink of
//!   [`relay_peers`], with the datagram and its check in [`relay_traffic`].
//! - [`compare`]: the demo's batched-vs-per-write comparison.
//! - [`matrix`]: the default matrix, each row in a child process, and its table.
//!
//! ```no_run
//! use ringsock_cli::bench::{self, Impl, Options, Workload};
//!
//! let mut options = Options::new(Workload::TcpBatch, Impl::RingsockUring);
//! options.size = 64;
//! options.count = 100_000;
//! let report = bench::run(&options)?;
//! println!("{}", report.to_json_line());
//! # Ok::<_, ringsock::Error>(())
//! ```
//!
//! # Adding a workload
//!
//! 1. A variant of [`Workload`] with its name, default size, counts and matrix sizes.
//! 2. A function `pub(crate) fn run_x(&Options) -> Result<Report>` in the module of its
//!    family; the plain peers it needs go to [`peer`] (TCP) or [`udp_peer`] (UDP).
//! 3. One arm in [`run`]. The CLI, the JSON line, the matrix and its table follow.

use std::thread::JoinHandle;

pub mod compare;
pub mod cpu;
mod group;
pub mod matrix;
pub mod netns;
pub mod options;
pub mod peer;
pub mod relay_peers;
pub mod relay_traffic;
pub mod report;
mod tcp_batch;
mod tcp_echo;
pub mod tls;
pub mod tunnel;
pub mod tunnel_baseline;
mod udp;
mod udp_echo;
pub mod udp_peer;
mod udp_relay;
mod udp_sharded;

pub use options::{Impl, Options, Pattern, Rate, RelayLoop, Workload};
pub use report::{Latency, Report, RunError};

/// Runs one measurement on this thread (pinned to CPU 0 when `options.pin`), its peers on
/// threads of their own.
///
/// A failed check (order lost, a short stream, a wrong echo) is not an `Err`: it comes
/// back as a [`Report`] whose `error` is set, with what was delivered. `Err` means the
/// run could not be set up (bad options, a runtime that cannot start).
pub fn run(options: &Options) -> ringsock::Result<Report> {
    options.validate().map_err(ringsock::Error::invalid_input)?;
    if options.pin {
        cpu::pin_to(cpu::MEASURED_CPU)
            .map_err(|e| ringsock::Error::io("pin the measured thread to CPU 0", e))?;
    }
    match options.workload {
        Workload::TcpBatch => tcp_batch::run(options),
        Workload::UdpBatch => udp::run_batch(options),
        Workload::UdpRecv => udp::run_recv(options),
        Workload::TcpEchoRtt => tcp_echo::run_rtt(options),
        Workload::UdpEchoRtt => udp_echo::run_echo_rtt(options),
        Workload::TcpEchoConns => tcp_echo::run_conns(options),
        Workload::Tunnel => tunnel::run(options),
        Workload::UdpRelay => udp_relay::run(options),
    }
}

/// Joins a peer thread: its result, or an error saying it panicked.
pub(crate) fn join_peer<T>(
    handle: JoinHandle<std::io::Result<T>>,
    what: &str,
) -> std::io::Result<T> {
    handle
        .join()
        .map_err(|_| peer::bench_error(format!("the {what} thread panicked")))?
}
