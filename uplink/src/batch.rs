//! The run loop of every uplink whose upstream takes records in batched HTTP requests (Kinesis
//! `PutRecords`, Pub/Sub `publish`). A type supplies a [`BatchApi`] (how a reading becomes a
//! record, the request limits, one request); [`run`] does the rest, on the shared parts:
//! segments come from the buffer task ([`crate::feed`]), settle in order ([`crate::settle`]),
//! and failures back off as [`crate::retry`] says.
//!
//! ## Flow
//! - Each segment's readings that the uplink's `topics` take are encoded (a reading that can
//!   never be sent, too large say, is dead-lettered with the reason) and queued in order.
//! - Requests of at most [`BatchApi::limits`] records and bytes go out, up to
//!   `max_requests` at once, while at most `max_readings` readings are in flight.
//! - **Lanes** ([`BatchApi::lane`]): records of one lane (a Pub/Sub ordering key) are in one
//!   request at a time and go out in their order, retries included, so the upstream sees
//!   them in order. Records without a lane go in any request.
//! - **Per-record outcomes.** A request answers for each record: delivered, refused for good
//!   (dead letter), or to retry (a Kinesis record throttled inside a partly failed request). A
//!   request that fails as a whole retries all its records. Records to retry go back to the
//!   front of the queue, in order, and wait the backoff; nothing already confirmed is sent
//!   again, and the run is never abandoned for a failure the upstream reported per record.
//! - The run rewinds to the last ack only when the buffer task reports a read error.

use crate::Common;
use crate::feed::{self, Feed};
use crate::retry::Retry;
use crate::settle::{Outcome, SegTrack, Settled};
use crate::status::UplinkStatus;
use crate::topics::Selection;
use ferry_buffer::{ReadError, Reading, Segment};
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::time::Instant;

/// What the upstream said about one record of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Confirmed.
    Delivered,
    /// Refused for good: the reading is dead-lettered with this reason.
    Refused(String),
    /// Not taken this time: sent again after the backoff.
    Retry {
        /// Why, for the status page.
        reason: String,
        /// The upstream said it is over its rate (counted as a throttle, not a failure).
        throttled: bool,
    },
}

/// A request that failed as a whole: every record in it is sent again after the backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// Why, for the status page and the log (never a secret).
    pub message: String,
    /// The upstream said it is over its rate.
    pub throttled: bool,
}

/// The future of one request.
pub type SendFuture =
    Pin<Box<dyn Future<Output = Result<Vec<RecordOutcome>, RequestError>> + Send + 'static>>;

/// One upstream that takes batched requests.
pub trait BatchApi: Send + Sync + 'static {
    /// One record, ready to send.
    type Record: Send + Sync + 'static;

    /// Most records, and most bytes (by [`BatchApi::size`]), in one request.
    fn limits(&self) -> (usize, usize);

    /// Encodes one reading, or says why it can never be sent (the reading is dead-lettered
    /// with that reason).
    fn encode(&self, reading: &Reading) -> Result<Self::Record, String>;

    /// The bytes `record` counts against the request limit.
    fn size(&self, record: &Self::Record) -> usize;

    /// The record's lane: records of one lane are in one request at a time, in order. `None`:
    /// no order is needed.
    fn lane(&self, record: &Self::Record) -> Option<u64>;

    /// Sends one request. `Ok` holds one outcome per record, in the order given.
    fn send(&self, records: Vec<Arc<Self::Record>>) -> SendFuture;
}

/// How much a run keeps in flight.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Requests in flight at once (at least 1).
    pub max_requests: usize,
    /// Readings in flight: read from the buffer and not settled (at least one segment).
    pub max_readings: u64,
    /// Stored bytes in flight (at least one segment); [`crate::feed`]'s share of the buffer.
    pub max_bytes: u64,
}

/// One record waiting to be sent, or in a request.
struct Pending<R> {
    seg: u64,
    record: usize,
    lane: Option<u64>,
    size: usize,
    rec: Arc<R>,
}

