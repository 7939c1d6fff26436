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
//! - nonces are unique within the stream.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;

use crate::publisher::Published;
use crate::snapshot::{self, CLUSTER_TYPE, LISTENER_PREFIX, LISTENER_TYPE, PUSH_ORDER};

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
    /// An empty list still means wildcard (LDS/CDS before any explicit name).
    legacy_wildcard: bool,
}

// === impl Subscription ===

impl Subscription {
    /// A subscription that has seen no request yet.
    pub fn new(type_url: &str) -> Self {
        let legacy_wildcard = type_url == LISTENER_TYPE || type_url == CLUSTER_TYPE;
        Self { wildcard: false, names: BTreeSet::new(), legacy_wildcard }
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

/// The resources of `type_url` that `subscription` selects from `published`, by name.
pub fn select(type_url: &str, subscription: &Subscription, published: &Published) -> BTreeMap<String, Any> {
    let all = published.snapshot.resources_of(type_url);
    let mut out = BTreeMap::new();
    if subscription.wildcard
        && let Some(all) = all
    {
        out.extend(all.iter().map(|(n, a)| (n.clone(), a.clone())));
    }
    for name in &subscription.names {
        if out.contains_key(name) {
            continue;
        }
        if let Some(any) = all.and_then(|all| all.get(name)) {
            out.insert(name.clone(), any.clone());
        } else if type_url == LISTENER_TYPE && !name.starts_with(LISTENER_PREFIX) {
            out.insert(name.clone(), snapshot::api_listener(name));
        }
    }
    out
}

/// Protocol state of one type on one stream.
#[derive(Debug, Clone)]
struct TypeState {
    subscription: Subscription,
    /// Nonce of the last response of this type.
    last_nonce: Option<String>,
    /// Generation of the last response of this type.
    last_generation: Option<u64>,
}

/// Protocol state of one SotW stream (ADS or per-type).
#[derive(Debug, Clone, Default)]
pub struct StreamState {
    types: BTreeMap<String, TypeState>,
    nonces: u64,
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
        let (kind, subscription_changed, answer) = match self.types.get_mut(type_url) {
            None => {
                let mut subscription = Subscription::new(type_url);
                let changed = subscription.apply(&request.resource_names);
                let state = TypeState { subscription, last_nonce: None, last_generation: None };
                self.types.insert(type_url.to_owned(), state);
                (RequestKind::Initial, changed, true)
            }
            Some(state) => {
                if let Some(last) = &state.last_nonce
                    && *last != request.response_nonce
                {
                    return RequestOutcome { kind: RequestKind::Stale, subscription_changed: false, response: None };
                }
                let changed = state.subscription.apply(&request.resource_names);
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

    /// Builds the response of `type_url` from `published` and records it as sent.
    fn respond(&mut self, type_url: &str, published: &Published) -> Option<DiscoveryResponse> {
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let state = self.types.get_mut(type_url)?;
        let resources = select(type_url, &state.subscription, published);
        state.last_nonce = Some(nonce.clone());
        state.last_generation = Some(published.generation());
        Some(DiscoveryResponse {
            version_info: published.version().to_owned(),
            resources: resources.into_values().collect(),
            type_url: type_url.to_owned(),
            nonce,
            control_plane: Some(ControlPlane { identifier: published.identifier.clone() }),
            ..Default::default()
        })
    }
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
}
