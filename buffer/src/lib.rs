//! # ferry-buffer: the crash-safe reading buffer
//!
//! Every reading ferry acknowledges lives here until every enabled uplink has confirmed it.
//! The buffer is one redb file, `data_dir/buffer.redb`, written by one thread.
//!
//! ## Invariants
//! These must always hold; the tests in this crate and in `tests/` check them.
//!
//! 1. **Sequence numbers only grow.** Segment ids and newly assigned reading ids are taken
//!    from counters stored in the same transaction as the data, so they never repeat, even
//!    across crashes. (A requeued dead letter keeps its original reading id, so that upstream
//!    consumers can de-duplicate by `ferry-id`.)
//! 2. **A reading is acknowledged only after its commit.** [`Buffer::append`] (and the future
//!    of [`Buffer::submit`]) resolves only after the redb transaction that holds the readings
//!    has returned from `commit()` with [`redb::Durability::Immediate`], i.e. after fsync.
//! 3. **A reading is deleted only after its upstream ack** — by every enabled consumer
//!    ([`BufferOptions::consumers`]) — or by an explicit, counted drop: the byte cap in
//!    `drop_oldest` mode, or the TTL. Both are reported in [`BufferStats`] and in
//!    `ferry_readings_dropped_total{reason}`, and so is the disk reserve ([`disk_reserve`]),
//!    which limits the buffer like the cap when the disk is smaller. The count is exact:
//!    `drop_oldest` evicts the oldest segments that no reader has handed to an uplink first, and segments in flight
//!    (between a consumer's cursor and its reader's lease) only when nothing else makes room,
//!    so a reading counted as dropped is not also delivered.
//! 4. **The byte cap is enforced before the commit.** A commit never takes the buffer above
//!    `max_bytes` (or the room [`disk_reserve`] leaves): it evicts first (`drop_oldest`) or
//!    refuses the appends that do not fit (`reject`), handing the readings back in [`AppendError::Full`].
//! 5. **A failed commit stores nothing and loses nothing acknowledged.** Every waiter of a
//!    failed commit gets [`AppendError::Storage`] with its readings back.
//!
//! ## Group commit
//! The writer thread takes the first request, then keeps gathering requests while they keep
//! coming less than `flush_interval` apart (a tenth of `max_flush_delay` while a steady
//! stream arrives during commits, as long as that longer gap keeps bridging pauses the short
//! one would have cut at), for at most `max_flush_delay`, until the batch holds
//! `flush_target_bytes`, or until `max_batch_readings` / `max_batch_bytes` are reached. The
//! batch's readings are numbered, encoded into one or more segments (gzip-compressed, see
//! [`segment`]), and written with any pending acks, dead letters and evictions in **one** redb
//! write transaction. Then every waiter is woken. Many concurrent appenders share one fsync.
//! An append is atomic: all its readings are in one transaction.
//!
//! ## Readings awaiting their commit
//! From [`Buffer::submit`] until its answer (or until its future is dropped), a submit's
//! readings are counted in [`Buffer::pending_bytes`], by [`Reading::memory_len`]. The buffer
//! never refuses a submit for it: [`BufferOptions::max_pending_bytes`] is a signal to callers
//! that can push back ([`Buffer::pending_over`], [`Buffer::room_since`]), so that a stalled
//! disk does not turn into unbounded memory.
//!
//! ## Tables (redb)
//! | table           | key                  | value                                                        |
//! |-----------------|----------------------|--------------------------------------------------------------|
//! | `meta`          | `&str`               | `u64`: `format_version`, `created_ms`, `next_reading_id`, `next_segment_id`, `readings`, `segments`, `stored_bytes`, `dead_count`, `dead_bytes` |
//! | `segments`      | `u64` segment id     | encoded segment ([`segment`])                                |
//! | `segment_index` | `u64` segment id     | `(first_id u64, count u32, stored_bytes u64, oldest_ms u64, newest_ms u64, boot u32, oldest boottime u64, newest boottime u64)`; boot 0 for format-1 segments ([`clock`]) |
//! | `cursors`       | `&str` consumer name | `u64`: last segment id the consumer acked                    |
//! | `dead_letters`  | `u64` reading id     | a dead letter ([`dead_letter`]): when, which uplink, why, the reading |
//! | `boots`         | `u32` boot index     | `sync boottime u64, sync wall u64 (0: none), boot id` ([`clock`]) |
//! | `about`         | `&str`               | `&str`: `gateway_id` ([`BufferOptions::gateway_id`])           |
//! | `state`         | `&str` key           | bytes another component keeps durable with an append ([`StateWrite`]), e.g. the MQTT broker's retained messages |
//!
//! The counters in `meta` are updated in every transaction, so opening reads O(1) rows
//! whatever the backlog. `max_bytes` counts the stored segment values plus dead letters; the
//! file itself is larger by redb's page overhead (see BENCHMARKS.md for the measured ratio).
//!
//! ## Recovery
//! - After a crash, redb restores the last committed transaction, walking the file to rebuild
//!   its allocator state; memory stays bounded by the page cache (`cache_bytes`) whatever the
//!   backlog, and time grows with the file (BENCHMARKS.md, "Recovery"). With [`BufferOptions::quick_repair`] the walk is skipped at the cost of
//!   a second fsync per commit. Our counters come from that same last transaction.
//! - A file redb cannot open as a database (bad magic, failed checksums, a panic inside
//!   redb, an unexpected table layout) is **moved to `data_dir/quarantine/buffer-<ms>.redb`**,
//!   logged at error level, and a fresh buffer starts. [`BufferStats::quarantined`] lists
//!   every quarantined file, so the flag survives restarts until an operator removes them.
//!   [`salvage`] reads what is intact of such a file without redb (`ferry buffer salvage`).
//! - A file with a newer `format_version` is refused ([`OpenError::UnsupportedFormat`]), not
//!   quarantined: it is not corrupt, just newer.
//! - A write error (including a full disk) fails the pending appends with
//!   [`AppendError::Storage`]; redb then refuses the handle (`PreviousIo`), so the writer drops
//!   it and reopens the file on the next request, at most every 200 ms. When space is freed,
//!   appends succeed again with no restart.
//! - A segment that fails its CRC when read is skipped, logged and counted
//!   (`ferry_buffer_corrupt_segments_total`); it cannot be forwarded.

