//! The keyer: maps a request (type URL, node, resource names) to its aggregation key with the
//! rules of a [`KeyerConfiguration`], as the Go relay's `internal/app/mapper` does.
//!
//! Semantics:
//!
//! - An empty type URL is an error, and so is an EDS request (v2 or v3) without resource
//!   names (the Go relay's workaround for envoy#7529).
//! - For each fragment in order, the **first** rule whose match holds produces the fragment's
//!   piece, and the other rules of the fragment are not looked at. This differs on purpose from
//!   the Go code, which adds a piece for every matching rule; the proto comment, the example
//!   files and our docs all say first match wins.
//! - A fragment with no matching rule adds nothing. Pieces are joined with `_`; no piece at all
//!   is [`KeyError::NoRuleMatched`].
//! - A missing node behaves as a node with empty fields and no metadata.
//! - Any error (missing metadata, index out of range, empty result) fails the whole key.
//!
//! Invariants: [`Keyer::key`] is a pure function of the request (no state, no I/O) and never
//! panics; every regex is compiled once, in [`Keyer::new`]; a `Keyer` is cheap to clone (the
//! compiled rules are shared).

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Struct, Value};
use regex::Regex;

use crate::config::gocompat::{compile_regex, regex_error_reason};
use crate::config::{
    ConfigError, KeyerConfiguration, MatchPredicate, RequestNodeFragment, RequestNodeMatch, ResultAction,
    ResultPredicate, StringMatch, StructValueMatch,
};

/// EDS type URL of the retired v2 API, still covered by the envoy#7529 workaround.
const ENDPOINT_V2: &str = "type.googleapis.com/envoy.api.v2.ClusterLoadAssignment";

/// Maps requests to aggregation keys. Built once from validated rules; cheap to clone and
/// safe to share between tasks.
#[derive(Debug, Clone)]
pub struct Keyer {
    fragments: Arc<[Vec<CompiledRule>]>,
}

/// What the keyer looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct KeyRequest<'a> {
    /// The request's type URL.
    pub type_url: &'a str,
    /// The node, if the request (or an earlier one on the stream) carried it.
    pub node: Option<&'a Node>,
    /// The requested resource names.
    pub resource_names: &'a [String],
}

/// Why a request has no key. Each message says what to change, in the request or in the rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The request's type URL is empty.
    #[error("the request has an empty type url; every request must name the resource type it asks for")]
    EmptyTypeUrl,
    /// An EDS request named no resources (workaround for envoy#7529, as in the Go relay).
    #[error(
        "eds request (type {type_url}) names no resources; eds requests must list the clusters \
         whose endpoints they want (wildcard eds is refused as a workaround for envoy#7529)"
    )]
    MissingResourceNames {
        /// The EDS type URL of the request.
        type_url: String,
    },
    /// A `resource_names_fragment` with `xdstp_authority` read a name that is not an
    /// `xdstp://` name: the rule does not apply (the fragment's next rule is tried).
    #[error("the resource name is not an xdstp:// name, so it has no authority")]
    NotXdstp,
    /// No rule of any fragment matched.
    #[error(
        "no aggregation rule matched the request (type {type_url}, node id {node_id:?}, cluster {cluster:?}); \
         add a rule that matches it to the aggregation rules"
    )]
    NoRuleMatched {
        /// The request's type URL.
        type_url: String,
        /// The node's id ("" without a node).
        node_id: String,
        /// The node's cluster ("" without a node).
        cluster: String,
    },
    /// A rule matches on or reads node metadata and the node has none.
    #[error(
        "{rule}: the rule reads node metadata but node {node_id:?} sent none; \
         set metadata in the node's bootstrap or change the rule"
    )]
    NoNodeMetadata {
        /// The rule, as `fragments[i].rules[j]`.
        rule: String,
        /// The node's id.
        node_id: String,
    },
    /// A `node_metadata_action` path leads nowhere in the node's metadata.
    #[error(
        "{rule}: node {node_id:?} has no metadata at path {path}; \
         set it in the node's bootstrap or change the rule"
    )]
    MetadataPathMissing {
        /// The rule, as `fragments[i].rules[j]`.
        rule: String,
        /// The metadata keys, joined with `.`.
        path: String,
        /// The node's id.
        node_id: String,
    },
    /// A `resource_names_fragment` reads an index the request does not have.
    #[error(
        "{rule}: the rule reads resource_names[{index}] but the request (type {type_url}) names {len} resources; \
         match only requests that name enough resources or lower `element`"
    )]
    ResourceIndexOutOfRange {
        /// The rule, as `fragments[i].rules[j]`.
        rule: String,
        /// The index the rule reads.
        index: usize,
        /// How many resource names the request has.
        len: usize,
        /// The request's type URL.
        type_url: String,
    },
    /// `exact: true` on an empty value.
    #[error(
        "{rule}: the rule uses {what} as a key piece but it is empty for node {node_id:?}; \
         set it on the node or match such nodes with another rule"
    )]
    EmptyValue {
        /// The rule, as `fragments[i].rules[j]`.
        rule: String,
        /// The value read, for example `the node cluster` or `resource_names[0]`.
        what: String,
        /// The node's id.
        node_id: String,
    },
    /// A `regex_action` produced an empty string.
    #[error(
        "{rule}: regex {pattern:?} with replacement {replace:?} turns {what} ({value:?}) into an empty key piece; \
         change the regex or the replacement so that it keeps something"
    )]
    EmptyRegexResult {
        /// The rule, as `fragments[i].rules[j]`.
        rule: String,
        /// The value read, for example `the node cluster`.
        what: String,
        /// The value before replacement.
        value: String,
        /// The regex.
        pattern: String,
        /// The replacement.
        replace: String,
    },
    /// A `locality_action` sets none of its members (only possible for rules that skipped
    /// validation).
    #[error("{rule}: locality_action sets none of region_action, zone_action, subzone_action; set at least one")]
    NoLocalityAction {
        /// The rule, as `fragments[i].rules[j]`.
        rule: String,
    },
}

