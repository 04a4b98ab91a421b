//! What a TLS session is built from: identities, trusted roots, the server's acceptor.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use super::{Certificate, ProtectionLevel};
use crate::host::HostName;
use crate::{Error, Result, SocketErrorStatus};

/// How long a [`TlsAcceptor`] waits for a client's handshake unless told otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The crypto provider every config uses: rustls's *ring* provider, built once.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A certificate chain with its private key: what a client presents when the server asks
/// (like StreamSocketControl.ClientCertificate), or what a server presents.
///
/// Built from PEM or DER; the key is loaded and checked against the certificate when the
/// identity is made, so a wrong key is an error here, not a failed handshake later.
#[derive(Clone)]
pub struct Identity {
    key: Arc<CertifiedKey>,
}

impl Identity {
    /// From PEM text: `cert_chain_pem` holds one or more `CERTIFICATE` sections,
    /// end-entity first; `key_pem` holds a `PRIVATE KEY` (PKCS#8), `RSA PRIVATE KEY` or
    /// `EC PRIVATE KEY` section. Both may be the same combined file.
    pub fn from_pem(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Identity> {
        let chain = parse_pem_certificates(cert_chain_pem, "certificate chain")
            .map_err(Error::invalid_input)?;
        let key = parse_pem_key(key_pem).map_err(Error::invalid_input)?;
        Identity::from_parts(chain, key).map_err(|unusable| Error::invalid_input(unusable.0))
    }

    /// From DER: the chain end-entity first, and a PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key.
    pub fn from_der(cert_chain: Vec<Vec<u8>>, private_key: Vec<u8>) -> Result<Identity> {
        if cert_chain.is_empty() {
            return Err(Error::invalid_input("the certificate chain is empty"));
        }
        let chain = cert_chain.into_iter().map(CertificateDer::from).collect();
        let key = PrivateKeyDer::try_from(private_key).map_err(|err| {
            Error::invalid_input(format!(
                "the private key is not PKCS#8, PKCS#1 or SEC1 DER: {err}"
            ))
        })?;
        Identity::from_parts(chain, key).map_err(|unusable| Error::invalid_input(unusable.0))
    }

    /// From two PEM files (they may be the same file), as in [`Identity::from_pem`].
    ///
    /// A file that cannot be read is an [`Error::Io`] naming it, with status
    /// `FileNotFound`, `PermissionDenied` or `InvalidFile` (a directory); one whose
    /// contents are unusable is an [`Error::InvalidFile`] naming it.
    pub fn from_pem_files(cert_chain: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Identity> {
        let (cert_path, key_path) = (cert_chain.as_ref(), key.as_ref());
        let chain_pem = read_file(cert_path, "certificate")?;
        let key_pem = read_file(key_path, "private key")?;
        let chain = parse_pem_certificates(&chain_pem, "certificate chain")
            .map_err(|reason| Error::invalid_file(cert_path, reason))?;
        let key =
            parse_pem_key(&key_pem).map_err(|reason| Error::invalid_file(key_path, reason))?;
        // A key that does not fit is blamed on the key file, the usual mistake; the
        // message names the certificate file too.
        Identity::from_parts(chain, key).map_err(|Unusable(reason, blamed)| match blamed {
            Blamed::Certificate => Error::invalid_file(cert_path, reason),
            Blamed::Key => Error::invalid_file(
                key_path,
                format!("{reason} (certificate file {})", cert_path.display()),
            ),
        })
    }

    fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> std::result::Result<Identity, Unusable> {
        chain_fits(&chain).map_err(|reason| Unusable(reason, Blamed::Certificate))?;
        if chain
            .first()
            .is_some_and(|end| super::x509::is_version_1(end))
        {
            return Err(Unusable(
                "an X.509 version 1 certificate: TLS takes version 3 only (a certificate \
                 issued with extensions, such as openssl's -extfile or -addext)"
                    .to_owned(),
                Blamed::Certificate,
            ));
        }
        let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|err| match err {
            rustls::Error::InconsistentKeys(_) => Unusable(
                "the private key does not belong to the certificate".to_owned(),
                Blamed::Key,
            ),
            rustls::Error::InvalidCertificate(why) => Unusable(
                format!("the certificate cannot be used: {why}"),
                Blamed::Certificate,
            ),
            other => Unusable(
                format!("unusable certificate or private key: {other}"),
                Blamed::Key,
            ),
        })?;
        Ok(Identity { key: Arc::new(key) })
    }

    /// The end-entity certificate.
    pub fn certificate(&self) -> Certificate {
        Certificate::from_der(self.key.cert[0].as_ref())
    }

    /// The whole chain, end-entity first.
    pub fn certificate_chain(&self) -> Vec<Certificate> {
        self.key
            .cert
            .iter()
            .map(|cert| Certificate::from_der(cert.as_ref()))
            .collect()
    }
}

/// Why a certificate chain and key make no identity: a sentence for the caller to attach
/// to the input it came from, and which input that is.
struct Unusable(String, Blamed);

/// The input an [`Unusable`] is about.
enum Blamed {
    Certificate,
    Key,
}

/// Most bytes of CA names a server sends as hints in its certificate request.
const MAX_CA_HINT_BYTES: usize = 16 * 1024;

/// Most bytes of certificates a chain may hold: it goes in one handshake message, which
/// peers take up to 64 KiB of (rustls and OpenSSL alike), with a few bytes of framing
/// per certificate and room for the message's own.
const MAX_CHAIN_BYTES: usize = 64 * 1024 - 1024;

/// Refuses a chain no peer would take: a server presenting it would start, and then fail
/// every handshake.
fn chain_fits(chain: &[CertificateDer<'_>]) -> std::result::Result<(), String> {
    let bytes: usize = chain.iter().map(|cert| cert.as_ref().len() + 5).sum();
    if bytes > MAX_CHAIN_BYTES {
        return Err(format!(
            "the certificate chain takes {bytes} bytes ({} certificates): a TLS peer takes \
             a chain of up to about {MAX_CHAIN_BYTES} bytes",
            chain.len()
        ));
    }
    Ok(())
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("chain_len", &self.key.cert.len())
            .finish_non_exhaustive()
    }
}

/// Certificate authorities trusted to sign a peer's certificate: the system's roots, or a
/// CA bundle.
#[derive(Clone)]
pub struct TrustedRoots {
    store: Arc<RootCertStore>,
}

impl TrustedRoots {
    /// The system's roots, read once per process from the OpenSSL locations
    /// (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR` when set).
    ///
    /// When no root could be loaded because a file or directory could not be read (say
    /// `SSL_CERT_FILE` names a missing file), the error is that file's, naming it, with
    /// its file status; otherwise an empty store is `CertificateUntrustedRoot`.
    pub fn system() -> Result<TrustedRoots> {
        static SYSTEM: OnceLock<Result<Arc<RootCertStore>>> = OnceLock::new();
        let loaded = SYSTEM.get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(found.certs);
            if !store.is_empty() {
                return Ok(Arc::new(store));
            }
            let mut why = String::new();
            for err in found.errors {
                let text = err.to_string();
                match err.kind {
                    rustls_native_certs::ErrorKind::Io { inner, path } => {
                        return Err(Error::io(
                            format!(
                                "no trusted root certificates loaded: {} {}",
                                err.context,
                                path.display()
                            ),
                            inner,
                        ));
                    }
                    _ if why.is_empty() => why = format!(": {text}"),
                    _ => {}
                }
            }
            Err(Error::tls(
                SocketErrorStatus::CertificateUntrustedRoot,
                format!(
                    "no trusted root certificates found on this system{why}; install the \
                     ca-certificates package or give a CA bundle"
                ),
            ))
        });
        match loaded {
            Ok(store) => Ok(TrustedRoots {
                store: store.clone(),
            }),
            Err(err) => Err(err.clone()),
        }
    }

    /// From a PEM bundle of one or more `CERTIFICATE` sections. Every certificate must be
    /// usable as a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<TrustedRoots> {
        let certs = parse_pem_certificates(pem, "CA bundle").map_err(Error::invalid_input)?;
        TrustedRoots::from_certs(certs).map_err(Error::invalid_input)
    }

    /// From a PEM bundle file, as in [`TrustedRoots::from_pem`].
    ///
    /// A file that cannot be read is an [`Error::Io`] naming it, with status
    /// `FileNotFound`, `PermissionDenied` or `InvalidFile` (a directory); one whose
    /// contents are unusable is an [`Error::InvalidFile`] naming it.
    pub fn from_pem_file(path: impl AsRef<Path>) -> Result<TrustedRoots> {
        let path = path.as_ref();
        let pem = read_file(path, "CA bundle")?;
        parse_pem_certificates(&pem, "CA bundle")
            .and_then(TrustedRoots::from_certs)
            .map_err(|reason| Error::invalid_file(path, reason))
    }

    /// From DER certificates.
    pub fn from_der(certs: Vec<Vec<u8>>) -> Result<TrustedRoots> {
        if certs.is_empty() {
            return Err(Error::invalid_input("the CA list is empty"));
        }
        TrustedRoots::from_certs(certs.into_iter().map(CertificateDer::from).collect())
            .map_err(Error::invalid_input)
    }

    /// The reason is a sentence for the caller to attach to the input it came from.
    fn from_certs(
        certs: Vec<CertificateDer<'static>>,
    ) -> std::result::Result<TrustedRoots, String> {
        let mut store = RootCertStore::empty();
        for (index, cert) in certs.into_iter().enumerate() {
            store.add(cert).map_err(|err| {
                format!(
                    "CA certificate {} is not usable as a trust anchor: {err}",
                    index + 1
                )
            })?;
        }
        Ok(TrustedRoots {
            store: Arc::new(store),
        })
    }

    /// How many authorities are trusted.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// True when no authority is trusted.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }
}

