//! A small xDS SotW client for tests and load generation.
//!
//! [`SotwClient`] opens one ADS stream ([`Transport::Ads`]) or one stream per type URL
//! ([`Transport::PerType`]), records every response, and answers each response at once: with an
//! ACK (the response's version and nonce, and the current names of that type), or, while
//! [`SotwClient::set_nack`] is set for the type, with a NACK (the last accepted version, the
//! response's nonce, and `error_detail`).
//!
//! Invariants:
//! - the node is sent on the first request of each stream only;
//! - requests of a stream leave in the order the client decided them (state changes and sends
//!   happen under one lock, into an unbounded queue that is paced by the server's responses);
//! - stream reader tasks hold the client weakly: dropping every clone of a client ends its
//!   streams.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_client::ClusterDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse, DynamicParameterConstraints, Resource, ResourceError, ResourceLocator,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
use envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_client::ListenerDiscoveryServiceClient;
use envoy_types::pb::envoy::service::route::v3::route_discovery_service_client::RouteDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

use crate::extras::RESOURCE_WRAPPER_TYPE;
use crate::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

/// Largest response the client decodes (tonic's default is 4 MiB).
pub(crate) const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// `google.rpc.Code.INVALID_ARGUMENT`, the code gRPC clients put in NACKs.
pub(crate) const NACK_CODE: i32 = 3;

/// How a [`SotwClient`] or a [`crate::delta_client::DeltaClient`] talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One `StreamAggregatedResources` (or `DeltaAggregatedResources`) stream for every type.
    Ads,
    /// One `StreamClusters` / `StreamEndpoints` / `StreamListeners` / `StreamRoutes` stream per
    /// type (or `DeltaClusters` / `DeltaEndpoints` / `DeltaListeners` / `DeltaRoutes`).
    PerType,
}

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

/// One entry of a response's `resource_errors`, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenResourceError {
    /// `resource_name.name`.
    pub name: String,
    /// `error_detail.code` (0 when absent).
    pub code: i32,
    /// `error_detail.message`.
    pub message: String,
}

impl From<ResourceError> for SeenResourceError {
    fn from(e: ResourceError) -> Self {
        let (code, message) = e.error_detail.map_or((0, String::new()), |d| (d.code, d.message));
        Self { name: e.resource_name.map(|n| n.name).unwrap_or_default(), code, message }
    }
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

/// A `std` duration of a protobuf one (negative parts count as zero).
pub(crate) fn std_duration(d: envoy_types::pb::google::protobuf::Duration) -> Duration {
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0))
}

