//! OutputStream: writes queued without a system call, sent together by `flush`.
//!
//! Windows.Networking.Sockets' batched sends: many `write`s, then one `flush`
//! (FlushAsync) that returns when the kernel has given every one of them back. A flush
//! that finds nothing in flight first offers the batch to the kernel itself, in one
//! nonblocking `sendmsg`; what that does not finish is sent by a task of its own, so
//! dropping a `flush` future (or a write handle) never cuts a batch in half: the stream
//! stays whole whatever the caller gives up on.
//!
//! Writes are numbered in the order they are queued and complete in that order, so a
//! write's result needs no allocation of its own: every write numbered below
//! `completed` succeeded, and every write from the failure's number on failed.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};

use super::transport::Transport;
use crate::driver::ops::{self, BatchReport};
use crate::driver::SharedFd;
use crate::{Error, Result};

/// Bounds of an [`OutputStream`]'s queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputStreamConfig {
    /// Most bytes queued or in flight before `write` waits (default 8 MiB). A single
    /// write larger than this is still accepted when nothing else is pending.
    pub max_pending_bytes: usize,
    /// Most writes queued or in flight before `write` waits (default 4096).
    pub max_pending_writes: usize,
}

impl Default for OutputStreamConfig {
    fn default() -> Self {
        OutputStreamConfig {
            max_pending_bytes: 8 * 1024 * 1024,
            max_pending_writes: 4096,
        }
    }
}

/// Counters of an [`OutputStream`], for seeing what batching bought.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputStreamStats {
    /// Writes queued.
    pub writes: u64,
    /// Bytes of those writes.
    pub bytes: u64,
    /// Batches submitted: one per flush that had something to send (more when a batch is
    /// cut by back-pressure).
    pub batches: u64,
    /// Kernel operations used: SQEs on io_uring, `sendmsg` calls on epoll, and the
    /// `sendmsg` a flush makes itself when it finds nothing in flight (see
    /// [`OutputStream::flush`]).
    pub kernel_operations: u64,
    /// Short sends (or chains cut after one) resubmitted from their exact byte offset.
    pub short_send_recoveries: u64,
}

/// The sending side of a stream socket, like StreamSocket.OutputStream.
///
/// Every [`StreamSocket::output_stream`](super::StreamSocket::output_stream) call returns
/// a handle to the same stream, so writes from anywhere keep one order.
///
/// On a datagram socket ([`DatagramSocket::output_stream`](super::DatagramSocket::output_stream),
/// [`output_stream_to`](super::DatagramSocket::output_stream_to)) each write is one
/// datagram, sent in order and never merged with another; a flush sends the queued
/// datagrams in one submission.
pub struct OutputStream {
    inner: Rc<Inner>,
}

struct Inner {
    fd: Option<SharedFd>,
    /// A byte stream, or one datagram per write.
    transport: Transport,
    /// OutputStream values alive (write handles hold the Rc too, but cannot queue, so
    /// they do not count). The sender task holds the Rc as well, so the Rc's count
    /// cannot tell when the last OutputStream goes.
    handles: Cell<usize>,
    config: Cell<OutputStreamConfig>,
    state: RefCell<State>,
    stats: Cell<OutputStreamStats>,
}

#[derive(Default)]
struct State {
    /// Queued, not yet submitted: writes numbered `queued_from..next`.
    queue: Vec<Bytes>,
    /// How many writes each entry of `queue` holds: 1, or a run of copies.
    queue_writes: Vec<u32>,
    /// Copies of the writes of entry `gather_from` ([`OutputStream::write_copy`] on a
    /// byte stream), gathered in one buffer until the queue is sent; the entry waits
    /// empty until then ([`seal_gathered`](State::seal_gathered)). The run's writes
    /// complete together, when its last byte is sent.
    gathered: BytesMut,
    gather_from: Option<usize>,
    /// Bytes in `queue`.
    queued_bytes: usize,
    /// The vectors of the last batch sent, emptied, for the next queue to reuse.
    spare: Vec<Bytes>,
    spare_writes: Vec<u32>,
    queued_from: u64,
    next: u64,
    /// Bytes queued or in flight.
    pending_bytes: usize,
    /// Writes (and their bytes) queued since the stream began; the rest of the counters
    /// live in `Inner::stats`, updated once per batch.
    accepted_writes: u64,
    accepted_bytes: u64,
    /// Every write numbered below this has been sent.
    completed: u64,
    /// Writes from this number on failed, with why.
    failure: Option<(u64, Failure)>,
    /// Writes numbered below this must be sent without waiting for another flush.
    flush_target: u64,
    /// The stream's sender task, which lives as long as an OutputStream of the stream
    /// does, so that a flush spawns nothing.
    sender: Sender,
    /// Which sender task is the stream's: one that finds another number ends.
    sender_epoch: u64,
    waiters: Vec<Waker>,
}

