//! The example management server driven by `SotwClient` over ADS and per-type streams.

mod support;

use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::listener::v3::listener_discovery_service_client::ListenerDiscoveryServiceClient;
use prost::Message;
use support::{QUIET, WAIT, eventually, http, start, stats};
use tokio_stream::StreamExt;
use xds_relay_example::client::{SentKind, SotwClient, Transport, node};
use xds_relay_example::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

const BOTH: [Transport; 2] = [Transport::Ads, Transport::PerType];

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

async fn client(endpoint: &str, transport: Transport, id: &str) -> SotwClient {
    SotwClient::connect(endpoint, transport, node(id, "test-cluster")).await.unwrap()
}

#[tokio::test]
async fn wildcard_cds_gets_every_cluster() {
    let running = start().await;
    for transport in BOTH {
        let c = client(&running.endpoint(), transport, "n1").await;
        c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
        let r = c.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
        assert_eq!(r.names(), ["cluster_0", "cluster_1", "cluster_2"], "{transport:?}");
        let current = running.server().publisher().current().unwrap();
        assert_eq!(r.version_info, current.version());
        // The first response is ACKed with its version and nonce.
        let ack = eventually("ack", || async { c.sent().into_iter().find(|s| s.kind == SentKind::Ack) }).await;
        assert_eq!((ack.version_info, ack.response_nonce), (r.version_info, r.nonce));
    }
}

#[tokio::test]
async fn eds_by_name_gets_only_those_names() {
    let running = start().await;
    for transport in BOTH {
        let c = client(&running.endpoint(), transport, "n1").await;
        c.subscribe(ENDPOINT_TYPE, names(&["cluster_2", "cluster_0", "missing"])).await.unwrap();
        let r = c.wait_for(ENDPOINT_TYPE, WAIT, |_| true).await.unwrap();
        assert_eq!(r.names(), ["cluster_0", "cluster_2"], "{transport:?}");
    }
}

#[tokio::test]
async fn publish_pushes_new_version_with_control_plane_identifier() {
    let running = start().await;
    for transport in BOTH {
        let c = client(&running.endpoint(), transport, "n1").await;
        c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
        c.subscribe(ENDPOINT_TYPE, names(&["cluster_1"])).await.unwrap();
        let first = c.wait_for(ENDPOINT_TYPE, WAIT, |_| true).await.unwrap();
        c.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
        let published = running.server().publish_next();
        for type_url in [CLUSTER_TYPE, ENDPOINT_TYPE] {
            let r = c.wait_for(type_url, WAIT, |r| r.version_info == published.version()).await.unwrap();
            let id: serde_json::Value = serde_json::from_str(r.control_plane.as_deref().unwrap()).unwrap();
            assert_eq!(id["server"], "example-management-server");
            assert_eq!(id["version"], published.version());
            assert!(id["published_unix_nanos"].as_u64().unwrap() > 0);
        }
        let pushed = c.latest(ENDPOINT_TYPE).unwrap();
        assert_ne!(pushed.nonce, first.nonce);
        assert_ne!(pushed.resources[0].1, first.resources[0].1, "CLA changes on every publish");
    }
}

#[tokio::test]
async fn subscription_change_at_same_version_is_answered() {
    let running = start().await;
    for transport in BOTH {
        let c = client(&running.endpoint(), transport, "n1").await;
        c.subscribe(ROUTE_TYPE, names(&["route_0"])).await.unwrap();
        let first = c.wait_for(ROUTE_TYPE, WAIT, |_| true).await.unwrap();
        c.subscribe(ROUTE_TYPE, names(&["route_0", "route_1"])).await.unwrap();
        let second = c.wait_for(ROUTE_TYPE, WAIT, |r| r.resources.len() == 2).await.unwrap();
        assert_eq!(second.version_info, first.version_info);
        assert_ne!(second.nonce, first.nonce);
        // Unsubscribing everything is answered with an empty response, not the wildcard.
        c.subscribe(ROUTE_TYPE, vec![]).await.unwrap();
        let third = c.wait_for(ROUTE_TYPE, WAIT, |r| r.nonce != second.nonce).await.unwrap();
        assert!(third.resources.is_empty(), "{transport:?}");
    }
}

