//! Measures what last-known-good persistence (`cache.persist_dir`) costs the update path:
//! the time to apply an origin update to a key's state, without persistence and with it
//! (the apply plus handing the new state to the store's writer, while the writer writes
//! records to a real directory on the same cores), and what one record write costs the
//! writer. One cluster out of 1,000 changes per update, as in `update_cost`. Prints a
//! Markdown table (used for BENCHMARKS.md).
//!
//! `cargo run --release --example persist_cost`

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xds_relay::cache::{Interest, KeyState};
use xds_relay::persist::{Record, Store, writer};
use xds_relay::telemetry::Metrics;
use xds_relay::xds;

#[path = "../benches/support/mod.rs"]
#[allow(dead_code)] // the delta fixture is not used here
mod support;

use support::{CLUSTERS, response};

/// Updates applied per run.
const ROUNDS: usize = 2000;
/// Keys the updates rotate over (each update goes to the next key, as an origin's pushes do).
const KEYS: usize = 20;
/// The gap between two updates: the origin's pace, so the writer runs beside the applies.
const GAP: Duration = Duration::from_micros(500);

fn quantiles(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
    (at(0.5), at(0.99), xs[xs.len() - 1])
}

/// Applies ROUNDS updates across KEYS keys; with `queue`, each new state is handed to the
/// writer as the relay does. Returns each update's time in microseconds.
async fn run(queue: Option<&writer::Queue>) -> Vec<f64> {
    let all = Interest::wildcard();
    let node = Node { id: "bench".into(), cluster: "bench".into(), ..Default::default() };
    let keys: Vec<String> = (0..KEYS).map(|k| format!("bench{k}_cds")).collect();
    let mut generations = vec![0u64; CLUSTERS];
    let first = KeyState::empty(xds::CLUSTER).apply(response(1, &generations), &all).unwrap().unwrap();
    let first = Arc::new(first);
    let mut states: Vec<Arc<KeyState>> = (0..KEYS).map(|_| first.clone()).collect();
    let mut took = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let k = round % KEYS;
        generations[round % CLUSTERS] += 1;
        let incoming = response(round as u64 + 2, &generations);
        let started = Instant::now();
        let next = Arc::new(states[k].apply(incoming, &all).unwrap().unwrap());
        if let Some(queue) = queue {
            queue.put(&keys[k], xds::CLUSTER, &node, &next);
        }
        took.push(started.elapsed().as_secs_f64() * 1e6);
        states[k] = next;
        tokio::time::sleep(GAP).await;
    }
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Arc::new(Store::open(dir.path(), 64 << 20).expect("the store"));
    let metrics = Metrics::new();

    // One record write on its own: encode, checksum, temp file, fsync, rename.
    let all = Interest::wildcard();
    let state = KeyState::empty(xds::CLUSTER).apply(response(1, &vec![0; CLUSTERS]), &all).unwrap().unwrap();
    let record = Record::of_state("single_cds", xds::CLUSTER, &Node::default(), &state).expect("a record");
    let record_bytes = record.to_file_bytes().len();
    let mut writes = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        store.write(&record).expect("a write");
        writes.push(started.elapsed().as_secs_f64() * 1e6);
    }

    let without = run(None).await;

    let queue = Arc::new(writer::Queue::new());
    let tracker = TaskTracker::new();
    let shutdown = CancellationToken::new();
    writer::spawn(queue.clone(), store.clone(), metrics.clone(), &tracker, shutdown.clone());
    let with = run(Some(&queue)).await;
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    let written = metrics.persist_writes.get();

    let (a50, a99, amax) = quantiles(without);
    let (b50, b99, bmax) = quantiles(with);
    let (w50, w99, wmax) = quantiles(writes);
    println!("| apply of one update (1 of {CLUSTERS} clusters changes) | p50 | p99 | max |");
    println!("|---|---|---|---|");
    println!("| without persistence | {a50:.0} µs | {a99:.0} µs | {amax:.0} µs |");
    println!(
        "| with persistence (apply + hand-off to the writer, writer running) | {b50:.0} µs | {b99:.0} µs | {bmax:.0} µs |"
    );
    println!(
        "| one record write by the writer ({record_bytes} B, fsync + rename) | {w50:.0} µs | {w99:.0} µs | {wmax:.0} µs |"
    );
    println!();
    println!(
        "{ROUNDS} updates over {KEYS} keys, one every {} µs; the writer wrote {written} records (latest wins per key).",
        GAP.as_micros()
    );
}
