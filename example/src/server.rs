//! The xDS management server: SotW and delta, ADS and per-type services over gRPC, for any node.
//!
//! Every stream is a spawned task that feeds a bounded response queue (returned to tonic as a
//! [`ReceiverStream`]) from two inputs: the client's requests, and the publisher's latest-wins
//! `watch` channel. The protocol rules live in [`crate::sotw`] and [`crate::delta`]; this module
//! and [`crate::delta_server`] only move messages, check type URLs, and keep the [`Registry`] up
//! to date.
//!
//! Served: `StreamAggregatedResources`, `StreamClusters`, `StreamEndpoints`, `StreamListeners`,
//! `StreamRoutes`, and their delta forms `DeltaAggregatedResources`, `DeltaClusters`,
//! `DeltaEndpoints`, `DeltaListeners`, `DeltaRoutes`. Every `Fetch*` method answers
//! `UNIMPLEMENTED`.
//!
//! Invariants:
//! - a stream ends when the client half-closes or fails, when its response queue is gone, or on
//!   shutdown (with `UNAVAILABLE`), and it leaves the registry when it ends;
//! - a per-type stream only carries its own type URL; a request for another type ends the
//!   stream with `INVALID_ARGUMENT`;
//! - while the current snapshot's extras set a TTL and a heartbeat interval, each stream gets a
//!   CDS heartbeat one interval after its last publish or heartbeat (`Heartbeat`), counted
//!   in the registry as `heartbeats_sent`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::{
    EndpointDiscoveryService, EndpointDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_server::{
    ListenerDiscoveryService, ListenerDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::route::v3::route_discovery_service_server::{
    RouteDiscoveryService, RouteDiscoveryServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::delta_server::{DeltaStreamTask, VersionCache};
use crate::extras::Extras;
use crate::publisher::{Published, Publisher, PublisherConfig};
use crate::registry::{Registry, StatsReport, StreamGuard};
use crate::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use crate::sotw::{RequestKind, StreamState};

/// Responses queued per stream before the stream task waits for the client to read.
const RESPONSE_QUEUE: usize = 16;

/// gRPC method name of the ADS SotW stream.
pub const METHOD_ADS: &str = "StreamAggregatedResources";
/// gRPC method name of the CDS SotW stream.
pub const METHOD_CDS: &str = "StreamClusters";
/// gRPC method name of the EDS SotW stream.
pub const METHOD_EDS: &str = "StreamEndpoints";
/// gRPC method name of the LDS SotW stream.
pub const METHOD_LDS: &str = "StreamListeners";
/// gRPC method name of the RDS SotW stream.
pub const METHOD_RDS: &str = "StreamRoutes";
/// gRPC method name of the ADS delta stream.
pub const METHOD_DELTA_ADS: &str = "DeltaAggregatedResources";
/// gRPC method name of the CDS delta stream.
pub const METHOD_DELTA_CDS: &str = "DeltaClusters";
/// gRPC method name of the EDS delta stream.
pub const METHOD_DELTA_EDS: &str = "DeltaEndpoints";
/// gRPC method name of the LDS delta stream.
pub const METHOD_DELTA_LDS: &str = "DeltaListeners";
/// gRPC method name of the RDS delta stream.
pub const METHOD_DELTA_RDS: &str = "DeltaRoutes";

/// Errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("grpc server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// The server's shared state: the publisher and the stream registry. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ManagementServer {
    publisher: Publisher,
    registry: Arc<Registry>,
}

// === impl ManagementServer ===

impl ManagementServer {
    /// A server that has published nothing yet; call [`ManagementServer::publish_next`].
    pub fn new(config: PublisherConfig) -> Self {
        Self { publisher: Publisher::new(config), registry: Registry::new() }
    }

    /// The snapshot publisher.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The counters and open streams.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Publishes the next snapshot to every stream and returns it.
    pub fn publish_next(&self) -> Arc<Published> {
        self.publisher.publish_next()
    }

    /// Replaces the extras and publishes a snapshot that carries them.
    pub fn set_extras(&self, extras: Extras) -> Arc<Published> {
        tracing::info!(extras = ?extras.spec, "extras replaced");
        self.publisher.set_extras(extras);
        self.publisher.publish_next()
    }

    /// The `/stats` report.
    pub fn stats(&self) -> StatsReport {
        let version = self.publisher.current().map(|p| p.version().to_owned()).unwrap_or_default();
        let mut report = self.registry.report(version, self.publisher.publishes());
        report.extras = self.publisher.extras().spec.clone();
        report
    }
}

/// Serves xDS on an already bound `listener` until `shutdown` completes; then ends every open
/// stream with `UNAVAILABLE` and returns once the connections are closed.
///
/// # Errors
///
/// [`ServeError::Transport`] when the gRPC server fails.
pub async fn serve(
    listener: TcpListener,
    server: ManagementServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with(listener, server, None, shutdown).await
}

/// [`serve`] over TLS: `tls` holds the server certificate and, for mTLS, the client CA.
///
/// # Errors
///
/// [`ServeError::Transport`] when the TLS configuration is refused or the gRPC server fails.
pub async fn serve_tls(
    listener: TcpListener,
    server: ManagementServer,
    tls: tonic::transport::ServerTlsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with(listener, server, Some(tls), shutdown).await
}

async fn serve_with(
    listener: TcpListener,
    server: ManagementServer,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let streams_shutdown = CancellationToken::new();
    // Streams also end if this future is dropped before `shutdown` completes.
    let _cancel_on_drop = streams_shutdown.clone().drop_guard();
    let versions = Arc::new(VersionCache::default());
    let service = XdsService { server, versions, shutdown: streams_shutdown.clone() };
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(conn) = &conn {
            // Small xDS frames: don't let Nagle delay them.
            let _ = conn.set_nodelay(true);
        }
        conn
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(AggregatedDiscoveryServiceServer::new(service.clone()))
        .add_service(ClusterDiscoveryServiceServer::new(service.clone()))
        .add_service(EndpointDiscoveryServiceServer::new(service.clone()))
        .add_service(ListenerDiscoveryServiceServer::new(service.clone()))
        .add_service(RouteDiscoveryServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            streams_shutdown.cancel();
        })
        .await?;
    Ok(())
}