pub mod clock;
mod dead_letter;
mod error;
mod inspect;
mod reader;
mod reading;
mod salvage;
pub mod segment;
mod store;
mod writer;

pub use clock::{
    ClockMark, ClockNow, ClockSource, ClockStamp, ClockStatus, ManualClock, SystemClock,
};
pub use dead_letter::DeadLetter;
pub use error::{
    AckError, AppendError, InspectError, OpenError, ReadError, StorageFailure, StorageFailureKind,
};
pub use inspect::*;
pub use reader::{Reader, Segment};
pub use reading::{Origin, Reading, Source, now_ms};
pub use salvage::{SalvageReport, salvage};
pub use segment::Compression;
pub use store::{BackendFactory, FILE_NAME, FORMAT_VERSION, QUARANTINE_DIR};

use redb::{ReadableDatabase, ReadableTable};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use store::{CURSORS, DEAD, Location, META, Meta, SEGMENTS};
use tokio::sync::{oneshot, watch};
use writer::Cmd;

pub(crate) fn sf(e: impl Into<redb::Error>) -> StorageFailure {
    StorageFailure::from_redb(e)
}

/// What to do when a commit would take the buffer above `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenFull {
    /// Evict whole oldest segments, counting their readings as dropped.
    DropOldest,
    /// Refuse the new readings with [`AppendError::Full`].
    Reject,
}

/// How the buffer behaves. The gateway builds this from `[buffer]` in the config.
#[derive(Debug, Clone)]
pub struct BufferOptions {
    /// Cap on stored segment bytes plus dead-letter bytes.
    pub max_bytes: u64,
    /// What happens at the cap.
    pub when_full: WhenFull,
    /// The group-commit gap: the writer keeps gathering while requests arrive less than this
    /// apart, and commits once none has come for this long. Zero commits what is queued.
    pub flush_interval: Duration,
    /// The longest the first request of a commit waits for others while they keep arriving
    /// (never less than `flush_interval`). Bounds the ack latency that gathering adds. While
    /// requests keep arriving during commits (a steady stream), the gap is a tenth of this
    /// (at least `flush_interval`), so that scheduling pauses do not split commits.
    pub max_flush_delay: Duration,
    /// A commit closes as soon as it holds this many raw bytes. Each durable commit writes a
    /// fixed ~40 KB of redb pages (ten 4 KiB pages) besides its data, so a commit of at least this much keeps
    /// the bytes written near or below the bytes received (BENCHMARKS.md, write amplification).
    pub flush_target_bytes: u64,
    /// A commit closes once it holds this many readings.
    pub max_batch_readings: usize,
    /// A commit closes once it holds this many raw bytes; also the segment size limit.
    pub max_batch_bytes: u64,
    /// Segment compression.
    pub compression: Compression,
    /// Readings older than this are dropped (counted as `ttl`). `None` keeps them.
    pub max_age: Option<Duration>,
    /// redb page cache size.
    pub cache_bytes: usize,
    /// The enabled uplinks. A segment is deleted once every one of them has acked it.
    pub consumers: Vec<String>,
    /// Save redb's allocator state at each commit, so recovery after a crash does not walk
    /// the file. Costs a second fsync per commit; off by default because the walk is short
    /// (BENCHMARKS.md, "Recovery", has its time and memory) and bounded in memory by the page cache.
    pub quick_repair: bool,
    /// Soft cap on the memory held by readings awaiting their commit (the rule: the crate
    /// doc, "Readings awaiting their commit").
    pub max_pending_bytes: u64,
    /// Where the buffer reads the time: [`SystemClock`], or a [`ManualClock`] in tests.
    pub clock: Arc<dyn ClockSource>,
    /// The gateway's `gateway.id`, recorded in the file so that an export
    /// ([`Inspector::export`]) gives its readings the `ferry-id` the gateway sends them with.
    pub gateway_id: Option<String>,
    /// Disk space the buffer never writes into: see [`disk_reserve`], which owns the rule.
    pub min_free_bytes: Option<u64>,
}

