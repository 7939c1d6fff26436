//! The peer protocol against strangers and impostors: relay processes with cluster mTLS on
//! 127.0.0.x (certificates made here with rcgen, SAN `spiffe://peer-test/relay/<node>`),
//! called with the generated peer client over real TLS handshakes.
//!
//! - A caller whose certificate does not name a live member gets nothing (`Status`, `Watch`).
//! - A member gets only what an owner may give: keys it owns, with the type and node the rules
//!   map to the key, in requests under the downstream size limit; fresh watches cannot make it
//!   open origin streams back to back.
//! - A process that calls itself `relay-2` in gossip but holds another member's certificate
//!   never takes relay-2's ring slot: no key moves and clients see only the real origin.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{OriginProcess, RelayProcess, SOON, eventually, tempdir};
use envoy_types::pb::envoy::config::core::v3::Node;
use prost::Message as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
    KeyUsagePurpose as Ku, SanType,
};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Identity};
use xds_relay::peer::identity::{MemberVerifier, member_uri};
use xds_relay::peer::proto::peer_client::PeerClient;
use xds_relay::peer::proto::{CanaryAnswer, CanaryReport, Interest, StatusRequest, WatchRequest};
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

const CLUSTER_ID: &str = "peer-test";

// === test PKI ===

struct Pki {
    dir: tempdir::Dir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and key written as PEM files.
#[derive(Clone)]
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Self {
        let dir = tempdir::Dir::new(tag);
        let ca = ca(&format!("{tag} ca"));
        std::fs::write(dir.0.join("ca.pem"), ca.pem()).unwrap();
        Self { dir, ca }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.0.join("ca.pem")
    }

    /// A leaf with `uris` as SAN URIs (plus 127.0.0.1), signed by this CA.
    fn issue(&self, stem: &str, uris: &[String]) -> Pem {
        issue(&self.ca, &self.dir.0, stem, uris)
    }

    /// The peer certificate of member `node`.
    fn member(&self, node: &str) -> Pem {
        self.issue(node, &[member_uri(CLUSTER_ID, node)])
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.ca_file()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(roots)
    }
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn issue(ca: &CertifiedIssuer<'static, KeyPair>, dir: &Path, stem: &str, uris: &[String]) -> Pem {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, stem);
    params.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    params.subject_alt_names.extend(uris.iter().map(|u| SanType::URI(u.as_str().try_into().unwrap())));
    params.key_usages = vec![Ku::DigitalSignature];
    params.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
    let cert = params.signed_by(&key, ca).unwrap();
    let pem = Pem { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) };
    std::fs::write(&pem.cert, cert.pem()).unwrap();
    std::fs::write(&pem.key, key.serialize_pem()).unwrap();
    pem
}

// === cluster ===

/// The bootstrap of a relay of the secure test cluster.
fn secure_bootstrap(
    origin: SocketAddr,
    name: &str,
    ip: &str,
    gossip_port: u16,
    seeds: &[String],
    pki: &Pki,
    pem: &Pem,
) -> String {
    let bootstrap = support::cluster_bootstrap(origin, name, ip, gossip_port, seeds);
    let keys = support::gossip_keys_file(pki.ca_file().parent().expect("the PKI directory"));
    let tls = format!(
        "  cluster_id: {CLUSTER_ID}\n  tls: {{ ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\" }}\n  gossip_keys_file: \"{}\"\n",
        pki.ca_file().display(),
        pem.cert.display(),
        pem.key.display(),
        keys.display()
    );
    assert!(bootstrap.contains("  insecure: true\n"));
    bootstrap.replace("  insecure: true\n", &tls)
}

struct Cluster {
    pki: Pki,
    origin: OriginProcess,
    relays: Vec<RelayProcess>,
    bootstraps: Vec<String>,
    seeds: Vec<String>,
}

impl Cluster {
    /// Three relays `relay-1..3` on `127.0.0.<first_ip>..` in front of one origin.
    fn start(tag: &str, first_ip: u8) -> Self {
        let pki = Pki::new(tag);
        let origin = OriginProcess::start(&["--listeners", "10", "--clusters", "3"]);
        let gossip: Vec<(String, u16)> = (0..3)
            .map(|i| {
                let ip = format!("127.0.0.{}", first_ip + i);
                let port = support::free_udp_port(&ip);
                (ip, port)
            })
            .collect();
        let seeds: Vec<String> = gossip.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
        let bootstraps: Vec<String> = gossip
            .iter()
            .enumerate()
            .map(|(i, (ip, port))| {
                let name = format!("relay-{}", i + 1);
                let pem = pki.member(&name);
                secure_bootstrap(origin.xds, &name, ip, *port, &seeds, &pki, &pem)
            })
            .collect();
        let relays = bootstraps.iter().map(|b| RelayProcess::start(b)).collect();
        Self { pki, origin, relays, bootstraps, seeds }
    }

