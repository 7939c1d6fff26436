//! Criterion micro-benchmarks of the per-update work on the fan-out path, for a CDS key of
//! 1,000 clusters in which one cluster changes (the operations `examples/update_cost.rs`
//! times, so the figures line up):
//!
//! - `apply_update`: applying the origin's new state to the cache (once per key and update);
//! - `sotw_response`: building one client's state-of-the-world response (once per client),
//!   and, for comparison, copying it into a per-stream encode buffer as tonic's codec does;
//! - `delta_diff`: one delta client's diff and response body, one version behind (the
//!   incremental path) and from scratch (the full diff, for a client further behind).
//!
//! `cargo bench --bench fanout` (add `-- --quick` for a short run); `cargo test --bench
//! fanout` runs each benchmark once as a test.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use prost::Message;
use xds_relay::cache::{Interest, KeyState};
use xds_relay::downstream::delta_subscription::{self, DeltaSubscription};
use xds_relay::wire::EncodedResponse;
use xds_relay::xds;

mod support;

use support::{CLUSTERS, delta_client, response};

/// Version 1, then version 2 in which cluster 0 changed, and the response that made it.
fn versions() -> (KeyState, KeyState, DiscoveryResponse) {
    let all = Interest::wildcard();
    let mut generations = vec![0u64; CLUSTERS];
    let v1 = KeyState::empty(xds::CLUSTER).apply(response(1, &generations), &all).unwrap().unwrap();
    generations[0] += 1;
    let update = response(2, &generations);
    let v2 = v1.apply(update.clone(), &all).unwrap().unwrap();
    (v1, v2, update)
}

fn bench_apply(c: &mut Criterion) {
    let (v1, _, update) = versions();
    let all = Interest::wildcard();
    c.bench_function("apply_update/1000_clusters_1_changed", |b| {
        b.iter_batched(|| update.clone(), |update| v1.apply(update, &all).unwrap(), BatchSize::SmallInput)
    });
}

fn bench_sotw(c: &mut Criterion) {
    let (_, v2, _) = versions();
    let all = Interest::wildcard();
    let mut group = c.benchmark_group("sotw_response");
    group.bench_function("body_for_client", |b| b.iter(|| v2.body_for(black_box(&all))));
    let (body, _) = v2.body_for(&all);
    group.bench_function("copy_into_stream_buffer", |b| {
        b.iter_batched_ref(
            || BytesMut::with_capacity(1024),
            |buf| EncodedResponse { body: body.clone(), nonce: "17".into() }.encode(buf).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn bench_delta(c: &mut Criterion) {
    let (v1, v2, _) = versions();
    let behind = delta_client(&v1);
    let mut group = c.benchmark_group("delta_diff");
    let diff = |sub: &mut DeltaSubscription| {
        let update = delta_subscription::compute(sub, &v2);
        assert_eq!(update.resources.len(), 1, "one cluster changed");
        v2.delta_body(&update.resources, &[], &update.removed, &[])
    };
    group.bench_function("one_version_behind", |b| b.iter_batched_ref(|| behind.clone(), diff, BatchSize::SmallInput));
    group.bench_function("full_diff", |b| {
        b.iter_batched_ref(|| DeltaSubscription { synced: None, ..behind.clone() }, diff, BatchSize::SmallInput)
    });
    group.finish();
}

criterion_group!(benches, bench_apply, bench_sotw, bench_delta);
criterion_main!(benches);
