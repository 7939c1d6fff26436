//! The example management server's delta services driven by `DeltaClient` over ADS and per-type
//! streams.

mod support;

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_client::ListenerDiscoveryServiceClient;
use support::{QUIET, WAIT, eventually, start, stats};
use tokio_stream::StreamExt;
use xds_relay_example::client::{Transport, node};
use xds_relay_example::delta::resource_version;
use xds_relay_example::delta_client::{DeltaClient, DeltaSentKind};
use xds_relay_example::harness::RunningServer;
use xds_relay_example::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SnapshotSpec};

const BOTH: [Transport; 2] = [Transport::Ads, Transport::PerType];

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

async fn client(running: &RunningServer, transport: Transport) -> DeltaClient {
    DeltaClient::connect(&running.endpoint(), transport, node("d1", "test-cluster")).await.unwrap()
}

/// The versions the server currently serves for `type_url`.
fn served(running: &RunningServer, type_url: &str) -> BTreeMap<String, String> {
    let current = running.server().publisher().current().unwrap();
    current.snapshot.resources_of(type_url).unwrap().iter().map(|(n, a)| (n.clone(), resource_version(a))).collect()
}

/// Sets the number of clusters of later snapshots and publishes one; returns its version.
fn publish_with_clusters(running: &RunningServer, clusters: usize) -> String {
    let publisher = running.server().publisher();
    publisher.set_spec(SnapshotSpec { clusters, ..publisher.spec() });
    running.server().publish_next().version().to_owned()
}

#[tokio::test]
async fn wildcard_cds_gets_every_cluster_with_relay_versions() {
    let running = start().await;
    let mut clients = Vec::new();
    for transport in BOTH {
        let c = client(&running, transport).await;
        clients.push(c.clone());
        c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
        let r = c.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
        assert_eq!(r.names(), ["cluster_0", "cluster_1", "cluster_2"], "{transport:?}");
        assert!(r.removed.is_empty());
        assert_eq!(r.system_version_info, running.server().publisher().current().unwrap().version());
        assert_eq!(c.resources(CLUSTER_TYPE), served(&running, CLUSTER_TYPE));
        let id: serde_json::Value = serde_json::from_str(r.control_plane.as_deref().unwrap()).unwrap();
        assert_eq!(id["server"], "example-management-server");
        // The response is ACKed with its nonce and nothing else.
        let ack = eventually("ack", || async { c.sent().into_iter().find(|s| s.kind == DeltaSentKind::Ack) }).await;
        assert_eq!(ack.response_nonce, r.nonce);
        assert!(ack.subscribe.is_empty() && ack.unsubscribe.is_empty() && ack.error.is_none());
    }
    // Node only on the first request of each stream: shown by the registry's node ids.
    let s = stats(running.stats_addr()).await;
    assert_eq!(s["open_by_node"]["d1"], 2, "{s}");
    assert_eq!(s["open_by_method"]["DeltaAggregatedResources"], 1, "{s}");
    assert_eq!(s["open_by_method"]["DeltaClusters"], 1, "{s}");
}

#[tokio::test]
async fn explicit_wildcard_and_named_eds_with_a_missing_name() {
    let running = start().await;
    for transport in BOTH {
        let c = client(&running, transport).await;
        c.subscribe(LISTENER_TYPE, names(&["*"])).await.unwrap();
        let l = c.wait_for(LISTENER_TYPE, WAIT, |_| true).await.unwrap();
        assert_eq!(l.names(), ["listener_0", "listener_1"], "{transport:?}");
        c.subscribe(ENDPOINT_TYPE, names(&["cluster_2", "cluster_0", "missing"])).await.unwrap();
        let r = c.wait_for(ENDPOINT_TYPE, WAIT, |_| true).await.unwrap();
        assert_eq!(r.names(), ["cluster_0", "cluster_2"], "{transport:?}");
        assert_eq!(r.removed, ["missing"]);
        let view = c.resources(ENDPOINT_TYPE);
        assert_eq!(view.keys().collect::<Vec<_>>(), ["cluster_0", "cluster_2"]);
    }
}

