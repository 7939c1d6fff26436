//! On-demand subscriptions (ODCDS/VHDS style: a delta client names a resource mid-stream):
//! the first client's name reaches the origin through the key's union subscription; a second
//! client of the same key naming it later is answered from the cache, with no new request to
//! the origin and no new origin version. Real origin and relay processes on loopback, every
//! origin mode.

use crate::support;

use crate::support::{OriginProcess, RelayProcess, SOON, eventually};
use xds_relay::xds;
use xds_relay_example::client::{Transport, node};
use xds_relay_example::delta_client::DeltaClient;

const ORIGIN_MODES: [&str; 4] = ["GRPC", "AGGREGATED_GRPC", "DELTA_GRPC", "AGGREGATED_DELTA_GRPC"];

/// Requests and ACKs the origin has received since it started.
fn origin_requests(origin: &OriginProcess) -> (u64, u64) {
    let stats = origin.stats();
    (stats["requests_total"].as_u64().unwrap_or(0), stats["acks"].as_u64().unwrap_or(0))
}

/// Waits until the origin's request count holds still across two reads a moment apart and
/// returns it (the relay's ACK of the last answer has arrived).
async fn settled_requests(origin: &OriginProcess, acks_at_least: u64) -> u64 {
    let mut last = None;
    eventually("the origin's request count to settle", SOON, || {
        let (requests, acks) = origin_requests(origin);
        let settled = acks >= acks_at_least && last == Some(requests);
        last = Some(requests);
        settled.then_some(requests)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_asked_on_demand_by_a_second_client_is_served_from_the_cache() {
    let origin = OriginProcess::start(&[]);
    for mode in ORIGIN_MODES {
        let relay = RelayProcess::start(&support::bootstrap_yaml(
            &[origin.xds],
            &format!("  api_type: {mode}\n"),
            "  ttl: 60s",
        ));
        let (_, acks_before) = origin_requests(&origin);
        let first = DeltaClient::connect(&relay.endpoint(), Transport::Ads, node("odcds-1", "staging")).await.unwrap();
        first.subscribe(xds::CLUSTER, vec!["cluster_1".into()]).await.unwrap();
        let got = first.wait_for_state(xds::CLUSTER, SOON, |s| s.contains_key("cluster_1")).await.unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["cluster_1"], "{mode}: only the name asked for");
        let version = first.latest(xds::CLUSTER).unwrap().system_version_info;
        let before = settled_requests(&origin, acks_before + 1).await;
        let (_, acks) = origin_requests(&origin);

        // A second client of the same key asks for the same name on demand.
        let second =
            DeltaClient::connect(&relay.endpoint(), Transport::PerType, node("odcds-2", "staging")).await.unwrap();
        second.subscribe(xds::CLUSTER, vec!["cluster_1".into()]).await.unwrap();
        second.wait_for_state(xds::CLUSTER, SOON, |s| s.contains_key("cluster_1")).await.unwrap();
        let answer = second.latest(xds::CLUSTER).unwrap();
        assert_eq!(answer.system_version_info, version, "{mode}: answered at the cached version");
        assert_eq!(origin.version(), version, "{mode}: the origin published nothing meanwhile");
        assert_eq!(answer.resources.len(), 1, "{mode}: {answer:?}");
        assert_eq!(
            second.resources(xds::CLUSTER),
            first.resources(xds::CLUSTER),
            "{mode}: both clients hold the same version of cluster_1"
        );

        // A name nobody asked for yet does reach the origin: one request and one ACK, after
        // which the count is exactly two more than before the cached answer above (so that
        // answer cost the origin no request).
        second.subscribe(xds::CLUSTER, vec!["cluster_2".into()]).await.unwrap();
        second.wait_for_state(xds::CLUSTER, SOON, |s| s.contains_key("cluster_2")).await.unwrap();
        let after = settled_requests(&origin, acks + 1).await;
        assert_eq!(after, before + 2, "{mode}: the cached answer sent nothing upstream");
        assert_eq!(
            first.resources(xds::CLUSTER).keys().collect::<Vec<_>>(),
            ["cluster_1"],
            "{mode}: the first client is not sent names it did not ask for"
        );
        first.close();
        second.close();
        drop(relay);
        // The relay's stream ends before the next mode starts counting.
        eventually("the relay's origin stream to close", SOON, || {
            (origin.stats()["streams_open"].as_u64() == Some(0)).then_some(())
        })
        .await;
    }
}
