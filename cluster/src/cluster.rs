//! [`Cluster`]: the async shell around chitchat. Joins, gossips this node's state, and
//! publishes a [`ClusterView`] whenever membership, state or liveness changes.
//!
//! Role: one chitchat instance (its own gossip task) plus one *view task* that owns the
//! transition from chitchat's state to [`ClusterView`]s. The view task wakes on chitchat's
//! live-nodes watcher (a node joined, left or changed a key), on every gossip interval (deaths of
//! already-silent nodes, garbage-collected nodes and heartbeat ages are not always reported by
//! the watcher), and right after this node changes its own state. Each wake-up takes one
//! snapshot under the chitchat lock, folds it with the pure code in [`member`](crate::member) and
//! [`view`](crate::view), and publishes.
//!
//! The view task is tracked with the cluster's other tasks: with
//! [`ClusterConfig::gossip_seal`](crate::ClusterConfig::gossip_seal) set, chitchat runs over
//! the sealed transport (`sealed`), whose opener task and key file watcher are tracked there
//! too. [`Cluster::shutdown`] (or dropping the last handle) stops them all, and
//! [`Cluster::shutdown`] waits for them.
//!
//! Invariants:
//!
//! - The view watch fires only when [`ClusterView::version`] grows, never on heartbeats alone;
//!   [`Cluster::view`] always returns the latest refresh (ages, extra values) as well.
//! - A new subscriber ([`Cluster::watch`]) sees the current view at once: its first
//!   `changed()` returns immediately.
//! - The chitchat lock is held only to copy a snapshot or set a key, never across other awaits.
//! - [`Cluster::shutdown`] is bounded in time. Dropping every handle also stops gossip and the
//!   view task (the task holds no strong reference to the handle).
//! - [`Cluster::generation`] is strictly greater than any generation handed out before in this
//!   process, and is the start time in milliseconds, so it grows across restarts too.
//! - With [`ClusterConfig::require_verified_peers`], a member is verified only for the exact
//!   name, generation and peer address passed to [`Cluster::mark_verified`]; a new generation or
//!   a changed peer address needs a new verification. Marks of entries chitchat no longer
//!   knows are dropped.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::transport::{Transport, UdpTransport};
use chitchat::{Chitchat, ChitchatHandle, ChitchatId, Heartbeat, spawn_chitchat};
use tokio::sync::{Mutex, Notify, watch};
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::ClusterConfig;
use crate::error::ClusterError;
use crate::keyring::Keyring;
use crate::keys::{ADMIN_ADDR_KEY, NodeStateExt, PEER_ADDR_KEY, STATE_KEY, extra_key};
use crate::member::{Member, NodeState, fold_generations};
use crate::seal::GossipStats;
use crate::sealed::{SealShared, SealedTransport, watch_key_file};
use crate::view::ClusterView;

/// How long [`Cluster::shutdown`] waits for the gossip task before aborting it, and then for
/// the tracked tasks (view, sealed transport).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Values set with [`Cluster::set_key`] above this size are logged: gossip datagrams are
/// limited to 64 KiB for the whole node state.
const LARGE_VALUE_BYTES: usize = 1024;

/// A handle on this node's cluster membership. Cheap to clone; every clone is the same node.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    self_name: String,
    generation: u64,
    chitchat: Arc<Mutex<Chitchat>>,
    /// `None` once shut down.
    handle: StdMutex<Option<ChitchatHandle>>,
    view_tx: watch::Sender<Arc<ClusterView>>,
    /// Asks the view task to recompute now (after a local state change).
    refresh: Arc<Notify>,
    /// The view task and, when gossip is sealed, the sealed transport's tasks (opener, key
    /// file watcher); all end when `cancel` fires.
    tasks: TaskTracker,
    /// The sealed transport's keys and counters; `None` when gossip is plaintext.
    seal: Option<Arc<SealShared>>,
    cancel: CancellationToken,
    /// `None` when the cluster does not require verification.
    verified: Option<Arc<StdMutex<HashSet<VerifiedEntry>>>>,
}

/// A member entry vouched for by [`Cluster::mark_verified`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VerifiedEntry {
    name: String,
    generation: u64,
    peer_addr: SocketAddr,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The view task holds no reference to `Inner`; tell it the owner is gone. Dropping the
        // chitchat handle (a field) stops the gossip task.
        self.cancel.cancel();
    }
}

// === impl Cluster ===

