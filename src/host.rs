//! Host names, services and blocking name resolution.
//!
//! [`HostName`] validates up front, like Windows.Networking.HostName, so a typo
//! fails with a message naming the bad character instead of as a resolver error
//! later. [`resolve_blocking`] calls the system resolver on the calling thread;
//! [`resolve`], which the sockets use, runs it on a small bounded pool of resolver
//! threads with a timeout, so the loop never blocks on DNS.

// getaddrinfo, freeaddrinfo, gai_strerror and if_nametoindex have no safe wrapper
// in std that exposes resolver error codes, so this module calls them directly.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::Path;
use std::ptr;
use std::str::FromStr;

use crate::error::{Error, Result, SocketErrorStatus};

mod resolver;

pub use resolver::{
    resolve, resolver_stats, ResolverStats, DEFAULT_RESOLVE_TIMEOUT, RESOLVER_QUEUE,
    RESOLVER_THREADS,
};

/// A validated host name: an IPv4 literal, an IPv6 literal (with or without
/// `[brackets]`, with an optional `%scope` for link-local addresses), or an
/// RFC 1123 DNS name.
///
/// Equality is on the text as given: `"Example.com"` and `"example.com"` differ.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostName {
    /// The name as given, minus IPv6 brackets.
    name: String,
    repr: Repr,
}

/// What kind of name a [`HostName`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostNameKind {
    /// A dotted-quad IPv4 literal such as `127.0.0.1`.
    Ipv4,
    /// An IPv6 literal such as `::1` or `fe80::1%eth0`.
    Ipv6,
    /// A DNS name such as `localhost` or `example.com`.
    DomainName,
}

/// The transport protocol a service name is looked up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP (stream sockets).
    Tcp,
    /// UDP (datagram sockets).
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Repr {
    Ipv4(Ipv4Addr),
    Ipv6 {
        addr: Ipv6Addr,
        /// Byte offset of the scope text (after `%`) in `HostName::name`.
        scope_start: Option<usize>,
    },
    Domain,
}

/// Owns a list returned by `getaddrinfo`, so it is freed on every path out of
/// [`resolve_blocking`], early returns included.
struct AddrInfoList(*mut libc::addrinfo);

/// RFC 1123 limit on a whole name, not counting a trailing dot.
const MAX_NAME_LEN: usize = 253;
/// RFC 1035 limit on one label.
const MAX_LABEL_LEN: usize = 63;
/// IFNAMSIZ minus the terminating NUL: the longest Linux interface name.
const MAX_SCOPE_LEN: usize = 15;
/// Read directly rather than through getservbyname, which is not thread-safe.
const SERVICES_PATH: &str = "/etc/services";

impl HostName {
    /// Validates `name` as an IP literal or an RFC 1123 DNS name.
    ///
    /// A name made only of numbers and dots must be a dotted-quad IPv4 address: the
    /// system resolver reads `"1.2.3"` or `"0x7f.1"` as an address (1.2.0.3, 127.0.0.1)
    /// without asking DNS, so such a name is refused rather than passed as a domain name.
    ///
    /// Nothing is trimmed. On failure the error is [`Error::InvalidHostName`],
    /// whose reason names the offending character (with its position) or label.
    pub fn new(name: &str) -> Result<HostName> {
        parse_host_name(name).map_err(|reason| Error::InvalidHostName {
            input: name.to_owned(),
            reason,
        })
    }

    /// The name as given, with the brackets of an IPv6 literal removed.
    pub fn raw_name(&self) -> &str {
        &self.name
    }

    /// The address, for an IP literal.
    ///
    /// An IPv6 scope is not part of [`IpAddr`]; use [`HostName::scope`] or
    /// [`resolve_blocking`], which applies it, when it matters.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.repr {
            Repr::Ipv4(addr) => Some(IpAddr::V4(addr)),
            Repr::Ipv6 { addr, .. } => Some(IpAddr::V6(addr)),
            Repr::Domain => None,
        }
    }

    /// Whether this is an IPv4 literal, an IPv6 literal or a DNS name.
    pub fn kind(&self) -> HostNameKind {
        match self.repr {
            Repr::Ipv4(_) => HostNameKind::Ipv4,
            Repr::Ipv6 { .. } => HostNameKind::Ipv6,
            Repr::Domain => HostNameKind::DomainName,
        }
    }

    /// The zone of a scoped IPv6 literal: the text after `%`, an interface name
    /// (`"eth0"`) or index (`"2"`).
    pub fn scope(&self) -> Option<&str> {
        match self.repr {
            Repr::Ipv6 {
                scope_start: Some(start),
                ..
            } => self.name.get(start..),
            _ => None,
        }
    }
}

impl Protocol {
    /// The protocol column of `/etc/services`.
    fn services_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl FromStr for HostName {
    type Err = Error;

    fn from_str(s: &str) -> Result<HostName> {
        HostName::new(s)
    }
}

impl fmt::Display for HostName {
    /// IPv6 literals are bracketed so that appending `:port` stays unambiguous.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.repr {
            Repr::Ipv6 { .. } => write!(f, "[{}]", self.name),
            _ => f.write_str(&self.name),
        }
    }
}

impl From<IpAddr> for HostName {
    fn from(addr: IpAddr) -> HostName {
        match addr {
            IpAddr::V4(v4) => HostName::from(v4),
            IpAddr::V6(v6) => HostName::from(v6),
        }
    }
}

impl From<Ipv4Addr> for HostName {
    fn from(addr: Ipv4Addr) -> HostName {
        HostName {
            name: addr.to_string(),
            repr: Repr::Ipv4(addr),
        }
    }
}

impl From<Ipv6Addr> for HostName {
    fn from(addr: Ipv6Addr) -> HostName {
        HostName {
            name: addr.to_string(),
            repr: Repr::Ipv6 {
                addr,
                scope_start: None,
            },
        }
    }
}

