//! TLS for the load generator's connections: a private CA to verify the server, an optional
//! client certificate (mTLS), and an optional name to verify instead of the target's host.
//!
//! Invariants: TLS is on exactly when the target is `https://` (checked by
//! [`TlsFiles::check_target`]); a client certificate and its key come together; every file is
//! read once, when the run starts, and a file that cannot be read or holds no PEM is an error
//! naming the file. rustls offers ALPN `h2` (tonic's connector requires it from the server).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Errors reading the TLS files or building the client configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// Which file (`--tls-ca`, `--tls-cert`, `--tls-key`).
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no PEM block of the expected kind.
    #[error("{what} {path} holds no PEM {kind}")]
    NotPem {
        /// Which file.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What was expected (`CERTIFICATE`, `PRIVATE KEY`).
        kind: &'static str,
    },
}

/// The TLS files and server name of a run (`--tls-ca`, `--tls-cert`, `--tls-key`,
/// `--tls-server-name`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM CA certificates that verify the server.
    pub ca_file: PathBuf,
    /// PEM client certificate chain, for mTLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, SEC1 or PKCS#1).
    pub key_file: Option<PathBuf>,
    /// The DNS name (or IP) to verify the server certificate against and send as SNI, instead of
    /// the target's host.
    pub server_name: Option<String>,
}

// === impl TlsFiles ===

impl TlsFiles {
    /// Whether `cert_file` and `key_file` are both set or both unset.
    pub fn identity_is_complete(&self) -> bool {
        self.cert_file.is_some() == self.key_file.is_some()
    }

    /// Checks that `target` uses `https` when TLS is on (`tls` is `Some`) and `http` when it is off.
    ///
    /// # Errors
    ///
    /// A reason naming the flag to add or the scheme to use.
    pub fn check_target(tls: Option<&Self>, target: &str) -> Result<(), String> {
        let https = target.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        match (tls.is_some(), https) {
            (true, false) => Err(format!("--tls-ca needs an https:// target, got {target:?}")),
            (false, true) => Err(format!("the https:// target {target:?} needs --tls-ca")),
            _ => Ok(()),
        }
    }

    /// Reads the files and builds tonic's client TLS configuration.
    ///
    /// # Errors
    ///
    /// [`TlsError`] naming the file that cannot be read or holds no PEM.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let ca = read_pem("--tls-ca", &self.ca_file, "CERTIFICATE")?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            let cert = read_pem("--tls-cert", cert, "CERTIFICATE")?;
            let key = read_pem("--tls-key", key, "PRIVATE KEY")?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

/// Reads `path` and checks that it holds a PEM block whose label ends with `kind`.
fn read_pem(what: &'static str, path: &Path, kind: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })?;
    let text = String::from_utf8_lossy(&bytes);
    let has_block = text.lines().any(|l| {
        l.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")).is_some_and(|label| label.ends_with(kind))
    });
    if has_block { Ok(bytes) } else { Err(TlsError::NotPem { what, path: path.to_owned(), kind }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_scheme_matches_tls() {
        let tls = TlsFiles { ca_file: "ca.pem".into(), ..Default::default() };
        assert!(TlsFiles::check_target(Some(&tls), "https://relay:9991").is_ok());
        assert!(TlsFiles::check_target(Some(&tls), "HTTPS://relay:9991").is_ok());
        assert!(TlsFiles::check_target(None, "http://relay:9991").is_ok());
        let e = TlsFiles::check_target(Some(&tls), "http://relay:9991").unwrap_err();
        assert!(e.contains("https://"), "{e}");
        let e = TlsFiles::check_target(None, "https://relay:9991").unwrap_err();
        assert!(e.contains("--tls-ca"), "{e}");
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named() {
        let dir = std::env::temp_dir().join(format!("loadgen-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let tls = TlsFiles { ca_file: not_pem.clone(), ..Default::default() };
        let e = tls.client_config().unwrap_err();
        assert!(matches!(e, TlsError::NotPem { what: "--tls-ca", .. }), "{e}");
        assert!(e.to_string().contains("ca.pem"), "{e}");

        std::fs::write(&not_pem, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let missing = dir.join("missing.key");
        let tls = TlsFiles {
            ca_file: not_pem,
            cert_file: Some(dir.join("ca.pem")),
            key_file: Some(missing),
            server_name: None,
        };
        let e = tls.client_config().unwrap_err();
        assert!(matches!(e, TlsError::Read { what: "--tls-key", .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn identity_needs_both_files() {
        let mut tls = TlsFiles { ca_file: "ca.pem".into(), ..Default::default() };
        assert!(tls.identity_is_complete());
        tls.cert_file = Some("c.pem".into());
        assert!(!tls.identity_is_complete());
        tls.key_file = Some("c.key".into());
        assert!(tls.identity_is_complete());
    }
}
