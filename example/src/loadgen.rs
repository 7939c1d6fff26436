//! A load generator for any xDS server: many simulated clients, each with its own node, holding
//! SotW or delta streams (one ADS stream, or one stream per type) and ACKing what they receive;
//! the library behind the `xds-loadgen` binary.
//!
//! What a client subscribes to ([`LoadgenConfig::types`]):
//! - CDS and LDS: the legacy wildcard (an empty name list), as Envoy does;
//! - EDS: the cluster names of the client's CDS resources (like Envoy; the cluster name, not an
//!   `eds_cluster_config.service_name`), or the fixed `eds_names`;
//! - RDS: the RDS route names of the HTTP connection managers in the client's LDS resources, or
//!   the fixed `rds_names`.
//!
//! What it measures ([`Summary`], details in [`metrics`]): per version of each type, when each
//! call received it as a change (fan-out spread across calls), the end-to-end latency from the
//! origin's `published_unix_nanos` stamp, throughput, NACKs, errors and reconnects (a stream that
//! ends is reopened after `reconnect_delay`; forced restarts, [`restart`], reopen at once and
//! count apart). A client has seen *K new versions* once some type
//! it subscribes to changed version K times on one call since that call's first response;
//! [`LoadgenConfig::until_versions`] stops the run when every client has.
//!
//! Connections: with [`LoadgenConfig::tls`] every connection is TLS (rustls, ALPN `h2`), with a
//! client certificate for mTLS when given; the summary reports how long each connection took to
//! set up (TCP, TLS handshake and HTTP/2 preface) as `connect_ms`.
//!
//! Scale: clients are spread over `connections` HTTP/2 connections (one tonic `Channel` each),
//! each call is one task that keeps only names and versions, and nothing is decoded beyond the
//! names that EDS/RDS derivation needs. Every loop ends with the run (`duration`, `until_versions`
//! or [`Loadgen::stop`]).

pub mod config;
pub mod histogram;
pub mod metrics;
pub mod names;
pub mod record;
pub mod restart;
pub mod session;
pub mod skim;
pub mod stream;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};

pub use config::{ConfigError, LoadgenConfig, Protocol, XdsType};
pub use metrics::{Progress, Quantiles, StopReason, Summary, VersionSummary};
pub use tls::{TlsError, TlsFiles};

use crate::client::Transport;
use metrics::Metrics;
use record::{RecordError, RecordWriter, Recorder};
use restart::{RESTART_TICK, RestartSchedule};
use stream::{Call, Client};

/// How long stopping may wait for the calls to close.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the run checks whether every client reached `until_versions`.
const UNTIL_POLL: Duration = Duration::from_millis(20);

