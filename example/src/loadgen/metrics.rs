//! What a load run measures, shared by every call task: counters, per-client progress, and per
//! version receipt times, turned into [`Progress`] lines and the final [`Summary`].
//!
//! A *change* is a response whose version differs from the previous response of its type on
//! the same call; a call's first response of a type is not a change (it measures connecting, and
//! goes to `initial_response_ms`). Spread and latency use changes only:
//! - fan-out spread of a version: last minus first change receipt of it across all calls;
//! - end-to-end latency of a receipt: receipt wall-clock time minus `published_unix_nanos` from
//!   the response's `control_plane.identifier` JSON (skipped when absent or not that shape).
//!
//! Memory does not grow with responses: per version a fixed record, latencies in histograms.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::config::{LoadgenConfig, XdsType};
use super::histogram::{Histogram, rank};
use super::session::{Handled, Receipt};
use crate::client::Transport;

/// At most this many versions are listed in the summary (the most recent ones).
const MAX_LISTED_VERSIONS: usize = 10_000;

/// Progress of one simulated client, shared by its calls.
#[derive(Debug, Default)]
pub struct ClientProgress {
    /// Bit per [`XdsType::index`] of the types that got a first response.
    ready: AtomicU8,
    /// Changes per type.
    changes: [AtomicU32; 4],
    /// Whether the client reached `until_versions`.
    reached: AtomicBool,
}

/// Counters and version receipts of one run.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// Bits of every type a client subscribes to.
    all_types: u8,
    until_versions: Option<u32>,
    responses: AtomicU64,
    bytes: AtomicU64,
    nacks: AtomicU64,
    errors: AtomicU64,
    reconnects: AtomicU64,
    restarts: AtomicU64,
    calls_open: AtomicU64,
    max_calls_open: AtomicU64,
    streams_ready: AtomicU64,
    streams_reached: AtomicU64,
    table: Mutex<Table>,
}

/// Per-version records and latency histograms.
#[derive(Debug, Default)]
struct Table {
    /// Per type: version → record.
    versions: [HashMap<String, VersionRecord>; 4],
    next_seq: u64,
    latest: Option<String>,
    latency_us: Histogram,
    initial_us: Histogram,
    connect_us: Histogram,
}

/// Receipts of one version of one type.
#[derive(Debug, Clone)]
struct VersionRecord {
    seq: u64,
    first: Instant,
    last: Instant,
    receipts: u64,
    published_unix_nanos: Option<u64>,
    latency_min_us: Option<u64>,
    latency_max_us: Option<u64>,
}

/// The control-plane identifier the example server stamps (other fields are ignored).
#[derive(Deserialize)]
struct Stamp {
    published_unix_nanos: u64,
}

/// Decrements the open-call gauge when dropped.
#[derive(Debug)]
pub struct OpenCall<'a> {
    metrics: &'a Metrics,
}

