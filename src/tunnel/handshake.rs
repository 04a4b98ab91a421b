//! The handshake: one round trip that exchanges fresh 32-byte randoms, each message
//! authenticated with HMAC-SHA256 under a key derived from the pre-shared key, so every
//! start of either side makes new session keys and no key ever meets a nonce twice.
//!
//! - Init (84 bytes): type 1, 3 zero bytes, the sender's id (8 random bytes, new at
//!   each start), the time (8 bytes, nanoseconds since the UNIX epoch, big-endian; each
//!   Init's later than the sender's last), the initiator's random, the MAC.
//! - Response (100 bytes): type 2, 3 zero bytes, the initiator's random, the
//!   responder's random, the MAC.
//!
//! Anyone may record an Init and send it again, from anywhere, at any time: it still
//! authenticates. Answered, each copy would replace the session the responder holds
//! for its peer's newest Init, so the confirmation of the real one would never match:
//! a flood of one recorded Init keeps a restarted peer out for as long as it lasts. So
//! a responder takes only an Init newer than every Init it took before, and none
//! carrying its own id (its own Init sent back to it). As in WireGuard, the price is a
//! clock: a peer whose clock went back is refused until this side restarts. An Init
//! this side sent in an earlier run, sent back to it, passes once.

use ring::hkdf;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use super::session::{expand, Role, Session};

pub(crate) const INIT: u8 = 1;
pub(crate) const RESPONSE: u8 = 2;
const INIT_LEN: usize = 4 + 8 + 8 + 32 + 32;
const RESPONSE_LEN: usize = 4 + 32 + 32 + 32;

/// What a handshake message led to.
pub(crate) enum Outcome {
    /// A new Init: send `reply` back; `session` is the responder's, to confirm by the
    /// first data that authenticates under it.
    Answer { reply: Vec<u8>, session: Session },
    /// Our Init was answered: the session is ready.
    Established(Session),
    /// The MAC did not verify (another key, or garbage of the right shape).
    Rejected,
    /// An authentic Init no newer than one taken before, or this side's own: a copy,
    /// not the peer starting over. Not answered. Or an authentic Response to an Init we
    /// do not wait for: a copy, or late (we sent a newer Init since).
    Replayed,
    /// An authentic Init that loses to ours when both sides start at once.
    Ignored,
    /// Not a handshake message at all.
    Malformed,
}

/// Why [`Verifier::check`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No handshake message: its type or length.
    Malformed,
    /// Its MAC did not verify, or its reserved bytes are not zero.
    Rejected,
}

impl From<Refused> for Outcome {
    fn from(refused: Refused) -> Outcome {
        match refused {
            Refused::Malformed => Outcome::Malformed,
            Refused::Rejected => Outcome::Rejected,
        }
    }
}

/// Whether a message is a handshake message that authenticates: its type, length,
/// reserved bytes and MAC. Immutable, so the threads of a tunnel check at once, with
/// no lock: a flood of forgeries holds up no thread's handshake, nor another thread.
#[derive(Clone)]
pub(crate) struct Verifier {
    mac_key: hmac::Key,
}

impl Verifier {
    pub(crate) fn new(psk: &[u8; 32]) -> Verifier {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ringsock tunnel v1 handshake").extract(psk);
        let mac: [u8; 32] = expand(&prk, b"mac");
        Verifier {
            mac_key: hmac::Key::new(hmac::HMAC_SHA256, &mac),
        }
    }

    /// `Ok` for an Init or Response that authenticates; else why not.
    pub(crate) fn check(&self, msg: &[u8]) -> Result<(), Refused> {
        let len = match msg.first() {
            Some(&INIT) if msg.len() == INIT_LEN => INIT_LEN,
            Some(&RESPONSE) if msg.len() == RESPONSE_LEN => RESPONSE_LEN,
            _ => return Err(Refused::Malformed),
        };
        let (body, tag) = msg.split_at(len - 32);
        if hmac::verify(&self.mac_key, body, tag).is_err() || msg[1..4] != [0, 0, 0] {
            return Err(Refused::Rejected);
        }
        Ok(())
    }

    fn signed(&self, mut body: Vec<u8>) -> Vec<u8> {
        let tag = hmac::sign(&self.mac_key, &body);
        body.extend_from_slice(tag.as_ref());
        body
    }
}

/// One side's handshake state.
pub(crate) struct Handshake {
    psk: [u8; 32],
    verifier: Verifier,
    rng: SystemRandom,
    /// This side's id in its Inits, so one sent back to it is known for its own.
    id: [u8; 8],
    /// The time of our last Init: the next one's is later, whatever the clock does.
    last_sent: u64,
    /// The time of the newest Init taken: an Init no newer is a copy.
    newest_taken: Option<u64>,
    /// The random of the Init we wait an answer for.
    waiting: Option<[u8; 32]>,
}

