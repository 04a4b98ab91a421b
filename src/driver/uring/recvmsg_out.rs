//! What a multishot RECVMSG writes into a provided buffer, read back: the kernel's
//! header (`struct io_uring_recvmsg_out`), the source address, the control data and the
//! payload, delivered as datagrams. Shared by the receiver and its forwarding tap.

use std::io;
use std::rc::Rc;

use io_uring::{cqueue, types};

use super::Completion;
use crate::driver::buf_pool::BufPool;
use crate::driver::cmsg::RecvMeta;
use crate::driver::recv::{deliver, RecvCounters, RecvDatagram};
use crate::driver::sockaddr::addr_from_bytes;

/// `struct io_uring_recvmsg_out`: what the kernel writes before the name.
pub(super) const RECVMSG_OUT: usize = 16;
/// Room for the source address in each buffer (>= sizeof(sockaddr_in6)).
pub(super) const NAME_LEN: usize = 32;

/// `struct msghdr` as the multishot receive reads it: room for the name and the
/// control data (`control_len` bytes).
pub(super) fn template(control_len: usize) -> libc::msghdr {
    // SAFETY: msghdr is plain old data; zero is its empty value.
    let mut msghdr: libc::msghdr = unsafe { std::mem::zeroed() };
    msghdr.msg_namelen = NAME_LEN as libc::socklen_t;
    msghdr.msg_controllen = control_len;
    msghdr
}

/// Delivers the datagram a multishot completion carrying `completion.result` bytes
/// (its header, name, control data and payload) wrote into its buffer, into `out`, and
/// gives the buffer back to the pool if the kernel is done with it.
pub(super) fn take_filled(
    pool: &Rc<BufPool>,
    control_len: usize,
    completion: Completion,
    counters: &mut RecvCounters,
    out: &mut Vec<RecvDatagram>,
) -> io::Result<()> {
    let len = completion.result.max(0) as usize;
    let bid = cqueue::buffer_select(completion.flags)
        .ok_or_else(|| io::Error::other("a multishot receive completed without a buffer"))?;
    // The kernel keeps a buffer it consumes incrementally until too little is left.
    let kept = cqueue::buffer_more(completion.flags);
    let offset = pool.kernel_filled(bid, len, kept)?;
    let delivered = deliver_from(pool, control_len, bid, offset, len, counters, out);
    if !kept {
        pool.kernel_done(bid);
    }
    delivered
}

/// The datagram the kernel wrote at `offset` of buffer `bid` (`len` bytes: its header,
/// name, control data and payload), into `out`.
fn deliver_from(
    pool: &Rc<BufPool>,
    control_len: usize,
    bid: u16,
    offset: usize,
    len: usize,
    counters: &mut RecvCounters,
    out: &mut Vec<RecvDatagram>,
) -> io::Result<()> {
    let base = pool.buffer_ptr(bid);
    // SAFETY: the kernel wrote these `len` bytes (within the buffer: kernel_filled
    // checked) before posting the CQE; the ring's hold keeps the buffer ours, and the
    // kernel writes it again only past them.
    let filled = unsafe { std::slice::from_raw_parts(base.wrapping_add(offset), len) };
    let template = template(control_len);
    let parsed = types::RecvMsgOut::parse(filled, &template)
        .map_err(|()| io::Error::other("malformed multishot receive buffer"))?;
    let addr = addr_from_bytes(parsed.name_data());
    let meta = if control_len > 0 {
        RecvMeta::parse(parsed.control_data())
    } else {
        RecvMeta::default()
    };
    let payload = parsed.payload_data();
    let at = payload.as_ptr() as usize - base as usize;
    let original = (parsed.incoming_payload_len() as usize).max(payload.len());
    // A buffer consumed incrementally may have had room for more than the ring's
    // `capacity`: the datagram is cut where recvmmsg would cut it.
    let keep = payload.len().min(pool.layout().capacity);
    let truncated = original > keep;
    counters.deliveries += 1;
    if parsed.is_control_data_truncated() {
        counters.control_truncated += 1;
    }
    // SAFETY: the ring's hold on `bid` lasts until after this call; the payload lies
    // inside the bytes the kernel wrote.
    unsafe {
        deliver(
            pool, bid, at, keep, original, truncated, addr, meta, counters, out,
        )
    };
    Ok(())
}
