//! The sealed gossip transport: a chitchat [`Transport`] that seals every datagram it sends
//! and opens every datagram it receives (format and threat model in [`seal`](crate::seal)),
//! built on chitchat's public API only.
//!
//! chitchat hands a transport typed envelopes, and its envelope encoder is private to the
//! crate. This transport therefore lets chitchat's own `UdpSocket` (the *codec*, bound to an
//! ephemeral port on 127.0.0.1) do every encoding and decoding, and moves bytes over loopback:
//!
//! ```text
//!  send(to, envelope):  codec ──encode──▶ sink (127.0.0.1, connected to the codec)
//!                       sink bytes ──seal──▶ public socket ──▶ `to`
//!
//!  opener task:         public socket ◀── peer P
//!                       open + replay check ──▶ proxy(P) (127.0.0.1, connected to the codec)
//!                       proxy(P) ──▶ codec
//!  recv():              codec ──decode──▶ envelope from proxy(P), reported as from P
//! ```
//!
//! chitchat only ever sees real peer addresses: it sends to seeds and advertised gossip
//! addresses, replies to the reported sender, and the public socket is the one bound to the
//! configured gossip address, so node ids, seeds and replies are unchanged by sealing.
//!
//! Invariants:
//!
//! - [`Socket::recv`] awaits only the codec's `recv` (chitchat's own cancel-safe loop over
//!   `recv_from` with a synchronous decode) and then maps the address synchronously, so it is
//!   cancel-safe: chitchat polls it inside `select!`.
//! - Nothing reaches chitchat unsealed from the network: the codec only hears loopback, and a
//!   datagram from a loopback socket that is not one of this node's proxies (another local
//!   process) is dropped and counted as `loopback`. The sink and the proxies are connected to
//!   the codec, so the kernel drops anything else sent to them.
//! - Memory: one proxy socket per peer that sent an authentic datagram, at most
//!   [`MAX_PROXIES`]; proxies idle for [`PROXY_IDLE`] are closed (the least recently used one
//!   goes first when the table is full). Only key holders can create proxies.
//! - The opener task and the key file watcher stop when the cluster's token is cancelled; the
//!   opener also stops when chitchat drops the socket.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as CodecSocket};
use ring::rand::{SecureRandom as _, SystemRandom};
use std::sync::atomic::Ordering;
use tokio::net::UdpSocket;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::keyring::Keyring;
use crate::seal::{GossipCounters, MAX_DATAGRAM_LEN, REPLAY_CAPACITY, RejectReason, ReplayGuard, open, seal};

/// The most peers with a proxy socket at once.
pub const MAX_PROXIES: usize = 4_096;
/// A proxy unused for this long is closed.
pub const PROXY_IDLE: Duration = Duration::from_secs(10 * 60);
/// How often idle proxies are looked for.
const PROXY_SWEEP: Duration = Duration::from_secs(60);
/// How long the codec may take to hand an encoded datagram to the sink (loopback, so this
/// only expires if the kernel dropped it).
const ENCODE_TIMEOUT: Duration = Duration::from_secs(1);
/// At most one log line per rejection reason in this period (with the count suppressed).
const REJECT_LOG_PERIOD: Duration = Duration::from_secs(10);
const LOOPBACK_ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// What the transport, its sockets and the key file watcher share.
pub(crate) struct SealShared {
    pub(crate) keyring: ArcSwap<Keyring>,
    pub(crate) cluster_id: Vec<u8>,
    pub(crate) counters: GossipCounters,
    pub(crate) replay_window: Duration,
}

impl SealShared {
    pub(crate) fn new(keyring: Keyring, cluster_id: &str, replay_window: Duration) -> Self {
        SealShared {
            keyring: ArcSwap::from_pointee(keyring),
            cluster_id: cluster_id.as_bytes().to_vec(),
            counters: GossipCounters::default(),
            replay_window,
        }
    }
}

