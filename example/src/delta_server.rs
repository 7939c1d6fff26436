//! One delta xDS stream of the management server: moves messages between the client, the
//! publisher and [`DeltaStreamState`], in the same shape as the SotW stream task of
//! [`crate::server`].
//!
//! Invariants:
//! - the versions of a snapshot's resources are hashed once per publish ([`VersionCache`]),
//!   not once per stream;
//! - a stream ends when the client half-closes or fails, when its response queue is gone, or on
//!   shutdown (with `UNAVAILABLE`), and it leaves the registry when it ends;
//! - a per-type stream only carries its own type URL; a request for another type ends the stream
//!   with `INVALID_ARGUMENT`, and so does an ADS request without a type URL.

use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::delta::{DeltaRequestKind, DeltaSnapshot, DeltaStreamState};
use crate::publisher::{Published, Publisher};
use crate::registry::{Registry, StreamGuard};
use crate::server::{Heartbeat, check_type_url};

/// The [`DeltaSnapshot`] of the latest publish, shared by every delta stream of a server.
#[derive(Debug, Default)]
pub struct VersionCache {
    latest: Mutex<Option<Arc<DeltaSnapshot>>>,
}

// === impl VersionCache ===

impl VersionCache {
    /// The versioned form of `published`, computed by the first stream that asks for it (and
    /// cached unless a newer one already is).
    pub fn get(&self, published: &Arc<Published>) -> Arc<DeltaSnapshot> {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = latest.as_ref().map(|s| s.published().generation());
        if let Some(snap) = latest.as_ref().filter(|_| cached == Some(published.generation())) {
            return snap.clone();
        }
        let snap = Arc::new(DeltaSnapshot::new(published.clone()));
        // A stream that raced with a publish may ask for an older snapshot: don't evict the newer.
        if cached.is_none_or(|g| g < published.generation()) {
            *latest = Some(snap.clone());
        }
        snap
    }
}

/// Everything one delta stream's task owns.
pub(crate) struct DeltaStreamTask {
    pub(crate) publisher: Publisher,
    pub(crate) versions: Arc<VersionCache>,
    pub(crate) registry: Arc<Registry>,
    /// Keeps the stream listed in the registry until the task ends.
    pub(crate) guard: StreamGuard,
    /// The only type URL of a per-type stream; `None` for ADS.
    pub(crate) fixed_type: Option<&'static str>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

// === impl DeltaStreamTask ===

impl DeltaStreamTask {
    /// Runs the stream until the client goes away, a request is invalid, or shutdown.
    pub(crate) async fn run(self, mut requests: Streaming<DeltaDiscoveryRequest>) {
        let mut snapshots = self.publisher.subscribe();
        let mut state = DeltaStreamState::new();
        let mut first = true;
        let mut heartbeat = Heartbeat::default();
        tracing::debug!("delta stream opened");
        let end = loop {
            let current = snapshots.borrow().clone();
            let due = heartbeat.due(current.as_deref());
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    break Some(Status::unavailable("management server shutting down"));
                }
                () = Heartbeat::sleep(due) => {
                    heartbeat.sent();
                    let Some(published) = current else { continue };
                    let beat = state.on_heartbeat(&self.versions.get(&published));
                    if beat.is_some() {
                        self.registry.count_heartbeat();
                    }
                    if !self.send_all(beat).await {
                        break None;
                    }
                }
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break Some(Status::unavailable("publisher stopped"));
                    }
                    let Some(published) = snapshots.borrow_and_update().clone() else { continue };
                    heartbeat.sent();
                    let snap = self.versions.get(&published);
                    if !self.send_all(state.on_publish(&snap)).await {
                        break None;
                    }
                }
                message = requests.message() => match message {
                    Ok(Some(request)) => {
                        let current = snapshots.borrow().clone().map(|p| self.versions.get(&p));
                        match self.on_request(&mut state, request, first, current.as_deref()) {
                            Ok(response) => {
                                if !self.send_all(response).await {
                                    break None;
                                }
                            }
                            Err(status) => break Some(status),
                        }
                        first = false;
                    }
                    Ok(None) => {
                        tracing::debug!("client closed the stream");
                        break None;
                    }
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), message = status.message(), "stream failed");
                        break None;
                    }
                },
            }
        };
        if let Some(status) = end {
            tracing::debug!(code = ?status.code(), message = status.message(), "ending stream");
            let _ = self.tx.try_send(Err(status));
        }
        tracing::debug!("delta stream closed");
    }

    /// Validates and applies one request; returns the response to send, if any.
    fn on_request(
        &self,
        state: &mut DeltaStreamState,
        mut request: DeltaDiscoveryRequest,
        first: bool,
        current: Option<&DeltaSnapshot>,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        self.registry.count_request();
        if first {
            let (id, cluster) = request.node.as_ref().map_or(("", ""), |n| (n.id.as_str(), n.cluster.as_str()));
            self.guard.set_node(id, cluster);
        }
        check_type_url(self.fixed_type, &mut request.type_url)?;
        self.guard.add_type(&request.type_url);
        let outcome = state.on_request(&request, current);
        match outcome.kind {
            DeltaRequestKind::Ack => self.registry.count_ack(),
            DeltaRequestKind::Nack => self.registry.count_nack(),
            _ => {}
        }
        tracing::debug!(
            type_url = %request.type_url,
            kind = ?outcome.kind,
            stale_nonce = outcome.stale_nonce,
            nonce = %request.response_nonce,
            subscribe = request.resource_names_subscribe.len(),
            unsubscribe = request.resource_names_unsubscribe.len(),
            initial_versions = request.initial_resource_versions.len(),
            error = request.error_detail.as_ref().map(|e| e.message.as_str()),
            answered = outcome.response.is_some(),
            "delta request"
        );
        Ok(outcome.response)
    }

    /// Queues responses; false when the client is gone or on shutdown.
    async fn send_all(&self, responses: impl IntoIterator<Item = DeltaDiscoveryResponse>) -> bool {
        for response in responses {
            tracing::debug!(
                type_url = %response.type_url,
                version = %response.system_version_info,
                nonce = %response.nonce,
                resources = response.resources.len(),
                removed = response.removed_resources.len(),
                "delta response"
            );
            tokio::select! {
                sent = self.tx.send(Ok(response)) => {
                    if sent.is_err() {
                        return false;
                    }
                }
                () = self.shutdown.cancelled() => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::PublisherConfig;

    #[test]
    fn version_cache_computes_once_per_publish_and_keeps_the_newest() {
        let publisher = Publisher::new(PublisherConfig::default());
        let (p1, p2) = (publisher.publish_next(), publisher.publish_next());
        let cache = VersionCache::default();
        let a = cache.get(&p1);
        assert!(Arc::ptr_eq(&a, &cache.get(&p1)));
        let b = cache.get(&p2);
        assert!(!Arc::ptr_eq(&a, &cache.get(&p1)), "older snapshot is computed, not cached");
        assert!(Arc::ptr_eq(&b, &cache.get(&p2)));
    }
}
