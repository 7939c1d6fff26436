//! xDS-TP2 dynamic parameters: the parameters a subscription carries and the constraints a
//! resource variant carries, and whether they match.
//!
//! A subscription's parameters come from its resource locators
//! (`ResourceLocator.dynamic_parameters`), else from `node.dynamic_parameters[type_url]`,
//! else are empty. A variant's constraints (`ResourceName.dynamic_parameter_constraints`)
//! are a tree: a single `key = value` or `key exists`, AND, OR and NOT. A variant without
//! constraints matches every subscription.
//!
//! Invariants: evaluation is total and bounded: a tree deeper than [`MAX_DEPTH`] does not
//! match (the decoder already bounds nesting; this guards trees built otherwise); an empty
//! AND matches, an empty OR does not, and a node with no type set does not match.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DynamicParameterConstraints;
use envoy_types::pb::envoy::service::discovery::v3::ResourceLocator;
use envoy_types::pb::envoy::service::discovery::v3::dynamic_parameter_constraints::{
    Type, single_constraint::ConstraintType,
};

/// Deepest constraint tree evaluated; deeper trees do not match.
pub const MAX_DEPTH: usize = 32;

/// A subscription's dynamic parameters, sorted by key (cheap to clone, comparable, hashable).
pub type Params = Arc<BTreeMap<String, String>>;

/// True when a variant with `constraints` is meant for a subscription with `params`.
pub fn matches(constraints: Option<&DynamicParameterConstraints>, params: &BTreeMap<String, String>) -> bool {
    constraints.is_none_or(|c| eval(c, params, 0))
}

fn eval(constraints: &DynamicParameterConstraints, params: &BTreeMap<String, String>, depth: usize) -> bool {
    if depth >= MAX_DEPTH {
        return false;
    }
    match &constraints.r#type {
        None => false,
        Some(Type::Constraint(single)) => match (&single.constraint_type, params.get(&single.key)) {
            (Some(ConstraintType::Value(value)), Some(held)) => held == value,
            (Some(ConstraintType::Exists(_)), held) => held.is_some(),
            _ => false,
        },
        Some(Type::AndConstraints(list)) => list.constraints.iter().all(|c| eval(c, params, depth + 1)),
        Some(Type::OrConstraints(list)) => list.constraints.iter().any(|c| eval(c, params, depth + 1)),
        Some(Type::NotConstraints(inner)) => !eval(inner, params, depth + 1),
    }
}

