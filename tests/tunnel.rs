//! The tunnel's library API misused, and its UDP port attacked by a sender without the
//! key, on both drivers, in a network namespace the test creates (a TUN needs one).

mod util;

use std::future::{poll_fn, Future};
use std::net::UdpSocket;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use ringsock::tun::{TunDevice, TunOptions};
use ringsock::tunnel::{PresharedKey, Tunnel, TunnelConfig, TunnelGroup, TunnelStats};
use ringsock::SocketErrorStatus;
use util::{must, on_each_backend_in_netns, pseudo_random_bytes};

/// A tunnel's config on loopback, with no peer, and `batch`.
fn config(batch: usize) -> TunnelConfig {
    let key = PresharedKey::from_bytes([7; 32]);
    let mut config = TunnelConfig::new("127.0.0.1:0".parse().unwrap(), None, key);
    config.batch = batch;
    config
}

/// A batch of 0 (nothing could be taken) or past the most one receive takes is an
/// InvalidArgument error when a member joins, before a socket is bound; a batch in
/// range joins.
#[test]
fn a_batch_of_zero_or_past_the_limit_is_refused_at_join() {
    on_each_backend_in_netns("tnbatch", |backend| async move {
        let tun = || TunDevice::create("rstun3", TunOptions::default()).expect("create");
        for batch in [0, 1025, 1 << 40, usize::MAX] {
            let err = Tunnel::new(tun(), config(batch))
                .err()
                .unwrap_or_else(|| panic!("{backend}: batch {batch} joined"));
            assert_eq!(
                err.status(),
                SocketErrorStatus::InvalidArgument,
                "{backend} {batch}: {err}"
            );
            assert!(err.to_string().contains("1 to 1024"), "{backend}: {err}");
            let group = TunnelGroup::new(config(batch));
            assert!(group.join(tun()).is_err(), "{backend}: batch {batch}");
            assert_eq!(group.local_addr(), None, "{backend}: bound anyway");
        }
        for batch in [1, 1024] {
            let tunnel = Tunnel::new(tun(), config(batch)).expect("a batch in range");
            assert!(tunnel.local_addr().is_ok(), "{backend}");
        }
    });
}

/// Runs `body` while `tunnel` runs; the tunnel ending first fails the test.
async fn while_running<T>(tunnel: &Tunnel, body: impl Future<Output = T>) -> T {
    let mut run = pin!(tunnel.run());
    let mut body = pin!(body);
    poll_fn(|cx| {
        if let Poll::Ready(result) = run.as_mut().poll(cx) {
            panic!("the tunnel ended: {result:?}");
        }
        body.as_mut().poll(cx)
    })
    .await
}

/// The counter `name` of `stats`.
fn counter(stats: &TunnelStats, name: &str) -> u64 {
    let field = stats.fields().into_iter().find(|(n, _)| *n == name);
    field.unwrap_or_else(|| panic!("no counter {name}")).1
}

/// Waits until the tunnel's counter `name` reaches `value`.
async fn counted(tunnel: &Tunnel, name: &str, value: u64) {
    let what = format!("{name} reaching {value}");
    must(&what, async {
        while counter(&tunnel.stats(), name) < value {
            ringsock::runtime::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

/// A message of type `kind` and `len` bytes, the rest pseudo-random.
fn shaped(kind: u8, len: usize) -> Vec<u8> {
    let mut msg = pseudo_random_bytes(len as u64 + kind as u64, len);
    if let Some(first) = msg.first_mut() {
        *first = kind;
    }
    msg
}

/// Every message type at every length around its own, up to the largest UDP datagram,
/// and no type at all, from a sender without the key: each is dropped and counted
/// where it belongs, one by one, and nothing else moves (no session, no peer learned,
/// nothing written to the TUN). A flood of garbage after them leaves the tunnel
/// running and counting.
#[test]
fn hostile_datagrams_of_every_type_and_length_are_dropped_and_counted() {
    const MALFORMED: &str = "rx_malformed";
    on_each_backend_in_netns("tnhostile", |backend| async move {
        let tun = TunDevice::create("rstun5", TunOptions::default()).expect("create");
        let tunnel = Tunnel::new(tun, config(64)).expect("a tunnel");
        let to = tunnel.local_addr().unwrap();
        let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
        let max = 65507;
        let mut shapes: Vec<(Vec<u8>, &str)> = vec![(Vec::new(), MALFORMED)];
        for kind in [0, 3, 5, 0x99, 0xff] {
            shapes.extend([(shaped(kind, 1), MALFORMED), (shaped(kind, 100), MALFORMED)]);
        }
        for (kind, len) in [(1, 84), (2, 100)] {
            for other in [1, len - 1, len + 1, max] {
                shapes.push((shaped(kind, other), MALFORMED));
            }
            // Of the right shape, its MAC made without the key.
            shapes.push((shaped(kind, len), "handshakes_rejected"));
        }
        for len in [1, 31] {
            shapes.push((shaped(4, len), MALFORMED));
        }
        // A data header and tag or more, under a session this side never had; one
        // with the largest counter, every lane bit set.
        let mut last_counter = shaped(4, 100);
        last_counter[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        for data in [shaped(4, 32), shaped(4, max), last_counter] {
            shapes.push((data, "rx_unknown_session"));
        }
        while_running(&tunnel, async {
            for (datagram, name) in &shapes {
                let before = counter(&tunnel.stats(), name);
                attacker.send_to(datagram, to).unwrap();
                counted(&tunnel, name, before + 1).await;
            }
            let stats = tunnel.stats();
            let dropped = ["rx_malformed", "handshakes_rejected", "rx_unknown_session"]
                .iter()
                .map(|name| counter(&stats, name))
                .sum::<u64>();
            assert_eq!(dropped, shapes.len() as u64, "{backend}: {stats:?}");

            // A flood from several ports (what the kernel's buffer drops is no matter),
            // then one more forged Init: still counted, so the tunnel still reads.
            let flooders: Vec<UdpSocket> = (0..8)
                .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
                .collect();
            for i in 0..20_000u64 {
                let mut garbage = pseudo_random_bytes(i, (i as usize * 7919) % 1500);
                if let Some(first @ (1 | 2)) = garbage.first_mut() {
                    *first = 0;
                }
                let _ = flooders[i as usize % 8].send_to(&garbage, to);
                if i % 256 == 0 {
                    util::yield_now().await;
                }
            }
            let rejected = counter(&tunnel.stats(), "handshakes_rejected");
            attacker.send_to(&shaped(1, 84), to).unwrap();
            counted(&tunnel, "handshakes_rejected", rejected + 1).await;
        })
        .await;
        let stats = tunnel.stats();
        assert_eq!(stats.rx_packets, 0, "{backend}: {stats:?}");
        assert_eq!(stats.sessions, 0, "{backend}: {stats:?}");
        assert_eq!(stats.handshakes_answered, 0, "{backend}: {stats:?}");
        assert_eq!(
            tunnel.peer(),
            None,
            "{backend}: a peer learned from garbage"
        );
        assert!(!tunnel.has_session(), "{backend}");
        assert_eq!(tunnel.device().stats().packets_written, 0, "{backend}");
    });
}
