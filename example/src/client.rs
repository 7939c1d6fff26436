//! A small xDS SotW client for tests and load generation: [`SotwClient`], the SotW side of
//! [`XdsClient`].
//!
//! It records every response and answers each at once: with an ACK (the response's version and
//! nonce, and the current names and locators of that type), or, while [`XdsClient::set_nack`]
//! is set for the type, with a NACK (the last accepted version, the response's nonce, and
//! `error_detail`). Invariants: those of [`crate::xds_client`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse, DynamicParameterConstraints, Resource, ResourceLocator,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::extras::RESOURCE_WRAPPER_TYPE;
use crate::grpc::Protocol;
use crate::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use crate::xds_client::{ClientProtocol, locator_pairs, locators, record, recorded, std_duration};
pub use crate::xds_client::{EndReason, SeenResourceError, Transport, XdsClient};

/// An xDS SotW client; clones share the same streams.
pub type SotwClient = XdsClient<Sotw>;

/// One response as the client received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The response's type URL.
    pub type_url: String,
    /// The response's version.
    pub version_info: String,
    /// The response's nonce.
    pub nonce: String,
    /// Each resource with its name ("" unless it is one of the four core types).
    pub resources: Vec<(String, Any)>,
    /// `control_plane.identifier`, if set.
    pub control_plane: Option<String>,
    /// The response's `resource_errors`.
    pub resource_errors: Vec<SeenResourceError>,
    /// When the response arrived.
    pub received_at: Instant,
}

/// One resource of a SotW response with its `Resource` wrapper, if any, taken apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Unwrapped {
    /// The resource name (from the wrapper when wrapped).
    pub name: String,
    /// The resource; `None` for a bodyless wrapper (a TTL heartbeat).
    pub body: Option<Any>,
    /// The wrapper's version ("" when not wrapped).
    pub version: String,
    /// The wrapper's TTL.
    pub ttl: Option<Duration>,
    /// The wrapper's `cache_control.do_not_cache`.
    pub do_not_cache: bool,
    /// The wrapper's dynamic-parameter constraints.
    pub constraints: Option<DynamicParameterConstraints>,
}

impl Received {
    /// The resource names, in response order.
    pub fn names(&self) -> Vec<&str> {
        self.resources.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The first resource named `name`, unwrapped.
    pub fn unwrapped(&self, name: &str) -> Option<Unwrapped> {
        self.resources.iter().find(|(n, _)| n == name).map(|(n, any)| unwrap(n, any))
    }

    /// Every resource, unwrapped, in response order.
    pub fn all_unwrapped(&self) -> Vec<Unwrapped> {
        self.resources.iter().map(|(n, any)| unwrap(n, any)).collect()
    }

    /// Whether this response is a TTL heartbeat: it has resources and every one is a bodyless
    /// wrapper.
    pub fn is_heartbeat(&self) -> bool {
        !self.resources.is_empty() && self.all_unwrapped().iter().all(|u| u.body.is_none())
    }
}

recorded!(Received: version_info);

impl crate::xds_client::Marked for Received {
    fn first_name_containing(&self, marker: &str) -> Option<String> {
        self.all_unwrapped().into_iter().map(|u| u.name).find(|name| name.contains(marker))
    }
}

/// Takes `any` (named `name`) out of its `Resource` wrapper, if it has one.
pub fn unwrap(name: &str, any: &Any) -> Unwrapped {
    if any.type_url != RESOURCE_WRAPPER_TYPE {
        return Unwrapped {
            name: name.to_owned(),
            body: Some(any.clone()),
            version: String::new(),
            ttl: None,
            do_not_cache: false,
            constraints: None,
        };
    }
    let r = Resource::decode(any.value.as_slice()).unwrap_or_default();
    Unwrapped {
        name: name.to_owned(),
        body: r.resource,
        version: r.version,
        ttl: r.ttl.map(std_duration),
        do_not_cache: r.cache_control.is_some_and(|c| c.do_not_cache),
        constraints: r.resource_name.and_then(|n| n.dynamic_parameter_constraints),
    }
}

/// What kind of request the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentKind {
    /// A [`SotwClient::subscribe`] call (first request or subscription change).
    Subscribe,
    /// The answer to a response, accepting it.
    Ack,
    /// The answer to a response, rejecting it.
    Nack,
}

