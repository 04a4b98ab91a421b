//! A session: the two directions' ChaCha20-Poly1305 keys from one handshake, the send
//! counter and the replay window, and the data message format.
//!
//! A session is shared by every thread of a tunnel. The counter space is cut into 64
//! lanes (its top 6 bits), one per sending thread: each lane's next counter is an
//! atomic, so no two seals ever use the same nonce, and each thread's messages leave
//! in counter order, however the threads interleave. The receiver keeps one replay
//! window per lane, shared by all its threads behind a lock held only to check or mark
//! a counter (never while decrypting): a datagram replayed onto another thread's socket
//! is still refused, and one thread racing ahead does not push another's messages out
//! of the window. One thread uses lane 0 only, as a tunnel always did.
//!
//! A data message is a 16-byte header — type (1 byte), 3 zero bytes, the receiver's
//! session tag (4), the counter (8, little-endian) — then the sealed packet and its
//! 16-byte Poly1305 tag. The header is the associated data; the nonce is 4 zero bytes
//! and the counter, which never repeats under one key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use ring::hkdf;

use super::replay::ReplayWindow;

/// The type byte of a data message.
pub(crate) const DATA: u8 = 4;
/// Bytes before the sealed packet.
pub const DATA_HEADER: usize = 16;
/// Bytes of the authentication tag after it.
pub const TAG_LEN: usize = 16;
/// Lanes of the counter space: its top bits name the sending thread's lane.
pub(crate) const LANES: usize = 64;
/// Bits of a counter below its lane.
const LANE_SHIFT: u32 = 58;
/// Counters of a lane at and past this are never used: the session must be replaced
/// first (far beyond any real session's life, kept well clear of the next lane).
const COUNTER_LIMIT: u64 = 1 << 56;

/// Which end of the handshake this side was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Initiator,
    Responder,
}

/// Why a data message was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Shorter than a header and a tag, or not a data message.
    Malformed,
    /// Its counter was seen already, or is older than the window.
    Replayed,
    /// The tag did not verify: tampered, or sealed under another key.
    Forged,
}

struct LenKey(usize);

impl hkdf::KeyType for LenKey {
    fn len(&self) -> usize {
        self.0
    }
}

/// Expands `prk` with `label` into `N` bytes.
pub(crate) fn expand<const N: usize>(prk: &hkdf::Prk, label: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    prk.expand(&[label], LenKey(N))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 gives up to 8160 bytes");
    out
}

/// One direction's key and tag.
struct Direction {
    key: LessSafeKey,
    tag: [u8; 4],
}

impl Direction {
    fn derive(prk: &hkdf::Prk, label: &str) -> Direction {
        let key: [u8; 32] = expand(prk, format!("{label} key").as_bytes());
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key).expect("a 32-byte key");
        Direction {
            key: LessSafeKey::new(unbound),
            tag: expand(prk, format!("{label} tag").as_bytes()),
        }
    }
}

/// The keys of one handshake.
pub(crate) struct Session {
    send: Direction,
    recv: Direction,
    lanes: Box<[Lane]>,
}

/// One lane of a session, aligned so that threads on different lanes never write the
/// same cache line (128 bytes: x86 prefetches lines in pairs).
#[repr(align(128))]
struct Lane {
    /// The next send counter: taken with one `fetch_add`, so each is used once whichever
    /// thread seals.
    next_counter: AtomicU64,
    /// The replay window of the peer's messages in this lane.
    window: Mutex<ReplayWindow>,
}

fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

impl Session {
    /// The session of the handshake that exchanged `initiator_random` and
    /// `responder_random` under `psk`, seen from `role`: HKDF-SHA256 over the key and
    /// both randoms, one label per direction.
    pub(crate) fn derive(
        psk: &[u8; 32],
        initiator_random: &[u8; 32],
        responder_random: &[u8; 32],
        role: Role,
    ) -> Session {
        let mut ikm = [0u8; 96];
        ikm[..32].copy_from_slice(psk);
        ikm[32..64].copy_from_slice(initiator_random);
        ikm[64..].copy_from_slice(responder_random);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ringsock tunnel v1 session").extract(&ikm);
        let to_responder = Direction::derive(&prk, "initiator to responder");
        let to_initiator = Direction::derive(&prk, "responder to initiator");
        let (send, recv) = match role {
            Role::Initiator => (to_responder, to_initiator),
            Role::Responder => (to_initiator, to_responder),
        };
        Session {
            send,
            recv,
            lanes: (0..LANES)
                .map(|_| Lane {
                    next_counter: AtomicU64::new(0),
                    window: Mutex::new(ReplayWindow::default()),
                })
                .collect(),
        }
    }

