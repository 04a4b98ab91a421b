//! The crate's one error type, and the Windows-style status every error maps to.
//!
//! Programs written against Windows.Networking.Sockets branch on
//! `SocketError.GetStatus(hresult)`; [`Error::status`] plays that role here, while
//! the `Display` text keeps the context (what was being done, to which address)
//! that a person reading a log needs.

use std::fmt::{self, Write as _};
use std::io;
use std::path::PathBuf;

/// The crate's result type; the error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Declares [`SocketErrorStatus`] together with its name table, so the names that
/// `Display` prints can never drift from the variants.
macro_rules! socket_error_status {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Like Windows.Networking.Sockets.SocketErrorStatus: what kind of failure an
        /// [`Error`] is, coarse enough to branch on.
        ///
        /// The first 31 variants carry the Windows names and meanings, in the Windows
        /// order; the rest are ringsock additions for failures that Windows folds
        /// into `Unknown`.
        #[non_exhaustive]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum SocketErrorStatus {
            $($(#[$doc])* $name,)*
        }

        impl SocketErrorStatus {
            /// Every variant, so tests can check properties of the whole set.
            #[cfg(test)]
            const ALL: &'static [SocketErrorStatus] = &[$(SocketErrorStatus::$name,)*];

            /// The variant's name exactly as Windows spells it, e.g. `"ConnectionRefused"`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(SocketErrorStatus::$name => stringify!($name),)*
                }
            }
        }
    };
}

socket_error_status! {
    /// No more specific status applies.
    Unknown,
    /// The operation was cancelled (`ECANCELED`, `EINTR`).
    OperationAborted,
    /// An HTTP server sent a response that could not be understood.
    HttpInvalidServerResponse,
    /// The operation, connection attempt or name lookup timed out (`ETIMEDOUT`,
    /// `ETIME`).
    ConnectionTimedOut,
    /// The address family is not supported (`EAFNOSUPPORT`, `EPFNOSUPPORT`).
    AddressFamilyNotSupported,
    /// The socket type or protocol is not supported (`ESOCKTNOSUPPORT`,
    /// `EPROTONOSUPPORT`, `EPROTOTYPE`).
    SocketTypeNotSupported,
    /// The host name is not known (`EAI_NONAME`, `EAI_FAIL`).
    HostNotFound,
    /// The name exists but has no address of the requested type (`EAI_NODATA`).
    NoDataRecordOfRequestedType,
    /// Name resolution failed temporarily; retrying may work (`EAI_AGAIN`).
    NonAuthoritativeHostNotFound,
    /// The service name is not known for the protocol (`EAI_SERVICE`, or a name
    /// missing from `/etc/services`).
    ClassTypeNotFound,
    /// The local address is already in use (`EADDRINUSE`).
    AddressAlreadyInUse,
    /// The local address does not belong to this machine (`EADDRNOTAVAIL`).
    CannotAssignRequestedAddress,
    /// Nothing is listening at the remote address (`ECONNREFUSED`).
    ConnectionRefused,
    /// No route to the remote network (`ENETUNREACH`, `ENONET`), or no such network
    /// interface, e.g. the scope of `fe80::1%99` (`ENODEV`).
    NetworkIsUnreachable,
    /// No route to the remote host (`EHOSTUNREACH`).
    UnreachableHost,
    /// The local network is down (`ENETDOWN`).
    NetworkIsDown,
    /// The connection broke because the network was reset (`ENETRESET`).
    NetworkDroppedConnectionOnReset,
    /// The local stack aborted the connection (`ECONNABORTED`).
    SoftwareCausedConnectionAbort,
    /// The peer reset the connection (`ECONNRESET`).
    ConnectionResetByPeer,
    /// The remote host is down (`EHOSTDOWN`).
    HostIsDown,
    /// Name resolution succeeded but produced no usable address.
    NoAddressesFound,
    /// The process or system ran out of file descriptors (`EMFILE`, `ENFILE`).
    TooManyOpenFiles,
    /// A datagram was larger than the transport allows (`EMSGSIZE`).
    MessageTooLong,
    /// The server's certificate has expired.
    CertificateExpired,
    /// The server's certificate chains to a root that is not trusted.
    CertificateUntrustedRoot,
    /// The server's certificate does not name the host that was dialled.
    CertificateCommonNameIsIncorrect,
    /// The server's certificate is not valid for this use.
    CertificateWrongUsage,
    /// The server's certificate has been revoked.
    CertificateRevoked,
    /// The server's certificate could not be checked for revocation.
    CertificateNoRevocationCheck,
    /// The revocation server for the certificate could not be reached.
    CertificateRevocationServerOffline,
    /// The server's certificate is invalid for another reason.
    CertificateIsInvalid,
    /// ringsock addition: bad input such as a host name, service or option value.
    InvalidArgument,
    /// ringsock addition: a write after the peer closed its side (`EPIPE`,
    /// `ESHUTDOWN`).
    BrokenPipe,
    /// ringsock addition: the TLS server demanded a client certificate.
    ClientCertificateRequired,
    /// ringsock addition: the TLS handshake failed for a reason not covered by a
    /// certificate status.
    TlsHandshakeFailed,
    /// ringsock addition: the kernel ran out of buffer space, memory or room
    /// (`ENOBUFS`, `ENOMEM`, `EAI_MEMORY`; `ENOSPC` and `EDQUOT`: epoll's registrations
    /// past `max_user_watches`, a full disk under a log or key file).
    NoBufferSpace,
    /// ringsock addition: the operation is not permitted, or a file may not be read
    /// (`EACCES`, `EPERM`).
    PermissionDenied,
    /// ringsock addition: the peer closed the connection before the expected data
    /// arrived, e.g. end of stream in the middle of a line.
    ConnectionClosed,
    /// ringsock addition: the operation is not supported, or not valid in the
    /// socket's current state (`EOPNOTSUPP`, `ENOSYS`, `EINVAL`, `ENOPROTOOPT`,
    /// `ENOTCONN`, `EISCONN`).
    UnsupportedOperation,
    /// ringsock addition: a socket or an operation was used while a runtime other than
    /// the one it belongs to drives the thread (or no runtime does), or after its
    /// runtime was dropped. Nothing was taken from the other runtime; an operation that
    /// was in flight was cancelled first.
    WrongRuntime,
    /// ringsock addition: a file to be read does not exist: there is no such file, or
    /// a component of its path is not a directory (`ENOENT`, `ENOTDIR`).
    FileNotFound,
    /// ringsock addition: a file exists but cannot be used: the path names a directory
    /// (`EISDIR`), or the contents are not what was expected, e.g. a PEM file without
    /// a certificate or a key that does not match its certificate
    /// ([`Error::InvalidFile`]).
    InvalidFile,
    /// ringsock addition: the resolver already has as many lookups waiting as it
    /// takes ([`RESOLVER_QUEUE`](crate::host::RESOLVER_QUEUE)); the lookup was refused
    /// at once. Retrying later may work.
    ResolverQueueFull,
    /// ringsock addition: after the TLS handshake, the peer sent what TLS forbids: a
    /// record that fails authentication (corrupt or forged on the way), a malformed
    /// message, a protocol violation. The connection carries nothing more.
    TlsProtocolError,
    /// ringsock addition: what the call needs is busy (`EBUSY`): a device another user
    /// holds, e.g. a TUN interface another process (another tunnel) has open, or a
    /// socket with a plain read waiting when TLS is to start on it. Retrying once it is
    /// free may work.
    ResourceBusy,
}

