//! TLS on stream sockets, both ends ours, on both drivers: handshakes with TLS 1.2 and 1.3,
//! client certificates, certificate statuses, large and batched transfers through TLS.

mod tls_certs;
mod util;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringsock::runtime::timeout;
use ringsock::tls::{Identity, ProtectionLevel, TlsAcceptor, TlsInfo, TrustedRoots};
use ringsock::{
    Error, HostName, JoinHandle, Result, SocketErrorStatus, StreamSocket, StreamSocketListener,
};
use tls_certs::{Ca, LeafOptions, TempDir};

fn localhost() -> HostName {
    HostName::new("localhost").unwrap()
}

fn listen() -> (StreamSocketListener, String) {
    let listener =
        StreamSocketListener::bind_host(&HostName::new("127.0.0.1").unwrap(), "0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    (listener, port)
}

/// Accepts one connection, runs the server handshake, then echoes lines until the client
/// closes. Gives back what the handshake agreed on, or its error.
fn echo_server(
    listener: StreamSocketListener,
    acceptor: TlsAcceptor,
) -> JoinHandle<Result<TlsInfo>> {
    ringsock::spawn(async move {
        let socket = listener.accept().await?;
        socket.accept_tls(&acceptor).await?;
        let info = socket.tls_info().expect("handshake finished");
        let mut input = socket.input_stream();
        while let Some(line) = input.read_line().await? {
            socket.write_all(format!("{line}\n").into_bytes()).await.0?;
        }
        socket.shutdown_write().await?;
        Ok(info)
    })
}

/// A client socket trusting `roots`, presenting `identity` if given.
fn client(roots: &TrustedRoots, identity: Option<Identity>) -> StreamSocket {
    let socket = StreamSocket::new();
    socket.control().set_trusted_roots(roots.clone()).unwrap();
    if let Some(identity) = identity {
        socket.control().set_client_certificate(identity).unwrap();
    }
    socket
}

/// Sends a few lines and checks they come back, then closes (close_notify + FIN).
async fn echo_lines(socket: &StreamSocket) {
    let mut input = socket.input_stream();
    for line in ["Hello, World!", "second line", ""] {
        socket
            .write_all(format!("{line}\n").into_bytes())
            .await
            .0
            .unwrap();
        assert_eq!(input.read_line().await.unwrap().as_deref(), Some(line));
    }
    socket.shutdown_write().await.unwrap();
    assert_eq!(
        input.read_line().await.unwrap(),
        None,
        "server closed cleanly"
    );
}

/// Connects with TLS and reads once: a server's refusal of the client's certificate comes
/// from the handshake with TLS 1.2, and with the first read with TLS 1.3 (the client has
/// finished its handshake before the server decides).
async fn connect_then_read(socket: &StreamSocket, port: &str) -> Result<usize> {
    socket
        .connect_with(&localhost(), port, ProtectionLevel::Tls12)
        .await?;
    socket.read(Vec::with_capacity(64)).await.0
}

fn status_of<T: std::fmt::Debug>(result: Result<T>) -> (SocketErrorStatus, String) {
    let err = result.expect_err("should fail");
    (err.status(), err.to_string())
}

#[test]
fn tls13_handshake_and_echo() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let server = echo_server(listener, TlsAcceptor::new(ca.server()).unwrap());

        let socket = client(&ca.roots(), None);
        socket
            .connect_with(&localhost(), &port, ProtectionLevel::Tls13)
            .await
            .unwrap();
        let info = socket.tls_info().unwrap();
        assert_eq!(info.protection_level, ProtectionLevel::Tls13);
        assert_eq!(info.cipher_suite, "TLS13_AES_256_GCM_SHA384");
        assert_eq!(info.peer_certificates.len(), 1);
        echo_lines(&socket).await;

        let server_info = server.await.unwrap();
        assert_eq!(server_info.protection_level, ProtectionLevel::Tls13);
        assert_eq!(server_info.server_name.as_deref(), Some("localhost"));
        assert!(server_info.peer_certificate().is_none());
    });
}