/// Errors of [`Loadgen::start`].
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The target is not a valid URI.
    #[error("invalid target {target:?}")]
    Target {
        /// The target given.
        target: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// The record file cannot be created.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A TLS file cannot be read.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The TLS configuration cannot be applied to the target.
    #[error("cannot use TLS with {target}")]
    TlsConfig {
        /// The target.
        target: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A connection to the target failed.
    #[error("cannot connect to {target}")]
    Connect {
        /// The target.
        target: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A running load generator.
#[derive(Debug)]
pub struct Loadgen {
    control: Controller,
    run: JoinHandle<Summary>,
}

/// Watches and stops a running [`Loadgen`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Controller {
    config: Arc<LoadgenConfig>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

// === impl Loadgen ===

impl Loadgen {
    /// Validates `config`, opens the HTTP/2 connections, and starts opening clients.
    ///
    /// # Errors
    ///
    /// [`LoadgenError`] when the configuration or target is invalid, or a connection fails.
    pub async fn start(mut config: LoadgenConfig) -> Result<Self, LoadgenError> {
        config.validate()?;
        config.connections = config.connections.min(config.streams);
        let (channels, setup) = connect(&config).await?;
        let recording = config.record.as_deref().map(Recorder::create).transpose()?;
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new(&config));
        for took in setup {
            metrics.record_connect(took);
        }
        let stop = CancellationToken::new();
        let run = tokio::spawn(supervise(config.clone(), metrics.clone(), channels, recording, stop.clone()));
        Ok(Self { control: Controller { config, metrics, stop }, run })
    }

    /// A handle to watch and stop the run while waiting for it.
    pub fn controller(&self) -> Controller {
        self.control.clone()
    }

    /// The counters now.
    pub fn progress(&self) -> Progress {
        self.control.progress()
    }

    /// How many calls received `version` of `t` as a change so far.
    pub fn receipts(&self, t: XdsType, version: &str) -> u64 {
        self.control.receipts(t, version)
    }

    /// Stops the run early.
    pub fn stop(&self) {
        self.control.stop();
    }

    /// Waits for the run to stop and returns its summary.
    pub async fn wait(self) -> Summary {
        match self.run.await {
            Ok(summary) => summary,
            // The run task does not panic; if it did, report what was measured.
            Err(_) => self.control.metrics.summary(&self.control.config, StopReason::Stopped, 0),
        }
    }
}

// === impl Controller ===

impl Controller {
    /// The counters now.
    pub fn progress(&self) -> Progress {
        self.metrics.progress(&self.config)
    }

    /// How many calls received `version` of `t` as a change so far.
    pub fn receipts(&self, t: XdsType, version: &str) -> u64 {
        self.metrics.receipts(t, version)
    }

    /// Stops the run early.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

/// Runs `config` to the end and returns its summary.
///
/// # Errors
///
/// As [`Loadgen::start`].
pub async fn run(config: LoadgenConfig) -> Result<Summary, LoadgenError> {
    Ok(Loadgen::start(config).await?.wait().await)
}

/// Opens `config.connections` HTTP/2 connections to the target (over TLS when configured),
/// concurrently; returns them with how long each took to set up.
async fn connect(config: &LoadgenConfig) -> Result<(Vec<Channel>, Vec<Duration>), LoadgenError> {
    let target = || config.target.clone();
    let mut endpoint = Endpoint::from_shared(config.target.clone())
        .map_err(|source| LoadgenError::Target { target: target(), source })?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = &config.tls {
        endpoint = endpoint
            .tls_config(tls.client_config()?)
            .map_err(|source| LoadgenError::TlsConfig { target: target(), source })?;
    }
    let connecting = (0..config.connections).map(|_| async {
        let started = Instant::now();
        let channel = endpoint.connect().await?;
        Ok::<_, tonic::transport::Error>((channel, started.elapsed()))
    });
    let opened = futures_util::future::try_join_all(connecting)
        .await
        .map_err(|source| LoadgenError::Connect { target: target(), source })?;
    Ok(opened.into_iter().unzip())
}

/// Opens the clients, stops the run when it is over, and summarises it.
async fn supervise(
    config: Arc<LoadgenConfig>,
    metrics: Arc<Metrics>,
    channels: Vec<Channel>,
    recording: Option<(Recorder, RecordWriter)>,
    stop: CancellationToken,
) -> Summary {
    let calls = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (recorder, writer) = recording.unzip();
    let opening = open_clients(config.clone(), metrics.clone(), channels, recorder, calls.clone(), tracker.clone());
    tracker.spawn(opening);
    let deadline = tokio::time::sleep(config.duration);
    tokio::pin!(deadline);
    let mut poll = tokio::time::interval(UNTIL_POLL);
    let reason = loop {
        tokio::select! {
            () = &mut deadline => break StopReason::Duration,
            () = stop.cancelled() => break StopReason::Stopped,
            _ = poll.tick(), if config.until_versions.is_some() => {
                if metrics.streams_reached() >= config.streams as u64 {
                    break StopReason::UntilVersions;
                }
            }
        }
    };
    let calls_open = metrics.progress(&config).calls_open;
    let summary = metrics.summary(&config, reason, calls_open);
    calls.cancel();
    tracker.close();
    if tokio::time::timeout(STOP_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!(grace = ?STOP_GRACE, "calls did not close in time");
    }
    if let Some(writer) = writer {
        // Every call has ended (or is abandoned with the runtime): its recorder is dropped.
        match tokio::time::timeout(STOP_GRACE, writer.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "cannot write the record file"),
            Err(_) => tracing::warn!(grace = ?STOP_GRACE, "the record file was not closed in time"),
        }
    }
    summary
}

/// Opens client `i` on connection `i % connections`, at `connect_rate` if set; once every
/// client is open, restarts `restart_per_second` of them each second until cancelled.
async fn open_clients(
    config: Arc<LoadgenConfig>,
    metrics: Arc<Metrics>,
    channels: Vec<Channel>,
    recorder: Option<Recorder>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let mut pace = config.connect_rate.map(|rate| {
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        interval
    });
    let mut clients = Vec::with_capacity(config.streams);
    for i in 0..config.streams {
        if let Some(pace) = pace.as_mut() {
            tokio::select! {
                _ = pace.tick() => {}
                () = cancel.cancelled() => return,
            }
        } else if cancel.is_cancelled() {
            return;
        }
        let client = Arc::new(Client::new(&config, i));
        clients.push(client.clone());
        let groups: Vec<Vec<XdsType>> = match config.mode {
            Transport::Ads => vec![config.types.clone()],
            Transport::PerType => config.types.iter().map(|t| vec![*t]).collect(),
        };
        for types in groups {
            let call = Call {
                config: config.clone(),
                metrics: metrics.clone(),
                client: client.clone(),
                types,
                channel: channels[i % channels.len()].clone(),
                cancel: cancel.clone(),
                recorder: recorder.clone(),
            };
            tracker.spawn(call.run());
        }
        if pace.is_none() && i % 256 == 255 {
            // Let the calls already opened make progress while thousands are being spawned.
            tokio::task::yield_now().await;
        }
    }
    if config.restart_per_second > 0.0 {
        restart_clients(&config, &clients, &cancel).await;
    }
}

/// Restarts `restart_per_second` of `clients` each second, round robin, until cancelled.
async fn restart_clients(config: &LoadgenConfig, clients: &[Arc<Client>], cancel: &CancellationToken) {
    let mut schedule = RestartSchedule::new(config.restart_per_second, clients.len(), RESTART_TICK);
    let mut tick = tokio::time::interval(RESTART_TICK);
    // A late tick is not made up with a burst: the rate stays the configured one or less.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        for i in schedule.tick() {
            clients[i].restart();
        }
    }
}
