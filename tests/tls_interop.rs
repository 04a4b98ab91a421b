//! TLS against peers nobody here wrote, on both drivers: our client against
//! `openssl s_server -Verify`, our server against `openssl s_client` and Python's `ssl`.
//! With OpenSSL every cipher suite of ring's provider that fits an ECDSA certificate is
//! forced in turn: TLS 1.3 AES-256-GCM, AES-128-GCM, ChaCha20-Poly1305; TLS 1.2
//! ECDHE-ECDSA with the same three.
//!
//! Each test needs its tool on PATH (Debian packages `openssl`, `python3`). Without it the
//! test says it skipped; with `RINGSOCK_REQUIRE_INTEROP=1` (as CI sets) it fails instead.
//! Every external process runs under `timeout`, so a stuck peer cannot hang the suite.

mod tls_certs;
mod util;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use ringsock::tls::{ProtectionLevel, TlsAcceptor};
use ringsock::{Backend, Error, HostName, SocketErrorStatus, StreamSocket, StreamSocketListener};
use tls_certs::{Ca, LeafOptions, TempDir};

/// Seconds any external peer may live.
const PEER_LIMIT: &str = "60";

/// True if `tool` runs; else says the test is skipped (or fails, when required).
fn have(tool: &str, version_arg: &str) -> bool {
    let found = Command::new(tool)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        if std::env::var_os("RINGSOCK_REQUIRE_INTEROP").is_some() {
            panic!("{tool} is required (RINGSOCK_REQUIRE_INTEROP) but does not run");
        }
        eprintln!("skipped: {tool} not found (apt-get install {tool})");
    }
    found
}

/// The certificates of one interop run, written to files for the external tools.
struct Files {
    dir: TempDir,
    server_ca: Ca,
    client_ca: Ca,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = TempDir::new(tag);
        let server_ca = Ca::new("interop server CA");
        let client_ca = Ca::new("interop client CA");
        let files = Files {
            dir,
            server_ca,
            client_ca,
        };
        files.server_ca.write(files.dir.path(), "server-ca.pem");
        files.client_ca.write(files.dir.path(), "client-ca.pem");
        files
            .server_ca
            .leaf(&["localhost", "127.0.0.1"], LeafOptions::default())
            .write(files.dir.path(), "server");
        files
            .client_ca
            .leaf(
                &["interop-client"],
                LeafOptions {
                    client_only: true,
                    ..LeafOptions::default()
                },
            )
            .write(files.dir.path(), "client");
        files
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn version_flag(level: ProtectionLevel) -> &'static str {
    match level {
        ProtectionLevel::Tls13 => "-tls1_3",
        _ => "-tls1_2",
    }
}

/// Starts `openssl s_server -rev` (answers each line reversed) requiring a client
/// certificate from the client CA; returns it with the port it listens on.
/// `openssl s_server` flags that allow exactly one cipher suite of `level`.
fn only_suite(level: ProtectionLevel, openssl_name: &str) -> [&str; 2] {
    match level {
        ProtectionLevel::Tls13 => ["-ciphersuites", openssl_name],
        _ => ["-cipher", openssl_name],
    }
}

