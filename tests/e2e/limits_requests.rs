//! The request- and key-level limits of the `limits:` section, with real processes on
//! loopback (the example management server as origin, the relay binary, Rust xDS clients and
//! a raw peer client). Each test replays an attack, scaled down, and checks that the client
//! over a limit gets a status naming it, that it is counted, and that the clients that respect
//! the limits are still served.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::support::{OriginProcess, RelayProcess, SOON, bootstrap_yaml, cluster_bootstrap, eventually, free_udp_port};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value as ProtoValue};
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use xds_relay::peer::proto::peer_client::PeerClient;
use xds_relay::peer::proto::{Interest, WatchRequest};
use xds_relay::xds;
use xds_relay_example::client::{EndReason, SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;

/// A relay in front of `origin` with this `limits:` section (YAML lines, indented by two).
fn relay_with_limits(origin: &OriginProcess, limits: &str) -> RelayProcess {
    let bootstrap = bootstrap_yaml(&[origin.xds], "", "  ttl: 60s\n  max_entries: 1000");
    RelayProcess::start(&format!("{bootstrap}limits:\n{limits}\n"))
}

/// `limit_refusals_total{limit}` on the relay's `/metrics`.
fn refusals(relay: &RelayProcess, limit: &str) -> u64 {
    let metrics = relay.admin_get("/metrics").expect("metrics");
    let series = format!("xds_relay_limit_refusals_total{{limit=\"{limit}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.trim().parse::<f64>().expect("a number") as u64)
}

/// Asserts that a stream ended with `code` and a message naming `named`.
fn assert_refused(ended: &EndReason, code: Code, named: &str) {
    assert_eq!(ended.code, Some(code), "{ended}");
    assert!(ended.message.contains(named), "the status does not name {named}: {ended}");
}

/// One connection on which the attacker opens its streams.
async fn channel(relay: &RelayProcess) -> Channel {
    Endpoint::from_shared(relay.endpoint()).unwrap().connect().await.expect("connect to the relay")
}

/// A legitimate client of `staging` that gets CDS and EDS (`cluster_0`) at `version`.
async fn legitimate(relay: &RelayProcess, version: &str) -> SotwClient {
    let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-good", "staging")).await.unwrap();
    c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    c.subscribe(xds::ENDPOINT, vec!["cluster_0".into()]).await.unwrap();
    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.expect("CDS served");
    c.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == version).await.expect("EDS served");
    c
}

/// One client opens 40 node-cluster keys on one connection with `max_active_keys: 20`: keys
/// 21 and later are refused, the first 20 keep getting versions, the origin sees at most 20
/// streams, and new watchers of keys already open are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_opening_many_keys_gets_only_max_active_keys() {
    const LIMIT: usize = 20;
    const OPENED: usize = 40;
    let origin = OriginProcess::start(&[]);
    let relay = relay_with_limits(&origin, "  max_active_keys: 20");
    let version = origin.version();
    let connection = channel(&relay).await;

    let mut served = Vec::new();
    for i in 0..OPENED {
        let c = SotwClient::with_channel(
            connection.clone(),
            Transport::Ads,
            node(&format!("greedy-{i}"), &format!("k{i}-x")),
        );
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        if i < LIMIT {
            c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.expect("a key within the limit");
            served.push(c);
        } else {
            let ended = c.wait_ended(SOON).await.expect("a key over the limit is refused");
            assert_refused(&ended, Code::ResourceExhausted, "limits.max_active_keys (20)");
        }
    }
    assert_eq!(refusals(&relay, "max_active_keys"), (OPENED - LIMIT) as u64);
    let keys = relay.admin_json("/cache/keys")["Names"].as_array().unwrap().len();
    assert_eq!(keys, LIMIT, "refused keys create no cache entry");
    let streams = origin.open_streams_for(xds::CLUSTER);
    assert!(streams <= LIMIT as u64, "{streams} origin streams for {LIMIT} active keys");

    // Another watcher of an open key is served; the first 20 get the next version.
    let again = SotwClient::with_channel(connection.clone(), Transport::PerType, node("greedy-again", "k3-x"));
    again.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    again.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.expect("an open key takes new clients");
    let next = origin.publish();
    for (i, c) in served.iter().enumerate() {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next)
            .await
            .unwrap_or_else(|e| panic!("open key {i} did not get the next version: {e}"));
        assert!(c.ended().is_none(), "client {i} within the limit was disconnected: {:?}", c.ended());
    }
    // Closing keys makes room again.
    for c in served.drain(..5) {
        c.close();
    }
    drop(again);
    let late = SotwClient::with_channel(connection, Transport::Ads, node("greedy-late", "k39-x"));
    eventually("room for a new key once clients left", SOON, || {
        (relay.admin_json("/cache/keys")["Names"].as_array().unwrap().len() <= LIMIT).then_some(())
    })
    .await;
    late.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    late.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.expect("a key once others closed");
}

