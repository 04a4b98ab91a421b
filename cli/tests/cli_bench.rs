//! `ringsock bench --json`: every workload and impl, tiny counts, through the built
//! binary. Checks the JSON line and what was delivered; never a timing.

use std::process::{Command, Output};

use serde_json::Value;

fn ringsock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(args)
        .output()
        .expect("run the ringsock binary")
}

/// Where io_uring cannot start, a ringsock-uring run says so; skip it then, loudly,
/// unless RINGSOCK_REQUIRE_URING is set.
fn uring_unavailable(imp: &str, output: &Output) -> bool {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let skip = imp == "ringsock-uring"
        && !output.status.success()
        && stderr.contains("io_uring was forced")
        && std::env::var_os("RINGSOCK_REQUIRE_URING").is_none();
    if skip {
        eprintln!("skipped on io_uring: {}", stderr.trim());
    }
    skip
}

/// Runs one `bench --json`; its JSON line, after checking it is the only line and
/// carries every documented field. `None` when skipped.
fn bench_json(args: &[&str]) -> Option<(Output, Value)> {
    let mut all = vec!["bench", "--json", "--pin", "off"];
    all.extend_from_slice(args);
    let output = ringsock(&all);
    let imp = args
        .windows(2)
        .find(|w| w[0] == "--impl")
        .map_or("ringsock-uring", |w| w[1]);
    if uring_unavailable(imp, &output) {
        return None;
    }
    let stdout = String::from_utf8(output.stdout.clone()).expect("UTF-8 output");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line, got {stdout:?}");
    let value: Value = serde_json::from_str(lines[0]).expect("a JSON line");
    for field in [
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
    ] {
        assert!(
            value.get(field).is_some(),
            "{field} missing in {}",
            lines[0]
        );
    }
    Some((output, value))
}

/// A run that must succeed: exit 0, no error, everything delivered.
fn check_ok(args: &[&str], count: u64) -> Option<Value> {
    let (output, value) = bench_json(args)?;
    assert!(
        output.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        value
    );
    assert!(value.get("error").is_none(), "{value}");
    assert_eq!(value["count"].as_u64(), Some(count), "{value}");
    assert_eq!(value["delivered"].as_u64(), Some(count), "{value}");
    assert!(
        value["msgs_per_s"].as_f64().is_some_and(|x| x > 0.0),
        "{value}"
    );
    assert!(value["syscalls_per_msg"].as_f64().is_some(), "{value}");
    Some(value)
}

const IMPLS: [&str; 3] = ["ringsock-uring", "ringsock-epoll", "std-per-write"];

#[test]
fn tcp_batch_every_impl_and_size() {
    for imp in IMPLS {
        for size in ["64", "1024", "16384"] {
            let args = [
                "--workload",
                "tcp-batch",
                "--impl",
                imp,
                "--size",
                size,
                "--count",
                "3001",
            ];
            if let Some(v) = check_ok(&args, 3001) {
                assert_eq!(v["impl"], imp);
                assert_eq!(v["workload"], "tcp-batch");
                assert!(v["p50_us"].is_null());
                assert_eq!(v["size"].as_u64(), size.parse().ok());
                assert_eq!(v["pin"], "off");
            }
        }
    }
}

#[test]
fn tcp_batch_patterns_keep_order() {
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        for pattern in ["flush", "wait-all", "per-write"] {
            for size in ["64", "16384"] {
                let args = [
                    "--workload",
                    "tcp-batch",
                    "--impl",
                    imp,
                    "--pattern",
                    pattern,
                    "--size",
                    size,
                    "--count",
                    "2000",
                ];
                if let Some(v) = check_ok(&args, 2000) {
                    let expected = (pattern != "flush").then_some(pattern);
                    assert_eq!(v["pattern"].as_str(), expected, "{v}");
                }
            }
        }
    }
}

#[test]
fn gapped_messages_arrive_whole_and_in_order() {
    // A byte between messages in memory: no two writes share an iovec.
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        for size in ["64", "1024"] {
            let args = [
                "--workload",
                "tcp-batch",
                "--impl",
                imp,
                "--size",
                size,
                "--count",
                "3001",
                "--gapped",
            ];
            if let Some(v) = check_ok(&args, 3001) {
                assert_eq!(v["gapped"], true, "{v}");
            }
        }
        let args = [
            "--workload",
            "udp-batch",
            "--impl",
            imp,
            "--size",
            "172",
            "--count",
            "2000",
            "--gapped",
        ];
        if let Some(v) = check_udp(&args, 2000) {
            assert_eq!(v["gapped"], true, "{v}");
        }
    }
}

