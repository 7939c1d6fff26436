//! The bootstrap schema: where the relay listens, which origin it relays from, and its cache,
//! logging, admin and metrics settings. It mirrors the Go relay's
//! `api/protos/bootstrap/v1/bootstrap.proto`, plus our own `origin_server` and `server` fields
//! (fallback addresses, API type, backoff, timeouts, limits), all optional with defaults.
//!
//! Invariants of a [`Bootstrap`] that passed [`Bootstrap::validate`]: every address is an IP
//! or a DNS hostname; every interval the relay sleeps or times out on is positive (`cache.ttl`
//! and `statsd.flush_interval` may be 0, as in Go); `backoff.max_interval >=
//! backoff.initial_interval`; limits are positive.
//!
//! Serialized (for `/server_info`) with snake_case names and durations as Go strings
//! (`"5m0s"`).

use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::ConfigError;
use super::de::{count, integer, null_default};
use super::duration::GoDuration;

/// The whole bootstrap file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// The xDS gRPC listener for downstream clients (required).
    pub server: Server,
    /// The management server the relay subscribes to (required).
    #[serde(alias = "originServer")]
    pub origin_server: OriginServer,
    /// Log destination and level (optional, default: stderr at INFO).
    #[serde(default, deserialize_with = "null_default")]
    pub logging: Logging,
    /// Cache settings (required, because `ttl` is).
    pub cache: CacheConfig,
    /// The admin HTTP listener (required).
    pub admin: Admin,
    /// Where metrics are pushed (optional).
    #[serde(default, alias = "metricsSink")]
    pub metrics_sink: Option<MetricsSink>,
    /// Clustering with other relays (optional; absent means a single node).
    #[serde(default)]
    pub cluster: Option<super::cluster::ClusterSettings>,
    /// OpenTelemetry trace export (optional; absent means no traces).
    #[serde(default)]
    pub tracing: Option<super::traces::TracingSettings>,
    /// What one client, connection or peer may make the relay hold (optional; defaults).
    #[serde(default, deserialize_with = "null_default")]
    pub limits: super::limits::Limits,
    /// Bounds on metric cardinality (optional; defaults).
    #[serde(default, deserialize_with = "null_default")]
    pub telemetry: super::limits::Telemetry,
    /// Staged rollout of new versions, gated by the canaries' NACKs (optional; absent: every
    /// version goes to every client at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::rollout::RolloutSettings>,
}

/// A host and port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketAddress {
    /// An IP address or a DNS hostname (validated).
    pub address: String,
    /// The port; 0 asks the OS for a free port when binding.
    #[serde(alias = "portValue", deserialize_with = "port")]
    pub port_value: u16,
}

/// The xDS gRPC listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Address to bind.
    pub address: SocketAddress,
    /// Maximum number of concurrent downstream streams (default 100 000, must be > 0).
    #[serde(default = "default_max_streams", alias = "maxStreams", deserialize_with = "count")]
    pub max_streams: usize,
    /// How long an aggregated stream waits after a change so that the other types of the
    /// same origin update go out with it in make-before-break order (Go duration, default
    /// `30ms`; `0` sends at once).
    #[serde(default = "default_ads_batch_window", alias = "adsBatchWindow")]
    pub ads_batch_window: GoDuration,
    /// TLS for downstream xDS (optional; absent: plaintext).
    #[serde(default)]
    pub tls: Option<super::tls::ServerTls>,
    /// Serve the SDS `Secret` type on a listener without TLS (default false: refused).
    #[serde(default, alias = "allowSecretsWithoutTls")]
    pub allow_secrets_without_tls: bool,
    /// Relay a stream's type that no aggregation rule matches to the origin on an upstream
    /// stream of its own, instead of ending the stream with `INVALID_ARGUMENT` (default false).
    #[serde(default, alias = "passThroughUnmapped")]
    pub pass_through_unmapped: bool,
}

