//! The delta (incremental) subscription rules of one stream and one type, as pure functions.
//!
//! - Subscription changes are applied whatever the nonce: the nonce only correlates ACKs.
//! - The first request of a type with empty subscribe and unsubscribe lists means wildcard
//!   (legacy); `*` subscribes to wildcard explicitly and unsubscribing `*` ends it.
//! - Every explicitly subscribed name is answered, even when unchanged: with the resource,
//!   or in `removed_resources` when it does not exist. Only names the client declared in
//!   `initial_resource_versions` at the version it holds are not resent.
//! - `xdstp://` names are kept and compared in their canonical spelling (context parameters
//!   sorted, see [`crate::xdstp`]). A glob collection (`xdstp://auth/type/path/*`) wants
//!   every member; subscribing to it (re)sends its members, and it is answered by them, or,
//!   when the collection has no member once fetched, by the glob's name in
//!   `removed_resources` (the collection is empty). Members leaving the collection are
//!   removed like any resource.
//! - A client holding `*` and X that unsubscribes X is answered about X (it is still wanted
//!   through the wildcard: resent if it exists, removed if not).
//! - Resources are compared by content-hash version with what the client holds, so a client
//!   reconnecting to any relay node receives only what differs.
//! - A client brought in line with the state a new state was computed from, whose
//!   subscription has not changed since, is diffed against the names that changed only
//!   ([`KeyState::changes_since`]); the result is the full diff's (tests compare both).
//! - What a stream keeps per name is small: names are shared (the interest's, interned by
//!   the key's entry, or the state's), and a held version is 16 bytes when it is one of the
//!   relay's content-hash versions ([`Held`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use std::borrow::Cow;

use crate::cache::{Interest, KeyState, Name, Names, Resource};
use crate::constraints::Params;
use crate::xdstp;

/// A version a delta client holds. The relay's own versions (32 lowercase hex digits) are
/// kept as their 16 bytes; any other version (declared by a reconnecting client) as sent.
/// Two `Held` are equal exactly when the versions they were made from are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// A content-hash version, decoded.
    Hash([u8; 16]),
    /// Any other version.
    Other(Box<str>),
}

impl Held {
    /// The held form of `version`.
    pub fn new(version: &str) -> Self {
        match decode_hash(version) {
            Some(hash) => Self::Hash(hash),
            None => Self::Other(version.into()),
        }
    }

    /// True when this is `version`.
    pub fn is(&self, version: &str) -> bool {
        match self {
            Self::Hash(hash) => decode_hash(version).as_ref() == Some(hash),
            Self::Other(held) => **held == *version,
        }
    }
}

/// The bytes of a version made of exactly 32 lowercase hex digits (so that decoding is
/// one-to-one).
fn decode_hash(version: &str) -> Option<[u8; 16]> {
    let digits = version.as_bytes();
    if digits.len() != 32 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut hash = [0; 16];
    for (byte, pair) in hash.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(hash)
}

