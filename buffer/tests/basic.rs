//! Behaviour of the public buffer API on a real file.

mod common;

use common::{opts, reading};
use ferry_buffer::{AppendError, Buffer, Compression, Inspector, WhenFull};
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test]
async fn append_read_ack_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), opts(&["kafka"])).unwrap();
    let r1 = buf
        .append((0..10).map(|i| reading(i, 80)).collect())
        .await
        .unwrap();
    assert_eq!((r1.first_id, r1.last_id, r1.count), (1, 10, 10));
    let r2 = buf.append(vec![reading(10, 80)]).await.unwrap();
    assert_eq!(r2.first_id, 11);
    assert!(r2.segment > r1.segment);

    let mut rd = buf.reader("kafka").unwrap();
    let segs = rd.next(10).await.unwrap();
    let ids: Vec<u64> = segs
        .iter()
        .flat_map(|s| s.readings.iter().map(|r| r.id))
        .collect();
    assert_eq!(ids, (1..=11).collect::<Vec<_>>());
    assert_eq!(segs[0].readings[3].payload, reading(3, 80).payload);
    rd.ack(segs[0].id).await.unwrap();
    let st = buf.stats();
    assert_eq!((st.readings, st.segments, st.acked_total), (1, 1, 10));
    buf.close().await;
    assert!(matches!(
        buf.append(vec![reading(0, 10)]).await,
        Err(AppendError::Closed { readings }) if readings.len() == 1
    ));

    // Reopen: the acked segment is gone, the other one is read again, ids keep growing.
    let buf = Buffer::open(dir.path(), opts(&["kafka"])).unwrap();
    let mut rd = buf.reader("kafka").unwrap();
    let segs = rd.next(10).await.unwrap();
    assert_eq!(segs.len(), 1);
    assert_eq!(segs[0].readings[0].id, 11);
    let r3 = buf.append(vec![reading(1, 10)]).await.unwrap();
    assert_eq!(r3.first_id, 12);
    buf.close().await;

    let ins = Inspector::open(dir.path()).unwrap();
    let st = ins.stats().unwrap();
    assert_eq!((st.readings, st.segments, st.next_reading_id), (2, 2, 13));
    assert!(ins.verify().unwrap().problems.is_empty());
}

#[tokio::test]
async fn submit_takes_its_place_when_called_not_when_polled() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), opts(&["kafka"])).unwrap();
    let a = buf.submit(vec![reading(0, 50), reading(1, 50)]);
    let b = buf.submit(vec![reading(2, 50)]);
    // Awaited in the opposite order, and the first only after a pause: it was sent anyway.
    let rb = b.await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ra = a.await.unwrap();
    assert_eq!((ra.first_id, ra.last_id), (1, 2));
    assert_eq!(rb.first_id, 3);
    // An empty submit commits nothing and reports the next id.
    let empty = buf.submit(Vec::new()).await.unwrap();
    assert_eq!((empty.count, empty.first_id), (0, 4));
    buf.close().await;
    assert!(matches!(
        buf.submit(vec![reading(3, 10)]).await,
        Err(AppendError::Closed { readings }) if readings.len() == 1
    ));
}