#[test]
fn tls12_handshake_and_echo() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let acceptor = TlsAcceptor::builder(ca.server())
            .max_protection_level(ProtectionLevel::Tls12)
            .build()
            .unwrap();
        let server = echo_server(listener, acceptor);

        let socket = client(&ca.roots(), None);
        socket
            .connect_with(&localhost(), &port, ProtectionLevel::Tls12)
            .await
            .unwrap();
        let info = socket.tls_info().unwrap();
        assert_eq!(info.protection_level, ProtectionLevel::Tls12);
        assert_eq!(info.cipher_suite, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384");
        echo_lines(&socket).await;
        assert_eq!(
            server.await.unwrap().protection_level,
            ProtectionLevel::Tls12
        );
    });
}

#[test]
fn tls13_required_but_server_offers_only_tls12() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let acceptor = TlsAcceptor::builder(ca.server())
            .max_protection_level(ProtectionLevel::Tls12)
            .build()
            .unwrap();
        let server = echo_server(listener, acceptor);
        let socket = client(&ca.roots(), None);
        let (status, _) = status_of(
            socket
                .connect_with(&localhost(), &port, ProtectionLevel::Tls13)
                .await,
        );
        assert_eq!(status, SocketErrorStatus::TlsHandshakeFailed);
        let (status, message) = status_of(server.await);
        assert_eq!(status, SocketErrorStatus::TlsHandshakeFailed, "{message}");
    });
}

#[test]
fn client_certificate_required_and_given() {
    for max in [ProtectionLevel::Tls12, ProtectionLevel::Tls13] {
        util::on_each_backend(|_| async move {
            let server_ca = Ca::new("server CA");
            let client_ca = Ca::new("client CA");
            let identity = client_ca.client("device-17");
            let (listener, port) = listen();
            let acceptor = TlsAcceptor::builder(server_ca.server())
                .max_protection_level(max)
                .require_client_certificate(client_ca.roots())
                .build()
                .unwrap();
            let server = echo_server(listener, acceptor);

            let socket = client(&server_ca.roots(), Some(identity.clone()));
            socket
                .connect_with(&localhost(), &port, ProtectionLevel::Tls12)
                .await
                .unwrap();
            assert_eq!(socket.tls_info().unwrap().protection_level, max);
            echo_lines(&socket).await;

            let info = server.await.unwrap();
            assert_eq!(info.peer_certificate(), Some(&identity.certificate()));
        });
    }
}

#[test]
fn client_certificate_required_and_missing() {
    for max in [ProtectionLevel::Tls12, ProtectionLevel::Tls13] {
        util::on_each_backend(|_| async move {
            let server_ca = Ca::new("server CA");
            let client_ca = Ca::new("client CA");
            let (listener, port) = listen();
            let acceptor = TlsAcceptor::builder(server_ca.server())
                .max_protection_level(max)
                .require_client_certificate(client_ca.roots())
                .build()
                .unwrap();
            let server = echo_server(listener, acceptor);

            let socket = client(&server_ca.roots(), None);
            let (status, message) = status_of(connect_then_read(&socket, &port).await);
            assert_eq!(
                status,
                SocketErrorStatus::ClientCertificateRequired,
                "{message}"
            );
            assert!(message.contains("set_client_certificate"), "{message}");

            let (status, message) = status_of(server.await);
            assert_eq!(
                status,
                SocketErrorStatus::ClientCertificateRequired,
                "{message}"
            );
            assert!(message.contains("presented no certificate"), "{message}");
        });
    }
}

#[test]
fn client_certificate_from_an_untrusted_ca() {
    util::on_each_backend(|_| async {
        let server_ca = Ca::new("server CA");
        let client_ca = Ca::new("client CA");
        let stranger = Ca::new("some other CA");
        let (listener, port) = listen();
        let acceptor = TlsAcceptor::builder(server_ca.server())
            .require_client_certificate(client_ca.roots())
            .build()
            .unwrap();
        let server = echo_server(listener, acceptor);

        let socket = client(&server_ca.roots(), Some(stranger.client("intruder")));
        let (status, message) = status_of(connect_then_read(&socket, &port).await);
        assert_eq!(
            status,
            SocketErrorStatus::CertificateUntrustedRoot,
            "{message}"
        );
        let (status, message) = status_of(server.await);
        assert_eq!(
            status,
            SocketErrorStatus::CertificateUntrustedRoot,
            "{message}"
        );
        assert!(message.contains("client's certificate"), "{message}");
    });
}

