//! What the kernel's io_uring can do, found by trying it: the ring's setup flags, the
//! opcodes ringsock cannot do without, and the optional features ([`Capability`]),
//! which are flags or argument forms that the opcode list cannot show.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::Duration;

use io_uring::{cqueue, opcode, types, IoUring, Probe};

use super::buf_ring::register_incremental;
use crate::driver::caps::{Capabilities, Capability};
use crate::driver::mapping::Mapping;

/// The most submission queue entries a ring may have (IORING_MAX_ENTRIES).
pub(crate) const MAX_RING_ENTRIES: u32 = 32768;
/// The most completion queue entries (IORING_MAX_CQ_ENTRIES).
const MAX_CQ_ENTRIES: u32 = 2 * MAX_RING_ENTRIES;

/// Applies one combination of setup flags to a ring builder.
type SetupFlags = fn(&mut io_uring::Builder);

/// Sets the ring up with the best flags the kernel accepts and `disabled` allows:
/// SINGLE_ISSUER + DEFER_TASKRUN (Linux 6.1), else COOP_TASKRUN (5.19), else none;
/// TASKRUN_FLAG with either where allowed. Returns the ring, the name of its setup and
/// the capabilities that setup gives. Measured on a multishot receiver: DEFER_TASKRUN
/// cut its CPU by about a quarter.
///
/// The completion queue is 8 times the submission queue (multishot operations post many
/// completions per entry), capped at the kernel's limit.
pub(crate) fn build_ring(
    entries: u32,
    disabled: Capabilities,
) -> io::Result<(IoUring, &'static str, Capabilities)> {
    if entries == 0 || entries > MAX_RING_ENTRIES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("ring_entries must be 1 to {MAX_RING_ENTRIES}, not {entries}"),
        ));
    }
    let cq = entries
        .next_power_of_two()
        .saturating_mul(8)
        .min(MAX_CQ_ENTRIES);
    let defer = Capabilities::none().with(Capability::DeferTaskrun);
    let flag = Capabilities::none().with(Capability::TaskrunFlag);
    let both = defer.with(Capability::TaskrunFlag);
    let attempts: [(&str, Capabilities, SetupFlags); 5] = [
        ("single-issuer+defer-taskrun+taskrun-flag", both, |b| {
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag();
        }),
        ("single-issuer+defer-taskrun", defer, |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        }),
        ("coop-taskrun+taskrun-flag", flag, |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }),
        ("coop-taskrun", Capabilities::none(), |b| {
            b.setup_coop_taskrun();
        }),
        ("plain", Capabilities::none(), |_| {}),
    ];
    let mut last = None;
    for (name, gives, flags) in attempts {
        if gives.intersection(disabled) != Capabilities::none() {
            continue;
        }
        let mut builder = IoUring::builder();
        flags(&mut builder);
        match builder.setup_cqsize(cq).build(entries) {
            Ok(ring) => return Ok((ring, name, gives)),
            Err(err) if is_forbidden(&err) => return Err(err),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no io_uring setup was accepted")))
}

/// Errors that no other flag combination will cure: io_uring is absent or forbidden.
fn is_forbidden(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOMEM)
    )
}

/// Fails unless the kernel has every opcode ringsock's io_uring engine cannot do
/// without (Linux 5.11 has them all); `auto` then uses epoll and says which is missing.
pub(crate) fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        (opcode::Accept::CODE, "ACCEPT"),
        (opcode::Connect::CODE, "CONNECT"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::Shutdown::CODE, "SHUTDOWN"),
        (opcode::Read::CODE, "READ"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel lacks IORING_OP_{name}"),
            ));
        }
    }
    Ok(())
}

/// The optional operation features this kernel has, probed once per process by trying
/// each on a small ring of its own; an error when io_uring cannot start at all.
pub(crate) fn kernel_capabilities() -> io::Result<Capabilities> {
    static PROBED: OnceLock<Result<Capabilities, (Option<i32>, String)>> = OnceLock::new();
    PROBED
        .get_or_init(|| probe_by_use().map_err(|err| (err.raw_os_error(), err.to_string())))
        .clone()
        .map_err(|(errno, text)| match errno {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::other(text),
        })
}

/// `user_data` of each probe.
const RECV_MULTI: u64 = 1;
const ACCEPT_MULTI: u64 = 2;
const SEND_TO: u64 = 3;
const CANCEL: u64 = 4;
/// The buffer group of the probe's one-entry ring.
const PROBE_GROUP: u16 = 1;
/// The buffer group of the probe's incrementally consumed ring.
const PROBE_INC_GROUP: u16 = 2;

