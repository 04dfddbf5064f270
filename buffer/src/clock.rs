//! Time on a box without a battery-backed clock.
//!
//! A Raspberry Pi boots at the time fake-hwclock saved at its last shutdown (or at 1970) and
//! keeps that wrong wall clock until NTP synchronizes it, which on a site whose uplink is down
//! can take hours. Then the clock jumps. This module is the one place that knows how ferry
//! deals with that; everything else asks it.
//!
//! ## What is recorded
//! - **Whether the wall clock is synchronized**: the kernel's own verdict through
//!   `adjtimex(2)` (a read-only call), the same one `timedatectl show -p NTPSynchronized`
//!   reads, so it holds for systemd-timesyncd, chrony and ntpd alike. As systemd does, the
//!   clock counts as synchronized while the kernel's maximum error estimate is below 16 s.
//! - **The boot**: `/proc/sys/kernel/random/boot_id`, kept in the buffer's `boots` table as a
//!   small boot index (1, 2, …; 0 means "written by a ferry that did not record it").
//! - **The boot clock** (`CLOCK_BOOTTIME`): milliseconds since boot, counting suspend, never
//!   stepped.
//!
//! Every reading is stamped at its commit with a [`ClockStamp`]: the boot index, the boot
//! clock, and whether the wall clock was synchronized then ([`ClockMark`]). The clocks are read
//! when the group commit starts; a reading's boot clock is the instant of its own
//! `received_at_ms` by that reading (so the moment of receipt, and a SenML relative time keeps
//! its offset), except for a device's own timestamp ([`ClockMark::Device`]), which gets the
//! commit's boot clock.
//!
//! ## Correcting times
//! The first time the wall clock is seen synchronized during a boot, the pair (boot clock,
//! wall clock) is saved for that boot in the `boots` table. From then on, a reading of that
//! boot received before the sync gets, on its way out of the buffer (see
//! [`crate::Reader::next`]), the corrected time
//! `wall_at_sync − (boot_clock_at_sync − boot_clock_at_receipt)` and the mark
//! [`ClockMark::Corrected`]. A reading from a boot that never synchronized keeps its time and
//! stays [`ClockMark::Unsynced`]: its boot clock means nothing against another boot's.
//!
//! ## Ages
//! TTL, "oldest waiting" and the status page's ages never subtract two raw wall-clock times:
//! - within the current boot, an age is a difference of the boot clock;
//! - across boots, it is the current (synchronized) wall clock minus the reading's corrected
//!   time; when either side cannot be vouched for (an earlier boot that never synchronized, or
//!   a wall clock that is not synchronized now), the age is unknown, and the TTL keeps the
//!   reading rather than drop it on a guess.
//!
//! A step of the wall clock against the boot clock of more than [`JUMP_THRESHOLD_MS`] is a
//! jump: logged once, counted in `ferry_clock_jumps_total`, shown on the status page.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A step of the wall clock against the boot clock larger than this is reported as a jump.
/// NTP slews small errors (at most 0.5 ms/s), so this only catches steps.
pub const JUMP_THRESHOLD_MS: i64 = 2_000;

/// One look at the clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockNow {
    /// Wall clock, ms since the Unix epoch.
    pub wall_ms: u64,
    /// Boot clock (`CLOCK_BOOTTIME`), ms since boot.
    pub boottime_ms: u64,
    /// Whether the kernel says the wall clock is synchronized.
    pub synced: bool,
}

/// Where ferry gets the time. [`SystemClock`] in production; [`ManualClock`] lets tests
/// drive an unsynchronized boot, a sync with a jump, and a reboot.
pub trait ClockSource: Send + Sync + std::fmt::Debug + 'static {
    /// The clocks now.
    fn now(&self) -> ClockNow;
    /// An id that is the same for the whole boot and differs between boots.
    fn boot_id(&self) -> String;
}

