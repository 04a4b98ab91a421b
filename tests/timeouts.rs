//! Timeouts against hostile or dead peers, on both drivers: idle connections, writes a
//! peer never takes, reads that get nothing, TLS handshakes that never finish, connects
//! to an address that never answers. Limits are short (100-300 ms); the tests assert
//! that the timeout happened and what it did, never how long it took.

mod tls_certs;
mod util;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use ringsock::tls::{ProtectionLevel, TlsAcceptor};
use ringsock::{Backend, HostName, SocketErrorStatus, StreamSocket, TimeoutCounts};
use tls_certs::Ca;
use util::netns::{self, Netns};

const SHORT: Duration = Duration::from_millis(200);

fn status<T: std::fmt::Debug>(result: ringsock::Result<T>) -> SocketErrorStatus {
    result.expect_err("expected a failure").status()
}

#[test]
fn a_silent_peer_is_closed_after_the_idle_timeout() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        listener.control().set_idle_timeout(Some(SHORT)).unwrap();
        let (client, server) = util::connected_pair(&listener).await;

        // The server's read waits for a client that says nothing.
        let (read, _) = util::must("idle read", server.read(Vec::with_capacity(16))).await;
        assert_eq!(status(read), SocketErrorStatus::ConnectionTimedOut);
        // The connection is over for every later call, and the client sees its end.
        assert_eq!(
            status(server.write_all(b"late".to_vec()).await.0),
            SocketErrorStatus::ConnectionTimedOut
        );
        assert_eq!(
            util::must("client sees the end", util::read_to_end(&client)).await,
            b""
        );
        assert_eq!(
            listener.control().timeout_counts(),
            TimeoutCounts {
                idle: 1,
                ..TimeoutCounts::default()
            }
        );
        assert_eq!(
            server.control().timeout_counts().idle,
            1,
            "shared with the listener"
        );
    });
}

#[test]
fn an_idle_connection_nobody_waits_on_is_closed_too() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        // Set on a live socket, with no call of its own waiting: the watchdog acts alone.
        server.control().set_idle_timeout(Some(SHORT)).unwrap();
        assert_eq!(
            util::must("client sees the end", util::read_to_end(&client)).await,
            b""
        );
        assert_eq!(
            status(server.read(Vec::with_capacity(16)).await.0),
            SocketErrorStatus::ConnectionTimedOut
        );
        assert_eq!(server.control().timeout_counts().idle, 1);
        assert_eq!(
            listener.control().timeout_counts().idle,
            1,
            "counted for the listener"
        );
        assert_eq!(
            listener.control().idle_timeout(),
            None,
            "set on that socket only"
        );
    });
}

/// A control taken before the connect and used after it acts on the connected socket:
/// its idle timeout fires and its TCP_NODELAY reaches the kernel.
#[test]
fn a_control_taken_before_the_connect_acts_on_the_connected_socket() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let client = StreamSocket::new();
        let control = client.control();
        client
            .connect_addr(listener.local_addr().unwrap())
            .await
            .unwrap();
        let _server = util::must("accept", listener.accept()).await.unwrap();
        control.set_no_delay(false).unwrap();
        let nodelay = socket2::SockRef::from(&client).nodelay().unwrap();
        assert!(!nodelay, "TCP_NODELAY still on");
        control.set_idle_timeout(Some(SHORT)).unwrap();
        let (read, _) = util::must("idle read", client.read(Vec::with_capacity(16))).await;
        assert_eq!(status(read), SocketErrorStatus::ConnectionTimedOut);
        assert_eq!(control.timeout_counts().idle, 1);
    });
}

#[test]
fn traffic_before_the_idle_timeout_and_a_cleared_one_keep_the_connection() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        server
            .control()
            .set_idle_timeout(Some(Duration::from_secs(3600)))
            .unwrap();
        exchange(&client, &server, b"still here").await;
        server.control().set_idle_timeout(None).unwrap();
        exchange(&client, &server, b"and here").await;
        assert_eq!(server.control().timeout_counts(), TimeoutCounts::default());
    });
}

/// Sends `data` from `a` to `b` and back.
async fn exchange(a: &StreamSocket, b: &StreamSocket, data: &[u8]) {
    a.write_all(data.to_vec()).await.0.unwrap();
    assert_eq!(util::read_exact(b, data.len()).await, data);
    b.write_all(data.to_vec()).await.0.unwrap();
    assert_eq!(util::read_exact(a, data.len()).await, data);
}

