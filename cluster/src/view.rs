//! [`ClusterView`]: what a node knows of the cluster at one moment. Pure.
//!
//! Role: bundle the members, the ring computed from them and a version, and decide whether a
//! new observation is a *change* worth publishing.
//!
//! Invariants:
//!
//! - `members` is sorted by name, one per name, and includes self and dead members.
//! - `ring` is exactly [`Ring::build`] over the members for which [`Member::is_on_ring`] holds.
//! - `unverified` holds the unverified entries hidden behind a member of the same name (a
//!   restarted node before its verification, or a node claiming another's name); they are
//!   never on the ring.
//! - Publishing a new observation (`ClusterView::next`) bumps `version` only when the topology
//!   changed (a member appeared, disappeared, changed generation, addresses, state or
//!   liveness); heartbeat ages and extra values are refreshed in place under the same version.

use serde::Serialize;

use crate::member::Member;
use crate::ring::Ring;

/// What a node knows of the cluster at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterView {
    /// Every known member, sorted by name: self, live and dead ones (`alive = false`).
    pub members: Vec<Member>,
    /// The ring over the live, ready, verified members that gossip a peer address.
    pub ring: Ring,
    /// Unverified entries that lost the fold to a member of the same name, sorted by name and
    /// generation (empty in a cluster that does not require verification).
    pub unverified: Vec<Member>,
    /// Grows by one on each change of membership, state or liveness.
    pub version: u64,
}

impl ClusterView {
    /// The view of `members` (sorted by name, one per name) at `version`.
    pub(crate) fn new(members: Vec<Member>, virtual_nodes: u32, version: u64) -> ClusterView {
        debug_assert!(members.windows(2).all(|w| w[0].name < w[1].name), "members sorted and unique");
        let on_ring: Vec<String> = members.iter().filter(|m| m.is_on_ring()).map(|m| m.name.clone()).collect();
        ClusterView { ring: Ring::build(&on_ring, virtual_nodes), members, unverified: Vec::new(), version }
    }

    /// This view with `unverified` as its list of hidden unverified entries.
    pub(crate) fn with_unverified(mut self, unverified: Vec<Member>) -> ClusterView {
        self.unverified = unverified;
        self
    }

    /// The view that follows this one given freshly observed `members` (and hidden
    /// `unverified` entries), and whether it is a change (a new version) or the same topology
    /// with refreshed ages and extra values.
    pub(crate) fn next(&self, members: Vec<Member>, unverified: Vec<Member>) -> (ClusterView, bool) {
        let same_list = |old: &[Member], new: &[Member]| {
            old.len() == new.len() && old.iter().zip(new).all(|(o, n)| o.same_topology(n))
        };
        if same_list(&self.members, &members) && same_list(&self.unverified, &unverified) {
            (ClusterView { members, ring: self.ring.clone(), unverified, version: self.version }, false)
        } else {
            (ClusterView::new(members, self.ring.virtual_nodes(), self.version + 1).with_unverified(unverified), true)
        }
    }

    /// The member that owns `key`, or `None` when the ring is empty.
    pub fn owner(&self, key: &str) -> Option<&Member> {
        self.member(self.ring.owner(key)?)
    }

    /// The member called `name`, if known.
    pub fn member(&self, name: &str) -> Option<&Member> {
        let index = self.members.binary_search_by(|m| m.name.as_str().cmp(name)).ok()?;
        Some(&self.members[index])
    }

    /// The local node's member.
    ///
    /// # Panics
    ///
    /// Never for a view published by a [`Cluster`](crate::Cluster), which always includes
    /// self; panics on a hand-built view without one.
    pub fn self_member(&self) -> &Member {
        self.members.iter().find(|m| m.is_self).expect("a cluster view always includes self")
    }

    /// The members that are alive (self included).
    pub fn live_members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.alive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::member::NodeState;
    use crate::member::tests::member;

    #[test]
    fn ring_holds_only_eligible_members() {
        let mut joining = member("b", 1, true);
        joining.state = NodeState::Joining;
        let mut no_peer = member("d", 1, true);
        no_peer.peer_addr = None;
        let mut unverified = member("f", 1, true);
        unverified.verified = false;
        let members =
            vec![member("a", 1, true), joining, member("c", 1, false), no_peer, member("e", 1, true), unverified];
        let view = ClusterView::new(members, 16, 1);
        assert_eq!(view.ring.members(), ["a".to_string(), "e".to_string()]);
        assert_eq!(view.member("c").map(|m| m.alive), Some(false));
        assert!(view.member("z").is_none());
        let owner = view.owner("some-key").unwrap();
        assert!(owner.name == "a" || owner.name == "e");
        assert_eq!(view.live_members().count(), 5);
    }

    #[test]
    fn version_moves_only_on_topology_changes() {
        let view = ClusterView::new(vec![member("a", 1, true), member("b", 1, true)], 16, 1);

        let mut aged = view.members.clone();
        aged[1].last_heartbeat_age_ms = Some(300);
        let (refreshed, changed) = view.next(aged, vec![]);
        assert!(!changed);
        assert_eq!(refreshed.version, 1);
        assert_eq!(refreshed.members[1].last_heartbeat_age_ms, Some(300));

        let mut dead = refreshed.members.clone();
        dead[1].alive = false;
        let (next, changed) = refreshed.next(dead, vec![]);
        assert!(changed);
        assert_eq!(next.version, 2);
        assert_eq!(next.ring.members(), ["a".to_string()]);

        let (next, changed) = next.next(vec![member("a", 1, true)], vec![]);
        assert!(changed, "a member disappearing is a change");
        assert_eq!(next.version, 3);

        let mut claimant = member("a", 9, true);
        claimant.verified = false;
        let (next, changed) = next.next(vec![member("a", 1, true)], vec![claimant]);
        assert!(changed, "a new unverified entry is a change");
        assert_eq!(next.version, 4);
        assert_eq!(next.ring.members(), ["a".to_string()]);
    }

    #[test]
    fn serializes_for_the_admin_api() {
        let view = ClusterView::new(vec![member("a", 1, true)], 16, 7);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["version"], 7);
        assert_eq!(json["ring"]["members"][0], "a");
        assert_eq!(json["members"][0]["state"], "ready");
        assert_eq!(json["members"][0]["peer_addr"], "127.0.0.1:9000");
        assert_eq!(json["members"][0]["verified"], true);
        assert_eq!(json["unverified"], serde_json::json!([]));
    }
}