// === compiled rules ===

#[derive(Debug)]
struct CompiledRule {
    /// `fragments[i].rules[j]`, for error messages.
    location: String,
    matcher: Matcher,
    producer: Producer,
}

#[derive(Debug)]
enum Matcher {
    All(Vec<Matcher>),
    Any(Vec<Matcher>),
    Not(Box<Matcher>),
    Always,
    TypeIn(Vec<String>),
    Id(StrMatcher),
    Cluster(StrMatcher),
    Locality { region: Option<StrMatcher>, zone: Option<StrMatcher>, sub_zone: Option<StrMatcher> },
    Metadata { path: Vec<String>, value: ValueMatcher },
}

#[derive(Debug)]
enum StrMatcher {
    Exact(String),
    Regex(Regex),
    /// An empty `exact_match` or `regex_match`: never matches, as in Go.
    Never,
}

#[derive(Debug)]
enum ValueMatcher {
    Str(StrMatcher),
    Bool(bool),
}

#[derive(Debug)]
enum Producer {
    Concat(Vec<Producer>),
    Literal(String),
    Id(Action),
    Cluster(Action),
    Locality { region: Option<Action>, zone: Option<Action>, sub_zone: Option<Action> },
    Metadata { path: Vec<String>, action: Action },
    ResourceName { index: usize, action: Action, xdstp_authority: bool },
}

#[derive(Debug)]
enum Action {
    Exact,
    Replace { regex: Regex, pattern: String, replace: String },
}

// === impl Keyer ===

impl Keyer {
    /// Validates the rules and compiles them, regexes included.
    ///
    /// # Errors
    ///
    /// The first validation problem, as a [`ConfigError`] with an empty `file`.
    pub fn new(rules: &KeyerConfiguration) -> Result<Keyer, ConfigError> {
        rules.validate()?;
        let mut fragments = Vec::with_capacity(rules.fragments.len());
        for (i, fragment) in rules.fragments.iter().enumerate() {
            let mut compiled = Vec::with_capacity(fragment.rules.len());
            for (j, rule) in fragment.rules.iter().enumerate() {
                let location = format!("fragments[{i}].rules[{j}]");
                compiled.push(CompiledRule {
                    matcher: compile_match(&rule.r#match, &format!("{location}.match"))?,
                    producer: compile_result(&rule.result, &format!("{location}.result"))?,
                    location,
                });
            }
            fragments.push(compiled);
        }
        Ok(Keyer { fragments: fragments.into() })
    }

    /// The aggregation key of a request.
    ///
    /// # Errors
    ///
    /// A [`KeyError`] when the request is malformed (empty type URL, EDS without names), when
    /// no rule matches, or when a matching rule cannot produce its piece.
    pub fn key(&self, request: &KeyRequest<'_>) -> Result<String, KeyError> {
        if request.type_url.is_empty() {
            return Err(KeyError::EmptyTypeUrl);
        }
        if (request.type_url == crate::xds::ENDPOINT || request.type_url == ENDPOINT_V2)
            && request.resource_names.is_empty()
        {
            return Err(KeyError::MissingResourceNames { type_url: request.type_url.to_string() });
        }
        let ctx = Ctx::new(request);
        let mut pieces = Vec::with_capacity(self.fragments.len());
        for fragment in self.fragments.iter() {
            for rule in fragment {
                if rule.matcher.eval(&ctx, rule)? {
                    match rule.producer.produce(&ctx, rule) {
                        // A rule reading an xdstp authority does not apply to other names.
                        Err(KeyError::NotXdstp) => continue,
                        piece => pieces.push(piece?),
                    }
                    break;
                }
            }
        }
        if pieces.is_empty() {
            return Err(KeyError::NoRuleMatched {
                type_url: request.type_url.to_string(),
                node_id: ctx.id.to_string(),
                cluster: ctx.cluster.to_string(),
            });
        }
        Ok(pieces.join("_"))
    }

    /// Whether some rule builds keys from resource names (`resource_names_fragment`): such a
    /// key depends on the names of the request that created it, not only on type and node.
    pub fn reads_resource_names(&self) -> bool {
        fn reads(producer: &Producer) -> bool {
            match producer {
                Producer::ResourceName { .. } => true,
                Producer::Concat(parts) => parts.iter().any(reads),
                _ => false,
            }
        }
        self.fragments.iter().flatten().any(|rule| reads(&rule.producer))
    }
}

// === compilation ===

fn regex(pattern: &str, field: String) -> Result<Regex, ConfigError> {
    compile_regex(pattern)
        .map_err(|e| ConfigError::new("", field, format!("invalid regex \"{pattern}\": {}", regex_error_reason(&e))))
}

fn compile_string(m: &StringMatch, path: &str) -> Result<StrMatcher, ConfigError> {
    Ok(match m {
        StringMatch::ExactMatch(s) if s.is_empty() => StrMatcher::Never,
        StringMatch::ExactMatch(s) => StrMatcher::Exact(s.clone()),
        StringMatch::RegexMatch(p) if p.is_empty() => StrMatcher::Never,
        StringMatch::RegexMatch(p) => StrMatcher::Regex(regex(p, format!("{path}.regex_match"))?),
    })
}

fn compile_optional_string(m: &Option<StringMatch>, path: String) -> Result<Option<StrMatcher>, ConfigError> {
    m.as_ref().map(|m| compile_string(m, &path)).transpose()
}

fn compile_match(m: &MatchPredicate, path: &str) -> Result<Matcher, ConfigError> {
    let set = |rules: &[MatchPredicate], path: String| -> Result<Vec<Matcher>, ConfigError> {
        rules.iter().enumerate().map(|(i, rule)| compile_match(rule, &format!("{path}.rules[{i}]"))).collect()
    };
    Ok(match m {
        MatchPredicate::AndMatch(s) => Matcher::All(set(&s.rules, format!("{path}.and_match"))?),
        MatchPredicate::OrMatch(s) => Matcher::Any(set(&s.rules, format!("{path}.or_match"))?),
        MatchPredicate::NotMatch(inner) => Matcher::Not(Box::new(compile_match(inner, &format!("{path}.not_match"))?)),
        MatchPredicate::AnyMatch(_) => Matcher::Always,
        MatchPredicate::RequestTypeMatch(t) => Matcher::TypeIn(t.types.clone()),
        MatchPredicate::RequestNodeMatch(n) => {
            let path = format!("{path}.request_node_match");
            match n {
                RequestNodeMatch::IdMatch(s) => Matcher::Id(compile_string(s, &format!("{path}.id_match"))?),
                RequestNodeMatch::ClusterMatch(s) => {
                    Matcher::Cluster(compile_string(s, &format!("{path}.cluster_match"))?)
                }
                RequestNodeMatch::LocalityMatch(l) => {
                    let path = format!("{path}.locality_match");
                    Matcher::Locality {
                        region: compile_optional_string(&l.region, format!("{path}.region"))?,
                        zone: compile_optional_string(&l.zone, format!("{path}.zone"))?,
                        sub_zone: compile_optional_string(&l.sub_zone, format!("{path}.sub_zone"))?,
                    }
                }
                RequestNodeMatch::NodeMetadataMatch(m) => Matcher::Metadata {
                    path: m.path.iter().map(|s| s.key.clone()).collect(),
                    value: match &m.r#match {
                        StructValueMatch::StringMatch(s) => ValueMatcher::Str(compile_string(
                            s,
                            &format!("{path}.node_metadata_match.match.string_match"),
                        )?),
                        StructValueMatch::BoolMatch(b) => ValueMatcher::Bool(b.value_match),
                    },
                },
            }
        }
    })
}

