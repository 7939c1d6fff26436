//! Assembles a relay node from its configuration and runs it until shutdown.
//!
//! The node binds nothing itself: callers pass already-bound listeners (tests use port 0).
//! Shutdown is one cancellation token; every task the node spawns is tracked and drained.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::cache::Cache;
use crate::config::{Bootstrap, KeyerConfiguration};
use crate::downstream::{self, ServerSettings};
use crate::keyer::Keyer;
use crate::relay::Relay;
use crate::telemetry::{LogControl, Metrics};
use crate::upstream::Origin;

/// Listeners a node serves on.
pub struct Listeners {
    /// The xDS gRPC listener.
    pub xds: TcpListener,
    /// The admin HTTP listener.
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `bootstrap`.
    ///
    /// # Errors
    /// Fails with the address in the message when a bind fails.
    pub async fn bind(bootstrap: &Bootstrap) -> anyhow::Result<Self> {
        let bind = |addr: String, what: &'static str| async move {
            TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("cannot bind the {what} address {addr}: {e}"))
        };
        Ok(Self {
            xds: bind(bootstrap.server.address.host_port(), "xDS server").await?,
            admin: bind(bootstrap.admin.address.host_port(), "admin").await?,
        })
    }
}

/// A running relay node.
pub struct Node {
    /// The xDS address it listens on.
    pub xds_addr: SocketAddr,
    /// The admin address it listens on.
    pub admin_addr: SocketAddr,
    /// The relay core.
    pub relay: Arc<Relay>,
    /// The metrics registry.
    pub metrics: Metrics,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Node {
    /// Builds the node and starts serving on `listeners`.
    ///
    /// # Errors
    /// Fails when the rules or the origin addresses cannot be used.
    pub fn start(
        bootstrap: Bootstrap,
        rules: &KeyerConfiguration,
        listeners: Listeners,
        log: LogControl,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Metrics::new();
        let keyer = Keyer::new(rules).map_err(|e| anyhow::anyhow!("{e}"))?;
        let cache = Arc::new(Cache::new(bootstrap.cache.clone(), metrics.clone()));
        let origin = Origin::new(&bootstrap.origin_server, tracker.clone())?;
        let relay = Arc::new(Relay::new(keyer, cache, origin, shutdown.clone()));
        relay.spawn_sweeper(&tracker);

        let xds_addr = listeners.xds.local_addr()?;
        let admin_addr = listeners.admin.local_addr()?;
        let ready = Arc::new(AtomicBool::new(false));
        let settings = ServerSettings {
            max_streams: bootstrap.server.max_streams,
            ads_batch_window: bootstrap.server.ads_batch_window,
            ..ServerSettings::default()
        };
        let admin_state = AdminState {
            relay: relay.clone(),
            metrics: metrics.clone(),
            log,
            ready: ready.clone(),
            bootstrap: Arc::new(bootstrap),
        };
        let xds_shutdown = shutdown.clone();
        let source = relay.clone();
        let xds_metrics = metrics.clone();
        tracker.spawn(async move {
            if let Err(e) = downstream::serve(listeners.xds, source, xds_metrics, settings, xds_shutdown.clone()).await
            {
                tracing::error!(error = %e, "xDS server failed");
                xds_shutdown.cancel();
            }
        });
        let admin_shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = admin::serve(listeners.admin, admin_state, admin_shutdown.clone()).await {
                tracing::error!(error = %e, "admin server failed");
                admin_shutdown.cancel();
            }
        });
        ready.store(true, Ordering::Release);
        tracing::info!(address = %xds_addr, "xDS server listening");
        tracing::info!(address = %admin_addr, "admin server listening");
        Ok(Self { xds_addr, admin_addr, relay, metrics, ready, shutdown, tracker })
    }

    /// A token that fires when the node stops (or that stops it when cancelled).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops the node: not ready, every stream ended, every task drained within `grace`.
    pub async fn stop(self, grace: Duration) {
        self.ready.store(false, Ordering::Release);
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            tracing::warn!(grace = ?grace, "some tasks did not stop within the grace period");
        }
        self.relay.cache().clear_all();
    }
}
