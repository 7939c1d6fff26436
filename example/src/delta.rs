//! The per-stream delta (incremental) xDS protocol rules of the example server; pure and
//! synchronous, like [`crate::sotw`].
//!
//! For each type on a stream, [`DeltaStreamState`] keeps the subscription (wildcard flag and
//! explicit names) and what the client holds (name → version), seeded from the first request's
//! `initial_resource_versions`. Every answer is the difference between what the subscription
//! covers in the current snapshot and what the client holds.
//!
//! Rules (protocol reference §1.3, §1.5, §1.8, §1.9, §1.13):
//! - an empty `resource_names_subscribe` on the first request of LDS or CDS means wildcard
//!   (legacy); `*` subscribes to the wildcard explicitly, and unsubscribing `*` ends it;
//! - subscription changes apply whatever nonce the request carries;
//! - a name subscribed after the first request is always answered, in `resources` if it exists
//!   or in `removed_resources` if not, even if the client already holds it;
//! - on the first request, names the client already holds at the current version are not resent;
//! - unsubscribing a name while the wildcard is on is answered with that name (still covered) or
//!   its removal; any other pure unsubscribe is not answered;
//! - a publish sends only added or changed resources and removals of names the client holds
//!   that are gone, and sends nothing for a type that did not change;
//! - the first wildcard request of a type is answered even when there is nothing to send.
//!
//! Invariants: no name appears twice in one response (neither within nor across `resources` and
//! `removed_resources`); nonces are unique within the stream; after each response the held map
//! equals what the subscription covers.
//!
//! A resource's version is the lowercase hex of the first 16 bytes of SHA-256 over the type URL
//! and the encoded resource ([`resource_version`]), exactly as the relay computes it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use sha2::{Digest, Sha256};

use crate::publisher::Published;
use crate::snapshot::{self, CLUSTER_TYPE, LISTENER_PREFIX, LISTENER_TYPE};
use crate::sotw::{WILDCARD, ordered};

/// The version of a resource: lowercase hex of the first 16 bytes of
/// SHA-256(`any.type_url` ++ `any.value`).
pub fn resource_version(any: &Any) -> String {
    let digest = Sha256::new().chain_update(any.type_url.as_bytes()).chain_update(&any.value).finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A published snapshot with the version of each of its resources, computed once per publish
/// and shared by every delta stream.
#[derive(Debug)]
pub struct DeltaSnapshot {
    published: Arc<Published>,
    /// Type URL → name → version.
    versions: BTreeMap<String, BTreeMap<String, String>>,
}

// === impl DeltaSnapshot ===

impl DeltaSnapshot {
    /// Computes the versions of every resource of `published`.
    pub fn new(published: Arc<Published>) -> Self {
        let versions = published
            .snapshot
            .resources
            .iter()
            .map(|(type_url, all)| {
                let by_name = all.iter().map(|(name, any)| (name.clone(), resource_version(any))).collect();
                (type_url.clone(), by_name)
            })
            .collect();
        Self { published, versions }
    }

    /// The snapshot.
    pub fn published(&self) -> &Arc<Published> {
        &self.published
    }

    /// The names of every resource of `type_url`, with their versions.
    pub fn versions_of(&self, type_url: &str) -> Option<&BTreeMap<String, String>> {
        self.versions.get(type_url)
    }

    /// The version of `name`, if it exists; LDS names without the `listener_` prefix exist as
    /// API listeners, as in SotW.
    pub fn version(&self, type_url: &str, name: &str) -> Option<String> {
        if let Some(version) = self.versions.get(type_url).and_then(|all| all.get(name)) {
            return Some(version.clone());
        }
        is_api_listener(type_url, name).then(|| resource_version(&snapshot::api_listener(name)))
    }

    /// The resource `name`, if it exists (see [`DeltaSnapshot::version`]).
    pub fn resource(&self, type_url: &str, name: &str) -> Option<Any> {
        if let Some(any) = self.published.snapshot.get(type_url, name) {
            return Some(any.clone());
        }
        is_api_listener(type_url, name).then(|| snapshot::api_listener(name))
    }
}

/// Whether `name` of `type_url` is served as a generated API listener.
fn is_api_listener(type_url: &str, name: &str) -> bool {
    type_url == LISTENER_TYPE && !name.starts_with(LISTENER_PREFIX) && name != WILDCARD
}

/// What a delta request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaRequestKind {
    /// The first request of its type on this stream.
    Initial,
    /// A later request without a nonce: a subscription change.
    Update,
    /// Carries a nonce and no `error_detail`.
    Ack,
    /// Carries a nonce and `error_detail`.
    Nack,
}