    /// Waits until every relay has the three members verified and on its ring.
    async fn converge(&self) {
        for relay in &self.relays {
            eventually("three verified members on every ring", SOON, || {
                let view = relay.admin_json("/api/cluster");
                let members = view["members"].as_array()?;
                let ready = members
                    .iter()
                    .filter(|m| m["alive"] == true && m["state"] == "ready" && m["verified"] == true)
                    .count();
                (ready == 3 && ring_owners(&view).len() == 3).then_some(())
            })
            .await;
        }
    }

    /// The peer address of `name` as relay-1 sees it.
    fn peer_addr(&self, name: &str) -> SocketAddr {
        let view = self.relays[0].admin_json("/api/cluster");
        let member = view["members"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap().clone();
        member["peer_addr"].as_str().unwrap().parse().unwrap()
    }
}

/// The distinct owners of the ring tokens in an `/api/cluster` answer.
fn ring_owners(view: &Value) -> std::collections::BTreeSet<String> {
    view["ring"]["tokens"]
        .as_array()
        .map(|tokens| tokens.iter().filter_map(|t| t["owner"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The value of the metric line starting with `series` (name and labels) at `relay`, 0 when absent.
fn metric(relay: &RelayProcess, series: &str) -> f64 {
    let text = relay.admin_get("/metrics").expect("metrics");
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn rejected(relay: &RelayProcess, reason: &str) -> f64 {
    metric(relay, &format!("xds_relay_peer_rejected_total{{reason=\"{reason}\"}}"))
}

/// Resident memory of `relay`, in bytes.
fn rss(relay: &RelayProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.process.child.id())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

// === callers ===

/// A peer client to `member` at `addr` over TLS, checking the server names `member`, and
/// presenting `identity` (none: no client certificate).
fn peer_client(pki: &Pki, addr: SocketAddr, member: &str, identity: Option<&Pem>) -> PeerClient<Channel> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut tls = ClientTlsConfig::new();
    if let Some(pem) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(&pem.cert).unwrap(), std::fs::read(&pem.key).unwrap()));
    }
    let verifier = Arc::new(MemberVerifier::new(pki.roots(), CLUSTER_ID, member));
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config_with_verifier(tls, verifier)
        .unwrap()
        .connect_lazy();
    PeerClient::new(channel).max_encoding_message_size(64 * 1024 * 1024)
}

fn staging_node() -> Vec<u8> {
    Node { id: "envoy-1".into(), cluster: "staging".into(), ..Node::default() }.encode_to_vec()
}

fn watch(key: &str, type_url: &str, follower: &str, names: &[&str], fresh: bool) -> WatchRequest {
    WatchRequest {
        key: key.into(),
        type_url: type_url.into(),
        node: staging_node(),
        interest: Some(Interest {
            wildcard: names.is_empty(),
            names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        }),
        follower: follower.into(),
        fresh,
        canary_report: None,
    }
}

/// Opens a watch with one first request; the status when refused.
async fn open_watch(client: &mut PeerClient<Channel>, request: WatchRequest) -> Result<(), tonic::Status> {
    let stream = tokio_stream::iter([request]).chain(tokio_stream::pending());
    tokio::time::timeout(SOON, client.watch(stream)).await.expect("the watch is answered").map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_get_keys_and_only_what_an_owner_may_give() {
    let cluster = Cluster::start("peer-callers", 2);
    cluster.converge().await;
    let pki = &cluster.pki;
    let relay2 = &cluster.relays[1];
    let addr2 = cluster.peer_addr("relay-2");
    // A client so that there is something to list.
    let envoy = SotwClient::connect(&relay2.endpoint(), Transport::Ads, node("envoy-1", "staging")).await.unwrap();
    envoy.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    envoy.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();

    // A member's certificate lists the keys (the positive control).
    let relay1_pem = pki.member("relay-1");
    let reply = peer_client(pki, addr2, "relay-2", Some(&relay1_pem)).status(StatusRequest {}).await.unwrap();
    assert!(reply.into_inner().keys.iter().any(|k| k.key == "staging_cds"));

    // (a) No client certificate: the handshake is refused, nothing is listed.
    let handshake_failures = || metric(relay2, "xds_relay_tls_handshake_failures_total{listener=\"peer\"}");
    let before = handshake_failures();
    let refused = peer_client(pki, addr2, "relay-2", None).status(StatusRequest {}).await.unwrap_err();
    println!("no certificate: {refused:?}");
    let refused =
        open_watch(&mut peer_client(pki, addr2, "relay-2", None), watch("staging_cds", xds::CLUSTER, "x", &[], false))
            .await
            .unwrap_err();
    println!("no certificate, watch: {refused:?}");
    eventually("handshakes without a certificate counted", SOON, || {
        (handshake_failures() >= before + 2.0).then_some(())
    })
    .await;

    // (b) A certificate of another CA naming a member: refused by the handshake.
    let stranger_ca = ca("stranger ca");
    let foreign = issue(&stranger_ca, &pki.dir.0, "foreign-relay-1", &[member_uri(CLUSTER_ID, "relay-1")]);
    let refused = peer_client(pki, addr2, "relay-2", Some(&foreign)).status(StatusRequest {}).await.unwrap_err();
    println!("foreign CA: {refused:?}");
    eventually("the foreign handshake counted", SOON, || (handshake_failures() >= before + 3.0).then_some(())).await;

    // (c) Certificates of the cluster CA that name no member, or a node that is not a member.
    let before = rejected(relay2, "bad_certificate");
    let workload = pki.issue("workload", &[format!("spiffe://{CLUSTER_ID}/ns/default/sa/envoy")]);
    let refused = peer_client(pki, addr2, "relay-2", Some(&workload)).status(StatusRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(rejected(relay2, "bad_certificate") > before);

    let before = rejected(relay2, "not_a_member");
    let relay9 = pki.member("relay-9");
    let refused = peer_client(pki, addr2, "relay-2", Some(&relay9)).status(StatusRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("relay-9"), "{refused:?}");
    let refused = open_watch(
        &mut peer_client(pki, addr2, "relay-2", Some(&relay9)),
        watch("staging_cds", xds::CLUSTER, "relay-9", &[], false),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(rejected(relay2, "not_a_member") >= before + 2.0);

    // A member may not follow under another member's name.
    let before = rejected(relay2, "follower_mismatch");
    let refused = open_watch(
        &mut peer_client(pki, addr2, "relay-2", Some(&relay1_pem)),
        watch("staging_cds", xds::CLUSTER, "relay-3", &[], false),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(rejected(relay2, "follower_mismatch") > before);

    // (d) Keys this node does not own are refused; the owner accepts.
    let mut owner = None;
    for (i, relay) in cluster.relays.iter().enumerate() {
        let name = format!("relay-{}", i + 1);
        let mut client = peer_client(pki, cluster.peer_addr(&name), &name, Some(&relay1_pem));
        let before = rejected(relay, "not_owner");
        match open_watch(&mut client, watch("staging_lds", xds::LISTENER, "relay-1", &[], false)).await {
            Ok(()) => {
                assert!(owner.is_none(), "two owners of staging_lds");
                owner = Some(i);
            }
            Err(refused) => {
                assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
                assert!(refused.message().contains("does not own key staging_lds"), "{refused:?}");
                assert!(rejected(relay, "not_owner") > before);
            }
        }
    }
    let owner = owner.expect("one node owns staging_lds");
    let owner_relay = &cluster.relays[owner];
    let owner_name = format!("relay-{}", owner + 1);
    let owner_addr = cluster.peer_addr(&owner_name);
    let mut client = peer_client(pki, owner_addr, &owner_name, Some(&relay1_pem));

    // A type that contradicts the key: the rules map an EDS watch of this node elsewhere.
    let before = rejected(owner_relay, "key_mismatch");
    let refused =
        open_watch(&mut client, watch("staging_lds", xds::ENDPOINT, "relay-1", &["c1"], false)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("map to staging_eds"), "{refused:?}");
    assert!(rejected(owner_relay, "key_mismatch") > before);

    // A 5 MB request: refused at the decoding limit, memory stays put.
    let rss_before = rss(owner_relay);
    let before = rejected(owner_relay, "too_large");
    let mut huge = watch("staging_lds", xds::LISTENER, "relay-1", &[], false);
    huge.node = Node { id: "x".repeat(5 * 1024 * 1024), cluster: "staging".into(), ..Node::default() }.encode_to_vec();
    let refused = open_watch(&mut client, huge).await.unwrap_err();
    println!("5 MB request: {refused:?}");
    eventually("the too-large request to be counted", SOON, || {
        (rejected(owner_relay, "too_large") > before).then_some(())
    })
    .await;
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    let rss_after = rss(owner_relay);
    assert!(rss_after < rss_before + 64 * 1024 * 1024, "rss grew from {rss_before} to {rss_after}");

    // (e) Fresh watches share origin streams: 50 of them open a bounded number.
    let streams_before = cluster.origin.stats()["streams_total"].as_u64().unwrap();
    for _ in 0..50 {
        open_watch(&mut client, watch("staging_lds", xds::LISTENER, "relay-1", &[], true)).await.unwrap();
    }
    // The first fresh watch replaces the origin stream at once; later ones share one more
    // replacement (at most one per 2 s).
    let opened = eventually("a fresh watch to refetch from the origin", SOON, || {
        let opened = cluster.origin.stats()["streams_total"].as_u64()? - streams_before;
        (opened >= 1).then_some(opened)
    })
    .await;
    println!("50 fresh watches opened {opened} origin streams");
    assert!(opened <= 4, "50 fresh watches opened {opened} origin streams");

    // (f) Canary reports the owner cannot count: on a key without staged rollout, with counts
    // that contradict each other, or over the bound of listed answers. Each is dropped,
    // logged and counted; the follower's stream goes on.
    let before = rejected(owner_relay, "bad_canary_report");
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    requests.send(watch("staging_lds", xds::LISTENER, "relay-1", &[], false)).await.unwrap();
    let mut updates = client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tokio::time::timeout(SOON, updates.message()).await.expect("the key's state").unwrap().expect("an update");
    let answer = CanaryAnswer { node_id: "envoy-1".into(), answer: 2, nack_message: String::new() };
    let reports = [
        CanaryReport { generation: 1, clients: 1, canaries: 1, acked: 5, ..Default::default() },
        CanaryReport {
            generation: 1,
            clients: 1000,
            canaries: 1000,
            answers: vec![answer; 1000],
            ..Default::default()
        },
    ];
    for report in reports {
        requests.send(WatchRequest { canary_report: Some(report), ..Default::default() }).await.unwrap();
    }
    eventually("both reports dropped and counted", SOON, || {
        (rejected(owner_relay, "bad_canary_report") >= before + 2.0).then_some(())
    })
    .await;
    for reason in ["inconsistent counts: 5 ACKs", "1000 answers listed, at most 256"] {
        assert!(owner_relay.process.printed(&["canary report dropped", reason]), "the log says why: {reason}");
    }
    let view = owner_relay.admin_json("/api/cluster/local");
    let key = view["keys"].as_array().unwrap().iter().find(|k| k["key"] == "staging_lds").unwrap().clone();
    assert!(key["followers"].as_array().unwrap().iter().any(|f| f == "relay-1"), "the stream goes on: {key}");
    assert!(envoy.ended().is_none(), "the real client was disconnected: {:?}", envoy.ended());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_never_takes_a_members_ring_slot() {
    let cluster = Cluster::start("peer-impostor", 12);
    cluster.converge().await;
    // Clients of several keys on every node.
    let mut clients = Vec::new();
    for route in 0..9 {
        let relay = &cluster.relays[route % 3];
        let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node(&format!("envoy-{route}"), "staging"))
            .await
            .unwrap();
        c.subscribe(xds::ROUTE, vec![format!("route_{route}")]).await.unwrap();
        clients.push(c);
    }
    for c in &clients {
        c.wait_for(xds::ROUTE, SOON, |r| !r.resources.is_empty()).await.unwrap();
    }
    let relay2_generation = |relay: &RelayProcess| {
        let view = relay.admin_json("/api/cluster");
        view["members"].as_array().unwrap().iter().find(|m| m["name"] == "relay-2").unwrap()["generation"]
            .as_u64()
            .unwrap()
    };
    let real_generation = relay2_generation(&cluster.relays[0]);
    let ring_changes: Vec<f64> = cluster.relays.iter().map(|r| metric(r, "xds_relay_ring_changes_total")).collect();
    let failed_before: Vec<f64> =
        cluster.relays.iter().map(|r| metric(r, "xds_relay_member_verifications_total{result=\"failed\"}")).collect();

    // The impostor: named relay-2 in gossip (a newer generation), holding relay-4's certificate,
    // in front of its own origin.
    let rogue_origin = OriginProcess::start(&["--listeners", "10", "--clusters", "3"]);
    let ip = "127.0.0.15";
    let port = support::free_udp_port(ip);
    let relay4 = cluster.pki.member("relay-4");
    let rogue = RelayProcess::start(&secure_bootstrap(
        rogue_origin.xds,
        "relay-2",
        ip,
        port,
        &cluster.seeds,
        &cluster.pki,
        &relay4,
    ));
    // A node started with another member's certificate says so at start.
    eventually("the impostor to log that its certificate names relay-4", SOON, || {
        rogue.process.printed(&["names another member", "relay-4"]).then_some(())
    })
    .await;

    for (i, relay) in cluster.relays.iter().enumerate() {
        eventually("the impostor listed as unverified", SOON, || {
            let view = relay.admin_json("/api/cluster");
            let listed = view["unverified"].as_array()?.iter().any(|m| m["name"] == "relay-2" && m["alive"] == true);
            let failed = metric(relay, "xds_relay_member_verifications_total{result=\"failed\"}") > failed_before[i];
            (listed && failed && metric(relay, "xds_relay_members_unverified") >= 1.0).then_some(())
        })
        .await;
    }
    // The impostor's own peer calls are refused: its certificate names no live member.
    let not_a_member: f64 = cluster.relays.iter().map(|r| rejected(r, "not_a_member")).sum();
    let view = rogue.admin_json("/api/cluster");
    let errors = view["errors"].to_string();
    assert!(errors.contains("relay-4 is not a live member"), "{errors}");
    assert!(cluster.relays.iter().map(|r| rejected(r, "not_a_member")).sum::<f64>() > not_a_member);

    // Some gossip rounds later (every relay took in 20 more datagrams), nothing moved.
    let gossip_in = |r: &RelayProcess| metric(r, "xds_relay_gossip_datagrams_total{direction=\"in\"}");
    let gossip_before: Vec<f64> = cluster.relays.iter().map(gossip_in).collect();
    eventually("some gossip rounds", SOON, || {
        cluster.relays.iter().zip(&gossip_before).all(|(r, before)| gossip_in(r) >= before + 20.0).then_some(())
    })
    .await;
    for (i, relay) in cluster.relays.iter().enumerate() {
        let view = relay.admin_json("/api/cluster");
        let owners: Vec<String> = ring_owners(&view).into_iter().collect();
        assert_eq!(owners, ["relay-1", "relay-2", "relay-3"], "relay-{}'s ring", i + 1);
        assert_eq!(relay2_generation(relay), real_generation, "relay-{} kept the real relay-2", i + 1);
        assert_eq!(metric(relay, "xds_relay_ring_changes_total"), ring_changes[i], "relay-{}'s ring changed", i + 1);
    }

    // Clients follow the real origin only.
    let version = cluster.origin.publish();
    for c in &clients {
        c.wait_for(xds::ROUTE, SOON, |r| r.version_info == version).await.unwrap();
        assert!(c.ended().is_none(), "a client was disconnected: {:?}", c.ended());
    }
    assert_eq!(rogue_origin.stats()["streams_total"].as_u64(), Some(0), "the impostor's origin was used");

    // The real relay-2 restarts (a newer generation than the impostor's): it is verified and
    // takes its slot back; the impostor stays aside.
    let mut cluster = cluster;
    cluster.relays[1].process.kill();
    cluster.relays[1] = RelayProcess::start(&cluster.bootstraps[1]);
    for i in [0, 2] {
        let relay = &cluster.relays[i];
        eventually("the restarted relay-2 verified and on the ring", SOON, || {
            let view = relay.admin_json("/api/cluster");
            let relay2 = view["members"].as_array()?.iter().find(|m| m["name"] == "relay-2")?.clone();
            let restarted = relay2["generation"].as_u64()? > real_generation
                && relay2["verified"] == true
                && relay2["alive"] == true
                && relay2["peer_addr"] != Value::Null;
            let impostor_aside = view["unverified"].as_array()?.iter().any(|m| m["name"] == "relay-2");
            (restarted && impostor_aside && ring_owners(&view).len() == 3).then_some(())
        })
        .await;
    }
    drop(rogue);
}
