//! Datagram operations on the epoll engine: `recvmmsg` into the receive pool's buffers,
//! `sendto`, and `sendmmsg` batches (GSO runs as one message each).
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;

use super::{clear_ready, count_io_call, poll_ready, retry, Direction};
use crate::buf::IoBuf;
use crate::driver::buf_pool::{BufPool, Refill};
use crate::driver::ops::{BatchReport, Progress};
use crate::driver::ops_datagram::{
    addr_from_bytes, deliver, gro_segment, gso_refused, plan_links, MmsgBatch, RecvCounters,
    RecvDatagram, RingConfig,
};
use crate::driver::sockaddr::RawAddr;
use crate::driver::SharedFd;

/// Most datagrams one `recvmmsg` takes.
const RECV_SLOTS: usize = 64;
/// Most messages one `sendmmsg` takes (UIO_MAXIOV).
const SEND_SLOTS: usize = 1024;
/// Control room per receive slot for a UDP_GRO message.
const GRO_WORDS: usize = 4;

fn check(result: isize) -> io::Result<usize> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result as usize)
    }
}

/// A socket's receive ring on epoll: the same pool of lent buffers as on io_uring,
/// filled by `recvmmsg` up to 64 at a time.
pub(crate) struct Receiver {
    pub(crate) pool: Rc<BufPool>,
    names: Vec<libc::sockaddr_storage>,
    controls: Vec<[u64; GRO_WORDS]>,
    gro: bool,
    starved: bool,
    pub(crate) counters: RecvCounters,
}

impl Receiver {
    pub(crate) fn new(config: RingConfig) -> io::Result<Receiver> {
        let stride = config.buffer_size.max(1).next_multiple_of(64);
        let pool = BufPool::new(
            config.buffers,
            stride,
            Refill::Local(RefCell::new(Vec::new())),
        )?;
        Ok(Receiver {
            pool: Rc::new(pool),
            // SAFETY: sockaddr_storage is plain old data; zero is a valid value.
            names: vec![unsafe { std::mem::zeroed() }; RECV_SLOTS],
            controls: vec![[0; GRO_WORDS]; if config.gro { RECV_SLOTS } else { 0 }],
            gro: config.gro,
            starved: false,
            counters: RecvCounters::default(),
        })
    }

