//! Protocol conformance: table-driven scenarios over the four client variants (state of the
//! world and delta, aggregated and per-type) and the four origin modes (`GRPC`,
//! `AGGREGATED_GRPC`, `DELTA_GRPC`, `AGGREGATED_DELTA_GRPC`), with real processes on
//! loopback. Each scenario names the xDS protocol rule it checks.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use support::{OriginProcess, RelayProcess, SOON, eventually};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;

const ORIGIN_MODES: [&str; 4] = ["GRPC", "AGGREGATED_GRPC", "DELTA_GRPC", "AGGREGATED_DELTA_GRPC"];

fn relay_with_mode(origin: &OriginProcess, mode: &str) -> RelayProcess {
    RelayProcess::start(&support::bootstrap_yaml(&[origin.xds], &format!("  api_type: {mode}\n"), "  ttl: 60s"))
}

/// Every response's names are unique (protocol: a repeated name is a server error).
fn assert_unique_names(responses: impl IntoIterator<Item = Vec<String>>, who: &str) {
    for names in responses {
        let unique: BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{who}: a response repeats a resource name: {names:?}");
    }
}

fn sotw_names(client: &SotwClient) -> Vec<Vec<String>> {
    client.history().into_iter().map(|r| r.resources.into_iter().map(|(n, _)| n).collect()).collect()
}

fn delta_names(client: &DeltaClient) -> Vec<Vec<String>> {
    client.history().into_iter().map(|r| r.resources.into_iter().map(|r| r.name).collect()).collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Rule: LDS/CDS carry full state, other types only what was asked; every variant, every
/// origin mode; a new version reaches every client (delta: only what changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_variant_works_from_every_origin_mode() {
    let origin = OriginProcess::start(&[]);
    for mode in ORIGIN_MODES {
        let relay = relay_with_mode(&origin, mode);
        let who = |variant: &str| format!("{variant} client, {mode} origin");
        let mut sotw = Vec::new();
        for (variant, transport) in [("sotw-ads", Transport::Ads), ("sotw-per-type", Transport::PerType)] {
            let c = SotwClient::connect(&relay.endpoint(), transport, node(variant, "staging")).await.unwrap();
            c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
            c.subscribe(xds::ENDPOINT, strings(&["cluster_1"])).await.unwrap();
            let cds = c.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
            assert_eq!(cds.names(), ["cluster_0", "cluster_1", "cluster_2"], "{}", who(variant));
            let eds = c.wait_for(xds::ENDPOINT, SOON, |r| !r.resources.is_empty()).await.unwrap();
            assert_eq!(eds.names(), ["cluster_1"], "{}", who(variant));
            sotw.push((variant, c));
        }
        let mut delta = Vec::new();
        for (variant, transport) in [("delta-ads", Transport::Ads), ("delta-per-type", Transport::PerType)] {
            let c = DeltaClient::connect(&relay.endpoint(), transport, node(variant, "staging")).await.unwrap();
            c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
            c.subscribe(xds::ENDPOINT, strings(&["cluster_1"])).await.unwrap();
            let cds = c.wait_for_state(xds::CLUSTER, SOON, |s| s.len() == 3).await.unwrap();
            assert_eq!(cds.keys().collect::<Vec<_>>(), ["cluster_0", "cluster_1", "cluster_2"], "{}", who(variant));
            let eds = c.wait_for_state(xds::ENDPOINT, SOON, |s| !s.is_empty()).await.unwrap();
            assert_eq!(eds.keys().collect::<Vec<_>>(), ["cluster_1"], "{}", who(variant));
            delta.push((variant, c));
        }

        let next = origin.publish();
        for (variant, c) in &sotw {
            c.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == next).await.unwrap();
            if !mode.contains("DELTA") {
                // A state-of-the-world origin announces a new CDS version even with the same
                // clusters; a delta origin sends nothing for unchanged clusters.
                let cds = c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
                assert_eq!(cds.resources.len(), 3, "{}: CDS carries full state", who(variant));
            }
            assert_unique_names(sotw_names(c), &who(variant));
        }
        for (variant, c) in &delta {
            let before_cds = c.history().iter().filter(|r| r.type_url == xds::CLUSTER).count();
            let eds = c.wait_for(xds::ENDPOINT, SOON, |r| r.system_version_info == next).await.unwrap();
            assert_eq!(
                eds.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
                ["cluster_1"],
                "{}",
                who(variant)
            );
            // The example's clusters do not change between versions: delta sends no cluster.
            let cds_after: usize = c
                .history()
                .iter()
                .filter(|r| r.type_url == xds::CLUSTER)
                .skip(before_cds)
                .map(|r| r.resources.len())
                .sum();
            assert_eq!(cds_after, 0, "{}: unchanged clusters are not resent", who(variant));
            assert_unique_names(delta_names(c), &who(variant));
        }
        for (variant, c) in &sotw {
            assert!(c.ended().is_none(), "{}: {:?}", who(variant), c.ended());
        }
        for (variant, c) in &delta {
            assert!(c.ended().is_none(), "{}: {:?}", who(variant), c.ended());
        }
        assert_eq!(origin.open_streams_for(xds::CLUSTER), 1, "{mode}: one origin stream per key");
        drop(relay);
        eventually("the relay's origin streams to close", SOON, || {
            (origin.open_streams_for(xds::CLUSTER) == 0).then_some(())
        })
        .await;
    }
}

