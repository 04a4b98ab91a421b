//! The poisoning allocator the misuse tests run under really sees a write into freed
//! memory made by the kernel, the kind of write a buffer freed under io_uring receives.

mod util;

#[global_allocator]
static ALLOC: util::poison::PoisonAlloc = util::poison::PoisonAlloc;

#[test]
fn a_kernel_write_into_a_freed_buffer_is_caught() {
    assert_eq!(util::poison::corrupted(), 0, "clean before the write");
    let buf = vec![0u8; 4096];
    let freed = buf.as_ptr() as *mut libc::c_void;
    drop(buf);
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: writes 6 bytes from a live literal into the pipe.
    assert_eq!(
        unsafe { libc::write(fds[1], b"kernel".as_ptr().cast(), 6) },
        6
    );
    // SAFETY: the freed block is still mapped (the quarantine holds it from the system
    // allocator), so the kernel's write lands in it, as a write from io_uring would.
    assert_eq!(unsafe { libc::read(fds[0], freed, 6) }, 6);
    assert!(
        util::poison::corrupted() >= 1,
        "a write into a freed block went unseen"
    );
    // SAFETY: closes the two descriptors pipe made.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}
