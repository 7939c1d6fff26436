use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::resource::CacheControl;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryResponse, Resource as DeltaResource};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::writer::{self, Pending, Queue};
use super::*;
use crate::cache::{ClientInfo, Interest, KeyState};
use crate::config::CacheConfig;
use crate::telemetry::{Metrics, ReasonLabels};
use crate::{wire, xds};

/// A directory removed when dropped.
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new() -> Self {
        Self(tempfile::tempdir().expect("a temporary directory"))
    }

    fn store(&self, bound: u64) -> Store {
        Store::open(self.0.path(), bound).unwrap()
    }
}

fn cluster(name: &str) -> Any {
    Any { type_url: Cluster::type_url(), value: Cluster { name: name.into(), ..Default::default() }.encode_to_vec() }
}

fn do_not_cache(name: &str) -> Any {
    let wrapped = DeltaResource {
        name: name.into(),
        resource: Some(cluster(name)),
        cache_control: Some(CacheControl { do_not_cache: true }),
        ..Default::default()
    };
    Any { type_url: wire::RESOURCE_WRAPPER.into(), value: wrapped.encode_to_vec() }
}

fn state(version: &str, resources: Vec<Any>) -> Arc<KeyState> {
    let response = DiscoveryResponse {
        type_url: xds::CLUSTER.into(),
        version_info: version.into(),
        resources,
        ..Default::default()
    };
    Arc::new(KeyState::empty(xds::CLUSTER).replace(response, &Interest::wildcard()).unwrap().unwrap())
}

fn node() -> Node {
    Node { id: "envoy-1".into(), cluster: "staging".into(), ..Default::default() }
}

fn record(key: &str, version: &str) -> Record {
    Record::of_state(key, xds::CLUSTER, &node(), &state(version, vec![cluster("a"), cluster("b")])).unwrap()
}

fn cache() -> crate::node_cache::Cache {
    crate::node_cache::Cache::new(
        CacheConfig { ttl: Duration::from_secs(60).into(), max_entries: 0, persist_dir: None },
        Metrics::new(),
    )
}

fn skipped(metrics: &Metrics, reason: &str) -> u64 {
    metrics.persist_records_skipped.get_or_create(&ReasonLabels { reason: reason.to_owned() }).get()
}

#[test]
fn a_record_round_trips_and_seeds_a_stale_entry_served_as_it_was() {
    let dir = TempDir::new();
    let store = dir.store(1 << 20);
    let original = state("v7", vec![cluster("a"), cluster("b")]);
    let written = Record::of_state("staging_cds", xds::CLUSTER, &node(), &original).unwrap();
    store.write(&written).unwrap();
    store.sync_dir().unwrap();
    assert!(store.path_of("staging_cds").ends_with(file_name("staging_cds")));
    assert_eq!(file_name("staging_cds").len(), 64 + 1 + RECORD_EXTENSION.len());

    let scan = store.scan().unwrap();
    assert!(scan.skipped.is_empty(), "{:?}", scan.skipped);
    assert_eq!(scan.records.len(), 1);
    assert_eq!(scan.records[0].record, written);

    let cache = cache();
    let metrics = Metrics::new();
    assert_eq!(seed(&cache, scan, &metrics, false), 1);
    assert_eq!(metrics.persist_records_loaded.get(), 1);
    let entry = cache.get("staging_cds").unwrap();
    assert!(entry.source.is_stale(), "a state from disk is stale until a live source delivers");
    assert_eq!(entry.node, node());
    let seeded = entry.state();
    assert!(seeded.is_ready());
    assert_eq!(seeded.version_info, "v7");
    assert_eq!(seeded.full_body(), original.full_body(), "clients get the bytes the origin sent");
    assert_eq!(seeded.coverage, Interest::wildcard());
    assert_eq!(entry.watcher_count(), 0, "a seeded key has no watcher: it ages out by the TTL");
}

