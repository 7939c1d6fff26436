//! What every downstream stream shares, whatever its protocol: opening (stream limit,
//! task), the task's loop over requests and cache wake-ups, type URL checks, keying and
//! watching, and sending.
//!
//! The task owns everything about its stream. Responses go through a small bounded queue to
//! tonic; while the client is slow the task waits, and when it resumes it reads the newest
//! state, so intermediate versions are skipped and nobody else waits.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use futures_util::{FutureExt as _, StreamExt as _};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::StreamMap;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Shared;
use super::passthrough::{self, StreamKeys};
use crate::cache::{CacheError, ClientInfo, Interest, KeyState, SharedMessage, StateStream};
use crate::config::NodeIdentity;
use crate::keyer::KeyRequest;
use crate::limit::{self, LimitRefusal, StreamError};
use crate::node_cache::Watcher;
use crate::telemetry::TypeLabels;
use crate::telemetry::traces;
use crate::tls::{self, SubjectAltName};
use crate::wire::EncodedResponse;
use crate::xds;

/// The response stream handed to tonic.
pub(super) type ResponseStream = ReceiverStream<Result<Outgoing, Status>>;

/// One response on its way to the client.
pub(super) enum Outgoing {
    /// A whole gRPC message shared by every stream sent the same state (one DATA frame).
    Shared(bytes::Bytes),
    /// A shared body and this stream's own nonce.
    Own(EncodedResponse),
}

/// Why a stream stops.
pub(super) enum Stop {
    /// The client went away.
    Disconnected,
    /// The stream ends with this status.
    Status(Status),
}

/// One protocol's handling of requests and cache wake-ups on a stream.
pub(super) trait Protocol: Send + 'static {
    /// The request message.
    type Request: prost::Message + Default + Send + 'static;

    /// Handles one request.
    fn on_request(
        &mut self,
        core: &mut StreamCore,
        request: Self::Request,
    ) -> impl Future<Output = Result<(), Stop>> + Send;

    /// Sends the type's current state if the client needs it.
    fn push(&mut self, core: &mut StreamCore, type_url: &str) -> impl Future<Output = Result<(), Stop>> + Send;
}

/// State every stream has whatever its protocol.
pub(super) struct StreamCore {
    pub(super) shared: Arc<Shared>,
    /// The per-type service's type, or `None` on an aggregated stream.
    pub(super) default_type: Option<&'static str>,
    pub(super) peer: String,
    /// The node of the first request.
    pub(super) node: Option<Node>,
    /// The DNS and URI SANs of the client certificate, read when `node_identity` is set
    /// (`Err` says why there are none to check).
    client_names: Result<Vec<SubjectAltName>, String>,
    /// Per type, the key state this stream is served (the key's latest state, or its lane).
    pub(super) watches: StreamMap<String, StateStream>,
    /// The watched types in make-before-break order (CDS, EDS, LDS, RDS, others), the order
    /// a wake-up pushes them in; kept with `watches` so a wake-up allocates nothing.
    push_order: Vec<String>,
    /// The private pass-through keys this stream watches (one per type at most), made when
    /// it first needs one; a key is released after its watcher is dropped.
    private_keys: Option<Box<StreamKeys>>,
    /// When a push held for a fresh copy of `do_not_cache` resources is tried again (the
    /// fresh copy normally wakes the stream first; this covers a refetch that delivered
    /// nothing new for it).
    fresh_copy_retry: Option<tokio::time::Instant>,
    nonce: u64,
    tx: mpsc::Sender<Result<Outgoing, Status>>,
}

