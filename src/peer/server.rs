//! The owner side of the peer protocol: serves keys to followers like downstream clients.
//!
//! Invariant: a key asked by a peer is always served by this node itself (from the origin);
//! the request is never forwarded, so two nodes can never follow each other for a key.
//!
//! Failed follower streams are counted through [`KeyOwner::peer_stream_error`] with a reason:
//! `bad_request` (the first request does not name a key, or its node does not decode),
//! `watch_refused` (the key cannot take the watcher, e.g. another type holds it) and `reset`
//! (the follower's request stream broke for another reason than its own cancellation).

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::proto::peer_server::Peer;
use super::proto::{KeyUpdate, StatusReply, StatusRequest, WatchRequest};
use crate::cache::{CacheError, ClientInfo, Interest, Watcher};
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

    /// What this node holds.
    fn status(&self) -> StatusReply;

    /// Counts a follower stream opening (+1) or closing (-1).
    fn follower_streams(&self, delta: i64);

    /// Counts a follower stream that failed on this side, for `reason` (snake_case).
    fn peer_stream_error(&self, reason: &'static str);
}

/// The `xdsrelay.peer.v1.Peer` service.
pub struct PeerService {
    owner: Arc<dyn KeyOwner>,
    shutdown: CancellationToken,
}

impl PeerService {
    /// A service serving keys through `owner` until `shutdown`.
    pub fn new(owner: Arc<dyn KeyOwner>, shutdown: CancellationToken) -> Self {
        Self { owner, shutdown }
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    type WatchStream = ReceiverStream<Result<KeyUpdate, Status>>;

    async fn watch(&self, request: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = request.into_inner();
        let bad_request = |status: Status| {
            self.owner.peer_stream_error("bad_request");
            tracing::warn!(peer = %peer, error = %status.message(), "peer watch request refused");
            status
        };
        let first = match inbound.message().await {
            Ok(Some(first)) => first,
            Ok(None) => {
                return Err(bad_request(Status::invalid_argument("a watch starts with a request naming the key")));
            }
            Err(status) => {
                self.owner.peer_stream_error("reset");
                return Err(status);
            }
        };
        if first.key.is_empty() || first.type_url.is_empty() {
            return Err(bad_request(Status::invalid_argument(
                "the first watch request must name the key and its type_url",
            )));
        }
        let node = Node::decode(first.node.as_slice()).map_err(|e| {
            bad_request(Status::invalid_argument(format!("the watch request's node does not decode: {e}")))
        })?;
        let client = ClientInfo {
            node_id: node.id.clone(),
            node_cluster: node.cluster.clone(),
            peer,
            follower: Some(first.follower.clone()),
        };
        let watcher = self
            .owner
            .watch_as_owner(&first.key, &first.type_url, &node, client, first.interest.into())
            .map_err(|e| {
                self.owner.peer_stream_error("watch_refused");
                tracing::warn!(key = %first.key, type_url = %first.type_url, follower = %first.follower, error = %e, "peer watch refused");
                Status::failed_precondition(e.to_string())
            })?;
        // A follower holding state from elsewhere gets only states fetched after it asked.
        let fresh_from = first.fresh.then(|| watcher.entry().freshness.require_fresh());
        tracing::info!(key = %first.key, type_url = %first.type_url, follower = %first.follower, fresh = first.fresh, "peer follows key");
        let (tx, rx) = mpsc::channel(2);
        let owner = self.owner.clone();
        let shutdown = self.shutdown.clone();
        owner.follower_streams(1);
        tokio::spawn(async move {
            let key = first.key;
            let follower = first.follower;
            if let Err(status) = serve_follower(&follower, watcher, fresh_from, inbound, tx, shutdown).await {
                owner.peer_stream_error("reset");
                tracing::info!(key = %key, follower = %follower, code = ?status.code(), error = %status.message(), "follower stream broke");
            }
            owner.follower_streams(-1);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        Ok(Response::new(self.owner.status()))
    }
}

fn state_key(watcher: &Watcher) -> String {
    watcher.entry().key.clone()
}

/// Streams the key's states to one follower until it leaves or the node shuts down; `Err`
/// with the status when the follower's request stream broke (not by its own cancellation:
/// a follower switching sources cancels its stream, which is no error). With `fresh_from`,
/// nothing is sent until an origin stream of that epoch or later has delivered.
async fn serve_follower(
    follower: &str,
    mut watcher: Watcher,
    fresh_from: Option<u64>,
    mut inbound: Streaming<WatchRequest>,
    tx: mpsc::Sender<Result<KeyUpdate, Status>>,
    shutdown: CancellationToken,
) -> Result<(), Status> {
    let mut states = watcher.receiver();
    let mut epochs = watcher.entry().freshness.subscribe();
    let mut fresh = fresh_from.is_none();
    let mut sent: Option<(u64, Interest)> = None;
    loop {
        if !fresh {
            fresh = fresh_from.is_some_and(|epoch| epochs.borrow_and_update().satisfies(epoch));
        }
        let state = states.borrow_and_update().clone();
        let current = (state.serial, state.coverage.clone());
        if fresh && state.is_ready() && sent.as_ref() != Some(&current) {
            let traceparent = if sent.as_ref().map(|(serial, _)| *serial) == Some(state.serial) {
                String::new()
            } else {
                traces::forwarded(&state.trace, &state_key(&watcher), follower, &state.version_info)
            };
            let update = KeyUpdate {
                response: state.full_body().clone(),
                coverage: Some((&state.coverage).into()),
                traceparent,
                serial: state.serial,
            };
            if tx.send(Ok(update)).await.is_err() {
                return Ok(());
            }
            sent = Some(current);
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable(super::OWNER_SHUTTING_DOWN))).await;
                return Ok(());
            }
            changed = states.changed() => if changed.is_err() { return Ok(()) },
            changed = epochs.changed(), if !fresh => if changed.is_err() { return Ok(()) },
            message = inbound.message() => match message {
                Ok(Some(request)) => watcher.set_interest(request.interest.into()),
                Ok(None) => return Ok(()),
                Err(status) if status.code() == tonic::Code::Cancelled => return Ok(()),
                Err(status) => return Err(status),
            },
            () = tx.closed() => return Ok(()),
        }
    }
}
