//! `producer-floor`: what librdkafka costs without ferry. It produces the drain scenario's
//! records (`key<TAB>value` lines, the same headers on every record) with ferry's own rdkafka
//! and bundled librdkafka and the settings `kcat -P` gets in bench-run (zstd,
//! `enable.idempotence=true`, `acks=all`), in a bare loop: no buffer, no decoding, no acks to
//! commit. bench-run times it beside ferry's drain, so the gap between ferry and kcat splits
//! into what ferry adds and what the library does.
//!
//! `producer-floor BOOTSTRAP TOPIC INPUT [NAME=VALUE ...]`; exits 0 once every record is
//! delivered.

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use std::io::BufRead;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counts failed deliveries, so a run that lost records fails instead of looking fast.
#[derive(Default)]
struct Failures(AtomicU64);

impl ClientContext for Failures {}

impl ProducerContext for Failures {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Delivery reports are served every this many records (and whenever the queue is full), as
/// ferry's producer thread serves them between chunks of records.
const POLL_EVERY: u64 = 64;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("producer-floor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic, input, headers @ ..] = args.as_slice() else {
        return Err("usage: producer-floor BOOTSTRAP TOPIC INPUT [NAME=VALUE ...]".into());
    };
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|h| {
            h.split_once('=')
                .ok_or(format!("header {h:?} is not NAME=VALUE"))
        })
        .collect::<Result<_, _>>()?;
    let producer: BaseProducer<Failures> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("compression.type", "zstd")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create_with_context(Failures::default())
        .map_err(|e| format!("producer: {e}"))?;
    let file = std::fs::File::open(input).map_err(|e| format!("{input}: {e}"))?;
    let mut lines = std::io::BufReader::new(file);
    let mut line = String::new();
    let mut n = 0u64;
    loop {
        line.clear();
        if lines.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            break;
        }
        let l = line.trim_end_matches('\n');
        let (key, value) = l.split_once('\t').ok_or("an input line has no tab")?;
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in &headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut rec = BaseRecord::<str, str, ()>::to(topic)
            .key(key)
            .payload(value)
            .headers(h);
        while let Err((e, r)) = producer.send(rec) {
            if e.rdkafka_error_code() != Some(RDKafkaErrorCode::QueueFull) {
                return Err(format!("produce: {e}"));
            }
            rec = r;
            producer.poll(Duration::from_millis(1));
        }
        n += 1;
        if n.is_multiple_of(POLL_EVERY) {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(300))
        .map_err(|e| format!("flush: {e}"))?;
    match producer.context().0.load(Ordering::Relaxed) {
        0 => Ok(()),
        f => Err(format!("{f} of {n} records were not delivered")),
    }
}
