//! What one benchmark run measures: workload, implementation, sizes, counts, pinning.

use std::fmt;

use super::relay_traffic;

/// A workload of `docs/benchmarks.md`.
///
/// Adding one: a variant here (its name, default size, default counts and matrix sizes
/// below), a `run` function in a module of its family, and one arm in
/// [`super::run`]. The CLI, the JSON line, the matrix and the table pick it up from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Workload {
    /// One TCP connection; M messages of S bytes in groups of B, a flush per group, to a
    /// plain std receiver thread (through TLS 1.3 with `--tls`).
    TcpBatch,
    /// M datagrams of S bytes in groups of B, a flush per group, to a plain std receiver
    /// thread with a large receive buffer; the send rate and what arrived.
    UdpBatch,
    /// The receiving side alone: a plain std sender floods datagrams of S bytes with UDP
    /// GSO; the measured side receives them. Datagrams/s, lost, receiver CPU per datagram.
    UdpRecv,
    /// One TCP connection; 64-byte ping-pong against a plain blocking std echo thread.
    TcpEchoRtt,
    /// 172-byte datagram ping-pong against a plain blocking std echo thread.
    UdpEchoRtt,
    /// C connections doing 64-byte ping-pong against the measured side as echo server,
    /// driven by one plain std client thread.
    TcpEchoConns,
    /// Two network namespaces joined by veth, a tunnel in each (the impl's, or with
    /// std-per-write the one-system-call-per-packet baseline): a bulk TCP transfer,
    /// then a flood of M datagrams of S bytes, between plain std sockets. Needs root;
    /// not in the default matrix.
    Tunnel,
    /// The measured side is a relay (a VoIP media relay, a VPN forwarder): a plain
    /// generator sends F flows of S-byte datagrams at R packets/s (or as fast as it can)
    /// to one relay socket per flow; the relay forwards each from the socket it arrived
    /// on to a plain sink, which checks every datagram and times it. Delivered/s, loss,
    /// relay CPU per packet, one-way latency. Not in the default matrix.
    UdpRelay,
}

impl Workload {
    /// Every workload, in matrix order.
    pub const ALL: [Workload; 6] = [
        Workload::TcpBatch,
        Workload::UdpBatch,
        Workload::UdpRecv,
        Workload::TcpEchoRtt,
        Workload::UdpEchoRtt,
        Workload::TcpEchoConns,
    ];