/// The one public error type of ringsock.
///
/// Every variant maps to a [`SocketErrorStatus`] through [`Error::status`]. The
/// `Display` text is a single human-readable line that includes the context.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call failed; the status comes from its errno.
    #[error("{}{}", Context(.context), OneLine(&.source.to_string()))]
    Io {
        /// What was being done, e.g. `"connect to 127.0.0.1:9"`; may be empty.
        context: String,
        /// The operating system's error.
        source: io::Error,
    },

    /// A string was not a valid host name or IP literal.
    #[error("invalid host name {}: {}", Clipped(.input), OneLine(.reason))]
    InvalidHostName {
        /// The rejected input, exactly as given.
        input: String,
        /// Why it was rejected, naming the offending character or label.
        reason: String,
    },

    /// A string was neither a port number nor a known service name.
    #[error("invalid service {}: {}", Clipped(.input), OneLine(.reason))]
    InvalidService {
        /// The rejected input, exactly as given.
        input: String,
        /// Why it was rejected.
        reason: String,
        /// [`SocketErrorStatus::ClassTypeNotFound`] for a well-formed but unknown
        /// name, [`SocketErrorStatus::InvalidArgument`] for malformed input.
        status: SocketErrorStatus,
    },

    /// Name resolution failed: `getaddrinfo` reported an error, or the resolver was
    /// too busy (`ResolverQueueFull`) or gave no answer in time (`ConnectionTimedOut`);
    /// see [`host::resolve`](crate::host::resolve).
    #[error("cannot resolve {host:?}: {}", OneLine(.message))]
    Resolve {
        /// The name that was being resolved.
        host: String,
        /// The status the resolver's error code maps to.
        status: SocketErrorStatus,
        /// The resolver's own description of the failure.
        message: String,
    },

    /// Name resolution succeeded but returned no usable address.
    #[error("{host:?} resolved to no addresses")]
    NoAddresses {
        /// The name that was resolved.
        host: String,
    },

    /// An argument was invalid (an option value, a buffer size, ...).
    #[error("invalid argument: {}", OneLine(.message))]
    InvalidInput {
        /// What was wrong with the argument.
        message: String,
    },

    /// A file was read but its contents cannot be used (a file that cannot be opened
    /// or read is an [`Error::Io`] whose context names it).
    #[error("invalid file {}: {}", OneLine(&.path.display().to_string()), OneLine(.reason))]
    InvalidFile {
        /// The file, as given.
        path: PathBuf,
        /// What is wrong with its contents.
        reason: String,
    },

    /// An operation did not finish within its deadline.
    #[error("{}timed out", Context(.context))]
    TimedOut {
        /// What was being done; may be empty.
        context: String,
    },

    /// The peer closed the connection before the expected data arrived.
    #[error("{}connection closed by peer", Context(.context))]
    ConnectionClosed {
        /// What was being done, e.g. `"read_line"`; may be empty.
        context: String,
    },

    /// A socket or operation was used outside the runtime it belongs to; the status is
    /// [`SocketErrorStatus::WrongRuntime`].
    #[error("{}", OneLine(.message))]
    WrongRuntime {
        /// Which runtime was expected and what ran instead.
        message: String,
    },

    /// A TLS failure; the status says which kind.
    #[error("TLS failure ({status}): {}", OneLine(.message))]
    Tls {
        /// Usually a `Certificate*` status, `ClientCertificateRequired` or
        /// `TlsHandshakeFailed`.
        status: SocketErrorStatus,
        /// The TLS layer's description of the failure.
        message: String,
    },
}

