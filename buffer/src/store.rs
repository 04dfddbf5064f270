//! Opening the redb file: tables, format version, quarantine of corrupt files, reopen.

use crate::error::{OpenError, StorageFailure, StorageFailureKind};
use crate::reading::now_ms;
use redb::{
    ConcurrencyMode, Database, DatabaseError, ReadableDatabase, ReadableTable, StorageBackend,
    TableDefinition,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The buffer's own format version, stored in the `meta` table. Format 2 added the clock:
/// `FRY2` records, the `boots` table and the clock columns of `segment_index`. A format-1 file
/// is read as is, and becomes format 2 when a writer opens it ([`upgrade_from_v1`]; its
/// segments stay `FRY1`, see [`crate::segment`]).
pub const FORMAT_VERSION: u64 = 2;
/// File name of the buffer inside `data_dir`.
pub const FILE_NAME: &str = "buffer.redb";
/// Folder inside `data_dir` that corrupt files are moved to.
pub const QUARANTINE_DIR: &str = "quarantine";

/// Counters and next ids, one u64 per key.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Segment id -> encoded segment (see [`crate::segment`]).
pub(crate) const SEGMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("segments");
/// Segment id -> (first reading id, reading count, stored bytes, oldest ms, newest ms, boot,
/// oldest boot clock, newest boot clock); see [`SegMeta`].
pub(crate) const INDEX: TableDefinition<u64, IndexRow> = TableDefinition::new("segment_index");
/// The index as format 1 wrote it (no clock), read from files not yet upgraded.
const INDEX_V1: TableDefinition<u64, IndexRowV1> = TableDefinition::new("segment_index");
/// Where [`init_tables`] copies the format-1 index while upgrading it.
const INDEX_UPGRADE: TableDefinition<u64, IndexRow> = TableDefinition::new("segment_index_upgrade");
/// Consumer name -> id of the last segment it acked.
pub(crate) const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
/// Reading id -> encoded dead letter.
pub(crate) const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Boot index -> `u64 sync boot clock | u64 sync wall (0: none) | boot id` ([`crate::clock`]).
pub(crate) const BOOTS: TableDefinition<u32, &[u8]> = TableDefinition::new("boots");
/// Facts about the file: `gateway_id` (the `gateway.id` of the gateway that last opened it
/// for writing, so that an export names its readings as that gateway sends them).
pub(crate) const ABOUT: TableDefinition<&str, &str> = TableDefinition::new("about");
/// Key -> value: state other components keep durable beside the readings, written in the same
/// transaction as the append it belongs to ([`crate::StateWrite`]); the MQTT broker keeps its
/// retained messages here.
pub(crate) const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

pub(crate) type IndexRow = (u64, u32, u64, u64, u64, u32, u64, u64);
type IndexRowV1 = (u64, u32, u64, u64, u64);

/// A segment's clock: (boot index, oldest boot clock, newest boot clock) of its readings
/// received in that boot ([`crate::clock`]).
pub(crate) type SegClock = (u32, u64, u64);

/// One row of the segment index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegMeta {
    pub first_id: u64,
    pub count: u32,
    pub stored_bytes: u64,
    pub oldest_ms: u64,
    pub newest_ms: u64,
    /// `None` for a segment written by format 1, or holding only readings requeued from an
    /// earlier boot.
    pub clock: Option<SegClock>,
}

impl SegMeta {
    pub(crate) fn from_tuple(t: IndexRow) -> Self {
        SegMeta {
            first_id: t.0,
            count: t.1,
            stored_bytes: t.2,
            oldest_ms: t.3,
            newest_ms: t.4,
            clock: (t.5 != 0).then_some((t.5, t.6, t.7)),
        }
    }
    fn from_v1(t: IndexRowV1) -> Self {
        SegMeta::from_tuple((t.0, t.1, t.2, t.3, t.4, 0, 0, 0))
    }
    pub(crate) fn tuple(&self) -> IndexRow {
        let (boot, oldest, newest) = self.clock.unwrap_or_default();
        (
            self.first_id,
            self.count,
            self.stored_bytes,
            self.oldest_ms,
            self.newest_ms,
            boot,
            oldest,
            newest,
        )
    }
}

