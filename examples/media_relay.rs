//! A media relay (RTP/TURN style) between two parties that never learn each other's
//! address, in the two shapes a relay takes:
//!
//! - by itself (the default): each leg's socket forwards everything it receives to its
//!   party by itself (`forward_received`), without a copy of the bytes and without
//!   waking the program per packet; only "BYE" comes up to the program. Each party sends
//!   to the relay address it was told (its SDP): the caller to one leg, the callee to
//!   the other.
//! - `--symmetric`: what arrives on one leg leaves from the other, so each party answers
//!   where its packets came from (symmetric RTP, what NAT traversal needs). A socket
//!   forwards only from itself, so here one loop takes what both legs hold
//!   (`DatagramGroup`) and posts each packet on the other leg (`post_to_addr`), still
//!   without a copy and without a future per packet.
//!
//! The callee sends every packet back from the address it arrived on
//! (`SendOptions::reply_to`, which matters on a host with several addresses) marked as
//! audio (DSCP 46, ECT(0)); the relay's legs mark what they forward the same way
//! (`set_traffic_class`), and the caller checks every answer: each one back, byte-exact,
//! once, marked as audio.
//!
//! ```sh
//! cargo run --release --example media_relay                       # 10,000 round trips
//! cargo run --release --example media_relay -- 100000 --symmetric
//! RINGSOCK_BACKEND=epoll cargo run --release --example media_relay
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ringsock::{
    DatagramGroup, DatagramSocket, Ecn, Error, Forwarding, PostStats, Result, SendOptions,
    TrafficClass,
};

/// Packets the caller keeps in flight: the relay forwards them as they come.
const WINDOW: u64 = 32;
/// An RTP packet's size: a 12-byte header and 160 bytes of G.711 audio (20 ms).
const PACKET: usize = 172;

fn main() {
    let mut count = 10_000;
    let mut symmetric = false;
    for arg in std::env::args().skip(1) {
        match arg.parse::<u64>() {
            Ok(n) if n > 0 => count = n,
            _ if arg == "--symmetric" => symmetric = true,
            _ => {
                eprintln!("usage: media_relay [ROUND_TRIPS > 0] [--symmetric]");
                std::process::exit(2);
            }
        }
    }
    if let Err(err) = ringsock::block_on(run(count, symmetric)) {
        eprintln!("{}: {err}", err.status());
        std::process::exit(1);
    }
}

/// The caller's next answer; an error if none comes for a second (a datagram lost,
/// or a relay task that failed), rather than a wait for ever.
async fn answer_of(caller: &DatagramSocket) -> Result<ringsock::Datagram> {
    ringsock::runtime::timeout(Duration::from_secs(1), caller.recv())
        .await
        .map_err(|_| {
            Error::timed_out("no answer within a second: one was lost, or the relay stopped")
        })?
}