/// What the probes point the kernel at; leaked, not freed, if the kernel does not give
/// every probe back.
struct ProbeMemory {
    msghdr: libc::msghdr,
    byte: u8,
    dest: libc::sockaddr_un,
    dest_len: libc::socklen_t,
    ring: Mapping,
    inc_ring: Mapping,
    buffer: [u8; 64],
}

fn probe_by_use() -> io::Result<Capabilities> {
    let mut ring = IoUring::new(8)?;
    check_opcodes(&ring)?;
    let mut caps = Capabilities::none();
    let mut memory = Box::new(ProbeMemory {
        // SAFETY: msghdr is plain old data; zero is its empty value.
        msghdr: unsafe { std::mem::zeroed() },
        byte: 0,
        // SAFETY: sockaddr_un is plain old data; zero is its empty value.
        dest: unsafe { std::mem::zeroed() },
        dest_len: 0,
        ring: Mapping::new(16)?,
        inc_ring: Mapping::new(16)?,
        buffer: [0; 64],
    });

    // A one-entry provided buffer ring.
    let buffer_ring = {
        let entry = memory.ring.as_ptr().cast::<u64>();
        // SAFETY: the mapping is a zeroed page; the first `io_uring_buf` is addr (u64),
        // len (u32), bid (u16) and the tail (u16): one buffer published at tail 1.
        unsafe {
            entry.write(memory.buffer.as_ptr() as u64);
            entry.add(1).cast::<u32>().write(memory.buffer.len() as u32);
            entry.add(1).cast::<u16>().add(3).write(1);
        }
        // SAFETY: the mapping is page-aligned and stays alive (in `memory`) until the
        // group is unregistered below, or forever if the probe is leaked.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                memory.ring.as_ptr() as u64,
                1,
                PROBE_GROUP,
                0,
            )
        }
        .is_ok()
    };
    if buffer_ring {
        caps = caps.with(Capability::BufferRing);
        // An empty ring registered with IOU_PBUF_RING_INC and a min_left: kernels before
        // 6.12 refuse the flag, and kernels without min_left refuse the field (EINVAL),
        // and incremental consumption without it would cut datagrams.
        // SAFETY: the mapping is page-aligned and stays alive (in `memory`) until the
        // group is unregistered here, or forever if the probe is leaked.
        let incremental = unsafe {
            register_incremental(
                ring.as_raw_fd(),
                memory.inc_ring.as_ptr() as u64,
                1,
                PROBE_INC_GROUP,
                64,
            )
        };
        if incremental.is_ok() {
            caps = caps.with(Capability::IncrementalBuffers);
            if ring
                .submitter()
                .unregister_buf_ring(PROBE_INC_GROUP)
                .is_err()
            {
                std::mem::forget(memory);
                return Err(io::Error::other("io_uring kept a probe's buffer ring"));
            }
        }
    }

    let datagrams = socket_pair(libc::SOCK_DGRAM)?;
    let listener = unix_listener()?;
    let (sender, receiver_name) = unix_dgram_target(&mut memory)?;
    let mut expected = 0;
    let mut push = |ring: &mut IoUring, entry: io_uring::squeue::Entry| {
        expected += 1;
        // SAFETY: every probe entry points into `memory` or at descriptors that stay
        // open until the probes are reaped (or leaked with `memory`).
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("the probe ring is full"))
    };
    if buffer_ring {
        let recv = opcode::RecvMsgMulti::new(
            types::Fd(datagrams.0.as_raw_fd()),
            &memory.msghdr,
            PROBE_GROUP,
        )
        .build()
        .user_data(RECV_MULTI);
        push(&mut ring, recv)?;
        push(&mut ring, cancel(RECV_MULTI))?;
    }
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
        .build()
        .user_data(ACCEPT_MULTI);
    push(&mut ring, accept)?;
    push(&mut ring, cancel(ACCEPT_MULTI))?;
    let send = opcode::Send::new(types::Fd(sender.as_raw_fd()), &memory.byte, 1)
        .flags(libc::MSG_DONTWAIT)
        .dest_addr((&memory.dest as *const libc::sockaddr_un).cast())
        .dest_addr_len(memory.dest_len)
        .build()
        .user_data(SEND_TO);
    push(&mut ring, send)?;

    let results = match reap(&mut ring, expected) {
        Some(results) => results,
        None => {
            // The kernel kept some probe: its memory and descriptors must outlive it.
            std::mem::forget(memory);
            std::mem::forget((datagrams, listener, sender, receiver_name));
            std::mem::forget(ring);
            return Err(io::Error::other(
                "io_uring did not complete its capability probes",
            ));
        }
    };
    for (user_data, result, flags) in results {
        let supported = result != -libc::EINVAL;
        match user_data {
            // A cancelled multishot ends with ECANCELED; an unknown flag is EINVAL.
            RECV_MULTI if supported => caps = caps.with(Capability::MultishotRecv),
            ACCEPT_MULTI if supported => caps = caps.with(Capability::MultishotAccept),
            // Kernels before 6.0 refuse a SEND with an address with EINVAL.
            SEND_TO if supported => caps = caps.with(Capability::SendTo),
            _ => {}
        }
        if cqueue::more(flags) {
            // A multishot that is still armed cannot happen after its cancel; be safe.
            std::mem::forget(memory);
            return Err(io::Error::other("an io_uring probe stayed armed"));
        }
    }
    if buffer_ring {
        let _ = ring.submitter().unregister_buf_ring(PROBE_GROUP);
    }
    drop(ring);
    drop(memory);
    Ok(caps)
}

