//! One version of a key's state: the origin's resources, encoded once for every stream.
//!
//! Invariants:
//! - a resource's version is the hex SHA-256 prefix of its type URL and encoded bytes, so it
//!   is equal on every relay node and across restarts;
//! - names are unique within a state (a response repeating a name is rejected), except for
//!   xDS-TP2 variants of one name, which differ by their constraints;
//! - `serial` grows only when the version or the content changes;
//! - a resource whose bytes did not change keeps its `Arc` from one state to the next (no
//!   re-hash, no re-encode), and each state records which names changed since the state it
//!   was computed from ([`KeyState::changes_since`]), so a client one version behind diffs
//!   only those.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryResponse, DiscoveryResponse, DynamicParameterConstraints, Resource as DeltaResource, ResourceError,
};
use envoy_types::pb::google::protobuf::{Any, Duration as ProtoDuration};
use prost::Message as _;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::hooks::Attachment;
use super::{Interest, Name, Names};
use crate::constraints::Params;
use crate::{constraints, wire, xds, xdstp};

// === impl Resource ===

/// One cached resource: its name, its content-hash version and its encoded bytes.
#[derive(Debug)]
pub struct Resource {
    /// The resource's name, or `None` when its type has no known name field.
    pub name: Option<String>,
    /// Hex SHA-256 prefix of the encoded resource: equal on every relay and across restarts.
    pub version: String,
    /// The version the origin gave it (delta origins only), for reconnects to that origin.
    pub origin_version: Option<String>,
    /// The resource as a `resources` field of a `DiscoveryResponse`, ready to concatenate.
    pub field: Bytes,
    /// The resource.
    pub any: Any,
    /// The origin marked it `cache_control.do_not_cache`: it reaches the clients watching
    /// when it arrives, never a client that asks later (which waits for a fresh copy).
    pub do_not_cache: bool,
    /// A `Resource` wrapper without a body (what a TTL heartbeat looks like when nothing is
    /// cached under its name).
    pub bodyless: bool,
    /// When the relay received this copy from its source (a `do_not_cache` resource is never
    /// reused from an earlier state, so this is the time of the response that carried it).
    pub arrived: Instant,
    /// The xDS-TP2 constraints of this variant (from its `Resource` wrapper's
    /// `resource_name`); `None` for a resource without variants.
    pub constraints: Option<Arc<DynamicParameterConstraints>>,
    delta_field: OnceLock<Bytes>,
}

impl Resource {
    /// Builds a cached resource from the origin's `Any`.
    pub fn new(any: Any) -> Self {
        let name = wire::resource_name(&any);
        let wrapper = (any.type_url == wire::RESOURCE_WRAPPER)
            .then(|| DeltaResource::decode(any.value.as_slice()).ok())
            .flatten();
        let constraints = wrapper
            .as_ref()
            .and_then(|w| w.resource_name.as_ref())
            .and_then(|n| n.dynamic_parameter_constraints.clone());
        Self::named(any, name, None, wrapper.as_ref(), constraints, Instant::now())
    }

    fn named(
        any: Any,
        name: Option<String>,
        origin_version: Option<String>,
        wrapper: Option<&DeltaResource>,
        constraints: Option<DynamicParameterConstraints>,
        arrived: Instant,
    ) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::new().chain_update(any.type_url.as_bytes()).chain_update(&any.value).finalize();
        let mut version = String::with_capacity(32);
        for b in &digest[..16] {
            version.push(char::from(HEX[usize::from(b >> 4)]));
            version.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        Self {
            name,
            version,
            origin_version,
            field: wire::encode_resource_field(&any),
            any,
            do_not_cache: wrapper.and_then(|w| w.cache_control).is_some_and(|c| c.do_not_cache),
            bodyless: wrapper.is_some_and(|w| w.resource.is_none()),
            arrived,
            constraints: constraints.map(Arc::new),
            delta_field: OnceLock::new(),
        }
    }

    /// True when this variant is meant for a client with dynamic parameters `params`.
    pub fn matches(&self, params: &std::collections::BTreeMap<String, String>) -> bool {
        constraints::matches(self.constraints.as_deref(), params)
    }

    /// What tells variants apart: the name in canonical spelling and the encoded
    /// constraints (empty without).
    fn variant_key(&self) -> Option<(String, Vec<u8>)> {
        let name = xdstp::canonical(self.name.as_deref()?).into_owned();
        Some((name, self.constraints.as_ref().map(|c| c.encode_to_vec()).unwrap_or_default()))
    }

    /// True when this resource is what `any` (with `origin_version`) would build.
    fn is(&self, any: &Any, origin_version: &Option<String>) -> bool {
        self.any.value == any.value && self.any.type_url == any.type_url && self.origin_version == *origin_version
    }

    /// The resource as a `resources` field of a `DeltaDiscoveryResponse` (a `Resource` with
    /// name, content-hash version and body), encoded on first use and then shared.
    pub fn delta_field(&self) -> &Bytes {
        self.delta_field.get_or_init(|| {
            let name = self.name.clone().unwrap_or_default();
            let resource = if self.any.type_url == wire::RESOURCE_WRAPPER {
                // A wrapped state-of-the-world resource keeps its TTL and metadata.
                let mut wrapped = DeltaResource::decode(self.any.value.as_slice()).unwrap_or_default();
                // Only one of `name` and `resource_name` (a variant's) may be set.
                if wrapped.resource_name.is_none() {
                    wrapped.name = name;
                }
                wrapped.version = self.version.clone();
                wrapped
            } else {
                DeltaResource {
                    name,
                    version: self.version.clone(),
                    resource: Some(self.any.clone()),
                    ..Default::default()
                }
            };
            wire::encode_delta_resource_field(&resource)
        })
    }
}

// === impl Rejection ===

/// Why the relay refused an origin response (the upstream NACKs it and keeps the cache).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The response's type URL is not the key's.
    #[error("response type {got} does not match the subscribed type {expected}")]
    TypeMismatch {
        /// The key's type.
        expected: String,
        /// The response's type.
        got: String,
    },
    /// A resource is packed with another type than the response's.
    #[error("resource {index} has type {got}, expected {expected}")]
    ResourceType {
        /// Position in the response.
        index: usize,
        /// The response's type.
        expected: String,
        /// The resource's type.
        got: String,
    },
    /// The same name appears twice.
    #[error("resource name {0} appears more than once")]
    DuplicateName(String),
    /// A resource of a named type without a name: absent, empty, or unreadable because the
    /// resource does not decode; at this position in the response.
    #[error("resource {0} has no name (absent, empty, or the resource does not decode)")]
    Unnamed(usize),
    /// A `Resource` wrapper that does not decode, at this position in the response.
    #[error("resource {0} is a Resource wrapper that does not decode")]
    UndecodableWrapper(usize),
}

// === impl KeyState ===

/// Response-level fields the origin sent with a version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    /// The origin's `version_info` (`system_version_info` for delta origins).
    pub version_info: String,
    /// The origin's control-plane identifier.
    pub control_plane: Option<ControlPlane>,
    /// The origin's canary flag.
    pub canary: bool,
    /// Per-resource errors (xDS TP3, gRFC A88), at most one per name: each client gets those
    /// of the names it wants. A state-of-the-world response replaces them; a delta response
    /// replaces those of the names it mentions.
    pub resource_errors: Vec<ResourceError>,
}

/// The name a resource error is about.
pub fn error_name(error: &ResourceError) -> &str {
    error.resource_name.as_ref().map_or("", |n| n.name.as_str())
}

/// gRPC code NOT_FOUND: a resource error with it reports the resource does not exist, which
/// the cache treats as a removal (xDS TP3).
const NOT_FOUND: i32 = 5;

/// A TTL heartbeat the origin sent for a resource the state holds with a body: clients that
/// hold that body get the heartbeat (it refreshes their TTL); others get the body.
#[derive(Debug)]
pub struct Heartbeat {
    /// The heartbeat as a `resources` field of a `DiscoveryResponse` (a bodyless `Resource`).
    pub sotw_field: Bytes,
    /// The heartbeat as a `resources` field of a `DeltaDiscoveryResponse`: name, the relay's
    /// version of the held resource, TTL, no body.
    pub delta_field: Bytes,
}

/// What changed between a state and the state it was computed from.
#[derive(Debug, Default)]
struct Changes {
    /// [`KeyState::id`] of the previous state.
    since: u64,
    /// Positions in `resources` (ascending) of the resources added or changed.
    changed: Vec<usize>,
    /// Names of the previous state that are gone.
    removed: Vec<String>,
}

/// A whole state-of-the-world gRPC message (prefix, fields and nonce) shared by every stream
/// that is sent it: one buffer, written to each stream as a single HTTP/2 DATA frame.
#[derive(Debug)]
pub struct SharedMessage {
    /// The gRPC message, length prefix included.
    pub message: Bytes,
    /// The response's fields other than the nonce: a slice of `message`, not a copy.
    pub body: Bytes,
    /// The nonce inside `message`.
    pub nonce: String,
}

impl SharedMessage {
    fn new<'a>(header: &Bytes, resources: impl IntoIterator<Item = &'a Bytes>, nonce: String) -> Self {
        let (message, body) = wire::grpc_message(header, resources, &nonce);
        Self { message, body, nonce }
    }
}

/// What a state-of-the-world response for one interest is made of.
#[derive(Debug)]
pub enum SotwMessage<'a> {
    /// A whole message shared by every stream with the same interest (the full body, or the
    /// state's shared selection by name).
    Shared(&'a SharedMessage),
    /// A body built for this interest alone; the stream adds its own nonce.
    Own(Bytes),
}