/// The segment index for reading, in either format: a format-1 file inspected without a
/// writer (which would upgrade it) still has the old row type.
pub(crate) enum IndexView {
    V2(redb::ReadOnlyTable<u64, IndexRow>),
    V1(redb::ReadOnlyTable<u64, IndexRowV1>),
}

impl IndexView {
    pub(crate) fn open(txn: &redb::ReadTransaction) -> Result<Self, redb::Error> {
        match txn.open_table(INDEX) {
            Ok(t) => Ok(IndexView::V2(t)),
            Err(redb::TableError::TableTypeMismatch { .. }) => {
                Ok(IndexView::V1(txn.open_table(INDEX_V1)?))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn get(&self, id: u64) -> Result<Option<SegMeta>, redb::Error> {
        Ok(match self {
            IndexView::V2(t) => t.get(id)?.map(|g| SegMeta::from_tuple(g.value())),
            IndexView::V1(t) => t.get(id)?.map(|g| SegMeta::from_v1(g.value())),
        })
    }

    pub(crate) fn first(&self) -> Result<Option<(u64, SegMeta)>, redb::Error> {
        Ok(match self {
            IndexView::V2(t) => t
                .first()?
                .map(|(k, v)| (k.value(), SegMeta::from_tuple(v.value()))),
            IndexView::V1(t) => t
                .first()?
                .map(|(k, v)| (k.value(), SegMeta::from_v1(v.value()))),
        })
    }

    pub(crate) fn len(&self) -> Result<u64, redb::Error> {
        use redb::ReadableTableMetadata;
        Ok(match self {
            IndexView::V2(t) => t.len()?,
            IndexView::V1(t) => t.len()?,
        })
    }

    /// Calls `f` with every row from segment id `from` on, in id order.
    pub(crate) fn for_each_from(
        &self,
        from: u64,
        mut f: impl FnMut(u64, SegMeta),
    ) -> Result<(), redb::Error> {
        match self {
            IndexView::V2(t) => {
                for e in t.range(from..)? {
                    let (k, v) = e?;
                    f(k.value(), SegMeta::from_tuple(v.value()));
                }
            }
            IndexView::V1(t) => {
                for e in t.range(from..)? {
                    let (k, v) = e?;
                    f(k.value(), SegMeta::from_v1(v.value()));
                }
            }
        }
        Ok(())
    }
}

/// Upgrades a format-1 file in `txn`: the index gets the clock columns (copied row by row, so
/// memory does not grow with the backlog). Its segments stay `FRY1` and are read as such.
fn upgrade_from_v1(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    {
        let old = txn.open_table(INDEX_V1)?;
        let mut new = txn.open_table(INDEX_UPGRADE)?;
        for e in old.iter()? {
            let (k, v) = e?;
            new.insert(k.value(), SegMeta::from_v1(v.value()).tuple())?;
        }
    }
    txn.delete_table(INDEX_V1)?;
    txn.rename_table(INDEX_UPGRADE, INDEX)?;
    Ok(())
}

/// Running totals kept in the `meta` table and updated in every commit, so that opening is
/// O(1) whatever the backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    pub next_reading_id: u64,
    pub next_segment_id: u64,
    pub readings: u64,
    pub segments: u64,
    pub stored_bytes: u64,
    pub dead_count: u64,
    pub dead_bytes: u64,
}

const META_KEYS: [&str; 7] = [
    "next_reading_id",
    "next_segment_id",
    "readings",
    "segments",
    "stored_bytes",
    "dead_count",
    "dead_bytes",
];

impl Meta {
    fn fields(&self) -> [u64; 7] {
        [
            self.next_reading_id,
            self.next_segment_id,
            self.readings,
            self.segments,
            self.stored_bytes,
            self.dead_count,
            self.dead_bytes,
        ]
    }

    pub(crate) fn read(table: &impl ReadableTable<&'static str, u64>) -> Result<Self, redb::Error> {
        let mut v = [0u64; 7];
        for (slot, key) in v.iter_mut().zip(META_KEYS) {
            *slot = table.get(key)?.map(|g| g.value()).unwrap_or(0);
        }
        Ok(Meta {
            next_reading_id: v[0].max(1),
            next_segment_id: v[1].max(1),
            readings: v[2],
            segments: v[3],
            stored_bytes: v[4],
            dead_count: v[5],
            dead_bytes: v[6],
        })
    }

    pub(crate) fn write(
        &self,
        table: &mut redb::Table<&'static str, u64>,
    ) -> Result<(), redb::Error> {
        for (key, value) in META_KEYS.iter().zip(self.fields()) {
            table.insert(*key, value)?;
        }
        Ok(())
    }

    /// Bytes counted against `max_bytes`.
    pub(crate) fn used_bytes(&self) -> u64 {
        self.stored_bytes + self.dead_bytes
    }
}

/// Builds a fresh storage backend; used by tests to inject faults, and to reopen after errors.
pub type BackendFactory =
    Arc<dyn Fn() -> std::io::Result<Box<dyn StorageBackend>> + Send + Sync + 'static>;

/// Where the buffer lives.
#[derive(Clone)]
pub(crate) enum Location {
    File { data_dir: PathBuf },
    Backend(BackendFactory),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File { data_dir } => write!(f, "{}", data_dir.join(FILE_NAME).display()),
            Location::Backend(_) => f.write_str("<custom storage backend>"),
        }
    }
}

