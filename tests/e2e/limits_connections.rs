//! Connection-level bounds (`limits.max_connections`, `limits.handshake_timeout`,
//! `limits.max_streams_per_connection`, the open-file limit), each proven by replaying its
//! attack, scaled down, against a real relay process on loopback.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use crate::support::{OriginProcess, RelayProcess, SOON, bootstrap_yaml, eventually};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

/// The HTTP/2 client preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// The test bootstrap with `limits` (YAML lines, indented by two) and `server_extra` lines.
fn bootstrap(origin: SocketAddr, limits: &str, server_extra: &str) -> String {
    let base = bootstrap_yaml(&[origin], "", "  ttl: 60s\n  max_entries: 100");
    let server = "server:\n  address: { address: \"127.0.0.1\", port_value: 0 }\n";
    assert!(base.contains(server));
    let base = base.replace(server, &format!("{server}{server_extra}"));
    format!("{base}limits:\n{limits}")
}

/// The value of the first metric line starting with `name` and holding every one of `labels`.
fn metric(relay: &RelayProcess, name: &str, labels: &[&str]) -> f64 {
    let text = relay.admin_get("/metrics").expect("/metrics answers");
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// True once the server closed `stream` (EOF or reset), within `timeout`.
async fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // The server's SETTINGS and the like: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

/// A CDS client connects through `relay` and gets the origin's version.
async fn served(relay: &RelayProcess, origin: &OriginProcess, id: &str) {
    let version = origin.version();
    let client =
        SotwClient::connect(&relay.endpoint(), Transport::Ads, node(id, "c1-x")).await.expect("client connects");
    client.subscribe(xds::CLUSTER, vec![]).await.expect("subscribe");
    client.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.expect("client served");
    client.close();
}

async fn connect_all(addr: SocketAddr, count: usize, hello: &[u8]) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = TcpStream::connect(addr).await.expect("TCP connect");
        if !hello.is_empty() {
            stream.write_all(hello).await.expect("write");
        }
        streams.push(stream);
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_after_the_handshake_timeout_and_clients_are_served() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::start(&bootstrap(origin.xds, "  handshake_timeout: 1s\n", ""));

    // 300 connections that never send a byte, 50 that send the preface but no SETTINGS, and
    // 20 that speak something else.
    let mut silent = connect_all(relay.xds, 300, b"").await;
    let mut preface_only = connect_all(relay.xds, 50, PREFACE).await;
    let mut garbage = connect_all(relay.xds, 20, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The admin listener too: 20 connections that never send a request line.
    let mut admin_silent = connect_all(relay.admin, 20, b"").await;

    // Meanwhile a real client is served.
    served(&relay, &origin, "during-slowloris").await;

    let started = Instant::now();
    for stream in garbage.iter_mut() {
        assert!(closed_within(stream, SOON).await, "a connection that is not HTTP/2 is closed");
    }
    for stream in silent.iter_mut().chain(preface_only.iter_mut()).chain(admin_silent.iter_mut()) {
        assert!(closed_within(stream, SOON).await, "a silent connection is closed by the relay");
    }
    eprintln!("390 slow connections closed {:?} after the client was served", started.elapsed());
    let timed_out = eventually("handshake timeouts counted", SOON, || {
        let n = metric(&relay, "xds_relay_connections_refused_total", &["listener=\"xds\"", "handshake_timeout"]);
        (n >= 350.0).then_some(n)
    })
    .await;
    assert_eq!(timed_out, 350.0);
    let not_http2 = metric(&relay, "xds_relay_connections_refused_total", &["listener=\"xds\"", "not_http2"]);
    assert_eq!(not_http2, 20.0);
    let admin = metric(&relay, "xds_relay_connections_refused_total", &["listener=\"admin\"", "handshake_timeout"]);
    assert_eq!(admin, 20.0);
    assert!(relay.process.printed(&["limits.handshake_timeout"]), "the refusal is logged naming the limit");
    served(&relay, &origin, "after-slowloris").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_closed_at_once_and_admin_keeps_answering() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::start(&bootstrap(origin.xds, "  max_connections: 50\n  handshake_timeout: 60s\n", ""));

    // 200 connections that would each hold a slot; the relay keeps 50.
    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(SETTINGS);
    let mut streams = connect_all(relay.xds, 200, &hello).await;
    let open = eventually("50 connections open, 150 refused", SOON, || {
        let open = metric(&relay, "xds_relay_connections{", &["listener=\"xds\""]);
        let refused = metric(&relay, "xds_relay_connections_refused_total", &["listener=\"xds\"", "max_connections"]);
        (open == 50.0 && refused == 150.0).then_some(open)
    })
    .await;
    assert_eq!(open, 50.0);
    let mut closed = 0;
    for stream in streams.iter_mut() {
        if closed_within(stream, Duration::from_millis(200)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 150, "the connections over the cap are closed at once, the others kept");
    assert!(relay.process.printed(&["limits.max_connections is 50"]), "the refusal is logged naming the limit");
    // The admin API has its own cap: it answers while xDS is full.
    for _ in 0..5 {
        assert!(relay.admin_get("/metrics").is_ok());
    }

    drop(streams);
    eventually("slots released", SOON, || {
        (metric(&relay, "xds_relay_connections{", &["listener=\"xds\""]) == 0.0).then_some(())
    })
    .await;
    served(&relay, &origin, "after-flood").await;
}

/// The relay's CPU time (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the command name (which ends with ')'): state is field 3; utime, stime
    // are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports in USER_HZ, 100 on every supported architecture.
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_low_file_limit_the_relay_fits_its_caps_and_does_not_spin() {
    let origin = OriginProcess::start(&[]);
    let yaml = bootstrap(origin.xds, "  handshake_timeout: 60s\n", "");
    // The relay runs with a hard open-file limit of 256 (prlimit execs it: same pid).
    let relay = RelayProcess::start_under(&yaml, &["prlimit", "--nofile=256:256"]);
    assert!(
        relay.process.printed(&["limits.max_connections lowered to 144"]),
        "the relay says it lowered the cap to fit 256 files"
    );

    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(SETTINGS);
    let streams = connect_all(relay.xds, 400, &hello).await;
    eventually("144 connections open, the rest refused", SOON, || {
        let open = metric(&relay, "xds_relay_connections{", &["listener=\"xds\""]);
        let refused = metric(&relay, "xds_relay_connections_refused_total", &["listener=\"xds\"", "max_connections"]);
        (open == 144.0 && refused == 256.0).then_some(())
    })
    .await;

    // Held at the cap, the relay idles: its CPU time grows far slower than the wall clock.
    let pid = relay.process.child.id();
    let (cpu, wall) = (cpu_time(pid), Instant::now());
    for _ in 0..6 {
        assert!(relay.admin_get("/metrics").is_ok(), "admin answers while xDS is full");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (used, elapsed) = (cpu_time(pid) - cpu, wall.elapsed());
    eprintln!("relay CPU {used:?} over {elapsed:?} with 144 connections held and 256 refused");
    assert!(used < elapsed / 2, "the relay spins: {used:?} of CPU in {elapsed:?}");
    assert_eq!(metric(&relay, "xds_relay_accept_errors_total", &["listener=\"xds\""]), 0.0, "no fd ran out");

    drop(streams);
    eventually("slots released", SOON, || {
        (metric(&relay, "xds_relay_connections{", &["listener=\"xds\""]) == 0.0).then_some(())
    })
    .await;
    served(&relay, &origin, "after-fd-flood").await;
}

/// Opens an ADS stream on `channel` asking for CDS; returns its first answer: Ok(version) or
/// the status, or None when nothing came within `wait` (the stream is kept open in `keep`).
async fn open_stream(
    channel: &Channel,
    id: &str,
    wait: Duration,
    keep: &mut Vec<tokio::sync::mpsc::Sender<DiscoveryRequest>>,
) -> Option<Result<String, tonic::Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest { node: Some(node(id, "c1-x")), type_url: xds::CLUSTER.to_owned(), ..Default::default() })
        .await
        .unwrap();
    keep.push(tx);
    let mut client = AggregatedDiscoveryServiceClient::new(channel.clone());
    let call = async move {
        let mut responses =
            client.stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        let first = responses.message().await?.map(|r| r.version_info).unwrap_or_default();
        // Keep reading in the background so the stream stays open.
        tokio::spawn(async move { while let Ok(Some(_)) = responses.message().await {} });
        Ok(first)
    };
    tokio::time::timeout(wait, call).await.ok()
}

async fn channel(relay: &RelayProcess) -> Channel {
    Endpoint::from_shared(relay.endpoint()).unwrap().connect().await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_max_streams_per_connection_wait_and_other_connections_get_theirs() {
    let origin = OriginProcess::start(&[]);
    let relay =
        RelayProcess::start(&bootstrap(origin.xds, "  max_streams_per_connection: 8\n", "  max_streams: 100\n"));
    let first = channel(&relay).await;
    let mut keep = Vec::new();
    for i in 0..8 {
        let answer = open_stream(&first, &format!("a{i}"), SOON, &mut keep).await;
        assert!(matches!(answer, Some(Ok(_))), "stream {i} served: {answer:?}");
    }
    // The relay advertised 8 concurrent streams in its SETTINGS: the client holds further
    // streams back (never sent, so never refused) while the 8 are open.
    let mut ninth_keep = Vec::new();
    let ninth = open_stream(&first, "a8", Duration::from_secs(2), &mut ninth_keep).await;
    assert!(ninth.is_none(), "a 9th stream on the connection is held back by the client: {ninth:?}");

    // Another connection gets its own 8.
    let second = channel(&relay).await;
    let mut other = Vec::new();
    for i in 0..8 {
        let answer = open_stream(&second, &format!("b{i}"), SOON, &mut other).await;
        assert!(matches!(answer, Some(Ok(_))), "second connection's stream {i} served: {answer:?}");
    }
    assert_eq!(metric(&relay, "xds_relay_downstream_streams ", &[]), 16.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_gets_at_most_half_of_max_streams() {
    let origin = OriginProcess::start(&[]);
    // The relay serves 10 streams: one connection gets at most 5 (the SETTINGS say 1024).
    let relay = RelayProcess::start(&bootstrap(origin.xds, "", "  max_streams: 10\n"));
    let greedy = channel(&relay).await;
    let mut keep = Vec::new();
    for i in 0..5 {
        let answer = open_stream(&greedy, &format!("g{i}"), SOON, &mut keep).await;
        assert!(matches!(answer, Some(Ok(_))), "stream {i} served: {answer:?}");
    }
    for i in 5..7 {
        let answer = open_stream(&greedy, &format!("g{i}"), SOON, &mut keep).await;
        let status = match answer {
            Some(Err(status)) => status,
            other => panic!("stream {i} over the fair share should be refused: {other:?}"),
        };
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("limits.max_streams_per_connection"), "{}", status.message());
        assert!(status.message().contains("server.max_streams (10)"), "{}", status.message());
    }
    assert_eq!(
        metric(&relay, "xds_relay_limit_refusals_total", &["max_streams_per_connection"]),
        2.0,
        "refusals counted"
    );
    assert!(relay.process.printed(&["stream refused", "limits.max_streams_per_connection"]));

    // The rest of the relay's streams go to another connection.
    let polite = channel(&relay).await;
    let mut other = Vec::new();
    for i in 0..5 {
        let answer = open_stream(&polite, &format!("p{i}"), SOON, &mut other).await;
        assert!(matches!(answer, Some(Ok(_))), "another connection's stream {i} served: {answer:?}");
    }
}
