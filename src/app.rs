//! Assembles a relay node from its configuration and runs it until shutdown.
//!
//! The node's servers take listeners bound by the caller (tests use port 0). Shutdown is one
//! cancellation token and one task tracker: every task the node runs (servers, connections,
//! client and follower streams, sources, housekeeping, gossip) is spawned under them, directly
//! or inside a tracked task that awaits its own, so [`Node::stop`] cancels and awaits them all.
//! A clustered node drains before it stops: it turns not ready, gossips `draining`, hands its
//! keys to their new owners (woken by each handover, not by polling), then ends its streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xds_relay_cluster::{Cluster, ClusterConfig, GossipSeal, NodeState};

use crate::admin::{self, AdminState};
use crate::config::{Bootstrap, ClusterSettings, KeyerConfiguration};
use crate::downstream::{self, ServerSettings};
use crate::keyer::Keyer;
use crate::listener::{self, ListenerSettings, Protocol};
use crate::node_cache::Cache;
use crate::peer::PeerChannels;
use crate::peer::follower::FollowerSettings;
use crate::peer::proto::peer_server::PeerServer;
use crate::peer::server::{PeerAuth, PeerService, ServiceTasks};
use crate::persist::{self, Queue, Store};
use crate::relay::{KeptStates, Membership, Relay};
use crate::rollout::Rollouts;
use crate::source::handover::{self, HandoverSignal};
use crate::telemetry::{LogControl, Metrics};
use crate::tls::{self, ClientTls, TlsAcceptor};
use crate::upstream::Origin;

/// Listeners a node serves on.
pub struct Listeners {
    /// The xDS gRPC listener.
    pub xds: TcpListener,
    /// The admin HTTP listener.
    pub admin: TcpListener,
    /// The peer gRPC listener (clustered nodes only).
    pub peer: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `bootstrap`.
    ///
    /// # Errors
    /// Fails with the address in the message when a bind fails.
    pub async fn bind(bootstrap: &Bootstrap) -> anyhow::Result<Self> {
        let bind = |addr: String, what: &'static str| async move {
            TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("cannot bind the {what} address {addr}: {e}"))
        };
        let peer = match &bootstrap.cluster {
            Some(cluster) => Some(bind(cluster.peer.host_port(), "peer").await?),
            None => None,
        };
        Ok(Self {
            xds: bind(bootstrap.server.address.host_port(), "xDS server").await?,
            admin: bind(bootstrap.admin.address.host_port(), "admin").await?,
            peer,
        })
    }

    /// Binds the xDS and admin listeners on 127.0.0.1 at ports the system picks, without a
    /// peer listener: a standalone node inside another program (a test), whose addresses are
    /// then read from [`Node::xds_addr`] and [`Node::admin_addr`].
    ///
    /// # Errors
    /// Fails when the loopback interface cannot be bound.
    pub async fn bind_loopback() -> anyhow::Result<Self> {
        let bind = |what: &'static str| async move {
            TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| anyhow::anyhow!("cannot bind the {what} listener on 127.0.0.1: {e}"))
        };
        Ok(Self { xds: bind("xDS server").await?, admin: bind("admin").await?, peer: None })
    }
}

/// A running relay node.
pub struct Node {
    /// The xDS address it listens on.
    pub xds_addr: SocketAddr,
    /// The admin address it listens on.
    pub admin_addr: SocketAddr,
    /// The relay core.
    pub relay: Arc<Relay>,
    /// The metrics registry.
    pub metrics: Metrics,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

async fn resolve(host: &str, port: u16, field: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| anyhow::anyhow!("{field}: cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{field}: {host} resolves to no address"))
}

