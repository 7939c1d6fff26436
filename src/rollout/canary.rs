//! Who receives a new version first: the canary choice among a key's clients, a pure
//! function of the policy and the clients present when the rollout starts.
//!
//! - `fraction`: the `ceil(fraction × n)` clients (at least one) whose node id hashes lowest
//!   with a fixed seed, so the same nodes are canaries version after version and on every
//!   relay built from the same source;
//! - `node_match`: every client whose node matches the predicate.
//!
//! Relay nodes following the key through this one are never canaries.

use std::hash::BuildHasher as _;

use envoy_types::pb::envoy::config::core::v3::Node;

use super::config::CanarySelection;
use crate::config::{ConfigError, Fragment, KeyerConfiguration, MatchPredicate, ResultPredicate, Rule};
use crate::keyer::{KeyRequest, Keyer};

/// A node predicate in the syntax of the aggregation rules.
///
/// It is evaluated by the keyer itself, compiled from a one-rule configuration whose result is
/// a literal: a node matches when that rule yields a key. This reuses the rules' matcher and
/// its validation as they are, with no second implementation to drift from them.
#[derive(Debug, Clone)]
pub struct NodeMatch {
    keyer: Keyer,
}

/// The literal the one-rule keyer of a [`NodeMatch`] yields.
const MATCHED: &str = "canary";
/// Where the keyer reports the predicate's problems, replaced by the policy's field.
const RULE_PATH: &str = "fragments[0].rules[0].match";

impl NodeMatch {
    /// Compiles `predicate`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field under `path` when the predicate is invalid.
    pub fn new(predicate: &MatchPredicate, path: &str) -> Result<Self, ConfigError> {
        let rules = KeyerConfiguration {
            fragments: vec![Fragment {
                rules: vec![Rule {
                    r#match: predicate.clone(),
                    result: ResultPredicate::StringFragment(MATCHED.to_owned()),
                }],
            }],
        };
        let keyer = Keyer::new(&rules).map_err(|mut e| {
            e.field = e.field.replacen(RULE_PATH, path, 1);
            e
        })?;
        Ok(Self { keyer })
    }

    /// Whether `node`, watching a key of `type_url`, matches (a node lacking the metadata the
    /// predicate reads does not).
    pub fn matches(&self, type_url: &str, node: &Node) -> bool {
        // EDS requests need a name to be keyed at all; the predicate never reads it.
        let names = [String::from(MATCHED)];
        let request = KeyRequest { type_url, node: Some(node), resource_names: &names };
        self.keyer.key(&request).is_ok()
    }
}

/// A compiled [`CanarySelection`].
#[derive(Debug, Clone)]
pub enum Canaries {
    /// A share of the clients, rounded up, at least one.
    Fraction(f64),
    /// The clients whose node matches.
    Matching(NodeMatch),
}

impl Canaries {
    /// Compiles a validated selection.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field under `path` when the selection is invalid.
    pub fn new(selection: &CanarySelection, path: &str) -> Result<Self, ConfigError> {
        match (&selection.fraction, &selection.node_match) {
            (Some(fraction), None) => Ok(Self::Fraction(*fraction)),
            (None, Some(predicate)) => Ok(Self::Matching(NodeMatch::new(predicate, &format!("{path}.node_match"))?)),
            _ => Err(ConfigError::new("", path, "set exactly one of fraction and node_match")),
        }
    }
}

/// One client that may become a canary.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// The watcher's id in its entry.
    pub id: u64,
    /// Its node.
    pub node: &'a Node,
}

/// The stable rank of a node id among canary candidates (lowest first).
pub fn rank(node_id: &str) -> u64 {
    foldhash::fast::FixedState::with_seed(0x005e_ed0f_ca4a).hash_one(node_id)
}

