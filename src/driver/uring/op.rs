//! Futures over operation-table slots: one SQE, a multishot SQE, or a linked chain.
//!
//! Each owns its data (buffers, addresses) until the kernel gives the slot back; dropped
//! early, it parks the data in the driver and asks for a cancel (see the module above).

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use io_uring::squeue;

use super::{Completion, Driver};
use crate::driver::Driver as AnyDriver;
use crate::runtime;

/// Runs `f` on the current runtime's io_uring driver.
pub(crate) fn with_uring<R>(f: impl FnOnce(&mut Driver) -> R) -> io::Result<R> {
    runtime::with_driver(|driver| match driver {
        AnyDriver::Uring(uring) => Ok(f(uring)),
        AnyDriver::Poll(_) => Err(io::Error::other(
            "an io_uring operation was started on an epoll runtime",
        )),
    })?
}

/// A single-shot operation: resolves to its completion and gives its data back.
pub(crate) struct Op<T: 'static> {
    slot: usize,
    data: Option<Box<T>>,
}

impl<T: 'static> Op<T> {
    /// Boxes `data`, builds the SQE from it and pushes it.
    ///
    /// # Safety
    ///
    /// The entry `build` returns may point only into the boxed data (or to memory that
    /// outlives the runtime): the box is what keeps that memory alive until the CQE.
    /// On failure nothing was pushed and the data comes back with the error.
    pub(crate) unsafe fn submit(
        data: T,
        build: impl FnOnce(&mut T) -> squeue::Entry,
    ) -> Result<Op<T>, (io::Error, T)> {
        let mut data = Box::new(data);
        let entry = build(&mut data);
        // SAFETY: the entry points into `data`, which this Op (or, once the Op is dropped,
        // the driver's slot) owns until the completion.
        match with_uring(|driver| unsafe { driver.push(entry, false) }).and_then(|r| r) {
            Ok(slot) => Ok(Op {
                slot,
                data: Some(data),
            }),
            Err(err) => Err((err, *data)),
        }
    }
}

impl<T: 'static> Future for Op<T> {
    type Output = (Completion, Box<T>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let slot = self.slot;
        match with_uring(|driver| driver.poll_slot(slot, cx)) {
            Ok(Poll::Ready(completion)) => {
                let data = self
                    .data
                    .take()
                    .expect("an Op is not polled after it completed");
                Poll::Ready((completion, data))
            }
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => unreachable!("an io_uring Op outlived its runtime"),
        }
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        if let Some(data) = self.data.take() {
            park_data(self.slot, data, false);
        }
    }
}

/// Moves a dropped operation's data into its slot; without a runtime (thread exit), leaks
/// it, since the kernel might still use it.
fn park_data(slot: usize, data: Box<dyn Any>, close_results: bool) {
    let mut data = Some(data);
    match with_uring(|driver| driver.ignore(slot, data.take()?, close_results)) {
        // The kernel was already done: free it here, outside the driver.
        Ok(done) => drop(done),
        Err(_) => std::mem::forget(data),
    }
}

/// A multishot operation (accept, receive): a stream of completions.
pub(crate) struct MultiOp<T: 'static> {
    slot: usize,
    data: Option<Box<T>>,
    /// Whether its results are descriptors to close if nobody takes them.
    close_results: bool,
    finished: bool,
}