impl Cluster {
    /// Joins the cluster over UDP: binds `gossip_listen`, gossips `joining` with this node's
    /// peer and admin addresses, and starts the view task.
    ///
    /// With [`ClusterConfig::gossip_seal`] set, every datagram is sealed under the key file's
    /// keys (see [`seal`](crate::seal)) and the key file is re-read while the node runs.
    ///
    /// # Errors
    ///
    /// [`ClusterError::InvalidConfig`] if the config does not validate,
    /// [`ClusterError::Keyring`] if the key file cannot be read or holds an invalid key,
    /// [`ClusterError::Transport`] if the UDP socket cannot be bound.
    pub async fn join(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        let Some(seal) = config.gossip_seal.clone() else {
            return Self::join_with_transport(config, &UdpTransport).await;
        };
        config.validate()?;
        let text = Keyring::read(&seal.keys_file)?;
        let keyring = Keyring::parse(&text, &seal.keys_file)?;
        info!(file = %seal.keys_file.display(), keys = keyring.len(), key_ids = ?keyring.key_ids(), "gossip is sealed");
        let shared = Arc::new(SealShared::new(keyring, &config.cluster_id, seal.replay_window));
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(watch_key_file(seal.keys_file, text, seal.reload_interval, shared.clone(), cancel.clone()));
        let transport = SealedTransport::new(shared.clone(), tasks.clone(), cancel.clone());
        let joined = Self::start(config, &transport, cancel.clone(), tasks, Some(shared)).await;
        if joined.is_err() {
            cancel.cancel();
        }
        joined
    }

    /// Like [`Cluster::join`] over any chitchat transport; tests use chitchat's in-memory
    /// `ChannelTransport`, whose links can be cut and whose messages can be dropped.
    ///
    /// # Errors
    ///
    /// As [`Cluster::join`].
    pub async fn join_with_transport(
        config: ClusterConfig,
        transport: &dyn Transport,
    ) -> Result<Cluster, ClusterError> {
        Self::start(config, transport, CancellationToken::new(), TaskTracker::new(), None).await
    }

    async fn start(
        config: ClusterConfig,
        transport: &dyn Transport,
        cancel: CancellationToken,
        tasks: TaskTracker,
        seal: Option<Arc<SealShared>>,
    ) -> Result<Cluster, ClusterError> {
        config.validate()?;
        let generation = next_generation();
        let chitchat_config = config.to_chitchat(generation);
        let self_id = chitchat_config.chitchat_id.clone();
        info!(
            node = %config.node_name,
            cluster_id = %config.cluster_id,
            generation,
            gossip_listen = %config.gossip_listen,
            gossip_advertise = %config.gossip_advertise,
            peer_advertise = %config.peer_advertise,
            admin_advertise = %config.admin_advertise,
            seeds = ?config.seeds,
            "joining cluster"
        );
        let initial_key_values = vec![
            (STATE_KEY.to_string(), NodeState::Joining.to_string()),
            (PEER_ADDR_KEY.to_string(), config.peer_advertise.to_string()),
            (ADMIN_ADDR_KEY.to_string(), config.admin_advertise.to_string()),
        ];
        let handle = spawn_chitchat(chitchat_config, initial_key_values, transport)
            .await
            .map_err(|error| ClusterError::Transport { listen_addr: config.gossip_listen, source: error.into() })?;
        let chitchat = handle.chitchat();
        let live_nodes = chitchat.lock().await.live_nodes_watcher();

        let verified = config.require_verified_peers.then(|| Arc::new(StdMutex::new(HashSet::new())));
        let mut observer = Observer::new(self_id, verified.clone());
        let (members, unverified) = observer.observe(&chitchat).await;
        let (view_tx, _) =
            watch::channel(Arc::new(ClusterView::new(members, config.virtual_nodes, 1).with_unverified(unverified)));
        let refresh = Arc::new(Notify::new());
        tasks.spawn(
            ViewTask {
                chitchat: chitchat.clone(),
                live_nodes,
                observer,
                view_tx: view_tx.clone(),
                refresh: refresh.clone(),
                cancel: cancel.clone(),
                tick: config.gossip_interval,
            }
            .run(),
        );
        Ok(Cluster {
            inner: Arc::new(Inner {
                self_name: config.node_name,
                generation,
                chitchat,
                handle: StdMutex::new(Some(handle)),
                view_tx,
                refresh,
                tasks,
                seal,
                cancel,
                verified,
            }),
        })
    }

    /// This node's name.
    pub fn self_name(&self) -> &str {
        &self.inner.self_name
    }

