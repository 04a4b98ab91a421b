//! rustls errors as [`Error::Tls`] with the Windows-style status that names the problem.

use rustls::{AlertDescription, CertificateError};

use crate::{Error, SocketErrorStatus as S};

/// Which end of the connection we are: decides whose certificate an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

/// What is known besides the error itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Situation {
    pub(crate) side: Side,
    /// Still in the handshake (else the data phase).
    pub(crate) handshaking: bool,
    /// Client only: the server sent a certificate request.
    pub(crate) certificate_requested: bool,
    /// Client only: a client certificate was set.
    pub(crate) has_certificate: bool,
}

/// Maps a rustls error to an [`Error::Tls`].
pub(crate) fn map(err: &rustls::Error, at: Situation) -> Error {
    let peer = match at.side {
        Side::Client => "the server's certificate",
        Side::Server => "the client's certificate",
    };
    let (status, message) = match err {
        rustls::Error::InvalidCertificate(cert) => certificate(cert, peer),
        rustls::Error::NoCertificatesPresented => match at.side {
            Side::Server => (
                S::ClientCertificateRequired,
                "the client presented no certificate, and this server requires one".to_owned(),
            ),
            Side::Client => (
                S::CertificateIsInvalid,
                "the server presented no certificate".to_owned(),
            ),
        },
        rustls::Error::AlertReceived(alert) => alert_received(*alert, at),
        rustls::Error::PeerIncompatible(why) => (
            S::TlsHandshakeFailed,
            format!("the peer has no TLS version or algorithm in common with us ({why:?})"),
        ),
        other if at.handshaking => (S::TlsHandshakeFailed, other.to_string()),
        other => (S::TlsProtocolError, other.to_string()),
    };
    Error::tls(status, message)
}

fn certificate(err: &CertificateError, peer: &str) -> (S, String) {
    use CertificateError as C;
    match err {
        C::Expired | C::ExpiredContext { .. } => {
            (S::CertificateExpired, format!("{peer} has expired"))
        }
        C::NotValidYet | C::NotValidYetContext { .. } => {
            (S::CertificateExpired, format!("{peer} is not valid yet"))
        }
        C::UnknownIssuer => (
            S::CertificateUntrustedRoot,
            format!("{peer} is not signed by a trusted root (unknown issuer)"),
        ),
        C::NotValidForName => (
            S::CertificateCommonNameIsIncorrect,
            format!("{peer} is not valid for the host name"),
        ),
        C::NotValidForNameContext {
            expected,
            presented,
        } => (
            S::CertificateCommonNameIsIncorrect,
            format!(
                "{peer} is not valid for {:?}; it names {}",
                expected.to_str(),
                if presented.is_empty() {
                    "nothing".to_owned()
                } else {
                    presented.join(", ")
                }
            ),
        ),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => (
            S::CertificateWrongUsage,
            format!("{peer} is not allowed for this use (extended key usage)"),
        ),
        C::Revoked => (S::CertificateRevoked, format!("{peer} has been revoked")),
        C::UnknownRevocationStatus
        | C::ExpiredRevocationList
        | C::ExpiredRevocationListContext { .. } => (
            S::CertificateNoRevocationCheck,
            format!("the revocation status of {peer} is unknown"),
        ),
        other => (
            S::CertificateIsInvalid,
            format!("{peer} is invalid: {other:?}"),
        ),
    }
}

fn alert_received(alert: AlertDescription, at: Situation) -> (S, String) {
    use AlertDescription as A;
    let ours = "the peer rejected our certificate";
    match alert {
        A::CertificateRequired => (
            S::ClientCertificateRequired,
            client_certificate_required(at),
        ),
        // A TLS 1.2 server that requires a certificate it did not get answers with a bare
        // handshake_failure (OpenSSL does); knowing that it asked tells the two apart.
        A::HandshakeFailure
            if at.side == Side::Client && at.certificate_requested && !at.has_certificate =>
        {
            (
                S::ClientCertificateRequired,
                client_certificate_required(at),
            )
        }
        A::CertificateExpired => (S::CertificateExpired, format!("{ours}: it has expired")),
        A::CertificateRevoked => (S::CertificateRevoked, format!("{ours}: it is revoked")),
        A::UnknownCA => (
            S::CertificateUntrustedRoot,
            format!("{ours}: it does not trust the issuer (unknown_ca)"),
        ),
        A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown => {
            (S::CertificateIsInvalid, format!("{ours} (alert {alert:?})"))
        }
        A::ProtocolVersion => (
            S::TlsHandshakeFailed,
            "the peer does not support the TLS version required".to_owned(),
        ),
        other => (
            S::TlsHandshakeFailed,
            format!("the peer sent the alert {other:?}"),
        ),
    }
}

