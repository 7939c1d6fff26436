//! The upstream side: one subscription per aggregation key to the origin management server.
//!
//! Each key's subscription is a task that opens a state-of-the-world stream (per-type or ADS,
//! per `origin_server.api_type`), asks for the union of the names its watchers want, applies
//! every response to the key's cache entry and ACKs it to the origin itself. Downstream NACKs
//! are never forwarded; a response the relay cannot use is NACKed by the relay and the cache
//! keeps the previous state.
//!
//! Invariants:
//! - failures never reach downstream clients: the cache keeps serving the last state while
//!   the task reconnects with jittered exponential backoff;
//! - the origin addresses are tried in order; while on a fallback the primary is probed every
//!   `failback_interval` and taken back as soon as it accepts connections;
//! - one task per key, ended by the key's eviction or by shutdown (its cancellation token).

use std::sync::Arc;
use std::time::Duration;

mod delta;
mod sotw;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};

use crate::backoff::{Backoff, jitter};
use crate::cache::{Entry, Interest};
use crate::config::OriginServer;

/// Metadata key under which `request_node_metadata` is sent upstream (as xds-relay does).
pub const NODE_METADATA_KEY: &str = "xdsrelay_node_metadata";

/// gRPC code sent in the relay's own NACKs (INVALID_ARGUMENT).
const NACK_CODE: i32 = 3;

/// Problems building the origin client.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// An origin address does not form a valid URI.
    #[error("invalid origin address {address}: {source}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

struct OriginAddress {
    host_port: String,
    channel: Channel,
}

/// The origin management server(s): one lazily connected HTTP/2 channel per address, shared
/// by every key's stream.
#[derive(Clone)]
pub struct Origin {
    inner: Arc<OriginInner>,
}

struct OriginInner {
    addresses: Vec<OriginAddress>,
    settings: OriginServer,
    tracker: TaskTracker,
}

impl Origin {
    /// Prepares channels to every configured address (nothing connects until first use).
    ///
    /// # Errors
    /// [`UpstreamError::Address`] when an address is not usable in a URI.
    pub fn new(settings: &OriginServer, tracker: TaskTracker) -> Result<Self, UpstreamError> {
        let mut addresses = Vec::new();
        for address in std::iter::once(&settings.address).chain(&settings.fallback_addresses) {
            let host_port = address.host_port();
            let endpoint = Endpoint::from_shared(format!("http://{host_port}"))
                .map_err(|source| UpstreamError::Address { address: host_port.clone(), source })?
                .connect_timeout(settings.connect_timeout)
                .http2_keep_alive_interval(settings.keep_alive_time)
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
                .tcp_nodelay(true);
            addresses.push(OriginAddress { host_port, channel: endpoint.connect_lazy() });
        }
        Ok(Self { inner: Arc::new(OriginInner { addresses, settings: settings.clone(), tracker }) })
    }

    /// Starts the subscription of `entry`; it runs until `cancel` fires. `handoff` is the
    /// key's previous source: it is dropped (stopping it) once this subscription has applied
    /// its first response, or when this one stops (make-before-break).
    pub fn spawn(&self, entry: Arc<Entry>, cancel: CancellationToken, handoff: Option<Box<dyn Send>>) {
        let inner = self.inner.clone();
        self.inner.tracker.spawn(async move {
            let key = entry.key.clone();
            let mut handoff = Handoff(handoff);
            run_subscription(inner, entry, cancel, &mut handoff).await;
            tracing::debug!(key = %key, "upstream subscription stopped");
        });
    }
}

/// How one upstream stream ended.
enum StreamEnd {
    /// Shutdown or eviction.
    Cancelled,
    /// Rotated by `stream_timeout`: reconnect at once.
    Rotated,
    /// The primary is reachable again: reconnect to it at once.
    FailBack,
    /// The stream ended or failed; `answered` tells whether the origin had answered on it.
    Closed { answered: bool, error: String },
}

/// The source being replaced; released once the new source has delivered.
pub struct Handoff(pub Option<Box<dyn Send>>);

impl Handoff {
    /// Stops the previous source, if it still runs.
    pub fn release(&mut self) {
        self.0.take();
    }
}

