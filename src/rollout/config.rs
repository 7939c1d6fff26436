//! The `rollout:` section of the bootstrap: which keys roll out in stages, who the canaries
//! are, how long a version bakes and how many NACKs it may draw.
//!
//! ```yaml
//! rollout:
//!   policies:
//!     - keys: { type_urls: [type.googleapis.com/envoy.config.cluster.v3.Cluster], key_prefix: "prod" }
//!       canary: { fraction: 0.1 }            # or: { node_match: <a match predicate of the rules> }
//!       bake: 30s
//!       max_nack_ratio: 0.0
//!       rollback_canaries: true
//! ```
//!
//! The first policy whose `keys` matches a key applies to it; a key no policy matches (and
//! every key when the section is absent) is served as before: every version to every client
//! at once. The section depends only on the configuration types it reuses (the aggregation
//! rules' match predicate, Go durations), so the bootstrap can hold it.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, GoDuration, MatchPredicate};

/// The `rollout:` section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSettings {
    /// The policies, first match wins (at least 1).
    #[serde(default)]
    pub policies: Vec<RolloutPolicy>,
}

/// How the new versions of some keys roll out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPolicy {
    /// Which keys the policy applies to (default: every key).
    #[serde(default)]
    pub keys: KeyMatch,
    /// Who receives a new version first (required).
    pub canary: CanarySelection,
    /// How long the canaries hold a new version before it may reach the rest (required, > 0).
    pub bake: GoDuration,
    /// The largest share of canaries that may NACK a version, in `[0, 1)` (default 0: any
    /// NACK holds it).
    #[serde(default, alias = "maxNackRatio")]
    pub max_nack_ratio: f64,
    /// When a version is held, move the canaries back to the stable version (default false:
    /// they keep the held one).
    #[serde(default, alias = "rollbackCanaries")]
    pub rollback_canaries: bool,
}

/// Which keys a policy applies to; every member that is set must match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyMatch {
    /// The key's resource type is one of these type URLs (empty: any type).
    #[serde(default, alias = "typeUrls")]
    pub type_urls: Vec<String>,
    /// The key starts with this string.
    #[serde(default, alias = "keyPrefix")]
    pub key_prefix: Option<String>,
    /// The key matches this regex (Rust `regex` syntax, unanchored).
    #[serde(default, alias = "keyRegex")]
    pub key_regex: Option<String>,
}

/// Who the canaries of a new version are: exactly one member is set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySelection {
    /// This share of the key's clients, rounded up, at least one: those whose node id hashes
    /// lowest, so the same clients are canaries version after version.
    #[serde(default)]
    pub fraction: Option<f64>,
    /// The clients whose node matches this predicate (the syntax of the aggregation rules'
    /// `match`; type conditions read the key's type).
    #[serde(default, alias = "nodeMatch")]
    pub node_match: Option<MatchPredicate>,
}

impl RolloutSettings {
    /// Checks every policy.
    ///
    /// # Errors
    /// The first problem, as a [`ConfigError`] naming the field under `path`.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        if self.policies.is_empty() {
            return Err(ConfigError::new("", format!("{path}.policies"), "at least 1 policy is required"));
        }
        for (i, policy) in self.policies.iter().enumerate() {
            policy.validate(&format!("{path}.policies[{i}]"))?;
        }
        Ok(())
    }
}

impl RolloutPolicy {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        if let Some(regex) = &self.keys.key_regex {
            Regex::new(regex)
                .map_err(|e| ConfigError::new("", format!("{path}.keys.key_regex"), format!("invalid regex: {e}")))?;
        }
        if self.bake.is_zero() {
            return Err(ConfigError::new("", format!("{path}.bake"), "must be greater than 0"));
        }
        if !(0.0..1.0).contains(&self.max_nack_ratio) {
            return Err(ConfigError::new(
                "",
                format!("{path}.max_nack_ratio"),
                format!("must be at least 0 and below 1, not {}", self.max_nack_ratio),
            ));
        }
        match (&self.canary.fraction, &self.canary.node_match) {
            (Some(f), None) if *f > 0.0 && *f <= 1.0 => Ok(()),
            (Some(f), None) => Err(ConfigError::new(
                "",
                format!("{path}.canary.fraction"),
                format!("must be above 0 and at most 1, not {f}"),
            )),
            (None, Some(predicate)) => {
                crate::rollout::canary::NodeMatch::new(predicate, &format!("{path}.canary.node_match")).map(|_| ())
            }
            _ => Err(ConfigError::new("", format!("{path}.canary"), "set exactly one of fraction and node_match")),
        }
    }
}