fn client_certificate_required(at: Situation) -> String {
    if at.has_certificate {
        "the server requires a client certificate and did not accept ours".to_owned()
    } else {
        "the server requires a client certificate and none was set \
         (StreamSocketControl::set_client_certificate)"
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Situation = Situation {
        side: Side::Client,
        handshaking: true,
        certificate_requested: false,
        has_certificate: false,
    };

    #[test]
    fn certificate_errors_map_to_windows_statuses() {
        use CertificateError as C;
        let cases = [
            (C::Expired, S::CertificateExpired),
            (C::NotValidYet, S::CertificateExpired),
            (C::UnknownIssuer, S::CertificateUntrustedRoot),
            (C::NotValidForName, S::CertificateCommonNameIsIncorrect),
            (C::InvalidPurpose, S::CertificateWrongUsage),
            (C::Revoked, S::CertificateRevoked),
            (C::UnknownRevocationStatus, S::CertificateNoRevocationCheck),
            (C::BadSignature, S::CertificateIsInvalid),
            (C::BadEncoding, S::CertificateIsInvalid),
            (C::ApplicationVerificationFailure, S::CertificateIsInvalid),
        ];
        for (cert_err, want) in cases {
            let err = map(&rustls::Error::InvalidCertificate(cert_err.clone()), CLIENT);
            assert_eq!(err.status(), want, "{cert_err:?}");
            assert!(err.to_string().contains("server's certificate"), "{err}");
        }
    }

    #[test]
    fn names_in_the_wrong_host_message() {
        let err = map(
            &rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                expected: pki_types::ServerName::try_from("example.com").unwrap(),
                presented: vec!["DnsName(\"localhost\")".into()],
            }),
            CLIENT,
        );
        assert_eq!(err.status(), S::CertificateCommonNameIsIncorrect);
        assert!(err.to_string().contains("example.com"), "{err}");
        assert!(err.to_string().contains("localhost"), "{err}");
    }

    #[test]
    fn a_missing_client_certificate_is_its_own_status() {
        let server = Situation {
            side: Side::Server,
            ..CLIENT
        };
        let err = map(&rustls::Error::NoCertificatesPresented, server);
        assert_eq!(err.status(), S::ClientCertificateRequired);

        let err = map(
            &rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            CLIENT,
        );
        assert_eq!(err.status(), S::ClientCertificateRequired);
        assert!(err.to_string().contains("set_client_certificate"), "{err}");

        // handshake_failure is a missing certificate only if the server asked for one.
        let alert = rustls::Error::AlertReceived(AlertDescription::HandshakeFailure);
        assert_eq!(map(&alert, CLIENT).status(), S::TlsHandshakeFailed);
        let asked = Situation {
            certificate_requested: true,
            ..CLIENT
        };
        assert_eq!(map(&alert, asked).status(), S::ClientCertificateRequired);
    }

    #[test]
    fn rejections_of_our_certificate() {
        use AlertDescription as A;
        for (alert, want) in [
            (A::UnknownCA, S::CertificateUntrustedRoot),
            (A::CertificateExpired, S::CertificateExpired),
            (A::BadCertificate, S::CertificateIsInvalid),
            (A::CertificateRevoked, S::CertificateRevoked),
            (A::ProtocolVersion, S::TlsHandshakeFailed),
        ] {
            let err = map(&rustls::Error::AlertReceived(alert), CLIENT);
            assert_eq!(err.status(), want, "{alert:?}");
        }
    }

    #[test]
    fn other_failures() {
        let err = map(&rustls::Error::DecryptError, CLIENT);
        assert_eq!(err.status(), S::TlsHandshakeFailed);
        let data_phase = Situation {
            handshaking: false,
            ..CLIENT
        };
        assert_eq!(
            map(&rustls::Error::DecryptError, data_phase).status(),
            S::TlsProtocolError
        );
    }
}