#[tokio::test]
async fn readings_awaiting_commit_are_counted_until_answered() {
    let dir = tempfile::tempdir().unwrap();
    // A 1 s gathering gap holds each commit back, so the counts can be seen in between.
    let o = ferry_buffer::BufferOptions {
        flush_interval: Duration::from_secs(1),
        max_flush_delay: Duration::from_secs(1),
        max_pending_bytes: 1000,
        ..opts(&["kafka"])
    };
    let buf = Buffer::open(dir.path(), o).unwrap();
    let (r1, r2) = (reading(0, 300), reading(1, 400));
    let (m1, m2) = (r1.memory_len() as u64, r2.memory_len() as u64);
    assert!(m1 > 300 + 150 && m2 > 400 + 150, "{m1} {m2}");
    assert_eq!(buf.pending_bytes(), 0);
    assert!(!buf.pending_over());
    let a = buf.submit(vec![r1]);
    assert_eq!(buf.pending_bytes(), m1);
    assert!(!buf.pending_over(), "{m1} is under the cap of 1000");
    let b = buf.submit(vec![r2]);
    assert_eq!(buf.pending_bytes(), m1 + m2);
    assert!(buf.pending_over());
    let g = buf.room_generation();
    // Waiting for room: not before the commit answers.
    let room = buf.room_since(g);
    tokio::pin!(room);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut room)
            .await
            .is_err(),
        "room before any commit"
    );
    // A dropped future stops counting; its readings still commit.
    drop(b);
    assert_eq!(buf.pending_bytes(), m1);
    tokio::time::timeout(Duration::from_secs(1), &mut room)
        .await
        .expect("room once under the cap");
    // That fall below the cap is counted: a caller paused before it may go on, even once
    // the room is taken again.
    assert_eq!(buf.room_generation(), g + 1);
    let b2 = buf.submit(vec![reading(3, 800)]);
    assert!(buf.pending_over());
    buf.room_since(g).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), buf.room_since(g + 1))
            .await
            .is_err(),
        "no second fall yet"
    );
    let ra = a.await.unwrap();
    b2.await.unwrap();
    assert_eq!(buf.pending_bytes(), 0);
    assert_eq!(buf.room_generation(), g + 2);
    assert_eq!(ra.first_id, 1);
    let mut rd = buf.reader("kafka").unwrap();
    let n: usize = rd
        .next(10)
        .await
        .unwrap()
        .iter()
        .map(|s| s.readings.len())
        .sum();
    assert_eq!(n, 3, "the dropped submit's reading is stored too");
    // Answered by a refusal (closed): counted until then, not after.
    buf.close().await;
    assert!(buf.submit(vec![reading(2, 10)]).await.is_err());
    assert_eq!(buf.pending_bytes(), 0);
    assert!(!buf.pending_over());
}

#[tokio::test]
async fn a_segment_is_deleted_only_when_every_consumer_acked_it() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), opts(&["kafka", "mqtt"])).unwrap();
    buf.append((0..5).map(|i| reading(i, 50)).collect())
        .await
        .unwrap();
    let mut k = buf.reader("kafka").unwrap();
    let mut m = buf.reader("mqtt").unwrap();
    let seg = k.next(1).await.unwrap()[0].id;
    k.ack(seg).await.unwrap();
    assert_eq!(buf.stats().readings, 5, "mqtt has not acked yet");
    assert_eq!(buf.lag("kafka").await.unwrap().readings, 0);
    assert_eq!(buf.lag("mqtt").await.unwrap().readings, 5);
    assert_eq!(m.next(1).await.unwrap()[0].id, seg);
    m.ack(seg).await.unwrap();
    assert_eq!(buf.stats().readings, 0);
    assert!(buf.reader("nobody").is_err());
}

#[tokio::test]
async fn rewind_reads_unacked_segments_again() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), opts(&["k"])).unwrap();
    for i in 0..3 {
        buf.append(vec![reading(i, 40)]).await.unwrap();
    }
    let mut rd = buf.reader("k").unwrap();
    let a = rd.next(10).await.unwrap();
    assert_eq!(a.len(), 3);
    rd.ack(a[0].id).await.unwrap();
    assert!(rd.try_next(10).await.unwrap().is_empty());
    rd.rewind();
    let b = rd.next(10).await.unwrap();
    assert_eq!(
        b.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![a[1].id, a[2].id]
    );
}

