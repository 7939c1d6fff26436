//! In-process clusters over chitchat's in-memory `ChannelTransport`, on paused tokio time.
//!
//! Paused time makes these tests deterministic in their timing and independent of machine
//! load: gossip rounds, the failure detector (tokio `Instant`) and the waits all run on the
//! virtual clock, which tokio advances whenever every task is idle. Durations printed here
//! are virtual.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::{ChannelTransport, Transport, TransportExt};
use support::{config, keys, local, owners, peer_addr_for, poll_until, ring_is, wait_all, wait_for};
use xds_relay_cluster::{Cluster, ClusterError, NodeState};

const WITHIN: Duration = Duration::from_secs(30);

/// Starts nodes `names` on ports 10001.. of `transport`, all seeded with the first node.
async fn start(transport: &dyn Transport, names: &[&str]) -> Vec<Cluster> {
    let seed = local(10_001);
    let mut clusters = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let gossip = local(10_001 + i as u16);
        clusters.push(Cluster::join_with_transport(config(name, gossip, &[seed]), transport).await.unwrap());
    }
    clusters
}

async fn set_all(clusters: &[Cluster], state: NodeState) {
    for cluster in clusters {
        cluster.set_state(state).await;
    }
}

fn refs(clusters: &[Cluster]) -> Vec<&Cluster> {
    clusters.iter().collect()
}

