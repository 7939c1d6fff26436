//! Protobuf wire-format helpers for the fan-out path.
//!
//! A `DiscoveryResponse` is encoded once per cache version: its fields other than the nonce
//! are kept as bytes, and every downstream stream sends those bytes followed by its own
//! nonce ([`EncodedResponse`]). Resource names are read straight from the encoded resource
//! without decoding the whole message ([`resource_name`]).
//!
//! Invariant: the bytes produced here decode as a valid `DiscoveryResponse`; field order
//! does not matter to protobuf decoders.

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{Resource as DeltaResource, ResourceError};
use envoy_types::pb::google::protobuf::Any;
use prost::encoding::{self, DecodeContext, WireType};

use crate::xds;

/// Field numbers of `envoy.service.discovery.v3.DiscoveryResponse`.
mod field {
    pub const VERSION_INFO: u32 = 1;
    pub const RESOURCES: u32 = 2;
    pub const CANARY: u32 = 3;
    pub const TYPE_URL: u32 = 4;
    pub const NONCE: u32 = 5;
    pub const CONTROL_PLANE: u32 = 6;
    pub const RESOURCE_ERRORS: u32 = 7;
}

/// Field numbers of `envoy.service.discovery.v3.DeltaDiscoveryResponse` (its nonce is 5 too,
/// so [`EncodedResponse`] serves both kinds).
mod delta_field {
    pub const SYSTEM_VERSION_INFO: u32 = 1;
    pub const RESOURCES: u32 = 2;
    pub const TYPE_URL: u32 = 4;
    pub const REMOVED_RESOURCES: u32 = 6;
    pub const CONTROL_PLANE: u32 = 7;
    pub const RESOURCE_ERRORS: u32 = 9;
}

/// Type URL of the `Resource` wrapper some origins use inside state-of-the-world responses.
pub const RESOURCE_WRAPPER: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// A `DiscoveryResponse` (or `DeltaDiscoveryResponse`) whose fields other than the nonce are
/// already encoded.
///
/// It implements [`prost::Message`] for encoding only, so tonic can send it with the
/// standard codec; decoding one skips every field.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EncodedResponse {
    /// Encoded fields 1-4 and 6 (version, resources, canary, type URL, control plane).
    pub body: Bytes,
    /// The stream's nonce for this response.
    pub nonce: String,
}

impl prost::Message for EncodedResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.body);
        if !self.nonce.is_empty() {
            encoding::string::encode(field::NONCE, &self.nonce, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let nonce = if self.nonce.is_empty() { 0 } else { encoding::string::encoded_len(field::NONCE, &self.nonce) };
        self.body.len() + nonce
    }

    fn clear(&mut self) {
        self.body = Bytes::new();
        self.nonce.clear();
    }
}

/// Encodes the response header: every field but the resources and the nonce.
pub fn encode_header(
    version_info: &str,
    type_url: &str,
    canary: bool,
    control_plane: Option<&ControlPlane>,
    resource_errors: &[ResourceError],
) -> Bytes {
    let mut buf = BytesMut::new();
    if !version_info.is_empty() {
        encoding::string::encode(field::VERSION_INFO, &version_info.to_owned(), &mut buf);
    }
    if canary {
        encoding::bool::encode(field::CANARY, &canary, &mut buf);
    }
    if !type_url.is_empty() {
        encoding::string::encode(field::TYPE_URL, &type_url.to_owned(), &mut buf);
    }
    if let Some(cp) = control_plane {
        encoding::message::encode(field::CONTROL_PLANE, cp, &mut buf);
    }
    encoding::message::encode_repeated(field::RESOURCE_ERRORS, resource_errors, &mut buf);
    buf.freeze()
}

/// Encodes a delta response header: every field but the resources, the removals and the
/// nonce.
pub fn encode_delta_header(
    system_version_info: &str,
    type_url: &str,
    control_plane: Option<&ControlPlane>,
    resource_errors: &[ResourceError],
) -> Bytes {
    let mut buf = BytesMut::new();
    if !system_version_info.is_empty() {
        encoding::string::encode(delta_field::SYSTEM_VERSION_INFO, &system_version_info.to_owned(), &mut buf);
    }
    if !type_url.is_empty() {
        encoding::string::encode(delta_field::TYPE_URL, &type_url.to_owned(), &mut buf);
    }
    if let Some(cp) = control_plane {
        encoding::message::encode(delta_field::CONTROL_PLANE, cp, &mut buf);
    }
    encoding::message::encode_repeated(delta_field::RESOURCE_ERRORS, resource_errors, &mut buf);
    buf.freeze()
}