/// The canaries among `clients` (relay nodes already left out) of a key of `type_url`, as
/// sorted watcher ids. Empty only when `clients` is, or when no node matches `node_match`.
pub fn choose(canaries: &Canaries, type_url: &str, clients: &[Candidate<'_>]) -> Vec<u64> {
    let mut chosen: Vec<u64> = match canaries {
        Canaries::Matching(predicate) => {
            clients.iter().filter(|c| predicate.matches(type_url, c.node)).map(|c| c.id).collect()
        }
        Canaries::Fraction(fraction) => {
            if clients.is_empty() {
                return Vec::new();
            }
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
            let wanted = ((clients.len() as f64 * fraction).ceil() as usize).clamp(1, clients.len());
            let mut ranked: Vec<(u64, &str, u64)> =
                clients.iter().map(|c| (rank(&c.node.id), c.node.id.as_str(), c.id)).collect();
            ranked.sort_unstable();
            ranked.into_iter().take(wanted).map(|(_, _, id)| id).collect()
        }
    };
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, cluster: &str) -> Node {
        Node { id: id.to_owned(), cluster: cluster.to_owned(), ..Node::default() }
    }

    #[test]
    fn a_fraction_takes_at_least_one_and_the_same_nodes_every_time() {
        let nodes: Vec<Node> = (0..10).map(|i| node(&format!("n{i}"), "c")).collect();
        let clients: Vec<Candidate<'_>> =
            nodes.iter().enumerate().map(|(i, node)| Candidate { id: i as u64 + 100, node }).collect();
        let tiny = choose(&Canaries::Fraction(0.01), crate::xds::CLUSTER, &clients);
        assert_eq!(tiny.len(), 1, "at least one canary");
        let quarter = choose(&Canaries::Fraction(0.25), crate::xds::CLUSTER, &clients);
        assert_eq!(quarter.len(), 3, "ceil(2.5)");
        assert!(quarter.contains(&tiny[0]), "the lowest rank is in every larger choice");
        // The same nodes under other watcher ids (a later version, clients reconnected).
        let again: Vec<Candidate<'_>> =
            nodes.iter().enumerate().rev().map(|(i, node)| Candidate { id: i as u64 + 200, node }).collect();
        let mut quarter_again: Vec<u64> =
            choose(&Canaries::Fraction(0.25), crate::xds::CLUSTER, &again).into_iter().map(|id| id - 100).collect();
        quarter_again.sort_unstable();
        assert_eq!(quarter_again, quarter, "the choice follows node ids, not watcher ids or order");
        assert!(choose(&Canaries::Fraction(1.0), crate::xds::CLUSTER, &[]).is_empty());
        assert_eq!(choose(&Canaries::Fraction(1.0), crate::xds::CLUSTER, &clients).len(), 10);
    }

    #[test]
    fn node_match_takes_the_matching_nodes_with_the_rules_syntax() {
        let predicate: MatchPredicate =
            serde_yaml_ng::from_str("request_node_match: { cluster_match: { exact_match: canary } }").unwrap();
        let canaries = Canaries::Matching(NodeMatch::new(&predicate, "rollout.policies[0].canary.node_match").unwrap());
        let nodes = [node("a", "prod"), node("b", "canary"), node("c", "canary")];
        let clients: Vec<Candidate<'_>> =
            nodes.iter().enumerate().map(|(i, node)| Candidate { id: i as u64, node }).collect();
        assert_eq!(choose(&canaries, crate::xds::ENDPOINT, &clients), vec![1, 2]);
        assert!(choose(&canaries, crate::xds::ENDPOINT, &clients[..1]).is_empty());
    }

    #[test]
    fn an_invalid_predicate_names_the_policy_field() {
        let predicate: MatchPredicate =
            serde_yaml_ng::from_str("request_node_match: { id_match: { regex_match: '(' } }").unwrap();
        let error = NodeMatch::new(&predicate, "rollout.policies[2].canary.node_match").unwrap_err();
        assert!(error.field.starts_with("rollout.policies[2].canary.node_match"), "{error:?}");
    }
}