/// The origin management server (`Upstream` in the Go relay's proto) and how to talk to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginServer {
    /// The primary origin address, dialled plaintext as `host:port`.
    pub address: SocketAddress,
    /// Addresses tried in order after `address` fails (default none).
    #[serde(default, alias = "fallbackAddresses", deserialize_with = "null_default")]
    pub fallback_addresses: Vec<SocketAddress>,
    /// Which xDS service the relay uses upstream (default `GRPC`).
    #[serde(default, alias = "apiType", deserialize_with = "null_default")]
    pub api_type: ApiType,
    /// gRPC keepalive ping interval (Go duration, default `5m`, must be > 0).
    #[serde(default = "default_keep_alive", alias = "keepAliveTime")]
    pub keep_alive_time: GoDuration,
    /// Lifetime after which an upstream stream is closed and reopened; absent or 0: none.
    #[serde(default, alias = "streamTimeout", deserialize_with = "GoDuration::nonzero")]
    pub stream_timeout: Option<GoDuration>,
    /// Upper bound of the random extra added to `stream_timeout`; absent or 0: none.
    #[serde(default, alias = "streamTimeoutJitter", deserialize_with = "GoDuration::nonzero")]
    pub stream_timeout_jitter: Option<GoDuration>,
    /// If set, sent upstream as the string `node.metadata.xdsrelay_node_metadata`; absent or
    /// empty: none.
    #[serde(default, alias = "requestNodeMetadata", deserialize_with = "nonempty_string")]
    pub request_node_metadata: Option<String>,
    /// Reconnection backoff (default 500ms initial, 30s max).
    #[serde(default, deserialize_with = "null_default")]
    pub backoff: Backoff,
    /// Timeout for establishing a connection to the origin (default `5s`, must be > 0).
    #[serde(default = "default_connect_timeout", alias = "connectTimeout")]
    pub connect_timeout: GoDuration,
    /// While connected to a fallback address, how often the primary is tried again (default
    /// `30s`, must be > 0).
    #[serde(default = "default_failback_interval", alias = "failbackInterval")]
    pub failback_interval: GoDuration,
    /// Largest gRPC message accepted from or sent to the origin, in bytes (default 64 MiB,
    /// at least 4096).
    #[serde(default = "default_max_message_size", alias = "maxMessageSize", deserialize_with = "count")]
    pub max_message_size: usize,
    /// Most origin streams (one per key) carried by one HTTP/2 connection to an origin
    /// address (default 100, 1 to 1 000 000). Lowered per connection to the origin's
    /// advertised `SETTINGS_MAX_CONCURRENT_STREAMS` when that is smaller; more keys open
    /// more connections.
    #[serde(
        default = "default_origin_streams_per_connection",
        alias = "maxStreamsPerConnection",
        deserialize_with = "count"
    )]
    pub max_streams_per_connection: usize,
    /// TLS (or mTLS) to the origin and every fallback address (optional; absent: plaintext).
    #[serde(default)]
    pub tls: Option<super::tls::OriginTls>,
}

/// The xDS transport used towards the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApiType {
    /// State of the world, one per-type service stream (`GRPC`).
    #[default]
    Grpc,
    /// State of the world over ADS (`AGGREGATED_GRPC`).
    AggregatedGrpc,
    /// Incremental (delta), one per-type service stream (`DELTA_GRPC`).
    DeltaGrpc,
    /// Incremental (delta) over ADS (`AGGREGATED_DELTA_GRPC`).
    AggregatedDeltaGrpc,
}

/// Exponential reconnection backoff; a field left out takes its [`Backoff::default`] value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// First delay (default `500ms`, must be > 0).
    #[serde(alias = "initialInterval")]
    pub initial_interval: GoDuration,
    /// Largest delay (default `30s`, must be >= `initial_interval`).
    #[serde(alias = "maxInterval")]
    pub max_interval: GoDuration,
}

/// Log destination and level.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    /// Log file, created or truncated at startup; absent or empty: stderr.
    #[serde(default, deserialize_with = "nonempty_string")]
    pub path: Option<String>,
    /// Minimum level logged (default `INFO`).
    #[serde(default, deserialize_with = "null_default")]
    pub level: LogLevel,
}

/// A log level. YAML accepts `DEBUG`, `INFO`, `WARN`, `ERROR` in any case (and protojson's
/// numbers INFO=0, DEBUG=1, WARN=2, ERROR=3); it serializes in upper case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LogLevel {
    /// Everything, including per-request detail.
    Debug,
    /// Normal operation (the default).
    #[default]
    Info,
    /// Problems the relay works around.
    Warn,
    /// Failures.
    Error,
}

/// The keyed cache of upstream responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Time an entry lives without being refreshed (required, as in the Go relay; 0: never
    /// expires).
    pub ttl: GoDuration,
    /// Maximum number of keys (default 0: unlimited).
    #[serde(default, alias = "maxEntries", deserialize_with = "count")]
    pub max_entries: usize,
    /// Directory of the last-known-good key states (optional; absent: nothing is written or
    /// read). Created with mode 0700 when missing; it must be a writable directory.
    #[serde(default, alias = "persistDir", skip_serializing_if = "Option::is_none")]
    pub persist_dir: Option<std::path::PathBuf>,
}

impl CacheConfig {
    /// Checks `persist_dir` without touching the file system beyond reading its metadata
    /// (`xds-relay -m validate` changes nothing): not empty; when it exists, a directory that
    /// neither its group nor other users may write (anyone who can write it can make this
    /// relay serve what they wrote).
    ///
    /// # Errors
    /// A [`ConfigError`] naming `{path}.persist_dir`.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let Some(dir) = &self.persist_dir else { return Ok(()) };
        let error = |message: String| ConfigError::new("", format!("{path}.persist_dir"), message);
        if dir.as_os_str().is_empty() {
            return Err(error("must not be empty".to_owned()));
        }
        let Ok(meta) = std::fs::metadata(dir) else { return Ok(()) };
        if !meta.is_dir() {
            return Err(error(format!("{} is not a directory", dir.display())));
        }
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(error(format!(
                "{} is writable by its group or by other users (mode {:o}): make it 0700",
                dir.display(),
                mode & 0o777
            )));
        }
        Ok(())
    }

    /// Readies `persist_dir` for a relay that starts: creates it (mode 0700) when missing and
    /// checks that this process can write to it.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `cache.persist_dir` when it cannot be created, is not a
    /// directory or is not writable.
    pub fn prepare_persist_dir(&self) -> Result<(), ConfigError> {
        let Some(dir) = &self.persist_dir else { return Ok(()) };
        let error = |message: String| ConfigError::new("", "cache.persist_dir", message);
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| error(format!("cannot create {}: {e}", dir.display())))?;
        }
        if !dir.is_dir() {
            return Err(error(format!("{} is not a directory", dir.display())));
        }
        // Writable: a temporary file in it can be created (and is removed when dropped).
        tempfile::Builder::new()
            .prefix(".probe-")
            .tempfile_in(dir)
            .map_err(|e| error(format!("{} is not writable: {e}", dir.display())))?;
        Ok(())
    }
}

