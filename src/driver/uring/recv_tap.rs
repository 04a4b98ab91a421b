//! A socket's forwarding done inside the io_uring driver: the receive ring's multishot
//! is tapped ([`Tap`]), so the datagrams the rule forwards go out from the ring buffers
//! they arrived in as the driver reaps their completions — no task woken, no poll, no
//! `Datagram`. Those reaped together go once the completion queue is read: each run of
//! equal lengths as one GSO SENDMSG, a lone one as a SEND. What the rule keeps for the
//! program waits here for the socket's receiver, which wakes for it.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::rc::{Rc, Weak};

use super::fixed_files::RegisteredFile;
use super::post_to::{post_to_in, SendFile};
use super::recvmsg_out::take_filled;
use super::tap::{Taken, Tap};
use super::{post_many, Completion, Driver};
use crate::buf::IoBuf;
use crate::driver::buf_pool::BufPool;
use crate::driver::cmsg::{SendControl, SendMeta};
use crate::driver::fd::FdRef;
use crate::driver::forward::{Forward, Forwarding};
use crate::driver::gso::{GSO_MAX_SEGMENTS, MAX_UDP_PAYLOAD_V4};
use crate::driver::posted::PostLedger;
use crate::driver::recv::{RecvCounters, RecvDatagram};
use crate::driver::sockaddr::RawAddr;

/// The driver's side of one socket's receive while it forwards.
pub(crate) struct RecvTap {
    /// Itself, for its GSO sends to come back to when the kernel refuses them.
    this: Weak<RecvTap>,
    /// The rule; none once the program stopped forwarding (everything is delivered).
    rule: Cell<Option<Forwarding>>,
    /// The socket's slot in the ring's file table, which its sends name; before `fd`,
    /// so that the slot is emptied before the descriptor can close.
    registered: Option<RegisteredFile>,
    fd: FdRef,
    pool: Rc<BufPool>,
    /// The control data the receive asks for, as the receiver's.
    control_len: usize,
    /// The socket's books of posted datagrams: forwards count there.
    ledger: Rc<PostLedger>,
    /// Delivered datagrams the receiver has not taken yet, oldest first.
    ready: RefCell<Vec<RecvDatagram>>,
    /// A malformed completion, for the receiver to report.
    failure: RefCell<Option<io::Error>>,
    /// The rule's panic, resumed in the task that receives: it must not unwind through
    /// the driver, which would stop every tap of the runtime.
    panic: RefCell<Option<Box<dyn Any + Send>>>,
    counters: Cell<RecvCounters>,
    /// One completion's datagrams (several with GRO), kept for its room.
    scratch: Cell<Vec<RecvDatagram>>,
    /// Forwards of the completions reaped together and where each goes, sent once all
    /// are taken: runs of them go as GSO sends. Each has its place in the books already.
    pending: RefCell<Vec<(Forward, SocketAddr)>>,
    /// The datagrams of GSO sends the kernel refused, in the order they were sent: they
    /// go again, one by one, ahead of what is pending.
    refused_runs: RefCell<Vec<(Forward, SocketAddr)>>,
}

impl RecvTap {
    pub(crate) fn new(
        fd: &FdRef,
        pool: &Rc<BufPool>,
        control_len: usize,
        ledger: &Rc<PostLedger>,
        rule: Option<Forwarding>,
        registered: Option<RegisteredFile>,
    ) -> Rc<RecvTap> {
        Rc::new_cyclic(|this| RecvTap {
            this: this.clone(),
            rule: Cell::new(rule),
            registered,
            fd: fd.clone(),
            pool: pool.clone(),
            control_len,
            ledger: ledger.clone(),
            ready: RefCell::new(Vec::new()),
            failure: RefCell::new(None),
            panic: RefCell::new(None),
            counters: Cell::new(RecvCounters::default()),
            scratch: Cell::new(Vec::new()),
            pending: RefCell::new(Vec::new()),
            refused_runs: RefCell::new(Vec::new()),
        })
    }

    pub(crate) fn set_rule(&self, rule: Option<Forwarding>) {
        self.rule.set(rule);
    }

    pub(crate) fn counters(&self) -> RecvCounters {
        self.counters.get()
    }

    /// Moves what waits for the receiver to the end of `ready`; a failure met meanwhile
    /// comes back too.
    pub(crate) fn hand_over(&self, ready: &mut Vec<RecvDatagram>) -> Option<io::Error> {
        let mut waiting = self.ready.borrow_mut();
        if !waiting.is_empty() {
            ready.append(&mut waiting);
        }
        self.failure.borrow_mut().take()
    }

    /// A panic of the rule, taken: for the receiving task to go on with.
    pub(crate) fn take_panic(&self) -> Option<Box<dyn Any + Send>> {
        self.panic.borrow_mut().take()
    }

