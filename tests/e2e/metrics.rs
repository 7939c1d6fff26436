//! The Prometheus metrics an operator alerts on, scraped from real relay processes: origin
//! connectivity and keys without a working source, per-type pushes, NACKs and push latency,
//! peer followers and peer stream errors on both sides, membership by state, and handoffs
//! after an owner is killed.

use crate::support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::support::{OriginProcess, RelayProcess, SOON, eventually};
use xds_relay::peer::proto::WatchRequest;
use xds_relay::peer::proto::peer_client::PeerClient;
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

/// One scrape: `name{labels}` (labels as printed) to value.
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn of(relay: &RelayProcess) -> Option<Self> {
        let text = relay.admin_get("/metrics").ok()?;
        let mut series = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (name, value) = line.rsplit_once(' ')?;
            series.insert(name.to_owned(), value.parse().ok()?);
        }
        Some(Self(series))
    }

    /// The value of a series, 0 when absent (as `sum()` over nothing).
    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// Whether the series is exported at all.
    fn has(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }

    /// Sum of every series of metric `name` whose labels contain each of `labels`.
    fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                series.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
                    && labels.iter().all(|l| series.contains(l))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn keys(&self, source: &str, connected: bool) -> f64 {
        self.get(&format!("xds_relay_keys{{source=\"{source}\",connected=\"{connected}\"}}"))
    }
}

/// Polls `relay`'s metrics until `check` holds; returns that scrape.
async fn scrape_until(relay: &RelayProcess, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    eventually(what, SOON, || Scrape::of(relay).filter(|s| check(s))).await
}

fn route_key(i: usize) -> String {
    format!("staging_rds_route_{i}")
}

/// A relay alone: per-type pushes, NACKs and push latency; the origin's loss shows as a
/// disconnected origin key without a source, and its return clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_relay_reports_nacks_push_latency_and_origin_loss() {
    let mut origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let before = Scrape::of(&relay).expect("scrape");
    for series in [
        "xds_relay_keys{source=\"origin\",connected=\"false\"}",
        "xds_relay_keys_without_source",
        "xds_relay_handoffs_pending",
        "xds_relay_handoffs_total{result=\"completed\"}",
    ] {
        assert!(before.has(series), "{series} is exported before any event");
    }

    let picky = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-picky", "staging")).await.unwrap();
    picky.set_nack(xds::CLUSTER, Some("cluster_0: unsupported lb policy".into()));
    picky.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let version = origin.version();
    picky.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();

    let up = scrape_until(&relay, "the NACK and the push in the metrics", |s| {
        s.get("xds_relay_nacks_total{type=\"cds\"}") >= 1.0
            && s.get("xds_relay_keys{source=\"origin\",connected=\"true\"}") == 1.0
    })
    .await;
    assert_eq!(up.get("xds_relay_key_nacks_total{key=\"staging_cds\"}"), up.get("xds_relay_nacks_total{type=\"cds\"}"));
    assert!(up.get("xds_relay_pushes_total{type=\"cds\"}") >= 1.0);
    assert!(up.get("xds_relay_push_latency_seconds_count{type=\"cds\"}") >= 1.0);
    assert_eq!(
        up.get("xds_relay_push_latency_seconds_count{type=\"cds\"}"),
        up.get("xds_relay_pushes_total{type=\"cds\"}"),
        "one latency observation per push"
    );
    assert!(up.get("xds_relay_push_latency_seconds_sum{type=\"cds\"}") < 10.0);
    assert_eq!(up.get("xds_relay_upstream_connected{key=\"staging_cds\"}"), 1.0);
    assert_eq!(up.get("xds_relay_downstream_streams"), 1.0);
    assert_eq!(up.get("xds_relay_key_clients{key=\"staging_cds\"}"), 1.0);
    assert_eq!(up.get("xds_relay_keys_without_source"), 0.0);

    // The origin dies: the key has clients and no answered source.
    let xds_addr = origin.xds;
    origin.process.kill();
    let down = scrape_until(&relay, "the origin key to show disconnected", |s| {
        s.get("xds_relay_upstream_connected{key=\"staging_cds\"}") == 0.0
            && s.keys("origin", false) == 1.0
            && s.get("xds_relay_keys_without_source") == 1.0
    })
    .await;
    assert_eq!(down.keys("origin", true), 0.0);
    assert!(down.get("xds_relay_upstream_failures_total{key=\"staging_cds\"}") >= 1.0);
    assert!(picky.ended().is_none(), "the client stays connected while the origin is down");

    // It comes back on the same port: the key is answered again.
    let origin = origin.restart(&[]);
    assert_eq!(origin.xds, xds_addr);
    scrape_until(&relay, "the origin key to reconnect", |s| {
        s.get("xds_relay_upstream_connected{key=\"staging_cds\"}") == 1.0
            && s.keys("origin", true) == 1.0
            && s.get("xds_relay_keys_without_source") == 0.0
    })
    .await;
}

/// Peer address of `name` as `relay`'s /api/cluster shows it.
fn peer_addr(relay: &RelayProcess, name: &str) -> SocketAddr {
    let view = relay.admin_json("/api/cluster");
    let member = view["members"].as_array().unwrap().iter().find(|m| m["name"] == name).expect("member listed");
    member["peer_addr"].as_str().expect("peer address gossiped").parse().unwrap()
}