/// The `(name, dynamic parameters)` pairs of resource locators.
pub(crate) fn locator_pairs(locators: &[ResourceLocator]) -> Vec<(String, BTreeMap<String, String>)> {
    locators
        .iter()
        .map(|l| (l.name.clone(), l.dynamic_parameters.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
        .collect()
}

/// Resource locators of `(name, dynamic parameters)` pairs.
pub(crate) fn locators(pairs: Vec<(String, BTreeMap<String, String>)>) -> Vec<ResourceLocator> {
    pairs
        .into_iter()
        .map(|(name, params)| ResourceLocator { name, dynamic_parameters: params.into_iter().collect() })
        .collect()
}

/// Why a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndReason {
    /// The gRPC status code; `None` when the server closed the stream with OK.
    pub code: Option<Code>,
    /// The status message, or "closed by server".
    pub message: String,
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{code:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
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

/// An xDS SotW client; clones share the same streams.
#[derive(Debug, Clone)]
pub struct SotwClient {
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
    streams: HashMap<String, mpsc::UnboundedSender<DiscoveryRequest>>,
    types: HashMap<String, TypeState>,
    history: Vec<Received>,
    sent: Vec<SentRequest>,
    /// The first stream end.
    ended: Option<EndReason>,
    /// Keys of the streams that ended, with why.
    ended_streams: HashMap<String, EndReason>,
    closed: bool,
}

/// Client-side bookkeeping of one type.
#[derive(Debug, Default)]
struct TypeState {
    names: Vec<String>,
    /// Resource locators sent with every request of the type.
    locators: Vec<ResourceLocator>,
    accepted_version: String,
    last_nonce: String,
    nack: Option<String>,
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

// === impl SotwClient ===

impl SotwClient {
    /// Connects to `endpoint` (e.g. `http://127.0.0.1:9991`); streams open on the first
    /// [`SotwClient::subscribe`].
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
    /// the first [`SotwClient::subscribe`].
    pub fn with_channel(channel: Channel, transport: Transport, node: Node) -> Self {
        let (events, _) = watch::channel(0);
        let inner = Inner { transport, node, channel, state: Mutex::default(), events };
        Self { inner: Arc::new(inner) }
    }

    /// The node this client sends.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

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
        for r in self.inner.lock().history.iter().filter(|r| r.type_url == type_url) {
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
        let key = self.stream_key(type_url)?;
        let mut state = self.inner.lock();
        if state.closed {
            bail!("client is closed");
        }
        if let Some(reason) = state.ended_streams.get(&key) {
            bail!("stream for {type_url} has ended: {reason}");
        }
        let type_state = state.types.entry(type_url.to_owned()).or_default();
        if let Some(names) = names {
            type_state.names = names;
        }
        if let Some(locators) = locators {
            type_state.locators = locators;
        }
        let mut request = DiscoveryRequest {
            version_info: type_state.accepted_version.clone(),
            response_nonce: type_state.last_nonce.clone(),
            resource_names: type_state.names.clone(),
            resource_locators: type_state.locators.clone(),
            type_url: type_url.to_owned(),
            ..Default::default()
        };
        state.record(SentKind::Subscribe, &request);
        if let Some(tx) = state.streams.get(&key) {
            return tx.send(request).map_err(|_| anyhow!("stream for {type_url} has ended"));
        }
        request.node = Some(self.inner.node.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        // Queue the first request before the call is made, so the call cannot wait on it.
        tx.send(request).map_err(|_| anyhow!("request queue closed"))?;
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

    /// Sends `request` as-is on the open stream that carries its type URL, without touching the
    /// client's bookkeeping (version, nonce, names); for protocol tests such as stale nonces.
    ///
    /// # Errors
    ///
    /// When that stream is not open (never subscribed, ended, or closed).
    pub fn send_raw(&self, request: DiscoveryRequest) -> anyhow::Result<()> {
        let key = self.stream_key(&request.type_url)?;
        let state = self.inner.lock();
        let tx = state.streams.get(&key).context("no open stream for this type URL")?;
        tx.send(request).map_err(|_| anyhow!("stream has ended"))
    }

    /// While `message` is set, responses of `type_url` are answered with a NACK carrying it;
    /// `None` returns to ACKing.
    pub fn set_nack(&self, type_url: &str, message: Option<String>) {
        self.inner.lock().types.entry(type_url.to_owned()).or_default().nack = message;
    }

    /// Every response received, in order.
    pub fn history(&self) -> Vec<Received> {
        self.inner.lock().history.clone()
    }

    /// Every request sent (subscribes, ACKs and NACKs), in order.
    pub fn sent(&self) -> Vec<SentRequest> {
        self.inner.lock().sent.clone()
    }

    /// The latest response of `type_url`.
    pub fn latest(&self, type_url: &str) -> Option<Received> {
        self.inner.lock().latest(type_url).cloned()
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
        pred: impl Fn(&Received) -> bool,
    ) -> anyhow::Result<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.inner.events.subscribe();
        let mut seen = {
            let state = self.inner.lock();
            if let Some(latest) = state.latest(type_url).filter(|r| pred(r)) {
                return Ok(latest.clone());
            }
            state.history.len()
        };
        let key = self.stream_key(type_url).unwrap_or_default();
        loop {
            let woke = tokio::time::timeout_at(deadline, events.changed()).await;
            let state = self.inner.lock();
            if let Some(found) = state.history[seen..].iter().find(|r| r.type_url == type_url && pred(r)) {
                return Ok(found.clone());
            }
            seen = state.history.len();
            let last = state.latest(type_url).map_or("none", |r| r.version_info.as_str());
            if let Some(reason) = state.ended_streams.get(&key) {
                bail!("stream ended ({reason}) while waiting for {type_url}; last received version: {last}");
            }
            if !matches!(woke, Ok(Ok(()))) {
                bail!("timed out after {timeout:?} waiting for {type_url}; last received version: {last}");
            }
        }
    }

    /// Why the first of the client's streams ended, once one has.
    pub fn ended(&self) -> Option<EndReason> {
        self.inner.lock().ended.clone()
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
        let mut state = self.inner.lock();
        state.closed = true;
        state.streams.clear();
    }

    /// The stream that carries `type_url`.
    fn stream_key(&self, type_url: &str) -> anyhow::Result<String> {
        match self.inner.transport {
            Transport::Ads => Ok(String::new()),
            Transport::PerType => match type_url {
                CLUSTER_TYPE | ENDPOINT_TYPE | LISTENER_TYPE | ROUTE_TYPE => Ok(type_url.to_owned()),
                _ => bail!("no per-type SotW service for {type_url}"),
            },
        }
    }
}

// === impl Inner ===

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records a response and answers it with an ACK or a NACK.
    fn on_response(&self, key: &str, response: DiscoveryResponse) {
        let type_url = if response.type_url.is_empty() { key.to_owned() } else { response.type_url.clone() };
        let resources = response
            .resources
            .into_iter()
            .map(|any| (resource_name(&type_url, &any).unwrap_or_default(), any))
            .collect();
        let received = Received {
            type_url: type_url.clone(),
            version_info: response.version_info.clone(),
            nonce: response.nonce.clone(),
            resources,
            control_plane: response.control_plane.map(|c| c.identifier),
            resource_errors: response.resource_errors.into_iter().map(SeenResourceError::from).collect(),
            received_at: Instant::now(),
        };
        let mut state = self.lock();
        state.history.push(received);
        let type_state = state.types.entry(type_url.clone()).or_default();
        type_state.last_nonce.clone_from(&response.nonce);
        let mut request = DiscoveryRequest {
            resource_names: type_state.names.clone(),
            resource_locators: type_state.locators.clone(),
            type_url,
            response_nonce: response.nonce,
            ..Default::default()
        };
        let kind = match &type_state.nack {
            Some(message) => {
                request.error_detail = Some(rpc::Status { code: NACK_CODE, message: message.clone(), details: vec![] });
                SentKind::Nack
            }
            None => {
                type_state.accepted_version = response.version_info;
                SentKind::Ack
            }
        };
        request.version_info.clone_from(&type_state.accepted_version);
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
        let mut state = self.lock();
        state.streams.remove(key);
        state.ended_streams.insert(key.to_owned(), reason.clone());
        state.ended.get_or_insert(reason);
        drop(state);
        self.notify();
    }
}

// === impl State ===

impl State {
    fn latest(&self, type_url: &str) -> Option<&Received> {
        self.history.iter().rev().find(|r| r.type_url == type_url)
    }

    fn record(&mut self, kind: SentKind, request: &DiscoveryRequest) {
        self.sent.push(SentRequest {
            kind,
            type_url: request.type_url.clone(),
            version_info: request.version_info.clone(),
            response_nonce: request.response_nonce.clone(),
            resource_names: request.resource_names.clone(),
            resource_locators: locator_pairs(&request.resource_locators),
        });
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
    async fn run(self, outbound: UnboundedReceiverStream<DiscoveryRequest>) {
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

    /// Makes the streaming call that matches the transport and type.
    async fn call(
        &self,
        outbound: UnboundedReceiverStream<DiscoveryRequest>,
    ) -> Result<Streaming<DiscoveryResponse>, tonic::Status> {
        let channel = self.channel.clone();
        let response = match (self.transport, self.type_url.as_str()) {
            (Transport::Ads, _) => {
                AggregatedDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .stream_aggregated_resources(outbound)
                    .await?
            }
            (Transport::PerType, CLUSTER_TYPE) => {
                ClusterDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .stream_clusters(outbound)
                    .await?
            }
            (Transport::PerType, ENDPOINT_TYPE) => {
                EndpointDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .stream_endpoints(outbound)
                    .await?
            }
            (Transport::PerType, LISTENER_TYPE) => {
                ListenerDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .stream_listeners(outbound)
                    .await?
            }
            (Transport::PerType, ROUTE_TYPE) => {
                RouteDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .stream_routes(outbound)
                    .await?
            }
            (Transport::PerType, other) => {
                return Err(tonic::Status::unimplemented(format!("no per-type SotW service for {other}")));
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

/// The end reason of a stream the server closed with OK.
pub(crate) fn closed_by_server() -> EndReason {
    EndReason { code: None, message: "closed by server".to_owned() }
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
