//! In-process test harness: a relay [`Node`] started inside the test on loopback listeners it
//! binds itself (its addresses are read from the node, never scraped from logs), an origin
//! that is a small tonic ADS server driven by the test (it records every request and sends
//! the responses the test gives it), and an async HTTP/1.0 client for the admin API.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::{Stream, StreamExt as _};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status, Streaming};
use xds_relay::app::{Listeners, Node};
use xds_relay::config::{LogLevel, parse_bootstrap, parse_rules};
use xds_relay::telemetry::LogControl;
use xds_relay::xds;

/// Generous bound for anything that should happen "soon" (the tests run on a loaded machine).
pub const SOON: Duration = Duration::from_secs(10);

/// One request the origin received, with the stream it came on (numbered from 1 in order
/// of opening).
#[derive(Debug, Clone)]
pub struct OriginRequest {
    pub stream: u64,
    pub request: DiscoveryRequest,
}

type Responses = mpsc::UnboundedSender<Result<DiscoveryResponse, Status>>;

/// An open origin stream: its number, the type of its first request, and where its
/// responses go.
struct OpenStream {
    id: u64,
    type_url: String,
    responses: Responses,
}

#[derive(Default)]
struct OriginState {
    streams: Vec<OpenStream>,
    opened: u64,
    requests: Vec<OriginRequest>,
    nonce: u64,
    /// While set, the connections of before were cut and new ones are closed at once.
    down: bool,
    /// Cancelled to cut every connection accepted since the last outage.
    links: CancellationToken,
}

/// The origin's state, shared by its streams and the test, and a change counter that wakes
/// the waiting test.
#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<OriginState>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, OriginState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

/// A management server inside the test: state-of-the-world ADS whose responses the test
/// sends with [`Origin::respond`] and whose requests it reads with [`Origin::requests`].
pub struct Origin {
    pub addr: SocketAddr,
    shared: Shared,
    shutdown: CancellationToken,
}

