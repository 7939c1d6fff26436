//! TLS end to end, with real processes and real handshakes: a relay with server mTLS in front
//! of an origin that requires mTLS too, clients with good, missing and foreign certificates,
//! the node identity check, certificate rotation under a live stream, the admin listener over
//! TLS, and a bootstrap naming a missing key file.
//!
//! Certificates are made with rcgen into each test's temporary directory.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{OriginProcess, RelayProcess, SOON, eventually, tempdir};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tower::ServiceExt as _;
use xds_relay::tls::{ClientFiles, ClientTls};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

/// A test certificate authority writing PEM files into a directory.
mod pki {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };

    pub struct Ca {
        issuer: CertifiedIssuer<'static, KeyPair>,
        /// The CA certificate file.
        pub pem: PathBuf,
    }

    /// A certificate and key file pair.
    pub struct Leaf {
        pub cert: PathBuf,
        pub key: PathBuf,
    }

    impl Ca {
        /// A new CA named `name`, its certificate written to `dir/{name}-ca.pem`.
        pub fn new(dir: &Path, name: &str) -> Self {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            let pem = dir.join(format!("{name}-ca.pem"));
            std::fs::write(&pem, issuer.pem()).unwrap();
            Self { issuer, pem }
        }

        /// Writes `dir/{file}.pem` and `dir/{file}.key`: a leaf with common name `cn`, valid
        /// for `localhost` and 127.0.0.1 plus the extra `uris`, for server and client use.
        pub fn leaf(&self, dir: &Path, file: &str, cn: &str, uris: &[&str]) -> Leaf {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ];
            for uri in uris {
                params.subject_alt_names.push(SanType::URI((*uri).try_into().unwrap()));
            }
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let leaf = Leaf { cert: dir.join(format!("{file}.pem")), key: dir.join(format!("{file}.key")) };
            // Write the key first, then the certificate, each atomically, as rotation tools do.
            write_atomically(&leaf.key, &key.serialize_pem());
            write_atomically(&leaf.cert, &cert.pem());
            leaf
        }
    }

    fn write_atomically(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

use pki::{Ca, Leaf};

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// An origin requiring client certificates of `ca`, serving `server`.
fn tls_origin(server: &Leaf, ca: &Ca) -> OriginProcess {
    OriginProcess::start(&[
        "--tls-cert",
        &p(&server.cert),
        "--tls-key",
        &p(&server.key),
        "--tls-client-ca",
        &p(&ca.pem),
    ])
}

/// A relay bootstrap: server mTLS (`server_tls` inside `server.tls`), mTLS to `origin`, and
/// the admin listener over TLS.
fn tls_bootstrap(origin: SocketAddr, ca: &Ca, relay: &Leaf, server_tls: &str) -> String {
    let origin_tls = format!(
        "  tls: {{ ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\", server_name: localhost }}\n",
        p(&ca.pem),
        p(&relay.cert),
        p(&relay.key)
    );
    let bootstrap = support::bootstrap_yaml(&[origin], &origin_tls, "  ttl: 60s");
    let server = "server:\n  address: { address: \"127.0.0.1\", port_value: 0 }\n";
    assert!(bootstrap.contains(server));
    let bootstrap = bootstrap.replacen(
        server,
        &format!(
            "{server}  tls:\n    cert_file: \"{}\"\n    key_file: \"{}\"\n    client_ca_file: \"{}\"\n{server_tls}",
            p(&relay.cert),
            p(&relay.key),
            p(&ca.pem)
        ),
        1,
    );
    format!("{bootstrap}  tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n", p(&relay.cert), p(&relay.key))
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` if any.
async fn channel(addr: SocketAddr, ca: &Path, identity: Option<&Leaf>) -> anyhow::Result<Channel> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca)?)).domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(&leaf.cert)?, std::fs::read(&leaf.key)?));
    }
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Subscribes to clusters as node `id` through a channel with `identity`; returns the client
/// once it has config, or the error that stopped it.
async fn subscribe(relay: SocketAddr, ca: &Path, identity: Option<&Leaf>, id: &str) -> Result<SotwClient, String> {
    let channel = channel(relay, ca, identity).await.map_err(|e| format!("{e:#}"))?;
    let client = SotwClient::with_channel(channel, Transport::Ads, node(id, "staging"));
    client.subscribe(xds::CLUSTER, vec![]).await.map_err(|e| format!("{e:#}"))?;
    tokio::select! {
        got = client.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()) => {
            got.map_err(|e| format!("{e:#}"))?;
            Ok(client)
        }
        ended = client.wait_ended(SOON) => Err(format!("{:?}", ended.map_err(|e| e.to_string()))),
    }
}

/// The common name of the leaf certificate `addr` serves now.
async fn served_cn(addr: SocketAddr, ca: &Path) -> String {
    let tls = ClientTls::new(
        "test",
        ClientFiles { ca_file: ca.to_path_buf(), identity: None },
        Some("localhost"),
        xds_relay::telemetry::Metrics::new(),
    )
    .expect("client TLS");
    let uri = format!("http://{addr}").parse().unwrap();
    let stream = tls.connector().oneshot(uri).await.expect("TLS handshake");
    let (_, session) = stream.inner().get_ref();
    let der = session.peer_certificates().expect("a server certificate")[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_owned()
}

/// GET `path` from the admin listener over TLS (HTTP/2); returns status and body.
async fn admin_get(addr: SocketAddr, ca: &Path, path: &str) -> (u16, String) {
    let channel = channel(addr, ca, None).await.expect("admin TLS channel");
    let request = http::Request::get(format!("https://localhost{path}")).body(tonic::body::Body::empty()).unwrap();
    let response = channel.oneshot(request).await.expect("admin answer");
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body()).await.expect("admin body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_clients_are_served_and_others_refused() {
    xds_relay::tls::install_crypto_provider();
    let dir = tempdir::Dir::new("tls");
    let ca = Ca::new(&dir.0, "relay");
    let origin_leaf = ca.leaf(&dir.0, "origin", "origin", &[]);
    let relay_leaf = ca.leaf(&dir.0, "relay", "relay-1", &[]);
    let client_leaf = ca.leaf(&dir.0, "client", "envoy-1", &["spiffe://test/envoy-1"]);
    let other = Ca::new(&dir.0, "other");
    let foreign_leaf = other.leaf(&dir.0, "foreign", "envoy-foreign", &[]);

    let origin = tls_origin(&origin_leaf, &ca);
    let relay = RelayProcess::start(&tls_bootstrap(origin.xds, &ca, &relay_leaf, ""));

    // A client with a certificate of the CA gets config from the TLS origin.
    let good = subscribe(relay.xds, &ca.pem, Some(&client_leaf), "envoy-1").await.expect("a good client is served");

    // Without a certificate, or with one of another CA, the handshake is refused.
    let anonymous = subscribe(relay.xds, &ca.pem, None, "envoy-anonymous").await;
    assert!(anonymous.is_err(), "a client without a certificate was served");
    let foreign = subscribe(relay.xds, &ca.pem, Some(&foreign_leaf), "envoy-foreign").await;
    assert!(foreign.is_err(), "a client with a foreign certificate was served");
    // A plaintext client gets nothing either.
    let plaintext = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-plain", "staging")).await;
    if let Ok(plaintext) = plaintext {
        plaintext.subscribe(xds::CLUSTER, vec![]).await.ok();
        assert!(plaintext.wait_ended(SOON).await.is_ok(), "a plaintext client was not ended");
        assert!(plaintext.latest(xds::CLUSTER).is_none());
    }

    // Secrets are not refused for lack of TLS on this listener (no rule maps them, though).
    let secrets = SotwClient::with_channel(
        channel(relay.xds, &ca.pem, Some(&client_leaf)).await.unwrap(),
        Transport::Ads,
        node("envoy-1", "staging"),
    );
    secrets.subscribe(xds::SECRET, vec!["cert".into()]).await.unwrap();
    let end = secrets.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::InvalidArgument), "{end:?}");
    assert!(end.message.contains("aggregation key"), "{end:?}");

    // The admin listener answers over TLS; the failed handshakes are counted.
    let (status, body) = admin_get(relay.admin, &ca.pem, "/ready").await;
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = admin_get(relay.admin, &ca.pem, "/metrics").await;
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("xds_relay_tls_handshake_failures_total{listener=\"xds\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(failures >= 2, "{metrics}");

    // The good client keeps getting updates.
    let next = origin.publish();
    good.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
    assert!(good.ended().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_identity_must_be_named_by_the_client_certificate() {
    let dir = tempdir::Dir::new("tls-identity");
    let ca = Ca::new(&dir.0, "relay");
    let origin_leaf = ca.leaf(&dir.0, "origin", "origin", &[]);
    let relay_leaf = ca.leaf(&dir.0, "relay", "relay-1", &[]);
    let client_leaf = ca.leaf(&dir.0, "client", "envoy-1", &["spiffe://test/ns/default/sa/envoy-1"]);

    let origin = tls_origin(&origin_leaf, &ca);
    let relay = RelayProcess::start(&tls_bootstrap(origin.xds, &ca, &relay_leaf, "    node_identity: id\n"));

    // The URI SAN names the node whose id is that URI.
    let id = "spiffe://test/ns/default/sa/envoy-1";
    subscribe(relay.xds, &ca.pem, Some(&client_leaf), id).await.expect("the node is named by its certificate");

    // The same certificate does not name envoy-1, although its URI ends with it: any workload
    // certificate of the CA could otherwise claim the node whose id ends its URI.
    let impostor = SotwClient::with_channel(
        channel(relay.xds, &ca.pem, Some(&client_leaf)).await.unwrap(),
        Transport::Ads,
        node("envoy-1", "staging"),
    );
    impostor.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    let end = impostor.wait_ended(SOON).await.unwrap();
    assert_eq!(end.code, Some(tonic::Code::PermissionDenied), "{end:?}");
    assert!(end.message.contains("node.id \"envoy-1\" is not named"), "{end:?}");
    assert!(end.message.contains("spiffe://test/ns/default/sa/envoy-1"), "{end:?}");
    assert!(impostor.latest(xds::CLUSTER).is_none());
    eventually("the refusal to be logged", SOON, || {
        relay.process.printed(&["downstream request rejected", "node_identity"]).then_some(())
    })
    .await;
    let (_, metrics) = admin_get(relay.admin, &ca.pem, "/metrics").await;
    assert!(metrics.contains("xds_relay_request_errors_total{reason=\"node_identity\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_serve_new_connections_and_live_streams_keep_flowing() {
    xds_relay::tls::install_crypto_provider();
    let dir = tempdir::Dir::new("tls-rotation");
    let ca = Ca::new(&dir.0, "relay");
    let origin_leaf = ca.leaf(&dir.0, "origin", "origin", &[]);
    let relay_leaf = ca.leaf(&dir.0, "relay", "relay-before", &[]);
    let client_leaf = ca.leaf(&dir.0, "client", "envoy-1", &[]);

    let origin = tls_origin(&origin_leaf, &ca);
    let relay = RelayProcess::start(&tls_bootstrap(origin.xds, &ca, &relay_leaf, ""));
    assert_eq!(served_cn(relay.xds, &ca.pem).await, "relay-before");
    let live = subscribe(relay.xds, &ca.pem, Some(&client_leaf), "envoy-1").await.expect("served");

    // Rotate the relay's files in place: new connections get the new certificate.
    ca.leaf(&dir.0, "relay", "relay-after", &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if served_cn(relay.xds, &ca.pem).await == "relay-after" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the relay still serves the old certificate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(relay.process.printed(&["reloaded TLS certificates", "config=\"xds\""]));

    // The stream opened before the rotation keeps receiving updates.
    let next = origin.publish();
    live.wait_for(xds::CLUSTER, SOON, |r| r.version_info == next).await.unwrap();
    assert!(live.ended().is_none(), "{:?}", live.ended());

    // A broken key file keeps the current material, logged and counted.
    let reported = || {
        let output = relay.process.output.lock().unwrap();
        output.iter().filter(|l| l.contains("cannot reload TLS certificates") && l.contains("config=\"xds\"")).count()
    };
    let before = reported();
    std::fs::write(&relay_leaf.key, "not a key").unwrap();
    eventually("the bad key to be reported", Duration::from_secs(30), || (reported() > before).then_some(())).await;
    assert_eq!(served_cn(relay.xds, &ca.pem).await, "relay-after");
    let (_, metrics) = admin_get(relay.admin, &ca.pem, "/metrics").await;
    assert!(metrics.contains("xds_relay_tls_reload_failures_total{config=\"xds\"}"), "{metrics}");
    subscribe(relay.xds, &ca.pem, Some(&client_leaf), "envoy-2").await.expect("new clients are still served");
}

#[test]
fn a_missing_key_file_is_a_configuration_error_naming_the_field() {
    let dir = tempdir::Dir::new("tls-missing");
    let ca = Ca::new(&dir.0, "relay");
    let relay_leaf = ca.leaf(&dir.0, "relay", "relay-1", &[]);
    let missing = Leaf { cert: relay_leaf.cert.clone(), key: dir.0.join("absent.key") };
    let bootstrap = tls_bootstrap("127.0.0.1:18000".parse().unwrap(), &ca, &missing, "");
    let path = dir.0.join("bootstrap.yaml");
    std::fs::write(&path, bootstrap).unwrap();
    let out = Command::new(support::binary("xds-relay")).arg("-c").arg(&path).output().expect("run the relay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("server.tls.key_file"), "{stderr}");
    assert!(stderr.contains("absent.key"), "{stderr}");
}

/// The address a relay logged for its peer listener.
fn peer_address(relay: &RelayProcess) -> SocketAddr {
    let output = relay.process.output.lock().unwrap();
    let line = output.iter().find(|l| l.contains("peer server listening")).expect("the peer listener is logged");
    let at = line.find("address=").expect("address field") + "address=".len();
    line[at..].split_whitespace().next().unwrap().trim_matches('"').parse().expect("a socket address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_follow_keys_over_mtls_and_refuse_clients_without_a_certificate() {
    xds_relay::tls::install_crypto_provider();
    let dir = tempdir::Dir::new("tls-cluster");
    let ca = Ca::new(&dir.0, "cluster");
    let origin = OriginProcess::start(&["--listeners", "6"]);
    let nodes: Vec<(String, u16)> = (0..2)
        .map(|i| {
            let ip = format!("127.0.0.{}", i + 2);
            let port = support::free_udp_port(&ip);
            (ip, port)
        })
        .collect();
    let seeds: Vec<String> = nodes.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
    let relays: Vec<RelayProcess> = nodes
        .iter()
        .enumerate()
        .map(|(i, (ip, port))| {
            let name = format!("relay-{}", i + 1);
            let leaf = ca.leaf(&dir.0, &name, &name, &[&format!("spiffe://xds-relay/relay/{name}")]);
            let bootstrap = support::cluster_bootstrap(origin.xds, &name, ip, *port, &seeds);
            assert!(bootstrap.contains("  insecure: true\n"));
            let tls = format!(
                "  tls: {{ ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\" }}\n  gossip_keys_file: \"{}\"\n",
                p(&ca.pem),
                p(&leaf.cert),
                p(&leaf.key),
                p(&support::gossip_keys_file(&dir.0))
            );
            RelayProcess::start(&bootstrap.replace("  insecure: true\n", &tls))
        })
        .collect();
    for relay in &relays {
        support::ready_members(relay, 2).await;
    }

    // Every route is watched on both nodes: one node follows each key at its owner, over mTLS.
    let mut clients = Vec::new();
    for route in 0..6 {
        for relay in &relays {
            let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node(&format!("envoy-{route}"), "staging"))
                .await
                .unwrap();
            c.subscribe(xds::ROUTE, vec![format!("route_{route}")]).await.unwrap();
            clients.push(c);
        }
    }
    for c in &clients {
        c.wait_for(xds::ROUTE, SOON, |r| !r.resources.is_empty()).await.unwrap();
    }
    eventually("one origin stream per key", SOON, || (origin.open_streams_for(xds::ROUTE) == 6).then_some(())).await;
    let followed: u64 = relays
        .iter()
        .map(|r| {
            let metrics = r.admin_get("/metrics").unwrap();
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("xds_relay_keys{source=\"peer\",connected=\"true\"} "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert!(followed > 0, "no key was followed over the peer protocol");
    let version = origin.publish();
    for c in &clients {
        c.wait_for(xds::ROUTE, SOON, |r| r.version_info == version).await.unwrap();
    }

    // The peer listener refuses a client without a certificate and counts it.
    let peer = peer_address(&relays[0]);
    let anonymous = ClientTls::new(
        "test",
        ClientFiles { ca_file: ca.pem.clone(), identity: None },
        Some("localhost"),
        xds_relay::telemetry::Metrics::new(),
    )
    .unwrap();
    let channel =
        Endpoint::from_shared(format!("http://{peer}")).unwrap().connect_with_connector_lazy(anonymous.connector());
    let request = http::Request::post("/xdsrelay.peer.v1.Peer/Status")
        .header("content-type", "application/grpc")
        .body(tonic::body::Body::empty())
        .unwrap();
    assert!(channel.oneshot(request).await.is_err(), "the peer listener answered a client without a certificate");
    eventually("the refused peer handshake to be counted", SOON, || {
        let metrics = relays[0].admin_get("/metrics").ok()?;
        metrics.contains("xds_relay_tls_handshake_failures_total{listener=\"peer\"}").then_some(())
    })
    .await;
    for c in &clients {
        assert!(c.ended().is_none(), "{:?}", c.ended());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_certificate_from_another_ca_is_refused_and_reported() {
    let dir = tempdir::Dir::new("tls-origin");
    let ca = Ca::new(&dir.0, "relay");
    let other = Ca::new(&dir.0, "other");
    let origin_leaf = other.leaf(&dir.0, "origin", "origin", &[]);
    let origin = OriginProcess::start(&["--tls-cert", &p(&origin_leaf.cert), "--tls-key", &p(&origin_leaf.key)]);
    let origin_tls = format!("  tls: {{ ca_file: \"{}\" }}\n", p(&ca.pem));
    let relay = RelayProcess::start(&support::bootstrap_yaml(&[origin.xds], &origin_tls, "  ttl: 60s"));
    let client = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-1", "staging")).await.unwrap();
    client.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    eventually("the untrusted origin to be reported", SOON, || {
        relay.process.printed(&["upstream stream failed", "UnknownIssuer"]).then_some(())
    })
    .await;
    assert!(client.latest(xds::CLUSTER).is_none());
    assert!(client.ended().is_none(), "the client stays connected while the origin is unusable");
}
