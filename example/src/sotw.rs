//! Per-stream state-of-the-world protocol state: pure and synchronous, no I/O.
//!
//! A [`StreamState`] is fed every request of one stream ([`StreamState::on_request`]) and every
//! publish ([`StreamState::on_publish`]); it returns the responses to send. Rules (xDS protocol
//! §1.3–§1.6):
//!
//! - subscriptions are tracked per type URL. For LDS/CDS an empty list means wildcard until the
//!   stream first names a resource of that type; `*` in the list always means wildcard; after the
//!   first explicit name an empty list unsubscribes from everything;
//! - once a response of a type was sent, requests of that type must echo its nonce; others are
//!   stale and ignored;
//! - the first request of each type is always answered; later requests are answered only when
//!   they change the subscribed names (even at the same version); ACKs and NACKs that change
//!   nothing get no response;
//! - a publish pushes to every type whose last response is older, skipping types with an empty
//!   subscription; ADS pushes go out in CDS, EDS, LDS, RDS order;
//! - LDS/CDS responses carry the full state of the subscription; EDS/RDS carry the subscribed
//!   names that exist; no name appears twice;
//! - nonces are unique within the stream;
//! - names may also come in `resource_locators`, with dynamic parameters; every request's
//!   `node.dynamic_parameters` replace the stream's per-type parameters. Selection, extras and
//!   resource errors follow [`crate::selection`] and [`crate::extras`];
//! - a heartbeat ([`StreamState::on_heartbeat`], only with a TTL and heartbeats on) repeats the
//!   last CDS response's version with a new nonce and a bodyless wrapper per resource sent.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse, DynamicParameterConstraints, ResourceLocator,
};
use envoy_types::pb::google::protobuf::Any;

use crate::extras::ordered_params;
use crate::publisher::Published;
use crate::selection::{self, Interest, Params};
use crate::snapshot::{CLUSTER_TYPE, LISTENER_TYPE, PUSH_ORDER};

/// The wildcard resource name.
pub const WILDCARD: &str = "*";

/// What a request was, as far as the protocol is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// The first request of its type on this stream.
    Initial,
    /// A request before any response of its type was sent (supersedes the earlier one).
    Update,
    /// Echoes the last nonce without an error (may also change the subscription).
    Ack,
    /// Echoes the last nonce with `error_detail` set.
    Nack,
    /// Carries a nonce other than the last one sent for its type: ignored.
    Stale,
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutcome {
    /// How the request was classified.
    pub kind: RequestKind,
    /// Whether the subscribed names changed.
    pub subscription_changed: bool,
    /// The response to send, if any.
    pub response: Option<DiscoveryResponse>,
}

/// Subscribed names of one type on one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Parameters of the names that came in resource locators.
    locator_params: BTreeMap<String, Params>,
    /// An empty list still means wildcard (LDS/CDS before any explicit name).
    legacy_wildcard: bool,
}

// === impl Subscription ===

impl Subscription {
    /// A subscription that has seen no request yet.
    pub fn new(type_url: &str) -> Self {
        let legacy_wildcard = type_url == LISTENER_TYPE || type_url == CLUSTER_TYPE;
        Self { wildcard: false, names: BTreeSet::new(), locator_params: BTreeMap::new(), legacy_wildcard }
    }

    /// Applies the names and resource locators of a request; returns whether the subscription
    /// changed (names or locator parameters).
    pub fn apply_request(&mut self, names: &[String], locators: &[ResourceLocator]) -> bool {
        let mut all: Vec<String> = names.to_vec();
        all.extend(locators.iter().map(|l| l.name.clone()));
        let params: BTreeMap<String, Params> =
            locators.iter().map(|l| (l.name.clone(), ordered_params(&l.dynamic_parameters))).collect();
        let params_changed = params != self.locator_params;
        self.locator_params = params;
        self.apply(&all) | params_changed
    }

    /// Applies the names of a request; returns whether the subscription changed.
    pub fn apply(&mut self, names: &[String]) -> bool {
        let before = (self.wildcard, self.names.clone());
        if names.is_empty() && self.legacy_wildcard {
            self.wildcard = true;
            self.names.clear();
        } else {
            self.legacy_wildcard = false;
            self.wildcard = names.iter().any(|n| n == WILDCARD);
            self.names = names.iter().filter(|n| *n != WILDCARD).cloned().collect();
        }
        before != (self.wildcard, self.names.clone())
    }

