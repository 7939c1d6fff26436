//! The bootstrap's TLS sections: `server.tls` (downstream xDS), `origin_server.tls` (the
//! connection to the origin and every fallback), `cluster.tls` (mTLS between relays) and
//! `admin.tls` (the admin HTTP listener), and the PEM file readers they share with
//! [`crate::tls`].
//!
//! Invariants of a validated section: every named file exists and holds what its field says
//! (at least one PEM certificate, or one PEM private key in PKCS#8, SEC1 or PKCS#1 form);
//! `cert_file` and `key_file` are both set or both unset; `node_identity` comes with
//! `client_ca_file`. Files are read again when the relay reloads them, so a file that
//! validated at startup may still be refused later (the old material is then kept).

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// TLS of the downstream xDS listener (`server.tls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// The relay's certificate chain, leaf first (PEM).
    #[serde(alias = "certFile")]
    pub cert_file: String,
    /// The private key of the leaf (PEM).
    #[serde(alias = "keyFile")]
    pub key_file: String,
    /// CA certificates client certificates must chain to; set means client certificates are
    /// required (mTLS).
    #[serde(default, alias = "clientCaFile")]
    pub client_ca_file: Option<String>,
    /// Which field of the request's node a SAN of the client certificate must name
    /// (optional; needs `client_ca_file`).
    #[serde(default, alias = "nodeIdentity")]
    pub node_identity: Option<NodeIdentity>,
}

/// The node field a client certificate must name (`server.tls.node_identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeIdentity {
    /// `node.id` must be named by a SAN.
    Id,
    /// `node.cluster` must be named by a SAN.
    Cluster,
}

/// TLS towards the origin management server and every fallback (`origin_server.tls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginTls {
    /// CA certificates the origin's certificate must chain to (PEM, required).
    #[serde(alias = "caFile")]
    pub ca_file: String,
    /// Client certificate chain presented to the origin (PEM; with `key_file`).
    #[serde(default, alias = "certFile")]
    pub cert_file: Option<String>,
    /// Private key of the client certificate (PEM; with `cert_file`).
    #[serde(default, alias = "keyFile")]
    pub key_file: Option<String>,
    /// Name sent as SNI and checked against the origin's certificate, for every address
    /// (default: the host of the address being dialled).
    #[serde(default, alias = "serverName")]
    pub server_name: Option<String>,
}

/// mTLS on the peer protocol between relays (`cluster.tls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// CA certificates every relay's certificate must chain to (PEM).
    #[serde(alias = "caFile")]
    pub ca_file: String,
    /// This relay's certificate chain, used as server and as client (PEM).
    #[serde(alias = "certFile")]
    pub cert_file: String,
    /// The private key of the leaf (PEM).
    #[serde(alias = "keyFile")]
    pub key_file: String,
}

/// TLS of the admin HTTP listener (`admin.tls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTls {
    /// The admin listener's certificate chain (PEM).
    #[serde(alias = "certFile")]
    pub cert_file: String,
    /// The private key of the leaf (PEM).
    #[serde(alias = "keyFile")]
    pub key_file: String,
    /// CA certificates client certificates must chain to; set means client certificates are
    /// required.
    #[serde(default, alias = "clientCaFile")]
    pub client_ca_file: Option<String>,
}

// === validation ===

impl ServerTls {
    /// Checks the files and that `node_identity` comes with `client_ca_file`.
    ///
    /// # Errors
    /// The first problem, with its field path under `path`.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        check_identity(path, &self.cert_file, &self.key_file)?;
        if let Some(ca) = &self.client_ca_file {
            check_certs(&format!("{path}.client_ca_file"), ca)?;
        }
        if self.node_identity.is_some() && self.client_ca_file.is_none() {
            return Err(ConfigError::new(
                "",
                format!("{path}.node_identity"),
                "needs client_ca_file: the identity is read from the client certificate",
            ));
        }
        Ok(())
    }
}

impl OriginTls {
    /// Checks the files, that `cert_file` and `key_file` come together, and the server name.
    ///
    /// # Errors
    /// The first problem, with its field path under `path`.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        check_certs(&format!("{path}.ca_file"), &self.ca_file)?;
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => check_identity(path, cert, key)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(ConfigError::new("", format!("{path}.key_file"), "must be set when cert_file is"));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new("", format!("{path}.cert_file"), "must be set when key_file is"));
            }
        }
        if let Some(name) = &self.server_name
            && ServerName::try_from(name.as_str()).is_err()
        {
            return Err(ConfigError::new(
                "",
                format!("{path}.server_name"),
                format!("{name:?} is not a DNS name or an IP address"),
            ));
        }
        Ok(())
    }
}

