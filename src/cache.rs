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
//! - the names asked upstream are the union of every watcher's names; when the last watcher
//!   leaves, the union is kept so the idle entry stays warm until it is evicted.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::Any;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::telemetry::{KeyMetrics, Metrics, ReasonLabels};
use crate::{wire, xds};

/// Locks a mutex, recovering the data if a panicking thread poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl Interest ===

/// Which resources a subscription wants: all of them (wildcard), and/or these names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interest {
    /// Every resource of the type.
    pub wildcard: bool,
    /// Resources named explicitly.
    pub names: BTreeSet<String>,
}

impl Interest {
    /// Interest in every resource.
    pub fn wildcard() -> Self {
        Self { wildcard: true, names: BTreeSet::new() }
    }

    /// Interest in these names.
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self { wildcard: false, names: names.into_iter().map(Into::into).collect() }
    }

    /// True when nothing is wanted.
    pub fn is_empty(&self) -> bool {
        !self.wildcard && self.names.is_empty()
    }

    /// True when a response to `self` answers everything `other` wants.
    pub fn covers(&self, other: &Interest) -> bool {
        self.wildcard || (!other.wildcard && other.names.is_subset(&self.names))
    }

    /// True when `name` is wanted.
    pub fn wants(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }
}

// === impl Resource ===

/// One cached resource: its name, its content-hash version and its encoded bytes.
#[derive(Debug)]
pub struct Resource {
    /// The resource's name, or `None` when its type has no known name field.
    pub name: Option<String>,
    /// Hex SHA-256 prefix of the encoded resource: equal on every relay and across restarts.
    pub version: String,
    /// The resource as a `resources` field of a `DiscoveryResponse`, ready to concatenate.
    pub field: Bytes,
    /// The resource.
    pub any: Any,
}

impl Resource {
    /// Builds a cached resource from the origin's `Any`.
    pub fn new(any: Any) -> Self {
        let digest = Sha256::new().chain_update(any.type_url.as_bytes()).chain_update(&any.value).finalize();
        let version = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Self { name: wire::resource_name(&any), version, field: wire::encode_resource_field(&any), any }
    }
}

// === impl KeyState ===

/// Why the relay refused an origin response (the upstream NACKs it and keeps the cache).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The response's type URL is not the key's.
    #[error("response type {got} does not match the subscribed type {expected}")]
    TypeMismatch {
        /// The key's type.
        expected: String,
        /// The response's type.
        got: String,
    },
    /// A resource is packed with another type than the response's.
    #[error("resource {index} has type {got}, expected {expected}")]
    ResourceType {
        /// Position in the response.
        index: usize,
        /// The response's type.
        expected: String,
        /// The resource's type.
        got: String,
    },
    /// The same name appears twice.
    #[error("resource name {0} appears more than once")]
    DuplicateName(String),
}

/// One version of a key's state, shared by every watcher.
#[derive(Debug)]
pub struct KeyState {
    /// Grows by one each time the version or the content changes; never reused for a key.
    pub serial: u64,
    /// False until the origin has answered (and again after the state is cleared).
    pub ready: bool,
    /// The origin's `version_info`.
    pub version_info: String,
    /// The key's type URL.
    pub type_url: String,
    /// Resources in the origin's order; names are unique.
    pub resources: Vec<Arc<Resource>>,
    /// True when some resource has no known name: every watcher then gets every resource.
    pub opaque: bool,
    /// What the upstream subscription asked for when this state arrived.
    pub coverage: Interest,
    /// The origin's control-plane identifier.
    pub control_plane: Option<ControlPlane>,
    /// The origin's canary flag.
    pub canary: bool,
    /// When the relay received this version from the origin.
    pub received_at: Instant,
    /// Wall-clock time of the same moment, for display.
    pub received_wall: SystemTime,
    header: Bytes,
    full_body: Bytes,
    index: HashMap<String, usize>,
}