    /// This node's generation: its start time in milliseconds, strictly greater than any
    /// generation used before by this process (and, clocks permitting, by earlier runs).
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// The latest view, including the latest heartbeat ages and extra values.
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.view_tx.borrow().clone()
    }

    /// A receiver of views. It changes when membership, state or liveness changes (not on
    /// heartbeats); its first `changed()` returns at once with the current view.
    pub fn watch(&self) -> watch::Receiver<Arc<ClusterView>> {
        let mut receiver = self.inner.view_tx.subscribe();
        receiver.mark_changed();
        receiver
    }

    /// Counts of the sealed gossip transport: datagrams sent and received, and datagrams
    /// dropped by reason. All zero (and `sealed: false`) when gossip is plaintext.
    pub fn gossip_stats(&self) -> GossipStats {
        self.inner.seal.as_ref().map_or_else(GossipStats::default, |seal| seal.counters.snapshot(&seal.keyring.load()))
    }

    /// Gossips this node's lifecycle state: `joining → ready` puts it on the ring (it already
    /// gossips its peer address), `ready → draining` takes it off while it keeps serving.
    /// Any transition is allowed; the local view reflects it at once, peers within a few
    /// gossip rounds.
    pub async fn set_state(&self, state: NodeState) {
        self.inner.chitchat.lock().await.self_node_state().set(STATE_KEY, state.as_str());
        info!(node = %self.inner.self_name, %state, "node state set");
        self.inner.refresh.notify_one();
    }

    /// Gossips a small extra value under `key` (e.g. a per-node counter). Peers read it in
    /// [`Member::extra`]. Keep values small: the whole node state shares one 64 KiB datagram.
    /// Extra values never collide with the crate's own keys and do not bump the view version.
    pub async fn set_key(&self, key: &str, value: &str) {
        if key.len() + value.len() > LARGE_VALUE_BYTES {
            warn!(key, bytes = value.len(), "large gossip value; keep gossiped values small");
        }
        self.inner.chitchat.lock().await.self_node_state().set(extra_key(key), value);
        self.inner.refresh.notify_one();
    }

    /// Vouches that the member entry `name` of `generation` gossiping `peer_addr` is that member
    /// (the caller checked, e.g. by its certificate); with
    /// [`ClusterConfig::require_verified_peers`] the entry may then win its name and join the
    /// ring. Without that setting every entry counts as verified and this does nothing.
    pub fn mark_verified(&self, name: &str, generation: u64, peer_addr: SocketAddr) {
        let Some(verified) = &self.inner.verified else { return };
        let entry = VerifiedEntry { name: name.to_owned(), generation, peer_addr };
        if verified.lock().unwrap_or_else(PoisonError::into_inner).insert(entry) {
            info!(node = name, generation, %peer_addr, "cluster member verified");
            self.inner.refresh.notify_one();
        }
    }

    /// Whether this cluster keeps members off the ring until they are verified.
    pub fn requires_verification(&self) -> bool {
        self.inner.verified.is_some()
    }

    /// Stops gossip and the tracked tasks (view, sealed transport), waiting at most about 2 s
    /// for gossip and 2 s for the others. Peers see this
    /// node go silent and declare it dead (there is no goodbye message: set
    /// [`NodeState::Draining`] first for a graceful exit). Other clones of the handle keep
    /// returning the last view.
    pub async fn shutdown(self) {
        let inner = &self.inner;
        inner.cancel.cancel();
        let handle = inner.handle.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle {
            let _ = handle.initiate_shutdown();
            match timeout(SHUTDOWN_TIMEOUT, handle.termination_watcher()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => warn!(%error, "gossip task ended with an error"),
                Err(_) => {
                    warn!("gossip task did not stop in time; aborting it");
                    handle.abort();
                }
            }
        }
        inner.tasks.close();
        if timeout(SHUTDOWN_TIMEOUT, inner.tasks.wait()).await.is_err() {
            warn!("the view or sealed gossip tasks did not stop in time");
        }
        info!(node = %inner.self_name, "left cluster");
    }
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("self_name", &self.inner.self_name)
            .field("generation", &self.inner.generation)
            .field("version", &self.inner.view_tx.borrow().version)
            .finish()
    }
}

/// The next generation: now in milliseconds since the epoch, but strictly greater than the
/// previous one handed out in this process (two nodes started in the same millisecond, or a
/// clock step backwards).
fn next_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let previous = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| Some(now_ms.max(last + 1)))
        .unwrap_or_else(|last| last);
    now_ms.max(previous + 1)
}

// === impl Observer ===

/// Turns chitchat's state into members; remembers when each node's heartbeat last advanced.
struct Observer {
    self_id: ChitchatId,
    heartbeats: HashMap<ChitchatId, (Heartbeat, Instant)>,
    verified: Option<Arc<StdMutex<HashSet<VerifiedEntry>>>>,
}

impl Observer {
    fn new(self_id: ChitchatId, verified: Option<Arc<StdMutex<HashSet<VerifiedEntry>>>>) -> Self {
        Observer { self_id, heartbeats: HashMap::new(), verified }
    }

