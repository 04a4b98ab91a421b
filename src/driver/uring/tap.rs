//! A multishot operation whose completions the driver hands to a tap as it reaps them,
//! instead of queueing them for the operation's future: the tap acts on each one there
//! and then (a receive forwards its datagram), with no task woken and no poll for it.

use std::any::Any;

use super::{Completion, Driver};

/// Takes a tapped multishot's completions inside the driver.
pub(crate) trait Tap {
    /// Takes one completion that carries a value (`result >= 0`), in the order the
    /// kernel posted them, as the driver reaps it.
    fn take(&self, completion: Completion) -> Taken;

    /// The completions reaped together have all been taken: what the tap held back
    /// (sends, whose entries need the driver) goes now.
    fn flush(&self, driver: &mut Driver);

    /// The kernel refused a send the tap posted ([`post_many`](super::post_many) with
    /// this tap), for a reason sending its datagrams one by one may avoid (a GSO send
    /// whose segments the path cannot carry): `send` is the post's data, for the tap to
    /// send again at its next flush. Its datagrams keep their places in the books.
    fn refused(&self, send: Box<dyn Any>);
}

/// What taking a completion came to.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Taken {
    /// The tap left the operation's owner something to take: wake it.
    pub(crate) wake: bool,
    /// The tap holds work back for its [`flush`](Tap::flush).
    pub(crate) holds: bool,
}
