//! TLS for every link of the relay: the server side of the xDS, peer and admin listeners, and
//! the client side towards the origin and the other relays, with certificates reloaded from
//! their files while the node runs.
//!
//! - [`TlsAcceptor`] holds the current rustls [`ServerConfig`] of a listener; the listener's
//!   accept loop ([`crate::listener::accept_tls`]) runs each handshake with it.
//! - [`ClientTls`] holds the current rustls client material; [`ClientTls::connector`] gives a
//!   [`TlsConnector`] for `Endpoint::connect_with_connector_lazy` (the endpoint's URI stays
//!   `http://`: the connector does the TLS).
//! - [`ChainVerifier`] checks a server certificate against the CA only (peers are dialled by
//!   socket address, so there is no host name to check).
//! - [`subject_alt_names`] and [`names_identity`] read a client certificate's DNS and URI SANs
//!   and decide whether they name a node (`server.tls.node_identity`).
//!
//! Invariants: the ring provider is the only crypto provider; every server config offers ALPN
//! `h2` (plus `http/1.1` for the admin listener) and every client config asks for `h2`;
//! handshakes run in their own tasks, bounded in number and time (`limits.handshake_timeout`,
//! see [`crate::listener`]), so a slow or hostile client never stalls the accept loop; a
//! handshake failure is logged and counted
//! (`tls_handshake_failures_total{listener}`) and never ends the listener. Reloading polls the
//! files' contents every [`RELOAD_INTERVAL`]: changed files are parsed and swapped in as a
//! whole; files that fail to parse (or a key that does not match its certificate) leave the old
//! material in place, logged once per bad content and counted (`tls_reload_failures_total`).
//! Connections already established keep their session; new ones use the new material.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::tls::{certs_from_pem, key_from_pem};
use crate::config::{AdminTls, ClusterTls, OriginTls, ServerTls};
use crate::telemetry::Metrics;

/// How often certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// A TLS connection accepted by a listener.
pub type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// A TLS connection dialled by a [`TlsConnector`], ready for hyper.
pub type ClientStream = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

/// The ring crypto provider.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls crypto provider; harmless when one is already
/// installed. Call once at startup, before any TLS configuration is built.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A file does not hold what it should (no PEM certificate, no PEM key).
    #[error("{file}: {message}")]
    Pem {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// The private key is unsupported or does not match the leaf certificate.
    #[error("{file}: unusable private key: {source}")]
    Key {
        /// The key file.
        file: String,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// No certificate of a CA file could be used as a trust anchor.
    #[error("{file}: no usable CA certificate: {source}")]
    Roots {
        /// The CA file.
        file: String,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// A client certificate verifier could not be built.
    #[error("cannot build the certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// rustls refused the configuration.
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A server name is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

// === file loading ===

/// PEM files read together; `bytes[i]` is the content of `paths[i]`.
struct Files<'a> {
    paths: &'a [PathBuf],
    bytes: &'a [Vec<u8>],
}

impl Files<'_> {
    fn name(&self, i: usize) -> String {
        self.paths[i].display().to_string()
    }

    fn certs(&self, i: usize) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        certs_from_pem(&self.bytes[i]).map_err(|message| TlsError::Pem { file: self.name(i), message })
    }

    fn key(&self, i: usize) -> Result<PrivateKeyDer<'static>, TlsError> {
        key_from_pem(&self.bytes[i]).map_err(|message| TlsError::Pem { file: self.name(i), message })
    }

    /// The certificate chain at `cert` with the key at `key`, checked to match.
    fn identity(&self, cert: usize, key: usize) -> Result<Arc<CertifiedKey>, TlsError> {
        let chain = self.certs(cert)?;
        let key_der = self.key(key)?;
        CertifiedKey::from_der(chain, key_der, &provider())
            .map(Arc::new)
            .map_err(|source| TlsError::Key { file: self.name(key), source })
    }

    fn roots(&self, i: usize) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in self.certs(i)? {
            roots.add(cert).map_err(|source| TlsError::Roots { file: self.name(i), source })?;
        }
        Ok(Arc::new(roots))
    }
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, TlsError> {
    paths
        .iter()
        .map(|p| {
            crate::config::read_limited(p, crate::config::MAX_SECRET_FILE_BYTES)
                .map_err(|source| TlsError::Read { file: p.display().to_string(), source })
        })
        .collect()
}

