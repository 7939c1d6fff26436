//! Pass-through of requests that no aggregation rule maps (`server.pass_through_unmapped`).
//!
//! When the setting is on, a stream's type for which no rule matches (the keyer's
//! [`KeyError::NoRuleMatched`]) is not refused: it watches a *private* key of its own,
//! `passthrough/<type>/<node id>/<stream>`, through the ordinary cache and upstream machinery,
//! so the relay opens one origin stream for it with exactly that client's node and names, and
//! every protocol path (SotW and delta, ADS ordering, ACK/NACK records, origin retries and
//! failover, TLS to the origin) applies unchanged.
//!
//! Invariants:
//! - a private key belongs to one (stream, type): the stream number is unique in the process
//!   and the keyer may not produce a key under [`KEY_PREFIX`] while pass-through is on (such a
//!   request is refused), so no other client, and no follower node, ever watches it;
//! - a private key leaves the cache as soon as its stream stops watching it (the stream ends,
//!   the type's interest becomes empty, or the type moves to a shared key): its origin stream
//!   stops then, with no idle grace;
//! - a private key is an ordinary active key for the limits: it counts in
//!   `limits.max_active_keys` (and its stream in `server.max_streams`), so pass-through cannot
//!   open more origin streams than the limits allow;
//! - whether a rule matches depends only on the request's type and node, and a stream's node
//!   is fixed by its first request, so a type that passes through stays so for the stream's
//!   life; other keyer errors (a matching rule that cannot build its piece, an EDS request
//!   without names) are refused as without pass-through.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Shared;
use crate::keyer::KeyError;
use crate::xds;

/// Prefix of every private pass-through key; reserved while pass-through is on.
pub const KEY_PREFIX: &str = "passthrough/";

/// Most bytes of the node id written into a private key (the stream number makes the key
/// unique; the node id is there for the operator).
const MAX_NODE_ID_IN_KEY: usize = 128;

/// Source of stream numbers, unique in the process.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// A stream number no other stream of this process has.
fn next_stream_number() -> u64 {
    NEXT_STREAM.fetch_add(1, Ordering::Relaxed)
}

/// True when a request the keyer could not map with `error` passes through: only when no
/// rule matched it at all.
pub fn applies(error: &KeyError) -> bool {
    matches!(error, KeyError::NoRuleMatched { .. })
}

/// True when `key` has the shape of a private pass-through key.
pub fn is_private_key(key: &str) -> bool {
    key.starts_with(KEY_PREFIX)
}

/// The private key of stream `stream`'s type `type_url` (node id cut to
/// [`MAX_NODE_ID_IN_KEY`] bytes on a character boundary).
pub fn private_key(type_url: &str, node_id: &str, stream: u64) -> String {
    let mut end = node_id.len().min(MAX_NODE_ID_IN_KEY);
    while !node_id.is_char_boundary(end) {
        end -= 1;
    }
    format!("{KEY_PREFIX}{}/{}/{stream}", xds::short_name(type_url), &node_id[..end])
}

/// A stream's pass-through state, made when it first needs a private key (so a stream that
/// never passes anything through holds only an empty pointer): its number, and the private
/// key of each type it watches through one.
pub(super) struct StreamKeys {
    number: u64,
    keys: Vec<PrivateKey>,
}

impl StreamKeys {
    /// A stream's state with a new stream number.
    pub(super) fn new() -> Self {
        Self { number: next_stream_number(), keys: Vec::new() }
    }

    /// The private key of this stream's `type_url`.
    pub(super) fn key_for(&self, type_url: &str, node_id: &str) -> String {
        private_key(type_url, node_id, self.number)
    }

    /// Releases the private key of `type_url`, if any; call it after dropping its watcher.
    pub(super) fn release(&mut self, type_url: &str) {
        self.keys.retain(|p| p.type_url != type_url);
    }

    /// Records that `type_url` now watches its private key `key`.
    pub(super) fn opened(&mut self, shared: &Arc<Shared>, key: String, type_url: &str, peer: &str, node_id: &str) {
        self.release(type_url);
        self.keys.push(PrivateKey::opened(shared, key, type_url, peer, node_id));
    }
}

/// A (stream, type)'s private key while its stream watches it: counted in the
/// `passthrough_streams` gauge, and removed from the cache (stopping its origin stream) when
/// dropped, which the stream does after dropping the key's watcher.
struct PrivateKey {
    key: String,
    type_url: String,
    peer: String,
    shared: Arc<Shared>,
}

impl PrivateKey {
    /// Records that the stream from `peer` now watches `key` for `type_url`.
    fn opened(shared: &Arc<Shared>, key: String, type_url: &str, peer: &str, node_id: &str) -> Self {
        shared.metrics.passthrough_streams.inc();
        shared.metrics.passthrough_streams_total.inc();
        tracing::info!(peer, node = node_id, key = %key, type_url, "pass-through stream opened: no aggregation rule maps the request");
        Self { key, type_url: type_url.to_owned(), peer: peer.to_owned(), shared: shared.clone() }
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.shared.source.release(&self.key);
        self.shared.metrics.passthrough_streams.dec();
        tracing::info!(peer = %self.peer, key = %self.key, type_url = %self.type_url, "pass-through stream closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_keys_are_per_stream_and_type_and_bounded() {
        let a = private_key(xds::CLUSTER, "envoy-1", 7);
        assert_eq!(a, "passthrough/cds/envoy-1/7");
        assert!(is_private_key(&a));
        assert_ne!(a, private_key(xds::CLUSTER, "envoy-1", 8));
        assert_ne!(a, private_key(xds::LISTENER, "envoy-1", 7));
        let custom = private_key("type.googleapis.com/acme.Thing", "n", 1);
        assert_eq!(custom, "passthrough/acme.Thing/n/1");
        let long = "é".repeat(200);
        let key = private_key(xds::CLUSTER, &long, 3);
        assert!(key.len() <= KEY_PREFIX.len() + "cds/".len() + MAX_NODE_ID_IN_KEY + "/3".len(), "{key}");
        assert!(key.ends_with("/3"));
        assert!(!is_private_key("staging_cds"));
    }

    #[test]
    fn only_requests_no_rule_matches_pass_through() {
        let unmatched =
            KeyError::NoRuleMatched { type_url: xds::CLUSTER.into(), node_id: "n".into(), cluster: "c".into() };
        assert!(applies(&unmatched));
        assert!(!applies(&KeyError::MissingResourceNames { type_url: xds::ENDPOINT.into() }));
        assert!(!applies(&KeyError::EmptyTypeUrl));
    }

    #[test]
    fn every_stream_has_its_own_keys() {
        let (a, b) = (StreamKeys::new(), StreamKeys::new());
        assert_ne!(a.key_for(xds::CLUSTER, "n"), b.key_for(xds::CLUSTER, "n"));
        assert_eq!(a.key_for(xds::CLUSTER, "n"), a.key_for(xds::CLUSTER, "n"), "stable for the stream's life");
    }
}
