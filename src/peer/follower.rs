//! The follower side of the peer protocol: a key's source when another node owns it.
//!
//! Like an upstream subscription, it is a task that follows the union of the key's local
//! names, applies every state the owner forwards, and reconnects with jittered backoff.
//! Failures never reach clients: the cache keeps serving while the task retries, and the
//! relay moves the key to a new owner when the ring changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::PeerChannels;
use super::proto::WatchRequest;
use super::proto::peer_client::PeerClient;
use crate::backoff::Backoff;
use crate::cache::{Entry, Interest};
use crate::telemetry::traces;
use crate::upstream::Handoff;

/// What every follower subscription of a node shares.
#[derive(Clone)]
pub struct FollowerSettings {
    /// This node's name (the owner shows it among the key's followers).
    pub self_name: String,
    /// Channels to the other nodes.
    pub channels: PeerChannels,
    /// Reconnect backoff bounds.
    pub backoff: (Duration, Duration),
    /// Largest forwarded state accepted, in bytes.
    pub max_message_size: usize,
    /// Task tracker of the node.
    pub tracker: TaskTracker,
}

/// Starts following `entry`'s key at `owner` (`addr`); it runs until `cancel` fires.
/// `handoff` (the key's previous source) is stopped once the owner's first state applied.
pub fn spawn(
    settings: &FollowerSettings,
    entry: Arc<Entry>,
    owner: String,
    addr: SocketAddr,
    cancel: CancellationToken,
    handoff: Option<Box<dyn Send>>,
) {
    let settings = settings.clone();
    settings.tracker.clone().spawn(async move {
        let mut handoff = Handoff(handoff);
        let mut backoff = Backoff::new(settings.backoff.0, settings.backoff.1);
        loop {
            let outcome = follow(&settings, &entry, &owner, addr, &cancel, &mut handoff).await;
            entry.metrics.upstream_connected.set(0);
            entry.update_upstream(|s| s.connected = false);
            let answered = match outcome {
                None => return,
                Some((answered, error)) => {
                    entry.metrics.upstream_failures.inc();
                    entry.update_upstream(|s| s.last_error = Some(error.clone()));
                    tracing::warn!(key = %entry.key, owner = %owner, error = %error, "peer stream to the owner ended; retrying");
                    answered
                }
            };
            if answered {
                backoff.reset();
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = sleep(backoff.next_delay()) => {}
            }
        }
    });
}

/// One peer stream; `None` when cancelled, else whether the owner answered and why it ended.
async fn follow(
    settings: &FollowerSettings,
    entry: &Arc<Entry>,
    owner: &str,
    addr: SocketAddr,
    cancel: &CancellationToken,
    handoff: &mut Handoff,
) -> Option<(bool, String)> {
    let mut interest = entry.interest();
    while interest.borrow_and_update().is_empty() {
        tokio::select! {
            () = cancel.cancelled() => return None,
            changed = interest.changed() => if changed.is_err() { return None },
        }
    }
    let first = WatchRequest {
        key: entry.key.clone(),
        type_url: entry.type_url.clone(),
        node: entry.node.encode_to_vec(),
        interest: Some((&interest.borrow().clone()).into()),
        follower: settings.self_name.clone(),
    };
    let (tx, rx) = mpsc::channel::<WatchRequest>(4);
    if tx.send(first).await.is_err() {
        return None;
    }
    let mut client = PeerClient::new(settings.channels.get(addr))
        .max_decoding_message_size(settings.max_message_size)
        .max_encoding_message_size(settings.max_message_size);
    let mut inbound = tokio::select! {
        () = cancel.cancelled() => return None,
        opened = timeout(Duration::from_secs(5), client.watch(ReceiverStream::new(rx))) => match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return Some((false, format!("owner {owner} ({addr}) refused: {}", status.message()))),
            Err(_) => return Some((false, format!("owner {owner} ({addr}) did not answer in time"))),
        },
    };
    tracing::info!(key = %entry.key, owner, address = %addr, "following key at its owner");
    entry.update_upstream(|s| s.address = format!("peer:{owner} ({addr})"));
    let mut answered = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return None,
            changed = interest.changed() => {
                if changed.is_err() {
                    return None;
                }
                let wanted: Interest = interest.borrow_and_update().clone();
                if !wanted.is_empty() {
                    let request = WatchRequest { interest: Some((&wanted).into()), ..Default::default() };
                    if tx.send(request).await.is_err() {
                        return Some((answered, "request channel closed".into()));
                    }
                }
            }
            message = inbound.message() => match message {
                Ok(Some(update)) => {
                    let coverage: Interest = update.coverage.into();
                    let response = match DiscoveryResponse::decode(update.response.as_slice()) {
                        Ok(response) => response,
                        Err(e) => return Some((answered, format!("owner {owner} sent a state that does not decode: {e}"))),
                    };
                    let version = response.version_info.clone();
                    let traceparent = update.traceparent;
                    let fanout = |state: &crate::cache::KeyState| traces::fanout(&traceparent, &entry.key, &state.version_info, owner);
                    match entry.apply_forwarded(response, &coverage, fanout) {
                        Ok(changed) => tracing::debug!(key = %entry.key, owner, version = %version, changed, "state from owner"),
                        Err(rejection) => {
                            entry.metrics.upstream_rejected.inc();
                            tracing::warn!(key = %entry.key, owner, error = %rejection, "owner's state rejected; cache unchanged");
                            continue;
                        }
                    }
                    if !answered {
                        answered = true;
                        entry.metrics.upstream_connected.set(1);
                        entry.update_upstream(|s| { s.connected = true; s.last_error = None; });
                    }
                    entry.metrics.upstream_responses.inc();
                    entry.update_upstream(|s| s.responses += 1);
                    handoff.release();
                }
                Ok(None) => return Some((answered, format!("owner {owner} closed the stream"))),
                Err(status) => return Some((answered, format!("owner {owner}: {:?}: {}", status.code(), status.message()))),
            },
        }
    }
}
