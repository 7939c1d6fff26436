//! What the SotW and delta test clients share: [`XdsClient`] connects, opens one ADS stream
//! ([`Transport::Ads`]) or one stream per type URL ([`Transport::PerType`]), records every
//! response and every request, answers each response at once with an ACK or (while
//! [`XdsClient::set_nack`] is set for its type) a NACK, and reports why streams end. What
//! differs between the protocols (messages, bookkeeping per type, what an answer carries) is
//! behind [`ClientProtocol`], implemented by [`crate::client::Sotw`] and
//! [`crate::delta_client::Delta`].
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
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, ResourceError, ResourceLocator,
};
use envoy_types::pb::google::rpc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

pub use crate::grpc::{Protocol, Transport};
use crate::grpc::{method_path, streaming};

/// `google.rpc.Code.INVALID_ARGUMENT`, the code gRPC clients put in NACKs.
const NACK_CODE: i32 = 3;

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

/// The end reason of a stream the server closed with OK.
pub(crate) fn closed_by_server() -> EndReason {
    EndReason { code: None, message: "closed by server".to_owned() }
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

/// What [`XdsClient`] reads and writes of a request, SotW or delta.
pub trait XdsRequest: prost::Message + Send + Sync + 'static {
    /// The request's type URL.
    fn type_url(&self) -> &str;
    /// Sets the node the first request of a stream carries.
    fn set_node(&mut self, node: Node);
    /// Makes the request a NACK with this `error_detail`.
    fn set_error_detail(&mut self, status: rpc::Status);
}

/// What [`XdsClient`] reads of a response, SotW or delta.
pub trait XdsResponse: prost::Message + Default + Send + Sync + 'static {
    /// The response's type URL ("" means the type of the per-type stream).
    fn type_url(&self) -> &str;
}

/// Requests and responses of both protocols carry `type_url`, `node` and `error_detail` alike.
macro_rules! xds_messages {
    ($(($request:ty, $response:ty)),*) => {$(
        impl XdsRequest for $request {
            fn type_url(&self) -> &str {
                &self.type_url
            }

            fn set_node(&mut self, node: Node) {
                self.node = Some(node);
            }

            fn set_error_detail(&mut self, status: rpc::Status) {
                self.error_detail = Some(status);
            }
        }

        impl XdsResponse for $response {
            fn type_url(&self) -> &str {
                &self.type_url
            }
        }
    )*};
}

xds_messages!((DiscoveryRequest, DiscoveryResponse), (DeltaDiscoveryRequest, DeltaDiscoveryResponse));

/// What [`XdsClient`] reads of a recorded response, SotW or delta.
pub trait Recorded {
    /// The response's type URL.
    fn type_url(&self) -> &str;
    /// The response's version, as wait errors name it.
    fn version(&self) -> &str;
}

/// What [`XdsClient::set_nack_marker`] reads of a recorded response.
pub trait Marked {
    /// The first resource name of the response that contains `marker`.
    fn first_name_containing(&self, marker: &str) -> Option<String>;
}

/// Implements [`Recorded`] for records that keep the type URL and the version as fields.
macro_rules! recorded {
    ($($received:ty: $version:ident),*) => {$(
        impl $crate::xds_client::Recorded for $received {
            fn type_url(&self) -> &str {
                &self.type_url
            }

            fn version(&self) -> &str {
                &self.$version
            }
        }
    )*};
}

pub(crate) use recorded;

/// The record `$record { .. }` of `$response`, received now: the fields given, and those every
/// record takes from its response alike (type URL, nonce, control plane, resource errors).
macro_rules! record {
    ($record:ident { $($field:ident $(: $value:expr)?),* $(,)? }, $type_url:expr, $response:ident) => {
        $record {
            $($field $(: $value)?,)*
            type_url: $type_url,
            nonce: $response.nonce,
            control_plane: $response.control_plane.map(|c| c.identifier),
            resource_errors: $response
                .resource_errors
                .into_iter()
                .map($crate::xds_client::SeenResourceError::from)
                .collect(),
            received_at: std::time::Instant::now(),
        }
    };
}
pub(crate) use record;