    /// Whether `rule` forwards `datagram`; a rule that panics keeps it for the program,
    /// and its panic goes on in the task that receives it.
    fn forwards(&self, rule: &Forwarding, datagram: &RecvDatagram) -> bool {
        // AssertUnwindSafe: the rule only reads the datagram, and a panic leaves
        // nothing of the tap's half-changed.
        match std::panic::catch_unwind(AssertUnwindSafe(|| rule.forwards(datagram))) {
            Ok(forwards) => forwards,
            Err(panic) => {
                self.panic.borrow_mut().get_or_insert(panic);
                false
            }
        }
    }

    /// Holds `datagram` back to go to `rule`'s destination with the others reaped with
    /// it, once they are all taken (see [`flush`](Tap::flush)); what cannot go (4,096
    /// forwards in flight) is booked as dropped. True when it is held.
    fn hold_forward(&self, datagram: RecvDatagram, rule: Forwarding) -> bool {
        if let Err(err) = self.ledger.begin() {
            self.ledger
                .count_unsent(err.raw_os_error().unwrap_or(libc::EIO));
            return false;
        }
        self.pending
            .borrow_mut()
            .push((Forward::from_payload(datagram.buf), rule.destination()));
        true
    }

    /// Sends one datagram whose place in the books is taken.
    fn send_one(&self, driver: &mut Driver, data: Forward, to: SocketAddr) {
        let slot = self.registered.as_ref().map(RegisteredFile::slot);
        if let Err((err, _unsent)) = post_to_in(driver, &self.fd, slot, data, to, &self.ledger) {
            self.unsent(&err, 1);
        }
    }

    /// Sends a GSO run of datagrams whose places in the books are taken.
    fn send_run(&self, driver: &mut Driver, run: Vec<Forward>, to: SocketAddr) {
        let datagrams = run.len() as u32;
        let slot = self.registered.as_ref().map(RegisteredFile::slot);
        let data = GsoRun::new(&self.fd, slot, run, to);
        let back: Option<Rc<dyn Tap>> = self.this.upgrade().map(|this| this as Rc<dyn Tap>);
        // SAFETY: the header points at the iovecs, address and control data in the boxed
        // run, and the iovecs at the datagrams' stable bytes (IoBuf's contract), all
        // owned by the slot until the final CQE.
        let posted = unsafe {
            post_many(driver, data, &self.ledger, datagrams, back, |run| {
                run.entry(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            })
        };
        if let Err((err, _unsent)) = posted {
            self.unsent(&err, datagrams);
        }
    }

    /// Books `count` datagrams that had their places and never went out.
    fn unsent(&self, err: &io::Error, count: u32) {
        for _ in 0..count {
            self.ledger.abort();
            self.ledger
                .count_unsent(err.raw_os_error().unwrap_or(libc::EIO));
        }
    }
}

impl Tap for RecvTap {
    fn take(&self, completion: Completion) -> Taken {
        let mut counters = self.counters.get();
        let mut got = self.scratch.take();
        let mut taken = Taken::default();
        let filled = take_filled(
            &self.pool,
            self.control_len,
            completion,
            &mut counters,
            &mut got,
        );
        if let Err(err) = filled {
            self.failure.borrow_mut().get_or_insert(err);
            taken.wake = true;
        }
        let rule = self.rule.get();
        for datagram in got.drain(..) {
            match rule {
                Some(rule) if self.forwards(&rule, &datagram) => {
                    counters.forwarded += 1;
                    taken.holds |= self.hold_forward(datagram, rule);
                }
                _ => {
                    self.ready.borrow_mut().push(RecvDatagram {
                        kept: rule.is_some(),
                        ..datagram
                    });
                    taken.wake = true;
                }
            }
        }
        self.counters.set(counters);
        self.scratch.set(got);
        taken
    }

    fn refused(&self, send: Box<dyn Any>) {
        let Ok(mut cell) = send.downcast::<Option<GsoRun>>() else {
            return;
        };
        let Some(run) = cell.take() else {
            return;
        };
        // Older than anything held now: they go first at the next flush, one by one
        // (the books say GSO was refused), each with the place it has, after the runs
        // refused before them.
        let to = run.to;
        self.refused_runs
            .borrow_mut()
            .extend(run.datagrams.into_iter().map(|datagram| (datagram, to)));
    }

