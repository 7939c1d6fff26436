//! How a node joins the cluster: [`ClusterConfig`] and [`FailureDetectorSettings`].
//!
//! Role: hold the settings, give defaults that were measured on this code (see
//! [`FailureDetectorSettings::for_gossip_interval`]), validate them, and translate them into
//! chitchat's `ChitchatConfig`, which has no `Default` and takes every field explicitly.
//!
//! Invariants:
//!
//! - A config that passed [`ClusterConfig::validate`] can always be turned into a chitchat config;
//!   [`Cluster::join`](crate::Cluster::join) validates before it opens any socket.
//! - The gossip advertise address is a concrete address (no port 0, no `0.0.0.0`): it is part of
//!   the node's identity in chitchat and peers send datagrams to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig, ProtocolVersion};

use crate::error::ClusterError;

/// The default period of a gossip round.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(200);
/// The default number of virtual nodes per member on the ring (3 nodes × 30 000 keys stay
/// within a few percent of the ideal share; see the ring tests).
pub const DEFAULT_VIRTUAL_NODES: u32 = 128;
/// How many heartbeat intervals the failure detector keeps per node.
const SAMPLING_WINDOW_SIZE: usize = 1_000;
/// How long tombstones of deleted keys are kept before they are garbage collected.
const MARKED_FOR_DELETION_GRACE_PERIOD: Duration = Duration::from_secs(60 * 60);

/// Settings of chitchat's phi-accrual failure detector.
///
/// Chitchat declares a peer dead when the time since its last observed heartbeat exceeds
/// `phi_threshold` times the mean observed heartbeat interval. That mean starts at
/// `initial_interval` (a prior worth 5 samples) and converges to the real interval, so
/// `initial_interval` bounds how fast a *young* node is declared dead, and the measured
/// interval how fast an established one is.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureDetectorSettings {
    /// Phi above which a node is declared dead (chitchat's phi is "intervals without a
    /// heartbeat"). Default 8.
    pub phi_threshold: f64,
    /// The prior mean heartbeat interval, used until real intervals are sampled.
    pub initial_interval: Duration,
    /// Heartbeat intervals longer than this are not sampled (a node returning from a
    /// partition does not inflate the mean).
    pub max_interval: Duration,
    /// How long a dead node stays listed (as `alive = false`) before it is forgotten.
    pub dead_node_grace_period: Duration,
}

impl FailureDetectorSettings {
    /// Settings scaled to a gossip interval: phi 8, `initial_interval` = 2.5 rounds,
    /// `max_interval` = 10 rounds, and 15 minutes of dead-node grace (quickwit's value).
    ///
    /// Measured on 127.0.0.1 with 3 nodes at the default 200 ms (`tests/udp.rs`): a node that
    /// dies right after joining is off the others' rings in about 2.6–2.8 s (the prior still
    /// dominates), one that lived 2 s in about 1.4 s, an established one in about 1.0–1.2 s
    /// (phi 8 × the observed heartbeat interval of ~125 ms, plus up to one round). With 20% of
    /// datagrams dropped, membership stayed stable. Detection time is linear in
    /// `phi_threshold`: raise it where stalls of a second are expected.
    pub fn for_gossip_interval(gossip_interval: Duration) -> Self {
        Self {
            phi_threshold: 8.0,
            initial_interval: gossip_interval * 5 / 2,
            max_interval: gossip_interval * 10,
            dead_node_grace_period: Duration::from_secs(15 * 60),
        }
    }

    /// Checks the values chitchat's detector cannot work with.
    ///
    /// # Errors
    ///
    /// [`ClusterError::InvalidConfig`] naming `failure_detector.phi_threshold` when phi is not
    /// a positive number, or `failure_detector` when `initial_interval` is zero or
    /// `max_interval` is below it.
    pub fn validate(&self) -> Result<(), ClusterError> {
        if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
            return invalid("failure_detector.phi_threshold", "must be greater than 0");
        }
        if self.initial_interval.is_zero() || self.max_interval < self.initial_interval {
            return invalid("failure_detector", "initial_interval must be > 0 and max_interval >= initial_interval");
        }
        Ok(())
    }

    fn to_chitchat(&self) -> FailureDetectorConfig {
        FailureDetectorConfig::new(
            self.phi_threshold,
            SAMPLING_WINDOW_SIZE,
            self.max_interval,
            self.initial_interval,
            self.dead_node_grace_period,
        )
    }
}

impl Default for FailureDetectorSettings {
    /// [`FailureDetectorSettings::for_gossip_interval`] at [`DEFAULT_GOSSIP_INTERVAL`].
    fn default() -> Self {
        Self::for_gossip_interval(DEFAULT_GOSSIP_INTERVAL)
    }
}

