//! Sockets in and out of a runtime: std conversions, detaching on one thread and
//! adopting on another while traffic flows, handing a socket to another process and
//! back over SCM_RIGHTS, and socket activation.

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

use ringsock::net::{recv_detached, send_detached, Detached, SocketKind};
use ringsock::runtime::{Builder, Pool};
use ringsock::{Backend, DatagramSocket, SocketErrorStatus, StreamSocket, StreamSocketListener};

use util::{must, BACKENDS};

/// Bytes of the stream a writer sends: byte `i` is `i * 7 mod 251`, so a lost, repeated
/// or misplaced byte shows.
fn stream_byte(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

/// A std peer that writes `total` bytes of the stream, then reads until end of stream.
fn streaming_peer(listener: TcpListener, total: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let data: Vec<u8> = (0..total).map(stream_byte).collect();
        stream.write_all(&data).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    })
}

/// Reads `n` bytes and checks they are the stream from byte `at`.
async fn read_stream(socket: &StreamSocket, at: usize, n: usize) {
    let got = must("read the stream", util::read_exact(socket, n)).await;
    for (i, byte) in got.iter().enumerate() {
        assert_eq!(*byte, stream_byte(at + i), "byte {} of the stream", at + i);
    }
}

fn pool(backend: Backend) -> Option<Pool> {
    util::build_or_skip(Builder::new().backend(backend), backend)?;
    Some(
        Pool::builder()
            .threads(2)
            .pin_threads(false)
            .runtime(Builder::new().backend(backend))
            .build()
            .unwrap(),
    )
}