async fn run_subscription(
    origin: Arc<OriginInner>,
    entry: Arc<Entry>,
    cancel: CancellationToken,
    handoff: &mut Handoff,
) {
    let settings = &origin.settings;
    let mut backoff = Backoff::new(settings.backoff.initial_interval, settings.backoff.max_interval);
    let mut interest = entry.interest();
    let mut index = 0;
    loop {
        let end = run_stream(&origin, &entry, index, &mut interest, &cancel, handoff).await;
        entry.metrics.upstream_connected.set(0);
        entry.update_upstream(|s| s.connected = false);
        let delay = match end {
            StreamEnd::Cancelled => return,
            StreamEnd::Rotated => {
                tracing::debug!(key = %entry.key, "upstream stream rotated by stream_timeout");
                backoff.reset();
                continue;
            }
            StreamEnd::FailBack => {
                tracing::info!(key = %entry.key, address = %origin.addresses[0].host_port, "origin primary reachable again: switching back");
                entry.metrics.upstream_failovers.inc();
                index = 0;
                backoff.reset();
                continue;
            }
            StreamEnd::Closed { answered, error } => {
                entry.metrics.upstream_failures.inc();
                entry.update_upstream(|s| s.last_error = Some(error.clone()));
                if answered {
                    backoff.reset();
                    tracing::info!(key = %entry.key, address = %origin.addresses[index].host_port, error = %error, "upstream stream ended; reconnecting");
                } else {
                    tracing::warn!(key = %entry.key, address = %origin.addresses[index].host_port, error = %error, "upstream stream failed");
                    if origin.addresses.len() > 1 {
                        index = (index + 1) % origin.addresses.len();
                        entry.metrics.upstream_failovers.inc();
                        tracing::info!(key = %entry.key, address = %origin.addresses[index].host_port, "failing over to the next origin address");
                    }
                }
                backoff.next_delay()
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = sleep(delay) => {}
        }
    }
}

fn upstream_node(entry: &Entry, settings: &OriginServer) -> Node {
    let mut node = entry.node.clone();
    if let Some(value) = &settings.request_node_metadata {
        let metadata = node.metadata.get_or_insert_with(Struct::default);
        metadata
            .fields
            .insert(NODE_METADATA_KEY.to_owned(), Value { kind: Some(value::Kind::StringValue(value.clone())) });
    }
    node
}

async fn run_stream(
    origin: &OriginInner,
    entry: &Arc<Entry>,
    index: usize,
    interest: &mut watch::Receiver<Interest>,
    cancel: &CancellationToken,
    handoff: &mut Handoff,
) -> StreamEnd {
    if origin.settings.api_type.is_delta() {
        run_exchange::<delta::DeltaExchange>(origin, entry, index, interest, cancel, handoff).await
    } else {
        run_exchange::<sotw::SotwExchange>(origin, entry, index, interest, cancel, handoff).await
    }
}

/// One protocol's requests on an upstream stream.
trait Exchange: Sized + Send {
    /// Request message.
    type Request: prost::Message + Send + Sync + 'static;
    /// Response message.
    type Response: prost::Message + Default + Send + 'static;
    /// Protocol name for logs.
    const NAME: &'static str;

    /// The gRPC method for `type_url`.
    fn path(type_url: &str, aggregated: bool) -> &'static str;
    /// The stream's first request, asking for `interest`.
    fn open(entry: &Entry, node: &Node, interest: &Interest) -> (Self, Self::Request);
    /// The request announcing a changed interest, if one is needed.
    fn change(&mut self, entry: &Entry, interest: &Interest) -> Option<Self::Request>;
    /// Applies a response to the cache; returns the ACK, or the relay's NACK.
    fn answer(&mut self, entry: &Entry, response: Self::Response) -> Self::Request;
}

/// Starts the trace of a version the origin delivered for `entry`'s key.
fn trace_version(entry: &Entry) -> impl FnOnce(&crate::cache::KeyState) -> crate::telemetry::traces::VersionTrace + '_ {
    move |state| {
        crate::telemetry::traces::version_received(
            &entry.key,
            &entry.type_url,
            &state.version_info,
            state.resources.len(),
            state.resource_bytes(),
        )
    }
}

/// The relay's own NACK of an origin response it cannot use.
fn rejection_status(entry: &Entry, version: &str, rejection: &crate::cache::Rejection) -> RpcStatus {
    entry.metrics.upstream_rejected.inc();
    tracing::warn!(
        key = %entry.key, type_url = %entry.type_url, version = %version, error = %rejection,
        "origin response rejected; cache unchanged"
    );
    RpcStatus { code: NACK_CODE, message: rejection.to_string(), details: Vec::new() }
}