    /// The name used on the command line and in the JSON line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::TcpBatch => "tcp-batch",
            Workload::UdpBatch => "udp-batch",
            Workload::UdpRecv => "udp-recv",
            Workload::TcpEchoRtt => "tcp-echo-rtt",
            Workload::UdpEchoRtt => "udp-echo-rtt",
            Workload::TcpEchoConns => "tcp-echo-conns",
            Workload::Tunnel => "tunnel",
            Workload::UdpRelay => "udp-relay",
        }
    }

    /// Whether the workload runs over UDP.
    pub fn is_udp(self) -> bool {
        matches!(
            self,
            Workload::UdpBatch
                | Workload::UdpRecv
                | Workload::UdpEchoRtt
                | Workload::Tunnel
                | Workload::UdpRelay
        )
    }

    /// Message size when `--size` is not given.
    pub fn default_size(self) -> usize {
        match self {
            Workload::TcpBatch => 1024,
            Workload::UdpBatch | Workload::UdpRecv | Workload::Tunnel | Workload::UdpRelay => {
                VOIP_SIZE
            }
            Workload::TcpEchoRtt | Workload::TcpEchoConns => ECHO_SIZE,
            Workload::UdpEchoRtt => UDP_ECHO_SIZE,
        }
    }

    /// The only size the workload accepts, if it is fixed.
    pub fn fixed_size(self) -> Option<usize> {
        match self {
            Workload::TcpBatch
            | Workload::UdpBatch
            | Workload::UdpRecv
            | Workload::Tunnel
            | Workload::UdpRelay => None,
            Workload::TcpEchoRtt | Workload::TcpEchoConns => Some(ECHO_SIZE),
            Workload::UdpEchoRtt => Some(UDP_ECHO_SIZE),
        }
    }

    /// The largest message: udp-relay's largest datagram, one UDP datagram over IPv4,
    /// else [`MAX_SIZE`].
    pub fn max_size(self) -> usize {
        if self == Workload::UdpRelay {
            relay_traffic::MAX_SIZE
        } else if self.is_udp() {
            MAX_DATAGRAM
        } else {
            MAX_SIZE
        }
    }

    /// Sizes of the default matrix.
    pub fn matrix_sizes(self) -> &'static [usize] {
        match self {
            Workload::TcpBatch => &[64, 1024, 16384],
            // 172 = RTP header + 20 ms of G.711; 1400 = a VPN tunnel packet.
            Workload::UdpBatch => &[64, 172, 1200, 1400],
            Workload::UdpRecv | Workload::Tunnel => &[172, 1200],
            Workload::UdpRelay => &[VOIP_SIZE],
            Workload::TcpEchoRtt | Workload::TcpEchoConns => &[ECHO_SIZE],
            Workload::UdpEchoRtt => &[UDP_ECHO_SIZE],
        }
    }

    /// The messages (batch workloads) or measured round trips (echo workloads) a run
    /// does when `--count` is not given: the suite's counts, so a run takes about 0.5-3 s
    /// on a 2-core machine.
    pub fn default_count(self, size: usize, imp: Impl, pattern: Pattern) -> u64 {
        let k = 1000;
        match self {
            Workload::TcpBatch => {
                let column = match size {
                    0..=255 => 0,
                    256..=4095 => 1,
                    _ => 2,
                };
                let slow = imp == Impl::StdPerWrite || pattern == Pattern::PerWrite;
                let row: [u64; 3] = if slow {
                    [400, 400, 150]
                } else {
                    [8000, 2000, 150]
                };
                row[column] * k
            }
            Workload::UdpBatch => {
                let slow = imp == Impl::StdPerWrite;
                if slow {
                    150 * k
                } else {
                    600 * k
                }
            }
            // The same for every receiver, so that `lost` compares.
            Workload::UdpRecv => 300 * k,
            Workload::Tunnel => 200 * k,
            // 10 s at the default rate; `Options::default_count` follows `--rate`.
            Workload::UdpRelay => Rate::default().default_count(),
            Workload::TcpEchoRtt | Workload::UdpEchoRtt => 50 * k,
            Workload::TcpEchoConns => 200 * k,
        }
    }

    /// Connections when `--conns` is not given.
    pub fn default_conns(self) -> usize {
        match self {
            Workload::TcpEchoConns => 64,
            _ => 1,
        }
    }

    /// Whether the measured side is the receiving / serving one (the peer sends).
    pub fn measures_server(self) -> bool {
        matches!(self, Workload::TcpEchoConns | Workload::UdpRecv)
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The size of every tcp-echo message.
pub const ECHO_SIZE: usize = 64;
/// The size of every udp-echo-rtt datagram (and the default UDP size): an RTP header and
/// 20 ms of G.711.
pub const UDP_ECHO_SIZE: usize = 172;
const VOIP_SIZE: usize = UDP_ECHO_SIZE;

/// udp-relay: the relay sockets' receive ring keeps this many bytes per datagram unless
/// told otherwise (an Ethernet MTU's worth, rounded up).
const DEFAULT_RELAY_RING: usize = 2048;
/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65507;
/// Most datagrams in one GSO send of the udp-recv flood (`--batch`): the kernel's limit
/// since Linux 6.2 (64 before).
pub const MAX_GSO_SEGMENTS: usize = 128;

/// The smallest message of `workload`: udp-relay's header and 4 pattern bytes, else the
/// 8-byte sequence header.
pub fn min_size(workload: Workload) -> usize {
    if workload == Workload::UdpRelay {
        relay_traffic::MIN_SIZE
    } else {
        8
    }
}

/// udp-relay: how fast the generator sends, in packets per second over all flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rate {
    /// A fixed rate: in 1 ms ticks, one `sendto` per packet.
    PerSecond(u64),
    /// As fast as the generator can: `sendmmsg` groups of 64.
    Max,
}

impl Rate {
    /// The default rate: 20,000 packets/s.
    pub const DEFAULT: Rate = Rate::PerSecond(20_000);

