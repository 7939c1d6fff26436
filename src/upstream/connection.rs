//! Dialling one pooled origin connection: TCP (and TLS when `origin_server.tls` is set), with
//! the origin's HTTP/2 SETTINGS read off the wire as hyper reads them.
//!
//! Neither tonic's `Channel` nor hyper's HTTP/2 client exposes the peer's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`, and streams beyond it wait inside h2 with no sign. The
//! frames the origin sends are therefore scanned in passing ([`SettingsScanner`]): the scanner
//! only follows frame boundaries and reads the parameters of SETTINGS frames; it never changes,
//! holds back or buffers the bytes hyper reads, so h2 still does all validation.
//!
//! Invariants: the scanner keeps a fixed-size state whatever the input (no allocation, no
//! panic on hostile bytes); every connection reports its SETTINGS frames and its end (failed
//! dial, GOAWAY, end of stream, read error) to its [`ConnectionEvents`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::TlsConnector;

/// HTTP/2 frame type of SETTINGS (RFC 9113 §6.5).
const FRAME_SETTINGS: u8 = 0x4;
/// HTTP/2 frame type of GOAWAY (RFC 9113 §6.8).
const FRAME_GOAWAY: u8 = 0x7;
/// SETTINGS flag marking an acknowledgement (no parameters).
const FLAG_ACK: u8 = 0x1;
/// Identifier of `SETTINGS_MAX_CONCURRENT_STREAMS`.
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// Length of a frame header.
const FRAME_HEADER_LEN: usize = 9;
/// Length of one SETTINGS parameter.
const SETTING_LEN: usize = 6;

/// What a pooled connection reports about itself.
pub(super) trait ConnectionEvents: Send + Sync + 'static {
    /// The origin sent a SETTINGS frame; `max_concurrent_streams` is the value it carried
    /// for `SETTINGS_MAX_CONCURRENT_STREAMS`, `None` when it left the parameter out.
    fn settings(&self, max_concurrent_streams: Option<u32>);
    /// The connection failed to open, ended, or is ending (the origin sent GOAWAY: it takes
    /// no new streams); `reason` says how.
    fn ended(&self, reason: &str);
}

/// A frame of the origin's that the pool acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ServerFrame {
    /// A SETTINGS frame (not an ACK), with the `SETTINGS_MAX_CONCURRENT_STREAMS` it carried.
    Settings(Option<u32>),
    /// A GOAWAY frame: the connection takes no new streams.
    GoAway,
}

// === SettingsScanner ===