#[tokio::test]
async fn the_first_watcher_of_a_seeded_key_starts_its_source_and_a_live_state_clears_stale() {
    let cache = cache();
    let record = record("staging_cds", "v1");
    let (node, response, coverage) = record.parts().unwrap();
    cache.seed("staging_cds", xds::CLUSTER, node.clone(), response, &coverage).unwrap();
    let mut started = 0;
    let watch = |started: &mut i32| {
        cache
            .watch("staging_cds", xds::CLUSTER, &node, ClientInfo::default(), Interest::wildcard(), |_| *started += 1)
            .unwrap()
    };
    let first = watch(&mut started);
    let second = watch(&mut started);
    assert_eq!(started, 1, "the source starts once, with the first watcher");
    let entry = first.entry().clone();
    assert_eq!(first.receiver().borrow_and_update().version_info, "v1", "served from disk at once");
    // The origin answers with the same version: nothing reaches clients, the mark clears.
    let serial = entry.state().serial;
    let same = DiscoveryResponse::decode(record.response.clone()).unwrap();
    assert!(!entry.apply_response(same, &Interest::wildcard(), true, |_| Default::default()).unwrap());
    assert_eq!(entry.state().serial, serial);
    assert!(!entry.source.is_stale());
    // A forwarded state from an owner serving from disk keeps it stale.
    let newer = DiscoveryResponse { version_info: "v2".into(), ..DiscoveryResponse::decode(record.response).unwrap() };
    entry.apply_forwarded(newer, &Interest::wildcard(), Duration::ZERO, true, |_| Default::default()).unwrap();
    assert!(entry.source.is_stale());
    assert!(entry.state().serial > serial, "the live state replaces the disk state like any update");
    drop((first, second));
}

#[test]
fn seeding_a_key_already_cached_or_over_max_entries_is_refused() {
    let cache = crate::node_cache::Cache::new(
        CacheConfig { ttl: Duration::from_secs(60).into(), max_entries: 1, persist_dir: None },
        Metrics::new(),
    );
    let dir = TempDir::new();
    let store = dir.store(1 << 20);
    for key in ["a", "b"] {
        store.write(&record(key, "v1")).unwrap();
    }
    let metrics = Metrics::new();
    assert_eq!(seed(&cache, store.scan().unwrap(), &metrics, false), 1);
    assert_eq!(skipped(&metrics, "full"), 1);
    assert_eq!(seed(&cache, store.scan().unwrap(), &metrics, false), 0, "a cached key is not seeded twice");
}

/// Writes a good record of `key`, then lets `damage` change its bytes.
fn damaged(store: &Store, key: &str, damage: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = record(key, "v1").to_file_bytes();
    damage(&mut bytes);
    std::fs::write(store.path_of(key), bytes).unwrap();
}

