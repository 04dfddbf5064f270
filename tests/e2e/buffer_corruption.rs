//! Reliability suite 4: a corrupt buffer file.
//!
//! A gateway ingests readings and stops; then its buffer file is damaged — truncated, its
//! header overwritten, or random bytes scribbled over its middle — and ferry is started on
//! it. Asserted for each damage:
//! - ferry becomes ready (it does not crash-loop), and stays up across another restart;
//! - the damage is flagged: the file is quarantined (moved aside, listed in `/api/status`
//!   and `ferry_buffer_quarantined_files`), or a damaged segment is skipped and counted;
//! - it keeps serving: HTTP and MQTT readings are acknowledged and stored after the damage,
//!   and the buffer it runs on passes `ferry buffer verify`.

use crate::support;

use ferry_tests::{Ferry, buffered_readings};
use serde_json::{Value, json};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;
use support::Rng;

const CONFIG: &str = r#"
[gateway]
id = "corrupt"

[buffer]
max_batch_readings = 64
"#;

fn ingest(rt: &tokio::runtime::Runtime, base: &str, prefix: &str, n: usize) {
    rt.block_on(async {
        let http = reqwest::Client::new();
        for i in 0..n {
            let items: Vec<Value> = (0..20)
                .map(|j| json!({"topic": "rel/c", "payload": {"k": format!("{prefix}-{i}-{j}"), "pad": support::noise((i * 20 + j) as u64, 200)}}))
                .collect();
            let r = http
                .post(format!("{base}/v1/readings"))
                .json(&items)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 202);
        }
    });
}

fn damage(file: &Path, how: &str, rng: &mut Rng) {
    let len = std::fs::metadata(file).unwrap().len();
    assert!(len > 64 * 1024, "buffer file too small to damage: {len}");
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    match how {
        "truncated" => f.set_len(len / 2).unwrap(),
        "header" => {
            let junk: Vec<u8> = (0..4096).map(|_| rng.below(256) as u8).collect();
            f.write_all(&junk).unwrap();
        }
        "scribbled" => {
            // Random bytes over a run of pages in the middle, where segment data lives.
            let at = len / 4 + rng.below(len / 2);
            f.seek(SeekFrom::Start(at)).unwrap();
            let junk: Vec<u8> = (0..32 * 1024).map(|_| rng.below(256) as u8).collect();
            f.write_all(&junk).unwrap();
        }
        _ => unreachable!(),
    }
    f.sync_all().unwrap();
}

fn run(how: &str) {
    let mut rng = Rng::from_env(how);
    let rt = support::rt();
    let mut ferry = Ferry::start(CONFIG);
    ingest(&rt, &ferry.http_url(), "before", 100);
    ferry
        .terminate(Duration::from_secs(10))
        .expect("clean exit");
    let file = ferry.data_dir.join("buffer.redb");
    damage(&file, how, &mut rng);

    // Start on the damaged file: ready within Ferry's 30 s, or it panics with the log.
    ferry.restart();
    let st = rt.block_on(support::status(&ferry.http_url()));
    let flagged = st["quarantine"]["flagged"] == true;
    let corrupt_segments = rt.block_on(async {
        reqwest::get(format!("{}/metrics", ferry.http_url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let skipped = corrupt_segments
        .lines()
        .find(|l| l.starts_with("ferry_buffer_corrupt_segments_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let quarantined: Vec<_> = std::fs::read_dir(ferry.data_dir.join("quarantine"))
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    if flagged {
        assert_eq!(
            quarantined.len(),
            1,
            "flagged, but no file was moved aside: {:#}",
            st["quarantine"]
        );
        assert!(
            st["quarantine"]["files"][0].is_string(),
            "{:#}",
            st["quarantine"]
        );
    }

    // It keeps serving, over HTTP and MQTT.
    ingest(&rt, &ferry.http_url(), "after", 5);
    let mqtt = ferry.addr("mqtt");
    rt.block_on(async {
        let tally = std::sync::Arc::new(support::Tally::default());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = tokio::spawn(support::mqtt_publisher(
            mqtt,
            "after-mqtt".into(),
            rumqttc::QoS::AtLeastOnce,
            16,
            tally.clone(),
            stop.clone(),
        ));
        let t = std::time::Instant::now();
        while tally.acked_len() < 10 && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        h.await.unwrap();
        assert!(tally.acked_len() >= 10, "MQTT not served after the damage");
    });

    // No crash loop: another restart comes up, still flagged.
    ferry.restart();
    let st2 = rt.block_on(support::status(&ferry.http_url()));
    assert_eq!(st2["quarantine"]["flagged"], st["quarantine"]["flagged"]);
    ferry
        .terminate(Duration::from_secs(10))
        .expect("clean exit");
    let (code, out, err) = Ferry::cli(&["buffer", "verify", "--data-dir", &ferry.data_dir_str()]);
    let keys: Vec<String> = buffered_readings(&ferry.data_dir, "kafka")
        .iter()
        .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
        .filter_map(|v| v["k"].as_str().map(str::to_string))
        .collect();
    let after = keys.iter().filter(|k| k.starts_with("after-")).count();
    let before = keys.iter().filter(|k| k.starts_with("before-")).count();
    assert!(
        after >= 100 + 10,
        "readings acknowledged after the damage are missing: {after}"
    );
    eprintln!(
        "corruption ({how}): ready on the damaged file and after another restart; quarantined \
         {flagged} ({} file(s)), {skipped} damaged segments skipped, {before} of 2000 old \
         readings still readable; verify exit {code}",
        quarantined.len()
    );
    assert!(
        flagged || skipped > 0.0 || before == 2000,
        "the damage was neither flagged nor harmless: {before} of 2000 old readings readable"
    );
    if flagged {
        assert_eq!(
            before, 0,
            "a quarantined file's readings cannot be in the fresh buffer"
        );
        assert_eq!(code, 0, "verify failed on the fresh buffer:\n{out}\n{err}");

        // Salvage: what is intact of the quarantined file goes back into the fresh buffer.
        let q = quarantined[0].path();
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("salvaged.ndjson");
        let (code, so, se) = Ferry::cli(&[
            "buffer",
            "salvage",
            q.to_str().unwrap(),
            "--gateway-id",
            "corrupt",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{so}{se}");
        let (code, io, ie) = Ferry::cli(&[
            "buffer",
            "import",
            "--data-dir",
            &ferry.data_dir_str(),
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{io}{ie}");
        let back: std::collections::BTreeSet<String> = buffered_readings(&ferry.data_dir, "kafka")
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.payload).ok())
            .filter_map(|v| v["k"].as_str().map(str::to_string))
            .filter(|k| k.starts_with("before-"))
            .collect();
        eprintln!(
            "salvage ({how}): {} of the 2000 acknowledged readings of the quarantined file are back: {}",
            back.len(),
            se.trim()
        );
        if how == "header" {
            // Only the file header was hit: every segment is intact.
            assert_eq!(back.len(), 2000, "{se}");
        }
    }
}

#[test]
fn a_truncated_buffer_file_is_quarantined_and_ferry_keeps_serving() {
    run("truncated");
}

#[test]
fn an_overwritten_header_is_quarantined_and_ferry_keeps_serving() {
    run("header");
}

#[test]
fn scribbled_pages_are_flagged_and_ferry_keeps_serving() {
    run("scribbled");
}
