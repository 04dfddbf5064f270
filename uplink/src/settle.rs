//! The settlement window every uplink shares: what the upstream said about each record of the
//! segments in flight, and how a run of settled segments becomes one buffer ack.
//!
//! ## Rules
//! - A segment is **settled** when every record made of it has an outcome: delivered (the
//!   upstream confirmed it), refused for good (it goes to the dead-letter table with the
//!   reason), or skipped (the uplink's `topics` do not take it, see [`crate::topics`]). A
//!   segment with no record to send is settled at once.
//! - Segments are acked **strictly in order**: a later segment that settles first waits for the
//!   ones before it, so the buffer cursor never passes an unconfirmed reading.
//! - A **transient failure** of any record fails the run: nothing after the last ack counts,
//!   and the uplink sends again from there after its backoff ([`crate::retry`]).
//! - The ack of a run of settled segments carries their dead letters; the buffer commits both
//!   in one transaction ([`crate::feed`]), so a reading is never both acked and lost.

use crate::topics::Selection;
use ferry_buffer::{Reading, Segment};

/// A transient failure: the uplink backs off and sends again from the last ack.
// Only the Kafka uplink reports record-level transient failures.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) message: String,
    /// The client instance is unusable and must be rebuilt before the next try.
    pub(crate) fatal: bool,
}

/// What the upstream said about one record.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Confirmed.
    Delivered,
    /// Refused for good: dead-letter it with this reason.
    Refused(String),
    /// Failed for now: the run is abandoned and sent again.
    Failed(Failure),
}

/// The outcomes of one segment's records so far.
#[derive(Debug)]
pub(crate) struct SegTrack {
    /// Records made of the segment ([`Selection::records`]).
    pub(crate) len: usize,
    /// Records with an outcome.
    pub(crate) reported: usize,
    /// Records confirmed.
    pub(crate) delivered: u64,
    /// Index of each record refused for good, with the reason.
    pub(crate) dead: Vec<(usize, String)>,
    /// The first transient failure.
    pub(crate) failure: Option<Failure>,
}

impl SegTrack {
    pub(crate) fn new(len: usize) -> Self {
        SegTrack {
            len,
            reported: 0,
            delivered: 0,
            dead: Vec::new(),
            failure: None,
        }
    }

    /// Whether the segment needs no more outcomes: complete, or failed.
    pub(crate) fn settled(&self) -> bool {
        self.failure.is_some() || self.reported >= self.len
    }

    /// Records the outcome of record `index`.
    pub(crate) fn record(&mut self, index: usize, outcome: Outcome) {
        self.reported += 1;
        match outcome {
            Outcome::Delivered => self.delivered += 1,
            Outcome::Refused(reason) => self.dead.push((index, reason)),
            Outcome::Failed(f) => {
                self.failure.get_or_insert(f);
            }
        }
    }
}

/// A run of settled segments, as one buffer ack.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// Ack every segment up to and including this id.
    pub(crate) ack_to: u64,
    /// Readings the upstream confirmed.
    pub(crate) delivered: u64,
    /// Readings the uplink's `topics` do not take.
    pub(crate) skipped: u64,
    /// Readings refused for good, with the reason, in reading order.
    pub(crate) dead: Vec<(Reading, String)>,
}

impl Settled {
    /// Adds the next segment in order, settled without failure; takes its refused readings.
    pub(crate) fn add(&mut self, seg: Segment, sel: &Selection, mut track: SegTrack) {
        let n = seg.readings.len();
        self.ack_to = seg.id;
        self.skipped += sel.skipped(n);
        if let Selection::Whole = sel {
            // One record carries every reading of the segment.
            match track.dead.pop() {
                None => self.delivered += n as u64,
                Some((_, reason)) => self
                    .dead
                    .extend(seg.readings.into_iter().map(|r| (r, reason.clone()))),
            }
            return;
        }
        self.delivered += track.delivered;
        if track.dead.is_empty() {
            return;
        }
        let mut refused: Vec<(usize, String)> = track
            .dead
            .into_iter()
            .map(|(record, why)| (sel.reading(record), why))
            .collect();
        refused.sort_by_key(|d| d.0);
        let mut readings = seg.readings.into_iter().enumerate();
        for (i, reason) in refused {
            for (j, r) in readings.by_ref() {
                if j == i {
                    self.dead.push((r, reason));
                    break;
                }
            }
        }
    }

    /// Folds a later ack into this one.
    pub(crate) fn merge(&mut self, later: Settled) {
        self.ack_to = self.ack_to.max(later.ack_to);
        self.delivered += later.delivered;
        self.skipped += later.skipped;
        self.dead.extend(later.dead);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::test_util::segment as seg;

    #[test]
    fn refused_records_map_back_to_their_readings_in_order() {
        // Readings 0, 2 and 3 are sent as records 0, 1, 2; reading 1 is skipped.
        let sel = Selection::Some(Arc::from(vec![0u32, 2, 3]));
        let mut t = SegTrack::new(sel.records(4));
        t.record(2, Outcome::Refused("too big".into()));
        assert!(!t.settled());
        t.record(0, Outcome::Refused("acl".into()));
        t.record(1, Outcome::Delivered);
        assert!(t.settled());
        let mut s = Settled::default();
        s.add(seg(7, &["a", "b", "c", "d"]), &sel, t);
        assert_eq!((s.ack_to, s.delivered, s.skipped), (7, 1, 1));
        let dead: Vec<(u64, &str)> = s.dead.iter().map(|(r, w)| (r.id, w.as_str())).collect();
        assert_eq!(dead, vec![(700, "acl"), (703, "too big")]);
    }

    #[test]
    fn a_whole_segment_record_settles_every_reading() {
        let mut t = SegTrack::new(1);
        t.record(0, Outcome::Delivered);
        let mut s = Settled::default();
        s.add(seg(1, &["a", "b"]), &Selection::Whole, t);
        assert_eq!((s.delivered, s.dead.len()), (2, 0));
        let mut t = SegTrack::new(1);
        t.record(0, Outcome::Refused("too large".into()));
        let mut later = Settled::default();
        later.add(seg(2, &["a", "b", "c"]), &Selection::Whole, t);
        s.merge(later);
        assert_eq!((s.ack_to, s.delivered, s.dead.len()), (2, 2, 3));
    }

    #[test]
    fn a_failure_settles_the_segment_without_completing_it() {
        let mut t = SegTrack::new(3);
        t.record(
            1,
            Outcome::Failed(Failure {
                message: "timeout".into(),
                fatal: false,
            }),
        );
        t.record(
            0,
            Outcome::Failed(Failure {
                message: "second".into(),
                fatal: true,
            }),
        );
        assert!(t.settled());
        let f = t.failure.unwrap();
        assert_eq!((f.message.as_str(), f.fatal), ("timeout", false));
        // Nothing to send: settled at once.
        assert!(SegTrack::new(0).settled());
    }
}
