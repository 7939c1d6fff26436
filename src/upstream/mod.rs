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
//! - one task per key, ended by the key's eviction or by shutdown (its cancellation token);
//! - each key's stream holds a place on one of the address's pooled connections ([`pool`]):
//!   at most `origin_server.max_streams_per_connection` streams and never more than the
//!   origin's `SETTINGS_MAX_CONCURRENT_STREAMS` per connection; a lost connection affects only
//!   the keys on it.

use std::sync::Arc;
use std::time::Duration;

mod connection;
mod delta;
mod pool;
mod sotw;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Endpoint;

use crate::backoff::{Backoff, jitter};
use crate::cache::Interest;
use crate::config::OriginServer;
use crate::node_cache::Entry;
use crate::source::{Handoff, HandoverSignal, Liveness};
use crate::telemetry::Metrics;
use crate::tls::ClientTls;
use pool::{AddressPool, Lease};

/// Metadata key under which `request_node_metadata` is sent upstream (as xds-relay does).
pub const NODE_METADATA_KEY: &str = "xdsrelay_node_metadata";

/// gRPC code sent in the relay's own NACKs (INVALID_ARGUMENT).
const NACK_CODE: i32 = 3;

/// The shortest time between two origin streams a key opens to refresh its state (for
/// followers' fresh watches or an admin clear). A refresh asked for when the previous one is
/// at least this old (or there was none) replaces the stream at once, so a follower switching
/// to a new owner is not held back; refreshes asked for sooner share a single replacement
/// opened when the interval has passed, so no follower can make the node open origin streams
/// back to back.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(2);

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

/// The origin management server(s): a pool of HTTP/2 connections per address (see
/// [`pool`]), shared by every key's stream.
#[derive(Clone)]
pub struct Origin {
    inner: Arc<OriginInner>,
}

struct OriginInner {
    addresses: Vec<Arc<AddressPool>>,
    settings: OriginServer,
    tracker: TaskTracker,
    handovers: HandoverSignal,
}

impl Origin {
    /// Prepares a connection pool for every configured address (nothing connects until first
    /// use); the pools report into `metrics` (`origin_connections{address}` and friends).
    /// With `tls` (built from `origin_server.tls`), every address is dialled with TLS.
    /// Subscriptions run under `tracker`; each handoff's end fires `handovers`.
    ///
    /// # Errors
    /// [`UpstreamError::Address`] when an address is not usable in a URI.
    pub fn new(
        settings: &OriginServer,
        tls: Option<ClientTls>,
        metrics: &Metrics,
        tracker: TaskTracker,
        handovers: HandoverSignal,
    ) -> Result<Self, UpstreamError> {
        let mut addresses = Vec::new();
        for address in std::iter::once(&settings.address).chain(&settings.fallback_addresses) {
            let host_port = address.host_port();
            let bad_address = |source| UpstreamError::Address { address: host_port.clone(), source };
            // The connector does the TLS, so the endpoint URI stays http://; requests carry
            // the https scheme.
            let mut endpoint = Endpoint::from_shared(format!("http://{host_port}")).map_err(bad_address)?;
            if tls.is_some() {
                let origin = Endpoint::from_shared(format!("https://{host_port}")).map_err(bad_address)?;
                endpoint = endpoint.origin(origin.uri().clone());
            }
            let endpoint = endpoint
                .connect_timeout(*settings.connect_timeout)
                .http2_keep_alive_interval(*settings.keep_alive_time)
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
                .tcp_nodelay(true);
            let tls = tls.as_ref().map(ClientTls::connector);
            let gauges = metrics.origin_connections(&host_port);
            let pool = AddressPool::new(host_port, endpoint, tls, settings.max_streams_per_connection, gauges);
            addresses.push(Arc::new(pool));
        }
        Ok(Self { inner: Arc::new(OriginInner { addresses, settings: settings.clone(), tracker, handovers }) })
    }

    /// Starts the subscription of `entry`; it runs until `cancel` fires. `handoff` is the
    /// key's previous source: it is dropped (stopping it) once this subscription has applied
    /// its first response, or when this one stops (make-before-break).
    pub fn spawn(&self, entry: Arc<Entry>, cancel: CancellationToken, handoff: Option<Box<dyn Send>>) {
        let inner = self.inner.clone();
        self.inner.tracker.spawn(async move {
            let mut handoff = Handoff::new(handoff, &entry.metrics.sources, &inner.handovers);
            run_subscription(inner, &entry, cancel, &mut handoff).await;
            tracing::debug!(key = %entry.key, type_url = %entry.type_url, "upstream subscription stopped");
        });
    }
}

