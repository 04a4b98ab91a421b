//! Many datagram sockets received in one loop: a relay with a socket per flow takes
//! what every socket's receive ring holds in one call, polling only the sockets that
//! were woken since the last one.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::poll_fn;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use super::datagram::{Datagram, DatagramSocket};
use super::turn::Turnstile;
use crate::driver::current;
use crate::driver::ops_datagram::{AfterRecv, RecvDatagram};
use crate::runtime::coop;
use crate::{Error, Result};

/// Datagram sockets received together: one call takes the datagrams every socket has
/// ready, each tagged with its socket's index, and waits for the first when none has.
///
/// The group owns its sockets: a socket in a group receives only through it (its own
/// `recv`, `recv_batch` and `messages` fail with InvalidArgument), so no receive of
/// another task can take the wake-ups the group waits for. Sending goes on as before,
/// through [`socket`](Self::socket). [`into_sockets`](Self::into_sockets) gives them back.
///
/// One call costs one poll of each socket that was woken, not of every socket: with a
/// socket per flow, a datagram on one flow of 64 costs one socket's receive, and the
/// datagrams of all flows that arrived together come back together.
///
/// ```no_run
/// use ringsock::{DatagramGroup, DatagramSocket, Runtime};
///
/// Runtime::new()?.block_on(async {
///     let mut sockets = Vec::new();
///     for _ in 0..4 {
///         let socket = DatagramSocket::new();
///         socket.bind_addr("127.0.0.1:0".parse().unwrap())?;
///         sockets.push(socket);
///     }
///     let group = DatagramGroup::new(sockets);
///     let mut received = Vec::new();
///     loop {
///         group.recv_batch(&mut received, 64).await?;
///         for (index, datagram) in received.drain(..) {
///             let from = datagram.remote_addr();
///             group.socket(index).send_to_addr(datagram.into_forward(), from).await.0?;
///         }
///     }
///     # Ok::<_, ringsock::Error>(())
/// })?;
/// # Ok::<_, ringsock::Error>(())
/// ```
pub struct DatagramGroup {
    sockets: Vec<DatagramSocket>,
    /// Per socket, the waker its receive ring wakes: it marks the socket ready and
    /// wakes the task waiting on the group.
    wakers: Vec<Waker>,
    ready: Arc<ReadySet>,
    /// A receive error kept for the next call, when datagrams of other sockets were
    /// already taken in the call that met it.
    deferred: RefCell<Option<Error>>,
    /// Scratch for one socket's datagrams, kept between calls.
    scratch: RefCell<Vec<RecvDatagram>>,
    /// One call at a time waits on the sockets (a second task's call would take the
    /// one waker slot from the first); the others wait here in turn.
    turn: Turnstile,
    /// The runtime of the last call (`current::current_raw`): a call under another one
    /// polls every socket, so each says WrongRuntime rather than the call waiting for
    /// wake-ups that go to the other runtime.
    last_runtime: Cell<u64>,
    /// The socket a call polls first: the one after the last that gave datagrams or an
    /// error. From a fixed first socket, one that fills every call (a flood, with a small
    /// `max`) or fails every call (unbound, detached) would leave the others unpolled.
    next: Cell<usize>,
}

/// Which sockets were woken, one bit each, and the task to tell.
struct ReadySet {
    bits: Box<[AtomicU64]>,
    waiting: Mutex<Option<Waker>>,
    /// The waiting task was woken since its call last looked at the bits: the wakes of
    /// the other sockets that completed in the same turn need not wake it again.
    notified: AtomicBool,
}

impl ReadySet {
    fn mark(&self, index: usize) {
        self.bits[index / 64].fetch_or(1 << (index % 64), Ordering::SeqCst);
    }

    /// Marks `index` and wakes the waiting task, unless a wake since its last look at
    /// the bits already did: that look comes, and finds this bit too.
    fn mark_and_wake(&self, index: usize) {
        self.mark(index);
        // SeqCst with the look's `looking` and its swaps of the bits: either the look
        // takes this bit, or this swap follows the look's reset and wakes.
        // A load first: when the task was already woken (most sockets of a busy turn)
        // it costs no locked instruction; a `true` it reads was stored after the last
        // reset, so the look to come takes this bit.
        if !self.notified.load(Ordering::SeqCst) && !self.notified.swap(true, Ordering::SeqCst) {
            self.wake_waiting();
        }
    }

    /// Called by a look before it takes the bits: the wakes after it wake the task.
    fn looking(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }

