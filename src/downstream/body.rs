//! The HTTP/2 response body of a downstream stream, written without copying responses.
//!
//! Every response a stream sends is a key version's body, encoded once and shared by every
//! stream. tonic's encoder would copy the whole body into a per-stream buffer (and keep that
//! buffer, as large as the largest response, for the life of the stream). This body instead
//! hands HTTP/2 the shared bytes by reference:
//! - a whole message shared by every stream sent the same state ([`Outgoing::Shared`]: the
//!   prefix, the fields and a nonce that belongs to the state), as one chunk, so one DATA
//!   frame per response on the common path;
//! - or a shared body with the stream's own nonce ([`Outgoing::Own`]), as two chunks: a small
//!   one with the gRPC length prefix and the nonce field, then the body itself. Protobuf
//!   decoders accept fields in any order, so the nonce may come first.
//!
//! Invariants: messages go out whole and in order; the body ends with the gRPC status in
//! trailers (`OK` when the response stream ends, the stream's status when it fails); nothing
//! is polled from the response stream while HTTP/2 flow control holds the body, so a slow
//! client keeps only the latest-wins queue of its stream.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http::HeaderMap;
use http_body::Frame;
use tonic::Status;

use super::stream::{Outgoing, ResponseStream};
use crate::wire::{self, EncodedResponse};

/// A downstream stream's response body (see the module doc).
pub(super) struct ResponseBody {
    responses: ResponseStream,
    /// The shared body of the message whose prefix was just sent.
    pending: Option<Bytes>,
    done: bool,
}

impl ResponseBody {
    /// The body of a stream whose responses come from `responses`.
    pub(super) fn new(responses: ResponseStream) -> Self {
        Self { responses, pending: None, done: false }
    }
}

/// The gRPC prefix and the nonce field of `response`, whose `body` follows them.
fn head(response: &EncodedResponse) -> Bytes {
    let nonce_len = wire::nonce_field_len(&response.nonce);
    let mut head = BytesMut::with_capacity(wire::GRPC_PREFIX_LEN + nonce_len);
    wire::put_grpc_prefix(&mut head, nonce_len + response.body.len());
    wire::put_nonce_field(&mut head, &response.nonce);
    head.freeze()
}

/// Trailers carrying `status`.
fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(3);
    if status.add_header(&mut map).is_err() {
        map.insert("grpc-status", http::HeaderValue::from_static("13"));
    }
    map
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(body) = this.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(body))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.responses).poll_next(cx)) {
            Some(Ok(Outgoing::Shared(message))) => Poll::Ready(Some(Ok(Frame::data(message)))),
            Some(Ok(Outgoing::Own(response))) => {
                let head = head(&response);
                if !response.body.is_empty() {
                    this.pending = Some(response.body);
                }
                Poll::Ready(Some(Ok(Frame::data(head))))
            }
            Some(Err(status)) => {
                this.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))))
            }
            None => {
                this.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers(&Status::ok(""))))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use http_body_util::BodyExt as _;
    use prost::Message as _;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    /// Splits gRPC length-prefixed messages.
    fn messages(mut data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !data.is_empty() {
            assert_eq!(data[0], 0, "uncompressed");
            let len = u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize;
            out.push(data[5..5 + len].to_vec());
            data = &data[5 + len..];
        }
        out
    }

    #[tokio::test]
    async fn messages_decode_whole_and_in_order_then_ok_trailers() {
        let full = DiscoveryResponse { version_info: "v1".into(), type_url: "t".into(), ..Default::default() };
        let body = Bytes::from(full.encode_to_vec());
        let (tx, rx) = mpsc::channel(4);
        tx.send(Ok(Outgoing::Own(EncodedResponse { body: body.clone(), nonce: "1".into() }))).await.unwrap();
        tx.send(Ok(Outgoing::Own(EncodedResponse { body: body.clone(), nonce: String::new() }))).await.unwrap();
        drop(tx);
        let collected = ResponseBody::new(ReceiverStream::new(rx)).collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        let data = collected.to_bytes();
        let decoded: Vec<DiscoveryResponse> =
            messages(&data).iter().map(|m| DiscoveryResponse::decode(m.as_slice()).unwrap()).collect();
        assert_eq!(decoded.len(), 2);
        assert_eq!((decoded[0].version_info.as_str(), decoded[0].nonce.as_str()), ("v1", "1"));
        assert_eq!((decoded[1].type_url.as_str(), decoded[1].nonce.as_str()), ("t", ""));
    }

    #[tokio::test]
    async fn a_failed_stream_ends_with_its_status_and_the_body_is_not_copied() {
        let body = Bytes::from(vec![0x0a, 0x02, b'v', b'2']);
        let (tx, rx) = mpsc::channel(4);
        tx.send(Ok(Outgoing::Own(EncodedResponse { body: body.clone(), nonce: "7".into() }))).await.unwrap();
        tx.send(Err(Status::unavailable("relay shutting down"))).await.unwrap();
        let mut response = ResponseBody::new(ReceiverStream::new(rx));
        let head = response.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(head.len(), wire::GRPC_PREFIX_LEN + 3, "prefix and nonce field only");
        let shared = response.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(shared.as_ptr(), body.as_ptr(), "the shared body itself");
        let trailers = response.frame().await.unwrap().unwrap().into_trailers().unwrap();
        assert_eq!(trailers.get("grpc-status").unwrap(), "14");
        assert_eq!(trailers.get("grpc-message").unwrap(), "relay%20shutting%20down");
        assert!(response.frame().await.is_none());
        assert!(http_body::Body::is_end_stream(&response));
    }
}
