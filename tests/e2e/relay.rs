//! End-to-end behaviour of one relay node, with real processes on loopback: the example
//! management server as origin, the relay binary, and Rust xDS clients.

use crate::support;

use crate::support::{OriginProcess, RelayProcess, SOON, eventually, numeric};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

async fn client(relay: &RelayProcess, transport: Transport, id: &str) -> SotwClient {
    SotwClient::connect(&relay.endpoint(), transport, node(id, "staging")).await.expect("connect to the relay")
}

fn versions(client: &SotwClient, type_url: &str) -> Vec<String> {
    client.history().into_iter().filter(|r| r.type_url == type_url).map(|r| r.version_info).collect()
}

/// Panics when a client ever received an older version after a newer one.
fn assert_monotonic(client: &SotwClient, type_url: &str, who: &str) {
    let seen = versions(client, type_url);
    for pair in seen.windows(2) {
        assert!(numeric(&pair[0]) <= numeric(&pair[1]), "{who} saw {type_url} {} after {}", pair[1], pair[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_share_one_origin_stream_and_new_clients_are_served_from_cache() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let version = origin.version();

    let mut clients = Vec::new();
    for i in 0..50 {
        let c = client(&relay, Transport::Ads, &format!("envoy-{i}")).await;
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        clients.push(c);
    }
    for c in &clients {
        let got = c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();
        assert_eq!(got.resources.len(), 3, "the example snapshot has 3 clusters");
    }
    assert_eq!(origin.open_streams_for(xds::CLUSTER), 1, "50 clients on one key open one origin stream");
    assert_eq!(origin.stats()["streams_open"], 1);

    // A late client is answered from the cache: the origin sees no new request.
    let requests_before = origin.stats()["requests_total"].as_u64().unwrap();
    let late = client(&relay, Transport::Ads, "envoy-late").await;
    late.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    late.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();
    assert_eq!(origin.stats()["requests_total"].as_u64().unwrap(), requests_before, "no origin round trip");

    // A new version reaches every client once.
    let next = origin.publish();
    for c in &clients {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
    }
    for c in &clients {
        assert_eq!(versions(c, xds::CLUSTER), vec![version.clone(), next.clone()]);
    }
    assert_eq!(origin.open_streams_for(xds::CLUSTER), 1);

    // The admin API shows the key, its clients and its resources as JSON.
    let dump = relay.admin_json("/cache/staging_cds");
    let entry = &dump["Cache"][0];
    assert_eq!(entry["Key"], "staging_cds");
    assert_eq!(entry["Resp"]["VersionInfo"], next.as_str());
    assert_eq!(entry["NumRequests"], 51);
    assert_eq!(entry["Resp"]["Resources"]["Clusters"][0]["name"], "cluster_0");
    let keys = relay.admin_json("/cache/keys");
    assert_eq!(keys["Names"], serde_json::json!(["staging_cds"]));
    assert_eq!(relay.admin_json("/cache/version/staging_cds")["Version"], next.as_str());
    let metrics = relay.admin_get("/metrics").unwrap();
    assert!(metrics.contains("xds_relay_key_clients{key=\"staging_cds\"} 51"), "{metrics}");
    assert!(metrics.contains("xds_relay_upstream_connected{key=\"staging_cds\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eds_clients_get_only_their_names_and_the_origin_gets_the_union() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let a = client(&relay, Transport::Ads, "envoy-a").await;
    let b = client(&relay, Transport::PerType, "envoy-b").await;
    a.subscribe(xds::ENDPOINT, vec!["cluster_0".into()]).await.unwrap();
    b.subscribe(xds::ENDPOINT, vec!["cluster_1".into()]).await.unwrap();
    let got_a = a.wait_for(xds::ENDPOINT, SOON, |r| !r.resources.is_empty()).await.unwrap();
    let got_b = b.wait_for(xds::ENDPOINT, SOON, |r| !r.resources.is_empty()).await.unwrap();
    let names =
        |r: &xds_relay_example::client::Received| r.resources.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got_a), ["cluster_0"]);
    assert_eq!(names(&got_b), ["cluster_1"]);
    assert_eq!(origin.open_streams_for(xds::ENDPOINT), 1, "one origin stream for the shared EDS key");

    // Each keeps getting only its own names on the next version, and the endpoint view works.
    let next = origin.publish();
    let got_a = a.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == next).await.unwrap();
    assert_eq!(names(&got_a), ["cluster_0"]);
    let got_b = b.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == next).await.unwrap();
    assert_eq!(names(&got_b), ["cluster_1"]);
    let eds = relay.admin_json("/cache/eds/staging_eds");
    assert_eq!(eds["Version"], next.as_str());
    assert_eq!(eds["Endpoints"].as_array().unwrap().len(), 2, "{eds}");

    // A changed name list is answered at once, at the same version.
    a.subscribe(xds::ENDPOINT, vec!["cluster_0".into(), "cluster_2".into()]).await.unwrap();
    let got_a = a.wait_for(xds::ENDPOINT, SOON, |r| r.resources.len() == 2).await.unwrap();
    assert_eq!(names(&got_a), ["cluster_0", "cluster_2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_outage_is_invisible_to_clients() {
    let mut origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let mut clients = Vec::new();
    for i in 0..10 {
        let transport = if i % 2 == 0 { Transport::Ads } else { Transport::PerType };
        let c = client(&relay, transport, &format!("envoy-{i}")).await;
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        c.subscribe(xds::ENDPOINT, vec![format!("cluster_{}", i % 3)]).await.unwrap();
        clients.push(c);
    }
    let first = origin.version();
    for c in &clients {
        c.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == first).await.unwrap();
    }

    origin.process.kill();
    eventually("the relay to see the origin down", SOON, || {
        relay.admin_get("/metrics").ok().filter(|m| m.contains("xds_relay_upstream_connected{key=\"staging_cds\"} 0"))
    })
    .await;
    // A new client during the outage is served from the cache.
    let newcomer = client(&relay, Transport::Ads, "envoy-newcomer").await;
    newcomer.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    newcomer.wait_for(xds::CLUSTER, SOON, |r| r.version_info == first).await.unwrap();
    // The outage lasts until the relay has failed to reconnect many times, well past its
    // largest backoff (100 ms doubling to 1 s in this bootstrap).
    eventually("eight failed reconnects to the origin", SOON, || {
        let metrics = relay.admin_get("/metrics").ok()?;
        let failures = metrics
            .lines()
            .find_map(|l| l.strip_prefix("xds_relay_upstream_failures_total{key=\"staging_cds\"} "))?
            .trim()
            .parse::<f64>()
            .ok()?;
        (failures >= 8.0).then_some(())
    })
    .await;
    for c in &clients {
        assert!(c.ended().is_none(), "a client was disconnected during the outage: {:?}", c.ended());
    }

    origin = origin.restart(&[]);
    let newest = origin.publish();
    for c in clients.iter().chain([&newcomer]) {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == newest).await.unwrap();
        assert!(c.ended().is_none(), "client disconnected: {:?}", c.ended());
    }
    for (i, c) in clients.iter().enumerate() {
        c.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == newest).await.unwrap();
        assert_monotonic(c, xds::CLUSTER, &format!("client {i}"));
        assert_monotonic(c, xds::ENDPOINT, &format!("client {i}"));
    }
    assert_eq!(origin.open_streams_for(xds::CLUSTER), 1);
    assert_eq!(origin.open_streams_for(xds::ENDPOINT), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnected_origin_at_the_same_version_sends_clients_nothing() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let c = client(&relay, Transport::Ads, "envoy-1").await;
    c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let version = origin.version();
    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();
    // Clearing the key makes the relay refetch from the origin on a new stream: same version,
    // same content, so the client gets nothing.
    support::http_post(relay.admin, "/cache/clear/staging_cds").unwrap();
    eventually("the refetch", SOON, || {
        let dump = relay.admin_json("/cache/staging_cds");
        (dump["Cache"][0]["Upstream"]["responses"].as_u64() >= Some(2)).then_some(())
    })
    .await;
    assert_eq!(origin.stats()["streams_total"], 2, "the refetch opened one new origin stream");
    let next = origin.publish();
    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
    assert_eq!(versions(&c, xds::CLUSTER), vec![version, next], "the unchanged refetched version is not pushed");
    assert_eq!(origin.open_streams_for(xds::CLUSTER), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_next_origin_and_back() {
    let primary = OriginProcess::start(&[]);
    let fallback = OriginProcess::start(&[]);
    let relay = RelayProcess::start(&support::bootstrap_yaml(
        &[primary.xds, fallback.xds],
        "  failback_interval: 1s\n",
        "  ttl: 60s",
    ));
    let c = client(&relay, Transport::Ads, "envoy-1").await;
    c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    c.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
    assert_eq!(primary.open_streams_for(xds::CLUSTER), 1);

    let mut primary = primary;
    primary.process.kill();
    eventually("the fallback to take the stream", SOON, || {
        (fallback.open_streams_for(xds::CLUSTER) == 1).then_some(())
    })
    .await;
    let from_fallback = fallback.publish();
    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == from_fallback).await.unwrap();

    let primary = primary.restart(&[]);
    eventually("the relay to switch back to the primary", SOON, || {
        (primary.open_streams_for(xds::CLUSTER) == 1 && fallback.open_streams_for(xds::CLUSTER) == 0).then_some(())
    })
    .await;
    let from_primary = primary.publish();
    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == from_primary).await.unwrap();
    assert!(c.ended().is_none(), "the client noticed the failover: {:?}", c.ended());
    assert_monotonic(&c, xds::CLUSTER, "client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_status_and_other_clients_keep_working() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let healthy = client(&relay, Transport::Ads, "envoy-healthy").await;
    healthy.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    healthy.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();

    // No rule maps runtime layers: the stream ends with a status naming the problem.
    let unmapped = client(&relay, Transport::Ads, "envoy-unmapped").await;
    unmapped.subscribe(xds::RUNTIME, vec!["layer".into()]).await.unwrap();
    let end = unmapped.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::InvalidArgument), "{end:?}");
    assert!(end.message.contains("aggregation key"), "{end:?}");

    // Secrets are not served on a listener without TLS.
    let secrets = client(&relay, Transport::Ads, "envoy-secrets").await;
    secrets.subscribe(xds::SECRET, vec!["cert".into()]).await.unwrap();
    let end = secrets.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::FailedPrecondition), "{end:?}");
    assert!(end.message.contains("server.tls"), "{end:?}");

    // xDS v2 is refused clearly.
    let v2 = client(&relay, Transport::Ads, "envoy-v2").await;
    v2.subscribe("type.googleapis.com/envoy.api.v2.Cluster", vec![]).await.unwrap();
    let end = v2.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::Unimplemented), "{end:?}");
    assert!(end.message.contains("v3"), "{end:?}");

    // ADS without a type URL.
    let untyped = client(&relay, Transport::Ads, "envoy-untyped").await;
    untyped.subscribe("", vec![]).await.unwrap();
    let end = untyped.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::InvalidArgument), "{end:?}");

    // A request that is not a DiscoveryRequest at all.
    let status = malformed_request(&relay.endpoint()).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("malformed request"), "{status:?}");

    // The healthy client was never disturbed and gets the next version.
    let next = origin.publish();
    healthy.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
    assert!(healthy.ended().is_none());
    let metrics = relay.admin_get("/metrics").unwrap();
    assert!(metrics.contains("xds_relay_mapping_errors_total{type=\"rtds\"} 1"), "{metrics}");
    assert!(metrics.contains("xds_relay_request_errors_total{reason=\"secret_without_tls\"} 1"), "{metrics}");
}

