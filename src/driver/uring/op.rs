//! Futures over operation-table slots: one SQE, a multishot SQE, or a linked chain.
//!
//! Each hands its data (buffers, addresses) to the driver when it pushes the SQE and
//! keeps only the driver's handle and the key; it takes the data back after the final
//! completion. Dropped early, it leaves the data in the slot and asks for a cancel (see
//! the module above). Polled where its driver does not run, it cancels on its own
//! driver, waits there for the final completion, and gives its data back with the
//! misuse error. Polled by a waker its own driver calls while it dispatches, it stays in
//! flight and is woken to be polled again at the end of that turn.

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use io_uring::squeue;

use super::released::empty_post;
use super::table::{Key, State};
use super::tap::Tap;
use super::{Completion, Driver, Handle};
use crate::driver::posted::PostLedger;

/// The data of a slot, as the type its operation gave it.
fn unbox<T: 'static>(data: Box<dyn Any>) -> T {
    match data.downcast::<T>() {
        Ok(data) => *data,
        Err(_) => unreachable!("a key's generation ties it to the data its operation gave"),
    }
}

/// The data of a slot, still in the box its operation was given in (no allocation is
/// made or freed for it).
fn keep_boxed<T: 'static>(data: Box<dyn Any>) -> Box<T> {
    match data.downcast::<T>() {
        Ok(data) => data,
        Err(_) => unreachable!("a key's generation ties it to the data its operation gave"),
    }
}

/// Takes an abandoned operation's data back (as `take` gives it); the process stops
/// rather than let the kernel write into memory it freed when the kernel never gave it
/// back.
fn abandoned<T: 'static>(
    driver: &Handle,
    key: Key,
    close_result: bool,
    take: fn(Box<dyn Any>) -> T,
) -> T {
    let Ok(mut d) = driver.borrow() else {
        // Its runtime is dispatching further up this thread's stack: a waker it called
        // runs another runtime, which polled this. The operation can be neither waited
        // for here nor cancelled, and its memory is still the kernel's.
        eprintln!(
            "ringsock: an io_uring operation was polled under another runtime from inside a \
             waker its own runtime was calling; aborting rather than freeing its memory \
             under the kernel"
        );
        std::process::abort()
    };
    match d.abandon(key, close_result) {
        Some(data) => {
            drop(d);
            take(data)
        }
        None => {
            eprintln!(
                "ringsock: the kernel did not give back an io_uring operation's memory after \
                 it was cancelled; aborting rather than freeing it under the kernel"
            );
            std::process::abort()
        }
    }
}

/// A single-shot operation: resolves to its completion and gives its data back.
pub(crate) struct Op<T: 'static> {
    driver: Handle,
    /// `None` once the future has taken its data back.
    key: Option<Key>,
    /// The result is a descriptor to close if the future is dropped without taking it.
    close_result: bool,
    /// How the slot's data becomes a `T` again: unboxed, or kept in its box.
    take: fn(Box<dyn Any>) -> T,
}

impl<T: 'static> Op<T> {
    /// Boxes `data`, builds the SQE from it and pushes it on `driver`, which must be the
    /// one driving this thread. On failure nothing was pushed and the data comes back
    /// with the error.
    ///
    /// # Safety
    ///
    /// The entry `build` returns may point only into the boxed data (or to memory that
    /// outlives the driver): the box is what keeps that memory alive until the CQE.
    pub(crate) unsafe fn submit(
        driver: &Handle,
        data: T,
        build: impl FnOnce(&mut T) -> squeue::Entry,
    ) -> Result<Op<T>, (io::Error, T)> {
        // SAFETY: the caller's contract, passed on.
        unsafe { Op::push_boxed(driver, Box::new(data), build, unbox::<T>) }
    }

    /// Builds the SQE from the boxed `data` and pushes it, the slot taking the box;
    /// `take` turns the slot's data back into what the future gives.
    ///
    /// # Safety
    ///
    /// As for [`Op::submit`]: the entry may point only into the boxed data.
    unsafe fn push_boxed<U: 'static>(
        driver: &Handle,
        mut data: Box<U>,
        build: impl FnOnce(&mut U) -> squeue::Entry,
        take: fn(Box<dyn Any>) -> T,
    ) -> Result<Op<T>, (io::Error, T)> {
        let mut d = match driver.checked() {
            Ok(d) => d,
            Err(err) => return Err((err, take(data))),
        };
        let entry = build(&mut data);
        // SAFETY: the entry points into `data`, which the slot owns until the final CQE.
        match unsafe { d.push(entry, State::Pending(None), data) } {
            Ok(key) => Ok(Op {
                driver: driver.clone(),
                key: Some(key),
                close_result: false,
                take,
            }),
            Err((err, data)) => {
                drop(d);
                Err((err, take(data)))
            }
        }
    }
}

