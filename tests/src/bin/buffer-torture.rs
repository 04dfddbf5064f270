//! Helper for the buffer crash test: appends and acks as fast as it can on `DATA_DIR` and
//! prints, on stdout, a line per event *after* the buffer confirmed it:
//!
//! - `A <first_id> <last_id>`: an append returned Ok;
//! - `k <segment> <max_reading_id>`: an ack is about to be sent;
//! - `K <segment> <max_reading_id>`: that ack returned Ok.
//!
//! The parent SIGKILLs it at a random moment and checks the file against these lines.

use ferry_buffer::{Buffer, BufferOptions, Reading, Source};
use std::io::Write;
use std::time::Duration;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: buffer-torture DATA_DIR SEED");
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let opts = BufferOptions {
            consumers: vec!["k".into()],
            flush_interval: Duration::from_millis(seed % 3),
            max_batch_readings: 200,
            ..BufferOptions::default()
        };
        let buf = Buffer::open(&dir, opts).expect("open");
        for t in 0..8u64 {
            let buf = buf.clone();
            tokio::spawn(async move {
                let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ t;
                loop {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let n = 1 + (x % 20) as usize;
                    let rs: Vec<Reading> = (0..n)
                        .map(|i| {
                            Reading::new(
                                Source::Mqtt,
                                format!("dev-{t}"),
                                "t/x",
                                format!("{{\"t\":{t},\"i\":{i},\"x\":{x}}}"),
                            )
                        })
                        .collect();
                    if let Ok(r) = buf.append(rs).await {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "A {} {}", r.first_id, r.last_id);
                    }
                }
            });
        }
        let mut rd = buf.reader("k").expect("reader");
        loop {
            let segs = match rd.next(4).await {
                Ok(s) => s,
                Err(_) => continue,
            };
            let Some(last) = segs.last() else { continue };
            let max_id = last.readings.iter().map(|r| r.id).max().unwrap_or(0);
            println!("k {} {}", last.id, max_id);
            if rd.ack(last.id).await.is_ok() {
                println!("K {} {}", last.id, max_id);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}
