//! Accepting connections, for every listener (xDS, peer, admin), with their bounds.
//!
//! [`accept`] turns a bound [`TcpListener`] into an [`Incoming`] stream of connections ready
//! for the HTTP server (tonic's `serve_with_incoming_shutdown` and `axum::serve` both take
//! it). Between the kernel and the server each connection passes three gates:
//!
//! - **`limits.max_connections`**: a connection over the listener's cap is closed at once,
//!   counted in `connections_refused_total{listener,reason="max_connections"}`. The slot is
//!   released when the connection's IO is dropped; `connections{listener}` counts open ones.
//! - **`limits.handshake_timeout`**: the TLS handshake (when TLS is on) and the HTTP/2 client
//!   preface followed by a whole SETTINGS frame must arrive within the timeout, or the
//!   connection is closed (`reason="handshake_timeout"`); wrong preface bytes close it at once
//!   (`reason="not_http2"`). The admin listener also speaks HTTP/1.1: there the first request
//!   line (or the HTTP/2 preface and SETTINGS) must arrive in time. The bytes read while
//!   checking are replayed to the server ([`Rewind`]).
//! - **accept errors** (`EMFILE`, `ENFILE`, ...): counted in `accept_errors_total{listener}`,
//!   logged at most once a second, and the loop backs off exponentially (10 ms doubling to
//!   1 s, reset by the next success) instead of spinning.
//!
//! Invariants: the accept loop never waits on a client; handshakes and preface checks run in
//! their own tasks (tracked, bounded in number by [`MAX_PENDING`] and in time by the
//! timeout); refusals are logged at most once a second per listener and reason; nothing here
//! ends the listener but shutdown.
//!
//! [`StreamCapLayer`] bounds the concurrent streams of one HTTP/2 connection in the gRPC
//! servers (`limits.max_streams_per_connection`, and never more than half of
//! `server.max_streams`), and [`raise_open_file_limit`] / [`fit_to_file_limit`] size the
//! caps to the process's open-file limit.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

use crate::telemetry::Metrics;
use crate::tls::{ServerStream, TlsAcceptor};

/// Most connections in their handshake or preface check at once per listener; further ones
/// wait in the kernel's accept queue.
pub const MAX_PENDING: usize = 1024;

/// Connections the admin listener accepts at once, whatever `limits.max_connections` says:
/// reserved out of the open-file limit so the admin API answers while xDS is full.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Checked connections waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;

/// First and longest pause after an accept error.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest SETTINGS frame payload accepted in the preface (the default SETTINGS_MAX_FRAME_SIZE).
const MAX_SETTINGS_PAYLOAD: usize = 16_384;

/// Longest HTTP/1.1 request line looked for on the admin listener before the connection is
/// handed to the server anyway (which answers 414/400 to anything longer).
const MAX_REQUEST_LINE: usize = 8192;

/// What a listener's connections must speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2 only (xDS and peer gRPC): the preface and a SETTINGS frame come first.
    Http2,
    /// HTTP/1.1 or HTTP/2 (admin): a request line, or the HTTP/2 preface and SETTINGS.
    Http,
}

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerSettings {
    /// `xds`, `peer` or `admin`: the label of its metrics and logs.
    pub name: &'static str,
    /// Most connections open at once (accepted and not yet closed).
    pub max_connections: usize,
    /// Time a connection has for its TLS handshake and its first bytes.
    pub handshake_timeout: Duration,
    /// What the connection must speak.
    pub protocol: Protocol,
}

/// A log line allowed at most once per interval; counts the ones held back.
///
/// Hand-written: a `Mutex<Instant>` and a counter; the rate-limiting crates throttle calls,
/// not log lines with a count of what was skipped.
#[derive(Debug)]
pub struct LogGate {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogGate {
    /// A gate letting one line through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self { interval, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when a line may be logged now, `n` being the lines held back since the last
    /// one; `None` when it must be held back.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| now.duration_since(at) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// Why a connection was closed before the server got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    MaxConnections,
    HandshakeTimeout,
    NotHttp2,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::NotHttp2 => "not_http2",
        }
    }
}

/// Shared by a listener's accept loop and its connection tasks.
struct Gate {
    settings: ListenerSettings,
    metrics: Metrics,
    open: Arc<Semaphore>,
    gauge: Gauge,
    logs: [LogGate; 4],
}

