//! Test PKI (rcgen) and a TLS listener in front of the in-process management server: the
//! listener does real rustls handshakes (ALPN `h2`, client certificates required when asked) and
//! relays the decrypted bytes to the plaintext server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
    KeyUsagePurpose as Ku, SanType,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// A certificate and its key, in DER and in PEM files.
pub struct Leaf {
    pub cert: CertificateDer<'static>,
    pub key_der: Vec<u8>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A CA that writes its certificate and the leaves it signs into a directory.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_file: PathBuf,
}

impl Pki {
    /// A new CA named `name`, writing into `dir` (created).
    pub fn new(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Self { dir: dir.to_owned(), ca, ca_file }
    }

    /// A leaf `name` with DNS SANs `dns`, IP SAN 127.0.0.1, serverAuth and clientAuth.
    pub fn leaf(&self, name: &str, dns: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = dns.iter().map(|d| SanType::DnsName((*d).try_into().unwrap())).collect();
        params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.key_usages = vec![Ku::DigitalSignature];
        params.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_file = self.dir.join(format!("{name}.pem"));
        let key_file = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Leaf { cert: cert.der().clone(), key_der: key.serialize_der(), cert_file, key_file }
    }

    /// The CA certificate.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }
}

/// A TLS listener relaying to `backend`; stops when dropped.
pub struct TlsFront {
    pub addr: SocketAddr,
    /// Handshakes that completed (with a verified client certificate when one is required).
    pub handshakes: Arc<AtomicU64>,
    /// Handshakes that failed.
    pub failures: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    /// Serves `server` on 127.0.0.1:0; requires a client certificate from `client_ca` when set.
    pub async fn start(backend: SocketAddr, server: &Leaf, client_ca: Option<CertificateDer<'static>>) -> Self {
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca).unwrap();
                let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).build().unwrap();
                ServerConfig::builder().with_client_cert_verifier(verifier)
            }
            None => ServerConfig::builder().with_no_client_auth(),
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key_der.clone()));
        let mut config = builder.with_single_cert(vec![server.cert.clone()], key).unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let (ok, failed) = (handshakes.clone(), failures.clone());
        let accept = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) ends every relayed connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, ok, failed) = (acceptor.clone(), ok.clone(), failed.clone());
                connections.spawn(async move {
                    let handshake = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await;
                    let Ok(Ok(mut tls)) = handshake else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    ok.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut plain) = TcpStream::connect(backend).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self { addr, handshakes, failures, accept }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A fresh directory for one test's files.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xds-example-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