#[test]
fn tcp_batch_batched_sends_cost_one_enter_per_group_on_uring() {
    let args = [
        "--workload",
        "tcp-batch",
        "--impl",
        "ringsock-uring",
        "--size",
        "64",
        "--count",
        "6400",
    ];
    if let Some(v) = check_ok(&args, 6400) {
        // Counted, not timed: a group of 64 must not cost more than 2 system calls.
        let calls = v["syscalls_per_msg"].as_f64().unwrap();
        assert!(calls <= 2.0 / 64.0 + 1e-9, "{v}");
    }
}

#[test]
fn tcp_echo_rtt_every_impl() {
    for imp in IMPLS {
        let args = [
            "--workload",
            "tcp-echo-rtt",
            "--impl",
            imp,
            "--count",
            "300",
        ];
        if let Some(v) = check_ok(&args, 300) {
            for p in ["p50_us", "p99_us", "p999_us"] {
                assert!(v[p].as_f64().is_some_and(|x| x > 0.0), "{v}");
            }
        }
    }
}

#[test]
fn tcp_echo_conns_every_impl() {
    for imp in IMPLS {
        let args = [
            "--workload",
            "tcp-echo-conns",
            "--impl",
            imp,
            "--conns",
            "8",
            "--count",
            "800",
        ];
        if let Some(v) = check_ok(&args, 800) {
            assert_eq!(v["conns"].as_u64(), Some(8), "{v}");
            assert!(v["p99_us"].as_f64().is_some(), "{v}");
        }
    }
}

#[test]
fn tcp_echo_conns_on_two_threads_serves_every_connection() {
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        let args = [
            "--workload",
            "tcp-echo-conns",
            "--impl",
            imp,
            "--threads",
            "2",
            "--conns",
            "16",
            "--count",
            "1600",
        ];
        if let Some(v) = check_ok(&args, 1600) {
            assert_eq!(v["threads"].as_u64(), Some(2), "{v}");
            let spread = v["conns_per_thread"].as_array().expect("conns_per_thread");
            assert_eq!(spread.len(), 2, "{v}");
            let total: u64 = spread.iter().filter_map(|n| n.as_u64()).sum();
            assert_eq!(total, 16, "{v}");
        }
    }
}

#[test]
fn tcp_batch_through_tls_every_impl() {
    for imp in IMPLS {
        for size in ["64", "16384"] {
            let args = [
                "--workload",
                "tcp-batch",
                "--impl",
                imp,
                "--tls",
                "--size",
                size,
                "--count",
                "3001",
            ];
            if let Some(v) = check_ok(&args, 3001) {
                assert_eq!(v["tls"], "1.3", "{v}");
            }
        }
    }
}

/// A receive buffer this large holds every datagram of these tiny runs: none can be
/// lost (the kernel caps SO_RCVBUF at net.core.rmem_max; where that is small, loss is
/// possible and only its accounting is checked).
const NO_LOSS_RCVBUF: u64 = 16 << 20;

