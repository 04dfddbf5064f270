//! Exponential backoff with full jitter, shared by every uplink.
//!
//! The n-th delay (counting from 0) is drawn uniformly from `[0, min(max, initial * 2^n)]`
//! ("full jitter", as in the AWS architecture blog's analysis), so a fleet of gateways that
//! lost the same broker does not come back in lockstep. [`Backoff::reset`] starts over after a
//! success.

use std::time::Duration;

/// Exponential backoff with full jitter, capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff whose ceiling starts at `initial` and doubles up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            ^ (std::process::id() as u64).rotate_left(32);
        Self::with_seed(initial, max, seed)
    }

    /// Like [`Backoff::new`] with a fixed random seed, for reproducible tests.
    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng: seed,
        }
    }

    /// Failures since the last [`Backoff::reset`].
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the next delay: `min(max, initial * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The next delay, drawn uniformly from `[0, ceiling]` in whole milliseconds (the
    /// resolution of tokio's timer); counts one more attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis().min(u64::MAX as u128 - 1) as u64;
        Duration::from_millis(self.next_u64() % (ms + 1))
    }

    /// Sleeps for the next delay (tokio time, so tests can pause the clock) and returns it.
    pub async fn wait(&mut self) -> Duration {
        let d = self.next_delay();
        tokio::time::sleep(d).await;
        d
    }

    /// Starts over at `initial` after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// SplitMix64: small, fast and good enough for jitter (not for anything secret).
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_and_is_capped() {
        let mut b = Backoff::with_seed(100 * MS, 1000 * MS, 1);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling());
            let d = b.next_delay();
            assert!(d <= *ceilings.last().unwrap(), "{d:?} above its ceiling");
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1000, 1000, 1000, 1000].map(|m| m * MS)
        );
        assert_eq!(b.attempt(), 8);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.ceiling(), 100 * MS);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::with_seed(Duration::from_secs(1), Duration::from_secs(60), 7);
        for _ in 0..200 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60));
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        // Full jitter: capped delays should cover [0, cap] roughly uniformly, not cluster at
        // the cap.
        let mut b = Backoff::with_seed(MS, 1000 * MS, 42);
        for _ in 0..20 {
            b.next_delay();
        }
        let draws: Vec<Duration> = (0..2000).map(|_| b.next_delay()).collect();
        let low = draws.iter().filter(|d| **d < 250 * MS).count();
        let high = draws.iter().filter(|d| **d > 750 * MS).count();
        assert!(
            (350..650).contains(&low),
            "{low} draws in the lowest quarter"
        );
        assert!(
            (350..650).contains(&high),
            "{high} draws in the highest quarter"
        );
        let mean = draws.iter().sum::<Duration>() / draws.len() as u32;
        assert!(
            (400 * MS..600 * MS).contains(&mean),
            "mean {mean:?} is not near half the cap"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_exactly_the_drawn_delay_on_tokio_time() {
        let mut b = Backoff::with_seed(500 * MS, 4000 * MS, 3);
        let mut total = Duration::ZERO;
        for _ in 0..6 {
            let start = tokio::time::Instant::now();
            let d = b.wait().await;
            assert_eq!(start.elapsed(), d);
            total += d;
        }
        // Ceilings 500+1000+2000+4000+4000+4000: the sum of the draws cannot exceed them.
        assert!(total <= 15_500 * MS);
        assert!(total > Duration::ZERO);
    }

    #[test]
    fn same_seed_same_delays() {
        let mut a = Backoff::with_seed(10 * MS, 10_000 * MS, 99);
        let mut b = Backoff::with_seed(10 * MS, 10_000 * MS, 99);
        for _ in 0..10 {
            assert_eq!(a.next_delay(), b.next_delay());
        }
    }
}
