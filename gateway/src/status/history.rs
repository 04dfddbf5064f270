//! The ingest history behind the status page's chart: a ring of 10-second buckets covering the
//! last 15 minutes, plus 1-second totals for the current rates. [`Sampler::run`] fills it.

use super::devices::{DeviceTable, SOURCES};
use ferry_buffer::{Buffer, now_ms};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// Width of one chart bucket.
pub const BUCKET: Duration = Duration::from_secs(10);
/// Buckets kept: 15 minutes.
pub const BUCKETS: usize = 90;
/// How often the sampler reads the counters.
pub const TICK: Duration = Duration::from_secs(1);
/// Rates are averaged over this window.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Cumulative counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Readings received, by [`SOURCES`] index.
    pub received: [u64; 4],
    /// Readings acknowledged upstream by every uplink and removed from the buffer.
    pub forwarded: u64,
}

impl Totals {
    /// Reads the counters now.
    pub fn read(devices: &DeviceTable, buffer: &Buffer) -> Totals {
        let rx = devices.received();
        Totals {
            received: std::array::from_fn(|i| rx.get(SOURCES[i]).copied().unwrap_or(0)),
            forwarded: buffer.stats().acked_total,
        }
    }

    fn minus(&self, earlier: &Totals) -> Totals {
        Totals {
            received: std::array::from_fn(|i| self.received[i].saturating_sub(earlier.received[i])),
            forwarded: self.forwarded.saturating_sub(earlier.forwarded),
        }
    }
}

/// One closed bucket: what happened during `[start_ms, start_ms + 10 s)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Start of the bucket, ms since the epoch.
    pub start_ms: u64,
    /// Length of the bucket in ms (10 000, except for the current, open one).
    pub duration_ms: u64,
    /// Counts during the bucket.
    pub counts: Totals,
}

/// The ring and the fine samples.
#[derive(Debug, Default)]
pub struct History {
    buckets: VecDeque<Bucket>,
    fine: VecDeque<(Instant, Totals)>,
    open: Option<(Instant, u64, Totals)>,
}

impl History {
    /// Records the counters read at `now`.
    pub fn tick(&mut self, now: Instant, wall_ms: u64, totals: Totals) {
        self.fine.push_back((now, totals));
        while let Some((t, _)) = self.fine.front() {
            if now.duration_since(*t) > RATE_WINDOW && self.fine.len() > 2 {
                self.fine.pop_front();
            } else {
                break;
            }
        }
        match self.open {
            None => self.open = Some((now, wall_ms, totals)),
            Some((start, start_ms, base)) if now.duration_since(start) >= BUCKET => {
                self.buckets.push_back(Bucket {
                    start_ms,
                    duration_ms: now.duration_since(start).as_millis() as u64,
                    counts: totals.minus(&base),
                });
                while self.buckets.len() > BUCKETS {
                    self.buckets.pop_front();
                }
                self.open = Some((now, wall_ms, totals));
            }
            Some(_) => {}
        }
    }

    /// The closed buckets, oldest first, then the open one (counted up to `current`).
    pub fn buckets(&self, now: Instant, current: &Totals) -> Vec<Bucket> {
        let mut out: Vec<Bucket> = self.buckets.iter().copied().collect();
        if let Some((start, start_ms, base)) = self.open {
            out.push(Bucket {
                start_ms,
                duration_ms: now.duration_since(start).as_millis() as u64,
                counts: current.minus(&base),
            });
        }
        out
    }

    /// Readings per second over the last [`RATE_WINDOW`], by source, and forwarded.
    pub fn rates(&self, now: Instant, current: &Totals) -> ([f64; 4], f64) {
        let Some((t, first)) = self.fine.front() else {
            return ([0.0; 4], 0.0);
        };
        let secs = now.duration_since(*t).as_secs_f64();
        if secs < 0.5 {
            return ([0.0; 4], 0.0);
        }
        let d = current.minus(first);
        (
            std::array::from_fn(|i| d.received[i] as f64 / secs),
            d.forwarded as f64 / secs,
        )
    }
}

/// The background task that samples the counters every second and runs the Prometheus
/// recorder's upkeep.
#[derive(Debug)]
pub struct Sampler {
    pub(crate) hub: super::Hub,
    pub(crate) buffer: Buffer,
}

impl Sampler {
    /// Samples until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            let totals = Totals::read(&self.hub.devices, &self.buffer);
            self.hub.history().tick(Instant::now(), now_ms(), totals);
            n += 1;
            if n.is_multiple_of(5) {
                super::metrics::upkeep();
            }
        }
    }
}

/// Names the per-source figures of `values` by [`SOURCES`], leaving out sources with nothing.
pub fn by_source<T: Copy + Default + PartialEq>(values: [T; 4]) -> BTreeMap<String, T> {
    SOURCES
        .iter()
        .zip(values)
        .filter(|(s, v)| **s == "mqtt" || **s == "http" || *v != T::default())
        .map(|(s, v)| (s.to_string(), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(mqtt: u64, http: u64, fwd: u64) -> Totals {
        Totals {
            received: [mqtt, 0, http, 0],
            forwarded: fwd,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_and_rates() {
        let mut h = History::default();
        let t0 = Instant::now();
        // 100 mqtt readings per second and 10 http, forwarded at 50/s, for 25 s.
        for s in 0..=25u64 {
            let now = t0 + Duration::from_secs(s);
            h.tick(now, 1_000_000 + s * 1000, totals(100 * s, 10 * s, 50 * s));
        }
        let now = t0 + Duration::from_secs(25);
        let cur = totals(2500, 250, 1250);
        let b = h.buckets(now, &cur);
        assert_eq!(b.len(), 3, "two closed buckets and the open one: {b:?}");
        assert_eq!(b[0].start_ms, 1_000_000);
        assert_eq!(b[0].counts, totals(1000, 100, 500));
        assert_eq!(b[1].counts, totals(1000, 100, 500));
        assert_eq!(b[2].duration_ms, 5_000);
        assert_eq!(b[2].counts, totals(500, 50, 250));
        let (rx, fwd) = h.rates(now, &cur);
        assert!((rx[0] - 100.0).abs() < 1.0, "{rx:?}");
        assert!((rx[2] - 10.0).abs() < 0.5, "{rx:?}");
        assert!((fwd - 50.0).abs() < 1.0, "{fwd}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_ring_keeps_fifteen_minutes() {
        let mut h = History::default();
        let t0 = Instant::now();
        for s in 0..=(20 * 60u64) {
            h.tick(t0 + Duration::from_secs(s), s * 1000, totals(s, 0, 0));
        }
        let now = t0 + Duration::from_secs(20 * 60);
        let b = h.buckets(now, &totals(20 * 60, 0, 0));
        assert_eq!(b.len(), BUCKETS + 1);
        assert_eq!(b[0].start_ms, (20 * 60 - 900) * 1000);
        assert!(b[..BUCKETS].iter().all(|b| b.counts.received[0] == 10));
    }

    #[test]
    fn by_source_keeps_the_main_sources_and_any_nonzero() {
        let m = by_source([1u64, 0, 0, 0]);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["http", "mqtt"]);
        let m = by_source([0u64, 2, 0, 3]);
        assert_eq!(m.len(), 4);
    }
}
