//! `ringsock echo-server --tls-cert ...` and `ringsock echo-client --tls ...`, run as a user
//! would, on both drivers.

// The certificate helpers of the library's TLS tests, shared rather than copied.
#[path = "../../tests/tls_certs/mod.rs"]
mod tls_certs;
mod util;

use std::process::{Command, Output};

use tls_certs::{Ca, LeafOptions, TempDir};
use util::echo_server::EchoServer;

const BACKENDS: [&str; 2] = ["uring", "epoll"];

fn ringsock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .args(args)
        .env_remove("RINGSOCK_BACKEND")
        .output()
        .expect("run ringsock")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The files of one run: a server CA and certificate, a client CA and certificate.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new("cli-tls");
        let server_ca = Ca::new("cli server CA");
        let client_ca = Ca::new("cli client CA");
        server_ca.write(dir.path(), "server-ca.pem");
        client_ca.write(dir.path(), "client-ca.pem");
        server_ca
            .leaf(&["localhost", "127.0.0.1"], LeafOptions::default())
            .write(dir.path(), "server");
        client_ca
            .leaf(
                &["cli-client"],
                LeafOptions {
                    client_only: true,
                    ..LeafOptions::default()
                },
            )
            .write(dir.path(), "client");
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// The TLS echo server, requiring client certificates from the test CA when asked.
fn start_server(pki: &Pki, backend: &str, client_ca: bool) -> EchoServer {
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("client-ca.pem"),
    );
    let mut args = vec!["--tcp", "127.0.0.1:0", "--backend", backend];
    args.extend(["--tls-cert", &cert, "--tls-key", &key]);
    if client_ca {
        args.extend(["--client-ca", &ca]);
    }
    EchoServer::start(&args, &["tcp"])
}