#[tokio::test]
async fn stale_nonce_request_is_ignored() {
    for transport in BOTH {
        let running = start().await;
        let requests = || async { stats(running.stats_addr()).await["requests_total"].as_u64() };
        let c = client(&running.endpoint(), transport, "n1").await;
        c.subscribe(ENDPOINT_TYPE, names(&["cluster_0"])).await.unwrap();
        let first = c.wait_for(ENDPOINT_TYPE, WAIT, |_| true).await.unwrap();
        let published = running.server().publish_next();
        let pushed = c.wait_for(ENDPOINT_TYPE, WAIT, |r| r.version_info == published.version()).await.unwrap();
        // Subscribe + two ACKs.
        eventually("3 requests", || async { requests().await.filter(|n| *n == 3) }).await;
        // A subscription change that echoes the older nonce is stale.
        c.send_raw(DiscoveryRequest {
            type_url: ENDPOINT_TYPE.to_owned(),
            resource_names: names(&["cluster_0", "cluster_1"]),
            version_info: first.version_info.clone(),
            response_nonce: first.nonce.clone(),
            ..Default::default()
        })
        .unwrap();
        eventually("the stale request", || async { requests().await.filter(|n| *n == 4) }).await;
        let quiet = c.wait_for(ENDPOINT_TYPE, QUIET, |r| r.nonce != pushed.nonce).await;
        assert!(quiet.is_err(), "{transport:?}: stale request answered: {:?}", quiet.map(|r| r.nonce));
        // The same change with the current nonce is answered.
        c.subscribe(ENDPOINT_TYPE, names(&["cluster_0", "cluster_1"])).await.unwrap();
        let r = c.wait_for(ENDPOINT_TYPE, WAIT, |r| r.resources.len() == 2).await.unwrap();
        assert_eq!(r.version_info, published.version());
    }
}

#[tokio::test]
async fn nack_causes_no_resend() {
    let running = start().await;
    for transport in BOTH {
        let c = client(&running.endpoint(), transport, "n1").await;
        c.set_nack(CLUSTER_TYPE, Some("rejected by test".to_owned()));
        c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
        let first = c.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
        let nack = eventually("nack sent", || async { c.sent().into_iter().find(|s| s.kind == SentKind::Nack) }).await;
        assert_eq!(nack.version_info, "", "a NACK carries the last accepted version");
        assert_eq!(nack.response_nonce, first.nonce);
        let quiet = c.wait_for(CLUSTER_TYPE, QUIET, |r| r.nonce != first.nonce).await;
        assert!(quiet.is_err(), "{transport:?}: NACK answered");
        // The next publish is still delivered; once ACKs resume, the version is accepted.
        c.set_nack(CLUSTER_TYPE, None);
        let published = running.server().publish_next();
        c.wait_for(CLUSTER_TYPE, WAIT, |r| r.version_info == published.version()).await.unwrap();
        let ack =
            eventually("ack sent", || async { c.sent().into_iter().rev().find(|s| s.kind == SentKind::Ack) }).await;
        assert_eq!(ack.version_info, published.version());
    }
    let s = stats(running.stats_addr()).await;
    assert!(s["nacks"].as_u64().unwrap() >= 2, "{s}");
    assert!(s["acks"].as_u64().unwrap() >= 2, "{s}");
}

#[tokio::test]
async fn grpc_target_gets_api_listener_and_full_chain() {
    let running = start().await;
    let c = client(&running.endpoint(), Transport::Ads, "grpc-client").await;
    c.subscribe(LISTENER_TYPE, names(&["hello.test:50051"])).await.unwrap();
    let lds = c.wait_for(LISTENER_TYPE, WAIT, |_| true).await.unwrap();
    assert_eq!(lds.names(), ["hello.test:50051"]);
    let listener = Listener::decode(lds.resources[0].1.value.as_slice()).unwrap();
    assert!(listener.api_listener.is_some());
    c.subscribe(ROUTE_TYPE, names(&["route_0"])).await.unwrap();
    c.subscribe(CLUSTER_TYPE, names(&["cluster_0"])).await.unwrap();
    c.subscribe(ENDPOINT_TYPE, names(&["cluster_0"])).await.unwrap();
    for type_url in [ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE] {
        let r = c.wait_for(type_url, WAIT, |_| true).await.unwrap();
        assert_eq!(r.resources.len(), 1, "{type_url}");
    }
    // Explicit CDS names get exactly those clusters, not the wildcard.
    assert_eq!(c.latest(CLUSTER_TYPE).unwrap().names(), ["cluster_0"]);
}