impl Location {
    pub(crate) fn path(&self) -> PathBuf {
        match self {
            Location::File { data_dir } => data_dir.join(FILE_NAME),
            Location::Backend(_) => PathBuf::from("<custom storage backend>"),
        }
    }
}

#[derive(Debug)]
struct DynBackend(Box<dyn StorageBackend>);

impl StorageBackend for DynBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }
}

/// What went wrong on an attempt to open.
enum Attempt {
    Corrupt(String),
    Fatal(OpenError),
}

fn builder(cache_bytes: usize) -> redb::Builder {
    let mut b = Database::builder();
    b.set_cache_size(cache_bytes);
    // ExclusiveWriter (one process holds the file) allows redb's 1-phase commit: one fsync per
    // group commit instead of two. Measured (BENCHMARKS.md): commit p50 2.1 ms against 6.1 ms
    // with SingleWriter, which would let `ferry buffer stats` read a running gateway's file.
    b.set_concurrency_mode(ConcurrencyMode::ExclusiveWriter);
    b
}

/// Creates `dir` (and parents) with mode 0700 on Unix.
pub(crate) fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

fn try_open(loc: &Location, cache_bytes: usize) -> Result<Database, Attempt> {
    let path = loc.path();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match loc {
        Location::File { .. } => builder(cache_bytes).create(&path),
        Location::Backend(factory) => match factory() {
            Ok(b) => builder(cache_bytes).create_with_backend(DynBackend(b)),
            Err(e) => Err(DatabaseError::Storage(redb::StorageError::Io(e))),
        },
    }));
    let db = match result {
        Err(_) => {
            return Err(Attempt::Corrupt(
                "redb panicked while opening the file".into(),
            ));
        }
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(classify_open_error(e, &path)),
    };
    // Check (or write) our format version and create every table, in one transaction.
    let check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| init_tables(&db, &path)));
    match check {
        Err(_) => Err(Attempt::Corrupt(
            "redb panicked while reading the tables".into(),
        )),
        Ok(Err(a)) => Err(a),
        Ok(Ok(())) => Ok(db),
    }
}

