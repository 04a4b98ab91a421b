//! HostName and service names through the public API: what is accepted, what is rejected
//! with which status, before any connection is attempted.

mod util;

use ringsock::host::HostNameKind;
use ringsock::{Error, HostName, SocketErrorStatus, StreamSocket, StreamSocketListener};

#[test]
fn valid_host_names_keep_their_text_and_kind() {
    // No I/O, but run on both drivers like every test.
    util::on_each_backend(|_| async {
        let cases: &[(&str, HostNameKind, &str, &str)] = &[
            // input, kind, raw_name, Display
            (
                "localhost",
                HostNameKind::DomainName,
                "localhost",
                "localhost",
            ),
            (
                "Example.COM.",
                HostNameKind::DomainName,
                "Example.COM.",
                "Example.COM.",
            ),
            ("127.0.0.1", HostNameKind::Ipv4, "127.0.0.1", "127.0.0.1"),
            ("::1", HostNameKind::Ipv6, "::1", "[::1]"),
            ("[::1]", HostNameKind::Ipv6, "::1", "[::1]"),
            (
                "fe80::1%lo",
                HostNameKind::Ipv6,
                "fe80::1%lo",
                "[fe80::1%lo]",
            ),
        ];
        for &(input, kind, raw, shown) in cases {
            let host = HostName::new(input).unwrap_or_else(|err| panic!("{input:?}: {err}"));
            assert_eq!(host.kind(), kind, "{input:?}");
            assert_eq!(host.raw_name(), raw, "{input:?}");
            assert_eq!(host.to_string(), shown, "{input:?}");
            assert_eq!(shown.parse::<HostName>().unwrap(), host, "{input:?}");
        }
    });
}

#[test]
fn invalid_host_names_are_rejected_with_invalid_argument() {
    // No I/O, but run on both drivers like every test.
    util::on_each_backend(|_| async {
        let cases: &[(&str, &str)] = &[
            // input, a fragment the message must contain
            ("", "empty"),
            ("exa mple.com", "character ' ' at position 3"),
            (" localhost", "character ' ' at position 0"),
            ("ex_ample.com", "underscores"),
            ("exämple.com", "character 'ä' at position 2"),
            ("user@example.com", "character '@' at position 4"),
            ("a..b", "empty label at position 2"),
            ("-example.com", "starts with '-'"),
            (&"a".repeat(64), "64 characters long"),
            ("256.1.1.1", "not a valid IPv4 address"),
            ("1.2.3", "not a valid IPv4 address"),
            // getaddrinfo would take these for loopback without asking DNS.
            ("0x7f.1", "reads as the IPv4 address 127.0.0.1"),
            ("0x7f000001", "reads as the IPv4 address 127.0.0.1"),
            ("127.1.0x1", "reads as the IPv4 address 127.1.0.1"),
            ("[::1", "unbalanced brackets"),
            ("[127.0.0.1]", "brackets may only enclose an IPv6 address"),
            ("example.com:80", "a port does not belong in a host name"),
            ("::1%eth0", "only allowed on link-local"),
            ("line\nbreak", "character '\\n' at position 4"),
        ];
        for &(input, fragment) in cases {
            for result in [HostName::new(input), input.parse::<HostName>()] {
                let err = result.expect_err(input);
                assert_eq!(
                    err.status(),
                    SocketErrorStatus::InvalidArgument,
                    "{input:?}"
                );
                let text = err.to_string();
                assert!(
                    text.contains(fragment),
                    "{input:?}: {text:?} lacks {fragment:?}"
                );
                assert!(!text.contains('\n'), "{input:?}: {text:?} is not one line");
                match err {
                    Error::InvalidHostName { input: got, .. } => assert_eq!(got, input),
                    other => panic!("{input:?}: wrong variant {other:?}"),
                }
            }
        }
    });
}

/// Services that must be rejected before any connection is attempted, and their status.
const BAD_SERVICES: &[(&str, SocketErrorStatus)] = &[
    ("", SocketErrorStatus::InvalidArgument),
    ("65536", SocketErrorStatus::InvalidArgument),
    ("99999999999999999999", SocketErrorStatus::InvalidArgument),
    ("-1", SocketErrorStatus::InvalidArgument),
    ("+80", SocketErrorStatus::InvalidArgument),
    (" 80", SocketErrorStatus::InvalidArgument),
    ("80 ", SocketErrorStatus::InvalidArgument),
    ("12ab", SocketErrorStatus::InvalidArgument),
    ("ssh/tcp", SocketErrorStatus::InvalidArgument),
    ("http\n", SocketErrorStatus::InvalidArgument),
    // Well-formed names that no services file lists.
    ("nosuchservice", SocketErrorStatus::ClassTypeNotFound),
    (
        "no-such-service-either",
        SocketErrorStatus::ClassTypeNotFound,
    ),
];

#[test]
fn connect_with_a_bad_service_fails_before_connecting() {
    util::on_each_backend(|_| async {
        // A live listener: had any of these reached connect, it would have succeeded.
        let listener = util::loopback_listener();
        let port = listener.local_addr().unwrap().port();
        let host = HostName::new("127.0.0.1").unwrap();
        let socket = StreamSocket::new();
        for &(service, status) in BAD_SERVICES {
            let err = util::must("connect", socket.connect(&host, service))
                .await
                .expect_err(service);
            assert_eq!(err.status(), status, "{service:?}: {err}");
            assert!(
                matches!(err, Error::InvalidService { ref input, .. } if input == service),
                "{service:?}: {err:?}"
            );
            assert!(!err.to_string().contains('\n'), "{err}");
            let err = util::must("connect_to", StreamSocket::connect_to(&host, service))
                .await
                .expect_err(service);
            assert_eq!(err.status(), status, "{service:?}: {err}");
        }
        // Nothing was connected: the socket is still fresh and connects now, also with
        // leading zeros in the port.
        socket.peer_addr().expect_err("not connected");
        util::must("connect", socket.connect(&host, &format!("00{port}")))
            .await
            .expect("connect with a good service");
        assert_eq!(socket.peer_addr().unwrap().port(), port);
        let accepted = util::must("accept", listener.accept()).await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), socket.local_addr().unwrap());
    });
}

#[test]
fn bind_with_a_bad_service_fails() {
    // Rejected before a socket is made; run on both drivers like every test.
    util::on_each_backend(|_| async {
        let host = HostName::new("127.0.0.1").unwrap();
        for &(service, status) in BAD_SERVICES {
            for result in [
                StreamSocketListener::bind(service),
                StreamSocketListener::bind_host(&host, service),
            ] {
                let err = result.err().expect(service);
                assert_eq!(err.status(), status, "{service:?}: {err}");
                assert!(matches!(err, Error::InvalidService { .. }), "{err:?}");
            }
        }
    });
}