/// One segment being delivered.
struct Entry {
    seg: Segment,
    sel: Selection,
    track: SegTrack,
}

/// A request taken off the queue: its lane and its records.
type Request<R> = (Option<u64>, Vec<Pending<R>>);

/// What a finished request hands back: its epoch, its records and the answer.
type Done<R> = (
    u64,
    Vec<Pending<R>>,
    Result<Vec<RecordOutcome>, RequestError>,
);
type InFlight<R> = FuturesUnordered<Pin<Box<dyn Future<Output = Done<R>> + Send>>>;

/// The state of one run.
struct State<A: BatchApi> {
    api: Arc<A>,
    window: Window,
    /// Segments read and not settled, oldest first (ids grow).
    entries: VecDeque<Entry>,
    /// Records to send, in order (retried ones first).
    queue: VecDeque<Pending<A::Record>>,
    in_flight: InFlight<A::Record>,
    /// Lanes with a request in flight.
    busy: HashSet<u64>,
    /// Readings and stored bytes of `entries`.
    readings: u64,
    bytes: u64,
    /// Highest segment id read; reading one at or below it again is a re-send.
    sent_upto: u64,
    /// No request goes out before this (backing off).
    hold: Option<Instant>,
}

impl<A: BatchApi> State<A> {
    /// Room for another read: a failing uplink keeps a probe's window
    /// ([`crate::retry::window_readings`]).
    fn can_read(&self, status: &UplinkStatus) -> bool {
        self.entries.is_empty()
            || (self.readings < crate::retry::window_readings(status, self.window.max_readings)
                && self.bytes < self.window.max_bytes)
    }

    /// Encodes the records of `seg` the uplink takes and queues them.
    fn push(&mut self, seg: Segment, common: &Common, status: &UplinkStatus) {
        let n = seg.readings.len();
        if seg.id <= self.sent_upto {
            status.record_resent(n as u64);
        }
        self.sent_upto = self.sent_upto.max(seg.id);
        let sel = common.topics.select(&seg);
        let mut track = SegTrack::new(sel.records(n));
        for i in 0..track.len {
            match self.api.encode(&seg.readings[sel.reading(i)]) {
                Ok(rec) => self.queue.push_back(Pending {
                    seg: seg.id,
                    record: i,
                    lane: self.api.lane(&rec),
                    size: self.api.size(&rec),
                    rec: Arc::new(rec),
                }),
                Err(reason) => track.record(i, Outcome::Refused(reason)),
            }
        }
        self.readings += n as u64;
        self.bytes += seg.stored.len() as u64;
        self.entries.push_back(Entry { seg, sel, track });
    }

    /// Takes the next request off the queue: the first record whose lane is free, and the
    /// records of the same lane (or, for no lane, others without one) after it, within the
    /// limits.
    fn next_request(&mut self) -> Option<Request<A::Record>> {
        let first = self
            .queue
            .iter()
            .position(|p| p.lane.is_none_or(|l| !self.busy.contains(&l)))?;
        let lane = self.queue[first].lane;
        let (max_n, max_bytes) = self.api.limits();
        let (mut n, mut bytes) = (0usize, 0usize);
        let mut take = Vec::new();
        let mut keep = VecDeque::with_capacity(self.queue.len());
        for (i, p) in std::mem::take(&mut self.queue).into_iter().enumerate() {
            let fits = i >= first
                && p.lane == lane
                && n < max_n.max(1)
                && (n == 0 || bytes + p.size <= max_bytes);
            if fits {
                n += 1;
                bytes += p.size;
                take.push(p);
            } else {
                keep.push_back(p);
            }
        }
        self.queue = keep;
        Some((lane, take))
    }

