//! Pass-through of requests that no aggregation rule maps (`server.pass_through_unmapped`),
//! end to end with real processes on loopback: the example management server as origin, the
//! relay binary with rules that map only the nodes of cluster `staging`, and the example SotW
//! and delta clients.

use crate::support;

use crate::support::{OriginProcess, RelayProcess, SOON, bootstrap_yaml, eventually};
use serde_json::Value;
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;

/// Rules that map the four main types of cluster `staging` (keys `staging_cds`, …) and no
/// other node's requests.
fn rules() -> String {
    let mut text = String::from(
        "fragments:\n  - rules:\n      - match: { request_node_match: { cluster_match: { exact_match: staging } } }\n        result: { string_fragment: staging }\n  - rules:\n",
    );
    for (type_url, piece) in
        [(xds::CLUSTER, "cds"), (xds::ENDPOINT, "eds"), (xds::LISTENER, "lds"), (xds::ROUTE, "rds")]
    {
        text.push_str(&format!(
            "      - match: {{ and_match: {{ rules: [ {{ request_node_match: {{ cluster_match: {{ exact_match: staging }} }} }}, {{ request_type_match: {{ types: [\"{type_url}\"] }} }} ] }} }}\n        result: {{ string_fragment: {piece} }}\n"
        ));
    }
    text
}

/// The test bootstrap with `server.pass_through_unmapped` set to `on` and `extra` appended.
fn bootstrap(origin: &OriginProcess, on: bool, extra: &str) -> String {
    let base = bootstrap_yaml(&[origin.xds], "", "  ttl: 60s\n  max_entries: 100");
    let server = "server:\n  address: { address: \"127.0.0.1\", port_value: 0 }\n";
    assert!(base.starts_with(server), "{base}");
    base.replacen(server, &format!("{server}  pass_through_unmapped: {on}\n"), 1) + extra
}

async fn sotw(relay: &RelayProcess, transport: Transport, id: &str, cluster: &str) -> SotwClient {
    SotwClient::connect(&relay.endpoint(), transport, node(id, cluster)).await.expect("connect to the relay")
}

async fn delta(relay: &RelayProcess, transport: Transport, id: &str, cluster: &str) -> DeltaClient {
    DeltaClient::connect(&relay.endpoint(), transport, node(id, cluster)).await.expect("connect to the relay")
}

/// The value of an unlabelled metric, 0 when absent.
fn metric(relay: &RelayProcess, name: &str) -> f64 {
    let text = relay.admin_get("/metrics").expect("metrics");
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().expect("metric value"))
}