impl Drop for OpenCall<'_> {
    fn drop(&mut self) {
        self.metrics.calls_open.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl Metrics ===

impl Metrics {
    /// Empty metrics for a run of `config`, starting now.
    pub fn new(config: &LoadgenConfig) -> Self {
        Self {
            started: Instant::now(),
            all_types: config.types.iter().fold(0, |bits, t| bits | (1 << t.index())),
            until_versions: config.until_versions,
            responses: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            nacks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            calls_open: AtomicU64::new(0),
            max_calls_open: AtomicU64::new(0),
            streams_ready: AtomicU64::new(0),
            streams_reached: AtomicU64::new(0),
            table: Mutex::default(),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts an open call until the guard drops.
    pub fn call_opened(&self) -> OpenCall<'_> {
        let open = self.calls_open.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_calls_open.fetch_max(open, Ordering::Relaxed);
        OpenCall { metrics: self }
    }

    /// Records how long one connection took to set up (TCP, TLS handshake, HTTP/2 preface).
    pub fn record_connect(&self, took: Duration) {
        self.table().connect_us.record(micros(took));
    }

    /// Counts a failed call (an error status, or failing to open).
    pub fn count_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call reopened after it ended.
    pub fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call ended and reopened by a forced restart of its client.
    pub fn count_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Clients that reached `until_versions`.
    pub fn streams_reached(&self) -> u64 {
        self.streams_reached.load(Ordering::Relaxed)
    }

    /// Records one response of `client`; `since_open` is the time since its call opened.
    pub fn record(&self, client: &ClientProgress, handled: &Handled, since_open: Duration) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(handled.bytes as u64, Ordering::Relaxed);
        if handled.nack {
            self.nacks.fetch_add(1, Ordering::Relaxed);
        }
        let Some(t) = handled.xds_type else { return };
        match handled.receipt {
            Receipt::First => {
                self.table().initial_us.record(micros(since_open));
                let bit = 1 << t.index();
                let before = client.ready.fetch_or(bit, Ordering::Relaxed);
                if before & bit == 0 && (before | bit) == self.all_types {
                    self.streams_ready.fetch_add(1, Ordering::Relaxed);
                }
            }
            Receipt::Changed => {
                self.table().record_change(t, &handled.version, handled.control_plane.as_deref());
                let changes = client.changes[t.index()].fetch_add(1, Ordering::Relaxed) + 1;
                if self.until_versions.is_some_and(|k| changes >= k) && !client.reached.swap(true, Ordering::Relaxed) {
                    self.streams_reached.fetch_add(1, Ordering::Relaxed);
                }
            }
            Receipt::Repeat | Receipt::Unexpected => {}
        }
    }

    /// Change receipts of `version` of `t` so far.
    pub fn receipts(&self, t: XdsType, version: &str) -> u64 {
        self.table().versions[t.index()].get(version).map_or(0, |r| r.receipts)
    }

    /// The counters now.
    pub fn progress(&self, config: &LoadgenConfig) -> Progress {
        Progress {
            elapsed: self.started.elapsed(),
            streams: config.streams as u64,
            calls_expected: config.calls_expected() as u64,
            calls_open: self.calls_open.load(Ordering::Relaxed),
            streams_ready: self.streams_ready.load(Ordering::Relaxed),
            responses: self.responses.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            nacks: self.nacks.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
            latest_version: self.table().latest.clone(),
        }
    }

    /// The summary of the run so far; `calls_open` is the gauge before the streams were closed.
    pub fn summary(&self, config: &LoadgenConfig, stopped_by: StopReason, calls_open: u64) -> Summary {
        let progress = self.progress(config);
        let secs = progress.elapsed.as_secs_f64().max(f64::EPSILON);
        let table = self.table();
        let mut versions: Vec<(XdsType, &String, &VersionRecord)> = XdsType::ALL
            .into_iter()
            .flat_map(|t| table.versions[t.index()].iter().map(move |(v, r)| (t, v, r)))
            .collect();
        versions.sort_by_key(|(_, _, r)| r.seq);
        let spreads: Vec<u64> = versions.iter().map(|(_, _, r)| micros(r.last - r.first)).collect();
        let listed = versions.len().saturating_sub(MAX_LISTED_VERSIONS);
        let versions = versions[listed..]
            .iter()
            .map(|(t, version, r)| VersionSummary {
                xds_type: *t,
                version: (*version).clone(),
                streams: r.receipts,
                first_receipt_ms: ms(micros(r.first.saturating_duration_since(self.started))),
                spread_ms: ms(micros(r.last - r.first)),
                latency_min_ms: r.latency_min_us.map(ms),
                latency_max_ms: r.latency_max_us.map(ms),
            })
            .collect();
        Summary {
            target: config.target.clone(),
            protocol: format!("{:?}", config.protocol).to_lowercase(),
            mode: match config.mode {
                Transport::Ads => "ads".to_owned(),
                Transport::PerType => "per-type".to_owned(),
            },
            types: config.types.clone(),
            streams: progress.streams,
            connections: config.connections as u64,
            tls: config.tls.is_some(),
            mtls: config.tls.as_ref().is_some_and(|tls| tls.cert_file.is_some()),
            stopped_by,
            elapsed_secs: secs,
            calls_expected: progress.calls_expected,
            calls_open,
            max_calls_open: self.max_calls_open.load(Ordering::Relaxed),
            streams_ready: progress.streams_ready,
            streams_reached_until_versions: config.until_versions.map(|_| self.streams_reached()),
            responses: progress.responses,
            bytes: progress.bytes,
            responses_per_sec: progress.responses as f64 / secs,
            bytes_per_sec: progress.bytes as f64 / secs,
            nacks: progress.nacks,
            errors: progress.errors,
            reconnects: progress.reconnects,
            restarts: progress.restarts,
            connect_ms: Quantiles::of_histogram(&table.connect_us),
            initial_response_ms: Quantiles::of_histogram(&table.initial_us),
            spread_ms: Quantiles::of_values(spreads),
            latency_ms: Quantiles::of_histogram(&table.latency_us),
            versions,
        }
    }
}

// === impl Table ===

impl Table {
    /// Records a change receipt of `version` of `t`, now.
    fn record_change(&mut self, t: XdsType, version: &str, control_plane: Option<&str>) {
        let now = Instant::now();
        let versions = &mut self.versions[t.index()];
        if !versions.contains_key(version) {
            let published_unix_nanos =
                control_plane.and_then(|id| serde_json::from_str::<Stamp>(id).ok()).map(|s| s.published_unix_nanos);
            let record = VersionRecord {
                seq: self.next_seq,
                first: now,
                last: now,
                receipts: 0,
                published_unix_nanos,
                latency_min_us: None,
                latency_max_us: None,
            };
            versions.insert(version.to_owned(), record);
            self.next_seq += 1;
            self.latest = Some(version.to_owned());
        }
        let Some(record) = versions.get_mut(version) else { return };
        record.last = now;
        record.receipts += 1;
        if let Some(published) = record.published_unix_nanos {
            let latency = unix_nanos().saturating_sub(published) / 1000;
            record.latency_min_us = Some(record.latency_min_us.map_or(latency, |m| m.min(latency)));
            record.latency_max_us = Some(record.latency_max_us.map_or(latency, |m| m.max(latency)));
            self.latency_us.record(latency);
        }
    }
}

/// Now in nanoseconds since the unix epoch.
fn unix_nanos() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)
}

