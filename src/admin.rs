//! The admin HTTP API (axum), compatible with xds-relay's, plus Prometheus metrics.
//!
//! | endpoint | method | answer |
//! |---|---|---|
//! | `/` | GET | plain-text list of the endpoints |
//! | `/cache`, `/cache/{key}`, `/cache/{prefix}*` | GET | `{"Cache":[…]}`: per key its version, resources as JSON, clients, `"PassThrough": true` on a private pass-through key (`/cache/passthrough/*` lists them) and `"Stale": true` on a key served from its last-known-good state on disk until a live source delivers (also `"stale"` in `Upstream`); `?verbose=true` adds every client's acked version and last NACK; empty body when nothing matches |
//! | `/cache/clear`, `/cache/clear/{key}`, `/cache/clear/{prefix}*` | POST | clears: an idle key is removed; a key with clients is refetched while its clients keep the cached state (an unchanged version reaches nobody); one refetch per key at a time and at most one per second: a clear while one is pending or scheduled joins it, and the answer says so |
//! | `/cache/keys` | GET | `{"Names":[…]}` |
//! | `/cache/version/{key}` | GET | `{"Version":"…"}`, 404 `{"Message":…}` when absent |
//! | `/cache/eds/{key}` | GET | `{"Key","Version","Endpoints":["ip:port",…]}` of an EDS key |
//! | `/log_level`, `/log_level/{level}` | POST | reports or sets the level of every component |
//! | `/ready`, `/ready/{true,false}` | GET, POST | 200 when ready, 500 when not; POST sets it |
//! | `/server_info` | GET | the bootstrap in force, as JSON |
//! | `/metrics` | GET | Prometheus text format (every metric is listed in the README's "Metrics" section) |
//! | `/api/cluster` | GET | the whole cluster: members (each `verified` or not), unverified entries hidden behind a member of the same name, ring tokens, every active key with its owner (for a private pass-through key, `pass_through: true` and the node serving it), followers, clients, version, `stale` when some node serves it from disk not yet confirmed by a live source, staged rollout phase (`rollout`: `baking`, `held`, `aborted` or empty) (merged from every live member) |
//! | `/api/cluster/local` | GET | this node's keys and their sources |
//! | `/ring` | GET | the ring page: members, the ring drawn as SVG with each key placed on it, a filterable key table |
//! | `/rollout` | GET | `{"configured", "rollouts":[…]}`: every key with a version in staged rollout: phase (`baking`, `held`, `aborted`), candidate and stable versions, canaries with their answer and NACK message (on the owner, followers' canaries with their `relay`), ACK and NACK counts, seconds left in the bake, reason of a hold; on the owner each follower's report (`followers`), on a follower `decided_by_owner` |
//! | `/rollout/{key}/promote`, `/rollout/{key}/abort` | POST | promote: every client is served the candidate; abort: every client is served the stable version (the canaries are rolled back) and the candidate stays blocked until a newer version; 404 `{"Message"}` for a key without staged rollout, 409 when nothing is in rollout or another node owns the key |
//!
//! Invariants:
//! - no endpoint blocks the relay: every handler reads snapshots of the cache;
//! - only POST changes anything; GET and HEAD of a mutating endpoint answer 405 and change
//!   nothing, and every other method passes [`guard`] first: cross-site calls are refused,
//!   and with `admin.auth_token_file` a bearer token is required;
//! - resources are shown without secret material (private keys, session ticket keys, generic
//!   secrets are `"[redacted]"`, see [`redact`]); `/server_info` shows file paths, never file
//!   content. What GET shows is configuration: bind the admin port where only operators reach it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::KeyState;
use crate::config::{Bootstrap, LogLevel};
use crate::node_cache::Entry;
use crate::relay::{ClearOutcome, Relay};
use crate::telemetry::{LogControl, Metrics};
use crate::{wire, xds};

pub mod guard;
pub mod redact;
mod rollout;

pub use guard::AdminGuard;

/// Everything the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The relay.
    pub relay: Arc<Relay>,
    /// The metrics registry.
    pub metrics: Metrics,
    /// The log level control.
    pub log: LogControl,
    /// The readiness flag behind `/ready`.
    pub ready: Arc<AtomicBool>,
    /// The bootstrap in force.
    pub bootstrap: Arc<Bootstrap>,
    /// The guard in front of every mutating call (token and cross-site checks).
    pub guard: AdminGuard,
}

const INDEX: &str = "admin commands are:
  /                              this list
  /cache/{key}                   cached state of a key ('*' suffix: prefix match; empty: all); ?verbose=true adds clients
  /cache/clear/{key}             POST: clear a key (prefix with '*'; empty: all)
  /cache/keys                    the aggregation keys in the cache
  /cache/version/{key}           the version of a key
  /cache/eds/{key}               the endpoint addresses of an EDS key
  /log_level/{level}             POST: set the log level (debug, info, warn, error); without a level: show it
  /ready                         GET: 200 when ready, 500 when not; POST /ready/true|false sets it
  /server_info                   the bootstrap configuration in force
  /metrics                       Prometheus metrics
  /api/cluster                   the whole cluster as JSON: members, ring, keys with owners and followers
  /api/cluster/local             this node's keys and their sources
  /ring                          the ring page
  /rollout                       keys in staged rollout: phase, versions, canaries, ACKs, NACK messages, bake left
  /rollout/{key}/promote         POST: serve the key's version in rollout to every client
  /rollout/{key}/abort           POST: keep the stable version and roll the canaries back to it
";