/// Two relays: membership and ring gauges, followers on the owner, key sources on the
/// follower; a malformed peer request and a killed owner count as peer stream errors; the
/// killed owner's keys are handed over (make-before-break completions) and every key is
/// answered from the origin again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_report_sources_peer_errors_and_handoffs() {
    const KEYS: usize = 20;
    let origin = OriginProcess::start(&["--listeners", "20", "--clusters", "2"]);
    let gossip: Vec<(String, u16)> =
        ["127.0.0.2", "127.0.0.3"].iter().map(|ip| (ip.to_string(), support::free_udp_port(ip))).collect();
    let seeds: Vec<String> = gossip.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
    let start = |i: usize| {
        let (ip, port) = &gossip[i];
        RelayProcess::start(&support::cluster_bootstrap(origin.xds, &format!("relay-{}", i + 1), ip, *port, &seeds))
    };
    let first = start(0);
    let mut second = Some(start(1));
    for relay in [&first, second.as_ref().unwrap()] {
        scrape_until(relay, "two ready members on the ring", |s| {
            s.get("xds_relay_cluster_members{state=\"ready\"}") == 2.0 && s.get("xds_relay_ring_members") == 2.0
        })
        .await;
    }

    // Every client on relay-1: it serves the keys it owns from the origin and follows the
    // others at relay-2.
    let mut clients = Vec::new();
    for i in 0..KEYS {
        let c = SotwClient::connect(&first.endpoint(), Transport::Ads, node(&format!("envoy-{i}"), "staging"))
            .await
            .unwrap();
        c.subscribe(xds::ROUTE, vec![format!("route_{i}")]).await.unwrap();
        clients.push(c);
    }
    for c in &clients {
        c.wait_for(xds::ROUTE, SOON, |r| !r.resources.is_empty()).await.unwrap();
    }
    let keys = KEYS as f64;
    let on_first = scrape_until(&first, "every key answered on relay-1", |s| {
        s.keys("origin", true) + s.keys("peer", true) == keys && s.get("xds_relay_keys_without_source") == 0.0
    })
    .await;
    let followed = on_first.keys("peer", true);
    assert!(followed > 0.0 && followed < keys, "keys spread over both nodes: {followed} of {keys} followed");
    for i in 0..KEYS {
        assert_eq!(on_first.get(&format!("xds_relay_upstream_connected{{key=\"{}\"}}", route_key(i))), 1.0);
    }
    assert_eq!(on_first.get("xds_relay_downstream_streams"), keys);
    assert!(on_first.get("xds_relay_pushes_total{type=\"rds\"}") >= keys);
    assert!(on_first.get("xds_relay_push_latency_seconds_count{type=\"rds\"}") >= keys);
    let owner = second.as_ref().unwrap();
    let on_owner = scrape_until(owner, "relay-2 to serve relay-1's followers from the origin", |s| {
        s.get("xds_relay_peer_followers") == followed && s.keys("origin", true) == followed
    })
    .await;
    assert_eq!(on_owner.keys("peer", true) + on_owner.keys("peer", false), 0.0, "an owner never follows");
    assert_eq!(on_owner.get("xds_relay_keys_without_source"), 0.0);

    // A malformed peer request: the owner refuses it and counts it.
    let mut peer = PeerClient::connect(format!("http://{}", peer_addr(&first, "relay-2"))).await.unwrap();
    let refused = peer.watch(tokio_stream::iter([WatchRequest::default()])).await;
    assert_eq!(refused.err().map(|s| s.code()), Some(tonic::Code::InvalidArgument));
    scrape_until(owner, "the bad peer request to be counted", |s| {
        s.get("xds_relay_peer_stream_errors_total{side=\"owner\",reason=\"bad_request\"}") == 1.0
    })
    .await;

    // kill -9 the owner: relay-1's peer streams fail, it takes every key from the origin
    // (one completed handoff per followed key) and nothing is left without a source.
    second.take().unwrap().process.kill();
    let after = scrape_until(&first, "relay-1 to take over every key", |s| {
        s.keys("origin", true) == keys
            && s.keys("peer", true) + s.keys("peer", false) == 0.0
            && s.get("xds_relay_keys_without_source") == 0.0
            && s.get("xds_relay_handoffs_pending") == 0.0
    })
    .await;
    assert!(
        after.sum("xds_relay_peer_stream_errors_total", &["side=\"follower\""]) >= 1.0,
        "the killed owner's streams count as peer stream errors"
    );
    assert!(after.get("xds_relay_source_changes_total") >= followed);
    assert!(after.get("xds_relay_handoffs_total{result=\"completed\"}") >= followed);
    assert!(after.get("xds_relay_handoff_duration_seconds_count") >= followed);
    for i in 0..KEYS {
        assert_eq!(
            after.get(&format!("xds_relay_upstream_connected{{key=\"{}\"}}", route_key(i))),
            1.0,
            "{} is connected after its handoff",
            route_key(i)
        );
    }
    scrape_until(&first, "relay-2 to be dead and off the ring", |s| {
        s.get("xds_relay_cluster_members{state=\"dead\"}") == 1.0
            && s.get("xds_relay_cluster_members{state=\"ready\"}") == 1.0
            && s.get("xds_relay_ring_members") == 1.0
    })
    .await;
    for c in &clients {
        assert!(c.ended().is_none(), "clients of relay-1 stay connected");
    }
}
