//! How a stream connection ends: a graceful close done in user space and bounded by a
//! timeout, or an abort.
//!
//! A graceful close sends what is queued (the output streams, a TLS `close_notify`),
//! shuts the sending side down, then reads and discards until every byte it sent, and
//! its FIN, are acknowledged (`SIOCOUTQ` reaches 0) — reading so that a peer blocked
//! sending to us is not stuck and never reads what we sent. Past the timeout it aborts.
//! SO_LINGER with a time is never used: its `close` blocks the thread.
//!
//! An abort sets SO_LINGER {on, 0}, so the descriptor's close sends a RST and drops
//! whatever is queued; operations still in flight on the socket are woken and fail, so
//! the tasks holding it let go at once and the descriptor closes.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::ending::{abort, shut_now};
use super::timeouts::{TimeoutKind, Timeouts};
use super::OutputStream;
use crate::driver::{ops, sockopt, SharedFd};
use crate::runtime;
use crate::tls::session::TlsSession;
use crate::{Error, Result};

/// The first wait between two looks at the send queue while a close waits for it to
/// drain; doubled after each look up to [`MAX_DRAIN_TICK`].
const FIRST_DRAIN_TICK: Duration = Duration::from_millis(1);
const MAX_DRAIN_TICK: Duration = Duration::from_millis(100);
/// Bytes read (and thrown away) at a time while a close waits.
const DISCARD_CHUNK: usize = 16 * 1024;

/// A receive whose bytes a close throws away.
type Discard<'a> = Pin<Box<dyn Future<Output = (io::Result<usize>, Vec<u8>)> + 'a>>;

/// A connection being closed, with everything that may still have bytes to send.
pub(crate) struct Closing {
    pub(crate) fd: SharedFd,
    /// The socket's output streams (plain, then TLS), flushed in that order.
    pub(crate) outputs: Vec<OutputStream>,
    pub(crate) tls: Option<Rc<TlsSession>>,
    pub(crate) timeouts: Rc<Timeouts>,
    /// How the program ended it ("the socket was closed", "... dropped"): what a call on
    /// one of its streams says afterwards.
    pub(crate) ended_by: &'static str,
}

impl Closing {
    /// Closes a dropped socket: at once when nothing is left to deliver (or nothing can
    /// run here); else gracefully in a task of the socket's runtime, bounded by the
    /// linger timeout, after which it aborts. Never blocks and never panics: outside the
    /// socket's runtime the descriptor is closed as is (the kernel sends what it holds).
    pub(crate) fn in_background(self) {
        if self.fd.ended().is_some() {
            return;
        }
        let queued = self.queued_here();
        // Its runtime is going (or gone) with writes unsent or cut short: they will
        // never reach the peer, which must not take the FIN for the end of the stream.
        let runtime_gone = runtime::dropping()
            || self.fd.binding().is_err()
            || runtime::current_driver_kind().is_none();
        if runtime_gone && self.would_lose_writes() {
            abort(&self.fd, runtime_dropped());
            return;
        }
        if !queued && !self.unacknowledged() {
            self.end_streams();
            return;
        }
        if runtime_gone {
            return;
        }
        let deadline = Instant::now()
            .checked_add(self.timeouts.linger.get())
            .unwrap_or_else(Instant::now);
        if queued {
            // Dropped unfinished (or before it ran) only with the runtime: writes still
            // here then never go. Once they are all in the kernel, it delivers them.
            let close = AbortIfDropped::new(self);
            runtime::spawn(async move {
                let result = close
                    .closing()
                    .deliver_then(deadline, || close.disarm())
                    .await;
                close.finish().end_streams();
                drop(result);
            });
            return;
        }
        // Only the kernel holds data: its FIN goes behind it now, so the peer gets all
        // of it and the end even if this thread blocks before the task below runs.
        self.fd.mark_write_shut();
        if self.fd.sock().shutdown(Shutdown::Write).is_err() {
            return;
        }
        runtime::spawn(async move {
            let _ = self.drain_or_abort(deadline).await;
            self.end_streams();
        });
    }

    /// Ends a closed connection once it has nothing left to deliver. Without other
    /// handles the descriptor closes as this returns; but the socket's input and output
    /// streams (or a TLS session they share) keep it open, and then nothing would tell
    /// the peer, and a read waiting on a stream would wait for good. So the connection
    /// is shut down now: the peer gets its FIN, and every stream operation fails from
    /// now on.
    fn end_streams(self) {
        let Closing {
            fd,
            outputs,
            tls,
            ended_by,
            ..
        } = self;
        // Only their own streams and session: a handle of the program's keeps its clone.
        drop((outputs, tls));
        if !fd.is_shared() {
            return;
        }
        fd.end(Error::from_errno(ended_by, libc::ECANCELED));
        shut_now(&fd);
    }

    /// Whether writes, or a TLS `close_notify`, wait to be sent by this process.
    fn queued_here(&self) -> bool {
        self.outputs
            .iter()
            .any(|output| output.pending_writes() > 0)
            || self.tls.as_ref().is_some_and(|tls| tls.has_unsent())
    }

    /// Whether bytes the program wrote wait in this process (queued writes, encrypted
    /// records), or a write was cut short by its runtime's drop: what a close that
    /// cannot run would lose.
    fn would_lose_writes(&self) -> bool {
        self.outputs
            .iter()
            .any(|output| output.pending_writes() > 0)
            || self
                .tls
                .as_ref()
                .is_some_and(|tls| tls.has_unsent_records())
            || self.fd.write_cut()
    }