impl std::fmt::Debug for TrustedRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedRoots")
            .field("len", &self.store.len())
            .finish()
    }
}

/// The server side of TLS: a certificate and key, and whether clients must present a
/// certificate of their own. Cheap to clone; share one among all connections.
///
/// # Examples
///
/// ```no_run
/// use ringsock::tls::{Identity, TlsAcceptor, TrustedRoots};
/// use ringsock::StreamSocketListener;
///
/// async fn serve() -> ringsock::Result<()> {
///     let acceptor = TlsAcceptor::builder(Identity::from_pem_files("server.pem", "server.key")?)
///         .require_client_certificate(TrustedRoots::from_pem_file("clients-ca.pem")?)
///         .build()?;
///     let listener = StreamSocketListener::bind("8443")?;
///     loop {
///         let socket = listener.accept().await?;
///         let acceptor = acceptor.clone();
///         // One task per connection: a slow handshake holds up nobody else.
///         ringsock::spawn(async move {
///             socket.accept_tls(&acceptor).await?;
///             let client = socket.tls_info().and_then(|info| info.peer_certificate().cloned());
///             println!("client certificate: {client:?}");
///             Ok::<_, ringsock::Error>(())
///         });
///     }
/// }
///
/// ringsock::block_on(serve())?;
/// # Ok::<_, ringsock::Error>(())
/// ```
#[derive(Clone)]
pub struct TlsAcceptor {
    pub(crate) config: Arc<ServerConfig>,
    /// How long `accept_tls` may take (see [`TlsAcceptorBuilder::handshake_timeout`]).
    pub(crate) handshake_timeout: Option<Duration>,
}

