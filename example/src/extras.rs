//! Protocol extras the example server layers on top of each snapshot, for testing what a caching
//! proxy owes its clients: TTLs and heartbeats, `do_not_cache`, per-resource errors, xDS-TP1
//! (`xdstp://`) names and TP2 dynamic-parameter variants.
//!
//! [`ExtrasSpec`] is the text form (command-line flags and the JSON body of `POST /extras`);
//! [`Extras::parse`] validates it (bounded sizes, every error names its field). The snapshot side
//! ([`apply`]) adds xdstp resources and variants; the response side ([`Extras::sotw_resource`],
//! [`Extras::delta_resource`], [`Extras::errors_for`]) shapes each resource sent.
//!
//! Invariants:
//! - only CDS resources carry a TTL; heartbeats are sent only with a TTL set;
//! - a resource is wrapped in `envoy.service.discovery.v3.Resource` (SotW) only when it carries
//!   a TTL, `cache_control` or dynamic-parameter constraints; otherwise it is sent bare;
//! - a name with a configured error is never sent as a resource of that type.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::{RouteAction, RouteConfiguration, route};
use envoy_types::pb::envoy::service::discovery::v3::resource::CacheControl;
use envoy_types::pb::envoy::service::discovery::v3::{
    DynamicParameterConstraints, Resource, ResourceError, ResourceName,
};
use envoy_types::pb::google::protobuf::{self, Any, Struct, Value, value};
use envoy_types::pb::google::rpc;
use envoy_types::util::pack_any;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::duration::parse_duration;
use crate::snapshot::{
    self, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, METADATA_FILTER, ROUTE_TYPE, Snapshot, Variant,
};
use crate::{constraints, tp1};

/// Type URL of the `envoy.service.discovery.v3.Resource` wrapper.
pub const RESOURCE_WRAPPER_TYPE: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// Most `do_not_cache` names and most resource errors accepted.
pub const MAX_ENTRIES: usize = 1024;
/// Longest resource-error message, name, authority or parameter accepted, in bytes.
pub const MAX_TEXT: usize = 1024;
/// Most dynamic-parameter values accepted.
pub const MAX_VALUES: usize = 64;

/// Name of the cluster metadata field that names a variant's dynamic-parameter value.
pub const VARIANT_FIELD: &str = "variant";
/// The variant field of the default variant (the one for clients without the key).
pub const DEFAULT_VARIANT: &str = "default";

/// The text form of the extras: the command-line flags, and the JSON body of `POST /extras`
/// (every field optional; an absent field turns that extra off).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExtrasSpec {
    /// TTL of every CDS resource (`30s`, `500ms`, `1m`).
    pub ttl: Option<String>,
    /// Interval of CDS heartbeats between publishes (needs `ttl`).
    pub heartbeat_interval: Option<String>,
    /// Names (any type) sent with `cache_control { do_not_cache: true }`.
    pub do_not_cache: Vec<String>,
    /// `<cds|eds|lds|rds>/<name>=<grpc code>:<message>` entries.
    pub resource_errors: Vec<String>,
    /// Authority of the `xdstp://` resources published alongside the plain ones.
    pub xdstp_authority: Option<String>,
    /// `<key>=<v1>,<v2>,...`: each CDS `cluster_<i>` is published as one variant per value plus
    /// a default.
    pub dynamic_parameter: Option<String>,
    /// CDS clusters published with `lb_policy: MAGLEV`, a policy proxyless gRPC rejects (a
    /// "bad version" for rollout tests): a name of the snapshot changes that cluster, any
    /// other name adds a copy of `cluster_0` under it.
    pub bad_clusters: Vec<String>,
}

/// Why an [`ExtrasSpec`] was refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid extras field {field}: {reason}")]
pub struct ExtrasError {
    /// The offending field (the flag name without `--`, with `_` for `-`).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// One configured resource error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceErrorRule {
    /// The type URL the error applies to.
    pub type_url: String,
    /// The resource name.
    pub name: String,
    /// The gRPC status code (1..=16).
    pub code: i32,
    /// The status message.
    pub message: String,
}

/// The TP2 dynamic parameter variants are published for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicParameter {
    /// The parameter key.
    pub key: String,
    /// One variant per value, in this order.
    pub values: Vec<String>,
}

