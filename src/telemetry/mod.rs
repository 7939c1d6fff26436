//! Logs and metrics.
//!
//! Logging goes through `tracing` with a level that can be changed at run time (the admin
//! API's `/log_level`) through a reload handle. Metrics are Prometheus counters, gauges and
//! histograms kept in one registry and rendered in the text exposition format at `/metrics`.
//! Every name starts with `xds_relay_`; counters end in `_total`, durations are in seconds and
//! sizes in bytes. The README's "Metrics" section lists them all with their labels.
//!
//! Invariants: per-key metric handles, and the per-type handles of the key's type, are
//! resolved once per cache entry ([`KeyMetrics`]) so the fan-out path never formats a label;
//! the label sets of an evicted key are removed. At most `telemetry.max_key_series` keys get
//! their own `key` label; further keys share `key="_other"` ([`OTHER_KEY`]) and
//! `metric_keys_aggregated` counts them, so the registry's size is bounded by that setting
//! whatever the number of keys. The `type` label only takes the short names of the known v3
//! types and `other` ([`crate::xds::type_label`]), whatever type URLs clients or origins
//! send. Text that outsiders send and the relay keeps (NACK messages, origin errors) is cut
//! to [`MAX_MESSAGE_BYTES`] by [`truncate_message`]. Gauges that describe every
//! key at once (`keys`, `keys_without_source`) are computed when `/metrics` is scraped, from
//! a snapshot of the cache ([`Metrics::set_key_sources`]).

pub mod traces;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, reload};

use xds_relay_cluster::GossipStats;

use crate::config::LogLevel;

/// Label set naming one aggregation key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// The aggregation key.
    pub key: String,
}

/// Label set naming a resource type: the short name of a known v3 type (e.g. `cds`) or
/// `other`. The value is `'static` so that only [`crate::xds::type_label`]'s fixed set can be
/// a label, never a type URL taken from a request or response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// Short type name, or `other`.
    pub r#type: &'static str,
}

/// Labels of the protocol-duty counters: the short type name and what the response carried or
/// why it was held (`heartbeat`, `resource_errors`, `do_not_cache_wait`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExtraLabels {
    /// Short type name, or `other`.
    pub r#type: &'static str,
    /// What the counter counts.
    pub extra: &'static str,
}

impl TypeLabels {
    /// The labels of `type_url` (`other` for a type the relay does not know).
    pub fn of(type_url: &str) -> Self {
        Self { r#type: crate::xds::type_label(type_url) }
    }
}

/// The `key` label shared by the keys beyond `telemetry.max_key_series`.
pub const OTHER_KEY: &str = "_other";

/// Longest text the relay keeps from a NACK or an origin error, in bytes (before the
/// truncation marker).
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `message` cut to [`MAX_MESSAGE_BYTES`] on a character boundary, with a marker saying how
/// long it was (`… (truncated, N bytes)`); borrowed unchanged when it is short enough. Used
/// wherever a client's NACK or an origin's error is stored, logged or traced, so no peer can
/// make the relay hold or print megabytes of text.
pub fn truncate_message(message: &str) -> Cow<'_, str> {
    if message.len() <= MAX_MESSAGE_BYTES {
        return Cow::Borrowed(message);
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}… (truncated, {} bytes)", &message[..end], message.len()))
}

/// Label set naming the reason of an event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why it happened, a short snake_case word.
    pub reason: String,
}

/// Label set of the `keys` gauge: where a key's state comes from and whether it flows.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `origin` (this node's stream to the management server) or `peer` (the owner node).
    pub source: &'static str,
    /// `true` while that source is answered, else `false`.
    pub connected: &'static str,
}

/// Label set of cluster members by gossiped state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `joining`, `ready`, `draining`, or `dead` (the failure detector's verdict).
    pub state: &'static str,
}

/// Label set of gossip datagram counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `in` (received, opened and handed to gossip) or `out` (sealed and sent).
    pub direction: &'static str,
}

/// Label set of gossip rejections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GossipReasonLabels {
    /// Why a datagram was dropped: `malformed`, `plaintext`, `oversize`, `no_key`, `bad_seal`,
    /// `stale`, `replay` or `loopback`.
    pub reason: &'static str,
}

/// Label set of handoff outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `completed` or `abandoned`.
    pub result: &'static str,
}

/// Label set of peer stream errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerErrorLabels {
    /// `follower` (this node follows a key at its owner) or `owner` (this node serves one).
    pub side: &'static str,
    /// Why the stream failed, a short snake_case word.
    pub reason: &'static str,
}

/// Label set of TLS handshake failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `xds`, `peer` or `admin`.
    pub listener: &'static str,
}

/// Label set of limit refusals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The limit's field in the `limits:` section, e.g. `max_active_keys`.
    pub limit: &'static str,
}

/// Label set of connections closed by the listener before they were served.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionRefusalLabels {
    /// `xds`, `peer` or `admin`.
    pub listener: &'static str,
    /// `max_connections`, `handshake_timeout` or `not_http2`.
    pub reason: &'static str,
}

/// Label set of TLS reload failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsConfigLabels {
    /// `xds`, `peer`, `admin`, `origin` or `peer_client`.
    pub config: &'static str,
}

/// Label set of the origin connection pool's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginAddressLabels {
    /// The origin address, `host:port`.
    pub address: String,
}

/// Gauges of the connections to one origin address, resolved once.
#[derive(Clone, Debug, Default)]
pub struct OriginConnectionGauges {
    /// HTTP/2 connections open (or opening) to the address.
    pub connections: Gauge,
    /// Origin streams placed on those connections.
    pub streams: Gauge,
    /// Streams on the address's fullest connection.
    pub connection_streams_max: Gauge,
}

/// Which end of a peer stream saw an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerSide {
    /// This node follows a key at its owner.
    Follower,
    /// This node serves a key to a follower.
    Owner,
}

impl PeerSide {
    fn label(self) -> &'static str {
        match self {
            Self::Follower => "follower",
            Self::Owner => "owner",
        }
    }
}

/// Member states reported by `cluster_members`, in label order.
pub const MEMBER_STATES: [&str; 4] = ["joining", "ready", "draining", "dead"];

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

/// Buckets of `push_latency_seconds`: 0.5 ms to about 16 s.
fn push_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Buckets of `handoff_duration_seconds`: 10 ms to about 80 s.
fn handoff_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