/// Follows the HTTP/2 frames of a byte stream sent by a server (which starts with frames: the
/// server's connection preface is a SETTINGS frame) and reports each SETTINGS and GOAWAY
/// frame.
///
/// Written by hand because no crate parses frames without also owning the connection (h2 does,
/// and hyper keeps its h2 connection private); the state is three small fields.
#[derive(Debug, Default)]
pub(super) struct SettingsScanner {
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    remaining: usize,
    /// The current frame is a SETTINGS frame (not an ACK) whose parameters are read.
    in_settings: bool,
    setting: [u8; SETTING_LEN],
    setting_len: usize,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` of the current SETTINGS frame, if it carried one.
    max_concurrent_streams: Option<u32>,
}

impl SettingsScanner {
    /// Reads `bytes` (the next bytes of the stream) and calls `on_frame` once per complete
    /// SETTINGS frame and once per GOAWAY frame header.
    pub(super) fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(ServerFrame)) {
        while !bytes.is_empty() {
            if self.remaining == 0 && self.header_len < FRAME_HEADER_LEN {
                let take = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
                self.header_len += take;
                bytes = &bytes[take..];
                if self.header_len == FRAME_HEADER_LEN {
                    self.start_frame(&mut on_frame);
                }
                continue;
            }
            let take = self.remaining.min(bytes.len());
            if self.in_settings {
                for &byte in &bytes[..take] {
                    self.setting[self.setting_len] = byte;
                    self.setting_len += 1;
                    if self.setting_len == SETTING_LEN {
                        self.setting_len = 0;
                        let id = u16::from_be_bytes([self.setting[0], self.setting[1]]);
                        if id == SETTINGS_MAX_CONCURRENT_STREAMS {
                            let value = [self.setting[2], self.setting[3], self.setting[4], self.setting[5]];
                            self.max_concurrent_streams = Some(u32::from_be_bytes(value));
                        }
                    }
                }
            }
            self.remaining -= take;
            bytes = &bytes[take..];
            if self.remaining == 0 {
                self.end_frame(&mut on_frame);
            }
        }
    }

    fn start_frame(&mut self, on_frame: &mut impl FnMut(ServerFrame)) {
        let h = self.header;
        self.remaining = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        self.in_settings = h[3] == FRAME_SETTINGS && h[4] & FLAG_ACK == 0 && stream_id == 0;
        self.setting_len = 0;
        self.max_concurrent_streams = None;
        if h[3] == FRAME_GOAWAY && stream_id == 0 {
            on_frame(ServerFrame::GoAway);
        }
        if self.remaining == 0 {
            self.end_frame(on_frame);
        }
    }

    fn end_frame(&mut self, on_frame: &mut impl FnMut(ServerFrame)) {
        if self.in_settings {
            on_frame(ServerFrame::Settings(self.max_concurrent_streams));
        }
        self.header_len = 0;
        self.in_settings = false;
    }
}

// === ScannedStream ===

/// A connection's byte stream whose reads pass through a [`SettingsScanner`].
pub(super) struct ScannedStream {
    inner: Box<dyn Io>,
    scanner: SettingsScanner,
    events: Arc<dyn ConnectionEvents>,
    ended: bool,
}

/// A bidirectional byte stream (plain TCP or TLS).
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

impl ScannedStream {
    fn new(inner: Box<dyn Io>, events: Arc<dyn ConnectionEvents>) -> Self {
        Self { inner, scanner: SettingsScanner::default(), events, ended: false }
    }

    fn end(&mut self, reason: &str) {
        if !self.ended {
            self.ended = true;
            self.events.ended(reason);
        }
    }
}

impl AsyncRead for ScannedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if read.is_empty() && buf.remaining() > 0 {
                    this.end("the origin closed the connection");
                } else {
                    let events = &this.events;
                    this.scanner.feed(read, |frame| match frame {
                        ServerFrame::Settings(limit) => events.settings(limit),
                        ServerFrame::GoAway => events.ended("the origin sent GOAWAY"),
                    });
                }
            }
            Poll::Ready(Err(error)) => {
                let reason = format!("read error: {error}");
                this.end(&reason);
            }
            Poll::Pending => {}
        }
        polled
    }
}

impl AsyncWrite for ScannedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Drop for ScannedStream {
    fn drop(&mut self) {
        self.end("the connection was dropped");
    }
}

// === PooledConnector ===

/// The connector of one pooled connection's channel: dials TCP (then TLS through `tls`) and
/// wraps the stream in a [`ScannedStream`] reporting to `events`.
#[derive(Clone)]
pub(super) struct PooledConnector {
    tls: Option<TlsConnector>,
    events: Arc<dyn ConnectionEvents>,
}

impl PooledConnector {
    /// A connector for one pooled connection.
    pub(super) fn new(tls: Option<TlsConnector>, events: Arc<dyn ConnectionEvents>) -> Self {
        Self { tls, events }
    }
}

/// Reports a dial that did not finish (failed, or abandoned by the connect timeout).
struct DialGuard(Option<Arc<dyn ConnectionEvents>>);

impl Drop for DialGuard {
    fn drop(&mut self) {
        if let Some(events) = self.0.take() {
            events.ended("the connection could not be opened");
        }
    }
}

impl tower::Service<Uri> for PooledConnector {
    type Response = TokioIo<ScannedStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut tls = self.tls.clone();
        let events = self.events.clone();
        Box::pin(async move {
            let mut guard = DialGuard(Some(events.clone()));
            let stream: Box<dyn Io> = match &mut tls {
                Some(tls) => Box::new(tower::ServiceExt::oneshot(tls.clone(), uri).await?.into_inner()),
                None => {
                    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
                    let port = uri.port_u16().unwrap_or(80);
                    let tcp = TcpStream::connect((host, port)).await?;
                    tcp.set_nodelay(true)?;
                    Box::new(tcp)
                }
            };
            guard.0 = None;
            Ok(TokioIo::new(ScannedStream::new(stream, events)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn settings(params: &[(u16, u32)]) -> Vec<u8> {
        let payload: Vec<u8> =
            params.iter().flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes())).collect();
        frame(FRAME_SETTINGS, 0, 0, &payload)
    }

    fn scan(bytes: &[u8], chunk: usize) -> Vec<ServerFrame> {
        let mut scanner = SettingsScanner::default();
        let mut seen = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            scanner.feed(piece, |frame| seen.push(frame));
        }
        seen
    }

    #[test]
    fn reads_max_concurrent_streams_across_any_split() {
        let mut wire = settings(&[(0x1, 4096), (SETTINGS_MAX_CONCURRENT_STREAMS, 5), (0x4, 65535)]);
        wire.extend(frame(0x8, 0, 0, &[0, 0, 0x10, 0])); // WINDOW_UPDATE
        wire.extend(frame(FRAME_SETTINGS, FLAG_ACK, 0, &[])); // ACK of ours
        wire.extend(frame(0x0, 0x1, 1, &[7; 300])); // DATA whose bytes look like anything
        wire.extend(settings(&[(0x4, 1)])); // a later SETTINGS without the parameter
        wire.extend(settings(&[(SETTINGS_MAX_CONCURRENT_STREAMS, 2)]));
        wire.extend(frame(FRAME_GOAWAY, 0, 0, &[0, 0, 0, 7, 0, 0, 0, 0]));
        let expected = vec![
            ServerFrame::Settings(Some(5)),
            ServerFrame::Settings(None),
            ServerFrame::Settings(Some(2)),
            ServerFrame::GoAway,
        ];
        for chunk in [1, 2, 5, 9, 10, 64, wire.len()] {
            assert_eq!(scan(&wire, chunk), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn an_empty_settings_frame_is_reported_and_other_frames_are_not() {
        let mut wire = frame(FRAME_SETTINGS, 0, 0, &[]);
        // SETTINGS on a stream other than 0 is a protocol error for h2; the scanner ignores it.
        wire.extend(frame(FRAME_SETTINGS, 0, 3, &[0, 3, 0, 0, 0, 1]));
        wire.extend(frame(0x6, 0, 0, &[0; 8])); // PING
        assert_eq!(scan(&wire, 3), vec![ServerFrame::Settings(None)]);
    }

    #[test]
    fn hostile_bytes_never_panic() {
        // A huge declared length, odd parameter lengths and random bytes: the scanner only
        // counts, and h2 rejects the connection.
        let mut wire = frame(FRAME_SETTINGS, 0, 0, &[0, 3, 0, 0]);
        wire.extend([0xff; 9]);
        wire.extend((0..5000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        let _ = scan(&wire, 7);
        let _ = scan(&wire, 1);
    }
}
