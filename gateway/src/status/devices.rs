//! The bounded device table and the per-source ingest counters, fed by the listeners once per
//! committed batch (never per reading).
//!
//! The table holds at most `status.max_devices` devices; when a new device arrives at the cap,
//! the least recently seen one is forgotten (and counted in `evicted_total`). Updates are
//! O(log n): a `HashMap` by device plus a `BTreeMap` ordered by a recency sequence number.

use ferry_buffer::{Reading, Source, clock};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

/// The sources readings arrive from, as named in the status report and metrics.
pub const SOURCES: [&str; 4] = ["mqtt", "mqtt-will", "http", "requeue"];

fn source_index(s: Source) -> usize {
    match s {
        Source::Mqtt => 0,
        Source::MqttWill => 1,
        Source::Http => 2,
        _ => 3,
    }
}

/// One device as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The device id.
    pub id: String,
    /// When its last batch was committed, ms since the epoch.
    pub last_seen_ms: u64,
    /// Readings committed since ferry started (or since the device was last evicted).
    pub readings: u64,
    /// The source of its last batch.
    pub source: &'static str,
}

/// What one committed batch contributed: readings per device and per source. Build it from
/// the readings **before** handing them to `Buffer::append` (which takes them), and record it
/// with [`DeviceTable::record`] once the append returned Ok.
#[derive(Debug, Clone, Default)]
pub struct DeviceBatch {
    devices: Vec<(String, u64, usize)>,
    by_source: [u64; 4],
}

impl DeviceBatch {
    /// Summarises a batch. Cheap for the usual case of one or a few devices per batch.
    pub fn of(readings: &[Reading]) -> DeviceBatch {
        let mut b = DeviceBatch::default();
        for r in readings {
            let si = source_index(r.source);
            b.by_source[si] += 1;
            // Batches come from one connection or request: consecutive readings usually
            // share a device, so check the last entry first.
            match b.devices.iter_mut().rev().find(|d| d.0 == r.device) {
                Some(d) => {
                    d.1 += 1;
                    d.2 = si;
                }
                None => {
                    if b.devices.is_empty() {
                        // Usually the only one: no room for four.
                        b.devices.reserve_exact(1);
                    }
                    b.devices.push((r.device.clone(), 1, si))
                }
            }
        }
        b
    }
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    /// Boot clock (ferry_buffer::clock).
    last_seen_bt: u64,
    readings: u64,
    source: usize,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, Entry>,
    by_recency: BTreeMap<u64, String>,
    next_seq: u64,
    evicted_total: u64,
    received: [u64; 4],
}

/// The device table and ingest counters. Cheap to clone; clones share the same table.
#[derive(Debug, Clone)]
pub struct DeviceTable {
    max: usize,
    inner: Arc<Mutex<Inner>>,
}

impl Default for DeviceTable {
    fn default() -> Self {
        DeviceTable::new(ferry_config::StatusSettings::default().max_devices)
    }
}

impl DeviceTable {
    /// A table of at most `max` devices (at least 1).
    pub fn new(max: usize) -> DeviceTable {
        DeviceTable {
            max: max.max(1),
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a committed batch.
    pub fn record(&self, batch: &DeviceBatch) {
        // The boot clock, so "last seen" ages survive a step of the wall clock.
        let now = clock::boottime_ms();
        let mut g = self.lock();
        for (i, n) in batch.by_source.iter().enumerate() {
            g.received[i] += n;
        }
        for (id, n, si) in &batch.devices {
            let seq = g.next_seq;
            g.next_seq += 1;
            let old = match g.by_id.get_mut(id) {
                Some(e) => {
                    let old = e.seq;
                    e.seq = seq;
                    e.last_seen_bt = now;
                    e.readings += n;
                    e.source = *si;
                    Some(old)
                }
                None => None,
            };
            match old {
                Some(old) => {
                    let name = g.by_recency.remove(&old).unwrap_or_else(|| id.clone());
                    g.by_recency.insert(seq, name);
                }
                None => {
                    if g.by_id.len() >= self.max
                        && let Some((_, victim)) = g.by_recency.pop_first()
                    {
                        g.by_id.remove(&victim);
                        g.evicted_total += 1;
                    }
                    g.by_id.insert(
                        id.clone(),
                        Entry {
                            seq,
                            last_seen_bt: now,
                            readings: *n,
                            source: *si,
                        },
                    );
                    g.by_recency.insert(seq, id.clone());
                }
            }
        }
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Devices tracked now.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether no device is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Devices forgotten to respect the cap.
    pub fn evicted_total(&self) -> u64 {
        self.lock().evicted_total
    }

    /// Readings committed so far, by source (see [`SOURCES`]).
    pub fn received(&self) -> BTreeMap<&'static str, u64> {
        let g = self.lock();
        SOURCES.iter().copied().zip(g.received).collect()
    }

    /// Up to `limit` devices, most recently seen first.
    pub fn recent(&self, limit: usize) -> Vec<DeviceEntry> {
        let g = self.lock();
        g.by_recency
            .values()
            .rev()
            .take(limit)
            .filter_map(|id| {
                g.by_id.get(id).map(|e| DeviceEntry {
                    id: id.clone(),
                    last_seen_ms: clock::wall_of_boottime(e.last_seen_bt),
                    readings: e.readings,
                    source: SOURCES[e.source],
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(devices: &[&str], source: Source) -> DeviceBatch {
        let rs: Vec<Reading> = devices
            .iter()
            .map(|d| Reading::new(source, d.to_string(), "t".to_string(), vec![1u8]))
            .collect();
        DeviceBatch::of(&rs)
    }

    #[test]
    fn counts_per_device_and_source() {
        let t = DeviceTable::new(10);
        t.record(&batch(&["a", "a", "b"], Source::Mqtt));
        t.record(&batch(&["b"], Source::Http));
        let recent = t.recent(10);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[0].id, "b", "most recent first");
        assert_eq!(recent[0].readings, 2);
        assert_eq!(recent[0].source, "http");
        assert_eq!(recent[1].readings, 2);
        let rx = t.received();
        assert_eq!((rx["mqtt"], rx["http"], rx["mqtt-will"]), (3, 1, 0));
    }

    #[test]
    fn evicts_the_least_recently_seen() {
        let t = DeviceTable::new(3);
        for d in ["a", "b", "c"] {
            t.record(&batch(&[d], Source::Mqtt));
        }
        // "a" is seen again, so "b" is now the least recent.
        t.record(&batch(&["a"], Source::Mqtt));
        t.record(&batch(&["d"], Source::Mqtt));
        let ids: Vec<String> = t.recent(10).into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["d", "a", "c"]);
        assert_eq!(t.evicted_total(), 1);
        assert_eq!(t.len(), 3);
        // Many more devices than the cap: the table stays bounded.
        for i in 0..1000 {
            t.record(&batch(&[&format!("x{i}")], Source::Http));
        }
        assert_eq!(t.len(), 3);
        assert_eq!(t.recent(1)[0].id, "x999");
        assert_eq!(t.received()["http"], 1000);
    }
}
