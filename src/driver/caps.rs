//! The kernel features the io_uring engine uses where they exist, each probed by trying
//! it, and the switch that turns them off.

use std::fmt;
use std::str::FromStr;

/// A kernel feature the io_uring engine uses where the kernel has it. Each one is probed
/// at start by trying it (a flag such as multishot cannot be seen in the opcode list),
/// and where one is missing, or turned off with [`Builder::disable`] or
/// `RINGSOCK_DISABLE`, that part of the engine uses its fallback.
///
/// [`Builder::disable`]: crate::runtime::Builder::disable
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// Provided buffer rings (IORING_REGISTER_PBUF_RING, Linux 5.19): the kernel picks
    /// a receive buffer per datagram. Without it datagrams are received with `recvmmsg`
    /// when a one-shot poll says the socket is readable.
    BufferRing,
    /// Multishot RECVMSG (Linux 6.0): one submission receives datagrams until it is
    /// cancelled. Without it, `recvmmsg` on readiness, as without [`BufferRing`].
    ///
    /// [`BufferRing`]: Capability::BufferRing
    MultishotRecv,
    /// Multishot ACCEPT (Linux 5.19): one submission accepts connections until it is
    /// cancelled. Without it, one ACCEPT submission per connection.
    MultishotAccept,
    /// SEND with a destination address (Linux 6.0): a datagram to an address in one
    /// SEND. Without it, SENDMSG with the address in its header.
    SendTo,
    /// Incrementally consumed provided buffers with a minimum left (IOU_PBUF_RING_INC,
    /// Linux 6.12, and the buffer ring's `min_left`, added in 2026 and backported to
    /// stable kernels): each datagram takes only the bytes it needs from a large buffer,
    /// and the kernel moves on to the next buffer once what is left could not hold the
    /// largest datagram, so many small datagrams share one buffer and a large one still
    /// arrives whole. Without it every buffer holds one datagram (and the same memory
    /// holds fewer small datagrams). Incremental consumption without `min_left` would cut
    /// a datagram at a buffer's tail, so it does not count.
    IncrementalBuffers,
    /// IORING_SETUP_SINGLE_ISSUER with DEFER_TASKRUN (Linux 6.1): completion work runs
    /// when the loop asks for it instead of interrupting the thread; a receiver costs
    /// about a quarter less CPU. Without it, COOP_TASKRUN or no setup flags.
    DeferTaskrun,
    /// IORING_SETUP_TASKRUN_FLAG (Linux 5.19): the kernel flags pending completion work
    /// in shared memory, so a spinning loop sees it without a system call.
    TaskrunFlag,
}

impl Capability {
    /// Every capability, in a fixed order.
    pub const ALL: [Capability; 7] = [
        Capability::BufferRing,
        Capability::MultishotRecv,
        Capability::MultishotAccept,
        Capability::SendTo,
        Capability::IncrementalBuffers,
        Capability::DeferTaskrun,
        Capability::TaskrunFlag,
    ];

    /// The name `RINGSOCK_DISABLE` and the demo use, e.g. `"multishot-accept"`.
    pub const fn name(self) -> &'static str {
        match self {
            Capability::BufferRing => "buffer-ring",
            Capability::MultishotRecv => "multishot-recv",
            Capability::MultishotAccept => "multishot-accept",
            Capability::SendTo => "send-to",
            Capability::IncrementalBuffers => "incremental-buffers",
            Capability::DeferTaskrun => "defer-taskrun",
            Capability::TaskrunFlag => "taskrun-flag",
        }
    }

    const fn bit(self) -> u32 {
        1 << self as u32
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Capability {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Capability> {
        Capability::ALL
            .into_iter()
            .find(|cap| cap.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Capability::ALL.iter().map(|cap| cap.name()).collect();
                crate::Error::invalid_input(format!(
                    "unknown io_uring capability {s:?}: expected one of {}",
                    known.join(", ")
                ))
            })
    }
}

/// A set of [`Capability`]s: what a runtime's io_uring engine found and uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    bits: u32,
}

impl Capabilities {
    /// The empty set.
    pub const fn none() -> Capabilities {
        Capabilities { bits: 0 }
    }

    /// True when `cap` is in the set.
    pub const fn contains(self, cap: Capability) -> bool {
        self.bits & cap.bit() != 0
    }

    /// The set with `cap` added.
    pub const fn with(self, cap: Capability) -> Capabilities {
        Capabilities {
            bits: self.bits | cap.bit(),
        }
    }

    /// The set without `cap`.
    pub const fn without(self, cap: Capability) -> Capabilities {
        Capabilities {
            bits: self.bits & !cap.bit(),
        }
    }

    /// The capabilities in both sets.
    pub const fn intersection(self, other: Capabilities) -> Capabilities {
        Capabilities {
            bits: self.bits & other.bits,
        }
    }

    /// The capabilities in this set, in [`Capability::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = Capability> {
        Capability::ALL
            .into_iter()
            .filter(move |cap| self.contains(*cap))
    }

    /// The set named by `RINGSOCK_DISABLE` (comma-separated names), empty when unset.
    ///
    /// An unknown name is an error rather than ignored, so a typo cannot quietly test
    /// the wrong engine path.
    pub fn disabled_by_env() -> crate::Result<Capabilities> {
        match std::env::var("RINGSOCK_DISABLE") {
            Ok(value) => value
                .parse()
                .map_err(|err: crate::Error| err.in_variable("RINGSOCK_DISABLE")),
            Err(std::env::VarError::NotPresent) => Ok(Capabilities::none()),
            Err(std::env::VarError::NotUnicode(_)) => Err(crate::Error::invalid_input(
                "RINGSOCK_DISABLE is not valid UTF-8",
            )),
        }
    }
}

impl FromIterator<Capability> for Capabilities {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Capabilities {
        iter.into_iter()
            .fold(Capabilities::none(), Capabilities::with)
    }
}

impl FromStr for Capabilities {
    type Err = crate::Error;

    /// Comma- or space-separated capability names; `all` names every one.
    fn from_str(s: &str) -> crate::Result<Capabilities> {
        let mut set = Capabilities::none();
        for name in s.split([',', ' ']).map(str::trim).filter(|n| !n.is_empty()) {
            if name == "all" {
                set = Capability::ALL.into_iter().collect();
            } else {
                set = set.with(name.parse()?);
            }
        }
        Ok(set)
    }
}

impl fmt::Display for Capabilities {
    /// The names separated by spaces, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for cap in self.iter() {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(cap.name())?;
            first = false;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for cap in Capability::ALL {
            assert_eq!(cap.name().parse::<Capability>().unwrap(), cap);
        }
        let set: Capabilities = "multishot-accept, buffer-ring".parse().unwrap();
        assert_eq!(set.to_string(), "buffer-ring multishot-accept");
        assert!(set.contains(Capability::BufferRing));
        assert!(!set.contains(Capability::SendTo));
        assert_eq!("".parse::<Capabilities>().unwrap(), Capabilities::none());
        assert_eq!(Capabilities::none().to_string(), "none");
        assert_eq!("all".parse::<Capabilities>().unwrap().iter().count(), 7);
        let err = "multishot".parse::<Capabilities>().unwrap_err();
        assert_eq!(err.status(), crate::SocketErrorStatus::InvalidArgument);
    }

    #[test]
    fn set_operations() {
        let all: Capabilities = Capability::ALL.into_iter().collect();
        let some = all.without(Capability::SendTo);
        assert!(!some.contains(Capability::SendTo));
        assert_eq!(
            some.intersection(Capabilities::none()),
            Capabilities::none()
        );
        assert_eq!(all.intersection(some), some);
    }
}
