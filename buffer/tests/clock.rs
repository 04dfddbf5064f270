//! Time on a box without a clock, through the real buffer file: readings stamped before the
//! sync leave with corrected times, readings of a boot that never synced keep theirs and say
//! so, and a reboot never lends one boot's offset to another; an export reads the same times.

mod common;

use common::{opts, reading_at};
use ferry_buffer::{Buffer, ClockMark, ManualClock, Reading};
use std::path::Path;
use std::sync::Arc;

const DAY: u64 = 86_400_000;
/// 2027-01-15T10:00:00Z: the real time of the scenario.
const REAL: u64 = 1_800_000_000_000;

fn open(dir: &Path, clock: &ManualClock) -> Buffer {
    let mut o = opts(&["up"]);
    o.clock = Arc::new(clock.clone());
    Buffer::open(dir, o).unwrap()
}

async fn drain(buf: &Buffer) -> Vec<Reading> {
    let mut rd = buf.reader("up").unwrap();
    let mut out = Vec::new();
    loop {
        let segs = rd.try_next(100).await.unwrap();
        if segs.is_empty() {
            return out;
        }
        for s in segs {
            // What an uplink that ships the stored segment sends says the same.
            assert_eq!(
                ferry_buffer::segment::decode_segment(&s.stored).unwrap(),
                s.readings,
                "segment {} as stored differs from its readings",
                s.id
            );
            out.extend(s.readings);
        }
    }
}

fn times(rs: &[Reading]) -> Vec<(u64, u64, ClockMark)> {
    rs.iter()
        .map(|r| (r.id, r.received_at_ms, r.clock.mark))
        .collect()
}

/// The Pi boots 3 days behind (fake-hwclock), takes readings for 10 minutes, then NTP syncs
/// and steps the clock forward: the early readings are corrected to the real time.
#[tokio::test]
async fn readings_before_the_sync_get_corrected_times() {
    let dir = tempfile::tempdir().unwrap();
    // 30 s after boot, the wall clock says 3 days ago.
    let clock = ManualClock::new("boot-1", REAL - 3 * DAY, 30_000, false);
    let buf = open(dir.path(), &clock);
    let mut first = reading_at(1, 30, &clock);
    first.received_at_ms = REAL - 3 * DAY;
    buf.append(vec![first]).await.unwrap();
    clock.advance(600_000);
    let mut second = reading_at(2, 30, &clock);
    second.received_at_ms = REAL - 3 * DAY + 600_000;
    buf.append(vec![second]).await.unwrap();

    // Before the sync, they go out as they are, marked.
    assert_eq!(
        times(&drain(&buf).await),
        vec![
            (1, REAL - 3 * DAY, ClockMark::Unsynced),
            (2, REAL - 3 * DAY + 600_000, ClockMark::Unsynced)
        ]
    );
    assert!(!buf.clock().synchronized);

    // NTP: 20 s later the clock jumps to the real time (REAL + 620 s).
    clock.advance(20_000);
    clock.step_wall(3 * DAY as i64);
    clock.set_synced(true);
    let mut third = reading_at(3, 30, &clock);
    third.received_at_ms = REAL + 620_000;
    buf.append(vec![third]).await.unwrap();
    assert_eq!(
        times(&drain(&buf).await),
        vec![
            (1, REAL, ClockMark::Corrected),
            (2, REAL + 600_000, ClockMark::Corrected),
            (3, REAL + 620_000, ClockMark::Synced)
        ]
    );
    let st = buf.clock();
    assert!(st.synchronized);
    assert_eq!(st.jumps_total, 1);
    assert_eq!(st.synced_at_boottime_ms, Some(650_000));
    // Ages go by the boot clock: the first reading waited 620 s, not 3 days.
    assert_eq!(buf.stats().oldest_age_ms, Some(620_000));
    let lag = buf.lag("up").await.unwrap();
    assert_eq!(lag.oldest_age_ms, Some(620_000));

    // The correction survives a restart of ferry in the same boot (the sync point is saved).
    buf.close().await;
    clock.advance(5_000);
    let buf = open(dir.path(), &clock);
    let got = times(&drain(&buf).await);
    assert_eq!(got[0], (1, REAL, ClockMark::Corrected));
    buf.close().await;
}