impl TlsAcceptor {
    /// An acceptor presenting `identity`, TLS 1.2 or newer, without client certificates.
    pub fn new(identity: Identity) -> Result<TlsAcceptor> {
        TlsAcceptor::builder(identity).build()
    }

    /// A builder for the other options.
    pub fn builder(identity: Identity) -> TlsAcceptorBuilder {
        TlsAcceptorBuilder {
            identity,
            level: ProtectionLevel::Tls12,
            max_level: ProtectionLevel::Tls13,
            client_roots: None,
            client_optional: false,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
        }
    }

    /// How long [`accept_tls`](crate::StreamSocket::accept_tls) waits for a client to
    /// finish its handshake; `None`: no limit.
    pub fn handshake_timeout(&self) -> Option<Duration> {
        self.handshake_timeout
    }
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor").finish_non_exhaustive()
    }
}

/// Builds a [`TlsAcceptor`].
#[derive(Debug, Clone)]
pub struct TlsAcceptorBuilder {
    identity: Identity,
    level: ProtectionLevel,
    max_level: ProtectionLevel,
    client_roots: Option<TrustedRoots>,
    client_optional: bool,
    handshake_timeout: Option<Duration>,
}

impl TlsAcceptorBuilder {
    /// How long a client may take to finish its handshake in
    /// [`accept_tls`](crate::StreamSocket::accept_tls) before it fails with
    /// `ConnectionTimedOut` and the connection is closed; the whole handshake counts, so
    /// a client that sends its hello a byte at a time cannot stretch it. Default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`] (10 s): unlike the socket timeouts, which default to
    /// none, a server without this limit keeps a socket and a session for every client
    /// that connects and never finishes. `None`: no limit; zero is refused by
    /// [`build`](Self::build).
    pub fn handshake_timeout(mut self, limit: Option<Duration>) -> TlsAcceptorBuilder {
        self.handshake_timeout = limit;
        self
    }

