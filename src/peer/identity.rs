//! Peer identity: which cluster member a peer certificate names.
//!
//! A relay's peer certificate carries the SAN URI `spiffe://<cluster_id>/relay/<node_name>`
//! ([`member_uri`]). Peers are dialled by socket address, so the hostname check of WebPKI is
//! replaced by a name check: a follower (or a node verifying a member before it places it on its
//! ring) accepts an owner only if its certificate chains to the cluster CA *and* names the
//! member it meant to reach ([`MemberVerifier`]); an owner reads the caller's certificate with
//! [`member_name`] to know which member calls.
//!
//! Invariants:
//! - a certificate names at most one member: a certificate with no relay URI of this cluster,
//!   or with several, names none (it is refused, never guessed);
//! - relay URIs of other clusters are ignored, so one CA may serve several clusters without a
//!   member of one being taken for a member of another;
//! - [`MemberVerifier`] checks the chain first (no revocation checking, like WebPKI without
//!   CRLs), then the name; signature checks use the `ring` provider's algorithms.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use x509_parser::extensions::GeneralName;

use crate::tls::ChainVerifier;

/// The path segment of a relay identity: `spiffe://<cluster_id>/relay/<node_name>`.
const RELAY_SEGMENT: &str = "relay";

/// The SAN URI that names member `node` of cluster `cluster_id`.
pub fn member_uri(cluster_id: &str, node: &str) -> String {
    format!("spiffe://{cluster_id}/{RELAY_SEGMENT}/{node}")
}

/// Why a certificate names no member (or not the expected one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The certificate does not parse as X.509.
    #[error("the certificate does not parse: {reason}")]
    Unparsable {
        /// The parser's message.
        reason: String,
    },
    /// No SAN URI names a relay of the cluster.
    #[error(
        "the certificate names no relay of cluster {cluster_id} (expected a san uri spiffe://{cluster_id}/relay/<node>)"
    )]
    NoMember {
        /// The cluster id looked for.
        cluster_id: String,
    },
    /// Several SAN URIs name relays of the cluster.
    #[error("the certificate names several relays of cluster {cluster_id}: {names:?}")]
    Ambiguous {
        /// The cluster id looked for.
        cluster_id: String,
        /// The names found.
        names: Vec<String>,
    },
    /// The certificate names another member than the one dialled.
    #[error("the certificate names member {found}, not {expected}")]
    WrongMember {
        /// The member that was dialled.
        expected: String,
        /// The member the certificate names.
        found: String,
    },
}

/// The member of `cluster_id` that the DER certificate `cert_der` names.
///
/// # Errors
/// [`IdentityError`] when the certificate does not parse, names no relay of the cluster, or
/// names several.
pub fn member_name(cert_der: &[u8], cluster_id: &str) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::Unparsable { reason: e.to_string() })?;
    let san = cert.subject_alternative_name().map_err(|e| IdentityError::Unparsable { reason: e.to_string() })?;
    let prefix = format!("spiffe://{cluster_id}/{RELAY_SEGMENT}/");
    let mut names: Vec<String> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(prefix.as_str()),
            _ => None,
        })
        .filter(|node| valid_node_name(node))
        .map(str::to_owned)
        .collect();
    names.dedup();
    match names.len() {
        0 => Err(IdentityError::NoMember { cluster_id: cluster_id.to_owned() }),
        1 => Ok(names.remove(0)),
        _ => Err(IdentityError::Ambiguous { cluster_id: cluster_id.to_owned(), names }),
    }
}

/// A node name as it may appear in a relay URI: non-empty, one path segment, no query or
/// fragment.
fn valid_node_name(node: &str) -> bool {
    !node.is_empty() && !node.contains(['/', '?', '#'])
}

/// A rustls server-certificate verifier that accepts exactly the certificates chaining to the
/// cluster CA that name one member.
///
/// The server name passed by rustls (the dialled address) is ignored: the member's SAN URI is
/// checked instead.
#[derive(Debug)]
pub struct MemberVerifier {
    /// Checks the chain to the cluster CA (and the handshake signatures).
    chain: ChainVerifier,
    cluster_id: String,
    member: String,
}