/// A huge key, too many names in one request (SotW and delta) and an oversized node: each is
/// refused with `INVALID_ARGUMENT` naming its limit, and another client is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_keys_name_lists_and_nodes_are_refused_and_others_served() {
    let origin = OriginProcess::start(&[]);
    let relay = relay_with_limits(&origin, "  max_key_length: 64\n  max_names_per_request: 5\n  max_node_bytes: 2048");
    let version = origin.version();
    let good = legitimate(&relay, &version).await;

    // A node cluster that makes a 104-byte key.
    let huge_key =
        SotwClient::connect(&relay.endpoint(), Transport::Ads, node("big", &format!("{}-x", "c".repeat(100))))
            .await
            .unwrap();
    huge_key.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let ended = huge_key.wait_ended(SOON).await.expect("a huge key is refused");
    assert_refused(&ended, Code::InvalidArgument, "limits.max_key_length (64)");
    assert!(
        relay.admin_json("/cache/keys")["Names"].as_array().unwrap().iter().all(|k| k.as_str().unwrap().len() <= 64)
    );

    // Six names in one SotW request.
    let many = SotwClient::connect(&relay.endpoint(), Transport::PerType, node("many", "staging")).await.unwrap();
    many.subscribe(xds::ENDPOINT, (0..6).map(|i| format!("cluster_{i}")).collect()).await.unwrap();
    let ended = many.wait_ended(SOON).await.expect("six names are refused");
    assert_refused(&ended, Code::InvalidArgument, "limits.max_names_per_request (5)");

    // Three names, then three more on a delta stream: six once applied.
    let delta = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("delta", "staging")).await.unwrap();
    delta.subscribe(xds::ENDPOINT, vec!["cluster_0".into(), "cluster_1".into(), "cluster_2".into()]).await.unwrap();
    delta.wait_for(xds::ENDPOINT, SOON, |r| !r.resources.is_empty()).await.expect("three names are served");
    delta.subscribe(xds::ENDPOINT, vec!["a".into(), "b".into(), "c".into()]).await.unwrap();
    let ended = delta.wait_ended(SOON).await.expect("six names in all are refused");
    assert_refused(&ended, Code::InvalidArgument, "limits.max_names_per_request (5)");

    // 4 KiB of node metadata.
    let mut fat = node("fat", "staging");
    let blob = ProtoValue { kind: Some(Kind::StringValue("m".repeat(4096))) };
    fat.metadata = Some(Struct { fields: BTreeMap::from([("blob".to_owned(), blob)]).into_iter().collect() });
    let fat = SotwClient::connect(&relay.endpoint(), Transport::Ads, fat).await.unwrap();
    fat.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let ended = fat.wait_ended(SOON).await.expect("a fat node is refused");
    assert_refused(&ended, Code::InvalidArgument, "limits.max_node_bytes (2048)");

    assert_eq!(refusals(&relay, "max_key_length"), 1);
    assert_eq!(refusals(&relay, "max_names_per_request"), 2);
    assert_eq!(refusals(&relay, "max_node_bytes"), 1);
    let next = origin.publish();
    good.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.expect("the good client keeps CDS");
    good.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == next).await.expect("the good client keeps EDS");
    assert!(good.ended().is_none(), "{:?}", good.ended());
}