/// Renders caller-supplied text with control characters replaced by spaces, so an
/// error is always one line however its parts were built.
struct OneLine<'a>(&'a str);

/// Renders an input quoted as `{:?}` does, cut after [`Clipped::SHOWN`] characters with
/// its length said: a megabyte of host name makes an unreadable log line, and the
/// error keeps the whole input for a program to look at.
struct Clipped<'a>(&'a str);

impl Clipped<'_> {
    const SHOWN: usize = 256;
}

/// Renders a context as `"context: "`, or as nothing when it is empty, so errors
/// built without context (e.g. by `?` on an `io::Error`) do not start with `": "`.
struct Context<'a>(&'a str);

impl SocketErrorStatus {
    /// Maps a Linux errno to a status.
    ///
    /// A negated errno, as io_uring completions report it, is accepted too. Errnos
    /// with no socket meaning map to [`SocketErrorStatus::Unknown`].
    pub fn from_errno(errno: i32) -> SocketErrorStatus {
        match positive_errno(errno) {
            libc::ECONNREFUSED => SocketErrorStatus::ConnectionRefused,
            libc::ECONNRESET => SocketErrorStatus::ConnectionResetByPeer,
            libc::ECONNABORTED => SocketErrorStatus::SoftwareCausedConnectionAbort,
            // io_uring reports an expired linked timeout as ETIME.
            libc::ETIMEDOUT | libc::ETIME => SocketErrorStatus::ConnectionTimedOut,
            libc::EADDRINUSE => SocketErrorStatus::AddressAlreadyInUse,
            libc::EADDRNOTAVAIL => SocketErrorStatus::CannotAssignRequestedAddress,
            // ENODEV: an IPv6 scope (or a device to bind to) names no interface, as a
            // scope by unknown name does when it is resolved.
            libc::ENETUNREACH | libc::ENONET | libc::ENODEV => {
                SocketErrorStatus::NetworkIsUnreachable
            }
            libc::EHOSTUNREACH => SocketErrorStatus::UnreachableHost,
            libc::ENETDOWN => SocketErrorStatus::NetworkIsDown,
            libc::EHOSTDOWN => SocketErrorStatus::HostIsDown,
            libc::ENETRESET => SocketErrorStatus::NetworkDroppedConnectionOnReset,
            libc::EMFILE | libc::ENFILE => SocketErrorStatus::TooManyOpenFiles,
            libc::EMSGSIZE => SocketErrorStatus::MessageTooLong,
            libc::EAFNOSUPPORT | libc::EPFNOSUPPORT => SocketErrorStatus::AddressFamilyNotSupported,
            libc::ESOCKTNOSUPPORT | libc::EPROTONOSUPPORT | libc::EPROTOTYPE => {
                SocketErrorStatus::SocketTypeNotSupported
            }
            // Windows reports an interrupted blocking call (WSAEINTR) as aborted too.
            libc::ECANCELED | libc::EINTR => SocketErrorStatus::OperationAborted,
            libc::EPIPE | libc::ESHUTDOWN => SocketErrorStatus::BrokenPipe,
            libc::ENOBUFS | libc::ENOMEM | libc::ENOSPC | libc::EDQUOT => {
                SocketErrorStatus::NoBufferSpace
            }
            libc::EACCES | libc::EPERM => SocketErrorStatus::PermissionDenied,
            libc::ENOENT | libc::ENOTDIR => SocketErrorStatus::FileNotFound,
            libc::EISDIR => SocketErrorStatus::InvalidFile,
            libc::EBUSY => SocketErrorStatus::ResourceBusy,
            // EINVAL from a socket call on valid arguments means the operation does
            // not fit the socket (e.g. listen on a UDP socket); bad user input is
            // caught before any syscall and reported as InvalidArgument.
            libc::EOPNOTSUPP
            | libc::ENOSYS
            | libc::EINVAL
            | libc::ENOPROTOOPT
            | libc::ENOTCONN
            | libc::EISCONN => SocketErrorStatus::UnsupportedOperation,
            _ => SocketErrorStatus::Unknown,
        }
    }