    /// Starts requests while there is room and nothing holds them back.
    fn launch(&mut self, epoch: u64) {
        if self.hold.is_some() {
            return;
        }
        while self.in_flight.len() < self.window.max_requests.max(1) {
            let Some((lane, records)) = self.next_request() else {
                return;
            };
            if let Some(l) = lane {
                self.busy.insert(l);
            }
            let send = self
                .api
                .send(records.iter().map(|p| p.rec.clone()).collect());
            self.in_flight
                .push(Box::pin(async move { (epoch, records, send.await) }));
        }
    }

    /// Applies the answer of a request. Returns the failure to back off for, if any records
    /// must be sent again.
    fn complete(
        &mut self,
        records: Vec<Pending<A::Record>>,
        answer: Result<Vec<RecordOutcome>, RequestError>,
        status: &UplinkStatus,
    ) -> Option<RequestError> {
        if let Some(l) = records.first().and_then(|p| p.lane) {
            self.busy.remove(&l);
        }
        let outcomes = match answer {
            Ok(o) if o.len() == records.len() => o,
            other => {
                // The upstream may have taken some of them: what is sent again may arrive
                // twice (consumers de-duplicate by ferry-id).
                status.record_resent(records.len() as u64);
                let e = match other {
                    Err(e) => e,
                    Ok(o) => RequestError {
                        message: format!(
                            "the upstream answered for {} records of a request of {}",
                            o.len(),
                            records.len()
                        ),
                        throttled: false,
                    },
                };
                vec![
                    RecordOutcome::Retry {
                        reason: e.message,
                        throttled: e.throttled,
                    };
                    records.len()
                ]
            }
        };
        let mut again = Vec::new();
        let mut failure: Option<RequestError> = None;
        let mut throttled = 0u64;
        for (p, outcome) in records.into_iter().zip(outcomes) {
            let outcome = match outcome {
                RecordOutcome::Delivered => Outcome::Delivered,
                RecordOutcome::Refused(reason) => Outcome::Refused(reason),
                RecordOutcome::Retry {
                    reason,
                    throttled: t,
                } => {
                    throttled += u64::from(t);
                    if failure.as_ref().is_none_or(|f| f.throttled && !t) {
                        failure = Some(RequestError {
                            message: reason,
                            throttled: t,
                        });
                    }
                    again.push(p);
                    continue;
                }
            };
            if let Ok(i) = self.entries.binary_search_by_key(&p.seg, |e| e.seg.id) {
                self.entries[i].track.record(p.record, outcome);
            }
        }
        status.record_throttled(throttled);
        // Back to the front, in order: nothing of their lanes went out meanwhile.
        again.sort_by_key(|p| (p.seg, p.record));
        for p in again.into_iter().rev() {
            self.queue.push_front(p);
        }
        failure
    }

    /// The settled segments at the front, as one ack.
    fn settle(&mut self) -> Option<Settled> {
        let mut out: Option<Settled> = None;
        while self.entries.front().is_some_and(|e| e.track.settled()) {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.readings -= e.seg.readings.len() as u64;
            self.bytes -= e.seg.stored.len() as u64;
            out.get_or_insert_with(Settled::default)
                .add(e.seg, &e.sel, e.track);
        }
        out
    }

    /// Forgets everything read: the buffer task rewinds to the last ack.
    fn abandon(&mut self) {
        self.entries.clear();
        self.queue.clear();
        self.busy.clear();
        self.readings = 0;
        self.bytes = 0;
    }
}

/// How a run loop turn ended.
enum Turn {
    Shutdown,
    BufferClosed,
}

