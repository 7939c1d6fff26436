//! Sealed gossip datagrams: the wire format, sealing, opening, the replay guard and the
//! counters. Pure (no I/O); the sockets live in the private `sealed` module.
//!
//! # Datagram format (version 1)
//!
//! ```text
//! offset  size  field
//!      0     1  version = 1
//!      1     4  key id: first 4 bytes of SHA-256 of the sealing key
//!      5     8  timestamp: sender's wall clock, milliseconds since the Unix epoch, big endian
//!     13    12  nonce: 96 random bits, fresh for every datagram
//!     25     n  ciphertext: the chitchat datagram sealed with ChaCha20-Poly1305
//!   25+n    16  Poly1305 tag
//! ```
//!
//! The additional authenticated data is the 25-byte header followed by the cluster id, so the
//! key id, timestamp and nonce cannot be altered and a datagram of another cluster sharing the
//! key does not open. Overhead: **41 bytes** per datagram. chitchat sizes its datagrams up to
//! 65,507 bytes (the IPv4 UDP maximum); a sealed datagram whose plaintext exceeds
//! 65,466 bytes cannot be sent (counted as `oversize` on the way out, logged). A node state
//! near 64 KiB is far beyond what the relay gossips (a few addresses and states per node).
//!
//! # Threat model
//!
//! Protected, against anyone who does not hold a cluster key: confidentiality of the gossiped
//! state; integrity and authenticity of every datagram (no forged members, no rewritten peer
//! addresses, no injected state); replays of recorded datagrams (see below); datagrams of
//! plaintext chitchat nodes or of another cluster id. Not protected: key holders are trusted
//! completely (a node with the key can gossip anything, as in memberlist/Serf); traffic
//! analysis (who gossips with whom, datagram sizes and rates reveal the membership); denial of
//! service by flooding the gossip port (rejections are cheap and counted, not prevented).
//!
//! # Nonces and key lifetime
//!
//! Nonces are 96 random bits from the system's secure generator (as memberlist does with
//! AES-GCM). A repeated nonce under one key would leak the XOR of two plaintexts and allow
//! forgeries, so a key must seal well under 2^32 datagrams: the chance of any repeat after
//! `n` datagrams is about n²/2^97. A cluster sealing 5,000 datagrams per second (about a
//! hundred nodes at the default interval) reaches 2^32 datagrams in about ten days, where that
//! chance is 2^-33; rotating the key monthly keeps it below 2^-29.
//!
//! # Replay window and its memory bound
//!
//! A datagram is accepted only if its timestamp is within `replay_window` (default 30 s) of the
//! receiver's clock, in both directions, so node clocks must agree within that window (NTP).
//! The nonce and timestamp of every accepted datagram are remembered until the timestamp
//! leaves the window; a second datagram with the same pair is a `replay`. The set is global,
//! not per source address (a replay may come from any address). It holds at most
//! [`REPLAY_CAPACITY`] entries (about 80 bytes each, so about 5 MiB at most): when full, the
//! oldest entry is dropped and the acceptance floor is raised to its timestamp, so the window
//! narrows under an extreme datagram rate instead of ever accepting a replay. At the default
//! 200 ms gossip interval a node receives a few tens of datagrams per second per handful of
//! peers, far below the capacity for clusters of hundreds of nodes.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{Aad, NONCE_LEN, Nonce};

use crate::keyring::{KEY_ID_LEN, Keyring};

/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Bytes of the header (version, key id, timestamp, nonce).
pub const HEADER_LEN: usize = 1 + KEY_ID_LEN + 8 + NONCE_LEN;
/// Bytes of the authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed datagram adds to the chitchat datagram.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// The largest datagram sent or accepted: the IPv4 UDP payload maximum.
pub const MAX_DATAGRAM_LEN: usize = 65_507;
/// The most nonces remembered by the replay guard (see the module docs).
pub const REPLAY_CAPACITY: usize = 65_536;
/// chitchat's wire magic (45139, little endian): how a plaintext chitchat datagram starts.
const CHITCHAT_MAGIC: [u8; 2] = 45_139u16.to_le_bytes();

/// Why a received gossip datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Too short, or an unknown format version.
    Malformed,
    /// A plaintext chitchat datagram (an unsealed node).
    Plaintext,
    /// Larger than [`MAX_DATAGRAM_LEN`].
    Oversize,
    /// Sealed with a key this node does not hold.
    NoKey,
    /// The tag does not verify: tampered, another cluster id, or garbage with a known key id.
    BadSeal,
    /// The timestamp is outside the replay window (too old, or too far in the future).
    Stale,
    /// The same nonce and timestamp were already accepted.
    Replay,
    /// Arrived on the loopback side from a socket this node does not own (a local process
    /// writing to the internal chitchat socket).
    Loopback,
}

