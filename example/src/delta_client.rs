//! A small delta (incremental) xDS client for tests: [`DeltaClient`], the delta side of
//! [`XdsClient`] and the counterpart of [`crate::client::SotwClient`].
//!
//! It records every response, applies it to its view of the type (name → resource version),
//! and answers it at once: with an ACK (the response's nonce), or, while
//! [`XdsClient::set_nack`] is set for the type, with a NACK (the nonce and `error_detail`; the
//! view is then left unchanged).
//!
//! Invariants: those of [`crate::xds_client`], and `initial_resource_versions` go only on the
//! first request of each type, and they seed the view.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DynamicParameterConstraints, Resource,
};
use envoy_types::pb::google::protobuf::Any;

use crate::grpc::Protocol;
use crate::snapshot::{CLUSTER_TYPE, LISTENER_TYPE};
use crate::sotw::WILDCARD;
use crate::xds_client::{
    ClientProtocol, SeenResourceError, XdsClient, locator_pairs, locators, record, recorded, std_duration,
};

/// A delta xDS client; clones share the same streams.
pub type DeltaClient = XdsClient<Delta>;

/// One resource of a delta response.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaResource {
    /// The resource's name (`name`, or `resource_name.name` when `name` is empty).
    pub name: String,
    /// The resource's version.
    pub version: String,
    /// The resource; `None` in a TTL heartbeat.
    pub resource: Option<Any>,
    /// The resource's TTL, if set.
    pub ttl: Option<Duration>,
    /// The resource's aliases.
    pub aliases: Vec<String>,
    /// `cache_control.do_not_cache`.
    pub do_not_cache: bool,
    /// `resource_name.dynamic_parameter_constraints`, for a variant.
    pub constraints: Option<DynamicParameterConstraints>,
}

impl DeltaResource {
    /// Whether this is a TTL heartbeat: no body, a TTL.
    pub fn is_heartbeat(&self) -> bool {
        self.resource.is_none() && self.ttl.is_some()
    }
}

/// One delta response as the client received it.
#[derive(Debug, Clone)]
pub struct DeltaReceived {
    /// The response's type URL.
    pub type_url: String,
    /// The response's `system_version_info`.
    pub system_version_info: String,
    /// The response's nonce.
    pub nonce: String,
    /// The added or changed resources, in response order.
    pub resources: Vec<DeltaResource>,
    /// `removed_resources`, then the names of `removed_resource_names`.
    pub removed: Vec<String>,
    /// `control_plane.identifier`, if set.
    pub control_plane: Option<String>,
    /// The response's `resource_errors`.
    pub resource_errors: Vec<SeenResourceError>,
    /// When the response arrived.
    pub received_at: Instant,
}

impl DeltaReceived {
    /// The names of the added or changed resources, in response order.
    pub fn names(&self) -> Vec<&str> {
        self.resources.iter().map(|r| r.name.as_str()).collect()
    }
}

recorded!(DeltaReceived: system_version_info);

impl crate::xds_client::Marked for DeltaReceived {
    fn first_name_containing(&self, marker: &str) -> Option<String> {
        self.resources.iter().map(|r| r.name.clone()).find(|name| name.contains(marker))
    }
}

/// What kind of delta request the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaSentKind {
    /// A [`DeltaClient::subscribe`] or [`DeltaClient::subscribe_with_versions`] call.
    Subscribe,
    /// A [`DeltaClient::unsubscribe`] call.
    Unsubscribe,
    /// The answer to a response, accepting it.
    Ack,
    /// The answer to a response, rejecting it.
    Nack,
}

/// One delta request the client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaSentRequest {
    /// Subscribe, unsubscribe, ACK or NACK.
    pub kind: DeltaSentKind,
    /// The request's type URL.
    pub type_url: String,
    /// The request's `response_nonce`.
    pub response_nonce: String,
    /// The request's `resource_names_subscribe`.
    pub subscribe: Vec<String>,
    /// The request's `resource_names_unsubscribe`.
    pub unsubscribe: Vec<String>,
    /// The request's `resource_locators_subscribe`: name and dynamic parameters.
    pub subscribe_locators: Vec<(String, BTreeMap<String, String>)>,
    /// The request's `initial_resource_versions`.
    pub initial_resource_versions: BTreeMap<String, String>,
    /// The message of the request's `error_detail` (NACKs only).
    pub error: Option<String>,
}

/// The delta protocol of an [`XdsClient`].
#[derive(Debug)]
pub struct Delta;

