//! Anonymous memory mappings: page-aligned memory the kernel can be pointed at (buffer
//! rings and the buffers they name).
#![allow(unsafe_code)]

use std::io;
use std::ptr::NonNull;

/// An anonymous, page-aligned memory mapping, unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps at least `len` bytes, zeroed, rounded up to whole pages.
    pub(crate) fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = len.max(1).next_multiple_of(page);
        // SAFETY: an anonymous private mapping without an address hint touches no existing
        // memory; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; whoever drops a Mapping has
        // made sure nothing (kernel included) uses it any more (see BufPool's Drop).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
