//! The follower side of the peer protocol: a key's source when another node owns it.
//!
//! Like an upstream subscription, it is a task that follows the union of the key's local
//! names, applies every state the owner forwards, and reconnects with jittered backoff.
//! Failures never reach clients: the cache keeps serving while the task retries, and the
//! relay moves the key to a new owner when the ring changes. Every failed stream counts in
//! `peer_stream_errors_total{side="follower"}` with the reason of its [`FollowError`].

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
use crate::telemetry::{PeerSide, traces};
use crate::upstream::{Handoff, Liveness};

/// Why a peer stream to a key's owner ended (cancellation is not an error).
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The owner could not be reached.
    #[error("owner {owner} ({addr}) unreachable: {message}")]
    Unreachable {
        /// The owner's node name.
        owner: String,
        /// Its peer address.
        addr: SocketAddr,
        /// The transport's message.
        message: String,
    },
    /// The owner did not answer the watch in time.
    #[error("owner {owner} ({addr}) did not answer in time")]
    Timeout {
        /// The owner's node name.
        owner: String,
        /// Its peer address.
        addr: SocketAddr,
    },
    /// The owner refused the watch with a status.
    #[error("owner {owner} ({addr}) refused: {message}")]
    Refused {
        /// The owner's node name.
        owner: String,
        /// Its peer address.
        addr: SocketAddr,
        /// The status message.
        message: String,
    },
    /// The owner ended the stream because it is shutting down.
    #[error("owner {owner} is shutting down")]
    OwnerShutdown {
        /// The owner's node name.
        owner: String,
    },
    /// The stream broke with a status.
    #[error("owner {owner}: {code:?}: {message}")]
    Reset {
        /// The owner's node name.
        owner: String,
        /// The status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The owner closed the stream without a status.
    #[error("owner {owner} closed the stream")]
    Closed {
        /// The owner's node name.
        owner: String,
    },
    /// The owner forwarded a state that does not decode.
    #[error("owner {owner} sent a state that does not decode: {source}")]
    Undecodable {
        /// The owner's node name.
        owner: String,
        /// The decoding error.
        source: prost::DecodeError,
    },
}

