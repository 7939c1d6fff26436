//! The cache: the latest state of every aggregation key, and who watches it.
//!
//! Each key has one [`Entry`]. Its state ([`KeyState`]) is the origin's latest answer, kept
//! per resource (name, content-hash version, encoded bytes) and as one encoded response body
//! shared by every stream. Watchers hold a [`Watcher`] and receive states through a
//! latest-wins `watch` channel: a slow stream skips intermediate versions and never blocks
//! the others or the upstream. On a key under a rollout policy, watchers follow the entry's
//! [`Lanes`] instead (a stable state, and a candidate for the canaries; see [`lanes`]); on
//! every other key they follow its state directly, at no extra cost.
//!
//! Invariants:
//! - a state's `serial` grows only when its version or content changes; a state identical to
//!   the previous one (an origin reconnect that resends the same version) wakes nobody;
//! - an entry with watchers is never evicted: `ttl` and `max_entries` only remove idle
//!   entries (no watchers), so eviction never disconnects a client;
//! - finding or inserting an entry and counting its new watcher happen in one step under the
//!   map lock, and eviction decides and retires an entry under that same lock: an entry is
//!   never evicted between its lookup and its watcher, so a watcher's entry is always in the
//!   map;
//! - a retired entry (evicted, cleared or shut down) has its source stopped and refuses a new
//!   one, so every running source belongs to an entry in the map;
//! - an entry seeded from disk ([`Cache::seed`]) holds a state no live source has confirmed:
//!   it is marked stale until one delivers, and its source starts with its first watcher;
//! - every state an entry accepts from a source goes to the cache's [`Keeper`] (if any) from
//!   one place, after the watchers were woken; eviction and clearing tell the keeper, a
//!   shutdown does not;
//! - the names asked upstream are the union of every watcher's names; when the last watcher
//!   leaves, the union is kept so the idle entry stays warm until it is evicted;
//! - limits (`limits.max_active_keys`, `limits.max_names_per_key`) are checked in the same
//!   step that would exceed them, under the lock that step takes: a key becomes active (its
//!   first watcher) only under the map lock, where the count of active keys is checked, and a
//!   union of names changes only under the entry's interest lock, where its size is checked;
//!   a refused watch or interest change leaves the cache as it was (no entry, no metric
//!   series, no name), and the union sent upstream never exceeds the limit;
//! - the send and ACK path of a stream takes no lock shared with other streams: each watcher
//!   keeps its client status in its own slot, which the admin API reads as a snapshot; the
//!   entry's registry of slots is locked only when a watcher comes or goes;
//! - a watcher's names are the entry's shared [`Name`]s (interned when the watcher comes or
//!   changes its interest), so N streams subscribed to the same names cost N pointers per
//!   name, not N copies; a watcher's interest, its stream's subscription and its admin
//!   status share one [`Names`] allocation.

mod entry;
mod hooks;
pub mod lanes;
#[cfg(test)]
mod lifecycle_model;
mod names;
mod state;
mod union;
mod watcher;

pub use entry::Entry;
use entry::FromCache;
pub use hooks::{Attachment, CacheHooks, Keeper, KeyHooks};
pub use lanes::{LaneSnapshot, Lanes, Served};
pub use names::{Interest, Name, Names};
pub use state::{Heartbeat, KeyState, Meta, Rejection, Resource, SharedMessage, SotwMessage, error_name};
pub use watcher::{ClientInfo, ClientStatus, NackRecord, StateReceiver, StateStream, Watcher};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use tokio::time::Instant;

use crate::config::{CacheConfig, Limits};
use crate::limit::LimitRefusal;

/// Locks a mutex, recovering the data if a panicking thread poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl Cache ===

/// Why a watch could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// The rules mapped requests of two types to one key.
    #[error(
        "aggregation key {key} already holds {existing} resources; a {requested} request mapped to it (make the rules put the request type into the key)"
    )]
    TypeConflict {
        /// The key.
        key: String,
        /// The type the key holds.
        existing: String,
        /// The type of the new request.
        requested: String,
    },
    /// The watch would exceed `limits.max_active_keys` or `limits.max_names_per_key`.
    #[error(transparent)]
    Limit(#[from] LimitRefusal),
}

/// Why a state read from disk could not seed an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    /// The key already has an entry (a client came first, or the key was seeded twice).
    #[error("key {key} is already in the cache")]
    Exists {
        /// The key.
        key: String,
    },
    /// The cache holds `cache.max_entries` entries.
    #[error("the cache is full (cache.max_entries {limit})")]
    Full {
        /// `cache.max_entries`.
        limit: usize,
    },
    /// The state is the state of a key before its first response.
    #[error("the state of key {key} is empty")]
    Empty {
        /// The key.
        key: String,
    },
    /// The state fails the checks of a forwarded state.
    #[error("the state of key {key} is not valid: {rejection}")]
    Rejected {
        /// The key.
        key: String,
        /// Why.
        rejection: Rejection,
    },
}

/// Why an entry left the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionReason {
    /// Idle longer than the TTL.
    Ttl,
    /// Pushed out by `max_entries`.
    MaxEntries,
    /// Cleared through the admin API.
    Cleared,
    /// A private pass-through key whose stream stopped watching it.
    Closed,
}

