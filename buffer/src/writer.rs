//! The single writer thread: gathers commands for one group commit, commits them in one redb
//! transaction with `Durability::Immediate`, then answers every waiter.

use crate::clock::{ClockNow, SyncPoint};
use crate::error::{AckError, AppendError, StorageFailure};
use crate::reading::{Reading, now_ms};
use crate::segment;
use crate::store::{
    self, BOOTS, CURSORS, DEAD, INDEX, Location, META, Meta, SEGMENTS, STATE, SegClock, SegMeta,
};
use crate::{AppendReceipt, Shared, StateWrite, WhenFull, dead_letter, sf};
use redb::{Database, Durability, ReadableDatabase, ReadableTable};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub(crate) type Reply<T> = oneshot::Sender<T>;

/// A request to the writer thread.
pub(crate) enum Cmd {
    Append {
        readings: Vec<Reading>,
        state: Vec<StateWrite>,
        reply: Reply<Result<AppendReceipt, AppendError>>,
    },
    Ack {
        consumer: String,
        segment: u64,
        reply: Reply<Result<(), AckError>>,
    },
    DeadLetter {
        consumer: String,
        items: Vec<(Reading, String)>,
        reply: Reply<Result<(), AckError>>,
    },
    Requeue {
        ids: Option<Vec<u64>>,
        reply: Reply<Result<usize, AckError>>,
    },
    /// Answered as soon as the writer takes it off the channel: proves the loop is turning.
    Ping(Reply<()>),
    Shutdown,
}

type AppendReq = (Vec<Reading>, Reply<Result<AppendReceipt, AppendError>>);
type AckReq = (String, u64, Reply<Result<(), AckError>>);
type DeadReq = (String, Vec<(Reading, String)>, Reply<Result<(), AckError>>);
type RequeueReq = (Option<Vec<u64>>, Reply<Result<usize, AckError>>);

/// Which gap the group commit waits for, request to request (see the crate doc, "Group
/// commit").
///
/// A steady stream (requests arrived while the previous commit was written) pauses for
/// scheduling now and then (the listeners share the CPU with everything else on a Pi), so it
/// gets the long gap, a tenth of `max_flush_delay`, lest every pause split a commit and
/// multiply the pages written. Clients that wait for each ack send nothing during a commit
/// and keep the short gap, `flush_interval`.
///
/// Clients that pipeline up to a window of unacknowledged publishes and then wait for their
/// acks also send during commits, but after their burst only stragglers come: for them the
/// long gap only delays every ack by its length (it halved their rate in bench-run's ingest
/// matrix). So the long gap must earn its wait: at least a quarter of the commit's readings
/// came after a pause longer than the short gap, where the short gap would have cut the
/// commit. One that did not is not used again for `retry` commits, then tried once more;
/// each try that fails doubles `retry`, up to [`GapPolicy::RETRY_MAX`].
#[derive(Debug, Clone)]
struct GapPolicy {
    short: Duration,
    long: Duration,
    earned: bool,
    since_long: u32,
    retry: u32,
}

impl GapPolicy {
    /// Commits with the short gap after a long gap that gathered only stragglers: at first,
    /// and at most.
    const RETRY_MIN: u32 = 8;
    const RETRY_MAX: u32 = 512;

    fn new(flush_interval: Duration, max_flush_delay: Duration) -> GapPolicy {
        let long = if flush_interval.is_zero() {
            Duration::ZERO
        } else {
            flush_interval.max(max_flush_delay / 10)
        };
        GapPolicy {
            short: flush_interval,
            long,
            earned: true,
            since_long: 0,
            retry: Self::RETRY_MIN,
        }
    }

    /// The gap for a batch whose first request arrived while the previous commit was written.
    /// (A batch that starts on an idle writer always gets the short gap.)
    fn after_busy_commit(&self) -> Duration {
        if self.earned || self.since_long >= self.retry {
            self.long
        } else {
            self.short
        }
    }

    /// A batch gathered with `gap` holds `readings`, of which those after index `late` came
    /// after the first pause longer than the short gap (`None`: no such pause).
    fn gathered(&mut self, gap: Duration, readings: usize, late: Option<usize>) {
        if gap <= self.short {
            self.since_long = self.since_long.saturating_add(1);
            return;
        }
        let tried = !self.earned;
        self.earned = late.is_some_and(|before| (readings - before) * 4 >= readings);
        self.retry = if self.earned {
            Self::RETRY_MIN
        } else if tried {
            (self.retry * 2).min(Self::RETRY_MAX)
        } else {
            self.retry
        };
        self.since_long = 0;
    }
}

#[derive(Default)]
struct Batch {
    appends: Vec<AppendReq>,
    /// Each append's state writes, by the append's index.
    states: Vec<Vec<StateWrite>>,
    acks: Vec<AckReq>,
    deads: Vec<DeadReq>,
    requeues: Vec<RequeueReq>,
    readings: usize,
    raw_bytes: usize,
}

impl Batch {
    fn push(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Append {
                readings,
                state,
                reply,
            } => {
                self.readings += readings.len();
                self.raw_bytes += readings.iter().map(Reading::encoded_len).sum::<usize>();
                self.raw_bytes += state.iter().map(StateWrite::len).sum::<usize>();
                self.appends.push((readings, reply));
                self.states.push(state);
            }
            Cmd::Ack {
                consumer,
                segment,
                reply,
            } => self.acks.push((consumer, segment, reply)),
            Cmd::DeadLetter {
                consumer,
                items,
                reply,
            } => self.deads.push((consumer, items, reply)),
            Cmd::Requeue { ids, reply } => self.requeues.push((ids, reply)),
            Cmd::Ping(reply) => {
                let _ = reply.send(());
            }
            Cmd::Shutdown => return true,
        }
        false
    }

    fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.acks.is_empty()
            && self.deads.is_empty()
            && self.requeues.is_empty()
    }
}