    /// Whether the subscription covers every resource of its type.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The explicitly subscribed names.
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    /// Whether the subscription covers nothing.
    pub fn is_empty(&self) -> bool {
        !self.wildcard && self.names.is_empty()
    }
}

/// Protocol state of one type on one stream.
#[derive(Debug, Clone)]
struct TypeState {
    subscription: Subscription,
    /// Nonce of the last response of this type.
    last_nonce: Option<String>,
    /// Generation of the last response of this type.
    last_generation: Option<u64>,
    /// Version of the last response of this type.
    last_version: String,
    /// Names and constraints of the resources in the last non-heartbeat response.
    last_sent: Vec<(String, Option<DynamicParameterConstraints>)>,
}

/// Protocol state of one SotW stream (ADS or per-type).
#[derive(Debug, Clone, Default)]
pub struct StreamState {
    types: BTreeMap<String, TypeState>,
    nonces: u64,
    /// The node's dynamic parameters per type URL.
    node_params: BTreeMap<String, Params>,
}

// === impl StreamState ===

impl StreamState {
    /// A stream that has received nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The type URLs requested so far, in order.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// The subscription of one type, if it was requested.
    pub fn subscription(&self, type_url: &str) -> Option<&Subscription> {
        self.types.get(type_url).map(|t| &t.subscription)
    }

    /// Handles one request whose type URL is `request.type_url`.
    ///
    /// `published` is the current snapshot; without one nothing is answered yet, and
    /// [`StreamState::on_publish`] answers later.
    pub fn on_request(&mut self, request: &DiscoveryRequest, published: Option<&Published>) -> RequestOutcome {
        let type_url = request.type_url.as_str();
        if let Some(node) = &request.node {
            self.node_params = node_params(node);
        }
        let (kind, subscription_changed, answer) = match self.types.get_mut(type_url) {
            None => {
                let mut subscription = Subscription::new(type_url);
                let changed = subscription.apply_request(&request.resource_names, &request.resource_locators);
                let state = TypeState {
                    subscription,
                    last_nonce: None,
                    last_generation: None,
                    last_version: String::new(),
                    last_sent: Vec::new(),
                };
                self.types.insert(type_url.to_owned(), state);
                (RequestKind::Initial, changed, true)
            }
            Some(state) => {
                if let Some(last) = &state.last_nonce
                    && *last != request.response_nonce
                {
                    return RequestOutcome { kind: RequestKind::Stale, subscription_changed: false, response: None };
                }
                let changed = state.subscription.apply_request(&request.resource_names, &request.resource_locators);
                let kind = if state.last_nonce.is_none() {
                    RequestKind::Update
                } else if request.error_detail.is_some() {
                    RequestKind::Nack
                } else {
                    RequestKind::Ack
                };
                (kind, changed, changed || state.last_generation.is_none())
            }
        };
        let response = match published {
            Some(published) if answer => self.respond(type_url, published),
            _ => None,
        };
        RequestOutcome { kind, subscription_changed, response }
    }

    /// Responses for a newly published snapshot, in push order (CDS, EDS, LDS, RDS, others).
    pub fn on_publish(&mut self, published: &Published) -> Vec<DiscoveryResponse> {
        let generation = published.generation();
        let due: Vec<String> = ordered(self.types.keys())
            .filter(|type_url| {
                let state = &self.types[type_url.as_str()];
                match state.last_generation {
                    None => true,
                    Some(last) => last != generation && !state.subscription.is_empty(),
                }
            })
            .collect();
        due.iter().filter_map(|type_url| self.respond(type_url, published)).collect()
    }