#[test]
fn damaged_records_are_skipped_with_their_reason_and_good_ones_load() {
    let dir = TempDir::new();
    let bound = 4096;
    let store = dir.store(bound);
    store.write(&record("good", "v1")).unwrap();
    damaged(&store, "truncated", |b| b.truncate(b.len() - 5));
    damaged(&store, "flipped", |b| {
        let last = b.len() - 1;
        b[last] ^= 0x40;
    });
    damaged(&store, "short", |b| b.truncate(HEADER_LEN - 1));
    std::fs::write(store.path_of("garbage"), b"this is not a record at all, just some text\n").unwrap();
    let other_version = Record { format: FORMAT_VERSION + 1, ..record("version", "v1") };
    std::fs::write(store.path_of("version"), other_version.to_file_bytes()).unwrap();
    let mut big = record("big", "v1");
    big.version_info = "x".repeat(5000);
    std::fs::write(store.path_of("big"), big.to_file_bytes()).unwrap();
    // A whole record under another key's name (copied by hand) is not served as that key.
    std::fs::write(store.path_of("renamed"), record("good", "v1").to_file_bytes()).unwrap();
    // A body that passes its checksum but is not a record.
    let mut junk = MAGIC.to_vec();
    let body = vec![0xff_u8; 16];
    junk.extend_from_slice(&<sha2::Sha256 as sha2::Digest>::digest(&body));
    junk.extend_from_slice(&body);
    std::fs::write(store.path_of("undecodable"), junk).unwrap();
    // A write cut short by a crash leaves its temporary file.
    let leftover = dir.0.path().join(".tmp-cut");
    std::fs::write(&leftover, b"half").unwrap();
    std::fs::write(dir.0.path().join("README"), b"not ours").unwrap();

    let scan = store.scan().unwrap();
    let reason_of = |key: &str| {
        let path = store.path_of(key);
        scan.skipped.iter().find(|s| s.path == path).map(|s| s.reason)
    };
    assert_eq!(reason_of("truncated"), Some(SkipReason::Checksum));
    assert_eq!(reason_of("flipped"), Some(SkipReason::Checksum));
    assert_eq!(reason_of("short"), Some(SkipReason::Corrupt));
    assert_eq!(reason_of("garbage"), Some(SkipReason::Corrupt));
    assert_eq!(reason_of("version"), Some(SkipReason::Version));
    assert_eq!(reason_of("big"), Some(SkipReason::TooLarge));
    assert_eq!(reason_of("renamed"), Some(SkipReason::Decode));
    assert_eq!(reason_of("undecodable"), Some(SkipReason::Decode));
    assert!(scan.skipped.iter().any(|s| s.path == leftover && s.reason == SkipReason::Corrupt));
    assert!(!leftover.exists(), "a leftover temporary file is removed");
    assert!(dir.0.path().join("README").exists(), "other files are left alone");
    assert_eq!(scan.records.len(), 1);

    let cache = cache();
    let metrics = Metrics::new();
    assert_eq!(seed(&cache, scan, &metrics, false), 1);
    assert_eq!(cache.entries().len(), 1, "only the good record is served");
    assert!(cache.get("good").is_some());
    for (reason, count) in [("checksum", 2), ("corrupt", 3), ("version", 1), ("too_large", 1), ("decode", 2)] {
        assert_eq!(skipped(&metrics, reason), count, "{reason}");
    }
}

#[test]
fn a_record_whose_state_fails_the_checks_is_rejected() {
    let dir = TempDir::new();
    let store = dir.store(1 << 20);
    // A type the response does not carry.
    let wrong = Record { type_url: xds::ENDPOINT.into(), ..record("k", "v1") };
    std::fs::write(store.path_of("k"), wrong.to_file_bytes()).unwrap();
    let cache = cache();
    let metrics = Metrics::new();
    assert_eq!(seed(&cache, store.scan().unwrap(), &metrics, false), 0);
    assert_eq!(skipped(&metrics, "rejected"), 1);
    assert!(cache.get("k").is_none());
}

#[test]
fn the_bound_on_a_record_follows_the_largest_response_node_and_key() {
    let bootstrap = crate::config::parse_bootstrap(
        "server: {address: {address: 127.0.0.1, port_value: 0}}\n\
         origin_server: {address: {address: 127.0.0.1, port_value: 1}, max_message_size: 8388608}\n\
         cache: {ttl: 60s}\n\
         admin: {address: {address: 127.0.0.1, port_value: 0}}\n",
        "bootstrap.yaml",
    )
    .unwrap();
    let limits = bootstrap.limits;
    let expected = 8_388_608 + limits.max_node_bytes + limits.max_key_length + 1024 * 1024;
    assert_eq!(record_bound(&bootstrap), expected as u64);
}

#[test]
fn do_not_cache_states_are_never_written_and_remove_the_record() {
    let dir = TempDir::new();
    let store = dir.store(1 << 20);
    let metrics = Metrics::new();
    let queue = Queue::new();
    queue.put("k", xds::CLUSTER, &node(), &state("v1", vec![cluster("a")]));
    writer::write_batch(&store, queue.take(10), &metrics);
    assert!(store.path_of("k").exists());
    let secret = state("v2", vec![cluster("a"), do_not_cache("s")]);
    assert!(secret.uncacheable);
    assert!(Record::of_state("k", xds::CLUSTER, &node(), &secret).is_none());
    queue.put("k", xds::CLUSTER, &node(), &secret);
    assert_eq!(writer::write_batch(&store, queue.take(10), &metrics), 0);
    assert!(!store.path_of("k").exists(), "an older state is never served after a do_not_cache one");
    assert_eq!(metrics.persist_writes.get(), 1);
    let bytes: Vec<u8> =
        std::fs::read_dir(dir.0.path()).unwrap().flatten().flat_map(|f| std::fs::read(f.path()).unwrap()).collect();
    assert!(bytes.is_empty(), "nothing of the do_not_cache state is on disk");
}

