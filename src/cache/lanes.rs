//! What the watchers of a key in a staged rollout are served: the stable state, and while a
//! newer version is tried, that candidate for the canary watchers only.
//!
//! An entry has lanes only when a rollout policy applies to its key; otherwise every watcher
//! follows the entry's latest state directly, at no extra cost. With lanes, the entry's state
//! channel stays the latest state its source delivered (the upstream and the owner side of
//! the peer protocol read it), and every change of it is routed here, in the same step
//! (under the state channel's lock, so routing follows the order of the states):
//!
//! - before the first ready state, and for a state of the stable version (a TTL heartbeat, a
//!   coverage change at the same version, an origin going back to the stable version), the
//!   stable state is replaced, and a rollout in progress ends (the origin went back);
//! - a state of the candidate's version replaces the candidate;
//! - any other version becomes the candidate (a new rollout generation), served to the
//!   canaries already chosen, so a canary never goes from a newer version to an older one;
//!   the controller is woken to choose canaries when there are none and to gate it.
//!
//! Versions are told apart by `version_info` (`system_version_info` from a delta origin): a
//! key whose origin sends no version has every state routed to the stable lane, as if no
//! policy applied.
//!
//! In a cluster the key's owner node decides for every node. A state it forwards as its
//! stable state is the stable state here at once ([`Lanes::follow`]); the candidate it
//! forwards is this node's candidate ([`Lanes::follow_candidate`]), served to canaries this
//! node chooses among its own clients, whose answers go back to the owner
//! ([`Lanes::publish_tally`]); the owner's verdict on it (held, aborted, rolled back) is
//! applied as it arrives ([`Lanes::owner_verdict`]). On the owner, the followers' tallies are
//! kept per follower stream ([`Lanes::report_remote`]) for its gate.
//!
//! Every change of the stable state goes to the lanes' stable hook (the entry hands it to its
//! keeper: only a state every client may be served becomes last-known-good on disk).
//!
//! The controller (`crate::rollout`) decides: it sets the canaries, promotes the candidate
//! (it becomes stable for everyone) or rolls the canaries back (they are served the stable
//! state again while the candidate stays blocked until a newer version replaces it). Each of
//! its steps names the generation it decided on, and does nothing once a newer version
//! replaced it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use super::{ClientStatus, KeyState, lock};

/// What the watchers of a key are served now.
#[derive(Debug)]
pub struct Served {
    /// The state every watcher that is not a canary is served.
    pub stable: Arc<KeyState>,
    /// The version in rollout, served to the canaries.
    pub candidate: Option<Arc<KeyState>>,
    /// The watcher ids served the candidate, sorted.
    pub canaries: Arc<[u64]>,
}

impl Served {
    /// The state watcher `id` is served.
    pub fn for_watcher(&self, id: u64) -> &Arc<KeyState> {
        match &self.candidate {
            Some(candidate) if self.canaries.binary_search(&id).is_ok() => candidate,
            _ => &self.stable,
        }
    }
}

/// A copy of the lanes for the controller and the admin API.
#[derive(Debug, Clone)]
pub struct LaneSnapshot {
    /// The stable state.
    pub stable: Arc<KeyState>,
    /// The candidate, served to `canaries` (none once it was rolled back).
    pub candidate: Option<Arc<KeyState>>,
    /// The canary watcher ids, sorted.
    pub canaries: Arc<[u64]>,
    /// Grows with every new candidate version and every promotion.
    pub generation: u64,
    /// True while the candidate is tried on canaries (false once rolled back).
    pub offered: bool,
    /// The gate's verdict on the candidate, once held or aborted.
    pub verdict: Option<Verdict>,
    /// Set when the candidate came from the key's owner node: the owner's generation of it
    /// (the owner decides; this node only serves it to its canaries and reports).
    pub owner_generation: Option<u64>,
}

/// The gate's verdict on a candidate that was not promoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// An operator aborted it (otherwise the gate held it).
    pub aborted: bool,
    /// Why.
    pub reason: String,
}

/// What the key's owner says of the candidate it forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerVerdict {
    /// The owner's generation of the candidate.
    pub generation: u64,
    /// Held or aborted; `None` while it bakes.
    pub verdict: Option<Verdict>,
    /// The canaries are to be served the stable state again.
    pub rolled_back: bool,
}