/// One request the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRequest {
    /// Subscribe, ACK or NACK.
    pub kind: SentKind,
    /// The request's type URL.
    pub type_url: String,
    /// The request's `version_info`.
    pub version_info: String,
    /// The request's `response_nonce`.
    pub response_nonce: String,
    /// The request's `resource_names`.
    pub resource_names: Vec<String>,
    /// The request's `resource_locators`: name and dynamic parameters.
    pub resource_locators: Vec<(String, BTreeMap<String, String>)>,
}

/// Decodes the name of a Listener, Cluster, ClusterLoadAssignment (its `cluster_name`) or
/// RouteConfiguration; `None` for other types or undecodable bytes. A `Resource` wrapper is
/// named by its `name`, else its `resource_name.name`.
///
/// An empty `type_url` means "use the `Any`'s own type URL".
pub fn resource_name(type_url: &str, any: &Any) -> Option<String> {
    if any.type_url == RESOURCE_WRAPPER_TYPE {
        let r = Resource::decode(any.value.as_slice()).ok()?;
        return Some(if r.name.is_empty() { r.resource_name.map(|n| n.name).unwrap_or_default() } else { r.name });
    }
    let type_url = if type_url.is_empty() { any.type_url.as_str() } else { type_url };
    let bytes = any.value.as_slice();
    match type_url {
        LISTENER_TYPE => Listener::decode(bytes).ok().map(|m| m.name),
        CLUSTER_TYPE => Cluster::decode(bytes).ok().map(|m| m.name),
        ENDPOINT_TYPE => ClusterLoadAssignment::decode(bytes).ok().map(|m| m.cluster_name),
        ROUTE_TYPE => RouteConfiguration::decode(bytes).ok().map(|m| m.name),
        _ => None,
    }
}

/// A node with `id` and `cluster`, identifying itself as this client.
pub fn node(id: &str, cluster: &str) -> Node {
    Node {
        id: id.to_owned(),
        cluster: cluster.to_owned(),
        user_agent_name: "xds-relay-example-client".to_owned(),
        ..Default::default()
    }
}

/// The SotW protocol of an [`XdsClient`].
#[derive(Debug)]
pub struct Sotw;

/// Client-side bookkeeping of one SotW type.
#[derive(Debug, Default)]
pub struct SotwTypeState {
    names: Vec<String>,
    /// Resource locators sent with every request of the type.
    locators: Vec<ResourceLocator>,
    accepted_version: String,
    last_nonce: String,
}

impl ClientProtocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type Received = Received;
    type Sent = SentRequest;
    type TypeState = SotwTypeState;

    const PROTOCOL: Protocol = Protocol::Sotw;

    fn receive(type_url: String, response: DiscoveryResponse) -> Received {
        let resources = response
            .resources
            .into_iter()
            .map(|any| (resource_name(&type_url, &any).unwrap_or_default(), any))
            .collect();
        record!(Received { version_info: response.version_info, resources }, type_url, response)
    }

    fn accept(type_state: &mut SotwTypeState, received: &Received) {
        type_state.accepted_version.clone_from(&received.version_info);
    }

    /// Echoes the response's nonce with the accepted version and the type's names and locators.
    fn answer(type_state: &mut SotwTypeState, received: &Received) -> DiscoveryRequest {
        type_state.last_nonce.clone_from(&received.nonce);
        DiscoveryRequest {
            version_info: type_state.accepted_version.clone(),
            resource_names: type_state.names.clone(),
            resource_locators: type_state.locators.clone(),
            type_url: received.type_url.clone(),
            response_nonce: received.nonce.clone(),
            ..Default::default()
        }
    }

    fn record_answer(request: &DiscoveryRequest, nacked: bool) -> SentRequest {
        sent_request(if nacked { SentKind::Nack } else { SentKind::Ack }, request)
    }
}

