//! The Internet checksum (RFC 1071), summed 64 bits at a time.

use std::net::IpAddr;

/// Adds `data` (as big-endian 16-bit words; an odd last byte is padded with zero) to
/// the one's-complement sum `sum`. The sum is kept unfolded in 64 bits; [`fold`] it.
pub fn add(mut sum: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        let value = u64::from_be_bytes(word.try_into().expect("8 bytes"));
        let (new, carry) = sum.overflowing_add(value);
        sum = new + carry as u64;
    }
    let rest = words.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    let (new, carry) = sum.overflowing_add(u64::from_be_bytes(tail));
    new + carry as u64
}

/// Folds a 64-bit sum into 16 bits (not complemented).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum field's value for `sum`: the complement of the folded sum.
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}

/// The sum of the TCP/UDP pseudo-header: addresses, protocol and transport length.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, len: u32) -> u64 {
    let mut sum = 0;
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            sum = add(sum, &src.octets());
            sum = add(sum, &dst.octets());
        }
        (src, dst) => {
            sum = add(sum, &v6_octets(src));
            sum = add(sum, &v6_octets(dst));
        }
    }
    sum + protocol as u64 + len as u64
}

fn v6_octets(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V6(addr) => addr.octets(),
        IpAddr::V4(addr) => addr.to_ipv6_mapped().octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The straightforward 16-bit sum, to check the 64-bit one against.
    fn reference(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in data.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += word as u32;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add(0, &data)), 0xddf2);
    }

    #[test]
    fn matches_the_reference_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7919 % 251) as u8 ^ 0xa5).collect();
        for start in 0..8 {
            for len in 0..(data.len() - start) {
                let slice = &data[start..start + len];
                assert_eq!(fold(add(0, slice)), reference(slice), "len {len}");
            }
        }
    }

    #[test]
    fn all_ones_do_not_overflow() {
        let data = vec![0xffu8; 70000];
        // 0xffff words add nothing in one's complement: the start sum stays.
        assert_eq!(fold(add(u64::MAX - 3, &data)), fold(u64::MAX - 3));
    }

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        // A known IPv4 header (wikipedia's example) with its checksum b861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(finish(add(0, &header)), 0);
        let mut zeroed = header;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(finish(add(0, &zeroed)), 0xb861);
    }
}
