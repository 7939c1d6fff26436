//! The gossip keys a node publishes, and the one place that reads them back.
//!
//! Every key this crate writes into chitchat is a constant here, and every read goes through
//! [`NodeStateExt`] (the quickwit-cluster pattern), so the wire vocabulary lives in one file.
//!
//! Invariants:
//!
//! - Readiness ([`STATE_KEY`]) and the peer address ([`PEER_ADDR_KEY`]) are separate keys. A node
//!   is ring-eligible only when both say so; a missing or unparsable value reads as "not
//!   eligible" ([`NodeState::Joining`], no address), never as an error.
//! - Keys set by the relay through [`Cluster::set_key`](crate::Cluster::set_key) live under
//!   [`EXTRA_PREFIX`], so they can never overwrite the keys above.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::member::NodeState;

/// The node's lifecycle state: `joining`, `ready` or `draining` (see [`NodeState`]).
pub(crate) const STATE_KEY: &str = "state";
/// Where peers reach the node's peer gRPC service (`ip:port`).
pub(crate) const PEER_ADDR_KEY: &str = "peer_addr";
/// The node's admin HTTP address (`ip:port`).
pub(crate) const ADMIN_ADDR_KEY: &str = "admin_addr";
/// Prefix of the relay's own small values (per-node counters and the like).
pub(crate) const EXTRA_PREFIX: &str = "x:";

/// Reads this crate's keys from a chitchat node state.
pub(crate) trait NodeStateExt {
    /// The gossiped lifecycle state; [`NodeState::Joining`] when absent or unparsable.
    fn relay_state(&self) -> NodeState;
    /// The gossiped peer address, if present and parsable.
    fn peer_addr(&self) -> Option<SocketAddr>;
    /// The gossiped admin address, if present and parsable.
    fn admin_addr(&self) -> Option<SocketAddr>;
    /// The relay's extra values, with [`EXTRA_PREFIX`] stripped from their keys.
    fn extra(&self) -> BTreeMap<String, String>;
}

impl NodeStateExt for chitchat::NodeState {
    fn relay_state(&self) -> NodeState {
        self.get(STATE_KEY).and_then(|value| value.parse().ok()).unwrap_or(NodeState::Joining)
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.get(PEER_ADDR_KEY)?.parse().ok()
    }

    fn admin_addr(&self) -> Option<SocketAddr> {
        self.get(ADMIN_ADDR_KEY)?.parse().ok()
    }

    fn extra(&self) -> BTreeMap<String, String> {
        self.iter_prefix(EXTRA_PREFIX)
            .map(|(key, versioned)| (key[EXTRA_PREFIX.len()..].to_string(), versioned.value.clone()))
            .collect()
    }
}

/// The key under which [`Cluster::set_key`](crate::Cluster::set_key) stores `key`.
pub(crate) fn extra_key(key: &str) -> String {
    format!("{EXTRA_PREFIX}{key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keys_and_defaults() {
        let mut state = chitchat::NodeState::for_test();
        assert_eq!(state.relay_state(), NodeState::Joining);
        assert_eq!(state.peer_addr(), None);
        assert!(state.extra().is_empty());

        state.set(STATE_KEY, "ready");
        state.set(PEER_ADDR_KEY, "127.0.0.1:9000");
        state.set(ADMIN_ADDR_KEY, "not an address");
        state.set(extra_key("keys"), "12");
        assert_eq!(state.relay_state(), NodeState::Ready);
        assert_eq!(state.peer_addr(), Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(state.admin_addr(), None);
        assert_eq!(state.extra(), BTreeMap::from([("keys".to_string(), "12".to_string())]));

        state.set(STATE_KEY, "bogus");
        assert_eq!(state.relay_state(), NodeState::Joining);
    }
}