#[test]
fn client_certificate_optional() {
    util::on_each_backend(|_| async {
        let server_ca = Ca::new("server CA");
        let client_ca = Ca::new("client CA");
        let (listener, port) = listen();
        let acceptor = TlsAcceptor::builder(server_ca.server())
            .request_client_certificate(client_ca.roots())
            .build()
            .unwrap();
        let server = echo_server(listener, acceptor);
        let socket = client(&server_ca.roots(), None);
        socket
            .connect_with(&localhost(), &port, ProtectionLevel::Tls13)
            .await
            .unwrap();
        echo_lines(&socket).await;
        assert!(server.await.unwrap().peer_certificate().is_none());
    });
}

/// Runs a handshake against a server presenting `server`, and returns the client's and
/// the server's errors.
async fn failed_handshake(
    server: Identity,
    roots: &TrustedRoots,
    host: &HostName,
) -> ((SocketErrorStatus, String), (SocketErrorStatus, String)) {
    let (listener, port) = listen();
    let server = echo_server(listener, TlsAcceptor::new(server).unwrap());
    let socket = client(roots, None);
    socket.connect(&localhost(), &port).await.unwrap();
    let client = status_of(socket.upgrade_to_tls(ProtectionLevel::Tls12, host).await);
    // The socket stays failed: no plaintext sneaks through afterwards.
    let (again, _) = socket.write_all(b"secret\n".to_vec()).await;
    assert_eq!(again.unwrap_err().status(), client.0);
    (client, status_of(server.await))
}

#[test]
fn expired_server_certificate() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let expired = ca
            .leaf(
                &["localhost"],
                LeafOptions {
                    expired: true,
                    ..LeafOptions::default()
                },
            )
            .identity();
        let ((status, message), (server_status, server_message)) =
            failed_handshake(expired, &ca.roots(), &localhost()).await;
        assert_eq!(status, SocketErrorStatus::CertificateExpired, "{message}");
        assert!(message.contains("expired"), "{message}");
        assert_eq!(
            server_status,
            SocketErrorStatus::CertificateExpired,
            "{server_message}"
        );
    });
}

#[test]
fn wrong_host_name() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let other = ca
            .leaf(&["other.example"], LeafOptions::default())
            .identity();
        let ((status, message), _) = failed_handshake(other, &ca.roots(), &localhost()).await;
        assert_eq!(
            status,
            SocketErrorStatus::CertificateCommonNameIsIncorrect,
            "{message}"
        );
        assert!(message.contains("other.example"), "{message}");

        // Checked by the name dialled, also for an IP literal the certificate lacks.
        let ((status, _), _) = failed_handshake(
            ca.leaf(&["localhost"], LeafOptions::default()).identity(),
            &ca.roots(),
            &HostName::new("127.0.0.2").unwrap(),
        )
        .await;
        assert_eq!(status, SocketErrorStatus::CertificateCommonNameIsIncorrect);
    });
}

#[test]
fn untrusted_root() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let stranger = Ca::new("some other CA");
        let ((status, message), (server_status, _)) =
            failed_handshake(ca.server(), &stranger.roots(), &localhost()).await;
        assert_eq!(
            status,
            SocketErrorStatus::CertificateUntrustedRoot,
            "{message}"
        );
        assert_eq!(server_status, SocketErrorStatus::CertificateUntrustedRoot);
    });
}

#[test]
fn untrusted_root_against_the_system_roots() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let server = echo_server(listener, TlsAcceptor::new(ca.server()).unwrap());
        // No set_trusted_roots: the system's roots, which do not know our test CA (and
        // if the system has none, that is the same status).
        let socket = StreamSocket::new();
        let (status, message) = status_of(
            socket
                .connect_with(&localhost(), &port, ProtectionLevel::Tls12)
                .await,
        );
        assert_eq!(
            status,
            SocketErrorStatus::CertificateUntrustedRoot,
            "{message}"
        );
        drop(socket);
        assert!(server.await.is_err());
    });
}

#[test]
fn server_certificate_for_the_wrong_usage() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let client_only = ca.client("localhost");
        let ((status, message), _) = failed_handshake(client_only, &ca.roots(), &localhost()).await;
        assert_eq!(
            status,
            SocketErrorStatus::CertificateWrongUsage,
            "{message}"
        );
    });
}

