//! A descriptor kept open by everyone who may still use its number.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;

/// A socket descriptor shared by the socket's handles and by the operations in flight on
/// it; closed when the last clone is dropped.
///
/// An io_uring operation holds a clone until its final completion, even when the future
/// that started it was dropped, so the kernel never works on a descriptor number that
/// was closed and reused for another file.
#[derive(Clone)]
pub(crate) struct FdRef(Rc<OwnedFd>);

impl FdRef {
    pub(crate) fn new(fd: OwnedFd) -> FdRef {
        FdRef(Rc::new(fd))
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// The descriptor, while this handle lives.
    pub(crate) fn borrow(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// A new descriptor (close-on-exec) for the same socket, owned by the caller.
    pub(crate) fn try_clone(&self) -> io::Result<OwnedFd> {
        self.0.try_clone()
    }

    /// Points this descriptor's number at /dev/null (atomically, with dup3), for a socket
    /// that left: the socket is then referenced only by its new owner's descriptors, so
    /// its close really ends it, and no option or shutdown set through this number can
    /// reach it (they fail: not a socket). Does nothing if /dev/null cannot be opened.
    #[allow(unsafe_code)]
    pub(crate) fn let_go(&self) {
        let Ok(null) = std::fs::File::open("/dev/null") else {
            return;
        };
        // SAFETY: dup3 replaces the file behind `self`'s number, which stays open and
        // owned by `self` (now naming /dev/null); `null` is a live descriptor.
        unsafe { libc::dup3(null.as_raw_fd(), self.raw(), libc::O_CLOEXEC) };
    }

    /// A borrowed socket2 view, for socket options and addresses.
    pub(crate) fn sock(&self) -> socket2::SockRef<'_> {
        socket2::SockRef::from(&*self.0)
    }
}

impl fmt::Debug for FdRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FdRef({})", self.raw())
    }
}
