//! How a draining node learns that its keys moved: a [`HandoverSignal`] fired whenever the
//! drain's condition may have changed, and [`wait_until`], which re-checks that condition on
//! each signal (or other change) until it holds or a deadline.
//!
//! The signal fires when any source's handoff ends, completed or abandoned ([`super::Handoff`],
//! origin subscriptions and follower tasks alike), when a follower task applied its owner's
//! first state on a stream or ended, and when a follower's stream to this node ends (the key
//! may lose its last follower). Nothing is polled: the wait sleeps until a signal, a change seen by
//! the caller's other receiver (the cluster view) or the deadline, on tokio time.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How long a wait lets signals gather before it re-checks: a burst of handovers (thousands
/// of keys moving at once) costs one check, not one per key, since each check walks every
/// key of the node.
pub const RECHECK_GAP: Duration = Duration::from_millis(50);

/// A broadcast "something about handovers changed" event; cheap to clone (all clones are one
/// signal). Receivers never miss an event that happens after they subscribed.
#[derive(Clone, Debug)]
pub struct HandoverSignal {
    events: watch::Sender<u64>,
}

impl Default for HandoverSignal {
    fn default() -> Self {
        Self { events: watch::Sender::new(0) }
    }
}

impl HandoverSignal {
    /// A signal nobody listens to yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes every receiver: a key was handed over, a handoff ended or a follower left.
    pub fn notify(&self) {
        self.events.send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A receiver that sees every [`HandoverSignal::notify`] from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }
}

/// Waits until `done()` holds, checking it once at the start and again [`RECHECK_GAP`] after
/// `signals` or `changes` (e.g. the cluster view) change, but never past `deadline`. Returns whether it
/// held: at the deadline `done()` is checked one last time. A receiver whose sender is gone
/// is no longer waited on (the deadline still bounds the wait).
pub async fn wait_until<T, U>(
    mut done: impl FnMut() -> bool,
    mut signals: watch::Receiver<T>,
    mut changes: watch::Receiver<U>,
    deadline: Instant,
) -> bool {
    let (mut signals_open, mut changes_open) = (true, true);
    loop {
        // Marked seen before the check: a change during the check wakes the next wait.
        signals.mark_unchanged();
        changes.mark_unchanged();
        if done() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return done(),
            changed = signals.changed(), if signals_open => signals_open = changed.is_ok(),
            changed = changes.changed(), if changes_open => changes_open = changed.is_ok(),
        }
        // Later signals of the same burst are folded into this check.
        tokio::time::sleep_until(deadline.min(Instant::now() + RECHECK_GAP)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_at_the_signal_after_which_the_condition_holds() {
        let signal = HandoverSignal::new();
        let (_view_tx, views) = watch::channel(());
        let handed_over = Arc::new(AtomicBool::new(false));
        let checks = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let (flag, notifier) = (handed_over.clone(), signal.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            notifier.notify(); // a signal while the condition does not hold yet
            tokio::time::sleep(Duration::from_secs(1)).await;
            flag.store(true, Ordering::SeqCst);
            notifier.notify();
        });
        let counted = checks.clone();
        let done = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            handed_over.load(Ordering::SeqCst)
        };
        assert!(wait_until(done, signal.subscribe(), views, started + DEADLINE).await);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(3) + RECHECK_GAP,
            "it ends at the signal, not at a poll tick"
        );
        assert_eq!(checks.load(Ordering::SeqCst), 3, "one check at the start and one per signal");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_signals_costs_one_check() {
        let signal = HandoverSignal::new();
        let (_view_tx, views) = watch::channel(());
        let checks = Arc::new(AtomicUsize::new(0));
        let all_moved = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let (notifier, moved) = (signal.clone(), all_moved.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for _ in 0..1000 {
                notifier.notify(); // one key handed over
                tokio::task::yield_now().await;
            }
            moved.store(true, Ordering::SeqCst);
        });
        let counted = checks.clone();
        let done = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            all_moved.load(Ordering::SeqCst)
        };
        assert!(wait_until(done, signal.subscribe(), views, started + DEADLINE).await);
        assert_eq!(checks.load(Ordering::SeqCst), 2, "the start, then one check for the whole burst");
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_of_the_other_receiver_also_rechecks() {
        let signal = HandoverSignal::new();
        let (view_tx, views) = watch::channel(0_u64);
        let started = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            view_tx.send_replace(1);
            // The sender stays open until the wait ended.
            tokio::time::sleep(DEADLINE).await;
        });
        let views_seen = views.clone();
        let done = move || *views_seen.borrow() == 1;
        assert!(wait_until(done, signal.subscribe(), views, started + DEADLINE).await);
        assert_eq!(started.elapsed(), Duration::from_secs(4) + RECHECK_GAP);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_at_the_deadline_when_the_condition_never_holds() {
        let signal = HandoverSignal::new();
        let (_view_tx, views) = watch::channel(());
        let started = Instant::now();
        let notifier = signal.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                notifier.notify();
            }
        });
        assert!(!wait_until(|| false, signal.subscribe(), views, started + DEADLINE).await);
        assert_eq!(started.elapsed(), DEADLINE);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_receivers_do_not_spin_and_the_deadline_still_ends_the_wait() {
        let (signal_tx, signals) = watch::channel(0_u64);
        let (view_tx, views) = watch::channel(());
        drop((signal_tx, view_tx));
        let started = Instant::now();
        let checks = AtomicUsize::new(0);
        let done = || {
            checks.fetch_add(1, Ordering::SeqCst);
            false
        };
        assert!(!wait_until(done, signals, views, started + DEADLINE).await);
        assert_eq!(started.elapsed(), DEADLINE);
        assert!(checks.load(Ordering::SeqCst) <= 4, "{} checks: the closed receivers were polled", checks.into_inner());
    }

    #[tokio::test(start_paused = true)]
    async fn a_condition_that_already_holds_returns_at_once() {
        let signal = HandoverSignal::new();
        let (_view_tx, views) = watch::channel(());
        let started = Instant::now();
        assert!(wait_until(|| true, signal.subscribe(), views, started + DEADLINE).await);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