/// An encoded segment waiting for its commit.
struct Encoded {
    value: Vec<u8>,
    meta: SegMeta,
}

/// What a commit changed, applied to memory only after redb returned Ok.
#[derive(Default)]
struct Outcome {
    appended: u64,
    raw_bytes: u64,
    stored_new: u64,
    acked_readings: u64,
    dropped_full: u64,
    dropped_ttl: u64,
    dropped_dead: u64,
    /// Evicted for the disk reserve rather than the byte cap.
    dropped_disk: u64,
    /// The disk reserve, not `max_bytes`, limited this commit.
    disk_limited: bool,
    requeued: Vec<usize>,
    segments_written: u64,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Cmd>,
    db: Option<Arc<Database>>,
    meta: Meta,
    cursors: BTreeMap<String, u64>,
    oldest: Option<SegMeta>,
    /// The clocks as read at the start of the current commit.
    now: ClockNow,
    last_reopen: Instant,
    last_failure: Option<StorageFailure>,
    /// The most stored bytes the buffer held in its file since it was opened: pages the file
    /// already has, which the buffer may fill again at the disk reserve without growing it.
    stored_high_water: std::cell::Cell<u64>,
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        rx: Receiver<Cmd>,
        db: Arc<Database>,
    ) -> Result<Self, StorageFailure> {
        let now = shared.clock.now();
        let mut w = Writer {
            shared,
            rx,
            db: Some(db),
            meta: Meta::default(),
            cursors: BTreeMap::new(),
            oldest: None,
            now,
            last_reopen: Instant::now(),
            last_failure: None,
            stored_high_water: std::cell::Cell::new(0),
        };
        w.load_state()?;
        w.stored_high_water.set(w.meta.used_bytes());
        Ok(w)
    }

    /// Reads the counters, cursors and oldest segment, and registers new consumers.
    fn load_state(&mut self) -> Result<(), StorageFailure> {
        let db = self.db.clone().ok_or_else(|| StorageFailure {
            kind: crate::error::StorageFailureKind::Io,
            message: "buffer is not open".into(),
        })?;
        let txn = db.begin_write().map_err(sf)?;
        {
            let meta = txn.open_table(META).map_err(sf)?;
            self.meta = Meta::read(&meta).map_err(sf)?;
            let mut cursors = txn.open_table(CURSORS).map_err(sf)?;
            self.cursors.clear();
            for name in &self.shared.opts.consumers {
                let v = cursors.get(name.as_str()).map_err(sf)?.map(|g| g.value());
                let v = match v {
                    Some(v) => v,
                    None => {
                        cursors.insert(name.as_str(), 0).map_err(sf)?;
                        0
                    }
                };
                self.cursors.insert(name.clone(), v);
            }
            let index = txn.open_table(INDEX).map_err(sf)?;
            self.oldest = index
                .first()
                .map_err(sf)?
                .map(|(_, v)| SegMeta::from_tuple(v.value()));
            self.load_boots(&txn)?;
            if let Some(id) = &self.shared.opts.gateway_id {
                let mut about = txn.open_table(store::ABOUT).map_err(sf)?;
                let same = about
                    .get("gateway_id")
                    .map_err(sf)?
                    .is_some_and(|g| g.value() == id.as_str());
                if !same {
                    about.insert("gateway_id", id.as_str()).map_err(sf)?;
                }
            }
        }
        txn.commit().map_err(sf)?;
        self.publish_stats(None);
        let newest = self.meta.next_segment_id - 1;
        self.shared.committed.send_replace(newest);
        Ok(())
    }

    /// Finds this boot in the `boots` table (adding it when the boot id is new) and hands the
    /// known sync points to the clock.
    fn load_boots(&self, txn: &redb::WriteTransaction) -> Result<(), StorageFailure> {
        let mut boots = txn.open_table(BOOTS).map_err(sf)?;
        let boot_id = self.shared.clock.boot_id();
        let (sync, last) = crate::clock::read_boots(&boots).map_err(sf)?;
        let boot = match last {
            Some((n, id)) if id == boot_id => n,
            other => {
                let n = other.map_or(1, |(n, _)| n + 1);
                let row = crate::clock::encode_boot(&boot_id, None::<SyncPoint>);
                boots.insert(n, row.as_slice()).map_err(sf)?;
                n
            }
        };
        self.shared.clock.load(boot, boot_id, sync);
        Ok(())
    }

    pub(crate) fn run(mut self) {
        let opts = self.shared.opts.clone();
        let tick = Duration::from_millis(1000);
        let mut shutting_down = false;
        let mut gaps = GapPolicy::new(opts.flush_interval, opts.max_flush_delay);
        while !shutting_down {
            let (first, gap) = match self.rx.try_recv() {
                Ok(c) => (c, gaps.after_busy_commit()),
                Err(_) => match self.rx.recv_timeout(tick) {
                    Ok(c) => (c, opts.flush_interval),
                    Err(RecvTimeoutError::Timeout) => {
                        self.housekeeping();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut batch = Batch::default();
            shutting_down = batch.push(first);
            // Gather while requests keep coming less than `gap` apart, for at most
            // `max_flush_delay`, or until the batch is big enough that the commit's fixed page
            // writes stay small against what it stores.
            let cap = Instant::now() + opts.max_flush_delay.max(gap);
            let mut last = Instant::now();
            let mut deadline = (last + gap).min(cap);
            // Readings that came after the first pause longer than the short gap.
            let mut late: Option<usize> = None;
            while !shutting_down
                && batch.readings < opts.max_batch_readings
                && (batch.raw_bytes as u64) < opts.max_batch_bytes.min(opts.flush_target_bytes)
            {
                let wait = deadline.saturating_duration_since(Instant::now());
                let next = if wait.is_zero() {
                    self.rx.try_recv().map_err(|_| ())
                } else {
                    self.rx.recv_timeout(wait).map_err(|_| ())
                };
                match next {
                    Ok(cmd) => {
                        let now = Instant::now();
                        if late.is_none() && now.duration_since(last) > opts.flush_interval {
                            late = Some(batch.readings);
                        }
                        shutting_down = batch.push(cmd);
                        last = now;
                        deadline = (now + gap).min(cap);
                    }
                    Err(()) => break,
                }
            }
            gaps.gathered(gap, batch.readings, late);
            if !batch.is_empty() {
                self.commit(batch);
            }
        }
        // Anything queued behind the shutdown is answered as closed.
        self.shared
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        while let Ok(cmd) = self.rx.try_recv() {
            reply_closed(cmd);
        }
        *self.shared.db.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.db = None;
        tracing::info!("The buffer writer stopped after committing everything it was given.");
    }

    fn housekeeping(&mut self) {
        if self.db.is_none() {
            let _ = self.ensure_open();
            return;
        }
        self.now = self.shared.clock.observe();
        let expired = match (self.shared.opts.max_age, self.oldest) {
            (Some(max_age), Some(o)) => self
                .age_ms(o.clock, o.newest_ms)
                .is_some_and(|age| age > max_age.as_millis() as u64),
            _ => false,
        };
        self.publish_stats(None);
        if expired || self.shared.clock.unsaved().is_some() {
            self.commit(Batch::default());
        }
    }

    /// How old the newest reading of a segment is, by [`crate::clock`]'s rules.
    fn age_ms(&self, clock: Option<SegClock>, newest_ms: u64) -> Option<u64> {
        self.shared.clock.age_ms(
            clock.map(|(boot, _, newest)| (boot, newest)),
            newest_ms,
            &self.now,
        )
    }

    /// Reopens the database after an I/O error (redb refuses further use with `PreviousIo`).
    fn ensure_open(&mut self) -> Result<Arc<Database>, StorageFailure> {
        if let Some(db) = &self.db {
            return Ok(db.clone());
        }
        // At most one reopen attempt every 200 ms, so a dead disk is not hammered.
        if self.last_reopen.elapsed() < Duration::from_millis(200) {
            return Err(self.last_failure.clone().unwrap_or_else(|| StorageFailure {
                kind: crate::error::StorageFailureKind::Io,
                message: "buffer is reopening after a storage error".into(),
            }));
        }
        self.last_reopen = Instant::now();
        *self.shared.db.write().unwrap_or_else(|p| p.into_inner()) = None;
        match store::open(&self.shared.loc, self.shared.opts.cache_bytes) {
            Ok((db, quarantined)) => {
                let db = Arc::new(db);
                if let Some(q) = quarantined {
                    self.shared.stats_lock().quarantined.push(q);
                }
                self.db = Some(db.clone());
                *self.shared.db.write().unwrap_or_else(|p| p.into_inner()) = Some(db.clone());
                self.load_state()?;
                tracing::warn!(
                    "The buffer was reopened after a storage error and accepts readings again."
                );
                self.shared.stats_lock().last_error = None;
                self.last_failure = None;
                Ok(db)
            }
            Err(e) => {
                let f = match e {
                    crate::OpenError::Storage { source, .. } => source,
                    other => StorageFailure {
                        kind: crate::error::StorageFailureKind::Io,
                        message: other.to_string(),
                    },
                };
                self.shared.stats_lock().last_error = Some(f.message.clone());
                self.last_failure = Some(f.clone());
                Err(f)
            }
        }
    }

    fn commit(&mut self, mut batch: Batch) {
        let started = Instant::now();
        let db = match self.ensure_open() {
            Ok(db) => db,
            Err(f) => return self.fail(batch, f),
        };
        // Ids are assigned in arrival order; they become real only if the commit succeeds.
        // Every new reading is stamped with the clock at this commit (crate::clock).
        self.now = self.shared.clock.observe();
        let stamp = self.shared.clock.stamp(&self.now);
        let mut next_id = self.meta.next_reading_id;
        for (readings, _) in &mut batch.appends {
            for r in readings.iter_mut() {
                r.id = next_id;
                next_id += 1;
                if r.clock.boot == 0 {
                    r.clock = self.shared.clock.stamp_reading(&stamp, &self.now, r);
                }
            }
        }
        let boot_row = self.shared.clock.unsaved();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.write_txn(&db, &mut batch, boot_row.as_ref())
        }))
        .unwrap_or_else(|_| {
            Err(StorageFailure {
                kind: crate::error::StorageFailureKind::Other,
                message: "the storage layer panicked during a commit".into(),
            })
        });
        match result {
            Ok((meta, outcome, accepted, rejected)) => {
                if let Some((boot, _)) = boot_row {
                    self.shared.clock.saved(boot);
                }
                self.finish(meta, outcome, batch, accepted, rejected, started)
            }
            Err(f) => {
                tracing::error!(error = %f, "A buffer commit failed; the pending readings were refused and nothing was stored.");
                metrics::counter!("ferry_buffer_commit_errors_total").increment(1);
                // redb poisons the handle after an I/O error: drop it and reopen on next use.
                self.db = None;
                *self.shared.db.write().unwrap_or_else(|p| p.into_inner()) = None;
                self.shared.stats_lock().last_error = Some(f.message.clone());
                self.shared.stats_lock().commit_errors_total += 1;
                self.last_failure = Some(f.clone());
                self.fail(batch, f);
            }
        }
    }

    /// How many stored bytes the buffer may hold, `used` now, without the file system's free
    /// space going below [`crate::disk_reserve`] (the rule is written there). `None` without a
    /// reserve, for a custom backend, or when the file system cannot be asked.
    fn disk_room(&self, used: u64) -> Option<u64> {
        let Location::File { data_dir } = &self.shared.loc else {
            return None;
        };
        let (free, total) = crate::disk_space(data_dir)?;
        let reserve = crate::disk_reserve(total, self.shared.opts.min_free_bytes);
        if reserve == 0 {
            return None;
        }
        if free < reserve - reserve / 4 {
            // Well below the reserve (other files grew): the pages the file has are all the
            // buffer may use from now on.
            self.stored_high_water.set(used);
        }
        let growth = free.saturating_sub(reserve) / DISK_COST;
        Some((used + growth).max(self.stored_high_water.get()))
    }

    fn encode(&self, readings: &[&Reading]) -> Vec<Encoded> {
        let opts = &self.shared.opts;
        let mut out = Vec::new();
        let mut start = 0;
        while start < readings.len() {
            let mut end = start;
            let mut bytes = 0u64;
            while end < readings.len()
                && (end == start
                    || (end - start < opts.max_batch_readings
                        && bytes + readings[end].encoded_len() as u64 <= opts.max_batch_bytes))
            {
                bytes += readings[end].encoded_len() as u64;
                end += 1;
            }
            let chunk = &readings[start..end];
            let value = segment::encode_segment(chunk, opts.compression);
            // The boot clock of the readings received in this boot (a requeued reading from
            // an earlier boot keeps its own stamp and is left out).
            let boot = self.shared.clock.stamp(&self.now).boot;
            let bts = chunk
                .iter()
                .filter(|r| r.clock.boot == boot)
                .map(|r| r.clock.boottime_ms);
            let clock = bts
                .clone()
                .min()
                .zip(bts.max())
                .map(|(lo, hi)| (boot, lo, hi));
            let meta = SegMeta {
                first_id: chunk[0].id,
                count: chunk.len() as u32,
                stored_bytes: value.len() as u64,
                oldest_ms: chunk.iter().map(|r| r.received_at_ms).min().unwrap_or(0),
                newest_ms: chunk.iter().map(|r| r.received_at_ms).max().unwrap_or(0),
                clock,
            };
            out.push(Encoded { value, meta });
            start = end;
        }
        out
    }

    /// Runs the whole batch in one write transaction, in these steps: acks, TTL, dead
    /// letters, requeues, appends (within the byte cap and the disk reserve), then the new
    /// segments and counters. Returns the new meta, what changed, and which appends (by index)
    /// were accepted or refused for space.
    #[allow(clippy::type_complexity)]
    fn write_txn(
        &self,
        db: &Database,
        batch: &mut Batch,
        boot_row: Option<&(u32, Vec<u8>)>,
    ) -> Result<(Meta, Outcome, Vec<usize>, Vec<(usize, AppendError)>), StorageFailure> {
        // Held from choosing what `drop_oldest` evicts until the commit (see Shared::leases).
        let mut leases_held = None;
        let mut txn = db.begin_write().map_err(sf)?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| StorageFailure {
                kind: crate::error::StorageFailureKind::Other,
                message: e.to_string(),
            })?;
        if self.shared.opts.quick_repair {
            txn.set_quick_repair(true);
        }
        let (meta, out, accepted, rejected);
        {
            let mut t = Txn {
                segs: txn.open_table(SEGMENTS).map_err(sf)?,
                index: txn.open_table(INDEX).map_err(sf)?,
                dead: txn.open_table(DEAD).map_err(sf)?,
                meta: self.meta,
                out: Outcome::default(),
            };
            if let Some((boot, row)) = boot_row {
                let mut boots = txn.open_table(BOOTS).map_err(sf)?;
                boots.insert(*boot, row.as_slice()).map_err(sf)?;
            }
            let mut cursors = txn.open_table(CURSORS).map_err(sf)?;
            let new_cursors = self.apply_acks(&mut t, &mut cursors, &batch.acks)?;
            self.expire(&mut t)?;
            t.write_dead_letters(&batch.deads)?;
            let requeued = t.take_requeues(&batch.requeues)?;
            let placed =
                self.place_appends(&mut t, batch, &requeued, &new_cursors, &mut leases_held)?;
            t.write_segments(&placed.encoded)?;
            if batch.states.iter().any(|s| !s.is_empty()) {
                let mut state = txn.open_table(STATE).map_err(sf)?;
                for &i in &placed.accepted {
                    for w in &batch.states[i] {
                        match w {
                            StateWrite::Put(k, v) => {
                                state.insert(k.as_str(), v.as_slice()).map_err(sf)?;
                            }
                            StateWrite::Delete(k) => {
                                state.remove(k.as_str()).map_err(sf)?;
                            }
                            StateWrite::DeletePrefix(p) => {
                                state
                                    .retain_in(p.as_str().., |k, _| !k.starts_with(p.as_str()))
                                    .map_err(sf)?;
                            }
                        }
                    }
                }
            }
            for &i in &placed.accepted {
                let readings = &batch.appends[i].0;
                t.out.appended += readings.len() as u64;
                t.out.raw_bytes += readings.iter().map(|r| r.encoded_len() as u64).sum::<u64>();
                t.meta.next_reading_id += readings.len() as u64;
            }
            let mut meta_t = txn.open_table(META).map_err(sf)?;
            t.meta.write(&mut meta_t).map_err(sf)?;
            (meta, out, accepted, rejected) = (t.meta, t.out, placed.accepted, placed.rejected);
        }
        txn.commit().map_err(sf)?;
        Ok((meta, out, accepted, rejected))
    }

    /// Step 1, acks: advances cursors, then deletes what every consumer has acked. Returns
    /// the cursors as they will be after the commit.
    fn apply_acks(
        &self,
        t: &mut Txn<'_>,
        cursors: &mut redb::Table<'_, &'static str, u64>,
        acks: &[AckReq],
    ) -> Result<BTreeMap<String, u64>, StorageFailure> {
        let mut new_cursors = self.cursors.clone();
        for (consumer, seg, _) in acks {
            if let Some(c) = new_cursors.get_mut(consumer)
                && *seg > *c
                && *seg < t.meta.next_segment_id
            {
                *c = *seg;
                cursors.insert(consumer.as_str(), *seg).map_err(sf)?;
            }
        }
        if let Some(&floor) = new_cursors.values().min() {
            let (n, b, s) = delete_through(&mut t.segs, &mut t.index, floor)?;
            t.out.acked_readings += n;
            t.meta.readings -= n;
            t.meta.stored_bytes -= b;
            t.meta.segments -= s;
        }
        Ok(new_cursors)
    }

    /// Step 2, TTL: drops segments whose newest reading is older than `max_age`, by an age
    /// the clock can vouch for (crate::clock): never on a guess.
    fn expire(&self, t: &mut Txn<'_>) -> Result<(), StorageFailure> {
        let Some(max_age) = self.shared.opts.max_age else {
            return Ok(());
        };
        let max_age = max_age.as_millis() as u64;
        loop {
            let first = t
                .index
                .first()
                .map_err(sf)?
                .map(|(k, v)| (k.value(), SegMeta::from_tuple(v.value())));
            let Some((id, m)) = first else { break };
            match self.age_ms(m.clock, m.newest_ms) {
                Some(age) if age > max_age => {
                    t.segs.remove(id).map_err(sf)?;
                    t.index.remove(id).map_err(sf)?;
                    t.out.dropped_ttl += m.count as u64;
                    t.meta.readings -= m.count as u64;
                    t.meta.stored_bytes -= m.stored_bytes;
                    t.meta.segments -= 1;
                }
                _ => break,
            }
        }
        Ok(())
    }

    /// Step 5, appends: encodes the appends and the requeued readings, within the byte cap
    /// and the disk reserve, evicting under `drop_oldest` and refusing under `reject` (or
    /// when nothing is left to evict at the disk reserve, which is the system's, not the
    /// buffer's). Refused appends give their ids back, so the committed ones stay dense.
    fn place_appends<'s>(
        &'s self,
        t: &mut Txn<'_>,
        batch: &mut Batch,
        requeued: &[Reading],
        new_cursors: &BTreeMap<String, u64>,
        leases_held: &mut Option<std::sync::MutexGuard<'s, BTreeMap<String, u64>>>,
    ) -> Result<Placed, StorageFailure> {
        let opts = &self.shared.opts;
        let cap = match self.disk_room(t.meta.used_bytes()) {
            Some(room) if room < opts.max_bytes => {
                t.out.disk_limited = true;
                room
            }
            _ => opts.max_bytes,
        };
        let mut rejected: Vec<(usize, AppendError)> = Vec::new();
        let mut order: Vec<usize> = (0..batch.appends.len()).collect();
        let mut encoded;
        // Under `drop_oldest`, whether eviction already ran and left nothing to evict.
        let mut evicted_all = false;
        loop {
            let refs: Vec<&Reading> = order
                .iter()
                .flat_map(|&i| batch.appends[i].0.iter())
                .chain(requeued.iter())
                .collect();
            encoded = self.encode(&refs);
            let new_bytes: u64 = encoded.iter().map(|e| e.meta.stored_bytes).sum();
            if t.meta.used_bytes() + new_bytes <= cap {
                break;
            }
            if new_bytes > opts.max_bytes {
                // Cannot fit even in an empty buffer: refuse the largest requests first.
                if let Some((pos, _)) = order
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, i)| batch.appends[**i].0.len())
                {
                    let i = order.remove(pos);
                    let bytes = batch.appends[i]
                        .0
                        .iter()
                        .map(|r| r.encoded_len() as u64)
                        .sum();
                    rejected.push((
                        i,
                        AppendError::TooLarge {
                            readings: Vec::new(),
                            bytes,
                            max: opts.max_bytes,
                        },
                    ));
                    continue;
                }
                break;
            }
            let policy = if evicted_all {
                WhenFull::Reject
            } else {
                opts.when_full
            };
            match policy {
                WhenFull::DropOldest => {
                    let need = t.meta.used_bytes() + new_bytes - cap;
                    let leases = self.shared.leases.lock().unwrap_or_else(|p| p.into_inner());
                    // Segments handed to an uplink and not yet acked by it.
                    let in_flight: Vec<(u64, u64)> = leases
                        .iter()
                        .filter_map(|(c, &lease)| {
                            let acked = new_cursors.get(c).copied().unwrap_or(0);
                            (lease > acked).then_some((acked + 1, lease))
                        })
                        .collect();
                    *leases_held = Some(leases);
                    let (n, b, s) = evict_oldest(&mut t.segs, &mut t.index, need, &in_flight)?;
                    if t.out.disk_limited {
                        t.out.dropped_disk += n;
                    } else {
                        t.out.dropped_full += n;
                    }
                    t.meta.readings -= n;
                    t.meta.stored_bytes -= b;
                    t.meta.segments -= s;
                    if t.meta.used_bytes() + new_bytes > cap {
                        // Only dead letters are left to make room.
                        let need = t.meta.used_bytes() + new_bytes - cap;
                        let (n, b) = evict_dead(&mut t.dead, need)?;
                        t.out.dropped_dead += n;
                        t.meta.dead_count -= n;
                        t.meta.dead_bytes -= b;
                    }
                    if !t.out.disk_limited || t.meta.used_bytes() + new_bytes <= cap {
                        break;
                    }
                    // Nothing is left to evict and the disk reserve is still in the way.
                    evicted_all = true;
                }
                WhenFull::Reject => {
                    if order.is_empty() {
                        break;
                    }
                    // Refuse from the newest request back, by an estimate of what fits,
                    // then verify by encoding again.
                    let free = cap.saturating_sub(t.meta.used_bytes());
                    let ratio = new_bytes as f64
                        / refs.iter().map(|r| r.encoded_len()).sum::<usize>().max(1) as f64;
                    let mut keep = 0;
                    let mut est = 0f64;
                    for &i in &order {
                        let raw: usize = batch.appends[i].0.iter().map(Reading::encoded_len).sum();
                        est += raw as f64 * ratio;
                        if est > free as f64 {
                            break;
                        }
                        keep += 1;
                    }
                    let keep = keep.min(order.len() - 1);
                    for i in order.drain(keep..) {
                        rejected.push((
                            i,
                            AppendError::Full {
                                readings: Vec::new(),
                                used: t.meta.used_bytes(),
                                max: cap,
                                disk_reserve: t.out.disk_limited,
                            },
                        ));
                    }
                }
            }
        }
        // Refused requests give their ids back only if they were the newest; ids are
        // renumbered so that the committed ones stay dense.
        if !rejected.is_empty() {
            let mut next = self.meta.next_reading_id;
            for &i in &order {
                for r in batch.appends[i].0.iter_mut() {
                    r.id = next;
                    next += 1;
                }
            }
            let refs: Vec<&Reading> = order
                .iter()
                .flat_map(|&i| batch.appends[i].0.iter())
                .chain(requeued.iter())
                .collect();
            encoded = self.encode(&refs);
        }
        Ok(Placed {
            encoded,
            accepted: order,
            rejected,
        })
    }

    fn finish(
        &mut self,
        meta: Meta,
        out: Outcome,
        batch: Batch,
        accepted: Vec<usize>,
        rejected: Vec<(usize, AppendError)>,
        started: Instant,
    ) {
        let elapsed = started.elapsed();
        let newest_seg = meta.next_segment_id - 1;
        for (consumer, seg, _) in &batch.acks {
            if let Some(c) = self.cursors.get_mut(consumer)
                && *seg > *c
                && *seg <= newest_seg
            {
                *c = *seg;
            }
        }
        self.stored_high_water
            .set(self.stored_high_water.get().max(meta.used_bytes()));
        self.meta = meta;
        self.refresh_oldest();
        self.shared.committed.send_replace(newest_seg);

        // Stats and metrics first, so a caller that sees its ack also sees the counters.
        {
            let mut s = self.shared.stats_lock();
            s.commits_total += 1;
            s.appended_total += out.appended;
            s.acked_total += out.acked_readings;
            s.dropped_full_total += out.dropped_full;
            s.dropped_ttl_total += out.dropped_ttl;
            s.dropped_dead_letter_total += out.dropped_dead;
            s.dropped_disk_total += out.dropped_disk;
            s.raw_bytes_total += out.raw_bytes;
            s.stored_bytes_total += out.stored_new;
            s.record_commit(elapsed, out.appended);
            for (i, e) in &rejected {
                let n = batch.appends[*i].0.len() as u64;
                match e {
                    AppendError::Full {
                        disk_reserve: true, ..
                    } => {
                        s.rejected_disk_total += n;
                        s.disk_reserve_hit = Some(Instant::now());
                    }
                    _ => s.rejected_full_total += n,
                }
            }
            if out.dropped_disk > 0 {
                s.disk_reserve_hit = Some(Instant::now());
            }
            s.last_error = None;
        }
        self.publish_stats(Some((elapsed, &out)));

        let mut slots: Vec<Option<AppendReq>> = batch.appends.into_iter().map(Some).collect();
        for (i, mut err) in rejected {
            if let Some((readings, reply)) = slots[i].take() {
                match &mut err {
                    AppendError::Full { readings: r, .. }
                    | AppendError::TooLarge { readings: r, .. } => *r = readings,
                    _ => {}
                }
                let _ = reply.send(Err(err));
            }
        }
        for i in accepted {
            if let Some((readings, reply)) = slots[i].take() {
                let receipt = AppendReceipt {
                    first_id: readings.first().map_or(0, |r| r.id),
                    last_id: readings.last().map_or(0, |r| r.id),
                    count: readings.len(),
                    segment: newest_seg,
                };
                let _ = reply.send(Ok(receipt));
            }
        }
        for (_, seg, reply) in batch.acks {
            let _ = reply.send(if seg > newest_seg {
                Err(AckError::Ahead {
                    segment: seg,
                    newest: newest_seg,
                })
            } else {
                Ok(())
            });
        }
        for (_, _, reply) in batch.deads {
            let _ = reply.send(Ok(()));
        }
        for ((_, reply), n) in batch.requeues.into_iter().zip(out.requeued) {
            let _ = reply.send(Ok(n));
        }
    }

    fn refresh_oldest(&mut self) {
        let Some(db) = &self.db else { return };
        self.oldest = db.begin_read().ok().and_then(|t| {
            let index = t.open_table(INDEX).ok()?;
            let first = index.first().ok()??;
            Some(SegMeta::from_tuple(first.1.value()))
        });
    }

    fn publish_stats(&self, commit: Option<(Duration, &Outcome)>) {
        let m = &self.meta;
        metrics::gauge!("ferry_buffer_readings").set(m.readings as f64);
        metrics::gauge!("ferry_buffer_bytes").set(m.used_bytes() as f64);
        metrics::gauge!("ferry_buffer_segments").set(m.segments as f64);
        metrics::gauge!("ferry_buffer_dead_letters").set(m.dead_count as f64);
        metrics::gauge!("ferry_buffer_max_bytes").set(self.shared.opts.max_bytes as f64);
        if let Some((elapsed, out)) = commit {
            metrics::counter!("ferry_buffer_commits_total").increment(1);
            metrics::histogram!("ferry_buffer_commit_duration_seconds")
                .record(elapsed.as_secs_f64());
            metrics::histogram!("ferry_buffer_readings_per_commit").record(out.appended as f64);
            metrics::counter!("ferry_buffer_readings_appended_total").increment(out.appended);
            metrics::counter!("ferry_buffer_readings_acked_total").increment(out.acked_readings);
            metrics::counter!("ferry_buffer_raw_bytes_total").increment(out.raw_bytes);
            metrics::counter!("ferry_buffer_stored_bytes_total").increment(out.stored_new);
            for (reason, n) in [
                ("buffer_full", out.dropped_full),
                ("ttl", out.dropped_ttl),
                ("dead_letter_evicted", out.dropped_dead),
                ("disk_full", out.dropped_disk),
            ] {
                if n > 0 {
                    metrics::counter!("ferry_readings_dropped_total", "reason" => reason)
                        .increment(n);
                }
            }
        }
        let mut s = self.shared.stats_lock();
        s.readings = m.readings;
        s.stored_bytes = m.stored_bytes;
        s.segments = m.segments;
        s.dead_letters = m.dead_count;
        s.dead_letter_bytes = m.dead_bytes;
        s.oldest_received_ms = self.oldest.map(|o| o.oldest_ms);
        s.oldest_age_ms = self.oldest.and_then(|o| {
            self.shared.clock.age_ms(
                o.clock.map(|(boot, oldest, _)| (boot, oldest)),
                o.oldest_ms,
                &self.now,
            )
        });
        s.next_reading_id = m.next_reading_id;
        s.newest_segment = m.next_segment_id - 1;
        s.cursors = self.cursors.clone();
    }

    fn fail(&mut self, batch: Batch, f: StorageFailure) {
        let n: u64 = batch.appends.iter().map(|(r, _)| r.len() as u64).sum();
        if n > 0 {
            metrics::counter!("ferry_readings_rejected_total", "reason" => "storage").increment(n);
            self.shared.stats_lock().rejected_storage_total += n;
        }
        for (readings, reply) in batch.appends {
            let _ = reply.send(Err(AppendError::Storage {
                readings,
                source: f.clone(),
            }));
        }
        for (_, _, reply) in batch.acks {
            let _ = reply.send(Err(AckError::Storage(f.clone())));
        }
        for (_, _, reply) in batch.deads {
            let _ = reply.send(Err(AckError::Storage(f.clone())));
        }
        for (_, reply) in batch.requeues {
            let _ = reply.send(Err(AckError::Storage(f.clone())));
        }
    }
}

