//! CI smoke of the benchmark tools: `bench-run --smoke` runs every scenario end to end with
//! tiny sizes, and `ferry-load --acked-ids` names readings that ferry really stored. Nothing
//! here times anything or asserts on a figure: the runs only have to complete, with no error.

use std::collections::BTreeSet;
use std::process::Command;

/// Every benchmark scenario and a metric each must report.
const SCENARIO_ROWS: &[(&str, &str)] = &[
    ("1 QoS1 ingest", "msg/s"),
    ("1 QoS1 ingest", "ack p50 / p99 ms"),
    ("2 QoS0 ingest", "msg/s"),
    ("3 HTTP ingest", "1 reading(s)/request"),
    ("3 HTTP ingest", "100 reading(s)/request"),
    ("4 drain", "backlog to the mock cluster"),
    ("5 footprint", "RSS idle"),
    ("5 footprint", "peak RSS"),
    ("5 footprint", "steady RSS"),
    (
        "5 footprint",
        "disk bytes written / payload byte, QoS1 max rate",
    ),
    (
        "5 footprint",
        "disk bytes written / payload byte, QoS1 open loop",
    ),
    ("5 footprint", "buffer file bytes / reading"),
    (
        "5 footprint",
        "compression ratio, one segment of telemetry, gzip 9",
    ),
    ("6 recovery", "spawn to `ready` line"),
    ("6 recovery", "peak RSS until ready"),
    ("7 ingest matrix", "QoS1, 4 clients × 16 in flight, 64 B"),
    ("7 ingest matrix", "QoS2, 4 clients × 16 in flight, 64 B"),
    ("8 instructions", "user-space instructions per reading"),
    ("9 local subscribers", "1 publisher → 10 subscribers"),
    ("9 local subscribers", "4 publishers → 1 subscriber"),
    ("9 local subscribers", "publish → delivery p50 / p99 ms"),
    ("9 local subscribers", "RSS per idle subscriber connection"),
    ("10 commands down", "cloud → device"),
    (
        "10 commands down",
        "cloud publish → device delivery p50 / p99 ms",
    ),
];

