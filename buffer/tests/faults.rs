//! Fault injection through a custom redb `StorageBackend`: power loss at the N-th sync, and a
//! full disk that later frees up.

mod common;

use common::{Disk, Fault, factory, opts, reading};
use ferry_buffer::{AppendError, Buffer, StorageFailureKind};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Runs appends (some concurrent) and acks until the disk freezes at sync `n`, then builds the
/// crash image with a pseudo-random subset of the unsynced writes, reopens it, and checks that
/// every append that returned Ok is there exactly once and no acked segment came back. Runs
/// with redb's 1-phase commit (the default) and with quick-repair's 2-phase commit.
async fn crash_at_sync(n: u64, seed: u64, quick_repair: bool) -> (bool, usize) {
    let disk = Arc::new(Mutex::new(Disk::default()));
    let mut o = opts(&["k"]);
    o.quick_repair = quick_repair;
    let buf = Buffer::open_with_backend(factory(disk.clone()), o).unwrap();
    {
        let mut d = disk.lock().unwrap();
        d.freeze_at_sync = Some(d.syncs + n);
    }
    let mut acked_ok: BTreeMap<u64, String> = BTreeMap::new();
    let mut acked_segment = 0u64;
    let mut rd = buf.reader("k").unwrap();
    for round in 0..40usize {
        let mut tasks = Vec::new();
        for t in 0..3 {
            let buf = buf.clone();
            let rs: Vec<_> = (0..1 + (round + t) % 4)
                .map(|i| reading(round * 10 + t * 3 + i, 60))
                .collect();
            tasks.push(tokio::spawn(async move {
                let payloads: Vec<String> = rs
                    .iter()
                    .map(|r| String::from_utf8(r.payload.to_vec()).unwrap())
                    .collect();
                (buf.append(rs).await, payloads)
            }));
        }
        for t in tasks {
            let (res, payloads) = t.await.unwrap();
            if let Ok(rec) = res {
                for (id, p) in (rec.first_id..=rec.last_id).zip(payloads) {
                    acked_ok.insert(id, p);
                }
            }
        }
        if round % 3 == 2 {
            // One segment at a time: an ack covers every segment up to its id.
            if let Ok(segs) = rd.try_next(1).await
                && let Some(s) = segs.first()
                && rd.ack(s.id).await.is_ok()
            {
                acked_segment = s.id;
                for r in &s.readings {
                    acked_ok.remove(&r.id);
                }
            }
        }
    }
    drop(rd);
    buf.close().await;
    let frozen = disk.lock().unwrap().fault == Fault::Frozen;

    // Restart on what the disk really holds.
    let mut x = seed;
    let image = disk.lock().unwrap().crash_image(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x.is_multiple_of(2)
    });
    let disk2 = Arc::new(Mutex::new(Disk {
        volatile: image.clone(),
        durable: image,
        ..Disk::default()
    }));
    let buf = Buffer::open_with_backend(factory(disk2), opts(&["k"])).unwrap();
    let mut rd = buf.reader("k").unwrap();
    let mut seen: BTreeMap<u64, String> = BTreeMap::new();
    loop {
        let segs = rd.try_next(100).await.unwrap();
        if segs.is_empty() {
            break;
        }
        for s in segs {
            assert!(
                s.id > acked_segment,
                "sync {n}: acked segment {} came back",
                s.id
            );
            for r in s.readings {
                let p = String::from_utf8(r.payload.to_vec()).unwrap();
                assert!(
                    seen.insert(r.id, p).is_none(),
                    "sync {n}: reading {} twice",
                    r.id
                );
            }
        }
    }
    for (id, p) in &acked_ok {
        assert_eq!(
            seen.get(id),
            Some(p),
            "sync {n}: acknowledged reading {id} lost (frozen={frozen})"
        );
    }
    assert_eq!(buf.stats().corrupt_segments_total, 0);
    (frozen, acked_ok.len())
}

#[tokio::test]
async fn power_loss_at_every_sync_loses_nothing_acknowledged() {
    let mut froze = 0;
    let mut checked = 0;
    for n in 1..=60 {
        let (frozen, acked) = crash_at_sync(n, 0x9E37_79B9_7F4A_7C15 ^ n, n % 2 == 0).await;
        froze += frozen as usize;
        checked += acked;
    }
    // The workload must really be cut by the power loss, and leave readings to check.
    assert!(
        froze >= 40,
        "only {froze} of 60 runs reached their power loss"
    );
    assert!(
        checked > 500,
        "only {checked} acknowledged readings were checked"
    );
}

#[tokio::test]
async fn a_full_disk_fails_appends_clearly_and_recovers_without_restart() {
    let disk = Arc::new(Mutex::new(Disk::default()));
    let buf = Buffer::open_with_backend(factory(disk.clone()), opts(&["k"])).unwrap();
    let before = buf
        .append((0..5).map(|i| reading(i, 50)).collect())
        .await
        .unwrap();

    disk.lock().unwrap().fault = Fault::DiskFull;
    for _ in 0..3 {
        let err = buf.append(vec![reading(9, 2000)]).await.unwrap_err();
        match &err {
            AppendError::Storage { readings, source } => {
                assert_eq!(readings.len(), 1, "the reading is handed back");
                assert_eq!(source.kind, StorageFailureKind::DiskFull, "{err}");
            }
            other => panic!("expected a storage error, got {other}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let st = buf.stats();
    assert!(!st.writable());
    assert!(st.rejected_storage_total >= 3);

    // Space comes back: the writer reopens the file by itself.
    disk.lock().unwrap().fault = Fault::None;
    let mut after = None;
    for _ in 0..50 {
        match buf.append(vec![reading(10, 50)]).await {
            Ok(r) => {
                after = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    let after = after.expect("appends succeed again once the disk has room");
    assert!(after.first_id > before.last_id);
    assert!(buf.stats().writable());
    let mut rd = buf.reader("k").unwrap();
    let ids: Vec<u64> = rd
        .next(100)
        .await
        .unwrap()
        .iter()
        .flat_map(|s| s.readings.iter().map(|r| r.id))
        .collect();
    assert_eq!(
        ids,
        vec![1, 2, 3, 4, 5, after.first_id],
        "nothing acknowledged was lost"
    );
}
