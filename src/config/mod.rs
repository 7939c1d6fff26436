//! Configuration: the bootstrap file (listeners, origin server, cache, logging, metrics) and
//! the aggregation-rules file, loaded from YAML and validated.
//!
//! Loading is two passes over one file:
//!
//! 1. **Parse.** `serde_yaml_ng` plus `serde_path_to_error`, with `deny_unknown_fields` on every
//!    struct, so syntax errors, unknown fields, wrong types, bad enum names, bad durations,
//!    out-of-range ports and malformed oneofs are reported with the field path where they occur.
//!    Every field also accepts protojson's lowerCamelCase spelling (`portValue`,
//!    `originServer`, …), because the Go relay read these files with protojson.
//! 2. **Validate.** [`Bootstrap::validate`] and [`KeyerConfiguration::validate`] walk the result
//!    and report the first violated rule (the protoc-gen-validate rules of the Go relay, plus our
//!    own fields' rules), again with its path.
//!
//! Invariants: no input, however malformed, makes loading panic or hang; every error is a
//! [`ConfigError`] naming the file, the field path and the problem, in lowercase with no
//! trailing period; a value returned by [`parse_bootstrap`] or [`parse_rules`] has passed
//! validation.

pub mod bootstrap;
pub mod cluster;
pub mod duration;
pub mod gocompat;
pub mod limits;
pub mod rules;
pub mod tls;
pub mod traces;

pub use bootstrap::*;
pub use cluster::{ClusterSettings, FailureDetector};
pub use duration::GoDuration;
pub use limits::{Limits, Telemetry};
pub use rules::*;
pub use tls::{AdminTls, ClusterTls, NodeIdentity, OriginTls, ServerTls};
pub use traces::TracingSettings;

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

/// The bootstrap of the example setup (`example/config/xds-relay-bootstrap.yaml`), compiled in.
pub const DEFAULT_BOOTSTRAP: &str = include_str!("../../example/config/xds-relay-bootstrap.yaml");

/// The aggregation rules of the example setup (`example/config/aggregation-rules.yaml`),
/// compiled in.
pub const DEFAULT_RULES: &str = include_str!("../../example/config/aggregation-rules.yaml");

/// A configuration problem, naming the file, the field path (for example
/// `origin_server.address.port_value` or
/// `fragments[1].rules[0].result.request_node_fragment.cluster_action.regex_action.pattern`)
/// and the problem.
///
/// Displayed as `{file}: {field}: {message}`; an empty `file` or `field` is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in, as given by the caller; empty when the configuration did
    /// not come from a file (for example rules built in code and passed to the keyer).
    pub file: String,
    /// Dotted path of the offending field, with `[i]` for list elements; empty when the
    /// problem concerns the whole document.
    pub field: String,
    /// What is wrong, lowercase, without a trailing period.
    pub message: String,
}

// === impl ConfigError ===

impl ConfigError {
    /// Builds an error from its three parts.
    pub fn new(file: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { file: file.into(), field: field.into(), message: message.into() }
    }