/// A duration in whole microseconds.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Microseconds as milliseconds.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The counters of a run at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Time since the run started.
    pub elapsed: Duration,
    /// Simulated clients.
    pub streams: u64,
    /// gRPC calls when every client is up.
    pub calls_expected: u64,
    /// gRPC calls open now.
    pub calls_open: u64,
    /// Clients that got a first response of every type.
    pub streams_ready: u64,
    /// Responses received.
    pub responses: u64,
    /// Encoded bytes received.
    pub bytes: u64,
    /// NACKs sent.
    pub nacks: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Calls reopened after they ended.
    pub reconnects: u64,
    /// Calls ended and reopened by forced restarts (`--reconnect-per-second`).
    pub restarts: u64,
    /// The version most recently seen as a change for the first time.
    pub latest_version: Option<String>,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:>7.1}s] calls up {}/{} | ready {}/{} | responses {} ({:.3} MB) | latest {} | nacks {} errors {} reconnects {} restarts {}",
            self.elapsed.as_secs_f64(),
            self.calls_open,
            self.calls_expected,
            self.streams_ready,
            self.streams,
            self.responses,
            self.bytes as f64 / 1e6,
            self.latest_version.as_deref().unwrap_or("-"),
            self.nacks,
            self.errors,
            self.reconnects,
            self.restarts,
        )
    }
}

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// `--duration` elapsed.
    Duration,
    /// Every client saw `--until-versions` new versions.
    UntilVersions,
    /// [`super::Loadgen::stop`] (e.g. Ctrl-C).
    Stopped,
}

/// p50, p99 and max of some milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Quantiles {
    /// Number of values.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

// === impl Quantiles ===

impl Quantiles {
    /// Exact nearest-rank quantiles of microsecond values; `None` when there are none.
    pub fn of_values(mut us: Vec<u64>) -> Option<Self> {
        us.sort_unstable();
        let n = us.len() as u64;
        let at = |q: f64| ms(us[(rank(q, n) - 1) as usize]);
        (!us.is_empty()).then(|| Quantiles { count: n, p50: at(0.5), p99: at(0.99), max: at(1.0) })
    }

    /// Quantiles of a microsecond histogram; `None` when it is empty.
    pub fn of_histogram(h: &Histogram) -> Option<Self> {
        Some(Quantiles { count: h.count(), p50: ms(h.quantile(0.5)?), p99: ms(h.quantile(0.99)?), max: ms(h.max()) })
    }
}

/// One version of one type, as received as a change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionSummary {
    /// The type.
    #[serde(rename = "type")]
    pub xds_type: XdsType,
    /// The version.
    pub version: String,
    /// Calls that received it as a change.
    pub streams: u64,
    /// When the first call received it, since the run started.
    pub first_receipt_ms: f64,
    /// Last minus first receipt.
    pub spread_ms: f64,
    /// Smallest end-to-end latency, when stamped.
    pub latency_min_ms: Option<f64>,
    /// Largest end-to-end latency, when stamped.
    pub latency_max_ms: Option<f64>,
}