/// The disk reserve: bytes of the data directory's file system that the buffer never writes
/// into, so that the OS, journald and sshd keep room on a small card. `min_free_bytes` is
/// `buffer.min_free_bytes`; `None` means the default, 5% of the file system and at most
/// 256 MiB; `Some(0)` turns the reserve off.
///
/// Each commit lets the buffer grow by half of the free space above the reserve (redb writes
/// a changed page's copy before it frees the old one), so the free space approaches the
/// reserve instead of overshooting it. At the reserve the buffer may fill again the most it
/// has held since the file was opened (the file already has those pages, so it does not grow)
/// and no more; when other files take the free space below three quarters of the reserve, it
/// may keep only what it holds then. That limit applies when it is tighter than `max_bytes`:
/// `drop_oldest` then evicts the oldest segments inside the file (counted as dropped with reason `disk_full`; their
/// pages are reused by the next commits, so the file stops growing), and `reject` refuses with
/// [`AppendError::Full`] marked `disk_reserve` (counted as rejected, `disk_full`). When
/// nothing is left to evict (the buffer is empty and other files took the space),
/// `drop_oldest` refuses too: the reserve is the system's. redb may still write a few pages
/// more than a commit stores, so the free space can dip a little below the reserve; a disk
/// that fills anyway is a storage error, as without a reserve. Only a buffer in a data
/// directory has a reserve (not a custom [`StorageBackend`]).
pub fn disk_reserve(total_bytes: u64, min_free_bytes: Option<u64>) -> u64 {
    min_free_bytes.unwrap_or((total_bytes / 20).min(256 << 20))
}

/// Free (for an unprivileged user) and total bytes of the file system holding `path`.
pub fn disk_space(path: &std::path::Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(path).ok()?;
    let frsize = if s.f_frsize > 0 {
        s.f_frsize
    } else {
        s.f_bsize
    };
    Some((
        s.f_bavail.saturating_mul(frsize),
        s.f_blocks.saturating_mul(frsize),
    ))
}

impl Default for BufferOptions {
    fn default() -> Self {
        BufferOptions {
            max_bytes: 512 << 20,
            when_full: WhenFull::DropOldest,
            flush_interval: Duration::from_millis(1),
            max_flush_delay: Duration::from_millis(100),
            flush_target_bytes: 256 << 10,
            max_batch_readings: 10_000,
            max_batch_bytes: 1 << 20,
            compression: Compression::Gzip { level: 6 },
            max_age: None,
            cache_bytes: 2 << 20,
            consumers: Vec::new(),
            quick_repair: false,
            max_pending_bytes: 1 << 20,
            clock: Arc::new(SystemClock::default()),
            gateway_id: None,
            min_free_bytes: None,
        }
    }
}

/// A change to the `state` table, committed with the append it is submitted with
/// ([`Buffer::submit_with_state`]): in the same transaction, so both or neither are durable.
/// An append refused for the byte cap writes none of its state. The state is not counted in
/// `max_bytes`; its owner bounds it. Owners keep to their own key prefix (the MQTT broker's
/// are `retained/` and `session/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateWrite {
    /// Sets a key.
    Put(String, Vec<u8>),
    /// Deletes a key, if present.
    Delete(String),
    /// Deletes every key that starts with this prefix.
    DeletePrefix(String),
}

impl StateWrite {
    /// The bytes it carries, for the batch's size.
    pub fn len(&self) -> usize {
        match self {
            StateWrite::Put(k, v) => k.len() + v.len(),
            StateWrite::Delete(k) | StateWrite::DeletePrefix(k) => k.len(),
        }
    }

