#![allow(unsafe_code)]
//! Owned buffers: what a read fills and a write sends.
//!
//! Every operation takes its buffer by value and gives it back with the result, because on
//! io_uring the kernel reads or writes the memory after the call has returned: the buffer
//! must belong to the operation, not be borrowed from the caller, until the completion
//! arrives. See `driver::uring` for how a dropped operation keeps its buffer alive.

use bytes::{Bytes, BytesMut};

/// A buffer the kernel may read from, whose memory stays put while it is owned.
///
/// # Safety
///
/// - `stable_ptr` must point to `bytes_init` initialised bytes.
/// - The pointer must stay valid and the bytes unchanged while the value is alive and not
///   mutated, even if the value itself is moved (heap storage, not inline storage).
pub unsafe trait IoBuf: 'static {
    /// Pointer to the first byte.
    fn stable_ptr(&self) -> *const u8;
    /// Number of initialised bytes, all of which a write sends.
    fn bytes_init(&self) -> usize;
}

/// A buffer the kernel may write into: a read fills its spare capacity.
///
/// # Safety
///
/// - `stable_mut_ptr` must point to `bytes_total` bytes of writable memory, of which the
///   first `bytes_init` are initialised.
/// - The pointer must stay valid while the value is alive, even if the value is moved.
/// - `set_init(n)` may only be called after the first `n` bytes were initialised.
pub unsafe trait IoBufMut: IoBuf {
    /// Pointer to the first byte, writable.
    fn stable_mut_ptr(&mut self) -> *mut u8;
    /// Capacity: a read writes at most `bytes_total - bytes_init` bytes.
    fn bytes_total(&self) -> usize;
    /// Marks the first `init` bytes as initialised.
    ///
    /// # Safety
    ///
    /// The first `init` bytes must have been written.
    unsafe fn set_init(&mut self, init: usize);
}

/// The result of an operation together with the buffer it owned.
pub type BufResult<T, B> = (crate::Result<T>, B);

// SAFETY: a Vec's heap allocation does not move when the Vec is moved; `len` bytes are
// initialised.
unsafe impl IoBuf for Vec<u8> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: as for IoBuf; the spare capacity up to `capacity()` is writable.
unsafe impl IoBufMut for Vec<u8> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        self.capacity()
    }
    unsafe fn set_init(&mut self, init: usize) {
        if init > self.len() {
            // SAFETY: the caller promises the first `init` bytes were written, and a read
            // never writes past `capacity()`.
            unsafe { self.set_len(init) };
        }
    }
}

// SAFETY: Bytes is immutable, reference counted heap (or static) memory that never moves.
unsafe impl IoBuf for Bytes {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: BytesMut's storage is heap memory that does not move when the handle moves.
unsafe impl IoBuf for BytesMut {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: as for IoBuf; the spare capacity up to `capacity()` is writable.
unsafe impl IoBufMut for BytesMut {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        self.capacity()
    }
    unsafe fn set_init(&mut self, init: usize) {
        if init > self.len() {
            // SAFETY: the caller promises the first `init` bytes were written.
            unsafe { self.set_len(init) };
        }
    }
}

// SAFETY: a static slice lives for the whole program and is never written.
unsafe impl IoBuf for &'static [u8] {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: a static str lives for the whole program and is never written.
unsafe impl IoBuf for &'static str {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

/// The initialised bytes of `buf`, as a slice.
pub(crate) fn init_bytes<B: IoBuf>(buf: &B) -> &[u8] {
    if buf.bytes_init() == 0 {
        return &[];
    }
    // SAFETY: IoBuf's contract: `stable_ptr` points to `bytes_init` initialised bytes that
    // stay valid and unchanged while `buf` is alive and not mutated, which the shared
    // borrow of `buf` guarantees for the slice's lifetime.
    unsafe { std::slice::from_raw_parts(buf.stable_ptr(), buf.bytes_init()) }
}

/// Puts `front` before the bytes of `bytes` (bytes a reader took and gives back unread).
pub(crate) fn prepend(bytes: &mut bytes::Bytes, front: bytes::Bytes) {
    if front.is_empty() {
        return;
    }
    if bytes.is_empty() {
        *bytes = front;
        return;
    }
    let mut joined = bytes::BytesMut::with_capacity(front.len() + bytes.len());
    joined.extend_from_slice(&front);
    joined.extend_from_slice(bytes);
    *bytes = joined.freeze();
}

/// Puts `back` after the bytes of `bytes` (bytes a dropped receive took, behind those
/// taken before it).
pub(crate) fn append(bytes: &mut bytes::Bytes, back: bytes::Bytes) {
    let front = std::mem::replace(bytes, back);
    prepend(bytes, front);
}

/// Copies as much of `src` as fits into the spare capacity of `buf` (after its
/// `bytes_init` bytes), marks it initialised and returns how many bytes were copied.
pub(crate) fn fill_spare<B: IoBufMut>(buf: &mut B, src: &[u8]) -> usize {
    let init = buf.bytes_init();
    let n = src.len().min(buf.bytes_total().saturating_sub(init));
    if n == 0 {
        return 0;
    }
    // SAFETY: IoBufMut's contract: `stable_mut_ptr` points to `bytes_total` writable bytes,
    // and `init + n <= bytes_total`; `src` is a separate borrow, so the ranges cannot
    // overlap (`buf` is borrowed mutably).
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), buf.stable_mut_ptr().add(init), n);
        // SAFETY: the first `init` bytes were initialised before, the next `n` just now.
        buf.set_init(init + n);
    }
    n
}