/// File contents a [`Reloading`] value was built from, and the last contents that failed.
struct Seen {
    loaded: Vec<Vec<u8>>,
    failed: Option<Vec<Vec<u8>>>,
}

type Build<T> = Box<dyn Fn(&Files<'_>) -> Result<T, TlsError> + Send + Sync>;

/// A value built from files, rebuilt when their contents change.
struct Reloading<T> {
    /// Names the material in logs and in `tls_reload_failures_total{config}`.
    name: &'static str,
    paths: Vec<PathBuf>,
    build: Build<T>,
    current: ArcSwap<T>,
    /// Contents the current value was built from, and the last contents that failed.
    seen: Mutex<Seen>,
    metrics: Metrics,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    fn new(name: &'static str, paths: Vec<PathBuf>, build: Build<T>, metrics: Metrics) -> Result<Self, TlsError> {
        let bytes = read_all(&paths)?;
        let value = build(&Files { paths: &paths, bytes: &bytes })?;
        Ok(Self {
            name,
            paths,
            build,
            current: ArcSwap::from_pointee(value),
            seen: Mutex::new(Seen { loaded: bytes, failed: None }),
            metrics,
        })
    }

    fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Re-reads the files; when they changed, builds and swaps in the new value. Returns
    /// whether a new value was swapped in.
    fn reload(&self) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let result = read_all(&self.paths).and_then(|bytes| {
            if bytes == seen.loaded || seen.failed.as_ref() == Some(&bytes) {
                return Ok(None);
            }
            match (self.build)(&Files { paths: &self.paths, bytes: &bytes }) {
                Ok(value) => Ok(Some((bytes, value))),
                Err(e) => {
                    seen.failed = Some(bytes);
                    Err(e)
                }
            }
        });
        match result {
            Ok(Some((bytes, value))) => {
                self.current.store(Arc::new(value));
                *seen = Seen { loaded: bytes, failed: None };
                tracing::info!(config = self.name, files = ?self.paths, "reloaded TLS certificates");
                true
            }
            Ok(None) => false,
            Err(e) => {
                // A missing file is reported on every poll (rotation tools may remove and
                // recreate files; an operator must see one that stays missing).
                self.metrics.tls_reload_failure(self.name);
                tracing::error!(config = self.name, error = %e, "cannot reload TLS certificates; keeping the current ones");
                false
            }
        }
    }
}

/// Polls `source` every `interval` until `shutdown`.
fn spawn_reload<T: Send + Sync + 'static>(
    source: Arc<Reloading<T>>,
    interval: Duration,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    tracker.spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let source = source.clone();
            // File reads are blocking; keep them off the async workers.
            if let Err(e) = tokio::task::spawn_blocking(move || source.reload()).await {
                tracing::error!(error = %e, "TLS reload task failed");
            }
        }
    });
}

// === server side ===

/// Files of a server-side TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key of the leaf.
    pub key_file: PathBuf,
    /// CA for client certificates; set means a client certificate is required.
    pub client_ca_file: Option<PathBuf>,
}

/// The server half of TLS for one listener: the current [`ServerConfig`], reloaded from its
/// files. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    listener: &'static str,
    config: Arc<Reloading<ServerConfig>>,
    metrics: Metrics,
}

