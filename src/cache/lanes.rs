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
//! A state forwarded by the key's owner node is the stable state at once (`follow`): in a
//! cluster the owner's gate decides for every node, and the owner forwards only what it
//! promoted.
//!
//! Every change of the stable state goes to the lanes' stable hook (the entry hands it to its
//! keeper: only a state every client may be served becomes last-known-good on disk).
//!
//! The controller (`crate::rollout`) decides: it sets the canaries, promotes the candidate
//! (it becomes stable for everyone) or rolls the canaries back (they are served the stable
//! state again while the candidate stays blocked until a newer version replaces it). Each of
//! its steps names the generation it decided on, and does nothing once a newer version
//! replaced it.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use super::{KeyState, lock};

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
}

impl Lanes {
    /// Lanes starting from `initial` (the entry's empty state); `on_stable` hears of every
    /// later stable state.
    pub(super) fn new(initial: Arc<KeyState>, on_stable: Option<StableHook>) -> Self {
        let served = Served { stable: initial.clone(), candidate: None, canaries: Arc::from([]) };
        Self {
            served: watch::Sender::new(Arc::new(served)),
            inner: Mutex::new(LaneState { stable: initial, candidate: None, canaries: Arc::from([]), generation: 0 }),
            wake: Notify::new(),
            on_stable,
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
            let ended = state.candidate.take().is_some();
            if ended {
                state.canaries = Arc::from([]);
                state.generation += 1;
            }
            ended
        } else if state.candidate.as_ref().is_some_and(|c| c.version_info == latest.version_info) {
            state.candidate = Some(latest.clone());
            false
        } else {
            state.candidate = Some(latest.clone());
            state.generation += 1;
            true
        };
        self.publish(&state);
        drop(state);
        if woke {
            self.wake.notify_one();
        }
        stable_changed.then(|| latest.clone())
    }

    /// Takes a state forwarded by the key's owner: the owner's gate decided it (an owner
    /// forwards only its stable state), so it is the stable state here and this node does not
    /// gate it again; a rollout this node had started while it owned the key ends.
    /// Returns `latest`, the new stable state (for [`Lanes::stable_changed`]).
    #[must_use]
    pub(super) fn follow(&self, latest: &Arc<KeyState>) -> Option<Arc<KeyState>> {
        let mut state = lock(&self.inner);
        state.stable = latest.clone();
        let ended = state.candidate.take().is_some();
        if ended {
            state.canaries = Arc::from([]);
            state.generation += 1;
        }
        self.publish(&state);
        drop(state);
        if ended {
            self.wake.notify_one();
        }
        Some(latest.clone())
    }

    /// Serves the candidate of `generation` to `canaries`; false when it was replaced.
    pub fn set_canaries(&self, generation: u64, mut canaries: Vec<u64>) -> bool {
        canaries.sort_unstable();
        canaries.dedup();
        let mut state = lock(&self.inner);
        if state.generation != generation || state.candidate.is_none() {
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
        let promoted = state.candidate.take()?;
        state.stable = promoted.clone();
        state.canaries = Arc::from([]);
        state.generation += 1;
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
    fn a_state_the_owner_forwards_is_stable_at_once_and_ends_a_rollout_of_this_node() {
        let lanes = Lanes::new(Arc::new(KeyState::empty(crate::xds::CLUSTER)), None);
        route(&lanes, &state("v1"));
        route(&lanes, &state("v2"));
        assert!(lanes.set_canaries(lanes.snapshot().generation, vec![1]));
        // This node lost the key: its owner forwards what its own gate promoted.
        assert!(lanes.follow(&state("v3")).is_some(), "the owner's state is stable");
        let snapshot = lanes.snapshot();
        assert!(snapshot.candidate.is_none(), "no second gate on a follower");
        assert_eq!(lanes.served().for_watcher(1).version_info, "v3");
        assert_eq!(lanes.served().for_watcher(2).version_info, "v3");
    }
}
