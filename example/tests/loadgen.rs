//! The load generator against the in-process example management server, in each mode.

mod support;

use std::time::Duration;

use support::{eventually, start};
use xds_relay_example::client::Transport;
use xds_relay_example::harness::RunningServer;
use xds_relay_example::loadgen::{
    Loadgen, LoadgenConfig, LoadgenError, Protocol, StopReason, Summary, TlsFiles, XdsType,
};

const STREAMS: usize = 20;

fn config(running: &RunningServer, mode: Transport, protocol: Protocol) -> LoadgenConfig {
    LoadgenConfig {
        target: running.endpoint(),
        streams: STREAMS,
        connections: 3,
        mode,
        protocol,
        types: vec![XdsType::Cds, XdsType::Eds],
        duration: Duration::from_secs(20),
        until_versions: Some(2),
        ..Default::default()
    }
}

/// Runs the load generator, publishes twice once every client is ready, and returns the
/// summary and the two versions.
async fn run_with_two_publishes(running: &RunningServer, config: LoadgenConfig) -> (Summary, [String; 2]) {
    let loadgen = Loadgen::start(config).await.unwrap();
    eventually("every client ready", || async { (loadgen.progress().streams_ready == STREAMS as u64).then_some(()) })
        .await;
    let mut versions = Vec::new();
    for _ in 0..2 {
        let version = running.server().publish_next().version().to_owned();
        // Wait for every client before the next publish: SotW is latest-wins.
        let received = || async { (loadgen.receipts(XdsType::Eds, &version) == STREAMS as u64).then_some(()) };
        eventually("every client got the version", received).await;
        versions.push(version);
    }
    let summary = tokio::time::timeout(Duration::from_secs(5), loadgen.wait()).await.unwrap();
    (summary, [versions[0].clone(), versions[1].clone()])
}

fn check(summary: &Summary, versions: &[String; 2], calls_per_client: u64) {
    let text = serde_json::to_string_pretty(summary).unwrap();
    assert_eq!(summary.stopped_by, StopReason::UntilVersions, "{text}");
    assert_eq!(summary.streams_ready, STREAMS as u64, "{text}");
    assert_eq!(summary.streams_reached_until_versions, Some(STREAMS as u64), "{text}");
    assert_eq!(summary.calls_expected, STREAMS as u64 * calls_per_client, "{text}");
    assert_eq!(summary.calls_open, summary.calls_expected, "{text}");
    assert_eq!((summary.errors, summary.nacks, summary.reconnects), (0, 0, 0), "{text}");
    for version in versions {
        let eds = summary.versions.iter().find(|v| v.xds_type == XdsType::Eds && v.version == *version);
        assert_eq!(eds.map(|v| v.streams), Some(STREAMS as u64), "{version}: {text}");
    }
    let spread = summary.spread_ms.expect("spread measured");
    let latency = summary.latency_ms.expect("latency measured");
    assert!(spread.p50.is_finite() && spread.max >= spread.p50 && spread.count >= 2, "{text}");
    assert!(latency.p50.is_finite() && latency.max >= latency.p99 && latency.count >= 2 * STREAMS as u64, "{text}");
    assert!(summary.responses >= 3 * STREAMS as u64 && summary.bytes > 0 && summary.responses_per_sec > 0.0, "{text}");
    assert!(summary.initial_response_ms.is_some(), "{text}");
}

#[tokio::test]
async fn ads_sotw() {
    let running = start().await;
    let (summary, versions) = run_with_two_publishes(&running, config(&running, Transport::Ads, Protocol::Sotw)).await;
    check(&summary, &versions, 1);
    // SotW CDS carries the new version too.
    let cds = summary.versions.iter().filter(|v| v.xds_type == XdsType::Cds).count();
    assert_eq!(cds, 2);
}

#[tokio::test]
async fn per_type_sotw() {
    let running = start().await;
    let (summary, versions) =
        run_with_two_publishes(&running, config(&running, Transport::PerType, Protocol::Sotw)).await;
    check(&summary, &versions, 2);
}

#[tokio::test]
async fn ads_delta() {
    let running = start().await;
    let (summary, versions) = run_with_two_publishes(&running, config(&running, Transport::Ads, Protocol::Delta)).await;
    check(&summary, &versions, 1);
    // Delta CDS does not change between publishes, so only EDS versions are received.
    assert!(summary.versions.iter().all(|v| v.xds_type == XdsType::Eds));
}

#[tokio::test]
async fn per_type_delta_with_fixed_names_and_lds_rds() {
    let running = start().await;
    let mut c = config(&running, Transport::PerType, Protocol::Delta);
    c.types = vec![XdsType::Lds, XdsType::Rds, XdsType::Eds];
    c.eds_names = Some(vec!["cluster_0".into(), "cluster_1".into()]);
    let (summary, versions) = run_with_two_publishes(&running, c).await;
    check(&summary, &versions, 3);
}

