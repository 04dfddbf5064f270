//! The dead-letter record: a reading an uplink gave up on, with when, which uplink and why.
//! Written by the writer, read by the requeue, the inspector and `verify`.
//!
//! Layout (little-endian): `dead_at_ms u64`, `consumer` (u32 length + UTF-8), `reason` (u32
//! length + UTF-8), then the reading as a segment record ([`crate::segment::encode_reading`]).
//! Records written before format 2 end after the payload (no clock or origin).

use crate::reading::Reading;
use crate::segment::{self, Cursor, DecodeError};

/// A reading in the dead-letter table.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The reading, with its original id.
    pub reading: Reading,
    /// Why the uplink gave up on it.
    pub reason: String,
    /// Which uplink dead-lettered it.
    pub consumer: String,
    /// When, in ms since the epoch.
    pub dead_at_ms: u64,
}

/// Encodes a dead letter.
pub(crate) fn encode(dead_at_ms: u64, consumer: &str, reason: &str, r: &Reading) -> Vec<u8> {
    let mut v = Vec::with_capacity(r.encoded_len() + consumer.len() + reason.len() + 16);
    v.extend_from_slice(&dead_at_ms.to_le_bytes());
    v.extend_from_slice(&(consumer.len() as u32).to_le_bytes());
    v.extend_from_slice(consumer.as_bytes());
    v.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    v.extend_from_slice(reason.as_bytes());
    segment::encode_reading(&mut v, r);
    v
}

/// Decodes a dead letter.
pub(crate) fn decode(value: &[u8]) -> Result<DeadLetter, DecodeError> {
    let whole = bytes::Bytes::copy_from_slice(value);
    let mut c = Cursor::new(&whole);
    let dead_at_ms = c.u64("dead_at_ms")?;
    let consumer = c.string("consumer")?;
    let reason = c.string("reason")?;
    let mut reading = c.reading(&whole)?;
    if c.remaining() > 0 {
        reading.clock = c.clock()?;
        reading.origin = c.origin()?;
    }
    Ok(DeadLetter {
        reading,
        reason,
        consumer,
        dead_at_ms,
    })
}
