//! MQTT topic filters: how an uplink's `topics`, Kafka's routes and MQTT rewrites match a
//! reading's source topic.
//!
//! Matching is MQTT's, as [`ferry_config::topic`] states it.

use ferry_buffer::Segment;
use std::sync::Arc;

use ferry_config::topic::matches;

/// The `topics` of one uplink: the readings it takes. A reading no filter matches counts as
/// delivered for that uplink (skipped), so it never holds a segment back.
#[derive(Debug, Clone)]
pub struct TopicFilter {
    /// `None`: every topic (`["#"]`, the default), with no per-reading matching.
    filters: Option<Arc<[String]>>,
}

impl TopicFilter {
    /// The filter set of `topics` (already validated). A lone `#` takes every reading,
    /// including topics starting with `$` (which MQTT's `#` would not match): the default
    /// `["#"]` forwards everything ferry ingested.
    pub fn new(topics: &[String]) -> Self {
        let all = topics.iter().any(|t| t == "#");
        TopicFilter {
            filters: (!all).then(|| topics.iter().cloned().collect()),
        }
    }

    /// A filter that takes every reading.
    pub fn all() -> Self {
        TopicFilter { filters: None }
    }

    /// Whether the uplink takes a reading with this source topic.
    pub fn takes(&self, topic: &str) -> bool {
        match &self.filters {
            None => true,
            Some(f) => f.iter().any(|f| matches(f, topic)),
        }
    }

    /// Which readings of `seg` the uplink sends.
    pub fn select(&self, seg: &Segment) -> Selection {
        match &self.filters {
            None => Selection::All,
            Some(_) => {
                let picked: Vec<u32> = seg
                    .readings
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| self.takes(&r.topic))
                    .map(|(i, _)| i as u32)
                    .collect();
                if picked.len() == seg.readings.len() {
                    Selection::All
                } else {
                    Selection::Some(picked.into())
                }
            }
        }
    }
}

/// The records an uplink makes of one segment, numbered from 0.
#[derive(Debug, Clone)]
pub enum Selection {
    /// One record per reading, every reading.
    All,
    /// One record per listed reading (indexes into the segment); the others are skipped.
    Some(Arc<[u32]>),
    /// One record for the whole segment (Kafka's `delivery = "segment"`).
    Whole,
}

impl Selection {
    /// Records made of a segment of `readings` readings.
    pub fn records(&self, readings: usize) -> usize {
        match self {
            Selection::All => readings,
            Selection::Some(v) => v.len(),
            Selection::Whole => 1,
        }
    }

    /// The reading record `i` carries (record 0 of [`Selection::Whole`] carries them all; this
    /// returns 0 for it).
    pub fn reading(&self, i: usize) -> usize {
        match self {
            Selection::Some(v) => v[i] as usize,
            Selection::All | Selection::Whole => i,
        }
    }

    /// Readings of a segment of `readings` that are not sent.
    pub fn skipped(&self, readings: usize) -> u64 {
        match self {
            Selection::Some(v) => (readings - v.len()) as u64,
            Selection::All | Selection::Whole => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_buffer::{Reading, Source};

    #[test]
    fn selection_skips_what_no_filter_matches() {
        let seg = Segment {
            id: 1,
            readings: ["alarms/a", "tele/a", "alarms/b/c", "tele/b"]
                .iter()
                .map(|t| Reading::new(Source::Mqtt, "d", *t, &b"1"[..]))
                .collect(),
            stored: Vec::new(),
        };
        let f = TopicFilter::new(&["alarms/#".into()]);
        let sel = f.select(&seg);
        assert_eq!(sel.records(4), 2);
        assert_eq!((sel.reading(0), sel.reading(1)), (0, 2));
        assert_eq!(sel.skipped(4), 2);
        let f = TopicFilter::new(&["alarms/#".into(), "tele/+".into()]);
        assert!(matches!(f.select(&seg), Selection::All));
        let f = TopicFilter::new(&["x".into(), "#".into()]);
        assert!(f.takes("anything") && matches!(f.select(&seg), Selection::All));
        let f = TopicFilter::new(&["none/#".into()]);
        assert_eq!(f.select(&seg).records(4), 0);
    }
}
