//! Key and certificate rotation under load, with real processes: three relays on 127.0.0.x
//! with cluster mTLS (SAN URI `spiffe://rotation-test/relay/<name>`), server mTLS for their
//! xDS clients and sealed gossip, in front of the example management server, which publishes
//! a new version every second while thirty SotW and delta ADS clients (CDS + EDS) watch keys
//! owned by every relay, so the peer streams carry updates.
//!
//! While the clients watch:
//! 1. the gossip key is rotated in the three documented steps (install, switch, remove), each
//!    file written on every node and reloaded everywhere before the next step;
//! 2. the server and cluster certificates of every relay are replaced by new leaves of the
//!    same CA, then the CA rolls over (a bundle of both CAs first, then leaves of the new CA);
//!    files are replaced as an operator's tool does (write a temporary file, rename).
//!
//! Throughout, a sampler reads every relay's `/api/cluster` five times a second and records
//! any moment where a relay does not see all three members alive, ready and verified on its
//! ring. At the end: no client stream ended, every client got the last version, the ring never
//! changed, no gossip datagram was rejected for its key or seal, and the origin holds one
//! stream per key. Finally a fourth relay holding only the new gossip key, a certificate of the
//! new CA and trusting only the new CA joins: the three rotated relays must present and accept
//! the new material on fresh peer connections (nothing was restarted).

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use crate::support::{OriginProcess, RelayProcess, SOON, eventually, tempdir};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
    KeyUsagePurpose as Ku, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use xds_relay::peer::identity::{MemberVerifier, member_uri};
use xds_relay::peer::proto::StatusRequest;
use xds_relay::peer::proto::peer_client::PeerClient;
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};
use xds_relay_example::delta_client::DeltaClient;

const CLUSTER_ID: &str = "rotation-test";
/// The gossip key the cluster starts with, and the one it rotates to (base64 of 32 bytes).
const OLD_KEY: &str = "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=";
const NEW_KEY: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
/// Relay `i` (from 0) listens on `127.0.0.{FIRST_IP + i}`.
const FIRST_IP: u8 = 61;
/// Node clusters `team<t>-<i>`: the rules key them `team<t>_cds` and `team<t>_eds`.
const TEAMS: usize = 6;
const CLIENTS: usize = 30;
/// How long a rotation step may take to be picked up (files are polled every 5 s).
const RELOAD: Duration = Duration::from_secs(30);
/// Time between the relays' starts, spreading their file polls over the 5 s interval.
const PHASE: Duration = Duration::from_millis(1600);

// === test PKI ===

/// A certificate and key file pair.
#[derive(Clone)]
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
        Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes `<stem>.key` then `<stem>.pem` in `dir`, each replaced atomically: a leaf named
    /// `cn` with `sans`, for server and client use.
    fn issue(&self, dir: &Path, stem: &str, cn: &str, sans: Vec<SanType>) -> Pem {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.key_usages = vec![Ku::DigitalSignature];
        params.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pem = Pem { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) };
        write_atomically(&pem.key, &key.serialize_pem());
        write_atomically(&pem.cert, &cert.pem());
        pem
    }
}

/// Replaces `path` by `text` as rotation tools do: a temporary file renamed over it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn roots(pems: &[&str]) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    Arc::new(roots)
}

// === one relay's files ===

/// The files of relay `name`: what it serves xDS with, what it proves itself to peers with,
/// the CAs it trusts (clients and peers), and its gossip keys.
struct NodeFiles {
    name: String,
    ip: String,
    dir: PathBuf,
    server: Pem,
    cluster: Pem,
    ca: PathBuf,
    keys: PathBuf,
}

