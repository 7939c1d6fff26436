//! The stats HTTP endpoint of the example management server (axum, its own listener).
//!
//! Endpoints:
//! - `GET /stats`: the [`StatsReport`] as JSON: version, publishes,
//!   open and total streams, requests, ACKs, NACKs, open streams by type URL, gRPC method and
//!   node id, and every open stream;
//! - `POST /publish`: publishes a new snapshot now; answers `{"version": "...", "generation": n}`;
//! - `POST /extras`: replaces the extras with the JSON body (an [`ExtrasSpec`]: the fields of
//!   the `--ttl`, `--heartbeat-interval`, `--do-not-cache`, `--resource-error`,
//!   `--xdstp-authority` and `--dynamic-parameter` flags; absent fields turn that extra off)
//!   and publishes a snapshot carrying them; answers like `/publish`, or `400` with the invalid
//!   field and the extras unchanged (counted as `extras_refused`);
//! - `GET /healthz`: `200 ok`.

use std::future::Future;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::extras::{Extras, ExtrasSpec};
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
        .route("/extras", post(extras))
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

async fn extras(
    State(server): State<ManagementServer>,
    body: axum::body::Bytes,
) -> Result<Json<PublishReply>, (StatusCode, String)> {
    let refuse = |status: StatusCode, message: String| {
        tracing::warn!(%message, "POST /extras refused; extras unchanged");
        server.registry().count_extras_refused();
        (status, message)
    };
    if body.len() > MAX_EXTRAS_BODY {
        return Err(refuse(StatusCode::PAYLOAD_TOO_LARGE, format!("body larger than {MAX_EXTRAS_BODY} bytes")));
    }
    let spec: ExtrasSpec = serde_json::from_slice(&body)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("invalid extras JSON: {e}")))?;
    let extras = Extras::parse(spec).map_err(|e| refuse(StatusCode::BAD_REQUEST, e.to_string()))?;
    let published = server.set_extras(extras);
    Ok(Json(PublishReply { version: published.version().to_owned(), generation: published.generation() }))
}

/// Largest `POST /extras` body accepted, in bytes.
const MAX_EXTRAS_BODY: usize = 1024 * 1024;

async fn healthz() -> &'static str {
    "ok"
}
