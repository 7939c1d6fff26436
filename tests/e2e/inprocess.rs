//! The relay's core data path end to end, inside the test process: a relay [`Node`] on
//! loopback listeners, an origin driven by the test (every request it receives is visible,
//! every response is the test's), and the example xDS clients. No process is spawned and no
//! log is read. These mirror process-level tests of tests/e2e/relay.rs; what only processes
//! show (signals, exit codes, log output, a long outage) stays there.

use std::time::Duration;

use crate::support::inprocess::{self, Origin, SOON, admin_call, assignments, clusters, endpoint, start_relay};
use tonic::Code;
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;

async fn client(relay: &xds_relay::app::Node, id: &str) -> SotwClient {
    SotwClient::connect(&endpoint(relay), Transport::Ads, node(id, "staging")).await.expect("connect to the relay")
}

fn versions(client: &SotwClient, type_url: &str) -> Vec<String> {
    client.history().into_iter().filter(|r| r.type_url == type_url).map(|r| r.version_info).collect()
}

/// Waits until the origin saw the relay ACK the response with `nonce`.
async fn acked(origin: &Origin, nonce: &str) {
    origin
        .wait_for(&format!("the ACK of {nonce}"), |requests| {
            requests.iter().any(|r| r.request.response_nonce == nonce && r.request.error_detail.is_none()).then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_one_origin_stream_and_a_late_client_is_served_from_cache() {
    let origin = Origin::start().await;
    let relay = start_relay(&origin).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let c = client(&relay, &format!("envoy-{i}")).await;
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        clients.push(c);
    }
    let first = origin.wait_for_stream(xds::CLUSTER, 0).await;
    assert_eq!(first.request.node.as_ref().map(|n| n.cluster.as_str()), Some("staging"));
    let nonce = origin.respond(xds::CLUSTER, "1", clusters(&["a", "b"]));
    for c in &clients {
        let got = c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "1").await.unwrap();
        assert_eq!(got.resources.len(), 2);
    }
    acked(&origin, &nonce).await;
    assert_eq!(origin.streams_opened(), 1, "20 clients of one key share one origin stream");

    // A late client is answered from the cache: the origin hears nothing.
    let requests_before = origin.requests().len();
    let late = client(&relay, "envoy-late").await;
    late.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    late.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "1").await.unwrap();
    assert_eq!(origin.requests().len(), requests_before, "no origin round trip for a cached key");

    // A new version reaches every client once, after the old one.
    origin.respond(xds::CLUSTER, "2", clusters(&["a", "b", "c"]));
    for c in clients.iter().chain([&late]) {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "2").await.unwrap();
        assert_eq!(versions(c, xds::CLUSTER), ["1", "2"]);
    }
    assert_eq!(origin.streams_opened(), 1);

    // The admin listener of the node shows the key and its clients.
    let keys = admin_call(relay.admin_addr, "GET", "/cache/keys").await;
    assert_eq!(keys.status, 200);
    assert_eq!(keys.json()["Names"], serde_json::json!(["staging_cds"]));
    let dump = admin_call(relay.admin_addr, "GET", "/cache/staging_cds").await.json();
    assert_eq!(dump["Cache"][0]["NumRequests"], 21);
    assert_eq!(dump["Cache"][0]["Resp"]["VersionInfo"], "2");
    relay.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_nack_is_recorded_not_forwarded_and_the_next_version_still_reaches_it() {
    let origin = Origin::start().await;
    let relay = start_relay(&origin).await;
    let picky = client(&relay, "envoy-picky").await;
    picky.set_nack(xds::CLUSTER, Some("cluster a is malformed".into()));
    picky.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let content = client(&relay, "envoy-content").await;
    content.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    origin.wait_for_stream(xds::CLUSTER, 0).await;
    let nonce = origin.respond(xds::CLUSTER, "1", clusters(&["a"]));
    picky.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "1").await.unwrap();
    content.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "1").await.unwrap();
    acked(&origin, &nonce).await;

    let verbose = inprocess::poll(|| async {
        let dump = admin_call(relay.admin_addr, "GET", "/cache/staging_cds?verbose=true").await;
        dump.body.contains("cluster a is malformed").then_some(dump.json())
    })
    .await;
    let requests = verbose["Cache"][0]["Requests"].as_array().expect("verbose lists the clients").clone();
    let picky_status = requests.iter().find(|r| r["node_id"] == "envoy-picky").expect("the NACKing client");
    assert_eq!(picky_status["nacks"], 1, "{picky_status}");
    assert_eq!(picky_status["last_nack"]["rejected_version"], "1", "{picky_status}");
    let content_status = requests.iter().find(|r| r["node_id"] == "envoy-content").expect("the other client");
    assert_eq!(content_status["acked_version"], "1", "{content_status}");
    assert!(
        origin.requests().iter().all(|r| r.request.error_detail.is_none()),
        "a client's NACK never reaches the origin"
    );

    let metrics = admin_call(relay.admin_addr, "GET", "/metrics").await.body;
    assert!(metrics.contains("xds_relay_key_nacks_total{key=\"staging_cds\"} 1"), "{metrics}");

    // The NACKing client is not cut off, nor sent the rejected version again: it gets the
    // next version, and its ACK of it is recorded.
    picky.set_nack(xds::CLUSTER, None);
    origin.respond(xds::CLUSTER, "2", clusters(&["a2"]));
    picky.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "2").await.unwrap();
    assert_eq!(versions(&picky, xds::CLUSTER), ["1", "2"]);
    assert!(picky.ended().is_none());
    inprocess::poll(|| async {
        let dump = admin_call(relay.admin_addr, "GET", "/cache/staging_cds?verbose=true").await.json();
        let requests = dump["Cache"][0]["Requests"].as_array().cloned().unwrap_or_default();
        requests.iter().any(|r| r["node_id"] == "envoy-picky" && r["acked_version"] == "2").then_some(())
    })
    .await;
    relay.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_outage_is_invisible_to_clients() {
    let origin = Origin::start().await;
    let relay = start_relay(&origin).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        let transport = if i % 2 == 0 { Transport::Ads } else { Transport::PerType };
        let c =
            SotwClient::connect(&endpoint(&relay), transport, node(&format!("envoy-{i}"), "staging")).await.unwrap();
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        c.subscribe(xds::ENDPOINT, vec![format!("cluster_{}", i % 3)]).await.unwrap();
        clients.push(c);
    }
    origin.wait_for_stream(xds::CLUSTER, 0).await;
    origin
        .wait_for("the union of the EDS names", |requests| {
            requests
                .iter()
                .any(|r| r.request.type_url == xds::ENDPOINT && r.request.resource_names.len() == 3)
                .then_some(())
        })
        .await;
    let cds = origin.respond(xds::CLUSTER, "1", clusters(&["cluster_0", "cluster_1", "cluster_2"]));
    let eds = origin.respond(xds::ENDPOINT, "1", assignments(&["cluster_0", "cluster_1", "cluster_2"]));
    for c in &clients {
        c.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == "1").await.unwrap();
    }
    acked(&origin, &cds).await;
    acked(&origin, &eds).await;

    origin.fail();
    inprocess::poll(|| async {
        let metrics = admin_call(relay.admin_addr, "GET", "/metrics").await.body;
        metrics.contains("xds_relay_upstream_connected{key=\"staging_cds\"} 0").then_some(())
    })
    .await;
    // During the outage a new client is served the cached state, and nobody's stream ends.
    let during = client(&relay, "envoy-during").await;
    during.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    during.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "1").await.unwrap();
    let opened = origin.streams_opened();
    origin.recover();
    // The relay comes back on new streams and asks for the whole state again; the same
    // state once more reaches no client.
    let resumed = origin.wait_for_stream(xds::CLUSTER, opened).await;
    assert_eq!(resumed.request.version_info, "", "a new origin stream asks for the current state");
    origin.wait_for_stream(xds::ENDPOINT, opened).await;
    let again = origin.respond(xds::CLUSTER, "1", clusters(&["cluster_0", "cluster_1", "cluster_2"]));
    acked(&origin, &again).await;
    origin.respond(xds::CLUSTER, "2", clusters(&["cluster_0", "cluster_1"]));
    origin.respond(xds::ENDPOINT, "2", assignments(&["cluster_0", "cluster_1", "cluster_2"]));
    for c in clients.iter().chain([&during]) {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "2").await.unwrap();
        assert!(c.ended().is_none(), "the outage ended a client stream: {:?}", c.ended());
        assert_eq!(versions(c, xds::CLUSTER), ["1", "2"], "nothing was resent or withdrawn during the outage");
    }
    for c in &clients {
        c.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == "2").await.unwrap();
    }
    assert_eq!(origin.streams_open(), 2, "one origin stream per key");
    relay.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_node_ends_every_stream_with_unavailable() {
    let origin = Origin::start().await;
    let relay = start_relay(&origin).await;
    let clients = [client(&relay, "envoy-0").await, client(&relay, "envoy-1").await];
    for c in &clients {
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    }
    origin.wait_for_stream(xds::CLUSTER, 0).await;
    origin.respond(xds::CLUSTER, "1", clusters(&["a"]));
    for c in &clients {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "1").await.unwrap();
    }
    let admin = relay.admin_addr;
    tokio::time::timeout(SOON, relay.stop(Duration::from_secs(5))).await.expect("the node stops within its grace");
    for c in &clients {
        let reason = c.wait_ended(SOON).await.expect("the stream ends");
        assert_eq!(reason.code, Some(Code::Unavailable), "{reason}");
    }
    inprocess::poll(|| async { (origin.streams_open() == 0).then_some(()) }).await;
    assert!(tokio::net::TcpStream::connect(admin).await.is_err(), "the admin listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_and_delta_clients_share_the_key_and_delta_clients_get_only_differences() {
    let origin = Origin::start().await;
    let relay = start_relay(&origin).await;
    let sotw = client(&relay, "envoy-sotw").await;
    sotw.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let delta = DeltaClient::connect(&endpoint(&relay), Transport::Ads, node("envoy-delta", "staging")).await.unwrap();
    delta.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    origin.wait_for_stream(xds::CLUSTER, 0).await;
    origin.respond(xds::CLUSTER, "1", clusters(&["a", "b", "c"]));
    let first = delta.wait_for_state(xds::CLUSTER, SOON, |held| held.len() == 3).await.unwrap();
    sotw.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "1").await.unwrap();

    // "b" goes, "d" comes, "a" and "c" are unchanged: the delta client hears only that.
    origin.respond(xds::CLUSTER, "2", clusters(&["a", "c", "d"]));
    let update = delta.wait_for(xds::CLUSTER, SOON, |r| !r.removed.is_empty()).await.unwrap();
    assert_eq!(update.names(), ["d"]);
    assert_eq!(update.removed, ["b"]);
    let held = delta.resources(xds::CLUSTER);
    assert_eq!(held.keys().collect::<Vec<_>>(), ["a", "c", "d"]);
    assert_eq!((held["a"].as_str(), held["c"].as_str()), (first["a"].as_str(), first["c"].as_str()));
    sotw.wait_for(xds::CLUSTER, SOON, |r| r.version_info == "2").await.unwrap();
    assert_eq!(origin.streams_opened(), 1, "both protocols are served from one origin stream");
    relay.stop(Duration::from_secs(5)).await;
}