/// The response stream of every SotW method.
type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
/// The response stream of every Delta method.
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// Implements every discovery service on top of one [`ManagementServer`].
#[derive(Debug, Clone)]
struct XdsService {
    server: ManagementServer,
    /// Resource versions of the latest snapshot, shared by the delta streams.
    versions: Arc<VersionCache>,
    /// Cancelled on shutdown; every stream task ends then.
    shutdown: CancellationToken,
}

// === impl XdsService ===

impl XdsService {
    /// Starts the task of one SotW stream and returns its response stream.
    fn open(
        &self,
        method: &'static str,
        fixed_type: Option<&'static str>,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Response<ResponseStream> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let guard = self.server.registry.open(method);
        let span = tracing::debug_span!("stream", id = guard.id(), method);
        let task = StreamTask {
            publisher: self.server.publisher.clone(),
            registry: self.server.registry.clone(),
            guard,
            fixed_type,
            shutdown: self.shutdown.clone(),
            tx,
        };
        tokio::spawn(task.run(request.into_inner()).instrument(span));
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }

    /// Starts the task of one delta stream and returns its response stream.
    fn open_delta(
        &self,
        method: &'static str,
        fixed_type: Option<&'static str>,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Response<DeltaStream> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let guard = self.server.registry.open(method);
        let span = tracing::debug_span!("stream", id = guard.id(), method);
        let task = DeltaStreamTask {
            publisher: self.server.publisher.clone(),
            versions: self.versions.clone(),
            registry: self.server.registry.clone(),
            guard,
            fixed_type,
            shutdown: self.shutdown.clone(),
            tx,
        };
        tokio::spawn(task.run(request.into_inner()).instrument(span));
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }
}

/// The `UNIMPLEMENTED` answer of every Fetch method.
fn fetch_unimplemented() -> Status {
    Status::unimplemented("REST-style fetch is not served by the example management server")
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(self.open(METHOD_ADS, None, request))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(self.open_delta(METHOD_DELTA_ADS, None, request))
    }
}

