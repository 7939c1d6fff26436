//! The cache: the latest state of every aggregation key, and who watches it.
//!
//! Each key has one [`Entry`]. Its state ([`KeyState`]) is the origin's latest answer, kept
//! per resource (name, content-hash version, encoded bytes) and as one encoded response body
//! shared by every stream. Watchers hold a [`Watcher`] and receive states through a
//! latest-wins `watch` channel: a slow stream skips intermediate versions and never blocks
//! the others or the upstream.
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

pub mod freshness;
#[cfg(test)]
mod lifecycle_model;
mod state;

pub use freshness::{Epochs, Freshness};
pub use state::{Heartbeat, KeyState, Meta, Rejection, Resource, SharedMessage, SotwMessage, error_name};

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{CacheConfig, Limits};
use crate::constraints::Params;
use crate::limit::LimitRefusal;
use crate::telemetry::traces::VersionTrace;
use crate::telemetry::{KeyMetrics, Metrics, ReasonLabels};
use crate::xdstp;

/// Locks a mutex, recovering the data if a panicking thread poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl Name ===

/// A resource name, shared: the watchers of a key and its upstream subscription hold one
/// allocation per name (the entry interns the names of every watcher's interest), so many
/// streams subscribed to the same names cost a pointer per name each.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Arc<String>);

