//! `xds-loadgen`: opens many SotW or delta xDS streams against any xDS server, ACKs what they
//! receive, prints one progress line per second on stderr, and prints a JSON summary (fan-out
//! spread, end-to-end latency, throughput, errors) at the end. See `xds_relay_example::loadgen`.
//!
//! TLS: `--tls-ca` (with an `https://` target) turns TLS on; `--tls-cert`/`--tls-key` add a
//! client certificate (mTLS); `--tls-server-name` verifies another name than the target's host.
//!
//! Exit codes: 0 after a run, 64 for an invalid configuration (including unreadable TLS files),
//! 1 when the target is unreachable (or the TLS handshake fails) or the summary cannot be written.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use xds_relay_example::client::Transport;
use xds_relay_example::duration::parse_duration;
use xds_relay_example::loadgen::config::{parse_fraction, parse_mode, parse_rate};
use xds_relay_example::loadgen::{Loadgen, LoadgenConfig, LoadgenError, Protocol, Summary, TlsFiles, XdsType};

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// xDS load generator: N clients, each with its own node, on SotW or delta streams.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The xDS server.
    #[arg(long, default_value = "http://127.0.0.1:18000")]
    target: String,
    /// Simulated clients (one ADS stream each, or one stream per type with --mode per-type).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// HTTP/2 connections to spread the streams over (client i uses connection i % N).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// ads (one aggregated stream per client) or per-type (one stream per type).
    #[arg(long, default_value = "ads", value_parser = parse_mode)]
    mode: Transport,
    /// sotw or delta.
    #[arg(long, default_value = "sotw")]
    protocol: Protocol,
    /// Comma-separated types each client subscribes to: cds, eds, lds, rds. CDS and LDS use
    /// the wildcard; EDS/RDS names come from the client's CDS/LDS resources unless given below.
    #[arg(long, value_delimiter = ',', default_value = "cds,eds")]
    types: Vec<XdsType>,
    /// Fixed EDS names (comma-separated) instead of the cluster names received over CDS.
    #[arg(long, value_delimiter = ',')]
    eds_names: Option<Vec<String>>,
    /// Fixed RDS names (comma-separated) instead of the route names in the LDS resources.
    #[arg(long, value_delimiter = ',')]
    rds_names: Option<Vec<String>>,
    /// node.id of client i; {i} is replaced with i, {group} with its group (see --groups),
    /// {epoch} with its restarts so far (see --reconnect-per-second).
    #[arg(long, default_value = "loadgen-{i}")]
    node_id_template: String,
    /// node.cluster of client i; template fields as in --node-id-template. With {epoch}, a
    /// restarted client moves to a new aggregation key (key churn).
    #[arg(long, default_value = "loadgen")]
    cluster_template: String,
    /// Split the clients into N groups of consecutive indices ({group} in the templates).
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Restart this fraction of the clients every second (e.g. 0.01 or 1%), round robin: a
    /// client ends its streams and opens new ones at once, with the node of its next {epoch}.
    #[arg(long, default_value = "0", value_parser = parse_fraction_arg)]
    reconnect_per_second: f64,
    /// Stop after this long: 500ms, 30s, 2m, or integer seconds.
    #[arg(long, default_value = "30s", value_parser = parse_positive)]
    duration: Duration,
    /// Stop once every client has received K new versions of some type it subscribes to.
    #[arg(long)]
    until_versions: Option<u32>,
    /// Open at most N clients per second (e.g. 500/s); default: all at once.
    #[arg(long, value_parser = parse_connect_rate)]
    connect_rate: Option<f64>,
    /// Wait before reopening a stream that ended.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    reconnect_delay: Duration,
    /// Write the JSON summary to this file instead of stdout.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Append every stream connect, response and disconnect to this file as JSON lines
    /// (flushed every 100 ms), for invariant checks.
    #[arg(long)]
    record: Option<PathBuf>,
    /// PEM CA certificates to verify the server with; turns TLS on (the target must be
    /// https://).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate chain for mTLS (with --tls-key).
    #[arg(long, requires = "tls_ca", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name to verify the server certificate against (and send as SNI) instead of the
    /// target's host.
    #[arg(long, requires = "tls_ca")]
    tls_server_name: Option<String>,
    /// Log filter for diagnostics on stderr, e.g. warn or xds_relay_example=debug.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