    /// Whether it carries nothing (never: a key is at least empty).
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What a successful append returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    /// Id of the first reading.
    pub first_id: u64,
    /// Id of the last reading.
    pub last_id: u64,
    /// Number of readings.
    pub count: usize,
    /// Id of the newest segment of the commit.
    pub segment: u64,
}

/// A snapshot of the buffer's state and counters. Counters are since the process started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BufferStats {
    /// Readings in the buffer (not yet acked by every consumer).
    pub readings: u64,
    /// Stored (compressed) segment bytes.
    pub stored_bytes: u64,
    /// Segments in the buffer.
    pub segments: u64,
    /// The cap.
    pub max_bytes: u64,
    /// When the oldest buffered reading was received (its wall-clock time as stamped).
    pub oldest_received_ms: Option<u64>,
    /// How long the oldest buffered reading has waited, by [`clock`]'s jump-safe rules;
    /// `None` when the buffer is empty or the age cannot be known.
    pub oldest_age_ms: Option<u64>,
    /// Readings in the dead-letter table.
    pub dead_letters: u64,
    /// Bytes in the dead-letter table.
    pub dead_letter_bytes: u64,
    /// Id the next reading will get.
    pub next_reading_id: u64,
    /// Id of the newest committed segment.
    pub newest_segment: u64,
    /// Each consumer's last acked segment.
    pub cursors: BTreeMap<String, u64>,
    /// Readings appended.
    pub appended_total: u64,
    /// Readings deleted after every consumer acked them.
    pub acked_total: u64,
    /// Readings evicted by the byte cap (`drop_oldest`).
    pub dropped_full_total: u64,
    /// Readings dropped by the TTL.
    pub dropped_ttl_total: u64,
    /// Dead letters evicted to make room.
    pub dropped_dead_letter_total: u64,
    /// Readings evicted to keep the disk reserve (`drop_oldest`, `min_free_bytes`).
    pub dropped_disk_total: u64,
    /// Readings refused to keep the disk reserve (`reject`, `min_free_bytes`).
    pub rejected_disk_total: u64,
    /// When a commit last evicted or refused readings for the disk reserve ([`disk_reserve`]).
    pub disk_reserve_hit: Option<std::time::Instant>,
    /// Readings refused because the buffer was full (`reject`).
    pub rejected_full_total: u64,
    /// Readings refused because the disk failed.
    pub rejected_storage_total: u64,
    /// Segments skipped because they failed their checksum.
    pub corrupt_segments_total: u64,
    /// Successful commits.
    pub commits_total: u64,
    /// Failed commits.
    pub commit_errors_total: u64,
    /// Raw (encoded, uncompressed) bytes appended.
    pub raw_bytes_total: u64,
    /// Stored (compressed) bytes written for them.
    pub stored_bytes_total: u64,
    /// Median commit latency over the last 1024 commits, in microseconds.
    pub commit_p50_us: u64,
    /// 99th percentile commit latency over the last 1024 commits, in microseconds.
    pub commit_p99_us: u64,
    /// Mean readings per commit over the last 1024 commits.
    pub readings_per_commit: f64,
    /// Corrupt buffer files moved aside, now and in earlier runs.
    pub quarantined: Vec<PathBuf>,
    /// The last storage error, if the buffer is currently failing.
    pub last_error: Option<String>,
    /// Size of the buffer file, if it is a file.
    pub file_bytes: Option<u64>,
}

impl BufferStats {
    /// Whether the last commit succeeded.
    pub fn writable(&self) -> bool {
        self.last_error.is_none()
    }

    /// Bytes counted against the cap.
    pub fn used_bytes(&self) -> u64 {
        self.stored_bytes + self.dead_letter_bytes
    }
}

#[derive(Debug, Default)]
pub(crate) struct StatsInner {
    pub(crate) s: BufferStats,
    ring: Vec<(u32, u32)>,
    ring_pos: usize,
}

impl std::ops::Deref for StatsInner {
    type Target = BufferStats;
    fn deref(&self) -> &BufferStats {
        &self.s
    }
}
impl std::ops::DerefMut for StatsInner {
    fn deref_mut(&mut self) -> &mut BufferStats {
        &mut self.s
    }
}

impl StatsInner {
    pub(crate) fn record_commit(&mut self, took: Duration, readings: u64) {
        let entry = (
            took.as_micros().min(u32::MAX as u128) as u32,
            readings.min(u32::MAX as u64) as u32,
        );
        if self.ring.len() < 1024 {
            self.ring.push(entry);
        } else {
            self.ring[self.ring_pos] = entry;
        }
        self.ring_pos = (self.ring_pos + 1) % 1024;
    }