impl SotwMessage<'_> {
    /// The response's fields other than the nonce (never a copy).
    pub fn body(&self) -> Bytes {
        match self {
            Self::Shared(shared) => shared.body.clone(),
            Self::Own(body) => body.clone(),
        }
    }
}

/// Source of [`KeyState::id`].
static NEXT_STATE_ID: AtomicU64 = AtomicU64::new(1);

/// One version of a key's state, shared by every watcher.
#[derive(Debug)]
pub struct KeyState {
    /// Grows by one each time something reaches clients: a version, content, resource errors
    /// or TTL heartbeats; never reused for a key.
    pub serial: u64,
    /// The `serial` of the last change of the resources' bodies: a client sent a state with
    /// this same value holds every body of this one (heartbeats may then stand for them).
    pub content_serial: u64,
    /// False until the origin has answered (and again after the state is cleared).
    pub ready: bool,
    /// The key's type URL.
    pub type_url: String,
    /// The origin's version and response-level fields.
    pub meta: Meta,
    /// The origin's `version_info`.
    pub version_info: String,
    /// Resources in the origin's order; names are unique.
    pub resources: Vec<Arc<Resource>>,
    /// True when some resource has no known name: every watcher then gets every resource.
    pub opaque: bool,
    /// True when some resource is `do_not_cache`: the state may reach only the clients that
    /// were watching when it arrived ([`KeyState::received_at`]).
    pub uncacheable: bool,
    /// TTL heartbeats that arrived with this state, by resource name.
    pub heartbeats: HashMap<String, Heartbeat>,
    /// True when some resource is an xDS-TP2 variant (has constraints): a name may then be
    /// held by several resources, and each client gets the first variant matching its
    /// dynamic parameters.
    pub variants: bool,
    /// What the upstream subscription asked for when this state arrived.
    pub coverage: Interest,
    /// When the relay received this version from the origin.
    pub received_at: Instant,
    /// Wall-clock time of the same moment, for display.
    pub received_wall: SystemTime,
    /// The trace of this version (set when the version is new and tracing is on).
    pub trace: Attachment,
    header: Bytes,
    /// Every resource, as a whole gRPC message whose body is the full body.
    full: SharedMessage,
    delta_header: OnceLock<Bytes>,
    /// Every resource, with heartbeats in place of the bodies they refresh.
    heartbeat_full: OnceLock<SharedMessage>,
    /// The first selection by name, shared with every stream that wants the same names (a
    /// fleet of like clients then sends one message instead of one copy per stream).
    selected: OnceLock<(Names, Vec<Params>, SharedMessage, usize)>,
    /// The same with heartbeats in place of the bodies they refresh (heartbeat states only).
    selected_heartbeat: OnceLock<(Names, Vec<Params>, SharedMessage, usize)>,
    /// Position of each named resource; the names are shared from one state to the next.
    index: HashMap<Name, usize>,
    id: u64,
    changes: Option<Changes>,
}

impl KeyState {
    /// The state of a key before its first response.
    pub fn empty(type_url: &str) -> Self {
        Self::build(
            0,
            0,
            false,
            type_url.to_owned(),
            Meta::default(),
            Vec::new(),
            Interest::default(),
            Vec::new(),
            None,
        )
    }

    /// True once the origin has answered.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Identity of this state object, unique in the process (two states with the same
    /// `serial` but another coverage have different ids).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// When this state was computed from the state with id `previous` (same coverage, both
    /// complete, every resource named): the resources added or changed since, in the
    /// origin's order, and the names removed since. `None` otherwise: diff in full.
    pub fn changes_since(&self, previous: u64) -> Option<(impl Iterator<Item = &Arc<Resource>> + '_, &[String])> {
        let changes = self.changes.as_ref().filter(|c| c.since == previous)?;
        Some((changes.changed.iter().map(|&i| &self.resources[i]), changes.removed.as_slice()))
    }

