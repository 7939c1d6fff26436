//! Last-known-good states on disk (`cache.persist_dir`), with real processes: a relay
//! restarted while the origin is down serves what it had from disk at once, marked stale,
//! skips a damaged record (and says which), and moves its clients to the origin's version on
//! the same stream once the origin is back. The same across a restarted 3-node cluster.

use std::path::Path;

use crate::support::{self, OriginProcess, RelayProcess, SOON, eventually, numeric, tempdir};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;

/// A short TTL would let unwatched keys age out; these tests never wait that long.
fn cache_section(dir: &Path) -> String {
    format!("  ttl: 600s\n  persist_dir: \"{}\"", dir.display())
}

/// The value of the metric line starting with `series` (name and labels).
fn metric(relay: &RelayProcess, series: &str) -> Option<f64> {
    let text = relay.admin_get("/metrics").ok()?;
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Record files in `dir`.
fn records(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|listing| listing.flatten().map(|f| f.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| n.ends_with(xds_relay::persist::RECORD_EXTENSION));
    names.sort();
    names
}

/// Waits until `relay`'s record of `key` holds `version`.
async fn recorded(dir: &Path, key: &str, version: &str) {
    let path = dir.join(xds_relay::persist::file_name(key));
    eventually(&format!("the record of {key} at {version}"), SOON, || {
        let bytes = std::fs::read(&path).ok()?;
        let record = xds_relay::persist::Record::from_file_bytes(&bytes).ok()?;
        (record.version_info == version).then_some(())
    })
    .await;
}

fn sotw_versions(client: &SotwClient, type_url: &str) -> Vec<String> {
    client.history().into_iter().filter(|r| r.type_url == type_url).map(|r| r.version_info).collect()
}

fn assert_monotonic(seen: &[String], who: &str) {
    for pair in seen.windows(2) {
        assert!(numeric(&pair[0]) <= numeric(&pair[1]), "{who} saw {} after {}", pair[1], pair[0]);
    }
}

/// What the clients of the single-node test watch: CDS, the EDS of `cluster_0` and the
/// routes of `route_0`, each its own key.
async fn subscribe_all(client: &SotwClient) {
    client.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    client.subscribe(xds::ENDPOINT, vec!["cluster_0".into()]).await.unwrap();
    client.subscribe(xds::ROUTE, vec!["route_0".into()]).await.unwrap();
}

const CDS: &str = "staging_cds";
const EDS: &str = "staging_eds";
const RDS: &str = "staging_rds_route_0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_serves_its_last_known_good_state_until_the_origin_returns() {
    let mut origin = OriginProcess::start(&[]);
    let persist = tempdir::Dir::new("persist");
    let bootstrap = support::bootstrap_yaml(&[origin.xds], "", &cache_section(&persist.0));
    let relay = RelayProcess::start(&bootstrap);
    let before = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-0", "staging")).await.unwrap();
    subscribe_all(&before).await;
    let known = origin.version();
    for type_url in [xds::CLUSTER, xds::ENDPOINT, xds::ROUTE] {
        before.wait_for(type_url, SOON, |r| r.version_info == known).await.unwrap();
    }
    for key in [CDS, EDS, RDS] {
        recorded(&persist.0, key, &known).await;
    }
    assert!(metric(&relay, "xds_relay_persist_writes_total").unwrap_or(0.0) >= 3.0);

    // The relay dies (kill -9: what was written is all there is) and the origin is down.
    drop(before);
    drop(relay);
    origin.process.kill();
    // One record is damaged: a byte flipped in its body.
    let damaged = persist.0.join(xds_relay::persist::file_name(RDS));
    let mut bytes = std::fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&damaged, bytes).unwrap();

    let relay = RelayProcess::start(&bootstrap);
    assert!(
        relay.process.printed(&["last-known-good record skipped", &damaged.display().to_string(), "checksum"]),
        "the log names the damaged file and the reason"
    );
    assert_eq!(metric(&relay, "xds_relay_persist_records_skipped_total{reason=\"checksum\"}"), Some(1.0));
    assert_eq!(metric(&relay, "xds_relay_persist_records_loaded_total"), Some(2.0));
    let local = relay.admin_json("/api/cluster/local");
    let cds = local["keys"].as_array().unwrap().iter().find(|k| k["key"] == CDS).cloned().unwrap();
    assert_eq!(cds["stale"], true, "{cds}");
    assert_eq!(cds["source"], "disk", "no source runs before a client watches the key: {cds}");
    assert_eq!(cds["version"], known.as_str());

    // New clients are served from disk at once, though the origin is down.
    let sotw = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-1", "staging")).await.unwrap();
    subscribe_all(&sotw).await;
    let delta = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-2", "staging")).await.unwrap();
    delta.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    delta.subscribe(xds::ENDPOINT, vec!["cluster_0".into()]).await.unwrap();
    let served = sotw.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
    assert_eq!(served.version_info, known);
    assert_eq!(served.resources.len(), 3, "the example snapshot has 3 clusters");
    sotw.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == known).await.unwrap();
    let view = delta.wait_for_state(xds::CLUSTER, SOON, |s| s.len() == 3).await.unwrap();
    assert_eq!(view.keys().collect::<Vec<_>>(), ["cluster_0", "cluster_1", "cluster_2"]);
    delta.wait_for(xds::ENDPOINT, SOON, |r| r.system_version_info == known).await.unwrap();
    for key in [CDS, EDS] {
        let dump = relay.admin_json(&format!("/cache/{key}"));
        assert_eq!(dump["Cache"][0]["Stale"], true, "{dump}");
        assert_eq!(dump["Cache"][0]["Upstream"]["stale"], true, "{dump}");
    }
    assert_eq!(metric(&relay, "xds_relay_persist_stale_keys"), Some(2.0));
    // The damaged key is not served from disk: its client waits for the origin.
    assert!(sotw.latest(xds::ROUTE).is_none(), "a damaged record is never served");
    assert!(relay.admin_json(&format!("/cache/{RDS}"))["Cache"][0].get("Stale").is_none());

    // The origin returns with a newer version: the same streams move to it, stale clears.
    origin = origin.restart(&[]);
    let newest = origin.publish();
    for type_url in [xds::CLUSTER, xds::ENDPOINT, xds::ROUTE] {
        sotw.wait_for(type_url, SOON, |r| r.version_info == newest).await.unwrap();
        assert_monotonic(&sotw_versions(&sotw, type_url), "the SotW client");
    }
    // Endpoints change with every version; the example's clusters do not (delta sends none).
    delta.wait_for(xds::ENDPOINT, SOON, |r| r.system_version_info == newest).await.unwrap();
    assert!(sotw.ended().is_none() && delta.ended().is_none(), "no client was disconnected");
    eventually("the stale marks to clear", SOON, || {
        let dump = relay.admin_json("/cache");
        dump["Cache"].as_array()?.iter().all(|key| key.get("Stale").is_none()).then_some(())
    })
    .await;
    assert_eq!(metric(&relay, "xds_relay_persist_stale_keys"), Some(0.0));
    for key in [CDS, EDS, RDS] {
        recorded(&persist.0, key, &newest).await;
    }
    assert_eq!(records(&persist.0).len(), 3);
}

