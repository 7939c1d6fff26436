//! The aggregation-rules schema, mirroring the Go relay's
//! `api/protos/aggregation/v1/aggregation.proto` (package `aggregation`) field for field.
//!
//! A [`KeyerConfiguration`] is a list of fragments; each fragment is a list of rules; a rule
//! pairs a [`MatchPredicate`] with a [`ResultPredicate`]. The keyer (`crate::keyer`) gives the
//! semantics; this module only parses and validates.
//!
//! Protobuf oneofs are Rust enums, written in YAML as a map with exactly one key
//! (`{request_type_match: {...}}`). Parsing goes through a struct with every member optional
//! (`Raw*`), so "none set" and "two set" get a clear error at the oneof's path.
//! Proto3 scalars and repeated fields default to zero / empty when absent, as in protojson;
//! message fields the proto marks required are required.
//!
//! Invariants of a configuration that passed [`KeyerConfiguration::validate`]: every rule
//! of protoc-gen-validate in the proto holds (at least 1 fragment and 1 rule per fragment,
//! at least 2 predicates in `and_match`/`or_match`/`and_result`, at least 1 type, at least 1
//! path segment, non-empty keys and patterns, `any_match` and `exact` are `true`,
//! `element >= 0`, a locality action sets at least one member), and every regex compiles
//! (after [`crate::config::gocompat::translate_regex`]).

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::de::{int32, null_default};
use super::gocompat::{compile_regex, regex_error_reason};

/// The whole rules file: the fragments of the key, joined with `_`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyerConfiguration {
    /// The pieces of the key, in order (at least 1).
    #[serde(default, deserialize_with = "null_default")]
    pub fragments: Vec<Fragment>,
}

/// One piece of the key: the first rule that matches produces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fragment {
    /// Candidate rules, in order (at least 1).
    #[serde(default, deserialize_with = "null_default")]
    pub rules: Vec<Rule>,
}

/// A condition on the request and the string it produces when the condition holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// When the rule applies (required).
    pub r#match: MatchPredicate,
    /// What it produces (required).
    pub result: ResultPredicate,
}

/// A condition on a request (oneof `type`, required; recursive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawMatchPredicate")]
pub enum MatchPredicate {
    /// All of the predicates hold.
    AndMatch(MatchSet),
    /// At least one of the predicates holds.
    OrMatch(MatchSet),
    /// The predicate does not hold.
    NotMatch(Box<MatchPredicate>),
    /// Always holds; must be `true`.
    AnyMatch(bool),
    /// The request's type URL is one of the list.
    RequestTypeMatch(RequestTypeMatch),
    /// A condition on the request's node.
    RequestNodeMatch(RequestNodeMatch),
}

/// The operands of `and_match` / `or_match`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSet {
    /// At least 2 predicates.
    #[serde(default, deserialize_with = "null_default")]
    pub rules: Vec<MatchPredicate>,
}

/// Matches when the request's type URL is exactly one of `types`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestTypeMatch {
    /// Full type URLs such as `type.googleapis.com/envoy.config.cluster.v3.Cluster` (at least 1).
    #[serde(default, deserialize_with = "null_default")]
    pub types: Vec<String>,
}

/// A condition on one node field (oneof `type`, required).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawRequestNodeMatch")]
pub enum RequestNodeMatch {
    /// Matches `node.id`.
    IdMatch(StringMatch),
    /// Matches `node.cluster`.
    ClusterMatch(StringMatch),
    /// Matches `node.locality`.
    LocalityMatch(LocalityMatch),
    /// Matches a value inside `node.metadata`.
    NodeMetadataMatch(NodeMetadataMatch),
}

/// A condition on a string (oneof `type`, required). An empty `exact_match` or
/// `regex_match` never matches, as in the Go relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawStringMatch")]
pub enum StringMatch {
    /// String equality.
    ExactMatch(String),
    /// A Go RE2 regex, unanchored unless it anchors itself.
    RegexMatch(String),
}

/// A condition on a boolean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoolMatch {
    /// The value the boolean must have (default `false`).
    #[serde(default, alias = "valueMatch")]
    pub value_match: bool,
}