    /// Maps an `io::Error` to a status: by its errno when it has one, else by a
    /// ringsock [`Error`] it wraps, else by its [`io::ErrorKind`].
    pub fn from_io(err: &io::Error) -> SocketErrorStatus {
        if let Some(errno) = err.raw_os_error() {
            return SocketErrorStatus::from_errno(errno);
        }
        if let Some(inner) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
            return inner.status();
        }
        // Only kinds stable in the crate's minimum Rust version are listed; newer
        // ones such as HostUnreachable come with an errno in practice anyway.
        match err.kind() {
            io::ErrorKind::ConnectionRefused => SocketErrorStatus::ConnectionRefused,
            io::ErrorKind::ConnectionReset => SocketErrorStatus::ConnectionResetByPeer,
            io::ErrorKind::ConnectionAborted => SocketErrorStatus::SoftwareCausedConnectionAbort,
            io::ErrorKind::NotConnected | io::ErrorKind::Unsupported => {
                SocketErrorStatus::UnsupportedOperation
            }
            io::ErrorKind::AddrInUse => SocketErrorStatus::AddressAlreadyInUse,
            io::ErrorKind::AddrNotAvailable => SocketErrorStatus::CannotAssignRequestedAddress,
            io::ErrorKind::BrokenPipe => SocketErrorStatus::BrokenPipe,
            io::ErrorKind::TimedOut => SocketErrorStatus::ConnectionTimedOut,
            io::ErrorKind::PermissionDenied => SocketErrorStatus::PermissionDenied,
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => {
                SocketErrorStatus::FileNotFound
            }
            io::ErrorKind::IsADirectory => SocketErrorStatus::InvalidFile,
            io::ErrorKind::InvalidInput => SocketErrorStatus::InvalidArgument,
            io::ErrorKind::UnexpectedEof | io::ErrorKind::WriteZero => {
                SocketErrorStatus::ConnectionClosed
            }
            io::ErrorKind::OutOfMemory | io::ErrorKind::StorageFull => {
                SocketErrorStatus::NoBufferSpace
            }
            io::ErrorKind::Interrupted => SocketErrorStatus::OperationAborted,
            io::ErrorKind::ResourceBusy => SocketErrorStatus::ResourceBusy,
            _ => SocketErrorStatus::Unknown,
        }
    }

    /// The closest `io::ErrorKind`, for errors converted into `io::Error` without
    /// an errno.
    fn io_kind(self) -> io::ErrorKind {
        use SocketErrorStatus as S;
        match self {
            S::ConnectionRefused => io::ErrorKind::ConnectionRefused,
            S::ConnectionResetByPeer | S::NetworkDroppedConnectionOnReset => {
                io::ErrorKind::ConnectionReset
            }
            S::SoftwareCausedConnectionAbort => io::ErrorKind::ConnectionAborted,
            S::ConnectionTimedOut => io::ErrorKind::TimedOut,
            S::AddressAlreadyInUse => io::ErrorKind::AddrInUse,
            S::CannotAssignRequestedAddress => io::ErrorKind::AddrNotAvailable,
            S::BrokenPipe => io::ErrorKind::BrokenPipe,
            S::ConnectionClosed => io::ErrorKind::UnexpectedEof,
            S::InvalidArgument | S::MessageTooLong => io::ErrorKind::InvalidInput,
            S::PermissionDenied => io::ErrorKind::PermissionDenied,
            S::FileNotFound => io::ErrorKind::NotFound,
            S::ResolverQueueFull | S::ResourceBusy => io::ErrorKind::ResourceBusy,
            S::NoBufferSpace => io::ErrorKind::OutOfMemory,
            S::UnsupportedOperation | S::AddressFamilyNotSupported | S::SocketTypeNotSupported => {
                io::ErrorKind::Unsupported
            }
            // TLS and HTTP failures are about the bytes received, which is what
            // InvalidData means to std users (rustls and native-tls use it too).
            S::HttpInvalidServerResponse
            | S::CertificateExpired
            | S::CertificateUntrustedRoot
            | S::CertificateCommonNameIsIncorrect
            | S::CertificateWrongUsage
            | S::CertificateRevoked
            | S::CertificateNoRevocationCheck
            | S::CertificateRevocationServerOffline
            | S::CertificateIsInvalid
            | S::ClientCertificateRequired
            | S::TlsHandshakeFailed
            | S::TlsProtocolError
            | S::InvalidFile => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        }
    }
}

