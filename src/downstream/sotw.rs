//! State-of-the-world streams (aggregated or per-type): how requests and cache states turn
//! into responses.

use std::collections::HashMap;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use super::stream::{PendingPush, Protocol, Stop, StreamCore};
use super::subscription::{self, Classified, SubscriptionState};
use crate::cache::SotwMessage;
use crate::node_cache::Watcher;
use crate::xds;

/// Per type: the subscription, the watcher of its key and what was sent.
#[derive(Default)]
struct TypeState {
    subscription: SubscriptionState,
    watcher: Option<Watcher>,
    /// Serial of the last state sent.
    sent_serial: Option<u64>,
    /// Version of the last state sent (a NACK rejects it).
    sent_version: String,
    /// Content serial of the last state sent.
    sent_content: Option<u64>,
    /// Content serial of the last state the client ACKed: it holds those bodies, and TTL
    /// heartbeats may stand for them.
    acked_content: Option<u64>,
    /// True when the client must be answered even if the state did not change.
    force: bool,
    /// The traced push awaiting the client's answer.
    pending: Option<PendingPush>,
    /// The nonce of the last shared message sent: a state sent again (a forced resend) goes
    /// with a nonce of the stream's own, so no nonce is ever sent twice on the stream and a
    /// late answer to the first send stays recognisably stale.
    last_shared: Option<String>,
}

/// The state-of-the-world protocol of one stream.
#[derive(Default)]
pub(super) struct Sotw {
    /// Per type URL; foldhash instead of SipHash: the map is read on every request and push
    /// (SipHash over ~50-byte type URLs was ~1,200 instructions per client per update).
    types: HashMap<String, TypeState, foldhash::fast::RandomState>,
}

impl Protocol for Sotw {
    type Request = DiscoveryRequest;

    async fn on_request(&mut self, core: &mut StreamCore, request: DiscoveryRequest) -> Result<(), Stop> {
        core.observe_node(request.node.as_ref())?;
        let type_url = core.resolve_type(&request.type_url)?;
        if !self.types.contains_key(type_url) {
            self.types.insert(type_url.to_owned(), TypeState::default());
        }
        let Some(state) = self.types.get_mut(type_url) else { return Ok(()) };
        match subscription::classify(&state.subscription, &request) {
            Classified::Stale => {
                core.shared.metrics.stale_requests.inc();
                tracing::debug!(peer = %core.peer, type_url = %type_url, nonce = %request.response_nonce, "stale request ignored");
                return Ok(());
            }
            Classified::Initial => {}
            Classified::Ack { version } => {
                if let Some(watcher) = &state.watcher {
                    watcher.record_ack(&version);
                }
                if let Some(pending) = state.pending.take() {
                    pending.answered(None);
                }
                state.acked_content = state.sent_content;
            }
            Classified::Nack { version, message } => {
                if let Some(watcher) = &state.watcher {
                    tracing::info!(
                        peer = %core.peer, key = %watcher.entry().key, type_url = %type_url,
                        version = %state.sent_version, accepted_version = %version, error = %message, "client NACKed"
                    );
                    watcher.record_nack(&state.sent_version, &message);
                }
                if let Some(pending) = state.pending.take() {
                    pending.answered(Some(&message));
                }
            }
        }
        let changed = subscription::apply_request(&mut state.subscription, &request, core.node.as_ref(), type_url)
            .map_err(|message| core.reject("resource_locators", tonic::Status::invalid_argument(message)))?;
        if !changed {
            return Ok(());
        }
        state.force = true;
        if core.rewatch(type_url, &mut state.subscription.interest, &mut state.watcher)? {
            state.sent_serial = None;
        }
        self.push(core, type_url).await?;
        if type_url == xds::CLUSTER {
            self.push(core, xds::ENDPOINT).await?;
        }
        Ok(())
    }

