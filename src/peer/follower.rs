//! The follower side of the peer protocol: a key's source when another node owns it.
//!
//! Like an upstream subscription, it is a task that follows the union of the key's local
//! names, applies every state the owner forwards, and reconnects with jittered backoff.
//! Failures never reach clients: the cache keeps serving while the task retries, and the
//! relay moves the key to a new owner when the ring changes. Every failed stream counts in
//! `peer_stream_errors_total{side="follower"}` with the reason of its [`FollowError`].
//!
//! Order: each stream is one owner generation as the follower sees it. The owner's serials
//! never go back on a stream, so an update whose serial is lower than the last one applied
//! from the stream (or equal with the same coverage, a replay) is dropped and counted in
//! `peer_stale_updates_total` ([`StreamOrder`]); a new stream starts a new order.
//!
//! Every task signals the node's [`HandoverSignal`] when a stream first applies a state (the
//! key is handed over to its owner) and when it ends, so that a draining node re-checks its
//! keys then.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::PeerChannels;
use super::proto::peer_client::PeerClient;
use super::proto::watch_end::Reason;
use super::proto::{Candidate as ProtoCandidate, KeyUpdate, WatchRequest, candidate};
use super::watch_end;
use crate::backoff::Backoff;
use crate::cache::Interest;
use crate::cache::lanes::{CanaryTally, OwnerVerdict, Verdict, report_version};
use crate::node_cache::Entry;
use crate::source::{Handoff, Liveness};
use crate::source::{HandoverSignal, Source};
use crate::telemetry::{PeerSide, SourceMetrics, traces};

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
    /// The owner forwarded a candidate without its body for a state this node does not hold.
    #[error("owner {owner} sent a candidate without its body for a state not held here")]
    MissingCandidateBody {
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
            Self::Undecodable { .. } | Self::MissingCandidateBody { .. } => "undecodable",
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
    /// Fired when a key is handed over to its owner or a follower task ends.
    pub handovers: HandoverSignal,
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
        follow_key(&settings, &entry, &owner, addr, &cancel, handoff).await;
        // Its handoff, if still pending, was abandoned with it.
        settings.handovers.notify();
    });
}