impl Handshake {
    pub(crate) fn new(psk: &[u8; 32]) -> Handshake {
        let rng = SystemRandom::new();
        Handshake {
            psk: *psk,
            verifier: Verifier::new(psk),
            id: random(&rng),
            rng,
            last_sent: 0,
            newest_taken: None,
            waiting: None,
        }
    }

    /// A new Init (a fresh random each time: an answer to an older one is ignored).
    pub(crate) fn initiate(&mut self) -> Vec<u8> {
        self.initiate_at(unix_nanos())
    }

    /// A new Init stamped `now`, or just after our last if the clock went back.
    fn initiate_at(&mut self, now: u64) -> Vec<u8> {
        let time = now.max(self.last_sent.saturating_add(1));
        self.last_sent = time;
        let random: [u8; 32] = random(&self.rng);
        self.waiting = Some(random);
        let mut body = vec![INIT, 0, 0, 0];
        body.extend_from_slice(&self.id);
        body.extend_from_slice(&time.to_be_bytes());
        body.extend_from_slice(&random);
        self.verifier.signed(body)
    }

    /// Handles a handshake message (checked again: [`Verifier::check`] first spares the
    /// lock around this the forgeries).
    pub(crate) fn receive(&mut self, msg: &[u8]) -> Outcome {
        if let Err(refused) = self.verifier.check(msg) {
            return refused.into();
        }
        match msg[0] {
            INIT => self.on_init(msg),
            _ => self.on_response(msg),
        }
    }

    fn on_init(&mut self, msg: &[u8]) -> Outcome {
        let sender = &msg[4..12];
        let time = u64::from_be_bytes(msg[12..20].try_into().expect("8 bytes"));
        let theirs: [u8; 32] = msg[20..52].try_into().expect("32 bytes");
        // Checked before anything changes: a copy, however many, neither replaces the
        // session held for the peer's newest Init nor costs more than its MAC.
        if sender == self.id || self.newest_taken.is_some_and(|newest| time <= newest) {
            return Outcome::Replayed;
        }
        self.newest_taken = Some(time);
        // Both sides started at once: the larger random's Init goes on. Ours stays
        // awaited either way: the Init may be a recording of the peer's from before this
        // side restarted, and clearing ours would turn the peer's real Response to it
        // into a replay (a live peer whose Init wins ignores ours, so nothing answers it).
        if self.waiting.is_some_and(|ours| ours > theirs) {
            return Outcome::Ignored;
        }
        let mine: [u8; 32] = random(&self.rng);
        let mut body = vec![RESPONSE, 0, 0, 0];
        body.extend_from_slice(&theirs);
        body.extend_from_slice(&mine);
        let reply = self.verifier.signed(body);
        let session = Session::derive(&self.psk, &theirs, &mine, Role::Responder);
        Outcome::Answer { reply, session }
    }

    fn on_response(&mut self, msg: &[u8]) -> Outcome {
        let echoed: [u8; 32] = msg[4..36].try_into().expect("32 bytes");
        if self.waiting != Some(echoed) {
            return Outcome::Replayed;
        }
        self.waiting = None;
        let theirs: [u8; 32] = msg[36..68].try_into().expect("32 bytes");
        Outcome::Established(Session::derive(
            &self.psk,
            &echoed,
            &theirs,
            Role::Initiator,
        ))
    }
}

/// `N` bytes from the system's random source.
fn random<const N: usize>(rng: &SystemRandom) -> [u8; N] {
    let mut out = [0u8; N];
    rng.fill(&mut out)
        .expect("the system's random source works");
    out
}