/// The sealing transport (see the module docs).
pub(crate) struct SealedTransport {
    shared: Arc<SealShared>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl SealedTransport {
    pub(crate) fn new(shared: Arc<SealShared>, tracker: TaskTracker, cancel: CancellationToken) -> Self {
        SealedTransport { shared, tracker, cancel }
    }

    /// Binds the public socket on `listen_addr`, the loopback codec and sink, and starts the
    /// opener task.
    async fn open_socket(&self, listen_addr: SocketAddr) -> anyhow::Result<SealedSocket> {
        let public = UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind to {listen_addr}/UDP for gossip"))?;
        let public = Arc::new(public);
        let codec = CodecSocket::open(LOOPBACK_ANY).await?;
        let codec_addr = codec.local_addr()?;
        let sink = UdpSocket::bind(LOOPBACK_ANY).await.context("failed to bind the gossip encoding socket")?;
        sink.connect(codec_addr).await.context("failed to connect the gossip encoding socket")?;
        let sink_addr = sink.local_addr()?;
        let proxies = Arc::new(StdMutex::new(HashMap::new()));
        let stop = self.cancel.child_token();
        self.tracker.spawn(
            Opener {
                public: public.clone(),
                codec_addr,
                shared: self.shared.clone(),
                proxy_peers: proxies.clone(),
                by_peer: HashMap::new(),
                replay: ReplayGuard::new(
                    u64::try_from(self.shared.replay_window.as_millis()).unwrap_or(u64::MAX),
                    REPLAY_CAPACITY,
                ),
                log: RejectLog::default(),
                cancel: stop.clone(),
            }
            .run(),
        );
        debug!(%listen_addr, %codec_addr, "sealed gossip transport open");
        Ok(SealedSocket {
            public,
            codec,
            sink,
            sink_addr,
            proxy_peers: proxies,
            shared: self.shared.clone(),
            rng: SystemRandom::new(),
            plain: vec![0; MAX_DATAGRAM_LEN + 1],
            sealed: Vec::with_capacity(MAX_DATAGRAM_LEN),
            log: RejectLog::default(),
            _stop: stop.drop_guard(),
        })
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(self.open_socket(listen_addr).await?))
    }
}

/// chitchat's side of the transport.
struct SealedSocket {
    public: Arc<UdpSocket>,
    codec: CodecSocket,
    sink: UdpSocket,
    sink_addr: SocketAddr,
    /// Proxy address → the peer it stands for; written by the opener task.
    proxy_peers: Arc<StdMutex<HashMap<SocketAddr, SocketAddr>>>,
    shared: Arc<SealShared>,
    rng: SystemRandom,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    log: RejectLog,
    /// Stops the opener task when chitchat drops the socket.
    _stop: DropGuard,
}

impl SealedSocket {
    fn send_failed(&self) {
        self.shared.counters.send_failures.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.public.local_addr().context("failed to get the gossip socket address")
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        // A datagram left over from an earlier send that timed out must not be sealed now.
        while self.sink.try_recv(&mut self.plain).is_ok() {}
        if let Err(error) = self.codec.send(self.sink_addr, envelope).await {
            self.send_failed();
            return Err(error);
        }
        let len = match timeout(ENCODE_TIMEOUT, self.sink.recv(&mut self.plain)).await {
            Ok(Ok(len)) => len,
            Ok(Err(error)) => {
                self.send_failed();
                return Err(error).context("failed to read an encoded gossip datagram");
            }
            Err(_) => {
                self.send_failed();
                bail!("encoded gossip datagram lost on loopback");
            }
        };
        let mut nonce = [0; ring::aead::NONCE_LEN];
        if self.rng.fill(&mut nonce).is_err() {
            self.send_failed();
            bail!("no randomness for a gossip nonce");
        }
        let keyring = self.shared.keyring.load();
        if seal(&keyring, &self.shared.cluster_id, now_ms(), nonce, &self.plain[..len], &mut self.sealed).is_err() {
            self.send_failed();
            warn!(%to, bytes = len, max = MAX_DATAGRAM_LEN, "gossip datagram too large to seal; not sent");
            bail!("gossip datagram of {len} bytes too large to seal");
        }
        if let Err(error) = self.public.send_to(&self.sealed, to).await {
            self.send_failed();
            return Err(error).with_context(|| format!("failed to send a gossip datagram to {to}"));
        }
        self.shared.counters.sent.fetch_add(1, Ordering::Relaxed);
        Ok(SendOutcome { num_bytes_sent: self.sealed.len() })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            // The only await: chitchat's cancel-safe receive loop.
            let outcome = self.codec.recv().await?;
            let peer = self.proxy_peers.lock().unwrap_or_else(PoisonError::into_inner).get(&outcome.from_addr).copied();
            match peer {
                Some(from_addr) => return Ok(RecvOutcome { from_addr, ..outcome }),
                None => {
                    self.shared.counters.reject(RejectReason::Loopback);
                    self.log.rejected(RejectReason::Loopback, outcome.from_addr);
                }
            }
        }
    }
}

/// One peer's loopback stand-in.
struct Proxy {
    socket: UdpSocket,
    addr: SocketAddr,
    last_used: Instant,
}