impl AddrInfoList {
    /// The IPv4 and IPv6 addresses in the list, in order, without duplicates.
    fn socket_addrs(&self, port: u16) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        let mut cur = self.0;
        while !cur.is_null() {
            // SAFETY: `cur` is the head getaddrinfo returned or an `ai_next` link of
            // that same list; the list stays allocated until `self` is dropped, and
            // `self` outlives this borrow.
            let ai = unsafe { &*cur };
            if let Some(addr) = sockaddr_of(ai, port) {
                if !out.contains(&addr) {
                    out.push(addr);
                }
            }
            cur = ai.ai_next;
        }
        out
    }
}

impl Drop for AddrInfoList {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a non-null pointer here was stored by a successful getaddrinfo
            // and has not been freed: the guard is the list's only owner.
            unsafe { libc::freeaddrinfo(self.0) };
        }
    }
}

/// Parses a service: a decimal port number 0-65535, or a name from `/etc/services`
/// for `protocol` (like `"http"` or `"ssh"`, compared ignoring ASCII case as
/// RFC 6335 specifies).
///
/// Nothing is trimmed. Errors are [`Error::InvalidService`] with status
/// [`SocketErrorStatus::ClassTypeNotFound`] for a well-formed name that is not
/// listed (a missing `/etc/services` lists nothing), and
/// [`SocketErrorStatus::InvalidArgument`] for malformed input.
pub fn parse_service(service: &str, protocol: Protocol) -> Result<u16> {
    parse_service_with(service, protocol, read_services_file)
}

/// Resolves `host` to socket addresses with `port`, blocking the calling thread.
///
/// IP literals need no system call (except `if_nametoindex` for an IPv6 scope given
/// as an interface name). Other names go to `getaddrinfo`, without `AI_ADDRCONFIG`
/// so that loopback-only machines still resolve `localhost`; addresses come back
/// in the resolver's order with duplicates removed.
pub fn resolve_blocking(host: &HostName, port: u16) -> Result<Vec<SocketAddr>> {
    match host.repr {
        Repr::Ipv4(addr) => Ok(vec![SocketAddr::V4(SocketAddrV4::new(addr, port))]),
        Repr::Ipv6 { addr, .. } => {
            let scope_id = match host.scope() {
                Some(scope) => scope_id(host, scope)?,
                None => 0,
            };
            Ok(vec![SocketAddr::V6(SocketAddrV6::new(
                addr, port, 0, scope_id,
            ))])
        }
        Repr::Domain => resolve_name(host.raw_name(), port),
    }
}

fn parse_host_name(name: &str) -> std::result::Result<HostName, String> {
    if name.is_empty() {
        return Err("empty".to_owned());
    }
    if let Some(inner) = bracketed(name)? {
        if inner.is_empty() {
            return Err("empty brackets".to_owned());
        }
        if inner.parse::<Ipv4Addr>().is_ok() {
            return Err("brackets may only enclose an IPv6 address".to_owned());
        }
        let (addr, scope_start) = parse_ipv6(inner)
            .map_err(|why| format!("{inner:?} in brackets is not a valid IPv6 address{why}"))?;
        return Ok(HostName {
            name: inner.to_owned(),
            repr: Repr::Ipv6 { addr, scope_start },
        });
    }
    if name.contains(':') {
        let (addr, scope_start) = parse_ipv6(name).map_err(|why| {
            // One colon is far more likely "host:port" than a broken IPv6 literal.
            let hint = if name.matches(':').count() == 1 && why.is_empty() {
                " (a port does not belong in a host name)"
            } else {
                ""
            };
            format!("contains ':' but is not a valid IPv6 address{why}{hint}")
        })?;
        return Ok(HostName {
            name: name.to_owned(),
            repr: Repr::Ipv6 { addr, scope_start },
        });
    }
    validate_dns_name(name)?;
    Ok(HostName {
        name: name.to_owned(),
        repr: match name.parse::<Ipv4Addr>() {
            Ok(addr) => Repr::Ipv4(addr),
            Err(_) => Repr::Domain,
        },
    })
}

/// Returns the text inside `[...]` when the whole name is bracketed, `None` when
/// there are no brackets, and an error for any other use of brackets.
fn bracketed(name: &str) -> std::result::Result<Option<&str>, String> {
    let last = name.chars().count().saturating_sub(1);
    let mut open = false;
    let mut close = false;
    for (pos, c) in name.chars().enumerate() {
        match c {
            '[' if pos == 0 => open = true,
            ']' if pos == last => close = true,
            '[' | ']' => {
                return Err(format!(
                    "character '{c}' at position {pos} is not allowed \
                     (brackets may only enclose a whole IPv6 address)"
                ))
            }
            _ => {}
        }
    }
    match (open, close) {
        (true, true) => Ok(name
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))),
        (false, false) => Ok(None),
        (true, false) => {
            Err("unbalanced brackets: '[' at position 0 has no closing ']'".to_owned())
        }
        (false, true) => Err(format!(
            "unbalanced brackets: ']' at position {last} has no opening '['"
        )),
    }
}

/// Parses an unbracketed IPv6 literal with an optional `%scope`. The error is a
/// suffix explaining a scope problem, or empty when the address itself is bad.
fn parse_ipv6(text: &str) -> std::result::Result<(Ipv6Addr, Option<usize>), String> {
    let (addr_text, scope) = match text.split_once('%') {
        Some((addr_text, scope)) => (addr_text, Some(scope)),
        None => (text, None),
    };
    let addr = addr_text.parse::<Ipv6Addr>().map_err(|_| String::new())?;
    let Some(scope) = scope else {
        return Ok((addr, None));
    };
    validate_scope(scope)?;
    if !is_link_scoped(addr) {
        return Err(format!(
            ": scope %{scope} is only allowed on link-local addresses \
             (fe80::/10, or multicast of interface- or link-local scope)"
        ));
    }
    Ok((addr, Some(addr_text.len() + 1)))
}