fn parse_positive(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be positive".to_owned());
    }
    Ok(duration)
}

fn parse_fraction_arg(text: &str) -> Result<f64, String> {
    parse_fraction(text).map_err(|e| e.to_string())
}

fn parse_connect_rate(text: &str) -> Result<f64, String> {
    parse_rate(text).map_err(|e| e.to_string())
}

impl Args {
    fn into_config(self) -> (LoadgenConfig, Option<PathBuf>) {
        let config = LoadgenConfig {
            target: self.target,
            streams: self.streams,
            connections: self.connections,
            mode: self.mode,
            protocol: self.protocol,
            types: self.types,
            eds_names: self.eds_names,
            rds_names: self.rds_names,
            node_id_template: self.node_id_template,
            cluster_template: self.cluster_template,
            groups: self.groups,
            restart_per_second: self.reconnect_per_second,
            duration: self.duration,
            until_versions: self.until_versions,
            connect_rate: self.connect_rate,
            reconnect_delay: self.reconnect_delay,
            record: self.record,
            tls: self.tls_ca.map(|ca_file| TlsFiles {
                ca_file,
                cert_file: self.tls_cert,
                key_file: self.tls_key,
                server_name: self.tls_server_name,
            }),
        };
        (config, self.json)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let (config, json) = args.into_config();
    raise_open_file_limit(config.connections);

    let loadgen = match Loadgen::start(config).await {
        Ok(loadgen) => loadgen,
        Err(e @ (LoadgenError::Config(_) | LoadgenError::Tls(_))) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let summary = report_until_done(loadgen).await;
    match write_summary(&summary, json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the summary: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-file limit to the hard limit: one connection per client (as fleets
/// connect) needs a descriptor each, beyond the usual default of 1024. Warns when even the
/// hard limit leaves too few for `connections`.
fn raise_open_file_limit(connections: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) if soft < hard => {
            match setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) }) {
                Ok(()) => Some(hard),
                Err(e) => {
                    tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)");
                    Some(soft)
                }
            }
        }
        (soft, _) => soft,
    };
    // Descriptors beside the connections: the runtime, the summary and record files.
    const OTHER_FILES: u64 = 64;
    if let Some(soft) = soft
        && soft < connections as u64 + OTHER_FILES
    {
        tracing::warn!(
            limit = soft,
            connections,
            "the open-file limit (RLIMIT_NOFILE) is below the connections asked for; raise it (ulimit -n) or some connections will fail"
        );
    }
}

/// Prints a progress line every second; stops the run on SIGINT or SIGTERM; returns the
/// summary.
async fn report_until_done(loadgen: Loadgen) -> Summary {
    let control = loadgen.controller();
    let start = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(start, Duration::from_secs(1));
    let mut done = std::pin::pin!(loadgen.wait());
    let mut stop = std::pin::pin!(stop_signal());
    let mut stopping = false;
    loop {
        tokio::select! {
            summary = &mut done => {
                eprintln!("{}", control.progress());
                return summary;
            }
            _ = ticker.tick() => eprintln!("{}", control.progress()),
            () = &mut stop, if !stopping => {
                eprintln!("stopping");
                stopping = true;
                control.stop();
            }
        }
    }
}

/// Completes on SIGINT or SIGTERM (the signal `docker stop` sends).
async fn stop_signal() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(e) => {
            eprintln!("warning: cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Writes the summary as pretty JSON to `path`, or to stdout.
fn write_summary(summary: &Summary, path: Option<PathBuf>) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(summary).map_err(std::io::Error::other)? + "\n";
    match path {
        Some(path) => std::fs::write(path, text),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
