//! System calls a driver made, counted rather than guessed.

/// System calls a driver made; read them with [`crate::runtime::driver_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Calls that entered the kernel to submit work or wait for it: `io_uring_enter` on
    /// io_uring, `epoll_wait` on epoll.
    pub enter_calls: u64,
    /// Other system calls made directly: on epoll every send, recv, sendmsg, sendmmsg,
    /// recvmmsg and `epoll_ctl`; on io_uring the sendmmsg of a multi-send datagram
    /// batch, the recvmmsg of a receiver draining a burst and the `io_uring_register`
    /// calls that take its buffer ring back and give it again (all else is SQEs).
    pub io_calls: u64,
    /// Submission queue entries pushed (io_uring only).
    pub sqes: u64,
}

impl DriverStats {
    /// Every system call counted: entries into the kernel plus direct I/O calls.
    pub fn syscalls(&self) -> u64 {
        self.enter_calls + self.io_calls
    }
}
