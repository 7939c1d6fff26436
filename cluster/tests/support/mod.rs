//! Test support shared by the cluster test binaries: configs, keys, and polling a node's view
//! until a predicate holds (no bare sleeps: every wait is a watch with a deadline).
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use xds_relay_cluster::{Cluster, ClusterConfig, ClusterView};

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A free UDP port on 127.0.0.1: chitchat needs the real port to advertise, so bind port 0,
/// read the port, and release it.
pub fn free_udp_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind(local(0)).expect("bind 127.0.0.1:0");
    socket.local_addr().expect("local addr")
}

/// A default config for `name` gossiping on `gossip`, with `seeds`. The peer and admin
/// addresses are derived from the gossip port, so tests can check they are gossiped.
pub fn config(name: &str, gossip: SocketAddr, seeds: &[SocketAddr]) -> ClusterConfig {
    let mut config = ClusterConfig::defaults_for(
        name,
        "xds-relay-test",
        gossip,
        peer_addr_for(gossip),
        SocketAddr::new(gossip.ip(), gossip.port().wrapping_add(2_000)),
    );
    config.seeds = seeds.iter().map(SocketAddr::to_string).collect();
    config
}

/// The peer address [`config`] gossips for a node on `gossip`.
pub fn peer_addr_for(gossip: SocketAddr) -> SocketAddr {
    SocketAddr::new(gossip.ip(), gossip.port().wrapping_add(1_000))
}

/// Sample aggregation keys.
pub fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("key-{i}")).collect()
}

/// The owner of every key in `view`.
pub fn owners(view: &ClusterView, keys: &[String]) -> Vec<Option<String>> {
    keys.iter().map(|k| view.ring.owner(k).map(str::to_string)).collect()
}

/// Whether `view`'s ring holds exactly `names`.
pub fn ring_is(view: &ClusterView, names: &[&str]) -> bool {
    view.ring.members().iter().map(String::as_str).eq(names.iter().copied())
}

/// Waits until `predicate` holds for `cluster`'s view, and returns that view with the time it
/// took. Panics after `within`, showing the last view.
pub async fn wait_for(
    cluster: &Cluster,
    within: Duration,
    what: &str,
    predicate: impl Fn(&ClusterView) -> bool,
) -> (Arc<ClusterView>, Duration) {
    let start = Instant::now();
    let mut views = cluster.watch();
    let waited = tokio::time::timeout(within, async {
        loop {
            let view = views.borrow_and_update().clone();
            if predicate(&view) {
                return view;
            }
            views.changed().await.expect("the cluster handle is alive");
        }
    })
    .await;
    match waited {
        Ok(view) => (view, start.elapsed()),
        Err(_) => {
            panic!("{} did not see {what} within {within:?}; last view: {:#?}", cluster.self_name(), cluster.view())
        }
    }
}

/// Waits until every cluster in `clusters` satisfies `predicate`; returns the time it took.
pub async fn wait_all(
    clusters: &[&Cluster],
    within: Duration,
    what: &str,
    predicate: impl Fn(&ClusterView) -> bool + Copy,
) -> Duration {
    let start = Instant::now();
    for cluster in clusters {
        let left = within.saturating_sub(start.elapsed());
        wait_for(cluster, left, what, predicate).await;
    }
    start.elapsed()
}

/// Polls `condition` every 50 ms until it holds, for values that change without a new view
/// version (heartbeat ages, extra values). Panics after `within`.
pub async fn poll_until(within: Duration, what: &str, condition: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    let polled = tokio::time::timeout(within, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(polled.is_ok(), "{what} did not happen within {within:?}");
    start.elapsed()
}