impl NodeFiles {
    fn new(root: &Path, name: &str, ip: &str, ca: &Ca, trusted: &str, keys: &[&str]) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        write_atomically(&ca_file, trusted);
        let mut files = Self {
            name: name.to_owned(),
            ip: ip.to_owned(),
            server: Pem { cert: PathBuf::new(), key: PathBuf::new() },
            cluster: Pem { cert: PathBuf::new(), key: PathBuf::new() },
            ca: ca_file,
            keys: dir.join("gossip.keys"),
            dir,
        };
        files.issue(ca, "r0");
        files.write_keys(keys);
        files
    }

    /// New server and cluster leaves from `ca`, their common names ending in `-<suffix>`.
    fn issue(&mut self, ca: &Ca, suffix: &str) {
        let ip = SanType::IpAddress(self.ip.parse().unwrap());
        self.server = ca.issue(
            &self.dir,
            "server",
            &format!("{}-xds-{suffix}", self.name),
            vec![SanType::DnsName("localhost".try_into().unwrap()), ip.clone()],
        );
        self.cluster = ca.issue(
            &self.dir,
            "cluster",
            &format!("{}-peer-{suffix}", self.name),
            vec![ip, SanType::URI(member_uri(CLUSTER_ID, &self.name).try_into().unwrap())],
        );
    }

    fn trust(&self, pem: &str) {
        write_atomically(&self.ca, pem);
    }

    fn write_keys(&self, keys: &[&str]) {
        write_atomically(&self.keys, &format!("# gossip keys: the first seals, all open\n{}\n", keys.join("\n")));
    }

    fn bootstrap(&self, origin: SocketAddr, gossip_port: u16, seeds: &[String]) -> String {
        let bootstrap = support::cluster_bootstrap(origin, &self.name, &self.ip, gossip_port, seeds);
        let server = format!(
            "server:\n  tls:\n    cert_file: \"{}\"\n    key_file: \"{}\"\n    client_ca_file: \"{}\"\n",
            self.server.cert.display(),
            self.server.key.display(),
            self.ca.display()
        );
        let cluster = format!(
            "  cluster_id: {CLUSTER_ID}\n  tls: {{ ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\" }}\n  gossip_keys_file: \"{}\"\n",
            self.ca.display(),
            self.cluster.cert.display(),
            self.cluster.key.display(),
            self.keys.display()
        );
        assert!(bootstrap.starts_with("server:\n") && bootstrap.contains("  insecure: true\n"));
        bootstrap.replacen("server:\n", &server, 1).replace("  insecure: true\n", &cluster)
    }
}

// === observing relays ===

/// The value of the series `series` (name and labels) in `/metrics` of `relay`; 0 when absent.
fn metric(relay: &RelayProcess, series: &str) -> f64 {
    let text = relay.admin_get("/metrics").expect("metrics");
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

fn gossip_rejected(relay: &RelayProcess, reason: &str) -> f64 {
    metric(relay, &format!("xds_relay_gossip_rejected_total{{reason=\"{reason}\"}}"))
}

fn gossip_in(relay: &RelayProcess) -> f64 {
    metric(relay, "xds_relay_gossip_datagrams_total{direction=\"in\"}")
}

/// Lines `relay` printed that contain every one of `parts`.
fn printed(relay: &RelayProcess, parts: &[&str]) -> Vec<String> {
    let output = relay.process.output.lock().unwrap();
    output.iter().filter(|l| parts.iter().all(|p| l.contains(p))).cloned().collect()
}

/// The time of day (`HH:MM:SS.mmm`) a relay log line was written at.
fn log_time(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.split_once('T').map(|(_, t)| t.chars().take(12).collect()))
        .unwrap_or_default()
}

/// The certificate reloads `relay` logged, per TLS configuration.
fn tls_reloads(relay: &RelayProcess) -> [usize; 3] {
    ["xds", "peer", "peer_client"]
        .map(|config| printed(relay, &["reloaded TLS certificates", &format!("config=\"{config}\"")]).len())
}

