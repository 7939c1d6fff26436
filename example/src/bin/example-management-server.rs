//! `example-management-server`: serves an example xDS configuration to any node and publishes a
//! new snapshot every interval. See the `xds_relay_example` crate docs for what it serves.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing_subscriber::EnvFilter;
use xds_relay_example::duration::parse_duration;
use xds_relay_example::extras::{Extras, ExtrasSpec};
use xds_relay_example::publisher::PublisherConfig;
use xds_relay_example::server::{self, ManagementServer};
use xds_relay_example::snapshot::SnapshotSpec;
use xds_relay_example::stats;

/// How long shutdown may take before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// Example xDS management server (SotW and delta, ADS and per-type services, any node).
///
/// The extras (--ttl, --heartbeat-interval, --do-not-cache, --resource-error,
/// --xdstp-authority, --dynamic-parameter, --bad-clusters) can be replaced at run time with
/// POST /extras on the stats address (a JSON object with the same fields, in snake_case).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// xDS gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:18000")]
    address: SocketAddr,
    /// Stats HTTP listen address (GET /stats, POST /publish, POST /extras, GET /healthz).
    #[arg(long, default_value = "127.0.0.1:18001")]
    stats_address: SocketAddr,
    /// Publish interval: 500ms, 10s, 1m, or integer seconds.
    #[arg(long, default_value = "10s", value_parser = parse_interval)]
    interval: Duration,
    /// Number of clusters (and ClusterLoadAssignments).
    #[arg(long, default_value_t = 3)]
    clusters: usize,
    /// Number of Envoy listeners (and RouteConfigurations).
    #[arg(long, default_value_t = 2)]
    listeners: usize,
    /// Comma-separated host:port backends; empty means synthetic 127.0.0.1:12000+i.
    #[arg(long, value_delimiter = ',', value_parser = parse_endpoint)]
    endpoints: Vec<SocketAddr>,
    /// Use random versions ("v" + a number below 100000) instead of unix milliseconds.
    #[arg(long)]
    random_versions: bool,
    /// Stop the periodic publishing after this many publishes (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    max_publishes: u64,
    /// Serve xDS over TLS with this certificate chain (PEM; needs --tls-key). Default: plaintext.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates chaining to these CA certificates (PEM; mTLS).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Send every CDS resource wrapped in a Resource with this TTL (500ms, 10s, 1m).
    #[arg(long)]
    ttl: Option<String>,
    /// Between publishes, send each open CDS stream a TTL heartbeat this often (needs --ttl).
    #[arg(long, requires = "ttl")]
    heartbeat_interval: Option<String>,
    /// Comma-separated resource names (any type) sent with cache_control.do_not_cache = true.
    #[arg(long, value_delimiter = ',')]
    do_not_cache: Vec<String>,
    /// TYPE/NAME=CODE:MESSAGE (TYPE cds, eds, lds or rds; CODE a gRPC code 1-16): responses of
    /// that type whose subscription covers NAME carry this resource error, and never the
    /// resource itself (repeatable).
    #[arg(long = "resource-error")]
    resource_errors: Vec<String>,
    /// Also publish xdstp://AUTHORITY/envoy.config.cluster.v3.Cluster/fleet/cluster_I and the
    /// matching ClusterLoadAssignments, fleet/route_J routes to them, and the API listener
    /// xdstp://AUTHORITY/envoy.config.listener.v3.Listener/example-service (for a gRPC client
    /// federated on AUTHORITY); exact names and fleet/* globs are served.
    #[arg(long)]
    xdstp_authority: Option<String>,
    /// KEY=V1,V2,...: publish each CDS cluster_I as one variant per value (constraint
    /// KEY=value) plus a default variant (constraint NOT KEY exists).
    #[arg(long)]
    dynamic_parameter: Option<String>,
    /// Comma-separated CDS clusters published with lb_policy MAGLEV, which proxyless gRPC
    /// rejects: a snapshot cluster's name changes it, another name adds a copy of cluster_0.
    #[arg(long, value_delimiter = ',')]
    bad_clusters: Vec<String>,
    /// Log filter, e.g. info or debug or xds_relay_example=debug.
    #[arg(long, default_value = "info", value_parser = parse_log_level)]
    log_level: String,
}