#[tokio::test]
async fn concurrent_appenders_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&["k"]);
    o.flush_interval = Duration::from_millis(20);
    let buf = Buffer::open(dir.path(), o).unwrap();
    let mut tasks = Vec::new();
    for t in 0..64 {
        let buf = buf.clone();
        tasks.push(tokio::spawn(async move {
            buf.append(vec![reading(t, 100)]).await.unwrap()
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().first_id);
    }
    assert_eq!(ids.len(), 64, "every append got its own id");
    let st = buf.stats();
    assert_eq!(st.appended_total, 64);
    assert!(
        st.commits_total < 16,
        "64 concurrent appends took {} commits; group commit is not grouping",
        st.commits_total
    );
}

/// A steady stream (appends 5 ms apart, under the 100 ms gap) keeps one commit gathering
/// until `max_flush_delay` (300 ms): about one commit per 300 ms, where a fixed 100 ms window
/// would commit three times as often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_gathers_until_the_delay_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&["k"]);
    o.flush_interval = Duration::from_millis(100);
    o.max_flush_delay = Duration::from_millis(300);
    o.flush_target_bytes = 1 << 30;
    let buf = Buffer::open(dir.path(), o).unwrap();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let buf = buf.clone();
        tasks.push(tokio::spawn(async move {
            buf.append(vec![reading(i, 100)]).await.unwrap()
        }));
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let st = buf.stats();
    assert_eq!(st.appended_total, i as u64);
    assert!(
        (3..=9).contains(&st.commits_total),
        "{} appends over 1.5 s took {} commits; with a 300 ms cap on a gathering commit \
         expected 3 to 9",
        i,
        st.commits_total
    );
}

/// A commit that already holds `flush_target_bytes` is written at once, whatever the gap and
/// the delay cap say.
#[tokio::test]
async fn a_commit_closes_at_the_target_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&["k"]);
    o.flush_interval = Duration::from_secs(30);
    o.max_flush_delay = Duration::from_secs(30);
    o.flush_target_bytes = 1000;
    let buf = Buffer::open(dir.path(), o).unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        buf.append((0..4).map(|i| reading(i, 500)).collect()),
    )
    .await
    .expect("a 2 kB append with a 1 kB flush target waited for the 30 s gap")
    .unwrap();
    assert_eq!(r.count, 4);
}

#[tokio::test]
async fn reject_mode_hands_readings_back_and_accepts_again_after_acks() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&["k"]);
    o.max_bytes = 1 << 20;
    o.max_batch_bytes = 64 << 10;
    o.when_full = WhenFull::Reject;
    let buf = Buffer::open(dir.path(), o).unwrap();
    let mut accepted = 0u64;
    let refused = loop {
        match buf
            .append((0..100).map(|i| reading(i, 1000)).collect())
            .await
        {
            Ok(r) => accepted += r.count as u64,
            Err(e) => break e,
        }
    };
    let AppendError::Full {
        readings,
        used,
        max,
        disk_reserve,
    } = refused
    else {
        panic!("expected Full, got {refused:?}")
    };
    assert_eq!(readings.len(), 100, "the refused readings come back");
    assert!(used <= max);
    assert!(
        !disk_reserve,
        "the byte cap refused, not the disk reserve (the test disk is far from it)"
    );
    let st = buf.stats();
    assert_eq!(st.readings, accepted);
    assert!(st.used_bytes() <= 1 << 20);
    assert_eq!(st.rejected_full_total, 100);
    assert_eq!(st.dropped_full_total, 0, "reject mode never drops");
    // Ack everything: space frees and appends succeed again.
    let mut rd = buf.reader("k").unwrap();
    let mut last = 0;
    loop {
        let s = rd.try_next(1000).await.unwrap();
        let Some(l) = s.last() else { break };
        last = l.id;
    }
    rd.ack(last).await.unwrap();
    buf.append(readings).await.unwrap();
}

#[tokio::test]
async fn drop_oldest_evicts_whole_segments_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&["k"]);
    o.max_bytes = 1 << 20;
    o.max_batch_bytes = 64 << 10;
    let buf = Buffer::open(dir.path(), o).unwrap();
    let mut total = 0u64;
    for _ in 0..40 {
        total += buf
            .append((0..50).map(|i| reading(i, 1000)).collect())
            .await
            .unwrap()
            .count as u64;
    }
    let st = buf.stats();
    assert!(st.used_bytes() <= 1 << 20);
    assert!(st.dropped_full_total > 0);
    assert_eq!(
        st.readings + st.dropped_full_total,
        total,
        "every reading is buffered or counted"
    );
    // What remains is the newest, contiguous by id.
    let mut rd = buf.reader("k").unwrap();
    let mut ids = Vec::new();
    loop {
        let s = rd.try_next(1000).await.unwrap();
        if s.is_empty() {
            break;
        }
        ids.extend(s.iter().flat_map(|s| s.readings.iter().map(|r| r.id)));
    }
    assert_eq!(*ids.last().unwrap(), total);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
}

