//! Request- and key-level limits of the `limits:` section, as pure checks, and what a client
//! or a follower that hits one gets.
//!
//! Every refusal is a [`LimitRefusal`]: its gRPC status (`INVALID_ARGUMENT` for a request
//! that is malformed by its size, `RESOURCE_EXHAUSTED` for one the node has no room for)
//! names the limit as `limits.<field>` with its value, [`LimitRefusal::field`] is the label of
//! `limit_refusals_total{limit}`, and [`LimitRefusal::log`] writes the warning (at most one
//! per limit and second, so a client retrying in a loop cannot flood the log).
//!
//! [`StreamError`] tells apart how a request stream can fail (over the request size limit,
//! undecodable, or a transport error), from the status code tonic gives and whether the
//! error came from the transport (it then has a source), never from its message.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::Node;
use prost::Message as _;
use tonic::{Code, Status};

/// A request refused because it would exceed a limit of the `limits:` section.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitRefusal {
    /// The aggregation key is longer than `max_key_length`.
    #[error("the aggregation key is {length} bytes, over limits.max_key_length ({limit})")]
    KeyLength {
        /// The key's length in bytes.
        length: usize,
        /// The limit.
        limit: usize,
    },
    /// The subscription of one stream and type names more than `max_names_per_request`.
    #[error("the request subscribes to {names} resource names, over limits.max_names_per_request ({limit})")]
    NamesPerRequest {
        /// Names after the request was applied.
        names: usize,
        /// The limit.
        limit: usize,
    },
    /// The request's node is larger than `max_node_bytes`.
    #[error("the request's node is {bytes} bytes encoded, over limits.max_node_bytes ({limit})")]
    NodeBytes {
        /// The node's encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// This node already has `max_active_keys` keys with clients or followers.
    #[error(
        "the relay already serves limits.max_active_keys ({limit}) keys with clients; key {key} cannot be opened, try another relay"
    )]
    ActiveKeys {
        /// The key that would have been opened.
        key: String,
        /// The limit.
        limit: usize,
    },
    /// The key's union of names (what is asked upstream) would exceed `max_names_per_key`.
    #[error(
        "the names of this request would take key {key} to {names} resource names, over limits.max_names_per_key ({limit})"
    )]
    NamesPerKey {
        /// The key.
        key: String,
        /// Names the union would have held.
        names: usize,
        /// The limit.
        limit: usize,
    },
    /// A request message is larger than `max_request_bytes`.
    #[error("a request message is larger than limits.max_request_bytes ({limit} bytes): {detail}")]
    RequestBytes {
        /// The limit.
        limit: usize,
        /// The decoder's message.
        detail: String,
    },
}

impl LimitRefusal {
    /// The limit's field in the `limits:` section (the `limit` label of the metric).
    pub fn field(&self) -> &'static str {
        match self {
            Self::KeyLength { .. } => "max_key_length",
            Self::NamesPerRequest { .. } => "max_names_per_request",
            Self::NodeBytes { .. } => "max_node_bytes",
            Self::ActiveKeys { .. } => "max_active_keys",
            Self::NamesPerKey { .. } => "max_names_per_key",
            Self::RequestBytes { .. } => "max_request_bytes",
        }
    }

    /// The status the client gets: `INVALID_ARGUMENT` for a request too large in itself (it
    /// would be refused by any relay), `RESOURCE_EXHAUSTED` for one this node has no room for.
    pub fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Self::KeyLength { .. } | Self::NamesPerRequest { .. } | Self::NodeBytes { .. } => {
                Status::invalid_argument(message)
            }
            Self::ActiveKeys { .. } | Self::NamesPerKey { .. } | Self::RequestBytes { .. } => {
                Status::resource_exhausted(message)
            }
        }
    }

    /// Logs the refusal as a warning naming `peer` and `who` (a node id or a follower),
    /// unless this limit was already logged in the current second: then it is only counted,
    /// and the next line says how many were not logged.
    pub fn log(&self, peer: &str, who: &str) {
        if let Some(suppressed) = LOG_GATE.admit(self.field()) {
            tracing::warn!(peer = %peer, node = %who, limit = self.field(), suppressed, error = %self, "request refused by a limit");
        }
    }
}

