//! The streaming calls of the xDS discovery services, made without the generated clients so
//! that one function serves SotW and delta, ADS and per-type: used by the test clients and the
//! load generator.

use std::marker::PhantomData;

use serde::Serialize;

use tokio_stream::Stream;
use tonic::codec::{BufferSettings, Codec};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Status, Streaming};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::snapshot::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

/// Largest response a call decodes (tonic's default is 4 MiB).
pub(crate) const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;

/// Makes a bidirectional streaming call on `path`, sending `requests`.
///
/// # Errors
///
/// The call's status when the connection is not ready or the server refuses the call.
pub(crate) async fn streaming<Req, Resp>(
    channel: Channel,
    path: &'static str,
    requests: impl Stream<Item = Req> + Send + 'static,
) -> Result<Streaming<Resp>, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
    grpc.ready().await.map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
    let codec = SmallBuffers::<Req, Resp>(PhantomData);
    Ok(grpc.streaming(tonic::Request::new(requests), PathAndQuery::from_static(path), codec).await?.into_inner())
}

/// Initial size of a call's encode and decode buffers (tonic's default is 8 KiB each, which
/// is most of a call's memory at 10k calls); they grow when a message needs more.
const CALL_BUFFER_BYTES: usize = 1024;

/// Encoded bytes after which tonic's encoder yields to other tasks (its default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// The prost codec with [`CALL_BUFFER_BYTES`] buffers.
struct SmallBuffers<Req, Resp>(PhantomData<(Req, Resp)>);

impl<Req, Resp> Codec for SmallBuffers<Req, Resp>
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    type Encode = Req;
    type Decode = Resp;
    type Encoder = ProstEncoder<Req>;
    type Decoder = ProstDecoder<Resp>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<Req, Resp>::raw_encoder(BufferSettings::new(CALL_BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<Req, Resp>::raw_decoder(BufferSettings::new(CALL_BUFFER_BYTES, YIELD_THRESHOLD))
    }
}

/// How a client talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One `StreamAggregatedResources` (or `DeltaAggregatedResources`) stream for every type.
    Ads,
    /// One `StreamClusters` / `StreamEndpoints` / `StreamListeners` / `StreamRoutes` stream per
    /// type (or `DeltaClusters` / `DeltaEndpoints` / `DeltaListeners` / `DeltaRoutes`).
    PerType,
}

/// SotW or delta xDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// State of the world (`Stream*` methods).
    Sotw,
    /// Incremental (`Delta*` methods).
    Delta,
}

/// The gRPC method of a call: ADS, or the per-type service of `type_url`; `None` when that
/// type has no per-type service.
pub fn method_path(protocol: Protocol, transport: Transport, type_url: &str) -> Option<&'static str> {
    let path = match (transport, protocol, type_url) {
        (Transport::Ads, Protocol::Sotw, _) => {
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
        }
        (Transport::Ads, Protocol::Delta, _) => {
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
        }
        (_, Protocol::Sotw, CLUSTER_TYPE) => "/envoy.service.cluster.v3.ClusterDiscoveryService/StreamClusters",
        (_, Protocol::Delta, CLUSTER_TYPE) => "/envoy.service.cluster.v3.ClusterDiscoveryService/DeltaClusters",
        (_, Protocol::Sotw, ENDPOINT_TYPE) => "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints",
        (_, Protocol::Delta, ENDPOINT_TYPE) => "/envoy.service.endpoint.v3.EndpointDiscoveryService/DeltaEndpoints",
        (_, Protocol::Sotw, LISTENER_TYPE) => "/envoy.service.listener.v3.ListenerDiscoveryService/StreamListeners",
        (_, Protocol::Delta, LISTENER_TYPE) => "/envoy.service.listener.v3.ListenerDiscoveryService/DeltaListeners",
        (_, Protocol::Sotw, ROUTE_TYPE) => "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes",
        (_, Protocol::Delta, ROUTE_TYPE) => "/envoy.service.route.v3.RouteDiscoveryService/DeltaRoutes",
        _ => return None,
    };
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_paths_match_the_generated_services() {
        let ads = method_path(Protocol::Sotw, Transport::Ads, "any.type");
        assert!(ads.is_some_and(|p| p.ends_with("/StreamAggregatedResources")));
        let rds = method_path(Protocol::Delta, Transport::PerType, ROUTE_TYPE);
        assert!(rds.is_some_and(|p| p.ends_with("RouteDiscoveryService/DeltaRoutes")));
        for t in [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE] {
            for p in [Protocol::Sotw, Protocol::Delta] {
                let path = method_path(p, Transport::PerType, t).unwrap();
                assert!(path.starts_with("/envoy.service."), "{path}");
            }
        }
        assert_eq!(method_path(Protocol::Sotw, Transport::PerType, "any.type"), None);
    }
}
