//! The peer protocol between relay nodes (`proto/xdsrelay/peer/v1/peer.proto`).
//!
//! A follower watches a key at its owner ([`follower`]); the owner serves the key itself,
//! opening the origin stream if needed, and never forwards further ([`server`]). No loops:
//! a node with followers of a key always takes that key from the origin.
//!
//! With cluster TLS every member is known by its certificate ([`identity`]): an owner serves
//! only members, a follower takes states only from the member it chose as owner, and a member
//! joins this node's ring only once its certificate was seen to name it ([`admission`]).

pub mod admission;
pub mod follower;
pub mod identity;
pub mod server;
pub mod status;
pub mod watch_end;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use rustls::client::danger::ServerCertVerifier;

use crate::cache::Interest;
use crate::tls::{ClientTls, TlsConnector};

/// Generated messages and gRPC client/server of `xdsrelay.peer.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("xdsrelay.peer.v1");
}

impl From<&Interest> for proto::Interest {
    fn from(interest: &Interest) -> Self {
        Self {
            wildcard: interest.wildcard,
            names: interest.names.iter().cloned().collect(),
            params: interest
                .params
                .iter()
                .map(|set| proto::DynamicParameters {
                    params: set.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                })
                .collect(),
        }
    }
}

impl From<&crate::cache::lanes::CanaryTally> for proto::CanaryReport {
    fn from(tally: &crate::cache::lanes::CanaryTally) -> Self {
        use crate::cache::lanes::Answer;
        use proto::canary_answer::Answer as Wire;
        let answers = tally
            .answers
            .iter()
            .take(server::MAX_REPORTED_ANSWERS)
            .map(|canary| {
                let (answer, nack_message) = match &canary.answer {
                    Answer::Ack => (Wire::Ack, String::new()),
                    Answer::Nack(message) => (Wire::Nack, message.clone()),
                    Answer::Pending => (Wire::Pending, String::new()),
                };
                proto::CanaryAnswer { node_id: canary.node_id.clone(), answer: answer.into(), nack_message }
            })
            .collect();
        Self {
            generation: tally.generation,
            version: tally.version.clone(),
            clients: tally.clients,
            canaries: tally.canaries,
            acked: tally.acked,
            nacked: tally.nacked,
            answers,
            cannot_try: tally.cannot_try,
        }
    }
}

impl From<Option<proto::Interest>> for Interest {
    fn from(interest: Option<proto::Interest>) -> Self {
        let interest = interest.unwrap_or_default();
        // Parameter sets as the cache keeps a union's: distinct, sorted, none empty.
        let mut params: Vec<crate::constraints::Params> = interest
            .params
            .into_iter()
            .filter(|set| !set.params.is_empty())
            .map(|set| std::sync::Arc::new(set.params.into_iter().collect()))
            .collect();
        params.sort_unstable();
        params.dedup();
        Self { wildcard: interest.wildcard, names: interest.names.into_iter().collect(), params }
    }
}

/// Lazily connected channels to other nodes' peer services, one per address and member:
/// plaintext, or mTLS with the node's `cluster.tls` certificate.
///
/// With TLS a channel is bound to the member it was opened for: its connections accept only a
/// certificate of the cluster CA naming that member ([`identity::MemberVerifier`]), so a
/// follower receives states only from the member it chose as owner.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<(SocketAddr, String), Channel>>>,
    tls: Option<(ClientTls, Arc<str>)>,
}

impl PeerChannels {
    /// Channels dialled with `tls` (mTLS from `cluster.tls`, members named under
    /// `cluster_id`), or plaintext when `None`.
    pub fn new(tls: Option<ClientTls>, cluster_id: &str) -> Self {
        Self { channels: Arc::default(), tls: tls.map(|tls| (tls, Arc::from(cluster_id))) }
    }

    /// The channel to member `member` at `addr` (created on first use; connects lazily).
    pub fn get(&self, addr: SocketAddr, member: &str) -> Channel {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.entry((addr, member.to_owned())).or_insert_with(|| self.dial(addr, member)).clone()
    }

    /// A new channel to member `member` at `addr`, not shared (connects lazily).
    pub fn dial(&self, addr: SocketAddr, member: &str) -> Channel {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address forms a valid URI")
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        match &self.tls {
            Some((tls, cluster_id)) => endpoint.connect_with_connector_lazy(member_connector(tls, cluster_id, member)),
            None => endpoint.connect_lazy(),
        }
    }

    /// Forgets the channels to `addr` (after the node at it left or restarted).
    pub fn forget(&self, addr: SocketAddr) {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).retain(|(a, _), _| *a != addr);
    }
}

/// The TLS connector of a channel to `member`: the node's certificate as client certificate;
/// the server's certificate must chain to the cluster CA and name `member` (peers are dialled
/// by socket address, so no host name is checked).
fn member_connector(tls: &ClientTls, cluster_id: &Arc<str>, member: &str) -> TlsConnector {
    let (cluster_id, member) = (cluster_id.clone(), Arc::<str>::from(member));
    tls.connector_with_verifier(Arc::new(move |roots| {
        Arc::new(identity::MemberVerifier::new(roots, &cluster_id, &member)) as Arc<dyn ServerCertVerifier>
    }))
}
