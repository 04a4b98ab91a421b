//! udp-echo-rtt: the measured side is the client of a 172-byte datagram ping-pong with
//! the plain std echo thread; 1,000 warm-up round trips, then the measured ones.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ringsock::runtime::timeout;
use ringsock::{DatagramSocket, Error, Result};

use super::cpu;
use super::join_peer;
use super::options::Options;
use super::peer::{self, bench_error, ECHO_WARMUP, FILL, PEER_WAIT};
use super::report::Report;
use super::tcp_echo::{check_echo, rtt_report, Client};
use super::udp::{driver_syscalls, io_error};
use super::udp_peer;

/// Runs udp-echo-rtt: 1,000 warm-up round trips, then `o.count` measured ones, each a
/// datagram sent and its echo received, against the plain echo thread.
pub(crate) fn run_echo_rtt(o: &Options) -> Result<Report> {
    let server = UdpSocket::bind("127.0.0.1:0").map_err(io_error("bind"))?;
    let addr = server.local_addr().map_err(io_error("local address"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = udp_peer::spawn_echo_server(server, o.pin, stop.clone())
        .map_err(io_error("start the echo thread"))?;
    let client = match o.imp.backend() {
        Some(backend) => o
            .runtime(backend)
            .and_then(|rt| rt.block_on(ringsock_client(o, addr))),
        None => std_client(o, addr),
    };
    stop.store(true, Ordering::Release);
    let echoed = join_peer(echo, "echo server");
    Ok(rtt_report(o, client, echoed, ECHO_WARMUP + o.count))
}

/// The ringsock client: `send` on a connected socket, then `recv` of the echo.
async fn ringsock_client(o: &Options, server: SocketAddr) -> Result<Client> {
    let socket = DatagramSocket::new();
    socket.connect_addr(server).await?;
    let mut ping = vec![FILL; o.size];
    let mut rtts = Vec::with_capacity(o.count as usize);
    let mut start = Instant::now();
    let mut calls = driver_syscalls();
    let mut cpu0 = cpu::thread_cpu_secs();
    for i in 0..ECHO_WARMUP + o.count {
        if i == ECHO_WARMUP {
            calls = driver_syscalls();
            cpu0 = cpu::thread_cpu_secs();
            start = Instant::now();
        }
        peer::stamp(&mut ping, i);
        let sent_at = Instant::now();
        let (sent, back) = socket.send(ping).await;
        ping = back;
        sent?;
        let pong = timeout(PEER_WAIT, socket.recv()).await.map_err(|_| {
            Error::timed_out(format!("no echo of round trip {i} within {PEER_WAIT:?}"))
        })??;
        let rtt = sent_at.elapsed().as_nanos() as u64;
        check_echo(&pong, o.size, i)?;
        if i >= ECHO_WARMUP {
            rtts.push(rtt);
        }
    }
    Ok(Client {
        rtts_ns: rtts,
        secs: start.elapsed().as_secs_f64(),
        syscalls: driver_syscalls() - calls,
        cpu_secs: cpu::thread_cpu_secs() - cpu0,
    })
}

/// The baseline client: blocking `send` then `recv` on a connected std socket.
fn std_client(o: &Options, server: SocketAddr) -> Result<Client> {
    let io = io_error("echo client");
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(&io)?;
    socket.connect(server).map_err(&io)?;
    socket.set_read_timeout(Some(PEER_WAIT)).map_err(&io)?;
    let mut ping = vec![FILL; o.size];
    let mut pong = vec![0u8; 65536];
    let mut rtts = Vec::with_capacity(o.count as usize);
    let mut start = Instant::now();
    let mut cpu0 = cpu::thread_cpu_secs();
    for i in 0..ECHO_WARMUP + o.count {
        if i == ECHO_WARMUP {
            cpu0 = cpu::thread_cpu_secs();
            start = Instant::now();
        }
        peer::stamp(&mut ping, i);
        let sent_at = Instant::now();
        socket.send(&ping).map_err(&io)?;
        let n = match socket.recv(&mut pong) {
            Ok(n) => n,
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let what = format!("no echo of round trip {i} within {PEER_WAIT:?}");
                return Err(Error::io("echo client", bench_error(what)));
            }
            Err(err) => return Err(io(err)),
        };
        let rtt = sent_at.elapsed().as_nanos() as u64;
        check_echo(&pong[..n], o.size, i)?;
        if i >= ECHO_WARMUP {
            rtts.push(rtt);
        }
    }
    Ok(Client {
        rtts_ns: rtts,
        secs: start.elapsed().as_secs_f64(),
        // One send and one recv per round trip.
        syscalls: 2 * o.count,
        cpu_secs: cpu::thread_cpu_secs() - cpu0,
    })
}
