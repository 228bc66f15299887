//! The capped, jittered retry schedule shared by reconnects and rejoins of one subscription.

use std::time::{Duration, Instant};

use rand::Rng;

/// Jitter spreads each delay uniformly over `delay * [1 - JITTER, 1 + JITTER]`, so that many
/// workers dropped at the same moment do not reconnect in step (the server limits joins per
/// second per project).
const JITTER: f64 = 0.2;

/// Delay used when the configured schedule is empty.
const DEFAULT_DELAY: Duration = Duration::from_secs(1);

/// Retry schedule: the n-th consecutive failure waits `steps[n]`, then the last step forever,
/// each with jitter. [`Backoff::reset`] starts the schedule over.
#[derive(Debug, Clone)]
pub struct Backoff {
    steps: Vec<Duration>,
    failures: usize,
}

impl Backoff {
    pub fn new(steps: Vec<Duration>) -> Self {
        Backoff { steps, failures: 0 }
    }

    /// Records a failure and returns the jittered delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base_delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        jitter(base, rand::rng().random_range(-1.0..=1.0))
    }

    /// Number of failures recorded since the last reset.
    pub fn failures(&self) -> usize {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Delay without jitter for the given number of earlier failures.
    pub fn base_delay(&self, failures: usize) -> Duration {
        match self.steps.last() {
            None => DEFAULT_DELAY,
            Some(last) => *self.steps.get(failures).unwrap_or(last),
        }
    }
}

/// The retry schedule plus the rule that a subscription which stayed live for
/// `healthy_reset_after` starts the schedule over at its next failure.
#[derive(Debug, Clone)]
pub struct RetryState {
    backoff: Backoff,
    healthy_reset_after: Duration,
    live_since: Option<Instant>,
}

impl RetryState {
    pub fn new(steps: Vec<Duration>, healthy_reset_after: Duration) -> Self {
        RetryState {
            backoff: Backoff::new(steps),
            healthy_reset_after,
            live_since: None,
        }
    }

    /// Records that the subscription became live at `now`; later confirmations while it stays
    /// live keep the first instant.
    pub fn mark_live(&mut self, now: Instant) {
        self.live_since.get_or_insert(now);
    }

    /// Records a failure at `now` and returns the delay before the next attempt. The schedule
    /// starts over first when the subscription had been live for at least
    /// `healthy_reset_after`.
    pub fn failure_delay(&mut self, now: Instant) -> Duration {
        if let Some(since) = self.live_since.take() {
            if now.saturating_duration_since(since) >= self.healthy_reset_after {
                self.backoff.reset();
            }
        }
        self.backoff.next_delay()
    }

    /// Number of failures since the schedule last started over.
    pub fn failures(&self) -> usize {
        self.backoff.failures()
    }
}

/// Scales `base` by `1 + JITTER * unit`, where `unit` lies in [-1, 1].
fn jitter(base: Duration, unit: f64) -> Duration {
    base.mul_f64(1.0 + JITTER * unit.clamp(-1.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|s| Duration::from_secs(*s)).collect()
    }

    #[test]
    fn base_delay_follows_steps_then_last() {
        let backoff = Backoff::new(secs(&[1, 2, 5, 10]));
        let expected = secs(&[1, 2, 5, 10, 10, 10]);
        for (failures, delay) in expected.iter().enumerate() {
            assert_eq!(backoff.base_delay(failures), *delay, "failures={failures}");
        }
        assert_eq!(backoff.base_delay(usize::MAX), Duration::from_secs(10));
    }

    #[test]
    fn next_delay_stays_within_jitter_bounds() {
        let mut backoff = Backoff::new(secs(&[1, 2, 5, 10]));
        for attempt in 0..50 {
            let base = backoff.base_delay(attempt);
            let delay = backoff.next_delay();
            assert!(
                delay >= base.mul_f64(1.0 - JITTER),
                "attempt {attempt}: {delay:?}"
            );
            assert!(
                delay <= base.mul_f64(1.0 + JITTER),
                "attempt {attempt}: {delay:?}"
            );
        }
        assert_eq!(backoff.failures(), 50);
    }

    #[test]
    fn reset_starts_schedule_over() {
        let mut backoff = Backoff::new(secs(&[1, 2, 5, 10]));
        for _ in 0..6 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.failures(), 0);
        let delay = backoff.next_delay();
        assert!(delay <= Duration::from_secs(1).mul_f64(1.0 + JITTER));
    }

    #[test]
    fn empty_schedule_uses_default_delay() {
        let backoff = Backoff::new(Vec::new());
        assert_eq!(backoff.base_delay(0), DEFAULT_DELAY);
        assert_eq!(backoff.base_delay(7), DEFAULT_DELAY);
    }

    #[test]
    fn retry_state_resets_after_healthy_period() {
        let start = Instant::now();
        let mut retry = RetryState::new(secs(&[1, 2, 5, 10]), Duration::from_secs(60));
        for _ in 0..4 {
            retry.failure_delay(start);
        }
        assert_eq!(retry.failures(), 4);
        retry.mark_live(start);
        retry.failure_delay(start + Duration::from_secs(61));
        assert_eq!(retry.failures(), 1);
    }

    #[test]
    fn retry_state_keeps_schedule_after_short_live_period() {
        let start = Instant::now();
        let mut retry = RetryState::new(secs(&[1, 2, 5, 10]), Duration::from_secs(60));
        for _ in 0..3 {
            retry.failure_delay(start);
        }
        retry.mark_live(start);
        retry.mark_live(start + Duration::from_secs(50));
        retry.failure_delay(start + Duration::from_secs(59));
        assert_eq!(retry.failures(), 4);
        // The live period ended with that failure, so a later failure does not reset either.
        retry.failure_delay(start + Duration::from_secs(3600));
        assert_eq!(retry.failures(), 5);
    }

    #[test]
    fn jitter_extremes() {
        let base = Duration::from_secs(10);
        assert_eq!(jitter(base, -1.0), Duration::from_secs(8));
        assert_eq!(jitter(base, 1.0), Duration::from_secs(12));
        assert_eq!(jitter(base, 5.0), Duration::from_secs(12));
        assert_eq!(jitter(base, 0.0), base);
    }
}
