//! Exponential backoff with full jitter, shared by every retry loop (bus reconnects, deliveries).
//!
//! The n-th delay in a row is uniform in `0..=min(max, min·2^n)`; a success resets it. Full jitter keeps
//! many gateways (or many buses) from retrying in step after a shared outage.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: the n-th delay in a row is uniform in `0..=min(max, min * 2^n)`.
/// Full jitter keeps many gateways from retrying in step after a shared outage.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Delays from `min` doubling up to `max` (`max` below `min` is raised to `min`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// `min(max, min·2^n)` without overflow.
    pub fn cap_for(min: Duration, max: Duration, n: u32) -> Duration {
        let factor = 1u32 << n.min(31);
        min.checked_mul(factor).map_or(max, |d| d.min(max)).max(min.min(max))
    }

    /// The cap of the next delay, without jitter.
    pub fn cap(&self) -> Duration {
        Backoff::cap_for(self.min, self.max, self.failures)
    }

    /// The next delay: uniform in `0..=cap`; the cap then doubles.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_capped(Duration::MAX)
    }

    /// The next delay, its cap also bounded by `limit`.
    pub fn next_delay_capped(&mut self, limit: Duration) -> Duration {
        let cap = self.cap().min(limit);
        self.failures = self.failures.saturating_add(1);
        let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=cap_ns))
    }

    /// After a success: the next delay starts from `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_caps_double_from_min_to_max_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(20), ms(200));
        let mut caps = Vec::new();
        for _ in 0..6 {
            caps.push(b.cap());
            let d = b.next_delay();
            assert!(d <= *caps.last().unwrap());
        }
        assert_eq!(caps, vec![ms(20), ms(40), ms(80), ms(160), ms(200), ms(200)]);
        b.reset();
        assert_eq!(b.cap(), ms(20));
    }

    #[test]
    fn backoff_does_not_overflow_after_many_failures() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(300));
        }
        assert_eq!(b.cap(), Duration::from_secs(300));
    }

    #[test]
    fn backoff_jitter_is_full_not_just_near_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let small = (0..200).filter(|_| b.next_delay() < Duration::from_secs(5)).count();
        assert!(
            small > 20,
            "full jitter spreads delays over 0..=cap, got {small}/200 below half"
        );
    }
}
