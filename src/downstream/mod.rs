//! The downstream xDS server that Envoy proxies and gRPC clients connect to.
//!
//! One port serves the four variants of the protocol for every v3 type: state-of-the-world
//! and delta, aggregated (ADS) and per-type. v2 methods and unary fetches answer
//! `Unimplemented` with a message saying what to use instead.
//!
//! Invariants:
//! - every stream runs in its own task and reaches the cache through a latest-wins watch, so a
//!   slow or misbehaving client affects nobody else;
//! - a bad request ends only its own stream, with a gRPC status that says why;
//! - with `node_identity`, a stream is served only once its node's id (or cluster) is named
//!   by a SAN of the client certificate (see [`crate::tls::names_identity`]); the SDS `Secret`
//!   type is served only on a TLS listener unless `allow_secrets_without_tls`;
//! - a type no aggregation rule maps ends its stream with `InvalidArgument`, unless
//!   `pass_through_unmapped`, which relays it on a private key of its stream ([`passthrough`]);
//! - the server takes an already-bound listener and stops on its shutdown token, ending every
//!   stream with `Unavailable` so clients reconnect elsewhere;
//! - an idle stream holds little memory: its request decode buffer starts small
//!   ([`STREAM_BUFFER`]), and responses are written without a per-stream copy or buffer
//!   ([`body`]): HTTP/2 sends the version's shared encoded body by reference.

mod body;
mod delta;
pub mod delta_subscription;
pub mod passthrough;
mod sotw;
mod stream;
pub mod subscription;

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use crate::cache::{CacheError, ClientInfo, Interest};
use crate::config::NodeIdentity;
use crate::keyer::{KeyError, KeyRequest};
use crate::listener;
use crate::node_cache::Watcher;
use crate::telemetry::Metrics;
use crate::tls::TlsAcceptor;
use crate::xds;

/// Where the downstream server gets key state from: the relay (origin or peer behind it).
pub trait KeySource: Send + Sync + 'static {
    /// The aggregation key of a request.
    ///
    /// # Errors
    /// A [`KeyError`] when the rules cannot map the request.
    fn key(&self, request: &KeyRequest<'_>) -> Result<String, KeyError>;

    /// Registers a watcher of `key`, starting the key's source when it is new.
    ///
    /// # Errors
    /// A [`CacheError`] when the key cannot take this watcher.
    fn watch(
        &self,
        key: &str,
        type_url: &str,
        node: &Node,
        client: ClientInfo,
        interest: Interest,
    ) -> Result<Watcher, CacheError>;

    /// Asks the source of `entry` for a fresh copy of its state: a client that asked after a
    /// `do_not_cache` resource arrived waits for one. Requests while one is pending join it.
    fn refresh(&self, entry: &Arc<crate::node_cache::Entry>);

    /// Removes the private pass-through key `key` (see [`passthrough`]) once its stream no
    /// longer watches it, stopping its source at once (no idle grace: nobody else can watch
    /// it). Does nothing for any other key, or while the key still has a watcher.
    fn release(&self, key: &str);
}

