//! Logs and metrics.
//!
//! Logging goes through `tracing` with a level that can be changed at run time (the admin
//! API's `/log_level`) through a reload handle. Metrics are Prometheus counters, gauges and
//! histograms kept in one registry and rendered in the text exposition format at `/metrics`.
//!
//! Invariants: per-key metric handles are resolved once per cache entry ([`KeyMetrics`]) so
//! the fan-out path never formats a label; the label sets of an evicted key are removed, so
//! the registry's size is bounded by the cache's.

pub mod traces;

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, reload};

use crate::config::LogLevel;

/// Label set naming one aggregation key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// The aggregation key.
    pub key: String,
}

/// Label set naming a resource type (short name, e.g. `cds`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// Short type name.
    pub r#type: String,
}

/// Label set naming the reason of an event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why it happened, a short snake_case word.
    pub reason: String,
}

/// Every metric the relay exports. Cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Downstream streams open now.
    pub downstream_streams: Gauge,
    /// Downstream streams accepted since start.
    pub downstream_streams_total: Counter,
    /// Downstream requests that could not be mapped to a key, by type.
    pub mapping_errors: Family<TypeLabels, Counter>,
    /// Downstream requests rejected for another reason (bad type URL, v2, limits).
    pub request_errors: Family<ReasonLabels, Counter>,
    /// SotW requests ignored because their nonce was stale.
    pub stale_requests: Counter,
    /// Cache entries now.
    pub cache_entries: Gauge,
    /// Cache entries evicted, by reason (`ttl`, `max_entries`, `cleared`).
    pub cache_evictions: Family<ReasonLabels, Counter>,
    /// Seconds from the upstream receipt of a version to its send on a downstream stream.
    pub push_latency: Histogram,
    /// Live members of the relay cluster, as this node sees them.
    pub cluster_members: Gauge,
    /// Changes of the consistent-hash ring.
    pub ring_changes: Counter,
    /// Keys moved to another source (origin or owner node) after a ring change.
    pub source_changes: Counter,
    /// Peer streams of other nodes following keys through this node.
    pub peer_followers: Gauge,
    key_clients: Family<KeyLabels, Gauge>,
    key_pushes: Family<KeyLabels, Counter>,
    key_push_bytes: Family<KeyLabels, Counter>,
    key_acks: Family<KeyLabels, Counter>,
    key_nacks: Family<KeyLabels, Counter>,
    key_upstream_connected: Family<KeyLabels, Gauge>,
    key_upstream_responses: Family<KeyLabels, Counter>,
    key_upstream_failures: Family<KeyLabels, Counter>,
    key_upstream_rejected: Family<KeyLabels, Counter>,
    key_upstream_failovers: Family<KeyLabels, Counter>,
}

/// Metric handles of one aggregation key, resolved once.
#[derive(Clone)]
pub struct KeyMetrics {
    /// Downstream streams watching the key.
    pub clients: Gauge,
    /// Responses sent downstream for the key.
    pub pushes: Counter,
    /// Bytes of resources sent downstream for the key.
    pub push_bytes: Counter,
    /// ACKs received from downstream for the key.
    pub acks: Counter,
    /// NACKs received from downstream for the key.
    pub nacks: Counter,
    /// 1 while the key's upstream stream has an answer from the origin, else 0.
    pub upstream_connected: Gauge,
    /// Responses received from the origin for the key.
    pub upstream_responses: Counter,
    /// Upstream stream failures (connect, stream error, or end before a response).
    pub upstream_failures: Counter,
    /// Upstream responses the relay rejected (NACKed to the origin).
    pub upstream_rejected: Counter,
    /// Switches between origin addresses.
    pub upstream_failovers: Counter,
}

