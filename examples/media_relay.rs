//! A media relay (RTP/TURN style) between two parties that never learn each other's
//! address: one relay socket per leg forwards everything it receives to the other party
//! by itself (`forward_received`), without a copy of the bytes and without waking the
//! program per packet; only "BYE" comes up to the program, and ends the leg.
//!
//! Each party sends to the relay address it was told (its SDP): the caller to one leg,
//! the callee to the other. The callee sends every packet back from the address it
//! arrived on (`SendOptions::reply_to`, which matters on a host with several addresses)
//! marked as audio (DSCP 46, ECT(0)), and the caller checks every answer: each one back,
//! byte-exact, once.
//!
//! ```sh
//! cargo run --release --example media_relay          # 10,000 round trips
//! cargo run --release --example media_relay 100000
//! RINGSOCK_BACKEND=epoll cargo run --release --example media_relay
//! ```

use std::net::SocketAddr;
use std::time::Instant;

use ringsock::{DatagramSocket, Ecn, Error, Forwarding, Result, SendOptions, TrafficClass};

/// Packets the caller keeps in flight: the relay forwards them as they come.
const WINDOW: u64 = 32;
/// An RTP packet's size: a 12-byte header and 160 bytes of G.711 audio (20 ms).
const PACKET: usize = 172;

fn main() {
    let count = match std::env::args().nth(1).map(|arg| arg.parse::<u64>()) {
        None => 10_000,
        Some(Ok(count)) if count > 0 => count,
        Some(_) => {
            eprintln!("usage: media_relay [ROUND_TRIPS > 0]");
            std::process::exit(2);
        }
    };
    if let Err(err) = ringsock::block_on(run(count)) {
        eprintln!("{}: {err}", err.status());
        std::process::exit(1);
    }
}

fn is_bye(data: &[u8]) -> bool {
    data == b"BYE"
}

/// The caller's packet `seq`: its number, then audio bytes that depend on it.
fn packet(seq: u64) -> Vec<u8> {
    let mut data = seq.to_le_bytes().to_vec();
    data.extend((8..PACKET).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8));
    data
}

async fn run(count: u64) -> Result<()> {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let bound = || -> Result<DatagramSocket> {
        let socket = DatagramSocket::new();
        socket.bind_addr(loopback)?;
        Ok(socket)
    };
    let (caller, callee) = (bound()?, bound()?);
    let (to_callee, to_caller) = (bound()?, bound()?);
    // What each party was told to send its media to (its SDP, in a SIP call).
    let (caller_sends_to, callee_sends_to) = (to_callee.local_addr()?, to_caller.local_addr()?);

    // The relay: each leg's socket forwards to the other party by itself and keeps only
    // "BYE" for the program, which passes it on and ends the leg.
    let legs = [
        (to_callee, callee.local_addr()?),
        (to_caller, caller.local_addr()?),
    ];
    let relay = legs.map(|(leg, party)| {
        ringsock::spawn(async move {
            leg.forward_received(Forwarding::to(party).delivering(is_bye))?;
            let bye = leg.recv().await?;
            leg.post_to_addr(bye.into_forward(), party)
                .map_err(|(err, _)| err)?;
            leg.settle_posts().await?;
            Ok::<_, Error>((leg.receive_stats().forwarded, leg.post_stats()))
        })
    });

    // The callee: sends each packet back, from the address it came to, marked as audio.
    callee.control().set_receive_destination(true)?;
    let audio = TrafficClass::new(TrafficClass::DSCP_EF, Ecn::Ect0)?;
    let echo = ringsock::spawn(async move {
        let mut answered = 0u64;
        loop {
            let request = callee.recv().await?;
            let options = SendOptions::reply_to(&request).with_traffic_class(audio);
            let answer = request.data().to_vec();
            callee
                .send_to_addr_with(answer, callee_sends_to, &options)
                .await
                .0?;
            if is_bye(request.data()) {
                return Ok::<_, Error>(answered);
            }
            answered += 1;
        }
    });

    // The caller: a window of packets in flight, every answer checked.
    let started = Instant::now();
    let mut seen = vec![false; count as usize];
    let (mut sent, mut answered) = (0u64, 0u64);
    while answered < count {
        while sent < count && sent - answered < WINDOW {
            caller.send_to_addr(packet(sent), caller_sends_to).await.0?;
            sent += 1;
        }
        let answer = caller.recv().await?;
        let seq = answer
            .data()
            .get(..8)
            .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
            .filter(|&seq| seq < count && answer.data() == packet(seq).as_slice())
            .ok_or_else(|| Error::invalid_input("an answer that was never sent"))?;
        if std::mem::replace(&mut seen[seq as usize], true) {
            return Err(Error::invalid_input(format!(
                "packet {seq} came back twice"
            )));
        }
        answered += 1;
    }
    let elapsed = started.elapsed();

    // Hang up: BYE through the relay ends the callee, whose BYE back ends the other leg.
    caller
        .send_to_addr(b"BYE".to_vec(), caller_sends_to)
        .await
        .0?;
    while !is_bye(caller.recv().await?.data()) {}
    let echoed = echo.await?;
    let [forward, back] = relay;
    let (forwarded_in, posts_in) = forward.await?;
    let (forwarded_back, posts_back) = back.await?;
    println!(
        "{count} round trips through the relay in {:.1} ms ({:.1} µs each, {WINDOW} in flight)",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / count as f64,
    );
    println!("the callee answered {echoed}; every answer came back once, byte-exact");
    println!("relay, leg to the callee: {forwarded_in} forwarded, {posts_in:?}");
    println!("relay, leg to the caller: {forwarded_back} forwarded, {posts_back:?}");
    Ok(())
}