impl ClusterTls {
    /// Checks the files.
    ///
    /// # Errors
    /// The first problem, with its field path under `path`.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        check_certs(&format!("{path}.ca_file"), &self.ca_file)?;
        check_identity(path, &self.cert_file, &self.key_file)
    }
}

impl AdminTls {
    /// Checks the files.
    ///
    /// # Errors
    /// The first problem, with its field path under `path`.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        check_identity(path, &self.cert_file, &self.key_file)?;
        if let Some(ca) = &self.client_ca_file {
            check_certs(&format!("{path}.client_ca_file"), ca)?;
        }
        Ok(())
    }
}

fn check_identity(path: &str, cert: &str, key: &str) -> Result<(), ConfigError> {
    let chain =
        read_certs(Path::new(cert)).map_err(|message| ConfigError::new("", format!("{path}.cert_file"), message))?;
    let key_der =
        read_key(Path::new(key)).map_err(|message| ConfigError::new("", format!("{path}.key_file"), message))?;
    rustls::sign::CertifiedKey::from_der(chain, key_der, &rustls::crypto::ring::default_provider()).map_err(|e| {
        ConfigError::new("", format!("{path}.key_file"), format!("{key}: unusable with the certificate of {cert}: {e}"))
    })?;
    Ok(())
}

fn check_certs(field: &str, file: &str) -> Result<(), ConfigError> {
    read_certs(Path::new(file)).map_err(|message| ConfigError::new("", field, message))?;
    Ok(())
}

// === PEM files ===

/// Reads every PEM certificate of `path`, in file order.
///
/// # Errors
/// A lowercase message naming the file when it cannot be read, is not PEM, or holds no
/// certificate.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    certs_from_pem(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads the first PEM private key of `path` (PKCS#8, SEC1 or PKCS#1).
///
/// # Errors
/// A lowercase message naming the file when it cannot be read or holds no private key.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path)?;
    key_from_pem(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses every PEM certificate of `pem`.
///
/// # Errors
/// A lowercase message when the text is not PEM or holds no certificate.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".to_owned());
    }
    Ok(certs)
}

/// Parses the first PEM private key of `pem`.
///
/// # Errors
/// A lowercase message when the text holds no private key.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key found".to_owned(),
        e => format!("invalid PEM private key: {e}"),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    super::read_limited(path, super::MAX_SECRET_FILE_BYTES)
        .map_err(|e| format!("cannot read {}: {}", path.display(), lowercase_io(&e)))
}