/// The task that owns the receiving half of the public socket.
struct Opener {
    public: Arc<UdpSocket>,
    codec_addr: SocketAddr,
    shared: Arc<SealShared>,
    proxy_peers: Arc<StdMutex<HashMap<SocketAddr, SocketAddr>>>,
    by_peer: HashMap<SocketAddr, Proxy>,
    replay: ReplayGuard,
    log: RejectLog,
    cancel: CancellationToken,
}

impl Opener {
    async fn run(mut self) {
        // One byte more than the largest datagram accepted, to see an oversize one.
        let mut buf = vec![0; MAX_DATAGRAM_LEN + 1];
        let mut sweep = tokio::time::interval(PROXY_SWEEP);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let received = tokio::select! {
                () = self.cancel.cancelled() => break,
                _ = sweep.tick() => {
                    self.close_idle_proxies();
                    continue;
                }
                received = self.public.recv_from(&mut buf) => received,
            };
            match received {
                Ok((len, from)) => self.handle(&mut buf[..len], from).await,
                Err(error) => {
                    warn!(%error, "gossip socket receive error");
                    // Do not spin on a persistent error.
                    tokio::select! {
                        () = self.cancel.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
        debug!(proxies = self.by_peer.len(), "gossip opener stopped");
    }

    /// Opens one datagram from `from` and hands its plaintext to chitchat, or drops it.
    async fn handle(&mut self, datagram: &mut [u8], from: SocketAddr) {
        let keyring = self.shared.keyring.load();
        let verdict = open(&keyring, &self.shared.cluster_id, datagram)
            .and_then(|opened| self.replay.check(opened.timestamp_ms, opened.nonce, now_ms()).map(|()| opened));
        let opened = match verdict {
            Ok(opened) => opened,
            Err(reason) => {
                self.shared.counters.reject(reason);
                self.log.rejected(reason, from);
                return;
            }
        };
        let Some(proxy) = self.proxy_for(from).await else { return };
        proxy.last_used = Instant::now();
        match proxy.socket.send(&datagram[opened.plaintext]).await {
            Ok(_) => {
                self.shared.counters.received.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => warn!(%error, %from, "cannot hand an opened gossip datagram to chitchat"),
        }
    }

    /// The proxy of `peer`, created on first use.
    async fn proxy_for(&mut self, peer: SocketAddr) -> Option<&mut Proxy> {
        if !self.by_peer.contains_key(&peer) {
            if self.by_peer.len() >= MAX_PROXIES
                && let Some(oldest) = self.by_peer.iter().min_by_key(|(_, p)| p.last_used).map(|(peer, _)| *peer)
            {
                self.close_proxy(oldest);
            }
            let socket = match self.new_proxy_socket().await {
                Ok(socket) => socket,
                Err(error) => {
                    warn!(error = %format!("{error:#}"), %peer, "cannot open a loopback proxy for a gossip peer");
                    return None;
                }
            };
            let addr = socket.local_addr().ok()?;
            self.proxy_peers.lock().unwrap_or_else(PoisonError::into_inner).insert(addr, peer);
            debug!(%peer, proxy = %addr, "gossip peer proxy opened");
            self.by_peer.insert(peer, Proxy { socket, addr, last_used: Instant::now() });
        }
        self.by_peer.get_mut(&peer)
    }

    async fn new_proxy_socket(&self) -> anyhow::Result<UdpSocket> {
        let socket = UdpSocket::bind(LOOPBACK_ANY).await.context("bind")?;
        socket.connect(self.codec_addr).await.context("connect")?;
        Ok(socket)
    }

    fn close_proxy(&mut self, peer: SocketAddr) {
        if let Some(proxy) = self.by_peer.remove(&peer) {
            self.proxy_peers.lock().unwrap_or_else(PoisonError::into_inner).remove(&proxy.addr);
            debug!(%peer, proxy = %proxy.addr, "gossip peer proxy closed");
        }
    }

    fn close_idle_proxies(&mut self) {
        let now = Instant::now();
        let idle: Vec<SocketAddr> = self
            .by_peer
            .iter()
            .filter(|(_, proxy)| now.duration_since(proxy.last_used) >= PROXY_IDLE)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in idle {
            self.close_proxy(peer);
        }
    }
}

/// Rate-limits rejection logs: one warning per reason per [`REJECT_LOG_PERIOD`].
#[derive(Default)]
struct RejectLog {
    last: HashMap<RejectReason, (Instant, u64)>,
}

impl RejectLog {
    fn rejected(&mut self, reason: RejectReason, from: SocketAddr) {
        let now = Instant::now();
        match self.last.get_mut(&reason) {
            Some((logged, suppressed)) if now.duration_since(*logged) < REJECT_LOG_PERIOD => *suppressed += 1,
            _ => {
                let suppressed = self.last.insert(reason, (now, 0)).map_or(0, |(_, n)| n);
                warn!(reason = reason.as_str(), %from, suppressed, "gossip datagram rejected");
            }
        }
    }
}

/// Re-reads the key file every `interval` and installs its keys when its content changed.
/// A file that cannot be read or parsed leaves the keys in force (one warning and one count
/// per distinct error). `loaded` is the text the node joined with.
pub(crate) async fn watch_key_file(
    path: PathBuf,
    loaded: String,
    interval: Duration,
    shared: Arc<SealShared>,
    cancel: CancellationToken,
) {
    let mut last_text = loaded;
    let mut last_error = String::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = ticker.tick() => {}
        }
        // A small file; reading it inline does not hold up the runtime.
        let parsed = Keyring::read(&path).and_then(|text| {
            if text == last_text { Ok(None) } else { Keyring::parse(&text, &path).map(|k| Some((text, k))) }
        });
        match parsed {
            Ok(None) => {}
            Ok(Some((text, keyring))) => {
                info!(file = %path.display(), keys = keyring.len(), key_ids = ?keyring.key_ids(), "gossip keys reloaded");
                shared.keyring.store(Arc::new(keyring));
                last_text = text;
                last_error.clear();
            }
            Err(error) => {
                let message = error.to_string();
                if message != last_error {
                    shared.counters.key_reload_failures.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %message, "gossip key file not reloaded; the keys in force stay");
                    last_error = message;
                }
            }
        }
    }
    debug!("gossip key file watcher stopped");
}

/// The wall clock in milliseconds since the Unix epoch (0 before 1970).
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use chitchat::{ChitchatMessage, ProtocolVersion};