    /// The tag data messages to this side carry.
    pub(crate) fn recv_tag(&self) -> [u8; 4] {
        self.recv.tag
    }

    /// Seals the packet in `buf[DATA_HEADER..]` in place under the next counter of
    /// `lane` (taken modulo [`LANES`]): writes the header, encrypts, appends the tag.
    /// `None` once the lane's counters are used up (a new handshake is due).
    pub(crate) fn seal(&self, lane: usize, buf: &mut Vec<u8>) -> Option<()> {
        let lane = lane % LANES;
        // Relaxed: the counter orders nothing else; uniqueness is the atomic's own. Past
        // the limit it keeps growing, 2^58 - 2^56 increments away from the next lane.
        let next = self.lanes[lane]
            .next_counter
            .fetch_add(1, Ordering::Relaxed);
        if next >= COUNTER_LIMIT {
            return None;
        }
        let counter = (lane as u64) << LANE_SHIFT | next;
        let mut header = [0u8; DATA_HEADER];
        header[0] = DATA;
        header[4..8].copy_from_slice(&self.send.tag);
        header[8..].copy_from_slice(&counter.to_le_bytes());
        buf[..DATA_HEADER].copy_from_slice(&header);
        let tag = self
            .send
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(header), &mut buf[DATA_HEADER..])
            .ok()?;
        buf.extend_from_slice(tag.as_ref());
        Some(())
    }

    /// Opens the data message in `buf` in place; the packet is then
    /// `buf[DATA_HEADER..DATA_HEADER + n]` for the returned `n`. Only a message that
    /// authenticates moves the replay window.
    pub(crate) fn open(&self, buf: &mut [u8]) -> Result<usize, OpenError> {
        if buf.len() < DATA_HEADER + TAG_LEN || buf[0] != DATA || buf[4..8] != self.recv.tag {
            return Err(OpenError::Malformed);
        }
        let counter = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        if !self.window(counter).check(counter) {
            return Err(OpenError::Replayed);
        }
        let (header, sealed) = buf.split_at_mut(DATA_HEADER);
        let aad = Aad::from(&header[..]);
        let plain = self
            .recv
            .key
            .open_in_place(nonce(counter), aad, sealed)
            .map_err(|_| OpenError::Forged)?
            .len();
        // Two threads may both have passed the check with the same counter: the one
        // that marks it second refuses it here.
        if !self.window(counter).accept(counter) {
            return Err(OpenError::Replayed);
        }
        Ok(plain)
    }

    /// The replay window of `counter`'s lane (every counter has one: 64 lanes of 2^58).
    fn window(&self, counter: u64) -> MutexGuard<'_, ReplayWindow> {
        let lane = (counter >> LANE_SHIFT) as usize;
        // The window is consistent between any two statements: a panic elsewhere while
        // it was held leaves it usable.
        self.lanes[lane]
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// The session tag a data message carries, if it is one.
pub(crate) fn data_tag(msg: &[u8]) -> Option<[u8; 4]> {
    (msg.len() >= DATA_HEADER + TAG_LEN && msg[0] == DATA)
        .then(|| msg[4..8].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Session, Session) {
        let psk = [7u8; 32];
        let (a, b) = ([1u8; 32], [2u8; 32]);
        (
            Session::derive(&psk, &a, &b, Role::Initiator),
            Session::derive(&psk, &a, &b, Role::Responder),
        )
    }

    fn sealed(session: &Session, packet: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; DATA_HEADER];
        buf.extend_from_slice(packet);
        session.seal(0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn each_direction_opens_what_the_other_sealed_once() {
        let (initiator, responder) = pair();
        let mut msg = sealed(&initiator, b"hello");
        assert_eq!(msg.len(), DATA_HEADER + 5 + TAG_LEN);
        let copy = msg.clone();
        let n = responder.open(&mut msg).unwrap();
        assert_eq!(&msg[DATA_HEADER..DATA_HEADER + n], b"hello");
        assert_eq!(responder.open(&mut copy.clone()), Err(OpenError::Replayed));
        // The initiator cannot open its own direction.
        assert_eq!(initiator.open(&mut copy.clone()), Err(OpenError::Malformed));

        let mut back = sealed(&responder, b"world");
        let n = initiator.open(&mut back).unwrap();
        assert_eq!(&back[DATA_HEADER..DATA_HEADER + n], b"world");
    }

    #[test]
    fn tampering_anywhere_is_caught_and_does_not_burn_the_counter() {
        let (initiator, responder) = pair();
        let msg = sealed(&initiator, &[0xab; 100]);
        for at in [1, 9, DATA_HEADER, DATA_HEADER + 50, msg.len() - 1] {
            let mut bad = msg.clone();
            bad[at] ^= 1;
            assert!(responder.open(&mut bad).is_err(), "flip at {at}");
        }
        assert_eq!(
            responder.open(&mut msg[..20].to_vec()),
            Err(OpenError::Malformed)
        );
        let mut good = msg.clone();
        assert!(responder.open(&mut good).is_ok());
    }

    #[test]
    fn another_key_or_another_handshake_opens_nothing() {
        let (initiator, _) = pair();
        let other = Session::derive(&[8u8; 32], &[1u8; 32], &[2u8; 32], Role::Responder);
        let mut msg = sealed(&initiator, b"x");
        assert!(other.open(&mut msg).is_err());
        let later = Session::derive(&[7u8; 32], &[1u8; 32], &[3u8; 32], Role::Responder);
        let mut msg = sealed(&initiator, b"x");
        assert!(later.open(&mut msg).is_err());
    }

    #[test]
    fn threads_sealing_at_once_never_share_a_counter_and_each_message_opens_once() {
        let (initiator, responder) = pair();
        let messages: Vec<Vec<u8>> = std::thread::scope(|scope| {
            // Two threads on one lane, two on lanes of their own.
            let sealers: Vec<_> = [0, 0, 1, 63]
                .into_iter()
                .map(|lane| {
                    let initiator = &initiator;
                    scope.spawn(move || {
                        (0..500)
                            .map(|_| {
                                let mut buf = vec![0u8; DATA_HEADER + 1];
                                initiator.seal(lane, &mut buf).unwrap();
                                buf
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            sealers
                .into_iter()
                .flat_map(|sealer| sealer.join().unwrap())
                .collect()
        });
        let mut counters: Vec<u64> = messages
            .iter()
            .map(|m| u64::from_le_bytes(m[8..16].try_into().unwrap()))
            .collect();
        counters.sort_unstable();
        counters.dedup();
        assert_eq!(counters.len(), 2000);
        // Each message offered to two threads at once opens on exactly one of them.
        let opened: usize = std::thread::scope(|scope| {
            let openers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        messages
                            .iter()
                            .filter(|m| responder.open(&mut m.to_vec()).is_ok())
                            .count()
                    })
                })
                .collect();
            openers.into_iter().map(|o| o.join().unwrap()).sum()
        });
        assert_eq!(opened, 2000);
    }

    #[test]
    fn one_lane_racing_ahead_does_not_push_another_out_of_the_window() {
        let (initiator, responder) = pair();
        let seal = |lane| {
            let mut buf = vec![0u8; DATA_HEADER + 1];
            initiator.seal(lane, &mut buf).unwrap();
            buf
        };
        let late = seal(0);
        for _ in 0..10_000 {
            assert!(responder.open(&mut seal(1)).is_ok());
        }
        let mut copy = late.clone();
        assert!(responder.open(&mut late.clone()).is_ok());
        assert_eq!(responder.open(&mut copy), Err(OpenError::Replayed));
    }
}
