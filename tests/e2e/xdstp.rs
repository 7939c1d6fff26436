//! xDS-TP1 `xdstp://` names through the relay, end to end: real origin (publishing the
//! `xdstp://` copies of its clusters and CLAs) and relay processes on loopback, the example
//! state-of-the-world and delta clients, every origin mode.
//!
//! - exact `xdstp://` names and glob collections (`.../fleet/*`) are asked upstream as the
//!   clients wrote them and answered with every member;
//! - the order of context parameters does not matter: two spellings are one name, sent
//!   under the origin's (canonical) spelling;
//! - members joining and leaving a collection reach every subscriber;
//! - an empty collection is answered on delta streams with the glob's removal.

use crate::support;

use crate::support::{OriginProcess, RelayProcess, SOON};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;

const ORIGIN_MODES: [&str; 4] = ["GRPC", "AGGREGATED_GRPC", "DELTA_GRPC", "AGGREGATED_DELTA_GRPC"];
const AUTHORITY: &str = "fleet.example";

fn cds(id: &str) -> String {
    format!("xdstp://{AUTHORITY}/envoy.config.cluster.v3.Cluster/{id}")
}

fn eds(id: &str) -> String {
    format!("xdstp://{AUTHORITY}/envoy.config.endpoint.v3.ClusterLoadAssignment/{id}")
}

fn relay_with_mode(origin: &OriginProcess, mode: &str) -> RelayProcess {
    RelayProcess::start(&support::bootstrap_yaml(&[origin.xds], &format!("  api_type: {mode}\n"), "  ttl: 60s"))
}

fn keys(map: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    map.keys().cloned().collect()
}

/// Glob collections and exact names, on delta and state-of-the-world streams, from every
/// origin mode; membership changes follow the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_collections_and_exact_names_reach_every_client() {
    let origin = OriginProcess::start(&["--xdstp-authority", AUTHORITY]);
    let members = |n: usize| (0..n).map(|i| cds(&format!("fleet/cluster_{i}"))).collect::<Vec<_>>();
    for mode in ORIGIN_MODES {
        let relay = relay_with_mode(&origin, mode);
        let glob = cds("fleet/*");

        let delta =
            DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("tp1-delta", "staging")).await.unwrap();
        delta.subscribe(xds::CLUSTER, vec![glob.clone()]).await.unwrap();
        let held = delta.wait_for_state(xds::CLUSTER, SOON, |s| s.len() == 3).await.unwrap();
        assert_eq!(keys(&held), members(3), "{mode}: the delta glob gets every member and nothing else");

        let sotw =
            SotwClient::connect(&relay.endpoint(), Transport::PerType, node("tp1-sotw", "staging")).await.unwrap();
        sotw.subscribe(xds::CLUSTER, vec![glob.clone()]).await.unwrap();
        let got = sotw.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
        let mut names: Vec<String> = got.names().into_iter().map(str::to_owned).collect();
        names.sort();
        assert_eq!(names, members(3), "{mode}: the state-of-the-world glob gets every member");

        // An exact xdstp name of another type, on the same delta stream.
        delta.subscribe(xds::ENDPOINT, vec![eds("fleet/cluster_1")]).await.unwrap();
        let cla = delta.wait_for_state(xds::ENDPOINT, SOON, |s| !s.is_empty()).await.unwrap();
        assert_eq!(keys(&cla), [eds("fleet/cluster_1")], "{mode}");

        // The members leave (the origin stops publishing the authority), then join again.
        post_extras(&origin, "{}");
        delta.wait_for_state(xds::CLUSTER, SOON, |s| s.is_empty()).await.unwrap();
        sotw.wait_for(xds::CLUSTER, SOON, |r| r.resources.is_empty()).await.unwrap();
        post_extras(&origin, &format!(r#"{{"xdstp_authority": "{AUTHORITY}"}}"#));
        delta.wait_for_state(xds::CLUSTER, SOON, |s| keys(s) == members(3)).await.unwrap();
        sotw.wait_for(xds::CLUSTER, SOON, |r| r.resources.len() == 3).await.unwrap();
        if !mode.contains("DELTA") {
            // A state-of-the-world origin answers every CDS request, so the relay knows the
            // collection is empty; a delta origin sends nothing for it (the client waits).
            let empty = cds("nothing/*");
            delta.subscribe(xds::CLUSTER, vec![empty.clone()]).await.unwrap();
            delta
                .wait_for(xds::CLUSTER, SOON, |r| r.removed.contains(&empty))
                .await
                .unwrap_or_else(|e| panic!("{mode}: the empty collection is answered: {e}"));
            assert_eq!(keys(&delta.resources(xds::CLUSTER)), members(3), "{mode}: the other glob's members stay");
        }
        // Two spellings of one name (context parameters in another order) are one name: both
        // clients get the resource, under the canonical spelling the origin names it by.
        let d2 = DeltaClient::connect(&relay.endpoint(), Transport::PerType, node("tp1-d2", "staging")).await.unwrap();
        d2.subscribe(xds::CLUSTER, vec![cds("fleet/cluster_0?zone=b&env=a")]).await.unwrap();
        delta.subscribe(xds::CLUSTER, vec![cds("fleet/cluster_0?env=a&zone=b")]).await.unwrap();
        let canonical = cds("fleet/cluster_0?env=a&zone=b");
        for client in [&d2, &delta] {
            client
                .wait_for_state(xds::CLUSTER, SOON, |s| s.contains_key(&canonical))
                .await
                .unwrap_or_else(|e| panic!("{mode}: {e}"));
        }
        assert_eq!(d2.resources(xds::CLUSTER)[&canonical], delta.resources(xds::CLUSTER)[&canonical], "{mode}");
        d2.close();
        delta.close();
        sotw.close();
    }
}