    fn snapshot(&self) -> BufferStats {
        let mut s = self.s.clone();
        if !self.ring.is_empty() {
            let mut lat: Vec<u32> = self.ring.iter().map(|e| e.0).collect();
            lat.sort_unstable();
            let pick = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize] as u64;
            s.commit_p50_us = pick(0.50);
            s.commit_p99_us = pick(0.99);
            s.readings_per_commit =
                self.ring.iter().map(|e| e.1 as f64).sum::<f64>() / self.ring.len() as f64;
        }
        s
    }
}

/// State shared by the handle, readers and the writer thread.
pub(crate) struct Shared {
    pub(crate) opts: BufferOptions,
    pub(crate) loc: Location,
    pub(crate) db: RwLock<Option<Arc<redb::Database>>>,
    pub(crate) committed: watch::Sender<u64>,
    pub(crate) closed: AtomicBool,
    stats: Mutex<StatsInner>,
    tx: Mutex<Option<std::sync::mpsc::Sender<Cmd>>>,
    done: Mutex<Option<oneshot::Receiver<()>>>,
    /// Per consumer, the newest segment its reader has handed out. Segments between the
    /// consumer's cursor and this are in flight upstream, so `drop_oldest` evicts them only
    /// when nothing else can make room: a reading counted as dropped is then never also
    /// delivered. Readers publish under this lock while they take their read snapshot; the
    /// writer holds it from choosing what to evict until that commit is done.
    pub(crate) leases: Mutex<BTreeMap<String, u64>>,
    /// Estimated memory of the readings submitted and not yet answered.
    pending: AtomicU64,
    /// How often `pending` fell from over the cap to the cap or below.
    room_generation: AtomicU64,
    /// Woken at each of those falls.
    pending_freed: tokio::sync::Notify,
    /// The clock and what is known of each boot.
    pub(crate) clock: clock::Clock,
}

/// Counts a submit's readings in [`Shared::pending`] until the submit is answered or dropped.
struct PendingGuard {
    shared: Arc<Shared>,
    bytes: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let before = self.shared.pending.fetch_sub(self.bytes, Ordering::SeqCst);
        let max = self.shared.opts.max_pending_bytes;
        if before > max && before - self.bytes <= max {
            self.shared.room_generation.fetch_add(1, Ordering::SeqCst);
            self.shared.pending_freed.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("loc", &self.loc)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn stats_lock(&self) -> MutexGuard<'_, StatsInner> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle to an open buffer. Cheap to clone; all clones share one writer thread.
#[derive(Debug, Clone)]
pub struct Buffer {
    shared: Arc<Shared>,
}

impl Buffer {
    /// Opens (or creates) `data_dir/buffer.redb`, quarantining it if it is corrupt, and starts
    /// the writer thread.
    pub fn open(data_dir: impl Into<PathBuf>, opts: BufferOptions) -> Result<Buffer, OpenError> {
        Self::open_at(
            Location::File {
                data_dir: data_dir.into(),
            },
            opts,
        )
    }

    /// Opens a buffer on storage made by `factory`, which is called again to reopen after an
    /// I/O error. For tests that inject faults.
    pub fn open_with_backend(
        factory: BackendFactory,
        opts: BufferOptions,
    ) -> Result<Buffer, OpenError> {
        Self::open_at(Location::Backend(factory), opts)
    }

    fn open_at(loc: Location, opts: BufferOptions) -> Result<Buffer, OpenError> {
        if opts.max_batch_readings == 0 || opts.max_batch_bytes == 0 || opts.max_bytes == 0 {
            return Err(OpenError::Options(
                "max_bytes, max_batch_readings and max_batch_bytes must be positive".into(),
            ));
        }
        let (db, quarantined) = store::open(&loc, opts.cache_bytes)?;
        let db = Arc::new(db);
        let mut stats = StatsInner {
            s: BufferStats {
                max_bytes: opts.max_bytes,
                quarantined: store::quarantined_files(&loc),
                ..BufferStats::default()
            },
            ..StatsInner::default()
        };
        if let Some(q) = quarantined
            && !stats.quarantined.contains(&q)
        {
            stats.quarantined.push(q);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            clock: clock::Clock::new(opts.clock.clone()),
            opts,
            loc: loc.clone(),
            db: RwLock::new(Some(db.clone())),
            committed: watch::channel(0).0,
            closed: AtomicBool::new(false),
            stats: Mutex::new(stats),
            tx: Mutex::new(Some(tx)),
            done: Mutex::new(Some(done_rx)),
            leases: Mutex::new(BTreeMap::new()),
            pending: AtomicU64::new(0),
            room_generation: AtomicU64::new(0),
            pending_freed: tokio::sync::Notify::new(),
        });
        let w =
            writer::Writer::new(shared.clone(), rx, db).map_err(|source| OpenError::Storage {
                path: loc.path(),
                source,
            })?;
        std::thread::Builder::new()
            .name("ferry-buffer-writer".into())
            .spawn(move || {
                w.run();
                let _ = done_tx.send(());
            })
            .map_err(|source| OpenError::DataDir {
                path: loc.path(),
                source,
            })?;
        Ok(Buffer { shared })
    }

    pub(crate) fn send(&self, cmd: Cmd) {
        let tx = self
            .shared
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match tx {
            Some(tx) => {
                if let Err(e) = tx.send(cmd) {
                    writer::reply_closed(e.0);
                }
            }
            None => writer::reply_closed(cmd),
        }
    }

    /// Appends readings atomically and returns once they are durably committed. Ids are
    /// assigned here; any id the caller set is replaced.
    pub async fn append(&self, readings: Vec<Reading>) -> Result<AppendReceipt, AppendError> {
        self.submit(readings).await
    }

    /// Like [`Buffer::append`], but the readings reach the writer now, when this is called,
    /// not when the returned future is first polled. Their place in the commit order is taken
    /// here: of two submits from one task, the first commits first (or in the same commit).
    /// The future only waits for the answer, and owns nothing but the reply channel, so a
    /// caller with many appends in flight (an MQTT session) holds them cheaply.
    pub fn submit(
        &self,
        readings: Vec<Reading>,
    ) -> impl Future<Output = Result<AppendReceipt, AppendError>> + Send + 'static + use<> {
        self.submit_with_state(readings, Vec::new())
    }