/// Follows the key at its owner, reconnecting after failures, until `cancel` fires.
async fn follow_key(
    settings: &FollowerSettings,
    entry: &Arc<Entry>,
    owner: &str,
    addr: SocketAddr,
    cancel: &CancellationToken,
    handoff: Option<Box<dyn Send>>,
) {
    let mut handoff = Handoff::new(handoff, &entry.metrics.sources, &settings.handovers);
    let mut liveness = Liveness::new();
    let mut backoff = Backoff::new(settings.backoff.0, settings.backoff.1);
    // State that did not come from this owner must not be followed by an older one: ask
    // for a fresh state until this task has applied one of the owner's (its later states
    // are in order, also across reconnects to the same owner).
    let mut from_owner = Progress { applied: false, fresh_needed: entry.state().is_ready() };
    loop {
        let outcome = follow(settings, entry, owner, addr, cancel, &mut handoff, &mut liveness, &mut from_owner).await;
        let answered = match outcome {
            // Replaced or evicted: the successor owns the connected mark.
            None => return,
            Some((answered, error)) => {
                liveness.down(&entry.source, &entry.metrics.upstream_connected);
                entry.metrics.upstream_failures.inc();
                entry.metrics.sources.peer_stream_error(PeerSide::Follower, error.reason());
                let message = crate::telemetry::truncate_message(&error.to_string()).into_owned();
                tracing::warn!(
                    key = %entry.key, type_url = %entry.type_url, owner = %owner, reason = error.reason(),
                    error = %message, "peer stream to the owner ended; retrying"
                );
                entry.source.update_status(|s| s.last_error = Some(message));
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
}

/// The order of one stream's updates. The owner's serial grows with every change of version
/// or content and stays when only the coverage changed (the owner then resends the state), so
/// an update follows the last one applied when its serial is higher, or the same with another
/// coverage. Anything else is stale: a replay, or an older state arriving late.
#[derive(Debug, Default)]
struct StreamOrder {
    /// The serial and coverage of the last update applied from the stream.
    last: Option<(u64, Interest)>,
}

impl StreamOrder {
    /// Whether an update of `serial` covering `coverage` follows the last one applied; when
    /// it does not, counts it in `metrics` (`peer_stale_updates_total`) and logs it.
    fn admit(&self, serial: u64, coverage: &Interest, metrics: &SourceMetrics, key: &str, owner: &str) -> bool {
        let follows = match &self.last {
            None => true,
            Some((last, last_coverage)) => serial > *last || (serial == *last && coverage != last_coverage),
        };
        if !follows {
            metrics.stale_peer_updates.inc();
            tracing::warn!(
                key, owner, serial, last = ?self.last.as_ref().map(|(s, _)| s),
                "owner's update is not after the last one applied from this stream; dropped"
            );
        }
        follows
    }

    /// True when `serial` and `coverage` are those of the last update applied from the stream.
    fn is_last(&self, serial: u64, coverage: &Interest) -> bool {
        self.last.as_ref().is_some_and(|(last, last_coverage)| *last == serial && last_coverage == coverage)
    }

    /// Records the update of `serial` covering `coverage` as applied.
    fn applied(&mut self, serial: u64, coverage: Interest) {
        self.last = Some((serial, coverage));
    }
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
        canary_report: None,
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
    entry.source.update_status(|s| s.address = format!("peer:{owner} ({addr})"));
    let mut answered = false;
    let mut order = StreamOrder::default();
    let mut candidates = CandidateOrder::default();
    // A staged key's canary answers go to the owner: only the latest is kept until the request
    // stream has room, so updates are read meanwhile.
    let mut tallies = entry.lanes().map(|lanes| lanes.subscribe_tally());
    let mut pending_report: Option<CanaryTally> = None;
    // The owner's newest generation reported on this stream: an older tally is never sent after it.
    let mut last_reported: Option<u64> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return None,
            Some(tally) = next_tally(&mut tallies) => queue_report(&mut pending_report, tally, last_reported),
            permit = tx.reserve(), if pending_report.is_some() => match permit {
                Ok(permit) => {
                    let report = pending_report.take();
                    last_reported = report.as_ref().map(|tally| tally.generation).max(last_reported);
                    permit.send(WatchRequest { canary_report: report.as_ref().map(Into::into), ..Default::default() });
                }
                Err(_) => {
                    let error = FollowError::Reset { owner: owner_name(), code: tonic::Code::Cancelled, message: "request channel closed".into() };
                    return Some((answered, error));
                }
            },
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
                Ok(Some(mut update)) => {
                    let candidate = update.candidate.take();
                    match apply_stable(entry, owner, update, &mut order) {
                        Ok(true) => {
                            progress.applied = true;
                            liveness.up(&entry.source, &entry.metrics.upstream_connected);
                            entry.metrics.upstream_responses.inc();
                            entry.source.update_status(|s| s.responses += 1);
                            handoff.release();
                            entry.source.peer_delivered(&Source::Peer { name: owner.to_owned(), addr });
                            if !answered {
                                // The key is handed over to its owner (or back to it after a break).
                                settings.handovers.notify();
                            }
                            answered = true;
                        }
                        Ok(false) => {}
                        Err(source) => return Some((answered, FollowError::Undecodable { owner: owner_name(), source })),
                    }
                    match apply_candidate(entry, owner, candidate, &mut candidates) {
                        Ok(Some(report)) => queue_report(&mut pending_report, report, last_reported),
                        Ok(None) => {}
                        Err(CandidateError::Undecodable(source)) => return Some((answered, FollowError::Undecodable { owner: owner_name(), source })),
                        Err(CandidateError::MissingBody) => return Some((answered, FollowError::MissingCandidateBody { owner: owner_name() })),
                    }
                }
                Ok(None) => return Some((answered, FollowError::Closed { owner: owner_name() })),
                Err(status) if watch_end::end_reason(&status) == Some(Reason::OwnerShuttingDown) => {
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

/// Applies the stable part of an owner's update; `Ok(true)` when it was applied (changed or
/// not), `Ok(false)` when it was skipped (stale, a confirmation, or rejected: logged and
/// counted), `Err` when it does not decode.
fn apply_stable(
    entry: &Entry,
    owner: &str,
    update: KeyUpdate,
    order: &mut StreamOrder,
) -> Result<bool, prost::DecodeError> {
    let coverage: Interest = update.coverage.into();
    let serial = update.serial;
    if !update.stale && order.is_last(serial, &coverage) {
        // The owner's origin confirmed the state it had sent from disk (or the update carries
        // only a change of the candidate).
        entry.source.set_stale(false);
        return Ok(false);
    }
    if update.stale && entry.state().is_ready() {
        // The owner serves this from its disk, which may be older than what this node holds:
        // keep it until the owner's origin answers.
        tracing::debug!(key = %entry.key, type_url = %entry.type_url, owner, serial, "owner's state from disk not applied over a state held here");
        return Ok(false);
    }
    if !order.admit(serial, &coverage, &entry.metrics.sources, &entry.key, owner) {
        return Ok(false);
    }
    let response = DiscoveryResponse::decode(update.response)?;
    let version = response.version_info.clone();
    let traceparent = update.traceparent;
    let fanout = |state: &crate::cache::KeyState| traces::fanout(&traceparent, &entry.key, &state.version_info, owner);
    // Rounded up: a do_not_cache resource is never dated later than it arrived.
    let age = Duration::from_millis(update.do_not_cache_age_ms.saturating_add(1));
    match entry.apply_forwarded(response, &coverage, age, update.stale, fanout) {
        Ok(changed) => {
            tracing::debug!(key = %entry.key, type_url = %entry.type_url, owner, version = %version, changed, "state from owner");
        }
        Err(rejection) => {
            entry.metrics.upstream_rejected.inc();
            tracing::warn!(key = %entry.key, type_url = %entry.type_url, owner, version = %version, error = %rejection, "owner's state rejected; cache unchanged");
            return Ok(false);
        }
    }
    order.applied(serial, coverage);
    Ok(true)
}

/// The order of one stream's candidates: the owner's generations never go back on a stream,
/// and within one a candidate rolled back is never offered again.
#[derive(Debug, Default)]
struct CandidateOrder {
    /// What was last applied: generation, serial, coverage, rolled back.
    last: Option<(u64, u64, Interest, bool)>,
}

/// Why an owner's candidate ends the stream.
enum CandidateError {
    /// Its state does not decode.
    Undecodable(prost::DecodeError),
    /// It came without its body for a state this node does not hold.
    MissingBody,
}

/// Applies the candidate part of an owner's update: none ends a rollout here; one is served
/// to this node's canaries with the owner's verdict. Returns a report to send the owner at
/// once: this node's latest tally when the stream brings a new generation (the owner needs a
/// report on every stream), or an empty one when this node cannot try the candidate (no
/// rollout policy for the key here, or the candidate was rejected). `Err` when it does not
/// decode or comes without its body.
fn apply_candidate(
    entry: &Entry,
    owner: &str,
    candidate: Option<ProtoCandidate>,
    order: &mut CandidateOrder,
) -> Result<Option<CanaryTally>, CandidateError> {
    let Some(candidate) = candidate else {
        order.last = None;
        if let Some(lanes) = entry.lanes() {
            lanes.end_candidate();
        }
        return Ok(None);
    };
    let coverage: Interest = candidate.coverage.into();
    let generation = candidate.generation;
    let (same_generation, same_state) = match &order.last {
        Some((last, _, _, _)) if generation < *last => {
            entry.metrics.sources.stale_peer_updates.inc();
            tracing::warn!(key = %entry.key, owner, generation, last, "owner's candidate is older than the last one from this stream; dropped");
            return Ok(None);
        }
        Some((last, _, _, true)) if generation == *last && !candidate.rolled_back => {
            entry.metrics.sources.stale_peer_updates.inc();
            tracing::warn!(key = %entry.key, owner, generation, "owner offers a rolled-back candidate again; dropped");
            return Ok(None);
        }
        Some((last, serial, last_coverage, _)) => {
            (*last == generation, *last == generation && *serial == candidate.serial && *last_coverage == coverage)
        }
        None => (false, false),
    };
    let verdict = OwnerVerdict {
        generation,
        verdict: match candidate::Phase::try_from(candidate.phase) {
            Ok(candidate::Phase::Held) => Some(Verdict { aborted: false, reason: candidate.reason }),
            Ok(candidate::Phase::Aborted) => Some(Verdict { aborted: true, reason: candidate.reason }),
            _ => None,
        },
        rolled_back: candidate.rolled_back,
    };
    order.last = Some((generation, candidate.serial, coverage.clone(), candidate.rolled_back));
    let cannot_try = |version: &str| CanaryTally {
        generation,
        version: report_version(version).into_owned(),
        clients: u32::try_from(entry.local_clients()).unwrap_or(u32::MAX),
        cannot_try: true,
        ..CanaryTally::default()
    };
    if same_state {
        if let Some(lanes) = entry.lanes() {
            lanes.owner_verdict(&verdict);
        }
        return Ok(None);
    }
    if candidate.response.is_empty() {
        // The owner sends the body once per state on a stream: an empty one for a state this
        // node does not hold is an owner's error, never an empty state. A new stream resends it.
        return Err(CandidateError::MissingBody);
    }
    let response = DiscoveryResponse::decode(candidate.response).map_err(CandidateError::Undecodable)?;
    let version = response.version_info.clone();
    let Some(lanes) = entry.lanes() else {
        // No rollout policy applies to the key here: every client keeps the stable state, and
        // the owner hears that this node has no canary for the version.
        tracing::debug!(key = %entry.key, owner, version = %version, "owner's candidate of a key without rollout policy here; not served");
        return Ok((!same_generation).then(|| cannot_try(&version)));
    };
    let traceparent = candidate.traceparent;
    let fanout = |state: &crate::cache::KeyState| traces::fanout(&traceparent, &entry.key, &state.version_info, owner);
    let age = Duration::from_millis(candidate.do_not_cache_age_ms.saturating_add(1));
    if let Err(rejection) = entry.apply_forwarded_candidate(response, &coverage, age, &verdict, fanout) {
        entry.metrics.upstream_rejected.inc();
        tracing::warn!(key = %entry.key, type_url = %entry.type_url, owner, version = %version, error = %rejection, "owner's candidate rejected; it reaches no client here");
        // The owner moved on from any earlier candidate: none is served here.
        lanes.end_candidate();
        return Ok(Some(cannot_try(&version)));
    }
    tracing::debug!(key = %entry.key, type_url = %entry.type_url, owner, version = %version, generation, "candidate from owner");
    if same_generation {
        return Ok(None);
    }
    // A new generation on this stream: the owner gets this node's tally on it even when the
    // controller had already published it (to a previous stream).
    let tally = lanes.subscribe_tally().borrow().clone();
    Ok(tally.filter(|t| t.generation == generation && t.version == report_version(&version)))
}

/// Keeps `tally` as the report to send next, unless it is about an older generation than the
/// one pending or last sent on the stream (a late tally of a replaced candidate).
fn queue_report(pending: &mut Option<CanaryTally>, tally: CanaryTally, last_reported: Option<u64>) {
    let newest = pending.as_ref().map(|p| p.generation).max(last_reported);
    if newest.is_none_or(|newest| tally.generation >= newest) {
        *pending = Some(tally);
    }
}

/// The next tally of this node's canaries to report (pending forever on a key without lanes,
/// or once the lanes are gone).
async fn next_tally(tallies: &mut Option<watch::Receiver<Option<CanaryTally>>>) -> Option<CanaryTally> {
    let Some(receiver) = tallies else { return std::future::pending().await };
    loop {
        if receiver.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Some(tally) = receiver.borrow_and_update().clone() {
            return Some(tally);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    fn coverage(names: &[&str]) -> Interest {
        Interest { names: names.iter().map(|n| (*n).to_owned()).collect(), ..Interest::default() }
    }

    #[test]
    fn a_late_tally_of_an_older_generation_never_replaces_a_newer_report() {
        let tally = |generation| CanaryTally { generation, ..CanaryTally::default() };
        let mut pending = None;
        queue_report(&mut pending, tally(5), None);
        queue_report(&mut pending, tally(4), None);
        assert_eq!(pending.as_ref().map(|t| t.generation), Some(5), "not over the pending one");
        pending = None;
        queue_report(&mut pending, tally(4), Some(5));
        assert!(pending.is_none(), "not after a newer one was sent");
        queue_report(&mut pending, tally(5), Some(5));
        assert_eq!(pending.map(|t| t.generation), Some(5), "the same generation's newer answers go");
    }

    #[test]
    fn a_replayed_or_older_update_is_dropped_and_counted() {
        let metrics = Metrics::new();
        let sources = metrics.sources();
        let mut order = StreamOrder::default();
        let admit = |order: &StreamOrder, serial: u64, names: &[&str]| {
            order.admit(serial, &coverage(names), sources, "prod_cds", "relay-2")
        };
        assert!(admit(&order, 7, &["a"]), "a new stream takes any first serial");
        order.applied(7, coverage(&["a"]));
        assert!(!admit(&order, 7, &["a"]), "the same update replayed");
        assert!(!admit(&order, 6, &["a", "b"]), "an older state, whatever its coverage");
        assert_eq!(sources.stale_peer_updates.get(), 2);
        assert!(admit(&order, 7, &["a", "b"]), "the same state resent for a new coverage");
        order.applied(7, coverage(&["a", "b"]));
        assert!(!admit(&order, 7, &["a", "b"]), "and that one replayed");
        assert!(order.is_last(7, &coverage(&["a", "b"])), "a confirmation of the state held");
        assert!(!order.is_last(7, &coverage(&["a"])) && !order.is_last(6, &coverage(&["a", "b"])));
        assert!(admit(&order, 8, &["a", "b"]), "the next change");
        assert_eq!(sources.stale_peer_updates.get(), 3, "only the stale updates count");
        assert!(
            StreamOrder::default().admit(1, &coverage(&["a"]), sources, "prod_cds", "relay-2"),
            "a new stream is a new order"
        );
    }
}
