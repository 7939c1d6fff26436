//! Protocol conformance: table-driven scenarios over the four client variants (state of the
//! world and delta, aggregated and per-type) and the four origin modes (`GRPC`,
//! `AGGREGATED_GRPC`, `DELTA_GRPC`, `AGGREGATED_DELTA_GRPC`), with real processes on
//! loopback. Each scenario names the xDS protocol rule it checks.

use crate::support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::support::{OriginProcess, RelayProcess, SOON, eventually};
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

/// One client of each kind (state of the world and delta, aggregated and per-type), named
/// after `tag`.
struct EveryClient {
    sotw: Vec<(&'static str, SotwClient)>,
    delta: Vec<(&'static str, DeltaClient)>,
}

impl EveryClient {
    async fn connect(relay: &RelayProcess, tag: &str) -> Self {
        let mut sotw = Vec::new();
        for (variant, transport) in [("sotw-ads", Transport::Ads), ("sotw-per-type", Transport::PerType)] {
            let id = format!("{tag}-{variant}");
            sotw.push((
                variant,
                SotwClient::connect(&relay.endpoint(), transport, node(&id, "staging")).await.unwrap(),
            ));
        }
        let mut delta = Vec::new();
        for (variant, transport) in [("delta-ads", Transport::Ads), ("delta-per-type", Transport::PerType)] {
            let id = format!("{tag}-{variant}");
            delta.push((
                variant,
                DeltaClient::connect(&relay.endpoint(), transport, node(&id, "staging")).await.unwrap(),
            ));
        }
        Self { sotw, delta }
    }

    async fn subscribe(&self, type_url: &str, names: &[&str]) {
        for (_, c) in &self.sotw {
            c.subscribe(type_url, strings(names)).await.unwrap();
        }
        for (_, c) in &self.delta {
            c.subscribe(type_url, strings(names)).await.unwrap();
        }
    }
}

/// The origin's streams opened since it started.
fn origin_streams_total(origin: &OriginProcess) -> u64 {
    origin.stats()["streams_total"].as_u64().unwrap_or(0)
}

/// Rule (xDS TP3, gRFC A88): a per-resource error reaches the clients that asked for that
/// resource, and only them, as data (no stream ends); the cache and admin view keep it per
/// resource; when the origin stops reporting it, clients get the resource back. Every origin
/// mode, every client kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_errors_reach_the_clients_of_their_resources() {
    for mode in ORIGIN_MODES {
        let origin = OriginProcess::start(&[
            "--resource-error",
            "cds/cluster_1=14:origin unavailable",
            "--resource-error",
            "eds/cluster_2=7:denied",
        ]);
        let relay = relay_with_mode(&origin, mode);
        let clients = EveryClient::connect(&relay, "errors").await;
        clients.subscribe(xds::CLUSTER, &[]).await;
        // Clients of one EDS key: some want only cluster_0, which has no error.
        let eds_ok = EveryClient::connect(&relay, "errors-eds-ok").await;
        eds_ok.subscribe(xds::ENDPOINT, &["cluster_0"]).await;
        clients.subscribe(xds::ENDPOINT, &["cluster_0", "cluster_2"]).await;
        let who = |variant: &str| format!("{variant} client, {mode} origin");
        for (variant, c) in &clients.sotw {
            let cds = c.wait_for(xds::CLUSTER, SOON, |r| !r.resource_errors.is_empty()).await.unwrap();
            assert_eq!(cds.names(), ["cluster_0", "cluster_2"], "{}", who(variant));
            let e = &cds.resource_errors[0];
            assert_eq!((e.name.as_str(), e.code, e.message.as_str()), ("cluster_1", 14, "origin unavailable"));
            let eds = c.wait_for(xds::ENDPOINT, SOON, |r| !r.resource_errors.is_empty()).await.unwrap();
            let errors: Vec<(&str, i32)> = eds.resource_errors.iter().map(|e| (e.name.as_str(), e.code)).collect();
            assert_eq!(errors, [("cluster_2", 7)], "{}: only the error of a wanted name", who(variant));
        }
        for (variant, c) in &clients.delta {
            let cds = c.wait_for(xds::CLUSTER, SOON, |r| !r.resource_errors.is_empty()).await.unwrap();
            assert_eq!(cds.resource_errors[0].name, "cluster_1", "{}", who(variant));
            c.wait_for_state(xds::CLUSTER, SOON, |s| s.len() == 2).await.unwrap();
            let eds = c.wait_for(xds::ENDPOINT, SOON, |r| !r.resource_errors.is_empty()).await.unwrap();
            let errors: Vec<(&str, i32)> = eds.resource_errors.iter().map(|e| (e.name.as_str(), e.code)).collect();
            assert_eq!(errors, [("cluster_2", 7)], "{}", who(variant));
        }
        for (variant, c) in &eds_ok.sotw {
            c.wait_for(xds::ENDPOINT, SOON, |r| r.names() == ["cluster_0"]).await.unwrap();
            assert!(
                c.history().iter().all(|r| r.resource_errors.is_empty()),
                "{}: no error of cluster_2",
                who(variant)
            );
        }
        for (variant, c) in &eds_ok.delta {
            c.wait_for_state(xds::ENDPOINT, SOON, |s| s.len() == 1).await.unwrap();
            assert!(
                c.history().iter().all(|r| r.resource_errors.is_empty()),
                "{}: no error of cluster_2",
                who(variant)
            );
        }
        let dump = relay.admin_json("/cache/staging_cds");
        let errors = &dump["Cache"][0]["Resp"]["ResourceErrors"];
        assert_eq!(errors[0]["Name"], "cluster_1", "{mode}: the admin view shows the error: {dump}");
        assert_eq!(errors[0]["Code"], 14);

        support::http_post_json(origin.stats, "/extras", "{}").expect("clear the errors");
        for (variant, c) in &clients.sotw {
            let cds = c.wait_for(xds::CLUSTER, SOON, |r| r.resources.len() == 3).await.unwrap();
            assert!(cds.resource_errors.is_empty(), "{}", who(variant));
        }
        for (variant, c) in &clients.delta {
            c.wait_for_state(xds::CLUSTER, SOON, |s| s.len() == 3).await.unwrap();
            c.wait_for_state(xds::ENDPOINT, SOON, |s| s.len() == 2)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", who(variant)));
        }
        // An error that comes and goes while delta clients hold the resource: when it is over
        // they get the resource again (from a delta origin, at the same version).
        support::http_post_json(origin.stats, "/extras", r#"{"resource_errors":["cds/cluster_1=14:flapping"]}"#)
            .expect("set the error again");
        let mut marks = Vec::new();
        for (variant, c) in &clients.delta {
            c.wait_for(xds::CLUSTER, SOON, |r| r.resource_errors.iter().any(|e| e.message == "flapping"))
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", who(variant)));
            marks.push(c.history().len());
        }
        support::http_post_json(origin.stats, "/extras", "{}").expect("clear the errors");
        for ((variant, c), mark) in clients.delta.iter().zip(marks) {
            eventually(&format!("{}: cluster_1 again once its error is over", who(variant)), SOON, || {
                c.history()[mark..]
                    .iter()
                    .any(|r| r.type_url == xds::CLUSTER && r.names().contains(&"cluster_1"))
                    .then_some(())
            })
            .await;
        }
        for (variant, c) in clients.sotw.iter().chain(&eds_ok.sotw) {
            assert!(c.ended().is_none(), "{}: an error is data, not a stream failure", who(variant));
        }
        for (variant, c) in clients.delta.iter().chain(&eds_ok.delta) {
            assert!(c.ended().is_none(), "{}: an error is data, not a stream failure", who(variant));
        }
        let metrics = relay.admin_get("/metrics").unwrap();
        assert!(
            metrics.contains("xds_relay_protocol_extras_total{type=\"cds\",extra=\"resource_errors\"}"),
            "{metrics}"
        );
    }
}

/// Rule (TTL): a bodyless `Resource` with a TTL refreshes the resource a client holds. Clients
/// holding the body keep receiving the origin's heartbeats; a client that connects after
/// heartbeats replaced nothing in the cache gets the bodies. Every origin mode, every client kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_heartbeats_reach_clients_and_never_replace_cached_bodies() {
    for mode in ORIGIN_MODES {
        let origin = OriginProcess::start(&["--clusters", "2", "--ttl", "30s", "--heartbeat-interval", "300ms"]);
        let relay = relay_with_mode(&origin, mode);
        let who = |variant: &str| format!("{variant} client, {mode} origin");
        let early = EveryClient::connect(&relay, "ttl-early").await;
        early.subscribe(xds::CLUSTER, &[]).await;
        for (variant, c) in &early.sotw {
            eventually(&format!("{}: heartbeats keep coming", who(variant)), SOON, || {
                let counts = c.heartbeats(xds::CLUSTER);
                (counts.get("cluster_0") >= Some(&2) && counts.get("cluster_1") >= Some(&2)).then_some(())
            })
            .await;
            let first = c.history().into_iter().find(|r| r.type_url == xds::CLUSTER).unwrap();
            assert!(first.all_unwrapped().iter().all(|u| u.body.is_some() && u.ttl == Some(Duration::from_secs(30))));
        }
        for (variant, c) in &early.delta {
            eventually(&format!("{}: heartbeats keep coming", who(variant)), SOON, || {
                let counts = c.heartbeats(xds::CLUSTER);
                (counts.get("cluster_0") >= Some(&2) && counts.get("cluster_1") >= Some(&2)).then_some(())
            })
            .await;
            assert_eq!(c.resources(xds::CLUSTER).len(), 2, "{}: heartbeats keep what it holds", who(variant));
        }

        // Heartbeats have been flowing: a client connecting now gets the bodies.
        let late = EveryClient::connect(&relay, "ttl-late").await;
        late.subscribe(xds::CLUSTER, &[]).await;
        for (variant, c) in &late.sotw {
            let first = c.wait_for(xds::CLUSTER, SOON, |_| true).await.unwrap();
            let unwrapped = first.all_unwrapped();
            assert_eq!(unwrapped.len(), 2, "{}", who(variant));
            assert!(
                unwrapped.iter().all(|u| u.body.is_some()),
                "{}: bodies, not heartbeats: {unwrapped:?}",
                who(variant)
            );
        }
        for (variant, c) in &late.delta {
            let first = c.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
            assert!(first.resources.iter().all(|r| r.resource.is_some()), "{}: bodies first", who(variant));
            assert_eq!(first.resources.len(), 2, "{}", who(variant));
        }
        let metrics = relay.admin_get("/metrics").unwrap();
        assert!(metrics.contains("xds_relay_protocol_extras_total{type=\"cds\",extra=\"heartbeat\"}"), "{metrics}");
    }
}

/// Rule (`Resource.cache_control.do_not_cache`): a caching proxy must not serve such a
/// resource from cache to a later client. A client asking after it arrived gets it from a
/// fresh origin fetch (the origin sees a new stream); a key without such resources is served
/// from cache. Every origin mode, every client kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_not_cache_resources_are_fetched_fresh_for_later_clients() {
    for mode in ORIGIN_MODES {
        let origin = OriginProcess::start(&["--clusters", "2", "--do-not-cache", "cluster_1"]);
        let relay = relay_with_mode(&origin, mode);
        let who = |variant: &str| format!("{variant} client, {mode} origin");
        let first = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("dnc-first", "staging")).await.unwrap();
        first.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        first.subscribe(xds::ENDPOINT, strings(&["cluster_0"])).await.unwrap();
        let cds = first.wait_for(xds::CLUSTER, SOON, |r| r.resources.len() == 2).await.unwrap();
        assert!(cds.unwrapped("cluster_1").unwrap().do_not_cache, "the flag reaches the client");
        first.wait_for(xds::ENDPOINT, SOON, |r| !r.resources.is_empty()).await.unwrap();
        let dump = relay.admin_json("/cache/staging_cds");
        assert_eq!(dump["Cache"][0]["Resp"]["DoNotCache"][0], "cluster_1", "{dump}");