impl Name {
    /// A new (not yet interned) name.
    pub fn new(name: impl Into<String>) -> Self {
        Self(Arc::new(name.into()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when both are the same allocation.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl std::ops::Deref for Name {
    type Target = String;

    fn deref(&self) -> &String {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Names ===

/// A sorted set of names, immutable and cheap to clone: clones share one allocation, so a
/// stream's subscription, its watcher and its admin status hold one copy between them.
#[derive(Clone, Default)]
pub struct Names(Option<Arc<[Name]>>);

impl Names {
    /// The set of `names`, which must be sorted and free of duplicates.
    pub fn from_sorted(names: Vec<Name>) -> Self {
        debug_assert!(names.windows(2).all(|w| w[0] < w[1]), "names are sorted and unique");
        if names.is_empty() { Self(None) } else { Self(Some(names.into())) }
    }

    /// The set of `names`, in any order and possibly repeated.
    pub fn from_names(names: impl IntoIterator<Item = Name>) -> Self {
        let mut names: Vec<Name> = names.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        Self::from_sorted(names)
    }

    /// The names, sorted.
    pub fn as_slice(&self) -> &[Name] {
        self.0.as_deref().unwrap_or_default()
    }

    /// The names, sorted.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator + Clone + '_ {
        self.as_slice().iter().map(|name| &**name)
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when there are no names.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// The shared name equal to `name`, if in the set.
    pub fn get(&self, name: &str) -> Option<&Name> {
        let names = self.as_slice();
        names.binary_search_by(|n| n.as_str().cmp(name)).ok().map(|i| &names[i])
    }

    /// True when `name` is in the set.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// True when every name of `self` is in `other`.
    pub fn is_subset(&self, other: &Names) -> bool {
        let mut theirs = other.as_slice().iter();
        self.as_slice().iter().all(|name| theirs.any(|n| n == name))
    }

    /// The names of `self` that are not in `other`, sorted.
    pub fn difference<'a>(&'a self, other: &'a Names) -> impl Iterator<Item = &'a String> + 'a {
        self.iter().filter(move |name| !other.contains(name))
    }

    /// True when both share one allocation (so they are equal without comparing names).
    fn same(&self, other: &Names) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl PartialEq for Names {
    fn eq(&self, other: &Self) -> bool {
        self.same(other) || self.as_slice() == other.as_slice()
    }
}

impl Eq for Names {}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl<S: Into<String>> FromIterator<S> for Names {
    fn from_iter<I: IntoIterator<Item = S>>(names: I) -> Self {
        Self::from_names(names.into_iter().map(Name::new))
    }
}

impl<'a> IntoIterator for &'a Names {
    type Item = &'a String;
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Name>, fn(&'a Name) -> &'a String>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter().map(|name| &name.0)
    }
}

// === impl Interest ===

/// Which resources a subscription wants: all of them (wildcard), and/or these names; and,
/// when resources come in xDS-TP2 variants, for which dynamic parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interest {
    /// Every resource of the type.
    pub wildcard: bool,
    /// Resources named explicitly.
    pub names: Names,
    /// The dynamic parameters variants are chosen by: one set for a client's subscription
    /// (none: the empty set); for a key's union, every distinct non-empty set of its
    /// watchers, sorted.
    pub params: Vec<Params>,
}

impl Interest {
    /// Interest in every resource.
    pub fn wildcard() -> Self {
        Self { wildcard: true, ..Self::default() }
    }

    /// Interest in these names.
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self { names: names.into_iter().collect(), ..Self::default() }
    }

    /// The same interest for a client with dynamic parameters `params` (an empty set is
    /// no parameters).
    pub fn with_params(mut self, params: Params) -> Self {
        self.params = if params.is_empty() { Vec::new() } else { vec![params] };
        self
    }

    /// The parameters a client's variants are chosen by (its only set, or the empty set).
    pub fn client_params(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.params.first().map_or(&EMPTY, |p| p)
    }

    /// True when nothing is wanted.
    pub fn is_empty(&self) -> bool {
        !self.wildcard && self.names.is_empty()
    }

    /// True when a response to `self` answers everything `other` wants: `self` is wildcard,
    /// or every name of `other` is one of `self` or a member of one of its glob collections.
    /// With dynamic parameters, every set of `other` must be one of `self`'s too.
    pub fn covers(&self, other: &Interest) -> bool {
        let names = self.wildcard
            || (!other.wildcard
                && (other.names.is_subset(&self.names) || other.names.iter().all(|name| self.wants(name))));
        names && other.params.iter().all(|p| self.params.contains(p))
    }

    /// True when the resource named `name` is wanted: by the wildcard, by name (`xdstp://`
    /// names compared by their canonical spelling, see [`crate::xdstp`]) or as a member of
    /// a glob collection of `self`.
    pub fn wants(&self, name: &str) -> bool {
        if self.wildcard || self.names.contains(name) {
            return true;
        }
        if !xdstp::is_xdstp(name) {
            return false;
        }
        let canonical = xdstp::canonical(name);
        (canonical != name && self.names.contains(&canonical))
            || xdstp::collection_of(&canonical).is_some_and(|glob| self.names.contains(&glob))
    }

    /// True when some of the names are TP1 glob collections (`xdstp://.../*`).
    pub fn has_globs(&self) -> bool {
        self.names.iter().any(|name| xdstp::is_glob(name))
    }
}

// === impl Entry ===

/// What the admin API shows about one downstream client of a key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientStatus {
    /// Set when the client is another relay node following this key: its node name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follower: Option<String>,
    /// The client's node id.
    pub node_id: String,
    /// The client's node cluster.
    pub node_cluster: String,
    /// The client's address.
    pub peer: String,
    /// The names it subscribed to (`*` for wildcard).
    pub resource_names: Vec<String>,
    /// The last version it ACKed.
    pub acked_version: String,
    /// The last version sent to it.
    pub sent_version: String,
    /// Number of NACKs it sent.
    pub nacks: u64,
    /// Its last NACK: the rejected version and the message.
    pub last_nack: Option<NackRecord>,
}

/// One NACK from a client.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NackRecord {
    /// The version that was rejected (the nonce's version).
    pub rejected_version: String,
    /// The client's error message.
    pub message: String,
    /// Seconds since the Unix epoch.
    pub at_unix: u64,
}

/// The upstream side of an entry, as the admin API shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UpstreamStatus {
    /// True while the origin answers the key's stream.
    pub connected: bool,
    /// The origin address in use.
    pub address: String,
    /// The last upstream error, if any.
    pub last_error: Option<String>,
    /// Responses received.
    pub responses: u64,
}

/// One watcher's client status: its identity, fixed at registration, and its progress,
/// written only by the watcher's own stream (so its lock is never contended on the send
/// path) and read by the admin API.
#[derive(Debug)]
struct ClientSlot {
    client: ClientInfo,
    progress: Mutex<Progress>,
}

/// What changes in a client's status while its stream runs.
#[derive(Debug, Default)]
struct Progress {
    /// The watcher's interest (shared with it, not a copy).
    interest: Interest,
    acked_version: String,
    sent_version: String,
    nacks: u64,
    last_nack: Option<NackRecord>,
}

impl ClientSlot {
    fn snapshot(&self) -> ClientStatus {
        let progress = lock(&self.progress);
        ClientStatus {
            follower: self.client.follower.clone(),
            node_id: self.client.node_id.clone(),
            node_cluster: self.client.node_cluster.clone(),
            peer: self.client.peer.clone(),
            resource_names: display_names(&progress.interest),
            acked_version: progress.acked_version.clone(),
            sent_version: progress.sent_version.clone(),
            nacks: progress.nacks,
            last_nack: progress.last_nack.clone(),
        }
    }
}

/// Replaces `slot` with `value`, reusing its buffer (no allocation once it is large enough).
fn set_string(slot: &mut String, value: &str) {
    if slot != value {
        slot.clear();
        slot.push_str(value);
    }
}

/// The watchers of an entry: their status slots, and the relay nodes among them.
#[derive(Default)]
struct Registry {
    slots: HashMap<u64, Arc<ClientSlot>>,
    /// Follower node name → number of its watchers.
    followers: BTreeMap<String, usize>,
}

/// Identity of a watcher inside its entry.
static NEXT_WATCHER_ID: AtomicU64 = AtomicU64::new(1);

/// How many watchers want each name (and wildcard); its keys are the entry's interned names.
#[derive(Default)]
struct InterestCounts {
    wildcard: usize,
    names: HashMap<Name, usize>,
    /// The names last added: a watcher adding the same set shares this allocation whole.
    last: Names,
    /// How many watchers have each set of dynamic parameters.
    params: BTreeMap<Params, usize>,
}

impl InterestCounts {
    /// Counts `interest` in, and returns it with the entry's shared names (the same
    /// allocation as `interest` when its names already are the shared ones).
    fn add(&mut self, interest: &Interest) -> Interest {
        self.wildcard += usize::from(interest.wildcard);
        if !self.last.is_empty() && self.last == interest.names {
            for name in self.last.as_slice() {
                *self.names.entry(name.clone()).or_default() += 1;
            }
            self.add_params(interest);
            return Interest { wildcard: interest.wildcard, names: self.last.clone(), params: interest.params.clone() };
        }
        let mut shared = true;
        let names: Vec<Name> = interest
            .names
            .as_slice()
            .iter()
            .map(|name| match self.names.entry(name.clone()) {
                Slot::Occupied(mut slot) => {
                    *slot.get_mut() += 1;
                    shared &= Name::ptr_eq(slot.key(), name);
                    slot.key().clone()
                }
                Slot::Vacant(slot) => {
                    slot.insert(1);
                    name.clone()
                }
            })
            .collect();
        self.add_params(interest);
        let interest = if shared {
            interest.clone()
        } else {
            Interest { wildcard: interest.wildcard, names: Names::from_sorted(names), params: interest.params.clone() }
        };
        self.last = interest.names.clone();
        interest
    }

