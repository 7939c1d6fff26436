//! What a load run does: target, streams, protocol, types, names, and when to stop; with the
//! parsers the `xds-loadgen` command line uses.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use super::tls::TlsFiles;
pub use crate::grpc::{Protocol, Transport};
use crate::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

/// Errors of [`LoadgenConfig::validate`] and the parsers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A type name other than `cds`, `eds`, `lds`, `rds`.
    #[error("unknown xDS type {name:?}; use cds, eds, lds or rds")]
    UnknownType {
        /// The name given.
        name: String,
    },
    /// A protocol other than `sotw` or `delta`.
    #[error("unknown protocol {name:?}; use sotw or delta")]
    UnknownProtocol {
        /// The name given.
        name: String,
    },
    /// A mode other than `ads` or `per-type`.
    #[error("unknown mode {name:?}; use ads or per-type")]
    UnknownMode {
        /// The name given.
        name: String,
    },
    /// A connect rate that is not a positive number, optionally followed by `/s`.
    #[error("invalid connect rate {input:?}; use e.g. 500/s")]
    Rate {
        /// The text given.
        input: String,
    },
    /// A fraction that is not a number in [0, 1], optionally written as a percentage.
    #[error("invalid fraction {input:?}; use e.g. 0.01 or 1%")]
    Fraction {
        /// The text given.
        input: String,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
}

/// The four xDS types the load generator knows, in make-before-break push order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdsType {
    /// Clusters.
    Cds,
    /// ClusterLoadAssignments.
    Eds,
    /// Listeners.
    Lds,
    /// RouteConfigurations.
    Rds,
}

// === impl XdsType ===

impl XdsType {
    /// Every type, in push order.
    pub const ALL: [XdsType; 4] = [XdsType::Cds, XdsType::Eds, XdsType::Lds, XdsType::Rds];

    /// The v3 type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            XdsType::Cds => CLUSTER_TYPE,
            XdsType::Eds => ENDPOINT_TYPE,
            XdsType::Lds => LISTENER_TYPE,
            XdsType::Rds => ROUTE_TYPE,
        }
    }

    /// The type of a v3 type URL, if it is one of the four.
    pub fn from_type_url(type_url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == type_url)
    }

    /// Position in [`XdsType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The type whose resources name this type's resources when names are derived (EDS from
    /// CDS cluster names, RDS from the route names of LDS HTTP connection managers).
    pub fn parent(self) -> Option<Self> {
        match self {
            XdsType::Eds => Some(XdsType::Cds),
            XdsType::Rds => Some(XdsType::Lds),
            XdsType::Cds | XdsType::Lds => None,
        }
    }

    /// The type whose names are derived from this type's resources, if any.
    pub fn child(self) -> Option<Self> {
        match self {
            XdsType::Cds => Some(XdsType::Eds),
            XdsType::Lds => Some(XdsType::Rds),
            XdsType::Eds | XdsType::Rds => None,
        }
    }

    /// Lowercase short name (`cds`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            XdsType::Cds => "cds",
            XdsType::Eds => "eds",
            XdsType::Lds => "lds",
            XdsType::Rds => "rds",
        }
    }
}

impl fmt::Display for XdsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for XdsType {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let name = text.trim().to_ascii_lowercase();
        Self::ALL.into_iter().find(|t| t.as_str() == name).ok_or(ConfigError::UnknownType { name })
    }
}

impl FromStr for Protocol {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "sotw" => Ok(Protocol::Sotw),
            "delta" => Ok(Protocol::Delta),
            other => Err(ConfigError::UnknownProtocol { name: other.to_owned() }),
        }
    }
}

/// Parses `ads` or `per-type` into a [`Transport`].
///
/// # Errors
///
/// [`ConfigError::UnknownMode`] for anything else.
pub fn parse_mode(text: &str) -> Result<Transport, ConfigError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "ads" => Ok(Transport::Ads),
        "per-type" | "pertype" => Ok(Transport::PerType),
        other => Err(ConfigError::UnknownMode { name: other.to_owned() }),
    }
}