/// The starvation attack: two EDS streams ask for many names of one key. With
/// `max_names_per_key: 10`, the second, which would take the union past it, is refused; the
/// first keeps its subscription and is served, and so is a legitimate client of the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_starve_a_keys_other_clients_through_its_names() {
    let origin = OriginProcess::start(&[]);
    let relay = relay_with_limits(&origin, "  max_names_per_key: 10\n  max_names_per_request: 10");
    let version = origin.version();
    let good = legitimate(&relay, &version).await;
    let names = |real: &str, tag: &str| {
        let mut names = vec![real.to_owned()];
        names.extend((0..7).map(|i| format!("{tag}-{i}")));
        names
    };
    let first = SotwClient::connect(&relay.endpoint(), Transport::PerType, node("greedy-1", "staging")).await.unwrap();
    first.subscribe(xds::ENDPOINT, names("cluster_1", "first")).await.unwrap();
    first.wait_for(xds::ENDPOINT, SOON, |r| r.names() == ["cluster_1"]).await.expect("9 names in the union fit");
    let second = SotwClient::connect(&relay.endpoint(), Transport::PerType, node("greedy-2", "staging")).await.unwrap();
    second.subscribe(xds::ENDPOINT, names("cluster_2", "second")).await.unwrap();
    let ended = second.wait_ended(SOON).await.expect("17 names in the union are refused");
    assert_refused(&ended, Code::ResourceExhausted, "limits.max_names_per_key (10)");
    assert_eq!(refusals(&relay, "max_names_per_key"), 1);

    // The key's clients keep their subscriptions: the union is theirs, 9 names.
    let dump = relay.admin_json("/cache/staging_eds?verbose=true");
    let clients = dump["Cache"][0]["Requests"].as_array().cloned().unwrap_or_default();
    let union: std::collections::BTreeSet<String> = clients
        .iter()
        .flat_map(|c| c["resource_names"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    assert_eq!(clients.len(), 2, "{clients:?}");
    assert_eq!(union.len(), 9, "{union:?}");
    assert!(union.contains("cluster_0") && union.contains("cluster_1") && !union.contains("cluster_2"));
    let next = origin.publish();
    let got = first.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == next).await.expect("the first is served");
    assert_eq!(got.names(), ["cluster_1"]);
    let got = good.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == next).await.expect("the good one is served");
    assert_eq!(got.names(), ["cluster_0"]);
    assert!(first.ended().is_none() && good.ended().is_none());
}

/// A request over `max_request_bytes` ends its stream with `RESOURCE_EXHAUSTED` naming the
/// limit (not with status 0), and the other streams of the relay are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_ends_with_resource_exhausted_naming_the_limit() {
    let origin = OriginProcess::start(&[]);
    let relay = relay_with_limits(&origin, "  max_request_bytes: 4096");
    let version = origin.version();
    let good = legitimate(&relay, &version).await;
    let big = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("big", "staging")).await.unwrap();
    big.subscribe(xds::ENDPOINT, vec!["n".repeat(8192)]).await.unwrap();
    let ended = big.wait_ended(SOON).await.expect("an 8 KiB request is refused");
    assert_refused(&ended, Code::ResourceExhausted, "limits.max_request_bytes (4096 bytes)");
    eventually("the refusal to be counted", SOON, || (refusals(&relay, "max_request_bytes") == 1).then_some(())).await;
    let next = origin.publish();
    good.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == next).await.expect("the good client is served");
}

/// Opens a peer watch with one first request; the status when refused.
async fn open_watch(client: &mut PeerClient<Channel>, request: WatchRequest) -> Result<(), tonic::Status> {
    let stream = tokio_stream::iter([request]).chain(tokio_stream::pending());
    tokio::time::timeout(SOON, client.watch(stream)).await.expect("the watch is answered").map(drop)
}

fn peer_watch(key: &str, cluster: &str, node_bytes: Option<usize>) -> WatchRequest {
    peer_watch_of(key, xds::CLUSTER, cluster, node_bytes, &[])
}

