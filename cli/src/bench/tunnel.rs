//! The tunnel workload: two network namespaces joined by a veth pair, a tunnel in each
//! (`ringsock tunnel`, or the one-system-call-per-packet baseline of
//! [`tunnel_baseline`](super::tunnel_baseline)), children of this binary; then a bulk
//! TCP transfer and a flood of UDP datagrams of S bytes (default 172) between plain std
//! sockets in the namespaces, through the tunnel. It reports Gbit/s, datagrams/s and the
//! tunnels' CPU per byte and per datagram (both tunnel processes together), and the
//! whole machine's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringsock::{Error, SocketErrorStatus};

use super::cpu::CpuSample;
use super::netns::{process_cpu_secs, Netns};
use super::options::{Impl, Options};
use super::report::{Report, RunError};

const A_OUTER: &str = "192.168.72.1";
const B_OUTER: &str = "192.168.72.2";
const A_INNER: &str = "10.72.0.1";
const B_INNER: &str = "10.72.0.2";
const PORT: u16 = 51820;
const TUN: &str = "rsbtun0";
/// Bytes of the TCP transfer.
pub const TCP_BYTES: u64 = 256 << 20;

/// The two namespaces, their tunnels, and what is cleaned up when dropped.
struct Setup {
    a: Netns,
    b: Netns,
    tunnels: Vec<Child>,
    key: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        for child in &mut self.tunnels {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.key);
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(what.to_owned(), e)
}

fn setup(options: &Options) -> ringsock::Result<Setup> {
    super::netns::remove_leftovers_of_dead_runs();
    let tag = format!("rsb{}", std::process::id());
    // The key is a fixed test key, but the file goes where other users write: made new,
    // under a name nobody can have prepared a link at.
    let hex: String = (0..32u8)
        .map(|i| format!("{:02x}", i.wrapping_mul(73) ^ 0x5c))
        .collect();
    let key = super::netns::write_private_key_file(&std::env::temp_dir(), &tag, &hex)
        .map_err(io_err("write the key file"))?;
    if let Err(err) =
        super::netns::clean_up_on_signal(vec![format!("{tag}a"), format!("{tag}b")], key.clone())
    {
        let _ = std::fs::remove_file(&key);
        return Err(io_err("watch for the signals that end the run")(err));
    }
    let namespaces = || -> ringsock::Result<(Netns, Netns)> {
        let a = Netns::create(&format!("{tag}a")).map_err(io_err("create a network namespace"))?;
        let b = Netns::create(&format!("{tag}b")).map_err(io_err("create a network namespace"))?;
        super::netns::run(
            "ip",
            &[
                "link",
                "add",
                "rsbva",
                "netns",
                a.name(),
                "type",
                "veth",
                "peer",
                "name",
                "rsbvb",
                "netns",
                b.name(),
            ],
        )
        .map_err(io_err("create the veth pair"))?;
        for (ns, dev, addr) in [(&a, "rsbva", A_OUTER), (&b, "rsbvb", B_OUTER)] {
            ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", dev])
                .and_then(|_| ns.exec(&["ip", "link", "set", dev, "up"]))
                .map_err(io_err("address the veth pair"))?;
        }
        Ok((a, b))
    };
    let (a, b) = match namespaces() {
        Ok(pair) => pair,
        Err(err) => {
            let _ = std::fs::remove_file(&key);
            return Err(err);
        }
    };
    let mut setup = Setup {
        a,
        b,
        tunnels: Vec::new(),
        key,
    };
    let exe = std::env::current_exe().map_err(io_err("find this program"))?;
    let exe = exe.to_string_lossy().into_owned();
    let key = setup.key.to_string_lossy().into_owned();
    let threads = options.threads.to_string();
    let a_listen = format!("{A_OUTER}:{PORT}");
    let b_listen = format!("{B_OUTER}:{PORT}");
    for (side, listen, peer, inner) in [
        (0, &a_listen, &b_listen, A_INNER),
        (1, &b_listen, &a_listen, B_INNER),
    ] {
        let ns = if side == 0 { &setup.a } else { &setup.b };
        let mut args: Vec<&str> = vec!["netns", "exec", ns.name(), &exe];
        match options.imp.backend() {
            Some(backend) => {
                args.extend(["tunnel", "--tun", TUN, "--listen", listen, "--key", &key]);
                args.extend([
                    "--backend",
                    if backend == ringsock::Backend::Uring {
                        "uring"
                    } else {
                        "epoll"
                    },
                ]);
                // Side A learns its peer; side B names it.
                if side == 1 {
                    args.extend(["--peer", peer]);
                }
                if !options.offloads {
                    args.push("--no-offload");
                }
                args.extend(["--threads", &threads]);
            }
            None => args.extend([
                "tunnel-baseline",
                "--tun",
                TUN,
                "--listen",
                listen,
                "--peer",
                peer,
                "--key",
                &key,
            ]),
        }
        let mut command = Command::new("ip");
        command
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        super::netns::ends_with_this_process(&mut command);
        let mut child = command.spawn().map_err(io_err("start a tunnel"))?;
        let stdout = child.stdout.take();
        setup.tunnels.push(child);
        let mut line = String::new();
        if let Some(stdout) = stdout {
            let _ = BufReader::new(stdout).read_line(&mut line);
        }
        if !line.starts_with("tunnel ") {
            return Err(Error::io(
                "start a tunnel",
                std::io::Error::other(format!("it said {line:?}")),
            ));
        }
        ns.exec(&["ip", "link", "set", TUN, "mtu", "1420", "up"])
            .and_then(|_| ns.exec(&["ip", "addr", "add", &format!("{inner}/24"), "dev", TUN]))
            .map_err(io_err("address the TUN"))?;
    }
    let up = (0..20).any(|_| {
        setup
            .b
            .exec(&["ping", "-q", "-c", "1", "-W", "1", A_INNER])
            .is_ok()
    });
    if !up {
        return Err(Error::io(
            "reach the far side",
            std::io::ErrorKind::TimedOut.into(),
        ));
    }
    Ok(setup)
}