fn validate_scope(scope: &str) -> std::result::Result<(), String> {
    if scope.is_empty() {
        return Err(": empty scope after '%'".to_owned());
    }
    if let Some((pos, c)) = scope
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            ": character '{}' at position {pos} of scope {scope:?} is not allowed",
            c.escape_debug()
        ));
    }
    if scope.len() > MAX_SCOPE_LEN {
        return Err(format!(
            ": scope {scope:?} is longer than {MAX_SCOPE_LEN} characters"
        ));
    }
    if scope.bytes().all(|b| b.is_ascii_digit()) && scope.parse::<u32>().is_err() {
        return Err(format!(": scope index {scope} is out of range"));
    }
    Ok(())
}

/// Whether a zone index is meaningful for `addr`: unicast link-local, or multicast
/// with interface-local or link-local scope.
fn is_link_scoped(addr: Ipv6Addr) -> bool {
    let first = addr.segments()[0];
    (first & 0xffc0) == 0xfe80 || matches!(first & 0xff0f, 0xff01 | 0xff02)
}

/// RFC 1123 rules, plus: a name made only of numbers and dots must be a dotted-quad
/// IPv4 address, because getaddrinfo reads such a name as an address in inet_aton's
/// notation without asking DNS: "1.2.3" as 1.2.0.3, "0x7f.1" as 127.0.0.1. Letting
/// the hexadecimal forms through would give a "domain name" that connects to loopback.
fn validate_dns_name(name: &str) -> std::result::Result<(), String> {
    for (pos, c) in name.chars().enumerate() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
            continue;
        }
        let why = if c == '_' {
            " (RFC 1123 host names may not contain underscores)"
        } else if !c.is_ascii() {
            " (non-ASCII; use the IDNA \"xn--\" form)"
        } else {
            ""
        };
        return Err(format!(
            "character '{}' at position {pos} is not allowed{why}",
            c.escape_debug()
        ));
    }
    if name.bytes().any(|b| b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return if name.parse::<Ipv4Addr>().is_ok() {
            Ok(())
        } else {
            Err("has only digits and dots but is not a valid IPv4 address".to_owned())
        };
    }
    let body = name.strip_suffix('.').unwrap_or(name);
    // Only hexadecimal labels get here: all-decimal names were settled above.
    if body.split('.').all(looks_numeric) {
        return Err(match inet_aton(body) {
            Some(addr) => format!(
                "reads as the IPv4 address {addr} in the resolver's numeric notation; \
                 write it as the dotted quad {addr}"
            ),
            None => "has only numbers and dots but is not a valid IPv4 address".to_owned(),
        });
    }
    if body.len() > MAX_NAME_LEN {
        return Err(format!(
            "is {} characters long; at most {MAX_NAME_LEN} are allowed (not counting a trailing dot)",
            body.len()
        ));
    }
    let mut start = 0;
    for label in body.split('.') {
        if label.is_empty() {
            return Err(format!("empty label at position {start}"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "label {label:?} is {} characters long; at most {MAX_LABEL_LEN} are allowed",
                label.len()
            ));
        }
        if label.starts_with('-') {
            return Err(format!("label {label:?} starts with '-'"));
        }
        if label.ends_with('-') {
            return Err(format!("label {label:?} ends with '-'"));
        }
        start += label.len() + 1;
    }
    Ok(())
}

/// Whether `label` is written as a number: decimal digits, or `0x` and hex digits.
fn looks_numeric(label: &str) -> bool {
    match label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        Some(hex) => !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// The value of one label as inet_aton reads a number: hexadecimal after `0x`, octal
/// after a leading `0`, else decimal. `None` if it is no such number, or exceeds 32 bits.
fn numeric_label(label: &str) -> Option<u32> {
    let (digits, radix) = match label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        Some(hex) => (hex, 16),
        None if label.len() > 1 && label.starts_with('0') => (&label[1..], 8),
        None => (label, 10),
    };
    // from_str_radix would also take a sign.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

/// The address glibc's inet_aton makes of `text`: one to four numbers, the last filling
/// the bytes the others leave. `None` where it would refuse the text.
fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts = text
        .split('.')
        .map(numeric_label)
        .collect::<Option<Vec<u32>>>()?;
    let (last, leading) = parts.split_last()?;
    if leading.len() > 3 || leading.iter().any(|&part| part > 0xff) {
        return None;
    }
    let last_bits = 32 - 8 * leading.len() as u32;
    if last_bits < 32 && *last >> last_bits != 0 {
        return None;
    }
    let high = leading
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &part)| acc | part << (24 - 8 * i as u32));
    Some(Ipv4Addr::from(high | last))
}

fn parse_service_with(
    service: &str,
    protocol: Protocol,
    services_file: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<u16> {
    let invalid = |reason: String, status| Error::InvalidService {
        input: service.to_owned(),
        reason,
        status,
    };
    let malformed = |reason: String| invalid(reason, SocketErrorStatus::InvalidArgument);
    if service.is_empty() {
        return Err(malformed("empty".to_owned()));
    }
    if service.bytes().all(|b| b.is_ascii_digit()) {
        return parse_port(service.as_bytes())
            .ok_or_else(|| malformed("port out of range (0-65535)".to_owned()));
    }
    // The characters seen in service names; anything else (spaces, '#', '/')
    // would be misread by the line-oriented file format.
    if let Some((pos, c)) = service
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')))
    {
        return Err(malformed(format!(
            "character '{}' at position {pos} is not allowed",
            c.escape_debug()
        )));
    }
    if !service.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(malformed(
            "must be a port number (digits only) or a name starting with a letter or digit"
                .to_owned(),
        ));
    }
    let table = services_file()?;
    if let Some(port) = lookup_service(&table, service, protocol) {
        return Ok(port);
    }
    let proto = protocol.services_name();
    // A few real names start with a digit ("9pfs"), so digits-then-letters is only
    // malformed once the lookup has failed.
    if service.starts_with(|c: char| c.is_ascii_digit()) {
        Err(malformed(format!(
            "neither a port number (digits only) nor a known {proto} service name"
        )))
    } else {
        Err(invalid(
            format!("unknown {proto} service name (not in {SERVICES_PATH})"),
            SocketErrorStatus::ClassTypeNotFound,
        ))
    }
}

fn read_services_file() -> Result<Vec<u8>> {
    read_services_table(Path::new(SERVICES_PATH))
}