#[test]
fn the_queue_keeps_one_change_per_key_the_latest() {
    let queue = Queue::new();
    for version in ["v1", "v2", "v3"] {
        queue.put("a", xds::CLUSTER, &node(), &state(version, vec![cluster("a")]));
    }
    queue.put("b", xds::CLUSTER, &node(), &state("v1", vec![cluster("b")]));
    queue.remove("b");
    assert_eq!(queue.len(), 2, "memory bounded by the number of keys");
    let mut taken = queue.take(1);
    taken.extend(queue.take(10));
    assert!(queue.is_empty());
    taken.sort_by(|x, y| x.0.cmp(&y.0));
    assert!(matches!(&taken[0].1, Pending::Write { state, .. } if state.version_info == "v3"));
    assert!(matches!(taken[1].1, Pending::Remove));
}

#[tokio::test(start_paused = true)]
async fn the_writer_writes_the_latest_state_once_and_flushes_at_shutdown() {
    let dir = TempDir::new();
    let store = Arc::new(dir.store(1 << 20));
    let metrics = Metrics::new();
    let queue = Arc::new(Queue::new());
    let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
    // Changes made before the writer runs coalesce: one write, of the last state.
    for version in ["v1", "v2", "v3"] {
        queue.put("a", xds::CLUSTER, &node(), &state(version, vec![cluster("a")]));
    }
    writer::spawn(queue.clone(), store.clone(), metrics.clone(), &tracker, shutdown.clone());
    // Pending at shutdown: written before the task ends.
    queue.put("b", xds::CLUSTER, &node(), &state("v9", vec![cluster("b")]));
    shutdown.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await.expect("the writer stops");
    assert!(queue.is_empty());
    let scan = store.scan().unwrap();
    let versions: std::collections::BTreeMap<String, String> =
        scan.records.iter().map(|f| (f.record.key.clone(), f.record.version_info.clone())).collect();
    assert_eq!(versions.get("a").map(String::as_str), Some("v3"));
    assert_eq!(versions.get("b").map(String::as_str), Some("v9"));
    assert_eq!(metrics.persist_writes.get(), 2, "one write per key: the latest state");
    assert_eq!(metrics.persist_write_errors.get(), 0);
}

#[test]
fn a_write_that_fails_is_counted_and_the_batch_goes_on() {
    let dir = TempDir::new();
    let store = dir.store(1 << 20);
    let metrics = Metrics::new();
    // The record's file name is taken by a directory: the rename fails.
    std::fs::create_dir(store.path_of("blocked")).unwrap();
    let batch = vec![
        (
            "blocked".to_owned(),
            Pending::Write {
                type_url: xds::CLUSTER.into(),
                node: Box::new(node()),
                state: state("v1", vec![cluster("a")]),
            },
        ),
        (
            "fine".to_owned(),
            Pending::Write {
                type_url: xds::CLUSTER.into(),
                node: Box::new(node()),
                state: state("v1", vec![cluster("a")]),
            },
        ),
    ];
    assert_eq!(writer::write_batch(&store, batch, &metrics), 1);
    assert_eq!(metrics.persist_write_errors.get(), 1);
    assert!(store.path_of("fine").is_file());
}

