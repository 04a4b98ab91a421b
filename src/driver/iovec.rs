//! Buffers described for vectored system calls.

use bytes::Bytes;

/// iovecs over `bufs[first..]` (at most `limit` of them), the first skipping `skip`
/// bytes already sent. They point into the Bytes' heap memory: valid while `bufs` lives
/// and is not changed.
pub(crate) fn iovecs(bufs: &[Bytes], first: usize, skip: usize, limit: usize) -> Vec<libc::iovec> {
    bufs[first..]
        .iter()
        .take(limit)
        .enumerate()
        .map(|(i, buf)| {
            let skip = if i == 0 { skip.min(buf.len()) } else { 0 };
            libc::iovec {
                iov_base: buf[skip..].as_ptr() as *mut libc::c_void,
                iov_len: buf.len() - skip,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_into_the_first_buffer_and_stops_at_the_limit() {
        let bufs: Vec<Bytes> = ["abc", "de", "fgh", "i"]
            .iter()
            .map(|s| Bytes::from(*s))
            .collect();
        let iov = iovecs(&bufs, 1, 1, 2);
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_len, 1);
        assert_eq!(iov[0].iov_base as *const u8, bufs[1][1..].as_ptr());
        assert_eq!(iov[1].iov_len, 3);
    }
}