/// Where a delta stream stands for one type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaSubscription {
    /// What the client wants now.
    pub interest: Interest,
    /// True once a request of the type was seen.
    pub started: bool,
    /// What the client holds: name → version.
    pub known: HashMap<Name, Held>,
    /// Names the client must be told about even if unchanged or absent.
    pub must_answer: BTreeSet<Name>,
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

    /// Answers `name` again on the next diff against `state`: with the resource when it
    /// exists, else with its removal (when `state` covers it), whatever the client holds.
    pub fn answer_again(&mut self, state: &KeyState, name: &str) {
        self.forget(name);
        let name = state.name(name).cloned().unwrap_or_else(|| Name::new(name));
        self.must_answer.insert(name);
        self.synced = None;
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

/// Sets the subscription's dynamic parameters (xDS-TP2; an empty set is none). Returns true
/// when they changed: every variant the client holds is then compared again.
pub fn apply_params(sub: &mut DeltaSubscription, params: Params) -> bool {
    let params = if params.is_empty() { Vec::new() } else { vec![params] };
    if sub.interest.params == params {
        return false;
    }
    sub.interest.params = params;
    sub.synced = None;
    true
}

/// Applies a request's subscription changes. Returns true when the interest changed or a
/// name must be answered.
pub fn apply_change(sub: &mut DeltaSubscription, change: DeltaChange<'_>) -> bool {
    let first = !sub.started;
    sub.started = true;
    let unchanged = change.subscribe.is_empty() && change.unsubscribe.is_empty();
    if first || !unchanged {
        sub.synced = None;
    }
    // `xdstp://` names are kept in their canonical spelling (see `crate::xdstp`).
    let declared: HashMap<Cow<'_, str>, &String> =
        change.initial_versions.iter().map(|(name, version)| (xdstp::canonical(name), version)).collect();
    if first {
        sub.known = declared.iter().map(|(name, version)| (Name::new(name.as_ref()), Held::new(version))).collect();
        if unchanged {
            sub.interest.wildcard = true;
        }
    }
    if unchanged {
        return first || !sub.must_answer.is_empty();
    }
    let before = sub.interest.clone();
    let mut wildcard = sub.interest.wildcard;
    let mut names: BTreeSet<Name> = sub.interest.names.as_slice().iter().cloned().collect();
    let mut names_changed = false;
    for name in change.subscribe {
        if name == "*" {
            wildcard = true;
            continue;
        }
        let name = xdstp::canonical(name);
        let name = match names.get(name.as_ref()) {
            Some(held) => held.clone(),
            None => {
                let name = Name::new(name);
                names.insert(name.clone());
                names_changed = true;
                name
            }
        };
        // A name declared in initial_resource_versions is held at that version; any other
        // subscribed name is (re)sent whatever the client had. A glob collection's members
        // are resent the same way.
        if xdstp::is_glob(&name) {
            let collection = Interest::names([name.as_str()]);
            sub.known.retain(|n, _| declared.contains_key(n.as_str()) || !collection.wants(n));
        }
        if !declared.contains_key(name.as_str()) {
            sub.known.remove(name.as_str());
            sub.must_answer.insert(name);
        }
    }
    for name in change.unsubscribe {
        if name == "*" {
            wildcard = false;
            let named = Interest { names: Names::from_sorted(names.iter().cloned().collect()), ..Interest::default() };
            sub.known.retain(|n, _| named.wants(n));
            // Names kept to answer only through the wildcard are no longer wanted.
            sub.must_answer.retain(|n| named.wants(n));
            continue;
        }
        let name = xdstp::canonical(name);
        if xdstp::is_glob(&name) && !wildcard {
            // The client drops the collection's members itself: a later subscription resends them.
            let collection = Interest::names([name.as_ref()]);
            sub.known.retain(|n, _| !collection.wants(n));
        }
        let held = names.take(name.as_ref());
        names_changed |= held.is_some();
        sub.must_answer.remove(name.as_ref());
        let known = sub.known.remove_entry(name.as_ref());
        if wildcard {
            let name = held.or(known.map(|(name, _)| name)).unwrap_or_else(|| Name::new(name));
            sub.must_answer.insert(name);
        }
    }
    sub.interest.wildcard = wildcard;
    if names_changed {
        sub.interest.names = Names::from_sorted(names.into_iter().collect());
    }
    first || sub.interest != before || !sub.must_answer.is_empty()
}

/// The shared copy of `name`: the interest's (interned by the key's entry) or the state's.
fn shared_name(sub: &DeltaSubscription, state: &KeyState, name: &str) -> Name {
    sub.interest.names.get(name).or_else(|| state.name(name)).cloned().unwrap_or_else(|| Name::new(name))
}

/// Records that the client now holds `resource` (named `name`); true when it did not.
fn hold(sub: &mut DeltaSubscription, state: &KeyState, name: &str, resource: &Resource) -> bool {
    let name = &*xdstp::canonical(name);
    match sub.known.get_mut(name) {
        Some(held) if held.is(&resource.version) => false,
        Some(held) => {
            *held = Held::new(&resource.version);
            true
        }
        None => {
            let name = shared_name(sub, state, name);
            sub.known.insert(name, Held::new(&resource.version));
            true
        }
    }
}

/// Computes what the client must receive from `state`, and records it as held.
///
/// Removals are only claimed for names the state was fetched for ([`KeyState::covers`]):
/// a name not yet asked upstream stays pending instead of being reported missing.
pub fn compute(sub: &mut DeltaSubscription, state: &KeyState) -> DeltaUpdate {
    if !state.is_ready() {
        return DeltaUpdate::default();
    }
    // A glob collection still to answer is answered by its members, or as removed when it
    // has none: that takes the full diff.
    let globs = sub.must_answer.iter().any(|name| xdstp::is_glob(name));
    let update = match sub.synced.filter(|_| !globs).and_then(|id| state.changes_since(id)) {
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
        if hold(sub, state, name, resource) {
            update.resources.push(resource.clone());
        }
        sub.must_answer.remove(&*xdstp::canonical(name));
    }
    for name in removed {
        if !state.covers(name) {
            continue;
        }
        let canonical = xdstp::canonical(name);
        if sub.known.remove(&*canonical).is_some() {
            sub.must_answer.remove(&*canonical);
            update.removed.push(name.clone());
        } else if sub.interest.wants(name) && sub.must_answer.remove(&*canonical) {
            update.removed.push(name.clone());
        }
    }
    update.removed.sort();
    update
}

/// True when `state` was fetched for `name` and for the client's dynamic parameters, so
/// that the absence of a variant for them means there is none.
fn covers(state: &KeyState, interest: &Interest, name: &str) -> bool {
    state.covers(name) && interest.params.iter().all(|p| state.coverage.params.contains(p))
}

/// [`compute`] against every resource the client wants and every name it holds.
fn compute_full(sub: &mut DeltaSubscription, state: &KeyState) -> DeltaUpdate {
    let mut update = DeltaUpdate::default();
    let interest = sub.interest.clone();
    // With variants, the names that have a variant for the client (no lookup per name).
    let mut selected = std::collections::HashSet::new();
    for resource in state.select(&interest) {
        let Some(name) = &resource.name else { continue };
        if hold(sub, state, name, resource) {
            update.resources.push(resource.clone());
        }
        let canonical = xdstp::canonical(name);
        sub.must_answer.remove(&*canonical);
        if state.variants {
            selected.insert(canonical.into_owned());
        }
    }
    let exists = |name: &str| if state.variants { selected.contains(name) } else { state.get(name).is_some() };
    // A fetched glob collection with members is answered by them (sent now, or already held
    // at their version); one without members is answered as removed, below.
    sub.must_answer.retain(|name| !(xdstp::is_glob(name) && state.covers(name) && state.has_member(name)));
    let gone: Vec<Name> =
        sub.known.keys().filter(|name| !exists(name) && covers(state, &interest, name)).cloned().collect();
    for name in gone {
        sub.known.remove(&name);
        sub.must_answer.remove(&name);
        update.removed.push(name.to_string());
    }
    let absent: Vec<Name> = sub
        .must_answer
        .iter()
        .filter(|name| sub.interest.wants(name) && !exists(name) && covers(state, &interest, name))
        .cloned()
        .collect();
    for name in absent {
        sub.must_answer.remove(&name);
        update.removed.push(name.to_string());
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
        let v1 = state("1", &[("a", 1), ("b", 1), ("c", 1)], Interest::wildcard());
        let mut initial = HashMap::new();
        initial.insert("a".to_owned(), v1.get("a").unwrap().version.clone());
        initial.insert("c".to_owned(), v1.get("a").unwrap().version.to_uppercase());
        initial.insert("b".to_owned(), "stale".to_owned());
        initial.insert("gone".to_owned(), "old".to_owned());
        let mut sub = DeltaSubscription::default();
        apply_change(&mut sub, change(&strings(&["*"]), &[], &initial));
        let update = compute(&mut sub, &v1);
        assert_eq!(names(&update), ["b", "c"], "a version in other case is another version");
        assert_eq!(update.removed, ["gone"]);
    }

    /// A held version equals exactly the versions equal to the one it was made from.
    #[test]
    fn held_versions_compare_as_the_strings_do() {
        let hash = "0123456789abcdef0123456789abcdef";
        let versions = [
            hash,
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde",
            "+123456789abcdef0123456789abcdef",
            "1",
            "",
        ];
        for a in versions {
            for b in versions {
                assert_eq!(Held::new(a).is(b), a == b, "{a:?} {b:?}");
                assert_eq!(Held::new(a) == Held::new(b), a == b, "{a:?} {b:?}");
            }
        }
        assert_eq!(Held::new(hash), Held::Hash(*b"\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67\x89\xab\xcd\xef"));
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

    /// Unsubscribing X and `*` in one request leaves nothing to answer about X: it is no
    /// longer wanted, so later ACKs need no answer either.
    #[test]
    fn unsubscribing_the_wildcard_drops_names_kept_for_it() {
        let none = HashMap::new();
        let mut sub = DeltaSubscription::default();
        assert!(apply_change(&mut sub, change(&strings(&["*"]), &strings(&["a", "*"]), &none)));
        assert!(sub.must_answer.is_empty(), "{:?}", sub.must_answer);
        assert!(!apply_change(&mut sub, change(&[], &[], &none)), "an ACK needs no answer");
        let mut sub = DeltaSubscription::default();
        apply_change(&mut sub, change(&strings(&["*", "b"]), &[], &none));
        apply_change(&mut sub, change(&[], &strings(&["a", "*"]), &none));
        assert_eq!(sub.must_answer.iter().map(|n| n.as_str()).collect::<Vec<_>>(), ["b"], "b is still wanted");
    }

    /// xDS-TP1 glob collections: members are sent, join and leave like resources; an empty
    /// collection is answered by the glob in `removed_resources`; re-subscribing resends.
    #[test]
    fn glob_collections_answer_with_their_members() {
        let none = HashMap::new();
        let glob = "xdstp://a/envoy.config.cluster.v3.Cluster/fleet/*";
        let m = |id: &str| format!("xdstp://a/envoy.config.cluster.v3.Cluster/fleet/{id}");
        let (m1, m2, other) = (m("c1"), m("c2"), "xdstp://a/envoy.config.cluster.v3.Cluster/x/c1");
        let coverage = || Interest::names([glob]);
        let mut sub = DeltaSubscription::default();
        assert!(apply_change(&mut sub, change(&strings(&[glob]), &[], &none)));
        let v1 = state("1", &[(m1.as_str(), 1), (other, 1), ("plain", 1)], coverage());
        let update = compute(&mut sub, &v1);
        assert_eq!(names(&update), std::slice::from_ref(&m1));
        assert!(update.removed.is_empty() && sub.must_answer.is_empty(), "{update:?} {:?}", sub.must_answer);
        let v2 = state("2", &[(m1.as_str(), 1), (m2.as_str(), 1)], coverage());
        assert_eq!(names(&compute(&mut sub, &v2)), std::slice::from_ref(&m2), "a new member is sent");
        let v3 = state("3", &[(m2.as_str(), 1)], coverage());
        let update = compute(&mut sub, &v3);
        assert!(update.resources.is_empty());
        assert_eq!(update.removed, std::slice::from_ref(&m1), "a member that left is removed");
        apply_change(&mut sub, change(&strings(&[glob]), &[], &none));
        assert_eq!(names(&compute(&mut sub, &v3)), std::slice::from_ref(&m2), "re-subscribing resends the members");
        let empty = state("4", &[], coverage());
        let update = compute(&mut sub, &empty);
        assert_eq!(update.removed, [m2]);
        let mut fresh = DeltaSubscription::default();
        apply_change(&mut fresh, change(&strings(&[glob]), &[], &none));
        let update = compute(&mut fresh, &empty);
        assert_eq!(update.removed, [glob], "an empty collection is answered by the glob's removal");
        assert!(compute(&mut fresh, &empty).is_empty(), "once");
        let unfetched = state("1", &[], Interest::names(["plain"]));
        let mut early = DeltaSubscription::default();
        apply_change(&mut early, change(&strings(&[glob]), &[], &none));
        assert!(compute(&mut early, &unfetched).is_empty(), "no claim before the glob is fetched");
    }

    /// xDS-TP1: names are kept canonical, so a client's spelling of the context parameters
    /// does not matter, and a reconnect's declared versions match in any spelling.
    #[test]
    fn xdstp_names_match_in_any_parameter_order() {
        let none = HashMap::new();
        let canonical = "xdstp://a/T/x?a=1&b=2";
        let mut sub = DeltaSubscription::default();
        apply_change(&mut sub, change(&strings(&["xdstp://a/T/x?b=2&a=1"]), &[], &none));
        assert_eq!(sub.interest, Interest::names([canonical]));
        apply_change(&mut sub, change(&[], &strings(&[canonical]), &none));
        assert!(sub.interest.is_empty(), "unsubscribed in the other spelling");
        let v1 = state("1", &[("a", 1)], Interest::wildcard());
        let mut initial = HashMap::new();
        initial.insert("xdstp://a/T/x?b=2&a=1".to_owned(), "v".to_owned());
        let mut sub = DeltaSubscription::default();
        apply_change(&mut sub, change(&strings(&[canonical]), &[], &initial));
        assert!(sub.must_answer.is_empty(), "declared at a version: not resent");
        assert!(sub.known.contains_key(canonical));
        let _ = compute(&mut sub, &v1);
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
