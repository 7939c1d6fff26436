//! A small delta (incremental) xDS client for tests, the counterpart of
//! [`crate::client::SotwClient`].
//!
//! [`DeltaClient`] opens one `DeltaAggregatedResources` stream ([`Transport::Ads`]) or one
//! `Delta<Type>` stream per type URL ([`Transport::PerType`]), records every response, applies it
//! to its view of the type (name → resource version), and answers it at once: with an ACK (the
//! response's nonce), or, while [`DeltaClient::set_nack`] is set for the type, with a NACK (the
//! nonce and `error_detail`; the view is then left unchanged).
//!
//! Invariants:
//! - the node is sent on the first request of each stream only; `initial_resource_versions`
//!   only on the first request of each type, and they seed the view;
//! - requests of a stream leave in the order the client decided them (state changes and sends
//!   happen under one lock, into an unbounded queue that is paced by the server's responses);
//! - stream reader tasks hold the client weakly: dropping every clone of a client ends its
//!   streams.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DynamicParameterConstraints, Resource, ResourceLocator,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
use envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_client::ListenerDiscoveryServiceClient;
use envoy_types::pb::envoy::service::route::v3::route_discovery_service_client::RouteDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

use crate::client::{
    EndReason, MAX_RESPONSE_BYTES, NACK_CODE, SeenResourceError, Transport, closed_by_server, locator_pairs, locators,
    std_duration,
};
use crate::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use crate::sotw::WILDCARD;

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

/// A delta xDS client; clones share the same streams.
#[derive(Debug, Clone)]
pub struct DeltaClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    transport: Transport,
    node: Node,
    channel: Channel,
    state: Mutex<State>,
    /// Bumped after every response and every stream end.
    events: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// Request queue per stream key ("" for ADS, the type URL for per-type streams).
    streams: HashMap<String, mpsc::UnboundedSender<DeltaDiscoveryRequest>>,
    types: HashMap<String, TypeState>,
    history: Vec<DeltaReceived>,
    sent: Vec<DeltaSentRequest>,
    /// The first stream end.
    ended: Option<EndReason>,
    /// Keys of the streams that ended, with why.
    ended_streams: HashMap<String, EndReason>,
    closed: bool,
}

/// Client-side bookkeeping of one type.
#[derive(Debug, Default)]
struct TypeState {
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
    nack: Option<String>,
}

// === impl DeltaClient ===