/// Validated extras; the default turns every extra off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extras {
    /// The text these were parsed from (reported by `/stats`).
    pub spec: ExtrasSpec,
    /// TTL of every CDS resource.
    pub ttl: Option<Duration>,
    /// Interval of CDS heartbeats (only with a TTL).
    pub heartbeat_interval: Option<Duration>,
    /// Names sent with `do_not_cache`.
    pub do_not_cache: BTreeSet<String>,
    /// Configured resource errors.
    pub resource_errors: Vec<ResourceErrorRule>,
    /// Authority of the published `xdstp://` resources.
    pub xdstp_authority: Option<String>,
    /// The dynamic parameter of the CDS variants.
    pub dynamic_parameter: Option<DynamicParameter>,
    /// Clusters published with `lb_policy: MAGLEV`.
    pub bad_clusters: BTreeSet<String>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ExtrasError {
    ExtrasError { field, reason: reason.into() }
}

fn check_text(field: &'static str, text: &str) -> Result<(), ExtrasError> {
    if text.is_empty() {
        return Err(invalid(field, "empty value"));
    }
    if text.len() > MAX_TEXT {
        return Err(invalid(field, format!("longer than {MAX_TEXT} bytes")));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

fn positive_duration(field: &'static str, text: &Option<String>) -> Result<Option<Duration>, ExtrasError> {
    let Some(text) = text else { return Ok(None) };
    match parse_duration(text) {
        Ok(d) if d.is_zero() => Err(invalid(field, "must be positive")),
        Ok(d) => Ok(Some(d)),
        Err(e) => Err(invalid(field, e)),
    }
}

/// The type URL of a short type name (`cds`, `eds`, `lds`, `rds`).
pub fn type_url_of(short: &str) -> Option<&'static str> {
    match short {
        "cds" => Some(CLUSTER_TYPE),
        "eds" => Some(ENDPOINT_TYPE),
        "lds" => Some(LISTENER_TYPE),
        "rds" => Some(ROUTE_TYPE),
        _ => None,
    }
}

/// Parses `<cds|eds|lds|rds>/<name>=<code>:<message>`.
///
/// # Errors
///
/// When a part is missing, the type is unknown, or the code is not 1..=16.
pub fn parse_resource_error(text: &str) -> Result<ResourceErrorRule, ExtrasError> {
    const FIELD: &str = "resource_error";
    check_text(FIELD, text)?;
    let (short, rest) = text
        .split_once('/')
        .ok_or_else(|| invalid(FIELD, format!("{text:?}: expected <type>/<name>=<code>:<message>")))?;
    let type_url =
        type_url_of(short).ok_or_else(|| invalid(FIELD, format!("{text:?}: type must be cds, eds, lds or rds")))?;
    let (name, error) =
        rest.rsplit_once('=').ok_or_else(|| invalid(FIELD, format!("{text:?}: missing =<code>:<message>")))?;
    let (code, message) =
        error.split_once(':').ok_or_else(|| invalid(FIELD, format!("{text:?}: missing :<message>")))?;
    let code: i32 =
        code.trim().parse().map_err(|_| invalid(FIELD, format!("{text:?}: code {code:?} is not a number")))?;
    if !(1..=16).contains(&code) {
        return Err(invalid(FIELD, format!("{text:?}: code {code} is not a gRPC error code (1..=16)")));
    }
    check_text(FIELD, name)?;
    Ok(ResourceErrorRule { type_url: type_url.to_owned(), name: name.to_owned(), code, message: message.to_owned() })
}

/// Parses `<key>=<v1>,<v2>,...`.
///
/// # Errors
///
/// When the key or a value is empty, a value repeats, or there are too many values.
pub fn parse_dynamic_parameter(text: &str) -> Result<DynamicParameter, ExtrasError> {
    const FIELD: &str = "dynamic_parameter";
    check_text(FIELD, text)?;
    let (key, values) =
        text.split_once('=').ok_or_else(|| invalid(FIELD, format!("{text:?}: expected <key>=<v1>,<v2>,...")))?;
    check_text(FIELD, key)?;
    let values: Vec<String> = values.split(',').map(str::to_owned).collect();
    if values.len() > MAX_VALUES {
        return Err(invalid(FIELD, format!("more than {MAX_VALUES} values")));
    }
    let mut seen = BTreeSet::new();
    for v in &values {
        check_text(FIELD, v)?;
        if !seen.insert(v) {
            return Err(invalid(FIELD, format!("value {v:?} appears twice")));
        }
    }
    Ok(DynamicParameter { key: key.to_owned(), values })
}

// === impl Extras ===

impl Extras {
    /// Validates `spec`.
    ///
    /// # Errors
    ///
    /// [`ExtrasError`] naming the first invalid field.
    pub fn parse(spec: ExtrasSpec) -> Result<Self, ExtrasError> {
        let ttl = positive_duration("ttl", &spec.ttl)?;
        let heartbeat_interval = positive_duration("heartbeat_interval", &spec.heartbeat_interval)?;
        if heartbeat_interval.is_some() && ttl.is_none() {
            return Err(invalid("heartbeat_interval", "needs ttl"));
        }
        if spec.do_not_cache.len() > MAX_ENTRIES {
            return Err(invalid("do_not_cache", format!("more than {MAX_ENTRIES} names")));
        }
        for name in &spec.do_not_cache {
            check_text("do_not_cache", name)?;
        }
        if spec.resource_errors.len() > MAX_ENTRIES {
            return Err(invalid("resource_error", format!("more than {MAX_ENTRIES} entries")));
        }
        let resource_errors = spec.resource_errors.iter().map(|e| parse_resource_error(e)).collect::<Result<_, _>>()?;
        if let Some(auth) = &spec.xdstp_authority {
            check_text("xdstp_authority", auth)?;
            if auth.contains(['/', '?', '&', '#', ' ']) {
                return Err(invalid(
                    "xdstp_authority",
                    format!("{auth:?} must not contain '/', '?', '&', '#' or spaces"),
                ));
            }
        }
        let dynamic_parameter = spec.dynamic_parameter.as_deref().map(parse_dynamic_parameter).transpose()?;
        if spec.bad_clusters.len() > MAX_ENTRIES {
            return Err(invalid("bad_clusters", format!("more than {MAX_ENTRIES} names")));
        }
        for name in &spec.bad_clusters {
            check_text("bad_clusters", name)?;
        }
        Ok(Self {
            bad_clusters: spec.bad_clusters.iter().cloned().collect(),
            ttl,
            heartbeat_interval,
            do_not_cache: spec.do_not_cache.iter().cloned().collect(),
            resource_errors,
            xdstp_authority: spec.xdstp_authority.clone(),
            dynamic_parameter,
            spec,
        })
    }

    /// The TTL resources of `type_url` carry (only CDS has one).
    pub fn ttl_for(&self, type_url: &str) -> Option<Duration> {
        if type_url == CLUSTER_TYPE { self.ttl } else { None }
    }

    /// The interval of CDS heartbeats, when they are on.
    pub fn heartbeats(&self) -> Option<Duration> {
        self.ttl.and(self.heartbeat_interval)
    }

    /// Whether `name` of `type_url` has a configured error.
    pub fn has_error(&self, type_url: &str, name: &str) -> bool {
        self.resource_errors.iter().any(|e| e.type_url == type_url && e.name == name)
    }

    /// The errors of `type_url` whose names `covers` accepts, in configuration order.
    pub fn errors_for(&self, type_url: &str, covers: impl Fn(&str) -> bool) -> Vec<ResourceError> {
        self.resource_errors
            .iter()
            .filter(|e| e.type_url == type_url && covers(&e.name))
            .map(|e| ResourceError {
                resource_name: Some(ResourceName { name: e.name.clone(), dynamic_parameter_constraints: None }),
                error_detail: Some(rpc::Status { code: e.code, message: e.message.clone(), details: vec![] }),
            })
            .collect()
    }

    /// The delta form of `resource` named `name` at `version`: TTL, cache control and
    /// constraints set as configured; `resource_name` replaces `name` for variants.
    pub fn delta_resource(
        &self,
        type_url: &str,
        name: &str,
        version: &str,
        resource: Option<Any>,
        constraints: Option<&DynamicParameterConstraints>,
    ) -> Resource {
        let (name, resource_name) = match constraints {
            Some(c) => (
                String::new(),
                Some(ResourceName { name: name.to_owned(), dynamic_parameter_constraints: Some(c.clone()) }),
            ),
            None => (name.to_owned(), None),
        };
        let cache_control =
            self.do_not_cache.contains(resource_name.as_ref().map_or(name.as_str(), |n| n.name.as_str()));
        Resource {
            name,
            resource_name,
            version: version.to_owned(),
            resource,
            ttl: self.ttl_for(type_url).map(proto_duration),
            cache_control: cache_control.then_some(CacheControl { do_not_cache: true }),
            ..Default::default()
        }
    }

    /// The SotW form of `resource` named `name`: bare, or packed in a `Resource` wrapper (at
    /// `version`) when it carries a TTL, cache control or constraints.
    pub fn sotw_resource(
        &self,
        type_url: &str,
        name: &str,
        version: &str,
        resource: Any,
        constraints: Option<&DynamicParameterConstraints>,
    ) -> Any {
        let wrap = self.ttl_for(type_url).is_some() || self.do_not_cache.contains(name) || constraints.is_some();
        if !wrap {
            return resource;
        }
        wrapper(self.delta_resource(type_url, name, version, Some(resource), constraints))
    }

    /// A SotW heartbeat entry: a bodyless wrapper with the name, version and TTL.
    pub fn sotw_heartbeat(
        &self,
        type_url: &str,
        name: &str,
        version: &str,
        constraints: Option<&DynamicParameterConstraints>,
    ) -> Any {
        wrapper(self.delta_resource(type_url, name, version, None, constraints))
    }
}

/// Packs a `Resource` wrapper into an `Any`.
pub fn wrapper(resource: Resource) -> Any {
    Any { type_url: RESOURCE_WRAPPER_TYPE.to_owned(), value: resource.encode_to_vec() }
}

/// A `google.protobuf.Duration` of `d`.
pub fn proto_duration(d: Duration) -> protobuf::Duration {
    protobuf::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The `xdstp://` name of resource `id` of the `envoy.config.*` message `message_type`.
pub fn xdstp_name(authority: &str, message_type: &str, id: &str) -> String {
    format!("xdstp://{authority}/{message_type}/fleet/{id}")
}

/// `any` (a Cluster, ClusterLoadAssignment, Listener or RouteConfiguration) with its name
/// replaced by `name`; `None` for other types or undecodable bytes.
pub fn renamed(type_url: &str, any: &Any, name: &str) -> Option<Any> {
    let bytes = any.value.as_slice();
    Some(match type_url {
        CLUSTER_TYPE => pack_any(Cluster { name: name.to_owned(), ..Cluster::decode(bytes).ok()? }),
        ENDPOINT_TYPE => pack_any(ClusterLoadAssignment {
            cluster_name: name.to_owned(),
            ..ClusterLoadAssignment::decode(bytes).ok()?
        }),
        LISTENER_TYPE => pack_any(Listener { name: name.to_owned(), ..Listener::decode(bytes).ok()? }),
        ROUTE_TYPE => pack_any(RouteConfiguration { name: name.to_owned(), ..RouteConfiguration::decode(bytes).ok()? }),
        _ => return None,
    })
}

/// The `xdstp://` listener name of proxyless gRPC target `target` (what a gRPC client's
/// `client_default_listener_resource_name_template` `xdstp://<authority>/envoy.config.listener.v3.Listener/%s`
/// makes of it; `target` is used as given, so pass it percent-encoded).
pub fn xdstp_listener_name(authority: &str, target: &str) -> String {
    format!("xdstp://{authority}/envoy.config.listener.v3.Listener/{target}")
}

/// The proxyless gRPC target whose API listener is published under an `xdstp://` name.
pub const XDSTP_API_TARGET: &str = "example-service";

/// Adds to `snapshot` what `extras` publish: the `xdstp://` copy of every cluster, CLA and
/// route (an xdstp route points at the xdstp copies of its clusters), the xdstp API listener of
/// [`XDSTP_API_TARGET`] (RDS over ADS of the xdstp `route_0`), and the dynamic-parameter
/// variants of every plain CDS `cluster_<i>`.
pub fn apply(snapshot: &mut Snapshot, extras: &Extras) {
    if let Some(auth) = &extras.xdstp_authority {
        add_xdstp(snapshot, auth);
    }
    if let Some(param) = &extras.dynamic_parameter {
        add_variants(snapshot, param);
    }
    for name in &extras.bad_clusters {
        add_bad_cluster(snapshot, name);
    }
}

/// Publishes `name` with `lb_policy: MAGLEV`: the snapshot's cluster of that name, or a copy
/// of `cluster_0` under that name.
fn add_bad_cluster(snapshot: &mut Snapshot, name: &str) {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
    let base = snapshot.get(CLUSTER_TYPE, name).or_else(|| snapshot.get(CLUSTER_TYPE, "cluster_0"));
    let mut cluster = base.and_then(|a| Cluster::decode(a.value.as_slice()).ok()).unwrap_or_default();
    cluster.name = name.to_owned();
    cluster.lb_policy = LbPolicy::Maglev as i32;
    snapshot.resources.entry(CLUSTER_TYPE.to_owned()).or_default().insert(name.to_owned(), pack_any(cluster));
}

fn add_xdstp(snapshot: &mut Snapshot, auth: &str) {
    let plain: Vec<(String, Any)> = snapshot
        .resources_of(CLUSTER_TYPE)
        .map(|all| all.iter().filter(|(n, _)| !n.starts_with("xdstp:")).map(|(n, a)| (n.clone(), a.clone())).collect())
        .unwrap_or_default();
    for (id, any) in plain {
        let cla_name = xdstp_name(auth, "envoy.config.endpoint.v3.ClusterLoadAssignment", &id);
        let Ok(mut cluster) = Cluster::decode(any.value.as_slice()) else { continue };
        cluster.name = xdstp_name(auth, "envoy.config.cluster.v3.Cluster", &id);
        if let Some(eds) = cluster.eds_cluster_config.as_mut() {
            eds.service_name.clone_from(&cla_name);
        }
        let cluster_name = cluster.name.clone();
        snapshot.resources.entry(CLUSTER_TYPE.to_owned()).or_default().insert(cluster_name, pack_any(cluster));
        let cla = snapshot.get(ENDPOINT_TYPE, &id).and_then(|a| ClusterLoadAssignment::decode(a.value.as_slice()).ok());
        if let Some(mut cla) = cla {
            cla.cluster_name.clone_from(&cla_name);
            snapshot.resources.entry(ENDPOINT_TYPE.to_owned()).or_default().insert(cla_name, pack_any(cla));
        }
    }
    let routes: Vec<(String, Any)> = snapshot
        .resources_of(ROUTE_TYPE)
        .map(|all| all.iter().filter(|(n, _)| !tp1::is_xdstp(n)).map(|(n, a)| (n.clone(), a.clone())).collect())
        .unwrap_or_default();
    for (id, any) in routes {
        let Ok(mut route) = RouteConfiguration::decode(any.value.as_slice()) else { continue };
        route.name = xdstp_name(auth, "envoy.config.route.v3.RouteConfiguration", &id);
        for action in route.virtual_hosts.iter_mut().flat_map(|v| v.routes.iter_mut()).filter_map(|r| r.action.as_mut())
        {
            if let route::Action::Route(RouteAction { cluster_specifier: Some(ClusterSpecifier::Cluster(c)), .. }) =
                action
                && !tp1::is_xdstp(c)
            {
                *c = xdstp_name(auth, "envoy.config.cluster.v3.Cluster", c);
            }
        }
        let route_name = route.name.clone();
        snapshot.resources.entry(ROUTE_TYPE.to_owned()).or_default().insert(route_name, pack_any(route));
    }
    let listener = xdstp_listener_name(auth, XDSTP_API_TARGET);
    let route_name = xdstp_name(auth, "envoy.config.route.v3.RouteConfiguration", "route_0");
    let api = snapshot::api_listener_with_route(&listener, &route_name);
    snapshot.resources.entry(LISTENER_TYPE.to_owned()).or_default().insert(listener, api);
}

fn add_variants(snapshot: &mut Snapshot, param: &DynamicParameter) {
    let plain: Vec<(String, Any)> = snapshot
        .resources_of(CLUSTER_TYPE)
        .map(|all| all.iter().filter(|(n, _)| n.starts_with("cluster_")).map(|(n, a)| (n.clone(), a.clone())).collect())
        .unwrap_or_default();
    for (name, any) in plain {
        let Ok(cluster) = Cluster::decode(any.value.as_slice()) else { continue };
        let mut variants: Vec<Variant> = param
            .values
            .iter()
            .map(|v| Variant {
                constraints: constraints::key_equals(&param.key, v),
                resource: pack_any(tagged(&cluster, v)),
            })
            .collect();
        let default = pack_any(tagged(&cluster, DEFAULT_VARIANT));
        variants.push(Variant {
            constraints: constraints::not(constraints::key_exists(&param.key)),
            resource: default.clone(),
        });
        snapshot.resources.entry(CLUSTER_TYPE.to_owned()).or_default().insert(name.clone(), default);
        snapshot.variants.entry(CLUSTER_TYPE.to_owned()).or_default().insert(name, variants);
    }
}

/// `cluster` with metadata `xds-relay-example.variant = value`.
fn tagged(cluster: &Cluster, value: &str) -> Cluster {
    let mut cluster = cluster.clone();
    let fields = [(VARIANT_FIELD.to_owned(), Value { kind: Some(value::Kind::StringValue(value.to_owned())) })];
    let metadata = cluster.metadata.get_or_insert_with(Metadata::default);
    metadata.filter_metadata.insert(METADATA_FILTER.to_owned(), Struct { fields: fields.into_iter().collect() });
    cluster
}

/// The variant value of a cluster published by [`apply`] (`default` for the default variant),
/// if it has one.
pub fn variant_of(cluster: &Cluster) -> Option<String> {
    let fields = &cluster.metadata.as_ref()?.filter_metadata.get(METADATA_FILTER)?.fields;
    match fields.get(VARIANT_FIELD)?.kind.as_ref()? {
        value::Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// The dynamic parameters of `params` as an ordered map.
pub fn ordered_params<'a>(params: impl IntoIterator<Item = (&'a String, &'a String)>) -> BTreeMap<String, String> {
    params.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{SnapshotSpec, build};

    fn spec() -> ExtrasSpec {
        ExtrasSpec::default()
    }

    fn err_bad_clusters() -> &'static str {
        Extras::parse(ExtrasSpec { bad_clusters: vec![String::new()], ..spec() }).unwrap_err().field
    }

    #[test]
    fn parse_accepts_every_field_and_reports_bad_ones_by_name() {
        let ok = Extras::parse(ExtrasSpec {
            ttl: Some("2s".into()),
            heartbeat_interval: Some("500ms".into()),
            do_not_cache: vec!["cluster_0".into()],
            resource_errors: vec!["cds/cluster_1=5:gone: really".into()],
            xdstp_authority: Some("auth.example".into()),
            dynamic_parameter: Some("env=prod,dev".into()),
            bad_clusters: vec!["cluster_0".into(), "bad-extra".into()],
        })
        .unwrap();
        assert_eq!(ok.ttl, Some(Duration::from_secs(2)));
        assert_eq!(err_bad_clusters(), "bad_clusters");
        let snapshot_spec = crate::snapshot::SnapshotSpec { clusters: 2, listeners: 1, endpoints: vec![] };
        let mut snapshot = crate::snapshot::build(&snapshot_spec, "v1", 1);
        apply(&mut snapshot, &ok);
        for name in ["cluster_0", "bad-extra"] {
            let cluster = Cluster::decode(snapshot.get(CLUSTER_TYPE, name).unwrap().value.as_slice()).unwrap();
            assert_eq!((cluster.name.as_str(), cluster.lb_policy), (name, 5), "MAGLEV");
        }
        assert_eq!(ok.heartbeats(), Some(Duration::from_millis(500)));
        assert_eq!(
            ok.resource_errors[0],
            ResourceErrorRule {
                type_url: CLUSTER_TYPE.into(),
                name: "cluster_1".into(),
                code: 5,
                message: "gone: really".into()
            }
        );
        assert_eq!(ok.dynamic_parameter.unwrap().values, ["prod", "dev"]);
        let err = |s: ExtrasSpec| Extras::parse(s).unwrap_err().field;
        assert_eq!(err(ExtrasSpec { heartbeat_interval: Some("1s".into()), ..spec() }), "heartbeat_interval");
        assert_eq!(err(ExtrasSpec { ttl: Some("0s".into()), ..spec() }), "ttl");
        assert_eq!(err(ExtrasSpec { resource_errors: vec!["xds/a=5:m".into()], ..spec() }), "resource_error");
        assert_eq!(err(ExtrasSpec { resource_errors: vec!["cds/a=99:m".into()], ..spec() }), "resource_error");
        assert_eq!(err(ExtrasSpec { resource_errors: vec!["cds/a=5".into()], ..spec() }), "resource_error");
        assert_eq!(err(ExtrasSpec { xdstp_authority: Some("a/b".into()), ..spec() }), "xdstp_authority");
        assert_eq!(err(ExtrasSpec { dynamic_parameter: Some("env=a,a".into()), ..spec() }), "dynamic_parameter");
        assert_eq!(err(ExtrasSpec { dynamic_parameter: Some("env=".into()), ..spec() }), "dynamic_parameter");
        let many = vec!["n".to_owned(); MAX_ENTRIES + 1];
        assert_eq!(err(ExtrasSpec { do_not_cache: many, ..spec() }), "do_not_cache");
    }

    #[test]
    fn json_body_rejects_unknown_fields() {
        let ok: ExtrasSpec = serde_json::from_str(r#"{"ttl":"1s","do_not_cache":["a"]}"#).unwrap();
        assert_eq!(ok.ttl.as_deref(), Some("1s"));
        assert!(serde_json::from_str::<ExtrasSpec>(r#"{"tll":"1s"}"#).is_err());
    }

    #[test]
    fn sotw_wraps_only_when_needed() {
        let extras =
            Extras::parse(ExtrasSpec { ttl: Some("3s".into()), do_not_cache: vec!["route_0".into()], ..spec() })
                .unwrap();
        let bare = Any { type_url: ROUTE_TYPE.into(), value: vec![1] };
        assert_eq!(extras.sotw_resource(ROUTE_TYPE, "route_1", "v", bare.clone(), None), bare);
        let wrapped = extras.sotw_resource(ROUTE_TYPE, "route_0", "v", bare.clone(), None);
        assert_eq!(wrapped.type_url, RESOURCE_WRAPPER_TYPE);
        let r = Resource::decode(wrapped.value.as_slice()).unwrap();
        assert_eq!((r.name.as_str(), r.version.as_str()), ("route_0", "v"));
        assert_eq!(r.cache_control, Some(CacheControl { do_not_cache: true }));
        assert!(r.ttl.is_none(), "only CDS has a TTL");
        assert_eq!(r.resource, Some(bare.clone()));
        let cds = Resource::decode(extras.sotw_resource(CLUSTER_TYPE, "c", "v", bare, None).value.as_slice()).unwrap();
        assert_eq!(cds.ttl, Some(protobuf::Duration { seconds: 3, nanos: 0 }));
        assert!(cds.cache_control.is_none());
        let hb = Resource::decode(extras.sotw_heartbeat(CLUSTER_TYPE, "c", "v", None).value.as_slice()).unwrap();
        assert!(hb.resource.is_none());
        assert_eq!((hb.name.as_str(), hb.version.as_str()), ("c", "v"));
        assert!(hb.ttl.is_some());
    }

    #[test]
    fn variants_use_resource_name_and_errors_follow_coverage() {
        let extras =
            Extras::parse(ExtrasSpec { resource_errors: vec!["cds/a=14:down".into(), "eds/a=5:x".into()], ..spec() })
                .unwrap();
        let c = constraints::key_equals("k", "v");
        let r = extras.delta_resource(CLUSTER_TYPE, "a", "1", None, Some(&c));
        assert!(r.name.is_empty());
        assert_eq!(r.resource_name.unwrap().dynamic_parameter_constraints, Some(c));
        assert!(extras.errors_for(CLUSTER_TYPE, |n| n == "b").is_empty());
        let errors = extras.errors_for(CLUSTER_TYPE, |n| n == "a");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].error_detail.as_ref().unwrap().code, 14);
        assert!(extras.has_error(ENDPOINT_TYPE, "a"));
        assert!(!extras.has_error(LISTENER_TYPE, "a"));
    }

    #[test]
    fn apply_adds_xdstp_copies_and_variants() {
        let extras = Extras::parse(ExtrasSpec {
            xdstp_authority: Some("auth".into()),
            dynamic_parameter: Some("env=prod,dev".into()),
            ..spec()
        })
        .unwrap();
        let mut s = build(&SnapshotSpec { clusters: 2, listeners: 1, endpoints: vec![] }, "v1", 1);
        apply(&mut s, &extras);
        let name = xdstp_name("auth", "envoy.config.cluster.v3.Cluster", "cluster_1");
        let cluster = Cluster::decode(s.get(CLUSTER_TYPE, &name).unwrap().value.as_slice()).unwrap();
        assert_eq!(cluster.name, name);
        let cla_name = xdstp_name("auth", "envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_1");
        assert_eq!(cluster.eds_cluster_config.unwrap().service_name, cla_name);
        let cla = ClusterLoadAssignment::decode(s.get(ENDPOINT_TYPE, &cla_name).unwrap().value.as_slice()).unwrap();
        assert_eq!(cla.cluster_name, cla_name);
        assert_eq!(s.count(CLUSTER_TYPE), 4);
        let variants = &s.variants[CLUSTER_TYPE]["cluster_0"];
        assert_eq!(variants.len(), 3);
        let of = |any: &Any| variant_of(&Cluster::decode(any.value.as_slice()).unwrap()).unwrap();
        assert_eq!(of(&variants[0].resource), "prod");
        assert_eq!(of(&variants[2].resource), DEFAULT_VARIANT);
        assert_eq!(of(s.get(CLUSTER_TYPE, "cluster_0").unwrap()), DEFAULT_VARIANT);
        assert!(!s.variants[CLUSTER_TYPE].contains_key(&name), "xdstp copies have no variants");
    }

    /// The route name of an API listener's HttpConnectionManager, and the cluster of a route.
    fn rds_of(any: &Any) -> String {
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
            HttpConnectionManager, http_connection_manager::RouteSpecifier,
        };
        let listener = Listener::decode(any.value.as_slice()).unwrap();
        let hcm = listener.api_listener.and_then(|a| a.api_listener).unwrap();
        let hcm = HttpConnectionManager::decode(hcm.value.as_slice()).unwrap();
        let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else { panic!("no rds") };
        assert!(matches!(
            rds.config_source.and_then(|c| c.config_source_specifier),
            Some(envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier::Ads(_))
        ));
        rds.route_config_name
    }

    fn cluster_of(any: &Any) -> String {
        let route = RouteConfiguration::decode(any.value.as_slice()).unwrap();
        let action = route.virtual_hosts[0].routes[0].action.clone();
        let Some(route::Action::Route(RouteAction { cluster_specifier: Some(ClusterSpecifier::Cluster(c)), .. })) =
            action
        else {
            panic!("no cluster route")
        };
        c
    }

    #[test]
    fn xdstp_chain_for_the_api_target_is_published_and_the_plain_chain_is_unchanged() {
        let extras = Extras::parse(ExtrasSpec { xdstp_authority: Some("auth".into()), ..spec() }).unwrap();
        let plain = build(&SnapshotSpec { clusters: 2, listeners: 2, endpoints: vec![] }, "v1", 1);
        let mut s = plain.clone();
        apply(&mut s, &extras);

        let listener = xdstp_listener_name("auth", XDSTP_API_TARGET);
        assert_eq!(listener, "xdstp://auth/envoy.config.listener.v3.Listener/example-service");
        let any = s.get(LISTENER_TYPE, &listener).expect("xdstp API listener");
        assert_eq!(Listener::decode(any.value.as_slice()).unwrap().name, listener);
        let route_name = rds_of(any);
        assert_eq!(route_name, xdstp_name("auth", "envoy.config.route.v3.RouteConfiguration", "route_0"));
        let route_any = s.get(ROUTE_TYPE, &route_name).expect("xdstp route");
        assert_eq!(RouteConfiguration::decode(route_any.value.as_slice()).unwrap().name, route_name);
        let cluster_name = cluster_of(route_any);
        assert_eq!(cluster_name, xdstp_name("auth", "envoy.config.cluster.v3.Cluster", "cluster_0"));
        let cluster =
            Cluster::decode(s.get(CLUSTER_TYPE, &cluster_name).expect("xdstp cluster").value.as_slice()).unwrap();
        let eds = cluster.eds_cluster_config.unwrap();
        assert!(eds.eds_config.is_some_and(|c| c.config_source_specifier.is_some()));
        assert!(s.get(ENDPOINT_TYPE, &eds.service_name).is_some(), "the xdstp CLA exists");
        let second = xdstp_name("auth", "envoy.config.route.v3.RouteConfiguration", "route_1");
        assert_eq!(
            cluster_of(s.get(ROUTE_TYPE, &second).unwrap()),
            xdstp_name("auth", "envoy.config.cluster.v3.Cluster", "cluster_1")
        );

        for type_url in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE] {
            for (name, any) in plain.resources_of(type_url).unwrap() {
                assert_eq!(s.get(type_url, name), Some(any), "plain {name} unchanged");
            }
        }
        assert_eq!(s.count(LISTENER_TYPE), 3);
        assert_eq!(s.count(ROUTE_TYPE), 4);
        assert_eq!(rds_of(&snapshot::api_listener("example-service")), "route_0");
        assert_eq!(cluster_of(s.get(ROUTE_TYPE, "route_0").unwrap()), "cluster_0");
    }
}
