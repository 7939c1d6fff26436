//! The pool of HTTP/2 connections to one origin address.
//!
//! Each key's origin stream holds a [`Lease`]: a place on one connection. A connection carries
//! at most `origin_server.max_streams_per_connection` streams, and never more than the origin's
//! advertised `SETTINGS_MAX_CONCURRENT_STREAMS` (read off the wire, see
//! [`super::connection`]), so no stream waits inside h2 for a slot the origin will not give.
//!
//! Invariants (kept by the pure [`Slots`] under one mutex):
//! - a stream goes to the least-loaded connection with room; a new connection is opened only
//!   when every connection is full and none is still waiting for the origin's SETTINGS;
//! - a new connection is taken to allow what the address's connections advertised last; until
//!   one of them has sent SETTINGS, a new connection holds a single stream and the streams that
//!   would need another wait for those SETTINGS (bounded by `connect_timeout` + 1 s), so a burst
//!   of keys never piles onto a connection whose limit is unknown;
//! - a connection that ended (closed by the origin, failed to dial), is winding down (GOAWAY)
//!   or did not accept a stream in time is retired: it takes no new streams and is closed when
//!   its last stream goes; the streams that fail on it come back with their own jittered
//!   backoff, on other connections, while keys on the other connections are not touched;
//! - a connection is closed as soon as its last stream goes (its channel is dropped).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, timeout_at};
use tonic::transport::{Channel, Endpoint};

use super::connection::{ConnectionEvents, PooledConnector};
use crate::telemetry::OriginConnectionGauges;
use crate::tls::TlsConnector;

/// Identifier of one pooled connection (unique within its address).
pub(super) type ConnectionId = u64;

/// What the origin has told about a connection's stream limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Advertised {
    /// No SETTINGS frame yet.
    Unknown,
    /// The last `SETTINGS_MAX_CONCURRENT_STREAMS`; `None`: the origin sets no limit.
    Known(Option<u32>),
}

/// One connection's bookkeeping.
#[derive(Debug)]
struct Slot {
    id: ConnectionId,
    streams: usize,
    advertised: Advertised,
    /// Takes new streams; false once retired.
    open: bool,
}

impl Slot {
    /// Streams this connection may carry now; `address_limit` is the limit the address's
    /// connections advertised last (see [`Slots::place`]).
    fn cap(&self, max_per_connection: usize, address_limit: Option<Option<u32>>) -> usize {
        match (self.advertised, address_limit) {
            (Advertised::Unknown, None) => 1,
            (Advertised::Unknown, Some(limit)) | (Advertised::Known(limit), _) => cap(max_per_connection, limit),
        }
    }
}

/// The streams a connection may carry under an advertised `limit` (`None`: no limit).
fn cap(max_per_connection: usize, limit: Option<u32>) -> usize {
    match limit {
        None => max_per_connection,
        // A limit of 0 would leave the connection useless; one stream is tried and the
        // origin's answer (or its silence) decides.
        Some(limit) => max_per_connection.min(usize::try_from(limit).unwrap_or(usize::MAX)).max(1),
    }
}

/// Where a new stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    /// On this existing connection (its count already includes the stream).
    Existing(ConnectionId),
    /// On this new connection, which the caller must open (its count includes the stream).
    New(ConnectionId),
    /// Every connection is full but one still waits for its SETTINGS: ask again when it comes.
    Wait,
}

/// The pure placement state of one address's connections.
#[derive(Debug)]
pub(super) struct Slots {
    max_per_connection: usize,
    slots: Vec<Slot>,
    next_id: ConnectionId,
    /// The limit the address's connections advertised last (`Some(None)`: no limit); `None`
    /// until one has sent SETTINGS.
    address_limit: Option<Option<u32>>,
}

impl Slots {
    /// No connections; each will carry at most `max_per_connection` streams.
    pub(super) fn new(max_per_connection: usize) -> Self {
        debug_assert!(max_per_connection > 0);
        Self { max_per_connection, slots: Vec::new(), next_id: 1, address_limit: None }
    }