/// CPU seconds of both tunnel processes.
fn tunnel_cpu(setup: &Setup) -> f64 {
    setup
        .tunnels
        .iter()
        .filter_map(|c| process_cpu_secs(c.id()))
        .sum()
}

/// Seconds both CPUs were busy between two samples.
fn machine_busy(before: &CpuSample, after: &CpuSample) -> f64 {
    (0..2)
        .filter_map(|cpu| before.busy_secs_until(after, cpu))
        .sum()
}

/// Runs `body` on a new thread inside `ns`.
fn in_ns<T: Send + 'static>(
    ns: &Netns,
    body: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<std::io::Result<T>> {
    let name = ns.name().to_owned();
    std::thread::spawn(move || {
        super::netns::enter(&name)?;
        body()
    })
}

/// The TCP transfer from B to A: bytes received and seconds.
fn tcp_transfer(setup: &Setup, bytes: u64) -> std::io::Result<(u64, f64)> {
    let (port_tx, port_rx) = mpsc::channel();
    let receiver = in_ns(&setup.a, move || {
        let listener = TcpListener::bind((A_INNER, 0))?;
        port_tx.send(listener.local_addr()?.port()).ok();
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match conn.read(&mut buf)? {
                0 => return Ok((got, Instant::now())),
                n => got += n as u64,
            }
        }
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| std::io::Error::other("the TCP receiver did not start"))?;
    let sender = in_ns(&setup.b, move || {
        let addr: SocketAddr = format!("{A_INNER}:{port}").parse().expect("an address");
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        conn.set_write_timeout(Some(Duration::from_secs(60)))?;
        let chunk = vec![0x5au8; 1 << 16];
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            conn.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(start)
    });
    let start = super::join_peer(sender, "TCP sender")?;
    let (got, end) = super::join_peer(receiver, "TCP receiver")?;
    Ok((got, end.duration_since(start).as_secs_f64()))
}

