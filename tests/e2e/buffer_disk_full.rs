//! Reliability suite 3: the disk fills up.
//!
//! ferry's data directory is put on a 6 MiB tmpfs mounted for the test, most of which a
//! filler file takes; the buffer cap is far larger, so the disk runs out first. HTTP and
//! MQTT v5 ingest go on until the disk is full. Asserted:
//! - ingest refuses clearly: HTTP 503 `buffer-storage`, MQTT v5 PUBACK 0x80, and the status
//!   API says the buffer is not writable;
//! - when the filler is deleted, ingest works again without a restart;
//! - the buffer is never corrupted: `ferry buffer verify` passes, and every acknowledged
//!   reading is in it.
//!
//!
//! With a disk reserve (`buffer.min_free_bytes`) the disk is a limit ferry keeps rather than
//! runs into: `drop_oldest` evicts inside the file and `reject` refuses, while the free space
//! stays near the reserve; with nothing left to evict, `drop_oldest` refuses too.
//!
//! Mounting needs root (CI runs as root). Without it the test skips loudly, or fails under
//! `FERRY_REQUIRE_TOOLS=1`.

use crate::support;

use ferry_tests::{Ferry, buffered_readings};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::Tally;

/// A tmpfs mounted for the test, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Result<SmallFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallFs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A tmpfs of `size`, or `None` after the loud skip (or a panic under FERRY_REQUIRE_TOOLS=1).
fn small_fs(size: &str, test: &str) -> Option<SmallFs> {
    match SmallFs::mount(size) {
        Ok(fs) => Some(fs),
        Err(why) => {
            let msg = format!("cannot mount a tmpfs for the data directory ({why}); run as root");
            if std::env::var("FERRY_REQUIRE_TOOLS").as_deref() == Ok("1") {
                panic!("{test}: {msg} (FERRY_REQUIRE_TOOLS=1)");
            }
            eprintln!(
                "\n==========================================================\n\
                 SKIPPED {test}: {msg}\n\
                 ==========================================================\n"
            );
            None
        }
    }
}

/// Writes a filler file that leaves about `free` bytes free on `fs`: other files took the
/// space. Returns its path, to delete it when the space should come back.
fn fill_leaving(fs: &SmallFs, free: u64) -> PathBuf {
    let filler = fs.path().join("filler");
    let now = free_bytes(fs.path());
    std::fs::write(&filler, vec![0u8; now.saturating_sub(free) as usize]).unwrap();
    filler
}

/// HTTP batches of 50 readings (payloads padded to 400 bytes) keyed under `prefix`, back to
/// back until `stop`, counted in the returned tally.
fn start_http_load(
    rt: &tokio::runtime::Runtime,
    base: &str,
    prefix: &str,
) -> (Arc<Tally>, Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let task = rt.spawn(support::http_batcher(
        base.to_string(),
        prefix.into(),
        50,
        400,
        Duration::ZERO,
        tally.clone(),
        stop.clone(),
    ));
    (tally, stop, task)
}

fn free_bytes(p: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

/// One MQTT v5 QoS 1 publish; returns the PUBACK reason.
async fn v5_publish(addr: std::net::SocketAddr, id: &str, body: String) -> PubAckReason {
    let opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .publish("rel/disk", QoS::AtLeastOnce, false, body)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no PUBACK in 20 s");
        match tokio::time::timeout(Duration::from_secs(20), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                let _ = client.disconnect().await;
                return a.reason;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("MQTT connection failed: {e}"),
            Err(_) => panic!("no PUBACK in 20 s"),
        }
    }
}