const ROUTES: usize = 6;

fn route_key(i: usize) -> String {
    format!("staging_rds_route_{i}")
}

/// Route clients for every key on every node.
async fn route_clients(relays: &[RelayProcess], tag: &str) -> Vec<SotwClient> {
    let mut clients = Vec::new();
    for (n, relay) in relays.iter().enumerate() {
        for route in 0..ROUTES {
            let id = format!("envoy-{tag}-{n}-{route}");
            let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node(&id, "staging")).await.unwrap();
            c.subscribe(xds::ROUTE, vec![format!("route_{route}")]).await.unwrap();
            clients.push(c);
        }
    }
    clients
}

fn start_cluster(origin: std::net::SocketAddr, gossip: &[(String, u16)], dirs: &[tempdir::Dir]) -> Vec<RelayProcess> {
    let seeds: Vec<String> = gossip.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
    gossip
        .iter()
        .zip(dirs)
        .enumerate()
        .map(|(i, ((ip, port), dir))| {
            let bootstrap = support::cluster_bootstrap(origin, &format!("relay-{}", i + 1), ip, *port, &seeds)
                .replace("cache:\n  ttl: 60s\n", &format!("cache:\n{}\n", cache_section(&dir.0)));
            assert!(bootstrap.contains("persist_dir"), "{bootstrap}");
            RelayProcess::start(&bootstrap)
        })
        .collect()
}

/// A 3-node cluster after its clients got a version and every node recorded every route key,
/// with the origin and every relay stopped.
struct Warmed {
    origin_xds: std::net::SocketAddr,
    origin_stats: std::net::SocketAddr,
    gossip: Vec<(String, u16)>,
    dirs: Vec<tempdir::Dir>,
    known: String,
}