/// Where the sender task is.
#[derive(Default)]
enum Sender {
    /// None runs (not started yet, or ended: no OutputStream left, or the stream broke).
    #[default]
    Absent,
    /// It is sending, or about to look for more.
    Running,
    /// It waits for the next flush, to be woken with this.
    Parked(Waker),
}

/// The error that broke the stream; every write and flush it concerns gets a copy, with
/// its status (a TLS failure stays a TLS failure).
struct Failure(Error);

impl Failure {
    fn from_io(err: std::io::Error) -> Failure {
        match Error::from(err) {
            Error::Io { source, .. } => Failure(Error::io("write", source)),
            other => Failure(other),
        }
    }

    fn to_error(&self) -> Error {
        self.0.clone()
    }
}

impl State {
    /// Queued writes somebody waits for (a flush, a handle, a full queue).
    fn has_work(&self) -> bool {
        !self.queue.is_empty() && self.queued_from < self.flush_target
    }

    /// The result of write `seq`, once known.
    fn result_of(&self, seq: u64) -> Option<Result<()>> {
        if let Some((from, failure)) = &self.failure {
            if seq >= *from {
                return Some(Err(failure.to_error()));
            }
        }
        (seq < self.completed).then_some(Ok(()))
    }

    /// Registers the task to be woken at the next batch's end. The same task awaiting
    /// many handles (the wait-all pattern) is registered once, not once per handle.
    fn wait(&mut self, cx: &Context<'_>) {
        if !self.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            self.waiters.push(cx.waker().clone());
        }
    }

    fn wake_all(&mut self) {
        self.waiters.drain(..).for_each(Waker::wake);
    }

    /// The stream is broken: every write not yet sent (the queue, and in a batch what
    /// was not sent of it) fails with `err`'s status.
    fn fail(&mut self, err: std::io::Error) {
        self.failure = Some((self.completed, Failure::from_io(err)));
        self.queue.clear();
        self.queue_writes.clear();
        self.gathered.clear();
        self.gather_from = None;
        let dropped = std::mem::take(&mut self.queued_bytes);
        self.pending_bytes = self.pending_bytes.saturating_sub(dropped);
        self.queued_from = self.next;
        self.wake_all();
    }

    /// The first `sent` bytes of the queue went out while nothing else was in flight:
    /// the writes they finish complete, a write they cut keeps only its rest.
    fn take_sent(&mut self, sent: usize) {
        debug_assert_eq!(self.completed, self.queued_from, "nothing in flight");
        let mut left = sent;
        let done = self
            .queue
            .iter()
            .take_while(|buf| {
                let whole = buf.len() <= left;
                if whole {
                    left -= buf.len();
                }
                whole
            })
            .count();
        self.queue.drain(..done);
        let writes: u64 = self.queue_writes.drain(..done).map(u64::from).sum();
        if left > 0 {
            bytes::Buf::advance(&mut self.queue[0], left);
        }
        self.queued_from += writes;
        self.completed = self.queued_from;
        self.queued_bytes -= sent;
        self.pending_bytes = self.pending_bytes.saturating_sub(sent);
        self.wake_all();
    }

    /// Puts the gathered copies into their entry of the queue: done before the queue is
    /// sent or a write that is not a copy joins it.
    #[inline]
    fn seal_gathered(&mut self) {
        let Some(at) = self.gather_from.take() else {
            return;
        };
        // A large run's memory goes with it once sent rather than staying with the
        // stream for the next small one (an idle connection would keep its largest
        // burst): measured before the split, which leaves only the unused tail.
        let large = self.gathered.capacity() > GATHER_RETAIN;
        self.queue[at] = self.gathered.split().freeze();
        if large {
            self.gathered = BytesMut::new();
        }
    }

    fn in_flight_writes(&self) -> u64 {
        self.next - self.completed
    }

    /// Whether a write of `len` bytes fits within `config`'s bounds. An empty queue
    /// always takes one write, however large.
    #[inline]
    fn has_room(&self, len: usize, config: &OutputStreamConfig) -> bool {
        let writes = self.in_flight_writes();
        writes == 0
            || (self.pending_bytes + len <= config.max_pending_bytes
                && writes < config.max_pending_writes as u64)
    }
}

