//! Test harness. This module: real relay and example-server processes on loopback, killed
//! when their handle drops, plus polling helpers; [`inprocess`]: relay nodes started in the
//! test process, and an origin the test drives. No bare sleeps: every wait polls a condition
//! with a generous timeout.
#![allow(dead_code)]

pub mod inprocess;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tokio::time::Instant;

use serde_json::Value;

/// Generous bound for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(20);

/// A child process killed (SIGKILL) when dropped.
pub struct KillOnDrop {
    pub child: Child,
    pub name: String,
    /// Every line the process printed so far (stdout and stderr, ANSI codes removed).
    pub output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl KillOnDrop {
    /// True when some printed line contains every one of `parts`.
    pub fn printed(&self, parts: &[&str]) -> bool {
        self.output.lock().unwrap().iter().any(|line| parts.iter().all(|p| line.contains(p)))
    }
}

impl KillOnDrop {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Directory holding the workspace's binaries (next to the test executable's `deps`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target directory").to_path_buf()
}

/// Path of a workspace binary; the relay's own comes from cargo (or from `XDS_RELAY_BIN`,
/// which `make test` points at the release build for the attack tests), the example
/// server's from the same target directory (built by `cargo build --workspace`).
pub fn binary(name: &str) -> PathBuf {
    if name == "xds-relay" {
        return match std::env::var_os("XDS_RELAY_BIN") {
            Some(path) => PathBuf::from(path),
            None => PathBuf::from(env!("CARGO_BIN_EXE_xds-relay")),
        };
    }
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} is missing: build the workspace first (cargo build --workspace)", path.display());
    path
}

