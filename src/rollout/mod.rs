//! Staged rollout per key, gated by the canaries' ACKs and NACKs.
//!
//! A key that a policy of the bootstrap's `rollout:` section matches gets lanes in its cache
//! entry ([`crate::cache::Lanes`]): its watchers are served a stable state, and a newer
//! version goes first to a few canary watchers. This module decides, per key, in one
//! controller task (under the node's tracker and token, ending with the entry):
//!
//! 1. a new version arrives: the canaries are chosen among the key's clients at that moment
//!    ([`canary::choose`]), unless the previous candidate's canaries are still there (they
//!    keep moving forward, never back);
//! 2. the gate ([`gate::decide`], a pure function) reads the canaries' ACKs and NACKs of the
//!    candidate (woken by each answer, not by polling) and the time since it reached them:
//!    **baking** until the bake is over and every canary answered; **promote**: every client
//!    is served it; **hold**: the rest keep the stable version, and with `rollback_canaries`
//!    the canaries are served the stable version again;
//! 3. an operator may promote or abort through the admin API ([`Rollouts::promote`],
//!    [`Rollouts::abort`]).
//!
//! Guarantees:
//! - a key no policy matches is served as before (every version to every client at once),
//!   with no lane and no task;
//! - the first version of a key is served to every client at once (there is nothing to
//!   protect), and so is a version that arrives while the key has no client on any node;
//! - a client that is not a canary never sees a version the gate did not promote;
//! - a client never gets an older version after a newer one, except a canary rolled back on
//!   a hold or an abort (or, on a follower, when the owner's next candidate fails this node's
//!   checks: the previous one is no longer offered anywhere): a SotW client gets the stable version's full state with a new nonce,
//!   a delta client gets the stable resources again and the names only the candidate had as
//!   removed;
//! - clients that join during a rollout are served the stable version; relay nodes following
//!   the key through this node are never canaries themselves (they are served the stable
//!   version as their stable state);
//! - in a cluster the key's owner decides once for every node: it forwards its candidate and
//!   its verdict beside its stable state; each follower's controller chooses canaries among
//!   its own clients, serves them the candidate, mirrors the owner's verdict and publishes its
//!   canaries' answers, which its stream to the owner reports; the owner's gate sums them with
//!   its own canaries' and promotes only once every follower reported on the candidate. A
//!   follower decides nothing ([`RolloutError::DecidedByOwner`]);
//! - every decision is logged, counted (`rollout_decisions_total{decision}`,
//!   `rollout_decision_seconds`), marked on the key's `rollout_held` gauge while held, and
//!   recorded on the version's trace.

pub mod canary;
pub mod config;
mod controller;
pub mod gate;

pub use config::{CanarySelection, KeyMatch, RolloutPolicy, RolloutSettings};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use regex::Regex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::StagedKeys;
use crate::cache::lanes::Answer;
use crate::config::ConfigError;
use crate::node_cache::Entry;
use crate::telemetry::Metrics;
use canary::Canaries;
use gate::GatePolicy;

/// A compiled policy.
#[derive(Debug)]
pub struct Policy {
    /// Its index in `rollout.policies`.
    pub index: usize,
    type_urls: Vec<String>,
    key_prefix: Option<String>,
    key_regex: Option<Regex>,
    canaries: Canaries,
    gate: GatePolicy,
    rollback_canaries: bool,
}

impl Policy {
    fn compile(index: usize, policy: &RolloutPolicy) -> Result<Self, ConfigError> {
        let path = format!("rollout.policies[{index}]");
        let key_regex = policy
            .keys
            .key_regex
            .as_deref()
            .map(|r| {
                Regex::new(r)
                    .map_err(|e| ConfigError::new("", format!("{path}.keys.key_regex"), format!("invalid regex: {e}")))
            })
            .transpose()?;
        Ok(Self {
            index,
            type_urls: policy.keys.type_urls.clone(),
            key_prefix: policy.keys.key_prefix.clone(),
            key_regex,
            canaries: Canaries::new(&policy.canary, &format!("{path}.canary"))?,
            gate: GatePolicy { bake: *policy.bake, max_nack_ratio: policy.max_nack_ratio },
            rollback_canaries: policy.rollback_canaries,
        })
    }