pub(crate) fn reply_closed(cmd: Cmd) {
    match cmd {
        Cmd::Append {
            readings, reply, ..
        } => {
            let _ = reply.send(Err(AppendError::Closed { readings }));
        }
        Cmd::Ack { reply, .. } | Cmd::DeadLetter { reply, .. } => {
            let _ = reply.send(Err(AckError::Closed));
        }
        Cmd::Requeue { reply, .. } => {
            let _ = reply.send(Err(AckError::Closed));
        }
        Cmd::Ping(_) | Cmd::Shutdown => {}
    }
}

/// One write transaction's tables and what it changed so far (see [`Writer::write_txn`]).
struct Txn<'t> {
    segs: Segs<'t>,
    index: Index<'t>,
    dead: redb::Table<'t, u64, &'static [u8]>,
    meta: Meta,
    out: Outcome,
}

/// What [`Writer::place_appends`] decided: the segments to write, and the appends (by index)
/// accepted and refused.
struct Placed {
    encoded: Vec<Encoded>,
    accepted: Vec<usize>,
    rejected: Vec<(usize, AppendError)>,
}

impl Txn<'_> {
    /// Step 3, dead letters: stored under their reading id (a second one replaces the first).
    fn write_dead_letters(&mut self, deads: &[DeadReq]) -> Result<(), StorageFailure> {
        for (consumer, items, _) in deads {
            for (r, reason) in items {
                let v = dead_letter::encode(now_ms(), consumer, reason, r);
                let old = self
                    .dead
                    .insert(r.id, v.as_slice())
                    .map_err(sf)?
                    .map(|g| g.value().len() as u64);
                match old {
                    Some(len) => self.meta.dead_bytes -= len,
                    None => self.meta.dead_count += 1,
                }
                self.meta.dead_bytes += v.len() as u64;
            }
        }
        Ok(())
    }

    /// Step 4, requeues: takes dead letters out, to be appended again with their own ids.
    /// Records how many each request took in `out.requeued`.
    fn take_requeues(&mut self, requeues: &[RequeueReq]) -> Result<Vec<Reading>, StorageFailure> {
        let mut requeued: Vec<Reading> = Vec::new();
        for (ids, _) in requeues {
            let keys: Vec<u64> = match ids {
                Some(ids) => ids.clone(),
                None => self
                    .dead
                    .iter()
                    .map_err(sf)?
                    .map(|e| e.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()
                    .map_err(sf)?,
            };
            let mut n = 0;
            for k in keys {
                if let Some(g) = self.dead.remove(k).map_err(sf)? {
                    let v = g.value();
                    self.meta.dead_bytes -= v.len() as u64;
                    self.meta.dead_count -= 1;
                    if let Ok(mut dl) = dead_letter::decode(v) {
                        dl.reading.source = crate::Source::Requeue;
                        requeued.push(dl.reading);
                        n += 1;
                    }
                }
            }
            self.out.requeued.push(n);
        }
        Ok(requeued)
    }

    /// Step 6: writes the new segments and their index rows.
    fn write_segments(&mut self, encoded: &[Encoded]) -> Result<(), StorageFailure> {
        for e in encoded {
            let id = self.meta.next_segment_id;
            self.meta.next_segment_id += 1;
            self.segs.insert(id, e.value.as_slice()).map_err(sf)?;
            self.index.insert(id, e.meta.tuple()).map_err(sf)?;
            self.meta.segments += 1;
            self.meta.readings += e.meta.count as u64;
            self.meta.stored_bytes += e.meta.stored_bytes;
            self.out.stored_new += e.meta.stored_bytes;
            self.out.segments_written += 1;
        }
        Ok(())
    }
}