    /// Packets of a run when `--count` is not given: 10 s of traffic at a fixed rate,
    /// 2,000,000 at max.
    pub fn default_count(self) -> u64 {
        match self {
            Rate::PerSecond(rate) => rate.saturating_mul(10),
            Rate::Max => 2_000_000,
        }
    }
}

impl Default for Rate {
    fn default() -> Rate {
        Rate::DEFAULT
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::PerSecond(rate) => write!(f, "{rate}"),
            Rate::Max => f.write_str("max"),
        }
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        if text == "max" {
            return Ok(Rate::Max);
        }
        match text.parse::<u64>() {
            Ok(rate) if (1..=MAX_RATE).contains(&rate) => Ok(Rate::PerSecond(rate)),
            _ => Err(format!(
                "{text:?} is not a rate: packets per second (1..={MAX_RATE}) or max"
            )),
        }
    }
}

/// The highest fixed udp-relay rate, packets per second.
pub const MAX_RATE: u64 = 100_000_000;
/// Most udp-relay flows (one relay socket each).
pub const MAX_FLOWS: usize = 1024;

/// The implementation measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Impl {
    /// ringsock on its io_uring driver.
    RingsockUring,
    /// ringsock on its epoll driver.
    RingsockEpoll,
    /// The baseline: std::net, one blocking system call per message.
    StdPerWrite,
}

impl Impl {
    /// Every implementation, in table column order.
    pub const ALL: [Impl; 3] = [Impl::RingsockUring, Impl::RingsockEpoll, Impl::StdPerWrite];

    /// The name used on the command line and in the JSON line.
    pub fn name(self) -> &'static str {
        match self {
            Impl::RingsockUring => "ringsock-uring",
            Impl::RingsockEpoll => "ringsock-epoll",
            Impl::StdPerWrite => "std-per-write",
        }
    }

    /// The ringsock backend, for the ringsock impls.
    pub fn backend(self) -> Option<ringsock::Backend> {
        match self {
            Impl::RingsockUring => Some(ringsock::Backend::Uring),
            Impl::RingsockEpoll => Some(ringsock::Backend::Epoll),
            Impl::StdPerWrite => None,
        }
    }
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the ringsock udp-relay relay is written: both are what a program would write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum RelayLoop {
    /// One task per flow, each receiving from its own socket.
    Tasks,
    /// One loop over a `DatagramGroup` of every flow's socket: one call takes what the
    /// woken sockets hold; their sends are in flight while it receives again.
    Group,
    /// Each flow's socket forwards by itself (`forward_received`): one task per flow
    /// waits for the end marker, the only datagram the rule keeps.
    #[default]
    Forward,
}

impl RelayLoop {
    /// The name used on the command line and in the JSON line.
    pub fn name(self) -> &'static str {
        match self {
            RelayLoop::Group => "group",
            RelayLoop::Tasks => "tasks",
            RelayLoop::Forward => "forward",
        }
    }
}

/// How the ringsock tcp-batch sender waits for a group: the three send patterns of the
/// Windows.Networking.Sockets documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Pattern {
    /// B writes queued, then one `flush().await` (FlushAsync): the workload definition.
    #[default]
    Flush,
    /// B writes queued, then all B write handles awaited together, no flush
    /// (Task.WaitAll). The receiver checks every message's sequence number.
    WaitAll,
    /// Each write awaited alone before the next (one send per message).
    PerWrite,
}

