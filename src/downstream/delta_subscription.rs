//! The delta (incremental) subscription rules of one stream and one type, as pure functions.
//!
//! - Subscription changes are applied whatever the nonce: the nonce only correlates ACKs.
//! - The first request of a type with empty subscribe and unsubscribe lists means wildcard
//!   (legacy); `*` subscribes to wildcard explicitly and unsubscribing `*` ends it.
//! - Every explicitly subscribed name is answered, even when unchanged: with the resource,
//!   or in `removed_resources` when it does not exist. Only names the client declared in
//!   `initial_resource_versions` at the version it holds are not resent.
//! - A client holding `*` and X that unsubscribes X is answered about X (it is still wanted
//!   through the wildcard: resent if it exists, removed if not).
//! - Resources are compared by content-hash version with what the client holds, so a client
//!   reconnecting to any relay node receives only what differs.
//! - A client brought in line with the state a new state was computed from, whose
//!   subscription has not changed since, is diffed against the names that changed only
//!   ([`KeyState::changes_since`]); the result is the full diff's (tests compare both).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::cache::{Interest, KeyState, Resource};

/// Where a delta stream stands for one type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaSubscription {
    /// What the client wants now.
    pub interest: Interest,
    /// True once a request of the type was seen.
    pub started: bool,
    /// What the client holds: name → version.
    pub known: HashMap<String, String>,
    /// Names the client must be told about even if unchanged or absent.
    pub must_answer: BTreeSet<String>,
    /// [`KeyState::id`] of the state `known` was last brought in line with; reset whenever
    /// `known`, `must_answer` or `interest` change otherwise (see [`DeltaSubscription::forget`]).
    pub synced: Option<u64>,
}

impl DeltaSubscription {
    /// Forgets that the client holds `name`, so the next update sends it again.
    pub fn forget(&mut self, name: &str) {
        if self.known.remove(name).is_some() {
            self.synced = None;
        }
    }
}

/// A delta request's subscription fields.
#[derive(Debug, Clone, Copy)]
pub struct DeltaChange<'a> {
    /// `resource_names_subscribe`.
    pub subscribe: &'a [String],
    /// `resource_names_unsubscribe`.
    pub unsubscribe: &'a [String],
    /// `initial_resource_versions`.
    pub initial_versions: &'a HashMap<String, String>,
}

/// What to send a client: resources that differ from what it holds, and removals.
#[derive(Debug, Clone, Default)]
pub struct DeltaUpdate {
    /// Resources to send.
    pub resources: Vec<Arc<Resource>>,
    /// Names to list in `removed_resources`.
    pub removed: Vec<String>,
}

impl DeltaUpdate {
    /// True when there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }
}

/// Applies a request's subscription changes. Returns true when the interest changed or a
/// name must be answered.
pub fn apply_change(sub: &mut DeltaSubscription, change: DeltaChange<'_>) -> bool {
    let first = !sub.started;
    sub.started = true;
    if first || !change.subscribe.is_empty() || !change.unsubscribe.is_empty() {
        sub.synced = None;
    }
    if first {
        sub.known = change.initial_versions.clone();
        if change.subscribe.is_empty() && change.unsubscribe.is_empty() {
            sub.interest.wildcard = true;
        }
    }
    let before = sub.interest.clone();
    for name in change.subscribe {
        if name == "*" {
            sub.interest.wildcard = true;
            continue;
        }
        sub.interest.names.insert(name.clone());
        // A name declared in initial_resource_versions is held at that version; any other
        // subscribed name is (re)sent whatever the client had.
        if !change.initial_versions.contains_key(name) {
            sub.known.remove(name);
            sub.must_answer.insert(name.clone());
        }
    }
    for name in change.unsubscribe {
        if name == "*" {
            sub.interest.wildcard = false;
            sub.known.retain(|n, _| sub.interest.names.contains(n));
            continue;
        }
        sub.interest.names.remove(name);
        sub.must_answer.remove(name);
        if sub.interest.wildcard {
            sub.known.remove(name);
            sub.must_answer.insert(name.clone());
        } else {
            sub.known.remove(name);
        }
    }
    first || sub.interest != before || !sub.must_answer.is_empty()
}