#[tokio::test]
async fn publish_sends_only_changed_resources_and_removals() {
    let running = start().await;
    for transport in BOTH {
        let c = client(&running, transport).await;
        c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
        c.subscribe(ENDPOINT_TYPE, names(&["cluster_1"])).await.unwrap();
        c.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
        let first = c.wait_for(ENDPOINT_TYPE, WAIT, |_| true).await.unwrap();

        // Same clusters, new CLAs: only EDS is pushed, with only the subscribed name.
        let version = running.server().publish_next().version().to_owned();
        let r = c.wait_for(ENDPOINT_TYPE, WAIT, |r| r.system_version_info == version).await.unwrap();
        assert_eq!(r.names(), ["cluster_1"], "{transport:?}");
        assert_ne!(r.resources[0].version, first.resources[0].version);
        assert_ne!(r.nonce, first.nonce);
        tokio::time::sleep(QUIET).await;
        assert_eq!(c.history().iter().filter(|r| r.type_url == CLUSTER_TYPE).count(), 1, "unchanged CDS not pushed");

        // Fewer clusters: CDS removes the gone ones, nothing else.
        let version = publish_with_clusters(&running, 1);
        let r = c.wait_for(CLUSTER_TYPE, WAIT, |r| r.system_version_info == version).await.unwrap();
        assert!(r.resources.is_empty(), "{transport:?}");
        assert_eq!(r.removed, ["cluster_1", "cluster_2"]);
        let r = c.wait_for(ENDPOINT_TYPE, WAIT, |r| r.system_version_info == version).await.unwrap();
        assert_eq!((r.resources.len(), r.removed.as_slice()), (0, ["cluster_1".to_owned()].as_slice()));
        c.wait_for_state(CLUSTER_TYPE, WAIT, |v| v.len() == 1).await.unwrap();
        assert!(c.resources(ENDPOINT_TYPE).is_empty());

        // The cluster comes back: EDS sends it again.
        let version = publish_with_clusters(&running, 3);
        let r = c.wait_for(ENDPOINT_TYPE, WAIT, |r| r.system_version_info == version).await.unwrap();
        assert_eq!(r.names(), ["cluster_1"]);
        c.wait_for_state(CLUSTER_TYPE, WAIT, |v| *v == served(&running, CLUSTER_TYPE)).await.unwrap();
    }
}

#[tokio::test]
async fn reconnect_with_initial_resource_versions_gets_only_differences() {
    let running = start().await;
    for transport in BOTH {
        let all = names(&["cluster_0", "cluster_1", "cluster_2"]);
        let first = client(&running, transport).await;
        first.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
        first.subscribe(ENDPOINT_TYPE, all.clone()).await.unwrap();
        let clusters = first.wait_for_state(CLUSTER_TYPE, WAIT, |v| v.len() == 3).await.unwrap();
        let endpoints = first.wait_for_state(ENDPOINT_TYPE, WAIT, |v| v.len() == 3).await.unwrap();
        first.close();

        // Up to date: wildcard CDS gets an empty answer, EDS gets nothing.
        let again = client(&running, transport).await;
        again.subscribe_with_versions(CLUSTER_TYPE, vec![], to_map(&clusters)).await.unwrap();
        again.subscribe_with_versions(ENDPOINT_TYPE, all.clone(), to_map(&endpoints)).await.unwrap();
        let r = again.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
        assert!(r.resources.is_empty() && r.removed.is_empty(), "{transport:?}: {r:?}");
        tokio::time::sleep(QUIET).await;
        assert!(again.latest(ENDPOINT_TYPE).is_none(), "{transport:?}");
        assert_eq!(again.resources(ENDPOINT_TYPE), endpoints);
        again.close();

        // While away, cluster_2 goes and every CLA changes; one held cluster version is stale.
        let version = publish_with_clusters(&running, 2);
        let mut held = to_map(&clusters);
        held.insert("cluster_0".into(), "stale".into());
        let back = client(&running, transport).await;
        back.subscribe_with_versions(CLUSTER_TYPE, vec![], held).await.unwrap();
        back.subscribe_with_versions(ENDPOINT_TYPE, all, to_map(&endpoints)).await.unwrap();
        let r = back.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
        assert_eq!((r.names(), r.removed.as_slice()), (vec!["cluster_0"], ["cluster_2".to_owned()].as_slice()));
        let r = back.wait_for(ENDPOINT_TYPE, WAIT, |_| true).await.unwrap();
        assert_eq!(r.system_version_info, version);
        assert_eq!(
            (r.names(), r.removed.as_slice()),
            (vec!["cluster_0", "cluster_1"], ["cluster_2".to_owned()].as_slice())
        );
        assert_eq!(back.resources(CLUSTER_TYPE), served(&running, CLUSTER_TYPE));
        assert_eq!(back.resources(ENDPOINT_TYPE), served(&running, ENDPOINT_TYPE));
        back.close();
        publish_with_clusters(&running, 3);
    }
}

