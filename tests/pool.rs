//! Thread-per-core: a pool of runtimes, tasks started on chosen threads or any, sharded
//! listeners and datagram sockets spreading connections and flows over the threads.

mod util;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};

use ringsock::runtime::{Builder, Pool};
use ringsock::{Backend, DatagramSocket, SocketErrorStatus, StreamSocketListener};

use util::BACKENDS;

fn pool(backend: Backend, threads: usize, pin: bool) -> Option<Pool> {
    util::build_or_skip(Builder::new().backend(backend), backend)?;
    Some(
        Pool::builder()
            .threads(threads)
            .pin_threads(pin)
            .runtime(Builder::new().backend(backend))
            .build()
            .expect("pool"),
    )
}

#[test]
fn tasks_run_on_the_thread_asked_for_or_any() {
    for backend in BACKENDS {
        let Some(pool) = pool(backend, 3, false) else {
            continue;
        };
        let handle = pool.handle();
        let names = handle
            .spawn_on_each(|thread| async move {
                let name = std::thread::current().name().unwrap_or_default().to_owned();
                (thread, name, ringsock::runtime::current_driver_kind())
            })
            .unwrap();
        let any: Vec<_> = (0..6)
            .map(|i| handle.spawn(move || async move { i * 2 }).unwrap())
            .collect();
        let bad = handle.spawn_on(3, || async {}).unwrap_err();
        assert_eq!(bad.status(), SocketErrorStatus::InvalidArgument);
        ringsock::block_on(async {
            for (expected, name) in names.into_iter().enumerate() {
                let (thread, name, kind) = util::must("pool task", name).await.unwrap();
                assert_eq!(thread, expected);
                assert_eq!(name, format!("ringsock-{expected}"));
                assert_eq!(
                    kind.map(|k| k.to_string()),
                    Some(match backend {
                        Backend::Epoll => "epoll".into(),
                        _ => "io_uring".into(),
                    })
                );
            }
            for (i, answer) in any.into_iter().enumerate() {
                assert_eq!(util::must("any thread", answer).await.unwrap(), i * 2);
            }
        });
        // A task still running when the pool goes ends its handle's wait.
        let forever = handle.spawn_on(0, std::future::pending::<()>).unwrap();
        drop(pool);
        let ended = ringsock::block_on(forever).unwrap_err();
        assert_eq!(ended.status(), SocketErrorStatus::OperationAborted);
        assert!(
            handle.spawn(|| async {}).is_err(),
            "a stopped pool takes no work"
        );
    }
}

