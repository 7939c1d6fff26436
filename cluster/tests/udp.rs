//! Real UDP gossip on 127.0.0.1 with the default settings (200 ms gossip, default failure
//! detector): how long a cluster takes to converge, and to act on a dead node.
//!
//! These run on the real clock, so the printed times are what an operator would see (on a
//! loaded machine they grow; the assertions leave room for that).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{config, free_udp_addr, ring_is, wait_all};
use tokio::time::Instant;
use xds_relay_cluster::{Cluster, NodeState};

/// Detection must stay under this, whatever the machine load.
const DETECTION_BOUND: Duration = Duration::from_secs(10);

/// Starts `names` on free ports, seeded with the first node, each set ready right after
/// joining; returns them once every node sees all of them on the ring, with the time it took.
async fn start_ready(names: &[&str]) -> (Vec<Cluster>, Duration) {
    let addrs: Vec<SocketAddr> = names.iter().map(|_| free_udp_addr()).collect();
    let start = Instant::now();
    let mut nodes = Vec::new();
    for (name, addr) in names.iter().zip(&addrs) {
        let node = Cluster::join(config(name, *addr, &addrs[..1])).await.expect("join over udp");
        node.set_state(NodeState::Ready).await;
        nodes.push(node);
    }
    let all: Vec<&Cluster> = nodes.iter().collect();
    wait_all(&all, Duration::from_secs(10), "every node on the ring", |v| ring_is(v, names)).await;
    (nodes, start.elapsed())
}

/// Drops the last node without draining and returns how long the others take to mark it dead
/// and take it off their ring.
async fn kill_last_and_measure(mut nodes: Vec<Cluster>, survivors_ring: &[&str]) -> Duration {
    let victim = nodes.pop().unwrap();
    let victim_name = victim.self_name().to_string();
    let start = Instant::now();
    // Abrupt: no draining state, no shutdown call; dropping the last handle stops gossip.
    drop(victim);
    let survivors: Vec<&Cluster> = nodes.iter().collect();
    wait_all(&survivors, DETECTION_BOUND * 2, "the dead node off the ring", |v| {
        ring_is(v, survivors_ring) && v.member(&victim_name).is_some_and(|m| !m.alive)
    })
    .await;
    let detected = start.elapsed();
    for node in nodes {
        tokio::time::timeout(Duration::from_secs(5), node.shutdown()).await.expect("bounded shutdown");
    }
    detected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_and_drop_a_dead_node() {
    let (nodes, converged) = start_ready(&["a", "b", "c"]).await;
    println!("udp: 3 nodes joined and converged in {converged:?}");

    let detected = kill_last_and_measure(nodes, &["a", "b"]).await;
    println!("udp: dead node (killed right after joining) off the ring in {detected:?}");
    assert!(detected < DETECTION_BOUND, "dead node detected in {detected:?}");
}

/// Re-measures detection for nodes that lived longer before dying (the failure detector then
/// has real heartbeat samples instead of its prior). About 90 s; run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, about 90 s"]
async fn measure_detection_by_node_age() {
    for age in [0, 2, 5, 10, 30] {
        let (nodes, converged) = start_ready(&["a", "b", "c"]).await;
        tokio::time::sleep(Duration::from_secs(age)).await;
        let detected = kill_last_and_measure(nodes, &["a", "b"]).await;
        println!("udp: converged in {converged:?}; node dead after {age:>2} s of life, detected in {detected:?}");
    }
}

/// Lossy real UDP: with 20% of datagrams dropped, no member may flap for 30 s right after
/// joining (the riskiest time: the failure detector still leans on its prior). Run with
/// `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, about 30 s"]
async fn stable_under_udp_message_loss() {
    use chitchat::transport::{TransportExt, UdpTransport};
    let transport = UdpTransport.drop_message(0.2);
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_udp_addr()).collect();
    let mut nodes = Vec::new();
    for (name, addr) in ["a", "b", "c"].iter().zip(&addrs) {
        let node = Cluster::join_with_transport(config(name, *addr, &addrs[..1]), &*transport).await.unwrap();
        node.set_state(NodeState::Ready).await;
        nodes.push(node);
    }
    let all: Vec<&Cluster> = nodes.iter().collect();
    wait_all(&all, Duration::from_secs(10), "every node on the ring", |v| ring_is(v, &["a", "b", "c"])).await;
    let versions: Vec<u64> = nodes.iter().map(|n| n.view().version).collect();
    let mut watches: Vec<_> = nodes.iter().map(Cluster::watch).collect();
    for watch in &mut watches {
        watch.borrow_and_update();
    }
    let changed = tokio::time::timeout(Duration::from_secs(30), async {
        futures_util::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed()))).await.2
    })
    .await;
    assert!(changed.is_err(), "a view changed under loss: {:#?}", nodes.iter().map(Cluster::view).collect::<Vec<_>>());
    assert_eq!(nodes.iter().map(|n| n.view().version).collect::<Vec<_>>(), versions);
}
