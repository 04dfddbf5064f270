//! `ferry demo`, the README's run command: it starts, data flows out to the mock Kafka cluster
//! within seconds, a timed outage stops and resumes the flow, and it exits cleanly.

use ferry_tests::bin_path;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn ferry_demo_shows_data_flowing_out_and_an_outage() {
    let start = Instant::now();
    let mut child = Command::new(bin_path("ferry"))
        .args([
            "demo",
            "--duration",
            "22",
            "--outage-every",
            "8",
            "--outage-secs",
            "4",
        ])
        .env("FERRY_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry demo");
    let stdout = child.stdout.take().unwrap();
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .inspect(|l| eprintln!("demo: {l}"))
        .collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "ferry demo failed: {status}");
    assert!(start.elapsed() < Duration::from_secs(60));
    let out = lines.join("\n");
    let url = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("Status page:"))
        .expect("the demo prints the status page URL")
        .trim();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    // Within 10 s (the first two summaries, at 0 and 5 s), data flows out.
    let summaries: Vec<&String> = lines.iter().filter(|l| l.starts_with("in ")).collect();
    assert!(
        summaries
            .iter()
            .take(3)
            .any(|l| l.contains("kafka connected") && !l.contains("drained 0.0/s")),
        "no data flowing out early on:\n{out}"
    );
    assert!(out.contains(">>> Kafka is down"), "{out}");
    assert!(out.contains(">>> Kafka is back"), "{out}");
    assert!(
        summaries
            .iter()
            .any(|l| l.contains("kafka offline") || l.contains("kafka backing off")),
        "the outage never showed in the summaries:\n{out}"
    );
    assert!(out.contains("Stopping the demo."), "{out}");
}
