//! xDS protocol vocabulary shared by every module: v3 type URLs, which types carry full
//! state in state-of-the-world, and the make-before-break order of types on an ADS stream.
//!
//! Invariant: everything here is pure data; no module state.

/// Prefix of every type URL.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// LDS resource type.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// RDS resource type.
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// SRDS resource type.
pub const SCOPED_ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration";
/// VHDS resource type (delta only).
pub const VIRTUAL_HOST: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
/// CDS resource type.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// EDS resource type.
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// LEDS resource type.
pub const LB_ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.LbEndpoint";
/// SDS resource type.
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// RTDS resource type.
pub const RUNTIME: &str = "type.googleapis.com/envoy.service.runtime.v3.Runtime";
/// ECDS resource type.
pub const EXTENSION_CONFIG: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";

/// gRPC path of the aggregated state-of-the-world method.
pub const ADS_SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
/// gRPC path of the aggregated delta method.
pub const ADS_DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Per-type state-of-the-world methods: gRPC path and the type they serve.
pub const SOTW_METHODS: [(&str, &str); 8] = [
    ("/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners", LISTENER),
    ("/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes", ROUTE),
    ("/envoy.service.route.v3.ScopedRoutesDiscoveryService/StreamScopedRoutes", SCOPED_ROUTE),
    ("/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters", CLUSTER),
    ("/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints", ENDPOINT),
    ("/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets", SECRET),
    ("/envoy.service.runtime.v3.RuntimeDiscoveryService/StreamRuntime", RUNTIME),
    ("/envoy.service.extension.v3.ExtensionConfigDiscoveryService/StreamExtensionConfigs", EXTENSION_CONFIG),
];

/// Per-type delta methods: gRPC path and the type they serve.
pub const DELTA_METHODS: [(&str, &str); 10] = [
    ("/envoy.service.listener.v3.ListenerDiscoveryService/DeltaListeners", LISTENER),
    ("/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes", ROUTE),
    ("/envoy.service.route.v3.ScopedRoutesDiscoveryService/DeltaScopedRoutes", SCOPED_ROUTE),
    ("/envoy.service.route.v3.VirtualHostDiscoveryService/DeltaVirtualHosts", VIRTUAL_HOST),
    ("/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters", CLUSTER),
    ("/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints", ENDPOINT),
    ("/envoy.service.endpoint.v3.LocalityEndpointDiscoveryService/DeltaLocalityEndpoints", LB_ENDPOINT),
    ("/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets", SECRET),
    ("/envoy.service.runtime.v3.RuntimeDiscoveryService/DeltaRuntime", RUNTIME),
    ("/envoy.service.extension.v3.ExtensionConfigDiscoveryService/DeltaExtensionConfigs", EXTENSION_CONFIG),
];

/// Unary (REST-style) fetch methods, which the relay answers with `Unimplemented`.
pub const FETCH_METHODS: [&str; 8] = [
    "/envoy.service.listener.v3.ListenerDiscoveryService/FetchListeners",
    "/envoy.service.route.v3.RouteDiscoveryService/FetchRoutes",
    "/envoy.service.route.v3.ScopedRoutesDiscoveryService/FetchScopedRoutes",
    "/envoy.service.cluster.v3.ClusterDiscoveryService/FetchClusters",
    "/envoy.service.endpoint.v3.EndpointDiscoveryService/FetchEndpoints",
    "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
    "/envoy.service.runtime.v3.RuntimeDiscoveryService/FetchRuntime",
    "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/FetchExtensionConfigs",
];

/// The per-type state-of-the-world method serving `type_url`, if there is one.
pub fn sotw_path(type_url: &str) -> Option<&'static str> {
    SOTW_METHODS.iter().find(|(_, t)| *t == type_url).map(|(p, _)| *p)
}

/// Prefix shared by the retired v2 API's type URLs (`envoy.api.v2.*`, `envoy.service.*.v2.*`).
const V2_MARKERS: [&str; 2] = ["type.googleapis.com/envoy.api.v2.", ".v2."];

/// True for the types whose state-of-the-world responses must carry every subscribed
/// resource (LDS and CDS): a resource missing from a response is deleted by the client.
pub fn is_full_state(type_url: &str) -> bool {
    type_url == LISTENER || type_url == CLUSTER
}

