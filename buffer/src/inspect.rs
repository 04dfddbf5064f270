//! Reading a buffer file without changing it: [`Inspector`], for `ferry buffer
//! stats|verify|export|dead-letter list`, also while a gateway holds the file.

use super::*;

/// Read-only access to a buffer file, for `ferry buffer stats|verify|dead-letter list`, that
/// never changes the file:
///
/// - a file closed cleanly is opened read-only ([`FileState::Closed`]);
/// - a file that was not (ferry was killed, or the power cut) is opened through an in-memory
///   overlay on which redb repairs it, as ferry will on start ([`FileState::NotClosedCleanly`]);
/// - the file of a running gateway, which holds it exclusively, is opened through the same
///   overlay ([`FileState::InUse`]). Its writer may commit meanwhile; a commit rewrites the
///   file's header, so the view is taken again (up to [`Inspector::ATTEMPTS`] times) until the
///   header is the same before and after reading, which means no commit landed in between
///   (a commit in progress writes only pages the last commit does not use).
///
/// The overlay holds what the repair writes: roughly the allocator state, a few MB for a large
/// file; the repair reads the whole file once, which takes a while for gigabytes on an SD card.
///
/// A view torn by a commit usually fails to repair, or panics in redb, and is taken again; but
/// a torn view can also make redb panic while unwinding, which aborts the process. So read a
/// file in use ([`Inspector::in_use`]) in a process of its own and try again if it dies, as
/// `ferry buffer` does.
pub struct Inspector {
    db: InspectDb,
    path: PathBuf,
    state: FileState,
}

/// How the file was found by an [`Inspector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// Closed cleanly by the last gateway.
    Closed,
    /// Not closed cleanly; ferry repairs it on start. The figures are from the repaired view.
    NotClosedCleanly,
    /// In use by a running gateway; the figures are from the moment of reading.
    InUse,
}

enum InspectDb {
    ReadOnly(redb::ReadOnlyDatabase),
    Overlay(redb::Database),
}

impl store::Readable for InspectDb {
    fn begin(&self) -> Result<redb::ReadTransaction, redb::Error> {
        match self {
            InspectDb::ReadOnly(db) => db.begin(),
            InspectDb::Overlay(db) => db.begin(),
        }
    }
}

impl InspectDb {
    fn begin_read(&self) -> Result<redb::ReadTransaction, redb::Error> {
        store::Readable::begin(self)
    }
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspector")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What [`Inspector::export`] read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    /// Segments in the file.
    pub segments: u64,
    /// Readings decoded from them (all handed to the callback, unless it stopped early).
    pub readings: u64,
    /// Segments skipped because they did not decode.
    pub damaged: Vec<DamagedSegment>,
}

/// A segment [`Inspector::export`] could not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSegment {
    /// Its id.
    pub segment: u64,
    /// The readings the index says it held (0 if its index row is gone too).
    pub readings: u64,
    /// What was wrong.
    pub why: String,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Segments read.
    pub segments: u64,
    /// Readings decoded.
    pub readings: u64,
    /// Problems found, one line each. Empty means the file is sound.
    pub problems: Vec<String>,
}

/// Stored state as read from the file by an [`Inspector`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredStats {
    /// Format version in the file.
    pub format_version: u64,
    /// Readings in the buffer.
    pub readings: u64,
    /// Segments.
    pub segments: u64,
    /// Stored segment bytes.
    pub stored_bytes: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Dead-letter bytes.
    pub dead_letter_bytes: u64,
    /// Next reading id.
    pub next_reading_id: u64,
    /// Newest segment id.
    pub newest_segment: u64,
    /// Each consumer's last acked segment.
    pub cursors: BTreeMap<String, u64>,
    /// Oldest buffered reading's receive time.
    pub oldest_received_ms: Option<u64>,
    /// File size.
    pub file_bytes: u64,
    /// Quarantined files.
    pub quarantined: Vec<PathBuf>,
}

