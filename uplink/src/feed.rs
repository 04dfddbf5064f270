//! The buffer side of every uplink: one task owns the uplink's buffer [`Reader`], reads (and
//! decodes) segments ahead of the uplink into a bounded channel, and commits dead letters and
//! acks strictly in the order the uplink sends them, so neither the reads nor the commits (an
//! fsync each) ever run on an uplink's event loop.
//!
//! Order is kept by the one command channel: an ack is committed only after every command sent
//! before it, and a [`Cmd::Rewind`] takes effect only after the acks sent before it were
//! committed (or failed), so rewinding goes back to exactly the last committed ack. After a
//! failed commit, later acks are skipped until the next rewind: acking a later segment would
//! also ack the one whose commit (say, its dead letters) failed.

use crate::settle::Settled;
use crate::status::UplinkStatus;
use ferry_buffer::{AckError, ReadError, Reader, Segment};
use tokio::sync::{mpsc, watch};

/// A request to the buffer task.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Dead-letter the settled run's refused readings (if any), then ack every segment up to
    /// and including its last.
    Ack { epoch: u64, settled: Settled },
    /// Go back to the last committed ack and read again from there; segments read from now on
    /// carry `epoch`.
    Rewind { epoch: u64 },
}

/// What became of one [`Cmd::Ack`].
#[derive(Debug)]
pub(crate) struct Acked {
    /// The epoch of the run loop that sent the ack.
    pub(crate) epoch: u64,
    pub(crate) result: AckResult,
}

#[derive(Debug)]
pub(crate) enum AckResult {
    /// Committed (and counted in the status), with the readings the upstream confirmed (the
    /// rest were skipped or dead-lettered: no proof that the link works, see
    /// [`crate::retry`]).
    Done(u64),
    /// The commit failed; nothing after the last committed ack counts.
    Failed(AckError),
    /// Not attempted: an earlier commit of the same epoch failed.
    Skipped,
    /// Committed as part of the next answer's commit.
    Folded,
}

/// At most this part (1/8) of `buffer.max_bytes` is in flight for one uplink (stored bytes).
/// `drop_oldest` spares segments in flight while older ones are left, so they must stay a
/// small part of the buffer: otherwise, during an outage, the segments read ahead would cover
/// the whole cap and the newest readings would be evicted instead of the oldest.
pub(crate) const IN_FLIGHT_SHARE_OF_BUFFER: u64 = 8;

/// The stored bytes one uplink may hold in flight (see [`IN_FLIGHT_SHARE_OF_BUFFER`]).
pub(crate) fn max_in_flight_bytes(buffer: &ferry_buffer::Buffer) -> u64 {
    (buffer.stats().max_bytes / IN_FLIGHT_SHARE_OF_BUFFER).max(1)
}

/// Most segments one read brings (one read transaction, decoded on a blocking thread).
const MAX_READ_SEGMENTS: usize = 256;

/// Segments read, tagged with the epoch they were read in.
pub(crate) type Batch = (u64, Result<Vec<Segment>, ReadError>);

/// The channels of a spawned buffer task.
pub(crate) struct Feed {
    /// Segments read ahead, with the epoch they were read in.
    pub(crate) segs: mpsc::Receiver<Batch>,
    /// Acks and rewinds, in order.
    pub(crate) cmds: mpsc::UnboundedSender<Cmd>,
    /// One answer per [`Cmd::Ack`].
    pub(crate) acks: mpsc::UnboundedReceiver<Acked>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

/// The uplink's end of the command channel: sends acks and rewinds in order and keeps the
/// epoch (bumped at every abandon: batches and answers of older epochs no longer count).
#[derive(Debug)]
pub(crate) struct Acks {
    cmds: mpsc::UnboundedSender<Cmd>,
    epoch: u64,
    pending: usize,
}

impl Acks {
    pub(crate) fn new(cmds: mpsc::UnboundedSender<Cmd>) -> Self {
        Acks {
            cmds,
            epoch: 0,
            pending: 0,
        }
    }

