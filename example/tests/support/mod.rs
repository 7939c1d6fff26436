//! Shared helpers for the example crate's integration tests.
#![allow(dead_code)]

pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xds_relay_example::harness::RunningServer;
use xds_relay_example::publisher::PublisherConfig;
use xds_relay_example::snapshot::SnapshotSpec;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be confident that something does not happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// Starts a server with 3 clusters, 2 listeners and synthetic endpoints.
pub async fn start() -> RunningServer {
    let spec = SnapshotSpec { clusters: 3, listeners: 2, endpoints: vec![] };
    RunningServer::start(PublisherConfig { spec, random_versions: false }).await.unwrap()
}

/// A minimal HTTP/1.1 request; returns the status code and body.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// `GET /stats` as JSON.
pub async fn stats(addr: SocketAddr) -> serde_json::Value {
    let (status, body) = http(addr, "GET", "/stats").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `check` until it returns `Some`, or panics with `what` after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