/// Rule (delta reconnect): a client reconnecting with `initial_resource_versions` receives
/// only what differs, to the same relay or another one (versions are content hashes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reconnect_sends_only_differences_on_any_relay() {
    let origin = OriginProcess::start(&[]);
    let first = RelayProcess::in_front_of(&[origin.xds]);
    let second = relay_with_mode(&origin, "DELTA_GRPC");
    let c = DeltaClient::connect(&first.endpoint(), Transport::Ads, node("envoy-1", "staging")).await.unwrap();
    c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let held = c.wait_for_state(xds::CLUSTER, SOON, |s| s.len() == 3).await.unwrap();
    c.close();

    for (relay, name) in [(&first, "same relay"), (&second, "another relay, delta origin")] {
        let mut initial: HashMap<String, String> = held.clone().into_iter().collect();
        initial.insert("cluster_1".into(), "stale-version".into());
        initial.insert("cluster_9".into(), "deleted-meanwhile".into());
        let again = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-1", "staging")).await.unwrap();
        again.subscribe_with_versions(xds::CLUSTER, vec!["*".into()], initial).await.unwrap();
        let got = again.wait_for(xds::CLUSTER, SOON, |_| true).await.unwrap();
        let names: Vec<&str> = got.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["cluster_1"], "{name}: only the resource whose version differs");
        assert_eq!(got.removed, ["cluster_9"], "{name}: names deleted meanwhile are removed");
        assert_eq!(again.resources(xds::CLUSTER), held, "{name}: same versions on every relay");
        again.close();
    }
}

/// Rules (delta subscriptions): a subscription to a missing name is answered in
/// `removed_resources`; a re-subscribed name is resent even unchanged; with `*` and X held,
/// unsubscribing X is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_subscription_rules() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    for transport in [Transport::Ads, Transport::PerType] {
        let c = DeltaClient::connect(&relay.endpoint(), transport, node("envoy-d", "staging")).await.unwrap();
        c.subscribe(xds::ENDPOINT, strings(&["cluster_0", "nope"])).await.unwrap();
        let got = c.wait_for(xds::ENDPOINT, SOON, |r| r.removed.contains(&"nope".to_owned())).await;
        let got = got.unwrap_or_else(|e| panic!("missing name not answered: {e}; history {:?}", c.history()));
        assert!(got.removed == ["nope"]);
        c.wait_for_state(xds::ENDPOINT, SOON, |s| s.contains_key("cluster_0")).await.unwrap();

        let count = c.history().len();
        c.unsubscribe(xds::ENDPOINT, strings(&["cluster_0"])).await.unwrap();
        c.subscribe(xds::ENDPOINT, strings(&["cluster_0"])).await.unwrap();
        let resent =
            eventually("cluster_0 resent after re-subscribing", SOON, || c.history().into_iter().nth(count)).await;
        let names: Vec<&str> = resent.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["cluster_0"], "re-subscribed unchanged resource is resent");

        c.subscribe(xds::CLUSTER, strings(&["*", "cluster_2", "ghost"])).await.unwrap();
        c.wait_for_state(xds::CLUSTER, SOON, |s| s.len() == 3).await.unwrap();
        let count = c.history().iter().filter(|r| r.type_url == xds::CLUSTER).count();
        c.unsubscribe(xds::CLUSTER, strings(&["cluster_2"])).await.unwrap();
        let answer = eventually("an answer about cluster_2", SOON, || {
            c.history().into_iter().filter(|r| r.type_url == xds::CLUSTER).nth(count)
        })
        .await;
        let names: Vec<&str> = answer.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["cluster_2"], "still covered by the wildcard: resent");
        assert!(c.ended().is_none());
    }
}

