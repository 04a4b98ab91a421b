//! tcp-batch `--tls`: TLS 1.3 on both sides, with a test certificate built into the
//! bench, so that a user can measure TLS without making certificates.
//!
//! The certificate (ECDSA P-256, for `localhost`, 127.0.0.1 and ::1) and its CA were
//! made once with openssl, valid from 2020 to 2120. Its private key is public, here:
//! it protects nothing and must never be trusted outside this bench.
//!
//! The receiver is a rustls server over the plain blocking std socket (the std side of
//! the same library, no ringsock); the std-per-write baseline a rustls client writing
//! one record, and one system call, per message.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use ringsock::tls::TrustedRoots;
use ringsock::{Error, Result};

/// The CA that signed [`CERT_PEM`].
pub const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBdjCCARygAwIBAgICEAAwCgYIKoZIzj0EAwIwITEfMB0GA1UEAwwWcmluZ3Nv
Y2sgYmVuY2ggdGVzdCBDQTAgFw0yMDAxMDEwMDAwMDBaGA8yMTIwMDEwMTAwMDAw
MFowITEfMB0GA1UEAwwWcmluZ3NvY2sgYmVuY2ggdGVzdCBDQTBZMBMGByqGSM49
AgEGCCqGSM49AwEHA0IABIuNSy9TfR0j5a6cSKTD04ORfVge3JK5gchYGI6bLCO8
kifO4tx5DVWHgV8Wi2/eMS80hvyJG3PDVkbQf0CCJi6jQjBAMA8GA1UdEwEB/wQF
MAMBAf8wDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQWBBSl4NjFWnerI/ykbhdNE+PL
Ex6LoDAKBggqhkjOPQQDAgNIADBFAiEAmM/ofuBbIHYpJL5+alXls51tgGsS+UFm
GdWUEamMNNUCIDZ3aHyug/1EqRP0WhWcm3lbtOWhGaC1yrsYA42nga+d
-----END CERTIFICATE-----
";

/// The receiver's certificate: `localhost`, 127.0.0.1 and ::1, server authentication.
pub const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBzDCCAXKgAwIBAgICEAEwCgYIKoZIzj0EAwIwITEfMB0GA1UEAwwWcmluZ3Nv
Y2sgYmVuY2ggdGVzdCBDQTAgFw0yMDAxMDEwMDAwMDBaGA8yMTIwMDEwMTAwMDAw
MFowFDESMBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcD
QgAEZIWJrgXI8yFTb6nm4PpIHIxXGyD+KrkzfeZ5xjJ75aNfFt+cGYLdlOowIceS
eZabni510FAznpEJGxk7WGP1cKOBpDCBoTAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB
/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcDATAsBgNVHREEJTAjgglsb2NhbGhv
c3SHBH8AAAGHEAAAAAAAAAAAAAAAAAAAAAEwHQYDVR0OBBYEFOrM8UiwvlJF77v6
l6ssELC14gueMB8GA1UdIwQYMBaAFKXg2MVad6sj/KRuF00T48sTHougMAoGCCqG
SM49BAMCA0gAMEUCIFTaLbzd7PVlRd69oUAHOP6MFe/6XV5CNmO6cmTzbffIAiEA
w20p5iqG+Zwx7pfQaHYLflXeGcZYT3ltLt3151n7sWw=
-----END CERTIFICATE-----
";

/// The private key of [`CERT_PEM`] (PKCS#8). Public: a test key, for this bench only.
pub const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgi916YJxSVTu+TNnk
ZWyzy7u6h5KRMdzo7/RLZtYdvy+hRANCAARkhYmuBcjzIVNvqebg+kgcjFcbIP4q
uTN95nnGMnvlo18W35wZgt2U6jAhx5J5lpueLnXQUDOekQkbGTtYY/Vw
-----END PRIVATE KEY-----
";

/// The name the certificate carries and the senders check.
pub const SERVER_NAME: &str = "localhost";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, err: impl std::fmt::Display) -> Error {
    Error::invalid_input(format!("bench TLS {what}: {err}"))
}

/// The receiver's configuration: TLS 1.3 only, the built-in certificate.
pub(crate) fn server_config() -> Result<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_slice_iter(CERT_PEM.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error("certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(KEY_PEM.as_bytes()).map_err(|e| tls_error("key", e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("server", e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls_error("server", e))?;
    Ok(Arc::new(config))
}

/// The receiver's side of one connection: a rustls server over the blocking socket; the
/// handshake runs in its first reads.
pub(crate) fn server_stream(
    stream: TcpStream,
) -> Result<rustls::StreamOwned<rustls::ServerConnection, TcpStream>> {
    let conn =
        rustls::ServerConnection::new(server_config()?).map_err(|e| tls_error("server", e))?;
    Ok(rustls::StreamOwned::new(conn, stream))
}

/// The roots a ringsock sender trusts: the built-in CA only.
pub(crate) fn trusted_roots() -> Result<TrustedRoots> {
    TrustedRoots::from_pem(CA_PEM.as_bytes())
}

/// A socket that counts the `read` and `write` calls made on it.
pub(crate) struct Counted {
    stream: TcpStream,
    /// System calls made since the last reset.
    pub(crate) calls: u64,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        self.stream.read(buf)
    }
}

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        self.stream.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.calls += 1;
        self.stream.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The std-per-write sender through TLS: each `write_message` is one record and one
/// `write` system call, as a blocking per-write program sends.
pub(crate) struct StdTlsSender {
    stream: rustls::StreamOwned<rustls::ClientConnection, Counted>,
}

impl StdTlsSender {
    /// Connects TLS 1.3 over `stream` (the handshake completes here), checking the
    /// built-in certificate.
    pub(crate) fn handshake(stream: TcpStream) -> Result<StdTlsSender> {
        let mut roots = rustls::RootCertStore::empty();
        let ca =
            CertificateDer::from_pem_slice(CA_PEM.as_bytes()).map_err(|e| tls_error("CA", e))?;
        roots.add(ca).map_err(|e| tls_error("CA", e))?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_error("client", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(SERVER_NAME).map_err(|e| tls_error("name", e))?;
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
            .map_err(|e| tls_error("client", e))?;
        let mut socket = Counted { stream, calls: 0 };
        while conn.is_handshaking() {
            conn.complete_io(&mut socket)
                .map_err(|e| Error::io("TLS handshake", e))?;
        }
        socket.calls = 0;
        Ok(StdTlsSender {
            stream: rustls::StreamOwned::new(conn, socket),
        })
    }

    /// Sends `msg` as one record at once.
    pub(crate) fn write_message(&mut self, msg: &[u8]) -> io::Result<()> {
        self.stream.write_all(msg)?;
        self.stream.flush()
    }

    /// System calls since the handshake.
    pub(crate) fn calls(&self) -> u64 {
        self.stream.sock.calls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_certificate_loads() {
        server_config().unwrap();
        trusted_roots().unwrap();
    }

    #[test]
    fn std_sender_and_receiver_talk_tls13() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let rx = std::thread::spawn(move || {
            let mut stream = server_stream(server).unwrap();
            let mut buf = [0u8; 10];
            stream.read_exact(&mut buf).unwrap();
            let version = stream.conn.protocol_version();
            (buf, version)
        });
        let mut sender = StdTlsSender::handshake(client).unwrap();
        sender.write_message(b"0123456789").unwrap();
        assert_eq!(sender.calls(), 1, "one record, one write");
        let (got, version) = rx.join().unwrap();
        assert_eq!(&got, b"0123456789");
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
    }
}
