//! A cluster of relay processes on 127.0.0.x: one origin stream per key cluster-wide, owners
//! agreed by every node, failover after kill -9, keys moving on join and drain — and clients
//! on surviving nodes never disconnected, never seeing an older version after a newer one.

use crate::support;

use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

use crate::support::{OriginProcess, RelayProcess, SOON, eventually, numeric};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

const KEYS: usize = 30;

struct TestCluster {
    origin: OriginProcess,
    nodes: Vec<Option<RelayProcess>>,
    seeds: Vec<String>,
    /// A gossip address kept free for a node added later.
    extra_gossip: Option<(String, u16)>,
}

impl TestCluster {
    fn start(origin: OriginProcess, count: usize) -> Self {
        let gossip: Vec<(String, u16)> = (0..count + 1)
            .map(|i| {
                let ip = format!("127.0.0.{}", i + 2);
                let port = support::free_udp_port(&ip);
                (ip, port)
            })
            .collect();
        let seeds: Vec<String> = gossip[..count].iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
        let mut cluster = Self { origin, nodes: Vec::new(), seeds, extra_gossip: None };
        for (ip, port) in &gossip[..count] {
            cluster.add_node(ip, *port);
        }
        cluster.extra_gossip = Some(gossip[count].clone());
        cluster
    }

    fn add_node(&mut self, ip: &str, port: u16) -> usize {
        let name = format!("relay-{}", self.nodes.len() + 1);
        let bootstrap = support::cluster_bootstrap(self.origin.xds, &name, ip, port, &self.seeds);
        self.nodes.push(Some(RelayProcess::start(&bootstrap)));
        self.nodes.len() - 1
    }

    fn live(&self) -> impl Iterator<Item = (usize, &RelayProcess)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    fn node(&self, i: usize) -> &RelayProcess {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// Waits until every running node sees exactly the running nodes as live ready members.
    async fn converge(&self) {
        let expected: Vec<String> = self.live().map(|(i, _)| format!("relay-{}", i + 1)).collect();
        for (_, relay) in self.live() {
            eventually("the membership to converge", SOON, || {
                let view = relay.admin_json("/api/cluster");
                let ready: Vec<String> = view["members"]
                    .as_array()?
                    .iter()
                    .filter(|m| m["alive"] == true && m["state"] == "ready")
                    .map(|m| m["name"].as_str().unwrap_or_default().to_owned())
                    .collect();
                (ready == expected).then_some(())
            })
            .await;
        }
    }

    /// Owner of every key, as each running node's /api/cluster reports it.
    fn owners(&self) -> Vec<BTreeMap<String, String>> {
        self.live()
            .map(|(_, relay)| {
                let view = relay.admin_json("/api/cluster");
                view["keys"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| (k["key"].as_str().unwrap().to_owned(), k["owner"].as_str().unwrap_or("-").to_owned()))
                    .collect()
            })
            .collect()
    }
}

fn key(i: usize) -> String {
    format!("staging_rds_route_{i}")
}

struct Client {
    node: usize,
    route: usize,
    client: SotwClient,
}

async fn connect_clients(cluster: &TestCluster, per_key: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for route in 0..KEYS {
        for j in 0..per_key {
            let live: Vec<usize> = cluster.live().map(|(i, _)| i).collect();
            let node_index = live[(route + j) % live.len()];
            let relay = cluster.node(node_index);
            let c =
                SotwClient::connect(&relay.endpoint(), Transport::Ads, node(&format!("envoy-{route}-{j}"), "staging"))
                    .await
                    .unwrap();
            c.subscribe(xds::ROUTE, vec![format!("route_{route}")]).await.unwrap();
            clients.push(Client { node: node_index, route, client: c });
        }
    }
    for c in &clients {
        c.client.wait_for(xds::ROUTE, SOON, |r| !r.resources.is_empty()).await.unwrap();
    }
    clients
}

async fn all_on(clients: &[&Client], version: &str) -> Duration {
    let started = Instant::now();
    for c in clients {
        c.client
            .wait_for(xds::ROUTE, SOON, |r| r.version_info == version)
            .await
            .unwrap_or_else(|e| panic!("client of route {} on node {}: {e}", c.route, c.node + 1));
    }
    started.elapsed()
}

fn assert_healthy(clients: &[&Client]) {
    for c in clients {
        assert!(
            c.client.ended().is_none(),
            "client of route {} on node {} was disconnected: {:?}",
            c.route,
            c.node + 1,
            c.client.ended()
        );
        let seen: Vec<u128> =
            c.client.history().iter().filter(|r| r.type_url == xds::ROUTE).map(|r| numeric(&r.version_info)).collect();
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "route {} on node {}: versions went back: {seen:?}",
            c.route,
            c.node + 1
        );
    }
}