/// ferry restarts before the sync, in the same boot: its earlier readings are still this
/// boot's, and the sync after the restart corrects them.
#[tokio::test]
async fn a_restart_in_the_same_boot_still_corrects() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new("boot-1", 0, 20_000, false);
    let buf = open(dir.path(), &clock);
    buf.append(vec![reading_at(1, 30, &clock)]).await.unwrap();
    buf.close().await;
    clock.advance(40_000);
    let buf = open(dir.path(), &clock);
    clock.advance(1_000);
    clock.reboot("boot-1", REAL, 61_000, true);
    buf.append(vec![reading_at(2, 30, &clock)]).await.unwrap();
    let got = times(&drain(&buf).await);
    assert_eq!(got[0], (1, REAL - 41_000, ClockMark::Corrected));
    assert_eq!(got[1].2, ClockMark::Synced);
    buf.close().await;
}

/// Power cut before the sync: the next boot syncs, but its offset says nothing about the
/// previous boot's readings, so they keep their time and stay `unsynced`. A previous boot
/// that did sync (and saved it) has its early readings corrected with its own offset.
#[tokio::test]
async fn a_reboot_never_lends_its_offset_to_an_earlier_boot() {
    let dir = tempfile::tempdir().unwrap();
    // Boot 1: never synced.
    let clock = ManualClock::new("boot-1", 0, 20_000, false);
    let buf = open(dir.path(), &clock);
    let mut a = reading_at(1, 30, &clock);
    a.received_at_ms = 20_000;
    buf.append(vec![a]).await.unwrap();
    buf.close().await;

    // Boot 2: comes up unsynchronized, takes a reading, syncs, is cut off again.
    clock.reboot("boot-2", 5_000, 10_000, false);
    let buf = open(dir.path(), &clock);
    let mut b = reading_at(2, 30, &clock);
    b.received_at_ms = 5_000;
    buf.append(vec![b]).await.unwrap();
    clock.advance(1_000);
    clock.step_wall(REAL as i64 - 6_000);
    clock.set_synced(true);
    let mut c = reading_at(3, 30, &clock);
    c.received_at_ms = REAL;
    buf.append(vec![c]).await.unwrap();
    buf.close().await;

    // Boot 3: synchronized from the start.
    clock.reboot("boot-3", REAL + DAY, 15_000, true);
    let buf = open(dir.path(), &clock);
    let got = times(&drain(&buf).await);
    assert_eq!(got[0], (1, 20_000, ClockMark::Unsynced), "{got:?}");
    assert_eq!(got[1], (2, REAL - 1_000, ClockMark::Corrected), "{got:?}");
    assert_eq!(got[2], (3, REAL, ClockMark::Synced), "{got:?}");
    // The oldest reading is from a boot that never synced: its age cannot be known, so the
    // status says so rather than guess.
    assert_eq!(buf.stats().oldest_age_ms, None);
    buf.close().await;
}

/// A dead letter keeps the clock stamp; requeued, it goes out with it.
#[tokio::test]
async fn dead_letters_keep_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new("boot-1", REAL, 20_000, true);
    let buf = open(dir.path(), &clock);
    buf.append(vec![reading_at(1, 30, &clock)]).await.unwrap();
    let mut rd = buf.reader("up").unwrap();
    let segs = rd.try_next(10).await.unwrap();
    let r = segs[0].readings[0].clone();
    assert_eq!(r.clock.mark, ClockMark::Synced);
    assert_eq!(r.clock.boottime_ms, 20_000);
    rd.dead_letter(vec![(r.clone(), "refused".into())])
        .await
        .unwrap();
    rd.ack(segs[0].id).await.unwrap();
    let dead = buf.dead_letters(0, 10).await.unwrap();
    assert_eq!(dead[0].reading, r);
    buf.requeue(None).await.unwrap();
    let got = drain(&buf).await;
    assert_eq!((got[0].id, got[0].clock), (r.id, r.clock));
    buf.close().await;
}

/// A time the ingest format gives relative to now (SenML `t: -60`) keeps its offset through
/// the correction; a device's own absolute timestamp is neither corrected nor used for ages.
#[tokio::test]
async fn relative_times_keep_their_offset_and_device_times_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new("boot-1", 1_000_000, 300_000, false);
    let buf = open(dir.path(), &clock);
    let mut relative = reading_at(1, 30, &clock);
    relative.received_at_ms -= 60_000;
    let mut device = reading_at(2, 30, &clock);
    device.received_at_ms = 1_700_000_000_000;
    device.clock.mark = ClockMark::Device;
    buf.append(vec![relative, device]).await.unwrap();
    clock.advance(10_000);
    clock.step_wall((REAL - 1_010_000) as i64);
    clock.set_synced(true);
    buf.append(vec![reading_at(3, 30, &clock)]).await.unwrap();
    let got = times(&drain(&buf).await);
    assert_eq!(got[0], (1, REAL - 10_000 - 60_000, ClockMark::Corrected));
    assert_eq!(got[1], (2, 1_700_000_000_000, ClockMark::Device));
    // The oldest by receipt is the relative one: 70 s by the time it claims.
    assert_eq!(buf.stats().oldest_age_ms, Some(70_000));
    buf.close().await;
}

