//! State-of-the-world upstream streams: the request carries the whole name list, the
//! accepted version and the last nonce.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;

use super::{Exchange, rejection_status};
use crate::cache::Interest;
use crate::node_cache::Entry;
use crate::{constraints, xds};

/// What the relay asked on one state-of-the-world stream.
pub(super) struct SotwExchange {
    node: Node,
    /// True once an explicit name (or `*`) was sent: an empty list then means "nothing".
    explicit_sent: bool,
    /// The last version the relay accepted on this stream.
    version: String,
    /// The nonce of the last response received.
    nonce: String,
    /// What the last request asked for.
    asked: Interest,
    /// True once the stream delivered a response.
    answered: bool,
}

impl SotwExchange {
    fn request(&mut self, entry: &Entry, interest: &Interest, error: Option<RpcStatus>) -> DiscoveryRequest {
        let mut names: Vec<String> = Vec::with_capacity(interest.names.len() + 1);
        if interest.wildcard && (self.explicit_sent || !interest.names.is_empty()) {
            names.push("*".to_owned());
        }
        names.extend(interest.names.iter().cloned());
        self.explicit_sent |= !names.is_empty();
        self.asked = interest.clone();
        DiscoveryRequest {
            version_info: self.version.clone(),
            node: Some(self.node.clone()),
            resource_locators: constraints::locators(interest.names.iter(), &interest.params),
            resource_names: names,
            type_url: entry.type_url.clone(),
            response_nonce: self.nonce.clone(),
            error_detail: error,
        }
    }
}

impl Exchange for SotwExchange {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "sotw";

    fn path(type_url: &str, aggregated: bool) -> &'static str {
        match xds::sotw_path(type_url) {
            Some(path) if !aggregated => path,
            _ => xds::ADS_SOTW_PATH,
        }
    }

    fn open(entry: &Entry, node: &Node, interest: &Interest, _refresh: bool) -> (Self, DiscoveryRequest) {
        // A new state-of-the-world stream is always answered with the origin's current state.
        let mut exchange = Self {
            node: node.clone(),
            explicit_sent: false,
            version: String::new(),
            nonce: String::new(),
            asked: Interest::default(),
            answered: false,
        };
        let first = exchange.request(entry, interest, None);
        (exchange, first)
    }

    fn change(&mut self, entry: &Entry, interest: &Interest) -> Option<DiscoveryRequest> {
        (*interest != self.asked).then(|| self.request(entry, interest, None))
    }

    fn accepted(reply: &DiscoveryRequest) -> bool {
        reply.error_detail.is_none()
    }

    fn answer(&mut self, entry: &Entry, response: DiscoveryResponse) -> DiscoveryRequest {
        let version = response.version_info.clone();
        let resources = response.resources.len();
        let resource_errors = response.resource_errors.len();
        let asked = self.asked.clone();
        self.nonce = response.nonce.clone();
        let first_on_stream = !std::mem::replace(&mut self.answered, true);
        match entry.apply_response(response, &asked, first_on_stream, super::trace_version(entry)) {
            Ok(changed) => {
                tracing::debug!(key = %entry.key, type_url = %entry.type_url, version = %version, resources, resource_errors, changed, "upstream response");
                self.version = version;
                self.request(entry, &asked, None)
            }
            Err(rejection) => {
                let error = rejection_status(entry, &version, &rejection);
                self.request(entry, &asked, Some(error))
            }
        }
    }
}