impl Origin {
    /// Starts the origin on 127.0.0.1 at a port the system picks.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the origin listener");
        let addr = listener.local_addr().expect("origin address");
        let shared = Shared { state: Arc::default(), changes: Arc::new(watch::Sender::new(0)) };
        let shutdown = CancellationToken::new();
        let service = AggregatedDiscoveryServiceServer::new(OriginService { shared: shared.clone() });
        let stopped = shutdown.clone().cancelled_owned();
        let incoming = futures_util::stream::unfold((listener, shared.clone()), |(listener, shared)| async move {
            loop {
                let io = match listener.accept().await {
                    Ok((io, _)) => io,
                    Err(e) => return Some((Err(e), (listener, shared))),
                };
                let link = {
                    let state = shared.lock();
                    (!state.down).then(|| state.links.clone())
                };
                // During an outage a connection is closed as soon as it is accepted.
                if let Some(link) = link {
                    let io = Severable { io, severed: Box::pin(link.cancelled_owned()) };
                    return Some((Ok(io), (listener, shared)));
                }
            }
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped)
                .await
                .expect("the origin server failed");
        });
        Self { addr, shared, shutdown }
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<OriginRequest> {
        self.shared.lock().requests.clone()
    }

    /// How many streams were ever opened.
    pub fn streams_opened(&self) -> u64 {
        self.shared.lock().opened
    }

    /// How many streams are open now.
    pub fn streams_open(&self) -> usize {
        self.shared.lock().streams.iter().filter(|s| !s.responses.is_closed()).count()
    }

    /// Waits until `check` holds of the requests received so far and returns its value.
    pub async fn wait_for<T>(&self, what: &str, mut check: impl FnMut(&[OriginRequest]) -> Option<T>) -> T {
        let mut changes = self.shared.changes.subscribe();
        let deadline = tokio::time::Instant::now() + SOON;
        loop {
            if let Some(found) = check(&self.shared.lock().requests) {
                return found;
            }
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                panic!("the origin never saw {what}; requests: {:#?}", self.requests());
            }
        }
    }

    /// Waits for the first request of `type_url` on a stream opened after `after` streams.
    pub async fn wait_for_stream(&self, type_url: &str, after: u64) -> OriginRequest {
        self.wait_for(&format!("a new {type_url} stream"), |requests| {
            requests.iter().find(|r| r.stream > after && r.request.type_url == type_url).cloned()
        })
        .await
    }

    /// Sends `resources` of `type_url` at `version` on every open stream of that type and
    /// returns the nonce.
    pub fn respond(&self, type_url: &str, version: &str, resources: Vec<Any>) -> String {
        let mut state = self.shared.lock();
        state.nonce += 1;
        let nonce = format!("origin-{}", state.nonce);
        let response = DiscoveryResponse {
            version_info: version.to_owned(),
            resources,
            type_url: type_url.to_owned(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        let mut sent = 0;
        for stream in state.streams.iter().filter(|s| s.type_url == type_url) {
            sent += usize::from(stream.responses.send(Ok(response.clone())).is_ok());
        }
        assert!(sent > 0, "no open origin stream of {type_url} to respond on");
        nonce
    }

    /// An outage, as when the origin's process dies: every connection is cut (reset) and
    /// new connections are closed as soon as they are accepted, until [`Origin::recover`].
    pub fn fail(&self) {
        let mut state = self.shared.lock();
        state.down = true;
        state.links.cancel();
        state.links = CancellationToken::new();
        state.streams.clear();
        drop(state);
        self.shared.changed();
    }

    /// Ends the outage: new streams are accepted again.
    pub fn recover(&self) {
        self.shared.lock().down = false;
        self.shared.changed();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct OriginService {
    shared: Shared,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for OriginService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut state = self.shared.lock();
            if state.down {
                return Err(Status::unavailable("origin outage"));
            }
            state.opened += 1;
            state.opened
        };
        let shared = self.shared.clone();
        let mut requests = request.into_inner();
        tokio::spawn(async move {
            while let Some(Ok(request)) = requests.next().await {
                let mut state = shared.lock();
                if !state.streams.iter().any(|s| s.id == id) && !state.down {
                    let type_url = request.type_url.clone();
                    state.streams.push(OpenStream { id, type_url, responses: tx.clone() });
                }
                state.requests.push(OriginRequest { stream: id, request });
                drop(state);
                shared.changed();
            }
            shared.lock().streams.retain(|s| s.id != id);
            shared.changed();
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("this origin speaks state-of-the-world ADS only"))
    }
}

/// `names` as Cluster resources.
pub fn clusters(names: &[&str]) -> Vec<Any> {
    names
        .iter()
        .map(|name| Any {
            type_url: xds::CLUSTER.to_owned(),
            value: Cluster { name: (*name).to_owned(), ..Default::default() }.encode_to_vec(),
        })
        .collect()
}

/// `names` as ClusterLoadAssignment resources (each with one endpoint, 10.0.0.1).
pub fn assignments(names: &[&str]) -> Vec<Any> {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    let endpoint = LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "10.0.0.1".to_owned(),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    names
        .iter()
        .map(|name| {
            let cla = ClusterLoadAssignment {
                cluster_name: (*name).to_owned(),
                endpoints: vec![LocalityLbEndpoints { lb_endpoints: vec![endpoint.clone()], ..Default::default() }],
                ..Default::default()
            };
            Any { type_url: xds::ENDPOINT.to_owned(), value: cla.encode_to_vec() }
        })
        .collect()
}

/// A relay node running in the test process in front of `origin`, with the example
/// aggregation rules (nodes of cluster `staging-*` share `staging_cds`, …).
pub async fn start_relay(origin: &Origin) -> Node {
    let bootstrap = format!(
        "
server: {{address: {{address: 127.0.0.1, port_value: 0}}}}
origin_server:
  address: {{address: 127.0.0.1, port_value: {port}}}
  api_type: AGGREGATED_GRPC
  backoff: {{initial_interval: 20ms, max_interval: 100ms}}
cache: {{ttl: 60s}}
admin: {{address: {{address: 127.0.0.1, port_value: 0}}}}
",
        port = origin.addr.port()
    );
    let bootstrap = parse_bootstrap(&bootstrap, "bootstrap.yaml").expect("bootstrap");
    let rules = parse_rules(include_str!("../../../example/config/aggregation-rules.yaml"), "aggregation-rules.yaml")
        .expect("aggregation rules");
    let listeners = Listeners::bind_loopback().await.expect("bind loopback listeners");
    Node::start(bootstrap, &rules, listeners, LogControl::detached(LogLevel::Info)).await.expect("start the relay")
}

/// The gRPC endpoint of `node`'s xDS listener.
pub fn endpoint(node: &Node) -> String {
    format!("http://{}", node.xds_addr)
}

/// An admin API answer: status code and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
}

impl HttpAnswer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Calls `method path` on the admin listener at `addr` over HTTP/1.0 (one connection per
/// call; the answer is read to the end).
pub async fn admin_call(addr: SocketAddr, method: &str, path: &str) -> HttpAnswer {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the admin listener");
    let request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the admin request");
    let mut raw = Vec::new();
    tokio::time::timeout(SOON, stream.read_to_end(&mut raw))
        .await
        .expect("the admin answer within SOON")
        .expect("read the admin answer");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    HttpAnswer { status, body: body.to_owned() }
}

/// Polls `check` every 10 ms until it yields a value, for at most [`SOON`].
pub async fn poll<T, F: Future<Output = Option<T>>>(mut check: impl FnMut() -> F) -> T {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "the condition did not hold within {SOON:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An accepted origin connection that fails every read and write once its token is
/// cancelled: the server then drops it and the relay sees the connection reset.
struct Severable {
    io: TcpStream,
    severed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Severable {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.severed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(io::ErrorKind::ConnectionReset, "origin outage")),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for Severable {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Severable {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for Severable {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}
