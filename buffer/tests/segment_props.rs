//! Property tests of the segment codec, the stable-toolchain twin of the `segment_decode`
//! fuzz target (fuzz/fuzz_targets/segment_decode.rs): arbitrary bytes decode to Ok or a typed
//! error without panicking, and encode/decode round-trips arbitrary readings.

use ferry_buffer::segment::{DecodeError, decode_header, decode_segment, encode_segment};
use ferry_buffer::{ClockMark, ClockStamp, Compression, Origin, Reading, Source};
use proptest::prelude::*;

fn reading() -> impl Strategy<Value = Reading> {
    (
        any::<u64>(),
        any::<u64>(),
        0u8..4,
        ".{0,12}",
        ".{0,24}",
        proptest::option::of(".{0,16}"),
        proptest::collection::vec((".{0,8}", ".{0,8}"), 0..3),
        proptest::collection::vec(any::<u8>(), 0..64),
        (
            any::<u32>(),
            any::<u64>(),
            0usize..5,
            proptest::option::of((".{0,12}", any::<u64>())),
        ),
    )
        .prop_map(|(id, at, src, device, topic, ct, props, payload, clock)| {
            let source = [
                Source::Mqtt,
                Source::MqttWill,
                Source::Http,
                Source::Requeue,
            ][src as usize];
            let mut r = Reading::new(source, device, topic, payload);
            r.id = id;
            r.received_at_ms = at;
            r.content_type = ct;
            r.properties = props;
            r.clock = ClockStamp {
                boot: clock.0,
                boottime_ms: clock.1,
                mark: ClockMark::ALL[clock.2],
            };
            r.origin = clock.3.map(|(gateway, id)| Origin { gateway, id });
            r
        })
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        (0u32..10).prop_map(|level| Compression::Gzip { level }),
    ]
}

/// `n` cases, or `PROPTEST_CASES` when set (for long runs, see bench/fuzz.sh).
fn cases(n: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    ProptestConfig::with_cases(n)
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn round_trip(readings in proptest::collection::vec(reading(), 0..8), c in compression()) {
        let v = encode_segment(&readings, c);
        let h = decode_header(&v).unwrap();
        prop_assert_eq!(h.count as usize, readings.len());
        prop_assert_eq!(decode_segment(&v), Ok(readings));
    }

    #[test]
    fn arbitrary_bytes_are_ok_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(readings) = decode_segment(&bytes) {
            prop_assert_eq!(decode_segment(&encode_segment(&readings, Compression::None)), Ok(readings));
        }
    }

    /// Mutations of a valid segment: the interesting inputs, which random bytes rarely reach.
    #[test]
    fn mutated_segments_are_ok_or_a_typed_error(
        readings in proptest::collection::vec(reading(), 1..4),
        c in compression(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut v = encode_segment(&readings, c);
        for (at, x) in flips {
            let i = at.index(v.len());
            v[i] ^= x;
        }
        let v = &v[..v.len() - cut.index(v.len() / 4 + 1)];
        if let Ok(out) = decode_segment(v) {
            prop_assert_eq!(decode_segment(&encode_segment(&out, Compression::None)), Ok(out));
        }
    }
}

/// A gzip segment whose header claims a 1 GiB body is refused without reserving 1 GiB: the
/// decoder's first reservation is bounded by what the compressed bytes can inflate to.
#[test]
fn lying_body_length_is_a_typed_error() {
    let mut v = encode_segment(
        &[Reading::new(Source::Mqtt, "d", "t", b"x".to_vec())],
        Compression::Gzip { level: 1 },
    );
    v[17..21].copy_from_slice(&(1u32 << 30).to_le_bytes());
    assert_eq!(
        decode_segment(&v),
        Err(DecodeError::Truncated("body length differs from header"))
    );
    assert_eq!(
        ferry_buffer::segment::first_reservation(1 << 30, 40),
        40 * 1032
    );
    assert_eq!(ferry_buffer::segment::first_reservation(500, 40), 500);
}