impl TlsAcceptor {
    /// Loads `files` for the listener named `listener` (`xds`, `peer`, `admin`: the label of
    /// its metrics), offering the ALPN protocols `alpn` in order of preference.
    ///
    /// # Errors
    /// When a file cannot be read or used.
    pub fn new(listener: &'static str, files: ServerFiles, alpn: &[&[u8]], metrics: Metrics) -> Result<Self, TlsError> {
        let mut paths = vec![files.cert_file, files.key_file];
        paths.extend(files.client_ca_file);
        let with_client_ca = paths.len() == 3;
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let build: Build<ServerConfig> = Box::new(move |files| {
            let identity = files.identity(0, 1)?;
            let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
            let builder = if with_client_ca {
                let verifier = WebPkiClientVerifier::builder_with_provider(files.roots(2)?, provider()).build()?;
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_no_client_auth()
            };
            let mut config = builder
                .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(Arc::unwrap_or_clone(identity))));
            config.alpn_protocols = alpn.clone();
            Ok(config)
        });
        let config = Reloading::new(listener, paths, build, metrics.clone())?;
        Ok(Self { listener, config: Arc::new(config), metrics })
    }

    /// The acceptor of the downstream xDS listener (`server.tls`), ALPN `h2`.
    ///
    /// # Errors
    /// When a file cannot be read or used.
    pub fn for_xds(tls: &ServerTls, metrics: Metrics) -> Result<Self, TlsError> {
        let files = ServerFiles {
            cert_file: tls.cert_file.clone().into(),
            key_file: tls.key_file.clone().into(),
            client_ca_file: tls.client_ca_file.clone().map(Into::into),
        };
        Self::new("xds", files, &[b"h2"], metrics)
    }

    /// The acceptor of the peer listener (`cluster.tls`): client certificates chaining to the
    /// cluster CA are required; ALPN `h2`.
    ///
    /// # Errors
    /// When a file cannot be read or used.
    pub fn for_peer(tls: &ClusterTls, metrics: Metrics) -> Result<Self, TlsError> {
        let files = ServerFiles {
            cert_file: tls.cert_file.clone().into(),
            key_file: tls.key_file.clone().into(),
            client_ca_file: Some(tls.ca_file.clone().into()),
        };
        Self::new("peer", files, &[b"h2"], metrics)
    }

    /// The acceptor of the admin listener (`admin.tls`), ALPN `h2` and `http/1.1`.
    ///
    /// # Errors
    /// When a file cannot be read or used.
    pub fn for_admin(tls: &AdminTls, metrics: Metrics) -> Result<Self, TlsError> {
        let files = ServerFiles {
            cert_file: tls.cert_file.clone().into(),
            key_file: tls.key_file.clone().into(),
            client_ca_file: tls.client_ca_file.clone().map(Into::into),
        };
        Self::new("admin", files, &[b"h2", b"http/1.1"], metrics)
    }

    /// The listener name this acceptor reports under.
    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// The configuration new connections get now.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.current()
    }

    /// Re-reads the files now; returns whether new material was swapped in.
    pub fn reload(&self) -> bool {
        self.config.reload()
    }

    /// Starts polling the files every `interval` until `shutdown`.
    pub fn spawn_reload(&self, interval: Duration, tracker: &TaskTracker, shutdown: CancellationToken) {
        spawn_reload(self.config.clone(), interval, tracker, shutdown);
    }

    /// Logs and counts (`tls_handshake_failures_total{listener}`) a failed handshake.
    pub(crate) fn handshake_failed(&self, peer: SocketAddr, error: &dyn std::fmt::Display) {
        self.metrics.tls_handshake_failure(self.listener);
        tracing::info!(listener = self.listener, peer = %peer, error = %error, "TLS handshake failed");
    }
}

// === client side ===

/// Files of a client-side TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// CA certificates the server's certificate must chain to.
    pub ca_file: PathBuf,
    /// Client certificate chain and its key, presented when the server asks.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// What a client connection is configured from: the trust anchors, the client identity and
/// the default configuration (WebPKI verification of the server name).
struct ClientMaterial {
    roots: Arc<RootCertStore>,
    identity: Option<Arc<CertifiedKey>>,
    config: Arc<ClientConfig>,
}

/// Builds the server certificate verifier of a connection from the current trust anchors.
pub type VerifierFactory = Arc<dyn Fn(Arc<RootCertStore>) -> Arc<dyn ServerCertVerifier> + Send + Sync>;