/// A connection read on thread 0, detached mid-stream, adopted on thread 1, read to the
/// end there: every byte exactly once, in order.
#[test]
fn a_stream_detached_on_one_thread_is_adopted_on_another_byte_exact() {
    const TOTAL: usize = 4 << 20;
    const FIRST: usize = 1 << 20;
    for backend in BACKENDS {
        let Some(pool) = pool(backend) else {
            continue;
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = streaming_peer(listener, TOTAL);
        let handle = pool.handle();
        let detached = handle
            .spawn_on(0, move || async move {
                let socket = StreamSocket::new();
                socket.connect_addr(addr).await.unwrap();
                read_stream(&socket, 0, FIRST).await;
                let detached = socket.detach().await.unwrap();
                // The spent handle says so instead of reading.
                let (read, _) = socket.read(Vec::with_capacity(8)).await;
                assert!(read.is_err(), "a detached socket still reads");
                detached
            })
            .unwrap();
        let detached: Detached = ringsock::block_on(detached).unwrap();
        assert_eq!(detached.kind(), SocketKind::Stream);
        let done = handle
            .spawn_on(1, move || async move {
                let socket = detached.into_stream().unwrap();
                read_stream(&socket, FIRST, TOTAL - FIRST).await;
            })
            .unwrap();
        ringsock::block_on(done).unwrap();
        peer.join().unwrap();
    }
}

/// A listener detached with connections the kernel accepted for it but the program had
/// not taken: the adopting listener hands them out; none is lost or reset.
#[test]
fn a_detached_listener_brings_its_accepted_connections_along() {
    const CLIENTS: usize = 8;
    for backend in BACKENDS {
        let Some(a) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let (detached, clients, first) = a.block_on(async {
            let listener = util::loopback_listener();
            let addr = listener.local_addr().unwrap();
            let clients: Vec<TcpStream> = (0..CLIENTS)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            // Take one, so the accept is armed and may gather others meanwhile.
            let first = must("first accept", listener.accept()).await.unwrap();
            for _ in 0..4 {
                util::yield_now().await;
            }
            (listener.detach().unwrap(), clients, first)
        });
        assert_eq!(detached.kind(), SocketKind::Listener);
        drop(first);
        drop(a);
        let Some(b) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        b.block_on(async {
            let listener = detached.into_listener().unwrap();
            for _ in 1..CLIENTS {
                let socket = must("accept after adopting", listener.accept())
                    .await
                    .unwrap();
                socket.write_all(b"hi".to_vec()).await.0.unwrap();
            }
        });
        // Every client but the first got its greeting: none was reset.
        for (i, mut client) in clients.into_iter().enumerate().skip(1) {
            client.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
            let mut hi = [0u8; 2];
            read_retrying(&mut client, &mut hi)
                .unwrap_or_else(|e| panic!("{backend} client {i}: {e}"));
            assert_eq!(&hi, b"hi");
        }
    }
}

/// `read_exact` that tries again after EINTR (a thread that has used io_uring may see a
/// blocking call with a timeout end early).
fn read_retrying(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match stream.read(&mut buf[at..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

#[test]
fn std_sockets_come_in_and_go_out() {
    for backend in BACKENDS {
        util::on_backend(backend, &|_| async {
            let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = std_listener.local_addr().unwrap();
            let listener = StreamSocketListener::from_std(std_listener).unwrap();
            assert_eq!(listener.local_addr().unwrap(), addr);
            let client = StreamSocket::from_std(TcpStream::connect(addr).unwrap()).unwrap();
            assert!(client.as_raw_fd() >= 0);
            let server = must("accept", listener.accept()).await.unwrap();
            client.write_all(b"ping".to_vec()).await.0.unwrap();
            assert_eq!(util::read_exact(&server, 4).await, b"ping");
            let mut std_server = server.into_std().await.unwrap();
            client.write_all(b"pong".to_vec()).await.0.unwrap();
            let mut pong = [0u8; 4];
            read_retrying(&mut std_server, &mut pong).unwrap();
            assert_eq!(&pong, b"pong");
            let std_listener = listener.into_std().unwrap();
            assert_eq!(std_listener.local_addr().unwrap(), addr);
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let udp_addr = udp.local_addr().unwrap();
            let udp = DatagramSocket::from_std(udp).unwrap();
            udp.send_to_addr(b"self".to_vec(), udp_addr)
                .await
                .0
                .unwrap();
            assert_eq!(must("recv", udp.recv()).await.unwrap().data(), b"self");
            // A descriptor that is no socket of ours is refused with a clear error.
            let file = std::fs::File::open("/dev/null").unwrap();
            let err = Detached::from_fd(OwnedFd::from(file)).unwrap_err();
            assert_ne!(err.status(), SocketErrorStatus::Unknown, "{err}");
        });
    }
}

/// Detaching a socket that was never connected is a clear error (TLS streams are
/// refused too: see tests/tls.rs).
#[test]
fn an_unconnected_stream_cannot_be_detached() {
    for backend in BACKENDS {
        util::on_backend(backend, &|_| async {
            let socket = StreamSocket::new();
            let err = socket.detach().await.unwrap_err();
            assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        });
    }
}

const CHILD_ENV: &str = "RINGSOCK_HANDOFF_CHILD";

/// The child side of the broker test: takes the socket over the inherited channel,
/// reads its share of the stream, and hands it back.
fn broker_child(channel: UnixStream, backend: Backend) {
    let runtime = Builder::new().backend(backend).build().unwrap();
    runtime.block_on(async {
        let detached = recv_detached(&channel).unwrap();
        let socket = detached.into_stream().unwrap();
        read_stream(&socket, 1 << 20, 1 << 20).await;
        send_detached(&channel, socket.detach().await.unwrap()).unwrap();
    });
}

/// A connection handed to a child process and back over SCM_RIGHTS while the peer keeps
/// streaming: parent, child, parent read consecutive parts, byte-exact.
#[test]
fn a_stream_goes_to_another_process_and_comes_back_byte_exact() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        let (fd, backend) = spec.split_once(':').unwrap();
        // SAFETY: the parent passed this descriptor to this process for this test.
        let channel = unsafe { UnixStream::from_raw_fd(fd.parse().unwrap()) };
        broker_child(channel, backend.parse().unwrap());
        return;
    }
    const TOTAL: usize = 3 << 20;
    for backend in BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = streaming_peer(listener, TOTAL);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let theirs_fd = theirs.as_raw_fd();
        let mut child = unsafe_inheriting(
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "a_stream_goes_to_another_process_and_comes_back_byte_exact",
                ])
                .env(CHILD_ENV, format!("{theirs_fd}:{backend}")),
            theirs_fd,
        )
        .spawn()
        .unwrap();
        drop(theirs);
        runtime.block_on(async {
            let socket = StreamSocket::new();
            socket.connect_addr(addr).await.unwrap();
            read_stream(&socket, 0, 1 << 20).await;
            send_detached(&ours, socket.detach().await.unwrap()).unwrap();
            let back = recv_detached(&ours).unwrap().into_stream().unwrap();
            read_stream(&back, 2 << 20, TOTAL - (2 << 20)).await;
        });
        assert!(
            child.wait().unwrap().success(),
            "{backend}: the child failed"
        );
        peer.join().unwrap();
    }
}