/// Most gathering memory a stream keeps between runs of copied writes.
const GATHER_RETAIN: usize = 256 * 1024;

impl OutputStream {
    pub(crate) fn new(fd: Option<SharedFd>) -> OutputStream {
        OutputStream::with_transport(fd, Transport::Stream)
    }

    /// An output stream of a datagram socket (see [`Transport`]).
    pub(crate) fn with_transport(fd: Option<SharedFd>, transport: Transport) -> OutputStream {
        OutputStream {
            inner: Rc::new(Inner {
                fd,
                transport,
                handles: Cell::new(1),
                config: Cell::new(OutputStreamConfig::default()),
                state: RefCell::new(State::default()),
                stats: Cell::new(OutputStreamStats::default()),
            }),
        }
    }

    /// Changes the queue's bounds.
    pub fn set_config(&self, config: OutputStreamConfig) -> Result<()> {
        if config.max_pending_bytes == 0 || config.max_pending_writes == 0 {
            return Err(Error::invalid_input(
                "OutputStream bounds must be at least 1 byte and 1 write",
            ));
        }
        self.inner.config.set(config);
        Ok(())
    }

    /// The counters so far.
    pub fn stats(&self) -> OutputStreamStats {
        let state = self.inner.state.borrow();
        OutputStreamStats {
            writes: state.accepted_writes,
            bytes: state.accepted_bytes,
            ..self.inner.stats.get()
        }
    }

    /// Queues `buf` without a system call and returns a handle to await this write alone.
    ///
    /// Waits only when the queue is full (see [`OutputStreamConfig`]); it then sends what
    /// is queued and waits for room. Writes are sent by [`flush`](Self::flush), or when a
    /// handle is awaited. After a failure every later write fails with the same status;
    /// after the socket was closed, dropped or aborted on this side (or a timeout ended
    /// it), every write fails at once with why.
    pub async fn write(&self, buf: impl Into<Bytes>) -> Result<WriteHandle> {
        let buf = buf.into();
        self.wait_to_queue(buf.len()).await?;
        let mut state = self.inner.state.borrow_mut();
        Ok(self.inner.enqueue(&mut state, buf))
    }

    /// Queues a copy of `buf`, as [`write`](Self::write) queues a buffer: for small
    /// writes from borrowed memory. On a stream socket the copies of consecutive writes
    /// are gathered in one buffer the stream reuses, and leave as one piece: no
    /// allocation and no reference count per write, which a `Bytes` per write costs (at
    /// 64-byte writes, about a third of the sender's time). On a datagram socket each
    /// write is still its own datagram (a copy in a buffer of its own).
    pub async fn write_copy(&self, buf: &[u8]) -> Result<WriteHandle> {
        self.wait_to_queue(buf.len()).await?;
        let mut state = self.inner.state.borrow_mut();
        Ok(self.inner.enqueue_copy(&mut state, buf))
    }

    /// Checks that a write of `len` bytes can be queued, and waits for room.
    async fn wait_to_queue(&self, len: usize) -> Result<()> {
        let Some(fd) = &self.inner.fd else {
            return Err(Error::invalid_input("the socket is not connected"));
        };
        self.inner.on_its_runtime()?;
        // Closed, dropped, aborted or timed out on this side: said now, not at the
        // flush that would find the socket gone.
        if let Some(why) = fd.ended_why() {
            return Err(why);
        }
        if fd.is_write_shut() {
            return Err(Error::from_errno(
                "write: the sending side was shut down",
                libc::EPIPE,
            ));
        }
        self.inner.transport.check_write(len)?;
        poll_fn(|cx| self.poll_room(len, cx)).await;
        Ok(())
    }

    /// Queues `buf` if there is room, without waiting; gives it back when the queue is full
    /// (or, on a datagram socket, when `buf` is larger than one datagram can be, or when
    /// the socket was closed or its sending side shut down on this side: `write` says
    /// which, e.g. with status MessageTooLong).
    #[inline]
    pub fn try_write(&self, buf: impl Into<Bytes>) -> std::result::Result<WriteHandle, Bytes> {
        let buf = buf.into();
        let Some(mut state) = self.queue_now(buf.len()) else {
            return Err(buf);
        };
        Ok(self.inner.enqueue(&mut state, buf))
    }