    fn mark_all(&self, sockets: usize) {
        for index in 0..sockets {
            self.mark(index);
        }
    }

    fn wake_waiting(&self) {
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(waker) = waiting.as_ref() {
            waker.wake_by_ref();
        }
    }

    fn register(&self, waker: &Waker) {
        let mut waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !waiting.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *waiting = Some(waker.clone());
        }
    }
}

/// The waker of one socket in the group.
struct SocketWaker {
    index: usize,
    ready: Arc<ReadySet>,
}

impl Wake for SocketWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.mark_and_wake(self.index);
    }
}

impl DatagramGroup {
    /// A group of `sockets`, each bound or connected (a socket that is not fails the
    /// first receive with InvalidArgument). Its index in `sockets` names it in every
    /// datagram received.
    pub fn new(sockets: Vec<DatagramSocket>) -> DatagramGroup {
        let ready = Arc::new(ReadySet {
            bits: (0..sockets.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            waiting: Mutex::new(None),
            notified: AtomicBool::new(false),
        });
        // Every socket starts ready: the first call sets up each receive ring.
        ready.mark_all(sockets.len());
        let wakers = (0..sockets.len())
            .map(|index| {
                Waker::from(Arc::new(SocketWaker {
                    index,
                    ready: ready.clone(),
                }))
            })
            .collect();
        for socket in &sockets {
            socket.set_grouped(true);
        }
        DatagramGroup {
            sockets,
            wakers,
            ready,
            deferred: RefCell::new(None),
            scratch: RefCell::new(Vec::new()),
            turn: Turnstile::default(),
            last_runtime: Cell::new(0),
            next: Cell::new(0),
        }
    }

    /// How many sockets the group has.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether the group has no socket (its receive would wait forever, so it fails).
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Socket `index`, for sending, its options and its statistics.
    ///
    /// # Panics
    ///
    /// When `index` is not below [`len`](Self::len).
    pub fn socket(&self, index: usize) -> &DatagramSocket {
        &self.sockets[index]
    }

    /// Every socket, in order.
    pub fn sockets(&self) -> &[DatagramSocket] {
        &self.sockets
    }

    /// The sockets, back on their own: each receives through its own calls again.
    pub fn into_sockets(self) -> Vec<DatagramSocket> {
        let sockets = std::mem::take(&mut { self }.sockets);
        for socket in &sockets {
            socket.set_grouped(false);
        }
        sockets
    }

    /// Waits until a socket of the group has a datagram, then appends what the woken
    /// sockets hold, up to `max` in all, to `out` as (socket index, datagram) and
    /// returns how many. A `max` of 0, or an empty group, is an InvalidArgument error.
    ///
    /// A receive error of one socket (such as an ICMP port unreachable on a connected
    /// socket) is returned as the error of the call; if datagrams of other sockets were
    /// already taken, they come back first and the error with the next call. The group
    /// goes on receiving after it.
    ///
    /// Each call starts with the socket after the last one that gave datagrams or an
    /// error, so a socket that fills every call, or fails every call, cannot keep the
    /// others waiting. Calls from several tasks take turns. Dropping the future loses nothing: datagrams are moved to `out` only by the poll
    /// that returns them, so a loop may race this call against its sends in flight.
    pub async fn recv_batch(&self, out: &mut Vec<(usize, Datagram)>, max: usize) -> Result<usize> {
        if max == 0 {
            return Err(Error::invalid_input(
                "recv_batch with max 0: it takes at least one datagram",
            ));
        }
        if self.sockets.is_empty() {
            return Err(Error::invalid_input(
                "recv_batch on an empty DatagramGroup would wait forever",
            ));
        }
        let _turn = self.turn.take().await;
        let runtime = current::current_raw();
        if self.last_runtime.replace(runtime) != runtime {
            self.ready.mark_all(self.sockets.len());
        }
        // The error an earlier call deferred is taken only by a poll the budget lets
        // through: a future dropped while it waits for its turn leaves it in place.
        coop::budgeted(poll_fn(|cx| {
            let deferred = self.deferred.borrow_mut().take();
            match deferred {
                Some(err) => Poll::Ready(Err(err)),
                None => self.poll_ready_sockets(cx, out, max),
            }
        }))
        .await
    }

    fn poll_ready_sockets(
        &self,
        cx: &mut Context<'_>,
        out: &mut Vec<(usize, Datagram)>,
        max: usize,
    ) -> Poll<Result<usize>> {
        // Registered before the bits are read: a wake between the two is not lost.
        self.ready.register(cx.waker());
        self.ready.looking();
        let mut taken = 0;
        let first = out.len();
        let mut scratch = self.scratch.borrow_mut();
        let words = self.ready.bits.len();
        let start = self.next.get() % self.sockets.len();
        // Word by word from `start`'s, round to it again for the bits before `start`.
        for step in 0..=words {
            let word_index = (start / 64 + step) % words;
            let word = &self.ready.bits[word_index];
            let mask = match step {
                0 => !0u64 << (start % 64),
                _ if step == words => (1u64 << (start % 64)) - 1,
                _ => !0,
            };
            let mut bits = word.fetch_and(!mask, Ordering::SeqCst) & mask;
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let index = word_index * 64 + bit;
                if taken == max {
                    // Not polled this time: still ready for the next call.
                    self.ready.mark(index);
                    continue;
                }
                let mut socket_cx = Context::from_waker(&self.wakers[index]);
                // Until the socket says it keeps the waker that marks it ready again
                // (Pending, or datagrams with `Waiting`): a receive that returned
                // datagrams otherwise may keep none.
                loop {
                    if taken == max {
                        self.ready.mark(index);
                        break;
                    }
                    scratch.clear();
                    // AssertUnwindSafe: a panic leaves nothing of the group half-changed
                    // once the ready bits it took are put back below.
                    let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        self.sockets[index].poll_recv_grouped(
                            &mut socket_cx,
                            &mut scratch,
                            max - taken,
                        )
                    }));
                    let polled = match polled {
                        Ok(polled) => polled,
                        Err(panic) => {
                            // A socket's forwarding rule panicked: the panic goes on, and
                            // that socket and those not yet polled stay ready, since
                            // their wakes are spent.
                            self.ready.mark(index);
                            word.fetch_or(bits, Ordering::AcqRel);
                            // What this call took goes back to its sockets, first for
                            // the next call: the caller's list unwinds with the panic.
                            for (taken_from, datagram) in out.drain(first..).rev() {
                                self.sockets[taken_from].put_back(datagram);
                                self.ready.mark(taken_from);
                            }
                            std::panic::resume_unwind(panic);
                        }
                    };
                    match polled {
                        Poll::Pending => break,
                        Poll::Ready(Ok(after)) => {
                            self.next.set(index + 1);
                            taken += scratch.len();
                            out.extend(scratch.drain(..).map(|d| (index, Datagram::from(d))));
                            // The poll that would only say Pending was most of a lone
                            // datagram's receive work with a socket per flow.
                            if after == AfterRecv::Waiting {
                                break;
                            }
                        }
                        Poll::Ready(Err(err)) => {
                            self.next.set(index + 1);
                            // Polled again next time: the socket goes on after an error.
                            self.ready.mark(index);
                            // The sockets not yet polled stay ready.
                            word.fetch_or(bits, Ordering::AcqRel);
                            if taken == 0 {
                                return Poll::Ready(Err(err));
                            }
                            self.deferred.borrow_mut().get_or_insert(err);
                            return Poll::Ready(Ok(taken));
                        }
                    }
                }
            }
        }
        if taken == 0 {
            Poll::Pending
        } else {
            Poll::Ready(Ok(taken))
        }
    }
}

impl Drop for DatagramGroup {
    fn drop(&mut self) {
        for socket in &self.sockets {
            socket.set_grouped(false);
        }
    }
}

impl fmt::Debug for DatagramGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramGroup")
            .field("sockets", &self.sockets.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn ready_set(sockets: usize) -> ReadySet {
        ReadySet {
            bits: (0..sockets.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            waiting: Mutex::new(None),
            notified: AtomicBool::new(false),
        }
    }

    #[test]
    fn sockets_woken_before_the_next_look_wake_the_task_once() {
        let ready = ready_set(130);
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        ready.register(&Waker::from(counter.clone()));
        ready.looking();
        for index in [0, 64, 129] {
            ready.mark_and_wake(index);
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        // Every socket is marked, even those whose wake did not reach the task.
        let marked: Vec<u64> = ready
            .bits
            .iter()
            .map(|w| w.load(Ordering::SeqCst))
            .collect();
        assert_eq!(marked, vec![1, 1, 2]);
        // After the look, the next socket's wake reaches the task again.
        ready.looking();
        ready.mark_and_wake(5);
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    }
}