/// Client-side bookkeeping of one delta type.
#[derive(Debug, Default)]
pub struct DeltaTypeState {
    /// Whether a request of this type was sent.
    requested: bool,
    /// Whether the wildcard is subscribed (explicitly, or by an empty first LDS/CDS subscribe).
    wildcard: bool,
    /// The explicitly subscribed names.
    names: BTreeSet<String>,
    /// The client's view: name → version.
    view: BTreeMap<String, String>,
    /// TTL heartbeats received per name.
    heartbeats: BTreeMap<String, u32>,
}

impl ClientProtocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    type Received = DeltaReceived;
    type Sent = DeltaSentRequest;
    type TypeState = DeltaTypeState;

    const PROTOCOL: Protocol = Protocol::Delta;

    fn receive(type_url: String, response: DeltaDiscoveryResponse) -> DeltaReceived {
        let mut removed = response.removed_resources;
        removed.extend(response.removed_resource_names.into_iter().map(|n| n.name));
        let resources = response.resources.into_iter().map(delta_resource).collect();
        let version = response.system_version_info;
        record!(DeltaReceived { system_version_info: version, resources, removed }, type_url, response)
    }

    /// Applies the resources and removals of `received` to the view.
    fn accept(type_state: &mut DeltaTypeState, received: &DeltaReceived) {
        for resource in &received.resources {
            if resource.is_heartbeat() {
                // A heartbeat keeps what the client holds.
                *type_state.heartbeats.entry(resource.name.clone()).or_insert(0) += 1;
            } else {
                type_state.view.insert(resource.name.clone(), resource.version.clone());
            }
        }
        for name in &received.removed {
            type_state.view.remove(name);
        }
    }

    /// Echoes the response's nonce.
    fn answer(_: &mut DeltaTypeState, received: &DeltaReceived) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: received.type_url.clone(),
            response_nonce: received.nonce.clone(),
            ..Default::default()
        }
    }

    fn record_answer(request: &DeltaDiscoveryRequest, nacked: bool) -> DeltaSentRequest {
        sent_request(if nacked { DeltaSentKind::Nack } else { DeltaSentKind::Ack }, request)
    }
}

/// The record of `request`, sent as `kind`.
fn sent_request(kind: DeltaSentKind, request: &DeltaDiscoveryRequest) -> DeltaSentRequest {
    DeltaSentRequest {
        kind,
        type_url: request.type_url.clone(),
        response_nonce: request.response_nonce.clone(),
        subscribe: request.resource_names_subscribe.clone(),
        unsubscribe: request.resource_names_unsubscribe.clone(),
        subscribe_locators: locator_pairs(&request.resource_locators_subscribe),
        initial_resource_versions: request
            .initial_resource_versions
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect(),
        error: request.error_detail.as_ref().map(|e| e.message.clone()),
    }
}

/// The client's form of one resource of a response.
fn delta_resource(resource: Resource) -> DeltaResource {
    let (resource_name, constraints) = match resource.resource_name {
        Some(n) => (n.name, n.dynamic_parameter_constraints),
        None => (String::new(), None),
    };
    let name = if resource.name.is_empty() { resource_name } else { resource.name };
    DeltaResource {
        name,
        version: resource.version,
        resource: resource.resource,
        ttl: resource.ttl.map(std_duration),
        aliases: resource.aliases,
        do_not_cache: resource.cache_control.is_some_and(|c| c.do_not_cache),
        constraints,
    }
}

// === impl DeltaClient ===

impl XdsClient<Delta> {
    /// Subscribes to `names` of `type_url` (`*` is the wildcard; an empty list on the first
    /// LDS/CDS request is the legacy wildcard). The first request of a stream opens it and
    /// carries the node; with [`crate::xds_client::Transport::PerType`] each type has its own stream.
    ///
    /// # Errors
    ///
    /// As [`DeltaClient::subscribe_with_versions`].
    pub async fn subscribe(&self, type_url: &str, names: Vec<String>) -> anyhow::Result<()> {
        self.subscribe_with_versions(type_url, names, HashMap::new()).await
    }

    /// Subscribes to `(name, dynamic parameters)` pairs of `type_url` through
    /// `resource_locators_subscribe`; the client then tracks those names like subscribed ones.
    ///
    /// # Errors
    ///
    /// When the client was closed, the stream has ended, or the type URL has no per-type
    /// service (per-type).
    pub async fn subscribe_locators(
        &self,
        type_url: &str,
        pairs: Vec<(String, BTreeMap<String, String>)>,
    ) -> anyhow::Result<()> {
        self.send_request(type_url, DeltaSentKind::Subscribe, |type_state| {
            type_state.requested = true;
            let subscribe = locators(pairs);
            type_state.names.extend(subscribe.iter().map(|l| l.name.clone()));
            Ok(DeltaDiscoveryRequest { resource_locators_subscribe: subscribe, ..Default::default() })
        })
    }