fn cancel(user_data: u64) -> io_uring::squeue::Entry {
    opcode::AsyncCancel::new(user_data)
        .build()
        .user_data(CANCEL)
}

/// Submits and collects `expected` completions (user_data, result, flags), waiting a
/// bounded time; `None` if they did not all come.
fn reap(ring: &mut IoUring, expected: usize) -> Option<Vec<(u64, i32, u32)>> {
    let mut results = Vec::with_capacity(expected);
    for _ in 0..50 {
        let ts = types::Timespec::from(Duration::from_millis(20));
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        for cqe in ring.completion() {
            results.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        if results.len() >= expected {
            return Some(results);
        }
    }
    None
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn socket_pair(ty: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array it is given.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    Ok((owned(fds[0]), owned(fds[1])))
}

/// Binds a Unix socket to a fresh abstract name (autobind: only the family is given).
fn autobind(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: sockaddr_un is plain old data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // SAFETY: passes a live sockaddr_un and a length covering only its family.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// A listening Unix stream socket: multishot accept is tried on it, with no network.
fn unix_listener() -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory-safety preconditions.
    let fd = owned(check(unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?);
    autobind(&fd)?;
    // SAFETY: listen has no memory-safety preconditions.
    check(unsafe { libc::listen(fd.as_raw_fd(), 1) })?;
    Ok(fd)
}

/// An unbound Unix datagram sender and a receiver bound to an abstract name, whose
/// address goes into `memory.dest`: a SEND with a destination is tried between them.
fn unix_dgram_target(memory: &mut ProbeMemory) -> io::Result<(OwnedFd, OwnedFd)> {
    let new = || -> io::Result<OwnedFd> {
        // SAFETY: socket has no memory-safety preconditions.
        Ok(owned(check(unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        })?))
    };
    let (sender, receiver) = (new()?, new()?);
    autobind(&receiver)?;
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into the sockaddr_un.
    check(unsafe {
        libc::getsockname(
            receiver.as_raw_fd(),
            (&mut memory.dest as *mut libc::sockaddr_un).cast(),
            &mut len,
        )
    })?;
    memory.dest_len = len;
    Ok((sender, receiver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_entries_out_of_range_are_refused() {
        for bad in [0, MAX_RING_ENTRIES + 1, u32::MAX] {
            match build_ring(bad, Capabilities::none()) {
                Ok(_) => panic!("a ring of {bad} entries was accepted"),
                Err(err) => assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}"),
            }
        }
    }

    #[test]
    fn large_rings_cap_their_completion_queue() {
        // Above 8192 entries, eight completions per entry would pass the kernel's limit.
        match build_ring(MAX_RING_ENTRIES, Capabilities::none()) {
            Ok((ring, _, _)) => assert_eq!(ring.params().cq_entries(), MAX_CQ_ENTRIES),
            Err(err) if is_forbidden(&err) => eprintln!("skipped: io_uring unavailable: {err}"),
            Err(err) => panic!("a ring of {MAX_RING_ENTRIES} entries: {err}"),
        }
    }

    #[test]
    fn disabled_setup_capabilities_are_not_used() {
        let disabled = Capabilities::none()
            .with(Capability::DeferTaskrun)
            .with(Capability::TaskrunFlag);
        match build_ring(64, disabled) {
            Ok((_, name, gives)) => {
                assert_eq!(gives, Capabilities::none());
                assert!(!name.contains("defer") && !name.contains("flag"), "{name}");
            }
            Err(err) if is_forbidden(&err) => eprintln!("skipped: io_uring unavailable: {err}"),
            Err(err) => panic!("{err}"),
        }
    }
}