impl Pattern {
    /// The name used on the command line and in the JSON line.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Flush => "flush",
            Pattern::WaitAll => "wait-all",
            Pattern::PerWrite => "per-write",
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Most messages per group: the OutputStream's default bound on pending writes.
pub const MAX_BATCH: usize = 4096;
/// Largest message.
pub const MAX_SIZE: usize = 1 << 20;
/// Largest group (`--size` × `--batch`): the sender holds a group, the receiver its
/// copy, and a wait-all a second group in flight; 64 MiB keeps a run within a small
/// machine's memory (the largest message in groups of 64).
pub const MAX_GROUP_BYTES: usize = 64 << 20;
/// Most connections of tcp-echo-conns.
pub const MAX_CONNS: usize = 1024;

/// Most serving threads of tcp-echo-conns.
pub const MAX_THREADS: usize = 64;

/// Most round trips of the echo workloads, which keep every round trip's time (8 bytes
/// each: 80 MB at most).
pub const MAX_ECHO_COUNT: u64 = 10_000_000;
/// Most datagrams of udp-relay, whose sink keeps a bit per sequence number (125 MB at
/// most); 10 s at the highest `--rate`.
pub const MAX_RELAY_COUNT: u64 = 1_000_000_000;

/// One benchmark run.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// What is measured.
    pub workload: Workload,
    /// Who is measured.
    pub imp: Impl,
    /// Message size in bytes (at least 8: the sequence header).
    pub size: usize,
    /// Messages per group.
    pub batch: usize,
    /// Messages (tcp-batch) or measured round trips (echo workloads; tcp-echo-conns: all
    /// connections together).
    pub count: u64,
    /// Connections (tcp-echo-conns).
    pub conns: usize,
    /// Measured side on CPU 0, plain std peer on CPU 1.
    pub pin: bool,
    /// tcp-batch, ringsock impls: how a group is awaited.
    pub pattern: Pattern,
    /// tcp-batch: the receiver checks the sequence header of every Nth message
    /// (1 = every message; wait-all always checks every message).
    pub verify_stride: u64,
    /// tcp-batch: through TLS 1.3 (rustls on both sides; the receiver a rustls server
    /// over its blocking std socket, with the bench's built-in test certificate).
    pub tls: bool,
    /// tcp-batch, udp-batch: a byte left between a group's messages in memory, so no
    /// two writes can share an iovec (the engine measured without joining them).
    pub gapped: bool,
    /// udp-recv, ringsock impls: UDP_GRO on the receiving socket, whose receive ring then
    /// takes the kernel's merged super-datagrams apart.
    pub gro: bool,
    /// ringsock impls: microseconds the runtime looks for completions before every
    /// sleep (`runtime::Builder::spin_before_park`; 0 = never spins); `None` keeps the
    /// runtime's default, the adaptive spin.
    pub spin_us: Option<u64>,
    /// tunnel, ringsock impls: the TUN's offloads (TSO/USO super-segments, GRO in user
    /// space); off, plain packets.
    pub offloads: bool,
    /// tcp-echo-conns and udp-recv, ringsock impls: serving threads, each a runtime with
    /// its own SO_REUSEPORT socket (1: one socket on the bench's thread).
    pub threads: usize,
    /// udp-relay: flows, one relay socket each.
    pub flows: usize,
    /// udp-relay: the generator's rate.
    pub rate: Rate,
    /// udp-relay: how the ringsock relay is written.
    pub relay: RelayLoop,
    /// udp-relay, ringsock relays: payload bytes the relay sockets' receive rings keep
    /// per datagram (`None`: [`Options::relay_ring_bytes`]'s default).
    pub relay_ring: Option<usize>,
}

impl Options {
    /// The defaults of `workload` and `imp`: default size, batch 64, default count,
    /// default connections, pinned, flush pattern, every message verified, no TLS.
    pub fn new(workload: Workload, imp: Impl) -> Options {
        let size = workload.default_size();
        Options {
            workload,
            imp,
            size,
            batch: 64,
            count: workload.default_count(size, imp, Pattern::Flush),
            conns: workload.default_conns(),
            pin: true,
            pattern: Pattern::Flush,
            verify_stride: 1,
            spin_us: None,
            tls: false,
            gapped: false,
            gro: false,
            offloads: true,
            threads: 1,
            flows: 1,
            rate: Rate::DEFAULT,
            relay: RelayLoop::default(),
            relay_ring: None,
        }
    }

    /// udp-relay: payload bytes each relay socket's receive ring keeps per datagram:
    /// as asked, else 2048 (an Ethernet MTU's worth, rounded up: a media relay's RTP
    /// packets fit the path MTU) or the datagram size if larger.
    pub fn relay_ring_bytes(&self) -> usize {
        self.relay_ring.unwrap_or(self.size.max(DEFAULT_RELAY_RING))
    }