/// Lets the child inherit `fd` (it stays where it is; close-on-exec is cleared in the
/// child only).
fn unsafe_inheriting(command: &mut Command, fd: i32) -> &mut Command {
    // SAFETY: fcntl is async-signal-safe, as a pre_exec hook must be.
    unsafe {
        command.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The activated child: takes descriptors 3 and 4 as a launcher passes them, serves one
/// TCP connection and one datagram on them.
fn activated_child(backend: Backend) {
    let sockets = ringsock::net::activated_sockets().unwrap();
    assert_eq!(sockets.len(), 2);
    assert_eq!(sockets[0].name.as_deref(), Some("web"));
    assert_eq!(sockets[1].name.as_deref(), Some("dns"));
    assert!(
        ringsock::net::activated_sockets().unwrap().is_empty(),
        "taken twice"
    );
    let mut sockets = sockets.into_iter();
    let web = sockets.next().unwrap().socket;
    let dns = sockets.next().unwrap().socket;
    assert_eq!(web.kind(), SocketKind::Listener);
    assert_eq!(dns.kind(), SocketKind::Datagram);
    let runtime = Builder::new().backend(backend).build().unwrap();
    runtime.block_on(async {
        let listener = web.into_listener().unwrap();
        let udp = dns.into_datagram().unwrap();
        let socket = listener.accept().await.unwrap();
        let line = util::read_exact(&socket, 5).await;
        socket.write_all(line).await.0.unwrap();
        let datagram = udp.recv().await.unwrap();
        udp.send_to_addr(datagram.data().to_vec(), datagram.remote_addr())
            .await
            .0
            .unwrap();
    });
}

/// Socket activation by its contract: a launcher puts a listener on descriptor 3 and a
/// UDP socket on 4, sets LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (the child's own pid,
/// which only the child knows: `sh` sets it to `$$` before `exec`).
#[test]
fn activated_sockets_are_served_on_descriptors_3_and_4() {
    if let Ok(backend) = std::env::var("RINGSOCK_ACTIVATED_CHILD") {
        activated_child(backend.parse().unwrap());
        return;
    }
    for backend in BACKENDS {
        if util::build_or_skip(Builder::new().backend(backend), backend).is_none() {
            continue;
        }
        let web = TcpListener::bind("127.0.0.1:0").unwrap();
        let dns = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (web_addr, dns_addr) = (web.local_addr().unwrap(), dns.local_addr().unwrap());
        let (web_fd, dns_fd) = (web.as_raw_fd(), dns.as_raw_fd());
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                "LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=web:dns exec \"$0\" \"$@\"",
            ])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "activated_sockets_are_served_on_descriptors_3_and_4",
            ])
            .env("RINGSOCK_ACTIVATED_CHILD", backend.to_string());
        // SAFETY: dup2 and fcntl are async-signal-safe, as a pre_exec hook must be.
        unsafe {
            command.pre_exec(move || {
                // Through spare numbers first, in case the sources sit on 3 or 4.
                let (a, b) = (libc::dup(web_fd), libc::dup(dns_fd));
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        drop((web, dns));
        let mut client = TcpStream::connect(web_addr).unwrap();
        client.write_all(b"hello").unwrap();
        client.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
        let mut echo = [0u8; 5];
        read_retrying(&mut client, &mut echo).unwrap();
        assert_eq!(&echo, b"hello", "{backend}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
        udp.send_to(b"query", dns_addr).unwrap();
        let mut reply = [0u8; 5];
        let n = loop {
            match udp.recv(&mut reply) {
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other.unwrap(),
            }
        };
        assert_eq!(&reply[..n], b"query", "{backend}");
        assert!(
            child.wait().unwrap().success(),
            "{backend}: the child failed"
        );
    }
}

/// Datagram `i` of the carry test: its number, then bytes that depend on it.
fn numbered_datagram(i: usize) -> Vec<u8> {
    let mut datagram = (i as u32).to_le_bytes().to_vec();
    datagram.extend((0..100 + i * 13).map(|j| (i * 31 + j) as u8));
    datagram
}

/// Receives `count` datagrams starting at number `first` and checks each whole and in
/// order, from the expected sender.
async fn receive_numbered(
    socket: &DatagramSocket,
    first: usize,
    count: usize,
    from: std::net::SocketAddr,
) {
    for i in first..first + count {
        let datagram = must("a carried datagram", socket.recv()).await.unwrap();
        assert_eq!(datagram.data(), &numbered_datagram(i)[..], "datagram {i}");
        assert_eq!(datagram.remote_addr(), from, "datagram {i}");
        assert!(!datagram.is_truncated());
    }
}

/// Datagrams already in a socket's receive ring when it detaches go along with it: to
/// another runtime, and through the broker's channel (as to another process), every one
/// whole and in order, none lost.
#[test]
fn datagrams_in_the_receive_ring_go_along_when_the_socket_moves() {
    const TOTAL: usize = 24;
    for backend in BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = sender.local_addr().unwrap();
        let detached = runtime.block_on(async {
            let socket = DatagramSocket::new();
            socket.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
            let to = socket.local_addr().unwrap();
            for i in 0..TOTAL {
                sender.send_to(&numbered_datagram(i), to).unwrap();
            }
            // The first receive sets up the ring, which takes in what is queued.
            receive_numbered(&socket, 0, 1, from).await;
            socket.detach().unwrap()
        });
        assert!(
            detached.carried_datagrams() > 0,
            "{backend}: the ring held none of the queued datagrams"
        );
        // To a runtime on another thread: it takes a few, then hands the socket on.
        let detached = std::thread::spawn(move || {
            let runtime = Builder::new().backend(backend).build().unwrap();
            runtime.block_on(async {
                let socket = detached.into_datagram().unwrap();
                receive_numbered(&socket, 1, 5, from).await;
                socket.detach().unwrap()
            })
        })
        .join()
        .unwrap();
        // Through the broker's channel, as to another process, and the rest there.
        let (ours, theirs) = UnixStream::pair().unwrap();
        send_detached(&ours, detached).unwrap();
        let taken = recv_detached(&theirs).unwrap();
        runtime.block_on(async {
            let socket = taken.into_datagram().unwrap();
            receive_numbered(&socket, 6, TOTAL - 6, from).await;
        });
    }
}
