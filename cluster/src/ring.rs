//! The consistent-hash ring and ownership changes. Pure: no I/O, no clock, no gossip.
//!
//! Role: map a key to the node that owns it, and say which keys move when membership changes.
//! The ring is `consistent_hash_ring` 0.8 with [`virtual nodes`](Ring::build) per member, hashed
//! with FNV-1a (implemented here, so the hash is fixed by this file, not by a dependency or by
//! `std`'s randomly seeded hasher).
//!
//! Invariants:
//!
//! - Deterministic: [`Ring::build`] depends only on the *set* of member names and the virtual
//!   node count. Every node that sees the same members computes the same owner for every key.
//! - Minimal movement: removing a member moves only the keys it owned; adding one moves keys
//!   only *to* it.
//! - [`Ring::position`] is the hash the lookup uses, so a drawing made from [`Ring::tokens`] and
//!   [`Ring::position`] agrees with [`Ring::owner`].
//! - Immutable: a new membership means a new `Ring` (cheap to clone, shared through an `Arc`).
//!
//! The hash is part of the cluster protocol: nodes that hash differently disagree on owners.
//! `owners_are_pinned` guards it. The vnode chain hashes `u64`s in native byte order, so a
//! cluster must not mix little- and big-endian nodes.

use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use serde::Serialize;

/// 64-bit FNV-1a with a final avalanche mix (murmur3's fmix64). Hashes `str` keys as `std`
/// feeds them to any hasher (the bytes, then `0xff`) and the ring's vnode chain as
/// native-endian `u64`s. The mix matters: plain FNV-1a places keys that share a long prefix
/// (`staging_rds_route_1`, `…_2`, …) next to each other, so one node would own most of them.
#[derive(Debug, Clone, Copy)]
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

/// murmur3's 64-bit finalizer: every input bit affects every output bit.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        fmix64(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

type FnvBuildHasher = BuildHasherDefault<Fnv1a>;

/// A consistent-hash ring over member names: an immutable value, cheap to clone.
#[derive(Clone)]
pub struct Ring {
    inner: Arc<RingInner>,
}

struct RingInner {
    /// Sorted, deduplicated.
    members: Vec<String>,
    virtual_nodes: u32,
    ring: consistent_hash_ring::Ring<String, FnvBuildHasher>,
}

impl Ring {
    /// Builds the ring of `members` (node names) with `virtual_nodes` tokens each.
    ///
    /// Deterministic: the order of `members` and duplicates in it do not matter. A
    /// `virtual_nodes` of 0 is treated as 1.
    pub fn build(members: &[String], virtual_nodes: u32) -> Ring {
        let mut members = members.to_vec();
        members.sort();
        members.dedup();
        let virtual_nodes = virtual_nodes.max(1);
        let ring = consistent_hash_ring::RingBuilder::new(FnvBuildHasher::default())
            .vnodes(virtual_nodes as usize)
            .nodes_iter(members.iter().cloned())
            .build();
        debug_assert_eq!(ring.len(), members.len());
        Ring { inner: Arc::new(RingInner { members, virtual_nodes, ring }) }
    }

    /// The ring with no members: every key has no owner.
    pub fn empty(virtual_nodes: u32) -> Ring {
        Ring::build(&[], virtual_nodes)
    }

    /// The member that owns `key`, or `None` when the ring is empty.
    pub fn owner(&self, key: &str) -> Option<&str> {
        self.inner.ring.try_get(key).map(String::as_str)
    }

    /// The members on the ring, sorted by name.
    pub fn members(&self) -> &[String] {
        &self.inner.members
    }

    /// The number of virtual nodes per member this ring was built with.
    pub fn virtual_nodes(&self) -> u32 {
        self.inner.virtual_nodes
    }

    /// Whether the ring has no members.
    pub fn is_empty(&self) -> bool {
        self.inner.members.is_empty()
    }

