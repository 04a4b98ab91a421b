//! TunDevice on both drivers, in a network namespace the test creates: packets the
//! kernel routes to the interface are read; packets written reach the kernel's sockets.

mod util;

use std::net::{Ipv4Addr, UdpSocket};
use std::task::Poll;
use std::time::Duration;

use ringsock::runtime::{timeout, Builder};
use ringsock::tun::{TunDevice, TunOptions};
use ringsock::SocketErrorStatus;
use util::netns::{skip, Netns};
use util::{must, on_each_backend, on_each_backend_in_netns, MUST_HAPPEN};

/// A hand-built IPv4/UDP packet from 10.77.0.2:9999 to 10.77.0.1:`port`.
fn udp_packet(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    let total = (28 + payload.len()) as u16;
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 77, 0, 2]);
    p[16..20].copy_from_slice(&[10, 77, 0, 1]);
    let mut sum: u32 = 0;
    for pair in p[..20].chunks(2) {
        sum += u16::from_be_bytes([pair[0], pair[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&9999u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    // UDP checksum 0: none, allowed over IPv4.
    p.extend_from_slice(payload);
    p
}

fn exchange(offloads: bool) {
    on_each_backend_in_netns("tun", move |backend| {
        async move {
            let options = TunOptions {
                offloads,
                mtu: Some(1400),
                ..TunOptions::default()
            };
            let tun = TunDevice::create("rstun0", options).expect("create the TUN");
            assert!(tun.created());
            assert_eq!(tun.mtu().unwrap(), 1400);
            assert!(tun.is_up().unwrap());
            assert_eq!(tun.offloads().vnet_hdr, offloads);
            let status = std::process::Command::new("ip")
                .args(["addr", "add", "10.77.0.1/24", "dev", "rstun0"])
                .status()
                .unwrap();
            assert!(status.success(), "ip addr add on {backend}");

            // Kernel to TUN: a datagram routed through the interface is read.
            let sock = UdpSocket::bind((Ipv4Addr::new(10, 77, 0, 1), 0)).unwrap();
            let port = sock.local_addr().unwrap().port();
            sock.send_to(b"to the tun", "10.77.0.2:7").unwrap();
            let found = timeout(MUST_HAPPEN, async {
                loop {
                    let frame = tun.recv().await.expect("read");
                    let packet = frame.packet().to_vec();
                    tun.recycle(frame);
                    if packet.len() > 28 && packet[9] == 17 && packet.ends_with(b"to the tun") {
                        return packet;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no datagram read on {backend}"));
            assert_eq!(&found[16..20], &[10, 77, 0, 2]);

            // TUN to kernel: a batch of written packets reaches the socket.
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            for i in 0..5u8 {
                tun.write(&udp_packet(port, &[b'x', i]));
            }
            tun.flush().await.expect("flush");
            for i in 0..5u8 {
                let mut buf = [0u8; 16];
                let (n, from) = sock.recv_from(&mut buf).expect("a written packet");
                assert_eq!(&buf[..n], &[b'x', i]);
                assert_eq!(from.to_string(), "10.77.0.2:9999");
            }
            assert_eq!(tun.stats().frames_written, 5);
            // A packet that is not IPv4 or IPv6 is refused by the kernel: counted,
            // and the packets after it still go.
            tun.write(&[0u8; 20]);
            tun.write(&udp_packet(port, b"after"));
            assert!(
                tun.flush().await.is_err(),
                "{backend}: the refusal is reported"
            );
            assert_eq!(tun.stats().write_errors, 1);
            let mut buf = [0u8; 16];
            let (n, _) = sock
                .recv_from(&mut buf)
                .expect("the packet after the refused one");
            assert_eq!(&buf[..n], b"after");

            // A read given up on loses nothing: the kernel's read stays with the
            // device, and the next read takes the packet it gets.
            // (The kernel's own packets, such as IPv6 router solicitations, may
            // come meanwhile: the read may end either way.)
            let _ = timeout(Duration::from_millis(20), tun.recv()).await;
            sock.send_to(b"after a dropped read", "10.77.0.2:7")
                .unwrap();
            let next = timeout(MUST_HAPPEN, async {
                loop {
                    let frame = tun.recv().await.expect("read");
                    if frame.packet().ends_with(b"after a dropped read") {
                        return;
                    }
                }
            })
            .await;
            assert!(next.is_ok(), "{backend}: the packet after a dropped read");

            // Another queue of the same interface.
            let second = tun.open_queue().expect("a second queue");
            assert_eq!(second.name(), "rstun0");
            assert!(!second.created());
        }
    });
}

#[test]
fn tun_reads_and_writes_with_offloads() {
    exchange(true);
}

#[test]
fn tun_reads_and_writes_without_offloads() {
    exchange(false);
}

#[test]
fn a_tun_used_on_another_runtime_is_wrong_runtime() {
    let netns = match Netns::create("tunrt") {
        Ok(netns) => netns,
        Err(why) => return skip(&why),
    };
    netns.run(|| {
        for backend in util::BACKENDS {
            let Some(first) = util::build_or_skip(Builder::new().backend(backend), backend) else {
                continue;
            };
            let tun = first
                .block_on(async { TunDevice::create("rstun1", TunOptions::default()) })
                .expect("create the TUN");
            let second = Builder::new().backend(backend).build().unwrap();
            let err = second
                .block_on(tun.recv())
                .expect_err("a TUN belongs to its runtime");
            assert_eq!(
                err.status(),
                SocketErrorStatus::WrongRuntime,
                "{backend}: {err}"
            );
            tun.write(&[0x45; 20]);
            let err = second
                .block_on(tun.flush())
                .expect_err("written on another runtime");
            assert_eq!(
                err.status(),
                SocketErrorStatus::WrongRuntime,
                "{backend}: {err}"
            );
            drop(tun);
        }
    });
}

/// An existing interface a TUN queue cannot attach to (no TUN at all, a TAP, a TUN made
/// without multi-queue) is an error that says which, not the kernel's bare EINVAL; the
/// interface stays as it was.
#[test]
fn an_interface_a_queue_cannot_attach_to_says_why() {
    let netns = match Netns::create("tunkind") {
        Ok(netns) => netns,
        Err(why) => return skip(&why),
    };
    for args in [
        &[
            "ip", "link", "add", "rsveth0", "type", "veth", "peer", "name", "rsveth1",
        ][..],
        &["ip", "tuntap", "add", "dev", "rstap0", "mode", "tap"],
        &["ip", "tuntap", "add", "dev", "rstun9", "mode", "tun"],
    ] {
        netns.exec(args).expect("make the interface");
    }
    netns.run(|| {
        on_each_backend(|backend| async move {
            for (name, says) in [
                ("lo", "not a TUN interface"),
                ("rsveth0", "not a TUN interface"),
                ("rstap0", "a TAP interface"),
                ("rstun9", "multi_queue"),
            ] {
                let err = TunDevice::create(name, TunOptions::default())
                    .expect_err("no TUN queue to attach");
                let text = err.to_string();
                assert!(text.contains(says), "{backend} {name}: {text}");
                assert_eq!(
                    err.status(),
                    SocketErrorStatus::InvalidArgument,
                    "{backend} {name}: {text}"
                );
            }
            // The TUN made without multi-queue is attached as it was made.
            let single = TunOptions {
                multi_queue: false,
                ..TunOptions::default()
            };
            let tun = TunDevice::create("rstun9", single).expect("attach as made");
            assert!(!tun.created(), "{backend}");
        });
    });
}

/// An interface deleted underneath its queue (`ip link del`) ends a read in flight and
/// every later read and flush with an error saying so: no hang, no panic.
#[test]
fn a_tun_deleted_underneath_ends_reads_and_writes_with_an_error() {
    on_each_backend_in_netns("tundel", |backend| async move {
        let tun = TunDevice::create("rstun2", TunOptions::default()).expect("create");
        let delete = || {
            let out = std::process::Command::new("ip")
                .args(["link", "del", "rstun2"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{backend}: ip link del: {out:?}");
        };
        let mut frames = Vec::new();
        let in_flight = {
            let mut read = std::pin::pin!(tun.recv_batch(&mut frames, 8));
            match util::poll_once(read.as_mut()).await {
                Poll::Ready(result) => {
                    delete();
                    result
                }
                Poll::Pending => {
                    delete();
                    must("the read in flight", read).await
                }
            }
        };
        // What the kernel had queued before may still come; then the error.
        let err = match in_flight {
            Err(err) => err,
            Ok(_) => {
                must("a read after the deletion", async {
                    loop {
                        let mut frames = Vec::new();
                        if let Err(err) = tun.recv_batch(&mut frames, 8).await {
                            return err;
                        }
                    }
                })
                .await
            }
        };
        let text = err.to_string();
        assert!(text.contains("rstun2 was deleted"), "{backend}: {text}");
        assert_eq!(
            err.status(),
            SocketErrorStatus::NetworkIsDown,
            "{backend}: {text}"
        );
        let again = must("a second read", tun.recv()).await.unwrap_err();
        assert!(
            again.to_string().contains("was deleted"),
            "{backend}: {again}"
        );
        tun.write(&udp_packet(9, b"to nowhere"));
        let flushed = must("a flush", tun.flush()).await.unwrap_err();
        assert!(
            flushed.to_string().contains("was deleted"),
            "{backend}: {flushed}"
        );
        assert_eq!(tun.stats().write_errors, 1, "{backend}");
    });
}

/// Packets the kernel cannot take (empty, one byte, not IP, over 64 KiB) are refused
/// and counted, with offloads and without, and the packet queued after them still
/// reaches its socket: no panic, no stuck flush.
#[test]
fn odd_packets_written_are_refused_and_the_next_one_goes() {
    on_each_backend_in_netns("tunodd", |backend| async move {
        for offloads in [true, false] {
            let options = TunOptions {
                offloads,
                ..TunOptions::default()
            };
            // A name per round: the last round's interface may outlive its descriptor
            // for a moment (an io_uring worker's file reference is let go late).
            let name = format!("rstun4{}", u8::from(offloads));
            let tun = TunDevice::create(&name, options).expect("create");
            let out = std::process::Command::new("ip")
                .args(["addr", "add", "10.77.0.1/24", "dev", &name])
                .output()
                .unwrap();
            assert!(out.status.success(), "{backend}: {out:?}");
            let sock = UdpSocket::bind((Ipv4Addr::new(10, 77, 0, 1), 0)).unwrap();
            sock.set_read_timeout(Some(MUST_HAPPEN)).unwrap();
            let port = sock.local_addr().unwrap().port();
            // To a port no one listens on: the kernel may take it, trimmed to the
            // length its header says.
            let huge = {
                let mut packet = udp_packet(9, &[0; 100]);
                packet.resize(70_000, 0);
                packet
            };
            for odd in [&[][..], &[0x45], &[0x00; 40], &huge] {
                tun.write(odd);
            }
            tun.write(&udp_packet(port, b"after the odd ones"));
            let flushed = must("a flush of odd packets", tun.flush()).await;
            assert!(flushed.is_err(), "{backend} {offloads}: nothing refused");
            assert!(
                tun.stats().write_errors >= 2,
                "{backend} {offloads}: {:?}",
                tun.stats()
            );
            let mut buf = [0u8; 64];
            let (n, _) = sock.recv_from(&mut buf).expect("the packet after them");
            assert_eq!(&buf[..n], b"after the odd ones", "{backend} {offloads}");
            drop(tun);
        }
    });
}

/// A device dropped just after a read of it was given up while in flight closes its
/// queue: the interface it created goes away, the runtime going on.
#[test]
fn a_tun_dropped_after_a_read_in_flight_goes_away() {
    on_each_backend_in_netns("tundrop", |backend| async move {
        let tun = TunDevice::create("rstun6", TunOptions::default()).expect("create");
        {
            let mut frames = Vec::new();
            let mut read = std::pin::pin!(tun.recv_batch(&mut frames, 8));
            let _ = util::poll_once(read.as_mut()).await;
        }
        drop(tun);
        let what = format!("{backend}: the interface going away");
        must(&what, async {
            while std::process::Command::new("ip")
                .args(["link", "show", "rstun6"])
                .output()
                .unwrap()
                .status
                .success()
            {
                ringsock::runtime::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    });
}