type Segs<'t> = redb::Table<'t, u64, &'static [u8]>;
type Index<'t> = redb::Table<'t, u64, store::IndexRow>;

/// Deletes every segment with id <= `through`. Returns (readings, bytes, segments).
fn delete_through(
    segs: &mut Segs<'_>,
    index: &mut Index<'_>,
    through: u64,
) -> Result<(u64, u64, u64), StorageFailure> {
    let doomed: Vec<(u64, SegMeta)> = index
        .range(..=through)
        .map_err(sf)?
        .map(|e| e.map(|(k, v)| (k.value(), SegMeta::from_tuple(v.value()))))
        .collect::<Result<_, _>>()
        .map_err(sf)?;
    let mut totals = (0, 0, 0);
    for (id, m) in doomed {
        segs.remove(id).map_err(sf)?;
        index.remove(id).map_err(sf)?;
        totals.0 += m.count as u64;
        totals.1 += m.stored_bytes;
        totals.2 += 1;
    }
    Ok(totals)
}

/// Disk bytes a stored byte may take until its pages are reused: redb writes copies of the
/// pages a commit changes and frees the old ones only after a later commit. The disk reserve
/// lets the buffer grow by a `DISK_COST`th of the free space above it per commit, so the free
/// space approaches the reserve instead of overshooting it.
const DISK_COST: u64 = 2;