/// The cipher suites our client is checked with, each as OpenSSL and as rustls name it.
const SUITES: [(ProtectionLevel, &str, &str); 6] = [
    (
        ProtectionLevel::Tls13,
        "TLS_AES_256_GCM_SHA384",
        "TLS13_AES_256_GCM_SHA384",
    ),
    (
        ProtectionLevel::Tls13,
        "TLS_AES_128_GCM_SHA256",
        "TLS13_AES_128_GCM_SHA256",
    ),
    (
        ProtectionLevel::Tls13,
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS13_CHACHA20_POLY1305_SHA256",
    ),
    (
        ProtectionLevel::Tls12,
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    ),
    (
        ProtectionLevel::Tls12,
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ),
    (
        ProtectionLevel::Tls12,
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
];

fn start_s_server(files: &Files, level: ProtectionLevel, suite: Option<&str>) -> (Child, u16) {
    let mut command = Command::new("timeout");
    command
        .arg(PEER_LIMIT)
        .args([
            "openssl",
            "s_server",
            "-accept",
            "127.0.0.1:0",
            "-naccept",
            "1",
        ])
        .args(["-rev", "-Verify", "1", "-verify_return_error"])
        .args(["-cert", &files.path("server.pem")])
        .args(["-key", &files.path("server.key")])
        .args(["-CAfile", &files.path("client-ca.pem")])
        .arg(version_flag(level));
    if let Some(suite) = suite {
        command.args(only_suite(level, suite));
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start openssl s_server");
    match listening_port(&mut child) {
        Some(port) => (child, port),
        None => {
            let status = child.wait();
            panic!("openssl s_server ended before listening: {status:?}");
        }
    }
}

/// Reads s_server's output up to its `ACCEPT host:port` line, then keeps draining it in
/// the background so it never blocks on a full pipe.
fn listening_port(child: &mut Child) -> Option<u16> {
    let mut stdout = BufReader::new(child.stdout.take()?);
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(addr) = line.trim().strip_prefix("ACCEPT ") {
            let port = addr.rsplit(':').next()?.parse().ok()?;
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            return Some(port);
        }
    }
}

#[test]
fn our_client_against_openssl_s_server_verify() {
    if !have("openssl", "version") {
        return;
    }
    let files = Files::new("s_server");
    for (level, openssl_suite, rustls_suite) in SUITES {
        for backend in util::BACKENDS {
            if !uring_available(backend) {
                continue;
            }
            let (mut server, port) = start_s_server(&files, level, Some(openssl_suite));
            util::on_backend(backend, &|_| async {
                let socket = StreamSocket::new();
                let control = socket.control();
                control.set_trusted_roots(files.server_ca.roots()).unwrap();
                control
                    .set_client_certificate(
                        ringsock::tls::Identity::from_pem_files(
                            files.path("client.pem"),
                            files.path("client.key"),
                        )
                        .unwrap(),
                    )
                    .unwrap();
                socket
                    .connect_with(
                        &HostName::new("localhost").unwrap(),
                        &port.to_string(),
                        level,
                    )
                    .await
                    .unwrap();
                let info = socket.tls_info().unwrap();
                assert_eq!(info.protection_level, level);
                assert_eq!(info.cipher_suite, rustls_suite);
                socket
                    .write_all(b"hello ringsock\n".to_vec())
                    .await
                    .0
                    .unwrap();
                let reply = socket.input_stream().read_line().await.unwrap();
                assert_eq!(
                    reply.as_deref(),
                    Some("kcosgnir olleh"),
                    "the line reversed"
                );
                socket.shutdown_write().await.unwrap();
            });
            assert!(server.wait().unwrap().success(), "openssl s_server failed");
        }
    }
}

#[test]
fn our_client_without_certificate_against_openssl_s_server_verify() {
    if !have("openssl", "version") {
        return;
    }
    let files = Files::new("s_server-nocert");
    for level in [ProtectionLevel::Tls12, ProtectionLevel::Tls13] {
        for backend in util::BACKENDS {
            if !uring_available(backend) {
                continue;
            }
            let (mut server, port) = start_s_server(&files, level, None);
            util::on_backend(backend, &|_| async {
                let socket = StreamSocket::new();
                socket
                    .control()
                    .set_trusted_roots(files.server_ca.roots())
                    .unwrap();
                let host = HostName::new("localhost").unwrap();
                let result = match socket.connect_with(&host, &port.to_string(), level).await {
                    Err(err) => Err(err),
                    Ok(()) => socket.read(Vec::with_capacity(64)).await.0,
                };
                let err = result.expect_err("the server requires a certificate");
                assert_eq!(
                    err.status(),
                    SocketErrorStatus::ClientCertificateRequired,
                    "{backend} {level}: {err}"
                );
            });
            let _ = server.wait();
        }
    }
}

/// What our server saw of a client it served.
#[derive(Debug, PartialEq)]
struct Served {
    client_certificates: usize,
    cipher_suite: &'static str,
}

/// Runs our TLS echo server (one connection, one line, then close) on its own thread and
/// runtime; gives its port and a handle to its outcome (the peer's certificate count).
fn spawn_our_server(
    backend: Backend,
    files: &Files,
    level: ProtectionLevel,
) -> (u16, std::thread::JoinHandle<Result<Served, String>>) {
    let cert = files.path("server.pem");
    let key = files.path("server.key");
    let client_ca = files.path("client-ca.pem");
    let (port_tx, port_rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let outcome = std::cell::RefCell::new(Err("did not run".to_string()));
        util::on_backend(backend, &|_| async {
            let identity = ringsock::tls::Identity::from_pem_files(&cert, &key).unwrap();
            let roots = ringsock::tls::TrustedRoots::from_pem_file(&client_ca).unwrap();
            let acceptor = TlsAcceptor::builder(identity)
                .max_protection_level(level)
                .require_client_certificate(roots)
                .build()
                .unwrap();
            let listener =
                StreamSocketListener::bind_host(&HostName::new("127.0.0.1").unwrap(), "0").unwrap();
            port_tx.send(listener.local_addr().unwrap().port()).unwrap();
            let result = async {
                let socket = listener.accept().await?;
                socket.accept_tls(&acceptor).await?;
                let info = socket.tls_info().unwrap();
                assert_eq!(info.protection_level, level);
                let line = socket.input_stream().read_line().await?.unwrap_or_default();
                socket.write_all(format!("{line}\n").into_bytes()).await.0?;
                socket.shutdown_write().await?;
                Ok::<_, Error>(Served {
                    client_certificates: info.peer_certificates.len(),
                    cipher_suite: info.cipher_suite,
                })
            }
            .await;
            *outcome.borrow_mut() = result.map_err(|err| format!("{}: {err}", err.status()));
        });
        outcome.into_inner()
    });
    let port = port_rx.recv().expect("our server started");
    (port, handle)
}

