//! The producer thread of the Kafka uplink: hands the records of each segment to librdkafka
//! and serves librdkafka's delivery reports, on one OS thread of its own.
//!
//! Producing and polling on the same thread (as `kcat -P` does) keeps each record's
//! allocations (librdkafka's message, its headers) and their frees on one thread, where the
//! allocator's thread cache serves them; with a separate polling thread every record was
//! freed on another thread than the one that allocated it, and allocation dominated the
//! profile.
//!
//! Records of an abandoned run are never handed over: the run loop bumps the epoch in the
//! [`Gate`] and purges librdkafka's queue while holding the gate's lock, and this thread holds
//! the same lock while it hands over records, checking the epoch first. So after a purge,
//! nothing of the abandoned run is left in, or later enters, librdkafka's queue.

use super::routing::{Router, key_for};
use super::sink::{ErrorClass, Kp, classify};
use super::track::Tracker;
use crate::settle::Failure;
use crate::topics::Selection;
use ferry_buffer::{Reading, Segment};
use ferry_config::Delivery;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, PurgeConfig};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Records handed over per turn of the gate's lock.
const CHUNK: usize = 512;
/// How long the thread waits for a new segment between serving delivery reports, while
/// records are in librdkafka: from `WAIT_MIN`, doubling while nothing happens (a broker that
/// is down), up to `WAIT_MAX`.
const WAIT_MIN: Duration = Duration::from_micros(100);
const WAIT_MAX: Duration = Duration::from_millis(5);
/// How long it waits for new segments while nothing is in flight.
const POLL_IDLE: Duration = Duration::from_millis(50);
/// How long it waits when librdkafka's queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(2);

/// The current epoch of the run loop; records of older epochs are not sent.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    epoch: Mutex<u64>,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, u64> {
        self.epoch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `epoch` and purges what librdkafka holds, so nothing of earlier epochs is
    /// delivered from now on (records already on the wire may still land).
    pub(crate) fn abandon(&self, epoch: u64, producer: &Kp) {
        let mut g = self.lock();
        *g = epoch;
        producer.purge(PurgeConfig::default().queue().inflight());
    }
}

/// One segment to send: its records (the readings `sel` picks, or the whole segment) are
/// numbered `first..first + len`.
pub(crate) struct Job {
    pub(crate) epoch: u64,
    pub(crate) seg: Arc<Segment>,
    pub(crate) sel: Selection,
    pub(crate) first: usize,
    pub(crate) len: usize,
}

/// What the thread needs to build records.
pub(crate) struct Layout {
    pub(crate) router: Arc<Router>,
    pub(crate) gateway_id: Arc<str>,
    pub(crate) delivery: Delivery,
}

/// The running producer thread.
pub(crate) struct Pump {
    tx: Option<mpsc::Sender<Job>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Pump {
    pub(crate) fn spawn(
        producer: Arc<Kp>,
        tracker: Arc<Tracker>,
        gate: Arc<Gate>,
        layout: Layout,
    ) -> std::io::Result<Pump> {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-kafka".into())
                .spawn(move || {
                    Thread {
                        producer,
                        tracker,
                        gate,
                        layout,
                        scratch: String::new(),
                        jobs: VecDeque::new(),
                        next: 0,
                        halted: None,
                    }
                    .run(rx, &stop)
                })?
        };
        Ok(Pump {
            tx: Some(tx),
            stop,
            handle: Some(handle),
        })
    }

