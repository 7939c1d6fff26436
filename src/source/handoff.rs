//! Make-before-break between two sources of a key, and one source task's mark that the key
//! is answered.

use tokio::time::Instant;

use super::{HandoverSignal, SourceCell};
use crate::telemetry::{ConnectedGauge, SourceMetrics};

/// The source being replaced; released once the new source has delivered.
///
/// While it holds a previous source it counts in `handoffs_pending`; releasing it counts a
/// completed handoff (and its duration), dropping it unreleased an abandoned one. Either end
/// fires the node's [`HandoverSignal`].
pub struct Handoff {
    previous: Option<Box<dyn Send>>,
    started: Instant,
    metrics: SourceMetrics,
    signal: HandoverSignal,
}

impl Handoff {
    /// Holds `previous` (the key's source before this one) until [`Handoff::release`];
    /// `signal` fires when the handoff ends.
    pub fn new(previous: Option<Box<dyn Send>>, metrics: &SourceMetrics, signal: &HandoverSignal) -> Self {
        if previous.is_some() {
            metrics.handoffs_pending.inc();
        }
        Self { previous, started: Instant::now(), metrics: metrics.clone(), signal: signal.clone() }
    }

    /// Stops the previous source, if it still runs: the new source has delivered.
    pub fn release(&mut self) {
        if let Some(previous) = self.previous.take() {
            drop(previous);
            self.metrics.handoffs_pending.dec();
            self.metrics.handoff_completed(self.started.elapsed().as_secs_f64());
            self.signal.notify();
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if self.previous.is_some() {
            self.metrics.handoffs_pending.dec();
            self.metrics.handoff_abandoned();
            self.signal.notify();
        }
    }
}

/// Whether one source task has the key marked connected (`upstream_connected` and the admin
/// API's status). A task clears only what it set: a stopped source leaves the mark to its
/// successor (which set it when it delivered, before stopping its predecessor), and a new
/// source whose streams fail does not clear the mark of the source it is replacing.
#[derive(Debug, Default)]
pub struct Liveness {
    marked: bool,
}

impl Liveness {
    /// A task that has not marked the key.
    pub fn new() -> Self {
        Self { marked: false }
    }

    /// The source answered: marks the key connected in `cell` and `gauge`.
    pub fn up(&mut self, cell: &SourceCell, gauge: &ConnectedGauge) {
        if !self.marked {
            self.marked = true;
            gauge.set(1);
            cell.set_connected(true);
        }
    }

    /// The source's stream failed: clears the mark if this task set it.
    pub fn down(&mut self, cell: &SourceCell, gauge: &ConnectedGauge) {
        if self.marked {
            self.marked = false;
            gauge.set(0);
            cell.set_connected(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    #[test]
    fn a_task_clears_only_the_mark_it_set() {
        let metrics = Metrics::new();
        let key = metrics.for_key("k", "t");
        let cell = SourceCell::default();
        let gauge = &key.upstream_connected;
        let (mut old, mut new) = (Liveness::new(), Liveness::default());
        old.up(&cell, gauge);
        assert!(cell.status().connected);
        // The new source's streams fail before it delivers: the old one's mark stays.
        new.down(&cell, gauge);
        assert!(cell.status().connected, "a task that never answered leaves the mark alone");
        assert_eq!(gauge.get(), 1);
        // The new source delivers; the old one is then stopped (cancelled: it never calls
        // `down`), so the mark stays until the new one fails.
        new.up(&cell, gauge);
        assert_eq!(gauge.get(), 1);
        new.down(&cell, gauge);
        assert!(!cell.status().connected);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn a_handoff_stops_the_previous_source_only_when_released_and_signals_its_end() {
        let metrics = Metrics::new();
        let sources = metrics.for_key("k", "t").sources;
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let signal = HandoverSignal::new();
        let mut events = signal.subscribe();
        let mut handoff = Handoff::new(Some(Box::new(Flag(stopped.clone()))), &sources, &signal);
        assert_eq!(sources.handoffs_pending.get(), 1);
        assert!(!stopped.load(std::sync::atomic::Ordering::SeqCst));
        assert!(!events.has_changed().unwrap());
        handoff.release();
        assert!(stopped.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(sources.handoffs_pending.get(), 0);
        assert!(events.has_changed().unwrap(), "a draining node hears that the handoff ended");
        events.mark_unchanged();
        drop(Handoff::new(Some(Box::new(0u8)), &sources, &signal));
        assert!(events.has_changed().unwrap(), "an abandoned handoff is heard too");
    }
}
