//! The owner side of the peer protocol: serves keys to followers like downstream clients.
//!
//! Invariant: a key asked by a peer is always served by this node itself (from the origin);
//! the request is never forwarded, so two nodes can never follow each other for a key.
//!
//! Who may ask ([`PeerAuth`]): with cluster TLS, only a caller whose client certificate names
//! a current member of the cluster ([`identity::member_name`](super::identity::member_name))
//! gets `Watch` and `Status`, and a watch must name that member as its follower; `Identify` is
//! answered to any relay certificate of the cluster (a member verifying this node may not be
//! verified by it yet). In insecure mode (`cluster.insecure: true`, no TLS) callers cannot be
//! identified and every caller is served; the checks on the watch itself still apply.
//!
//! What may be asked: a watch is refused when this node does not own the key on its ring,
//! when the key's rules do not map the watch's type and node to that key, when the key holds
//! another type, or when it exceeds a limit of the `limits:` section, as a client's request
//! would: a request over `max_request_bytes` (the server's decoding limit), a node over
//! `max_node_bytes`, a key over `max_key_length`, a key that would take this node past
//! `max_active_keys` (followers count as clients), or names that would take the key's union
//! past `max_names_per_key` (a follower's names are its own node's union, so the per-request
//! limit does not apply to them; a later change of names over it ends the stream the same
//! way). Every refusal is a [`PeerRefusal`]: a gRPC status with a message, a warning with the
//! peer's address and claimed name, and `peer_rejected_total{reason}` (`limit` or
//! `too_large` for limits, which also count in `limit_refusals_total{limit}`).
//!
//! Failed follower streams are counted through [`KeyOwner::peer_stream_error`] with a reason:
//! `bad_request` (the first request does not name a key, or its node does not decode, or a
//! later request does not decode),
//! `watch_refused` (the key cannot take the watcher, or the watch was refused as above) and
//! `reset` (the follower's request stream broke for another reason than its own cancellation).
//!
//! Every follower stream runs in a task of the node's tree ([`ServiceTasks`]). When the node
//! shuts down it ends with `UNAVAILABLE` carrying the typed reason
//! [`OwnerShuttingDown`](super::proto::watch_end::Reason::OwnerShuttingDown) (see
//! [`watch_end`](super::watch_end)); like every final status, it waits at most
//! [`limit::FINAL_STATUS_WAIT`] for a follower that stopped reading.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use super::identity::{self, IdentityError};
use super::proto::peer_server::Peer;
use super::proto::{
    CanaryReport, Candidate as ProtoCandidate, IdentifyReply, IdentifyRequest, KeyUpdate, StatusReply, StatusRequest,
    WatchRequest, canary_answer, candidate,
};
use crate::cache::lanes::{Answer, CanaryAnswer, CanaryTally, MAX_REPORTED_VERSION, Verdict};
use crate::cache::{CacheError, ClientInfo, Interest, KeyState, LaneSnapshot, Lanes};
use crate::config::Limits;
use crate::limit::{self, LimitRefusal, StreamError};
use crate::node_cache::Watcher;
use crate::source::HandoverSignal;
use crate::status::{NodeIdentity, NodeReport};
use crate::telemetry::traces;