    /// The ring's tokens in increasing position, for drawing: `(position, owner)`.
    ///
    /// A key at position `p` belongs to the first token at or after `p`, wrapping around to
    /// the first token past the last one; so a token owns the arc from the previous token
    /// (exclusive) to itself (inclusive). Consecutive virtual nodes of one owner are merged into
    /// one token (the drawing is the same), so a ring with one member has a single token at
    /// `u64::MAX` (the whole circle). Empty for an empty ring.
    pub fn tokens(&self) -> Vec<(u64, String)> {
        let mut tokens: Vec<(u64, String)> =
            self.inner.ring.resident_ranges().map(|arc| (*arc.keys().end(), arc.node().clone())).collect();
        // `resident_ranges` ends with the wrap-around arc (last token, u64::MAX], owned by the
        // first token's node: it is part of the first token's arc, not a token of its own.
        if tokens.len() > 1 && tokens.last().is_some_and(|(end, _)| *end == u64::MAX) {
            tokens.pop();
        }
        tokens
    }

    /// Where `key` lands on the ring (the hash [`Ring::owner`] looks up), in `0..=u64::MAX`.
    pub fn position(key: &str) -> u64 {
        let mut hasher = Fnv1a::default();
        key.hash(&mut hasher);
        hasher.finish()
    }
}

impl PartialEq for Ring {
    /// Rings are equal when built from the same members and virtual node count (the ring is a
    /// function of those).
    fn eq(&self, other: &Ring) -> bool {
        self.inner.members == other.inner.members && self.inner.virtual_nodes == other.inner.virtual_nodes
    }
}

impl Eq for Ring {}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("members", &self.inner.members)
            .field("virtual_nodes", &self.inner.virtual_nodes)
            .finish()
    }
}

impl Serialize for Ring {
    /// Serialized as `{"members": [...], "virtual_nodes": n}`: enough to rebuild it.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut state = serializer.serialize_struct("Ring", 2)?;
        state.serialize_field("members", &self.inner.members)?;
        state.serialize_field("virtual_nodes", &self.inner.virtual_nodes)?;
        state.end()
    }
}

/// A key whose owner differs between two rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OwnershipChange {
    /// The key.
    pub key: String,
    /// Its owner on the old ring (`None`: the old ring was empty).
    pub from: Option<String>,
    /// Its owner on the new ring (`None`: the new ring is empty).
    pub to: Option<String>,
}