    /// The lowest version accepted (default `Tls12`); `Tls13` refuses TLS 1.2 clients.
    pub fn protection_level(mut self, level: ProtectionLevel) -> TlsAcceptorBuilder {
        self.level = level;
        self
    }

    /// The highest version offered (default `Tls13`); `Tls12` holds connections to TLS
    /// 1.2, e.g. to test clients or for peers that mishandle TLS 1.3.
    pub fn max_protection_level(mut self, level: ProtectionLevel) -> TlsAcceptorBuilder {
        self.max_level = level;
        self
    }

    /// Requires every client to present a certificate signed by one of `roots`; a client
    /// without one fails with `ClientCertificateRequired`.
    pub fn require_client_certificate(mut self, roots: TrustedRoots) -> TlsAcceptorBuilder {
        self.client_roots = Some(roots);
        self.client_optional = false;
        self
    }

    /// Asks clients for a certificate signed by one of `roots` but also accepts clients
    /// that present none. A certificate that is presented must verify.
    pub fn request_client_certificate(mut self, roots: TrustedRoots) -> TlsAcceptorBuilder {
        self.client_roots = Some(roots);
        self.client_optional = true;
        self
    }

    /// The acceptor.
    pub fn build(self) -> Result<TlsAcceptor> {
        if self.handshake_timeout.is_some_and(|limit| limit.is_zero()) {
            return Err(Error::invalid_input(
                "the TLS handshake timeout must be longer than zero (None means no limit)",
            ));
        }
        let versions = versions_between(self.level, self.max_level);
        if versions.is_empty() {
            return Err(Error::invalid_input(format!(
                "no TLS version from protection level {} up to {}",
                self.level, self.max_level
            )));
        }
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|err| Error::invalid_input(format!("TLS versions: {err}")))?;
        let builder = match self.client_roots {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.store.clone(), provider);
                // The names of the CAs a client certificate may come from go in the
                // certificate request as hints; thousands of them would make it larger
                // than a client takes, and every handshake would fail. Past a few
                // hundred, none are sent: a client then offers the certificate it has.
                let hints: usize = roots
                    .store
                    .subjects()
                    .iter()
                    .map(|name| name.as_ref().len())
                    .sum();
                if hints > MAX_CA_HINT_BYTES {
                    verifier = verifier.clear_root_hint_subjects();
                }
                let verifier = if self.client_optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                let verifier = verifier.build().map_err(|err| {
                    Error::invalid_input(format!("client certificate verifier: {err}"))
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_cert_resolver(Arc::new(ServerCert(self.identity.key)));
        Ok(TlsAcceptor {
            config: Arc::new(config),
            handshake_timeout: self.handshake_timeout,
        })
    }
}

/// The versions allowed by `min` that `max` also allows.
fn versions_between(
    min: ProtectionLevel,
    max: ProtectionLevel,
) -> Vec<&'static rustls::SupportedProtocolVersion> {
    let below_max = |v: &&rustls::SupportedProtocolVersion| {
        max == ProtectionLevel::Tls13 || v.version != rustls::ProtocolVersion::TLSv1_3
    };
    if max == ProtectionLevel::PlainSocket {
        return Vec::new();
    }
    min.versions().iter().copied().filter(below_max).collect()
}