    /// The current epoch.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Acks sent and not answered yet.
    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// Logs the refused readings of `settled` and sends its ack; fails when the buffer task is
    /// gone.
    pub(crate) fn send(&mut self, status: &UplinkStatus, settled: Settled) -> Result<(), AckError> {
        for (r, why) in &settled.dead {
            tracing::warn!(uplink = %status.name(), r#type = status.kind(), reading = r.id,
                device = %r.device, topic = %r.topic, reason = %why,
                "The upstream refused a reading for good; it moves to the dead-letter table.");
        }
        self.cmds
            .send(Cmd::Ack {
                epoch: self.epoch,
                settled,
            })
            .map_err(|_| AckError::Closed)?;
        self.pending += 1;
        Ok(())
    }

    /// Starts a new epoch: nothing sent or read before counts any more.
    pub(crate) fn abandon(&mut self) {
        self.epoch += 1;
    }

    /// Sends the rewind of the current epoch. Queued behind the acks sent before it, so the
    /// buffer task goes back to exactly the last committed ack.
    pub(crate) fn rewind(&self) {
        let _ = self.cmds.send(Cmd::Rewind { epoch: self.epoch });
    }

    /// Notes an answer of the buffer task (which counted the commit in the status). `Ok(true)`
    /// when it committed readings the upstream confirmed (progress, as [`crate::retry`] means
    /// it); an error when an ack of the current epoch could not be committed.
    pub(crate) fn answered(&mut self, a: Acked) -> Result<bool, AckError> {
        self.pending = self.pending.saturating_sub(1);
        match a.result {
            AckResult::Done(delivered) => Ok(delivered > 0),
            AckResult::Folded | AckResult::Skipped => Ok(false),
            AckResult::Failed(e) if a.epoch == self.epoch => Err(e),
            AckResult::Failed(e) => {
                tracing::debug!(error = %e, "An ack of an abandoned run failed; the rewind covers it.");
                Ok(false)
            }
        }
    }
}

/// Spawns the buffer task of `reader` (see [`run`]), reading up to `read_ahead` batches ahead.
pub(crate) fn spawn(
    reader: Reader,
    buffer: &ferry_buffer::Buffer,
    read_size: (u64, u64),
    read_ahead: usize,
    status: UplinkStatus,
) -> Feed {
    let (seg_tx, segs) = mpsc::channel(read_ahead.max(1));
    let (cmds, cmd_rx) = mpsc::unbounded_channel();
    let (ack_tx, acks) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(
        reader,
        buffer.commits(),
        read_size,
        seg_tx,
        cmd_rx,
        ack_tx,
        status,
    ));
    Feed {
        segs,
        cmds,
        acks,
        task,
    }
}

/// Stops a buffer task whose command sender is gone: it finishes the commits it was sent,
/// until `deadline`, and is aborted after that.
pub(crate) async fn finish(
    mut task: tokio::task::JoinHandle<()>,
    deadline: tokio::time::Instant,
    uplink: &str,
) {
    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
        tracing::warn!(
            uplink,
            "Shutdown grace ran out while the uplink was committing acks."
        );
        task.abort();
        let _ = task.await;
    }
}