/// The system's clocks: `CLOCK_REALTIME`, `CLOCK_BOOTTIME`, `adjtimex(2)` and the kernel's
/// boot id.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock {
    /// Treat the wall clock as always synchronized (`gateway.clock_sync = "assume"`): for
    /// VMs and containers whose host keeps the time while their kernel flag says otherwise.
    pub assume_synced: bool,
}

impl ClockSource for SystemClock {
    fn now(&self) -> ClockNow {
        ClockNow {
            wall_ms: crate::now_ms(),
            boottime_ms: sys::boottime_ms(),
            synced: self.assume_synced || sys::synchronized(),
        }
    }

    fn boot_id(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            // Without a boot id every start looks like a new boot: earlier readings are then
            // never corrected with this boot's offset, which is the safe side.
            .unwrap_or_else(|| format!("unknown-{}", crate::now_ms()))
    }
}

/// The boot clock now (`CLOCK_BOOTTIME`, ms): for stamping in-process events whose age must
/// survive a step of the wall clock.
pub fn boottime_ms() -> u64 {
    sys::boottime_ms()
}

/// The wall time of the boot-clock instant `bt`, by the wall clock now: the age stays right
/// when the wall clock is stepped, and after a sync the time shown is the corrected one.
pub fn wall_of_boottime(bt: u64) -> u64 {
    crate::now_ms().saturating_sub(boottime_ms().saturating_sub(bt))
}

/// The wall time `bt` ms of boot clock from now (a future boot-clock instant).
pub fn wall_of_future_boottime(bt: u64) -> u64 {
    crate::now_ms() + bt.saturating_sub(boottime_ms())
}

/// The system calls behind [`SystemClock`].
mod sys {
    /// Milliseconds since boot, including suspend.
    pub(super) fn boottime_ms() -> u64 {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
    }

    /// The kernel's view, as systemd's `ntp_synced()` reads it: a maximum error below 16 s.
    #[cfg(target_os = "linux")]
    // unsafe: adjtimex(2) has no safe wrapper in libc, rustix or nix. With `modes` zero it
    // only reads; the struct is plain integers, so all-zero is a valid value.
    #[allow(unsafe_code)]
    pub(super) fn synchronized() -> bool {
        // SAFETY: `timex` is a C struct of integers (all-zero is valid); adjtimex writes only
        // into the struct we pass, and with modes = 0 changes nothing in the kernel.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        let state = unsafe { libc::adjtimex(&mut tx) };
        state >= 0 && state != libc::TIME_ERROR && tx.maxerror < 16_000_000
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn synchronized() -> bool {
        true
    }
}

/// A clock that tests move by hand. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<ManualState>>);

#[derive(Debug)]
struct ManualState {
    now: ClockNow,
    boot_id: String,
}

impl ManualClock {
    /// A boot `boot_id` that is `boottime_ms` old, with the wall clock at `wall_ms`.
    pub fn new(boot_id: &str, wall_ms: u64, boottime_ms: u64, synced: bool) -> Self {
        ManualClock(Arc::new(Mutex::new(ManualState {
            now: ClockNow {
                wall_ms,
                boottime_ms,
                synced,
            },
            boot_id: boot_id.to_string(),
        })))
    }

