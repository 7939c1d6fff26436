//! Traces of every config version's path, through OpenTelemetry and OTLP.
//!
//! One trace per key version: `xds.version` when the owner receives it from the origin, a
//! `peer.forward` child per follower (its context travels in the peer protocol as a W3C
//! `traceparent`), an `xds.fanout` span on each follower, and per client an `xds.push` span
//! that ends with the client's ACK or NACK.
//!
//! Invariants: spans use the target [`TARGET`], which only the OpenTelemetry layer enables, so
//! with tracing off every span is disabled and costs a branch; an unreachable collector never
//! blocks the relay (the batch exporter runs on its own thread and drops when full).

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::cache::Attachment;
use crate::config::TracingSettings;

/// The target of every trace span; the log output never shows it.
pub const TARGET: &str = "xds_relay::trace";

/// The trace context of one key version (none when tracing is off or it was sampled out).
#[derive(Clone, Default)]
pub struct VersionTrace(Option<Context>);

impl std::fmt::Debug for VersionTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(cx) => write!(f, "VersionTrace({})", cx.span().span_context().trace_id()),
            None => f.write_str("VersionTrace(none)"),
        }
    }
}

impl VersionTrace {
    /// The trace a state carries in its attachment; `None` when it is not traced.
    fn attached(attachment: &Attachment) -> Option<&Self> {
        attachment.get::<Self>().filter(|trace| trace.is_traced())
    }

    /// This trace as a state's attachment (nothing is allocated when it is not traced).
    fn attach(self) -> Attachment {
        if self.is_traced() { Attachment::new(self) } else { Attachment::default() }
    }

    fn of(span: &tracing::Span) -> Self {
        if span.is_disabled() {
            return Self(None);
        }
        let cx = span.context();
        Self(cx.span().span_context().is_valid().then_some(cx))
    }

    /// True when this version is traced.
    pub fn is_traced(&self) -> bool {
        self.0.is_some()
    }

    /// A child span of this version's trace (a disabled span when it is not traced).
    fn child(&self, span: tracing::Span) -> tracing::Span {
        if let Some(cx) = &self.0 {
            let _ = span.set_parent(cx.clone());
        }
        span
    }
}

/// Starts the trace of a version the origin just delivered for `key`, as the attachment its
/// state carries.
pub fn version_received(key: &str, type_url: &str, version: &str, resources: usize, bytes: usize) -> Attachment {
    let span = tracing::info_span!(
        target: TARGET, "xds.version",
        key, type_url, version, resources = resources as u64, bytes = bytes as u64
    );
    VersionTrace::of(&span).attach()
}

/// Records a forward of a traced version to `follower`; returns the `traceparent` to carry.
pub fn forwarded(trace: &Attachment, key: &str, follower: &str, version: &str) -> String {
    let Some(trace) = VersionTrace::attached(trace) else { return String::new() };
    let span = trace.child(tracing::info_span!(target: TARGET, "peer.forward", key, follower, version));
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// Continues on a follower the trace a forwarded version carries, as the attachment its
/// state carries.
pub fn fanout(traceparent: &str, key: &str, version: &str, owner: &str) -> Attachment {
    if traceparent.is_empty() {
        return Attachment::default();
    }
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    let span = tracing::info_span!(target: TARGET, "xds.fanout", key, version, owner);
    let _ = span.set_parent(parent);
    VersionTrace::of(&span).attach()
}

/// Opens the span of one push to one client; it ends with [`push_answered`].
pub fn push_started(
    trace: &Attachment,
    key: &str,
    type_url: &str,
    version: &str,
    node_id: &str,
) -> Option<tracing::Span> {
    VersionTrace::attached(trace).map(|trace| {
        trace.child(tracing::info_span!(
            target: TARGET, "xds.push",
            key, type_url, version, node_id,
            outcome = tracing::field::Empty, nack_message = tracing::field::Empty, ack_latency_ms = tracing::field::Empty
        ))
    })
}

/// Ends a push span with the client's answer: `None` for an ACK, the message for a NACK.
pub fn push_answered(span: tracing::Span, nack: Option<&str>, latency: Duration) {
    span.record("outcome", if nack.is_some() { "nack" } else { "ack" });
    if let Some(message) = nack {
        span.record("nack_message", super::truncate_message(message).as_ref());
    }
    span.record("ack_latency_ms", latency.as_secs_f64() * 1000.0);
}

/// Records a rollout decision on a traced version: a `rollout.decision` span in the
/// version's trace with the decision and its reason.
pub fn rollout_decision(trace: &Attachment, key: &str, version: &str, decision: &str, reason: &str) {
    if let Some(trace) = VersionTrace::attached(trace) {
        let span = trace.child(tracing::info_span!(target: TARGET, "rollout.decision", key, version, decision, reason));
        drop(span);
    }
}

/// The running trace exporter.
pub struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// Builds the OTLP exporter and its tracer. Must run inside the tokio runtime.
    ///
    /// # Errors
    /// Fails when the exporter cannot be built (a malformed endpoint).
    pub fn new(settings: &TracingSettings, node: &str) -> anyhow::Result<(Self, opentelemetry_sdk::trace::SdkTracer)> {
        let mut exporter =
            opentelemetry_otlp::SpanExporter::builder().with_tonic().with_timeout(Duration::from_secs(3));
        if let Some(endpoint) = &settings.endpoint {
            exporter = exporter.with_endpoint(endpoint.clone());
        }
        let exporter =
            exporter.build().map_err(|e| anyhow::anyhow!("tracing.endpoint: cannot build the OTLP exporter: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new("service.instance.id", node.to_owned()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sampling_ratio))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("xds-relay");
        Ok((Self { provider }, tracer))
    }

    /// Exports what is queued and stops, within `bound` even when the collector is down.
    pub async fn shutdown(self, bound: Duration) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(bound));
        match tokio::time::timeout(bound + Duration::from_millis(500), done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "trace export did not flush"),
            _ => tracing::warn!("trace export did not stop in time"),
        }
    }
}