/// Runs until the command channel closes (after finishing what it holds). Each read brings
/// about `read_readings` readings and at most about `read_bytes` stored bytes (at least one
/// segment, at most [`MAX_READ_SEGMENTS`]), judged from the size of the segments read last.
/// Reads stop when the segment channel closes, and after a read error or the buffer's closing
/// until the next rewind.
pub(crate) async fn run(
    mut reader: Reader,
    mut commits: watch::Receiver<u64>,
    (read_readings, read_bytes): (u64, u64),
    segs: mpsc::Sender<Batch>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    acks: mpsc::UnboundedSender<Acked>,
    status: UplinkStatus,
) {
    let mut state = State {
        status,
        epoch: 0,
        reading: true,
        ack_failed: false,
    };
    let mut next_cmd: Option<Cmd> = None;
    // Segments per read; starts at one, until the segments' size is known.
    let mut read_max = 1;
    // The buffer closed: the next read answers `Closed`.
    let mut closed = false;
    loop {
        // Commands first: they are small and keep the acks prompt.
        if next_cmd.is_none() {
            next_cmd = match cmds.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            };
        }
        if let Some(c) = next_cmd.take() {
            next_cmd = state.handle(&mut reader, c, &mut cmds, &acks).await;
            continue;
        }
        if !state.reading || segs.is_closed() {
            match cmds.recv().await {
                Some(c) => next_cmd = Some(c),
                None => return,
            }
            continue;
        }
        // Wait for room in the read-ahead channel, or a command.
        let permit = tokio::select! {
            biased;
            c = cmds.recv() => {
                match c {
                    Some(c) => next_cmd = Some(c),
                    None => return,
                }
                continue;
            }
            p = segs.reserve() => match p {
                Ok(p) => p,
                Err(_) => continue,
            },
        };
        if closed {
            state.reading = false;
            permit.send((state.epoch, Err(ReadError::Closed)));
            continue;
        }
        // Seen before reading, so a commit after the read wakes the wait below.
        commits.borrow_and_update();
        match reader.try_next(read_max).await {
            Ok(got) if !got.is_empty() => {
                // Aim the next read at `read_readings`, from the size of these segments.
                let readings: usize = got.iter().map(|s| s.readings.len()).sum();
                let bytes: usize = got.iter().map(|s| s.stored.len()).sum();
                let per = (readings / got.len()).max(1) as u64;
                let per_bytes = (bytes / got.len()).max(1) as u64;
                // A failing uplink reads a probe's worth at a time (crate::retry).
                let target = crate::retry::window_readings(&state.status, read_readings);
                read_max = (target / per)
                    .min(read_bytes / per_bytes)
                    .clamp(1, MAX_READ_SEGMENTS as u64) as usize;
                permit.send((state.epoch, Ok(got)))
            }
            Ok(_) => {
                drop(permit);
                tokio::select! {
                    biased;
                    c = cmds.recv() => match c {
                        Some(c) => next_cmd = Some(c),
                        None => return,
                    },
                    r = commits.changed() => closed = r.is_err(),
                }
            }
            Err(e) => {
                state.reading = false;
                permit.send((state.epoch, Err(e)));
            }
        }
    }
}

struct State {
    status: UplinkStatus,
    epoch: u64,
    reading: bool,
    ack_failed: bool,
}

impl State {
    /// Handles `cmd`, folding the acks queued right behind it into one commit. Returns a
    /// command taken off the channel but not handled yet.
    async fn handle(
        &mut self,
        reader: &mut Reader,
        cmd: Cmd,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
        acks: &mpsc::UnboundedSender<Acked>,
    ) -> Option<Cmd> {
        match cmd {
            Cmd::Rewind { epoch } => {
                reader.rewind();
                self.epoch = epoch;
                self.ack_failed = false;
                self.reading = true;
                None
            }
            Cmd::Ack { epoch, mut settled } => {
                // Fold the acks of the same epoch already queued: one commit for all of them.
                let mut folded = 1usize;
                let mut next = None;
                while let Ok(c) = cmds.try_recv() {
                    match c {
                        Cmd::Ack {
                            epoch: e,
                            settled: more,
                        } if e == epoch => {
                            settled.merge(more);
                            folded += 1;
                        }
                        other => {
                            next = Some(other);
                            break;
                        }
                    }
                }
                let result = if self.ack_failed {
                    AckResult::Skipped
                } else {
                    let Settled {
                        ack_to,
                        delivered,
                        skipped,
                        dead,
                    } = settled;
                    let dead_n = dead.len() as u64;
                    let reason = dead.first().map(|d| d.1.clone());
                    let mut r = Ok(());
                    if !dead.is_empty() {
                        r = reader.dead_letter(dead).await;
                    }
                    if r.is_ok() {
                        r = reader.ack(ack_to).await;
                    }
                    match r {
                        Ok(()) => {
                            if let Some(reason) = reason {
                                self.status.record_dead_lettered(dead_n, &reason);
                            }
                            self.status.record_acked(delivered, skipped);
                            AckResult::Done(delivered)
                        }
                        Err(e) => {
                            self.ack_failed = true;
                            AckResult::Failed(e)
                        }
                    }
                };
                // One answer per command: the ones folded into the commit only say so, the
                // last carries the result.
                for _ in 1..folded {
                    let rest = match &result {
                        AckResult::Done(_) => AckResult::Folded,
                        _ => AckResult::Skipped,
                    };
                    let _ = acks.send(Acked {
                        epoch,
                        result: rest,
                    });
                }
                let _ = acks.send(Acked { epoch, result });
                next
            }
        }
    }
}