/// Replaces the origin's extras (which publishes a new version).
fn post_extras(origin: &OriginProcess, json: &str) {
    let url = format!("http://{}/extras", origin.stats);
    let response = ureq::post(&url).header("content-type", "application/json").send(json);
    let status = response.map(|r| r.status().as_u16()).unwrap_or_else(|e| panic!("POST {url}: {e}"));
    assert_eq!(status, 200, "POST {url} {json}");
}

/// Rules keyed by the `xdstp://` authority (`resource_names_fragment.xdstp_authority`):
/// clients of one authority share a key; other names fall through to the next rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_by_xdstp_authority() {
    let origin = OriginProcess::start(&["--xdstp-authority", AUTHORITY]);
    let dir = support::tempdir::Dir::new("tp1-rules");
    let rules = dir.0.join("rules.yaml");
    std::fs::write(
        &rules,
        "fragments:
  - rules:
      - {match: {any_match: true}, result: {string_fragment: cds}}
  - rules:
      - match: {any_match: true}
        result: {and_result: {result_predicates: [{string_fragment: 'auth_'}, {resource_names_fragment: {element: 0, xdstp_authority: true, action: {exact: true}}}]}}
      - {match: {any_match: true}, result: {string_fragment: legacy}}
",
    )
    .unwrap();
    // The relay is started with the example rules; the wrapper replaces them with these.
    let script = format!("exec \"$0\" \"$1\" \"$2\" -a '{}'", rules.display());
    let relay = RelayProcess::start_under(
        &support::bootstrap_yaml(&[origin.xds], "", "  ttl: 60s"),
        &["sh", "-c", script.as_str()],
    );
    let tp1 = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("tp1-key", "staging")).await.unwrap();
    tp1.subscribe(xds::CLUSTER, vec![cds("fleet/*")]).await.unwrap();
    tp1.wait_for_state(xds::CLUSTER, SOON, |s| s.len() == 3).await.unwrap();
    let plain = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("plain-key", "staging")).await.unwrap();
    plain.subscribe(xds::CLUSTER, vec!["cluster_1".into()]).await.unwrap();
    plain.wait_for_state(xds::CLUSTER, SOON, |s| s.contains_key("cluster_1")).await.unwrap();
    let keys = relay.admin_json("/cache/keys")["Names"].clone();
    let mut keys: Vec<String> = serde_json::from_value(keys).unwrap();
    keys.sort();
    assert_eq!(keys, [format!("cds_auth_{AUTHORITY}"), "cds_legacy".to_owned()]);
}