/// Runs a 3-node cluster (gossip on 127.0.0.`first_ip`..+2, each node with its own
/// `persist_dir`) until every node recorded every route key at the origin's version, then
/// stops the origin, the clients and every relay.
async fn warm_cluster_then_stop_everything(first_ip: u8) -> Warmed {
    let origin = OriginProcess::start(&["--listeners", "6", "--clusters", "3"]);
    let gossip: Vec<(String, u16)> = (0..3)
        .map(|i| {
            let ip = format!("127.0.0.{}", first_ip + i);
            let port = support::free_udp_port(&ip);
            (ip, port)
        })
        .collect();
    let dirs: Vec<tempdir::Dir> = (0..3).map(|i| tempdir::Dir::new(&format!("persist-{i}"))).collect();
    let relays = start_cluster(origin.xds, &gossip, &dirs);
    for relay in &relays {
        support::ready_members(relay, 3).await;
    }
    let clients = route_clients(&relays, "a").await;
    let known = origin.publish();
    for c in &clients {
        c.wait_for(xds::ROUTE, SOON, |r| r.version_info == known).await.unwrap();
    }
    // Every node keeps what its clients watch, whether it owns the key or follows it.
    for dir in &dirs {
        for route in 0..ROUTES {
            recorded(&dir.0, &route_key(route), &known).await;
        }
    }
    let (origin_xds, origin_stats) = (origin.xds, origin.stats);
    drop(origin);
    drop(clients);
    drop(relays);
    Warmed { origin_xds, origin_stats, gossip, dirs, known }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restarted_while_the_origin_is_down_serves_the_last_known_good_config() {
    // The origin goes down, then every relay restarts.
    let Warmed { origin_xds, origin_stats, gossip, dirs, known } = warm_cluster_then_stop_everything(2).await;
    let relays = start_cluster(origin_xds, &gossip, &dirs);
    for relay in &relays {
        assert_eq!(metric(relay, "xds_relay_persist_records_loaded_total"), Some(ROUTES as f64));
    }
    // New clients on every node get the last-known-good config at once, origin or not.
    let clients = route_clients(&relays, "b").await;
    for c in &clients {
        let got = c.wait_for(xds::ROUTE, SOON, |r| !r.resources.is_empty()).await.unwrap();
        assert_eq!(got.version_info, known, "served from disk");
    }
    for relay in &relays {
        let local = relay.admin_json("/api/cluster/local");
        let keys = local["keys"].as_array().unwrap();
        assert!(keys.iter().all(|k| k["stale"] == true), "stale until the origin answers: {local}");
    }
    support::ready_members(&relays[0], 3).await;
    eventually("the cluster view to show every key stale", SOON, || {
        let view = relays[0].admin_json("/api/cluster");
        let keys = view["keys"].as_array()?;
        (keys.len() == ROUTES && keys.iter().all(|k| k["stale"] == true)).then_some(())
    })
    .await;

    // The origin returns: every client moves to its current version without a disconnect.
    let origin = OriginProcess::start_on(
        &origin_xds.to_string(),
        &origin_stats.to_string(),
        &["--interval", "600m", "--listeners", "6", "--clusters", "3"],
    );
    let newest = origin.publish();
    for c in &clients {
        c.wait_for(xds::ROUTE, SOON, |r| r.version_info == newest).await.unwrap();
        assert!(c.ended().is_none(), "a client was disconnected: {:?}", c.ended());
        assert_monotonic(&sotw_versions(c, xds::ROUTE), "a route client");
    }
    for relay in &relays {
        eventually("every key confirmed by a live source", SOON, || {
            let local = relay.admin_json("/api/cluster/local");
            local["keys"].as_array()?.iter().all(|k| k["stale"] == false).then_some(())
        })
        .await;
    }
    // One origin stream per key, cluster-wide.
    eventually("one origin stream per key", SOON, || {
        (origin.open_streams_for(xds::ROUTE) == ROUTES as u64).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_records_follows_the_owners_disk_state_marked_stale() {
    let Warmed { origin_xds, origin_stats, gossip, dirs, known } = warm_cluster_then_stop_everything(5).await;
    // relay-3 lost its records; the others kept theirs.
    for name in records(&dirs[2].0) {
        std::fs::remove_file(dirs[2].0.join(name)).unwrap();
    }
    let relays = start_cluster(origin_xds, &gossip, &dirs);
    assert_eq!(metric(&relays[2], "xds_relay_persist_records_loaded_total"), Some(0.0));
    for relay in &relays {
        support::ready_members(relay, 3).await;
    }
    let owners: Vec<(usize, String)> = eventually("the owner of every key", SOON, || {
        let view = relays[0].admin_json("/api/cluster");
        let keys = view["keys"].as_array()?;
        let owners: Vec<(usize, String)> = (0..ROUTES)
            .filter_map(|route| {
                let key = keys.iter().find(|k| k["key"] == route_key(route).as_str())?;
                Some((route, key["owner"].as_str()?.to_owned()))
            })
            .collect();
        (owners.len() == ROUTES).then_some(owners)
    })
    .await;
    let elsewhere: Vec<(usize, String)> = owners.into_iter().filter(|(_, owner)| owner != "relay-3").collect();
    assert!(!elsewhere.is_empty(), "some key is owned by another node than relay-3");
    let mut clients = Vec::new();
    for (route, owner) in &elsewhere {
        let c =
            SotwClient::connect(&relays[2].endpoint(), Transport::Ads, node(&format!("envoy-c-{route}"), "staging"))
                .await
                .unwrap();
        c.subscribe(xds::ROUTE, vec![format!("route_{route}")]).await.unwrap();
        let got = c.wait_for(xds::ROUTE, SOON, |r| !r.resources.is_empty()).await.unwrap();
        assert_eq!(got.version_info, known, "relay-3 serves what {owner} has on disk");
        eventually("relay-3 to follow the owner, stale", SOON, || {
            let local = relays[2].admin_json("/api/cluster/local");
            let key = local["keys"].as_array()?.iter().find(|k| k["key"] == route_key(*route).as_str())?.clone();
            (key["stale"] == true && key["source"] == format!("peer:{owner}").as_str()).then_some(())
        })
        .await;
        clients.push(c);
    }

    let origin = OriginProcess::start_on(
        &origin_xds.to_string(),
        &origin_stats.to_string(),
        &["--interval", "600m", "--listeners", "6", "--clusters", "3"],
    );
    let newest = origin.publish();
    for c in &clients {
        c.wait_for(xds::ROUTE, SOON, |r| r.version_info == newest).await.unwrap();
        assert!(c.ended().is_none(), "a client was disconnected: {:?}", c.ended());
        assert_monotonic(&sotw_versions(c, xds::ROUTE), "a route client on relay-3");
    }
    eventually("relay-3's keys confirmed through their owners", SOON, || {
        let local = relays[2].admin_json("/api/cluster/local");
        local["keys"].as_array()?.iter().all(|k| k["stale"] == false).then_some(())
    })
    .await;
}

#[test]
fn a_persist_dir_that_is_not_a_writable_directory_stops_the_relay_with_exit_64() {
    let dir = tempdir::Dir::new("persist-conf");
    let file = dir.0.join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let origin: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let bootstrap = dir.0.join("bootstrap.yaml");
    std::fs::write(&bootstrap, support::bootstrap_yaml(&[origin], "", &cache_section(&file))).unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("example/config/aggregation-rules.yaml");
    let out = std::process::Command::new(support::binary("xds-relay"))
        .arg("-c")
        .arg(&bootstrap)
        .arg("-a")
        .arg(&rules)
        .output()
        .expect("run xds-relay");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(text.contains("cache.persist_dir") && text.contains("is not a directory"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_delta_origin_the_state_from_disk_is_confirmed_when_the_origin_returns() {
    let mut origin = OriginProcess::start(&[]);
    let persist = tempdir::Dir::new("persist-delta");
    let bootstrap =
        support::bootstrap_yaml(&[origin.xds], "  api_type: AGGREGATED_DELTA_GRPC\n", &cache_section(&persist.0));
    let relay = RelayProcess::start(&bootstrap);
    let before = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-0", "staging")).await.unwrap();
    before.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let known = origin.version();
    before.wait_for(xds::CLUSTER, SOON, |r| r.version_info == known).await.unwrap();
    recorded(&persist.0, CDS, &known).await;
    drop(before);
    drop(relay);
    origin.process.kill();

    let relay = RelayProcess::start(&bootstrap);
    let client = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-1", "staging")).await.unwrap();
    client.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    client.wait_for(xds::CLUSTER, SOON, |r| r.version_info == known).await.unwrap();
    assert_eq!(relay.admin_json(&format!("/cache/{CDS}"))["Cache"][0]["Stale"], true);
    // The origin comes back; its clusters are the same as on disk.
    origin = origin.restart(&[]);
    eventually("the delta origin to confirm the state from disk", SOON, || {
        let dump = relay.admin_json(&format!("/cache/{CDS}"));
        dump["Cache"][0].get("Stale").is_none().then_some(())
    })
    .await;
    let current = origin.version();
    client.wait_for(xds::CLUSTER, SOON, |r| r.version_info == current).await.unwrap();
    assert!(client.ended().is_none());
    assert_monotonic(&sotw_versions(&client, xds::CLUSTER), "the client");
}
