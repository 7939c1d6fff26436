//! The controller of one staged key: a task that wakes on the key's lanes (a new candidate,
//! a canary's answer, an operator's step) and at the end of the bake, feeds the gate and
//! applies its decision. Operators' steps run under the same record lock, so a decision and
//! a manual step never interleave.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::canary::{self, Candidate};
use super::gate::{self, Answers, Decision};
use super::{CanaryReport, FollowerReport, Phase, Policy, RolloutError, RolloutReport, lock};
use crate::cache::lanes::{Answer, CanaryAnswer, CanaryTally, Verdict, report_version};
use crate::cache::{KeyState, LaneSnapshot, Lanes};
use crate::node_cache::Entry;
use crate::telemetry::{DecisionLabels, Metrics, traces};

/// What the controller remembers of the key's current candidate.
#[derive(Debug)]
struct Record {
    /// The lanes' generation this record is about.
    generation: u64,
    /// `None` while nothing is in rollout.
    phase: Option<Phase>,
    /// When the candidate first reached a canary on any node (the bake's start).
    started: Option<Instant>,
    /// Why it is held or aborted, or what it waits for.
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

/// The answers of the canaries on this node (those served the candidate now).
struct LocalAnswers {
    /// Clients of the key on this node that may be canaries (relay nodes excluded).
    eligible: usize,
    /// Each canary's node id and answer.
    canaries: Vec<CanaryAnswer>,
}

impl LocalAnswers {
    fn count(&self, answer: fn(&Answer) -> bool) -> usize {
        self.canaries.iter().filter(|c| answer(&c.answer)).count()
    }

