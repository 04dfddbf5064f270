//! The segment codec: how a batch of readings is laid out in one redb value.
//!
//! ```text
//! offset size  field
//! 0      4     magic "FRY2" (or "FRY1": format 1, read but no longer written)
//! 4      1     codec: 0 = none, 1 = gzip (one RFC 1952 member)
//! 5      4     reading count, u32 LE
//! 9      8     id of the first reading, u64 LE
//! 17     4     body length before compression, u32 LE
//! 21     4     CRC-32 (IEEE) of the uncompressed body, u32 LE
//! 25     ..    body, compressed with the codec
//! ```
//!
//! The body is the readings back to back, each:
//!
//! ```text
//! u64 id | u64 received_at_ms | u8 source | str device | str topic
//! | u8 has_content_type [str content_type] | u32 property count, (str key, str value)*
//! | bytes payload | u32 boot | u64 boottime_ms | u8 clock | u8 has_origin [str gateway u64 id]
//! ```
//!
//! The fields after the payload are format 2's (magic `FRY2`): the reading's [`ClockStamp`]
//! (its boot index, the boot clock at receipt, and the clock mark: 0 unknown, 1 synced,
//! 2 unsynced, 3 corrected, 4 device; see [`crate::clock`]), then the [`Origin`] of a reading
//! imported from another gateway. `FRY1` records end after the payload and decode with the
//! mark `unknown` and no origin.
//!
//! where `str` and `bytes` are a u32 LE length followed by that many bytes (strings are UTF-8).
//! All integers are little-endian. The same record layout (without the segment header) is used
//! for dead letters, where the clock fields are present when the record is followed by them. The Kafka uplink's `delivery = "segment"` mode ships this value as is.

use crate::clock::{ClockMark, ClockStamp};
use crate::reading::{Origin, Reading, Source};
use bytes::Bytes;
use flate2::Crc;
use flate2::read::GzDecoder;
use std::borrow::Borrow;
use std::cell::RefCell;
use std::io::Read;

/// The four bytes every segment this build writes starts with.
pub const MAGIC: &[u8; 4] = b"FRY2";
/// The magic of format-1 segments (no clock fields), still read.
pub const MAGIC_V1: &[u8; 4] = b"FRY1";
/// Length of a record's clock fields.
const CLOCK_LEN: usize = 4 + 8 + 1;
/// Size of the fixed segment header.
pub const HEADER_LEN: usize = 25;
/// Hard ceiling on a segment body, so a corrupt header cannot make the decoder allocate wildly.
pub const MAX_BODY_LEN: usize = 1 << 30;

/// How a segment body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// Stored as is.
    None,
    /// gzip (flate2) at the given level, 0–9.
    Gzip {
        /// flate2 compression level.
        level: u32,
    },
}

/// A segment that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The value is shorter than its header says.
    #[error("segment is truncated: {0}")]
    Truncated(&'static str),
    /// The magic bytes are wrong.
    #[error("segment has bad magic bytes (not a ferry segment or format from a newer ferry)")]
    BadMagic,
    /// The codec byte is unknown.
    #[error("segment uses unknown codec {0}")]
    UnknownCodec(u8),
    /// The body does not decompress.
    #[error("segment body does not decompress: {0}")]
    Decompress(String),
    /// The body's CRC does not match the header.
    #[error("segment body checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// CRC in the header.
        stored: u32,
        /// CRC of the body as read.
        computed: u32,
    },
    /// A record inside the body is malformed.
    #[error("segment record {index} is malformed: {what}")]
    Record {
        /// Index of the record within the segment.
        index: usize,
        /// What was wrong.
        what: &'static str,
    },
}

/// The header of a segment, readable without decompressing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Number of readings.
    pub count: u32,
    /// Id of the first reading.
    pub first_id: u64,
    /// Length of the body before compression.
    pub raw_len: u32,
    /// Whether the body is gzip-compressed.
    pub gzip: bool,
    /// Whether records carry clock fields (`FRY2`).
    pub clock: bool,
}