#[tonic::async_trait]
impl ClusterDiscoveryService for XdsService {
    type StreamClustersStream = ResponseStream;
    type DeltaClustersStream = DeltaStream;

    async fn stream_clusters(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamClustersStream>, Status> {
        Ok(self.open(METHOD_CDS, Some(CLUSTER_TYPE), request))
    }

    async fn delta_clusters(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaClustersStream>, Status> {
        Ok(self.open_delta(METHOD_DELTA_CDS, Some(CLUSTER_TYPE), request))
    }

    async fn fetch_clusters(&self, _request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        Err(fetch_unimplemented())
    }
}

#[tonic::async_trait]
impl EndpointDiscoveryService for XdsService {
    type StreamEndpointsStream = ResponseStream;
    type DeltaEndpointsStream = DeltaStream;

    async fn stream_endpoints(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamEndpointsStream>, Status> {
        Ok(self.open(METHOD_EDS, Some(ENDPOINT_TYPE), request))
    }

    async fn delta_endpoints(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaEndpointsStream>, Status> {
        Ok(self.open_delta(METHOD_DELTA_EDS, Some(ENDPOINT_TYPE), request))
    }

    async fn fetch_endpoints(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(fetch_unimplemented())
    }
}

#[tonic::async_trait]
impl ListenerDiscoveryService for XdsService {
    type DeltaListenersStream = DeltaStream;
    type StreamListenersStream = ResponseStream;

    async fn delta_listeners(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaListenersStream>, Status> {
        Ok(self.open_delta(METHOD_DELTA_LDS, Some(LISTENER_TYPE), request))
    }

    async fn stream_listeners(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamListenersStream>, Status> {
        Ok(self.open(METHOD_LDS, Some(LISTENER_TYPE), request))
    }

    async fn fetch_listeners(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(fetch_unimplemented())
    }
}

#[tonic::async_trait]
impl RouteDiscoveryService for XdsService {
    type StreamRoutesStream = ResponseStream;
    type DeltaRoutesStream = DeltaStream;

    async fn stream_routes(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamRoutesStream>, Status> {
        Ok(self.open(METHOD_RDS, Some(ROUTE_TYPE), request))
    }

    async fn delta_routes(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaRoutesStream>, Status> {
        Ok(self.open_delta(METHOD_DELTA_RDS, Some(ROUTE_TYPE), request))
    }

    async fn fetch_routes(&self, _request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        Err(fetch_unimplemented())
    }
}

/// Checks a request's type URL against the stream's: a per-type stream fills in an empty one
/// and refuses others; ADS requires one.
pub(crate) fn check_type_url(fixed_type: Option<&'static str>, type_url: &mut String) -> Result<(), Status> {
    match fixed_type {
        Some(fixed) if type_url.is_empty() => fixed.clone_into(type_url),
        Some(fixed) if type_url != fixed => {
            return Err(Status::invalid_argument(format!(
                "type_url {type_url} cannot be requested on a {fixed} stream"
            )));
        }
        None if type_url.is_empty() => return Err(Status::invalid_argument("type_url is required on ADS")),
        _ => {}
    }
    Ok(())
}

/// When a stream's next TTL heartbeat is due: one interval after the last publish or
/// heartbeat, while the current snapshot's extras turn heartbeats on.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    last: tokio::time::Instant,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self { last: tokio::time::Instant::now() }
    }
}

// === impl Heartbeat ===

impl Heartbeat {
    /// The deadline of the next heartbeat under `current`, if heartbeats are on.
    pub(crate) fn due(&self, current: Option<&Published>) -> Option<tokio::time::Instant> {
        current.and_then(|p| p.extras.heartbeats()).map(|interval| self.last + interval)
    }

    /// Records that a heartbeat or a publish went out now.
    pub(crate) fn sent(&mut self) {
        self.last = tokio::time::Instant::now();
    }

    /// Completes at `due`; never without one.
    pub(crate) async fn sleep(due: Option<tokio::time::Instant>) {
        match due {
            Some(due) => tokio::time::sleep_until(due).await,
            None => std::future::pending().await,
        }
    }
}

/// Everything one stream's task owns.
struct StreamTask {
    publisher: Publisher,
    registry: Arc<Registry>,
    /// Keeps the stream listed in the registry until the task ends.
    guard: StreamGuard,
    /// The only type URL of a per-type stream; `None` for ADS.
    fixed_type: Option<&'static str>,
    shutdown: CancellationToken,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

// === impl StreamTask ===

impl StreamTask {
    /// Runs the stream until the client goes away, a request is invalid, or shutdown.
    async fn run(self, mut requests: Streaming<DiscoveryRequest>) {
        let mut snapshots = self.publisher.subscribe();
        let mut state = StreamState::new();
        let mut first = true;
        let mut heartbeat = Heartbeat::default();
        tracing::debug!("stream opened");
        let end = loop {
            let current = snapshots.borrow().clone();
            let due = heartbeat.due(current.as_deref());
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    break Some(Status::unavailable("management server shutting down"));
                }
                () = Heartbeat::sleep(due) => {
                    heartbeat.sent();
                    let Some(published) = current else { continue };
                    let beats = state.on_heartbeat(&published);
                    for _ in &beats {
                        self.registry.count_heartbeat();
                    }
                    if !self.send_all(beats).await {
                        break None;
                    }
                }
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break Some(Status::unavailable("publisher stopped"));
                    }
                    let Some(published) = snapshots.borrow_and_update().clone() else { continue };
                    heartbeat.sent();
                    if !self.send_all(state.on_publish(&published)).await {
                        break None;
                    }
                }
                message = requests.message() => match message {
                    Ok(Some(request)) => {
                        let current = snapshots.borrow().clone();
                        match self.on_request(&mut state, request, first, current.as_deref()) {
                            Ok(response) => {
                                if !self.send_all(response).await {
                                    break None;
                                }
                            }
                            Err(status) => break Some(status),
                        }
                        first = false;
                    }
                    Ok(None) => {
                        tracing::debug!("client closed the stream");
                        break None;
                    }
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), message = status.message(), "stream failed");
                        break None;
                    }
                },
            }
        };
        if let Some(status) = end {
            tracing::debug!(code = ?status.code(), message = status.message(), "ending stream");
            let _ = self.tx.try_send(Err(status));
        }
        tracing::debug!("stream closed");
    }