async fn join_cluster(settings: &ClusterSettings, peer_port: u16, admin_port: u16) -> anyhow::Result<Cluster> {
    let host = settings.advertise_host();
    let gossip_listen: SocketAddr =
        resolve(&settings.gossip.address, settings.gossip.port_value, "cluster.gossip").await?;
    let gossip_advertise = resolve(host, settings.gossip.port_value, "cluster.advertise_host").await?;
    let peer_advertise = resolve(host, peer_port, "cluster.advertise_host").await?;
    let admin_advertise = resolve(host, admin_port, "cluster.advertise_host").await?;
    let mut config = ClusterConfig::defaults_for(
        settings.node_name.clone(),
        settings.cluster_id.clone(),
        gossip_listen,
        peer_advertise,
        admin_advertise,
    );
    config.gossip_advertise = gossip_advertise;
    config.seeds = settings.seeds.clone();
    config.gossip_interval = *settings.gossip_interval;
    config.virtual_nodes = settings.ring_virtual_nodes();
    // With cluster TLS a member joins the ring only once its peer certificate was seen to name it.
    config.require_verified_peers = settings.tls.is_some();
    config.failure_detector = settings.failure_detector.settings();
    config.gossip_seal = settings.gossip_keys_file.as_ref().map(GossipSeal::new);
    if config.gossip_seal.is_none() {
        tracing::warn!("cluster.gossip_keys_file is not set: gossip is plaintext and unauthenticated");
    }
    let cluster = Cluster::join(config).await.map_err(|e| anyhow::anyhow!("cannot join the cluster: {e}"))?;
    tracing::info!(node = %settings.node_name, gossip = %gossip_advertise, peer = %peer_advertise, seeds = ?settings.seeds, "joined the relay cluster");
    Ok(cluster)
}

/// The connection caps of the node's listeners: `limits.max_connections` for xDS (and peer),
/// [`listener::ADMIN_MAX_CONNECTIONS`] for admin, lowered to fit the open-file limit (with a
/// warning saying so).
fn connection_caps(bootstrap: &Bootstrap, clustered: bool) -> listener::ConnectionCaps {
    let configured = bootstrap.limits.max_connections;
    let grpc_listeners = if clustered { 2 } else { 1 };
    let file_limit = listener::open_file_limit();
    let caps = listener::fit_to_file_limit(configured, grpc_listeners, file_limit);
    if caps.grpc < configured || caps.admin < listener::ADMIN_MAX_CONNECTIONS {
        tracing::warn!(
            configured,
            effective = caps.grpc,
            admin = caps.admin,
            open_file_limit = file_limit,
            grpc_listeners,
            "limits.max_connections lowered to {} per listener to fit the open-file limit (RLIMIT_NOFILE {}); \
             raise the limit (ulimit -n, LimitNOFILE=) to allow more",
            caps.grpc,
            file_limit.unwrap_or_default()
        );
    }
    caps
}

/// The store of last-known-good states and its writer's queue, when `cache.persist_dir` is
/// set.
fn open_persist_dir(bootstrap: &Bootstrap) -> anyhow::Result<Option<(Arc<Store>, Arc<Queue>)>> {
    let Some(dir) = &bootstrap.cache.persist_dir else { return Ok(None) };
    bootstrap.cache.prepare_persist_dir().map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Store::open(dir, persist::record_bound(bootstrap)).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Some((Arc::new(store), Arc::new(Queue::new()))))
}