impl DeltaClient {
    /// Connects to `endpoint` (e.g. `http://127.0.0.1:9991`); streams open on the first
    /// [`DeltaClient::subscribe`].
    ///
    /// # Errors
    ///
    /// When the endpoint is invalid or the connection fails.
    pub async fn connect(endpoint: &str, transport: Transport, node: Node) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .with_context(|| format!("invalid endpoint {endpoint}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to {endpoint}"))?;
        Ok(Self::with_channel(channel, transport, node))
    }

    /// A client on an existing `channel` (for example one set up with TLS); streams open on
    /// the first [`DeltaClient::subscribe`].
    pub fn with_channel(channel: Channel, transport: Transport, node: Node) -> Self {
        let (events, _) = watch::channel(0);
        let inner = Inner { transport, node, channel, state: Mutex::default(), events };
        Self { inner: Arc::new(inner) }
    }

    /// The node this client sends.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Subscribes to `names` of `type_url` (`*` is the wildcard; an empty list on the first
    /// LDS/CDS request is the legacy wildcard). The first request of a stream opens it and
    /// carries the node; with [`Transport::PerType`] each type has its own stream.
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
        let key = self.stream_key(type_url)?;
        let mut state = self.inner.lock()?;
        if let Some(reason) = state.ended_streams.get(&key) {
            bail!("stream for {type_url} has ended: {reason}");
        }
        let type_state = state.types.entry(type_url.to_owned()).or_default();
        type_state.requested = true;
        let subscribe: Vec<ResourceLocator> = locators(pairs);
        type_state.names.extend(subscribe.iter().map(|l| l.name.clone()));
        let request = DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_locators_subscribe: subscribe,
            ..Default::default()
        };
        state.record(DeltaSentKind::Subscribe, &request);
        if let Some(tx) = state.streams.get(&key) {
            return tx.send(request).map_err(|_| anyhow!("stream for {type_url} has ended"));
        }
        self.open_stream(state, key, type_url, request)
    }

    /// How many TTL heartbeats (bodyless resources with a TTL) of each name the client
    /// received for `type_url`.
    pub fn heartbeats(&self, type_url: &str) -> BTreeMap<String, u32> {
        self.inner.lock_state().types.get(type_url).map(|t| t.heartbeats.clone()).unwrap_or_default()
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
        let key = self.stream_key(type_url)?;
        let mut state = self.inner.lock()?;
        if let Some(reason) = state.ended_streams.get(&key) {
            bail!("stream for {type_url} has ended: {reason}");
        }
        let type_state = state.types.entry(type_url.to_owned()).or_default();
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
        let request = DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_subscribe: names,
            initial_resource_versions,
            ..Default::default()
        };
        state.record(DeltaSentKind::Subscribe, &request);
        if let Some(tx) = state.streams.get(&key) {
            return tx.send(request).map_err(|_| anyhow!("stream for {type_url} has ended"));
        }
        self.open_stream(state, key, type_url, request)
    }

    /// Unsubscribes from `names` of `type_url` (`*` drops the wildcard) and drops them from the
    /// client's view.
    ///
    /// # Errors
    ///
    /// When the client was closed, the stream has ended, or the type was never subscribed.
    pub async fn unsubscribe(&self, type_url: &str, names: Vec<String>) -> anyhow::Result<()> {
        let key = self.stream_key(type_url)?;
        let mut state = self.inner.lock()?;
        let type_state = state.types.get_mut(type_url).filter(|t| t.requested).context("type was never subscribed")?;
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
        let request = DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_unsubscribe: names,
            ..Default::default()
        };
        state.record(DeltaSentKind::Unsubscribe, &request);
        let tx = state.streams.get(&key).with_context(|| format!("stream for {type_url} has ended"))?;
        tx.send(request).map_err(|_| anyhow!("stream for {type_url} has ended"))
    }

    /// While `message` is set, responses of `type_url` are answered with a NACK carrying it (and
    /// not applied to the view); `None` returns to ACKing.
    pub fn set_nack(&self, type_url: &str, message: Option<String>) {
        self.inner.lock_state().types.entry(type_url.to_owned()).or_default().nack = message;
    }

    /// Every response received, in order.
    pub fn history(&self) -> Vec<DeltaReceived> {
        self.inner.lock_state().history.clone()
    }

    /// Every request sent (subscribes, unsubscribes, ACKs and NACKs), in order.
    pub fn sent(&self) -> Vec<DeltaSentRequest> {
        self.inner.lock_state().sent.clone()
    }

    /// The latest response of `type_url`.
    pub fn latest(&self, type_url: &str) -> Option<DeltaReceived> {
        self.inner.lock_state().latest(type_url).cloned()
    }

    /// The client's current view of `type_url` after applying every accepted response:
    /// name → resource version.
    pub fn resources(&self, type_url: &str) -> BTreeMap<String, String> {
        self.inner.lock_state().types.get(type_url).map(|t| t.view.clone()).unwrap_or_default()
    }

    /// Returns the first response of `type_url` that satisfies `pred`, checking the latest one
    /// first and then each new one as it arrives.
    ///
    /// # Errors
    ///
    /// On timeout, or when the stream carrying `type_url` ends first; the message names the
    /// last version received for the type.
    pub async fn wait_for(
        &self,
        type_url: &str,
        timeout: Duration,
        pred: impl Fn(&DeltaReceived) -> bool,
    ) -> anyhow::Result<DeltaReceived> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.inner.events.subscribe();
        let mut seen = {
            let state = self.inner.lock_state();
            if let Some(latest) = state.latest(type_url).filter(|r| pred(r)) {
                return Ok(latest.clone());
            }
            state.history.len()
        };
        let key = self.stream_key(type_url).unwrap_or_default();
        loop {
            let woke = tokio::time::timeout_at(deadline, events.changed()).await;
            let state = self.inner.lock_state();
            if let Some(found) = state.history[seen..].iter().find(|r| r.type_url == type_url && pred(r)) {
                return Ok(found.clone());
            }
            seen = state.history.len();
            state.check_waiting(&key, type_url, timeout, &woke)?;
        }
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
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.inner.events.subscribe();
        let key = self.stream_key(type_url).unwrap_or_default();
        let mut woke = Ok(Ok(()));
        loop {
            {
                let state = self.inner.lock_state();
                let view = state.types.get(type_url).map(|t| t.view.clone()).unwrap_or_default();
                if pred(&view) {
                    return Ok(view);
                }
                state.check_waiting(&key, type_url, timeout, &woke).with_context(|| format!("view: {view:?}"))?;
            }
            woke = tokio::time::timeout_at(deadline, events.changed()).await;
        }
    }

    /// Why the first of the client's streams ended, once one has.
    pub fn ended(&self) -> Option<EndReason> {
        self.inner.lock_state().ended.clone()
    }

    /// Waits until one of the client's streams ends.
    ///
    /// # Errors
    ///
    /// When no stream ends within `timeout`.
    pub async fn wait_ended(&self, timeout: Duration) -> anyhow::Result<EndReason> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.inner.events.subscribe();
        loop {
            if let Some(reason) = self.ended() {
                return Ok(reason);
            }
            if !matches!(tokio::time::timeout_at(deadline, events.changed()).await, Ok(Ok(()))) {
                bail!("no stream ended within {timeout:?}");
            }
        }
    }

    /// Half-closes every stream (drops the request queues); the server then ends them.
    pub fn close(&self) {
        let mut state = self.inner.lock_state();
        state.closed = true;
        state.streams.clear();
    }

    /// Queues `first` on a new stream for `key` and starts its reader.
    fn open_stream(
        &self,
        mut state: MutexGuard<'_, State>,
        key: String,
        type_url: &str,
        mut first: DeltaDiscoveryRequest,
    ) -> anyhow::Result<()> {
        first.node = Some(self.inner.node.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        // Queue the first request before the call is made, so the call cannot wait on it.
        tx.send(first).map_err(|_| anyhow!("request queue closed"))?;
        state.streams.insert(key.clone(), tx);
        drop(state);
        let reader = StreamReader {
            inner: Arc::downgrade(&self.inner),
            key,
            type_url: type_url.to_owned(),
            transport: self.inner.transport,
            channel: self.inner.channel.clone(),
        };
        tokio::spawn(reader.run(UnboundedReceiverStream::new(rx)));
        Ok(())
    }

    /// The stream that carries `type_url`.
    fn stream_key(&self, type_url: &str) -> anyhow::Result<String> {
        match self.inner.transport {
            Transport::Ads => Ok(String::new()),
            Transport::PerType => match type_url {
                CLUSTER_TYPE | ENDPOINT_TYPE | LISTENER_TYPE | ROUTE_TYPE => Ok(type_url.to_owned()),
                _ => bail!("no per-type delta service for {type_url}"),
            },
        }
    }
}

