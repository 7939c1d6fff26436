//! The relay: wires aggregation keys to their source and owns the cache's housekeeping.
//!
//! A request's key comes from the keyer; the first watcher of a key creates its cache entry
//! and starts the key's source. Today the source of every key is the origin (one upstream
//! subscription per key); the source is chosen in one place, [`Relay::start_source`], so a
//! clustered relay can pick "peer" for keys another node owns.
//!
//! Invariants: a key has at most one running source; evicting an entry stops its source;
//! shutdown stops them all.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{Cache, CacheError, ClientInfo, Entry, Interest, Watcher};
use crate::downstream::KeySource;
use crate::keyer::{KeyError, KeyRequest, Keyer};
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

/// The relay's core: keyer, cache and sources.
pub struct Relay {
    keyer: Keyer,
    cache: Arc<Cache>,
    origin: Origin,
    shutdown: CancellationToken,
}

impl Relay {
    /// A relay mapping requests with `keyer`, caching in `cache` and subscribing to `origin`;
    /// every source stops when `shutdown` fires.
    pub fn new(keyer: Keyer, cache: Arc<Cache>, origin: Origin, shutdown: CancellationToken) -> Self {
        Self { keyer, cache, origin, shutdown }
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The keyer.
    pub fn keyer(&self) -> &Keyer {
        &self.keyer
    }

    fn start_source(&self, entry: &Arc<Entry>) {
        let token = self.shutdown.child_token();
        entry.set_source(Some(Box::new(token.clone().drop_guard())));
        self.origin.spawn(entry.clone(), token);
    }

    /// Clears `key`: removes it when idle, otherwise drops its state and refetches it.
    pub fn clear(&self, key: &str) -> ClearOutcome {
        match self.cache.remove_if_idle(key) {
            None => ClearOutcome::NotFound,
            Some(true) => ClearOutcome::Removed,
            Some(false) => {
                let Some(entry) = self.cache.get(key) else { return ClearOutcome::NotFound };
                entry.set_source(None);
                entry.reset_state();
                self.start_source(&entry);
                tracing::info!(key, "cache entry cleared; refetching from its source");
                ClearOutcome::Refetched
            }
        }
    }

    /// Runs the cache's TTL sweep until shutdown.
    pub fn spawn_sweeper(self: &Arc<Self>, tracker: &TaskTracker) {
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
    }
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