/// Sealed gossip: every datagram sealed under the keys of a key file (see
/// [`seal`](crate::seal) for the format and the threat model, [`keyring`](crate::keyring) for
/// the file and key rotation).
#[derive(Debug, Clone, PartialEq)]
pub struct GossipSeal {
    /// The key file: base64 32-byte keys, one per line, the first seals, all open.
    pub keys_file: PathBuf,
    /// How often the key file is re-read. Default 5 s.
    pub reload_interval: Duration,
    /// How far a datagram's timestamp may be from this node's clock (both ways); older
    /// datagrams are rejected as stale. Default 30 s.
    pub replay_window: Duration,
}

impl GossipSeal {
    /// Sealing with the keys of `keys_file`, re-read every 5 s, with a 30 s replay window.
    pub fn new(keys_file: impl Into<PathBuf>) -> Self {
        Self {
            keys_file: keys_file.into(),
            reload_interval: Duration::from_secs(5),
            replay_window: Duration::from_secs(30),
        }
    }
}

/// Everything a node needs to join a cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster and stable across restarts (the ring hashes it).
    pub node_name: String,
    /// Nodes only merge gossip from nodes with the same cluster id. Alone this is not
    /// authentication; with [`ClusterConfig::gossip_seal`] it is bound into every datagram's seal.
    pub cluster_id: String,
    /// The UDP address the gossip socket binds to (may be `0.0.0.0:port`).
    pub gossip_listen: SocketAddr,
    /// The address peers send gossip to; a concrete IP and port.
    pub gossip_advertise: SocketAddr,
    /// Gossiped: where peers reach this node's peer gRPC service.
    pub peer_advertise: SocketAddr,
    /// Gossiped: this node's admin HTTP address.
    pub admin_advertise: SocketAddr,
    /// Seed nodes as `host:port`; host names are re-resolved every minute by chitchat, which
    /// suits a Kubernetes headless service. The node's own address may be listed.
    pub seeds: Vec<String>,
    /// Period of a gossip round. Default 200 ms.
    pub gossip_interval: Duration,
    /// Failure detector settings. Default [`FailureDetectorSettings::default`].
    pub failure_detector: FailureDetectorSettings,
    /// Virtual nodes per member on the ring. Default 128. Every node of a cluster must use the
    /// same value, or they compute different owners.
    pub virtual_nodes: u32,
    /// Seal gossip with a shared key ([`GossipSeal`]); `None` (the default) gossips in
    /// plaintext. Only [`Cluster::join`](crate::Cluster::join) seals; a custom transport
    /// given to `join_with_transport` is used as is.
    pub gossip_seal: Option<GossipSeal>,
    /// Keep other members off the ring until [`Cluster::mark_verified`](crate::Cluster::mark_verified)
    /// vouches for their name, generation and peer address (the relay does so after it has seen
    /// the member's peer certificate name it). Default false: every member counts as verified.
    pub require_verified_peers: bool,
}

impl ClusterConfig {
    /// A config with every default: gossip advertised on `gossip_listen`, no seeds, 200 ms
    /// gossip, the default failure detector and 128 virtual nodes.
    pub fn defaults_for(
        node_name: impl Into<String>,
        cluster_id: impl Into<String>,
        gossip_listen: SocketAddr,
        peer_advertise: SocketAddr,
        admin_advertise: SocketAddr,
    ) -> Self {
        Self {
            node_name: node_name.into(),
            cluster_id: cluster_id.into(),
            gossip_listen,
            gossip_advertise: gossip_listen,
            peer_advertise,
            admin_advertise,
            seeds: Vec::new(),
            gossip_interval: DEFAULT_GOSSIP_INTERVAL,
            failure_detector: FailureDetectorSettings::default(),
            virtual_nodes: DEFAULT_VIRTUAL_NODES,
            gossip_seal: None,
            require_verified_peers: false,
        }
    }

    /// Checks the values the cluster cannot work with.
    ///
    /// # Errors
    ///
    /// [`ClusterError::InvalidConfig`] naming the first offending field: those of
    /// [`validate_membership`], a gossip advertise address with port 0 or an unspecified IP, or
    /// gossip seal intervals that are too short.
    pub fn validate(&self) -> Result<(), ClusterError> {
        validate_membership(
            &self.node_name,
            &self.cluster_id,
            self.gossip_interval,
            self.virtual_nodes,
            &self.failure_detector,
        )?;
        if self.gossip_advertise.port() == 0 || self.gossip_advertise.ip().is_unspecified() {
            return invalid("gossip_advertise", "must be a concrete ip and port, peers send gossip to it");
        }
        if let Some(seal) = &self.gossip_seal {
            if seal.reload_interval.is_zero() {
                return invalid("gossip_seal.reload_interval", "must be greater than zero");
            }
            if seal.replay_window < Duration::from_secs(1) {
                return invalid("gossip_seal.replay_window", "must be at least 1s");
            }
        }
        Ok(())
    }

