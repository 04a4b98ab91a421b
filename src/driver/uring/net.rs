//! Socket operations as io_uring SQEs.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use io_uring::{opcode, types};

use super::{ChainOp, Completion, Handle, MultiOp, Op};
use crate::buf::{IoBuf, IoBufMut};
use crate::driver::dropped_read::DroppedRead;
use crate::driver::fd::FdRef;
use crate::driver::iovec::{iovecs_into, IOV_MAX};
use crate::driver::sockaddr::RawAddr;

/// Multishot accept (Linux 5.19): one SQE, a completion per connection. Results are new
/// descriptors; those nobody takes are closed by the driver. The driver pauses it once
/// `queue_limit` connections wait untaken.
pub(crate) fn accept_multi(driver: &Handle, fd: &FdRef, queue_limit: usize) -> io::Result<MultiOp> {
    // SAFETY: the SQE points to no memory but the descriptor, which the op's FdRef keeps
    // open.
    unsafe {
        MultiOp::submit(driver, fd.clone(), true, Some(queue_limit), |fd| {
            opcode::AcceptMulti::new(types::Fd(fd.raw()))
                .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
                .build()
        })
    }
}

/// One ACCEPT (where multishot accept is missing); its completion is the next
/// connection's socket (see [`accepted`]).
pub(crate) fn accept_op(driver: &Handle, fd: &FdRef) -> io::Result<Op<FdRef>> {
    // SAFETY: the SQE points to no memory but the descriptor, which the op's FdRef keeps
    // open; no address is asked for.
    let op = unsafe {
        Op::submit(driver, fd.clone(), |fd| {
            opcode::Accept::new(
                types::Fd(fd.raw()),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
        })
    };
    op.map(Op::closing_result).map_err(|(err, _)| err)
}

/// The socket an accept completion carries.
pub(crate) fn accepted(completion: Completion) -> io::Result<OwnedFd> {
    let fd = completion.into_result()?;
    // SAFETY: a successful accept result is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub(crate) async fn connect(driver: &Handle, fd: &FdRef, addr: SocketAddr) -> io::Result<()> {
    let data = (fd.clone(), RawAddr::from_socket_addr(addr));
    // SAFETY: the SQE points into the boxed address, owned by the op.
    let op = unsafe {
        Op::submit(driver, data, |(fd, addr)| {
            opcode::Connect::new(types::Fd(fd.raw()), addr.as_ptr(), addr.len).build()
        })
    };
    let (completion, _) = op.map_err(|(err, _)| err)?.await;
    completion?.into_result().map(drop)
}

/// Receives once into the spare capacity of `buf`. When `stop` gives an error before
/// the kernel has answered, the receive is cancelled and its final completion awaited:
/// bytes it received before the cancel reached it come back as usual, else `stop`'s
/// error does. Either way the buffer comes back. Dropped while in flight, the receive is
/// cancelled and handed to `keep`: what it took before the cancel reached it (the
/// kernel may run it first, in the same submission) goes to the socket's next receive.
pub(crate) async fn recv<B: IoBufMut>(
    driver: &Handle,
    fd: &FdRef,
    buf: B,
    mut stop: impl FnMut(&mut Context<'_>) -> Option<io::Error>,
    keep: &dyn Fn(Box<dyn DroppedRead>),
) -> (io::Result<usize>, B) {
    let init = buf.bytes_init();
    // SAFETY: the SQE points into the buffer's spare capacity; the buffer is owned by the
    // op and its heap memory does not move (IoBufMut's contract).
    let op = unsafe {
        Op::submit(driver, (fd.clone(), buf), |(fd, buf)| {
            let spare = (buf.bytes_total() - init).min(u32::MAX as usize) as u32;
            let ptr = buf.stable_mut_ptr().add(init);
            opcode::Recv::new(types::Fd(fd.raw()), ptr, spare).build()
        })
    };
    let mut in_flight = match op {
        Ok(op) => InFlightRecv {
            op: Some(op),
            init,
            keep,
        },
        Err((err, (_, buf))) => return (Err(err), buf),
    };
    let mut stopped = None;
    let (completion, (_, mut buf)) = poll_fn(|cx| {
        let op = in_flight.op.as_mut().expect("polled until it completes");
        if let Poll::Ready(done) = Pin::new(&mut *op).poll(cx) {
            in_flight.op = None;
            return Poll::Ready(done);
        }
        if stopped.is_none() {
            if let Some(why) = stop(cx) {
                op.cancel();
                stopped = Some(why);
            }
        }
        Poll::Pending
    })
    .await;
    let completion = match (completion, stopped) {
        // A receive cancelled while it waited (in io-wq: interrupted) took nothing.
        (Ok(done), Some(why)) if done.result == -libc::ECANCELED || done.result == -libc::EINTR => {
            Err(why)
        }
        (completion, _) => completion,
    };
    let result = completion.and_then(Completion::into_result).map(|n| {
        let n = n as usize;
        // SAFETY: the kernel wrote `n` bytes after the initialised part.
        unsafe { buf.set_init(init + n) };
        n
    });
    (result, buf)
}

/// A receive while its future lives: dropped before its final completion, it is
/// cancelled and handed to the socket (see [`DroppedRead`]).
struct InFlightRecv<'a, B: IoBufMut> {
    op: Option<Op<(FdRef, B)>>,
    init: usize,
    keep: &'a dyn Fn(Box<dyn DroppedRead>),
}

impl<B: IoBufMut> Drop for InFlightRecv<'_, B> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            op.cancel();
            (self.keep)(Box::new(DroppedRecv {
                op,
                init: self.init,
            }));
        }
    }
}

