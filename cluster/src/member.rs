//! One node of the cluster as this node sees it: [`Member`], and its gossiped lifecycle
//! [`NodeState`].
//!
//! Role: the vocabulary shared by the ring, the view and the relay, plus the pure fold from
//! chitchat's entries (one per node *generation*) to members (one per node *name*).
//!
//! Invariants:
//!
//! - The fold (`fold_generations`) returns at most one member per name, sorted by name: the
//!   entry with the highest generation wins, so a restarted node replaces its dead previous
//!   generation instead of appearing twice or being held off the ring by it.
//! - [`Member::is_on_ring`] is the single definition of ring eligibility: alive, `ready`,
//!   verified, and a gossiped peer address.
//! - A verified entry wins the fold over an unverified one of the same name, whatever their
//!   generations: a node that merely *claims* a member's name (with a higher generation) never
//!   displaces the verified member; it stays aside, in the unverified list, until verified.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Node lifecycle as gossiped: joining (not on the ring), ready (on the ring), draining
/// (leaving the ring, still serving).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Started, not yet able to own keys; not on the ring. Every node starts here.
    Joining,
    /// Owns its share of the keys; on the ring (once it also gossips a peer address).
    Ready,
    /// Shutting down: off the ring so its keys move away, but still serving its streams.
    Draining,
}

impl NodeState {
    /// The gossiped spelling: `joining`, `ready` or `draining`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not `joining`, `ready` or `draining`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown node state `{0}`")]
pub struct UnknownNodeState(pub String);

impl FromStr for NodeState {
    type Err = UnknownNodeState;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "joining" => Ok(NodeState::Joining),
            "ready" => Ok(NodeState::Ready),
            "draining" => Ok(NodeState::Draining),
            other => Err(UnknownNodeState(other.to_string())),
        }
    }
}

/// One node of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The node's name (unique in the cluster, stable across restarts).
    pub name: String,
    /// The node's generation: its start time in milliseconds; grows on every restart.
    pub generation: u64,
    /// Where the node receives gossip.
    pub gossip_addr: SocketAddr,
    /// Where peers reach the node's peer gRPC service; `None` until gossiped.
    pub peer_addr: Option<SocketAddr>,
    /// The node's admin HTTP address; `None` until gossiped.
    pub admin_addr: Option<SocketAddr>,
    /// The gossiped lifecycle state ([`NodeState::Joining`] until gossiped).
    pub state: NodeState,
    /// Whether the failure detector considers the node alive (always true for self).
    pub alive: bool,
    /// Whether this member is the local node.
    pub is_self: bool,
    /// Milliseconds since this node last saw the member's heartbeat advance; `None` for self and
    /// for a member whose heartbeat has not been seen yet. Refreshed on every gossip round
    /// without bumping the view version.
    pub last_heartbeat_age_ms: Option<u64>,
    /// The member's values set with [`Cluster::set_key`](crate::Cluster::set_key). Refreshed on
    /// every gossip round without bumping the view version.
    pub extra: BTreeMap<String, String>,
    /// Whether this node has verified that the process at `peer_addr` is this member of this
    /// generation (see [`Cluster::mark_verified`](crate::Cluster::mark_verified)). Always true for
    /// self and in a cluster that does not require verification
    /// ([`ClusterConfig::require_verified_peers`](crate::ClusterConfig::require_verified_peers)).
    pub verified: bool,
}

impl Member {
    /// Whether the member belongs on the ring: alive, `ready`, verified, and with a peer address.
    pub fn is_on_ring(&self) -> bool {
        self.alive && self.verified && self.state == NodeState::Ready && self.peer_addr.is_some()
    }

    /// Whether two members agree on everything a view change is about (identity, addresses,
    /// state, liveness), ignoring the heartbeat age and the extra values, which change all the
    /// time.
    pub(crate) fn same_topology(&self, other: &Member) -> bool {
        type Key<'a> = (&'a str, u64, SocketAddr, Option<SocketAddr>, Option<SocketAddr>, NodeState, bool, bool, bool);
        fn key(m: &Member) -> Key<'_> {
            (&m.name, m.generation, m.gossip_addr, m.peer_addr, m.admin_addr, m.state, m.alive, m.is_self, m.verified)
        }
        key(self) == key(other)
    }
}

