//! The gate: whether a candidate version may reach every client. A pure function of the
//! policy, the canaries' answers to the candidate and the time since it reached them.
//!
//! - a NACK ratio over `max_nack_ratio` holds the version at once, bake or not;
//! - once the bake is over, the version is promoted when every canary answered and at least
//!   one ACKed (NACKs within the ratio do not hold it);
//! - otherwise it keeps baking: a canary that never answers keeps it baking (an operator can
//!   promote it by hand), so silence is never taken for an ACK;
//! - with no canary at all the version is held: nobody tried it.

use std::time::Duration;

/// What the gate reads of a policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatePolicy {
    /// How long the canaries hold the candidate before it may be promoted.
    pub bake: Duration,
    /// The largest share of canaries that may NACK it.
    pub max_nack_ratio: f64,
}

/// The canaries' answers to the candidate version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answers {
    /// Canaries watching the key now.
    pub canaries: usize,
    /// Those that ACKed the candidate.
    pub acked: usize,
    /// Those that NACKed it.
    pub nacked: usize,
}

/// Why a version is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldReason {
    /// Too many canaries NACKed it.
    NackRatio {
        /// Canaries that NACKed.
        nacked: usize,
        /// Canaries in all.
        canaries: usize,
    },
    /// No client could be a canary.
    NoCanary,
}

impl std::fmt::Display for HoldReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NackRatio { nacked, canaries } => {
                write!(f, "{nacked} of {canaries} canaries NACKed the version, over max_nack_ratio")
            }
            Self::NoCanary => f.write_str("no client of the key can be a canary (none matches the canary selection)"),
        }
    }
}

/// The gate's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep the candidate on the canaries; `left` of the bake remains (zero: the bake is
    /// over and some canary has not answered yet).
    Baking {
        /// Time left in the bake.
        left: Duration,
    },
    /// Serve the candidate to every client.
    Promote,
    /// Keep the rest on the stable version.
    Hold(HoldReason),
}

/// Decides on a candidate whose canaries answered `answers`, `elapsed` after it reached them.
pub fn decide(policy: GatePolicy, answers: Answers, elapsed: Duration) -> Decision {
    if answers.canaries == 0 {
        return Decision::Hold(HoldReason::NoCanary);
    }
    #[allow(clippy::cast_precision_loss)]
    let ratio = answers.nacked as f64 / answers.canaries as f64;
    if answers.nacked > 0 && ratio > policy.max_nack_ratio {
        return Decision::Hold(HoldReason::NackRatio { nacked: answers.nacked, canaries: answers.canaries });
    }
    let left = policy.bake.saturating_sub(elapsed);
    let all_answered = answers.acked + answers.nacked >= answers.canaries;
    if left.is_zero() && all_answered && answers.acked > 0 {
        return Decision::Promote;
    }
    Decision::Baking { left }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: GatePolicy = GatePolicy { bake: Duration::from_secs(30), max_nack_ratio: 0.0 };

    fn answers(canaries: usize, acked: usize, nacked: usize) -> Answers {
        Answers { canaries, acked, nacked }
    }

    #[test]
    fn every_canary_acking_promotes_only_after_the_bake() {
        assert_eq!(
            decide(POLICY, answers(3, 3, 0), Duration::from_secs(10)),
            Decision::Baking { left: Duration::from_secs(20) }
        );
        assert_eq!(decide(POLICY, answers(3, 3, 0), Duration::from_secs(30)), Decision::Promote);
        assert_eq!(decide(POLICY, answers(3, 3, 0), Duration::from_secs(300)), Decision::Promote);
    }

    #[test]
    fn a_nack_ratio_over_the_threshold_holds_at_once() {
        assert_eq!(
            decide(POLICY, answers(3, 0, 1), Duration::ZERO),
            Decision::Hold(HoldReason::NackRatio { nacked: 1, canaries: 3 })
        );
        let tolerant = GatePolicy { max_nack_ratio: 0.5, ..POLICY };
        assert_eq!(decide(tolerant, answers(4, 0, 2), Duration::ZERO), Decision::Baking { left: POLICY.bake });
        assert_eq!(decide(tolerant, answers(4, 2, 2), POLICY.bake), Decision::Promote, "NACKs within the ratio");
        assert_eq!(
            decide(tolerant, answers(4, 1, 3), Duration::ZERO),
            Decision::Hold(HoldReason::NackRatio { nacked: 3, canaries: 4 })
        );
    }

    #[test]
    fn no_answer_keeps_baking_and_silence_is_never_an_ack() {
        assert_eq!(
            decide(POLICY, answers(2, 0, 0), Duration::from_secs(3600)),
            Decision::Baking { left: Duration::ZERO }
        );
        assert_eq!(
            decide(POLICY, answers(2, 1, 0), Duration::from_secs(3600)),
            Decision::Baking { left: Duration::ZERO }
        );
        assert_eq!(decide(POLICY, answers(0, 0, 0), Duration::ZERO), Decision::Hold(HoldReason::NoCanary));
    }
}