fn peer_watch_of(
    key: &str,
    type_url: &str,
    cluster: &str,
    node_bytes: Option<usize>,
    names: &[String],
) -> WatchRequest {
    let mut node = Node { id: "envoy-1".into(), cluster: cluster.into(), ..Node::default() };
    if let Some(bytes) = node_bytes {
        node.user_agent_name = "u".repeat(bytes);
    }
    WatchRequest {
        key: key.into(),
        type_url: type_url.into(),
        node: node.encode_to_vec(),
        interest: Some(Interest { wildcard: names.is_empty(), names: names.to_vec(), ..Default::default() }),
        follower: "relay-2".into(),
        fresh: false,
        canary_report: None,
    }
}

/// A follower (a raw peer client of a one-node insecure cluster) is held to the same limits:
/// a long key, a fat node, a key past `max_active_keys` and names past `max_names_per_key`
/// (on a later request of an open watch) are refused with the limit named, and followers
/// count as clients of the keys they open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_follower_over_a_limit_is_refused() {
    let origin = OriginProcess::start(&[]);
    let gossip = free_udp_port("127.0.0.1");
    let bootstrap = cluster_bootstrap(origin.xds, "relay-1", "127.0.0.1", gossip, &[]);
    let relay = RelayProcess::start(&format!(
        "{bootstrap}limits:\n  max_active_keys: 2\n  max_key_length: 64\n  max_node_bytes: 2048\n  max_names_per_key: 5\n  max_names_per_request: 5\n"
    ));
    let peer: SocketAddr = eventually("the peer address to be gossiped", SOON, || {
        let view = relay.admin_json("/api/cluster");
        let member = view["members"].as_array()?.iter().find(|m| m["name"] == "relay-1")?.clone();
        member["peer_addr"].as_str()?.parse().ok()
    })
    .await;
    let channel = Endpoint::from_shared(format!("http://{peer}")).unwrap().connect_lazy();
    let mut client = PeerClient::new(channel);

    let long = format!("{}_cds", "c".repeat(100));
    let refused =
        open_watch(&mut client, peer_watch(&long, &format!("{}-x", "c".repeat(100)), None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("limits.max_key_length (64)"), "{refused:?}");
    let refused = open_watch(&mut client, peer_watch("a_cds", "a-x", Some(4096))).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("limits.max_node_bytes (2048)"), "{refused:?}");

    open_watch(&mut client, peer_watch("a_cds", "a-x", None)).await.expect("a first key");
    // A second key, watched with four names (five more on a later request are refused below).
    let names = |n: usize| (0..n).map(|i| format!("cluster_{i}")).collect::<Vec<_>>();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(peer_watch_of("a_eds", xds::ENDPOINT, "a-x", None, &names(4))).unwrap();
    let mut updates = client
        .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .expect("a second key with four names")
        .into_inner();
    let refused = open_watch(&mut client, peer_watch("c_cds", "c-x", None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("limits.max_active_keys (2)"), "{refused:?}");
    // A client of a third key is refused too: followers count as clients.
    let client3 = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-c", "c-x")).await.unwrap();
    client3.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let ended = client3.wait_ended(SOON).await.expect("a third key is refused to clients");
    assert_refused(&ended, Code::ResourceExhausted, "limits.max_active_keys (2)");
    // A client of a key a follower holds is served.
    let version = origin.version();
    let client_a = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-a", "a-x")).await.unwrap();
    client_a.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    client_a.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.expect("an open key");

    // Nine names in all on a later request of the open follower stream.
    tx.send(peer_watch_of("a_eds", xds::ENDPOINT, "a-x", None, &names(9))).unwrap();
    let ended = tokio::time::timeout(SOON, async {
        loop {
            match updates.next().await {
                Some(Ok(_)) => {}
                Some(Err(status)) => break status,
                None => panic!("the follower stream ended without a status"),
            }
        }
    })
    .await
    .expect("the follower stream ends");
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("limits.max_names_per_key (5)"), "{ended:?}");

    assert_eq!(refusals(&relay, "max_key_length"), 1);
    assert_eq!(refusals(&relay, "max_node_bytes"), 1);
    assert_eq!(refusals(&relay, "max_active_keys"), 2);
    assert_eq!(refusals(&relay, "max_names_per_key"), 1);
}
