//! The guard in front of the admin API's mutating calls: every method but GET and HEAD (the
//! endpoints that change something, `/cache/clear…`, `/log_level…` and `/ready/…`, accept
//! only POST; GET and HEAD never change anything).
//!
//! A mutating call is refused:
//! - with 403 when it comes from another web origin: its `Origin` header is present and is
//!   not the admin's own origin (`http(s)://` plus the request's `Host`), or a browser marks
//!   it `Sec-Fetch-Site: cross-site`. A page open in an operator's browser therefore cannot
//!   clear the cache or take the node out of its load balancer (cross-site request forgery);
//! - when `admin.auth_token_file` is set, without `Authorization: Bearer <token>` (401 with
//!   `WWW-Authenticate: Bearer`) or with another token (403).
//!
//! Every refusal gets a JSON `{"Message":…}`, a warning log line (reason, method, path) and
//! a count in `admin_rejected_total{reason}`.
//!
//! Invariants:
//! - tokens are compared in constant time: both sides are hashed (SHA-256) and the digests
//!   compared byte by byte without an early exit, so timing tells nothing about the token;
//! - the token file is polled every [`RELOAD_INTERVAL`]: a changed token applies from the
//!   next request (rotation without restart); a file that becomes unreadable or empty keeps
//!   the last token in force (never falls back to "no token");
//! - the token itself is never logged or shown (`/server_info` shows the file's path).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Admin, ConfigError, read_token_file};
use crate::telemetry::{Metrics, ReasonLabels};

/// How often the token file is checked for a new token.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two digests in constant time.
fn same_digest(a: &TokenDigest, b: &TokenDigest) -> bool {
    // Every byte is looked at whatever the first difference (no early exit to time), and the
    // inputs are digests, so even their lengths are equal.
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a mutating admin call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The `Origin` header names another origin than the admin's own.
    #[error("cross-origin request refused: origin {origin} is not this admin API's origin")]
    CrossOrigin {
        /// The request's `Origin` header.
        origin: String,
    },
    /// A browser marked the request as cross-site.
    #[error("cross-site request refused (Sec-Fetch-Site: cross-site)")]
    CrossSite,
    /// A token is required and the request carries none.
    #[error("this admin API requires a bearer token: send Authorization: Bearer <token>")]
    MissingToken,
    /// The request carries another token than the configured one.
    #[error("the bearer token is not valid")]
    WrongToken,
}

impl Refusal {
    /// The `reason` label of `admin_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::CrossOrigin { .. } => "cross_origin",
            Self::CrossSite => "cross_site",
            Self::MissingToken => "missing_token",
            Self::WrongToken => "wrong_token",
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = match self {
            Self::MissingToken => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        };
        let mut response = (status, axum::Json(serde_json::json!({ "Message": self.to_string() }))).into_response();
        if self == Self::MissingToken {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The guard: the token in force (if any) and where it comes from.
#[derive(Clone)]
pub struct AdminGuard {
    inner: Arc<Inner>,
}

struct Inner {
    file: Option<PathBuf>,
    token: RwLock<Option<TokenDigest>>,
    metrics: Metrics,
}

impl std::fmt::Debug for AdminGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminGuard").field("file", &self.inner.file).finish_non_exhaustive()
    }
}

impl AdminGuard {
    /// The guard for `admin`: it reads `auth_token_file` now when set.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `admin.auth_token_file` when the file cannot be read or holds
    /// no token.
    pub fn new(admin: &Admin, metrics: Metrics) -> Result<Self, ConfigError> {
        let token = admin.read_auth_token()?.as_deref().map(digest);
        Ok(Self { inner: Arc::new(Inner { file: admin.auth_token_file.clone(), token: RwLock::new(token), metrics }) })
    }

    /// Polls the token file (when one is configured) every [`RELOAD_INTERVAL`] until
    /// `shutdown`, in `tracker`.
    pub fn spawn_reload(&self, tracker: &TaskTracker, shutdown: CancellationToken) {
        if self.inner.file.is_none() {
            return;
        }
        let guard = self.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = tick.tick() => { guard.reload(); }
                }
            }
        });
    }

    /// Reads the token file again; a new token replaces the old one, a file that cannot be
    /// read or holds no token keeps the old one. Returns whether the token changed.
    pub fn reload(&self) -> bool {
        let Some(file) = &self.inner.file else { return false };
        match read_token_file(file, "admin.auth_token_file") {
            Ok(token) => {
                let new = digest(&token);
                let mut current = self.inner.token.write().unwrap_or_else(|p| p.into_inner());
                if current.as_ref().is_some_and(|old| same_digest(old, &new)) {
                    return false;
                }
                *current = Some(new);
                tracing::info!(file = %file.display(), "admin token changed; the new token applies from now on");
                true
            }
            Err(error) => {
                tracing::warn!(file = %file.display(), error = %error, "cannot reload the admin token; the last token stays in force");
                false
            }
        }
    }

    /// Checks a mutating call's headers.
    ///
    /// # Errors
    /// The [`Refusal`] when the call must not run.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
            let own = origin.to_str().ok().zip(host).is_some_and(|(origin, host)| same_origin(origin, host));
            if !own {
                return Err(Refusal::CrossOrigin { origin: String::from_utf8_lossy(origin.as_bytes()).into_owned() });
            }
        }
        if headers.get("sec-fetch-site").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site")) {
            return Err(Refusal::CrossSite);
        }
        let Some(expected) = *self.inner.token.read().unwrap_or_else(|p| p.into_inner()) else { return Ok(()) };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match presented {
            None => Err(Refusal::MissingToken),
            Some(token) if same_digest(&digest(token), &expected) => Ok(()),
            Some(_) => Err(Refusal::WrongToken),
        }
    }
}

