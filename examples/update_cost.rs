//! Measures what one update costs the relay per client, state of the world against delta:
//! bytes sent to a client and CPU time to build its response when 1 cluster out of 1,000
//! changes. Prints a Markdown table (used for BENCHMARKS.md).
//!
//! `cargo run --release --example update_cost`

use std::sync::Arc;
use tokio::time::Instant;

use xds_relay::cache::{Interest, KeyState};
use xds_relay::downstream::delta_subscription;
use xds_relay::xds;

#[path = "../benches/support/mod.rs"]
mod support;

use support::{CLUSTERS, delta_client, response};

const ROUNDS: u32 = 200;

fn main() {
    let all = Interest::wildcard();
    let mut generations = vec![0u64; CLUSTERS];
    let mut state = KeyState::empty(xds::CLUSTER).apply(response(1, &generations), &all).unwrap().unwrap();
    let mut sub = delta_client(&state);

    let (mut sotw_bytes, mut delta_bytes) = (0usize, 0usize);
    let (mut sotw_cpu, mut delta_cpu, mut apply_cpu) = (0f64, 0f64, 0f64);
    for round in 0..ROUNDS {
        let version = u64::from(round) + 2;
        generations[round as usize % CLUSTERS] += 1;
        let incoming = response(version, &generations);
        let started = Instant::now();
        state = state.apply(incoming, &all).unwrap().unwrap();
        apply_cpu += started.elapsed().as_secs_f64();

        let started = Instant::now();
        let (body, _) = state.body_for(&all);
        sotw_cpu += started.elapsed().as_secs_f64();
        sotw_bytes += body.len();

        let started = Instant::now();
        let update = delta_subscription::compute(&mut sub, &state);
        let body = state.delta_body(&update.resources, &[], &update.removed, &[]);
        delta_cpu += started.elapsed().as_secs_f64();
        delta_bytes += body.len();
        assert_eq!(update.resources.len(), 1, "one cluster changed");
        let _ = Arc::strong_count(&update.resources[0]);
    }
    let n = f64::from(ROUNDS);
    let (sotw, delta) = (sotw_bytes as f64 / n, delta_bytes as f64 / n);
    println!("| 1 of {CLUSTERS} clusters changes | state of the world | delta |");
    println!("|---|---|---|");
    println!("| bytes sent to one client per update | {sotw:.0} | {delta:.0} |");
    println!("| ratio | {:.0} : 1 | 1 |", sotw / delta);
    println!(
        "| relay CPU per client per update (build the response) | {:.1} µs | {:.1} µs |",
        sotw_cpu / n * 1e6,
        delta_cpu / n * 1e6
    );
    println!("| relay CPU per update, once per key (apply, hash, encode) | {:.0} µs | (same) |", apply_cpu / n * 1e6);
}