/// Writes `total` bytes through `socket` (a peer that never reads takes only what the
/// kernel buffers hold) and gives the error that ended it.
async fn write_until_it_fails(socket: &StreamSocket, flushed: bool) -> SocketErrorStatus {
    const CHUNK: usize = 1 << 20;
    // Far more than any loopback buffers hold, so the write must stall.
    for _ in 0..512 {
        let result = if flushed {
            let output = socket.output_stream();
            match output.write(vec![7u8; CHUNK]).await {
                Ok(_) => output.flush().await,
                Err(err) => Err(err),
            }
        } else {
            socket.write_all(vec![7u8; CHUNK]).await.0
        };
        if let Err(err) = result {
            return err.status();
        }
    }
    panic!("512 MiB went to a peer that never reads")
}

#[test]
fn a_write_the_peer_never_takes_fails_after_the_write_timeout_and_resets() {
    util::on_each_backend(|_| async {
        for flushed in [false, true] {
            let listener = util::std_listener();
            let (client, peer) = util::pair_with_std_peer(&listener).await;
            client.control().set_write_timeout(Some(SHORT)).unwrap();
            let failed = util::must("stalled write", write_until_it_fails(&client, flushed)).await;
            assert_eq!(
                failed,
                SocketErrorStatus::ConnectionTimedOut,
                "flushed: {flushed}"
            );
            assert_eq!(client.control().timeout_counts().write, 1);
            assert_eq!(
                status(client.read(Vec::with_capacity(8)).await.0),
                SocketErrorStatus::ConnectionTimedOut,
                "every later call fails the same way"
            );
            drop(client);
            // Data was queued for it: the peer gets a reset, not a clean end.
            let (_, end) = util::must("peer sees the reset", util::std_peer_end(peer)).await;
            assert_eq!(
                end,
                Some(SocketErrorStatus::ConnectionResetByPeer),
                "flushed: {flushed}"
            );
        }
    });
}

#[test]
fn a_read_timeout_fails_that_read_only_and_loses_nothing() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        client
            .control()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (read, buf) = util::must("read", client.read(Vec::with_capacity(16))).await;
        assert_eq!(status(read), SocketErrorStatus::ConnectionTimedOut);
        assert!(buf.is_empty(), "the buffer comes back");
        let mut input = client.input_stream();
        assert_eq!(
            status(util::must("read_line", input.read_line()).await),
            SocketErrorStatus::ConnectionTimedOut
        );
        assert_eq!(client.control().timeout_counts().read, 2);
        // Still usable both ways.
        server.write_all(b"late line\n".to_vec()).await.0.unwrap();
        assert_eq!(
            input.read_line().await.unwrap().as_deref(),
            Some("late line")
        );
        client.write_all(b"back".to_vec()).await.0.unwrap();
        assert_eq!(util::read_exact(&server, 4).await, b"back");
    });
}

#[test]
fn reads_timing_out_while_bytes_arrive_lose_no_byte() {
    // The race a read timeout must survive: bytes landing just as the read gives up.
    // Many 1 ms timeouts against a writer that sends a chunk every 0.5-2.1 ms; whoever
    // wins each race, every byte must come out once, in order.
    util::on_each_backend(|_| async {
        const TOTAL: usize = 200_000;
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        client
            .control()
            .set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        let data = util::pseudo_random_bytes(11, TOTAL);
        let sent = data.clone();
        let writer = ringsock::spawn(async move {
            for (i, chunk) in sent.chunks(997).enumerate() {
                server.write_all(chunk.to_vec()).await.0.unwrap();
                // Pacing, so that reads keep timing out between chunks; the result
                // must be the same at any pace.
                let pause = Duration::from_micros(500 + (i as u64 % 5) * 400);
                ringsock::runtime::sleep(pause).await;
            }
            server.shutdown_write().await.unwrap();
            server
        });
        let (mut got, mut timeouts) = (Vec::new(), 0u64);
        let mut input = client.input_stream();
        loop {
            match input.read(64 * 1024).await {
                Ok(bytes) if bytes.is_empty() => break,
                Ok(bytes) => got.extend_from_slice(&bytes),
                Err(err) if err.status() == SocketErrorStatus::ConnectionTimedOut => timeouts += 1,
                Err(err) => panic!("read: {err}"),
            }
            assert!(got.len() <= TOTAL);
        }
        assert!(
            got == data,
            "bytes lost or reordered ({} of {TOTAL})",
            got.len()
        );
        assert_eq!(client.control().timeout_counts().read, timeouts);
        drop(util::must("writer", writer).await);
    });
}

