//! Buffers described for vectored system calls.

use bytes::Bytes;

/// Longest iovec built by joining neighbours: far below the kernel's per-call cap, so a
/// joined entry never becomes the reason a send is refused.
const MAX_JOINED_LEN: usize = 1 << 30;

/// iovecs over `bufs[first..]` (at most `limit` of them), the first skipping `skip`
/// bytes already sent. They point into the Bytes' heap memory: valid while `bufs` lives
/// and is not changed.
///
/// Buffers that sit end to end in memory (slices of one buffer, written in order) share
/// one iovec, and empty ones get none: the kernel walks fewer entries, and a batch of
/// many small slices needs fewer system calls or links. Each buffer keeps its own
/// ownership; only the description is joined.
pub(crate) fn iovecs(bufs: &[Bytes], first: usize, skip: usize, limit: usize) -> Vec<libc::iovec> {
    let mut iovecs: Vec<libc::iovec> =
        Vec::with_capacity(bufs.len().saturating_sub(first).min(limit));
    let Some((head, rest)) = bufs.get(first..).and_then(|tail| tail.split_first()) else {
        return iovecs;
    };
    let head = &head[skip.min(head.len())..];
    for buf in std::iter::once(head).chain(rest.iter().map(|buf| &buf[..])) {
        if buf.is_empty() {
            continue;
        }
        if let Some(last) = iovecs.last_mut() {
            let end = (last.iov_base as *const u8).wrapping_add(last.iov_len);
            if end == buf.as_ptr() && last.iov_len + buf.len() <= MAX_JOINED_LEN {
                last.iov_len += buf.len();
                continue;
            }
            if iovecs.len() == limit {
                break;
            }
        }
        iovecs.push(libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        });
    }
    iovecs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_into_the_first_buffer_and_stops_at_the_limit() {
        let bufs: Vec<Bytes> = ["abc", "de", "fgh", "i"]
            .iter()
            // Separate heap blocks, so no two of them are joined.
            .map(|s| Bytes::from(s.as_bytes().to_vec()))
            .collect();
        let iov = iovecs(&bufs, 1, 1, 2);
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len, 1);
        assert_eq!(iov[0].iov_base as *const u8, bufs[1][1..].as_ptr());
        assert_eq!(iov[1].iov_len, 3);
    }

    #[test]
    fn slices_end_to_end_share_one_iovec() {
        let whole = Bytes::from(b"0123456789".to_vec());
        let bufs = vec![
            whole.slice(0..3),
            whole.slice(3..3),
            whole.slice(3..6),
            // A separate heap block: malloc never places two blocks end to end.
            Bytes::from(b"xy".to_vec()),
            whole.slice(6..10),
        ];
        let iov = iovecs(&bufs, 0, 1, 8);
        let lens: Vec<usize> = iov.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [5, 2, 4]);
        assert_eq!(iov[0].iov_base as *const u8, whole[1..].as_ptr());
    }

    #[test]
    fn the_limit_counts_iovecs_not_buffers() {
        let whole = Bytes::from(b"abcdef".to_vec());
        let mut bufs: Vec<Bytes> = (0..6).map(|i| whole.slice(i..i + 1)).collect();
        bufs.push(Bytes::from(b"gh".to_vec()));
        bufs.push(Bytes::from(b"ij".to_vec()));
        let iov = iovecs(&bufs, 0, 0, 2);
        let lens: Vec<usize> = iov.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [6, 2]);
        assert!(iovecs(&bufs, bufs.len(), 0, 2).is_empty());
    }
}
