//! Traces of a config version's path across a cluster, received by a real OTLP/gRPC trace
//! receiver (the same protocol Jaeger ingests): one origin update produces one trace whose
//! spans come from all three nodes, with correct parent links and attributes.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crate::support::{OriginProcess, RelayProcess, SOON, eventually};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

/// A span as received, with its node.
#[derive(Debug, Clone)]
struct Received {
    node: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attributes: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

/// The root span of `key`'s `version` (`xds.version`) among `spans`.
fn version_root<'a>(spans: &'a [Received], key: &str, version: &str) -> Option<&'a Received> {
    spans.iter().find(|s| {
        s.name == "xds.version"
            && s.attributes.get("version").map(String::as_str) == Some(version)
            && s.attributes.get("key").map(String::as_str) == Some(key)
    })
}

fn text(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.clone()) {
                Some(AnyValue::StringValue(s)) => s,
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let resource = text(&resource_spans.resource.map(|r| r.attributes).unwrap_or_default());
            let node = resource.get("service.instance.id").cloned().unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        node: node.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent: span.parent_span_id,
                        attributes: text(&span.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Starts an OTLP/gRPC trace receiver on loopback; returns it and its address.
async fn collector() -> (Receiver, std::net::SocketAddr) {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (receiver, collector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_hold_is_an_event_on_the_versions_trace() {
    let (receiver, collector) = collector().await;
    let origin = OriginProcess::start(&[]);
    let mut bootstrap = support::bootstrap_yaml(&[origin.xds], "", "  ttl: 60s");
    bootstrap.push_str(&format!(
        "tracing:\n  endpoint: http://{collector}\n  sampling_ratio: 1.0\n\
         rollout:\n  policies:\n    - {{ canary: {{ fraction: 1.0 }}, bake: 1s }}\n"
    ));
    let relay = RelayProcess::start_with_env(&bootstrap, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let client = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-0", "staging")).await.unwrap();
    client.set_nack_marker(Some("bad".into()));
    client.subscribe(xds::CLUSTER, vec![]).await.unwrap();
    client.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();

    let reply = support::http_post_json(origin.stats, "/extras", r#"{"bad_clusters":["bad-cluster"]}"#).unwrap();
    let version = serde_json::from_str::<serde_json::Value>(&reply).unwrap()["version"].as_str().unwrap().to_owned();
    let decision = eventually("a rollout.decision span in the bad version's trace", SOON, || {
        let spans = receiver.spans.lock().unwrap().clone();
        let root = version_root(&spans, "staging_cds", &version)?;
        spans
            .iter()
            .find(|s| s.trace_id == root.trace_id && s.name == "rollout.decision")
            .map(|s| (s.clone(), root.span_id.clone()))
    })
    .await;
    let (span, root) = decision;
    assert_eq!(span.parent, root, "the decision is a child of the version's span");
    assert_eq!(span.attributes["decision"], "hold");
    assert_eq!(span.attributes["version"], version);
    assert!(span.attributes["reason"].contains("bad-cluster"), "{span:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_update_is_one_trace_across_three_nodes() {
    let (receiver, collector) = collector().await;

    let origin = OriginProcess::start(&[]);
    let ips: Vec<String> = (0..3).map(|i| format!("127.0.0.{}", i + 2)).collect();
    let ports: Vec<u16> = ips.iter().map(|ip| support::free_udp_port(ip)).collect();
    let seeds: Vec<String> = ips.iter().zip(&ports).map(|(ip, port)| format!("{ip}:{port}")).collect();
    let relays: Vec<RelayProcess> = (0..3)
        .map(|i| {
            let mut bootstrap =
                support::cluster_bootstrap(origin.xds, &format!("relay-{}", i + 1), &ips[i], ports[i], &seeds);
            bootstrap.push_str(&format!("tracing:\n  endpoint: http://{collector}\n  sampling_ratio: 1.0\n"));
            RelayProcess::start_with_env(&bootstrap, &[("OTEL_BSP_SCHEDULE_DELAY", "100")])
        })
        .collect();
    for relay in &relays {
        eventually("three ready members", SOON, || {
            let view = relay.admin_json("/api/cluster");
            (view["members"].as_array()?.iter().filter(|m| m["alive"] == true && m["state"] == "ready").count() == 3)
                .then_some(())
        })
        .await;
    }
    let mut clients = Vec::new();
    for (i, relay) in relays.iter().enumerate() {
        let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node(&format!("envoy-{i}"), "staging"))
            .await
            .unwrap();
        c.subscribe(xds::CLUSTER, vec![]).await.unwrap();
        c.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.unwrap();
        clients.push(c);
    }

    let version = origin.publish();
    for c in &clients {
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.unwrap();
    }
    let trace = eventually("the version's trace with pushes answered on all three nodes", SOON, || {
        let spans = receiver.spans.lock().unwrap().clone();
        let root = version_root(&spans, "staging_cds", &version)?;
        let trace: Vec<Received> = spans.iter().filter(|s| s.trace_id == root.trace_id).cloned().collect();
        let pushes = trace.iter().filter(|s| s.name == "xds.push" && s.attributes.contains_key("outcome")).count();
        (pushes >= 3).then_some(trace)
    })
    .await;

    let nodes: BTreeSet<&str> = trace.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["relay-1", "relay-2", "relay-3"]), "spans from every node: {trace:#?}");
    let by_id: BTreeMap<&[u8], &Received> = trace.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let parent_name = |s: &Received| by_id.get(s.parent.as_slice()).map(|p| p.name.as_str());
    let roots: Vec<&Received> = trace.iter().filter(|s| s.name == "xds.version").collect();
    assert_eq!(roots.len(), 1, "one root span: {trace:#?}");
    assert!(roots[0].parent.is_empty());
    assert_eq!(roots[0].attributes["resources"], "3");
    let forwards: Vec<&Received> = trace.iter().filter(|s| s.name == "peer.forward").collect();
    assert_eq!(forwards.len(), 2, "one forward per follower: {trace:#?}");
    assert!(forwards.iter().all(|s| parent_name(s) == Some("xds.version") && s.node == roots[0].node));
    let fanouts: Vec<&Received> = trace.iter().filter(|s| s.name == "xds.fanout").collect();
    assert_eq!(fanouts.len(), 2, "{trace:#?}");
    assert!(fanouts.iter().all(|s| parent_name(s) == Some("peer.forward") && s.node != roots[0].node));
    for push in trace.iter().filter(|s| s.name == "xds.push") {
        let expected = if push.node == roots[0].node { "xds.version" } else { "xds.fanout" };
        assert_eq!(parent_name(push), Some(expected), "{push:?}");
        assert_eq!(push.attributes["outcome"], "ack");
        assert!(push.attributes["node_id"].starts_with("envoy-"));
        assert!(push.attributes.contains_key("ack_latency_ms"));
    }
    eprintln!(
        "trace {}: {} spans: {}",
        trace[0].trace_id.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        trace.len(),
        trace.iter().map(|s| format!("{}@{}", s.name, s.node)).collect::<Vec<_>>().join(", ")
    );
}