/// A UDP run: exit 0, no error, `delivered + lost == count`, and everything delivered
/// where no loss is possible.
fn check_udp(args: &[&str], count: u64) -> Option<Value> {
    let (output, value) = bench_json(args)?;
    assert!(
        output.status.success(),
        "{args:?} failed: {}\n{value}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(value.get("error").is_none(), "{value}");
    assert_eq!(value["count"].as_u64(), Some(count), "{value}");
    let delivered = value["delivered"].as_u64().unwrap();
    assert_eq!(
        delivered + value["lost"].as_u64().unwrap(),
        count,
        "{value}"
    );
    if value["rcvbuf"]
        .as_u64()
        .is_some_and(|b| b >= NO_LOSS_RCVBUF)
    {
        assert_eq!(delivered, count, "{value}");
    }
    assert!(value["syscalls_per_msg"].as_f64().is_some(), "{value}");
    for field in ["cpu0_busy", "cpu1_busy", "cpu_us_per_msg"] {
        assert!(value.get(field).is_some(), "{field} missing in {value}");
    }
    Some(value)
}

#[test]
fn udp_batch_every_impl() {
    for imp in IMPLS {
        for size in ["64", "1400"] {
            let args = [
                "--workload",
                "udp-batch",
                "--impl",
                imp,
                "--size",
                size,
                "--count",
                "2000",
            ];
            if let Some(v) = check_udp(&args, 2000) {
                assert_eq!(v["workload"], "udp-batch");
                assert!(v["msgs_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
                assert!(v["p50_us"].is_null(), "{v}");
                assert!(v.get("rx_kernel_drops").is_some(), "{v}");
            }
        }
    }
}

#[test]
fn udp_batch_sends_a_group_in_one_enter_on_uring() {
    let args = [
        "--workload",
        "udp-batch",
        "--impl",
        "ringsock-uring",
        "--size",
        "172",
        "--count",
        "6400",
    ];
    if let Some(v) = check_udp(&args, 6400) {
        // Counted, not timed: a group of 64 datagrams must not cost more than 2 calls.
        let calls = v["syscalls_per_msg"].as_f64().unwrap();
        assert!(calls <= 2.0 / 64.0 + 1e-9, "{v}");
    }
}

#[test]
fn udp_recv_every_impl() {
    for imp in IMPLS {
        for size in ["172", "1200"] {
            let args = [
                "--workload",
                "udp-recv",
                "--impl",
                imp,
                "--size",
                size,
                "--count",
                "3000",
            ];
            if let Some(v) = check_udp(&args, 3000) {
                assert_eq!(v["workload"], "udp-recv");
                for field in [
                    "sender_msgs_per_s",
                    "cpu0_us_per_msg",
                    "kernel_drops",
                    "rcvbuf",
                ] {
                    assert!(v.get(field).is_some(), "{field} missing in {v}");
                }
                if imp != "std-per-write" {
                    assert!(v["deliveries"].as_u64().is_some(), "{v}");
                }
            }
        }
    }
}

#[test]
fn udp_recv_on_two_threads_counts_each_threads_share() {
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        let args = [
            "--workload",
            "udp-recv",
            "--impl",
            imp,
            "--threads",
            "2",
            "--count",
            "3000",
        ];
        if let Some(v) = check_udp(&args, 3000) {
            assert_eq!(v["threads"].as_u64(), Some(2), "{v}");
            assert_eq!(v["flows"].as_u64(), Some(16), "{v}");
            let spread = v["datagrams_per_thread"].as_array().expect("per thread");
            assert_eq!(spread.len(), 2, "{v}");
            let total: u64 = spread.iter().filter_map(|n| n.as_u64()).sum();
            assert_eq!(Some(total), v["delivered"].as_u64(), "{v}");
        }
    }
}

#[test]
fn udp_recv_with_gro_takes_super_datagrams_apart() {
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        let args = [
            "--workload",
            "udp-recv",
            "--impl",
            imp,
            "--size",
            "1200",
            "--count",
            "3000",
            "--gro",
        ];
        if let Some(v) = check_udp(&args, 3000) {
            assert_eq!(v["gro"], true, "{v}");
            // Every datagram was checked whole; they came in fewer receives than datagrams.
            let deliveries = v["deliveries"].as_u64().unwrap();
            assert!(deliveries < 3000, "{v}");
            assert!(v["gro_splits"].as_u64().is_some_and(|n| n > 0), "{v}");
        }
    }
}

#[test]
fn the_spin_that_ran_is_reported() {
    let cases = [
        (None, None, "adaptive-30us"),
        (None, Some("0"), "off"),
        (Some("25"), None, "25us"),
        (Some("25"), Some("7"), "7us"),
    ];
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        for (variable, flag, expected) in cases {
            let mut command = Command::new(env!("CARGO_BIN_EXE_ringsock"));
            command.args([
                "bench",
                "--json",
                "--pin",
                "off",
                "--workload",
                "tcp-echo-rtt",
            ]);
            command.args(["--impl", imp, "--count", "200"]);
            if let Some(us) = flag {
                command.args(["--spin-us", us]);
            }
            match variable {
                Some(value) => command.env("RINGSOCK_SPIN", value),
                None => command.env_remove("RINGSOCK_SPIN"),
            };
            let output = command.output().expect("run the ringsock binary");
            if uring_unavailable(imp, &output) {
                return;
            }
            assert!(output.status.success(), "{imp} {variable:?} {flag:?}");
            let value: Value = serde_json::from_slice(&output.stdout).expect("a JSON line");
            assert_eq!(value["spin"], expected, "{imp} {variable:?} {flag:?}");
        }
    }
}

