//! Publishes snapshots: picks versions, stamps the control-plane identifier, notifies streams.
//!
//! Invariants:
//! - generations start at 1 and grow by one per publish;
//! - default versions are unix milliseconds, strictly increasing within a process
//!   (`max(prev + 1, now_ms)`) and, being time based, across restarts too;
//! - streams learn about new snapshots through a latest-wins `watch` channel, so publishing
//!   never blocks on a slow stream.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::Serialize;
use tokio::sync::watch;

use crate::extras::{self, Extras};
use crate::snapshot::{self, Snapshot, SnapshotSpec};

/// The `server` field of every control-plane identifier.
pub const SERVER_NAME: &str = "example-management-server";

/// How snapshots are built and versioned.
#[derive(Debug, Clone, Default)]
pub struct PublisherConfig {
    /// What each snapshot contains.
    pub spec: SnapshotSpec,
    /// Use `v<random 0..99999>` versions (like go-control-plane's example) instead of unix ms.
    pub random_versions: bool,
}

/// A published snapshot with its publish-time stamp.
#[derive(Debug, Clone)]
pub struct Published {
    /// The resources, version and generation.
    pub snapshot: Snapshot,
    /// Publish time in nanoseconds since the unix epoch.
    pub published_unix_nanos: u64,
    /// `DiscoveryResponse.control_plane.identifier`: a JSON object with server, version and
    /// publish time.
    pub identifier: String,
    /// The extras in force for this snapshot (already applied to its resources).
    pub extras: Arc<Extras>,
}

impl Published {
    /// The snapshot version.
    pub fn version(&self) -> &str {
        &self.snapshot.version
    }

    /// The snapshot generation (1 for the first publish).
    pub fn generation(&self) -> u64 {
        self.snapshot.generation
    }
}

/// The JSON layout of the control-plane identifier (field order is the wire order).
#[derive(Serialize)]
struct Identifier<'a> {
    server: &'a str,
    version: &'a str,
    published_unix_nanos: u64,
}

/// Builds the control-plane identifier for a version published at `published_unix_nanos`.
pub fn identifier(version: &str, published_unix_nanos: u64) -> String {
    let id = Identifier { server: SERVER_NAME, version, published_unix_nanos };
    // Serializing a struct of strings and integers cannot fail.
    serde_json::to_string(&id).unwrap_or_default()
}

/// The next millisecond version: strictly above `prev`, and at least `now_ms`.
pub fn next_ms_version(prev: Option<u64>, now_ms: u64) -> u64 {
    match prev {
        Some(prev) => now_ms.max(prev.saturating_add(1)),
        None => now_ms,
    }
}

/// Handle that publishes snapshots; cheap to clone, all clones share one state.
#[derive(Debug, Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: PublisherConfig,
    /// Last millisecond version and generation, updated together under the lock.
    counters: Mutex<Counters>,
    tx: watch::Sender<Option<Arc<Published>>>,
}

#[derive(Debug, Default)]
struct Counters {
    last_ms: Option<u64>,
    generation: u64,
    /// Replaces `config.spec` for later publishes, once set.
    spec: Option<SnapshotSpec>,
    /// The extras of later publishes.
    extras: Arc<Extras>,
}

// === impl Publisher ===

impl Publisher {
    /// A publisher that has not published anything yet.
    pub fn new(config: PublisherConfig) -> Self {
        let (tx, _) = watch::channel(None);
        Self { inner: Arc::new(Inner { config, counters: Mutex::default(), tx }) }
    }

    /// The configuration this publisher was created with (see [`Publisher::spec`]).
    pub fn config(&self) -> &PublisherConfig {
        &self.inner.config
    }

    /// What the next snapshot will contain: the last [`Publisher::set_spec`], or the
    /// configured spec.
    pub fn spec(&self) -> SnapshotSpec {
        let counters = self.inner.counters.lock().unwrap_or_else(PoisonError::into_inner);
        counters.spec.clone().unwrap_or_else(|| self.inner.config.spec.clone())
    }

    /// Changes what later snapshots contain (e.g. fewer clusters, to test removals); publishes
    /// nothing by itself.
    pub fn set_spec(&self, spec: SnapshotSpec) {
        self.inner.counters.lock().unwrap_or_else(PoisonError::into_inner).spec = Some(spec);
    }