async fn origin_streams(cluster: &TestCluster, expected: u64) {
    eventually(&format!("{expected} origin streams"), SOON, || {
        (cluster.origin.open_streams_for(xds::ROUTE) == expected).then_some(())
    })
    .await;
}

fn owner_of(cluster: &TestCluster, key: &str) -> usize {
    let owners = cluster.owners();
    let name = owners[0].get(key).expect("the key is active").clone();
    name.trim_start_matches("relay-").parse::<usize>().unwrap() - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_keys_and_survive_an_owner_kill() {
    let origin = OriginProcess::start(&["--listeners", "30", "--clusters", "3"]);
    let mut cluster = TestCluster::start(origin, 3);
    cluster.converge().await;
    let clients = connect_clients(&cluster, 2).await;
    origin_streams(&cluster, KEYS as u64).await;
    let owners = eventually("every node to report every key", SOON, || {
        let owners = cluster.owners();
        owners.iter().all(|o| o.len() == KEYS).then_some(owners)
    })
    .await;
    assert!(owners.windows(2).all(|w| w[0] == w[1]), "nodes disagree on owners: {owners:?}");
    let distinct: std::collections::BTreeSet<&String> = owners[0].values().collect();
    assert_eq!(distinct.len(), 3, "keys spread over the three nodes");

    let version = cluster.origin.publish();
    let everyone: Vec<&Client> = clients.iter().collect();
    all_on(&everyone, &version).await;

    // kill -9 the owner of route_0's key.
    let victim = owner_of(&cluster, &key(0));
    let killed_at = Instant::now();
    cluster.nodes[victim].take().unwrap().process.kill();
    let survivors: Vec<&Client> = clients.iter().filter(|c| c.node != victim).collect();
    cluster.converge().await;
    let version = cluster.origin.publish();
    let took = all_on(&survivors, &version).await;
    eprintln!(
        "failover: owner killed -> every surviving client on the next version in {:?} (publish to all: {took:?})",
        killed_at.elapsed()
    );
    origin_streams(&cluster, KEYS as u64).await;
    assert_healthy(&survivors);
    let owners = cluster.owners();
    assert!(owners.windows(2).all(|w| w[0] == w[1]));
    assert!(owners[0].values().all(|o| *o != format!("relay-{}", victim + 1)), "the dead node owns nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_move_on_join_and_drain_without_disconnects() {
    let origin = OriginProcess::start(&["--listeners", "30", "--clusters", "3"]);
    let mut cluster = TestCluster::start(origin, 3);
    cluster.converge().await;
    let clients = connect_clients(&cluster, 1).await;
    origin_streams(&cluster, KEYS as u64).await;

    // A fourth node joins: keys move to it; nobody is disconnected.
    let (ip, port) = cluster.extra_gossip.clone().unwrap();
    let fourth = cluster.add_node(&ip, port);
    cluster.converge().await;
    eventually("keys to move to the new node", SOON, || {
        cluster.owners()[0].values().any(|o| *o == format!("relay-{}", fourth + 1)).then_some(())
    })
    .await;
    origin_streams(&cluster, KEYS as u64).await;
    let version = cluster.origin.publish();
    let everyone: Vec<&Client> = clients.iter().collect();
    all_on(&everyone, &version).await;
    assert_healthy(&everyone);

    // SIGTERM drains relay-2: its keys move; clients elsewhere see nothing.
    let drained = 1;
    let status = cluster.nodes[drained]
        .as_mut()
        .unwrap()
        .process
        .terminate(Duration::from_secs(30))
        .expect("drained node exits");
    assert!(status.success(), "{status:?}");
    cluster.nodes[drained] = None;
    cluster.converge().await;
    let survivors: Vec<&Client> = clients.iter().filter(|c| c.node != drained).collect();
    let version = cluster.origin.publish();
    all_on(&survivors, &version).await;
    origin_streams(&cluster, KEYS as u64).await;
    assert_healthy(&survivors);
}

/// The ring page in headless Chromium against a live cluster: three members, every key with
/// its owner as /api/cluster says; after a node is killed the page shows it dead and its keys
/// moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_page_shows_the_cluster_in_a_browser() {
    if ["chromium", "chromium-browser"]
        .iter()
        .all(|b| std::process::Command::new("which").arg(b).output().map(|o| !o.status.success()).unwrap_or(true))
    {
        eprintln!("skipped: no Chromium on this machine (apt-get install chromium)");
        return;
    }
    let origin = OriginProcess::start(&["--listeners", "30", "--clusters", "3"]);
    let mut cluster = TestCluster::start(origin, 3);
    cluster.converge().await;
    let _clients = connect_clients(&cluster, 1).await;
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ring-page.png");
    let check = |cluster: &TestCluster, dead: Option<&str>, shot: &std::path::Path| {
        let admin = cluster.live().next().unwrap().1.admin;
        let mut command = std::process::Command::new("python3");
        command
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/check_ring_page.py"))
            .args(["--url", &format!("http://{admin}/ring"), "--expect-members", "relay-1,relay-2,relay-3"])
            .args(["--cluster-json", &format!("http://{admin}/api/cluster"), "--screenshot"])
            .arg(shot);
        if let Some(dead) = dead {
            command.args(["--expect-dead", dead]);
        }
        let out = command.output().expect("run the browser check");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ring page check failed: {text}");
        eprintln!("{text}");
    };
    check(&cluster, None, &screenshot);
    cluster.nodes[2].take().unwrap().process.kill();
    cluster.converge().await;
    eventually("relay-3's keys to move", SOON, || {
        cluster.owners().iter().all(|o| o.values().all(|v| v != "relay-3")).then_some(())
    })
    .await;
    check(&cluster, Some("relay-3"), &screenshot.with_file_name("ring-page-after-kill.png"));
}

/// A follower relays what the owner's origin sends beside the resources, as the owner does:
/// TTL heartbeats, per-resource errors and `do_not_cache` (a later client of the follower is
/// answered only from a fresh origin fetch, through the owner).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_relay_heartbeats_resource_errors_and_do_not_cache_as_the_owner_does() {
    let origin = OriginProcess::start(&[
        "--clusters",
        "2",
        "--ttl",
        "30s",
        "--heartbeat-interval",
        "300ms",
        "--do-not-cache",
        "cluster_1",
        "--resource-error",
        "cds/cluster_9=14:origin unavailable",
    ]);
    let cluster = TestCluster::start(origin, 2);
    cluster.converge().await;
    let cds_key = "staging_cds";
    let first = SotwClient::connect(&cluster.node(0).endpoint(), Transport::Ads, node("extras-first", "staging"))
        .await
        .unwrap();
    first.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    first.wait_for(xds::CLUSTER, SOON, |r| r.resources.len() == 2).await.unwrap();
    let owner = owner_of(&cluster, cds_key);
    let follower = 1 - owner;
    let relay = cluster.node(follower);

    let client =
        SotwClient::connect(&relay.endpoint(), Transport::Ads, node("extras-follower", "staging")).await.unwrap();
    let before = cluster.origin.stats()["streams_total"].as_u64().unwrap();
    client.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let cds = client.wait_for(xds::CLUSTER, SOON, |r| r.resources.len() == 2).await.unwrap();
    assert!(
        cluster.origin.stats()["streams_total"].as_u64().unwrap() > before,
        "a later client of the follower is answered from a fresh origin fetch"
    );
    let c1 = cds.unwrapped("cluster_1").unwrap();
    assert!(c1.do_not_cache && c1.body.is_some() && c1.ttl == Some(Duration::from_secs(30)));
    let e = &cds.resource_errors[0];
    assert_eq!(
        (e.name.as_str(), e.code),
        ("cluster_9", 14),
        "the origin's resource error reaches the follower's client"
    );
    eventually("heartbeats reach the follower's client", SOON, || {
        let counts = client.heartbeats(xds::CLUSTER);
        (counts.get("cluster_0") >= Some(&2) && counts.get("cluster_1") >= Some(&2)).then_some(())
    })
    .await;
    let dump = relay.admin_json(&format!("/cache/{cds_key}"));
    let resp = &dump["Cache"][0]["Resp"];
    assert_eq!(resp["ResourceErrors"][0]["Name"], "cluster_9", "{dump}");
    assert_eq!(resp["DoNotCache"][0], "cluster_1", "{dump}");
    assert!(first.ended().is_none() && client.ended().is_none());
}