/// Evicts the oldest segments until `need` bytes are freed or none are left. Segments in
/// an `in_flight` range (inclusive) are upstream already and may still be delivered, so they
/// go last: only if everything else is gone and room is still short.
fn evict_oldest(
    segs: &mut Segs<'_>,
    index: &mut Index<'_>,
    need: u64,
    in_flight: &[(u64, u64)],
) -> Result<(u64, u64, u64), StorageFailure> {
    let pinned = |id: u64| in_flight.iter().any(|&(lo, hi)| (lo..=hi).contains(&id));
    let mut victims: Vec<(u64, SegMeta)> = Vec::new();
    let mut freed = 0u64;
    for pass_pinned in [false, true] {
        for entry in index.iter().map_err(sf)? {
            if freed >= need {
                break;
            }
            let (k, v) = entry.map_err(sf)?;
            let id = k.value();
            if pinned(id) != pass_pinned {
                continue;
            }
            let m = SegMeta::from_tuple(v.value());
            freed += m.stored_bytes;
            victims.push((id, m));
        }
    }
    let mut totals = (0u64, 0u64, 0u64);
    for (id, m) in victims {
        segs.remove(id).map_err(sf)?;
        index.remove(id).map_err(sf)?;
        totals.0 += m.count as u64;
        totals.1 += m.stored_bytes;
        totals.2 += 1;
    }
    Ok(totals)
}

