//! The example management server's protocol extras, seen by the project's SotW and delta
//! clients connected straight to a real `example-management-server` process (no relay): TTL
//! wrappers and heartbeats, `do_not_cache`, resource errors turned on and off with
//! `POST /extras`, `xdstp://` names and glob collections, and dynamic-parameter variants chosen
//! by each client's parameters.

use crate::support;

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::{OriginProcess, SOON, eventually, http_post_json};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::xds::core::v3::ContextParams;
use prost::Message;
use xds_relay_example::client::{Received, SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;
use xds_relay_example::extras::{DEFAULT_VARIANT, variant_of};
use xds_relay_example::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE};

fn endpoint(origin: &OriginProcess) -> String {
    format!("http://{}", origin.xds)
}

async fn sotw(origin: &OriginProcess, id: &str) -> SotwClient {
    SotwClient::connect(&endpoint(origin), Transport::Ads, node(id, "extras")).await.expect("connect")
}

async fn delta(origin: &OriginProcess, id: &str) -> DeltaClient {
    DeltaClient::connect(&endpoint(origin), Transport::Ads, node(id, "extras")).await.expect("connect")
}

/// The variant value of the cluster in `body`.
fn variant(body: &Any) -> String {
    let cluster = Cluster::decode(body.value.as_slice()).expect("a cluster");
    variant_of(&cluster).expect("a variant cluster")
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_wrapped_clusters_and_heartbeats_reach_sotw_and_delta_clients() {
    let origin = OriginProcess::start(&["--clusters", "2", "--ttl", "30s", "--heartbeat-interval", "200ms"]);
    let client = sotw(&origin, "ttl-sotw").await;
    client.subscribe(CLUSTER_TYPE, vec![]).await.expect("subscribe");
    let first = client
        .wait_for(CLUSTER_TYPE, SOON, |r| r.unwrapped("cluster_0").is_some_and(|u| u.body.is_some()))
        .await
        .expect("wrapped clusters");
    let c0 = first.unwrapped("cluster_0").expect("cluster_0");
    assert_eq!(c0.ttl, Some(Duration::from_secs(30)));
    assert_eq!(c0.version, first.version_info);
    assert_eq!(first.names(), ["cluster_0", "cluster_1"]);
    let beat = client.wait_for(CLUSTER_TYPE, SOON, Received::is_heartbeat).await.expect("a SotW heartbeat");
    assert_eq!(beat.version_info, first.version_info, "a heartbeat repeats the version");
    assert_ne!(beat.nonce, first.nonce);
    assert!(beat.all_unwrapped().iter().all(|u| u.ttl == Some(Duration::from_secs(30))));
    eventually("SotW heartbeats keep coming for every cluster", SOON, || {
        let counts = client.heartbeats(CLUSTER_TYPE);
        (counts.get("cluster_0") >= Some(&2) && counts.get("cluster_1") >= Some(&2)).then_some(())
    })
    .await;

    let d = delta(&origin, "ttl-delta").await;
    d.subscribe(CLUSTER_TYPE, vec![]).await.expect("subscribe");
    let held = d.wait_for_state(CLUSTER_TYPE, SOON, |v| v.len() == 2).await.expect("two clusters");
    let added = d.history().into_iter().find(|r| !r.resources.is_empty()).expect("first response");
    assert!(added.resources.iter().all(|r| r.ttl == Some(Duration::from_secs(30)) && r.resource.is_some()));
    eventually("delta heartbeats keep coming", SOON, || {
        let counts = d.heartbeats(CLUSTER_TYPE);
        (counts.get("cluster_0") >= Some(&2) && counts.get("cluster_1") >= Some(&2)).then_some(())
    })
    .await;
    let beat = d.history().into_iter().rev().find(|r| r.resources.iter().any(|x| x.is_heartbeat())).expect("beat");
    assert!(beat.resources.iter().all(|r| r.resource.is_none() && held.get(&r.name) == Some(&r.version)));
    assert_eq!(d.resources(CLUSTER_TYPE), held, "heartbeats keep what the client holds");
    assert!(origin.stats()["heartbeats_sent"].as_u64().unwrap_or(0) >= 4);
    assert_eq!(origin.stats()["extras"]["ttl"], "30s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_not_cache_is_flagged_on_the_named_resources_only() {
    let origin = OriginProcess::start(&["--clusters", "2", "--do-not-cache", "cluster_1,route_0"]);
    let client = sotw(&origin, "dnc-sotw").await;
    client.subscribe(CLUSTER_TYPE, vec![]).await.expect("subscribe");
    let r = client.wait_for(CLUSTER_TYPE, SOON, |r| r.resources.len() == 2).await.expect("clusters");
    assert!(r.unwrapped("cluster_1").expect("cluster_1").do_not_cache);
    let plain = r.unwrapped("cluster_0").expect("cluster_0");
    assert!(!plain.do_not_cache && plain.body.is_some() && plain.ttl.is_none());

    let d = delta(&origin, "dnc-delta").await;
    d.subscribe(ROUTE_TYPE, vec!["route_0".into(), "route_1".into()]).await.expect("subscribe");
    let r = d.wait_for(ROUTE_TYPE, SOON, |r| r.resources.len() == 2).await.expect("routes");
    let flags: Vec<(&str, bool)> = r.resources.iter().map(|x| (x.name.as_str(), x.do_not_cache)).collect();
    assert_eq!(flags, [("route_0", true), ("route_1", false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_errors_are_seen_then_cleared_through_post_extras() {
    let origin = OriginProcess::start(&["--clusters", "3", "--resource-error", "cds/cluster_1=14:origin unavailable"]);
    let client = sotw(&origin, "err-sotw").await;
    client.subscribe(CLUSTER_TYPE, vec![]).await.expect("subscribe");
    let d = delta(&origin, "err-delta").await;
    d.subscribe(CLUSTER_TYPE, vec!["cluster_0".into(), "cluster_1".into()]).await.expect("subscribe");

    let r = client.wait_for(CLUSTER_TYPE, SOON, |r| !r.resource_errors.is_empty()).await.expect("an error");
    assert_eq!(r.names(), ["cluster_0", "cluster_2"], "the failing resource is not sent");
    assert_eq!(r.resource_errors.len(), 1);
    let e = &r.resource_errors[0];
    assert_eq!((e.name.as_str(), e.code, e.message.as_str()), ("cluster_1", 14, "origin unavailable"));
    let dr = d.wait_for(CLUSTER_TYPE, SOON, |r| !r.resource_errors.is_empty()).await.expect("a delta error");
    assert_eq!(dr.resource_errors[0].name, "cluster_1");
    assert_eq!(dr.names(), ["cluster_0"]);
    assert_eq!(origin.stats()["extras"]["resource_errors"][0], "cds/cluster_1=14:origin unavailable");

    let refused = http_post_json(origin.stats, "/extras", r#"{"resource_errors":["cds/cluster_1=99:x"]}"#);
    let refused = refused.expect_err("an invalid code is refused");
    assert!(refused.starts_with("400") && refused.contains("resource_error"), "{refused}");
    let refused = http_post_json(origin.stats, "/extras", r#"{"no_such_field":1}"#).expect_err("unknown field");
    assert!(refused.starts_with("400"), "{refused}");
    assert!(client.ended().is_none() && d.ended().is_none(), "a refused body disconnects nobody");
    assert_eq!(origin.stats()["extras_refused"], 2);
    assert_eq!(origin.stats()["extras"]["resource_errors"].as_array().map(Vec::len), Some(1), "unchanged");

    http_post_json(origin.stats, "/extras", "{}").expect("extras cleared");
    let r = client
        .wait_for(CLUSTER_TYPE, SOON, |r| r.resource_errors.is_empty() && r.resources.len() == 3)
        .await
        .expect("the error clears");
    assert_eq!(r.names(), ["cluster_0", "cluster_1", "cluster_2"]);
    let dr = d.wait_for(CLUSTER_TYPE, SOON, |r| r.names() == ["cluster_1"]).await.expect("cluster_1 comes back");
    assert!(dr.resource_errors.is_empty());
    assert_eq!(d.resources(CLUSTER_TYPE).len(), 2);
    assert!(origin.stats()["extras"]["resource_errors"].as_array().is_some_and(Vec::is_empty));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdstp_exact_names_and_glob_collections() {
    let origin = OriginProcess::start(&["--clusters", "3", "--xdstp-authority", "relay.test"]);
    let cds = |i: usize| format!("xdstp://relay.test/envoy.config.cluster.v3.Cluster/fleet/cluster_{i}");
    let cla_glob = "xdstp://relay.test/envoy.config.endpoint.v3.ClusterLoadAssignment/fleet/*";
    let client = sotw(&origin, "tp1-sotw").await;
    client.subscribe(CLUSTER_TYPE, vec![cds(1)]).await.expect("subscribe");
    let r = client.wait_for(CLUSTER_TYPE, SOON, |r| !r.resources.is_empty()).await.expect("exact name");
    assert_eq!(r.names(), [cds(1).as_str()]);
    let cluster = Cluster::decode(r.resources[0].1.value.as_slice()).expect("cluster");
    let service = cluster.eds_cluster_config.expect("eds").service_name;
    assert_eq!(service, "xdstp://relay.test/envoy.config.endpoint.v3.ClusterLoadAssignment/fleet/cluster_1");
    client.subscribe(ENDPOINT_TYPE, vec![cla_glob.to_owned()]).await.expect("subscribe");
    let r = client.wait_for(ENDPOINT_TYPE, SOON, |r| r.resources.len() == 3).await.expect("glob");
    assert!(r.names().iter().all(|n| n.starts_with("xdstp://relay.test/envoy.config.endpoint.v3.")));
    assert!(r.names().contains(&service.as_str()));

    let reordered = format!("{}?z=1&a=2", cds(2));
    let canonical = format!("{}?a=2&z=1", cds(2));
    client.subscribe(CLUSTER_TYPE, vec![cds(1), reordered.clone()]).await.expect("subscribe");
    let r = client.wait_for(CLUSTER_TYPE, SOON, |r| r.resources.len() == 2).await.expect("context parameters");
    assert_eq!(r.names(), [cds(1).as_str(), canonical.as_str()], "served under the sorted parameters");

    let d = delta(&origin, "tp1-delta").await;
    d.subscribe(CLUSTER_TYPE, vec![reordered.clone()]).await.expect("subscribe");
    let r = d.wait_for(CLUSTER_TYPE, SOON, |r| !r.resources.is_empty()).await.expect("context parameters");
    assert_eq!(r.names(), [canonical.as_str()]);
    assert!(r.removed.is_empty(), "the reordered name is the same resource, not a missing one");
    d.subscribe(CLUSTER_TYPE, vec!["xdstp://relay.test/envoy.config.cluster.v3.Cluster/fleet/*".into()])
        .await
        .expect("subscribe");
    let held = d.wait_for_state(CLUSTER_TYPE, SOON, |v| v.len() == 4).await.expect("glob members");
    assert!(held.keys().eq([cds(0), cds(1), cds(2), canonical].iter()));
    let wild = delta(&origin, "tp1-wildcard").await;
    wild.subscribe(CLUSTER_TYPE, vec![]).await.expect("subscribe");
    wild.wait_for_state(CLUSTER_TYPE, SOON, |v| v.len() == 6).await.expect("wildcard gets plain and xdstp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_parameter_variants_follow_each_clients_parameters() {
    let origin = OriginProcess::start(&["--clusters", "2", "--dynamic-parameter", "env=prod,dev"]);
    let by_locator = sotw(&origin, "tp2-locator").await;
    by_locator
        .subscribe_locators(CLUSTER_TYPE, vec![("cluster_0".into(), params(&[("env", "prod")]))])
        .await
        .expect("sub");
    let r = by_locator.wait_for(CLUSTER_TYPE, SOON, |r| !r.resources.is_empty()).await.expect("variant");
    let acked = by_locator.sent().last().cloned().expect("an ACK");
    assert_eq!(
        acked.resource_locators,
        [("cluster_0".to_owned(), params(&[("env", "prod")]))],
        "ACKs keep the locators"
    );
    assert_eq!(r.names(), ["cluster_0"]);
    let u = r.unwrapped("cluster_0").expect("cluster_0");
    assert!(u.constraints.is_some());
    assert_eq!(variant(&u.body.expect("body")), "prod");

    let mut dev_node = node("tp2-node", "extras");
    let dev = ContextParams { params: [("env".to_owned(), "dev".to_owned())].into_iter().collect() };
    dev_node.dynamic_parameters.insert(CLUSTER_TYPE.to_owned(), dev);
    let by_node = SotwClient::connect(&endpoint(&origin), Transport::Ads, dev_node).await.expect("connect");
    by_node.subscribe(CLUSTER_TYPE, vec![]).await.expect("subscribe");
    let r = by_node.wait_for(CLUSTER_TYPE, SOON, |r| r.resources.len() == 2).await.expect("node variants");
    assert!(r.all_unwrapped().iter().all(|u| variant(u.body.as_ref().expect("body")) == "dev"));

    let plain = sotw(&origin, "tp2-plain").await;
    plain.subscribe(CLUSTER_TYPE, vec![]).await.expect("subscribe");
    let r = plain.wait_for(CLUSTER_TYPE, SOON, |r| r.resources.len() == 2).await.expect("default variants");
    assert!(r.all_unwrapped().iter().all(|u| variant(u.body.as_ref().expect("body")) == DEFAULT_VARIANT));

    let d = delta(&origin, "tp2-delta").await;
    d.subscribe_locators(CLUSTER_TYPE, vec![("cluster_1".into(), params(&[("env", "dev")]))]).await.expect("sub");
    d.wait_for_state(CLUSTER_TYPE, SOON, |v| v.contains_key("cluster_1")).await.expect("delta variant");
    let r = d.history().into_iter().find(|r| !r.resources.is_empty()).expect("response");
    assert_eq!(r.names(), ["cluster_1"]);
    assert!(r.resources[0].constraints.is_some());
    assert_eq!(variant(r.resources[0].resource.as_ref().expect("body")), "dev");
}

#[test]
fn invalid_extras_flags_exit_with_the_field_named() {
    let cases: [(&[&str], &str); 3] = [
        (&["--ttl", "soon"], "ttl"),
        (&["--resource-error", "xds/a=5:m"], "resource_error"),
        (&["--dynamic-parameter", "env"], "dynamic_parameter"),
    ];
    for (flags, field) in cases {
        let out = std::process::Command::new(support::binary("example-management-server"))
            .args(["--address", "127.0.0.1:0", "--stats-address", "127.0.0.1:0"])
            .args(flags)
            .output()
            .expect("run the example server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{flags:?}: {stderr}");
        assert!(stderr.contains(field), "{flags:?} must name {field}: {stderr}");
    }
}