/// Parses a connect rate, `500/s` or `500`, in streams per second.
///
/// # Errors
///
/// [`ConfigError::Rate`] when it is not a positive finite number.
pub fn parse_rate(text: &str) -> Result<f64, ConfigError> {
    let trimmed = text.trim();
    let number = trimmed.strip_suffix("/s").unwrap_or(trimmed);
    match number.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(ConfigError::Rate { input: text.to_owned() }),
    }
}

/// Parses a fraction of the clients, `0.01` or `1%`, into a number in `[0, 1]`.
///
/// # Errors
///
/// [`ConfigError::Fraction`] when it is not a finite number in that range.
pub fn parse_fraction(text: &str) -> Result<f64, ConfigError> {
    let trimmed = text.trim();
    let (number, scale) = match trimmed.strip_suffix('%') {
        Some(percent) => (percent, 100.0),
        None => (trimmed, 1.0),
    };
    match number.trim().parse::<f64>().map(|n| n / scale) {
        Ok(fraction) if (0.0..=1.0).contains(&fraction) => Ok(fraction),
        _ => Err(ConfigError::Fraction { input: text.to_owned() }),
    }
}

/// Everything a load run needs.
#[derive(Debug, Clone)]
pub struct LoadgenConfig {
    /// The xDS server, e.g. `http://127.0.0.1:9991`.
    pub target: String,
    /// Simulated clients; each has its own node and one ADS stream, or one stream per type.
    pub streams: usize,
    /// HTTP/2 connections the streams are spread over (client `i` uses connection
    /// `i % connections`).
    pub connections: usize,
    /// One ADS stream per client, or one stream per type.
    pub mode: Transport,
    /// SotW or delta.
    pub protocol: Protocol,
    /// The types each client subscribes to.
    pub types: Vec<XdsType>,
    /// EDS names; `None` derives them from the CDS cluster names the client received.
    pub eds_names: Option<Vec<String>>,
    /// RDS names; `None` derives them from the route names in the LDS HTTP connection
    /// managers the client received.
    pub rds_names: Option<Vec<String>>,
    /// `node.id` of client `i`; template fields (`{i}`, `{group}`, `{epoch}`) as in [`LoadgenConfig::node_identity`].
    pub node_id_template: String,
    /// `node.cluster` of client `i`; template fields (`{i}`, `{group}`, `{epoch}`) as in [`LoadgenConfig::node_identity`].
    pub cluster_template: String,
    /// The clients are split into this many groups of consecutive indices (`{group}` in the
    /// templates); at least 1 and at most `streams`.
    pub groups: usize,
    /// Fraction of the clients restarted each second, in `[0, 1]` (0: none): in round-robin
    /// order, a client ends its streams and opens new ones at once, with its node made for its
    /// next *epoch* (`{epoch}` in the templates, the client's restarts so far). With `{epoch}`
    /// in the cluster template, a restarted client moves to a new aggregation key and the key it
    /// left is idle once its whole group has moved on ([`super::restart`]).
    pub restart_per_second: f64,
    /// Stop after this long.
    pub duration: Duration,
    /// Stop once every client has seen this many new versions (see the module doc).
    pub until_versions: Option<u32>,
    /// Open at most this many clients per second; `None` opens them all at once.
    pub connect_rate: Option<f64>,
    /// Wait before reopening a stream that ended.
    pub reconnect_delay: Duration,
    /// Write every connect, response and disconnect to this file as JSON lines
    /// ([`super::record`]).
    pub record: Option<PathBuf>,
    /// TLS (and mTLS with a client certificate) on every connection; the target must then be
    /// `https://`.
    pub tls: Option<TlsFiles>,
}