fn compile_action(a: &ResultAction, path: &str) -> Result<Action, ConfigError> {
    Ok(match a {
        ResultAction::Exact(_) => Action::Exact,
        ResultAction::RegexAction(r) => Action::Replace {
            regex: regex(&r.pattern, format!("{path}.regex_action.pattern"))?,
            pattern: r.pattern.clone(),
            replace: r.replace.clone(),
        },
    })
}

fn compile_optional_action(a: &Option<ResultAction>, path: String) -> Result<Option<Action>, ConfigError> {
    a.as_ref().map(|a| compile_action(a, &path)).transpose()
}

fn compile_result(r: &ResultPredicate, path: &str) -> Result<Producer, ConfigError> {
    Ok(match r {
        ResultPredicate::AndResult(and) => Producer::Concat(
            and.result_predicates
                .iter()
                .enumerate()
                .map(|(i, r)| compile_result(r, &format!("{path}.and_result.result_predicates[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        ResultPredicate::StringFragment(s) => Producer::Literal(s.clone()),
        ResultPredicate::ResourceNamesFragment(f) => Producer::ResourceName {
            // Validation guarantees element >= 0.
            index: usize::try_from(f.element).unwrap_or(usize::MAX),
            action: compile_action(&f.action, &format!("{path}.resource_names_fragment.action"))?,
            xdstp_authority: f.xdstp_authority,
        },
        ResultPredicate::RequestNodeFragment(f) => {
            let path = format!("{path}.request_node_fragment");
            match f {
                RequestNodeFragment::IdAction(a) => Producer::Id(compile_action(a, &format!("{path}.id_action"))?),
                RequestNodeFragment::ClusterAction(a) => {
                    Producer::Cluster(compile_action(a, &format!("{path}.cluster_action"))?)
                }
                RequestNodeFragment::LocalityAction(l) => {
                    let path = format!("{path}.locality_action");
                    Producer::Locality {
                        region: compile_optional_action(&l.region_action, format!("{path}.region_action"))?,
                        zone: compile_optional_action(&l.zone_action, format!("{path}.zone_action"))?,
                        sub_zone: compile_optional_action(&l.subzone_action, format!("{path}.subzone_action"))?,
                    }
                }
                RequestNodeFragment::NodeMetadataAction(m) => Producer::Metadata {
                    path: m.path.iter().map(|s| s.key.clone()).collect(),
                    action: compile_action(&m.action, &format!("{path}.node_metadata_action.action"))?,
                },
            }
        }
    })
}

// === evaluation ===

/// The request with the node's fields flattened; a missing node reads as empty fields.
struct Ctx<'a> {
    type_url: &'a str,
    resource_names: &'a [String],
    id: &'a str,
    cluster: &'a str,
    locality: Option<&'a Locality>,
    metadata: Option<&'a Struct>,
}

impl<'a> Ctx<'a> {
    fn new(request: &KeyRequest<'a>) -> Self {
        let node = request.node;
        Ctx {
            type_url: request.type_url,
            resource_names: request.resource_names,
            id: node.map_or("", |n| n.id.as_str()),
            cluster: node.map_or("", |n| n.cluster.as_str()),
            locality: node.and_then(|n| n.locality.as_ref()),
            metadata: node.and_then(|n| n.metadata.as_ref()),
        }
    }

    fn region(&self) -> &'a str {
        self.locality.map_or("", |l| l.region.as_str())
    }
    fn zone(&self) -> &'a str {
        self.locality.map_or("", |l| l.zone.as_str())
    }
    fn sub_zone(&self) -> &'a str {
        self.locality.map_or("", |l| l.sub_zone.as_str())
    }

    fn metadata(&self, rule: &CompiledRule) -> Result<&'a Struct, KeyError> {
        self.metadata
            .ok_or_else(|| KeyError::NoNodeMetadata { rule: rule.location.clone(), node_id: self.id.to_string() })
    }
}