impl Gate {
    fn refuse(&self, refusal: Refusal, peer: SocketAddr) {
        self.metrics.connection_refused(self.settings.name, refusal.reason());
        if let Some(held_back) = self.logs[refusal as usize].allow() {
            let listener = self.settings.name;
            match refusal {
                Refusal::MaxConnections => tracing::warn!(
                    listener, peer = %peer, held_back,
                    "connection refused: limits.max_connections is {} on this listener", self.settings.max_connections
                ),
                Refusal::HandshakeTimeout => tracing::warn!(
                    listener, peer = %peer, held_back,
                    "connection closed: no TLS handshake and HTTP/2 preface within limits.handshake_timeout ({:?})",
                    self.settings.handshake_timeout
                ),
                Refusal::NotHttp2 => tracing::warn!(
                    listener, peer = %peer, held_back,
                    "connection closed: the client did not send the HTTP/2 preface"
                ),
            }
        }
    }

    fn accept_failed(&self, error: &io::Error, pause: Duration) {
        self.metrics.accept_error(self.settings.name);
        if let Some(held_back) = self.logs[3].allow() {
            tracing::warn!(
                listener = self.settings.name, error = %error, held_back, pause = ?pause,
                "cannot accept a connection (out of file descriptors?); pausing the listener"
            );
        }
    }
}

/// Holds a connection's slot: released (and the gauge lowered) when dropped with the IO.
struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// An accepted, checked connection: the IO (TCP or TLS) with the bytes read by the checks
/// put back in front. Its listener slot is released when it is dropped.
pub struct Conn<IO> {
    io: Rewind<IO>,
    remote: SocketAddr,
    _slot: Slot,
}

impl<IO> Conn<IO> {
    /// The IO (TCP or TLS) under the replayed bytes.
    pub fn get_ref(&self) -> &IO {
        &self.io.inner
    }

    /// The client's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }
}

impl<IO: Connected> Connected for Conn<IO> {
    type ConnectInfo = IO::ConnectInfo;

    /// The inner IO's: `TcpConnectInfo` for TCP, `TlsConnectInfo<TcpConnectInfo>` for TLS, so
    /// `Request::remote_addr` and `Request::peer_certs` work as without this wrapper.
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.inner.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.inner.is_write_vectored()
    }
}

/// An IO whose first reads return `prefix`, then the IO's own bytes.
///
/// Hand-written (twenty lines): hyper-util's `Rewind` is private, and no maintained crate
/// offers a replaying reader for tokio's `AsyncRead` alone.
pub struct Rewind<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Where the first bytes of a connection stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preface {
    /// More bytes are needed.
    Incomplete,
    /// The connection may be served.
    Complete,
    /// The bytes are not what the listener speaks: close the connection.
    Wrong,
}

/// Checks the first bytes of an HTTP/2 connection: the client preface then a whole SETTINGS
/// frame (header and payload).
pub fn check_http2(bytes: &[u8]) -> Preface {
    let n = bytes.len().min(PREFACE.len());
    if bytes[..n] != PREFACE[..n] {
        return Preface::Wrong;
    }
    let Some(header) = bytes.get(PREFACE.len()..PREFACE.len() + 9) else {
        return Preface::Incomplete;
    };
    let length = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    // Type 4 is SETTINGS; the first frame of a client must be one (RFC 9113 §3.4), not an ACK.
    if header[3] != 4 || header[4] & 1 != 0 || length > MAX_SETTINGS_PAYLOAD || length % 6 != 0 {
        return Preface::Wrong;
    }
    if bytes.len() < PREFACE.len() + 9 + length { Preface::Incomplete } else { Preface::Complete }
}

/// Checks the first bytes of an HTTP/1.1 or HTTP/2 connection: the HTTP/2 preface and
/// SETTINGS, or a whole HTTP/1.1 request line (a long one is left to the server to refuse).
pub fn check_http(bytes: &[u8]) -> Preface {
    let n = bytes.len().min(4);
    if n > 0 && bytes[..n] == PREFACE[..n] {
        return check_http2(bytes);
    }
    if bytes.contains(&b'\n') || bytes.len() >= MAX_REQUEST_LINE { Preface::Complete } else { Preface::Incomplete }
}

