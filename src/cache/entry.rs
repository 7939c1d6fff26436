//! The cache entry of one aggregation key: its state, its watchers and the union of what
//! they want, and its source's cell.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use tokio::sync::watch;
use tokio::time::Instant;

use super::hooks::{Attachment, Keeper, KeyHooks};
use super::lanes::{LaneSnapshot, Lanes, OwnerVerdict};
use super::union::{InterestCounts, param_sets_after, union_size_after};
use super::watcher::{ClientSlot, Registry};
use super::{ClientStatus, Interest, KeyState, Rejection, lock};
use crate::limit::LimitRefusal;
use crate::source::SourceCell;

/// The cache entry of one aggregation key; `K` is what it carries for its users and reports
/// its watchers into (the key's metric handles).
pub struct Entry<K> {
    /// The aggregation key.
    pub key: String,
    /// The key's resource type.
    pub type_url: String,
    /// The node sent upstream: the first client's node.
    pub node: Node,
    /// The key's handles for the layers above the cache (its metrics).
    pub metrics: K,
    /// When the entry was created.
    pub created_at: Instant,
    pub(super) state: watch::Sender<Arc<KeyState>>,
    interest_tx: watch::Sender<Interest>,
    counts: Mutex<InterestCounts>,
    /// Number of watchers; changed only while `idle_since` is locked, and raised only while
    /// the cache's map is locked (so eviction, which decides under that lock, sees it).
    watchers: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
    pub(super) last_used: AtomicU64,
    /// The cache's count of keys with at least one watcher (this entry counts while it has one).
    active: Arc<AtomicUsize>,
    /// Most names the union may hold (`limits.max_names_per_key`).
    max_names: usize,
    clients: Mutex<Registry>,
    /// The key's source: what runs it, whether it answers, its refetches and freshness.
    pub source: SourceCell,
    /// Where accepted states are kept (the node's last-known-good store), if anywhere.
    keeper: Option<Arc<dyn Keeper>>,
    /// True for an entry seeded from disk whose first watcher has not started a source yet.
    needs_source: std::sync::atomic::AtomicBool,
    /// What the watchers are served, when a rollout policy applies to the key (otherwise
    /// they follow `state`).
    lanes: Option<Arc<Lanes>>,
}

impl<K> std::fmt::Debug for Entry<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("key", &self.key).field("type_url", &self.type_url).finish_non_exhaustive()
    }
}

impl<K> Drop for Entry<K> {
    fn drop(&mut self) {
        // The key's rollout controller ends when its entry is gone.
        if let Some(lanes) = &self.lanes {
            lanes.wake();
        }
    }
}

/// What an entry takes from its cache when it is created.
pub(super) struct FromCache {
    /// The cache's count of keys with at least one watcher.
    pub(super) active: Arc<AtomicUsize>,
    /// Most names the union may hold (`limits.max_names_per_key`).
    pub(super) max_names: usize,
    /// Where accepted states are kept, if anywhere.
    pub(super) keeper: Option<Arc<dyn Keeper>>,
    /// Whether a rollout policy applies to the key (the entry then has lanes).
    pub(super) staged: bool,
}