/// Computes what the client must receive from `state`, and records it as held.
///
/// Removals are only claimed for names the state was fetched for ([`KeyState::covers`]):
/// a name not yet asked upstream stays pending instead of being reported missing.
pub fn compute(sub: &mut DeltaSubscription, state: &KeyState) -> DeltaUpdate {
    if !state.is_ready() {
        return DeltaUpdate::default();
    }
    let update = match sub.synced.and_then(|id| state.changes_since(id)) {
        Some((changed, removed)) => compute_changes(sub, state, changed, removed),
        None => compute_full(sub, state),
    };
    sub.synced = Some(state.id());
    update
}

/// [`compute`] for a client in line with the previous state: looks only at what changed.
fn compute_changes<'a>(
    sub: &mut DeltaSubscription,
    state: &'a KeyState,
    changed: impl Iterator<Item = &'a Arc<Resource>>,
    removed: &[String],
) -> DeltaUpdate {
    let mut update = DeltaUpdate::default();
    for resource in changed {
        let Some(name) = &resource.name else { continue };
        if !sub.interest.wants(name) {
            continue;
        }
        if sub.known.get(name) != Some(&resource.version) {
            sub.known.insert(name.clone(), resource.version.clone());
            update.resources.push(resource.clone());
        }
        sub.must_answer.remove(name);
    }
    for name in removed {
        if !state.covers(name) {
            continue;
        }
        if sub.known.remove(name).is_some() {
            sub.must_answer.remove(name);
            update.removed.push(name.clone());
        } else if sub.interest.wants(name) && sub.must_answer.remove(name) {
            update.removed.push(name.clone());
        }
    }
    update.removed.sort();
    update
}