/// Folds entries that may hold several generations of one node into one member per name,
/// sorted by name, and returns the unverified entries that lost the fold (sorted by name and
/// generation) beside them.
///
/// A verified entry wins over an unverified one; then the highest generation wins (then an
/// alive entry over a dead one, then the higher gossip address, so the result never depends on
/// input order). A node that restarted under the same name is therefore represented by its new
/// process, alive or not, never by the dead one, once the new process is verified.
pub(crate) fn fold_generations(entries: impl IntoIterator<Item = Member>) -> (Vec<Member>, Vec<Member>) {
    let rank = |m: &Member| (m.verified, m.generation, m.alive, m.gossip_addr);
    let mut by_name: BTreeMap<String, Member> = BTreeMap::new();
    let mut losers = Vec::new();
    for entry in entries {
        match by_name.get(&entry.name) {
            Some(kept) if rank(kept) >= rank(&entry) => losers.push(entry),
            _ => {
                if let Some(replaced) = by_name.insert(entry.name.clone(), entry) {
                    losers.push(replaced);
                }
            }
        }
    }
    let mut unverified: Vec<Member> = losers.into_iter().filter(|m| !m.verified).collect();
    unverified.sort_by(|a, b| (&a.name, a.generation, a.gossip_addr).cmp(&(&b.name, b.generation, b.gossip_addr)));
    (by_name.into_values().collect(), unverified)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ready, alive, remote member for tests.
    pub(crate) fn member(name: &str, generation: u64, alive: bool) -> Member {
        Member {
            name: name.to_string(),
            generation,
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], 7946)),
            peer_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9000))),
            admin_addr: None,
            state: NodeState::Ready,
            alive,
            is_self: false,
            last_heartbeat_age_ms: None,
            extra: BTreeMap::new(),
            verified: true,
        }
    }

    #[test]
    fn node_state_spellings_round_trip() {
        for state in [NodeState::Joining, NodeState::Ready, NodeState::Draining] {
            assert_eq!(state.to_string().parse::<NodeState>(), Ok(state));
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{state}\""));
        }
        assert_eq!("Ready".parse::<NodeState>(), Err(UnknownNodeState("Ready".into())));
    }

    #[test]
    fn ring_eligibility() {
        assert!(member("a", 1, true).is_on_ring());
        assert!(!member("a", 1, false).is_on_ring());
        let mut m = member("a", 1, true);
        m.peer_addr = None;
        assert!(!m.is_on_ring());
        for state in [NodeState::Joining, NodeState::Draining] {
            let mut m = member("a", 1, true);
            m.state = state;
            assert!(!m.is_on_ring());
        }
    }

    #[test]
    fn newest_generation_wins_in_any_order() {
        let old_alive = member("a", 1, true);
        let new_dead = member("a", 2, false);
        let other = member("b", 1, true);
        for entries in [
            vec![old_alive.clone(), new_dead.clone(), other.clone()],
            vec![other.clone(), new_dead.clone(), old_alive.clone()],
        ] {
            assert_eq!(fold_generations(entries), (vec![new_dead.clone(), other.clone()], vec![]));
        }
        // The usual case after a restart: the old generation is dead, the new one alive.
        let (folded, unverified) = fold_generations([member("a", 2, true), member("a", 1, false)]);
        assert_eq!(folded, vec![member("a", 2, true)]);
        assert!(unverified.is_empty());
        assert!(folded[0].is_on_ring());
    }

    #[test]
    fn an_unverified_claimant_never_displaces_a_verified_member() {
        let real = member("a", 1, true);
        let mut claimant = member("a", 9, true);
        claimant.verified = false;
        claimant.gossip_addr = SocketAddr::from(([127, 0, 0, 9], 7946));
        for entries in [vec![real.clone(), claimant.clone()], vec![claimant.clone(), real.clone()]] {
            let (folded, unverified) = fold_generations(entries);
            assert_eq!(folded, vec![real.clone()]);
            assert_eq!(unverified, vec![claimant.clone()]);
        }
        assert!(!claimant.is_on_ring(), "unverified members stay off the ring");
        // Once verified (a real restart), the newer generation wins.
        let mut restarted = claimant.clone();
        restarted.verified = true;
        let (folded, unverified) = fold_generations([real.clone(), restarted.clone()]);
        assert_eq!(folded, vec![restarted]);
        assert!(unverified.is_empty(), "verified losers are not listed");
    }

    #[test]
    fn topology_ignores_heartbeat_age_and_extra() {
        let a = member("a", 1, true);
        let mut b = a.clone();
        b.last_heartbeat_age_ms = Some(120);
        b.extra.insert("keys".into(), "3".into());
        assert!(a.same_topology(&b));
        b.state = NodeState::Draining;
        assert!(!a.same_topology(&b));
    }
}
