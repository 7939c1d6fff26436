//! Criterion micro-benchmarks of the keyer: mapping a request to its aggregation key with the
//! example rules (`example/config/aggregation-rules.yaml`).
//!
//! `cargo bench --bench keyer` (add `-- --quick` for a short run); `cargo test --bench keyer`
//! runs each benchmark once as a test.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::config::core::v3::Node;
use xds_relay::config;
use xds_relay::keyer::{KeyRequest, Keyer};
use xds_relay::xds;

const RULES: &str = include_str!("../example/config/aggregation-rules.yaml");

fn keyer() -> Keyer {
    let rules = config::parse_rules(RULES, "aggregation-rules.yaml").expect("the example rules parse");
    Keyer::new(&rules).expect("the example rules compile")
}

fn bench_keyer(c: &mut Criterion) {
    let keyer = keyer();
    let node = Node { id: "envoy-client-1".into(), cluster: "staging-1".into(), ..Node::default() };
    let no_names: Vec<String> = Vec::new();
    let endpoints: Vec<String> = (0..10).map(|i| format!("cluster_{i}")).collect();
    let route = vec!["local_route".to_owned()];
    let cases: [(&str, &str, &[String], &str); 3] = [
        ("cds", xds::CLUSTER, &no_names, "staging_cds"),
        ("eds_10_names", xds::ENDPOINT, &endpoints, "staging_eds"),
        ("rds_route_name", xds::ROUTE, &route, "staging_rds_local_route"),
    ];
    let mut group = c.benchmark_group("keyer");
    for (name, type_url, names, expected) in cases {
        let request = KeyRequest { type_url, node: Some(&node), resource_names: names };
        assert_eq!(keyer.key(&request).as_deref(), Ok(expected), "{name}");
        group.bench_function(name, |b| b.iter(|| keyer.key(black_box(&request))));
    }
    group.finish();
}

criterion_group!(benches, bench_keyer);
criterion_main!(benches);
