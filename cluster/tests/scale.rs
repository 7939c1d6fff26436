//! Key movement at cluster scale: 20 members over chitchat's in-memory `ChannelTransport` on
//! paused tokio time, then a 21st joins.
//!
//! The owners are a function of the ring members alone, so the fraction of keys that moves is
//! deterministic once every member has converged; nothing here is timed.

mod support;

use std::time::Duration;

use chitchat::transport::ChannelTransport;
use support::{config, local, owners, wait_all};
use xds_relay_cluster::{Cluster, ClusterView, NodeState, ownership_changes};

const MEMBERS: usize = 20;
const KEYS: usize = 10_000;
const WITHIN: Duration = Duration::from_secs(120);

fn name(index: usize) -> String {
    format!("relay-{index:02}")
}

/// Joins member `index` on port 10001 + index, seeded with the first three members, and makes
/// it ready.
async fn join_ready(transport: &ChannelTransport, index: usize) -> Cluster {
    let seeds = [local(10_001), local(10_002), local(10_003)];
    let cluster = Cluster::join_with_transport(config(&name(index), local(10_001 + index as u16), &seeds), transport)
        .await
        .unwrap();
    cluster.set_state(NodeState::Ready).await;
    cluster
}

fn ring_holds(view: &ClusterView, count: usize) -> bool {
    view.ring.members().iter().cloned().eq((0..count).map(name))
}

#[tokio::test(start_paused = true)]
async fn a_join_moves_about_one_in_n_plus_one_keys_and_only_to_the_newcomer() {
    let transport = ChannelTransport::default();
    let mut nodes = Vec::new();
    for index in 0..MEMBERS {
        nodes.push(join_ready(&transport, index).await);
    }
    wait_all(&nodes.iter().collect::<Vec<_>>(), WITHIN, "20 members on every ring", |v| ring_holds(v, MEMBERS)).await;
    let before = nodes[0].view();

    nodes.push(join_ready(&transport, MEMBERS).await);
    wait_all(&nodes.iter().collect::<Vec<_>>(), WITHIN, "21 members on every ring", |v| ring_holds(v, MEMBERS + 1))
        .await;
    let after = nodes[0].view();

    let keys = support::keys(KEYS);
    let reference = owners(&after, &keys);
    for node in &nodes {
        assert_eq!(owners(&node.view(), &keys), reference, "{} disagrees on owners", node.self_name());
    }
    let changes = ownership_changes(&before.ring, &after.ring, keys.iter().map(String::as_str));
    let newcomer = name(MEMBERS);
    assert!(
        changes.iter().all(|c| c.to.as_deref() == Some(newcomer.as_str())),
        "a join moves keys only to the newcomer"
    );
    let moved = changes.len() as f64 / KEYS as f64;
    let ideal = 1.0 / (MEMBERS + 1) as f64;
    println!("a join to {} members moved {} of {KEYS} keys ({moved:.4}; ideal {ideal:.4})", MEMBERS + 1, changes.len());
    assert!(moved < 3.0 * ideal, "moved {moved}, more than 3/(N+1) = {}", 3.0 * ideal);
    assert!(moved > ideal / 3.0, "moved {moved}, less than 1/(3(N+1)) = {}", ideal / 3.0);
}