    /// Sends the forwards held back, in order: each run of equal lengths (the last one
    /// may be shorter) as one GSO send, unless the socket's GSO sends were refused.
    fn flush(&self, driver: &mut Driver) {
        let mut pending = self.pending.take();
        let refused = self.refused_runs.take();
        if !refused.is_empty() {
            pending.splice(0..0, refused);
        }
        let gso = !self.ledger.gso_refused();
        let mut items = pending.drain(..).peekable();
        while let Some((first, to)) = items.next() {
            let segment = first.data().len();
            let mut last = segment;
            let mut bytes = segment;
            // A lone forward needs no list: one is made once a second joins the run.
            let mut alone = Some(first);
            let mut run = Vec::new();
            while let Some((next, next_to)) = items.peek() {
                let len = next.data().len();
                let joins =
                    gso && *next_to == to && fits_run(segment, last, run.len().max(1), bytes, len);
                if !joins {
                    break;
                }
                if let Some(first) = alone.take() {
                    run.reserve(8);
                    run.push(first);
                }
                run.extend(items.next().map(|(next, _)| next));
                last = len;
                bytes += len;
            }
            match alone {
                Some(one) => self.send_one(driver, one, to),
                None => self.send_run(driver, run, to),
            }
        }
        drop(items);
        // The room back, unless a send that made room in the queue held more meanwhile.
        let mut kept = self.pending.borrow_mut();
        if kept.is_empty() {
            *kept = pending;
        }
    }
}

/// Whether one GSO send of `count` datagrams (`bytes` in all, the first `segment`
/// bytes long, the last `last`) can carry one of `len` bytes after them: lengths equal
/// to the first's, the last one of a run possibly shorter, at most
/// [`GSO_MAX_SEGMENTS`] and one UDP datagram's bytes in all.
fn fits_run(segment: usize, last: usize, count: usize, bytes: usize, len: usize) -> bool {
    segment > 0
        && len > 0
        && len <= segment
        && last == segment
        && count < GSO_MAX_SEGMENTS
        && bytes + len <= MAX_UDP_PAYLOAD_V4
}

/// The data of one GSO send of forwarded datagrams: a SENDMSG whose header points at
/// an iovec per datagram, the destination and a UDP_SEGMENT control message, all of
/// which stay put in the slot's box.
struct GsoRun {
    /// Holds the descriptor open until the final CQE; `file` is what the entry names.
    _fd: FdRef,
    file: SendFile,
    to: SocketAddr,
    datagrams: Vec<Forward>,
    iovecs: Vec<libc::iovec>,
    addr: RawAddr,
    control: SendControl,
    header: libc::msghdr,
}

impl GsoRun {
    fn new(fd: &FdRef, registered: Option<u32>, datagrams: Vec<Forward>, to: SocketAddr) -> GsoRun {
        let segment = datagrams[0].data().len().min(u16::MAX as usize) as u16;
        GsoRun {
            _fd: fd.clone(),
            file: SendFile::of(fd, registered),
            to,
            iovecs: Vec::with_capacity(datagrams.len()),
            datagrams,
            addr: RawAddr::from_socket_addr(to),
            control: SendControl::new(&SendMeta::default(), Some(segment)),
            // SAFETY: msghdr is plain old data; zero is its empty value.
            header: unsafe { std::mem::zeroed() },
        }
    }

    /// The SENDMSG entry; `self` must not move until the final CQE (it is boxed in the
    /// slot).
    fn entry(&mut self, flags: i32) -> io_uring::squeue::Entry {
        self.iovecs.clear();
        self.iovecs
            .extend(self.datagrams.iter().map(|datagram| libc::iovec {
                iov_base: datagram.stable_ptr() as *mut libc::c_void,
                iov_len: datagram.bytes_init(),
            }));
        self.header.msg_iov = self.iovecs.as_mut_ptr();
        self.header.msg_iovlen = self.iovecs.len();
        self.header.msg_name = self.addr.as_mut_ptr().cast();
        self.header.msg_namelen = self.addr.len;
        self.header.msg_control = self.control.as_ptr();
        self.header.msg_controllen = self.control.len();
        self.file.send_msg(&self.header).flags(flags as u32).build()
    }
}

#[cfg(test)]
mod tests {
    use super::{fits_run, GSO_MAX_SEGMENTS, MAX_UDP_PAYLOAD_V4};

    #[test]
    fn a_gso_run_takes_equal_lengths_then_at_most_one_shorter() {
        assert!(fits_run(172, 172, 1, 172, 172));
        assert!(fits_run(172, 172, 5, 860, 100), "a shorter last one");
        assert!(
            !fits_run(172, 100, 6, 960, 100),
            "nothing after the shorter one"
        );
        assert!(!fits_run(172, 172, 1, 172, 173), "longer than the segment");
        assert!(!fits_run(172, 172, 1, 172, 0), "empty");
        assert!(!fits_run(0, 0, 1, 0, 0), "empty segments");
    }

    #[test]
    fn a_gso_run_stays_within_one_udp_datagram_and_the_segment_limit() {
        assert!(!fits_run(100, 100, GSO_MAX_SEGMENTS, 6400, 100));
        assert!(fits_run(100, 100, GSO_MAX_SEGMENTS - 1, 6300, 100));
        let segment = 16_000;
        let four = 4 * segment;
        assert!(four + segment > MAX_UDP_PAYLOAD_V4);
        assert!(!fits_run(segment, segment, 4, four, segment));
        assert!(fits_run(
            segment,
            segment,
            4,
            four,
            MAX_UDP_PAYLOAD_V4 - four
        ));
    }
}