#[tokio::test]
async fn duration_bounds_the_run_and_a_dead_target_fails_fast() {
    let running = start().await;
    let mut c = config(&running, Transport::Ads, Protocol::Sotw);
    c.until_versions = None;
    c.duration = Duration::from_millis(300);
    let summary =
        tokio::time::timeout(Duration::from_secs(5), xds_relay_example::loadgen::run(c)).await.unwrap().unwrap();
    assert_eq!(summary.stopped_by, StopReason::Duration);
    assert!(summary.spread_ms.is_none() && summary.latency_ms.is_none());

    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let c = LoadgenConfig { target, ..Default::default() };
    assert!(Loadgen::start(c).await.is_err());
    let invalid = LoadgenConfig { types: vec![XdsType::Rds], ..Default::default() };
    assert!(matches!(Loadgen::start(invalid).await, Err(xds_relay_example::loadgen::LoadgenError::Config(_))));
}

#[tokio::test]
async fn streams_reconnect_after_the_server_restarts() {
    let running = start().await;
    let addr = running.grpc_addr();
    let mut c = config(&running, Transport::Ads, Protocol::Sotw);
    c.streams = 4;
    c.until_versions = None;
    c.reconnect_delay = Duration::from_millis(100);
    let loadgen = Loadgen::start(c).await.unwrap();
    eventually("ready", || async { (loadgen.progress().streams_ready == 4).then_some(()) }).await;
    running.shutdown().await;
    let grpc = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stats = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _again = RunningServer::start_on(grpc, stats, Default::default()).unwrap();
    eventually("reconnected", || async {
        let p = loadgen.progress();
        (p.reconnects >= 4 && p.calls_open == 4).then_some(())
    })
    .await;
    loadgen.stop();
    let summary = loadgen.wait().await;
    assert_eq!(summary.stopped_by, StopReason::Stopped);
    assert!(summary.errors >= 4, "UNAVAILABLE on shutdown counts as an error");
}

#[tokio::test]
async fn restarts_reopen_streams_and_move_clients_to_new_clusters() {
    let running = start().await;
    let mut c = config(&running, Transport::Ads, Protocol::Sotw);
    c.streams = 10;
    c.groups = 2;
    c.until_versions = None;
    c.cluster_template = "g{group}e{epoch}-x".into();
    // Every client once per second, one at a time (10 per second, a tick every 100 ms).
    c.restart_per_second = 1.0;
    let loadgen = Loadgen::start(c).await.unwrap();
    let stats = || running.server().stats();
    eventually("every client restarted twice, on its third cluster", || async {
        let clusters: std::collections::BTreeSet<String> =
            stats().streams.iter().map(|s| s.node_cluster.clone()).collect();
        (loadgen.progress().restarts >= 25 && clusters.iter().any(|c| c.ends_with("e2-x"))).then_some(())
    })
    .await;
    eventually("one stream per client on the origin", || async { (stats().streams_open == 10).then_some(()) }).await;
    loadgen.stop();
    let summary = loadgen.wait().await;
    let text = serde_json::to_string_pretty(&summary).unwrap();
    assert_eq!((summary.errors, summary.reconnects, summary.nacks), (0, 0, 0), "restarts are neither: {text}");
    assert!(summary.restarts >= 25, "{text}");
    assert_eq!(summary.streams_ready, 10, "{text}");
}