    /// Whether the peer has yet to acknowledge bytes the kernel holds (beyond our FIN).
    fn unacknowledged(&self) -> bool {
        let fin = usize::from(self.fd.is_write_shut());
        sockopt::unacknowledged_bytes(self.fd.raw()).is_ok_and(|bytes| bytes > fin)
    }

    /// Delivers everything and closes before `deadline`; past it (or on a failure)
    /// aborts and says why. Either way the streams taken from the socket end with it.
    pub(crate) async fn graceful(self, deadline: Instant) -> Result<()> {
        let result = self.deliver(deadline).await;
        self.end_streams();
        result
    }

    async fn deliver(&self, deadline: Instant) -> Result<()> {
        self.deliver_then(deadline, || {}).await
    }

    /// [`deliver`](Self::deliver), calling `sent` once everything is in the kernel.
    async fn deliver_then(&self, deadline: Instant, sent: impl FnOnce()) -> Result<()> {
        if let Some(ended) = self.fd.ended() {
            return Err(Error::from(ended));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match runtime::timeout_lenient(left, self.send_all()).await {
            Ok(Ok(())) => {
                sent();
                self.drain_or_abort(deadline).await
            }
            Ok(Err(err)) => Err(self.abort(err)),
            Err(_) => {
                let err = self.too_slow(left);
                Err(self.abort(err))
            }
        }
    }

    /// Waits for the peer to acknowledge everything (see [`drain`](Self::drain)); aborts
    /// if it does not by `deadline`.
    async fn drain_or_abort(&self, deadline: Instant) -> Result<()> {
        let drained = self.drain(deadline).await;
        drained.map_err(|err| self.abort(err))
    }

    fn abort(&self, why: Error) -> Error {
        abort(&self.fd, why.clone());
        why
    }

    fn too_slow(&self, limit: Duration) -> Error {
        self.timeouts.count(TimeoutKind::Close);
        Error::timed_out(format!(
            "close: the peer did not take everything within {limit:?}; the connection \
             was aborted"
        ))
    }

    /// Sends what the streams and the TLS session hold, then the FIN.
    async fn send_all(&self) -> Result<()> {
        for output in &self.outputs {
            output.flush().await?;
        }
        if let Some(tls) = &self.tls {
            if tls.has_unsent() {
                tls.close_write().await?;
            }
        }
        ops::shutdown(&self.fd, Shutdown::Write)
            .await
            .map_err(|err| Error::io("shutdown", err))
    }

    /// Reads and discards until the peer has acknowledged everything, or `deadline`.
    async fn drain(&self, deadline: Instant) -> Result<()> {
        let fd = &self.fd;
        let mut tick = FIRST_DRAIN_TICK;
        let mut reading: Option<Discard<'_>> =
            Some(Box::pin(ops::recv(fd, Vec::with_capacity(DISCARD_CHUNK))));
        loop {
            if let Ok(Some(err)) = fd.sock().take_error() {
                return Err(Error::io("close", err));
            }
            let unacknowledged = sockopt::unacknowledged_bytes(fd.raw())
                .map_err(|err| Error::io("close: read the send queue", err))?;
            if unacknowledged == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                self.timeouts.count(TimeoutKind::Close);
                return Err(Error::timed_out(format!(
                    "close: {unacknowledged} bytes not acknowledged by the peer in time; the \
                     connection was aborted"
                )));
            }
            let mut sleep = runtime::sleep_until_lenient((now + tick).min(deadline));
            tick = (tick * 2).min(MAX_DRAIN_TICK);
            let read = poll_fn(|cx| {
                if let Some(read) = reading.as_mut() {
                    if let Poll::Ready((result, buf)) = read.as_mut().poll(cx) {
                        return Poll::Ready(Some((result, buf)));
                    }
                }
                Pin::new(&mut sleep).poll(cx).map(|()| None)
            })
            .await;
            match read {
                None => {}
                // The peer is done sending: from now on only the send queue matters.
                Some((Ok(0), _)) => reading = None,
                Some((Ok(_), mut buf)) => {
                    buf.clear();
                    reading = Some(Box::pin(ops::recv(fd, buf)));
                }
                Some((Err(err), _)) => return Err(Error::io("close", err)),
            }
        }
    }
}

/// A close that resets the connection if it is dropped (its runtime's end stopped it
/// part-way) while writes it had would be lost: armed only if they would be when it
/// starts (a TLS session's `close_notify` it queues later is not the program's data),
/// and judged again at the drop, since the last write may have reached the kernel after
/// the close last ran, and then the kernel delivers everything and a reset would cut it.
struct AbortIfDropped {
    /// Taken by [`finish`](Self::finish) only.
    closing: Option<Closing>,
    armed: Cell<bool>,
}

impl AbortIfDropped {
    fn new(closing: Closing) -> AbortIfDropped {
        let armed = closing.would_lose_writes();
        AbortIfDropped {
            closing: Some(closing),
            armed: Cell::new(armed),
        }
    }

    fn closing(&self) -> &Closing {
        self.closing.as_ref().expect("taken only by finish")
    }

    /// Everything is in the kernel: nothing to reset.
    fn disarm(&self) {
        self.armed.set(false);
    }

    /// The close ran to its end: nothing to reset.
    fn finish(mut self) -> Closing {
        self.disarm();
        self.closing.take().expect("taken only by finish")
    }
}

impl Drop for AbortIfDropped {
    fn drop(&mut self) {
        match &self.closing {
            Some(closing) if self.armed.get() && closing.would_lose_writes() => {
                abort(&closing.fd, runtime_dropped());
            }
            _ => {}
        }
    }
}

/// Why a connection whose runtime went with writes unsent was reset.
fn runtime_dropped() -> Error {
    Error::wrong_runtime("the socket's runtime was dropped before everything written was sent")
}
