//! An origin that sends unusable responses, replayed against a relay process: a response
//! with resources named `""`, then one with a duplicate name. Each is NACKed to the origin
//! with a message naming the problem and the last accepted version, and the relay keeps
//! serving the previous state: a client connecting afterwards gets the good version.
//!
//! The origin is scripted in this test (the example management server only publishes valid
//! snapshots): a real gRPC server on loopback that answers the relay's CDS stream.

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

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers each CDS stream with the scripted responses in turn, one per request after the
/// first, and records every request it receives.
#[derive(Clone)]
struct ScriptedOrigin {
    script: Arc<Vec<DiscoveryResponse>>,
    requests: Arc<Mutex<Vec<DiscoveryRequest>>>,
}

#[tonic::async_trait]
impl ClusterDiscoveryService for ScriptedOrigin {
    type StreamClustersStream = Responses<DiscoveryResponse>;
    type DeltaClustersStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_clusters(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamClustersStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let origin = self.clone();
        tokio::spawn(async move {
            let mut next = 0;
            while let Some(Ok(request)) = requests.next().await {
                origin.requests.lock().unwrap().push(request);
                if let Some(response) = origin.script.get(next) {
                    next += 1;
                    if tx.send(Ok(response.clone())).await.is_err() {
                        return;
                    }
                }
            }
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

fn cluster(name: &str) -> Any {
    Any {
        type_url: xds::CLUSTER.to_owned(),
        value: Cluster { name: name.to_owned(), ..Default::default() }.encode_to_vec(),
    }
}

fn response(version: &str, nonce: &str, resources: Vec<Any>) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.to_owned(),
        nonce: nonce.to_owned(),
        type_url: xds::CLUSTER.to_owned(),
        resources,
        ..Default::default()
    }
}

async fn start_origin(script: Vec<DiscoveryResponse>) -> (SocketAddr, Arc<Mutex<Vec<DiscoveryRequest>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let origin = ScriptedOrigin { script: Arc::new(script), requests: requests.clone() };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ClusterDiscoveryServiceServer::new(origin))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, requests)
}

/// The NACK the relay sent upstream for `nonce`, if any: (version it carries, message).
fn nack_for(requests: &Mutex<Vec<DiscoveryRequest>>, nonce: &str) -> Option<(String, String)> {
    requests
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.response_nonce == nonce && r.error_detail.is_some())
        .map(|r| (r.version_info.clone(), r.error_detail.as_ref().unwrap().message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_origin_responses_are_nacked_and_the_previous_state_is_served() {
    let script = vec![
        response("1", "n1", vec![cluster("good")]),
        response("2", "n2", vec![cluster(""), cluster("")]),
        response("3", "n3", vec![cluster("twice"), cluster("twice")]),
    ];
    let (addr, requests) = start_origin(script).await;
    let relay = RelayProcess::start(&bootstrap_yaml(&[addr], "", "  ttl: 60s"));

    let first = SotwClient::connect(&relay.endpoint(), Transport::PerType, node("n1", "c1-x")).await.expect("connect");
    first.subscribe(xds::CLUSTER, vec![]).await.expect("subscribe");
    first.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "1").await.expect("version 1 served");

    // The origin sends version 2 (two resources named "") after the relay's ACK of 1, and
    // version 3 (a duplicate name) after the relay's NACK of 2.
    let (version, message) = eventually("the NACK of version 2", SOON, || nack_for(&requests, "n2")).await;
    assert_eq!(version, "1", "the NACK carries the last accepted version");
    assert!(message.contains("has no name"), "{message}");
    let (version, message) = eventually("the NACK of version 3", SOON, || nack_for(&requests, "n3")).await;
    assert_eq!(version, "1", "the NACK carries the last accepted version");
    assert!(message.contains("twice") && message.contains("more than once"), "{message}");

    // Nobody was served the unusable versions; a client arriving now gets version 1.
    let late = SotwClient::connect(&relay.endpoint(), Transport::PerType, node("n2", "c1-x")).await.expect("connect");
    late.subscribe(xds::CLUSTER, vec![]).await.expect("subscribe");
    let served = late.wait_for(xds::CLUSTER, SOON, |r| !r.version_info.is_empty()).await.expect("served");
    assert_eq!(served.version_info, "1");
    assert_eq!(served.resources.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(), ["good"]);
    for client in [&first, &late] {
        assert!(
            client.history().iter().all(|r| r.version_info == "1"),
            "only version 1 was served: {:?}",
            client.history().iter().map(|r| &r.version_info).collect::<Vec<_>>()
        );
    }
    let metrics = relay.admin_get("/metrics").expect("metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("xds_relay_upstream_rejected_responses_total{key=\"c1_cds\"} 2")),
        "two rejected responses counted:\n{}",
        metrics.lines().filter(|l| l.contains("rejected")).collect::<Vec<_>>().join("\n")
    );
}