    /// The count of these options when none is given: [`Workload::default_count`] of
    /// their size, impl and pattern (a quarter of it through TLS at 64 B and 1 KiB,
    /// where encryption on both sides makes the run slower).
    pub fn default_count(&self) -> u64 {
        if self.workload == Workload::UdpRelay {
            return self.rate.default_count();
        }
        let count = self
            .workload
            .default_count(self.size, self.imp, self.pattern);
        if self.tls && self.size < 4096 {
            (count / 4).max(1)
        } else {
            count
        }
    }

    /// The runtime a ringsock impl runs on: `backend`, with the spin asked for.
    pub fn runtime(&self, backend: ringsock::Backend) -> ringsock::Result<ringsock::Runtime> {
        self.runtime_builder(backend).build()
    }

    /// The `--threads` pool a ringsock impl serves on: one such runtime per thread,
    /// pinned to CPUs 0.. when the run is pinned.
    pub fn pool(&self, backend: ringsock::Backend) -> ringsock::Result<ringsock::runtime::Pool> {
        ringsock::runtime::Pool::builder()
            .threads(self.threads)
            .runtime(self.runtime_builder(backend))
            .pin_threads(self.pin)
            .build()
    }

    fn runtime_builder(&self, backend: ringsock::Backend) -> ringsock::runtime::Builder {
        let builder = ringsock::runtime::Builder::new().backend(backend);
        match self.spin_us {
            Some(us) => builder.spin_before_park(std::time::Duration::from_micros(us)),
            None => builder,
        }
    }

    /// The spin a ringsock impl's runtime runs with: `--spin-us`, else `RINGSOCK_SPIN`,
    /// else the runtime's default. None for the std baseline, which has no runtime.
    pub fn effective_spin(&self) -> Option<ringsock::runtime::Spin> {
        use ringsock::runtime::Spin;
        self.imp.backend()?;
        Some(match self.spin_us {
            Some(0) => Spin::Off,
            Some(us) => Spin::Fixed(std::time::Duration::from_micros(us)),
            None => Spin::from_env().ok().flatten().unwrap_or_default(),
        })
    }