impl Metrics {
    /// Creates the registry with every metric registered under the `xds_relay` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("xds_relay");
        let metrics = Self {
            registry: Arc::new(Registry::default()),
            downstream_streams: Gauge::default(),
            downstream_streams_total: Counter::default(),
            mapping_errors: Family::default(),
            request_errors: Family::default(),
            stale_requests: Counter::default(),
            cache_entries: Gauge::default(),
            cache_evictions: Family::default(),
            push_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            cluster_members: Gauge::default(),
            ring_changes: Counter::default(),
            source_changes: Counter::default(),
            peer_followers: Gauge::default(),
            key_clients: Family::default(),
            key_pushes: Family::default(),
            key_push_bytes: Family::default(),
            key_acks: Family::default(),
            key_nacks: Family::default(),
            key_upstream_connected: Family::default(),
            key_upstream_responses: Family::default(),
            key_upstream_failures: Family::default(),
            key_upstream_rejected: Family::default(),
            key_upstream_failovers: Family::default(),
        };
        let r = &mut registry;
        r.register("downstream_streams", "Downstream xDS streams open now", metrics.downstream_streams.clone());
        r.register("downstream_streams", "Downstream xDS streams accepted", metrics.downstream_streams_total.clone());
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
        r.register("cache_entries", "Aggregation keys in the cache", metrics.cache_entries.clone());
        r.register("cache_evictions", "Cache entries evicted, by reason", metrics.cache_evictions.clone());
        r.register(
            "push_latency_seconds",
            "Time from the upstream receipt of a version to its send on a downstream stream",
            metrics.push_latency.clone(),
        );
        r.register("cluster_members", "Live members of the relay cluster", metrics.cluster_members.clone());
        r.register("ring_changes", "Changes of the consistent-hash ring", metrics.ring_changes.clone());
        r.register(
            "source_changes",
            "Keys moved to another source after a ring change",
            metrics.source_changes.clone(),
        );
        r.register("peer_followers", "Peer streams following keys through this node", metrics.peer_followers.clone());
        r.register("key_clients", "Downstream streams watching a key", metrics.key_clients.clone());
        r.register("key_pushes", "Responses sent downstream for a key", metrics.key_pushes.clone());
        r.register("key_push_bytes", "Bytes sent downstream for a key", metrics.key_push_bytes.clone());
        r.register("key_acks", "ACKs received from downstream clients for a key", metrics.key_acks.clone());
        r.register("key_nacks", "NACKs received from downstream clients for a key", metrics.key_nacks.clone());
        r.register(
            "upstream_connected",
            "1 while the key's upstream stream is answered by the origin",
            metrics.key_upstream_connected.clone(),
        );
        r.register(
            "upstream_responses",
            "Responses received from the origin for a key",
            metrics.key_upstream_responses.clone(),
        );
        r.register("upstream_failures", "Upstream stream failures for a key", metrics.key_upstream_failures.clone());
        r.register(
            "upstream_rejected_responses",
            "Origin responses the relay rejected for a key",
            metrics.key_upstream_rejected.clone(),
        );
        r.register(
            "upstream_failovers",
            "Switches between origin addresses for a key",
            metrics.key_upstream_failovers.clone(),
        );
        Self { registry: Arc::new(registry), ..metrics }
    }

    /// Resolves (creating if needed) the metric handles of `key`.
    pub fn for_key(&self, key: &str) -> KeyMetrics {
        let labels = KeyLabels { key: key.to_owned() };
        KeyMetrics {
            clients: self.key_clients.get_or_create_owned(&labels),
            pushes: self.key_pushes.get_or_create_owned(&labels),
            push_bytes: self.key_push_bytes.get_or_create_owned(&labels),
            acks: self.key_acks.get_or_create_owned(&labels),
            nacks: self.key_nacks.get_or_create_owned(&labels),
            upstream_connected: self.key_upstream_connected.get_or_create_owned(&labels),
            upstream_responses: self.key_upstream_responses.get_or_create_owned(&labels),
            upstream_failures: self.key_upstream_failures.get_or_create_owned(&labels),
            upstream_rejected: self.key_upstream_rejected.get_or_create_owned(&labels),
            upstream_failovers: self.key_upstream_failovers.get_or_create_owned(&labels),
        }
    }

    /// Removes every label set of `key` (called when its cache entry is evicted).
    pub fn forget_key(&self, key: &str) {
        let labels = KeyLabels { key: key.to_owned() };
        self.key_clients.remove(&labels);
        self.key_pushes.remove(&labels);
        self.key_push_bytes.remove(&labels);
        self.key_acks.remove(&labels);
        self.key_nacks.remove(&labels);
        self.key_upstream_connected.remove(&labels);
        self.key_upstream_responses.remove(&labels);
        self.key_upstream_failures.remove(&labels);
        self.key_upstream_rejected.remove(&labels);
        self.key_upstream_failovers.remove(&labels);
    }

    /// Counts a rejected downstream request.
    pub fn request_error(&self, reason: &str) {
        self.request_errors.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_metrics_render_and_are_forgotten() {
        let metrics = Metrics::new();
        let key = metrics.for_key("staging_cds");
        key.pushes.inc();
        key.clients.set(3);
        let text = metrics.render();
        assert!(text.contains("xds_relay_key_pushes_total{key=\"staging_cds\"} 1"), "{text}");
        assert!(text.contains("xds_relay_key_clients{key=\"staging_cds\"} 3"), "{text}");
        metrics.forget_key("staging_cds");
        assert!(!metrics.render().contains("staging_cds"));
    }

    #[test]
    fn detached_log_control_remembers_the_level() {
        let control = LogControl::detached(LogLevel::Info);
        control.set_level(LogLevel::Debug).unwrap();
        assert_eq!(control.level(), LogLevel::Debug);
    }
}