impl Inspector {
    /// How often a view of a running gateway's file is taken before giving up.
    pub const ATTEMPTS: usize = 5;

    /// Opens `data_dir/buffer.redb` without changing it (see the type's docs).
    pub fn open(data_dir: &Path) -> Result<Inspector, OpenError> {
        let path = data_dir.to_path_buf();
        let (state, db) = Self::try_read_only(data_dir, 4 << 20)?;
        if let Some(db) = db {
            return Ok(Inspector {
                db: InspectDb::ReadOnly(db),
                path,
                state,
            });
        }
        let db = store::open_overlay(data_dir, 4 << 20)?;
        Ok(Inspector {
            db: InspectDb::Overlay(db),
            path,
            state,
        })
    }

    /// How the file is found by one read-only open attempt, and the handle when it was closed
    /// cleanly.
    fn try_read_only(
        data_dir: &Path,
        cache_bytes: usize,
    ) -> Result<(FileState, Option<redb::ReadOnlyDatabase>), OpenError> {
        match store::open_read_only(data_dir, cache_bytes) {
            Ok(db) => Ok((FileState::Closed, Some(db))),
            Err(OpenError::InUse { .. }) => Ok((FileState::InUse, None)),
            Err(OpenError::Storage { source, .. })
                if source.kind == error::StorageFailureKind::Corrupted =>
            {
                Ok((FileState::NotClosedCleanly, None))
            }
            Err(e) => Err(e),
        }
    }

    /// How the file is, cheaply: one open attempt, no repair.
    pub fn file_state(data_dir: &Path) -> Result<FileState, OpenError> {
        Ok(Self::try_read_only(data_dir, 1 << 20)?.0)
    }

    /// Whether a running gateway holds the file (cheap: one open attempt, no repair).
    pub fn in_use(data_dir: &Path) -> bool {
        matches!(Self::file_state(data_dir), Ok(FileState::InUse))
    }

    /// How the file was found.
    pub fn state(&self) -> FileState {
        self.state
    }