    /// The resource named `name` (`xdstp://` names compared by their canonical spelling).
    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.index.get(&*xdstp::canonical(name)).map(|&i| &self.resources[i])
    }

    /// The variant of `name` a client with `interest`'s dynamic parameters gets (the
    /// resource named `name` when the state has no variants).
    pub fn get_for(&self, name: &str, interest: &Interest) -> Option<&Arc<Resource>> {
        if !self.variants {
            return self.get(name);
        }
        let canonical = xdstp::canonical(name);
        let params = interest.client_params();
        self.resources
            .iter()
            .find(|r| r.name.as_deref().is_some_and(|n| xdstp::canonical(n) == canonical) && r.matches(params))
    }

    /// The state's shared copy of `name`, when it holds a resource of that name (streams
    /// keep it instead of a copy of their own: the allocation carries over to later states).
    pub fn name(&self, name: &str) -> Option<&Name> {
        self.index.get_key_value(&*xdstp::canonical(name)).map(|(name, _)| name)
    }

    /// Total encoded size of the resources.
    pub fn resource_bytes(&self) -> usize {
        self.resources.iter().map(|r| r.field.len()).sum()
    }

    /// True when this state was fetched for `name` (so its absence means it does not exist):
    /// by the wildcard, by name, or through a glob collection it belongs to.
    pub fn covers(&self, name: &str) -> bool {
        self.ready && self.coverage.wants(name)
    }

    /// True when some resource is a member of the glob collection `glob`.
    pub fn has_member(&self, glob: &str) -> bool {
        let collection = Interest { names: Names::from_names([Name::new(glob)]), ..Interest::default() };
        self.resources.iter().any(|r| r.name.as_deref().is_some_and(|n| collection.wants(n)))
    }

    /// The resources `interest` selects, in the origin's order.
    ///
    /// With variants, a name is selected once: its first variant matching the interest's
    /// dynamic parameters.
    pub fn select<'a>(&'a self, interest: &'a Interest) -> Box<dyn Iterator<Item = &'a Arc<Resource>> + 'a> {
        if self.variants && !self.opaque {
            let params = interest.client_params();
            let mut seen = std::collections::HashSet::new();
            return Box::new(self.resources.iter().filter(move |r| {
                r.name.as_deref().is_some_and(|n| {
                    interest.wants(n) && r.matches(params) && seen.insert(xdstp::canonical(n).into_owned())
                })
            }));
        }
        if self.opaque || interest.wildcard {
            Box::new(self.resources.iter())
        } else if interest.names.len() * 4 < self.resources.len() && !interest.has_globs() {
            let mut picked: Vec<usize> =
                interest.names.iter().filter_map(|n| self.index.get(n.as_str()).copied()).collect();
            picked.sort_unstable();
            Box::new(picked.into_iter().map(move |i| &self.resources[i]))
        } else {
            Box::new(self.resources.iter().filter(move |r| r.name.as_deref().is_some_and(|n| interest.wants(n))))
        }
    }

    /// The encoded response body (without nonce) carrying every resource.
    pub fn full_body(&self) -> &Bytes {
        &self.full.body
    }

    /// The encoded state-of-the-world response body (without nonce) carrying what
    /// `interest` selects, and the number of resources in it, for a client that holds none
    /// of the bodies.
    pub fn body_for(&self, interest: &Interest) -> (Bytes, usize) {
        let (message, count) = self.sotw_message(interest, false);
        (message.body(), count)
    }

    /// The resource errors of the names `interest` wants, in name order (no allocation when
    /// there are none).
    pub fn errors_for<'a>(&'a self, interest: &Interest) -> Vec<&'a ResourceError> {
        let errors = &self.meta.resource_errors;
        if errors.is_empty() {
            return Vec::new();
        }
        if self.opaque || interest.wildcard {
            return errors.iter().collect();
        }
        if interest.names.len() < errors.len() {
            // Errors are sorted by name: look each wanted name up.
            return interest
                .names
                .iter()
                .filter_map(|name| errors.binary_search_by(|e| error_name(e).cmp(name.as_str())).ok())
                .map(|i| &errors[i])
                .collect();
        }
        errors.iter().filter(|e| interest.wants(error_name(e))).collect()
    }

    /// True when this state may be served to a client that asked at `since` for what
    /// `interest` selects: every `do_not_cache` resource among them arrived after it.
    pub fn fresh_for(&self, interest: &Interest, since: Instant) -> bool {
        !self.uncacheable || self.select(interest).all(|r| !r.do_not_cache || r.arrived >= since)
    }

    /// The state-of-the-world response carrying what `interest` selects, and the number of
    /// resources in it: shared whole when `interest` selects every resource or the state's
    /// shared selection (the first selection by name asked of this state), else built for
    /// `interest` alone. Resource errors are those of the names `interest` wants.
    ///
    /// `holds_bodies` says the client was sent a state with this state's
    /// [`KeyState::content_serial`]: resources refreshed by a TTL heartbeat then go as the
    /// heartbeat; otherwise every resource goes with its body.
    ///
    /// A shared message's nonce starts with `s` and names this state and selection, so it
    /// never equals a stream's own (numeric) nonces nor the nonce of any other state.
    pub fn sotw_message(&self, interest: &Interest, holds_bodies: bool) -> (SotwMessage<'_>, usize) {
        let heartbeat = holds_bodies && !self.heartbeats.is_empty();
        if self.opaque || (interest.wildcard && !self.variants) {
            let message = if heartbeat { self.heartbeat_full() } else { &self.full };
            return (SotwMessage::Shared(message), self.resources.len());
        }
        // The first selection by name (and dynamic parameters) is shared, with bodies and (in
        // a heartbeat state) with heartbeats; a nonce of its own for each (`n`, `hn`).
        let (cell, nonce_suffix) = if heartbeat { (&self.selected_heartbeat, "hn") } else { (&self.selected, "n") };
        let (names, params, shared, count) = cell.get_or_init(|| {
            let picked: Vec<&Bytes> = self.select(interest).map(|r| self.sotw_field(r, heartbeat)).collect();
            let count = picked.len();
            let nonce = format!("s{}{nonce_suffix}", self.id);
            let shared = SharedMessage::new(&self.header_for(interest), picked, nonce);
            (interest.names.clone(), interest.params.clone(), shared, count)
        });
        if *names == interest.names && *params == interest.params {
            return (SotwMessage::Shared(shared), *count);
        }
        let picked: Vec<&Bytes> = self.select(interest).map(|r| self.sotw_field(r, heartbeat)).collect();
        let count = picked.len();
        (SotwMessage::Own(wire::concat(&self.header_for(interest), picked)), count)
    }

    /// The response header for `interest`: the state's own, or, when the origin reported
    /// resource errors, one with only the errors of the names `interest` wants.
    fn header_for(&self, interest: &Interest) -> Bytes {
        if self.meta.resource_errors.is_empty() {
            return self.header.clone();
        }
        let errors: Vec<ResourceError> = self.errors_for(interest).into_iter().cloned().collect();
        wire::encode_header(
            &self.meta.version_info,
            &self.type_url,
            self.meta.canary,
            self.meta.control_plane.as_ref(),
            &errors,
        )
    }

    /// `resource` as a state-of-the-world `resources` field: its heartbeat when `heartbeat`
    /// and the origin sent one with this state, else its body.
    fn sotw_field<'a>(&'a self, resource: &'a Resource, heartbeat: bool) -> &'a Bytes {
        match resource.name.as_deref().and_then(|n| self.heartbeats.get(n)) {
            Some(beat) if heartbeat => &beat.sotw_field,
            _ => &resource.field,
        }
    }

    /// Every resource (every variant), as sent to another relay node that follows this key:
    /// with heartbeats in place of the bodies they refresh when `holds_bodies` (the node was
    /// sent a state with this content serial).
    pub fn full_message(&self, holds_bodies: bool) -> &SharedMessage {
        if holds_bodies && !self.heartbeats.is_empty() { self.heartbeat_full() } else { &self.full }
    }

    /// Every resource, with heartbeats in place of the bodies they refresh.
    fn heartbeat_full(&self) -> &SharedMessage {
        self.heartbeat_full.get_or_init(|| {
            let fields = self.resources.iter().map(|r| self.sotw_field(r, true));
            SharedMessage::new(&self.header, fields, format!("s{}h", self.id))
        })
    }

    /// The encoded delta response body (without nonce) carrying `resources`, `heartbeats`
    /// (delta heartbeat fields), `removed` and `errors`.
    pub fn delta_body(
        &self,
        resources: &[Arc<Resource>],
        heartbeats: &[&Bytes],
        removed: &[String],
        errors: &[ResourceError],
    ) -> Bytes {
        let own_header;
        let header = if errors.is_empty() {
            self.delta_header.get_or_init(|| {
                wire::encode_delta_header(
                    &self.meta.version_info,
                    &self.type_url,
                    self.meta.control_plane.as_ref(),
                    &[],
                )
            })
        } else {
            own_header = wire::encode_delta_header(
                &self.meta.version_info,
                &self.type_url,
                self.meta.control_plane.as_ref(),
                errors,
            );
            &own_header
        };
        let removed = wire::encode_removed(removed);
        let fields = resources.iter().map(|r| r.delta_field()).chain(heartbeats.iter().copied());
        wire::concat(header, fields.chain(std::iter::once(&removed)))
    }

    /// Computes the state after a state-of-the-world origin response answering a
    /// subscription to `coverage`. Returns `Ok(None)` when nothing changed.
    ///
    /// LDS and CDS responses (and opaque types) replace the state; other types merge into
    /// it (such servers may send only what changed), then drop the names the subscription no
    /// longer asks for and those the origin reports NOT_FOUND. The response's resource
    /// errors replace the state's.
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; `self` stays valid.
    pub fn apply(&self, response: DiscoveryResponse, coverage: &Interest) -> Result<Option<KeyState>, Rejection> {
        self.apply_sotw(response, coverage, false)
    }

    /// [`KeyState::apply`] for the first response on a new origin stream, which resends every
    /// `do_not_cache` resource that still exists: those it does not resend are dropped (a
    /// copy from an earlier stream may not be served to a client that asked later).
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; `self` stays valid.
    pub fn apply_first(&self, response: DiscoveryResponse, coverage: &Interest) -> Result<Option<KeyState>, Rejection> {
        self.apply_sotw(response, coverage, true)
    }

    fn apply_sotw(
        &self,
        response: DiscoveryResponse,
        coverage: &Interest,
        first_on_stream: bool,
    ) -> Result<Option<KeyState>, Rejection> {
        if response.type_url != self.type_url {
            return Err(Rejection::TypeMismatch { expected: self.type_url.clone(), got: response.type_url });
        }
        let Admitted { resources: incoming, heartbeats } =
            self.admit(response.resources.into_iter().map(|any| (any, None)), Instant::now())?;
        let meta = Meta {
            version_info: response.version_info,
            control_plane: response.control_plane,
            canary: response.canary,
            resource_errors: unique_errors(response.resource_errors),
        };
        let opaque = incoming.iter().any(|r| r.name.is_none());
        let replace = opaque || self.opaque || xds::is_full_state(&self.type_url) || !self.is_ready();
        let resources = if replace {
            incoming
        } else {
            let mut removed: Vec<String> = not_found(&meta.resource_errors).map(str::to_owned).collect();
            if first_on_stream {
                removed.extend(self.stale_uncacheable(&incoming));
            }
            self.merge(incoming, &removed, coverage)
        };
        Ok(self.next(meta, resources, coverage, heartbeats))
    }

    /// Computes the state after a full state forwarded by another relay node: it replaces
    /// the state whatever the type. Returns `Ok(None)` when nothing changed.
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; `self` stays valid.
    pub fn replace(&self, response: DiscoveryResponse, coverage: &Interest) -> Result<Option<KeyState>, Rejection> {
        self.replace_dated(response, coverage, Instant::now())
    }

    /// [`KeyState::replace`] for a state whose `do_not_cache` resources reached the owner at
    /// `arrived` (the owner says how long ago): they are dated so, never as new here.
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; `self` stays valid.
    pub fn replace_dated(
        &self,
        response: DiscoveryResponse,
        coverage: &Interest,
        arrived: Instant,
    ) -> Result<Option<KeyState>, Rejection> {
        if response.type_url != self.type_url {
            return Err(Rejection::TypeMismatch { expected: self.type_url.clone(), got: response.type_url });
        }
        let Admitted { resources, heartbeats } =
            self.admit(response.resources.into_iter().map(|any| (any, None)), arrived)?;
        let meta = Meta {
            version_info: response.version_info,
            control_plane: response.control_plane,
            canary: response.canary,
            resource_errors: unique_errors(response.resource_errors),
        };
        Ok(self.next(meta, resources, coverage, heartbeats))
    }

    /// Computes the state after a delta origin response answering a subscription to
    /// `coverage`: its resources are added or replaced, its removals and the names it reports
    /// NOT_FOUND dropped; its resource errors replace those of the names it mentions.
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; `self` stays valid.
    pub fn apply_delta(
        &self,
        response: DeltaDiscoveryResponse,
        coverage: &Interest,
    ) -> Result<Option<KeyState>, Rejection> {
        self.apply_delta_with(response, coverage, false)
    }

    /// [`KeyState::apply_delta`] for the first response on a new origin stream (which
    /// declared no version for `do_not_cache` resources, so the origin resends those that
    /// exist): those it does not resend are dropped.
    ///
    /// # Errors
    /// A [`Rejection`] when the response is malformed; `self` stays valid.
    pub fn apply_delta_first(
        &self,
        response: DeltaDiscoveryResponse,
        coverage: &Interest,
    ) -> Result<Option<KeyState>, Rejection> {
        self.apply_delta_with(response, coverage, true)
    }

    fn apply_delta_with(
        &self,
        response: DeltaDiscoveryResponse,
        coverage: &Interest,
        first_on_stream: bool,
    ) -> Result<Option<KeyState>, Rejection> {
        if response.type_url != self.type_url {
            return Err(Rejection::TypeMismatch { expected: self.type_url.clone(), got: response.type_url });
        }
        let mut bodies = Vec::with_capacity(response.resources.len());
        for (index, resource) in response.resources.into_iter().enumerate() {
            // A variant (xDS-TP2) is named by `resource_name` instead of `name`.
            let variant = resource.resource_name.as_ref().is_some_and(|n| !n.name.is_empty());
            if resource.name.is_empty() && !variant {
                return Err(Rejection::Unnamed(index));
            }
            let keep_wrapper = resource.resource.is_none()
                || resource.ttl.is_some()
                || resource.metadata.is_some()
                || resource.cache_control.is_some()
                || resource.resource_name.is_some();
            let any = match &resource.resource {
                // Keep TTL, metadata, cache control and dynamic-parameter constraints by
                // relaying the whole `Resource` wrapper.
                Some(any) if !keep_wrapper => any.clone(),
                _ => Any { type_url: wire::RESOURCE_WRAPPER.to_owned(), value: resource.encode_to_vec() },
            };
            bodies.push((any, Some(resource.version)));
        }
        let Admitted { resources: incoming, heartbeats } = self.admit(bodies, Instant::now())?;
        let version_info = if response.system_version_info.is_empty() {
            self.meta.version_info.clone()
        } else {
            response.system_version_info
        };
        let errors = unique_errors(response.resource_errors);
        let mut removed = response.removed_resources;
        removed.extend(not_found(&errors).map(str::to_owned));
        if first_on_stream {
            removed.extend(self.stale_uncacheable(&incoming));
        }
        let mentioned: std::collections::HashSet<&str> = incoming
            .iter()
            .filter_map(|r| r.name.as_deref())
            .chain(removed.iter().map(String::as_str))
            .chain(errors.iter().map(error_name))
            .collect();
        // Errors of names the subscription still asks for and this response does not mention
        // stay; NOT_FOUND errors stay too (clients learn from them that the name is gone).
        let kept = self
            .meta
            .resource_errors
            .iter()
            .filter(|e| !mentioned.contains(error_name(e)) && coverage.wants(error_name(e)))
            .cloned();
        let resource_errors = unique_errors(kept.chain(errors.iter().cloned()).collect());
        let meta = Meta { version_info, control_plane: response.control_plane, canary: false, resource_errors };
        let base = if self.is_ready() { self } else { &KeyState::empty(&self.type_url) };
        let resources = base.merge(incoming, &removed, coverage);
        let mut next = self.next(meta.clone(), resources, coverage, heartbeats);
        // A delta origin's first answer may be empty yet complete: the key is ready.
        if next.is_none() && !self.is_ready() {
            next = Some(KeyState::build(
                self.serial + 1,
                self.serial + 1,
                true,
                self.type_url.clone(),
                meta,
                Vec::new(),
                coverage.clone(),
                Vec::new(),
                None,
            ));
        }
        Ok(next)
    }

    /// Checks and wraps incoming resources; a resource identical to the same-named one of
    /// `self` reuses it (no hash, no encode). A bodyless `Resource` with a TTL for a name
    /// `self` holds with a body is a heartbeat: the held resource stays, and the heartbeat
    /// is returned beside it.
    fn admit(
        &self,
        bodies: impl IntoIterator<Item = (Any, Option<String>)>,
        arrived: Instant,
    ) -> Result<Admitted, Rejection> {
        let known = xds::is_known(&self.type_url);
        // With variants a name has several resources: look them up by name.
        let variants = self.variants.then(|| {
            let mut by_name: HashMap<std::borrow::Cow<'_, str>, Vec<&Arc<Resource>>> = HashMap::new();
            for r in &self.resources {
                if let Some(n) = r.name.as_deref() {
                    by_name.entry(xdstp::canonical(n)).or_default().push(r);
                }
            }
            by_name
        });
        let mut incoming = Vec::new();
        let mut heartbeats = Vec::new();
        for (index, (any, origin_version)) in bodies.into_iter().enumerate() {
            if known && any.type_url != self.type_url && any.type_url != wire::RESOURCE_WRAPPER {
                return Err(Rejection::ResourceType { index, expected: self.type_url.clone(), got: any.type_url });
            }
            let mut name = wire::resource_name(&any);
            let mut constraints = None;
            // A wrapper (TTL, heartbeat, cache control, variant) carries the resource inside:
            // it must be of the key's type too. Only wrappers are decoded; plain resources are
            // skimmed. A wrapper of an unknown type that does not decode is relayed as it is.
            let wrapper = if any.type_url == wire::RESOURCE_WRAPPER {
                match DeltaResource::decode(any.value.as_slice()) {
                    Ok(wrapper) => Some(wrapper),
                    Err(_) if known => return Err(Rejection::UndecodableWrapper(index)),
                    Err(_) => None,
                }
            } else {
                None
            };
            if known
                && let Some(inner) = wrapper.as_ref().and_then(|w| w.resource.as_ref())
                && inner.type_url != self.type_url
            {
                return Err(Rejection::ResourceType {
                    index,
                    expected: self.type_url.clone(),
                    got: inner.type_url.clone(),
                });
            }
            // A variant (xDS-TP2) is named by `resource_name`, with its constraints.
            if let Some(resource_name) = wrapper.as_ref().and_then(|w| w.resource_name.as_ref()) {
                if name.as_deref().is_none_or(str::is_empty) {
                    name = Some(resource_name.name.clone());
                }
                constraints = resource_name.dynamic_parameter_constraints.clone();
            }
            // Named types are served by name: a resource without one cannot be served (and two
            // of them would shadow each other). Other types are relayed as they are.
            if wire::name_field(&any.type_url).is_some() && name.as_deref().is_none_or(str::is_empty) {
                return Err(Rejection::Unnamed(index));
            }
            let held: Option<&Arc<Resource>> = match (&name, &variants) {
                (Some(n), None) => self.get(n),
                (Some(n), Some(variants)) => variants
                    .get(&*xdstp::canonical(n))
                    .and_then(|held| held.iter().find(|old| old.constraints.as_deref() == constraints.as_ref()))
                    .copied(),
                (None, _) => None,
            };
            // A heartbeat refreshes a held body (states without variants: with variants a
            // bodyless wrapper is kept as it came).
            if let (Some(wrapper), Some(held), Some(name), None) = (&wrapper, held, &name, &variants)
                && wrapper.resource.is_none()
                && wrapper.ttl.is_some()
                && !held.bodyless
            {
                heartbeats.push(HeartbeatSeen { name: name.clone(), ttl: wrapper.ttl, any });
                incoming.push(held.clone());
                continue;
            }
            let same = held.filter(|old| !old.do_not_cache && old.is(&any, &origin_version));
            incoming.push(match same {
                Some(old) => old.clone(),
                None => Arc::new(Resource::named(any, name, origin_version, wrapper.as_ref(), constraints, arrived)),
            });
        }
        // One name may come as several variants, but never twice with the same constraints.
        let mut keys: Vec<(String, Vec<u8>)> = incoming.iter().filter_map(|r| r.variant_key()).collect();
        keys.sort_unstable();
        if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(Rejection::DuplicateName(pair[0].0.clone()));
        }
        Ok(Admitted { resources: incoming, heartbeats })
    }

    /// Replaces same-named resources in place, appends new ones, drops `removed` and the
    /// names `coverage` no longer asks for.
    fn merge(&self, incoming: Vec<Arc<Resource>>, removed: &[String], coverage: &Interest) -> Vec<Arc<Resource>> {
        // Resources are replaced variant by variant; a removal drops every variant of a name.
        let mut fresh: HashMap<(String, Vec<u8>), Arc<Resource>> =
            incoming.iter().filter_map(|r| r.variant_key().map(|k| (k, r.clone()))).collect();
        let removed: std::collections::HashSet<std::borrow::Cow<'_, str>> =
            removed.iter().map(|n| xdstp::canonical(n)).collect();
        let mut merged = Vec::with_capacity(self.resources.len() + incoming.len());
        for old in &self.resources {
            let Some(key) = old.variant_key() else { continue };
            let replacement = fresh.remove(&key);
            if removed.contains(key.0.as_str()) || !coverage.wants(&key.0) {
                continue;
            }
            merged.push(replacement.unwrap_or_else(|| old.clone()));
        }
        merged.extend(
            incoming
                .into_iter()
                .filter(|r| r.variant_key().is_some_and(|k| !removed.contains(k.0.as_str()) && fresh.contains_key(&k))),
        );
        merged
    }

    /// The state following `self` with these fields, or `None` when nothing reaches clients.
    ///
    /// Same bodies and version: a state with new resource errors or heartbeats gets the next
    /// serial (it must reach clients) and keeps the content serial; an uncacheable state is
    /// rebuilt with the same serials, so that the clients waiting for a fresh copy of it get
    /// one while the others see nothing new.
    fn next(
        &self,
        meta: Meta,
        resources: Vec<Arc<Resource>>,
        coverage: &Interest,
        heartbeats: Vec<HeartbeatSeen>,
    ) -> Option<KeyState> {
        let same_content = self.is_ready()
            && self.resources.len() == resources.len()
            && self.resources.iter().zip(&resources).all(|(a, b)| Arc::ptr_eq(a, b) || a.version == b.version);
        let unchanged = same_content && self.meta.version_info == meta.version_info;
        let same_errors = self.meta.resource_errors == meta.resource_errors;
        let uncacheable = resources.iter().any(|r| r.do_not_cache);
        if unchanged && same_errors && heartbeats.is_empty() {
            if self.coverage == *coverage && !uncacheable {
                return None;
            }
            let mut next = KeyState::build(
                self.serial,
                self.content_serial,
                true,
                self.type_url.clone(),
                self.meta.clone(),
                resources,
                coverage.clone(),
                Vec::new(),
                Some(self),
            );
            next.changes = self.changes_to(&next);
            return Some(next);
        }
        let serial = self.serial + 1;
        let content_serial = if same_content { self.content_serial } else { serial };
        let mut next = KeyState::build(
            serial,
            content_serial,
            true,
            self.type_url.clone(),
            meta,
            resources,
            coverage.clone(),
            heartbeats,
            Some(self),
        );
        next.changes = self.changes_to(&next);
        Some(next)
    }

    /// Names of the `do_not_cache` resources held that `incoming` (the first response of a
    /// new stream) does not resend.
    fn stale_uncacheable<'a>(&'a self, incoming: &'a [Arc<Resource>]) -> impl Iterator<Item = String> + 'a {
        let resent: std::collections::HashSet<&str> = incoming.iter().filter_map(|r| r.name.as_deref()).collect();
        self.resources
            .iter()
            .filter(|r| r.do_not_cache)
            .filter_map(|r| r.name.clone())
            .filter(move |name| !resent.contains(name.as_str()))
    }

    /// True when `self` is a new version after `previous` (not only heartbeats or a fresh copy
    /// of the same content): a new `version_info`, new bodies or new resource errors.
    pub fn is_new_version_after(&self, previous: &KeyState) -> bool {
        self.version_info != previous.version_info
            || self.content_serial != previous.content_serial
            || self.meta.resource_errors != previous.meta.resource_errors
    }

    /// What changed from `self` to `next`, when a client in line with `self` can be brought
    /// in line with `next` from that alone.
    fn changes_to(&self, next: &KeyState) -> Option<Changes> {
        if !self.is_ready()
            || self.opaque
            || next.opaque
            || self.variants
            || next.variants
            || self.coverage != next.coverage
        {
            return None;
        }
        let changed = next
            .resources
            .iter()
            .enumerate()
            .filter(|(_, r)| match r.name.as_deref().and_then(|n| self.get(n)) {
                Some(old) => !Arc::ptr_eq(old, r) && old.version != r.version,
                None => true,
            })
            .map(|(i, _)| i)
            .collect();
        let removed = self
            .resources
            .iter()
            .filter_map(|r| r.name.as_ref())
            .filter(|name| next.get(name).is_none())
            .cloned()
            .collect();
        Some(Changes { since: self.id, changed, removed })
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        serial: u64,
        content_serial: u64,
        ready: bool,
        type_url: String,
        meta: Meta,
        resources: Vec<Arc<Resource>>,
        coverage: Interest,
        heartbeats: Vec<HeartbeatSeen>,
        previous: Option<&KeyState>,
    ) -> Self {
        let header = wire::encode_header(
            &meta.version_info,
            &type_url,
            meta.canary,
            meta.control_plane.as_ref(),
            &meta.resource_errors,
        );
        let id = NEXT_STATE_ID.fetch_add(1, Ordering::Relaxed);
        let full = SharedMessage::new(&header, resources.iter().map(|r| &r.field), format!("s{id}"));
        // Indexed by canonical spelling: an `xdstp://` name matches whatever the order of
        // its context parameters.
        let shared = |name: &str| {
            previous.and_then(|p| p.name(name)).cloned().unwrap_or_else(|| Name::new(xdstp::canonical(name)))
        };
        let index: HashMap<Name, usize> =
            resources.iter().enumerate().filter_map(|(i, r)| r.name.as_deref().map(|n| (shared(n), i))).collect();
        let heartbeats = heartbeats
            .into_iter()
            .filter_map(|HeartbeatSeen { name, ttl, any }| {
                let held = &resources[*index.get(&*xdstp::canonical(&name))?];
                let beat =
                    DeltaResource { name: name.clone(), version: held.version.clone(), ttl, ..Default::default() };
                let heartbeat = Heartbeat {
                    sotw_field: wire::encode_resource_field(&any),
                    delta_field: wire::encode_delta_resource_field(&beat),
                };
                Some((name, heartbeat))
            })
            .collect();
        let opaque = resources.iter().any(|r| r.name.is_none());
        let uncacheable = resources.iter().any(|r| r.do_not_cache);
        let variants = resources.iter().any(|r| r.constraints.is_some());
        Self {
            serial,
            content_serial,
            ready,
            version_info: meta.version_info.clone(),
            type_url,
            meta,
            resources,
            opaque,
            uncacheable,
            heartbeats,
            variants,
            coverage,
            received_at: Instant::now(),
            received_wall: SystemTime::now(),
            trace: Attachment::default(),
            header,
            full,
            delta_header: OnceLock::new(),
            heartbeat_full: OnceLock::new(),
            selected: OnceLock::new(),
            selected_heartbeat: OnceLock::new(),
            index,
            id,
            changes: None,
        }
    }
}