impl RejectReason {
    /// Every reason, in a fixed order.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::Malformed,
        RejectReason::Plaintext,
        RejectReason::Oversize,
        RejectReason::NoKey,
        RejectReason::BadSeal,
        RejectReason::Stale,
        RejectReason::Replay,
        RejectReason::Loopback,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::Plaintext => "plaintext",
            RejectReason::Oversize => "oversize",
            RejectReason::NoKey => "no_key",
            RejectReason::BadSeal => "bad_seal",
            RejectReason::Stale => "stale",
            RejectReason::Replay => "replay",
            RejectReason::Loopback => "loopback",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Seals `plaintext` into `out` (cleared first) with the keyring's primary key, stamped with
/// `timestamp_ms` and `nonce` (which must never repeat under one key: the transport draws it
/// from the system's secure random generator).
///
/// # Errors
///
/// [`RejectReason::Oversize`] when the sealed datagram would exceed [`MAX_DATAGRAM_LEN`].
pub fn seal(
    keyring: &Keyring,
    cluster_id: &[u8],
    timestamp_ms: u64,
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), RejectReason> {
    if plaintext.len() + OVERHEAD > MAX_DATAGRAM_LEN {
        return Err(RejectReason::Oversize);
    }
    let key = keyring.primary();
    out.clear();
    out.push(VERSION);
    out.extend_from_slice(&key.id);
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out.extend_from_slice(&nonce);
    let aad = aad(&out[..HEADER_LEN], cluster_id);
    out.extend_from_slice(plaintext);
    let tag = key
        .aead
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut out[HEADER_LEN..])
        // ring fails only beyond ~256 GiB of plaintext.
        .map_err(|_| RejectReason::Oversize)?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

/// An authentic datagram: its header fields and where the plaintext lies in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The sender's timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The datagram's nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Where the decrypted chitchat datagram lies in the opened buffer.
    pub plaintext: Range<usize>,
}

/// Checks the format and the seal of `datagram` with any key of `keyring`, decrypting it in
/// place. Freshness and replays are checked separately, by the transport's replay guard.
///
/// # Errors
///
/// The [`RejectReason`] of a datagram that does not open.
pub fn open(keyring: &Keyring, cluster_id: &[u8], datagram: &mut [u8]) -> Result<Opened, RejectReason> {
    if datagram.len() > MAX_DATAGRAM_LEN {
        return Err(RejectReason::Oversize);
    }
    if datagram.starts_with(&CHITCHAT_MAGIC) {
        return Err(RejectReason::Plaintext);
    }
    if datagram.len() < OVERHEAD || datagram[0] != VERSION {
        return Err(RejectReason::Malformed);
    }
    let key_id: [u8; KEY_ID_LEN] = datagram[1..5].try_into().map_err(|_| RejectReason::Malformed)?;
    let timestamp_ms = u64::from_be_bytes(datagram[5..13].try_into().map_err(|_| RejectReason::Malformed)?);
    let nonce: [u8; NONCE_LEN] = datagram[13..HEADER_LEN].try_into().map_err(|_| RejectReason::Malformed)?;
    let key = keyring.find(key_id).ok_or(RejectReason::NoKey)?;
    let aad = aad(&datagram[..HEADER_LEN], cluster_id);
    let plaintext_len = key
        .aead
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut datagram[HEADER_LEN..])
        .map_err(|_| RejectReason::BadSeal)?
        .len();
    Ok(Opened { timestamp_ms, nonce, plaintext: HEADER_LEN..HEADER_LEN + plaintext_len })
}

fn aad(header: &[u8], cluster_id: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + cluster_id.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(cluster_id);
    aad
}

/// Rejects stale and replayed datagrams (see the module docs). Owned by one task.
#[derive(Debug)]
pub(crate) struct ReplayGuard {
    window_ms: u64,
    capacity: usize,
    /// Datagrams with a timestamp at or below this are stale (raised when the set overflows).
    floor_ms: u64,
    seen: BTreeSet<(u64, [u8; NONCE_LEN])>,
}

impl ReplayGuard {
    pub(crate) fn new(window_ms: u64, capacity: usize) -> Self {
        ReplayGuard { window_ms, capacity: capacity.max(1), floor_ms: 0, seen: BTreeSet::new() }
    }