/// `std::io::Error`'s text starts with a capital ("No such file or directory"); our messages
/// are lowercase.
fn lowercase_io(e: &std::io::Error) -> String {
    let text = e.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rcgen::{CertificateParams, KeyPair};

    use crate::config::parse_bootstrap;

    const BASE: &str = "server: {address: {address: 127.0.0.1, port_value: 0}}\n\
        origin_server: {address: {address: 127.0.0.1, port_value: 18000}}\n\
        cache: {ttl: 1s}\nadmin: {address: {address: 127.0.0.1, port_value: 0}}\n";

    /// A directory with a self-signed `cert.pem`/`key.pem` and a non-PEM `junk.txt`.
    fn files(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xds-relay-config-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("junk.txt"), "not pem").unwrap();
        std::fs::write(dir.join("other.key"), KeyPair::generate().unwrap().serialize_pem()).unwrap();
        dir
    }

    #[test]
    fn every_section_parses_with_camel_case_aliases() {
        let dir = files("ok");
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        let (c, k) = (c.display(), k.display());
        let text = format!(
            "server:\n  address: {{address: 127.0.0.1, port_value: 0}}\n  allowSecretsWithoutTls: true\n  \
             tls: {{certFile: {c}, keyFile: {k}, clientCaFile: {c}, nodeIdentity: cluster}}\n\
             origin_server:\n  address: {{address: 127.0.0.1, port_value: 1}}\n  \
             tls: {{caFile: {c}, certFile: {c}, keyFile: {k}, serverName: origin.internal}}\n\
             cache: {{ttl: 1s}}\n\
             admin: {{address: {{address: 127.0.0.1, port_value: 0}}, tls: {{cert_file: {c}, key_file: {k}}}}}\n\
             cluster: {{node_name: a, insecure: true, tls: {{ca_file: {c}, cert_file: {c}, key_file: {k}}}}}\n"
        );
        let b = parse_bootstrap(&text, "b.yaml").unwrap();
        assert!(b.server.allow_secrets_without_tls);
        assert_eq!(b.server.tls.unwrap().node_identity, Some(super::NodeIdentity::Cluster));
        assert_eq!(b.origin_server.tls.unwrap().server_name.as_deref(), Some("origin.internal"));
        assert!(b.admin.tls.unwrap().client_ca_file.is_none());
        assert!(b.cluster.unwrap().tls.is_some());
    }

    #[test]
    fn errors_name_the_field_and_the_file() {
        let dir = files("err");
        let (c, k, j) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("junk.txt"));
        let (c, k, j) = (c.display().to_string(), k.display().to_string(), j.display().to_string());
        let missing = dir.join("missing.key").display().to_string();
        let with_server = |tls: &str| {
            BASE.replacen(
                "server: {address: {address: 127.0.0.1, port_value: 0}}\n",
                &format!("server:\n  address: {{address: 127.0.0.1, port_value: 0}}\n  tls: {tls}\n"),
                1,
            )
        };
        let with_origin = |tls: &str| {
            BASE.replacen(
                "origin_server: {address: {address: 127.0.0.1, port_value: 18000}}\n",
                &format!("origin_server:\n  address: {{address: 127.0.0.1, port_value: 18000}}\n  tls: {tls}\n"),
                1,
            )
        };
        let cases: Vec<(String, &str, String)> = vec![
            (
                with_server(&format!("{{cert_file: {c}, key_file: {missing}}}")),
                "server.tls.key_file",
                format!("cannot read {missing}: no such file"),
            ),
            (with_server(&format!("{{cert_file: {j}, key_file: {k}}}")), "server.tls.cert_file", format!("{j}: no PEM certificate found")),
            (with_server(&format!("{{cert_file: {c}, key_file: {c}}}")), "server.tls.key_file", format!("{c}: no PEM private key found")),
            (
                with_server(&format!("{{cert_file: {c}, key_file: {}}}", dir.join("other.key").display())),
                "server.tls.key_file",
                "unusable with the certificate".to_owned(),
            ),
            (with_server(&format!("{{cert_file: {c}}}")), "server.tls", "missing field `key_file`".to_owned()),
            (
                with_server(&format!("{{cert_file: {c}, key_file: {k}, node_identity: id}}")),
                "server.tls.node_identity",
                "needs client_ca_file".to_owned(),
            ),
            (
                with_server(&format!("{{cert_file: {c}, key_file: {k}, client_ca_file: {c}, node_identity: name}}")),
                "server.tls.node_identity",
                "unknown variant `name`".to_owned(),
            ),
            (with_origin(&format!("{{ca_file: {c}, cert_file: {c}}}")), "origin_server.tls.key_file", "must be set when cert_file is".to_owned()),
            (with_origin(&format!("{{ca_file: {c}, key_file: {k}}}")), "origin_server.tls.cert_file", "must be set when key_file is".to_owned()),
            (with_origin(&format!("{{ca_file: {j}}}")), "origin_server.tls.ca_file", "no PEM certificate found".to_owned()),
            (
                with_origin(&format!("{{ca_file: {c}, server_name: 'a b'}}")),
                "origin_server.tls.server_name",
                "is not a DNS name or an IP address".to_owned(),
            ),
            (
                format!("{BASE}cluster: {{node_name: a, tls: {{ca_file: {c}, cert_file: {c}, key_file: {missing}}}}}\n"),
                "cluster.tls.key_file",
                "no such file".to_owned(),
            ),
            (format!("{BASE}cluster: {{node_name: a}}\n"), "cluster.tls", "set insecure: true".to_owned()),
            (
                BASE.replacen(
                    "admin: {address: {address: 127.0.0.1, port_value: 0}}",
                    &format!("admin: {{address: {{address: 127.0.0.1, port_value: 0}}, tls: {{cert_file: {c}, key_file: {k}, client_ca_file: {missing}}}}}"),
                    1,
                ),
                "admin.tls.client_ca_file",
                "no such file".to_owned(),
            ),
        ];
        for (text, field, needle) in cases {
            let err = parse_bootstrap(&text, "b.yaml").expect_err(&text);
            assert_eq!(err.field, field, "{err}");
            assert!(err.message.contains(&needle), "{err} does not contain {needle:?}");
            assert!(!err.message.ends_with('.'), "{err}");
        }
    }
}
