//! The controller of one staged key: a task that wakes on the key's lanes (a new candidate,
//! a canary's answer, an operator's step) and at the end of the bake, feeds the gate and
//! applies its decision. Operators' steps run under the same record lock, so a decision and
//! a manual step never interleave.

use std::sync::{Arc, Mutex, Weak};

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::canary::{self, Candidate};
use super::gate::{self, Answers, Decision};
use super::{CanaryReport, Phase, Policy, RolloutError, RolloutReport, lock};
use crate::cache::{ClientStatus, KeyState, LaneSnapshot, Lanes};
use crate::node_cache::Entry;
use crate::telemetry::{DecisionLabels, Metrics, traces};

/// What the controller remembers of the key's current candidate.
#[derive(Debug)]
struct Record {
    /// The lanes' generation this record is about.
    generation: u64,
    /// `None` while nothing is in rollout.
    phase: Option<Phase>,
    /// When the candidate reached its canaries (the bake's start).
    started: Instant,
    /// Why it is held or aborted.
    reason: Option<String>,
    /// True while the key's `rollout_held` gauge counts this key.
    held_marked: bool,
}

/// One staged key's rollout.
pub(super) struct KeyRollout {
    pub(super) key: String,
    type_url: String,
    entry: Weak<Entry>,
    lanes: Arc<Lanes>,
    policy: Arc<Policy>,
    metrics: Metrics,
    held: Gauge,
    record: Mutex<Record>,
}

/// How a canary answered the candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ack,
    /// With the client's message.
    Nack(String),
    Pending,
}

impl Answer {
    /// The canary's answer to `version` (a NACK of it wins over an ACK).
    fn of(status: &ClientStatus, version: &str) -> Self {
        match &status.last_nack {
            Some(nack) if nack.rejected_version == version => Self::Nack(nack.message.clone()),
            _ if status.acked_version == version => Self::Ack,
            _ => Self::Pending,
        }
    }

    /// `ack`, `nack` or `pending`, as the admin API shows it.
    fn label(&self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Nack(_) => "nack",
            Self::Pending => "pending",
        }
    }
}

impl KeyRollout {
    pub(super) fn new(entry: &Arc<Entry>, lanes: Arc<Lanes>, policy: Arc<Policy>, metrics: Metrics) -> Self {
        Self {
            key: entry.key.clone(),
            type_url: entry.type_url.clone(),
            entry: Arc::downgrade(entry),
            held: entry.metrics.rollout_held.clone(),
            lanes,
            policy,
            metrics,
            record: Mutex::new(Record {
                generation: 0,
                phase: None,
                started: Instant::now(),
                reason: None,
                held_marked: false,
            }),
        }
    }

    /// True while the key's entry exists.
    pub(super) fn is_live(&self) -> bool {
        self.entry.strong_count() > 0
    }