impl EvictionReason {
    /// The `reason` label of `cache_evictions_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ttl => "ttl",
            Self::MaxEntries => "max_entries",
            Self::Cleared => "cleared",
            Self::Closed => "closed",
        }
    }
}

/// Every cache entry, by aggregation key; `H` hears what the cache does (the node's metrics).
pub struct Cache<H: CacheHooks> {
    entries: Mutex<HashMap<String, Arc<Entry<H::Key>>>>,
    config: CacheConfig,
    /// `max_active_keys` and `max_names_per_key` apply here.
    limits: Limits,
    /// Keys with at least one watcher; raised only under the map lock.
    active: Arc<AtomicUsize>,
    hooks: H,
    clock: AtomicU64,
    /// Where accepted states are kept, handed to every entry.
    keeper: Option<Arc<dyn Keeper>>,
    /// Whether a rollout policy applies to a key (of a type): its entry then has lanes.
    staged: Option<StagedKeys>,
}

/// Decides whether a key (of a type) rolls out in stages.
pub type StagedKeys = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

impl<H: CacheHooks> Cache<H> {
    /// An empty cache with these settings and the default [`Limits`].
    pub fn new(config: CacheConfig, hooks: H) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            config,
            limits: Limits::default(),
            active: Arc::default(),
            hooks,
            clock: AtomicU64::new(0),
            keeper: None,
            staged: None,
        }
    }

    /// A new entry of `key`, with its metric handles and what it shares with the cache.
    fn create_entry(&self, key: &str, type_url: &str, node: Node) -> Entry<H::Key> {
        let from_cache = FromCache {
            active: self.active.clone(),
            max_names: self.limits.max_names_per_key,
            keeper: self.keeper.clone(),
            staged: self.staged.as_ref().is_some_and(|staged| staged(key, type_url)),
        };
        Entry::new(key, type_url, node, self.hooks.key_created(key, type_url), from_cache)
    }

    /// The cache with `keeper` hearing of every state its entries accept from a live source
    /// and of every entry evicted or cleared; set before the first watch.
    #[must_use]
    pub fn with_keeper(mut self, keeper: Arc<dyn Keeper>) -> Self {
        self.keeper = Some(keeper);
        self
    }

    /// Creates the entry of `key` with a state read from disk at start: `response` (a full
    /// state, as an owner forwards it) answering `coverage`, checked like a forwarded state
    /// ([`KeyState::replace`]). The entry has no watcher (it ages out by the TTL if none
    /// comes), is marked stale until a live source delivers, and its source starts with its
    /// first watcher.
    ///
    /// # Errors
    /// [`SeedError`] when the key is already cached, the cache is at `max_entries`, or the
    /// state is not valid; the cache is then unchanged.
    pub fn seed(
        &self,
        key: &str,
        type_url: &str,
        node: Node,
        response: DiscoveryResponse,
        coverage: &Interest,
    ) -> Result<Arc<Entry<H::Key>>, SeedError> {
        let rejected = |rejection| SeedError::Rejected { key: key.to_owned(), rejection };
        let state = KeyState::empty(type_url).replace(response, coverage).map_err(rejected)?;
        let Some(state) = state else {
            return Err(SeedError::Empty { key: key.to_owned() });
        };
        let mut entries = lock(&self.entries);
        if entries.contains_key(key) {
            return Err(SeedError::Exists { key: key.to_owned() });
        }
        let limit = self.config.max_entries;
        if limit != 0 && entries.len() >= limit {
            return Err(SeedError::Full { limit });
        }
        let entry = Arc::new(self.create_entry(key, type_url, node));
        entry.seed(state);
        entries.insert(key.to_owned(), entry.clone());
        self.hooks.entries(entries.len());
        Ok(entry)
    }

    /// The cache with entries of the keys `staged` accepts getting [`Lanes`] (a rollout
    /// policy applies to them); set before the first watch.
    #[must_use]
    pub fn with_staged_keys(mut self, staged: StagedKeys) -> Self {
        self.staged = Some(staged);
        self
    }

    /// The cache with `limits` (of which `max_active_keys` and `max_names_per_key` apply to
    /// the cache); set before the first watch.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Keys with at least one watcher (a client or a follower) now.
    pub fn active_keys(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// The entry of `key`.
    pub fn get(&self, key: &str) -> Option<Arc<Entry<H::Key>>> {
        lock(&self.entries).get(key).cloned()
    }

    /// Every entry, sorted by key.
    pub fn entries(&self) -> Vec<Arc<Entry<H::Key>>> {
        let mut entries: Vec<Arc<Entry<H::Key>>> = lock(&self.entries).values().cloned().collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        entries
    }

    /// Registers a watcher of `key` wanting `interest`. When the entry is new, `node` becomes
    /// the node sent upstream and `start` is called with the entry to start its source.
    ///
    /// # Errors
    /// [`CacheError::TypeConflict`] when the key holds another type;
    /// [`CacheError::Limit`] when the key has no watcher and `limits.max_active_keys` keys
    /// already have one ([`LimitRefusal::ActiveKeys`]), or when `interest` would take the
    /// key's union of names past `limits.max_names_per_key`. A refused watch changes nothing.
    pub fn watch(
        &self,
        key: &str,
        type_url: &str,
        node: &Node,
        client: ClientInfo,
        interest: Interest,
        start: impl FnOnce(&Arc<Entry<H::Key>>),
    ) -> Result<Watcher<H::Key>, CacheError> {
        // Finding or inserting the entry, counting the watcher in and evicting are one step
        // under the map lock: eviction decides under the same lock, so it never removes an
        // entry between its lookup and its first watcher, and the source is started only for
        // an entry that is in the map with a watcher (it cannot be evicted before the watcher
        // leaves).
        // The limits are checked in that same step: a key becomes active only here, under the
        // map lock (a concurrent last watcher leaving only lowers the count), and the union
        // of names is checked and changed under the entry's interest lock.
        let (entry, created, evicted, interest) = {
            let mut entries = lock(&self.entries);
            let existing = entries.get(key).cloned();
            if let Some(entry) = &existing
                && entry.type_url != type_url
            {
                return Err(CacheError::TypeConflict {
                    key: key.to_owned(),
                    existing: entry.type_url.clone(),
                    requested: type_url.to_owned(),
                });
            }
            let activating = existing.as_ref().is_none_or(|entry| entry.watcher_count() == 0);
            let max_active = self.limits.max_active_keys;
            if activating && self.active.load(Ordering::Acquire) >= max_active {
                return Err(LimitRefusal::ActiveKeys { key: key.to_owned(), limit: max_active }.into());
            }
            let max_names = self.limits.max_names_per_key;
            if existing.is_none() && interest.names.len() > max_names {
                let names = interest.names.len();
                return Err(LimitRefusal::NamesPerKey { key: key.to_owned(), names, limit: max_names }.into());
            }
            let (entry, created) = match existing {
                Some(entry) => (entry, false),
                None => (Arc::new(self.create_entry(key, type_url, node.clone())), true),
            };
            let interest = entry.change_interest(None, Some(&interest))?.unwrap_or(interest);
            entry.add_watcher(self.clock.fetch_add(1, Ordering::Relaxed));
            let mut evicted = Vec::new();
            if created {
                entries.insert(key.to_owned(), entry.clone());
                evicted = self.enforce_max_entries(&mut entries);
                self.hooks.entries(entries.len());
            }
            (entry, created, evicted, interest)
        };
        for victim in evicted {
            self.finish_eviction(&victim, EvictionReason::MaxEntries);
        }
        let watcher = Watcher::register(entry.clone(), client, node, interest);
        // A new entry, or one seeded from disk that had no watcher yet, starts its source.
        if created || entry.take_needs_source() {
            start(&entry);
        }
        Ok(watcher)
    }

    /// Removes (and retires) the idle entries beyond `max_entries`, least recently used
    /// first; entries with watchers are never removed, so the cache may exceed the limit
    /// while all are in use. Runs under the map lock.
    fn enforce_max_entries(&self, entries: &mut HashMap<String, Arc<Entry<H::Key>>>) -> Vec<Arc<Entry<H::Key>>> {
        let max = self.config.max_entries;
        if max == 0 || entries.len() <= max {
            return Vec::new();
        }
        let mut idle: Vec<Arc<Entry<H::Key>>> = entries.values().filter(|e| e.watcher_count() == 0).cloned().collect();
        idle.sort_by_key(|e| e.last_used.load(Ordering::Relaxed));
        let excess = entries.len() - max;
        let victims: Vec<Arc<Entry<H::Key>>> = idle.into_iter().take(excess).collect();
        for victim in &victims {
            entries.remove(&victim.key);
            self.retire(victim);
        }
        if entries.len() > max {
            tracing::warn!(
                entries = entries.len(),
                max_entries = max,
                "cache is over max_entries: every entry has clients"
            );
        }
        victims
    }

    /// Evicts idle entries whose idle time exceeds the TTL; returns how many.
    pub fn sweep(&self) -> usize {
        let ttl = *self.config.ttl;
        if ttl.is_zero() {
            return 0;
        }
        let now = Instant::now();
        let victims: Vec<Arc<Entry<H::Key>>> = {
            let mut entries = lock(&self.entries);
            let expired: Vec<String> = entries
                .values()
                .filter(|e| e.watcher_count() == 0 && e.idle_since().is_some_and(|t| now.duration_since(t) >= ttl))
                .map(|e| e.key.clone())
                .collect();
            let victims: Vec<Arc<Entry<H::Key>>> = expired.iter().filter_map(|k| entries.remove(k)).collect();
            for victim in &victims {
                self.retire(victim);
            }
            self.hooks.entries(entries.len());
            victims
        };
        for victim in &victims {
            self.finish_eviction(victim, EvictionReason::Ttl);
        }
        victims.len()
    }

    /// Removes `key` if it has no watchers. Returns `Some(true)` when removed, `Some(false)`
    /// when it has watchers (left in place), `None` when absent.
    pub fn remove_if_idle(&self, key: &str) -> Option<bool> {
        self.remove_idle(key, EvictionReason::Cleared)
    }

    /// Removes `key`, a private key whose stream stopped watching it, if it has no watchers
    /// (like [`Cache::remove_if_idle`], counted as evicted for reason `closed`).
    pub fn remove_released(&self, key: &str) -> Option<bool> {
        self.remove_idle(key, EvictionReason::Closed)
    }

    fn remove_idle(&self, key: &str, reason: EvictionReason) -> Option<bool> {
        let victim = {
            let mut entries = lock(&self.entries);
            let entry = entries.get(key)?;
            if entry.watcher_count() > 0 {
                return Some(false);
            }
            let victim = entries.remove(key);
            if let Some(victim) = &victim {
                self.retire(victim);
            }
            self.hooks.entries(entries.len());
            victim
        };
        if let Some(victim) = victim {
            self.finish_eviction(&victim, reason);
        }
        Some(true)
    }

    /// Removes every entry (shutdown), stopping their sources.
    pub fn clear_all(&self) {
        let mut entries = lock(&self.entries);
        for (_, victim) in entries.drain() {
            drop(victim.source.retire());
        }
    }

    /// The removal step that must happen under the map lock, with the removal itself: the
    /// entry takes no new source, its source stops, its metric series go (a new entry of the
    /// same key, created under the same lock, gets fresh series that this cannot remove).
    fn retire(&self, entry: &Entry<H::Key>) {
        drop(entry.source.retire());
        self.hooks.key_retired(&entry.key);
    }

    fn finish_eviction(&self, entry: &Arc<Entry<H::Key>>, reason: EvictionReason) {
        tracing::info!(key = %entry.key, reason = reason.label(), "cache entry evicted");
        self.hooks.evicted(reason.label());
        // A key read from disk that no live source confirmed yet keeps its record when it
        // ages out (clients may come back after the outage, or after another restart); an
        // operator's clear removes it.
        let unconfirmed = entry.source.is_stale() && matches!(reason, EvictionReason::Ttl | EvictionReason::MaxEntries);
        if let Some(keeper) = &self.keeper
            && reason != EvictionReason::Closed
            && !unconfirmed
        {
            keeper.removed(&entry.key);
        }
    }

    /// How often [`Cache::sweep`] should run.
    pub fn sweep_interval(&self) -> Duration {
        (*self.config.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{KeyMetrics, Metrics};

    type Entry = super::Entry<KeyMetrics>;
    type Watcher = super::Watcher<KeyMetrics>;
    type Cache = super::Cache<Metrics>;
    use crate::constraints::Params;
    use crate::xds;

    #[test]
    fn interest_coverage() {
        assert!(Interest::wildcard().covers(&Interest::names(["a"])));
        assert!(Interest::names(["a", "b"]).covers(&Interest::names(["a"])));
        assert!(!Interest::names(["a"]).covers(&Interest::names(["a", "b"])));
        assert!(!Interest::names(["a"]).covers(&Interest::wildcard()));
    }

    /// xDS-TP1: names match ignoring the order of context parameters, and a glob collection
    /// wants (and covers) its members: one more segment, same authority, type and parameters.
    #[test]
    fn xdstp_names_and_globs() {
        let glob = Interest::names(["xdstp://auth/T/fleet/*", "xdstp://auth/T/one?a=1&b=2"]);
        assert!(glob.wants("xdstp://auth/T/fleet/c1"));
        assert!(glob.wants("xdstp://auth/T/one?b=2&a=1"), "parameters in another order");
        assert!(!glob.wants("xdstp://auth/T/fleet/sub/c1"), "two more segments");
        assert!(!glob.wants("xdstp://other/T/fleet/c1"), "another authority");
        assert!(!glob.wants("xdstp://auth/U/fleet/c1"), "another type");
        assert!(!glob.wants("xdstp://auth/T/fleet/c1?a=1"), "other context parameters");
        assert!(!glob.wants("xdstp://auth/T/one?a=1"));
        assert!(!glob.wants("fleet/c1"));
        assert!(glob.covers(&Interest::names(["xdstp://auth/T/fleet/c2", "xdstp://auth/T/fleet/*"])));
        assert!(!glob.covers(&Interest::names(["xdstp://auth/T/fleet/c2", "c3"])));
        assert!(glob.has_globs() && !Interest::names(["xdstp://auth/T/x"]).has_globs());
        let with_params = Interest::names(["xdstp://auth/T/fleet/*?a=1&b=2"]);
        assert!(with_params.wants("xdstp://auth/T/fleet/c1?b=2&a=1"));
        assert!(!with_params.wants("xdstp://auth/T/fleet/c1"));
    }

    fn cache(ttl: Duration, max_entries: usize) -> Cache {
        Cache::new(CacheConfig { ttl: ttl.into(), max_entries, persist_dir: None }, Metrics::new())
    }

    #[tokio::test]
    async fn union_of_names_follows_watchers_and_stays_when_idle() {
        let cache = cache(Duration::ZERO, 0);
        let node = Node::default();
        let mut started = 0;
        let mut a = cache
            .watch("k", xds::ENDPOINT, &node, ClientInfo::default(), Interest::names(["a"]), |_| started += 1)
            .unwrap();
        let b = cache
            .watch("k", xds::ENDPOINT, &node, ClientInfo::default(), Interest::names(["b"]), |_| started += 1)
            .unwrap();
        assert_eq!(started, 1, "the source starts once per key");
        let entry = cache.get("k").unwrap();
        assert_eq!(*entry.interest().borrow(), Interest::names(["a", "b"]));
        a.set_interest(Interest::names(["a", "c"])).unwrap();
        assert_eq!(*entry.interest().borrow(), Interest::names(["a", "b", "c"]));
        drop(b);
        assert_eq!(*entry.interest().borrow(), Interest::names(["a", "c"]));
        drop(a);
        assert_eq!(*entry.interest().borrow(), Interest::names(["a", "c"]), "an idle entry keeps its union");
        assert_eq!(entry.watcher_count(), 0);
        assert!(
            cache.watch("k", xds::CLUSTER, &node, ClientInfo::default(), Interest::wildcard(), |_| {}).is_err(),
            "a key holds one type"
        );
    }

    /// `do_not_cache`: a watcher may be served a state only when its uncacheable resources
    /// arrived after the watcher asked for them: a new watcher, or one that adds names, waits
    /// for a fresh copy; narrowing the names does not make it wait.
    #[tokio::test(start_paused = true)]
    async fn watchers_that_ask_later_wait_for_a_fresh_copy_of_do_not_cache_resources() {
        use envoy_types::pb::envoy::service::discovery::v3::{
            DiscoveryResponse, Resource as Wrapper, resource::CacheControl,
        };
        use envoy_types::pb::google::protobuf::Any;
        use prost::Message as _;
        let cla = |name: &str, do_not_cache: bool| {
            let body = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment {
                cluster_name: name.into(),
                ..Default::default()
            };
            let body = Any { type_url: xds::ENDPOINT.into(), value: body.encode_to_vec() };
            let wrapper = Wrapper {
                name: name.into(),
                resource: Some(body),
                cache_control: Some(CacheControl { do_not_cache }),
                ..Default::default()
            };
            Any { type_url: crate::wire::RESOURCE_WRAPPER.into(), value: wrapper.encode_to_vec() }
        };
        let response = || DiscoveryResponse {
            type_url: xds::ENDPOINT.into(),
            version_info: "v1".into(),
            resources: vec![cla("secret", true), cla("plain", false)],
            ..Default::default()
        };
        let cache = cache(Duration::ZERO, 0);
        let node = Node::default();
        let both = Interest::names(["plain", "secret"]);
        let watch = |interest: Interest| {
            cache.watch("k", xds::ENDPOINT, &node, ClientInfo::default(), interest, |_| {}).unwrap()
        };
        let mut early = watch(Interest::names(["plain"]));
        tokio::time::advance(Duration::from_millis(10)).await;
        let entry = cache.get("k").unwrap();
        entry.apply_response(response(), &both, true, |_| Default::default()).unwrap();
        assert!(early.may_receive(&entry.state()), "asked before it arrived");
        tokio::time::advance(Duration::from_millis(10)).await;
        let late = watch(both.clone());
        assert!(!late.may_receive(&entry.state()), "a new watcher waits for a fresh copy");
        let plain_late = watch(Interest::names(["plain"]));
        assert!(plain_late.may_receive(&entry.state()), "cacheable resources come from cache");
        early.set_interest(both.clone()).unwrap();
        assert!(!early.may_receive(&entry.state()), "a watcher that adds the name waits too");

        tokio::time::advance(Duration::from_millis(10)).await;
        entry.apply_response(response(), &both, true, |_| Default::default()).unwrap();
        assert!(late.may_receive(&entry.state()) && early.may_receive(&entry.state()), "the fresh copy is for both");
        early.set_interest(Interest::names(["secret"])).unwrap();
        assert!(early.may_receive(&entry.state()), "fewer names: nothing new to wait for");
    }

    /// xDS-TP2: the union holds every distinct parameter set of the watchers, sorted, and
    /// follows them as they come, change and go.
    #[tokio::test]
    async fn the_union_holds_each_parameter_set_once() {
        let cache = cache(Duration::ZERO, 0);
        let node = Node::default();
        let set = |v: &str| -> Params { Arc::new([("env".to_owned(), v.to_owned())].into_iter().collect()) };
        let watch = |interest: Interest| {
            cache.watch("k", xds::CLUSTER, &node, ClientInfo::default(), interest, |_| {}).unwrap()
        };
        let mut prod = watch(Interest::names(["a"]).with_params(set("prod")));
        let prod_too = watch(Interest::names(["b"]).with_params(set("prod")));
        let plain = watch(Interest::names(["a"]));
        let entry = cache.get("k").unwrap();
        let params = || entry.interest().borrow().params.clone();
        assert_eq!(params(), [set("prod")], "one set, however many watchers hold it");
        prod.set_interest(Interest::names(["a"]).with_params(set("dev"))).unwrap();
        assert_eq!(params(), [set("dev"), set("prod")], "sorted");
        drop(prod_too);
        assert_eq!(params(), [set("dev")]);
        assert!(entry.interest().borrow().covers(&Interest::names(["a"]).with_params(set("dev"))));
        assert!(!entry.interest().borrow().covers(&Interest::names(["a"]).with_params(set("prod"))));
        drop(plain);
        assert!(Interest::names(["a"]).with_params(Arc::default()).params.is_empty(), "an empty set is none");
    }

    /// xDS-TP2 abuse: clients inventing parameter sets multiply what the upstream asks for
    /// (each name once per set); `max_names_per_key` bounds that product, and the key's other
    /// watchers keep theirs.
    #[tokio::test]
    async fn parameter_sets_count_against_max_names_per_key() {
        let cache = limited(10, 4);
        let node = Node::default();
        let set = |v: &str| -> Params { Arc::new([("env".to_owned(), v.to_owned())].into_iter().collect()) };
        let watch = |interest: Interest| cache.watch("k", xds::CLUSTER, &node, ClientInfo::default(), interest, |_| {});
        let _a = watch(Interest::names(["a", "b"]).with_params(set("one"))).unwrap();
        let _b = watch(Interest::names(["a", "b"]).with_params(set("two"))).unwrap();
        let refused = watch(Interest::names(["a"]).with_params(set("three"))).unwrap_err();
        assert!(
            matches!(refused, CacheError::Limit(LimitRefusal::NamesPerKey { names: 6, limit: 4, .. })),
            "{refused:?}"
        );
        let entry = cache.get("k").unwrap();
        assert_eq!(entry.interest().borrow().params, [set("one"), set("two")], "the others keep their sets");
        assert!(watch(Interest::names(["b"]).with_params(set("two"))).is_ok(), "a set already held costs nothing");
    }

    #[tokio::test]
    async fn client_status_lives_in_the_watcher_and_admin_reads_a_snapshot() {
        let cache = cache(Duration::ZERO, 0);
        let node = Node::default();
        let local = ClientInfo { node_id: "envoy-1".into(), ..ClientInfo::default() };
        let follower = |name: &str| ClientInfo { follower: Some(name.into()), ..ClientInfo::default() };
        let mut a = cache.watch("k", xds::CLUSTER, &node, local, Interest::wildcard(), |_| {}).unwrap();
        let f1 = cache.watch("k", xds::CLUSTER, &node, follower("relay-b"), Interest::wildcard(), |_| {}).unwrap();
        let f2 = cache.watch("k", xds::CLUSTER, &node, follower("relay-b"), Interest::wildcard(), |_| {}).unwrap();
        let f3 = cache.watch("k", xds::CLUSTER, &node, follower("relay-a"), Interest::wildcard(), |_| {}).unwrap();
        let entry = cache.get("k").unwrap();
        assert_eq!(entry.followers(), ["relay-a", "relay-b"]);
        assert_eq!(entry.local_clients(), 1);
        a.record_sent("v1");
        a.record_ack("v1");
        a.record_sent("v2");
        a.record_nack("v2", "bad cluster");
        a.set_interest(Interest::names(["x"])).unwrap();
        let status = entry.clients().into_iter().find(|c| c.node_id == "envoy-1").unwrap();
        assert_eq!((status.sent_version.as_str(), status.acked_version.as_str()), ("v2", "v1"));
        assert_eq!(status.nacks, 1);
        assert_eq!(status.last_nack.unwrap().message, "bad cluster");
        assert_eq!(status.resource_names, ["x"]);
        drop((f1, f3));
        assert_eq!(entry.followers(), ["relay-b"], "a follower stays while one of its watchers does");
        drop(f2);
        assert!(!entry.has_followers());
        drop(a);
        assert!(entry.clients().is_empty());
        assert_eq!(entry.local_clients(), 0);
    }

    #[tokio::test]
    async fn watchers_of_a_key_share_their_names() {
        let cache = cache(Duration::ZERO, 0);
        let node = Node::default();
        let watch = |interest: Interest| {
            cache.watch("k", xds::ENDPOINT, &node, ClientInfo::default(), interest, |_| {}).unwrap()
        };
        let shared = |a: &Watcher, b: &Watcher, name: &str| {
            Name::ptr_eq(a.interest().names.get(name).unwrap(), b.interest().names.get(name).unwrap())
        };
        let a = watch(Interest::names(["x", "y"]));
        let mut b = watch(Interest::names(["y", "z"]));
        assert!(shared(&a, &b, "y"));
        b.set_interest(Interest::names(["x", "z"])).unwrap();
        assert!(shared(&a, &b, "x"));
        assert_eq!(b.interest(), &Interest::names(["x", "z"]));
        let d = watch(Interest::names(["x", "z"]));
        assert_eq!(
            d.interest().names.as_slice().as_ptr(),
            b.interest().names.as_slice().as_ptr(),
            "the same names as the last watcher's share its set"
        );
        drop((b, d));
        let b = watch(Interest::names(["x", "z"]));
        assert_eq!(b.interest(), &Interest::names(["x", "z"]), "the last set, even when nobody holds it any more");
        let c = watch(a.interest().clone());
        assert_eq!(
            c.interest().names.as_slice().as_ptr(),
            a.interest().names.as_slice().as_ptr(),
            "an interest already shared is kept whole"
        );
        let union = cache.get("k").unwrap().interest().borrow().clone();
        assert_eq!(union, Interest::names(["x", "y", "z"]));
        assert!(Name::ptr_eq(union.names.get("z").unwrap(), b.interest().names.get("z").unwrap()));
        let status = cache.get("k").unwrap().clients();
        assert!(status.iter().any(|s| s.resource_names == ["x", "z"]), "admin reads the watcher's names");
    }

    fn limited(max_active_keys: usize, max_names_per_key: usize) -> Cache {
        let limits = Limits { max_active_keys, max_names_per_key, max_names_per_request: 1, ..Limits::default() };
        cache(Duration::ZERO, 0).with_limits(limits)
    }

    #[tokio::test]
    async fn a_key_over_max_active_keys_is_refused_and_open_keys_keep_working() {
        let cache = limited(2, 100);
        let node = Node::default();
        let watch =
            |key: &str| cache.watch(key, xds::CLUSTER, &node, ClientInfo::default(), Interest::wildcard(), |_| {});
        let a = watch("a").unwrap();
        let b = watch("b").unwrap();
        let refused = watch("c").unwrap_err();
        assert_eq!(refused, CacheError::Limit(LimitRefusal::ActiveKeys { key: "c".into(), limit: 2 }));
        assert!(cache.get("c").is_none(), "a refused key creates no entry");
        let a2 = watch("a").expect("a new watcher of an active key is served");
        assert_eq!(cache.active_keys(), 2);
        drop((a, a2));
        assert_eq!(cache.active_keys(), 1, "a key without watchers is not active (even while cached)");
        let c = watch("c").expect("room again");
        assert!(watch("a").is_err(), "an idle cached key becoming active again counts too");
        drop((b, c));
        assert_eq!(cache.active_keys(), 0);
    }

    #[tokio::test]
    async fn the_union_never_exceeds_max_names_per_key_and_the_client_over_it_is_refused() {
        let cache = limited(10, 3);
        let node = Node::default();
        let watch =
            |interest: Interest| cache.watch("k", xds::ENDPOINT, &node, ClientInfo::default(), interest, |_| {});
        assert!(matches!(
            watch(Interest::names(["a", "b", "c", "d"])),
            Err(CacheError::Limit(LimitRefusal::NamesPerKey { names: 4, limit: 3, .. }))
        ));
        assert!(cache.get("k").is_none());
        let mut first = watch(Interest::names(["a", "b"])).unwrap();
        let refused = watch(Interest::names(["c", "d"])).unwrap_err();
        assert!(matches!(refused, CacheError::Limit(LimitRefusal::NamesPerKey { names: 4, .. })), "{refused:?}");
        let entry = cache.get("k").unwrap();
        assert_eq!(entry.watcher_count(), 1, "the refused watcher is not counted");
        assert_eq!(*entry.interest().borrow(), Interest::names(["a", "b"]), "the first keeps its names upstream");
        let mut second = watch(Interest::names(["b", "c"])).unwrap();
        assert!(second.set_interest(Interest::names(["c", "d"])).is_err(), "a change past the limit is refused");
        assert_eq!(second.interest(), &Interest::names(["b", "c"]), "and the watcher keeps its interest");
        first.set_interest(Interest::names(["a"])).unwrap();
        second.set_interest(Interest::names(["c", "d"])).expect("a change that fits once another shrank");
        assert_eq!(*entry.interest().borrow(), Interest::names(["a", "c", "d"]));
        second.set_interest(Interest::wildcard()).expect("wildcard counts no names");
        assert_eq!(*entry.interest().borrow(), Interest { wildcard: true, ..Interest::names(["a"]) });
    }

    /// Threads racing to open keys and grow one key's union: the cache never holds more
    /// active keys or union names than its limits, whatever the interleaving.
    #[test]
    fn limits_hold_under_concurrent_watches() {
        const THREADS: usize = 6;
        let cache = Arc::new(limited(5, 20));
        let peak_names = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cache, peak_names) = (cache.clone(), peak_names.clone());
                std::thread::spawn(move || {
                    let node = Node::default();
                    for round in 0..2_000 {
                        let key = format!("k{}", (round * 3 + t) % 12);
                        let held = cache.watch(
                            &key,
                            xds::ENDPOINT,
                            &node,
                            ClientInfo::default(),
                            Interest::names(["x"]),
                            |_| {},
                        );
                        assert!(cache.active_keys() <= 5, "active keys over the limit");
                        let names: Vec<String> = (0..8).map(|i| format!("n{}", (round + t * 5 + i) % 40)).collect();
                        if let Ok(mut watcher) = held {
                            let _ = watcher.set_interest(Interest::names(names));
                            let union = watcher.entry().interest().borrow().names.len();
                            peak_names.fetch_max(union, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        assert!(peak_names.load(Ordering::Relaxed) <= 20, "a union went past max_names_per_key");
        assert_eq!(cache.active_keys(), 0);
    }

    #[test]
    fn names_are_a_sorted_set() {
        let names: Names = ["b", "a", "c", "a"].into_iter().collect();
        assert_eq!(names.iter().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(names.contains("b") && !names.contains("d"));
        let ac: Names = ["c", "a"].into_iter().collect();
        assert!(ac.is_subset(&names) && !names.is_subset(&ac));
        assert!(Names::default().is_subset(&ac));
        assert!(!["a", "d"].into_iter().collect::<Names>().is_subset(&names));
        assert_eq!(names.difference(&ac).collect::<Vec<_>>(), ["b"]);
        assert_eq!(ac, ["a", "c"].into_iter().collect::<Names>());
        assert_ne!(ac, names);
        assert_eq!(format!("{ac:?}"), r#"{"a", "c"}"#);
    }

    /// A source that counts itself while alive and, like a source task, holds its entry: a
    /// source left on an entry that is no longer in the map keeps itself alive (a leak).
    struct CountedSource(Arc<AtomicUsize>, #[allow(dead_code)] Arc<Entry>);

    impl CountedSource {
        fn start(running: &Arc<AtomicUsize>, entry: &Arc<Entry>) -> Box<dyn Send> {
            running.fetch_add(1, Ordering::SeqCst);
            Box::new(Self(running.clone(), entry.clone()))
        }
    }

    impl Drop for CountedSource {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_entry_stops_its_source_and_refuses_a_new_one() {
        let cache = cache(Duration::from_secs(1), 1);
        let node = Node::default();
        let running = Arc::new(AtomicUsize::new(0));
        let watch = |key: &str| {
            cache
                .watch(key, xds::CLUSTER, &node, ClientInfo::default(), Interest::wildcard(), |entry| {
                    entry.source.replace(crate::source::Source::Origin, CountedSource::start(&running, entry)).unwrap();
                })
                .unwrap()
        };
        let a = watch("a");
        let entry = a.entry().clone();
        assert_eq!(running.load(Ordering::SeqCst), 1);
        drop(a);
        // A new key over `max_entries` pushes the idle one out: its source stops with it.
        let b = watch("b");
        assert!(entry.source.is_retired() && cache.get("a").is_none());
        assert_eq!(running.load(Ordering::SeqCst), 1, "only b's source runs");
        // A late start for the evicted entry (a reconcile or a clear that looked it up just
        // before) is refused and its source never runs.
        let late = entry.source.replace(crate::source::Source::Origin, CountedSource::start(&running, &entry));
        assert!(late.is_err());
        drop(late);
        assert_eq!(running.load(Ordering::SeqCst), 1);
        assert!(!b.entry().source.is_retired(), "an entry with a watcher is never evicted");
        drop(b);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(cache.sweep(), 1);
        assert_eq!(running.load(Ordering::SeqCst), 0, "the TTL sweep stops the source too");
    }

    /// Many threads churn many keys through a cache with a tiny TTL and `max_entries`, while
    /// another thread sweeps and the admin clears: no source outlives its entry, and every
    /// watcher's entry is in the map with a running source.
    #[test]
    fn churn_leaves_no_orphan_source_and_no_watcher_outside_the_map() {
        const THREADS: usize = 6;
        const ROUNDS: usize = 20_000;
        const KEYS: usize = 60;
        let cache = Arc::new(cache(Duration::from_millis(1), 8));
        let running = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeper = {
            let (cache, stop) = (cache.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    cache.sweep();
                    i += 1;
                    let _ = cache.remove_if_idle(&format!("k{}", i % KEYS));
                }
            })
        };
        let churners: Vec<_> = (0..THREADS)
            .map(|t| {
                let (cache, running) = (cache.clone(), running.clone());
                std::thread::spawn(move || {
                    let node = Node::default();
                    let mut held: std::collections::VecDeque<Watcher> = Default::default();
                    for round in 0..ROUNDS {
                        let key = format!("k{}", (round * 7 + t * 13 + round / 3) % KEYS);
                        let start = |entry: &Arc<Entry>| {
                            // What the relay does: install the source unless the entry left the map.
                            let _ = entry
                                .source
                                .replace(crate::source::Source::Origin, CountedSource::start(&running, entry));
                        };
                        let watcher = cache
                            .watch(&key, xds::CLUSTER, &node, ClientInfo::default(), Interest::wildcard(), start)
                            .unwrap();
                        held.push_back(watcher);
                        if held.len() > 1 {
                            held.pop_front();
                        }
                    }
                    held
                })
            })
            .collect();
        let held: Vec<Watcher> = churners.into_iter().flat_map(|c| c.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        sweeper.join().unwrap();

        for watcher in &held {
            let key = &watcher.entry().key;
            let in_map = cache.get(key).unwrap_or_else(|| panic!("watched key {key} is not in the map"));
            assert!(Arc::ptr_eq(&in_map, watcher.entry()), "watcher of {key} holds an entry the map replaced");
            assert!(!in_map.source.label().is_empty(), "watched key {key} has no running source");
        }
        let entries = cache.entries();
        let with_source = entries.iter().filter(|e| !e.source.label().is_empty()).count();
        assert_eq!(running.load(Ordering::SeqCst), with_source, "every running source belongs to an entry in the map");
        let watched: usize = entries.iter().map(|e| e.watcher_count()).sum();
        assert_eq!(watched, held.len(), "every watcher is counted on an entry in the map");
        drop(held);
        std::thread::sleep(Duration::from_millis(5));
        cache.sweep();
        assert!(cache.entries().is_empty(), "idle entries expire");
        assert_eq!(running.load(Ordering::SeqCst), 0, "evicting an entry stops its source");
    }

    #[tokio::test(start_paused = true)]
    async fn only_idle_entries_expire_or_get_pushed_out() {
        let cache = cache(Duration::from_secs(10), 2);
        let node = Node::default();
        let watch = |key: &str| {
            cache.watch(key, xds::CLUSTER, &node, ClientInfo::default(), Interest::wildcard(), |_| {}).unwrap()
        };
        let a = watch("a");
        let b = watch("b");
        drop(b);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(cache.sweep(), 1, "idle b expires");
        assert!(cache.get("a").is_some(), "a has a watcher and stays");
        let c = watch("c");
        drop(c);
        let _d = watch("d");
        assert!(cache.get("c").is_none(), "the idle entry makes room");
        let _e = watch("e");
        assert_eq!(cache.entries().len(), 3, "entries with watchers are never evicted");
        drop(a);
        assert_eq!(cache.remove_if_idle("a"), Some(true));
        assert_eq!(cache.remove_if_idle("d"), Some(false));
        assert_eq!(cache.remove_if_idle("zz"), None);
    }
}
