//! The relay: wires aggregation keys to their source and owns the cache's housekeeping.
//!
//! A request's key comes from the keyer; the first watcher of a key creates its cache entry
//! and starts the key's source. The source is chosen in one place ([`Relay::desired_source`]):
//! the origin when this node owns the key on the ring (or runs alone, or other nodes follow
//! the key through it), otherwise the owner node through the peer protocol. A private
//! pass-through key (`server.pass_through_unmapped`) always comes from the origin through the
//! node its client is connected to: it is never placed on the ring, never followed from or by
//! a peer, and it leaves the cache as soon as its stream stops watching it.
//!
//! Invariants:
//! - a key has one running source, except during a switch: the new source starts first and
//!   the old one stops once the new one has delivered (make-before-break);
//! - a node with followers of a key takes it from the origin, so there are no forwarding
//!   loops; during ring disagreement two nodes may briefly both hold an origin stream;
//! - an admin clear of a key with clients refetches it while its clients keep the cached
//!   state (an unchanged version reaches nobody); refetches of a key run one at a time and at
//!   most one per [`REFETCH_SPACING`], later clears joining the pending or scheduled one;
//! - evicting an entry stops its source, and no source starts for an entry that has left the
//!   cache (the entry refuses it), so no source runs that nothing can reach; shutdown stops
//!   them all.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xds_relay_cluster::{Cluster, ClusterView, Ring};

use crate::cache::{CacheError, ClientInfo, Interest, Keeper, KeyState};
use crate::downstream::KeySource;
use crate::downstream::passthrough;
use crate::keyer::{KeyError, KeyRequest, Keyer};
use crate::node_cache::{Cache, Entry, Watcher};
use crate::peer::follower::{self, FollowerSettings};
use crate::peer::server::{KeyOwner, PeerRefusal};
use crate::rollout::Rollouts;
use crate::source::{self, KeyPlacement, RefetchGuard, Retired, Source};
use crate::status::{KeyReport, NodeIdentity, NodeReport, ReportedSource};
use crate::telemetry::{KeySourceCounts, MEMBER_STATES, Metrics, PeerSide};
use crate::upstream::Origin;

/// How many of a follower's names are tried one by one when a key built from resource names
/// is checked against a peer watch.
const MAX_NAMES_TRIED: usize = 256;

/// What clearing a key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearOutcome {
    /// The key had no watchers and was removed.
    Removed,
    /// The key has watchers: it is refetched from its source while clients keep the cached
    /// state; the refetched state replaces it only when it differs (clients get nothing when
    /// the source answers with the same version and content).
    Refetched,
    /// The key has watchers and a refetch of it is already pending (running, or scheduled
    /// because the last one started less than [`REFETCH_SPACING`] ago): this clear joins it.
    Coalesced,
    /// The key has watchers and its last refetch started less than [`REFETCH_SPACING`] ago:
    /// the next one is scheduled for when that spacing ends (and later clears join it).
    Scheduled,
    /// No such key.
    NotFound,
}

/// Least time between two refetches of a key that the admin API starts: a clear within it
/// schedules one refetch for when it ends, which every clear until then joins, so a burst of
/// clears costs the origin at most one stream per key per spacing.
pub const REFETCH_SPACING: Duration = Duration::from_secs(1);

/// What the node keeps of its keys' states in `cache.persist_dir`: the cache's [`Keeper`].
/// [`KeptStates::accepted`] is the one place that decides which accepted states are kept.
pub struct KeptStates {
    queue: Arc<crate::persist::Queue>,
    /// `server.pass_through_unmapped`: private pass-through keys are never kept.
    pass_through: bool,
}

impl KeptStates {
    /// Keeps states through the store's writer `queue`; with `pass_through` on, keys under
    /// [`passthrough::KEY_PREFIX`] are private to one stream and never kept.
    pub fn new(queue: Arc<crate::persist::Queue>, pass_through: bool) -> Self {
        Self { queue, pass_through }
    }
}

impl Keeper for KeptStates {
    /// A state accepted from a live source (the origin, or the owner node) becomes the key's
    /// last-known-good state: it is handed to the writer, which never blocks this path. A
    /// private pass-through key is not kept; a state with `do_not_cache` resources removes
    /// the key's record (the writer decides, see [`crate::persist::Record::of_state`]).
    fn accepted(&self, key: &str, type_url: &str, node: &Node, state: &Arc<KeyState>) {
        if self.pass_through && passthrough::is_private_key(key) {
            return;
        }
        self.queue.put(key, type_url, node, state);
    }

