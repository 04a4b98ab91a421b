//! The batch senders' message buffers: one group's messages in one buffer, each message
//! a slice of it, reused once the socket has let go of it.

use bytes::{Bytes, BytesMut};

use super::peer::{self, FILL};

/// One group's messages in one buffer, reused once the stream has let go of it, so a
/// sender neither allocates nor fills per message (as the writev peer reuses its buffer).
pub(crate) struct GroupBuffer {
    size: usize,
    /// Bytes from one message's start to the next: `size`, or one more when gapped.
    stride: usize,
    batch: usize,
    spare: Option<Bytes>,
    /// Test hook: the first group carries messages 1 and 2 swapped.
    swap: bool,
}

impl GroupBuffer {
    /// Buffers for groups of up to `batch` messages of `size` bytes.
    pub(crate) fn new(size: usize, batch: usize) -> GroupBuffer {
        GroupBuffer {
            size,
            stride: size,
            batch,
            spare: None,
            swap: false,
        }
    }

    /// The same, with a byte left between messages when `gapped` is set, so no two of
    /// them sit end to end in memory and none can share an iovec with the next.
    pub(crate) fn with_gap(mut self, gapped: bool) -> GroupBuffer {
        self.stride = self.size + usize::from(gapped);
        self
    }

    /// The same, with messages 1 and 2 of the first group swapped when `swap` is set
    /// (the `RINGSOCK_BENCH_FAULT=swap` test hook).
    pub(crate) fn with_swap(mut self, swap: bool) -> GroupBuffer {
        self.swap = swap;
        self
    }

    /// The buffer with messages `first..first + n` stamped at the front. It holds the
    /// `n` messages taken, not a whole `batch` (a run of 3 messages of 1 MiB in groups
    /// of 4096 allocated 4 GiB).
    pub(crate) fn take(&mut self, first: u64, n: usize) -> Bytes {
        let need = self.stride * n.min(self.batch);
        let mut buf = match self.spare.take().map(Bytes::try_into_mut) {
            Some(Ok(buf)) if buf.len() >= need => buf,
            // Still referenced, too small (or the first group): a new one.
            _ => {
                let mut buf = BytesMut::with_capacity(need);
                buf.resize(need, FILL);
                buf
            }
        };
        for j in 0..n {
            peer::stamp(&mut buf[j * self.stride..], first + j as u64);
        }
        if self.swap && first == 0 && n >= 3 {
            peer::stamp(&mut buf[self.stride..], 2);
            peer::stamp(&mut buf[2 * self.stride..], 1);
        }
        buf.freeze()
    }

    /// Message `j` of a group returned by [`take`](Self::take).
    pub(crate) fn message(&self, group: &Bytes, j: usize) -> Bytes {
        let start = j * self.stride;
        group.slice(start..start + self.size)
    }

    /// Message `j` of a group returned by [`take`](Self::take), borrowed.
    pub(crate) fn message_bytes<'a>(&self, group: &'a Bytes, j: usize) -> &'a [u8] {
        let start = j * self.stride;
        &group[start..start + self.size]
    }

    /// Gives the group back for reuse (once every slice of it is dropped).
    pub(crate) fn recycle(&mut self, group: Bytes) {
        self.spare = Some(group);
    }
}

/// The groups of `count` messages in groups of `batch`: (first message, messages).
pub(crate) fn groups(count: u64, batch: usize) -> impl Iterator<Item = (u64, usize)> {
    (0..count)
        .step_by(batch.max(1))
        .map(move |first| (first, (count - first).min(batch as u64) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_buffer_is_reused_once_released() {
        let mut groups = GroupBuffer::new(16, 4);
        let g = groups.take(0, 4);
        let ptr = g.as_ptr();
        let slices: Vec<Bytes> = (0..4).map(|j| groups.message(&g, j)).collect();
        assert_eq!(peer::read_seq(&slices[3]), 3);
        drop(slices);
        groups.recycle(g);
        let g = groups.take(4, 2);
        assert_eq!(g.as_ptr(), ptr, "the released buffer is reused");
        assert_eq!(peer::read_seq(&g[16..]), 5);
        assert!(g[8..16].iter().all(|&b| b == FILL));
    }

    #[test]
    fn a_group_buffer_holds_the_messages_taken_not_a_whole_batch() {
        let mut groups = GroupBuffer::new(16, 4096);
        let g = groups.take(0, 3);
        assert_eq!(g.len(), 48);
        groups.recycle(g);
        let g = groups.take(3, 5);
        assert_eq!(g.len(), 80, "a spare too small is not reused");
        assert_eq!(peer::read_seq(&groups.message(&g, 4)), 7);
    }

    #[test]
    fn a_group_buffer_still_in_use_is_not_overwritten() {
        let mut groups = GroupBuffer::new(16, 4);
        let g = groups.take(0, 4);
        let held = g.slice(0..16);
        groups.recycle(g);
        let _next = groups.take(4, 4);
        assert_eq!(peer::read_seq(&held), 0);
    }

    #[test]
    fn the_swap_hook_swaps_messages_1_and_2_of_the_first_group_only() {
        let mut groups = GroupBuffer::new(16, 4).with_swap(true);
        let g = groups.take(0, 4);
        let seqs: Vec<u64> = (0..4).map(|j| peer::read_seq(&g[j * 16..])).collect();
        assert_eq!(seqs, [0, 2, 1, 3]);
        let g = groups.take(4, 4);
        assert_eq!(peer::read_seq(&g[16..]), 5);
    }

    #[test]
    fn gapped_messages_are_not_end_to_end() {
        let mut groups = GroupBuffer::new(16, 4).with_gap(true);
        let g = groups.take(0, 4);
        let a = groups.message(&g, 0);
        let b = groups.message(&g, 1);
        assert_eq!(b.len(), 16);
        assert_ne!(a.as_ptr().wrapping_add(a.len()), b.as_ptr());
        assert_eq!(peer::read_seq(&b), 1);
    }

    #[test]
    fn groups_cover_every_message_once() {
        let all: Vec<(u64, usize)> = groups(10, 4).collect();
        assert_eq!(all, [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(groups(0, 4).count(), 0);
    }
}