/// Why a connection never reached the server.
enum Failure {
    Refused(Refusal),
    /// Logged and counted by the TLS acceptor.
    Tls,
    Closed,
}

/// Reads the first bytes of `io` until `protocol`'s check decides.
async fn read_preface<IO: AsyncRead + Unpin>(io: &mut IO, protocol: Protocol) -> Result<Bytes, Failure> {
    let check = match protocol {
        Protocol::Http2 => check_http2,
        Protocol::Http => check_http,
    };
    let mut bytes = Vec::with_capacity(128);
    let mut chunk = [0u8; 1024];
    loop {
        match check(&bytes) {
            Preface::Complete if !bytes.is_empty() => return Ok(Bytes::from(bytes)),
            Preface::Wrong => return Err(Failure::Refused(Refusal::NotHttp2)),
            _ => {}
        }
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(Failure::Closed),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Checked connections of one listener, in the order they passed their checks. A `Stream`
/// of `io::Result<Conn<IO>>` for tonic and an [`axum::serve::Listener`] for axum.
pub struct Incoming<IO> {
    rx: mpsc::Receiver<Conn<IO>>,
    local_addr: Result<SocketAddr, io::ErrorKind>,
}

impl<IO> Incoming<IO> {
    /// The address the listener is bound to.
    ///
    /// # Errors
    /// When the operating system could not tell.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.local_addr.map_err(io::Error::from)
    }
}

impl<IO> futures_util::Stream for Incoming<IO> {
    type Item = io::Result<Conn<IO>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|next| next.map(Ok))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> axum::serve::Listener for Incoming<IO> {
    type Io = Conn<IO>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => {
                let remote = conn.remote;
                (conn, remote)
            }
            // The accept loop stopped (shutdown): no more connections; graceful shutdown ends
            // the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.local_addr.map_err(io::Error::from)
    }
}

/// Accepts plaintext connections on `listener` until `shutdown` (see the module's gates).
pub fn accept_plain(
    listener: TcpListener,
    settings: ListenerSettings,
    metrics: Metrics,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Incoming<TcpStream> {
    accept(listener, settings, metrics, tracker, shutdown, |tcp| async move { Ok::<_, Failure>(tcp) })
}

/// Accepts TLS connections on `listener` until `shutdown`: the handshake with `acceptor`'s
/// current configuration counts in the handshake timeout; a failed one is logged and counted
/// in `tls_handshake_failures_total{listener}`.
pub fn accept_tls(
    listener: TcpListener,
    settings: ListenerSettings,
    acceptor: TlsAcceptor,
    metrics: Metrics,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Incoming<ServerStream> {
    accept(listener, settings, metrics, tracker, shutdown, move |tcp| {
        let acceptor = acceptor.clone();
        async move {
            let peer = tcp.peer_addr().ok();
            tokio_rustls::TlsAcceptor::from(acceptor.current()).accept(tcp).await.map_err(|e| {
                if let Some(peer) = peer {
                    acceptor.handshake_failed(peer, &e);
                }
                Failure::Tls
            })
        }
    })
}

/// The accept loop: `handshake` turns a TCP connection into the listener's IO.
fn accept<IO, H, F>(
    listener: TcpListener,
    settings: ListenerSettings,
    metrics: Metrics,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
    handshake: H,
) -> Incoming<IO>
where
    IO: AsyncRead + Unpin + Send + 'static,
    H: Fn(TcpStream) -> F + Send + 'static,
    F: Future<Output = Result<IO, Failure>> + Send + 'static,
{
    let local_addr = listener.local_addr().map_err(|e| e.kind());
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    let gate = Arc::new(Gate {
        settings,
        gauge: metrics.connections(settings.name),
        metrics,
        open: Arc::new(Semaphore::new(settings.max_connections)),
        logs: std::array::from_fn(|_| LogGate::new(Duration::from_secs(1))),
    });
    let pending = Arc::new(Semaphore::new(MAX_PENDING));
    let tasks = tracker.clone();
    tracker.spawn(async move {
        let mut pause = ACCEPT_BACKOFF.0;
        loop {
            let checking = tokio::select! {
                () = shutdown.cancelled() => return,
                permit = pending.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        gate.accept_failed(&e, pause);
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(ACCEPT_BACKOFF.1);
                        continue;
                    }
                },
            };
            pause = ACCEPT_BACKOFF.0;
            let Ok(permit) = gate.open.clone().try_acquire_owned() else {
                drop(tcp);
                gate.refuse(Refusal::MaxConnections, peer);
                continue;
            };
            gate.gauge.inc();
            let slot = Slot { _permit: permit, gauge: gate.gauge.clone() };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(listener = gate.settings.name, peer = %peer, error = %e, "cannot set TCP_NODELAY");
            }
            let opened = handshake(tcp);
            let (gate, tx, shutdown) = (gate.clone(), tx.clone(), shutdown.clone());
            tasks.spawn(async move {
                let checked = async {
                    let mut io = opened.await?;
                    let prefix = read_preface(&mut io, gate.settings.protocol).await?;
                    Ok::<_, Failure>(Conn { io: Rewind { prefix, inner: io }, remote: peer, _slot: slot })
                };
                let result = tokio::select! {
                    () = shutdown.cancelled() => return,
                    result = tokio::time::timeout(gate.settings.handshake_timeout, checked) => result,
                };
                drop(checking);
                match result {
                    Ok(Ok(conn)) => {
                        tokio::select! {
                            () = shutdown.cancelled() => {}
                            _ = tx.send(conn) => {}
                        }
                    }
                    Ok(Err(Failure::Refused(refusal))) => gate.refuse(refusal, peer),
                    Ok(Err(Failure::Tls)) => {}
                    Ok(Err(Failure::Closed)) => {
                        tracing::debug!(listener = gate.settings.name, peer = %peer, "connection closed before its first request");
                    }
                    Err(_) => gate.refuse(Refusal::HandshakeTimeout, peer),
                }
            });
        }
    });
    Incoming { rx, local_addr }
}

