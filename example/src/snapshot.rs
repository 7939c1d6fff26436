//! Builds the example configuration: clusters, endpoints, listeners and routes.
//!
//! Everything here is pure: [`build`] turns a [`SnapshotSpec`], a version and a generation into a
//! [`Snapshot`] that holds, per v3 type URL, an ordered map from resource name to packed [`Any`].
//!
//! Invariants:
//! - every resource is reachable through ADS only (every `ConfigSource` is `ads {}` + V3), so
//!   proxyless gRPC clients accept it;
//! - every ClusterLoadAssignment carries the snapshot version in its endpoint metadata, so every
//!   CLA changes on every publish;
//! - with two or more configured endpoints, each generation moves every cluster to another
//!   backend.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, Locality, Metadata, SocketAddress, address,
    config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::google::protobuf::{Any, Duration, Struct, UInt32Value, Value, value};
use envoy_types::util::pack_any;

/// Type URL of `envoy.config.listener.v3.Listener` (LDS).
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Type URL of `envoy.config.route.v3.RouteConfiguration` (RDS).
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Type URL of `envoy.config.cluster.v3.Cluster` (CDS).
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Type URL of `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The four core type URLs in make-before-break push order: CDS, EDS, LDS, RDS.
pub const PUSH_ORDER: [&str; 4] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

/// Key of the endpoint filter metadata that carries the snapshot version.
pub const METADATA_FILTER: &str = "xds-relay-example";

/// Name prefix of the Envoy listeners in a snapshot; LDS names without it are API listeners.
pub const LISTENER_PREFIX: &str = "listener_";

/// Filter name of the HTTP connection manager network filter.
const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
/// Filter name of the router HTTP filter.
const ROUTER_FILTER: &str = "envoy.filters.http.router";

/// What a snapshot contains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotSpec {
    /// Number of clusters (and ClusterLoadAssignments) `cluster_{i}`; with 0, routes point at a
    /// `cluster_0` that does not exist.
    pub clusters: usize,
    /// Number of Envoy listeners `listener_{j}` (and RouteConfigurations `route_{j}`).
    pub listeners: usize,
    /// Real backends; when empty, each cluster gets a synthetic `127.0.0.1:(12000 + i)`.
    pub endpoints: Vec<SocketAddr>,
}

/// One immutable set of resources, per type URL, ordered by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The version every response built from this snapshot carries.
    pub version: String,
    /// Publish counter of this snapshot (drives the endpoint rotation).
    pub generation: u64,
    /// Type URL → resource name → packed resource.
    pub resources: BTreeMap<String, BTreeMap<String, Any>>,
    /// Type URL → resource name → its dynamic-parameter variants, in preference order (a
    /// subscription gets the first whose constraints match its parameters). Names listed here
    /// are also in `resources`, with the variant a wildcard without parameters gets.
    pub variants: BTreeMap<String, BTreeMap<String, Vec<Variant>>>,
}

/// One variant of a resource (xRFC TP2).
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Which subscriptions get this variant.
    pub constraints: envoy_types::pb::envoy::service::discovery::v3::DynamicParameterConstraints,
    /// The packed resource.
    pub resource: Any,
}

impl Snapshot {
    /// The resources of one type, if the snapshot has any of that type.
    pub fn resources_of(&self, type_url: &str) -> Option<&BTreeMap<String, Any>> {
        self.resources.get(type_url)
    }

    /// One resource by type URL and name.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&Any> {
        self.resources.get(type_url)?.get(name)
    }

    /// Number of resources of one type.
    pub fn count(&self, type_url: &str) -> usize {
        self.resources.get(type_url).map_or(0, BTreeMap::len)
    }
}

/// Builds the snapshot described by `spec`, stamped with `version`.
///
/// `generation` picks each cluster's backend: `endpoints[(generation + i) % len]`.
pub fn build(spec: &SnapshotSpec, version: &str, generation: u64) -> Snapshot {
    let mut resources: BTreeMap<String, BTreeMap<String, Any>> = BTreeMap::new();
    let mut clusters = BTreeMap::new();
    let mut assignments = BTreeMap::new();
    for i in 0..spec.clusters {
        let name = cluster_name(i);
        clusters.insert(name.clone(), pack_any(cluster(&name)));
        let backend = backend_for(spec, generation, i);
        assignments.insert(name.clone(), pack_any(load_assignment(&name, backend, version)));
    }
    let mut listeners = BTreeMap::new();
    let mut routes = BTreeMap::new();
    for j in 0..spec.listeners {
        let name = format!("{LISTENER_PREFIX}{j}");
        let route_name = format!("route_{j}");
        let port = u32::try_from(10_000 + j).unwrap_or(u32::MAX);
        listeners.insert(name.clone(), pack_any(envoy_listener(&name, &route_name, port)));
        let target = cluster_name(j.checked_rem(spec.clusters).unwrap_or(0));
        routes.insert(route_name.clone(), route(&route_name, &target));
    }
    resources.insert(CLUSTER_TYPE.to_owned(), clusters);
    resources.insert(ENDPOINT_TYPE.to_owned(), assignments);
    resources.insert(LISTENER_TYPE.to_owned(), listeners);
    resources.insert(ROUTE_TYPE.to_owned(), routes);
    Snapshot { version: version.to_owned(), generation, resources, variants: BTreeMap::new() }
}

/// An LDS resource for a proxyless gRPC target: an API listener whose HttpConnectionManager
/// fetches `route_0` over ADS and ends in the router filter.
pub fn api_listener(name: &str) -> Any {
    api_listener_with_route(name, "route_0")
}

/// An LDS resource for a proxyless gRPC target: an API listener whose HttpConnectionManager
/// fetches `route_name` over ADS and ends in the router filter.
pub fn api_listener_with_route(name: &str, route_name: &str) -> Any {
    let listener = Listener {
        name: name.to_owned(),
        api_listener: Some(ApiListener { api_listener: Some(pack_any(http_connection_manager(name, route_name))) }),
        ..Default::default()
    };
    pack_any(listener)
}

/// An RDS resource: one virtual host matching every domain, routing prefix `/` to `cluster`.
pub fn route(name: &str, cluster: &str) -> Any {
    pack_any(route_configuration(name, cluster))
}

/// The name of cluster `i`.
fn cluster_name(i: usize) -> String {
    format!("cluster_{i}")
}

/// The backend of cluster `i` at `generation`.
fn backend_for(spec: &SnapshotSpec, generation: u64, i: usize) -> SocketAddr {
    if spec.endpoints.is_empty() {
        let port = u16::try_from(12_000 + i).unwrap_or(u16::MAX);
        return SocketAddr::from(([127, 0, 0, 1], port));
    }
    let len = spec.endpoints.len() as u64;
    // The remainder is below `len`, so it fits in usize.
    let index = (generation.wrapping_add(i as u64) % len) as usize;
    spec.endpoints[index]
}

/// A ConfigSource that points at the ADS stream, API v3.
fn ads_config_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// An EDS cluster with round-robin balancing.
fn cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: String::new(),
        }),
        connect_timeout: Some(Duration { seconds: 1, nanos: 0 }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    }
}

/// A socket address in Envoy's form.
fn socket_address(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(addr.port()))),
            ..Default::default()
        })),
    }
}

/// One locality with weight 1 (mandatory for gRPC) holding one endpoint tagged with `version`.
fn load_assignment(cluster_name: &str, backend: SocketAddr, version: &str) -> ClusterLoadAssignment {
    let version_value = Value { kind: Some(value::Kind::StringValue(version.to_owned())) };
    let metadata = Metadata {
        filter_metadata: [(
            METADATA_FILTER.to_owned(),
            Struct { fields: [("version".to_owned(), version_value)].into_iter().collect() },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let endpoint = LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(socket_address(backend)),
            ..Default::default()
        })),
        metadata: Some(metadata),
        ..Default::default()
    };
    ClusterLoadAssignment {
        cluster_name: cluster_name.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            locality: Some(Locality {
                region: "example".to_owned(),
                zone: "zone-a".to_owned(),
                sub_zone: String::new(),
            }),
            lb_endpoints: vec![endpoint],
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An HttpConnectionManager that fetches `route_name` over ADS and ends in the router filter.
fn http_connection_manager(stat_prefix: &str, route_name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_owned(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: route_name.to_owned(),
        })),
        http_filters: vec![HttpFilter {
            name: ROUTER_FILTER.to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An Envoy listener on `0.0.0.0:port` with one HTTP filter chain using RDS `route_name`.
fn envoy_listener(name: &str, route_name: &str, port: u32) -> Listener {
    let hcm = http_connection_manager(name, route_name);
    Listener {
        name: name.to_owned(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "0.0.0.0".to_owned(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: HCM_FILTER.to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One virtual host matching every domain, routing prefix `/` to `cluster`.
fn route_configuration(name: &str, cluster: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: format!("{name}_vhost"),
            domains: vec!["*".to_owned()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_owned())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_owned())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn cla(snapshot: &Snapshot, name: &str) -> ClusterLoadAssignment {
        let any = snapshot.get(ENDPOINT_TYPE, name).expect("cla present");
        ClusterLoadAssignment::decode(any.value.as_slice()).expect("decodes")
    }

    fn endpoint_port(cla: &ClusterLoadAssignment) -> u32 {
        let lb = &cla.endpoints[0].lb_endpoints[0];
        let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else { panic!("no endpoint") };
        let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref()) else {
            panic!("no socket address")
        };
        match sa.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => p,
            _ => panic!("no port"),
        }
    }

    #[test]
    fn counts_and_names() {
        let spec = SnapshotSpec { clusters: 3, listeners: 2, endpoints: vec![] };
        let s = build(&spec, "v1", 1);
        assert_eq!(s.count(CLUSTER_TYPE), 3);
        assert_eq!(s.count(ENDPOINT_TYPE), 3);
        assert_eq!(s.count(LISTENER_TYPE), 2);
        assert_eq!(s.count(ROUTE_TYPE), 2);
        assert!(s.get(CLUSTER_TYPE, "cluster_2").is_some());
        assert!(s.get(LISTENER_TYPE, "listener_1").is_some());
        assert_eq!(endpoint_port(&cla(&s, "cluster_1")), 12_001);
        let route = s.get(ROUTE_TYPE, "route_1").expect("route");
        let route = RouteConfiguration::decode(route.value.as_slice()).expect("decodes");
        let action = route.virtual_hosts[0].routes[0].action.clone();
        let Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(c)),
            ..
        })) = action
        else {
            panic!("no cluster route")
        };
        assert_eq!(c, "cluster_1");
    }

    #[test]
    fn cluster_is_grpc_compatible() {
        let s = build(&SnapshotSpec { clusters: 1, listeners: 0, endpoints: vec![] }, "v", 0);
        let c = Cluster::decode(s.get(CLUSTER_TYPE, "cluster_0").expect("c").value.as_slice()).expect("decodes");
        assert_eq!(c.lb_policy, cluster::LbPolicy::RoundRobin as i32);
        let eds = c.eds_cluster_config.expect("eds config").eds_config.expect("config source");
        assert!(matches!(eds.config_source_specifier, Some(config_source::ConfigSourceSpecifier::Ads(_))));
        let cla = cla(&s, "cluster_0");
        assert_eq!(cla.endpoints[0].load_balancing_weight, Some(UInt32Value { value: 1 }));
    }

    #[test]
    fn endpoints_rotate_and_carry_version() {
        let a: SocketAddr = "127.0.0.1:7001".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:7002".parse().expect("addr");
        let spec = SnapshotSpec { clusters: 2, listeners: 0, endpoints: vec![a, b] };
        let g1 = build(&spec, "1", 1);
        let g2 = build(&spec, "2", 2);
        assert_eq!(endpoint_port(&cla(&g1, "cluster_0")), 7002);
        assert_eq!(endpoint_port(&cla(&g2, "cluster_0")), 7001);
        assert_eq!(endpoint_port(&cla(&g2, "cluster_1")), 7002);
        let md = cla(&g2, "cluster_1").endpoints[0].lb_endpoints[0].metadata.clone().expect("md");
        let version = &md.filter_metadata[METADATA_FILTER].fields["version"];
        assert_eq!(version.kind, Some(value::Kind::StringValue("2".to_owned())));
        assert_ne!(g1.get(ENDPOINT_TYPE, "cluster_0"), g2.get(ENDPOINT_TYPE, "cluster_0"));
    }

    #[test]
    fn api_listener_uses_rds_over_ads_and_router() {
        let any = api_listener("hello.test");
        assert_eq!(any.type_url, LISTENER_TYPE);
        let l = Listener::decode(any.value.as_slice()).expect("decodes");
        assert_eq!(l.name, "hello.test");
        let inner = l.api_listener.and_then(|a| a.api_listener).expect("api listener");
        let hcm = HttpConnectionManager::decode(inner.value.as_slice()).expect("hcm");
        let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = hcm.route_specifier else { panic!("no rds") };
        assert_eq!(rds.route_config_name, "route_0");
        assert_eq!(hcm.http_filters.len(), 1);
        assert_eq!(hcm.http_filters[0].name, ROUTER_FILTER);
    }
}