/// Delivers the uplink's buffer consumer through `api` until `shutdown` resolves; then sends
/// nothing new, waits up to `common.grace` for the requests in flight, commits the acks of
/// what was confirmed and returns. Returns early, with an error, only if the buffer cannot be
/// read at all.
pub(crate) async fn run<A: BatchApi>(
    api: Arc<A>,
    common: &Common,
    status: &UplinkStatus,
    window: Window,
    mut retry: Retry,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReadError> {
    let reader = common.reader()?;
    let mut st = State {
        api,
        window,
        entries: VecDeque::new(),
        queue: VecDeque::new(),
        in_flight: FuturesUnordered::new(),
        busy: HashSet::new(),
        readings: 0,
        bytes: 0,
        sent_upto: reader.acked(),
        hold: None,
    };
    let Feed {
        mut segs,
        cmds,
        mut acks,
        task,
    } = feed::spawn(
        reader,
        &common.buffer,
        // Each read brings about a quarter of the window.
        (
            (window.max_readings / 4).max(1),
            (window.max_bytes / 4).max(1),
        ),
        2,
        status.clone(),
    );
    let mut acker = feed::Acks::new(cmds);
    tokio::pin!(shutdown);
    let turn = loop {
        let hold = st.hold;
        tokio::select! {
            biased;
            () = &mut shutdown => break Turn::Shutdown,
            Some(a) = acks.recv() => match acker.answered(a) {
                Ok(true) => retry.progress_on(status),
                Ok(false) => {}
                Err(ferry_buffer::AckError::Closed) => break Turn::BufferClosed,
                Err(e) => {
                    let message = format!("cannot record the ack in the buffer: {e}");
                    restart(&mut st, &mut acker, &mut retry, status, &message);
                }
            },
            Some((epoch, records, answer)) = st.in_flight.next(), if !st.in_flight.is_empty() => {
                if epoch == acker.epoch()
                    && let Some(f) = st.complete(records, answer, status)
                {
                    let delay = retry.fail(status, &f.message, false);
                    tracing::warn!(uplink = %status.name(), r#type = status.kind(),
                        error = %status.scrub(&f.message), retry_in_ms = delay.as_millis() as u64,
                        attempt = retry.failures(),
                        "The upstream did not take every record; they are sent again after the backoff.");
                    st.hold = Some(Instant::now() + delay);
                }
            }
            () = sleep_until_some(hold) => st.hold = None,
            batch = segs.recv(), if st.can_read(status) => match batch {
                None | Some((_, Err(ReadError::Closed))) => break Turn::BufferClosed,
                Some((epoch, _)) if epoch != acker.epoch() => {}
                Some((_, Ok(batch))) => {
                    for seg in batch {
                        st.push(seg, common, status);
                    }
                }
                Some((_, Err(e))) => {
                    let message = format!("cannot read the buffer: {e}");
                    restart(&mut st, &mut acker, &mut retry, status, &message);
                }
            },
        }
        st.launch(acker.epoch());
        if let Some(settled) = st.settle()
            && acker.send(status, settled).is_err()
        {
            break Turn::BufferClosed;
        }
        status.set_in_flight(st.readings);
    };

    // Nothing new goes out; what is in flight gets the grace period.
    let deadline = Instant::now() + common.grace;
    if matches!(turn, Turn::Shutdown) {
        while !st.in_flight.is_empty() {
            let Ok(Some((epoch, records, answer))) =
                tokio::time::timeout_at(deadline, st.in_flight.next()).await
            else {
                break;
            };
            if epoch == acker.epoch() {
                st.complete(records, answer, status);
            }
            if let Some(settled) = st.settle() {
                let _ = acker.send(status, settled);
            }
        }
        if !st.in_flight.is_empty() {
            tracing::warn!(uplink = %status.name(), readings = st.readings,
                "Shutdown grace ran out; unconfirmed records stay in the buffer.");
        }
        while acker.pending() > 0 {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some(a)) => {
                    let _ = acker.answered(a);
                }
                Ok(None) | Err(_) => break,
            }
        }
    } else {
        tracing::info!(uplink = %status.name(), "The buffer closed; the uplink stops.");
    }
    status.set_in_flight(0);
    drop(acker);
    feed::finish(task, deadline, &common.name).await;
    Ok(())
}