impl fmt::Display for SocketErrorStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Error {
    /// The Windows-style status of this error, like `SocketError.GetStatus`.
    pub fn status(&self) -> SocketErrorStatus {
        match self {
            Error::Io { source, .. } => SocketErrorStatus::from_io(source),
            Error::InvalidHostName { .. } | Error::InvalidInput { .. } => {
                SocketErrorStatus::InvalidArgument
            }
            Error::InvalidService { status, .. }
            | Error::Resolve { status, .. }
            | Error::Tls { status, .. } => *status,
            Error::NoAddresses { .. } => SocketErrorStatus::NoAddressesFound,
            Error::InvalidFile { .. } => SocketErrorStatus::InvalidFile,
            Error::TimedOut { .. } => SocketErrorStatus::ConnectionTimedOut,
            Error::ConnectionClosed { .. } => SocketErrorStatus::ConnectionClosed,
            Error::WrongRuntime { .. } => SocketErrorStatus::WrongRuntime,
        }
    }

    /// An operating-system failure with context, e.g. `"connect to 127.0.0.1:9"`.
    pub fn io(context: impl Into<String>, err: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source: err,
        }
    }

    /// An operating-system failure from an errno such as `libc::ECONNREFUSED`.
    ///
    /// A negated errno, as io_uring completions report it, is accepted too.
    pub fn from_errno(context: impl Into<String>, errno: i32) -> Error {
        Error::io(context, io::Error::from_raw_os_error(positive_errno(errno)))
    }

    /// A bad argument; the status is [`SocketErrorStatus::InvalidArgument`].
    pub fn invalid_input(message: impl Into<String>) -> Error {
        Error::InvalidInput {
            message: message.into(),
        }
    }

    /// The same error, saying it came from the environment variable `name` (an invalid
    /// value there is otherwise hard to trace back).
    pub(crate) fn in_variable(self, name: &str) -> Error {
        match self {
            Error::InvalidInput { message } => Error::InvalidInput {
                message: format!("{name}: {message}"),
            },
            other => other,
        }
    }

    /// A deadline passed; the status is [`SocketErrorStatus::ConnectionTimedOut`].
    pub fn timed_out(context: impl Into<String>) -> Error {
        Error::TimedOut {
            context: context.into(),
        }
    }

    /// The peer closed early; the status is [`SocketErrorStatus::ConnectionClosed`].
    pub fn connection_closed(context: impl Into<String>) -> Error {
        Error::ConnectionClosed {
            context: context.into(),
        }
    }

    /// A socket or operation used outside its runtime; the status is
    /// [`SocketErrorStatus::WrongRuntime`].
    pub fn wrong_runtime(message: impl Into<String>) -> Error {
        Error::WrongRuntime {
            message: message.into(),
        }
    }

    /// A TLS failure with the given status.
    pub fn tls(status: SocketErrorStatus, message: impl Into<String>) -> Error {
        Error::Tls {
            status,
            message: message.into(),
        }
    }

    /// A file whose contents cannot be used; the status is
    /// [`SocketErrorStatus::InvalidFile`].
    pub fn invalid_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::InvalidFile {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// The errno behind this error, if it came from the operating system.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl Clone for Error {
    /// A copy with the same variant, status and message. `io::Error` is not `Clone`:
    /// an OS error is rebuilt from its errno, any other from its kind and text (a
    /// ringsock error carried inside one is copied whole).
    fn clone(&self) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: clone_io(source),
            },
            Error::InvalidHostName { input, reason } => Error::InvalidHostName {
                input: input.clone(),
                reason: reason.clone(),
            },
            Error::InvalidService {
                input,
                reason,
                status,
            } => Error::InvalidService {
                input: input.clone(),
                reason: reason.clone(),
                status: *status,
            },
            Error::Resolve {
                host,
                status,
                message,
            } => Error::Resolve {
                host: host.clone(),
                status: *status,
                message: message.clone(),
            },
            Error::NoAddresses { host } => Error::NoAddresses { host: host.clone() },
            Error::InvalidInput { message } => Error::InvalidInput {
                message: message.clone(),
            },
            Error::InvalidFile { path, reason } => Error::InvalidFile {
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::TimedOut { context } => Error::TimedOut {
                context: context.clone(),
            },
            Error::ConnectionClosed { context } => Error::ConnectionClosed {
                context: context.clone(),
            },
            Error::Tls { status, message } => Error::Tls {
                status: *status,
                message: message.clone(),
            },
            Error::WrongRuntime { message } => Error::WrongRuntime {
                message: message.clone(),
            },
        }
    }
}

fn clone_io(err: &io::Error) -> io::Error {
    if let Some(errno) = err.raw_os_error() {
        return io::Error::from_raw_os_error(errno);
    }
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
    {
        Some(inner) => io::Error::new(err.kind(), inner.clone()),
        None => io::Error::new(err.kind(), err.to_string()),
    }
}