/// Presents one certificate to every client.
#[derive(Debug)]
struct ServerCert(Arc<CertifiedKey>);

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Answers a server's certificate request with the identity set on the socket's control,
/// and remembers that the server asked, so a rejection can be reported as
/// `ClientCertificateRequired` rather than a bare handshake failure.
#[derive(Debug)]
pub(crate) struct ClientCert {
    identity: Option<Arc<CertifiedKey>>,
    requested: AtomicBool,
}

impl ClientCert {
    /// Whether the server sent a certificate request.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// Whether there was a certificate to present.
    pub(crate) fn has_identity(&self) -> bool {
        self.identity.is_some()
    }
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.requested.store(true, Ordering::Relaxed);
        self.identity.clone()
    }

    fn has_certs(&self) -> bool {
        self.identity.is_some()
    }
}

/// A client config for one connection, with the resolver that records whether the server
/// asked for a certificate.
pub(crate) fn client_config(
    level: ProtectionLevel,
    roots: Option<&TrustedRoots>,
    identity: Option<&Identity>,
) -> Result<(Arc<ClientConfig>, Arc<ClientCert>)> {
    if level == ProtectionLevel::PlainSocket {
        return Err(Error::invalid_input(
            "TLS needs protection level Tls12 or Tls13, not PlainSocket",
        ));
    }
    let roots = match roots {
        Some(roots) => roots.clone(),
        None => TrustedRoots::system()?,
    };
    let resolver = Arc::new(ClientCert {
        identity: identity.map(|identity| identity.key.clone()),
        requested: AtomicBool::new(false),
    });
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(level.versions())
        .map_err(|err| Error::invalid_input(format!("TLS versions: {err}")))?
        .with_root_certificates(roots.store.clone())
        .with_client_cert_resolver(resolver.clone());
    Ok((Arc::new(config), resolver))
}

/// The name a server's certificate must carry: a DNS name, or an IP address for an IP
/// literal.
pub(crate) fn server_name(host: &HostName) -> Result<ServerName<'static>> {
    if let Some(ip) = host.ip() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    let name = host.raw_name().trim_end_matches('.');
    ServerName::try_from(name.to_owned()).map_err(|err| {
        Error::invalid_input(format!(
            "{name:?} cannot be checked against a certificate: {err}"
        ))
    })
}

/// The reason is a sentence for the caller to attach to the input it came from.
fn parse_pem_certificates(
    pem: &[u8],
    what: &str,
) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|err| format!("bad PEM in the {what}: {err}"))?;
    if certs.is_empty() {
        return Err(format!("no CERTIFICATE section found in the {what}"));
    }
    Ok(certs)
}

/// The reason is a sentence for the caller to attach to the input it came from.
fn parse_pem_key(pem: &[u8]) -> std::result::Result<PrivateKeyDer<'static>, String> {
    let encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----";
    if pem
        .windows(encrypted.len())
        .any(|window| window == encrypted)
    {
        return Err(
            "the private key is encrypted (ENCRYPTED PRIVATE KEY), which this \
                    program cannot use: decrypt it first (`openssl pkcs8 -in KEY -out PLAIN`)"
                .to_owned(),
        );
    }
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| {
        format!(
            "no usable private key (expected a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE \
             KEY section): {err}"
        )
    })
}

