//! What a node reports about the keys it holds: the admin API's view of one node, and what
//! nodes tell each other over the peer protocol (converted at that boundary, in
//! [`crate::peer::status`]). It depends on nothing above the source layer, so the peer
//! protocol and the relay both build on it.

use serde::{Serialize, Serializer};

use crate::source::Source;

/// Where a node takes a key from, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReportedSource {
    /// No source runs (the entry is idle between sources, or has left the cache).
    #[default]
    None,
    /// The origin management server.
    Origin,
    /// The owner node of that name.
    Peer(String),
    /// No source runs yet: the state was read from disk at start.
    Disk,
}

impl ReportedSource {
    /// The label of the admin API and the peer protocol: `origin`, `peer:<node>`, or empty.
    pub fn label(&self) -> String {
        match self {
            Self::None => String::new(),
            Self::Origin => "origin".to_owned(),
            Self::Peer(node) => format!("peer:{node}"),
            Self::Disk => "disk".to_owned(),
        }
    }

    /// The source a label names; anything that is not `origin`, `disk` or `peer:<node>` is
    /// `None`.
    pub fn from_label(label: &str) -> Self {
        match label {
            "origin" => Self::Origin,
            "disk" => Self::Disk,
            _ => match label.strip_prefix("peer:") {
                Some(node) if !node.is_empty() => Self::Peer(node.to_owned()),
                _ => Self::None,
            },
        }
    }

    /// True when the key is taken from an owner node.
    pub fn is_peer(&self) -> bool {
        matches!(self, Self::Peer(_))
    }
}

impl From<Option<Source>> for ReportedSource {
    fn from(source: Option<Source>) -> Self {
        match source {
            None => Self::None,
            Some(Source::Origin) => Self::Origin,
            Some(Source::Peer { name, .. }) => Self::Peer(name),
        }
    }
}

impl Serialize for ReportedSource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.label())
    }
}

/// One key as a node holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyReport {
    /// The aggregation key.
    pub key: String,
    /// Its resource type.
    pub type_url: String,
    /// The cached version (empty before the first state).
    pub version: String,
    /// Seconds since the cached state arrived (0 before the first state).
    pub age_seconds: f64,
    /// Downstream clients on the node that are not relay nodes.
    pub local_clients: u64,
    /// NACKs from the node's clients of the key.
    pub nacks: u64,
    /// Where the node takes the key from.
    pub source: ReportedSource,
    /// The nodes following the key through this node, sorted.
    pub followers: Vec<String>,
    /// True while the state is last-known-good from disk, not yet confirmed by a live source.
    pub stale: bool,
    /// The key's staged rollout on this node: `baking`, `held` or `aborted` while a new
    /// version is in rollout, empty otherwise (carried in the peer protocol's status).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rollout: String,
}

/// What one node holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeReport {
    /// The node's name (empty for a relay running alone).
    pub node: String,
    /// Its keys, sorted by key.
    pub keys: Vec<KeyReport>,
}

/// A node's name and generation (its start time in milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node's name (empty for a relay running alone).
    pub node: String,
    /// Grows on every restart of the node.
    pub generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_labels_round_trip_and_reject_anything_else() {
        for source in
            [ReportedSource::None, ReportedSource::Origin, ReportedSource::Disk, ReportedSource::Peer("b".into())]
        {
            assert_eq!(ReportedSource::from_label(&source.label()), source);
        }
        for junk in ["peer:", "Origin", "peer", "upstream:b"] {
            assert_eq!(ReportedSource::from_label(junk), ReportedSource::None, "{junk}");
        }
        assert_eq!(serde_json::to_value(ReportedSource::Peer("b".into())).unwrap(), "peer:b");
    }
}