    /// Queues a copy of `buf` if there is room, without waiting (see
    /// [`write_copy`](Self::write_copy)); `None` when it cannot be queued now: the queue
    /// is full, or (as `write_copy` says) the socket was closed on this side or `buf` is
    /// larger than one datagram can be.
    #[inline]
    pub fn try_write_copy(&self, buf: &[u8]) -> Option<WriteHandle> {
        let mut state = self.queue_now(buf.len())?;
        Some(self.inner.enqueue_copy(&mut state, buf))
    }

    /// The queue, when a write of `len` bytes may join it now.
    #[inline]
    fn queue_now(&self, len: usize) -> Option<std::cell::RefMut<'_, State>> {
        let usable = self
            .inner
            .fd
            .as_ref()
            .is_some_and(|fd| !fd.is_ended() && !fd.is_write_shut() && !fd.is_elsewhere());
        if !usable || self.inner.transport.check_write(len).is_err() {
            return None;
        }
        let config = self.inner.config.get();
        let state = self.inner.state.borrow_mut();
        state.has_room(len, &config).then_some(state)
    }

    /// For the poll-based write traits: queues a copy of `buf` and starts sending it at
    /// once (later copies join the batch while one is in flight); `Pending` while the
    /// queue is full. Fails with the stream's failure once it has one: a write accepted
    /// here reports its own error at the next call.
    #[cfg(any(feature = "tokio", feature = "futures-io"))]
    pub(crate) fn poll_write_copy(&self, buf: &[u8], cx: &mut Context<'_>) -> Poll<Result<usize>> {
        if self.inner.fd.is_none() {
            return Poll::Ready(Err(Error::invalid_input("the socket is not connected")));
        }
        self.inner.on_its_runtime()?;
        self.inner.transport.check_write(buf.len())?;
        if let Some((_, failure)) = &self.inner.state.borrow().failure {
            return Poll::Ready(Err(failure.to_error()));
        }
        if self.poll_room(buf.len(), cx).is_pending() {
            return Poll::Pending;
        }
        let mut state = self.inner.state.borrow_mut();
        if let Some((_, failure)) = &state.failure {
            return Poll::Ready(Err(failure.to_error()));
        }
        self.inner.enqueue_copy(&mut state, buf);
        state.flush_target = state.next;
        drop(state);
        self.inner.start_sender();
        Poll::Ready(Ok(buf.len()))
    }

    /// For the poll-based write traits: ready once every write queued so far has been
    /// given back by the kernel, with the first error among them.
    #[cfg(any(feature = "tokio", feature = "futures-io"))]
    pub(crate) fn poll_flushed(&self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.inner.on_its_runtime()?;
        let target = {
            let mut state = self.inner.state.borrow_mut();
            state.flush_target = state.flush_target.max(state.next);
            state.next
        };
        self.inner.start_sender();
        let mut state = self.inner.state.borrow_mut();
        if let Some((from, failure)) = &state.failure {
            if *from < target {
                return Poll::Ready(Err(failure.to_error()));
            }
        }
        if state.completed >= target {
            return Poll::Ready(Ok(()));
        }
        state.wait(cx);
        Poll::Pending
    }

    fn poll_room(&self, len: usize, cx: &mut Context<'_>) -> Poll<()> {
        let config = self.inner.config.get();
        let mut state = self.inner.state.borrow_mut();
        if state.has_room(len, &config) || state.failure.is_some() {
            return Poll::Ready(());
        }
        // Full: send what is queued so room comes back, then wait for it.
        state.flush_target = state.next;
        state.wait(cx);
        drop(state);
        self.inner.start_sender();
        Poll::Pending
    }
}

impl Inner {
    /// Queues `buf` behind every earlier write (or, on a broken stream, only numbers it:
    /// its handle reports the failure).
    #[inline]
    fn enqueue(self: &Rc<Self>, state: &mut State, buf: Bytes) -> WriteHandle {
        let seq = state.next;
        state.next += 1;
        if state.failure.is_none() {
            state.count_accepted(buf.len());
            state.seal_gathered();
            state.queue.push(buf);
            state.queue_writes.push(1);
        }
        WriteHandle {
            stream: self.clone(),
            seq,
        }
    }