#[test]
fn udp_echo_rtt_every_impl() {
    for imp in IMPLS {
        let args = [
            "--workload",
            "udp-echo-rtt",
            "--impl",
            imp,
            "--count",
            "300",
        ];
        if let Some(v) = check_ok(&args, 300) {
            assert_eq!(v["size"].as_u64(), Some(172), "{v}");
            for p in ["p50_us", "p99_us", "p999_us"] {
                assert!(v[p].as_f64().is_some_and(|x| x > 0.0), "{v}");
            }
        }
    }
}

#[test]
fn order_lost_is_reported_with_what_came_in_order() {
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        for pattern in ["flush", "wait-all"] {
            let args = [
                "bench",
                "--json",
                "--pin",
                "off",
                "--impl",
                imp,
                "--pattern",
                pattern,
                "--size",
                "64",
                "--count",
                "640",
            ];
            let output = Command::new(env!("CARGO_BIN_EXE_ringsock"))
                .args(args)
                .env("RINGSOCK_BENCH_FAULT", "swap")
                .output()
                .expect("run the ringsock binary");
            if uring_unavailable(imp, &output) {
                continue;
            }
            assert_eq!(output.status.code(), Some(1), "{args:?}");
            let stdout = String::from_utf8_lossy(&output.stdout);
            let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
            assert_eq!(v["error"], "order lost", "{v}");
            assert_eq!(v["fault"], "swap", "{v}");
            assert_eq!(
                v["delivered"].as_u64(),
                Some(1),
                "only message 0 came in order: {v}"
            );
            assert!(v["msgs_per_s"].is_null(), "{v}");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(stderr.starts_with("error: Unknown: order lost"), "{stderr}");
        }
    }
}

