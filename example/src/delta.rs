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
//! Names may also come in `resource_locators_subscribe` / `_unsubscribe`, with dynamic
//! parameters; selection, extras and resource errors follow [`crate::selection`] and
//! [`crate::extras`]. A name with a configured error is not sent and not reported removed; a
//! response carries the errors its subscription covers, and a change in those errors is
//! answered even when no resource changed. With a TTL and heartbeats on,
//! [`DeltaStreamState::on_heartbeat`] sends every held CDS name as a bodyless `Resource` at the
//! held version.
//!
//! A resource's version is the lowercase hex of the first 16 bytes of SHA-256 over the type URL
//! and the encoded resource ([`resource_version`]), exactly as the relay computes it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource, ResourceError, ResourceLocator,
};
use envoy_types::pb::google::protobuf::Any;
use sha2::{Digest, Sha256};

use crate::extras::ordered_params;
use crate::publisher::Published;
use crate::selection::{self, Interest, Params, Selected};
use crate::snapshot::{CLUSTER_TYPE, LISTENER_TYPE};
use crate::sotw::{WILDCARD, node_params, ordered};
use crate::tp1;

/// The version of a resource: lowercase hex of the first 16 bytes of
/// SHA-256(`any.type_url` ++ `any.value`).
pub fn resource_version(any: &Any) -> String {
    let digest = Sha256::new().chain_update(any.type_url.as_bytes()).chain_update(&any.value).finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A published snapshot with the version of each of its resources (and variants), computed
/// once per publish and shared by every delta stream.
#[derive(Debug)]
pub struct DeltaSnapshot {
    published: Arc<Published>,
    /// Type URL → name → version.
    versions: BTreeMap<String, BTreeMap<String, String>>,
    /// Type URL → name → version of each variant.
    variant_versions: BTreeMap<String, BTreeMap<String, Vec<String>>>,
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
        let variant_versions = published
            .snapshot
            .variants
            .iter()
            .map(|(type_url, all)| {
                let by_name = all
                    .iter()
                    .map(|(name, vs)| (name.clone(), vs.iter().map(|v| resource_version(&v.resource)).collect()))
                    .collect();
                (type_url.clone(), by_name)
            })
            .collect();
        Self { published, versions, variant_versions }
    }

    /// The snapshot.
    pub fn published(&self) -> &Arc<Published> {
        &self.published
    }

    /// The names of every resource of `type_url`, with their versions.
    pub fn versions_of(&self, type_url: &str) -> Option<&BTreeMap<String, String>> {
        self.versions.get(type_url)
    }

    /// The version of `selected`, published as `name`.
    fn version_of(&self, type_url: &str, name: &str, selected: &Selected<'_>) -> String {
        if let Some(index) = selected.variant
            && let Some(v) =
                self.variant_versions.get(type_url).and_then(|all| all.get(name)).and_then(|vs| vs.get(index))
        {
            return v.clone();
        }
        if selected.variant.is_none()
            && let Some(v) = self.versions.get(type_url).and_then(|all| all.get(name))
        {
            return v.clone();
        }
        resource_version(&selected.resource)
    }
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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeltaTypeState {
    /// Whether the subscription covers every resource of the type.
    pub wildcard: bool,
    /// The explicitly subscribed names (including globs and locator names).
    pub names: BTreeSet<String>,
    /// What the client holds: name → version.
    pub known: BTreeMap<String, String>,
    /// Parameters of the names subscribed through resource locators.
    locator_params: BTreeMap<String, Params>,
    /// Names the next response must carry, in `resources` or `removed_resources`.
    forced: BTreeSet<String>,
    /// Whether a response of this type was sent.
    responded: bool,
    /// Nonce of the last response of this type.
    last_nonce: Option<String>,
    /// The resource errors of the last response of this type.
    last_errors: Vec<ResourceError>,
}

/// The names of `names` and `locators` (`xdstp://` ones with sorted context parameters), with
/// the locators' parameters.
fn named(names: &[String], locators: &[ResourceLocator]) -> Vec<(String, Option<Params>)> {
    let mut out: Vec<(String, Option<Params>)> = names.iter().map(|n| (tp1::canonical(n), None)).collect();
    out.extend(locators.iter().map(|l| (tp1::canonical(&l.name), Some(ordered_params(&l.dynamic_parameters)))));
    out
}

// === impl DeltaTypeState ===

impl DeltaTypeState {
    /// Applies the first request of the type.
    fn apply_initial(&mut self, type_url: &str, request: &DeltaDiscoveryRequest) {
        self.known = request.initial_resource_versions.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        let subscribe = named(&request.resource_names_subscribe, &request.resource_locators_subscribe);
        let legacy = type_url == LISTENER_TYPE || type_url == CLUSTER_TYPE;
        if legacy
            && subscribe.is_empty()
            && request.resource_names_unsubscribe.is_empty()
            && request.resource_locators_unsubscribe.is_empty()
        {
            self.wildcard = true;
        }
        for (name, params) in subscribe {
            if name == WILDCARD {
                self.wildcard = true;
                continue;
            }
            if !self.known.contains_key(&name) {
                self.forced.insert(name.clone());
            }
            self.subscribe(name, params);
        }
    }

    fn subscribe(&mut self, name: String, params: Option<Params>) {
        match params {
            Some(params) => self.locator_params.insert(name.clone(), params),
            None => self.locator_params.remove(&name),
        };
        self.names.insert(name);
    }

    /// Applies the subscribe and unsubscribe lists of a later request.
    fn apply_change(&mut self, request: &DeltaDiscoveryRequest) {
        for (name, _) in named(&request.resource_names_unsubscribe, &request.resource_locators_unsubscribe) {
            if name == WILDCARD {
                self.wildcard = false;
                let names = &self.names;
                self.known.retain(|held, _| names.contains(held));
            } else {
                self.names.remove(&name);
                self.locator_params.remove(&name);
                self.known.remove(&name);
                if tp1::is_glob(&name) {
                    self.known.retain(|held, _| !tp1::glob_matches(&name, held));
                }
                if self.wildcard {
                    self.forced.insert(name);
                }
            }
        }
        for (name, params) in named(&request.resource_names_subscribe, &request.resource_locators_subscribe) {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.forced.insert(name.clone());
                self.subscribe(name, params);
            }
        }
    }

    /// The subscription as an [`Interest`].
    fn interest<'a>(&'a self, node_params: &'a Params) -> Interest<'a> {
        Interest { wildcard: self.wildcard, names: &self.names, locator_params: &self.locator_params, node_params }
    }

    /// Whether the next response must carry `name`.
    fn is_forced(&self, name: &str) -> bool {
        self.forced.contains(name) || self.forced.iter().any(|f| tp1::glob_matches(f, name))
    }

    /// Sends what changed between the client's holdings and `snap`; updates the holdings.
    /// Returns the resources and removals to send (both empty when nothing changed).
    fn diff(&mut self, type_url: &str, snap: &DeltaSnapshot, node_params: &Params) -> (Vec<Resource>, Vec<String>) {
        let published = snap.published();
        let selected = selection::select(type_url, &self.interest(node_params), published);
        let mut resources = Vec::new();
        let mut covered = BTreeSet::new();
        for (name, s) in selected {
            let version = snap.version_of(type_url, &name, &s);
            if self.is_forced(&name) || self.known.get(&name) != Some(&version) {
                resources.push(published.extras.delta_resource(
                    type_url,
                    &name,
                    &version,
                    Some(s.resource.into_owned()),
                    s.constraints.as_ref(),
                ));
                self.known.insert(name.clone(), version);
            }
            covered.insert(name);
        }
        let has_error = |name: &str| published.extras.has_error(type_url, name);
        let mut removed: BTreeSet<String> =
            self.known.keys().filter(|held| !covered.contains(*held) && !has_error(held)).cloned().collect();
        self.known.retain(|held, _| covered.contains(held));
        removed
            .extend(self.forced.iter().filter(|n| !covered.contains(*n) && !tp1::is_glob(n) && !has_error(n)).cloned());
        self.forced.clear();
        debug_assert!(self.known.keys().eq(covered.iter()), "holdings equal coverage after a diff");
        (resources, removed.into_iter().collect())
    }
}