impl Default for LoadgenConfig {
    fn default() -> Self {
        Self {
            target: "http://127.0.0.1:18000".to_owned(),
            streams: 1,
            connections: 16,
            mode: Transport::Ads,
            protocol: Protocol::Sotw,
            types: vec![XdsType::Cds, XdsType::Eds],
            eds_names: None,
            rds_names: None,
            node_id_template: "loadgen-{i}".to_owned(),
            cluster_template: "loadgen".to_owned(),
            groups: 1,
            restart_per_second: 0.0,
            duration: Duration::from_secs(30),
            until_versions: None,
            connect_rate: None,
            reconnect_delay: Duration::from_secs(1),
            record: None,
            tls: None,
        }
    }
}

// === impl LoadgenConfig ===

impl LoadgenConfig {
    /// Checks that the configuration can run, and puts the types in push order.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for no streams, no connections, no types, a repeated type, a
    /// derived EDS/RDS without its parent type, a zero `until_versions`, a target scheme that
    /// does not match the TLS setting, or a client certificate without its key (or the reverse).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let invalid = |reason: &str| Err(ConfigError::Invalid { reason: reason.to_owned() });
        TlsFiles::check_target(self.tls.as_ref(), &self.target).map_err(|reason| ConfigError::Invalid { reason })?;
        if self.tls.as_ref().is_some_and(|tls| !tls.identity_is_complete()) {
            return invalid("--tls-cert and --tls-key go together");
        }
        if self.streams == 0 {
            return invalid("--streams must be at least 1");
        }
        if self.connections == 0 {
            return invalid("--connections must be at least 1");
        }
        if self.types.is_empty() {
            return invalid("--types must name at least one type");
        }
        self.types.sort();
        if self.types.windows(2).any(|w| w[0] == w[1]) {
            return invalid("--types names a type twice");
        }
        if self.groups == 0 || self.groups > self.streams {
            return invalid("--groups must be between 1 and --streams");
        }
        if !(0.0..=1.0).contains(&self.restart_per_second) {
            return invalid("--reconnect-per-second must be a fraction between 0 and 1");
        }
        if self.until_versions == Some(0) {
            return invalid("--until-versions must be at least 1");
        }
        for child in [XdsType::Eds, XdsType::Rds] {
            let Some(parent) = child.parent() else { continue };
            if self.types.contains(&child) && self.fixed_names(child).is_none() && !self.types.contains(&parent) {
                return Err(ConfigError::Invalid {
                    reason: format!(
                        "{child} names are derived from {parent}: add {parent} to --types or pass --{child}-names"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The fixed names of `t`, if given.
    pub fn fixed_names(&self, t: XdsType) -> Option<&[String]> {
        match t {
            XdsType::Eds => self.eds_names.as_deref(),
            XdsType::Rds => self.rds_names.as_deref(),
            XdsType::Cds | XdsType::Lds => None,
        }
    }

    /// Whether `t`'s names are derived from its parent's resources.
    pub fn derives(&self, t: XdsType) -> bool {
        t.parent().is_some() && self.types.contains(&t) && self.fixed_names(t).is_none()
    }

    /// gRPC streams the run keeps open when every client is up.
    pub fn calls_expected(&self) -> usize {
        match self.mode {
            Transport::Ads => self.streams,
            Transport::PerType => self.streams * self.types.len(),
        }
    }

    /// `node.id` and `node.cluster` of client `i` in its `epoch`th life: in both templates
    /// `{i}` is replaced with `i`, `{group}` with its group (`i * groups / streams`, so groups
    /// are runs of consecutive clients) and `{epoch}` with `epoch` (its restarts so far).
    pub fn node_identity(&self, i: usize, epoch: u64) -> (String, String) {
        let group = (i * self.groups / self.streams.max(1)).to_string();
        let (index, epoch) = (i.to_string(), epoch.to_string());
        let fill =
            |template: &str| template.replace("{i}", &index).replace("{group}", &group).replace("{epoch}", &epoch);
        (fill(&self.node_id_template), fill(&self.cluster_template))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!("EDS".parse::<XdsType>(), Ok(XdsType::Eds));
        assert!("sds".parse::<XdsType>().is_err());
        assert_eq!("delta".parse::<Protocol>(), Ok(Protocol::Delta));
        assert_eq!(parse_mode("per-type"), Ok(Transport::PerType));
        assert!(parse_mode("rest").is_err());
        assert_eq!(parse_rate("500/s"), Ok(500.0));
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_fraction("0.01"), Ok(0.01));
        assert_eq!(parse_fraction("1%"), Ok(0.01));
        assert_eq!(parse_fraction("0"), Ok(0.0));
        assert!(parse_fraction("150%").is_err());
        assert!(parse_fraction("-0.1").is_err());
        assert!(parse_fraction("NaN").is_err());
        assert_eq!(XdsType::from_type_url(ROUTE_TYPE), Some(XdsType::Rds));
    }

    #[test]
    fn validation_orders_types_and_requires_parents() {
        let mut c = LoadgenConfig { types: vec![XdsType::Eds, XdsType::Cds], ..Default::default() };
        c.validate().unwrap();
        assert_eq!(c.types, [XdsType::Cds, XdsType::Eds]);
        assert!(c.derives(XdsType::Eds));
        let mut c = LoadgenConfig { types: vec![XdsType::Rds], ..Default::default() };
        assert!(c.validate().is_err());
        c.rds_names = Some(vec!["route_0".into()]);
        c.validate().unwrap();
        assert!(!c.derives(XdsType::Rds));
        let mut c = LoadgenConfig { types: vec![XdsType::Cds, XdsType::Cds], ..Default::default() };
        assert!(c.validate().is_err());
        let mut c = LoadgenConfig { streams: 0, ..Default::default() };
        assert!(c.validate().is_err());
    }

    #[test]
    fn validation_checks_tls_against_the_target() {
        let tls = TlsFiles { ca_file: "ca.pem".into(), ..Default::default() };
        let mut c = LoadgenConfig { tls: Some(tls.clone()), ..Default::default() };
        assert!(c.validate().is_err(), "http target with TLS");
        c.target = "https://127.0.0.1:18000".into();
        c.validate().unwrap();
        c.tls = Some(TlsFiles { key_file: Some("k.pem".into()), ..tls });
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("--tls-cert and --tls-key"), "{e}");
        c.tls = None;
        assert!(c.validate().is_err(), "https target without TLS");
    }

    #[test]
    fn templates_and_call_counts() {
        let c = LoadgenConfig {
            streams: 3,
            mode: Transport::PerType,
            node_id_template: "n-{i}".into(),
            cluster_template: "c{i}".into(),
            ..Default::default()
        };
        assert_eq!(c.node_identity(2, 0), ("n-2".to_owned(), "c2".to_owned()));
        assert_eq!(c.calls_expected(), 6);
    }

    #[test]
    fn groups_are_runs_of_clients_and_epochs_move_them() {
        let mut c = LoadgenConfig {
            streams: 10,
            groups: 3,
            node_id_template: "n-{i}".into(),
            cluster_template: "g{group}e{epoch}-x".into(),
            ..Default::default()
        };
        c.validate().unwrap();
        let groups: Vec<String> = (0..10).map(|i| c.node_identity(i, 0).1).collect();
        assert_eq!(
            groups,
            ["g0e0-x", "g0e0-x", "g0e0-x", "g0e0-x", "g1e0-x", "g1e0-x", "g1e0-x", "g2e0-x", "g2e0-x", "g2e0-x"]
        );
        assert_eq!(c.node_identity(9, 4), ("n-9".to_owned(), "g2e4-x".to_owned()));
        c.groups = 11;
        assert!(c.validate().is_err(), "more groups than clients");
        c.groups = 1;
        c.restart_per_second = 1.5;
        assert!(c.validate().is_err(), "more than every client per second");
    }
}