/// Rules (state of the world): a changed name list is answered at the same version; a stale
/// nonce is ignored; an EDS response follows every CDS response (cluster warming).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_subscription_nonce_and_warming_rules() {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-s", "staging")).await.unwrap();
    c.subscribe(xds::CLUSTER, strings(&["cluster_0"])).await.unwrap();
    c.subscribe(xds::ENDPOINT, strings(&["cluster_0"])).await.unwrap();
    let cds = c.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
    c.wait_for(xds::ENDPOINT, SOON, |r| !r.resources.is_empty()).await.unwrap();
    let eds_before = c.history().iter().filter(|r| r.type_url == xds::ENDPOINT).count();

    // A request with a stale nonce and new names is ignored entirely.
    let stale = DiscoveryRequest {
        type_url: xds::CLUSTER.into(),
        resource_names: strings(&["cluster_0", "cluster_2"]),
        response_nonce: "stale-nonce".into(),
        version_info: cds.version_info.clone(),
        ..Default::default()
    };
    c.send_raw(stale).unwrap();
    // The subscription change with the right nonce is answered at the same version, and the
    // clusters' endpoints follow so the clusters can finish warming.
    c.subscribe(xds::CLUSTER, strings(&["cluster_0", "cluster_1"])).await.unwrap();
    let changed = c.wait_for(xds::CLUSTER, SOON, |r| r.resources.len() == 2).await.unwrap();
    assert_eq!(changed.version_info, cds.version_info);
    assert_eq!(changed.names(), ["cluster_0", "cluster_1"], "the stale request's cluster_2 was ignored");
    eventually("EDS re-sent after CDS", SOON, || {
        (c.history().iter().filter(|r| r.type_url == xds::ENDPOINT).count() > eds_before).then_some(())
    })
    .await;
    let history = c.history();
    let cds_at = history.iter().rposition(|r| r.type_url == xds::CLUSTER).unwrap();
    let eds_at = history.iter().rposition(|r| r.type_url == xds::ENDPOINT).unwrap();
    assert!(eds_at > cds_at, "EDS follows CDS");
    assert!(c.history().iter().all(|r| !r.names().contains(&"cluster_2")));
}

/// Rule (make-before-break): one origin update reaches an ADS client as CDS, EDS, LDS, RDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_updates_arrive_in_make_before_break_order() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-o", "staging")).await.unwrap();
    c.subscribe(xds::LISTENER, vec![]).await.unwrap();
    c.subscribe(xds::ROUTE, strings(&["route_0"])).await.unwrap();
    c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    c.subscribe(xds::ENDPOINT, strings(&["cluster_0"])).await.unwrap();
    for t in [xds::LISTENER, xds::ROUTE, xds::CLUSTER, xds::ENDPOINT] {
        c.wait_for(t, SOON, |r| !r.resources.is_empty()).await.unwrap();
    }
    for _ in 0..3 {
        let next = origin.publish();
        c.wait_for(xds::ROUTE, SOON, |r| r.version_info == next).await.unwrap();
        let order: Vec<String> = c
            .history()
            .into_iter()
            .filter(|r| r.version_info == next)
            .map(|r| xds::short_name(&r.type_url).to_owned())
            .collect();
        assert_eq!(order, ["cds", "eds", "lds", "rds"], "update {next}");
    }
}