    /// Accepts a fresh, first-seen datagram and remembers it.
    pub(crate) fn check(&mut self, timestamp_ms: u64, nonce: [u8; NONCE_LEN], now_ms: u64) -> Result<(), RejectReason> {
        let oldest_fresh = now_ms.saturating_sub(self.window_ms);
        while let Some(first) = self.seen.first()
            && first.0 < oldest_fresh
        {
            self.seen.pop_first();
        }
        if timestamp_ms < oldest_fresh
            || timestamp_ms > now_ms.saturating_add(self.window_ms)
            || (self.floor_ms > 0 && timestamp_ms <= self.floor_ms)
        {
            return Err(RejectReason::Stale);
        }
        if !self.seen.insert((timestamp_ms, nonce)) {
            return Err(RejectReason::Replay);
        }
        while self.seen.len() > self.capacity {
            if let Some((evicted, _)) = self.seen.pop_first() {
                self.floor_ms = self.floor_ms.max(evicted);
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

/// Counters of the sealed gossip transport, shared with [`Cluster::gossip_stats`](crate::Cluster::gossip_stats).
#[derive(Debug, Default)]
pub(crate) struct GossipCounters {
    pub(crate) received: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) send_failures: AtomicU64,
    pub(crate) key_reload_failures: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
}

impl GossipCounters {
    pub(crate) fn reject(&self, reason: RejectReason) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, keyring: &Keyring) -> GossipStats {
        GossipStats {
            sealed: true,
            key_ids: keyring.key_ids(),
            datagrams_received: self.received.load(Ordering::Relaxed),
            datagrams_sent: self.sent.load(Ordering::Relaxed),
            send_failures: self.send_failures.load(Ordering::Relaxed),
            key_reload_failures: self.key_reload_failures.load(Ordering::Relaxed),
            rejected: RejectReason::ALL.map(|r| (r, self.rejected[r.index()].load(Ordering::Relaxed))),
        }
    }
}

/// Counts of the gossip transport since the node joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipStats {
    /// Whether gossip is sealed (a key file is configured). When false every count is 0.
    pub sealed: bool,
    /// The ids of the installed keys (hex), the sealing key first; empty when plaintext.
    pub key_ids: Vec<String>,
    /// Sealed datagrams received, opened and handed to gossip.
    pub datagrams_received: u64,
    /// Sealed datagrams sent.
    pub datagrams_sent: u64,
    /// Datagrams that could not be sealed or sent (oversize, socket errors).
    pub send_failures: u64,
    /// Key file changes that could not be installed (unreadable file, invalid key); the keys
    /// in force stay. Counted once per distinct error.
    pub key_reload_failures: u64,
    /// Datagrams received and dropped, by reason (every reason listed, in [`RejectReason::ALL`] order).
    pub rejected: [(RejectReason, u64); RejectReason::ALL.len()],
}

impl Default for GossipStats {
    fn default() -> Self {
        GossipStats {
            sealed: false,
            key_ids: Vec::new(),
            datagrams_received: 0,
            datagrams_sent: 0,
            send_failures: 0,
            key_reload_failures: 0,
            rejected: RejectReason::ALL.map(|r| (r, 0)),
        }
    }
}

impl GossipStats {
    /// The count of datagrams dropped for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn sealed(keyring: &Keyring, cluster: &str, timestamp: u64, nonce: u8, plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        seal(keyring, cluster.as_bytes(), timestamp, [nonce; NONCE_LEN], plaintext, &mut out).unwrap();
        out
    }

    #[test]
    fn seal_then_open_round_trips_with_any_installed_key() {
        let old = Keyring::from_keys(&[[1; 32]]);
        let both = Keyring::from_keys(&[[2; 32], [1; 32]]);
        let mut datagram = sealed(&old, "c", NOW, 7, b"chitchat bytes");
        assert_eq!(datagram.len(), b"chitchat bytes".len() + OVERHEAD);
        assert_eq!(datagram[0], VERSION);
        assert!(!datagram.windows(8).any(|w| w == b"chitchat"), "the payload is encrypted");
        let opened = open(&both, b"c", &mut datagram).unwrap();
        assert_eq!(&datagram[opened.plaintext.clone()], b"chitchat bytes");
        assert_eq!((opened.timestamp_ms, opened.nonce), (NOW, [7; NONCE_LEN]));
    }