/// Spawns `command`, forwards its stderr and stdout to ours (prefixed), and returns the value
/// of the first `address=` field logged after a line containing `marker`s, in order.
fn spawn_and_find_addresses(mut command: Command, name: &str, markers: &[&str]) -> (KillOnDrop, Vec<SocketAddr>) {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let (tx, rx) = mpsc::channel::<String>();
    let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for pipe in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        let prefix = name.to_owned();
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("[{prefix}] {line}");
                output.lock().unwrap().push(strip_ansi(&line));
                let _ = tx.send(line);
            }
        });
    }
    let mut found = Vec::new();
    let deadline = Instant::now() + SOON;
    while found.len() < markers.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line =
            rx.recv_timeout(left).unwrap_or_else(|_| panic!("{name} did not log {:?} in time", markers[found.len()]));
        let plain = strip_ansi(&line);
        if plain.contains(markers[found.len()])
            && let Some(addr) = field(&plain, "address")
            && let Ok(addr) = addr.parse()
        {
            found.push(addr);
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    (KillOnDrop { child, name: name.to_owned(), output }, found)
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Value of `name=value` (or `"name":"value"`) in a log line.
fn field(line: &str, name: &str) -> Option<String> {
    let plain = format!("{name}=");
    if let Some(at) = line.find(&plain) {
        let rest = &line[at + plain.len()..];
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        return Some(rest[..end].trim_matches('"').to_owned());
    }
    let json = format!("\"{name}\":\"");
    let at = line.find(&json)?;
    let rest = &line[at + json.len()..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// A running example management server.
pub struct OriginProcess {
    pub process: KillOnDrop,
    pub xds: SocketAddr,
    pub stats: SocketAddr,
}

impl OriginProcess {
    /// Starts the example server on `xds`/`stats` (port 0 picks one) with extra arguments.
    pub fn start_on(xds: &str, stats: &str, extra: &[&str]) -> Self {
        let mut command = Command::new(binary("example-management-server"));
        command.args(["--address", xds, "--stats-address", stats, "--log-level", "info"]).args(extra);
        let (process, addrs) = spawn_and_find_addresses(command, "origin", &["listening", "listening"]);
        // The server logs its xDS and stats addresses; tell them apart by the stats endpoint.
        let (xds, stats) =
            if http_get(addrs[0], "/stats").is_ok() { (addrs[1], addrs[0]) } else { (addrs[0], addrs[1]) };
        Self { process, xds, stats }
    }

    /// Starts the example server on free ports with a long interval (tests publish by hand).
    pub fn start(extra: &[&str]) -> Self {
        let mut args = vec!["--interval", "600m"];
        args.extend_from_slice(extra);
        Self::start_on("127.0.0.1:0", "127.0.0.1:0", &args)
    }

    /// Restarts it on the same ports.
    pub fn restart(self, extra: &[&str]) -> Self {
        let (xds, stats) = (self.xds, self.stats);
        drop(self);
        let mut args = vec!["--interval", "600m"];
        args.extend_from_slice(extra);
        Self::start_on(&xds.to_string(), &stats.to_string(), &args)
    }

    pub fn stats(&self) -> Value {
        serde_json::from_str(&http_get(self.stats, "/stats").expect("origin stats")).expect("stats JSON")
    }

    /// Publishes a new snapshot now; returns its version.
    pub fn publish(&self) -> String {
        let body = http_post(self.stats, "/publish").expect("publish");
        match serde_json::from_str::<Value>(&body) {
            Ok(Value::Object(map)) => map.get("version").and_then(Value::as_str).map(str::to_owned).unwrap_or(body),
            Ok(Value::String(s)) => s,
            _ => body.trim().trim_matches('"').to_owned(),
        }
    }

    /// Open origin streams carrying `type_url`.
    pub fn open_streams_for(&self, type_url: &str) -> u64 {
        self.stats()["open_by_type"][type_url].as_u64().unwrap_or(0)
    }

    pub fn version(&self) -> String {
        self.stats()["version"].as_str().unwrap_or_default().to_owned()
    }
}

/// A running relay process.
pub struct RelayProcess {
    pub process: KillOnDrop,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempdir::Dir,
}

pub mod tempdir {
    use std::path::PathBuf;

    /// A directory removed when dropped.
    pub struct Dir(pub PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "xds-relay-test-{tag}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The bootstrap used by the tests: ports 0, the given origins, fast backoff.
pub fn bootstrap_yaml(origins: &[SocketAddr], extra_origin: &str, cache: &str) -> String {
    let primary = origins[0];
    let fallbacks: Vec<String> =
        origins[1..].iter().map(|a| format!("    - {{ address: \"{}\", port_value: {} }}", a.ip(), a.port())).collect();
    let fallbacks =
        if fallbacks.is_empty() { String::new() } else { format!("  fallback_addresses:\n{}\n", fallbacks.join("\n")) };
    format!(
        "server:\n  address: {{ address: \"127.0.0.1\", port_value: 0 }}\n\
         origin_server:\n  address: {{ address: \"{}\", port_value: {} }}\n{fallbacks}\
         \x20 backoff: {{ initial_interval: 100ms, max_interval: 1s }}\n  connect_timeout: 1s\n{extra_origin}\
         logging:\n  level: INFO\n\
         cache:\n{cache}\n\
         admin:\n  address: {{ address: \"127.0.0.1\", port_value: 0 }}\n",
        primary.ip(),
        primary.port()
    )
}

impl RelayProcess {
    /// Starts a relay with this bootstrap text and the example rules.
    pub fn start(bootstrap: &str) -> Self {
        Self::start_with_env(bootstrap, &[])
    }

    /// Starts a relay with this bootstrap, the example rules and extra environment variables.
    pub fn start_with_env(bootstrap: &str, env: &[(&str, &str)]) -> Self {
        Self::start_inner(bootstrap, None, env)
    }

    /// Starts a relay with this bootstrap and these aggregation rules (YAML text).
    pub fn start_with_rules(bootstrap: &str, rules: &str) -> Self {
        Self::start_inner(bootstrap, Some(rules), &[])
    }

    fn start_inner(bootstrap: &str, rules: Option<&str>, env: &[(&str, &str)]) -> Self {
        let dir = tempdir::Dir::new("relay");
        let path = dir.0.join("bootstrap.yaml");
        std::fs::write(&path, bootstrap).unwrap();
        let rules = match rules {
            Some(text) => {
                let path = dir.0.join("aggregation-rules.yaml");
                std::fs::write(&path, text).unwrap();
                path
            }
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("example/config/aggregation-rules.yaml"),
        };
        let mut command = Command::new(binary("xds-relay"));
        command.arg("-c").arg(&path).arg("-a").arg(rules).envs(env.iter().copied());
        let (process, addrs) =
            spawn_and_find_addresses(command, "relay", &["xDS server listening", "admin server listening"]);
        Self { process, xds: addrs[0], admin: addrs[1], dir }
    }

    /// Starts a relay with this bootstrap under a wrapper command that execs it (e.g.
    /// `["prlimit", "--nofile=256:256"]`), so the process id is the relay's.
    pub fn start_under(bootstrap: &str, wrapper: &[&str]) -> Self {
        let dir = tempdir::Dir::new("relay");
        let path = dir.0.join("bootstrap.yaml");
        std::fs::write(&path, bootstrap).unwrap();
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("example/config/aggregation-rules.yaml");
        let mut command = Command::new(wrapper[0]);
        command.args(&wrapper[1..]).arg(binary("xds-relay")).arg("-c").arg(&path).arg("-a").arg(rules);
        let (process, addrs) =
            spawn_and_find_addresses(command, "relay", &["xDS server listening", "admin server listening"]);
        Self { process, xds: addrs[0], admin: addrs[1], dir }
    }

    /// Starts a relay in front of `origin` with default cache settings.
    pub fn in_front_of(origins: &[SocketAddr]) -> Self {
        Self::start(&bootstrap_yaml(origins, "", "  ttl: 60s\n  max_entries: 100"))
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.xds)
    }

    pub fn admin_get(&self, path: &str) -> Result<String, String> {
        http_get(self.admin, path)
    }

    pub fn admin_json(&self, path: &str) -> Value {
        let body = self.admin_get(path).expect("admin GET");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
    }
}

/// GET `path` from `addr`; Err carries the status and body for non-2xx answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    request("GET", addr, path)
}

/// POST `path` to `addr` with an empty body.
pub fn http_post(addr: SocketAddr, path: &str) -> Result<String, String> {
    request("POST", addr, path)
}

/// An HTTP client that returns every status as a response and gives up after 5 s.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent()
}

fn request(method: &str, addr: SocketAddr, path: &str) -> Result<String, String> {
    let url = format!("http://{addr}{path}");
    let agent = agent();
    let response = match method {
        "GET" => agent.get(&url).call(),
        _ => agent.post(&url).send_empty(),
    };
    let mut response = response.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    if (200..300).contains(&status) { Ok(body) } else { Err(format!("{status}: {body}")) }
}

/// Polls `check` until it returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Numeric value of a version string made of digits (the example server's default).
pub fn numeric(version: &str) -> u128 {
    version.trim_start_matches('v').parse().unwrap_or_else(|_| panic!("version {version:?} is not numeric"))
}

/// A free UDP port on `ip` (bound then released; gossip needs a known port to advertise).
pub fn free_udp_port(ip: &str) -> u16 {
    std::net::UdpSocket::bind((ip, 0)).expect("bind UDP").local_addr().unwrap().port()
}

/// Bootstrap of node `name` of a test cluster: xDS, admin and peer on `ip` port 0, gossip on
/// `ip:gossip_port`, seeded with every node's gossip address.
pub fn cluster_bootstrap(origin: SocketAddr, name: &str, ip: &str, gossip_port: u16, seeds: &[String]) -> String {
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "server:\n  address: {{ address: \"{ip}\", port_value: 0 }}\n  ads_batch_window: 10ms\n\
         origin_server:\n  address: {{ address: \"{}\", port_value: {} }}\n\
         \x20 backoff: {{ initial_interval: 100ms, max_interval: 1s }}\n  connect_timeout: 1s\n\
         logging:\n  level: INFO\n\
         cache:\n  ttl: 60s\n\
         admin:\n  address: {{ address: \"{ip}\", port_value: 0 }}\n\
         cluster:\n  node_name: {name}\n  advertise_host: \"{ip}\"\n  gossip: {{ address: \"{ip}\", port_value: {gossip_port} }}\n\
         \x20 peer: {{ address: \"{ip}\", port_value: 0 }}\n  seeds: [{}]\n  gossip_interval: 100ms\n  insecure: true\n",
        origin.ip(),
        origin.port(),
        seeds.join(", ")
    )
}

/// Writes a gossip key file (one fixed base64 32-byte key) into `dir` and returns its path, for
/// clusters that run with `cluster.tls` and sealed gossip.
pub fn gossip_keys_file(dir: &Path) -> PathBuf {
    let path = dir.join("gossip.keys");
    std::fs::write(&path, "# test cluster key\nMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n")
        .expect("write the gossip key file");
    path
}

/// POST `body` (JSON) to `path` on `addr`; Err carries the status and body for non-2xx answers.
pub fn http_post_json(addr: SocketAddr, path: &str, body: &str) -> Result<String, String> {
    let url = format!("http://{addr}{path}");
    let agent = agent();
    let mut response = agent
        .post(&url)
        .header("content-type", "application/json")
        .send(body)
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    if (200..300).contains(&status) { Ok(text) } else { Err(format!("{status}: {text}")) }
}

/// Waits until `relay` sees `count` live members in state `ready` in its cluster view.
pub async fn ready_members(relay: &RelayProcess, count: usize) {
    eventually(&format!("{count} ready members"), SOON, || {
        let view = relay.admin_json("/api/cluster");
        let ready = view["members"].as_array()?.iter().filter(|m| m["alive"] == true && m["state"] == "ready").count();
        (ready == count).then_some(())
    })
    .await;
}
