//! Evaluates `DynamicParameterConstraints` (xRFC TP2) against a subscription's dynamic
//! parameters.
//!
//! Rules: a single constraint matches when the key is present with exactly that value, or, for
//! `exists`, when the key is present with any value; `and` needs every member, `or` needs one,
//! `not` inverts; a constraint with no type set matches everything. Pure; no allocation.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::service::discovery::v3::DynamicParameterConstraints;
use envoy_types::pb::envoy::service::discovery::v3::dynamic_parameter_constraints::single_constraint::{
    ConstraintType, Exists,
};
use envoy_types::pb::envoy::service::discovery::v3::dynamic_parameter_constraints::{
    ConstraintList, SingleConstraint, Type,
};

/// Whether `constraints` accept a subscription with these `params`.
pub fn matches(constraints: &DynamicParameterConstraints, params: &BTreeMap<String, String>) -> bool {
    match &constraints.r#type {
        None => true,
        Some(Type::Constraint(single)) => match (&single.constraint_type, params.get(&single.key)) {
            (_, None) => false,
            (Some(ConstraintType::Value(want)), Some(got)) => want == got,
            (Some(ConstraintType::Exists(_)) | None, Some(_)) => true,
        },
        Some(Type::AndConstraints(list)) => list.constraints.iter().all(|c| matches(c, params)),
        Some(Type::OrConstraints(list)) => list.constraints.iter().any(|c| matches(c, params)),
        Some(Type::NotConstraints(inner)) => !matches(inner, params),
    }
}

/// The constraint `key == value`.
pub fn key_equals(key: &str, value: &str) -> DynamicParameterConstraints {
    single(key, ConstraintType::Value(value.to_owned()))
}

/// The constraint "`key` is present".
pub fn key_exists(key: &str) -> DynamicParameterConstraints {
    single(key, ConstraintType::Exists(Exists {}))
}

/// The negation of `inner`.
pub fn not(inner: DynamicParameterConstraints) -> DynamicParameterConstraints {
    DynamicParameterConstraints { r#type: Some(Type::NotConstraints(Box::new(inner))) }
}

/// All of `members`.
pub fn and(members: Vec<DynamicParameterConstraints>) -> DynamicParameterConstraints {
    DynamicParameterConstraints { r#type: Some(Type::AndConstraints(ConstraintList { constraints: members })) }
}

/// Any of `members`.
pub fn or(members: Vec<DynamicParameterConstraints>) -> DynamicParameterConstraints {
    DynamicParameterConstraints { r#type: Some(Type::OrConstraints(ConstraintList { constraints: members })) }
}

fn single(key: &str, constraint_type: ConstraintType) -> DynamicParameterConstraints {
    DynamicParameterConstraints {
        r#type: Some(Type::Constraint(SingleConstraint {
            key: key.to_owned(),
            constraint_type: Some(constraint_type),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn single_value_and_exists() {
        let env_prod = key_equals("env", "prod");
        assert!(matches(&env_prod, &params(&[("env", "prod")])));
        assert!(!matches(&env_prod, &params(&[("env", "dev")])));
        assert!(!matches(&env_prod, &params(&[])));
        let exists = key_exists("env");
        assert!(matches(&exists, &params(&[("env", "")])));
        assert!(!matches(&exists, &params(&[("other", "x")])));
    }

    #[test]
    fn not_exists_is_the_default_variant() {
        let default = not(key_exists("env"));
        assert!(matches(&default, &params(&[])));
        assert!(matches(&default, &params(&[("zone", "a")])));
        assert!(!matches(&default, &params(&[("env", "prod")])));
    }

    #[test]
    fn and_or_nest() {
        let c = and(vec![key_equals("env", "prod"), or(vec![key_equals("zone", "a"), key_equals("zone", "b")])]);
        assert!(matches(&c, &params(&[("env", "prod"), ("zone", "b")])));
        assert!(!matches(&c, &params(&[("env", "prod"), ("zone", "c")])));
        assert!(!matches(&c, &params(&[("env", "dev"), ("zone", "a")])));
        assert!(matches(&and(vec![]), &params(&[])), "an empty AND is true");
        assert!(!matches(&or(vec![]), &params(&[])), "an empty OR is false");
        assert!(matches(&DynamicParameterConstraints::default(), &params(&[])));
    }
}
