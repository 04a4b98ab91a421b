//! One datagram posted to an address, nobody waiting for it: an IORING_OP_SEND with a
//! destination (Linux 6.0), or a SENDMSG with the address in its header where the kernel
//! lacks that or the send carries control messages. Shared by the socket's posts and its
//! forwarding tap, which posts from inside the driver.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::rc::Rc;

use io_uring::{opcode, types};

use super::{post, Driver, Handle};
use crate::buf::IoBuf;
use crate::driver::caps::Capability;
use crate::driver::cmsg::{SendControl, SendMeta};
use crate::driver::fd::FdRef;
use crate::driver::posted::PostLedger;
use crate::driver::sockaddr::RawAddr;

/// Posts `buf` as one datagram to `addr`, nobody waiting for it: the result goes to
/// `ledger` at the final CQE, and the buffer is dropped there. MSG_DONTWAIT: a full send
/// buffer fails the send at once (a drop in the books) rather than leaving it parked in
/// the kernel, as the epoll engine's direct call does.
pub(crate) fn post_to<B: IoBuf>(
    driver: &Handle,
    fd: &FdRef,
    buf: B,
    addr: SocketAddr,
    ledger: &Rc<PostLedger>,
) -> Result<(), (io::Error, B)> {
    match driver.checked() {
        Ok(mut d) => post_to_in(&mut d, fd, None, buf, addr, ledger),
        Err(err) => Err((err, buf)),
    }
}

/// [`post_to`] with the driver in hand (for its own work: a receive's forwarding tap),
/// through `fd`'s slot in the ring's file table where it has one.
pub(super) fn post_to_in<B: IoBuf>(
    d: &mut Driver,
    fd: &FdRef,
    registered: Option<u32>,
    buf: B,
    addr: SocketAddr,
    ledger: &Rc<PostLedger>,
) -> Result<(), (io::Error, B)> {
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
    if d.capabilities().contains(Capability::SendTo) {
        let file = SendFile::of(fd, registered);
        let data = (fd.clone(), buf, RawAddr::from_socket_addr(addr));
        // SAFETY: the SQE points into the buffer (stable memory, IoBuf's contract) and
        // the address, both in the slot's box until the final CQE; the slot it may name
        // holds `fd`'s file until the entry is submitted (fixed_files' rule).
        unsafe {
            post(d, data, ledger, |(_, buf, addr)| {
                let len = buf.bytes_init().min(u32::MAX as usize) as u32;
                file.send(buf.stable_ptr(), len)
                    .flags(flags)
                    .dest_addr(addr.as_ptr())
                    .dest_addr_len(addr.len)
                    .build()
            })
        }
        .map_err(|(err, (_, buf, _))| (err, buf))
    } else {
        let data = SendMsgTo::new(fd, buf, Some(addr), &SendMeta::default());
        // SAFETY: the header points at the iovec and address in the boxed data, and the
        // iovec at the buffer's stable memory; the slot owns all of it.
        unsafe { post(d, data, ledger, |data| data.entry(flags)) }
            .map_err(|(err, data)| (err, data.buf))
    }
}

/// The file a send names: the socket's slot in the ring's file table where it has one
/// (no descriptor lookup and reference count per send), else its descriptor.
#[derive(Debug, Clone, Copy)]
pub(super) enum SendFile {
    Descriptor(RawFd),
    Registered(u32),
}

impl SendFile {
    pub(super) fn of(fd: &FdRef, registered: Option<u32>) -> SendFile {
        match registered {
            Some(slot) => SendFile::Registered(slot),
            None => SendFile::Descriptor(fd.raw()),
        }
    }

    fn send(self, buf: *const u8, len: u32) -> opcode::Send {
        match self {
            SendFile::Descriptor(fd) => opcode::Send::new(types::Fd(fd), buf, len),
            SendFile::Registered(slot) => opcode::Send::new(types::Fixed(slot), buf, len),
        }
    }

    pub(super) fn send_msg(self, header: *const libc::msghdr) -> opcode::SendMsg {
        match self {
            SendFile::Descriptor(fd) => opcode::SendMsg::new(types::Fd(fd), header),
            SendFile::Registered(slot) => opcode::SendMsg::new(types::Fixed(slot), header),
        }
    }
}

/// The data of a SENDMSG of one datagram to an address: the header points at the iovec,
/// the address and the control data beside it, which stay put in the op's box.
pub(super) struct SendMsgTo<B> {
    fd: FdRef,
    pub(super) buf: B,
    addr: Option<RawAddr>,
    control: SendControl,
    iovec: libc::iovec,
    header: libc::msghdr,
}

impl<B: IoBuf> SendMsgTo<B> {
    pub(super) fn new(
        fd: &FdRef,
        buf: B,
        addr: Option<SocketAddr>,
        meta: &SendMeta,
    ) -> SendMsgTo<B> {
        SendMsgTo {
            fd: fd.clone(),
            buf,
            addr: addr.map(RawAddr::from_socket_addr),
            control: SendControl::new(meta, None),
            // SAFETY: iovec is plain old data; zero is its empty value.
            iovec: unsafe { std::mem::zeroed() },
            // SAFETY: msghdr is plain old data; zero is its empty value.
            header: unsafe { std::mem::zeroed() },
        }
    }

    /// The SENDMSG entry, its header pointing at the iovec, address and control data of
    /// `self`, which must not move until the final CQE (it is boxed in the op's slot).
    pub(super) fn entry(&mut self, flags: i32) -> io_uring::squeue::Entry {
        self.iovec = libc::iovec {
            iov_base: self.buf.stable_ptr() as *mut libc::c_void,
            iov_len: self.buf.bytes_init(),
        };
        self.header.msg_iov = &mut self.iovec;
        self.header.msg_iovlen = 1;
        if let Some(addr) = self.addr.as_mut() {
            self.header.msg_name = addr.as_mut_ptr().cast();
            self.header.msg_namelen = addr.len;
        }
        self.header.msg_control = self.control.as_ptr();
        self.header.msg_controllen = self.control.len();
        opcode::SendMsg::new(types::Fd(self.fd.raw()), &self.header)
            .flags(flags as u32)
            .build()
    }
}