pub(crate) fn reading_encoded_len(r: &Reading) -> usize {
    8 + 8
        + 1
        + 4
        + r.device.len()
        + 4
        + r.topic.len()
        + 1
        + r.content_type.as_ref().map_or(0, |c| 4 + c.len())
        + 4
        + r.properties
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>()
        + 4
        + r.payload.len()
        + CLOCK_LEN
        + 1
        + r.origin.as_ref().map_or(0, |o| 4 + o.gateway.len() + 8)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Appends one reading record to `out`.
pub fn encode_reading(out: &mut Vec<u8>, r: &Reading) {
    out.extend_from_slice(&r.id.to_le_bytes());
    out.extend_from_slice(&r.received_at_ms.to_le_bytes());
    out.push(r.source.to_byte());
    put_bytes(out, r.device.as_bytes());
    put_bytes(out, r.topic.as_bytes());
    match &r.content_type {
        Some(c) => {
            out.push(1);
            put_bytes(out, c.as_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(r.properties.len() as u32).to_le_bytes());
    for (k, v) in &r.properties {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
    put_bytes(out, &r.payload);
    out.extend_from_slice(&r.clock.boot.to_le_bytes());
    out.extend_from_slice(&r.clock.boottime_ms.to_le_bytes());
    out.push(r.clock.mark.to_byte());
    match &r.origin {
        Some(o) => {
            out.push(1);
            put_bytes(out, o.gateway.as_bytes());
            out.extend_from_slice(&o.id.to_le_bytes());
        }
        None => out.push(0),
    }
}

pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    index: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor {
            buf,
            pos: 0,
            index: 0,
        }
    }

    fn err(&self, what: &'static str) -> DecodeError {
        DecodeError::Record {
            index: self.index,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.err(what))?;
        if end > self.buf.len() {
            return Err(self.err(what));
        }
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().unwrap_or([0; 4]),
        ))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().unwrap_or([0; 8]),
        ))
    }

    pub(crate) fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    pub(crate) fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    /// The clock fields that follow a format-2 record.
    pub(crate) fn clock(&mut self) -> Result<ClockStamp, DecodeError> {
        let boot = self.u32("clock boot")?;
        let boottime_ms = self.u64("clock boottime")?;
        let mark =
            ClockMark::from_byte(self.u8("clock mark")?).ok_or_else(|| self.err("clock mark"))?;
        Ok(ClockStamp {
            boot,
            boottime_ms,
            mark,
        })
    }

    /// The origin that follows a format-2 record's clock fields.
    pub(crate) fn origin(&mut self) -> Result<Option<Origin>, DecodeError> {
        Ok(match self.u8("origin flag")? {
            0 => None,
            1 => Some(Origin {
                gateway: self.string("origin gateway")?,
                id: self.u64("origin id")?,
            }),
            _ => return Err(self.err("origin flag")),
        })
    }

    /// Bytes not read yet.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Decodes one reading record up to its payload (the clock fields, if any, follow: see
    /// [`Cursor::clock`]); `whole` is the buffer the payload is sliced from.
    pub(crate) fn reading(&mut self, whole: &Bytes) -> Result<Reading, DecodeError> {
        let id = self.u64("id")?;
        let received_at_ms = self.u64("received_at_ms")?;
        let source = Source::from_byte(self.u8("source")?).ok_or_else(|| self.err("source"))?;
        let device = self.string("device")?;
        let topic = self.string("topic")?;
        let content_type = match self.u8("content type flag")? {
            0 => None,
            1 => Some(self.string("content type")?),
            _ => return Err(self.err("content type flag")),
        };
        let n = self.u32("property count")? as usize;
        // Each property takes at least 8 bytes; refuse counts the rest cannot hold.
        if n > (self.buf.len() - self.pos) / 8 {
            return Err(self.err("property count"));
        }
        let mut properties = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.string("property key")?;
            let v = self.string("property value")?;
            properties.push((k, v));
        }
        let len = self.u32("payload")? as usize;
        let start = self.pos;
        self.take(len, "payload")?;
        let payload = whole.slice(start..start + len);
        Ok(Reading {
            id,
            received_at_ms,
            source,
            device,
            topic,
            content_type,
            properties,
            payload,
            clock: ClockStamp::default(),
            origin: None,
        })
    }

    /// A whole record of a segment: the reading, then its clock fields when `clock`.
    pub(crate) fn record(&mut self, whole: &Bytes, clock: bool) -> Result<Reading, DecodeError> {
        let mut r = self.reading(whole)?;
        if clock {
            r.clock = self.clock()?;
            r.origin = self.origin()?;
        }
        self.index += 1;
        Ok(r)
    }
}