/// The admin HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Address to bind.
    pub address: SocketAddress,
    /// TLS for the admin listener (optional; absent: plaintext HTTP).
    #[serde(default)]
    pub tls: Option<super::tls::AdminTls>,
    /// File holding the bearer token that every mutating call (every POST) must carry; no
    /// token is needed when absent. Re-read when it changes, so the token can be rotated.
    #[serde(default, alias = "authTokenFile", skip_serializing_if = "Option::is_none")]
    pub auth_token_file: Option<std::path::PathBuf>,
}

impl Admin {
    /// Reads the token in `auth_token_file` (trimmed); `None` when no file is configured.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `admin.auth_token_file` when the file cannot be read or
    /// holds no token.
    pub fn read_auth_token(&self) -> Result<Option<String>, ConfigError> {
        self.auth_token_file.as_deref().map(|path| read_token_file(path, "admin.auth_token_file")).transpose()
    }
}

/// Reads the token in the file at `path`, configured as `field`: its content, trimmed.
///
/// # Errors
/// A [`ConfigError`] naming `field` when the file cannot be read or holds no token.
pub fn read_token_file(path: &std::path::Path, field: &str) -> Result<String, ConfigError> {
    let text = super::read_limited(path, super::MAX_SECRET_FILE_BYTES)
        .and_then(|bytes| String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
        .map_err(|e| ConfigError::new("", field, format!("cannot read {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ConfigError::new("", field, format!("{} holds no token", path.display())));
    }
    Ok(token.to_owned())
}

/// Where metrics are pushed: a oneof with a single member, `statsd`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawMetricsSink")]
pub enum MetricsSink {
    /// Push to a statsd server.
    Statsd(Statsd),
}

/// A statsd sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statsd {
    /// The statsd server.
    pub address: SocketAddress,
    /// Prefix of every metric (at least one character).
    #[serde(default, alias = "rootPrefix")]
    pub root_prefix: String,
    /// How often metrics are flushed (required; 0 means the sink's default).
    #[serde(alias = "flushInterval")]
    pub flush_interval: GoDuration,
}

/// The YAML form of [`MetricsSink`]: every member optional, exactly one must be set.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "struct MetricsSink")]
struct RawMetricsSink {
    #[serde(default)]
    statsd: Option<Statsd>,
}

// === defaults ===

fn default_max_streams() -> usize {
    100_000
}
fn default_ads_batch_window() -> GoDuration {
    GoDuration::from_millis(30)
}
fn default_keep_alive() -> GoDuration {
    GoDuration::from_secs(300)
}
fn default_connect_timeout() -> GoDuration {
    GoDuration::from_secs(5)
}
fn default_failback_interval() -> GoDuration {
    GoDuration::from_secs(30)
}
fn default_max_message_size() -> usize {
    64 * 1024 * 1024
}
fn default_origin_streams_per_connection() -> usize {
    100
}

/// Smallest accepted `max_message_size`.
const MIN_MESSAGE_SIZE: usize = 4096;

/// Largest accepted `origin_server.max_streams_per_connection` (HTTP/2 stream ids allow about
/// a billion streams over a connection's life; a million at once is beyond any origin).
const MAX_ORIGIN_STREAMS_PER_CONNECTION: usize = 1_000_000;

// === impl Bootstrap ===

impl Bootstrap {
    /// Checks every rule that parsing alone does not: addresses, positive intervals and
    /// limits, backoff bounds, the statsd prefix.
    ///
    /// # Errors
    ///
    /// The first problem, as a [`ConfigError`] with its field path and an empty `file`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.address.validate("server.address")?;
        if self.server.max_streams == 0 {
            return Err(ConfigError::new("", "server.max_streams", "must be greater than 0"));
        }
        if let Some(tls) = &self.server.tls {
            tls.validate("server.tls")?;
        }
        self.origin_server.validate("origin_server")?;
        self.admin.address.validate("admin.address")?;
        self.admin.read_auth_token()?;
        if let Some(tls) = &self.admin.tls {
            tls.validate("admin.tls")?;
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate("cluster")?;
        }
        if let Some(tracing) = &self.tracing {
            tracing.validate("tracing")?;
        }
        self.cache.validate("cache")?;
        self.limits.validate("limits")?;
        self.telemetry.validate("telemetry")?;
        if let Some(rollout) = &self.rollout {
            rollout.validate("rollout")?;
        }
        if let Some(MetricsSink::Statsd(statsd)) = &self.metrics_sink {
            statsd.address.validate("metrics_sink.statsd.address")?;
            if statsd.root_prefix.is_empty() {
                return Err(ConfigError::new(
                    "",
                    "metrics_sink.statsd.root_prefix",
                    "must be at least 1 character long",
                ));
            }
        }
        Ok(())
    }
}

// === impl OriginServer ===

impl OriginServer {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        self.address.validate(&format!("{path}.address"))?;
        for (i, address) in self.fallback_addresses.iter().enumerate() {
            address.validate(&format!("{path}.fallback_addresses[{i}]"))?;
        }
        let positive = [
            ("keep_alive_time", self.keep_alive_time),
            ("backoff.initial_interval", self.backoff.initial_interval),
            ("connect_timeout", self.connect_timeout),
            ("failback_interval", self.failback_interval),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return Err(ConfigError::new("", format!("{path}.{field}"), "must be greater than 0s"));
            }
        }
        if self.backoff.max_interval < self.backoff.initial_interval {
            return Err(ConfigError::new(
                "",
                format!("{path}.backoff.max_interval"),
                format!(
                    "max_interval {} must not be less than initial_interval {}",
                    self.backoff.max_interval, self.backoff.initial_interval
                ),
            ));
        }
        if self.max_message_size < MIN_MESSAGE_SIZE {
            return Err(ConfigError::new(
                "",
                format!("{path}.max_message_size"),
                format!("must be at least {MIN_MESSAGE_SIZE} bytes, got {}", self.max_message_size),
            ));
        }
        if !(1..=MAX_ORIGIN_STREAMS_PER_CONNECTION).contains(&self.max_streams_per_connection) {
            return Err(ConfigError::new(
                "",
                format!("{path}.max_streams_per_connection"),
                format!(
                    "must be between 1 and {MAX_ORIGIN_STREAMS_PER_CONNECTION}, got {}",
                    self.max_streams_per_connection
                ),
            ));
        }
        if let Some(tls) = &self.tls {
            tls.validate(&format!("{path}.tls"))?;
        }
        Ok(())
    }
}