/// Settings of the downstream server.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Maximum concurrent streams; further streams get `ResourceExhausted`.
    pub max_streams: usize,
    /// Responses queued per stream before the stream's task waits for the client.
    pub send_queue: usize,
    /// How long an aggregated stream waits after a change so that the other types of the
    /// same origin update arrive and go out in make-before-break order.
    pub ads_batch_window: Duration,
    /// The node field a SAN of the client certificate must name (`server.tls.node_identity`);
    /// a stream whose node it does not name is refused with `PermissionDenied`.
    pub node_identity: Option<NodeIdentity>,
    /// Serve the SDS `Secret` type on a listener without TLS (otherwise refused with
    /// `FailedPrecondition`).
    pub allow_secrets_without_tls: bool,
    /// Most connections open at once (`limits.max_connections`, fitted to the open-file
    /// limit); further ones are closed at once.
    pub max_connections: usize,
    /// The `limits:` section: every stream's requests are checked against `max_request_bytes`,
    /// `max_node_bytes`, `max_names_per_request` and `max_key_length` (see [`crate::limit`]);
    /// `max_streams_per_connection` is advertised in HTTP/2 SETTINGS, and a connection holding
    /// `min(it, max(1, max_streams / 2))` streams gets `ResourceExhausted` for more; a new
    /// connection has `handshake_timeout` for its TLS handshake and HTTP/2 preface.
    pub limits: crate::config::Limits,
    /// Relay a type that no aggregation rule maps on a private key of its own
    /// (`server.pass_through_unmapped`, see [`passthrough`]) instead of ending the stream
    /// with `InvalidArgument`.
    pub pass_through_unmapped: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            max_streams: 100_000,
            send_queue: 2,
            ads_batch_window: Duration::from_millis(30),
            node_identity: None,
            allow_secrets_without_tls: false,
            max_connections: 50_000,
            limits: crate::config::Limits::default(),
            pass_through_unmapped: false,
        }
    }
}

/// Shared state of every stream.
pub(crate) struct Shared {
    pub(crate) source: Arc<dyn KeySource>,
    pub(crate) metrics: Metrics,
    pub(crate) settings: ServerSettings,
    pub(crate) streams: Arc<Semaphore>,
    /// Fires when the server stops (the node shuts down, or the server failed): every stream
    /// then ends.
    pub(crate) shutdown: CancellationToken,
    /// The server's tasks: connections and streams. [`serve`] returns once they all ended.
    pub(crate) tasks: TaskTracker,
    /// Whether the listener accepts TLS connections only.
    pub(crate) tls: bool,
}

/// Serves xDS on `listener` until `shutdown` fires; with `tls`, every connection is a TLS
/// connection accepted by it. Connections pass the listener's gates ([`crate::listener`]:
/// `max_connections`, `handshake_timeout`) and each holds at most
/// [`crate::listener::streams_per_connection`] streams. Every connection and stream runs in a
/// task of the server's own: when the server stops (or fails) they are cancelled, and this
/// returns only once they all ended, so a caller running it in a tracked task awaits them.
///
/// # Errors
/// Fails when the HTTP/2 server itself fails (not on any client's error).
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn KeySource>,
    metrics: Metrics,
    settings: ServerSettings,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // Connections, streams and the accept loop also stop when the server fails.
    let stopping = shutdown.child_token();
    let tasks = TaskTracker::new();
    let shared = Arc::new(Shared {
        source,
        metrics,
        streams: Arc::new(Semaphore::new(settings.max_streams)),
        settings,
        shutdown: stopping.clone(),
        tasks: tasks.clone(),
        tls: tls.is_some(),
    });
    let mut router = axum::Router::new()
        .route_service(
            xds::ADS_SOTW_PATH,
            Method::<DiscoveryRequest> { shared: shared.clone(), default_type: None, protocol: PhantomData },
        )
        .route_service(
            xds::ADS_DELTA_PATH,
            Method::<DeltaDiscoveryRequest> { shared: shared.clone(), default_type: None, protocol: PhantomData },
        );
    for (path, type_url) in xds::SOTW_METHODS {
        router = router.route_service(
            path,
            Method::<DiscoveryRequest> { shared: shared.clone(), default_type: Some(type_url), protocol: PhantomData },
        );
    }
    for (path, type_url) in xds::DELTA_METHODS {
        router = router.route_service(
            path,
            Method::<DeltaDiscoveryRequest> {
                shared: shared.clone(),
                default_type: Some(type_url),
                protocol: PhantomData,
            },
        );
    }
    for path in xds::FETCH_METHODS {
        router = router
            .route_service(path, Unimplemented("unary (REST) xDS fetch is not supported; use a streaming method"));
    }
    router = router.fallback_service(Unimplemented(
        "unknown method; xDS v2 is not supported, use the v3 API (envoy.service.*.v3)",
    ));
    let per_connection = listener::StreamCapLayer::for_clients(
        shared.settings.limits.max_streams_per_connection,
        shared.settings.max_streams,
        shared.metrics.clone(),
    );
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(u32::try_from(shared.settings.limits.max_streams_per_connection).unwrap_or(u32::MAX))
        .tcp_nodelay(true)
        .layer(per_connection)
        .add_routes(tonic::service::Routes::from(router));
    let gates = listener::ListenerSettings {
        name: "xds",
        max_connections: shared.settings.max_connections,
        handshake_timeout: *shared.settings.limits.handshake_timeout,
        protocol: listener::Protocol::Http2,
    };
    let (metrics, stopped) = (shared.metrics.clone(), shutdown.clone().cancelled_owned());
    let served = match tls {
        None => {
            let incoming = listener::accept_plain(listener, gates, metrics, &tasks, stopping.clone());
            server.serve_with_incoming_shutdown(incoming, stopped).await
        }
        Some(acceptor) => {
            let incoming = listener::accept_tls(listener, gates, acceptor, metrics, &tasks, stopping.clone());
            server.serve_with_incoming_shutdown(incoming, stopped).await
        }
    };
    stopping.cancel();
    tasks.close();
    tasks.wait().await;
    served
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A streaming xDS method: state-of-the-world for `DiscoveryRequest`, delta for
/// `DeltaDiscoveryRequest`; `default_type` is the per-type service's type (None for ADS).
struct Method<R> {
    shared: Arc<Shared>,
    default_type: Option<&'static str>,
    protocol: PhantomData<fn() -> R>,
}

