//! Staged rollout per key, with real processes: a relay in front of the example management
//! server, and the project's SotW and delta clients on ADS, each NACKing any response that
//! carries a resource whose name contains "bad" (as a proxy rejecting a bad cluster). The
//! origin publishes a bad version with `POST /extras {"bad_clusters": ["bad-cluster"]}`.

use std::time::Duration;

use serde_json::Value;
use xds_relay_example::client::{SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;
use xds_relay_example::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE};
use xds_relay_example::xds_client::Recorded as _;

use crate::support::{OriginProcess, RelayProcess, SOON, bootstrap_yaml, eventually, http_post, http_post_json};

const KEY: &str = "staging_cds";
const BAD: &str = r#"{"bad_clusters":["bad-cluster"]}"#;
/// A good version that changes the clusters (so delta clients are sent something): the
/// `xdstp://` copies of every cluster are added.
const GOOD: &str = r#"{"xdstp_authority":"good.example"}"#;
/// The good version plus the bad cluster.
const GOOD_THEN_BAD: &str = r#"{"xdstp_authority":"good.example","bad_clusters":["bad-cluster"]}"#;
const BAKE: Duration = Duration::from_secs(2);

/// A relay staging CDS keys with `canary` (a YAML flow map) and `rollback_canaries`.
fn relay(origin: &OriginProcess, canary: &str, rollback: bool) -> RelayProcess {
    let mut bootstrap = bootstrap_yaml(&[origin.xds], "", "  ttl: 60s");
    bootstrap.push_str(&format!(
        "rollout:\n  policies:\n    - keys: {{ type_urls: [\"{CLUSTER_TYPE}\"] }}\n      canary: {canary}\n      \
         bake: {}s\n      rollback_canaries: {rollback}\n",
        BAKE.as_secs()
    ));
    RelayProcess::start(&bootstrap)
}

/// One test client, SotW or delta, subscribed on ADS to every cluster and their endpoints.
enum Client {
    Sotw(SotwClient),
    Delta(DeltaClient),
}

impl Client {
    async fn connect(relay: &RelayProcess, id: &str, delta: bool) -> Self {
        let node = node(id, "staging");
        if delta {
            let c = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node).await.expect("connect");
            c.set_nack_marker(Some("bad".into()));
            c.subscribe(CLUSTER_TYPE, vec![]).await.expect("subscribe CDS");
            c.subscribe(ENDPOINT_TYPE, vec!["cluster_0".into(), "cluster_1".into()]).await.expect("subscribe EDS");
            Self::Delta(c)
        } else {
            let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node).await.expect("connect");
            c.set_nack_marker(Some("bad".into()));
            c.subscribe(CLUSTER_TYPE, vec![]).await.expect("subscribe CDS");
            c.subscribe(ENDPOINT_TYPE, vec!["cluster_0".into(), "cluster_1".into()]).await.expect("subscribe EDS");
            Self::Sotw(c)
        }
    }

    /// The versions of every CDS response received, in order.
    fn cds_versions(&self) -> Vec<String> {
        match self {
            Self::Sotw(c) => {
                c.history().iter().filter(|r| r.type_url == CLUSTER_TYPE).map(|r| r.version().to_owned()).collect()
            }
            Self::Delta(c) => {
                c.history().iter().filter(|r| r.type_url == CLUSTER_TYPE).map(|r| r.version().to_owned()).collect()
            }
        }
    }

    fn received(&self, version: &str) -> bool {
        self.cds_versions().iter().any(|v| v == version)
    }

    /// The types of every response, in order.
    fn types(&self) -> Vec<(String, String)> {
        match self {
            Self::Sotw(c) => c.history().iter().map(|r| (r.type_url.clone(), r.version().to_owned())).collect(),
            Self::Delta(c) => c.history().iter().map(|r| (r.type_url.clone(), r.version().to_owned())).collect(),
        }
    }

    /// The CDS names the client holds now (delta) or last received (SotW).
    fn clusters(&self) -> Vec<String> {
        match self {
            Self::Sotw(c) => {
                c.latest(CLUSTER_TYPE).map(|r| r.names().into_iter().map(str::to_owned).collect()).unwrap_or_default()
            }
            Self::Delta(c) => c.resources(CLUSTER_TYPE).into_keys().collect(),
        }
    }
}