/// One protocol's side of an [`XdsClient`]: its messages, what it records, and how it answers a
/// response.
pub trait ClientProtocol: fmt::Debug + Send + Sync + 'static {
    /// The request message.
    type Request: XdsRequest + fmt::Debug;
    /// The response message.
    type Response: XdsResponse;
    /// One response as the client records it.
    type Received: Recorded + Marked + Clone + fmt::Debug + Send + Sync + 'static;
    /// One request as the client records it.
    type Sent: Clone + fmt::Debug + Send + Sync + 'static;
    /// The client's bookkeeping of one type.
    type TypeState: Default + fmt::Debug + Send + Sync + 'static;

    /// Which streaming methods the client calls.
    const PROTOCOL: Protocol;

    /// The record of `response`, whose type URL is `type_url`, received now.
    fn receive(type_url: String, response: Self::Response) -> Self::Received;

    /// Applies an accepted response to the type's bookkeeping (a NACKed one is not applied).
    fn accept(type_state: &mut Self::TypeState, received: &Self::Received);

    /// The ACK of `received`, from the type's bookkeeping once `received` was accepted or not;
    /// a NACK is this request with `error_detail` set.
    fn answer(type_state: &mut Self::TypeState, received: &Self::Received) -> Self::Request;

    /// The record of `request`, sent as an answer (`nacked` or not).
    fn record_answer(request: &Self::Request, nacked: bool) -> Self::Sent;
}

/// An xDS client of protocol `P`; clones share the same streams.
#[derive(Debug)]
pub struct XdsClient<P: ClientProtocol> {
    inner: Arc<Inner<P>>,
}

impl<P: ClientProtocol> Clone for XdsClient<P> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

#[derive(Debug)]
struct Inner<P: ClientProtocol> {
    transport: Transport,
    node: Node,
    channel: Channel,
    state: Mutex<State<P>>,
    /// Bumped after every response and every stream end.
    events: watch::Sender<u64>,
}

/// Everything a client records and keeps, under one lock.
#[derive(Debug)]
pub(crate) struct State<P: ClientProtocol> {
    /// Request queue per stream key ("" for ADS, the type URL for per-type streams).
    streams: HashMap<String, mpsc::UnboundedSender<P::Request>>,
    /// Bookkeeping per type URL.
    pub(crate) types: HashMap<String, P::TypeState>,
    /// The NACK message per type URL, while responses of that type are NACKed.
    nacks: HashMap<String, String>,
    /// While set, a response with a resource whose name contains it is NACKed.
    nack_marker: Option<String>,
    pub(crate) history: Vec<P::Received>,
    pub(crate) sent: Vec<P::Sent>,
    /// The first stream end.
    ended: Option<EndReason>,
    /// Keys of the streams that ended, with why.
    ended_streams: HashMap<String, EndReason>,
    closed: bool,
}

impl<P: ClientProtocol> Default for State<P> {
    fn default() -> Self {
        Self {
            streams: HashMap::new(),
            types: HashMap::new(),
            nacks: HashMap::new(),
            nack_marker: None,
            history: Vec::new(),
            sent: Vec::new(),
            ended: None,
            ended_streams: HashMap::new(),
            closed: false,
        }
    }
}

// === impl XdsClient ===

impl<P: ClientProtocol> XdsClient<P> {
    /// Connects to `endpoint` (e.g. `http://127.0.0.1:9991`); streams open on the first
    /// subscription.
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
    /// the first subscription.
    pub fn with_channel(channel: Channel, transport: Transport, node: Node) -> Self {
        let (events, _) = watch::channel(0);
        let inner = Inner { transport, node, channel, state: Mutex::default(), events };
        Self { inner: Arc::new(inner) }
    }

    /// The node this client sends.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Sends `request` as-is on the open stream that carries its type URL, without touching the
    /// client's bookkeeping (versions, nonces, names); for protocol tests such as stale nonces.
    ///
    /// # Errors
    ///
    /// When that stream is not open (never subscribed, ended, or closed).
    pub fn send_raw(&self, request: P::Request) -> anyhow::Result<()> {
        let key = self.stream_key(request.type_url())?;
        let state = self.inner.lock();
        let tx = state.streams.get(&key).context("no open stream for this type URL")?;
        tx.send(request).map_err(|_| anyhow!("stream has ended"))
    }