/// How many keys this node holds, by source, counted at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeySourceCounts {
    /// Keys taken from the origin whose stream is answered.
    pub origin_connected: usize,
    /// Keys taken from the origin whose stream is not answered.
    pub origin_disconnected: usize,
    /// Keys followed at their owner whose peer stream is answered.
    pub peer_connected: usize,
    /// Keys followed at their owner whose peer stream is not answered.
    pub peer_disconnected: usize,
    /// Active keys (with a local client or a follower) whose source is not answered.
    pub without_source: usize,
}

/// Every metric the relay exports. Cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Downstream streams open now.
    pub downstream_streams: Gauge,
    /// Downstream streams accepted since start.
    pub downstream_streams_total: Counter,
    /// Pass-through streams open now: (stream, type)s that no rule maps, each on a private
    /// key with its own origin stream (`server.pass_through_unmapped`).
    pub passthrough_streams: Gauge,
    /// Pass-through streams opened since start.
    pub passthrough_streams_total: Counter,
    /// Downstream requests that could not be mapped to a key, by type.
    pub mapping_errors: Family<TypeLabels, Counter>,
    /// Downstream requests rejected for another reason (bad type URL, v2, limits).
    pub request_errors: Family<ReasonLabels, Counter>,
    /// SotW requests ignored because their nonce was stale.
    pub stale_requests: Counter,
    /// Downstream responses that carried TTL heartbeats or resource errors, and pushes held
    /// until a fresh copy of `do_not_cache` resources arrives, by type and `extra`.
    pub protocol_extras: Family<ExtraLabels, Counter>,
    /// Cache entries now.
    pub cache_entries: Gauge,
    /// Tasks alive in the tokio runtime; read when rendered (a leak of tasks shows as growth).
    runtime_tasks: Gauge,
    /// Cache entries evicted, by reason (`ttl`, `max_entries`, `cleared`, `closed`).
    pub cache_evictions: Family<ReasonLabels, Counter>,
    /// Key states written to `cache.persist_dir` (each a file renamed into place).
    pub persist_writes: Counter,
    /// Writes or removals in `cache.persist_dir` that failed (each also logged).
    pub persist_write_errors: Counter,
    /// Records read from `cache.persist_dir` at start that seeded a cache entry.
    pub persist_records_loaded: Counter,
    /// Records of `cache.persist_dir` skipped at start, by reason (`corrupt`, `checksum`,
    /// `too_large`, `decode`, `version`, `rejected`, `full`).
    pub persist_records_skipped: Family<ReasonLabels, Counter>,
    /// Keys served from their last-known-good state on disk that no live source has
    /// confirmed yet; set before a scrape.
    pub persist_stale_keys: Gauge,
    /// Mutating admin calls refused, by reason (`cross_origin`, `cross_site`,
    /// `missing_token`, `wrong_token`).
    pub admin_rejected: Family<ReasonLabels, Counter>,
    /// Seconds from the upstream receipt of a version to its send on a downstream stream, by
    /// type; observed through [`KeyMetrics::push_latency`].
    push_latency: HistogramFamily<TypeLabels>,
    /// Responses sent downstream, by type; counted through [`KeyMetrics::pushes`].
    type_pushes: Family<TypeLabels, Counter>,
    /// NACKs received from downstream, by type; counted through [`KeyMetrics::nacks`].
    type_nacks: Family<TypeLabels, Counter>,
    /// Members of the relay cluster as this node sees them, by state.
    cluster_members: Family<StateLabels, Gauge>,
    /// Members on the consistent-hash ring (alive, ready, with a peer address).
    pub ring_members: Gauge,
    /// Sealed gossip datagrams, by direction; copied from the cluster at scrape time.
    gossip_datagrams: Family<DirectionLabels, Counter>,
    /// Gossip datagrams dropped, by reason; copied from the cluster at scrape time.
    gossip_rejected: Family<GossipReasonLabels, Counter>,
    /// Gossip datagrams that could not be sealed or sent.
    gossip_send_failures: Counter,
    /// Gossip key file changes that could not be installed.
    gossip_key_reload_failures: Counter,
    /// Changes of the consistent-hash ring.
    pub ring_changes: Counter,
    /// Keys switched to another source (origin or owner node): each starts a handoff.
    pub source_changes: Counter,
    /// Peer streams of other nodes following keys through this node.
    pub peer_followers: Gauge,
    /// Peer calls refused, by reason (see `peer::server::PeerRefusal::reason`).
    peer_rejected: Family<ReasonLabels, Counter>,
    /// Member entries kept off the ring until their peer certificate is seen to name them.
    pub members_unverified: Gauge,
    /// Verifications of members' peer certificates, by result (`verified` or `failed`).
    member_verifications: Family<ResultLabels, Counter>,
    keys: [Gauge; 4],
    /// Active keys whose source is not answered (see [`KeySourceCounts::without_source`]).
    pub keys_without_source: Gauge,
    sources: SourceMetrics,
    key_families: KeyFamilies,
    tls_handshake_failures: Family<ListenerLabels, Counter>,
    tls_reload_failures: Family<TlsConfigLabels, Counter>,
    limit_refusals: Family<LimitLabels, Counter>,
    connections: Family<ListenerLabels, Gauge>,
    connections_refused: Family<ConnectionRefusalLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
    origin_connections: Family<OriginAddressLabels, Gauge>,
    origin_streams: Family<OriginAddressLabels, Gauge>,
    origin_connection_streams_max: Family<OriginAddressLabels, Gauge>,
    key_series: Arc<std::sync::Mutex<KeySeries>>,
    metric_keys_aggregated: Gauge,
    /// Rollout gate decisions, by decision (`promote`, `hold`, `manual_promote`, `abort`).
    pub rollout_decisions: Family<DecisionLabels, Counter>,
    /// Seconds from a version reaching its canaries to the gate's promote or hold.
    pub rollout_decision_seconds: Histogram,
}

/// Label set of rollout decisions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `promote`, `hold`, `manual_promote` or `abort`.
    pub decision: &'static str,
}