/// Encodes one `Resource` as a `resources` field of a `DeltaDiscoveryResponse`.
pub fn encode_delta_resource_field(resource: &DeltaResource) -> Bytes {
    let mut buf = BytesMut::with_capacity(encoding::message::encoded_len(delta_field::RESOURCES, resource));
    encoding::message::encode(delta_field::RESOURCES, resource, &mut buf);
    buf.freeze()
}

/// Encodes `removed_resources` of a `DeltaDiscoveryResponse`.
pub fn encode_removed(names: &[String]) -> Bytes {
    let mut buf = BytesMut::new();
    encoding::string::encode_repeated(delta_field::REMOVED_RESOURCES, names, &mut buf);
    buf.freeze()
}

/// Encodes one resource as a `resources` field (tag, length, `Any`), ready to concatenate.
pub fn encode_resource_field(any: &Any) -> Bytes {
    let mut buf = BytesMut::with_capacity(encoding::message::encoded_len(field::RESOURCES, any));
    encoding::message::encode(field::RESOURCES, any, &mut buf);
    buf.freeze()
}

/// Builds a response body from a header and resource fields.
pub fn concat<'a>(header: &Bytes, resources: impl IntoIterator<Item = &'a Bytes>) -> Bytes {
    let resources: Vec<&Bytes> = resources.into_iter().collect();
    let len = header.len() + resources.iter().map(|r| r.len()).sum::<usize>();
    let mut buf = BytesMut::with_capacity(len);
    buf.put_slice(header);
    for r in resources {
        buf.put_slice(r);
    }
    buf.freeze()
}

/// Length of the gRPC message prefix: a compression flag and a big-endian length.
pub const GRPC_PREFIX_LEN: usize = 5;

/// Writes the gRPC prefix of an uncompressed message of `message_len` bytes.
pub fn put_grpc_prefix(buf: &mut impl BufMut, message_len: usize) {
    buf.put_u8(0);
    buf.put_u32(u32::try_from(message_len).unwrap_or(u32::MAX));
}

/// The bytes of the nonce field carrying `nonce` (none for an empty nonce).
pub fn nonce_field_len(nonce: &str) -> usize {
    if nonce.is_empty() {
        0
    } else {
        encoding::key_len(field::NONCE) + encoding::encoded_len_varint(nonce.len() as u64) + nonce.len()
    }
}

/// Appends the nonce field carrying `nonce` (nothing for an empty nonce).
pub fn put_nonce_field(buf: &mut impl BufMut, nonce: &str) {
    if !nonce.is_empty() {
        encoding::encode_key(field::NONCE, WireType::LengthDelimited, buf);
        encoding::encode_varint(nonce.len() as u64, buf);
        buf.put_slice(nonce.as_bytes());
    }
}

/// A whole gRPC message in one buffer: the prefix, `header`, `resources` and the nonce field,
/// ready to be written to any stream as a single HTTP/2 DATA frame; and, as a slice of the
/// same buffer, the body (`header` and `resources`: what [`concat`] would build).
pub fn grpc_message<'a>(header: &Bytes, resources: impl IntoIterator<Item = &'a Bytes>, nonce: &str) -> (Bytes, Bytes) {
    let resources: Vec<&Bytes> = resources.into_iter().collect();
    let body_len = header.len() + resources.iter().map(|r| r.len()).sum::<usize>();
    let nonce_len = nonce_field_len(nonce);
    let mut buf = BytesMut::with_capacity(GRPC_PREFIX_LEN + body_len + nonce_len);
    put_grpc_prefix(&mut buf, body_len + nonce_len);
    buf.put_slice(header);
    for r in resources {
        buf.put_slice(r);
    }
    put_nonce_field(&mut buf, nonce);
    let message = buf.freeze();
    let body = message.slice(GRPC_PREFIX_LEN..GRPC_PREFIX_LEN + body_len);
    (message, body)
}