    fn add_params(&mut self, interest: &Interest) {
        for params in &interest.params {
            *self.params.entry(params.clone()).or_default() += 1;
        }
    }

    fn remove(&mut self, interest: &Interest) {
        for params in &interest.params {
            if let Some(count) = self.params.get_mut(params) {
                *count -= 1;
                if *count == 0 {
                    self.params.remove(params);
                }
            }
        }
        self.wildcard -= usize::from(interest.wildcard);
        for name in interest.names.as_slice() {
            if let Some(count) = self.names.get_mut(name) {
                *count -= 1;
                if *count == 0 {
                    self.names.remove(name);
                }
            }
        }
    }

    fn union(&self) -> Interest {
        Interest {
            wildcard: self.wildcard > 0,
            names: Names::from_names(self.names.keys().cloned()),
            params: self.params.keys().cloned().collect(),
        }
    }
}

/// The key's source: the object that keeps it running, its label, and whether the entry has
/// left the cache (a retired entry takes no new source).
#[derive(Default)]
struct SourceSlot {
    source: Option<Box<dyn Send>>,
    label: String,
    retired: bool,
}

/// A pending refetch of a key through a new source; dropping it ends the refetch.
pub struct RefetchGuard(Arc<std::sync::atomic::AtomicBool>);

impl std::fmt::Debug for RefetchGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefetchGuard")
    }
}

