//! One load-generator call as a task: opens the gRPC stream, feeds a [`Session`], reports to
//! [`Metrics`], and reopens the stream `reconnect_delay` after it ends, until cancelled. A
//! forced restart of its client ([`Client::restart`]) ends the stream and reopens it at once,
//! with the node of the client's new epoch.
//!
//! The calls of one simulated client share a [`Client`]: its node, its progress, and the derived
//! EDS/RDS names, which the call carrying CDS/LDS publishes through latest-wins `watch`
//! channels and the call carrying EDS/RDS (the same one on ADS) follows.
//!
//! Invariants: a call keeps no response, only what [`Session`] keeps; every loop ends when the
//! run's token is cancelled.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use super::config::{LoadgenConfig, Protocol, XdsType};
use super::metrics::{ClientProgress, Metrics};
use super::record::{Event, Recorder, code_name};
use super::session::{Request, Response, Session};
use super::skim::SotwResponse;
use crate::client::Transport;
use crate::grpc::{method_path, streaming};

/// The message of a disconnect record for a forced restart.
const RESTARTED: &str = "restarted by the load generator";

/// Derived names of one child type; `None` until the parent type's first response.
type DerivedNames = watch::Sender<Option<BTreeSet<String>>>;

/// What the calls of one simulated client share.
#[derive(Debug)]
pub struct Client {
    /// The client's index in the run.
    index: usize,
    /// The client's node in its first epoch.
    pub node: Node,
    /// The client's epoch: its forced restarts so far; every change restarts its calls.
    epoch: watch::Sender<u64>,
    /// Its node id, as records name it.
    id: Arc<str>,
    /// Streams the client opened so far, over all its calls (the record's ordinal).
    streams: std::sync::atomic::AtomicU64,
    /// Its progress, for the run's counters.
    pub progress: ClientProgress,
    /// Derived EDS names (from CDS).
    eds: DerivedNames,
    /// Derived RDS names (from LDS).
    rds: DerivedNames,
}

// === impl Client ===

impl Client {
    /// Client `index` of a run of `config`, in its first epoch, with no derived names yet.
    pub fn new(config: &LoadgenConfig, index: usize) -> Self {
        let node = client_node(config, index, 0);
        Self {
            index,
            id: Arc::from(node.id.as_str()),
            node,
            epoch: watch::Sender::new(0),
            streams: std::sync::atomic::AtomicU64::new(0),
            progress: ClientProgress::default(),
            eds: watch::Sender::new(None),
            rds: watch::Sender::new(None),
        }
    }

    /// Ends the client's streams and opens new ones at once, with the node of its next epoch.
    pub fn restart(&self) {
        self.epoch.send_modify(|epoch| *epoch += 1);
    }

    /// The client's node in `epoch`.
    fn node_at(&self, config: &LoadgenConfig, epoch: u64) -> Node {
        if epoch == 0 { self.node.clone() } else { client_node(config, self.index, epoch) }
    }

    /// The derived names of `t` (EDS or RDS).
    fn derived(&self, t: XdsType) -> Option<&DerivedNames> {
        match t {
            XdsType::Eds => Some(&self.eds),
            XdsType::Rds => Some(&self.rds),
            XdsType::Cds | XdsType::Lds => None,
        }
    }

    /// Publishes new derived names of `t`, if they differ.
    fn publish(&self, t: XdsType, names: BTreeSet<String>) {
        if let Some(tx) = self.derived(t) {
            tx.send_if_modified(|current| {
                let changed = current.as_ref() != Some(&names);
                if changed {
                    *current = Some(names);
                }
                changed
            });
        }
    }
}

/// The node of client `index` in `epoch` (see [`LoadgenConfig::node_identity`]).
pub fn client_node(config: &LoadgenConfig, index: usize, epoch: u64) -> Node {
    let (id, cluster) = config.node_identity(index, epoch);
    let mut node = crate::client::node(&id, &cluster);
    "xds-loadgen".clone_into(&mut node.user_agent_name);
    node
}

/// How a call's stream ended.
#[derive(Debug)]
enum End {
    /// The server closed it with OK.
    Closed,
    /// The client was restarted ([`Client::restart`]): the call ended it.
    Restarted,
    /// It failed, or could not open.
    Failed(Status),
}