/// After a failure of the buffer side: forget what was read, back off, and have the buffer
/// task go back to the last committed ack.
fn restart<A: BatchApi>(
    st: &mut State<A>,
    acker: &mut feed::Acks,
    retry: &mut Retry,
    status: &UplinkStatus,
    message: &str,
) {
    st.abandon();
    acker.abandon();
    acker.rewind();
    let delay = retry.fail(status, message, false);
    st.hold = Some(Instant::now() + delay);
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_buffer::{Buffer, BufferOptions, Source};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    /// What the fake upstream saw.
    #[derive(Default)]
    struct Seen {
        calls: usize,
        /// Ferry ids taken, in the order taken.
        taken: Vec<String>,
        /// Requests in flight per lane, and the most ever at once.
        busy: HashMap<u64, usize>,
        overlap: usize,
    }

    /// Decides the fake's answer for a record of a call.
    type Answer = Arc<dyn Fn(usize, &str) -> Result<RecordOutcome, RequestError> + Send + Sync>;

    /// A fake upstream: records are `(lane, "device:id")`; `answer(call, record)` decides.
    struct Fake {
        seen: Arc<Mutex<Seen>>,
        answer: Answer,
        lanes: bool,
    }

    impl BatchApi for Fake {
        type Record = (u64, String);

        fn limits(&self) -> (usize, usize) {
            (7, 1 << 20)
        }

        fn encode(&self, r: &Reading) -> Result<(u64, String), String> {
            if r.payload.len() > 100 {
                return Err("too big for the fake".into());
            }
            let lane = r.device.bytes().map(u64::from).sum();
            Ok((lane, format!("{}:{}", r.device, r.id)))
        }

        fn size(&self, r: &(u64, String)) -> usize {
            r.1.len()
        }

        fn lane(&self, r: &(u64, String)) -> Option<u64> {
            self.lanes.then_some(r.0)
        }

        fn send(&self, records: Vec<Arc<(u64, String)>>) -> SendFuture {
            let seen = self.seen.clone();
            let answer = self.answer.clone();
            let lane = self.lanes.then(|| records[0].0);
            let call = {
                let mut s = seen.lock().unwrap();
                s.calls += 1;
                if let Some(l) = lane {
                    let n = s.busy.entry(l).or_default();
                    *n += 1;
                    let n = *n;
                    s.overlap = s.overlap.max(n);
                }
                s.calls
            };
            Box::pin(async move {
                // Some requests take longer, so answers come back out of order.
                tokio::time::sleep(Duration::from_millis((call % 3) as u64 * 4)).await;
                let mut s = seen.lock().unwrap();
                if let Some(l) = lane {
                    *s.busy.entry(l).or_default() -= 1;
                }
                let mut out = Vec::new();
                for r in &records {
                    let o = answer(call, &r.1)?;
                    if o == RecordOutcome::Delivered {
                        s.taken.push(r.1.clone());
                    }
                    out.push(o);
                }
                Ok(out)
            })
        }
    }

    fn buffer(dir: &std::path::Path) -> Buffer {
        Buffer::open(
            dir,
            BufferOptions {
                consumers: vec!["fake".into()],
                flush_interval: Duration::ZERO,
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// Appends `n` readings of devices d0..d3 in batches of 9, returns their "device:id"s.
    async fn append(buffer: &Buffer, n: usize, big_every: usize) -> Vec<String> {
        let mut ids = Vec::new();
        let mut i = 0;
        while i < n {
            let rs: Vec<Reading> = (i..n.min(i + 9))
                .map(|j| {
                    let size = if big_every > 0 && j % big_every == big_every - 1 {
                        200
                    } else {
                        8
                    };
                    Reading::new(Source::Http, format!("d{}", j % 4), "t", vec![b'x'; size])
                })
                .collect();
            let receipt = buffer.append(rs.clone()).await.unwrap();
            for (r, id) in rs.iter().zip(receipt.first_id..) {
                ids.push(format!("{}:{id}", r.device));
            }
            i += 9;
        }
        ids
    }

    /// Runs the engine over the buffer until it is empty, then stops it.
    async fn drain(fake: Fake, buffer: &Buffer, status: &UplinkStatus, max_requests: usize) {
        let common = Common::new("fake", "gw", buffer.clone());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let window = Window {
            max_requests,
            max_readings: 40,
            max_bytes: 1 << 20,
        };
        let task = {
            let status = status.clone();
            tokio::spawn(async move {
                run(
                    Arc::new(fake),
                    &common,
                    &status,
                    window,
                    Retry::new(5, 20),
                    async move {
                        let _ = rx.await;
                    },
                )
                .await
            })
        };
        let t = Instant::now();
        while buffer.stats().readings > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{:?}",
                status.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_records_not_taken_are_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = buffer(dir.path());
        let ids = append(&buffer, 100, 25).await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        // Call 2 fails as a whole; in calls 1, 3 and 5 every third record is throttled.
        let fake = Fake {
            seen: seen.clone(),
            answer: Arc::new(|call, id: &str| {
                let n: u64 = id.rsplit(':').next().unwrap().parse().unwrap();
                match call {
                    2 => Err(RequestError {
                        message: "HTTP 503".into(),
                        throttled: false,
                    }),
                    1 | 3 | 5 if n.is_multiple_of(3) => Ok(RecordOutcome::Retry {
                        reason: "Rate exceeded".into(),
                        throttled: true,
                    }),
                    _ => Ok(RecordOutcome::Delivered),
                }
            }),
            lanes: false,
        };
        let status = UplinkStatus::new("fake", "fake", vec![]);
        drain(fake, &buffer, &status, 3).await;
        // Every reading but the four too big for the fake was taken exactly once.
        let mut taken = seen.lock().unwrap().taken.clone();
        taken.sort();
        let mut want: Vec<String> = ids
            .iter()
            .enumerate()
            .filter(|(j, _)| j % 25 != 24)
            .map(|(_, id)| id.clone())
            .collect();
        want.sort();
        assert_eq!(taken, want);
        let snap = status.snapshot();
        assert_eq!(snap.acked_total, 96);
        assert_eq!(snap.dead_lettered_total, 4);
        assert!(snap.throttled_total > 0, "{snap:?}");
        assert!(snap.retried_total > 0, "{snap:?}");
        // The failed call's records may have been taken: they count as re-sent.
        assert!(snap.resent_total >= 1, "{snap:?}");
        assert_eq!(buffer.stats().dead_letters, 4);
        buffer.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lane_has_one_request_at_a_time_and_keeps_its_order_through_retries() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = buffer(dir.path());
        let ids = append(&buffer, 120, 0).await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let fake = Fake {
            seen: seen.clone(),
            answer: Arc::new(|call, id: &str| {
                let n: u64 = id.rsplit(':').next().unwrap().parse().unwrap();
                if call.is_multiple_of(4) && n.is_multiple_of(2) {
                    Ok(RecordOutcome::Retry {
                        reason: "try again".into(),
                        throttled: false,
                    })
                } else {
                    Ok(RecordOutcome::Delivered)
                }
            }),
            lanes: true,
        };
        let status = UplinkStatus::new("fake", "fake", vec![]);
        drain(fake, &buffer, &status, 4).await;
        let (overlap, taken) = {
            let s = seen.lock().unwrap();
            (s.overlap, s.taken.clone())
        };
        assert_eq!(
            overlap, 1,
            "two requests of one lane were in flight at once"
        );
        assert_eq!(taken.len(), 120);
        // Per device (lane), taken in the order appended.
        for d in 0..4 {
            let dev = format!("d{d}:");
            let got: Vec<&String> = taken.iter().filter(|t| t.starts_with(&dev)).collect();
            let want: Vec<&String> = ids.iter().filter(|t| t.starts_with(&dev)).collect();
            assert_eq!(got, want, "order of {dev}");
        }
        buffer.close().await;
    }
}
