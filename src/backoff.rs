//! Exponential backoff with jitter, for reconnect loops.
//!
//! Invariant: every delay lies in `[max(initial, d)/2, d]` where `d = min(max, initial·2ⁿ)`;
//! the jitter keeps a fleet of relays from reconnecting to the origin in lockstep.

use std::time::Duration;

use rand::Rng as _;

/// Delays for successive retries: `initial`, doubling per attempt up to `max`, each scaled by
/// a random factor in `[0.5, 1.0]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max` (`max` below `initial` is raised
    /// to `initial`).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max: max.max(initial), attempt: 0 }
    }

    /// The delay before the next retry; each call doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Starts over from `initial` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniformly random duration in `[0, bound)`; zero when `bound` is zero.
pub fn jitter(bound: Duration) -> Duration {
    if bound.is_zero() {
        return Duration::ZERO;
    }
    bound.mul_f64(rand::rng().random_range(0.0..1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_and_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        for ceiling in ceilings {
            let delay = backoff.next_delay();
            let ceiling = Duration::from_millis(ceiling);
            assert!(delay <= ceiling && delay >= ceiling / 2, "{delay:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn many_attempts_do_not_overflow() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            assert!(backoff.next_delay() <= Duration::from_secs(30));
        }
    }

    #[test]
    fn jitter_stays_below_its_bound() {
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
        for _ in 0..100 {
            assert!(jitter(Duration::from_millis(10)) < Duration::from_millis(10));
        }
    }
}
