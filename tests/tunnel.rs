//! The tunnel's library API misused, on both drivers, in a network namespace the test
//! creates (a TUN needs one).

mod util;

use ringsock::tun::{TunDevice, TunOptions};
use ringsock::tunnel::{PresharedKey, Tunnel, TunnelConfig, TunnelGroup};
use ringsock::SocketErrorStatus;
use util::on_each_backend_in_netns;

/// A batch of 0 (nothing could be taken) or past the most one receive takes is an
/// InvalidArgument error when a member joins, before a socket is bound; a batch in
/// range joins.
#[test]
fn a_batch_of_zero_or_past_the_limit_is_refused_at_join() {
    on_each_backend_in_netns("tnbatch", |backend| async move {
        let config = |batch| {
            let key = PresharedKey::from_bytes([7; 32]);
            let mut config = TunnelConfig::new("127.0.0.1:0".parse().unwrap(), None, key);
            config.batch = batch;
            config
        };
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
