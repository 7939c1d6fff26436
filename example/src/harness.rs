//! Runs a management server in-process, for tests: gRPC and stats on loopback listeners.
//!
//! [`RunningServer::start`] binds `127.0.0.1:0` twice; [`RunningServer::start_on`] takes listeners
//! that are already bound (e.g. to restart an origin on the same port). Both publish the first
//! snapshot before serving. Dropping the handle shuts the servers down (streams end with
//! `UNAVAILABLE`); [`RunningServer::shutdown`] also waits for them to stop.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::publisher::PublisherConfig;
use crate::server::{self, ManagementServer};
use crate::stats;

/// A management server running on the current tokio runtime.
#[derive(Debug)]
pub struct RunningServer {
    grpc_addr: SocketAddr,
    stats_addr: SocketAddr,
    server: ManagementServer,
    token: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

// === impl RunningServer ===

impl RunningServer {
    /// Binds gRPC and stats on `127.0.0.1:0`, publishes the first snapshot and serves.
    ///
    /// # Errors
    ///
    /// When a listener cannot be bound.
    pub async fn start(config: PublisherConfig) -> std::io::Result<Self> {
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let stats = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(grpc, stats, config)
    }

    /// Publishes the first snapshot and serves on already bound listeners.
    ///
    /// # Errors
    ///
    /// When a listener's local address cannot be read.
    pub fn start_on(grpc: TcpListener, stats: TcpListener, config: PublisherConfig) -> std::io::Result<Self> {
        let grpc_addr = grpc.local_addr()?;
        let stats_addr = stats.local_addr()?;
        let server = ManagementServer::new(config);
        server.publish_next();
        let token = CancellationToken::new();
        let shutdown = token.clone();
        let grpc_task = tokio::spawn({
            let server = server.clone();
            async move {
                let stop = async move { shutdown.cancelled().await };
                if let Err(error) = server::serve(grpc, server, stop).await {
                    tracing::error!(%error, "xds server failed");
                }
            }
        });
        let shutdown = token.clone();
        let stats_task = tokio::spawn({
            let server = server.clone();
            async move {
                let stop = async move { shutdown.cancelled().await };
                if let Err(error) = stats::serve(stats, server, stop).await {
                    tracing::error!(%error, "stats server failed");
                }
            }
        });
        Ok(Self { grpc_addr, stats_addr, server, token, tasks: vec![grpc_task, stats_task] })
    }

    /// The gRPC (xDS) address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The stats HTTP address.
    pub fn stats_addr(&self) -> SocketAddr {
        self.stats_addr
    }

    /// The xDS endpoint URI for clients, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// The server state: publish, read stats.
    pub fn server(&self) -> &ManagementServer {
        &self.server
    }

    /// Stops both servers, ends every stream, and waits until they have stopped.
    pub async fn shutdown(mut self) {
        self.token.cancel();
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.token.cancel();
    }
}