/// The UDP flood from B to A: datagrams sent, received, and seconds from the first
/// send to the last arrival.
fn udp_flood(setup: &Setup, count: u64, size: usize) -> std::io::Result<(u64, u64, f64)> {
    let (port_tx, port_rx) = mpsc::channel();
    let receiver = in_ns(&setup.a, move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        socket.set_recv_buffer_size(8 << 20)?;
        let addr: SocketAddr = format!("{A_INNER}:0").parse().expect("an address");
        socket.bind(&addr.into())?;
        let socket: UdpSocket = socket.into();
        port_tx.send(socket.local_addr()?.port()).ok();
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = vec![0u8; 2048];
        let mut got = 0u64;
        let mut last = Instant::now();
        while got < count {
            match socket.recv(&mut buf) {
                Ok(_) => {
                    got += 1;
                    last = Instant::now();
                    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(e),
            }
        }
        Ok((got, last))
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| std::io::Error::other("the UDP receiver did not start"))?;
    let sender = in_ns(&setup.b, move || {
        let socket = UdpSocket::bind((B_INNER, 0))?;
        socket.connect((A_INNER, port))?;
        let payload = vec![0xa5u8; size];
        let start = Instant::now();
        let mut sent = 0u64;
        for _ in 0..count {
            if socket.send(&payload).is_ok() {
                sent += 1;
            }
        }
        Ok((sent, start))
    });
    let (sent, start) = super::join_peer(sender, "UDP sender")?;
    let (got, last) = super::join_peer(receiver, "UDP receiver")?;
    Ok((
        sent,
        got,
        last.saturating_duration_since(start).as_secs_f64(),
    ))
}

/// One run: set up, TCP transfer, UDP flood, tear down.
pub(crate) fn run(options: &Options) -> ringsock::Result<Report> {
    let setup = setup(options)?;
    let mut report = Report::new(options);
    let failed = |e: std::io::Error, what: &str| {
        Report::failed(
            options,
            0,
            RunError::new(SocketErrorStatus::from_io(&e), format!("{what}: {e}")),
        )
    };

    let (cpu0, busy0) = (tunnel_cpu(&setup), CpuSample::now());
    let (bytes, secs) = match tcp_transfer(&setup, TCP_BYTES) {
        Ok(result) => result,
        Err(e) => return Ok(failed(e, "the TCP transfer")),
    };
    let (cpu1, busy1) = (tunnel_cpu(&setup), CpuSample::now());
    let (sent, got, flood_secs) = match udp_flood(&setup, options.count, options.size) {
        Ok(result) => result,
        Err(e) => return Ok(failed(e, "the UDP flood")),
    };
    let (cpu2, busy2) = (tunnel_cpu(&setup), CpuSample::now());
    drop(setup);

    // The JSON line's rate is the flood's: datagrams delivered per second.
    report.secs = Some(flood_secs);
    report.delivered = got;
    let per = |x: f64, n: u64| if n == 0 { None } else { Some(x / n as f64) };
    // No time measured (or less than before: a thread that ended took its time along)
    // is no figure, not a free tunnel.
    let cpu_per = |x: f64, n: u64| per(x, n).filter(|_| x > 0.0);
    report.push(
        "offloads",
        options.offloads && options.imp != Impl::StdPerWrite,
    );
    report.push("threads", options.threads);
    report.push("tcp_bytes", bytes);
    report.push("tcp_secs", secs);
    report.push("tcp_gbit_s", bytes as f64 * 8.0 / secs / 1e9);
    report.push(
        "tcp_tunnel_cpu_ns_per_byte",
        cpu_per((cpu1 - cpu0) * 1e9, bytes),
    );
    report.push(
        "tcp_machine_cpu_ns_per_byte",
        cpu_per(machine_busy(&busy0, &busy1) * 1e9, bytes),
    );
    report.push("udp_sent", sent);
    report.push("udp_delivered", got);
    report.push(
        "udp_pps",
        per(got as f64, 1).map(|g| g / flood_secs.max(1e-9)),
    );
    report.push(
        "udp_tunnel_cpu_us_per_packet",
        cpu_per((cpu2 - cpu1) * 1e6, got),
    );
    report.push(
        "udp_machine_cpu_us_per_packet",
        cpu_per(machine_busy(&busy1, &busy2) * 1e6, got),
    );
    if bytes != TCP_BYTES {
        report.error = Some(RunError::new(
            SocketErrorStatus::ConnectionClosed,
            format!("the TCP transfer delivered {bytes} of {TCP_BYTES} bytes"),
        ));
    }
    Ok(report)
}

/// The variants the table compares, in column order.
pub fn variants() -> [(&'static str, Impl, bool); 4] {
    [
        ("ringsock-uring", Impl::RingsockUring, true),
        ("ringsock-epoll", Impl::RingsockEpoll, true),
        ("ringsock-uring, offloads off", Impl::RingsockUring, false),
        ("per-packet baseline (std)", Impl::StdPerWrite, false),
    ]
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

fn extra(report: &Report, key: &str) -> Option<f64> {
    report
        .extra
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.as_f64())
}

/// Runs every variant `repeat` times, alternating (variant order rotates each round),
/// and returns the table of medians; `each` sees every run's report.
pub fn table(
    base: &Options,
    repeat: u64,
    each: &mut dyn FnMut(&Report),
) -> ringsock::Result<String> {
    let variants = variants();
    let mut runs: Vec<Vec<Report>> = vec![Vec::new(); variants.len()];
    for round in 0..repeat as usize {
        for i in 0..variants.len() {
            let v = (i + round) % variants.len();
            let (_, imp, offloads) = variants[v];
            let mut options = base.clone();
            options.imp = imp;
            options.offloads = offloads;
            let report = run(&options)?;
            each(&report);
            runs[v].push(report);
        }
    }
    let med = |v: usize, key: &str| median(runs[v].iter().filter_map(|r| extra(r, key)).collect());
    let baseline_tcp = med(variants.len() - 1, "tcp_gbit_s");
    let mut out = format!(
        "tunnel: {} MiB TCP transfer and {} datagrams of {} B, medians of {repeat} alternating runs\n",
        TCP_BYTES >> 20,
        base.count,
        base.size
    );
    out.push_str(&format!(
        "{:<30} {:>9} {:>8} {:>12} {:>12} {:>9} {:>10} {:>12}\n",
        "tunnel",
        "TCP Gb/s",
        "vs base",
        "tun ns/B",
        "all ns/B",
        "UDP kpps",
        "delivered",
        "tun us/pkt"
    ));
    let fmt = |x: Option<f64>, digits: usize| x.map_or("-".to_owned(), |x| format!("{x:.digits$}"));
    for (v, (name, _, _)) in variants.iter().enumerate() {
        let tcp = med(v, "tcp_gbit_s");
        let ratio = tcp.zip(baseline_tcp).map(|(t, b)| t / b);
        let delivered = median(
            runs[v]
                .iter()
                .filter_map(|r| {
                    Some(extra(r, "udp_delivered")? / extra(r, "udp_sent")?.max(1.0) * 100.0)
                })
                .collect(),
        );
        out.push_str(&format!(
            "{:<30} {:>9} {:>8} {:>12} {:>12} {:>9} {:>9}% {:>12}\n",
            name,
            fmt(tcp, 2),
            fmt(ratio, 2),
            fmt(med(v, "tcp_tunnel_cpu_ns_per_byte"), 2),
            fmt(med(v, "tcp_machine_cpu_ns_per_byte"), 2),
            fmt(med(v, "udp_pps").map(|p| p / 1e3), 0),
            fmt(delivered, 1),
            fmt(med(v, "udp_tunnel_cpu_us_per_packet"), 2),
        ));
    }
    Ok(out)
}