/// How long a stream's final status may wait for room in its response queue: a client or
/// follower that reads nothing for that long does not get it, and the stream's task ends, so
/// a stopping server never waits longer than this for one stream.
pub const FINAL_STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends a stream's final `status` on `tx`, waiting at most [`FINAL_STATUS_WAIT`] for room;
/// returns whether it was queued.
pub async fn send_final_status<T>(tx: &tokio::sync::mpsc::Sender<Result<T, Status>>, status: Status) -> bool {
    matches!(tokio::time::timeout(FINAL_STATUS_WAIT, tx.send(Err(status))).await, Ok(Ok(())))
}

/// Checks the length of an aggregation key.
///
/// # Errors
/// [`LimitRefusal::KeyLength`] when `key` is longer than `limit` bytes.
pub fn check_key_length(key: &str, limit: usize) -> Result<(), LimitRefusal> {
    if key.len() > limit {
        return Err(LimitRefusal::KeyLength { length: key.len(), limit });
    }
    Ok(())
}

/// Checks how many names one stream's subscription of one type holds.
///
/// # Errors
/// [`LimitRefusal::NamesPerRequest`] when `names` is over `limit`.
pub fn check_names_per_request(names: usize, limit: usize) -> Result<(), LimitRefusal> {
    if names > limit {
        return Err(LimitRefusal::NamesPerRequest { names, limit });
    }
    Ok(())
}

/// Checks the encoded size of a request's node (`None`: the request carries none).
///
/// # Errors
/// [`LimitRefusal::NodeBytes`] when it is over `limit` bytes.
pub fn check_node(node: Option<&Node>, limit: usize) -> Result<(), LimitRefusal> {
    let bytes = node.map_or(0, Node::encoded_len);
    if bytes > limit {
        return Err(LimitRefusal::NodeBytes { bytes, limit });
    }
    Ok(())
}

/// How a request stream failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// A message over the request size limit (the decoder's `OUT_OF_RANGE`, or
    /// `RESOURCE_EXHAUSTED` while decompressing).
    TooLarge,
    /// A message that does not decode (the decoder's `INTERNAL`, with no transport error
    /// behind it).
    Malformed,
    /// The transport failed or the client reset the stream: the status to pass on.
    Transport,
}

/// Classifies a request stream's error by the status code the decoder gives and whether the
/// status carries a transport error as its source (tonic sets one for HTTP/2 and body errors;
/// its own decoding errors have none).
pub fn classify_stream_error(status: &Status) -> StreamError {
    if std::error::Error::source(status).is_some() {
        return StreamError::Transport;
    }
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => StreamError::TooLarge,
        Code::Internal => StreamError::Malformed,
        _ => StreamError::Transport,
    }
}

/// Lets one warning per limit through each second, counting the others.
///
/// Hand-written (a few atomics): the crates that rate-limit (`governor`) bring far more than
/// "one line per second per limit" needs.
struct LogGate {
    /// Per limit (in [`FIELDS`] order): the second of the last line logged, and how many
    /// were suppressed since.
    slots: [(AtomicU64, AtomicU64); FIELDS.len()],
}

const FIELDS: [&str; 6] = [
    "max_key_length",
    "max_names_per_request",
    "max_node_bytes",
    "max_active_keys",
    "max_names_per_key",
    "max_request_bytes",
];

static LOG_GATE: LogGate = LogGate { slots: [const { (AtomicU64::new(0), AtomicU64::new(0)) }; FIELDS.len()] };

