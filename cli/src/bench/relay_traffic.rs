//! The udp-relay datagram: its layout, its pattern and the check the sink makes, so a
//! relay that loses, damages, mixes up or repeats a datagram is caught.
//!
//! Little-endian: bytes 0-3 the flow id (u32), 4-11 the flow's sequence number (u64),
//! 12-19 the send time (u64 ns, CLOCK_MONOTONIC), then the pattern: 8-byte words, the
//! last one cut short, word j being output j of splitmix64 seeded with
//! `(flow << 40) ^ seq`. Every bit of a word depends on every bit of the seed, so even
//! the 4 pattern bytes of the smallest datagram tell two packets apart.
//!
//! The seed keeps the low 24 bits of the flow id only; a flow id damaged above them is
//! caught by the sink's range check (at most 1024 flows) instead.
//!
//! Global packet g (0-based, in send order) belongs to flow g mod F with sequence
//! g div F: the flows are sent round robin.

/// Bytes before the pattern: flow, sequence number, send time.
pub const HEADER: usize = 20;
/// The smallest datagram: the header and 4 pattern bytes.
pub const MIN_SIZE: usize = 24;
/// The largest datagram.
pub const MAX_SIZE: usize = 8192;
/// The flow id of the end-of-run marker; never data, never forwarded.
pub const END_FLOW: u32 = u32::MAX;

/// Pattern word `j` of packet (`flow`, `seq`): output `j` of splitmix64 seeded with
/// `(flow << 40) ^ seq`.
#[inline]
pub fn word(flow: u32, seq: u64, j: usize) -> u64 {
    let seed = (u64::from(flow) << 40) ^ seq;
    let mut z = seed.wrapping_add((j as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes the flow, the sequence number and the pattern into `buf` (at least
/// [`HEADER`] bytes); the send time is stamped separately, just before the send.
pub fn fill(buf: &mut [u8], flow: u32, seq: u64) {
    buf[0..4].copy_from_slice(&flow.to_le_bytes());
    buf[4..12].copy_from_slice(&seq.to_le_bytes());
    for (j, chunk) in buf[HEADER..].chunks_mut(8).enumerate() {
        let w = word(flow, seq, j).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// Writes the send time (ns) into a filled datagram.
#[inline]
pub fn stamp(buf: &mut [u8], ns: u64) {
    buf[12..20].copy_from_slice(&ns.to_le_bytes());
}

/// A datagram that passed [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Its flow.
    pub flow: u32,
    /// Its sequence number within the flow.
    pub seq: u64,
    /// When it was sent (ns, CLOCK_MONOTONIC).
    pub sent_ns: u64,
}

/// The flow, sequence number and send time of `datagram` when it is exactly `size`
/// bytes and its pattern is the one of its flow and sequence number; `None` otherwise.
pub fn check(datagram: &[u8], size: usize) -> Option<Checked> {
    if datagram.len() != size || size < HEADER {
        return None;
    }
    let flow = u32::from_le_bytes(datagram[0..4].try_into().ok()?);
    let seq = u64::from_le_bytes(datagram[4..12].try_into().ok()?);
    let sent_ns = u64::from_le_bytes(datagram[12..20].try_into().ok()?);
    let intact = datagram[HEADER..]
        .chunks(8)
        .enumerate()
        .all(|(j, chunk)| chunk == &word(flow, seq, j).to_le_bytes()[..chunk.len()]);
    intact.then_some(Checked { flow, seq, sent_ns })
}

/// Whether `datagram` is the end-of-run marker.
#[inline]
pub fn is_end(datagram: &[u8]) -> bool {
    datagram.len() >= 4 && datagram[0..4] == END_FLOW.to_le_bytes()
}

/// An end-of-run marker of `size` bytes.
pub fn end_marker(size: usize) -> Vec<u8> {
    let mut marker = vec![0u8; size.max(MIN_SIZE)];
    marker[0..4].copy_from_slice(&END_FLOW.to_le_bytes());
    marker
}

/// Packets flow `flow` of `flows` carries when `count` are sent round robin.
pub fn flow_count(count: u64, flows: usize, flow: usize) -> u64 {
    let (flows, flow) = (flows as u64, flow as u64);
    if flow >= count {
        0
    } else {
        (count - flow).div_ceil(flows)
    }
}

/// The flow and sequence number of global packet `g`.
#[inline]
pub fn packet(g: u64, flows: usize) -> (u32, u64) {
    let flows = flows as u64;
    // The flow fits: flows are at most MAX_FLOWS.
    ((g % flows) as u32, g / flows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(size: usize, flow: u32, seq: u64) -> Vec<u8> {
        let mut buf = vec![0u8; size];
        fill(&mut buf, flow, seq);
        stamp(&mut buf, 42);
        buf
    }

    #[test]
    fn an_intact_datagram_passes() {
        for size in [MIN_SIZE, 25, 172, 1400, MAX_SIZE] {
            let d = datagram(size, 7, 123_456);
            let expected = Checked {
                flow: 7,
                seq: 123_456,
                sent_ns: 42,
            };
            assert_eq!(check(&d, size), Some(expected), "size {size}");
        }
    }

    #[test]
    fn any_flipped_pattern_byte_is_rejected() {
        for size in [MIN_SIZE, 25, 172, 1400] {
            let d = datagram(size, 7, 123_456);
            for i in HEADER..size {
                let mut bad = d.clone();
                bad[i] ^= 1;
                assert_eq!(check(&bad, size), None, "size {size} byte {i}");
            }
        }
    }

    #[test]
    fn a_wrong_length_is_rejected() {
        let d = datagram(172, 3, 9);
        assert_eq!(check(&d[..171], 172), None);
        let mut longer = d.clone();
        longer.push(0);
        assert_eq!(check(&longer, 172), None);
        assert_eq!(check(&d[..10], 172), None);
    }

    #[test]
    fn another_flow_or_sequence_number_is_rejected() {
        for size in [MIN_SIZE, 172] {
            let d = datagram(size, 7, 123_456);
            // The flow's top byte is shifted out of the seed; every other header byte
            // (flow bytes 0-2, every sequence byte) is in the pattern.
            for i in (0..3).chain(4..12) {
                for bit in 0..8 {
                    let mut bad = d.clone();
                    bad[i] ^= 1 << bit;
                    assert_eq!(check(&bad, size), None, "size {size} byte {i} bit {bit}");
                }
            }
            // A flow id changed in its top byte is out of range for the sink instead.
            let mut bad = d.clone();
            bad[3] ^= 1;
            let flow = check(&bad, size).map(|c| c.flow);
            assert!(flow.is_some_and(|f| f as usize >= super::super::options::MAX_FLOWS));
        }
    }

    #[test]
    fn the_send_time_is_not_part_of_the_pattern() {
        let mut d = datagram(172, 1, 2);
        stamp(&mut d, u64::MAX);
        assert_eq!(check(&d, 172).map(|c| c.sent_ns), Some(u64::MAX));
    }

    #[test]
    fn markers_and_flow_counts() {
        assert!(is_end(&end_marker(10)));
        assert_eq!(end_marker(10).len(), MIN_SIZE);
        assert!(!is_end(&datagram(172, 0, 0)));
        let total: u64 = (0..64).map(|f| flow_count(1001, 64, f)).sum();
        assert_eq!(total, 1001);
        assert_eq!(flow_count(3, 64, 5), 0);
        assert_eq!(packet(130, 64), (2, 2));
    }
}