/// Encodes readings into one segment value.
pub fn encode_segment<R: Borrow<Reading>>(readings: &[R], compression: Compression) -> Vec<u8> {
    let raw_len: usize = readings
        .iter()
        .map(|r| reading_encoded_len(r.borrow()))
        .sum();
    let mut body = Vec::with_capacity(raw_len);
    for r in readings {
        encode_reading(&mut body, r.borrow());
    }
    let mut crc = Crc::new();
    crc.update(&body);
    let first_id = readings.first().map_or(0, |r| r.borrow().id);
    let (codec, compressed) = match compression {
        Compression::None => (0u8, None),
        Compression::Gzip { level } => match gzip(&body, crc.sum(), level.min(9)) {
            Some(z) => (1u8, Some(z)),
            // Cannot happen (see `gzip`); stored uncompressed rather than lost.
            None => (0u8, None),
        },
    };
    let payload = compressed.as_deref().unwrap_or(&body);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(codec);
    out.extend_from_slice(&(readings.len() as u32).to_le_bytes());
    out.extend_from_slice(&first_id.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

thread_local! {
    /// The deflate state of this thread's last gzip segment, with its level, reused.
    static DEFLATE: RefCell<Option<(u32, flate2::Compress)>> = const { RefCell::new(None) };
}

/// `body` as one gzip member (RFC 1952) whose CRC-32 is `crc`.
///
/// The deflate state (a few hundred KB of tables, whose set-up costs more than compressing a
/// segment of a few hundred readings) is made once per thread and reset between segments,
/// rather than built anew for each, as `flate2::write::GzEncoder` would.
///
/// `None` if deflate reports an error, which it has no reason to do from memory into a
/// growing `Vec`; the state is then dropped and the caller stores the body uncompressed.
fn gzip(body: &[u8], crc: u32, level: u32) -> Option<Vec<u8>> {
    // ID1 ID2, CM = deflate, no flags, MTIME 0, XFL 0, OS unknown.
    const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut out = Vec::with_capacity(GZIP_HEADER.len() + body.len() / 3 + 64);
    out.extend_from_slice(&GZIP_HEADER);
    let done = DEFLATE.with_borrow_mut(|slot| {
        let d = match slot {
            Some((l, d)) if *l == level => {
                d.reset();
                d
            }
            _ => {
                &mut slot
                    .insert((
                        level,
                        flate2::Compress::new(flate2::Compression::new(level), false),
                    ))
                    .1
            }
        };
        loop {
            let consumed = d.total_in() as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(body.len() / 4 + 64);
            }
            match d.compress_vec(&body[consumed..], &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => return true,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "A segment could not be gzip-compressed; it is stored uncompressed, and the deflate state is rebuilt.");
                    *slot = None;
                    return false;
                }
            }
        }
    });
    done.then(|| {
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out
    })
}

/// Reads a segment's header without touching its body.
pub fn decode_header(value: &[u8]) -> Result<SegmentHeader, DecodeError> {
    if value.len() < HEADER_LEN {
        return Err(DecodeError::Truncated("header"));
    }
    let clock = match &value[0..4] {
        m if m == MAGIC => true,
        m if m == MAGIC_V1 => false,
        _ => return Err(DecodeError::BadMagic),
    };
    let gzip = match value[4] {
        0 => false,
        1 => true,
        c => return Err(DecodeError::UnknownCodec(c)),
    };
    let le32 = |o: usize| u32::from_le_bytes([value[o], value[o + 1], value[o + 2], value[o + 3]]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&value[9..17]);
    Ok(SegmentHeader {
        count: le32(5),
        first_id: u64::from_le_bytes(id),
        raw_len: le32(17),
        gzip,
        clock,
    })
}

/// deflate's best ratio is 1032:1, so a body compressed to `compressed_len` bytes inflates to
/// at most this many.
const MAX_DEFLATE_RATIO: usize = 1032;

/// How much to reserve for a gzip body the header says is `raw_len` bytes long: no more than
/// `compressed_len` bytes can inflate to, so a corrupt header cannot make a tiny value reserve
/// up to [`MAX_BODY_LEN`] (1 GiB) before the CRC check refuses it.
#[doc(hidden)]
pub fn first_reservation(raw_len: usize, compressed_len: usize) -> usize {
    raw_len.min(compressed_len.saturating_mul(MAX_DEFLATE_RATIO))
}