// === impl Inner ===

impl Inner {
    /// The state, for a caller about to send: fails once the client is closed.
    fn lock(&self) -> anyhow::Result<MutexGuard<'_, State>> {
        let state = self.lock_state();
        if state.closed {
            bail!("client is closed");
        }
        Ok(state)
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records a response, applies it to the view unless NACKing, and answers it.
    fn on_response(&self, key: &str, response: DeltaDiscoveryResponse) {
        let type_url = if response.type_url.is_empty() { key.to_owned() } else { response.type_url.clone() };
        let mut removed = response.removed_resources;
        removed.extend(response.removed_resource_names.into_iter().map(|n| n.name));
        let received = DeltaReceived {
            type_url: type_url.clone(),
            system_version_info: response.system_version_info,
            nonce: response.nonce.clone(),
            resources: response.resources.into_iter().map(delta_resource).collect(),
            removed,
            control_plane: response.control_plane.map(|c| c.identifier),
            resource_errors: response.resource_errors.into_iter().map(SeenResourceError::from).collect(),
            received_at: Instant::now(),
        };
        let mut state = self.lock_state();
        let type_state = state.types.entry(type_url.clone()).or_default();
        let mut request = DeltaDiscoveryRequest { type_url, response_nonce: response.nonce, ..Default::default() };
        let kind = match &type_state.nack {
            Some(message) => {
                request.error_detail = Some(rpc::Status { code: NACK_CODE, message: message.clone(), details: vec![] });
                DeltaSentKind::Nack
            }
            None => {
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
                DeltaSentKind::Ack
            }
        };
        state.history.push(received);
        state.record(kind, &request);
        if let Some(tx) = state.streams.get(key) {
            // A closed queue means the client is closing; the response stays recorded.
            let _ = tx.send(request);
        }
        drop(state);
        self.notify();
    }