impl Default for Backoff {
    /// 500ms initial, 30s max.
    fn default() -> Self {
        Self { initial_interval: GoDuration::from_millis(500), max_interval: GoDuration::from_secs(30) }
    }
}

// === impl ApiType ===

impl ApiType {
    /// True for the ADS variants (one stream carries every type).
    pub fn is_aggregated(&self) -> bool {
        matches!(self, Self::AggregatedGrpc | Self::AggregatedDeltaGrpc)
    }

    /// True for the incremental (delta) variants.
    pub fn is_delta(&self) -> bool {
        matches!(self, Self::DeltaGrpc | Self::AggregatedDeltaGrpc)
    }
}

// === impl SocketAddress ===

impl SocketAddress {
    /// `host:port`, with an IPv6 address in brackets (`[::1]:9991`), for binding and dialling.
    pub fn host_port(&self) -> String {
        match self.address.parse::<Ipv6Addr>() {
            Ok(_) => format!("[{}]:{}", self.address, self.port_value),
            Err(_) => format!("{}:{}", self.address, self.port_value),
        }
    }

    pub(super) fn validate(&self, path: &str) -> Result<(), ConfigError> {
        check_host(&self.address).map_err(|reason| {
            ConfigError::new(
                "",
                format!("{path}.address"),
                format!("invalid address \"{}\": must be a hostname or an IP address ({reason})", self.address),
            )
        })
    }
}

/// PGV's `address: true`: an IP address, or a hostname of at most 253 characters whose
/// dot-separated labels are 1 to 63 letters, digits and inner hyphens (one trailing dot allowed).
fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if host.is_empty() {
        return Err("it is empty".to_string());
    }
    if host.len() > 253 {
        return Err("a hostname is at most 253 characters".to_string());
    }
    for label in host.strip_suffix('.').unwrap_or(host).split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label must be 1 to 63 characters".to_string());
        }
        if let Some(c) = label.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
            return Err(format!("character {c:?} is not allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label cannot begin or end with '-'".to_string());
        }
    }
    Ok(())
}

// === impl LogLevel ===

/// The error of parsing a [`LogLevel`] from a string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid log level \"{0}\": expected one of debug, info, warn, error")]
pub struct ParseLogLevelError(pub String);

impl LogLevel {
    /// The lowercase name (`"debug"`, `"info"`, `"warn"`, `"error"`), as tracing filters and the
    /// admin API use it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

impl FromStr for LogLevel {
    type Err = ParseLogLevelError;

    /// Parses `debug`, `info`, `warn` or `error`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "debug" => Ok(Self::Debug),
            "info" => Ok(Self::Info),
            "warn" => Ok(Self::Warn),
            "error" => Ok(Self::Error),
            _ => Err(ParseLogLevelError(s.to_string())),
        }
    }
}