/// Audio's traffic class: DSCP 46 (Expedited Forwarding, RFC 8837), ECT(0).
fn audio() -> Result<TrafficClass> {
    TrafficClass::new(TrafficClass::DSCP_EF, Ecn::Ect0)
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

/// What a relay leg forwarded, and the books of the sends it posted.
type LegReport = (u64, PostStats);

async fn run(count: u64, symmetric: bool) -> Result<()> {
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let bound = || -> Result<DatagramSocket> {
        let socket = DatagramSocket::new();
        socket.bind_addr(loopback)?;
        Ok(socket)
    };
    let (caller, callee) = (bound()?, bound()?);
    let (to_callee, to_caller) = (bound()?, bound()?);
    // Where each party sends its media (what its SDP named, in a SIP call).
    let caller_sends_to = to_callee.local_addr()?;
    let callee_sends_to = (!symmetric).then_some(to_caller.local_addr()?);
    let parties = [callee.local_addr()?, caller.local_addr()?];
    let relay = if symmetric {
        ringsock::spawn(relay_symmetric([to_callee, to_caller], parties))
    } else {
        ringsock::spawn(relay_by_itself([to_callee, to_caller], parties))
    };

    // The callee: sends each packet back, from the address it came to, marked as audio.
    callee.control().set_receive_destination(true)?;
    let audio = audio()?;
    let echo = ringsock::spawn(async move {
        let mut answered = 0u64;
        loop {
            let request = callee.recv().await?;
            let options = SendOptions::reply_to(&request).with_traffic_class(audio);
            let answer = request.data().to_vec();
            let to = callee_sends_to.unwrap_or(request.remote_addr());
            callee.send_to_addr_with(answer, to, &options).await.0?;
            if is_bye(request.data()) {
                return Ok::<_, Error>(answered);
            }
            answered += 1;
        }
    });

    // The caller: a window of packets in flight, every answer checked, its marking too.
    caller.control().set_receive_traffic_class(true)?;
    let started = Instant::now();
    let mut seen = vec![false; count as usize];
    let (mut sent, mut answered) = (0u64, 0u64);
    while answered < count {
        while sent < count && sent - answered < WINDOW {
            caller.send_to_addr(packet(sent), caller_sends_to).await.0?;
            sent += 1;
        }
        let answer = answer_of(&caller).await?;
        let seq = answer
            .data()
            .get(..8)
            .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
            .filter(|&seq| seq < count && answer.data() == packet(seq).as_slice())
            .ok_or_else(|| Error::invalid_input("an answer that was never sent"))?;
        if answer.traffic_class() != Some(audio) {
            return Err(Error::invalid_input(format!(
                "packet {seq} came back marked {:?}, not as audio",
                answer.traffic_class()
            )));
        }
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
    while !is_bye(answer_of(&caller).await?.data()) {}
    let echoed = echo.await?;
    let [(forwarded_in, posts_in), (forwarded_back, posts_back)] = relay.await?;
    let shape = if symmetric { "symmetric" } else { "by itself" };
    println!(
        "{count} round trips through the relay ({shape}) in {:.1} ms ({:.1} µs each, \
         {WINDOW} in flight)",
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / count as f64,
    );
    println!(
        "the callee answered {echoed}; every answer came back once, byte-exact, marked as audio"
    );
    println!("relay, caller to callee: {forwarded_in} forwarded, {posts_in:?}");
    println!("relay, callee to caller: {forwarded_back} forwarded, {posts_back:?}");
    Ok(())
}

/// Each leg forwards to its party by itself and keeps only "BYE" for the program, which
/// passes it on and ends the leg.
async fn relay_by_itself(
    legs: [DatagramSocket; 2],
    parties: [SocketAddr; 2],
) -> Result<[LegReport; 2]> {
    for (leg, &party) in legs.iter().zip(&parties) {
        // What it forwards is marked as audio, as the parties mark what they send.
        leg.control().set_traffic_class(Some(audio()?))?;
        leg.forward_received(Forwarding::to(party).delivering(is_bye))?;
    }
    let ends = legs.map(|leg| {
        ringsock::spawn(async move {
            let bye = leg.recv().await?;
            let party = leg.forwarding().expect("set above").destination();
            leg.post_to_addr(bye.into_forward(), party)
                .map_err(|(err, _)| err)?;
            leg.settle_posts().await?;
            Ok::<_, Error>((leg.receive_stats().forwarded, leg.post_stats()))
        })
    });
    let [first, second] = ends;
    Ok([first.await?, second.await?])
}

/// One loop over both legs: what arrives on one leaves from the other, to the party
/// behind it, "BYE" included; the relay ends once both parties said it.
async fn relay_symmetric(
    legs: [DatagramSocket; 2],
    parties: [SocketAddr; 2],
) -> Result<[LegReport; 2]> {
    for leg in &legs {
        leg.control().set_traffic_class(Some(audio()?))?;
    }
    let group = DatagramGroup::new(legs.into());
    let mut forwarded = [0u64; 2];
    let mut byes = 0;
    let mut batch = Vec::new();
    while byes < 2 {
        group.recv_batch(&mut batch, 64).await?;
        for (leg, datagram) in batch.drain(..) {
            let other = 1 - leg;
            if is_bye(datagram.data()) {
                byes += 1;
            } else {
                forwarded[leg] += 1;
            }
            group
                .socket(other)
                .post_to_addr(datagram.into_forward(), parties[leg])
                .map_err(|(err, _)| err)?;
        }
    }
    let mut reports = [(0, PostStats::default()); 2];
    for (leg, report) in reports.iter_mut().enumerate() {
        let sends_from = group.socket(1 - leg);
        sends_from.settle_posts().await?;
        *report = (forwarded[leg], sends_from.post_stats());
    }
    Ok(reports)
}