/// Seeds `cache` with every whole record of `store` (read and seeded on the blocking pool,
/// one file at a time), each marked stale until a live source delivers; skipped files are
/// logged and counted.
async fn load_persisted(
    cache: &Arc<Cache>,
    store: &Arc<Store>,
    metrics: &Metrics,
    pass_through: bool,
    tracker: &TaskTracker,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (reader, into, counts) = (store.clone(), cache.clone(), metrics.clone());
    let loaded = tracker
        .spawn_blocking(move || persist::load(&into, &reader, &counts, pass_through))
        .await
        .map_err(|e| anyhow::anyhow!("cache.persist_dir: reading the records failed: {e}"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(
        dir = %store.dir().display(), keys = loaded.seeded, skipped = loaded.skipped,
        elapsed_ms = started.elapsed().as_millis(), "last-known-good states loaded from disk"
    );
    Ok(())
}

/// The TLS material of a node's links, each `None` when its section is absent.
struct NodeTls {
    xds: Option<TlsAcceptor>,
    admin: Option<TlsAcceptor>,
    peer_server: Option<TlsAcceptor>,
    peer_client: Option<ClientTls>,
    origin: Option<ClientTls>,
}

/// Logs an error when this node's peer certificate does not name it: every other member
/// refuses such a certificate, so the node would never join their rings.
fn warn_unless_named(cluster: &ClusterSettings, tls: &crate::config::ClusterTls) {
    let expected = crate::peer::identity::member_uri(&cluster.cluster_id, &cluster.node_name);
    let named = crate::config::tls::read_certs(std::path::Path::new(&tls.cert_file))
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .map(|leaf| crate::peer::identity::member_name(&leaf, &cluster.cluster_id));
    match named {
        Some(Ok(name)) if name == cluster.node_name => {}
        Some(Ok(name)) => tracing::error!(
            certificate = %tls.cert_file, names = %name, expected = %expected,
            "cluster.tls.cert_file names another member: the other members will refuse this node"
        ),
        Some(Err(error)) => tracing::error!(
            certificate = %tls.cert_file, error = %error, expected = %expected,
            "cluster.tls.cert_file does not name this node: the other members will refuse it"
        ),
        None => {}
    }
}

impl NodeTls {
    /// Loads every configured TLS section of `bootstrap`.
    fn load(bootstrap: &Bootstrap, metrics: &Metrics) -> anyhow::Result<Self> {
        tls::install_crypto_provider();
        let context = |field: &'static str| move |e: tls::TlsError| anyhow::anyhow!("{field}: {e}");
        let cluster_tls = bootstrap.cluster.as_ref().and_then(|c| c.tls.as_ref());
        if bootstrap.cluster.as_ref().is_some_and(|c| c.tls.is_none()) {
            tracing::warn!("cluster.insecure is set: the peer protocol between relays runs without TLS");
        }
        if let Some(cluster) = &bootstrap.cluster
            && let Some(tls) = &cluster.tls
        {
            warn_unless_named(cluster, tls);
        }
        Ok(Self {
            xds: bootstrap
                .server
                .tls
                .as_ref()
                .map(|t| TlsAcceptor::for_xds(t, metrics.clone()))
                .transpose()
                .map_err(context("server.tls"))?,
            admin: bootstrap
                .admin
                .tls
                .as_ref()
                .map(|t| TlsAcceptor::for_admin(t, metrics.clone()))
                .transpose()
                .map_err(context("admin.tls"))?,
            peer_server: cluster_tls
                .map(|t| TlsAcceptor::for_peer(t, metrics.clone()))
                .transpose()
                .map_err(context("cluster.tls"))?,
            peer_client: cluster_tls
                .map(|t| ClientTls::for_peers(t, metrics.clone()))
                .transpose()
                .map_err(context("cluster.tls"))?,
            origin: bootstrap
                .origin_server
                .tls
                .as_ref()
                .map(|t| ClientTls::for_origin(t, metrics.clone()))
                .transpose()
                .map_err(context("origin_server.tls"))?,
        })
    }

    /// Starts polling every loaded set of files for changes.
    fn spawn_reload(&self, tracker: &TaskTracker, shutdown: &CancellationToken) {
        for acceptor in [&self.xds, &self.admin, &self.peer_server].into_iter().flatten() {
            acceptor.spawn_reload(tls::RELOAD_INTERVAL, tracker, shutdown.clone());
        }
        for client in [&self.peer_client, &self.origin].into_iter().flatten() {
            client.spawn_reload(tls::RELOAD_INTERVAL, tracker, shutdown.clone());
        }
    }
}

impl Node {
    /// Builds the node and starts serving on `listeners`.
    ///
    /// # Errors
    /// Fails when the rules, the origin addresses or the cluster settings cannot be used.
    pub async fn start(
        bootstrap: Bootstrap,
        rules: &KeyerConfiguration,
        listeners: Listeners,
        log: LogControl,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        // A start that fails part way stops what it had started.
        let stop_on_failure = shutdown.clone().drop_guard();
        let handovers = HandoverSignal::new();
        let metrics = Metrics::new();
        metrics.set_max_key_series(bootstrap.telemetry.max_key_series);
        let keyer = Keyer::new(rules).map_err(|e| anyhow::anyhow!("{e}"))?;
        let pass_through = bootstrap.server.pass_through_unmapped;
        let kept = open_persist_dir(&bootstrap)?;
        let rollouts = bootstrap
            .rollout
            .as_ref()
            .map(|settings| Rollouts::new(settings, metrics.clone(), tracker.clone(), shutdown.clone()).map(Arc::new))
            .transpose()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut cache = Cache::new(bootstrap.cache.clone(), metrics.clone()).with_limits(bootstrap.limits);
        if let Some((_, queue)) = &kept {
            cache = cache.with_keeper(Arc::new(KeptStates::new(queue.clone(), pass_through)));
        }
        if let Some(rollouts) = &rollouts {
            cache = cache.with_staged_keys(rollouts.staged_keys());
        }
        let cache = Arc::new(cache);
        // Before anything serves: clients are answered from disk at once.
        if let Some((store, queue)) = kept {
            load_persisted(&cache, &store, &metrics, pass_through, &tracker).await?;
            persist::writer::spawn(queue, store, metrics.clone(), &tracker, shutdown.clone());
        }
        let tls = NodeTls::load(&bootstrap, &metrics)?;
        tls.spawn_reload(&tracker, &shutdown);
        let origin =
            Origin::new(&bootstrap.origin_server, tls.origin.clone(), &metrics, tracker.clone(), handovers.clone())?;
        let xds_addr = listeners.xds.local_addr()?;
        let admin_addr = listeners.admin.local_addr()?;
        let caps = connection_caps(&bootstrap, listeners.peer.is_some());
        let handshake_timeout = *bootstrap.limits.handshake_timeout;

        let membership = match (&bootstrap.cluster, &listeners.peer) {
            (Some(settings), Some(peer)) => {
                let peer_addr = peer.local_addr()?;
                let cluster = join_cluster(settings, peer_addr.port(), admin_addr.port()).await?;
                // Gossip stops with the node, within its task tree.
                let (member, stopped) = (cluster.clone(), shutdown.clone());
                tracker.spawn(async move {
                    stopped.cancelled().await;
                    member.shutdown().await;
                });
                let followers = FollowerSettings {
                    self_name: settings.node_name.clone(),
                    channels: PeerChannels::new(tls.peer_client.clone(), &settings.cluster_id),
                    backoff: (
                        *bootstrap.origin_server.backoff.initial_interval,
                        *bootstrap.origin_server.backoff.max_interval,
                    ),
                    max_message_size: bootstrap.origin_server.max_message_size,
                    tracker: tracker.clone(),
                    handovers: handovers.clone(),
                };
                crate::peer::admission::spawn(
                    cluster.clone(),
                    followers.channels.clone(),
                    metrics.clone(),
                    &tracker,
                    shutdown.clone(),
                );
                Some(Membership { cluster, followers })
            }
            _ => None,
        };
        let relay = Arc::new(
            Relay::new(keyer, cache, origin, membership, metrics.clone(), shutdown.clone())
                .with_pass_through(bootstrap.server.pass_through_unmapped)
                .with_rollouts(rollouts),
        );
        relay.spawn_housekeeping(&tracker);

        if let Some(peer) = listeners.peer {
            let peer_addr = peer.local_addr()?;
            // A follower's requests are as small as a client's: the downstream request limit.
            let max_request_bytes = bootstrap.limits.max_request_bytes;
            let auth = match bootstrap.cluster.as_ref().filter(|c| c.tls.is_some()) {
                Some(cluster) => PeerAuth::Members { cluster_id: cluster.cluster_id.clone() },
                None => PeerAuth::Insecure,
            };
            let tasks = ServiceTasks { tracker: tracker.clone(), shutdown: shutdown.clone(), handovers };
            let service = PeerService::new(relay.clone(), auth, bootstrap.limits, tasks);
            let service = PeerServer::from_arc(Arc::new(service))
                .max_decoding_message_size(max_request_bytes)
                .max_encoding_message_size(bootstrap.origin_server.max_message_size);
            let peer_shutdown = shutdown.clone();
            // A follower puts every key it follows here on one connection: its cap is
            // max_streams_per_connection, raised to max_active_keys (see StreamCapLayer::for_peers).
            let per_connection = listener::StreamCapLayer::for_peers(
                bootstrap.limits.max_streams_per_connection,
                bootstrap.limits.max_active_keys,
                metrics.clone(),
            );
            let peer_streams = u32::try_from(per_connection.cap()).unwrap_or(u32::MAX);
            let server = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .max_concurrent_streams(peer_streams)
                .tcp_nodelay(true)
                .layer(per_connection)
                .add_service(service);
            let gates = ListenerSettings {
                name: "peer",
                max_connections: caps.grpc,
                handshake_timeout,
                protocol: Protocol::Http2,
            };
            let peer_tls = tls.peer_server.clone();
            let (accepts, peer_metrics) = (tracker.clone(), metrics.clone());
            tracker.spawn(async move {
                let stopped = peer_shutdown.clone().cancelled_owned();
                let served = match peer_tls {
                    // mTLS: a client certificate chaining to the cluster CA is required.
                    Some(acceptor) => {
                        let incoming =
                            listener::accept_tls(peer, gates, acceptor, peer_metrics, &accepts, peer_shutdown.clone());
                        server.serve_with_incoming_shutdown(incoming, stopped).await
                    }
                    None => {
                        let incoming =
                            listener::accept_plain(peer, gates, peer_metrics, &accepts, peer_shutdown.clone());
                        server.serve_with_incoming_shutdown(incoming, stopped).await
                    }
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "peer server failed");
                    peer_shutdown.cancel();
                }
            });
            tracing::info!(address = %peer_addr, "peer server listening");
        }

        let admin_guard = admin::AdminGuard::new(&bootstrap.admin, metrics.clone())?;
        admin_guard.spawn_reload(&tracker, shutdown.clone());
        let ready = Arc::new(AtomicBool::new(false));
        let settings = ServerSettings {
            max_streams: bootstrap.server.max_streams,
            ads_batch_window: *bootstrap.server.ads_batch_window,
            node_identity: bootstrap.server.tls.as_ref().and_then(|t| t.node_identity),
            allow_secrets_without_tls: bootstrap.server.allow_secrets_without_tls,
            max_connections: caps.grpc,
            limits: bootstrap.limits,
            pass_through_unmapped: bootstrap.server.pass_through_unmapped,
            ..ServerSettings::default()
        };
        let admin_state = AdminState {
            relay: relay.clone(),
            metrics: metrics.clone(),
            log,
            ready: ready.clone(),
            guard: admin_guard,
            bootstrap: Arc::new(bootstrap),
        };
        let xds_shutdown = shutdown.clone();
        let source = relay.clone();
        let xds_metrics = metrics.clone();
        tracker.spawn(async move {
            let served =
                downstream::serve(listeners.xds, source, xds_metrics, settings, tls.xds, xds_shutdown.clone()).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "xDS server failed");
                xds_shutdown.cancel();
            }
        });
        let admin_shutdown = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) =
                admin::serve(listeners.admin, admin_state, tls.admin, caps.admin, admin_shutdown.clone()).await
            {
                tracing::error!(error = %e, "admin server failed");
                admin_shutdown.cancel();
            }
        });
        if let Some(membership) = relay.membership() {
            membership.cluster.set_state(NodeState::Ready).await;
        }
        ready.store(true, Ordering::Release);
        tracing::info!(address = %xds_addr, "xDS server listening");
        tracing::info!(address = %admin_addr, "admin server listening");
        stop_on_failure.disarm();
        Ok(Self { xds_addr, admin_addr, relay, metrics, ready, shutdown, tracker })
    }

    /// A token that fires when the node stops (or that stops it when cancelled).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops the node within `grace`. A clustered node first drains, for at most half of
    /// `grace`: it turns not ready (the load balancer stops sending clients), gossips
    /// `draining` (the others take its keys), and waits until its keys are taken from their
    /// new owners and no node follows it, re-checking on every handover, follower leaving or
    /// view change. Then it cancels every task of its tree (streams, sources, servers,
    /// gossip) and awaits them for the rest of `grace` (at least a second).
    pub async fn stop(self, grace: Duration) {
        let started = Instant::now();
        self.ready.store(false, Ordering::Release);
        if let Some(membership) = self.relay.membership() {
            tracing::info!("draining: handing keys over to their new owners");
            let (handovers, views) = (membership.followers.handovers.subscribe(), membership.cluster.watch());
            membership.cluster.set_state(NodeState::Draining).await;
            let relay = &self.relay;
            let drained = || {
                relay.reconcile();
                relay.keys_not_handed_over() == 0 && followed_keys(relay) == 0
            };
            handover::wait_until(drained, handovers, views, started + grace / 2).await;
            let (pending, followed) = (relay.keys_not_handed_over(), followed_keys(relay));
            tracing::info!(pending, followed, "drain finished");
        }
        self.shutdown.cancel();
        self.tracker.close();
        let left = grace.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
        if tokio::time::timeout(left, self.tracker.wait()).await.is_err() {
            tracing::warn!(grace = ?grace, "some tasks did not stop within the grace period");
            // Gossip still leaves the cluster and unbinds its socket before `stop` returns
            // (a second shutdown only waits for the tasks the first one stopped).
            if let Some(membership) = self.relay.membership() {
                membership.cluster.clone().shutdown().await;
            }
        }
        self.relay.cache().clear_all();
    }
}