#[tokio::test]
async fn binary_writes_a_json_summary_and_rejects_bad_flags() {
    const BIN: &str = env!("CARGO_BIN_EXE_xds-loadgen");
    let running = start().await;
    let dir = std::env::temp_dir().join(format!("xds-loadgen-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("summary.json");
    let target = format!("--target={}", running.endpoint());
    let json_flag = format!("--json={}", json.display());
    let args = [target.as_str(), "--streams=5", "--protocol=delta", "--types=cds,eds", "--duration=1500ms", &json_flag];
    let output = tokio::process::Command::new(BIN).args(args).kill_on_drop(true).output();
    let output = tokio::time::timeout(Duration::from_secs(15), output).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("calls up 5/5"), "one progress line per second: {stderr}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["streams_ready"], 5, "{summary}");
    assert_eq!(summary["stopped_by"], "duration", "{summary}");
    assert_eq!(summary["protocol"], "delta", "{summary}");
    std::fs::remove_dir_all(&dir).unwrap();

    let bad = tokio::process::Command::new(BIN).args([target.as_str(), "--types=rds"]).output().await.unwrap();
    assert_eq!(bad.status.code(), Some(64), "{}", String::from_utf8_lossy(&bad.stderr));
    let bad = tokio::process::Command::new(BIN).args(["--types=sds"]).output().await.unwrap();
    assert_eq!(bad.status.code(), Some(2), "clap usage error");
}

/// Reads a record file as JSON values (every line complete once the run has ended).
fn record_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[tokio::test]
async fn record_file_has_connects_responses_and_disconnects_per_client() {
    let running = start().await;
    let dir = std::env::temp_dir().join(format!("xds-loadgen-record-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("clients.jsonl");
    for protocol in [Protocol::Sotw, Protocol::Delta] {
        let mut c = config(&running, Transport::Ads, protocol);
        c.streams = 3;
        c.until_versions = None;
        c.reconnect_delay = Duration::from_millis(100);
        c.record = Some(path.clone());
        let loadgen = Loadgen::start(c).await.unwrap();
        eventually("ready", || async { (loadgen.progress().streams_ready == 3).then_some(()) }).await;
        let version = running.server().publish_next().version().to_owned();
        eventually("published version received", || async {
            (loadgen.receipts(XdsType::Eds, &version) == 3).then_some(())
        })
        .await;
        loadgen.stop();
        loadgen.wait().await;

        let lines = record_lines(&path);
        for i in 0..3 {
            let node = format!("loadgen-{i}");
            let mine: Vec<_> = lines.iter().filter(|l| l["node"] == node.as_str()).collect();
            assert_eq!(mine[0]["event"], "connect", "{protocol:?} {node}: {mine:?}");
            assert_eq!(mine[0]["stream"], 1);
            let cds: Vec<_> = mine.iter().filter(|l| l["event"] == "response" && l["type"] == "cds").collect();
            let eds: Vec<_> = mine.iter().filter(|l| l["event"] == "response" && l["type"] == "eds").collect();
            assert!(!cds.is_empty() && cds.iter().all(|l| l["resources"].as_u64() > Some(0)), "{mine:?}");
            assert!(eds.iter().any(|l| l["version"] == version.as_str()), "{protocol:?}: {mine:?}");
            let t: Vec<f64> = mine.iter().map(|l| l["t"].as_f64().unwrap()).collect();
            assert!(t.windows(2).all(|w| w[0] <= w[1]), "in order: {t:?}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn record_file_shows_a_disconnect_and_the_reconnect() {
    let running = start().await;
    let addr = running.grpc_addr();
    let dir = std::env::temp_dir().join(format!("xds-loadgen-reconnect-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("clients.jsonl");
    let mut c = config(&running, Transport::Ads, Protocol::Sotw);
    c.streams = 2;
    c.until_versions = None;
    c.reconnect_delay = Duration::from_millis(100);
    c.record = Some(path.clone());
    let loadgen = Loadgen::start(c).await.unwrap();
    eventually("ready", || async { (loadgen.progress().streams_ready == 2).then_some(()) }).await;
    running.shutdown().await;
    let grpc = tokio::net::TcpListener::bind(addr).await.unwrap();
    let stats = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _again = RunningServer::start_on(grpc, stats, Default::default()).unwrap();
    eventually("reconnected", || async {
        (loadgen.progress().calls_open == 2 && loadgen.progress().reconnects >= 2).then_some(())
    })
    .await;
    loadgen.stop();
    loadgen.wait().await;

    let lines = record_lines(&path);
    let mine: Vec<_> = lines.iter().filter(|l| l["node"] == "loadgen-0").collect();
    let disconnect = mine.iter().position(|l| l["event"] == "disconnect").expect("a disconnect");
    assert!(mine[disconnect]["code"].is_string(), "{:?}", mine[disconnect]);
    let reconnect = mine.iter().rposition(|l| l["event"] == "connect").unwrap();
    assert!(reconnect > disconnect, "{mine:?}");
    assert!(mine[reconnect]["stream"].as_u64() > Some(1), "{mine:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// mTLS: the load generator verifies the server against the CA (by IP SAN, or by the name given)
/// and presents its client certificate; a wrong CA or name fails to connect, and a missing client
/// certificate never gets a response.
#[tokio::test]
async fn mtls_connections_and_their_failures() {
    let running = start().await;
    let dir = support::tls::temp_dir("loadgen-mtls");
    let pki = support::tls::Pki::new(&dir, "relay");
    let server = pki.leaf("relay-1", &["relay-1", "localhost"]);
    let client = pki.leaf("loadgen", &["loadgen"]);
    let front = support::tls::TlsFront::start(running.grpc_addr(), &server, Some(pki.ca_der())).await;
    let tls = TlsFiles {
        ca_file: pki.ca_file.clone(),
        cert_file: Some(client.cert_file.clone()),
        key_file: Some(client.key_file.clone()),
        server_name: None,
    };
    let mut c = config(&running, Transport::Ads, Protocol::Sotw);
    c.target = front.endpoint();
    c.tls = Some(tls.clone());
    let (summary, versions) = run_with_two_publishes(&running, c.clone()).await;
    check(&summary, &versions, 1);
    assert!(summary.tls && summary.mtls);
    assert_eq!(summary.connect_ms.map(|q| q.count), Some(3), "one setup time per connection");
    assert_eq!(front.handshakes.load(std::sync::atomic::Ordering::Relaxed), 3);

    // The name to verify instead of the target's IP.
    c.until_versions = None;
    c.duration = Duration::from_millis(200);
    c.tls = Some(TlsFiles { server_name: Some("relay-1".into()), ..tls.clone() });
    xds_relay_example::loadgen::run(c.clone()).await.unwrap();
    c.tls = Some(TlsFiles { server_name: Some("relay-2".into()), ..tls.clone() });
    assert!(matches!(Loadgen::start(c.clone()).await, Err(LoadgenError::Connect { .. })), "name not in the SANs");
    let other = support::tls::Pki::new(&dir, "other");
    c.tls = Some(TlsFiles { ca_file: other.ca_file.clone(), ..tls.clone() });
    assert!(matches!(Loadgen::start(c.clone()).await, Err(LoadgenError::Connect { .. })), "server from another CA");

    // No client certificate: TLS 1.3 connects, the server refuses the handshake, no response.
    let failures = front.failures.load(std::sync::atomic::Ordering::Relaxed);
    c.tls = Some(TlsFiles { cert_file: None, key_file: None, ..tls });
    c.duration = Duration::from_secs(20);
    c.connections = 1;
    c.streams = 2;
    let refused = match Loadgen::start(c).await {
        Ok(loadgen) => {
            eventually("calls fail", || async { (loadgen.progress().errors >= 2).then_some(()) }).await;
            loadgen.stop();
            let summary = loadgen.wait().await;
            assert_eq!((summary.streams_ready, summary.responses), (0, 0));
            true
        }
        Err(LoadgenError::Connect { .. }) => true,
        Err(e) => panic!("{e}"),
    };
    assert!(refused);
    eventually("the server refused the handshake", || async {
        (front.failures.load(std::sync::atomic::Ordering::Relaxed) > failures).then_some(())
    })
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn binary_speaks_mtls_and_checks_its_tls_flags() {
    const BIN: &str = env!("CARGO_BIN_EXE_xds-loadgen");
    let running = start().await;
    let dir = support::tls::temp_dir("loadgen-mtls-binary");
    let pki = support::tls::Pki::new(&dir, "relay");
    let server = pki.leaf("relay-1", &["relay-1"]);
    let client = pki.leaf("loadgen", &["loadgen"]);
    let front = support::tls::TlsFront::start(running.grpc_addr(), &server, Some(pki.ca_der())).await;
    let json = dir.join("summary.json");
    let args = [
        format!("--target={}", front.endpoint()),
        "--streams=3".into(),
        "--connections=2".into(),
        "--duration=1500ms".into(),
        format!("--tls-ca={}", pki.ca_file.display()),
        format!("--tls-cert={}", client.cert_file.display()),
        format!("--tls-key={}", client.key_file.display()),
        "--tls-server-name=relay-1".into(),
        format!("--json={}", json.display()),
    ];
    let output = tokio::process::Command::new(BIN).args(&args).kill_on_drop(true).output();
    let output = tokio::time::timeout(Duration::from_secs(15), output).await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["streams_ready"], 3, "{summary}");
    assert_eq!((summary["tls"].as_bool(), summary["mtls"].as_bool()), (Some(true), Some(true)), "{summary}");
    assert_eq!(summary["connect_ms"]["count"], 2, "{summary}");

    let run = |args: Vec<String>| async move { tokio::process::Command::new(BIN).args(args).output().await.unwrap() };
    let http_target = format!("--target=http://{}", front.addr);
    let bad = run(vec![http_target, args[4].clone()]).await;
    assert_eq!(bad.status.code(), Some(64), "TLS needs https: {}", String::from_utf8_lossy(&bad.stderr));
    let bad = run(vec![args[0].clone(), args[4].clone(), args[5].clone()]).await;
    assert_eq!(bad.status.code(), Some(2), "--tls-cert without --tls-key is a usage error");
    let missing = format!("--tls-ca={}", dir.join("missing.pem").display());
    let bad = run(vec![args[0].clone(), missing]).await;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("missing.pem"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