/// How a canary answered a candidate version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// It ACKed the version.
    Ack,
    /// It NACKed the version, with the client's message.
    Nack(String),
    /// No answer yet.
    Pending,
}

impl Answer {
    /// A client's answer to `version` by its status (a NACK of it wins over an ACK).
    pub fn of(status: &ClientStatus, version: &str) -> Self {
        match &status.last_nack {
            Some(nack) if nack.rejected_version == version => Self::Nack(nack.message.clone()),
            _ if status.acked_version == version => Self::Ack,
            _ => Self::Pending,
        }
    }

    /// `ack`, `nack` or `pending`, as the admin API shows it.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ack => "ack",
            Self::Nack(_) => "nack",
            Self::Pending => "pending",
        }
    }
}

/// One canary's answer, as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryAnswer {
    /// The canary's node id.
    pub node_id: String,
    /// Its answer.
    pub answer: Answer,
}

/// What one node's canaries answered a candidate: a follower's report to the key's owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CanaryTally {
    /// The owner's generation of the candidate answered.
    pub generation: u64,
    /// The candidate's version as reports name it ([`report_version`]; with the generation, it
    /// names the candidate).
    pub version: String,
    /// The node cannot try the candidate (no rollout policy for the key there, or the candidate
    /// fails its checks): none of its clients will be a canary for it.
    pub cannot_try: bool,
    /// The node's clients of the key that may be canaries.
    pub clients: u32,
    /// Its canaries served the candidate now.
    pub canaries: u32,
    /// Those that ACKed it.
    pub acked: u32,
    /// Those that NACKed it.
    pub nacked: u32,
    /// Each canary's answer (NACKs first; bounded by the sender).
    pub answers: Vec<CanaryAnswer>,
}

/// Longest version a report names as it is; a longer one is named by its SHA-256.
pub const MAX_REPORTED_VERSION: usize = 1024;

