//! The admin API's protections, against a real relay process in front of the example origin:
//! the bearer token on every POST (and its rotation), the refusal of cross-site calls, GETs
//! of mutating paths that change nothing, and repeated clears that neither multiply origin
//! streams nor push an unchanged version to clients (also on a node that follows the key
//! through its owner).

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::support::{OriginProcess, RelayProcess, SOON, bootstrap_yaml, eventually};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

/// An HTTP answer: status, `WWW-Authenticate` header, body.
struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    body: String,
}

/// `method path` on `addr` with extra headers.
fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    let url = format!("http://{addr}{path}");
    let response = match method {
        "GET" => {
            let mut request = agent.get(&url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.call()
        }
        _ => {
            let mut request = agent.post(&url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.send_empty()
        }
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let www_authenticate = response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_owned);
    Answer {
        status: response.status().as_u16(),
        www_authenticate,
        body: response.body_mut().read_to_string().unwrap_or_default(),
    }
}

/// A relay in front of `origin` whose admin API needs the token in `token_file`.
fn relay_with_token(origin: &OriginProcess, token_file: &Path) -> RelayProcess {
    let bootstrap =
        bootstrap_yaml(&[origin.xds], "", "  ttl: 60s") + &format!("  auth_token_file: \"{}\"\n", token_file.display());
    RelayProcess::start(&bootstrap)
}

fn ready(relay: &RelayProcess) -> u16 {
    call(relay.admin, "GET", "/ready", &[]).status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_post_needs_the_token_and_a_rotated_token_takes_over() {
    let origin = OriginProcess::start(&[]);
    let dir = support::tempdir::Dir::new("admin-token");
    let token_file = dir.0.join("admin.token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let relay = relay_with_token(&origin, &token_file);

    let missing = call(relay.admin, "POST", "/ready/false", &[]);
    assert_eq!(missing.status, 401, "{}", missing.body);
    assert_eq!(missing.www_authenticate.as_deref(), Some("Bearer"));
    assert!(missing.body.contains("bearer token"), "{}", missing.body);
    let wrong = call(relay.admin, "POST", "/ready/false", &[("authorization", "Bearer second-token")]);
    assert_eq!(wrong.status, 403, "{}", wrong.body);
    for path in ["/cache/clear", "/cache/clear/staging_cds", "/log_level", "/log_level/debug", "/ready/true"] {
        assert_eq!(call(relay.admin, "POST", path, &[]).status, 401, "{path}");
    }
    assert_eq!(ready(&relay), 200, "refused calls change nothing");
    // Reads stay open.
    for path in ["/cache/keys", "/server_info", "/metrics", "/ready"] {
        assert_eq!(call(relay.admin, "GET", path, &[]).status, 200, "{path}");
    }
    let info = call(relay.admin, "GET", "/server_info", &[]).body;
    assert!(info.contains("admin.token") && !info.contains("first-token"), "server_info shows the path only: {info}");

    let right = call(relay.admin, "POST", "/ready/false", &[("authorization", "Bearer first-token")]);
    assert_eq!(right.status, 200, "{}", right.body);
    assert_eq!(ready(&relay), 500);

    // Rotation: the file changes, the new token takes over and the old one is refused.
    std::fs::write(&token_file, "second-token").unwrap();
    eventually("the rotated token to apply", SOON, || {
        (call(relay.admin, "POST", "/ready/true", &[("authorization", "Bearer second-token")]).status == 200)
            .then_some(())
    })
    .await;
    assert_eq!(ready(&relay), 200);
    assert_eq!(call(relay.admin, "POST", "/ready/false", &[("authorization", "Bearer first-token")]).status, 403);
    assert_eq!(ready(&relay), 200);

    let metrics = call(relay.admin, "GET", "/metrics", &[]).body;
    assert!(metrics.contains("xds_relay_admin_rejected_total{reason=\"missing_token\"} 6"), "{metrics}");
    assert!(metrics.contains("xds_relay_admin_rejected_total{reason=\"wrong_token\"}"), "{metrics}");
    assert!(relay.process.printed(&["admin call refused", "missing_token", "/ready/false"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_calls_and_gets_of_mutating_paths_change_nothing() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-1", "staging")).await.unwrap();
    c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let version = origin.version();
    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();
    let streams = origin.stats()["streams_total"].as_u64().unwrap();

    // A page on another site posting to the admin API (even with no token configured).
    for headers in
        [&[("origin", "https://evil.example")][..], &[("origin", "null")][..], &[("sec-fetch-site", "cross-site")][..]]
    {
        for path in ["/ready/false", "/cache/clear/staging_cds", "/cache/clear", "/log_level/debug"] {
            let answer = call(relay.admin, "POST", path, headers);
            assert_eq!(answer.status, 403, "{path} {headers:?}: {}", answer.body);
            assert!(answer.body.contains("cross-"), "{}", answer.body);
        }
    }
    // GETs of mutating paths.
    for path in ["/ready/false", "/cache/clear/staging_cds", "/cache/clear", "/log_level/debug"] {
        assert_eq!(call(relay.admin, "GET", path, &[]).status, 405, "{path}");
    }
    assert_eq!(ready(&relay), 200, "the node is still in its load balancer");
    assert_eq!(relay.admin_json("/cache/keys")["Names"], serde_json::json!(["staging_cds"]));
    assert_eq!(origin.stats()["streams_total"].as_u64().unwrap(), streams, "no refetch happened");
    let metrics = call(relay.admin, "GET", "/metrics", &[]).body;
    assert!(metrics.contains("xds_relay_admin_rejected_total{reason=\"cross_origin\"} 8"), "{metrics}");
    assert!(metrics.contains("xds_relay_admin_rejected_total{reason=\"cross_site\"} 4"), "{metrics}");

    // The admin's own origin (a page it serves) is let through.
    let own = format!("http://{}", relay.admin);
    assert_eq!(call(relay.admin, "POST", "/ready/false", &[("origin", &own)]).status, 200);
    assert_eq!(ready(&relay), 500);

    let next = origin.publish();
    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
    let seen: Vec<String> = c.history().into_iter().map(|r| r.version_info).collect();
    assert_eq!(seen, [version, next], "the client got each version once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_clears_bound_origin_streams_and_push_nothing_unchanged() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-1", "staging")).await.unwrap();
    c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let version = origin.version();
    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();
    let streams_before = origin.stats()["streams_total"].as_u64().unwrap();

    let started = tokio::time::Instant::now();
    let (mut refetched, mut joined, mut scheduled, mut most_open) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..100 {
        let answer = call(relay.admin, "POST", "/cache/clear/staging_cds", &[]);
        assert_eq!(answer.status, 200, "{}", answer.body);
        if answer.body.contains("already pending") {
            joined += 1;
        } else if answer.body.contains("scheduled") {
            scheduled += 1;
        } else {
            assert!(answer.body.is_empty(), "{}", answer.body);
            refetched += 1;
        }
        most_open = most_open.max(origin.open_streams_for(xds::CLUSTER));
    }
    let took = started.elapsed();
    assert_eq!(refetched + joined + scheduled, 100);
    // Each refetch replaces the key's one origin stream (never more than the old one closing
    // and the new one opening), and a key is refetched at most once per second: the first
    // clear refetches at once, later ones join a pending or scheduled refetch.
    assert!(most_open <= 2, "{most_open} origin streams open at once for one key");
    let bound = 2 + took.as_secs();
    if scheduled > 0 {
        eventually("the scheduled refetch to run", SOON, || {
            relay.process.printed(&["scheduled refetch due", "staging_cds"]).then_some(())
        })
        .await;
    }
    let settled = eventually("every refetch to deliver", SOON, || {
        let opened = origin.stats()["streams_total"].as_u64()? - streams_before;
        let responses = relay.admin_json("/cache/staging_cds")["Cache"][0]["Upstream"]["responses"].as_u64()?;
        // A refetch replaces a stream no sooner than two seconds after it opened, so the first
        // new stream may come after the clears.
        (opened >= 1 && responses == 1 + opened && origin.open_streams_for(xds::CLUSTER) == 1).then_some(opened)
    })
    .await;
    eprintln!(
        "100 clears in {took:?}: {refetched} refetched at once, {scheduled} scheduled, {joined} joined; {settled} origin streams opened"
    );
    assert!(
        (1..=bound).contains(&settled),
        "{settled} origin streams for 100 clears in {took:?} (at most {bound}: one per second per key)"
    );

    // The origin answered every refetch with the same version: the client got nothing, and
    // gets the next real version once.
    let next = origin.publish();
    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
    let seen: Vec<String> = c.history().into_iter().map(|r| r.version_info).collect();
    assert_eq!(seen, [version, next], "an unchanged version was pushed again");
    assert!(c.ended().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_on_a_following_node_refetches_through_the_owner_and_pushes_nothing_unchanged() {
    let origin = OriginProcess::start(&[]);
    let ips = ["127.0.0.2", "127.0.0.3"];
    let ports: Vec<u16> = ips.iter().map(|ip| support::free_udp_port(ip)).collect();
    let seeds: Vec<String> = ips.iter().zip(&ports).map(|(ip, port)| format!("{ip}:{port}")).collect();
    let nodes: Vec<RelayProcess> = (0..2)
        .map(|i| {
            let name = format!("relay-{}", i + 1);
            RelayProcess::start(&support::cluster_bootstrap(origin.xds, &name, ips[i], ports[i], &seeds))
        })
        .collect();
    for relay in &nodes {
        support::ready_members(relay, 2).await;
    }
    let version = origin.version();
    let mut clients = Vec::new();
    for (i, relay) in nodes.iter().enumerate() {
        let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node(&format!("envoy-{i}"), "staging"))
            .await
            .unwrap();
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();
        clients.push(c);
    }
    let source = |relay: &RelayProcess| -> Option<String> {
        let local = relay.admin_json("/api/cluster/local");
        local["keys"].as_array()?.iter().find(|k| k["key"] == "staging_cds")?["source"].as_str().map(str::to_owned)
    };
    let follower = eventually("one node to follow the key through the other", SOON, || {
        nodes.iter().position(|n| source(n).is_some_and(|s| s.starts_with("peer:")))
    })
    .await;
    let relay = &nodes[follower];
    let responses = |relay: &RelayProcess| {
        relay.admin_json("/cache/staging_cds")["Cache"][0]["Upstream"]["responses"].as_u64().unwrap_or(0)
    };
    let before = responses(relay);
    let streams_before = origin.stats()["streams_total"].as_u64().unwrap();

    let first = call(relay.admin, "POST", "/cache/clear/staging_cds", &[]);
    assert_eq!((first.status, first.body.as_str()), (200, ""), "the first clear refetches at once");
    let second = call(relay.admin, "POST", "/cache/clear/staging_cds", &[]);
    assert_eq!(second.status, 200);
    assert!(second.body.contains("pending") || second.body.contains("scheduled"), "{}", second.body);
    // The new peer source asked the owner for a state fetched from the origin after the clear.
    eventually("the refetch through the owner", SOON, || {
        let refreshed = origin.stats()["streams_total"].as_u64()? > streams_before;
        (refreshed && responses(relay) > before && origin.open_streams_for(xds::CLUSTER) == 1).then_some(())
    })
    .await;
    assert!(source(relay).is_some_and(|s| s.starts_with("peer:")), "the key is still followed through the owner");

    let next = origin.publish();
    for (i, c) in clients.iter().enumerate() {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
        let seen: Vec<String> = c.history().into_iter().map(|r| r.version_info).collect();
        assert_eq!(seen, [version.clone(), next.clone()], "client {i} got an unchanged version again");
        assert!(c.ended().is_none());
    }
    assert_eq!(origin.open_streams_for(xds::CLUSTER), 1, "one origin stream for the key, cluster-wide");
}
