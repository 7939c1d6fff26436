//! Sealed gossip over real UDP on 127.0.0.1: sealed nodes converge; nodes with another key,
//! plaintext nodes, replayed, stale, forged and garbage datagrams are dropped and counted;
//! a full key rotation (install, switch, remove) never partitions the cluster.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use support::{config, free_udp_addr, poll_until, ring_is, wait_all};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use xds_relay_cluster::seal::{OVERHEAD, VERSION, open, seal};
use xds_relay_cluster::{Cluster, ClusterConfig, GossipSeal, Keyring, NodeState, RejectReason};

const WITHIN: Duration = Duration::from_secs(15);
const K1: [u8; 32] = [0x11; 32];
const K2: [u8; 32] = [0x22; 32];
const K3: [u8; 32] = [0x33; 32];

/// A directory for key files, removed on drop.
struct KeyDir(PathBuf);

impl KeyDir {
    fn new(test: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xds-relay-gossip-{test}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        KeyDir(dir)
    }

    /// Writes `keys` to the node's key file (atomically: the watcher never reads half a file).
    fn write(&self, node: &str, keys: &[[u8; 32]]) -> PathBuf {
        let path = self.0.join(format!("{node}.keys"));
        let mut text = String::from("# gossip keys, the first one seals\n");
        for key in keys {
            text.push_str(&STANDARD.encode(key));
            text.push('\n');
        }
        let tmp = self.0.join(format!("{node}.keys.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for KeyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sealed_config(name: &str, gossip: SocketAddr, seeds: &[SocketAddr], keys_file: &Path) -> ClusterConfig {
    let mut config = config(name, gossip, seeds);
    config.gossip_seal = Some(GossipSeal { reload_interval: Duration::from_millis(100), ..GossipSeal::new(keys_file) });
    config
}

/// Joins `names` with sealed gossip, seeded with the first node, node i with `keys[i]`, each
/// set ready; returns them with their addresses.
async fn start(dir: &KeyDir, names: &[&str], keys: &[&[[u8; 32]]]) -> (Vec<Cluster>, Vec<SocketAddr>) {
    let addrs: Vec<SocketAddr> = names.iter().map(|_| free_udp_addr()).collect();
    let mut nodes = Vec::new();
    for ((name, addr), keys) in names.iter().zip(&addrs).zip(keys) {
        let file = dir.write(name, keys);
        let node = Cluster::join(sealed_config(name, *addr, &addrs[..1], &file)).await.expect("join sealed");
        node.set_state(NodeState::Ready).await;
        nodes.push(node);
    }
    (nodes, addrs)
}

fn id_of(key: &[u8; 32]) -> String {
    xds_relay_cluster::keyring::key_id(key).iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

async fn shutdown(nodes: Vec<Cluster>) {
    for node in nodes {
        tokio::time::timeout(Duration::from_secs(5), node.shutdown()).await.expect("bounded shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_nodes_converge() {
    let dir = KeyDir::new("converge");
    let names = ["a", "b", "c"];
    let (nodes, _) = start(&dir, &names, &[&[K1], &[K1, K2], &[K1]]).await;
    let all: Vec<&Cluster> = nodes.iter().collect();
    let took = wait_all(&all, WITHIN, "every node on the ring", |v| ring_is(v, &names)).await;
    println!("sealed: 3 nodes converged in {took:?}");
    for node in &nodes {
        let stats = node.gossip_stats();
        assert!(stats.sealed);
        assert_eq!(stats.key_ids[0], id_of(&K1));
        assert!(stats.datagrams_sent > 0 && stats.datagrams_received > 0, "{stats:?}");
        assert!(stats.rejected.iter().all(|(_, n)| *n == 0), "no rejection between key holders: {stats:?}");
        let view = node.view();
        for member in &view.members {
            assert!(member.alive);
            assert_eq!(member.peer_addr, Some(support::peer_addr_for(member.gossip_addr)), "state gossiped intact");
        }
    }
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_key_never_appears() {
    let dir = KeyDir::new("wrong-key");
    let (mut nodes, addrs) = start(&dir, &["a", "b"], &[&[K1], &[K1]]).await;
    let all: Vec<&Cluster> = nodes.iter().collect();
    wait_all(&all, WITHIN, "a and b on the ring", |v| ring_is(v, &["a", "b"])).await;

    // `c` seeds with `a` and `b` and gossips to them under its own key; they cannot open it,
    // so they never learn of `c` and never answer.
    let c_addr = free_udp_addr();
    let c_file = dir.write("c", &[K3]);
    let c = Cluster::join(sealed_config("c", c_addr, &addrs, &c_file)).await.unwrap();
    c.set_state(NodeState::Ready).await;
    poll_until(WITHIN, "a counts c's datagrams as no_key", || {
        nodes[0].gossip_stats().rejected(RejectReason::NoKey) >= 10
    })
    .await;
    for node in &nodes {
        let view = node.view();
        assert!(view.member("c").is_none(), "{} must not see c: {view:#?}", node.self_name());
        assert!(ring_is(&view, &["a", "b"]));
    }
    let c_view = c.view();
    assert_eq!(c_view.members.len(), 1, "c sees only itself: {c_view:#?}");
    assert_eq!(c.gossip_stats().datagrams_received, 0);
    nodes.push(c);
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_stale_forged_and_garbage_datagrams_are_rejected() {
    let dir = KeyDir::new("replay");
    // `a` gossips to a sniffing socket (its only seed); `b` is the target of the replays.
    let sniffer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sniffer_addr = sniffer.local_addr().unwrap();
    let a_file = dir.write("a", &[K1]);
    let a = Cluster::join(sealed_config("a", free_udp_addr(), &[sniffer_addr], &a_file)).await.unwrap();
    let b_addr = free_udp_addr();
    let b_file = dir.write("b", &[K1]);
    let b = Cluster::join(sealed_config("b", b_addr, &[], &b_file)).await.unwrap();

    let mut buf = vec![0; 65_536];
    let (len, _) = tokio::time::timeout(WITHIN, sniffer.recv_from(&mut buf)).await.expect("a gossips").unwrap();
    let captured = buf[..len].to_vec();
    assert_eq!(captured[0], VERSION);
    assert!(captured.len() > OVERHEAD);

    // First delivery: authentic and fresh, accepted.
    sniffer.send_to(&captured, b_addr).await.unwrap();
    poll_until(WITHIN, "b accepts the captured datagram", || b.gossip_stats().datagrams_received >= 1).await;
    // The same bytes again: a replay.
    sniffer.send_to(&captured, b_addr).await.unwrap();
    poll_until(WITHIN, "b rejects the replay", || b.gossip_stats().rejected(RejectReason::Replay) == 1).await;
    // From another source address: still a replay (the replay set is not per sender).
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other.send_to(&captured, b_addr).await.unwrap();
    poll_until(WITHIN, "b rejects the replay from elsewhere", || b.gossip_stats().rejected(RejectReason::Replay) == 2)
        .await;

    // The same chitchat message, correctly sealed, but stamped 2 minutes ago / ahead.
    let keyring = Keyring::from_keys(&[K1]);
    let mut opened = captured.clone();
    let plaintext = open(&keyring, b"xds-relay-test", &mut opened).unwrap().plaintext;
    let plaintext = opened[plaintext].to_vec();
    let mut datagram = Vec::new();
    for (i, timestamp) in [now_ms() - 120_000, now_ms() + 120_000].into_iter().enumerate() {
        seal(&keyring, b"xds-relay-test", timestamp, [i as u8 + 1; 12], &plaintext, &mut datagram).unwrap();
        sniffer.send_to(&datagram, b_addr).await.unwrap();
    }
    poll_until(WITHIN, "b rejects old and future datagrams", || b.gossip_stats().rejected(RejectReason::Stale) == 2)
        .await;
    // Sealed with the right key for another cluster id; a tampered byte; garbage; a key b lacks.
    seal(&keyring, b"another-cluster", now_ms(), [7; 12], &plaintext, &mut datagram).unwrap();
    sniffer.send_to(&datagram, b_addr).await.unwrap();
    let mut tampered = captured.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    sniffer.send_to(&tampered, b_addr).await.unwrap();
    sniffer.send_to(b"not a gossip datagram", b_addr).await.unwrap();
    seal(&Keyring::from_keys(&[K3]), b"xds-relay-test", now_ms(), [8; 12], &plaintext, &mut datagram).unwrap();
    sniffer.send_to(&datagram, b_addr).await.unwrap();
    poll_until(WITHIN, "b rejects forged and garbage datagrams", || {
        let stats = b.gossip_stats();
        stats.rejected(RejectReason::BadSeal) == 2
            && stats.rejected(RejectReason::Malformed) == 1
            && stats.rejected(RejectReason::NoKey) == 1
    })
    .await;
    shutdown(vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_nodes_are_rejected_and_never_appear() {
    let dir = KeyDir::new("plaintext");
    let sealed_addr = free_udp_addr();
    let plain_addr = free_udp_addr();
    let file = dir.write("a", &[K1]);
    // Each seeds the other: the plaintext node sends Syns (and would answer with SynAcks),
    // the sealed one sends sealed Syns that chitchat's plaintext socket cannot decode.
    let sealed = Cluster::join(sealed_config("a", sealed_addr, &[plain_addr], &file)).await.unwrap();
    let plain = Cluster::join(config("p", plain_addr, &[sealed_addr])).await.unwrap();
    sealed.set_state(NodeState::Ready).await;
    plain.set_state(NodeState::Ready).await;
    poll_until(WITHIN, "the sealed node counts plaintext datagrams", || {
        sealed.gossip_stats().rejected(RejectReason::Plaintext) >= 10
    })
    .await;
    assert!(sealed.view().member("p").is_none(), "{:#?}", sealed.view());
    assert!(plain.view().member("a").is_none(), "{:#?}", plain.view());
    assert!(!plain.gossip_stats().sealed);
    shutdown(vec![sealed, plain]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_key_file_keeps_the_keys_in_force() {
    let dir = KeyDir::new("invalid");
    let (nodes, _) = start(&dir, &["a", "b"], &[&[K1], &[K1]]).await;
    let all: Vec<&Cluster> = nodes.iter().collect();
    wait_all(&all, WITHIN, "a and b on the ring", |v| ring_is(v, &["a", "b"])).await;
    let path = dir.write("a", &[K1]);
    std::fs::write(&path, format!("{}\nnot a key\n", STANDARD.encode(K2))).unwrap();
    poll_until(WITHIN, "a counts the failed reload", || nodes[0].gossip_stats().key_reload_failures == 1).await;
    assert_eq!(nodes[0].gossip_stats().key_ids, [id_of(&K1)], "the keys in force stay");
    // Gossip still flows under the old key.
    let before = nodes[1].gossip_stats().datagrams_received;
    poll_until(WITHIN, "gossip flows", || nodes[1].gossip_stats().datagrams_received > before + 5).await;
    // A fixed file is installed.
    dir.write("a", &[K1, K2]);
    poll_until(WITHIN, "a installs the fixed file", || nodes[0].gossip_stats().key_ids == [id_of(&K1), id_of(&K2)])
        .await;
    shutdown(nodes).await;
}

/// Every node sees every other alive and on the ring at every poll while `steps` run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_never_partitions_the_cluster() {
    let dir = KeyDir::new("rotation");
    let names = ["a", "b", "c"];
    let (nodes, _) = start(&dir, &names, &[&[K1], &[K1], &[K1]]).await;
    let all: Vec<&Cluster> = nodes.iter().collect();
    wait_all(&all, WITHIN, "every node on the ring", |v| ring_is(v, &names)).await;

    let stop = CancellationToken::new();
    let monitor = tokio::spawn({
        let nodes = nodes.clone();
        let stop = stop.clone();
        async move {
            let mut polls = 0u64;
            let mut violations = Vec::new();
            while !stop.is_cancelled() {
                for node in &nodes {
                    let view = node.view();
                    if !(ring_is(&view, &names) && view.members.iter().all(|m| m.alive)) {
                        violations.push(format!("{} at poll {polls}: {view:?}", node.self_name()));
                    }
                }
                polls += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (polls, violations)
        }
    });

    let steps: [(&str, &[[u8; 32]]); 3] = [("install", &[K1, K2]), ("switch", &[K2, K1]), ("remove", &[K2])];
    for (step, keys) in steps {
        let expected: Vec<String> = keys.iter().map(id_of).collect();
        // One node at a time, as an operator editing each node's file would.
        for (name, node) in names.iter().zip(&nodes) {
            dir.write(name, keys);
            poll_until(WITHIN, &format!("{step}: {name} reloads its keys"), || node.gossip_stats().key_ids == expected)
                .await;
            // Let every node take several rounds of gossip under the new keys.
            let before: Vec<u64> = nodes.iter().map(|n| n.gossip_stats().datagrams_received).collect();
            poll_until(WITHIN, &format!("{step}: gossip flows after {name}'s edit"), || {
                nodes.iter().zip(&before).all(|(n, b)| n.gossip_stats().datagrams_received >= b + 10)
            })
            .await;
        }
        println!("rotation: {step} done on every node");
    }
    stop.cancel();
    let (polls, violations) = monitor.await.unwrap();
    assert!(violations.is_empty(), "partition during rotation: {violations:#?}");
    assert!(polls > 10);
    for node in &nodes {
        let stats = node.gossip_stats();
        assert_eq!(stats.key_ids, [id_of(&K2)]);
        assert_eq!(stats.rejected(RejectReason::NoKey) + stats.rejected(RejectReason::BadSeal), 0, "{stats:?}");
    }

    // The checks above can fail: a node whose file skips the install step drops out.
    dir.write("c", &[K3]);
    let survivors: Vec<&Cluster> = nodes[..2].iter().collect();
    wait_all(&survivors, WITHIN * 2, "c off the ring", |v| ring_is(v, &["a", "b"])).await;
    assert!(nodes[0].gossip_stats().rejected(RejectReason::NoKey) > 0);
    shutdown(nodes).await;
}
