//! Where a key's state comes from: the origin management server, or the node that owns the
//! key on the ring.
//!
//! - [`choose`] decides which source a key should have now, as a pure function of what the
//!   cache knows about the key and who owns it on the ring;
//! - [`SourceCell`] is a cache entry's place for its running source: what it is, whether it
//!   answers ([`SourceStatus`]), its refetches and the epochs of its origin streams
//!   ([`Freshness`]); a retired entry refuses a new source;
//! - [`Handoff`] keeps the previous source running until the new one has delivered
//!   (make-before-break), and [`Liveness`] marks the key answered for one source task;
//! - [`HandoverSignal`] fires whenever a handoff ends or a follower comes or goes, so that a
//!   draining node waits on events ([`handover::wait_until`]), not a timer.
//!
//! The relay starts and switches sources; the upstream and peer follower modules run them.

mod cell;
pub mod freshness;
mod handoff;
pub mod handover;

use std::net::SocketAddr;

use xds_relay_cluster::Member;

pub use cell::{RefetchGuard, Retired, SourceCell, SourceStatus};
pub use freshness::{Epochs, Freshness};
pub use handoff::{Handoff, Liveness};
pub use handover::HandoverSignal;

/// Where a key's state should come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The origin management server.
    Origin,
    /// The key's owner node.
    Peer {
        /// The owner's node name.
        name: String,
        /// The owner's peer address.
        addr: SocketAddr,
    },
}

impl Source {
    /// The label shown by the admin API and logs: `origin` or `peer:<node>`.
    pub fn label(&self) -> String {
        match self {
            Self::Origin => "origin".to_owned(),
            Self::Peer { name, .. } => format!("peer:{name}"),
        }
    }

    /// True for the origin.
    pub fn is_origin(&self) -> bool {
        matches!(self, Self::Origin)
    }
}

/// What the node knows about a key, besides its owner, when choosing its source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyPlacement {
    /// The node runs alone (no ring).
    pub standalone: bool,
    /// A private pass-through key: never placed on the ring.
    pub private: bool,
    /// Other nodes follow the key through this node.
    pub followed: bool,
}

/// The source a key should have now, given its `placement` and its `owner` on the ring
/// (`None`: the ring is empty).
///
/// The origin when the node runs alone, for a private key, when other nodes follow the key
/// through this node (so there are no forwarding loops), when this node owns the key, when
/// the ring is empty, or when the owner has not gossiped a peer address yet; otherwise the
/// owner node.
pub fn choose(placement: KeyPlacement, owner: Option<&Member>) -> Source {
    if placement.standalone || placement.private || placement.followed {
        return Source::Origin;
    }
    match owner {
        Some(owner) if !owner.is_self => match owner.peer_addr {
            Some(addr) => Source::Peer { name: owner.name.clone(), addr },
            None => Source::Origin,
        },
        _ => Source::Origin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use xds_relay_cluster::NodeState;

    fn member(name: &str, is_self: bool, peer: Option<&str>) -> Member {
        Member {
            name: name.to_owned(),
            generation: 1,
            gossip_addr: "127.0.0.1:7946".parse().unwrap(),
            peer_addr: peer.map(|p| p.parse().unwrap()),
            admin_addr: None,
            state: NodeState::Ready,
            alive: true,
            is_self,
            last_heartbeat_age_ms: None,
            extra: BTreeMap::new(),
            verified: true,
        }
    }

    const CLUSTERED: KeyPlacement = KeyPlacement { standalone: false, private: false, followed: false };

    #[test]
    fn a_key_owned_elsewhere_comes_from_its_owner() {
        let owner = member("b", false, Some("127.0.0.2:9000"));
        assert_eq!(
            choose(CLUSTERED, Some(&owner)),
            Source::Peer { name: "b".into(), addr: "127.0.0.2:9000".parse().unwrap() }
        );
        assert_eq!(choose(CLUSTERED, Some(&owner)).label(), "peer:b");
    }

    #[test]
    fn the_origin_serves_whatever_this_node_must_take_itself() {
        let elsewhere = member("b", false, Some("127.0.0.2:9000"));
        assert_eq!(choose(CLUSTERED, Some(&member("a", true, Some("127.0.0.1:9000")))), Source::Origin, "owned here");
        assert_eq!(choose(CLUSTERED, None), Source::Origin, "empty ring");
        assert_eq!(choose(CLUSTERED, Some(&member("b", false, None))), Source::Origin, "owner without a peer address");
        for placement in [
            KeyPlacement { standalone: true, ..CLUSTERED },
            KeyPlacement { private: true, ..CLUSTERED },
            KeyPlacement { followed: true, ..CLUSTERED },
        ] {
            assert_eq!(choose(placement, Some(&elsewhere)), Source::Origin, "{placement:?}");
        }
    }
}
