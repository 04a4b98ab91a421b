//! Socket options the engines and the socket API set or read directly.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

/// Turns SO_TXTIME on (CLOCK_MONOTONIC, no error reports): the kernel then takes an
/// SCM_TXTIME transmit time with each datagram, which an fq or etf qdisc honours and
/// any other qdisc ignores. The kernel has no way to turn it off again; without the
/// control message it changes nothing.
pub(crate) fn enable_txtime(fd: RawFd) -> io::Result<()> {
    let config = libc::sock_txtime {
        clockid: libc::CLOCK_MONOTONIC,
        flags: 0,
    };
    // SAFETY: passes a pointer to a live sock_txtime and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            super::cmsg::SO_TXTIME,
            (&config as *const libc::sock_txtime).cast(),
            std::mem::size_of::<libc::sock_txtime>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets an integer socket option.
pub(crate) fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads an integer socket option.
pub(crate) fn int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, a live c_int of that size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// `IPV6_MULTICAST_ALL` (Linux 4.20; in `linux/in6.h`, not in the libc crate for glibc).
const IPV6_MULTICAST_ALL: libc::c_int = 29;

/// Makes a datagram socket receive only the multicast groups it joined itself. Linux's
/// default (IP_MULTICAST_ALL, IPV6_MULTICAST_ALL on) gives a socket bound to a group's
/// port the traffic of every group any socket of the host joined, and a group left goes
/// on arriving while another socket is in it. On an IPv6 socket both are set (a
/// dual-stack socket receives IPv4 groups too); a kernel without the option keeps its
/// default.
pub(crate) fn receive_joined_groups_only(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let unsupported = |err: &io::Error| err.raw_os_error() == Some(libc::ENOPROTOOPT);
    let v4 = set_int_option(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_ALL, 0);
    if !ipv6 {
        return v4.or_else(|err| if unsupported(&err) { Ok(()) } else { Err(err) });
    }
    match set_int_option(fd, libc::IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0) {
        Err(err) if !unsupported(&err) => Err(err),
        _ => Ok(()),
    }
}

/// `SO_MEMINFO` (Linux 3.9): the socket's memory counters.
const SO_MEMINFO: libc::c_int = 55;
/// Index of the drop counter in `SO_MEMINFO`'s array.
const SK_MEMINFO_DROPS: usize = 8;
/// Entries of `SO_MEMINFO`'s array (`SK_MEMINFO_VARS`).
const SK_MEMINFO_VARS: usize = 9;

/// Datagrams the kernel dropped on this socket, mostly because its receive queue was
/// full (`SO_MEMINFO`, SK_MEMINFO_DROPS).
pub(crate) fn socket_drops(fd: RawFd) -> io::Result<u64> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a live array of that size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < (SK_MEMINFO_DROPS + 1) * 4 {
        return Err(io::Error::other("SO_MEMINFO without a drop counter"));
    }
    Ok(info[SK_MEMINFO_DROPS] as u64)
}

/// `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// Where a classic BPF program reads the CPU that runs it (SKF_AD_OFF + SKF_AD_CPU).
const SKF_AD_CPU: u32 = (-0x1000i32 + 36) as u32;

/// Routes each new connection (or datagram) of the SO_REUSEPORT group `fd` belongs to,
/// to the group member whose index is the position of the receiving CPU in `cpus`, so
/// a connection stays on the CPU (and the pinned thread) that received it; other CPUs
/// go by CPU number modulo the group's size. A classic BPF program, attached once to
/// any member, serves the whole group.
pub(crate) fn route_reuseport_by_cpu(fd: RawFd, cpus: &[usize]) -> io::Result<()> {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const MOD_K: u16 = 0x94;
    const RET_A: u16 = 0x16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    if cpus.is_empty() || cpus.len() > 255 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CPU routing takes 1 to 255 group members",
        ));
    }
    let mut program = vec![op(LD_W_ABS, 0, 0, SKF_AD_CPU)];
    for (index, &cpu) in cpus.iter().enumerate() {
        // On a match fall through to the return; else jump over it.
        program.push(op(JEQ_K, 0, 1, cpu as u32));
        program.push(op(RET_K, 0, 0, index as u32));
    }
    program.push(op(MOD_K, 0, 0, cpus.len() as u32));
    program.push(op(RET_A, 0, 0, 0));
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: passes a live sock_fprog whose filter points at `program`, alive for the
    // call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TCP_LISTEN` of the kernel's tcp_states.h (libc does not export it for Linux).
const TCP_STATE_LISTEN: u8 = 10;

/// Connections waiting in a listening TCP socket's accept queue: TCP_INFO's
/// `tcpi_unacked`, which the kernel fills with the accept queue's length for a socket
/// in the LISTEN state.
pub(crate) fn listen_queue_len(fd: RawFd) -> io::Result<u32> {
    // SAFETY: tcp_info is plain old data; zero is a valid value of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a live struct of that
    // size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_unacked) + 4;
    if (len as usize) < needed {
        return Err(io::Error::other("TCP_INFO without tcpi_unacked"));
    }
    if info.tcpi_state != TCP_STATE_LISTEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening socket",
        ));
    }
    Ok(info.tcpi_unacked)
}

/// Resets a TCP connection now (`connect` to `AF_UNSPEC`: the kernel's disconnect),
/// whoever else holds the descriptor: RST to the peer, the send queue dropped, calls
/// in flight woken with `ECONNRESET`. A close with a zero linger does the same, but only
/// once the last copy of the descriptor closes.
pub(crate) fn reset_connection(fd: RawFd) -> io::Result<()> {
    // SAFETY: sockaddr is plain data, valid zeroed; only its family is read for
    // AF_UNSPEC.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    let len = std::mem::size_of::<libc::sockaddr>() as libc::socklen_t;
    // SAFETY: connect reads `len` bytes of the live local `addr`; `fd` is the caller's.
    let rc = unsafe { libc::connect(fd, &addr, len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes of a TCP socket's send queue the peer has not acknowledged yet, sent or not
/// (`SIOCOUTQ`; a FIN counts as one until it is acknowledged). 0 means everything
/// written, and the FIN if one was sent, has reached the peer.
pub(crate) fn unacknowledged_bytes(fd: RawFd) -> io::Result<usize> {
    let mut bytes: libc::c_int = 0;
    // SIOCOUTQ has TIOCOUTQ's number; libc names only the latter.
    // SAFETY: SIOCOUTQ writes one c_int into the live local it is given.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut bytes) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes.max(0) as usize)
}
