//! Why an owner ended a `Watch` stream, as a typed field of the stream's final status.
//!
//! The reason travels in the status details (`grpc-status-details-bin`) the standard way: an
//! encoded `google.rpc.Status` whose details hold one [`WatchEnd`] packed in an `Any`. A
//! follower reads it with [`end_reason`]; the status message stays for people and logs only.

use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message as _;
use tonic::{Code, Status};

use super::proto::WatchEnd;
use super::proto::watch_end::Reason;

/// The `Any` type URL of [`WatchEnd`] in status details.
const WATCH_END_TYPE_URL: &str = "type.googleapis.com/xdsrelay.peer.v1.WatchEnd";

/// The message of the status an owner ends its follower streams with when it shuts down (the
/// text older followers recognised it by).
const OWNER_SHUTTING_DOWN_MESSAGE: &str = "the owner is shutting down";

/// The status an owner ends a follower's stream with when it shuts down: `UNAVAILABLE`,
/// carrying [`Reason::OwnerShuttingDown`].
pub fn owner_shutting_down() -> Status {
    with_reason(Code::Unavailable, OWNER_SHUTTING_DOWN_MESSAGE, Reason::OwnerShuttingDown)
}

/// A status with `code` and `message` whose details carry `reason`.
fn with_reason(code: Code, message: &str, reason: Reason) -> Status {
    let end = WatchEnd { reason: reason.into() };
    let details = RpcStatus {
        code: code.into(),
        message: message.to_owned(),
        details: vec![Any { type_url: WATCH_END_TYPE_URL.to_owned(), value: end.encode_to_vec() }],
    };
    Status::with_details(code, message, details.encode_to_vec().into())
}

/// The reason an owner gave for ending a stream with `status`: `None` when its details carry
/// no [`WatchEnd`] (a transport error, an owner that gives none) or one that does not decode.
pub fn end_reason(status: &Status) -> Option<Reason> {
    let details = RpcStatus::decode(status.details()).ok()?;
    let end = details.details.iter().find(|any| any.type_url == WATCH_END_TYPE_URL)?;
    let end = WatchEnd::decode(end.value.as_slice()).ok()?;
    Reason::try_from(end.reason).ok().filter(|reason| *reason != Reason::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_status_carries_its_typed_reason_through_the_wire() {
        let sent = owner_shutting_down();
        assert_eq!(sent.code(), Code::Unavailable);
        assert_eq!(sent.message(), OWNER_SHUTTING_DOWN_MESSAGE);
        // Through the HTTP/2 trailers and back, as the follower receives it.
        let trailers = sent.into_http::<()>();
        let received = Status::from_header_map(trailers.headers()).unwrap();
        assert_eq!(end_reason(&received), Some(Reason::OwnerShuttingDown));
        assert_eq!(received.code(), Code::Unavailable);
    }

    #[test]
    fn the_message_alone_is_no_reason() {
        let same_text = Status::unavailable(OWNER_SHUTTING_DOWN_MESSAGE);
        assert_eq!(end_reason(&same_text), None, "only the typed field counts");
        assert_eq!(end_reason(&Status::with_details(Code::Unavailable, "x", vec![0xff, 0xff].into())), None);
        let other_detail = RpcStatus {
            code: 14,
            message: String::new(),
            details: vec![Any { type_url: "type.googleapis.com/google.rpc.RetryInfo".into(), value: vec![] }],
        };
        let status = Status::with_details(Code::Unavailable, "x", other_detail.encode_to_vec().into());
        assert_eq!(end_reason(&status), None);
        let unspecified = with_reason(Code::Unavailable, "x", Reason::Unspecified);
        assert_eq!(end_reason(&unspecified), None);
    }
}