    /// How many TTL heartbeats (bodyless resources with a TTL) of each name the client
    /// received for `type_url`.
    pub fn heartbeats(&self, type_url: &str) -> BTreeMap<String, u32> {
        self.state().types.get(type_url).map(|t| t.heartbeats.clone()).unwrap_or_default()
    }

    /// Like [`DeltaClient::subscribe`], with `initial_resource_versions` (what a reconnecting
    /// client already holds); they seed the client's view of the type.
    ///
    /// # Errors
    ///
    /// When the client was closed, the stream has ended, the type URL has no per-type service
    /// (per-type), or versions are given on a request other than the type's first.
    pub async fn subscribe_with_versions(
        &self,
        type_url: &str,
        names: Vec<String>,
        initial_resource_versions: HashMap<String, String>,
    ) -> anyhow::Result<()> {
        self.send_request(type_url, DeltaSentKind::Subscribe, |type_state| {
            if type_state.requested && !initial_resource_versions.is_empty() {
                bail!("initial_resource_versions are only sent on the first request of {type_url}");
            }
            if !type_state.requested {
                let legacy = type_url == LISTENER_TYPE || type_url == CLUSTER_TYPE;
                type_state.wildcard = legacy && names.is_empty();
                type_state.view = initial_resource_versions.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
                type_state.requested = true;
            }
            for name in &names {
                if name == WILDCARD {
                    type_state.wildcard = true;
                } else {
                    type_state.names.insert(name.clone());
                }
            }
            Ok(DeltaDiscoveryRequest {
                resource_names_subscribe: names,
                initial_resource_versions,
                ..Default::default()
            })
        })
    }

    /// Unsubscribes from `names` of `type_url` (`*` drops the wildcard) and drops them from the
    /// client's view.
    ///
    /// # Errors
    ///
    /// When the client was closed, the stream has ended, or the type was never subscribed.
    pub async fn unsubscribe(&self, type_url: &str, names: Vec<String>) -> anyhow::Result<()> {
        self.send_request(type_url, DeltaSentKind::Unsubscribe, |type_state| {
            for name in &names {
                if name == WILDCARD {
                    type_state.wildcard = false;
                    let explicit = &type_state.names;
                    type_state.view.retain(|held, _| explicit.contains(held));
                } else {
                    type_state.names.remove(name);
                    type_state.view.remove(name);
                }
            }
            Ok(DeltaDiscoveryRequest { resource_names_unsubscribe: names, ..Default::default() })
        })
    }

    /// The client's current view of `type_url` after applying every accepted response:
    /// name → resource version.
    pub fn resources(&self, type_url: &str) -> BTreeMap<String, String> {
        self.state().types.get(type_url).map(|t| t.view.clone()).unwrap_or_default()
    }

    /// Waits until the client's view of `type_url` satisfies `pred`, and returns it.
    ///
    /// # Errors
    ///
    /// On timeout, or when the stream carrying `type_url` ends first.
    pub async fn wait_for_state(
        &self,
        type_url: &str,
        timeout: Duration,
        pred: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        self.wait_for_type(type_url, timeout, |type_state| {
            let view = type_state.map(|t| t.view.clone()).unwrap_or_default();
            if pred(&view) { Ok(view) } else { Err(format!("view: {view:?}")) }
        })
        .await
    }

    /// Sends a request of `kind` for `type_url`, built by `build` from the type's bookkeeping.
    /// A subscription may open the type's stream and creates the bookkeeping; an unsubscription
    /// needs both.
    fn send_request(
        &self,
        type_url: &str,
        kind: DeltaSentKind,
        build: impl FnOnce(&mut DeltaTypeState) -> anyhow::Result<DeltaDiscoveryRequest>,
    ) -> anyhow::Result<()> {
        let subscribe = kind == DeltaSentKind::Subscribe;
        let (key, mut state) = self.lock_to_send(type_url, !subscribe)?;
        let type_state = if subscribe {
            state.types.entry(type_url.to_owned()).or_default()
        } else {
            state.types.get_mut(type_url).filter(|t| t.requested).context("type was never subscribed")?
        };
        let mut request = build(type_state)?;
        type_url.clone_into(&mut request.type_url);
        let sent = sent_request(kind, &request);
        self.send(state, key, subscribe, request, sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::ResourceName;
    use envoy_types::pb::google::protobuf;

    #[test]
    fn resource_name_falls_back_to_resource_name_field() {
        let r = Resource {
            resource_name: Some(ResourceName { name: "x".into(), ..Default::default() }),
            version: "1".into(),
            ttl: Some(protobuf::Duration { seconds: 2, nanos: 5 }),
            ..Default::default()
        };
        let d = delta_resource(r);
        assert_eq!(d.name, "x");
        assert_eq!(d.ttl, Some(Duration::new(2, 5)));
        assert!(d.resource.is_none());
    }
}