    /// Queues a copy of `buf`: gathered with the copies before it on a byte stream, in
    /// a buffer of its own on a datagram socket (each write one datagram).
    #[inline]
    fn enqueue_copy(self: &Rc<Self>, state: &mut State, buf: &[u8]) -> WriteHandle {
        if matches!(self.transport, Transport::Datagram { .. }) {
            return self.enqueue(state, Bytes::copy_from_slice(buf));
        }
        let seq = state.next;
        state.next += 1;
        if state.failure.is_none() {
            state.count_accepted(buf.len());
            if state
                .gather_from
                .is_some_and(|at| state.queue_writes[at] == u32::MAX)
            {
                state.seal_gathered();
            }
            let at = match state.gather_from {
                Some(at) => at,
                None => {
                    state.queue.push(Bytes::new());
                    state.queue_writes.push(0);
                    *state.gather_from.insert(state.queue.len() - 1)
                }
            };
            state.queue_writes[at] += 1;
            state.gathered.extend_from_slice(buf);
        }
        WriteHandle {
            stream: self.clone(),
            seq,
        }
    }
}

impl State {
    #[inline]
    fn count_accepted(&mut self, len: usize) {
        self.pending_bytes += len;
        self.queued_bytes += len;
        self.accepted_writes += 1;
        self.accepted_bytes += len as u64;
    }
}

impl OutputStream {
    /// Sends every queued write in one submission and returns once the kernel has given
    /// back every write queued before this call (FlushAsync). Reports the first error;
    /// each write's handle reports its own. Returns at once when nothing is pending.
    ///
    /// On a stream socket whose previous batch is done, the flush makes that one
    /// submission itself, a nonblocking `sendmsg` of the queued writes (on io_uring when
    /// no other task is ready to run, else it joins their submission in the ring): a
    /// flush the kernel takes whole then costs one system call and no task switch, as a
    /// `writev` does. The rest of a send the kernel cuts short goes out from its exact
    /// byte as usual.
    ///
    /// On a stream socket with a
    /// [write timeout](super::StreamSocketControl::set_write_timeout), a flush the peer
    /// takes no bytes of for that long fails with `ConnectionTimedOut`, and so does the
    /// connection.
    pub async fn flush(&self) -> Result<()> {
        self.inner.on_its_runtime()?;
        let target = self.inner.state.borrow().next;
        self.inner.wait_for(target).await
    }

    /// Whether writes are queued or in flight on a stream that has not failed: what a
    /// flush would wait for.
    pub(crate) fn has_unsent(&self) -> bool {
        let state = self.inner.state.borrow();
        state.failure.is_none() && state.completed < state.next
    }

    /// Writes queued or in flight, not yet completed.
    pub fn pending_writes(&self) -> u64 {
        self.inner.state.borrow().in_flight_writes()
    }
}

impl Inner {
    /// Fails with `WrongRuntime` where the socket's runtime does not run. Every entry
    /// point asks before it queues or starts anything: the sender is a task of that
    /// runtime, and a call from elsewhere must leave the stream whole for it (a sender
    /// started elsewhere would fail the stream for good).
    fn on_its_runtime(&self) -> Result<()> {
        match &self.fd {
            Some(fd) => fd
                .binding()
                .map(drop)
                .map_err(|err| Error::io("write", err)),
            None => Ok(()),
        }
    }

    /// Resolves once every write numbered below `target` has a result: the first error
    /// among them, or Ok.
    async fn wait_for(self: &Rc<Self>, target: u64) -> Result<()> {
        {
            let mut state = self.state.borrow_mut();
            if state.flush_target < target {
                state.flush_target = target;
            }
        }
        self.send_now();
        self.start_sender();
        let flushed = poll_fn(|cx| {
            let mut state = self.state.borrow_mut();
            if target == 0 {
                return Poll::Ready(Ok(()));
            }
            if let Some((from, failure)) = &state.failure {
                if *from < target {
                    return Poll::Ready(Err(failure.to_error()));
                }
            }
            if state.completed >= target {
                return Poll::Ready(Ok(()));
            }
            state.wait(cx);
            Poll::Pending
        });
        crate::runtime::coop::budgeted(flushed).await
    }