        // A later client of the cacheable EDS key is served from cache: no origin stream.
        let before = origin_streams_total(&origin);
        let eds = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("dnc-eds", "staging")).await.unwrap();
        eds.subscribe(xds::ENDPOINT, strings(&["cluster_0"])).await.unwrap();
        eds.wait_for(xds::ENDPOINT, SOON, |r| !r.resources.is_empty()).await.unwrap();
        assert_eq!(origin_streams_total(&origin), before, "{mode}: a cacheable key is served from cache");

        // Later clients of the CDS key, all at once: answered from one fresh fetch, never
        // from cache.
        let late = EveryClient::connect(&relay, "dnc-late").await;
        let before = origin_streams_total(&origin);
        late.subscribe(xds::CLUSTER, &[]).await;
        for (variant, c) in &late.sotw {
            let cds = c.wait_for(xds::CLUSTER, SOON, |r| r.resources.len() == 2).await.unwrap();
            assert!(cds.unwrapped("cluster_1").unwrap().do_not_cache, "{}", who(variant));
        }
        for (variant, c) in &late.delta {
            let state = c.wait_for_state(xds::CLUSTER, SOON, |s| s.len() == 2).await.unwrap();
            assert!(state.contains_key("cluster_1"), "{}", who(variant));
        }
        let fetches = origin_streams_total(&origin) - before;
        assert!((1..=4).contains(&fetches), "{mode}: late clients answered from fresh fetches, coalesced: {fetches}");
        // The earlier client saw nothing new from the refetches (same content, same version).
        let cds_responses = first.history().iter().filter(|r| r.type_url == xds::CLUSTER).count();
        assert_eq!(cds_responses, 1, "{mode}: clients that have the resources get nothing again");
        let metrics = relay.admin_get("/metrics").unwrap();
        assert!(metrics.contains("extra=\"do_not_cache_wait\""), "{metrics}");
    }
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