#[test]
fn plain_then_upgrade_to_tls() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let acceptor = TlsAcceptor::new(ca.server()).unwrap();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await?;
            // A STARTTLS-style exchange in the clear, then TLS on the same connection.
            let line = socket.input_stream().read_line().await?;
            assert_eq!(line.as_deref(), Some("STARTTLS"));
            socket.write_all(b"GO\n".to_vec()).await.0?;
            socket.accept_tls(&acceptor).await?;
            let line = socket.input_stream().read_line().await?;
            socket
                .write_all(format!("secure {}\n", line.unwrap_or_default()).into_bytes())
                .await
                .0?;
            Ok::<_, Error>(())
        });
        let socket = client(&ca.roots(), None);
        socket.connect(&localhost(), &port).await.unwrap();
        socket.write_all(b"STARTTLS\n".to_vec()).await.0.unwrap();
        assert_eq!(
            socket.input_stream().read_line().await.unwrap().as_deref(),
            Some("GO")
        );
        assert!(socket.tls_info().is_none());
        socket
            .upgrade_to_tls(ProtectionLevel::Tls12, &localhost())
            .await
            .unwrap();
        assert!(socket.tls_info().is_some());
        socket.write_all(b"hello\n".to_vec()).await.0.unwrap();
        assert_eq!(
            socket.input_stream().read_line().await.unwrap().as_deref(),
            Some("secure hello")
        );
        server.await.unwrap();

        // TLS options are fixed once the handshake started; a second upgrade is refused.
        let err = socket
            .control()
            .set_client_certificate(ca.client("late"))
            .unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument);
        let err = socket
            .upgrade_to_tls(ProtectionLevel::Tls12, &localhost())
            .await
            .unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument);
    });
}

#[test]
fn large_echo_through_tls() {
    const TOTAL: usize = 64 * 1024 * 1024;
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let acceptor = TlsAcceptor::new(ca.server()).unwrap();
        // Echo raw bytes until the client closes.
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await?;
            socket.accept_tls(&acceptor).await?;
            let mut echoed = 0usize;
            loop {
                let (n, buf) = socket.read(Vec::with_capacity(256 * 1024)).await;
                if n? == 0 {
                    break;
                }
                echoed += buf.len();
                socket.write_all(buf).await.0?;
            }
            socket.shutdown_write().await?;
            Ok::<_, Error>(echoed)
        });

        let socket = Rc::new(client(&ca.roots(), None));
        socket
            .connect_with(&localhost(), &port, ProtectionLevel::Tls13)
            .await
            .unwrap();
        let data = Rc::new(util::pseudo_random_bytes(64, TOTAL));
        let writer = {
            let socket = socket.clone();
            let data = data.clone();
            ringsock::spawn(async move {
                for piece in data.chunks(4 * 1024 * 1024) {
                    socket.write_all(piece.to_vec()).await.0?;
                }
                socket.shutdown_write().await
            })
        };
        let mut received = 0usize;
        loop {
            let (n, buf) = socket.read(Vec::with_capacity(256 * 1024)).await;
            let n = n.unwrap();
            if n == 0 {
                break;
            }
            assert!(received + n <= TOTAL, "more bytes came back than were sent");
            assert!(
                buf[..] == data[received..received + n],
                "echo differs in the bytes from offset {received}"
            );
            received += n;
        }
        assert_eq!(received, TOTAL);
        writer.await.unwrap();
        assert_eq!(server.await.unwrap(), TOTAL);
    });
}

#[test]
fn batched_flush_through_tls() {
    const WRITES: usize = 1000;
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let server = echo_server(listener, TlsAcceptor::new(ca.server()).unwrap());
        let socket = client(&ca.roots(), None);
        socket
            .connect_with(&localhost(), &port, ProtectionLevel::Tls13)
            .await
            .unwrap();

        let output = socket.output_stream();
        let mut handles = Vec::new();
        for i in 0..WRITES {
            handles.push(output.write(format!("line {i}\n")).await.unwrap());
        }
        assert!(handles.iter().all(|handle| handle.result().is_none()));
        output.flush().await.unwrap();
        for handle in handles {
            handle.await.unwrap();
        }
        let stats = output.stats();
        assert_eq!(stats.writes, WRITES as u64);
        assert_eq!(stats.batches, 1, "one flush, one batch");
        // The whole batch went out as one encrypted submission (plus resubmissions of a
        // short send, if the kernel made one).
        assert_eq!(stats.kernel_operations, 1 + stats.short_send_recoveries);

        let mut input = socket.input_stream();
        for i in 0..WRITES {
            let line = input.read_line().await.unwrap();
            assert_eq!(line, Some(format!("line {i}")));
        }
        socket.shutdown_write().await.unwrap();
        assert_eq!(input.read_line().await.unwrap(), None);
        server.await.unwrap();
    });
}

