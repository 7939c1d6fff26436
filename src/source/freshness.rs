//! Which origin stream delivered a key's state on this node, so that a follower switching to
//! this node is never sent a state older than the one it already serves.
//!
//! Versions are opaque, so a relay cannot compare the state a follower holds with the state
//! an owner holds. What it can order is time: a state the origin sends on a stream opened
//! after the follower asked is at least as new as anything the follower received before it
//! asked. So a follower that holds state from another source asks for a *fresh* state; the
//! owner then opens a new origin stream for the key (one for every follower that asked
//! before that stream opened) and forwards to that follower only what streams opened since
//! delivered. A stale cache (an owner cut off from the origin, or holding a stream that hung
//! and may still deliver buffered old versions) is never forwarded to such a follower.
//!
//! Epochs count the origin streams opened for the key on this node, from 1.

use tokio::sync::watch;

/// The epochs of a key's origin streams on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Epochs {
    /// The newest origin stream opened (0: none yet).
    pub opened: u64,
    /// The newest stream that delivered an accepted response (0: none yet).
    pub delivered: u64,
    /// The stream a follower waits for: when above `opened`, the subscription opens a new one.
    pub wanted: u64,
}

impl Epochs {
    /// Whether a follower waiting for `epoch` may be sent the current state.
    pub fn satisfies(&self, epoch: u64) -> bool {
        self.delivered >= epoch
    }

    /// Whether the subscription must replace its stream with a newer one.
    pub fn needs_new_stream(&self) -> bool {
        self.wanted > self.opened
    }
}

/// A key's epochs, shared by its origin subscription and the followers it serves.
#[derive(Debug)]
pub struct Freshness {
    tx: watch::Sender<Epochs>,
    /// When the subscription last replaced its stream to refresh the state (rate limit).
    last_refresh: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Default for Freshness {
    fn default() -> Self {
        Self { tx: watch::Sender::new(Epochs::default()), last_refresh: std::sync::Mutex::new(None) }
    }
}

impl Freshness {
    /// The epochs now.
    pub fn epochs(&self) -> Epochs {
        *self.tx.borrow()
    }

    /// Wakes on every change of the epochs.
    pub fn subscribe(&self) -> watch::Receiver<Epochs> {
        self.tx.subscribe()
    }

    /// When the key's origin stream was last replaced to refresh its state; `None`: never.
    pub fn last_refresh(&self) -> Option<tokio::time::Instant> {
        *self.last_refresh.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that the origin stream is being replaced now to refresh the state.
    pub fn note_refresh(&self) {
        *self.last_refresh.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::time::Instant::now());
    }

    /// An origin stream for the key opened; returns its epoch.
    pub fn stream_opened(&self) -> u64 {
        let mut epoch = 0;
        self.tx.send_modify(|e| {
            e.opened += 1;
            epoch = e.opened;
        });
        epoch
    }

    /// The stream of `epoch` delivered a response that the cache accepted.
    pub fn delivered(&self, epoch: u64) {
        self.tx.send_if_modified(|e| {
            let newer = epoch > e.delivered;
            if newer {
                e.delivered = epoch;
            }
            newer
        });
    }

    /// The admin API asks for the key to be refetched: the subscription replaces its stream
    /// with a new one (answered with the origin's current state, applied like any response,
    /// so clients see nothing when it is unchanged). Returns false, asking nothing, when a
    /// stream asked for earlier has not delivered yet: the request joins that refetch (so
    /// refetches of a key run one at a time, whatever the number of requests).
    pub fn request_refetch(&self) -> bool {
        let mut raised = false;
        self.tx.send_if_modified(|e| {
            if e.wanted > e.delivered {
                return false;
            }
            e.wanted = e.opened + 1;
            raised = true;
            true
        });
        raised
    }

    /// A follower needs a state fetched after now: returns the epoch it must wait for, the
    /// next stream to open (shared with every follower that asked before it opens).
    pub fn require_fresh(&self) -> u64 {
        let mut wanted = 0;
        self.tx.send_if_modified(|e| {
            let next = e.opened + 1;
            let raised = next > e.wanted;
            if raised {
                e.wanted = next;
            }
            wanted = e.wanted;
            raised
        });
        wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_waits_for_a_stream_opened_after_it_asked() {
        let f = Freshness::default();
        let first = f.stream_opened();
        f.delivered(first);
        assert!(!f.epochs().needs_new_stream());

        let wanted = f.require_fresh();
        assert_eq!(wanted, 2);
        assert!(f.epochs().needs_new_stream(), "the stream already open is not fresh enough");
        assert!(!f.epochs().satisfies(wanted));
        // A late response of the old stream does not satisfy it.
        f.delivered(first);
        assert!(!f.epochs().satisfies(wanted));

        // A second follower before the new stream opens shares the same epoch.
        assert_eq!(f.require_fresh(), 2);
        let second = f.stream_opened();
        assert_eq!(second, 2);
        assert!(!f.epochs().needs_new_stream());
        assert!(!f.epochs().satisfies(wanted), "opened, but nothing delivered yet");
        f.delivered(second);
        assert!(f.epochs().satisfies(wanted));

        // A follower asking after the new stream opened needs yet another.
        assert_eq!(f.require_fresh(), 3);
        assert!(f.epochs().needs_new_stream());
    }

    #[test]
    fn refetches_run_one_at_a_time_and_later_requests_join_the_pending_one() {
        let f = Freshness::default();
        let first = f.stream_opened();
        f.delivered(first);
        assert!(f.request_refetch(), "nothing pending: a new stream is asked for");
        assert!(f.epochs().needs_new_stream());
        assert!(!f.request_refetch(), "pending: joins it");
        let second = f.stream_opened();
        assert!(!f.request_refetch(), "opened but not delivered: still pending");
        assert!(!f.epochs().needs_new_stream(), "joining never asks for another stream");
        f.delivered(second);
        assert!(f.request_refetch(), "delivered: the next request refetches again");
        assert_eq!(f.epochs().wanted, 3);
    }

    #[test]
    fn delivered_never_goes_back_and_wakes_subscribers_only_on_change() {
        let f = Freshness::default();
        let mut rx = f.subscribe();
        f.stream_opened();
        f.stream_opened();
        rx.borrow_and_update();
        f.delivered(2);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        f.delivered(1);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(f.epochs().delivered, 2);
    }
}
