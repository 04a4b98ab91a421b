//! The `tcp-batch` workload of shared/BENCHMARKS.md, plain and through TLS, until
//! `ringsock bench --workload tcp-batch --tls` exists.
//!
//! The sender (measured) writes M messages of S bytes in groups of B: B writes queued on
//! the OutputStream, then one flush. The receiver is a blocking std socket on its own
//! thread — through TLS a rustls server over that socket (the std side of the same
//! library, no ringsock) — reading into a 256 KiB buffer until it has M*S bytes, checking
//! the sequence number in every message's first 8 bytes. Time: first write to last byte
//! received. `std-per-write` is the baseline: one blocking write per message (through TLS,
//! one rustls record and one write per message).
//!
//! ```sh
//! cargo run --release --example tls_bench -- --impl ringsock-uring --size 64 --count 500000 --tls
//! ```
//!
//! Prints one JSON line per run, like `ringsock bench --json`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use ringsock::runtime::Builder;
use ringsock::tls::{ProtectionLevel, TrustedRoots};
use ringsock::{Backend, HostName, StreamSocket};

thread_local! {
    /// When the sender's last write (or flush) completed.
    static SENDER_DONE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

#[derive(Debug, Clone)]
struct Args {
    implementation: String,
    tls: bool,
    level: ProtectionLevel,
    size: usize,
    batch: usize,
    count: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        implementation: "ringsock-uring".into(),
        tls: false,
        level: ProtectionLevel::Tls13,
        size: 1024,
        batch: 64,
        count: 200_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--impl" => args.implementation = value()?,
            "--tls" => args.tls = true,
            "--tls12" => {
                args.tls = true;
                args.level = ProtectionLevel::Tls12;
            }
            "--size" => args.size = value()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--batch" => args.batch = value()?.parse().map_err(|e| format!("--batch: {e}"))?,
            "--count" => args.count = value()?.parse().map_err(|e| format!("--count: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.size < 8 || args.batch == 0 || args.count == 0 {
        return Err("--size must be at least 8; --batch and --count at least 1".into());
    }
    Ok(args)
}

/// A server certificate for localhost, its CA, as PEM.
struct Certs {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn make_certs() -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    Certs {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn rustls_server_config(certs: &Certs, level: ProtectionLevel) -> Arc<rustls::ServerConfig> {
    use pki_types::pem::PemObject;
    let chain = pki_types::CertificateDer::pem_slice_iter(certs.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = pki_types::PrivateKeyDer::from_pem_slice(certs.key_pem.as_bytes()).unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = match level {
        ProtectionLevel::Tls12 => &[&rustls::version::TLS12],
        _ => &[&rustls::version::TLS13],
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    Arc::new(config)
}

/// Message `seq`: its sequence number, then filler.
fn message(seq: u64, size: usize) -> Vec<u8> {
    let mut msg = vec![0x5a; size];
    msg[..8].copy_from_slice(&seq.to_le_bytes());
    msg
}

/// Reads until `total` bytes arrived, checking every message's sequence number.
fn receive(mut stream: impl Read, size: usize, total: usize) -> Result<Instant, String> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    let mut header = [0u8; 8];
    while got < total {
        let n = stream.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            return Err(format!("stream ended after {got} of {total} bytes"));
        }
        // Visit only the 8 header bytes of each message, not every byte.
        let mut pos = 0;
        while pos < n {
            let at = got + pos;
            let offset = at % size;
            if offset >= 8 {
                pos += size - offset;
                continue;
            }
            let take = (8 - offset).min(n - pos);
            header[offset..offset + take].copy_from_slice(&buf[pos..pos + take]);
            pos += take;
            if offset + take == 8 {
                let (seq, want) = (u64::from_le_bytes(header), (at / size) as u64);
                if seq != want {
                    return Err(format!("message {want} arrived as {seq}: order lost"));
                }
            }
        }
        got += n;
    }
    Ok(Instant::now())
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("tls_bench: {err}");
            std::process::exit(2);
        }
    };
    let certs = args.tls.then(make_certs);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let total = args.size * args.count;
    let server_config = certs.as_ref().map(|c| rustls_server_config(c, args.level));
    let size = args.size;
    let receiver = std::thread::spawn(move || -> Result<Instant, String> {
        let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        match server_config {
            Some(config) => {
                let conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
                receive(rustls::StreamOwned::new(conn, stream), size, total)
            }
            None => receive(stream, size, total),
        }
    });

    // The sending socket stays open until the receiver has everything: closing a socket
    // with unread input (a TLS 1.3 server's session tickets) resets the connection and
    // throws away what the kernel had not yet sent.
    let mut runtime = None;
    let (start, syscalls, sender) = match args.implementation.as_str() {
        "ringsock-uring" | "ringsock-epoll" => {
            let backend = if args.implementation == "ringsock-uring" {
                Backend::Uring
            } else {
                Backend::Epoll
            };
            let rt = runtime.insert(Builder::new().backend(backend).build().unwrap());
            let (start, syscalls, socket) =
                rt.block_on(ringsock_sender(&args, certs.as_ref(), port));
            (
                start,
                Some(syscalls),
                Box::new(socket) as Box<dyn std::any::Any>,
            )
        }
        "std-per-write" => {
            let (start, writer) = std_sender(&args, certs.as_ref(), port);
            (start, None, Box::new(writer) as Box<dyn std::any::Any>)
        }
        other => {
            eprintln!("tls_bench: unknown --impl {other}");
            std::process::exit(2);
        }
    };
    let received = receiver.join().unwrap();
    drop(sender);
    drop(runtime);
    let end = match received {
        Ok(end) => end,
        Err(err) => {
            eprintln!("tls_bench: {err}");
            std::process::exit(1);
        }
    };
    let secs = end.duration_since(start).as_secs_f64();
    let sender_secs = SENDER_DONE
        .with(|done| done.get())
        .map_or(secs, |done| done.duration_since(start).as_secs_f64());
    let syscalls_per_msg = syscalls.map_or("null".to_string(), |n| {
        format!("{:.4}", n as f64 / args.count as f64)
    });
    let tls = if args.tls {
        format!("\"{}\"", args.level)
    } else {
        "null".to_string()
    };
    println!(
        "{{\"impl\":\"{}\",\"workload\":\"tcp-batch\",\"tls\":{tls},\"size\":{},\"batch\":{},\
         \"count\":{},\"secs\":{secs:.4},\"sender_secs\":{sender_secs:.4},\"msgs_per_s\":{:.1},\"mb_per_s\":{:.2},\
         \"syscalls_per_msg\":{syscalls_per_msg}}}",
        args.implementation,
        args.size,
        args.batch,
        args.count,
        args.count as f64 / secs,
        total as f64 / secs / 1e6,
    );
}

/// Groups of `batch` writes on the OutputStream, one flush each. Returns the start time
/// and the sender's system calls.
async fn ringsock_sender(
    args: &Args,
    certs: Option<&Certs>,
    port: u16,
) -> (Instant, u64, StreamSocket) {
    let socket = StreamSocket::new();
    let host = HostName::new("localhost").unwrap();
    let port = port.to_string();
    match certs {
        Some(certs) => {
            let roots = TrustedRoots::from_pem(certs.ca_pem.as_bytes()).unwrap();
            socket.control().set_trusted_roots(roots).unwrap();
            socket.connect_with(&host, &port, args.level).await.unwrap();
        }
        None => socket.connect(&host, &port).await.unwrap(),
    }
    let output = socket.output_stream();
    let before = ringsock::runtime::driver_stats().unwrap_or_default();
    let start = Instant::now();
    let mut seq = 0u64;
    while (seq as usize) < args.count {
        let group = args.batch.min(args.count - seq as usize);
        for _ in 0..group {
            output.write(message(seq, args.size)).await.unwrap();
            seq += 1;
        }
        output.flush().await.unwrap();
    }
    let after = ringsock::runtime::driver_stats().unwrap_or_default();
    drop(output);
    SENDER_DONE.with(|done| done.set(Some(Instant::now())));
    (start, after.syscalls() - before.syscalls(), socket)
}

/// One blocking write per message.
fn std_sender(args: &Args, certs: Option<&Certs>, port: u16) -> (Instant, Box<dyn Write>) {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut writer: Box<dyn Write> = match certs {
        Some(certs) => {
            use pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(pki_types::CertificateDer::from_pem_slice(certs.ca_pem.as_bytes()).unwrap())
                .unwrap();
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = pki_types::ServerName::try_from("localhost").unwrap();
            let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
            let mut stream = stream;
            while conn.is_handshaking() {
                conn.complete_io(&mut stream).unwrap();
            }
            // Unbuffered: each message becomes one record and one write.
            Box::new(PerRecord {
                stream: rustls::StreamOwned::new(conn, stream),
            })
        }
        None => Box::new(stream),
    };
    let start = Instant::now();
    for seq in 0..args.count as u64 {
        writer.write_all(&message(seq, args.size)).unwrap();
    }
    writer.flush().unwrap();
    SENDER_DONE.with(|done| done.set(Some(Instant::now())));
    (start, writer)
}

/// A rustls stream that sends each write at once (as a blocking per-write program would).
struct PerRecord {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl Write for PerRecord {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.stream.write(buf)?;
        self.stream.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}