/// The field number of the name in resources of `type_url` (the `Resource` wrapper's and every
/// named xDS type's); `None` for types whose name field is not known.
pub fn name_field(type_url: &str) -> Option<u32> {
    match type_url {
        RESOURCE_WRAPPER => Some(3),
        xds::LISTENER
        | xds::ROUTE
        | xds::SCOPED_ROUTE
        | xds::VIRTUAL_HOST
        | xds::CLUSTER
        | xds::ENDPOINT
        | xds::SECRET
        | xds::RUNTIME
        | xds::EXTENSION_CONFIG => Some(1),
        _ => None,
    }
}

/// The name of a resource, read from its encoded bytes, for the types whose name field is
/// known; `None` for other types or a malformed resource.
pub fn resource_name(any: &Any) -> Option<String> {
    string_field(&any.value, name_field(any.type_url.as_str())?)
}

/// Reads string field `number` at the top level of a message as a protobuf decoder does:
/// the last occurrence wins (concatenated encodings merge), and a message that does not
/// parse has no name.
fn string_field(mut buf: &[u8], number: u32) -> Option<String> {
    let ctx = DecodeContext::default();
    let mut found: Option<&[u8]> = None;
    while !buf.is_empty() {
        let (tag, wire_type) = encoding::decode_key(&mut buf).ok()?;
        if tag == number && wire_type == WireType::LengthDelimited {
            let len = usize::try_from(encoding::decode_varint(&mut buf).ok()?).ok()?;
            found = Some(buf.get(..len)?);
            buf = &buf[len..];
            continue;
        }
        encoding::skip_field(wire_type, tag, &mut buf, ctx.clone()).ok()?;
    }
    String::from_utf8(found?.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryResponse, Resource};
    use prost::{Message, Name};

    fn any<M: Message + Name>(m: &M) -> Any {
        Any { type_url: M::type_url(), value: m.encode_to_vec() }
    }

    #[test]
    fn encoded_response_decodes_as_discovery_response() {
        let cluster = any(&Cluster { name: "c1".into(), ..Default::default() });
        let cp = ControlPlane { identifier: "origin".into() };
        let header = encode_header("v7", xds::CLUSTER, true, Some(&cp), &[]);
        let body = concat(&header, [&encode_resource_field(&cluster)]);
        let response = EncodedResponse { body, nonce: "n3".into() };
        let decoded = DiscoveryResponse::decode(response.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.version_info, "v7");
        assert_eq!(decoded.type_url, xds::CLUSTER);
        assert_eq!(decoded.nonce, "n3");
        assert!(decoded.canary);
        assert_eq!(decoded.control_plane, Some(cp));
        assert_eq!(decoded.resources, vec![cluster]);
        assert_eq!(response.encoded_len(), response.encode_to_vec().len());
    }

    #[test]
    fn names_are_read_without_decoding() {
        let cla = ClusterLoadAssignment { cluster_name: "backend".into(), ..Default::default() };
        assert_eq!(resource_name(&any(&cla)).as_deref(), Some("backend"));
        let wrapped =
            Resource { name: "wrapped".into(), version: "1".into(), resource: Some(any(&cla)), ..Default::default() };
        assert_eq!(resource_name(&any(&wrapped)).as_deref(), Some("wrapped"));
        let unknown = Any { type_url: "type.googleapis.com/acme.Thing".into(), value: vec![10, 1, b'x'] };
        assert_eq!(resource_name(&unknown), None);
        let garbage = Any { type_url: xds::CLUSTER.into(), value: vec![0xff, 0xff, 0xff] };
        assert_eq!(resource_name(&garbage), None);
    }

    /// Concatenated encodings merge, so the last name is the resource's name, as Envoy reads
    /// it; a resource that does not parse after its name has none.
    #[test]
    fn the_last_name_wins() {
        let first = Cluster { name: "first".into(), alt_stat_name: "s".into(), ..Default::default() };
        let last = Cluster { name: "last".into(), ..Default::default() };
        let merged = [first.encode_to_vec(), last.encode_to_vec()].concat();
        let decoded = Cluster::decode(merged.as_slice()).unwrap();
        let any = Any { type_url: xds::CLUSTER.into(), value: merged.clone() };
        assert_eq!(resource_name(&any), Some(decoded.name));
        let truncated =
            Any { type_url: xds::CLUSTER.into(), value: [first.encode_to_vec(), vec![0x12, 5, b'x']].concat() };
        assert_eq!(resource_name(&truncated), None);
    }
}