#[tokio::test]
async fn stats_count_open_streams_by_type_method_and_node() {
    let running = start().await;
    let ads = client(&running.endpoint(), Transport::Ads, "node-ads").await;
    ads.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
    ads.subscribe(ENDPOINT_TYPE, names(&["cluster_0"])).await.unwrap();
    ads.wait_for(ENDPOINT_TYPE, WAIT, |_| true).await.unwrap();
    let per_type = client(&running.endpoint(), Transport::PerType, "node-pt").await;
    per_type.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
    per_type.subscribe(LISTENER_TYPE, vec![]).await.unwrap();
    per_type.wait_for(LISTENER_TYPE, WAIT, |_| true).await.unwrap();
    per_type.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();

    let s = stats(running.stats_addr()).await;
    assert_eq!(s["streams_open"], 3, "{s}");
    assert_eq!(s["streams_total"], 3, "{s}");
    assert_eq!(s["open_by_type"][CLUSTER_TYPE], 2, "{s}");
    assert_eq!(s["open_by_type"][ENDPOINT_TYPE], 1, "{s}");
    assert_eq!(s["open_by_type"][LISTENER_TYPE], 1, "{s}");
    assert_eq!(s["open_by_method"]["StreamAggregatedResources"], 1, "{s}");
    assert_eq!(s["open_by_method"]["StreamClusters"], 1, "{s}");
    assert_eq!(s["open_by_method"]["StreamListeners"], 1, "{s}");
    assert_eq!(s["open_by_node"]["node-ads"], 1, "{s}");
    assert_eq!(s["open_by_node"]["node-pt"], 2, "{s}");
    assert_eq!(s["publishes"], 1, "{s}");
    let version = running.server().publisher().current().unwrap().version().to_owned();
    assert_eq!(s["version"], version.as_str());
    let ads_stream =
        s["streams"].as_array().unwrap().iter().find(|st| st["method"] == "StreamAggregatedResources").unwrap();
    assert_eq!(ads_stream["node_id"], "node-ads");
    assert_eq!(ads_stream["node_cluster"], "test-cluster");
    assert_eq!(ads_stream["type_urls"].as_array().unwrap().len(), 2);
    assert!(ads_stream["opened_unix_ms"].as_u64().unwrap() > 0);
    assert!(s["requests_total"].as_u64().unwrap() >= 4);

    ads.close();
    let reason = ads.wait_ended(WAIT).await.unwrap();
    assert_eq!(reason.code, None, "{reason}");
    let s = eventually("ads stream to leave the stats", || async {
        let s = stats(running.stats_addr()).await;
        (s["streams_open"] == 2).then_some(s)
    })
    .await;
    assert!(s["open_by_node"].get("node-ads").is_none(), "{s}");
    assert!(s["open_by_type"].get(ENDPOINT_TYPE).is_none(), "{s}");
    assert_eq!(s["open_by_type"][CLUSTER_TYPE], 1, "{s}");

    drop(per_type);
    eventually("every stream to close", || async {
        (stats(running.stats_addr()).await["streams_open"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn publish_and_healthz_endpoints() {
    let running = start().await;
    let (status, body) = http(running.stats_addr(), "GET", "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let c = client(&running.endpoint(), Transport::Ads, "n1").await;
    c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
    let first = c.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
    let (status, body) = http(running.stats_addr(), "POST", "/publish").await;
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    let version = reply["version"].as_str().unwrap().to_owned();
    assert_eq!(reply["generation"], 2);
    assert!(version.parse::<u64>().unwrap() > first.version_info.parse::<u64>().unwrap());
    c.wait_for(CLUSTER_TYPE, WAIT, |r| r.version_info == version).await.unwrap();
    assert_eq!(stats(running.stats_addr()).await["publishes"], 2);
    let (status, _) = http(running.stats_addr(), "GET", "/publish").await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn fetch_is_unimplemented_and_wrong_type_is_rejected() {
    let running = start().await;
    let mut lds = ListenerDiscoveryServiceClient::connect(running.endpoint()).await.unwrap();
    let status = lds.fetch_listeners(DiscoveryRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    let wrong = DiscoveryRequest { type_url: CLUSTER_TYPE.to_owned(), ..Default::default() };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(wrong).await.unwrap();
    let mut inbound = lds.stream_listeners(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let status = tokio::time::timeout(WAIT, inbound.next()).await.unwrap().unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable() {
    let running = start().await;
    let c = client(&running.endpoint(), Transport::Ads, "n1").await;
    c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
    c.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), running.shutdown()).await.unwrap();
    let reason = c.wait_ended(WAIT).await.unwrap();
    assert_eq!(reason.code, Some(tonic::Code::Unavailable), "{reason}");
    assert!(c.subscribe(ENDPOINT_TYPE, vec![]).await.is_err());
}