/// How many of the relay's keys other nodes follow through this node.
fn followed_keys(relay: &Relay) -> usize {
    relay.cache().entries().iter().filter(|e| e.has_followers()).count()
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::Node as EnvoyNode;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;
    use crate::config::{LogLevel, parse_bootstrap, parse_rules};

    /// A node whose origin refuses connections: a client's stream waits, watching its key.
    async fn node_without_origin() -> Node {
        let refused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let bootstrap = parse_bootstrap(
            &format!(
                "server:\n  address: {{ address: \"127.0.0.1\", port_value: 0 }}\n\
                 origin_server:\n  address: {{ address: \"127.0.0.1\", port_value: {} }}\n\
                 cache: {{ ttl: 60s }}\n\
                 admin:\n  address: {{ address: \"127.0.0.1\", port_value: 0 }}\n",
                refused.port()
            ),
            "bootstrap.yaml",
        )
        .unwrap();
        let rules = parse_rules(include_str!("../example/config/aggregation-rules.yaml"), "rules.yaml").unwrap();
        let listeners = Listeners::bind(&bootstrap).await.unwrap();
        Node::start(bootstrap, &rules, listeners, LogControl::detached(LogLevel::Info)).await.unwrap()
    }

    #[tokio::test]
    async fn stop_cancels_and_awaits_a_running_client_stream() {
        let node = node_without_origin().await;
        let metrics = node.metrics.clone();
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", node.xds_addr)).await.unwrap();
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        let node_info = EnvoyNode { id: "envoy-1".into(), cluster: "staging-a".into(), ..Default::default() };
        requests
            .send(DiscoveryRequest {
                node: Some(node_info),
                type_url: crate::xds::CLUSTER.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut responses = client.stream_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let watching = async {
            while node.relay.cache().entries().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), watching).await.expect("the stream watches its key");
        assert_eq!(metrics.downstream_streams.get(), 1);

        tokio::time::timeout(Duration::from_secs(10), node.stop(Duration::from_secs(5)))
            .await
            .expect("stop is bounded");
        assert_eq!(metrics.downstream_streams.get(), 0, "the stream's task ended within stop");
        let ended = responses.message().await.expect_err("the stream ends with a status");
        assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
        drop(requests);
    }
}
