//! Counters and the table of open streams, rendered as the `/stats` report.
//!
//! Invariants:
//! - a stream is in the table exactly while its [`StreamGuard`] lives, so `streams_open` drops
//!   as soon as a stream's task ends, however it ends;
//! - counters only grow.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Counters and open streams of one management server.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    streams_total: AtomicU64,
    requests_total: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    heartbeats_sent: AtomicU64,
    extras_refused: AtomicU64,
    open: Mutex<BTreeMap<u64, StreamInfo>>,
}

/// One open stream, as listed by `/stats`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StreamInfo {
    /// Stream id, unique within the process.
    pub id: u64,
    /// gRPC method, e.g. `StreamAggregatedResources`.
    pub method: &'static str,
    /// `node.id` of the stream's first request ("" until known).
    pub node_id: String,
    /// `node.cluster` of the stream's first request.
    pub node_cluster: String,
    /// Type URLs requested on the stream.
    pub type_urls: BTreeSet<String>,
    /// When the stream opened, in unix milliseconds.
    pub opened_unix_ms: u64,
}

/// The `/stats` report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatsReport {
    /// Current snapshot version ("" before the first publish).
    pub version: String,
    /// Snapshots published so far.
    pub publishes: u64,
    /// Streams open now.
    pub streams_open: u64,
    /// Streams opened since start.
    pub streams_total: u64,
    /// Requests received since start.
    pub requests_total: u64,
    /// ACK requests received.
    pub acks: u64,
    /// NACK requests received.
    pub nacks: u64,
    /// TTL heartbeat responses sent (SotW and delta).
    pub heartbeats_sent: u64,
    /// `POST /extras` bodies refused.
    pub extras_refused: u64,
    /// The extras in force (the text of their flags / `POST /extras` body).
    pub extras: crate::extras::ExtrasSpec,
    /// Open streams per requested type URL (an ADS stream counts under each type it requested).
    pub open_by_type: BTreeMap<String, u64>,
    /// Open streams per gRPC method.
    pub open_by_method: BTreeMap<String, u64>,
    /// Open streams per node id.
    pub open_by_node: BTreeMap<String, u64>,
    /// Every open stream.
    pub streams: Vec<StreamInfo>,
}

/// Keeps a stream in the [`Registry`] table; removes it when dropped.
#[derive(Debug)]
pub struct StreamGuard {
    registry: Arc<Registry>,
    id: u64,
}

// === impl Registry ===

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<u64, StreamInfo>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a newly opened stream of `method`.
    pub fn open(self: &Arc<Self>, method: &'static str) -> StreamGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.streams_total.fetch_add(1, Ordering::Relaxed);
        let info = StreamInfo {
            id,
            method,
            node_id: String::new(),
            node_cluster: String::new(),
            type_urls: BTreeSet::new(),
            opened_unix_ms: unix_ms(),
        };
        self.table().insert(id, info);
        StreamGuard { registry: self.clone(), id }
    }

    /// Counts a received request.
    pub fn count_request(&self) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an ACK.
    pub fn count_ack(&self) {
        self.acks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a NACK.
    pub fn count_nack(&self) {
        self.nacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a heartbeat response sent.
    pub fn count_heartbeat(&self) {
        self.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused `POST /extras` body.
    pub fn count_extras_refused(&self) {
        self.extras_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Number of open streams.
    pub fn streams_open(&self) -> usize {
        self.table().len()
    }

    /// The report for `/stats`, given the current version and publish count.
    pub fn report(&self, version: String, publishes: u64) -> StatsReport {
        let streams: Vec<StreamInfo> = self.table().values().cloned().collect();
        let mut open_by_type = BTreeMap::new();
        let mut open_by_method = BTreeMap::new();
        let mut open_by_node = BTreeMap::new();
        for s in &streams {
            for t in &s.type_urls {
                *open_by_type.entry(t.clone()).or_insert(0) += 1;
            }
            *open_by_method.entry(s.method.to_owned()).or_insert(0) += 1;
            *open_by_node.entry(s.node_id.clone()).or_insert(0) += 1;
        }
        StatsReport {
            version,
            publishes,
            streams_open: streams.len() as u64,
            streams_total: self.streams_total.load(Ordering::Relaxed),
            requests_total: self.requests_total.load(Ordering::Relaxed),
            acks: self.acks.load(Ordering::Relaxed),
            nacks: self.nacks.load(Ordering::Relaxed),
            heartbeats_sent: self.heartbeats_sent.load(Ordering::Relaxed),
            extras_refused: self.extras_refused.load(Ordering::Relaxed),
            extras: crate::extras::ExtrasSpec::default(),
            open_by_type,
            open_by_method,
            open_by_node,
            streams,
        }
    }
}

// === impl StreamGuard ===

impl StreamGuard {
    /// The stream's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Records the node of the stream's first request.
    pub fn set_node(&self, node_id: &str, node_cluster: &str) {
        if let Some(info) = self.registry.table().get_mut(&self.id) {
            node_id.clone_into(&mut info.node_id);
            node_cluster.clone_into(&mut info.node_cluster);
        }
    }

    /// Records that the stream requested `type_url`.
    pub fn add_type(&self, type_url: &str) {
        if let Some(info) = self.registry.table().get_mut(&self.id)
            && !info.type_urls.contains(type_url)
        {
            info.type_urls.insert(type_url.to_owned());
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.registry.table().remove(&self.id);
    }
}

/// Now in unix milliseconds.
fn unix_ms() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_tracks_open_streams() {
        let r = Registry::new();
        let a = r.open("StreamAggregatedResources");
        a.set_node("n1", "c1");
        a.add_type("t1");
        a.add_type("t2");
        let b = r.open("StreamClusters");
        b.set_node("n1", "c1");
        b.add_type("t1");
        let rep = r.report("v".into(), 1);
        assert_eq!(rep.streams_open, 2);
        assert_eq!(rep.open_by_type["t1"], 2);
        assert_eq!(rep.open_by_type["t2"], 1);
        assert_eq!(rep.open_by_node["n1"], 2);
        assert_eq!(rep.open_by_method["StreamClusters"], 1);
        drop(a);
        let rep = r.report("v".into(), 1);
        assert_eq!(rep.streams_open, 1);
        assert_eq!(rep.streams_total, 2);
        assert!(!rep.open_by_type.contains_key("t2"));
    }
}
