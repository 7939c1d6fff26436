//! The bootstrap's optional `cluster:` section: how this relay finds and talks to the other
//! relays of its cluster. Absent means a single node.
//!
//! Invariant: a validated section has a non-empty node name and advertise host, and listen
//! addresses that parse; host names are resolved when the node starts, not here.

use serde::{Deserialize, Serialize};
use xds_relay_cluster::FailureDetectorSettings;
use xds_relay_cluster::config::{DEFAULT_GOSSIP_INTERVAL, DEFAULT_VIRTUAL_NODES};

use super::ConfigError;
use super::bootstrap::SocketAddress;
use super::de::{count, null_default};
use super::duration::GoDuration;

/// Membership, ring and peer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// This node's name, unique in the cluster (required).
    #[serde(alias = "nodeName")]
    pub node_name: String,
    /// Nodes gossip only with nodes of the same cluster id (default `xds-relay`).
    #[serde(default = "default_cluster_id", alias = "clusterId")]
    pub cluster_id: String,
    /// How the other nodes reach this one: a host name or IP (default: `node_name`).
    #[serde(default, alias = "advertiseHost")]
    pub advertise_host: Option<String>,
    /// UDP address for gossip (default `0.0.0.0:7946`).
    #[serde(default = "default_gossip", deserialize_with = "null_default_gossip")]
    pub gossip: SocketAddress,
    /// TCP address of the peer gRPC service (default `0.0.0.0:9992`).
    #[serde(default = "default_peer", deserialize_with = "null_default_peer")]
    pub peer: SocketAddress,
    /// Gossip addresses (`host:port`) of nodes to join through; host names are re-resolved,
    /// so a Kubernetes headless service or compose service names work.
    #[serde(default, deserialize_with = "null_default")]
    pub seeds: Vec<String>,
    /// Gossip round period (default `200ms`).
    #[serde(default = "default_gossip_interval", alias = "gossipInterval")]
    pub gossip_interval: GoDuration,
    /// Virtual nodes per member on the ring (default 128).
    #[serde(default = "default_virtual_nodes", alias = "virtualNodes", deserialize_with = "count")]
    pub virtual_nodes: usize,
    /// Failure detection; defaults act on a dead node within a few seconds.
    #[serde(default, alias = "failureDetector", deserialize_with = "null_default")]
    pub failure_detector: FailureDetector,
    /// mTLS on the peer protocol (required unless `insecure`).
    #[serde(default)]
    pub tls: Option<super::tls::ClusterTls>,
    /// Run the cluster without `tls` and without `gossip_keys_file` (default false: both are
    /// required; the relay logs a warning for each one left out).
    #[serde(default)]
    pub insecure: bool,
    /// Seals every gossip datagram: a file of base64 32-byte keys, one per line, the first
    /// seals and all open; re-read when it changes (key rotation). Absent: plaintext gossip.
    #[serde(default, alias = "gossipKeysFile")]
    pub gossip_keys_file: Option<String>,
}

/// Phi-accrual failure detector settings: the file's form of the cluster crate's
/// [`FailureDetectorSettings`], whose defaults fill the fields left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailureDetector {
    /// Suspicion level at which a node is declared dead (default 8; raise it where process
    /// stalls of a second or more are expected).
    #[serde(alias = "phiThreshold")]
    pub phi_threshold: f64,
    /// Heartbeat interval assumed for a node not yet measured (default `500ms`).
    #[serde(alias = "initialInterval")]
    pub initial_interval: GoDuration,
    /// Upper bound of the measured heartbeat interval (default `2s`).
    #[serde(alias = "maxInterval")]
    pub max_interval: GoDuration,
    /// How long a dead node's entry is kept (default `15m`).
    #[serde(alias = "deadNodeGracePeriod")]
    pub dead_node_grace_period: GoDuration,
}

impl Default for FailureDetector {
    /// [`FailureDetectorSettings::default`].
    fn default() -> Self {
        let defaults = FailureDetectorSettings::default();
        Self {
            phi_threshold: defaults.phi_threshold,
            initial_interval: defaults.initial_interval.into(),
            max_interval: defaults.max_interval.into(),
            dead_node_grace_period: defaults.dead_node_grace_period.into(),
        }
    }
}