#[test]
fn bad_flags_are_usage_errors() {
    let cases: [&[&str]; 19] = [
        &[
            "bench",
            "--json",
            "--workload",
            "udp-batch",
            "--threads",
            "2",
        ],
        &["bench", "--json", "--workload", "nope"],
        &[
            "bench",
            "--json",
            "--workload",
            "udp-recv",
            "--impl",
            "std-per-write",
            "--gro",
        ],
        &["bench", "--json", "--workload", "tcp-echo-rtt", "--gapped"],
        &["bench", "--json", "--impl", "std-per-write", "--gapped"],
        &["bench", "--json", "--workload", "udp-batch", "--tls"],
        &[
            "bench",
            "--json",
            "--workload",
            "udp-echo-rtt",
            "--size",
            "64",
        ],
        &[
            "bench",
            "--json",
            "--workload",
            "udp-batch",
            "--size",
            "65508",
        ],
        &[
            "bench",
            "--json",
            "--workload",
            "udp-recv",
            "--batch",
            "129",
        ],
        &["bench", "--json", "--workload", "udp-recv", "--conns", "2"],
        &["bench", "--tls"],
        &["bench", "--json", "--impl", "tokio"],
        &["bench", "--json", "--size", "4"],
        &[
            "bench",
            "--json",
            "--workload",
            "tcp-echo-rtt",
            "--size",
            "128",
        ],
        &[
            "bench",
            "--json",
            "--impl",
            "std-per-write",
            "--pattern",
            "wait-all",
        ],
        &["bench", "--json", "--workload", "tcp-batch", "--conns", "4"],
        &[
            "bench",
            "--json",
            "--workload",
            "tcp-batch",
            "--threads",
            "2",
        ],
        &[
            "bench",
            "--json",
            "--workload",
            "tcp-echo-conns",
            "--impl",
            "std-per-write",
            "--threads",
            "2",
        ],
        &[
            "bench",
            "--json",
            "--workload",
            "tcp-echo-conns",
            "--threads",
            "0",
        ],
    ];
    for args in cases {
        let output = ringsock(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
    }
}

/// Every key of the udp-relay JSON line.
const RELAY_KEYS: [&str; 26] = [
    "relay_ring_bytes",
    "impl",
    "workload",
    "size",
    "flows",
    "rate_target",
    "count",
    "sent",
    "received",
    "lost",
    "loss_pct",
    "reordered",
    "corrupt",
    "pps_delivered",
    "relay_cpu_us_per_pkt",
    "relay_cpu_util",
    "lat_p50_us",
    "lat_p99_us",
    "lat_p999_us",
    "elapsed_s",
    "send_pps",
    "relay_sock_drops",
    "sink_drops",
    "cpu0_busy",
    "cpu1_busy",
    "rcvbuf",
];

/// One udp-relay run that must pass its own checks: its one JSON line has every key,
/// nothing corrupt, and every datagram sent either arrived or was dropped by the kernel.
/// Loss itself is allowed (a busy machine drops), and nothing is timed.
fn check_relay(imp: &str, flows: &str, rate: &str, count: u64, relay: &str) {
    check_relay_with(imp, flows, rate, count, relay, &[]);
}

/// [`check_relay`] with more arguments; the JSON line, or None without io_uring.
fn check_relay_with(
    imp: &str,
    flows: &str,
    rate: &str,
    count: u64,
    relay: &str,
    extra: &[&str],
) -> Option<Value> {
    let count_arg = count.to_string();
    let mut args = vec![
        "bench",
        "--json",
        "--pin",
        "off",
        "--workload",
        "udp-relay",
        "--impl",
        imp,
        "--flows",
        flows,
        "--rate",
        rate,
        "--count",
        &count_arg,
        "--relay",
        relay,
    ];
    args.extend_from_slice(extra);
    let output = ringsock(&args);
    if uring_unavailable(imp, &output) {
        return None;
    }
    let stdout = String::from_utf8(output.stdout.clone()).expect("UTF-8 output");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line, got {stdout:?}");
    let v: Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert!(
        output.status.success(),
        "{args:?} failed: {}\n{v}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(v.get("error").is_none(), "{v}");
    for key in RELAY_KEYS {
        assert!(v.get(key).is_some(), "{key} missing in {v}");
    }
    assert_eq!(v["workload"], "udp-relay");
    assert_eq!(v["impl"], imp);
    assert_eq!(v["flows"].as_u64(), flows.parse().ok(), "{v}");
    assert_eq!(v["relay"], relay, "{v}");
    match rate {
        "max" => assert_eq!(v["rate_target"], "max", "{v}"),
        _ => assert_eq!(v["rate_target"].as_u64(), rate.parse().ok(), "{v}"),
    }
    assert_eq!(v["count"].as_u64(), Some(count), "{v}");
    assert_eq!(v["corrupt"].as_u64(), Some(0), "{v}");
    assert!(v["reordered"].is_u64(), "{v}");
    let n = |key: &str| v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"));
    assert_eq!(n("sent"), count, "{v}");
    assert_eq!(
        n("received") + n("relay_sock_drops") + n("sink_drops"),
        n("sent"),
        "{v}"
    );
    assert_eq!(n("lost"), n("sent") - n("received"), "{v}");
    assert!(n("rcvbuf") > 0, "{v}");
    Some(v)
}

/// The relay's receive rings keep an MTU's worth per datagram unless told otherwise, the
/// datagram size if larger, and any size asked for (the library's default 64 KiB
/// included); every datagram still arrives whole.
#[test]
fn udp_relay_rings_are_sized_as_asked() {
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        for (extra, ring) in [
            (&[][..], 2048),
            (&["--size", "3000"][..], 3000),
            (&["--relay-ring", "65536"][..], 65536),
            (&["--size", "600", "--relay-ring", "600"][..], 600),
        ] {
            for relay in ["forward", "group"] {
                let Some(v) = check_relay_with(imp, "4", "20000", 2000, relay, extra) else {
                    continue;
                };
                assert_eq!(v["relay_ring_bytes"].as_u64(), Some(ring), "{extra:?}: {v}");
            }
        }
    }
}

#[test]
fn udp_relay_at_a_fixed_rate_every_impl() {
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        for flows in ["1", "8"] {
            for relay in ["forward", "group", "tasks"] {
                check_relay(imp, flows, "20000", 3000, relay);
            }
        }
    }
}

#[test]
fn udp_relay_at_max_rate_every_impl() {
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        for flows in ["1", "8"] {
            for relay in ["forward", "group", "tasks"] {
                check_relay(imp, flows, "max", 3000, relay);
            }
        }
    }
}

