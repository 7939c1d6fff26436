//! Example xDS management server, xDS test clients (SotW and delta) and a load generator for
//! xds-relay.
//!
//! Modules, with dependencies pointing one way
//! (`snapshot → publisher → sotw → delta → registry → stream_task → delta_server → server →
//! stats`, and `xds_client → client, delta_client` and `loadgen` beside them, both over `grpc`):
//!
//! - [`snapshot`]: builds the example resources (clusters, endpoints, listeners, routes, and
//!   API listeners for proxyless gRPC); pure.
//! - [`extras`]: TTLs and heartbeats, `do_not_cache`, resource errors, `xdstp://` resources
//!   and dynamic-parameter variants layered on each snapshot (`--ttl`, `POST /extras`, ...).
//! - [`constraints`]: evaluates TP2 dynamic-parameter constraints; pure.
//! - [`tp1`]: xDS-TP1 names: sorted context parameters and glob collections; pure.
//! - [`selection`]: which resources and errors one subscription gets; pure.
//! - [`publisher`]: versions and publishes snapshots through a latest-wins watch channel.
//! - [`sotw`]: the per-stream SotW protocol rules (subscriptions, wildcard, nonces, ACK/NACK,
//!   pushes); pure and synchronous.
//! - [`delta`]: the per-stream delta protocol rules (subscriptions, wildcard, held versions,
//!   diffs, removals) and resource versions; pure and synchronous.
//! - `stream_task`: the task of every server stream, SotW or delta, with the protocol
//!   differences behind one trait.
//! - [`delta_server`]: the delta side of the server's streams, and the per-publish versions.
//! - [`registry`]: counters and the table of open streams behind `/stats`.
//! - [`server`]: the gRPC management server (ADS and per-type, SotW and delta services).
//! - [`stats`]: the HTTP endpoint (`/stats`, `/publish`, `/healthz`).
//! - [`xds_client`]: what the SotW and delta clients share (streams, recording, ACK/NACK
//!   answers, waits), with the protocol differences behind one trait.
//! - [`client`]: a SotW xDS client that records responses and ACKs or NACKs them, for tests
//!   and load generation.
//! - [`delta_client`]: a delta xDS client that records responses, keeps its view of each type,
//!   and ACKs or NACKs them, for tests.
//! - [`loadgen`]: opens many SotW or delta streams against any xDS server and measures fan-out
//!   spread, end-to-end latency and throughput (the `xds-loadgen` binary).
//! - [`grpc`]: the streaming calls of the discovery services (SotW and delta, ADS and
//!   per-type), shared by the clients and `loadgen`.
//! - [`duration`]: parses `500ms` / `10s` / `1m` command-line intervals (Go durations, with the
//!   relay's parser, or integer seconds).
//! - [`harness`]: runs a management server in-process on loopback listeners, for tests.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod client;
pub mod constraints;
pub mod delta;
pub mod delta_client;
pub mod delta_server;
pub mod duration;
pub mod extras;
pub mod grpc;
pub mod harness;
pub mod loadgen;
pub mod publisher;
pub mod registry;
pub mod selection;
pub mod server;
pub mod snapshot;
pub mod sotw;
pub mod stats;
mod stream_task;
pub mod tp1;
pub mod xds_client;
