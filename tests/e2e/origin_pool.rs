//! The origin connection pool against a relay process: an origin that allows 5 concurrent
//! streams per HTTP/2 connection (`SETTINGS_MAX_CONCURRENT_STREAMS`) serves 23 keys, one
//! client each. Every client is served, no origin connection carries more than 5 streams and
//! the relay opens ceil(23/5) connections, none of its streams waiting for a slot. When the
//! origin drops one connection, only the keys on it open new streams; the other keys' streams
//! stay as they are.
//!
//! The origin is a gRPC server in this test (the example management server sets no stream
//! limit): it answers each CDS stream with one cluster and records, per TCP connection, the
//! streams it carries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::support::{RelayProcess, SOON, bootstrap_yaml, eventually};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::service::cluster::v3::cluster_discovery_service_server::{
    ClusterDiscoveryService, ClusterDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::{Stream, StreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

/// Streams the origin allows on one connection.
const ORIGIN_STREAM_LIMIT: u32 = 5;
/// Keys (one client each, node cluster `c{i}-x`: the example rules make its key `c{i}_cds`).
const KEYS: usize = 23;

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the origin saw.
#[derive(Default)]
struct Seen {
    /// Every accepted TCP connection, by the relay's port, with a handle to cut it.
    connections: BTreeMap<u16, std::net::TcpStream>,
    /// Streams open now, by connection (the relay's port), as node clusters.
    open: BTreeMap<u16, Vec<String>>,
    /// Streams opened since start, by node cluster.
    opened: BTreeMap<String, usize>,
}

#[derive(Clone, Default)]
struct LimitedOrigin {
    seen: Arc<Mutex<Seen>>,
}

/// Takes a stream out of [`Seen::open`] when the origin's side of it ends.
struct OpenStream {
    seen: Arc<Mutex<Seen>>,
    port: u16,
    cluster: String,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut seen = self.seen.lock().unwrap();
        if let Some(open) = seen.open.get_mut(&self.port)
            && let Some(at) = open.iter().position(|c| *c == self.cluster)
        {
            open.remove(at);
        }
    }
}

#[tonic::async_trait]
impl ClusterDiscoveryService for LimitedOrigin {
    type StreamClustersStream = Responses<DiscoveryResponse>;
    type DeltaClustersStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_clusters(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamClustersStream>, Status> {
        let port = request.remote_addr().map_or(0, |a| a.port());
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let Some(Ok(first)) = requests.next().await else { return };
            let cluster = first.node.map(|n| n.cluster).unwrap_or_default();
            {
                let mut s = seen.lock().unwrap();
                s.open.entry(port).or_default().push(cluster.clone());
                *s.opened.entry(cluster.clone()).or_default() += 1;
            }
            let _open = OpenStream { seen, port, cluster: cluster.clone() };
            let resources = vec![Any {
                type_url: xds::CLUSTER.to_owned(),
                value: Cluster { name: format!("{cluster}-backend"), ..Default::default() }.encode_to_vec(),
            }];
            let response = DiscoveryResponse {
                version_info: "v1".to_owned(),
                nonce: "n1".to_owned(),
                type_url: xds::CLUSTER.to_owned(),
                resources,
                ..Default::default()
            };
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
            // ACKs until the relay ends the stream or the connection goes.
            while let Some(Ok(_)) = requests.next().await {}
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_clusters(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaClustersStream>, Status> {
        Err(Status::unimplemented("state of the world only"))
    }

    async fn fetch_clusters(&self, _request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented("streams only"))
    }
}

/// Starts the origin on loopback with its per-connection stream limit.
async fn start_origin() -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let origin = LimitedOrigin::default();
    let seen = origin.seen.clone();
    let (tx, rx) = mpsc::channel::<std::io::Result<tokio::net::TcpStream>>(16);
    let accepted = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            // A second handle on the socket lets the test cut this one connection.
            let std = tcp.into_std().unwrap();
            accepted.lock().unwrap().connections.insert(peer.port(), std.try_clone().unwrap());
            let tcp = tokio::net::TcpStream::from_std(std).unwrap();
            if tx.send(Ok(tcp)).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(ORIGIN_STREAM_LIMIT)
            .add_service(ClusterDiscoveryServiceServer::new(origin))
            .serve_with_incoming(ReceiverStream::new(rx)),
    );
    (addr, seen)
}