fn classify_open_error(e: DatabaseError, path: &Path) -> Attempt {
    use std::io::ErrorKind;
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            Attempt::Fatal(OpenError::InUse {
                path: path.to_path_buf(),
            })
        }
        DatabaseError::RepairAborted => Attempt::Corrupt("redb's repair was aborted".into()),
        DatabaseError::Storage(redb::StorageError::Corrupted(m)) => Attempt::Corrupt(m),
        DatabaseError::Storage(redb::StorageError::Io(io))
            if matches!(io.kind(), ErrorKind::InvalidData | ErrorKind::UnexpectedEof) =>
        {
            Attempt::Corrupt(io.to_string())
        }
        DatabaseError::Storage(redb::StorageError::Io(io)) => Attempt::Fatal(OpenError::Storage {
            path: path.to_path_buf(),
            source: StorageFailure::io(&io),
        }),
        other => Attempt::Fatal(OpenError::Storage {
            path: path.to_path_buf(),
            source: StorageFailure::from_redb(other),
        }),
    }
}

fn init_tables(db: &Database, path: &Path) -> Result<(), Attempt> {
    let corrupt_or_fatal = |e: redb::Error| match &e {
        redb::Error::Corrupted(m) => Attempt::Corrupt(m.clone()),
        redb::Error::TableTypeMismatch { .. } | redb::Error::TableIsMultimap(_) => {
            Attempt::Corrupt(format!("unexpected table layout: {e}"))
        }
        _ => Attempt::Fatal(OpenError::Storage {
            path: path.to_path_buf(),
            source: StorageFailure::from_redb(e),
        }),
    };
    let txn = db.begin_write().map_err(|e| corrupt_or_fatal(e.into()))?;
    let mut upgrade = false;
    {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| corrupt_or_fatal(e.into()))?;
        let version = meta
            .get("format_version")
            .map_err(|e| corrupt_or_fatal(e.into()))?
            .map(|g| g.value());
        match version {
            None => {
                let mut seeds = vec![("format_version", FORMAT_VERSION), ("created_ms", now_ms())];
                seeds.extend(META_KEYS.iter().map(|k| (*k, 0)));
                for (k, v) in seeds {
                    meta.insert(k, v).map_err(|e| corrupt_or_fatal(e.into()))?;
                }
            }
            Some(v) if v > FORMAT_VERSION => {
                return Err(Attempt::Fatal(OpenError::UnsupportedFormat {
                    path: path.to_path_buf(),
                    found: v,
                    supported: FORMAT_VERSION,
                }));
            }
            Some(1) => {
                upgrade = true;
                meta.insert("format_version", FORMAT_VERSION)
                    .map_err(|e| corrupt_or_fatal(e.into()))?;
            }
            Some(_) => {}
        }
        drop(meta);
        if upgrade {
            upgrade_from_v1(&txn).map_err(corrupt_or_fatal)?;
        }
        txn.open_table(SEGMENTS)
            .map_err(|e| corrupt_or_fatal(e.into()))?;
        txn.open_table(BOOTS)
            .map_err(|e| corrupt_or_fatal(e.into()))?;
        txn.open_table(ABOUT)
            .map_err(|e| corrupt_or_fatal(e.into()))?;
        txn.open_table(INDEX)
            .map_err(|e| corrupt_or_fatal(e.into()))?;
        txn.open_table(CURSORS)
            .map_err(|e| corrupt_or_fatal(e.into()))?;
        txn.open_table(DEAD)
            .map_err(|e| corrupt_or_fatal(e.into()))?;
    }
    txn.commit().map_err(|e| corrupt_or_fatal(e.into()))
}