    /// Runs until the entry is gone or the node stops.
    pub(super) async fn run(&self, shutdown: CancellationToken) {
        let mut deadline: Option<Instant> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.lanes.woken() => {}
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
            }
            let Some(entry) = self.entry.upgrade() else { break };
            deadline = self.step(&entry);
        }
        // A key that leaves (or a node that stops) no longer counts as held: the gauge may be
        // shared with other keys (`_other`).
        let mut record = lock(&self.record);
        self.mark_held(&mut record, false);
    }

    /// Brings the record to the lanes' generation: a new candidate starts baking, a
    /// promotion or an end leaves nothing in rollout.
    fn sync(&self, record: &mut Record, snapshot: &LaneSnapshot) {
        if snapshot.generation == record.generation {
            return;
        }
        self.mark_held(record, false);
        record.generation = snapshot.generation;
        record.reason = None;
        record.started = Instant::now();
        record.phase = snapshot.candidate.as_ref().map(|candidate| {
            tracing::info!(
                key = %self.key, type_url = %self.type_url, version = %candidate.version_info,
                stable_version = %snapshot.stable.version_info, policy = self.policy.index,
                "rollout started: the new version goes to the canaries first"
            );
            Phase::Baking
        });
    }

    fn mark_held(&self, record: &mut Record, held: bool) {
        if record.held_marked != held {
            record.held_marked = held;
            if held {
                self.held.inc();
            } else {
                self.held.dec();
            }
        }
    }

    /// One look at the key: returns when to look again unless woken earlier.
    fn step(&self, entry: &Entry) -> Option<Instant> {
        let mut record = lock(&self.record);
        let snapshot = self.lanes.snapshot();
        self.sync(&mut record, &snapshot);
        let candidate = snapshot.candidate.as_ref()?;
        if record.phase != Some(Phase::Baking) {
            return None;
        }
        let now = Instant::now();
        let clients = entry.clients_by_id();
        let present: Vec<&ClientStatus> = clients
            .iter()
            .filter(|(id, _, _)| snapshot.canaries.binary_search(id).is_ok())
            .map(|(_, status, _)| status)
            .collect();
        if present.is_empty() {
            let eligible: Vec<Candidate<'_>> = clients
                .iter()
                .filter(|(_, status, _)| status.follower.is_none())
                .filter_map(|(id, _, node)| node.as_deref().map(|node| Candidate { id: *id, node }))
                .collect();
            if eligible.is_empty() {
                self.promote(
                    &mut record,
                    &snapshot,
                    candidate,
                    "promote",
                    "no client watches the key: nothing to protect",
                );
                return None;
            }
            let chosen = canary::choose(&self.policy.canaries, &self.type_url, &eligible);
            if chosen.is_empty() {
                // No client of the key matches `node_match`: the version waits (baking) for
                // one; a client arriving or leaving wakes this controller.
                record.reason = Some("waiting for a client matching the canary selection".to_owned());
                return None;
            }
            tracing::info!(
                key = %self.key, version = %candidate.version_info, canaries = chosen.len(), clients = eligible.len(),
                "rollout canaries chosen"
            );
            self.lanes.set_canaries(snapshot.generation, chosen);
            record.started = now;
            record.reason = None;
            return Some(now + self.policy.gate.bake);
        }
        let mut answers = Answers { canaries: present.len(), ..Answers::default() };
        let mut messages = Vec::new();
        for status in &present {
            match Answer::of(status, &candidate.version_info) {
                Answer::Ack => answers.acked += 1,
                Answer::Nack(message) => {
                    answers.nacked += 1;
                    messages.push(format!("{}: {message}", status.node_id));
                }
                Answer::Pending => {}
            }
        }
        match gate::decide(self.policy.gate, answers, now.duration_since(record.started)) {
            Decision::Baking { left } => (!left.is_zero()).then(|| now + left),
            Decision::Promote => {
                let reason = format!("{} of {} canaries ACKed after the bake", answers.acked, answers.canaries);
                self.promote(&mut record, &snapshot, candidate, "promote", &reason);
                None
            }
            Decision::Hold(reason) => {
                let mut reason = reason.to_string();
                if !messages.is_empty() {
                    reason = format!("{reason}: {}", messages.join("; "));
                }
                self.hold(&mut record, &snapshot, candidate, reason);
                None
            }
        }
    }

    fn decided(&self, record: &Record, candidate: &KeyState, decision: &'static str, reason: &str) {
        self.metrics.rollout_decisions.get_or_create(&DecisionLabels { decision }).inc();
        let elapsed = record.started.elapsed();
        if matches!(decision, "promote" | "hold") {
            self.metrics.rollout_decision_seconds.observe(elapsed.as_secs_f64());
        }
        traces::rollout_decision(&candidate.trace, &self.key, &candidate.version_info, decision, reason);
        if decision == "hold" {
            tracing::warn!(
                key = %self.key, version = %candidate.version_info, decision, reason,
                elapsed_ms = elapsed.as_millis() as u64, rollback_canaries = self.policy.rollback_canaries,
                "rollout decision: the version is held, the other clients keep the stable version"
            );
        } else {
            tracing::info!(
                key = %self.key, version = %candidate.version_info, decision, reason,
                elapsed_ms = elapsed.as_millis() as u64, "rollout decision"
            );
        }
    }

    fn promote(
        &self,
        record: &mut Record,
        snapshot: &LaneSnapshot,
        candidate: &KeyState,
        decision: &'static str,
        reason: &str,
    ) -> bool {
        if self.lanes.promote(snapshot.generation).is_none() {
            return false;
        }
        self.decided(record, candidate, decision, reason);
        self.mark_held(record, false);
        record.phase = None;
        record.reason = None;
        record.generation = self.lanes.snapshot().generation;
        true
    }

    fn hold(&self, record: &mut Record, snapshot: &LaneSnapshot, candidate: &KeyState, reason: String) {
        if self.policy.rollback_canaries {
            self.lanes.roll_back(snapshot.generation);
        }
        self.decided(record, candidate, "hold", &reason);
        self.mark_held(record, true);
        record.phase = Some(Phase::Held);
        record.reason = Some(reason);
    }

    /// An operator's promote.
    pub(super) fn promote_by_hand(&self) -> Result<String, RolloutError> {
        let mut record = lock(&self.record);
        let snapshot = self.lanes.snapshot();
        self.sync(&mut record, &snapshot);
        let candidate = snapshot.candidate.clone().ok_or_else(|| self.nothing_in_rollout(&snapshot))?;
        if !self.promote(&mut record, &snapshot, &candidate, "manual_promote", "promoted by an operator") {
            return Err(self.nothing_in_rollout(&self.lanes.snapshot()));
        }
        Ok(candidate.version_info.clone())
    }

    /// An operator's abort: every client is served the stable version.
    pub(super) fn abort_by_hand(&self) -> Result<String, RolloutError> {
        let mut record = lock(&self.record);
        let snapshot = self.lanes.snapshot();
        self.sync(&mut record, &snapshot);
        let candidate = snapshot.candidate.clone().ok_or_else(|| self.nothing_in_rollout(&snapshot))?;
        if record.phase == Some(Phase::Aborted) {
            return Err(RolloutError::AlreadyAborted {
                key: self.key.clone(),
                version: candidate.version_info.clone(),
            });
        }
        self.lanes.roll_back(snapshot.generation);
        self.decided(&record, &candidate, "abort", "aborted by an operator");
        self.mark_held(&mut record, false);
        record.phase = Some(Phase::Aborted);
        record.reason = Some("aborted by an operator".to_owned());
        Ok(candidate.version_info.clone())
    }

    fn nothing_in_rollout(&self, snapshot: &LaneSnapshot) -> RolloutError {
        RolloutError::NothingInRollout { key: self.key.clone(), stable: snapshot.stable.version_info.clone() }
    }

    /// The phase, when a version is in rollout.
    pub(super) fn phase(&self) -> Option<Phase> {
        let record = lock(&self.record);
        let snapshot = self.lanes.snapshot();
        snapshot.candidate.as_ref()?;
        match snapshot.generation == record.generation {
            true => record.phase,
            false => Some(Phase::Baking),
        }
    }

    /// The rollout for the admin API, when a version is in rollout.
    pub(super) fn report(&self) -> Option<RolloutReport> {
        let entry = self.entry.upgrade()?;
        let record = lock(&self.record);
        let snapshot = self.lanes.snapshot();
        let candidate = snapshot.candidate.as_ref()?;
        let current = snapshot.generation == record.generation;
        let phase = if current { record.phase.unwrap_or(Phase::Baking) } else { Phase::Baking };
        let mut acks = 0;
        let mut nacks = 0;
        let canaries: Vec<CanaryReport> = entry
            .clients_by_id()
            .iter()
            .filter(|(id, _, _)| snapshot.canaries.binary_search(id).is_ok())
            .map(|(_, status, _)| {
                let answer = Answer::of(status, &candidate.version_info);
                acks += usize::from(answer == Answer::Ack);
                let nack_message = match answer {
                    Answer::Nack(ref message) => Some(message.clone()),
                    _ => None,
                };
                nacks += usize::from(nack_message.is_some());
                CanaryReport {
                    node_id: status.node_id.clone(),
                    peer: status.peer.clone(),
                    answer: answer.label(),
                    nack_message,
                }
            })
            .collect();
        let bake_left = match (phase, current) {
            (Phase::Baking, true) => self.policy.gate.bake.saturating_sub(record.started.elapsed()),
            (Phase::Baking, false) => self.policy.gate.bake,
            _ => std::time::Duration::ZERO,
        };
        Some(RolloutReport {
            key: self.key.clone(),
            type_url: self.type_url.clone(),
            policy: self.policy.index,
            phase,
            candidate_version: candidate.version_info.clone(),
            stable_version: snapshot.stable.version_info.clone(),
            canaries,
            acks,
            nacks,
            bake_left_seconds: bake_left.as_secs_f64(),
            reason: if current { record.reason.clone() } else { None },
        })
    }
}