impl LogGate {
    /// `Some(suppressed since the last line)` when a line for `field` may be logged now.
    fn admit(&self, field: &str) -> Option<u64> {
        let Some(i) = FIELDS.iter().position(|f| *f == field) else { return Some(0) };
        let (last, suppressed) = &self.slots[i];
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) + 1;
        let before = last.load(Ordering::Relaxed);
        if before != now && last.compare_exchange(before, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            return Some(suppressed.swap(0, Ordering::AcqRel));
        }
        suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_final_status_waits_for_a_reader_at_most_final_status_wait() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(), Status>>(1);
        tx.send(Ok(())).await.unwrap(); // the queue is full: the client reads nothing
        let started = tokio::time::Instant::now();
        assert!(!send_final_status(&tx, Status::unavailable("stopping")).await);
        assert_eq!(started.elapsed(), FINAL_STATUS_WAIT);
        // A client that reads gets it.
        rx.recv().await.unwrap().unwrap();
        assert!(send_final_status(&tx, Status::unavailable("stopping")).await);
        assert_eq!(rx.recv().await.unwrap().unwrap_err().message(), "stopping");
    }

    #[test]
    fn checks_refuse_only_over_the_limit() {
        assert!(check_key_length("abcd", 4).is_ok());
        let refusal = check_key_length("abcde", 4).unwrap_err();
        assert_eq!(refusal, LimitRefusal::KeyLength { length: 5, limit: 4 });
        assert!(check_names_per_request(3, 3).is_ok());
        assert_eq!(check_names_per_request(4, 3).unwrap_err().field(), "max_names_per_request");
        let node = Node { id: "x".repeat(100), ..Node::default() };
        assert!(check_node(Some(&node), node.encoded_len()).is_ok());
        assert!(check_node(None, 1).is_ok());
        let refusal = check_node(Some(&node), 50).unwrap_err();
        assert_eq!(refusal, LimitRefusal::NodeBytes { bytes: node.encoded_len(), limit: 50 });
    }

    #[test]
    fn each_refusal_names_its_limit_and_value_with_its_code() {
        let cases = [
            (LimitRefusal::KeyLength { length: 9, limit: 8 }, Code::InvalidArgument, "limits.max_key_length (8)"),
            (
                LimitRefusal::NamesPerRequest { names: 9, limit: 8 },
                Code::InvalidArgument,
                "limits.max_names_per_request (8)",
            ),
            (LimitRefusal::NodeBytes { bytes: 9, limit: 8 }, Code::InvalidArgument, "limits.max_node_bytes (8)"),
            (
                LimitRefusal::ActiveKeys { key: "k".into(), limit: 8 },
                Code::ResourceExhausted,
                "limits.max_active_keys (8)",
            ),
            (
                LimitRefusal::NamesPerKey { key: "k".into(), names: 9, limit: 8 },
                Code::ResourceExhausted,
                "limits.max_names_per_key (8)",
            ),
            (
                LimitRefusal::RequestBytes { limit: 8, detail: "d".into() },
                Code::ResourceExhausted,
                "limits.max_request_bytes (8 bytes)",
            ),
        ];
        for (refusal, code, named) in cases {
            let status = refusal.status();
            assert_eq!(status.code(), code, "{refusal:?}");
            assert!(status.message().contains(named), "{}", status.message());
            assert!(named.contains(refusal.field()));
            assert!(FIELDS.contains(&refusal.field()));
        }
    }

    #[test]
    fn stream_errors_are_told_apart_by_code_and_source() {
        let too_large = Status::out_of_range("Error, decoded message length too large: found 9 bytes, the limit is: 8");
        assert_eq!(classify_stream_error(&too_large), StreamError::TooLarge);
        let malformed = Status::internal("failed to decode Protobuf message: invalid wire type");
        assert_eq!(classify_stream_error(&malformed), StreamError::Malformed);
        assert_eq!(classify_stream_error(&Status::cancelled("reset")), StreamError::Transport);
        let transport = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert_eq!(classify_stream_error(&transport), StreamError::Transport);
    }

    #[test]
    fn the_log_gate_lets_one_line_per_second_through() {
        let gate = LogGate { slots: [const { (AtomicU64::new(0), AtomicU64::new(0)) }; FIELDS.len()] };
        assert_eq!(gate.admit("max_key_length"), Some(0));
        // The rest of this second is counted, unless the second turned over in between.
        let more: Vec<Option<u64>> = (0..3).map(|_| gate.admit("max_key_length")).collect();
        assert!(more.iter().filter(|m| m.is_some()).count() <= 1, "{more:?}");
        assert_eq!(gate.admit("max_node_bytes"), Some(0), "each limit has its own gate");
    }
}