fn rollouts(relay: &RelayProcess) -> Vec<Value> {
    relay.admin_json("/rollout")["rollouts"].as_array().cloned().unwrap_or_default()
}

fn held_gauge(relay: &RelayProcess) -> Option<String> {
    let metrics = relay.admin_get("/metrics").expect("metrics");
    let prefix = format!("xds_relay_rollout_held{{key=\"{KEY}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map(str::to_owned)
}

fn published(body: &str) -> String {
    let reply: Value = serde_json::from_str(body).expect("publish reply");
    reply["version"].as_str().expect("version").to_owned()
}

async fn everyone_has(clients: &[&Client], version: &str) {
    eventually(&format!("every client receives CDS {version}"), SOON, || {
        clients.iter().all(|c| c.received(version)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_version_reaches_only_the_canaries_is_held_and_abort_rolls_them_back() {
    let origin = OriginProcess::start(&["--clusters", "2"]);
    let relay =
        relay(&origin, "{ node_match: { request_node_match: { id_match: { regex_match: \"^canary\" } } } }", false);
    let canary_sotw = Client::connect(&relay, "canary-sotw", false).await;
    let canary_delta = Client::connect(&relay, "canary-delta", true).await;
    let rest_sotw = Client::connect(&relay, "rest-sotw", false).await;
    let rest_delta = Client::connect(&relay, "rest-delta", true).await;
    let all = [&canary_sotw, &canary_delta, &rest_sotw, &rest_delta];
    let v1 = origin.version();
    everyone_has(&all, &v1).await;

    let v2 = published(&http_post_json(origin.stats, "/extras", BAD).expect("publish a bad version"));
    let held = eventually("the bad version is held with both canaries' NACKs", SOON, || {
        let rollout = rollouts(&relay).into_iter().find(|r| r["key"] == KEY)?;
        let nacks = rollout["canaries"].as_array()?.iter().filter(|c| c["answer"] == "nack").count();
        (rollout["phase"] == "held" && nacks == 2).then_some(rollout)
    })
    .await;
    assert_eq!(
        (held["candidate_version"].as_str(), held["stable_version"].as_str()),
        (Some(v2.as_str()), Some(v1.as_str()))
    );
    for canary in held["canaries"].as_array().unwrap() {
        let message = canary["nack_message"].as_str().unwrap();
        assert!(message.contains("bad-cluster"), "the client's NACK message is shown: {message}");
    }
    assert!(held["reason"].as_str().unwrap().contains("NACKed"), "{held}");
    assert_eq!(held_gauge(&relay).as_deref(), Some("1"));
    assert!(canary_sotw.received(&v2) && canary_delta.received(&v2), "the canaries were sent the new version");
    // The rest keep the previous version: give the relay time to (wrongly) send it.
    tokio::time::sleep(BAKE * 2).await;
    assert!(!rest_sotw.received(&v2) && !rest_delta.received(&v2), "the held version reached a non-canary");
    assert!(!rest_delta.clusters().iter().any(|n| n.contains("bad")));
    let status = relay.admin_json("/api/cluster/local");
    let key = status["keys"].as_array().unwrap().iter().find(|k| k["key"] == KEY).expect("the key").clone();
    assert_eq!(key["rollout"], "held");

    // Abort: the canaries are served the stable version again.
    let aborted = http_post(relay.admin, &format!("/rollout/{KEY}/abort")).expect("abort");
    assert!(aborted.contains(&v2), "{aborted}");
    eventually("the SotW canary gets the stable version's full state again", SOON, || {
        let versions = canary_sotw.cds_versions();
        let at = versions.iter().position(|v| *v == v2)?;
        versions[at..].contains(&v1).then_some(())
    })
    .await;
    let Client::Sotw(sotw) = &canary_sotw else { unreachable!() };
    let nonces: Vec<String> = sotw.history().iter().map(|r| r.nonce.clone()).collect();
    let unique: std::collections::BTreeSet<&String> = nonces.iter().collect();
    assert_eq!(unique.len(), nonces.len(), "the rolled-back state comes with a new nonce: {nonces:?}");
    eventually("the delta canary gets the candidate's extra cluster removed", SOON, || {
        let Client::Delta(c) = &canary_delta else { return None };
        c.history().iter().any(|r| r.removed.iter().any(|n| n == "bad-cluster")).then_some(())
    })
    .await;
    assert_eq!(rollouts(&relay)[0]["phase"], "aborted");
    assert_eq!(held_gauge(&relay).as_deref(), Some("0"));
    let conflict = http_post(relay.admin, &format!("/rollout/{KEY}/abort")).expect_err("already aborted");
    assert!(conflict.starts_with("409"), "{conflict}");
    let unknown = http_post(relay.admin, "/rollout/no_such_key/promote").expect_err("unknown key");
    assert!(unknown.starts_with("404") && unknown.contains("no_such_key"), "{unknown}");

    // A good version passes the gate after the bake and reaches everyone; an ADS client gets
    // its endpoints after the clusters (make-before-break).
    let v3 = published(&http_post_json(origin.stats, "/extras", GOOD).expect("publish a good version"));
    everyone_has(&all, &v3).await;
    assert!(rollouts(&relay).is_empty());
    for client in [&rest_sotw, &canary_sotw] {
        let types = client.types();
        let cds = types.iter().position(|(t, v)| t == CLUSTER_TYPE && *v == v3).unwrap();
        assert!(types[cds..].iter().any(|(t, _)| t == ENDPOINT_TYPE), "EDS after the new CDS: {types:?}");
    }
    let metrics = relay.admin_get("/metrics").unwrap();
    for line in [
        "xds_relay_rollout_decisions_total{decision=\"hold\"} 1",
        "xds_relay_rollout_decisions_total{decision=\"abort\"} 1",
        "xds_relay_rollout_decisions_total{decision=\"promote\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_version_waits_for_the_bake_and_promote_pushes_a_held_one_to_everyone() {
    let origin = OriginProcess::start(&["--clusters", "2"]);
    let relay = relay(&origin, "{ fraction: 0.5 }", true);
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(Client::connect(&relay, &format!("node-{i}"), i % 2 == 1).await);
    }
    let all: Vec<&Client> = clients.iter().collect();
    everyone_has(&all, &origin.version()).await;

    let v2 = published(&http_post_json(origin.stats, "/extras", GOOD).expect("publish a good version"));
    everyone_has(&all, &v2).await;
    let first = |c: &Client| match c {
        Client::Sotw(c) => {
            c.history().into_iter().find(|r| r.type_url == CLUSTER_TYPE && r.version_info == v2).map(|r| r.received_at)
        }
        Client::Delta(c) => c
            .history()
            .into_iter()
            .find(|r| r.type_url == CLUSTER_TYPE && r.system_version_info == v2)
            .map(|r| r.received_at),
    };
    let mut arrivals: Vec<_> = all.iter().filter_map(|c| first(c)).collect();
    arrivals.sort();
    assert!(
        arrivals[3] - arrivals[0] >= BAKE - Duration::from_millis(200),
        "the rest waited for the bake: {arrivals:?}"
    );
    assert_eq!(arrivals.iter().filter(|t| **t - arrivals[0] < BAKE / 2).count(), 2, "two canaries (0.5 × 4) first");

    let v3 = published(&http_post_json(origin.stats, "/extras", GOOD_THEN_BAD).expect("publish a bad version"));
    eventually("the bad version is held", SOON, || {
        rollouts(&relay).iter().any(|r| r["key"] == KEY && r["phase"] == "held").then_some(())
    })
    .await;
    let canaries: Vec<&Client> = all.iter().copied().filter(|c| c.received(&v3)).collect();
    assert!(!canaries.is_empty() && canaries.len() <= 2, "only canaries were sent it");
    eventually("rollback_canaries: the canaries are served the stable version again", SOON, || {
        canaries
            .iter()
            .all(|c| {
                let versions = c.cds_versions();
                versions.iter().position(|v| *v == v3).is_some_and(|at| versions[at..].contains(&v2))
            })
            .then_some(())
    })
    .await;
    assert!(rollouts(&relay)[0]["canaries"].as_array().unwrap().is_empty(), "no client is served the candidate");

    let promoted = http_post(relay.admin, &format!("/rollout/{KEY}/promote")).expect("promote");
    assert!(promoted.contains(&v3), "{promoted}");
    everyone_has(&all, &v3).await;
    assert!(rollouts(&relay).is_empty());
    assert_eq!(held_gauge(&relay).as_deref(), Some("0"));
}

/// A bake long enough that a test sees the canaries' answers before the promotion.
const CLUSTER_BAKE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_the_owner_gates_on_every_nodes_canaries_and_followers_serve_its_decision() {
    let origin = OriginProcess::start(&["--clusters", "2"]);
    let ips: Vec<String> = (0..3).map(|i| format!("127.0.0.{}", i + 30)).collect();
    let ports: Vec<u16> = ips.iter().map(|ip| crate::support::free_udp_port(ip)).collect();
    let seeds: Vec<String> = ips.iter().zip(&ports).map(|(ip, port)| format!("{ip}:{port}")).collect();
    let relays: Vec<RelayProcess> = (0..3)
        .map(|i| {
            let mut bootstrap =
                crate::support::cluster_bootstrap(origin.xds, &format!("relay-{}", i + 1), &ips[i], ports[i], &seeds);
            bootstrap.push_str(&format!(
                "rollout:\n  policies:\n    - {{ keys: {{ type_urls: [\"{CLUSTER_TYPE}\"] }}, canary: {{ fraction: 0.5 }}, \
                 bake: {}s, rollback_canaries: true }}\n",
                CLUSTER_BAKE.as_secs()
            ));
            RelayProcess::start(&bootstrap)
        })
        .collect();
    for relay in &relays {
        crate::support::ready_members(relay, 3).await;
    }
    // A first client creates the key; the owner is read from the cluster view, and the
    // clients then connect to the two other nodes only: every canary is a follower's client.
    let probe = Client::connect(&relays[0], "probe", false).await;
    let v1 = origin.version();
    everyone_has(&[&probe], &v1).await;
    let owner = eventually("the key's owner in the cluster view", SOON, || {
        let view = relays[0].admin_json("/api/cluster");
        let key = view["keys"].as_array()?.iter().find(|k| k["key"] == KEY)?.clone();
        key["owner"].as_str().map(str::to_owned)
    })
    .await;
    drop(probe);
    let owner_index: usize = owner.strip_prefix("relay-").unwrap().parse::<usize>().unwrap() - 1;
    let followers: Vec<usize> = (0..3).filter(|i| *i != owner_index).collect();
    let mut clients = Vec::new();
    for &i in &followers {
        for j in 0..2 {
            clients.push(Client::connect(&relays[i], &format!("node-{i}-{j}"), j == 1).await);
        }
    }
    let all: Vec<&Client> = clients.iter().collect();
    everyone_has(&all, &v1).await;

    // A bad version: each follower serves it to one canary of its own; their NACKs cross the
    // peer protocol and the owner holds the version for the whole cluster.
    let bad = published(&http_post_json(origin.stats, "/extras", BAD).expect("publish a bad version"));
    let held = eventually("the owner holds the version on a follower's canary NACK", SOON, || {
        let rollout = rollouts(&relays[owner_index]).into_iter().find(|r| r["key"] == KEY)?;
        (rollout["phase"] == "held").then_some(rollout)
    })
    .await;
    let reason = held["reason"].as_str().unwrap();
    assert!(reason.contains("bad-cluster") && reason.contains("(relay-"), "the NACK and its node are named: {reason}");
    assert_eq!(held_gauge(&relays[owner_index]).as_deref(), Some("1"));
    for &i in &followers {
        let rollout = eventually("the follower shows the owner's verdict", SOON, || {
            let rollout = rollouts(&relays[i]).into_iter().find(|r| r["key"] == KEY)?;
            (rollout["phase"] == "held").then_some(rollout)
        })
        .await;
        assert_eq!(rollout["decided_by_owner"], owner.as_str(), "{rollout}");
        let refused = http_post(relays[i].admin, &format!("/rollout/{KEY}/promote")).expect_err("decided by the owner");
        assert!(refused.starts_with("409") && refused.contains(&owner), "{refused}");
    }
    for relay in &relays {
        let view = relay.admin_json("/api/cluster");
        let key = view["keys"].as_array().unwrap().iter().find(|k| k["key"] == KEY).expect("the key").clone();
        assert_eq!(key["rollout"], "held", "the cluster view shows the key held on every node");
    }
    // Rolled back: every client that was sent the bad version gets the stable one again.
    eventually("the canaries are rolled back to the stable version", SOON, || {
        all.iter().all(|c| c.cds_versions().last() == Some(&v1)).then_some(())
    })
    .await;
    tokio::time::sleep(CLUSTER_BAKE).await;
    for pair in clients.chunks(2) {
        let sent = pair.iter().filter(|c| c.received(&bad)).count();
        assert!(sent <= 1, "at most one canary of each follower (fraction 0.5 of 2) was sent the held version");
    }

    // A good version: the followers' canaries ACK it, the owner sees every node's answers
    // and promotes it after the bake; then every client of every follower has it.
    let good = published(&http_post_json(origin.stats, "/extras", GOOD).expect("publish a good version"));
    let baking = eventually("the owner counts both followers' canary ACKs while baking", SOON, || {
        let sent_good = all.iter().filter(|c| c.received(&good)).count();
        let rollout = rollouts(&relays[owner_index]).into_iter().find(|r| r["key"] == KEY)?;
        let ready =
            rollout["phase"] == "baking" && rollout["candidate_version"] == good.as_str() && rollout["acks"] == 2;
        ready.then_some((rollout, sent_good))
    })
    .await;
    let (rollout, sent_good) = baking;
    assert!(sent_good <= 2, "before the promotion only the canaries have the version: {sent_good} clients");
    let reported: Vec<&Value> = rollout["followers"].as_array().unwrap().iter().collect();
    assert_eq!(reported.len(), 2, "{rollout}");
    assert!(reported.iter().all(|f| f["reported"] == true && f["canaries"] == 1 && f["acked"] == 1), "{rollout}");
    let canaries = rollout["canaries"].as_array().unwrap();
    assert!(canaries.iter().all(|c| c["relay"].is_string() && c["answer"] == "ack"), "{rollout}");
    everyone_has(&all, &good).await;
    assert!(rollouts(&relays[owner_index]).is_empty());
    for client in &clients {
        let versions = client.cds_versions();
        let at = versions.iter().position(|v| *v == good).unwrap();
        assert!(
            !versions[at..].iter().any(|v| *v != good),
            "never an older version after the promoted one: {versions:?}"
        );
    }
    let metrics = relays[owner_index].admin_get("/metrics").unwrap();
    for line in [
        "xds_relay_rollout_decisions_total{decision=\"hold\"} 1",
        "xds_relay_rollout_decisions_total{decision=\"promote\"} 1",
    ] {
        assert!(metrics.contains(line), "the owner decided once: {line} missing");
    }
    for &i in &followers {
        let metrics = relays[i].admin_get("/metrics").unwrap();
        assert!(!metrics.contains("xds_relay_rollout_decisions_total{"), "a follower decides nothing");
    }
}
