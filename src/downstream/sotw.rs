//! One state-of-the-world stream (aggregated or per-type): its task, and how it turns
//! requests and cache states into responses.
//!
//! The task owns everything about the stream: per type, its subscription state, its watcher
//! of the key's cache entry and what it sent last. Responses go through a small bounded queue
//! to tonic; while the client is slow the task waits, and when it resumes it reads the
//! newest state, so intermediate versions are skipped.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use futures_util::{FutureExt as _, StreamExt as _};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::StreamMap;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tonic::{Request, Response, Status, Streaming};

use super::Shared;
use super::subscription::{self, Classified, SubscriptionState};
use crate::cache::{ClientInfo, Interest, KeyState, Watcher};
use crate::keyer::KeyRequest;
use crate::wire::EncodedResponse;
use crate::xds;

type ResponseSender = mpsc::Sender<Result<EncodedResponse, Status>>;

/// Opens a stream: checks the stream limit, spawns the stream's task and returns its
/// response stream.
pub(super) async fn open(
    shared: Arc<Shared>,
    default_type: Option<&'static str>,
    request: Request<Streaming<DiscoveryRequest>>,
) -> Result<Response<ReceiverStream<Result<EncodedResponse, Status>>>, Status> {
    let permit = shared.streams.clone().try_acquire_owned().map_err(|_| {
        shared.metrics.request_error("stream_limit");
        Status::resource_exhausted(format!(
            "the relay serves at most {} streams; try another relay",
            shared.settings.max_streams
        ))
    })?;
    let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    let requests = request.into_inner();
    let (tx, rx) = mpsc::channel(shared.settings.send_queue.max(1));
    shared.metrics.downstream_streams.inc();
    shared.metrics.downstream_streams_total.inc();
    let stream = SotwStream {
        shared: shared.clone(),
        default_type,
        peer,
        node: None,
        types: HashMap::new(),
        watches: StreamMap::new(),
        nonce: 0,
        tx,
    };
    tokio::spawn(stream.run(requests, permit));
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// Per type: the subscription, the watcher of its key and what was sent.
struct TypeState {
    subscription: SubscriptionState,
    watcher: Option<Watcher>,
    /// Serial of the last state sent.
    sent_serial: Option<u64>,
    /// True when the client must be answered even if the state did not change.
    force: bool,
}

struct SotwStream {
    shared: Arc<Shared>,
    default_type: Option<&'static str>,
    peer: String,
    node: Option<Node>,
    types: HashMap<String, TypeState>,
    watches: StreamMap<String, WatchStream<Arc<KeyState>>>,
    nonce: u64,
    tx: ResponseSender,
}

/// Why a stream stops.
enum Stop {
    /// The client went away.
    Disconnected,
    /// The stream ends with this status.
    Status(Status),
}

impl SotwStream {
    async fn run(mut self, mut requests: Streaming<DiscoveryRequest>, _permit: OwnedSemaphorePermit) {
        let shutdown = self.shared.shutdown.clone();
        let stop = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Stop::Status(Status::unavailable("the relay is shutting down; reconnect")),
                request = requests.next() => match request {
                    None => break Stop::Disconnected,
                    Some(Err(status)) if status.message().contains("decode") => {
                        break self.reject(
                            "malformed",
                            Status::invalid_argument(format!("malformed DiscoveryRequest: {}", status.message())),
                        );
                    }
                    Some(Err(status)) => {
                        tracing::debug!(peer = %self.peer, code = ?status.code(), error = %status.message(), "downstream stream error");
                        break Stop::Disconnected;
                    }
                    Some(Ok(request)) => if let Err(stop) = self.on_request(request).await { break stop },
                },
                Some((type_url, _)) = self.watches.next() => {
                    let mut woken = vec![type_url];
                    while let Some(Some((type_url, _))) = self.watches.next().now_or_never() {
                        woken.push(type_url);
                    }
                    woken.sort_by_key(|t| xds::push_order(t));
                    woken.dedup();
                    if let Err(stop) = self.push_all(&woken).await { break stop }
                }
            }
        };
        if let Stop::Status(status) = stop {
            let _ = self.tx.send(Err(status)).await;
        }
        self.shared.metrics.downstream_streams.dec();
    }

    async fn push_all(&mut self, types: &[String]) -> Result<(), Stop> {
        for type_url in types {
            self.push(type_url).await?;
        }
        Ok(())
    }

    fn reject(&self, reason: &str, status: Status) -> Stop {
        let node_id = self.node.as_ref().map(|n| n.id.as_str()).unwrap_or_default();
        tracing::warn!(peer = %self.peer, node = %node_id, reason, error = %status.message(), "downstream request rejected");
        self.shared.metrics.request_error(reason);
        Stop::Status(status)
    }

    async fn on_request(&mut self, request: DiscoveryRequest) -> Result<(), Stop> {
        if self.node.is_none() {
            self.node = Some(request.node.clone().unwrap_or_default());
        }
        let type_url = match (self.default_type, request.type_url.as_str()) {
            (_, t) if xds::is_v2(t) => {
                return Err(self.reject(
                    "v2",
                    Status::unimplemented(format!("type {t} is xDS v2, which is not supported; use the v3 API")),
                ));
            }
            (None, "") => {
                return Err(self.reject(
                    "missing_type_url",
                    Status::invalid_argument("type_url is required on an aggregated (ADS) stream"),
                ));
            }
            (Some(default), "") => default.to_owned(),
            (Some(default), t) if t != default => {
                return Err(self.reject(
                    "wrong_type_url",
                    Status::invalid_argument(format!("type {t} cannot be requested on the stream for {default}")),
                ));
            }
            (_, t) => t.to_owned(),
        };
        let state = self.types.entry(type_url.clone()).or_insert_with(|| TypeState {
            subscription: SubscriptionState::default(),
            watcher: None,
            sent_serial: None,
            force: false,
        });
        match subscription::classify(&state.subscription, &request) {
            Classified::Stale => {
                self.shared.metrics.stale_requests.inc();
                tracing::debug!(peer = %self.peer, type_url = %type_url, nonce = %request.response_nonce, "stale request ignored");
                return Ok(());
            }
            Classified::Initial => {}
            Classified::Ack { version } => {
                if let Some(watcher) = &state.watcher {
                    watcher.record_ack(&version);
                }
            }
            Classified::Nack { version, message } => {
                if let Some(watcher) = &state.watcher {
                    tracing::info!(peer = %self.peer, key = %watcher.entry().key, type_url = %type_url, accepted_version = %version, error = %message, "client NACKed");
                    let rejected = watcher.entry().state().version_info.clone();
                    watcher.record_nack(&rejected, &message);
                }
            }
        }
        if !subscription::apply_names(&mut state.subscription, &request.resource_names) {
            return Ok(());
        }
        self.resubscribe(&type_url, &request.resource_names)?;
        self.push(&type_url).await
    }

    /// Points the type's watcher at the key its new names map to.
    fn resubscribe(&mut self, type_url: &str, names: &[String]) -> Result<(), Stop> {
        let node = self.node.clone().unwrap_or_default();
        let Some(state) = self.types.get_mut(type_url) else { return Ok(()) };
        state.force = true;
        let interest = state.subscription.interest.clone();
        if interest.is_empty() {
            state.watcher = None;
            self.watches.remove(type_url);
            return Ok(());
        }
        let key = match self.shared.source.key(&KeyRequest { type_url, node: Some(&node), resource_names: names }) {
            Ok(key) => key,
            Err(error) => {
                self.shared
                    .metrics
                    .mapping_errors
                    .get_or_create(&crate::telemetry::TypeLabels { r#type: xds::short_name(type_url).to_owned() })
                    .inc();
                return Err(self.reject(
                    "unmapped",
                    Status::invalid_argument(format!(
                        "cannot map the {} request to an aggregation key: {error}",
                        xds::short_name(type_url)
                    )),
                ));
            }
        };
        match &mut state.watcher {
            Some(watcher) if watcher.entry().key == key => {
                watcher.set_interest(interest);
                return Ok(());
            }
            _ => {}
        }
        let client =
            ClientInfo { node_id: node.id.clone(), node_cluster: node.cluster.clone(), peer: self.peer.clone() };
        let watcher = match self.shared.source.watch(&key, type_url, &node, client, interest) {
            Ok(watcher) => watcher,
            Err(error) => return Err(self.reject("key_conflict", Status::failed_precondition(error.to_string()))),
        };
        tracing::debug!(peer = %self.peer, node = %node.id, key = %key, type_url = %type_url, "watching key");
        self.watches.insert(type_url.to_owned(), WatchStream::new(watcher.receiver()));
        let state = self.types.get_mut(type_url).expect("type state exists");
        state.watcher = Some(watcher);
        state.sent_serial = None;
        Ok(())
    }

    /// Sends the type's current state if the client needs it.
    async fn push(&mut self, type_url: &str) -> Result<(), Stop> {
        let Some(state) = self.types.get_mut(type_url) else { return Ok(()) };
        let Some(watcher) = &state.watcher else { return Ok(()) };
        let key_state = watcher.entry().state();
        let interest: &Interest = &state.subscription.interest;
        if !key_state.is_ready() || interest.is_empty() {
            return Ok(());
        }
        let full_state = xds::is_full_state(type_url) || key_state.opaque;
        // Never answer LDS/CDS from a state that was not fetched for these names: a missing
        // resource there means "deleted" to the client.
        if full_state && !key_state.coverage.covers(interest) {
            return Ok(());
        }
        if !state.force && state.sent_serial == Some(key_state.serial) {
            return Ok(());
        }
        let (body, count) = key_state.body_for(interest);
        if count == 0 && !full_state {
            // An empty EDS/RDS response says nothing; the client waits for the resources.
            state.sent_serial = Some(key_state.serial);
            state.force = false;
            return Ok(());
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let bytes = body.len();
        let response = EncodedResponse { body, nonce: nonce.clone() };
        state.subscription.last_nonce = Some(nonce);
        state.sent_serial = Some(key_state.serial);
        state.force = false;
        watcher.record_sent(&key_state.version_info);
        let metrics = &watcher.entry().metrics;
        metrics.pushes.inc();
        metrics.push_bytes.inc_by(bytes as u64);
        self.shared.metrics.push_latency.observe(key_state.received_at.elapsed().as_secs_f64());
        tracing::debug!(peer = %self.peer, key = %watcher.entry().key, type_url, version = %key_state.version_info, resources = count, bytes, "push");
        self.tx.send(Ok(response)).await.map_err(|_| Stop::Disconnected)
    }
}