impl std::fmt::Display for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.as_str().to_ascii_uppercase())
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LevelVisitor;
        impl de::Visitor<'_> for LevelVisitor {
            type Value = LogLevel;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("one of DEBUG, INFO, WARN, ERROR")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LogLevel, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LogLevel, E> {
                // protojson enum numbers: INFO=0, DEBUG=1, WARN=2, ERROR=3.
                match v {
                    0 => Ok(LogLevel::Info),
                    1 => Ok(LogLevel::Debug),
                    2 => Ok(LogLevel::Warn),
                    3 => Ok(LogLevel::Error),
                    _ => Err(E::custom(ParseLogLevelError(v.to_string()))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LogLevel, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(ParseLogLevelError(v.to_string()))),
                }
            }
        }
        deserializer.deserialize_any(LevelVisitor)
    }
}

// === impl MetricsSink ===

impl TryFrom<RawMetricsSink> for MetricsSink {
    type Error = String;

    fn try_from(raw: RawMetricsSink) -> Result<Self, String> {
        raw.statsd.map(MetricsSink::Statsd).ok_or_else(|| "one of `statsd` must be set".to_string())
    }
}

// === field (de)serializers ===

fn port<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    let v = integer(deserializer)?;
    u16::try_from(v).map_err(|_| de::Error::custom(format!("port {v} is out of range (0-65535)")))
}