    fn with<T>(&self, f: impl FnOnce(&mut ManualState) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Time passes: both clocks move by `ms`.
    pub fn advance(&self, ms: u64) {
        self.with(|s| {
            s.now.wall_ms += ms;
            s.now.boottime_ms += ms;
        })
    }

    /// The wall clock is stepped (NTP's first sync, an operator's `date -s`); the boot clock
    /// does not move.
    pub fn step_wall(&self, delta_ms: i64) {
        self.with(|s| s.now.wall_ms = s.now.wall_ms.saturating_add_signed(delta_ms))
    }

    /// The kernel's synchronized flag.
    pub fn set_synced(&self, synced: bool) {
        self.with(|s| s.now.synced = synced)
    }

    /// A reboot: a new boot id, the boot clock starts again at `boottime_ms`, and the wall
    /// clock is whatever the box comes up with.
    pub fn reboot(&self, boot_id: &str, wall_ms: u64, boottime_ms: u64, synced: bool) {
        self.with(|s| {
            s.boot_id = boot_id.to_string();
            s.now = ClockNow {
                wall_ms,
                boottime_ms,
                synced,
            };
        })
    }
}

impl ClockSource for ManualClock {
    fn now(&self) -> ClockNow {
        self.with(|s| s.now)
    }
    fn boot_id(&self) -> String {
        self.with(|s| s.boot_id.clone())
    }
}

/// What a reading's time can be trusted for; carried upstream as `ferry-clock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ClockMark {
    /// Written by a ferry that did not record the clock (buffer format 1). The time is the
    /// wall clock at receipt, whatever it was.
    #[default]
    Unknown,
    /// The wall clock was synchronized at receipt.
    Synced,
    /// The wall clock was not synchronized at receipt, and no later sync of that boot is
    /// known: the time may be hours or years off.
    Unsynced,
    /// Received before the sync; the time was corrected from the boot clock and the sync.
    Corrected,
    /// The time is the device's own timestamp (an ingest format that carries one).
    Device,
}

impl ClockMark {
    /// The value of the `ferry-clock` header / attribute / envelope field.
    pub fn as_str(self) -> &'static str {
        match self {
            ClockMark::Unknown => "unknown",
            ClockMark::Synced => "synced",
            ClockMark::Unsynced => "unsynced",
            ClockMark::Corrected => "corrected",
            ClockMark::Device => "device",
        }
    }

    /// Every mark.
    pub const ALL: [ClockMark; 5] = [
        ClockMark::Unknown,
        ClockMark::Synced,
        ClockMark::Unsynced,
        ClockMark::Corrected,
        ClockMark::Device,
    ];

    /// The mark named by [`ClockMark::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    pub(crate) fn to_byte(self) -> u8 {
        match self {
            ClockMark::Unknown => 0,
            ClockMark::Synced => 1,
            ClockMark::Unsynced => 2,
            ClockMark::Corrected => 3,
            ClockMark::Device => 4,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => ClockMark::Unknown,
            1 => ClockMark::Synced,
            2 => ClockMark::Unsynced,
            3 => ClockMark::Corrected,
            4 => ClockMark::Device,
            _ => return None,
        })
    }
}

/// The clock at a reading's receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockStamp {
    /// Boot index (the buffer's `boots` table); 0 when not recorded.
    pub boot: u32,
    /// Boot clock at receipt, ms.
    pub boottime_ms: u64,
    /// What the time can be trusted for.
    pub mark: ClockMark,
}

/// A boot's sync point: the boot clock and the (synchronized) wall clock at the same moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyncPoint {
    pub boottime_ms: u64,
    pub wall_ms: u64,
}

impl SyncPoint {
    /// The wall time of boot-clock instant `boottime_ms` of the same boot.
    pub(crate) fn wall_at(&self, boottime_ms: u64) -> u64 {
        let back = self.boottime_ms as i128 - boottime_ms as i128;
        (self.wall_ms as i128 - back).clamp(0, u64::MAX as i128) as u64
    }

    pub(crate) fn encode(&self, boot_id: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + boot_id.len());
        v.extend_from_slice(&self.boottime_ms.to_le_bytes());
        v.extend_from_slice(&self.wall_ms.to_le_bytes());
        v.extend_from_slice(boot_id.as_bytes());
        v
    }
}

/// Encodes a `boots` row: `u64 sync boot clock | u64 sync wall (0: not synchronized) | boot id`.
pub(crate) fn encode_boot(boot_id: &str, sync: Option<SyncPoint>) -> Vec<u8> {
    sync.unwrap_or(SyncPoint {
        boottime_ms: 0,
        wall_ms: 0,
    })
    .encode(boot_id)
}

/// What the `boots` table says: every boot's sync point, and the last boot (index, boot id).
pub(crate) type Boots = (BTreeMap<u32, SyncPoint>, Option<(u32, String)>);