    /// Places one stream: on the least-loaded open connection with room (the oldest among
    /// equals), else on a new connection.
    ///
    /// A new connection is taken to allow what the address's connections advertised last (an
    /// origin's connections normally all say the same), so a burst of keys opens connections
    /// side by side. Before any connection of the address has sent SETTINGS, a new connection
    /// holds a single stream, and streams wait for its SETTINGS rather than open more
    /// connections.
    pub(super) fn place(&mut self) -> Placement {
        let (max, address_limit) = (self.max_per_connection, self.address_limit);
        let best = self
            .slots
            .iter_mut()
            .filter(|slot| slot.open && slot.streams < slot.cap(max, address_limit))
            .min_by_key(|slot| slot.streams);
        if let Some(slot) = best {
            slot.streams += 1;
            return Placement::Existing(slot.id);
        }
        if address_limit.is_none() && self.slots.iter().any(|slot| slot.open && slot.advertised == Advertised::Unknown)
        {
            return Placement::Wait;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.slots.push(Slot { id, streams: 1, advertised: Advertised::Unknown, open: true });
        Placement::New(id)
    }

    /// A stream of `id` went; returns true when the connection is now closed (its last stream
    /// went).
    pub(super) fn release(&mut self, id: ConnectionId) -> bool {
        let Some(at) = self.slots.iter().position(|slot| slot.id == id) else { return false };
        let slot = &mut self.slots[at];
        debug_assert!(slot.streams > 0, "released more streams than placed");
        slot.streams = slot.streams.saturating_sub(1);
        if slot.streams == 0 {
            self.slots.remove(at);
            return true;
        }
        false
    }

    /// The origin sent SETTINGS on `id`: `Some(limit)` when it carried
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`. Returns whether the connection's cap changed (or
    /// became known).
    pub(super) fn advertised(&mut self, id: ConnectionId, limit: Option<u32>) -> bool {
        let (max, address_limit) = (self.max_per_connection, self.address_limit);
        let Some(slot) = self.slots.iter_mut().find(|slot| slot.id == id) else { return false };
        let before = (slot.advertised, slot.cap(max, address_limit));
        slot.advertised = match (slot.advertised, limit) {
            (_, Some(limit)) => Advertised::Known(Some(limit)),
            (Advertised::Unknown, None) => Advertised::Known(None),
            (known, None) => known,
        };
        if let Advertised::Known(known) = slot.advertised {
            self.address_limit = Some(known);
        }
        before != (slot.advertised, slot.cap(max, self.address_limit))
    }

    /// Streams on `id` beyond what it may carry now (after the origin lowered its limit, or
    /// advertised less than its address's other connections).
    pub(super) fn over_cap(&self, id: ConnectionId) -> usize {
        self.slots
            .iter()
            .find(|slot| slot.id == id)
            .map_or(0, |slot| slot.streams.saturating_sub(slot.cap(self.max_per_connection, self.address_limit)))
    }

    /// `id` takes no new streams from now on (its streams stay until they go). Returns whether
    /// it was open.
    pub(super) fn retire(&mut self, id: ConnectionId) -> bool {
        match self.slots.iter_mut().find(|slot| slot.id == id) {
            Some(slot) if slot.open => {
                slot.open = false;
                true
            }
            _ => false,
        }
    }

    /// Whether `id` still takes new streams.
    pub(super) fn is_open(&self, id: ConnectionId) -> bool {
        self.slots.iter().any(|slot| slot.id == id && slot.open)
    }

    /// The cap of `id` now, if it exists.
    pub(super) fn cap_of(&self, id: ConnectionId) -> Option<usize> {
        self.slots.iter().find(|slot| slot.id == id).map(|slot| slot.cap(self.max_per_connection, self.address_limit))
    }

    /// Connections open now (retired ones included until their last stream goes).
    pub(super) fn connections(&self) -> usize {
        self.slots.len()
    }

    /// Streams placed on all connections.
    pub(super) fn streams(&self) -> usize {
        self.slots.iter().map(|slot| slot.streams).sum()
    }

    /// Streams on the fullest connection.
    pub(super) fn max_streams(&self) -> usize {
        self.slots.iter().map(|slot| slot.streams).max().unwrap_or(0)
    }
}

// === AddressPool ===

/// The connections to one origin address and the streams placed on them.
pub(super) struct AddressPool {
    /// `host:port`, for logs and labels.
    pub(super) host_port: String,
    endpoint: Endpoint,
    /// Dials with TLS (`origin_server.tls`); `None`: plaintext.
    tls: Option<TlsConnector>,
    state: Mutex<PoolState>,
    /// Woken whenever a connection's cap grows or a connection goes, so waiting streams look
    /// again.
    changed: Notify,
    gauges: OriginConnectionGauges,
}

struct PoolState {
    slots: Slots,
    channels: HashMap<ConnectionId, Arc<PooledChannel>>,
    /// The advertised limit last logged.
    logged_limit: Option<u32>,
}

/// One pooled connection's channel (a single HTTP/2 connection, dialled on first use).
struct PooledChannel {
    id: ConnectionId,
    channel: Channel,
}

/// The streams of a pool, reported by one of its connections.
struct Events {
    pool: Weak<AddressPool>,
    id: ConnectionId,
}

impl ConnectionEvents for Events {
    fn settings(&self, max_concurrent_streams: Option<u32>) {
        if let Some(pool) = self.pool.upgrade() {
            pool.advertised(self.id, max_concurrent_streams);
        }
    }

    fn ended(&self, reason: &str) {
        if let Some(pool) = self.pool.upgrade() {
            pool.retire(self.id, reason);
        }
    }
}

impl AddressPool {
    /// A pool with no connection yet; each connection dials `endpoint` (through `tls` when
    /// set) and carries at most `max_per_connection` streams.
    pub(super) fn new(
        host_port: String,
        endpoint: Endpoint,
        tls: Option<TlsConnector>,
        max_per_connection: usize,
        gauges: OriginConnectionGauges,
    ) -> Self {
        Self {
            host_port,
            endpoint,
            tls,
            state: Mutex::new(PoolState {
                slots: Slots::new(max_per_connection),
                channels: HashMap::new(),
                logged_limit: None,
            }),
            changed: Notify::new(),
            gauges,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place for one stream, on a connection with room (opening one if needed).
    ///
    /// # Errors
    /// A message when no connection has room and the one being opened has not shown its
    /// limit by `deadline` (the origin is slow or unreachable).
    pub(super) async fn acquire(self: &Arc<Self>, deadline: Instant) -> Result<Lease, String> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let placed = {
                let mut state = self.state();
                let placement = state.slots.place();
                let channel = match placement {
                    Placement::Existing(id) => state.channels.get(&id).cloned(),
                    Placement::New(id) => {
                        let channel = Arc::new(PooledChannel { id, channel: self.dial(id) });
                        state.channels.insert(id, channel.clone());
                        tracing::info!(address = %self.host_port, connection = id, "origin connection opened");
                        Some(channel)
                    }
                    Placement::Wait => None,
                };
                self.publish(&state.slots);
                debug_assert!(placement == Placement::Wait || channel.is_some(), "a placed slot has a channel");
                channel
            };
            if let Some(channel) = placed {
                return Ok(Lease { pool: self.clone(), channel });
            }
            if timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "origin {}: no connection with room was ready in time (the one being opened has not sent its SETTINGS)",
                    self.host_port
                ));
            }
        }
    }

    fn dial(self: &Arc<Self>, id: ConnectionId) -> Channel {
        let events = Arc::new(Events { pool: Arc::downgrade(self), id });
        self.endpoint.connect_with_connector_lazy(PooledConnector::new(self.tls.clone(), events))
    }

    fn advertised(&self, id: ConnectionId, limit: Option<u32>) {
        let mut state = self.state();
        if state.slots.advertised(id, limit) {
            let cap = state.slots.cap_of(id).unwrap_or_default();
            tracing::debug!(address = %self.host_port, connection = id, advertised = ?limit, cap, "origin connection stream limit");
            let lower = limit.filter(|&l| usize::try_from(l).is_ok_and(|l| l < state.slots.max_per_connection));
            if let Some(limit) = lower
                && state.logged_limit != Some(limit)
            {
                // Logged once per value: every connection of an origin usually says the same.
                state.logged_limit = Some(limit);
                tracing::info!(address = %self.host_port, connection = id, max_concurrent_streams = limit, "the origin allows fewer streams per connection than origin_server.max_streams_per_connection; connections carry that many");
            }
            let over = state.slots.over_cap(id);
            if over > 0 {
                // Streams placed before this connection's SETTINGS arrived, on the strength of
                // what the address's other connections allow: the origin will not open them,
                // so they time out (connect_timeout + 1 s), retire this connection and move.
                tracing::warn!(address = %self.host_port, connection = id, advertised = ?limit, cap, over, "origin connection holds more streams than the origin now allows");
            }
            self.changed.notify_waiters();
        }
    }

    fn retire(&self, id: ConnectionId, reason: &str) {
        let mut state = self.state();
        if state.slots.retire(id) {
            let streams = state.slots.slots.iter().find(|slot| slot.id == id).map_or(0, |slot| slot.streams);
            tracing::info!(address = %self.host_port, connection = id, reason, streams, "origin connection retired: its streams reconnect elsewhere");
            self.changed.notify_waiters();
        }
    }

    fn release(&self, id: ConnectionId) {
        let mut state = self.state();
        if state.slots.release(id) {
            // The last clone of the channel goes with the lease: the connection closes.
            state.channels.remove(&id);
            tracing::debug!(address = %self.host_port, connection = id, "origin connection closed: its last stream went");
            self.changed.notify_waiters();
        }
        self.publish(&state.slots);
    }

    fn publish(&self, slots: &Slots) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.gauges.connections.set(gauge(slots.connections()));
        self.gauges.streams.set(gauge(slots.streams()));
        self.gauges.connection_streams_max.set(gauge(slots.max_streams()));
    }
}

// === Lease ===

/// A stream's place on one pooled connection; dropping it frees the place (and closes the
/// connection when it was the last).
pub(super) struct Lease {
    pool: Arc<AddressPool>,
    channel: Arc<PooledChannel>,
}

impl Lease {
    /// The connection's channel.
    pub(super) fn channel(&self) -> Channel {
        self.channel.channel.clone()
    }

    /// The connection's id.
    pub(super) fn connection(&self) -> ConnectionId {
        self.channel.id
    }

    /// Whether the connection still takes new streams (a retired one is left by keys as
    /// they reconnect).
    pub(super) fn is_usable(&self) -> bool {
        self.pool.state().slots.is_open(self.channel.id)
    }

    /// The origin did not accept a stream on this connection in time: the connection is
    /// probably dead without having failed (a peer that vanished without a reset), so it
    /// takes no new streams; later streams get another connection instead of waiting for
    /// HTTP/2 keepalive to notice.
    pub(super) fn retire(&self, reason: &str) {
        self.pool.retire(self.channel.id, reason);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.channel.id);
    }
}

/// The longest a stream waits for a place: a dial and its SETTINGS, plus a second.
pub(super) fn placement_deadline(connect_timeout: Duration) -> Instant {
    Instant::now() + connect_timeout + Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(slots: &Slots) -> Vec<(ConnectionId, usize)> {
        slots.slots.iter().map(|slot| (slot.id, slot.streams)).collect()
    }

    #[test]
    fn a_new_connection_holds_one_stream_until_its_settings_arrive() {
        let mut slots = Slots::new(100);
        assert_eq!(slots.place(), Placement::New(1));
        assert_eq!(slots.place(), Placement::Wait, "the limit of connection 1 is not known yet");
        assert!(slots.advertised(1, Some(3)));
        assert_eq!(slots.place(), Placement::Existing(1));
        assert_eq!(slots.place(), Placement::Existing(1));
        assert_eq!(slots.place(), Placement::New(2), "connection 1 is full at the origin's limit");
        assert_eq!(counts(&slots), vec![(1, 3), (2, 1)]);
    }

    #[test]
    fn once_the_address_limit_is_known_new_connections_fill_without_waiting() {
        let mut slots = Slots::new(100);
        assert_eq!(slots.place(), Placement::New(1));
        slots.advertised(1, Some(2));
        assert_eq!(slots.place(), Placement::Existing(1));
        // Connection 2 has sent nothing yet: it is taken to allow 2, like connection 1.
        assert_eq!(slots.place(), Placement::New(2));
        assert_eq!(slots.place(), Placement::Existing(2));
        assert_eq!(slots.place(), Placement::New(3));
        assert_eq!(counts(&slots), vec![(1, 2), (2, 2), (3, 1)]);
        // Connection 2 says 1: one stream too many, and no more go there.
        assert!(slots.advertised(2, Some(1)));
        assert_eq!(slots.over_cap(2), 1);
        assert_eq!(slots.over_cap(1), 0);
        assert_eq!(slots.place(), Placement::New(4), "3 is taken to allow 1 now, as 2 said last");
    }

    #[test]
    fn connections_fill_to_the_configured_cap_when_the_origin_sets_no_limit() {
        let mut slots = Slots::new(4);
        assert_eq!(slots.place(), Placement::New(1));
        assert!(slots.advertised(1, None));
        for _ in 0..3 {
            assert_eq!(slots.place(), Placement::Existing(1));
        }
        assert_eq!(slots.place(), Placement::New(2));
        // A larger advertised limit does not raise the configured cap.
        assert!(slots.advertised(2, Some(1000)));
        for _ in 0..3 {
            assert_eq!(slots.place(), Placement::Existing(2));
        }
        assert_eq!(slots.place(), Placement::New(3));
        assert_eq!((slots.connections(), slots.streams(), slots.max_streams()), (3, 9, 4));
    }

    #[test]
    fn a_stream_goes_to_the_least_loaded_connection_with_room() {
        let mut slots = Slots::new(5);
        for id in 1..=3 {
            assert_eq!(slots.place(), Placement::New(id));
            slots.advertised(id, None);
            for _ in 0..4 {
                assert_eq!(slots.place(), Placement::Existing(id), "fill to the cap before opening another");
            }
        }
        assert_eq!(counts(&slots), vec![(1, 5), (2, 5), (3, 5)]);
        slots.release(2);
        slots.release(2);
        slots.release(3);
        assert_eq!(counts(&slots), vec![(1, 5), (2, 3), (3, 4)]);
        assert_eq!(slots.place(), Placement::Existing(2));
        assert_eq!(slots.place(), Placement::Existing(2), "2 and 3 tie at 4: the older wins");
        assert_eq!(slots.place(), Placement::Existing(3));
        assert_eq!(slots.place(), Placement::New(4));
    }

    #[test]
    fn a_connection_closes_when_its_last_stream_goes() {
        let mut slots = Slots::new(2);
        assert_eq!(slots.place(), Placement::New(1));
        slots.advertised(1, None);
        assert_eq!(slots.place(), Placement::Existing(1));
        assert!(!slots.release(1));
        assert!(slots.release(1), "last stream");
        assert_eq!(slots.connections(), 0);
        assert!(!slots.release(1), "an unknown connection is ignored");
        assert_eq!(slots.place(), Placement::New(2), "ids are never reused");
    }

    #[test]
    fn a_retired_connection_takes_no_stream_and_closes_with_its_last() {
        let mut slots = Slots::new(10);
        assert_eq!(slots.place(), Placement::New(1));
        slots.advertised(1, None);
        assert_eq!(slots.place(), Placement::Existing(1));
        assert!(slots.retire(1));
        assert!(!slots.retire(1), "retired once");
        assert!(!slots.is_open(1));
        assert_eq!(slots.place(), Placement::New(2), "the retired connection has room but takes nothing");
        assert_eq!(slots.connections(), 2);
        assert!(!slots.release(1));
        assert!(slots.release(1));
        assert_eq!(counts(&slots), vec![(2, 1)]);
    }

    #[test]
    fn a_retired_unknown_connection_does_not_hold_streams_back() {
        let mut slots = Slots::new(10);
        assert_eq!(slots.place(), Placement::New(1));
        assert_eq!(slots.place(), Placement::Wait);
        // The dial failed: waiting streams go to a new connection at once.
        slots.retire(1);
        assert_eq!(slots.place(), Placement::New(2));
    }

    #[test]
    fn a_lowered_limit_stops_placement_and_a_zero_limit_still_allows_one() {
        let mut slots = Slots::new(10);
        assert_eq!(slots.place(), Placement::New(1));
        slots.advertised(1, None);
        for _ in 0..4 {
            slots.place();
        }
        assert!(slots.advertised(1, Some(2)), "the origin lowers its limit");
        assert_eq!(slots.place(), Placement::New(2), "connection 1 has 5 streams, over its new limit");
        assert!(!slots.advertised(1, None), "a later SETTINGS frame without the parameter keeps the limit");
        assert!(slots.advertised(2, Some(0)));
        assert_eq!(slots.cap_of(2), Some(1));
        assert_eq!(slots.place(), Placement::New(3));
    }
}