impl FailureDetector {
    /// The cluster crate's settings with these values.
    pub fn settings(&self) -> FailureDetectorSettings {
        FailureDetectorSettings {
            phi_threshold: self.phi_threshold,
            initial_interval: self.initial_interval.get(),
            max_interval: self.max_interval.get(),
            dead_node_grace_period: self.dead_node_grace_period.get(),
        }
    }
}

fn default_cluster_id() -> String {
    "xds-relay".to_owned()
}
fn default_gossip() -> SocketAddress {
    SocketAddress { address: "0.0.0.0".to_owned(), port_value: 7946 }
}
fn default_peer() -> SocketAddress {
    SocketAddress { address: "0.0.0.0".to_owned(), port_value: 9992 }
}
fn null_default_gossip<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddress, D::Error> {
    Ok(Option::<SocketAddress>::deserialize(d)?.unwrap_or_else(default_gossip))
}
fn null_default_peer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddress, D::Error> {
    Ok(Option::<SocketAddress>::deserialize(d)?.unwrap_or_else(default_peer))
}
fn default_gossip_interval() -> GoDuration {
    DEFAULT_GOSSIP_INTERVAL.into()
}
fn default_virtual_nodes() -> usize {
    DEFAULT_VIRTUAL_NODES as usize
}

impl ClusterSettings {
    /// The host other nodes use to reach this one.
    pub fn advertise_host(&self) -> &str {
        self.advertise_host.as_deref().unwrap_or(&self.node_name)
    }

    /// [`ClusterSettings::virtual_nodes`] as the cluster crate takes it (saturated at
    /// `u32::MAX`).
    pub fn ring_virtual_nodes(&self) -> u32 {
        u32::try_from(self.virtual_nodes).unwrap_or(u32::MAX)
    }