    /// Like [`Buffer::submit`], with changes to the `state` table committed in the same
    /// transaction as the readings ([`StateWrite`]). With no readings, the state is still
    /// written by the next commit.
    pub fn submit_with_state(
        &self,
        readings: Vec<Reading>,
        state: Vec<StateWrite>,
    ) -> impl Future<Output = Result<AppendReceipt, AppendError>> + Send + 'static + use<> {
        let sent = if readings.is_empty() && state.is_empty() {
            let s = self.shared.stats_lock();
            let next = s.next_reading_id;
            Err(AppendReceipt {
                first_id: next,
                last_id: next.saturating_sub(1),
                count: 0,
                segment: s.newest_segment,
            })
        } else {
            let bytes = readings.iter().map(|r| r.memory_len() as u64).sum();
            self.shared.pending.fetch_add(bytes, Ordering::SeqCst);
            let guard = PendingGuard {
                shared: self.shared.clone(),
                bytes,
            };
            let (reply, rx) = oneshot::channel();
            self.send(Cmd::Append {
                readings,
                state,
                reply,
            });
            Ok((rx, guard))
        };
        async move {
            let (rx, _guard) = match sent {
                Ok(sent) => sent,
                Err(empty) => return Ok(empty),
            };
            match rx.await {
                Ok(r) => {
                    if let Err(AppendError::Full {
                        readings,
                        disk_reserve,
                        ..
                    }) = &r
                    {
                        let reason = if *disk_reserve {
                            "disk_full"
                        } else {
                            "buffer_full"
                        };
                        metrics::counter!("ferry_readings_rejected_total", "reason" => reason)
                            .increment(readings.len() as u64);
                    }
                    r
                }
                // The writer only drops a reply after answering it; this means it died.
                Err(_) => Err(AppendError::Closed {
                    readings: Vec::new(),
                }),
            }
        }
    }

    /// Estimated memory held by readings submitted and not yet answered (see
    /// [`BufferOptions::max_pending_bytes`]).
    pub fn pending_bytes(&self) -> u64 {
        self.shared.pending.load(Ordering::SeqCst)
    }

    /// Whether [`Buffer::pending_bytes`] is above [`BufferOptions::max_pending_bytes`].
    pub fn pending_over(&self) -> bool {
        self.pending_bytes() > self.shared.opts.max_pending_bytes
    }

    /// How often [`Buffer::pending_bytes`] fell from above the cap to the cap or below. A
    /// caller that pauses reads `g` *before* it finds [`Buffer::pending_over`] true, and may
    /// go on once this exceeds `g` ([`Buffer::room_since`]), whatever the level is by then:
    /// so every paused caller gets its turn after each fall, even when others fill the room
    /// again first.
    pub fn room_generation(&self) -> u64 {
        self.shared.room_generation.load(Ordering::SeqCst)
    }

    /// Resolves once [`Buffer::room_generation`] exceeds `generation`.
    pub async fn room_since(&self, generation: u64) {
        loop {
            // Registered before the check, so a fall between the two is not missed.
            let freed = self.shared.pending_freed.notified();
            if self.room_generation() > generation {
                return;
            }
            freed.await;
        }
    }

    /// A reader for one of the enabled consumers, starting after its last acked segment.
    pub fn reader(&self, consumer: &str) -> Result<Reader, ReadError> {
        Reader::new(consumer, self.clone())
    }

    /// A snapshot of the state and counters.
    pub fn stats(&self) -> BufferStats {
        let mut s = self.shared.stats_lock().snapshot();
        if let Location::File { data_dir } = &self.shared.loc {
            s.file_bytes = std::fs::metadata(data_dir.join(FILE_NAME))
                .ok()
                .map(|m| m.len());
        }
        s
    }

    /// A receiver that changes whenever a commit lands; its value is the newest segment id.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    /// Readings and bytes that `consumer` has not acked yet, and the oldest such reading.
    pub async fn lag(&self, consumer: &str) -> Result<Lag, ReadError> {
        let after = *self
            .shared
            .stats_lock()
            .cursors
            .get(consumer)
            .ok_or_else(|| ReadError::UnknownConsumer(consumer.to_string()))?;
        let db = self.shared.db()?;
        let (mut lag, clock) = tokio::task::spawn_blocking(move || lag_after(&*db, after))
            .await
            .map_err(|e| {
                ReadError::Storage(StorageFailure {
                    kind: StorageFailureKind::Other,
                    message: e.to_string(),
                })
            })??;
        let c = &self.shared.clock;
        lag.oldest_age_ms = lag
            .oldest_received_ms
            .and_then(|wall| c.age_ms(clock.map(|(b, oldest, _)| (b, oldest)), wall, &c.now()));
        Ok(lag)
    }

    /// Every `state` row whose key starts with `prefix`, in key order ([`StateWrite`]).
    pub fn state(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ReadError> {
        let db = self.shared.db()?;
        let txn = db.begin_read().map_err(sf)?;
        let table = match txn.open_table(store::STATE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(ReadError::Storage(sf(e))),
        };
        let mut out = Vec::new();
        for row in table.range(prefix..).map_err(sf)? {
            let (k, v) = row.map_err(sf)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The clock: synchronized or not, since when, jumps seen (see [`clock`]).
    pub fn clock(&self) -> ClockStatus {
        self.shared.clock.status()
    }

    /// Lists up to `limit` dead letters with reading id greater than `after`.
    pub async fn dead_letters(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, ReadError> {
        let db = self.shared.db()?;
        tokio::task::spawn_blocking(move || list_dead(&*db, after, limit))
            .await
            .map_err(|e| {
                ReadError::Storage(StorageFailure {
                    kind: StorageFailureKind::Other,
                    message: e.to_string(),
                })
            })?
    }

    /// Moves dead letters (all of them, or those ids) back into the stream, keeping their ids.
    /// Returns how many were requeued.
    pub async fn requeue(&self, ids: Option<Vec<u64>>) -> Result<usize, AckError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Requeue { ids, reply });
        rx.await.map_err(|_| AckError::Closed)?
    }

    /// Commits everything already handed to the writer, stops it, and closes the file.
    /// Appends after this fail with [`AppendError::Closed`].
    pub async fn close(&self) {
        let tx = self
            .shared
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(Cmd::Shutdown);
        }
        let done = self
            .shared
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(done) = done {
            let _ = done.await;
        }
    }

    /// Whether the writer thread takes requests within `timeout`. A writer stuck in a hung
    /// fsync, or gone, answers false. Used to feed systemd's watchdog.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Ping(reply));
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// Whether [`Buffer::close`] has completed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }
}