    /// A flush that finds the sender idle sends the queue itself, in one nonblocking
    /// `sendmsg` (see `ops::send_stream_now`): no task is woken and no engine turn waited
    /// for, which is what a flush cost beyond `writev`. What the kernel does not take
    /// is left for the sender, from the exact byte it stopped at. On io_uring only when
    /// no other task runs in this round: otherwise the ring takes this batch together
    /// with what they queue, in one submission.
    fn send_now(self: &Rc<Self>) {
        let (Some(fd), Transport::Stream) = (&self.fd, &self.transport) else {
            return;
        };
        // A `write_all` sending straight to the kernel: this batch goes after it.
        if fd.is_direct_write() {
            return;
        }
        let mut state = self.state.borrow_mut();
        if matches!(state.sender, Sender::Running) || !state.has_work() || state.failure.is_some() {
            return;
        }
        // Streams flushed by the tasks still to run in this round share one submission
        // with this one; sending now would cost a system call more.
        if crate::runtime::ring_batches_this_round() {
            return;
        }
        state.seal_gathered();
        let Some(result) = ops::send_stream_now(fd, &state.queue) else {
            return;
        };
        let mut stats = self.stats.get();
        stats.kernel_operations += 1;
        match result {
            Ok(sent) => {
                state.take_sent(sent);
                if state.queue.is_empty() {
                    stats.batches += 1;
                } else {
                    // The sender goes on from where this send stopped.
                    stats.short_send_recoveries += 1;
                }
            }
            Err(err) => {
                stats.batches += 1;
                state.fail(err);
                // A parked sender has nothing left to do: it ends when woken.
                if let Sender::Parked(waker) = std::mem::take(&mut state.sender) {
                    state.sender_epoch += 1;
                    drop(state);
                    waker.wake();
                }
            }
        }
        self.stats.set(stats);
    }

    /// Gets the sender task going when something needs sending: wakes it where it
    /// waits, or starts it where none runs.
    fn start_sender(self: &Rc<Self>) {
        let mut state = self.state.borrow_mut();
        if !state.has_work() {
            return;
        }
        match std::mem::replace(&mut state.sender, Sender::Running) {
            Sender::Running => {}
            Sender::Parked(waker) => {
                drop(state);
                waker.wake();
            }
            // Only on the socket's own runtime (a write handle awaited elsewhere gets here).
            Sender::Absent if self.on_its_runtime().is_err() => state.sender = Sender::Absent,
            Sender::Absent => {
                state.sender_epoch += 1;
                let epoch = state.sender_epoch;
                drop(state);
                let inner = self.clone();
                crate::runtime::spawn(run_sender(inner, epoch));
            }
        }
    }

    /// The parked sender of `epoch` looks for work: the stream (strongly held again) once
    /// there is a batch; `None` once the task should end (the stream is gone, no
    /// OutputStream is left to queue more, or another task took over).
    fn poll_parked(
        stream: &Weak<Inner>,
        epoch: u64,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Rc<Inner>>> {
        let Some(inner) = stream.upgrade() else {
            return Poll::Ready(None);
        };
        let mut state = inner.state.borrow_mut();
        if state.sender_epoch != epoch {
            return Poll::Ready(None);
        }
        if state.has_work() {
            state.sender = Sender::Running;
            drop(state);
            return Poll::Ready(Some(inner));
        }
        if inner.handles.get() == 0 {
            state.sender = Sender::Absent;
            return Poll::Ready(None);
        }
        state.sender = Sender::Parked(cx.waker().clone());
        Poll::Pending
    }

    /// Sends the queued writes somebody waits for as one batch. False when the stream
    /// broke (every write from the failure on fails; the sender ends).
    async fn send_next_batch(&self) -> bool {
        let Some(fd) = self.fd.clone() else {
            self.state.borrow_mut().sender = Sender::Absent;
            return false;
        };
        // Bytes queued while a `write` or `write_all` sends straight to the kernel go out
        // after it, not in the middle of its bytes.
        poll_fn(|cx| fd.poll_no_direct_write(cx)).await;
        let (batch, mut batch_writes, batch_bytes, first_seq) = {
            let mut state = self.state.borrow_mut();
            state.seal_gathered();
            let first_seq = state.queued_from;
            // The next batch fills the last one's vectors: no regrowth per batch.
            let spare = std::mem::take(&mut state.spare);
            let batch = std::mem::replace(&mut state.queue, spare);
            let spare_writes = std::mem::take(&mut state.spare_writes);
            let batch_writes = std::mem::replace(&mut state.queue_writes, spare_writes);
            state.queued_from = state.next;
            let bytes = std::mem::take(&mut state.queued_bytes);
            (batch, batch_writes, bytes, first_seq)
        };
        let count: u64 = batch_writes.iter().map(|&n| u64::from(n)).sum();
        let mut report = BatchReport::default();
        let (result, progress, mut bufs) = self
            .transport
            .send_batch(&fd, batch, batch_bytes, &mut report)
            .await;
        bufs.clear();

        let mut stats = self.stats.get();
        stats.batches += 1;
        stats.kernel_operations += report.operations;
        stats.short_send_recoveries += report.short_send_recoveries;
        self.stats.set(stats);

        let mut state = self.state.borrow_mut();
        state.spare = bufs;
        // Sent or failed, the batch is no longer pending.
        state.pending_bytes = state.pending_bytes.saturating_sub(batch_bytes);
        state.completed = first_seq
            + batch_writes[..progress.first.min(batch_writes.len())]
                .iter()
                .map(|&n| u64::from(n))
                .sum::<u64>();
        batch_writes.clear();
        state.spare_writes = batch_writes;
        if let Err(err) = result {
            state.fail(err);
            state.sender = Sender::Absent;
            return false;
        }
        debug_assert_eq!(state.completed, first_seq + count);
        state.wake_all();
        true
    }
}

/// The sender task of a stream: sends batch after batch while there is work, holding
/// the stream; between flushes it waits holding it only weakly, so that an idle sender
/// keeps neither the stream nor its socket open. It ends when the stream goes, when no
/// OutputStream is left to queue more, or when the stream breaks.
async fn run_sender(first: Rc<Inner>, epoch: u64) {
    let stream = Rc::downgrade(&first);
    let mut working = Some(first);
    loop {
        let inner = match working.take() {
            Some(inner) => inner,
            None => match poll_fn(|cx| Inner::poll_parked(&stream, epoch, cx)).await {
                Some(inner) => inner,
                None => return,
            },
        };
        if !inner.send_next_batch().await {
            return;
        }
        // More queued meanwhile: go on without letting go of the stream, whose last
        // handle may have gone while it was sent.
        let mut state = inner.state.borrow_mut();
        if state.sender_epoch != epoch {
            return;
        }
        if state.has_work() {
            drop(state);
            working = Some(inner);
        } else {
            // Looked at again in `poll_parked`, which also parks.
            state.sender = Sender::Running;
        }
    }
}

impl Inner {
    /// One OutputStream went away. The last one going must not lose queued writes: send
    /// them on, the way a closed socket still delivers what is in its send buffer.
    #[inline]
    fn release_handle(self: &Rc<Self>) {
        let left = self.handles.get() - 1;
        self.handles.set(left);
        if left == 0 {
            self.send_the_rest();
        }
    }