    async fn push(&mut self, core: &mut StreamCore, type_url: &str) -> Result<(), Stop> {
        let Some(state) = self.types.get_mut(type_url) else { return Ok(()) };
        let Some(watcher) = &state.watcher else { return Ok(()) };
        let key_state = watcher.state();
        let interest = &state.subscription.interest;
        if !key_state.is_ready() || interest.is_empty() {
            return Ok(());
        }
        let full_state = xds::is_full_state(type_url) || key_state.opaque;
        // Never answer LDS/CDS from a state that was not fetched for these names: a missing
        // resource there means "deleted" to the client.
        if full_state && !key_state.coverage.covers(interest) {
            return Ok(());
        }
        if !state.force && state.sent_serial == Some(key_state.serial) {
            return Ok(());
        }
        if !watcher.may_receive(&key_state) {
            // do_not_cache resources that arrived before the client asked: never from cache.
            // The client waits for the fresh copy its source is asked for.
            core.hold_for_fresh_copy(watcher);
            return Ok(());
        }
        let holds_bodies = !state.force && state.acked_content == Some(key_state.content_serial);
        let (message, count) = key_state.sotw_message(interest, holds_bodies);
        // An older state than the last one sent (a staged rollout's canary rolled back to the
        // stable version) was shared with its own nonce before: it goes with a new nonce.
        let older = state.sent_serial.is_some_and(|sent| key_state.serial < sent);
        state.sent_serial = Some(key_state.serial);
        state.force = false;
        let errors = !key_state.errors_for(interest).is_empty();
        if count == 0 && !full_state && !errors {
            // An empty EDS/RDS response says nothing; the client waits for the resources.
            return Ok(());
        }
        core.count_protocol_extras(&key_state, holds_bodies && !key_state.heartbeats.is_empty(), errors);
        // The message every like stream shares, unless this stream was already sent it.
        let nonce = match message {
            SotwMessage::Shared(shared) if !older && state.last_shared.as_deref() != Some(shared.nonce.as_str()) => {
                let nonce = core.send_shared(watcher, &key_state, shared, count).await?;
                state.last_shared = Some(nonce.clone());
                nonce
            }
            message => core.send(watcher, &key_state, message.body(), count).await?,
        };
        state.pending = PendingPush::start(core, watcher, &key_state);
        state.subscription.last_nonce = Some(nonce);
        state.sent_version = key_state.version_info.clone();
        state.sent_content = Some(key_state.content_serial);
        if type_url == xds::CLUSTER {
            // A cluster finishes warming only with an EDS response, even an unchanged one.
            if let Some(endpoints) = self.types.get_mut(xds::ENDPOINT) {
                endpoints.force = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The state-of-the-world stream rules, in memory: a stream is opened on the server's own
    //! method service with a request body the test writes and a response body it reads as
    //! gRPC frames; keys come from a [`FakeSource`] whose states the test publishes. Time is
    //! paused: "nothing is sent" waits cost nothing.

    use std::convert::Infallible;
    use std::marker::PhantomData;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::google::protobuf::Any;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use http_body_util::BodyExt as _;
    use prost::Message as _;
    use tokio::sync::{Semaphore, mpsc};
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt as _;

    use crate::cache::{CacheError, ClientInfo, ClientStatus, Interest};
    use crate::config::CacheConfig;
    use crate::downstream::{KeySource, Method, ServedBy, ServerSettings, Shared};
    use crate::keyer::{KeyError, KeyRequest};
    use crate::node_cache::{Cache, Entry, Watcher};
    use crate::telemetry::Metrics;
    use crate::xds;

    /// A key source over a real cache that starts no source: a type's key is `key:<type>`
    /// and its states are what the test publishes. Refresh requests are recorded.
    pub(in crate::downstream) struct FakeSource {
        pub(in crate::downstream) cache: Cache,
        pub(in crate::downstream) refreshed: Mutex<Vec<String>>,
    }

    impl KeySource for FakeSource {
        fn key(&self, request: &KeyRequest<'_>) -> Result<String, KeyError> {
            Ok(format!("key:{}", request.type_url))
        }

        fn watch(
            &self,
            key: &str,
            type_url: &str,
            node: &Node,
            client: ClientInfo,
            interest: Interest,
        ) -> Result<Watcher, CacheError> {
            self.cache.watch(key, type_url, node, client, interest, |_| {})
        }

        fn refresh(&self, entry: &Arc<Entry>) {
            self.refreshed.lock().unwrap().push(entry.key.clone());
        }

        fn release(&self, _key: &str) {}
    }

    /// The shared state of a server over a [`FakeSource`], and its shutdown token.
    pub(in crate::downstream) struct Harness {
        pub(in crate::downstream) source: Arc<FakeSource>,
        pub(in crate::downstream) shared: Arc<Shared>,
    }

    impl Harness {
        pub(in crate::downstream) fn new() -> Self {
            let metrics = Metrics::new();
            let source = Arc::new(FakeSource {
                cache: Cache::new(
                    CacheConfig { ttl: Duration::from_secs(60).into(), max_entries: 0, persist_dir: None },
                    metrics.clone(),
                ),
                refreshed: Mutex::default(),
            });
            let settings = ServerSettings::default();
            let shared = Arc::new(Shared {
                source: source.clone(),
                metrics,
                streams: Arc::new(Semaphore::new(settings.max_streams)),
                settings,
                shutdown: CancellationToken::new(),
                tasks: tokio_util::task::TaskTracker::new(),
                tls: false,
            });
            Self { source, shared }
        }

        /// Opens a stream of protocol `R` (aggregated when `default_type` is `None`).
        pub(in crate::downstream) async fn open<R: ServedBy>(&self, default_type: Option<&'static str>) -> TestStream {
            let (requests, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
            let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            let method = Method::<R> { shared: self.shared.clone(), default_type, protocol: PhantomData };
            let response = method.oneshot(http::Request::new(body)).await.unwrap();
            TestStream { requests: Some(requests), body: response.into_body(), buffer: BytesMut::new(), ended: None }
        }

        /// The cache entry of `type_url`'s key.
        pub(in crate::downstream) fn entry(&self, type_url: &str) -> Arc<Entry> {
            self.source.cache.get(&format!("key:{type_url}")).expect("a stream watches the key")
        }

        /// What the cache knows of the key's one client.
        pub(in crate::downstream) fn client(&self, type_url: &str) -> ClientStatus {
            let clients = self.entry(type_url).clients();
            assert_eq!(clients.len(), 1, "{clients:?}");
            clients.into_iter().next().unwrap()
        }

        /// Waits until a stream watches `type_url`'s key and returns its entry.
        pub(in crate::downstream) async fn watched(&self, type_url: &str) -> Arc<Entry> {
            for _ in 0..1000 {
                if let Some(entry) = self.source.cache.get(&format!("key:{type_url}")) {
                    return entry;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("no stream watches the key of {type_url}");
        }

        /// Gives `type_url`'s key the state `resources` at `version`, as an origin would,
        /// once a stream watches it.
        pub(in crate::downstream) async fn publish(&self, type_url: &str, version: &str, resources: Vec<Any>) {
            let entry = self.watched(type_url).await;
            let response = DiscoveryResponse {
                version_info: version.into(),
                type_url: type_url.into(),
                resources,
                ..Default::default()
            };
            let first = !entry.state().is_ready();
            entry.apply_response(response, &Interest::wildcard(), first, |_| Default::default()).unwrap();
        }
    }

    /// The client end of an in-memory stream.
    pub(in crate::downstream) struct TestStream {
        requests: Option<mpsc::Sender<Result<Bytes, Infallible>>>,
        body: tonic::body::Body,
        buffer: BytesMut,
        /// The gRPC status the stream ended with.
        ended: Option<tonic::Code>,
    }

    /// How long a stream is watched for a response that must not come (paused time).
    pub(in crate::downstream) const QUIET: Duration = Duration::from_secs(5);

    impl TestStream {
        /// Sends `request` as one gRPC message.
        pub(in crate::downstream) async fn send(&self, request: &impl prost::Message) {
            let mut frame = BytesMut::with_capacity(5 + request.encoded_len());
            frame.put_u8(0);
            frame.put_u32(u32::try_from(request.encoded_len()).unwrap());
            request.encode(&mut frame).unwrap();
            let requests = self.requests.as_ref().expect("the request stream is open");
            requests.send(Ok(frame.freeze())).await.expect("the server reads requests");
        }

        /// Ends the request stream (the client half-closes).
        pub(in crate::downstream) fn close(&mut self) {
            self.requests = None;
        }

        /// The next message, or `None` once the stream has ended or after `wait`.
        pub(in crate::downstream) async fn next<M: prost::Message + Default>(&mut self, wait: Duration) -> Option<M> {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if self.buffer.len() >= 5 {
                    let length = u32::from_be_bytes(self.buffer[1..5].try_into().unwrap()) as usize;
                    if self.buffer.len() >= 5 + length {
                        self.buffer.advance(5);
                        let message = self.buffer.split_to(length);
                        return Some(M::decode(message.freeze()).expect("a well-formed message"));
                    }
                }
                if self.ended.is_some() {
                    return None;
                }
                let frame = match tokio::time::timeout_at(deadline, self.body.frame()).await {
                    Err(_) => return None,
                    Ok(frame) => frame,
                };
                match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => self.buffer.extend_from_slice(&data),
                        Err(frame) => {
                            let trailers = frame.into_trailers().expect("data or trailers");
                            let code = trailers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok());
                            self.ended = Some(tonic::Code::from_i32(code.unwrap_or(2)));
                        }
                    },
                    Some(Err(status)) => self.ended = Some(status.code()),
                    None => self.ended = Some(tonic::Code::Ok),
                }
            }
        }

        /// The next message; panics when none comes.
        pub(in crate::downstream) async fn recv<M: prost::Message + Default>(&mut self) -> M {
            match self.next(Duration::from_secs(30)).await {
                Some(message) => message,
                None => panic!("no message came (stream ended: {:?})", self.ended),
            }
        }

        /// Panics when a message comes within [`QUIET`].
        pub(in crate::downstream) async fn silent<M: prost::Message + Default + std::fmt::Debug>(&mut self) {
            if let Some(message) = self.next::<M>(QUIET).await {
                panic!("nothing should have been sent, got {message:?}");
            }
        }

        /// The status the stream ends with (reading past any message).
        pub(in crate::downstream) async fn status(&mut self) -> tonic::Code {
            while self.next::<Bytes>(Duration::from_secs(30)).await.is_some() {}
            self.ended.expect("the stream ended")
        }
    }

    pub(in crate::downstream) fn node() -> Node {
        Node { id: "envoy-1".into(), cluster: "staging".into(), ..Default::default() }
    }

    pub(in crate::downstream) fn clusters(names: &[&str]) -> Vec<Any> {
        let cluster = |name: &&str| Cluster { name: (*name).into(), ..Default::default() };
        names.iter().map(|name| Any { type_url: xds::CLUSTER.into(), value: cluster(name).encode_to_vec() }).collect()
    }

    fn assignments(names: &[&str]) -> Vec<Any> {
        let cla = |name: &&str| ClusterLoadAssignment { cluster_name: (*name).into(), ..Default::default() };
        names.iter().map(|name| Any { type_url: xds::ENDPOINT.into(), value: cla(name).encode_to_vec() }).collect()
    }

    fn names(response: &DiscoveryResponse) -> Vec<String> {
        response.resources.iter().map(|r| crate::wire::resource_name(r).unwrap_or_default().to_owned()).collect()
    }

    /// A request of `type_url` for `names` answering `nonce` with `version`.
    fn request(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            node: Some(node()),
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(type_url: &str, version: &str, nonce: &str, message: &str) -> DiscoveryRequest {
        let error = RpcStatus { code: 3, message: message.into(), ..Default::default() };
        DiscoveryRequest { error_detail: Some(error), ..request(type_url, &[], version, nonce) }
    }

    #[tokio::test(start_paused = true)]
    async fn acks_and_nacks_are_recorded_and_a_nack_gets_no_resend() {
        let harness = Harness::new();
        let mut stream = harness.open::<DiscoveryRequest>(None).await;
        stream.send(&request(xds::CLUSTER, &[], "", "")).await;
        stream.silent::<DiscoveryResponse>().await;

        harness.publish(xds::CLUSTER, "1", clusters(&["a", "b"])).await;
        let first: DiscoveryResponse = stream.recv().await;
        assert_eq!((first.version_info.as_str(), first.type_url.as_str()), ("1", xds::CLUSTER));
        assert_eq!(names(&first), ["a", "b"]);
        stream.send(&request(xds::CLUSTER, &[], "1", &first.nonce)).await;
        stream.silent::<DiscoveryResponse>().await;
        assert_eq!(harness.client(xds::CLUSTER).acked_version, "1");

        harness.publish(xds::CLUSTER, "2", clusters(&["a", "b", "c"])).await;
        let second: DiscoveryResponse = stream.recv().await;
        assert_eq!(second.version_info, "2");
        stream.send(&nack(xds::CLUSTER, "1", &second.nonce, "cluster c is malformed")).await;
        stream.silent::<DiscoveryResponse>().await;
        let client = harness.client(xds::CLUSTER);
        assert_eq!((client.acked_version.as_str(), client.nacks), ("1", 1));
        let last = client.last_nack.expect("the NACK is recorded");
        assert_eq!((last.rejected_version.as_str(), last.message.as_str()), ("2", "cluster c is malformed"));

        // A NACKing client gets the next version.
        harness.publish(xds::CLUSTER, "3", clusters(&["a", "b"])).await;
        let third: DiscoveryResponse = stream.recv().await;
        assert_eq!(third.version_info, "3");
        let nonces = [&first.nonce, &second.nonce, &third.nonce];
        assert!(nonces[0] != nonces[1] && nonces[1] != nonces[2] && nonces[0] != nonces[2], "{nonces:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_with_a_stale_nonce_is_ignored() {
        let harness = Harness::new();
        let mut stream = harness.open::<DiscoveryRequest>(None).await;
        stream.send(&request(xds::ENDPOINT, &["a"], "", "")).await;
        harness.publish(xds::ENDPOINT, "1", assignments(&["a", "b"])).await;
        let first: DiscoveryResponse = stream.recv().await;
        stream.send(&request(xds::ENDPOINT, &["a"], "1", &first.nonce)).await;
        harness.publish(xds::ENDPOINT, "2", assignments(&["a", "b"])).await;
        let second: DiscoveryResponse = stream.recv().await;
        assert_eq!(second.version_info, "2");

        // Answers to the first nonce are late: neither their ACK nor their names count.
        let stale_before = harness.shared.metrics.stale_requests.get();
        stream.send(&request(xds::ENDPOINT, &["a", "b"], "1", &first.nonce)).await;
        stream.silent::<DiscoveryResponse>().await;
        assert_eq!(harness.shared.metrics.stale_requests.get(), stale_before + 1);
        assert_eq!(harness.client(xds::ENDPOINT).acked_version, "1");

        // The same change answering the current nonce is served.
        stream.send(&request(xds::ENDPOINT, &["a", "b"], "2", &second.nonce)).await;
        let widened: DiscoveryResponse = stream.recv().await;
        assert_eq!(names(&widened), ["a", "b"]);
        assert_eq!(widened.version_info, "2");
        assert_ne!(widened.nonce, second.nonce, "a resend goes with a new nonce");
        assert_eq!(harness.client(xds::ENDPOINT).acked_version, "2");
    }

    #[tokio::test(start_paused = true)]
    async fn an_eds_stream_gets_only_its_names_and_nothing_for_names_without_resources() {
        let harness = Harness::new();
        let mut stream = harness.open::<DiscoveryRequest>(None).await;
        stream.send(&request(xds::ENDPOINT, &["missing"], "", "")).await;
        harness.publish(xds::ENDPOINT, "1", assignments(&["a", "b", "c"])).await;
        stream.silent::<DiscoveryResponse>().await;
        stream.send(&request(xds::ENDPOINT, &["a", "c"], "", "")).await;
        let response: DiscoveryResponse = stream.recv().await;
        assert_eq!(names(&response), ["a", "c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_skips_versions_but_never_gets_an_older_one_after_a_newer() {
        let harness = Harness::new();
        let mut stream = harness.open::<DiscoveryRequest>(None).await;
        stream.send(&request(xds::CLUSTER, &[], "", "")).await;
        for version in 1..=30 {
            harness.publish(xds::CLUSTER, &version.to_string(), clusters(&["a", &format!("c{version}")])).await;
            if version % 5 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let mut seen = Vec::new();
        while let Some(response) = stream.next::<DiscoveryResponse>(QUIET).await {
            seen.push(response.version_info.parse::<u32>().unwrap());
        }
        assert_eq!(seen.last(), Some(&30), "the newest version arrives: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "versions only go forward: {seen:?}");
        assert!(seen.len() < 30, "a client that does not read skips intermediate versions: {seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_aggregated_request_without_a_type_ends_the_stream_with_invalid_argument() {
        let harness = Harness::new();
        let mut stream = harness.open::<DiscoveryRequest>(None).await;
        stream.send(&request("", &[], "", "")).await;
        assert_eq!(stream.status().await, tonic::Code::InvalidArgument);
    }

    #[tokio::test(start_paused = true)]
    async fn a_per_type_stream_refuses_another_type() {
        let harness = Harness::new();
        let mut stream = harness.open::<DiscoveryRequest>(Some(xds::CLUSTER)).await;
        stream.send(&request(xds::LISTENER, &[], "", "")).await;
        assert_eq!(stream.status().await, tonic::Code::InvalidArgument);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_stream_with_unavailable_and_a_closed_request_stream_releases_the_key() {
        let harness = Harness::new();
        let mut stream = harness.open::<DiscoveryRequest>(None).await;
        stream.send(&request(xds::CLUSTER, &[], "", "")).await;
        harness.publish(xds::CLUSTER, "1", clusters(&["a"])).await;
        let _: DiscoveryResponse = stream.recv().await;
        harness.shared.shutdown.cancel();
        assert_eq!(stream.status().await, tonic::Code::Unavailable);
        assert_eq!(harness.entry(xds::CLUSTER).watcher_count(), 0, "the stream's watcher is gone");

        let harness = Harness::new();
        let mut stream = harness.open::<DiscoveryRequest>(None).await;
        stream.send(&request(xds::CLUSTER, &[], "", "")).await;
        stream.silent::<DiscoveryResponse>().await;
        assert_eq!(harness.entry(xds::CLUSTER).watcher_count(), 1);
        stream.close();
        stream.silent::<DiscoveryResponse>().await;
        assert_eq!(harness.entry(xds::CLUSTER).watcher_count(), 0, "a client that left watches nothing");
    }
}
