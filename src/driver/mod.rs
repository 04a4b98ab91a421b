//! The engines: io_uring and the portable readiness fallback, behind one contract.
//!
//! # The contract every driver fulfils
//!
//! A driver lives on one thread, owned by one [`Runtime`](crate::runtime::Runtime),
//! and provides:
//!
//! - `park(timeout)`: submit whatever operations the tasks queued, then wait in ONE system
//!   call until at least one completion or readiness event arrives, the timeout passes, or
//!   another thread unparks it; then wake the tasks whose operations progressed.
//! - An `Unparker` another thread can use to end a `park` early.
//! - For a runtime turned by another event loop (tokio's): `notify_fd`, a descriptor
//!   that turns readable when the driver has something to collect, and `turn`, which
//!   submits what is queued and collects without waiting.
//! - The operations in [`ops`] (connect, recv, send, vectored stream send, shutdown),
//!   [`accept`] (accept, with a bound on connections taken before the program asks) and
//!   [`ops_datagram`] (receive ring, datagram send, datagram batch, posted send) and [`ops_file`]
//!   (packets read from and written to a TUN queue). Each takes owned
//!   buffers and gives them back, so the upper layers are written once and never name
//!   io_uring or epoll. A receive can be given a condition to stop on (a read timeout):
//!   it is cancelled, its final completion still awaited, and its buffer comes back with
//!   whatever the kernel put in it, so nothing received is lost.
//! - [`DriverStats`]: counts of the system calls it made, so benchmarks count, not guess.
//!
//! What every engine promises:
//!
//! - **Ownership.** From submission to the final completion, everything the kernel may
//!   touch (buffers, iovecs, msghdr, address, a reference to the descriptor) belongs to
//!   the driver, also when the future that asked is dropped: the driver cancels it and
//!   frees the memory only after the kernel's last word on it. Dropping the driver
//!   cancels and reaps everything; if the kernel stops answering, memory is leaked,
//!   never freed under it.
//! - **Identity.** Every driver has a unique [`DriverId`](current::DriverId). A socket is
//!   bound to the driver of its first use ([`SharedFd::binding`]), every operation holds
//!   the handle of the driver it was submitted to, and io_uring operations carry a
//!   generation in their key. Used where another driver runs the thread, where none does,
//!   or after its driver shut down, a socket or operation fails with
//!   [`SocketErrorStatus::WrongRuntime`](crate::SocketErrorStatus::WrongRuntime) on
//!   that call: it never hangs, never takes another driver's completion, and an
//!   operation in flight is cancelled and reaped on its own driver before its buffer
//!   comes back.
//! - **Ending.** A stream socket whose connection was ended on this side
//!   ([`SharedFd::end`]: a timeout expired, it was aborted) fails every later operation
//!   with that reason, and every operation in flight with it once its completion comes
//!   back (the socket layer wakes them with a `shutdown`). Stream operations keep the
//!   socket's traffic clock ([`activity`]) for the idle and write timeouts.
//! - **Capabilities.** Optional kernel features are probed by trying them
//!   ([`Capability`]); each missing one has a fallback inside the engine.
//!
//! # Layout
//!
//! Arrows point down: the runtime owns a [`handle::Driver`]; the dispatch modules
//! ([`ops`], [`accept`], [`ops_datagram`], [`ops_file`], [`socket`]) pick the engine a
//! socket (or a TUN queue) is bound to; the engines ([`uring`], [`poll`]) never import
//! the runtime, the socket API, the dispatch modules or each other; the shared modules
//! (descriptors, buffer pool, socket addresses, iovecs, GSO, received datagrams,
//! recvmmsg, the receive ring's layout, socket options, the traffic clock, direct file
//! reads, the TUN ioctls) import no engine.

pub(crate) mod accept;
pub(crate) mod activity;
pub(crate) mod affinity;
pub(crate) mod backend;
pub(crate) mod batch;
pub(crate) mod buf_pool;
pub(crate) mod caps;
pub(crate) mod cmsg;
pub(crate) mod current;
pub(crate) mod dropped_read;
pub(crate) mod fd;
pub(crate) mod file_io;
pub(crate) mod forward;
pub(crate) mod gso;
pub(crate) mod handle;
pub(crate) mod iovec;
pub(crate) mod mapping;
pub(crate) mod notify;
pub(crate) mod ops;
pub(crate) mod ops_datagram;
pub(crate) mod ops_file;
pub(crate) mod poll;
pub(crate) mod posted;
pub(crate) mod recv;
pub(crate) mod recv_mmsg;
pub(crate) mod ring_layout;
pub(crate) mod scm;
pub(crate) mod send_many;
pub(crate) mod sockaddr;
pub(crate) mod socket;
pub(crate) mod sockopt;
pub(crate) mod stats;
pub(crate) mod tun_sys;
pub(crate) mod unpark;
pub(crate) mod uring;

pub(crate) use backend::DriverConfig;
pub use backend::{Backend, DriverKind};
pub use caps::{Capabilities, Capability};
pub(crate) use handle::Driver;
pub(crate) use socket::{SharedFd, WeakFd};
pub use stats::DriverStats;
pub(crate) use unpark::Unparker;