/// The client half of TLS for one link (the origin, or the peers): the current trust anchors
/// and client certificate, reloaded from their files. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    material: Arc<Reloading<ClientMaterial>>,
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// Loads `files`; `name` labels reload failures (`origin`, `peer_client`). With
    /// `server_name`, every connection sends it as SNI and checks it against the server's
    /// certificate; without, the host of the dialled URI is used.
    ///
    /// # Errors
    /// When a file cannot be read or used.
    pub fn new(
        name: &'static str,
        files: ClientFiles,
        server_name: Option<&str>,
        metrics: Metrics,
    ) -> Result<Self, TlsError> {
        let server_name = server_name
            .map(|n| ServerName::try_from(n.to_owned()).map_err(|_| TlsError::ServerName(n.to_owned())))
            .transpose()?;
        let mut paths = vec![files.ca_file];
        if let Some((cert, key)) = files.identity {
            paths.extend([cert, key]);
        }
        let build: Build<ClientMaterial> = Box::new(|files| {
            let roots = files.roots(0)?;
            let identity = if files.paths.len() == 3 { Some(files.identity(1, 2)?) } else { None };
            let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
            let config = client_config(verifier, identity.clone())?;
            Ok(ClientMaterial { roots, identity, config })
        });
        let material = Reloading::new(name, paths, build, metrics)?;
        Ok(Self { material: Arc::new(material), server_name })
    }

    /// TLS towards the origin (`origin_server.tls`).
    ///
    /// # Errors
    /// When a file cannot be read or used.
    pub fn for_origin(tls: &OriginTls, metrics: Metrics) -> Result<Self, TlsError> {
        let identity = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => Some((cert.into(), key.into())),
            _ => None,
        };
        Self::new(
            "origin",
            ClientFiles { ca_file: tls.ca_file.clone().into(), identity },
            tls.server_name.as_deref(),
            metrics,
        )
    }

    /// TLS towards the other relays (`cluster.tls`): the node's certificate as client
    /// certificate, the cluster CA as trust anchor.
    ///
    /// # Errors
    /// When a file cannot be read or used.
    pub fn for_peers(tls: &ClusterTls, metrics: Metrics) -> Result<Self, TlsError> {
        let files = ClientFiles {
            ca_file: tls.ca_file.clone().into(),
            identity: Some((tls.cert_file.clone().into(), tls.key_file.clone().into())),
        };
        Self::new("peer_client", files, None, metrics)
    }

    /// A connector with the default verification: the server's certificate chains to the CA
    /// and names the server name (or the dialled host).
    pub fn connector(&self) -> TlsConnector {
        TlsConnector { tls: self.clone(), verifier: None }
    }

    /// A connector whose server certificate check is built by `verifier` from the current
    /// trust anchors, at each connection.
    pub fn connector_with_verifier(&self, verifier: VerifierFactory) -> TlsConnector {
        TlsConnector { tls: self.clone(), verifier: Some(verifier) }
    }

    /// The server name sent by connections, when fixed.
    pub fn server_name(&self) -> Option<&ServerName<'static>> {
        self.server_name.as_ref()
    }

    /// Re-reads the files now; returns whether new material was swapped in.
    pub fn reload(&self) -> bool {
        self.material.reload()
    }

    /// Starts polling the files every `interval` until `shutdown`.
    pub fn spawn_reload(&self, interval: Duration, tracker: &TaskTracker, shutdown: CancellationToken) {
        spawn_reload(self.material.clone(), interval, tracker, shutdown);
    }
}

fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<Arc<CertifiedKey>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(identity) => builder
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(Arc::unwrap_or_clone(identity)))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Dials TCP and does a TLS handshake with the [`ClientTls`]'s current material; a
/// `tower::Service<Uri>` for `Endpoint::connect_with_connector_lazy`.
#[derive(Clone)]
pub struct TlsConnector {
    tls: ClientTls,
    verifier: Option<VerifierFactory>,
}

impl TlsConnector {
    fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let material = self.tls.material.current();
        match &self.verifier {
            None => Ok(material.config.clone()),
            Some(factory) => client_config(factory(material.roots.clone()), material.identity.clone()),
        }
    }
}

