//! StreamSocketListener: binding, addresses, accepting one by one, as a stream, from
//! several tasks. Descriptor exhaustion and floods: listener_limits.rs.

mod util;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;

use ringsock::{HostName, SocketErrorStatus, StreamSocketListener};

#[test]
fn local_addr_reports_the_real_port_of_port_zero() {
    util::on_each_backend(|_| async {
        let listener =
            StreamSocketListener::bind_host(&HostName::new("127.0.0.1").unwrap(), "0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_ne!(addr.port(), 0);
        let (client, server) = util::connected_pair(&listener).await;
        assert_eq!(client.peer_addr().unwrap(), addr);
        assert_eq!(server.local_addr().unwrap(), addr);

        // On every address (dual-stack where the system has IPv6): still a real port,
        // reachable over IPv4 loopback.
        let any = StreamSocketListener::bind("0").unwrap();
        let addr = any.local_addr().unwrap();
        assert!(addr.ip().is_unspecified(), "{addr}");
        assert_ne!(addr.port(), 0);
        let client = util::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))).await;
        let server = util::must("accept", any.accept()).await.unwrap();
        // A dual-stack socket sees the IPv4 peer as an IPv4-mapped IPv6 address.
        let peer = server.peer_addr().unwrap();
        assert_eq!(peer.port(), client.local_addr().unwrap().port());
        let mapped = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            v4 => Some(v4),
        };
        assert_eq!(mapped, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    });
}

#[test]
fn binding_a_port_in_use_or_a_foreign_address_fails_with_its_status() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let err = StreamSocketListener::bind_addr(addr)
            .err()
            .expect("the port is taken");
        assert_eq!(
            err.status(),
            SocketErrorStatus::AddressAlreadyInUse,
            "{err}"
        );
        assert!(err.to_string().contains(&format!("bind {addr}")), "{err}");

        // 192.0.2.1 (TEST-NET-1) is never an address of this machine.
        let foreign = SocketAddr::from(([192, 0, 2, 1], 0));
        let err = StreamSocketListener::bind_addr(foreign)
            .err()
            .expect("not a local address");
        assert_eq!(
            err.status(),
            SocketErrorStatus::CannotAssignRequestedAddress,
            "{err}"
        );
        // The listener that holds the port is unaffected.
        util::connected_pair(&listener).await;
    });
}

/// A multicast address takes no TCP connection: the kernel would bind a listener there
/// that waits forever, so binding one (alone or as a port-sharing group, IPv4, IPv6 or
/// IPv4-mapped) fails at once with InvalidArgument.
#[test]
fn a_listener_on_a_multicast_address_is_refused() {
    util::on_each_backend(|_| async {
        for addr in [
            "224.0.0.1:0",
            "239.1.2.3:7000",
            "[ff02::1]:0",
            "[::ffff:224.0.0.9]:0",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let err = StreamSocketListener::bind_addr(addr)
                .err()
                .unwrap_or_else(|| panic!("{addr}: a listener was bound"));
            assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
            assert!(err.to_string().contains("multicast"), "{err}");
            let err = ringsock::net::bind_reuse_port(addr, 2, ringsock::net::SocketKind::Listener)
                .err()
                .unwrap_or_else(|| panic!("{addr}: a port-sharing group was bound"));
            assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        }
        // A unicast listener still binds.
        util::loopback_listener();
    });
}

/// A port-sharing group of no socket is an error, not a lone socket.
#[test]
fn a_port_sharing_group_of_absurd_size_is_an_error() {
    use ringsock::net::SocketKind;
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    for kind in [SocketKind::Listener, SocketKind::Datagram] {
        let err = ringsock::net::bind_reuse_port(addr, 0, kind)
            .err()
            .unwrap_or_else(|| panic!("{kind:?}: a group of 0 was bound"));
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
    }
}

#[test]
fn incoming_yields_each_connection_in_order() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(util::connect(addr).await);
        }
        let mut incoming = listener.incoming();
        for (i, client) in clients.iter().enumerate() {
            let server = util::must("incoming", util::next(&mut incoming))
                .await
                .expect("incoming never ends")
                .expect("accepted");
            assert_eq!(
                server.peer_addr().unwrap(),
                client.local_addr().unwrap(),
                "connection {i}"
            );
            ringsock::spawn(util::echo(server));
            util::round_trip(client, format!("connection {i}").as_bytes()).await;
        }
        // The stream keeps yielding connections made after it started.
        let late = util::connect(addr).await;
        let server = util::must("incoming", util::next(&mut incoming))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(server.peer_addr().unwrap(), late.local_addr().unwrap());
    });
}

#[test]
fn concurrent_accepts_each_get_a_different_connection() {
    util::on_each_backend(|_| async {
        let listener = Rc::new(util::loopback_listener());
        let addr = listener.local_addr().unwrap();
        const TASKS: usize = 8;
        let acceptors: Vec<_> = (0..TASKS)
            .map(|_| {
                let listener = listener.clone();
                ringsock::spawn(async move {
                    let socket = listener.accept().await.expect("accept");
                    socket.peer_addr().unwrap()
                })
            })
            .collect();
        // Let every acceptor start waiting before any connection arrives.
        util::yield_now().await;
        let mut clients = Vec::new();
        for _ in 0..TASKS {
            clients.push(util::connect(addr).await);
        }
        let mut peers = HashSet::new();
        for acceptor in acceptors {
            peers.insert(util::must("acceptor", acceptor).await);
        }
        let expected: HashSet<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        assert_eq!(peers, expected);
    });
}

/// Buffer sizes set through a listener's control are on the listening socket itself,
/// which the getters report, and connections have them from before they are accepted.
#[test]
fn a_listeners_buffer_sizes_are_on_the_listening_socket_and_every_connection() {
    util::on_each_backend(|backend| async move {
        let listener = util::loopback_listener();
        let control = listener.control();
        let default_receive = control.receive_buffer_size().unwrap();
        control.set_receive_buffer_size(4096).unwrap();
        control.set_send_buffer_size(8192).unwrap();
        let receive = control.receive_buffer_size().unwrap();
        let send = control.send_buffer_size().unwrap();
        assert_ne!(
            receive, default_receive,
            "{backend}: not set on the listening socket"
        );
        // What the kernel made of the request (doubled, clamped), as the socket has it.
        let sock = socket2::SockRef::from(&listener);
        assert_eq!(receive, sock.recv_buffer_size().unwrap(), "{backend}");
        assert_eq!(send, sock.send_buffer_size().unwrap(), "{backend}");
        let addr = listener.local_addr().unwrap();
        let client = util::connect(addr).await;
        let accepted = util::must("accept", listener.accept()).await.unwrap();
        assert_eq!(
            accepted.control().receive_buffer_size().unwrap(),
            receive,
            "{backend}"
        );
        assert_eq!(
            accepted.control().send_buffer_size().unwrap(),
            send,
            "{backend}"
        );
        drop(client);
    });
}