/// An export reads every intact segment of a file, corrects times as an uplink would, and
/// skips (and lists) a segment whose checksum fails, with the readings it held.
#[tokio::test]
async fn export_reads_what_is_intact_and_lists_what_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new("boot-1", 5_000, 20_000, false);
    let mut o = opts(&["up"]);
    o.clock = Arc::new(clock.clone());
    o.gateway_id = Some("site-a".into());
    let buf = Buffer::open(dir.path(), o).unwrap();
    for i in 0..3 {
        buf.append(vec![
            reading_at(i, 30, &clock),
            reading_at(i + 10, 30, &clock),
        ])
        .await
        .unwrap();
    }
    clock.step_wall(REAL as i64);
    clock.set_synced(true);
    buf.append(vec![reading_at(3, 30, &clock)]).await.unwrap();
    buf.close().await;

    // Damage the second segment's body (a flipped byte its CRC catches).
    {
        use redb::ReadableTable;
        let db = redb::Database::open(dir.path().join(ferry_buffer::FILE_NAME)).unwrap();
        let t: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("segments");
        let txn = db.begin_write().unwrap();
        {
            let mut segs = txn.open_table(t).unwrap();
            let mut v = segs.get(2).unwrap().unwrap().value().to_vec();
            let last = v.len() - 1;
            v[last] ^= 0x55;
            segs.insert(2, v.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let ins = ferry_buffer::Inspector::open(dir.path()).unwrap();
    assert_eq!(ins.gateway_id().unwrap().as_deref(), Some("site-a"));
    let mut got = Vec::new();
    let rep = ins
        .export(|r| {
            got.push((r.id, r.received_at_ms, r.clock.mark));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(rep.segments, 4);
    assert_eq!(rep.readings, 5);
    assert_eq!(rep.damaged.len(), 1, "{rep:?}");
    assert_eq!((rep.damaged[0].segment, rep.damaged[0].readings), (2, 2));
    let ids: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(ids, vec![1, 2, 5, 6, 7]);
    // Received 5 s after the (wrong) boot-time wall clock, corrected to the real time.
    assert_eq!(got[0].1, REAL + 5_000);
    assert_eq!(got[0].2, ClockMark::Corrected);
    assert_eq!(got[4].2, ClockMark::Synced);
}

/// A synchronized clock stepped back a day (an operator's `date -s`, a bad time server):
/// ages still go by the boot clock, so new readings do not look older than old ones, the
/// TTL neither drops nor keeps anything for it, and the step is counted.
#[tokio::test]
async fn a_backward_jump_changes_no_age() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new("boot-1", REAL, 60_000, true);
    let mut o = opts(&["up"]);
    o.clock = Arc::new(clock.clone());
    o.max_age = Some(std::time::Duration::from_secs(3600));
    let buf = Buffer::open(dir.path(), o).unwrap();
    buf.append(vec![reading_at(1, 30, &clock)]).await.unwrap();
    clock.advance(10 * 60_000);
    clock.step_wall(-(DAY as i64));
    buf.append(vec![reading_at(2, 30, &clock)]).await.unwrap();
    assert_eq!(buf.clock().jumps_total, 1);
    assert_eq!(buf.clock().last_jump.map(|j| j.0), Some(-(DAY as i64)));
    assert_eq!(buf.stats().oldest_age_ms, Some(10 * 60_000));
    // 50 more minutes: the first reading has waited an hour by the boot clock, not 23 h.
    clock.advance(50 * 60_000 + 1);
    buf.append(vec![reading_at(3, 30, &clock)]).await.unwrap();
    let st = buf.stats();
    assert_eq!(st.dropped_ttl_total, 1, "{st:?}");
    assert_eq!(st.readings, 2);
    assert_eq!(st.oldest_age_ms, Some(50 * 60_000 + 1));
    // Both went out as they were received: synced, with the wall clock of their moment.
    let got = times(&drain(&buf).await);
    assert_eq!(got[0], (2, REAL + 10 * 60_000 - DAY, ClockMark::Synced));
    buf.close().await;
}