impl<U: 'static> Op<Box<U>> {
    /// As [`Op::submit`], for data already in a box: the slot takes that box and the
    /// future gives the same box back, so an operation whose caller keeps reusing its
    /// data allocates nothing.
    ///
    /// # Safety
    ///
    /// As for [`Op::submit`]: the entry may point only into the boxed data.
    pub(crate) unsafe fn submit_boxed(
        driver: &Handle,
        data: Box<U>,
        build: impl FnOnce(&mut U) -> squeue::Entry,
    ) -> Result<Op<Box<U>>, (io::Error, Box<U>)> {
        // SAFETY: the caller's contract, passed on.
        unsafe { Op::push_boxed(driver, data, build, keep_boxed::<U>) }
    }
}

impl<T: 'static> Op<T> {
    /// Makes a dropped future close the descriptor its completion carries (an accept).
    pub(crate) fn closing_result(mut self) -> Op<T> {
        self.close_result = true;
        self
    }

    /// Asks the kernel to end this operation early while the future keeps waiting: the
    /// final completion still comes through `poll`, with the data, as `ECANCELED` or as
    /// whatever the operation did before the request reached it. False when it could not
    /// be asked (the operation then runs to its natural end).
    pub(crate) fn cancel(&self) -> bool {
        match self.key {
            // The slot is still this op's: the driver keeps it until poll took it back.
            Some(key) => self.driver.with(|d| d.cancel(key)).unwrap_or(false),
            None => true,
        }
    }
}

impl<T: 'static> Future for Op<T> {
    /// The completion (or the misuse error) and the data, given back either way.
    type Output = (io::Result<Completion>, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let key = self.key.expect("an Op is not polled after it completed");
        let polled = self.driver.with(|d| d.poll_single(key, cx));
        match polled {
            Ok(Poll::Ready((completion, data))) => {
                self.key = None;
                Poll::Ready((Ok(completion), (self.take)(data)))
            }
            Ok(Poll::Pending) => Poll::Pending,
            // A waker the driver called polls this: the operation is as in flight as
            // before, and is polled again once the driver is free.
            Err(_) if self.driver.dispatching_here() => {
                self.driver.wake_after_dispatch(cx.waker());
                Poll::Pending
            }
            Err(misuse) => {
                self.key = None;
                let data = abandoned(&self.driver, key, self.close_result, self.take);
                Poll::Ready((Err(misuse), data))
            }
        }
    }
}

/// Pushes a send nobody will wait for: the slot owns `data` until the final CQE, whose
/// result goes to `ledger` (which the caller has already [`begin`](PostLedger::begin)-ed).
/// On failure nothing was pushed and the data comes back with the error.
///
/// # Safety
///
/// As for [`Op::submit`]: the entry may point only into the boxed data.
pub(crate) unsafe fn post<T: 'static>(
    d: &mut Driver,
    data: T,
    ledger: &Rc<PostLedger>,
    build: impl FnOnce(&mut T) -> squeue::Entry,
) -> Result<(), (io::Error, T)> {
    // SAFETY: forwarded from the caller.
    unsafe { post_many(d, data, ledger, 1, None, build) }
}

/// [`post`] for a send of `datagrams` datagrams (a GSO send), each of which has taken
/// its place in `ledger` and is booked with the send's result; or, when the kernel
/// refuses a send of several for a reason GSO may cause, given back to `tap` to send
/// again ([`Tap::refused`]).
///
/// # Safety
///
/// As for [`post`].
pub(crate) unsafe fn post_many<T: 'static>(
    d: &mut Driver,
    data: T,
    ledger: &Rc<PostLedger>,
    datagrams: u32,
    tap: Option<Rc<dyn Tap>>,
    build: impl FnOnce(&mut T) -> squeue::Entry,
) -> Result<(), (io::Error, T)> {
    // The box an earlier post of a `T` released, else a new one.
    let mut cell = match d.spare_post_box::<T>() {
        Some(mut cell) => {
            *cell = Some(data);
            cell
        }
        None => Box::new(Some(data)),
    };
    let entry = build(cell.as_mut().as_mut().expect("filled above"));
    let state = State::Posted {
        ledger: ledger.clone(),
        datagrams,
        refused_to: tap,
        empty: empty_post::<T>,
    };
    // SAFETY: the entry points into the cell's data, which the slot owns (in the same
    // box, never moved) until the final CQE.
    match unsafe { d.push(entry, state, cell) } {
        Ok(_) => Ok(()),
        Err((err, cell)) => Err((err, unbox::<Option<T>>(cell).expect("filled above"))),
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            ignore(&self.driver, key, self.close_result);
        }
    }
}

