//! Errors of the cluster crate.
//!
//! One enum, [`ClusterError`]. Only joining can fail: once a node has joined, gossip problems
//! (unreachable peers, lost datagrams) are expected conditions that the failure detector turns
//! into liveness, not errors.

use std::net::SocketAddr;

/// Why a node could not join the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A [`ClusterConfig`](crate::ClusterConfig) field has a value the cluster cannot work with.
    #[error("invalid cluster config `{field}`: {reason}")]
    InvalidConfig {
        /// The offending field, as named in `ClusterConfig`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The gossip transport could not open its socket (for UDP: the port is taken or the
    /// address is not local).
    #[error("failed to open the gossip socket on {listen_addr}")]
    Transport {
        /// The address the socket was to be bound to.
        listen_addr: SocketAddr,
        /// The transport's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The gossip key file cannot be used.
    #[error(transparent)]
    Keyring(#[from] crate::keyring::KeyringError),
}