/// The pass-through keys in `/cache`, each with its JSON.
fn pass_through_keys(relay: &RelayProcess) -> Vec<Value> {
    let body = relay.admin_get("/cache/passthrough/*").expect("admin GET");
    if body.trim().is_empty() {
        return Vec::new();
    }
    let dump: Value = serde_json::from_str(&body).expect("cache JSON");
    dump["Cache"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_clients_get_an_origin_stream_each_while_mapped_clients_share_one() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::start_with_rules(&bootstrap(&origin, true, ""), &rules());
    let version = origin.version();

    // Two mapped clients share the key staging_cds and its one origin stream.
    let mut mapped = Vec::new();
    for i in 0..2 {
        let c = sotw(&relay, Transport::PerType, &format!("envoy-{i}"), "staging").await;
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version && r.resources.len() == 3).await.unwrap();
        mapped.push(c);
    }
    assert_eq!(origin.open_streams_for(xds::CLUSTER), 1);

    // Clients of cluster `prod` match no rule: each is relayed on a stream of its own.
    let sotw_unmapped = sotw(&relay, Transport::PerType, "prod-sotw", "prod").await;
    sotw_unmapped.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let got = sotw_unmapped.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();
    assert_eq!(got.resources.len(), 3, "the origin's clusters, as the origin sent them");

    let delta_per_type = delta(&relay, Transport::PerType, "prod-delta", "prod").await;
    delta_per_type.subscribe(xds::CLUSTER, vec!["*".into()]).await.unwrap();
    delta_per_type.wait_for_state(xds::CLUSTER, SOON, |view| view.len() == 3).await.unwrap();

    let delta_ads = delta(&relay, Transport::Ads, "prod-ads", "prod").await;
    delta_ads.subscribe(xds::CLUSTER, vec!["*".into()]).await.unwrap();
    delta_ads.subscribe(xds::ENDPOINT, vec!["cluster_0".into()]).await.unwrap();
    delta_ads.wait_for_state(xds::CLUSTER, SOON, |view| view.len() == 3).await.unwrap();
    let endpoints = delta_ads.wait_for_state(xds::ENDPOINT, SOON, |view| view.contains_key("cluster_0")).await.unwrap();

    eventually("one origin stream per pass-through client and type", SOON, || {
        (origin.open_streams_for(xds::CLUSTER) == 4 && origin.open_streams_for(xds::ENDPOINT) == 1).then_some(())
    })
    .await;

    // The admin API shows the private keys as pass-through, and the metrics count them.
    let keys = pass_through_keys(&relay);
    assert_eq!(keys.len(), 4, "{keys:?}");
    for key in &keys {
        assert_eq!(key["PassThrough"], true, "{key}");
        assert_eq!(key["NumRequests"], 1, "a private key has its one client: {key}");
    }
    let names: Vec<&str> = keys.iter().filter_map(|k| k["Key"].as_str()).collect();
    assert!(names.iter().any(|k| k.starts_with("passthrough/cds/prod-sotw/")), "{names:?}");
    assert!(names.iter().any(|k| k.starts_with("passthrough/eds/prod-ads/")), "{names:?}");
    let shared = relay.admin_json("/cache/staging_cds");
    assert!(shared["Cache"][0].get("PassThrough").is_none(), "a shared key is not pass-through: {shared}");
    assert_eq!(metric(&relay, "xds_relay_passthrough_streams"), 4.0);
    assert_eq!(metric(&relay, "xds_relay_passthrough_streams_total"), 4.0);
    assert!(relay.process.printed(&["pass-through stream opened", "prod-sotw"]));

    // A new origin version reaches pass-through clients as it reaches mapped ones.
    let next = origin.publish();
    for c in mapped.iter().chain([&sotw_unmapped]) {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
    }
    let before = endpoints["cluster_0"].clone();
    delta_ads
        .wait_for_state(xds::ENDPOINT, SOON, |view| view.get("cluster_0").is_some_and(|v| *v != before))
        .await
        .unwrap();

    // A client that leaves takes its origin streams with it, at once.
    sotw_unmapped.close();
    drop(sotw_unmapped);
    eventually("the SotW client's origin stream closes", SOON, || {
        (origin.open_streams_for(xds::CLUSTER) == 3).then_some(())
    })
    .await;
    delta_ads.close();
    drop(delta_ads);
    eventually("the ADS client's origin streams close", SOON, || {
        (origin.open_streams_for(xds::CLUSTER) == 2 && origin.open_streams_for(xds::ENDPOINT) == 0).then_some(())
    })
    .await;
    eventually("their keys leave the cache", SOON, || (pass_through_keys(&relay).len() == 1).then_some(())).await;
    assert_eq!(metric(&relay, "xds_relay_passthrough_streams"), 1.0);
    assert!(relay.process.printed(&["pass-through stream closed", "prod-sotw"]));
    assert!(relay.admin_get("/metrics").unwrap().contains("xds_relay_cache_evictions_total{reason=\"closed\"} 3"));

    // Unsubscribing from everything of the type releases the key too, the stream staying open.
    delta_per_type.unsubscribe(xds::CLUSTER, vec!["*".into()]).await.unwrap();
    eventually("the unsubscribed type's origin stream closes", SOON, || {
        (origin.open_streams_for(xds::CLUSTER) == 1 && pass_through_keys(&relay).is_empty()).then_some(())
    })
    .await;
    assert_eq!(metric(&relay, "xds_relay_passthrough_streams"), 0.0);
    assert!(delta_per_type.ended().is_none());

    // The mapped clients were never disturbed.
    let last = origin.publish();
    for c in &mapped {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == last).await.unwrap();
        assert!(c.ended().is_none(), "{:?}", c.ended());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_giving_a_reserved_key_is_refused_while_pass_through_is_on() {
    let origin = OriginProcess::start(&[]);
    let rules = "fragments:\n  - rules:\n      - match: { request_node_match: { cluster_match: { exact_match: evil } } }\n        result: { string_fragment: \"passthrough/cds/prod-1/1\" }\n";
    let relay = RelayProcess::start_with_rules(&bootstrap(&origin, true, ""), rules);
    let unmapped = sotw(&relay, Transport::PerType, "prod-1", "prod").await;
    unmapped.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    unmapped.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();

    // A client whose request the rules map into the reserved namespace cannot join (or
    // shadow) a private key.
    let evil = sotw(&relay, Transport::PerType, "evil-1", "evil").await;
    evil.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let end = evil.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::InvalidArgument), "{end:?}");
    assert!(end.message.contains("reserved"), "{end:?}");
    assert!(relay.admin_get("/metrics").unwrap().contains("xds_relay_request_errors_total{reason=\"reserved_key\"} 1"));
    let keys = pass_through_keys(&relay);
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(keys[0]["NumRequests"], 1);
    assert!(unmapped.ended().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_active_keys_bounds_pass_through_and_other_clients_keep_being_served() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::start_with_rules(&bootstrap(&origin, true, "limits:\n  max_active_keys: 3\n"), &rules());
    let version = origin.version();
    let mapped = sotw(&relay, Transport::PerType, "envoy-mapped", "staging").await;
    mapped.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    mapped.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();

    // A flood of unmapped streams: two fit beside the mapped key, the rest are refused.
    let mut flood = Vec::new();
    for i in 0..12 {
        let c = sotw(&relay, Transport::PerType, &format!("greedy-{i}"), "prod").await;
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        flood.push(c);
    }
    let mut served = Vec::new();
    let mut refused = 0;
    for c in flood {
        let outcome = eventually("each flooding stream is served or refused", SOON, || {
            if c.latest(xds::CLUSTER).is_some_and(|r| r.version_info == version) {
                return Some(None);
            }
            c.ended().map(Some)
        })
        .await;
        match outcome {
            None => served.push(c),
            Some(end) => {
                assert_eq!(end.code, Some(tonic::Code::ResourceExhausted), "{end:?}");
                assert!(end.message.contains("limits.max_active_keys"), "{end:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((served.len(), refused), (2, 10));
    assert_eq!(origin.open_streams_for(xds::CLUSTER), 3, "one shared and two pass-through origin streams");
    assert_eq!(metric(&relay, "xds_relay_passthrough_streams"), 2.0);

    // The mapped client and the admitted pass-through clients keep being served.
    let next = origin.publish();
    for c in [&mapped].into_iter().chain(&served) {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
        assert!(c.ended().is_none());
    }
    let late = sotw(&relay, Transport::PerType, "envoy-late", "staging").await;
    late.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    late.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();

    // A pass-through client leaving frees its key at once: the next one is admitted.
    let leaving = served.pop().unwrap();
    leaving.close();
    drop(leaving);
    eventually("the released key frees room", SOON, || (pass_through_keys(&relay).len() == 1).then_some(())).await;
    let next_one = sotw(&relay, Transport::PerType, "patient", "prod").await;
    next_one.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    next_one.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_setting_an_unmapped_stream_ends_with_invalid_argument() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::start_with_rules(&bootstrap(&origin, false, ""), &rules());
    let mapped = sotw(&relay, Transport::PerType, "envoy-mapped", "staging").await;
    mapped.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    mapped.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();

    let unmapped = sotw(&relay, Transport::PerType, "prod-1", "prod").await;
    unmapped.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let end = unmapped.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::InvalidArgument), "{end:?}");
    assert!(end.message.contains("aggregation key"), "{end:?}");
    let unmapped = delta(&relay, Transport::Ads, "prod-2", "prod").await;
    unmapped.subscribe(xds::CLUSTER, vec!["*".into()]).await.unwrap();
    let end = unmapped.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::InvalidArgument), "{end:?}");

    assert_eq!(origin.open_streams_for(xds::CLUSTER), 1, "only the mapped key reached the origin");
    assert!(pass_through_keys(&relay).is_empty());
    assert_eq!(metric(&relay, "xds_relay_passthrough_streams_total"), 0.0);
    assert!(mapped.ended().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_the_node_a_client_is_connected_to_serves_its_pass_through_keys() {
    let origin = OriginProcess::start(&[]);
    let gossip: Vec<(String, u16)> =
        ["127.0.0.2", "127.0.0.3"].into_iter().map(|ip| (ip.to_owned(), support::free_udp_port(ip))).collect();
    let seeds: Vec<String> = gossip.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
    let nodes: Vec<RelayProcess> = gossip
        .iter()
        .enumerate()
        .map(|(i, (ip, port))| {
            let text = support::cluster_bootstrap(origin.xds, &format!("relay-{}", i + 1), ip, *port, &seeds);
            let batch = "  ads_batch_window: 10ms\n";
            assert!(text.contains(batch), "{text}");
            RelayProcess::start_with_rules(
                &text.replacen(batch, &format!("{batch}  pass_through_unmapped: true\n"), 1),
                &rules(),
            )
        })
        .collect();
    for relay in &nodes {
        support::ready_members(relay, 2).await;
    }

    // Enough private keys that the ring would give some of them to relay-2: relay-1 serves
    // every one from the origin itself.
    const CLIENTS: usize = 8;
    let version = origin.version();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let c = sotw(&nodes[0], Transport::Ads, &format!("prod-{i}"), "prod").await;
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        clients.push(c);
    }
    for c in &clients {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();
    }
    eventually("one origin stream per pass-through client", SOON, || {
        (origin.open_streams_for(xds::CLUSTER) == CLIENTS as u64).then_some(())
    })
    .await;
    let local = nodes[0].admin_json("/api/cluster/local");
    let sources: Vec<&str> = local["keys"].as_array().unwrap().iter().filter_map(|k| k["source"].as_str()).collect();
    assert_eq!(sources, vec!["origin"; CLIENTS], "{local}");
    assert!(pass_through_keys(&nodes[1]).is_empty(), "relay-2 holds no pass-through key");
    let view = nodes[1].admin_json("/api/cluster");
    let keys = view["keys"].as_array().unwrap();
    assert_eq!(keys.len(), CLIENTS, "{view}");
    for key in keys {
        assert_eq!((&key["owner"], &key["pass_through"]), (&Value::from("relay-1"), &Value::Bool(true)), "{key}");
    }
    let next = origin.publish();
    for c in &clients {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
        assert!(c.ended().is_none());
    }
}