impl<K: KeyHooks> Entry<K> {
    pub(super) fn new(key: &str, type_url: &str, node: Node, metrics: K, from_cache: FromCache) -> Self {
        let FromCache { active, max_names, keeper, staged } = from_cache;
        let initial = Arc::new(KeyState::empty(type_url));
        let lanes = staged.then(|| Arc::new(Lanes::new(initial.clone(), stable_hook(key, type_url, &node, &keeper))));
        Self {
            key: key.to_owned(),
            type_url: type_url.to_owned(),
            node,
            metrics,
            created_at: Instant::now(),
            lanes,
            state: watch::Sender::new(initial),
            interest_tx: watch::Sender::new(Interest::default()),
            counts: Mutex::new(InterestCounts::default()),
            watchers: AtomicUsize::new(0),
            idle_since: Mutex::new(Some(Instant::now())),
            last_used: AtomicU64::new(0),
            active,
            max_names,
            clients: Mutex::new(Registry::default()),
            source: SourceCell::default(),
            keeper,
            needs_source: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Installs `state`, read from disk at start, as the entry's first state and marks it
    /// stale until a live source delivers; the first watcher starts the source
    /// ([`Entry::take_needs_source`]). The state is not handed to the keeper (it is what was
    /// kept). Under a rollout policy it is the stable state: it was last-known-good.
    pub(super) fn seed(&self, state: KeyState) {
        let state = Arc::new(state);
        self.state.send_replace(state.clone());
        if let Some(lanes) = &self.lanes {
            lanes.seed(&state);
        }
        self.source.set_stale(true);
        self.needs_source.store(true, Ordering::Release);
    }

    /// True once for an entry seeded from disk: its source must start with its first watcher.
    pub(super) fn take_needs_source(&self) -> bool {
        // A load first: the watch path of a hot key only reads the flag.
        self.needs_source.load(Ordering::Acquire) && self.needs_source.swap(false, Ordering::AcqRel)
    }

    /// The latest state its source delivered.
    pub fn state(&self) -> Arc<KeyState> {
        self.state.borrow().clone()
    }

    /// The state every client that is not a canary is served: the latest state, or the last
    /// promoted one while a newer version rolls out (the state to keep as last-known-good).
    pub fn stable_state(&self) -> Arc<KeyState> {
        match &self.lanes {
            Some(lanes) => lanes.served().stable.clone(),
            None => self.state(),
        }
    }

    /// The served lanes, when a rollout policy applies to the key.
    pub fn lanes(&self) -> Option<&Arc<Lanes>> {
        self.lanes.as_ref()
    }

    /// The lanes as they are, when a rollout policy applies to the key.
    pub fn lane_snapshot(&self) -> Option<LaneSnapshot> {
        self.lanes.as_ref().map(|lanes| lanes.snapshot())
    }

    /// A receiver of the key's states (the upstream side uses it to read the current state).
    pub fn subscribe_state(&self) -> watch::Receiver<Arc<KeyState>> {
        self.state.subscribe()
    }

    /// The union of what the watchers want, as a watch the upstream follows.
    pub fn interest(&self) -> watch::Receiver<Interest> {
        self.interest_tx.subscribe()
    }

    /// Number of downstream streams watching the key.
    pub fn watcher_count(&self) -> usize {
        self.watchers.load(Ordering::Acquire)
    }

    /// Since when the entry has had no watcher.
    pub fn idle_since(&self) -> Option<Instant> {
        *lock(&self.idle_since)
    }

    /// Applies a state-of-the-world origin response answering `coverage`, waking watchers
    /// when it changed something. Returns whether the version or content changed.
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; the cached state is kept.
    ///
    /// `first_on_stream`: the first response of a new origin stream, which resends every
    /// `do_not_cache` resource that still exists ([`KeyState::apply_first`]).
    pub fn apply_response(
        &self,
        response: DiscoveryResponse,
        coverage: &Interest,
        first_on_stream: bool,
        trace: impl FnOnce(&KeyState) -> Attachment,
    ) -> Result<bool, Rejection> {
        match first_on_stream {
            true => self.update(|state| state.apply_first(response, coverage), trace, false, Via::Source),
            false => self.update(|state| state.apply(response, coverage), trace, false, Via::Source),
        }
    }

    /// Applies a delta origin response answering `coverage`, like [`Entry::apply_response`].
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; the cached state is kept.
    pub fn apply_delta_response(
        &self,
        response: DeltaDiscoveryResponse,
        coverage: &Interest,
        first_on_stream: bool,
        trace: impl FnOnce(&KeyState) -> Attachment,
    ) -> Result<bool, Rejection> {
        match first_on_stream {
            true => self.update(|state| state.apply_delta_first(response, coverage), trace, false, Via::Source),
            false => self.update(|state| state.apply_delta(response, coverage), trace, false, Via::Source),
        }
    }

    /// Applies `f` to the state; a new version gets the trace `trace` makes for it. A state
    /// applied (changed or not) sets the stale mark to `stale` (false for a live source); a
    /// changed one goes to the keeper ([`Entry::accepted`]). Under a rollout policy, a state
    /// the owner forwards as stable (its gate decided it) is the stable state at once, the
    /// owner's candidate is the candidate, and a state of this node's own source is routed
    /// through this node's gate ([`Lanes`]). A candidate sets no stale mark.
    fn update(
        &self,
        f: impl FnOnce(&KeyState) -> Result<Option<KeyState>, Rejection>,
        trace: impl FnOnce(&KeyState) -> Attachment,
        stale: bool,
        via: Via<'_>,
    ) -> Result<bool, Rejection> {
        let mut result = Ok(false);
        let mut replaced = false;
        // Under a rollout policy: the state the lanes made stable, kept once the lock is released.
        let mut new_stable = None;
        let mut f = Some(f);
        let mut trace = Some(trace);
        self.state.send_if_modified(|state| {
            let Some(f) = f.take() else { return false };
            match f(state) {
                Ok(Some(mut next)) => {
                    let new_version = next.is_new_version_after(state);
                    match (new_version, trace.take()) {
                        (true, Some(trace)) => next.trace = trace(&next),
                        _ => next.trace = state.trace.clone(),
                    }
                    result = Ok(new_version);
                    replaced = true;
                    *state = Arc::new(next);
                    new_stable = match (&self.lanes, via) {
                        (Some(lanes), Via::OwnerStable) => lanes.follow(state),
                        (Some(lanes), Via::OwnerCandidate(verdict)) => {
                            lanes.follow_candidate(state, verdict);
                            None
                        }
                        // A late state of an origin stream being retired once the key's owner
                        // delivers: the owner decides what is served.
                        (Some(_), Via::Source) if self.source.peer_has_delivered() => None,
                        (Some(lanes), Via::Source) => lanes.route(state),
                        (None, _) => None,
                    };
                    true
                }
                Ok(None) => {
                    // The latest state already is the owner's: it may still have to become the
                    // stable state (a promoted candidate) or the candidate here.
                    new_stable = match (&self.lanes, via) {
                        (Some(lanes), Via::OwnerStable) if !lanes.is_stable(state) => lanes.follow(state),
                        (Some(lanes), Via::OwnerCandidate(verdict)) => {
                            lanes.follow_candidate(state, verdict);
                            None
                        }
                        // The key moved here and its origin delivers what the owner had
                        // forwarded: this node's gate takes the rollout over.
                        (Some(lanes), Via::Source) if lanes.follows_owner() && !self.source.is_peer() => {
                            lanes.route(state)
                        }
                        _ => None,
                    };
                    false
                }
                Err(rejection) => {
                    result = Err(rejection);
                    false
                }
            }
        });
        if result.is_ok() && !matches!(via, Via::OwnerCandidate(_)) {
            self.source.set_stale(stale);
        }
        // Under a rollout policy the lanes hand the keeper each new stable state instead.
        if replaced && self.lanes.is_none() {
            self.accepted();
        }
        if let (Some(lanes), Some(stable)) = (&self.lanes, new_stable) {
            lanes.stable_changed(&stable);
        }
        result
    }

    /// The one place a state accepted from a source leaves an entry without lanes for its
    /// keeper: the current state (a later update racing this one hands over its own, so the
    /// keeper always ends with the latest). With lanes, see [`stable_hook`].
    fn accepted(&self) {
        if let Some(keeper) = &self.keeper {
            let state = self.state();
            keeper.accepted(&self.key, &self.type_url, &self.node, &state);
        }
    }

    /// Counts a new watcher in (and the key as active when it is the first); called while
    /// the cache's map is locked.
    pub(super) fn add_watcher(&self, last_used: u64) {
        let mut idle_since = lock(&self.idle_since);
        if self.watchers.fetch_add(1, Ordering::AcqRel) == 0 {
            self.active.fetch_add(1, Ordering::AcqRel);
        }
        *idle_since = None;
        self.last_used.store(last_used, Ordering::Relaxed);
    }

    /// Counts a watcher out; the entry becomes idle when it was the last.
    pub(super) fn remove_watcher(&self) {
        let mut idle_since = lock(&self.idle_since);
        let left = self.watchers.fetch_sub(1, Ordering::AcqRel) - 1;
        if left == 0 {
            self.active.fetch_sub(1, Ordering::AcqRel);
            *idle_since = Some(Instant::now());
        }
    }

    /// The relay nodes following this key through this node, sorted (O(followers), not
    /// O(clients)).
    pub fn followers(&self) -> Vec<String> {
        lock(&self.clients).followers.keys().cloned().collect()
    }

    /// True when another relay node follows this key through this node.
    pub fn has_followers(&self) -> bool {
        !lock(&self.clients).followers.is_empty()
    }

    /// Downstream clients that are not relay nodes.
    pub fn local_clients(&self) -> usize {
        let registry = lock(&self.clients);
        registry.slots.len() - registry.followers.values().sum::<usize>()
    }

    /// Applies a state forwarded by the key's owner: it replaces the cached state whatever the
    /// type (the owner sends its full state), waking watchers when something changed.
    ///
    /// # Errors
    /// A [`Rejection`] when the forwarded response is malformed; the cached state is kept.
    ///
    /// `do_not_cache_age`: how long ago the forwarded `do_not_cache` resources reached the
    /// owner; they are dated so here ([`KeyState::replace_dated`]). `stale`: the owner serves
    /// the state from disk, not yet confirmed by its origin; the entry stays marked stale.
    pub fn apply_forwarded(
        &self,
        response: DiscoveryResponse,
        coverage: &Interest,
        do_not_cache_age: std::time::Duration,
        stale: bool,
        trace: impl FnOnce(&KeyState) -> Attachment,
    ) -> Result<bool, Rejection> {
        let arrived = Instant::now().checked_sub(do_not_cache_age).unwrap_or(self.created_at);
        self.update(|state| state.replace_dated(response, coverage, arrived), trace, stale, Via::OwnerStable)
    }

    /// Applies the candidate of a staged rollout forwarded by the key's owner with its
    /// `verdict`, like [`Entry::apply_forwarded`]: it becomes the candidate served to this
    /// node's canaries ([`Lanes::follow_candidate`]). Returns false, applying nothing, on a
    /// key without lanes (no rollout policy applies to it here: every client keeps the stable
    /// state).
    ///
    /// # Errors
    /// A [`Rejection`] when the forwarded response is malformed; the cached state is kept.
    pub fn apply_forwarded_candidate(
        &self,
        response: DiscoveryResponse,
        coverage: &Interest,
        do_not_cache_age: std::time::Duration,
        verdict: &OwnerVerdict,
        trace: impl FnOnce(&KeyState) -> Attachment,
    ) -> Result<bool, Rejection> {
        if self.lanes.is_none() {
            return Ok(false);
        }
        let arrived = Instant::now().checked_sub(do_not_cache_age).unwrap_or(self.created_at);
        let via = Via::OwnerCandidate(verdict);
        self.update(|state| state.replace_dated(response, coverage, arrived), trace, false, via)
    }

    /// Every client's status, as a snapshot (the registry lock is held only to copy the
    /// slot handles, never while a stream's slot is read).
    pub fn clients(&self) -> Vec<ClientStatus> {
        let slots: Vec<Arc<ClientSlot>> = lock(&self.clients).slots.values().cloned().collect();
        slots.iter().map(|slot| slot.snapshot()).collect()
    }

    /// Every client's status with its watcher id and, on a key with lanes, its node (the
    /// canary choice reads it).
    pub fn clients_by_id(&self) -> Vec<(u64, ClientStatus, Option<Arc<Node>>)> {
        let slots: Vec<(u64, Arc<ClientSlot>)> =
            lock(&self.clients).slots.iter().map(|(id, slot)| (*id, slot.clone())).collect();
        slots.iter().map(|(id, slot)| (*id, slot.snapshot(), slot.node())).collect()
    }

    pub(super) fn register(&self, id: u64, slot: Arc<ClientSlot>) {
        lock(&self.clients).add(id, slot);
        // A version waiting for a client that can be its canary may have one now.
        if let Some(lanes) = &self.lanes {
            lanes.wake_if_waiting_for_canaries();
        }
    }

    pub(super) fn unregister(&self, id: u64) {
        let departed_follower = lock(&self.clients).remove(id);
        // A canary or a follower leaving may leave the gate decidable, or no canary at all.
        if let Some(lanes) = &self.lanes {
            lanes.left(id, departed_follower);
        }
    }

    /// Replaces a watcher's interest `remove` with `add` in the union; returns `add` with
    /// the entry's shared names.
    ///
    /// # Errors
    /// [`LimitRefusal::NamesPerKey`] when the change would take the union past
    /// `limits.max_names_per_key` (a change that does not grow the union is never refused);
    /// the union is then unchanged.
    pub(super) fn change_interest(
        &self,
        remove: Option<&Interest>,
        add: Option<&Interest>,
    ) -> Result<Option<Interest>, LimitRefusal> {
        let mut counts = lock(&self.counts);
        if let Some(new) = add {
            // The upstream asks for each name once per distinct parameter set (xDS-TP2): that
            // is what the limit bounds, so clients inventing parameter sets cannot multiply it.
            let held = counts.names.len() * counts.params.len().max(1);
            let size =
                union_size_after(&counts.names, remove, new) * param_sets_after(&counts.params, remove, new).max(1);
            if size > self.max_names && size > held {
                return Err(LimitRefusal::NamesPerKey { key: self.key.clone(), names: size, limit: self.max_names });
            }
        }
        // Adding before removing keeps the shared names that both hold.
        let added = add.map(|new| counts.add(new));
        if let Some(old) = remove {
            counts.remove(old);
        }
        // The last watcher leaving keeps the union: the idle entry stays warm.
        if self.watchers.load(Ordering::Acquire) == 0 && add.is_none() {
            return Ok(added);
        }
        let union = counts.union();
        self.interest_tx.send_if_modified(|current| {
            if *current == union {
                false
            } else {
                *current = union;
                true
            }
        });
        Ok(added)
    }
}

/// Where a state applied to an entry comes from.
#[derive(Debug, Clone, Copy)]
enum Via<'a> {
    /// The key's own source on this node (the origin).
    Source,
    /// The key's owner node, as its stable state.
    OwnerStable,
    /// The key's owner node, as its candidate, with its verdict.
    OwnerCandidate(&'a OwnerVerdict),
}

/// For an entry under a rollout policy: hands each new stable state to the keeper, so only a
/// state every client may be served (never a candidate on trial) becomes last-known-good.
fn stable_hook(
    key: &str,
    type_url: &str,
    node: &Node,
    keeper: &Option<Arc<dyn Keeper>>,
) -> Option<super::lanes::StableHook> {
    let keeper = keeper.clone()?;
    let (key, type_url, node) = (key.to_owned(), type_url.to_owned(), node.clone());
    Some(Box::new(move |stable: &Arc<KeyState>| keeper.accepted(&key, &type_url, &node, stable)))
}