/// How a report names `version`: itself, or `sha256:<hex>` beyond [`MAX_REPORTED_VERSION`]
/// bytes (so a report stays small whatever the origin's version strings).
pub fn report_version(version: &str) -> std::borrow::Cow<'_, str> {
    use sha2::Digest as _;
    if version.len() <= MAX_REPORTED_VERSION {
        return std::borrow::Cow::Borrowed(version);
    }
    let digest = sha2::Sha256::digest(version.as_bytes());
    std::borrow::Cow::Owned(format!("sha256:{}", digest.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// A follower node's latest tally, as its owner keeps it.
#[derive(Debug, Clone)]
pub struct RemoteTally {
    /// The watcher id of the follower's stream that reported it.
    pub watcher: u64,
    /// Its tally.
    pub tally: CanaryTally,
}

/// Called with the new stable state each time it changes (outside the lanes' lock).
pub type StableHook = Box<dyn Fn(&Arc<KeyState>) + Send + Sync>;

/// The served states of one key under a rollout policy.
pub struct Lanes {
    served: watch::Sender<Arc<Served>>,
    inner: Mutex<LaneState>,
    /// Wakes the key's controller: a new candidate, a canary's answer, an operator's step.
    wake: Notify,
    on_stable: Option<StableHook>,
    /// This node's canaries' answers to its owner's candidate (a follower reports them).
    tally: watch::Sender<Option<CanaryTally>>,
    /// The followers' latest tallies by follower node (on the owner): one per node, also
    /// while an old and a new stream of it overlap.
    remote: Mutex<HashMap<String, RemoteTally>>,
    /// Follower nodes whose last watcher left, and when (on the owner).
    departed: Mutex<HashMap<String, tokio::time::Instant>>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes").field("served", &self.served).field("inner", &self.inner).finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct LaneState {
    stable: Arc<KeyState>,
    candidate: Option<Arc<KeyState>>,
    canaries: Arc<[u64]>,
    generation: u64,
    offered: bool,
    verdict: Option<Verdict>,
    owner_generation: Option<u64>,
}

impl LaneState {
    /// A new candidate generation: `candidate`, tried on the canaries already chosen (a
    /// canary never goes back), decided here (`owner_generation` `None`) or by the owner.
    fn start_candidate(&mut self, candidate: Arc<KeyState>, owner_generation: Option<u64>) {
        self.candidate = Some(candidate);
        self.generation += 1;
        self.offered = true;
        self.verdict = None;
        self.owner_generation = owner_generation;
    }

    /// Takes the owner's verdict on the candidate: a rolled-back one is served to no canary,
    /// and a rollback is never undone within a generation. Returns whether anything changed.
    fn take_verdict(&mut self, verdict: &OwnerVerdict) -> bool {
        let offered = self.offered && !verdict.rolled_back;
        if self.verdict == verdict.verdict && self.offered == offered {
            return false;
        }
        self.verdict.clone_from(&verdict.verdict);
        self.offered = offered;
        if !offered {
            self.canaries = Arc::from([]);
        }
        true
    }

    /// Ends the rollout: no candidate; returns whether there was one.
    fn end_candidate(&mut self) -> bool {
        let ended = self.candidate.take().is_some();
        if ended {
            self.canaries = Arc::from([]);
            self.generation += 1;
        }
        self.offered = false;
        self.verdict = None;
        self.owner_generation = None;
        ended
    }
}

impl Lanes {
    /// Lanes starting from `initial` (the entry's empty state); `on_stable` hears of every
    /// later stable state.
    pub(super) fn new(initial: Arc<KeyState>, on_stable: Option<StableHook>) -> Self {
        let served = Served { stable: initial.clone(), candidate: None, canaries: Arc::from([]) };
        Self {
            served: watch::Sender::new(Arc::new(served)),
            inner: Mutex::new(LaneState {
                stable: initial,
                candidate: None,
                canaries: Arc::from([]),
                generation: 0,
                offered: false,
                verdict: None,
                owner_generation: None,
            }),
            wake: Notify::new(),
            on_stable,
            tally: watch::Sender::new(None),
            remote: Mutex::default(),
            departed: Mutex::default(),
        }
    }

    /// Starts the lanes from a state read from disk: it is the stable state (it was
    /// last-known-good), and the stable hook does not hear of it (it is what was kept).
    pub(super) fn seed(&self, state: &Arc<KeyState>) {
        let mut inner = lock(&self.inner);
        inner.stable = state.clone();
        self.publish(&inner);
    }

    /// Hands a new stable state to the stable hook; the entry calls it for the states
    /// [`Lanes::route`] and [`Lanes::follow`] made stable, once its state lock is released.
    pub(super) fn stable_changed(&self, stable: &Arc<KeyState>) {
        if let Some(hook) = &self.on_stable {
            hook(stable);
        }
    }

    /// A receiver of what the watchers are served.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Served>> {
        self.served.subscribe()
    }

    /// What the watchers are served now.
    pub fn served(&self) -> Arc<Served> {
        self.served.borrow().clone()
    }

    /// The lanes as they are.
    pub fn snapshot(&self) -> LaneSnapshot {
        let state = lock(&self.inner);
        LaneSnapshot {
            stable: state.stable.clone(),
            candidate: state.candidate.clone(),
            canaries: state.canaries.clone(),
            generation: state.generation,
            offered: state.offered,
            verdict: state.verdict.clone(),
            owner_generation: state.owner_generation,
        }
    }

    /// Waits until the controller has something to look at (a wake-up while it was busy is
    /// kept for its next wait).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Wakes the controller.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Wakes the controller when a candidate has no canary yet (a new client may be one).
    pub fn wake_if_waiting_for_canaries(&self) {
        let waiting = {
            let state = lock(&self.inner);
            state.candidate.is_some() && state.canaries.is_empty()
        };
        if waiting {
            self.wake.notify_one();
        }
    }

    /// Wakes the controller when watcher `id` is a canary (its answer may decide the gate);
    /// the other watchers' answers never do.
    pub fn answered(&self, id: u64) {
        if self.served.borrow().canaries.binary_search(&id).is_ok() {
            self.wake.notify_one();
        }
    }

    /// Watcher `id` left: its answers no longer count, nor its tally if it was a follower's;
    /// `departed_follower`: the follower node whose last watcher it was (its departure time
    /// is kept: the gate gives a follower that reconnects time to report again).
    pub(super) fn left(&self, id: u64, departed_follower: Option<String>) {
        let had_tally = {
            let mut remote = lock(&self.remote);
            let before = remote.len();
            remote.retain(|_, tally| tally.watcher != id);
            remote.len() != before
        };
        let follower_left = departed_follower.is_some();
        if let Some(follower) = departed_follower {
            lock(&self.departed).insert(follower, tokio::time::Instant::now());
        }
        if had_tally || follower_left {
            // The gate may have been waiting for this follower's report.
            self.wake.notify_one();
        } else {
            self.answered(id);
        }
    }

    /// The follower nodes whose last watcher left, with when (a follower that comes back is
    /// still listed: the controller reads who is present from the entry).
    pub fn departed_followers(&self) -> HashMap<String, tokio::time::Instant> {
        lock(&self.departed).clone()
    }

    /// Forgets the followers that left at or before `before`.
    pub fn forget_departed_before(&self, before: tokio::time::Instant) {
        lock(&self.departed).retain(|_, left| *left > before);
    }

    /// Keeps `tally`, the latest report of follower node `follower` on the stream of watcher
    /// `id` (replacing its previous one, from any stream), and wakes the controller.
    /// A report from an older stream of the node (watcher ids grow), or on an older generation
    /// from the same stream, arriving late is ignored.
    pub fn report_remote(&self, id: u64, follower: &str, tally: CanaryTally) {
        let mut remote = lock(&self.remote);
        if let Some(kept) = remote.get(follower)
            && (kept.watcher > id || (kept.watcher == id && kept.tally.generation > tally.generation))
        {
            return;
        }
        remote.insert(follower.to_owned(), RemoteTally { watcher: id, tally });
        drop(remote);
        self.wake.notify_one();
    }

    /// The followers' latest tallies, by follower node.
    pub fn remote_tallies(&self) -> HashMap<String, RemoteTally> {
        lock(&self.remote).clone()
    }

    /// Publishes this node's canaries' answers to its owner's candidate (a follower's stream
    /// to the owner sends them on; an unchanged tally wakes nobody).
    pub fn publish_tally(&self, tally: Option<CanaryTally>) {
        self.tally.send_if_modified(|current| {
            let changed = *current != tally;
            *current = tally;
            changed
        });
    }

    /// A receiver of this node's tallies.
    pub fn subscribe_tally(&self) -> watch::Receiver<Option<CanaryTally>> {
        self.tally.subscribe()
    }

    /// Routes the entry's new latest state (see the module doc).
    /// Returns `latest` when it became the stable state (for [`Lanes::stable_changed`]).
    #[must_use]
    pub(super) fn route(&self, latest: &Arc<KeyState>) -> Option<Arc<KeyState>> {
        let mut state = lock(&self.inner);
        let mut stable_changed = false;
        let woke = if !state.stable.is_ready() || !latest.is_ready() || latest.version_info == state.stable.version_info
        {
            state.stable = latest.clone();
            stable_changed = true;
            state.end_candidate()
        } else if state.owner_generation.is_none()
            && state.candidate.as_ref().is_some_and(|c| c.version_info == latest.version_info)
        {
            state.candidate = Some(latest.clone());
            false
        } else {
            // A new version, or the owner's candidate now delivered by this node's own source
            // (the key moved here): this node's gate decides it from now on.
            state.start_candidate(latest.clone(), None);
            true
        };
        self.publish(&state);
        drop(state);
        if woke {
            self.wake.notify_one();
        }
        stable_changed.then(|| latest.clone())
    }

    /// Takes a state the key's owner forwards as its stable state: the owner's gate decided it,
    /// so it is the stable state here; the candidate is left to [`Lanes::follow_candidate`]
    /// and [`Lanes::end_candidate`], which the same forwarded update calls next.
    /// Returns `latest`, the new stable state (for [`Lanes::stable_changed`]).
    #[must_use]
    pub(super) fn follow(&self, latest: &Arc<KeyState>) -> Option<Arc<KeyState>> {
        let mut state = lock(&self.inner);
        state.stable = latest.clone();
        self.publish(&state);
        Some(latest.clone())
    }

    /// True when `state` is the stable state.
    pub(super) fn is_stable(&self, state: &Arc<KeyState>) -> bool {
        Arc::ptr_eq(&lock(&self.inner).stable, state)
    }

    /// Takes the owner's candidate of its generation `owner_generation`, with the owner's
    /// verdict on it: another generation or version starts a rollout here (served to the
    /// canaries already chosen, unless it arrives rolled back; the controller chooses them
    /// when there are none), the same one replaces the candidate's state. The verdict is
    /// applied in the same step, so a held candidate never reaches a canary here first.
    pub(super) fn follow_candidate(&self, latest: &Arc<KeyState>, verdict: &OwnerVerdict) {
        let owner_generation = verdict.generation;
        let mut state = lock(&self.inner);
        let same = state.owner_generation == Some(owner_generation)
            && state.candidate.as_ref().is_some_and(|c| c.version_info == latest.version_info);
        let woke = if same {
            state.candidate = Some(latest.clone());
            false
        } else {
            state.start_candidate(latest.clone(), Some(owner_generation));
            true
        };
        state.take_verdict(verdict);
        self.publish(&state);
        drop(state);
        if woke {
            self.wake.notify_one();
        }
    }

    /// The owner forwards no candidate: a rollout here ends (the owner promoted it, and the
    /// promoted state came as its stable state, or the origin went back).
    pub fn end_candidate(&self) {
        let mut state = lock(&self.inner);
        if state.candidate.is_none() {
            return;
        }
        state.end_candidate();
        self.publish(&state);
        drop(state);
        self.wake.notify_one();
    }

    /// The owner's verdict on its candidate (see [`OwnerVerdict`]); does nothing when the
    /// candidate here is another.
    pub fn owner_verdict(&self, verdict: &OwnerVerdict) {
        let mut state = lock(&self.inner);
        if state.owner_generation != Some(verdict.generation) || !state.take_verdict(verdict) {
            return;
        }
        self.publish(&state);
        drop(state);
        self.wake.notify_one();
    }

    /// True while the candidate came from the key's owner node (it decides).
    pub fn follows_owner(&self) -> bool {
        lock(&self.inner).owner_generation.is_some()
    }

    /// Records this node's gate's verdict on the candidate of `generation` (the owner
    /// forwards it to its followers); false when it was replaced.
    pub fn set_verdict(&self, generation: u64, verdict: Verdict) -> bool {
        let mut state = lock(&self.inner);
        if state.generation != generation || state.candidate.is_none() {
            return false;
        }
        state.verdict = Some(verdict);
        self.publish(&state);
        true
    }

    /// Serves the candidate of `generation` to `canaries`; false when it was replaced.
    pub fn set_canaries(&self, generation: u64, mut canaries: Vec<u64>) -> bool {
        canaries.sort_unstable();
        canaries.dedup();
        let mut state = lock(&self.inner);
        // A rolled-back or decided candidate gets no new canary.
        if state.generation != generation || state.candidate.is_none() || !state.offered || state.verdict.is_some() {
            return false;
        }
        state.canaries = canaries.into();
        self.publish(&state);
        true
    }

    /// Makes the candidate of `generation` the stable state of every watcher; returns it, or
    /// `None` when it was replaced.
    pub fn promote(&self, generation: u64) -> Option<Arc<KeyState>> {
        let mut state = lock(&self.inner);
        if state.generation != generation {
            return None;
        }
        let promoted = state.candidate.clone()?;
        state.stable = promoted.clone();
        state.end_candidate();
        self.publish(&state);
        drop(state);
        self.stable_changed(&promoted);
        Some(promoted)
    }

    /// Serves the canaries of `generation`'s candidate the stable state again; the candidate
    /// stays blocked until a newer version replaces it. False when it was replaced.
    pub fn roll_back(&self, generation: u64) -> bool {
        let mut state = lock(&self.inner);
        if state.generation != generation || state.candidate.is_none() {
            return false;
        }
        state.canaries = Arc::from([]);
        state.offered = false;
        self.publish(&state);
        true
    }

    fn publish(&self, state: &LaneState) {
        let candidate = if state.canaries.is_empty() { None } else { state.candidate.clone() };
        self.served.send_replace(Arc::new(Served {
            stable: state.stable.clone(),
            candidate,
            canaries: state.canaries.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routes `latest` as the entry does: the state it makes stable goes to the stable hook.
    fn route(lanes: &Lanes, latest: &Arc<KeyState>) {
        if let Some(stable) = lanes.route(latest) {
            lanes.stable_changed(&stable);
        }
    }

    fn state(version: &str) -> Arc<KeyState> {
        let mut state = KeyState::empty(crate::xds::CLUSTER);
        state.ready = true;
        state.version_info = version.to_owned();
        Arc::new(state)
    }

    #[test]
    fn the_first_version_is_stable_and_a_newer_one_reaches_only_the_canaries() {
        let lanes = Lanes::new(Arc::new(KeyState::empty(crate::xds::CLUSTER)), None);
        route(&lanes, &state("v1"));
        assert_eq!(lanes.served().for_watcher(7).version_info, "v1", "nothing to protect yet");
        assert!(lanes.snapshot().candidate.is_none());

        route(&lanes, &state("v2"));
        let snapshot = lanes.snapshot();
        assert_eq!(snapshot.candidate.as_ref().unwrap().version_info, "v2");
        assert_eq!(lanes.served().for_watcher(7).version_info, "v1", "no canary chosen yet");
        assert!(lanes.set_canaries(snapshot.generation, vec![7]));
        assert_eq!(lanes.served().for_watcher(7).version_info, "v2");
        assert_eq!(lanes.served().for_watcher(8).version_info, "v1");

        // A newer version during the rollout: the same canaries move on, never back.
        route(&lanes, &state("v3"));
        let newer = lanes.snapshot();
        assert!(newer.generation > snapshot.generation);
        assert_eq!(lanes.served().for_watcher(7).version_info, "v3");
        assert!(!lanes.set_canaries(snapshot.generation, vec![8]), "a decision on a replaced version does nothing");
        assert!(lanes.promote(snapshot.generation).is_none());

        assert_eq!(lanes.promote(newer.generation).unwrap().version_info, "v3");
        assert_eq!(lanes.served().for_watcher(8).version_info, "v3");
        assert!(lanes.served().candidate.is_none());
    }

    #[test]
    fn a_rolled_back_candidate_stays_blocked_and_the_stable_version_keeps_its_updates() {
        let lanes = Lanes::new(Arc::new(KeyState::empty(crate::xds::CLUSTER)), None);
        route(&lanes, &state("v1"));
        route(&lanes, &state("v2"));
        let generation = lanes.snapshot().generation;
        assert!(lanes.set_canaries(generation, vec![1]));
        assert!(lanes.roll_back(generation));
        assert_eq!(lanes.served().for_watcher(1).version_info, "v1", "the canary is rolled back");
        // A heartbeat of the blocked candidate reaches nobody.
        route(&lanes, &state("v2"));
        assert_eq!(lanes.served().for_watcher(2).version_info, "v1");
        assert_eq!(lanes.snapshot().generation, generation);
        // The origin going back to the stable version ends the rollout.
        route(&lanes, &state("v1"));
        assert!(lanes.snapshot().candidate.is_none());
    }

    #[test]
    fn only_a_stable_state_reaches_the_stable_hook_never_a_candidate_on_trial() {
        let kept = Arc::new(Mutex::new(Vec::<String>::new()));
        let hook_kept = kept.clone();
        let hook: StableHook = Box::new(move |s: &Arc<KeyState>| lock(&hook_kept).push(s.version_info.clone()));
        let lanes = Lanes::new(Arc::new(KeyState::empty(crate::xds::CLUSTER)), Some(hook));
        let kept = || lock(&kept).clone();

        route(&lanes, &state("v1"));
        assert_eq!(kept(), ["v1"], "the first version is stable at once");
        route(&lanes, &state("v2"));
        let generation = lanes.snapshot().generation;
        assert!(lanes.set_canaries(generation, vec![1]));
        assert_eq!(kept(), ["v1"], "a candidate on trial is not last-known-good");
        assert!(lanes.roll_back(generation));
        assert_eq!(kept(), ["v1"], "nor a held one");

        route(&lanes, &state("v3"));
        let generation = lanes.snapshot().generation;
        assert_eq!(lanes.promote(generation).unwrap().version_info, "v3");
        assert_eq!(kept(), ["v1", "v3"], "a promoted version is");

        // A state read from disk starts the lanes without being kept again.
        let seeded = Lanes::new(Arc::new(KeyState::empty(crate::xds::CLUSTER)), None);
        seeded.seed(&state("v9"));
        assert_eq!(seeded.served().for_watcher(1).version_info, "v9");
        route(&seeded, &state("v10"));
        assert_eq!(seeded.snapshot().candidate.unwrap().version_info, "v10", "a live newer version is a candidate");
    }

    #[test]
    fn a_state_the_owner_forwards_is_stable_at_once_and_its_update_ends_a_rollout_of_this_node() {
        let lanes = Lanes::new(Arc::new(KeyState::empty(crate::xds::CLUSTER)), None);
        route(&lanes, &state("v1"));
        route(&lanes, &state("v2"));
        assert!(lanes.set_canaries(lanes.snapshot().generation, vec![1]));
        // This node lost the key: its owner forwards its stable state and no candidate.
        assert!(lanes.follow(&state("v3")).is_some(), "the owner's state is stable");
        lanes.end_candidate();
        let snapshot = lanes.snapshot();
        assert!(snapshot.candidate.is_none(), "the owner decides: this node's rollout ends");
        assert_eq!(lanes.served().for_watcher(1).version_info, "v3");
        assert_eq!(lanes.served().for_watcher(2).version_info, "v3");
    }

    #[test]
    fn the_owners_candidate_reaches_this_nodes_canaries_and_its_verdict_rolls_them_back() {
        let lanes = Lanes::new(Arc::new(KeyState::empty(crate::xds::CLUSTER)), None);
        assert!(lanes.follow(&state("v1")).is_some());
        let baking = |generation| OwnerVerdict { generation, verdict: None, rolled_back: false };
        lanes.follow_candidate(&state("v2"), &baking(7));
        let snapshot = lanes.snapshot();
        assert_eq!((snapshot.owner_generation, snapshot.offered), (Some(7), true));
        assert!(lanes.set_canaries(snapshot.generation, vec![1]), "this node chooses its own canaries");
        assert_eq!(lanes.served().for_watcher(1).version_info, "v2");
        assert_eq!(lanes.served().for_watcher(2).version_info, "v1");

        // The same generation again (a resend) keeps the canaries; a verdict on another is ignored.
        lanes.follow_candidate(&state("v2"), &baking(7));
        let old = Verdict { aborted: false, reason: "old".into() };
        lanes.owner_verdict(&OwnerVerdict { generation: 6, verdict: Some(old), rolled_back: true });
        assert_eq!(lanes.served().for_watcher(1).version_info, "v2");

        let held = Verdict { aborted: false, reason: "1 of 1 canaries NACKed".into() };
        lanes.owner_verdict(&OwnerVerdict { generation: 7, verdict: Some(held.clone()), rolled_back: true });
        let snapshot = lanes.snapshot();
        assert_eq!((snapshot.verdict, snapshot.offered), (Some(held), false));
        assert_eq!(lanes.served().for_watcher(1).version_info, "v1", "rolled back by the owner");
        assert!(!lanes.set_canaries(snapshot.generation, vec![1]), "a rolled-back candidate gets no canary");

        // The owner's next candidate goes to the canaries again; its promotion arrives as the
        // stable state, and the update carries no candidate.
        lanes.follow_candidate(&state("v3"), &baking(9));
        assert!(lanes.set_canaries(lanes.snapshot().generation, vec![1]));
        assert!(lanes.follow(&state("v3")).is_some());
        lanes.end_candidate();
        assert!(lanes.snapshot().candidate.is_none());
        assert_eq!(lanes.served().for_watcher(1).version_info, "v3");
        assert_eq!(lanes.served().for_watcher(2).version_info, "v3");

        // The key moved here: the origin delivering the owner's candidate version makes it a
        // candidate of this node's own gate.
        lanes.follow_candidate(&state("v4"), &baking(11));
        route(&lanes, &state("v4"));
        let snapshot = lanes.snapshot();
        assert_eq!((snapshot.candidate.unwrap().version_info.as_str(), snapshot.owner_generation), ("v4", None));

        // A candidate that arrives already held and rolled back (a follower reconnecting late)
        // reaches no canary, not even for a moment.
        lanes.follow_candidate(&state("v5"), &baking(13));
        assert!(lanes.set_canaries(lanes.snapshot().generation, vec![1]));
        let held = Verdict { aborted: false, reason: "held".into() };
        lanes.follow_candidate(&state("v6"), &OwnerVerdict { generation: 15, verdict: Some(held), rolled_back: true });
        assert_eq!(lanes.served().for_watcher(1).version_info, "v3", "the canary is back on the stable state");
        assert!(!lanes.set_canaries(lanes.snapshot().generation, vec![2]), "a held candidate gets no new canary");
    }

    #[test]
    fn a_report_names_a_long_version_by_its_digest() {
        assert_eq!(report_version("v1"), "v1");
        let long = "v".repeat(MAX_REPORTED_VERSION + 1);
        let named = report_version(&long);
        assert!(named.starts_with("sha256:") && named.len() == 71, "{named}");
        assert_ne!(report_version(&format!("{long}x")), named);
    }

    #[test]
    fn a_verdict_arriving_with_an_unchanged_candidate_state_is_applied() {
        let lanes = Lanes::new(Arc::new(KeyState::empty(crate::xds::CLUSTER)), None);
        assert!(lanes.follow(&state("v1")).is_some());
        let candidate = state("v2");
        lanes.follow_candidate(&candidate, &OwnerVerdict { generation: 3, verdict: None, rolled_back: false });
        assert!(lanes.set_canaries(lanes.snapshot().generation, vec![1]));
        let held = Verdict { aborted: false, reason: "held".into() };
        lanes.follow_candidate(&candidate, &OwnerVerdict { generation: 3, verdict: Some(held), rolled_back: true });
        assert_eq!(lanes.served().for_watcher(1).version_info, "v1", "rolled back though the state is the same");
    }

    #[test]
    fn a_followers_tally_is_kept_per_stream_until_its_watcher_leaves() {
        let lanes = Lanes::new(Arc::new(KeyState::empty(crate::xds::CLUSTER)), None);
        let tally = CanaryTally { generation: 3, clients: 2, canaries: 1, nacked: 1, ..CanaryTally::default() };
        lanes.report_remote(5, "relay-2", tally.clone());
        lanes.report_remote(6, "relay-3", CanaryTally::default());
        lanes.report_remote(5, "relay-2", CanaryTally { acked: 1, nacked: 0, ..tally.clone() });
        let tallies = lanes.remote_tallies();
        assert_eq!((tallies.len(), tallies["relay-2"].tally.acked, tallies["relay-2"].watcher), (2, 1, 5));
        // A new stream of the same follower replaces its tally: a node counts once.
        lanes.report_remote(7, "relay-2", tally.clone());
        assert_eq!(lanes.remote_tallies()["relay-2"].watcher, 7);
        lanes.left(5, None);
        assert_eq!(lanes.remote_tallies().len(), 2, "the old stream leaving takes nothing away");
        lanes.left(7, Some("relay-2".into()));
        assert_eq!(lanes.remote_tallies().keys().collect::<Vec<_>>(), [&"relay-3".to_owned()]);
        assert!(lanes.departed_followers().contains_key("relay-2"), "its departure is kept for the gate");

        // A late report of an older stream, or of an older generation, never replaces a newer one.
        lanes.report_remote(9, "relay-3", CanaryTally { generation: 5, ..CanaryTally::default() });
        lanes.report_remote(8, "relay-3", CanaryTally { generation: 6, ..CanaryTally::default() });
        lanes.report_remote(9, "relay-3", CanaryTally { generation: 4, ..CanaryTally::default() });
        let kept = &lanes.remote_tallies()["relay-3"];
        assert_eq!((kept.watcher, kept.tally.generation), (9, 5));

        let mut receiver = lanes.subscribe_tally();
        lanes.publish_tally(Some(tally.clone()));
        assert!(receiver.has_changed().unwrap());
        receiver.borrow_and_update();
        lanes.publish_tally(Some(tally));
        assert!(!receiver.has_changed().unwrap(), "an unchanged tally wakes nobody");
    }
}
