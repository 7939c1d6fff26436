//! A cache entry's place for its running source.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::{Freshness, Source};

/// Locks a mutex, recovering the data if a panicking thread poisoned it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a key's source answers, as the admin API shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SourceStatus {
    /// True while the key's source (origin stream or owner) answers.
    pub connected: bool,
    /// The origin or owner address in use.
    pub address: String,
    /// The last error of the source, if any.
    pub last_error: Option<String>,
    /// Responses received.
    pub responses: u64,
    /// True while the state was read from disk at start (or forwarded by an owner serving
    /// from disk) and no live source has delivered since.
    pub stale: bool,
}

/// The running source: the object that keeps it running (dropping it stops it), what it is,
/// and whether the entry has left the cache.
#[derive(Default)]
struct Running {
    handle: Option<Box<dyn Send>>,
    source: Option<Source>,
    retired: bool,
    /// The running source is a peer that has delivered a state since it started.
    peer_delivered: bool,
}

/// A pending refetch of a key through a new source; dropping it ends the refetch.
pub struct RefetchGuard(Arc<AtomicBool>);

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

/// A cache entry's source: the running one and what it is, whether it answers, the key's
/// refetches and the epochs of its origin streams.
///
/// Guarantees: at most one running source is installed at a time (a replaced one is handed
/// back to the caller, who stops it once the new one has delivered); once retired (the entry
/// left the cache) the running source is taken and every new one is refused, so no source
/// runs that nothing can reach.
#[derive(Default)]
pub struct SourceCell {
    running: Mutex<Running>,
    status: Mutex<SourceStatus>,
    /// True while a refetch through a new source (not the origin stream's refresh) is pending.
    refetching: Arc<AtomicBool>,
    /// When the admin API last started a refetch of the key.
    last_refetch: Mutex<Option<Instant>>,
    /// Which origin stream delivered the state (for followers switching to this node).
    pub freshness: Freshness,
    /// True while the state is last-known-good from disk, not yet confirmed by a live source.
    stale: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for SourceCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceCell").field("source", &self.current()).finish_non_exhaustive()
    }
}

impl SourceCell {
    /// Installs `source`, kept running by `handle`, and returns the previous handle without
    /// stopping it, so the caller can stop it once the new source has delivered
    /// (make-before-break).
    ///
    /// # Errors
    /// [`Retired`] when the entry has left the cache: `handle` is handed back and the caller
    /// must not run it (nothing could reach it or stop it).
    pub fn replace(&self, source: Source, handle: Box<dyn Send>) -> Result<Option<Box<dyn Send>>, Retired> {
        let mut running = lock(&self.running);
        if running.retired {
            return Err(Retired(handle));
        }
        running.source = Some(source);
        running.peer_delivered = false;
        Ok(running.handle.replace(handle))
    }

    /// Marks the entry as out of the cache and takes its running source (the caller drops it,
    /// which stops it); later [`SourceCell::replace`] calls are refused.
    pub fn retire(&self) -> Option<Box<dyn Send>> {
        let mut running = lock(&self.running);
        running.retired = true;
        running.source = None;
        running.handle.take()
    }

    /// True once the entry has left the cache (evicted, cleared or shut down).
    pub fn is_retired(&self) -> bool {
        lock(&self.running).retired
    }

    /// The running source; `None` before the first one starts and once retired.
    pub fn current(&self) -> Option<Source> {
        lock(&self.running).source.clone()
    }

    /// The admin API's label of the running source: `origin`, `peer:<node>`, or empty.
    pub fn label(&self) -> String {
        self.current().map(|s| s.label()).unwrap_or_default()
    }

    /// True when another node (the key's owner) is the running source.
    pub fn is_peer(&self) -> bool {
        lock(&self.running).source.as_ref().is_some_and(|s| matches!(s, Source::Peer { .. }))
    }

    /// Records that `source`, a peer, delivered a state (ignored when another source runs).
    pub fn peer_delivered(&self, source: &Source) {
        let mut running = lock(&self.running);
        if running.source.as_ref() == Some(source) {
            running.peer_delivered = true;
        }
    }

    /// True when the running source is a peer that has delivered since it started: a state
    /// of the origin now is a late one of a stream being retired (make-before-break is over).
    pub fn peer_has_delivered(&self) -> bool {
        let running = lock(&self.running);
        running.peer_delivered && running.source.as_ref().is_some_and(|s| matches!(s, Source::Peer { .. }))
    }

    /// True when the origin is the running source.
    pub fn is_origin(&self) -> bool {
        lock(&self.running).source.as_ref().is_some_and(Source::is_origin)
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

    /// True while a refetch through a new source is pending (see [`SourceCell::begin_refetch`]).
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

    /// Marks whether the source answers (a source that answers clears the last error). The
    /// `upstream_connected` gauge is set with it by [`super::Liveness`].
    pub fn set_connected(&self, connected: bool) {
        self.update_status(|s| {
            s.connected = connected;
            if connected {
                s.last_error = None;
            }
        });
    }

    /// Updates the status shown by the admin API.
    pub fn update_status(&self, f: impl FnOnce(&mut SourceStatus)) {
        f(&mut lock(&self.status));
    }

    /// The status.
    pub fn status(&self) -> SourceStatus {
        let mut status = lock(&self.status).clone();
        status.stale = self.is_stale();
        status
    }

    /// Marks the state as last-known-good from disk (`true`) or delivered by a live source
    /// (`false`); watchers of [`SourceCell::watch_stale`] wake only on a change.
    pub fn set_stale(&self, stale: bool) {
        self.stale.send_if_modified(|current| std::mem::replace(current, stale) != stale);
    }

    /// True while the state is last-known-good from disk and no live source has delivered.
    pub fn is_stale(&self) -> bool {
        *self.stale.borrow()
    }

    /// A receiver that wakes when the stale mark changes (an owner's feed to its followers).
    pub fn watch_stale(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stale.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_cell_refuses_new_sources_and_hands_back_the_running_one() {
        let cell = SourceCell::default();
        assert!(cell.replace(Source::Origin, Box::new(1u8)).unwrap().is_none());
        assert!(cell.is_origin());
        let previous = cell.replace(Source::Origin, Box::new(2u8)).unwrap();
        assert!(previous.is_some(), "the replaced source is handed back, still running");
        assert!(cell.retire().is_some());
        assert!(cell.is_retired());
        assert_eq!(cell.current(), None);
        assert_eq!(cell.label(), "");
        assert!(cell.replace(Source::Origin, Box::new(3u8)).is_err());
    }

    #[test]
    fn the_stale_mark_wakes_its_watchers_only_when_it_changes() {
        let cell = SourceCell::default();
        let mut stale = cell.watch_stale();
        assert!(!cell.is_stale() && !cell.status().stale);
        cell.set_stale(true);
        assert!(stale.has_changed().unwrap());
        assert!(*stale.borrow_and_update() && cell.status().stale);
        cell.set_stale(true);
        assert!(!stale.has_changed().unwrap(), "the same mark again wakes nobody");
        cell.set_stale(false);
        assert!(stale.has_changed().unwrap() && !cell.is_stale());
    }

    #[test]
    fn refetches_run_one_at_a_time() {
        let cell = SourceCell::default();
        let guard = cell.begin_refetch().expect("first refetch");
        assert!(cell.begin_refetch().is_none(), "a second one joins the first");
        drop(guard);
        assert!(!cell.is_refetching());
        assert!(cell.begin_refetch().is_some());
    }
}
