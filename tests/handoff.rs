//! Sockets in and out of a runtime: std conversions, detaching on one thread and
//! adopting on another while traffic flows, handing a socket to another process and
//! back over SCM_RIGHTS, and socket activation.

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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
        send_detached(&channel, &socket.detach().await.unwrap()).unwrap();
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
            send_detached(&ours, &socket.detach().await.unwrap()).unwrap();
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

/// A datagram socket bound to a port of 127.0.0.1 the kernel chose, and its address.
fn loopback_datagram_socket() -> (DatagramSocket, std::net::SocketAddr) {
    let socket = DatagramSocket::new();
    socket.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
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
            let (socket, to) = loopback_datagram_socket();
            for i in 0..TOTAL {
                sender.send_to(&numbered_datagram(i), to).unwrap();
            }
            // The first receive sets up the ring, which takes in what is queued.
            receive_numbered(&socket, 0, 1, from).await;
            let detached = socket.detach().unwrap();
            // The handle left behind says what it is: detached, not a ring that failed.
            let err = socket.recv().await.unwrap_err();
            assert_eq!(
                err.status(),
                SocketErrorStatus::UnsupportedOperation,
                "{err}"
            );
            assert!(
                err.to_string().contains("detached") && !err.to_string().contains("ring"),
                "{err}"
            );
            detached
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
        send_detached(&ours, &detached).unwrap();
        let taken = recv_detached(&theirs).unwrap();
        runtime.block_on(async {
            let socket = taken.into_datagram().unwrap();
            receive_numbered(&socket, 6, TOTAL - 6, from).await;
        });
    }
}

/// The header of a hand-over message as `send_detached` writes it: magic, kind code,
/// count of accepted connections (little endian).
fn hand_over_header(kind: u8, accepted: u32) -> Vec<u8> {
    let mut header = b"RSK1".to_vec();
    header.push(kind);
    header.extend_from_slice(&accepted.to_le_bytes());
    header
}

/// Sends `data` with `fds` attached (SCM_RIGHTS) in one message, as a hostile peer of
/// the broker's channel would, whatever the descriptors are.
fn send_raw(channel: &UnixStream, data: &[u8], fds: &[RawFd]) {
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; zero is its empty value.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = space;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, room for one header
        // and `fds`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    // SAFETY: the header points at the live iovec, data and control buffer above.
    let sent = unsafe { libc::sendmsg(channel.as_raw_fd(), &header, libc::MSG_NOSIGNAL) };
    assert_eq!(
        sent,
        data.len() as isize,
        "sendmsg: {}",
        std::io::Error::last_os_error()
    );
}

/// A hostile message for the broker's channel: its bytes, the descriptors it carries
/// (made when it is sent), and the status its receiver must fail with.
struct Hostile {
    what: &'static str,
    message: Vec<u8>,
    fds: fn() -> Vec<OwnedFd>,
    status: SocketErrorStatus,
}

impl Hostile {
    fn send(&self, channel: &UnixStream) {
        let fds = (self.fds)();
        let raws: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        send_raw(channel, &self.message, &raws);
    }
}

/// A datagram socket's hand-over whose datagram section holds `count`, then `entry`.
fn datagram_hand_over(count: u32, entry: &[u8]) -> Vec<u8> {
    let mut message = hand_over_header(3, 0);
    message.extend_from_slice(&count.to_le_bytes());
    message.extend_from_slice(entry);
    message
}

/// A stream's hand-over that announces `len` carried bytes and sends `bytes`.
fn stream_with_bytes(len: u32, bytes: &[u8]) -> Vec<u8> {
    let mut message = hand_over_header(4, 0);
    message.extend_from_slice(&len.to_le_bytes());
    message.extend_from_slice(bytes);
    message
}

/// One datagram of a datagram section, with no addresses, whose payload length field is
/// `len`, followed by `payload`.
fn carried_entry(len: u32, payload: &[u8]) -> Vec<u8> {
    let mut entry = vec![0]; // no sender
    entry.extend_from_slice(&0u16.to_le_bytes()); // port
    entry.push(0); // truncated
    entry.extend_from_slice(&len.to_le_bytes()); // original length
    entry.push(0); // no destination
    entry.extend_from_slice(&u16::MAX.to_le_bytes()); // no tos
    entry.extend_from_slice(&0u32.to_le_bytes()); // interface
    entry.extend_from_slice(&0u64.to_le_bytes()); // timestamp
    entry.extend_from_slice(&0u16.to_le_bytes()); // gro segment
    entry.extend_from_slice(&len.to_le_bytes());
    entry.extend_from_slice(payload);
    entry
}

fn udp_fd() -> OwnedFd {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into()
}

fn listener_fd() -> OwnedFd {
    TcpListener::bind("127.0.0.1:0").unwrap().into()
}

/// A pipe's (reading, writing) ends.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array it is given.
    let rc = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: just made, owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) }
}

/// One end of a TCP connection on loopback (the other end, closed, sent a FIN).
fn connection_fd() -> OwnedFd {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    drop(listener.accept().unwrap());
    client.into()
}

fn pipe_fd() -> OwnedFd {
    pipe().0
}

/// A UDP-Lite socket, or where the kernel has none a pipe (just as wrong a datagram
/// socket).
fn udp_lite_fd() -> OwnedFd {
    const IPPROTO_UDPLITE: i32 = 136;
    let protocol = Some(socket2::Protocol::from(IPPROTO_UDPLITE));
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, protocol)
        .map_or_else(|_| pipe_fd(), OwnedFd::from)
}

