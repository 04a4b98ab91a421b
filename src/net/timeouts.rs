//! The timeouts of a stream socket: their settings, the counts of those that expired,
//! and the watchdog that ends idle connections and stalled writes.
//!
//! Idle and write timeouts end the whole connection, so they need no operation of their
//! own: a watchdog task reads the socket's traffic clock (kept by the stream operations),
//! and when a limit passes it ends the connection ([`expire`]). A read timeout concerns
//! one read and leaves the socket usable, so it is given to that read
//! ([`recv_within`]).

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use super::ending;
use crate::buf::{BufResult, IoBufMut};
use crate::driver::{ops, SharedFd, WeakFd};
use crate::runtime::{self, JoinHandle};
use crate::{Error, Result};

/// How long a dropped stream socket may go on delivering what it had queued before it
/// is aborted (see [`StreamSocketControl::set_linger_timeout`](super::StreamSocketControl::set_linger_timeout)).
pub const DEFAULT_LINGER_TIMEOUT: Duration = Duration::from_secs(5);

/// How many timeouts expired, by kind: on one socket, or, read on a listener's
/// [`control`](super::StreamSocketListener::control), on every socket it accepted.
///
/// Every expiry is also an error with status
/// [`ConnectionTimedOut`](crate::SocketErrorStatus::ConnectionTimedOut) on the call
/// that was waiting, if one was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeoutCounts {
    /// Connection attempts that got no answer in time.
    pub connect: u64,
    /// Connections closed after no bytes went either way for the idle timeout.
    pub idle: u64,
    /// Reads that got nothing in time (the socket stays usable).
    pub read: u64,
    /// Connections closed because a write made no progress for the write timeout.
    pub write: u64,
    /// TLS handshakes not finished in time (the connection is closed).
    pub handshake: u64,
    /// Closes (an explicit `close`, or a dropped socket's linger) that could not
    /// deliver everything in time and aborted the connection.
    pub close: u64,
}

impl TimeoutCounts {
    /// All kinds together.
    pub fn total(&self) -> u64 {
        self.connect + self.idle + self.read + self.write + self.handshake + self.close
    }
}

/// Which timeout expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeoutKind {
    Connect,
    Idle,
    Read,
    Write,
    Handshake,
    Close,
}

/// The timeouts of one socket (or a listener's, for the sockets it accepts), and the
/// counts of those that expired.
pub(crate) struct Timeouts {
    pub(crate) connect: Cell<Option<Duration>>,
    pub(crate) idle: Cell<Option<Duration>>,
    pub(crate) read: Cell<Option<Duration>>,
    pub(crate) write: Cell<Option<Duration>>,
    /// For a TLS handshake this socket starts; `None`: the acceptor's, or never.
    pub(crate) handshake: Cell<Option<Duration>>,
    pub(crate) linger: Cell<Duration>,
    /// Shared by a listener with every socket it accepted.
    counts: Rc<Cell<TimeoutCounts>>,
    /// Ends idle connections and stalled writes, while one of those limits is set.
    watchdog: RefCell<Option<JoinHandle<()>>>,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Cell::new(None),
            idle: Cell::new(None),
            read: Cell::new(None),
            write: Cell::new(None),
            handshake: Cell::new(None),
            linger: Cell::new(DEFAULT_LINGER_TIMEOUT),
            counts: Rc::default(),
            watchdog: RefCell::new(None),
        }
    }
}

impl Timeouts {
    /// The settings for a socket a listener accepted: a copy of the listener's, counting
    /// into the listener's counts.
    pub(crate) fn for_accepted(&self) -> Timeouts {
        Timeouts {
            connect: self.connect.clone(),
            idle: self.idle.clone(),
            read: self.read.clone(),
            write: self.write.clone(),
            handshake: self.handshake.clone(),
            linger: self.linger.clone(),
            counts: self.counts.clone(),
            watchdog: RefCell::new(None),
        }
    }

    pub(crate) fn counts(&self) -> TimeoutCounts {
        self.counts.get()
    }

    pub(crate) fn count(&self, kind: TimeoutKind) {
        let mut counts = self.counts.get();
        let counter = match kind {
            TimeoutKind::Connect => &mut counts.connect,
            TimeoutKind::Idle => &mut counts.idle,
            TimeoutKind::Read => &mut counts.read,
            TimeoutKind::Write => &mut counts.write,
            TimeoutKind::Handshake => &mut counts.handshake,
            TimeoutKind::Close => &mut counts.close,
        };
        *counter += 1;
        self.counts.set(counts);
    }

    /// Watches `fd` for the idle and write timeouts if either is set: starts the
    /// watchdog, or tells the running one that the limits changed. Needs the socket's
    /// runtime to be running (the caller checked).
    pub(crate) fn watch(self: &Rc<Self>, fd: &SharedFd) {
        if self.idle.get().is_none() && self.write.get().is_none() {
            // A running watchdog finds nothing to watch and ends.
            fd.activity().poke();
            return;
        }
        fd.activity().track(self.write.get());
        let mut watchdog = self.watchdog.borrow_mut();
        if watchdog
            .as_ref()
            .is_some_and(|running| !running.is_finished())
        {
            fd.activity().poke();
            return;
        }
        let (timeouts, fd) = (Rc::downgrade(self), fd.downgrade());
        *watchdog = Some(runtime::spawn(watchdog_task(timeouts, fd)));
    }

    /// Stops the watchdog (the socket is closing).
    pub(crate) fn stop_watching(&self) {
        if let Some(watchdog) = self.watchdog.borrow_mut().take() {
            watchdog.abort();
        }
    }