    /// Checks the combination; the message says what is wrong (a usage error).
    pub fn validate(&self) -> Result<(), String> {
        let w = self.workload;
        if w == Workload::UdpRelay {
            if self.size < relay_traffic::MIN_SIZE {
                return Err(format!(
                    "udp-relay: --size must be at least {} (flow, sequence number, send \
                     time and 4 pattern bytes)",
                    relay_traffic::MIN_SIZE
                ));
            }
            if let Some(ring) = self.relay_ring.filter(|&ring| ring < self.size) {
                return Err(format!(
                    "udp-relay: --relay-ring {ring} is smaller than --size {}: the relay \
                     would cut every datagram",
                    self.size
                ));
            }
            if self.imp.backend().is_none() {
                return Err(format!(
                    "udp-relay measures the ringsock relays (ringsock-uring, ringsock-epoll), \
                     not {}",
                    self.imp
                ));
            }
        }
        if self.size < 8 {
            return Err("--size must be at least 8 (the sequence header)".into());
        }
        if self.size > w.max_size() {
            return Err(format!("--size must be at most {} for {w}", w.max_size()));
        }
        if let Some(fixed) = w.fixed_size() {
            if self.size != fixed {
                return Err(format!("{w} uses {fixed}-byte messages (--size {fixed})"));
            }
        }
        if !(1..=MAX_BATCH).contains(&self.batch) {
            return Err(format!("--batch must be 1..={MAX_BATCH}"));
        }
        if matches!(w, Workload::TcpBatch | Workload::UdpBatch)
            && self.size.saturating_mul(self.batch) > MAX_GROUP_BYTES
        {
            return Err(format!(
                "--size × --batch must be at most {} MiB (a group is held in memory), not {} × {}",
                MAX_GROUP_BYTES >> 20,
                self.size,
                self.batch
            ));
        }
        if w == Workload::UdpRecv && self.batch > MAX_GSO_SEGMENTS {
            return Err(format!(
                "udp-recv: --batch is the flood's datagrams per GSO send, 1..={MAX_GSO_SEGMENTS}"
            ));
        }
        if self.tls && w != Workload::TcpBatch {
            return Err(format!("--tls applies to tcp-batch only, not {w}"));
        }
        let ringsock = self.imp.backend().is_some();
        if self.gapped && (!matches!(w, Workload::TcpBatch | Workload::UdpBatch) || !ringsock) {
            return Err(format!(
                "--gapped applies to tcp-batch and udp-batch with a ringsock impl, not {w} with {}",
                self.imp
            ));
        }
        if self.gro && (w != Workload::UdpRecv || !ringsock) {
            return Err("--gro applies to udp-recv with a ringsock impl".into());
        }
        if !self.offloads && (w != Workload::Tunnel || !ringsock) {
            return Err("--no-offload applies to tunnel with a ringsock impl".into());
        }
        if self.threads == 0 || self.threads > MAX_THREADS {
            return Err(format!("--threads must be 1..={MAX_THREADS}"));
        }
        if self.threads > 1
            && (!matches!(
                w,
                Workload::TcpEchoConns | Workload::UdpRecv | Workload::Tunnel
            ) || !ringsock)
        {
            return Err(
                "--threads above 1 applies to tcp-echo-conns, udp-recv and tunnel with a ringsock impl"
                    .into(),
            );
        }
        if w == Workload::UdpRelay {
            if !(1..=MAX_FLOWS).contains(&self.flows) {
                return Err(format!("--flows must be 1..={MAX_FLOWS}"));
            }
            if let Rate::PerSecond(0) = self.rate {
                return Err("--rate must be at least 1 packet per second, or max".into());
            }
            // The generator's groups and the sink's checks are the workload's own.
            if self.batch != 64 || self.verify_stride != 1 {
                return Err(
                    "--batch and --verify-stride do not apply to udp-relay (its generator \
                     sends groups of 64 at max and its sink checks every datagram)"
                        .into(),
                );
            }
        } else if self.flows != 1
            || self.rate != Rate::DEFAULT
            || self.relay != RelayLoop::default()
            || self.relay_ring.is_some()
        {
            return Err(format!(
                "--flows, --rate, --relay and --relay-ring apply to udp-relay only, not {w}"
            ));
        }
        if self.count == 0 {
            return Err("--count must be at least 1".into());
        }
        let max_count = match w {
            Workload::TcpEchoRtt | Workload::UdpEchoRtt | Workload::TcpEchoConns => {
                Some(MAX_ECHO_COUNT)
            }
            Workload::UdpRelay => Some(MAX_RELAY_COUNT),
            _ => None,
        };
        if let Some(max) = max_count.filter(|max| self.count > *max) {
            return Err(format!("--count must be at most {max} for {w}"));
        }
        if self.verify_stride == 0 {
            return Err("--verify-stride must be at least 1".into());
        }
        let conns_ok = match w {
            Workload::TcpEchoConns => (1..=MAX_CONNS).contains(&self.conns),
            _ => self.conns == 1,
        };
        if !conns_ok {
            return Err(match w {
                Workload::TcpEchoConns => format!("--conns must be 1..={MAX_CONNS}"),
                _ => format!("--conns applies to tcp-echo-conns only, not {w}"),
            });
        }
        if self.pattern != Pattern::Flush {
            if w != Workload::TcpBatch {
                return Err(format!("--pattern applies to tcp-batch only, not {w}"));
            }
            if self.imp == Impl::StdPerWrite {
                return Err("--pattern applies to the ringsock impls only".into());
            }
        }
        Ok(())
    }