    /// Whether the policy applies to `key`, of `type_url`.
    pub fn matches(&self, key: &str, type_url: &str) -> bool {
        (self.type_urls.is_empty() || self.type_urls.iter().any(|t| t == type_url))
            && self.key_prefix.as_deref().is_none_or(|prefix| key.starts_with(prefix))
            && self.key_regex.as_ref().is_none_or(|regex| regex.is_match(key))
    }
}

/// Why an operator's step on a rollout was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// No rollout policy applies to the key, or it is not in the cache.
    #[error("key {key} has no staged rollout (no rollout policy applies to it, or it is not in the cache)")]
    UnknownKey {
        /// The key.
        key: String,
    },
    /// The key has no version in rollout.
    #[error("key {key} has no version in rollout: every client is served version {stable:?}")]
    NothingInRollout {
        /// The key.
        key: String,
        /// Its stable version.
        stable: String,
    },
    /// Another node owns the key and decides its rollout.
    #[error("the rollout of key {key} is decided by its owner node {owner:?}: promote or abort it there")]
    DecidedByOwner {
        /// The key.
        key: String,
        /// The owner's node name.
        owner: String,
    },
    /// The candidate was already aborted.
    #[error("version {version:?} of key {key} was already aborted; a newer version starts a new rollout")]
    AlreadyAborted {
        /// The key.
        key: String,
        /// The aborted version.
        version: String,
    },
}

/// The phase of a key's rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The candidate is on the canaries, the gate has not decided.
    Baking,
    /// The gate held the candidate.
    Held,
    /// An operator aborted the candidate.
    Aborted,
}

impl Phase {
    /// The phase's name, as the admin API and the status report show it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Baking => "baking",
            Self::Held => "held",
            Self::Aborted => "aborted",
        }
    }
}

/// One canary of a rollout, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct CanaryReport {
    /// Its node id.
    pub node_id: String,
    /// Its address (empty for a follower's canary).
    pub peer: String,
    /// The relay node it is a client of, when that is a follower of this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// `ack`, `nack` or `pending`.
    pub answer: &'static str,
    /// Its NACK message, when it NACKed the candidate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nack_message: Option<String>,
}

impl CanaryReport {
    fn new(node_id: String, peer: String, relay: Option<&str>, answer: Answer) -> Self {
        let label = answer.label();
        let nack_message = match answer {
            Answer::Nack(message) => Some(message),
            _ => None,
        };
        Self { node_id, peer, relay: relay.map(str::to_owned), answer: label, nack_message }
    }
}

/// What one follower node reported on the owner's candidate, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct FollowerReport {
    /// The follower's node name.
    pub follower: String,
    /// False until it reported on this candidate (the gate waits for it to promote).
    pub reported: bool,
    /// Its clients of the key that may be canaries.
    pub clients: u32,
    /// Its canaries served the candidate.
    pub canaries: u32,
    /// Those that ACKed it.
    pub acked: u32,
    /// Those that NACKed it.
    pub nacked: u32,
}

/// One key in rollout, for the admin API (`GET /rollout`).
#[derive(Debug, Clone, Serialize)]
pub struct RolloutReport {
    /// The aggregation key.
    pub key: String,
    /// Its type.
    pub type_url: String,
    /// The index of the policy in `rollout.policies`.
    pub policy: usize,
    /// The phase.
    pub phase: Phase,
    /// The version in rollout.
    pub candidate_version: String,
    /// The version every other client is served.
    pub stable_version: String,
    /// The canaries served the candidate now (none after a rollback).
    pub canaries: Vec<CanaryReport>,
    /// Canaries that ACKed the candidate (on every node, on the owner).
    pub acks: usize,
    /// Canaries that NACKed it.
    pub nacks: usize,
    /// On a follower: the owner node that decides the gate (this node's canaries' answers
    /// go to it; promote and abort are done there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by_owner: Option<String>,
    /// On the owner: each follower of the key and what it reported.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub followers: Vec<FollowerReport>,
    /// Seconds left in the bake (0 once over).
    pub bake_left_seconds: f64,
    /// Why the candidate is held or aborted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The rollouts of a node: its compiled policies and a controller per staged key.
pub struct Rollouts {
    policies: Vec<Arc<Policy>>,
    /// The controller of every staged key (a controller removes itself when it ends).
    keys: Arc<Mutex<KeyRollouts>>,
    metrics: Metrics,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").field("policies", &self.policies.len()).finish_non_exhaustive()
    }
}