    /// While `message` is set, responses of `type_url` are answered with a NACK carrying it;
    /// `None` returns to ACKing.
    pub fn set_nack(&self, type_url: &str, message: Option<String>) {
        let nacks = &mut self.inner.lock().nacks;
        match message {
            Some(message) => nacks.insert(type_url.to_owned(), message),
            None => nacks.remove(type_url),
        };
    }

    /// While `marker` is set, a response (of any type) carrying a resource whose name
    /// contains it is NACKed with a message naming that resource, as a client rejecting a
    /// bad resource does; `None` returns to ACKing them.
    pub fn set_nack_marker(&self, marker: Option<String>) {
        self.inner.lock().nack_marker = marker;
    }

    /// Every response received, in order.
    pub fn history(&self) -> Vec<P::Received> {
        self.inner.lock().history.clone()
    }

    /// Every request sent (subscriptions, ACKs and NACKs), in order.
    pub fn sent(&self) -> Vec<P::Sent> {
        self.inner.lock().sent.clone()
    }

    /// The latest response of `type_url`.
    pub fn latest(&self, type_url: &str) -> Option<P::Received> {
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
        pred: impl Fn(&P::Received) -> bool,
    ) -> anyhow::Result<P::Received> {
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
            if let Some(found) = state.history[seen..].iter().find(|r| r.type_url() == type_url && pred(r)) {
                return Ok(found.clone());
            }
            seen = state.history.len();
            state.check_waiting(&key, type_url, timeout, woke.is_ok_and(|changed| changed.is_ok()))?;
        }
    }

    /// Waits until the client's bookkeeping of `type_url` satisfies `found`, and returns what
    /// it found.
    ///
    /// # Errors
    ///
    /// On timeout, or when the stream carrying `type_url` ends first; the message names the
    /// last version received for the type and `describe` of the bookkeeping.
    pub(crate) async fn wait_for_type<T>(
        &self,
        type_url: &str,
        timeout: Duration,
        found: impl Fn(Option<&P::TypeState>) -> Result<T, String>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.inner.events.subscribe();
        let key = self.stream_key(type_url).unwrap_or_default();
        let mut woke = true;
        loop {
            {
                let state = self.inner.lock();
                let missing = match found(state.types.get(type_url)) {
                    Ok(found) => return Ok(found),
                    Err(missing) => missing,
                };
                state.check_waiting(&key, type_url, timeout, woke).context(missing)?;
            }
            woke = matches!(tokio::time::timeout_at(deadline, events.changed()).await, Ok(Ok(())));
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

    /// The state, for reading.
    pub(crate) fn state(&self) -> MutexGuard<'_, State<P>> {
        self.inner.lock()
    }

    /// The state, for a caller about to send on the stream of `type_url`, with that stream's
    /// key: fails once the client is closed, when `type_url` has no per-type service
    /// (per-type), or, unless `after_end` allows it, when the stream has ended.
    pub(crate) fn lock_to_send(
        &self,
        type_url: &str,
        after_end: bool,
    ) -> anyhow::Result<(String, MutexGuard<'_, State<P>>)> {
        let key = self.stream_key(type_url)?;
        let state = self.inner.lock();
        if state.closed {
            bail!("client is closed");
        }
        if let Some(reason) = state.ended_streams.get(&key).filter(|_| !after_end) {
            bail!("stream for {type_url} has ended: {reason}");
        }
        Ok((key, state))
    }

    /// Records `sent` and queues `request` on the stream `key`, opening that stream (with the
    /// node on its first request) when it is not open and `open` allows it.
    pub(crate) fn send(
        &self,
        mut state: MutexGuard<'_, State<P>>,
        key: String,
        open: bool,
        mut request: P::Request,
        sent: P::Sent,
    ) -> anyhow::Result<()> {
        state.sent.push(sent);
        let type_url = request.type_url().to_owned();
        if let Some(tx) = state.streams.get(&key) {
            return tx.send(request).map_err(|_| anyhow!("stream for {type_url} has ended"));
        }
        if !open {
            bail!("stream for {type_url} has ended");
        }
        request.set_node(self.inner.node.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        // Queue the first request before the call is made, so the call cannot wait on it.
        tx.send(request).map_err(|_| anyhow!("request queue closed"))?;
        state.streams.insert(key.clone(), tx);
        drop(state);
        let reader = StreamReader {
            inner: Arc::downgrade(&self.inner),
            key,
            type_url,
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
            Transport::PerType if method_path(P::PROTOCOL, Transport::PerType, type_url).is_some() => {
                Ok(type_url.to_owned())
            }
            Transport::PerType => bail!("no per-type {} service for {type_url}", protocol_name(P::PROTOCOL)),
        }
    }
}

/// How error messages name a protocol.
fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Sotw => "SotW",
        Protocol::Delta => "delta",
    }
}

