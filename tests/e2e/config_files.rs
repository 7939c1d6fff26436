//! Every configuration file we ship or reference loads and validates, and the example rules
//! give the keys the docs promise.
//!
//! The shared reference files live outside this repository
//! (`../shared/reference/xds-relay-examples/` next to the crate); when that directory is absent
//! the tests that need it print a note and pass.

use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::core::v3::Node;
use xds_relay::config::{self, KeyerConfiguration};
use xds_relay::keyer::{KeyError, KeyRequest, Keyer};
use xds_relay::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared reference examples, or `None` (with a note) when they are not checked out.
fn shared_examples() -> Option<PathBuf> {
    let dir = manifest_dir().join("../shared/reference/xds-relay-examples");
    if dir.is_dir() {
        Some(dir)
    } else {
        println!("note: {} is absent; skipping the shared example files", dir.display());
        None
    }
}

#[derive(Debug, PartialEq)]
enum Kind {
    Bootstrap,
    Rules,
    /// An Envoy or gRPC client bootstrap: not ours to validate.
    Client,
}

/// Classifies a YAML file by its top-level keys.
fn kind_of(path: &Path) -> Kind {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    let has = |key: &str| value.get(key).is_some();
    if has("fragments") {
        Kind::Rules
    } else if has("origin_server") || has("originServer") {
        Kind::Bootstrap
    } else if has("node") {
        Kind::Client
    } else {
        panic!("{}: cannot tell what kind of file this is", path.display())
    }
}

/// Loads every YAML file of `dir`, asserting relay files validate; returns (bootstraps, rules).
fn load_all(dir: &Path) -> (usize, usize) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    entries.sort();
    let (mut bootstraps, mut rules) = (0, 0);
    for path in entries {
        match kind_of(&path) {
            Kind::Bootstrap => {
                config::load_bootstrap(&path).unwrap_or_else(|e| panic!("{e}"));
                bootstraps += 1;
            }
            Kind::Rules => {
                let loaded = config::load_rules(&path).unwrap_or_else(|e| panic!("{e}"));
                Keyer::new(&loaded).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                rules += 1;
            }
            Kind::Client => println!("note: {} is a client bootstrap; not validated", path.display()),
        }
    }
    (bootstraps, rules)
}

#[test]
fn shared_reference_examples_validate() {
    let Some(dir) = shared_examples() else { return };
    let (bootstraps, rules) = load_all(&dir);
    assert!(bootstraps >= 1 && rules >= 1, "found {bootstraps} bootstraps and {rules} rule files");
}

#[test]
fn our_example_configs_validate() {
    let (bootstraps, rules) = load_all(&manifest_dir().join("example/config"));
    assert_eq!((bootstraps, rules), (1, 1));
}

#[test]
fn embedded_defaults_load() {
    let bootstrap = config::parse_bootstrap(config::DEFAULT_BOOTSTRAP, "<embedded bootstrap>").unwrap();
    assert_eq!(bootstrap.server.address.host_port(), "127.0.0.1:9991");
    let rules = config::parse_rules(config::DEFAULT_RULES, "<embedded rules>").unwrap();
    Keyer::new(&rules).unwrap();
    let from_file = config::load_rules(&manifest_dir().join("example/config/aggregation-rules.yaml")).unwrap();
    assert_eq!(rules, from_file);
}

fn key(keyer: &Keyer, type_url: &str, node: &Node, names: &[&str]) -> Result<String, KeyError> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    keyer.key(&KeyRequest { type_url, node: Some(node), resource_names: &names })
}

/// The keys of §2.4 of the behaviour reference for a node in cluster "staging".
fn assert_staging_keys(rules: &KeyerConfiguration, file: &str) {
    let keyer = Keyer::new(rules).unwrap_or_else(|e| panic!("{file}: {e}"));
    for id in ["envoy-client-1", "envoy-client-2"] {
        let node = Node { id: id.into(), cluster: "staging".into(), ..Node::default() };
        assert_eq!(key(&keyer, CLUSTER, &node, &[]).as_deref(), Ok("staging_cds"), "{file}");
        assert_eq!(key(&keyer, LISTENER, &node, &[]).as_deref(), Ok("staging_lds"), "{file}");
        assert_eq!(key(&keyer, ENDPOINT, &node, &["backend"]).as_deref(), Ok("staging_eds"), "{file}");
        assert_eq!(key(&keyer, ROUTE, &node, &["local_route"]).as_deref(), Ok("staging_rds_local_route"), "{file}");
        assert_eq!(key(&keyer, ROUTE, &node, &["other"]).as_deref(), Ok("staging_rds_other"), "{file}");
    }
}

#[test]
fn our_aggregation_rules_give_the_documented_keys() {
    let path = manifest_dir().join("example/config/aggregation-rules.yaml");
    let rules = config::load_rules(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_staging_keys(&rules, &path.display().to_string());
}

#[test]
fn shared_aggregation_rules_give_the_documented_keys() {
    let Some(dir) = shared_examples() else { return };
    let path = dir.join("aggregation-rules.yaml");
    let rules = config::load_rules(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_staging_keys(&rules, &path.display().to_string());
}

#[test]
fn shared_e2e_rules_give_go_compatible_keys() {
    let Some(dir) = shared_examples() else { return };
    let path = dir.join("keyer_configuration_e2e.yaml");
    if !path.is_file() {
        println!("note: {} is absent; skipping", path.display());
        return;
    }
    let keyer = Keyer::new(&config::load_rules(&path).unwrap_or_else(|e| panic!("{e}"))).unwrap();
    let node = Node { id: "envoy-client-1".into(), cluster: "staging".into(), ..Node::default() };
    // `^(.*)-*$` keeps the id; Go's `^*-(.*)-*$` (repeated assertion) leaves "staging" unchanged.
    assert_eq!(key(&keyer, CLUSTER, &node, &[]).as_deref(), Ok("envoy-client-1_staging_cds"));
    assert_eq!(
        key(&keyer, ENDPOINT, &node, &["backend"]).as_deref(),
        Ok("envoy-client-1_staging_clusterloadassignment_backend")
    );
    assert!(matches!(key(&keyer, ENDPOINT, &node, &[]), Err(KeyError::MissingResourceNames { .. })));
    let east = Node { cluster: "staging-east-1".into(), ..node };
    assert_eq!(key(&keyer, LISTENER, &east, &[]).as_deref(), Ok("envoy-client-1_stagingeast-1_lds"));
}