    #[cold]
    fn send_the_rest(self: &Rc<Self>) {
        let parked = {
            let mut state = self.state.borrow_mut();
            state.flush_target = state.next;
            match std::mem::replace(&mut state.sender, Sender::Absent) {
                Sender::Parked(waker) => {
                    // A parked sender holds the stream only weakly and could find it
                    // gone: it ends, and the rest goes with a task that holds it.
                    state.sender_epoch += 1;
                    Some(waker)
                }
                Sender::Running => {
                    // A sender at work holds the stream and sends the rest itself.
                    state.sender = Sender::Running;
                    None
                }
                Sender::Absent => None,
            }
        };
        if let Some(waker) = parked {
            waker.wake();
        }
        if crate::runtime::current_driver_kind().is_some() {
            self.start_sender();
        }
    }
}

impl Drop for Inner {
    /// A parked sender ends once the stream is gone (it would wait for nothing).
    fn drop(&mut self) {
        if let Sender::Parked(waker) = std::mem::take(&mut self.state.borrow_mut().sender) {
            waker.wake();
        }
    }
}

impl Clone for OutputStream {
    fn clone(&self) -> OutputStream {
        self.inner.handles.set(self.inner.handles.get() + 1);
        OutputStream {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        self.inner.release_handle();
    }
}

/// One queued write: await it for that write's own result (Windows.Networking.Sockets'
/// Task.WaitAll pattern). Awaiting sends the queue up to this write if no flush has yet.
///
/// Dropping a handle changes nothing: the write stays queued (and is sent when the
/// last OutputStream of the stream goes, if nothing sent it before).
pub struct WriteHandle {
    stream: Rc<Inner>,
    seq: u64,
}

impl WriteHandle {
    /// The write's result if it is already known.
    pub fn result(&self) -> Option<Result<()>> {
        self.stream.state.borrow().result_of(self.seq)
    }
}

impl std::fmt::Debug for WriteHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteHandle")
            .field("write", &self.seq)
            .field("result", &self.result())
            .finish()
    }
}