/// How one upstream stream ended.
enum StreamEnd {
    /// Shutdown or eviction.
    Cancelled,
    /// Rotated by `stream_timeout`: reconnect at once.
    Rotated,
    /// A follower or an admin clear needs a state fetched after it asked: reconnect at once
    /// (at least [`MIN_REFRESH_INTERVAL`] after the previous refresh).
    Refresh,
    /// The primary is reachable again: reconnect to it at once.
    FailBack,
    /// The stream ended or failed; `answered` tells whether the origin had answered on it.
    Closed { answered: bool, error: String },
}

async fn run_subscription(
    origin: Arc<OriginInner>,
    entry: &Arc<Entry>,
    cancel: CancellationToken,
    handoff: &mut Handoff,
) {
    let settings = &origin.settings;
    let mut backoff = Backoff::new(*settings.backoff.initial_interval, *settings.backoff.max_interval);
    let mut interest = entry.interest();
    let mut liveness = Liveness::new();
    let mut index = 0;
    // The key's place on a pooled connection: kept while the key rotates or refreshes its
    // stream, given up when the stream fails or the address changes (the key then comes back
    // after its backoff wherever there is room).
    let mut lease: Option<Lease> = None;
    loop {
        let end = run_stream(&origin, entry, index, &mut interest, &cancel, handoff, &mut liveness, &mut lease).await;
        if !matches!(end, StreamEnd::Rotated | StreamEnd::Refresh) {
            lease = None;
        }
        // Cancelled: replaced or evicted, the successor owns the mark. Rotated, Refresh and
        // FailBack reconnect at once: the mark stays until the next stream fails.
        if matches!(end, StreamEnd::Closed { .. }) {
            liveness.down(&entry.source, &entry.metrics.upstream_connected);
        }
        let delay = match end {
            StreamEnd::Cancelled => return,
            StreamEnd::Rotated => {
                tracing::debug!(key = %entry.key, type_url = %entry.type_url, "upstream stream rotated by stream_timeout");
                backoff.reset();
                continue;
            }
            StreamEnd::Refresh => {
                entry.source.freshness.note_refresh();
                tracing::debug!(key = %entry.key, type_url = %entry.type_url, "upstream stream replaced: a follower needs a state fetched after it asked");
                backoff.reset();
                continue;
            }
            StreamEnd::FailBack => {
                tracing::info!(key = %entry.key, type_url = %entry.type_url, address = %origin.addresses[0].host_port, "origin primary reachable again: switching back");
                entry.metrics.upstream_failovers.inc();
                index = 0;
                backoff.reset();
                continue;
            }
            StreamEnd::Closed { answered, error } => {
                // The origin's status message is outside text: kept and logged cut to 1 KiB.
                let error = crate::telemetry::truncate_message(&error).into_owned();
                entry.metrics.upstream_failures.inc();
                entry.source.update_status(|s| s.last_error = Some(error.clone()));
                if answered {
                    backoff.reset();
                    tracing::info!(key = %entry.key, type_url = %entry.type_url, address = %origin.addresses[index].host_port, error = %error, "upstream stream ended; reconnecting");
                } else {
                    tracing::warn!(key = %entry.key, type_url = %entry.type_url, address = %origin.addresses[index].host_port, error = %error, "upstream stream failed");
                    if origin.addresses.len() > 1 {
                        index = (index + 1) % origin.addresses.len();
                        entry.metrics.upstream_failovers.inc();
                        tracing::info!(key = %entry.key, type_url = %entry.type_url, address = %origin.addresses[index].host_port, "failing over to the next origin address");
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

#[allow(clippy::too_many_arguments)]
async fn run_stream(
    origin: &OriginInner,
    entry: &Arc<Entry>,
    index: usize,
    interest: &mut watch::Receiver<Interest>,
    cancel: &CancellationToken,
    handoff: &mut Handoff,
    liveness: &mut Liveness,
    lease: &mut Option<Lease>,
) -> StreamEnd {
    if origin.settings.api_type.is_delta() {
        run_exchange::<delta::DeltaExchange>(origin, entry, index, interest, cancel, handoff, liveness, lease).await
    } else {
        run_exchange::<sotw::SotwExchange>(origin, entry, index, interest, cancel, handoff, liveness, lease).await
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
    /// The stream's first request, asking for `interest`; with `refresh`, the request must
    /// make the origin answer even when the relay's cache is already current.
    fn open(entry: &Entry, node: &Node, interest: &Interest, refresh: bool) -> (Self, Self::Request);
    /// The request announcing a changed interest, if one is needed.
    fn change(&mut self, entry: &Entry, interest: &Interest) -> Option<Self::Request>;
    /// Applies a response to the cache; returns the ACK, or the relay's NACK.
    fn answer(&mut self, entry: &Entry, response: Self::Response) -> Self::Request;
    /// Whether `reply` (from [`Exchange::answer`]) accepted the response.
    fn accepted(reply: &Self::Request) -> bool;
}

/// Starts the trace of a version the origin delivered for `entry`'s key.
fn trace_version(entry: &Entry) -> impl FnOnce(&crate::cache::KeyState) -> crate::cache::Attachment + '_ {
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
    let message = crate::telemetry::truncate_message(&rejection.to_string()).into_owned();
    let version = crate::telemetry::truncate_message(version);
    tracing::warn!(
        key = %entry.key, type_url = %entry.type_url, version = %version, error = %message,
        "origin response rejected; cache unchanged"
    );
    RpcStatus { code: NACK_CODE, message, details: Vec::new() }
}

#[allow(clippy::too_many_arguments)]
async fn run_exchange<X: Exchange>(
    origin: &OriginInner,
    entry: &Arc<Entry>,
    index: usize,
    interest: &mut watch::Receiver<Interest>,
    cancel: &CancellationToken,
    handoff: &mut Handoff,
    liveness: &mut Liveness,
    lease: &mut Option<Lease>,
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
    if lease.as_ref().is_some_and(|kept| !kept.is_usable()) {
        *lease = None;
    }
    let lease = match lease {
        Some(kept) => kept,
        None => {
            let acquired = tokio::select! {
                () = cancel.cancelled() => return StreamEnd::Cancelled,
                acquired = address.acquire(pool::placement_deadline(*settings.connect_timeout)) => acquired,
            };
            match acquired {
                Ok(placed) => lease.insert(placed),
                Err(error) => return StreamEnd::Closed { answered: false, error },
            }
        }
    };
    let node = upstream_node(entry, settings);
    let wanted = interest.borrow().clone();
    // The epoch is taken before the first request goes out: a follower asking from now on
    // waits for a later stream (see `cache::freshness`).
    let mut epochs = entry.source.freshness.subscribe();
    let epoch = entry.source.freshness.stream_opened();
    let refresh = epochs.borrow_and_update().wanted >= epoch;
    let (mut exchange, first) = X::open(entry, &node, &wanted, refresh);
    let (tx, rx) = mpsc::channel::<X::Request>(8);
    if tx.send(first).await.is_err() {
        return StreamEnd::Cancelled;
    }
    let path = X::path(&entry.type_url, settings.api_type.is_aggregated());
    let open = async {
        let mut grpc = tonic::client::Grpc::new(lease.channel())
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
        opened = timeout(*settings.connect_timeout + Duration::from_secs(1), open) => match opened {
            Ok(Ok(inbound)) => inbound,
            Ok(Err(error)) => return StreamEnd::Closed { answered: false, error },
            Err(_) => {
                lease.retire("a stream was not accepted in time");
                return StreamEnd::Closed { answered: false, error: format!("origin {} did not accept the stream in time", address.host_port) };
            }
        },
    };
    tracing::info!(key = %entry.key, type_url = %entry.type_url, address = %address.host_port, connection = lease.connection(), path, protocol = X::NAME, "upstream stream opened");
    entry.source.update_status(|s| s.address = address.host_port.clone());

    let rotate_at = settings
        .stream_timeout
        .map(|t| Instant::now() + *t + jitter(*settings.stream_timeout_jitter.unwrap_or_default()));
    let mut failback_at = (index > 0).then(|| Instant::now() + *settings.failback_interval);
    let refresh_earliest =
        entry.source.freshness.last_refresh().map_or_else(Instant::now, |at| at + MIN_REFRESH_INTERVAL);
    let mut refresh_at: Option<Instant> = None;
    let mut answered = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return StreamEnd::Cancelled,
            () = sleep_until(rotate_at.unwrap_or_else(far_future)), if rotate_at.is_some() => return StreamEnd::Rotated,
            changed = epochs.changed() => {
                if changed.is_err() {
                    return StreamEnd::Cancelled;
                }
                if epochs.borrow_and_update().needs_new_stream() {
                    if Instant::now() >= refresh_earliest {
                        return StreamEnd::Refresh;
                    }
                    // Every fresh watch until then shares the one replacement (same epoch).
                    refresh_at = Some(refresh_earliest);
                }
            }
            () = sleep_until(refresh_at.unwrap_or_else(far_future)), if refresh_at.is_some() => return StreamEnd::Refresh,
            () = sleep_until(failback_at.unwrap_or_else(far_future)), if failback_at.is_some() => {
                if primary_reachable(origin).await {
                    return StreamEnd::FailBack;
                }
                failback_at = Some(Instant::now() + *settings.failback_interval);
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
                    tracing::debug!(key = %entry.key, type_url = %entry.type_url, names = wanted.names.len(), wildcard = wanted.wildcard, "upstream subscription changed");
                    if tx.send(request).await.is_err() {
                        return StreamEnd::Closed { answered, error: "request channel closed".into() };
                    }
                }
            }
            message = inbound.message() => match message {
                Ok(Some(response)) => {
                    answered = true;
                    liveness.up(&entry.source, &entry.metrics.upstream_connected);
                    entry.metrics.upstream_responses.inc();
                    entry.source.update_status(|s| s.responses += 1);
                    let reply = exchange.answer(entry, response);
                    if X::accepted(&reply) {
                        entry.source.freshness.delivered(epoch);
                    }
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
        timeout(*origin.settings.connect_timeout, tokio::net::TcpStream::connect(primary.as_str())).await,
        Ok(Ok(_))
    )
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::cache::ClientInfo;
    use crate::config::CacheConfig;
    use crate::node_cache::Cache;
    use crate::telemetry::Metrics;
    use crate::xds;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryResponse, Resource as DeltaResource,
    };
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message as _;

    /// Sets its flag when dropped (stands for a running source's guard).
    struct Stopped(Arc<AtomicBool>);

    impl Drop for Stopped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn previous() -> (Option<Box<dyn Send>>, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (Some(Box::new(Stopped(flag.clone()))), flag)
    }

    #[test]
    fn a_released_handoff_stops_the_previous_source_and_counts_a_completion() {
        let metrics = Metrics::new();
        let (old, stopped) = previous();
        let mut handoff = Handoff::new(old, metrics.sources(), &HandoverSignal::new());
        assert_eq!(metrics.sources().handoffs_pending.get(), 1);
        assert!(!stopped.load(Ordering::SeqCst), "make before break: the old source runs on");
        handoff.release();
        handoff.release();
        assert!(stopped.load(Ordering::SeqCst));
        assert_eq!(metrics.sources().handoffs_pending.get(), 0);
        drop(handoff);
        let text = metrics.render();
        assert!(text.contains("xds_relay_handoffs_total{result=\"completed\"} 1"), "{text}");
        assert!(text.contains("xds_relay_handoffs_total{result=\"abandoned\"} 0"), "{text}");
        assert!(text.contains("xds_relay_handoff_duration_seconds_count 1"), "{text}");
    }

    #[test]
    fn a_dropped_handoff_counts_as_abandoned_and_a_first_source_counts_nothing() {
        let metrics = Metrics::new();
        let (old, stopped) = previous();
        drop(Handoff::new(old, metrics.sources(), &HandoverSignal::new()));
        assert!(stopped.load(Ordering::SeqCst));
        let mut first = Handoff::new(None, metrics.sources(), &HandoverSignal::new());
        first.release();
        drop(first);
        assert_eq!(metrics.sources().handoffs_pending.get(), 0);
        let text = metrics.render();
        assert!(text.contains("xds_relay_handoffs_total{result=\"abandoned\"} 1"), "{text}");
        assert!(text.contains("xds_relay_handoffs_total{result=\"completed\"} 0"), "{text}");
    }

    fn cluster(name: &str) -> Any {
        Any {
            type_url: xds::CLUSTER.into(),
            value: Cluster { name: name.into(), ..Default::default() }.encode_to_vec(),
        }
    }

    fn cds(version: &str, resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse {
            type_url: xds::CLUSTER.into(),
            version_info: version.into(),
            nonce: format!("n-{version}"),
            resources,
            ..Default::default()
        }
    }

    /// Unusable origin responses, each with a word its NACK message must contain.
    fn unusable() -> Vec<(&'static str, Vec<Any>, &'static str)> {
        let endpoints = ClusterLoadAssignment { cluster_name: "a".into(), ..Default::default() };
        vec![
            ("empty names", vec![cluster(""), cluster("")], "has no name"),
            ("duplicate names", vec![cluster("a"), cluster("b"), cluster("a")], "appears more than once"),
            (
                "another type",
                vec![cluster("a"), Any { type_url: xds::ENDPOINT.into(), value: endpoints.encode_to_vec() }],
                "has type",
            ),
            (
                "undecodable",
                vec![cluster("a"), Any { type_url: xds::CLUSTER.into(), value: vec![0xff, 0xff, 0xff] }],
                "does not decode",
            ),
        ]
    }

    fn watched(key: &str) -> (Cache, crate::node_cache::Watcher) {
        let cache = Cache::new(
            CacheConfig { ttl: Duration::from_secs(60).into(), max_entries: 0, persist_dir: None },
            Metrics::new(),
        );
        let client = ClientInfo { node_id: "n".into(), node_cluster: "c".into(), peer: String::new(), follower: None };
        let watcher =
            cache.watch(key, xds::CLUSTER, &Node::default(), client, Interest::wildcard(), |_| {}).expect("watch");
        (cache, watcher)
    }

    /// Each kind of unusable state-of-the-world response is NACKed to the origin with a
    /// message (at the version last accepted), and the cache keeps the previous state.
    #[test]
    fn unusable_sotw_responses_are_nacked_and_the_cache_keeps_its_state() {
        let (_cache, watcher) = watched("k");
        let entry = watcher.entry().clone();
        let (mut exchange, _) = sotw::SotwExchange::open(&entry, &Node::default(), &Interest::wildcard(), false);
        let ack = exchange.answer(&entry, cds("v1", vec![cluster("a"), cluster("b")]));
        assert!(sotw::SotwExchange::accepted(&ack) && ack.version_info == "v1");
        let before = entry.state();
        for (rejected, (case, resources, word)) in (1..).zip(unusable()) {
            let nack = exchange.answer(&entry, cds("v2", resources));
            let error = nack.error_detail.as_ref().unwrap_or_else(|| panic!("{case}: accepted"));
            assert_eq!(error.code, NACK_CODE, "{case}");
            assert!(error.message.contains(word), "{case}: {}", error.message);
            assert_eq!(nack.version_info, "v1", "{case}: the NACK names the version kept");
            assert_eq!(nack.response_nonce, "n-v2", "{case}");
            assert!(Arc::ptr_eq(&entry.state(), &before), "{case}: the cache keeps the previous state");
            assert_eq!(entry.metrics.upstream_rejected.get(), rejected, "{case}");
        }
        let ack = exchange.answer(&entry, cds("v3", vec![cluster("c")]));
        assert!(sotw::SotwExchange::accepted(&ack) && entry.state().version_info == "v3", "usable again");
    }

    /// The same for a delta origin.
    #[test]
    fn unusable_delta_responses_are_nacked_and_the_cache_keeps_its_state() {
        let delta_response = |version: &str, resources: Vec<Any>| DeltaDiscoveryResponse {
            type_url: xds::CLUSTER.into(),
            system_version_info: version.into(),
            nonce: format!("n-{version}"),
            resources: resources
                .into_iter()
                .map(|any| DeltaResource {
                    name: crate::wire::resource_name(&any).unwrap_or_default(),
                    version: version.into(),
                    resource: Some(any),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let (_cache, watcher) = watched("k");
        let entry = watcher.entry().clone();
        let (mut exchange, _) = delta::DeltaExchange::open(&entry, &Node::default(), &Interest::wildcard(), false);
        let ack = exchange.answer(&entry, delta_response("v1", vec![cluster("a"), cluster("b")]));
        assert!(delta::DeltaExchange::accepted(&ack));
        let before = entry.state();
        for (case, resources, word) in unusable() {
            let nack = exchange.answer(&entry, delta_response("v2", resources));
            let error = nack.error_detail.as_ref().unwrap_or_else(|| panic!("{case}: accepted"));
            assert_eq!(error.code, NACK_CODE, "{case}");
            assert!(error.message.contains(word), "{case}: {}", error.message);
            assert_eq!(nack.response_nonce, "n-v2", "{case}");
            assert!(Arc::ptr_eq(&entry.state(), &before), "{case}: the cache keeps the previous state");
        }
    }

    /// A rejection naming a huge resource name is NACKed with the message cut to 1 KiB.
    #[test]
    fn a_rejection_message_is_truncated() {
        let (_cache, watcher) = watched("k");
        let entry = watcher.entry().clone();
        let (mut exchange, _) = sotw::SotwExchange::open(&entry, &Node::default(), &Interest::wildcard(), false);
        let huge = "n".repeat(100 * 1024);
        let nack = exchange.answer(&entry, cds("v1", vec![cluster(&huge), cluster(&huge)]));
        let message = nack.error_detail.expect("NACK").message;
        assert!(message.len() < 1100, "{}", message.len());
        assert!(message.ends_with("bytes)") && message.contains("truncated"), "{}", &message[message.len() - 40..]);
    }
}