/// An optional string where absent, null and "" all mean "none".
fn nonempty_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.filter(|s| !s.is_empty()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::parse_bootstrap;

    const MINIMAL: &str = "
server: {address: {address: 127.0.0.1, port_value: 9991}}
origin_server: {address: {address: origin.example.com, port_value: 18000}}
cache: {ttl: 60s}
admin: {address: {address: '::1', port_value: 0}}
";

    fn parse(text: &str) -> Result<Bootstrap, ConfigError> {
        parse_bootstrap(text, "bootstrap.yaml")
    }

    /// MINIMAL with `from` replaced by `to`.
    fn with(from: &str, to: &str) -> String {
        assert!(MINIMAL.contains(from), "{from}");
        MINIMAL.replacen(from, to, 1)
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let b = parse(MINIMAL).unwrap();
        assert_eq!(b.server.max_streams, 100_000);
        let o = &b.origin_server;
        assert_eq!(o.api_type, ApiType::Grpc);
        assert!(o.fallback_addresses.is_empty());
        assert_eq!(o.keep_alive_time, Duration::from_secs(300));
        assert_eq!((o.stream_timeout, o.stream_timeout_jitter), (None, None));
        assert_eq!(o.request_node_metadata, None);
        assert_eq!(
            o.backoff,
            Backoff { initial_interval: GoDuration::from_millis(500), max_interval: GoDuration::from_secs(30) }
        );
        assert_eq!(o.connect_timeout, Duration::from_secs(5));
        assert_eq!(o.failback_interval, Duration::from_secs(30));
        assert_eq!(o.max_message_size, 64 * 1024 * 1024);
        assert_eq!(o.max_streams_per_connection, 100);
        assert_eq!(b.logging, Logging { path: None, level: LogLevel::Info });
        assert_eq!(b.cache, CacheConfig { ttl: GoDuration::from_secs(60), max_entries: 0, persist_dir: None });
        assert_eq!(b.metrics_sink, None);
        assert_eq!(b.admin.address.host_port(), "[::1]:0");
        assert_eq!(b.server.address.host_port(), "127.0.0.1:9991");
        assert_eq!(o.address.host_port(), "origin.example.com:18000");
    }

    #[test]
    fn every_field_parses() {
        let text = "
server: {address: {address: 0.0.0.0, port_value: 9991}, max_streams: 10}
origin_server:
  address: {address: origin-1, port_value: 18000}
  fallback_addresses: [{address: origin-2, port_value: 18000}, {address: 10.0.0.3, port_value: '18001'}]
  api_type: AGGREGATED_DELTA_GRPC
  keep_alive_time: 2m
  stream_timeout: 1h30m
  stream_timeout_jitter: 0.5s
  request_node_metadata: relay-a
  backoff: {initial_interval: 250ms, max_interval: 10s}
  connect_timeout: 1s
  failback_interval: 1m
  max_message_size: 4096
  max_streams_per_connection: 5
logging: {path: /tmp/relay.log, level: debug}
cache: {ttl: 0, max_entries: 100}
admin: {address: {address: localhost., port_value: 6070}}
metrics_sink: {statsd: {address: {address: 127.0.0.1, port_value: 8125}, root_prefix: xdsrelay, flush_interval: 5s}}
";
        let b = parse(text).unwrap();
        assert_eq!(b.server.max_streams, 10);
        let o = &b.origin_server;
        assert_eq!(o.fallback_addresses.len(), 2);
        assert_eq!(o.fallback_addresses[1].port_value, 18001);
        assert!(o.api_type.is_aggregated() && o.api_type.is_delta());
        assert_eq!(o.keep_alive_time, Duration::from_secs(120));
        assert_eq!(o.stream_timeout, Some(GoDuration::from_secs(5400)));
        assert_eq!(o.stream_timeout_jitter, Some(GoDuration::from_millis(500)));
        assert_eq!(o.request_node_metadata.as_deref(), Some("relay-a"));
        assert_eq!(o.backoff.initial_interval, Duration::from_millis(250));
        assert_eq!(o.failback_interval, Duration::from_secs(60));
        assert_eq!(o.max_message_size, 4096);
        assert_eq!(o.max_streams_per_connection, 5);
        assert_eq!(b.logging, Logging { path: Some("/tmp/relay.log".into()), level: LogLevel::Debug });
        assert_eq!(b.cache, CacheConfig { ttl: GoDuration::ZERO, max_entries: 100, persist_dir: None });
        let Some(MetricsSink::Statsd(statsd)) = &b.metrics_sink else { panic!("no statsd") };
        assert_eq!(statsd.root_prefix, "xdsrelay");
        assert_eq!(statsd.flush_interval, Duration::from_secs(5));
    }

    #[test]
    fn protojson_camel_case_names_are_accepted() {
        let text = "
server: {address: {address: 127.0.0.1, portValue: 1}, maxStreams: 5}
originServer:
  address: {address: origin, portValue: 2}
  fallbackAddresses: []
  apiType: AGGREGATED_GRPC
  keepAliveTime: 1m
  streamTimeout: 1m
  streamTimeoutJitter: 1s
  requestNodeMetadata: x
  backoff: {initialInterval: 1s, maxInterval: 2s}
  connectTimeout: 1s
  failbackInterval: 1s
  maxMessageSize: 5000
cache: {ttl: 1s, maxEntries: 3}
admin: {address: {address: 127.0.0.1, portValue: 3}}
metricsSink: {statsd: {address: {address: 127.0.0.1, portValue: 4}, rootPrefix: p, flushInterval: 1s}}
";
        let b = parse(text).unwrap();
        assert_eq!(b.server.max_streams, 5);
        assert_eq!(b.origin_server.api_type, ApiType::AggregatedGrpc);
        assert_eq!(b.origin_server.max_message_size, 5000);
        assert_eq!(b.cache.max_entries, 3);
    }

    #[test]
    fn zero_and_empty_optional_values_mean_none() {
        let text = with(
            "origin_server: {address: {address: origin.example.com, port_value: 18000}}",
            "origin_server: {address: {address: o, port_value: 1}, stream_timeout: 0s, stream_timeout_jitter: 0, request_node_metadata: ''}\nlogging:\nmetrics_sink:",
        );
        let b = parse(&text).unwrap();
        assert_eq!(b.origin_server.stream_timeout, None);
        assert_eq!(b.origin_server.stream_timeout_jitter, None);
        assert_eq!(b.origin_server.request_node_metadata, None);
        assert_eq!(b.logging, Logging::default());
        assert_eq!(b.metrics_sink, None);
    }

    #[test]
    fn serializes_with_snake_case_and_go_durations() {
        let b = parse(MINIMAL).unwrap();
        let json = serde_json::to_value(&b).unwrap();
        assert_eq!(json["server"]["address"]["port_value"], 9991);
        assert_eq!(json["origin_server"]["keep_alive_time"], "5m0s");
        assert_eq!(json["origin_server"]["backoff"]["initial_interval"], "500ms");
        assert_eq!(json["origin_server"]["api_type"], "GRPC");
        assert_eq!(json["origin_server"]["stream_timeout"], serde_json::Value::Null);
        assert_eq!(json["cache"]["ttl"], "1m0s");
        assert_eq!(json["logging"]["level"], "INFO");
        // What we print parses back to the same configuration.
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(parse(&json).unwrap(), b);
    }

    #[test]
    fn log_levels() {
        for (text, level) in
            [("debug", LogLevel::Debug), ("INFO", LogLevel::Info), ("Warn", LogLevel::Warn), ("ERROR", LogLevel::Error)]
        {
            assert_eq!(text.parse::<LogLevel>(), Ok(level));
            assert_eq!(level.as_str().parse::<LogLevel>(), Ok(level));
        }
        assert_eq!(LogLevel::Warn.as_str(), "warn");
        let err = "verbose".parse::<LogLevel>().unwrap_err();
        assert_eq!(err.to_string(), "invalid log level \"verbose\": expected one of debug, info, warn, error");
        let b = parse(&format!("{MINIMAL}logging: {{level: 3}}")).unwrap();
        assert_eq!(b.logging.level, LogLevel::Error);
    }

    #[test]
    fn host_validation() {
        for ok in
            ["127.0.0.1", "::1", "0.0.0.0", "fe80::1", "localhost", "a", "my-host.example.com", "example.com.", "1a.b2"]
        {
            assert_eq!(check_host(ok), Ok(()), "{ok}");
        }
        let long_label = "a".repeat(64);
        let long_host = ["a"; 130].join(".");
        for bad in [
            "",
            "a_b",
            "invalid_hostname.net",
            "-a",
            "a-",
            "a..b",
            ".",
            "[::1]",
            "a b",
            "héllo",
            &long_label,
            &long_host,
            "1.2.3.4:80",
        ] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn admin_auth_token_file_must_hold_a_token() {
        let dir = std::env::temp_dir().join(format!("xds-relay-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let admin = "admin: {address: {address: '::1', port_value: 0}}";
        let with_file = |path: &std::path::Path| {
            with(
                admin,
                &format!(
                    "admin: {{address: {{address: '::1', port_value: 0}}, auth_token_file: '{}'}}",
                    path.display()
                ),
            )
        };
        let good = dir.join("good");
        std::fs::write(&good, "  s3cret-token\n").unwrap();
        let b = parse(&with_file(&good)).unwrap();
        assert_eq!(b.admin.read_auth_token().unwrap().as_deref(), Some("s3cret-token"));
        let json = serde_json::to_string(&b).unwrap();
        assert!(
            json.contains("auth_token_file") && !json.contains("s3cret"),
            "server_info shows the path only: {json}"
        );
        let empty = dir.join("empty");
        std::fs::write(&empty, " \n").unwrap();
        for (path, needle) in [(empty, "holds no token"), (dir.join("missing"), "cannot read")] {
            let err = parse(&with_file(&path)).unwrap_err();
            assert_eq!(err.field, "admin.auth_token_file", "{err}");
            assert!(err.message.contains(needle), "{err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every kind of bootstrap error, with the field path and the words the message must contain.
    #[test]
    fn errors_name_file_field_and_problem() {
        let cases: Vec<(String, &str, &str)> = vec![
            // unknown field
            (format!("{MINIMAL}servre: {{}}"), "servre", "unknown field `servre`"),
            (with("cache: {ttl: 60s}", "cache: {ttl: 60s, ttl2: 1s}"), "cache.ttl2", "unknown field `ttl2`"),
            // missing required fields
            (MINIMAL.replace("cache: {ttl: 60s}", ""), "", "missing field `cache`"),
            (with("cache: {ttl: 60s}", "cache: {max_entries: 1}"), "cache", "missing field `ttl`"),
            (
                with("admin: {address: {address: '::1', port_value: 0}}", "admin: {address: {address: '::1'}}"),
                "admin.address",
                "missing field `port_value`",
            ),
            (
                format!(
                    "{MINIMAL}metrics_sink: {{statsd: {{address: {{address: a, port_value: 1}}, root_prefix: p}}}}"
                ),
                "metrics_sink.statsd",
                "missing field `flush_interval`",
            ),
            // bad durations
            (with("ttl: 60s", "ttl: 5 minutes"), "cache.ttl", "invalid duration \"5 minutes\": unknown unit"),
            (with("ttl: 60s", "ttl: -1s"), "cache.ttl", "must not be negative"),
            (with("ttl: 60s", "ttl: 60"), "cache.ttl", "missing unit"),
            (
                with("port_value: 18000}}", "port_value: 18000}, keep_alive_time: 1x}"),
                "origin_server.keep_alive_time",
                "unknown unit \"x\"",
            ),
            (
                with("port_value: 18000}}", "port_value: 18000}, keep_alive_time: 0s}"),
                "origin_server.keep_alive_time",
                "greater than 0s",
            ),
            (
                with("port_value: 18000}}", "port_value: 18000}, connect_timeout: 0s}"),
                "origin_server.connect_timeout",
                "greater than 0s",
            ),
            (
                with("port_value: 18000}}", "port_value: 18000}, failback_interval: 0s}"),
                "origin_server.failback_interval",
                "greater than 0s",
            ),
            (
                with("port_value: 18000}}", "port_value: 18000}, backoff: {initial_interval: 0s}}"),
                "origin_server.backoff.initial_interval",
                "greater than 0s",
            ),
            (
                with("port_value: 18000}}", "port_value: 18000}, backoff: {initial_interval: 1m}}"),
                "origin_server.backoff.max_interval",
                "must not be less than initial_interval 1m0s",
            ),
            (
                with("port_value: 18000}}", "port_value: 18000}, stream_timeout: soon}"),
                "origin_server.stream_timeout",
                "invalid duration \"soon\"",
            ),
            // bad addresses and ports
            (
                with("origin.example.com", "a_b"),
                "origin_server.address.address",
                "invalid address \"a_b\": must be a hostname or an IP address",
            ),
            (with("127.0.0.1", "''"), "server.address.address", "invalid address \"\""),
            (
                with(
                    "port_value: 18000}}",
                    "port_value: 18000}, fallback_addresses: [{address: 'x y', port_value: 1}]}",
                ),
                "origin_server.fallback_addresses[0].address",
                "invalid address \"x y\"",
            ),
            (
                with("port_value: 9991", "port_value: 70000"),
                "server.address.port_value",
                "port 70000 is out of range (0-65535)",
            ),
            (
                with("port_value: 9991", "port_value: -1"),
                "server.address.port_value",
                "port -1 is out of range (0-65535)",
            ),
            (with("port_value: 9991", "port_value: nine"), "server.address.port_value", "invalid integer \"nine\""),
            (with("port_value: 9991", "port_value: [1]"), "server.address.port_value", "expected an integer"),
            // bad enums
            (
                with("port_value: 18000}}", "port_value: 18000}, api_type: REST}"),
                "origin_server.api_type",
                "unknown variant `REST`, expected one of `GRPC`",
            ),
            (
                format!("{MINIMAL}logging: {{level: verbose}}"),
                "logging.level",
                "invalid log level \"verbose\": expected one of debug, info, warn, error",
            ),
            (format!("{MINIMAL}logging: {{level: 7}}"), "logging.level", "invalid log level \"7\""),
            // oneof
            (format!("{MINIMAL}metrics_sink: {{}}"), "metrics_sink", "one of `statsd` must be set"),
            (
                format!("{MINIMAL}metrics_sink: {{prometheus: {{}}}}"),
                "metrics_sink.prometheus",
                "unknown field `prometheus`",
            ),
            // limits
            (with("port_value: 9991}", "port_value: 9991}, max_streams: 0"), "server.max_streams", "greater than 0"),
            (
                with("port_value: 9991}", "port_value: 9991}, max_streams: -3"),
                "server.max_streams",
                "must not be negative",
            ),
            (
                with("port_value: 18000}}", "port_value: 18000}, max_message_size: 100}"),
                "origin_server.max_message_size",
                "at least 4096 bytes",
            ),
            (
                with("port_value: 18000}}", "port_value: 18000}, max_streams_per_connection: 0}"),
                "origin_server.max_streams_per_connection",
                "must be between 1 and 1000000, got 0",
            ),
            (
                with("port_value: 18000}}", "port_value: 18000}, max_streams_per_connection: 2000000}"),
                "origin_server.max_streams_per_connection",
                "must be between 1 and 1000000, got 2000000",
            ),
            (
                format!(
                    "{MINIMAL}metrics_sink: {{statsd: {{address: {{address: a, port_value: 1}}, flush_interval: 1s}}}}"
                ),
                "metrics_sink.statsd.root_prefix",
                "at least 1 character",
            ),
            // wrong types and shapes
            (with("cache: {ttl: 60s}", "cache: [60s]"), "cache", "invalid type: sequence"),
            ("[]".to_string(), "", "invalid type: sequence"),
        ];
        for (text, field, needle) in cases {
            let err = parse(&text).expect_err(&text);
            assert_eq!(err.file, "bootstrap.yaml", "{err}");
            assert_eq!(err.field, field, "{err}");
            assert!(err.message.contains(needle), "{err} does not contain {needle:?}");
            assert!(err.to_string().starts_with("bootstrap.yaml: "), "{err}");
            assert!(!err.message.ends_with('.'), "{err}");
        }
    }

    #[test]
    fn pass_through_unmapped_is_off_unless_set_and_must_be_a_boolean() {
        assert!(!parse(MINIMAL).unwrap().server.pass_through_unmapped);
        let on = "server: {address: {address: 127.0.0.1, port_value: 9991}, pass_through_unmapped: true}";
        let b = parse(&with("server: {address: {address: 127.0.0.1, port_value: 9991}}", on)).unwrap();
        assert!(b.server.pass_through_unmapped);
        let camel = "server: {address: {address: 127.0.0.1, port_value: 9991}, passThroughUnmapped: true}";
        assert!(
            parse(&with("server: {address: {address: 127.0.0.1, port_value: 9991}}", camel))
                .unwrap()
                .server
                .pass_through_unmapped
        );
        let bad = "server: {address: {address: 127.0.0.1, port_value: 9991}, pass_through_unmapped: sometimes}";
        let error = parse(&with("server: {address: {address: 127.0.0.1, port_value: 9991}}", bad)).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("bootstrap.yaml") && message.contains("pass_through_unmapped"), "{message}");
    }

    #[test]
    fn persist_dir_is_checked_without_changes_and_created_private_at_start() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        assert_eq!(parse(MINIMAL).unwrap().cache.persist_dir, None, "off unless set");
        let dir = base.path().join("a/b");
        let text = with("cache: {ttl: 60s}", &format!("cache: {{ttl: 60s, persistDir: '{}'}}", dir.display()));
        let cache = parse(&text).unwrap().cache;
        assert_eq!(cache.persist_dir.as_deref(), Some(dir.as_path()));
        assert!(!dir.exists(), "validating changes nothing");
        cache.prepare_persist_dir().unwrap();
        assert!(dir.is_dir(), "created at start when missing");
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the write probe leaves nothing behind");

        let file = base.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let shared = base.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let cases = [
            (file.display().to_string(), "is not a directory"),
            (String::new(), "must not be empty"),
            (shared.display().to_string(), "writable by its group or by other users"),
        ];
        for (path, needle) in cases {
            let text = with("cache: {ttl: 60s}", &format!("cache: {{ttl: 60s, persist_dir: '{path}'}}"));
            let err = parse(&text).expect_err(&path);
            assert_eq!(err.field, "cache.persist_dir", "{err}");
            assert!(err.message.contains(needle), "{err} does not contain {needle:?}");
        }
        // Root writes anywhere: the read-only case only holds for other users.
        let read_only = base.path().join("read-only");
        std::fs::create_dir(&read_only).unwrap();
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o500)).unwrap();
        if tempfile::tempfile_in(&read_only).is_err() {
            let text =
                with("cache: {ttl: 60s}", &format!("cache: {{ttl: 60s, persist_dir: '{}'}}", read_only.display()));
            let err = parse(&text).unwrap().cache.prepare_persist_dir().expect_err("read-only");
            assert!(err.message.contains("is not writable"), "{err}");
        }
    }
}