    #[test]
    fn open_rejects_each_kind_of_bad_datagram() {
        let keyring = Keyring::from_keys(&[[1; 32]]);
        let good = sealed(&keyring, "c", NOW, 1, b"payload");
        let other = Keyring::from_keys(&[[3; 32]]);
        let cases: Vec<(Vec<u8>, &Keyring, &str, RejectReason)> = vec![
            (vec![], &keyring, "c", RejectReason::Malformed),
            (good[..OVERHEAD - 1].to_vec(), &keyring, "c", RejectReason::Malformed),
            ([&[9u8][..], &good[1..]].concat(), &keyring, "c", RejectReason::Malformed),
            ([&CHITCHAT_MAGIC[..], &[0, 0]].concat(), &keyring, "c", RejectReason::Plaintext),
            (vec![1; MAX_DATAGRAM_LEN + 1], &keyring, "c", RejectReason::Oversize),
            (good.clone(), &other, "c", RejectReason::NoKey),
            (good.clone(), &keyring, "other-cluster", RejectReason::BadSeal),
        ];
        for (mut datagram, keyring, cluster, expected) in cases {
            assert_eq!(open(keyring, cluster.as_bytes(), &mut datagram), Err(expected));
        }
        // Any flipped bit, in the header or the body, breaks the seal.
        for index in [6, 14, HEADER_LEN, good.len() - 1] {
            let mut tampered = good.clone();
            tampered[index] ^= 0x01;
            assert_eq!(open(&keyring, b"c", &mut tampered), Err(RejectReason::BadSeal), "byte {index}");
        }
    }

    #[test]
    fn seal_refuses_oversize_plaintext() {
        let keyring = Keyring::from_keys(&[[1; 32]]);
        let mut out = Vec::new();
        let max = vec![0; MAX_DATAGRAM_LEN - OVERHEAD];
        seal(&keyring, b"c", NOW, [0; 12], &max, &mut out).unwrap();
        assert_eq!(out.len(), MAX_DATAGRAM_LEN);
        assert_eq!(
            seal(&keyring, b"c", NOW, [0; 12], &[0; MAX_DATAGRAM_LEN - OVERHEAD + 1], &mut out),
            Err(RejectReason::Oversize)
        );
    }

    #[test]
    fn replay_guard_rejects_stale_future_and_repeated_datagrams() {
        let mut guard = ReplayGuard::new(30_000, 100);
        guard.check(NOW, [1; 12], NOW).unwrap();
        assert_eq!(guard.check(NOW, [1; 12], NOW + 10), Err(RejectReason::Replay));
        guard.check(NOW, [2; 12], NOW).unwrap();
        assert_eq!(guard.check(NOW - 30_001, [3; 12], NOW), Err(RejectReason::Stale));
        assert_eq!(guard.check(NOW + 30_001, [3; 12], NOW), Err(RejectReason::Stale));
        guard.check(NOW - 30_000, [3; 12], NOW).unwrap();
        // Entries leave the set once their timestamp leaves the window; by then the datagram
        // itself is stale, so forgetting it never lets a replay through.
        assert_eq!(guard.check(NOW, [1; 12], NOW + 30_001), Err(RejectReason::Stale));
        assert_eq!(guard.len(), 0);
    }

    #[test]
    fn a_full_replay_guard_narrows_its_window_instead_of_forgetting() {
        let mut guard = ReplayGuard::new(30_000, 3);
        for (i, t) in [NOW - 3, NOW - 2, NOW - 1, NOW].into_iter().enumerate() {
            guard.check(t, [i as u8; 12], NOW).unwrap();
        }
        assert_eq!(guard.len(), 3);
        // The evicted datagram (NOW - 3) is now below the floor: stale, not accepted again.
        assert_eq!(guard.check(NOW - 3, [0; 12], NOW), Err(RejectReason::Stale));
        assert_eq!(guard.check(NOW - 1, [2; 12], NOW), Err(RejectReason::Replay));
        guard.check(NOW, [9; 12], NOW).unwrap();
    }

    #[test]
    fn counters_snapshot_every_reason() {
        let counters = GossipCounters::default();
        counters.reject(RejectReason::Replay);
        counters.reject(RejectReason::Replay);
        counters.sent.fetch_add(3, Ordering::Relaxed);
        let stats = counters.snapshot(&Keyring::from_keys(&[[1; 32]]));
        assert!(stats.sealed);
        assert_eq!(stats.key_ids, [crate::keyring::hex(&crate::keyring::key_id(&[1; 32]))]);
        assert_eq!(stats.rejected(RejectReason::Replay), 2);
        assert_eq!(stats.rejected(RejectReason::NoKey), 0);
        assert_eq!(stats.datagrams_sent, 3);
        let labels: Vec<&str> = stats.rejected.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(labels, ["malformed", "plaintext", "oversize", "no_key", "bad_seal", "stale", "replay", "loopback"]);
    }
}