/// The admin routes over `state`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(|| async { INDEX }))
        .route("/cache", any(cache_dump_all))
        .route("/cache/", any(cache_dump_all))
        .route("/cache/{*key}", any(cache_dump))
        .route("/cache/keys", any(cache_keys))
        .route("/cache/keys/", any(cache_keys))
        .route("/cache/version/{*key}", any(cache_version))
        .route("/cache/eds/{*key}", any(cache_eds))
        .route("/cache/clear", any(cache_clear_all))
        .route("/cache/clear/", any(cache_clear_all))
        .route("/cache/clear/{*key}", any(cache_clear))
        .route("/log_level", any(log_level_show))
        .route("/log_level/", any(log_level_show))
        .route("/log_level/{level}", any(log_level_set))
        .route("/ready", any(ready_get))
        .route("/ready/", any(ready_get))
        .route("/ready/{value}", any(ready_set))
        .route("/server_info", any(server_info))
        .route("/server_info/", any(server_info))
        .route("/metrics", get(metrics))
        .route("/ring", get(ring_page))
        .route("/api/cluster", get(cluster_view))
        .route("/api/cluster/local", get(cluster_local))
        .route("/rollout", get(rollout::list))
        .route("/rollout/", get(rollout::list))
        .route("/rollout/{*path}", any(rollout::act))
        .layer(axum::middleware::from_fn_with_state(state.guard.clone(), guard::enforce))
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` fires; with `tls`, over TLS (HTTP/1.1
/// or HTTP/2 by ALPN). At most `max_connections` connections are open at once (the admin's
/// own cap, [`crate::listener::ADMIN_MAX_CONNECTIONS`], so it answers while xDS is full), and
/// each must finish its TLS handshake and send its first request line within
/// `limits.handshake_timeout` ([`crate::listener`]).
///
/// # Errors
/// Fails when the HTTP server fails.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    tls: Option<crate::tls::TlsAcceptor>,
    max_connections: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use crate::listener::{self, ListenerSettings, Protocol};
    let gates = ListenerSettings {
        name: "admin",
        max_connections,
        handshake_timeout: *state.bootstrap.limits.handshake_timeout,
        protocol: Protocol::Http,
    };
    let metrics = state.metrics.clone();
    let tasks = tokio_util::task::TaskTracker::new();
    // The accept loop also stops when the server fails.
    let accepting = shutdown.child_token();
    let stopped = shutdown.cancelled_owned();
    let served = match tls {
        None => {
            let incoming = listener::accept_plain(listener, gates, metrics, &tasks, accepting.clone());
            axum::serve(incoming, router(state)).with_graceful_shutdown(stopped).await
        }
        Some(acceptor) => {
            let incoming = listener::accept_tls(listener, gates, acceptor, metrics, &tasks, accepting.clone());
            axum::serve(incoming, router(state)).with_graceful_shutdown(stopped).await
        }
    };
    accepting.cancel();
    tasks.close();
    tasks.wait().await;
    served
}

fn message(status: StatusCode, text: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "Message": text.into() }))).into_response()
}

fn pretty(value: &Value) -> Response {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"Message\":\"{e}\"}}"));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Refuses every method but POST on a mutating endpoint (405 with `Allow: POST`).
fn only_post(method: &axum::http::Method) -> Option<Response> {
    (method != axum::http::Method::POST).then(|| {
        let mut refusal = message(StatusCode::METHOD_NOT_ALLOWED, "use POST: this endpoint changes the relay");
        refusal.headers_mut().insert(header::ALLOW, axum::http::HeaderValue::from_static("POST"));
        refusal
    })
}

/// Entries selected by a key pattern: exact, `prefix*`, or all when empty or `*`.
fn select(state: &AdminState, pattern: &str) -> Vec<Arc<Entry>> {
    let pattern = pattern.trim_start_matches('/');
    let entries = state.relay.cache().entries();
    match pattern.strip_suffix('*') {
        Some(prefix) => entries.into_iter().filter(|e| e.key.starts_with(prefix)).collect(),
        None if pattern.is_empty() => entries,
        None => entries.into_iter().filter(|e| e.key == pattern).collect(),
    }
}

#[derive(Deserialize, Default)]
struct DumpQuery {
    verbose: Option<String>,
}

async fn cache_dump_all(State(state): State<AdminState>, Query(query): Query<DumpQuery>) -> Response {
    dump(&state, "", &query)
}

async fn cache_dump(
    State(state): State<AdminState>,
    Path(key): Path<String>,
    Query(query): Query<DumpQuery>,
) -> Response {
    dump(&state, &key, &query)
}

fn dump(state: &AdminState, pattern: &str, query: &DumpQuery) -> Response {
    let verbose = query.verbose.as_deref().is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let entries = select(state, pattern);
    if entries.is_empty() {
        return StatusCode::OK.into_response();
    }
    let ttl = *state.bootstrap.cache.ttl;
    let cache: Vec<Value> =
        entries.iter().map(|e| entry_json(e, verbose, ttl, state.relay.is_pass_through(&e.key))).collect();
    pretty(&json!({ "Cache": cache }))
}

/// One key of `/cache`; a private pass-through key also has `"PassThrough": true`, a key
/// served from disk not yet confirmed by a live source `"Stale": true`.
fn entry_json(entry: &Entry, verbose: bool, ttl: Duration, pass_through: bool) -> Value {
    let key_state = entry.state();
    let resp = key_state.is_ready().then(|| {
        json!({
            "VersionInfo": key_state.version_info,
            "TypeURL": key_state.type_url,
            "Canary": key_state.meta.canary,
            "ControlPlane": key_state.meta.control_plane.as_ref().map(|cp| json!({ "identifier": cp.identifier })),
            "ReceivedAt": unix_seconds(key_state.received_wall),
            "Resources": resources_json(&key_state),
            "ResourceErrors": key_state.meta.resource_errors.iter().map(|e| json!({
                "Name": crate::cache::error_name(e),
                "Code": e.error_detail.as_ref().map_or(0, |d| d.code),
                "Message": e.error_detail.as_ref().map(|d| crate::telemetry::truncate_message(&d.message).into_owned()),
            })).collect::<Vec<_>>(),
            "DoNotCache": key_state.resources.iter().filter(|r| r.do_not_cache).filter_map(|r| r.name.as_deref()).collect::<Vec<_>>(),
        })
    });
    let expiration = match entry.idle_since() {
        Some(since) if !ttl.is_zero() => {
            let left = ttl.saturating_sub(since.elapsed());
            Value::from(unix_seconds(SystemTime::now() + left))
        }
        _ => Value::Null,
    };
    let mut value = json!({
        "Key": entry.key,
        "Resp": resp,
        "NumRequests": entry.watcher_count(),
        "ExpirationTime": expiration,
        "Upstream": entry.source.status(),
    });
    if pass_through {
        value["PassThrough"] = Value::Bool(true);
    }
    if entry.source.is_stale() {
        // Last-known-good from disk: no live source has delivered since the node started.
        value["Stale"] = Value::Bool(true);
    }
    if verbose {
        value["Requests"] = serde_json::to_value(entry.clients()).unwrap_or(Value::Null);
    }
    value
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Resources grouped like xds-relay's dump: `Clusters`, `Endpoints`, … , `Unmarshalled`.
fn resources_json(state: &KeyState) -> Value {
    let group = match state.type_url.as_str() {
        xds::ENDPOINT => "Endpoints",
        xds::CLUSTER => "Clusters",
        xds::ROUTE => "Routes",
        xds::LISTENER => "Listeners",
        xds::SECRET => "Secrets",
        xds::RUNTIME => "Runtimes",
        _ => "Unmarshalled",
    };
    let rendered: Vec<Value> = state.resources.iter().map(|r| any_json(&r.any)).collect();
    json!({ group: rendered })
}

/// The Envoy API descriptors, decoded once: `admin/envoy-api-descriptors.bin` is the
/// FileDescriptorSet of every .proto envoy-types ships, rebuilt byte for byte by `make
/// descriptors` (scripts/regen-descriptors.sh) when envoy-types is upgraded.
fn descriptors() -> Option<&'static DescriptorPool> {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(include_bytes!("admin/envoy-api-descriptors.bin").as_slice())
            .map_err(|e| tracing::warn!(error = %e, "cannot load the Envoy API descriptors; resources are shown by size only"))
            .ok()
    })
    .as_ref()
}

