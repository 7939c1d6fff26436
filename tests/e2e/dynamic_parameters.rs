//! xDS-TP2 dynamic parameters through the relay, end to end: the real origin publishes
//! every cluster as variants (`--dynamic-parameter env=prod,dev`: one per value plus a
//! default for clients without `env`), and the example clients subscribe with resource
//! locators or node parameters. Every origin mode.
//!
//! - a client gets the variant its parameters select, with its constraints (TP2: a caching
//!   proxy MUST send them downstream), on delta and state-of-the-world streams;
//! - clients of the same key with the same parameters share the cached variant;
//! - a client without parameters gets the default variant; node parameters select too.

use crate::support;

use std::collections::BTreeMap;

use crate::support::{OriginProcess, RelayProcess, SOON};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::xds::core::v3::ContextParams;
use prost::Message;
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;
use xds_relay_example::extras::variant_of;

const ORIGIN_MODES: [&str; 4] = ["GRPC", "AGGREGATED_GRPC", "DELTA_GRPC", "AGGREGATED_DELTA_GRPC"];

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn variant(body: &Any) -> String {
    variant_of(&Cluster::decode(body.value.as_slice()).expect("a cluster")).unwrap_or_default()
}

/// The variant of `name` a delta client holds now, and whether it came with constraints.
async fn delta_variant(client: &DeltaClient, name: &str, mode: &str) -> (String, bool) {
    client.wait_for_state(xds::CLUSTER, SOON, |s| s.contains_key(name)).await.unwrap_or_else(|e| panic!("{mode}: {e}"));
    let resource = client
        .history()
        .into_iter()
        .rev()
        .flat_map(|r| r.resources)
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("{mode}: {name} was received"));
    (variant(resource.resource.as_ref().expect("a body")), resource.constraints.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_gets_the_variant_its_parameters_select() {
    let origin = OriginProcess::start(&["--dynamic-parameter", "env=prod,dev"]);
    for mode in ORIGIN_MODES {
        let relay = RelayProcess::start(&support::bootstrap_yaml(
            &[origin.xds],
            &format!("  api_type: {mode}\n"),
            "  ttl: 60s",
        ));
        let prod = vec![("cluster_1".to_owned(), params(&[("env", "prod")]))];

        let delta =
            DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("tp2-delta", "staging")).await.unwrap();
        delta.subscribe_locators(xds::CLUSTER, prod.clone()).await.unwrap();
        assert_eq!(delta_variant(&delta, "cluster_1", mode).await, ("prod".to_owned(), true), "{mode}: delta, locator");

        // Same key, same parameters, state of the world.
        let sotw =
            SotwClient::connect(&relay.endpoint(), Transport::PerType, node("tp2-sotw", "staging")).await.unwrap();
        sotw.subscribe_locators(xds::CLUSTER, prod.clone()).await.unwrap();
        let got = sotw.wait_for(xds::CLUSTER, SOON, |r| r.unwrapped("cluster_1").is_some()).await.unwrap();
        let unwrapped = got.unwrapped("cluster_1").unwrap();
        assert_eq!(variant(unwrapped.body.as_ref().unwrap()), "prod", "{mode}: sotw, locator");
        assert!(unwrapped.constraints.is_some(), "{mode}: the constraints reach the client");
        assert_eq!(got.resources.len(), 1, "{mode}: one variant per name");

        // Another key, no parameters: the default variant.
        let plain = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("tp2-plain", "other")).await.unwrap();
        plain.subscribe(xds::CLUSTER, vec!["cluster_1".into()]).await.unwrap();
        assert_eq!(
            delta_variant(&plain, "cluster_1", mode).await,
            ("default".to_owned(), true),
            "{mode}: no parameters"
        );

        // Another key, parameters from the node.
        let mut dev_node: Node = node("tp2-node", "devs");
        dev_node
            .dynamic_parameters
            .insert(xds::CLUSTER.to_owned(), ContextParams { params: [("env".into(), "dev".into())].into() });
        let by_node = DeltaClient::connect(&relay.endpoint(), Transport::PerType, dev_node).await.unwrap();
        by_node.subscribe(xds::CLUSTER, vec!["cluster_1".into()]).await.unwrap();
        assert_eq!(
            delta_variant(&by_node, "cluster_1", mode).await,
            ("dev".to_owned(), true),
            "{mode}: node parameters"
        );

        if !mode.contains("DELTA") {
            // A new origin version reaches the clients in their own variants (a delta origin
            // sends nothing for unchanged clusters).
            let next = origin.publish();
            let got = sotw.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
            assert_eq!(variant(got.unwrapped("cluster_1").unwrap().body.as_ref().unwrap()), "prod", "{mode}");
            let got = plain.wait_for(xds::CLUSTER, SOON, |r| r.system_version_info == next).await.unwrap();
            assert!(got.resources.iter().all(|r| variant(r.resource.as_ref().unwrap()) == "default"), "{mode}");
        }
        for c in [&delta, &plain, &by_node] {
            c.close();
        }
        sotw.close();
    }
}