/// What the peer service needs from the relay.
pub trait KeyOwner: Send + Sync + 'static {
    /// Registers a follower of `key`; the key is then taken from the origin on this node.
    ///
    /// # Errors
    /// A [`CacheError`] when the key cannot take this watcher.
    fn watch_as_owner(
        &self,
        key: &str,
        type_url: &str,
        node: &Node,
        client: ClientInfo,
        interest: Interest,
    ) -> Result<Watcher, CacheError>;

    /// Checks that this node serves a watch of `key` for `type_url` and `node` (wanting
    /// `interest`): it owns the key on its ring, and its rules map the request to the key.
    ///
    /// # Errors
    /// [`PeerRefusal::NotOwner`] or [`PeerRefusal::KeyMismatch`].
    fn check_watch(&self, key: &str, type_url: &str, node: &Node, interest: &Interest) -> Result<(), PeerRefusal>;

    /// Whether `name` is a live member of the cluster as this node sees it now.
    fn is_member(&self, name: &str) -> bool;

    /// This node's name and generation.
    fn identify(&self) -> NodeIdentity;

    /// What this node holds.
    fn status(&self) -> NodeReport;

    /// Counts a follower stream opening (+1) or closing (-1).
    fn follower_streams(&self, delta: i64);

    /// Counts a follower stream that failed on this side, for `reason` (snake_case).
    fn peer_stream_error(&self, reason: &'static str);

    /// Counts a peer call refused, for `reason` ([`PeerRefusal::reason`]).
    fn peer_rejected(&self, reason: &'static str);

    /// Counts a peer call refused by `limit`, a field of the `limits:` section.
    fn limit_refused(&self, limit: &'static str);
}

/// Who may call the peer service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAuth {
    /// No cluster TLS (`cluster.insecure: true`): callers cannot be identified and are all
    /// served. Only for networks where every peer-port client is trusted.
    Insecure,
    /// Cluster mTLS: callers must present a certificate naming a current member of the cluster.
    Members {
        /// The cluster id of the members' SAN URIs.
        cluster_id: String,
    },
}

/// Why a peer call was refused; each variant maps to one status code and metric reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    /// The caller presented no certificate.
    #[error("the peer protocol is served to cluster members only: present the member's peer certificate")]
    NoCertificate,
    /// The caller's certificate names no member of the cluster.
    #[error("the client certificate does not identify a member: {0}")]
    BadCertificate(IdentityError),
    /// The certificate names a node that is not a live member now.
    #[error("{name} is not a live member of the cluster")]
    NotAMember {
        /// The name on the certificate.
        name: String,
    },
    /// The watch names another follower than the certificate.
    #[error("the watch names follower {claimed:?} but the certificate names {name}")]
    FollowerMismatch {
        /// The name on the certificate.
        name: String,
        /// The follower named in the watch.
        claimed: String,
    },
    /// This node does not own the key.
    #[error("this node does not own key {key} (its ring gives it to {owner})")]
    NotOwner {
        /// The key.
        key: String,
        /// The owner on this node's ring (`nobody` for an empty ring).
        owner: String,
    },
    /// The key's rules map the watch's type and node to another key.
    #[error("key {key} does not match the watch: type {type_url} and node {node_id:?} map to {mapped}")]
    KeyMismatch {
        /// The key asked for.
        key: String,
        /// The watch's type URL.
        type_url: String,
        /// The watch's node id.
        node_id: String,
        /// What the rules give (a key, or why there is none).
        mapped: String,
    },
    /// The key holds another type.
    #[error("key {key} holds type {existing}, not {requested}")]
    TypeConflict {
        /// The key.
        key: String,
        /// The key's type.
        existing: String,
        /// The type asked for.
        requested: String,
    },
    /// A request exceeded a limit of the `limits:` section.
    #[error(transparent)]
    Limit(LimitRefusal),
}

impl PeerRefusal {
    /// The `reason` label of `peer_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::BadCertificate(_) => "bad_certificate",
            Self::NotAMember { .. } => "not_a_member",
            Self::FollowerMismatch { .. } => "follower_mismatch",
            Self::NotOwner { .. } => "not_owner",
            Self::KeyMismatch { .. } => "key_mismatch",
            Self::TypeConflict { .. } => "type_conflict",
            Self::Limit(LimitRefusal::RequestBytes { .. }) => "too_large",
            Self::Limit(_) => "limit",
        }
    }

    /// The gRPC status the caller gets.
    pub fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Self::NoCertificate | Self::BadCertificate(_) => Status::unauthenticated(message),
            Self::NotAMember { .. } | Self::FollowerMismatch { .. } => Status::permission_denied(message),
            Self::NotOwner { .. } | Self::TypeConflict { .. } => Status::failed_precondition(message),
            Self::KeyMismatch { .. } => Status::invalid_argument(message),
            Self::Limit(refusal) => refusal.status(),
        }
    }
}

/// The node's task tree as the peer service joins it: every follower stream's task is
/// tracked by `tracker` and ends when `shutdown` fires; `handovers` fires when one ends.
#[derive(Clone)]
pub struct ServiceTasks {
    /// The node's task tracker.
    pub tracker: TaskTracker,
    /// The node's shutdown token.
    pub shutdown: CancellationToken,
    /// Fired whenever a follower's stream ends (a drain waits for followers to leave).
    pub handovers: HandoverSignal,
}

/// The `xdsrelay.peer.v1.Peer` service.
pub struct PeerService {
    owner: Arc<dyn KeyOwner>,
    auth: PeerAuth,
    limits: Limits,
    tasks: ServiceTasks,
}

impl PeerService {
    /// A service serving keys through `owner` to the callers `auth` admits, within `limits`
    /// (the server must decode requests of at most `limits.max_request_bytes`); its follower
    /// streams run in `tasks` until its shutdown.
    pub fn new(owner: Arc<dyn KeyOwner>, auth: PeerAuth, limits: Limits, tasks: ServiceTasks) -> Self {
        Self { owner, auth, limits, tasks }
    }

    /// The member the caller's certificate names (`None` in insecure mode); with
    /// `require_member`, only a live member is admitted.
    fn caller<T>(&self, request: &Request<T>, require_member: bool) -> Result<Option<String>, PeerRefusal> {
        let PeerAuth::Members { cluster_id } = &self.auth else { return Ok(None) };
        let certs = request.peer_certs().ok_or(PeerRefusal::NoCertificate)?;
        let leaf = certs.first().ok_or(PeerRefusal::NoCertificate)?;
        let name = identity::member_name(leaf, cluster_id).map_err(PeerRefusal::BadCertificate)?;
        if require_member && !self.owner.is_member(&name) {
            return Err(PeerRefusal::NotAMember { name });
        }
        Ok(Some(name))
    }

