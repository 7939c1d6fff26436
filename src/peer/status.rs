//! The peer protocol's status messages, converted to and from the relay's own reports
//! ([`crate::status`]) at this boundary.

use std::time::Duration;

use tonic::transport::Channel;

use super::proto::{self, StatusRequest, peer_client::PeerClient};
use crate::status::{KeyReport, NodeIdentity, NodeReport, ReportedSource};

impl From<NodeReport> for proto::StatusReply {
    fn from(report: NodeReport) -> Self {
        Self { node: report.node, keys: report.keys.into_iter().map(Into::into).collect() }
    }
}

impl From<KeyReport> for proto::KeyStatus {
    fn from(key: KeyReport) -> Self {
        Self {
            key: key.key,
            type_url: key.type_url,
            version: key.version,
            age_seconds: key.age_seconds,
            local_clients: key.local_clients,
            nacks: key.nacks,
            source: key.source.label(),
            followers: key.followers,
            stale: key.stale,
            rollout: key.rollout,
        }
    }
}

impl From<proto::StatusReply> for NodeReport {
    fn from(reply: proto::StatusReply) -> Self {
        Self { node: reply.node, keys: reply.keys.into_iter().map(Into::into).collect() }
    }
}

impl From<proto::KeyStatus> for KeyReport {
    fn from(key: proto::KeyStatus) -> Self {
        Self {
            key: key.key,
            type_url: key.type_url,
            version: key.version,
            // Another node's figure: a negative or non-finite age reads as none.
            age_seconds: if key.age_seconds.is_finite() { key.age_seconds.max(0.0) } else { 0.0 },
            local_clients: key.local_clients,
            nacks: key.nacks,
            source: ReportedSource::from_label(&key.source),
            followers: key.followers,
            stale: key.stale,
            // Another node's word: only a phase this relay knows is kept.
            rollout: match key.rollout.as_str() {
                "baking" | "held" | "aborted" => key.rollout,
                _ => String::new(),
            },
        }
    }
}

impl From<NodeIdentity> for proto::IdentifyReply {
    fn from(identity: NodeIdentity) -> Self {
        Self { node: identity.node, generation: identity.generation }
    }
}

/// Asks the node at the other end of `channel` what it holds, within `timeout`.
///
/// # Errors
/// The peer's status message, or that it did not answer within `timeout`.
pub async fn fetch_status(channel: Channel, timeout: Duration) -> Result<NodeReport, String> {
    let mut client = PeerClient::new(channel);
    match tokio::time::timeout(timeout, client.status(StatusRequest {})).await {
        Ok(Ok(reply)) => Ok(reply.into_inner().into()),
        Ok(Err(status)) => Err(status.message().to_owned()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_cross_the_peer_boundary_unchanged() {
        let report = NodeReport {
            node: "a".into(),
            keys: vec![KeyReport {
                key: "k".into(),
                type_url: "t".into(),
                version: "v1".into(),
                age_seconds: 1.5,
                local_clients: 3,
                nacks: 1,
                source: ReportedSource::Peer("b".into()),
                followers: vec!["c".into()],
                stale: true,
                rollout: "held".into(),
            }],
        };
        let wire: proto::StatusReply = report.clone().into();
        assert_eq!(wire.keys[0].source, "peer:b");
        assert_eq!(NodeReport::from(wire.clone()), report);
        let mut junk = wire;
        junk.keys[0].rollout = "<script>".into();
        assert_eq!(NodeReport::from(junk).keys[0].rollout, "", "an unknown phase from another node is dropped");
    }

    #[test]
    fn a_peer_reporting_nonsense_ages_reads_as_zero() {
        for age in [f64::NAN, f64::INFINITY, -3.0] {
            let key = proto::KeyStatus { age_seconds: age, ..Default::default() };
            assert_eq!(KeyReport::from(key).age_seconds, 0.0);
        }
    }
}
