//! State-of-the-world streams (aggregated or per-type): how requests and cache states turn
//! into responses.

use std::collections::HashMap;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use super::stream::{PendingPush, Protocol, Stop, StreamCore};
use super::subscription::{self, Classified, SubscriptionState};
use crate::cache::{SotwMessage, Watcher};
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
        let key_state = watcher.entry().state();
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
            SotwMessage::Shared(shared) if state.last_shared.as_deref() != Some(shared.nonce.as_str()) => {
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