/// A condition on the node's locality: every member that is set must match; a node without
/// locality compares as empty strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityMatch {
    /// Matches `locality.region`.
    #[serde(default)]
    pub region: Option<StringMatch>,
    /// Matches `locality.zone`.
    #[serde(default)]
    pub zone: Option<StringMatch>,
    /// Matches `locality.sub_zone`.
    #[serde(default, alias = "subZone")]
    pub sub_zone: Option<StringMatch>,
}

/// One key of a path into nested metadata structs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSegment {
    /// The struct key (at least 1 character).
    #[serde(default)]
    pub key: String,
}

/// A condition on a metadata value (oneof `match`, required).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawStructValueMatch")]
pub enum StructValueMatch {
    /// The value is a string that matches.
    StringMatch(StringMatch),
    /// The value is a boolean equal to `value_match`.
    BoolMatch(BoolMatch),
}

/// A condition on the metadata value found at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMetadataMatch {
    /// Keys leading through nested structs to the value (at least 1).
    #[serde(default, deserialize_with = "null_default")]
    pub path: Vec<PathSegment>,
    /// The condition on the value (required).
    pub r#match: StructValueMatch,
}

/// What a rule produces (oneof `type`, required).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawResultPredicate")]
pub enum ResultPredicate {
    /// The concatenation of sub-results, with no separator.
    AndResult(AndResult),
    /// A string derived from a node field.
    RequestNodeFragment(RequestNodeFragment),
    /// A string derived from one of the request's resource names.
    ResourceNamesFragment(ResourceNamesFragment),
    /// A literal.
    StringFragment(String),
}

/// How a field value becomes a key piece (oneof `action`, required).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawResultAction")]
pub enum ResultAction {
    /// Use the value as it is (must be `true`); an empty value is an error.
    Exact(bool),
    /// Replace every match of a regex in the value.
    RegexAction(RegexAction),
}

/// Go `regexp.ReplaceAllString(value, replace)` with `pattern`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexAction {
    /// A Go RE2 regex (at least 1 character).
    #[serde(default)]
    pub pattern: String,
    /// The replacement, with `$1` / `${name}` expansion (may be empty).
    #[serde(default)]
    pub replace: String,
}

/// Actions on the node's locality members; the results of those set are joined with `|`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityResultAction {
    /// Applied to `locality.region`.
    #[serde(default, alias = "regionAction")]
    pub region_action: Option<ResultAction>,
    /// Applied to `locality.zone`.
    #[serde(default, alias = "zoneAction")]
    pub zone_action: Option<ResultAction>,
    /// Applied to `locality.sub_zone`.
    #[serde(default, alias = "subzoneAction")]
    pub subzone_action: Option<ResultAction>,
}

/// An action on the string metadata value found at `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMetadataAction {
    /// Keys leading through nested structs to the value (at least 1).
    #[serde(default, deserialize_with = "null_default")]
    pub path: Vec<PathSegment>,
    /// What to do with the value (required).
    pub action: ResultAction,
}

/// The operands of `and_result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AndResult {
    /// At least 2 results, concatenated in order.
    #[serde(default, alias = "resultPredicates", deserialize_with = "null_default")]
    pub result_predicates: Vec<ResultPredicate>,
}

/// A key piece derived from a node field (oneof `action`, required).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawRequestNodeFragment")]
pub enum RequestNodeFragment {
    /// From `node.id`.
    IdAction(ResultAction),
    /// From `node.cluster`.
    ClusterAction(ResultAction),
    /// From `node.locality`.
    LocalityAction(LocalityResultAction),
    /// From a string in `node.metadata`.
    NodeMetadataAction(NodeMetadataAction),
}

/// A key piece derived from `resource_names[element]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceNamesFragment {
    /// Index into the request's resource names (default 0, must be >= 0).
    #[serde(default, deserialize_with = "int32")]
    pub element: i32,
    /// What to do with the name (required).
    pub action: ResultAction,
    /// Read the `xdstp://` authority of the name instead of the whole name (xDS-TP1
    /// federation: one key per authority). When the name is not an `xdstp://` name the
    /// rule does not apply and the fragment's next rule is tried.
    #[serde(default, alias = "xdstpAuthority")]
    pub xdstp_authority: bool,
}

// === oneof parsing ===