    /// The tally a follower reports to the key's owner on the candidate of `version`, its
    /// generation `generation` on the owner.
    fn tally(&self, generation: u64, version: &str) -> CanaryTally {
        let mut answers = self.canaries.clone();
        // NACKs first: they are what an operator looks for, and survive the bound.
        answers.sort_by_key(|c| !matches!(c.answer, Answer::Nack(_)));
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        CanaryTally {
            generation,
            version: report_version(version).into_owned(),
            cannot_try: false,
            clients: count(self.eligible),
            canaries: count(self.canaries.len()),
            acked: count(self.count(|a| *a == Answer::Ack)),
            nacked: count(self.count(|a| matches!(a, Answer::Nack(_)))),
            answers,
        }
    }
}

/// What the followers reported on the current candidate.
#[derive(Default)]
struct RemoteAnswers {
    /// The sums of their tallies.
    clients: usize,
    canaries: usize,
    acked: usize,
    nacked: usize,
    /// Their canaries' NACK messages, `node (relay): message`.
    messages: Vec<String>,
    /// Followers that reported they cannot try the candidate.
    cannot_try: Vec<String>,
    /// Followers of the key that have not reported on this candidate yet (with those whose
    /// stream ended within [`FOLLOWER_RETURN_GRACE`]).
    waiting_for: Vec<String>,
    /// When the earliest of those departed followers stops being waited for.
    grace_ends: Option<Instant>,
}

/// How long the gate waits for a follower node whose stream to this owner ended (a follower
/// reconnecting, or the key moving between its sources): its clients are still there, so a
/// version is neither promoted for lack of clients nor without its report meanwhile.
pub const FOLLOWER_RETURN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

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
            record: Mutex::new(Record { generation: 0, phase: None, started: None, reason: None, held_marked: false }),
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
            // At least a millisecond on: a deadline met while the step ran decides at once,
            // and paused time (tests) moves on.
            let soonest = Instant::now() + std::time::Duration::from_millis(1);
            deadline = self.step(&entry).map(|at| at.max(soonest));
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
        record.started = None;
        record.phase = snapshot.candidate.as_ref().map(|candidate| {
            tracing::info!(
                key = %self.key, type_url = %self.type_url, version = %candidate.version_info,
                stable_version = %snapshot.stable.version_info, policy = self.policy.index,
                decided_by_owner = snapshot.owner_generation.is_some(),
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

    /// The canaries on this node and their answers; when the candidate is tried and no
    /// canary is present, chooses them among the clients first.
    fn local_answers(&self, entry: &Entry, snapshot: &LaneSnapshot, candidate: &KeyState) -> LocalAnswers {
        let clients = entry.clients_by_id();
        let answers_of = |canaries: &[u64]| -> Vec<CanaryAnswer> {
            clients
                .iter()
                .filter(|(id, _, _)| canaries.binary_search(id).is_ok())
                .map(|(_, status, _)| CanaryAnswer {
                    node_id: status.node_id.clone(),
                    answer: Answer::of(status, &candidate.version_info),
                })
                .collect()
        };
        let eligible: Vec<Candidate<'_>> = clients
            .iter()
            .filter(|(_, status, _)| status.follower.is_none())
            .filter_map(|(id, _, node)| node.as_deref().map(|node| Candidate { id: *id, node }))
            .collect();
        let mut canaries = answers_of(&snapshot.canaries);
        if canaries.is_empty() && snapshot.offered && snapshot.verdict.is_none() && !eligible.is_empty() {
            let chosen = canary::choose(&self.policy.canaries, &self.type_url, &eligible);
            if !chosen.is_empty() && self.lanes.set_canaries(snapshot.generation, chosen.clone()) {
                tracing::info!(
                    key = %self.key, version = %candidate.version_info, canaries = chosen.len(),
                    clients = eligible.len(), "rollout canaries chosen"
                );
                canaries = answers_of(&chosen);
            }
        }
        LocalAnswers { eligible: eligible.len(), canaries }
    }

    /// The followers' tallies on the candidate of `generation` and `version`, and who has not
    /// reported.
    fn remote_answers(&self, entry: &Entry, generation: u64, version: &str) -> RemoteAnswers {
        let tallies = self.lanes.remote_tallies();
        let mut remote = RemoteAnswers::default();
        let present = entry.followers();
        let version = report_version(version);
        for follower in &present {
            match tallies.get(follower).filter(|t| t.tally.generation == generation && t.tally.version == version) {
                Some(report) => {
                    let tally = &report.tally;
                    if tally.cannot_try {
                        remote.cannot_try.push(follower.clone());
                    }
                    let add = |sum: &mut usize, count: u32| *sum = sum.saturating_add(count as usize);
                    add(&mut remote.clients, tally.clients);
                    add(&mut remote.canaries, tally.canaries);
                    add(&mut remote.acked, tally.acked);
                    add(&mut remote.nacked, tally.nacked);
                    remote.messages.extend(tally.answers.iter().filter_map(|c| match &c.answer {
                        Answer::Nack(message) => Some(format!("{} ({follower}): {message}", c.node_id)),
                        _ => None,
                    }));
                }
                None => remote.waiting_for.push(follower.clone()),
            }
        }
        let now = Instant::now();
        let since = now.checked_sub(FOLLOWER_RETURN_GRACE).unwrap_or(now);
        self.lanes.forget_departed_before(since);
        for (follower, left) in self.lanes.departed_followers() {
            if !present.contains(&follower) {
                remote.waiting_for.push(format!("{follower} (reconnecting)"));
                let ends = left + FOLLOWER_RETURN_GRACE;
                remote.grace_ends = Some(remote.grace_ends.map_or(ends, |e| e.min(ends)));
            }
        }
        remote.waiting_for.sort();
        remote.waiting_for.dedup();
        remote
    }

    /// One look at the key: returns when to look again unless woken earlier.
    fn step(&self, entry: &Entry) -> Option<Instant> {
        let mut record = lock(&self.record);
        let snapshot = self.lanes.snapshot();
        self.sync(&mut record, &snapshot);
        let Some(candidate) = snapshot.candidate.as_ref() else {
            self.lanes.publish_tally(None);
            return None;
        };
        if let Some(owner_generation) = snapshot.owner_generation {
            self.step_as_follower(&mut record, entry, &snapshot, candidate, owner_generation);
            return None;
        }
        if record.phase != Some(Phase::Baking) {
            return None;
        }
        let now = Instant::now();
        let local = self.local_answers(entry, &snapshot, candidate);
        let remote = self.remote_answers(entry, snapshot.generation, &candidate.version_info);
        let answers = Answers {
            canaries: local.canaries.len().saturating_add(remote.canaries),
            acked: local.count(|a| *a == Answer::Ack).saturating_add(remote.acked),
            nacked: local.count(|a| matches!(a, Answer::Nack(_))).saturating_add(remote.nacked),
        };
        let waiting_for_reports =
            || format!("waiting for the canary reports of followers {}", remote.waiting_for.join(", "));
        if answers.canaries == 0 {
            if local.eligible == 0 && remote.clients == 0 && remote.waiting_for.is_empty() {
                self.promote(
                    &mut record,
                    &snapshot,
                    candidate,
                    "promote",
                    "no client watches the key: nothing to protect",
                );
                return None;
            }
            // No canary on any node yet: the version waits (baking) for a client matching the
            // selection, or for the followers' reports; a client arriving or leaving, or a
            // report, wakes this controller.
            record.reason = Some(if !remote.waiting_for.is_empty() {
                waiting_for_reports()
            } else if !remote.cannot_try.is_empty() {
                format!(
                    "no canary can try the version: followers {} cannot (no rollout policy for the key there, \
                     or the version fails their checks), and no other client is a canary; promote or abort by hand",
                    remote.cannot_try.join(", ")
                )
            } else {
                "waiting for a client matching the canary selection".to_owned()
            });
            return remote.grace_ends;
        }
        let started = *record.started.get_or_insert(now);
        record.reason = None;
        let mut messages: Vec<String> = local
            .canaries
            .iter()
            .filter_map(|c| match &c.answer {
                Answer::Nack(message) => Some(format!("{}: {message}", c.node_id)),
                _ => None,
            })
            .collect();
        messages.extend(remote.messages.iter().cloned());
        match gate::decide(self.policy.gate, answers, now.duration_since(started)) {
            Decision::Promote if !remote.waiting_for.is_empty() => {
                // A follower's canaries may not have answered yet: silence is never an ACK.
                record.reason = Some(waiting_for_reports());
                remote.grace_ends
            }
            Decision::Baking { left } => {
                let bake_ends = (!left.is_zero()).then(|| now + left);
                match (bake_ends, remote.grace_ends) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
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

    /// A follower's step: the owner decides; this node serves the candidate to canaries of
    /// its own (chosen by the same policy), reports their answers, and mirrors the owner's
    /// verdict (its phase, and the `rollout_held` gauge while held).
    fn step_as_follower(
        &self,
        record: &mut Record,
        entry: &Entry,
        snapshot: &LaneSnapshot,
        candidate: &KeyState,
        owner_generation: u64,
    ) {
        let local = self.local_answers(entry, snapshot, candidate);
        if record.started.is_none() && !local.canaries.is_empty() {
            record.started = Some(Instant::now());
        }
        self.lanes.publish_tally(Some(local.tally(owner_generation, &candidate.version_info)));
        let phase = match &snapshot.verdict {
            None => Phase::Baking,
            Some(verdict) if verdict.aborted => Phase::Aborted,
            Some(_) => Phase::Held,
        };
        record.phase = Some(phase);
        record.reason = snapshot.verdict.as_ref().map(|v| v.reason.clone());
        self.mark_held(record, phase == Phase::Held);
    }

    fn decided(&self, record: &Record, candidate: &KeyState, decision: &'static str, reason: &str) {
        self.metrics.rollout_decisions.get_or_create(&DecisionLabels { decision }).inc();
        let elapsed = record.started.map(|started| started.elapsed()).unwrap_or_default();
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
        self.lanes.set_verdict(snapshot.generation, Verdict { aborted: false, reason: reason.clone() });
        self.decided(record, candidate, "hold", &reason);
        self.mark_held(record, true);
        record.phase = Some(Phase::Held);
        record.reason = Some(reason);
    }

    /// What an operator's step acts on: the record (locked), the lanes and the candidate;
    /// refused when nothing is in rollout or the key's owner node decides.
    fn operator_step(&self) -> Result<(MutexGuard<'_, Record>, LaneSnapshot, Arc<KeyState>), RolloutError> {
        let mut record = lock(&self.record);
        let snapshot = self.lanes.snapshot();
        self.sync(&mut record, &snapshot);
        let candidate = snapshot.candidate.clone().ok_or_else(|| self.nothing_in_rollout(&snapshot))?;
        if snapshot.owner_generation.is_some() {
            return Err(RolloutError::DecidedByOwner { key: self.key.clone(), owner: self.owner_name() });
        }
        Ok((record, snapshot, candidate))
    }

    /// An operator's promote.
    pub(super) fn promote_by_hand(&self) -> Result<String, RolloutError> {
        let (mut record, snapshot, candidate) = self.operator_step()?;
        if !self.promote(&mut record, &snapshot, &candidate, "manual_promote", "promoted by an operator") {
            return Err(self.nothing_in_rollout(&self.lanes.snapshot()));
        }
        Ok(candidate.version_info.clone())
    }

    /// An operator's abort: every client is served the stable version.
    pub(super) fn abort_by_hand(&self) -> Result<String, RolloutError> {
        let (mut record, snapshot, candidate) = self.operator_step()?;
        if record.phase == Some(Phase::Aborted) {
            return Err(RolloutError::AlreadyAborted {
                key: self.key.clone(),
                version: candidate.version_info.clone(),
            });
        }
        self.lanes.roll_back(snapshot.generation);
        let reason = "aborted by an operator";
        self.lanes.set_verdict(snapshot.generation, Verdict { aborted: true, reason: reason.to_owned() });
        self.decided(&record, &candidate, "abort", reason);
        self.mark_held(&mut record, false);
        record.phase = Some(Phase::Aborted);
        record.reason = Some("aborted by an operator".to_owned());
        Ok(candidate.version_info.clone())
    }

    /// The name of the node this key is followed from (empty when unknown).
    fn owner_name(&self) -> String {
        let Some(entry) = self.entry.upgrade() else { return String::new() };
        match entry.source.current() {
            Some(crate::source::Source::Peer { name, .. }) => name,
            _ => String::new(),
        }
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
        let mut canaries: Vec<CanaryReport> = entry
            .clients_by_id()
            .iter()
            .filter(|(id, _, _)| snapshot.canaries.binary_search(id).is_ok())
            .map(|(_, status, _)| {
                CanaryReport::new(
                    status.node_id.clone(),
                    status.peer.clone(),
                    None,
                    Answer::of(status, &candidate.version_info),
                )
            })
            .collect();
        let mut acks = canaries.iter().filter(|c| c.answer == "ack").count();
        let mut nacks = canaries.iter().filter(|c| c.answer == "nack").count();
        let mut followers = Vec::new();
        let decided_by_owner = snapshot.owner_generation.is_some();
        if !decided_by_owner {
            let remote = self.lanes.remote_tallies();
            for follower in entry.followers() {
                let tally = remote.get(&follower).map(|r| &r.tally).filter(|t| {
                    t.generation == snapshot.generation && t.version == report_version(&candidate.version_info)
                });
                if let Some(tally) = tally {
                    acks += tally.acked as usize;
                    nacks += tally.nacked as usize;
                    canaries.extend(tally.answers.iter().map(|c| {
                        CanaryReport::new(c.node_id.clone(), String::new(), Some(&follower), c.answer.clone())
                    }));
                }
                followers.push(FollowerReport {
                    follower,
                    reported: tally.is_some(),
                    clients: tally.map_or(0, |t| t.clients),
                    canaries: tally.map_or(0, |t| t.canaries),
                    acked: tally.map_or(0, |t| t.acked),
                    nacked: tally.map_or(0, |t| t.nacked),
                });
            }
            followers.sort_by(|a, b| a.follower.cmp(&b.follower));
        }
        let bake_left = match (phase, current) {
            (Phase::Baking, true) => {
                self.policy.gate.bake.saturating_sub(record.started.map(|s| s.elapsed()).unwrap_or_default())
            }
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
            decided_by_owner: decided_by_owner.then(|| self.owner_name()),
            followers,
            bake_left_seconds: bake_left.as_secs_f64(),
            reason: if current { record.reason.clone() } else { None },
        })
    }
}