// === open files ===

/// File descriptors kept out of the listeners' caps for everything else the process opens
/// (origin and peer streams, gossip, log and certificate files): a quarter of the limit, at
/// most 256.
pub fn file_reserve(limit: u64) -> u64 {
    (limit / 4).min(256)
}

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard limit; returns the soft limit
/// in force afterwards (`None`: unlimited). Logs what it did.
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) if soft < hard => {
            match setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) }) {
                Ok(()) => {
                    tracing::info!(
                        from = soft,
                        to = hard,
                        "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
                    );
                    Some(hard)
                }
                Err(e) => {
                    tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)");
                    Some(soft)
                }
            }
        }
        (soft, hard) => {
            let show = |limit: Option<u64>| limit.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
            tracing::info!(soft = %show(soft), hard = %show(hard), "open-file limit (RLIMIT_NOFILE) already at its hard limit");
            soft
        }
    }
}

/// The soft open-file limit in force (`None`: unlimited).
pub fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Per-listener connection caps fitted to the open-file limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// Cap of each gRPC listener (xDS, and peer when clustered).
    pub grpc: usize,
    /// Cap of the admin listener.
    pub admin: usize,
}

/// The caps for `max_connections` on each of `grpc_listeners` listeners plus the admin
/// listener's [`ADMIN_MAX_CONNECTIONS`], lowered when they and [`file_reserve`] would not fit
/// in `file_limit` (`None`: unlimited). The admin cap comes out of the limit first, so the
/// admin API answers when the other listeners are full; each gRPC listener gets at least one.
pub fn fit_to_file_limit(max_connections: usize, grpc_listeners: usize, file_limit: Option<u64>) -> ConnectionCaps {
    let Some(limit) = file_limit else {
        return ConnectionCaps { grpc: max_connections, admin: ADMIN_MAX_CONNECTIONS };
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let reserve = usize::try_from(file_reserve(limit as u64)).unwrap_or(0);
    let available = limit.saturating_sub(reserve);
    let admin = ADMIN_MAX_CONNECTIONS.min(available / 4).max(1);
    let per_listener = (available - admin) / grpc_listeners.max(1);
    ConnectionCaps { grpc: max_connections.min(per_listener).max(1), admin }
}

// === streams per connection ===

/// The streams one connection may hold: `limits.max_streams_per_connection`, and never more
/// than half of `server.max_streams` (at least one), so one connection cannot starve others.
pub fn streams_per_connection(max_streams_per_connection: usize, max_streams: usize) -> usize {
    max_streams_per_connection.min((max_streams / 2).max(1))
}

/// A tower layer for a tonic server refusing a stream with `RESOURCE_EXHAUSTED` when its
/// connection already holds `cap` streams (counted in `limit_refusals_total{limit=
/// "max_streams_per_connection"}`, logged at most once a second). A stream's slot is held
/// until its response body is dropped.
///
/// Connections are told apart by the client's address (unique while the connection is
/// open), read from the connection info tonic puts in every request.
#[derive(Clone)]
pub struct StreamCapLayer {
    shared: Arc<StreamCapShared>,
}

struct StreamCapShared {
    cap: usize,
    /// Why the cap is what it is, for the refusal message.
    reason: String,
    listener: &'static str,
    metrics: Metrics,
    open: Mutex<HashMap<SocketAddr, usize>>,
    log: LogGate,
}

impl StreamCapLayer {
    /// At most `streams_per_connection(configured, max_streams)` streams per connection on
    /// the xDS listener.
    pub fn for_clients(configured: usize, max_streams: usize, metrics: Metrics) -> Self {
        let cap = streams_per_connection(configured, max_streams);
        let reason = if cap < configured {
            format!(
                "limits.max_streams_per_connection is {configured}, and one connection gets at most half of \
                 server.max_streams ({max_streams})"
            )
        } else {
            format!("limits.max_streams_per_connection is {configured}")
        };
        Self::new(cap, reason, "xds", metrics)
    }

    /// The cap of the peer listener: `limits.max_streams_per_connection`, or
    /// `limits.max_active_keys` when larger. A follower opens one stream per key it follows
    /// at this node, all on one connection, and this node serves at most `max_active_keys`
    /// keys: a legitimate follower never needs more.
    pub fn for_peers(configured: usize, max_active_keys: usize, metrics: Metrics) -> Self {
        let cap = configured.max(max_active_keys);
        let reason = format!(
            "a follower may hold limits.max_streams_per_connection ({configured}) or limits.max_active_keys \
             ({max_active_keys}) streams, the larger"
        );
        Self::new(cap, reason, "peer", metrics)
    }

    fn new(cap: usize, reason: String, listener: &'static str, metrics: Metrics) -> Self {
        Self {
            shared: Arc::new(StreamCapShared {
                cap,
                reason,
                listener,
                metrics,
                open: Mutex::new(HashMap::new()),
                log: LogGate::new(Duration::from_secs(1)),
            }),
        }
    }

    /// The effective cap.
    pub fn cap(&self) -> usize {
        self.shared.cap
    }
}

impl<S> tower::Layer<S> for StreamCapLayer {
    type Service = StreamCap<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamCap { inner, shared: self.shared.clone() }
    }
}