/// Picks the single member of a oneof that is set.
fn one_of<T>(members: Vec<(&'static str, Option<T>)>) -> Result<T, String> {
    let quote = |names: &[&str]| names.iter().map(|name| format!("`{name}`")).collect::<Vec<_>>();
    let mut names = Vec::with_capacity(members.len());
    let mut set = Vec::new();
    let mut value = None;
    for (name, member) in members {
        names.push(name);
        if let Some(member) = member {
            set.push(name);
            value.get_or_insert(member);
        }
    }
    match value {
        Some(value) if set.len() == 1 => Ok(value),
        Some(_) => Err(format!(
            "only one of {} may be set, but {} are set",
            quote(&names).join(", "),
            quote(&set).join(" and ")
        )),
        None => Err(format!("one of {} must be set", quote(&names).join(", "))),
    }
}

/// Declares the `Raw*` struct of a oneof enum (every member optional, with its protojson
/// lowerCamelCase alias) and the `TryFrom` that picks the member.
macro_rules! oneof {
    ($raw:ident => $name:ident as $display:tt { $($field:ident / $camel:literal => $variant:ident($ty:ty)),+ $(,)? }) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, expecting = $display)]
        struct $raw {
            $(
                #[serde(default, alias = $camel)]
                $field: Option<$ty>,
            )+
        }

        impl TryFrom<$raw> for $name {
            type Error = String;

            fn try_from(raw: $raw) -> Result<Self, String> {
                one_of(vec![$((stringify!($field), raw.$field.map($name::$variant))),+])
            }
        }
    };
}

oneof!(RawMatchPredicate => MatchPredicate as "struct MatchPredicate" {
    and_match / "andMatch" => AndMatch(MatchSet),
    or_match / "orMatch" => OrMatch(MatchSet),
    not_match / "notMatch" => NotMatch(Box<MatchPredicate>),
    any_match / "anyMatch" => AnyMatch(bool),
    request_type_match / "requestTypeMatch" => RequestTypeMatch(RequestTypeMatch),
    request_node_match / "requestNodeMatch" => RequestNodeMatch(RequestNodeMatch),
});

oneof!(RawRequestNodeMatch => RequestNodeMatch as "struct RequestNodeMatch" {
    id_match / "idMatch" => IdMatch(StringMatch),
    cluster_match / "clusterMatch" => ClusterMatch(StringMatch),
    locality_match / "localityMatch" => LocalityMatch(LocalityMatch),
    node_metadata_match / "nodeMetadataMatch" => NodeMetadataMatch(NodeMetadataMatch),
});

oneof!(RawStringMatch => StringMatch as "struct StringMatch" {
    exact_match / "exactMatch" => ExactMatch(String),
    regex_match / "regexMatch" => RegexMatch(String),
});

oneof!(RawStructValueMatch => StructValueMatch as "struct StructValueMatch" {
    string_match / "stringMatch" => StringMatch(StringMatch),
    bool_match / "boolMatch" => BoolMatch(BoolMatch),
});

oneof!(RawResultPredicate => ResultPredicate as "struct ResultPredicate" {
    and_result / "andResult" => AndResult(AndResult),
    request_node_fragment / "requestNodeFragment" => RequestNodeFragment(RequestNodeFragment),
    resource_names_fragment / "resourceNamesFragment" => ResourceNamesFragment(ResourceNamesFragment),
    string_fragment / "stringFragment" => StringFragment(String),
});

oneof!(RawResultAction => ResultAction as "struct ResultAction" {
    exact / "exact" => Exact(bool),
    regex_action / "regexAction" => RegexAction(RegexAction),
});

oneof!(RawRequestNodeFragment => RequestNodeFragment as "struct RequestNodeFragment" {
    id_action / "idAction" => IdAction(ResultAction),
    cluster_action / "clusterAction" => ClusterAction(ResultAction),
    locality_action / "localityAction" => LocalityAction(LocalityResultAction),
    node_metadata_action / "nodeMetadataAction" => NodeMetadataAction(NodeMetadataAction),
});

// === validation ===

fn invalid(field: String, message: impl Into<String>) -> ConfigError {
    ConfigError::new("", field, message)
}

fn at_least<T>(items: &[T], min: usize, field: String, what: &str) -> Result<(), ConfigError> {
    if items.len() < min {
        let plural = if min == 1 { "" } else { "s" };
        return Err(invalid(field, format!("must contain at least {min} {what}{plural}, got {}", items.len())));
    }
    Ok(())
}