impl From<io::Error> for Error {
    /// Unwraps a ringsock error that was carried through an `io::Error`, so a round
    /// trip keeps the variant; anything else becomes [`Error::Io`] without context.
    fn from(err: io::Error) -> Error {
        match err.downcast::<Error>() {
            Ok(inner) => inner,
            Err(err) => Error::io(String::new(), err),
        }
    }
}

impl From<Error> for io::Error {
    /// Keeps the errno when there is one. `io::Error` cannot hold an errno and a
    /// message at once, so in that case the context is dropped in favour of the
    /// errno, which std callers match on. Otherwise the whole error is wrapped,
    /// keeping its message and letting [`Error::from`] recover it.
    fn from(err: Error) -> io::Error {
        match err {
            Error::Io { source, .. } if source.raw_os_error().is_some() => source,
            other => {
                let kind = match &other {
                    Error::Io { source, .. } => source.kind(),
                    _ => other.status().io_kind(),
                };
                io::Error::new(kind, other)
            }
        }
    }
}

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            f.write_char(if c.is_control() { ' ' } else { c })?;
        }
        Ok(())
    }
}

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(Clipped::SHOWN) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}... ({} bytes in all)", &self.0[..cut], self.0.len()),
        }
    }
}

impl fmt::Display for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "{}: ", OneLine(self.0))
        }
    }
}