impl KeyState {
    /// The state of a key before its first response.
    pub fn empty(type_url: &str) -> Self {
        Self {
            serial: 0,
            ready: false,
            version_info: String::new(),
            type_url: type_url.to_owned(),
            resources: Vec::new(),
            opaque: false,
            coverage: Interest::default(),
            control_plane: None,
            canary: false,
            received_at: Instant::now(),
            received_wall: SystemTime::now(),
            header: Bytes::new(),
            full_body: Bytes::new(),
            index: HashMap::new(),
        }
    }

    /// True once the origin has answered.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The resource named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.index.get(name).map(|&i| &self.resources[i])
    }

    /// Total encoded size of the resources.
    pub fn resource_bytes(&self) -> usize {
        self.resources.iter().map(|r| r.field.len()).sum()
    }

    /// The resources `interest` selects, in the origin's order.
    pub fn select<'a>(&'a self, interest: &'a Interest) -> impl Iterator<Item = &'a Arc<Resource>> + 'a {
        let all = self.opaque || interest.wildcard;
        let by_name: Box<dyn Iterator<Item = &'a Arc<Resource>>> = if all {
            Box::new(self.resources.iter())
        } else if interest.names.len() * 4 < self.resources.len() {
            let mut picked: Vec<usize> = interest.names.iter().filter_map(|n| self.index.get(n).copied()).collect();
            picked.sort_unstable();
            Box::new(picked.into_iter().map(move |i| &self.resources[i]))
        } else {
            Box::new(self.resources.iter().filter(move |r| r.name.as_deref().is_some_and(|n| interest.wants(n))))
        };
        by_name
    }

    /// The encoded response body (without nonce) carrying what `interest` selects, and the
    /// number of resources in it.
    pub fn body_for(&self, interest: &Interest) -> (Bytes, usize) {
        if self.opaque || interest.wildcard {
            return (self.full_body.clone(), self.resources.len());
        }
        let picked: Vec<&Arc<Resource>> = self.select(interest).collect();
        let count = picked.len();
        (wire::concat(&self.header, picked.into_iter().map(|r| &r.field)), count)
    }

    /// Computes the state that follows `self` after an origin response answering a
    /// subscription to `coverage`. Returns `Ok(None)` when nothing changed.
    ///
    /// LDS and CDS responses (and opaque types) replace the state; other types merge into
    /// it (state-of-the-world servers may send only what changed), then drop the names the
    /// subscription no longer asks for.
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; `self` stays valid.
    pub fn apply(&self, response: DiscoveryResponse, coverage: &Interest) -> Result<Option<KeyState>, Rejection> {
        if response.type_url != self.type_url {
            return Err(Rejection::TypeMismatch { expected: self.type_url.clone(), got: response.type_url });
        }
        let known = xds::is_known(&self.type_url);
        let mut incoming = Vec::with_capacity(response.resources.len());
        let mut seen = BTreeSet::new();
        for (index, any) in response.resources.into_iter().enumerate() {
            if known && any.type_url != self.type_url && any.type_url != wire::RESOURCE_WRAPPER {
                return Err(Rejection::ResourceType { index, expected: self.type_url.clone(), got: any.type_url });
            }
            let resource = Resource::new(any);
            if let Some(name) = &resource.name
                && !seen.insert(name.clone())
            {
                return Err(Rejection::DuplicateName(name.clone()));
            }
            incoming.push(Arc::new(resource));
        }
        let opaque = incoming.iter().any(|r| r.name.is_none());
        let replace = opaque || self.opaque || xds::is_full_state(&self.type_url) || !self.is_ready();
        let resources: Vec<Arc<Resource>> = if replace {
            incoming
        } else {
            let mut merged: Vec<Arc<Resource>> = self
                .resources
                .iter()
                .filter(|r| r.name.as_deref().is_some_and(|n| !seen.contains(n) && coverage.wants(n)))
                .cloned()
                .collect();
            merged.extend(incoming);
            merged
        };
        let unchanged = self.is_ready()
            && self.version_info == response.version_info
            && self.resources.len() == resources.len()
            && self.resources.iter().zip(&resources).all(|(a, b)| a.version == b.version);
        if unchanged {
            if self.coverage == *coverage {
                return Ok(None);
            }
            return Ok(Some(self.with_coverage(coverage.clone())));
        }
        Ok(Some(KeyState::build(
            self.serial + 1,
            response.version_info,
            self.type_url.clone(),
            resources,
            coverage.clone(),
            response.control_plane,
            response.canary,
        )))
    }

    fn build(
        serial: u64,
        version_info: String,
        type_url: String,
        resources: Vec<Arc<Resource>>,
        coverage: Interest,
        control_plane: Option<ControlPlane>,
        canary: bool,
    ) -> Self {
        let header = wire::encode_header(&version_info, &type_url, canary, control_plane.as_ref());
        let full_body = wire::concat(&header, resources.iter().map(|r| &r.field));
        let index = resources.iter().enumerate().filter_map(|(i, r)| r.name.clone().map(|n| (n, i))).collect();
        let opaque = resources.iter().any(|r| r.name.is_none());
        Self {
            serial,
            ready: true,
            version_info,
            type_url,
            resources,
            opaque,
            coverage,
            control_plane,
            canary,
            received_at: Instant::now(),
            received_wall: SystemTime::now(),
            header,
            full_body,
            index,
        }
    }

    fn with_coverage(&self, coverage: Interest) -> Self {
        Self {
            serial: self.serial,
            ready: self.ready,
            version_info: self.version_info.clone(),
            type_url: self.type_url.clone(),
            resources: self.resources.clone(),
            opaque: self.opaque,
            coverage,
            control_plane: self.control_plane.clone(),
            canary: self.canary,
            received_at: self.received_at,
            received_wall: self.received_wall,
            header: self.header.clone(),
            full_body: self.full_body.clone(),
            index: self.index.clone(),
        }
    }
}