/// The parameters of a subscription of `type_url`: those of its locators when it has any
/// (they must all carry the same set), else the node's for the type, else none.
///
/// # Errors
/// A message naming the conflict when two locators carry different parameters (the relay
/// keeps one set per subscription).
pub fn of_request(locators: &[ResourceLocator], node: Option<&Node>, type_url: &str) -> Result<Params, String> {
    if let Some(first) = locators.first() {
        let params: BTreeMap<String, String> =
            first.dynamic_parameters.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(other) = locators.iter().find(|l| {
            l.dynamic_parameters.len() != params.len()
                || l.dynamic_parameters.iter().any(|(k, v)| params.get(k) != Some(v))
        }) {
            return Err(format!(
                "resource locators {:?} and {:?} carry different dynamic parameters; one request's locators \
                 must share one set",
                first.name, other.name
            ));
        }
        return Ok(Arc::new(params));
    }
    let params = node
        .and_then(|n| n.dynamic_parameters.get(type_url))
        .map(|p| p.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    Ok(Arc::new(params))
}

/// The resource locators asking for every name of `names` with each parameter set of
/// `params` (none when `params` is empty: plain names ask for the default variants).
pub fn locators<'a>(names: impl IntoIterator<Item = &'a String>, params: &[Params]) -> Vec<ResourceLocator> {
    if params.is_empty() {
        return Vec::new();
    }
    let names: Vec<&String> = names.into_iter().collect();
    params
        .iter()
        .flat_map(|set| {
            names.iter().map(move |name| ResourceLocator {
                name: (*name).clone(),
                dynamic_parameters: set.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::dynamic_parameter_constraints::{
        ConstraintList, SingleConstraint, single_constraint::Exists,
    };
    use envoy_types::pb::xds::core::v3::ContextParams;

    fn value(key: &str, value: &str) -> DynamicParameterConstraints {
        DynamicParameterConstraints {
            r#type: Some(Type::Constraint(SingleConstraint {
                key: key.into(),
                constraint_type: Some(ConstraintType::Value(value.into())),
            })),
        }
    }

    fn exists(key: &str) -> DynamicParameterConstraints {
        DynamicParameterConstraints {
            r#type: Some(Type::Constraint(SingleConstraint {
                key: key.into(),
                constraint_type: Some(ConstraintType::Exists(Exists {})),
            })),
        }
    }

    fn not(inner: DynamicParameterConstraints) -> DynamicParameterConstraints {
        DynamicParameterConstraints { r#type: Some(Type::NotConstraints(Box::new(inner))) }
    }

    fn and(list: Vec<DynamicParameterConstraints>) -> DynamicParameterConstraints {
        DynamicParameterConstraints { r#type: Some(Type::AndConstraints(ConstraintList { constraints: list })) }
    }

    fn or(list: Vec<DynamicParameterConstraints>) -> DynamicParameterConstraints {
        DynamicParameterConstraints { r#type: Some(Type::OrConstraints(ConstraintList { constraints: list })) }
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_constraint_tree_is_evaluated() {
        let prod = params(&[("env", "prod")]);
        let dev = params(&[("env", "dev"), ("zone", "a")]);
        let none = params(&[]);
        assert!(matches(None, &none), "no constraints: every subscription");
        assert!(matches(Some(&value("env", "prod")), &prod));
        assert!(!matches(Some(&value("env", "prod")), &dev));
        assert!(!matches(Some(&value("env", "prod")), &none));
        assert!(matches(Some(&exists("env")), &dev) && !matches(Some(&exists("env")), &none));
        assert!(matches(Some(&not(exists("env"))), &none), "the default variant");
        assert!(!matches(Some(&not(exists("env"))), &prod));
        assert!(matches(Some(&and(vec![value("env", "dev"), exists("zone")])), &dev));
        assert!(!matches(Some(&and(vec![value("env", "dev"), exists("zone")])), &prod));
        assert!(matches(Some(&or(vec![value("env", "dev"), value("env", "prod")])), &prod));
        assert!(!matches(Some(&or(vec![value("env", "x"), exists("zone")])), &prod));
        assert!(matches(Some(&and(vec![])), &none) && !matches(Some(&or(vec![])), &none));
        assert!(!matches(Some(&DynamicParameterConstraints { r#type: None }), &none), "no type set");
        let empty_single = DynamicParameterConstraints {
            r#type: Some(Type::Constraint(SingleConstraint { key: "env".into(), constraint_type: None })),
        };
        assert!(!matches(Some(&empty_single), &prod));
    }

    #[test]
    fn deep_trees_are_bounded() {
        let mut tree = exists("k");
        for _ in 0..(MAX_DEPTH + 10) {
            tree = not(not(tree));
        }
        assert!(!matches(Some(&tree), &params(&[("k", "v")])), "too deep: no match, no overflow");
        let mut shallow = exists("k");
        for _ in 0..4 {
            shallow = not(not(shallow));
        }
        assert!(matches(Some(&shallow), &params(&[("k", "v")])));
    }

    #[test]
    fn parameters_come_from_locators_else_the_node() {
        let locator = |name: &str, pairs: &[(&str, &str)]| ResourceLocator {
            name: name.into(),
            dynamic_parameters: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let mut node = Node::default();
        node.dynamic_parameters.insert(
            "T".into(),
            ContextParams { params: [("env".to_string(), "dev".to_string())].into_iter().collect() },
        );
        let from_node = of_request(&[], Some(&node), "T").unwrap();
        assert_eq!(*from_node, params(&[("env", "dev")]));
        assert!(of_request(&[], Some(&node), "U").unwrap().is_empty());
        let from_locators =
            of_request(&[locator("a", &[("env", "prod")]), locator("b", &[("env", "prod")])], Some(&node), "T");
        assert_eq!(*from_locators.unwrap(), params(&[("env", "prod")]));
        assert!(of_request(&[locator("a", &[("env", "prod")]), locator("b", &[])], None, "T").is_err());
    }
}
