//! The `limits:` and `telemetry:` bootstrap sections: how much any one client, connection or
//! peer may make the relay hold, and how many metric series keys may create.
//!
//! Every limit has a default chosen for a large fleet (tens of thousands of proxies on one
//! node) and is positive after validation. A request that would exceed a limit is refused
//! with a gRPC status naming the limit (`limits.<field>`), counted in
//! `limit_refusals_total{limit}` and logged; nothing else is disconnected.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use super::de::count;
use super::duration::GoDuration;

/// The `limits:` section; a field left out takes its [`Limits::default`] value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Keys with at least one client or follower on this node (default 10 000). A request
    /// that would open one more key is refused with `RESOURCE_EXHAUSTED`; keys already open
    /// keep working.
    #[serde(alias = "maxActiveKeys", deserialize_with = "count")]
    pub max_active_keys: usize,
    /// Longest aggregation key, in bytes (default 1024); a request whose key is longer is
    /// refused with `INVALID_ARGUMENT`.
    #[serde(alias = "maxKeyLength", deserialize_with = "count")]
    pub max_key_length: usize,
    /// Most resource names one request may subscribe to (default 10 000), counted after the
    /// request is applied; a request over it is refused with `INVALID_ARGUMENT`.
    #[serde(alias = "maxNamesPerRequest", deserialize_with = "count")]
    pub max_names_per_request: usize,
    /// Most distinct resource names in a key's union, the subscription sent upstream
    /// (default 50 000). The client whose names would take the union past it is refused with
    /// `RESOURCE_EXHAUSTED`; the key's other clients keep their subscription.
    #[serde(alias = "maxNamesPerKey", deserialize_with = "count")]
    pub max_names_per_key: usize,
    /// Largest encoded `Node` a stream may send, in bytes (default 64 KiB); a larger one is
    /// refused with `INVALID_ARGUMENT`.
    #[serde(alias = "maxNodeBytes", deserialize_with = "count")]
    pub max_node_bytes: usize,
    /// Most concurrent streams on one HTTP/2 connection (default 1024). Advertised in HTTP/2
    /// SETTINGS; a stream over it is refused with `RESOURCE_EXHAUSTED`. One connection never
    /// gets more than half of `server.max_streams` either, so it cannot starve the others.
    #[serde(alias = "maxStreamsPerConnection", deserialize_with = "count")]
    pub max_streams_per_connection: usize,
    /// Most concurrent connections on each listener (default 50 000). A connection over it
    /// is closed at once. The relay raises its open-file limit at start; when the limit stays
    /// lower, the effective maximum is lowered to fit and a warning says so.
    #[serde(alias = "maxConnections", deserialize_with = "count")]
    pub max_connections: usize,
    /// Time a new connection has to finish its TLS handshake (when TLS is on) and send the
    /// HTTP/2 preface and SETTINGS (Go duration, default `10s`); a connection that does not
    /// is closed.
    #[serde(alias = "handshakeTimeout")]
    pub handshake_timeout: GoDuration,
    /// Largest request message accepted from a client or a peer, in bytes (default 4 MiB, at
    /// least 4096); a larger one ends its stream with `RESOURCE_EXHAUSTED`.
    #[serde(alias = "maxRequestBytes", deserialize_with = "count")]
    pub max_request_bytes: usize,
}

/// The `telemetry:` section: bounds on metric cardinality; a field left out takes its
/// [`Telemetry::default`] value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Telemetry {
    /// Most keys that get their own per-key metric series (default 1000). Further keys are
    /// aggregated under the label `key="_other"`, and `metric_keys_aggregated` counts them.
    #[serde(alias = "maxKeySeries", deserialize_with = "count")]
    pub max_key_series: usize,
}

/// Smallest accepted `max_request_bytes`: room for a node and a few names.
const MIN_REQUEST_BYTES: usize = 4096;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_active_keys: 10_000,
            max_key_length: 1024,
            max_names_per_request: 10_000,
            max_names_per_key: 50_000,
            max_node_bytes: 64 * 1024,
            max_streams_per_connection: 1024,
            max_connections: 50_000,
            handshake_timeout: GoDuration::from_secs(10),
            max_request_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self { max_key_series: 1000 }
    }
}

impl Limits {
    /// Checks that every limit is positive, that a request can hold a node, and that a
    /// request's names can fit in a key.
    ///
    /// # Errors
    /// The first problem, as a [`ConfigError`] naming `{path}.<field>`.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let counts = [
            ("max_active_keys", self.max_active_keys),
            ("max_key_length", self.max_key_length),
            ("max_names_per_request", self.max_names_per_request),
            ("max_names_per_key", self.max_names_per_key),
            ("max_node_bytes", self.max_node_bytes),
            ("max_streams_per_connection", self.max_streams_per_connection),
            ("max_connections", self.max_connections),
        ];
        for (field, value) in counts {
            if value == 0 {
                return Err(ConfigError::new("", format!("{path}.{field}"), "must be greater than 0"));
            }
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::new("", format!("{path}.handshake_timeout"), "must be greater than 0s"));
        }
        if self.max_request_bytes < MIN_REQUEST_BYTES {
            return Err(ConfigError::new(
                "",
                format!("{path}.max_request_bytes"),
                format!("must be at least {MIN_REQUEST_BYTES} bytes, got {}", self.max_request_bytes),
            ));
        }
        if self.max_names_per_request > self.max_names_per_key {
            return Err(ConfigError::new(
                "",
                format!("{path}.max_names_per_request"),
                format!(
                    "{} is more than max_names_per_key ({}): such a request could never be served",
                    self.max_names_per_request, self.max_names_per_key
                ),
            ));
        }
        Ok(())
    }
}

impl Telemetry {
    /// Checks that `max_key_series` is positive.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `{path}.max_key_series`.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        if self.max_key_series == 0 {
            return Err(ConfigError::new("", format!("{path}.max_key_series"), "must be greater than 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate("limits").unwrap();
        Telemetry::default().validate("telemetry").unwrap();
    }

    #[test]
    fn zero_limits_name_their_field() {
        let limits = Limits { max_active_keys: 0, ..Limits::default() };
        let error = limits.validate("limits").unwrap_err();
        assert_eq!(error.field, "limits.max_active_keys");
        let limits = Limits { handshake_timeout: GoDuration::ZERO, ..Limits::default() };
        assert_eq!(limits.validate("limits").unwrap_err().field, "limits.handshake_timeout");
        let error = Telemetry { max_key_series: 0 }.validate("telemetry").unwrap_err();
        assert_eq!(error.field, "telemetry.max_key_series");
    }

    #[test]
    fn small_requests_and_impossible_name_limits_are_refused() {
        let limits = Limits { max_request_bytes: 100, ..Limits::default() };
        assert_eq!(limits.validate("limits").unwrap_err().field, "limits.max_request_bytes");
        let limits = Limits { max_names_per_request: 10, max_names_per_key: 5, ..Limits::default() };
        assert_eq!(limits.validate("limits").unwrap_err().field, "limits.max_names_per_request");
    }
}