/// The service of [`StreamCapLayer`].
#[derive(Clone)]
pub struct StreamCap<S> {
    inner: S,
    shared: Arc<StreamCapShared>,
}

/// A stream's place in its connection's count; given back when dropped.
struct StreamSlot {
    shared: Arc<StreamCapShared>,
    remote: SocketAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.remote) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.remote);
            }
        }
    }
}

impl StreamCapShared {
    fn take(self: &Arc<Self>, remote: SocketAddr) -> Option<StreamSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(remote).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(StreamSlot { shared: self.clone(), remote })
    }

    fn refusal(&self, remote: SocketAddr) -> tonic::Status {
        self.metrics.limit_refused("max_streams_per_connection");
        let message =
            format!("this connection already has {} streams: {}; open another connection", self.cap, self.reason);
        if let Some(held_back) = self.log.allow() {
            tracing::warn!(listener = self.listener, peer = %remote, held_back, "stream refused: {message}");
        }
        tonic::Status::resource_exhausted(message)
    }
}

fn remote_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr()))
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for StreamCap<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let slot = match remote_of(&request) {
            Some(remote) => match self.shared.take(remote) {
                Some(slot) => Some(slot),
                None => {
                    let refusal = self.shared.refusal(remote).into_http();
                    return Box::pin(std::future::ready(Ok(refusal)));
                }
            },
            None => None,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match slot {
                Some(slot) => response.map(|body| tonic::body::Body::new(SlotBody { inner: body, _slot: slot })),
                None => response,
            })
        })
    }
}

