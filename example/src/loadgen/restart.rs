//! Forced restarts (`--reconnect-per-second`): which clients end their streams and open new ones
//! at each tick, so that a long run sees a steady trickle of reconnecting clients, like proxies
//! being rescheduled.
//!
//! Clients restart in round-robin order of their index, a fixed fraction of them per second
//! spread over [`RESTART_TICK`]s (the fractional remainder carries over, so the long-run rate is
//! exact); every client restarts once per `1 / fraction` seconds. Because groups (`{group}`) are
//! runs of consecutive clients, a group's clients restart one after another: with `{epoch}` in
//! the cluster template, a group moves to its next aggregation key within about
//! `streams / groups / (fraction * streams)` seconds and leaves its old key without clients.

use std::time::Duration;

/// How often restarts are started.
pub const RESTART_TICK: Duration = Duration::from_millis(100);

/// The round-robin restart order of a run.
#[derive(Debug, Clone)]
pub struct RestartSchedule {
    /// Clients to restart per tick, fractional.
    per_tick: f64,
    /// Restarts owed but not started yet (below 1).
    owed: f64,
    /// The next client to restart.
    next: usize,
    /// Clients in the run.
    clients: usize,
}

impl RestartSchedule {
    /// Restarts `fraction_per_second` of `clients` every second, one `tick` at a time.
    pub fn new(fraction_per_second: f64, clients: usize, tick: Duration) -> Self {
        let per_tick = fraction_per_second * clients as f64 * tick.as_secs_f64();
        Self { per_tick, owed: 0.0, next: 0, clients }
    }

    /// The clients to restart at this tick, in order; at most every client once.
    pub fn tick(&mut self) -> impl Iterator<Item = usize> + use<> {
        self.owed += self.per_tick;
        let due = self.owed.floor();
        self.owed -= due;
        // Bounded by `clients`: a client is never restarted twice in one tick.
        let count = (due as usize).min(self.clients);
        let (start, clients) = (self.next, self.clients.max(1));
        self.next = (start + count) % clients;
        (0..count).map(move |k| (start + k) % clients)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_percent_of_ten_thousand_is_ten_per_tick_round_robin() {
        let mut s = RestartSchedule::new(0.01, 10_000, RESTART_TICK);
        let first: Vec<usize> = s.tick().collect();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        let mut total = first.len();
        let mut last = 9;
        for _ in 1..1000 {
            for i in s.tick() {
                assert_eq!(i, (last + 1) % 10_000, "round robin");
                last = i;
                total += 1;
            }
        }
        // 100 s at 100 restarts per second: every client once, back at the start.
        assert_eq!(total, 10_000);
        assert_eq!(s.tick().next(), Some(0));
    }

    #[test]
    fn fractional_rates_carry_over() {
        // 1% of 250 clients per second: 2.5 per second, 0.25 per tick.
        let mut s = RestartSchedule::new(0.01, 250, RESTART_TICK);
        let per_tick: Vec<usize> = (0..8).map(|_| s.tick().count()).collect();
        assert_eq!(per_tick, [0, 0, 0, 1, 0, 0, 0, 1]);
        let total: usize = (0..392).map(|_| s.tick().count()).sum::<usize>() + 2;
        assert_eq!(total, 100, "2.5 per second over 40 s");
    }

    #[test]
    fn never_more_than_every_client_per_tick() {
        let mut s = RestartSchedule::new(1.0, 3, Duration::from_secs(5));
        assert_eq!(s.tick().collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(RestartSchedule::new(0.0, 3, RESTART_TICK).tick().count(), 0);
    }
}
