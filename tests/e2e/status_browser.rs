//! The status page in a real browser (Debian's `chromium`, headless): ferry runs with HTTP
//! traffic and an in-process librdkafka mock cluster as its Kafka upstream; the test reads the
//! rendered DOM to check that the numbers update live, then breaks the upstream and checks that
//! the page shows the uplink offline (or backing off) with a growing backlog, and the recovery.
//! It saves a screenshot of the outage as `target/test-artifacts/status.png` (and a phone-sized
//! dark one as `status-phone-dark.png`).

use crate::support;
use ferry_tests::{Ferry, require_tool};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/<profile>/deps/<test-exe>
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().nth(3).unwrap().to_path_buf()
        });
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless Chromium with `args` plus the flags that keep it offline and quiet; returns
/// stdout. Killed after 90 s.
fn chromium(profile: &Path, args: &[&str]) -> String {
    chromium_in_tz(profile, args, None)
}

/// [`chromium`] with the browser's time zone set (`TZ`).
fn chromium_in_tz(profile: &Path, args: &[&str], tz: Option<&str>) -> String {
    let mut cmd = Command::new("chromium");
    if let Some(tz) = tz {
        cmd.env("TZ", tz);
    }
    let mut child = cmd
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// The page's DOM after it polled `/api/status` a few times (virtual time).
fn dump_dom(profile: &Path, url: &str) -> String {
    chromium(profile, &["--virtual-time-budget=4000", "--dump-dom", url])
}

/// The text of the element with `id` in a DOM dump.
fn text_of(dom: &str, id: &str) -> String {
    let key = format!("id=\"{id}\">");
    let at = dom
        .find(&key)
        .unwrap_or_else(|| panic!("no element #{id} in the page:\n{dom}"));
    let rest = &dom[at + key.len()..];
    rest[..rest.find('<').unwrap_or(rest.len())].to_string()
}

fn number_of(dom: &str, id: &str) -> u64 {
    let t: String = text_of(dom, id)
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    t.parse()
        .unwrap_or_else(|_| panic!("#{id} is not a number: {:?}", text_of(dom, id)))
}

async fn wait_status(base: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    support::wait_status(base, None, what, Duration::from_secs(40), f).await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_shows_live_numbers_and_an_outage() {
    if !require_tool(
        "chromium",
        "status_page_in_chromium_shows_live_numbers_and_an_outage",
    ) {
        return;
    }
    let mock: MockCluster<'static, DefaultProducerContext> = MockCluster::new(1).unwrap();
    mock.create_topic("readings", 1, 1).unwrap();
    let ferry = Ferry::start(&format!(
        r#"
[gateway]
id = "browser-test"

[uplinks.kafka]
type = "kafka"
brokers = "{}"
topic = "readings"
message_timeout_ms = 1500
initial_backoff_ms = 200
max_backoff_ms = 1000
"#,
        mock.bootstrap_servers()
    ));
    let base = ferry.http_url();
    let page = format!("{base}/");
    let profile = tempfile::tempdir().unwrap();
    let profile_path = profile.path().to_path_buf();

    // Traffic: a small batch every 100 ms from three devices, until the test ends.
    let running = Arc::new(AtomicBool::new(true));
    let traffic = {
        let running = running.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut n = 0u64;
            while running.load(Ordering::SeqCst) {
                let items: Vec<Value> = (0..3)
                    .map(|d| json!({"topic": "plant/temp", "device": format!("probe-{d}"), "payload": {"c": 20 + d, "n": n}}))
                    .collect();
                let resp = http
                    .post(format!("{base}/v1/readings"))
                    .json(&items)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 202);
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    wait_status(&base, "Kafka acknowledges", |v| {
        v["uplinks"][0]["state"] == "connected" && v["uplinks"][0]["acked_total"].as_u64() > Some(0)
    })
    .await;

    // 1. The numbers update: two loads a few seconds apart differ.
    let (p, u) = (profile_path.clone(), page.clone());
    let first = blocking(move || dump_dom(&p, &u)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (p, u) = (profile_path.clone(), page.clone());
    let second = blocking(move || dump_dom(&p, &u)).await;
    let (a, b) = (
        number_of(&first, "ingest-total"),
        number_of(&second, "ingest-total"),
    );
    assert!(
        a > 0 && b > a,
        "the ingest counter did not grow: {a} then {b}"
    );
    assert_eq!(text_of(&second, "uplink-kafka-state"), "connected");
    assert_eq!(text_of(&second, "level"), "Data is getting out");
    assert_eq!(text_of(&second, "gw-id"), "browser-test");
    assert!(
        second.contains("probe-2"),
        "the device table lists the probes"
    );
    assert!(second.contains("<polyline"), "the chart is drawn");

    // 2. An outage: the page says so, and the backlog grows.
    mock.broker_down(1).unwrap();
    let down = wait_status(&base, "the uplink is down with a backlog", |v| {
        matches!(
            v["uplinks"][0]["state"].as_str(),
            Some("offline" | "backing_off")
        ) && v["uplinks"][0]["lag_readings"].as_u64() > Some(30)
    })
    .await;
    let (p, u) = (profile_path.clone(), page.clone());
    let during = blocking(move || dump_dom(&p, &u)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (p, u) = (profile_path.clone(), page.clone());
    let later = blocking(move || dump_dom(&p, &u)).await;
    for dom in [&during, &later] {
        let state = text_of(dom, "uplink-kafka-state");
        assert!(
            state == "offline" || state == "backing off",
            "uplink shown as {state:?} during the outage; API said {}",
            down["uplinks"][0]["state"]
        );
        assert_eq!(text_of(dom, "level"), "Data is not getting out");
        assert!(
            text_of(dom, "headline").starts_with("Data is not getting out to kafka since"),
            "{}",
            text_of(dom, "headline")
        );
    }
    let (l1, l2) = (
        number_of(&during, "uplink-kafka-lag"),
        number_of(&later, "uplink-kafka-lag"),
    );
    assert!(
        l1 > 0 && l2 > l1,
        "the backlog did not grow: {l1} then {l2}"
    );
    assert!(number_of(&later, "buffer-readings") >= l2);

    // The screenshot an operator would see during the outage.
    let shot = artifacts_dir().join("status.png");
    let _ = std::fs::remove_file(&shot);
    let (p, u, s) = (profile_path.clone(), page.clone(), shot.clone());
    blocking(move || {
        chromium(
            &p,
            &[
                "--virtual-time-budget=4000",
                "--window-size=1280,1500",
                &format!("--screenshot={}", s.display()),
                &u,
            ],
        )
    })
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(png.len() > 10_000, "suspiciously small screenshot");
    let phone = artifacts_dir().join("status-phone-dark.png");
    let (p, u, s) = (profile_path.clone(), page.clone(), phone.clone());
    blocking(move || {
        chromium(
            &p,
            &[
                "--virtual-time-budget=4000",
                "--window-size=390,1600",
                "--force-dark-mode",
                "--blink-settings=preferredColorScheme=0",
                &format!("--screenshot={}", s.display()),
                &u,
            ],
        )
    })
    .await;
    eprintln!("Screenshots: {} and {}", shot.display(), phone.display());

    // 3. Recovery: the backlog drains and the page says data is getting out again.
    mock.broker_up(1).unwrap();
    wait_status(&base, "the backlog drains", |v| {
        v["uplinks"][0]["state"] == "connected"
            && v["uplinks"][0]["lag_readings"].as_u64() < Some(10)
    })
    .await;
    let (p, u) = (profile_path.clone(), page.clone());
    let after = blocking(move || dump_dom(&p, &u)).await;
    assert_eq!(text_of(&after, "uplink-kafka-state"), "connected");
    assert_eq!(text_of(&after, "level"), "Data is getting out");

    running.store(false, Ordering::SeqCst);
    traffic.await.unwrap();
    drop(ferry);
    drop(mock);
}

/// Every time the page shows is in the browser's time zone, with its UTC offset; the server's
/// UTC time in the headline is not shown as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_one_time_zone_the_browsers() {
    if !require_tool("chromium", "status_page_shows_one_time_zone_the_browsers") {
        return;
    }
    // An upstream nobody listens on: data is not getting out, so the headline has a time.
    let ferry = Ferry::start(
        "[uplinks.kafka]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:1\"\ninitial_backoff_ms = 100\nmax_backoff_ms = 200\n",
    );
    let base = ferry.http_url();
    // Offline, not merely connecting: then the headline has its "since HH:MM:SS UTC".
    let v = wait_status(&base, "data is not getting out", |v| {
        v["summary"]["headline"]
            .as_str()
            .is_some_and(|h| h.contains(" UTC"))
    })
    .await;
    assert!(
        v["summary"]["headline"].as_str().unwrap().contains(" UTC"),
        "the API's headline says UTC: {v:#}"
    );
    let profile = tempfile::tempdir().unwrap();
    let url = format!("{base}/");
    let p = profile.path().to_path_buf();
    let dom = blocking(move || {
        chromium_in_tz(
            &p,
            &["--virtual-time-budget=4000", "--dump-dom", &url],
            Some("Asia/Kolkata"),
        )
    })
    .await;
    let headline = text_of(&dom, "headline");
    let since = text_of(&dom, "since");
    let updated = text_of(&dom, "updated");
    for (what, text) in [
        ("headline", &headline),
        ("since", &since),
        ("updated", &updated),
    ] {
        assert!(
            text.contains("UTC+05:30"),
            "{what} without the offset: {text:?}"
        );
        assert_eq!(
            text.matches("UTC").count(),
            text.matches("UTC+05:30").count(),
            "{what} shows another zone: {text:?}"
        );
    }
}