    /// One snapshot of chitchat, folded to one member per name, with the unverified entries
    /// hidden behind a member of the same name.
    async fn observe(&mut self, chitchat: &Mutex<Chitchat>) -> (Vec<Member>, Vec<Member>) {
        let now = Instant::now();
        let chitchat = chitchat.lock().await;
        let verified = self.verified.as_ref().map(|v| v.lock().unwrap_or_else(PoisonError::into_inner).clone());
        let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
        let mut entries = Vec::with_capacity(chitchat.node_states().len());
        for (id, state) in chitchat.node_states() {
            let is_self = *id == self.self_id;
            let last_heartbeat_age_ms = if is_self { None } else { self.heartbeat_age(id, state.heartbeat(), now) };
            let peer_addr = state.peer_addr();
            let verified = is_self
                || verified.as_ref().is_none_or(|set| {
                    peer_addr.is_some_and(|peer_addr| {
                        set.contains(&VerifiedEntry {
                            name: id.node_id.to_string(),
                            generation: id.generation_id,
                            peer_addr,
                        })
                    })
                });
            entries.push(Member {
                name: id.node_id.to_string(),
                generation: id.generation_id,
                gossip_addr: id.gossip_advertise_addr,
                peer_addr,
                admin_addr: state.admin_addr(),
                state: state.relay_state(),
                alive: is_self || live.contains(id),
                is_self,
                last_heartbeat_age_ms,
                extra: state.extra(),
                verified,
            });
        }
        self.heartbeats.retain(|id, _| chitchat.node_states().contains_key(id));
        if let Some(verified) = &self.verified {
            let known: HashSet<(&str, u64)> =
                chitchat.node_states().keys().map(|id| (&*id.node_id, id.generation_id)).collect();
            verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|v| known.contains(&(v.name.as_str(), v.generation)));
        }
        drop(chitchat);
        fold_generations(entries)
    }

    /// Milliseconds since `heartbeat` was first seen for `id`; `None` while it is 0 (never
    /// heard from the node itself, only of it).
    fn heartbeat_age(&mut self, id: &ChitchatId, heartbeat: Heartbeat, now: Instant) -> Option<u64> {
        if u64::from(heartbeat) == 0 {
            return None;
        }
        let seen = self.heartbeats.entry(id.clone()).or_insert((heartbeat, now));
        if seen.0 != heartbeat {
            *seen = (heartbeat, now);
        }
        Some(now.duration_since(seen.1).as_millis() as u64)
    }
}

// === impl ViewTask ===

/// The background task that publishes views.
struct ViewTask {
    chitchat: Arc<Mutex<Chitchat>>,
    live_nodes: watch::Receiver<std::collections::BTreeMap<ChitchatId, chitchat::NodeState>>,
    observer: Observer,
    view_tx: watch::Sender<Arc<ClusterView>>,
    refresh: Arc<Notify>,
    cancel: CancellationToken,
    tick: Duration,
}

impl ViewTask {
    async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => break,
                changed = self.live_nodes.changed() => if changed.is_err() { break },
                () = self.refresh.notified() => {}
                _ = ticker.tick() => {}
            }
            let (members, unverified) = self.observer.observe(&self.chitchat).await;
            let current = self.view_tx.borrow().clone();
            let (next, changed) = current.next(members, unverified);
            if changed {
                log_change(&current, &next);
            }
            self.view_tx.send_if_modified(|view| {
                *view = Arc::new(next);
                changed
            });
        }
        debug!("view task stopped");
    }
}

/// Logs what changed between two views, one line per member and one for the ring.
fn log_change(old: &ClusterView, new: &ClusterView) {
    for member in &new.members {
        match old.member(&member.name) {
            Some(before) if before.same_topology(member) => {}
            before => info!(
                node = %member.name,
                generation = member.generation,
                state = %member.state,
                alive = member.alive,
                was_alive = before.map(|b| b.alive),
                was_state = before.map(|b| b.state.as_str()),
                "cluster member changed"
            ),
        }
    }
    for member in old.members.iter().filter(|m| new.member(&m.name).is_none()) {
        info!(node = %member.name, "cluster member forgotten");
    }
    for entry in new.unverified.iter().filter(|e| !old.unverified.iter().any(|o| o.same_topology(e))) {
        warn!(
            node = %entry.name,
            generation = entry.generation,
            gossip_addr = %entry.gossip_addr,
            peer_addr = ?entry.peer_addr,
            alive = entry.alive,
            "unverified member entry kept off the ring"
        );
    }
    info!(version = new.version, ring = ?new.ring.members(), members = new.members.len(), "cluster view changed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_strictly_increase() {
        let mut previous = next_generation();
        for _ in 0..1_000 {
            let next = next_generation();
            assert!(next > previous);
            previous = next;
        }
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(previous >= now_ms - 60_000, "close to the wall clock");
    }
}