/// A resource as protobuf JSON, with secret material redacted (see [`redact`]); unknown or
/// undecodable types show their type and size.
fn any_json(any: &Any) -> Value {
    let mut value = any_json_unredacted(any);
    redact::redact(&mut value);
    value
}

fn any_json_unredacted(any: &Any) -> Value {
    let fallback = || json!({ "@type": any.type_url, "name": wire::resource_name(any), "bytes": any.value.len() });
    let Some(pool) = descriptors() else { return fallback() };
    let message_name = any.type_url.rsplit('/').next().unwrap_or_default();
    let Some(descriptor) = pool.get_message_by_name(message_name) else { return fallback() };
    match DynamicMessage::decode(descriptor, any.value.as_slice()) {
        Ok(message) => match serde_json::to_value(&message) {
            Ok(Value::Object(mut fields)) => {
                let mut out = serde_json::Map::new();
                out.insert("@type".into(), Value::from(any.type_url.clone()));
                out.append(&mut fields);
                Value::Object(out)
            }
            Ok(other) => other,
            Err(_) => fallback(),
        },
        Err(_) => fallback(),
    }
}

async fn cache_keys(State(state): State<AdminState>) -> Response {
    let names: Vec<String> = state.relay.cache().entries().iter().map(|e| e.key.clone()).collect();
    pretty(&json!({ "Names": names }))
}

async fn cache_version(State(state): State<AdminState>, Path(key): Path<String>) -> Response {
    match state.relay.cache().get(&key) {
        Some(entry) if entry.state().is_ready() => pretty(&json!({ "Version": entry.state().version_info })),
        Some(_) => message(StatusCode::NOT_FOUND, format!("key {key} has no response from its source yet")),
        None => message(StatusCode::NOT_FOUND, format!("no cache entry for key {key}")),
    }
}

async fn cache_eds(State(state): State<AdminState>, Path(key): Path<String>) -> Response {
    let Some(entry) = state.relay.cache().get(&key) else {
        return message(StatusCode::NOT_FOUND, format!("no cache entry for key {key}"));
    };
    if entry.type_url != xds::ENDPOINT {
        return message(
            StatusCode::BAD_REQUEST,
            format!("key {key} holds {} resources, not endpoints", entry.type_url),
        );
    }
    let key_state = entry.state();
    let mut endpoints = Vec::new();
    for resource in &key_state.resources {
        let Ok(cla) = ClusterLoadAssignment::decode(resource.any.value.as_slice()) else { continue };
        for locality in &cla.endpoints {
            for lb in &locality.lb_endpoints {
                let Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(endpoint)) =
                    &lb.host_identifier
                else {
                    continue;
                };
                if let Some(AddressKind::SocketAddress(socket)) =
                    endpoint.address.as_ref().and_then(|a| a.address.as_ref())
                {
                    endpoints.push(socket.address.clone());
                }
            }
        }
    }
    pretty(&json!({ "Key": key, "Version": key_state.version_info, "Endpoints": endpoints }))
}

async fn cache_clear_all(State(state): State<AdminState>, method: axum::http::Method) -> Response {
    if let Some(refusal) = only_post(&method) {
        return refusal;
    }
    clear(&state, "")
}

async fn cache_clear(State(state): State<AdminState>, method: axum::http::Method, Path(key): Path<String>) -> Response {
    if let Some(refusal) = only_post(&method) {
        return refusal;
    }
    clear(&state, &key)
}

fn clear(state: &AdminState, pattern: &str) -> Response {
    let keys: Vec<String> = if pattern.is_empty() || pattern.ends_with('*') {
        select(state, pattern).iter().map(|e| e.key.clone()).collect()
    } else {
        vec![pattern.to_owned()]
    };
    let (mut joined, mut scheduled) = (Vec::new(), Vec::new());
    for key in &keys {
        match state.relay.clear(key) {
            ClearOutcome::NotFound => {
                return message(StatusCode::OK, format!("unable to delete entry for nonexistent key: {key}"));
            }
            ClearOutcome::Coalesced => joined.push(key.as_str()),
            ClearOutcome::Scheduled => scheduled.push(key.as_str()),
            ClearOutcome::Removed | ClearOutcome::Refetched => {}
        }
    }
    let spacing = crate::relay::REFETCH_SPACING.as_secs();
    let mut parts = Vec::new();
    if !joined.is_empty() {
        parts.push(format!("a refetch is already pending for {}: this clear joins it", joined.join(", ")));
    }
    if !scheduled.is_empty() {
        parts.push(format!(
            "refetch of {} scheduled: a key is refetched at most once every {spacing}s",
            scheduled.join(", ")
        ));
    }
    if parts.is_empty() { StatusCode::OK.into_response() } else { message(StatusCode::OK, parts.join("; ")) }
}

async fn log_level_show(State(state): State<AdminState>, method: axum::http::Method) -> Response {
    if let Some(refusal) = only_post(&method) {
        return refusal;
    }
    format!("Current log level: {}\n", state.log.level().as_str()).into_response()
}

async fn log_level_set(
    State(state): State<AdminState>,
    method: axum::http::Method,
    Path(level): Path<String>,
) -> Response {
    if let Some(refusal) = only_post(&method) {
        return refusal;
    }
    let Ok(parsed) = level.parse::<LogLevel>() else {
        return (StatusCode::BAD_REQUEST, format!("Invalid log level: {level}\n")).into_response();
    };
    if let Err(e) = state.log.set_level(parsed) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response();
    }
    tracing::info!(level = parsed.as_str(), "log level changed");
    format!("Current log level: {}\n", parsed.as_str()).into_response()
}

