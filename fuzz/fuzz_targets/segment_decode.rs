//! The segment decoder (buffer/src/segment.rs) on arbitrary bytes, and the encode/decode
//! round trip on arbitrary readings.
//!
//! Properties: decoding arbitrary bytes returns Ok or a typed `DecodeError`, never panics, and
//! never allocates more than the input could hold (run with `-malloc_limit_mb`, see
//! bench/fuzz.sh); whatever decodes re-encodes to a value that decodes to the same readings;
//! `decode(encode(readings)) == readings` for both codecs.

#![no_main]

use ferry_buffer::segment::{decode_header, decode_segment, encode_segment};
use ferry_buffer::{ClockMark, ClockStamp, Compression, Reading, Source};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct ArbReading {
    id: u64,
    received_at_ms: u64,
    source: u8,
    device: String,
    topic: String,
    content_type: Option<String>,
    properties: Vec<(String, String)>,
    payload: Vec<u8>,
    boot: u32,
    boottime_ms: u64,
    mark: u8,
}

impl ArbReading {
    fn into_reading(self) -> Reading {
        let source = match self.source % 4 {
            0 => Source::Mqtt,
            1 => Source::MqttWill,
            2 => Source::Http,
            _ => Source::Requeue,
        };
        let mut r = Reading::new(source, self.device, self.topic, self.payload);
        r.id = self.id;
        r.received_at_ms = self.received_at_ms;
        r.content_type = self.content_type;
        r.properties = self.properties;
        r.clock = ClockStamp {
            boot: self.boot,
            boottime_ms: self.boottime_ms,
            mark: ClockMark::ALL[self.mark as usize % ClockMark::ALL.len()],
        };
        r
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Arbitrary bytes: Ok or a typed error.
        let header = decode_header(rest);
        if let Ok(readings) = decode_segment(rest) {
            let h = header.expect("a segment that decodes has a valid header");
            assert_eq!(h.count as usize, readings.len());
            for c in [Compression::None, Compression::Gzip { level: 1 }] {
                let again = encode_segment(&readings, c);
                assert_eq!(decode_segment(&again).as_ref(), Ok(&readings));
            }
        }
    } else {
        // Round trip of arbitrary readings.
        let mut u = Unstructured::new(rest);
        let Ok(items) = Vec::<ArbReading>::arbitrary(&mut u) else {
            return;
        };
        let readings: Vec<Reading> = items.into_iter().map(ArbReading::into_reading).collect();
        let c = if mode & 2 == 0 {
            Compression::None
        } else {
            Compression::Gzip {
                level: u32::from(mode >> 2) % 10,
            }
        };
        let v = encode_segment(&readings, c);
        assert_eq!(decode_segment(&v), Ok(readings));
    }
});