/// Rule (`do_not_cache`), with the origin down: a client asking later waits (it is never sent
/// a partial CDS without the resource, nor the cached copy), nobody is disconnected, and it is
/// served once the origin is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_not_cache_late_clients_wait_while_the_origin_is_down() {
    let flags = ["--clusters", "2", "--do-not-cache", "cluster_1"];
    let mut origin = OriginProcess::start(&flags);
    let relay = relay_with_mode(&origin, "GRPC");
    let first =
        SotwClient::connect(&relay.endpoint(), Transport::Ads, node("dnc-down-first", "staging")).await.unwrap();
    first.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    first.wait_for(xds::CLUSTER, SOON, |r| r.resources.len() == 2).await.unwrap();

    origin.process.kill();
    let late = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("dnc-down-late", "staging")).await.unwrap();
    late.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let waited = late.wait_for(xds::CLUSTER, Duration::from_secs(4), |_| true).await;
    assert!(waited.is_err(), "nothing while the origin is down: {:?}", late.history());
    assert!(first.ended().is_none() && late.ended().is_none(), "nobody is disconnected");

    let origin = origin.restart(&flags[..]);
    let cds = late.wait_for(xds::CLUSTER, SOON, |r| r.resources.len() == 2).await.unwrap();
    assert!(cds.unwrapped("cluster_1").unwrap().do_not_cache);
    assert_eq!(late.history().iter().filter(|r| r.type_url == xds::CLUSTER).count(), 1, "one whole CDS");
    drop(origin);
}