// === impl Inner ===

impl<P: ClientProtocol> Inner<P> {
    fn lock(&self) -> MutexGuard<'_, State<P>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records a response and answers it with an ACK or a NACK.
    fn on_response(&self, key: &str, response: P::Response) {
        let type_url = if response.type_url().is_empty() { key.to_owned() } else { response.type_url().to_owned() };
        let received = P::receive(type_url.clone(), response);
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            let marked = state.nack_marker.as_deref().and_then(|marker| {
                received
                    .first_name_containing(marker)
                    .map(|name| format!("resource {name} rejected: it carries marker {marker}"))
            });
            let nack = marked.as_ref().or_else(|| state.nacks.get(&type_url));
            let type_state = state.types.entry(type_url).or_default();
            if nack.is_none() {
                P::accept(type_state, &received);
            }
            let mut request = P::answer(type_state, &received);
            if let Some(message) = nack {
                request.set_error_detail(rpc::Status { code: NACK_CODE, message: message.clone(), details: vec![] });
            }
            let sent = P::record_answer(&request, nack.is_some());
            state.history.push(received);
            state.sent.push(sent);
            if let Some(tx) = state.streams.get(key) {
                // A closed queue means the client is closing; the response stays recorded.
                let _ = tx.send(request);
            }
        }
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

impl<P: ClientProtocol> State<P> {
    /// The latest response of `type_url`.
    pub(crate) fn latest(&self, type_url: &str) -> Option<&P::Received> {
        self.history.iter().rev().find(|r| r.type_url() == type_url)
    }

    /// Fails a wait that should stop: the stream `key` ended, or the wait timed out (`woke` is
    /// false).
    fn check_waiting(&self, key: &str, type_url: &str, timeout: Duration, woke: bool) -> anyhow::Result<()> {
        let last = self.latest(type_url).map_or("none", |r| r.version());
        if let Some(reason) = self.ended_streams.get(key) {
            bail!("stream ended ({reason}) while waiting for {type_url}; last received version: {last}");
        }
        if !woke {
            bail!("timed out after {timeout:?} waiting for {type_url}; last received version: {last}");
        }
        Ok(())
    }
}

/// The task that opens one stream and reads its responses.
struct StreamReader<P: ClientProtocol> {
    inner: Weak<Inner<P>>,
    key: String,
    type_url: String,
    transport: Transport,
    channel: Channel,
}

// === impl StreamReader ===

impl<P: ClientProtocol> StreamReader<P> {
    async fn run(self, outbound: UnboundedReceiverStream<P::Request>) {
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

    /// Makes the streaming call that matches the protocol, the transport and the type.
    async fn call(&self, outbound: UnboundedReceiverStream<P::Request>) -> Result<Streaming<P::Response>, Status> {
        let path = method_path(P::PROTOCOL, self.transport, &self.type_url).ok_or_else(|| {
            let name = protocol_name(P::PROTOCOL);
            Status::unimplemented(format!("no per-type {name} service for {}", self.type_url))
        })?;
        streaming(self.channel.clone(), path, outbound).await
    }

    fn end(&self, code: Option<Code>, message: &str) {
        if let Some(inner) = self.inner.upgrade() {
            inner.on_end(&self.key, EndReason { code, message: message.to_owned() });
        }
    }
}