/// A receive dropped in flight, until its final completion.
struct DroppedRecv<B: IoBufMut> {
    op: Op<(FdRef, B)>,
    init: usize,
}

impl<B: IoBufMut> DroppedRead for DroppedRecv<B> {
    fn poll_taken(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        let (completion, (_, mut buf)) = ready!(Pin::new(&mut self.op).poll(cx));
        let taken = match completion.and_then(Completion::into_result) {
            Ok(n) if n > 0 => {
                // SAFETY: the kernel wrote `n` bytes after the initialised part.
                unsafe { buf.set_init(self.init + n as usize) };
                Ok(Bytes::copy_from_slice(
                    &crate::buf::init_bytes(&buf)[self.init..],
                ))
            }
            // Cancelled in time: nothing was taken. End of stream comes again with the
            // next receive.
            Ok(_) => Ok(Bytes::new()),
            Err(err) if err.raw_os_error() == Some(libc::ECANCELED) => Ok(Bytes::new()),
            // The socket's error, which the kernel reported to this receive only.
            Err(err) => Err(err),
        };
        Poll::Ready(taken)
    }
}

pub(crate) async fn send<B: IoBuf>(
    driver: &Handle,
    fd: &FdRef,
    buf: B,
    flags: i32,
) -> (io::Result<usize>, B) {
    // SAFETY: the SQE points into the buffer, owned by the op; its memory does not move.
    let op = unsafe {
        Op::submit(driver, (fd.clone(), buf), |(fd, buf)| {
            let len = buf.bytes_init().min(u32::MAX as usize) as u32;
            opcode::Send::new(types::Fd(fd.raw()), buf.stable_ptr(), len)
                .flags(flags)
                .build()
        })
    };
    match op {
        Ok(op) => {
            let (completion, (_, buf)) = op.await;
            let sent = completion.and_then(Completion::into_result);
            (sent.map(|n| n as usize), buf)
        }
        Err((err, (_, buf))) => (Err(err), buf),
    }
}

pub(crate) async fn shutdown(
    driver: &Handle,
    fd: &FdRef,
    how: std::net::Shutdown,
) -> io::Result<()> {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: the SQE points to no memory but the descriptor the op keeps open.
    let op = unsafe {
        Op::submit(driver, fd.clone(), |fd| {
            opcode::Shutdown::new(types::Fd(fd.raw()), how).build()
        })
    };
    let (completion, _) = op.map_err(|(err, _)| err)?.await;
    completion?.into_result().map(drop)
}

/// Buffers described as iovecs, split into `msghdr`s of at most [`IOV_MAX`] entries.
///
/// Filled in place in its box, which is its final address: the iovecs point into the
/// Bytes' heap memory and the headers into the iovec array's heap memory, so handing the
/// box to an op moves none of what the kernel will read. Once the op is over the box
/// goes back to a per-thread spare list with its arrays' capacity, so a stream that keeps
/// flushing allocates nothing for its sends.
pub(crate) struct SendMsgs {
    /// `None` while spare.
    fd: Option<FdRef>,
    bufs: Vec<Bytes>,
    /// Read by the kernel through `headers`; never by us after construction.
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::msghdr>,
}

/// Most spare [`SendMsgs`] a thread keeps: one per stream flushing at the same time is
/// enough for steady state; more would only hold memory.
const MAX_SPARE_SENDS: usize = 64;

