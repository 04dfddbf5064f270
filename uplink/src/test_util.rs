//! Test scaffolding shared by the uplinks' tests.

use ferry_buffer::{Reading, Segment, Source};

/// A segment `id` with one reading per topic; reading `i` has id `id * 100 + i` and payload
/// `[i]`.
pub(crate) fn segment(id: u64, topics: &[&str]) -> Segment {
    Segment {
        id,
        readings: topics
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut r = Reading::new(Source::Mqtt, "d", *t, vec![i as u8]);
                r.id = id * 100 + i as u64;
                r
            })
            .collect(),
        stored: Vec::new(),
    }
}
