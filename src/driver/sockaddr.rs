//! Socket addresses in the kernel's layout, owned so an operation can lend them to io_uring.
#![allow(unsafe_code)]

use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// A `sockaddr_storage` with its used length.
#[derive(Clone, Copy)]
pub(crate) struct RawAddr {
    pub(crate) storage: libc::sockaddr_storage,
    pub(crate) len: libc::socklen_t,
}

impl RawAddr {
    /// Zeroed storage for the kernel to fill (accept, recvmsg).
    pub(crate) fn empty() -> RawAddr {
        RawAddr {
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            storage: unsafe { mem::zeroed() },
            len: mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    pub(crate) fn from_socket_addr(addr: SocketAddr) -> RawAddr {
        let mut raw = RawAddr::empty();
        match addr {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned
                // for it; the write stays inside `storage`.
                unsafe { (&mut raw.storage as *mut _ as *mut libc::sockaddr_in).write(sin) };
                raw.len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably
                // aligned for it; the write stays inside `storage`.
                unsafe { (&mut raw.storage as *mut _ as *mut libc::sockaddr_in6).write(sin6) };
                raw.len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        raw
    }

    pub(crate) fn as_ptr(&self) -> *const libc::sockaddr {
        &self.storage as *const _ as *const libc::sockaddr
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut libc::sockaddr {
        &mut self.storage as *mut _ as *mut libc::sockaddr
    }

    /// The address the kernel wrote, if it is IPv4 or IPv6.
    pub(crate) fn to_socket_addr(self) -> Option<SocketAddr> {
        match self.storage.ss_family as libc::c_int {
            libc::AF_INET if self.len as usize >= mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says the storage holds a sockaddr_in, and the length
                // the kernel reported covers it.
                let sin = unsafe { &*(self.as_ptr() as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip,
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if self.len as usize >= mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: the family says the storage holds a sockaddr_in6, and the length
                // the kernel reported covers it.
                let sin6 = unsafe { &*(self.as_ptr() as *const libc::sockaddr_in6) };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// The socket address in `name` (a `sockaddr_in` or `sockaddr_in6` as the kernel wrote
/// it), with IPv4-mapped IPv6 addresses shown as IPv4.
// Inlined into the receive loops: the call itself cost as much as the IPv4 fast path
// (callgrind).
#[inline]
pub(crate) fn addr_from_bytes(name: &[u8]) -> Option<SocketAddr> {
    // The common case, read in place: every received datagram goes through here, and
    // the general path zeroes and copies a 128-byte sockaddr_storage first.
    // sockaddr_in: family (native order), port and address (network order).
    if let [f0, f1, p0, p1, a, b, c, d, ..] = *name {
        if i32::from(u16::from_ne_bytes([f0, f1])) == libc::AF_INET {
            let ip = Ipv4Addr::new(a, b, c, d);
            return Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be_bytes([p0, p1]),
            )));
        }
    }
    let mut raw = RawAddr::empty();
    let len = name
        .len()
        .min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: copies at most size_of(sockaddr_storage) bytes into the storage.
    unsafe {
        std::ptr::copy_nonoverlapping(
            name.as_ptr(),
            (&mut raw.storage as *mut libc::sockaddr_storage).cast::<u8>(),
            len,
        )
    };
    raw.len = len as libc::socklen_t;
    raw.to_socket_addr().map(canonical)
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports) as IPv4.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// `addr` as the socket's family needs it: IPv4 becomes IPv4-mapped on an IPv6 socket,
/// and IPv4-mapped IPv6 becomes IPv4 on an IPv4 socket (which refuses any IPv6 address).
pub(crate) fn for_family(addr: SocketAddr, ipv6_socket: bool) -> SocketAddr {
    match (addr, ipv6_socket) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        (addr, false) => canonical(addr),
        (addr, true) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_v4_and_v6() {
        for text in ["127.0.0.1:9", "[::1]:65535", "[fe80::1%2]:80", "0.0.0.0:0"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(RawAddr::from_socket_addr(addr).to_socket_addr(), Some(addr));
        }
    }

    #[test]
    fn empty_storage_is_no_address() {
        assert_eq!(RawAddr::empty().to_socket_addr(), None);
    }

    #[test]
    fn addresses_parse_and_mapped_ones_become_v4() {
        let v4: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let raw = RawAddr::from_socket_addr(v4);
        // SAFETY: the storage holds `len` initialised bytes of address.
        let bytes =
            unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len as usize) };
        assert_eq!(addr_from_bytes(bytes), Some(v4));
        let v6: SocketAddr = "[2001:db8::7]:443".parse().unwrap();
        let raw = RawAddr::from_socket_addr(v6);
        // SAFETY: the storage holds `len` initialised bytes of address.
        let bytes =
            unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len as usize) };
        assert_eq!(addr_from_bytes(bytes), Some(v6));
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        let raw = RawAddr::from_socket_addr(mapped);
        // SAFETY: as above.
        let bytes =
            unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), raw.len as usize) };
        assert_eq!(addr_from_bytes(bytes), Some(v4));
        assert_eq!(addr_from_bytes(&[]), None);
        let mapped = for_family(v4, true);
        assert!(mapped.is_ipv6());
        assert_eq!(canonical(mapped), v4);
        assert_eq!(for_family(v4, false), v4);
        assert_eq!(for_family(mapped, false), v4);
    }
}