#[test]
fn a_read_given_up_on_loses_nothing() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let server = echo_server(listener, TlsAcceptor::new(ca.server()).unwrap());
        let socket = client(&ca.roots(), None);
        socket
            .connect_with(&localhost(), &port, ProtectionLevel::Tls13)
            .await
            .unwrap();
        let mut input = socket.input_stream();
        // Nothing has been sent, so this read cannot finish: give it up while its receive
        // is in flight.
        assert!(timeout(Duration::from_millis(5), input.read_line())
            .await
            .is_err());
        socket
            .write_all(b"after a timeout\n".to_vec())
            .await
            .0
            .unwrap();
        assert_eq!(
            input.read_line().await.unwrap().as_deref(),
            Some("after a timeout")
        );
        socket.shutdown_write().await.unwrap();
        server.await.unwrap();
    });
}

/// A self-signed X.509 version 1 certificate (what `openssl x509 -req` issues without
/// extensions; valid until 2126) and its key: rustls takes version 3 only.
const VERSION_1_CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----\n\
MIIBIDCBxwIUbzT3Ae0XVX3jCYQFZZMsvorianUwCgYIKoZIzj0EAwIwEjEQMA4G\n\
A1UEAwwHdjEudGVzdDAgFw0yNjEyMDUxMjEwNTJaGA8yMTI2MTExMTEyMTA1Mlow\n\
EjEQMA4GA1UEAwwHdjEudGVzdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABIY1\n\
RMQGlA3N7Ew0PQnwQxaMpFoUdxHF6jCF9D/ZbNL0WrO1W4exWHHu/DOMybnZAEv/\n\
Ip9kC5QVltRcf1H/dMIwCgYIKoZIzj0EAwIDSAAwRQIgZv4gbkFbcu+Qiqf8YRiO\n\
xaRLVHFkdBDqjMHeK+5zObMCIQCQ0nT3YB1bD9KxytAfZHG/3e56cngCfrNq9STB\n\
Ofs6MQ==\n\
-----END CERTIFICATE-----";
const VERSION_1_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBJ3ix6ZguSnghfW6\n\
F3hrcoeGT9iAxN93tmAE8ubbTOmhRANCAASGNUTEBpQNzexMND0J8EMWjKRaFHcR\n\
xeowhfQ/2WzS9FqztVuHsVhx7vwzjMm52QBL/yKfZAuUFZbUXH9R/3TC\n\
-----END PRIVATE KEY-----";

/// What loading a file must give: its status, the file it names, and a message fragment.
struct FileCase {
    what: &'static str,
    result: Result<()>,
    status: SocketErrorStatus,
    names: PathBuf,
    says: &'static str,
}

