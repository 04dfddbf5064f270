//! Property test: the buffer against a `VecDeque` model, over append / read / ack / rewind /
//! eviction by the byte cap / TTL / reopen, in both full policies.

mod common;

use common::opts;
use ferry_buffer::{AppendError, Buffer, BufferOptions, Reader, Reading, Source, WhenFull};
use proptest::prelude::*;
use std::collections::VecDeque;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    Append { n: usize, len: usize },
    AppendExpired { n: usize },
    Read { c: usize, max: usize },
    Ack { c: usize, pick: usize },
    Rewind { c: usize },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..5, 10usize..600).prop_map(|(n, len)| Op::Append { n, len }),
        1 => (1usize..3).prop_map(|n| Op::AppendExpired { n }),
        4 => (0usize..2, 1usize..4).prop_map(|(c, max)| Op::Read { c, max }),
        3 => (0usize..2, 0usize..8).prop_map(|(c, pick)| Op::Ack { c, pick }),
        1 => (0usize..2).prop_map(|c| Op::Rewind { c }),
        1 => Just(Op::Reopen),
    ]
}

const CONSUMERS: [&str; 2] = ["kafka", "mqtt"];
const HOUR_MS: u64 = 3_600_000;

#[derive(Debug, Clone)]
struct Seg {
    id: u64,
    ids: Vec<u64>,
    payloads: Vec<Vec<u8>>,
    newest_ms: u64,
    stored: u64,
}

#[derive(Debug, Default)]
struct Model {
    segs: VecDeque<Seg>,
    next_id: u64,
    next_seg: u64,
    cursors: [u64; 2],
    positions: [u64; 2],
    /// Newest segment each reader handed out (in flight above the cursor).
    leases: [u64; 2],
    handed: [Vec<u64>; 2],
    dropped_full: u64,
    dropped_ttl: u64,
    rejected: u64,
}

impl Model {
    fn used(&self) -> u64 {
        self.segs.iter().map(|s| s.stored).sum()
    }
    fn sweep_ttl(&mut self, now: u64) {
        while let Some(f) = self.segs.front() {
            if f.newest_ms + HOUR_MS < now {
                self.dropped_ttl += f.ids.len() as u64;
                self.segs.pop_front();
            } else {
                break;
            }
        }
    }
    fn delete_acked(&mut self) {
        let floor = *self.cursors.iter().min().unwrap();
        while self.segs.front().is_some_and(|s| s.id <= floor) {
            self.segs.pop_front();
        }
    }
}

fn options(max_bytes: u64, when_full: WhenFull) -> BufferOptions {
    let mut o = opts(&CONSUMERS);
    o.max_bytes = max_bytes;
    o.when_full = when_full;
    o.max_age = Some(Duration::from_millis(HOUR_MS));
    o.max_batch_bytes = 1 << 20;
    o.clock = std::sync::Arc::new(LongUp);
    o
}

/// The real wall clock, synchronized, on a machine up for years. The model ages readings by
/// their wall-clock receipt time; the buffer ages them by the boot clock and places a receipt
/// before the boot at the boot (ferry_buffer::clock), so on a machine up for less than the
/// two hours a reading is backdated, it would not expire.
#[derive(Debug)]
struct LongUp;

impl ferry_buffer::ClockSource for LongUp {
    fn now(&self) -> ferry_buffer::ClockNow {
        let wall_ms = ferry_buffer::now_ms();
        ferry_buffer::ClockNow {
            wall_ms,
            boottime_ms: wall_ms - 1_600_000_000_000,
            synced: true,
        }
    }
    fn boot_id(&self) -> String {
        "model-boot".into()
    }
}

