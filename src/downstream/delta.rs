//! Delta (incremental) streams, aggregated or per-type: each client receives only the
//! resources whose content-hash version differs from what it holds, and removals.
//!
//! Works from any origin mode: the cache keeps every key's full state with per-resource
//! versions, whether the origin speaks state-of-the-world or delta.

use std::collections::HashMap;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, ResourceLocator};

use super::delta_subscription::{self, DeltaChange, DeltaSubscription};
use super::stream::{PendingPush, Protocol, Stop, StreamCore};
use crate::node_cache::Watcher;
use crate::{constraints, xds};

/// Per type: the subscription, the watcher of its key and what was sent.
#[derive(Default)]
struct TypeState {
    subscription: DeltaSubscription,
    watcher: Option<Watcher>,
    /// Nonce and version of the last response sent.
    last_sent: Option<(String, String)>,
    /// Serial of the last state compared against the client's versions.
    seen_serial: Option<u64>,
    /// The traced push awaiting the client's answer.
    pending: Option<PendingPush>,
    /// Fingerprint and names of the resource errors last sent (none while the client's names
    /// have none): errors go out again only when they change, and a name whose error is over
    /// is answered again (resent, or removed when it does not exist).
    sent_errors: Option<(u64, Vec<String>)>,
}

/// The delta protocol of one stream.
#[derive(Default)]
pub(super) struct Delta {
    /// Per type URL; foldhash instead of SipHash: the map is read on every request and push
    /// (SipHash over ~50-byte type URLs was ~1,200 instructions per client per update).
    types: HashMap<String, TypeState, foldhash::fast::RandomState>,
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;

    async fn on_request(&mut self, core: &mut StreamCore, request: DeltaDiscoveryRequest) -> Result<(), Stop> {
        core.observe_node(request.node.as_ref())?;
        let type_url = core.resolve_type(&request.type_url)?;
        if !self.types.contains_key(type_url) {
            self.types.insert(type_url.to_owned(), TypeState::default());
        }
        let Some(state) = self.types.get_mut(type_url) else { return Ok(()) };
        if !request.response_nonce.is_empty()
            && let (Some(watcher), Some((nonce, version))) = (&state.watcher, &state.last_sent)
            && *nonce == request.response_nonce
        {
            let nack = request.error_detail.as_ref().map(|e| crate::telemetry::truncate_message(&e.message));
            match &nack {
                Some(message) => {
                    tracing::info!(
                        peer = %core.peer, key = %watcher.entry().key, type_url = %type_url,
                        version = %version, error = %message, "client NACKed"
                    );
                    watcher.record_nack(version, message);
                }
                None => watcher.record_ack(version),
            }
            if let Some(pending) = state.pending.take() {
                pending.answered(nack.as_deref());
            }
        }
        // Subscription changes apply whatever the nonce. Resource locators (xDS-TP2) subscribe
        // and unsubscribe their names and set the parameters (else the node's, from the start).
        let params_changed = if !request.resource_locators_subscribe.is_empty() || !state.subscription.started {
            let params = constraints::of_request(&request.resource_locators_subscribe, core.node.as_ref(), type_url)
                .map_err(|message| core.reject("resource_locators", tonic::Status::invalid_argument(message)))?;
            delta_subscription::apply_params(&mut state.subscription, params)
        } else {
            false
        };
        let with_locators = |names: &Vec<String>, locators: &[ResourceLocator]| -> Option<Vec<String>> {
            (!locators.is_empty())
                .then(|| names.iter().cloned().chain(locators.iter().map(|l| l.name.clone())).collect())
        };
        let subscribe = with_locators(&request.resource_names_subscribe, &request.resource_locators_subscribe);
        let unsubscribe = with_locators(&request.resource_names_unsubscribe, &request.resource_locators_unsubscribe);
        let change = DeltaChange {
            subscribe: subscribe.as_ref().unwrap_or(&request.resource_names_subscribe),
            unsubscribe: unsubscribe.as_ref().unwrap_or(&request.resource_names_unsubscribe),
            initial_versions: &request.initial_resource_versions,
        };
        if !delta_subscription::apply_change(&mut state.subscription, change) && !params_changed {
            return Ok(());
        }
        core.rewatch(type_url, &mut state.subscription.interest, &mut state.watcher)?;
        state.seen_serial = None;
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
        if state.seen_serial == Some(key_state.serial)
            && state.subscription.must_answer.iter().all(|name| !key_state.covers(name))
        {
            return Ok(());
        }
        if !watcher.may_receive(&key_state) {
            // do_not_cache resources that arrived before the client asked: never from cache.
            // The client waits for the fresh copy its source is asked for.
            core.hold_for_fresh_copy(watcher);
            return Ok(());
        }
        let errors: Vec<_> = key_state.errors_for(&state.subscription.interest).into_iter().cloned().collect();
        let fingerprint = (!errors.is_empty()).then(|| errors_fingerprint(&errors));
        let new_errors = fingerprint.is_some() && fingerprint != state.sent_errors.as_ref().map(|(f, _)| *f);
        if let Some((_, errored)) = state.sent_errors.take() {
            // An error that is over: the client learns it from the resource, or its removal.
            for name in errored.iter().filter(|n| !errors.iter().any(|e| crate::cache::error_name(e) == n.as_str())) {
                state.subscription.answer_again(&key_state, name);
            }
        }
        state.sent_errors =
            fingerprint.map(|f| (f, errors.iter().map(|e| crate::cache::error_name(e).to_owned()).collect()));
        // TTL heartbeats go to the clients that hold, at the state's version, the body they
        // refresh (read before `compute` records what it sends).
        let mut heartbeats: Vec<(&str, &bytes::Bytes)> = key_state
            .heartbeats
            .iter()
            .filter(|(name, _)| state.subscription.interest.wants(name))
            .filter(|(name, _)| {
                let held = state.subscription.known.get(name.as_str());
                key_state.get(name).is_some_and(|r| held.is_some_and(|h| h.is(&r.version)))
            })
            .map(|(name, beat)| (name.as_str(), &beat.delta_field))
            .collect();
        let update = delta_subscription::compute(&mut state.subscription, &key_state);
        if key_state.is_ready() {
            state.seen_serial = Some(key_state.serial);
        }
        if !heartbeats.is_empty() && !update.resources.is_empty() {
            // A name the update sends whole (an explicit subscription answered again) needs
            // no heartbeat beside it.
            let sent: std::collections::HashSet<&str> =
                update.resources.iter().filter_map(|r| r.name.as_deref()).collect();
            heartbeats.retain(|(name, _)| !sent.contains(name));
        }
        let heartbeats: Vec<&bytes::Bytes> = heartbeats.into_iter().map(|(_, beat)| beat).collect();
        if update.is_empty() && heartbeats.is_empty() && !new_errors {
            return Ok(());
        }
        let errors = if new_errors { errors } else { Vec::new() };
        core.count_protocol_extras(&key_state, !heartbeats.is_empty(), !errors.is_empty());
        let count = update.resources.len() + update.removed.len() + heartbeats.len();
        let body = key_state.delta_body(&update.resources, &heartbeats, &update.removed, &errors);
        let nonce = core.send(watcher, &key_state, body, count).await?;
        state.pending = PendingPush::start(core, watcher, &key_state);
        state.last_sent = Some((nonce, key_state.version_info.clone()));
        if type_url == xds::CLUSTER && !update.resources.is_empty() {
            // Clusters that changed finish warming only with an EDS response: resend theirs.
            if let Some(endpoints) = self.types.get_mut(xds::ENDPOINT) {
                for cluster in &update.resources {
                    if let Some(name) = &cluster.name {
                        endpoints.subscription.forget(name);
                    }
                }
                endpoints.seen_serial = None;
            }
        }
        Ok(())
    }
}