/// io_uring completions report `-errno`; accepting both signs keeps callers from
/// having to remember which convention a value follows. `i32::MIN` has no positive
/// counterpart and becomes 0, which maps to nothing.
fn positive_errno(errno: i32) -> i32 {
    errno.checked_abs().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_to_status() {
        use SocketErrorStatus as S;
        let cases: &[(i32, SocketErrorStatus)] = &[
            (libc::ECONNREFUSED, S::ConnectionRefused),
            (libc::ECONNRESET, S::ConnectionResetByPeer),
            (libc::ECONNABORTED, S::SoftwareCausedConnectionAbort),
            (libc::ETIMEDOUT, S::ConnectionTimedOut),
            (libc::ETIME, S::ConnectionTimedOut),
            (libc::EADDRINUSE, S::AddressAlreadyInUse),
            (libc::EADDRNOTAVAIL, S::CannotAssignRequestedAddress),
            (libc::ENETUNREACH, S::NetworkIsUnreachable),
            (libc::ENONET, S::NetworkIsUnreachable),
            (libc::ENODEV, S::NetworkIsUnreachable),
            (libc::EHOSTUNREACH, S::UnreachableHost),
            (libc::ENETDOWN, S::NetworkIsDown),
            (libc::EHOSTDOWN, S::HostIsDown),
            (libc::ENETRESET, S::NetworkDroppedConnectionOnReset),
            (libc::EMFILE, S::TooManyOpenFiles),
            (libc::ENFILE, S::TooManyOpenFiles),
            (libc::EMSGSIZE, S::MessageTooLong),
            (libc::EAFNOSUPPORT, S::AddressFamilyNotSupported),
            (libc::EPFNOSUPPORT, S::AddressFamilyNotSupported),
            (libc::ESOCKTNOSUPPORT, S::SocketTypeNotSupported),
            (libc::EPROTONOSUPPORT, S::SocketTypeNotSupported),
            (libc::EPROTOTYPE, S::SocketTypeNotSupported),
            (libc::ECANCELED, S::OperationAborted),
            (libc::EINTR, S::OperationAborted),
            (libc::EPIPE, S::BrokenPipe),
            (libc::ESHUTDOWN, S::BrokenPipe),
            (libc::ENOBUFS, S::NoBufferSpace),
            (libc::ENOMEM, S::NoBufferSpace),
            (libc::ENOSPC, S::NoBufferSpace),
            (libc::EDQUOT, S::NoBufferSpace),
            (libc::EACCES, S::PermissionDenied),
            (libc::EBUSY, S::ResourceBusy),
            (libc::EPERM, S::PermissionDenied),
            (libc::EINVAL, S::UnsupportedOperation),
            (libc::EOPNOTSUPP, S::UnsupportedOperation),
            (libc::ENOTSUP, S::UnsupportedOperation),
            (libc::ENOSYS, S::UnsupportedOperation),
            (libc::ENOPROTOOPT, S::UnsupportedOperation),
            (libc::ENOTCONN, S::UnsupportedOperation),
            (libc::EISCONN, S::UnsupportedOperation),
            (libc::ENOENT, S::FileNotFound),
            (libc::ENOTDIR, S::FileNotFound),
            (libc::EISDIR, S::InvalidFile),
            (libc::EAGAIN, S::Unknown),
            (0, S::Unknown),
            (100_000, S::Unknown),
            (i32::MAX, S::Unknown),
            // io_uring style negated errnos.
            (-libc::ECONNREFUSED, S::ConnectionRefused),
            (-libc::ECANCELED, S::OperationAborted),
            (i32::MIN, S::Unknown),
        ];
        for &(errno, want) in cases {
            assert_eq!(SocketErrorStatus::from_errno(errno), want, "errno {errno}");
        }
    }

    #[test]
    fn io_error_maps_to_status() {
        use io::ErrorKind as K;
        use SocketErrorStatus as S;
        let cases: Vec<(io::Error, SocketErrorStatus)> = vec![
            (io::Error::from_raw_os_error(libc::EPIPE), S::BrokenPipe),
            (io::Error::from(K::ConnectionRefused), S::ConnectionRefused),
            (
                io::Error::from(K::ConnectionReset),
                S::ConnectionResetByPeer,
            ),
            (
                io::Error::from(K::ConnectionAborted),
                S::SoftwareCausedConnectionAbort,
            ),
            (io::Error::from(K::NotConnected), S::UnsupportedOperation),
            (io::Error::from(K::Unsupported), S::UnsupportedOperation),
            (io::Error::from(K::AddrInUse), S::AddressAlreadyInUse),
            (
                io::Error::from(K::AddrNotAvailable),
                S::CannotAssignRequestedAddress,
            ),
            (io::Error::from(K::BrokenPipe), S::BrokenPipe),
            (io::Error::from(K::TimedOut), S::ConnectionTimedOut),
            (io::Error::from(K::PermissionDenied), S::PermissionDenied),
            (io::Error::from(K::InvalidInput), S::InvalidArgument),
            (io::Error::new(K::UnexpectedEof, "eof"), S::ConnectionClosed),
            (io::Error::from(K::WriteZero), S::ConnectionClosed),
            (io::Error::from(K::OutOfMemory), S::NoBufferSpace),
            (io::Error::from(K::Interrupted), S::OperationAborted),
            (io::Error::from(K::NotFound), S::FileNotFound),
            (io::Error::from(K::NotADirectory), S::FileNotFound),
            (io::Error::from(K::IsADirectory), S::InvalidFile),
            (io::Error::from(K::ResourceBusy), S::ResourceBusy),
            (io::Error::other("custom"), S::Unknown),
            (
                io::Error::other(Error::tls(S::CertificateExpired, "expired")),
                S::CertificateExpired,
            ),
        ];
        for (err, want) in &cases {
            assert_eq!(SocketErrorStatus::from_io(err), *want, "{err:?}");
        }
    }

    #[test]
    fn status_display_is_the_variant_name() {
        assert_eq!(SocketErrorStatus::ALL.len(), 45);
        for status in SocketErrorStatus::ALL {
            assert_eq!(status.to_string(), format!("{status:?}"));
        }
        assert_eq!(
            SocketErrorStatus::ConnectionRefused.to_string(),
            "ConnectionRefused"
        );
    }

    #[test]
    fn every_variant_has_a_status_and_one_line_display() {
        use SocketErrorStatus as S;
        let cases: Vec<(Error, SocketErrorStatus, &str)> = vec![
            (
                Error::from_errno("connect to 127.0.0.1:9", libc::ECONNREFUSED),
                S::ConnectionRefused,
                "connect to 127.0.0.1:9: Connection refused (os error 111)",
            ),
            (
                Error::from_errno("send", -libc::EPIPE),
                S::BrokenPipe,
                "send: Broken pipe (os error 32)",
            ),
            (
                Error::from(io::Error::from_raw_os_error(libc::ECONNRESET)),
                S::ConnectionResetByPeer,
                "Connection reset by peer (os error 104)",
            ),
            (
                Error::io("read", io::Error::other("a\nb")),
                S::Unknown,
                "read: a b",
            ),
            (
                Error::io(
                    "read",
                    io::Error::other(Error::wrong_runtime("owned by runtime 1")),
                ),
                S::WrongRuntime,
                "read: owned by runtime 1",
            ),
            (
                Error::InvalidHostName {
                    input: "exa mple".into(),
                    reason: "character ' ' at position 3 is not allowed".into(),
                },
                S::InvalidArgument,
                "invalid host name \"exa mple\": character ' ' at position 3 is not allowed",
            ),
            (
                Error::InvalidService {
                    input: "nope".into(),
                    reason: "unknown".into(),
                    status: S::ClassTypeNotFound,
                },
                S::ClassTypeNotFound,
                "invalid service \"nope\": unknown",
            ),
            (
                Error::Resolve {
                    host: "x.invalid".into(),
                    status: S::HostNotFound,
                    message: "Name or service not known".into(),
                },
                S::HostNotFound,
                "cannot resolve \"x.invalid\": Name or service not known",
            ),
            (
                Error::NoAddresses {
                    host: "empty.example".into(),
                },
                S::NoAddressesFound,
                "\"empty.example\" resolved to no addresses",
            ),
            (
                Error::invalid_input("buffer size 0\r\n"),
                S::InvalidArgument,
                "invalid argument: buffer size 0  ",
            ),
            (
                Error::timed_out("connect to [::1]:80"),
                S::ConnectionTimedOut,
                "connect to [::1]:80: timed out",
            ),
            (Error::timed_out(""), S::ConnectionTimedOut, "timed out"),
            (
                Error::invalid_file("/etc/x\n.pem", "no CERTIFICATE section"),
                S::InvalidFile,
                "invalid file /etc/x .pem: no CERTIFICATE section",
            ),
            (
                Error::from_errno("read the certificate file /nope.pem", libc::ENOENT),
                S::FileNotFound,
                "read the certificate file /nope.pem: No such file or directory (os error 2)",
            ),
            (
                Error::connection_closed("read_line"),
                S::ConnectionClosed,
                "read_line: connection closed by peer",
            ),
            (
                Error::tls(S::CertificateUntrustedRoot, "unknown issuer"),
                S::CertificateUntrustedRoot,
                "TLS failure (CertificateUntrustedRoot): unknown issuer",
            ),
        ];
        for (err, status, display) in &cases {
            assert_eq!(err.status(), *status, "{err:?}");
            assert_eq!(err.to_string(), *display);
        }
    }

    #[test]
    fn io_round_trips_keep_errno() {
        let errnos = [libc::ECONNREFUSED, libc::EPIPE, libc::EMFILE, libc::EINVAL];
        for errno in errnos {
            let ours = Error::from(io::Error::from_raw_os_error(errno));
            assert_eq!(ours.raw_os_error(), Some(errno));
            assert_eq!(ours.status(), SocketErrorStatus::from_errno(errno));
            let back = io::Error::from(ours);
            assert_eq!(back.raw_os_error(), Some(errno));

            let ours = Error::from_errno("ctx", errno);
            assert_eq!(io::Error::from(ours).raw_os_error(), Some(errno));
        }
    }

    #[test]
    fn io_round_trips_keep_variant_and_message() {
        use io::ErrorKind as K;
        let cases: Vec<(Error, io::ErrorKind)> = vec![
            (Error::timed_out("connect"), K::TimedOut),
            (Error::invalid_input("ttl 0"), K::InvalidInput),
            (Error::connection_closed("read_line"), K::UnexpectedEof),
            (Error::invalid_file("/k.pem", "bad key"), K::InvalidData),
            (
                Error::tls(SocketErrorStatus::CertificateExpired, "expired"),
                K::InvalidData,
            ),
            (
                Error::NoAddresses {
                    host: "a.example".into(),
                },
                K::Other,
            ),
            (
                Error::io("read", io::Error::new(K::UnexpectedEof, "early eof")),
                K::UnexpectedEof,
            ),
        ];
        for (err, kind) in cases {
            let message = err.to_string();
            let status = err.status();
            let io_err = io::Error::from(err);
            assert_eq!(io_err.kind(), kind, "{message}");
            assert_eq!(io_err.raw_os_error(), None);
            assert_eq!(io_err.to_string(), message);
            assert_eq!(SocketErrorStatus::from_io(&io_err), status);
            let back = Error::from(io_err);
            assert_eq!(back.to_string(), message);
            assert_eq!(back.status(), status);
        }
    }

    #[test]
    fn error_is_send_sync_static() {
        fn check<T: Send + Sync + 'static + std::error::Error>() {}
        check::<Error>();
    }

    #[test]
    fn a_clone_keeps_variant_status_errno_and_message() {
        let cases = [
            Error::from_errno("write", libc::ECONNRESET),
            Error::tls(SocketErrorStatus::CertificateExpired, "expired"),
            Error::io(
                "write",
                io::Error::other(Error::tls(
                    SocketErrorStatus::TlsHandshakeFailed,
                    "bad record",
                )),
            ),
            Error::io("write", io::ErrorKind::WriteZero.into()),
            Error::timed_out("flush"),
            Error::invalid_file("/k.pem", "bad key"),
        ];
        for err in cases {
            let copy = err.clone();
            assert_eq!(copy.status(), err.status(), "{err}");
            assert_eq!(copy.raw_os_error(), err.raw_os_error(), "{err}");
            assert_eq!(copy.to_string(), err.to_string());
        }
    }

    #[test]
    fn a_huge_input_is_cut_in_the_message_and_kept_whole_in_the_error() {
        let input = format!("{}{}", "é".repeat(300), "x".repeat(1_000_000));
        let err = Error::InvalidHostName {
            input: input.clone(),
            reason: "too long".into(),
        };
        assert_eq!(
            err.to_string(),
            format!(
                "invalid host name \"{}\"... (1000600 bytes in all): too long",
                "é".repeat(256)
            )
        );
        match err {
            Error::InvalidHostName { input: kept, .. } => assert_eq!(kept, input),
            other => panic!("{other:?}"),
        }
    }
}