thread_local! {
    // The boxes themselves are what is reused: each is handed whole to an op's slot.
    #[allow(clippy::vec_box)]
    static SPARE_SENDS: std::cell::RefCell<Vec<Box<SendMsgs>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl SendMsgs {
    /// Describes `bufs[first..]`, skipping `skip` bytes of `bufs[first]`, in at most
    /// `max_headers` headers, in a spare box when this thread has one.
    fn build(
        fd: FdRef,
        bufs: Vec<Bytes>,
        first: usize,
        skip: usize,
        max_headers: usize,
    ) -> Box<SendMsgs> {
        let spare = SPARE_SENDS.with(|spare| spare.borrow_mut().pop());
        let mut msgs = spare.unwrap_or_else(|| {
            Box::new(SendMsgs {
                fd: None,
                bufs: Vec::new(),
                iovecs: Vec::new(),
                headers: Vec::new(),
            })
        });
        let limit = max_headers.max(1) * IOV_MAX;
        iovecs_into(&mut msgs.iovecs, &bufs, first, skip, limit);
        let SendMsgs {
            iovecs, headers, ..
        } = &mut *msgs;
        headers.clear();
        let mut start = 0;
        while start < iovecs.len() || headers.is_empty() {
            let count = (iovecs.len() - start).min(IOV_MAX);
            // SAFETY: msghdr is plain old data; zero is its empty value.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_iov = iovecs[start..].as_ptr() as *mut libc::iovec;
            header.msg_iovlen = count;
            headers.push(header);
            start += count;
        }
        msgs.fd = Some(fd);
        msgs.bufs = bufs;
        msgs
    }

    fn raw_fd(&self) -> types::Fd {
        types::Fd(self.fd.as_ref().map_or(-1, FdRef::raw))
    }

    /// The buffers back, and the box (with its arrays' capacity) to the spare list. Only
    /// for a box the kernel is done with: its op gave it back.
    fn recycle(mut self: Box<SendMsgs>) -> Vec<Bytes> {
        let bufs = std::mem::take(&mut self.bufs);
        self.fd = None;
        self.iovecs.clear();
        self.headers.clear();
        SPARE_SENDS.with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < MAX_SPARE_SENDS {
                spare.push(self);
            }
        });
        bufs
    }
}

/// How a stream send went out: one `sendmsg`, or a linked chain of them.
pub(crate) enum StreamSend {
    One(Completion),
    /// One completion per link, in order.
    Chain(Vec<Completion>),
}

/// Sends `bufs[first..]` from byte `skip` with as few SQEs as the kernel allows: one
/// `sendmsg` while its iovecs fit in [`IOV_MAX`] (coalescing the writes into one kernel
/// operation is what makes batches fast), else a linked chain of up to `max_links` of
/// them (fewer if the submission queue is smaller), IO_LINK between links. `flags` go on each (MSG_WAITALL for TCP, so a short send
/// breaks the chain rather than leaving a gap).
pub(crate) async fn sendmsg_stream(
    driver: &Handle,
    fd: &FdRef,
    bufs: Vec<Bytes>,
    first: usize,
    skip: usize,
    flags: i32,
    max_links: usize,
) -> (io::Result<StreamSend>, Vec<Bytes>) {
    let max_links = match driver.with(|d| d.max_chain()) {
        Ok(queue) => max_links.min(queue).max(1),
        Err(err) => return (Err(err), bufs),
    };
    let msgs = SendMsgs::build(fd.clone(), bufs, first, skip, max_links);
    if msgs.headers.len() == 1 {
        // SAFETY: the SQE points to a header owned by the op's boxed data (see SendMsgs).
        let op = unsafe {
            Op::submit_boxed(driver, msgs, |msgs| {
                opcode::SendMsg::new(msgs.raw_fd(), &msgs.headers[0])
                    .flags(flags as u32)
                    .build()
            })
        };
        return match op {
            Ok(op) => {
                let (completion, msgs) = op.await;
                (completion.map(StreamSend::One), msgs.recycle())
            }
            Err((err, msgs)) => (Err(err), msgs.recycle()),
        };
    }
    // SAFETY: every SQE points to a header owned by the chain's data (see SendMsgs).
    let op = unsafe {
        ChainOp::submit(driver, msgs, |msgs| {
            msgs.headers
                .iter()
                .map(|header| {
                    opcode::SendMsg::new(msgs.raw_fd(), header)
                        .flags(flags as u32)
                        .build()
                })
                .collect()
        })
    };
    match op {
        Ok(op) => {
            let (completions, msgs) = op.await;
            (completions.map(StreamSend::Chain), msgs.recycle())
        }
        Err((err, msgs)) => (Err(err), msgs.recycle()),
    }
}