fn check_regex(pattern: &str, field: String) -> Result<(), ConfigError> {
    compile_regex(pattern)
        .map(drop)
        .map_err(|e| invalid(field, format!("invalid regex \"{pattern}\": {}", regex_error_reason(&e))))
}

/// A part of the rules that checks itself, reporting problems under the field path it is given.
trait Validate {
    fn validate(&self, path: &str) -> Result<(), ConfigError>;
}

/// Checks every item, the i-th at `{path}[i]`.
fn validate_each<T: Validate>(items: &[T], path: &str) -> Result<(), ConfigError> {
    items.iter().enumerate().try_for_each(|(i, item)| item.validate(&format!("{path}[{i}]")))
}

/// Checks the members that are set, each at `{path}.{name}`.
fn validate_present<T: Validate>(path: &str, members: &[(&str, &Option<T>)]) -> Result<(), ConfigError> {
    for (name, member) in members {
        if let Some(member) = member {
            member.validate(&format!("{path}.{name}"))?;
        }
    }
    Ok(())
}

fn check_path(path: &[PathSegment], field: &str) -> Result<(), ConfigError> {
    at_least(path, 1, format!("{field}.path"), "segment")?;
    for (i, segment) in path.iter().enumerate() {
        if segment.key.is_empty() {
            return Err(invalid(format!("{field}.path[{i}].key"), "must not be empty"));
        }
    }
    Ok(())
}

// === impl KeyerConfiguration ===

impl KeyerConfiguration {
    /// Checks every protoc-gen-validate rule of the proto and compiles every regex.
    ///
    /// # Errors
    ///
    /// The first problem, as a [`ConfigError`] with its field path and an empty `file`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        at_least(&self.fragments, 1, "fragments".to_string(), "fragment")?;
        for (i, fragment) in self.fragments.iter().enumerate() {
            let path = format!("fragments[{i}]");
            at_least(&fragment.rules, 1, format!("{path}.rules"), "rule")?;
            for (j, rule) in fragment.rules.iter().enumerate() {
                let path = format!("{path}.rules[{j}]");
                rule.r#match.validate(&format!("{path}.match"))?;
                rule.result.validate(&format!("{path}.result"))?;
            }
        }
        Ok(())
    }
}

// === impl MatchPredicate ===

impl Validate for MatchPredicate {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        match self {
            Self::AndMatch(set) => set.validate(&format!("{path}.and_match")),
            Self::OrMatch(set) => set.validate(&format!("{path}.or_match")),
            Self::NotMatch(inner) => inner.validate(&format!("{path}.not_match")),
            Self::AnyMatch(true) => Ok(()),
            Self::AnyMatch(false) => {
                Err(invalid(format!("{path}.any_match"), "must be true (to negate a predicate, use not_match)"))
            }
            Self::RequestTypeMatch(m) => at_least(&m.types, 1, format!("{path}.request_type_match.types"), "type"),
            Self::RequestNodeMatch(m) => m.validate(&format!("{path}.request_node_match")),
        }
    }
}

impl Validate for MatchSet {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let path = format!("{path}.rules");
        at_least(&self.rules, 2, path.clone(), "predicate")?;
        validate_each(&self.rules, &path)
    }
}

impl Validate for RequestNodeMatch {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        match self {
            Self::IdMatch(m) => m.validate(&format!("{path}.id_match")),
            Self::ClusterMatch(m) => m.validate(&format!("{path}.cluster_match")),
            Self::LocalityMatch(m) => {
                let path = format!("{path}.locality_match");
                validate_present(&path, &[("region", &m.region), ("zone", &m.zone), ("sub_zone", &m.sub_zone)])
            }
            Self::NodeMetadataMatch(m) => {
                let path = format!("{path}.node_metadata_match");
                check_path(&m.path, &path)?;
                match &m.r#match {
                    StructValueMatch::StringMatch(s) => s.validate(&format!("{path}.match.string_match")),
                    StructValueMatch::BoolMatch(_) => Ok(()),
                }
            }
        }
    }
}

impl Validate for StringMatch {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        match self {
            Self::ExactMatch(_) => Ok(()),
            Self::RegexMatch(pattern) => check_regex(pattern, format!("{path}.regex_match")),
        }
    }
}

// === impl ResultPredicate ===