#[tokio::test]
async fn ttl_drops_old_readings_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ferry_buffer::ManualClock::new("boot-a", 1_800_000_000_000, 60_000, true);
    let mut o = opts(&["k"]);
    o.max_age = Some(Duration::from_secs(60));
    o.clock = std::sync::Arc::new(clock.clone());
    let buf = Buffer::open(dir.path(), o).unwrap();
    buf.append(vec![common::reading_at(1, 20, &clock)])
        .await
        .unwrap();
    clock.advance(59_000);
    buf.append(vec![common::reading_at(2, 20, &clock)])
        .await
        .unwrap();
    assert_eq!(
        buf.stats().dropped_ttl_total,
        0,
        "59 s old is within a 60 s TTL"
    );
    clock.advance(2_000);
    // The next commit sweeps the expired segment before writing its own.
    buf.append(vec![common::reading_at(3, 20, &clock)])
        .await
        .unwrap();
    let st = buf.stats();
    assert_eq!(st.dropped_ttl_total, 1);
    assert_eq!(st.readings, 2);
    assert_eq!(st.oldest_age_ms, Some(2_000));
}

/// The TTL counts the time a reading waited, by the boot clock: a wall clock stepped
/// forward by days (NTP's first sync on a Pi) or a device timestamp from last year drops
/// nothing that arrived seconds ago.
#[tokio::test]
async fn ttl_ignores_wall_clock_jumps_and_device_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ferry_buffer::ManualClock::new("boot-a", 1_000_000_000_000, 30_000, false);
    let mut o = opts(&["k"]);
    o.max_age = Some(Duration::from_secs(3600));
    o.clock = std::sync::Arc::new(clock.clone());
    let buf = Buffer::open(dir.path(), o).unwrap();
    let mut device = common::reading_at(1, 20, &clock);
    device.received_at_ms -= 400 * 86_400_000;
    device.clock.mark = ferry_buffer::ClockMark::Device;
    buf.append(vec![device, common::reading_at(2, 20, &clock)])
        .await
        .unwrap();
    clock.advance(60_000);
    clock.step_wall(3 * 86_400_000);
    clock.set_synced(true);
    buf.append(vec![common::reading_at(3, 20, &clock)])
        .await
        .unwrap();
    let st = buf.stats();
    assert_eq!(st.dropped_ttl_total, 0, "{st:?}");
    assert_eq!(st.readings, 3);
    assert_eq!(st.oldest_age_ms, Some(60_000));
    assert_eq!(buf.clock().jumps_total, 1);
    // And an hour later by the boot clock, they go.
    clock.advance(3_600_001);
    buf.append(vec![common::reading_at(4, 20, &clock)])
        .await
        .unwrap();
    assert_eq!(buf.stats().dropped_ttl_total, 3);
}

#[tokio::test]
async fn dead_letters_can_be_listed_and_requeued_with_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), opts(&["k"])).unwrap();
    buf.append((0..3).map(|i| reading(i, 30)).collect())
        .await
        .unwrap();
    let mut rd = buf.reader("k").unwrap();
    let seg = rd.next(1).await.unwrap().remove(0);
    let bad = seg.readings[1].clone();
    rd.dead_letter(vec![(bad.clone(), "MSG_SIZE_TOO_LARGE".into())])
        .await
        .unwrap();
    rd.ack(seg.id).await.unwrap();
    let st = buf.stats();
    assert_eq!((st.readings, st.dead_letters), (0, 1));
    let dl = buf.dead_letters(0, 10).await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].reason, "MSG_SIZE_TOO_LARGE");
    assert_eq!(dl[0].consumer, "k");
    assert_eq!(dl[0].reading.payload, bad.payload);
    assert_eq!(buf.requeue(None).await.unwrap(), 1);
    let again = rd.next(1).await.unwrap().remove(0);
    assert_eq!(again.readings.len(), 1);
    assert_eq!(
        again.readings[0].id, bad.id,
        "a requeued reading keeps its id"
    );
    assert_eq!(buf.stats().dead_letters, 0);
}