    /// Heartbeats for `published`, when its extras turn them on: one per CDS type whose last
    /// response was built from `published` and had resources.
    pub fn on_heartbeat(&mut self, published: &Published) -> Vec<DiscoveryResponse> {
        let extras = &published.extras;
        if extras.heartbeats().is_none() {
            return Vec::new();
        }
        let Some(state) = self.types.get(CLUSTER_TYPE) else { return Vec::new() };
        if state.last_generation != Some(published.generation()) || state.last_sent.is_empty() {
            return Vec::new();
        }
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let node_params = self.node_params.get(CLUSTER_TYPE).cloned().unwrap_or_default();
        let Some(state) = self.types.get_mut(CLUSTER_TYPE) else { return Vec::new() };
        let interest = interest(&state.subscription, &node_params);
        let resources = state
            .last_sent
            .iter()
            .map(|(name, c)| extras.sotw_heartbeat(CLUSTER_TYPE, name, &state.last_version, c.as_ref()))
            .collect();
        let resource_errors = selection::errors(CLUSTER_TYPE, &interest, published);
        state.last_nonce = Some(nonce.clone());
        vec![DiscoveryResponse {
            version_info: state.last_version.clone(),
            resources,
            type_url: CLUSTER_TYPE.to_owned(),
            nonce,
            control_plane: Some(ControlPlane { identifier: published.identifier.clone() }),
            resource_errors,
            ..Default::default()
        }]
    }

    /// Builds the response of `type_url` from `published` and records it as sent.
    fn respond(&mut self, type_url: &str, published: &Published) -> Option<DiscoveryResponse> {
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let node_params = self.node_params.get(type_url).cloned().unwrap_or_default();
        let state = self.types.get_mut(type_url)?;
        let interest = interest(&state.subscription, &node_params);
        let selected = selection::select(type_url, &interest, published);
        let resource_errors = selection::errors(type_url, &interest, published);
        let version = published.version();
        state.last_sent = selected.iter().map(|(n, s)| (n.clone(), s.constraints.clone())).collect();
        let resources: Vec<Any> = selected
            .into_iter()
            .map(|(name, s)| {
                published.extras.sotw_resource(
                    type_url,
                    &name,
                    version,
                    s.resource.into_owned(),
                    s.constraints.as_ref(),
                )
            })
            .collect();
        state.last_nonce = Some(nonce.clone());
        state.last_generation = Some(published.generation());
        version.clone_into(&mut state.last_version);
        Some(DiscoveryResponse {
            version_info: version.to_owned(),
            resources,
            type_url: type_url.to_owned(),
            nonce,
            control_plane: Some(ControlPlane { identifier: published.identifier.clone() }),
            resource_errors,
            ..Default::default()
        })
    }
}

/// The [`Interest`] of `subscription` with the node's parameters for its type.
fn interest<'a>(subscription: &'a Subscription, node_params: &'a Params) -> Interest<'a> {
    Interest {
        wildcard: subscription.wildcard,
        names: &subscription.names,
        locator_params: &subscription.locator_params,
        node_params,
    }
}

/// The node's dynamic parameters, per type URL.
pub fn node_params(node: &Node) -> BTreeMap<String, Params> {
    node.dynamic_parameters.iter().map(|(t, p)| (t.clone(), ordered_params(&p.params))).collect()
}