    /// Records the end of the stream `key`.
    fn on_end(&self, key: &str, reason: EndReason) {
        let mut state = self.lock_state();
        state.streams.remove(key);
        state.ended_streams.insert(key.to_owned(), reason.clone());
        state.ended.get_or_insert(reason);
        drop(state);
        self.notify();
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

// === impl State ===

impl State {
    fn latest(&self, type_url: &str) -> Option<&DeltaReceived> {
        self.history.iter().rev().find(|r| r.type_url == type_url)
    }

    fn record(&mut self, kind: DeltaSentKind, request: &DeltaDiscoveryRequest) {
        self.sent.push(DeltaSentRequest {
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
        });
    }

    /// Fails a wait that should stop: the stream ended, or the wait timed out.
    fn check_waiting<T>(
        &self,
        key: &str,
        type_url: &str,
        timeout: Duration,
        woke: &Result<Result<(), T>, tokio::time::error::Elapsed>,
    ) -> anyhow::Result<()> {
        let last = self.latest(type_url).map_or("none", |r| r.system_version_info.as_str());
        if let Some(reason) = self.ended_streams.get(key) {
            bail!("stream ended ({reason}) while waiting for {type_url}; last received version: {last}");
        }
        if !matches!(woke, Ok(Ok(()))) {
            bail!("timed out after {timeout:?} waiting for {type_url}; last received version: {last}");
        }
        Ok(())
    }
}

/// The task that opens one stream and reads its responses.
struct StreamReader {
    inner: Weak<Inner>,
    key: String,
    type_url: String,
    transport: Transport,
    channel: Channel,
}

// === impl StreamReader ===

impl StreamReader {
    async fn run(self, outbound: UnboundedReceiverStream<DeltaDiscoveryRequest>) {
        let mut inbound = match self.call(outbound).await {
            Ok(inbound) => inbound,
            Err(status) => return self.end(Some(status.code()), status.message()),
        };
        loop {
            let message = inbound.message().await;
            let Some(inner) = self.inner.upgrade() else {
                return;
            };
            match message {
                Ok(Some(response)) => inner.on_response(&self.key, response),
                Ok(None) => return inner.on_end(&self.key, closed_by_server()),
                Err(status) => {
                    let reason = EndReason { code: Some(status.code()), message: status.message().into() };
                    return inner.on_end(&self.key, reason);
                }
            }
        }
    }

    /// Makes the delta streaming call that matches the transport and type.
    async fn call(
        &self,
        outbound: UnboundedReceiverStream<DeltaDiscoveryRequest>,
    ) -> Result<Streaming<DeltaDiscoveryResponse>, tonic::Status> {
        let channel = self.channel.clone();
        let response = match (self.transport, self.type_url.as_str()) {
            (Transport::Ads, _) => {
                AggregatedDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .delta_aggregated_resources(outbound)
                    .await?
            }
            (Transport::PerType, CLUSTER_TYPE) => {
                ClusterDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .delta_clusters(outbound)
                    .await?
            }
            (Transport::PerType, ENDPOINT_TYPE) => {
                EndpointDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .delta_endpoints(outbound)
                    .await?
            }
            (Transport::PerType, LISTENER_TYPE) => {
                ListenerDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .delta_listeners(outbound)
                    .await?
            }
            (Transport::PerType, ROUTE_TYPE) => {
                RouteDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .delta_routes(outbound)
                    .await?
            }
            (Transport::PerType, other) => {
                return Err(tonic::Status::unimplemented(format!("no per-type delta service for {other}")));
            }
        };
        Ok(response.into_inner())
    }

    fn end(&self, code: Option<Code>, message: &str) {
        if let Some(inner) = self.inner.upgrade() {
            inner.on_end(&self.key, EndReason { code, message: message.to_owned() });
        }
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