impl Drop for RefetchGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A source refused because its entry has left the cache; it carries the refused source.
pub struct Retired(pub Box<dyn Send>);

impl std::fmt::Debug for Retired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Retired")
    }
}

/// The cache entry of one aggregation key.
pub struct Entry {
    /// The aggregation key.
    pub key: String,
    /// The key's resource type.
    pub type_url: String,
    /// The node sent upstream: the first client's node.
    pub node: Node,
    /// Metric handles of the key.
    pub metrics: KeyMetrics,
    /// When the entry was created.
    pub created_at: Instant,
    state: watch::Sender<Arc<KeyState>>,
    interest_tx: watch::Sender<Interest>,
    counts: Mutex<InterestCounts>,
    /// Number of watchers; changed only while `idle_since` is locked, and raised only while
    /// the cache's map is locked (so eviction, which decides under that lock, sees it).
    watchers: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
    last_used: AtomicU64,
    /// The cache's count of keys with at least one watcher (this entry counts while it has one).
    active: Arc<AtomicUsize>,
    /// Most names the union may hold (`limits.max_names_per_key`).
    max_names: usize,
    clients: Mutex<Registry>,
    upstream: Mutex<UpstreamStatus>,
    source: Mutex<SourceSlot>,
    /// True while a refetch through a new source (not the origin stream's refresh) is pending.
    refetching: Arc<std::sync::atomic::AtomicBool>,
    /// When the admin API last started a refetch of the key.
    last_refetch: Mutex<Option<Instant>>,
    /// Which origin stream delivered the state (for followers switching to this node).
    pub freshness: Freshness,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("key", &self.key).field("type_url", &self.type_url).finish_non_exhaustive()
    }
}

impl Entry {
    fn new(
        key: &str,
        type_url: &str,
        node: Node,
        metrics: KeyMetrics,
        active: Arc<AtomicUsize>,
        max_names: usize,
    ) -> Self {
        Self {
            key: key.to_owned(),
            type_url: type_url.to_owned(),
            node,
            metrics,
            created_at: Instant::now(),
            state: watch::Sender::new(Arc::new(KeyState::empty(type_url))),
            interest_tx: watch::Sender::new(Interest::default()),
            counts: Mutex::new(InterestCounts::default()),
            watchers: AtomicUsize::new(0),
            idle_since: Mutex::new(Some(Instant::now())),
            last_used: AtomicU64::new(0),
            active,
            max_names,
            clients: Mutex::new(Registry::default()),
            upstream: Mutex::new(UpstreamStatus::default()),
            source: Mutex::new(SourceSlot::default()),
            refetching: Arc::default(),
            last_refetch: Mutex::new(None),
            freshness: Freshness::default(),
        }
    }

