//! The stats HTTP endpoint of the example management server (axum, its own listener).
//!
//! Endpoints:
//! - `GET /stats`: the [`StatsReport`] as JSON: version, publishes,
//!   open and total streams, requests, ACKs, NACKs, open streams by type URL, gRPC method and
//!   node id, and every open stream;
//! - `POST /publish`: publishes a new snapshot now; answers `{"version": "...", "generation": n}`;
//! - `GET /healthz`: `200 ok`.

use std::future::Future;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::registry::StatsReport;
use crate::server::ManagementServer;

/// The answer of `POST /publish`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PublishReply {
    /// Version of the snapshot just published.
    pub version: String,
    /// Its generation.
    pub generation: u64,
}

/// The stats router, with every endpoint listed in the module doc.
pub fn router(server: ManagementServer) -> Router {
    Router::new()
        .route("/stats", get(stats))
        .route("/publish", post(publish))
        .route("/healthz", get(healthz))
        .with_state(server)
}

/// Serves [`router`] on an already bound `listener` until `shutdown` completes.
///
/// # Errors
///
/// The I/O error that stopped the server.
pub async fn serve(
    listener: TcpListener,
    server: ManagementServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(server)).with_graceful_shutdown(shutdown).await
}

async fn stats(State(server): State<ManagementServer>) -> Json<StatsReport> {
    Json(server.stats())
}

async fn publish(State(server): State<ManagementServer>) -> Json<PublishReply> {
    let published = server.publish_next();
    Json(PublishReply { version: published.version().to_owned(), generation: published.generation() })
}

async fn healthz() -> &'static str {
    "ok"
}