/// Opens the database, quarantining a corrupt file once. Returns the database and the path the
/// corrupt file was moved to, if any.
pub(crate) fn open(
    loc: &Location,
    cache_bytes: usize,
) -> Result<(Database, Option<PathBuf>), OpenError> {
    if let Location::File { data_dir } = loc {
        create_private_dir(data_dir).map_err(|source| OpenError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    }
    match try_open(loc, cache_bytes) {
        Ok(db) => Ok((db, None)),
        Err(Attempt::Fatal(e)) => Err(e),
        Err(Attempt::Corrupt(reason)) => {
            let Location::File { data_dir } = loc else {
                return Err(OpenError::Storage {
                    path: loc.path(),
                    source: StorageFailure {
                        kind: StorageFailureKind::Corrupted,
                        message: reason,
                    },
                });
            };
            let moved = quarantine(data_dir, &reason)?;
            match try_open(loc, cache_bytes) {
                Ok(db) => Ok((db, Some(moved))),
                Err(Attempt::Fatal(e)) => Err(e),
                Err(Attempt::Corrupt(reason)) => Err(OpenError::Storage {
                    path: loc.path(),
                    source: StorageFailure {
                        kind: StorageFailureKind::Corrupted,
                        message: format!("a fresh buffer is corrupt too: {reason}"),
                    },
                }),
            }
        }
    }
}

fn quarantine(data_dir: &Path, reason: &str) -> Result<PathBuf, OpenError> {
    let from = data_dir.join(FILE_NAME);
    let qdir = data_dir.join(QUARANTINE_DIR);
    let to = qdir.join(format!("buffer-{}.redb", now_ms()));
    let err = |source| OpenError::Quarantine {
        path: from.clone(),
        reason: reason.to_string(),
        source,
    };
    create_private_dir(&qdir).map_err(err)?;
    std::fs::rename(&from, &to).map_err(err)?;
    tracing::error!(
        file = %from.display(),
        moved_to = %to.display(),
        reason,
        "The buffer file is corrupt. It was moved aside and ferry starts with an empty buffer; \
         readings in the old file were not forwarded. `ferry buffer salvage` reads its intact \
         segments for `ferry buffer import`."
    );
    metrics::counter!("ferry_buffer_quarantined_total").increment(1);
    Ok(to)
}

/// Files previously moved to `data_dir/quarantine`, oldest first.
pub(crate) fn quarantined_files(loc: &Location) -> Vec<PathBuf> {
    let Location::File { data_dir } = loc else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir.join(QUARANTINE_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// Opens the buffer file read-only, for inspection of a stopped gateway's buffer. A running
/// gateway holds the file exclusively: this then fails with [`OpenError::InUse`].
pub(crate) fn open_read_only(
    data_dir: &Path,
    cache_bytes: usize,
) -> Result<redb::ReadOnlyDatabase, OpenError> {
    let path = data_dir.join(FILE_NAME);
    if !path.exists() {
        return Err(OpenError::DataDir {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no buffer file here"),
        });
    }
    builder(cache_bytes)
        .open_read_only(&path)
        .map_err(|e| inspect_error(e, &path))
}

/// An open error of an inspection: a file redb cannot take as it is (not closed cleanly, or
/// damaged) is a `Corrupted` storage failure; nothing is quarantined.
fn inspect_error(e: DatabaseError, path: &Path) -> OpenError {
    match classify_open_error(e, path) {
        Attempt::Fatal(e) => e,
        Attempt::Corrupt(m) => OpenError::Storage {
            path: path.to_path_buf(),
            source: StorageFailure {
                kind: StorageFailureKind::Corrupted,
                message: m,
            },
        },
    }
}

/// Any handle we can begin a read transaction on.
pub(crate) trait Readable {
    fn begin(&self) -> Result<redb::ReadTransaction, redb::Error>;
}

impl Readable for Database {
    fn begin(&self) -> Result<redb::ReadTransaction, redb::Error> {
        Ok(self.begin_read()?)
    }
}

impl Readable for redb::ReadOnlyDatabase {
    fn begin(&self) -> Result<redb::ReadTransaction, redb::Error> {
        Ok(self.begin_read()?)
    }
}

/// A buffer file as redb may repair it without changing it: reads come from the file, writes
/// stay in memory, in blocks of [`Overlay::BLOCK`] bytes copied on first write. It takes no
/// lock, so it also opens the file of a running gateway (see [`crate::Inspector`] for how a
/// consistent view is made sure of).
#[derive(Debug)]
pub(crate) struct Overlay {
    file: std::fs::File,
    /// The file's length when opened: what lies beyond is zeros unless written.
    file_len: u64,
    len: std::sync::Mutex<u64>,
    blocks: std::sync::Mutex<std::collections::HashMap<u64, Box<[u8]>>>,
}

impl Overlay {
    const BLOCK: u64 = 4096;

    pub(crate) fn new(path: &Path) -> std::io::Result<Overlay> {
        let file = std::fs::File::open(path)?;
        let file_len = file.metadata()?.len();
        Ok(Overlay {
            file,
            file_len,
            len: std::sync::Mutex::new(file_len),
            blocks: std::sync::Mutex::default(),
        })
    }

    /// Block `b` as the file has it (zeros past its end).
    fn base_block(&self, b: u64) -> std::io::Result<Box<[u8]>> {
        use std::os::unix::fs::FileExt as _;
        let mut out = vec![0u8; Self::BLOCK as usize].into_boxed_slice();
        let start = b * Self::BLOCK;
        if start < self.file_len {
            let n = (self.file_len - start).min(Self::BLOCK) as usize;
            self.file.read_exact_at(&mut out[..n], start)?;
        }
        Ok(out)
    }
}

impl redb::StorageBackend for Overlay {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(*self.len.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        if offset + out.len() as u64 > self.len()? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end",
            ));
        }
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = 0usize;
        while done < out.len() {
            let pos = offset + done as u64;
            let (b, within) = (pos / Self::BLOCK, (pos % Self::BLOCK) as usize);
            let n = (Self::BLOCK as usize - within).min(out.len() - done);
            match blocks.get(&b) {
                Some(block) => out[done..done + n].copy_from_slice(&block[within..within + n]),
                None => {
                    let block = self.base_block(b)?;
                    out[done..done + n].copy_from_slice(&block[within..within + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut cur = self.len.lock().unwrap_or_else(|p| p.into_inner());
        if len < *cur {
            // Forget what lies past the new end, so growing again reads zeros.
            let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
            let first = len / Self::BLOCK;
            blocks.retain(|b, _| *b < first);
            if !len.is_multiple_of(Self::BLOCK) {
                let mut block = match blocks.remove(&first) {
                    Some(b) => b,
                    None => self.base_block(first)?,
                };
                block[(len % Self::BLOCK) as usize..].fill(0);
                blocks.insert(first, block);
            }
            for b in first + 1..=self.file_len / Self::BLOCK {
                blocks.insert(b, vec![0u8; Self::BLOCK as usize].into_boxed_slice());
            }
        }
        *cur = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let (b, within) = (pos / Self::BLOCK, (pos % Self::BLOCK) as usize);
            let n = (Self::BLOCK as usize - within).min(data.len() - done);
            let block = match blocks.entry(b) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(self.base_block(b)?),
            };
            block[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }
}

/// Opens the buffer file through an [`Overlay`]: redb repairs it in memory if it was not
/// closed cleanly, and the file itself is never written.
pub(crate) fn open_overlay(data_dir: &Path, cache_bytes: usize) -> Result<Database, OpenError> {
    let path = data_dir.join(FILE_NAME);
    let overlay = Overlay::new(&path).map_err(|e| OpenError::DataDir {
        path: path.clone(),
        source: e,
    })?;
    builder(cache_bytes)
        .create_with_backend(overlay)
        .map_err(|e| inspect_error(e, &path))
}

/// The first bytes of the buffer file, which hold redb's header: they change with every
/// commit.
pub(crate) fn file_header(data_dir: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::with_capacity(8192);
    std::fs::File::open(data_dir.join(FILE_NAME))?
        .take(8192)
        .read_to_end(&mut out)?;
    Ok(out)
}