/// A missing file lists nothing; any other failure is an error naming the file, with
/// the file's status (`PermissionDenied`, `InvalidFile` for a directory, ...).
fn read_services_table(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(table) => Ok(table),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(Error::io(
            format!("read the services file {}", path.display()),
            err,
        )),
    }
}

/// Finds `name` in services(5) text: `name port/proto [aliases...] [# comment]`.
/// The first matching line wins, as with getservbyname.
fn lookup_service(table: &[u8], name: &str, protocol: Protocol) -> Option<u16> {
    let name = name.as_bytes();
    let proto = protocol.services_name().as_bytes();
    for line in table.split(|&b| b == b'\n') {
        let line = line.split(|&b| b == b'#').next().unwrap_or_default();
        let mut fields = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|field| !field.is_empty());
        let (Some(official), Some(port_proto)) = (fields.next(), fields.next()) else {
            continue;
        };
        let mut parts = port_proto.split(|&b| b == b'/');
        let (Some(port), Some(line_proto), None) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !line_proto.eq_ignore_ascii_case(proto) {
            continue;
        }
        if !(official.eq_ignore_ascii_case(name) || fields.any(|a| a.eq_ignore_ascii_case(name))) {
            continue;
        }
        if let Some(port) = parse_port(port) {
            return Some(port);
        }
    }
    None
}

/// Decimal digits to a port; `None` if empty, not all digits, or over 65535.
/// Leading zeros are accepted, as strtoul does.
fn parse_port(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() {
        return None;
    }
    let mut value: u16 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u16::from(b - b'0'))?;
    }
    Some(value)
}

/// The numeric zone of a scoped literal; an interface name is looked up now, not
/// at validation, because interfaces come and go.
fn scope_id(host: &HostName, scope: &str) -> Result<u32> {
    if let Ok(index) = scope.parse::<u32>() {
        return Ok(index);
    }
    let not_found = || Error::Resolve {
        host: host.raw_name().to_owned(),
        // The link the scope names is not reachable from this machine.
        status: SocketErrorStatus::NetworkIsUnreachable,
        message: format!("no network interface named {scope:?}"),
    };
    let c_scope = CString::new(scope).map_err(|_| not_found())?;
    // SAFETY: `c_scope` is a NUL-terminated string that lives across the call;
    // if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(c_scope.as_ptr()) };
    if index == 0 {
        Err(not_found())
    } else {
        Ok(index)
    }
}

fn resolve_name(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let node = CString::new(host)
        .map_err(|_| Error::invalid_input(format!("host name {host:?} contains a NUL byte")))?;
    let hints = libc::addrinfo {
        // No AI_ADDRCONFIG: it hides loopback addresses on machines whose only
        // interface is loopback, so "localhost" would fail there.
        ai_flags: 0,
        ai_family: libc::AF_UNSPEC,
        // Without a socket type every address comes back once per type.
        ai_socktype: libc::SOCK_STREAM,
        ai_protocol: 0,
        ai_addrlen: 0,
        ai_addr: ptr::null_mut(),
        ai_canonname: ptr::null_mut(),
        ai_next: ptr::null_mut(),
    };
    let mut list = AddrInfoList(ptr::null_mut());
    // getaddrinfo leaves errno as its last failure, and only says so for EAI_SYSTEM: a
    // clean errno tells an error it met in this call from one before it.
    // SAFETY: __errno_location returns this thread's errno, always valid to write.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: `node` is NUL-terminated and outlives the call; a null service is
    // allowed; `hints` is a fully initialised addrinfo; `list.0` is a valid place
    // for the result, which the guard frees.
    let rc = unsafe { libc::getaddrinfo(node.as_ptr(), ptr::null(), &hints, &mut list.0) };
    if rc != 0 {
        // Read errno before anything else can overwrite it.
        let errno = io::Error::last_os_error().raw_os_error();
        // The result pointer is only defined on success; never free what was not
        // handed over.
        list.0 = ptr::null_mut();
        return Err(Error::Resolve {
            host: host.to_owned(),
            status: gai_status(rc, errno),
            message: gai_message(rc, errno),
        });
    }
    let addrs = list.socket_addrs(port);
    if addrs.is_empty() {
        return Err(Error::NoAddresses {
            host: host.to_owned(),
        });
    }
    Ok(addrs)
}