/// Protocol state of one delta stream (ADS or per-type).
#[derive(Debug, Clone, Default)]
pub struct DeltaStreamState {
    types: BTreeMap<String, DeltaTypeState>,
    nonces: u64,
    /// The node's dynamic parameters per type URL.
    node_params: BTreeMap<String, Params>,
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
        if let Some(node) = &request.node {
            self.node_params = node_params(node);
        }
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

    /// A CDS heartbeat, when `snap`'s extras turn heartbeats on and the client holds CDS
    /// resources: each held name as a bodyless `Resource` at its held version, with the TTL.
    pub fn on_heartbeat(&mut self, snap: &DeltaSnapshot) -> Option<DeltaDiscoveryResponse> {
        let published = snap.published();
        published.extras.heartbeats()?;
        let state = self.types.get_mut(CLUSTER_TYPE).filter(|s| s.responded && !s.known.is_empty())?;
        let resources = state
            .known
            .iter()
            .map(|(name, version)| published.extras.delta_resource(CLUSTER_TYPE, name, version, None, None))
            .collect();
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        state.last_nonce = Some(nonce.clone());
        Some(DeltaDiscoveryResponse {
            system_version_info: published.version().to_owned(),
            resources,
            type_url: CLUSTER_TYPE.to_owned(),
            nonce,
            control_plane: Some(ControlPlane { identifier: published.identifier.clone() }),
            resource_errors: state.last_errors.clone(),
            ..Default::default()
        })
    }