#[test]
fn bench_run_smoke_produces_every_scenario_row() {
    // Without the peers, the runner still runs ferry's side and marks the peer `skipped`;
    // under FERRY_REQUIRE_TOOLS=1 these panic instead, as for every test needing a tool.
    let mosquitto = ferry_tests::require_tool("mosquitto", "bench_run_smoke");
    let kcat = ferry_tests::require_tool("kcat", "bench_run_smoke");
    let valgrind = ferry_tests::require_tool("valgrind", "bench_run_smoke");
    let work = tempfile::tempdir().unwrap();
    let out_file = work.path().join("table.md");
    let out = Command::new(env!("CARGO_BIN_EXE_bench-run"))
        .arg("--smoke")
        .arg("--ferry")
        .arg(ferry_tests::bin_path("ferry"))
        .arg("--work-dir")
        .arg(work.path())
        .arg("--out")
        .arg(&out_file)
        .output()
        .expect("run bench-run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench-run --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let table = std::fs::read_to_string(&out_file).expect("--out file");
    assert_eq!(table.trim(), stdout.trim(), "--out differs from stdout");
    assert!(
        table.contains("- cores (nproc): "),
        "no machine description:\n{table}"
    );
    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| scenario"))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect();
    for r in &rows {
        assert_eq!(r.len(), 7, "malformed row {r:?}");
        assert!(!r[6].starts_with("error"), "error row {r:?}\n{stderr}");
        assert!(
            ["pass", "**short**", "info"].contains(&r[6]) || r[6].starts_with("skipped"),
            "unknown result in {r:?}"
        );
        // pass/short only against a goal; a row with a goal is judged (or its peer skipped).
        let judged = r[6] == "pass" || r[6] == "**short**";
        if judged {
            assert_ne!(r[5], "–", "a verdict without a goal: {r:?}");
        }
        if r[5] != "–" {
            assert!(
                judged || r[6].starts_with("skipped"),
                "a goal without a verdict: {r:?}"
            );
        }
        assert_ne!(r[2], "–", "no ferry figure in {r:?}");
    }
    for (scenario, metric) in SCENARIO_ROWS {
        assert!(
            rows.iter()
                .any(|r| r[0] == *scenario && r[1].contains(metric)),
            "no row for scenario '{scenario}' metric '{metric}' in:\n{table}"
        );
    }
    // The peers really ran when they are installed.
    let peer = |scenario: &str| {
        rows.iter()
            .find(|r| r[0] == scenario)
            .map(|r| r[3].to_string())
            .unwrap_or_default()
    };
    if mosquitto {
        assert!(peer("1 QoS1 ingest").starts_with("mosquitto "), "{table}");
        assert!(peer("2 QoS0 ingest").starts_with("mosquitto "), "{table}");
        assert!(peer("7 ingest matrix").starts_with("mosquitto "), "{table}");
        assert!(
            peer("9 local subscribers").starts_with("mosquitto "),
            "{table}"
        );
        assert!(
            peer("10 commands down").starts_with("mosquitto bridge "),
            "{table}"
        );
    }
    if valgrind && mosquitto {
        assert!(peer("8 instructions").starts_with("mosquitto "), "{table}");
    }
    if kcat {
        assert!(peer("4 drain").starts_with("kcat -P "), "{table}");
        // With kcat's input: CPU time of both producers, and the bare librdkafka loop.
        for metric in ["CPU seconds per 1M readings", "bare producer loop"] {
            let r = rows
                .iter()
                .find(|r| r[0] == "4 drain" && r[1].contains(metric))
                .unwrap_or_else(|| panic!("no drain row '{metric}' in:\n{table}"));
            assert_ne!(r[3], "–", "no peer figure in {r:?}");
        }
    }
    assert!(
        peer("3 HTTP ingest").starts_with("no-work handler "),
        "{table}"
    );
}

/// Every id `ferry-load --acked-ids` writes is a reading ferry stored (MQTT v5 QoS 2, MQTT
/// v3.1.1 QoS 1 over three topics, and HTTP batches), found through the buffer crate after
/// ferry stopped.
#[test]
fn acked_ids_are_stored_readings() {
    let mut ferry = ferry_tests::Ferry::start("");
    let dir = tempfile::tempdir().unwrap();
    let mqtt = ferry.addr("mqtt").to_string();
    let http = ferry.http_url();
    let runs: [(&str, Vec<&str>); 3] = [
        (
            "a-",
            vec![
                "mqtt",
                &mqtt,
                "--protocol",
                "v5",
                "--qos",
                "2",
                "--clients",
                "3",
            ],
        ),
        (
            "b-",
            vec!["mqtt", &mqtt, "--clients", "2", "--topics-per-device", "3"],
        ),
        ("c-", vec!["http", &http, "--batch", "10", "--clients", "2"]),
    ];
    let mut acked = BTreeSet::new();
    for (prefix, args) in &runs {
        let ids = dir.path().join(prefix);
        let out = Command::new(env!("CARGO_BIN_EXE_ferry-load"))
            .args(args)
            .args([
                "--messages",
                "200",
                "--secs",
                "60",
                "--json",
                "--id-prefix",
                prefix,
            ])
            .arg("--acked-ids")
            .arg(&ids)
            .output()
            .expect("run ferry-load");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("one JSON summary line");
        assert_eq!(summary["errors_total"], 0, "{prefix}: {summary}");
        assert_eq!(summary["acked"], 200, "{prefix}: {summary}");
        let text = std::fs::read_to_string(&ids).unwrap();
        assert_eq!(
            text.lines().count(),
            200,
            "{prefix}: one id per acked reading"
        );
        acked.extend(text.lines().map(str::to_string));
    }
    assert_eq!(acked.len(), 600, "ids are unique");
    ferry.terminate(std::time::Duration::from_secs(10));
    let stored: BTreeSet<String> = ferry_tests::buffered_readings(&ferry.data_dir, "kafka")
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("JSON payload");
            v["seq"]
                .as_str()
                .expect("a seq id in the payload")
                .to_string()
        })
        .collect();
    let missing: Vec<&String> = acked.difference(&stored).collect();
    assert!(missing.is_empty(), "acked but not stored: {missing:?}");
    assert!(stored.iter().any(|id| id.starts_with("b-")), "{stored:?}");
}