/// Declares the per-key metric families (label `key`) from one table: the struct holding
/// them, the struct of one key's handles, and their registration, resolution and removal, so
/// that a family added to the table is registered, resolved and removed with the others.
macro_rules! key_families {
    ($($field:ident: $metric:ident => $name:literal, $help:literal;)+) => {
        /// The families of per-key series, each labelled with [`KeyLabels`].
        #[derive(Clone, Default)]
        struct KeyFamilies {
            $($field: Family<KeyLabels, $metric>,)+
        }

        /// One key's series, one handle per family of [`KeyFamilies`].
        struct KeySeriesHandles {
            $($field: $metric,)+
        }

        impl KeyFamilies {
            /// Registers every family, in table order.
            fn register(&self, registry: &mut Registry) {
                $(registry.register($name, $help, self.$field.clone());)+
            }

            /// The series of `labels` in every family, created if needed.
            fn get_or_create(&self, labels: &KeyLabels) -> KeySeriesHandles {
                KeySeriesHandles { $($field: self.$field.get_or_create_owned(labels),)+ }
            }

            /// Removes the series of `labels` from every family.
            fn remove(&self, labels: &KeyLabels) {
                $(self.$field.remove(labels);)+
            }
        }
    };
}

key_families! {
    clients: Gauge => "key_clients", "Downstream streams watching a key";
    pushes: Counter => "key_pushes", "Responses sent downstream for a key";
    push_bytes: Counter => "key_push_bytes", "Bytes sent downstream for a key";
    acks: Counter => "key_acks", "ACKs received from downstream clients for a key";
    nacks: Counter => "key_nacks", "NACKs received from downstream clients for a key";
    upstream_connected: Gauge => "upstream_connected",
        "1 while the key's source (origin stream or owner's peer stream) is answered";
    upstream_responses: Counter => "upstream_responses", "Responses received from the key's source";
    upstream_failures: Counter => "upstream_failures", "Source stream failures for a key";
    upstream_rejected: Counter => "upstream_rejected_responses", "Responses from the key's source the relay rejected";
    upstream_failovers: Counter => "upstream_failovers", "Switches between origin addresses for a key";
    rollout_held: Gauge => "rollout_held",
        "1 while a new version of the key is held by its rollout gate (the key's other clients keep the stable version)";
}

/// Which keys have their own per-key series and which share [`OTHER_KEY`].
///
/// Invariant: `own.len() <= max`; a key is in at most one of `own` and `aggregated`; every
/// change happens under the one mutex, together with the creation or removal of the key's
/// label sets, so a slot is never given twice nor lost (each step is O(1)).
struct KeySeries {
    max: usize,
    own: HashSet<String>,
    /// Each aggregated key's `upstream_connected` mark (its share of the `_other` gauge).
    aggregated: HashMap<String, Arc<AtomicU8>>,
}

/// States of an aggregated key's `upstream_connected` mark.
const MARK_DOWN: u8 = 0;
const MARK_UP: u8 = 1;
/// The key was forgotten: its share was taken out of the shared gauge; later sets are ignored.
const MARK_GONE: u8 = 2;

/// A key's `upstream_connected` gauge: its own series, or its share (0 or 1) of the series of
/// [`OTHER_KEY`], which then counts the aggregated keys whose source is answered.
#[derive(Clone, Debug)]
pub struct ConnectedGauge {
    gauge: Gauge,
    /// `None` for a key with its own series.
    mark: Option<Arc<AtomicU8>>,
}

impl ConnectedGauge {
    /// Marks the key's source answered (`value != 0`) or not.
    pub fn set(&self, value: i64) {
        let connected = value != 0;
        let Some(mark) = &self.mark else {
            self.gauge.set(i64::from(connected));
            return;
        };
        let want = u8::from(connected);
        let changed =
            mark.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| (m != MARK_GONE && m != want).then_some(want));
        if changed.is_ok() {
            if connected {
                self.gauge.inc();
            } else {
                self.gauge.dec();
            }
        }
    }

    /// 1 while the key's source is marked answered, else 0.
    pub fn get(&self) -> i64 {
        match &self.mark {
            None => self.gauge.get(),
            Some(mark) => i64::from(mark.load(Ordering::Acquire) == MARK_UP),
        }
    }
}

/// The node-wide metrics a key's source reports into (handoffs, peer stream errors); every
/// [`KeyMetrics`] carries a handle.
#[derive(Clone)]
pub struct SourceMetrics {
    handoffs: Family<ResultLabels, Counter>,
    /// Handoffs started whose new source has not delivered yet.
    pub handoffs_pending: Gauge,
    /// Seconds from a source switch to the new source's first delivered state.
    pub handoff_duration: Histogram,
    peer_stream_errors: Family<PeerErrorLabels, Counter>,
    /// Owner updates a follower dropped because their serial did not follow the last one it
    /// applied from the same stream.
    pub stale_peer_updates: Counter,
}

impl SourceMetrics {
    /// Counts a handoff that completed: the new source delivered and the old one stopped.
    pub fn handoff_completed(&self, seconds: f64) {
        self.handoffs.get_or_create(&ResultLabels { result: "completed" }).inc();
        self.handoff_duration.observe(seconds);
    }

    /// Counts a handoff abandoned: the new source stopped before it delivered.
    pub fn handoff_abandoned(&self) {
        self.handoffs.get_or_create(&ResultLabels { result: "abandoned" }).inc();
    }

    /// Counts a failed peer stream seen from `side`, for `reason` (a short snake_case word).
    pub fn peer_stream_error(&self, side: PeerSide, reason: &'static str) {
        self.peer_stream_errors.get_or_create(&PeerErrorLabels { side: side.label(), reason }).inc();
    }
}

/// A per-key counter that also counts into the total of the key's type.
#[derive(Clone, Debug, Default)]
pub struct KeyCounter {
    key: Counter,
    by_type: Counter,
}

impl KeyCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.key.inc();
        self.by_type.inc();
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.key.inc_by(n);
        self.by_type.inc_by(n);
    }

    /// The key's count.
    pub fn get(&self) -> u64 {
        self.key.get()
    }
}

/// Metric handles of one aggregation key, resolved once.
#[derive(Clone)]
pub struct KeyMetrics {
    /// Downstream streams watching the key.
    pub clients: Gauge,
    /// Responses sent downstream for the key (and for its type).
    pub pushes: KeyCounter,
    /// Bytes of resources sent downstream for the key.
    pub push_bytes: Counter,
    /// ACKs received from downstream for the key.
    pub acks: Counter,
    /// NACKs received from downstream for the key (and for its type).
    pub nacks: KeyCounter,
    /// Push latency histogram of the key's type.
    pub push_latency: Histogram,
    /// 1 while the key's source (upstream or peer stream) is answered, else 0.
    pub upstream_connected: ConnectedGauge,
    /// Responses received from the origin for the key.
    pub upstream_responses: Counter,
    /// Upstream stream failures (connect, stream error, or end before a response).
    pub upstream_failures: Counter,
    /// Upstream responses the relay rejected (NACKed to the origin).
    pub upstream_rejected: Counter,
    /// Switches between origin addresses.
    pub upstream_failovers: Counter,
    /// Node-wide metrics of key sources.
    pub sources: SourceMetrics,
    /// 1 while a version of the key is held by its rollout gate.
    pub rollout_held: Gauge,
}