    fn removed(&self, key: &str) {
        self.queue.remove(key);
    }
}

/// This node's membership in a relay cluster.
pub struct Membership {
    /// The gossip handle.
    pub cluster: Cluster,
    /// Follower settings (channels to the other nodes).
    pub followers: FollowerSettings,
}

/// The relay's core: keyer, cache and sources.
pub struct Relay {
    keyer: Keyer,
    cache: Arc<Cache>,
    origin: Origin,
    membership: Option<Membership>,
    metrics: Metrics,
    shutdown: CancellationToken,
    /// Refetches scheduled by the admin API: key → when it runs.
    scheduled_refetches: std::sync::Mutex<std::collections::HashMap<String, tokio::time::Instant>>,
    /// `server.pass_through_unmapped`: keys under [`passthrough::KEY_PREFIX`] are private.
    pass_through: bool,
    /// The staged rollouts (`rollout:`), when configured.
    rollouts: Option<Arc<Rollouts>>,
}

impl Relay {
    /// A relay mapping requests with `keyer`, caching in `cache`, subscribing to `origin`
    /// (and to owner nodes through `membership`); every source stops when `shutdown` fires.
    pub fn new(
        keyer: Keyer,
        cache: Arc<Cache>,
        origin: Origin,
        membership: Option<Membership>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            keyer,
            cache,
            origin,
            membership,
            metrics,
            shutdown,
            scheduled_refetches: Default::default(),
            pass_through: false,
            rollouts: None,
        }
    }

    /// The relay with staged rollouts: every new entry with lanes gets its controller (the
    /// cache must have been built with [`Rollouts::staged_keys`]); set before the first watch.
    #[must_use]
    pub fn with_rollouts(mut self, rollouts: Option<Arc<Rollouts>>) -> Self {
        self.rollouts = rollouts;
        self
    }

    /// The staged rollouts, when configured.
    pub fn rollouts(&self) -> Option<&Arc<Rollouts>> {
        self.rollouts.as_ref()
    }

    /// The relay with pass-through of unmapped requests on or off
    /// (`server.pass_through_unmapped`); set before the first watch.
    #[must_use]
    pub fn with_pass_through(mut self, on: bool) -> Self {
        self.pass_through = on;
        self
    }

    /// True when `key` is a private pass-through key: pass-through is on and the key has
    /// the reserved prefix (the keyer's keys never have it then).
    pub fn is_pass_through(&self, key: &str) -> bool {
        self.pass_through && passthrough::is_private_key(key)
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The cluster membership, when clustered.
    pub fn membership(&self) -> Option<&Membership> {
        self.membership.as_ref()
    }

    /// The source `entry` should have now ([`source::choose`] with the ring's owner).
    pub fn desired_source(&self, entry: &Entry) -> Source {
        let placement = KeyPlacement {
            standalone: self.membership.is_none(),
            private: self.is_pass_through(&entry.key),
            followed: entry.has_followers(),
        };
        let view = self.membership.as_ref().map(|m| m.cluster.view());
        source::choose(placement, view.as_ref().and_then(|view| view.owner(&entry.key)))
    }

    /// Starts (or switches to) the desired source of `entry`; the previous source keeps
    /// running until the new one has delivered. Nothing starts for an entry that has left
    /// the cache (its source could never be reached or stopped).
    fn start_source(&self, entry: &Arc<Entry>) {
        self.start_source_with(entry, None);
    }

    /// [`Relay::start_source`]; the new source also holds `refetch` until it has delivered.
    fn start_source_with(&self, entry: &Arc<Entry>, refetch: Option<RefetchGuard>) {
        let source = self.desired_source(entry);
        let token = self.shutdown.child_token();
        let from = entry.source.current();
        let previous = match entry.source.replace(source.clone(), Box::new(token.clone().drop_guard())) {
            Ok(previous) => previous,
            Err(Retired(_refused)) => {
                tracing::debug!(key = %entry.key, type_url = %entry.type_url, "source not started: the entry left the cache");
                return;
            }
        };
        let switching = previous.is_some() && from.as_ref() != Some(&source);
        // The refetch ends when the new source releases the one it replaces (or stops).
        let previous = match refetch {
            Some(guard) => Some(Box::new((previous, guard)) as Box<dyn Send>),
            None => previous,
        };
        if switching {
            // A switch: the new source hands over from the previous one (make-before-break).
            let from = from.map(|s| s.label()).unwrap_or_default();
            tracing::info!(key = %entry.key, type_url = %entry.type_url, from = %from, to = %source.label(), "key changes source");
            self.metrics.source_changes.inc();
        }
        match source {
            Source::Origin => self.origin.spawn(entry.clone(), token, previous),
            Source::Peer { name, addr } => {
                let Some(membership) = &self.membership else { return };
                follower::spawn(&membership.followers, entry.clone(), name, addr, token, previous);
            }
        }
    }

    /// Moves every key whose desired source changed (ring change, new followers) to it.
    /// Returns how many keys moved.
    pub fn reconcile(&self) -> usize {
        let mut moved = 0;
        for entry in self.cache.entries() {
            let Some(current) = entry.source.current() else { continue };
            if current != self.desired_source(&entry) {
                self.start_source(&entry);
                moved += 1;
            }
        }
        moved
    }

    /// Keys the ring gives to another node whose new owner has not delivered yet (their
    /// origin stream here keeps running until it has). A key in a make-before-break switch
    /// still shows its previous source as connected, so switches in flight (the node's
    /// pending handoffs) count as well: a draining node waits for them, or its clients' keys
    /// could be left with no origin stream anywhere when the new owner had not yet accepted.
    pub fn keys_not_handed_over(&self) -> usize {
        let unanswered = self
            .cache
            .entries()
            .iter()
            // A key read from disk that nobody watched has no source: there is nothing to hand over.
            .filter(|e| e.source.current().is_some())
            .filter(|e| !self.desired_source(e).is_origin() && !e.source.status().connected)
            .count();
        let in_flight = usize::try_from(self.metrics.sources().handoffs_pending.get()).unwrap_or(0);
        unanswered.max(in_flight)
    }

    /// Counts this node's keys by source and whether it is answered, for the `keys` and
    /// `keys_without_source` gauges. A key is active when it has a local client or a follower;
    /// an active key whose source (the origin stream when this node serves it, the owner's
    /// peer stream otherwise) has no answer now is counted in `without_source`: its clients
    /// get the cached state, but nothing new, until a source answers.
    pub fn key_source_counts(&self) -> KeySourceCounts {
        let mut counts = KeySourceCounts::default();
        for entry in self.cache.entries() {
            let connected = entry.source.status().connected;
            match (entry.source.current(), connected) {
                (Some(Source::Origin), true) => counts.origin_connected += 1,
                (Some(Source::Origin), false) => counts.origin_disconnected += 1,
                (Some(Source::Peer { .. }), true) => counts.peer_connected += 1,
                (Some(Source::Peer { .. }), false) => counts.peer_disconnected += 1,
                (None, _) => {}
            }
            if !connected && entry.watcher_count() > 0 {
                counts.without_source += 1;
            }
        }
        counts
    }

    /// Updates the gauges computed from a snapshot of the cache (before a scrape).
    pub fn refresh_metrics(&self) {
        self.metrics.set_key_sources(&self.key_source_counts());
        let stale = self.cache.entries().iter().filter(|e| e.source.is_stale()).count();
        self.metrics.persist_stale_keys.set(i64::try_from(stale).unwrap_or(i64::MAX));
        if let Some(membership) = &self.membership {
            self.metrics.set_gossip_stats(&membership.cluster.gossip_stats());
        }
    }

    /// Clears `key`: removes it when idle, otherwise refetches it from its source while its
    /// clients keep the cached state. One refetch per key at a time: a clear while one is
    /// pending joins it; and at most one per [`REFETCH_SPACING`]: a clear sooner schedules
    /// the next (see [`Relay::refetch`]).
    pub fn clear(&self, key: &str) -> ClearOutcome {
        match self.cache.remove_if_idle(key) {
            None => ClearOutcome::NotFound,
            Some(true) => ClearOutcome::Removed,
            Some(false) => match self.cache.get(key) {
                Some(entry) => self.refetch(&entry, "admin clear"),
                None => ClearOutcome::NotFound,
            },
        }
    }

    /// Refetches `entry` for the admin API, or joins or schedules a refetch.
    ///
    /// A key served from the origin has its origin stream replaced by a new one (the
    /// subscription opens it at once; there is never more than one stream for the key); the
    /// answer is applied like any origin response, so an unchanged version wakes nobody. A
    /// key followed from its owner gets a new peer source, which asks the owner for a state
    /// fetched from the origin after now and replaces the current one when it has
    /// delivered (make-before-break); an identical state again wakes nobody. A refetch
    /// scheduled for later opens its stream after every clear that joined it, so each clear
    /// is answered with a state fetched after it.
    fn refetch(&self, entry: &Arc<Entry>, why: &'static str) -> ClearOutcome {
        let key = entry.key.as_str();
        let type_url = entry.type_url.as_str();
        {
            let mut scheduled = self.scheduled_refetches.lock().unwrap_or_else(|p| p.into_inner());
            if scheduled.contains_key(key) || self.refetch_pending(entry) {
                tracing::info!(key, type_url, why, "refetch asked while one is pending; joining it");
                return ClearOutcome::Coalesced;
            }
            if let Some(last) = entry.source.last_refetch()
                && last.elapsed() < REFETCH_SPACING
            {
                scheduled.insert(key.to_owned(), last + REFETCH_SPACING);
                tracing::info!(key, type_url, why, "refetch scheduled (one per key per spacing)");
                return ClearOutcome::Scheduled;
            }
        }
        if self.start_refetch(entry) {
            tracing::info!(key, type_url, why, "refetching the key from its source");
            ClearOutcome::Refetched
        } else {
            tracing::info!(key, type_url, why, "refetch asked while one is pending; joining it");
            ClearOutcome::Coalesced
        }
    }

    /// True while a refetch of `entry` has not delivered yet.
    fn refetch_pending(&self, entry: &Entry) -> bool {
        let epochs = entry.source.freshness.epochs();
        epochs.wanted > epochs.delivered || entry.source.is_refetching()
    }

    /// Starts a refetch of `entry` now; false when one is already pending (joined).
    fn start_refetch(&self, entry: &Arc<Entry>) -> bool {
        let started = if entry.source.is_origin() {
            entry.source.freshness.request_refetch()
        } else {
            match entry.source.begin_refetch() {
                Some(guard) => {
                    self.start_source_with(entry, Some(guard));
                    true
                }
                None => false,
            }
        };
        if started {
            entry.source.note_refetch();
        }
        started
    }

    /// Starts the scheduled refetches that are due (keys without clients any more are
    /// skipped: nobody waits for them).
    fn run_scheduled_refetches(&self) {
        let now = tokio::time::Instant::now();
        let due: Vec<String> = {
            let mut scheduled = self.scheduled_refetches.lock().unwrap_or_else(|p| p.into_inner());
            let due: Vec<String> = scheduled.iter().filter(|(_, at)| **at <= now).map(|(k, _)| k.clone()).collect();
            for key in &due {
                scheduled.remove(key);
            }
            due
        };
        for key in due {
            if let Some(entry) = self.cache.get(&key).filter(|e| e.watcher_count() > 0) {
                let started = self.start_refetch(&entry);
                tracing::info!(key, type_url = %entry.type_url, started, "scheduled refetch due");
            }
        }
    }

    /// Runs the cache's TTL sweep and, when clustered, source reconciliation on every ring
    /// change, until shutdown.
    pub fn spawn_housekeeping(self: &Arc<Self>, tracker: &TaskTracker) {
        let relay = self.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(relay.cache.sweep_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = relay.shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        // An eviction may end a draining node's wait for its keys to move.
                        if relay.cache.sweep() > 0
                            && let Some(membership) = &relay.membership
                        {
                            membership.followers.handovers.notify();
                        }
                        relay.run_scheduled_refetches();
                    }
                }
            }
        });
        let Some(membership) = &self.membership else { return };
        let relay = self.clone();
        let mut views = membership.cluster.watch();
        tracker.spawn(async move {
            let mut last_ring: Option<Ring> = None;
            let mut safety = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    () = relay.shutdown.cancelled() => break,
                    changed = views.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let view: Arc<ClusterView> = views.borrow_and_update().clone();
                        relay.metrics.set_cluster_members(members_by_state(&view));
                        relay.metrics.ring_members.set(i64::try_from(view.ring.members().len()).unwrap_or(i64::MAX));
                        if last_ring.as_ref() != Some(&view.ring) {
                            relay.metrics.ring_changes.inc();
                            last_ring = Some(view.ring.clone());
                        }
                    }
                    _ = safety.tick() => {}
                }
                relay.reconcile();
            }
        });
    }

    fn key_report(&self, entry: &Entry) -> KeyReport {
        let state = entry.state();
        let stale = entry.source.is_stale();
        let source = match entry.source.current() {
            None if stale => ReportedSource::Disk,
            running => running.into(),
        };
        KeyReport {
            key: entry.key.clone(),
            type_url: entry.type_url.clone(),
            version: state.version_info.clone(),
            age_seconds: if state.is_ready() { state.received_at.elapsed().as_secs_f64() } else { 0.0 },
            local_clients: entry.local_clients() as u64,
            nacks: entry.clients().iter().map(|c| c.nacks).sum(),
            source,
            followers: entry.followers(),
            stale,
            rollout: self
                .rollouts
                .as_ref()
                .and_then(|rollouts| rollouts.phase(&entry.key))
                .map(|phase| phase.label().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// Members of `view` per state, in the order of [`MEMBER_STATES`]; dead members count as
/// `dead` whatever they last gossiped.
fn members_by_state(view: &ClusterView) -> [usize; 4] {
    let mut counts = [0; 4];
    for member in &view.members {
        let state = if member.alive { member.state.as_str() } else { "dead" };
        if let Some(i) = MEMBER_STATES.iter().position(|s| *s == state) {
            counts[i] += 1;
        }
    }
    counts
}

impl KeySource for Relay {
    fn key(&self, request: &KeyRequest<'_>) -> Result<String, KeyError> {
        self.keyer.key(request)
    }

    fn watch(
        &self,
        key: &str,
        type_url: &str,
        node: &Node,
        client: ClientInfo,
        interest: Interest,
    ) -> Result<Watcher, CacheError> {
        self.cache.watch(key, type_url, node, client, interest, |entry| {
            if let Some(rollouts) = &self.rollouts {
                rollouts.start(entry);
            }
            self.start_source(entry);
        })
    }

    fn refresh(&self, entry: &Arc<Entry>) {
        let scheduled = self.scheduled_refetches.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&entry.key);
        // Every client waiting for the same fresh copy joins one refetch, quietly.
        if !scheduled && !self.refetch_pending(entry) {
            self.refetch(entry, "a client waits for a fresh copy of do_not_cache resources");
        }
    }

    fn release(&self, key: &str) {
        if self.is_pass_through(key) {
            self.cache.remove_released(key);
        }
    }
}

impl KeyOwner for Relay {
    fn watch_as_owner(
        &self,
        key: &str,
        type_url: &str,
        node: &Node,
        client: ClientInfo,
        interest: Interest,
    ) -> Result<Watcher, CacheError> {
        let watcher = KeySource::watch(self, key, type_url, node, client, interest)?;
        // A key followed through this node must come from the origin here, never from
        // another node (no forwarding loops).
        if !watcher.entry().source.is_origin() {
            self.start_source(watcher.entry());
        }
        Ok(watcher)
    }

    fn check_watch(&self, key: &str, type_url: &str, node: &Node, interest: &Interest) -> Result<(), PeerRefusal> {
        if self.is_pass_through(key) {
            return Err(PeerRefusal::KeyMismatch {
                key: key.to_owned(),
                type_url: type_url.to_owned(),
                node_id: node.id.clone(),
                mapped: "no shared key: pass-through keys belong to one client stream of this node".to_owned(),
            });
        }
        if let Some(membership) = &self.membership {
            let view = membership.cluster.view();
            match view.owner(key) {
                Some(owner) if owner.is_self => {}
                owner => {
                    let owner = owner.map_or_else(|| "nobody".to_owned(), |m| m.name.clone());
                    return Err(PeerRefusal::NotOwner { key: key.to_owned(), owner });
                }
            }
        }
        let names: Vec<String> = interest.names.iter().cloned().collect();
        let key_for =
            |names: &[String]| self.keyer.key(&KeyRequest { type_url, node: Some(node), resource_names: names });
        let mapped = key_for(&names);
        if mapped.as_deref() == Ok(key) {
            return Ok(());
        }
        // A key built from resource names came from the names of one client's request, which
        // the follower's union of names may order differently: the key is also accepted when
        // the rules give it for one of the names alone (the usual `element: 0` rules).
        if self.keyer.reads_resource_names()
            && names.iter().take(MAX_NAMES_TRIED).any(|name| key_for(std::slice::from_ref(name)).as_deref() == Ok(key))
        {
            return Ok(());
        }
        Err(PeerRefusal::KeyMismatch {
            key: key.to_owned(),
            type_url: type_url.to_owned(),
            node_id: node.id.clone(),
            mapped: match mapped {
                Ok(mapped) => mapped,
                Err(e) => format!("no key: {e}"),
            },
        })
    }

    fn is_member(&self, name: &str) -> bool {
        let Some(membership) = &self.membership else { return false };
        let view = membership.cluster.view();
        view.members.iter().chain(&view.unverified).any(|m| m.name == name && m.alive)
    }

    fn identify(&self) -> NodeIdentity {
        match &self.membership {
            Some(m) => NodeIdentity { node: m.cluster.self_name().to_owned(), generation: m.cluster.generation() },
            None => NodeIdentity::default(),
        }
    }

    fn status(&self) -> NodeReport {
        let node = self.membership.as_ref().map(|m| m.cluster.self_name().to_owned()).unwrap_or_default();
        NodeReport { node, keys: self.cache.entries().iter().map(|e| self.key_report(e)).collect() }
    }

    fn follower_streams(&self, delta: i64) {
        self.metrics.peer_followers.inc_by(delta);
    }

    fn peer_stream_error(&self, reason: &'static str) {
        self.metrics.sources().peer_stream_error(PeerSide::Owner, reason);
    }

    fn peer_rejected(&self, reason: &'static str) {
        self.metrics.peer_rejected(reason);
    }

    fn limit_refused(&self, limit: &'static str) {
        self.metrics.limit_refused(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_bootstrap, parse_rules};
    use crate::xds;

    fn relay(pass_through: bool) -> Relay {
        let bootstrap = parse_bootstrap(
            "server: {address: {address: 127.0.0.1, port_value: 0}}\n\
             origin_server: {address: {address: 127.0.0.1, port_value: 1}}\n\
             cache: {ttl: 60s}\n\
             admin: {address: {address: 127.0.0.1, port_value: 0}}\n",
            "bootstrap.yaml",
        )
        .unwrap();
        let metrics = Metrics::new();
        let rules =
            parse_rules(include_str!("../example/config/aggregation-rules.yaml"), "aggregation-rules.yaml").unwrap();
        let cache = Arc::new(Cache::new(bootstrap.cache.clone(), metrics.clone()));
        let origin =
            Origin::new(&bootstrap.origin_server, None, &metrics, TaskTracker::new(), Default::default()).unwrap();
        Relay::new(Keyer::new(&rules).unwrap(), cache, origin, None, metrics, CancellationToken::new())
            .with_pass_through(pass_through)
    }

    #[tokio::test]
    async fn a_pass_through_key_is_refused_to_peers_and_released_as_soon_as_it_is_unwatched() {
        let relay = relay(true);
        let node = Node { id: "n".into(), cluster: "staging".into(), ..Node::default() };
        let key = passthrough::private_key(xds::CLUSTER, "n", 1);
        assert!(relay.is_pass_through(&key));
        let refused = relay.check_watch(&key, xds::CLUSTER, &node, &Interest::wildcard());
        assert!(matches!(refused, Err(PeerRefusal::KeyMismatch { .. })), "{refused:?}");

        let watch = |key: &str| {
            KeySource::watch(&relay, key, xds::CLUSTER, &node, ClientInfo::default(), Interest::wildcard()).unwrap()
        };
        let watcher = watch(&key);
        relay.release(&key);
        assert!(relay.cache().get(&key).is_some(), "a watched key is never released");
        drop(watcher);
        relay.release(&key);
        assert!(relay.cache().get(&key).is_none(), "an unwatched private key leaves at once");

        drop(watch("staging_cds"));
        relay.release("staging_cds");
        assert!(relay.cache().get("staging_cds").is_some(), "a shared key waits for its ttl");
        assert!(!self::relay(false).is_pass_through(&key), "without the setting the prefix is not special");
    }
}
