//! The task behind every stream of the management server, SotW or delta: it moves messages
//! between the client, the publisher and the protocol's per-stream state, checks type URLs, and
//! keeps the [`Registry`] up to date. What differs between SotW and delta is behind
//! [`StreamProtocol`] (implemented in [`crate::server`] and [`crate::delta_server`]).
//!
//! Invariants:
//! - a stream ends when the client half-closes or fails, when its response queue is gone, or on
//!   shutdown (with `UNAVAILABLE`), and it leaves the registry when it ends;
//! - a per-type stream only carries its own type URL; a request for another type ends the
//!   stream with `INVALID_ARGUMENT`, and so does an ADS request without a type URL;
//! - while the current snapshot's extras set a TTL and a heartbeat interval, each stream gets a
//!   CDS heartbeat one interval after its last publish or heartbeat ([`Heartbeat`]), counted in
//!   the registry as `heartbeats_sent`.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::publisher::{Published, Publisher};
use crate::registry::{Registry, StreamGuard};

/// How the protocol classified a request, for the registry's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The request accepted the last response of its type.
    Ack,
    /// The request rejected the last response of its type.
    Nack,
    /// Anything else (first request, subscription change, stale nonce).
    Other,
}

/// One protocol's per-stream rules, as the stream task drives them.
pub(crate) trait StreamProtocol: Send + Sync + 'static {
    /// The request message.
    type Request: XdsRequest + Send + 'static;
    /// The response message.
    type Response: Send + 'static;

    /// What the stream is called in log messages ("stream", "delta stream").
    const STREAM: &'static str;

    /// Applies one request whose type URL was checked; `current` is the latest snapshot.
    /// Returns the request's classification and the response to send, if any.
    fn on_request(
        &mut self,
        request: &Self::Request,
        current: Option<&Arc<Published>>,
    ) -> (Verdict, Option<Self::Response>);

    /// The responses a newly published snapshot calls for.
    fn on_publish(&mut self, published: &Arc<Published>) -> Vec<Self::Response>;

    /// The TTL heartbeats due under `published`.
    fn on_heartbeat(&mut self, published: &Arc<Published>) -> Vec<Self::Response>;

    /// Logs one response about to be queued.
    fn log_response(response: &Self::Response);
}

/// What the stream task reads of a request, SotW or delta.
pub(crate) trait XdsRequest {
    /// The request's type URL, which the task checks and may fill in.
    fn type_url_mut(&mut self) -> &mut String;

    /// The request's node, if it carries one.
    fn node(&self) -> Option<&Node>;
}

/// Both request messages carry `type_url` and `node` alike.
macro_rules! xds_request {
    ($($request:ty),*) => {$(
        impl XdsRequest for $request {
            fn type_url_mut(&mut self) -> &mut String {
                &mut self.type_url
            }

            fn node(&self) -> Option<&Node> {
                self.node.as_ref()
            }
        }
    )*};
}

xds_request!(DiscoveryRequest, DeltaDiscoveryRequest);

/// Checks a request's type URL against the stream's: a per-type stream fills in an empty one
/// and refuses others; ADS requires one.
pub(crate) fn check_type_url(fixed_type: Option<&'static str>, type_url: &mut String) -> Result<(), Status> {
    match fixed_type {
        Some(fixed) if type_url.is_empty() => fixed.clone_into(type_url),
        Some(fixed) if type_url != fixed => {
            return Err(Status::invalid_argument(format!(
                "type_url {type_url} cannot be requested on a {fixed} stream"
            )));
        }
        None if type_url.is_empty() => return Err(Status::invalid_argument("type_url is required on ADS")),
        _ => {}
    }
    Ok(())
}

/// When a stream's next TTL heartbeat is due: one interval after the last publish or
/// heartbeat, while the current snapshot's extras turn heartbeats on.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    last: tokio::time::Instant,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self { last: tokio::time::Instant::now() }
    }
}

// === impl Heartbeat ===

impl Heartbeat {
    /// The deadline of the next heartbeat under `current`, if heartbeats are on.
    pub(crate) fn due(&self, current: Option<&Published>) -> Option<tokio::time::Instant> {
        current.and_then(|p| p.extras.heartbeats()).map(|interval| self.last + interval)
    }

    /// Records that a heartbeat or a publish went out now.
    pub(crate) fn sent(&mut self) {
        self.last = tokio::time::Instant::now();
    }

    /// Completes at `due`; never without one.
    pub(crate) async fn sleep(due: Option<tokio::time::Instant>) {
        match due {
            Some(due) => tokio::time::sleep_until(due).await,
            None => std::future::pending().await,
        }
    }
}

/// Everything one stream's task owns.
pub(crate) struct StreamTask<P: StreamProtocol> {
    pub(crate) protocol: P,
    pub(crate) publisher: Publisher,
    pub(crate) registry: Arc<Registry>,
    /// Keeps the stream listed in the registry until the task ends.
    pub(crate) guard: StreamGuard,
    /// The only type URL of a per-type stream; `None` for ADS.
    pub(crate) fixed_type: Option<&'static str>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tx: mpsc::Sender<Result<P::Response, Status>>,
}

// === impl StreamTask ===

impl<P: StreamProtocol> StreamTask<P> {
    /// Runs the stream until the client goes away, a request is invalid, or shutdown.
    pub(crate) async fn run(mut self, mut requests: Streaming<P::Request>) {
        let mut snapshots = self.publisher.subscribe();
        let mut first = true;
        let mut heartbeat = Heartbeat::default();
        tracing::debug!("{} opened", P::STREAM);
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
                    let beats = self.protocol.on_heartbeat(&published);
                    for _ in &beats {
                        self.registry.count_heartbeat();
                    }
                    if !self.send_all(beats).await {
                        break None;
                    }
                }
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break Some(Status::unavailable("publisher stopped"));
                    }
                    let Some(published) = snapshots.borrow_and_update().clone() else { continue };
                    heartbeat.sent();
                    let responses = self.protocol.on_publish(&published);
                    if !self.send_all(responses).await {
                        break None;
                    }
                }
                message = requests.message() => match message {
                    Ok(Some(request)) => {
                        let current = snapshots.borrow().clone();
                        match self.on_request(request, first, current.as_ref()) {
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
        tracing::debug!("{} closed", P::STREAM);
    }

    /// Validates and applies one request; returns the response to send, if any.
    fn on_request(
        &mut self,
        mut request: P::Request,
        first: bool,
        current: Option<&Arc<Published>>,
    ) -> Result<Option<P::Response>, Status> {
        self.registry.count_request();
        if first {
            let (id, cluster) = request.node().map_or(("", ""), |n| (n.id.as_str(), n.cluster.as_str()));
            self.guard.set_node(id, cluster);
        }
        let type_url = request.type_url_mut();
        check_type_url(self.fixed_type, type_url)?;
        self.guard.add_type(type_url);
        let (verdict, response) = self.protocol.on_request(&request, current);
        match verdict {
            Verdict::Ack => self.registry.count_ack(),
            Verdict::Nack => self.registry.count_nack(),
            Verdict::Other => {}
        }
        Ok(response)
    }

    /// Queues responses; false when the client is gone or on shutdown.
    async fn send_all(&self, responses: impl IntoIterator<Item = P::Response>) -> bool {
        for response in responses {
            P::log_response(&response);
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