/// True for the types where an empty first request means "wildcard" (legacy wildcard).
pub fn allows_legacy_wildcard(type_url: &str) -> bool {
    is_full_state(type_url)
}

/// True for the v3 types whose message (and so name field) the relay knows.
pub fn is_known(type_url: &str) -> bool {
    matches!(
        type_url,
        LISTENER
            | ROUTE
            | SCOPED_ROUTE
            | VIRTUAL_HOST
            | CLUSTER
            | ENDPOINT
            | LB_ENDPOINT
            | SECRET
            | RUNTIME
            | EXTENSION_CONFIG
    )
}

/// True for a v2 type URL, which this relay does not serve.
pub fn is_v2(type_url: &str) -> bool {
    type_url.starts_with(V2_MARKERS[0])
        || (type_url.starts_with("type.googleapis.com/envoy.") && type_url.contains(V2_MARKERS[1]))
}

/// Rank of a type in make-before-break order (CDS, EDS, LDS, RDS, then everything else);
/// lower is sent first.
pub fn push_order(type_url: &str) -> u8 {
    match type_url {
        CLUSTER => 0,
        ENDPOINT => 1,
        LB_ENDPOINT => 2,
        LISTENER => 3,
        ROUTE => 4,
        SCOPED_ROUTE => 5,
        VIRTUAL_HOST => 6,
        _ => 7,
    }
}

/// Short name of a known v3 type ("cds", "eds", …); `None` for any other type URL.
pub fn known_short_name(type_url: &str) -> Option<&'static str> {
    Some(match type_url {
        LISTENER => "lds",
        ROUTE => "rds",
        SCOPED_ROUTE => "srds",
        VIRTUAL_HOST => "vhds",
        CLUSTER => "cds",
        ENDPOINT => "eds",
        LB_ENDPOINT => "leds",
        SECRET => "sds",
        RUNTIME => "rtds",
        EXTENSION_CONFIG => "ecds",
        _ => return None,
    })
}

/// Short name of a type for logs and messages ("cds", "eds", …); unknown types keep their
/// message name. Metric labels use [`type_label`] instead.
pub fn short_name(type_url: &str) -> &str {
    known_short_name(type_url).unwrap_or_else(|| type_url.strip_prefix(TYPE_URL_PREFIX).unwrap_or(type_url))
}

/// Label value of unknown types in metrics.
pub const OTHER_TYPE_LABEL: &str = "other";

/// The `type` label of a metric: the short name of a known v3 type, `other` for any type URL
/// a client or origin invents. Guarantees a fixed, small set of label values whatever the
/// relay is sent.
pub fn type_label(type_url: &str) -> &'static str {
    known_short_name(type_url).unwrap_or(OTHER_TYPE_LABEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_type_urls_are_recognised() {
        assert!(is_v2("type.googleapis.com/envoy.api.v2.Cluster"));
        assert!(is_v2("type.googleapis.com/envoy.api.v2.ClusterLoadAssignment"));
        assert!(is_v2("type.googleapis.com/envoy.service.discovery.v2.Runtime"));
        assert!(!is_v2(CLUSTER));
        assert!(!is_v2("type.googleapis.com/acme.v2.Thing"));
    }

    #[test]
    fn push_order_is_make_before_break() {
        let mut types = vec![ROUTE, LISTENER, "type.googleapis.com/x.Y", ENDPOINT, CLUSTER];
        types.sort_by_key(|t| push_order(t));
        assert_eq!(types, vec![CLUSTER, ENDPOINT, LISTENER, ROUTE, "type.googleapis.com/x.Y"]);
    }

    #[test]
    fn type_labels_are_bounded() {
        assert_eq!(type_label(CLUSTER), "cds");
        assert_eq!(type_label(LB_ENDPOINT), "leds");
        assert_eq!(type_label("type.googleapis.com/acme.Invented"), "other");
        assert_eq!(type_label("type.googleapis.com/envoy.api.v2.Cluster"), "other");
        assert_eq!(short_name("type.googleapis.com/acme.Invented"), "acme.Invented");
        assert_eq!(short_name(ENDPOINT), "eds");
    }

    #[test]
    fn only_lds_and_cds_carry_full_state() {
        assert!(is_full_state(LISTENER) && is_full_state(CLUSTER));
        assert!(!is_full_state(ENDPOINT) && !is_full_state(ROUTE) && !is_full_state(SECRET));
    }
}
