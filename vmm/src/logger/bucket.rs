//! The token bucket of one call site, and where its time comes from.

use std::time::{Duration, Instant};

/// A source of time for the rate limiter; injectable so that tests can
/// step it instead of sleeping.
pub trait Clock: Send + Sync {
    /// Nanoseconds since a fixed, arbitrary start; never decreasing.
    fn now_ns(&self) -> u64;
}

/// The monotonic clock (`Instant`), counted from when it was made.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock {
            start: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// How much one call site may log: `burst` records at once, then one more
/// per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub burst: u32,
    pub interval: Duration,
}

impl Default for Limits {
    /// A burst of 32: the root bus has 32 device slots, so a message the
    /// guest legitimately causes once per function (a BAR move for each
    /// device while Linux reassigns resources, say) still comes through
    /// whole. Then one per second: a guest stuck on a bad request keeps
    /// showing up in the log, with counts, at a pace a person can read and
    /// a disk can hold (a few KiB a second even if a guest hits every
    /// call site it can reach).
    fn default() -> Self {
        Limits {
            burst: 32,
            interval: Duration::from_secs(1),
        }
    }
}

/// `Limits` in the units the bucket works in.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rate {
    /// Nanoseconds per token.
    interval: u64,
    /// How far ahead of now `full_at` may be with a token still left:
    /// `burst - 1` intervals.
    tolerance: u64,
}

impl From<Limits> for Rate {
    fn from(limits: Limits) -> Self {
        let interval = u64::try_from(limits.interval.as_nanos()).unwrap_or(u64::MAX);
        // A burst of 0 would silence a site for good; take it as 1.
        let tolerance = interval.saturating_mul(u64::from(limits.burst.max(1) - 1));
        Rate {
            interval,
            tolerance,
        }
    }
}

/// A token bucket kept as the one time at which it will be full again
/// (the "virtual scheduling" form): each record taken moves that time one
/// interval later, and a record may pass while it is at most `burst - 1`
/// intervals ahead of now. One integer instead of a token count plus a
/// refill timestamp, and refills need no separate step.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Bucket {
    full_at: u64,
}

impl Bucket {
    /// Takes a token at time `now` if there is one.
    pub(super) fn admit(&mut self, now: u64, rate: &Rate) -> bool {
        if self.full_at.saturating_sub(now) > rate.tolerance {
            return false;
        }
        // A bucket that has been full for a while holds no more than full.
        self.full_at = self.full_at.max(now).saturating_add(rate.interval);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn rate(burst: u32, secs: u64) -> Rate {
        Limits {
            burst,
            interval: Duration::from_secs(secs),
        }
        .into()
    }

    /// How many of `n` records at time `now` pass.
    fn take(bucket: &mut Bucket, rate: &Rate, now: u64, n: u32) -> u32 {
        (0..n).filter(|_| bucket.admit(now, rate)).count() as u32
    }

    #[test]
    fn burst_then_one_per_interval() {
        let rate = rate(5, 1);
        let mut b = Bucket::default();
        let t0 = 1000 * SEC;
        assert_eq!(take(&mut b, &rate, t0, 20), 5);
        // Less than an interval later: nothing yet.
        assert_eq!(take(&mut b, &rate, t0 + SEC - 1, 3), 0);
        assert_eq!(take(&mut b, &rate, t0 + SEC, 3), 1);
        assert_eq!(take(&mut b, &rate, t0 + 3 * SEC, 3), 2);
    }

    #[test]
    fn idle_refills_up_to_the_burst_only() {
        let rate = rate(4, 1);
        let mut b = Bucket::default();
        assert_eq!(take(&mut b, &rate, 0, 10), 4);
        assert_eq!(take(&mut b, &rate, 3600 * SEC, 10), 4);
    }

    #[test]
    fn zero_burst_means_one() {
        let rate = rate(0, 1);
        let mut b = Bucket::default();
        assert_eq!(take(&mut b, &rate, 0, 3), 1);
        assert_eq!(take(&mut b, &rate, SEC, 3), 1);
    }

    #[test]
    fn clock_going_backwards_passes_nothing_extra() {
        // Threads read the clock before taking the lock, so a site can see
        // a slightly older time after a newer one.
        let rate = rate(2, 1);
        let mut b = Bucket::default();
        assert_eq!(take(&mut b, &rate, 10 * SEC, 2), 2);
        assert_eq!(take(&mut b, &rate, 9 * SEC, 5), 0);
        assert_eq!(take(&mut b, &rate, 11 * SEC, 5), 1);
    }

    #[test]
    fn monotonic_clock_advances() {
        let c = MonotonicClock::new();
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(b >= a);
    }
}