/// A TTL heartbeat as the source sent it, for a resource held with a body.
struct HeartbeatSeen {
    name: String,
    ttl: Option<ProtoDuration>,
    /// The bodyless `Resource` wrapper, relayed byte for byte to state-of-the-world clients.
    any: Any,
}

/// What [`KeyState::admit`] accepted: the resources in the origin's order, and the TTL
/// heartbeats that stand for held resources among them.
struct Admitted {
    resources: Vec<Arc<Resource>>,
    heartbeats: Vec<HeartbeatSeen>,
}

/// `errors` with at most one per name (the last one the origin sent for it), ordered by
/// name, so that an origin listing the same errors in another order changes nothing.
fn unique_errors(mut errors: Vec<ResourceError>) -> Vec<ResourceError> {
    if errors.len() > 1 {
        // Stable: of equal names the last one sent ends last, and is the one kept.
        errors.sort_by(|a, b| error_name(a).cmp(error_name(b)));
        let mut kept: Vec<ResourceError> = Vec::with_capacity(errors.len());
        for error in errors {
            match kept.last_mut() {
                Some(last) if error_name(last) == error_name(&error) => *last = error,
                _ => kept.push(error),
            }
        }
        return kept;
    }
    errors
}

/// The names `errors` reports NOT_FOUND.
fn not_found(errors: &[ResourceError]) -> impl Iterator<Item = &str> {
    errors.iter().filter(|e| e.error_detail.as_ref().is_some_and(|d| d.code == NOT_FOUND)).map(error_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
    use envoy_types::pb::google::protobuf::UInt32Value;
    use prost::{Message, Name};

    fn cluster(name: &str, timeout_ms: u32) -> Any {
        let c = Cluster {
            name: name.into(),
            per_connection_buffer_limit_bytes: Some(UInt32Value { value: timeout_ms }),
            ..Default::default()
        };
        Any { type_url: Cluster::type_url(), value: c.encode_to_vec() }
    }

    fn cla(name: &str, weight: u32) -> Any {
        let c = ClusterLoadAssignment {
            cluster_name: name.into(),
            policy: None,
            endpoints: vec![envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints {
                load_balancing_weight: Some(UInt32Value { value: weight }),
                ..Default::default()
            }],
            ..Default::default()
        };
        Any { type_url: ClusterLoadAssignment::type_url(), value: c.encode_to_vec() }
    }

    fn response(type_url: &str, version: &str, resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse { type_url: type_url.into(), version_info: version.into(), resources, ..Default::default() }
    }

    fn names(state: &KeyState) -> Vec<String> {
        state.resources.iter().map(|r| r.name.clone().unwrap_or_default()).collect()
    }

    #[test]
    fn identical_response_changes_nothing() {
        let s0 = KeyState::empty(xds::CLUSTER);
        let all = Interest::wildcard();
        let s1 = s0.apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1)]), &all).unwrap().unwrap();
        assert_eq!(s1.serial, 1);
        assert!(s1.apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1)]), &all).unwrap().is_none());
        let s2 = s1.apply(response(xds::CLUSTER, "v2", vec![cluster("a", 1)]), &all).unwrap().unwrap();
        assert_eq!(s2.serial, 2, "a new version is a change even with the same content");
        let s3 = s2.apply(response(xds::CLUSTER, "v2", vec![cluster("a", 2)]), &all).unwrap().unwrap();
        assert_eq!(s3.serial, 3, "new content is a change even with the same version");
    }

    #[test]
    fn full_state_types_replace_and_others_merge() {
        let all = Interest::wildcard();
        let cds = KeyState::empty(xds::CLUSTER)
            .apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1), cluster("b", 1)]), &all)
            .unwrap()
            .unwrap();
        let cds = cds.apply(response(xds::CLUSTER, "v2", vec![cluster("b", 1)]), &all).unwrap().unwrap();
        assert_eq!(names(&cds), ["b"]);

        let ab = Interest::names(["a", "b"]);
        let eds = KeyState::empty(xds::ENDPOINT)
            .apply(response(xds::ENDPOINT, "v1", vec![cla("a", 1), cla("b", 1)]), &ab)
            .unwrap()
            .unwrap();
        let eds = eds.apply(response(xds::ENDPOINT, "v2", vec![cla("b", 2)]), &ab).unwrap().unwrap();
        assert_eq!(names(&eds), ["a", "b"]);
        assert_ne!(eds.get("b").unwrap().version, eds.get("a").unwrap().version);
        let only_b = Interest::names(["b"]);
        let eds = eds.apply(response(xds::ENDPOINT, "v3", vec![cla("b", 3)]), &only_b).unwrap().unwrap();
        assert_eq!(names(&eds), ["b"], "names no longer subscribed are dropped");
    }

    #[test]
    fn malformed_responses_are_rejected() {
        let s0 = KeyState::empty(xds::CLUSTER);
        let all = Interest::wildcard();
        assert!(matches!(s0.apply(response(xds::ENDPOINT, "v1", vec![]), &all), Err(Rejection::TypeMismatch { .. })));
        assert!(matches!(
            s0.apply(response(xds::CLUSTER, "v1", vec![cla("a", 1)]), &all),
            Err(Rejection::ResourceType { index: 0, .. })
        ));
        assert_eq!(
            s0.apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1), cluster("a", 2)]), &all).unwrap_err(),
            Rejection::DuplicateName("a".into())
        );
        assert_eq!(
            s0.apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1), cluster("", 1), cluster("", 2)]), &all)
                .unwrap_err(),
            Rejection::Unnamed(1),
            "resources named \"\" are refused, not served"
        );
        let garbage = Any { type_url: xds::CLUSTER.into(), value: vec![0xff, 0xff, 0xff] };
        assert_eq!(
            s0.apply(response(xds::CLUSTER, "v1", vec![cluster("a", 1), garbage]), &all).unwrap_err(),
            Rejection::Unnamed(1),
            "a resource that does not decode has no readable name"
        );
        let wrap = |inner: Any| Any {
            type_url: wire::RESOURCE_WRAPPER.into(),
            value: DeltaResource { name: "a".into(), resource: Some(inner), ..Default::default() }.encode_to_vec(),
        };
        assert!(matches!(
            s0.apply(response(xds::CLUSTER, "v1", vec![wrap(cla("a", 1))]), &all),
            Err(Rejection::ResourceType { index: 0, .. })
        ));
        assert!(s0.apply(response(xds::CLUSTER, "v1", vec![wrap(cluster("a", 1))]), &all).is_ok());
        let broken = Any { type_url: wire::RESOURCE_WRAPPER.into(), value: vec![0x0a, 0x10, 0x01] };
        assert_eq!(
            s0.apply(response(xds::CLUSTER, "v1", vec![broken]), &all).unwrap_err(),
            Rejection::UndecodableWrapper(0)
        );
    }

    /// An EDS state of `a`, `b` and `c` at version `v1`, and the interest it was fetched for.
    fn eds_abc() -> (KeyState, Interest) {
        let abc = Interest::names(["a", "b", "c"]);
        let eds = KeyState::empty(xds::ENDPOINT)
            .apply(response(xds::ENDPOINT, "v1", vec![cla("a", 1), cla("b", 1), cla("c", 1)]), &abc)
            .unwrap()
            .unwrap();
        (eds, abc)
    }

    #[test]
    fn bodies_select_by_name() {
        let (eds, _) = eds_abc();
        let (body, count) = eds.body_for(&Interest::names(["c", "a", "zzz"]));
        assert_eq!(count, 2);
        let body_ptr = body.as_ptr();
        let decoded = DiscoveryResponse::decode(body).unwrap();
        let got: Vec<String> = decoded.resources.iter().filter_map(wire::resource_name).collect();
        assert_eq!(got, ["a", "c"]);
        assert_eq!(decoded.version_info, "v1");
        assert_eq!(eds.body_for(&Interest::wildcard()).1, 3);
        let (again, _) = eds.body_for(&Interest::names(["a", "c", "zzz"]));
        assert_eq!(again.as_ptr(), body_ptr, "the same names share one body");
        let (other, count) = eds.body_for(&Interest::names(["b"]));
        assert_eq!(count, 1);
        let got: Vec<String> =
            DiscoveryResponse::decode(other).unwrap().resources.iter().filter_map(wire::resource_name).collect();
        assert_eq!(got, ["b"], "other names get their own body");
    }

    /// Splits a gRPC message into its payload, checking the prefix.
    fn grpc_payload(message: &[u8]) -> &[u8] {
        assert_eq!(message[0], 0, "uncompressed");
        let len = u32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
        assert_eq!(message.len(), 5 + len, "one whole message");
        &message[5..]
    }

    #[test]
    fn shared_messages_are_whole_responses_with_a_nonce_of_their_own() {
        let (eds, ab) = eds_abc();
        let shared = |interest: &Interest| match eds.sotw_message(interest, false).0 {
            SotwMessage::Shared(shared) => Some(shared),
            SotwMessage::Own(_) => None,
        };
        let full = shared(&Interest::wildcard()).expect("the full body is always shared");
        let decoded = DiscoveryResponse::decode(grpc_payload(&full.message)).unwrap();
        assert_eq!((decoded.version_info.as_str(), decoded.nonce.as_str()), ("v1", full.nonce.as_str()));
        assert_eq!(decoded.resources.len(), 3);
        assert!(full.nonce.starts_with('s'), "never equal to a stream's numeric nonce");
        let again = shared(&Interest::wildcard()).unwrap();
        assert_eq!(again.message.as_ptr(), full.message.as_ptr(), "built once");
        assert_eq!(eds.full_body().as_ptr(), full.message[5..].as_ptr(), "the full body is the message's own bytes");

        let ac = Interest::names(["a", "c"]);
        let selected = shared(&ac).expect("the first selection by name is shared");
        let decoded = DiscoveryResponse::decode(grpc_payload(&selected.message)).unwrap();
        let names: Vec<String> = decoded.resources.iter().filter_map(wire::resource_name).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(decoded.nonce, selected.nonce);
        assert_eq!(eds.body_for(&ac).0.as_ptr(), selected.message[5..].as_ptr(), "the selected body is shared too");
        assert_ne!(selected.nonce, full.nonce);
        assert!(shared(&Interest::names(["b"])).is_none(), "other names get their own body");

        let next = eds.apply(response(xds::ENDPOINT, "v2", vec![cla("a", 2)]), &ab).unwrap().unwrap();
        let SotwMessage::Shared(next_full) = next.sotw_message(&Interest::wildcard(), false).0 else {
            panic!("shared")
        };
        assert_ne!(next_full.nonce, full.nonce, "each state its own nonce");
    }

    fn delta(version: &str, resources: Vec<(&str, Any)>, removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: xds::ENDPOINT.into(),
            system_version_info: version.into(),
            resources: resources
                .into_iter()
                .map(|(v, any)| DeltaResource {
                    name: wire::resource_name(&any).unwrap(),
                    version: v.into(),
                    resource: Some(any),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn delta_responses_add_replace_and_remove() {
        let all = Interest::wildcard();
        let s0 = KeyState::empty(xds::ENDPOINT);
        let s1 =
            s0.apply_delta(delta("1", vec![("o1", cla("a", 1)), ("o1", cla("b", 1))], &[]), &all).unwrap().unwrap();
        assert_eq!(names(&s1), ["a", "b"]);
        assert_eq!(s1.get("a").unwrap().origin_version.as_deref(), Some("o1"));
        let s2 =
            s1.apply_delta(delta("2", vec![("o2", cla("b", 2)), ("o2", cla("c", 1))], &["a"]), &all).unwrap().unwrap();
        assert_eq!(names(&s2), ["b", "c"]);
        assert_ne!(s2.get("b").unwrap().version, s1.get("b").unwrap().version);
        assert_eq!(s2.version_info, "2");
        let empty = KeyState::empty(xds::ENDPOINT).apply_delta(delta("", vec![], &[]), &all).unwrap().unwrap();
        assert!(empty.is_ready() && empty.resources.is_empty(), "an empty first delta answer is a complete state");
    }

    #[test]
    fn delta_bodies_carry_versions_and_removals() {
        let all = Interest::wildcard();
        let state = KeyState::empty(xds::ENDPOINT)
            .apply(response(xds::ENDPOINT, "v1", vec![cla("a", 1), cla("b", 1)]), &all)
            .unwrap()
            .unwrap();
        let body = state.delta_body(&[state.get("b").unwrap().clone()], &[], &["gone".to_owned()], &[]);
        let decoded = DeltaDiscoveryResponse::decode(body).unwrap();
        assert_eq!(decoded.system_version_info, "v1");
        assert_eq!(decoded.type_url, xds::ENDPOINT);
        assert_eq!(decoded.removed_resources, ["gone"]);
        assert_eq!(decoded.resources.len(), 1);
        assert_eq!(decoded.resources[0].name, "b");
        assert_eq!(decoded.resources[0].version, state.get("b").unwrap().version);
        assert_eq!(decoded.resources[0].resource.as_ref(), Some(&state.get("b").unwrap().any));
    }

    /// xDS-TP1: a glob collection selects its members, lookups ignore the order of context
    /// parameters, and two spellings of one name in a response are a duplicate.
    #[test]
    fn xdstp_globs_select_members() {
        let fleet = |id: &str| format!("xdstp://auth/envoy.config.cluster.v3.Cluster/fleet/{id}");
        let all = Interest::wildcard();
        let mut clusters: Vec<Any> = (0..12).map(|i| cluster(&fleet(&format!("c{i}")), 1)).collect();
        clusters.push(cluster("plain", 1));
        clusters.push(cluster(&fleet("p?b=2&a=1"), 1));
        let state = KeyState::empty(xds::CLUSTER).apply(response(xds::CLUSTER, "v1", clusters), &all).unwrap().unwrap();
        let glob = Interest::names([fleet("*")]);
        let picked: Vec<String> = state.select(&glob).filter_map(|r| r.name.clone()).collect();
        assert_eq!(picked.len(), 12, "{picked:?}");
        assert!(picked.iter().all(|n| n.starts_with(&fleet("c"))));
        assert_eq!(state.body_for(&glob).1, 12);
        assert!(state.get(&fleet("p?a=1&b=2")).is_some(), "parameters in another order");
        assert!(state.has_member(&fleet("*")) && !state.has_member("xdstp://auth/envoy.config.cluster.v3.Cluster/x/*"));
        let twice = vec![cluster(&fleet("p?b=2&a=1"), 1), cluster(&fleet("p?a=1&b=2"), 2)];
        assert!(matches!(
            KeyState::empty(xds::CLUSTER).apply(response(xds::CLUSTER, "v1", twice), &all),
            Err(Rejection::DuplicateName(_))
        ));
        let fetched = KeyState::empty(xds::CLUSTER)
            .apply(response(xds::CLUSTER, "v1", vec![cluster(&fleet("c1"), 1)]), &glob)
            .unwrap()
            .unwrap();
        assert!(fetched.covers(&fleet("c9")), "a member's absence from a fetched glob means it does not exist");
        assert!(!fetched.covers("xdstp://auth/envoy.config.cluster.v3.Cluster/other/c9"));
    }

    /// xDS-TP2: one name in several variants is stored whole, each client gets the first
    /// variant matching its parameters, and the same variant twice is a duplicate.
    #[test]
    fn variants_are_stored_and_selected_by_parameters() {
        use crate::constraints::Params;
        use envoy_types::pb::envoy::service::discovery::v3::ResourceName;
        use envoy_types::pb::envoy::service::discovery::v3::dynamic_parameter_constraints::{
            SingleConstraint, Type, single_constraint::ConstraintType, single_constraint::Exists,
        };
        let single = |key: &str, kind: ConstraintType| DynamicParameterConstraints {
            r#type: Some(Type::Constraint(SingleConstraint { key: key.into(), constraint_type: Some(kind) })),
        };
        let prod = single("env", ConstraintType::Value("prod".into()));
        let default = DynamicParameterConstraints {
            r#type: Some(Type::NotConstraints(Box::new(single("env", ConstraintType::Exists(Exists {}))))),
        };
        let variant = |name: &str, limit: u32, constraints: &DynamicParameterConstraints| Any {
            type_url: wire::RESOURCE_WRAPPER.into(),
            value: DeltaResource {
                resource_name: Some(ResourceName {
                    name: name.into(),
                    dynamic_parameter_constraints: Some(constraints.clone()),
                }),
                resource: Some(cluster(name, limit)),
                ..Default::default()
            }
            .encode_to_vec(),
        };
        let all = Interest::wildcard();
        let state = KeyState::empty(xds::CLUSTER)
            .apply(
                response(xds::CLUSTER, "v1", vec![variant("a", 1, &prod), variant("a", 2, &default), cluster("b", 1)]),
                &all,
            )
            .unwrap()
            .unwrap();
        assert!(state.variants);
        assert_eq!(names(&state), ["a", "a", "b"], "both variants are kept");
        let params = |pairs: &[(&str, &str)]| -> Params {
            std::sync::Arc::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
        };
        let pick = |interest: &Interest| -> Vec<String> { state.select(interest).map(|r| r.version.clone()).collect() };
        let prod_client = Interest::names(["a", "b"]).with_params(params(&[("env", "prod")]));
        let plain_client = Interest::names(["a", "b"]);
        let dev_client = Interest::wildcard().with_params(params(&[("env", "dev")]));
        assert_eq!(pick(&prod_client), [state.resources[0].version.clone(), state.resources[2].version.clone()]);
        assert_eq!(pick(&plain_client), [state.resources[1].version.clone(), state.resources[2].version.clone()]);
        assert_eq!(pick(&dev_client), [state.resources[2].version.clone()], "no variant of a for env=dev");
        assert_eq!(state.get_for("a", &prod_client).unwrap().version, state.resources[0].version);
        assert!(state.get_for("a", &dev_client).is_none());
        let (prod_body, count) = state.body_for(&prod_client);
        assert_eq!(count, 2);
        let decoded = DiscoveryResponse::decode(prod_body).unwrap();
        let wrapper = DeltaResource::decode(decoded.resources[0].value.as_slice()).unwrap();
        assert_eq!(
            wrapper.resource_name.unwrap().dynamic_parameter_constraints,
            Some(prod.clone()),
            "the constraints are sent downstream"
        );
        assert_ne!(state.body_for(&plain_client).0, state.body_for(&prod_client).0, "selections differ by parameters");
        let twice = vec![variant("a", 1, &prod), variant("a", 3, &prod)];
        assert_eq!(
            KeyState::empty(xds::CLUSTER).apply(response(xds::CLUSTER, "v1", twice), &all).unwrap_err(),
            Rejection::DuplicateName("a".into())
        );
        let delta = DeltaDiscoveryResponse {
            type_url: xds::CLUSTER.into(),
            system_version_info: "d1".into(),
            resources: vec![DeltaResource {
                resource_name: Some(ResourceName {
                    name: "a".into(),
                    dynamic_parameter_constraints: Some(prod.clone()),
                }),
                version: "o1".into(),
                resource: Some(cluster("a", 5)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let next = state.apply_delta(delta, &all).unwrap().unwrap();
        assert_eq!(names(&next), ["a", "a", "b"], "a delta variant replaces its own variant only");
        assert_ne!(next.resources[0].version, state.resources[0].version);
        assert_eq!(next.resources[1].version, state.resources[1].version);
        let field = DeltaResource::decode(&next.resources[0].delta_field()[2..]).unwrap();
        assert!(field.name.is_empty() && field.resource_name.is_some(), "only one of name and resource_name");
    }

    /// xDS TP3: per-resource errors and `Resource` wrappers (TTL, heartbeats) pass through
    /// untouched.
    fn resource_error(name: &str, code: i32, message: &str) -> ResourceError {
        use envoy_types::pb::envoy::service::discovery::v3::ResourceName;
        use envoy_types::pb::google::rpc::Status;
        ResourceError {
            resource_name: Some(ResourceName { name: name.into(), dynamic_parameter_constraints: None }),
            error_detail: Some(Status { code, message: message.into(), details: vec![] }),
        }
    }

    fn wrapper(resource: DeltaResource) -> Any {
        Any { type_url: wire::RESOURCE_WRAPPER.into(), value: resource.encode_to_vec() }
    }

    fn ttl(seconds: i64) -> Option<ProtoDuration> {
        Some(ProtoDuration { seconds, nanos: 0 })
    }

    #[test]
    fn wrappers_pass_through_with_their_ttl() {
        let wrapped = wrapper(DeltaResource {
            name: "b".into(),
            version: "7".into(),
            resource: Some(cla("b", 1)),
            ttl: ttl(30),
            ..Default::default()
        });
        let response = response(xds::ENDPOINT, "v1", vec![cla("a", 1), wrapped.clone()]);
        let state = KeyState::empty(xds::ENDPOINT).apply(response, &Interest::wildcard()).unwrap().unwrap();
        let decoded = DiscoveryResponse::decode(state.body_for(&Interest::wildcard()).0).unwrap();
        assert_eq!(decoded.resources[1], wrapped, "the wrapper and its TTL are relayed byte for byte");
        let b = state.get("b").unwrap().clone();
        let delta = DeltaDiscoveryResponse::decode(state.delta_body(&[b], &[], &[], &[])).unwrap();
        assert_eq!(delta.resources[0].ttl, ttl(30), "delta keeps the TTL");
        assert_eq!(delta.resources[0].name, "b");
    }

    #[test]
    fn resource_errors_reach_the_clients_of_their_names_only() {
        let ab = Interest::names(["a", "b"]);
        let mut first = response(xds::ENDPOINT, "v1", vec![cla("a", 1)]);
        first.resource_errors = vec![resource_error("b", 7, "not authorized")];
        let state = KeyState::empty(xds::ENDPOINT).apply(first, &ab).unwrap().unwrap();
        let errors_of = |state: &KeyState, interest: &Interest| {
            let body = state.sotw_message(interest, false).0.body();
            DiscoveryResponse::decode(body).unwrap().resource_errors
        };
        assert_eq!(errors_of(&state, &Interest::wildcard()), vec![resource_error("b", 7, "not authorized")]);
        assert_eq!(errors_of(&state, &Interest::names(["b"])), vec![resource_error("b", 7, "not authorized")]);
        assert!(errors_of(&state, &Interest::names(["a"])).is_empty(), "a client of a alone gets no error of b");
        assert!(state.errors_for(&Interest::names(["a"])).is_empty());

        // The same resources without the error: a change that reaches clients, not new bodies.
        let cleared = state.apply(response(xds::ENDPOINT, "v1", vec![cla("a", 1)]), &ab).unwrap().unwrap();
        assert_eq!(cleared.serial, state.serial + 1);
        assert_eq!(cleared.content_serial, state.content_serial, "the bodies did not change");
        assert!(cleared.meta.resource_errors.is_empty());
        assert!(cleared.is_new_version_after(&state));

        // NOT_FOUND removes a resource a merging type holds; other codes keep it (transient).
        let mut gone = response(xds::ENDPOINT, "v2", vec![]);
        gone.resource_errors = vec![resource_error("a", 5, "deleted")];
        let gone = cleared.apply(gone, &ab).unwrap().unwrap();
        assert!(gone.get("a").is_none(), "NOT_FOUND counts as a removal");
        let mut flaky = response(xds::ENDPOINT, "v2", vec![]);
        flaky.resource_errors = vec![resource_error("a", 14, "backend unavailable")];
        let kept = cleared.apply(flaky, &ab).unwrap().unwrap();
        assert!(kept.get("a").is_some(), "a transient error keeps the cached resource");
    }

    #[test]
    fn delta_resource_errors_replace_those_of_the_names_a_response_mentions() {
        let ab = Interest::names(["a", "b"]);
        let mut first = delta("d1", vec![("a", cla("a", 1))], &[]);
        first.resource_errors = vec![resource_error("b", 7, "not authorized")];
        let state = KeyState::empty(xds::ENDPOINT).apply_delta(first, &ab).unwrap().unwrap();
        let unrelated = state.apply_delta(delta("d2", vec![("a", cla("a", 2))], &[]), &ab).unwrap().unwrap();
        assert_eq!(unrelated.meta.resource_errors, vec![resource_error("b", 7, "not authorized")], "b not mentioned");
        let fixed = unrelated.apply_delta(delta("d3", vec![("b", cla("b", 1))], &[]), &ab).unwrap().unwrap();
        assert!(fixed.meta.resource_errors.is_empty(), "b arrived: its error is over");
        let errors = vec![resource_error("b", 14, "flaky")];
        let body = fixed.delta_body(&[], &[], &[], &errors);
        assert_eq!(DeltaDiscoveryResponse::decode(body).unwrap().resource_errors, errors);
        let mut repeated = delta("d4", vec![], &[]);
        repeated.resource_errors = vec![resource_error("b", 14, "first"), resource_error("b", 14, "last")];
        let repeated = fixed.apply_delta(repeated, &ab).unwrap().unwrap();
        assert_eq!(repeated.meta.resource_errors, vec![resource_error("b", 14, "last")], "one error per name");
    }

    #[test]
    fn ttl_heartbeats_refresh_held_bodies_and_reach_only_clients_that_hold_them() {
        let all = Interest::wildcard();
        let body = |version: &str, weight| {
            wrapper(DeltaResource {
                name: "a".into(),
                version: version.into(),
                resource: Some(cla("a", weight)),
                ttl: ttl(30),
                ..Default::default()
            })
        };
        let beat = wrapper(DeltaResource { name: "a".into(), version: "1".into(), ttl: ttl(30), ..Default::default() });
        let s1 = KeyState::empty(xds::ENDPOINT)
            .apply(response(xds::ENDPOINT, "v1", vec![body("1", 1)]), &all)
            .unwrap()
            .unwrap();
        let s2 = s1
            .apply(response(xds::ENDPOINT, "v1", vec![beat.clone()]), &all)
            .unwrap()
            .expect("a heartbeat reaches clients");
        assert_eq!(s2.serial, s1.serial + 1);
        assert_eq!(s2.content_serial, s1.content_serial, "a heartbeat keeps the bodies");
        assert!(Arc::ptr_eq(s2.get("a").unwrap(), s1.get("a").unwrap()), "the cached body stays");
        assert!(!s2.is_new_version_after(&s1), "a heartbeat is not a new version");

        let decode = |message: SotwMessage<'_>| DiscoveryResponse::decode(message.body()).unwrap().resources;
        assert_eq!(decode(s2.sotw_message(&all, true).0), vec![beat], "a client holding the body gets the heartbeat");
        assert_eq!(decode(s2.sotw_message(&all, false).0), vec![body("1", 1)], "a new client gets the body");
        assert_eq!(decode(s2.sotw_message(&Interest::names(["a"]), true).0).len(), 1);

        let delta_beat = &s2.heartbeats["a"].delta_field;
        let decoded = DeltaDiscoveryResponse::decode(s2.delta_body(&[], &[delta_beat], &[], &[])).unwrap();
        assert_eq!(decoded.resources[0].name, "a");
        assert_eq!(decoded.resources[0].version, s2.get("a").unwrap().version, "the version the client holds");
        assert_eq!((decoded.resources[0].resource.clone(), decoded.resources[0].ttl), (None, ttl(30)));

        // The next state with new content carries no heartbeat; a heartbeat with nothing held
        // under its name is cached as it came.
        let s3 = s2.apply(response(xds::ENDPOINT, "v2", vec![body("2", 2)]), &all).unwrap().unwrap();
        assert!(s3.heartbeats.is_empty());
        let orphan = wrapper(DeltaResource { name: "z".into(), ttl: ttl(30), ..Default::default() });
        let fresh =
            KeyState::empty(xds::ENDPOINT).apply(response(xds::ENDPOINT, "v1", vec![orphan]), &all).unwrap().unwrap();
        assert!(fresh.heartbeats.is_empty() && fresh.get("z").unwrap().bodyless);

        // A delta origin's heartbeat: the same, and forwarded states keep it for followers.
        let with_ttl = |resource: Option<Any>| DeltaDiscoveryResponse {
            type_url: xds::ENDPOINT.into(),
            resources: vec![DeltaResource {
                name: "a".into(),
                version: "o1".into(),
                resource,
                ttl: ttl(9),
                ..Default::default()
            }],
            ..Default::default()
        };
        let d1 = KeyState::empty(xds::ENDPOINT).apply_delta(with_ttl(Some(cla("a", 1))), &all).unwrap().unwrap();
        let d2 = d1.apply_delta(with_ttl(None), &all).unwrap().unwrap();
        assert!(d2.heartbeats.contains_key("a") && d2.content_serial == d1.content_serial);
        let forwarded = DiscoveryResponse::decode(d2.sotw_message(&all, true).0.body()).unwrap();
        let follower = d1.replace(forwarded, &all).unwrap().unwrap();
        assert!(follower.heartbeats.contains_key("a"), "a follower holding the body sees the heartbeat");
    }

    #[test]
    fn do_not_cache_resources_reach_only_clients_that_asked_before_they_arrived() {
        let all = Interest::wildcard();
        let secret = |weight| {
            wrapper(DeltaResource {
                name: "a".into(),
                resource: Some(cla("a", weight)),
                cache_control: Some(envoy_types::pb::envoy::service::discovery::v3::resource::CacheControl {
                    do_not_cache: true,
                }),
                ..Default::default()
            })
        };
        let asked = Instant::now();
        let s1 = KeyState::empty(xds::ENDPOINT)
            .apply(response(xds::ENDPOINT, "v1", vec![secret(1), cla("b", 1)]), &all)
            .unwrap()
            .unwrap();
        assert!(s1.uncacheable && s1.get("a").unwrap().do_not_cache && !s1.get("b").unwrap().do_not_cache);
        assert!(s1.fresh_for(&all, asked), "asked before it arrived");
        let later = Instant::now() + std::time::Duration::from_millis(1);
        assert!(!s1.fresh_for(&all, later), "never from cache to a client that asked later");
        assert!(s1.fresh_for(&Interest::names(["b"]), later), "cacheable resources are served from cache");

        let s2 =
            s1.apply(response(xds::ENDPOINT, "v1", vec![secret(1), cla("b", 1)]), &all).unwrap().expect("a fresh copy");
        assert_eq!(
            (s2.serial, s2.content_serial),
            (s1.serial, s1.content_serial),
            "clients that have it see nothing new"
        );
        assert!(!Arc::ptr_eq(s2.get("a").unwrap(), s1.get("a").unwrap()), "never reused from the earlier state");
        assert!(Arc::ptr_eq(s2.get("b").unwrap(), s1.get("b").unwrap()));
        assert!(s2.get("a").unwrap().arrived >= s1.get("a").unwrap().arrived);
    }

    #[test]
    fn a_follower_dates_do_not_cache_resources_as_the_owner_received_them() {
        let all = Interest::wildcard();
        let secret = wrapper(DeltaResource {
            name: "a".into(),
            resource: Some(cla("a", 1)),
            cache_control: Some(envoy_types::pb::envoy::service::discovery::v3::resource::CacheControl {
                do_not_cache: true,
            }),
            ..Default::default()
        });
        let owner_received = Instant::now();
        let client_asked = owner_received + std::time::Duration::from_millis(5);
        let forwarded = response(xds::ENDPOINT, "v1", vec![secret]);
        let dated =
            KeyState::empty(xds::ENDPOINT).replace_dated(forwarded.clone(), &all, owner_received).unwrap().unwrap();
        assert!(!dated.fresh_for(&all, client_asked), "an old copy forwarded later is still old");
        let fresh = KeyState::empty(xds::ENDPOINT).replace(forwarded, &all).unwrap().unwrap();
        assert!(fresh.fresh_for(&all, owner_received));
    }

    #[test]
    fn the_first_response_of_a_new_stream_drops_do_not_cache_resources_it_does_not_resend() {
        let ab = Interest::names(["a", "b"]);
        let secret = |name: &str| {
            wrapper(DeltaResource {
                name: name.into(),
                resource: Some(cla(name, 1)),
                cache_control: Some(envoy_types::pb::envoy::service::discovery::v3::resource::CacheControl {
                    do_not_cache: true,
                }),
                ..Default::default()
            })
        };
        let s1 = KeyState::empty(xds::ENDPOINT)
            .apply(response(xds::ENDPOINT, "v1", vec![secret("a"), cla("b", 1)]), &ab)
            .unwrap()
            .unwrap();
        let merged = s1.apply(response(xds::ENDPOINT, "v2", vec![cla("b", 2)]), &ab).unwrap().unwrap();
        assert!(merged.get("a").is_some(), "a later response on the same stream merges");
        let first = s1.apply_first(response(xds::ENDPOINT, "v2", vec![cla("b", 2)]), &ab).unwrap().unwrap();
        assert!(first.get("a").is_none(), "a new stream that does not resend it: gone");
        assert!(!first.uncacheable);

        let d1 = KeyState::empty(xds::ENDPOINT)
            .apply_delta(
                DeltaDiscoveryResponse {
                    type_url: xds::ENDPOINT.into(),
                    resources: vec![
                        DeltaResource::decode(secret("a").value.as_slice()).unwrap(),
                        DeltaResource {
                            name: "b".into(),
                            version: "1".into(),
                            resource: Some(cla("b", 1)),
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
                &ab,
            )
            .unwrap()
            .unwrap();
        let d2 = d1.apply_delta_first(delta("d2", vec![("b", cla("b", 2))], &[]), &ab).unwrap().unwrap();
        assert!(d2.get("a").is_none() && d2.get("b").is_some());
    }

    #[test]
    fn errors_are_one_per_name_in_name_order_and_follow_the_coverage() {
        let mut first = response(xds::ENDPOINT, "v1", vec![]);
        first.resource_errors =
            vec![resource_error("c", 14, "x"), resource_error("a", 14, "y"), resource_error("c", 7, "z")];
        let state = KeyState::empty(xds::ENDPOINT).apply(first, &Interest::names(["a", "c"])).unwrap().unwrap();
        assert_eq!(state.meta.resource_errors, vec![resource_error("a", 14, "y"), resource_error("c", 7, "z")]);
        let mut reordered = response(xds::ENDPOINT, "v1", vec![]);
        reordered.resource_errors = vec![resource_error("c", 7, "z"), resource_error("a", 14, "y")];
        assert!(
            state.apply(reordered, &Interest::names(["a", "c"])).unwrap().is_none(),
            "same errors in another order"
        );
        assert_eq!(state.errors_for(&Interest::names(["c"])), vec![&resource_error("c", 7, "z")]);

        let ab = Interest::names(["a", "b"]);
        let mut d = delta("d1", vec![], &[]);
        d.resource_errors = vec![resource_error("a", 14, "x"), resource_error("b", 5, "gone")];
        let d1 = KeyState::empty(xds::ENDPOINT).apply_delta(d, &ab).unwrap().unwrap();
        assert_eq!(d1.meta.resource_errors.len(), 2, "NOT_FOUND is kept for clients to see");
        let d2 =
            d1.apply_delta(delta("d2", vec![("c", cla("c", 1))], &[]), &Interest::names(["b", "c"])).unwrap().unwrap();
        assert_eq!(d2.meta.resource_errors, vec![resource_error("b", 5, "gone")], "a's error left with a");
    }
}
