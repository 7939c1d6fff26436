//! The bootstrap's optional `tracing:` section: OpenTelemetry traces of every config
//! version's path, exported over OTLP/gRPC (Jaeger ingests OTLP natively on port 4317).
//!
//! The standard `OTEL_*` environment variables apply too (for example
//! `OTEL_EXPORTER_OTLP_ENDPOINT` when `endpoint` is not set, `OTEL_BSP_SCHEDULE_DELAY`).

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Trace export settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSettings {
    /// Export traces (default true when the section is present).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// OTLP/gRPC endpoint, e.g. `http://jaeger:4317`; absent: `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// or `http://localhost:4317`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The `service.name` of this relay's spans (default `xds-relay`).
    #[serde(default = "default_service_name", alias = "serviceName")]
    pub service_name: String,
    /// Fraction of config versions traced, 0 to 1 (default 1).
    #[serde(default = "default_ratio", alias = "samplingRatio")]
    pub sampling_ratio: f64,
}

fn default_enabled() -> bool {
    true
}
fn default_service_name() -> String {
    "xds-relay".to_owned()
}
fn default_ratio() -> f64 {
    1.0
}

impl TracingSettings {
    /// Checks the ratio and the endpoint.
    ///
    /// # Errors
    /// The first problem with its field path (file left empty).
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(ConfigError::new("", format!("{path}.sampling_ratio"), "must be between 0 and 1"));
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError::new(
                "",
                format!("{path}.endpoint"),
                format!("{endpoint:?} must be an http:// or https:// URL"),
            ));
        }
        if self.service_name.is_empty() {
            return Err(ConfigError::new("", format!("{path}.service_name"), "must not be empty"));
        }
        Ok(())
    }
}
