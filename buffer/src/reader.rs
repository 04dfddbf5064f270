//! The reader/ack API used by uplinks: each consumer has its own cursor over the same segments.

use crate::error::{AckError, ReadError, StorageFailure, StorageFailureKind};
use crate::reading::Reading;
use crate::segment::{self, DecodeError};
use crate::store::SEGMENTS;
use crate::writer::Cmd;
use crate::{Buffer, Shared, sf};
use redb::ReadableDatabase;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, watch};

/// One committed segment, as handed to an uplink.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Segment id; acks are by segment id.
    pub id: u64,
    /// The readings, in id order (requeued readings keep their original ids).
    pub readings: Vec<Reading>,
    /// The stored value, exactly as on disk (see [`crate::segment`] for the framing).
    pub stored: Vec<u8>,
}

/// A consumer's view of the buffer. Reading does not delete anything; [`Reader::ack`] does,
/// once every enabled consumer has acked a segment.
#[derive(Debug)]
pub struct Reader {
    consumer: String,
    buffer: Buffer,
    committed: watch::Receiver<u64>,
    position: u64,
    acked: u64,
}

impl Reader {
    pub(crate) fn new(consumer: &str, buffer: Buffer) -> Result<Self, ReadError> {
        let acked = *buffer
            .shared
            .stats_lock()
            .cursors
            .get(consumer)
            .ok_or_else(|| ReadError::UnknownConsumer(consumer.to_string()))?;
        Ok(Reader {
            consumer: consumer.to_string(),
            committed: buffer.shared.committed.subscribe(),
            buffer,
            position: acked,
            acked,
        })
    }

    /// The consumer's name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Id of the last segment handed out by [`Reader::next`].
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Id of the last segment this consumer acked.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Goes back to the last acked segment, so unacked segments are read again (after an
    /// upstream reconnect, say).
    pub fn rewind(&mut self) {
        self.position = self.acked;
    }

    /// Returns up to `max` segments after the read position, oldest first, waiting until at
    /// least one exists. Segments that fail their checksum are skipped, logged and counted.
    /// Readings stamped before the clock was synchronized come with their corrected time
    /// where their boot's sync is known ([`crate::clock`]).
    pub async fn next(&mut self, max: usize) -> Result<Vec<Segment>, ReadError> {
        loop {
            let newest = *self.committed.borrow_and_update();
            if newest > self.position {
                let got = self.try_next(max).await?;
                if !got.is_empty() {
                    return Ok(got);
                }
                // Everything past the position was deleted (evicted by the byte cap or TTL).
                self.position = self.position.max(newest);
            }
            if self.committed.changed().await.is_err() {
                return Err(ReadError::Closed);
            }
        }
    }

    /// Like [`Reader::next`] but returns at once, possibly with nothing.
    pub async fn try_next(&mut self, max: usize) -> Result<Vec<Segment>, ReadError> {
        let db = self.buffer.shared.db()?;
        let from = self.position + 1;
        let max = max.max(1);
        let (shared, consumer) = (self.buffer.shared.clone(), self.consumer.clone());
        let read = tokio::task::spawn_blocking(move || {
            read_segments(&db, from, max, &shared.leases, &consumer)
        })
        .await
        .map_err(|e| {
            ReadError::Storage(StorageFailure {
                kind: StorageFailureKind::Other,
                message: format!("segment read task failed: {e}"),
            })
        })??;
        let mut out = Vec::with_capacity(read.len());
        for (id, stored, decoded) in read {
            self.position = id;
            match decoded {
                Ok(mut readings) => {
                    // Readings received before the clock was synchronized leave with the
                    // corrected time (crate::clock); a segment shipped as stored is re-encoded
                    // so that it says the same.
                    let changed = self.buffer.shared.clock.correct(&mut readings);
                    let stored = if changed {
                        segment::encode_segment(&readings, self.buffer.shared.opts.compression)
                    } else {
                        stored
                    };
                    out.push(Segment {
                        id,
                        readings,
                        stored,
                    })
                }
                Err(e) => {
                    tracing::error!(segment = id, error = %e, consumer = %self.consumer,
                        "A buffer segment failed its integrity check and is skipped; its readings cannot be forwarded.");
                    metrics::counter!("ferry_buffer_corrupt_segments_total").increment(1);
                    self.buffer.shared.stats_lock().corrupt_segments_total += 1;
                }
            }
        }
        Ok(out)
    }

    /// Records that the upstream has every reading of segments up to and including `segment`.
    /// Returns after the cursor is committed. Acks never move backwards.
    pub async fn ack(&mut self, segment: u64) -> Result<(), AckError> {
        if segment <= self.acked {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.buffer.send(Cmd::Ack {
            consumer: self.consumer.clone(),
            segment,
            reply,
        });
        rx.await.map_err(|_| AckError::Closed)??;
        self.acked = segment;
        self.position = self.position.max(segment);
        Ok(())
    }

    /// Moves readings to the dead-letter table with a reason. The segments they came from are
    /// still acked separately.
    pub async fn dead_letter(&self, items: Vec<(Reading, String)>) -> Result<(), AckError> {
        if items.is_empty() {
            return Ok(());
        }
        let n = items.len() as u64;
        let (reply, rx) = oneshot::channel();
        self.buffer.send(Cmd::DeadLetter {
            consumer: self.consumer.clone(),
            items,
            reply,
        });
        rx.await.map_err(|_| AckError::Closed)??;
        metrics::counter!("ferry_readings_dead_lettered_total", "consumer" => self.consumer.clone())
            .increment(n);
        Ok(())
    }
}

impl Drop for Reader {
    /// A dropped reader has nothing in flight any more: its lease ends.
    fn drop(&mut self) {
        self.buffer
            .shared
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.consumer);
    }
}

type ReadSegment = (u64, Vec<u8>, Result<Vec<Reading>, DecodeError>);

/// Reads up to `max` segments from id `from` on, and records the newest of them as the
/// consumer's lease. The lease lock is held while the read snapshot is taken, so the writer
/// either sees the lease before it chooses what to evict, or has committed its evictions
/// before the snapshot.
fn read_segments(
    db: &Arc<redb::Database>,
    from: u64,
    max: usize,
    leases: &Mutex<BTreeMap<String, u64>>,
    consumer: &str,
) -> Result<Vec<ReadSegment>, ReadError> {
    let txn = {
        let mut leases = leases.lock().unwrap_or_else(|p| p.into_inner());
        let txn = db.begin_read().map_err(sf)?;
        let table = txn.open_table(SEGMENTS).map_err(sf)?;
        let newest = table
            .range(from..)
            .map_err(sf)?
            .take(max)
            .last()
            .transpose()
            .map_err(sf)?
            .map(|(k, _)| k.value());
        if let Some(newest) = newest {
            let lease = leases.entry(consumer.to_string()).or_default();
            *lease = (*lease).max(newest);
        }
        txn
    };
    let table = txn.open_table(SEGMENTS).map_err(sf)?;
    let mut out = Vec::new();
    for entry in table.range(from..).map_err(sf)?.take(max) {
        let (k, v) = entry.map_err(sf)?;
        let stored = v.value().to_vec();
        let decoded = segment::decode_segment(&stored);
        out.push((k.value(), stored, decoded));
    }
    Ok(out)
}

impl Shared {
    pub(crate) fn db(&self) -> Result<Arc<redb::Database>, ReadError> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ReadError::Closed);
        }
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                ReadError::Storage(StorageFailure {
                    kind: StorageFailureKind::Io,
                    message: "buffer is reopening after a storage error".into(),
                })
            })
    }
}
