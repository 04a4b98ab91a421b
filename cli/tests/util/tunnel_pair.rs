//! Two network namespaces joined by a veth pair, and `ringsock tunnel` children in them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

#[path = "../../../tests/util/netns.rs"]
pub mod netns;

use netns::Netns;

/// The veth addresses of side A and side B, and the tunnel's inner addresses.
pub const A_OUTER: &str = "192.168.71.1";
pub const B_OUTER: &str = "192.168.71.2";
pub const A_INNER: &str = "10.71.0.1";
pub const B_INNER: &str = "10.71.0.2";
pub const TUN: &str = "rstun0";

/// Two namespaces, `a` and `b`, with a veth pair between them (A_OUTER, B_OUTER).
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
    pub dir: PathBuf,
}

impl Pair {
    /// The namespaces, or why not (the test then skips, or fails under CI).
    pub fn create(tag: &str) -> Result<Pair, String> {
        let a = Netns::create(&format!("{tag}a"))?;
        let b = Netns::create(&format!("{tag}b"))?;
        let run = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        };
        run(&[
            "link",
            "add",
            "rsva",
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            "rsvb",
            "netns",
            b.name(),
        ])?;
        a.exec(&["ip", "addr", "add", &format!("{A_OUTER}/24"), "dev", "rsva"])?;
        b.exec(&["ip", "addr", "add", &format!("{B_OUTER}/24"), "dev", "rsvb"])?;
        a.exec(&["ip", "link", "set", "rsva", "up"])?;
        b.exec(&["ip", "link", "set", "rsvb", "up"])?;
        let dir = std::env::temp_dir().join(format!("ringsock-{}", a.name()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(Pair { a, b, dir })
    }

    /// Writes a key file of 64 hex characters made from `seed`.
    pub fn key(&self, name: &str, seed: u8) -> PathBuf {
        let path = self.dir.join(name);
        let hex: String = (0..32u8)
            .map(|i| format!("{:02x}", i.wrapping_mul(37) ^ seed))
            .collect();
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        path
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `ringsock tunnel`; killed if dropped without [`stop`](Self::stop).
pub struct TunnelProc {
    child: Option<Child>,
    lines: Lines<BufReader<ChildStdout>>,
    /// The UDP address it printed.
    pub udp: String,
}

impl TunnelProc {
    /// Starts `ringsock tunnel ARGS --backend BACKEND` in `ns`, waits for its ready line,
    /// and gives the TUN the inner address `inner`/24 (when given).
    pub fn start(ns: &Netns, backend: &str, args: &[&str], inner: Option<&str>) -> TunnelProc {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                env!("CARGO_BIN_EXE_ringsock"),
                "tunnel",
            ])
            .args(args)
            .args(["--backend", backend])
            .env_remove("RINGSOCK_BACKEND")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ringsock tunnel");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        let mut proc = TunnelProc {
            child: Some(child),
            lines,
            udp: String::new(),
        };
        let rest = line
            .strip_prefix("tunnel ")
            .unwrap_or_else(|| panic!("expected 'tunnel NAME udp ADDR', got {line:?}"));
        let (name, udp) = rest.split_once(" udp ").expect("NAME udp ADDR");
        assert_eq!(name, TUN);
        proc.udp = udp.to_owned();
        if let Some(inner) = inner {
            ns.exec(&["ip", "addr", "add", &format!("{inner}/24"), "dev", TUN])
                .expect("address the TUN");
        }
        proc
    }

    /// SIGTERM, then its exit status and the counters it printed.
    pub fn stop(mut self) -> HashMap<String, u64> {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
        let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let status = child.wait().unwrap();
        assert!(status.success(), "SIGTERM must exit 0: {status}");
        let line = self
            .lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.starts_with("tunnel stats "))
            .expect("a stats line");
        let json: serde_json::Value = serde_json::from_str(&line["tunnel stats ".len()..]).unwrap();
        json.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect()
    }
}

impl Drop for TunnelProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether `ping -c COUNT` from `ns` to `addr` (with extra args) got every reply.
pub fn ping(ns: &Netns, addr: &str, extra: &[&str]) -> bool {
    let mut args = vec!["ping", "-q", "-c", "2", "-i", "0.2", "-W", "2"];
    args.extend_from_slice(extra);
    args.push(addr);
    ns.exec(&args).is_ok()
}

/// Pings until one round gets every reply (the tunnel may still be handshaking), at
/// most `rounds` times.
pub fn ping_until(ns: &Netns, addr: &str, rounds: usize) -> bool {
    (0..rounds).any(|_| ping(ns, addr, &[]))
}

/// `Ip` counters of /proc/net/snmp in `ns`, by name.
pub fn ip_counters(ns: &Netns) -> HashMap<String, u64> {
    let text = ns
        .exec(&["cat", "/proc/net/snmp"])
        .expect("read /proc/net/snmp");
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let names: Vec<&str> = ip.next().unwrap().split_whitespace().skip(1).collect();
    let values: Vec<u64> = ip
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    names.into_iter().map(str::to_owned).zip(values).collect()
}
