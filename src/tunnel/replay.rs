//! The replay window: which message counters of a session were already accepted.

/// Bits of history kept behind the highest counter seen.
const WINDOW_BITS: u64 = 4096;
const WORDS: usize = (WINDOW_BITS / 64) as usize;

/// A sliding window over message counters (RFC 6479's bitmap): a counter is new if it is
/// above the highest seen, or inside the window and not marked.
#[derive(Debug, Clone)]
pub(crate) struct ReplayWindow {
    /// One more than the highest counter accepted (0: none yet).
    next: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            next: 0,
            bits: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// Whether `counter` may still be accepted: checked before decrypting, so a replay
    /// costs no decryption.
    pub(crate) fn check(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - counter > WINDOW_BITS - 64 {
            return false;
        }
        let (word, bit) = Self::position(counter);
        self.bits[word] & (1 << bit) == 0
    }

    /// Marks `counter` accepted (after it authenticated); false if it was a replay after
    /// all.
    pub(crate) fn accept(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if counter >= self.next {
            // Clear the words the window slides over.
            let old_word = self.next / 64;
            let new_word = counter / 64;
            let steps = (new_word - old_word).min(WORDS as u64);
            for i in 1..=steps {
                self.bits[((old_word + i) % WORDS as u64) as usize] = 0;
            }
            self.next = counter + 1;
        }
        let (word, bit) = Self::position(counter);
        self.bits[word] |= 1 << bit;
        true
    }

    fn position(counter: u64) -> (usize, u64) {
        (((counter / 64) % WORDS as u64) as usize, counter % 64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_each_counter_once_in_any_order_within_the_window() {
        let mut window = ReplayWindow::default();
        assert!(window.accept(0));
        assert!(!window.accept(0));
        assert!(window.accept(5));
        assert!(window.accept(3));
        assert!(!window.accept(3));
        assert!(!window.check(5));
        assert!(window.accept(1000));
        assert!(window.accept(999));
        assert!(window.accept(4));
        assert!(!window.accept(999));
    }

    #[test]
    fn too_old_counters_are_refused() {
        let mut window = ReplayWindow::default();
        assert!(window.accept(100_000));
        assert!(!window.check(100_000 - WINDOW_BITS));
        assert!(window.check(100_000 - 100));
        assert!(window.accept(100_000 - 100));
        assert!(!window.accept(100_000 - 100));
    }

    #[test]
    fn sliding_far_forgets_old_marks() {
        let mut window = ReplayWindow::default();
        for counter in 0..200 {
            assert!(window.accept(counter));
        }
        let far = 10 * WINDOW_BITS + 7;
        assert!(window.accept(far));
        for counter in far - 100..far {
            assert!(window.accept(counter), "{counter} is new");
        }
        assert!(!window.accept(far));
    }
}
