//! The watchers of a key: one per downstream stream, each with its own client status slot
//! that the admin API reads as a snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::sync::watch;
use tokio::time::Instant;

use super::hooks::KeyHooks;
use super::lanes::Served;
use super::{Entry, Interest, KeyState, lock};
use crate::limit::LimitRefusal;

/// What the admin API shows about one downstream client of a key.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientStatus {
    /// Set when the client is another relay node following this key: its node name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follower: Option<String>,
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

/// One watcher's client status: its identity, fixed at registration, and its progress,
/// written only by the watcher's own stream (so its lock is never contended on the send
/// path) and read by the admin API.
#[derive(Debug)]
pub(super) struct ClientSlot {
    client: ClientInfo,
    /// The client's node, kept only on a key with lanes (the canary choice reads it).
    node: Option<Arc<Node>>,
    progress: Mutex<Progress>,
}

/// What changes in a client's status while its stream runs.
#[derive(Debug, Default)]
struct Progress {
    /// The watcher's interest (shared with it, not a copy).
    pub(super) interest: Interest,
    acked_version: String,
    sent_version: String,
    nacks: u64,
    last_nack: Option<NackRecord>,
}

impl ClientSlot {
    pub(super) fn node(&self) -> Option<Arc<Node>> {
        self.node.clone()
    }

    pub(super) fn snapshot(&self) -> ClientStatus {
        let progress = lock(&self.progress);
        ClientStatus {
            follower: self.client.follower.clone(),
            node_id: self.client.node_id.clone(),
            node_cluster: self.client.node_cluster.clone(),
            peer: self.client.peer.clone(),
            resource_names: display_names(&progress.interest),
            acked_version: progress.acked_version.clone(),
            sent_version: progress.sent_version.clone(),
            nacks: progress.nacks,
            last_nack: progress.last_nack.clone(),
        }
    }
}

/// Replaces `slot` with `value`, reusing its buffer (no allocation once it is large enough).
fn set_string(slot: &mut String, value: &str) {
    if slot != value {
        slot.clear();
        slot.push_str(value);
    }
}

/// The watchers of an entry: their status slots, and the relay nodes among them.
#[derive(Default)]
pub(super) struct Registry {
    pub(super) slots: HashMap<u64, Arc<ClientSlot>>,
    /// Follower node name → number of its watchers.
    pub(super) followers: BTreeMap<String, usize>,
}

impl Registry {
    /// Adds the slot of watcher `id`, counting it under its follower node if it has one.
    pub(super) fn add(&mut self, id: u64, slot: Arc<ClientSlot>) {
        if let Some(follower) = &slot.client.follower {
            *self.followers.entry(follower.clone()).or_default() += 1;
        }
        self.slots.insert(id, slot);
    }

    /// Removes the slot of watcher `id` (and its follower count); returns the follower node's
    /// name when this was its last watcher.
    pub(super) fn remove(&mut self, id: u64) -> Option<String> {
        let slot = self.slots.remove(&id)?;
        let follower = slot.client.follower.as_ref()?;
        let count = self.followers.get_mut(follower)?;
        *count -= 1;
        if *count > 0 {
            return None;
        }
        self.followers.remove(follower);
        Some(follower.clone())
    }
}

/// Identity of a watcher inside its entry.
static NEXT_WATCHER_ID: AtomicU64 = AtomicU64::new(1);

// === impl Watcher ===

/// One downstream stream's interest in a key. Dropping it unregisters the stream.
pub struct Watcher<K: KeyHooks> {
    pub(super) entry: Arc<Entry<K>>,
    pub(super) id: u64,
    pub(super) interest: Interest,
    pub(super) slot: Arc<ClientSlot>,
    /// When the watcher last asked for names it did not want before.
    pub(super) since: Instant,
}

impl<K: KeyHooks> std::fmt::Debug for Watcher<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").field("key", &self.entry.key).field("id", &self.id).finish()
    }
}

impl<K: KeyHooks> Watcher<K> {
    /// Registers a watcher of `entry` for `client` wanting `interest` (already counted in
    /// the entry's union), with its own status slot.
    pub(super) fn register(entry: Arc<Entry<K>>, client: ClientInfo, node: &Node, interest: Interest) -> Self {
        let id = NEXT_WATCHER_ID.fetch_add(1, Ordering::Relaxed);
        let node = entry.lanes().map(|_| Arc::new(node.clone()));
        let slot = Arc::new(ClientSlot {
            client,
            node,
            progress: Mutex::new(Progress { interest: interest.clone(), ..Progress::default() }),
        });
        entry.register(id, slot.clone());
        entry.metrics.client_joined();
        Self { entry, id, interest, slot, since: Instant::now() }
    }

    /// The watched entry.
    pub fn entry(&self) -> &Arc<Entry<K>> {
        &self.entry
    }

    /// The watcher's id in its entry.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A receiver of the states this watcher is served.
    pub fn receiver(&self) -> StateReceiver {
        let kind = match self.entry.lanes() {
            Some(lanes) => ReceiverKind::Lanes(lanes.subscribe()),
            None => ReceiverKind::Latest(self.entry.state.subscribe()),
        };
        StateReceiver { id: self.id, kind }
    }

    /// The state this watcher is served now: the key's latest state, or on a key in a staged
    /// rollout, the candidate for a canary and the stable state for the others.
    pub fn state(&self) -> Arc<KeyState> {
        match self.entry.lanes() {
            Some(lanes) => lanes.served().for_watcher(self.id).clone(),
            None => self.entry.state(),
        }
    }

