//! The admin API of staged rollouts: `GET /rollout` lists the keys with a version in
//! rollout; `POST /rollout/{key}/promote` and `POST /rollout/{key}/abort` act on one (a key
//! may hold `/`: the action is the last path segment).

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::json;

use super::{AdminState, message, only_post, pretty};
use crate::rollout::RolloutError;

/// `GET /rollout`: every key with a version in rollout: phase, candidate and stable versions,
/// canaries with their answers and NACK messages, time left in the bake, reason of a hold.
pub(super) async fn list(State(state): State<AdminState>) -> Response {
    let Some(rollouts) = state.relay.rollouts() else {
        return pretty(&json!({ "configured": false, "rollouts": [] }));
    };
    pretty(&json!({ "configured": true, "rollouts": rollouts.report() }))
}

/// `POST /rollout/{key}/promote` and `POST /rollout/{key}/abort`.
pub(super) async fn act(State(state): State<AdminState>, method: Method, Path(path): Path<String>) -> Response {
    if let Some(refusal) = only_post(&method) {
        return refusal;
    }
    let Some((key, action)) = path.strip_prefix('/').unwrap_or(&path).rsplit_once('/') else {
        return message(StatusCode::NOT_FOUND, "use POST /rollout/{key}/promote or POST /rollout/{key}/abort");
    };
    let Some(rollouts) = state.relay.rollouts() else {
        return message(StatusCode::NOT_FOUND, "no rollout is configured (bootstrap section rollout:)");
    };
    let done = match action {
        "promote" => rollouts.promote(key),
        "abort" => rollouts.abort(key),
        other => {
            return message(StatusCode::NOT_FOUND, format!("unknown rollout action {other:?}: use promote or abort"));
        }
    };
    match done {
        Ok(version) => {
            tracing::info!(key, action, version = %version, "rollout step by an operator");
            pretty(&json!({ "key": key, "action": action, "version": version }))
        }
        Err(error @ RolloutError::UnknownKey { .. }) => message(StatusCode::NOT_FOUND, error.to_string()),
        Err(error) => message(StatusCode::CONFLICT, error.to_string()),
    }
}