// === impl Entry ===

/// What the admin API shows about one downstream client of a key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientStatus {
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

/// Identity of a watcher inside its entry.
static NEXT_WATCHER_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Default)]
struct InterestCounts {
    wildcard: usize,
    names: HashMap<String, usize>,
}

impl InterestCounts {
    fn add(&mut self, interest: &Interest) {
        self.wildcard += usize::from(interest.wildcard);
        for name in &interest.names {
            *self.names.entry(name.clone()).or_default() += 1;
        }
    }

    fn remove(&mut self, interest: &Interest) {
        self.wildcard -= usize::from(interest.wildcard);
        for name in &interest.names {
            if let Some(count) = self.names.get_mut(name) {
                *count -= 1;
                if *count == 0 {
                    self.names.remove(name);
                }
            }
        }
    }

    fn union(&self) -> Interest {
        Interest { wildcard: self.wildcard > 0, names: self.names.keys().cloned().collect() }
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
    watchers: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
    last_used: AtomicU64,
    clients: Mutex<HashMap<u64, ClientStatus>>,
    upstream: Mutex<UpstreamStatus>,
    source: Mutex<Option<Box<dyn Send>>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("key", &self.key).field("type_url", &self.type_url).finish_non_exhaustive()
    }
}

impl Entry {
    fn new(key: &str, type_url: &str, node: Node, metrics: KeyMetrics) -> Self {
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
            clients: Mutex::new(HashMap::new()),
            upstream: Mutex::new(UpstreamStatus::default()),
            source: Mutex::new(None),
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

    /// Applies an origin response answering `coverage`, waking watchers when it changed
    /// something. Returns whether the state changed.
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; the cached state is kept.
    pub fn apply_response(&self, response: DiscoveryResponse, coverage: &Interest) -> Result<bool, Rejection> {
        let mut result = Ok(false);
        self.state.send_if_modified(|state| match state.apply(response, coverage) {
            Ok(Some(next)) => {
                result = Ok(next.serial != state.serial);
                *state = Arc::new(next);
                true
            }
            Ok(None) => false,
            Err(rejection) => {
                result = Err(rejection);
                false
            }
        });
        result
    }

    /// Drops the cached state (watchers keep what they have and get the next version).
    pub fn reset_state(&self) {
        let mut empty = KeyState::empty(&self.type_url);
        // Serials keep growing so watchers never mistake the next state for one they sent.
        empty.serial = self.state.borrow().serial;
        self.state.send_replace(Arc::new(empty));
    }

    /// Replaces the object that keeps the key's source alive (dropping the old one stops it).
    pub fn set_source(&self, source: Option<Box<dyn Send>>) {
        let old = std::mem::replace(&mut *lock(&self.source), source);
        drop(old);
    }

    /// Updates the upstream status shown by the admin API.
    pub fn update_upstream(&self, f: impl FnOnce(&mut UpstreamStatus)) {
        f(&mut lock(&self.upstream));
    }

    /// The upstream status.
    pub fn upstream_status(&self) -> UpstreamStatus {
        lock(&self.upstream).clone()
    }

    /// Every client's status.
    pub fn clients(&self) -> Vec<ClientStatus> {
        lock(&self.clients).values().cloned().collect()
    }

    fn change_interest(&self, remove: Option<&Interest>, add: Option<&Interest>) {
        let mut counts = lock(&self.counts);
        if let Some(old) = remove {
            counts.remove(old);
        }
        if let Some(new) = add {
            counts.add(new);
        }
        // The last watcher leaving keeps the union: the idle entry stays warm.
        if self.watchers.load(Ordering::Acquire) == 0 && add.is_none() {
            return;
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
    }
}

// === impl Watcher ===

/// One downstream stream's interest in a key. Dropping it unregisters the stream.
pub struct Watcher {
    entry: Arc<Entry>,
    id: u64,
    interest: Interest,
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

    /// Changes the names this watcher wants; the upstream union follows.
    pub fn set_interest(&mut self, interest: Interest) {
        if interest == self.interest {
            return;
        }
        self.entry.change_interest(Some(&self.interest), Some(&interest));
        let names = display_names(&interest);
        self.interest = interest;
        self.with_status(|s| s.resource_names = names);
    }

    /// Records that `version` was sent to the client.
    pub fn record_sent(&self, version: &str) {
        self.with_status(|s| {
            if s.sent_version != version {
                s.sent_version = version.to_owned();
            }
        });
    }

    /// Records an ACK of `version`.
    pub fn record_ack(&self, version: &str) {
        self.entry.metrics.acks.inc();
        self.with_status(|s| {
            if s.acked_version != version {
                s.acked_version = version.to_owned();
            }
        });
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

    fn with_status(&self, f: impl FnOnce(&mut ClientStatus)) {
        if let Some(status) = lock(&self.entry.clients).get_mut(&self.id) {
            f(status);
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        lock(&self.entry.clients).remove(&self.id);
        let left = self.entry.watchers.fetch_sub(1, Ordering::AcqRel) - 1;
        self.entry.metrics.clients.dec();
        if left == 0 {
            *lock(&self.entry.idle_since) = Some(Instant::now());
        }
        self.entry.change_interest(Some(&self.interest), None);
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
}

impl EvictionReason {
    fn label(self) -> &'static str {
        match self {
            Self::Ttl => "ttl",
            Self::MaxEntries => "max_entries",
            Self::Cleared => "cleared",
        }
    }
}

/// Every cache entry, by aggregation key.
pub struct Cache {
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    config: CacheConfig,
    metrics: Metrics,
    clock: AtomicU64,
}

impl Cache {
    /// An empty cache with these limits.
    pub fn new(config: CacheConfig, metrics: Metrics) -> Self {
        Self { entries: Mutex::new(HashMap::new()), config, metrics, clock: AtomicU64::new(0) }
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
    /// [`CacheError::TypeConflict`] when the key holds another type.
    pub fn watch(
        &self,
        key: &str,
        type_url: &str,
        node: &Node,
        client: ClientInfo,
        interest: Interest,
        start: impl FnOnce(&Arc<Entry>),
    ) -> Result<Watcher, CacheError> {
        let (entry, created) = {
            let mut entries = lock(&self.entries);
            match entries.get(key) {
                Some(entry) => (entry.clone(), false),
                None => {
                    let entry = Arc::new(Entry::new(key, type_url, node.clone(), self.metrics.for_key(key)));
                    entries.insert(key.to_owned(), entry.clone());
                    let evicted = self.enforce_max_entries(&mut entries, key);
                    self.metrics.cache_entries.set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
                    drop(entries);
                    for victim in evicted {
                        self.finish_eviction(&victim, EvictionReason::MaxEntries);
                    }
                    (entry, true)
                }
            }
        };
        if entry.type_url != type_url {
            return Err(CacheError::TypeConflict {
                key: key.to_owned(),
                existing: entry.type_url.clone(),
                requested: type_url.to_owned(),
            });
        }
        entry.last_used.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        let id = NEXT_WATCHER_ID.fetch_add(1, Ordering::Relaxed);
        lock(&entry.clients).insert(
            id,
            ClientStatus {
                node_id: client.node_id,
                node_cluster: client.node_cluster,
                peer: client.peer,
                resource_names: display_names(&interest),
                acked_version: String::new(),
                sent_version: String::new(),
                nacks: 0,
                last_nack: None,
            },
        );
        entry.watchers.fetch_add(1, Ordering::AcqRel);
        entry.metrics.clients.inc();
        *lock(&entry.idle_since) = None;
        entry.change_interest(None, Some(&interest));
        if created {
            start(&entry);
        }
        Ok(Watcher { entry, id, interest })
    }

    /// Removes the idle entries beyond `max_entries`, least recently used first; entries with
    /// watchers are never removed, so the cache may exceed the limit while all are in use.
    fn enforce_max_entries(&self, entries: &mut HashMap<String, Arc<Entry>>, newcomer: &str) -> Vec<Arc<Entry>> {
        let max = self.config.max_entries;
        if max == 0 || entries.len() <= max {
            return Vec::new();
        }
        let mut idle: Vec<Arc<Entry>> =
            entries.values().filter(|e| e.watcher_count() == 0 && e.key != newcomer).cloned().collect();
        idle.sort_by_key(|e| e.last_used.load(Ordering::Relaxed));
        let excess = entries.len() - max;
        let victims: Vec<Arc<Entry>> = idle.into_iter().take(excess).collect();
        for victim in &victims {
            entries.remove(&victim.key);
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
            let victims = expired.iter().filter_map(|k| entries.remove(k)).collect();
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
        let victim = {
            let mut entries = lock(&self.entries);
            let entry = entries.get(key)?;
            if entry.watcher_count() > 0 {
                return Some(false);
            }
            let victim = entries.remove(key);
            self.metrics.cache_entries.set(i64::try_from(entries.len()).unwrap_or(i64::MAX));
            victim
        };
        if let Some(victim) = victim {
            self.finish_eviction(&victim, EvictionReason::Cleared);
        }
        Some(true)
    }

    /// Removes every entry (shutdown), stopping their sources.
    pub fn clear_all(&self) {
        let victims: Vec<Arc<Entry>> = lock(&self.entries).drain().map(|(_, e)| e).collect();
        for victim in victims {
            victim.set_source(None);
        }
    }

    fn finish_eviction(&self, entry: &Arc<Entry>, reason: EvictionReason) {
        tracing::info!(key = %entry.key, reason = reason.label(), "cache entry evicted");
        entry.set_source(None);
        self.metrics.forget_key(&entry.key);
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
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use prost::{Message, Name};

    fn cluster(name: &str, timeout_ms: u32) -> Any {
        let c = Cluster {
            name: name.into(),
            per_connection_buffer_limit_bytes: Some(UInt32Value { value: timeout_ms }),
            ..Default::default()
        };
        Any { type_url: Cluster::type_url(), value: c.encode_to_vec() }
    }

    fn cla(name: &str, weight: u32) -> Any {
        let c = ClusterLoadAssignment {
            cluster_name: name.into(),
            policy: None,
            endpoints: vec![envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints {
                load_balancing_weight: Some(UInt32Value { value: weight }),
                ..Default::default()
            }],
            ..Default::default()
        };
        Any { type_url: ClusterLoadAssignment::type_url(), value: c.encode_to_vec() }
    }

    fn response(type_url: &str, version: &str, resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse { type_url: type_url.into(), version_info: version.into(), resources, ..Default::default() }
    }

    fn names(state: &KeyState) -> Vec<String> {
        state.resources.iter().map(|r| r.name.clone().unwrap_or_default()).collect()
    }

    #[test]
    fn identical_response_changes_nothing() {
        let s0 = KeyState::empty(xds::CLUSTER);
        let all = Interest::wildcard();
        let s1 = s0.apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1)]), &all).unwrap().unwrap();
        assert_eq!(s1.serial, 1);
        assert!(s1.apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1)]), &all).unwrap().is_none());
        let s2 = s1.apply(response(xds::CLUSTER, "v2", vec![cluster("a", 1)]), &all).unwrap().unwrap();
        assert_eq!(s2.serial, 2, "a new version is a change even with the same content");
        let s3 = s2.apply(response(xds::CLUSTER, "v2", vec![cluster("a", 2)]), &all).unwrap().unwrap();
        assert_eq!(s3.serial, 3, "new content is a change even with the same version");
    }

    #[test]
    fn full_state_types_replace_and_others_merge() {
        let all = Interest::wildcard();
        let cds = KeyState::empty(xds::CLUSTER)
            .apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1), cluster("b", 1)]), &all)
            .unwrap()
            .unwrap();
        let cds = cds.apply(response(xds::CLUSTER, "v2", vec![cluster("b", 1)]), &all).unwrap().unwrap();
        assert_eq!(names(&cds), ["b"]);

        let ab = Interest::names(["a", "b"]);
        let eds = KeyState::empty(xds::ENDPOINT)
            .apply(response(xds::ENDPOINT, "v1", vec![cla("a", 1), cla("b", 1)]), &ab)
            .unwrap()
            .unwrap();
        let eds = eds.apply(response(xds::ENDPOINT, "v2", vec![cla("b", 2)]), &ab).unwrap().unwrap();
        assert_eq!(names(&eds), ["a", "b"]);
        assert_ne!(eds.get("b").unwrap().version, eds.get("a").unwrap().version);
        let only_b = Interest::names(["b"]);
        let eds = eds.apply(response(xds::ENDPOINT, "v3", vec![cla("b", 3)]), &only_b).unwrap().unwrap();
        assert_eq!(names(&eds), ["b"], "names no longer subscribed are dropped");
    }

    #[test]
    fn malformed_responses_are_rejected() {
        let s0 = KeyState::empty(xds::CLUSTER);
        let all = Interest::wildcard();
        assert!(matches!(s0.apply(response(xds::ENDPOINT, "v1", vec![]), &all), Err(Rejection::TypeMismatch { .. })));
        assert!(matches!(
            s0.apply(response(xds::CLUSTER, "v1", vec![cla("a", 1)]), &all),
            Err(Rejection::ResourceType { index: 0, .. })
        ));
        assert_eq!(
            s0.apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1), cluster("a", 2)]), &all).unwrap_err(),
            Rejection::DuplicateName("a".into())
        );
    }

    #[test]
    fn bodies_select_by_name() {
        let ab = Interest::names(["a", "b", "c"]);
        let eds = KeyState::empty(xds::ENDPOINT)
            .apply(response(xds::ENDPOINT, "v1", vec![cla("a", 1), cla("b", 1), cla("c", 1)]), &ab)
            .unwrap()
            .unwrap();
        let (body, count) = eds.body_for(&Interest::names(["c", "a", "zzz"]));
        assert_eq!(count, 2);
        let decoded = DiscoveryResponse::decode(body).unwrap();
        let got: Vec<String> = decoded.resources.iter().filter_map(wire::resource_name).collect();
        assert_eq!(got, ["a", "c"]);
        assert_eq!(decoded.version_info, "v1");
        assert_eq!(eds.body_for(&Interest::wildcard()).1, 3);
    }

    #[test]
    fn interest_coverage() {
        assert!(Interest::wildcard().covers(&Interest::names(["a"])));
        assert!(Interest::names(["a", "b"]).covers(&Interest::names(["a"])));
        assert!(!Interest::names(["a"]).covers(&Interest::names(["a", "b"])));
        assert!(!Interest::names(["a"]).covers(&Interest::wildcard()));
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
        a.set_interest(Interest::names(["a", "c"]));
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
