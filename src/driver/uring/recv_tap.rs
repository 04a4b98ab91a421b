//! A socket's forwarding done inside the io_uring driver: the receive ring's multishot
//! is tapped ([`Tap`]), so each datagram the rule forwards goes out as a posted SEND of
//! the ring buffer it arrived in, there and then, as the driver reaps its completion —
//! no task woken, no poll, no `Datagram`. What the rule keeps for the program waits
//! here for the socket's receiver, which wakes for it.

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

use super::datagram::{post_to_in, take_filled};
use super::tap::Tap;
use super::{Completion, Driver};
use crate::driver::buf_pool::BufPool;
use crate::driver::fd::FdRef;
use crate::driver::forward::{Forward, Forwarding};
use crate::driver::posted::PostLedger;
use crate::driver::recv::{RecvCounters, RecvDatagram};

/// The driver's side of one socket's receive while it forwards.
pub(crate) struct RecvTap {
    /// The rule; none once the program stopped forwarding (everything is delivered).
    rule: Cell<Option<Forwarding>>,
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
    counters: Cell<RecvCounters>,
    /// One completion's datagrams (several with GRO), kept for its room.
    scratch: Cell<Vec<RecvDatagram>>,
}

impl RecvTap {
    pub(crate) fn new(
        fd: &FdRef,
        pool: &Rc<BufPool>,
        control_len: usize,
        ledger: &Rc<PostLedger>,
        rule: Option<Forwarding>,
    ) -> RecvTap {
        RecvTap {
            rule: Cell::new(rule),
            fd: fd.clone(),
            pool: pool.clone(),
            control_len,
            ledger: ledger.clone(),
            ready: RefCell::new(Vec::new()),
            failure: RefCell::new(None),
            counters: Cell::new(RecvCounters::default()),
            scratch: Cell::new(Vec::new()),
        }
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

    /// Sends `datagram` on to `rule`'s destination from the socket; what cannot go is
    /// booked as dropped (4,096 forwards in flight) or failed.
    fn forward(&self, driver: &mut Driver, datagram: RecvDatagram, rule: Forwarding) {
        if let Err(err) = self.ledger.begin() {
            self.ledger
                .count_unsent(err.raw_os_error().unwrap_or(libc::EIO));
            return;
        }
        let data = Forward::from_payload(datagram.buf);
        if let Err((err, _unsent)) =
            post_to_in(driver, &self.fd, data, rule.destination(), &self.ledger)
        {
            self.ledger.abort();
            self.ledger
                .count_unsent(err.raw_os_error().unwrap_or(libc::EIO));
        }
    }
}

impl Tap for RecvTap {
    fn take(&self, driver: &mut Driver, completion: Completion) -> bool {
        let mut counters = self.counters.get();
        let mut got = self.scratch.take();
        let mut wake = false;
        if let Err(err) = take_filled(
            &self.pool,
            self.control_len,
            completion,
            &mut counters,
            &mut got,
        ) {
            self.failure.borrow_mut().get_or_insert(err);
            wake = true;
        }
        let rule = self.rule.get();
        for datagram in got.drain(..) {
            match rule {
                Some(rule) if rule.forwards(&datagram) => {
                    counters.forwarded += 1;
                    self.forward(driver, datagram, rule);
                }
                _ => {
                    self.ready.borrow_mut().push(datagram);
                    wake = true;
                }
            }
        }
        self.counters.set(counters);
        self.scratch.set(got);
        wake
    }
}
