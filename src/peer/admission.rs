//! Ring admission: with cluster TLS, a member is placed on this node's ring only once this
//! node has seen the member's peer certificate name it.
//!
//! For every unverified entry of the cluster view (a name, a generation and a gossiped peer
//! address), the task dials the peer address with a verifier that accepts only a certificate
//! of the cluster CA naming that member ([`MemberVerifier`](super::identity::MemberVerifier),
//! through [`PeerChannels::dial`]), and asks `Identify`: the answer must be the same name and
//! generation. Only then is the entry marked verified in the cluster
//! ([`Cluster::mark_verified`]), which lets it win its name and join the ring. So a process
//! that claims a member's name in gossip but holds another certificate never gets the
//! member's ring slot, and one that advertises the real member's peer address is exposed by
//! the generation the real member reports. A new generation or a changed peer address is a new
//! entry and is verified again.
//!
//! Invariants: at most one probe per entry at a time and [`MAX_PROBES`] in all; a failed entry
//! is retried with exponential backoff ([`RETRY_INITIAL`] to [`RETRY_MAX`]); the task and its
//! probes stop with the node's shutdown token. Results count in
//! `member_verifications_total{result}`; entries waiting count in `members_unverified`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xds_relay_cluster::{Cluster, ClusterView, Member};

use super::PeerChannels;
use super::proto::IdentifyRequest;
use super::proto::peer_client::PeerClient;
use crate::backoff::Backoff;
use crate::telemetry::Metrics;

/// Probes running at once, over all entries.
pub const MAX_PROBES: usize = 4;
/// First retry delay of an entry whose probe failed.
pub const RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Longest retry delay of an entry whose probe keeps failing.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one probe (connect, handshake, `Identify`) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the task looks at due retries when the view does not change.
const TICK: Duration = Duration::from_millis(250);

/// One gossip entry to verify.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Candidate {
    /// The name the entry claims.
    pub name: String,
    /// Its generation.
    pub generation: u64,
    /// Its gossiped peer address.
    pub peer_addr: SocketAddr,
}

/// Why a probe did not verify an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// No TLS session or no answer: the certificate was refused, or the address is unreachable.
    #[error("{addr}: {message}")]
    Unreachable {
        /// The peer address.
        addr: SocketAddr,
        /// The transport's message (names the certificate problem when there is one).
        message: String,
    },
    /// No answer within the probe timeout.
    #[error("{addr}: no answer within {PROBE_TIMEOUT:?}")]
    Timeout {
        /// The peer address.
        addr: SocketAddr,
    },
    /// The process at the address is another member or another generation.
    #[error("{addr} answers as {node} generation {generation}, not {expected} generation {expected_generation}")]
    Mismatch {
        /// The peer address.
        addr: SocketAddr,
        /// The name that answered.
        node: String,
        /// The generation that answered.
        generation: u64,
        /// The name gossiped.
        expected: String,
        /// The generation gossiped.
        expected_generation: u64,
    },
}

/// The entries of `view` waiting for verification: alive, remote, unverified, with a peer
/// address (members and the entries hidden behind a verified member of the same name).
pub fn candidates(view: &ClusterView) -> Vec<Candidate> {
    view.members
        .iter()
        .chain(&view.unverified)
        .filter(|m| !m.verified && m.alive && !m.is_self)
        .filter_map(|m: &Member| {
            Some(Candidate { name: m.name.clone(), generation: m.generation, peer_addr: m.peer_addr? })
        })
        .collect()
}

/// Verifies `candidate`: a TLS session whose certificate names it, and an `Identify` answer
/// with its name and generation.
///
/// # Errors
/// A [`ProbeError`] saying what did not match.
pub async fn probe(channels: &PeerChannels, candidate: &Candidate) -> Result<(), ProbeError> {
    let addr = candidate.peer_addr;
    let mut client = PeerClient::new(channels.dial(addr, &candidate.name));
    let reply = match timeout(PROBE_TIMEOUT, client.identify(IdentifyRequest {})).await {
        Err(_) => return Err(ProbeError::Timeout { addr }),
        Ok(Err(status)) => return Err(ProbeError::Unreachable { addr, message: status_chain(&status) }),
        Ok(Ok(reply)) => reply.into_inner(),
    };
    if reply.node == candidate.name && reply.generation == candidate.generation {
        Ok(())
    } else {
        Err(ProbeError::Mismatch {
            addr,
            node: reply.node,
            generation: reply.generation,
            expected: candidate.name.clone(),
            expected_generation: candidate.generation,
        })
    }
}

