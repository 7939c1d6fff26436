//! The node's cache: the cache's types bound to the node's metrics, the names the rest of the
//! relay uses. The cache itself is generic over its hooks and knows no telemetry type.

use crate::telemetry::{KeyMetrics, Metrics};

/// The cache of a node, reporting into its metrics registry.
pub type Cache = crate::cache::Cache<Metrics>;

/// A cache entry carrying its key's metric handles.
pub type Entry = crate::cache::Entry<KeyMetrics>;

/// One downstream stream's (or follower's) watch of a key.
pub type Watcher = crate::cache::Watcher<KeyMetrics>;