/// Opens a stream: checks the stream limit, spawns the stream's task among the server's
/// tasks (it ends when the server stops) and returns its response stream.
pub(super) fn open<P: Protocol>(
    shared: Arc<Shared>,
    default_type: Option<&'static str>,
    request: Request<Streaming<P::Request>>,
    protocol: P,
) -> Result<Response<ResponseStream>, Status> {
    let permit = shared.streams.clone().try_acquire_owned().map_err(|_| {
        shared.metrics.request_error("stream_limit");
        Status::resource_exhausted(format!(
            "the relay serves at most {} streams; try another relay",
            shared.settings.max_streams
        ))
    })?;
    let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    let client_names = match shared.settings.node_identity {
        Some(_) => client_names(&request),
        None => Ok(Vec::new()),
    };
    let requests = request.into_inner();
    let (tx, rx) = mpsc::channel(shared.settings.send_queue.max(1));
    shared.metrics.downstream_streams.inc();
    shared.metrics.downstream_streams_total.inc();
    let core = StreamCore {
        shared,
        default_type,
        peer,
        node: None,
        client_names,
        watches: StreamMap::new(),
        push_order: Vec::new(),
        private_keys: None,
        fresh_copy_retry: None,
        nonce: 0,
        tx,
    };
    let tasks = core.shared.tasks.clone();
    tasks.spawn(run(core, protocol, requests, permit));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// The SANs of the leaf certificate the client presented.
fn client_names<T>(request: &Request<T>) -> Result<Vec<SubjectAltName>, String> {
    let certs = request.peer_certs().ok_or_else(|| "the client presented no certificate".to_owned())?;
    let leaf = certs.first().ok_or_else(|| "the client presented no certificate".to_owned())?;
    tls::subject_alt_names(leaf)
}

async fn run<P: Protocol>(
    mut core: StreamCore,
    mut protocol: P,
    mut requests: Streaming<P::Request>,
    _permit: OwnedSemaphorePermit,
) {
    let shutdown = core.shared.shutdown.clone();
    // One registration with the shutdown token for the stream's life, not one per wake-up.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let stop = loop {
        tokio::select! {
            biased;
            () = &mut cancelled => break Stop::Status(Status::unavailable("the relay is shutting down; reconnect")),
            request = requests.next() => match request {
                None => break Stop::Disconnected,
                Some(Err(status)) => break core.request_stream_failed(&status),
                Some(Ok(request)) => if let Err(stop) = protocol.on_request(&mut core, request).await { break stop },
            },
            _ = futures_util::future::OptionFuture::from(core.fresh_copy_retry.map(tokio::time::sleep_until)),
                if core.fresh_copy_retry.is_some() => {
                core.fresh_copy_retry = None;
                if let Err(stop) = push_all(&mut core, &mut protocol).await { break stop }
            }
            Some(_) = core.watches.next() => {
                // On an aggregated stream, let the other types of the same origin update land
                // first, then push every type in make-before-break order (CDS, EDS, LDS, RDS).
                if core.default_type.is_none() && core.watches.len() > 1 {
                    tokio::time::sleep(core.shared.settings.ads_batch_window).await;
                }
                while let Some(Some(_)) = core.watches.next().now_or_never() {}
                if let Err(stop) = push_all(&mut core, &mut protocol).await { break stop }
            }
        }
    };
    // The stream's watchers (and the keys they hold active) go before the final status,
    // which a client that stopped reading could keep waiting.
    drop(protocol);
    core.private_keys = None;
    if let Stop::Status(status) = stop {
        limit::send_final_status(&core.tx, status).await;
    }
    core.shared.metrics.downstream_streams.dec();
}

/// How long a push held for a fresh copy of `do_not_cache` resources waits before it is tried
/// again (and the fresh copy asked for again); longer than the spacing of a key's refetches.
const FRESH_COPY_RETRY: std::time::Duration = std::time::Duration::from_secs(3);

async fn push_all<P: Protocol>(core: &mut StreamCore, protocol: &mut P) -> Result<(), Stop> {
    // Pushing never changes what the stream watches, so the order can be lent out meanwhile.
    let order = std::mem::take(&mut core.push_order);
    let mut pushed = Ok(());
    for type_url in &order {
        pushed = protocol.push(core, type_url).await;
        if pushed.is_err() {
            break;
        }
    }
    core.push_order = order;
    pushed
}

impl StreamCore {
    /// Logs (rate-limited) and counts a request refused by a limit; the stream ends with the
    /// refusal's status, which names the limit.
    pub(super) fn refuse(&self, refusal: &LimitRefusal) -> Stop {
        let node_id = self.node.as_ref().map(|n| n.id.as_str()).unwrap_or_default();
        refusal.log(&self.peer, node_id);
        self.shared.metrics.limit_refused(refusal.field());
        Stop::Status(refusal.status())
    }