impl tower::Service<Uri> for TlsConnector {
    type Response = ClientStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<ClientStream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = match &self.tls.server_name {
            Some(name) => Ok(name.clone()),
            None => ServerName::try_from(host.clone()).map_err(|_| invalid(format!("invalid server name {host:?}"))),
        };
        let config = self.config().map_err(|e| io::Error::other(e.to_string()));
        Box::pin(async move {
            let (server_name, config) = (server_name?, config?);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

// === verifiers ===

/// Accepts a server certificate that chains to the trust anchors, whatever names it carries:
/// for links dialled by socket address, where there is no host name to check.
#[derive(Debug)]
pub struct ChainVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ChainVerifier {
    /// A verifier trusting `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Self {
        Self { roots, provider: provider() }
    }

    /// A [`VerifierFactory`] of this verifier.
    pub fn factory() -> VerifierFactory {
        Arc::new(|roots| Arc::new(Self::new(roots)))
    }
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

// === certificate names ===

/// Whether one of `names` names `value`: a DNS SAN equal to it (ASCII case-insensitive), or a
/// URI SAN equal to it. A URI's last path segment never names a value alone: any certificate of
/// the client CA could otherwise claim a node whose id ends another workload's URI. An empty
/// value is never named.
pub fn names_identity(names: &[SubjectAltName], value: &str) -> bool {
    !value.is_empty()
        && names.iter().any(|name| match name {
            SubjectAltName::Dns(dns) => dns.eq_ignore_ascii_case(value),
            SubjectAltName::Uri(uri) => uri == value,
        })
}

/// `names` for messages: `DNS:a, URI:b`, or `no DNS or URI name`.
pub fn describe(names: &[SubjectAltName]) -> String {
    if names.is_empty() {
        return "no DNS or URI name".to_owned();
    }
    let names: Vec<String> = names
        .iter()
        .map(|name| match name {
            SubjectAltName::Dns(dns) => format!("DNS:{dns}"),
            SubjectAltName::Uri(uri) => format!("URI:{uri}"),
        })
        .collect();
    names.join(", ")
}

/// A DNS or URI subject alternative name of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectAltName {
    /// A `dNSName`.
    Dns(String),
    /// A `uniformResourceIdentifier`, for example a SPIFFE ID.
    Uri(String),
}

/// The DNS and URI subject alternative names of a DER certificate, in certificate order.
///
/// # Errors
/// A lowercase message when the certificate cannot be parsed.
pub fn subject_alt_names(der: &[u8]) -> Result<Vec<SubjectAltName>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("invalid certificate: {e}"))?;
    let san = cert.subject_alternative_name().map_err(|e| format!("invalid subjectAltName: {e}"))?;
    let Some(san) = san else { return Ok(Vec::new()) };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(s) => Some(SubjectAltName::Dns((*s).to_owned())),
            GeneralName::URI(s) => Some(SubjectAltName::Uri((*s).to_owned())),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use tower::ServiceExt as _;