fn to_map(view: &BTreeMap<String, String>) -> HashMap<String, String> {
    view.iter().map(|(n, v)| (n.clone(), v.clone())).collect()
}

#[tokio::test]
async fn unsubscribe_stops_updates_for_that_name() {
    let running = start().await;
    for transport in BOTH {
        let c = client(&running, transport).await;
        c.subscribe(ENDPOINT_TYPE, names(&["cluster_0", "cluster_1"])).await.unwrap();
        c.wait_for_state(ENDPOINT_TYPE, WAIT, |v| v.len() == 2).await.unwrap();
        c.unsubscribe(ENDPOINT_TYPE, names(&["cluster_0", "never-subscribed"])).await.unwrap();
        assert_eq!(c.resources(ENDPOINT_TYPE).keys().collect::<Vec<_>>(), ["cluster_1"]);
        tokio::time::sleep(QUIET).await;
        assert_eq!(c.history().len(), 1, "{transport:?}: a pure unsubscribe is not answered");
        let version = running.server().publish_next().version().to_owned();
        let r = c.wait_for(ENDPOINT_TYPE, WAIT, |r| r.system_version_info == version).await.unwrap();
        assert_eq!(r.names(), ["cluster_1"], "{transport:?}");
        // Subscribing again is answered even though nothing changed.
        c.subscribe(ENDPOINT_TYPE, names(&["cluster_1"])).await.unwrap();
        let again = c.wait_for(ENDPOINT_TYPE, WAIT, |x| x.nonce != r.nonce).await.unwrap();
        assert_eq!(again.names(), ["cluster_1"]);
        assert_eq!(again.resources[0].version, r.resources[0].version);
    }
}

#[tokio::test]
async fn nack_keeps_the_view_and_is_counted() {
    let running = start().await;
    let c = client(&running, Transport::Ads).await;
    c.subscribe(ENDPOINT_TYPE, names(&["cluster_0"])).await.unwrap();
    let before = c.wait_for_state(ENDPOINT_TYPE, WAIT, |v| v.len() == 1).await.unwrap();
    c.set_nack(ENDPOINT_TYPE, Some("bad endpoints".into()));
    let version = running.server().publish_next().version().to_owned();
    let r = c.wait_for(ENDPOINT_TYPE, WAIT, |r| r.system_version_info == version).await.unwrap();
    let nack = eventually("nack", || async { c.sent().into_iter().find(|s| s.kind == DeltaSentKind::Nack) }).await;
    assert_eq!((nack.response_nonce, nack.error.as_deref()), (r.nonce, Some("bad endpoints")));
    assert_eq!(c.resources(ENDPOINT_TYPE), before);
    eventually("nack counted", || async { (stats(running.stats_addr()).await["nacks"] == 1).then_some(()) }).await;
}

#[tokio::test]
async fn versions_only_on_first_request_and_bad_type_urls_end_the_stream() {
    let running = start().await;
    let c = client(&running, Transport::PerType).await;
    c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
    let versions = HashMap::from([("cluster_0".to_owned(), "x".to_owned())]);
    assert!(c.subscribe_with_versions(CLUSTER_TYPE, vec![], versions).await.is_err());
    assert!(c.subscribe("type.googleapis.com/other", vec![]).await.is_err());

    let mut ads = AggregatedDiscoveryServiceClient::connect(running.endpoint()).await.unwrap();
    let no_type = tokio_stream::iter(vec![DeltaDiscoveryRequest::default()]);
    let mut inbound = ads.delta_aggregated_resources(no_type).await.unwrap().into_inner();
    let status = tokio::time::timeout(WAIT, inbound.next()).await.unwrap().unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let mut lds = ListenerDiscoveryServiceClient::connect(running.endpoint()).await.unwrap();
    let wrong = DeltaDiscoveryRequest { type_url: CLUSTER_TYPE.to_owned(), ..Default::default() };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(wrong).await.unwrap();
    let mut inbound = lds.delta_listeners(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let status = tokio::time::timeout(WAIT, inbound.next()).await.unwrap().unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn shutdown_ends_delta_streams_with_unavailable() {
    let running = start().await;
    let c = client(&running, Transport::Ads).await;
    c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
    c.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(2), running.shutdown()).await.unwrap();
    let reason = c.wait_ended(WAIT).await.unwrap();
    assert_eq!(reason.code, Some(tonic::Code::Unavailable), "{reason}");
    assert!(c.subscribe(ENDPOINT_TYPE, vec![]).await.is_err());
}