/// What a consumer still has to send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Readings in segments after the consumer's cursor.
    pub readings: u64,
    /// Their stored bytes.
    pub bytes: u64,
    /// Segments after the cursor.
    pub segments: u64,
    /// When the oldest of them was received (wall clock as stamped).
    pub oldest_received_ms: Option<u64>,
    /// How long the oldest of them has waited, by [`clock`]'s jump-safe rules; `None` when
    /// nothing waits or the age cannot be known.
    pub oldest_age_ms: Option<u64>,
}

/// The lag after segment `after`, and the clock of its first segment.
fn lag_after(
    db: &dyn store::Readable,
    after: u64,
) -> Result<(Lag, Option<store::SegClock>), ReadError> {
    let txn = db.begin().map_err(sf)?;
    let index = store::IndexView::open(&txn).map_err(sf)?;
    let mut lag = Lag::default();
    let mut first_clock = None;
    index
        .for_each_from(after + 1, |_, m| {
            if lag.segments == 0 {
                first_clock = m.clock;
            }
            lag.readings += m.count as u64;
            lag.bytes += m.stored_bytes;
            lag.segments += 1;
            lag.oldest_received_ms = Some(
                lag.oldest_received_ms
                    .map_or(m.oldest_ms, |o| o.min(m.oldest_ms)),
            );
        })
        .map_err(sf)?;
    Ok((lag, first_clock))
}