impl Future for WriteHandle {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let seq = self.seq;
        let stream = &self.stream;
        {
            let mut state = stream.state.borrow_mut();
            if let Some(result) = state.result_of(seq) {
                return Poll::Ready(result);
            }
            // Its sender runs only where the socket's runtime does: waiting elsewhere
            // would wait for good.
            stream.on_its_runtime()?;
            if state.flush_target <= seq {
                state.flush_target = seq + 1;
            }
            state.wait(cx);
        }
        stream.start_sender();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(lens: &[usize]) -> State {
        let mut state = State::default();
        for (i, &len) in lens.iter().enumerate() {
            let buf = Bytes::from(vec![i as u8; len]);
            state.pending_bytes += len;
            state.queued_bytes += len;
            state.queue.push(buf);
            state.queue_writes.push(1);
            state.next += 1;
        }
        state
    }

    #[test]
    fn a_send_taken_whole_completes_every_write_and_empties_the_queue() {
        let mut state = queued(&[3, 0, 5]);
        state.take_sent(8);
        assert!(state.queue.is_empty());
        assert_eq!((state.completed, state.queued_from), (3, 3));
        assert_eq!((state.queued_bytes, state.pending_bytes), (0, 0));
    }

    #[test]
    fn a_short_send_completes_the_writes_it_finished_and_keeps_the_rest_of_the_one_it_cut() {
        let mut state = queued(&[3, 0, 5, 2]);
        state.take_sent(4);
        // The 3-byte and the empty write are done; one byte of the 5-byte write went.
        assert_eq!((state.completed, state.queued_from), (2, 2));
        assert_eq!(state.queue.len(), 2);
        assert_eq!(&state.queue[0][..], &[2u8; 4]);
        assert_eq!(&state.queue[1][..], &[3u8; 2]);
        assert_eq!((state.queued_bytes, state.pending_bytes), (6, 6));
        assert!(matches!(state.result_of(1), Some(Ok(()))));
        assert!(state.result_of(2).is_none());
    }

    /// Gathers copies of `lens`-sized writes (write `i` filled with byte `i`) the way
    /// `enqueue_copy` does.
    fn gather(state: &mut State, lens: &[usize]) {
        for &len in lens {
            let byte = state.next as u8;
            state.pending_bytes += len;
            state.queued_bytes += len;
            if state.gather_from.is_none() {
                state.gather_from = Some(state.queue.len());
                state.queue.push(Bytes::new());
                state.queue_writes.push(0);
            }
            state.queue_writes[state.gather_from.unwrap()] += 1;
            state.gathered.extend_from_slice(&vec![byte; len]);
            state.next += 1;
        }
    }

    #[test]
    fn gathered_copies_complete_together_once_their_last_byte_is_sent() {
        let mut state = queued(&[2]);
        gather(&mut state, &[3, 1, 4]);
        state.seal_gathered();
        // One entry for the run, after the write before it, holding three writes.
        assert_eq!(state.queue.len(), 2);
        assert_eq!(&state.queue[1][..], &[1, 1, 1, 2, 3, 3, 3, 3]);
        assert_eq!(state.queue_writes, [1, 3]);
        // A send that stops inside the run completes none of its writes...
        state.take_sent(2 + 5);
        assert_eq!(state.completed, 1);
        assert!(state.result_of(2).is_none());
        assert_eq!(&state.queue[0][..], &[3, 3, 3]);
        // ...and its end completes all of them.
        state.take_sent(3);
        assert_eq!((state.completed, state.queued_from), (4, 4));
        assert!(state.queue.is_empty());
        assert_eq!((state.queued_bytes, state.pending_bytes), (0, 0));
        // The next run starts afresh, in the same memory once the last run is gone.
        gather(&mut state, &[2]);
        state.seal_gathered();
        assert_eq!(&state.queue[..], &[Bytes::from(vec![4u8; 2])]);
    }

    #[test]
    fn a_broken_stream_forgets_the_copies_it_gathered() {
        let mut state = State::default();
        gather(&mut state, &[5, 5]);
        state.fail(std::io::Error::from_raw_os_error(libc::EPIPE));
        assert!(state.queue.is_empty() && state.queue_writes.is_empty());
        assert!(state.gathered.is_empty());
        assert_eq!(state.gather_from, None);
        assert!(matches!(state.result_of(1), Some(Err(_))));
    }

    #[test]
    fn a_send_that_ends_on_a_write_boundary_leaves_the_next_write_whole() {
        let mut state = queued(&[4, 4]);
        state.take_sent(4);
        assert_eq!(state.completed, 1);
        assert_eq!(&state.queue[..], &[Bytes::from(vec![1u8; 4])]);
    }
}
