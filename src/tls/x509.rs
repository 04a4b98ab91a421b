//! The one thing ringsock reads of a certificate itself: its version, to say why rustls
//! cannot use one (it takes version 3 only, and reports a version 1 certificate in
//! terms that blame neither file).

/// Whether `der` is an X.509 version 1 certificate: its TBSCertificate starts with the
/// serial number, where later versions start with an explicit `[0]` version. False for
/// anything that does not parse that far (rustls says what is wrong with it then).
pub(crate) fn is_version_1(der: &[u8]) -> bool {
    const INTEGER: u8 = 0x02;
    contents_of_sequence(der)
        .and_then(contents_of_sequence)
        .is_some_and(|tbs| tbs.first() == Some(&INTEGER))
}

/// What follows the tag and length of the DER SEQUENCE `bytes` starts with (only its
/// first bytes are looked at, so a length beyond `bytes` does not matter).
fn contents_of_sequence(bytes: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let (&tag, rest) = bytes.split_first()?;
    if tag != SEQUENCE {
        return None;
    }
    let (&length, rest) = rest.split_first()?;
    // Long form: the low bits count the length bytes that follow.
    let length_bytes = if length & 0x80 == 0 {
        0
    } else {
        usize::from(length & 0x7f)
    };
    rest.get(length_bytes..)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outer SEQUENCE (long-form length), TBSCertificate SEQUENCE, then its first field.
    fn certificate_starting_with(first_field: &[u8]) -> Vec<u8> {
        let mut der = vec![0x30, 0x82, 0x01, 0x00, 0x30, 0x81, 0xf0];
        der.extend_from_slice(first_field);
        der
    }

    #[test]
    fn version_1_is_told_from_version_3_and_from_garbage() {
        // v3: [0] EXPLICIT INTEGER 2, then the serial.
        let v3 = certificate_starting_with(&[0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x01, 0x07]);
        // v1: the serial at once.
        let v1 = certificate_starting_with(&[0x02, 0x01, 0x07]);
        assert!(!is_version_1(&v3));
        assert!(is_version_1(&v1));
        for garbage in [
            &[][..],
            &[0x30],
            &[0x30, 0x82],
            &[0x02, 0x01, 0x07],
            b"-----BEGIN",
        ] {
            assert!(!is_version_1(garbage), "{garbage:?}");
        }
    }
}