/// A status message with the chain of its source errors (the TLS error is deep inside).
fn status_chain(status: &tonic::Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        message.push_str(": ");
        message.push_str(&error.to_string());
        source = error.source();
    }
    message
}

/// Per-entry retry state.
struct Attempt {
    backoff: Backoff,
    next_at: Instant,
    in_flight: bool,
}

/// Starts the admission task of `cluster` (only when it requires verification) until
/// `shutdown`.
pub fn spawn(
    cluster: Cluster,
    channels: PeerChannels,
    metrics: Metrics,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    if !cluster.requires_verification() {
        return;
    }
    tracker.spawn(async move {
        let mut views = cluster.watch();
        let mut attempts: HashMap<Candidate, Attempt> = HashMap::new();
        let mut probes: JoinSet<(Candidate, Result<(), ProbeError>)> = JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = views.changed() => if changed.is_err() { break },
                _ = tick.tick() => {}
                Some(done) = probes.join_next() => {
                    let Ok((candidate, result)) = done else { continue };
                    let Some(attempt) = attempts.get_mut(&candidate) else { continue };
                    attempt.in_flight = false;
                    match result {
                        Ok(()) => {
                            metrics.member_verification(true);
                            cluster.mark_verified(&candidate.name, candidate.generation, candidate.peer_addr);
                            // The view lists the member until its next refresh: no second probe.
                            attempt.next_at = Instant::now() + RETRY_MAX;
                        }
                        Err(error) => {
                            metrics.member_verification(false);
                            let delay = attempt.backoff.next_delay();
                            attempt.next_at = Instant::now() + delay;
                            tracing::warn!(
                                node = %candidate.name, generation = candidate.generation, peer_addr = %candidate.peer_addr,
                                error = %error, retry_in = ?delay,
                                "cluster member not verified: its peer certificate or identity does not match its gossip; kept off the ring"
                            );
                        }
                    }
                }
            }
            let view = cluster.view();
            let waiting = candidates(&view);
            metrics.members_unverified.set(i64::try_from(waiting.len()).unwrap_or(i64::MAX));
            attempts.retain(|candidate, _| waiting.contains(candidate));
            let now = Instant::now();
            for candidate in waiting {
                if probes.len() >= MAX_PROBES {
                    break;
                }
                let attempt = attempts.entry(candidate.clone()).or_insert_with(|| Attempt {
                    backoff: Backoff::new(RETRY_INITIAL, RETRY_MAX),
                    next_at: now,
                    in_flight: false,
                });
                if attempt.in_flight || attempt.next_at > now {
                    continue;
                }
                attempt.in_flight = true;
                let channels = channels.clone();
                probes.spawn(async move {
                    let result = probe(&channels, &candidate).await;
                    (candidate, result)
                });
            }
        }
        probes.shutdown().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_the_live_remote_unverified_entries_with_a_peer_address() {
        let member = |name: &str, generation: u64, verified: bool, alive: bool| Member {
            name: name.to_owned(),
            generation,
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], 7000 + generation as u16)),
            peer_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9000 + generation as u16))),
            admin_addr: None,
            state: xds_relay_cluster::NodeState::Ready,
            alive,
            is_self: false,
            last_heartbeat_age_ms: None,
            extra: Default::default(),
            verified,
        };
        let mut me = member("a", 1, true, true);
        me.is_self = true;
        let mut no_peer = member("d", 4, false, true);
        no_peer.peer_addr = None;
        let view = ClusterView {
            members: vec![me, member("b", 2, false, true), member("c", 3, false, false), no_peer],
            ring: xds_relay_cluster::Ring::build(&["a".to_owned()], 8),
            unverified: vec![member("a", 5, false, true)],
            version: 1,
        };
        let found = candidates(&view);
        let names: Vec<(&str, u64)> = found.iter().map(|c| (c.name.as_str(), c.generation)).collect();
        assert_eq!(names, [("b", 2), ("a", 5)]);
        assert_eq!(found[0].peer_addr, SocketAddr::from(([127, 0, 0, 1], 9002)));
    }
}
