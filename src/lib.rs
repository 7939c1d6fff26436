//! xds-relay: a caching, aggregating and fan-out relay for Envoy's xDS protocol.
//!
//! Downstream clients (Envoy proxies, proxyless gRPC) connect to the relay; every request is
//! mapped to an aggregation key by user rules, the relay keeps one upstream subscription per
//! key, caches the latest state and fans it out to every client watching the key.
//!
//! Modules, with dependencies pointing one way (`config → keyer → source → status → cache → upstream |
//! peer | downstream → rollout → relay`, `admin` and `telemetry` at the edge):
//!
//! - [`xds`]: type URLs, gRPC method paths and protocol vocabulary.
//! - [`config`]: the bootstrap and aggregation-rules YAML files, loaded and validated.
//! - [`keyer`]: maps a request to its aggregation key with the rules.
//! - [`constraints`]: xDS-TP2 dynamic parameters and the constraints of resource variants.
//! - [`wire`]: encodes responses once and reads resource names without decoding.
//! - [`xdstp`]: `xdstp://` names (xDS-TP1): canonical spelling and glob collections.
//! - [`cache`]: the latest state per key, its watchers and the union of their names; generic
//!   over its hooks, it knows no telemetry type ([`node_cache`] binds it to the node's metrics).
//! - [`backoff`]: jittered exponential backoff.
//! - [`upstream`]: one subscription per key to the origin management server, over a pool of
//!   HTTP/2 connections per origin address.
//! - [`downstream`]: the xDS server clients connect to.
//! - [`peer`]: the protocol between relay nodes (owner and follower sides, peer identities,
//!   ring admission).
//! - [`source`]: where a key's state comes from (origin or owner node): the choice as a
//!   pure function, the entry's source cell, make-before-break handoffs, freshness.
//! - [`persist`]: last-known-good key states on disk (`cache.persist_dir`): one record file
//!   per key written off the apply path, read back at start and served marked stale.
//! - [`rollout`]: staged rollout per key: canaries, the NACK gate, promote and abort.
//! - [`relay`]: starts and switches each key's source; cache housekeeping; the one hook from
//!   an accepted state to the store.
//! - [`status`]: what a node reports about its keys (admin API, other nodes), in its own types.
//! - [`listener`]: accepting connections on every listener, with their bounds.
//! - [`tls`]: TLS for every listener and client link, with certificate reload.
//! - [`admin`]: the admin HTTP API and Prometheus metrics endpoint.
//! - [`telemetry`]: logging with a run-time level, and the metrics registry.
//! - [`app`]: assembles and runs a relay node.
//! - `fuzzing` (hidden): entry points of the fuzz targets and property tests.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod app;
pub mod backoff;
pub mod cache;
pub mod config;
pub mod constraints;
pub mod downstream;
#[doc(hidden)]
pub mod fuzzing;
pub mod keyer;
pub mod limit;
pub mod listener;
pub mod node_cache;
pub mod peer;
pub mod persist;
pub mod relay;
pub mod rollout;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod wire;
pub mod xds;
pub mod xdstp;