/// The result of a run (printed as JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The xDS server.
    pub target: String,
    /// `sotw` or `delta`.
    pub protocol: String,
    /// `ads` or `per-type`.
    pub mode: String,
    /// The types each client subscribed to.
    pub types: Vec<XdsType>,
    /// Simulated clients.
    pub streams: u64,
    /// HTTP/2 connections.
    pub connections: u64,
    /// Whether the connections use TLS.
    pub tls: bool,
    /// Whether the connections present a client certificate (mTLS).
    pub mtls: bool,
    /// Why the run stopped.
    pub stopped_by: StopReason,
    /// Run time.
    pub elapsed_secs: f64,
    /// gRPC calls when every client is up.
    pub calls_expected: u64,
    /// gRPC calls open when the run stopped.
    pub calls_open: u64,
    /// Most gRPC calls open at once.
    pub max_calls_open: u64,
    /// Clients that got a first response of every type.
    pub streams_ready: u64,
    /// Clients that saw `--until-versions` new versions (when set).
    pub streams_reached_until_versions: Option<u64>,
    /// Responses received.
    pub responses: u64,
    /// Encoded bytes received.
    pub bytes: u64,
    /// Responses per second over the run.
    pub responses_per_sec: f64,
    /// Bytes per second over the run.
    pub bytes_per_sec: f64,
    /// NACKs sent.
    pub nacks: u64,
    /// Calls that failed (error status or could not open).
    pub errors: u64,
    /// Calls reopened after they ended.
    pub reconnects: u64,
    /// Calls ended and reopened by forced restarts (`--reconnect-per-second`).
    pub restarts: u64,
    /// Setting up each connection: TCP connect, TLS handshake (when on) and the HTTP/2 preface.
    pub connect_ms: Option<Quantiles>,
    /// From opening a call to its first response of a type.
    pub initial_response_ms: Option<Quantiles>,
    /// Fan-out spread over versions: last minus first change receipt across calls.
    pub spread_ms: Option<Quantiles>,
    /// End-to-end latency over change receipts, from the origin's publish stamp.
    pub latency_ms: Option<Quantiles>,
    /// Every version received as a change, oldest first (at most the last 10000).
    pub versions: Vec<VersionSummary>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::session::Request;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

    fn handled(t: XdsType, version: &str, receipt: Receipt, control_plane: Option<String>) -> Handled {
        Handled {
            xds_type: Some(t),
            version: version.into(),
            control_plane,
            bytes: 100,
            resources: 1,
            receipt,
            reply: Request::Sotw(DiscoveryRequest::default()),
            nack: false,
            derived: None,
        }
    }

    #[test]
    fn ready_reached_spread_and_latency() {
        let config = LoadgenConfig {
            streams: 2,
            types: vec![XdsType::Cds, XdsType::Eds],
            until_versions: Some(1),
            ..Default::default()
        };
        let m = Metrics::new(&config);
        let clients = [ClientProgress::default(), ClientProgress::default()];
        let stamp = crate::publisher::identifier("v2", unix_nanos() - 5_000_000);
        for c in &clients {
            m.record(c, &handled(XdsType::Cds, "v1", Receipt::First, None), Duration::from_millis(3));
            assert_eq!(m.progress(&config).streams_ready, 0, "EDS missing");
        }
        for c in &clients {
            m.record(c, &handled(XdsType::Eds, "v1", Receipt::First, None), Duration::from_millis(3));
        }
        assert_eq!(m.progress(&config).streams_ready, 2);
        m.record(&clients[0], &handled(XdsType::Eds, "v2", Receipt::Changed, Some(stamp.clone())), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(10));
        m.record(&clients[1], &handled(XdsType::Eds, "v2", Receipt::Changed, Some(stamp)), Duration::ZERO);
        m.record(&clients[1], &handled(XdsType::Eds, "v2", Receipt::Repeat, None), Duration::ZERO);
        assert_eq!(m.receipts(XdsType::Eds, "v2"), 2);
        assert_eq!(m.streams_reached(), 2);

        let s = m.summary(&config, StopReason::UntilVersions, 2);
        assert_eq!((s.responses, s.bytes, s.errors), (7, 700, 0));
        assert_eq!(s.versions.len(), 1);
        assert_eq!((s.versions[0].streams, s.versions[0].version.as_str()), (2, "v2"));
        let spread = s.spread_ms.unwrap();
        assert!(spread.max >= 10.0, "{spread:?}");
        let latency = s.latency_ms.unwrap();
        assert_eq!(latency.count, 2);
        assert!(latency.p50 >= 5.0 && latency.max >= latency.p50, "{latency:?}");
        assert_eq!(s.initial_response_ms.unwrap().count, 4);
        assert!(s.connect_ms.is_none() && !s.tls && !s.mtls);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["stopped_by"], "until-versions");
        assert_eq!(json["versions"][0]["type"], "eds");
    }

    #[test]
    fn no_data_gives_null_quantiles() {
        assert_eq!(Quantiles::of_values(vec![]), None);
        assert_eq!(Quantiles::of_histogram(&Histogram::new()), None);
        let q = Quantiles::of_values(vec![3000, 1000, 2000]).unwrap();
        assert_eq!((q.count, q.p50, q.p99, q.max), (3, 2.0, 3.0, 3.0));
    }
}