/// Sends bytes that do not decode as a DiscoveryRequest; returns the status the relay answers.
async fn malformed_request(endpoint: &str) -> tonic::Status {
    #[derive(Clone, PartialEq, prost::Message)]
    struct NotADiscoveryRequest {
        /// Field 2 of DiscoveryRequest is the node message; a varint there cannot decode.
        #[prost(uint64, tag = "2")]
        node: u64,
    }
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<
        NotADiscoveryRequest,
        envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
    >::default();
    let path = http::uri::PathAndQuery::from_static(xds::ADS_SOTW_PATH);
    let request = tonic::Request::new(tokio_stream::iter([NotADiscoveryRequest { node: 7 }]));
    match grpc.streaming(request, path, codec).await {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            match tokio::time::timeout(SOON, stream.message()).await.expect("an answer") {
                Err(status) => status,
                Ok(other) => panic!("malformed request answered with {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_are_recorded_and_the_next_version_still_arrives() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let picky = client(&relay, Transport::Ads, "envoy-picky").await;
    picky.set_nack(xds::CLUSTER, Some("cluster_0: unsupported lb policy".into()));
    picky.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let first = origin.version();
    picky.wait_for(xds::CLUSTER, SOON, |r| r.version_info == first).await.unwrap();
    let dump = eventually("the NACK in the cache view", SOON, || {
        let dump = relay.admin_json("/cache/staging_cds?verbose=true");
        (dump["Cache"][0]["Requests"][0]["nacks"] == 1).then_some(dump)
    })
    .await;
    let request = &dump["Cache"][0]["Requests"][0];
    assert_eq!(request["last_nack"]["message"], "cluster_0: unsupported lb policy");
    assert_eq!(request["node_id"], "envoy-picky");
    let metrics = relay.admin_get("/metrics").unwrap();
    assert!(metrics.contains("xds_relay_key_nacks_total{key=\"staging_cds\"} 1"), "{metrics}");

    // No resend of the rejected version; the next version arrives and can be ACKed.
    picky.set_nack(xds::CLUSTER, None);
    let next = origin.publish();
    picky.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
    assert_eq!(versions(&picky, xds::CLUSTER), vec![first, next.clone()]);
    eventually("the ACK in the cache view", SOON, || {
        let dump = relay.admin_json("/cache/staging_cds?verbose=true");
        (dump["Cache"][0]["Requests"][0]["acked_version"] == next.as_str()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_behave_like_xds_relay() {
    use support::{http_get, http_post};
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let admin = relay.admin;

    assert!(http_get(admin, "/").unwrap().contains("admin commands are:"));
    assert!(http_get(admin, "/ready").is_ok());
    http_post(admin, "/ready/false").unwrap();
    assert!(http_get(admin, "/ready").unwrap_err().starts_with("500"));
    http_post(admin, "/ready/true").unwrap();
    assert!(http_get(admin, "/ready").is_ok());
    assert!(http_post(admin, "/ready/maybe").unwrap_err().contains("Only true/false"));

    assert!(http_get(admin, "/log_level").unwrap_err().starts_with("405"));
    assert_eq!(http_post(admin, "/log_level").unwrap(), "Current log level: info\n");
    assert!(http_post(admin, "/log_level/loud").unwrap_err().starts_with("400"));
    assert_eq!(http_post(admin, "/log_level/debug").unwrap(), "Current log level: debug\n");
    // Every component now logs at debug: a client's request shows up in the relay's output.
    let c = client(&relay, Transport::Ads, "envoy-debug").await;
    c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    c.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
    eventually("debug lines from the relay", SOON, || relay.process.printed(&["DEBUG", "push"]).then_some(())).await;
    assert_eq!(http_post(admin, "/log_level/WARN").unwrap(), "Current log level: warn\n");

    let info: serde_json::Value = serde_json::from_str(&http_get(admin, "/server_info").unwrap()).unwrap();
    assert_eq!(info["origin_server"]["address"]["port_value"], origin.xds.port());
    assert_eq!(info["cache"]["ttl"], "1m0s");

    assert_eq!(http_get(admin, "/cache/nothing-here").unwrap(), "", "no match: empty body");
    assert!(http_get(admin, "/cache/version/nothing-here").unwrap_err().starts_with("404"));
    assert!(http_get(admin, "/cache/clear/staging_cds").unwrap_err().starts_with("405"));
    assert!(http_post(admin, "/cache/clear/nothing-here").unwrap().contains("nonexistent key"));
    let prefix = relay.admin_json("/cache/staging*");
    assert_eq!(prefix["Cache"].as_array().unwrap().len(), 1);
    assert!(http_get(admin, "/metrics").unwrap().contains("xds_relay_downstream_streams 1"));
}