    /// How the stream ends when its request stream failed: a message over the request limit
    /// with `RESOURCE_EXHAUSTED` naming `limits.max_request_bytes`, an undecodable one with
    /// `INVALID_ARGUMENT`, a transport error (a reset) with its own code and message.
    fn request_stream_failed(&self, status: &Status) -> Stop {
        match limit::classify_stream_error(status) {
            StreamError::TooLarge => self.refuse(&LimitRefusal::RequestBytes {
                limit: self.shared.settings.limits.max_request_bytes,
                detail: status.message().to_owned(),
            }),
            StreamError::Malformed => {
                self.reject("malformed", Status::invalid_argument(format!("malformed request: {}", status.message())))
            }
            StreamError::Transport => {
                tracing::debug!(peer = %self.peer, code = ?status.code(), error = %status.message(), "downstream stream error");
                Stop::Status(Status::new(status.code(), format!("the request stream failed: {}", status.message())))
            }
        }
    }

    /// Logs and counts a rejected request; the stream ends with `status`.
    pub(super) fn reject(&self, reason: &str, status: Status) -> Stop {
        let node_id = self.node.as_ref().map(|n| n.id.as_str()).unwrap_or_default();
        tracing::warn!(peer = %self.peer, node = %node_id, reason, error = %status.message(), "downstream request rejected");
        self.shared.metrics.request_error(reason);
        Stop::Status(status)
    }

    /// Checks the size of every request's node against `limits.max_node_bytes`; remembers
    /// the node of the first request and, with `node_identity`, checks that the client
    /// certificate names it.
    pub(super) fn observe_node(&mut self, node: Option<&Node>) -> Result<(), Stop> {
        limit::check_node(node, self.shared.settings.limits.max_node_bytes).map_err(|r| self.refuse(&r))?;
        if self.node.is_some() {
            return Ok(());
        }
        let node = node.cloned().unwrap_or_default();
        let check = self.shared.settings.node_identity.map(|identity| match identity {
            NodeIdentity::Id => ("node.id", node.id.clone()),
            NodeIdentity::Cluster => ("node.cluster", node.cluster.clone()),
        });
        self.node = Some(node);
        let Some((field, value)) = check else { return Ok(()) };
        let refusal = match &self.client_names {
            Err(reason) => Some(reason.clone()),
            Ok(names) if tls::names_identity(names, &value) => None,
            Ok(names) => Some(format!("the client certificate names only {}", tls::describe(names))),
        };
        match refusal {
            None => Ok(()),
            Some(reason) => Err(self.reject(
                "node_identity",
                Status::permission_denied(format!(
                    "{field} {value:?} is not named by the client certificate: {reason}"
                )),
            )),
        }
    }

