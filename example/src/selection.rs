//! Which resources of a snapshot one subscription of one type gets, shared by the SotW and
//! delta rules: explicit names, the wildcard, xDS-TP1 names and glob collections
//! ([`crate::tp1`]), dynamic-parameter variants ([`crate::constraints`]), and configured
//! resource errors ([`crate::extras`]). Pure.
//!
//! Rules:
//! - the wildcard covers every resource of the type; an explicit name covers that resource (LDS
//!   names without the `listener_` prefix are generated API listeners); a glob covers every
//!   member of its collection; `xdstp://` names are compared with sorted context parameters;
//! - an `xdstp://` name (or glob) with context parameters is served from the published resource
//!   of the same path, renamed to the canonical name (parameters sorted): the example server
//!   answers any parameters;
//! - a name's parameters are its locator's, else the node's for the type, else empty; for a
//!   name with variants the first matching variant is selected, and none when none match;
//! - a name with a configured error is never selected; its error is reported when the
//!   subscription covers it (explicitly, by glob, or by wildcard).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::discovery::v3::{DynamicParameterConstraints, ResourceError};
use envoy_types::pb::google::protobuf::Any;

use crate::publisher::Published;
use crate::snapshot::{self, LISTENER_PREFIX, LISTENER_TYPE};
use crate::sotw::WILDCARD;
use crate::tp1;
use crate::{constraints, extras};

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

/// One selected resource, borrowed from the snapshot where it can be.
#[derive(Debug, Clone, PartialEq)]
pub struct Selected<'a> {
    /// The packed resource.
    pub resource: Cow<'a, Any>,
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
pub fn select<'a>(type_url: &str, interest: &Interest<'_>, published: &'a Published) -> BTreeMap<String, Selected<'a>> {
    let snap = &published.snapshot;
    let all = snap.resources_of(type_url);
    let mut out = BTreeMap::new();
    let add = |out: &mut BTreeMap<String, Selected<'a>>, name: &str, params: &Params| {
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
            let (glob, query) = (tp1::path(requested), tp1::query(requested));
            for member in all.into_iter().flat_map(|a| a.keys()).filter(|m| tp1::glob_matches(glob, m)) {
                add(&mut out, &tp1::with_query(member, &query), params);
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
fn resolve<'a>(type_url: &str, name: &str, params: &Params, published: &'a Published) -> Option<Selected<'a>> {
    let snap = &published.snapshot;
    if let Some(variants) = snap.variants.get(type_url).and_then(|v| v.get(name)) {
        let (index, variant) =
            variants.iter().enumerate().find(|(_, v)| constraints::matches(&v.constraints, params))?;
        return Some(Selected {
            resource: Cow::Borrowed(&variant.resource),
            constraints: Some(variant.constraints.clone()),
            variant: Some(index),
        });
    }
    if let Some(any) = snap.get(type_url, name) {
        return Some(Selected { resource: Cow::Borrowed(any), constraints: None, variant: None });
    }
    if tp1::is_xdstp(name) && tp1::path(name) != name {
        let base = resolve(type_url, tp1::path(name), params, published)?;
        let resource = Cow::Owned(extras::renamed(type_url, &base.resource, name)?);
        return Some(Selected { resource, ..base });
    }
    is_api_listener(type_url, name).then(|| Selected {
        resource: Cow::Owned(snapshot::api_listener(name)),
        constraints: None,
        variant: None,
    })
}

/// Whether `name` of `type_url` is served as a generated API listener.
pub fn is_api_listener(type_url: &str, name: &str) -> bool {
    type_url == LISTENER_TYPE && !name.starts_with(LISTENER_PREFIX) && name != WILDCARD && !tp1::is_xdstp(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extras::{Extras, ExtrasSpec, xdstp_name};
    use crate::publisher::identifier;
    use crate::snapshot::{CLUSTER_TYPE, SnapshotSpec};
    use std::sync::Arc;

    #[test]
    fn xdstp_context_parameters_are_served_under_the_canonical_name() {
        let extras = Extras::parse(ExtrasSpec { xdstp_authority: Some("a".into()), ..Default::default() }).unwrap();
        let mut snapshot = snapshot::build(&SnapshotSpec { clusters: 2, listeners: 0, endpoints: vec![] }, "v", 1);
        extras::apply(&mut snapshot, &extras);
        let published =
            Published { snapshot, published_unix_nanos: 1, identifier: identifier("v", 1), extras: Arc::new(extras) };
        let base = xdstp_name("a", "envoy.config.cluster.v3.Cluster", "cluster_0");
        let names: BTreeSet<String> =
            [format!("{base}?z=1&b=2"), "xdstp://a/envoy.config.cluster.v3.Cluster/fleet/*?k=v".to_owned()]
                .into_iter()
                .collect();
        let (locators, node) = (BTreeMap::new(), Params::new());
        let interest = Interest { wildcard: false, names: &names, locator_params: &locators, node_params: &node };
        let got = select(CLUSTER_TYPE, &interest, &published);
        let keys: Vec<&str> = got.keys().map(String::as_str).collect();
        let want = [
            format!("{base}?b=2&z=1"),
            format!("{base}?k=v"),
            format!("{}?k=v", xdstp_name("a", "envoy.config.cluster.v3.Cluster", "cluster_1")),
        ];
        assert_eq!(keys, want.iter().map(String::as_str).collect::<Vec<_>>());
        let named = crate::client::resource_name(CLUSTER_TYPE, &got[&want[0]].resource).unwrap();
        assert_eq!(named, want[0], "the body carries the canonical name");
    }
}
