//! Write pacing: a token bucket in front of every write the healer sends to the apiserver, so a
//! storm over 10,000 nodes never floods the control plane (issue 19). Pure: time is passed in,
//! so the bound is tested without sleeping. Reads (the Node watch, GETs) and the Lease's own
//! renewals are not paced: a renewal stuck behind a storm would cost the leadership.
//!
//! A caller *reserves* a token and then waits the returned delay before sending. Reservations are
//! handed out in arrival order and never refunded, so over any interval of length `t` at most
//! `burst + rate × t` writes are sent, whatever the callers do (the property test attacks this).

use std::time::{Duration, Instant};

/// A token bucket with reservations. `rate <= 0` turns pacing off.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    /// Tokens at `last`; negative = reservations already promised to waiting callers.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket at `now` (`burst` is at least one token).
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub fn enabled(&self) -> bool {
        self.rate > 0.0 && self.rate.is_finite()
    }

    /// Takes one token at `now` and says how long the caller must wait before sending.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        if !self.enabled() {
            return Duration::ZERO;
        }
        // `now` earlier than `last` (callers race between reading the clock and locking): no refill.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The send times of writes arriving at `arrivals` (ms offsets, any order of magnitude).
    fn sends(rate: f64, burst: u32, arrivals: &[u64]) -> Vec<f64> {
        let t0 = Instant::now();
        let mut b = Bucket::new(rate, burst, t0);
        let mut sorted = arrivals.to_vec();
        sorted.sort_unstable();
        sorted
            .iter()
            .map(|ms| {
                let at = t0 + Duration::from_millis(*ms);
                let wait = b.reserve(at);
                (at + wait - t0).as_secs_f64()
            })
            .collect()
    }

    #[test]
    fn a_burst_then_the_rate() {
        // 1,000 writes at once at 20/s with a burst of 10: 10 go now, then one every 50 ms.
        let s = sends(20.0, 10, &[0; 1000]);
        assert!(s[..10].iter().all(|t| *t == 0.0));
        assert!((s[10] - 0.05).abs() < 1e-6, "{}", s[10]);
        assert!((s[999] - 990.0 / 20.0).abs() < 1e-6, "{}", s[999]);
    }

    #[test]
    fn off_when_the_rate_is_zero() {
        assert!(sends(0.0, 1, &[0; 100]).iter().all(|t| *t == 0.0));
    }

    proptest! {
        /// A storm of writes, arriving in any pattern, never exceeds `burst + rate × t` in any
        /// window of length `t`.
        #[test]
        fn no_window_exceeds_burst_plus_rate_times_t(
            rate in 1.0f64..500.0,
            burst in 1u32..50,
            arrivals in proptest::collection::vec(0u64..5_000, 1..400),
        ) {
            let s = sends(rate, burst, &arrivals);
            for i in 0..s.len() {
                for j in i..s.len() {
                    let n = (j - i + 1) as f64;
                    let t = s[j] - s[i];
                    prop_assert!(
                        n <= f64::from(burst) + rate * t + 1e-6,
                        "{n} writes in {t} s (rate {rate}, burst {burst})"
                    );
                }
            }
            // And nobody waits when the bucket had room: the first write always goes at once.
            let first = *arrivals.iter().min().unwrap() as f64 / 1000.0;
            prop_assert!((s[0] - first).abs() < 1e-9, "{} vs {first}", s[0]);
        }
    }
}