impl<R> Clone for Method<R> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone(), default_type: self.default_type, protocol: PhantomData }
    }
}

/// Which protocol serves a request type.
trait ServedBy: prost::Message + Default + Send + 'static {
    type Protocol: stream::Protocol<Request = Self> + Default;
}

impl ServedBy for DiscoveryRequest {
    type Protocol = sotw::Sotw;
}

impl ServedBy for DeltaDiscoveryRequest {
    type Protocol = delta::Delta;
}

impl<R: ServedBy> tower::Service<http::Request<axum::body::Body>> for Method<R> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<axum::body::Body>) -> Self::Future {
        let shared = self.shared.clone();
        let default_type = self.default_type;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let decoder = tonic_prost::ProstCodec::<crate::wire::EncodedResponse, R>::raw_decoder(stream_buffers());
            let requests =
                tonic::Streaming::new_request(decoder, body, None, Some(shared.settings.limits.max_request_bytes));
            let request = tonic::Request::from_http(http::Request::from_parts(parts, requests));
            let response = match stream::open(shared, default_type, request, R::Protocol::default()) {
                Ok(response) => response,
                Err(status) => return Ok(status.into_http()),
            };
            let (metadata, responses, _) = response.into_parts();
            let mut http = http::Response::new(tonic::body::Body::new(body::ResponseBody::new(responses)));
            *http.headers_mut() = metadata.into_headers();
            http.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            Ok(http)
        })
    }
}

/// Initial size of a stream's request decode buffer. tonic's default (8 KiB) is allocated
/// for every stream up front; requests are small and grow the buffer on demand, so 1 KiB
/// keeps idle streams cheap.
pub const STREAM_BUFFER: usize = 1024;

fn stream_buffers() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(STREAM_BUFFER, 32 * 1024)
}

/// A method the relay does not serve: answers `Unimplemented` with a message.
#[derive(Clone, Copy)]
struct Unimplemented(&'static str);

impl tower::Service<http::Request<axum::body::Body>> for Unimplemented {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<axum::body::Body>) -> Self::Future {
        tracing::warn!(path = %request.uri().path(), "request for a method the relay does not serve");
        std::future::ready(Ok(Status::unimplemented(format!("{}: {}", request.uri().path(), self.0)).into_http()))
    }
}
