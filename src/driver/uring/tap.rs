//! A multishot operation whose completions the driver hands to a tap as it reaps them,
//! instead of queueing them for the operation's future: the tap acts on each one there
//! and then (a receive forwards its datagram), with no task woken and no poll for it.

use super::{Completion, Driver};

/// Takes a tapped multishot's completions inside the driver.
pub(crate) trait Tap {
    /// Takes one completion that carries a value (`result >= 0`), in the order the
    /// kernel posted them; the driver is the tap's to push entries on. True when the
    /// operation's owner should wake (the tap left it something to take).
    fn take(&self, driver: &mut Driver, completion: Completion) -> bool;

    /// The completions reaped together have all been taken: what the tap held back to
    /// do in one go (a run of sends) goes now.
    fn flush(&self, driver: &mut Driver);
}
