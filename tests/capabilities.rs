//! Every io_uring capability's fallback, run on this kernel by turning the capability off:
//! the same traffic must work with each one missing, and with all of them missing. Also
//! the builder's range checks, which must be errors rather than a silent fallback.

mod util;

use std::net::SocketAddr;

use ringsock::runtime::Builder;
use ringsock::{
    Backend, Capabilities, Capability, DatagramSocket, DriverKind, Runtime, SocketErrorStatus,
};

use util::{connected_pair, loopback_listener, must, read_exact, BACKENDS};

/// TCP accepts (several, so a multishot or a re-armed accept is exercised), an echo, and
/// datagrams of several sizes to an address, received one by one and in batches.
async fn traffic(what: &str) {
    let listener = loopback_listener();
    for round in 0..3u8 {
        let (client, server) = connected_pair(&listener).await;
        let data = util::pseudo_random_bytes(u64::from(round), 100_000);
        client.write_all(data.clone()).await.0.unwrap();
        let got = must(what, read_exact(&server, data.len())).await;
        assert!(got == data, "{what}: stream bytes differ");
    }
    let receiver = DatagramSocket::new();
    receiver.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
    let to: SocketAddr = receiver.local_addr().unwrap();
    let sender = DatagramSocket::new();
    sender.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
    let sizes = [1usize, 172, 1200, 1400];
    for (i, size) in sizes.iter().enumerate() {
        let payload = vec![i as u8; *size];
        let (sent, _) = sender.send_to_addr(payload.clone(), to).await;
        assert_eq!(sent.unwrap(), *size, "{what}: send_to");
        let datagram = must(what, receiver.recv()).await.unwrap();
        assert_eq!(datagram.data(), &payload[..], "{what}: datagram {i}");
        assert_eq!(datagram.remote_addr(), sender.local_addr().unwrap());
    }
    for i in 0..200u32 {
        sender
            .send_to_addr(i.to_be_bytes().to_vec(), to)
            .await
            .0
            .unwrap();
    }
    // Copied out batch by batch: a datagram held keeps its ring buffer, and a ring
    // without incremental buffers has 64.
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut batch = Vec::new();
    while got.len() < 200 {
        let what = format!("{what}: recv_batch");
        must(&what, receiver.recv_batch(&mut batch, 64))
            .await
            .unwrap();
        got.extend(batch.drain(..).map(|datagram| datagram.data().to_vec()));
    }
    for (i, data) in got.iter().enumerate() {
        assert_eq!(data, &(i as u32).to_be_bytes(), "{what}: batch");
    }
}

fn build(backend: Backend, disabled: &[Capability]) -> Option<Runtime> {
    let builder = disabled
        .iter()
        .fold(Builder::new().backend(backend), |b, cap| b.disable(*cap));
    util::build_or_skip(builder, backend)
}

#[test]
fn each_missing_capability_falls_back_and_traffic_still_flows() {
    let mut cases: Vec<Vec<Capability>> = Capability::ALL.iter().map(|cap| vec![*cap]).collect();
    cases.push(Capability::ALL.to_vec());
    for backend in BACKENDS {
        for disabled in &cases {
            let Some(runtime) = build(backend, disabled) else {
                continue;
            };
            let caps = runtime.capabilities();
            for cap in disabled {
                assert!(
                    !caps.contains(*cap),
                    "{backend}: {cap} was disabled but is used"
                );
            }
            let what = format!("{backend} without {disabled:?}");
            runtime.block_on(traffic(&what));
        }
    }
}

#[test]
fn io_uring_reports_what_it_found() {
    let Some(runtime) = build(Backend::Uring, &[]) else {
        return;
    };
    assert_eq!(runtime.driver_kind(), DriverKind::Uring);
    // This kernel (the one CI runs on) has every capability ringsock probes.
    let all: Capabilities = Capability::ALL.into_iter().collect();
    assert_eq!(
        runtime.capabilities(),
        all,
        "found: {}",
        runtime.capabilities()
    );
    assert!(runtime.ring_setup().is_some());
    let epoll = build(Backend::Epoll, &[]).unwrap();
    assert_eq!(epoll.capabilities(), Capabilities::none());
    assert_eq!(epoll.ring_setup(), None);
}

#[test]
fn ring_entries_out_of_range_are_invalid_arguments_on_every_backend() {
    for backend in [Backend::Auto, Backend::Uring, Backend::Epoll] {
        for bad in [0, 32769, u32::MAX] {
            match Builder::new().backend(backend).ring_entries(bad).build() {
                Ok(_) => panic!("{backend}: ring_entries({bad}) was accepted"),
                Err(err) => assert_eq!(
                    err.status(),
                    SocketErrorStatus::InvalidArgument,
                    "{backend} ring_entries({bad}): {err}"
                ),
            }
        }
    }
}

/// Above 8192 entries the completion queue used to be too large for the kernel and
/// `auto` fell back to epoll without a word.
#[test]
fn a_large_ring_still_runs_on_io_uring() {
    if build(Backend::Uring, &[]).is_none() {
        return;
    }
    for entries in [8193, 16384, 32768] {
        let runtime = Builder::new()
            .backend(Backend::Auto)
            .ring_entries(entries)
            .build()
            .unwrap();
        assert_eq!(
            runtime.driver_kind(),
            DriverKind::Uring,
            "{entries} entries"
        );
        assert_eq!(runtime.fallback_reason(), None);
        runtime.block_on(traffic(&format!("{entries} entries")));
    }
}

/// `RINGSOCK_DISABLE` turns capabilities off without code; a name it does not know is
/// an error. Run in a child process, since the variable is process-wide.
#[test]
fn ringsock_disable_is_applied_or_refused() {
    if let Ok(value) = std::env::var("RINGSOCK_DISABLE_CHILD") {
        let built = Builder::new().backend(Backend::Uring).build();
        match value.as_str() {
            "ok" => {
                let caps = built.unwrap().capabilities();
                assert!(!caps.contains(Capability::MultishotAccept));
                assert!(!caps.contains(Capability::BufferRing));
                assert!(caps.contains(Capability::MultishotRecv));
            }
            _ => assert_eq!(
                built.err().map(|err| err.status()),
                Some(SocketErrorStatus::InvalidArgument)
            ),
        }
        return;
    }
    if build(Backend::Uring, &[]).is_none() {
        return;
    }
    for (value, child) in [
        ("multishot-accept, buffer-ring", "ok"),
        ("multishot-accpet", "refused"),
    ] {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ringsock_disable_is_applied_or_refused",
                "--nocapture",
            ])
            .env("RINGSOCK_DISABLE", value)
            .env("RINGSOCK_DISABLE_CHILD", child)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "RINGSOCK_DISABLE={value:?}: the child failed"
        );
    }
}