#[test]
fn udp_relay_bad_arguments_are_usage_errors() {
    let cases: [(&[&str], &str); 14] = [
        (&["--count", "0"], "--count <COUNT>': must be at least 1"),
        (&["--count", "ten"], "a whole number of 1 or more"),
        (&["--relay-ring", "0"], "--relay-ring"),
        (&["--relay-ring", "65537"], "--relay-ring"),
        (
            &["--size", "3000", "--relay-ring", "2048"],
            "would cut every datagram",
        ),
        (&["--flows", "0"], "--flows"),
        (&["--batch", "8"], "do not apply to udp-relay"),
        (&["--verify-stride", "3"], "do not apply to udp-relay"),
        (&["--relay", "threads"], "--relay"),
        (&["--flows", "1025"], "--flows"),
        (&["--size", "10"], "at least 24"),
        (&["--size", "8193"], "at most 8192"),
        (&["--rate", "abc"], "not a rate"),
        (&["--rate", "0"], "not a rate"),
    ];
    for (extra, says) in cases {
        let mut args = vec!["bench", "--json", "--workload", "udp-relay"];
        args.extend_from_slice(extra);
        let output = ringsock(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("error:"), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let std = ringsock(&[
        "bench",
        "--json",
        "--workload",
        "udp-relay",
        "--impl",
        "std-per-write",
    ]);
    assert_eq!(std.status.code(), Some(2));
    let other = ringsock(&["bench", "--json", "--workload", "udp-batch", "--flows", "2"]);
    assert_eq!(other.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&other.stderr).contains("udp-relay only"));
    let relay = ringsock(&[
        "bench",
        "--json",
        "--workload",
        "udp-batch",
        "--relay",
        "group",
    ]);
    assert_eq!(relay.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&relay.stderr).contains("udp-relay only"));
}

/// The workloads that keep something per message refuse a count they could not hold
/// (a usage error), rather than panicking on the allocation or aborting out of memory.
#[test]
fn counts_too_large_to_record_are_usage_errors() {
    for imp in ["ringsock-uring", "ringsock-epoll"] {
        for (workload, max) in [
            ("tcp-echo-rtt", "10000000"),
            ("udp-echo-rtt", "10000000"),
            ("tcp-echo-conns", "10000000"),
            ("udp-relay", "1000000000"),
        ] {
            for count in ["18446744073709551615", "1000000000000"] {
                let out = ringsock(&[
                    "bench",
                    "--json",
                    "--workload",
                    workload,
                    "--impl",
                    imp,
                    "--count",
                    count,
                ]);
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(2), "{workload} {imp}: {stderr}");
                assert!(
                    stderr.contains(&format!("--count must be at most {max}")),
                    "{workload} {imp}: {stderr}"
                );
                assert!(out.stdout.is_empty(), "{workload} {imp}");
            }
        }
    }
}

/// A udp-relay run with more flows than the soft descriptor limit allows raises it up
/// to the hard limit, as a server does; where even the hard limit is too low, the run
/// says how many it needs (TooManyOpenFiles, exit 1), before it opens a socket.
#[test]
fn udp_relay_makes_room_for_its_descriptors_or_says_how_many_it_needs() {
    use std::os::unix::process::CommandExt;
    let run = |soft: u64, hard: u64| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringsock"));
        command.args([
            "bench",
            "--json",
            "--pin",
            "off",
            "--workload",
            "udp-relay",
            "--impl",
            "ringsock-epoll",
            "--flows",
            "300",
            "--count",
            "600",
            "--rate",
            "max",
        ]);
        // SAFETY: the hook calls only setrlimit, async-signal-safe as pre_exec requires.
        unsafe {
            command.pre_exec(move || {
                let limits = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limits) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.output().expect("run the ringsock binary")
    };
    let roomy = run(256, 4096);
    let stdout = String::from_utf8_lossy(&roomy.stdout);
    assert!(
        roomy.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&roomy.stderr)
    );
    let value: Value = serde_json::from_str(stdout.trim()).expect("a JSON line");
    assert_eq!(value["received"], 600, "{stdout}");

    let cramped = run(256, 256);
    let stderr = String::from_utf8_lossy(&cramped.stderr);
    assert_eq!(cramped.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("TooManyOpenFiles")
            && stderr.contains("needs about 664 open descriptors")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
}