#[test]
fn a_tls_handshake_that_never_finishes_is_closed() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("timeouts CA");
        let acceptor = TlsAcceptor::builder(ca.server())
            .handshake_timeout(Some(SHORT))
            .build()
            .unwrap();
        assert_eq!(acceptor.handshake_timeout(), Some(SHORT));
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        // A client that connects and says nothing, and one that sends the start of a
        // ClientHello a byte at a time and never the rest.
        for trickle in [false, true] {
            let client = std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                if trickle {
                    for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01] {
                        if stream.write_all(&[byte]).is_err() {
                            break;
                        }
                        // Pacing only: the outcome is the same however slow this is.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                util::std_read_until_end(&mut stream).1
            });
            let socket = util::must("accept", listener.accept()).await.unwrap();
            let result = util::must("handshake", socket.accept_tls(&acceptor)).await;
            assert_eq!(status(result), SocketErrorStatus::ConnectionTimedOut);
            assert!(socket.tls_info().is_none());
            drop(socket);
            let end = util::must("client sees the end", util::join_thread(client)).await;
            assert!(
                matches!(end, None | Some(SocketErrorStatus::ConnectionResetByPeer)),
                "{end:?}"
            );
        }
        assert_eq!(listener.control().timeout_counts().handshake, 2);
    });
}

#[test]
fn a_client_handshake_timeout_gives_up_on_a_silent_server() {
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        let (client, _peer) = util::pair_with_std_peer(&listener).await;
        client
            .control()
            .set_tls_handshake_timeout(Some(SHORT))
            .unwrap();
        let host = HostName::new("localhost").unwrap();
        let result = util::must(
            "handshake",
            client.upgrade_to_tls(ProtectionLevel::Tls12, &host),
        )
        .await;
        assert_eq!(status(result), SocketErrorStatus::ConnectionTimedOut);
        assert_eq!(client.control().timeout_counts().handshake, 1);
        assert_eq!(
            status(client.write_all(b"x".to_vec()).await.0),
            SocketErrorStatus::ConnectionTimedOut
        );
    });
}

#[test]
fn zero_timeouts_are_refused() {
    let socket = StreamSocket::new();
    let control = socket.control();
    for result in [
        control.set_connect_timeout(Some(Duration::ZERO)),
        control.set_idle_timeout(Some(Duration::ZERO)),
        control.set_read_timeout(Some(Duration::ZERO)),
        control.set_write_timeout(Some(Duration::ZERO)),
        control.set_tls_handshake_timeout(Some(Duration::ZERO)),
        control.set_linger_timeout(Duration::ZERO),
    ] {
        assert_eq!(status(result), SocketErrorStatus::InvalidArgument);
    }
    assert_eq!(control.idle_timeout(), None, "defaults: never");
    assert_eq!(
        control.linger_timeout(),
        ringsock::net::DEFAULT_LINGER_TIMEOUT
    );
    let ca = Ca::new("zero");
    let built = TlsAcceptor::builder(ca.server())
        .handshake_timeout(Some(Duration::ZERO))
        .build();
    assert_eq!(status(built), SocketErrorStatus::InvalidArgument);
    let default = TlsAcceptor::new(ca.server()).unwrap();
    assert_eq!(
        default.handshake_timeout(),
        Some(ringsock::tls::DEFAULT_HANDSHAKE_TIMEOUT)
    );
}

/// A port in `netns` whose SYNs an nftables rule drops: a connect to it never hears back.
fn blackhole(netns: &Netns) -> Result<u16, String> {
    let port = 9;
    netns.exec(&["nft", "add", "table", "inet", "ringsock"])?;
    netns.exec(&[
        "nft",
        "add chain inet ringsock in { type filter hook input priority 0; policy accept; }",
    ])?;
    netns.exec(&[
        "nft",
        &format!("add rule inet ringsock in tcp dport {port} drop"),
    ])?;
    Ok(port)
}

#[test]
fn a_connect_to_a_blackholed_address_times_out() {
    let netns = match Netns::create("blackhole") {
        Ok(netns) => netns,
        Err(why) => return netns::skip(&why),
    };
    let port = match blackhole(&netns) {
        Ok(port) => port,
        Err(why) => {
            return netns::skip(&format!(
                "nftables unavailable ({why}); CI installs the nftables package"
            ))
        }
    };
    netns.run(move || {
        util::on_each_backend(|_: Backend| async move {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let socket = StreamSocket::new();
            socket.control().set_connect_timeout(Some(SHORT)).unwrap();
            let result = util::must("connect", socket.connect_addr(addr)).await;
            assert_eq!(status(result), SocketErrorStatus::ConnectionTimedOut);
            assert_eq!(socket.control().timeout_counts().connect, 1);
            // By name too: every address gets the limit, and the socket stays new.
            let host = HostName::new("127.0.0.1").unwrap();
            let result = util::must("connect", socket.connect(&host, &port.to_string())).await;
            assert_eq!(status(result), SocketErrorStatus::ConnectionTimedOut);
            assert_eq!(socket.control().timeout_counts().connect, 2);
        });
    });
}