    /// Runs `read` on a consistent view: once for a file nobody writes; for a running
    /// gateway's file, until its header is the same before and after (see the type's docs).
    pub fn consistent<T>(
        data_dir: &Path,
        read: impl Fn(&Inspector) -> Result<T, ReadError>,
    ) -> Result<(T, FileState), InspectError> {
        let header = || store::file_header(data_dir);
        for _ in 0..Self::ATTEMPTS {
            let before = header().map_err(|e| {
                InspectError::Open(OpenError::DataDir {
                    path: data_dir.join(FILE_NAME),
                    source: e,
                })
            })?;
            // A view torn by a commit can make redb's repair panic on the overlay: that view
            // is dropped (nothing of it is shared) and taken again.
            let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let ins = Inspector::open(data_dir)?;
                Ok::<_, OpenError>((ins.state, read(&ins)))
            }));
            let Ok(opened) = attempt else { continue };
            let (state, out) = match opened {
                Ok(o) => o,
                // A torn view of a running gateway's file may also fail to repair cleanly.
                Err(_) if Inspector::in_use(data_dir) => continue,
                Err(e) => return Err(InspectError::Open(e)),
            };
            if state != FileState::InUse {
                return Ok((out.map_err(InspectError::Read)?, state));
            }
            if header().ok() == Some(before)
                && let Ok(out) = out
            {
                return Ok((out, FileState::InUse));
            }
        }
        Err(InspectError::Busy {
            attempts: Self::ATTEMPTS,
        })
    }

    #[allow(clippy::type_complexity)]
    fn meta(&self) -> Result<(Meta, u64, BTreeMap<String, u64>, Option<u64>), ReadError> {
        let txn = self.db.begin_read().map_err(sf)?;
        let meta_t = txn.open_table(META).map_err(sf)?;
        let meta = Meta::read(&meta_t).map_err(sf)?;
        let version = meta_t
            .get("format_version")
            .map_err(sf)?
            .map_or(0, |g| g.value());
        let cursors_t = txn.open_table(CURSORS).map_err(sf)?;
        let mut cursors = BTreeMap::new();
        for e in cursors_t.iter().map_err(sf)? {
            let (k, v) = e.map_err(sf)?;
            cursors.insert(k.value().to_string(), v.value());
        }
        let index = store::IndexView::open(&txn).map_err(sf)?;
        let oldest = index.first().map_err(sf)?.map(|(_, m)| m.oldest_ms);
        Ok((meta, version, cursors, oldest))
    }

    /// The stored counters and cursors.
    pub fn stats(&self) -> Result<StoredStats, ReadError> {
        let (m, format_version, cursors, oldest) = self.meta()?;
        Ok(StoredStats {
            format_version,
            readings: m.readings,
            segments: m.segments,
            stored_bytes: m.stored_bytes,
            dead_letters: m.dead_count,
            dead_letter_bytes: m.dead_bytes,
            next_reading_id: m.next_reading_id,
            newest_segment: m.next_segment_id - 1,
            cursors,
            oldest_received_ms: oldest,
            file_bytes: std::fs::metadata(self.path.join(FILE_NAME)).map_or(0, |m| m.len()),
            quarantined: store::quarantined_files(&Location::File {
                data_dir: self.path.clone(),
            }),
        })
    }

    /// Lag of one consumer, by its stored cursor.
    pub fn lag(&self, consumer: &str) -> Result<Lag, ReadError> {
        let (_, _, cursors, _) = self.meta()?;
        let after = *cursors
            .get(consumer)
            .ok_or_else(|| ReadError::UnknownConsumer(consumer.to_string()))?;
        Ok(lag_after(&self.db, after)?.0)
    }

    /// Lists dead letters.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, ReadError> {
        list_dead(&self.db, after, limit)
    }

    /// The `gateway.id` of the gateway that last opened the file for writing, if recorded
    /// ([`BufferOptions::gateway_id`]).
    pub fn gateway_id(&self) -> Result<Option<String>, ReadError> {
        let txn = self.db.begin_read().map_err(sf)?;
        match txn.open_table(store::ABOUT) {
            Ok(t) => Ok(t
                .get("gateway_id")
                .map_err(sf)?
                .map(|g| g.value().to_string())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
            Err(e) => Err(ReadError::Storage(sf(e))),
        }
    }

    /// Hands every reading still in the buffer to `each`, in id order of their segments,
    /// acking nothing: what `ferry buffer export` writes. A reading received before the clock
    /// was synchronized gets its corrected time, as an uplink would send it ([`clock`]). A
    /// segment that fails its checksum or does not decode is skipped and listed in the report
    /// with the readings the index says it held; the others are all read. `each` may stop
    /// early with [`std::ops::ControlFlow::Break`].
    pub fn export(
        &self,
        mut each: impl FnMut(&Reading) -> std::ops::ControlFlow<()>,
    ) -> Result<ExportReport, ReadError> {
        let txn = self.db.begin_read().map_err(sf)?;
        let sync = match txn.open_table(store::BOOTS) {
            Ok(t) => clock::read_boots(&t).map_err(sf)?.0,
            Err(redb::TableError::TableDoesNotExist(_)) => BTreeMap::new(),
            Err(e) => return Err(ReadError::Storage(sf(e))),
        };
        let index = store::IndexView::open(&txn).map_err(sf)?;
        let segs = txn.open_table(SEGMENTS).map_err(sf)?;
        let mut rep = ExportReport::default();
        for e in segs.iter().map_err(sf)? {
            let (k, v) = e.map_err(sf)?;
            let id = k.value();
            rep.segments += 1;
            match segment::decode_segment(v.value()) {
                Ok(readings) => {
                    for mut r in readings {
                        rep.readings += 1;
                        clock::correct_with(&sync, &mut r);
                        if each(&r).is_break() {
                            return Ok(rep);
                        }
                    }
                }
                Err(err) => {
                    let held = index.get(id).map_err(sf)?.map_or(0, |m| m.count as u64);
                    rep.damaged.push(DamagedSegment {
                        segment: id,
                        readings: held,
                        why: err.to_string(),
                    });
                }
            }
        }
        Ok(rep)
    }

    /// Decodes every segment and dead letter, checks CRCs, the index and the counters.
    /// Streams segment by segment; memory stays bounded by one segment.
    pub fn verify(&self) -> Result<VerifyReport, ReadError> {
        let (meta, _, _, _) = self.meta()?;
        let txn = self.db.begin_read().map_err(sf)?;
        let segs = txn.open_table(SEGMENTS).map_err(sf)?;
        let index = store::IndexView::open(&txn).map_err(sf)?;
        let mut rep = VerifyReport::default();
        let mut bytes = 0u64;
        let mut last_seen_id = 0u64;
        for e in segs.iter().map_err(sf)? {
            let (k, v) = e.map_err(sf)?;
            let id = k.value();
            rep.segments += 1;
            bytes += v.value().len() as u64;
            let idx = index.get(id).map_err(sf)?;
            match segment::decode_segment(v.value()) {
                Ok(readings) => {
                    rep.readings += readings.len() as u64;
                    match idx {
                        None => rep
                            .problems
                            .push(format!("segment {id}: missing from the index")),
                        Some(m)
                            if m.count as usize != readings.len()
                                || m.stored_bytes != v.value().len() as u64 =>
                        {
                            rep.problems
                                .push(format!("segment {id}: index disagrees with the segment"))
                        }
                        _ => {}
                    }
                    for r in &readings {
                        if r.id >= meta.next_reading_id {
                            rep.problems.push(format!(
                                "segment {id}: reading id {} is not below next_reading_id {}",
                                r.id, meta.next_reading_id
                            ));
                        }
                    }
                    if let Some(first) = readings.first() {
                        if first.id <= last_seen_id
                            && readings.iter().all(|r| r.source != Source::Requeue)
                        {
                            rep.problems.push(format!(
                                "segment {id}: reading ids do not grow ({} after {last_seen_id})",
                                first.id
                            ));
                        }
                        last_seen_id =
                            last_seen_id.max(readings.iter().map(|r| r.id).max().unwrap_or(0));
                    }
                }
                Err(e) => rep.problems.push(format!("segment {id}: {e}")),
            }
            if id >= meta.next_segment_id {
                rep.problems
                    .push(format!("segment {id}: id is not below next_segment_id"));
            }
        }
        if index.len().map_err(sf)? != rep.segments {
            rep.problems.push(format!(
                "index has {} rows for {} segments",
                index.len().map_err(sf)?,
                rep.segments
            ));
        }
        if rep.segments != meta.segments
            || rep.readings != meta.readings
            || bytes != meta.stored_bytes
        {
            rep.problems.push(format!(
                "counters say {} segments / {} readings / {} bytes, the file holds {} / {} / {}",
                meta.segments, meta.readings, meta.stored_bytes, rep.segments, rep.readings, bytes
            ));
        }
        let dead = txn.open_table(DEAD).map_err(sf)?;
        let (mut dn, mut db_) = (0u64, 0u64);
        for e in dead.iter().map_err(sf)? {
            let (k, v) = e.map_err(sf)?;
            dn += 1;
            db_ += v.value().len() as u64;
            if let Err(e) = dead_letter::decode(v.value()) {
                rep.problems.push(format!("dead letter {}: {e}", k.value()));
            }
        }
        if dn != meta.dead_count || db_ != meta.dead_bytes {
            rep.problems.push(format!(
                "dead-letter counters say {} / {} bytes, the table holds {dn} / {db_}",
                meta.dead_count, meta.dead_bytes
            ));
        }
        Ok(rep)
    }
}
