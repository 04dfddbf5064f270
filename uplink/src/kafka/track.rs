//! Counts librdkafka's delivery reports per segment.
//!
//! Every record handed to librdkafka carries a record sequence number (its delivery opaque, a
//! plain `usize`: no allocation per record). The run loop registers each segment before it
//! sends the segment's records, as the range of sequence numbers `first..first + len`; the
//! producer's polling thread calls [`Tracker::report`] once per record and wakes the run loop
//! when a segment is complete (every record reported) or failed. Reports for sequence numbers
//! no registered segment holds (records purged after a failure, from segments already
//! abandoned) are ignored. Sequence numbers wrap around; the ranges in flight are a tiny
//! window of `usize`, so the wrapping comparisons stay unambiguous.

use super::sink::{ErrorClass, classify};
use crate::settle::{Failure, Outcome, SegTrack};
use rdkafka::error::KafkaError;
use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use tokio::sync::Notify;

/// What a delivery report (or a refusal at enqueue time) means for the record.
pub(crate) fn outcome(result: Result<(), &KafkaError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Delivered,
        Err(e) => match classify(e) {
            ErrorClass::Permanent => Outcome::Refused(e.to_string()),
            class => Outcome::Failed(Failure {
                message: failure_line(e),
                fatal: class == ErrorClass::Fatal,
            }),
        },
    }
}

/// The status line of a failed delivery. A missing topic or a refused authorization is the
/// cloud side's configuration, not the reading's fault: it is retried (the readings wait in
/// the buffer until the topic or the permission exists), with a line that says what to fix.
fn failure_line(e: &KafkaError) -> String {
    use rdkafka::error::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::UnknownTopic | C::UnknownTopicOrPartition) => format!(
            "the topic does not exist on the brokers: create it, or check topic and routes ({e})"
        ),
        Some(C::TopicAuthorizationFailed) => format!(
            "the brokers do not let ferry write to the topic: check its ACLs or IAM policy ({e})"
        ),
        Some(C::ClusterAuthorizationFailed) => {
            format!("the brokers do not let ferry produce (idempotent write permission?): {e}")
        }
        _ => format!("delivery failed: {e}"),
    }
}

/// One segment in flight: its first sequence number and its outcomes.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// Sequence number of the segment's record 0.
    pub(crate) first: usize,
    pub(crate) track: SegTrack,
}

/// The segments in flight, oldest first, shared by the run loop and the producer's polling
/// thread.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    segs: Mutex<VecDeque<Tracked>>,
    /// Woken when a segment becomes settled.
    pub(crate) wake: Notify,
}

impl Tracker {
    pub(crate) fn lock(&self) -> MutexGuard<'_, VecDeque<Tracked>> {
        self.segs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a segment of `len` records numbered from `first`.
    pub(crate) fn register(&self, first: usize, len: usize) {
        self.lock().push_back(Tracked {
            first,
            track: SegTrack::new(len),
        });
    }

    /// Records the outcome of the record numbered `seq` (from librdkafka's report, or from a
    /// refusal at enqueue time).
    pub(crate) fn report(&self, seq: usize, result: Result<(), &KafkaError>) {
        let settled = {
            let mut segs = self.lock();
            let Some(s) = find(&mut segs, seq) else {
                return;
            };
            let was = s.track.settled();
            s.track.record(seq.wrapping_sub(s.first), outcome(result));
            !was && s.track.settled()
        };
        if settled {
            self.wake.notify_one();
        }
    }

    /// Fails the segment holding record `seq` (it could not be handed to librdkafka).
    pub(crate) fn fail(&self, seq: usize, failure: Failure) {
        {
            let mut segs = self.lock();
            let Some(s) = find(&mut segs, seq) else {
                return;
            };
            s.track.failure.get_or_insert(failure);
        }
        self.wake.notify_one();
    }

    /// Forgets every segment: reports still to come for them are ignored.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }
}

/// The segment holding record `seq`. The segments' ranges follow each other in registration
/// order, so their offsets from the oldest one grow: a binary search, not a scan of the
/// (up to `max_inflight_segments`) segments in flight.
fn find(segs: &mut VecDeque<Tracked>, seq: usize) -> Option<&mut Tracked> {
    let base = segs.front()?.first;
    let at = seq.wrapping_sub(base);
    let i = segs.partition_point(|s| s.first.wrapping_sub(base) + s.track.len <= at);
    segs.get_mut(i)
        .filter(|s| seq.wrapping_sub(s.first) < s.track.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_find_their_segment_across_the_wrap() {
        let t = Tracker::default();
        // Three segments numbered across usize::MAX: 3 records, 1 record, 4 records.
        let first = usize::MAX - 2;
        t.register(first, 3);
        t.register(first.wrapping_add(3), 1);
        t.register(first.wrapping_add(4), 4);
        for seq in [usize::MAX, 0, 1, 2, 3, 4] {
            t.report(seq, Ok(()));
        }
        // Before the oldest, and after the newest: ignored.
        t.report(first.wrapping_sub(1), Ok(()));
        t.report(first.wrapping_add(8), Ok(()));
        let segs = t.lock();
        let got: Vec<(usize, u64)> = segs
            .iter()
            .map(|s| (s.track.reported, s.track.delivered))
            .collect();
        assert_eq!(got, vec![(1, 1), (1, 1), (4, 4)]);
        assert!(!segs[0].track.settled() && segs[1].track.settled() && segs[2].track.settled());
    }
}