impl<T: 'static> MultiOp<T> {
    /// # Safety
    ///
    /// As for [`Op::submit`].
    pub(crate) unsafe fn submit(
        data: T,
        close_results: bool,
        build: impl FnOnce(&mut T) -> squeue::Entry,
    ) -> io::Result<MultiOp<T>> {
        let mut data = Box::new(data);
        let entry = build(&mut data);
        // SAFETY: as in Op::submit.
        let slot = with_uring(|driver| unsafe { driver.push(entry, true) }).and_then(|r| r)?;
        Ok(MultiOp {
            slot,
            data: Some(data),
            close_results,
            finished: false,
        })
    }

    /// The next completion, or `None` once the kernel ended the multishot (no
    /// IORING_CQE_F_MORE): the caller re-arms it if it wants more.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Completion>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let slot = self.slot;
        match with_uring(|driver| driver.poll_multi(slot, cx)) {
            Ok(Poll::Ready(None)) => {
                self.finished = true;
                Poll::Ready(None)
            }
            Ok(other) => other,
            Err(_) => unreachable!("an io_uring MultiOp outlived its runtime"),
        }
    }

    /// Asks the kernel to end this operation; its last completions still come through
    /// [`poll_next`](Self::poll_next), which ends with the final one. False when the
    /// request could not be queued (a full submission queue): ask again later.
    pub(crate) fn cancel(&self) -> bool {
        if self.finished {
            return true;
        }
        // The slot is still this op's: the driver keeps it until poll_next has reported
        // the end.
        with_uring(|driver| driver.cancel(self.slot)).unwrap_or(false)
    }

    /// True once the multishot has ended and every completion was taken.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// The data the kernel reads (for example a msghdr template).
    #[allow(dead_code)]
    pub(crate) fn data(&self) -> &T {
        self.data.as_ref().expect("data is present until drop")
    }
}

impl<T: 'static> Drop for MultiOp<T> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(data) = self.data.take() {
            park_data(self.slot, data, self.close_results);
        }
    }
}

/// A linked chain of SQEs sharing one piece of data; resolves when every link has
/// completed (a failed link makes the rest complete with `ECANCELED`).
pub(crate) struct ChainOp<T: 'static> {
    slots: Vec<usize>,
    results: Vec<Option<Completion>>,
    data: Option<Rc<T>>,
}

impl<T: 'static> ChainOp<T> {
    /// # Safety
    ///
    /// The entries may point only into `data` (boxed behind the Rc, so it never moves).
    /// On failure nothing was pushed and the data comes back with the error.
    pub(crate) unsafe fn submit(
        data: T,
        build: impl FnOnce(&T) -> Vec<squeue::Entry>,
    ) -> Result<ChainOp<T>, (io::Error, T)> {
        let data = Rc::new(data);
        let mut entries = build(&data);
        // SAFETY: the entries point into `data`; this ChainOp, or every ignored slot,
        // holds a clone of the Rc until the last completion.
        match with_uring(|driver| unsafe { driver.push_chain(&mut entries) }).and_then(|r| r) {
            Ok(slots) => Ok(ChainOp {
                results: vec![None; slots.len()],
                slots,
                data: Some(data),
            }),
            Err(err) => match Rc::try_unwrap(data) {
                Ok(data) => Err((err, data)),
                Err(_) => unreachable!("nothing was pushed, so nothing shares the data"),
            },
        }
    }
}

impl<T: 'static> Future for ChainOp<T> {
    type Output = (Vec<Completion>, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut pending = false;
        let outcome = with_uring(|driver| {
            for (slot, result) in this.slots.iter().zip(this.results.iter_mut()) {
                if result.is_none() {
                    match driver.poll_slot(*slot, cx) {
                        Poll::Ready(completion) => *result = Some(completion),
                        Poll::Pending => pending = true,
                    }
                }
            }
        });
        if outcome.is_err() {
            unreachable!("an io_uring ChainOp outlived its runtime");
        }
        if pending {
            return Poll::Pending;
        }
        let completions = this
            .results
            .iter()
            .map(|c| c.expect("all links done"))
            .collect();
        let data = this
            .data
            .take()
            .expect("a ChainOp is not polled after it completed");
        let data = match Rc::try_unwrap(data) {
            Ok(data) => data,
            Err(_) => unreachable!("no slot keeps the data once every link completed"),
        };
        Poll::Ready((completions, data))
    }
}

impl<T: 'static> Drop for ChainOp<T> {
    fn drop(&mut self) {
        let Some(data) = self.data.take() else {
            return;
        };
        for (slot, result) in self.slots.iter().zip(&self.results) {
            if result.is_none() {
                park_data(*slot, Box::new(data.clone()), false);
            }
        }
    }
}