/// Converts one addrinfo entry; `None` for families other than IPv4 and IPv6 or a
/// truncated address.
fn sockaddr_of(ai: &libc::addrinfo, port: u16) -> Option<SocketAddr> {
    if ai.ai_addr.is_null() {
        return None;
    }
    let len = usize::try_from(ai.ai_addrlen).ok()?;
    match ai.ai_family {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: `ai_addr` is non-null and getaddrinfo guarantees it points to
            // `ai_addrlen` readable bytes, checked above to cover a sockaddr_in; the
            // read is unaligned because sockaddr storage promises no alignment.
            let sin = unsafe { ptr::read_unaligned(ai.ai_addr.cast::<libc::sockaddr_in>()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, with the length checked to cover a sockaddr_in6.
            let sin6 = unsafe { ptr::read_unaligned(ai.ai_addr.cast::<libc::sockaddr_in6>()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                port,
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Maps a getaddrinfo error code; `errno` is consulted for `EAI_SYSTEM` only.
fn gai_status(rc: libc::c_int, errno: Option<i32>) -> SocketErrorStatus {
    // Out of descriptors, glibc cannot read /etc/hosts or reach a name server, and
    // says the name is unknown (EAI_NONAME) or the lookup failed (EAI_AGAIN).
    if let Some(errno @ (libc::EMFILE | libc::ENFILE)) = errno {
        return SocketErrorStatus::from_errno(errno);
    }
    match rc {
        libc::EAI_NONAME | libc::EAI_FAIL => SocketErrorStatus::HostNotFound,
        libc::EAI_AGAIN => SocketErrorStatus::NonAuthoritativeHostNotFound,
        libc::EAI_NODATA => SocketErrorStatus::NoDataRecordOfRequestedType,
        libc::EAI_FAMILY => SocketErrorStatus::AddressFamilyNotSupported,
        libc::EAI_SOCKTYPE => SocketErrorStatus::SocketTypeNotSupported,
        libc::EAI_SERVICE => SocketErrorStatus::ClassTypeNotFound,
        libc::EAI_MEMORY => SocketErrorStatus::NoBufferSpace,
        libc::EAI_BADFLAGS => SocketErrorStatus::InvalidArgument,
        libc::EAI_SYSTEM => errno.map_or(SocketErrorStatus::Unknown, SocketErrorStatus::from_errno),
        _ => SocketErrorStatus::Unknown,
    }
}

/// The resolver's text for `rc`, plus the system error for `EAI_SYSTEM`.
fn gai_message(rc: libc::c_int, errno: Option<i32>) -> String {
    // SAFETY: gai_strerror accepts any code and returns null or a pointer to a
    // static NUL-terminated string (glibc and musl both use constant tables).
    let text = unsafe { libc::gai_strerror(rc) };
    let mut message = if text.is_null() {
        format!("getaddrinfo error {rc}")
    } else {
        // SAFETY: non-null, and static and NUL-terminated per gai_strerror above.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    };
    let out_of_descriptors = matches!(errno, Some(libc::EMFILE | libc::ENFILE));
    if rc == libc::EAI_SYSTEM || out_of_descriptors {
        if let Some(errno) = errno {
            message = format!("{message}: {}", io::Error::from_raw_os_error(errno));
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Expect {
        Valid(HostNameKind, &'static str),
        Invalid(&'static str),
    }
    use Expect::{Invalid, Valid};
    use HostNameKind::{DomainName, Ipv4, Ipv6};

    fn host_cases() -> Vec<(String, Expect)> {
        let fixed: &[(&str, Expect)] = &[
            ("localhost", Valid(DomainName, "localhost")),
            ("example.com", Valid(DomainName, "example.com")),
            ("Example.COM", Valid(DomainName, "Example.COM")),
            ("example.com.", Valid(DomainName, "example.com.")),
            ("a", Valid(DomainName, "a")),
            ("a-b.c-d", Valid(DomainName, "a-b.c-d")),
            ("xn--bcher-kva.example", Valid(DomainName, "xn--bcher-kva.example")),
            ("1example.com", Valid(DomainName, "1example.com")),
            ("123.example", Valid(DomainName, "123.example")),
            ("127.0.0.1", Valid(Ipv4, "127.0.0.1")),
            ("0.0.0.0", Valid(Ipv4, "0.0.0.0")),
            ("255.255.255.255", Valid(Ipv4, "255.255.255.255")),
            ("::1", Valid(Ipv6, "::1")),
            ("[::1]", Valid(Ipv6, "::1")),
            ("::", Valid(Ipv6, "::")),
            ("2001:db8::1", Valid(Ipv6, "2001:db8::1")),
            ("::ffff:192.0.2.1", Valid(Ipv6, "::ffff:192.0.2.1")),
            ("fe80::1%eth0", Valid(Ipv6, "fe80::1%eth0")),
            ("[fe80::1%2]", Valid(Ipv6, "fe80::1%2")),
            ("ff02::1%lo", Valid(Ipv6, "ff02::1%lo")),
            ("", Invalid("empty")),
            (" example.com", Invalid("character ' ' at position 0 is not allowed")),
            ("example.com ", Invalid("character ' ' at position 11 is not allowed")),
            (
                "exa mple.com",
                Invalid("invalid host name \"exa mple.com\": character ' ' at position 3 is not allowed"),
            ),
            ("ex\tample", Invalid("character '\\t' at position 2")),
            ("a\0b", Invalid("character '\\0' at position 1")),
            ("ex_ample.com", Invalid("character '_' at position 2 is not allowed (RFC 1123 host names may not contain underscores)")),
            ("exämple.com", Invalid("character 'ä' at position 2 is not allowed (non-ASCII")),
            ("example.com/path", Invalid("character '/' at position 11")),
            ("user@example.com", Invalid("character '@' at position 4")),
            ("a%b", Invalid("character '%' at position 1")),
            ("a..b", Invalid("empty label at position 2")),
            (".example.com", Invalid("empty label at position 0")),
            (".", Invalid("empty label at position 0")),
            ("example.com..", Invalid("empty label at position 12")),
            ("-example.com", Invalid("label \"-example\" starts with '-'")),
            ("example-.com", Invalid("label \"example-\" ends with '-'")),
            ("a.-", Invalid("label \"-\" starts with '-'")),
            ("256.1.1.1", Invalid("only digits and dots but is not a valid IPv4 address")),
            ("1.2.3", Invalid("not a valid IPv4 address")),
            ("1.2.3.4.", Invalid("not a valid IPv4 address")),
            ("01.2.3.4", Invalid("not a valid IPv4 address")),
            ("0x7f.1", Invalid("reads as the IPv4 address 127.0.0.1 in the resolver's numeric notation")),
            ("0x7f000001", Invalid("reads as the IPv4 address 127.0.0.1")),
            ("0X7F.0.0.1", Invalid("reads as the IPv4 address 127.0.0.1")),
            ("127.1.0x1", Invalid("reads as the IPv4 address 127.1.0.1")),
            ("0x7f.010.1", Invalid("reads as the IPv4 address 127.8.0.1")),
            ("0xffffffff.", Invalid("reads as the IPv4 address 255.255.255.255")),
            ("0x100000000", Invalid("only numbers and dots but is not a valid IPv4 address")),
            ("0x1.2.3.4.5", Invalid("only numbers and dots but is not a valid IPv4 address")),
            ("0x100.1", Invalid("only numbers and dots but is not a valid IPv4 address")),
            ("1.2.0x10000", Invalid("only numbers and dots but is not a valid IPv4 address")),
            ("0x7f.09", Invalid("only numbers and dots but is not a valid IPv4 address")),
            ("0x", Valid(DomainName, "0x")),
            ("0x.1", Valid(DomainName, "0x.1")),
            ("0xg.1", Valid(DomainName, "0xg.1")),
            ("deadbeef", Valid(DomainName, "deadbeef")),
            ("0x7f.example", Valid(DomainName, "0x7f.example")),
            ("123", Invalid("not a valid IPv4 address")),
            ("[::1", Invalid("unbalanced brackets: '[' at position 0")),
            ("::1]", Invalid("unbalanced brackets: ']' at position 3")),
            ("]", Invalid("unbalanced brackets: ']' at position 0")),
            ("[", Invalid("unbalanced brackets: '[' at position 0")),
            ("[]", Invalid("empty brackets")),
            ("[[::1]]", Invalid("character '[' at position 1")),
            ("a[b]", Invalid("character '[' at position 1")),
            ("[127.0.0.1]", Invalid("brackets may only enclose an IPv6 address")),
            ("[example.com]", Invalid("\"example.com\" in brackets is not a valid IPv6 address")),
            ("1:2:3", Invalid("contains ':' but is not a valid IPv6 address")),
            ("example.com:80", Invalid("not a valid IPv6 address (a port does not belong in a host name)")),
            ("::1%eth0", Invalid("scope %eth0 is only allowed on link-local addresses")),
            ("2001:db8::1%1", Invalid("only allowed on link-local")),
            ("fe80::1%", Invalid("empty scope after '%'")),
            ("fe80::1%eth 0", Invalid("character ' ' at position 3 of scope \"eth 0\"")),
            ("fe80::1%abcdefghijklmnop", Invalid("longer than 15 characters")),
            ("fe80::1%99999999999", Invalid("scope index 99999999999 is out of range")),
            ("fe80::1%eth0%1", Invalid("character '%' at position 4 of scope")),
        ];
        let label63 = "a".repeat(63);
        let label64 = "b".repeat(64);
        // 4 labels of 63 = 255 characters with dots; trim to exact lengths.
        let name253 = format!("{l}.{l}.{l}.{}", "c".repeat(61), l = label63);
        let name254 = format!("{name253}d");
        let mut cases: Vec<(String, Expect)> = fixed
            .iter()
            .map(|(input, expect)| {
                let expect = match expect {
                    Valid(kind, raw) => Valid(*kind, raw),
                    Invalid(fragment) => Invalid(fragment),
                };
                ((*input).to_owned(), expect)
            })
            .collect();
        cases.push((format!("{label63}.com"), Valid(DomainName, "")));
        cases.push((format!("{name253}."), Valid(DomainName, "")));
        cases.push((name253, Valid(DomainName, "")));
        cases.push((
            format!("{label64}.com"),
            Invalid("is 64 characters long; at most 63 are allowed"),
        ));
        cases.push((name254, Invalid("is 254 characters long; at most 253")));
        cases
    }

    #[test]
    fn host_name_table() {
        let cases = host_cases();
        assert!(cases.len() >= 30);
        for (input, expect) in &cases {
            let result = HostName::new(input);
            match (expect, result) {
                (Valid(kind, raw), Ok(host)) => {
                    // Generated long names expect the input back unchanged.
                    let raw = if raw.is_empty() { input.as_str() } else { raw };
                    assert_eq!(host.kind(), *kind, "{input:?}");
                    assert_eq!(host.raw_name(), raw, "{input:?}");
                    assert_eq!(host.ip().is_some(), *kind != DomainName, "{input:?}");
                    let shown = host.to_string();
                    if *kind == Ipv6 {
                        assert_eq!(shown, format!("[{raw}]"));
                    } else {
                        assert_eq!(shown, raw);
                    }
                    assert_eq!(shown.parse::<HostName>().ok(), Some(host), "{input:?}");
                }
                (Invalid(fragment), Err(err)) => {
                    let message = err.to_string();
                    assert!(
                        message.contains(fragment),
                        "{input:?}: {message:?} lacks {fragment:?}"
                    );
                    assert!(!message.contains('\n'), "{message:?}");
                    assert_eq!(err.status(), SocketErrorStatus::InvalidArgument);
                    match err {
                        Error::InvalidHostName { input: got, .. } => assert_eq!(&got, input),
                        other => panic!("{input:?}: wrong variant {other:?}"),
                    }
                }
                (Valid(..), Err(err)) => panic!("{input:?} rejected: {err}"),
                (Invalid(fragment), Ok(host)) => {
                    panic!("{input:?} accepted as {host:?}, expected {fragment:?}")
                }
            }
        }
    }

    #[test]
    fn host_name_scope_and_conversions() {
        let cases: &[(&str, Option<&str>)] = &[
            ("fe80::1%eth0", Some("eth0")),
            ("[fe80::1%2]", Some("2")),
            ("fe80::1", None),
            ("127.0.0.1", None),
            ("localhost", None),
        ];
        for &(input, scope) in cases {
            let host = HostName::new(input).expect("valid");
            assert_eq!(host.scope(), scope, "{input}");
        }

        let conversions: &[(HostName, &str)] = &[
            (HostName::from(Ipv4Addr::LOCALHOST), "127.0.0.1"),
            (HostName::from(Ipv6Addr::LOCALHOST), "::1"),
            (
                HostName::from(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
                "10.0.0.1",
            ),
            (HostName::from(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), "::"),
        ];
        for (host, text) in conversions {
            assert_eq!(Some(host), HostName::new(text).ok().as_ref());
        }
    }

    const SERVICES: &str = "\
# services(5) sample
ssh\t\t22/tcp\t\t\t\t# SSH Remote Login Protocol
http\t\t80/tcp\t\twww\t\t# WorldWideWeb HTTP
ntp\t\t123/udp
domain 53/tcp
domain 53/udp
broken\t99999/tcp
noport
weird x/tcp
slashy 7/tcp/extra
kerberos_master 751/udp
9pfs 564/tcp
ssh 2222/tcp # later duplicates lose
";

    /// A port, or the status and a message fragment of the expected error.
    type ServiceWant = std::result::Result<u16, (SocketErrorStatus, &'static str)>;

    #[test]
    fn service_table() {
        use Protocol::{Tcp, Udp};
        use SocketErrorStatus as S;
        let unknown = S::ClassTypeNotFound;
        let bad = S::InvalidArgument;
        let cases: &[(&str, Protocol, ServiceWant)] = &[
            ("0", Tcp, Ok(0)),
            ("80", Tcp, Ok(80)),
            ("65535", Udp, Ok(65535)),
            ("080", Tcp, Ok(80)),
            ("00000000000000000080", Tcp, Ok(80)),
            ("65536", Tcp, Err((bad, "port out of range"))),
            (
                "99999999999999999999999",
                Tcp,
                Err((bad, "port out of range")),
            ),
            ("ssh", Tcp, Ok(22)),
            ("SSH", Tcp, Ok(22)),
            ("ssh", Udp, Err((unknown, "unknown udp service name"))),
            ("http", Tcp, Ok(80)),
            ("www", Tcp, Ok(80)),
            ("ntp", Udp, Ok(123)),
            ("ntp", Tcp, Err((unknown, "unknown tcp service name"))),
            ("domain", Udp, Ok(53)),
            ("kerberos_master", Udp, Ok(751)),
            ("9pfs", Tcp, Ok(564)),
            ("broken", Tcp, Err((unknown, "not in /etc/services"))),
            ("noport", Tcp, Err((unknown, "unknown"))),
            ("weird", Tcp, Err((unknown, "unknown"))),
            ("slashy", Tcp, Err((unknown, "unknown"))),
            ("tcp", Tcp, Err((unknown, "unknown"))),
            (
                "nosuchservice",
                Tcp,
                Err((
                    unknown,
                    "invalid service \"nosuchservice\": unknown tcp service name",
                )),
            ),
            ("", Tcp, Err((bad, "empty"))),
            (" 80", Tcp, Err((bad, "character ' ' at position 0"))),
            ("80 ", Tcp, Err((bad, "character ' ' at position 2"))),
            ("ht tp", Tcp, Err((bad, "character ' ' at position 2"))),
            ("http\n", Tcp, Err((bad, "character '\\n' at position 4"))),
            ("#", Tcp, Err((bad, "character '#' at position 0"))),
            ("ssh/tcp", Tcp, Err((bad, "character '/' at position 3"))),
            ("ßh", Tcp, Err((bad, "character 'ß' at position 0"))),
            (
                "-1",
                Tcp,
                Err((bad, "name starting with a letter or digit")),
            ),
            (
                "+80",
                Tcp,
                Err((bad, "name starting with a letter or digit")),
            ),
            ("12ab", Tcp, Err((bad, "neither a port number"))),
        ];
        for &(input, protocol, ref want) in cases {
            let got = parse_service_with(input, protocol, || Ok(SERVICES.as_bytes().to_vec()));
            match (want, got) {
                (Ok(port), Ok(got)) => assert_eq!(got, *port, "{input:?}"),
                (Err((status, fragment)), Err(err)) => {
                    assert_eq!(err.status(), *status, "{input:?}: {err}");
                    let message = err.to_string();
                    assert!(
                        message.contains(fragment),
                        "{input:?}: {message:?} lacks {fragment:?}"
                    );
                    assert!(matches!(err, Error::InvalidService { .. }), "{err:?}");
                }
                (want, got) => panic!("{input:?}: wanted {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn service_without_services_file() {
        let cases: &[(&str, std::result::Result<u16, SocketErrorStatus>)] = &[
            ("http", Err(SocketErrorStatus::ClassTypeNotFound)),
            ("443", Ok(443)),
            ("12ab", Err(SocketErrorStatus::InvalidArgument)),
        ];
        for &(input, want) in cases {
            let got = parse_service_with(input, Protocol::Tcp, || Ok(Vec::new()));
            assert_eq!(got.map_err(|e| e.status()), want, "{input:?}");
        }
    }

    #[test]
    fn service_numbers_skip_the_file() {
        let got = parse_service_with("8080", Protocol::Udp, || {
            Err(Error::invalid_input("the file must not be read"))
        });
        assert_eq!(got.ok(), Some(8080));
    }

    #[test]
    fn an_unreadable_services_file_is_a_file_error() {
        use SocketErrorStatus as S;
        // A missing file lists nothing; the other failures name the file. EACCES cannot
        // be made here (the tests run as root); its mapping is tested in error.rs.
        let missing = read_services_table(Path::new("/nonexistent/services"));
        assert_eq!(missing.ok(), Some(Vec::new()));
        let cases: &[(&str, SocketErrorStatus)] = &[
            ("/", S::InvalidFile),
            ("/proc/self/status/services", S::FileNotFound),
        ];
        for &(path, want) in cases {
            let err = read_services_table(Path::new(path)).expect_err(path);
            assert_eq!(err.status(), want, "{path}: {err}");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("read the services file {path}: ")),
                "{text}"
            );
        }
    }

    #[test]
    fn service_from_system_file() {
        // The system file is the one input not under the test's control: a machine
        // without it must report the name as unknown rather than fail otherwise.
        let got = parse_service("ssh", Protocol::Tcp);
        if std::path::Path::new(SERVICES_PATH).exists() {
            assert_eq!(got.ok(), Some(22));
        } else {
            assert_eq!(
                got.map_err(|e| e.status()).err(),
                Some(SocketErrorStatus::ClassTypeNotFound)
            );
        }
    }

    #[test]
    fn resolve_literals_without_resolver() {
        let cases: &[(&str, &str)] = &[
            ("127.0.0.1", "127.0.0.1:80"),
            ("::1", "[::1]:80"),
            ("[::1]", "[::1]:80"),
            ("fe80::1%7", "[fe80::1%7]:80"),
        ];
        for &(input, want) in cases {
            let host = HostName::new(input).expect("valid literal");
            let addrs = resolve_blocking(&host, 80).expect("literal resolves");
            let want: SocketAddr = want.parse().expect("valid socket address");
            assert_eq!(addrs, vec![want], "{input}");
        }
    }

    #[test]
    fn resolve_scope_by_interface_name() {
        let host = HostName::new("fe80::1%lo").expect("valid");
        match resolve_blocking(&host, 1) {
            Ok(addrs) => match addrs.as_slice() {
                [SocketAddr::V6(v6)] => assert_ne!(v6.scope_id(), 0),
                other => panic!("unexpected {other:?}"),
            },
            // A sandbox without a loopback device named "lo" is tolerated.
            Err(err) => assert_eq!(err.status(), SocketErrorStatus::NetworkIsUnreachable),
        }
        let host = HostName::new("fe80::1%nosuchif0").expect("valid");
        let err = resolve_blocking(&host, 1).expect_err("no such interface");
        assert_eq!(err.status(), SocketErrorStatus::NetworkIsUnreachable);
        assert!(err
            .to_string()
            .contains("no network interface named \"nosuchif0\""));
    }

    #[test]
    fn resolve_localhost() {
        let host = HostName::new("localhost").expect("valid");
        let addrs = resolve_blocking(&host, 8080).expect("localhost resolves");
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, 8080));
        assert!(addrs.contains(&v4), "{addrs:?}");
        assert!(addrs
            .iter()
            .all(|a| a.port() == 8080 && a.ip().is_loopback()));
        let mut unique = addrs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), addrs.len(), "duplicates in {addrs:?}");
    }

    #[test]
    fn resolve_reserved_invalid_tld_fails() {
        let host = HostName::new("nonexistent.invalid").expect("valid");
        let err = resolve_blocking(&host, 80).expect_err("must not resolve");
        assert!(
            matches!(
                err.status(),
                SocketErrorStatus::HostNotFound | SocketErrorStatus::NonAuthoritativeHostNotFound
            ),
            "{err}"
        );
        assert!(matches!(err, Error::Resolve { .. }), "{err:?}");
        assert!(err
            .to_string()
            .starts_with("cannot resolve \"nonexistent.invalid\": "));
    }

    #[test]
    fn gai_codes_map_to_status() {
        use SocketErrorStatus as S;
        let cases: &[(libc::c_int, Option<i32>, SocketErrorStatus)] = &[
            (libc::EAI_NONAME, None, S::HostNotFound),
            (libc::EAI_FAIL, None, S::HostNotFound),
            (libc::EAI_AGAIN, None, S::NonAuthoritativeHostNotFound),
            (libc::EAI_NODATA, None, S::NoDataRecordOfRequestedType),
            (libc::EAI_FAMILY, None, S::AddressFamilyNotSupported),
            (libc::EAI_SOCKTYPE, None, S::SocketTypeNotSupported),
            (libc::EAI_SERVICE, None, S::ClassTypeNotFound),
            (libc::EAI_MEMORY, None, S::NoBufferSpace),
            (libc::EAI_BADFLAGS, None, S::InvalidArgument),
            (libc::EAI_SYSTEM, Some(libc::EMFILE), S::TooManyOpenFiles),
            // /etc/hosts unreadable for want of a descriptor: not an unknown name.
            (libc::EAI_NONAME, Some(libc::EMFILE), S::TooManyOpenFiles),
            (libc::EAI_AGAIN, Some(libc::ENFILE), S::TooManyOpenFiles),
            (libc::EAI_NONAME, Some(libc::ENOENT), S::HostNotFound),
            (libc::EAI_SYSTEM, None, S::Unknown),
            (-9999, None, S::Unknown),
        ];
        for &(rc, errno, want) in cases {
            assert_eq!(gai_status(rc, errno), want, "rc {rc}");
            assert!(!gai_message(rc, errno).is_empty(), "rc {rc}");
        }
        assert_eq!(
            gai_message(libc::EAI_NONAME, None),
            "Name or service not known"
        );
        assert!(gai_message(libc::EAI_SYSTEM, Some(libc::EMFILE)).ends_with("(os error 24)"));
    }

    #[test]
    fn odd_inputs_never_panic() {
        let pieces = [
            "", "[", "]", ":", "%", ".", "-", "_", "a", "0", "9", "é", "\0", " ", "::", "1.2",
            "fe80", "ff02", "65536", "/",
        ];
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let input = format!("{a}{b}{c}");
                    if let Ok(host) = HostName::new(&input) {
                        assert_eq!(host.to_string().parse::<HostName>().ok(), Some(host));
                    }
                    let _ = parse_service_with(&input, Protocol::Tcp, || {
                        Ok(SERVICES.as_bytes().to_vec())
                    });
                }
            }
        }
    }

    #[test]
    fn numeric_names_read_as_the_system_resolver_reads_them() {
        extern "C" {
            #[link_name = "inet_aton"]
            fn libc_inet_aton(cp: *const libc::c_char, inp: *mut libc::in_addr) -> libc::c_int;
        }
        let inputs = [
            "0x7f.1",
            "0x7f000001",
            "0X7F.0.0.1",
            "127.1.0x1",
            "0x7f.010.1",
            "0xffffffff",
            "0x100000000",
            "0x1.2.3.4.5",
            "0x100.1",
            "1.2.0x10000",
            "1.2.0xffff",
            "0x7f.09",
            "0x",
            "0x.1",
            "1.0x",
            "0x0",
            "017.0x1",
            "1.2.3.0x4",
            "0xff.0xff.0xff.0xff",
            "0xff.0xff.0xff.0x100",
            "0x00000000000000007f.1",
        ];
        for input in inputs {
            let text = CString::new(input).expect("no NUL");
            let mut addr = libc::in_addr { s_addr: 0 };
            // SAFETY: `text` is NUL-terminated and outlives the call; `addr` is a valid
            // in_addr for inet_aton to write.
            let ok = unsafe { libc_inet_aton(text.as_ptr(), &mut addr) } != 0;
            let system = ok.then(|| Ipv4Addr::from(u32::from_be(addr.s_addr)));
            assert_eq!(inet_aton(input), system, "{input:?}");
            // Whatever the system reads as an address is refused as a name.
            if system.is_some() {
                assert!(HostName::new(input).is_err(), "{input:?} accepted");
            }
        }
    }

    #[test]
    fn empty_guard_drops_safely() {
        drop(AddrInfoList(ptr::null_mut()));
    }
}