/// Decodes a segment value into its readings, checking the CRC.
pub fn decode_segment(value: &[u8]) -> Result<Vec<Reading>, DecodeError> {
    let header = decode_header(value)?;
    let stored_crc = u32::from_le_bytes([value[21], value[22], value[23], value[24]]);
    let raw_len = header.raw_len as usize;
    if raw_len > MAX_BODY_LEN {
        return Err(DecodeError::Truncated("body length is implausible"));
    }
    let body: Vec<u8> = if header.gzip {
        let mut out = Vec::with_capacity(first_reservation(raw_len, value.len() - HEADER_LEN));
        GzDecoder::new(&value[HEADER_LEN..])
            .take(raw_len as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| DecodeError::Decompress(e.to_string()))?;
        out
    } else {
        value[HEADER_LEN..].to_vec()
    };
    if body.len() != raw_len {
        return Err(DecodeError::Truncated("body length differs from header"));
    }
    let mut crc = Crc::new();
    crc.update(&body);
    if crc.sum() != stored_crc {
        return Err(DecodeError::Checksum {
            stored: stored_crc,
            computed: crc.sum(),
        });
    }
    let whole = Bytes::from(body);
    let mut cur = Cursor::new(&whole);
    // Each record is at least 38 bytes, which bounds the allocation for a lying count.
    let mut out = Vec::with_capacity((header.count as usize).min(raw_len / 38 + 1));
    while !cur.is_empty() {
        out.push(cur.record(&whole, header.clock)?);
    }
    if out.len() != header.count as usize {
        return Err(DecodeError::Record {
            index: out.len(),
            what: "record count differs from header",
        });
    }
    if out.first().is_some_and(|r| r.id != header.first_id) {
        return Err(DecodeError::Record {
            index: 0,
            what: "first id differs from header",
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<Reading> {
        (0..n)
            .map(|i| {
                let mut r = Reading::new(
                    Source::Mqtt,
                    format!("dev-{}", i % 7),
                    format!("sensors/dev-{}/temp", i % 7),
                    format!("{{\"t\":{},\"v\":{}.5}}", 1_700_000_000 + i, i),
                );
                r.id = 100 + i as u64;
                if i % 3 == 0 {
                    r.content_type = Some("application/json".into());
                    r.properties = vec![("unit".into(), "C".into())];
                }
                r
            })
            .collect()
    }

    #[test]
    fn round_trip_both_codecs() {
        let rs = sample(50);
        for c in [Compression::None, Compression::Gzip { level: 3 }] {
            let v = encode_segment(&rs, c);
            let h = decode_header(&v).unwrap();
            assert_eq!(h.count, 50);
            assert_eq!(h.first_id, 100);
            assert_eq!(h.gzip, matches!(c, Compression::Gzip { .. }));
            assert_eq!(decode_segment(&v).unwrap(), rs);
        }
    }

    /// The deflate state is reused between segments: back-to-back segments of other sizes
    /// and levels each decode to their own readings, and each is a gzip member any reader
    /// takes.
    #[test]
    fn reused_deflate_state_keeps_segments_apart() {
        for (i, level) in [3, 3, 1, 9, 3, 0, 6].into_iter().enumerate() {
            let rs = sample(1 + i * 37);
            let v = encode_segment(&rs, Compression::Gzip { level });
            assert_eq!(v[4], 1, "gzip codec");
            assert_eq!(
                decode_segment(&v).unwrap(),
                rs,
                "segment {i} at level {level}"
            );
            let mut body = Vec::new();
            GzDecoder::new(&v[HEADER_LEN..])
                .read_to_end(&mut body)
                .expect("a valid gzip member");
            assert_eq!(
                body.len(),
                rs.iter().map(reading_encoded_len).sum::<usize>()
            );
        }
    }

    #[test]
    fn gzip_compresses_json_telemetry() {
        let rs = sample(1000);
        let raw = encode_segment(&rs, Compression::None).len();
        let gz = encode_segment(&rs, Compression::Gzip { level: 3 }).len();
        assert!(gz * 3 < raw, "gzip {gz} vs raw {raw}");
    }

    #[test]
    fn no_single_byte_corruption_goes_unnoticed() {
        let rs = sample(5);
        for c in [Compression::None, Compression::Gzip { level: 6 }] {
            let v = encode_segment(&rs, c);
            for i in 0..v.len() {
                let mut bad = v.clone();
                bad[i] ^= 0x5a;
                // A flip is either detected, or lands in a byte that carries no data (the
                // gzip member's mtime/os fields): it must never yield different readings.
                if let Ok(out) = decode_segment(&bad) {
                    assert_eq!(
                        out, rs,
                        "flip at {i} ({c:?}) changed the readings unnoticed"
                    );
                }
            }
            for cut in 0..v.len() {
                assert!(decode_segment(&v[..cut]).is_err(), "truncated at {cut}");
            }
        }
    }
}
