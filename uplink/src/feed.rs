//! The buffer side of the Kafka uplink: one task owns the buffer [`Reader`], reads (and
//! decodes) segments ahead of the producer into a bounded channel, and commits dead letters
//! and acks strictly in the order the run loop sends them, so neither the reads nor the
//! commits (an fsync each) hold up the run loop.
//!
//! Order is kept by the one command channel: an ack is committed only after every command sent
//! before it, and a [`Cmd::Rewind`] takes effect only after the acks sent before it were
//! committed (or failed), so rewinding goes back to exactly the last committed ack. After a
//! failed commit, later acks are skipped until the next rewind: acking a later segment would
//! also ack the one whose commit (say, its dead letters) failed.

use crate::status::UplinkStatus;
use ferry_buffer::{AckError, ReadError, Reader, Reading, Segment};
use tokio::sync::{mpsc, watch};

/// A request to the buffer task.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// Dead-letter `dead` (if any), then ack every segment up to and including `to`.
    Ack {
        epoch: u64,
        to: u64,
        delivered: u64,
        dead: Vec<(Reading, String)>,
    },
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
    /// Committed (and counted in the status).
    Done,
    /// The commit failed; nothing after the last committed ack counts.
    Failed(AckError),
    /// Not attempted: an earlier commit of the same epoch failed.
    Skipped,
    /// Committed as part of the next answer's commit.
    Folded,
}

/// Most segments one read brings (one read transaction, decoded on a blocking thread).
const MAX_READ_SEGMENTS: usize = 256;

/// Segments read, tagged with the epoch they were read in.
pub(crate) type Batch = (u64, Result<Vec<Segment>, ReadError>);

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
                read_max = (read_readings / per)
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
            Cmd::Ack {
                epoch,
                mut to,
                mut delivered,
                mut dead,
            } => {
                // Fold the acks of the same epoch already queued: one commit for all of them.
                let mut folded = 1usize;
                let mut next = None;
                while let Ok(c) = cmds.try_recv() {
                    match c {
                        Cmd::Ack {
                            epoch: e,
                            to: t,
                            delivered: d,
                            dead: more,
                        } if e == epoch => {
                            to = to.max(t);
                            delivered += d;
                            dead.extend(more);
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
                    let dead_n = dead.len() as u64;
                    let reason = dead.first().map(|d| d.1.clone());
                    let mut r = Ok(());
                    if !dead.is_empty() {
                        r = reader.dead_letter(dead).await;
                    }
                    if r.is_ok() {
                        r = reader.ack(to).await;
                    }
                    match r {
                        Ok(()) => {
                            if let Some(reason) = reason {
                                self.status.record_dead_lettered(dead_n, &reason);
                            }
                            self.status.record_acked(delivered);
                            AckResult::Done
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
                        AckResult::Done => AckResult::Folded,
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