    /// Returns the error with `file` set, keeping the field and message.
    pub fn in_file(mut self, file: &str) -> Self {
        self.file = file.to_string();
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.file.is_empty() {
            write!(f, "{}: ", self.file)?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

// === loading ===

/// Reads and validates a bootstrap file.
///
/// # Errors
///
/// A [`ConfigError`] with the message `cannot read file: …` if the file cannot be read, or
/// any error of [`parse_bootstrap`].
pub fn load_bootstrap(path: &Path) -> Result<Bootstrap, ConfigError> {
    let file = path.display().to_string();
    let text = read_file(path, &file)?;
    parse_bootstrap(&text, &file)
}

/// Parses and validates bootstrap YAML; `file` is only used in error messages.
///
/// # Errors
///
/// The first parse or validation problem, as a [`ConfigError`] naming `file` and the field.
pub fn parse_bootstrap(text: &str, file: &str) -> Result<Bootstrap, ConfigError> {
    let bootstrap: Bootstrap = from_yaml(text, file)?;
    bootstrap.validate().map_err(|e| e.in_file(file))?;
    Ok(bootstrap)
}

/// Reads and validates an aggregation-rules file.
///
/// # Errors
///
/// A [`ConfigError`] with the message `cannot read file: …` if the file cannot be read, or
/// any error of [`parse_rules`].
pub fn load_rules(path: &Path) -> Result<KeyerConfiguration, ConfigError> {
    let file = path.display().to_string();
    let text = read_file(path, &file)?;
    parse_rules(&text, &file)
}

/// Parses and validates aggregation-rules YAML; `file` is only used in error messages.
///
/// # Errors
///
/// The first parse or validation problem (including regexes that do not compile), as a
/// [`ConfigError`] naming `file` and the field.
pub fn parse_rules(text: &str, file: &str) -> Result<KeyerConfiguration, ConfigError> {
    let rules: KeyerConfiguration = from_yaml(text, file)?;
    rules.validate().map_err(|e| e.in_file(file))?;
    Ok(rules)
}

fn read_file(path: &Path, file: &str) -> Result<String, ConfigError> {
    read_limited(path, MAX_CONFIG_FILE_BYTES)
        .and_then(|bytes| String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
        .map_err(|e| ConfigError::new(file, "", format!("cannot read file: {e}")))
}

/// Largest bootstrap or rules file read (16 MiB); a larger one is an error, not a read that
/// exhausts memory.
pub const MAX_CONFIG_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Largest certificate, key, CA bundle or token file read (1 MiB).
pub const MAX_SECRET_FILE_BYTES: u64 = 1024 * 1024;

/// Reads the whole file at `path`, refusing one larger than `limit` bytes (a device such as
/// `/dev/zero`, or a file replaced by something huge, fails instead of filling memory).
///
/// # Errors
/// The I/O error, or `InvalidData` naming the limit when the file is larger.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the file is larger than the {limit}-byte limit"),
        ));
    }
    Ok(bytes)
}

/// Deserializes one YAML document, turning any error into a [`ConfigError`] whose field is
/// the path `serde_path_to_error` tracked.
fn from_yaml<T: DeserializeOwned>(text: &str, file: &str) -> Result<T, ConfigError> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        let message = strip_path_prefix(&e.into_inner().to_string(), &field);
        ConfigError::new(file, field, message)
    })
}

/// `serde_yaml_ng` prefixes its messages with its own (sometimes shorter) path; we report the
/// path separately, so drop that prefix when it is a prefix of the tracked path.
fn strip_path_prefix(message: &str, field: &str) -> String {
    if let Some((prefix, rest)) = message.split_once(": ") {
        let is_prefix = !prefix.is_empty()
            && field.starts_with(prefix)
            && matches!(field[prefix.len()..].chars().next(), None | Some('.') | Some('['));
        if is_prefix {
            return rest.to_string();
        }
    }
    message.to_string()
}

/// Helpers shared by the two schemas: lenient integer parsing (protojson accepts numbers
/// written as strings) and proto3's "null means unset".
pub(crate) mod de {
    use std::fmt;

    use serde::Deserialize;
    use serde::de::{self, Deserializer, Visitor};

    /// Deserializes an optional section where YAML `null` (for example a key with every
    /// child commented out) means "use the default", as in protojson.
    pub fn null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Default,
    {
        Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
    }