fn run(ops: Vec<Op>, when_full: WhenFull) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 6_000;
        let mut buf = Buffer::open(dir.path(), options(max_bytes, when_full)).unwrap();
        let mut readers: Vec<Reader> = CONSUMERS.iter().map(|c| buf.reader(c).unwrap()).collect();
        let mut m = Model {
            next_id: 1,
            next_seg: 1,
            ..Model::default()
        };
        let mut seq = 0usize;
        for op in ops {
            match op {
                Op::Append { n, .. } | Op::AppendExpired { n } => {
                    let (len, expired) = match op {
                        Op::Append { len, .. } => (len, false),
                        _ => (40, true),
                    };
                    let rs: Vec<Reading> = (0..n)
                        .map(|_| {
                            seq += 1;
                            let mut r = Reading::new(Source::Http, "d", "t", vec![b'x'; len + seq % 7]);
                            if expired {
                                r.received_at_ms -= 2 * HOUR_MS;
                            }
                            r
                        })
                        .collect();
                    let stored = 25 + rs.iter().map(|r| r.encoded_len() as u64).sum::<u64>();
                    let newest = rs.iter().map(|r| r.received_at_ms).max().unwrap();
                    let payloads: Vec<Vec<u8>> = rs.iter().map(|r| r.payload.to_vec()).collect();
                    let res = buf.append(rs).await;
                    // Model: TTL sweep, then the cap.
                    m.sweep_ttl(ferry_buffer::now_ms());
                    let fits = m.used() + stored <= max_bytes;
                    if !fits && when_full == WhenFull::Reject {
                        prop_assert!(matches!(&res, Err(AppendError::Full { readings, .. }) if readings.len() == n), "{res:?}");
                        m.rejected += n as u64;
                        continue;
                    }
                    // drop_oldest: the oldest segments not in flight to an uplink go first;
                    // in-flight ones only if that is not enough.
                    let need = (m.used() + stored).saturating_sub(max_bytes);
                    let pinned = |id: u64| (0..2).any(|c| id > m.cursors[c] && id <= m.leases[c]);
                    let (mut freed, mut victims) = (0u64, Vec::new());
                    for pass_pinned in [false, true] {
                        for s in &m.segs {
                            if freed >= need {
                                break;
                            }
                            if pinned(s.id) == pass_pinned {
                                freed += s.stored;
                                victims.push(s.id);
                            }
                        }
                    }
                    for s in m.segs.iter().filter(|s| victims.contains(&s.id)) {
                        m.dropped_full += s.ids.len() as u64;
                    }
                    m.segs.retain(|s| !victims.contains(&s.id));
                    let rec = res.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let ids: Vec<u64> = (m.next_id..m.next_id + n as u64).collect();
                    prop_assert_eq!((rec.first_id, rec.last_id), (ids[0], *ids.last().unwrap()));
                    prop_assert_eq!(rec.segment, m.next_seg);
                    m.next_id += n as u64;
                    m.segs.push_back(Seg { id: m.next_seg, ids, payloads, newest_ms: newest, stored });
                    m.next_seg += 1;
                }
                Op::Read { c, max } => {
                    let got = readers[c].try_next(max).await.unwrap();
                    let want: Vec<Seg> = m.segs.iter().filter(|s| s.id > m.positions[c]).take(max).cloned().collect();
                    prop_assert_eq!(got.len(), want.len());
                    for (g, w) in got.iter().zip(&want) {
                        prop_assert_eq!(g.id, w.id);
                        let gids: Vec<u64> = g.readings.iter().map(|r| r.id).collect();
                        prop_assert_eq!(&gids, &w.ids);
                        let gp: Vec<Vec<u8>> = g.readings.iter().map(|r| r.payload.to_vec()).collect();
                        prop_assert_eq!(&gp, &w.payloads);
                    }
                    if let Some(l) = want.last() {
                        m.positions[c] = l.id;
                        m.leases[c] = m.leases[c].max(l.id);
                        m.handed[c].extend(want.iter().map(|s| s.id));
                    }
                }
                Op::Ack { c, pick } => {
                    let cands: Vec<u64> = m.handed[c].iter().copied().filter(|&id| id > m.cursors[c]).collect();
                    if cands.is_empty() {
                        continue;
                    }
                    let target = cands[pick % cands.len()];
                    readers[c].ack(target).await.unwrap();
                    m.cursors[c] = target;
                    m.delete_acked();
                    m.sweep_ttl(ferry_buffer::now_ms());
                }
                Op::Rewind { c } => {
                    readers[c].rewind();
                    m.positions[c] = m.cursors[c];
                    m.handed[c].retain(|&id| id <= m.cursors[c]);
                }
                Op::Reopen => {
                    drop(readers);
                    buf.close().await;
                    buf = Buffer::open(dir.path(), options(max_bytes, when_full)).unwrap();
                    readers = CONSUMERS.iter().map(|c| buf.reader(c).unwrap()).collect();
                    m.positions = m.cursors;
                    m.leases = [0; 2];
                    for c in 0..2 {
                        let cur = m.cursors[c];
                        m.handed[c].retain(|&id| id <= cur);
                    }
                    // Counters are per process; the model's restart from zero too.
                    m.dropped_full = 0;
                    m.dropped_ttl = 0;
                    m.rejected = 0;
                }
            }
            let st = buf.stats();
            prop_assert_eq!(st.readings, m.segs.iter().map(|s| s.ids.len() as u64).sum::<u64>());
            prop_assert_eq!(st.segments, m.segs.len() as u64);
            prop_assert_eq!(st.stored_bytes, m.used());
            prop_assert!(st.used_bytes() <= max_bytes);
            prop_assert_eq!(st.dropped_full_total, m.dropped_full);
            prop_assert_eq!(st.dropped_ttl_total, m.dropped_ttl);
            prop_assert_eq!(st.rejected_full_total, m.rejected);
            prop_assert_eq!(st.next_reading_id, m.next_id);
        }
        buf.close().await;
        let ins = ferry_buffer::Inspector::open(dir.path()).unwrap();
        let rep = ins.verify().unwrap();
        prop_assert!(rep.problems.is_empty(), "{:?}", rep.problems);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn drop_oldest_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, WhenFull::DropOldest)?;
    }

    #[test]
    fn reject_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, WhenFull::Reject)?;
    }
}