/// Leaves a dropped operation's slot to the driver (cancelled, freed at its final CQE);
/// data the kernel is already done with is dropped here, outside the driver.
fn ignore(driver: &Handle, key: Key, close_results: bool) {
    let done = match driver.borrow() {
        Ok(mut d) => d.ignore(key, close_results),
        // Only a drop inside the driver's own dispatch gets here (a waker it called):
        // ignored at the end of that turn. Until then the slot keeps the data.
        Err(_) => {
            driver.ignore_later(key, close_results);
            None
        }
    };
    drop(done);
}

/// A multishot operation (accept, receive): a stream of completions.
pub(crate) struct MultiOp {
    driver: Handle,
    key: Key,
    /// Whether its results are descriptors to close if nobody takes them.
    close_results: bool,
    finished: bool,
}

impl MultiOp {
    /// # Safety
    ///
    /// As for [`Op::submit`].
    ///
    /// With a `queue_limit`, the driver pauses the operation once that many completions
    /// wait untaken ([`State::multi`]): it then ends like a cancelled one, without an
    /// `ECANCELED` completion of its own.
    pub(crate) unsafe fn submit<T: 'static>(
        driver: &Handle,
        data: T,
        close_results: bool,
        queue_limit: Option<usize>,
        build: impl FnOnce(&mut T) -> squeue::Entry,
    ) -> io::Result<MultiOp> {
        let mut data = Box::new(data);
        let entry = build(&mut data);
        // SAFETY: as in Op::submit.
        let key = driver
            .with(|d| unsafe { d.push(entry, State::multi(queue_limit), data) })?
            .map_err(|(err, _)| err)?;
        Ok(MultiOp {
            driver: driver.clone(),
            key,
            close_results,
            finished: false,
        })
    }

    /// The next completion, or `None` once the kernel ended the multishot (no
    /// IORING_CQE_F_MORE): the caller re-arms it if it wants more. The misuse error
    /// where its driver does not run (the multishot stays armed on its driver).
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Completion>>> {
        self.poll(cx, false)
            .map_ok(|next| next.map(|(completion, _)| completion))
    }

    /// As [`poll_next`](Self::poll_next), and a completion that leaves none queued also
    /// keeps `cx`'s waker for the next one (true beside it): an owner that has taken
    /// everything then need not poll once more only to be woken.
    pub(crate) fn poll_next_keeping_waker(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<(Completion, bool)>>> {
        self.poll(cx, true)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        keep_when_drained: bool,
    ) -> Poll<io::Result<Option<(Completion, bool)>>> {
        if self.finished {
            return Poll::Ready(Ok(None));
        }
        let key = self.key;
        match self
            .driver
            .with(|d| d.poll_multi(key, cx, keep_when_drained))
        {
            Ok(Poll::Ready(None)) => {
                self.finished = true;
                Poll::Ready(Ok(None))
            }
            Ok(Poll::Ready(Some(next))) => Poll::Ready(Ok(Some(next))),
            Ok(Poll::Pending) => Poll::Pending,
            Err(misuse) => Poll::Ready(Err(misuse)),
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
        self.driver.with(|d| d.cancel(self.key)).unwrap_or(false)
    }

    /// Hands this operation's completions that carry a value to `tap` from now on, in
    /// place of [`poll_next`](Self::poll_next) (which still sees errors and the end).
    pub(crate) fn set_tap(&self, tap: Rc<dyn Tap>) -> io::Result<()> {
        let key = self.key;
        self.driver.with(|d| d.set_tap(key, tap))
    }

    /// Completions waiting to be taken, and whether the kernel has ended the operation
    /// (its last completion may still wait). Where its driver does not run: none, ended.
    pub(crate) fn status(&self) -> (usize, bool) {
        if self.finished {
            return (0, true);
        }
        let key = self.key;
        self.driver
            .with(|d| d.multi_status(key))
            .ok()
            .flatten()
            .unwrap_or((0, true))
    }
}

impl MultiOp {
    /// Completions waiting to be taken that carry a value, not an error (for an accept:
    /// open descriptors). None where its driver does not run.
    pub(crate) fn values_waiting(&self) -> usize {
        if self.finished {
            return 0;
        }
        let key = self.key;
        self.driver
            .with(|d| d.multi_values_waiting(key))
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

impl Drop for MultiOp {
    fn drop(&mut self) {
        if !self.finished {
            ignore(&self.driver, self.key, self.close_results);
        }
    }
}

/// A linked chain of SQEs sharing one piece of data; resolves when every link has
/// completed (a failed link makes the rest complete with `ECANCELED`).
pub(crate) struct ChainOp<T: 'static> {
    driver: Handle,
    keys: Vec<Key>,
    results: Vec<Option<Completion>>,
    data: Option<Rc<T>>,
}

impl<T: 'static> ChainOp<T> {
    /// # Safety
    ///
    /// The entries may point only into `data` (boxed behind the Rc, so it never moves).
    /// On failure nothing was pushed and the data comes back with the error.
    pub(crate) unsafe fn submit(
        driver: &Handle,
        data: T,
        build: impl FnOnce(&T) -> Vec<squeue::Entry>,
    ) -> Result<ChainOp<T>, (io::Error, T)> {
        let mut d = match driver.checked() {
            Ok(d) => d,
            Err(err) => return Err((err, data)),
        };
        let data = Rc::new(data);
        let mut entries = build(&data);
        let shared = data.clone();
        let hold = move || Box::new(shared.clone()) as Box<dyn Any>;
        // SAFETY: the entries point into `data`; every link's slot holds a clone of the
        // Rc until that link's final CQE.
        let pushed = unsafe { d.push_chain(&mut entries, hold) };
        drop(d);
        match pushed {
            Ok(keys) => Ok(ChainOp {
                driver: driver.clone(),
                results: vec![None; keys.len()],
                keys,
                data: Some(data),
            }),
            Err(err) => match Rc::try_unwrap(data) {
                Ok(data) => Err((err, data)),
                Err(_) => unreachable!("nothing was pushed, so no slot shares the data"),
            },
        }
    }

    /// The data back, once no slot holds a clone of it.
    fn take_data(&mut self) -> T {
        let data = self
            .data
            .take()
            .expect("a ChainOp is not polled after it completed");
        match Rc::try_unwrap(data) {
            Ok(data) => data,
            Err(_) => unreachable!("no slot keeps the data once every link is over"),
        }
    }
}

impl<T: 'static> Future for ChainOp<T> {
    /// Each link's completion (or the misuse error) and the data, given back either way.
    type Output = (io::Result<Vec<Completion>>, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut pending = false;
        let outcome = this.driver.with(|d| {
            for (key, result) in this.keys.iter().zip(this.results.iter_mut()) {
                if result.is_none() {
                    match d.poll_single(*key, cx) {
                        // The slot's clone of the data goes with it.
                        Poll::Ready((completion, _clone)) => *result = Some(completion),
                        Poll::Pending => pending = true,
                    }
                }
            }
        });
        if outcome.is_err() && this.driver.dispatching_here() {
            // As for a single operation: polled again once the driver is free.
            this.driver.wake_after_dispatch(cx.waker());
            return Poll::Pending;
        }
        if let Err(misuse) = outcome {
            for (key, result) in this.keys.iter().zip(this.results.iter_mut()) {
                if result.take().is_none() {
                    drop(abandoned::<Rc<T>>(&this.driver, *key, false, unbox));
                }
            }
            this.keys.clear();
            return Poll::Ready((Err(misuse), this.take_data()));
        }
        if pending {
            return Poll::Pending;
        }
        let completions = this
            .results
            .iter()
            .map(|c| c.expect("all links done"))
            .collect();
        this.keys.clear();
        Poll::Ready((Ok(completions), this.take_data()))
    }
}

impl<T: 'static> Drop for ChainOp<T> {
    fn drop(&mut self) {
        for (key, result) in self.keys.iter().zip(&self.results) {
            if result.is_none() {
                ignore(&self.driver, *key, false);
            }
        }
    }
}