    /// The extras later snapshots carry.
    pub fn extras(&self) -> Arc<Extras> {
        self.inner.counters.lock().unwrap_or_else(PoisonError::into_inner).extras.clone()
    }

    /// Replaces the extras of later snapshots; publishes nothing by itself.
    pub fn set_extras(&self, extras: Extras) {
        self.inner.counters.lock().unwrap_or_else(PoisonError::into_inner).extras = Arc::new(extras);
    }

    /// Builds, stamps and publishes the next snapshot, and returns it.
    pub fn publish_next(&self) -> Arc<Published> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        // Hold the counters lock across the send so generations reach the channel in order.
        let mut counters = self.inner.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let ms = next_ms_version(counters.last_ms, now_ms);
        counters.last_ms = Some(ms);
        counters.generation += 1;
        let version = if self.inner.config.random_versions {
            format!("v{}", rand::rng().random_range(0..100_000))
        } else {
            ms.to_string()
        };
        let published_unix_nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let spec = counters.spec.as_ref().unwrap_or(&self.inner.config.spec);
        let mut snapshot = snapshot::build(spec, &version, counters.generation);
        extras::apply(&mut snapshot, &counters.extras);
        let published = Arc::new(Published {
            identifier: identifier(&version, published_unix_nanos),
            snapshot,
            published_unix_nanos,
            extras: counters.extras.clone(),
        });
        self.inner.tx.send_replace(Some(published.clone()));
        drop(counters);
        tracing::info!(
            version = %published.version(),
            generation = published.generation(),
            "published snapshot"
        );
        published
    }

    /// The latest published snapshot, if any.
    pub fn current(&self) -> Option<Arc<Published>> {
        self.inner.tx.borrow().clone()
    }

    /// Number of snapshots published so far.
    pub fn publishes(&self) -> u64 {
        self.inner.counters.lock().unwrap_or_else(PoisonError::into_inner).generation
    }

    /// A receiver that sees every later publish (latest wins).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.inner.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ms_versions_strictly_increase() {
        assert_eq!(next_ms_version(None, 5), 5);
        assert_eq!(next_ms_version(Some(5), 5), 6);
        assert_eq!(next_ms_version(Some(9), 5), 10);
        assert_eq!(next_ms_version(Some(5), 100), 100);
    }

    #[test]
    fn publish_increments_generation_and_version() {
        let p = Publisher::new(PublisherConfig {
            spec: SnapshotSpec { clusters: 1, listeners: 1, endpoints: vec![] },
            random_versions: false,
        });
        assert!(p.current().is_none());
        let a = p.publish_next();
        let b = p.publish_next();
        assert_eq!((a.generation(), b.generation()), (1, 2));
        let (va, vb): (u64, u64) = (a.version().parse().unwrap(), b.version().parse().unwrap());
        assert!(vb > va);
        assert_eq!(p.publishes(), 2);
        assert_eq!(p.current().unwrap().version(), b.version());
        let id: serde_json::Value = serde_json::from_str(&b.identifier).unwrap();
        assert_eq!(id["server"], SERVER_NAME);
        assert_eq!(id["version"], b.version());
        assert!(id["published_unix_nanos"].as_u64().unwrap() > 0);
    }

    #[test]
    fn set_spec_changes_later_publishes() {
        let p = Publisher::new(PublisherConfig {
            spec: SnapshotSpec { clusters: 3, listeners: 1, endpoints: vec![] },
            random_versions: false,
        });
        assert_eq!(p.publish_next().snapshot.count(crate::snapshot::CLUSTER_TYPE), 3);
        p.set_spec(SnapshotSpec { clusters: 1, listeners: 1, endpoints: vec![] });
        assert_eq!(p.spec().clusters, 1);
        assert_eq!(p.config().spec.clusters, 3);
        assert_eq!(p.publish_next().snapshot.count(crate::snapshot::CLUSTER_TYPE), 1);
    }

    #[test]
    fn random_versions_have_v_prefix() {
        let p = Publisher::new(PublisherConfig { random_versions: true, ..Default::default() });
        let v = p.publish_next().version().to_owned();
        let n: u32 = v.strip_prefix('v').unwrap().parse().unwrap();
        assert!(n < 100_000);
    }
}