/// The most a PEM file may hold: far more than any chain or CA bundle, little enough
/// that a path such as `/dev/zero` fails at once instead of filling memory.
const MAX_PEM_FILE: u64 = 16 << 20;

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    let context = || format!("read the {what} file {}", path.display());
    let mut bytes = Vec::new();
    // A directory opens fine and fails in the read, with EISDIR; a FIFO no one writes
    // to reads as empty (then has no PEM section) instead of holding the open forever.
    crate::tunnel::read_limited(path, MAX_PEM_FILE + 1, &mut bytes)
        .map_err(|err| Error::io(context(), err))?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(Error::invalid_file(
            path,
            format!("larger than {} MiB: not a {what} file", MAX_PEM_FILE >> 20),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generated() -> (String, String) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    #[test]
    fn identity_from_pem_and_der() {
        let (cert, key) = generated();
        let identity = Identity::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(identity.certificate_chain().len(), 1);
        let combined = format!("{cert}{key}");
        Identity::from_pem(combined.as_bytes(), combined.as_bytes()).unwrap();

        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        let key_der = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let identity =
            Identity::from_der(vec![der.to_vec()], key_der.secret_der().to_vec()).unwrap();
        assert_eq!(identity.certificate().der(), der.as_ref());
    }

    #[test]
    fn bad_identity_input_is_a_clear_error() {
        let (cert, key) = generated();
        let (_, other_key) = generated();
        let cases: Vec<(Result<Identity>, &str)> = vec![
            (
                Identity::from_pem(b"", key.as_bytes()),
                "no CERTIFICATE section",
            ),
            (
                Identity::from_pem(key.as_bytes(), key.as_bytes()),
                "no CERTIFICATE section",
            ),
            (
                Identity::from_pem(cert.as_bytes(), b"junk"),
                "no usable private key",
            ),
            (
                Identity::from_pem(cert.as_bytes(), cert.as_bytes()),
                "no usable private key",
            ),
            (
                Identity::from_pem(cert.as_bytes(), other_key.as_bytes()),
                "does not belong to the certificate",
            ),
            (
                Identity::from_pem(b"-----BEGIN CERTIFICATE-----\n!!\n", key.as_bytes()),
                "bad PEM",
            ),
            (Identity::from_der(vec![], vec![1, 2, 3]), "chain is empty"),
            (
                Identity::from_der(vec![vec![1, 2]], vec![1, 2, 3]),
                "private key",
            ),
            (
                Identity::from_pem_files("/nonexistent/cert.pem", "/nonexistent/key.pem"),
                "/nonexistent/cert.pem",
            ),
        ];
        for (result, want) in cases {
            let err = result.unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{err} should mention {want:?}"
            );
        }
    }

    #[test]
    fn trusted_roots_from_pem() {
        let (cert, _) = generated();
        let (cert2, _) = generated();
        let roots = TrustedRoots::from_pem(format!("{cert}{cert2}").as_bytes()).unwrap();
        assert_eq!(roots.len(), 2);
        let err = TrustedRoots::from_pem(b"hello").unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument);
        let err = TrustedRoots::from_der(vec![vec![0x30, 0x00]]).unwrap_err();
        assert!(err.to_string().contains("CA certificate 1"), "{err}");
    }

    #[test]
    fn server_names() {
        let name = server_name(&HostName::new("localhost.").unwrap()).unwrap();
        assert_eq!(name.to_str(), "localhost");
        let ip = server_name(&HostName::new("::1").unwrap()).unwrap();
        assert!(matches!(ip, ServerName::IpAddress(_)));
    }

    #[test]
    fn version_ranges() {
        use ProtectionLevel::*;
        let names = |min, max| -> Vec<rustls::ProtocolVersion> {
            versions_between(min, max)
                .iter()
                .map(|v| v.version)
                .collect()
        };
        use rustls::ProtocolVersion::{TLSv1_2, TLSv1_3};
        assert_eq!(names(Tls12, Tls13), [TLSv1_3, TLSv1_2]);
        assert_eq!(names(Tls12, Tls12), [TLSv1_2]);
        assert_eq!(names(Tls13, Tls13), [TLSv1_3]);
        assert!(names(Tls13, Tls12).is_empty());
        assert!(names(PlainSocket, Tls13).is_empty());
        assert!(names(Tls12, PlainSocket).is_empty());
    }

    #[test]
    fn plain_socket_is_not_a_tls_level() {
        let err = client_config(ProtectionLevel::PlainSocket, None, None).unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument);
        let (cert, key) = generated();
        let identity = Identity::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        let err = TlsAcceptor::builder(identity)
            .protection_level(ProtectionLevel::PlainSocket)
            .build()
            .unwrap_err();
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument);
    }

    #[test]
    fn an_encrypted_key_is_named_as_such() {
        let pem = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAgAAAAAAAAAAAICCAAw\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let why = parse_pem_key(pem).unwrap_err();
        assert!(why.contains("encrypted"), "{why}");
    }
}