    /// Counts and logs `refusal` of a call from `peer` (claiming `name`) and returns its status.
    fn refuse(&self, refusal: &PeerRefusal, call: &'static str, peer: &str, name: Option<&str>) -> Status {
        self.owner.peer_rejected(refusal.reason());
        if let PeerRefusal::Limit(limit) = refusal {
            self.owner.limit_refused(limit.field());
        }
        tracing::warn!(call, peer = %peer, member = name.unwrap_or(""), reason = refusal.reason(), error = %refusal, "peer call refused");
        refusal.status()
    }

    /// The refusal for a request stream error, if it is the decoding limit.
    fn too_large(&self, status: &Status) -> Option<PeerRefusal> {
        (limit::classify_stream_error(status) == StreamError::TooLarge).then(|| {
            PeerRefusal::Limit(LimitRefusal::RequestBytes {
                limit: self.limits.max_request_bytes,
                detail: status.message().to_owned(),
            })
        })
    }

    /// Checks a watch's first request against the limits a request can exceed by itself:
    /// its node's size (before decoding it) and its key's length.
    fn check_first(&self, first: &WatchRequest) -> Result<(), LimitRefusal> {
        check_node_bytes(&first.node, self.limits.max_node_bytes)?;
        limit::check_key_length(&first.key, self.limits.max_key_length)
    }
}

/// Checks the size of a peer request's encoded node.
fn check_node_bytes(node: &[u8], limit: usize) -> Result<(), LimitRefusal> {
    if node.len() > limit {
        return Err(LimitRefusal::NodeBytes { bytes: node.len(), limit });
    }
    Ok(())
}

/// Why a follower's stream ended early.
enum FollowerEnd {
    /// This node is shutting down.
    Shutdown,
    /// A later request exceeded a limit.
    Refused(LimitRefusal),
    /// The request stream broke: its status (passed on to the follower).
    Broken(Status),
    /// A later request did not decode.
    Malformed(Status),
}

fn remote(request: &Request<impl Sized>) -> String {
    request.remote_addr().map(|a| a.to_string()).unwrap_or_default()
}

#[tonic::async_trait]
impl Peer for PeerService {
    type WatchStream = ReceiverStream<Result<KeyUpdate, Status>>;