async fn run_exchange<X: Exchange>(
    origin: &OriginInner,
    entry: &Arc<Entry>,
    index: usize,
    interest: &mut watch::Receiver<Interest>,
    cancel: &CancellationToken,
    handoff: &mut Handoff,
) -> StreamEnd {
    let settings = &origin.settings;
    let address = &origin.addresses[index];
    // A new stream with an empty subscription would mean "wildcard" for LDS/CDS: wait for names.
    while interest.borrow_and_update().is_empty() {
        tokio::select! {
            () = cancel.cancelled() => return StreamEnd::Cancelled,
            changed = interest.changed() => if changed.is_err() { return StreamEnd::Cancelled },
        }
    }
    let node = upstream_node(entry, settings);
    let wanted = interest.borrow().clone();
    let (mut exchange, first) = X::open(entry, &node, &wanted);
    let (tx, rx) = mpsc::channel::<X::Request>(8);
    if tx.send(first).await.is_err() {
        return StreamEnd::Cancelled;
    }
    let path = X::path(&entry.type_url, settings.api_type.is_aggregated());
    let open = async {
        let mut grpc = tonic::client::Grpc::new(address.channel.clone())
            .max_decoding_message_size(settings.max_message_size)
            .max_encoding_message_size(settings.max_message_size);
        grpc.ready().await.map_err(|e| format!("origin {} not ready: {e}", address.host_port))?;
        let codec = tonic_prost::ProstCodec::<X::Request, X::Response>::default();
        let path = http::uri::PathAndQuery::from_static(path);
        grpc.streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| format!("origin {} refused the stream: {}", address.host_port, status.message()))
    };
    let mut inbound = tokio::select! {
        () = cancel.cancelled() => return StreamEnd::Cancelled,
        opened = timeout(settings.connect_timeout + Duration::from_secs(1), open) => match opened {
            Ok(Ok(inbound)) => inbound,
            Ok(Err(error)) => return StreamEnd::Closed { answered: false, error },
            Err(_) => return StreamEnd::Closed { answered: false, error: format!("origin {} did not accept the stream in time", address.host_port) },
        },
    };
    tracing::info!(key = %entry.key, type_url = %entry.type_url, address = %address.host_port, path, protocol = X::NAME, "upstream stream opened");
    entry.update_upstream(|s| s.address = address.host_port.clone());

    let rotate_at = settings
        .stream_timeout
        .map(|t| Instant::now() + t + jitter(settings.stream_timeout_jitter.unwrap_or_default()));
    let mut failback_at = (index > 0).then(|| Instant::now() + settings.failback_interval);
    let mut answered = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return StreamEnd::Cancelled,
            () = sleep_until(rotate_at.unwrap_or_else(far_future)), if rotate_at.is_some() => return StreamEnd::Rotated,
            () = sleep_until(failback_at.unwrap_or_else(far_future)), if failback_at.is_some() => {
                if primary_reachable(origin).await {
                    return StreamEnd::FailBack;
                }
                failback_at = Some(Instant::now() + settings.failback_interval);
            }
            changed = interest.changed() => {
                if changed.is_err() {
                    return StreamEnd::Cancelled;
                }
                let wanted = interest.borrow_and_update().clone();
                if wanted.is_empty() {
                    continue;
                }
                if let Some(request) = exchange.change(entry, &wanted) {
                    tracing::debug!(key = %entry.key, names = wanted.names.len(), wildcard = wanted.wildcard, "upstream subscription changed");
                    if tx.send(request).await.is_err() {
                        return StreamEnd::Closed { answered, error: "request channel closed".into() };
                    }
                }
            }
            message = inbound.message() => match message {
                Ok(Some(response)) => {
                    if !answered {
                        answered = true;
                        entry.metrics.upstream_connected.set(1);
                        entry.update_upstream(|s| { s.connected = true; s.last_error = None; });
                    }
                    entry.metrics.upstream_responses.inc();
                    entry.update_upstream(|s| s.responses += 1);
                    let reply = exchange.answer(entry, response);
                    handoff.release();
                    if tx.send(reply).await.is_err() {
                        return StreamEnd::Closed { answered, error: "request channel closed".into() };
                    }
                }
                Ok(None) => return StreamEnd::Closed { answered, error: format!("origin {} closed the stream", address.host_port) },
                Err(status) => {
                    return StreamEnd::Closed {
                        answered,
                        error: format!("origin {} stream error: {:?}: {}", address.host_port, status.code(), status.message()),
                    };
                }
            },
        }
    }
}

async fn primary_reachable(origin: &OriginInner) -> bool {
    let primary = &origin.addresses[0].host_port;
    matches!(
        timeout(origin.settings.connect_timeout, tokio::net::TcpStream::connect(primary.as_str())).await,
        Ok(Ok(_))
    )
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}