/// Isolates `addr` from `others` (both directions), or heals it.
async fn cut(transport: &ChannelTransport, addr: SocketAddr, others: &[SocketAddr], heal: bool) {
    for other in others {
        if heal {
            transport.add_link(addr, *other).await;
        } else {
            transport.remove_link(addr, *other).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn three_nodes_converge_to_the_same_view_and_owners() {
    let transport = ChannelTransport::default();
    let nodes = start(&transport, &["a", "b", "c"]).await;
    set_all(&nodes, NodeState::Ready).await;

    let took = wait_all(&refs(&nodes), WITHIN, "ring a,b,c", |v| ring_is(v, &["a", "b", "c"])).await;
    println!("3 nodes converged in {took:?} (virtual)");

    let keys = keys(1_000);
    let views: Vec<_> = nodes.iter().map(Cluster::view).collect();
    for (node, view) in nodes.iter().zip(&views) {
        assert_eq!(owners(view, &keys), owners(&views[0], &keys), "{} disagrees on owners", node.self_name());
        assert_eq!(view.members.len(), 3);
        for member in &view.members {
            assert!(member.alive && member.state == NodeState::Ready);
            assert_eq!(member.is_self, member.name == node.self_name());
            assert_eq!(member.peer_addr, Some(peer_addr_for(member.gossip_addr)));
            assert!(member.admin_addr.is_some());
        }
        let owner = view.owner("key-1").unwrap();
        assert_eq!(Some(owner.name.as_str()), view.ring.owner("key-1"));
        assert_eq!(view.self_member().name, node.self_name());
    }
    assert!(nodes[1].generation() > nodes[0].generation());
}

#[tokio::test(start_paused = true)]
async fn state_transitions_move_a_node_on_and_off_the_ring() {
    let transport = ChannelTransport::default();
    let nodes = start(&transport, &["a", "b", "c"]).await;
    let all = refs(&nodes);
    nodes[0].set_state(NodeState::Ready).await;
    nodes[1].set_state(NodeState::Ready).await;

    // c is alive and known everywhere, but joining: not on the ring.
    wait_all(&all, WITHIN, "c joining, ring a,b", |v| {
        ring_is(v, &["a", "b"]) && v.member("c").is_some_and(|c| c.alive && c.state == NodeState::Joining)
    })
    .await;

    // The local view reflects a state change at once, before any gossip round.
    nodes[2].set_state(NodeState::Ready).await;
    wait_for(&nodes[2], Duration::from_millis(1), "itself ready", |v| ring_is(v, &["a", "b", "c"])).await;
    wait_all(&all, WITHIN, "ring a,b,c", |v| ring_is(v, &["a", "b", "c"])).await;

    // Draining: off the ring everywhere, still a live member.
    let version_before = nodes[0].view().version;
    nodes[2].set_state(NodeState::Draining).await;
    wait_all(&all, WITHIN, "c draining, ring a,b", |v| {
        ring_is(v, &["a", "b"]) && v.member("c").is_some_and(|c| c.alive && c.state == NodeState::Draining)
    })
    .await;
    assert!(nodes[0].view().version > version_before);
}

#[tokio::test(start_paused = true)]
async fn partition_splits_the_ring_and_healing_merges_it() {
    let transport = ChannelTransport::default();
    let nodes = start(&transport, &["a", "b", "c"]).await;
    set_all(&nodes, NodeState::Ready).await;
    wait_all(&refs(&nodes), WITHIN, "ring a,b,c", |v| ring_is(v, &["a", "b", "c"])).await;
    // Let the failure detector sample real heartbeat intervals before cutting.
    tokio::time::sleep(Duration::from_secs(10)).await;

    let (a, b, c) = (local(10_001), local(10_002), local(10_003));
    cut(&transport, c, &[a, b], false).await;
    let majority = wait_all(&refs(&nodes[..2]), WITHIN, "c dead, ring a,b", |v| {
        ring_is(v, &["a", "b"]) && v.member("c").is_some_and(|c| !c.alive)
    })
    .await;
    // The minority side serves too: it drops the others and owns everything.
    let (minority_view, _) =
        wait_for(&nodes[2], WITHIN, "a and b dead, ring c", |v| ring_is(v, &["c"]) && v.live_members().count() == 1)
            .await;
    println!("partition detected by a and b in {majority:?} (virtual)");
    assert_eq!(minority_view.members.len(), 3, "dead members stay listed");
    assert_eq!(minority_view.owner("any-key").map(|m| m.name.as_str()), Some("c"));

    cut(&transport, c, &[a, b], true).await;
    let healed = wait_all(&refs(&nodes), WITHIN, "ring a,b,c again", |v| {
        ring_is(v, &["a", "b", "c"]) && v.live_members().count() == 3
    })
    .await;
    println!("partition healed in {healed:?} (virtual)");
    let keys = keys(500);
    let views: Vec<_> = nodes.iter().map(Cluster::view).collect();
    assert!(views.iter().all(|v| owners(v, &keys) == owners(&views[0], &keys)));
}

#[tokio::test(start_paused = true)]
async fn membership_stays_stable_under_message_loss() {
    const DROP_PROBABILITY: f64 = 0.2;
    let transport = ChannelTransport::default().drop_message(DROP_PROBABILITY);
    let nodes = start(&*transport, &["a", "b", "c"]).await;
    set_all(&nodes, NodeState::Ready).await;
    let took = wait_all(&refs(&nodes), WITHIN, "ring a,b,c", |v| ring_is(v, &["a", "b", "c"])).await;
    println!("converged with {DROP_PROBABILITY} message loss in {took:?} (virtual)");

    // Two virtual minutes of lossy gossip: no node may flap, so no view changes at all.
    let mut watches: Vec<_> = nodes.iter().map(Cluster::watch).collect();
    for watch in &mut watches {
        watch.borrow_and_update();
    }
    let versions: Vec<u64> = nodes.iter().map(|n| n.view().version).collect();
    let changed = tokio::time::timeout(Duration::from_secs(120), async {
        futures_util::future::select_all(watches.iter_mut().map(|w| Box::pin(w.changed()))).await.2
    })
    .await;
    if changed.is_ok() {
        panic!("a view changed under message loss: {:#?}", nodes.iter().map(Cluster::view).collect::<Vec<_>>());
    }
    assert_eq!(nodes.iter().map(|n| n.view().version).collect::<Vec<_>>(), versions);
    for node in &nodes {
        assert!(node.view().members.iter().all(|m| m.alive));
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_alone_do_not_fire_the_watch() {
    let transport = ChannelTransport::default();
    let nodes = start(&transport, &["a", "b"]).await;
    set_all(&nodes, NodeState::Ready).await;
    wait_all(&refs(&nodes), WITHIN, "ring a,b", |v| ring_is(v, &["a", "b"])).await;

    let mut watch = nodes[0].watch();
    assert!(watch.has_changed().unwrap(), "a new subscriber sees the current view at once");
    watch.borrow_and_update();
    let version = nodes[0].view().version;
    assert!(tokio::time::timeout(Duration::from_secs(30), watch.changed()).await.is_err());
    let view = nodes[0].view();
    assert_eq!(view.version, version);
    // ... while view() keeps the heartbeat age fresh.
    let age = view.member("b").unwrap().last_heartbeat_age_ms.expect("b's heartbeat was seen");
    assert!(age < 1_000, "heartbeat age {age} ms");
    assert_eq!(view.member("a").unwrap().last_heartbeat_age_ms, None, "no heartbeat age for self");

    // Extra values propagate, without a new version either.
    nodes[1].set_key("keys_owned", "42").await;
    poll_until(WITHIN, "b's extra value reaching a", || {
        nodes[0].view().member("b").is_some_and(|b| b.extra.get("keys_owned").map(String::as_str) == Some("42"))
    })
    .await;
    assert_eq!(nodes[0].view().version, version);
}

#[tokio::test(start_paused = true)]
async fn restarted_node_replaces_its_old_generation() {
    let transport = ChannelTransport::default();
    let mut nodes = start(&transport, &["a", "b", "c"]).await;
    set_all(&nodes, NodeState::Ready).await;
    wait_all(&refs(&nodes), WITHIN, "ring a,b,c", |v| ring_is(v, &["a", "b", "c"])).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // c crashes and comes back at once with the same name and address: a new generation.
    let old = nodes.pop().unwrap();
    let old_generation = old.generation();
    old.shutdown().await;
    let restarted =
        Cluster::join_with_transport(config("c", local(10_003), &[local(10_001)]), &transport).await.unwrap();
    assert!(restarted.generation() > old_generation);
    restarted.set_state(NodeState::Ready).await;
    nodes.push(restarted);

    let new_generation = nodes[2].generation();
    wait_all(&refs(&nodes), WITHIN, "c's new generation on the ring", |v| {
        ring_is(v, &["a", "b", "c"])
            && v.member("c").is_some_and(|c| c.generation == new_generation && c.alive)
            && v.members.len() == 3
    })
    .await;
    // And it stays that way once the old generation is declared dead.
    tokio::time::sleep(Duration::from_secs(20)).await;
    for node in &nodes {
        let view = node.view();
        assert!(ring_is(&view, &["a", "b", "c"]), "{}: {view:?}", node.self_name());
        assert_eq!(view.members.iter().filter(|m| m.name == "c").count(), 1);
        assert_eq!(view.member("c").unwrap().generation, new_generation);
    }
}

#[tokio::test(start_paused = true)]
async fn join_errors_and_bounded_shutdown() {
    let transport = ChannelTransport::default();
    let first = Cluster::join_with_transport(config("a", local(10_001), &[]), &transport).await.unwrap();
    // The address is taken.
    match Cluster::join_with_transport(config("b", local(10_001), &[]), &transport).await {
        Err(ClusterError::Transport { listen_addr, .. }) => assert_eq!(listen_addr, local(10_001)),
        other => panic!("expected a transport error, got {other:?}"),
    }
    // Invalid config is rejected before any socket is opened.
    let mut invalid = config("c", local(10_002), &[]);
    invalid.virtual_nodes = 0;
    assert!(matches!(
        Cluster::join_with_transport(invalid, &transport).await,
        Err(ClusterError::InvalidConfig { field: "virtual_nodes", .. })
    ));

    // A lone node is its own cluster; alone it owns every key once ready.
    let view = first.view();
    assert_eq!(view.members.len(), 1);
    assert!(view.ring.is_empty(), "joining: not on the ring");
    first.set_state(NodeState::Ready).await;
    wait_for(&first, WITHIN, "alone on the ring", |v| ring_is(v, &["a"])).await;

    let clone = first.clone();
    tokio::time::timeout(Duration::from_secs(5), first.shutdown()).await.expect("shutdown is bounded");
    assert!(ring_is(&clone.view(), &["a"]), "clones keep the last view");
    // The address is free again.
    Cluster::join_with_transport(config("b", local(10_001), &[]), &transport).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn verification_keeps_impostors_and_unverified_members_off_the_ring() {
    let transport = ChannelTransport::default();
    let verifying = |name: &str, port: u16| {
        let mut config = config(name, local(port), &[local(10_001)]);
        config.require_verified_peers = true;
        config
    };
    let a = Cluster::join_with_transport(verifying("a", 10_001), &transport).await.unwrap();
    let b = Cluster::join_with_transport(verifying("b", 10_002), &transport).await.unwrap();
    assert!(a.requires_verification());
    set_all(&[a.clone(), b.clone()], NodeState::Ready).await;
    // Each sees the other, unverified, off its ring.
    wait_for(&a, WITHIN, "b listed but unverified", |v| v.member("b").is_some_and(|m| m.alive && !m.verified)).await;
    assert!(ring_is(&a.view(), &["a"]));
    let b_member = a.view().member("b").unwrap().clone();
    // A mark for another peer address or generation does not verify b.
    a.mark_verified("b", b_member.generation, local(1));
    a.mark_verified("b", b_member.generation + 1, b_member.peer_addr.unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(ring_is(&a.view(), &["a"]));
    a.mark_verified("b", b_member.generation, b_member.peer_addr.unwrap());
    wait_for(&a, WITHIN, "b on a's ring", |v| ring_is(v, &["a", "b"])).await;

    // An impostor claims b's name with a newer generation from another address.
    let impostor = Cluster::join_with_transport(verifying("b", 10_003), &transport).await.unwrap();
    impostor.set_state(NodeState::Ready).await;
    let (view, _) = wait_for(&a, WITHIN, "impostor listed as unverified", |v| {
        v.unverified.iter().any(|m| m.name == "b" && m.generation == impostor.generation())
    })
    .await;
    assert_eq!(view.member("b").unwrap().generation, b_member.generation, "the verified b keeps its name");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let view = a.view();
    assert!(ring_is(&view, &["a", "b"]));
    assert_eq!(view.member("b").unwrap().generation, b_member.generation);
}