#[test]
fn tls_echo_with_a_client_certificate() {
    let pki = Pki::new();
    for server_backend in BACKENDS {
        let server = start_server(&pki, server_backend, true);
        for client_backend in BACKENDS {
            for level in ["Tls12", "Tls13"] {
                let out = ringsock(&[
                    "echo-client",
                    "localhost",
                    server.port(),
                    "--tls",
                    "--tls-level",
                    level,
                    "--ca",
                    &pki.path("server-ca.pem"),
                    "--client-cert",
                    &pki.path("client.pem"),
                    "--client-key",
                    &pki.path("client.key"),
                    "--message",
                    "over TLS",
                    "--backend",
                    client_backend,
                ]);
                assert!(out.status.success(), "{}", text(&out.stderr));
                assert_eq!(text(&out.stdout), "over TLS\n");
            }
        }
        // By IP address, checked against the name given with --server-name.
        let out = ringsock(&[
            "echo-client",
            "127.0.0.1",
            server.port(),
            "--tls",
            "--ca",
            &pki.path("server-ca.pem"),
            "--server-name",
            "localhost",
            "--client-cert",
            &pki.path("client.pem"),
            "--client-key",
            &pki.path("client.key"),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "Hello, World!\n");
        assert!(server.stop().success());
    }
}

#[test]
fn tls_failures_are_one_status_line() {
    let pki = Pki::new();
    let server = start_server(&pki, "epoll", true);
    let ca = pki.path("server-ca.pem");
    let dir = pki.dir.path().display().to_string();
    let is_a_dir = format!("error: InvalidFile: read the CA bundle file {dir}: ");
    let client_key = pki.path("client.key");
    let not_pem = format!("error: InvalidFile: invalid file {client_key}: no CERTIFICATE section");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // No client certificate for a server that requires one.
        (vec!["--ca", &ca], "error: ClientCertificateRequired: "),
        // The system's roots do not know our CA.
        (vec![], "error: CertificateUntrustedRoot: "),
        // The certificate is for localhost, not this name.
        (
            vec!["--ca", &ca, "--server-name", "example.com"],
            "error: CertificateCommonNameIsIncorrect: ",
        ),
        // A bad file is a file error naming it, not a panic.
        (
            vec!["--ca", "/nonexistent/ca.pem"],
            "error: FileNotFound: read the CA bundle file /nonexistent/ca.pem: ",
        ),
        (vec!["--ca", &dir], is_a_dir.as_str()),
        (vec!["--ca", &client_key], not_pem.as_str()),
    ];
    for (extra, prefix) in cases {
        for backend in BACKENDS {
            let mut args = vec!["echo-client", "localhost", server.port(), "--tls"];
            args.extend(&extra);
            args.extend(["--backend", backend]);
            let out = ringsock(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(stderr.starts_with(prefix), "{args:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        }
    }
    assert!(server.stop().success());
}

#[test]
fn unusable_server_files_fail_at_start_with_a_file_status() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let missing = pki.path("missing.key");
    let under_a_file = format!("{cert}/server.key");
    let cases: Vec<([&str; 2], String)> = vec![
        (
            [&cert, &missing],
            format!("error: FileNotFound: read the private key file {missing}: "),
        ),
        (
            [&cert, &under_a_file],
            format!("error: FileNotFound: read the private key file {under_a_file}: "),
        ),
        (
            [&key, &key],
            format!("error: InvalidFile: invalid file {key}: no CERTIFICATE section"),
        ),
    ];
    for ([cert, key], prefix) in &cases {
        for backend in BACKENDS {
            let args = [
                "echo-server",
                "--tcp",
                "127.0.0.1:0",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
                "--backend",
                backend,
            ];
            let out = ringsock(&args);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(stderr.starts_with(prefix.as_str()), "{args:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        }
    }
}

#[test]
fn a_missing_system_roots_file_is_named() {
    let pki = Pki::new();
    let server = start_server(&pki, "epoll", false);
    let missing = pki.path("no-roots.pem");
    for backend in BACKENDS {
        let out = Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .args(["echo-client", "localhost", server.port(), "--tls"])
            .args(["--backend", backend])
            .env_remove("RINGSOCK_BACKEND")
            .env_remove("SSL_CERT_DIR")
            .env("SSL_CERT_FILE", &missing)
            .output()
            .expect("run ringsock");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.starts_with("error: FileNotFound: "), "{stderr}");
        assert!(stderr.contains(&missing), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    assert!(server.stop().success());
}

#[test]
fn tls_usage_errors_exit_2() {
    for args in [
        &["echo-server", "--tcp", "127.0.0.1:0", "--tls-cert", "c.pem"][..],
        &[
            "echo-server",
            "--udp",
            "127.0.0.1:0",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ],
        &["echo-client", "localhost", "1", "--ca", "ca.pem"],
        &[
            "echo-client",
            "localhost",
            "1",
            "--tls",
            "--client-cert",
            "c.pem",
        ],
        &["echo-client", "localhost", "1", "--tls", "--udp"],
        &[
            "echo-client",
            "localhost",
            "1",
            "--tls",
            "--tls-level",
            "ssl3",
        ],
    ] {
        let out = ringsock(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

/// A certificate, key or CA path that is a FIFO no one writes to (a `mkfifo` left where
/// the file was meant to be) fails as a file without a PEM section, on both engines,
/// instead of holding the server or the client in the open forever.
#[test]
fn a_tls_file_that_is_a_fifo_without_a_writer_is_refused_not_waited_on() {
    let pki = Pki::new();
    let fifo = pki.path("fifo.pem");
    let c_fifo = std::ffi::CString::new(fifo.as_str()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let server = |cert: &str, key: &str| {
        [
            "echo-server",
            "--tcp",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let client = ["echo-client", "localhost", "1", "--tls", "--ca", &fifo]
        .map(str::to_owned)
        .to_vec();
    for args in [server(&fifo, &key), server(&cert, &fifo), client] {
        for backend in BACKENDS {
            let out = util::output_within(
                Command::new(env!("CARGO_BIN_EXE_ringsock"))
                    .args(&args)
                    .args(["--backend", backend])
                    .env_remove("RINGSOCK_BACKEND"),
            );
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(
                stderr.starts_with(&format!("error: InvalidFile: invalid file {fifo}: ")),
                "{args:?}: {stderr}"
            );
        }
    }
}
