//! Reading what is left of a buffer file that redb cannot open (a quarantined file).
//!
//! A file whose header or page tree is damaged is quarantined whole ([`crate::store`]), yet
//! most of its pages usually still hold intact segments. [`salvage`] finds them without
//! redb: it scans the file for the segment magic (`FRY2`, `FRY1`), decodes what follows as a
//! segment ([`crate::segment`]) and keeps it only if its CRC-32 and every record check out.
//! Limits, stated where they are enforced:
//! - a segment whose bytes are damaged fails its checksum and is lost, with its readings;
//! - redb writes copy-on-write, so freed pages may still hold older copies of segments,
//!   including segments every uplink had already acked: those readings come back too.
//!   Copies of one segment are reported once; a reading already delivered is sent again
//!   with the same `ferry-id`, which consumers de-duplicate;
//! - times are as stamped: the file's clock records (`boots`) are in redb's tables, so
//!   readings received before a clock sync keep the mark `unsynced`.

use crate::reading::Reading;
use crate::segment::{self, HEADER_LEN, MAGIC, MAGIC_V1};
use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::ops::ControlFlow;
use std::path::Path;

/// Segments whose header claims a body larger than this are not believed.
const MAX_SALVAGE_BODY: u64 = 64 << 20;

/// What [`salvage`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SalvageReport {
    /// Bytes of the file scanned.
    pub bytes: u64,
    /// Segments recovered (each once).
    pub segments: u64,
    /// Readings in them.
    pub readings: u64,
    /// Further copies of recovered segments (older pages), not handed out again.
    pub copies: u64,
    /// Places that looked like a segment but failed its checks (damaged, or chance bytes).
    pub rejected: u64,
}

/// Scans the file at `path` for intact segments and hands their readings to `each`, in the
/// order found (see the module doc for what can and cannot come back).
pub fn salvage(
    path: &Path,
    mut each: impl FnMut(Reading) -> ControlFlow<()>,
) -> std::io::Result<SalvageReport> {
    let mut scan = std::fs::File::open(path)?;
    let mut probe = std::fs::File::open(path)?;
    let len = scan.metadata()?.len();
    let mut rep = SalvageReport {
        bytes: len,
        ..SalvageReport::default()
    };
    let mut seen: HashSet<(u64, u32, u32)> = HashSet::new();
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK + 3];
    let mut base = 0u64;
    let mut carry = 0usize;
    loop {
        let n = read_full(&mut scan, &mut buf[carry..])?;
        let filled = carry + n;
        if filled < 4 {
            break;
        }
        for i in 0..filled - 3 {
            let m = &buf[i..i + 4];
            if m != MAGIC && m != MAGIC_V1 {
                continue;
            }
            let at = base + i as u64;
            match candidate(&mut probe, at, len)? {
                Some(readings) => {
                    let first = readings.first().map_or(0, |r| r.id);
                    let crc_key = readings.len() as u32;
                    let raw = readings.iter().map(|r| r.encoded_len() as u32).sum::<u32>();
                    if !seen.insert((first, crc_key, raw)) {
                        rep.copies += 1;
                        continue;
                    }
                    rep.segments += 1;
                    for r in readings {
                        rep.readings += 1;
                        if each(r).is_break() {
                            return Ok(rep);
                        }
                    }
                }
                None => rep.rejected += 1,
            }
        }
        if n == 0 {
            break;
        }
        // Keep the last 3 bytes: a magic may straddle two chunks.
        buf.copy_within(filled - 3..filled, 0);
        base += (filled - 3) as u64;
        carry = 3;
    }
    Ok(rep)
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The readings of the segment at `at`, if one is there intact.
fn candidate(f: &mut std::fs::File, at: u64, len: u64) -> std::io::Result<Option<Vec<Reading>>> {
    let mut head = [0u8; HEADER_LEN];
    f.seek(SeekFrom::Start(at))?;
    if read_full(f, &mut head)? < HEADER_LEN {
        return Ok(None);
    }
    let Ok(h) = segment::decode_header(&head) else {
        return Ok(None);
    };
    let raw = h.raw_len as u64;
    if raw > MAX_SALVAGE_BODY || h.count == 0 {
        return Ok(None);
    }
    // A gzip body is at most its raw length plus deflate's stored-block overhead (5 bytes per
    // 16 KiB) and the gzip framing; anything after the member is ignored by the decoder.
    let body = if h.gzip {
        raw + raw / 16_000 * 5 + 64
    } else {
        raw
    };
    let body = body.min(len.saturating_sub(at + HEADER_LEN as u64));
    let mut value = Vec::with_capacity(HEADER_LEN + body as usize);
    value.extend_from_slice(&head);
    f.take(body).read_to_end(&mut value)?;
    Ok(segment::decode_segment(&value).ok())
}
