//! The delta side of the management server's streams: [`DeltaProtocol`] applies
//! [`DeltaStreamState`] to the versioned form of each snapshot, and [`VersionCache`] computes
//! that form once per publish. The stream task itself is [`crate::stream_task`]'s.
//!
//! Invariants:
//! - the versions of a snapshot's resources are hashed once per publish ([`VersionCache`]),
//!   not once per stream.

use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use crate::delta::{DeltaRequestKind, DeltaSnapshot, DeltaStreamState};
use crate::publisher::Published;
use crate::stream_task::{StreamProtocol, Verdict};

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

/// The delta protocol of one stream: its [`DeltaStreamState`] and the server's shared
/// [`VersionCache`].
pub(crate) struct DeltaProtocol {
    state: DeltaStreamState,
    versions: Arc<VersionCache>,
}

// === impl DeltaProtocol ===

impl DeltaProtocol {
    /// A stream that has received nothing yet.
    pub(crate) fn new(versions: Arc<VersionCache>) -> Self {
        Self { state: DeltaStreamState::new(), versions }
    }
}

impl StreamProtocol for DeltaProtocol {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    const STREAM: &'static str = "delta stream";

    fn on_request(
        &mut self,
        request: &DeltaDiscoveryRequest,
        current: Option<&Arc<Published>>,
    ) -> (Verdict, Option<DeltaDiscoveryResponse>) {
        let snap = current.map(|p| self.versions.get(p));
        let outcome = self.state.on_request(request, snap.as_deref());
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
        let verdict = match outcome.kind {
            DeltaRequestKind::Ack => Verdict::Ack,
            DeltaRequestKind::Nack => Verdict::Nack,
            DeltaRequestKind::Initial | DeltaRequestKind::Update => Verdict::Other,
        };
        (verdict, outcome.response)
    }

    fn on_publish(&mut self, published: &Arc<Published>) -> Vec<DeltaDiscoveryResponse> {
        self.state.on_publish(&self.versions.get(published))
    }

    fn on_heartbeat(&mut self, published: &Arc<Published>) -> Vec<DeltaDiscoveryResponse> {
        self.state.on_heartbeat(&self.versions.get(published)).into_iter().collect()
    }

    fn log_response(response: &DeltaDiscoveryResponse) {
        tracing::debug!(
            type_url = %response.type_url,
            version = %response.system_version_info,
            nonce = %response.nonce,
            resources = response.resources.len(),
            removed = response.removed_resources.len(),
            "delta response"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::{Publisher, PublisherConfig};

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