impl Validate for ResultPredicate {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        match self {
            Self::AndResult(and) => {
                let path = format!("{path}.and_result.result_predicates");
                at_least(&and.result_predicates, 2, path.clone(), "result predicate")?;
                validate_each(&and.result_predicates, &path)
            }
            Self::RequestNodeFragment(fragment) => fragment.validate(&format!("{path}.request_node_fragment")),
            Self::ResourceNamesFragment(fragment) => {
                let path = format!("{path}.resource_names_fragment");
                if fragment.element < 0 {
                    return Err(invalid(
                        format!("{path}.element"),
                        format!("must be greater than or equal to 0, got {}", fragment.element),
                    ));
                }
                fragment.action.validate(&format!("{path}.action"))
            }
            Self::StringFragment(_) => Ok(()),
        }
    }
}

impl Validate for RequestNodeFragment {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        match self {
            Self::IdAction(action) => action.validate(&format!("{path}.id_action")),
            Self::ClusterAction(action) => action.validate(&format!("{path}.cluster_action")),
            Self::LocalityAction(action) => {
                let path = format!("{path}.locality_action");
                let members = [
                    ("region_action", &action.region_action),
                    ("zone_action", &action.zone_action),
                    ("subzone_action", &action.subzone_action),
                ];
                if members.iter().all(|(_, member)| member.is_none()) {
                    return Err(invalid(
                        path,
                        "at least one of `region_action`, `zone_action`, `subzone_action` must be set",
                    ));
                }
                validate_present(&path, &members)
            }
            Self::NodeMetadataAction(action) => {
                let path = format!("{path}.node_metadata_action");
                check_path(&action.path, &path)?;
                action.action.validate(&format!("{path}.action"))
            }
        }
    }
}