/// The value at `path` through nested structs; `None` if a key is missing or an
/// intermediate value is not a struct.
fn lookup<'a>(metadata: &'a Struct, path: &[String]) -> Option<&'a Value> {
    let (last, init) = path.split_last()?;
    let mut fields = &metadata.fields;
    for key in init {
        match &fields.get(key)?.kind {
            Some(Kind::StructValue(inner)) => fields = &inner.fields,
            _ => return None,
        }
    }
    fields.get(last)
}

impl StrMatcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            StrMatcher::Exact(s) => s == value,
            StrMatcher::Regex(r) => r.is_match(value),
            StrMatcher::Never => false,
        }
    }
}

fn optional_matches(m: &Option<StrMatcher>, value: &str) -> bool {
    m.as_ref().is_none_or(|m| m.matches(value))
}

impl Matcher {
    fn eval(&self, ctx: &Ctx<'_>, rule: &CompiledRule) -> Result<bool, KeyError> {
        Ok(match self {
            Matcher::All(ms) => {
                for m in ms {
                    if !m.eval(ctx, rule)? {
                        return Ok(false);
                    }
                }
                true
            }
            Matcher::Any(ms) => {
                for m in ms {
                    if m.eval(ctx, rule)? {
                        return Ok(true);
                    }
                }
                false
            }
            Matcher::Not(m) => !m.eval(ctx, rule)?,
            Matcher::Always => true,
            Matcher::TypeIn(types) => types.iter().any(|t| t == ctx.type_url),
            Matcher::Id(m) => m.matches(ctx.id),
            Matcher::Cluster(m) => m.matches(ctx.cluster),
            Matcher::Locality { region, zone, sub_zone } => {
                optional_matches(region, ctx.region())
                    && optional_matches(zone, ctx.zone())
                    && optional_matches(sub_zone, ctx.sub_zone())
            }
            Matcher::Metadata { path, value } => {
                // Like Go: a node without metadata is an error, a missing key is no match.
                // Unlike Go, a value of the wrong kind is no match (Go compared its zero value).
                let found = lookup(ctx.metadata(rule)?, path).and_then(|v| v.kind.as_ref());
                match (value, found) {
                    (ValueMatcher::Str(m), Some(Kind::StringValue(s))) => m.matches(s),
                    (ValueMatcher::Bool(want), Some(Kind::BoolValue(b))) => want == b,
                    _ => false,
                }
            }
        })
    }
}

impl Producer {
    fn produce(&self, ctx: &Ctx<'_>, rule: &CompiledRule) -> Result<String, KeyError> {
        match self {
            Producer::Concat(parts) => {
                let mut out = String::new();
                for part in parts {
                    out.push_str(&part.produce(ctx, rule)?);
                }
                Ok(out)
            }
            Producer::Literal(s) => Ok(s.clone()),
            Producer::Id(action) => action.apply(ctx.id, "the node id", ctx, rule),
            Producer::Cluster(action) => action.apply(ctx.cluster, "the node cluster", ctx, rule),
            Producer::Locality { region, zone, sub_zone } => {
                let members = [
                    (region, ctx.region(), "the node locality region"),
                    (zone, ctx.zone(), "the node locality zone"),
                    (sub_zone, ctx.sub_zone(), "the node locality sub_zone"),
                ];
                let mut pieces = Vec::with_capacity(3);
                for (action, value, what) in members {
                    if let Some(action) = action {
                        pieces.push(action.apply(value, what, ctx, rule)?);
                    }
                }
                if pieces.is_empty() {
                    return Err(KeyError::NoLocalityAction { rule: rule.location.clone() });
                }
                Ok(pieces.join("|"))
            }
            Producer::Metadata { path, action } => {
                let joined = path.join(".");
                let value = lookup(ctx.metadata(rule)?, path).ok_or_else(|| KeyError::MetadataPathMissing {
                    rule: rule.location.clone(),
                    path: joined.clone(),
                    node_id: ctx.id.to_string(),
                })?;
                // Like Go's GetStringValue: a value that is not a string reads as "".
                let (text, what) = match &value.kind {
                    Some(Kind::StringValue(s)) => (s.as_str(), format!("node metadata {joined}")),
                    _ => ("", format!("node metadata {joined} (not a string)")),
                };
                action.apply(text, &what, ctx, rule)
            }
            Producer::ResourceName { index, action, xdstp_authority } => {
                let name = ctx.resource_names.get(*index).ok_or_else(|| KeyError::ResourceIndexOutOfRange {
                    rule: rule.location.clone(),
                    index: *index,
                    len: ctx.resource_names.len(),
                    type_url: ctx.type_url.to_string(),
                })?;
                if *xdstp_authority {
                    let authority = crate::xdstp::authority(name).ok_or(KeyError::NotXdstp)?;
                    return action.apply(
                        authority,
                        &format!("the xdstp authority of resource_names[{index}]"),
                        ctx,
                        rule,
                    );
                }
                action.apply(name, &format!("resource_names[{index}]"), ctx, rule)
            }
        }
    }
}