#[tokio::test]
async fn gzip_segments_are_smaller_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&["k"]);
    o.compression = Compression::Gzip { level: 3 };
    let buf = Buffer::open(dir.path(), o).unwrap();
    let rs: Vec<_> = (0..500).map(|i| reading(i, 100)).collect();
    buf.append(rs.clone()).await.unwrap();
    let st = buf.stats();
    assert!(st.stored_bytes_total * 3 < st.raw_bytes_total, "{st:?}");
    let got = buf.reader("k").unwrap().next(10).await.unwrap();
    let payloads: Vec<_> = got
        .iter()
        .flat_map(|s| s.readings.iter().map(|r| r.payload.clone()))
        .collect();
    assert_eq!(
        payloads,
        rs.iter().map(|r| r.payload.clone()).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_corrupt_file_is_quarantined_and_a_fresh_buffer_starts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let buf = Buffer::open(dir.path(), opts(&["k"])).unwrap();
        buf.append(vec![reading(1, 10)]).await.unwrap();
        buf.close().await;
    }
    let path = dir.path().join(ferry_buffer::FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b = 0xAB;
    }
    std::fs::write(&path, &bytes).unwrap();
    let buf = Buffer::open(dir.path(), opts(&["k"])).unwrap();
    let st = buf.stats();
    assert_eq!(st.quarantined.len(), 1, "{st:?}");
    assert!(st.quarantined[0].starts_with(dir.path().join("quarantine")));
    assert_eq!(
        std::fs::read(&st.quarantined[0]).unwrap(),
        bytes,
        "moved aside untouched"
    );
    assert_eq!(st.readings, 0);
    buf.append(vec![reading(2, 10)]).await.unwrap();
    buf.close().await;
    // The flag survives a restart.
    let buf = Buffer::open(dir.path(), opts(&["k"])).unwrap();
    assert_eq!(buf.stats().quarantined.len(), 1);
    assert_eq!(buf.stats().readings, 1);
}

#[tokio::test]
async fn a_truncated_file_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    {
        let buf = Buffer::open(dir.path(), opts(&["k"])).unwrap();
        buf.append((0..100).map(|i| reading(i, 100)).collect())
            .await
            .unwrap();
        buf.close().await;
    }
    let path = dir.path().join(ferry_buffer::FILE_NAME);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(100).unwrap();
    drop(f);
    let buf = Buffer::open(dir.path(), opts(&["k"])).unwrap();
    assert_eq!(buf.stats().quarantined.len(), 1);
}

#[tokio::test]
async fn a_second_opener_is_refused_clearly_and_an_inspector_reads_while_the_buffer_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), opts(&["k"])).unwrap();
    buf.append(vec![reading(1, 10)]).await.unwrap();
    let err = Buffer::open(dir.path(), opts(&["k"])).unwrap_err();
    assert!(
        matches!(err, ferry_buffer::OpenError::InUse { .. }),
        "{err}"
    );
    // The inspector reads an open buffer's file without a lock and without changing it.
    let ins = Inspector::open(dir.path()).unwrap();
    assert_eq!(ins.state(), ferry_buffer::FileState::InUse);
    assert_eq!(ins.stats().unwrap().readings, 1);
    drop(ins);
    buf.append(vec![reading(2, 10)]).await.unwrap();
    let (readings, state) =
        Inspector::consistent(dir.path(), |ins| Ok(ins.stats()?.readings)).unwrap();
    assert_eq!((readings, state), (2, ferry_buffer::FileState::InUse));
    buf.close().await;
    let ins = Inspector::open(dir.path()).unwrap();
    assert_eq!(ins.state(), ferry_buffer::FileState::Closed);
    assert_eq!(ins.stats().unwrap().readings, 2);
    assert_eq!(ins.lag("k").unwrap().readings, 2);
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _buf = Buffer::open(&data, opts(&["k"])).unwrap();
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

#[tokio::test]
async fn ping_answers_while_the_writer_runs_and_not_after_close() {
    let dir = tempfile::tempdir().unwrap();
    let buf = Buffer::open(dir.path(), opts(&["k"])).unwrap();
    assert!(buf.ping(Duration::from_secs(5)).await);
    buf.close().await;
    assert!(!buf.ping(Duration::from_millis(200)).await);
}