/// The value of the metric line starting with `series` (name and labels).
fn metric(relay: &RelayProcess, series: &str) -> Option<f64> {
    let text = relay.admin_get("/metrics").ok()?;
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spread_over_connections_within_the_origin_limit_and_a_lost_connection_moves_only_its_keys() {
    let (origin, seen) = start_origin().await;
    let relay = RelayProcess::start(&bootstrap_yaml(&[origin], "", "  ttl: 60s\n  max_entries: 100"));
    let label = format!("{{address=\"{origin}\"}}");

    let mut clients = Vec::new();
    for i in 0..KEYS {
        let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node(&format!("n{i}"), &format!("c{i}-x")))
            .await
            .expect("connect");
        c.subscribe(xds::CLUSTER, vec![]).await.expect("subscribe");
        clients.push(c);
    }
    for (i, c) in clients.iter().enumerate() {
        let served = c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "v1").await;
        assert!(served.is_ok(), "client {i} not served: {served:?}");
    }

    // Every key has its stream, on connections of at most 5 streams each.
    let wanted_connections = KEYS.div_ceil(ORIGIN_STREAM_LIMIT as usize);
    let layout = eventually("every key has one origin stream", SOON, || {
        let s = seen.lock().unwrap();
        let open: usize = s.open.values().map(Vec::len).sum();
        (open == KEYS).then(|| s.open.clone())
    })
    .await;
    let busy: Vec<_> = layout.iter().filter(|(_, streams)| !streams.is_empty()).collect();
    assert!(
        busy.iter().all(|(_, streams)| streams.len() <= ORIGIN_STREAM_LIMIT as usize),
        "a connection carries more than the origin allows: {layout:?}"
    );
    assert!(busy.len() >= wanted_connections, "{} connections carry the keys: {layout:?}", busy.len());
    assert!(seen.lock().unwrap().connections.len() >= wanted_connections);
    assert_eq!(metric(&relay, &format!("xds_relay_origin_streams{label}")), Some(KEYS as f64));
    assert_eq!(
        metric(&relay, &format!("xds_relay_origin_connections{label}")),
        Some(wanted_connections as f64),
        "the relay fills each connection to the origin's limit before opening another"
    );
    assert_eq!(
        metric(&relay, &format!("xds_relay_origin_connection_streams_max{label}")),
        Some(f64::from(ORIGIN_STREAM_LIMIT))
    );
    assert!(
        !relay.process.printed(&["did not accept the stream in time"]),
        "no stream waited for a slot the origin would not give"
    );

    // The origin drops the connection carrying the most keys: only those keys open new
    // streams (on other or new connections); the others keep theirs.
    let opened_before = seen.lock().unwrap().opened.clone();
    let (cut_port, moved) = {
        let s = seen.lock().unwrap();
        let (port, streams) = s.open.iter().max_by_key(|(_, streams)| streams.len()).unwrap();
        s.connections[port].shutdown(std::net::Shutdown::Both).expect("cut the connection");
        (*port, streams.iter().cloned().collect::<BTreeSet<_>>())
    };
    assert_eq!(moved.len(), ORIGIN_STREAM_LIMIT as usize);
    eventually("the keys of the cut connection have new streams", SOON, || {
        let s = seen.lock().unwrap();
        let open: usize = s.open.values().map(Vec::len).sum();
        let reopened = moved.iter().all(|c| s.opened[c] > opened_before[c]);
        let cut_empty = s.open.get(&cut_port).is_none_or(Vec::is_empty);
        (reopened && cut_empty && open == KEYS).then_some(())
    })
    .await;
    let s = seen.lock().unwrap();
    for (cluster, before) in &opened_before {
        if !moved.contains(cluster) {
            assert_eq!(s.opened[cluster], *before, "{cluster} was not on the cut connection but reconnected");
        }
    }
    assert!(
        s.open.values().all(|streams| streams.len() <= ORIGIN_STREAM_LIMIT as usize),
        "after the move a connection carries more than the origin allows: {:?}",
        s.open
    );
    drop(s);
    assert_eq!(metric(&relay, &format!("xds_relay_origin_streams{label}")), Some(KEYS as f64));
    for (i, c) in clients.iter().enumerate() {
        assert!(c.ended().is_none(), "client {i} lost its stream: {:?}", c.ended());
    }
}
