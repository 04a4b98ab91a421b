//! Reads and writes on a descriptor that is not a socket (a TUN queue) as io_uring
//! SQEs: READ into the spare capacity of an owned buffer, WRITE of an owned buffer.

use std::io;

use io_uring::{opcode, types};

use super::{Completion, Handle, Op};
use crate::buf::{IoBuf, IoBufMut};
use crate::driver::fd::FdRef;

/// "The file's current position": TUN queues are not seekable; -1 keeps io_uring from
/// asking for an offset.
const NO_OFFSET: u64 = u64::MAX;

/// A READ in flight; its data (the descriptor and the buffer) belongs to the slot until
/// the final completion.
pub(crate) type ReadOp<B> = Op<(FdRef, B)>;

/// Submits one READ into the spare capacity of `buf`.
pub(crate) fn read_op<B: IoBufMut>(
    driver: &Handle,
    fd: &FdRef,
    buf: B,
) -> Result<ReadOp<B>, (io::Error, B)> {
    // SAFETY: the SQE points into the buffer's spare capacity; the buffer is owned by the
    // op and its heap memory does not move (IoBufMut's contract).
    let op = unsafe {
        Op::submit(driver, (fd.clone(), buf), |(fd, buf)| {
            let init = buf.bytes_init();
            let spare = (buf.bytes_total() - init).min(u32::MAX as usize) as u32;
            let ptr = buf.stable_mut_ptr().add(init);
            opcode::Read::new(types::Fd(fd.raw()), ptr, spare)
                .offset(NO_OFFSET)
                .build()
        })
    };
    op.map_err(|(err, (_, buf))| (err, buf))
}

/// What a finished READ gives: the count read (marked initialised in the buffer).
pub(crate) fn read_done<B: IoBufMut>(
    completion: io::Result<Completion>,
    mut buf: B,
) -> (io::Result<usize>, B) {
    let result = completion.and_then(Completion::into_result).map(|n| {
        let n = n as usize;
        let init = buf.bytes_init() + n;
        // SAFETY: the kernel wrote `n` bytes after the initialised part.
        unsafe { buf.set_init(init) };
        n
    });
    (result, buf)
}

/// A WRITE in flight.
pub(crate) type WriteOp<B> = Op<(FdRef, B)>;

/// Submits one WRITE of the initialised bytes of `buf` (one packet on a TUN queue).
pub(crate) fn write_op<B: IoBuf>(
    driver: &Handle,
    fd: &FdRef,
    buf: B,
) -> Result<WriteOp<B>, (io::Error, B)> {
    // SAFETY: the SQE points into the buffer, owned by the op; its memory does not move.
    let op = unsafe {
        Op::submit(driver, (fd.clone(), buf), |(fd, buf)| {
            let len = buf.bytes_init().min(u32::MAX as usize) as u32;
            opcode::Write::new(types::Fd(fd.raw()), buf.stable_ptr(), len)
                .offset(NO_OFFSET)
                .build()
        })
    };
    op.map_err(|(err, (_, buf))| (err, buf))
}