impl Action {
    fn apply(&self, value: &str, what: &str, ctx: &Ctx<'_>, rule: &CompiledRule) -> Result<String, KeyError> {
        match self {
            Action::Exact if value.is_empty() => Err(KeyError::EmptyValue {
                rule: rule.location.clone(),
                what: what.to_string(),
                node_id: ctx.id.to_string(),
            }),
            Action::Exact => Ok(value.to_string()),
            Action::Replace { regex, pattern, replace } => {
                // Go's ReplaceAllString: every non-overlapping match, `$1`/`${name}` expansion;
                // no match returns the value unchanged.
                let out = regex.replace_all(value, replace.as_str());
                if out.is_empty() {
                    return Err(KeyError::EmptyRegexResult {
                        rule: rule.location.clone(),
                        what: what.to_string(),
                        value: value.to_string(),
                        pattern: pattern.clone(),
                        replace: replace.clone(),
                    });
                }
                Ok(out.into_owned())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::parse_rules;
    use crate::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

    fn keyer(yaml: &str) -> Keyer {
        let rules = parse_rules(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        Keyer::new(&rules).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A keyer with one fragment: `match: <m>` producing "hit".
    fn matcher(m: &str) -> Keyer {
        keyer(&format!("fragments: [{{rules: [{{match: {m}, result: {{string_fragment: hit}}}}]}}]"))
    }

    /// A keyer with one fragment: match anything, `result: <r>`.
    fn producer(r: &str) -> Keyer {
        keyer(&format!("fragments: [{{rules: [{{match: {{any_match: true}}, result: {r}}}]}}]"))
    }

    fn s(v: &str) -> Value {
        Value { kind: Some(Kind::StringValue(v.into())) }
    }
    fn b(v: bool) -> Value {
        Value { kind: Some(Kind::BoolValue(v)) }
    }
    fn st(fields: &[(&str, Value)]) -> Struct {
        Struct { fields: fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<HashMap<_, _>>() }
    }

    /// The node most tests use.
    fn node() -> Node {
        Node {
            id: "envoy-client-1".into(),
            cluster: "staging-east".into(),
            locality: Some(Locality { region: "us".into(), zone: "us-1a".into(), sub_zone: "rack-7".into() }),
            metadata: Some(st(&[
                ("team", s("payments")),
                ("canary", b(true)),
                ("count", Value { kind: Some(Kind::NumberValue(3.0)) }),
                ("nested", Value { kind: Some(Kind::StructValue(st(&[("shard", s("s-12")), ("on", b(false))]))) }),
            ])),
            ..Node::default()
        }
    }

    fn key_of(k: &Keyer, type_url: &str, node: Option<&Node>, names: &[&str]) -> Result<String, KeyError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        k.key(&KeyRequest { type_url, node, resource_names: &names })
    }

    fn hits(m: &str, n: Option<&Node>) -> bool {
        match key_of(&matcher(m), CLUSTER, n, &[]) {
            Ok(key) => key == "hit",
            Err(KeyError::NoRuleMatched { .. }) => false,
            Err(e) => panic!("{m}: {e}"),
        }
    }

    #[test]
    fn every_match_predicate_true_and_false() {
        let n = node();
        let no_locality = Node { locality: None, ..node() };
        let cases: &[(&str, bool)] = &[
            ("{any_match: true}", true),
            ("{request_type_match: {types: [a, 'type.googleapis.com/envoy.config.cluster.v3.Cluster']}}", true),
            ("{request_type_match: {types: ['type.googleapis.com/envoy.config.listener.v3.Listener']}}", false),
            (
                "{and_match: {rules: [{any_match: true}, {request_node_match: {id_match: {exact_match: envoy-client-1}}}]}}",
                true,
            ),
            (
                "{and_match: {rules: [{any_match: true}, {request_node_match: {id_match: {exact_match: other}}}]}}",
                false,
            ),
            (
                "{or_match: {rules: [{not_match: {any_match: true}}, {request_node_match: {cluster_match: {exact_match: staging-east}}}]}}",
                true,
            ),
            (
                "{or_match: {rules: [{not_match: {any_match: true}}, {request_node_match: {cluster_match: {exact_match: prod}}}]}}",
                false,
            ),
            ("{not_match: {any_match: true}}", false),
            ("{not_match: {request_node_match: {id_match: {exact_match: x}}}}", true),
            ("{request_node_match: {id_match: {exact_match: envoy-client-1}}}", true),
            ("{request_node_match: {id_match: {exact_match: envoy-client}}}", false),
            ("{request_node_match: {id_match: {regex_match: 'client'}}}", true), // unanchored
            ("{request_node_match: {id_match: {regex_match: '^client'}}}", false),
            ("{request_node_match: {id_match: {exact_match: ''}}}", false), // empty never matches (Go)
            ("{request_node_match: {id_match: {regex_match: ''}}}", false),
            ("{request_node_match: {cluster_match: {regex_match: '^staging-'}}}", true),
            ("{request_node_match: {cluster_match: {regex_match: '^prod'}}}", false),
            (
                "{request_node_match: {locality_match: {region: {exact_match: us}, zone: {regex_match: '-1a$'}, sub_zone: {exact_match: rack-7}}}}",
                true,
            ),
            ("{request_node_match: {locality_match: {region: {exact_match: us}, zone: {exact_match: us-1b}}}}", false),
            ("{request_node_match: {locality_match: {sub_zone: {regex_match: rack}}}}", true),
            ("{request_node_match: {locality_match: {}}}", true),
            (
                "{request_node_match: {node_metadata_match: {path: [{key: team}], match: {string_match: {exact_match: payments}}}}}",
                true,
            ),
            (
                "{request_node_match: {node_metadata_match: {path: [{key: team}], match: {string_match: {regex_match: '^pay'}}}}}",
                true,
            ),
            (
                "{request_node_match: {node_metadata_match: {path: [{key: team}], match: {string_match: {exact_match: search}}}}}",
                false,
            ),
            (
                "{request_node_match: {node_metadata_match: {path: [{key: nested}, {key: shard}], match: {string_match: {exact_match: s-12}}}}}",
                true,
            ),
            (
                "{request_node_match: {node_metadata_match: {path: [{key: canary}], match: {bool_match: {value_match: true}}}}}",
                true,
            ),
            (
                "{request_node_match: {node_metadata_match: {path: [{key: canary}], match: {bool_match: {value_match: false}}}}}",
                false,
            ),
            (
                "{request_node_match: {node_metadata_match: {path: [{key: nested}, {key: on}], match: {bool_match: {value_match: false}}}}}",
                true,
            ),
            (
                "{request_node_match: {node_metadata_match: {path: [{key: missing}], match: {bool_match: {value_match: false}}}}}",
                false,
            ),
            (
                "{request_node_match: {node_metadata_match: {path: [{key: team}, {key: x}], match: {string_match: {exact_match: payments}}}}}",
                false,
            ), // non-struct intermediate
            (
                "{request_node_match: {node_metadata_match: {path: [{key: count}], match: {string_match: {regex_match: '.*'}}}}}",
                false,
            ), // not a string
            (
                "{request_node_match: {node_metadata_match: {path: [{key: team}], match: {bool_match: {value_match: false}}}}}",
                false,
            ), // not a bool
        ];
        for (m, want) in cases {
            assert_eq!(hits(m, Some(&n)), *want, "{m}");
        }
        // A node without locality compares as empty strings.
        assert!(hits("{request_node_match: {locality_match: {region: {regex_match: '^$'}}}}", Some(&no_locality)));
        assert!(!hits("{request_node_match: {locality_match: {region: {exact_match: us}}}}", Some(&no_locality)));
        // A missing node has empty fields.
        assert!(!hits("{request_node_match: {id_match: {exact_match: envoy-client-1}}}", None));
        assert!(hits("{request_node_match: {cluster_match: {regex_match: '^$'}}}", None));
    }

    #[test]
    fn every_result_predicate_and_action() {
        let n = node();
        let cases: &[(&str, &[&str], &str)] = &[
            ("{string_fragment: lds}", &[], "lds"),
            ("{request_node_fragment: {id_action: {exact: true}}}", &[], "envoy-client-1"),
            ("{request_node_fragment: {cluster_action: {exact: true}}}", &[], "staging-east"),
            (
                "{request_node_fragment: {cluster_action: {regex_action: {pattern: '^(.*)-.*$', replace: '$1'}}}}",
                &[],
                "staging",
            ),
            (
                "{request_node_fragment: {cluster_action: {regex_action: {pattern: '^prod-(.*)$', replace: '$1'}}}}",
                &[],
                "staging-east",
            ), // no match: unchanged
            (
                "{request_node_fragment: {id_action: {regex_action: {pattern: '-', replace: '.'}}}}",
                &[],
                "envoy.client.1",
            ), // all matches
            (
                "{request_node_fragment: {id_action: {regex_action: {pattern: '^(?P<app>[a-z]+)-.*$', replace: 'app=${app}'}}}}",
                &[],
                "app=envoy",
            ),
            (
                "{request_node_fragment: {id_action: {regex_action: {pattern: '^*-(.*)-*$', replace: '$1'}}}}",
                &[],
                "envoyclient-1",
            ),
            ("{request_node_fragment: {locality_action: {region_action: {exact: true}}}}", &[], "us"),
            (
                "{request_node_fragment: {locality_action: {region_action: {exact: true}, zone_action: {exact: true}, subzone_action: {regex_action: {pattern: 'rack-', replace: ''}}}}}",
                &[],
                "us|us-1a|7",
            ),
            (
                "{request_node_fragment: {locality_action: {zone_action: {exact: true}, subzone_action: {exact: true}}}}",
                &[],
                "us-1a|rack-7",
            ),
            (
                "{request_node_fragment: {node_metadata_action: {path: [{key: team}], action: {exact: true}}}}",
                &[],
                "payments",
            ),
            (
                "{request_node_fragment: {node_metadata_action: {path: [{key: nested}, {key: shard}], action: {regex_action: {pattern: '^s-', replace: 'shard'}}}}}",
                &[],
                "shard12",
            ),
            (
                "{request_node_fragment: {node_metadata_action: {path: [{key: count}], action: {regex_action: {pattern: '^$', replace: 'none'}}}}}",
                &[],
                "none",
            ), // non-string reads as ""
            ("{resource_names_fragment: {element: 0, action: {exact: true}}}", &["route-a", "route-b"], "route-a"),
            (
                "{resource_names_fragment: {element: 1, action: {regex_action: {pattern: 'route-', replace: ''}}}}",
                &["route-a", "route-b"],
                "b",
            ),
            (
                "{and_result: {result_predicates: [{string_fragment: a}, {request_node_fragment: {id_action: {exact: true}}}]}}",
                &[],
                "aenvoy-client-1",
            ),
            (
                "{and_result: {result_predicates: [{string_fragment: '<'}, {and_result: {result_predicates: [{resource_names_fragment: {action: {exact: true}}}, {string_fragment: '>'}]}}]}}",
                &["r"],
                "<r>",
            ),
        ];
        for (r, names, want) in cases {
            assert_eq!(key_of(&producer(r), ROUTE, Some(&n), names).as_deref(), Ok(*want), "{r}");
        }
    }

    #[test]
    fn fragments_join_with_underscore_and_first_match_wins() {
        let k = keyer(
            "
fragments:
  - rules:
      - {match: {request_node_match: {id_match: {exact_match: nobody}}}, result: {string_fragment: never}}
  - rules:
      - {match: {request_type_match: {types: ['type.googleapis.com/envoy.config.listener.v3.Listener']}}, result: {string_fragment: lds}}
      - {match: {any_match: true}, result: {string_fragment: first}}
      - {match: {any_match: true}, result: {string_fragment: second}}
      - {match: {any_match: true}, result: {request_node_fragment: {node_metadata_action: {path: [{key: x}], action: {exact: true}}}}}
  - rules:
      - {match: {any_match: true}, result: {request_node_fragment: {cluster_action: {exact: true}}}}
",
        );
        let n = node();
        assert_eq!(key_of(&k, LISTENER, Some(&n), &[]).as_deref(), Ok("lds_staging-east"));
        // Only the first matching rule counts: later rules (even failing ones) are not evaluated.
        assert_eq!(key_of(&k, CLUSTER, Some(&n), &[]).as_deref(), Ok("first_staging-east"));
    }

    #[test]
    fn every_key_error() {
        let n = node();
        let no_metadata = Node { metadata: None, ..node() };
        let empty_cluster = Node { cluster: String::new(), ..node() };
        let any = producer("{string_fragment: x}");

        assert_eq!(key_of(&any, "", Some(&n), &[]), Err(KeyError::EmptyTypeUrl));
        for eds in [ENDPOINT, ENDPOINT_V2] {
            assert_eq!(key_of(&any, eds, Some(&n), &[]), Err(KeyError::MissingResourceNames { type_url: eds.into() }));
            assert_eq!(key_of(&any, eds, Some(&n), &["c"]).as_deref(), Ok("x"));
        }

        let err = key_of(&matcher("{request_type_match: {types: [other]}}"), CLUSTER, Some(&n), &[]).unwrap_err();
        assert_eq!(
            err,
            KeyError::NoRuleMatched {
                type_url: CLUSTER.into(),
                node_id: "envoy-client-1".into(),
                cluster: "staging-east".into()
            }
        );
        assert!(err.to_string().starts_with(&format!(
            "no aggregation rule matched the request (type {CLUSTER}, node id \"envoy-client-1\", cluster \"staging-east\")"
        )));

        let meta_match =
            matcher("{request_node_match: {node_metadata_match: {path: [{key: team}], match: {bool_match: {}}}}}");
        let meta_action =
            producer("{request_node_fragment: {node_metadata_action: {path: [{key: team}], action: {exact: true}}}}");
        for k in [&meta_match, &meta_action] {
            assert_eq!(
                key_of(k, CLUSTER, Some(&no_metadata), &[]),
                Err(KeyError::NoNodeMetadata {
                    rule: "fragments[0].rules[0]".into(),
                    node_id: "envoy-client-1".into()
                })
            );
            assert!(matches!(key_of(k, CLUSTER, None, &[]), Err(KeyError::NoNodeMetadata { .. })));
        }
        // An error inside or_match fails the whole key, as in Go.
        let or = matcher(
            "{or_match: {rules: [{any_match: true}, {request_node_match: {node_metadata_match: {path: [{key: a}], match: {bool_match: {}}}}}]}}",
        );
        assert_eq!(key_of(&or, CLUSTER, Some(&no_metadata), &[]).as_deref(), Ok("hit")); // short-circuit
        let or = matcher(
            "{or_match: {rules: [{request_node_match: {node_metadata_match: {path: [{key: a}], match: {bool_match: {}}}}}, {any_match: true}]}}",
        );
        assert!(matches!(key_of(&or, CLUSTER, Some(&no_metadata), &[]), Err(KeyError::NoNodeMetadata { .. })));

        let missing = producer(
            "{request_node_fragment: {node_metadata_action: {path: [{key: nested}, {key: nope}], action: {exact: true}}}}",
        );
        assert_eq!(
            key_of(&missing, CLUSTER, Some(&n), &[]),
            Err(KeyError::MetadataPathMissing {
                rule: "fragments[0].rules[0]".into(),
                path: "nested.nope".into(),
                node_id: "envoy-client-1".into()
            })
        );
        let through_string = producer(
            "{request_node_fragment: {node_metadata_action: {path: [{key: team}, {key: x}], action: {exact: true}}}}",
        );
        assert!(matches!(key_of(&through_string, CLUSTER, Some(&n), &[]), Err(KeyError::MetadataPathMissing { .. })));

        let second = producer("{resource_names_fragment: {element: 1, action: {exact: true}}}");
        assert_eq!(
            key_of(&second, ROUTE, Some(&n), &["only"]),
            Err(KeyError::ResourceIndexOutOfRange {
                rule: "fragments[0].rules[0]".into(),
                index: 1,
                len: 1,
                type_url: ROUTE.into()
            })
        );

        let cluster = producer("{request_node_fragment: {cluster_action: {exact: true}}}");
        assert_eq!(
            key_of(&cluster, CLUSTER, Some(&empty_cluster), &[]),
            Err(KeyError::EmptyValue {
                rule: "fragments[0].rules[0]".into(),
                what: "the node cluster".into(),
                node_id: "envoy-client-1".into()
            })
        );
        assert!(matches!(key_of(&cluster, CLUSTER, None, &[]), Err(KeyError::EmptyValue { .. })));
        let non_string =
            producer("{request_node_fragment: {node_metadata_action: {path: [{key: canary}], action: {exact: true}}}}");
        let err = key_of(&non_string, CLUSTER, Some(&n), &[]).unwrap_err();
        assert!(err.to_string().contains("node metadata canary (not a string)"), "{err}");
        let empty_name = producer("{resource_names_fragment: {action: {exact: true}}}");
        assert!(matches!(key_of(&empty_name, ROUTE, Some(&n), &[""]), Err(KeyError::EmptyValue { .. })));
        let no_locality = Node { locality: None, ..node() };
        let zone = producer("{request_node_fragment: {locality_action: {zone_action: {exact: true}}}}");
        assert!(matches!(key_of(&zone, CLUSTER, Some(&no_locality), &[]), Err(KeyError::EmptyValue { .. })));

        let erase = producer("{request_node_fragment: {cluster_action: {regex_action: {pattern: '.*', replace: ''}}}}");
        assert_eq!(
            key_of(&erase, CLUSTER, Some(&n), &[]),
            Err(KeyError::EmptyRegexResult {
                rule: "fragments[0].rules[0]".into(),
                what: "the node cluster".into(),
                value: "staging-east".into(),
                pattern: ".*".into(),
                replace: String::new(),
            })
        );
        // The regex of the shared example on an empty cluster: unchanged "" is empty too.
        let example = producer(
            "{request_node_fragment: {cluster_action: {regex_action: {pattern: '^(.*)-.*$', replace: '$1'}}}}",
        );
        assert!(matches!(key_of(&example, CLUSTER, Some(&empty_cluster), &[]), Err(KeyError::EmptyRegexResult { .. })));

        // Only reachable with a producer that skipped validation.
        let ctx = Ctx::new(&KeyRequest { type_url: CLUSTER, node: Some(&n), resource_names: &[] });
        let rule = CompiledRule {
            location: "fragments[0].rules[0]".into(),
            matcher: Matcher::Always,
            producer: Producer::Locality { region: None, zone: None, sub_zone: None },
        };
        assert_eq!(
            rule.producer.produce(&ctx, &rule),
            Err(KeyError::NoLocalityAction { rule: "fragments[0].rules[0]".into() })
        );

        for err in [
            KeyError::EmptyTypeUrl,
            KeyError::NoLocalityAction { rule: "r".into() },
            KeyError::MissingResourceNames { type_url: ENDPOINT.into() },
        ] {
            let text = err.to_string();
            assert!(!text.ends_with('.') && text.chars().next().is_some_and(|c| !c.is_uppercase()), "{text}");
        }
    }

    #[test]
    fn new_rejects_invalid_rules_built_in_code() {
        let rules = KeyerConfiguration {
            fragments: vec![crate::config::Fragment {
                rules: vec![crate::config::Rule {
                    r#match: MatchPredicate::RequestNodeMatch(RequestNodeMatch::IdMatch(StringMatch::RegexMatch(
                        "(".into(),
                    ))),
                    result: ResultPredicate::StringFragment("x".into()),
                }],
            }],
        };
        let err = Keyer::new(&rules).unwrap_err();
        assert_eq!(err.file, "");
        assert_eq!(err.field, "fragments[0].rules[0].match.request_node_match.id_match.regex_match");
        assert!(err.message.contains("invalid regex \"(\""), "{err}");
        assert!(Keyer::new(&KeyerConfiguration { fragments: vec![] }).is_err());
    }

    #[test]
    fn example_rules_give_the_documented_keys() {
        let k = keyer(crate::config::DEFAULT_RULES);
        let staging = Node { id: "envoy-client-1".into(), cluster: "staging".into(), ..Node::default() };
        let key = |t: &str, names: &[&str]| key_of(&k, t, Some(&staging), names);
        assert_eq!(key(CLUSTER, &[]).as_deref(), Ok("staging_cds"));
        assert_eq!(key(LISTENER, &[]).as_deref(), Ok("staging_lds"));
        assert_eq!(key(ENDPOINT, &["backend"]).as_deref(), Ok("staging_eds"));
        assert_eq!(key(ROUTE, &["local_route"]).as_deref(), Ok("staging_rds_local_route"));
        let east = Node { cluster: "staging-east".into(), ..staging.clone() };
        assert_eq!(key_of(&k, CLUSTER, Some(&east), &[]).as_deref(), Ok("staging_cds"));
        assert!(matches!(key(crate::xds::SECRET, &["s"]), Err(KeyError::NoRuleMatched { .. })));
    }

    #[test]
    fn knows_whether_keys_read_resource_names() {
        assert!(!producer("{string_fragment: x}").reads_resource_names());
        assert!(!matcher("{any_match: true}").reads_resource_names());
        assert!(producer("{resource_names_fragment: {element: 0, action: {exact: true}}}").reads_resource_names());
        assert!(
            producer("{and_result: {result_predicates: [{string_fragment: '<'}, {resource_names_fragment: {action: {exact: true}}}]}}")
                .reads_resource_names()
        );
    }

    /// xDS-TP1 federation: `xdstp_authority` keys by the authority of an `xdstp://` name;
    /// other names fall through to the fragment's next rule.
    #[test]
    fn xdstp_authority_is_a_key_piece() {
        let k = keyer(
            "fragments:
  - rules:
      - {match: {any_match: true}, result: {string_fragment: cds}}
  - rules:
      - match: {any_match: true}
        result: {and_result: {result_predicates: [{string_fragment: 'auth='}, {resource_names_fragment: {element: 0, xdstp_authority: true, action: {exact: true}}}]}}
      - {match: {any_match: true}, result: {string_fragment: legacy}}",
        );
        let n = node();
        let key = |names: &[&str]| key_of(&k, CLUSTER, Some(&n), names);
        assert_eq!(
            key(&["xdstp://a.example/envoy.config.cluster.v3.Cluster/fleet/*"]).as_deref(),
            Ok("cds_auth=a.example")
        );
        assert_eq!(key(&["xdstp://b/envoy.config.cluster.v3.Cluster/x?p=1"]).as_deref(), Ok("cds_auth=b"));
        assert_eq!(key(&["cluster_1"]).as_deref(), Ok("cds_legacy"), "not an xdstp name: the next rule");
        assert_eq!(
            key(&["xdstp:///T/x"]),
            Err(KeyError::EmptyValue {
                rule: "fragments[1].rules[0]".into(),
                what: "the xdstp authority of resource_names[0]".into(),
                node_id: n.id.clone(),
            })
        );
        let only = producer(
            "{resource_names_fragment: {xdstpAuthority: true, action: {regex_action: {pattern: '\\.example$', replace: ''}}}}",
        );
        assert_eq!(key_of(&only, CLUSTER, Some(&n), &["xdstp://a.example/T/x"]).as_deref(), Ok("a"));
        assert!(matches!(key_of(&only, CLUSTER, Some(&n), &["x"]), Err(KeyError::NoRuleMatched { .. })));
    }

    #[test]
    fn keyer_is_shareable() {
        fn assert_send_sync_clone<T: Send + Sync + Clone + std::fmt::Debug>() {}
        assert_send_sync_clone::<Keyer>();
    }
}