/// A file redb refuses (its header overwritten) still gives back every intact segment to
/// `salvage`, once each, and nothing damaged.
#[tokio::test]
async fn salvage_recovers_the_segments_of_a_file_redb_refuses() {
    use std::io::{Seek, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&["k"]);
    o.compression = Compression::Gzip { level: 3 };
    let buf = Buffer::open(dir.path(), o).unwrap();
    for c in 0..40 {
        buf.append((0..25).map(|i| reading(c * 25 + i, 120)).collect())
            .await
            .unwrap();
    }
    // Ack the first 10 commits: their segments are deleted, but their pages may linger.
    let mut rd = buf.reader("k").unwrap();
    let segs = rd.next(10).await.unwrap();
    rd.ack(segs.last().unwrap().id).await.unwrap();
    buf.close().await;
    let file = dir.path().join(ferry_buffer::FILE_NAME);
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all(&[0xA5; 4096]).unwrap();
    // And scribble over one more place in the middle.
    let len = f.metadata().unwrap().len();
    f.seek(std::io::SeekFrom::Start(len / 2)).unwrap();
    f.write_all(&[0x5A; 2048]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(
        Inspector::open(dir.path()).is_err(),
        "redb must refuse the damaged file"
    );
    let mut ids = BTreeSet::new();
    let rep = ferry_buffer::salvage(&file, |r| {
        assert!(ids.insert(r.id), "reading {} handed out twice", r.id);
        assert_eq!(r.payload, reading(r.id as usize - 1, 120).payload);
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    eprintln!("{rep:?}");
    // Every unacked reading not on the scribbled 2 KiB comes back: at most two segments of
    // 25 are lost there.
    let unacked = ids.iter().filter(|&&id| id > 250).count();
    assert!(
        unacked >= 750 - 50,
        "{unacked} of 750 unacked readings: {rep:?}"
    );
    assert_eq!(rep.readings as usize, ids.len());
}

#[tokio::test]
async fn state_commits_with_its_append_and_survives_reopen() {
    use ferry_buffer::StateWrite;
    let put = |k: &str, v: &str| StateWrite::Put(k.into(), v.as_bytes().to_vec());
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&["k"]);
    o.max_bytes = 1 << 20;
    o.when_full = WhenFull::Reject;
    let buf = Buffer::open(dir.path(), o.clone()).unwrap();
    assert!(buf.state("retained/").unwrap().is_empty());
    buf.submit_with_state(
        vec![reading(0, 50)],
        vec![
            put("retained/a", "1"),
            put("retained/b", "2"),
            put("other/x", "9"),
        ],
    )
    .await
    .unwrap();
    // Replace one key, delete another; with no readings the state is still committed.
    buf.submit_with_state(
        Vec::new(),
        vec![
            put("retained/a", "3"),
            StateWrite::Delete("retained/b".into()),
            put("other/y/1", "1"),
            put("other/y/2", "2"),
            put("other/z", "3"),
        ],
    )
    .await
    .unwrap();
    // A prefix is deleted whole, and nothing beside it.
    buf.submit_with_state(
        Vec::new(),
        vec![StateWrite::DeletePrefix("other/y/".into())],
    )
    .await
    .unwrap();
    // Appends of 100 readings until the byte cap refuses one: each writes `kept-<n>`; the
    // refused one's write (`kept-<n>` of the last n) must not be in the file.
    let mut n = 0;
    let refused = loop {
        match buf
            .submit_with_state(
                (0..100).map(|i| reading(i, 1000)).collect(),
                vec![put("retained/c", &format!("kept-{n}"))],
            )
            .await
        {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 1000, "the cap never refused an append");
    };
    assert!(matches!(refused, AppendError::Full { .. }));
    assert!(n > 0);
    buf.close().await;

    let buf = Buffer::open(dir.path(), o).unwrap();
    assert_eq!(
        buf.state("retained/").unwrap(),
        vec![
            ("retained/a".to_string(), b"3".to_vec()),
            (
                "retained/c".to_string(),
                format!("kept-{}", n - 1).into_bytes()
            )
        ]
    );
    let other: Vec<String> = buf
        .state("other/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(other, ["other/x", "other/z"]);
    buf.close().await;
}
