//! Helpers shared by the buffer's integration tests, including a fault-injecting redb
//! storage backend.
#![allow(dead_code)]

use ferry_buffer::{BackendFactory, BufferOptions, Compression, Reading, Source};
use redb::StorageBackend;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn opts(consumers: &[&str]) -> BufferOptions {
    BufferOptions {
        flush_interval: Duration::ZERO,
        compression: Compression::None,
        consumers: consumers.iter().map(|s| s.to_string()).collect(),
        cache_bytes: 1 << 20,
        ..BufferOptions::default()
    }
}

pub fn reading(i: usize, len: usize) -> Reading {
    let mut payload = format!("{{\"seq\":{i},\"v\":");
    while payload.len() < len.saturating_sub(1) {
        payload.push('7');
    }
    payload.push('}');
    Reading::new(
        Source::Mqtt,
        format!("dev-{}", i % 5),
        format!("s/dev-{}/t", i % 5),
        payload,
    )
}

/// What the fault backend should do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fault {
    #[default]
    None,
    /// Every write and sync fails with ENOSPC.
    DiskFull,
    /// Power loss: the sync in progress and every later one fail, and nothing reaches the
    /// durable image any more.
    Frozen,
}

/// An in-memory disk that models fsync: writes land in `volatile`; `sync_data` copies them to
/// `durable`. A crash image is `durable` plus an arbitrary subset of the writes since.
#[derive(Debug, Default)]
pub struct Disk {
    pub volatile: Vec<u8>,
    pub durable: Vec<u8>,
    /// Writes since the last successful sync, in order.
    pub pending: Vec<(u64, Vec<u8>)>,
    pub pending_len: Option<u64>,
    pub syncs: u64,
    /// Freeze at this sync number (1-based).
    pub freeze_at_sync: Option<u64>,
    pub fault: Fault,
}

impl Disk {
    /// The file a restart would see: durable state plus each unsynced write kept or lost
    /// according to `keep`.
    pub fn crash_image(&self, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let mut img = self.durable.clone();
        if let Some(len) = self.pending_len {
            img.resize(len as usize, 0);
        }
        for (i, (off, data)) in self.pending.iter().enumerate() {
            if keep(i) {
                let end = *off as usize + data.len();
                if img.len() < end {
                    img.resize(end, 0);
                }
                img[*off as usize..end].copy_from_slice(data);
            }
        }
        img
    }
}

#[derive(Debug, Clone)]
pub struct FaultBackend(pub Arc<Mutex<Disk>>);

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl StorageBackend for FaultBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().volatile.len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let end = offset as usize + out.len();
        if end > d.volatile.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            ));
        }
        out.copy_from_slice(&d.volatile[offset as usize..end]);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        if d.fault == Fault::DiskFull && len > d.volatile.len() as u64 {
            return Err(enospc());
        }
        d.volatile.resize(len as usize, 0);
        if d.fault != Fault::Frozen {
            d.pending_len = Some(len);
        }
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        match d.fault {
            Fault::DiskFull => return Err(enospc()),
            // The machine is dead: no sync after the power loss ever completes, so nothing
            // after it can be acknowledged.
            Fault::Frozen => return Err(io::Error::other("power lost")),
            Fault::None => {}
        }
        d.syncs += 1;
        if d.freeze_at_sync == Some(d.syncs) {
            // The power goes during this sync: it never completes.
            d.fault = Fault::Frozen;
            return Err(io::Error::other("power lost"));
        }
        d.durable = d.volatile.clone();
        d.pending.clear();
        d.pending_len = None;
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        if d.fault == Fault::DiskFull {
            return Err(enospc());
        }
        let end = offset as usize + data.len();
        if d.volatile.len() < end {
            d.volatile.resize(end, 0);
        }
        d.volatile[offset as usize..end].copy_from_slice(data);
        if d.fault != Fault::Frozen {
            d.pending.push((offset, data.to_vec()));
        }
        Ok(())
    }
}

pub fn factory(disk: Arc<Mutex<Disk>>) -> BackendFactory {
    Arc::new(move || Ok(Box::new(FaultBackend(disk.clone())) as Box<dyn StorageBackend>))
}

/// [`reading`], received now by `clock`'s wall clock.
pub fn reading_at(i: usize, len: usize, clock: &ferry_buffer::ManualClock) -> Reading {
    use ferry_buffer::ClockSource;
    let mut r = reading(i, len);
    r.received_at_ms = clock.now().wall_ms;
    r
}