    async fn watch(&self, request: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let peer = remote(&request);
        let caller = self.caller(&request, true).map_err(|r| self.refuse(&r, "watch", &peer, None))?;
        let name = caller.as_deref();
        let mut inbound = request.into_inner();
        let bad_request = |status: Status| {
            self.owner.peer_stream_error("bad_request");
            tracing::warn!(peer = %peer, member = name.unwrap_or(""), error = %status.message(), "peer watch request refused");
            status
        };
        let first = match inbound.message().await {
            Ok(Some(first)) => first,
            Ok(None) => {
                return Err(bad_request(Status::invalid_argument("a watch starts with a request naming the key")));
            }
            Err(status) => {
                if let Some(refusal) = self.too_large(&status) {
                    return Err(self.refuse(&refusal, "watch", &peer, name));
                }
                self.owner.peer_stream_error("reset");
                return Err(status);
            }
        };
        if first.key.is_empty() || first.type_url.is_empty() {
            return Err(bad_request(Status::invalid_argument(
                "the first watch request must name the key and its type_url",
            )));
        }
        let refused = |refusal: PeerRefusal| {
            // `refuse` logs it and counts its reason; this keeps the owner-side stream error count.
            self.owner.peer_stream_error("watch_refused");
            self.refuse(&refusal, "watch", &peer, name)
        };
        self.check_first(&first).map_err(|r| refused(PeerRefusal::Limit(r)))?;
        let node = Node::decode(first.node.as_slice()).map_err(|e| {
            bad_request(Status::invalid_argument(format!("the watch request's node does not decode: {e}")))
        })?;
        if let Some(name) = name
            && first.follower != name
        {
            return Err(refused(PeerRefusal::FollowerMismatch {
                name: name.to_owned(),
                claimed: first.follower.clone(),
            }));
        }
        let interest: Interest = first.interest.clone().into();
        self.owner.check_watch(&first.key, &first.type_url, &node, &interest).map_err(&refused)?;
        let client = ClientInfo {
            node_id: node.id.clone(),
            node_cluster: node.cluster.clone(),
            peer: peer.clone(),
            follower: Some(first.follower.clone()),
        };
        let watcher =
            self.owner.watch_as_owner(&first.key, &first.type_url, &node, client, interest).map_err(|error| {
                refused(match error {
                    CacheError::TypeConflict { key, existing, requested } => {
                        PeerRefusal::TypeConflict { key, existing, requested }
                    }
                    CacheError::Limit(limit) => PeerRefusal::Limit(limit),
                })
            })?;
        // A follower holding state from elsewhere gets only states fetched after it asked.
        let fresh_from = first.fresh.then(|| watcher.entry().source.freshness.require_fresh());
        tracing::info!(key = %first.key, type_url = %first.type_url, follower = %first.follower, fresh = first.fresh, "peer follows key");
        let (tx, rx) = mpsc::channel(2);
        let owner = self.owner.clone();
        let ServiceTasks { tracker, shutdown, handovers } = self.tasks.clone();
        let limits = self.limits;
        owner.follower_streams(1);
        tracker.spawn(async move {
            let key = first.key;
            let follower = first.follower;
            let refused_report = |reason: &'static str| owner.peer_rejected(reason);
            let ended =
                serve_follower(&follower, watcher, fresh_from, inbound, &tx, shutdown, limits, &refused_report).await;
            // The watcher is gone: the key may have lost its last follower.
            handovers.notify();
            let status = match ended {
                Ok(()) => None,
                Err(FollowerEnd::Shutdown) => Some(super::watch_end::owner_shutting_down()),
                Err(FollowerEnd::Refused(refusal)) => {
                    let refusal = PeerRefusal::Limit(refusal);
                    owner.peer_rejected(refusal.reason());
                    if let PeerRefusal::Limit(limit) = &refusal {
                        owner.limit_refused(limit.field());
                    }
                    tracing::warn!(key = %key, follower = %follower, peer = %peer, error = %refusal, "follower request over a limit; stream ended");
                    Some(refusal.status())
                }
                Err(FollowerEnd::Malformed(status)) => {
                    owner.peer_stream_error("bad_request");
                    tracing::warn!(key = %key, follower = %follower, peer = %peer, error = %status.message(), "follower request does not decode; stream ended");
                    Some(Status::invalid_argument(format!("malformed request: {}", status.message())))
                }
                Err(FollowerEnd::Broken(status)) => {
                    owner.peer_stream_error("reset");
                    tracing::info!(key = %key, follower = %follower, code = ?status.code(), error = %status.message(), "follower stream broke");
                    Some(Status::new(status.code(), format!("the request stream failed: {}", status.message())))
                }
            };
            if let Some(status) = status {
                // A follower that reads nothing more does not hold this task (its watcher is gone).
                limit::send_final_status(&tx, status).await;
            }
            owner.follower_streams(-1);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let peer = remote(&request);
        self.caller(&request, true).map_err(|r| self.refuse(&r, "status", &peer, None))?;
        Ok(Response::new(self.owner.status().into()))
    }

    async fn identify(&self, request: Request<IdentifyRequest>) -> Result<Response<IdentifyReply>, Status> {
        let peer = remote(&request);
        self.caller(&request, false).map_err(|r| self.refuse(&r, "identify", &peer, None))?;
        Ok(Response::new(self.owner.identify().into()))
    }
}

/// How long ago the oldest `do_not_cache` resource of `state` arrived (zero when none).
fn do_not_cache_age(state: &KeyState) -> std::time::Duration {
    if !state.uncacheable {
        return std::time::Duration::ZERO;
    }
    state.resources.iter().filter(|r| r.do_not_cache).map(|r| r.arrived.elapsed()).max().unwrap_or_default()
}

fn state_key(watcher: &Watcher) -> String {
    watcher.entry().key.clone()
}

/// Streams the key's states to one follower until it leaves; `Err` when the node shuts down,
/// when a later request exceeds a limit (over `max_request_bytes` or `max_node_bytes`, or
/// names past the key's `max_names_per_key`: the watcher keeps its names until the stream
/// ends) or does not decode, or when the follower's request stream broke (not by its own
/// cancellation: a follower switching sources cancels its stream, which is no error). With
/// `fresh_from`, nothing is sent until an origin stream of that epoch or later has delivered.
#[allow(clippy::too_many_arguments)]
async fn serve_follower(
    follower: &str,
    mut watcher: Watcher,
    fresh_from: Option<u64>,
    mut inbound: Streaming<WatchRequest>,
    tx: &mpsc::Sender<Result<KeyUpdate, Status>>,
    shutdown: CancellationToken,
    limits: Limits,
    reports: &(dyn Fn(&'static str) + Send + Sync),
) -> Result<(), FollowerEnd> {
    let mut states = watcher.receiver();
    let mut epochs = watcher.entry().source.freshness.subscribe();
    // The stale mark of a state from disk: its clearing is sent on even when the state stays.
    let mut stale_marks = watcher.entry().source.watch_stale();
    // A staged key's lanes: their candidate goes to the follower beside the stable state (a
    // change of the lanes wakes `states`).
    let lanes = watcher.entry().lanes().cloned();
    let mut fresh_from = fresh_from;
    let mut fresh = fresh_from.is_none();
    let mut sent: Option<(u64, Interest, bool)> = None;
    let mut sent_candidate: Option<CandidateSent> = None;
    // Content serial of the last state sent: the follower holds its bodies, so TTL
    // heartbeats may stand for them.
    let mut sent_content: Option<u64> = None;
    loop {
        if !fresh {
            fresh = fresh_from.is_some_and(|epoch| epochs.borrow_and_update().satisfies(epoch));
        }
        let served = states.borrow_and_update().clone();
        let stale = *stale_marks.borrow_and_update();
        // On a staged key, the stable state and the candidate come from one look at the lanes
        // (a follower's watcher is served the stable state): a promotion between two reads
        // would send the old stable state without the candidate.
        let snapshot = lanes.as_ref().map(|lanes| lanes.snapshot());
        let state = snapshot.as_ref().map_or(served, |snapshot| snapshot.stable.clone());
        let current = (state.serial, state.coverage.clone(), stale);
        let candidate = snapshot.as_ref().and_then(CandidateSent::of);
        let changed = sent.as_ref() != Some(&current) || sent_candidate != candidate;
        if fresh && state.is_ready() && changed && !watcher.may_receive(&state) {
            // do_not_cache resources that arrived before the follower asked: it gets them
            // only from an origin stream opened after now.
            fresh_from = Some(watcher.entry().source.freshness.require_fresh());
            fresh = false;
            continue;
        }
        if fresh && state.is_ready() && changed {
            let traceparent = if sent.as_ref().map(|(serial, _, _)| *serial) == Some(state.serial) {
                String::new()
            } else {
                traces::forwarded(&state.trace, &state_key(&watcher), follower, &state.version_info)
            };
            // While a candidate is out (or was, on the last update) the follower's latest state
            // may be it, not the stable state the heartbeats refer to: bodies go whole.
            let holds_bodies =
                candidate.is_none() && sent_candidate.is_none() && sent_content == Some(state.content_serial);
            let forwarded_candidate = snapshot.as_ref().zip(candidate.as_ref()).and_then(|(snapshot, next)| {
                forward_candidate(snapshot, next, sent_candidate.as_ref(), follower, &state_key(&watcher))
            });
            let update = KeyUpdate {
                response: state.full_message(holds_bodies).body.clone(),
                coverage: Some((&state.coverage).into()),
                traceparent,
                serial: state.serial,
                do_not_cache_age_ms: do_not_cache_age(&state).as_millis().try_into().unwrap_or(u64::MAX),
                stale,
                candidate: forwarded_candidate,
            };
            if tx.send(Ok(update)).await.is_err() {
                return Ok(());
            }
            sent = Some(current);
            sent_candidate = candidate;
            sent_content = Some(state.content_serial);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Err(FollowerEnd::Shutdown),
            changed = states.changed() => if changed.is_err() { return Ok(()) },
            changed = stale_marks.changed() => if changed.is_err() { return Ok(()) },
            changed = epochs.changed(), if !fresh => if changed.is_err() { return Ok(()) },
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    check_node_bytes(&request.node, limits.max_node_bytes).map_err(FollowerEnd::Refused)?;
                    if let Some(report) = request.canary_report {
                        take_canary_report(report, &watcher, lanes.as_deref(), follower, reports);
                    }
                    // A request carrying only a report leaves the follower's interest as it is.
                    if request.interest.is_some() {
                        watcher.set_interest(request.interest.into()).map_err(FollowerEnd::Refused)?;
                    }
                }
                Ok(None) => return Ok(()),
                Err(status) if status.code() == tonic::Code::Cancelled => return Ok(()),
                Err(status) => {
                    return Err(match limit::classify_stream_error(&status) {
                        StreamError::TooLarge => FollowerEnd::Refused(LimitRefusal::RequestBytes {
                            limit: limits.max_request_bytes,
                            detail: status.message().to_owned(),
                        }),
                        StreamError::Malformed => FollowerEnd::Malformed(status),
                        StreamError::Transport => FollowerEnd::Broken(status),
                    });
                }
            },
            () = tx.closed() => return Ok(()),
        }
    }
}

/// What was last forwarded of a staged key's candidate: a change of any part is sent on.
#[derive(Debug, Clone, PartialEq)]
struct CandidateSent {
    generation: u64,
    serial: u64,
    coverage: Interest,
    offered: bool,
    verdict: Option<Verdict>,
}

impl CandidateSent {
    /// The candidate this node's gate decides, if the lanes hold one.
    fn of(snapshot: &LaneSnapshot) -> Option<Self> {
        let candidate = snapshot.candidate.as_ref()?;
        // A candidate this node follows from another owner is not this node's to forward.
        if snapshot.owner_generation.is_some() {
            return None;
        }
        Some(Self {
            generation: snapshot.generation,
            serial: candidate.serial,
            coverage: candidate.coverage.clone(),
            offered: snapshot.offered,
            verdict: snapshot.verdict.clone(),
        })
    }
}

/// The candidate part of a `KeyUpdate` to `follower`, after `last` was sent: the candidate's
/// body only when its state is new on the stream (the follower holds it otherwise), with a
/// forward span on its trace.
fn forward_candidate(
    snapshot: &LaneSnapshot,
    sent: &CandidateSent,
    last: Option<&CandidateSent>,
    follower: &str,
    key: &str,
) -> Option<ProtoCandidate> {
    let state = snapshot.candidate.as_ref()?;
    let held = last.is_some_and(|last| {
        last.generation == sent.generation && last.serial == sent.serial && last.coverage == sent.coverage
    });
    let phase = match &sent.verdict {
        None => candidate::Phase::Baking,
        Some(verdict) if verdict.aborted => candidate::Phase::Aborted,
        Some(_) => candidate::Phase::Held,
    };
    Some(ProtoCandidate {
        response: if held { bytes::Bytes::new() } else { state.full_message(false).body.clone() },
        coverage: Some((&state.coverage).into()),
        generation: sent.generation,
        serial: state.serial,
        do_not_cache_age_ms: do_not_cache_age(state).as_millis().try_into().unwrap_or(u64::MAX),
        traceparent: if held {
            String::new()
        } else {
            traces::forwarded(&state.trace, key, follower, &state.version_info)
        },
        phase: phase.into(),
        rolled_back: !sent.offered,
        reason: sent.verdict.as_ref().map(|v| v.reason.clone()).unwrap_or_default(),
    })
}

/// Most canaries' answers a follower's report lists (its counts stay exact beyond).
pub const MAX_REPORTED_ANSWERS: usize = 256;

/// Why a follower's canary report was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefusal {
    /// The key has no staged rollout on this node.
    #[error("no rollout policy applies to the key on this node")]
    NotStaged,
    /// The counts contradict each other or the list.
    #[error("inconsistent counts: {0}")]
    Inconsistent(String),
    /// Over a bound.
    #[error("{0}")]
    TooLarge(String),
}

/// A follower's report as the gate reads it, checked: counts that add up, at most
/// [`MAX_REPORTED_ANSWERS`] answers, texts cut as every NACK message is
/// ([`truncate_message`](crate::telemetry::truncate_message)).
///
/// # Errors
/// A [`ReportRefusal`] saying what is wrong.
pub fn checked_tally(report: CanaryReport) -> Result<CanaryTally, ReportRefusal> {
    if report.answers.len() > MAX_REPORTED_ANSWERS {
        return Err(ReportRefusal::TooLarge(format!(
            "{} answers listed, at most {MAX_REPORTED_ANSWERS}",
            report.answers.len()
        )));
    }
    let answered = u64::from(report.acked) + u64::from(report.nacked);
    if answered > u64::from(report.canaries) || report.canaries > report.clients {
        return Err(ReportRefusal::Inconsistent(format!(
            "{} ACKs and {} NACKs from {} canaries among {} clients",
            report.acked, report.nacked, report.canaries, report.clients
        )));
    }
    if report.answers.len() > report.canaries as usize {
        return Err(ReportRefusal::Inconsistent(format!(
            "{} answers listed for {} canaries",
            report.answers.len(),
            report.canaries
        )));
    }
    if report.version.len() > MAX_REPORTED_VERSION {
        return Err(ReportRefusal::TooLarge(format!(
            "a version of {} bytes, at most {MAX_REPORTED_VERSION} (a longer one is named by its SHA-256)",
            report.version.len()
        )));
    }
    let listed = |kind: canary_answer::Answer| answers_of(&report.answers, kind);
    if listed(canary_answer::Answer::Ack) > report.acked as usize
        || listed(canary_answer::Answer::Nack) > report.nacked as usize
    {
        return Err(ReportRefusal::Inconsistent(format!(
            "more answers listed than counted ({} ACKs, {} NACKs)",
            report.acked, report.nacked
        )));
    }
    let cut = |text: String| crate::telemetry::truncate_message(&text).into_owned();
    let answers = report
        .answers
        .into_iter()
        .map(|answer| {
            let kind = match canary_answer::Answer::try_from(answer.answer) {
                Ok(canary_answer::Answer::Ack) => Answer::Ack,
                Ok(canary_answer::Answer::Nack) => Answer::Nack(cut(answer.nack_message)),
                Ok(canary_answer::Answer::Pending) => Answer::Pending,
                _ => return Err(ReportRefusal::Inconsistent(format!("answer {} is not an answer", answer.answer))),
            };
            Ok(CanaryAnswer { node_id: cut(answer.node_id), answer: kind })
        })
        .collect::<Result<_, _>>()?;
    Ok(CanaryTally {
        generation: report.generation,
        version: report.version,
        clients: report.clients,
        canaries: report.canaries,
        acked: report.acked,
        nacked: report.nacked,
        answers,
        cannot_try: report.cannot_try,
    })
}

/// How many of `answers` are `kind`.
fn answers_of(answers: &[super::proto::CanaryAnswer], kind: canary_answer::Answer) -> usize {
    answers.iter().filter(|a| a.answer == kind as i32).count()
}

/// Hands a follower's canary report to the key's gate; a report that does not check, or on a
/// key without staged rollout here, is logged and counted (`peer_rejected_total{reason=
/// "bad_canary_report"}`) and dropped; the stream goes on.
fn take_canary_report(
    report: CanaryReport,
    watcher: &Watcher,
    lanes: Option<&Lanes>,
    follower: &str,
    refused: &(dyn Fn(&'static str) + Send + Sync),
) {
    // The report's own faults first: each abuse is refused for what it is.
    let taken = checked_tally(report).and_then(|tally| {
        let lanes = lanes.ok_or(ReportRefusal::NotStaged)?;
        lanes.report_remote(watcher.id(), follower, tally);
        Ok(())
    });
    if let Err(refusal) = taken {
        refused("bad_canary_report");
        tracing::warn!(key = %watcher.entry().key, follower, error = %refusal, "follower's canary report dropped");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::wrappers::TcpListenerStream;

    use super::super::proto::peer_client::PeerClient;
    use super::super::proto::peer_server::PeerServer;
    use super::super::proto::watch_end::Reason;
    use super::super::watch_end;
    use super::*;
    use crate::config::CacheConfig;
    use crate::node_cache::Cache;
    use crate::telemetry::Metrics;

    /// An owner that serves every watch from its cache and counts nothing.
    struct CacheOwner {
        cache: Cache,
    }

    impl KeyOwner for CacheOwner {
        fn watch_as_owner(
            &self,
            key: &str,
            type_url: &str,
            node: &Node,
            client: ClientInfo,
            interest: Interest,
        ) -> Result<Watcher, CacheError> {
            self.cache.watch(key, type_url, node, client, interest, |_| {})
        }

        fn check_watch(&self, _: &str, _: &str, _: &Node, _: &Interest) -> Result<(), PeerRefusal> {
            Ok(())
        }

        fn is_member(&self, _: &str) -> bool {
            true
        }

        fn identify(&self) -> NodeIdentity {
            NodeIdentity::default()
        }

        fn status(&self) -> NodeReport {
            NodeReport::default()
        }

        fn follower_streams(&self, _: i64) {}

        fn peer_stream_error(&self, _: &'static str) {}

        fn peer_rejected(&self, _: &'static str) {}

        fn limit_refused(&self, _: &'static str) {}
    }

    /// A peer server of `owner` on loopback, and a follower (relay-2) watching `staging_cds`.
    struct FollowerStream {
        tasks: ServiceTasks,
        server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
        requests: mpsc::Sender<WatchRequest>,
        updates: Streaming<KeyUpdate>,
    }

    async fn follow_staging_cds(owner: CacheOwner) -> FollowerStream {
        let tasks = ServiceTasks {
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            handovers: HandoverSignal::new(),
        };
        let service = PeerService::new(Arc::new(owner), PeerAuth::Insecure, Limits::default(), tasks.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let mut client = PeerClient::connect(format!("http://{addr}")).await.unwrap();
        let first = WatchRequest {
            key: "staging_cds".into(),
            type_url: crate::xds::CLUSTER.into(),
            node: Node::default().encode_to_vec(),
            interest: Some(super::super::proto::Interest { wildcard: true, ..Default::default() }),
            follower: "relay-2".into(),
            fresh: false,
            canary_report: None,
        };
        let (requests, rx) = mpsc::channel(1);
        requests.send(first).await.unwrap();
        let updates = client.watch(ReceiverStream::new(rx)).await.unwrap().into_inner();
        FollowerStream { tasks, server, requests, updates }
    }

    #[test]
    fn a_canary_report_counts_only_when_it_adds_up_and_stays_bounded() {
        use super::super::proto::CanaryAnswer as WireAnswer;
        use super::super::proto::canary_answer::Answer as Wire;
        let nack = |message: &str| WireAnswer {
            node_id: "envoy-1".into(),
            answer: Wire::Nack.into(),
            nack_message: message.into(),
        };
        let good = CanaryReport {
            generation: 7,
            version: "v2".into(),
            clients: 4,
            canaries: 2,
            acked: 1,
            nacked: 1,
            answers: vec![nack(&"x".repeat(10_000))],
            cannot_try: false,
        };
        let tally = checked_tally(good.clone()).unwrap();
        assert_eq!((tally.generation, tally.canaries, tally.acked, tally.nacked), (7, 2, 1, 1));
        let Answer::Nack(message) = &tally.answers[0].answer else { panic!("a NACK") };
        assert!(message.len() < 1100 && message.contains("truncated"), "a NACK message is cut like a client's");

        let refused = |report: CanaryReport| checked_tally(report).unwrap_err();
        assert!(matches!(refused(CanaryReport { acked: 2, ..good.clone() }), ReportRefusal::Inconsistent(_)));
        assert!(matches!(refused(CanaryReport { canaries: 5, ..good.clone() }), ReportRefusal::Inconsistent(_)));
        assert!(matches!(
            refused(CanaryReport { answers: vec![nack("a"), nack("b"), nack("c")], ..good.clone() }),
            ReportRefusal::Inconsistent(_)
        ));
        let many = CanaryReport { clients: 1000, canaries: 1000, answers: vec![nack("a"); 257], ..good.clone() };
        assert!(matches!(refused(many), ReportRefusal::TooLarge(_)));
        let unknown = WireAnswer { answer: 9, ..nack("a") };
        assert!(matches!(refused(CanaryReport { answers: vec![unknown], ..good }), ReportRefusal::Inconsistent(_)));
    }

    #[tokio::test]
    async fn at_shutdown_a_follower_stream_ends_with_the_typed_reason_within_the_node_tree() {
        let metrics = Metrics::new();
        let owner = CacheOwner {
            cache: Cache::new(
                CacheConfig { ttl: Duration::from_secs(60).into(), max_entries: 0, persist_dir: None },
                metrics,
            ),
        };
        let FollowerStream { tasks, server, requests, mut updates } = follow_staging_cds(owner).await;
        let handovers = tasks.handovers.subscribe();
        assert!(!handovers.has_changed().unwrap());
        assert_eq!(tasks.tracker.len(), 1, "the stream's task is in the node's tree");

        tasks.shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), updates.message())
            .await
            .expect("the stream ends at shutdown")
            .expect_err("with a status");
        assert_eq!(ended.code(), tonic::Code::Unavailable);
        assert_eq!(watch_end::end_reason(&ended), Some(Reason::OwnerShuttingDown), "{ended:?}");
        assert!(handovers.has_changed().unwrap(), "the follower leaving was signalled");
        tasks.tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.tracker.wait())
            .await
            .expect("the stream's task is tracked and ends");
        drop(requests);
        server.abort();
    }

    #[tokio::test]
    async fn a_state_from_disk_is_forwarded_stale_and_its_confirmation_follows_with_the_same_serial() {
        use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
        let cache = Cache::new(
            CacheConfig { ttl: Duration::from_secs(60).into(), max_entries: 0, persist_dir: None },
            Metrics::new(),
        );
        let response =
            DiscoveryResponse { type_url: crate::xds::CLUSTER.into(), version_info: "v1".into(), ..Default::default() };
        let seeded =
            cache.seed("staging_cds", crate::xds::CLUSTER, Node::default(), response.clone(), &Interest::wildcard());
        let entry = seeded.unwrap();
        let FollowerStream { tasks, server, requests, mut updates } = follow_staging_cds(CacheOwner { cache }).await;
        async fn next(updates: &mut Streaming<KeyUpdate>) -> KeyUpdate {
            let update = tokio::time::timeout(Duration::from_secs(5), updates.message()).await;
            update.expect("an update").unwrap().unwrap()
        }
        let from_disk = next(&mut updates).await;
        assert!(from_disk.stale, "the owner says the state is from disk");
        // The origin answers with the same state: only the mark changes, and it is sent on.
        entry.apply_response(response, &Interest::wildcard(), true, |_| Default::default()).unwrap();
        let confirmed = next(&mut updates).await;
        assert!(!confirmed.stale);
        assert_eq!(confirmed.serial, from_disk.serial, "the same state, confirmed");
        tasks.shutdown.cancel();
        drop(requests);
        server.abort();
    }

    #[test]
    fn each_refusal_has_its_status_and_reason() {
        let cases = [
            (PeerRefusal::NoCertificate, tonic::Code::Unauthenticated, "no_certificate"),
            (
                PeerRefusal::BadCertificate(IdentityError::NoMember { cluster_id: "c".into() }),
                tonic::Code::Unauthenticated,
                "bad_certificate",
            ),
            (PeerRefusal::NotAMember { name: "relay-9".into() }, tonic::Code::PermissionDenied, "not_a_member"),
            (
                PeerRefusal::FollowerMismatch { name: "a".into(), claimed: "b".into() },
                tonic::Code::PermissionDenied,
                "follower_mismatch",
            ),
            (
                PeerRefusal::NotOwner { key: "k".into(), owner: "b".into() },
                tonic::Code::FailedPrecondition,
                "not_owner",
            ),
            (
                PeerRefusal::KeyMismatch {
                    key: "prod_cds".into(),
                    type_url: "eds".into(),
                    node_id: "n".into(),
                    mapped: "prod_eds".into(),
                },
                tonic::Code::InvalidArgument,
                "key_mismatch",
            ),
            (
                PeerRefusal::TypeConflict { key: "k".into(), existing: "a".into(), requested: "b".into() },
                tonic::Code::FailedPrecondition,
                "type_conflict",
            ),
            (
                PeerRefusal::Limit(LimitRefusal::RequestBytes { limit: 4, detail: "d".into() }),
                tonic::Code::ResourceExhausted,
                "too_large",
            ),
            (
                PeerRefusal::Limit(LimitRefusal::ActiveKeys { key: "k".into(), limit: 4 }),
                tonic::Code::ResourceExhausted,
                "limit",
            ),
            (
                PeerRefusal::Limit(LimitRefusal::KeyLength { length: 5, limit: 4 }),
                tonic::Code::InvalidArgument,
                "limit",
            ),
        ];
        for (refusal, code, reason) in cases {
            let status = refusal.status();
            assert_eq!(status.code(), code, "{refusal:?}");
            assert_eq!(status.message(), refusal.to_string());
            assert_eq!(refusal.reason(), reason);
        }
        let message = PeerRefusal::KeyMismatch {
            key: "prod_cds".into(),
            type_url: "eds".into(),
            node_id: "n".into(),
            mapped: "prod_eds".into(),
        }
        .to_string();
        assert!(message.contains("prod_cds") && message.contains("prod_eds"), "{message}");
    }
}
