//! The resolver through the public API, on both drivers: name lookups share one bounded
//! pool of threads in the process, and a lookup given up on leaves nothing queued.
//!
//! The slow, queue-full and timed-out cases need a lookup that blocks on cue: they are
//! unit tests in `src/host/resolver.rs`, with a fake lookup on a small pool.

mod util;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Mutex, MutexGuard};

use ringsock::host::{self, resolver_stats, RESOLVER_QUEUE, RESOLVER_THREADS};
use ringsock::{DatagramSocket, HostName};

/// The tests here read the counters of the one resolver of the process: one at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Resolver threads alive now, as the kernel lists them (names are cut to 15 bytes).
fn resolver_threads_in_proc() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == "ringsock-resolv")
        })
        .count()
}

#[test]
fn many_concurrent_lookups_use_at_most_the_pool_threads() {
    let _serial = one_at_a_time();
    util::on_each_backend(|_| async {
        let host = HostName::new("localhost").unwrap();
        const LOOKUPS: u16 = 64;
        const CONNECTS: u16 = 16;
        assert!(usize::from(LOOKUPS + CONNECTS) <= RESOLVER_QUEUE);
        // All are spawned before any runs, so they reach the resolver together.
        let lookups: Vec<_> = (0..LOOKUPS)
            .map(|i| {
                let host = host.clone();
                ringsock::spawn(async move { (i, host::resolve(&host, 9000 + i).await) })
            })
            .collect();
        // Sockets given a name go through the same resolver (a UDP connect sends
        // nothing).
        let connects: Vec<_> = (0..CONNECTS)
            .map(|_| {
                let host = host.clone();
                ringsock::spawn(async move {
                    let socket = DatagramSocket::new();
                    socket.connect(&host, "9").await.map(|()| socket)
                })
            })
            .collect();
        let mut most_threads = 0;
        for lookup in lookups {
            let (i, addrs) = util::must("lookup of localhost", lookup).await;
            let addrs = addrs.unwrap_or_else(|err| panic!("lookup {i}: {err}"));
            let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, 9000 + i));
            assert!(addrs.contains(&v4), "lookup {i}: {addrs:?}");
            most_threads = most_threads.max(resolver_threads_in_proc());
        }
        for connect in connects {
            let socket = util::must("connect to localhost", connect).await.unwrap();
            assert!(socket.peer_addr().unwrap().ip().is_loopback());
        }
        let stats = resolver_stats();
        assert!(
            (1..=RESOLVER_THREADS).contains(&stats.peak_threads),
            "{stats:?}"
        );
        assert!(stats.threads <= RESOLVER_THREADS, "{stats:?}");
        assert!(most_threads <= RESOLVER_THREADS, "{most_threads} threads");
        assert!(resolver_threads_in_proc() <= RESOLVER_THREADS);
    });
}

#[test]
fn dropped_lookups_leave_the_queue() {
    let _serial = one_at_a_time();
    util::on_each_backend(|_| async {
        let host = HostName::new("localhost").unwrap();
        let mut lookups: Vec<_> = (0..32)
            .map(|_| Box::pin(host::resolve(&host, 80)))
            .collect();
        // Polled once: each is queued, running, or (rarely) done already.
        for lookup in &mut lookups {
            let _ = util::poll_once(lookup.as_mut()).await;
        }
        drop(lookups);
        // Nothing else in this process looks names up now: whatever was still queued
        // left with its future, and what was running is discarded when it returns.
        assert_eq!(resolver_stats().queued, 0);
        let addrs = util::must("a lookup after the dropped ones", host::resolve(&host, 80))
            .await
            .unwrap();
        assert!(
            addrs.iter().all(|addr| addr.ip().is_loopback()),
            "{addrs:?}"
        );
        assert!(resolver_stats().peak_threads <= RESOLVER_THREADS);
    });
}

#[test]
fn literals_resolve_without_the_pool() {
    util::on_each_backend(|_| async {
        for (literal, want) in [("127.0.0.1", "127.0.0.1:80"), ("::1", "[::1]:80")] {
            let host = HostName::new(literal).unwrap();
            // Ready at the first poll: no thread is asked.
            let mut lookup = std::pin::pin!(host::resolve(&host, 80));
            match util::poll_once(lookup.as_mut()).await {
                std::task::Poll::Ready(addrs) => {
                    assert_eq!(addrs.unwrap(), [want.parse::<SocketAddr>().unwrap()])
                }
                std::task::Poll::Pending => panic!("{literal}: a literal waited"),
            }
        }
    });
}