#[test]
fn certificate_and_key_files_fail_with_file_statuses() {
    // Loading is synchronous, but run on both drivers like every test.
    util::on_each_backend(|_| async {
        let dir = TempDir::new("tls-files");
        let ca = Ca::new("ringsock test CA");
        let (cert, key) = ca
            .leaf(&["localhost"], LeafOptions::default())
            .write(dir.path(), "server");
        let (_, other_key) = ca
            .leaf(&["localhost"], LeafOptions::default())
            .write(dir.path(), "other");
        let ca_file = ca.write(dir.path(), "ca.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let (v1_cert, v1_key) = (dir.path().join("v1.pem"), dir.path().join("v1.key"));
        std::fs::write(&v1_cert, VERSION_1_CERTIFICATE).unwrap();
        std::fs::write(&v1_key, VERSION_1_KEY).unwrap();
        let missing = dir.path().join("missing.pem");
        // A path through a regular file: ENOTDIR. As root (CI), no mode makes a file
        // unreadable, so EACCES is covered by the errno table in error.rs instead.
        let under_a_file = cert.join("cert.pem");
        let zeros = PathBuf::from("/dev/zero");

        Identity::from_pem_files(&cert, &key).expect("the good pair loads");
        TrustedRoots::from_pem_file(&ca_file).expect("the good CA loads");

        let identity = |c: &PathBuf, k: &PathBuf| Identity::from_pem_files(c, k).map(drop);
        let roots = |path: &PathBuf| TrustedRoots::from_pem_file(path).map(drop);
        use SocketErrorStatus::{FileNotFound, InvalidFile};
        let cases = vec![
            FileCase {
                what: "missing certificate",
                result: identity(&missing, &key),
                status: FileNotFound,
                names: missing.clone(),
                says: "read the certificate file",
            },
            FileCase {
                what: "missing key",
                result: identity(&cert, &missing),
                status: FileNotFound,
                names: missing.clone(),
                says: "read the private key file",
            },
            FileCase {
                what: "certificate under a file",
                result: identity(&under_a_file, &key),
                status: FileNotFound,
                names: under_a_file.clone(),
                says: "Not a directory",
            },
            FileCase {
                what: "certificate is a directory",
                result: identity(&dir.path().to_path_buf(), &key),
                status: InvalidFile,
                names: dir.path().to_path_buf(),
                says: "Is a directory",
            },
            FileCase {
                what: "key is a directory",
                result: identity(&cert, &dir.path().to_path_buf()),
                status: InvalidFile,
                names: dir.path().to_path_buf(),
                says: "read the private key file",
            },
            FileCase {
                what: "certificate file holds only a key",
                result: identity(&key, &key),
                status: InvalidFile,
                names: key.clone(),
                says: "no CERTIFICATE section",
            },
            FileCase {
                what: "empty certificate file",
                result: identity(&empty, &key),
                status: InvalidFile,
                names: empty.clone(),
                says: "no CERTIFICATE section",
            },
            FileCase {
                what: "key file holds only a certificate",
                result: identity(&cert, &cert),
                status: InvalidFile,
                names: cert.clone(),
                says: "no usable private key",
            },
            FileCase {
                what: "key of another certificate",
                result: identity(&cert, &other_key),
                status: InvalidFile,
                names: other_key.clone(),
                says: "does not belong to the certificate",
            },
            // Once blamed on the key file, in rustls's words.
            FileCase {
                what: "version 1 certificate",
                result: identity(&v1_cert, &v1_key),
                status: InvalidFile,
                names: v1_cert.clone(),
                says: "X.509 version 1 certificate",
            },
            FileCase {
                what: "endless certificate file",
                result: identity(&zeros, &key),
                status: InvalidFile,
                names: zeros.clone(),
                says: "larger than 16 MiB",
            },
            FileCase {
                what: "missing CA bundle",
                result: roots(&missing),
                status: FileNotFound,
                names: missing.clone(),
                says: "read the CA bundle file",
            },
            FileCase {
                what: "CA bundle is a directory",
                result: roots(&dir.path().to_path_buf()),
                status: InvalidFile,
                names: dir.path().to_path_buf(),
                says: "read the CA bundle file",
            },
            FileCase {
                what: "CA bundle holds only a key",
                result: roots(&key),
                status: InvalidFile,
                names: key.clone(),
                says: "no CERTIFICATE section found in the CA bundle",
            },
        ];
        for case in cases {
            let err = case.result.expect_err(case.what);
            let text = err.to_string();
            assert_eq!(err.status(), case.status, "{}: {text}", case.what);
            let path = case.names.display().to_string();
            assert!(text.contains(&path), "{}: {text} lacks {path}", case.what);
            assert!(text.contains(case.says), "{}: {text}", case.what);
            assert!(!text.contains('\n'), "{}: {text}", case.what);
            if let Error::InvalidFile { path, .. } = &err {
                assert_eq!(path, &case.names, "{}", case.what);
            }
        }
    });
}

/// A TLS stream's session lives in its runtime: detaching it is refused with a clear
/// status, and the connection goes on working.
#[test]
fn a_tls_stream_cannot_be_detached_and_stays_usable() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let server = echo_server(listener, TlsAcceptor::new(ca.server()).unwrap());
        let socket = client(&ca.roots(), None);
        socket
            .connect_with(&localhost(), &port, ProtectionLevel::Tls13)
            .await
            .unwrap();
        let err = socket.detach().await.unwrap_err();
        assert_eq!(
            err.status(),
            SocketErrorStatus::UnsupportedOperation,
            "{err}"
        );
        echo_lines(&socket).await;
        server.await.unwrap();
    });
}

