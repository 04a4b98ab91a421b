//! The tunnel workload's baseline: the same tunnel doing one system call per packet
//! and no offloads. One thread reads a packet from a blocking TUN queue, seals it with
//! ChaCha20-Poly1305 and sends it with `sendto`; another receives with `recvfrom`,
//! opens and writes the packet to the TUN.
//!
//! For measuring only: both ends derive fixed per-direction keys from the pre-shared
//! key (no handshake), so a restart would reuse nonces. Never use it to carry traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf;
use ringsock::tunnel::{PresharedKey, DATA_HEADER, TAG_LEN};

struct KeyLen;

impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

fn direction_key(psk: &PresharedKey, from: SocketAddr, to: SocketAddr) -> LessSafeKey {
    let prk =
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"ringsock bench baseline").extract(psk.as_bytes());
    let label = format!("{from} to {to}");
    let mut key = [0u8; 32];
    prk.expand(&[label.as_bytes()], KeyLen)
        .and_then(|okm| okm.fill(&mut key))
        .expect("32 bytes of HKDF output");
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).expect("a 32-byte key"))
}

fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

/// Runs the baseline tunnel until killed: prints `tunnel NAME udp ADDR` when ready.
pub fn run(
    tun_name: &str,
    listen: SocketAddr,
    peer: SocketAddr,
    key: &Path,
) -> ringsock::Result<()> {
    let psk = PresharedKey::from_file(key)?;
    let tun = ringsock::tun::open_blocking(tun_name)?;
    let socket = UdpSocket::bind(listen).map_err(|e| ringsock::Error::io("bind", e))?;
    let local = socket
        .local_addr()
        .map_err(|e| ringsock::Error::io("bind", e))?;
    let send_key = direction_key(&psk, local, peer);
    let recv_key = direction_key(&psk, peer, local);
    println!("tunnel {tun_name} udp {local}");
    let _ = std::io::stdout().flush();

    let (mut tun_in, mut tun_out) = (
        tun.try_clone().map_err(|e| ringsock::Error::io("dup", e))?,
        tun,
    );
    let (sock_in, sock_out) = (
        socket
            .try_clone()
            .map_err(|e| ringsock::Error::io("dup", e))?,
        socket,
    );
    let outbound = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut counter = 0u64;
        loop {
            let Ok(n) = tun_in.read(&mut buf[DATA_HEADER..65536 - TAG_LEN]) else {
                return;
            };
            buf[..DATA_HEADER].fill(0);
            buf[0] = 4;
            buf[8..16].copy_from_slice(&counter.to_le_bytes());
            let (header, body) = buf.split_at_mut(DATA_HEADER);
            let Ok(tag) = send_key.seal_in_place_separate_tag(
                nonce(counter),
                Aad::from(&header[..]),
                &mut body[..n],
            ) else {
                return;
            };
            body[n..n + TAG_LEN].copy_from_slice(tag.as_ref());
            counter += 1;
            let _ = sock_out.send_to(&buf[..DATA_HEADER + n + TAG_LEN], peer);
        }
    });
    let mut buf = vec![0u8; 65536];
    while let Ok((n, _)) = sock_in.recv_from(&mut buf) {
        if n < DATA_HEADER + TAG_LEN {
            continue;
        }
        let counter = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        let (header, body) = buf.split_at_mut(DATA_HEADER);
        if let Ok(plain) = recv_key.open_in_place(
            nonce(counter),
            Aad::from(&header[..]),
            &mut body[..n - DATA_HEADER],
        ) {
            let _ = tun_out.write(plain);
        }
    }
    let _ = outbound.join();
    Ok(())
}
