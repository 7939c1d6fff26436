//! xds-relay-cluster: gossip membership, the consistent-hash ring and ownership changes.
//!
//! This crate knows nothing of xDS. It answers one question for the relay: *which live node
//! owns key K right now, and where do I reach it?* It wraps chitchat (scuttlebutt gossip with a
//! phi-accrual failure detector) the way quickwit-cluster does, and keeps everything that can be
//! pure, pure.
//!
//! Modules, with dependencies pointing one way (`member → ring → view → cluster`, `member →
//! keys → cluster`, with `config` and `error` at the edge; everything but `cluster` is pure):
//!
//! - [`config`]: [`ClusterConfig`] and [`FailureDetectorSettings`], their defaults and validation.
//! - `keys` (private): the gossip key names, and the `NodeStateExt` trait that reads them.
//! - [`member`]: [`NodeState`] (the gossiped lifecycle) and [`Member`] (one node as seen from
//!   here); folds chitchat's per-generation entries into one member per node name.
//! - [`ring`]: [`Ring`], a deterministic consistent-hash ring, and [`ownership_changes`], the pure
//!   diff of two rings over a set of keys.
//! - [`view`]: [`ClusterView`], what a node knows of the cluster at one moment.
//! - [`cluster`]: [`Cluster`], the async handle: joins, gossips its own state and publishes a new
//!   view whenever membership, state or liveness changes.
//! - [`error`]: [`ClusterError`], the crate's one error type.
//! - [`keyring`]: [`Keyring`], the shared keys that seal gossip, read from a key file.
//! - [`seal`]: the sealed datagram format, the replay guard and [`GossipStats`] (pure).
//! - `sealed` (private): the chitchat transport that seals and opens datagrams over UDP,
//!   used by [`Cluster::join`] when [`ClusterConfig::gossip_seal`] is set.
//!
//! Invariants the crate keeps:
//!
//! - Every node computes the same [`Ring`] from the same member set: the ring depends only on the
//!   sorted member names and the virtual node count, hashed with a fixed (FNV-1a) hash.
//! - A node is on the ring only while it is alive, gossips [`NodeState::Ready`] and gossips a peer
//!   address.
//! - One [`Member`] per node name: a restarted node (higher generation) replaces its previous
//!   generation, whose dead entry never shows up as a second member.
//! - [`ClusterView::version`] grows by one on every published change, and the view watch fires
//!   only on such changes, never on heartbeats alone.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, missing_docs, clippy::disallowed_methods, clippy::disallowed_types)]

pub mod cluster;
pub mod config;
pub mod error;
pub mod keyring;
mod keys;
pub mod member;
pub mod ring;
pub mod seal;
mod sealed;
pub mod view;

pub use crate::cluster::Cluster;
pub use crate::config::{ClusterConfig, FailureDetectorSettings, GossipSeal, validate_membership};
pub use crate::error::ClusterError;
pub use crate::keyring::{Keyring, KeyringError};
pub use crate::member::{Member, NodeState};
pub use crate::ring::{OwnershipChange, Ring, ownership_changes};
pub use crate::seal::{GossipStats, RejectReason};
pub use crate::view::ClusterView;