/// Through TLS, too: decrypted lines a dropped `input_stream()` had buffered go back to
/// the session, and the next stream reads them first.
#[test]
fn a_tls_input_stream_dropped_with_lines_buffered_gives_them_back() {
    util::on_each_backend(|_| async {
        let ca = Ca::new("ringsock test CA");
        let (listener, port) = listen();
        let acceptor = TlsAcceptor::new(ca.server()).unwrap();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await?;
            socket.accept_tls(&acceptor).await?;
            // One write: one record, decrypted whole by the client's first read.
            socket.write_all(b"one\ntwo\nthree\n".to_vec()).await.0?;
            socket.shutdown_write().await?;
            Ok::<_, Error>(socket)
        });
        let socket = client(&ca.roots(), None);
        socket
            .connect_with(&localhost(), &port, ProtectionLevel::Tls13)
            .await
            .unwrap();
        let mut first = socket.input_stream();
        assert_eq!(first.read_line().await.unwrap().as_deref(), Some("one"));
        assert_eq!(first.buffered(), b"two\nthree\n");
        drop(first);
        for line in ["two", "three"] {
            assert_eq!(
                socket.input_stream().read_line().await.unwrap().as_deref(),
                Some(line)
            );
        }
        assert_eq!(socket.input_stream().read_line().await.unwrap(), None);
        drop(server.await.unwrap());
    });
}

/// Relays TCP between a client and `server`, corrupting the server's bytes once `corrupt`
/// is set (the last byte of each chunk read): a record tampered with on the way.
fn tampering_relay(server: std::net::SocketAddr, corrupt: Arc<AtomicBool>) -> u16 {
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = relay.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (client, _) = relay.accept().unwrap();
        let upstream = std::net::TcpStream::connect(server).unwrap();
        let (mut from_client, mut to_server) =
            (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut from_client, &mut to_server));
        let (mut from_server, mut to_client) = (upstream, client);
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n @ 1..) = from_server.read(&mut buf) {
            if corrupt.load(Ordering::Acquire) {
                buf[n - 1] ^= 0xff;
            }
            if to_client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    port
}

#[test]
fn a_record_tampered_with_after_the_handshake_is_a_tls_protocol_error() {
    util::on_each_backend(|backend| async move {
        let ca = Ca::new("ringsock test CA");
        let (listener, _) = listen();
        let server_addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::new(ca.server()).unwrap();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await?;
            socket.accept_tls(&acceptor).await?;
            let mut input = socket.input_stream();
            // Answers once the client says the relay tampers from now on.
            input.read_line().await?;
            socket
                .write_all(b"a reply the relay corrupts\n".to_vec())
                .await
                .0?;
            let _ = input.read_line().await;
            Ok::<_, Error>(())
        });
        let corrupt = Arc::new(AtomicBool::new(false));
        let relay = tampering_relay(server_addr, corrupt.clone()).to_string();
        let socket = client(&ca.roots(), None);
        socket
            .connect_with(&localhost(), &relay, ProtectionLevel::Tls12)
            .await
            .unwrap();
        corrupt.store(true, Ordering::Release);
        socket.write_all(b"go\n".to_vec()).await.0.unwrap();
        let read = util::must("the tampered reply", socket.input_stream().read_line()).await;
        let (status, message) = status_of(read);
        assert_eq!(
            status,
            SocketErrorStatus::TlsProtocolError,
            "{backend}: {message}"
        );
        drop(socket);
        let _ = util::must("the server", server).await;
    });
}

/// A certificate chain larger than one handshake message a peer takes (64 KiB) is
/// refused when it is loaded, naming the certificate file: a server would otherwise
/// start with it and fail every handshake.
#[test]
fn a_certificate_chain_no_peer_would_take_is_refused_at_load() {
    util::on_each_backend(|_| async {
        let dir = TempDir::new("tls-huge-chain");
        let ca = Ca::new("ringsock test CA");
        let (cert, key) = ca
            .leaf(&["localhost"], LeafOptions::default())
            .write(dir.path(), "server");
        let ca_pem = std::fs::read_to_string(ca.write(dir.path(), "ca.pem")).unwrap();
        let mut chain = std::fs::read_to_string(&cert).unwrap();
        for _ in 0..200 {
            chain.push_str(&ca_pem);
        }
        let huge = dir.path().join("huge-chain.pem");
        std::fs::write(&huge, chain).unwrap();
        Identity::from_pem_files(&cert, &key).expect("the leaf alone loads");
        let err = Identity::from_pem_files(&huge, &key).expect_err("a 200-certificate chain");
        assert_eq!(err.status(), SocketErrorStatus::InvalidFile, "{err}");
        let message = err.to_string();
        assert!(
            message.contains("certificate chain takes") && message.contains("huge-chain.pem"),
            "{message}"
        );
    });
}
