//! Sockets registered in the ring's file table (IORING_REGISTER_FILES2, sparse): an
//! entry that names a registered file skips the kernel's descriptor lookup and its
//! reference count (`fget`/`fput`), which a socket that forwards by itself
//! ([`recv_tap`](super::recv_tap)) would otherwise pay on every datagram it sends.
//!
//! A file in the table stays open whatever becomes of its descriptor, so a slot is
//! emptied when its holder lets go ([`RegisteredFile`]'s drop), before the holder's
//! descriptor closes; entries that name the slot and still wait in the submission queue
//! go to the kernel first (a request takes its file when it is issued, and keeps it).
//! The table is set up on first use, as large as the descriptor limit allows up to
//! [`TABLE_SLOTS`]; where the kernel refuses it, or every slot is taken, sockets are
//! named by their descriptors as before.

use std::os::fd::RawFd;
use std::rc::Weak;

use io_uring::Submitter;

use super::Shared;

/// Slots of the table: sockets that can forward through it at once.
const TABLE_SLOTS: u32 = 1024;

/// The ring's file table and its free slots.
#[derive(Default)]
pub(super) struct FixedFiles {
    /// The table was asked for (it is not asked for twice).
    set_up: bool,
    /// The kernel holds a table.
    registered: bool,
    /// Slots no file holds, the lowest last.
    free: Vec<u32>,
}

impl FixedFiles {
    /// Puts `fd`'s file into a free slot, setting the table up on first use: the slot,
    /// or none where there is no table or no free slot.
    pub(super) fn install(&mut self, submitter: &Submitter<'_>, fd: RawFd) -> Option<u32> {
        if !self.set_up {
            self.set_up = true;
            let slots = TABLE_SLOTS.min(descriptor_limit());
            if slots > 0 && submitter.register_files_sparse(slots).is_ok() {
                self.registered = true;
                self.free = (0..slots).rev().collect();
            }
        }
        let slot = self.free.pop()?;
        match submitter.register_files_update(slot, &[fd]) {
            Ok(1) => Some(slot),
            _ => {
                self.free.push(slot);
                None
            }
        }
    }

    /// Empties `slot`, whose entries were all submitted. A slot the kernel would not
    /// empty is never used again: its file stays open until the ring goes, which beats
    /// naming a stranger's socket.
    pub(super) fn remove(&mut self, submitter: &Submitter<'_>, slot: u32) {
        if matches!(submitter.register_files_update(slot, &[-1]), Ok(1)) {
            self.free.push(slot);
        }
    }

    /// Gives the whole table up, for a driver that is going: sockets that outlive their
    /// runtime close when their descriptors do, not when the ring's last handle goes
    /// (and the kernel's exit work after it). Entries in flight keep their files.
    pub(super) fn close(&mut self, submitter: &Submitter<'_>) {
        if self.registered && submitter.unregister_files().is_ok() {
            self.registered = false;
        }
        self.free.clear();
    }
}

/// The soft limit on open descriptors: the kernel refuses a larger table.
fn descriptor_limit() -> u32 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given, which lives on this stack.
    match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => limit.rlim_cur.min(u32::MAX as libc::rlim_t) as u32,
        _ => 0,
    }
}

/// A socket's file in one slot of the ring's table, for as long as this lives.
pub(crate) struct RegisteredFile {
    slot: u32,
    driver: Weak<Shared>,
}

impl RegisteredFile {
    pub(super) fn new(slot: u32, driver: Weak<Shared>) -> RegisteredFile {
        RegisteredFile { slot, driver }
    }

    /// The slot, for entries to name (`types::Fixed`).
    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }
}

impl Drop for RegisteredFile {
    fn drop(&mut self) {
        // A driver that is gone took its table with it.
        if let Some(shared) = self.driver.upgrade() {
            shared.unregister_file(self.slot);
        }
    }
}