    pub(crate) fn poll_recv(
        &mut self,
        fd: &SharedFd,
        cx: &mut Context<'_>,
        out: &mut Vec<RecvDatagram>,
        max: usize,
    ) -> Poll<io::Result<()>> {
        let start = out.len();
        loop {
            let got = out.len() > start;
            match poll_ready(fd, Direction::Read, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(if got { Ok(()) } else { Err(err) }),
                Poll::Pending => {
                    return if got {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    }
                }
            }
            let want = RECV_SLOTS.min(max.saturating_sub(out.len() - start)).max(1);
            let mut bids = Vec::with_capacity(want);
            while bids.len() < want {
                match self.pool.pop_local() {
                    Some(bid) => bids.push(bid),
                    None => break,
                }
            }
            if bids.is_empty() {
                // Every buffer is lent: datagrams wait in the socket's queue meanwhile.
                if !self.starved {
                    self.counters.ring_empty += 1;
                    self.starved = true;
                }
                self.pool.wait_for_buffer(cx.waker());
                return if got {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            self.starved = false;
            let stride = self.pool.stride();
            let mut iovecs: Vec<libc::iovec> = bids
                .iter()
                .map(|&bid| libc::iovec {
                    iov_base: self.pool.buffer_ptr(bid).cast(),
                    iov_len: stride,
                })
                .collect();
            // SAFETY: mmsghdr is plain old data; zero is its empty value.
            let mut headers: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; bids.len()];
            for (j, header) in headers.iter_mut().enumerate() {
                let msg = &mut header.msg_hdr;
                msg.msg_name = (&mut self.names[j] as *mut libc::sockaddr_storage).cast();
                msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                msg.msg_iov = &mut iovecs[j];
                msg.msg_iovlen = 1;
                if self.gro {
                    msg.msg_control = self.controls[j].as_mut_ptr().cast();
                    msg.msg_controllen = std::mem::size_of::<[u64; GRO_WORDS]>();
                }
            }
            count_io_call();
            // SAFETY: every header points to a live name slot, a control slot and an iovec
            // over a claimed pool buffer of `stride` bytes, all alive across the call.
            // MSG_TRUNC makes msg_len the datagram's real length.
            let received = unsafe {
                libc::recvmmsg(
                    fd.raw(),
                    headers.as_mut_ptr(),
                    headers.len() as libc::c_uint,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    std::ptr::null_mut(),
                )
            };
            let received = match check(received as isize) {
                Ok(n) => n,
                Err(err) => {
                    bids.iter().for_each(|&bid| self.pool.release(bid));
                    match err.kind() {
                        io::ErrorKind::WouldBlock => clear_ready(fd, Direction::Read),
                        io::ErrorKind::Interrupted => {}
                        _ => return Poll::Ready(if got { Ok(()) } else { Err(err) }),
                    }
                    continue;
                }
            };
            for (j, &bid) in bids.iter().enumerate() {
                if j >= received {
                    self.pool.release(bid);
                    continue;
                }
                let header = &headers[j];
                let real = header.msg_len as usize;
                let truncated = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || real > stride;
                let name_len = (header.msg_hdr.msg_namelen as usize)
                    .min(std::mem::size_of::<libc::sockaddr_storage>());
                // SAFETY: the kernel wrote `name_len` bytes of address into slot j.
                let name = unsafe {
                    std::slice::from_raw_parts(
                        (&self.names[j] as *const libc::sockaddr_storage).cast::<u8>(),
                        name_len,
                    )
                };
                let gro = if self.gro {
                    let control_len = header
                        .msg_hdr
                        .msg_controllen
                        .min(std::mem::size_of::<[u64; GRO_WORDS]>());
                    // SAFETY: the kernel wrote `control_len` bytes of control data.
                    let control = unsafe {
                        std::slice::from_raw_parts(
                            self.controls[j].as_ptr().cast::<u8>(),
                            control_len,
                        )
                    };
                    gro_segment(control)
                } else {
                    None
                };
                // SAFETY: `bid` is claimed (pop_local) and its hold handed over; the kernel
                // wrote min(real, stride) bytes at its start.
                unsafe {
                    deliver(
                        &self.pool,
                        bid,
                        0,
                        real.min(stride),
                        real,
                        truncated,
                        addr_from_bytes(name),
                        gro,
                        &mut self.counters,
                        out,
                    )
                };
            }
            if received < bids.len() {
                // The queue is empty now; a datagram arriving later raises a new edge,
                // which the next epoll_wait reports.
                clear_ready(fd, Direction::Read);
            }
            if out.len() > start {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// One datagram to `addr`, or to the connected peer (`sendto`).
pub(crate) async fn send_to<B: IoBuf>(
    fd: &SharedFd,
    buf: B,
    addr: Option<SocketAddr>,
) -> (io::Result<usize>, B) {
    let raw = addr.map(RawAddr::from_socket_addr);
    let result = retry(fd, Direction::Write, || {
        let (name, name_len) = match &raw {
            Some(raw) => (raw.as_ptr(), raw.len),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: reads `bytes_init` initialised bytes of a live buffer and, when given,
        // a valid sockaddr of `name_len` bytes.
        let n = unsafe {
            libc::sendto(
                fd.raw(),
                buf.stable_ptr().cast(),
                buf.bytes_init(),
                libc::MSG_NOSIGNAL,
                name,
                name_len,
            )
        };
        check(n)
    })
    .await;
    (result, buf)
}

/// See [`crate::driver::ops_datagram::send_batch`]: `sendmmsg` calls of up to 1024
/// messages, each a datagram or a GSO run.
pub(crate) async fn send_batch(
    fd: &SharedFd,
    bufs: Vec<Bytes>,
    dest: Option<SocketAddr>,
    gso: &Cell<bool>,
    report: &mut BatchReport,
) -> (io::Result<()>, Progress, Vec<Bytes>) {
    let mut progress = Progress::default();
    let mut rounds = 0u64;
    'plan: while progress.first < bufs.len() {
        if rounds > 0 {
            report.short_send_recoveries += 1;
        }
        rounds += 1;
        let links = plan_links(&bufs, progress.first, gso.get(), SEND_SLOTS);
        let mut batch = MmsgBatch::new(&bufs, &links, dest);
        let mut at = 0;
        while at < batch.len() {
            let result = retry(fd, Direction::Write, || batch.send(fd, at)).await;
            report.operations += 1;
            match result {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), progress, bufs),
                Ok(sent) => {
                    let sent = sent.min(links.len() - at);
                    let last = links[at + sent - 1];
                    progress.first = last.first + last.count;
                    at += sent;
                }
                Err(err) if links[at].segment.is_some() && gso_refused(&err) => {
                    gso.set(false);
                    continue 'plan;
                }
                Err(err) => return (Err(err), progress, bufs),
            }
        }
        drop(batch);
    }
    (Ok(()), progress, bufs)
}
