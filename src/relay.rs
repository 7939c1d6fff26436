//! The relay: wires aggregation keys to their source and owns the cache's housekeeping.
//!
//! A request's key comes from the keyer; the first watcher of a key creates its cache entry
//! and starts the key's source. The source is chosen in one place ([`Relay::desired_source`]):
//! the origin when this node owns the key on the ring (or runs alone, or other nodes follow
//! the key through it), otherwise the owner node through the peer protocol.
//!
//! Invariants:
//! - a key has one running source, except during a switch: the new source starts first and
//!   the old one stops once the new one has delivered (make-before-break);
//! - a node with followers of a key takes it from the origin, so there are no forwarding
//!   loops; during ring disagreement two nodes may briefly both hold an origin stream;
//! - evicting an entry stops its source; shutdown stops them all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xds_relay_cluster::{Cluster, ClusterView, Ring};

use crate::cache::{Cache, CacheError, ClientInfo, Entry, Interest, Watcher};
use crate::downstream::KeySource;
use crate::keyer::{KeyError, KeyRequest, Keyer};
use crate::peer::follower::{self, FollowerSettings};
use crate::peer::proto::{KeyStatus, StatusReply};
use crate::peer::server::KeyOwner;
use crate::telemetry::{KeySourceCounts, MEMBER_STATES, Metrics, PeerSide};
use crate::upstream::Origin;

/// What clearing a key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearOutcome {
    /// The key had no watchers and was removed.
    Removed,
    /// The key has watchers: its cached state was dropped and refetched from the source;
    /// clients stay connected and get the refetched version.
    Refetched,
    /// No such key.
    NotFound,
}

/// Where a key's state should come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The origin management server.
    Origin,
    /// The key's owner node.
    Peer {
        /// The owner's node name.
        name: String,
        /// The owner's peer address.
        addr: SocketAddr,
    },
}

impl Source {
    /// The label shown by the admin API: `origin` or `peer:<node>`.
    pub fn label(&self) -> String {
        match self {
            Self::Origin => "origin".to_owned(),
            Self::Peer { name, .. } => format!("peer:{name}"),
        }
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
        Self { keyer, cache, origin, membership, metrics, shutdown }
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The cluster membership, when clustered.
    pub fn membership(&self) -> Option<&Membership> {
        self.membership.as_ref()
    }

    /// The source `entry` should have now.
    pub fn desired_source(&self, entry: &Entry) -> Source {
        let Some(membership) = &self.membership else { return Source::Origin };
        if !entry.followers().is_empty() {
            return Source::Origin;
        }
        let view = membership.cluster.view();
        match view.owner(&entry.key) {
            Some(owner) if !owner.is_self => match owner.peer_addr {
                Some(addr) => Source::Peer { name: owner.name.clone(), addr },
                None => Source::Origin,
            },
            _ => Source::Origin,
        }
    }

    /// Starts (or switches to) the desired source of `entry`; the previous source keeps
    /// running until the new one has delivered.
    fn start_source(&self, entry: &Arc<Entry>) {
        let source = self.desired_source(entry);
        let label = source.label();
        let token = self.shutdown.child_token();
        let from = entry.source_label();
        let previous = entry.replace_source(&label, Box::new(token.clone().drop_guard()));
        if previous.is_some() {
            // A switch: the new source hands over from the previous one (make-before-break).
            tracing::info!(key = %entry.key, type_url = %entry.type_url, from = %from, to = %label, "key changes source");
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
            let desired = self.desired_source(&entry).label();
            let current = entry.source_label();
            if !current.is_empty() && current != desired {
                self.start_source(&entry);
                moved += 1;
            }
        }
        moved
    }

    /// Keys the ring gives to another node whose new owner has not delivered yet (their
    /// origin stream here keeps running until it has).
    pub fn keys_not_handed_over(&self) -> usize {
        self.cache
            .entries()
            .iter()
            .filter(|e| self.desired_source(e) != Source::Origin && !e.upstream_status().connected)
            .count()
    }

    /// Counts this node's keys by source and whether it is answered, for the `keys` and
    /// `keys_without_source` gauges. A key is active when it has a local client or a follower;
    /// an active key whose source (the origin stream when this node serves it, the owner's
    /// peer stream otherwise) has no answer now is counted in `without_source`: its clients
    /// get the cached state, but nothing new, until a source answers.
    pub fn key_source_counts(&self) -> KeySourceCounts {
        let mut counts = KeySourceCounts::default();
        for entry in self.cache.entries() {
            let connected = entry.upstream_status().connected;
            let label = entry.source_label();
            match (label.as_str(), connected) {
                ("origin", true) => counts.origin_connected += 1,
                ("origin", false) => counts.origin_disconnected += 1,
                (l, true) if l.starts_with("peer:") => counts.peer_connected += 1,
                (l, false) if l.starts_with("peer:") => counts.peer_disconnected += 1,
                _ => {}
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
        if let Some(membership) = &self.membership {
            self.metrics.set_gossip_stats(&membership.cluster.gossip_stats());
        }
    }

    /// Clears `key`: removes it when idle, otherwise drops its state and refetches it.
    pub fn clear(&self, key: &str) -> ClearOutcome {
        match self.cache.remove_if_idle(key) {
            None => ClearOutcome::NotFound,
            Some(true) => ClearOutcome::Removed,
            Some(false) => {
                let Some(entry) = self.cache.get(key) else { return ClearOutcome::NotFound };
                entry.set_source(None);
                // The stopped source leaves no answered source behind: the new one marks the
                // key connected when it answers.
                entry.set_connected(false);
                entry.reset_state();
                self.start_source(&entry);
                tracing::info!(key, type_url = %entry.type_url, "cache entry cleared; refetching from its source");
                ClearOutcome::Refetched
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
                    _ = tick.tick() => { relay.cache.sweep(); }
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

    fn key_status(&self, entry: &Entry) -> KeyStatus {
        let state = entry.state();
        KeyStatus {
            key: entry.key.clone(),
            type_url: entry.type_url.clone(),
            version: state.version_info.clone(),
            age_seconds: if state.is_ready() { state.received_at.elapsed().as_secs_f64() } else { 0.0 },
            local_clients: entry.local_clients() as u64,
            nacks: entry.clients().iter().map(|c| c.nacks).sum(),
            source: entry.source_label(),
            followers: entry.followers(),
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
        self.cache.watch(key, type_url, node, client, interest, |entry| self.start_source(entry))
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
        if watcher.entry().source_label() != "origin" {
            self.start_source(watcher.entry());
        }
        Ok(watcher)
    }

    fn status(&self) -> StatusReply {
        let node = self.membership.as_ref().map(|m| m.cluster.self_name().to_owned()).unwrap_or_default();
        StatusReply { node, keys: self.cache.entries().iter().map(|e| self.key_status(e)).collect() }
    }

    fn follower_streams(&self, delta: i64) {
        self.metrics.peer_followers.inc_by(delta);
    }

    fn peer_stream_error(&self, reason: &'static str) {
        self.metrics.sources().peer_stream_error(PeerSide::Owner, reason);
    }
}