/// Reads the `boots` table ([`Boots`]).
pub(crate) fn read_boots(
    t: &impl redb::ReadableTable<u32, &'static [u8]>,
) -> Result<Boots, redb::StorageError> {
    let mut sync = BTreeMap::new();
    let mut last = None;
    for e in t.iter()? {
        let (k, v) = e?;
        let (id, sp) = decode_boot(v.value());
        if let Some(sp) = sp {
            sync.insert(k.value(), sp);
        }
        last = Some((k.value(), id));
    }
    Ok((sync, last))
}

/// Decodes a `boots` row.
pub(crate) fn decode_boot(v: &[u8]) -> (String, Option<SyncPoint>) {
    if v.len() < 16 {
        return (String::new(), None);
    }
    let u = |o: usize| u64::from_le_bytes(v[o..o + 8].try_into().unwrap_or([0; 8]));
    let sync = (u(8) != 0).then(|| SyncPoint {
        boottime_ms: u(0),
        wall_ms: u(8),
    });
    (String::from_utf8_lossy(&v[16..]).into_owned(), sync)
}

/// Corrects `r` with the sync points `sync` of its gateway's boots, as [`Clock::correct`]
/// does. Returns whether it changed.
pub(crate) fn correct_with(sync: &BTreeMap<u32, SyncPoint>, r: &mut crate::Reading) -> bool {
    // An imported reading's boot is another gateway's (it was corrected there, on export).
    if r.clock.mark != ClockMark::Unsynced || r.origin.is_some() {
        return false;
    }
    let Some(sp) = sync.get(&r.clock.boot) else {
        return false;
    };
    r.received_at_ms = sp.wall_at(r.clock.boottime_ms);
    r.clock.mark = ClockMark::Corrected;
    true
}

/// The clock as the status page and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClockStatus {
    /// Whether the wall clock is synchronized now.
    pub synchronized: bool,
    /// Time since boot, ms.
    pub since_boot_ms: u64,
    /// This boot's index in the buffer.
    pub boot: u32,
    /// When this boot first saw the clock synchronized, as ms since boot.
    pub synced_at_boottime_ms: Option<u64>,
    /// Jumps of the wall clock seen since ferry started.
    pub jumps_total: u64,
    /// The last jump: its size in ms (negative: backwards) and the wall time after it.
    pub last_jump: Option<(i64, u64)>,
}

#[derive(Debug, Default)]
struct Inner {
    boot: u32,
    boot_id: String,
    sync: BTreeMap<u32, SyncPoint>,
    unsaved: bool,
    last_offset: Option<i64>,
    synced: Option<bool>,
    jumps: u64,
    last_jump: Option<(i64, u64)>,
}

/// The buffer's clock: the source plus what is known of each boot.
#[derive(Debug)]
pub(crate) struct Clock {
    source: Arc<dyn ClockSource>,
    inner: Mutex<Inner>,
}