impl MemberVerifier {
    /// A verifier of member `member` of `cluster_id`, whose certificates chain to `roots`.
    pub fn new(roots: Arc<RootCertStore>, cluster_id: &str, member: &str) -> Self {
        Self { chain: ChainVerifier::new(roots), cluster_id: cluster_id.to_owned(), member: member.to_owned() }
    }

    /// The member this verifier accepts.
    pub fn member(&self) -> &str {
        &self.member
    }
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let refuse = |error: IdentityError| {
            tracing::warn!(member = %self.member, error = %error, "peer certificate refused");
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
        };
        match member_name(end_entity, &self.cluster_id) {
            Ok(found) if found == self.member => Ok(ServerCertVerified::assertion()),
            Ok(found) => Err(refuse(IdentityError::WrongMember { expected: self.member.clone(), found })),
            Err(error) => Err(refuse(error)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
        KeyUsagePurpose as Ku, SanType,
    };

    use super::*;

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        fn new(name: &str) -> Self {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
            Self(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
        }

        fn roots(&self) -> Arc<RootCertStore> {
            let mut roots = RootCertStore::empty();
            roots.add(self.0.der().clone()).unwrap();
            Arc::new(roots)
        }

        fn leaf(&self, uris: &[&str]) -> CertificateDer<'static> {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, "relay");
            params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
            params.key_usages = vec![Ku::DigitalSignature];
            params.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
            params.signed_by(&KeyPair::generate().unwrap(), &self.0).unwrap().der().clone()
        }
    }

    fn verify(verifier: &MemberVerifier, cert: &CertificateDer<'_>) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from("127.0.0.1").unwrap();
        verifier.verify_server_cert(cert, &[], &name, &[], UnixTime::now())
    }

    #[test]
    fn reads_the_one_member_a_certificate_names() {
        let ca = Ca::new("ca");
        let cert = ca.leaf(&[&member_uri("prod", "relay-1"), "spiffe://prod/ns/default/sa/xds-relay"]);
        assert_eq!(member_name(&cert, "prod"), Ok("relay-1".to_owned()));
        assert_eq!(member_name(&cert, "staging"), Err(IdentityError::NoMember { cluster_id: "staging".into() }));
        // Another cluster's identity beside this one's does not count.
        let cert = ca.leaf(&[&member_uri("staging", "relay-9"), &member_uri("prod", "relay-1")]);
        assert_eq!(member_name(&cert, "prod"), Ok("relay-1".to_owned()));
        let two = ca.leaf(&[&member_uri("prod", "relay-1"), &member_uri("prod", "relay-2")]);
        assert!(matches!(member_name(&two, "prod"), Err(IdentityError::Ambiguous { .. })));
        for bad in ["spiffe://prod/relay/", "spiffe://prod/relay/a/b", "spiffe://prod/relays/a"] {
            assert!(member_name(&ca.leaf(&[bad]), "prod").is_err(), "{bad}");
        }
        assert!(matches!(member_name(b"not a certificate", "prod"), Err(IdentityError::Unparsable { .. })));
    }

    #[test]
    fn the_verifier_accepts_only_the_expected_member_of_the_cluster_ca() {
        let ca = Ca::new("cluster ca");
        let verifier = MemberVerifier::new(ca.roots(), "prod", "relay-2");
        assert_eq!(verifier.member(), "relay-2");
        verify(&verifier, &ca.leaf(&[&member_uri("prod", "relay-2")])).expect("the member's own certificate");

        let other_member = verify(&verifier, &ca.leaf(&[&member_uri("prod", "relay-4")])).unwrap_err();
        assert!(
            other_member.to_string().contains(r#"WrongMember { expected: "relay-2", found: "relay-4" }"#),
            "{other_member}"
        );
        let no_identity = verify(&verifier, &ca.leaf(&["spiffe://prod/ns/default/sa/xds-relay"])).unwrap_err();
        assert!(no_identity.to_string().contains("NoMember"), "{no_identity}");

        let stranger_ca = Ca::new("stranger ca");
        let foreign = verify(&verifier, &stranger_ca.leaf(&[&member_uri("prod", "relay-2")])).unwrap_err();
        assert!(matches!(foreign, rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)), "{foreign:?}");
    }
}