/// A request whose locators carry different parameter sets is refused with
/// `INVALID_ARGUMENT` naming them; another client of the same key keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_locator_parameters_are_refused_and_others_served() {
    let origin = OriginProcess::start(&["--dynamic-parameter", "env=prod,dev"]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let good = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("tp2-good", "staging")).await.unwrap();
    good.subscribe_locators(xds::CLUSTER, vec![("cluster_1".into(), params(&[("env", "dev")]))]).await.unwrap();
    good.wait_for_state(xds::CLUSTER, SOON, |s| s.contains_key("cluster_1")).await.unwrap();

    let bad = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("tp2-bad", "staging")).await.unwrap();
    bad.subscribe_locators(
        xds::CLUSTER,
        vec![("cluster_0".into(), params(&[("env", "prod")])), ("cluster_1".into(), params(&[("env", "dev")]))],
    )
    .await
    .unwrap();
    let end = bad.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::InvalidArgument), "{end:?}");
    assert!(end.message.contains("different dynamic parameters"), "{end:?}");

    let next = origin.publish();
    good.wait_for(xds::CLUSTER, SOON, |r| r.system_version_info == next).await.unwrap();
    assert_eq!(delta_variant(&good, "cluster_1", "GRPC").await, ("dev".to_owned(), true));
}

/// Owner and follower: a follower's clients select variants too, because the follower's
/// parameter sets reach the owner's upstream subscription through the peer protocol, and
/// the variants come back in their wrappers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_clients_get_their_variants_through_the_owner() {
    let origin = OriginProcess::start(&["--dynamic-parameter", "env=prod,dev"]);
    let gossip: Vec<(String, u16)> = (0..2)
        .map(|i| {
            let ip = format!("127.0.0.{}", i + 40);
            let port = support::free_udp_port(&ip);
            (ip, port)
        })
        .collect();
    let seeds: Vec<String> = gossip.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
    let relays: Vec<RelayProcess> = gossip
        .iter()
        .enumerate()
        .map(|(i, (ip, port))| {
            let name = format!("relay-{}", i + 1);
            RelayProcess::start(&support::cluster_bootstrap(origin.xds, &name, ip, *port, &seeds))
        })
        .collect();
    for relay in &relays {
        support::ready_members(relay, 2).await;
    }
    // A first client (env=dev) makes the key exist; the ring says who owns it.
    let probe =
        DeltaClient::connect(&relays[0].endpoint(), Transport::Ads, node("tp2-probe", "staging")).await.unwrap();
    probe.subscribe_locators(xds::CLUSTER, vec![("cluster_1".into(), params(&[("env", "dev")]))]).await.unwrap();
    assert_eq!(delta_variant(&probe, "cluster_1", "cluster").await.0, "dev");
    let owner = support::eventually("the key's owner", SOON, || {
        let view = relays[0].admin_json("/api/cluster");
        let keys = view["keys"].as_array()?;
        let key = keys.iter().find(|k| k["key"] == "staging_cds")?;
        key["owner"].as_str().map(str::to_owned)
    })
    .await;
    let follower = if owner == "relay-1" { &relays[1] } else { &relays[0] };

    // A client of the follower with other parameters gets its own variant.
    let prod = DeltaClient::connect(&follower.endpoint(), Transport::Ads, node("tp2-prod", "staging")).await.unwrap();
    prod.subscribe_locators(xds::CLUSTER, vec![("cluster_1".into(), params(&[("env", "prod")]))]).await.unwrap();
    assert_eq!(delta_variant(&prod, "cluster_1", "cluster").await, ("prod".to_owned(), true), "owner {owner}");
}
