//! One record file: a key's last-known-good state, framed so that a torn, truncated or
//! altered file is recognised and never served.
//!
//! Layout: [`MAGIC`] (8 bytes), the SHA-256 of the body (32 bytes), then the body: a
//! [`Record`] encoded with protobuf. The record carries its own format version; a file of
//! another version is skipped (never guessed at).

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::cache::{Interest, KeyState};
use crate::peer::proto;

/// The first bytes of every record file.
pub const MAGIC: &[u8; 8] = b"XRLKG\x00\x01\n";

/// The format version this relay writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes before the body: the magic and the checksum.
pub const HEADER_LEN: usize = MAGIC.len() + 32;

/// A key's state as kept on disk. The coverage is in the peer protocol's encoding, the one
/// an owner sends its followers; the response is the full state an owner forwards.
#[derive(Clone, PartialEq, Message)]
pub struct Record {
    /// [`FORMAT_VERSION`] of the writer.
    #[prost(uint32, tag = "1")]
    pub format: u32,
    /// The aggregation key.
    #[prost(string, tag = "2")]
    pub key: String,
    /// The key's type URL.
    #[prost(string, tag = "3")]
    pub type_url: String,
    /// The state's `version_info` (also inside `response`; kept for inspection).
    #[prost(string, tag = "4")]
    pub version_info: String,
    /// What the upstream subscription asked for when the state arrived.
    #[prost(message, optional, tag = "5")]
    pub coverage: Option<proto::Interest>,
    /// The `envoy.config.core.v3.Node` the key is asked upstream with, encoded.
    #[prost(bytes = "vec", tag = "6")]
    pub node: Vec<u8>,
    /// The full state: an encoded `DiscoveryResponse` without nonce.
    #[prost(bytes = "bytes", tag = "7")]
    pub response: bytes::Bytes,
    /// When the record was written, in milliseconds since the Unix epoch.
    #[prost(uint64, tag = "8")]
    pub written_unix_ms: u64,
}

/// Why a record file was not loaded; each is a `reason` of `persist_records_skipped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Not a record file: too short or without the magic bytes.
    Corrupt,
    /// The body does not match its checksum (torn, truncated or altered).
    Checksum,
    /// Larger than the bound on a record.
    TooLarge,
    /// The body, its node or its response does not decode, or the record sits under another
    /// key's file name.
    Decode,
    /// Written in another format version.
    Version,
    /// The state fails the checks a forwarded state passes.
    Rejected,
    /// The cache was full (`cache.max_entries`) or already held the key.
    Full,
}

impl SkipReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Corrupt => "corrupt",
            Self::Checksum => "checksum",
            Self::TooLarge => "too_large",
            Self::Decode => "decode",
            Self::Version => "version",
            Self::Rejected => "rejected",
            Self::Full => "full",
        }
    }
}

impl Record {
    /// The record of `state`, the current state of `key` asked upstream as `node`; `None`
    /// when the state must not be kept: not ready yet, or holding a `do_not_cache` resource
    /// (which may reach only the clients watching when it arrived, never a later one).
    pub fn of_state(key: &str, type_url: &str, node: &Node, state: &KeyState) -> Option<Self> {
        if !state.is_ready() || state.uncacheable {
            return None;
        }
        let written = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Some(Self {
            format: FORMAT_VERSION,
            key: key.to_owned(),
            type_url: type_url.to_owned(),
            version_info: state.version_info.clone(),
            coverage: Some((&state.coverage).into()),
            node: node.encode_to_vec(),
            response: state.full_message(false).body.clone(),
            written_unix_ms: u64::try_from(written.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// The record as a file's bytes: magic, checksum, body.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        let body = self.encode_to_vec();
        let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&Sha256::digest(&body));
        bytes.extend_from_slice(&body);
        bytes
    }

    /// Reads a record from a file's bytes.
    ///
    /// # Errors
    /// The [`SkipReason`] when the bytes are not a whole record of this format.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, SkipReason> {
        if bytes.len() < HEADER_LEN || &bytes[..MAGIC.len()] != MAGIC {
            return Err(SkipReason::Corrupt);
        }
        let (checksum, body) = bytes[MAGIC.len()..].split_at(32);
        if Sha256::digest(body).as_slice() != checksum {
            return Err(SkipReason::Checksum);
        }
        let record = Self::decode(body).map_err(|_| SkipReason::Decode)?;
        if record.format != FORMAT_VERSION {
            return Err(SkipReason::Version);
        }
        Ok(record)
    }

    /// The node, the response and the coverage the record holds.
    ///
    /// # Errors
    /// [`SkipReason::Decode`] when the node or the response does not decode.
    pub fn parts(&self) -> Result<(Node, DiscoveryResponse, Interest), SkipReason> {
        let node = Node::decode(self.node.as_slice()).map_err(|_| SkipReason::Decode)?;
        let response = DiscoveryResponse::decode(self.response.clone()).map_err(|_| SkipReason::Decode)?;
        Ok((node, response, self.coverage.clone().into()))
    }
}

/// The file name of `key`'s record: the hex SHA-256 of the key (keys are arbitrary text),
/// with the extension [`super::RECORD_EXTENSION`].
pub fn file_name(key: &str) -> String {
    use std::fmt::Write;
    let digest = Sha256::digest(key.as_bytes());
    let mut name = String::with_capacity(64 + 4);
    for byte in digest {
        let _ = write!(name, "{byte:02x}");
    }
    name.push('.');
    name.push_str(super::RECORD_EXTENSION);
    name
}