    /// An integer written as a number or as a decimal string, returned as `i128` so that
    /// range checks are ours.
    pub fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i128, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = i128;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
                Ok(i128::from(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
                Ok(i128::from(v))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<i128, E> {
                Ok(v)
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<i128, E> {
                i128::try_from(v).map_err(|_| E::custom(format!("integer {v} is too large")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<i128, E> {
                v.trim().parse::<i128>().map_err(|_| E::custom(format!("invalid integer \"{v}\"")))
            }
        }
        deserializer.deserialize_any(IntVisitor)
    }

    /// A non-negative count that fits `usize`.
    pub fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
        let v = integer(deserializer)?;
        if v < 0 {
            return Err(de::Error::custom(format!("must not be negative, got {v}")));
        }
        usize::try_from(v).map_err(|_| de::Error::custom(format!("{v} is too large")))
    }

    /// A protobuf `int32`.
    pub fn int32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i32, D::Error> {
        let v = integer(deserializer)?;
        i32::try_from(v).map_err(|_| de::Error::custom(format!("{v} does not fit a 32-bit integer")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_files_are_refused_not_read_into_memory() {
        let error = read_limited(Path::new("/dev/zero"), 4096).unwrap_err();
        assert!(error.to_string().contains("4096-byte limit"), "{error}");
        let error = load_bootstrap(Path::new("/dev/zero")).unwrap_err();
        assert!(error.message.contains("limit"), "{error}");
        let admin = Admin {
            address: SocketAddress { address: "127.0.0.1".into(), port_value: 0 },
            tls: None,
            auth_token_file: Some("/dev/zero".into()),
        };
        let error = admin.read_auth_token().unwrap_err();
        assert_eq!(error.field, "admin.auth_token_file");
        assert!(error.message.contains("limit"), "{error}");
    }

    #[test]
    fn display_leaves_out_empty_parts() {
        assert_eq!(ConfigError::new("f.yaml", "a.b", "bad").to_string(), "f.yaml: a.b: bad");
        assert_eq!(ConfigError::new("f.yaml", "", "bad").to_string(), "f.yaml: bad");
        assert_eq!(ConfigError::new("", "a.b", "bad").to_string(), "a.b: bad");
        assert_eq!(ConfigError::new("", "", "bad").to_string(), "bad");
    }

    #[test]
    fn yaml_path_prefix_is_stripped_only_when_it_is_the_path() {
        assert_eq!(strip_path_prefix("a.b: unknown field", "a.b.c"), "unknown field");
        assert_eq!(strip_path_prefix("a.b: unknown field", "a.b"), "unknown field");
        assert_eq!(strip_path_prefix("a[0]: x", "a[0].b"), "x");
        assert_eq!(strip_path_prefix("a.bc: x", "a.b"), "a.bc: x");
        assert_eq!(strip_path_prefix("invalid duration \"x\": y", "ttl"), "invalid duration \"x\": y");
    }

    #[test]
    fn embedded_defaults_load() {
        let bootstrap = parse_bootstrap(DEFAULT_BOOTSTRAP, "default bootstrap");
        assert!(bootstrap.is_ok(), "{bootstrap:?}");
        let rules = parse_rules(DEFAULT_RULES, "default rules");
        assert!(rules.is_ok(), "{rules:?}");
    }

    #[test]
    fn unreadable_file_is_reported() {
        let err = load_bootstrap(Path::new("/nonexistent/xds-relay.yaml")).unwrap_err();
        assert_eq!(err.file, "/nonexistent/xds-relay.yaml");
        assert!(err.message.starts_with("cannot read file: "), "{err}");
        let err = load_rules(Path::new("/nonexistent/rules.yaml")).unwrap_err();
        assert!(err.message.starts_with("cannot read file: "), "{err}");
    }

    #[test]
    fn garbage_never_panics() {
        let inputs = [
            "",
            "---\n",
            "# only a comment\n",
            "~",
            "3",
            "\"text\"",
            "[1, 2]",
            "{",
            "a: [",
            ":\n:\n",
            "*anchor",
            "a: &x [1]\nb: *x",
            "fragments: 3",
            "fragments: [3]",
            "fragments: [{rules: 3}]",
            "fragments: [{rules: [{match: 3, result: 4}]}]",
            "server: []",
            "server: {address: 3}",
            "\t\u{0}\u{7f}\u{feff}",
            "one: 1\n---\ntwo: 2",
            "? [a, b]\n: c",
        ];
        for input in inputs {
            assert!(parse_bootstrap(input, "garbage.yaml").is_err(), "bootstrap accepted {input:?}");
            assert!(parse_rules(input, "garbage.yaml").is_err(), "rules accepted {input:?}");
        }
        // Deep nesting is refused by the YAML parser's recursion limit, not by a stack overflow.
        let deep = format!(
            "fragments: [{{rules: [{{match: {}any_match: true{}, result: {{string_fragment: x}}}}]}}]",
            "{not_match: ".repeat(200),
            "}".repeat(200)
        );
        assert!(parse_rules(&deep, "deep.yaml").is_err());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse_rules(&deep, "deep.yaml").is_err());
    }
}