/// Names of the members `view` lists alive, ready and verified, and the ring's owners.
fn healthy(view: &Value) -> (Vec<String>, Vec<String>) {
    let mut members: Vec<String> = view["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter(|m| m["alive"] == true && m["state"] == "ready" && m["verified"] == true)
                .filter_map(|m| m["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    members.sort();
    let mut owners: Vec<String> = view["ring"]["tokens"]
        .as_array()
        .map(|ts| ts.iter().filter_map(|t| t["owner"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    owners.sort();
    owners.dedup();
    (members, owners)
}

/// What the membership sampler saw.
#[derive(Default)]
struct Samples {
    /// Successful reads per relay.
    reads: Vec<usize>,
    /// Every read where a relay saw fewer than all members healthy or on its ring.
    gaps: Vec<String>,
    /// Peer `Status` errors listed by `/api/cluster`, other than a slow answer.
    peer_errors: Vec<String>,
    /// Slow peer answers and unreachable admin endpoints (load, not membership).
    slow: usize,
}

/// Reads every relay's `/api/cluster` every 200 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Samples>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(admins: Vec<(String, SocketAddr)>, expected: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples { reads: vec![0; admins.len()], ..Samples::default() }));
        let started = Instant::now();
        let thread = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (i, (name, admin)) in admins.iter().enumerate() {
                        let at = started.elapsed();
                        let read = support::http_get(*admin, "/api/cluster")
                            .map_err(|e| e.to_string())
                            .and_then(|body| serde_json::from_str::<Value>(&body).map_err(|e| e.to_string()));
                        let mut samples = samples.lock().unwrap();
                        let view = match read {
                            Ok(view) => view,
                            Err(error) => {
                                println!("sampler: {name}'s /api/cluster unreadable at {at:?}: {error}");
                                samples.slow += 1;
                                continue;
                            }
                        };
                        samples.reads[i] += 1;
                        let (members, owners) = healthy(&view);
                        if members != expected || owners != expected {
                            samples.gaps.push(format!("{at:?}: {name} sees members {members:?}, ring {owners:?}"));
                        }
                        for error in view["errors"].as_array().into_iter().flatten() {
                            let error = error.as_str().unwrap_or_default().to_owned();
                            if error.contains("no answer within") {
                                samples.slow += 1;
                            } else {
                                samples.peer_errors.push(format!("{at:?}: {name}: {error}"));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        Self { stop, samples, thread: Some(thread) }
    }

    fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.samples.lock().unwrap())
    }
}

/// Publishes a new snapshot at the origin every second until stopped.
struct Publisher {
    stop: Arc<AtomicBool>,
    count: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    fn start(stats: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(Mutex::new(0));
        let thread = {
            let (stop, count) = (stop.clone(), count.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    support::http_post(stats, "/publish").expect("publish");
                    *count.lock().unwrap() += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        };
        Self { stop, count, thread: Some(thread) }
    }

    /// Stops publishing; returns how many versions were published.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        *self.count.lock().unwrap()
    }
}

// === clients ===

enum Client {
    Sotw(SotwClient),
    Delta(DeltaClient),
}

impl Client {
    fn ended(&self) -> Option<String> {
        match self {
            Client::Sotw(c) => c.ended().map(|e| e.to_string()),
            Client::Delta(c) => c.ended().map(|e| e.to_string()),
        }
    }

    async fn wait_configured(&self) {
        match self {
            Client::Sotw(c) => {
                c.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
                c.wait_for(xds::ENDPOINT, SOON, |r| !r.resources.is_empty()).await.unwrap();
            }
            Client::Delta(c) => {
                c.wait_for_state(xds::CLUSTER, SOON, |s| !s.is_empty()).await.unwrap();
                c.wait_for_state(xds::ENDPOINT, SOON, |s| !s.is_empty()).await.unwrap();
            }
        }
    }

    /// Waits for `version` on the clusters and endpoints (delta: the endpoints, whose content
    /// carries the version; unchanged clusters are not resent).
    async fn wait_version(&self, version: &str) -> anyhow::Result<()> {
        match self {
            Client::Sotw(c) => {
                c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await?;
                c.wait_for(xds::ENDPOINT, SOON, |r| r.version_info == version).await?;
            }
            Client::Delta(c) => {
                c.wait_for(xds::ENDPOINT, SOON, |r| r.system_version_info == version).await?;
            }
        }
        Ok(())
    }
}

/// An mTLS channel to an xDS listener, verifying `localhost` against `ca`.
async fn xds_channel(addr: SocketAddr, ca: &str, identity: &Pem) -> anyhow::Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(std::fs::read(&identity.cert)?, std::fs::read(&identity.key)?))
        .domain_name("localhost");
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Client `i`: on relay `i % 3`, team `(i / 3) % TEAMS` (every team on every relay); every
/// fifth one delta, the others SotW; all ADS with CDS and EDS.
async fn start_client(i: usize, relay: &RelayProcess, ca: &str, identity: &Pem) -> Client {
    let team = (i / 3) % TEAMS;
    let node = node(&format!("envoy-{i}"), &format!("team{team}-{i}"));
    let channel = xds_channel(relay.xds, ca, identity).await.expect("client channel");
    let eds = vec![format!("cluster_{}", i % 3)];
    if i % 5 == 4 {
        let c = DeltaClient::with_channel(channel, Transport::Ads, node);
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        c.subscribe(xds::ENDPOINT, eds).await.unwrap();
        Client::Delta(c)
    } else {
        let c = SotwClient::with_channel(channel, Transport::Ads, node);
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        c.subscribe(xds::ENDPOINT, eds).await.unwrap();
        Client::Sotw(c)
    }
}

// === reading served certificates ===

/// Subject and issuer common names of the leaf certificate the TLS listener at `addr` serves
/// to a new connection presenting `identity` and checked by `verifier`.
async fn served_leaf(addr: SocketAddr, verifier: Arc<dyn ServerCertVerifier>, identity: &Pem) -> (String, String) {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&identity.cert).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(&identity.key).unwrap();
    let mut config = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    let der = tls.get_ref().1.peer_certificates().expect("a server certificate")[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    let cn = |name: &x509_parser::x509::X509Name<'_>| {
        name.iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_owned()
    };
    (cn(cert.subject()), cn(cert.issuer()))
}

fn xds_verifier(trusted: &[&str]) -> Arc<dyn ServerCertVerifier> {
    WebPkiServerVerifier::builder(roots(trusted)).build().unwrap()
}

fn member_verifier(trusted: &[&str], member: &str) -> Arc<dyn ServerCertVerifier> {
    Arc::new(MemberVerifier::new(roots(trusted), CLUSTER_ID, member))
}

/// A `Status` call to member `member`'s peer listener at `addr` over a new mTLS connection,
/// presenting `identity` (another member's certificate) and trusting only `trusted`.
async fn peer_status(addr: SocketAddr, member: &str, trusted: &[&str], identity: &Pem) -> Result<(), tonic::Status> {
    let tls = ClientTlsConfig::new()
        .identity(Identity::from_pem(std::fs::read(&identity.cert).unwrap(), std::fs::read(&identity.key).unwrap()));
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config_with_verifier(tls, member_verifier(trusted, member))
        .unwrap()
        .connect_lazy();
    tokio::time::timeout(SOON, PeerClient::new(channel).status(StatusRequest {}))
        .await
        .expect("the peer answers")
        .map(drop)
}

// === the cluster ===

struct Cluster {
    dir: tempdir::Dir,
    origin: OriginProcess,
    files: Vec<NodeFiles>,
    relays: Vec<RelayProcess>,
    seeds: Vec<String>,
    started: Instant,
}

impl Cluster {
    fn log(&self, what: &str) {
        println!("[{:>6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn peer_addr(&self, name: &str) -> SocketAddr {
        let view = self.relays[0].admin_json("/api/cluster");
        let member = view["members"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap().clone();
        member["peer_addr"].as_str().unwrap().parse().unwrap()
    }

    /// Waits until every relay logged one more gossip key reload than `before`, with `keys`
    /// as its keys in order, then until each has taken in gossip rounds under them.
    /// Returns when each relay reloaded (the time of its log line).
    async fn gossip_keys_reloaded(&self, before: &[usize], keys: usize) -> Vec<String> {
        let mut at = Vec::new();
        for (relay, before) in self.relays.iter().zip(before) {
            let line = eventually("the gossip key file reloaded", RELOAD, || {
                let lines = printed(relay, &["gossip keys reloaded"]);
                let last = lines.get(*before)?;
                assert!(last.contains(&format!("keys={keys}")), "{last}");
                Some(last.clone())
            })
            .await;
            at.push(log_time(&line));
        }
        let rounds: Vec<f64> = self.relays.iter().map(gossip_in).collect();
        for (relay, rounds) in self.relays.iter().zip(rounds) {
            eventually("gossip rounds under the new keys", SOON, || (gossip_in(relay) >= rounds + 30.0).then_some(()))
                .await;
        }
        at
    }

    fn key_reloads(&self) -> Vec<usize> {
        self.relays.iter().map(|r| printed(r, &["gossip keys reloaded"]).len()).collect()
    }

    fn assert_no_rejected_gossip(&self, step: &str) {
        for (relay, files) in self.relays.iter().zip(&self.files) {
            for reason in ["no_key", "bad_seal"] {
                assert_eq!(
                    gossip_rejected(relay, reason),
                    0.0,
                    "{}: gossip rejected for {reason} after {step}",
                    files.name
                );
            }
        }
    }

    /// Waits until every relay logged a reload of each of its three TLS configurations since
    /// `before`.
    async fn certificates_reloaded(&self, before: &[[usize; 3]]) {
        for (relay, before) in self.relays.iter().zip(before) {
            eventually("the certificates reloaded", RELOAD, || {
                let now = tls_reloads(relay);
                now.iter().zip(before).all(|(now, before)| now > before).then_some(())
            })
            .await;
        }
    }

    fn tls_reloads(&self) -> Vec<[usize; 3]> {
        self.relays.iter().map(tls_reloads).collect()
    }

    /// Checks that a new connection to every relay's xDS and peer listeners gets a leaf named
    /// `<relay>-{xds,peer}-<suffix>` issued by `issuer`, verified with `trusted` only, and that
    /// each peer listener serves a new connection presenting the next member's certificate.
    async fn assert_serving(&self, suffix: &str, issuer: &str, trusted: &[&str], client: &Pem) {
        for (i, files) in self.files.iter().enumerate() {
            let (cn, by) = served_leaf(self.relays[i].xds, xds_verifier(trusted), client).await;
            assert_eq!((cn.as_str(), by.as_str()), (format!("{}-xds-{suffix}", files.name).as_str(), issuer));
            let peer = self.peer_addr(&files.name);
            let next = &self.files[(i + 1) % self.files.len()];
            let (cn, by) = served_leaf(peer, member_verifier(trusted, &files.name), &next.cluster).await;
            assert_eq!((cn.as_str(), by.as_str()), (format!("{}-peer-{suffix}", files.name).as_str(), issuer));
            peer_status(peer, &files.name, trusted, &next.cluster)
                .await
                .unwrap_or_else(|e| panic!("{} refused {}'s new certificate: {e:?}", files.name, next.name));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_keys_and_certificates_rotate_under_load_without_disconnecting_anyone() {
    xds_relay::tls::install_crypto_provider();
    let started = Instant::now();
    let dir = tempdir::Dir::new("rotation");
    let old_ca = Ca::new("rotation CA 1");
    let old_pem = old_ca.pem();
    let origin = OriginProcess::start(&["--clusters", "3", "--listeners", "2"]);
    let gossip: Vec<(String, u16)> = (0..3)
        .map(|i| {
            let ip = format!("127.0.0.{}", FIRST_IP + i);
            let port = support::free_udp_port(&ip);
            (ip, port)
        })
        .collect();
    let seeds: Vec<String> = gossip.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
    let files: Vec<NodeFiles> = gossip
        .iter()
        .enumerate()
        .map(|(i, (ip, _))| NodeFiles::new(&dir.0, &format!("relay-{}", i + 1), ip, &old_ca, &old_pem, &[OLD_KEY]))
        .collect();
    // Relays poll their files every 5 s from their start: starting them PHASE apart makes
    // each rotation step reach them at different moments, as a rollout over a fleet does, so
    // every step has seconds where the nodes hold different keys and certificates.
    let mut relays: Vec<RelayProcess> = Vec::new();
    for (f, (_, port)) in files.iter().zip(&gossip) {
        if !relays.is_empty() {
            tokio::time::sleep(PHASE).await;
        }
        relays.push(RelayProcess::start(&f.bootstrap(origin.xds, *port, &seeds)));
    }
    let mut cluster = Cluster { dir, origin, files, relays, seeds, started };
    let names: Vec<String> = cluster.files.iter().map(|f| f.name.clone()).collect();
    for relay in &cluster.relays {
        eventually("three verified members on every ring", SOON, || {
            let (members, owners) = healthy(&relay.admin_json("/api/cluster"));
            (members == names && owners == names).then_some(())
        })
        .await;
    }
    cluster.log("cluster formed");

    // Thirty clients with certificates of the first CA, spread over the relays and teams.
    let client_pem = old_ca.issue(
        &cluster.dir.0,
        "client",
        "envoy-client",
        vec![SanType::DnsName("envoy-client".try_into().unwrap())],
    );
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(start_client(i, &cluster.relays[i % 3], &old_pem, &client_pem).await);
    }
    for client in &clients {
        client.wait_configured().await;
    }
    let keys = 2 * TEAMS;
    eventually("one origin stream per key", SOON, || {
        (cluster.origin.stats()["streams_open"].as_u64() == Some(keys as u64)).then_some(())
    })
    .await;
    // Keys are owned by every relay and followed over the peer protocol.
    let view = eventually("every key listed with its owner and followers", SOON, || {
        let view = cluster.relays[0].admin_json("/api/cluster");
        let listed = view["keys"].as_array()?;
        let followed = listed.iter().all(|k| k["followers"].as_array().is_some_and(|f| f.len() == 2));
        (listed.len() == keys && followed).then_some(view)
    })
    .await;
    let mut owners: Vec<&str> = view["keys"].as_array().unwrap().iter().filter_map(|k| k["owner"].as_str()).collect();
    owners.sort();
    owners.dedup();
    assert!(owners.len() >= 2, "the keys are owned by {owners:?} only");
    cluster.log(&format!("{CLIENTS} clients configured; {keys} keys owned by {owners:?}"));

    let ring_changes: Vec<f64> = cluster.relays.iter().map(|r| metric(r, "xds_relay_ring_changes_total")).collect();
    let origin_streams = cluster.origin.stats()["streams_total"].as_u64().unwrap();
    let sampler =
        Sampler::start(cluster.relays.iter().zip(&names).map(|(r, n)| (n.clone(), r.admin)).collect(), names.clone());
    let publisher = Publisher::start(cluster.origin.stats);

    // 1. Gossip key rotation: install, switch, remove, each on every node before the next.
    for (step, keys) in
        [("install", vec![OLD_KEY, NEW_KEY]), ("switch", vec![NEW_KEY, OLD_KEY]), ("remove", vec![NEW_KEY])]
    {
        let before = cluster.key_reloads();
        for files in &cluster.files {
            files.write_keys(&keys);
        }
        let at = cluster.gossip_keys_reloaded(&before, keys.len()).await;
        cluster.assert_no_rejected_gossip(step);
        cluster.log(&format!("gossip key {step}: reloaded at {at:?}"));
    }
    // The switch put the new key first on every node.
    for relay in &cluster.relays {
        let lines = printed(relay, &["gossip keys reloaded"]);
        let ids = |line: &str| {
            let at = line.find("key_ids=[").expect("key ids logged") + "key_ids=[".len();
            line[at..at + line[at..].find(']').unwrap()].split(", ").map(str::to_owned).collect::<Vec<_>>()
        };
        let [install, switch, remove] =
            [&lines[lines.len() - 3], &lines[lines.len() - 2], &lines[lines.len() - 1]].map(|l| ids(l));
        assert_eq!(remove.len(), 1, "{remove:?}");
        assert_eq!(install.len(), 2, "{install:?}");
        assert_eq!(switch, [remove[0].clone(), install[0].clone()], "the switch put the new key first");
    }

    // 2a. New leaves of the same CA for every relay's xDS and cluster certificates.
    let before = cluster.tls_reloads();
    for files in &mut cluster.files {
        files.issue(&old_ca, "r1");
    }
    cluster.certificates_reloaded(&before).await;
    cluster.assert_serving("r1", "rotation CA 1", &[&old_pem], &client_pem).await;
    cluster.log("new leaves of the same CA served");

    // 2b. CA rollover: every node trusts both CAs, then gets leaves of the new CA.
    let new_ca = Ca::new("rotation CA 2");
    let new_pem = new_ca.pem();
    let bundle = format!("{old_pem}{new_pem}");
    let before = cluster.tls_reloads();
    for files in &cluster.files {
        files.trust(&bundle);
    }
    cluster.certificates_reloaded(&before).await;
    cluster.log("both CAs trusted everywhere");
    let before = cluster.tls_reloads();
    for files in &mut cluster.files {
        files.issue(&new_ca, "r2");
    }
    cluster.certificates_reloaded(&before).await;
    // Verified against the new CA alone; clients of either CA are served.
    let new_client_pem = new_ca.issue(
        &cluster.dir.0,
        "client-2",
        "envoy-client-2",
        vec![SanType::DnsName("envoy-client-2".try_into().unwrap())],
    );
    cluster.assert_serving("r2", "rotation CA 2", &[&new_pem], &new_client_pem).await;
    for (i, identity) in [&client_pem, &new_client_pem].into_iter().enumerate() {
        let probe = start_client(100 + i, &cluster.relays[i], &new_pem, identity).await;
        probe.wait_configured().await;
    }
    cluster.log("leaves of the new CA served");

    // 3. Nobody was disconnected, the ring never changed, every client gets the last version.
    let published = publisher.finish();
    let last = cluster.origin.publish();
    let samples = sampler.finish();
    for (i, client) in clients.iter().enumerate() {
        client.wait_version(&last).await.unwrap_or_else(|e| panic!("client {i} missed version {last}: {e:#}"));
    }
    for (i, client) in clients.iter().enumerate() {
        assert_eq!(client.ended(), None, "client {i} was disconnected");
    }
    cluster.log(&format!(
        "{published} versions published during the rotations; every client reached {last}; samples per relay {:?}, slow {}",
        samples.reads, samples.slow
    ));
    assert!(samples.gaps.is_empty(), "membership gaps:\n{}", samples.gaps.join("\n"));
    assert!(samples.peer_errors.is_empty(), "peer errors:\n{}", samples.peer_errors.join("\n"));
    assert!(samples.reads.iter().all(|&n| n >= 20), "too few membership samples: {:?}", samples.reads);
    for ((relay, before), name) in cluster.relays.iter().zip(&ring_changes).zip(&names) {
        assert_eq!(metric(relay, "xds_relay_ring_changes_total"), *before, "{name}'s ring changed");
    }
    cluster.assert_no_rejected_gossip("the rotations");
    eventually("one origin stream per key", SOON, || {
        (cluster.origin.stats()["streams_open"].as_u64() == Some(keys as u64)).then_some(())
    })
    .await;
    println!(
        "origin streams opened during the rotations: {}",
        cluster.origin.stats()["streams_total"].as_u64().unwrap() - origin_streams
    );

    // 4. Only the new material left: a fourth relay with the new gossip key alone, a leaf of
    // the new CA, trusting the new CA alone, is verified by the three and verifies them.
    let ip = format!("127.0.0.{}", FIRST_IP + 3);
    let port = support::free_udp_port(&ip);
    let mut fourth = NodeFiles::new(&cluster.dir.0, "relay-4", &ip, &new_ca, &new_pem, &[NEW_KEY]);
    fourth.issue(&new_ca, "r2");
    let relay4 = RelayProcess::start(&fourth.bootstrap(cluster.origin.xds, port, &cluster.seeds));
    let mut four = names.clone();
    four.push("relay-4".to_owned());
    for relay in cluster.relays.iter().chain([&relay4]) {
        eventually("four verified members on every ring", SOON, || {
            let (members, owners) = healthy(&relay.admin_json("/api/cluster"));
            (members == four && owners == four).then_some(())
        })
        .await;
    }
    let last = cluster.origin.publish();
    for (i, client) in clients.iter().enumerate() {
        client.wait_version(&last).await.unwrap_or_else(|e| panic!("client {i} missed version {last}: {e:#}"));
        assert_eq!(client.ended(), None, "client {i} was disconnected");
    }
    // Keys moved to the fourth relay are followed by the three over new peer connections, and
    // the origin is back to one stream per key.
    eventually("the fourth relay's keys followed by the three", SOON, || {
        let view = cluster.relays[0].admin_json("/api/cluster");
        let moved: Vec<&Value> = view["keys"].as_array()?.iter().filter(|k| k["owner"] == "relay-4").collect();
        let followed = moved.iter().all(|k| k["followers"].as_array().is_some_and(|f| f.len() == 3));
        (!moved.is_empty() && followed).then_some(())
    })
    .await;
    eventually("one origin stream per key", SOON, || {
        (cluster.origin.stats()["streams_open"].as_u64() == Some(keys as u64)).then_some(())
    })
    .await;
    cluster.assert_no_rejected_gossip("the fourth relay joined");
    cluster.log("a relay with only the new key and CA joined");
}