/// Pure: which of `keys` change owner between two rings, in the order of `keys`.
///
/// Keys whose owner is the same on both rings are left out; a key listed twice is reported
/// twice.
pub fn ownership_changes<'a>(old: &Ring, new: &Ring, keys: impl IntoIterator<Item = &'a str>) -> Vec<OwnershipChange> {
    keys.into_iter()
        .filter_map(|key| {
            let from = old.owner(key);
            let to = new.owner(key);
            (from != to).then(|| OwnershipChange {
                key: key.to_string(),
                from: from.map(str::to_string),
                to: to.map(str::to_string),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::DEFAULT_VIRTUAL_NODES;

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cluster-{i}/envoy.config.cluster.v3.Cluster")).collect()
    }

    fn owners(ring: &Ring, keys: &[String]) -> Vec<Option<String>> {
        keys.iter().map(|k| ring.owner(k).map(str::to_string)).collect()
    }

    /// Owner of `key` found from the drawing API only: first token at or after the position.
    fn owner_from_tokens(tokens: &[(u64, String)], key: &str) -> Option<String> {
        let position = Ring::position(key);
        let token = tokens.iter().find(|(t, _)| *t >= position).or(tokens.first());
        token.map(|(_, owner)| owner.clone())
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        let fnv = |bytes: &[u8]| {
            let mut h = Fnv1a::default();
            h.write(bytes);
            h.0
        };
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn deterministic_whatever_the_member_order() {
        let keys = keys(5_000);
        let reference = Ring::build(&names(&["node-a", "node-b", "node-c"]), DEFAULT_VIRTUAL_NODES);
        for order in [["node-c", "node-a", "node-b"], ["node-b", "node-c", "node-a"]] {
            let mut members = names(&order);
            members.push("node-a".into()); // duplicates do not matter either
            let ring = Ring::build(&members, DEFAULT_VIRTUAL_NODES);
            assert_eq!(ring, reference);
            assert_eq!(ring.members(), reference.members());
            assert_eq!(owners(&ring, &keys), owners(&reference, &keys));
            assert_eq!(ring.tokens(), reference.tokens());
        }
        assert_eq!(reference.members(), names(&["node-a", "node-b", "node-c"]).as_slice());
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn owners_are_pinned() {
        // The hash is part of the cluster protocol: nodes of different builds must agree. If
        // this test fails, the ring changed and mixed-version clusters would disagree.
        let ring = Ring::build(&names(&["node-a", "node-b", "node-c"]), DEFAULT_VIRTUAL_NODES);
        let pinned: Vec<_> = PINNED_KEYS.iter().map(|k| ring.owner(k).unwrap()).collect();
        assert_eq!(Ring::position("k0"), 9_073_112_093_690_824_036);
        assert_eq!(pinned, PINNED_OWNERS);
    }

    const PINNED_KEYS: [&str; 10] =
        ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"];
    const PINNED_OWNERS: [&str; 10] =
        ["node-a", "node-c", "node-a", "node-a", "node-a", "node-c", "node-a", "node-b", "node-c", "node-b"];

    /// Keys that differ only in a suffix (typical aggregation keys) still spread out.
    #[test]
    fn keys_sharing_a_prefix_spread_over_the_nodes() {
        let ring = Ring::build(&names(&["relay-1", "relay-2", "relay-3"]), DEFAULT_VIRTUAL_NODES);
        let mut counts = std::collections::BTreeMap::new();
        for i in 0..300 {
            *counts.entry(ring.owner(&format!("staging_rds_route_{i}")).unwrap().to_owned()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| (60..=140).contains(&n)), "{counts:?}");
    }

    #[test]
    fn balanced_with_default_virtual_nodes() {
        let keys = keys(30_000);
        let ring = Ring::build(&names(&["node-a", "node-b", "node-c"]), DEFAULT_VIRTUAL_NODES);
        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        for key in &keys {
            *load.entry(ring.owner(key).unwrap()).or_default() += 1;
        }
        let ideal = keys.len() / 3;
        let (min, max) = (*load.values().min().unwrap(), *load.values().max().unwrap());
        println!(
            "3 nodes, {} keys, {DEFAULT_VIRTUAL_NODES} vnodes: load {load:?}, ideal {ideal}, min {min}, max {max}",
            keys.len()
        );
        assert_eq!(load.len(), 3);
        assert!(min * 4 >= ideal * 3, "min {min} below ideal {ideal} - 25%");
        assert!(max * 4 <= ideal * 5, "max {max} above ideal {ideal} + 25%");
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let keys = keys(30_000);
        let before = Ring::build(&names(&["node-a", "node-b", "node-c"]), DEFAULT_VIRTUAL_NODES);
        let after = Ring::build(&names(&["node-a", "node-c"]), DEFAULT_VIRTUAL_NODES);
        let changes = ownership_changes(&before, &after, keys.iter().map(String::as_str));
        let owned_by_b = keys.iter().filter(|k| before.owner(k) == Some("node-b")).count();
        println!("removing node-b moved {} of {} keys ({owned_by_b} were on node-b)", changes.len(), keys.len());
        assert_eq!(changes.len(), owned_by_b);
        assert!(changes.iter().all(|c| c.from.as_deref() == Some("node-b") && c.to.as_deref() != Some("node-b")));
    }

    #[test]
    fn adding_a_node_moves_a_quarter_to_it() {
        let keys = keys(30_000);
        let before = Ring::build(&names(&["node-a", "node-b", "node-c"]), DEFAULT_VIRTUAL_NODES);
        let after = Ring::build(&names(&["node-a", "node-b", "node-c", "node-d"]), DEFAULT_VIRTUAL_NODES);
        let changes = ownership_changes(&before, &after, keys.iter().map(String::as_str));
        let share = changes.len() as f64 / keys.len() as f64;
        println!("adding node-d moved {} of {} keys ({:.1}%)", changes.len(), keys.len(), share * 100.0);
        assert!((0.18..=0.32).contains(&share), "moved {share}");
        assert!(changes.iter().all(|c| c.to.as_deref() == Some("node-d") && c.from.as_deref() != Some("node-d")));
        // And removing it again restores the original mapping exactly.
        assert_eq!(owners(&Ring::build(&names(&["node-a", "node-b", "node-c"]), 128), &keys), owners(&before, &keys));
    }

    #[test]
    fn tokens_and_position_agree_with_owner() {
        let keys = keys(3_000);
        for members in
            [names(&["solo"]), names(&["node-a", "node-b"]), names(&["node-a", "node-b", "node-c", "node-d"])]
        {
            let ring = Ring::build(&members, DEFAULT_VIRTUAL_NODES);
            let tokens = ring.tokens();
            assert!(tokens.windows(2).all(|w| w[0].0 < w[1].0), "tokens sorted and distinct");
            assert!(tokens.len() <= members.len() * DEFAULT_VIRTUAL_NODES as usize);
            for key in &keys {
                assert_eq!(owner_from_tokens(&tokens, key).as_deref(), ring.owner(key), "key {key}");
            }
        }
        assert!(Ring::empty(DEFAULT_VIRTUAL_NODES).tokens().is_empty());
    }

    #[test]
    fn ownership_changes_small_cases() {
        let empty = Ring::empty(16);
        let a = Ring::build(&names(&["a"]), 16);
        let ab = Ring::build(&names(&["a", "b"]), 16);
        let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
        let keys = || keys.iter().map(String::as_str);

        // Identical rings (including two empty ones): nothing moves.
        for ring in [&empty, &a, &ab] {
            assert!(ownership_changes(ring, &ring.clone(), keys()).is_empty());
        }
        assert!(ownership_changes(&ab, &Ring::build(&names(&["b", "a"]), 16), keys()).is_empty());
        // No keys: nothing moves.
        assert!(ownership_changes(&empty, &ab, std::iter::empty()).is_empty());

        // Empty -> single node: every key moves from nobody to `a`.
        let changes = ownership_changes(&empty, &a, keys());
        assert_eq!(changes.len(), 64);
        assert!(changes.iter().all(|c| c.from.is_none() && c.to.as_deref() == Some("a")));
        assert_eq!(changes[0].key, "k0", "changes keep the order of the keys");

        // Single node -> empty: every key loses its owner.
        let changes = ownership_changes(&a, &empty, keys());
        assert!(changes.len() == 64 && changes.iter().all(|c| c.from.as_deref() == Some("a") && c.to.is_none()));

        // Node added: exactly the keys `b` now owns move, all from `a` to `b`.
        let changes = ownership_changes(&a, &ab, keys());
        let on_b: Vec<&str> = keys().filter(|k| ab.owner(k) == Some("b")).collect();
        assert!(!on_b.is_empty() && on_b.len() < 64);
        assert_eq!(changes.iter().map(|c| c.key.as_str()).collect::<Vec<_>>(), on_b);
        assert!(changes.iter().all(|c| c.from.as_deref() == Some("a") && c.to.as_deref() == Some("b")));

        // Node removed: the mirror image.
        let back = ownership_changes(&ab, &a, keys());
        assert_eq!(back.len(), changes.len());
        assert!(back.iter().all(|c| c.from.as_deref() == Some("b") && c.to.as_deref() == Some("a")));

        // A single key, listed twice, is reported twice.
        let twice = ownership_changes(&empty, &a, ["k", "k"]);
        assert_eq!(twice, vec![OwnershipChange { key: "k".into(), from: None, to: Some("a".into()) }; 2]);
    }
}
