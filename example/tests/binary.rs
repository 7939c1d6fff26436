//! The `example-management-server` binary as a process: startup, publishing, SIGTERM, bind errors.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use support::{WAIT, stats};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use xds_relay_example::client::{SotwClient, Transport, node};
use xds_relay_example::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE};

const BIN: &str = env!("CARGO_BIN_EXE_example-management-server");

/// Spawns the binary with `args`; returns it and the addresses of its "listening" log lines.
async fn spawn(args: &[&str]) -> (Child, SocketAddr, SocketAddr) {
    let mut child =
        Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addresses = Vec::new();
    while addresses.len() < 2 {
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap().unwrap().unwrap();
        if line.contains("listening") {
            let addr = line.split("address=").nth(1).unwrap().split_whitespace().next().unwrap();
            addresses.push(addr.parse().unwrap());
        }
    }
    // Keep draining the logs so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addresses[0], addresses[1])
}

#[tokio::test]
async fn serves_publishes_and_exits_cleanly_on_sigterm() {
    let (mut child, xds, stats_addr) = spawn(&[
        "--address=127.0.0.1:0",
        "--stats-address=127.0.0.1:0",
        "--interval=200ms",
        "--clusters=4",
        "--endpoints=127.0.0.1:7001,127.0.0.1:7002",
    ])
    .await;
    let c = SotwClient::connect(&format!("http://{xds}"), Transport::Ads, node("bin", "c")).await.unwrap();
    c.subscribe(CLUSTER_TYPE, vec![]).await.unwrap();
    c.subscribe(ENDPOINT_TYPE, vec!["cluster_3".to_owned()]).await.unwrap();
    let first = c.wait_for(CLUSTER_TYPE, WAIT, |_| true).await.unwrap();
    assert_eq!(first.resources.len(), 4);
    let later = c.wait_for(ENDPOINT_TYPE, WAIT, |r| r.version_info > first.version_info).await.unwrap();
    assert_eq!(later.resources.len(), 1);
    assert!(stats(stats_addr).await["publishes"].as_u64().unwrap() >= 2);

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(3), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
    let reason = c.wait_ended(WAIT).await.unwrap();
    assert_eq!(reason.code, Some(tonic::Code::Unavailable), "{reason}");
}

#[tokio::test]
async fn max_publishes_stops_periodic_publishing() {
    let (_child, _xds, stats_addr) = spawn(&[
        "--address=127.0.0.1:0",
        "--stats-address=127.0.0.1:0",
        "--interval=50ms",
        "--max-publishes=2",
        "--random-versions",
    ])
    .await;
    support::eventually("2 publishes", || async { (stats(stats_addr).await["publishes"] == 2).then_some(()) }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = stats(stats_addr).await;
    assert_eq!(s["publishes"], 2, "{s}");
    assert!(s["version"].as_str().unwrap().starts_with('v'), "{s}");
}

#[tokio::test]
async fn bind_failure_exits_1_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("--address={}", taken.local_addr().unwrap());
    let output =
        tokio::time::timeout(WAIT, Command::new(BIN).args([address.as_str(), "--stats-address=127.0.0.1:0"]).output())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot bind the xds listener"), "{stderr}");
}