fn epoll_fd() -> OwnedFd {
    // SAFETY: epoll_create1 returns a new descriptor or -1.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        raw >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: just made, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Every way a peer of the broker's channel can lie, each answered with a clear error.
/// (An io_uring descriptor is not among them: the kernel refuses to send one.)
fn hostile_messages() -> Vec<Hostile> {
    use SocketErrorStatus::{ConnectionClosed, InvalidArgument};
    const STREAM: u8 = 1;
    const LISTENER: u8 = 2;
    const DATAGRAM: u8 = 3;
    let hostile = |what, message, fds, status| Hostile {
        what,
        message,
        fds,
        status,
    };
    let stream = hand_over_header(STREAM, 0);
    let one_accepted = hand_over_header(LISTENER, 1);
    vec![
        hostile(
            "a header without a descriptor",
            stream.clone(),
            Vec::new,
            ConnectionClosed,
        ),
        hostile(
            "two descriptors for one socket",
            hand_over_header(DATAGRAM, 0),
            || vec![udp_fd(), udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "a pipe",
            stream.clone(),
            || vec![pipe_fd()],
            InvalidArgument,
        ),
        hostile(
            "/dev/null",
            stream.clone(),
            || vec![std::fs::File::open("/dev/null").unwrap().into()],
            InvalidArgument,
        ),
        hostile(
            "an O_PATH descriptor",
            stream.clone(),
            || {
                // SAFETY: open with a NUL-terminated path returns a new descriptor or -1.
                let raw = unsafe { libc::open(c"/".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
                assert!(raw >= 0, "open: {}", std::io::Error::last_os_error());
                // SAFETY: just made, owned by nothing else.
                vec![unsafe { OwnedFd::from_raw_fd(raw) }]
            },
            InvalidArgument,
        ),
        hostile(
            "an epoll descriptor",
            stream.clone(),
            || vec![epoll_fd()],
            InvalidArgument,
        ),
        hostile(
            "a UDP socket claimed a TCP connection",
            stream.clone(),
            || vec![udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "a listening socket claimed a connection",
            stream.clone(),
            || vec![listener_fd()],
            InvalidArgument,
        ),
        hostile(
            "a UDP-Lite socket",
            hand_over_header(DATAGRAM, 0),
            || vec![udp_lite_fd()],
            InvalidArgument,
        ),
        hostile(
            "a Unix socket",
            stream.clone(),
            || vec![UnixStream::pair().unwrap().0.into()],
            InvalidArgument,
        ),
        hostile(
            "a connection that claims accepted connections",
            hand_over_header(STREAM, 1),
            || vec![listener_fd(), listener_fd()],
            InvalidArgument,
        ),
        hostile(
            "a truncated header, then the end",
            hand_over_header(LISTENER, 0)[..5].to_vec(),
            || vec![listener_fd()],
            ConnectionClosed,
        ),
        hostile(
            "garbage",
            b"GET / HTTP/1.1\r\n".to_vec(),
            || vec![udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "an unknown kind",
            hand_over_header(9, 0),
            || vec![udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "a listener announcing four billion connections",
            hand_over_header(LISTENER, u32::MAX),
            || vec![listener_fd()],
            InvalidArgument,
        ),
        hostile(
            "a listener whose accepted connection is a pipe",
            one_accepted.clone(),
            || vec![listener_fd(), pipe_fd()],
            InvalidArgument,
        ),
        hostile(
            "a listener whose accepted connection is a UDP socket",
            one_accepted.clone(),
            || vec![listener_fd(), udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "a listener whose accepted connection is a listener",
            one_accepted,
            || vec![listener_fd(), listener_fd()],
            InvalidArgument,
        ),
        hostile(
            "a listener whose connections stop half-way",
            hand_over_header(LISTENER, 300),
            || {
                let listener = listener_fd();
                (0..253).map(|_| listener.try_clone().unwrap()).collect()
            },
            ConnectionClosed,
        ),
        hostile(
            "a stream announcing no carried bytes",
            stream_with_bytes(0, b""),
            || vec![connection_fd()],
            InvalidArgument,
        ),
        hostile(
            "a stream announcing 4 GiB of carried bytes",
            stream_with_bytes(u32::MAX, b""),
            || vec![connection_fd()],
            InvalidArgument,
        ),
        hostile(
            "a stream's carried bytes cut short",
            stream_with_bytes(100, b"abc"),
            || vec![connection_fd()],
            ConnectionClosed,
        ),
        hostile(
            "a datagram socket without its datagrams",
            hand_over_header(DATAGRAM, 0),
            || vec![udp_fd()],
            ConnectionClosed,
        ),
        hostile(
            "four billion datagrams",
            datagram_hand_over(u32::MAX, &[]),
            || vec![udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "a 4 GiB datagram",
            datagram_hand_over(1, &carried_entry(u32::MAX, &[])),
            || vec![udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "a whole datagram longer than its original length",
            datagram_hand_over(1, &{
                let mut entry = carried_entry(3, b"abc");
                entry[4..8].copy_from_slice(&4_294_967_295u32.to_le_bytes());
                entry
            }),
            || vec![udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "a whole datagram longer than its GRO segment size",
            datagram_hand_over(1, &{
                let mut entry = carried_entry(3, b"abc");
                entry[23..25].copy_from_slice(&1u16.to_le_bytes());
                entry
            }),
            || vec![udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "a traffic class over 255",
            datagram_hand_over(1, &{
                let mut entry = carried_entry(3, b"abc");
                entry[9..11].copy_from_slice(&256u16.to_le_bytes());
                entry
            }),
            || vec![udp_fd()],
            InvalidArgument,
        ),
        hostile(
            "a million datagrams announced, one sent",
            datagram_hand_over(1_000_000, &carried_entry(3, b"abc")),
            || vec![udp_fd()],
            ConnectionClosed,
        ),
        hostile(
            "a datagram cut short",
            datagram_hand_over(1, &carried_entry(1000, b"abc")),
            || vec![udp_fd()],
            ConnectionClosed,
        ),
        hostile(
            "a datagram from a bad address",
            datagram_hand_over(1, &[7]),
            || vec![udp_fd()],
            InvalidArgument,
        ),
    ]
}

#[test]
fn hostile_hand_overs_fail_cleanly_and_leak_no_descriptor() {
    util::child::run_alone_on_each_backend("hostile_hand_overs_child");
}

#[test]
#[ignore = "run in a child process by hostile_hand_overs_fail_cleanly_and_leak_no_descriptor"]
fn hostile_hand_overs_child() {
    util::child::run_child("hostile_hand_overs_child", |_| async {
        let before = util::child::open_descriptors();
        for case in hostile_messages() {
            let (ours, theirs) = UnixStream::pair().unwrap();
            case.send(&ours);
            // The peer goes away after its message: an end of stream, never a hang.
            drop(ours);
            let err = recv_detached(&theirs).expect_err(case.what);
            assert_eq!(err.status(), case.status, "{}: {err}", case.what);
            drop(theirs);
            assert_eq!(
                util::child::open_descriptors(),
                before,
                "{}: descriptors left open",
                case.what
            );
        }
        // A message whose descriptors do not all fit in this process is cut off by the
        // kernel (MSG_CTRUNC): refused, and those that arrived closed.
        let (soft, _) = util::nofile_limit();
        let hogs = util::hog_descriptors(8);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        send_raw(&ours, &hand_over_header(2, 252), &[socket.as_raw_fd(); 253]);
        drop((ours, socket));
        let err = recv_detached(&theirs).expect_err("descriptors cut off");
        assert_eq!(err.status(), SocketErrorStatus::TooManyOpenFiles, "{err}");
        drop((hogs, theirs));
        util::set_nofile_soft(soft);
        assert_eq!(util::child::open_descriptors(), before, "MSG_CTRUNC");
    });
}

/// A peer of the broker's channel that sends nothing, or stops half-way, holds
/// `recv_detached` only as long as the channel's read timeout: a clear time-out error.
#[test]
fn a_silent_peer_is_bounded_by_the_channels_read_timeout() {
    util::on_each_backend(|_| async {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        let err = recv_detached(&theirs).expect_err("nothing was sent");
        assert_eq!(err.status(), SocketErrorStatus::ConnectionTimedOut, "{err}");
        // A datagram socket's header, and then nothing of its datagrams.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        send_raw(&ours, &hand_over_header(3, 0), &[socket.as_raw_fd()]);
        let err = recv_detached(&theirs).expect_err("half a message was sent");
        assert_eq!(err.status(), SocketErrorStatus::ConnectionTimedOut, "{err}");
    });
}

/// A spent handle (its socket detached) that is then aborted, closed or dropped leaves
/// the socket alone: the adopting side goes on reading and writing, and ends it cleanly.
#[test]
fn a_spent_handle_aborted_or_closed_leaves_the_moved_connection_alone() {
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        for how in ["abort", "close", "drop"] {
            let (client, mut peer) = util::pair_with_std_peer(&listener).await;
            client
                .control()
                .set_idle_timeout(Some(util::MUST_HAPPEN))
                .unwrap();
            let detached = client.detach().await.unwrap();
            match how {
                "abort" => client.abort(),
                "close" => {
                    let _ = client.close(util::MUST_HAPPEN).await;
                }
                _ => drop(client),
            }
            let moved = detached.into_stream().unwrap();
            let sock = socket2::SockRef::from(&moved);
            assert_eq!(sock.linger().unwrap(), None, "{how}: SO_LINGER was set");
            // Nothing was sent yet: a receive finds nothing, not an end of stream (as it
            // would after a shutdown of the receiving side).
            let got = sock.recv_with_flags(
                &mut [std::mem::MaybeUninit::new(0u8)],
                libc::MSG_DONTWAIT | libc::MSG_PEEK,
            );
            assert_eq!(
                got.map_err(|err| err.kind()),
                Err(std::io::ErrorKind::WouldBlock),
                "{how}: the receiving side was shut down"
            );
            peer.write_all(b"ping").unwrap();
            assert_eq!(util::read_exact(&moved, 4).await, b"ping", "{how}");
            moved.write_all(b"pong".to_vec()).await.0.unwrap();
            peer.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
            let mut pong = [0u8; 4];
            read_retrying(&mut peer, &mut pong).unwrap();
            assert_eq!(&pong, b"pong", "{how}");
            must("close", moved.close(util::MUST_HAPPEN))
                .await
                .unwrap_or_else(|err| panic!("{how}: {err}"));
            assert_eq!(util::std_peer_end(peer).await, (0, None), "{how}");
        }
    });
}

/// A spent handle that lives on holds nothing of the socket: options set through it
/// fail instead of reconfiguring the socket its new owner serves, and the new owner's
/// abort really resets the connection (no descriptor of the spent handle keeps it).
#[test]
fn a_spent_handle_that_lives_on_holds_nothing_of_the_socket() {
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        let (client, peer) = util::pair_with_std_peer(&listener).await;
        let moved = client.detach().await.unwrap().into_stream().unwrap();
        assert!(client.control().set_no_delay(false).is_err());
        assert!(client.control().set_send_buffer_size(4096).is_err());
        let sock = socket2::SockRef::from(&moved);
        assert!(
            sock.nodelay().unwrap(),
            "TCP_NODELAY changed by the spent handle"
        );
        moved.abort();
        let (_, ended) = util::std_peer_end(peer).await;
        assert_eq!(
            ended,
            Some(SocketErrorStatus::ConnectionResetByPeer),
            "the abort of the new owner did not reset the connection"
        );
        drop(client);

        let (udp, _) = loopback_datagram_socket();
        let moved = udp.detach().unwrap().into_datagram().unwrap();
        assert!(udp.control().set_broadcast(true).is_err());
        assert!(!socket2::SockRef::from(&moved).broadcast().unwrap());
    });
}

/// A connection detached on one engine is adopted on the other (also from a thread with
/// no runtime running, bound by its first use), every byte exactly once; the spent
/// handle refuses a second detach.
#[test]
fn a_stream_moves_between_engines_byte_exact() {
    for (from, to) in [
        (Backend::Uring, Backend::Epoll),
        (Backend::Epoll, Backend::Uring),
    ] {
        let Some(a) = util::build_or_skip(Builder::new().backend(from), from) else {
            continue;
        };
        let Some(b) = util::build_or_skip(Builder::new().backend(to), to) else {
            continue;
        };
        let listener = util::std_listener();
        let (detached, mut peer) = a.block_on(async {
            let (client, mut peer) = util::pair_with_std_peer(&listener).await;
            peer.write_all(b"before").unwrap();
            assert_eq!(util::read_exact(&client, 2).await, b"be");
            let detached = client.detach().await.unwrap();
            let again = client.detach().await.expect_err("detached twice");
            assert_eq!(
                again.status(),
                SocketErrorStatus::UnsupportedOperation,
                "{again}"
            );
            (detached, peer)
        });
        // No runtime runs here: it binds to the one that first uses it. A read here
        // says there is none (and binds it to nothing).
        let moved = detached.into_stream().unwrap();
        {
            use std::future::Future;
            let mut read = std::pin::pin!(moved.read(Vec::with_capacity(1)));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match read.as_mut().poll(&mut cx) {
                std::task::Poll::Ready((Err(err), _)) => {
                    assert_eq!(err.status(), SocketErrorStatus::WrongRuntime, "{err}")
                }
                _ => panic!("a read with no runtime running did not fail at once"),
            }
        }
        b.block_on(async {
            assert_eq!(util::read_exact(&moved, 4).await, b"fore", "{from} to {to}");
            moved.write_all(b"after".to_vec()).await.0.unwrap();
        });
        peer.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
        let mut after = [0u8; 5];
        read_retrying(&mut peer, &mut after).unwrap();
        assert_eq!(&after, b"after", "{from} to {to}");
    }
}

/// Blocks SIGPIPE on this thread while `f` runs and says whether `f` raised one (a
/// blocked signal stays pending even though the test harness ignores SIGPIPE), clearing
/// it.
fn raises_sigpipe(f: impl FnOnce()) -> bool {
    // SAFETY: sigset_t is plain old data, filled by sigemptyset before use; the mask
    // calls change this thread's mask only, and it is restored before returning.
    unsafe {
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut old), 0);
        f();
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        let raised = libc::sigismember(&pending, libc::SIGPIPE) == 1;
        if raised {
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::sigtimedwait(&pipe, std::ptr::null_mut(), &zero);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        raised
    }
}

/// Handing a socket over a channel whose peer went away, also in the middle of a
/// datagram socket's datagrams, is an error (BrokenPipe or ConnectionResetByPeer), never
/// a SIGPIPE, which would kill a process that keeps SIGPIPE's default action (a C host,
/// a CLI that restores it); and the socket, with what it carries, is still the sender's.
#[test]
fn handing_over_to_a_peer_that_went_away_fails_and_keeps_the_socket() {
    const BIG: usize = 30_000;
    for backend in BACKENDS {
        let Some(runtime) = util::build_or_skip(Builder::new().backend(backend), backend) else {
            continue;
        };
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let detached = runtime.block_on(async {
            let (socket, to) = loopback_datagram_socket();
            sender.send_to(b"first", to).unwrap();
            for i in 0..3u8 {
                sender.send_to(&[i; BIG], to).unwrap();
            }
            // The first receive sets up the ring, which takes in what is queued.
            let first = must("recv", socket.recv()).await.unwrap();
            assert_eq!(first.data(), b"first");
            socket.detach().unwrap()
        });
        assert!(
            detached.carried_datagrams() > 0,
            "{backend}: the ring held none of the queued datagrams"
        );
        let (ours, theirs) = UnixStream::pair().unwrap();
        // The smallest send buffer: the datagrams do not fit, so the sender is still
        // writing them when the peer goes away.
        socket2::SockRef::from(&ours)
            .set_send_buffer_size(1)
            .unwrap();
        let peer = std::thread::spawn(move || {
            let mut header = [0u8; 9];
            (&theirs).read_exact(&mut header).unwrap();
            drop(theirs);
        });
        let mut result = None;
        let raised = raises_sigpipe(|| result = Some(send_detached(&ours, &detached)));
        peer.join().unwrap();
        let err = result.unwrap().expect_err("the peer went away");
        // A peer that closed with bytes unread resets its end (ECONNRESET) rather than
        // just going (EPIPE): the same to the sender.
        assert!(
            [
                SocketErrorStatus::BrokenPipe,
                SocketErrorStatus::ConnectionResetByPeer
            ]
            .contains(&err.status()),
            "{backend}: {err}"
        );
        assert!(!raised, "{backend}: send_detached raised SIGPIPE");
        // The socket is still the sender's, with what it carries.
        runtime.block_on(async {
            let socket = detached.into_datagram().unwrap();
            let datagram = must("a carried datagram", socket.recv()).await.unwrap();
            assert_eq!(datagram.data(), &[0; BIG][..], "{backend}");
        });
        // And a peer gone before the header.
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let detached = runtime.block_on(async { loopback_datagram_socket().0.detach().unwrap() });
        let mut result = None;
        let raised = raises_sigpipe(|| result = Some(send_detached(&ours, &detached)));
        let err = result.unwrap().expect_err("the peer went away");
        assert_eq!(
            err.status(),
            SocketErrorStatus::BrokenPipe,
            "{backend}: {err}"
        );
        assert!(!raised, "{backend}: send_detached raised SIGPIPE");
        runtime.block_on(async {
            let socket = detached.into_datagram().unwrap();
            let to = socket.local_addr().unwrap();
            socket.send_to_addr(b"kept".to_vec(), to).await.0.unwrap();
            assert_eq!(must("recv", socket.recv()).await.unwrap().data(), b"kept");
        });
    }
}

/// A detach that cannot get a descriptor for the socket (the process has none left)
/// fails with TooManyOpenFiles and leaves the socket where it was, still working; once
/// descriptors are free again it detaches.
#[test]
fn a_detach_without_descriptors_fails_and_keeps_the_socket() {
    util::child::run_alone_on_each_backend("detach_without_descriptors_child");
}

#[test]
#[ignore = "run in a child process by a_detach_without_descriptors_fails_and_keeps_the_socket"]
fn detach_without_descriptors_child() {
    util::child::run_child("detach_without_descriptors_child", |_| async {
        let listener = util::loopback_listener();
        let (client, server) = util::connected_pair(&listener).await;
        ringsock::spawn(util::echo(server));
        util::round_trip(&client, b"before").await;
        let (udp, udp_addr) = loopback_datagram_socket();
        let (soft, _) = util::nofile_limit();
        let hogs = util::hog_descriptors(0);
        for err in [
            client.detach().await.expect_err("no descriptor is free"),
            listener.detach().expect_err("no descriptor is free"),
            udp.detach().expect_err("no descriptor is free"),
        ] {
            assert_eq!(err.status(), SocketErrorStatus::TooManyOpenFiles, "{err}");
        }
        drop(hogs);
        util::set_nofile_soft(soft);
        util::round_trip(&client, b"after").await;
        let (next, _) = util::connected_pair(&listener).await;
        drop(next);
        udp.send_to_addr(b"self".to_vec(), udp_addr)
            .await
            .0
            .unwrap();
        assert_eq!(must("recv", udp.recv()).await.unwrap().data(), b"self");
        let moved = client.detach().await.unwrap().into_stream().unwrap();
        util::round_trip(&moved, b"moved").await;
    });
}

/// Puts `fd` on descriptor number `at`, which must be free (activation passes sockets
/// from 3 on, so the test needs those numbers).
fn place_at(fd: OwnedFd, at: RawFd) -> OwnedFd {
    if fd.as_raw_fd() == at {
        return fd;
    }
    assert!(!is_open(at), "descriptor {at} is taken");
    // SAFETY: dup2 onto a number nothing in this process uses (checked above).
    let raw = unsafe { libc::dup2(fd.as_raw_fd(), at) };
    assert_eq!(raw, at, "dup2: {}", std::io::Error::last_os_error());
    // SAFETY: `at` was just made a copy of `fd`, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(at) }
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: fcntl on any number is harmless; it tells whether it is open.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Sets the activation variables (`None` removes one). Only in a child process that
/// runs one test: the environment is the whole process's.
fn set_activation(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) {
    for (key, value) in [
        ("LISTEN_PID", pid),
        ("LISTEN_FDS", fds),
        ("LISTEN_FDNAMES", names),
    ] {
        match value {
            Some(value) => std::env::set_var(key, value),
            None => std::env::remove_var(key),
        }
    }
}

#[test]
fn hostile_activation_variables_fail_cleanly_and_close_nothing() {
    util::child::run_alone_on_each_backend("hostile_activation_child");
}

#[test]
#[ignore = "run in a child process by hostile_activation_variables_fail_cleanly_and_close_nothing"]
fn hostile_activation_child() {
    use ringsock::net::activated_sockets;
    let Some(path) = util::child::path() else {
        return;
    };
    // Descriptors 3 to 6 before any runtime takes numbers: a listener, a pipe's two
    // ends, a UDP socket.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = place_at(listener.into(), 3);
    let (reader, writer) = pipe();
    let reader = place_at(reader, 4);
    let writer = place_at(writer, 5);
    let udp = place_at(std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into(), 6);
    let (builder, backend) = util::child::runtime_for(&path);
    let me = std::process::id().to_string();
    let other = (std::process::id() + 1).to_string();

    // Variables for another process are none of ours, whatever they say (as systemd's
    // sd_listen_fds ignores them); so are absent ones.
    for fds in [Some("garbage"), Some("2"), None] {
        set_activation(Some(&other), fds, Some("x:y:z"));
        assert!(activated_sockets().unwrap().is_empty(), "{fds:?}");
    }
    set_activation(None, Some("2"), None);
    assert!(activated_sockets().unwrap().is_empty());
    set_activation(Some(&me), None, None);
    assert!(activated_sockets().unwrap().is_empty());
    // Values that are no count or no pid, and a descriptor that is not a socket (the
    // pipe on 4), or not open (7), are errors that close nothing.
    for (pid, fds, names) in [
        (me.as_str(), "99999", None),
        (me.as_str(), "-1", None),
        (me.as_str(), "two", None),
        (me.as_str(), "", None),
        ("-5", "2", None),
        ("a process", "2", None),
        (me.as_str(), "2", None),
        (me.as_str(), "5", None),
        (me.as_str(), "1", Some("web:dns")),
    ] {
        set_activation(Some(pid), Some(fds), names);
        let err = activated_sockets().expect_err(fds);
        assert_eq!(
            err.status(),
            SocketErrorStatus::InvalidArgument,
            "{pid} {fds}: {err}"
        );
        for fd in 3..=6 {
            assert!(is_open(fd), "{pid} {fds}: descriptor {fd} was closed");
        }
    }
    // The pipe still works: nothing closed or took it.
    let mut writer = std::fs::File::from(writer);
    writer.write_all(b"!").unwrap();
    let mut one = [0u8; 1];
    std::fs::File::from(reader).read_exact(&mut one).unwrap();
    assert_eq!(&one, b"!");

    // Put right, the sockets are taken (once) and served on this path's runtime.
    let udp = place_at(udp, 4);
    set_activation(Some(&me), Some("2"), Some("web:dns"));
    let sockets = activated_sockets().unwrap();
    assert!(activated_sockets().unwrap().is_empty(), "taken twice");
    let names: Vec<_> = sockets.iter().map(|a| a.name.as_deref()).collect();
    assert_eq!(names, [Some("web"), Some("dns")]);
    // The sockets own 3 and 4 now.
    std::mem::forget((listener, udp));
    let mut sockets = sockets.into_iter();
    let web = sockets.next().unwrap().socket;
    let dns = sockets.next().unwrap().socket;
    let taken = std::cell::RefCell::new(Some((web, dns)));
    util::on_runtime_of(builder, backend, &|_| {
        let (web, dns) = taken.borrow_mut().take().expect("run once");
        async move {
            let (web, dns) = (web.into_listener().unwrap(), dns.into_datagram().unwrap());
            let mut client = TcpStream::connect(addr).unwrap();
            let served = must("accept", web.accept()).await.unwrap();
            served.write_all(b"hi".to_vec()).await.0.unwrap();
            let mut hi = [0u8; 2];
            client.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
            read_retrying(&mut client, &mut hi).unwrap();
            assert_eq!(&hi, b"hi");
            let to = dns.local_addr().unwrap();
            dns.send_to_addr(b"self".to_vec(), to).await.0.unwrap();
            assert_eq!(must("recv", dns.recv()).await.unwrap().data(), b"self");
        }
    });
    println!("{}", util::child::passed("hostile_activation_child", &path));
}

/// Bytes the poll-based read traits (futures-io, tokio) received ahead of what the
/// caller took go along when the stream detaches, also through the broker's channel:
/// the adopting socket reads them first, then what the kernel still holds.
#[test]
fn bytes_read_ahead_by_async_read_go_along_when_the_stream_detaches() {
    use futures_util::AsyncReadExt;
    util::on_each_backend(|_| async {
        let listener = util::std_listener();
        let (mut client, mut peer) = util::pair_with_std_peer(&listener).await;
        // One segment on loopback: the traits' first receive takes all of it.
        peer.write_all(b"12345678").unwrap();
        let mut four = [0u8; 4];
        must("read", client.read_exact(&mut four)).await.unwrap();
        assert_eq!(&four, b"1234");
        peer.write_all(b"90").unwrap();
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let detached = client.detach().await.unwrap();
        assert_eq!(detached.carried_bytes(), 4);
        let (ours, theirs) = UnixStream::pair().unwrap();
        send_detached(&ours, &detached).unwrap();
        let taken = recv_detached(&theirs).unwrap();
        assert_eq!(taken.carried_bytes(), 4);
        // Through the traits again: a little at a time, so they read ahead once more.
        let mut moved = taken.into_stream().unwrap();
        let mut two = [0u8; 2];
        must("read", moved.read_exact(&mut two)).await.unwrap();
        assert_eq!(&two, b"56");
        let mut rest = Vec::new();
        must("read", moved.read_to_end(&mut rest)).await.unwrap();
        assert_eq!(rest, b"7890");
        // Detached again with nothing read ahead, it carries nothing.
        let (mut client, _peer) = util::pair_with_std_peer(&listener).await;
        let detached = client.detach().await.unwrap();
        assert_eq!(detached.carried_bytes(), 0);
        let mut nothing = [0u8; 1];
        assert!(
            AsyncReadExt::read(&mut client, &mut nothing).await.is_err(),
            "a spent handle read"
        );
    });
}

/// A detach while other tasks wait on the socket (a read, an accept, a receive): each
/// of them finishes, with an error, instead of hanging or taking what now belongs to
/// the adopting socket, which gets everything sent after.
#[test]
fn a_detach_with_operations_in_flight_ends_them_and_loses_nothing() {
    use std::rc::Rc;
    util::on_each_backend(|_| async {
        let std_listener = util::std_listener();
        let (client, mut peer) = util::pair_with_std_peer(&std_listener).await;
        let client = Rc::new(client);
        let listener = Rc::new(util::loopback_listener());
        let (udp, udp_addr) = loopback_datagram_socket();
        let udp = Rc::new(udp);
        let reading = ringsock::spawn({
            let client = client.clone();
            async move { client.read(Vec::with_capacity(16)).await.0 }
        });
        let accepting = ringsock::spawn({
            let listener = listener.clone();
            async move { listener.accept().await.map(drop) }
        });
        let receiving = ringsock::spawn({
            let udp = udp.clone();
            async move { udp.recv().await.map(drop) }
        });
        // Each of them is waiting on its socket now.
        for _ in 0..4 {
            util::yield_now().await;
        }
        let stream = client.detach().await.unwrap().into_stream().unwrap();
        let listener_addr = listener.local_addr().unwrap();
        let moved_listener = listener.detach().unwrap().into_listener().unwrap();
        let moved_udp = udp.detach().unwrap().into_datagram().unwrap();
        let read = must("the read in flight", reading).await;
        let err = read.expect_err("a read on the spent handle");
        // Cancelled by the detach, on either engine.
        assert_eq!(err.status(), SocketErrorStatus::OperationAborted, "{err}");
        let accept = must("the accept in flight", accepting).await;
        assert!(accept.is_err(), "an accept on the spent handle");
        let recv = must("the receive in flight", receiving).await;
        assert!(recv.is_err(), "a receive on the spent handle");
        // Everything sent after the detach reaches the adopting sockets.
        peer.write_all(b"after").unwrap();
        assert_eq!(util::read_exact(&stream, 5).await, b"after");
        let _client = TcpStream::connect(listener_addr).unwrap();
        must("accept", moved_listener.accept()).await.unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"after", udp_addr).unwrap();
        let datagram = must("recv", moved_udp.recv()).await.unwrap();
        assert_eq!(datagram.data(), b"after");
    });
}

/// A hand-over on a channel that stays full (the peer reads nothing) fails once the
/// channel's write timeout passes, or at once when it is non-blocking, with
/// ConnectionTimedOut; the socket is still the sender's, and serves.
#[test]
fn a_hand_over_on_a_full_channel_is_bounded_and_keeps_the_socket() {
    util::on_each_backend(|_| async {
        let (socket, addr) = loopback_datagram_socket();
        let detached = socket.detach().unwrap();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        // Filled until the kernel takes no more.
        ours.set_nonblocking(true).unwrap();
        let filler = [0u8; 4096];
        while (&ours).write(&filler).is_ok() {}
        let err = send_detached(&ours, &detached).expect_err("the channel is full");
        assert_eq!(err.status(), SocketErrorStatus::ConnectionTimedOut, "{err}");
        ours.set_nonblocking(false).unwrap();
        ours.set_write_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        let err = send_detached(&ours, &detached).expect_err("the channel is full");
        assert_eq!(err.status(), SocketErrorStatus::ConnectionTimedOut, "{err}");
        let socket = detached.into_datagram().unwrap();
        socket.send_to_addr(b"kept".to_vec(), addr).await.0.unwrap();
        assert_eq!(must("recv", socket.recv()).await.unwrap().data(), b"kept");
    });
}

/// The sender of a socket keeps its open file, O_NONBLOCK included. Made blocking there
/// after the hand-over, the socket still never blocks the adopting runtime's thread in a
/// read: other tasks of the thread run while the read waits.
#[test]
fn a_socket_made_blocking_by_its_sender_never_blocks_the_runtime() {
    util::on_each_backend(|_| async {
        let std_listener = util::std_listener();
        let (client, mut peer) = util::pair_with_std_peer(&std_listener).await;
        let detached = client.detach().await.unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        send_detached(&ours, &detached).unwrap();
        let moved = recv_detached(&theirs).unwrap().into_stream().unwrap();
        socket2::SockRef::from(&detached)
            .set_nonblocking(false)
            .unwrap();
        // The peer sends its second part once another task of this runtime has run
        // while the second read waits: it never would with the thread stuck in a
        // blocking recv (then the peer sends anyway after MUST_HAPPEN, and says so).
        let (ran, ran_here) = std::sync::mpsc::channel();
        let peer = std::thread::spawn(move || {
            peer.write_all(b"one").unwrap();
            let others_ran = ran_here.recv_timeout(util::MUST_HAPPEN).is_ok();
            peer.write_all(b"two").unwrap();
            others_ran
        });
        assert_eq!(util::read_exact(&moved, 3).await, b"one");
        let (two, ()) = util::join(util::read_exact(&moved, 3), async {
            util::yield_now().await;
            let _ = ran.send(());
        })
        .await;
        assert_eq!(two, b"two");
        assert!(
            util::join_thread(peer).await,
            "the runtime's thread blocked in a read"
        );
    });
}

/// A stream whose peer's reset a read was told of stays reset where it goes: adopted
/// on the same thread, and handed over a channel, its reads are the reset, not an end
/// of stream (Linux tells one call only; the flag used to stay behind).
#[test]
fn a_stream_told_of_its_peers_reset_stays_reset_where_it_goes() {
    util::on_each_backend(|backend| async move {
        for over_a_channel in [false, true] {
            let listener = util::std_listener();
            let (client, mut peer) = util::pair_with_std_peer(&listener).await;
            peer.write_all(b"last words").unwrap();
            assert_eq!(util::read_exact(&client, 10).await, b"last words");
            util::reset(peer);
            let (result, _) = must("read", client.read(Vec::with_capacity(16))).await;
            assert_eq!(
                result.expect_err("the reset").status(),
                SocketErrorStatus::ConnectionResetByPeer
            );
            let detached = client.detach().await.unwrap();
            let detached = if over_a_channel {
                let (ours, theirs) = UnixStream::pair().unwrap();
                send_detached(&ours, &detached).unwrap();
                drop(detached);
                recv_detached(&theirs).unwrap()
            } else {
                detached
            };
            let moved = detached.into_stream().unwrap();
            for _ in 0..2 {
                let (result, _) = must("read", moved.read(Vec::with_capacity(16))).await;
                let err = result.expect_err("a read of the moved stream");
                assert_eq!(
                    err.status(),
                    SocketErrorStatus::ConnectionResetByPeer,
                    "{backend}, over a channel: {over_a_channel}: {err}"
                );
            }
        }
    });
}

/// A socket adopted with UDP_GRO on: the kernel still merges equal datagrams, and the
/// adopted handle must know it to split them again.
#[test]
fn an_adopted_gro_socket_keeps_each_datagram_whole() {
    util::on_each_backend(|backend| async move {
        let receiver = DatagramSocket::new();
        receiver.control().set_gro(true).unwrap();
        receiver.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = receiver.local_addr().unwrap();
        let adopted = receiver.detach().unwrap().into_datagram().unwrap();
        assert!(adopted.control().gro(), "{backend}: GRO forgotten");
        let sender = DatagramSocket::new();
        sender.bind_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let stream = sender.output_stream_to_addr(to).unwrap();
        for i in 0..8u8 {
            stream.write(vec![i; 100]).await.unwrap();
        }
        stream.flush().await.unwrap();
        for i in 0..8u8 {
            let got = util::recv_datagram(&adopted).await;
            assert_eq!(&got[..], &[i; 100][..], "{backend}: datagram {i}");
        }
    });
}

/// Receive metadata turned on before the socket moved keeps coming on the new handle.
#[test]
fn an_adopted_socket_goes_on_reporting_the_metadata_it_was_asked_for() {
    use ringsock::{Ecn, SendOptions, TrafficClass};
    util::on_each_backend(|backend| async move {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let receiver = DatagramSocket::new();
            receiver.control().set_receive_destination(true).unwrap();
            receiver.control().set_receive_traffic_class(true).unwrap();
            receiver.control().set_receive_timestamps(true).unwrap();
            receiver.bind_addr(local.parse().unwrap()).unwrap();
            let to = receiver.local_addr().unwrap();
            let adopted = receiver.detach().unwrap().into_datagram().unwrap();
            let control = adopted.control();
            assert!(
                control.receive_destination()
                    && control.receive_traffic_class()
                    && control.receive_timestamps(),
                "{backend} {local}: options forgotten"
            );
            let sender = DatagramSocket::new();
            sender.bind_addr(local.parse().unwrap()).unwrap();
            let class = TrafficClass::new(TrafficClass::DSCP_EF, Ecn::Ect0).unwrap();
            let options = SendOptions::default().with_traffic_class(class);
            sender
                .send_to_addr_with(b"x".to_vec(), to, &options)
                .await
                .0
                .unwrap();
            let got = util::recv_datagram(&adopted).await;
            assert_eq!(got.local_ip(), Some(to.ip()), "{backend} {local}");
            assert_eq!(got.traffic_class(), Some(class), "{backend} {local}");
            assert!(got.timestamp().is_some(), "{backend} {local}");
        }
    });
}

/// A std socket whose program set options itself is received with them too.
#[test]
fn a_std_socket_with_receive_options_set_reports_them() {
    use std::os::fd::AsFd;
    util::on_each_backend(|backend| async move {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&std_socket.as_fd())
            .set_recv_tos(true)
            .unwrap();
        let to = std_socket.local_addr().unwrap();
        let socket = DatagramSocket::from_std(std_socket).unwrap();
        assert!(socket.control().receive_traffic_class(), "{backend}");
        assert!(!socket.control().receive_destination(), "{backend}");
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"y", to).unwrap();
        let got = util::recv_datagram(&socket).await;
        assert!(got.traffic_class().is_some(), "{backend}");
        assert_eq!(got.local_ip(), None, "{backend}");
    });
}