    /// The stride the tcp-batch receiver really uses: every message for wait-all, whose
    /// point is to catch reordering.
    pub fn effective_stride(&self) -> u64 {
        if self.pattern == Pattern::WaitAll {
            1
        } else {
            self.verify_stride.max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_for_every_workload_and_impl() {
        for w in Workload::ALL {
            for imp in Impl::ALL {
                assert_eq!(Options::new(w, imp).validate(), Ok(()), "{w} {imp}");
            }
        }
    }

    #[test]
    fn bad_combinations_are_usage_errors() {
        let mut o = Options::new(Workload::TcpEchoRtt, Impl::RingsockUring);
        o.size = 128;
        assert!(o.validate().unwrap_err().contains("64-byte"));
        let mut o = Options::new(Workload::TcpBatch, Impl::StdPerWrite);
        o.pattern = Pattern::WaitAll;
        assert!(o.validate().is_err());
        let mut o = Options::new(Workload::TcpBatch, Impl::RingsockUring);
        o.size = 4;
        assert!(o.validate().is_err());
        o.size = 64;
        o.conns = 2;
        assert!(o.validate().is_err());
        // A group past the memory cap, however each bound alone allows it.
        let mut o = Options::new(Workload::TcpBatch, Impl::RingsockEpoll);
        o.size = MAX_SIZE;
        o.batch = 64;
        assert_eq!(o.validate(), Ok(()));
        o.batch = 65;
        assert!(o.validate().unwrap_err().contains("MiB"));
    }

    #[test]
    fn udp_sizes_and_flags() {
        let mut o = Options::new(Workload::UdpBatch, Impl::RingsockUring);
        assert_eq!(o.size, 172);
        o.size = MAX_DATAGRAM;
        assert_eq!(o.validate(), Ok(()));
        o.size = MAX_DATAGRAM + 1;
        assert!(o.validate().unwrap_err().contains("65507"));
        o.size = 172;
        o.tls = true;
        assert!(o.validate().unwrap_err().contains("--tls"));
        let mut o = Options::new(Workload::UdpRecv, Impl::StdPerWrite);
        o.batch = MAX_GSO_SEGMENTS + 1;
        assert!(o.validate().is_err());
        let mut o = Options::new(Workload::UdpEchoRtt, Impl::RingsockEpoll);
        assert_eq!(o.size, UDP_ECHO_SIZE);
        o.size = 64;
        assert!(o.validate().is_err());
    }

    #[test]
    fn tls_runs_are_shorter_for_small_messages() {
        let mut o = Options::new(Workload::TcpBatch, Impl::RingsockUring);
        o.size = 64;
        let plain = o.default_count();
        o.tls = true;
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(o.default_count(), plain / 4);
        o.size = 16384;
        assert_eq!(o.default_count(), 150_000);
    }

    #[test]
    fn udp_relay_flows_rate_and_counts() {
        let mut o = Options::new(Workload::UdpRelay, Impl::RingsockUring);
        assert_eq!((o.size, o.flows, o.rate), (172, 1, Rate::PerSecond(20_000)));
        assert_eq!(o.validate(), Ok(()));
        assert_eq!(o.default_count(), 200_000);
        o.rate = Rate::Max;
        assert_eq!(o.default_count(), 2_000_000);
        o.flows = MAX_FLOWS;
        o.size = relay_traffic::MAX_SIZE;
        assert_eq!(o.validate(), Ok(()));
        o.flows = MAX_FLOWS + 1;
        assert!(o.validate().unwrap_err().contains("--flows"));
        o.flows = 0;
        assert!(o.validate().is_err());
        o.flows = 1;
        o.size = relay_traffic::MIN_SIZE - 1;
        assert!(o.validate().unwrap_err().contains("at least 24"));
        o.size = relay_traffic::MAX_SIZE + 1;
        assert!(o.validate().unwrap_err().contains("8192"));
        let o = Options::new(Workload::UdpRelay, Impl::StdPerWrite);
        assert!(o.validate().unwrap_err().contains("ringsock relays"));
        let mut o = Options::new(Workload::UdpBatch, Impl::RingsockUring);
        o.rate = Rate::Max;
        assert!(o.validate().unwrap_err().contains("udp-relay only"));
    }

    #[test]
    fn rates_parse_as_a_number_or_max() {
        assert_eq!("max".parse(), Ok(Rate::Max));
        assert_eq!("100000".parse(), Ok(Rate::PerSecond(100_000)));
        for bad in ["abc", "0", "-5", "", "1.5", "MAX"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        assert_eq!(Rate::Max.to_string(), "max");
    }

    #[test]
    fn wait_all_checks_every_message() {
        let mut o = Options::new(Workload::TcpBatch, Impl::RingsockUring);
        o.verify_stride = 1024;
        assert_eq!(o.effective_stride(), 1024);
        o.pattern = Pattern::WaitAll;
        assert_eq!(o.effective_stride(), 1);
    }
}
