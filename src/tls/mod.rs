//! TLS on a [`StreamSocket`](crate::StreamSocket), with rustls (crypto from *ring*).
//!
//! The client side follows Windows.Networking.Sockets: set a client certificate on the
//! socket's control object, then connect with a protection level; the server's certificate
//! is checked against the system's roots (or a CA bundle given on the control object) and
//! against the host name that was dialled.
//!
//! ```no_run
//! use ringsock::tls::{Identity, ProtectionLevel};
//! use ringsock::{HostName, StreamSocket};
//!
//! ringsock::block_on(async {
//!     let socket = StreamSocket::new();
//!     socket
//!         .control()
//!         .set_client_certificate(Identity::from_pem_files("client.pem", "client.key")?)?;
//!     socket
//!         .connect_with(&HostName::new("example.com")?, "443", ProtectionLevel::Tls12)
//!         .await?;
//!     socket.write_all(b"GET / HTTP/1.0\r\n\r\n".to_vec()).await.0?;
//!     Ok::<_, ringsock::Error>(())
//! })?;
//! # Ok::<_, ringsock::Error>(())
//! ```
//!
//! The server side accepts plain connections from a
//! [`StreamSocketListener`](crate::StreamSocketListener) and runs the handshake on each
//! one with [`StreamSocket::accept_tls`](crate::StreamSocket::accept_tls) and a
//! [`TlsAcceptor`], which may require client certificates signed by a given CA.
//!
//! Once the handshake is done, everything works as on a plain socket: `read`,
//! `write_all`, [`InputStream::read_line`](crate::InputStream::read_line) and the batched
//! [`OutputStream`](crate::OutputStream), whose batch of writes is encrypted into as few
//! records as fit and submitted together.
//!
//! A failed handshake is an [`Error::Tls`](crate::Error::Tls) whose status names the
//! problem like Windows does: `CertificateExpired`, `CertificateUntrustedRoot`,
//! `CertificateCommonNameIsIncorrect`, `CertificateWrongUsage`, `CertificateRevoked`,
//! `CertificateIsInvalid`, `ClientCertificateRequired`, else `TlsHandshakeFailed`. After
//! the handshake, a record that fails authentication or a message that breaks the
//! protocol is `TlsProtocolError`.
//!
//! # Limitations
//!
//! - With TLS 1.3 the client finishes its handshake before the server has checked the
//!   client's certificate; a rejection (for example `ClientCertificateRequired`) then
//!   arrives with the first read, not from `connect_with`.
//! - A socket's [`input_stream`](crate::StreamSocket::input_stream) and
//!   [`output_stream`](crate::StreamSocket::output_stream) see TLS only if they are taken
//!   after the handshake.
//! - Revocation (CRLs, OCSP) is not checked.

use std::fmt;

pub(crate) mod config;
mod errors;
pub(crate) mod session;
mod x509;

pub use config::{
    Identity, TlsAcceptor, TlsAcceptorBuilder, TrustedRoots, DEFAULT_HANDSHAKE_TIMEOUT,
};

/// How a stream socket is protected, like Windows.Networking.Sockets.SocketProtectionLevel.
///
/// As a request (`connect_with`, `upgrade_to_tls`, [`TlsAcceptorBuilder::protection_level`])
/// it is the lowest version accepted: `Tls12` negotiates TLS 1.3 when the peer has it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProtectionLevel {
    /// No encryption: a plain TCP connection.
    PlainSocket,
    /// TLS 1.2 or newer.
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

impl ProtectionLevel {
    /// The name as Windows spells it, e.g. `"Tls12"`.
    pub const fn name(self) -> &'static str {
        match self {
            ProtectionLevel::PlainSocket => "PlainSocket",
            ProtectionLevel::Tls12 => "Tls12",
            ProtectionLevel::Tls13 => "Tls13",
        }
    }

    /// The rustls protocol versions this level allows; empty for `PlainSocket`.
    pub(crate) fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS12_UP: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            ProtectionLevel::PlainSocket => &[],
            ProtectionLevel::Tls12 => &TLS12_UP,
            ProtectionLevel::Tls13 => &TLS13_ONLY,
        }
    }
}

impl fmt::Display for ProtectionLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ProtectionLevel {
    type Err = crate::Error;

    /// Accepts the Windows names and the short forms `plain`, `tls12`/`1.2`, `tls13`/`1.3`.
    fn from_str(s: &str) -> crate::Result<ProtectionLevel> {
        match s.to_ascii_lowercase().as_str() {
            "plainsocket" | "plain" => Ok(ProtectionLevel::PlainSocket),
            "tls12" | "tls1.2" | "1.2" => Ok(ProtectionLevel::Tls12),
            "tls13" | "tls1.3" | "1.3" => Ok(ProtectionLevel::Tls13),
            _ => Err(crate::Error::invalid_input(format!(
                "unknown protection level {s:?}: expected PlainSocket, Tls12 or Tls13"
            ))),
        }
    }
}

/// A certificate in DER form: what a peer presented, or one of an [`Identity`]'s.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Certificate {
    der: Vec<u8>,
}

impl Certificate {
    /// Wraps DER bytes as given; nothing is parsed.
    pub fn from_der(der: impl Into<Vec<u8>>) -> Certificate {
        Certificate { der: der.into() }
    }

    /// The DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Certificate({} bytes of DER)", self.der.len())
    }
}

/// What a finished TLS handshake agreed on (like StreamSocketInformation's
/// ProtectionLevel and ServerCertificate).
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// The negotiated version: `Tls12` or `Tls13`.
    pub protection_level: ProtectionLevel,
    /// The negotiated cipher suite's IANA-style name, e.g. `"TLS13_AES_256_GCM_SHA384"`.
    pub cipher_suite: &'static str,
    /// The peer's certificate chain, end-entity first, as verified: the server's on a
    /// client; on a server, the client's when it presented one.
    pub peer_certificates: Vec<Certificate>,
    /// On a server, the host name the client asked for (SNI), if it sent one.
    pub server_name: Option<String>,
}

impl TlsInfo {
    /// The peer's end-entity certificate, if it presented one.
    pub fn peer_certificate(&self) -> Option<&Certificate> {
        self.peer_certificates.first()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_level_parses_windows_and_short_names() {
        for (text, want) in [
            ("PlainSocket", ProtectionLevel::PlainSocket),
            ("plain", ProtectionLevel::PlainSocket),
            ("Tls12", ProtectionLevel::Tls12),
            ("1.2", ProtectionLevel::Tls12),
            ("TLS13", ProtectionLevel::Tls13),
            ("tls1.3", ProtectionLevel::Tls13),
        ] {
            assert_eq!(text.parse::<ProtectionLevel>().unwrap(), want, "{text}");
        }
        let err = "ssl3".parse::<ProtectionLevel>().unwrap_err();
        assert_eq!(err.status(), crate::SocketErrorStatus::InvalidArgument);
        assert!(err.to_string().contains("ssl3"), "{err}");
    }

    #[test]
    fn protection_level_versions() {
        assert!(ProtectionLevel::PlainSocket.versions().is_empty());
        assert_eq!(ProtectionLevel::Tls12.versions().len(), 2);
        assert_eq!(
            ProtectionLevel::Tls13.versions()[0].version,
            rustls::ProtocolVersion::TLSv1_3
        );
        assert_eq!(ProtectionLevel::Tls12.to_string(), "Tls12");
    }
}