    /// The next idle or write deadline of `fd`, with its kind and limit; `None` when
    /// neither limit applies now.
    fn next_deadline(&self, fd: &SharedFd) -> Option<(Instant, TimeoutKind, Duration)> {
        let activity = fd.activity();
        let idle = self
            .idle
            .get()
            .and_then(|limit| Some((activity.last_traffic().checked_add(limit)?, limit)))
            .map(|(at, limit)| (at, TimeoutKind::Idle, limit));
        let write = self.write.get().and_then(|limit| {
            let at = activity.write_stalled_since()?.checked_add(limit)?;
            Some((at, TimeoutKind::Write, limit))
        });
        match (idle, write) {
            (Some(idle), Some(write)) => Some(if write.0 <= idle.0 { write } else { idle }),
            (one, other) => one.or(other),
        }
    }
}

impl Drop for Timeouts {
    fn drop(&mut self) {
        self.stop_watching();
    }
}

/// The watchdog: sleeps until the next idle or write deadline (or until a write starts
/// or the limits change), and ends the connection when one has passed. Holds neither
/// the socket nor its settings, so it never keeps a connection open.
async fn watchdog_task(timeouts: Weak<Timeouts>, fd: WeakFd) {
    loop {
        let deadline = {
            let (Some(timeouts), Some(fd)) = (timeouts.upgrade(), fd.upgrade()) else {
                return;
            };
            if fd.ended().is_some()
                || (timeouts.idle.get().is_none() && timeouts.write.get().is_none())
            {
                return;
            }
            match timeouts.next_deadline(&fd) {
                Some((at, kind, limit)) if at <= Instant::now() => {
                    expire(&fd, &timeouts, kind, limit);
                    return;
                }
                Some((at, _, _)) => Some(at),
                // Only a write timeout, and no write in flight: wait for one.
                None => None,
            }
        };
        let mut sleep = deadline.map(runtime::sleep_until_lenient);
        let mut armed = false;
        poll_fn(|cx| {
            if armed {
                // Woken: the deadline came, a write started, or the limits changed.
                return Poll::Ready(());
            }
            armed = true;
            let Some(fd) = fd.upgrade() else {
                return Poll::Ready(());
            };
            fd.activity().watch_with(cx.waker(), deadline);
            match sleep.as_mut() {
                Some(sleep) => Pin::new(sleep).poll(cx),
                None => Poll::Pending,
            }
        })
        .await;
    }
}

/// Ends the connection because its `kind` timeout of `limit` expired: every operation
/// waiting on it fails with ConnectionTimedOut, the peer is told (see
/// [`ending::shut_now`]), and the expiry is counted.
pub(crate) fn expire(fd: &SharedFd, timeouts: &Timeouts, kind: TimeoutKind, limit: Duration) {
    let why = match kind {
        TimeoutKind::Idle => format!("idle timeout: no bytes either way for {limit:?}"),
        TimeoutKind::Write => format!("write timeout: the peer took no bytes for {limit:?}"),
        TimeoutKind::Handshake => format!("TLS handshake not finished within {limit:?}"),
        other => format!("{other:?} timeout of {limit:?}"),
    };
    if fd.end(Error::timed_out(why)) {
        timeouts.count(kind);
        ending::shut_now(fd);
    }
}

/// Reads once into the spare capacity of `buf`, within the socket's read timeout if it
/// has one. A read that times out fails with ConnectionTimedOut and loses nothing: the
/// receive is cancelled and its final completion awaited, so bytes that arrived
/// meanwhile are returned instead; the socket stays usable.
pub(crate) async fn recv_within<B: IoBufMut>(
    fd: &SharedFd,
    buf: B,
    timeouts: &Timeouts,
) -> BufResult<usize, B> {
    let Some(limit) = timeouts.read.get() else {
        let (result, buf) = ops::recv(fd, buf).await;
        return (result.map_err(|err| Error::io("read", err)), buf);
    };
    let mut sleep = runtime::sleep_lenient(limit);
    let mut expired = false;
    let (result, buf) = ops::recv_until(fd, buf, |cx| {
        if Pin::new(&mut sleep).poll(cx).is_pending() {
            return None;
        }
        expired = true;
        Some(io::Error::from(read_timed_out(limit)))
    })
    .await;
    if expired && result.is_err() && fd.ended().is_none() {
        timeouts.count(TimeoutKind::Read);
    }
    (result.map_err(|err| Error::io("read", err)), buf)
}

/// Runs a TLS read (whose receive lives in a task of its own, so giving up on it loses
/// nothing) within the socket's read timeout.
pub(crate) async fn within_read_timeout<T>(
    timeouts: &Timeouts,
    read: impl Future<Output = Result<T>>,
) -> Result<T> {
    let Some(limit) = timeouts.read.get() else {
        return read.await;
    };
    match runtime::timeout_lenient(limit, read).await {
        Ok(done) => done,
        Err(_) => {
            timeouts.count(TimeoutKind::Read);
            Err(read_timed_out(limit))
        }
    }
}

fn read_timed_out(limit: Duration) -> Error {
    Error::timed_out(format!("read: nothing arrived within {limit:?}"))
}

/// Checks a timeout given to a setter: `None` is never, zero is refused.
pub(crate) fn check_limit(what: &str, limit: Option<Duration>) -> Result<()> {
    if limit.is_some_and(|limit| limit.is_zero()) {
        return Err(Error::invalid_input(format!(
            "the {what} must be longer than zero (None means never)"
        )));
    }
    Ok(())
}