/// One gRPC call of a simulated client.
#[derive(Debug)]
pub struct Call {
    /// The run's configuration.
    pub config: Arc<LoadgenConfig>,
    /// The run's counters.
    pub metrics: Arc<Metrics>,
    /// The client this call belongs to.
    pub client: Arc<Client>,
    /// The types this call carries (all of them on ADS, one per-type).
    pub types: Vec<XdsType>,
    /// The HTTP/2 connection to use.
    pub channel: Channel,
    /// Cancelled when the run stops.
    pub cancel: CancellationToken,
    /// Where connects, responses and disconnects are recorded, if anywhere.
    pub recorder: Option<Recorder>,
}

// === impl Call ===

impl Call {
    /// Runs the call, reopening it after each end, until the run is cancelled.
    pub async fn run(self) {
        loop {
            let stream = self.client.streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let end = tokio::select! {
                end = self.run_once(stream) => end,
                () = self.cancel.cancelled() => return,
            };
            let (code, message) = match &end {
                End::Restarted => {
                    // A forced restart reopens at once: it is not a failure nor a reconnect.
                    self.record(
                        stream,
                        Event::Disconnect { code: code_name(tonic::Code::Cancelled), message: RESTARTED.to_owned() },
                    );
                    self.metrics.count_restart();
                    continue;
                }
                End::Closed => (tonic::Code::Ok, String::new()),
                End::Failed(status) => {
                    tracing::debug!(code = ?status.code(), message = status.message(), "call failed");
                    self.metrics.count_error();
                    (status.code(), status.message().to_owned())
                }
            };
            self.record(stream, Event::Disconnect { code: code_name(code), message });
            tokio::select! {
                () = tokio::time::sleep(self.config.reconnect_delay) => {}
                () = self.cancel.cancelled() => return,
            }
            self.metrics.count_reconnect();
        }
    }

    /// Records `event` of the client's stream `stream`, when recording.
    fn record(&self, stream: u64, event: Event) {
        if let Some(recorder) = &self.recorder {
            let call_type = (self.config.mode == Transport::PerType).then(|| self.types[0]);
            recorder.record(&self.client.id, call_type, stream, event);
        }
    }

    /// Opens the stream (the client's `stream`th) and serves it until it ends.
    async fn run_once(&self, stream: u64) -> End {
        let mut restart = self.client.epoch.subscribe();
        let epoch = *restart.borrow_and_update();
        let mut session = Session::new(&self.config, &self.types, self.client.node_at(&self.config, epoch));
        let mut eds = self.follow(&session, XdsType::Eds);
        let mut rds = self.follow(&session, XdsType::Rds);
        let first = session.start(|t| match t {
            XdsType::Eds => eds.as_mut().and_then(|rx| rx.borrow_and_update().clone()),
            XdsType::Rds => rds.as_mut().and_then(|rx| rx.borrow_and_update().clone()),
            XdsType::Cds | XdsType::Lds => None,
        });
        let opened_at = Instant::now();
        let (outbound, mut inbound) = match self.open(first).await {
            Ok(pair) => pair,
            Err(status) => return End::Failed(status),
        };
        let _open = self.metrics.call_opened();
        self.record(stream, Event::Connect);
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(response)) => {
                        let handled = session.on_response(response);
                        self.metrics.record(&self.client.progress, &handled, opened_at.elapsed());
                        if self.recorder.is_some() {
                            let (xds_type, version, resources) =
                                (handled.xds_type, handled.version.clone(), handled.resources);
                            self.record(stream, Event::Response { xds_type, version, resources });
                        }
                        outbound.send(handled.reply);
                        if let Some((child, names)) = handled.derived {
                            self.client.publish(child, names);
                        }
                    }
                    Ok(None) => return End::Closed,
                    Err(status) => return End::Failed(status),
                },
                Ok(()) = restart.changed() => return End::Restarted,
                Some(names) = changed(&mut eds) => {
                    if let Some(request) = session.set_derived(XdsType::Eds, names) {
                        outbound.send(request);
                    }
                }
                Some(names) = changed(&mut rds) => {
                    if let Some(request) = session.set_derived(XdsType::Rds, names) {
                        outbound.send(request);
                    }
                }
            }
        }
    }

    /// A receiver of `t`'s derived names, when this call carries `t` and derives it.
    fn follow(&self, session: &Session, t: XdsType) -> Option<watch::Receiver<Option<BTreeSet<String>>>> {
        let derives = session.carries(t) && self.config.derives(t);
        derives.then(|| self.client.derived(t).map(watch::Sender::subscribe)).flatten()
    }

    /// Queues `first` and opens the stream that matches the protocol, mode and types.
    async fn open(&self, first: Vec<Request>) -> Result<(Outbound, Inbound), Status> {
        let (protocol, mode, t) = (self.config.protocol, self.config.mode, self.types[0]);
        let path = method_path(protocol, mode, t.type_url())
            .ok_or_else(|| Status::unimplemented(format!("no per-type service for {t}")))?;
        let channel = self.channel.clone();
        match self.config.protocol {
            Protocol::Sotw => {
                let (tx, rx) = mpsc::unbounded_channel();
                let outbound = Outbound::Sotw(tx);
                first.into_iter().for_each(|r| outbound.send(r));
                let inbound = streaming::<DiscoveryRequest, SotwResponse>(channel, path, unboxed(rx)).await?;
                Ok((outbound, Inbound::Sotw(inbound)))
            }
            Protocol::Delta => {
                let (tx, rx) = mpsc::unbounded_channel();
                let outbound = Outbound::Delta(tx);
                first.into_iter().for_each(|r| outbound.send(r));
                let inbound =
                    streaming::<DeltaDiscoveryRequest, DeltaDiscoveryResponse>(channel, path, unboxed(rx)).await?;
                Ok((outbound, Inbound::Delta(inbound)))
            }
        }
    }
}