    /// The chitchat configuration of this node for the given generation.
    pub(crate) fn to_chitchat(&self, generation: u64) -> ChitchatConfig {
        ChitchatConfig {
            chitchat_id: ChitchatId::new(self.node_name.as_str(), generation, self.gossip_advertise),
            cluster_id: self.cluster_id.clone(),
            gossip_interval: self.gossip_interval,
            listen_addr: self.gossip_listen,
            seed_nodes: self.seeds.clone(),
            failure_detector_config: self.failure_detector.to_chitchat(),
            marked_for_deletion_grace_period: MARKED_FOR_DELETION_GRACE_PERIOD,
            catchup_callback: None,
            extra_liveness_predicate: None,
            // V1 compresses digests; stay on V0 until every deployed node decodes V1.
            protocol_version: ProtocolVersion::V0,
        }
    }
}

/// Checks the settings every node of a cluster is configured with before any address is
/// known (the relay checks its configuration file with it): a name and cluster id that are not
/// blank, a positive gossip interval, at least one virtual node and a usable failure detector
/// ([`FailureDetectorSettings::validate`]).
///
/// # Errors
///
/// [`ClusterError::InvalidConfig`] naming the first offending field.
pub fn validate_membership(
    node_name: &str,
    cluster_id: &str,
    gossip_interval: Duration,
    virtual_nodes: u32,
    failure_detector: &FailureDetectorSettings,
) -> Result<(), ClusterError> {
    if node_name.trim().is_empty() {
        return invalid("node_name", "must not be empty");
    }
    if cluster_id.trim().is_empty() {
        return invalid("cluster_id", "must not be empty");
    }
    if gossip_interval.is_zero() {
        return invalid("gossip_interval", "must be greater than 0s");
    }
    if virtual_nodes == 0 {
        return invalid("virtual_nodes", "must be greater than 0");
    }
    failure_detector.validate()
}

fn invalid(field: &'static str, reason: &str) -> Result<(), ClusterError> {
    Err(ClusterError::InvalidConfig { field, reason: reason.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClusterConfig {
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        ClusterConfig::defaults_for("a", "test", addr(7946), addr(9000), addr(6070))
    }

    #[test]
    fn defaults_are_valid() {
        let config = config();
        config.validate().unwrap();
        assert_eq!(config.gossip_advertise, config.gossip_listen);
        assert_eq!(config.gossip_interval, Duration::from_millis(200));
        assert_eq!(config.virtual_nodes, 128);
        assert_eq!(config.failure_detector.phi_threshold, 8.0);
        assert_eq!(config.failure_detector.initial_interval, Duration::from_millis(500));
        assert_eq!(config.failure_detector.max_interval, Duration::from_secs(2));
    }

    #[test]
    fn rejects_bad_values() {
        type Mutation = fn(&mut ClusterConfig);
        let cases: [(&str, Mutation); 8] = [
            ("node_name", |c| c.node_name = " ".into()),
            ("cluster_id", |c| c.cluster_id = String::new()),
            ("gossip_advertise", |c| c.gossip_advertise.set_port(0)),
            ("gossip_advertise", |c| c.gossip_advertise = "0.0.0.0:7946".parse().unwrap()),
            ("gossip_interval", |c| c.gossip_interval = Duration::ZERO),
            ("virtual_nodes", |c| c.virtual_nodes = 0),
            ("gossip_seal.reload_interval", |c| {
                c.gossip_seal = Some(GossipSeal { reload_interval: Duration::ZERO, ..GossipSeal::new("k") })
            }),
            ("gossip_seal.replay_window", |c| {
                c.gossip_seal = Some(GossipSeal { replay_window: Duration::from_millis(10), ..GossipSeal::new("k") })
            }),
        ];
        for (expected, mutate) in cases {
            let mut config = config();
            mutate(&mut config);
            match config.validate() {
                Err(ClusterError::InvalidConfig { field, .. }) => assert_eq!(field, expected),
                other => panic!("expected invalid `{expected}`, got {other:?}"),
            }
        }
        let mut nan_phi = config();
        nan_phi.failure_detector.phi_threshold = f64::NAN;
        assert!(nan_phi.validate().is_err());
        let mut inverted = config();
        inverted.failure_detector.max_interval = inverted.failure_detector.initial_interval / 2;
        assert!(matches!(inverted.validate(), Err(ClusterError::InvalidConfig { field: "failure_detector", .. })));
    }
}
