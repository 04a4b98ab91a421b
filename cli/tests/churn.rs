//! Memory under connection churn: rounds of thousands of connect/close against
//! `ringsock echo-server` leave its resident memory flat once the first rounds have
//! sized its tables, on both drivers.

mod util;

use std::net::TcpStream;
use std::time::Instant;

use util::echo_server::EchoServer;
use util::MUST_HAPPEN;

const ROUNDS: usize = 5;
const CONNECTIONS: usize = 5_000;
/// How much the server's resident memory may grow from the end of the second round to
/// the end of the last. Resident memory follows the peak of connections served at once
/// (each has a 64 KiB read buffer, and the allocator keeps freed heap), which the
/// bounded accept backlog caps at about 128 x 64 KiB = 8 MiB; a leak of a kilobyte per
/// connection would pass this bound over the last rounds' 15,000 connections.
const SLACK_KB: u64 = 10 * 1024;

/// A value of `/proc/PID/status` in kB.
fn status_kb(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn connection_churn_leaves_memory_flat() {
    for backend in ["uring", "epoll"] {
        let server = EchoServer::start(&["--tcp", "127.0.0.1:0", "--backend", backend], &["tcp"]);
        let pid = server.pid();
        let addr = format!("127.0.0.1:{}", server.port());
        let baseline = open_fds(pid);
        let mut after = Vec::new();
        for _ in 0..ROUNDS {
            for _ in 0..CONNECTIONS {
                drop(TcpStream::connect(&addr).unwrap());
            }
            // Every connection served and closed: the descriptors are back to where they
            // started (a condition, waited for; never a sleep).
            let deadline = Instant::now() + MUST_HAPPEN;
            while open_fds(pid) > baseline {
                assert!(
                    Instant::now() < deadline,
                    "{backend}: {} descriptors open after the round, {baseline} before",
                    open_fds(pid)
                );
                std::thread::yield_now();
            }
            after.push(status_kb(pid, "VmRSS:"));
            eprintln!(
                "{backend}: resident memory after round {}: {} kB",
                after.len(),
                after[after.len() - 1]
            );
        }
        let growth = after[ROUNDS - 1].saturating_sub(after[1]);
        assert!(
            growth <= SLACK_KB,
            "{backend}: resident memory after each round (kB): {after:?}"
        );
        assert!(server.stop().success());
    }
}