async fn ready_get(State(state): State<AdminState>, method: axum::http::Method) -> Response {
    if method != axum::http::Method::GET && method != axum::http::Method::HEAD {
        return message(StatusCode::METHOD_NOT_ALLOWED, "use GET, or POST /ready/true|false");
    }
    if state.ready.load(Ordering::Acquire) { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR }.into_response()
}

async fn ready_set(State(state): State<AdminState>, method: axum::http::Method, Path(value): Path<String>) -> Response {
    if let Some(refusal) = only_post(&method) {
        return refusal;
    }
    let ready = match value.as_str() {
        "true" => true,
        "false" => false,
        _ => return message(StatusCode::INTERNAL_SERVER_ERROR, "Only true/false values accepted for ready endpoint"),
    };
    state.ready.store(ready, Ordering::Release);
    tracing::info!(ready, "readiness changed through the admin API");
    StatusCode::OK.into_response()
}

async fn server_info(State(state): State<AdminState>) -> Response {
    pretty(&serde_json::to_value(state.bootstrap.as_ref()).unwrap_or(Value::Null))
}

async fn metrics(State(state): State<AdminState>) -> Response {
    // Gauges over every key (`keys`, `keys_without_source`) are counted now, from a snapshot.
    state.relay.refresh_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render()).into_response()
}

// === cluster view ===

/// `GET /ring`: the ring page (self-contained HTML reading `/api/cluster`).
async fn ring_page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("admin/ring.html")).into_response()
}

/// `GET /api/cluster/local`: this node's keys.
async fn cluster_local(State(state): State<AdminState>) -> Response {
    use crate::peer::server::KeyOwner as _;
    pretty(&json!(state.relay.status()))
}