impl Validate for ResultAction {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        match self {
            Self::Exact(true) => Ok(()),
            Self::Exact(false) => Err(invalid(format!("{path}.exact"), "must be true (or use regex_action)")),
            Self::RegexAction(action) => {
                if action.pattern.is_empty() {
                    return Err(invalid(format!("{path}.regex_action.pattern"), "must not be empty"));
                }
                check_regex(&action.pattern, format!("{path}.regex_action.pattern"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_rules;

    fn parse(text: &str) -> Result<KeyerConfiguration, ConfigError> {
        parse_rules(text, "rules.yaml")
    }

    /// One fragment with one rule: `match: <m>` and `result: <r>`, as YAML flow maps.
    fn rule(m: &str, r: &str) -> String {
        format!("fragments:\n  - rules:\n      - match: {m}\n        result: {r}\n")
    }

    const ANY: &str = "{any_match: true}";
    const LIT: &str = "{string_fragment: x}";

    #[test]
    fn every_predicate_and_result_parses() {
        let matches = [
            "{and_match: {rules: [{any_match: true}, {request_type_match: {types: [a]}}]}}",
            "{or_match: {rules: [{any_match: true}, {not_match: {any_match: true}}]}}",
            "{not_match: {request_node_match: {id_match: {exact_match: a}}}}",
            "{any_match: true}",
            "{request_type_match: {types: [a, b]}}",
            "{request_node_match: {id_match: {regex_match: '^a.*$'}}}",
            "{request_node_match: {cluster_match: {exact_match: staging}}}",
            "{request_node_match: {locality_match: {region: {exact_match: r}, zone: {regex_match: z}, sub_zone: {exact_match: s}}}}",
            "{request_node_match: {locality_match: {}}}",
            "{request_node_match: {node_metadata_match: {path: [{key: a}, {key: b}], match: {string_match: {exact_match: v}}}}}",
            "{request_node_match: {node_metadata_match: {path: [{key: a}], match: {bool_match: {value_match: true}}}}}",
            "{request_node_match: {node_metadata_match: {path: [{key: a}], match: {bool_match: {}}}}}",
        ];
        for m in matches {
            let rules = parse(&rule(m, LIT)).unwrap_or_else(|e| panic!("{m}: {e}"));
            // Serializing gives back the same tree.
            let json = serde_json::to_string(&rules).unwrap();
            assert_eq!(parse(&json).unwrap(), rules, "{json}");
        }
        let results = [
            "{string_fragment: lds}",
            "{string_fragment: ''}",
            "{and_result: {result_predicates: [{string_fragment: a}, {and_result: {result_predicates: [{string_fragment: b}, {string_fragment: c}]}}]}}",
            "{request_node_fragment: {id_action: {exact: true}}}",
            "{request_node_fragment: {cluster_action: {regex_action: {pattern: '^(.*)-.*$', replace: '$1'}}}}",
            "{request_node_fragment: {cluster_action: {regex_action: {pattern: 'x'}}}}",
            "{request_node_fragment: {locality_action: {region_action: {exact: true}}}}",
            "{request_node_fragment: {locality_action: {region_action: {exact: true}, zone_action: {exact: true}, subzone_action: {regex_action: {pattern: a, replace: b}}}}}",
            "{request_node_fragment: {node_metadata_action: {path: [{key: a}], action: {exact: true}}}}",
            "{resource_names_fragment: {element: 0, action: {exact: true}}}",
            "{resource_names_fragment: {action: {exact: true}}}",
            "{resource_names_fragment: {element: '2', action: {regex_action: {pattern: '^(.*)$', replace: 'x$1'}}}}",
        ];
        for r in results {
            let rules = parse(&rule(ANY, r)).unwrap_or_else(|e| panic!("{r}: {e}"));
            let json = serde_json::to_string(&rules).unwrap();
            assert_eq!(parse(&json).unwrap(), rules, "{json}");
        }
    }

    #[test]
    fn parses_into_the_expected_tree() {
        let rules = parse(&rule(
            "{request_node_match: {cluster_match: {exact_match: staging}}}",
            "{resource_names_fragment: {element: 1, action: {exact: true}}}",
        ))
        .unwrap();
        assert_eq!(
            rules,
            KeyerConfiguration {
                fragments: vec![Fragment {
                    rules: vec![Rule {
                        r#match: MatchPredicate::RequestNodeMatch(RequestNodeMatch::ClusterMatch(
                            StringMatch::ExactMatch("staging".into())
                        )),
                        result: ResultPredicate::ResourceNamesFragment(ResourceNamesFragment {
                            element: 1,
                            action: ResultAction::Exact(true),
                            xdstp_authority: false,
                        }),
                    }],
                }],
            }
        );
    }

    #[test]
    fn protojson_camel_case_names_are_accepted() {
        let text = rule(
            "{andMatch: {rules: [{requestTypeMatch: {types: [a]}}, {notMatch: {requestNodeMatch: {nodeMetadataMatch: {path: [{key: k}], match: {boolMatch: {valueMatch: true}}}}}}, {requestNodeMatch: {localityMatch: {subZone: {regexMatch: x}}}}, {orMatch: {rules: [{anyMatch: true}, {requestNodeMatch: {idMatch: {exactMatch: i}}}]}}]}}",
            "{andResult: {resultPredicates: [{stringFragment: a}, {requestNodeFragment: {nodeMetadataAction: {path: [{key: k}], action: {regexAction: {pattern: p}}}}}, {requestNodeFragment: {localityAction: {regionAction: {exact: true}, zoneAction: {exact: true}, subzoneAction: {exact: true}}}}, {resourceNamesFragment: {element: 0, action: {exact: true}}}, {requestNodeFragment: {idAction: {exact: true}}}, {requestNodeFragment: {clusterAction: {exact: true}}}]}}",
        );
        parse(&text).unwrap();
    }

    /// Every kind of rules error, with the field path and the words the message must contain.
    #[test]
    fn errors_name_file_field_and_problem() {
        const R: &str = "fragments[0].rules[0]";
        let cases: Vec<(String, String, &str)> = vec![
            // unknown fields
            ("fragmentss: []".into(), "fragmentss".into(), "unknown field `fragmentss`"),
            (rule(ANY, LIT).replace("result:", "reslt:"), format!("{R}.reslt"), "unknown field `reslt`"),
            (rule("{request_type_match: {type: [a]}}", LIT), format!("{R}.match.request_type_match.type"), "unknown field `type`"),
            (rule("{requets_type_match: {types: [a]}}", LIT), format!("{R}.match.requets_type_match"), "unknown field `requets_type_match`"),
            // missing fields
            ("fragments: [{rules: [{match: {any_match: true}}]}]".into(), R.into(), "missing field `result`"),
            (rule(ANY, "{resource_names_fragment: {element: 0}}"), format!("{R}.result.resource_names_fragment"), "missing field `action`"),
            (rule("{request_node_match: {node_metadata_match: {path: [{key: a}]}}}", LIT), format!("{R}.match.request_node_match.node_metadata_match"), "missing field `match`"),
            // oneof with two members / none
            (rule("{any_match: true, request_type_match: {types: [a]}}", LIT), format!("{R}.match"), "but `any_match` and `request_type_match` are set"),
            (rule("{}", LIT), format!("{R}.match"), "one of `and_match`, `or_match`, `not_match`, `any_match`, `request_type_match`, `request_node_match` must be set"),
            (rule(ANY, "{}"), format!("{R}.result"), "one of `and_result`, `request_node_fragment`, `resource_names_fragment`, `string_fragment` must be set"),
            (rule(ANY, "{string_fragment: a, and_result: {result_predicates: []}}"), format!("{R}.result"), "only one of"),
            (rule("{request_node_match: {}}", LIT), format!("{R}.match.request_node_match"), "one of `id_match`, `cluster_match`, `locality_match`, `node_metadata_match` must be set"),
            (rule("{request_node_match: {id_match: {exact_match: a, regex_match: b}}}", LIT), format!("{R}.match.request_node_match.id_match"), "`exact_match` and `regex_match` are set"),
            (rule("{request_node_match: {node_metadata_match: {path: [{key: a}], match: {}}}}", LIT), format!("{R}.match.request_node_match.node_metadata_match.match"), "one of `string_match`, `bool_match` must be set"),
            (rule(ANY, "{request_node_fragment: {}}"), format!("{R}.result.request_node_fragment"), "one of `id_action`, `cluster_action`, `locality_action`, `node_metadata_action` must be set"),
            (rule(ANY, "{request_node_fragment: {id_action: {}}}"), format!("{R}.result.request_node_fragment.id_action"), "one of `exact`, `regex_action` must be set"),
            (rule(ANY, "{request_node_fragment: {id_action: {exact: true, regex_action: {pattern: a}}}}"), format!("{R}.result.request_node_fragment.id_action"), "`exact` and `regex_action` are set"),
            // min counts
            ("fragments: []".into(), "fragments".into(), "must contain at least 1 fragment, got 0"),
            ("{}".into(), "fragments".into(), "must contain at least 1 fragment"),
            ("fragments: [{rules: []}]".into(), "fragments[0].rules".into(), "must contain at least 1 rule, got 0"),
            ("fragments: [{}]".into(), "fragments[0].rules".into(), "must contain at least 1 rule"),
            (rule("{and_match: {rules: [{any_match: true}]}}", LIT), format!("{R}.match.and_match.rules"), "must contain at least 2 predicates, got 1"),
            (rule("{or_match: {rules: []}}", LIT), format!("{R}.match.or_match.rules"), "at least 2 predicates"),
            (rule("{request_type_match: {types: []}}", LIT), format!("{R}.match.request_type_match.types"), "at least 1 type"),
            (rule("{request_node_match: {node_metadata_match: {path: [], match: {bool_match: {}}}}}", LIT), format!("{R}.match.request_node_match.node_metadata_match.path"), "at least 1 segment"),
            (rule(ANY, "{and_result: {result_predicates: [{string_fragment: a}]}}"), format!("{R}.result.and_result.result_predicates"), "at least 2 result predicates, got 1"),
            (rule(ANY, "{request_node_fragment: {node_metadata_action: {path: [], action: {exact: true}}}}"), format!("{R}.result.request_node_fragment.node_metadata_action.path"), "at least 1 segment"),
            // required values
            (rule("{any_match: false}", LIT), format!("{R}.match.any_match"), "must be true"),
            (rule(ANY, "{request_node_fragment: {id_action: {exact: false}}}"), format!("{R}.result.request_node_fragment.id_action.exact"), "must be true"),
            (rule(ANY, "{request_node_fragment: {cluster_action: {regex_action: {replace: x}}}}"), format!("{R}.result.request_node_fragment.cluster_action.regex_action.pattern"), "must not be empty"),
            (rule("{request_node_match: {node_metadata_match: {path: [{key: a}, {key: ''}], match: {bool_match: {}}}}}", LIT), format!("{R}.match.request_node_match.node_metadata_match.path[1].key"), "must not be empty"),
            (rule(ANY, "{request_node_fragment: {node_metadata_action: {path: [{}], action: {exact: true}}}}"), format!("{R}.result.request_node_fragment.node_metadata_action.path[0].key"), "must not be empty"),
            (rule(ANY, "{resource_names_fragment: {element: -1, action: {exact: true}}}"), format!("{R}.result.resource_names_fragment.element"), "greater than or equal to 0, got -1"),
            (rule(ANY, "{resource_names_fragment: {element: 3000000000, action: {exact: true}}}"), format!("{R}.result.resource_names_fragment.element"), "does not fit a 32-bit integer"),
            (rule(ANY, "{request_node_fragment: {locality_action: {}}}"), format!("{R}.result.request_node_fragment.locality_action"), "at least one of `region_action`, `zone_action`, `subzone_action` must be set"),
            (rule(ANY, "{request_node_fragment: {locality_action: {zone_action: {exact: false}}}}"), format!("{R}.result.request_node_fragment.locality_action.zone_action.exact"), "must be true"),
            // bad regexes, nested deep
            (rule("{request_node_match: {id_match: {regex_match: '('}}}", LIT), format!("{R}.match.request_node_match.id_match.regex_match"), "invalid regex \"(\": unclosed group"),
            (rule("{not_match: {request_node_match: {locality_match: {zone: {regex_match: '[a'}}}}}", LIT), format!("{R}.match.not_match.request_node_match.locality_match.zone.regex_match"), "invalid regex \"[a\""),
            (rule("{request_node_match: {node_metadata_match: {path: [{key: a}], match: {string_match: {regex_match: 'a)'}}}}}", LIT), format!("{R}.match.request_node_match.node_metadata_match.match.string_match.regex_match"), "invalid regex"),
            (
                "fragments: [{rules: [{match: {any_match: true}, result: {string_fragment: a}}]}, {rules: [{match: {any_match: true}, result: {string_fragment: a}}, {match: {any_match: true}, result: {request_node_fragment: {cluster_action: {regex_action: {pattern: '(?P<', replace: x}}}}}]}]".into(),
                "fragments[1].rules[1].result.request_node_fragment.cluster_action.regex_action.pattern".into(),
                "invalid regex \"(?P<\"",
            ),
            (rule(ANY, "{and_result: {result_predicates: [{string_fragment: a}, {request_node_fragment: {node_metadata_action: {path: [{key: k}], action: {regex_action: {pattern: '\\'}}}}}]}}"), format!("{R}.result.and_result.result_predicates[1].request_node_fragment.node_metadata_action.action.regex_action.pattern"), "invalid regex"),
            // wrong types
            (rule("{any_match: yes please}", LIT), format!("{R}.match.any_match"), "invalid type"),
            (rule("{request_type_match: {types: a}}", LIT), format!("{R}.match.request_type_match.types"), "invalid type"),
            (rule("{request_node_match: {node_metadata_match: {path: [{key: a}], match: {bool_match: {value_match: 3}}}}}", LIT), format!("{R}.match.request_node_match.node_metadata_match.match.bool_match.value_match"), "expected a boolean"),
            (rule("[]", LIT), format!("{R}.match"), "invalid type: sequence, expected struct MatchPredicate"),
            ("fragments: {rules: []}".into(), "fragments".into(), "invalid type: map, expected a sequence"),
        ];
        for (text, field, needle) in cases {
            let err = parse(&text).expect_err(&text);
            assert_eq!(err.file, "rules.yaml", "{err}");
            assert_eq!(err.field, field, "{err}\n{text}");
            assert!(err.message.contains(needle), "{err} does not contain {needle:?}");
            assert!(err.to_string().starts_with(&format!("rules.yaml: {field}: ")), "{err}");
            assert!(!err.message.ends_with('.'), "{err}");
        }
    }

    #[test]
    fn validate_checks_rules_built_in_code() {
        let rules = KeyerConfiguration {
            fragments: vec![Fragment {
                rules: vec![Rule {
                    r#match: MatchPredicate::NotMatch(Box::new(MatchPredicate::AnyMatch(false))),
                    result: ResultPredicate::StringFragment("x".into()),
                }],
            }],
        };
        let err = rules.validate().unwrap_err();
        assert_eq!(err.field, "fragments[0].rules[0].match.not_match.any_match");
        assert_eq!(err.file, "");
    }
}
