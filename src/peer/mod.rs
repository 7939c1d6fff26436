//! The peer protocol between relay nodes (`proto/xdsrelay/peer/v1/peer.proto`).
//!
//! A follower watches a key at its owner ([`follower`]); the owner serves the key itself,
//! opening the origin stream if needed, and never forwards further ([`server`]). No loops:
//! a node with followers of a key always takes that key from the origin.

pub mod follower;
pub mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::cache::Interest;
use crate::tls::{ChainVerifier, ClientTls, TlsConnector};

/// The status message an owner ends its follower streams with when it shuts down.
pub(crate) const OWNER_SHUTTING_DOWN: &str = "the owner is shutting down";

/// Generated messages and gRPC client/server of `xdsrelay.peer.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("xdsrelay.peer.v1");
}

impl From<&Interest> for proto::Interest {
    fn from(interest: &Interest) -> Self {
        Self { wildcard: interest.wildcard, names: interest.names.iter().cloned().collect() }
    }
}

impl From<Option<proto::Interest>> for Interest {
    fn from(interest: Option<proto::Interest>) -> Self {
        let interest = interest.unwrap_or_default();
        Self { wildcard: interest.wildcard, names: interest.names.into_iter().collect() }
    }
}

/// Lazily connected channels to other nodes' peer services, one per address: plaintext, or
/// mTLS with the node's `cluster.tls` certificate.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<SocketAddr, Channel>>>,
    tls: Option<ClientTls>,
}

impl PeerChannels {
    /// Channels dialled with `tls` (mTLS from `cluster.tls`), or plaintext when `None`.
    pub fn new(tls: Option<ClientTls>) -> Self {
        Self { channels: Arc::default(), tls }
    }

    /// The channel to `addr` (created on first use; connects lazily).
    pub fn get(&self, addr: SocketAddr) -> Channel {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(addr)
            .or_insert_with(|| {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .expect("a socket address forms a valid URI")
                    .connect_timeout(Duration::from_secs(2))
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .keep_alive_while_idle(true)
                    .tcp_nodelay(true);
                match &self.tls {
                    Some(tls) => endpoint.connect_with_connector_lazy(peer_connector(tls)),
                    None => endpoint.connect_lazy(),
                }
            })
            .clone()
    }

    /// Forgets the channel to `addr` (after the node at it left or restarted).
    pub fn forget(&self, addr: SocketAddr) {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
    }
}

/// The TLS connector of a peer channel: the node's certificate as client certificate; the
/// owner's certificate must chain to the cluster CA (peers are dialled by socket address, so
/// no host name is checked).
fn peer_connector(tls: &ClientTls) -> TlsConnector {
    tls.connector_with_verifier(ChainVerifier::factory())
}