    /// Builds the response of `type_url` if there is something to send, and records it as sent.
    fn respond(&mut self, type_url: &str, snap: &DeltaSnapshot) -> Option<DeltaDiscoveryResponse> {
        let node_params = self.node_params.get(type_url).cloned().unwrap_or_default();
        let state = self.types.get_mut(type_url)?;
        let (resources, removed_resources) = state.diff(type_url, snap, &node_params);
        let resource_errors = selection::errors(type_url, &state.interest(&node_params), snap.published());
        let first_wildcard = state.wildcard && !state.responded;
        let errors_changed = resource_errors != state.last_errors;
        if resources.is_empty() && removed_resources.is_empty() && !first_wildcard && !errors_changed {
            return None;
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        state.responded = true;
        state.last_nonce = Some(nonce.clone());
        state.last_errors.clone_from(&resource_errors);
        let published = snap.published();
        Some(DeltaDiscoveryResponse {
            system_version_info: published.version().to_owned(),
            resources,
            type_url: type_url.to_owned(),
            removed_resources,
            nonce,
            control_plane: Some(ControlPlane { identifier: published.identifier.clone() }),
            resource_errors,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot;
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
            extras: Arc::default(),
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

    fn snap_with(generation: u64, spec: crate::extras::ExtrasSpec) -> DeltaSnapshot {
        let extras = crate::extras::Extras::parse(spec).expect("valid extras");
        let snap_spec = SnapshotSpec { clusters: 2, listeners: 1, endpoints: vec![] };
        let version = format!("v{generation}");
        let mut snapshot = snapshot::build(&snap_spec, &version, generation);
        crate::extras::apply(&mut snapshot, &extras);
        DeltaSnapshot::new(Arc::new(Published {
            snapshot,
            published_unix_nanos: 1,
            identifier: crate::publisher::identifier(&version, 1),
            extras: Arc::new(extras),
        }))
    }

    #[test]
    fn ttl_do_not_cache_and_heartbeats() {
        use crate::extras::ExtrasSpec;
        let s = snap_with(
            1,
            ExtrasSpec {
                ttl: Some("5s".into()),
                heartbeat_interval: Some("1s".into()),
                do_not_cache: vec!["cluster_1".into()],
                ..Default::default()
            },
        );
        let mut st = DeltaStreamState::new();
        assert!(st.on_heartbeat(&s).is_none(), "nothing held yet");
        let r = st.on_request(&req(CLUSTER_TYPE, &[], &[], ""), Some(&s)).response.unwrap();
        assert!(r.resources.iter().all(|r| r.ttl.is_some() && r.resource.is_some()));
        assert!(r.resources[0].cache_control.is_none());
        assert_eq!(r.resources[1].cache_control.map(|c| c.do_not_cache), Some(true));
        let hb = st.on_heartbeat(&s).expect("heartbeat");
        assert_ne!(hb.nonce, r.nonce);
        assert_eq!(names(&hb), ["cluster_0", "cluster_1"]);
        assert!(hb.resources.iter().all(|h| h.resource.is_none() && h.ttl.is_some()));
        assert_eq!(hb.resources[0].version, r.resources[0].version);
        assert!(st.on_heartbeat(&snap(1, 2)).is_none(), "no heartbeats without them configured");
    }

    #[test]
    fn resource_errors_turn_on_and_off_without_removals() {
        use crate::extras::ExtrasSpec;
        let plain = snap_with(1, ExtrasSpec::default());
        let failing =
            snap_with(2, ExtrasSpec { resource_errors: vec!["cds/cluster_1=14:down".into()], ..Default::default() });
        let mut st = DeltaStreamState::new();
        let r = st.on_request(&req(CLUSTER_TYPE, &["cluster_0", "cluster_1"], &[], ""), Some(&plain)).response.unwrap();
        assert_eq!(names(&r), ["cluster_0", "cluster_1"]);
        let pushed = st.on_publish(&failing);
        assert_eq!(pushed.len(), 1, "an error change is answered even though no cluster changed");
        assert!(pushed[0].resources.is_empty() && pushed[0].removed_resources.is_empty());
        assert_eq!(pushed[0].resource_errors[0].resource_name.as_ref().unwrap().name, "cluster_1");
        let cleared = st.on_publish(&snap_with(3, ExtrasSpec::default()));
        assert_eq!(names(&cleared[0]), ["cluster_1"], "the resource comes back once the error clears");
        assert!(cleared[0].resource_errors.is_empty());
    }

    #[test]
    fn xdstp_glob_and_variants_by_locator() {
        use crate::extras::ExtrasSpec;
        let s = snap_with(
            1,
            ExtrasSpec {
                xdstp_authority: Some("auth".into()),
                dynamic_parameter: Some("env=prod".into()),
                ..Default::default()
            },
        );
        let glob = "xdstp://auth/envoy.config.endpoint.v3.ClusterLoadAssignment/fleet/*";
        let mut st = DeltaStreamState::new();
        let r = st.on_request(&req(ENDPOINT_TYPE, &[glob], &[], ""), Some(&s)).response.unwrap();
        assert_eq!(r.resources.len(), 2);
        assert!(r.removed_resources.is_empty(), "the glob itself is never reported removed");
        let mut cds = DeltaStreamState::new();
        let mut first = req(CLUSTER_TYPE, &[], &[], "");
        first.resource_locators_subscribe = vec![ResourceLocator {
            name: "cluster_0".into(),
            dynamic_parameters: [("env".to_owned(), "prod".to_owned())].into_iter().collect(),
        }];
        let r = cds.on_request(&first, Some(&s)).response.unwrap();
        assert_eq!(r.resources.len(), 1);
        let rn = r.resources[0].resource_name.as_ref().expect("variants use resource_name");
        assert_eq!(rn.name, "cluster_0");
        assert!(r.resources[0].name.is_empty());
        assert_eq!(rn.dynamic_parameter_constraints, Some(crate::constraints::key_equals("env", "prod")));
    }
}