fn list_dead(
    db: &dyn store::Readable,
    after: u64,
    limit: usize,
) -> Result<Vec<DeadLetter>, ReadError> {
    let txn = db.begin().map_err(sf)?;
    let dead = txn.open_table(DEAD).map_err(sf)?;
    let mut out = Vec::new();
    for e in dead
        .range(after.saturating_add(1)..)
        .map_err(sf)?
        .take(limit)
    {
        let (k, v) = e.map_err(sf)?;
        match dead_letter::decode(v.value()) {
            Ok(d) => out.push(d),
            Err(e) => {
                tracing::error!(reading = k.value(), error = %e, "A dead letter is unreadable and is skipped.")
            }
        }
    }
    Ok(out)
}

/// The `HELP` text and unit of every metric the buffer emits.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "ferry_clock_synchronized",
        Unit::Count,
        "1 while the system clock is synchronized (the kernel's flag, or gateway.clock_sync = \"assume\"), else 0; readings received meanwhile are marked unsynced and corrected later."
    );
    describe_counter!(
        "ferry_clock_jumps_total",
        Unit::Count,
        "Steps of the wall clock against the boot clock of more than 2 s."
    );
    describe_gauge!(
        "ferry_buffer_readings",
        Unit::Count,
        "Readings in the buffer (not yet acked by every uplink)."
    );
    describe_gauge!(
        "ferry_buffer_segments",
        Unit::Count,
        "Segments (group commits) in the buffer."
    );
    describe_gauge!(
        "ferry_buffer_bytes",
        Unit::Bytes,
        "Stored bytes counted against buffer.max_bytes: segments plus dead letters."
    );
    describe_gauge!("ferry_buffer_max_bytes", Unit::Bytes, "buffer.max_bytes.");
    describe_gauge!(
        "ferry_buffer_dead_letters",
        Unit::Count,
        "Readings in the dead-letter table."
    );
    describe_counter!(
        "ferry_buffer_commits_total",
        Unit::Count,
        "Group commits that returned from fsync."
    );
    describe_counter!(
        "ferry_buffer_commit_errors_total",
        Unit::Count,
        "Group commits that failed (their readings were handed back, not acknowledged)."
    );
    describe_histogram!(
        "ferry_buffer_commit_duration_seconds",
        Unit::Seconds,
        "Duration of a group commit, fsync included."
    );
    describe_histogram!(
        "ferry_buffer_readings_per_commit",
        Unit::Count,
        "Readings per group commit."
    );
    describe_counter!(
        "ferry_buffer_readings_appended_total",
        Unit::Count,
        "Readings committed to the buffer."
    );
    describe_counter!(
        "ferry_buffer_readings_acked_total",
        Unit::Count,
        "Readings deleted after every uplink that takes them acked them."
    );
    describe_counter!(
        "ferry_buffer_raw_bytes_total",
        Unit::Bytes,
        "Bytes of readings before compression, committed."
    );
    describe_counter!(
        "ferry_buffer_stored_bytes_total",
        Unit::Bytes,
        "Bytes of segments as stored (after compression), committed."
    );
    describe_counter!(
        "ferry_buffer_corrupt_segments_total",
        Unit::Count,
        "Segments that failed their checksum when read, moved to the dead-letter table."
    );
    describe_counter!(
        "ferry_buffer_quarantined_total",
        Unit::Count,
        "Buffer files found corrupt at open and moved aside."
    );
    describe_counter!(
        "ferry_readings_dropped_total",
        Unit::Count,
        "Readings deleted without an upstream ack, by reason (buffer_full, ttl, dead_letter_evicted, disk_full)."
    );
    describe_counter!(
        "ferry_readings_rejected_total",
        Unit::Count,
        "New readings refused and not acknowledged, by reason (buffer_full, disk_full, storage)."
    );
    describe_counter!(
        "ferry_readings_dead_lettered_total",
        Unit::Count,
        "Readings moved to the dead-letter table, by consumer."
    );
}