/// The outcome of one delta request.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaOutcome {
    /// How the request was classified.
    pub kind: DeltaRequestKind,
    /// Whether the request's nonce was other than the last one sent for its type (the request
    /// is applied anyway).
    pub stale_nonce: bool,
    /// The response to send, if any.
    pub response: Option<DeltaDiscoveryResponse>,
}

/// Delta protocol state of one type on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaTypeState {
    /// Whether the subscription covers every resource of the type.
    pub wildcard: bool,
    /// The explicitly subscribed names.
    pub names: BTreeSet<String>,
    /// What the client holds: name → version.
    pub known: BTreeMap<String, String>,
    /// Names the next response must carry, in `resources` or `removed_resources`.
    forced: BTreeSet<String>,
    /// Whether a response of this type was sent.
    responded: bool,
    /// Nonce of the last response of this type.
    last_nonce: Option<String>,
}

// === impl DeltaTypeState ===

impl DeltaTypeState {
    /// Applies the first request of the type.
    fn apply_initial(&mut self, type_url: &str, request: &DeltaDiscoveryRequest) {
        self.known = request.initial_resource_versions.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        let legacy = type_url == LISTENER_TYPE || type_url == CLUSTER_TYPE;
        if legacy && request.resource_names_subscribe.is_empty() && request.resource_names_unsubscribe.is_empty() {
            self.wildcard = true;
        }
        for name in &request.resource_names_subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
                if !self.known.contains_key(name) {
                    self.forced.insert(name.clone());
                }
            }
        }
    }

    /// Applies the subscribe and unsubscribe lists of a later request.
    fn apply_change(&mut self, request: &DeltaDiscoveryRequest) {
        for name in &request.resource_names_unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
                let names = &self.names;
                self.known.retain(|held, _| names.contains(held));
            } else {
                self.names.remove(name);
                self.known.remove(name);
                if self.wildcard {
                    self.forced.insert(name.clone());
                }
            }
        }
        for name in &request.resource_names_subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
                self.forced.insert(name.clone());
            }
        }
    }

    /// The names the subscription covers in `snap`, with their versions.
    fn covered(&self, type_url: &str, snap: &DeltaSnapshot) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if self.wildcard
            && let Some(all) = snap.versions_of(type_url)
        {
            out.extend(all.iter().map(|(n, v)| (n.clone(), v.clone())));
        }
        for name in &self.names {
            if !out.contains_key(name)
                && let Some(version) = snap.version(type_url, name)
            {
                out.insert(name.clone(), version);
            }
        }
        out
    }

    /// Sends what changed between the client's holdings and `snap`; updates the holdings.
    /// Returns the resources and removals to send (both empty when nothing changed).
    fn diff(&mut self, type_url: &str, snap: &DeltaSnapshot) -> (Vec<Resource>, Vec<String>) {
        let covered = self.covered(type_url, snap);
        let mut resources = Vec::new();
        for (name, version) in &covered {
            if self.forced.contains(name) || self.known.get(name) != Some(version) {
                let Some(any) = snap.resource(type_url, name) else { continue };
                resources.push(Resource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(any),
                    ..Default::default()
                });
                self.known.insert(name.clone(), version.clone());
            }
        }
        let mut removed: BTreeSet<String> =
            self.known.keys().filter(|held| !covered.contains_key(*held)).cloned().collect();
        self.known.retain(|held, _| covered.contains_key(held));
        removed.extend(self.forced.iter().filter(|n| !covered.contains_key(*n)).cloned());
        self.forced.clear();
        debug_assert!(self.known.keys().eq(covered.keys()), "holdings equal coverage after a diff");
        (resources, removed.into_iter().collect())
    }
}