    /// Queues a segment. Returns false if the thread is gone.
    pub(crate) fn send(&self, job: Job) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Stops the thread and waits for it (off the async workers).
    pub(crate) async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What [`Thread::send`] did with one record.
enum Sent {
    Queued,
    Full,
    Refused(KafkaError),
    Failed(Failure),
}

struct Thread {
    producer: Arc<Kp>,
    tracker: Arc<Tracker>,
    gate: Arc<Gate>,
    layout: Layout,
    /// Reused for the formatted header values.
    scratch: String,
    jobs: VecDeque<Job>,
    /// Next record of `jobs[0]`.
    next: usize,
    /// An enqueue failed in this epoch: send nothing more until the next one.
    halted: Option<u64>,
}

impl Thread {
    fn run(mut self, rx: mpsc::Receiver<Job>, stop: &AtomicBool) {
        let mut wait = WAIT_MIN;
        while !stop.load(Ordering::Relaxed) {
            loop {
                match rx.try_recv() {
                    Ok(j) => self.jobs.push_back(j),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            if self.jobs.is_empty() {
                let in_flight = self.producer.in_flight_count();
                if in_flight > 0 {
                    // Serve the reports there are, then wait for a job, briefly. Not
                    // `poll(timeout)`: rdkafka's poll returns only when the timeout is over,
                    // so a job arriving meanwhile would wait, and the pipeline with it.
                    self.producer.poll(Duration::ZERO);
                    let progress = self.producer.in_flight_count() < in_flight;
                    wait = if progress {
                        WAIT_MIN
                    } else {
                        (wait * 2).min(WAIT_MAX)
                    };
                    match rx.recv_timeout(wait) {
                        Ok(j) => {
                            self.jobs.push_back(j);
                            wait = WAIT_MIN;
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                } else {
                    match rx.recv_timeout(POLL_IDLE) {
                        Ok(j) => self.jobs.push_back(j),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    self.producer.poll(Duration::ZERO);
                }
                continue;
            }
            let full = self.send_chunk();
            // Delivery reports free their records here, on the thread that allocated them.
            self.producer.poll(if full {
                QUEUE_FULL_WAIT
            } else {
                Duration::ZERO
            });
        }
    }

    /// Hands over up to [`CHUNK`] records of the oldest job. Returns true if librdkafka's
    /// queue was full.
    fn send_chunk(&mut self) -> bool {
        let gate = self.gate.clone();
        let epoch = gate.lock();
        let Some(job) = self.jobs.front() else {
            return false;
        };
        if job.epoch != *epoch || self.halted == Some(job.epoch) {
            // Abandoned: its records were purged or never sent.
            self.jobs.pop_front();
            self.next = 0;
            return false;
        }
        let (seg, sel, first, len) = (job.seg.clone(), job.sel.clone(), job.first, job.len);
        let end = len.min(self.next + CHUNK);
        while self.next < end {
            let seq = first.wrapping_add(self.next);
            match self.send(&seg, sel.reading(self.next), seq) {
                Sent::Queued => {}
                Sent::Full => return true,
                Sent::Refused(e) => self.tracker.report(seq, Err(&e)),
                Sent::Failed(f) => {
                    self.halted = Some(*epoch);
                    self.tracker.fail(seq, f);
                    return false;
                }
            }
            self.next += 1;
        }
        if self.next >= len {
            self.jobs.pop_front();
            self.next = 0;
        }
        false
    }

    /// Hands reading `i` of `seg` (the whole segment with `delivery = "segment"`) to
    /// librdkafka as the record numbered `seq`.
    fn send(&mut self, seg: &Segment, i: usize, seq: usize) -> Sent {
        let l = &self.layout;
        let result = if l.delivery == Delivery::Segment {
            let rec = BaseRecord::with_opaque_to(l.router.default_topic(), seq)
                .key(&*l.gateway_id)
                .payload(seg.stored.as_slice())
                .headers(segment_headers(&l.gateway_id, seg));
            self.producer.send(rec).map_err(|(e, _)| e)
        } else {
            let r = &seg.readings[i];
            let (topic, rule) = l.router.route(&r.topic);
            let mut rec = BaseRecord::with_opaque_to(topic, seq)
                .payload(r.payload.as_ref())
                .headers(reading_headers(&l.gateway_id, r, &mut self.scratch));
            if let Some(k) = key_for(rule, r) {
                rec = rec.key(k);
            }
            self.producer.send(rec).map_err(|(e, _)| e)
        };
        match result {
            Ok(()) => Sent::Queued,
            Err(e) => match (e.rdkafka_error_code(), classify(&e)) {
                (Some(RDKafkaErrorCode::QueueFull), _) => Sent::Full,
                (_, ErrorClass::Permanent) => Sent::Refused(e),
                (_, class) => Sent::Failed(Failure {
                    message: format!("cannot enqueue: {e}"),
                    fatal: class == ErrorClass::Fatal,
                }),
            },
        }
    }
}

/// The record's headers: the metadata fields of [`crate::meta`], then `content-type` when the
/// device gave one.
fn reading_headers(gateway_id: &str, r: &Reading, scratch: &mut String) -> OwnedHeaders {
    // `insert` takes the headers by value: an `Option` moves them through the closure without
    // building a throwaway `OwnedHeaders` (a librdkafka allocation) per field.
    let mut h = Some(OwnedHeaders::new_with_capacity(6 + r.properties.len()));
    crate::meta::for_each_field(gateway_id, r, scratch, |key, value| {
        h = h.take().map(|h| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        });
    });
    let h = h.unwrap_or_default();
    match &r.content_type {
        Some(ct) => h.insert(Header {
            key: "content-type",
            value: Some(ct.as_str()),
        }),
        None => h,
    }
}

fn segment_headers(gateway_id: &str, seg: &Segment) -> OwnedHeaders {
    let gzip = ferry_buffer::segment::decode_header(&seg.stored)
        .map(|h| h.gzip)
        .unwrap_or(true);
    let id = seg.id.to_string();
    let first = seg.readings.first().map_or(0, |r| r.id).to_string();
    let count = seg.readings.len().to_string();
    OwnedHeaders::new_with_capacity(5)
        .insert(Header {
            key: "content-encoding",
            value: Some(if gzip { "gzip" } else { "identity" }),
        })
        .insert(Header {
            key: "ferry-segment",
            value: Some(id.as_str()),
        })
        .insert(Header {
            key: "ferry-first-id",
            value: Some(first.as_str()),
        })
        .insert(Header {
            key: "ferry-count",
            value: Some(count.as_str()),
        })
        .insert(Header {
            key: "ferry-gateway",
            value: Some(gateway_id),
        })
}
