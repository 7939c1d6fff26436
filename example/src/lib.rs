//! Example xDS management server and xDS SotW test client for xds-relay.
//!
//! Modules, with dependencies pointing one way
//! (`snapshot → publisher → sotw → registry → server → stats`, `client` beside them):
//!
//! - [`snapshot`]: builds the example resources (clusters, endpoints, listeners, routes, and
//!   API listeners for proxyless gRPC); pure.
//! - [`publisher`]: versions and publishes snapshots through a latest-wins watch channel.
//! - [`sotw`]: the per-stream SotW protocol rules (subscriptions, wildcard, nonces, ACK/NACK,
//!   pushes); pure and synchronous.
//! - [`registry`]: counters and the table of open streams behind `/stats`.
//! - [`server`]: the gRPC management server (ADS and per-type SotW services).
//! - [`stats`]: the HTTP endpoint (`/stats`, `/publish`, `/healthz`).
//! - [`client`]: a SotW xDS client that records responses and ACKs or NACKs them, for tests
//!   and load generation.
//! - [`duration`]: parses `500ms` / `10s` / `1m` command-line intervals.
//! - [`harness`]: runs a management server in-process on loopback listeners, for tests.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod client;
pub mod duration;
pub mod harness;
pub mod publisher;
pub mod registry;
pub mod server;
pub mod snapshot;
pub mod sotw;
pub mod stats;