/// `GET /api/cluster`: members, ring and every active key of the whole cluster, merged from
/// the status of every live member (asked over the peer protocol, 1 s timeout each).
async fn cluster_view(State(state): State<AdminState>) -> Response {
    use crate::peer::server::KeyOwner as _;
    use crate::status::{KeyReport, NodeReport};
    use xds_relay_cluster::Ring;

    let Some(membership) = state.relay.membership() else {
        return message(StatusCode::NOT_FOUND, "this relay runs alone: no cluster section in its bootstrap");
    };
    let view = membership.cluster.view();
    let fraction = |position: u64| position as f64 / 2f64.powi(64);
    let mut replies: Vec<NodeReport> = vec![state.relay.status()];
    let mut errors: Vec<String> = Vec::new();
    let asks = view.live_members().filter(|m| !m.is_self).filter_map(|m| Some((m.name.clone(), m.peer_addr?))).map(
        |(name, addr)| {
            let channel = membership.followers.channels.get(addr, &name);
            async move {
                crate::peer::status::fetch_status(channel, Duration::from_secs(1))
                    .await
                    .map_err(|error| format!("{name}: {error}"))
            }
        },
    );
    for reply in futures_util::future::join_all(asks).await {
        match reply {
            Ok(reply) => replies.push(reply),
            Err(error) => errors.push(error),
        }
    }
    let mut keys: std::collections::BTreeMap<String, Vec<(String, KeyReport)>> = Default::default();
    for reply in replies {
        for key in reply.keys {
            keys.entry(key.key.clone()).or_default().push((reply.node.clone(), key));
        }
    }
    let keys: Vec<Value> = keys
        .into_iter()
        .map(|(key, nodes)| {
            // A private pass-through key is served by the node its client is connected to,
            // whatever the ring says.
            let pass_through = state.relay.is_pass_through(&key);
            let owner = match nodes.first() {
                Some((node, _)) if pass_through => Some(node.clone()),
                _ => view.ring.owner(&key).map(str::to_owned),
            };
            let primary =
                nodes.iter().find(|(n, _)| Some(n) == owner.as_ref()).or_else(|| nodes.first()).map(|(_, k)| k);
            let mut followers: Vec<String> = nodes
                .iter()
                .filter(|(n, k)| Some(n) != owner.as_ref() && k.source.is_peer())
                .map(|(n, _)| n.clone())
                .collect();
            followers.sort();
            json!({
                "key": key,
                "pass_through": pass_through,
                "type_url": primary.map(|k| k.type_url.clone()),
                "position": fraction(Ring::position(&key)),
                "owner": owner,
                "followers": followers,
                "version": primary.map(|k| k.version.clone()),
                "age_seconds": primary.map(|k| k.age_seconds),
                "local_clients": nodes.iter().map(|(_, k)| k.local_clients).sum::<u64>(),
                "nacks": nodes.iter().map(|(_, k)| k.nacks).sum::<u64>(),
                // Some node serves the key from disk, not yet confirmed by a live source.
                "stale": nodes.iter().any(|(_, k)| k.stale),
                // A key held anywhere shows as held; else in rollout wherever it is.
                "rollout": nodes.iter().map(|(_, k)| k.rollout.as_str()).max_by_key(|r| match *r {
                    "held" => 3,
                    "aborted" => 2,
                    "baking" => 1,
                    _ => 0,
                }).unwrap_or_default(),
                "nodes": nodes.iter().map(|(n, k)| {
                    let mut v = json!(k);
                    v["node"] = Value::from(n.clone());
                    v
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let tokens: Vec<Value> = view
        .ring
        .tokens()
        .into_iter()
        .map(|(position, owner)| json!({ "position": fraction(position), "owner": owner }))
        .collect();
    pretty(&json!({
        "node": membership.cluster.self_name(),
        "cluster_id": state.bootstrap.cluster.as_ref().map(|c| c.cluster_id.clone()),
        "view_version": view.version,
        "members": view.members,
        "unverified": view.unverified,
        "ring": { "virtual_nodes": view.ring.virtual_nodes(), "tokens": tokens },
        "keys": keys,
        "errors": errors,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        GenericSecret, Secret, TlsCertificate, TlsSessionTicketKeys, secret,
    };
    use tokio_util::task::TaskTracker;
    use tower::ServiceExt as _;

    use crate::config::{parse_bootstrap, parse_rules};
    use crate::keyer::Keyer;
    use crate::node_cache::Cache;
    use crate::upstream::Origin;

    const BOOTSTRAP: &str = "
server: {address: {address: 127.0.0.1, port_value: 0}}
origin_server: {address: {address: 127.0.0.1, port_value: 1}}
cache: {ttl: 60s}
admin: {address: {address: 127.0.0.1, port_value: 0}}
";

    /// An admin state over a real relay (no client, no origin reached); with `token`, a
    /// token file holding it is configured.
    fn state(token: Option<&str>) -> AdminState {
        let mut bootstrap = parse_bootstrap(BOOTSTRAP, "bootstrap.yaml").unwrap();
        if let Some(token) = token {
            let path = std::env::temp_dir().join(format!("xds-relay-admin-token-{}-{token}", std::process::id()));
            std::fs::write(&path, format!("{token}\n")).unwrap();
            bootstrap.admin.auth_token_file = Some(path);
        }
        let metrics = Metrics::new();
        let rules =
            parse_rules(include_str!("../example/config/aggregation-rules.yaml"), "aggregation-rules.yaml").unwrap();
        let cache = Arc::new(Cache::new(bootstrap.cache.clone(), metrics.clone()));
        let origin =
            Origin::new(&bootstrap.origin_server, None, &metrics, TaskTracker::new(), Default::default()).unwrap();
        let relay = Relay::new(Keyer::new(&rules).unwrap(), cache, origin, None, metrics.clone(), Default::default());
        AdminState {
            relay: Arc::new(relay),
            guard: AdminGuard::new(&bootstrap.admin, metrics.clone()).unwrap(),
            metrics,
            log: LogControl::detached(LogLevel::Info),
            ready: Arc::new(AtomicBool::new(true)),
            bootstrap: Arc::new(bootstrap),
        }
    }

    async fn call(state: &AdminState, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let mut request = Request::builder().method(method).uri(path).header("host", "127.0.0.1:6070");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        router(state.clone()).oneshot(request.body(Body::empty()).unwrap()).await.unwrap()
    }

    fn rejected(state: &AdminState, reason: &str) -> bool {
        state.metrics.render().contains(&format!("xds_relay_admin_rejected_total{{reason=\"{reason}\"}} 1"))
    }

    #[tokio::test]
    async fn a_token_guards_every_post_and_reads_stay_open() {
        let state = state(Some("t0ken"));
        let missing = call(&state, "POST", "/ready/false", &[]).await;
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(missing.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let wrong = call(&state, "POST", "/ready/false", &[("authorization", "Bearer nope")]).await;
        assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
        assert!(state.ready.load(Ordering::Acquire), "refused calls change nothing");
        for path in ["/cache/clear", "/cache/clear/k", "/log_level", "/log_level/debug"] {
            assert_eq!(call(&state, "POST", path, &[]).await.status(), StatusCode::UNAUTHORIZED, "{path}");
        }
        assert_eq!(state.log.level(), LogLevel::Info);
        assert!(rejected(&state, "wrong_token"));

        let right = call(&state, "POST", "/ready/false", &[("authorization", "Bearer t0ken")]).await;
        assert_eq!(right.status(), StatusCode::OK);
        assert!(!state.ready.load(Ordering::Acquire));
        let level = call(&state, "POST", "/log_level/debug", &[("authorization", "Bearer t0ken")]).await;
        assert_eq!(level.status(), StatusCode::OK);

        for path in ["/cache/keys", "/cache", "/server_info", "/metrics", "/"] {
            assert_eq!(call(&state, "GET", path, &[]).await.status(), StatusCode::OK, "{path}");
        }
    }

    #[tokio::test]
    async fn cross_site_posts_are_refused_even_without_a_token() {
        let state = state(None);
        let evil = call(&state, "POST", "/ready/false", &[("origin", "https://evil.example")]).await;
        assert_eq!(evil.status(), StatusCode::FORBIDDEN);
        assert!(rejected(&state, "cross_origin"));
        let null = call(&state, "POST", "/ready/false", &[("origin", "null")]).await;
        assert_eq!(null.status(), StatusCode::FORBIDDEN);
        let site = call(&state, "POST", "/ready/false", &[("sec-fetch-site", "cross-site")]).await;
        assert_eq!(site.status(), StatusCode::FORBIDDEN);
        assert!(rejected(&state, "cross_site"));
        assert!(state.ready.load(Ordering::Acquire), "refused calls change nothing");
        // The admin's own page (same origin) and tools that send no Origin are let through.
        let own = call(&state, "POST", "/ready/false", &[("origin", "http://127.0.0.1:6070")]).await;
        assert_eq!(own.status(), StatusCode::OK);
        assert!(!state.ready.load(Ordering::Acquire));
        assert_eq!(call(&state, "POST", "/ready/true", &[]).await.status(), StatusCode::OK);
        assert!(state.ready.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_get_of_a_mutating_path_changes_nothing() {
        let state = state(None);
        for (path, _) in [("/ready/false", ()), ("/log_level/debug", ()), ("/cache/clear", ()), ("/cache/clear/k", ())]
        {
            let response = call(&state, "GET", path, &[]).await;
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
            assert_eq!(response.headers()[header::ALLOW], "POST", "{path}");
        }
        assert!(state.ready.load(Ordering::Acquire));
        assert_eq!(state.log.level(), LogLevel::Info);
    }

    #[test]
    fn a_secret_is_shown_without_its_private_material() {
        let inline = |bytes: &[u8]| DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
            ..Default::default()
        };
        let secret = Secret {
            name: "server-cert".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(inline(b"PUBLIC-CHAIN")),
                private_key: Some(inline(b"PRIVATE-KEY-BYTES")),
                ..Default::default()
            })),
        };
        let tickets = Secret {
            name: "tickets".into(),
            r#type: Some(secret::Type::SessionTicketKeys(TlsSessionTicketKeys { keys: vec![inline(b"TICKET-KEY")] })),
        };
        let generic = Secret {
            name: "hmac".into(),
            r#type: Some(secret::Type::GenericSecret(GenericSecret {
                secret: Some(inline(b"HMAC-SECRET")),
                ..Default::default()
            })),
        };
        let hidden_paths: [&[&str]; 3] = [
            &["tlsCertificate", "privateKey", "inlineBytes"],
            &["sessionTicketKeys", "keys", "0", "inlineBytes"],
            &["genericSecret", "secret", "inlineBytes"],
        ];
        let at = |value: &Value, path: &[&str]| {
            path.iter().fold(value.clone(), |v, p| match p.parse::<usize>() {
                Ok(i) => v[i].clone(),
                Err(_) => v[*p].clone(),
            })
        };
        for (secret, path) in [secret, tickets, generic].into_iter().zip(hidden_paths) {
            let any = Any { type_url: xds::SECRET.to_owned(), value: secret.encode_to_vec() };
            // The secret bytes as protobuf JSON shows them (base64), before redaction.
            let raw = at(&any_json_unredacted(&any), path);
            let raw = raw.as_str().unwrap_or_else(|| panic!("no {path:?} in the rendering"));
            let shown = any_json(&any);
            let text = shown.to_string();
            assert_eq!(shown["name"], secret.name.as_str(), "{text}");
            assert!(shown[path[0]] == redact::REDACTED || shown[path[0]][path[1]] == redact::REDACTED, "{text}");
            assert!(!text.contains(raw), "secret bytes shown: {text}");
            if secret.name == "server-cert" {
                let chain = at(&shown, &["tlsCertificate", "certificateChain", "inlineBytes"]);
                assert!(chain.as_str().is_some_and(|c| !c.is_empty()), "the certificate chain is public: {text}");
            }
        }
    }

    // === every route, one by one ===

    use crate::cache::{ClientInfo, Interest};
    use crate::node_cache::Watcher;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::{Address, Node, SocketAddress, address};
    use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint};
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;

    async fn text(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// GETs `path`, expects 200 and returns the body as JSON.
    async fn get_json(state: &AdminState, path: &str) -> Value {
        let response = call(state, "GET", path, &[]).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let body = text(response).await;
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
    }

    fn cluster(name: &str) -> Any {
        Any {
            type_url: xds::CLUSTER.into(),
            value: Cluster { name: name.into(), ..Default::default() }.encode_to_vec(),
        }
    }

    fn endpoints(cluster: &str, ips: &[&str]) -> Any {
        let lb_endpoints = ips
            .iter()
            .map(|ip| LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: (*ip).into(),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .collect();
        let cla = ClusterLoadAssignment {
            cluster_name: cluster.into(),
            endpoints: vec![LocalityLbEndpoints { lb_endpoints, ..Default::default() }],
            ..Default::default()
        };
        Any { type_url: xds::ENDPOINT.into(), value: cla.encode_to_vec() }
    }

    /// Watches `key` (as client `envoy-1` of cluster `staging`, with no source started) and,
    /// unless `resources` is `None`, gives it that state at `version`. The key has a client
    /// while the returned watcher lives.
    fn seed(state: &AdminState, key: &str, type_url: &str, version: &str, resources: Option<Vec<Any>>) -> Watcher {
        let client = ClientInfo { node_id: "envoy-1".into(), node_cluster: "staging".into(), ..Default::default() };
        let watcher =
            state.relay.cache().watch(key, type_url, &Node::default(), client, Interest::wildcard(), |_| {}).unwrap();
        if let Some(resources) = resources {
            let response = DiscoveryResponse {
                version_info: version.into(),
                type_url: type_url.into(),
                resources,
                ..Default::default()
            };
            watcher.entry().apply_response(response, &Interest::wildcard(), true, |_| Default::default()).unwrap();
        }
        watcher
    }

    #[tokio::test]
    async fn the_index_lists_every_endpoint() {
        let state = state(None);
        let response = call(&state, "GET", "/", &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        let index = text(response).await;
        for path in ["/cache/{key}", "/cache/clear/{key}", "/cache/keys", "/cache/version/{key}", "/cache/eds/{key}"] {
            assert!(index.contains(path), "{path} missing from the index: {index}");
        }
        for path in ["/log_level/{level}", "/ready", "/server_info", "/metrics", "/api/cluster", "/ring"] {
            assert!(index.contains(path), "{path} missing from the index: {index}");
        }
    }

    #[tokio::test]
    async fn cache_dumps_every_key_one_key_or_a_prefix() {
        let state = state(None);
        let _cds = seed(&state, "staging_cds", xds::CLUSTER, "7", Some(vec![cluster("a"), cluster("b")]));
        let _eds = seed(&state, "staging_eds", xds::ENDPOINT, "3", Some(vec![endpoints("a", &["10.0.0.1"])]));
        let _lds = seed(&state, "prod_lds", xds::LISTENER, "1", Some(vec![]));
        for path in ["/cache", "/cache/"] {
            let all = get_json(&state, path).await;
            let keys: Vec<&str> = all["Cache"].as_array().unwrap().iter().map(|e| e["Key"].as_str().unwrap()).collect();
            assert_eq!(keys, ["prod_lds", "staging_cds", "staging_eds"], "{path}");
        }
        let one = get_json(&state, "/cache/staging_cds").await;
        let entry = &one["Cache"][0];
        assert_eq!(one["Cache"].as_array().unwrap().len(), 1);
        assert_eq!(entry["Resp"]["VersionInfo"], "7");
        assert_eq!(entry["Resp"]["Resources"]["Clusters"][1]["name"], "b");
        assert_eq!(entry["NumRequests"], 1);
        assert!(entry.get("Requests").is_none(), "clients are listed only with verbose=true");
        let prefix = get_json(&state, "/cache/staging_*").await;
        assert_eq!(prefix["Cache"].as_array().unwrap().len(), 2);
        let verbose = get_json(&state, "/cache/staging_cds?verbose=true").await;
        assert_eq!(verbose["Cache"][0]["Requests"][0]["node_id"], "envoy-1");
        let nothing = call(&state, "GET", "/cache/unknown_key", &[]).await;
        assert_eq!(nothing.status(), StatusCode::OK);
        assert_eq!(text(nothing).await, "", "nothing matches: empty body");
    }

    #[tokio::test]
    async fn cache_keys_lists_the_keys_in_order() {
        let state = state(None);
        assert_eq!(get_json(&state, "/cache/keys").await["Names"], json!([]));
        let _b = seed(&state, "b_cds", xds::CLUSTER, "1", None);
        let _a = seed(&state, "a_cds", xds::CLUSTER, "1", Some(vec![cluster("a")]));
        for path in ["/cache/keys", "/cache/keys/"] {
            assert_eq!(get_json(&state, path).await["Names"], json!(["a_cds", "b_cds"]), "{path}");
        }
    }

    #[tokio::test]
    async fn cache_version_answers_404_for_a_missing_or_unanswered_key() {
        let state = state(None);
        let _ready = seed(&state, "staging_cds", xds::CLUSTER, "42", Some(vec![cluster("a")]));
        let _waiting = seed(&state, "staging_lds", xds::LISTENER, "", None);
        assert_eq!(get_json(&state, "/cache/version/staging_cds").await["Version"], "42");
        let unanswered = call(&state, "GET", "/cache/version/staging_lds", &[]).await;
        assert_eq!(unanswered.status(), StatusCode::NOT_FOUND);
        assert!(text(unanswered).await.contains("no response from its source yet"));
        let missing = call(&state, "GET", "/cache/version/ghost", &[]).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert!(text(missing).await.contains("no cache entry for key ghost"));
    }

    #[tokio::test]
    async fn cache_eds_lists_addresses_and_refuses_other_types() {
        let state = state(None);
        let _eds = seed(
            &state,
            "staging_eds",
            xds::ENDPOINT,
            "5",
            Some(vec![endpoints("a", &["10.0.0.1", "10.0.0.2"]), endpoints("b", &["10.0.0.3"])]),
        );
        let _cds = seed(&state, "staging_cds", xds::CLUSTER, "1", Some(vec![cluster("a")]));
        let eds = get_json(&state, "/cache/eds/staging_eds").await;
        assert_eq!(
            eds,
            json!({"Key": "staging_eds", "Version": "5", "Endpoints": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]})
        );
        let wrong_type = call(&state, "GET", "/cache/eds/staging_cds", &[]).await;
        assert_eq!(wrong_type.status(), StatusCode::BAD_REQUEST);
        assert!(text(wrong_type).await.contains("not endpoints"));
        assert_eq!(call(&state, "GET", "/cache/eds/ghost", &[]).await.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn cache_clear_removes_idle_keys_keeps_watched_ones_and_names_a_missing_key() {
        let state = state(None);
        drop(seed(&state, "idle_cds", xds::CLUSTER, "1", Some(vec![cluster("a")])));
        let _watched = seed(&state, "watched_cds", xds::CLUSTER, "1", Some(vec![cluster("a")]));
        let keys = |state: &AdminState| state.relay.cache().entries().iter().map(|e| e.key.clone()).collect::<Vec<_>>();

        let idle = call(&state, "POST", "/cache/clear/idle_cds", &[]).await;
        assert_eq!(idle.status(), StatusCode::OK);
        assert_eq!(keys(&state), ["watched_cds"], "an idle key is removed");
        let missing = call(&state, "POST", "/cache/clear/ghost", &[]).await;
        assert_eq!(missing.status(), StatusCode::OK);
        assert!(text(missing).await.contains("nonexistent key: ghost"));
        for path in ["/cache/clear/watched_*", "/cache/clear", "/cache/clear/"] {
            assert_eq!(call(&state, "POST", path, &[]).await.status(), StatusCode::OK, "{path}");
            assert_eq!(keys(&state), ["watched_cds"], "{path}: a key with a client stays, refetched");
        }
        assert_eq!(state.relay.cache().get("watched_cds").unwrap().state().version_info, "1", "clients keep it");
    }

    #[tokio::test]
    async fn log_level_shows_sets_and_refuses_an_unknown_level() {
        let state = state(None);
        for path in ["/log_level", "/log_level/"] {
            let shown = call(&state, "POST", path, &[]).await;
            assert_eq!(shown.status(), StatusCode::OK, "{path}");
            assert_eq!(text(shown).await, "Current log level: info\n");
        }
        let set = call(&state, "POST", "/log_level/warn", &[]).await;
        assert_eq!(set.status(), StatusCode::OK);
        assert_eq!(state.log.level(), LogLevel::Warn);
        let bad = call(&state, "POST", "/log_level/loudest", &[]).await;
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        assert_eq!(text(bad).await, "Invalid log level: loudest\n");
        assert_eq!(state.log.level(), LogLevel::Warn, "a refused level changes nothing");
        assert_eq!(call(&state, "GET", "/log_level", &[]).await.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn ready_reports_and_sets_readiness_and_refuses_other_values() {
        let state = state(None);
        for path in ["/ready", "/ready/"] {
            assert_eq!(call(&state, "GET", path, &[]).await.status(), StatusCode::OK, "{path}");
        }
        assert_eq!(call(&state, "POST", "/ready/false", &[]).await.status(), StatusCode::OK);
        assert_eq!(call(&state, "GET", "/ready", &[]).await.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let bad = call(&state, "POST", "/ready/maybe", &[]).await;
        assert_eq!(bad.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(text(bad).await.contains("Only true/false"));
        assert!(!state.ready.load(Ordering::Acquire), "a refused value changes nothing");
        assert_eq!(call(&state, "POST", "/ready", &[]).await.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(call(&state, "POST", "/ready/true", &[]).await.status(), StatusCode::OK);
        assert_eq!(call(&state, "HEAD", "/ready", &[]).await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn server_info_shows_the_bootstrap_with_file_paths_not_contents() {
        let state = state(Some("s3cret-token-value"));
        for path in ["/server_info", "/server_info/"] {
            let info = get_json(&state, path).await;
            assert_eq!(info, serde_json::to_value(state.bootstrap.as_ref()).unwrap(), "{path}");
            let token_file = info["admin"]["auth_token_file"].as_str().expect("the token file's path is shown");
            assert!(token_file.starts_with(std::env::temp_dir().to_str().unwrap()), "{token_file}");
        }
        let shown = text(call(&state, "GET", "/server_info", &[]).await).await;
        assert!(!shown.contains("\"s3cret-token-value"), "the token itself is never shown: {shown}");
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_with_per_key_series() {
        let state = state(None);
        let _cds = seed(&state, "staging_cds", xds::CLUSTER, "1", Some(vec![cluster("a")]));
        let response = call(&state, "GET", "/metrics", &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        let body = text(response).await;
        assert!(body.contains("xds_relay_key_clients{key=\"staging_cds\"} 1"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(call(&state, "POST", "/metrics", &[]).await.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn ring_is_a_self_contained_html_page() {
        let state = state(None);
        let response = call(&state, "GET", "/ring", &[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let page = text(response).await;
        assert!(page.contains("/api/cluster"), "the page reads the cluster view");
    }

    #[tokio::test]
    async fn the_cluster_view_of_a_standalone_relay_is_404_and_its_local_view_lists_its_keys() {
        let state = state(None);
        let _cds = seed(&state, "staging_cds", xds::CLUSTER, "9", Some(vec![cluster("a")]));
        let cluster = call(&state, "GET", "/api/cluster", &[]).await;
        assert_eq!(cluster.status(), StatusCode::NOT_FOUND);
        assert!(text(cluster).await.contains("runs alone"));
        let local = get_json(&state, "/api/cluster/local").await;
        let keys = local["keys"].as_array().expect("a key list");
        let key = keys.iter().find(|k| k["key"] == "staging_cds").unwrap_or_else(|| panic!("{local}"));
        assert_eq!(key["version"], "9");
        assert_eq!(key["local_clients"], 1);
    }

    #[tokio::test]
    async fn a_token_guards_every_mutating_route_including_trailing_slash_forms() {
        let state = state(Some("t0ken"));
        let _watched = seed(&state, "staging_cds", xds::CLUSTER, "1", Some(vec![cluster("a")]));
        for path in
            ["/cache/clear", "/cache/clear/", "/cache/clear/staging_*", "/log_level/", "/ready/false", "/ready/true"]
        {
            assert_eq!(call(&state, "POST", path, &[]).await.status(), StatusCode::UNAUTHORIZED, "{path}");
        }
        // Reads stay open with a token configured.
        for path in ["/cache/", "/cache/staging_cds", "/cache/keys/", "/cache/version/staging_cds", "/ready/"] {
            assert_eq!(call(&state, "GET", path, &[]).await.status(), StatusCode::OK, "{path}");
        }
        for path in ["/server_info/", "/ring", "/api/cluster/local"] {
            assert_eq!(call(&state, "GET", path, &[]).await.status(), StatusCode::OK, "{path}");
        }
    }

    /// An admin state whose relay stages keys starting with `staged` (one canary, 1 h bake).
    fn state_with_rollout(token: Option<&str>) -> AdminState {
        let mut state = state(token);
        let settings: crate::rollout::RolloutSettings =
            serde_yaml_ng::from_str("policies: [{keys: {key_prefix: staged}, canary: {fraction: 0.1}, bake: 1h}]")
                .unwrap();
        let rollouts = Arc::new(
            crate::rollout::Rollouts::new(&settings, state.metrics.clone(), TaskTracker::new(), Default::default())
                .unwrap(),
        );
        let cache = Arc::new(
            Cache::new(state.bootstrap.cache.clone(), state.metrics.clone()).with_staged_keys(rollouts.staged_keys()),
        );
        let rules =
            parse_rules(include_str!("../example/config/aggregation-rules.yaml"), "aggregation-rules.yaml").unwrap();
        let origin =
            Origin::new(&state.bootstrap.origin_server, None, &state.metrics, TaskTracker::new(), Default::default())
                .unwrap();
        let relay =
            Relay::new(Keyer::new(&rules).unwrap(), cache, origin, None, state.metrics.clone(), Default::default())
                .with_rollouts(Some(rollouts));
        state.relay = Arc::new(relay);
        state
    }

    #[tokio::test(start_paused = true)]
    async fn rollout_routes_list_promote_and_abort_behind_the_token() {
        let state = state_with_rollout(Some("t0ken"));
        let auth = [("authorization", "Bearer t0ken")];
        let rollouts = state.relay.rollouts().unwrap().clone();
        let watch = |node: &str| {
            let client = ClientInfo { node_id: node.into(), ..Default::default() };
            let node = Node { id: node.into(), ..Default::default() };
            state
                .relay
                .cache()
                .watch("staged_cds", xds::CLUSTER, &node, client, Interest::wildcard(), |e| rollouts.start(e))
                .unwrap()
        };
        let watchers = [watch("a"), watch("b")];
        let publish = |version: &str| {
            let response = DiscoveryResponse {
                version_info: version.into(),
                type_url: xds::CLUSTER.into(),
                resources: vec![cluster(version)],
                ..Default::default()
            };
            watchers[0].entry().apply_response(response, &Interest::wildcard(), false, |_| Default::default()).unwrap();
        };
        publish("1");
        let empty: Value = serde_json::from_str(&text(call(&state, "GET", "/rollout", &[]).await).await).unwrap();
        assert_eq!(empty, json!({ "configured": true, "rollouts": [] }));

        publish("2");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let canary = watchers.iter().find(|w| w.state().version_info == "2").expect("one canary");
        canary.record_nack("2", "cluster 2: unsupported lb_policy");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let listed: Value = serde_json::from_str(&text(call(&state, "GET", "/rollout", &[]).await).await).unwrap();
        let rollout = &listed["rollouts"][0];
        assert_eq!(rollout["key"], "staged_cds");
        assert_eq!(rollout["phase"], "held");
        assert_eq!((rollout["candidate_version"].as_str(), rollout["stable_version"].as_str()), (Some("2"), Some("1")));
        assert_eq!(rollout["canaries"][0]["answer"], "nack");
        assert_eq!(rollout["canaries"][0]["nack_message"], "cluster 2: unsupported lb_policy");
        assert!(rollout["reason"].as_str().unwrap().contains("unsupported lb_policy"), "{rollout}");
        let local: Value =
            serde_json::from_str(&text(call(&state, "GET", "/api/cluster/local", &[]).await).await).unwrap();
        assert_eq!(local["keys"][0]["rollout"], "held", "{local}");

        assert_eq!(call(&state, "POST", "/rollout/staged_cds/abort", &[]).await.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            call(&state, "GET", "/rollout/staged_cds/abort", &[]).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let unknown = call(&state, "POST", "/rollout/nope/promote", &auth).await;
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        assert!(text(unknown).await.contains("nope"));
        assert_eq!(call(&state, "POST", "/rollout/staged_cds/frobnicate", &auth).await.status(), StatusCode::NOT_FOUND);

        assert_eq!(call(&state, "POST", "/rollout/staged_cds/abort", &auth).await.status(), StatusCode::OK);
        assert_eq!(call(&state, "POST", "/rollout/staged_cds/abort", &auth).await.status(), StatusCode::CONFLICT);
        let promoted = call(&state, "POST", "/rollout/staged_cds/promote", &auth).await;
        assert_eq!(promoted.status(), StatusCode::OK);
        assert!(text(promoted).await.contains("\"version\": \"2\""));
        assert!(watchers.iter().all(|w| w.state().version_info == "2"), "promoted to everyone");
        assert_eq!(call(&state, "POST", "/rollout/staged_cds/promote", &auth).await.status(), StatusCode::CONFLICT);
    }
}
