//! The writer of the store: the apply path hands it a key's newest state through a
//! latest-wins map, and one task writes them in batches.
//!
//! Invariants: [`Queue::put`] and [`Queue::remove`] take one short lock and never wait on the
//! disk; the map holds at most one pending change per key (a newer one replaces it), so its
//! memory is bounded by the number of keys; changes gather for [`COALESCE_WINDOW`] before a
//! batch is written, so a burst of updates to a key is one write; the task stops with the
//! node's token after writing what is pending (the node bounds its wait by the grace period).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Record, Store};
use crate::cache::KeyState;
use crate::telemetry::Metrics;

/// Most changes written between two directory syncs.
const BATCH: usize = 256;

/// How long the writer lets changes gather after a wake-up before writing: a key updated
/// many times within it is written once (latest wins), so an origin pushing bursts costs a
/// write per key per window, not per update. What a crash can lose is at most this window;
/// a shutdown writes everything pending.
pub const COALESCE_WINDOW: std::time::Duration = std::time::Duration::from_millis(250);

/// Locks a mutex, recovering the data if a panicking thread poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A change of one key's record waiting for the writer.
#[derive(Debug)]
pub enum Pending {
    /// Write this state (or remove the record when it must not be kept).
    Write {
        /// The key's type URL.
        type_url: String,
        /// The node the key is asked upstream with.
        node: Box<Node>,
        /// The state.
        state: Arc<KeyState>,
    },
    /// Remove the key's record.
    Remove,
}

/// The latest pending change of every key, and the writer's wake-up.
#[derive(Debug, Default)]
pub struct Queue {
    pending: Mutex<HashMap<String, Pending>>,
    wake: Notify,
}

impl Queue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `state` as the newest of `key` (replacing a change not written yet) and wakes
    /// the writer; never waits on the disk.
    pub fn put(&self, key: &str, type_url: &str, node: &Node, state: &Arc<KeyState>) {
        let change =
            Pending::Write { type_url: type_url.to_owned(), node: Box::new(node.clone()), state: state.clone() };
        self.set(key, change);
    }

    /// Records that `key`'s record must go (replacing a change not written yet).
    pub fn remove(&self, key: &str) {
        self.set(key, Pending::Remove);
    }

    fn set(&self, key: &str, change: Pending) {
        {
            let mut pending = lock(&self.pending);
            match pending.get_mut(key) {
                Some(slot) => *slot = change,
                None => {
                    pending.insert(key.to_owned(), change);
                }
            }
        }
        self.wake.notify_one();
    }

    /// Changes waiting for the writer.
    pub fn len(&self) -> usize {
        lock(&self.pending).len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes at most `max` pending changes.
    pub fn take(&self, max: usize) -> Vec<(String, Pending)> {
        let mut pending = lock(&self.pending);
        if pending.len() <= max {
            return pending.drain().collect();
        }
        let keys: Vec<String> = pending.keys().take(max).cloned().collect();
        keys.into_iter().filter_map(|key| pending.remove_entry(&key)).collect()
    }
}

/// Starts the writer under `tracker`: it writes what `queue` receives to `store` until
/// `shutdown`, then writes what is still pending and stops.
pub fn spawn(
    queue: Arc<Queue>,
    store: Arc<Store>,
    metrics: Metrics,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    let blocking = tracker.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = queue.wake.notified() => {}
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(COALESCE_WINDOW) => {}
            }
            drain(&queue, &store, &metrics, &blocking).await;
        }
        drain(&queue, &store, &metrics, &blocking).await;
        tracing::debug!(dir = %store.dir().display(), "last-known-good writer stopped");
    });
}

/// Writes every pending change, a batch at a time, on the blocking pool.
async fn drain(queue: &Arc<Queue>, store: &Arc<Store>, metrics: &Metrics, tracker: &TaskTracker) {
    loop {
        let batch = queue.take(BATCH);
        if batch.is_empty() {
            return;
        }
        let (batch_store, batch_metrics) = (store.clone(), metrics.clone());
        let written = tracker.spawn_blocking(move || write_batch(&batch_store, batch, &batch_metrics)).await;
        if let Err(e) = written {
            // A panicking batch is a bug: its changes are lost, the next ones are written.
            metrics.persist_write_errors.inc();
            tracing::error!(error = %e, "last-known-good batch failed");
        }
    }
}

/// Writes one batch and syncs the directory once; returns how many records were written.
/// Every failure is counted and never fatal; a batch logs its first failure with the number
/// of failures (a full disk fails every write, and says so once per batch).
pub fn write_batch(store: &Store, batch: Vec<(String, Pending)>, metrics: &Metrics) -> usize {
    let mut written = 0;
    let mut changed = false;
    let mut failures: Vec<super::PersistError> = Vec::new();
    for (key, change) in batch {
        let record = match &change {
            Pending::Write { type_url, node, state } => Record::of_state(&key, type_url, node, state),
            Pending::Remove => None,
        };
        match record {
            Some(record) => match store.write(&record) {
                Ok(()) => {
                    written += 1;
                    changed = true;
                    metrics.persist_writes.inc();
                }
                Err(error) => failures.push(error),
            },
            None => match store.remove(&key) {
                Ok(removed) => changed |= removed,
                Err(error) => failures.push(error),
            },
        }
    }
    if changed && let Err(error) = store.sync_dir() {
        failures.push(error);
    }
    if let Some(first) = failures.first() {
        metrics.persist_write_errors.inc_by(failures.len() as u64);
        tracing::warn!(error = %first, failures = failures.len(), "last-known-good records not updated");
    }
    written
}