/// Protocol state of one delta stream (ADS or per-type).
#[derive(Debug, Clone, Default)]
pub struct DeltaStreamState {
    types: BTreeMap<String, DeltaTypeState>,
    nonces: u64,
}

// === impl DeltaStreamState ===

impl DeltaStreamState {
    /// A stream that has received nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of one type, if it was requested.
    pub fn type_state(&self, type_url: &str) -> Option<&DeltaTypeState> {
        self.types.get(type_url)
    }

    /// Handles one request whose type URL is `request.type_url`.
    ///
    /// `snap` is the current snapshot; without one nothing is answered yet, and
    /// [`DeltaStreamState::on_publish`] answers later.
    pub fn on_request(&mut self, request: &DeltaDiscoveryRequest, snap: Option<&DeltaSnapshot>) -> DeltaOutcome {
        let type_url = request.type_url.as_str();
        let (kind, stale_nonce) = match self.types.get_mut(type_url) {
            None => {
                let mut state = DeltaTypeState::default();
                state.apply_initial(type_url, request);
                self.types.insert(type_url.to_owned(), state);
                (DeltaRequestKind::Initial, false)
            }
            Some(state) => {
                state.apply_change(request);
                let stale = !request.response_nonce.is_empty()
                    && state.last_nonce.as_deref() != Some(request.response_nonce.as_str());
                let kind = match (request.response_nonce.is_empty(), request.error_detail.is_some()) {
                    (true, _) => DeltaRequestKind::Update,
                    (false, false) => DeltaRequestKind::Ack,
                    (false, true) => DeltaRequestKind::Nack,
                };
                (kind, stale)
            }
        };
        let response = snap.and_then(|snap| self.respond(type_url, snap));
        DeltaOutcome { kind, stale_nonce, response }
    }

    /// Responses for a newly published snapshot, in push order (CDS, EDS, LDS, RDS, others);
    /// types that did not change get none.
    pub fn on_publish(&mut self, snap: &DeltaSnapshot) -> Vec<DeltaDiscoveryResponse> {
        let type_urls: Vec<String> = ordered(self.types.keys()).collect();
        type_urls.iter().filter_map(|type_url| self.respond(type_url, snap)).collect()
    }