/// Rule: never an empty or partial LDS/CDS from an incomplete cache — not before the
/// origin's first answer, and not for a name the origin was not yet asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_partial_full_state_responses() {
    let origin = OriginProcess::start(&[]);
    let origin_addr = origin.xds;
    let relay = RelayProcess::in_front_of(&[origin_addr]);
    let mut origin = origin;
    origin.process.kill();

    let early = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-early", "staging")).await.unwrap();
    early.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let delta =
        DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-early-d", "staging")).await.unwrap();
    delta.subscribe(xds::CLUSTER, strings(&["cluster_0"])).await.unwrap();
    assert!(
        early.wait_for(xds::CLUSTER, Duration::from_secs(2), |_| true).await.is_err(),
        "nothing before the origin answers"
    );
    assert!(delta.history().is_empty(), "no removal claimed before the origin answers");

    let origin = origin.restart(&[]);
    let first = early.wait_for(xds::CLUSTER, SOON, |_| true).await.unwrap();
    assert_eq!(first.resources.len(), 3, "the first CDS response is the full state");
    delta.wait_for_state(xds::CLUSTER, SOON, |s| s.contains_key("cluster_0")).await.unwrap();

    // Two gRPC-style clients naming different clusters share the key; the second one's
    // first answer must already contain its cluster.
    let a = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("grpc-a", "staging")).await.unwrap();
    a.subscribe(xds::CLUSTER, strings(&["cluster_0"])).await.unwrap();
    a.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
    let b = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("grpc-b", "staging")).await.unwrap();
    b.subscribe(xds::CLUSTER, strings(&["cluster_2"])).await.unwrap();
    let got = b.wait_for(xds::CLUSTER, SOON, |_| true).await.unwrap();
    assert_eq!(got.names(), ["cluster_2"]);
    drop(origin);
}

/// Rule: a NACK is recorded per client and not resent; delta clients too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_nacks_are_recorded() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let c = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-n", "staging")).await.unwrap();
    c.set_nack(xds::CLUSTER, Some("rejected by test".into()));
    c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    c.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
    eventually("the NACK in the cache view", SOON, || {
        let dump = relay.admin_json("/cache/staging_cds?verbose=true");
        (dump["Cache"][0]["Requests"][0]["last_nack"]["message"] == "rejected by test").then_some(())
    })
    .await;
    assert_eq!(c.history().iter().filter(|r| r.type_url == xds::CLUSTER).count(), 1, "a NACK causes no resend");
}

/// Rule (xDS-TP1): a glob collection is answered with every member on all four client
/// variants, for a type that is not full-state (EDS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp1_glob_collections_on_every_client_variant() {
    let authority = "conformance.example";
    let origin = OriginProcess::start(&["--xdstp-authority", authority]);
    let relay = relay_with_mode(&origin, "GRPC");
    let glob = format!("xdstp://{authority}/envoy.config.endpoint.v3.ClusterLoadAssignment/fleet/*");
    let members: Vec<String> = (0..3)
        .map(|i| format!("xdstp://{authority}/envoy.config.endpoint.v3.ClusterLoadAssignment/fleet/cluster_{i}"))
        .collect();
    for (variant, transport) in [("sotw-ads", Transport::Ads), ("sotw-per-type", Transport::PerType)] {
        let c = SotwClient::connect(&relay.endpoint(), transport, node(variant, "staging")).await.unwrap();
        c.subscribe(xds::ENDPOINT, vec![glob.clone()]).await.unwrap();
        let eds = c.wait_for(xds::ENDPOINT, SOON, |r| !r.resources.is_empty()).await.unwrap();
        let mut names: Vec<String> = eds.names().into_iter().map(str::to_owned).collect();
        names.sort();
        assert_eq!(names, members, "{variant}");
        assert_unique_names(sotw_names(&c), variant);
    }
    for (variant, transport) in [("delta-ads", Transport::Ads), ("delta-per-type", Transport::PerType)] {
        let c = DeltaClient::connect(&relay.endpoint(), transport, node(variant, "staging")).await.unwrap();
        c.subscribe(xds::ENDPOINT, vec![glob.clone()]).await.unwrap();
        let held = c.wait_for_state(xds::ENDPOINT, SOON, |s| s.len() == 3).await.unwrap();
        assert_eq!(held.keys().cloned().collect::<Vec<_>>(), members, "{variant}");
        assert_unique_names(delta_names(&c), variant);
    }
}
