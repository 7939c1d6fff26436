//! The xDS management server: SotW and delta, ADS and per-type services over gRPC, for any node.
//!
//! Every stream is a spawned task that feeds a bounded response queue (returned to tonic as a
//! [`ReceiverStream`]) from two inputs: the client's requests, and the publisher's latest-wins
//! `watch` channel. The protocol rules live in [`crate::sotw`] and [`crate::delta`]; the stream
//! task of [`crate::stream_task`] only moves messages, checks type URLs, and keeps the
//! [`Registry`] up to date, with the SotW side here and the delta side in [`crate::delta_server`].
//!
//! Served: `StreamAggregatedResources`, `StreamClusters`, `StreamEndpoints`, `StreamListeners`,
//! `StreamRoutes`, and their delta forms `DeltaAggregatedResources`, `DeltaClusters`,
//! `DeltaEndpoints`, `DeltaListeners`, `DeltaRoutes`. Every `Fetch*` method answers
//! `UNIMPLEMENTED`.
//!
//! Invariants: every stream keeps those of [`crate::stream_task`] (how it ends, which type URLs
//! it carries, when it gets TTL heartbeats).

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

use crate::delta_server::{DeltaProtocol, VersionCache};
use crate::extras::Extras;
use crate::publisher::{Published, Publisher, PublisherConfig};
use crate::registry::{Registry, StatsReport};
use crate::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use crate::sotw::{RequestKind, StreamState};
use crate::stream_task::{StreamProtocol, StreamTask, Verdict};

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

/// The response stream of one method: SotW or delta responses.
type ResponseStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

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
    /// Starts the task of one stream speaking `protocol` and returns its response stream.
    fn open<P: StreamProtocol>(
        &self,
        protocol: P,
        method: &'static str,
        fixed_type: Option<&'static str>,
        request: Request<Streaming<P::Request>>,
    ) -> Result<Response<ResponseStream<P::Response>>, Status> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let guard = self.server.registry.open(method);
        let span = tracing::debug_span!("stream", id = guard.id(), method);
        let task = StreamTask {
            protocol,
            publisher: self.server.publisher.clone(),
            registry: self.server.registry.clone(),
            guard,
            fixed_type,
            shutdown: self.shutdown.clone(),
            tx,
        };
        tokio::spawn(task.run(request.into_inner()).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// The delta protocol of a new stream.
    fn delta(&self) -> DeltaProtocol {
        DeltaProtocol::new(self.versions.clone())
    }
}

/// The `UNIMPLEMENTED` answer of every Fetch method.
fn fetch_unimplemented() -> Status {
    Status::unimplemented("REST-style fetch is not served by the example management server")
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.open(SotwProtocol::default(), METHOD_ADS, None, request)
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.open(self.delta(), METHOD_DELTA_ADS, None, request)
    }
}

/// Implements each per-type discovery service (its SotW and delta streams for one type URL, and
/// an `UNIMPLEMENTED` fetch) on [`XdsService`]; the generated traits differ only in names. A row:
/// `Service TYPE_URL (SotwStreamType sotw_method METHOD) (DeltaStreamType delta_method METHOD) fetch_method;`
macro_rules! per_type_services {
    ($(
        $service:ident $type_url:ident
        ($stream_ty:ident $stream:ident $sotw_method:ident)
        ($delta_ty:ident $delta:ident $delta_method:ident)
        $fetch:ident;
    )*) => {$(
        #[tonic::async_trait]
        impl $service for XdsService {
            type $stream_ty = ResponseStream<DiscoveryResponse>;
            type $delta_ty = ResponseStream<DeltaDiscoveryResponse>;

            async fn $stream(
                &self,
                request: Request<Streaming<DiscoveryRequest>>,
            ) -> Result<Response<Self::$stream_ty>, Status> {
                self.open(SotwProtocol::default(), $sotw_method, Some($type_url), request)
            }

            async fn $delta(
                &self,
                request: Request<Streaming<DeltaDiscoveryRequest>>,
            ) -> Result<Response<Self::$delta_ty>, Status> {
                self.open(self.delta(), $delta_method, Some($type_url), request)
            }

            async fn $fetch(&self, _request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
                Err(fetch_unimplemented())
            }
        }
    )*};
}

per_type_services! {
    ClusterDiscoveryService CLUSTER_TYPE (StreamClustersStream stream_clusters METHOD_CDS) (DeltaClustersStream delta_clusters METHOD_DELTA_CDS) fetch_clusters;
    EndpointDiscoveryService ENDPOINT_TYPE (StreamEndpointsStream stream_endpoints METHOD_EDS) (DeltaEndpointsStream delta_endpoints METHOD_DELTA_EDS) fetch_endpoints;
    ListenerDiscoveryService LISTENER_TYPE (StreamListenersStream stream_listeners METHOD_LDS) (DeltaListenersStream delta_listeners METHOD_DELTA_LDS) fetch_listeners;
    RouteDiscoveryService ROUTE_TYPE (StreamRoutesStream stream_routes METHOD_RDS) (DeltaRoutesStream delta_routes METHOD_DELTA_RDS) fetch_routes;
}

/// The SotW protocol of one stream: its [`StreamState`].
#[derive(Default)]
struct SotwProtocol {
    state: StreamState,
}

impl StreamProtocol for SotwProtocol {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    const STREAM: &'static str = "stream";

    fn on_request(
        &mut self,
        request: &DiscoveryRequest,
        current: Option<&Arc<Published>>,
    ) -> (Verdict, Option<DiscoveryResponse>) {
        let outcome = self.state.on_request(request, current.map(Arc::as_ref));
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
        let verdict = match outcome.kind {
            RequestKind::Ack => Verdict::Ack,
            RequestKind::Nack => Verdict::Nack,
            RequestKind::Initial | RequestKind::Update | RequestKind::Stale => Verdict::Other,
        };
        (verdict, outcome.response)
    }

    fn on_publish(&mut self, published: &Arc<Published>) -> Vec<DiscoveryResponse> {
        self.state.on_publish(published)
    }

    fn on_heartbeat(&mut self, published: &Arc<Published>) -> Vec<DiscoveryResponse> {
        self.state.on_heartbeat(published)
    }

    fn log_response(response: &DiscoveryResponse) {
        tracing::debug!(
            type_url = %response.type_url,
            version = %response.version_info,
            nonce = %response.nonce,
            resources = response.resources.len(),
            "response"
        );
    }
}
