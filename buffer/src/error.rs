//! Error types, one enum per operation. Errors that reject readings hand them back.

use crate::reading::Reading;
use std::path::PathBuf;

/// Why the storage layer failed. Kept as text plus a class so it can be cloned to every waiter
/// of a failed group commit.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StorageFailure {
    /// What kind of failure this is.
    pub kind: StorageFailureKind,
    /// redb's or the OS's message.
    pub message: String,
}

/// The class of a storage failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageFailureKind {
    /// The disk (or the filesystem's quota) is full.
    DiskFull,
    /// Any other I/O error.
    Io,
    /// redb reported corruption.
    Corrupted,
    /// Anything else redb reported.
    Other,
}

impl StorageFailure {
    pub(crate) fn from_redb(e: impl Into<redb::Error>) -> Self {
        let e: redb::Error = e.into();
        let kind = match &e {
            redb::Error::Io(io) if is_disk_full(io) => StorageFailureKind::DiskFull,
            redb::Error::Io(_) | redb::Error::PreviousIo => StorageFailureKind::Io,
            redb::Error::Corrupted(_) => StorageFailureKind::Corrupted,
            _ => StorageFailureKind::Other,
        };
        StorageFailure {
            kind,
            message: e.to_string(),
        }
    }

    pub(crate) fn io(e: &std::io::Error) -> Self {
        StorageFailure {
            kind: if is_disk_full(e) {
                StorageFailureKind::DiskFull
            } else {
                StorageFailureKind::Io
            },
            message: e.to_string(),
        }
    }
}

fn full_text(used: u64, max: u64, disk_reserve: bool, n: usize) -> String {
    if disk_reserve {
        format!(
            "the disk is down to the space ferry keeps free (buffer.min_free_bytes): the buffer \
             may hold {max} bytes and holds {used}, and when_full = \"reject\"; {n} readings refused"
        )
    } else {
        format!(
            "buffer is full ({used} of {max} bytes used) and when_full = \"reject\"; {n} readings refused"
        )
    }
}

pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || e.raw_os_error() == Some(28) // ENOSPC
        || e.raw_os_error() == Some(122) // EDQUOT
}

/// Why an append was refused. Every variant hands the readings back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The buffer is at `max_bytes`, or at what the disk reserve leaves it
    /// ([`crate::disk_reserve`]), and `when_full = "reject"`.
    #[error("{}", full_text(*used, *max, *disk_reserve, readings.len()))]
    Full {
        /// The refused readings.
        readings: Vec<Reading>,
        /// Bytes in use.
        used: u64,
        /// The cap: `max_bytes`, or the room the disk reserve leaves.
        max: u64,
        /// The disk reserve (`min_free_bytes`), not `max_bytes`, was the limit.
        disk_reserve: bool,
    },
    /// The readings alone are larger than the whole buffer cap.
    #[error("{} readings take {bytes} bytes, more than the whole buffer cap of {max} bytes", readings.len())]
    TooLarge {
        /// The refused readings.
        readings: Vec<Reading>,
        /// Their encoded size.
        bytes: u64,
        /// The cap.
        max: u64,
    },
    /// The commit failed on disk. Nothing of this append was stored.
    #[error("buffer could not write to disk: {source}")]
    Storage {
        /// The readings that were not stored.
        readings: Vec<Reading>,
        /// The failure.
        source: StorageFailure,
    },
    /// The buffer is shut down.
    #[error("buffer is shut down")]
    Closed {
        /// The readings that were not stored.
        readings: Vec<Reading>,
    },
}

impl AppendError {
    /// The readings that were not stored.
    pub fn into_readings(self) -> Vec<Reading> {
        match self {
            AppendError::Full { readings, .. }
            | AppendError::TooLarge { readings, .. }
            | AppendError::Storage { readings, .. }
            | AppendError::Closed { readings } => readings,
        }
    }

    /// The readings that were not stored, by reference.
    pub fn readings(&self) -> &[Reading] {
        match self {
            AppendError::Full { readings, .. }
            | AppendError::TooLarge { readings, .. }
            | AppendError::Storage { readings, .. }
            | AppendError::Closed { readings } => readings,
        }
    }
}

/// Why opening the buffer failed. Corruption is not an error: the file is quarantined and a
/// fresh buffer starts (see [`crate::BufferStats::quarantined`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The data directory could not be created or used.
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process has the buffer open for writing.
    #[error(
        "buffer {path} is already open in another process (is another ferry running on this data_dir?)"
    )]
    InUse {
        /// The buffer file.
        path: PathBuf,
    },
    /// The file was written by a newer ferry whose format this version cannot read.
    #[error(
        "buffer {path} has format version {found}, this ferry reads up to {supported}; \
         upgrade ferry, or move the file aside to start empty"
    )]
    UnsupportedFormat {
        /// The buffer file.
        path: PathBuf,
        /// Version in the file.
        found: u64,
        /// Newest version this build reads.
        supported: u64,
    },
    /// A corrupt file could not be moved aside.
    #[error("buffer {path} is corrupt ({reason}) and could not be moved aside: {source}")]
    Quarantine {
        /// The buffer file.
        path: PathBuf,
        /// Why it was judged corrupt.
        reason: String,
        /// The OS error from the move.
        source: std::io::Error,
    },
    /// The storage failed while opening.
    #[error("cannot open buffer {path}: {source}")]
    Storage {
        /// The buffer file.
        path: PathBuf,
        /// The failure.
        source: StorageFailure,
    },
    /// The options are inconsistent.
    #[error("invalid buffer options: {0}")]
    Options(String),
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The storage failed.
    #[error("cannot read buffer: {0}")]
    Storage(#[from] StorageFailure),
    /// The consumer name is not one of the enabled consumers.
    #[error("unknown buffer consumer '{0}' (enabled consumers are set when the buffer opens)")]
    UnknownConsumer(String),
    /// The buffer is shut down.
    #[error("buffer is shut down")]
    Closed,
}

/// Why an ack, dead-letter or requeue failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The storage failed; the ack can be retried.
    #[error("cannot record ack in buffer: {0}")]
    Storage(#[from] StorageFailure),
    /// The segment id is beyond anything committed.
    #[error("cannot ack segment {segment}: the newest committed segment is {newest}")]
    Ahead {
        /// Segment id given.
        segment: u64,
        /// Newest segment id.
        newest: u64,
    },
    /// The buffer is shut down.
    #[error("buffer is shut down")]
    Closed,
}

/// Why [`crate::Inspector::consistent`] has no view.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// The file could not be opened.
    #[error(transparent)]
    Open(OpenError),
    /// It was opened, but reading it failed.
    #[error(transparent)]
    Read(ReadError),
    /// The running gateway committed during every attempt.
    #[error(
        "the running gateway committed while the file was read, {attempts} times in a row; try again"
    )]
    Busy {
        /// Attempts made.
        attempts: usize,
    },
}