#[test]
fn a_full_disk_refuses_clearly_and_recovers_without_restart() {
    let Some(fs) = small_fs("6m", "a_full_disk_refuses_clearly") else {
        return;
    };
    let data_dir: PathBuf = fs.path().join("data");
    let mut ferry = Ferry::start_in(
        r#"
[gateway]
id = "disk-full"

[buffer]
max_bytes = 268435456
max_batch_bytes = 262144
# No reserve: this test is about the disk really running out.
min_free_bytes = 0
"#,
        &[],
        Some(&data_dir),
    );
    let base = ferry.http_url();
    let mqtt = ferry.addr("mqtt");
    // Leave about 1.5 MiB free.
    let filler = fill_leaving(&fs, 1536 * 1024);

    let rt = support::rt();
    let (tally, stop, task) = start_http_load(&rt, &base, "fill");
    let t = Instant::now();
    while tally.refused().len() < 150 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    rt.block_on(task).unwrap();
    let kinds = tally.refusal_kinds.lock().unwrap().clone();
    assert!(
        tally.refused().len() >= 150,
        "the disk never filled: {} acknowledged, refusals {kinds:?}\n{}",
        tally.acked_len(),
        ferry.log()
    );
    assert_eq!(
        kinds.keys().collect::<Vec<_>>(),
        vec!["http.503.buffer-storage"],
        "a full disk must be refused as 503 buffer-storage"
    );
    let acked_before = tally.acked_len();
    assert!(
        acked_before > 0,
        "nothing was acknowledged before the disk filled"
    );

    // The disk is still full: MQTT v5 gets a clear reason code, and the status says so.
    let reason = rt.block_on(v5_publish(
        mqtt,
        "disk-v5-full",
        json!({"k": "v5-full"}).to_string(),
    ));
    assert_eq!(
        reason,
        PubAckReason::UnspecifiedError,
        "v5 PUBACK on a full disk"
    );
    let st = rt.block_on(support::status(&base));
    assert_eq!(st["buffer"]["writable"], false, "{:#}", st["buffer"]);
    assert!(st["buffer"]["last_error"].is_string(), "{:#}", st["buffer"]);

    // Free the space: ingest recovers by itself, no restart.
    std::fs::remove_file(&filler).unwrap();
    let freed_at = Instant::now();
    let mut recovered: HashSet<String> = HashSet::new();
    let http = reqwest::Client::new();
    for n in 0.. {
        if freed_at.elapsed() > Duration::from_secs(30) {
            break;
        }
        let key = format!("after-{n}");
        let resp = rt.block_on(
            http.post(format!("{base}/v1/readings"))
                .json(&json!([{"topic": "rel/disk", "payload": {"k": key}}]))
                .send(),
        );
        if resp.is_ok_and(|r| r.status().as_u16() == 202) {
            recovered.insert(key);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let recovery = freed_at.elapsed();
    assert!(
        !recovered.is_empty(),
        "ingest did not recover within 30 s of freeing space\n{}",
        ferry.log()
    );
    let ok = rt.block_on(v5_publish(
        mqtt,
        "disk-v5-ok",
        json!({"k": "v5-ok"}).to_string(),
    ));
    assert_eq!(ok, PubAckReason::Success);
    let st = rt.block_on(support::status(&base));
    assert_eq!(st["buffer"]["writable"], true, "{:#}", st["buffer"]);

    // Nothing acknowledged is lost, and the file is sound.
    ferry
        .terminate(Duration::from_secs(10))
        .expect("clean exit");
    let (code, out, err) = Ferry::cli(&[
        "buffer",
        "verify",
        "--data-dir",
        &data_dir.display().to_string(),
    ]);
    assert_eq!(code, 0, "buffer verify failed:\n{out}\n{err}");
    let stored: HashSet<String> = buffered_readings(&data_dir, "kafka")
        .iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
        .filter_map(|v| v["k"].as_str().map(str::to_string))
        .collect();
    let mut acked = tally.acked();
    acked.extend(recovered);
    acked.insert("v5-ok".into());
    let missing: Vec<&String> = acked.iter().filter(|k| !stored.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged readings are missing after the disk filled, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let refused_stored = tally
        .refused()
        .iter()
        .filter(|k| stored.contains(*k))
        .count();
    assert_eq!(refused_stored, 0, "refused readings were stored anyway");
    assert!(
        !stored.contains("v5-full"),
        "a refused MQTT reading was stored"
    );
    eprintln!(
        "disk full: {} readings acknowledged before the disk filled, {} refused (503 \
         buffer-storage), v5 PUBACK 0x80; ingest recovered {:.2} s after space was freed, \
         without a restart; verify OK, 0 lost",
        acked_before,
        tally.refused().len(),
        recovery.as_secs_f64()
    );
}

/// With a disk reserve, the disk is never the limit ferry runs into: `drop_oldest` evicts the
/// oldest readings inside the file and keeps taking the newest (counted as `disk_full`), and
/// `reject` refuses (503 `buffer-full`, counted as `disk_full`), while the free space stays
/// near the reserve. Every acknowledged reading is stored or counted as dropped.
#[test]
fn the_disk_reserve_is_kept_under_drop_oldest_and_reject() {
    for policy in ["drop_oldest", "reject"] {
        let test = format!("the_disk_reserve_is_kept ({policy})");
        let Some(fs) = small_fs("12m", &test) else {
            return;
        };
        let data_dir: PathBuf = fs.path().join("data");
        let reserve: u64 = 2 << 20;
        let mut ferry = Ferry::start_in(
            &format!(
                r#"
[gateway]
id = "disk-reserve"

[buffer]
max_bytes = 268435456
max_batch_bytes = 65536
when_full = "{policy}"
min_free_bytes = {reserve}
"#
            ),
            &[],
            Some(&data_dir),
        );
        let base = ferry.http_url();
        // Other files take the space: about 5 MiB stay free, 3 MiB beyond the reserve.
        fill_leaving(&fs, 5 << 20);

        let rt = support::rt();
        let (tally, stop, task) = start_http_load(&rt, &base, "res");
        // Ingest until about three times what fits beyond the reserve was offered.
        let t = Instant::now();
        let mut min_free = u64::MAX;
        while (tally.acked_len() + tally.refused().len()) < 30_000
            && t.elapsed() < Duration::from_secs(60)
        {
            min_free = min_free.min(free_bytes(fs.path()));
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
        rt.block_on(task).unwrap();
        min_free = min_free.min(free_bytes(fs.path()));
        let st = rt.block_on(support::status(&base));
        let kinds = tally.refusal_kinds.lock().unwrap().clone();
        let losses = &st["losses"];
        eprintln!(
            "{policy}: {} acknowledged, {} refused {kinds:?}, losses {losses}, least free {} KiB (reserve {} KiB)",
            tally.acked_len(),
            tally.refused().len(),
            min_free / 1024,
            reserve / 1024
        );
        // redb may write a few pages beyond what a commit stores: within a quarter.
        assert!(
            min_free >= reserve - reserve / 4,
            "{policy}: the free space fell to {min_free} bytes, reserve {reserve}"
        );
        // The status says what limits the buffer, and what ferry does about it.
        assert_eq!(st["disk"]["reserve_bytes"], reserve, "{:#}", st["disk"]);
        assert_eq!(st["disk"]["at_reserve"], true, "{:#}", st["disk"]);
        let headline = st["summary"]["headline"].as_str().unwrap();
        let doing = match policy {
            "drop_oldest" => "the oldest readings are dropped to make room",
            _ => "new readings are refused",
        };
        assert!(
            headline.starts_with(
                "The disk is down to the 2.1 MB ferry keeps free (buffer.min_free_bytes)"
            ) && headline.contains(doing),
            "{policy}: {headline}"
        );
        assert_eq!(
            st["buffer"]["writable"], true,
            "{policy}: {:#}",
            st["buffer"]
        );
        let acked = tally.acked();
        match policy {
            "drop_oldest" => {
                assert!(tally.refused().is_empty(), "drop_oldest refused: {kinds:?}");
                assert!(
                    losses["dropped"]["disk_full"].as_u64().unwrap_or(0) > 0,
                    "nothing was evicted for the disk: {losses}"
                );
            }
            _ => {
                assert!(!tally.refused().is_empty(), "reject never refused");
                assert_eq!(
                    kinds.keys().collect::<Vec<_>>(),
                    vec!["http.503.buffer-full"],
                    "reject at the reserve is 503 buffer-full"
                );
                assert!(
                    losses["rejected"]["buffer.disk_full"].as_u64().unwrap_or(0) > 0,
                    "{losses}"
                );
            }
        }
        ferry
            .terminate(Duration::from_secs(10))
            .expect("clean exit");
        let d = data_dir.display().to_string();
        let (code, out, err) = Ferry::cli(&["buffer", "verify", "--data-dir", &d]);
        assert_eq!(code, 0, "{policy}: verify failed:\n{out}\n{err}");
        let stored: HashSet<String> = buffered_readings(&data_dir, "kafka")
            .iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
            .filter_map(|v| v["k"].as_str().map(str::to_string))
            .collect();
        let dropped = losses["dropped"]["disk_full"].as_u64().unwrap_or(0) as usize;
        let missing = acked.iter().filter(|k| !stored.contains(*k)).count();
        assert_eq!(
            missing, dropped,
            "{policy}: acknowledged readings not stored must be exactly the counted drops"
        );
        assert!(
            tally.refused().iter().all(|k| !stored.contains(k)),
            "{policy}: a refused reading was stored"
        );
    }
}

/// When other files took the space and the buffer holds nothing to evict, `drop_oldest`
/// refuses like `reject` (HTTP 503 `buffer-full` naming `buffer.min_free_bytes`, MQTT v5
/// PUBACK 0x97 quota exceeded) instead of writing into the system's reserve, and takes
/// readings again once the space is back.
#[test]
fn drop_oldest_refuses_when_only_the_reserve_is_left() {
    let Some(fs) = small_fs("12m", "drop_oldest_refuses_when_only_the_reserve_is_left") else {
        return;
    };
    let data_dir: PathBuf = fs.path().join("data");
    let reserve: u64 = 4 << 20;
    let mut ferry = Ferry::start_in(
        &format!(
            r#"
[gateway]
id = "disk-reserve-empty"

[buffer]
when_full = "drop_oldest"
min_free_bytes = {reserve}
"#
        ),
        &[],
        Some(&data_dir),
    );
    let base = ferry.http_url();
    let mqtt = ferry.addr("mqtt");
    // Leave 3 MiB free: below the reserve, with room for a commit.
    let filler = fill_leaving(&fs, 3 << 20);
    let before = free_bytes(fs.path());

    let rt = support::rt();
    let http = reqwest::Client::new();
    let post = |key: &str| {
        rt.block_on(async {
            let r = http
                .post(format!("{base}/v1/readings"))
                .json(&json!([{"topic": "rel/reserve", "payload": {"k": key}}]))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    let (code, body) = post("refused");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("buffer-full") && body.contains("buffer.min_free_bytes"),
        "the refusal names the reserve: {body}"
    );
    let reason = rt.block_on(v5_publish(
        mqtt,
        "reserve-v5",
        json!({"k": "v5"}).to_string(),
    ));
    assert_eq!(reason, PubAckReason::QuotaExceeded, "MQTT at the reserve");
    assert!(
        free_bytes(fs.path()) + (64 << 10) >= before,
        "ferry wrote into the reserve"
    );
    let st = rt.block_on(support::status(&base));
    assert!(
        st["losses"]["rejected"]["buffer.disk_full"].as_u64() >= Some(2),
        "{}",
        st["losses"]
    );
    assert_eq!(st["losses"]["dropped_total"], 0, "{}", st["losses"]);
    assert_eq!(st["disk"]["at_reserve"], true, "{:#}", st["disk"]);

    // Space back: the next reading is taken, no restart.
    std::fs::remove_file(&filler).unwrap();
    let (code, body) = post("taken");
    assert_eq!(code, 202, "{body}");
    ferry
        .terminate(Duration::from_secs(10))
        .expect("clean exit");
    let keys: Vec<String> = buffered_readings(&data_dir, "kafka")
        .iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
        .filter_map(|v| v["k"].as_str().map(str::to_string))
        .collect();
    assert_eq!(keys, vec!["taken".to_string()]);
}