/// The TLS configuration of the flags, or `None` for plaintext.
fn tls_config(args: &Args) -> Result<Option<ServerTlsConfig>, String> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
    let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &args.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval.is_zero() {
        return Err("interval must be positive".to_owned());
    }
    Ok(interval)
}

fn parse_log_level(text: &str) -> Result<String, String> {
    EnvFilter::try_new(text).map(|_| text.to_owned()).map_err(|e| e.to_string())
}

fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .map_err(|e| format!("invalid endpoint {text:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("endpoint {text:?} resolves to no address"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Validated by clap; the fallback is never used.
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).init();

    let tls = match tls_config(&args) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("example-management-server: {e}");
            return ExitCode::from(64);
        }
    };
    let grpc_listener = match bind(args.address, "xds").await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let stats_listener = match bind(args.stats_address, "stats").await {
        Ok(l) => l,
        Err(code) => return code,
    };

    let extras = match Extras::parse(ExtrasSpec {
        ttl: args.ttl.clone(),
        heartbeat_interval: args.heartbeat_interval.clone(),
        do_not_cache: args.do_not_cache.clone(),
        resource_errors: args.resource_errors.clone(),
        xdstp_authority: args.xdstp_authority.clone(),
        dynamic_parameter: args.dynamic_parameter.clone(),
        bad_clusters: args.bad_clusters.clone(),
    }) {
        Ok(extras) => extras,
        Err(e) => {
            eprintln!("example-management-server: {e}");
            return ExitCode::from(64);
        }
    };
    let server = ManagementServer::new(PublisherConfig {
        spec: SnapshotSpec { clusters: args.clusters, listeners: args.listeners, endpoints: args.endpoints.clone() },
        random_versions: args.random_versions,
    });
    server.publisher().set_extras(extras);
    server.publish_next();

    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let shutdown = token.clone();
    let stopped = async move { shutdown.cancelled().await };
    let grpc = match tls {
        Some(tls) => tracker.spawn(server::serve_tls(grpc_listener, server.clone(), tls, stopped)),
        None => tracker.spawn(server::serve(grpc_listener, server.clone(), stopped)),
    };
    let shutdown = token.clone();
    let http = tracker.spawn(stats::serve(stats_listener, server.clone(), async move {
        shutdown.cancelled().await;
    }));
    tracker.spawn(publish_loop(server, args.interval, args.max_publishes, token.clone()));

    let code = tokio::select! {
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            ExitCode::SUCCESS
        }
        result = grpc => {
            tracing::error!(error = ?result, "xds server stopped");
            ExitCode::FAILURE
        }
        result = http => {
            tracing::error!(error = ?result, "stats server stopped");
            ExitCode::FAILURE
        }
    };
    token.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "shutdown grace period elapsed; exiting");
    }
    code
}

/// Binds `address`, logging it; prints a clear error and yields exit code 1 on failure.
async fn bind(address: SocketAddr, name: &'static str) -> Result<TcpListener, ExitCode> {
    match TcpListener::bind(address).await {
        Ok(listener) => {
            let bound = listener.local_addr().unwrap_or(address);
            tracing::info!(listener = name, address = %bound, "listening");
            Ok(listener)
        }
        Err(e) => {
            eprintln!("error: cannot bind the {name} listener to {address}: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// Publishes every `interval` (the first publish happened at startup) until `max` publishes
/// (0 = unlimited) or shutdown.
async fn publish_loop(server: ManagementServer, interval: Duration, max: u64, token: CancellationToken) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = 1;
    while max == 0 || published < max {
        tokio::select! {
            () = token.cancelled() => return,
            _ = ticker.tick() => {
                server.publish_next();
                published += 1;
            }
        }
    }
    tracing::info!(publishes = published, "reached --max-publishes; no more periodic publishes");
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
