//! How far a batch of writes got, and what it cost: shared by the engines' batched
//! sends and the layers above them.

use bytes::Bytes;

/// Where a stream batch stands: every byte before (`first`, `skip`) has been sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Index of the first buffer not completely sent.
    pub(crate) first: usize,
    /// Bytes of `bufs[first]` already sent.
    pub(crate) skip: usize,
}

impl Progress {
    /// Moves past `sent` more bytes.
    pub(crate) fn advance(&mut self, bufs: &[Bytes], mut sent: usize) {
        while sent > 0 && self.first < bufs.len() {
            let left = bufs[self.first].len() - self.skip;
            if sent >= left {
                sent -= left;
                self.first += 1;
                self.skip = 0;
            } else {
                self.skip += sent;
                sent = 0;
            }
        }
        // Empty buffers after the position are complete too.
        while self.first < bufs.len() && bufs[self.first].len() == self.skip {
            self.first += 1;
            self.skip = 0;
        }
    }

    pub(crate) fn done(&self, bufs: &[Bytes]) -> bool {
        self.first >= bufs.len()
    }
}

/// What one batch of stream writes cost and how it ended.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BatchReport {
    /// Kernel operations submitted (SQEs or direct calls).
    pub(crate) operations: u64,
    /// Times a short send or a cut chain was resubmitted from its byte offset.
    pub(crate) short_send_recoveries: u64,
}