/// The record of `request`, sent as `kind`.
fn sent_request(kind: SentKind, request: &DiscoveryRequest) -> SentRequest {
    SentRequest {
        kind,
        type_url: request.type_url.clone(),
        version_info: request.version_info.clone(),
        response_nonce: request.response_nonce.clone(),
        resource_names: request.resource_names.clone(),
        resource_locators: locator_pairs(&request.resource_locators),
    }
}

// === impl SotwClient ===

impl XdsClient<Sotw> {
    /// Sends a request for `type_url` with these names, carrying the last accepted version and
    /// the last nonce of that type (a subscription change when the type was requested before).
    /// The first request of a stream opens it and carries the node; with
    /// [`Transport::PerType`] each type has its own stream.
    ///
    /// # Errors
    ///
    /// When the client was closed, the stream has ended, or (per-type) the type URL has no
    /// per-type service.
    pub async fn subscribe(&self, type_url: &str, names: Vec<String>) -> anyhow::Result<()> {
        self.send_subscription(type_url, Some(names), None)
    }

    /// Sends a request for `type_url` whose `resource_locators` are these `(name, dynamic
    /// parameters)` pairs, alongside the names of the last [`SotwClient::subscribe`]; later
    /// ACKs and subscriptions carry them too.
    ///
    /// # Errors
    ///
    /// As [`SotwClient::subscribe`].
    pub async fn subscribe_locators(
        &self,
        type_url: &str,
        locators: Vec<(String, BTreeMap<String, String>)>,
    ) -> anyhow::Result<()> {
        self.send_subscription(type_url, None, Some(self::locators(locators)))
    }

    /// How many bodyless wrappers (TTL heartbeats) of each name the responses of `type_url`
    /// carried.
    pub fn heartbeats(&self, type_url: &str) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for r in self.state().history.iter().filter(|r| r.type_url == type_url) {
            for u in r.all_unwrapped().into_iter().filter(|u| u.body.is_none()) {
                *out.entry(u.name).or_insert(0) += 1;
            }
        }
        out
    }

    /// Sends a subscription request, replacing the names and/or locators given.
    fn send_subscription(
        &self,
        type_url: &str,
        names: Option<Vec<String>>,
        locators: Option<Vec<ResourceLocator>>,
    ) -> anyhow::Result<()> {
        let (key, mut state) = self.lock_to_send(type_url, false)?;
        let type_state = state.types.entry(type_url.to_owned()).or_default();
        if let Some(names) = names {
            type_state.names = names;
        }
        if let Some(locators) = locators {
            type_state.locators = locators;
        }
        let request = DiscoveryRequest {
            version_info: type_state.accepted_version.clone(),
            response_nonce: type_state.last_nonce.clone(),
            resource_names: type_state.names.clone(),
            resource_locators: type_state.locators.clone(),
            type_url: type_url.to_owned(),
            ..Default::default()
        };
        let sent = sent_request(SentKind::Subscribe, &request);
        self.send(state, key, true, request, sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::util::pack_any;

    #[test]
    fn names_of_core_types() {
        let cla = ClusterLoadAssignment { cluster_name: "c".into(), ..Default::default() };
        assert_eq!(resource_name(ENDPOINT_TYPE, &pack_any(cla.clone())), Some("c".into()));
        assert_eq!(resource_name("", &pack_any(cla)), Some("c".into()));
        let l = Listener { name: "l".into(), ..Default::default() };
        assert_eq!(resource_name(LISTENER_TYPE, &pack_any(l)), Some("l".into()));
        let any = Any { type_url: "x".into(), value: vec![] };
        assert_eq!(resource_name("x", &any), None);
    }

    #[test]
    fn type_urls_match_prost_names() {
        use prost::Name;
        assert_eq!(LISTENER_TYPE, Listener::type_url());
        assert_eq!(CLUSTER_TYPE, Cluster::type_url());
        assert_eq!(ENDPOINT_TYPE, ClusterLoadAssignment::type_url());
        assert_eq!(ROUTE_TYPE, RouteConfiguration::type_url());
    }
}