/// A response body holding its stream's slot.
struct SlotBody {
    inner: tonic::body::Body,
    _slot: StreamSlot,
}

impl http_body::Body for SlotBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_frame(payload: usize) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, (payload >> 8) as u8, payload as u8, 4, 0, 0, 0, 0, 0]);
        bytes.extend(std::iter::repeat_n(0u8, payload));
        bytes
    }

    #[test]
    fn http2_preface_needs_a_whole_settings_frame() {
        let whole = settings_frame(12);
        for end in 0..whole.len() {
            assert_eq!(check_http2(&whole[..end]), Preface::Incomplete, "{end} bytes");
        }
        assert_eq!(check_http2(&whole), Preface::Complete);
        assert_eq!(check_http2(&settings_frame(0)), Preface::Complete);
        let mut more = whole.clone();
        more.extend_from_slice(b"next frame");
        assert_eq!(check_http2(&more), Preface::Complete);
    }

    #[test]
    fn wrong_bytes_are_refused_at_once() {
        assert_eq!(check_http2(b"GET / HTTP/1.1\r\n"), Preface::Wrong);
        assert_eq!(check_http2(b"\x16\x03\x01"), Preface::Wrong, "a TLS hello on a plaintext port");
        assert_eq!(check_http2(b"PRX"), Preface::Wrong);
        let mut ping = PREFACE.to_vec();
        ping.extend_from_slice(&[0, 0, 8, 6, 0, 0, 0, 0, 0]);
        assert_eq!(check_http2(&ping), Preface::Wrong, "first frame not SETTINGS");
        let mut huge = PREFACE.to_vec();
        huge.extend_from_slice(&[1, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(check_http2(&huge), Preface::Wrong, "oversized SETTINGS");
        let mut odd = PREFACE.to_vec();
        odd.extend_from_slice(&[0, 0, 5, 4, 0, 0, 0, 0, 0]);
        assert_eq!(check_http2(&odd), Preface::Wrong, "SETTINGS length not a multiple of 6");
    }

    #[test]
    fn admin_accepts_a_request_line_or_the_http2_preface() {
        assert_eq!(check_http(b""), Preface::Incomplete);
        assert_eq!(check_http(b"GET /metr"), Preface::Incomplete);
        assert_eq!(check_http(b"GET /metrics HTTP/1.1\r\n"), Preface::Complete);
        assert_eq!(check_http(b"PRI * HTTP/2.0\r\n"), Preface::Incomplete);
        assert_eq!(check_http(&settings_frame(6)), Preface::Complete);
        assert_eq!(check_http(&[b'a'; MAX_REQUEST_LINE]), Preface::Complete, "left to the server");
    }

    #[test]
    fn caps_fit_the_file_limit() {
        let unlimited = fit_to_file_limit(50_000, 1, None);
        assert_eq!(unlimited, ConnectionCaps { grpc: 50_000, admin: ADMIN_MAX_CONNECTIONS });
        let large = fit_to_file_limit(50_000, 1, Some(1 << 20));
        assert_eq!(large.grpc, 50_000);
        // 256 files: 64 reserved, 48 for admin, 144 for xDS.
        assert_eq!(fit_to_file_limit(50_000, 1, Some(256)), ConnectionCaps { grpc: 144, admin: 48 });
        let two = fit_to_file_limit(50_000, 2, Some(4096));
        assert_eq!(two.admin, ADMIN_MAX_CONNECTIONS);
        assert_eq!(two.grpc, (4096 - 256 - ADMIN_MAX_CONNECTIONS) / 2);
        assert!(fit_to_file_limit(10, 2, Some(3)).grpc >= 1);
    }

    #[test]
    fn one_connection_gets_at_most_half_the_streams() {
        assert_eq!(streams_per_connection(1024, 100_000), 1024);
        assert_eq!(streams_per_connection(1024, 10), 5);
        assert_eq!(streams_per_connection(8, 100), 8);
        assert_eq!(streams_per_connection(8, 1), 1);
    }

    #[test]
    fn log_gate_counts_held_back_lines() {
        let gate = LogGate::new(Duration::from_secs(3600));
        assert_eq!(gate.allow(), Some(0));
        assert_eq!(gate.allow(), None);
        assert_eq!(gate.allow(), None);
        assert_eq!(gate.suppressed.load(Ordering::Relaxed), 2);
    }
}