    /// Checks the membership settings with the cluster crate's own rules
    /// ([`xds_relay_cluster::validate_membership`]), then addresses, seeds, TLS and the
    /// gossip key file.
    ///
    /// # Errors
    /// The first problem with its field path (file left empty).
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        xds_relay_cluster::validate_membership(
            &self.node_name,
            &self.cluster_id,
            self.gossip_interval.get(),
            self.ring_virtual_nodes(),
            &self.failure_detector.settings(),
        )
        .map_err(|error| match error {
            xds_relay_cluster::ClusterError::InvalidConfig { field, reason } => {
                ConfigError::new("", format!("{path}.{field}"), reason)
            }
            other => ConfigError::new("", path, other.to_string()),
        })?;
        if self.advertise_host().is_empty() || self.advertise_host() == "0.0.0.0" || self.advertise_host() == "::" {
            return Err(ConfigError::new(
                "",
                format!("{path}.advertise_host"),
                "must be a host name or IP the other nodes can reach (not a wildcard address)",
            ));
        }
        self.gossip.validate(&format!("{path}.gossip"))?;
        self.peer.validate(&format!("{path}.peer"))?;
        for (i, seed) in self.seeds.iter().enumerate() {
            let valid =
                seed.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(ConfigError::new("", format!("{path}.seeds[{i}]"), format!("{seed:?} is not host:port")));
            }
        }
        match &self.tls {
            Some(tls) => tls.validate(&format!("{path}.tls"))?,
            None if self.insecure => {}
            None => {
                return Err(ConfigError::new(
                    "",
                    format!("{path}.tls"),
                    "is required in cluster mode (set insecure: true to run the peer protocol without TLS)",
                ));
            }
        }
        match &self.gossip_keys_file {
            Some(file) => {
                xds_relay_cluster::Keyring::load(std::path::Path::new(file))
                    .map_err(|e| ConfigError::new("", format!("{path}.gossip_keys_file"), e.to_string()))?;
            }
            None if self.insecure => {}
            None => {
                return Err(ConfigError::new(
                    "",
                    format!("{path}.gossip_keys_file"),
                    "is required in cluster mode (set insecure: true to gossip in plaintext)",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse_bootstrap;

    const BASE: &str = "server: {address: {address: 127.0.0.1, port_value: 0}}\n\
        origin_server: {address: {address: 127.0.0.1, port_value: 18000}}\n\
        cache: {ttl: 1s}\nadmin: {address: {address: 127.0.0.1, port_value: 0}}\n";

    #[test]
    fn defaults_and_full_section() {
        let b = parse_bootstrap(&format!("{BASE}cluster: {{node_name: relay-1, insecure: true}}\n"), "b.yaml").unwrap();
        let c = b.cluster.unwrap();
        assert_eq!(c.advertise_host(), "relay-1");
        assert_eq!(c.gossip.port_value, 7946);
        assert_eq!(c.peer.port_value, 9992);
        assert_eq!(c.virtual_nodes, 128);
        let text = format!(
            "{BASE}cluster:\n  node_name: a\n  insecure: true\n  advertise_host: 10.0.0.1\n  seeds: [\"b:7946\", \"c:7946\"]\n  gossip_interval: 100ms\n  failure_detector: {{phi_threshold: 10, initial_interval: 1s, max_interval: 4s}}\n"
        );
        let c = parse_bootstrap(&text, "b.yaml").unwrap().cluster.unwrap();
        assert_eq!(c.seeds.len(), 2);
        assert_eq!(c.gossip_keys_file, None);
        assert_eq!(c.failure_detector.phi_threshold, 10.0);
    }

    #[test]
    fn errors_name_the_field() {
        for (section, field) in [
            ("{node_name: \"\"}", "cluster.node_name"),
            ("{node_name: a}", "cluster.tls"),
            ("{node_name: a, advertise_host: 0.0.0.0, insecure: true}", "cluster.advertise_host"),
            ("{node_name: a, seeds: [nope], insecure: true}", "cluster.seeds[0]"),
            ("{node_name: a, gossip_interval: 0s, insecure: true}", "cluster.gossip_interval"),
            ("{node_name: a, cluster_id: \" \", insecure: true}", "cluster.cluster_id"),
            ("{node_name: a, virtual_nodes: 0, insecure: true}", "cluster.virtual_nodes"),
            (
                "{node_name: a, insecure: true, failure_detector: {phi_threshold: 0}}",
                "cluster.failure_detector.phi_threshold",
            ),
            (
                "{node_name: a, insecure: true, failure_detector: {initial_interval: 2s, max_interval: 1s}}",
                "cluster.failure_detector",
            ),
            ("{node_name: a, peer: {address: a_b, port_value: 1}, insecure: true}", "cluster.peer.address"),
            ("{node_name: a, unknown: 1}", "cluster"),
            ("{node_name: a, insecure: true, gossip_keys_file: /nonexistent/gossip.keys}", "cluster.gossip_keys_file"),
        ] {
            let err = parse_bootstrap(&format!("{BASE}cluster: {section}\n"), "b.yaml").unwrap_err();
            assert!(err.field.starts_with(field), "{section}: {err}");
            assert_eq!(err.file, "b.yaml");
        }
    }

    #[test]
    fn gossip_keys_file_must_hold_valid_keys() {
        let dir = std::env::temp_dir().join(format!("xds-relay-config-gossip-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.keys");
        std::fs::write(&good, "# rotation: new key last\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").unwrap();
        let bad = dir.join("bad.keys");
        std::fs::write(&bad, "c2hvcnQ=\n").unwrap();
        let section = |file: &std::path::Path| {
            format!("{BASE}cluster: {{node_name: a, insecure: true, gossipKeysFile: \"{}\"}}\n", file.display())
        };
        let c = parse_bootstrap(&section(&good), "b.yaml").unwrap().cluster.unwrap();
        assert_eq!(c.gossip_keys_file.as_deref(), Some(good.to_str().unwrap()));
        let err = parse_bootstrap(&section(&bad), "b.yaml").unwrap_err();
        assert_eq!(err.field, "cluster.gossip_keys_file");
        assert!(err.message.contains("line 1") && err.message.contains("expected 32"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
