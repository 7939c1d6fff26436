//! The end-to-end tests: real relay and example-server processes on loopback (and, in
//! `inprocess`, relay nodes started in this process on listeners they bind themselves).
//!
//! One test binary with a module per area, so the suite links once: `cargo nextest run --test
//! e2e`, or one area with a filter (`-E 'test(/^cluster::/)'`).

mod support;

mod admin_security;
mod cache_churn;
mod cardinality;
mod cli;
mod cluster;
mod config_files;
mod conformance;
mod dynamic_parameters;
mod example_extras;
mod gossip;
mod inprocess;
mod limits_connections;
mod limits_requests;
mod metrics;
mod on_demand;
mod origin_pool;
mod origin_validation;
mod passthrough;
mod peer_security;
mod persist;
mod properties;
mod relay;
mod rollout;
mod rotation;
mod tls;
mod traces;
mod xdstp;