/// The next derived names of a followed type; never completes for `None` or a closed channel.
async fn changed(rx: &mut Option<watch::Receiver<Option<BTreeSet<String>>>>) -> Option<BTreeSet<String>> {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return rx.borrow_and_update().clone();
    }
    std::future::pending().await
}

/// The requests of a boxed request queue.
fn unboxed<R: Send + 'static>(rx: mpsc::UnboundedReceiver<Box<R>>) -> impl tokio_stream::Stream<Item = R> + Send {
    UnboundedReceiverStream::new(rx).map(|r| *r)
}

/// The request queue of a call; requests are boxed because the queue allocates 32 slots at a
/// time, and a request with its `Node` is large.
enum Outbound {
    Sotw(mpsc::UnboundedSender<Box<DiscoveryRequest>>),
    Delta(mpsc::UnboundedSender<Box<DeltaDiscoveryRequest>>),
}

impl Outbound {
    /// Queues a request; a request of the other protocol, or a closed queue (the call is
    /// ending), drops it.
    fn send(&self, request: Request) {
        match (self, request) {
            (Outbound::Sotw(tx), Request::Sotw(r)) => {
                let _ = tx.send(Box::new(r));
            }
            (Outbound::Delta(tx), Request::Delta(r)) => {
                let _ = tx.send(Box::new(r));
            }
            _ => debug_assert!(false, "request of the other protocol"),
        }
    }
}

/// The response stream of a call.
enum Inbound {
    Sotw(Streaming<SotwResponse>),
    Delta(Streaming<DeltaDiscoveryResponse>),
}

impl Inbound {
    /// The next response, `None` when the server closed the stream with OK.
    async fn message(&mut self) -> Result<Option<Response>, Status> {
        match self {
            Inbound::Sotw(s) => Ok(s.message().await?.map(Response::Sotw)),
            Inbound::Delta(s) => Ok(s.message().await?.map(Response::Delta)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_publish_only_changes() {
        let client = Client::new(&LoadgenConfig::default(), 0);
        let mut rx = client.eds.subscribe();
        client.publish(XdsType::Eds, BTreeSet::from(["a".to_owned()]));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        client.publish(XdsType::Eds, BTreeSet::from(["a".to_owned()]));
        assert!(!rx.has_changed().unwrap());
        client.publish(XdsType::Cds, BTreeSet::new());
    }

    #[test]
    fn a_restart_moves_the_client_to_its_next_epoch() {
        let config = LoadgenConfig {
            streams: 4,
            groups: 2,
            cluster_template: "g{group}e{epoch}-x".into(),
            ..Default::default()
        };
        let client = Client::new(&config, 3);
        let mut rx = client.epoch.subscribe();
        assert_eq!(client.node.cluster, "g1e0-x");
        assert_eq!(client.node.user_agent_name, "xds-loadgen");
        client.restart();
        assert!(rx.has_changed().unwrap(), "calls see the restart");
        let epoch = *rx.borrow_and_update();
        assert_eq!(client.node_at(&config, epoch).cluster, "g1e1-x");
        assert_eq!(client.node_at(&config, 0), client.node);
    }
}