/// Evicts the oldest dead letters until `need` bytes are freed. Returns (count, bytes).
fn evict_dead(
    dead: &mut redb::Table<'_, u64, &'static [u8]>,
    need: u64,
) -> Result<(u64, u64), StorageFailure> {
    let mut totals = (0u64, 0u64);
    while totals.1 < need {
        let Some((_, v)) = dead.pop_first().map_err(sf)? else {
            break;
        };
        totals.0 += 1;
        totals.1 += v.value().len() as u64;
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::GapPolicy;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    /// Runs one batch: the gap the policy picks after a busy commit, and what it gathered.
    fn batch(p: &mut GapPolicy, readings: usize, late: Option<usize>) -> Duration {
        let gap = p.after_busy_commit();
        p.gathered(gap, readings, late);
        gap
    }

    #[test]
    fn a_stream_whose_pauses_the_long_gap_bridges_keeps_it() {
        let mut p = GapPolicy::new(MS, 100 * MS);
        for _ in 0..100 {
            // Half the commit came after a pause the short gap would have cut at.
            assert_eq!(batch(&mut p, 200, Some(100)), 10 * MS);
        }
    }

    #[test]
    fn stragglers_do_not_earn_the_long_gap_and_retries_back_off() {
        let mut p = GapPolicy::new(MS, 100 * MS);
        // A pipelined burst: no pause, or a few stragglers after one.
        assert_eq!(batch(&mut p, 160, Some(150)), 10 * MS);
        let mut longs = Vec::new();
        for i in 1..=1000u32 {
            if batch(&mut p, 160, None) == 10 * MS {
                longs.push(i);
            }
        }
        // Tried again after 8 short commits, then 16, 32, ... up to 512.
        assert_eq!(longs, [9, 26, 59, 124, 253, 510]);
    }

    #[test]
    fn a_retry_that_earns_the_long_gap_keeps_it() {
        let mut p = GapPolicy::new(MS, 100 * MS);
        assert_eq!(batch(&mut p, 160, None), 10 * MS);
        for _ in 0..8 {
            assert_eq!(batch(&mut p, 160, None), MS);
        }
        assert_eq!(batch(&mut p, 160, Some(40)), 10 * MS, "the retry");
        assert_eq!(batch(&mut p, 160, Some(40)), 10 * MS, "earned: kept");
    }

    #[test]
    fn a_quarter_of_the_readings_after_a_pause_earns_the_long_gap() {
        let mut p = GapPolicy::new(MS, 100 * MS);
        batch(&mut p, 100, Some(75));
        assert_eq!(
            p.after_busy_commit(),
            10 * MS,
            "25 of 100 came late: earned"
        );
        batch(&mut p, 100, Some(76));
        assert_eq!(p.after_busy_commit(), MS, "24 of 100: stragglers");
    }

    #[test]
    fn without_a_longer_gap_nothing_changes() {
        // max_flush_delay / 10 below flush_interval: one gap, whatever happens.
        let mut p = GapPolicy::new(20 * MS, 100 * MS);
        for late in [None, Some(10), None] {
            assert_eq!(batch(&mut p, 100, late), 20 * MS);
        }
        let mut z = GapPolicy::new(Duration::ZERO, 100 * MS);
        assert_eq!(batch(&mut z, 100, None), Duration::ZERO);
    }
}
