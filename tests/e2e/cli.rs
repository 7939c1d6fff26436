//! The command line: validate mode, configuration errors (exit 64, file and field named),
//! and graceful shutdown on SIGTERM.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{OriginProcess, RelayProcess, tempdir};

fn relay() -> Command {
    Command::new(support::binary("xds-relay"))
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("example/config").join(name)
}

fn run(command: &mut Command) -> (i32, String) {
    let out = command.output().expect("run xds-relay");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn validate_mode_accepts_the_examples_and_the_embedded_defaults() {
    let (code, out) = run(relay()
        .args(["-m", "validate", "-c"])
        .arg(example("xds-relay-bootstrap.yaml"))
        .arg("-a")
        .arg(example("aggregation-rules.yaml")));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("configuration is valid"), "{out}");
    let (code, out) = run(relay().args(["--mode", "validate"]));
    assert_eq!(code, 0, "{out}");
}

#[test]
fn validate_mode_accepts_xds_relays_own_files() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/xds-relay-examples");
    if !shared.exists() {
        eprintln!("skipped: {} is absent", shared.display());
        return;
    }
    let rules =
        ["aggregation-rules.yaml", "keyer_configuration_complete_tech_spec.yaml", "keyer_configuration_e2e.yaml"];
    let bootstraps = [
        "xds-relay-bootstrap.yaml",
        "bootstrap_configuration_complete_tech_spec.yaml",
        "bootstrap_configuration_e2e.yaml",
    ];
    for (bootstrap, rules) in bootstraps.iter().zip(rules) {
        let (code, out) =
            run(relay().args(["-m", "validate", "-c"]).arg(shared.join(bootstrap)).arg("-a").arg(shared.join(rules)));
        assert_eq!(code, 0, "{bootstrap} + {rules}: {out}");
    }
}

#[test]
fn invalid_configuration_exits_64_naming_file_and_field() {
    let dir = tempdir::Dir::new("cli");
    let bootstrap = dir.0.join("bad-bootstrap.yaml");
    std::fs::write(
        &bootstrap,
        "server: { address: { address: 127.0.0.1, port_value: 9991 } }\n\
         origin_server: { address: { address: 127.0.0.1, port_value: 70000 } }\n\
         cache: { ttl: 1s }\nadmin: { address: { address: 127.0.0.1, port_value: 6070 } }\n",
    )
    .unwrap();
    let (code, out) = run(relay().args(["-m", "validate", "-c"]).arg(&bootstrap));
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("bad-bootstrap.yaml") && out.contains("origin_server.address.port_value"), "{out}");

    let rules = dir.0.join("bad-rules.yaml");
    std::fs::write(
        &rules,
        "fragments:\n  - rules:\n      - match: { any_match: true }\n        result:\n          request_node_fragment:\n            id_action: { regex_action: { pattern: \"(unclosed\", replace: x } }\n",
    )
    .unwrap();
    let (code, out) = run(relay().args(["-m", "validate", "-a"]).arg(&rules));
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("bad-rules.yaml") && out.contains("regex_action.pattern"), "{out}");

    let (code, out) = run(relay().args(["-m", "validate", "-c", "/nonexistent/bootstrap.yaml"]));
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("/nonexistent/bootstrap.yaml"), "{out}");

    let (code, out) = run(relay().args(["-m", "explode"]));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("explode"), "{out}");
}

#[test]
fn sigterm_stops_the_relay_cleanly() {
    let origin = OriginProcess::start(&[]);
    let mut relay = RelayProcess::in_front_of(&[origin.xds]);
    let (xds, admin) = (relay.xds, relay.admin);
    let status = relay.process.terminate(Duration::from_secs(15)).expect("the relay exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(std::net::TcpStream::connect(xds).is_err(), "xDS port closed");
    assert!(std::net::TcpStream::connect(admin).is_err(), "admin port closed");
}