impl FollowError {
    /// The `reason` label of `peer_stream_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::Timeout { .. } => "timeout",
            Self::Refused { .. } => "refused",
            Self::OwnerShutdown { .. } => "owner_shutdown",
            Self::Reset { .. } => "reset",
            Self::Closed { .. } => "closed",
            Self::Undecodable { .. } => "undecodable",
        }
    }
}

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
        let mut handoff = Handoff::new(handoff, &entry.metrics.sources);
        let mut liveness = Liveness::new();
        let mut backoff = Backoff::new(settings.backoff.0, settings.backoff.1);
        // State that did not come from this owner must not be followed by an older one: ask
        // for a fresh state until this task has applied one of the owner's (its later states
        // are in order, also across reconnects to the same owner).
        let mut from_owner = Progress { applied: false, fresh_needed: entry.state().is_ready() };
        loop {
            let outcome =
                follow(&settings, &entry, &owner, addr, &cancel, &mut handoff, &mut liveness, &mut from_owner).await;
            let answered = match outcome {
                // Replaced or evicted: the successor owns the connected mark.
                None => return,
                Some((answered, error)) => {
                    liveness.down(&entry);
                    entry.metrics.upstream_failures.inc();
                    entry.metrics.sources.peer_stream_error(PeerSide::Follower, error.reason());
                    let message = crate::telemetry::truncate_message(&error.to_string()).into_owned();
                    tracing::warn!(
                        key = %entry.key, type_url = %entry.type_url, owner = %owner, reason = error.reason(),
                        error = %message, "peer stream to the owner ended; retrying"
                    );
                    entry.update_upstream(|s| s.last_error = Some(message));
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

/// What a follower task has received from its owner.
struct Progress {
    /// The task applied a state of the owner's.
    applied: bool,
    /// The entry held a state from another source when the task started.
    fresh_needed: bool,
}

impl Progress {
    /// Whether the next watch must ask the owner for a fresh state.
    fn ask_fresh(&self) -> bool {
        self.fresh_needed && !self.applied
    }
}

/// One peer stream; `None` when cancelled, else whether the owner answered and why it ended.
#[allow(clippy::too_many_arguments)]
async fn follow(
    settings: &FollowerSettings,
    entry: &Arc<Entry>,
    owner: &str,
    addr: SocketAddr,
    cancel: &CancellationToken,
    handoff: &mut Handoff,
    liveness: &mut Liveness,
    progress: &mut Progress,
) -> Option<(bool, FollowError)> {
    let owner_name = || owner.to_owned();
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
        fresh: progress.ask_fresh(),
    };
    let (tx, rx) = mpsc::channel::<WatchRequest>(4);
    if tx.send(first).await.is_err() {
        return None;
    }
    let mut client = PeerClient::new(settings.channels.get(addr, owner))
        .max_decoding_message_size(settings.max_message_size)
        .max_encoding_message_size(settings.max_message_size);
    let mut inbound = tokio::select! {
        () = cancel.cancelled() => return None,
        opened = timeout(Duration::from_secs(5), client.watch(ReceiverStream::new(rx))) => match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Some((false, FollowError::Unreachable { owner: owner_name(), addr, message: status.message().to_owned() }));
            }
            Ok(Err(status)) => {
                return Some((false, FollowError::Refused { owner: owner_name(), addr, message: status.message().to_owned() }));
            }
            Err(_) => return Some((false, FollowError::Timeout { owner: owner_name(), addr })),
        },
    };
    tracing::info!(key = %entry.key, type_url = %entry.type_url, owner, address = %addr, "following key at its owner");
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
                        let error = FollowError::Reset { owner: owner_name(), code: tonic::Code::Cancelled, message: "request channel closed".into() };
                        return Some((answered, error));
                    }
                }
            }
            message = inbound.message() => match message {
                Ok(Some(update)) => {
                    let coverage: Interest = update.coverage.into();
                    let response = match DiscoveryResponse::decode(update.response) {
                        Ok(response) => response,
                        Err(source) => return Some((answered, FollowError::Undecodable { owner: owner_name(), source })),
                    };
                    let version = response.version_info.clone();
                    let traceparent = update.traceparent;
                    let fanout = |state: &crate::cache::KeyState| traces::fanout(&traceparent, &entry.key, &state.version_info, owner);
                    // Rounded up: a do_not_cache resource is never dated later than it arrived.
                    let age = std::time::Duration::from_millis(update.do_not_cache_age_ms.saturating_add(1));
                    match entry.apply_forwarded(response, &coverage, age, fanout) {
                        Ok(changed) => tracing::debug!(key = %entry.key, type_url = %entry.type_url, owner, version = %version, changed, "state from owner"),
                        Err(rejection) => {
                            entry.metrics.upstream_rejected.inc();
                            tracing::warn!(key = %entry.key, type_url = %entry.type_url, owner, version = %version, error = %rejection, "owner's state rejected; cache unchanged");
                            continue;
                        }
                    }
                    answered = true;
                    progress.applied = true;
                    liveness.up(entry);
                    entry.metrics.upstream_responses.inc();
                    entry.update_upstream(|s| s.responses += 1);
                    handoff.release();
                }
                Ok(None) => return Some((answered, FollowError::Closed { owner: owner_name() })),
                Err(status) if status.code() == tonic::Code::Unavailable && status.message() == super::OWNER_SHUTTING_DOWN => {
                    return Some((answered, FollowError::OwnerShutdown { owner: owner_name() }));
                }
                Err(status) => {
                    let error = FollowError::Reset { owner: owner_name(), code: status.code(), message: status.message().to_owned() };
                    return Some((answered, error));
                }
            },
        }
    }
}