    /// The type a request asks for, checked against the stream's method and, for secrets,
    /// against the listener's TLS.
    pub(super) fn resolve_type<'a>(&self, requested: &'a str) -> Result<&'a str, Stop> {
        let type_url = self.requested_type(requested)?;
        if type_url == xds::SECRET && !self.shared.tls && !self.shared.settings.allow_secrets_without_tls {
            return Err(self.reject(
                "secret_without_tls",
                Status::failed_precondition(
                    "secrets (SDS) are served only on a TLS listener: configure server.tls, or set \
                     server.allow_secrets_without_tls",
                ),
            ));
        }
        Ok(type_url)
    }

    fn requested_type<'a>(&self, requested: &'a str) -> Result<&'a str, Stop> {
        match (self.default_type, requested) {
            (_, t) if xds::is_v2(t) => Err(self.reject(
                "v2",
                Status::unimplemented(format!("type {t} is xDS v2, which is not supported; use the v3 API")),
            )),
            (None, "") => Err(self.reject(
                "missing_type_url",
                Status::invalid_argument("type_url is required on an aggregated (ADS) stream"),
            )),
            (Some(default), "") => Ok(default),
            (Some(default), t) if t != default => Err(self.reject(
                "wrong_type_url",
                Status::invalid_argument(format!("type {t} cannot be requested on the stream for {default}")),
            )),
            (_, t) => Ok(t),
        }
    }

    /// Points the type's watcher at the key that `interest` maps to (`None` when the client
    /// wants nothing of the type), then replaces `interest` with the watcher's, which holds
    /// the key's shared names: the stream keeps one copy of its names. Returns whether the
    /// watcher changed key.
    ///
    /// Refuses (the stream ends) an interest of more than `limits.max_names_per_request`
    /// names or whose key is longer than `limits.max_key_length` (before any entry exists
    /// for it), and a watch the cache refuses by `max_active_keys` or `max_names_per_key`.
    ///
    /// A request no rule maps ends the stream with `INVALID_ARGUMENT`, unless
    /// `pass_through_unmapped`: then the type watches the stream's private key (see
    /// [`passthrough`]), held to the same limits; a private key the stream stops watching is
    /// released at once.
    pub(super) fn rewatch(
        &mut self,
        type_url: &str,
        interest: &mut Interest,
        watcher: &mut Option<Watcher>,
    ) -> Result<bool, Stop> {
        if interest.is_empty() {
            *watcher = None;
            if let Some(private) = &mut self.private_keys {
                private.release(type_url);
            }
            self.watches.remove(type_url);
            self.push_order.retain(|t| t != type_url);
            return Ok(true);
        }
        let limits = self.shared.settings.limits;
        limit::check_names_per_request(interest.names.len(), limits.max_names_per_request)
            .map_err(|r| self.refuse(&r))?;
        let node = self.node.clone().unwrap_or_default();
        let names: Vec<String> = interest.names.iter().cloned().collect();
        let pass_through = self.shared.settings.pass_through_unmapped;
        let key = match self.shared.source.key(&KeyRequest { type_url, node: Some(&node), resource_names: &names }) {
            Ok(key) if pass_through && passthrough::is_private_key(&key) => {
                return Err(self.reject(
                    "reserved_key",
                    Status::invalid_argument(format!(
                        "the aggregation rules map the {} request to key {key:?}, but keys starting with {:?} \
                         are reserved for pass-through streams (server.pass_through_unmapped)",
                        xds::short_name(type_url),
                        passthrough::KEY_PREFIX
                    )),
                ));
            }
            Ok(key) => key,
            Err(error) if pass_through && passthrough::applies(&error) => {
                self.private_keys.get_or_insert_with(|| Box::new(StreamKeys::new())).key_for(type_url, &node.id)
            }
            Err(error) => {
                let short = xds::short_name(type_url);
                self.shared.metrics.mapping_errors.get_or_create(&TypeLabels::of(type_url)).inc();
                return Err(self.reject(
                    "unmapped",
                    Status::invalid_argument(format!("cannot map the {short} request to an aggregation key: {error}")),
                ));
            }
        };
        limit::check_key_length(&key, limits.max_key_length).map_err(|r| self.refuse(&r))?;
        if let Some(current) = watcher.as_mut()
            && current.entry().key == key
        {
            current.set_interest(interest.clone()).map_err(|r| self.refuse(&r))?;
            *interest = current.interest().clone();
            return Ok(false);
        }
        let client = ClientInfo {
            node_id: node.id.clone(),
            node_cluster: node.cluster.clone(),
            peer: self.peer.clone(),
            follower: None,
        };
        let new = match self.shared.source.watch(&key, type_url, &node, client, interest.clone()) {
            Ok(new) => new,
            Err(CacheError::Limit(refusal)) => return Err(self.refuse(&refusal)),
            Err(error) => return Err(self.reject("key_conflict", Status::failed_precondition(error.to_string()))),
        };
        tracing::debug!(peer = %self.peer, node = %node.id, key = %key, type_url, "watching key");
        let private = pass_through && passthrough::is_private_key(&key);
        if self.watches.insert(type_url.to_owned(), new.receiver().into_stream()).is_none() {
            self.push_order.push(type_url.to_owned());
            self.push_order.sort_by_key(|t| xds::push_order(t));
        }
        *interest = new.interest().clone();
        // The previous watcher goes first, then its private key (released once unwatched).
        *watcher = Some(new);
        if let Some(keys) = &mut self.private_keys {
            if private {
                keys.opened(&self.shared, key, type_url, &self.peer, &node.id);
            } else {
                keys.release(type_url);
            }
        }
        Ok(true)
    }

    /// Sends one response body with a fresh nonce; returns the nonce.
    pub(super) async fn send(
        &mut self,
        watcher: &Watcher,
        state: &KeyState,
        body: bytes::Bytes,
        resources: usize,
    ) -> Result<String, Stop> {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        self.record_push(watcher, state, body.len(), resources);
        self.tx
            .send(Ok(Outgoing::Own(EncodedResponse { body, nonce: nonce.clone() })))
            .await
            .map_err(|_| Stop::Disconnected)?;
        Ok(nonce)
    }

    /// Sends a message shared with every stream sent the same state; returns its nonce.
    pub(super) async fn send_shared(
        &mut self,
        watcher: &Watcher,
        state: &KeyState,
        shared: &SharedMessage,
        resources: usize,
    ) -> Result<String, Stop> {
        self.record_push(watcher, state, shared.body.len(), resources);
        self.tx.send(Ok(Outgoing::Shared(shared.message.clone()))).await.map_err(|_| Stop::Disconnected)?;
        Ok(shared.nonce.clone())
    }

    /// Holds a push of `do_not_cache` resources that arrived before the client asked: asks
    /// the key's source for a fresh copy (requests while one is pending join it) and tries
    /// the push again after [`FRESH_COPY_RETRY`] if nothing woke the stream meanwhile; counts
    /// and logs the start of each wait.
    pub(super) fn hold_for_fresh_copy(&mut self, watcher: &Watcher) {
        let entry = watcher.entry();
        if self.fresh_copy_retry.is_none() {
            self.shared.metrics.protocol_extra(&entry.type_url, "do_not_cache_wait");
            tracing::debug!(peer = %self.peer, key = %entry.key, "do_not_cache resources arrived before the client asked; waiting for a fresh copy");
        }
        self.fresh_copy_retry = Some(tokio::time::Instant::now() + FRESH_COPY_RETRY);
        self.shared.source.refresh(entry);
    }

    /// Counts what a push carries beyond resources: TTL heartbeats, resource errors.
    pub(super) fn count_protocol_extras(&self, state: &KeyState, heartbeats: bool, errors: bool) {
        if heartbeats {
            self.shared.metrics.protocol_extra(&state.type_url, "heartbeat");
        }
        if errors {
            self.shared.metrics.protocol_extra(&state.type_url, "resource_errors");
        }
    }

    fn record_push(&self, watcher: &Watcher, state: &KeyState, bytes: usize, resources: usize) {
        watcher.record_sent(&state.version_info);
        let metrics = &watcher.entry().metrics;
        metrics.pushes.inc();
        metrics.push_bytes.inc_by(bytes as u64);
        metrics.push_latency.observe(state.received_at.elapsed().as_secs_f64());
        tracing::debug!(
            peer = %self.peer, key = %watcher.entry().key, type_url = %state.type_url,
            version = %state.version_info, resources, bytes, "push"
        );
    }
}

/// A traced push to one client, ended by the client's ACK or NACK.
pub(super) struct PendingPush {
    span: tracing::Span,
    sent_at: tokio::time::Instant,
}

impl PendingPush {
    /// Opens the push span when `state`'s version is traced.
    pub(super) fn start(core: &StreamCore, watcher: &Watcher, state: &KeyState) -> Option<Self> {
        let node_id = core.node.as_ref().map(|n| n.id.as_str()).unwrap_or_default();
        traces::push_started(&state.trace, &watcher.entry().key, &state.type_url, &state.version_info, node_id)
            .map(|span| Self { span, sent_at: tokio::time::Instant::now() })
    }

    /// Ends the span with the client's answer: `None` for an ACK, the NACK message otherwise.
    pub(super) fn answered(self, nack: Option<&str>) {
        traces::push_answered(self.span, nack, self.sent_at.elapsed());
    }
}
