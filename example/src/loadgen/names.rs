//! Reads only what the load generator needs from resources: names, and the RDS route names a
//! Listener refers to.
//!
//! Cluster, Listener, ClusterLoadAssignment and RouteConfiguration all carry their name in field
//! 1, so [`resource_name`] decodes a one-field message and skips the rest of the bytes. Only
//! [`route_names`] decodes a whole Listener and its HTTP connection managers.

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

/// Type URL of the HTTP connection manager network filter.
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// Field 1 of a resource: the name of every core xDS resource.
#[derive(Clone, PartialEq, prost::Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
}

/// The name of a Cluster, Listener, ClusterLoadAssignment (`cluster_name`) or
/// RouteConfiguration, decoding nothing else.
///
/// # Errors
///
/// When the bytes are not a valid message.
pub fn resource_name(any: &Any) -> Result<String, prost::DecodeError> {
    Named::decode(any.value.as_slice()).map(|n| n.name)
}

/// The name (field 1) of an encoded resource message, decoding nothing else.
///
/// # Errors
///
/// When the bytes are not a valid message.
pub fn name_in(value: &[u8]) -> Result<String, prost::DecodeError> {
    Named::decode(value).map(|n| n.name)
}

/// The RDS route configuration names that a Listener's HTTP connection managers refer to (in
/// its filter chains, default filter chain, and API listener), in name order.
///
/// # Errors
///
/// When the Listener or one of its HTTP connection managers does not decode.
pub fn route_names(any: &Any) -> Result<BTreeSet<String>, prost::DecodeError> {
    let listener = Listener::decode(any.value.as_slice())?;
    let mut managers: Vec<&Any> = listener
        .filter_chains
        .iter()
        .chain(listener.default_filter_chain.as_ref())
        .flat_map(|chain| &chain.filters)
        .filter_map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) if any.type_url == HCM_TYPE => Some(any),
            _ => None,
        })
        .collect();
    if let Some(api) = listener.api_listener.as_ref().and_then(|a| a.api_listener.as_ref())
        && api.type_url == HCM_TYPE
    {
        managers.push(api);
    }
    let mut names = BTreeSet::new();
    for manager in managers {
        let hcm = HttpConnectionManager::decode(manager.value.as_slice())?;
        if let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = hcm.route_specifier {
            names.insert(rds.route_config_name);
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{self, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SnapshotSpec};

    #[test]
    fn names_of_every_core_type() {
        let s = snapshot::build(&SnapshotSpec { clusters: 2, listeners: 2, endpoints: vec![] }, "v", 1);
        for type_url in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE] {
            for (name, any) in s.resources_of(type_url).unwrap() {
                assert_eq!(&resource_name(any).unwrap(), name);
            }
        }
        assert!(resource_name(&Any { type_url: String::new(), value: vec![0xff, 0xff] }).is_err());
    }

    #[test]
    fn route_names_from_filter_chains_and_api_listeners() {
        let s = snapshot::build(&SnapshotSpec { clusters: 1, listeners: 2, endpoints: vec![] }, "v", 1);
        let l1 = s.get(LISTENER_TYPE, "listener_1").unwrap();
        assert_eq!(route_names(l1).unwrap().into_iter().collect::<Vec<_>>(), ["route_1"]);
        let api = snapshot::api_listener("hello.test");
        assert_eq!(route_names(&api).unwrap().into_iter().collect::<Vec<_>>(), ["route_0"]);
    }
}