impl Clock {
    pub(crate) fn new(source: Arc<dyn ClockSource>) -> Self {
        Clock {
            source,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn boot_id(&self) -> String {
        self.source.boot_id()
    }

    /// Sets what the `boots` table says: this boot's index and every known sync point.
    pub(crate) fn load(&self, boot: u32, boot_id: String, sync: BTreeMap<u32, SyncPoint>) {
        let mut i = self.lock();
        let current_known = sync.contains_key(&boot);
        let seen_now = i.sync.get(&boot).copied().filter(|_| i.boot == boot);
        i.boot = boot;
        i.boot_id = boot_id;
        i.sync = sync;
        // A sync seen before a reopen and not saved yet stays to be saved.
        if let (false, Some(sp)) = (current_known, seen_now) {
            i.sync.insert(boot, sp);
            i.unsaved = true;
        } else {
            i.unsaved = false;
        }
    }

    /// Looks at the clocks: notes a sync point for this boot the first time the wall clock is
    /// synchronized, and reports jumps and sync changes once each.
    pub(crate) fn observe(&self) -> ClockNow {
        let now = self.source.now();
        let mut i = self.lock();
        let offset = now.wall_ms as i64 - now.boottime_ms as i64;
        if let Some(last) = i.last_offset {
            let delta = offset - last;
            if delta.abs() > JUMP_THRESHOLD_MS {
                i.jumps += 1;
                i.last_jump = Some((delta, now.wall_ms));
                metrics::counter!("ferry_clock_jumps_total").increment(1);
                tracing::warn!(
                    jump_ms = delta,
                    "The system clock jumped {} by {}; ferry's ages and TTL follow the boot clock, not the wall clock.",
                    if delta > 0 { "forward" } else { "back" },
                    human_ms(delta.unsigned_abs()),
                );
            }
        }
        i.last_offset = Some(offset);
        match (i.synced, now.synced) {
            // The usual start: nothing to say.
            (None, true) => {}
            (None, false) => tracing::warn!(
                since_boot = %human_ms(now.boottime_ms),
                "The system clock is not synchronized; readings are marked `ferry-clock: unsynced` until it is, then sent with corrected times."
            ),
            (Some(false), true) => tracing::info!(
                since_boot = %human_ms(now.boottime_ms),
                "The system clock is synchronized now; readings received before are sent with corrected times."
            ),
            (Some(true), false) => tracing::warn!(
                "The system clock lost its synchronization; new readings are marked `ferry-clock: unsynced` until it is back."
            ),
            _ => {}
        }
        if i.synced != Some(now.synced) {
            i.synced = Some(now.synced);
            metrics::gauge!("ferry_clock_synchronized").set(if now.synced { 1.0 } else { 0.0 });
        }
        let boot = i.boot;
        if now.synced && boot != 0 && !i.sync.contains_key(&boot) {
            i.sync.insert(
                boot,
                SyncPoint {
                    boottime_ms: now.boottime_ms,
                    wall_ms: now.wall_ms,
                },
            );
            i.unsaved = true;
        }
        now
    }

    /// This boot's row for the `boots` table, if its sync point is not saved yet.
    pub(crate) fn unsaved(&self) -> Option<(u32, Vec<u8>)> {
        let i = self.lock();
        if !i.unsaved {
            return None;
        }
        Some((
            i.boot,
            encode_boot(&i.boot_id, i.sync.get(&i.boot).copied()),
        ))
    }

    /// The row returned by [`Clock::unsaved`] was committed.
    pub(crate) fn saved(&self, boot: u32) {
        let mut i = self.lock();
        if i.boot == boot {
            i.unsaved = false;
        }
    }

    /// The stamp for readings committed at `now`.
    pub(crate) fn stamp(&self, now: &ClockNow) -> ClockStamp {
        ClockStamp {
            boot: self.lock().boot,
            boottime_ms: now.boottime_ms,
            mark: if now.synced {
                ClockMark::Synced
            } else {
                ClockMark::Unsynced
            },
        }
    }

    /// The stamp of a reading committed at `now` (`stamp` is [`Clock::stamp`] of it). Its boot
    /// clock is the instant of its `received_at_ms` by the wall clock read at the commit, so
    /// it is the moment of receipt, not of the commit, and an ingest format's relative time
    /// (SenML's `t: -60`) keeps its offset. A device's own timestamp says nothing about the
    /// box's clocks, nor does an imported reading's time: such readings get the commit's boot
    /// clock, and keep their mark.
    pub(crate) fn stamp_reading(
        &self,
        stamp: &ClockStamp,
        now: &ClockNow,
        r: &crate::Reading,
    ) -> ClockStamp {
        if r.clock.mark == ClockMark::Device {
            return ClockStamp {
                mark: ClockMark::Device,
                ..*stamp
            };
        }
        // Imported from another gateway's export: its mark says what its time is worth
        // there; here it is received now (ages and the TTL count from the import).
        if r.origin.is_some() {
            return ClockStamp {
                mark: r.clock.mark,
                ..*stamp
            };
        }
        let offset = now.wall_ms as i128 - now.boottime_ms as i128;
        let at = (r.received_at_ms as i128 - offset).clamp(0, now.boottime_ms as i128);
        ClockStamp {
            boottime_ms: at as u64,
            ..*stamp
        }
    }

    /// Corrects the time of each unsynchronized reading whose boot's sync is known. Returns
    /// whether any changed.
    pub(crate) fn correct(&self, readings: &mut [crate::Reading]) -> bool {
        // The usual case (every reading synced) takes no lock.
        if !readings.iter().any(|r| r.clock.mark == ClockMark::Unsynced) {
            return false;
        }
        let i = self.lock();
        let mut changed = false;
        for r in readings {
            changed |= correct_with(&i.sync, r);
        }
        changed
    }

    /// The age of something received at boot-clock instant `at` (boot index, boot clock), or
    /// at wall time `wall_ms` when the boot was not recorded. `None` when it cannot be known
    /// (see the module doc).
    pub(crate) fn age_ms(
        &self,
        at: Option<(u32, u64)>,
        wall_ms: u64,
        now: &ClockNow,
    ) -> Option<u64> {
        let i = self.lock();
        match at {
            Some((boot, bt)) if boot == i.boot && boot != 0 => {
                Some(now.boottime_ms.saturating_sub(bt))
            }
            Some((boot, bt)) => {
                let w = i.sync.get(&boot)?.wall_at(bt);
                now.synced.then(|| now.wall_ms.saturating_sub(w))
            }
            None => now.synced.then(|| now.wall_ms.saturating_sub(wall_ms)),
        }
    }

    /// The state for the status page.
    pub(crate) fn status(&self) -> ClockStatus {
        let now = self.source.now();
        let i = self.lock();
        ClockStatus {
            synchronized: now.synced,
            since_boot_ms: now.boottime_ms,
            boot: i.boot,
            synced_at_boottime_ms: i.sync.get(&i.boot).map(|s| s.boottime_ms),
            jumps_total: i.jumps,
            last_jump: i.last_jump,
        }
    }

    pub(crate) fn now(&self) -> ClockNow {
        self.source.now()
    }
}

/// "3 d 4 h", "5 h 12 min", "42 s": for log lines.
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_answers() {
        let c = SystemClock::default();
        let a = c.now();
        let b = c.now();
        assert!(b.boottime_ms >= a.boottime_ms);
        assert!(a.wall_ms > 1_600_000_000_000, "{a:?}");
        assert_eq!(c.boot_id(), c.boot_id());
        assert!(
            SystemClock {
                assume_synced: true
            }
            .now()
            .synced
        );
    }

    #[test]
    fn a_sync_point_maps_earlier_boot_clock_instants_back() {
        let sp = SyncPoint {
            boottime_ms: 10_000,
            wall_ms: 1_800_000_000_000,
        };
        assert_eq!(sp.wall_at(4_000), 1_799_999_994_000);
        assert_eq!(sp.wall_at(10_500), 1_800_000_000_500);
        let (id, back) = decode_boot(&encode_boot("b-1", Some(sp)));
        assert_eq!((id.as_str(), back), ("b-1", Some(sp)));
        assert_eq!(decode_boot(&encode_boot("b-2", None)).1, None);
    }

    #[test]
    fn a_jump_is_counted_once_and_a_slew_is_not() {
        let m = ManualClock::new("b", 1_000_000, 5_000, false);
        let c = Clock::new(Arc::new(m.clone()));
        c.load(1, "b".into(), BTreeMap::new());
        c.observe();
        m.advance(1_000);
        m.step_wall(1_500);
        c.observe();
        assert_eq!(c.status().jumps_total, 0);
        m.step_wall(3 * 86_400_000);
        m.set_synced(true);
        c.observe();
        c.observe();
        let st = c.status();
        assert_eq!(st.jumps_total, 1);
        assert_eq!(st.last_jump.map(|j| j.0), Some(3 * 86_400_000));
        assert_eq!(st.synced_at_boottime_ms, Some(6_000));
        assert!(c.unsaved().is_some());
        c.saved(1);
        assert!(c.unsaved().is_none());
    }
}