/// A fingerprint of a list of resource errors (names, codes and messages), to send a list
/// again only when it changed.
fn errors_fingerprint(errors: &[envoy_types::pb::envoy::service::discovery::v3::ResourceError]) -> u64 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    let mut hasher = foldhash::fast::FixedState::default().build_hasher();
    for error in errors {
        crate::cache::error_name(error).hash(&mut hasher);
        if let Some(detail) = &error.error_detail {
            detail.code.hash(&mut hasher);
            detail.message.hash(&mut hasher);
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    //! The delta stream rules, in memory, on the harness of the state-of-the-world tests.

    use std::collections::HashMap;

    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    use crate::downstream::sotw::tests::{Harness, clusters, node};
    use crate::xds;

    fn subscribe(names: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(node()),
            type_url: xds::CLUSTER.into(),
            resource_names_subscribe: names.iter().map(|n| (*n).to_owned()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn ack(nonce: &str) -> DeltaDiscoveryRequest {
        subscribe(&[], nonce)
    }

    /// Name and version of each resource sent, sorted by name.
    fn sent(response: &DeltaDiscoveryResponse) -> Vec<(String, String)> {
        let mut sent: Vec<_> = response.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
        sent.sort();
        sent
    }

    fn sent_names(response: &DeltaDiscoveryResponse) -> Vec<String> {
        sent(response).into_iter().map(|(name, _)| name).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_wildcard_client_gets_everything_then_only_changes_and_removals() {
        let harness = Harness::new();
        let mut stream = harness.open::<DeltaDiscoveryRequest>(None).await;
        stream.send(&subscribe(&[], "")).await;
        harness.publish(xds::CLUSTER, "1", clusters(&["a", "b", "c"])).await;
        let first: DeltaDiscoveryResponse = stream.recv().await;
        assert_eq!(sent_names(&first), ["a", "b", "c"]);
        assert!(first.resources.iter().all(|r| !r.version.is_empty()), "every resource has a version");
        assert!(first.removed_resources.is_empty());
        stream.send(&ack(&first.nonce)).await;
        stream.silent::<DeltaDiscoveryResponse>().await;
        assert_eq!(harness.client(xds::CLUSTER).acked_version, "1");

        // "a" unchanged, "b" removed, "c" unchanged, "d" new: only "d" and the removal go out.
        harness.publish(xds::CLUSTER, "2", clusters(&["a", "c", "d"])).await;
        let second: DeltaDiscoveryResponse = stream.recv().await;
        assert_eq!(sent_names(&second), ["d"]);
        assert_eq!(second.removed_resources, ["b"]);
        assert_ne!(second.nonce, first.nonce);

        // The same resources again (a new origin version with the same content): nothing.
        stream.send(&ack(&second.nonce)).await;
        harness.publish(xds::CLUSTER, "3", clusters(&["a", "c", "d"])).await;
        stream.silent::<DeltaDiscoveryResponse>().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_nack_is_recorded_against_the_version_sent_and_gets_no_resend() {
        let harness = Harness::new();
        let mut stream = harness.open::<DeltaDiscoveryRequest>(None).await;
        stream.send(&subscribe(&["a"], "")).await;
        harness.publish(xds::CLUSTER, "1", clusters(&["a"])).await;
        let first: DeltaDiscoveryResponse = stream.recv().await;
        let error = RpcStatus { code: 3, message: "cluster a is malformed".into(), ..Default::default() };
        stream.send(&DeltaDiscoveryRequest { error_detail: Some(error), ..ack(&first.nonce) }).await;
        stream.silent::<DeltaDiscoveryResponse>().await;
        let client = harness.client(xds::CLUSTER);
        assert_eq!(client.nacks, 1);
        let last = client.last_nack.expect("the NACK is recorded");
        assert_eq!((last.rejected_version.as_str(), last.message.as_str()), ("1", "cluster a is malformed"));

        // An answer to a nonce never sent is neither an ACK nor a NACK.
        stream.send(&ack("not-a-nonce")).await;
        stream.silent::<DeltaDiscoveryResponse>().await;
        assert_eq!(harness.client(xds::CLUSTER).acked_version, "");
    }

    #[tokio::test(start_paused = true)]
    async fn initial_resource_versions_spare_what_a_reconnecting_client_holds() {
        let harness = Harness::new();
        let mut stream = harness.open::<DeltaDiscoveryRequest>(None).await;
        stream.send(&subscribe(&["a", "b"], "")).await;
        harness.publish(xds::CLUSTER, "1", clusters(&["a", "b"])).await;
        let first: DeltaDiscoveryResponse = stream.recv().await;
        let held: HashMap<String, String> = sent(&first).into_iter().collect();

        // The client reconnects holding "a" as sent and an outdated "b".
        let mut again = harness.open::<DeltaDiscoveryRequest>(None).await;
        let versions = HashMap::from([("a".to_owned(), held["a"].clone()), ("b".to_owned(), "outdated".to_owned())]);
        again.send(&DeltaDiscoveryRequest { initial_resource_versions: versions, ..subscribe(&["a", "b"], "") }).await;
        let resent: DeltaDiscoveryResponse = again.recv().await;
        assert_eq!(sent(&resent), [("b".to_owned(), held["b"].clone())], "only what differs");
    }

    #[tokio::test(start_paused = true)]
    async fn unsubscribed_names_get_no_updates_and_removed_names_are_reported_once() {
        let harness = Harness::new();
        let mut stream = harness.open::<DeltaDiscoveryRequest>(None).await;
        stream.send(&subscribe(&["a", "b"], "")).await;
        harness.publish(xds::CLUSTER, "1", clusters(&["a", "b", "c"])).await;
        let first: DeltaDiscoveryResponse = stream.recv().await;
        assert_eq!(sent_names(&first), ["a", "b"], "only the subscribed names");

        let unsubscribe = DeltaDiscoveryRequest { resource_names_unsubscribe: vec!["b".into()], ..ack(&first.nonce) };
        stream.send(&unsubscribe).await;
        stream.silent::<DeltaDiscoveryResponse>().await;
        // "b" leaves the state: the client that no longer wants it hears nothing of it.
        harness.publish(xds::CLUSTER, "2", clusters(&["a", "c"])).await;
        stream.silent::<DeltaDiscoveryResponse>().await;
        // "a" leaves the state: its subscriber is told once.
        harness.publish(xds::CLUSTER, "3", clusters(&["c"])).await;
        let removal: DeltaDiscoveryResponse = stream.recv().await;
        assert!(removal.resources.is_empty());
        assert_eq!(removal.removed_resources, ["a"]);
        stream.send(&ack(&removal.nonce)).await;
        harness.publish(xds::CLUSTER, "4", clusters(&["c", "e"])).await;
        stream.silent::<DeltaDiscoveryResponse>().await;
    }
}