/// Now, in nanoseconds since the UNIX epoch (0 for a clock set before it).
fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::super::session::DATA_HEADER;
    use super::*;

    fn answer(outcome: Outcome) -> (Vec<u8>, Session) {
        match outcome {
            Outcome::Answer { reply, session } => (reply, session),
            _ => panic!("expected an answer"),
        }
    }

    fn established(outcome: Outcome) -> Session {
        match outcome {
            Outcome::Established(session) => session,
            _ => panic!("expected a session"),
        }
    }

    #[test]
    fn one_round_trip_makes_matching_sessions() {
        let mut a = Handshake::new(&[1; 32]);
        let mut b = Handshake::new(&[1; 32]);
        let init = a.initiate();
        let (reply, b_session) = answer(b.receive(&init));
        let a_session = established(a.receive(&reply));
        let mut msg = vec![0u8; DATA_HEADER];
        msg.extend_from_slice(b"data");
        a_session.seal(0, &mut msg).unwrap();
        assert!(b_session.open(&mut msg).is_ok());
        // A replayed response changes nothing; a repeated Init is not answered.
        assert!(matches!(a.receive(&reply), Outcome::Replayed));
        assert!(matches!(b.receive(&init), Outcome::Replayed));
    }

    #[test]
    fn a_recorded_init_is_not_answered_again_once_a_newer_one_was() {
        let mut b = Handshake::new(&[1; 32]);
        let mut a = Handshake::new(&[1; 32]);
        let first = a.initiate_at(1_000);
        answer(b.receive(&first));
        // A restarts (a new id, its clock later): its new Init is answered, and neither
        // Init sent again is, however often, from wherever.
        let mut a = Handshake::new(&[1; 32]);
        let second = a.initiate_at(2_000);
        let (reply, b_session) = answer(b.receive(&second));
        for _ in 0..3 {
            assert!(matches!(b.receive(&first), Outcome::Replayed));
            assert!(matches!(b.receive(&second), Outcome::Replayed));
        }
        let a_session = established(a.receive(&reply));
        let mut msg = vec![0u8; DATA_HEADER];
        a_session.seal(0, &mut msg).unwrap();
        assert!(b_session.open(&mut msg).is_ok());
        // A peer whose clock went back is refused until this side starts over.
        let mut late = Handshake::new(&[1; 32]);
        assert!(matches!(
            b.receive(&late.initiate_at(1_500)),
            Outcome::Replayed
        ));
        let mut b = Handshake::new(&[1; 32]);
        answer(b.receive(&late.initiate_at(1_600)));
    }

    #[test]
    fn an_init_sent_back_to_its_sender_neither_answers_nor_cancels_it() {
        let mut a = Handshake::new(&[1; 32]);
        let mut b = Handshake::new(&[1; 32]);
        let init = a.initiate();
        // Whatever the randoms, A's own Init is no peer's: A still waits for B.
        assert!(matches!(a.receive(&init), Outcome::Replayed));
        let (reply, _) = answer(b.receive(&init));
        established(a.receive(&reply));
    }

    #[test]
    fn inits_of_one_side_are_later_each_time_even_if_its_clock_goes_back() {
        let mut a = Handshake::new(&[1; 32]);
        let mut b = Handshake::new(&[1; 32]);
        answer(b.receive(&a.initiate_at(5_000)));
        answer(b.receive(&a.initiate_at(10)));
        answer(b.receive(&a.initiate()));
    }

    #[test]
    fn every_handshake_makes_new_keys() {
        let mut a = Handshake::new(&[1; 32]);
        let mut b = Handshake::new(&[1; 32]);
        let (reply1, _) = answer(b.receive(&a.initiate()));
        let first = established(a.receive(&reply1));
        let (reply2, second_b) = answer(b.receive(&a.initiate()));
        let _second = established(a.receive(&reply2));
        let mut msg = vec![0u8; DATA_HEADER];
        first.seal(0, &mut msg).unwrap();
        assert!(
            second_b.open(&mut msg).is_err(),
            "the old session's keys are not the new ones"
        );
    }

    #[test]
    fn another_key_is_rejected_both_ways() {
        let mut a = Handshake::new(&[1; 32]);
        let mut b = Handshake::new(&[2; 32]);
        let init = a.initiate();
        assert!(matches!(b.receive(&init), Outcome::Rejected));
        let mut c = Handshake::new(&[2; 32]);
        let (reply, _) = answer(c.receive(&b.initiate()));
        let mut tampered = reply.clone();
        tampered[50] ^= 1;
        assert!(matches!(b.receive(&tampered), Outcome::Rejected));
        assert!(matches!(a.receive(&reply), Outcome::Rejected));
        assert!(matches!(a.receive(&reply[..99]), Outcome::Malformed));
        assert!(matches!(a.receive(&[]), Outcome::Malformed));
    }

    #[test]
    fn simultaneous_inits_settle_on_one() {
        let mut a = Handshake::new(&[1; 32]);
        let mut b = Handshake::new(&[1; 32]);
        let init_a = a.initiate();
        let init_b = b.initiate();
        let a_answers = a.receive(&init_b);
        let b_answers = b.receive(&init_a);
        let (winner_reply, loser) = match (a_answers, b_answers) {
            (Outcome::Ignored, Outcome::Answer { reply, .. }) => (reply, &mut a),
            (Outcome::Answer { reply, .. }, Outcome::Ignored) => (reply, &mut b),
            _ => panic!("exactly one side answers"),
        };
        established(loser.receive(&winner_reply));
    }

    #[test]
    fn a_recorded_init_answered_while_ours_waits_leaves_ours_to_complete() {
        let mut a = Handshake::new(&[1; 32]);
        let mut b = Handshake::new(&[1; 32]);
        // The peer's Init from an earlier run, recorded by an attacker; one whose random
        // beats ours, so that it is answered.
        let mut earlier_b = Handshake::new(&[1; 32]);
        let init_a = a.initiate();
        let ours = a.waiting.expect("waiting");
        let recorded = loop {
            let init = earlier_b.initiate();
            if init[20..52] > ours[..] {
                break init;
            }
        };
        answer(a.receive(&recorded));
        // The live peer answers ours: the session comes up.
        let (reply, b_session) = answer(b.receive(&init_a));
        let a_session = established(a.receive(&reply));
        let mut sealed = vec![0u8; DATA_HEADER];
        sealed.extend_from_slice(b"hello");
        a_session.seal(0, &mut sealed).unwrap();
        assert!(
            b_session.open(&mut sealed).is_ok(),
            "the two ends share the session"
        );
    }
}