/// Runs `openssl s_client` against our server: sends a line, reads the echo.
fn s_client(
    files: &Files,
    port: u16,
    level: ProtectionLevel,
    suite: Option<&str>,
    with_cert: bool,
) -> Option<String> {
    let mut command = Command::new("timeout");
    command
        .arg(PEER_LIMIT)
        .args(["openssl", "s_client", "-quiet", "-verify_return_error"])
        .args(["-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost"])
        .args(["-CAfile", &files.path("server-ca.pem")])
        .arg(version_flag(level));
    if let Some(suite) = suite {
        command.args(only_suite(level, suite));
    }
    if with_cert {
        command
            .args(["-cert", &files.path("client.pem")])
            .args(["-key", &files.path("client.key")]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    // A client the server refused may be gone already (EPIPE): the reply says the rest.
    let _ = stdin.write_all(b"hello from openssl\n");
    let mut reply = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut reply)
        .unwrap();
    drop(stdin);
    let _ = child.wait();
    (!reply.is_empty()).then(|| reply.trim_end().to_string())
}

#[test]
fn openssl_s_client_against_our_server() {
    if !have("openssl", "version") {
        return;
    }
    let files = Files::new("s_client");
    for (level, openssl_suite, rustls_suite) in SUITES {
        for backend in util::BACKENDS {
            if !uring_available(backend) {
                continue;
            }
            let (port, server) = spawn_our_server(backend, &files, level);
            let reply = s_client(&files, port, level, Some(openssl_suite), true);
            assert_eq!(
                reply.as_deref(),
                Some("hello from openssl"),
                "{backend} {level}"
            );
            let served = Served {
                client_certificates: 1,
                cipher_suite: rustls_suite,
            };
            assert_eq!(server.join().unwrap(), Ok(served), "{backend} {level}");

            // Without a client certificate: refused, with the status saying why.
            let (port, server) = spawn_our_server(backend, &files, level);
            assert_eq!(s_client(&files, port, level, None, false), None);
            let outcome = server.join().unwrap().unwrap_err();
            assert!(
                outcome.starts_with("ClientCertificateRequired"),
                "{backend} {level}: {outcome}"
            );
        }
    }
}

/// A TLS client in Python's `ssl` module: sends a line, prints version, cipher and echo.
const PYTHON_CLIENT: &str = r#"
import socket, ssl, sys
port, ca, cert, key, version = sys.argv[1:6]
ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
ctx.load_cert_chain(cert, key)
ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"hello from python\n")
        data = b""
        while True:  # to the server's close_notify, so our server closes first
            chunk = tls.recv(4096)
            if not chunk:
                break
            data += chunk
        print(tls.version(), tls.cipher()[0], data.decode().strip())
"#;

#[test]
fn python_ssl_client_against_our_server() {
    if !have("python3", "--version") {
        return;
    }
    let files = Files::new("python");
    for (level, version) in [
        (ProtectionLevel::Tls12, "TLSv1_2"),
        (ProtectionLevel::Tls13, "TLSv1_3"),
    ] {
        for backend in util::BACKENDS {
            if !uring_available(backend) {
                continue;
            }
            let (port, server) = spawn_our_server(backend, &files, level);
            let output = Command::new("timeout")
                .arg(PEER_LIMIT)
                .args(["python3", "-c", PYTHON_CLIENT, &port.to_string()])
                .arg(files.path("server-ca.pem"))
                .arg(files.path("client.pem"))
                .arg(files.path("client.key"))
                .arg(version)
                .output()
                .expect("run python3");
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{backend} {level}: {stderr}");
            eprintln!("{backend}: python ssl: {}", stdout.trim());
            let expected_version = version.replace('_', ".");
            assert!(stdout.starts_with(&expected_version), "{stdout}");
            assert!(stdout.trim_end().ends_with("hello from python"), "{stdout}");
            let served = server.join().unwrap().unwrap();
            assert_eq!(served.client_certificates, 1, "{backend} {level}");
        }
    }
}

/// False (with a note) when io_uring cannot start here and is not required, as the
/// shared harness does for in-process tests.
fn uring_available(backend: Backend) -> bool {
    if backend != Backend::Uring || std::env::var_os("RINGSOCK_REQUIRE_URING").is_some() {
        return true;
    }
    match ringsock::runtime::Builder::new().backend(backend).build() {
        Ok(_) => true,
        Err(err) => {
            eprintln!("skipped on io_uring: {err}");
            false
        }
    }
}
