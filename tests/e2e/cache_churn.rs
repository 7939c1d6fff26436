//! Keys churned through a relay with a small cache (short TTL, low `max_entries`), real
//! processes on loopback: afterwards the origin holds exactly one stream per key that still
//! has clients (no stream left behind for an evicted entry), and every live client gets the
//! next version (no client left on an entry whose source was stopped).

use crate::support::{OriginProcess, RelayProcess, SOON, bootstrap_yaml, eventually};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

/// Keys churned in total, and how many connect at once.
const CHURNED: usize = 1_000;
const AT_ONCE: usize = 50;
/// Distinct keys among the churned ones (each is visited several times: as a new key and as
/// an existing, possibly idle, possibly expiring one).
const DISTINCT: usize = 400;
/// Keys with a client for the whole test (among the churned ones).
const LIVE: usize = 10;

/// Node cluster `c{i}-x`: the example rules make its CDS key `c{i}_cds`.
fn cluster_of(i: usize) -> String {
    format!("c{i}-x")
}

async fn client(relay: &RelayProcess, id: &str, cluster: &str) -> SotwClient {
    let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node(id, cluster)).await.expect("connect");
    c.subscribe(xds::CLUSTER, vec![]).await.expect("subscribe");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churned_keys_leave_no_origin_stream_behind_and_live_clients_keep_getting_versions() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::start(&bootstrap_yaml(&[origin.xds], "", "  ttl: 1s\n  max_entries: 50"));
    let version = origin.version();

    let mut live = Vec::new();
    for i in 0..LIVE {
        let c = client(&relay, &format!("live-{i}"), &cluster_of(i)).await;
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.expect("live client served");
        live.push(c);
    }

    // Batches of clients connect at once, get their key's state, and leave; the next batch
    // starts while the relay still evicts and stops the previous ones' sources.
    for batch in 0..CHURNED / AT_ONCE {
        let tasks: Vec<_> = (0..AT_ONCE)
            .map(|j| {
                let i = (batch * AT_ONCE + j) * 7 % DISTINCT;
                let endpoint = relay.endpoint();
                let version = version.clone();
                tokio::spawn(async move {
                    let c = SotwClient::connect(
                        &endpoint,
                        Transport::Ads,
                        node(&format!("churn-{batch}-{j}"), &cluster_of(i)),
                    )
                    .await
                    .expect("connect");
                    c.subscribe(xds::CLUSTER, vec![]).await.expect("subscribe");
                    c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.expect("churned client served");
                    c.close();
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("churn task");
        }
    }

    // Once the idle keys expire, the origin holds one stream per key with clients, and the
    // relay's cache holds just those keys.
    let settled = eventually("origin streams == keys with clients", SOON, || {
        let streams = origin.open_streams_for(xds::CLUSTER);
        let keys = relay.admin_json("/cache/keys")["Names"].as_array().map_or(usize::MAX, Vec::len);
        (streams == LIVE as u64 && keys == LIVE).then_some((streams, keys))
    })
    .await;
    assert_eq!(settled, (LIVE as u64, LIVE));
    assert_eq!(origin.stats()["streams_open"], LIVE as u64, "no stream of another type either");

    let next = origin.publish();
    for (i, c) in live.iter().enumerate() {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next)
            .await
            .unwrap_or_else(|e| panic!("live client {i} did not get the next version: {e}"));
        assert!(c.ended().is_none(), "live client {i} was disconnected: {:?}", c.ended());
    }
    // The origin saw far more streams than keys: the churn did exercise eviction.
    let total = origin.stats()["streams_total"].as_u64().unwrap();
    assert!(total > DISTINCT as u64, "only {total} origin streams opened: the cache did not evict");
}
