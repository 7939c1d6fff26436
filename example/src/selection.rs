//! Which resources of a snapshot one subscription of one type gets, shared by the SotW and
//! delta rules: explicit names, the wildcard, xDS-TP1 names and glob collections
//! ([`crate::tp1`]), dynamic-parameter variants ([`crate::constraints`]), and configured
//! resource errors ([`crate::extras`]). Pure.
//!
//! Rules:
//! - the wildcard covers every resource of the type; an explicit name covers that resource (LDS
//!   names without the `listener_` prefix are generated API listeners); a glob covers every
//!   member of its collection; `xdstp://` names are compared with sorted context parameters;
//! - a name's parameters are its locator's, else the node's for the type, else empty; for a
//!   name with variants the first matching variant is selected, and none when none match;
//! - a name with a configured error is never selected; its error is reported when the
//!   subscription covers it (explicitly, by glob, or by wildcard).

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{DynamicParameterConstraints, ResourceError};
use envoy_types::pb::google::protobuf::Any;

use crate::constraints;
use crate::publisher::Published;
use crate::snapshot::{self, LISTENER_PREFIX, LISTENER_TYPE};
use crate::sotw::WILDCARD;
use crate::tp1;

/// Dynamic parameters of a subscription (key → value).
pub type Params = BTreeMap<String, String>;

/// What one subscription of one type asks for.
#[derive(Debug, Clone, Copy)]
pub struct Interest<'a> {
    /// Whether the wildcard is subscribed.
    pub wildcard: bool,
    /// The explicit names (including globs and locator names).
    pub names: &'a BTreeSet<String>,
    /// Parameters of names subscribed through resource locators.
    pub locator_params: &'a BTreeMap<String, Params>,
    /// The node's parameters for the type.
    pub node_params: &'a Params,
}

/// One selected resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Selected {
    /// The packed resource.
    pub resource: Any,
    /// The constraints of the selected variant, when the name has variants.
    pub constraints: Option<DynamicParameterConstraints>,
    /// Index of the selected variant in `Snapshot::variants`.
    pub variant: Option<usize>,
}

// === impl Interest ===

impl Interest<'_> {
    /// The parameters that apply to `name`.
    fn params_of(&self, name: &str) -> &Params {
        self.locator_params.get(name).unwrap_or(self.node_params)
    }

    /// Whether the subscription covers `name` (explicitly, by glob, or by wildcard).
    pub fn covers(&self, name: &str) -> bool {
        self.wildcard
            || self.names.contains(name)
            || self.names.iter().any(|n| tp1::canonical(n) == tp1::canonical(name) || tp1::glob_matches(n, name))
    }
}

/// The resources `interest` selects from `published`, by name.
pub fn select(type_url: &str, interest: &Interest<'_>, published: &Published) -> BTreeMap<String, Selected> {
    let snap = &published.snapshot;
    let all = snap.resources_of(type_url);
    let mut out = BTreeMap::new();
    let add = |out: &mut BTreeMap<String, Selected>, name: &str, params: &Params| {
        if out.contains_key(name) || published.extras.has_error(type_url, name) {
            return;
        }
        if let Some(selected) = resolve(type_url, name, params, published) {
            out.insert(name.to_owned(), selected);
        }
    };
    if interest.wildcard
        && let Some(all) = all
    {
        for name in all.keys() {
            add(&mut out, name, interest.node_params);
        }
    }
    for requested in interest.names {
        let params = interest.params_of(requested);
        if tp1::is_glob(requested) {
            for member in all.into_iter().flat_map(|a| a.keys()).filter(|m| tp1::glob_matches(requested, m)) {
                add(&mut out, member, params);
            }
        } else {
            add(&mut out, &tp1::canonical(requested), params);
        }
    }
    out
}

/// The configured errors of `type_url` that `interest` covers.
pub fn errors(type_url: &str, interest: &Interest<'_>, published: &Published) -> Vec<ResourceError> {
    published.extras.errors_for(type_url, |name| interest.covers(name))
}

/// The resource `name` for a subscription with `params`, if it exists.
fn resolve(type_url: &str, name: &str, params: &Params, published: &Published) -> Option<Selected> {
    let snap = &published.snapshot;
    if let Some(variants) = snap.variants.get(type_url).and_then(|v| v.get(name)) {
        let (index, variant) =
            variants.iter().enumerate().find(|(_, v)| constraints::matches(&v.constraints, params))?;
        return Some(Selected {
            resource: variant.resource.clone(),
            constraints: Some(variant.constraints.clone()),
            variant: Some(index),
        });
    }
    if let Some(any) = snap.get(type_url, name) {
        return Some(Selected { resource: any.clone(), constraints: None, variant: None });
    }
    is_api_listener(type_url, name).then(|| Selected {
        resource: snapshot::api_listener(name),
        constraints: None,
        variant: None,
    })
}

/// Whether `name` of `type_url` is served as a generated API listener.
pub fn is_api_listener(type_url: &str, name: &str) -> bool {
    type_url == LISTENER_TYPE && !name.starts_with(LISTENER_PREFIX) && name != WILDCARD && !tp1::is_xdstp(name)
}