/// Type URLs in push order: the core types first (CDS, EDS, LDS, RDS), then the rest by name.
pub(crate) fn ordered<'a>(type_urls: impl Iterator<Item = &'a String>) -> impl Iterator<Item = String> {
    let mut all: Vec<String> = type_urls.cloned().collect();
    all.sort_by_key(|t| {
        let rank = PUSH_ORDER.iter().position(|p| p == t).unwrap_or(PUSH_ORDER.len());
        (rank, t.clone())
    });
    all.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot;
    use crate::snapshot::{ENDPOINT_TYPE, ROUTE_TYPE, SnapshotSpec};
    use envoy_types::pb::google::rpc::Status;
    use std::sync::Arc;

    fn published(generation: u64) -> Arc<Published> {
        let spec = SnapshotSpec { clusters: 3, listeners: 2, endpoints: vec![] };
        let version = format!("v{generation}");
        Arc::new(Published {
            snapshot: snapshot::build(&spec, &version, generation),
            published_unix_nanos: 1,
            identifier: crate::publisher::identifier(&version, 1),
            extras: Arc::default(),
        })
    }

    fn req(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            version_info: version.to_owned(),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    fn names(resp: &DiscoveryResponse) -> Vec<String> {
        resp.resources.iter().map(|a| crate::client::resource_name(&resp.type_url, a).unwrap_or_default()).collect()
    }

    #[test]
    fn legacy_wildcard_survives_empty_acks() {
        let mut s = Subscription::new(CLUSTER_TYPE);
        assert!(s.apply(&[]));
        assert!(s.is_wildcard());
        assert!(!s.apply(&[]));
        assert!(s.is_wildcard());
        assert!(s.apply(&["a".to_owned()]));
        assert!(!s.is_wildcard());
        assert!(s.apply(&[]));
        assert!(s.is_empty());
    }

    #[test]
    fn empty_first_eds_request_is_not_wildcard() {
        let mut s = Subscription::new(ENDPOINT_TYPE);
        assert!(!s.apply(&[]));
        assert!(s.is_empty());
        assert!(s.apply(&["*".to_owned(), "x".to_owned()]));
        assert!(s.is_wildcard());
        assert_eq!(s.names().len(), 1);
    }

    #[test]
    fn wildcard_cds_then_ack_then_push() {
        let p1 = published(1);
        let mut st = StreamState::new();
        let out = st.on_request(&req(CLUSTER_TYPE, &[], "", ""), Some(&p1));
        assert_eq!(out.kind, RequestKind::Initial);
        let resp = out.response.expect("first request answered");
        assert_eq!(names(&resp), ["cluster_0", "cluster_1", "cluster_2"]);
        assert_eq!(resp.version_info, "v1");
        assert!(resp.control_plane.is_some());
        let ack = st.on_request(&req(CLUSTER_TYPE, &[], "v1", &resp.nonce), Some(&p1));
        assert_eq!(ack.kind, RequestKind::Ack);
        assert!(ack.response.is_none());
        let p2 = published(2);
        let pushed = st.on_publish(&p2);
        assert_eq!(pushed.len(), 1);
        assert_eq!(pushed[0].version_info, "v2");
        assert_ne!(pushed[0].nonce, resp.nonce);
        assert!(st.on_publish(&p2).is_empty(), "same generation is not pushed twice");
    }

    #[test]
    fn eds_by_name_and_subscription_change_at_same_version() {
        let p = published(1);
        let mut st = StreamState::new();
        let r1 = st.on_request(&req(ENDPOINT_TYPE, &["cluster_1", "nope"], "", ""), Some(&p));
        let r1 = r1.response.expect("answered");
        assert_eq!(names(&r1), ["cluster_1"]);
        let change = req(ENDPOINT_TYPE, &["cluster_1", "cluster_2"], "v1", &r1.nonce);
        let out = st.on_request(&change, Some(&p));
        assert_eq!(out.kind, RequestKind::Ack);
        assert!(out.subscription_changed);
        let r2 = out.response.expect("change answered");
        assert_eq!(r2.version_info, "v1");
        assert_eq!(names(&r2), ["cluster_1", "cluster_2"]);
    }

    #[test]
    fn stale_nonce_is_ignored() {
        let p = published(1);
        let mut st = StreamState::new();
        let r1 = st.on_request(&req(ROUTE_TYPE, &["route_0"], "", ""), Some(&p)).response.unwrap();
        let pushed = st.on_publish(&published(2));
        assert_eq!(pushed.len(), 1);
        let stale = req(ROUTE_TYPE, &["route_0", "route_1"], "v1", &r1.nonce);
        let out = st.on_request(&stale, Some(&published(2)));
        assert_eq!(out.kind, RequestKind::Stale);
        assert!(out.response.is_none());
        assert_eq!(st.subscription(ROUTE_TYPE).unwrap().names().len(), 1, "not applied");
    }

    #[test]
    fn nack_is_not_answered() {
        let p = published(1);
        let mut st = StreamState::new();
        let r1 = st.on_request(&req(LISTENER_TYPE, &[], "", ""), Some(&p)).response.unwrap();
        let mut nack = req(LISTENER_TYPE, &[], "", &r1.nonce);
        nack.error_detail = Some(Status { code: 3, message: "bad".into(), details: vec![] });
        let out = st.on_request(&nack, Some(&p));
        assert_eq!(out.kind, RequestKind::Nack);
        assert!(out.response.is_none());
    }

    #[test]
    fn unsubscribe_all_then_publish_pushes_nothing() {
        let p = published(1);
        let mut st = StreamState::new();
        let r1 = st.on_request(&req(ENDPOINT_TYPE, &["cluster_0"], "", ""), Some(&p)).response;
        let nonce = r1.unwrap().nonce;
        let out = st.on_request(&req(ENDPOINT_TYPE, &[], "v1", &nonce), Some(&p));
        assert!(out.subscription_changed);
        assert!(out.response.expect("change answered").resources.is_empty());
        assert!(st.on_publish(&published(2)).is_empty());
    }

    #[test]
    fn lds_names_get_api_listeners_and_no_duplicates() {
        let p = published(1);
        let mut st = StreamState::new();
        let r = st.on_request(&req(LISTENER_TYPE, &["*", "listener_0", "hello.test", "listener_9"], "", ""), Some(&p));
        let r = r.response.unwrap();
        assert_eq!(names(&r), ["hello.test", "listener_0", "listener_1"]);
    }

    #[test]
    fn request_before_first_snapshot_is_answered_on_publish() {
        let mut st = StreamState::new();
        let out = st.on_request(&req(ENDPOINT_TYPE, &[], "", ""), None);
        assert!(out.response.is_none());
        let out = st.on_request(&req(CLUSTER_TYPE, &[], "", ""), None);
        assert!(out.response.is_none());
        let pushed = st.on_publish(&published(1));
        let types: Vec<_> = pushed.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(types, [CLUSTER_TYPE, ENDPOINT_TYPE]);
        let nonces: BTreeSet<_> = pushed.iter().map(|r| r.nonce.clone()).collect();
        assert_eq!(nonces.len(), 2);
    }

    fn published_with(generation: u64, spec: crate::extras::ExtrasSpec) -> Arc<Published> {
        let extras = crate::extras::Extras::parse(spec).expect("valid extras");
        let snap_spec = SnapshotSpec { clusters: 2, listeners: 1, endpoints: vec![] };
        let version = format!("v{generation}");
        let mut snapshot = snapshot::build(&snap_spec, &version, generation);
        crate::extras::apply(&mut snapshot, &extras);
        Arc::new(Published {
            snapshot,
            published_unix_nanos: 1,
            identifier: crate::publisher::identifier(&version, 1),
            extras: Arc::new(extras),
        })
    }

    fn wrapper(any: &Any) -> envoy_types::pb::envoy::service::discovery::v3::Resource {
        use prost::Message;
        assert_eq!(any.type_url, crate::extras::RESOURCE_WRAPPER_TYPE);
        envoy_types::pb::envoy::service::discovery::v3::Resource::decode(any.value.as_slice()).expect("wrapper")
    }

    #[test]
    fn ttl_wraps_cds_and_heartbeats_repeat_the_version() {
        use crate::extras::ExtrasSpec;
        let p = published_with(
            1,
            ExtrasSpec { ttl: Some("5s".into()), heartbeat_interval: Some("1s".into()), ..Default::default() },
        );
        let mut st = StreamState::new();
        let r = st.on_request(&req(CLUSTER_TYPE, &[], "", ""), Some(&p)).response.unwrap();
        let first = wrapper(&r.resources[0]);
        assert_eq!((first.name.as_str(), first.version.as_str()), ("cluster_0", "v1"));
        assert!(first.resource.is_some());
        assert_eq!(first.ttl.map(|d| d.seconds), Some(5));
        assert_eq!(names(&r), ["cluster_0", "cluster_1"], "names are read from the wrappers");
        let eds = st.on_request(&req(ENDPOINT_TYPE, &["cluster_0"], "", ""), Some(&p)).response.unwrap();
        assert_ne!(eds.resources[0].type_url, crate::extras::RESOURCE_WRAPPER_TYPE, "only CDS has a TTL");
        let beats = st.on_heartbeat(&p);
        assert_eq!(beats.len(), 1);
        assert_eq!(beats[0].version_info, "v1");
        assert_ne!(beats[0].nonce, r.nonce);
        let hb: Vec<_> = beats[0].resources.iter().map(wrapper).collect();
        assert!(hb.iter().all(|w| w.resource.is_none() && w.ttl.is_some() && w.version == "v1"));
        assert_eq!(hb.len(), 2);
        assert!(st.on_heartbeat(&published(2)).is_empty(), "no heartbeats without them configured");
    }

    #[test]
    fn do_not_cache_and_resource_errors_shape_responses() {
        use crate::extras::ExtrasSpec;
        let p = published_with(
            1,
            ExtrasSpec {
                do_not_cache: vec!["route_0".into()],
                resource_errors: vec!["cds/cluster_1=14:origin down".into(), "cds/ghost=5:missing".into()],
                ..Default::default()
            },
        );
        let mut st = StreamState::new();
        let rds = st.on_request(&req(ROUTE_TYPE, &["route_0"], "", ""), Some(&p)).response.unwrap();
        assert_eq!(wrapper(&rds.resources[0]).cache_control.map(|c| c.do_not_cache), Some(true));
        let cds = st.on_request(&req(CLUSTER_TYPE, &[], "", ""), Some(&p)).response.unwrap();
        assert_eq!(names(&cds), ["cluster_0"], "a resource with an error is not sent");
        let errs: Vec<_> = cds.resource_errors.iter().map(|e| e.resource_name.clone().unwrap().name).collect();
        assert_eq!(errs, ["cluster_1", "ghost"], "wildcard covers every configured name");
        let mut named = StreamState::new();
        let only = named.on_request(&req(CLUSTER_TYPE, &["cluster_0", "ghost"], "", ""), Some(&p)).response.unwrap();
        assert_eq!(only.resource_errors.len(), 1);
        assert_eq!(only.resource_errors[0].error_detail.as_ref().unwrap().code, 5);
    }

    #[test]
    fn xdstp_exact_and_glob_names() {
        use crate::extras::{ExtrasSpec, xdstp_name};
        let p = published_with(1, ExtrasSpec { xdstp_authority: Some("auth".into()), ..Default::default() });
        let exact = xdstp_name("auth", "envoy.config.cluster.v3.Cluster", "cluster_1");
        let glob = "xdstp://auth/envoy.config.cluster.v3.Cluster/fleet/*";
        let mut st = StreamState::new();
        let r = st.on_request(&req(CLUSTER_TYPE, &[exact.as_str()], "", ""), Some(&p)).response.unwrap();
        assert_eq!(names(&r), [exact.as_str()]);
        let r = st.on_request(&req(CLUSTER_TYPE, &[glob], "v1", &r.nonce), Some(&p)).response.unwrap();
        assert_eq!(names(&r).len(), 2);
        assert!(names(&r).iter().all(|n| n.starts_with("xdstp://auth/")));
        let mut wild = StreamState::new();
        let all = wild.on_request(&req(CLUSTER_TYPE, &[], "", ""), Some(&p)).response.unwrap();
        assert_eq!(all.resources.len(), 4, "wildcard gets plain and xdstp clusters");
    }

    #[test]
    fn dynamic_parameters_select_variants_from_locators_or_node() {
        use crate::extras::{ExtrasSpec, variant_of};
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use envoy_types::pb::xds::core::v3::ContextParams;
        use prost::Message;
        let p = published_with(1, ExtrasSpec { dynamic_parameter: Some("env=prod,dev".into()), ..Default::default() });
        let variant = |any: &Any| {
            let w = wrapper(any);
            assert!(w.resource_name.as_ref().unwrap().dynamic_parameter_constraints.is_some());
            variant_of(&Cluster::decode(w.resource.unwrap().value.as_slice()).unwrap()).unwrap()
        };
        let mut st = StreamState::new();
        let mut first = req(CLUSTER_TYPE, &["cluster_1"], "", "");
        first.resource_locators = vec![ResourceLocator {
            name: "cluster_0".into(),
            dynamic_parameters: [("env".to_owned(), "dev".to_owned())].into_iter().collect(),
        }];
        let r = st.on_request(&first, Some(&p)).response.unwrap();
        assert_eq!(names(&r), ["cluster_0", "cluster_1"]);
        assert_eq!(variant(&r.resources[0]), "dev");
        assert_eq!(variant(&r.resources[1]), "default");
        let mut by_node = StreamState::new();
        let mut first = req(CLUSTER_TYPE, &[], "", "");
        let mut node = Node::default();
        let params = ContextParams { params: [("env".to_owned(), "prod".to_owned())].into_iter().collect() };
        node.dynamic_parameters.insert(CLUSTER_TYPE.to_owned(), params);
        first.node = Some(node);
        let r = by_node.on_request(&first, Some(&p)).response.unwrap();
        assert!(r.resources.iter().all(|a| variant(a) == "prod"));
        let mut unknown = StreamState::new();
        let mut first = req(CLUSTER_TYPE, &[], "", "");
        first.resource_locators = vec![ResourceLocator {
            name: "cluster_0".into(),
            dynamic_parameters: [("env".to_owned(), "qa".to_owned())].into_iter().collect(),
        }];
        let r = unknown.on_request(&first, Some(&p)).response.unwrap();
        assert!(r.resources.is_empty(), "no variant matches env=qa");
    }
}