/// True when `origin` (`scheme://host[:port]`) is the origin of a server reached as `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else { return false };
    (scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"))
        && authority.eq_ignore_ascii_case(host.trim())
}

/// True for the methods that never change anything.
fn is_read_only(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// The middleware: runs [`AdminGuard::check`] on every call that is not GET or HEAD.
pub async fn enforce(State(guard): State<AdminGuard>, request: Request, next: Next) -> Response {
    if is_read_only(request.method()) {
        return next.run(request).await;
    }
    if let Err(refusal) = guard.check(request.headers()) {
        guard.inner.metrics.admin_rejected.get_or_create(&ReasonLabels { reason: refusal.reason().to_owned() }).inc();
        tracing::warn!(
            reason = refusal.reason(),
            method = %request.method(),
            path = %request.uri().path(),
            origin = request.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).unwrap_or_default(),
            "admin call refused"
        );
        return refusal.into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn digests_compare_equal_only_when_equal() {
        assert!(same_digest(&digest("a"), &digest("a")));
        assert!(!same_digest(&digest("a"), &digest("b")));
        assert!(!same_digest(&digest("token"), &digest("token ")));
    }

    #[test]
    fn origin_must_be_the_hosts_own() {
        assert!(same_origin("http://127.0.0.1:6070", "127.0.0.1:6070"));
        assert!(same_origin("https://Relay.example:6070", "relay.example:6070"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:6070"));
        assert!(!same_origin("http://127.0.0.1:6071", "127.0.0.1:6070"));
        assert!(!same_origin("null", "127.0.0.1:6070"));
        assert!(!same_origin("file://127.0.0.1:6070", "127.0.0.1:6070"));
    }

    #[test]
    fn checks_origin_fetch_site_and_token() {
        let open =
            AdminGuard { inner: Arc::new(Inner { file: None, token: RwLock::new(None), metrics: Metrics::new() }) };
        assert_eq!(open.check(&headers(&[])), Ok(()));
        assert_eq!(open.check(&headers(&[("host", "h:1"), ("origin", "http://h:1")])), Ok(()));
        assert!(matches!(
            open.check(&headers(&[("host", "h:1"), ("origin", "http://evil")])),
            Err(Refusal::CrossOrigin { .. })
        ));
        assert!(matches!(open.check(&headers(&[("origin", "http://h:1")])), Err(Refusal::CrossOrigin { .. })));
        assert_eq!(open.check(&headers(&[("sec-fetch-site", "cross-site")])), Err(Refusal::CrossSite));
        assert_eq!(open.check(&headers(&[("sec-fetch-site", "same-origin")])), Ok(()));

        let locked = AdminGuard {
            inner: Arc::new(Inner { file: None, token: RwLock::new(Some(digest("t0k"))), metrics: Metrics::new() }),
        };
        assert_eq!(locked.check(&headers(&[])), Err(Refusal::MissingToken));
        assert_eq!(locked.check(&headers(&[("authorization", "Basic dDBr")])), Err(Refusal::MissingToken));
        assert_eq!(locked.check(&headers(&[("authorization", "Bearer nope")])), Err(Refusal::WrongToken));
        assert_eq!(locked.check(&headers(&[("authorization", "Bearer t0k")])), Ok(()));
        assert_eq!(locked.check(&headers(&[("authorization", "bearer  t0k ")])), Ok(()));
    }

    #[test]
    fn the_token_file_is_reloaded_and_a_broken_file_keeps_the_last_token() {
        let dir = std::env::temp_dir().join(format!("xds-relay-guard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "first\n").unwrap();
        let guard = AdminGuard {
            inner: Arc::new(Inner {
                file: Some(file.clone()),
                token: RwLock::new(Some(digest(&read_token_file(&file, "f").unwrap()))),
                metrics: Metrics::new(),
            }),
        };
        let bearer = |t: &str| headers(&[("authorization", &format!("Bearer {t}"))]);
        assert_eq!(guard.check(&bearer("first")), Ok(()));
        assert!(!guard.reload(), "unchanged");
        std::fs::write(&file, "second").unwrap();
        assert!(guard.reload());
        assert_eq!(guard.check(&bearer("first")), Err(Refusal::WrongToken));
        assert_eq!(guard.check(&bearer("second")), Ok(()));
        std::fs::write(&file, "\n").unwrap();
        assert!(!guard.reload());
        std::fs::remove_file(&file).unwrap();
        assert!(!guard.reload());
        assert_eq!(guard.check(&bearer("second")), Ok(()), "a broken file keeps the last token");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