    /// The current state.
    pub fn state(&self) -> Arc<KeyState> {
        self.state.borrow().clone()
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
        trace: impl FnOnce(&KeyState) -> VersionTrace,
    ) -> Result<bool, Rejection> {
        match first_on_stream {
            true => self.update(|state| state.apply_first(response, coverage), trace),
            false => self.update(|state| state.apply(response, coverage), trace),
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
        trace: impl FnOnce(&KeyState) -> VersionTrace,
    ) -> Result<bool, Rejection> {
        match first_on_stream {
            true => self.update(|state| state.apply_delta_first(response, coverage), trace),
            false => self.update(|state| state.apply_delta(response, coverage), trace),
        }
    }

    /// Applies `f` to the state; a new version gets the trace `trace` makes for it.
    fn update(
        &self,
        f: impl FnOnce(&KeyState) -> Result<Option<KeyState>, Rejection>,
        trace: impl FnOnce(&KeyState) -> VersionTrace,
    ) -> Result<bool, Rejection> {
        let mut result = Ok(false);
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
                    *state = Arc::new(next);
                    true
                }
                Ok(None) => false,
                Err(rejection) => {
                    result = Err(rejection);
                    false
                }
            }
        });
        result
    }

    /// Installs a new source named `label` and returns the previous one without stopping it,
    /// so the caller can stop it once the new source has delivered (make-before-break).
    ///
    /// # Errors
    /// [`Retired`] when the entry has left the cache: `source` is handed back and the caller
    /// must not run it (nothing could reach it or stop it).
    pub fn replace_source(&self, label: &str, source: Box<dyn Send>) -> Result<Option<Box<dyn Send>>, Retired> {
        let mut slot = lock(&self.source);
        if slot.retired {
            return Err(Retired(source));
        }
        label.clone_into(&mut slot.label);
        Ok(slot.source.replace(source))
    }

    /// Marks the entry as out of the cache and takes its source (the caller drops it, which
    /// stops it); later [`Entry::replace_source`] calls are refused. Called while the map is
    /// locked, in the same step that removes the entry.
    fn retire(&self) -> Option<Box<dyn Send>> {
        let mut slot = lock(&self.source);
        slot.retired = true;
        slot.label.clear();
        slot.source.take()
    }

    /// True once the entry has left the cache (evicted, cleared or shut down).
    pub fn is_retired(&self) -> bool {
        lock(&self.source).retired
    }

    /// What the key's state comes from: `origin`, `peer:<node>`, or empty when stopped.
    pub fn source_label(&self) -> String {
        lock(&self.source).label.clone()
    }

    /// Marks a refetch through a new source as pending, unless one already is (`None`: the
    /// caller joins it). The refetch ends when the returned guard drops: the new source holds
    /// it with the source it replaces and drops both once it has delivered (or stopped).
    pub fn begin_refetch(&self) -> Option<RefetchGuard> {
        self.refetching
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then(|| RefetchGuard(self.refetching.clone()))
    }

    /// True while a refetch through a new source is pending (see [`Entry::begin_refetch`]).
    pub fn is_refetching(&self) -> bool {
        self.refetching.load(Ordering::Acquire)
    }

    /// When the admin API last started a refetch of the key.
    pub fn last_refetch(&self) -> Option<Instant> {
        *lock(&self.last_refetch)
    }

    /// Records that the admin API started a refetch of the key now.
    pub fn note_refetch(&self) {
        *lock(&self.last_refetch) = Some(Instant::now());
    }

    /// Counts a new watcher in (and the key as active when it is the first); called while
    /// the cache's map is locked.
    fn add_watcher(&self, last_used: u64) {
        let mut idle_since = lock(&self.idle_since);
        if self.watchers.fetch_add(1, Ordering::AcqRel) == 0 {
            self.active.fetch_add(1, Ordering::AcqRel);
        }
        *idle_since = None;
        self.last_used.store(last_used, Ordering::Relaxed);
    }

    /// Counts a watcher out; the entry becomes idle when it was the last.
    fn remove_watcher(&self) {
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
    /// owner; they are dated so here ([`KeyState::replace_dated`]).
    pub fn apply_forwarded(
        &self,
        response: DiscoveryResponse,
        coverage: &Interest,
        do_not_cache_age: std::time::Duration,
        trace: impl FnOnce(&KeyState) -> VersionTrace,
    ) -> Result<bool, Rejection> {
        let arrived = Instant::now().checked_sub(do_not_cache_age).unwrap_or(self.created_at);
        self.update(|state| state.replace_dated(response, coverage, arrived), trace)
    }

    /// Marks whether the key's source answers, in the admin API's status and the
    /// `upstream_connected` gauge together (a source that answers clears the last error).
    pub fn set_connected(&self, connected: bool) {
        self.metrics.upstream_connected.set(i64::from(connected));
        self.update_upstream(|s| {
            s.connected = connected;
            if connected {
                s.last_error = None;
            }
        });
    }

    /// Updates the upstream status shown by the admin API.
    pub fn update_upstream(&self, f: impl FnOnce(&mut UpstreamStatus)) {
        f(&mut lock(&self.upstream));
    }

    /// The upstream status.
    pub fn upstream_status(&self) -> UpstreamStatus {
        lock(&self.upstream).clone()
    }

    /// Every client's status, as a snapshot (the registry lock is held only to copy the
    /// slot handles, never while a stream's slot is read).
    pub fn clients(&self) -> Vec<ClientStatus> {
        let slots: Vec<Arc<ClientSlot>> = lock(&self.clients).slots.values().cloned().collect();
        slots.iter().map(|slot| slot.snapshot()).collect()
    }

    fn register(&self, id: u64, slot: Arc<ClientSlot>) {
        let mut registry = lock(&self.clients);
        if let Some(follower) = &slot.client.follower {
            *registry.followers.entry(follower.clone()).or_default() += 1;
        }
        registry.slots.insert(id, slot);
    }

    fn unregister(&self, id: u64) {
        let mut registry = lock(&self.clients);
        let Some(slot) = registry.slots.remove(&id) else { return };
        if let Some(follower) = &slot.client.follower
            && let Some(count) = registry.followers.get_mut(follower)
        {
            *count -= 1;
            if *count == 0 {
                registry.followers.remove(follower);
            }
        }
    }

    /// Replaces a watcher's interest `remove` with `add` in the union; returns `add` with
    /// the entry's shared names.
    ///
    /// # Errors
    /// [`LimitRefusal::NamesPerKey`] when the change would take the union past
    /// `limits.max_names_per_key` (a change that does not grow the union is never refused);
    /// the union is then unchanged.
    fn change_interest(
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

/// How many names a union counted by `held` holds once one watcher's interest `remove` is
/// replaced with `add`.
fn union_size_after(held: &HashMap<Name, usize>, remove: Option<&Interest>, add: &Interest) -> usize {
    let joined = add.names.as_slice().iter().filter(|name| !held.contains_key(*name)).count();
    let left = remove.map_or(0, |old| {
        old.names.as_slice().iter().filter(|name| held.get(*name) == Some(&1) && !add.names.contains(name)).count()
    });
    held.len() + joined - left.min(held.len())
}

/// How many distinct parameter sets a union counted by `held` holds once one watcher's
/// interest `remove` is replaced with `add`.
fn param_sets_after(held: &BTreeMap<Params, usize>, remove: Option<&Interest>, add: &Interest) -> usize {
    let joined = add.params.iter().filter(|p| !held.contains_key(*p)).count();
    let left = remove
        .map_or(0, |old| old.params.iter().filter(|p| held.get(*p) == Some(&1) && !add.params.contains(p)).count());
    held.len() + joined - left.min(held.len())
}

// === impl Watcher ===

/// One downstream stream's interest in a key. Dropping it unregisters the stream.
pub struct Watcher {
    entry: Arc<Entry>,
    id: u64,
    interest: Interest,
    slot: Arc<ClientSlot>,
    /// When the watcher last asked for names it did not want before.
    since: Instant,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").field("key", &self.entry.key).field("id", &self.id).finish()
    }
}

impl Watcher {
    /// The watched entry.
    pub fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }

    /// A receiver of the key's states.
    pub fn receiver(&self) -> watch::Receiver<Arc<KeyState>> {
        self.entry.state.subscribe()
    }

    /// The names this watcher wants.
    pub fn interest(&self) -> &Interest {
        &self.interest
    }

    /// Changes the names this watcher wants; the upstream union follows. The watcher keeps
    /// them with the entry's shared names: read [`Watcher::interest`] back to share them too.
    ///
    /// # Errors
    /// [`LimitRefusal::NamesPerKey`] when the new names would take the key's union past
    /// `limits.max_names_per_key`; the watcher keeps its previous interest (and the key's
    /// other watchers theirs).
    pub fn set_interest(&mut self, interest: Interest) -> Result<(), LimitRefusal> {
        if interest == self.interest {
            return Ok(());
        }
        let interest = self.entry.change_interest(Some(&self.interest), Some(&interest))?.unwrap_or(interest);
        if !self.interest.covers(&interest) {
            self.since = Instant::now();
        }
        self.interest = interest.clone();
        self.with_status(|s| s.interest = interest);
        Ok(())
    }

    /// When the watcher last asked for names it did not want before: a `do_not_cache`
    /// resource that arrived earlier must not be served to it ([`KeyState::fresh_for`]).
    pub fn since(&self) -> Instant {
        self.since
    }

    /// True when `state` may be served to this watcher now (see [`KeyState::fresh_for`]).
    pub fn may_receive(&self, state: &KeyState) -> bool {
        state.fresh_for(&self.interest, self.since)
    }

    /// Records that `version` was sent to the client (touches only this watcher's slot).
    pub fn record_sent(&self, version: &str) {
        self.with_status(|s| set_string(&mut s.sent_version, version));
    }

    /// Records an ACK of `version` (touches only this watcher's slot).
    pub fn record_ack(&self, version: &str) {
        self.entry.metrics.acks.inc();
        self.with_status(|s| set_string(&mut s.acked_version, version));
    }

    /// Records a NACK of `rejected_version` with the client's message.
    pub fn record_nack(&self, rejected_version: &str, message: &str) {
        self.entry.metrics.nacks.inc();
        let at_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.with_status(|s| {
            s.nacks += 1;
            s.last_nack = Some(NackRecord {
                rejected_version: rejected_version.to_owned(),
                message: message.to_owned(),
                at_unix,
            });
        });
    }

    fn with_status(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.slot.progress));
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.entry.unregister(self.id);
        self.entry.remove_watcher();
        self.entry.metrics.clients.dec();
        // Removing names never exceeds a limit.
        let _ = self.entry.change_interest(Some(&self.interest), None);
    }
}