/// [`compute`] against every resource the client wants and every name it holds.
fn compute_full(sub: &mut DeltaSubscription, state: &KeyState) -> DeltaUpdate {
    let mut update = DeltaUpdate::default();
    for resource in state.select(&sub.interest) {
        let Some(name) = &resource.name else { continue };
        if sub.known.get(name) != Some(&resource.version) {
            sub.known.insert(name.clone(), resource.version.clone());
            update.resources.push(resource.clone());
        }
        sub.must_answer.remove(name);
    }
    let gone: Vec<String> =
        sub.known.keys().filter(|name| state.get(name).is_none() && state.covers(name)).cloned().collect();
    for name in gone {
        sub.known.remove(&name);
        sub.must_answer.remove(&name);
        update.removed.push(name);
    }
    let absent: Vec<String> = sub
        .must_answer
        .iter()
        .filter(|name| sub.interest.wants(name) && state.get(name).is_none() && state.covers(name))
        .cloned()
        .collect();
    for name in absent {
        sub.must_answer.remove(&name);
        update.removed.push(name);
    }
    update.removed.sort();
    update
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::{Any, UInt32Value};
    use prost::{Message, Name};

    fn cluster(name: &str, limit: u32) -> Any {
        let c = Cluster {
            name: name.into(),
            per_connection_buffer_limit_bytes: Some(UInt32Value { value: limit }),
            ..Default::default()
        };
        Any { type_url: Cluster::type_url(), value: c.encode_to_vec() }
    }

    fn state(version: &str, clusters: &[(&str, u32)], coverage: Interest) -> KeyState {
        let response = DiscoveryResponse {
            type_url: xds::CLUSTER.into(),
            version_info: version.into(),
            resources: clusters.iter().map(|(n, l)| cluster(n, *l)).collect(),
            ..Default::default()
        };
        KeyState::empty(xds::CLUSTER).apply(response, &coverage).unwrap().unwrap()
    }

    fn names(update: &DeltaUpdate) -> Vec<String> {
        update.resources.iter().map(|r| r.name.clone().unwrap()).collect()
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn change<'a>(sub: &'a [String], unsub: &'a [String], initial: &'a HashMap<String, String>) -> DeltaChange<'a> {
        DeltaChange { subscribe: sub, unsubscribe: unsub, initial_versions: initial }
    }

    /// Protocol §"Subscribing to resources": an empty first request is a (legacy) wildcard,
    /// and only what changed is sent afterwards.
    #[test]
    fn legacy_wildcard_then_only_changes() {
        let none = HashMap::new();
        let mut sub = DeltaSubscription::default();
        assert!(apply_change(&mut sub, change(&[], &[], &none)));
        assert!(sub.interest.wildcard);
        let v1 = state("1", &[("a", 1), ("b", 1)], Interest::wildcard());
        assert_eq!(names(&compute(&mut sub, &v1)), ["a", "b"]);
        assert!(compute(&mut sub, &v1).is_empty(), "nothing new, nothing sent");
        let v2 = state("2", &[("b", 2), ("c", 1)], Interest::wildcard());
        let update = compute(&mut sub, &v2);
        assert_eq!(names(&update), ["b", "c"]);
        assert_eq!(update.removed, ["a"]);
    }

    /// Protocol §"Knowing when a requested resource does not exist".
    #[test]
    fn a_missing_name_is_answered_as_removed_once_fetched() {
        let none = HashMap::new();
        let mut sub = DeltaSubscription::default();
        apply_change(&mut sub, change(&strings(&["a", "zzz"]), &[], &none));
        let partial = state("1", &[("a", 1)], Interest::names(["a"]));
        let update = compute(&mut sub, &partial);
        assert_eq!(names(&update), ["a"]);
        assert!(update.removed.is_empty(), "zzz was not fetched yet: no claim about it");
        let fetched = state("1", &[("a", 1)], Interest::names(["a", "zzz"]));
        let update = compute(&mut sub, &fetched);
        assert_eq!(update.removed, ["zzz"]);
        assert!(compute(&mut sub, &fetched).is_empty());
    }

    /// Protocol §"Reconnect": only what differs from `initial_resource_versions` is sent.
    #[test]
    fn reconnect_sends_only_differences() {
        let v1 = state("1", &[("a", 1), ("b", 1)], Interest::wildcard());
        let mut initial = HashMap::new();
        initial.insert("a".to_owned(), v1.get("a").unwrap().version.clone());
        initial.insert("b".to_owned(), "stale".to_owned());
        initial.insert("gone".to_owned(), "old".to_owned());
        let mut sub = DeltaSubscription::default();
        apply_change(&mut sub, change(&strings(&["*"]), &[], &initial));
        let update = compute(&mut sub, &v1);
        assert_eq!(names(&update), ["b"]);
        assert_eq!(update.removed, ["gone"]);
    }

    /// Protocol: a re-subscribed name is sent again even when unchanged.
    #[test]
    fn resubscribing_resends() {
        let none = HashMap::new();
        let v1 = state("1", &[("a", 1)], Interest::names(["a"]));
        let mut sub = DeltaSubscription::default();
        apply_change(&mut sub, change(&strings(&["a"]), &[], &none));
        assert_eq!(names(&compute(&mut sub, &v1)), ["a"]);
        apply_change(&mut sub, change(&[], &strings(&["a"]), &none));
        assert!(compute(&mut sub, &v1).is_empty(), "a pure unsubscribe needs no answer");
        apply_change(&mut sub, change(&strings(&["a"]), &[], &none));
        assert_eq!(names(&compute(&mut sub, &v1)), ["a"]);
        apply_change(&mut sub, change(&strings(&["a"]), &[], &none));
        assert_eq!(names(&compute(&mut sub, &v1)), ["a"], "subscribing again to a held name resends it");
    }

    /// Protocol §"Unsubscribing": with `*` and X held, unsubscribing X is answered.
    #[test]
    fn unsubscribing_a_name_covered_by_wildcard_is_answered() {
        let none = HashMap::new();
        let v1 = state("1", &[("x", 1)], Interest::wildcard());
        let mut sub = DeltaSubscription::default();
        apply_change(&mut sub, change(&strings(&["*", "x", "y"]), &[], &none));
        let update = compute(&mut sub, &v1);
        assert_eq!(names(&update), ["x"]);
        assert_eq!(update.removed, ["y"]);
        apply_change(&mut sub, change(&[], &strings(&["x", "y"]), &none));
        let update = compute(&mut sub, &v1);
        assert_eq!(names(&update), ["x"], "x is still wanted through the wildcard: resent");
        assert_eq!(update.removed, ["y"], "y does not exist: removed again");
    }

    /// The diff against the changed names equals the full diff, over random histories of
    /// additions, changes, removals and subscription changes.
    #[test]
    fn incremental_diff_equals_full_diff() {
        let none = HashMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..40 {
            let wildcard = round % 2 == 0;
            let mut fast = DeltaSubscription::default();
            let initial: Vec<String> =
                if wildcard { vec![] } else { (0..12).filter(|_| rand(2) == 0).map(|i| format!("c{i}")).collect() };
            apply_change(&mut fast, change(&initial, &[], &none));
            let mut live: Vec<(String, u32)> = (0..10).map(|i| (format!("c{i}"), 0)).collect();
            let mut full = fast.clone();
            let mut incremental = 0;
            let mut previous: Option<KeyState> = None;
            for version in 0..30 {
                match rand(4) {
                    0 if !live.is_empty() => {
                        live.remove(rand(live.len() as u64) as usize);
                    }
                    1 => live.push((format!("c{}", 10 + rand(6)), 0)),
                    _ => {
                        let len = live.len().max(1) as u64;
                        if let Some(entry) = live.get_mut(rand(len) as usize) {
                            entry.1 += 1;
                        }
                    }
                }
                live.sort();
                live.dedup_by(|a, b| a.0 == b.0);
                if rand(8) == 0 {
                    let names = strings(&[&format!("c{}", rand(16))]);
                    let (sub, unsub) = if rand(2) == 0 { (names.clone(), vec![]) } else { (vec![], names.clone()) };
                    apply_change(&mut fast, change(&sub, &unsub, &none));
                    apply_change(&mut full, change(&sub, &unsub, &none));
                }
                let clusters: Vec<(&str, u32)> = live.iter().map(|(n, g)| (n.as_str(), *g)).collect();
                let response = DiscoveryResponse {
                    type_url: xds::CLUSTER.into(),
                    version_info: version.to_string(),
                    resources: clusters.iter().map(|(n, l)| cluster(n, *l)).collect(),
                    ..Default::default()
                };
                let base = previous.take().unwrap_or_else(|| KeyState::empty(xds::CLUSTER));
                let Some(next) = base.apply(response, &Interest::wildcard()).unwrap() else {
                    previous = Some(base);
                    continue;
                };
                if fast.synced.is_some_and(|id| next.changes_since(id).is_some()) {
                    incremental += 1;
                }
                full.synced = None;
                let (a, b) = (compute(&mut fast, &next), compute(&mut full, &next));
                assert_eq!(names(&a), names(&b), "round {round} version {version}");
                assert_eq!(a.removed, b.removed, "round {round} version {version}");
                assert_eq!(fast.known, full.known);
                assert_eq!(fast.must_answer, full.must_answer);
                previous = Some(next);
            }
            assert!(incremental > 10, "most updates take the incremental path ({incremental})");
        }
    }

    /// Phantom unsubscribes are accepted without error and without answer.
    #[test]
    fn phantom_unsubscribe_is_harmless() {
        let none = HashMap::new();
        let mut sub = DeltaSubscription::default();
        apply_change(&mut sub, change(&strings(&["a"]), &[], &none));
        let v1 = state("1", &[("a", 1)], Interest::names(["a"]));
        compute(&mut sub, &v1);
        apply_change(&mut sub, change(&[], &strings(&["never"]), &none));
        assert!(compute(&mut sub, &v1).is_empty());
        assert_eq!(sub.interest, Interest::names(["a"]));
    }
}