#[tokio::test(start_paused = true)]
async fn accepted_states_reach_the_queue_and_evictions_remove_them_but_shutdown_does_not() {
    let queue = Arc::new(Queue::new());
    let kept = Arc::new(crate::relay::KeptStates::new(queue.clone(), true));
    let cache = crate::node_cache::Cache::new(
        CacheConfig { ttl: Duration::from_secs(10).into(), max_entries: 0, persist_dir: None },
        Metrics::new(),
    )
    .with_keeper(kept);
    let watch = |key: &str| {
        cache.watch(key, xds::CLUSTER, &node(), ClientInfo::default(), Interest::wildcard(), |_| {}).unwrap()
    };
    let apply = |watcher: &crate::node_cache::Watcher, version: &str| {
        let response = DiscoveryResponse {
            type_url: xds::CLUSTER.into(),
            version_info: version.into(),
            resources: vec![cluster("a")],
            ..Default::default()
        };
        watcher.entry().apply_response(response, &Interest::wildcard(), false, |_| Default::default()).unwrap();
    };
    let a = watch("a");
    apply(&a, "v1");
    apply(&a, "v1");
    let taken = queue.take(10);
    assert_eq!(taken.len(), 1, "an unchanged state is not handed over again");
    assert!(matches!(&taken[0], (key, Pending::Write { state, .. }) if key == "a" && state.version_info == "v1"));
    let private = crate::downstream::passthrough::private_key(xds::CLUSTER, "n", 1);
    let p = watch(&private);
    apply(&p, "v1");
    assert!(queue.is_empty(), "a private pass-through key is never kept");
    drop((a, p));
    tokio::time::advance(Duration::from_secs(11)).await;
    cache.sweep();
    let taken = queue.take(10);
    assert!(
        taken.iter().any(|(key, change)| key == "a" && matches!(change, Pending::Remove)),
        "a TTL eviction removes the record"
    );
    let b = watch("b");
    apply(&b, "v1");
    queue.take(10);
    drop(b);
    cache.clear_all();
    assert!(queue.is_empty(), "a shutdown keeps every record");

    // A key read from disk that no live source confirmed keeps its record when it ages out
    // (an outage longer than the TTL must not erase last-known-good); once confirmed, it
    // does not.
    let seeded = |key: &str| {
        let response = DiscoveryResponse {
            type_url: xds::CLUSTER.into(),
            version_info: "v0".into(),
            resources: vec![cluster("a")],
            ..Default::default()
        };
        cache.seed(key, xds::CLUSTER, node(), response, &Interest::wildcard()).unwrap();
    };
    seeded("outage");
    seeded("confirmed");
    let c = watch("confirmed");
    apply(&c, "v1");
    drop(c);
    queue.take(10);
    tokio::time::advance(Duration::from_secs(11)).await;
    cache.sweep();
    let taken = queue.take(10);
    assert!(
        taken.iter().all(|(key, _)| key != "outage"),
        "an unconfirmed record outlives its entry: {:?}",
        taken.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    assert!(taken.iter().any(|(key, change)| key == "confirmed" && matches!(change, Pending::Remove)));
}

#[test]
fn ten_thousand_records_load_one_at_a_time_and_every_key_is_served_stale() {
    const KEYS: usize = 10_000;
    let dir = TempDir::new();
    let store = dir.store(1 << 20);
    let template = record("k", "v1");
    for i in 0..KEYS {
        let key = format!("staging_rds_route_{i}");
        let record = Record { key: key.clone(), ..template.clone() };
        std::fs::write(store.path_of(&key), record.to_file_bytes()).unwrap();
    }
    std::fs::write(store.path_of("bad"), b"garbage").unwrap();
    let cache = cache();
    let metrics = Metrics::new();
    let started = tokio::time::Instant::now();
    let loaded = load(&cache, &store, &metrics, false).unwrap();
    eprintln!("loaded {} records in {:?}", loaded.seeded, started.elapsed());
    assert_eq!(loaded, Loaded { seeded: KEYS, skipped: 1 });
    assert_eq!(cache.entries().len(), KEYS);
    assert!(cache.entries().iter().all(|e| e.source.is_stale() && e.state().version_info == "v1"));
    assert_eq!(metrics.persist_records_loaded.get(), KEYS as u64);
}
