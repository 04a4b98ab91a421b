//! The TUN device's system interface: opening `/dev/net/tun`, TUNSETIFF, the offload
//! ioctls, and the interface ioctls (MTU, up/down) on a helper socket. Imports no engine.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The kernel's interface name limit, the terminating NUL included.
pub(crate) const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// The virtio-net header the kernel puts before every packet read (and expects before
/// every packet written) once IFF_VNET_HDR is on: 10 bytes, little-endian on x86.
pub(crate) const VNET_HDR_LEN: usize = 10;

/// How a TUN queue is opened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueFlags {
    pub(crate) vnet_hdr: bool,
    pub(crate) multi_queue: bool,
    /// Reads and writes block (for code outside any runtime).
    pub(crate) blocking: bool,
}

/// An `ifreq` with the name set; the union is written by the caller.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    // The kernel's own rule (dev_valid_name), so a bad name gets this message rather
    // than TUNSETIFF's bare EINVAL.
    let bad_byte = |b: &u8| matches!(b, 0 | b'/' | b':' | b'\x0b') || b.is_ascii_whitespace();
    if bytes.is_empty()
        || bytes.len() >= IFNAMSIZ
        || name == "."
        || name == ".."
        || bytes.iter().any(bad_byte)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "interface name {name:?}: 1 to 15 bytes, not . or .., \
                 no '/', ':', whitespace or NUL"
            ),
        ));
    }
    // The kernel keeps these for the per-interface sysctl directories
    // (net/ipv4/conf/all, .../default) and refuses an interface so named with EINVAL.
    if name == "all" || name == "default" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "interface name {name:?}: reserved by the kernel (its sysctl directories \
                 for every interface and for new ones)"
            ),
        ));
    }
    // A template: one %d the kernel fills in, and no other % (its __dev_alloc_name).
    if let Some(at) = name.find('%') {
        if !name[at..].starts_with("%d") || name[at + 2..].contains('%') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "interface name {name:?}: a template holds one %d (the number the \
                     kernel picks) and no other %"
                ),
            ));
        }
    }
    // SAFETY: ifreq is plain old data; zero is its empty value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in req.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    Ok(req)
}

/// Whether the kernel takes `name` for an interface (else the error saying what a name
/// may hold).
pub(crate) fn check_name(name: &str) -> io::Result<()> {
    ifreq(name).map(drop)
}

/// The name the kernel gave the interface (it may fill in a `%d` template).
fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether an interface of this name exists (in this thread's network namespace).
pub(crate) fn interface_exists(name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// Opens one queue of the TUN interface `name` (IFF_TUN | IFF_NO_PI), creating the
/// interface if it does not exist; close-on-exec, non-blocking unless asked. Returns the descriptor
/// and the interface's name as the kernel has it.
pub(crate) fn open_queue(name: &str, flags: QueueFlags) -> io::Result<(OwnedFd, String)> {
    let nonblocking = if flags.blocking { 0 } else { libc::O_NONBLOCK };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nonblocking | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let fd: OwnedFd = file.into();
    let mut req = ifreq(name)?;
    let mut ifr_flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if flags.vnet_hdr {
        ifr_flags |= libc::IFF_VNET_HDR;
    }
    if flags.multi_queue {
        ifr_flags |= libc::IFF_MULTI_QUEUE;
    }
    req.ifr_ifru.ifru_flags = ifr_flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which outlives the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) }).map_err(|err| {
        match err.raw_os_error() {
            Some(libc::EINVAL) if interface_exists(name) => why_not_attached(name, flags),
            _ => err,
        }
    })?;
    if flags.vnet_hdr {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int that outlives the call.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) })?;
    }
    Ok((fd, name_of(&req)))
}

/// Why TUNSETIFF refused (EINVAL) to attach a queue to the existing interface `name`:
/// the kernel says only "Invalid argument" whether it is no TUN at all, a TAP, or a TUN
/// made with the other multi-queue setting.
fn why_not_attached(name: &str, flags: QueueFlags) -> io::Error {
    let why = match driver(name).as_deref() {
        Ok("tun") if hardware_type(name).is_ok_and(|t| t != libc::ARPHRD_NONE) => {
            format!("{name} is a TAP interface, not TUN")
        }
        Ok("tun") => format!(
            "{name} is a TUN interface made {} multi_queue, and a queue must be opened as \
             the interface was made",
            if flags.multi_queue { "without" } else { "with" }
        ),
        Ok(other) => format!("{name} is not a TUN interface (its driver is {other})"),
        Err(_) => format!("{name} is not a TUN interface"),
    };
    io::Error::new(io::ErrorKind::InvalidInput, why)
}

/// The name of the interface's driver (ETHTOOL_GDRVINFO), such as "tun" or "veth".
fn driver(name: &str) -> io::Result<String> {
    /// `struct ethtool_drvinfo` (linux/ethtool.h), which libc does not define.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        counts: [u32; 5],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    let sock = control_socket()?;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        counts: [0; 5],
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO writes at most one ethtool_drvinfo to
    // the address in the ifreq; `info` is one, and both outlive the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) })?;
    let len = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// The interface's hardware type (SIOCGIFHWADDR): ARPHRD_NONE for a TUN, ARPHRD_ETHER
/// for a TAP.
fn hardware_type(name: &str) -> io::Result<u16> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFHWADDR writes into the ifreq, which outlives the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) })?;
    // SAFETY: SIOCGIFHWADDR filled the union's hardware address member.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr }.sa_family)
}

/// Declares which offloaded packets our reader accepts (TUNSETOFFLOAD with TUN_F_*);
/// the kernel refuses flags it does not know with EINVAL.
pub(crate) fn set_offload(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    check(unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) })
}

/// A datagram socket for the interface ioctls, which need some socket in the namespace.
fn control_socket() -> io::Result<OwnedFd> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    Ok(socket.into())
}

/// Sets the interface's MTU (SIOCSIFMTU).
pub(crate) fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    // SAFETY: SIOCSIFMTU reads the ifreq, which outlives the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req) })
}

/// The interface's MTU (SIOCGIFMTU).
pub(crate) fn mtu(name: &str) -> io::Result<u32> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFMTU writes into the ifreq, which outlives the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut req) })?;
    // SAFETY: SIOCGIFMTU filled the union's mtu member.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Brings the interface up or down (IFF_UP through SIOCGIFFLAGS / SIOCSIFFLAGS).
pub(crate) fn set_up(name: &str, up: bool) -> io::Result<()> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS writes into the ifreq, which outlives the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags member.
    let mut flags = unsafe { req.ifr_ifru.ifru_flags };
    if up {
        flags |= libc::IFF_UP as libc::c_short;
    } else {
        flags &= !(libc::IFF_UP as libc::c_short);
    }
    req.ifr_ifru.ifru_flags = flags;
    // SAFETY: SIOCSIFFLAGS reads the ifreq, which outlives the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) })
}

/// Whether the interface is up.
pub(crate) fn is_up(name: &str) -> io::Result<bool> {
    let sock = control_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS writes into the ifreq, which outlives the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags member.
    Ok(unsafe { req.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short != 0)
}