/// Connections to a sharded listener spread over the threads, each thread serving
/// what its own listener accepts; every connection is served exactly once.
#[test]
fn a_sharded_listener_spreads_connections_over_the_threads() {
    const CONNECTIONS: usize = 64;
    for backend in BACKENDS {
        for pin in [false, true] {
            if pin && std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
                continue;
            }
            let Some(pool) = pool(backend, 2, pin) else {
                continue;
            };
            let ringsock::net::Sharded { addr, servers } = StreamSocketListener::bind_sharded(
                "127.0.0.1:0".parse().unwrap(),
                &pool.handle(),
                |thread, listener| async move {
                    // Serves until the test's last connection says "done".
                    let mut served = 0usize;
                    loop {
                        let socket = listener.accept().await.unwrap();
                        let got = util::read_exact(&socket, 1).await;
                        if got == b"q" {
                            return (thread, served);
                        }
                        socket.write_all(vec![thread as u8]).await.0.unwrap();
                        served += 1;
                    }
                },
            )
            .unwrap();
            // Clients on every CPU, so CPU routing has both CPUs to route from.
            let clients: Vec<_> = (0..2)
                .map(|client| {
                    std::thread::spawn(move || {
                        pin_to(client);
                        (0..CONNECTIONS / 2)
                            .map(|_| {
                                let mut stream = TcpStream::connect(addr).unwrap();
                                stream.write_all(b"x").unwrap();
                                let mut thread = [0u8; 1];
                                stream.read_exact(&mut thread).unwrap();
                                thread[0] as usize
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut per_thread = [0usize; 2];
            for client in clients {
                for thread in client.join().unwrap() {
                    per_thread[thread] += 1;
                }
            }
            assert_eq!(per_thread.iter().sum::<usize>(), CONNECTIONS);
            assert!(
                per_thread.iter().all(|&n| n > 0),
                "{backend} pin={pin}: every connection went to one thread: {per_thread:?}"
            );
            // Stop each thread: "q" on fresh connections until every server has ended
            // (a stopped thread's listener leaves the group, so the next go elsewhere).
            let results = stop_all(servers, || {
                if let Ok(mut stream) = TcpStream::connect(addr) {
                    let _ = stream.write_all(b"q");
                }
            });
            let served: usize = results.into_iter().map(|(_, served)| served).sum();
            assert_eq!(served, CONNECTIONS, "{backend} pin={pin}");
        }
    }
}

/// Datagrams of many flows to sharded datagram sockets: each flow stays on one thread,
/// and both threads get flows.
#[test]
fn sharded_datagram_sockets_keep_each_flow_on_one_thread() {
    const FLOWS: usize = 64;
    const PER_FLOW: usize = 8;
    for backend in BACKENDS {
        let Some(pool) = pool(backend, 2, false) else {
            continue;
        };
        let ringsock::net::Sharded { addr, servers } = DatagramSocket::bind_sharded(
            "127.0.0.1:0".parse().unwrap(),
            &pool.handle(),
            |thread, socket| async move {
                // Echoes each datagram with the thread's number until "stop".
                loop {
                    let datagram = socket.recv().await.unwrap();
                    if datagram.data() == b"stop" {
                        return;
                    }
                    let mut reply = datagram.data().to_vec();
                    reply.push(thread as u8);
                    socket
                        .send_to_addr(reply, datagram.remote_addr())
                        .await
                        .0
                        .unwrap();
                }
            },
        )
        .unwrap();
        let mut threads_of_flow: HashMap<SocketAddr, HashSet<u8>> = HashMap::new();
        for _ in 0..FLOWS {
            let flow = UdpSocket::bind("127.0.0.1:0").unwrap();
            flow.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
            for seq in 0..PER_FLOW as u8 {
                flow.send_to(&[seq], addr).unwrap();
                let mut reply = [0u8; 2];
                // A thread that has used io_uring may see a blocking call with a timeout
                // end early with EINTR (the kernel's task work): try again.
                let n = loop {
                    match flow.recv(&mut reply) {
                        Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                        other => break other.unwrap(),
                    }
                };
                assert_eq!(n, 2);
                assert_eq!(reply[0], seq);
                threads_of_flow
                    .entry(flow.local_addr().unwrap())
                    .or_default()
                    .insert(reply[1]);
            }
        }
        assert!(
            threads_of_flow.values().all(|threads| threads.len() == 1),
            "{backend}: a flow moved between threads"
        );
        let used: HashSet<u8> = threads_of_flow.values().flatten().copied().collect();
        assert_eq!(used.len(), 2, "{backend}: every flow went to one thread");
        // Stop both: "stop" from fresh flows until both servers have ended.
        stop_all(servers, || {
            let flow = UdpSocket::bind("127.0.0.1:0").unwrap();
            flow.send_to(b"stop", addr).unwrap();
        });
    }
}

/// Calls `stop` until every server has ended (each ends on a stop message that reaches
/// it); their outputs in order. Fails after MUST_HAPPEN.
fn stop_all<T: Send + 'static>(
    servers: Vec<ringsock::runtime::RemoteJoinHandle<ringsock::Result<T>>>,
    stop: impl Fn(),
) -> Vec<T> {
    let deadline = std::time::Instant::now() + util::MUST_HAPPEN;
    ringsock::block_on(async {
        let mut servers: Vec<_> = servers.into_iter().map(|s| (Box::pin(s), None)).collect();
        while servers.iter().any(|(_, done)| done.is_none()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the servers did not stop"
            );
            stop();
            util::yield_now().await;
            for (server, done) in servers.iter_mut().filter(|(_, done)| done.is_none()) {
                if let std::task::Poll::Ready(result) = util::poll_once(server.as_mut()).await {
                    *done = Some(result.unwrap().unwrap());
                }
            }
        }
        servers.into_iter().filter_map(|(_, done)| done).collect()
    })
}

/// Pins the calling thread to the `index`-th CPU this process may use, if there is one.
fn pin_to(index: usize) {
    // SAFETY: cpu_set_t is plain old data; zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of(cpu_set_t) bytes into `set`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return;
    }
    // SAFETY: indices below CPU_SETSIZE are inside the set.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    let Some(&cpu) = cpus.get(index) else {
        return;
    };
    // SAFETY: cpu_set_t is plain old data; zero is the empty set.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: passes a live cpu_set_t and its size; 0 is this thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) };
}
