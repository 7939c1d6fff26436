//! A state-of-the-world response as the load generator reads it: the envelope decoded, each
//! resource kept as its encoded `google.protobuf.Any`, sharing the received buffer instead of
//! being copied into a `type_url` string and a `value` vector. At 10k streams a full
//! `DiscoveryResponse` decode is most of the load generator's CPU (two allocations per
//! resource per stream per update); the resources are only counted, or their names read.
//!
//! Invariant: it decodes every `DiscoveryResponse` the same as prost's generated type for
//! the fields it keeps, and skips the others.

use bytes::{Buf, BufMut, Bytes};
use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use prost::DecodeError;
use prost::encoding::{self, DecodeContext, WireType};

/// Field numbers of `envoy.service.discovery.v3.DiscoveryResponse`.
mod field {
    pub const VERSION_INFO: u32 = 1;
    pub const RESOURCES: u32 = 2;
    pub const TYPE_URL: u32 = 4;
    pub const NONCE: u32 = 5;
    pub const CONTROL_PLANE: u32 = 6;
}

/// The parts of a `DiscoveryResponse` the load generator uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SotwResponse {
    /// `version_info`.
    pub version_info: String,
    /// Every resource, as its encoded `Any`.
    pub resources: Vec<Bytes>,
    /// `type_url`.
    pub type_url: String,
    /// `nonce`.
    pub nonce: String,
    /// `control_plane`.
    pub control_plane: Option<ControlPlane>,
}

impl prost::Message for SotwResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.version_info.is_empty() {
            encoding::string::encode(field::VERSION_INFO, &self.version_info, buf);
        }
        for resource in &self.resources {
            encoding::bytes::encode(field::RESOURCES, resource, buf);
        }
        if !self.type_url.is_empty() {
            encoding::string::encode(field::TYPE_URL, &self.type_url, buf);
        }
        if !self.nonce.is_empty() {
            encoding::string::encode(field::NONCE, &self.nonce, buf);
        }
        if let Some(control_plane) = &self.control_plane {
            encoding::message::encode(field::CONTROL_PLANE, control_plane, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            field::VERSION_INFO => encoding::string::merge(wire_type, &mut self.version_info, buf, ctx),
            field::RESOURCES => {
                let mut resource = Bytes::new();
                encoding::bytes::merge(wire_type, &mut resource, buf, ctx)?;
                self.resources.push(resource);
                Ok(())
            }
            field::TYPE_URL => encoding::string::merge(wire_type, &mut self.type_url, buf, ctx),
            field::NONCE => encoding::string::merge(wire_type, &mut self.nonce, buf, ctx),
            field::CONTROL_PLANE => {
                encoding::message::merge(wire_type, self.control_plane.get_or_insert_with(Default::default), buf, ctx)
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let string = |tag, s: &String| if s.is_empty() { 0 } else { encoding::string::encoded_len(tag, s) };
        string(field::VERSION_INFO, &self.version_info)
            + self.resources.iter().map(|r| encoding::bytes::encoded_len(field::RESOURCES, r)).sum::<usize>()
            + string(field::TYPE_URL, &self.type_url)
            + string(field::NONCE, &self.nonce)
            + self.control_plane.as_ref().map_or(0, |c| encoding::message::encoded_len(field::CONTROL_PLANE, c))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Only the `value` of a `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct AnyValue {
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
}

/// The `value` of an encoded `Any` (empty when absent), sharing its bytes instead of copying.
///
/// # Errors
///
/// When the bytes are not a valid message.
pub fn any_value(encoded: &Bytes) -> Result<Bytes, DecodeError> {
    use prost::Message as _;
    AnyValue::decode(encoded.clone()).map(|any| any.value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::Any;
    use prost::Message as _;

    #[test]
    fn decodes_like_the_generated_type_and_keeps_each_any_whole() {
        let resources = vec![
            Any { type_url: "t/a".into(), value: vec![10, 1, b'a'] },
            Any { type_url: "t/b".into(), value: vec![] },
        ];
        let full = DiscoveryResponse {
            version_info: "v7".into(),
            resources: resources.clone(),
            canary: true,
            type_url: "t".into(),
            nonce: "3".into(),
            control_plane: Some(ControlPlane { identifier: "cp".into() }),
            ..Default::default()
        };
        let encoded = full.encode_to_vec();
        let skim = SotwResponse::decode(encoded.as_slice()).unwrap();
        assert_eq!((skim.version_info.as_str(), skim.type_url.as_str(), skim.nonce.as_str()), ("v7", "t", "3"));
        assert_eq!(skim.control_plane.as_ref().map(|c| c.identifier.as_str()), Some("cp"));
        let decoded: Vec<Any> = skim.resources.iter().map(|r| Any::decode(r.as_ref()).unwrap()).collect();
        assert_eq!(decoded, resources);
        assert_eq!(any_value(&skim.resources[0]).unwrap().as_ref(), [10, 1, b'a']);
        assert!(any_value(&skim.resources[1]).unwrap().is_empty());
        // Re-encoding keeps every field it holds (canary is not one of them).
        let again = DiscoveryResponse::decode(skim.encode_to_vec().as_slice()).unwrap();
        assert_eq!(again, DiscoveryResponse { canary: false, ..full });
        assert_eq!(skim.encoded_len(), skim.encode_to_vec().len());
        assert!(any_value(&Bytes::from_static(&[0x12, 0x05, 1])).is_err(), "truncated value");
    }
}
