//! Delta upstream streams: the relay subscribes and unsubscribes by difference, reconnects
//! with `initial_resource_versions` from its cache (so the origin resends only what
//! changed), and keeps each key's full state for every kind of client.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use super::{Exchange, rejection_status};
use crate::cache::Interest;
use crate::node_cache::Entry;
use crate::{constraints, xds};

/// The resource version claimed to make the origin resend one resource (see `open`).
const REFRESH_VERSION: &str = "xds-relay-refresh";

/// What the relay asked on one delta stream.
pub(super) struct DeltaExchange {
    asked: Interest,
    /// True once the stream delivered a response.
    answered: bool,
}

fn wildcard_names(interest: &Interest) -> Vec<String> {
    // Wildcard alone uses the legacy form (empty lists) every server understands.
    if interest.wildcard && !interest.names.is_empty() { vec!["*".to_owned()] } else { Vec::new() }
}

impl Exchange for DeltaExchange {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    fn path(type_url: &str, aggregated: bool) -> &'static str {
        match xds::DELTA_METHODS.iter().find(|(_, t)| *t == type_url) {
            Some((path, _)) if !aggregated => path,
            _ => xds::ADS_DELTA_PATH,
        }
    }

    fn open(entry: &Entry, node: &Node, interest: &Interest, refresh: bool) -> (Self, DeltaDiscoveryRequest) {
        let state = entry.state();
        let mut initial_resource_versions: HashMap<String, String> = if state.is_ready() {
            state
                .resources
                .iter()
                // A do_not_cache resource is not held as far as the origin is concerned: a
                // new stream always fetches it again.
                .filter(|r| !r.do_not_cache)
                .filter_map(|r| Some((r.name.clone()?, r.origin_version.clone()?)))
                .filter(|(name, _)| interest.wants(name))
                .collect()
        } else {
            HashMap::new()
        };
        // A state read from disk must be confirmed by the origin, even when nothing changed.
        if refresh || entry.source.is_stale() {
            // The origin answers a resumed stream only with what changed, which may be nothing.
            // Claiming an unknown version of one resource makes it resend that one, so the
            // stream delivers (an unchanged body keeps its content hash: clients see nothing).
            if let Some(name) = initial_resource_versions.keys().min().cloned() {
                initial_resource_versions.insert(name, REFRESH_VERSION.to_owned());
            }
        }
        let mut subscribe = wildcard_names(interest);
        subscribe.extend(interest.names.iter().cloned());
        let first = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: entry.type_url.clone(),
            resource_locators_subscribe: constraints::locators(interest.names.iter(), &interest.params),
            resource_names_subscribe: subscribe,
            initial_resource_versions,
            ..Default::default()
        };
        (Self { asked: interest.clone(), answered: false }, first)
    }

    fn change(&mut self, entry: &Entry, interest: &Interest) -> Option<DeltaDiscoveryRequest> {
        // Locators (xDS-TP2 parameters) for the new names, or for every name when the
        // parameter sets changed; a name's unsubscription drops its locators too.
        let locators = if interest.params == self.asked.params {
            constraints::locators(interest.names.difference(&self.asked.names), &interest.params)
        } else {
            let added: Vec<_> = interest.params.iter().filter(|p| !self.asked.params.contains(p)).cloned().collect();
            let mut locators = constraints::locators(interest.names.iter(), &added);
            locators.extend(constraints::locators(interest.names.difference(&self.asked.names), &self.asked.params));
            locators
        };
        let mut subscribe: Vec<String> = interest.names.difference(&self.asked.names).cloned().collect();
        let mut unsubscribe: Vec<String> = self.asked.names.difference(&interest.names).cloned().collect();
        match (self.asked.wildcard, interest.wildcard) {
            (false, true) => subscribe.push("*".to_owned()),
            (true, false) => unsubscribe.push("*".to_owned()),
            _ => {}
        }
        self.asked = interest.clone();
        (!subscribe.is_empty() || !unsubscribe.is_empty() || !locators.is_empty()).then(|| DeltaDiscoveryRequest {
            type_url: entry.type_url.clone(),
            resource_locators_subscribe: locators,
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            ..Default::default()
        })
    }

    fn accepted(reply: &DeltaDiscoveryRequest) -> bool {
        reply.error_detail.is_none()
    }

    fn answer(&mut self, entry: &Entry, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let version = response.system_version_info.clone();
        let nonce = response.nonce.clone();
        let (changed, removed) = (response.resources.len(), response.removed_resources.len());
        let resource_errors = response.resource_errors.len();
        let first_on_stream = !std::mem::replace(&mut self.answered, true);
        let error_detail = match entry.apply_delta_response(
            response,
            &self.asked,
            first_on_stream,
            super::trace_version(entry),
        ) {
            Ok(updated) => {
                tracing::debug!(key = %entry.key, type_url = %entry.type_url, version = %version, changed, removed, resource_errors, updated, "upstream delta response");
                None
            }
            Err(rejection) => Some(rejection_status(entry, &version, &rejection)),
        };
        DeltaDiscoveryRequest {
            type_url: entry.type_url.clone(),
            response_nonce: nonce,
            error_detail,
            ..Default::default()
        }
    }
}