    /// Validates and applies one request; returns the response to send, if any.
    fn on_request(
        &self,
        state: &mut StreamState,
        mut request: DiscoveryRequest,
        first: bool,
        current: Option<&Published>,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        self.registry.count_request();
        if first {
            let (id, cluster) = request.node.as_ref().map_or(("", ""), |n| (n.id.as_str(), n.cluster.as_str()));
            self.guard.set_node(id, cluster);
        }
        check_type_url(self.fixed_type, &mut request.type_url)?;
        self.guard.add_type(&request.type_url);
        let outcome = state.on_request(&request, current);
        match outcome.kind {
            RequestKind::Ack => self.registry.count_ack(),
            RequestKind::Nack => self.registry.count_nack(),
            _ => {}
        }
        tracing::debug!(
            type_url = %request.type_url,
            kind = ?outcome.kind,
            version = %request.version_info,
            nonce = %request.response_nonce,
            names = request.resource_names.len(),
            error = request.error_detail.as_ref().map(|e| e.message.as_str()),
            answered = outcome.response.is_some(),
            "request"
        );
        Ok(outcome.response)
    }

    /// Queues responses; false when the client is gone or on shutdown.
    async fn send_all(&self, responses: impl IntoIterator<Item = DiscoveryResponse>) -> bool {
        for response in responses {
            tracing::debug!(
                type_url = %response.type_url,
                version = %response.version_info,
                nonce = %response.nonce,
                resources = response.resources.len(),
                "response"
            );
            tokio::select! {
                sent = self.tx.send(Ok(response)) => {
                    if sent.is_err() {
                        return false;
                    }
                }
                () = self.shutdown.cancelled() => return false,
            }
        }
        true
    }
}