type KeyRollouts = HashMap<String, Arc<controller::KeyRollout>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Rollouts {
    /// Compiles `settings`; controllers run under `tracker` and stop with `shutdown`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field when a policy is invalid.
    pub fn new(
        settings: &RolloutSettings,
        metrics: Metrics,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        settings.validate("rollout")?;
        let policies = settings
            .policies
            .iter()
            .enumerate()
            .map(|(i, p)| Policy::compile(i, p).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Self { policies, keys: Arc::default(), metrics, tracker, shutdown })
    }

    /// The policy that applies to `key` (the first that matches).
    pub fn policy_for(&self, key: &str, type_url: &str) -> Option<&Arc<Policy>> {
        self.policies.iter().find(|p| p.matches(key, type_url))
    }

    /// The cache's test of which keys get lanes.
    pub fn staged_keys(self: &Arc<Self>) -> StagedKeys {
        let rollouts = Arc::downgrade(self);
        Arc::new(move |key: &str, type_url: &str| {
            rollouts.upgrade().is_some_and(|rollouts| rollouts.policy_for(key, type_url).is_some())
        })
    }

    /// Starts the controller of a new entry that has lanes (does nothing for another).
    pub fn start(&self, entry: &Arc<Entry>) {
        let (Some(lanes), Some(policy)) = (entry.lanes(), self.policy_for(&entry.key, &entry.type_url)) else {
            return;
        };
        let rollout = Arc::new(controller::KeyRollout::new(entry, lanes.clone(), policy.clone(), self.metrics.clone()));
        lock(&self.keys).insert(entry.key.clone(), rollout.clone());
        let shutdown = self.shutdown.clone();
        let keys: Weak<Mutex<KeyRollouts>> = Arc::downgrade(&self.keys);
        self.tracker.spawn(async move {
            rollout.run(shutdown).await;
            if let Some(keys) = keys.upgrade() {
                let mut keys = lock(&keys);
                // A newer entry of the same key has its own controller.
                if keys.get(&rollout.key).is_some_and(|r| Arc::ptr_eq(r, &rollout)) {
                    keys.remove(&rollout.key);
                }
            }
        });
    }

    /// The keys in rollout (with a candidate version), sorted by key.
    pub fn report(&self) -> Vec<RolloutReport> {
        let mut reports: Vec<RolloutReport> = self.all().iter().filter_map(|r| r.report()).collect();
        reports.sort_by(|a, b| a.key.cmp(&b.key));
        reports
    }

    /// The rollout phase of `key`, when it has a version in rollout.
    pub fn phase(&self, key: &str) -> Option<Phase> {
        self.get(key).and_then(|r| r.phase())
    }

    /// Serves the candidate of `key` to every client; returns its version.
    ///
    /// # Errors
    /// When the key is unknown or has nothing in rollout.
    pub fn promote(&self, key: &str) -> Result<String, RolloutError> {
        self.get(key).ok_or_else(|| RolloutError::UnknownKey { key: key.to_owned() })?.promote_by_hand()
    }

    /// Keeps the stable version of `key` for everyone and rolls the canaries back to it; the
    /// candidate stays blocked until a newer version arrives. Returns the aborted version.
    ///
    /// # Errors
    /// When the key is unknown, has nothing in rollout, or its candidate was already aborted.
    pub fn abort(&self, key: &str) -> Result<String, RolloutError> {
        self.get(key).ok_or_else(|| RolloutError::UnknownKey { key: key.to_owned() })?.abort_by_hand()
    }

    fn get(&self, key: &str) -> Option<Arc<controller::KeyRollout>> {
        lock(&self.keys).get(key).filter(|r| r.is_live()).cloned()
    }

    fn all(&self) -> Vec<Arc<controller::KeyRollout>> {
        lock(&self.keys).values().filter(|r| r.is_live()).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    //! The controller over a real cache with staged keys, on paused time: the canaries' answers
    //! are recorded on their watchers as the streams record them.

    use std::time::Duration;

    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::Any;
    use prost::{Message as _, Name as _};

    use super::*;
    use crate::cache::lanes::{Answer, CanaryAnswer, CanaryTally, OwnerVerdict, Verdict};
    use crate::cache::{Attachment, ClientInfo, Interest};
    use crate::config::CacheConfig;
    use crate::node_cache::{Cache, Watcher};
    use crate::xds;

    const SETTINGS: &str = "
policies:
  - keys: { key_prefix: staged }
    canary: { fraction: 0.3 }
    bake: 10s
    rollback_canaries: true
";

    struct Fixture {
        rollouts: Arc<Rollouts>,
        cache: Cache,
        metrics: Metrics,
    }

    fn fixture(settings: &str) -> Fixture {
        let settings: RolloutSettings = serde_yaml_ng::from_str(settings).unwrap();
        let metrics = Metrics::new();
        let rollouts =
            Arc::new(Rollouts::new(&settings, metrics.clone(), TaskTracker::new(), CancellationToken::new()).unwrap());
        let cache = Cache::new(
            CacheConfig { ttl: Duration::from_secs(60).into(), max_entries: 0, persist_dir: None },
            metrics.clone(),
        )
        .with_staged_keys(rollouts.staged_keys());
        Fixture { rollouts, cache, metrics }
    }

    impl Fixture {
        fn watch(&self, key: &str, node_id: &str) -> Watcher {
            let node = Node { id: node_id.to_owned(), ..Node::default() };
            let client = ClientInfo { node_id: node_id.to_owned(), ..ClientInfo::default() };
            self.cache
                .watch(key, xds::CLUSTER, &node, client, Interest::wildcard(), |entry| self.rollouts.start(entry))
                .unwrap()
        }
    }

    impl Fixture {
        /// A watcher as the peer server registers another relay node following the key.
        fn watch_as_follower(&self, key: &str, follower: &str) -> Watcher {
            let node = Node { id: format!("relay:{follower}"), ..Node::default() };
            let client =
                ClientInfo { node_id: node.id.clone(), follower: Some(follower.to_owned()), ..ClientInfo::default() };
            self.cache
                .watch(key, xds::CLUSTER, &node, client, Interest::wildcard(), |entry| self.rollouts.start(entry))
                .unwrap()
        }
    }

    fn response(version: &str) -> DiscoveryResponse {
        let cluster = Cluster { name: format!("cluster-{version}"), ..Cluster::default() };
        let resource = Any { type_url: Cluster::type_url(), value: cluster.encode_to_vec() };
        DiscoveryResponse {
            type_url: xds::CLUSTER.to_owned(),
            version_info: version.to_owned(),
            resources: vec![resource],
            ..DiscoveryResponse::default()
        }
    }

    fn tally(generation: u64, version: &str, canaries: u32, acked: u32, nacked: u32) -> CanaryTally {
        let mut answers = Vec::new();
        if nacked > 0 {
            answers.push(CanaryAnswer { node_id: "envoy-9".into(), answer: Answer::Nack("unknown lb_policy".into()) });
        }
        CanaryTally {
            generation,
            version: version.to_owned(),
            clients: 3,
            canaries,
            acked,
            nacked,
            answers,
            cannot_try: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_owner_without_clients_of_its_own_gates_on_its_followers_tallies() {
        let f = fixture(SETTINGS);
        let follower = f.watch_as_follower("staged-k", "relay-2");
        publish(&follower, "v1");
        publish(&follower, "v2");
        settle().await;
        let lanes = follower.entry().lanes().unwrap().clone();
        let report = &f.rollouts.report()[0];
        assert_eq!(report.phase, Phase::Baking, "a follower's clients may be canaries: nothing is promoted yet");
        assert!(report.reason.as_deref().unwrap().contains("followers relay-2"), "{report:?}");
        assert!(!report.followers[0].reported);

        let generation = lanes.snapshot().generation;
        lanes.report_remote(follower.id(), "relay-2", tally(generation - 1, "v2", 1, 1, 0));
        settle().await;
        assert!(!f.rollouts.report()[0].followers[0].reported, "a tally on another generation does not count");
        lanes.report_remote(follower.id(), "relay-2", tally(generation, "v2", 1, 0, 0));
        settle().await;
        let report = &f.rollouts.report()[0];
        assert_eq!((report.phase, report.followers[0].canaries), (Phase::Baking, 1));
        lanes.report_remote(follower.id(), "relay-2", tally(generation, "v2", 1, 1, 0));
        settle().await;
        assert_eq!(
            (f.rollouts.report()[0].phase, f.rollouts.report()[0].acks),
            (Phase::Baking, 1),
            "the bake is not over"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(follower.entry().stable_state().version_info, "v2", "promoted on the follower's canary ACK");

        publish(&follower, "v3");
        settle().await;
        let generation = lanes.snapshot().generation;
        lanes.report_remote(follower.id(), "relay-2", tally(generation, "v3", 2, 0, 1));
        settle().await;
        let report = &f.rollouts.report()[0];
        assert_eq!(report.phase, Phase::Held);
        assert!(report.reason.as_deref().unwrap().contains("envoy-9 (relay-2): unknown lb_policy"), "{report:?}");
        assert_eq!(report.canaries[0].relay.as_deref(), Some("relay-2"));
        let snapshot = lanes.snapshot();
        assert!(!snapshot.offered && snapshot.verdict.is_some(), "the verdict is kept for the followers");

        // The follower's stream ends: its tally goes with it. It may be reconnecting with its
        // clients, so a version arriving within the grace waits for it; after the grace, with
        // no client anywhere, a version has nothing to protect.
        drop(follower);
        let entry = f.cache.get("staged-k").unwrap();
        assert!(lanes.remote_tallies().is_empty());
        publish_to(&entry, "v4");
        settle().await;
        assert_eq!(entry.stable_state().version_info, "v2", "the stable version stays");
        let report = &f.rollouts.report()[0];
        assert!(report.reason.as_deref().unwrap().contains("relay-2 (reconnecting)"), "{report:?}");
        tokio::time::sleep(controller::FOLLOWER_RETURN_GRACE).await;
        settle().await;
        assert_eq!(entry.stable_state().version_info, "v4");
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_serves_the_owners_candidate_to_its_own_canaries_and_reports_their_answers() {
        let f = fixture(SETTINGS);
        let watchers: Vec<Watcher> = (0..4).map(|i| f.watch("staged-k", &format!("node-{i}"))).collect();
        let entry = watchers[0].entry().clone();
        let lanes = entry.lanes().unwrap().clone();
        let forwarded = |version: &str| {
            entry.apply_forwarded(response(version), &Interest::wildcard(), Duration::ZERO, false, |_| {
                Attachment::default()
            })
        };
        let candidate = |version: &str, generation: u64| {
            entry.apply_forwarded_candidate(
                response(version),
                &Interest::wildcard(),
                Duration::ZERO,
                &OwnerVerdict { generation, verdict: None, rolled_back: false },
                |_| Attachment::default(),
            )
        };
        forwarded("v1").unwrap();
        candidate("v2", 40).unwrap();
        settle().await;
        let canaries: Vec<&Watcher> = watchers.iter().filter(|w| w.state().version_info == "v2").collect();
        assert_eq!(canaries.len(), 2, "ceil(0.3 × 4) canaries of this node's own");
        let published = lanes.subscribe_tally().borrow().clone().unwrap();
        assert_eq!((published.generation, published.version.as_str()), (40, "v2"));
        assert_eq!((published.clients, published.canaries, published.acked), (4, 2, 0));

        canaries[0].record_nack("v2", "unknown lb_policy");
        settle().await;
        let published = lanes.subscribe_tally().borrow().clone().unwrap();
        assert_eq!(published.nacked, 1);
        assert_eq!(published.answers[0].answer, Answer::Nack("unknown lb_policy".into()), "NACKs first");
        assert_eq!(f.rollouts.report()[0].phase, Phase::Baking, "the owner decides, not this node");
        assert!(matches!(f.rollouts.promote("staged-k"), Err(RolloutError::DecidedByOwner { .. })));
        assert!(matches!(f.rollouts.abort("staged-k"), Err(RolloutError::DecidedByOwner { .. })));

        let held = Verdict { aborted: false, reason: "1 of 2 canaries NACKed".into() };
        lanes.owner_verdict(&OwnerVerdict { generation: 40, verdict: Some(held), rolled_back: true });
        settle().await;
        assert_eq!(versions(&watchers), ["v1"; 4], "the owner's hold rolls this node's canaries back");
        let report = &f.rollouts.report()[0];
        assert_eq!((report.phase, report.reason.as_deref()), (Phase::Held, Some("1 of 2 canaries NACKed")));
        assert!(f.metrics.render().contains("xds_relay_rollout_held{key=\"staged-k\"} 1"));

        // The owner's next version, then its promotion: the promoted state arrives as the
        // stable state and the update carries no candidate.
        candidate("v3", 42).unwrap();
        settle().await;
        assert_eq!(watchers.iter().filter(|w| w.state().version_info == "v3").count(), 2);
        forwarded("v3").unwrap();
        lanes.end_candidate();
        settle().await;
        assert_eq!(versions(&watchers), ["v3"; 4]);
        assert!(f.rollouts.report().is_empty());
        assert!(f.metrics.render().contains("xds_relay_rollout_held{key=\"staged-k\"} 0"));
        assert!(!f.metrics.render().contains("xds_relay_rollout_decisions_total{"), "a follower decides nothing");

        // The key moves here while the owner's v4 is in rollout: this node's origin delivers
        // the very state it holds, and this node's gate takes the rollout over.
        candidate("v4", 44).unwrap();
        settle().await;
        assert!(lanes.follows_owner());
        entry.apply_response(response("v4"), &Interest::wildcard(), false, |_| Attachment::default()).unwrap();
        settle().await;
        assert!(!lanes.follows_owner(), "the origin's state makes the candidate this node's own");
        assert_eq!(f.rollouts.promote("staged-k").unwrap(), "v4", "decided here now");
    }

    fn publish(watcher: &Watcher, version: &str) {
        let cluster = Cluster { name: format!("cluster-{version}"), ..Cluster::default() };
        let resource = Any { type_url: Cluster::type_url(), value: cluster.encode_to_vec() };
        let response = DiscoveryResponse {
            type_url: xds::CLUSTER.to_owned(),
            version_info: version.to_owned(),
            resources: vec![resource],
            ..DiscoveryResponse::default()
        };
        watcher.entry().apply_response(response, &Interest::wildcard(), false, |_| Attachment::default()).unwrap();
    }

    /// Lets the controller run (time is paused: a sleep costs nothing).
    async fn settle() {
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn versions(watchers: &[Watcher]) -> Vec<String> {
        watchers.iter().map(|w| w.state().version_info.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_nacked_version_is_held_at_once_and_a_good_one_is_promoted_after_the_bake() {
        let f = fixture(SETTINGS);
        let watchers: Vec<Watcher> = (0..5).map(|i| f.watch("staged-k", &format!("node-{i}"))).collect();
        publish(&watchers[0], "v1");
        settle().await;
        assert_eq!(versions(&watchers), ["v1"; 5], "the first version goes to everyone");
        assert!(f.rollouts.report().is_empty());

        publish(&watchers[0], "v2");
        settle().await;
        let canaries: Vec<&Watcher> = watchers.iter().filter(|w| w.state().version_info == "v2").collect();
        assert_eq!(canaries.len(), 2, "ceil(0.3 × 5) canaries");
        let report = &f.rollouts.report()[0];
        assert_eq!(
            (report.phase, report.candidate_version.as_str(), report.stable_version.as_str()),
            (Phase::Baking, "v2", "v1")
        );

        canaries[0].record_nack("v2", "unsupported lb_policy MAGLEV");
        settle().await;
        let report = &f.rollouts.report()[0];
        assert_eq!(report.phase, Phase::Held, "one NACK over max_nack_ratio 0 holds at once");
        assert!(report.reason.as_deref().unwrap().contains("unsupported lb_policy MAGLEV"), "{report:?}");
        assert_eq!(versions(&watchers), ["v1"; 5], "held and rolled back: everyone on the stable version");
        assert_eq!(f.rollouts.phase("staged-k"), Some(Phase::Held));
        let metrics = f.metrics.render();
        assert!(metrics.contains("xds_relay_rollout_held{key=\"staged-k\"} 1"), "{metrics}");
        assert!(metrics.contains("xds_relay_rollout_decisions_total{decision=\"hold\"} 1"));

        // A newer version starts a new rollout on the same nodes (the choice follows node ids).
        publish(&watchers[0], "v3");
        settle().await;
        let canaries: Vec<&Watcher> = watchers.iter().filter(|w| w.state().version_info == "v3").collect();
        assert_eq!(canaries.len(), 2);
        assert!(f.metrics.render().contains("xds_relay_rollout_held{key=\"staged-k\"} 0"));
        for canary in &canaries {
            canary.record_ack("v3");
        }
        settle().await;
        assert_eq!(f.rollouts.report()[0].phase, Phase::Baking, "every canary ACKed, but the bake is not over");
        tokio::time::sleep(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(versions(&watchers), ["v3"; 5], "promoted after the bake");
        assert!(f.rollouts.report().is_empty());
        assert!(f.metrics.render().contains("xds_relay_rollout_decisions_total{decision=\"promote\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn with_node_match_a_version_waits_for_a_matching_client_and_is_never_held_for_lack_of_one() {
        let f = fixture(
            "
policies:
  - keys: { key_prefix: staged }
    canary: { node_match: { request_node_match: { id_match: { regex_match: \"^canary\" } } } }
    bake: 10s
",
        );
        let mut watchers = vec![f.watch("staged-k", "plain-0"), f.watch("staged-k", "plain-1")];
        publish(&watchers[0], "v1");
        publish(&watchers[0], "v2");
        settle().await;
        let report = &f.rollouts.report()[0];
        assert_eq!(report.phase, Phase::Baking, "no canary yet: it waits, it is not held");
        assert!(report.reason.as_deref().unwrap_or_default().contains("waiting for a client"), "{report:?}");
        assert_eq!(versions(&watchers), ["v1", "v1"]);

        // A matching client arrives: it is the canary, and its ACK passes the gate after the bake.
        watchers.push(f.watch("staged-k", "canary-0"));
        settle().await;
        assert_eq!(versions(&watchers), ["v1", "v1", "v2"]);
        watchers[2].record_ack("v2");
        tokio::time::sleep(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(versions(&watchers), ["v2"; 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_canaries_keep_it_baking_until_an_operator_promotes_or_aborts() {
        let f = fixture(SETTINGS);
        let watchers: Vec<Watcher> = (0..3).map(|i| f.watch("staged-k", &format!("node-{i}"))).collect();
        publish(&watchers[0], "v1");
        publish(&watchers[0], "v2");
        settle().await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        settle().await;
        let report = &f.rollouts.report()[0];
        assert_eq!((report.phase, report.bake_left_seconds), (Phase::Baking, 0.0), "no answer is no ACK");
        assert_eq!(report.canaries[0].answer, "pending");

        assert_eq!(f.rollouts.abort("staged-k").unwrap(), "v2");
        settle().await;
        assert_eq!(versions(&watchers), ["v1"; 3], "aborted: the canary is rolled back");
        assert_eq!(f.rollouts.report()[0].phase, Phase::Aborted);
        assert!(matches!(f.rollouts.abort("staged-k"), Err(RolloutError::AlreadyAborted { .. })));

        assert_eq!(f.rollouts.promote("staged-k").unwrap(), "v2");
        settle().await;
        assert_eq!(versions(&watchers), ["v2"; 3], "promoted by hand: everyone");
        assert!(matches!(f.rollouts.promote("staged-k"), Err(RolloutError::NothingInRollout { .. })));
        assert!(matches!(f.rollouts.promote("other"), Err(RolloutError::UnknownKey { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_no_policy_matches_has_no_lanes_and_a_version_without_clients_is_promoted() {
        let f = fixture(SETTINGS);
        let plain = f.watch("plain-k", "node-0");
        assert!(plain.entry().lanes().is_none(), "no policy: watchers follow the latest state");
        publish(&plain, "v1");
        assert_eq!(plain.state().version_info, "v1");

        let staged = f.watch("staged-k", "node-0");
        publish(&staged, "v1");
        let entry = staged.entry().clone();
        drop(staged);
        publish_to(&entry, "v2");
        settle().await;
        assert_eq!(entry.stable_state().version_info, "v2", "nobody to protect");
    }

    fn publish_to(entry: &Entry, version: &str) {
        let response = DiscoveryResponse {
            type_url: xds::CLUSTER.to_owned(),
            version_info: version.to_owned(),
            ..DiscoveryResponse::default()
        };
        entry.apply_response(response, &Interest::wildcard(), false, |_| Attachment::default()).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn each_watchers_receiver_follows_its_own_lane() {
        use tokio_stream::StreamExt as _;
        let f = fixture(SETTINGS);
        let watchers: Vec<Watcher> = (0..4).map(|i| f.watch("staged-k", &format!("node-{i}"))).collect();
        publish(&watchers[0], "v1");
        let mut receivers: Vec<_> = watchers.iter().map(Watcher::receiver).collect();
        let mut streams: Vec<_> = watchers.iter().map(|w| w.receiver().into_stream()).collect();
        for stream in &mut streams {
            assert_eq!(stream.next().await, Some(()), "a stream yields once at once");
        }
        assert!(receivers.iter_mut().all(|r| r.borrow_and_update().version_info == "v1"));

        publish(&watchers[0], "v2");
        settle().await;
        let mut canaries = 0;
        for (receiver, stream) in receivers.iter_mut().zip(&mut streams) {
            receiver.changed().await.unwrap();
            assert_eq!(stream.next().await, Some(()), "every watcher wakes on a change of the lanes");
            let version = receiver.borrow_and_update().version_info.clone();
            canaries += usize::from(version == "v2");
            assert!(version == "v1" || version == "v2");
        }
        assert_eq!(canaries, 2, "ceil(0.3 × 4)");

        let plain = f.watch("plain-k", "node-0");
        let mut receiver = plain.receiver();
        publish(&plain, "p1");
        receiver.changed().await.unwrap();
        assert_eq!(receiver.borrow_and_update().version_info, "p1", "no policy: the latest state");
    }

    #[test]
    fn a_bootstrap_error_in_the_rollout_section_names_the_file_and_the_field() {
        let base = "server: {address: {address: 127.0.0.1, port_value: 0}}\n\
                    origin_server: {address: {address: 127.0.0.1, port_value: 1}}\n\
                    cache: {ttl: 60s}\nadmin: {address: {address: 127.0.0.1, port_value: 0}}\n";
        let bad = format!("{base}rollout: {{policies: [{{canary: {{fraction: 0.5}}, bake: 0s}}]}}\n");
        let error = crate::config::parse_bootstrap(&bad, "bootstrap.yaml").unwrap_err();
        assert_eq!((error.file.as_str(), error.field.as_str()), ("bootstrap.yaml", "rollout.policies[0].bake"));
        let unknown = format!("{base}rollout: {{policies: [{{canary: {{fraction: 0.5}}, bake: 1s, bak: 2s}}]}}\n");
        let error = crate::config::parse_bootstrap(&unknown, "bootstrap.yaml").unwrap_err();
        assert!(error.field.starts_with("rollout.policies[0]"), "{error:?}");
        let good = format!("{base}rollout: {{policies: [{{canary: {{fraction: 0.5}}, bake: 1s}}]}}\n");
        let bootstrap = crate::config::parse_bootstrap(&good, "bootstrap.yaml").unwrap();
        assert_eq!(*bootstrap.rollout.unwrap().policies[0].bake, Duration::from_secs(1));
    }

    #[test]
    fn invalid_policies_name_their_field() {
        let cases = [
            ("policies: []", "rollout.policies"),
            ("policies: [{canary: {fraction: 0}, bake: 1s}]", "rollout.policies[0].canary.fraction"),
            ("policies: [{canary: {fraction: 0.5}, bake: 0s}]", "rollout.policies[0].bake"),
            (
                "policies: [{canary: {fraction: 0.5}, bake: 1s, max_nack_ratio: 1.5}]",
                "rollout.policies[0].max_nack_ratio",
            ),
            ("policies: [{canary: {}, bake: 1s}]", "rollout.policies[0].canary"),
            (
                "policies: [{keys: {key_regex: '('}, canary: {fraction: 1}, bake: 1s}]",
                "rollout.policies[0].keys.key_regex",
            ),
        ];
        for (yaml, field) in cases {
            let settings: RolloutSettings = serde_yaml_ng::from_str(yaml).unwrap();
            let error = settings.validate("rollout").unwrap_err();
            assert_eq!(error.field, field, "{yaml}: {error:?}");
        }
    }
}
