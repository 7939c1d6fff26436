//! The CDS fixture shared by `benches/fanout.rs` and `examples/update_cost.rs`: an origin
//! state of [`CLUSTERS`] clusters, each changed by bumping its generation, so both measure
//! the same update.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::{Message, Name};
use xds_relay::cache::KeyState;
use xds_relay::downstream::delta_subscription::{self, DeltaChange, DeltaSubscription};
use xds_relay::xds;

/// Clusters in the key.
pub const CLUSTERS: usize = 1000;

/// Cluster `i` after `generation` changes.
pub fn cluster(i: usize, generation: u64) -> Any {
    let c = Cluster {
        name: format!("cluster_{i}"),
        alt_stat_name: format!("service-{i}.example.svc.cluster.local"),
        connect_timeout: Some(PbDuration { seconds: 1 + generation as i64, nanos: 0 }),
        ..Default::default()
    };
    Any { type_url: Cluster::type_url(), value: c.encode_to_vec() }
}

/// The origin's full state at `version`; `generations[i]` counts the changes of cluster i.
pub fn response(version: u64, generations: &[u64]) -> DiscoveryResponse {
    DiscoveryResponse {
        type_url: xds::CLUSTER.into(),
        version_info: version.to_string(),
        resources: (0..CLUSTERS).map(|i| cluster(i, generations[i])).collect(),
        ..Default::default()
    }
}

/// A wildcard delta client in line with `state`.
pub fn delta_client(state: &KeyState) -> DeltaSubscription {
    let none = Default::default();
    let mut sub = DeltaSubscription::default();
    delta_subscription::apply_change(
        &mut sub,
        DeltaChange { subscribe: &[], unsubscribe: &[], initial_versions: &none },
    );
    delta_subscription::compute(&mut sub, state);
    sub
}
