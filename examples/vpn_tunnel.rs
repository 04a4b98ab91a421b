//! A point-to-point VPN tunnel: IP packets between a TUN interface and a UDP peer,
//! sealed with ChaCha20-Poly1305 (what `ringsock tunnel` runs).
//!
//! ```text
//! (umask 077; openssl rand -hex 32 > vpn.key)         # the same file on both ends
//! # host A (192.0.2.1):
//! cargo run --example vpn_tunnel -- vpn0 0.0.0.0:51820 vpn.key
//! ip addr add 10.9.0.1/24 dev vpn0
//! # host B:
//! cargo run --example vpn_tunnel -- vpn0 0.0.0.0:51820 vpn.key 192.0.2.1:51820
//! ip addr add 10.9.0.2/24 dev vpn0 && ping 10.9.0.1
//! ```
//!
//! Needs root (or CAP_NET_ADMIN). The data path, per batch: TUN frames are read
//! (super-segments with offloads), cut into packets of the path MTU, each sealed,
//! sent as one UDP GSO batch with don't-fragment set; datagrams are received in a
//! batch, opened (forgeries and replays dropped and counted), the segments of each TCP
//! flow joined into super-segments, and written to the TUN in one batch.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ringsock::tun::{TunDevice, TunOptions};
use ringsock::tunnel::{PresharedKey, Tunnel, TunnelConfig};
use ringsock::Error;

fn main() -> ringsock::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, listen, key, rest @ ..] = args.as_slice() else {
        return Err(Error::invalid_input(
            "usage: vpn_tunnel NAME LISTEN_ADDR:PORT KEY_FILE [PEER_ADDR:PORT]",
        ));
    };
    let parse = |text: &str| -> ringsock::Result<SocketAddr> {
        text.parse()
            .map_err(|_| Error::invalid_input(format!("{text:?} is not an IP:PORT")))
    };
    let config = TunnelConfig::new(
        parse(listen)?,
        rest.first().map(|peer| parse(peer)).transpose()?,
        PresharedKey::from_file(Path::new(key))?,
    );

    ringsock::block_on(async {
        // The interface: created (removed again when the program ends) or attached to,
        // with TSO/USO offloads where the kernel grants them, MTU for a 1500-byte path.
        let options = TunOptions {
            mtu: Some(1420),
            ..TunOptions::default()
        };
        let tun = TunDevice::create(name, options)?;
        println!("{} offloads: {:?}", tun.name(), tun.offloads());

        let tunnel = Tunnel::new(tun, config)?;
        println!("listening on udp {}", tunnel.local_addr()?);

        // The data path runs until an error; print the counters every 10 s meanwhile.
        let report = async {
            loop {
                ringsock::runtime::sleep(Duration::from_secs(10)).await;
                let stats = tunnel.stats();
                println!(
                    "sent {} packets, received {}, dropped {} forged and {} replayed",
                    stats.tx_packets, stats.rx_packets, stats.rx_auth_failed, stats.rx_replayed
                );
            }
        };
        let run = tunnel.run();
        let (mut run, mut report) = (std::pin::pin!(run), std::pin::pin!(report));
        std::future::poll_fn(|cx| {
            let _ = report.as_mut().poll(cx);
            run.as_mut().poll(cx)
        })
        .await
    })
}