    use super::*;

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        fn new(name: &str) -> Self {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            Self(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
        }

        /// Writes `{name}.pem` and `{name}.key` for a leaf with CN `cn` valid for localhost.
        fn leaf(&self, dir: &Path, name: &str, cn: &str) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &self.0).unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }

        fn write(&self, path: &Path) {
            std::fs::write(path, self.0.pem()).unwrap();
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xds-relay-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn leaf_cn(stream: &ClientStream) -> String {
        let (_, session) = stream.inner().get_ref();
        let der = session.peer_certificates().unwrap()[0].clone();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_owned()
    }

    /// Connects, then sends the HTTP/2 preface and an empty SETTINGS frame (what the listener
    /// waits for before handing the connection over).
    async fn with_preface(connect: impl Future<Output = io::Result<ClientStream>>) -> io::Result<ClientStream> {
        let mut stream = connect.await?;
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        tokio::io::AsyncWriteExt::write_all(stream.inner_mut(), &hello).await?;
        Ok(stream)
    }

    #[tokio::test]
    async fn mtls_handshake_reload_and_refusals() {
        install_crypto_provider();
        let dir = temp_dir("reload");
        let ca = Ca::new("test CA");
        ca.write(&dir.join("ca.pem"));
        ca.leaf(&dir, "server", "server-1");
        ca.leaf(&dir, "client", "client-1");
        let metrics = Metrics::new();
        let files = ServerFiles {
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
            client_ca_file: Some(dir.join("ca.pem")),
        };
        let acceptor = TlsAcceptor::new("xds", files, &[b"h2"], metrics.clone()).unwrap();
        let (tracker, shutdown) = (TaskTracker::new(), CancellationToken::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = crate::listener::ListenerSettings {
            name: "xds",
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
            protocol: crate::listener::Protocol::Http2,
        };
        let mut incoming = crate::listener::accept_tls(
            listener,
            settings,
            acceptor.clone(),
            metrics.clone(),
            &tracker,
            shutdown.clone(),
        );
        let uri: Uri = format!("http://localhost:{}", incoming.local_addr().unwrap().port()).parse().unwrap();
        let client_files = |identity: bool| ClientFiles {
            ca_file: dir.join("ca.pem"),
            identity: identity.then(|| (dir.join("client.pem"), dir.join("client.key"))),
        };
        let client = ClientTls::new("origin", client_files(true), None, metrics.clone()).unwrap();

        // A client with a certificate of the CA connects; the server sees its certificate.
        let connect = with_preface(client.connector().oneshot(uri.clone()));
        let (stream, accepted) = tokio::join!(connect, futures_util::StreamExt::next(&mut incoming));
        let stream = stream.unwrap();
        assert_eq!(leaf_cn(&stream), "server-1");
        let accepted = accepted.unwrap().unwrap();
        assert!(accepted.get_ref().get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty()));
        assert_eq!(accepted.get_ref().get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

        // Rotation: new files, a new connection sees the new leaf.
        ca.leaf(&dir, "server", "server-2");
        assert!(acceptor.reload());
        assert!(!acceptor.reload(), "unchanged files are not reloaded");
        let connect = with_preface(client.connector_with_verifier(ChainVerifier::factory()).oneshot(uri.clone()));
        let (stream, _) = tokio::join!(connect, futures_util::StreamExt::next(&mut incoming));
        assert_eq!(leaf_cn(&stream.unwrap()), "server-2");

        // A bad key keeps the old material, counted once per bad content.
        std::fs::write(dir.join("server.key"), "garbage").unwrap();
        assert!(!acceptor.reload());
        assert!(!acceptor.reload());
        assert!(
            metrics.render().contains("xds_relay_tls_reload_failures_total{config=\"xds\"} 1"),
            "{}",
            metrics.render()
        );

        // Without a client certificate, the server refuses the handshake and counts it.
        let anonymous = ClientTls::new("origin", client_files(false), None, metrics.clone()).unwrap();
        let mut stream = anonymous.connector().oneshot(uri.clone()).await.unwrap();
        // TLS 1.3: the refusal arrives as an alert on the first read.
        let mut buf = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(stream.inner_mut(), &mut buf).await;
        assert!(read.is_err() || read.unwrap() == 0);
        let render = || metrics.render();
        for _ in 0..100 {
            if render().contains("xds_relay_tls_handshake_failures_total{listener=\"xds\"} 1") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(render().contains("xds_relay_tls_handshake_failures_total{listener=\"xds\"} 1"), "{}", render());

        // A server certificate from another CA is refused by the client.
        let other = Ca::new("other CA");
        other.write(&dir.join("other-ca.pem"));
        let stranger = ClientTls::new(
            "origin",
            ClientFiles { ca_file: dir.join("other-ca.pem"), identity: None },
            None,
            metrics.clone(),
        )
        .unwrap();
        let err = stranger.connector().oneshot(uri.clone()).await.unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");

        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[test]
    fn identity_rule() {
        let names = [
            SubjectAltName::Dns("Envoy-1.example.com".to_owned()),
            SubjectAltName::Uri("spiffe://mesh/ns/default/sa/envoy-2".to_owned()),
            SubjectAltName::Uri("spiffe://only-authority".to_owned()),
        ];
        for named in ["envoy-1.example.com", "spiffe://mesh/ns/default/sa/envoy-2"] {
            assert!(names_identity(&names, named), "{named}");
        }
        for not_named in
            ["", "envoy-1", "envoy-2", "sa/envoy-2", "default", "only-authority", "spiffe://only-authority/x"]
        {
            assert!(!names_identity(&names, not_named), "{not_named}");
        }
        assert_eq!(describe(&names[..2]), "DNS:Envoy-1.example.com, URI:spiffe://mesh/ns/default/sa/envoy-2");
        assert_eq!(describe(&[]), "no DNS or URI name");
    }

    #[test]
    fn subject_alt_names_are_read() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::DnsName("envoy-1".try_into().unwrap()),
            SanType::URI("spiffe://mesh/ns/default/sa/envoy-1".try_into().unwrap()),
            SanType::IpAddress("10.0.0.1".parse().unwrap()),
        ];
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_alt_names(cert.der()).unwrap(),
            vec![
                SubjectAltName::Dns("envoy-1".to_owned()),
                SubjectAltName::Uri("spiffe://mesh/ns/default/sa/envoy-1".to_owned())
            ]
        );
        assert!(subject_alt_names(b"junk").is_err());
    }
}
