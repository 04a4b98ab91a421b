//! `ringsock tunnel --threads N`: one member of a [`TunnelGroup`] on each thread of a
//! pool, each with its own TUN queue and socket, until SIGINT or SIGTERM.

use std::future::{poll_fn, Future};
use std::io::Write;
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Poll, Waker};

use ringsock::runtime::{Builder, Pool, RemoteJoinHandle};
use ringsock::tun::{TunDevice, TunOffloads, TunOptions};
use ringsock::tunnel::{TunnelConfig, TunnelGroup, TunnelStats};

use super::{
    announce_parts, print_stats, run_telling_send_errors, set_up, until_stopped, FoundAs,
    StopSignal, TunnelArgs,
};

/// What each thread's member of the tunnel gives back: how it ended, and its counters.
type MemberEnd = (ringsock::Result<()>, TunnelStats);

/// The tunnel on `--threads` pool threads: thread 0 creates the interface (multi-queue)
/// and binds the address, then each other thread in turn attaches its own queue and
/// joins the address with SO_REUSEPORT; all share one session.
pub(super) fn run(
    args: &TunnelArgs,
    options: TunOptions,
    config: TunnelConfig,
    stop: &StopSignal,
) -> ringsock::Result<()> {
    let threads = args.threads as usize;
    let mut builder = Builder::new();
    if let Some(backend) = args.backend.backend {
        builder = builder.backend(backend);
    }
    let pool = Pool::builder()
        .threads(threads)
        .runtime(builder.clone())
        .build()?;
    let handle = pool.handle();
    let group = TunnelGroup::new(config);
    let halt = Halt::new(threads);
    let mut members: Vec<Option<RemoteJoinHandle<MemberEnd>>> = Vec::with_capacity(threads);
    let mut info: Option<TunDeviceInfo> = None;
    let mut ready_members = 0;
    // The interface thread 0 opened: a template such as vpn%d would make each thread
    // an interface of its own, the others down, and what they read of the peer lost.
    let mut opened = args.tun.clone();
    // Every queue opens the interface as it is; thread 0 sets its MTU and state once it
    // has its socket (a port in use leaves an interface that was there untouched), and
    // gives one it did not create its MTU and state back when it stops.
    let untouched = TunOptions {
        mtu: None,
        up: false,
        ..options
    };
    for thread in 0..threads {
        let (ready, is_ready) = mpsc::channel();
        let (group, halt, name) = (group.clone(), halt.clone(), opened.clone());
        let member = handle.spawn_on(thread, move || async move {
            let joined = TunDevice::create(&name, untouched).and_then(|tun| {
                let found = FoundAs::of(&tun);
                group.join(tun).map(|tunnel| (tunnel, found))
            });
            let (tunnel, found) = match joined {
                Ok(joined) => joined,
                Err(err) => return (Err(err), TunnelStats::default()),
            };
            let result = async {
                if thread == 0 {
                    set_up(tunnel.device(), options)?;
                }
                let device = tunnel.device();
                let _ = ready.send((device.name().to_owned(), device.offloads()));
                drop(ready);
                let whose = format!(" of thread {thread}");
                until_stopped(run_telling_send_errors(&tunnel, &whose), halt.wait(thread)).await
            }
            .await;
            if thread == 0 {
                found.restore(tunnel.device());
            }
            (result, tunnel.stats())
        })?;
        members.push(Some(member));
        match is_ready.recv() {
            Ok(device) => {
                opened.clone_from(&device.0);
                info = info.or(Some(device));
                ready_members += 1;
            }
            // The member ended before it was ready: its error says why.
            Err(_) => break,
        }
    }
    let started = ready_members == threads;
    if let (true, Some((name, offloads)), Some(addr)) = (started, &info, group.local_addr()) {
        announce_parts(name, *offloads, addr);
    }
    // This thread only waits: for the signal, or for a member that fails.
    let ends = builder.build()?.block_on(async {
        let mut ends: Vec<Option<MemberEnd>> = (0..members.len()).map(|_| None).collect();
        if started {
            // Until the signal, or until a member ends by itself (it failed).
            let mut stop = std::pin::pin!(stop.wait());
            poll_fn(|cx| {
                let mut ended = false;
                for (member, end) in members.iter_mut().zip(ends.iter_mut()) {
                    if let Some(handle) = member {
                        if let Poll::Ready(output) = Pin::new(handle).poll(cx) {
                            *end = Some(member_end(output));
                            *member = None;
                            ended = true;
                        }
                    }
                }
                if ended {
                    return Poll::Ready(());
                }
                stop.as_mut().poll(cx)
            })
            .await;
        }
        halt.fire();
        for (member, end) in members.iter_mut().zip(ends.iter_mut()) {
            if let Some(handle) = member.take() {
                *end = Some(member_end(handle.await));
            }
        }
        ends
    });
    let mut result = Ok(());
    let mut stats = TunnelStats::default();
    for (thread, (end, member_stats)) in ends.into_iter().flatten().enumerate() {
        if started {
            let _ = writeln!(
                std::io::stderr(),
                "note: thread {thread}: {} packets sealed, {} opened, {} replays dropped",
                member_stats.tx_packets,
                member_stats.rx_packets,
                member_stats.rx_replayed
            );
        }
        stats = stats.sum(&member_stats);
        if result.is_ok() {
            result = end;
        }
    }
    if started {
        print_stats(&stats);
    }
    // Stops the threads and closes every queue: an interface thread 0 created goes.
    drop(pool);
    result
}

/// The device's name and offloads, as thread 0's member reports them.
type TunDeviceInfo = (String, TunOffloads);

fn member_end(output: ringsock::Result<MemberEnd>) -> MemberEnd {
    output.unwrap_or_else(|err| (Err(err), TunnelStats::default()))
}

/// Stops every thread's member: each waits on its own slot, so one call wakes them all.
#[derive(Clone)]
struct Halt {
    state: Arc<Mutex<(bool, Vec<Option<Waker>>)>>,
}

impl Halt {
    fn new(threads: usize) -> Halt {
        Halt {
            state: Arc::new(Mutex::new((false, vec![None; threads]))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, Vec<Option<Waker>>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fire(&self) {
        let wakers = {
            let mut state = self.lock();
            state.0 = true;
            std::mem::take(&mut state.1)
        };
        for waker in wakers.into_iter().flatten() {
            waker.wake();
        }
    }

    async fn wait(&self, thread: usize) {
        poll_fn(|cx| {
            let mut state = self.lock();
            if state.0 {
                return Poll::Ready(());
            }
            if let Some(slot) = state.1.get_mut(thread) {
                *slot = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}
