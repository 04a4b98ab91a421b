//! The handshake: one round trip that exchanges fresh 32-byte randoms, each message
//! authenticated with HMAC-SHA256 under a key derived from the pre-shared key, so every
//! start of either side makes new session keys and no key ever meets a nonce twice.
//!
//! - Init (68 bytes): type 1, 3 zero bytes, the initiator's random, the MAC.
//! - Response (100 bytes): type 2, 3 zero bytes, the initiator's random, the
//!   responder's random, the MAC.
//!
//! A replayed Init only makes the responder answer and hold a session nobody can use:
//! the session it has stays until data authenticates under the new one.

use ring::hkdf;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use super::session::{expand, Role, Session};

pub(crate) const INIT: u8 = 1;
pub(crate) const RESPONSE: u8 = 2;
const INIT_LEN: usize = 4 + 32 + 32;
const RESPONSE_LEN: usize = 4 + 32 + 32 + 32;

/// What a handshake message led to.
pub(crate) enum Outcome {
    /// A new Init: send `reply` back; `session` is the responder's, to confirm by the
    /// first data that authenticates under it.
    Answer { reply: Vec<u8>, session: Session },
    /// The same Init again (our answer was lost): send the same reply.
    AnswerAgain(Vec<u8>),
    /// Our Init was answered: the session is ready.
    Established(Session),
    /// The MAC did not verify (another key, or garbage of the right shape).
    Rejected,
    /// Authentic but not for now: an answer to an Init we no longer wait for, or an Init
    /// that loses to ours when both sides start at once.
    Ignored,
    /// Not a handshake message at all.
    Malformed,
}

/// One side's handshake state.
pub(crate) struct Handshake {
    psk: [u8; 32],
    mac_key: hmac::Key,
    rng: SystemRandom,
    /// The random of the Init we wait an answer for.
    waiting: Option<[u8; 32]>,
    /// The last Init answered and the answer.
    answered: Option<([u8; 32], Vec<u8>)>,
}

impl Handshake {
    pub(crate) fn new(psk: &[u8; 32]) -> Handshake {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ringsock tunnel v1 handshake").extract(psk);
        let mac: [u8; 32] = expand(&prk, b"mac");
        Handshake {
            psk: *psk,
            mac_key: hmac::Key::new(hmac::HMAC_SHA256, &mac),
            rng: SystemRandom::new(),
            waiting: None,
            answered: None,
        }
    }

    fn random(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.rng
            .fill(&mut out)
            .expect("the system's random source works");
        out
    }

    fn signed(&self, mut body: Vec<u8>) -> Vec<u8> {
        let tag = hmac::sign(&self.mac_key, &body);
        body.extend_from_slice(tag.as_ref());
        body
    }

    fn verify(&self, msg: &[u8], len: usize) -> bool {
        msg.len() == len && hmac::verify(&self.mac_key, &msg[..len - 32], &msg[len - 32..]).is_ok()
    }

    /// A new Init (a fresh random each time: an answer to an older one is ignored).
    pub(crate) fn initiate(&mut self) -> Vec<u8> {
        let random = self.random();
        self.waiting = Some(random);
        let mut body = vec![INIT, 0, 0, 0];
        body.extend_from_slice(&random);
        self.signed(body)
    }

    /// Handles a handshake message.
    pub(crate) fn receive(&mut self, msg: &[u8]) -> Outcome {
        match msg.first() {
            Some(&INIT) if msg.len() == INIT_LEN => self.on_init(msg),
            Some(&RESPONSE) if msg.len() == RESPONSE_LEN => self.on_response(msg),
            _ => Outcome::Malformed,
        }
    }

    fn on_init(&mut self, msg: &[u8]) -> Outcome {
        if !self.verify(msg, INIT_LEN) || msg[1..4] != [0, 0, 0] {
            return Outcome::Rejected;
        }
        let theirs: [u8; 32] = msg[4..36].try_into().expect("32 bytes");
        if let Some((random, reply)) = &self.answered {
            if *random == theirs {
                return Outcome::AnswerAgain(reply.clone());
            }
        }
        if let Some(ours) = self.waiting {
            // Both sides started at once: the larger random's Init goes on.
            if ours > theirs {
                return Outcome::Ignored;
            }
            self.waiting = None;
        }
        let mine = self.random();
        let mut body = vec![RESPONSE, 0, 0, 0];
        body.extend_from_slice(&theirs);
        body.extend_from_slice(&mine);
        let reply = self.signed(body);
        self.answered = Some((theirs, reply.clone()));
        let session = Session::derive(&self.psk, &theirs, &mine, Role::Responder);
        Outcome::Answer { reply, session }
    }

    fn on_response(&mut self, msg: &[u8]) -> Outcome {
        if !self.verify(msg, RESPONSE_LEN) || msg[1..4] != [0, 0, 0] {
            return Outcome::Rejected;
        }
        let echoed: [u8; 32] = msg[4..36].try_into().expect("32 bytes");
        if self.waiting != Some(echoed) {
            return Outcome::Ignored;
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
        // A replayed response is ignored; a repeated Init gets the same answer.
        assert!(matches!(a.receive(&reply), Outcome::Ignored));
        assert!(matches!(b.receive(&init), Outcome::AnswerAgain(r) if r == reply));
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
}