impl Metrics {
    /// Creates the registry with every metric registered under the `xds_relay` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("xds_relay");
        let metrics = Self {
            registry: Arc::new(Registry::default()),
            downstream_streams: Gauge::default(),
            downstream_streams_total: Counter::default(),
            passthrough_streams: Gauge::default(),
            passthrough_streams_total: Counter::default(),
            mapping_errors: Family::default(),
            request_errors: Family::default(),
            stale_requests: Counter::default(),
            protocol_extras: Family::default(),
            cache_entries: Gauge::default(),
            runtime_tasks: Gauge::default(),
            cache_evictions: Family::default(),
            persist_writes: Counter::default(),
            persist_write_errors: Counter::default(),
            persist_records_loaded: Counter::default(),
            persist_records_skipped: Family::default(),
            persist_stale_keys: Gauge::default(),
            admin_rejected: Family::default(),
            push_latency: Family::new_with_constructor(push_latency_histogram),
            type_pushes: Family::default(),
            type_nacks: Family::default(),
            cluster_members: Family::default(),
            ring_members: Gauge::default(),
            gossip_datagrams: Family::default(),
            gossip_rejected: Family::default(),
            gossip_send_failures: Counter::default(),
            gossip_key_reload_failures: Counter::default(),
            ring_changes: Counter::default(),
            source_changes: Counter::default(),
            peer_followers: Gauge::default(),
            peer_rejected: Family::default(),
            members_unverified: Gauge::default(),
            member_verifications: Family::default(),
            keys: Default::default(),
            keys_without_source: Gauge::default(),
            sources: SourceMetrics {
                handoffs: Family::default(),
                handoffs_pending: Gauge::default(),
                handoff_duration: handoff_histogram(),
                peer_stream_errors: Family::default(),
                stale_peer_updates: Counter::default(),
            },
            key_families: KeyFamilies::default(),
            tls_handshake_failures: Family::default(),
            tls_reload_failures: Family::default(),
            limit_refusals: Family::default(),
            connections: Family::default(),
            connections_refused: Family::default(),
            accept_errors: Family::default(),
            origin_connections: Family::default(),
            origin_streams: Family::default(),
            origin_connection_streams_max: Family::default(),
            key_series: Arc::new(std::sync::Mutex::new(KeySeries {
                max: crate::config::Telemetry::default().max_key_series,
                own: HashSet::new(),
                aggregated: HashMap::new(),
            })),
            metric_keys_aggregated: Gauge::default(),
            rollout_decisions: Family::default(),
            rollout_decision_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
        };
        // Series that an alert expects to exist from the start (a missing series is not 0).
        let keys = Family::<SourceLabels, Gauge>::default();
        let keys_handles = [("origin", "true"), ("origin", "false"), ("peer", "true"), ("peer", "false")]
            .map(|(source, connected)| keys.get_or_create_owned(&SourceLabels { source, connected }));
        for result in ["completed", "abandoned"] {
            let _ = metrics.sources.handoffs.get_or_create_owned(&ResultLabels { result });
        }
        let r = &mut registry;
        r.register("downstream_streams", "Downstream xDS streams open now", metrics.downstream_streams.clone());
        r.register("downstream_streams", "Downstream xDS streams accepted", metrics.downstream_streams_total.clone());
        r.register(
            "passthrough_streams",
            "Stream types that no aggregation rule maps, relayed on a private key with an origin stream of their own",
            metrics.passthrough_streams.clone(),
        );
        r.register(
            "passthrough_streams",
            "Pass-through stream types opened (server.pass_through_unmapped)",
            metrics.passthrough_streams_total.clone(),
        );
        r.register(
            "mapping_errors",
            "Requests that no aggregation rule could map, by type",
            metrics.mapping_errors.clone(),
        );
        r.register(
            "request_errors",
            "Downstream requests rejected with a gRPC status, by reason",
            metrics.request_errors.clone(),
        );
        r.register(
            "stale_requests",
            "State-of-the-world requests ignored for a stale nonce",
            metrics.stale_requests.clone(),
        );
        r.register(
            "protocol_extras",
            "Downstream responses with TTL heartbeats or resource errors, and pushes held for a fresh \
             copy of do_not_cache resources, by type and extra",
            metrics.protocol_extras.clone(),
        );
        r.register("cache_entries", "Aggregation keys in the cache", metrics.cache_entries.clone());
        r.register("cache_evictions", "Cache entries evicted, by reason", metrics.cache_evictions.clone());
        r.register("persist_writes", "Key states written to cache.persist_dir", metrics.persist_writes.clone());
        r.register(
            "persist_write_errors",
            "Writes or removals in cache.persist_dir that failed",
            metrics.persist_write_errors.clone(),
        );
        r.register(
            "persist_records_loaded",
            "Records read from cache.persist_dir at start that seeded a key",
            metrics.persist_records_loaded.clone(),
        );
        r.register(
            "persist_records_skipped",
            "Records of cache.persist_dir skipped at start, by reason",
            metrics.persist_records_skipped.clone(),
        );
        r.register(
            "persist_stale_keys",
            "Keys served from their state on disk that no live source has confirmed yet",
            metrics.persist_stale_keys.clone(),
        );
        r.register("runtime_tasks", "Tasks alive in the relay's tokio runtime", metrics.runtime_tasks.clone());
        r.register("admin_rejected", "Mutating admin calls refused, by reason", metrics.admin_rejected.clone());
        r.register(
            "push_latency_seconds",
            "Time from the relay's receipt of a version to its send on a downstream stream, by type",
            metrics.push_latency.clone(),
        );
        r.register("pushes", "Responses sent to downstream clients, by type", metrics.type_pushes.clone());
        r.register("nacks", "NACKs received from downstream clients, by type", metrics.type_nacks.clone());
        r.register(
            "rollout_decisions",
            "Rollout gate decisions on new versions, by decision",
            metrics.rollout_decisions.clone(),
        );
        r.register(
            "rollout_decision_seconds",
            "Time from a new version reaching its canaries to the rollout gate's promote or hold",
            metrics.rollout_decision_seconds.clone(),
        );
        r.register("keys", "Keys in the cache by source (origin or peer) and whether that source is answered", keys);
        r.register(
            "keys_without_source",
            "Keys with clients or followers whose source (origin stream or owner's peer stream) is not answered",
            metrics.keys_without_source.clone(),
        );
        r.register(
            "cluster_members",
            "Members of the relay cluster as this node sees them, by state",
            metrics.cluster_members.clone(),
        );
        r.register("ring_members", "Members on the consistent-hash ring", metrics.ring_members.clone());
        r.register("ring_changes", "Changes of the consistent-hash ring", metrics.ring_changes.clone());
        r.register(
            "gossip_datagrams",
            "Sealed gossip datagrams, by direction (in: opened and accepted, out: sent)",
            metrics.gossip_datagrams.clone(),
        );
        r.register(
            "gossip_rejected",
            "Gossip datagrams dropped, by reason (not sealed with a cluster key, stale, replayed, malformed)",
            metrics.gossip_rejected.clone(),
        );
        r.register(
            "gossip_send_failures",
            "Gossip datagrams that could not be sealed or sent",
            metrics.gossip_send_failures.clone(),
        );
        r.register(
            "gossip_key_reload_failures",
            "Gossip key file changes that could not be installed (the keys in force stay)",
            metrics.gossip_key_reload_failures.clone(),
        );
        r.register(
            "source_changes",
            "Keys switched to another source (origin or owner node); each starts a handoff",
            metrics.source_changes.clone(),
        );
        r.register(
            "handoffs",
            "Source handoffs finished, by result: completed (the new source delivered) or abandoned",
            metrics.sources.handoffs.clone(),
        );
        r.register(
            "handoffs_pending",
            "Source handoffs whose new source has not delivered yet",
            metrics.sources.handoffs_pending.clone(),
        );
        r.register(
            "handoff_duration_seconds",
            "Time from a source switch to the new source's first delivered state",
            metrics.sources.handoff_duration.clone(),
        );
        r.register("peer_followers", "Peer streams following keys through this node", metrics.peer_followers.clone());
        r.register(
            "peer_rejected",
            "Peer protocol calls refused, by reason (no_certificate, bad_certificate, not_a_member, not_owner, ...)",
            metrics.peer_rejected.clone(),
        );
        r.register(
            "members_unverified",
            "Cluster member entries kept off the ring until their peer certificate is seen to name them",
            metrics.members_unverified.clone(),
        );
        r.register(
            "member_verifications",
            "Checks of members' peer certificates before ring placement, by result (verified or failed)",
            metrics.member_verifications.clone(),
        );
        r.register(
            "peer_stream_errors",
            "Peer streams that failed, by side (follower or owner) and reason",
            metrics.sources.peer_stream_errors.clone(),
        );
        r.register(
            "peer_stale_updates",
            "Owner updates a follower dropped: their serial was not after the last one applied from the same stream",
            metrics.sources.stale_peer_updates.clone(),
        );
        r.register(
            "metric_keys_aggregated",
            "Keys beyond telemetry.max_key_series whose per-key series are aggregated under key=\"_other\"",
            metrics.metric_keys_aggregated.clone(),
        );
        metrics.key_families.register(r);
        r.register(
            "limit_refusals",
            "Requests, streams and peer calls refused by a limit of the limits: section, by limit",
            metrics.limit_refusals.clone(),
        );
        r.register("connections", "Connections open now, by listener", metrics.connections.clone());
        r.register(
            "origin_connections",
            "HTTP/2 connections open to the origin, by origin address",
            metrics.origin_connections.clone(),
        );
        r.register(
            "origin_streams",
            "Origin streams (one per key) placed on origin connections, by origin address",
            metrics.origin_streams.clone(),
        );
        r.register(
            "origin_connection_streams_max",
            "Streams on the fullest origin connection, by origin address",
            metrics.origin_connection_streams_max.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed before they were served, by listener and reason",
            metrics.connections_refused.clone(),
        );
        r.register(
            "accept_errors",
            "Failed accepts (out of file descriptors, for example), by listener",
            metrics.accept_errors.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out on a listener, by listener",
            metrics.tls_handshake_failures.clone(),
        );
        r.register(
            "tls_reload_failures",
            "Changed certificate files that could not be loaded (the previous ones stay in use), by configuration",
            metrics.tls_reload_failures.clone(),
        );
        Self { registry: Arc::new(registry), keys: keys_handles, ..metrics }
    }

    /// Sets how many keys get their own per-key series (`telemetry.max_key_series`); keys
    /// resolved later beyond it share [`OTHER_KEY`]. Keys already resolved keep their series.
    pub fn set_max_key_series(&self, max: usize) {
        self.series().max = max;
    }

    fn series(&self) -> std::sync::MutexGuard<'_, KeySeries> {
        self.key_series.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Resolves (creating if needed) the metric handles of `key`, of type `type_url`: the
    /// key's own series while fewer than `telemetry.max_key_series` keys have theirs, else the
    /// shared series of [`OTHER_KEY`] (the key then counts in `metric_keys_aggregated` until
    /// [`Metrics::forget_key`]). A key named `_other` itself is always aggregated.
    pub fn for_key(&self, key: &str, type_url: &str) -> KeyMetrics {
        let mut series = self.series();
        let own = key != OTHER_KEY
            && (series.own.contains(key) || (series.own.len() < series.max && !series.aggregated.contains_key(key)));
        let mark = if own {
            if !series.own.contains(key) {
                series.own.insert(key.to_owned());
            }
            None
        } else {
            let mark =
                series.aggregated.entry(key.to_owned()).or_insert_with(|| Arc::new(AtomicU8::new(MARK_DOWN))).clone();
            self.metric_keys_aggregated.set(i64::try_from(series.aggregated.len()).unwrap_or(i64::MAX));
            Some(mark)
        };
        let labels = KeyLabels { key: if own { key.to_owned() } else { OTHER_KEY.to_owned() } };
        let by_type = TypeLabels::of(type_url);
        let series_handles = self.key_families.get_or_create(&labels);
        let metrics = KeyMetrics {
            clients: series_handles.clients,
            pushes: KeyCounter { key: series_handles.pushes, by_type: self.type_pushes.get_or_create_owned(&by_type) },
            push_bytes: series_handles.push_bytes,
            acks: series_handles.acks,
            nacks: KeyCounter { key: series_handles.nacks, by_type: self.type_nacks.get_or_create_owned(&by_type) },
            push_latency: self.push_latency.get_or_create_owned(&by_type),
            upstream_connected: ConnectedGauge { gauge: series_handles.upstream_connected, mark },
            upstream_responses: series_handles.upstream_responses,
            upstream_failures: series_handles.upstream_failures,
            upstream_rejected: series_handles.upstream_rejected,
            upstream_failovers: series_handles.upstream_failovers,
            sources: self.sources.clone(),
            rollout_held: series_handles.rollout_held,
        };
        drop(series);
        metrics
    }

    /// Called when `key`'s cache entry is evicted: removes its label sets and frees its slot
    /// when it had its own series; when it was aggregated, it stops counting in
    /// `metric_keys_aggregated` and its share of the shared `upstream_connected` is taken
    /// out (the shared counters keep what it added). Does nothing for an unknown key.
    pub fn forget_key(&self, key: &str) {
        let mut series = self.series();
        if series.own.remove(key) {
            self.key_families.remove(&KeyLabels { key: key.to_owned() });
        } else if let Some(mark) = series.aggregated.remove(key) {
            if mark.swap(MARK_GONE, Ordering::AcqRel) == MARK_UP {
                self.key_families.upstream_connected.get_or_create(&KeyLabels { key: OTHER_KEY.to_owned() }).dec();
            }
            self.metric_keys_aggregated.set(i64::try_from(series.aggregated.len()).unwrap_or(i64::MAX));
        }
    }

    /// Counts a refused peer call, for `reason`.
    pub fn peer_rejected(&self, reason: &str) {
        self.peer_rejected.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Counts a verification of a member's peer certificate, `verified` or `failed`.
    pub fn member_verification(&self, verified: bool) {
        let result = if verified { "verified" } else { "failed" };
        self.member_verifications.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a downstream response that carried `extra` (`heartbeat`, `resource_errors`) or
    /// a push held for it (`do_not_cache_wait`), for `type_url`.
    pub fn protocol_extra(&self, type_url: &str, extra: &'static str) {
        self.protocol_extras.get_or_create(&ExtraLabels { r#type: crate::xds::type_label(type_url), extra }).inc();
    }

    /// Counts a rejected downstream request.
    pub fn request_error(&self, reason: &str) {
        self.request_errors.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Counts a request, stream or peer call refused because it would exceed `limit` (a field
    /// of the `limits:` section).
    pub fn limit_refused(&self, limit: &'static str) {
        self.limit_refusals.get_or_create(&LimitLabels { limit }).inc();
    }

    /// The gauge of connections open now on `listener`.
    pub fn connections(&self, listener: &'static str) -> Gauge {
        self.connections.get_or_create_owned(&ListenerLabels { listener })
    }

    /// The gauges of the connections to origin `address` (`host:port`).
    pub fn origin_connections(&self, address: &str) -> OriginConnectionGauges {
        let labels = OriginAddressLabels { address: address.to_owned() };
        OriginConnectionGauges {
            connections: self.origin_connections.get_or_create_owned(&labels),
            streams: self.origin_streams.get_or_create_owned(&labels),
            connection_streams_max: self.origin_connection_streams_max.get_or_create_owned(&labels),
        }
    }

    /// Counts a connection on `listener` closed before it was served, for `reason`.
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused.get_or_create(&ConnectionRefusalLabels { listener, reason }).inc();
    }

    /// Counts a failed `accept` on `listener` (out of file descriptors, for example).
    pub fn accept_error(&self, listener: &'static str) {
        self.accept_errors.get_or_create(&ListenerLabels { listener }).inc();
    }

    /// Counts a failed TLS handshake on `listener`.
    pub fn tls_handshake_failure(&self, listener: &'static str) {
        self.tls_handshake_failures.get_or_create(&ListenerLabels { listener }).inc();
    }

    /// Counts changed certificate files of `config` that could not be loaded.
    pub fn tls_reload_failure(&self, config: &'static str) {
        self.tls_reload_failures.get_or_create(&TlsConfigLabels { config }).inc();
    }

    /// The node-wide metrics of key sources.
    pub fn sources(&self) -> &SourceMetrics {
        &self.sources
    }

    /// Sets the gauges describing every key's source (called before each scrape).
    pub fn set_key_sources(&self, counts: &KeySourceCounts) {
        let values =
            [counts.origin_connected, counts.origin_disconnected, counts.peer_connected, counts.peer_disconnected];
        for (gauge, value) in self.keys.iter().zip(values) {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        self.keys_without_source.set(i64::try_from(counts.without_source).unwrap_or(i64::MAX));
    }

    /// Sets the member counts, in the order of [`MEMBER_STATES`].
    pub fn set_cluster_members(&self, by_state: [usize; 4]) {
        for (state, count) in MEMBER_STATES.into_iter().zip(by_state) {
            self.cluster_members.get_or_create(&StateLabels { state }).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Copies the cluster's gossip counters (before a scrape). Plaintext gossip exports no
    /// gossip series; sealed gossip exports every reason, from 0.
    pub fn set_gossip_stats(&self, stats: &GossipStats) {
        if !stats.sealed {
            return;
        }
        let set = |counter: &Counter, value: u64| counter.inner().store(value, std::sync::atomic::Ordering::Relaxed);
        set(&self.gossip_datagrams.get_or_create(&DirectionLabels { direction: "in" }), stats.datagrams_received);
        set(&self.gossip_datagrams.get_or_create(&DirectionLabels { direction: "out" }), stats.datagrams_sent);
        for (reason, count) in stats.rejected {
            set(&self.gossip_rejected.get_or_create(&GossipReasonLabels { reason: reason.as_str() }), count);
        }
        set(&self.gossip_send_failures, stats.send_failures);
        set(&self.gossip_key_reload_failures, stats.key_reload_failures);
    }

    /// Renders every metric in the Prometheus text format; `runtime_tasks` is read now (0
    /// outside a tokio runtime).
    pub fn render(&self) -> String {
        let tasks = tokio::runtime::Handle::try_current().map_or(0, |h| h.metrics().num_alive_tasks());
        self.runtime_tasks.set(i64::try_from(tasks).unwrap_or(i64::MAX));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Encoding into a String only fails on a formatter error, which String never raises.
            let _ = writeln!(out, "# metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Changes the log level of every component at run time.
#[derive(Clone)]
pub struct LogControl {
    handle: Option<reload::Handle<EnvFilter, tracing_subscriber::Registry>>,
    current: Arc<std::sync::Mutex<LogLevel>>,
}

impl LogControl {
    /// A control that only remembers the level (for tests that install no subscriber).
    pub fn detached(level: LogLevel) -> Self {
        Self { handle: None, current: Arc::new(std::sync::Mutex::new(level)) }
    }

    /// The level in force.
    pub fn level(&self) -> LogLevel {
        *self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the level of every component.
    ///
    /// # Errors
    /// Fails when the subscriber behind the handle is gone.
    pub fn set_level(&self, level: LogLevel) -> Result<(), String> {
        if let Some(handle) = &self.handle {
            handle.reload(filter_for(level)).map_err(|e| format!("cannot change the log level: {e}"))?;
        }
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = level;
        Ok(())
    }
}

fn filter_for(level: LogLevel) -> EnvFilter {
    // Our own crates log at the chosen level; the gRPC/HTTP stack stays at warn so a debug
    // level shows the relay's decisions, not every HTTP/2 frame. Trace spans never show.
    EnvFilter::new(format!(
        "warn,xds_relay={lvl},xds_relay_cluster={lvl},xds_relay_example={lvl},{trace}=off,h2=warn,hyper=warn,tower=warn,tonic=warn",
        lvl = level.as_str(),
        trace = traces::TARGET,
    ))
}

/// Installs the global subscriber: human-readable lines on stderr, or JSON lines into `path`
/// (created or truncated) when it is given; and, when `tracing` is set, the OpenTelemetry
/// layer exporting the relay's trace spans over OTLP (its own filter: the log level does not
/// gate traces).
///
/// # Errors
/// Fails when the log file cannot be created, the exporter cannot be built, or a subscriber
/// is already installed.
pub fn init_logging(
    level: LogLevel,
    path: Option<&str>,
    tracing: Option<(&crate::config::TracingSettings, &str)>,
) -> anyhow::Result<(LogControl, Option<traces::TraceExport>)> {
    let (filter, handle) = reload::Layer::new(filter_for(level));
    let fmt_layer = match path {
        Some(path) if path != "/dev/stderr" => {
            let file =
                std::fs::File::create(path).map_err(|e| anyhow::anyhow!("cannot create log file {path}: {e}"))?;
            tracing_subscriber::fmt::layer().json().with_writer(std::sync::Mutex::new(file)).boxed()
        }
        _ => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).compact().boxed(),
    };
    let (export, otel_layer) = match tracing {
        Some((settings, node)) if settings.enabled => {
            let (export, tracer) = traces::TraceExport::new(settings, node)?;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(EnvFilter::new(format!("off,{}=info", traces::TARGET)));
            (Some(export), Some(layer))
        }
        _ => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    Ok((LogControl { handle: Some(handle), current: Arc::new(std::sync::Mutex::new(level)) }, export))
}

// === the cache's hooks ===

impl crate::cache::CacheHooks for Metrics {
    type Key = KeyMetrics;

    fn key_created(&self, key: &str, type_url: &str) -> KeyMetrics {
        self.for_key(key, type_url)
    }

    fn key_retired(&self, key: &str) {
        self.forget_key(key);
    }

    fn entries(&self, count: usize) {
        self.cache_entries.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    fn evicted(&self, reason: &'static str) {
        self.cache_evictions.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }
}

impl crate::cache::KeyHooks for KeyMetrics {
    fn client_joined(&self) {
        self.clients.inc();
    }

    fn client_left(&self) {
        self.clients.dec();
    }

    fn acked(&self) {
        self.acks.inc();
    }

    fn nacked(&self) {
        self.nacks.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_metrics_render_and_are_forgotten() {
        let metrics = Metrics::new();
        let key = metrics.for_key("staging_cds", crate::xds::CLUSTER);
        key.pushes.inc();
        key.nacks.inc();
        key.push_latency.observe(0.002);
        key.clients.set(3);
        let text = metrics.render();
        assert!(text.contains("xds_relay_key_pushes_total{key=\"staging_cds\"} 1"), "{text}");
        assert!(text.contains("xds_relay_key_clients{key=\"staging_cds\"} 3"), "{text}");
        assert!(text.contains("xds_relay_pushes_total{type=\"cds\"} 1"), "{text}");
        assert!(text.contains("xds_relay_nacks_total{type=\"cds\"} 1"), "{text}");
        assert!(text.contains("xds_relay_push_latency_seconds_count{type=\"cds\"} 1"), "{text}");
        metrics.forget_key("staging_cds");
        let text = metrics.render();
        assert!(!text.contains("staging_cds"), "{text}");
        // Per-type totals outlive the key: they are bounded by the number of types.
        assert!(text.contains("xds_relay_nacks_total{type=\"cds\"} 1"), "{text}");
    }

    /// Lines of `family` in `text` (its samples, not its HELP/TYPE lines).
    fn samples<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(&format!("{family}{{"))).collect()
    }

    #[test]
    fn keys_beyond_the_cap_share_one_series_and_evicted_keys_free_their_slot() {
        let metrics = Metrics::new();
        metrics.set_max_key_series(2);
        let a = metrics.for_key("a", crate::xds::CLUSTER);
        let b = metrics.for_key("b", crate::xds::CLUSTER);
        let c = metrics.for_key("c", crate::xds::CLUSTER);
        let d = metrics.for_key("d", crate::xds::ENDPOINT);
        for (key, n) in [(&a, 1), (&b, 2), (&c, 3), (&d, 4)] {
            key.pushes.inc_by(n);
            key.clients.inc();
        }
        let text = metrics.render();
        assert!(text.contains("xds_relay_key_pushes_total{key=\"a\"} 1"), "{text}");
        assert!(text.contains("xds_relay_key_pushes_total{key=\"b\"} 2"), "{text}");
        assert!(text.contains("xds_relay_key_pushes_total{key=\"_other\"} 7"), "counts add up: {text}");
        assert!(text.contains("xds_relay_key_clients{key=\"_other\"} 2"), "{text}");
        assert!(text.contains("xds_relay_metric_keys_aggregated 2"), "{text}");
        assert_eq!(samples(&text, "xds_relay_key_pushes_total").len(), 3, "{text}");

        // An aggregated key's upstream_connected is its share of the shared gauge.
        c.upstream_connected.set(1);
        d.upstream_connected.set(1);
        c.upstream_connected.set(1);
        assert!(metrics.render().contains("xds_relay_upstream_connected{key=\"_other\"} 2"));
        assert_eq!(c.upstream_connected.get(), 1);
        metrics.forget_key("c");
        c.upstream_connected.set(1);
        let text = metrics.render();
        assert!(text.contains("xds_relay_upstream_connected{key=\"_other\"} 1"), "forgotten share: {text}");
        assert!(text.contains("xds_relay_metric_keys_aggregated 1"), "{text}");

        // Evicting a key with its own series frees its slot for the next new key.
        metrics.forget_key("a");
        let e = metrics.for_key("e", crate::xds::CLUSTER);
        e.pushes.inc();
        let text = metrics.render();
        assert!(!text.contains("key=\"a\""), "{text}");
        assert!(text.contains("xds_relay_key_pushes_total{key=\"e\"} 1"), "{text}");
        assert!(text.contains("xds_relay_metric_keys_aggregated 1"), "d stays aggregated: {text}");
        // A key named like the shared label never gets its own series.
        metrics.forget_key("e");
        let _ = metrics.for_key(OTHER_KEY, crate::xds::CLUSTER);
        assert!(metrics.render().contains("xds_relay_metric_keys_aggregated 2"));
        metrics.forget_key("nothing");
        metrics.forget_key("d");
        metrics.forget_key(OTHER_KEY);
        assert!(metrics.render().contains("xds_relay_metric_keys_aggregated 0"));
    }

    #[test]
    fn invented_type_urls_share_the_other_type_label() {
        let metrics = Metrics::new();
        for i in 0..200 {
            let key = metrics.for_key(&format!("k{i}"), &format!("type.googleapis.com/acme.Invented{i}"));
            key.pushes.inc();
            metrics.mapping_errors.get_or_create(&TypeLabels::of(&format!("type.googleapis.com/x{i}"))).inc();
        }
        let text = metrics.render();
        assert_eq!(samples(&text, "xds_relay_pushes_total"), ["xds_relay_pushes_total{type=\"other\"} 200"]);
        assert_eq!(
            samples(&text, "xds_relay_mapping_errors_total"),
            ["xds_relay_mapping_errors_total{type=\"other\"} 200"]
        );
    }

    #[test]
    fn long_messages_are_truncated_on_a_char_boundary() {
        assert!(matches!(truncate_message("short"), Cow::Borrowed("short")));
        let exact = "x".repeat(MAX_MESSAGE_BYTES);
        assert_eq!(truncate_message(&exact), exact);
        let long = "é".repeat(100 * 1024);
        let cut = truncate_message(&long);
        let (kept, marker) = cut.split_once('…').unwrap();
        assert!(kept.len() <= MAX_MESSAGE_BYTES && kept.len() >= MAX_MESSAGE_BYTES - 1, "{}", kept.len());
        assert!(kept.chars().all(|c| c == 'é'));
        assert_eq!(marker, format!(" (truncated, {} bytes)", long.len()));
    }

    #[test]
    fn node_wide_gauges_and_counters_render_with_their_labels() {
        let metrics = Metrics::new();
        let text = metrics.render();
        // Series an alert relies on exist before the first event.
        assert!(text.contains("xds_relay_keys{source=\"origin\",connected=\"false\"} 0"), "{text}");
        assert!(text.contains("xds_relay_keys_without_source 0"), "{text}");
        assert!(text.contains("xds_relay_handoffs_total{result=\"completed\"} 0"), "{text}");
        metrics.set_key_sources(&KeySourceCounts {
            origin_connected: 2,
            origin_disconnected: 1,
            peer_connected: 4,
            peer_disconnected: 0,
            without_source: 1,
        });
        metrics.set_cluster_members([0, 2, 1, 1]);
        metrics.sources().peer_stream_error(PeerSide::Follower, "reset");
        metrics.sources().stale_peer_updates.inc();
        metrics.sources().handoff_completed(0.05);
        let text = metrics.render();
        for line in [
            "xds_relay_keys{source=\"origin\",connected=\"true\"} 2",
            "xds_relay_keys{source=\"origin\",connected=\"false\"} 1",
            "xds_relay_keys{source=\"peer\",connected=\"true\"} 4",
            "xds_relay_keys_without_source 1",
            "xds_relay_cluster_members{state=\"ready\"} 2",
            "xds_relay_cluster_members{state=\"dead\"} 1",
            "xds_relay_peer_stream_errors_total{side=\"follower\",reason=\"reset\"} 1",
            "xds_relay_peer_stale_updates_total 1",
            "xds_relay_handoffs_total{result=\"completed\"} 1",
            "xds_relay_handoff_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line}: {text}");
        }
    }

    #[tokio::test]
    async fn runtime_tasks_counts_the_tasks_alive_when_rendered() {
        let metrics = Metrics::new();
        let gate = tokio_util::sync::CancellationToken::new();
        let handles: Vec<_> = (0..3).map(|_| tokio::spawn(gate.clone().cancelled_owned())).collect();
        let text = metrics.render();
        let line = text.lines().find(|l| l.starts_with("xds_relay_runtime_tasks ")).expect("series rendered");
        let tasks: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(tasks >= 3, "{line}");
        gate.cancel();
        for h in handles {
            h.await.unwrap();
        }
        assert!(
            std::thread::spawn(move || Metrics::new().render()).join().unwrap().contains("xds_relay_runtime_tasks 0")
        );
    }

    #[test]
    fn gossip_counters_render_only_when_sealed() {
        let metrics = Metrics::new();
        metrics.set_gossip_stats(&GossipStats::default());
        assert!(!metrics.render().contains("xds_relay_gossip_rejected_total{"));
        let mut stats =
            GossipStats { sealed: true, datagrams_received: 5, datagrams_sent: 7, ..GossipStats::default() };
        stats.rejected[6].1 = 3;
        metrics.set_gossip_stats(&stats);
        let text = metrics.render();
        for line in [
            "xds_relay_gossip_datagrams_total{direction=\"in\"} 5",
            "xds_relay_gossip_datagrams_total{direction=\"out\"} 7",
            "xds_relay_gossip_rejected_total{reason=\"replay\"} 3",
            "xds_relay_gossip_rejected_total{reason=\"no_key\"} 0",
            "xds_relay_gossip_send_failures_total 0",
            "xds_relay_gossip_key_reload_failures_total 0",
        ] {
            assert!(text.contains(line), "missing {line}: {text}");
        }
    }

    #[test]
    fn detached_log_control_remembers_the_level() {
        let control = LogControl::detached(LogLevel::Info);
        control.set_level(LogLevel::Debug).unwrap();
        assert_eq!(control.level(), LogLevel::Debug);
    }
}
