//! `xds-relay`: the relay binary. Thin: parse the command line, load and validate the
//! configuration (exit 64 when invalid), start the node, wait for SIGINT or SIGTERM, drain.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use xds_relay::app::{Listeners, Node};
use xds_relay::config::{self, Bootstrap, KeyerConfiguration, LogLevel};
use xds_relay::telemetry;

/// Exit status for an invalid configuration (EX_USAGE... EX_DATAERR is 65; sysexits' 64 is
/// what operators script against for "bad invocation or config").
const EXIT_CONFIG: u8 = 64;
/// How long shutdown may take.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Load the configuration and serve.
    Serve,
    /// Load and check both files, then exit.
    Validate,
}

/// A caching, aggregating relay for Envoy's xDS protocol.
#[derive(Debug, Parser)]
#[command(name = "xds-relay", version, about)]
struct Cli {
    /// Bootstrap configuration file (YAML). Without it, the embedded example bootstrap is
    /// used: xDS on 127.0.0.1:9991, admin on 127.0.0.1:6070, origin 127.0.0.1:18000.
    #[arg(short = 'c', long = "config-file")]
    config_file: Option<PathBuf>,
    /// Aggregation rules file (YAML). Without it, the embedded example rules are used.
    #[arg(short = 'a', long = "aggregation-rules")]
    aggregation_rules: Option<PathBuf>,
    /// `serve` runs the relay; `validate` checks the configuration and exits.
    #[arg(short = 'm', long = "mode", value_enum, default_value_t = Mode::Serve)]
    mode: Mode,
    /// Log level (debug, info, warn, error); overrides the bootstrap's `logging.level`.
    #[arg(short = 'l', long = "log-level")]
    log_level: Option<LogLevel>,
}

fn load(cli: &Cli) -> Result<(Bootstrap, KeyerConfiguration), config::ConfigError> {
    let bootstrap = match &cli.config_file {
        Some(path) => config::load_bootstrap(path)?,
        None => config::parse_bootstrap(config::DEFAULT_BOOTSTRAP, "<embedded bootstrap>")?,
    };
    let rules = match &cli.aggregation_rules {
        Some(path) => config::load_rules(path)?,
        None => config::parse_rules(config::DEFAULT_RULES, "<embedded aggregation rules>")?,
    };
    xds_relay::keyer::Keyer::new(&rules)?;
    Ok((bootstrap, rules))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (bootstrap, rules) = match load(&cli) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("xds-relay: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.mode == Mode::Validate {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = bootstrap.cache.prepare_persist_dir() {
        eprintln!("xds-relay: invalid configuration: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("xds-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli, bootstrap, rules)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xds-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli, bootstrap: Bootstrap, rules: KeyerConfiguration) -> anyhow::Result<()> {
    xds_relay::tls::install_crypto_provider();
    let level = cli.log_level.unwrap_or(bootstrap.logging.level);
    let node_name = bootstrap.cluster.as_ref().map(|c| c.node_name.clone()).unwrap_or_else(|| "xds-relay".to_owned());
    let tracing_settings = bootstrap.tracing.clone();
    let (log, trace_export) = telemetry::init_logging(
        level,
        bootstrap.logging.path.as_deref(),
        tracing_settings.as_ref().map(|t| (t, node_name.as_str())),
    )?;
    if bootstrap.metrics_sink.is_some() {
        tracing::warn!(
            "metrics_sink (statsd) is accepted for compatibility; metrics are served at the admin /metrics endpoint"
        );
    }
    // Every connection costs a file descriptor: take all the kernel allows (the listeners'
    // caps are fitted to it when the node starts).
    xds_relay::listener::raise_open_file_limit();
    // Signals are watched before anything listens, so a SIGTERM sent as soon as the node
    // announces its addresses stops it cleanly instead of killing it.
    let signals = ShutdownSignals::install();
    let listeners = Listeners::bind(&bootstrap).await?;
    let node = Node::start(bootstrap, &rules, listeners, log).await?;
    let stopped = node.shutdown_token();
    tokio::select! {
        signal = signals.recv() => tracing::info!(signal, "shutting down"),
        () = stopped.cancelled() => tracing::error!("a server failed; shutting down"),
    }
    node.stop(GRACE).await;
    if let Some(export) = trace_export {
        export.shutdown(Duration::from_secs(3)).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT, watched from the moment they are installed.
struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind: SignalKind, name: &'static str| {
            signal(kind).inspect_err(|e| tracing::warn!(error = %e, signal = name, "cannot watch the signal")).ok()
        };
        Self { term: watch(SignalKind::terminate(), "SIGTERM"), int: watch(SignalKind::interrupt(), "SIGINT") }
    }

    /// The name of the first signal received.
    async fn recv(mut self) -> &'static str {
        async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(&mut self.int) => "SIGINT",
            () = next(&mut self.term) => "SIGTERM",
        }
    }
}