    use super::*;

    fn bad_cluster() -> ChitchatEnvelope {
        ChitchatEnvelope { version: ProtocolVersion::V0, message: ChitchatMessage::BadCluster }
    }

    fn transport() -> SealedTransport {
        let shared = Arc::new(SealShared::new(Keyring::from_keys(&[[5; 32]]), "c", Duration::from_secs(30)));
        SealedTransport::new(shared, TaskTracker::new(), CancellationToken::new())
    }

    #[tokio::test]
    async fn datagrams_cross_sealed_and_report_the_real_sender() {
        let transport = transport();
        let mut a = transport.open_socket(LOOPBACK_ANY).await.unwrap();
        let mut b = transport.open_socket(LOOPBACK_ANY).await.unwrap();
        let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let sent = a.send(b_addr, bad_cluster()).await.unwrap();
        assert_eq!(sent.num_bytes_sent, 4 + crate::seal::OVERHEAD, "chitchat's 4 bytes, sealed");
        let received = timeout(Duration::from_secs(5), b.recv()).await.unwrap().unwrap();
        assert_eq!((received.from_addr, received.envelope), (a_addr, bad_cluster()));
        // The reply goes back to the reported address and opens there.
        b.send(received.from_addr, bad_cluster()).await.unwrap();
        let reply = timeout(Duration::from_secs(5), a.recv()).await.unwrap().unwrap();
        assert_eq!(reply.from_addr, b_addr);
        let stats = transport.shared.counters.snapshot(&transport.shared.keyring.load());
        assert_eq!((stats.datagrams_sent, stats.datagrams_received), (2, 2));
        transport.cancel.cancel();
        transport.tracker.close();
        timeout(Duration::from_secs(5), transport.tracker.wait()).await.expect("the opener tasks stop");
    }

    #[tokio::test]
    async fn a_local_process_cannot_inject_into_the_codec_socket() {
        let transport = transport();
        let mut a = transport.open_socket(LOOPBACK_ANY).await.unwrap();
        let mut b = transport.open_socket(LOOPBACK_ANY).await.unwrap();
        // A valid plaintext chitchat datagram (BadCluster) written straight to b's codec.
        let intruder = std::net::UdpSocket::bind(LOOPBACK_ANY).unwrap();
        intruder.send_to(&[0x53, 0xb0, 0x00, 0x03], b.codec.local_addr().unwrap()).unwrap();
        // recv never returns it; cancelling recv (as chitchat's select! does) loses nothing.
        assert!(timeout(Duration::from_millis(300), b.recv()).await.is_err());
        assert_eq!(
            transport.shared.counters.snapshot(&transport.shared.keyring.load()).rejected(RejectReason::Loopback),
            1
        );
        a.send(b.local_addr().unwrap(), bad_cluster()).await.unwrap();
        let received = timeout(Duration::from_secs(5), b.recv()).await.unwrap().unwrap();
        assert_eq!(received.from_addr, a.local_addr().unwrap());
    }
}