    /// Builds the response of `type_url` if there is something to send, and records it as sent.
    fn respond(&mut self, type_url: &str, snap: &DeltaSnapshot) -> Option<DeltaDiscoveryResponse> {
        let state = self.types.get_mut(type_url)?;
        let (resources, removed_resources) = state.diff(type_url, snap);
        let first_wildcard = state.wildcard && !state.responded;
        if resources.is_empty() && removed_resources.is_empty() && !first_wildcard {
            return None;
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        state.responded = true;
        state.last_nonce = Some(nonce.clone());
        let published = snap.published();
        Some(DeltaDiscoveryResponse {
            system_version_info: published.version().to_owned(),
            resources,
            type_url: type_url.to_owned(),
            removed_resources,
            nonce,
            control_plane: Some(ControlPlane { identifier: published.identifier.clone() }),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{ENDPOINT_TYPE, ROUTE_TYPE, SnapshotSpec};
    use envoy_types::pb::google::rpc::Status;
    use std::collections::HashMap;

    fn snap(generation: u64, clusters: usize) -> DeltaSnapshot {
        let spec = SnapshotSpec { clusters, listeners: 2, endpoints: vec![] };
        let version = format!("v{generation}");
        DeltaSnapshot::new(Arc::new(Published {
            snapshot: snapshot::build(&spec, &version, generation),
            published_unix_nanos: 1,
            identifier: crate::publisher::identifier(&version, 1),
        }))
    }

    fn req(type_url: &str, subscribe: &[&str], unsubscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_subscribe: subscribe.iter().map(|n| (*n).to_owned()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|n| (*n).to_owned()).collect(),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
        resp.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn version_matches_the_relay_formula() {
        let any = Any { type_url: "t".into(), value: vec![1, 2, 3] };
        let v = resource_version(&any);
        assert_eq!(v.len(), 32);
        assert!(v.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let digest = Sha256::digest(b"t\x01\x02\x03");
        assert_eq!(v, digest[..16].iter().map(|b| format!("{b:02x}")).collect::<String>());
        assert_ne!(v, resource_version(&Any { type_url: "u".into(), value: vec![1, 2, 3] }));
    }

    #[test]
    fn legacy_wildcard_cds_then_publish_sends_only_changes() {
        let s1 = snap(1, 3);
        let mut st = DeltaStreamState::new();
        let out = st.on_request(&req(CLUSTER_TYPE, &[], &[], ""), Some(&s1));
        assert_eq!(out.kind, DeltaRequestKind::Initial);
        let r = out.response.expect("answered");
        assert_eq!(names(&r), ["cluster_0", "cluster_1", "cluster_2"]);
        assert_eq!(r.system_version_info, "v1");
        let ack = st.on_request(&req(CLUSTER_TYPE, &[], &[], &r.nonce), Some(&s1));
        assert_eq!((ack.kind, ack.stale_nonce, ack.response), (DeltaRequestKind::Ack, false, None));
        // Clusters do not change between generations: nothing to send.
        assert!(st.on_publish(&snap(2, 3)).is_empty());
        let pushed = st.on_publish(&snap(3, 2));
        assert_eq!(pushed.len(), 1);
        assert!(pushed[0].resources.is_empty());
        assert_eq!(pushed[0].removed_resources, ["cluster_2"]);
    }

    #[test]
    fn first_wildcard_request_is_answered_even_if_empty() {
        let mut st = DeltaStreamState::new();
        let mut first = req(CLUSTER_TYPE, &["*"], &[], "");
        first.initial_resource_versions =
            snap(1, 1).versions_of(CLUSTER_TYPE).unwrap().iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        let r = st.on_request(&first, Some(&snap(1, 1))).response.expect("answered");
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        assert!(st.type_state(CLUSTER_TYPE).unwrap().wildcard);
    }

    #[test]
    fn empty_first_eds_request_is_not_wildcard() {
        let mut st = DeltaStreamState::new();
        let out = st.on_request(&req(ENDPOINT_TYPE, &[], &[], ""), Some(&snap(1, 3)));
        assert!(out.response.is_none());
        assert!(!st.type_state(ENDPOINT_TYPE).unwrap().wildcard);
    }

    #[test]
    fn named_eds_with_missing_name_and_publish() {
        let mut st = DeltaStreamState::new();
        let r = st.on_request(&req(ENDPOINT_TYPE, &["cluster_1", "nope"], &[], ""), Some(&snap(1, 3)));
        let r = r.response.unwrap();
        assert_eq!(names(&r), ["cluster_1"]);
        assert_eq!(r.removed_resources, ["nope"]);
        // CLAs change on every publish; "nope" is not reported again.
        let pushed = st.on_publish(&snap(2, 3));
        assert_eq!(names(&pushed[0]), ["cluster_1"]);
        assert!(pushed[0].removed_resources.is_empty());
        assert_ne!(pushed[0].resources[0].version, r.resources[0].version);
    }

    #[test]
    fn resubscribing_a_held_name_resends_it_and_unsubscribe_is_silent() {
        let s = snap(1, 3);
        let mut st = DeltaStreamState::new();
        let r = st.on_request(&req(ENDPOINT_TYPE, &["cluster_0"], &[], ""), Some(&s)).response.unwrap();
        let again = st.on_request(&req(ENDPOINT_TYPE, &["cluster_0"], &[], ""), Some(&s));
        assert_eq!(again.kind, DeltaRequestKind::Update);
        assert_eq!(names(&again.response.unwrap()), ["cluster_0"]);
        let out = st.on_request(&req(ENDPOINT_TYPE, &[], &["cluster_0", "phantom"], ""), Some(&s));
        assert!(out.response.is_none());
        assert!(st.type_state(ENDPOINT_TYPE).unwrap().known.is_empty());
        assert!(st.on_publish(&snap(2, 3)).is_empty(), "no longer subscribed");
        // A stale nonce is reported but the change still applies.
        let late = st.on_request(&req(ENDPOINT_TYPE, &["cluster_2"], &[], &r.nonce), Some(&s));
        assert!(late.stale_nonce);
        assert_eq!(names(&late.response.unwrap()), ["cluster_2"]);
    }

    #[test]
    fn unsubscribe_under_wildcard_is_answered() {
        let s = snap(1, 3);
        let mut st = DeltaStreamState::new();
        st.on_request(&req(CLUSTER_TYPE, &["*", "cluster_1"], &[], ""), Some(&s));
        let out = st.on_request(&req(CLUSTER_TYPE, &[], &["cluster_1", "gone"], ""), Some(&s));
        let r = out.response.expect("must answer");
        assert_eq!(names(&r), ["cluster_1"]);
        assert_eq!(r.removed_resources, ["gone"]);
        // Dropping the wildcard is a pure unsubscribe.
        let out = st.on_request(&req(CLUSTER_TYPE, &[], &["*"], ""), Some(&s));
        assert!(out.response.is_none());
        assert!(st.type_state(CLUSTER_TYPE).unwrap().known.is_empty());
    }

    #[test]
    fn reconnect_with_initial_versions_gets_only_differences() {
        let s1 = snap(1, 3);
        let mut held: HashMap<String, String> =
            s1.versions_of(ENDPOINT_TYPE).unwrap().iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        held.insert("cluster_1".into(), "stale".into());
        let mut st = DeltaStreamState::new();
        let mut first = req(ENDPOINT_TYPE, &["cluster_0", "cluster_1", "cluster_2", "cluster_7"], &[], "");
        first.initial_resource_versions = held;
        let r = st.on_request(&first, Some(&s1)).response.unwrap();
        assert_eq!(names(&r), ["cluster_1"]);
        assert_eq!(r.removed_resources, ["cluster_7"]);
    }

    #[test]
    fn lds_names_get_api_listeners_and_nack_is_not_answered() {
        let s = snap(1, 1);
        let mut st = DeltaStreamState::new();
        let r = st.on_request(&req(LISTENER_TYPE, &["hello.test", "listener_9"], &[], ""), Some(&s)).response.unwrap();
        assert_eq!(names(&r), ["hello.test"]);
        assert_eq!(r.removed_resources, ["listener_9"]);
        let mut nack = req(LISTENER_TYPE, &[], &[], &r.nonce);
        nack.error_detail = Some(Status { code: 3, message: "bad".into(), details: vec![] });
        let out = st.on_request(&nack, Some(&s));
        assert_eq!((out.kind, out.response), (DeltaRequestKind::Nack, None));
    }

    #[test]
    fn requests_before_first_snapshot_are_answered_on_publish_in_order() {
        let mut st = DeltaStreamState::new();
        assert!(st.on_request(&req(ROUTE_TYPE, &["route_0"], &[], ""), None).response.is_none());
        assert!(st.on_request(&req(CLUSTER_TYPE, &[], &[], ""), None).response.is_none());
        let pushed = st.on_publish(&snap(1, 2));
        let types: Vec<_> = pushed.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(types, [CLUSTER_TYPE, ROUTE_TYPE]);
        assert_ne!(pushed[0].nonce, pushed[1].nonce);
    }
}