fn display_names(interest: &Interest) -> Vec<String> {
    let mut names: Vec<String> = interest.names.iter().cloned().collect();
    if interest.wildcard {
        names.insert(0, "*".to_owned());
    }
    names
}

/// Who is subscribing, for the admin API.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// The client's node id.
    pub node_id: String,
    /// The client's node cluster.
    pub node_cluster: String,
    /// The client's address.
    pub peer: String,
    /// Set when the client is another relay node following this key: its node name.
    pub follower: Option<String>,
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
    fn label(self) -> &'static str {
        match self {
            Self::Ttl => "ttl",
            Self::MaxEntries => "max_entries",
            Self::Cleared => "cleared",
            Self::Closed => "closed",
        }
    }
}

/// Every cache entry, by aggregation key.
pub struct Cache {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    config: CacheConfig,
    /// `max_active_keys` and `max_names_per_key` apply here.
    limits: Limits,
    /// Keys with at least one watcher; raised only under the map lock.
    active: Arc<AtomicUsize>,
    metrics: Metrics,
    clock: AtomicU64,
}

impl Cache {
    /// An empty cache with these settings and the default [`Limits`].
    pub fn new(config: CacheConfig, metrics: Metrics) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            config,
            limits: Limits::default(),
            active: Arc::default(),
            metrics,
            clock: AtomicU64::new(0),
        }
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
    pub fn get(&self, key: &str) -> Option<Arc<Entry>> {
        lock(&self.entries).get(key).cloned()
    }

    /// Every entry, sorted by key.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        let mut entries: Vec<Arc<Entry>> = lock(&self.entries).values().cloned().collect();
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
        start: impl FnOnce(&Arc<Entry>),
    ) -> Result<Watcher, CacheError> {
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
                None => {
                    let metrics = self.metrics.for_key(key, type_url);
                    (Arc::new(Entry::new(key, type_url, node.clone(), metrics, self.active.clone(), max_names)), true)
                }
            };
            let interest = entry.change_interest(None, Some(&interest))?.unwrap_or(interest);
            entry.add_watcher(self.clock.fetch_add(1, Ordering::Relaxed));
            let mut evicted = Vec::new();
            if created {
                entries.insert(key.to_owned(), entry.clone());
                evicted = self.enforce_max_entries(&mut entries);
                self.metrics.cache_entries.set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
            }
            (entry, created, evicted, interest)
        };
        for victim in evicted {
            self.finish_eviction(&victim, EvictionReason::MaxEntries);
        }
        let id = NEXT_WATCHER_ID.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(ClientSlot {
            client,
            progress: Mutex::new(Progress { interest: interest.clone(), ..Progress::default() }),
        });
        entry.register(id, slot.clone());
        entry.metrics.clients.inc();
        if created {
            start(&entry);
        }
        Ok(Watcher { entry, id, interest, slot, since: Instant::now() })
    }

    /// Removes (and retires) the idle entries beyond `max_entries`, least recently used
    /// first; entries with watchers are never removed, so the cache may exceed the limit
    /// while all are in use. Runs under the map lock.
    fn enforce_max_entries(&self, entries: &mut HashMap<String, Arc<Entry>>) -> Vec<Arc<Entry>> {
        let max = self.config.max_entries;
        if max == 0 || entries.len() <= max {
            return Vec::new();
        }
        let mut idle: Vec<Arc<Entry>> = entries.values().filter(|e| e.watcher_count() == 0).cloned().collect();
        idle.sort_by_key(|e| e.last_used.load(Ordering::Relaxed));
        let excess = entries.len() - max;
        let victims: Vec<Arc<Entry>> = idle.into_iter().take(excess).collect();
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
        let ttl = self.config.ttl;
        if ttl.is_zero() {
            return 0;
        }
        let now = Instant::now();
        let victims: Vec<Arc<Entry>> = {
            let mut entries = lock(&self.entries);
            let expired: Vec<String> = entries
                .values()
                .filter(|e| e.watcher_count() == 0 && e.idle_since().is_some_and(|t| now.duration_since(t) >= ttl))
                .map(|e| e.key.clone())
                .collect();
            let victims: Vec<Arc<Entry>> = expired.iter().filter_map(|k| entries.remove(k)).collect();
            for victim in &victims {
                self.retire(victim);
            }
            self.metrics.cache_entries.set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
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
            self.metrics.cache_entries.set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
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
            drop(victim.retire());
        }
    }

    /// The removal step that must happen under the map lock, with the removal itself: the
    /// entry takes no new source, its source stops, its metric series go (a new entry of the
    /// same key, created under the same lock, gets fresh series that this cannot remove).
    fn retire(&self, entry: &Entry) {
        drop(entry.retire());
        self.metrics.forget_key(&entry.key);
    }

    fn finish_eviction(&self, entry: &Arc<Entry>, reason: EvictionReason) {
        tracing::info!(key = %entry.key, reason = reason.label(), "cache entry evicted");
        self.metrics.cache_evictions.get_or_create(&ReasonLabels { reason: reason.label().to_owned() }).inc();
    }

    /// How often [`Cache::sweep`] should run.
    pub fn sweep_interval(&self) -> Duration {
        (self.config.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        Cache::new(CacheConfig { ttl, max_entries }, Metrics::new())
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
                    entry.replace_source("origin", CountedSource::start(&running, entry)).unwrap();
                })
                .unwrap()
        };
        let a = watch("a");
        let entry = a.entry().clone();
        assert_eq!(running.load(Ordering::SeqCst), 1);
        drop(a);
        // A new key over `max_entries` pushes the idle one out: its source stops with it.
        let b = watch("b");
        assert!(entry.is_retired() && cache.get("a").is_none());
        assert_eq!(running.load(Ordering::SeqCst), 1, "only b's source runs");
        // A late start for the evicted entry (a reconcile or a clear that looked it up just
        // before) is refused and its source never runs.
        let late = entry.replace_source("origin", CountedSource::start(&running, &entry));
        assert!(late.is_err());
        drop(late);
        assert_eq!(running.load(Ordering::SeqCst), 1);
        assert!(!b.entry().is_retired(), "an entry with a watcher is never evicted");
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
                            let _ = entry.replace_source("origin", CountedSource::start(&running, entry));
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
            assert!(!in_map.source_label().is_empty(), "watched key {key} has no running source");
        }
        let entries = cache.entries();
        let with_source = entries.iter().filter(|e| !e.source_label().is_empty()).count();
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