    /// The names this watcher wants.
    pub fn interest(&self) -> &Interest {
        &self.interest
    }

    /// Changes the names this watcher wants; the upstream union follows. The watcher keeps
    /// them with the entry's shared names: read [`Watcher::interest`] back to share them too.
    ///
    /// # Errors
    /// [`LimitRefusal::NamesPerKey`] when the new names would take the key's union past
    /// `limits.max_names_per_key`; the watcher keeps its previous interest (and the key's
    /// other watchers theirs).
    pub fn set_interest(&mut self, interest: Interest) -> Result<(), LimitRefusal> {
        if interest == self.interest {
            return Ok(());
        }
        let interest = self.entry.change_interest(Some(&self.interest), Some(&interest))?.unwrap_or(interest);
        if !self.interest.covers(&interest) {
            self.since = Instant::now();
        }
        self.interest = interest.clone();
        self.with_status(|s| s.interest = interest);
        Ok(())
    }

    /// When the watcher last asked for names it did not want before: a `do_not_cache`
    /// resource that arrived earlier must not be served to it ([`KeyState::fresh_for`]).
    pub fn since(&self) -> Instant {
        self.since
    }

    /// True when `state` may be served to this watcher now (see [`KeyState::fresh_for`]).
    pub fn may_receive(&self, state: &KeyState) -> bool {
        state.fresh_for(&self.interest, self.since)
    }

    /// Records that `version` was sent to the client (touches only this watcher's slot).
    pub fn record_sent(&self, version: &str) {
        self.with_status(|s| set_string(&mut s.sent_version, version));
    }

    /// Records an ACK of `version` (touches only this watcher's slot).
    pub fn record_ack(&self, version: &str) {
        self.entry.metrics.acked();
        self.with_status(|s| set_string(&mut s.acked_version, version));
        if let Some(lanes) = self.entry.lanes() {
            lanes.answered(self.id);
        }
    }

    /// Records a NACK of `rejected_version` with the client's message.
    pub fn record_nack(&self, rejected_version: &str, message: &str) {
        self.entry.metrics.nacked();
        let at_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.with_status(|s| {
            s.nacks += 1;
            s.last_nack = Some(NackRecord {
                rejected_version: rejected_version.to_owned(),
                message: message.to_owned(),
                at_unix,
            });
        });
        if let Some(lanes) = self.entry.lanes() {
            lanes.answered(self.id);
        }
    }

    fn with_status(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.slot.progress));
    }
}

impl<K: KeyHooks> Drop for Watcher<K> {
    fn drop(&mut self) {
        self.entry.unregister(self.id);
        self.entry.remove_watcher();
        self.entry.metrics.client_left();
        // Removing names never exceeds a limit.
        let _ = self.entry.change_interest(Some(&self.interest), None);
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
    /// Set when the client is another relay node following this key: its node name.
    pub follower: Option<String>,
}

// === impl StateReceiver ===

/// A receiver of the states one watcher is served (see [`Watcher::receiver`]).
#[derive(Debug)]
pub struct StateReceiver {
    id: u64,
    kind: ReceiverKind,
}

#[derive(Debug)]
enum ReceiverKind {
    /// The key's latest state, served to every watcher.
    Latest(watch::Receiver<Arc<KeyState>>),
    /// The key's lanes: this watcher's state is picked by its id.
    Lanes(watch::Receiver<Arc<Served>>),
}

impl StateReceiver {
    /// Waits for a change of what the key's watchers are served.
    ///
    /// # Errors
    /// When the entry is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        match &mut self.kind {
            ReceiverKind::Latest(rx) => rx.changed().await,
            ReceiverKind::Lanes(rx) => rx.changed().await,
        }
    }

    /// The state this watcher is served now, marked seen.
    pub fn borrow_and_update(&mut self) -> Arc<KeyState> {
        match &mut self.kind {
            ReceiverKind::Latest(rx) => rx.borrow_and_update().clone(),
            ReceiverKind::Lanes(rx) => rx.borrow_and_update().for_watcher(self.id).clone(),
        }
    }

    /// A stream yielding once now and once per change (what a stream task waits on).
    pub fn into_stream(self) -> StateStream {
        match self.kind {
            ReceiverKind::Latest(rx) => StateStream::Latest(tokio_stream::wrappers::WatchStream::new(rx)),
            ReceiverKind::Lanes(rx) => StateStream::Lanes(tokio_stream::wrappers::WatchStream::new(rx)),
        }
    }
}

/// The wake-ups of a [`StateReceiver`] as a stream: one item now, then one per change
/// (intermediate changes fold into one, latest wins).
pub enum StateStream {
    /// Over the key's latest state.
    Latest(tokio_stream::wrappers::WatchStream<Arc<KeyState>>),
    /// Over the key's lanes.
    Lanes(tokio_stream::wrappers::WatchStream<Arc<Served>>),
}

impl tokio_stream::Stream for StateStream {
    type Item = ();

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<()>> {
        match self.get_mut() {
            Self::Latest(stream) => std::pin::Pin::new(stream).poll_next(cx).map(|item| item.map(|_| ())),
            Self::Lanes(stream) => std::pin::Pin::new(stream).poll_next(cx).map(|item| item.map(|_| ())),
        }
    }
}
