//! Crash test: a child process appends and acks on a real file and is SIGKILLed at a random
//! moment, many times over. After each kill the buffer is reopened and checked against what
//! the child printed after each confirmation: every append that returned Ok is present exactly
//! once (unless an ack covered it), and no acked segment comes back.

use ferry_tests::bin_path;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Default, Debug)]
struct Record {
    appended: BTreeSet<u64>,
    confirmed_ack: (u64, u64),
    attempted_ack: (u64, u64),
}

fn run_once(dir: &std::path::Path, seed: u64, run_ms: u64, rec: &mut Record) {
    let mut child = Command::new(bin_path("buffer-torture"))
        .arg(dir)
        .arg(seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn buffer-torture");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        lines
    });
    std::thread::sleep(Duration::from_millis(run_ms));
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    for line in reader.join().unwrap() {
        let f: Vec<&str> = line.split(' ').collect();
        // A line cut by the kill is incomplete and ignored.
        let nums: Vec<u64> = f[1..].iter().filter_map(|s| s.parse().ok()).collect();
        if nums.len() != 2 {
            continue;
        }
        match f[0] {
            "A" => rec.appended.extend(nums[0]..=nums[1]),
            "k" => rec.attempted_ack = rec.attempted_ack.max((nums[0], nums[1])),
            "K" => rec.confirmed_ack = rec.confirmed_ack.max((nums[0], nums[1])),
            _ => {}
        }
    }
}

#[test]
fn sigkill_while_appending_and_acking_loses_nothing_acknowledged() {
    let iterations: u64 = std::env::var("FERRY_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let dir = tempfile::tempdir().unwrap();
    let mut rec = Record::default();
    let mut total_checked = 0usize;
    for it in 0..iterations {
        let run_ms = 150 + (it * 37) % 400;
        run_once(dir.path(), it + 1, run_ms, &mut rec);

        let buf = open(dir.path());
        let (present, segments) = read_all(&buf);
        let (ack_seg, ack_max) = rec.confirmed_ack;
        let (_, attempted_max) = rec.attempted_ack;
        for s in &segments {
            assert!(
                *s > ack_seg,
                "iteration {it}: acked segment {s} came back (ack {ack_seg})"
            );
        }
        for (id, n) in &present {
            assert_eq!(*n, 1, "iteration {it}: reading {id} is stored {n} times");
            assert!(
                *id > ack_max,
                "iteration {it}: reading {id} was acked (through {ack_max}) but is back"
            );
        }
        for id in rec
            .appended
            .iter()
            .filter(|id| **id > attempted_max.max(ack_max))
        {
            assert!(
                present.contains_key(id),
                "iteration {it}: reading {id} was acknowledged to the appender but is gone"
            );
            total_checked += 1;
        }
        let rt = rt();
        rt.block_on(buf.close());
        let rep = ferry_buffer::Inspector::open(dir.path())
            .unwrap()
            .verify()
            .unwrap();
        assert!(
            rep.problems.is_empty(),
            "iteration {it}: {:?}",
            rep.problems
        );
    }
    assert!(
        !rec.appended.is_empty(),
        "the child never got an append acknowledged"
    );
    assert!(
        rec.confirmed_ack.0 > 0,
        "the child never got an ack confirmed"
    );
    eprintln!(
        "{iterations} SIGKILL cycles: {} appends acknowledged, {total_checked} presence checks, acked through segment {}",
        rec.appended.len(),
        rec.confirmed_ack.0
    );
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn open(dir: &std::path::Path) -> ferry_buffer::Buffer {
    let opts = ferry_buffer::BufferOptions {
        consumers: vec!["k".into()],
        ..Default::default()
    };
    ferry_buffer::Buffer::open(dir, opts).expect("reopen after SIGKILL")
}

fn read_all(buf: &ferry_buffer::Buffer) -> (BTreeMap<u64, usize>, Vec<u64>) {
    rt().block_on(async {
        let mut rd = buf.reader("k").unwrap();
        let mut present = BTreeMap::new();
        let mut segs = Vec::new();
        loop {
            let got = rd.try_next(256).await.unwrap();
            if got.is_empty() {
                break;
            }
            for s in got {
                segs.push(s.id);
                for r in s.readings {
                    *present.entry(r.id).or_insert(0) += 1;
                }
            }
        }
        (present, segs)
    })
}
