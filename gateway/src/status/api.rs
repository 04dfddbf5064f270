//! `GET /api/status`: the status report as JSON. The schema is these structs (utoipa), and it
//! is part of the OpenAPI document at `/v1/openapi.json`.
//!
//! Times are ms since the Unix epoch (`*_ms`) or ages in ms (`*_age_ms`); rates are per second.
//! No secret (token, password) is ever part of it: configured values are not copied, and
//! uplink errors are scrubbed by the uplinks.

use super::StatusState;
use super::history::{self, Totals};
use ferry_buffer::now_ms;
use ferry_uplink::status::{LinkState, UplinkStatus};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The whole status report.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatusReport {
    /// Who and since when.
    pub gateway: GatewayInfo,
    /// The answer to "is data getting out, and if not since when and how much waits".
    pub summary: Summary,
    /// `true` when the buffer is writable and every listener is bound (as `/readyz`).
    pub ready: bool,
    /// Readings coming in.
    pub ingest: Ingest,
    /// One entry per enabled uplink.
    pub uplinks: Vec<Uplink>,
    /// The on-disk buffer.
    pub buffer: BufferInfo,
    /// Readings dropped or refused, by reason.
    pub losses: Losses,
    /// The dead-letter table.
    pub dead_letters: DeadLetters,
    /// The MQTT listener, when enabled.
    pub mqtt: Option<MqttInfo>,
    /// Recently seen devices.
    pub devices: Devices,
    /// The file system holding `gateway.data_dir`.
    pub disk: Option<Disk>,
    /// Corrupt buffer files moved aside.
    pub quarantine: Quarantine,
    /// The system clock, as ferry trusts it.
    pub clock: ClockInfo,
    /// Bound listeners: name to address.
    pub listeners: BTreeMap<String, String>,
}

/// Who and since when.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GatewayInfo {
    /// `gateway.id`.
    pub id: String,
    /// ferry's version.
    pub version: String,
    /// When this process started.
    pub started_ms: u64,
    /// Seconds since then.
    pub uptime_secs: f64,
    /// When this report was made.
    pub now_ms: u64,
}

/// How things stand, in one word and one sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Every uplink is connected and acking; nothing is stuck.
    Ok,
    /// Starting, or no uplink is enabled: nothing is wrong yet.
    Idle,
    /// An uplink is stalled or backing off, or the buffer is nearly full.
    Warn,
    /// Data is not getting out (an uplink is offline), or the buffer cannot write.
    Down,
}

/// The headline of the page.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Summary {
    /// Overall level.
    pub level: Level,
    /// One sentence for a person, e.g. "Data is not getting out to kafka since 14:02:11 UTC
    /// (3 min ago): 1 234 readings (2.1 MB) wait, the oldest for 3 min."
    pub headline: String,
    /// Whether every uplink is connected and not stalled (false with no uplink).
    pub data_out: bool,
    /// Since when data is not getting out (the last ack of the worst uplink, or the start),
    /// when it is not.
    pub not_out_since_ms: Option<u64>,
    /// Readings waiting for the slowest uplink.
    pub waiting_readings: u64,
    /// Their bytes.
    pub waiting_bytes: u64,
    /// Age of the oldest of them.
    pub oldest_waiting_age_ms: Option<u64>,
}

/// Readings coming in.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Ingest {
    /// Readings committed since start, by source (`mqtt`, `http`, and `mqtt-will` or
    /// `requeue` when non-zero).
    pub total_by_source: BTreeMap<String, u64>,
    /// All sources together.
    pub total: u64,
    /// Readings per second over the last 10 s, by source.
    pub rate_by_source: BTreeMap<String, f64>,
    /// All sources together.
    pub rate: f64,
    /// Readings removed from the buffer after every uplink acked them, per second over 10 s.
    pub forwarded_rate: f64,
    /// The chart: 10-second buckets over the last 15 minutes, oldest first; the last one is
    /// still open.
    pub history: Vec<HistoryBucket>,
}

/// One chart bucket.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryBucket {
    /// Start of the bucket.
    pub start_ms: u64,
    /// Its length (10 000 ms except for the open bucket).
    pub duration_ms: u64,
    /// Readings received during it, by source.
    pub received: BTreeMap<String, u64>,
    /// Readings forwarded (acked by every uplink) during it.
    pub forwarded: u64,
}

/// Connection state of an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UplinkState {
    /// Started, nothing confirmed yet.
    Connecting,
    /// The last delivery was confirmed.
    Connected,
    /// A delivery failed; waiting before the next try.
    BackingOff,
    /// Repeated failures, or every broker down.
    Offline,
}

/// One uplink.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Uplink {
    /// The name of its `[uplinks.NAME]` table (also its buffer cursor).
    pub name: String,
    /// Its type: `kafka` or `mqtt`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Connection state.
    pub state: UplinkState,
    /// Connected, readings wait, and nothing was acked for `status.stalled_after_secs`: the
    /// peer looks fine but nothing moves.
    pub stalled: bool,
    /// The most recent error, secrets removed.
    pub last_error: Option<String>,
    /// When a delivery was last confirmed.
    pub last_ack_ms: Option<u64>,
    /// How long ago.
    pub last_ack_age_ms: Option<u64>,
    /// When the next retry is due, while backing off.
    pub next_retry_ms: Option<u64>,
    /// Readings confirmed upstream since start.
    pub acked_total: u64,
    /// Readings its `topics` do not take, passed over since start.
    pub skipped_total: u64,
    /// Failures that led to a retry.
    pub retried_total: u64,
    /// Records the upstream refused for its rate (sent again).
    pub throttled_total: u64,
    /// Readings moved to the dead-letter table.
    pub dead_lettered_total: u64,
    /// Readings sent again after a retry.
    pub resent_total: u64,
    /// Readings handed to the upstream client, not yet confirmed.
    pub in_flight_readings: u64,
    /// Readings not yet acked by this uplink.
    pub lag_readings: u64,
    /// Their stored bytes.
    pub lag_bytes: u64,
    /// When the oldest unsent reading was received.
    pub oldest_unsent_ms: Option<u64>,
    /// Its age.
    pub oldest_unsent_age_ms: Option<u64>,
    /// Readings acked (confirmed or skipped) per second over the last 10 s.
    pub drain_rate_per_sec: f64,
    /// Seconds to send the lag at that rate, while connected and the rate is positive.
    pub eta_secs: Option<f64>,
    /// Commands from the cloud, for an uplink with a `downlink`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downlink: Option<Downlink>,
}

/// Commands that came down an uplink (`[[uplinks.NAME.downlink]]`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Downlink {
    /// Commands can come down now: MQTT, the upstream broker accepted the subscriptions;
    /// Kafka, the consumer group assigned partitions to this gateway.
    pub ready: bool,
    /// Commands received and settled since start: handed over or refused.
    pub received_total: u64,
    /// Commands handed over to the local broker (and then acknowledged upstream).
    pub handed_over_total: u64,
    /// Of those, commands that reached no local subscriber and were not retained.
    pub unrouted_total: u64,
    /// Commands refused for good, acknowledged upstream and skipped.
    pub refused_total: u64,
    /// Refused commands by reason: `no_route`, `no_topic`, `invalid_topic`, `too_large`,
    /// `forbidden`.
    pub refused: BTreeMap<String, u64>,
    /// When the last command came.
    pub last_command_ms: Option<u64>,
    /// How long ago.
    pub last_command_age_ms: Option<u64>,
    /// Kafka: records for other gateways, skipped.
    pub other_gateways_total: u64,
}

/// The on-disk buffer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BufferInfo {
    /// Readings not yet acked by every uplink.
    pub readings: u64,
    /// Bytes counted against the cap (segments and dead letters).
    pub used_bytes: u64,
    /// `buffer.max_bytes`.
    pub max_bytes: u64,
    /// `used_bytes / max_bytes`.
    pub fill_ratio: f64,
    /// `drop_oldest` or `reject`.
    pub when_full: String,
    /// When the oldest buffered reading was received.
    pub oldest_reading_ms: Option<u64>,
    /// Its age.
    pub oldest_reading_age_ms: Option<u64>,
    /// Whether the last commit succeeded.
    pub writable: bool,
    /// The storage error, while failing.
    pub last_error: Option<String>,
    /// Size of the buffer file.
    pub file_bytes: Option<u64>,
    /// Readings appended since start.
    pub appended_total: u64,
    /// 99th percentile commit latency (recent commits), µs.
    pub commit_p99_us: u64,
}

/// Readings lost or refused.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Losses {
    /// Readings the buffer deleted without an upstream ack, by reason (`buffer_full` in
    /// drop_oldest mode, `ttl`, `dead_letter_evicted`).
    pub dropped: BTreeMap<String, u64>,
    /// Readings or requests refused, by `<listener>.<reason>` (`buffer.full`,
    /// `buffer.storage`, `mqtt.bad_credentials`, `http.unauthorized`, …).
    pub rejected: BTreeMap<String, u64>,
    /// Sum of `dropped`.
    pub dropped_total: u64,
    /// Sum of `rejected`.
    pub rejected_total: u64,
}

/// The dead-letter table.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeadLetters {
    /// Readings in it (`ferry buffer dead-letter list` shows them).
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The MQTT listener.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MqttInfo {
    /// Clients connected now.
    pub connected_clients: i64,
    /// Times a connection stopped reading its socket because the readings received and not
    /// yet committed reached `buffer.max_pending_bytes` (a slow disk), since start.
    pub read_pauses_total: u64,
    /// Topics with a retained message.
    pub retained: u64,
    /// Persistent sessions (3.1.1 clean session 0, MQTT 5 session expiry), online or not.
    pub sessions: u64,
    /// PUBLISHes written to local subscribers since start.
    pub delivered_total: u64,
    /// Messages that did not reach a local subscriber since start, by reason
    /// (`qos0_queue_full`, `queue_full`, `expired`, `too_large_for_client`, `retained_full`).
    pub subscriber_drops: BTreeMap<String, u64>,
    /// Local subscribers, by client id.
    pub subscribers: Vec<Subscriber>,
}

/// One local subscriber (a connected client with subscriptions).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Subscriber {
    /// Client id.
    pub client: String,
    /// Its topic filters.
    pub filters: Vec<String>,
    /// Messages queued for it now (waiting for its in-flight window or its socket).
    pub queued: u64,
    /// Messages dropped from its queue (since ferry started, for a persistent session).
    pub dropped: u64,
    /// Whether it is connected: a persistent session's messages queue while it is not.
    pub online: bool,
}

/// The device table.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Devices {
    /// Devices tracked.
    pub tracked: u64,
    /// `status.max_devices`.
    pub max: u64,
    /// Devices forgotten to respect the cap.
    pub evicted_total: u64,
    /// Most recently seen first (up to `?devices=N`, default all tracked).
    pub list: Vec<Device>,
}

/// One device.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Device {
    /// Device id.
    pub id: String,
    /// When its last batch was committed.
    pub last_seen_ms: u64,
    /// How long ago.
    pub last_seen_age_ms: u64,
    /// Readings committed since it was first tracked.
    pub readings: u64,
    /// Source of its last batch.
    pub source: String,
}

/// Disk space.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Disk {
    /// `gateway.data_dir`.
    pub path: String,
    /// Bytes available to ferry.
    pub free_bytes: u64,
    /// Size of the file system.
    pub total_bytes: u64,
    /// What ferry keeps free on it (`buffer.min_free_bytes`, rule in
    /// [`ferry_buffer::disk_reserve`]); 0 when there is no reserve.
    #[serde(default)]
    pub reserve_bytes: u64,
    /// The buffer is held to what the disk leaves, not `max_bytes`: it evicted or refused
    /// readings for the reserve in the last minute, or the free space is within a tenth of
    /// the reserve.
    #[serde(default)]
    pub at_reserve: bool,
}

impl Disk {
    /// `hit_recently`: the buffer evicted or refused for the reserve in the last minute
    /// ([`ferry_buffer::BufferStats::disk_reserve_hit`]).
    pub fn new(
        path: String,
        (free_bytes, total_bytes): (u64, u64),
        reserve_bytes: u64,
        hit_recently: bool,
    ) -> Disk {
        Disk {
            path,
            free_bytes,
            total_bytes,
            reserve_bytes,
            at_reserve: reserve_bytes > 0
                && (hit_recently || free_bytes <= reserve_bytes + reserve_bytes / 10),
        }
    }
}

/// The system clock, as ferry trusts it. What ferry does on a box without a clock is written
/// in `ferry_buffer::clock`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClockInfo {
    /// Whether the wall clock is synchronized now (the kernel's flag, or always with
    /// `gateway.clock_sync = "assume"`). While it is not, new readings go upstream marked
    /// `ferry-clock: unsynced`; once it is, those still waiting go with corrected times.
    pub synchronized: bool,
    /// `kernel` or `assume` (`gateway.clock_sync`).
    pub source: String,
    /// Time since the box booted.
    pub since_boot_ms: u64,
    /// When this boot first saw the clock synchronized, as time since boot.
    pub synchronized_after_boot_ms: Option<u64>,
    /// Steps of the wall clock seen since ferry started.
    pub jumps_total: u64,
    /// The last step, in ms (negative: backwards).
    pub last_jump_ms: Option<i64>,
    /// The wall time just after it.
    pub last_jump_at_ms: Option<u64>,
}

/// Corrupt buffer files that were moved aside.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Quarantine {
    /// `true` while any is present: their readings were not forwarded.
    pub flagged: bool,
    /// Their paths.
    pub files: Vec<String>,
}

fn state(s: LinkState) -> UplinkState {
    match s {
        LinkState::Connected => UplinkState::Connected,
        LinkState::BackingOff => UplinkState::BackingOff,
        LinkState::Offline => UplinkState::Offline,
        LinkState::Connecting => UplinkState::Connecting,
    }
}

async fn uplink(st: &StatusState, u: &UplinkStatus, now: u64) -> Uplink {
    let snap = u.snapshot();
    let lag = st.buffer.lag(u.name()).await.unwrap_or_default();
    let state = state(snap.state);
    let stall_ms = st.config.status.stalled_after_secs.saturating_mul(1000);
    let stalled =
        state == UplinkState::Connected && lag.readings > 0 && snap.ms_since_progress >= stall_ms;
    Uplink {
        name: snap.name,
        kind: snap.kind.to_string(),
        state,
        stalled,
        last_error: snap.last_error,
        last_ack_ms: snap.last_ack_ms,
        last_ack_age_ms: snap.last_ack_ms.map(|t| now.saturating_sub(t)),
        next_retry_ms: snap.next_retry_ms,
        acked_total: snap.acked_total,
        skipped_total: snap.skipped_total,
        retried_total: snap.retried_total,
        throttled_total: snap.throttled_total,
        dead_lettered_total: snap.dead_lettered_total,
        resent_total: snap.resent_total,
        in_flight_readings: snap.in_flight_readings,
        lag_readings: lag.readings,
        lag_bytes: lag.bytes,
        oldest_unsent_ms: lag.oldest_received_ms,
        oldest_unsent_age_ms: lag.oldest_age_ms,
        drain_rate_per_sec: snap.drain_rate,
        // No ETA while not connected: the recent drain rate says nothing about when it resumes.
        eta_secs: (state == UplinkState::Connected && snap.drain_rate > 0.0 && lag.readings > 0)
            .then(|| lag.readings as f64 / snap.drain_rate),
        downlink: snap.downlink.map(|d| Downlink {
            ready: d.ready,
            received_total: d.received_total,
            handed_over_total: d.handed_over_total,
            unrouted_total: d.unrouted_total,
            refused_total: d.refused_total,
            refused: d
                .refused
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            last_command_ms: d.last_command_ms,
            last_command_age_ms: d.last_command_ms.map(|t| now.saturating_sub(t)),
            other_gateways_total: d.other_gateways_total,
        }),
    }
}

/// Human-readable bytes (for the headline and `ferry status`).
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Human-readable duration from ms ("45 s", "3 min", "2 h 5 min", "3 d 4 h").
pub fn fmt_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86400, (s % 86400) / 3600),
    }
}

/// UTC wall-clock time of day, "14:02:11 UTC".
pub fn fmt_utc(ms: u64) -> String {
    let s = (ms / 1000) % 86400;
    format!("{:02}:{:02}:{:02} UTC", s / 3600, (s % 3600) / 60, s % 60)
}

fn summarize(
    uplinks: &[Uplink],
    buffer: &BufferInfo,
    disk: Option<&Disk>,
    started_ms: u64,
    now: u64,
) -> Summary {
    let worst = uplinks.iter().max_by_key(|u| (u.lag_readings, u.lag_bytes));
    let waiting_readings = worst.map_or(buffer.readings, |u| u.lag_readings);
    let waiting_bytes = worst.map_or(buffer.used_bytes, |u| u.lag_bytes);
    let oldest_waiting_age_ms =
        worst.map_or(buffer.oldest_reading_age_ms, |u| u.oldest_unsent_age_ms);
    let wait = if waiting_readings == 0 {
        "nothing waits".to_string()
    } else {
        format!(
            "{waiting_readings} readings ({}) wait{}",
            fmt_bytes(waiting_bytes),
            oldest_waiting_age_ms
                .map(|a| format!(", the oldest for {}", fmt_age(a)))
                .unwrap_or_default()
        )
    };
    let not_out: Vec<&Uplink> = uplinks
        .iter()
        .filter(|u| u.stalled || matches!(u.state, UplinkState::BackingOff | UplinkState::Offline))
        .collect();
    let connecting: Vec<&Uplink> = uplinks
        .iter()
        .filter(|u| u.state == UplinkState::Connecting)
        .collect();
    let data_out = !uplinks.is_empty() && not_out.is_empty() && connecting.is_empty();
    let names = |v: &[&Uplink]| {
        v.iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>()
            .join(" and ")
    };
    let (mut level, mut headline, since) = if uplinks.is_empty() {
        (
            Level::Idle,
            format!(
                "No uplink is enabled: readings stay in the buffer; {wait}. Add an [uplinks.NAME] table to forward them."
            ),
            None,
        )
    } else if !not_out.is_empty() {
        // Since the last ack of the uplink that has been out longest (or the start).
        let since = not_out
            .iter()
            .map(|u| u.last_ack_ms.unwrap_or(started_ms))
            .min()
            .unwrap_or(started_ms);
        let stalled_only = not_out.iter().all(|u| u.stalled);
        let what = if stalled_only {
            format!(
                "{} is connected but nothing is acknowledged",
                names(&not_out)
            )
        } else {
            format!("Data is not getting out to {}", names(&not_out))
        };
        (
            if stalled_only {
                Level::Warn
            } else {
                Level::Down
            },
            format!(
                "{what} since {} ({} ago): {wait}.",
                fmt_utc(since),
                fmt_age(now.saturating_sub(since))
            ),
            Some(since),
        )
    } else if !connecting.is_empty() {
        let since = connecting
            .iter()
            .map(|u| u.last_ack_ms.unwrap_or(started_ms))
            .min()
            .unwrap_or(started_ms);
        (
            if waiting_readings > 0 && now.saturating_sub(since) > 30_000 {
                Level::Warn
            } else {
                Level::Idle
            },
            format!(
                "Connecting to {} (for {}): {wait}.",
                names(&connecting),
                fmt_age(now.saturating_sub(since))
            ),
            Some(since),
        )
    } else {
        let rate: f64 = uplinks.iter().map(|u| u.drain_rate_per_sec).sum();
        (
            Level::Ok,
            format!(
                "Data is getting out to {} ({rate:.1} readings/s acknowledged); {wait}.",
                uplinks
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
            None,
        )
    };
    if !buffer.writable {
        level = Level::Down;
        headline = format!("The buffer cannot write to disk: new readings are refused. {headline}");
    } else if let Some(d) = disk.filter(|d| d.at_reserve) {
        if level != Level::Down {
            level = Level::Warn;
        }
        headline = format!(
            "The disk is down to the {} ferry keeps free (buffer.min_free_bytes): {}. {headline}",
            fmt_bytes(d.reserve_bytes),
            if buffer.when_full == "reject" {
                "new readings are refused"
            } else {
                "the oldest readings are dropped to make room"
            }
        );
    } else if buffer.fill_ratio >= 0.9 && level != Level::Down {
        level = Level::Warn;
        headline = format!(
            "The buffer is {:.0}% full. {headline}",
            buffer.fill_ratio * 100.0
        );
    }
    Summary {
        level,
        headline,
        data_out,
        not_out_since_ms: since,
        waiting_readings,
        waiting_bytes,
        oldest_waiting_age_ms,
    }
}

/// Adds a listener's rejections, as `<listener>.<reason>`.
fn merge_rejections(
    out: &mut BTreeMap<String, u64>,
    prefix: &str,
    by_reason: BTreeMap<&'static str, u64>,
) {
    for (k, n) in by_reason {
        if n > 0 {
            *out.entry(format!("{prefix}.{k}")).or_default() += n;
        }
    }
}

/// Builds the report. `device_limit` bounds the device list.
pub async fn collect(st: &StatusState, device_limit: usize) -> StatusReport {
    let now = now_ms();
    let hub = &st.hub;
    let started_ms = hub.started_ms();
    let mut uplinks = Vec::new();
    for u in hub.uplinks() {
        uplinks.push(uplink(st, u, now).await);
    }
    let bs = st.buffer.stats();
    let buffer = BufferInfo {
        readings: bs.readings,
        used_bytes: bs.used_bytes(),
        max_bytes: bs.max_bytes,
        fill_ratio: if bs.max_bytes > 0 {
            bs.used_bytes() as f64 / bs.max_bytes as f64
        } else {
            0.0
        },
        when_full: match st.config.buffer.when_full {
            ferry_config::WhenFull::Reject => "reject".into(),
            ferry_config::WhenFull::DropOldest => "drop_oldest".into(),
        },
        oldest_reading_ms: bs.oldest_received_ms,
        oldest_reading_age_ms: bs.oldest_age_ms,
        writable: bs.writable(),
        last_error: bs.last_error.clone(),
        file_bytes: bs.file_bytes,
        appended_total: bs.appended_total,
        commit_p99_us: bs.commit_p99_us,
    };
    let mut dropped = BTreeMap::new();
    for (k, v) in [
        ("buffer_full", bs.dropped_full_total),
        ("ttl", bs.dropped_ttl_total),
        ("dead_letter_evicted", bs.dropped_dead_letter_total),
        ("disk_full", bs.dropped_disk_total),
    ] {
        if v > 0 {
            dropped.insert(k.to_string(), v);
        }
    }
    let mut rejected = BTreeMap::new();
    for (k, v) in [
        ("buffer.full", bs.rejected_full_total),
        ("buffer.storage", bs.rejected_storage_total),
        ("buffer.disk_full", bs.rejected_disk_total),
    ] {
        if v > 0 {
            rejected.insert(k.to_string(), v);
        }
    }
    if let Some(m) = hub.mqtt() {
        merge_rejections(&mut rejected, "mqtt", m.rejections());
    }
    if let Some(h) = hub.http() {
        merge_rejections(&mut rejected, "http", h.rejections_by_reason());
    }
    let losses = Losses {
        dropped_total: dropped.values().sum(),
        rejected_total: rejected.values().sum(),
        dropped,
        rejected,
    };

    let totals = Totals::read(&hub.devices, &st.buffer);
    let (buckets, (rates, forwarded_rate)) = {
        let h = hub.history();
        let t = tokio::time::Instant::now();
        (h.buckets(t, &totals), h.rates(t, &totals))
    };
    let ingest = Ingest {
        total: totals.received.iter().sum(),
        total_by_source: history::by_source(totals.received),
        rate: rates.iter().sum(),
        rate_by_source: history::by_source(rates),
        forwarded_rate,
        history: buckets
            .into_iter()
            .map(|b| HistoryBucket {
                start_ms: b.start_ms,
                duration_ms: b.duration_ms,
                received: history::by_source(b.counts.received),
                forwarded: b.counts.forwarded,
            })
            .collect(),
    };
    let devices = Devices {
        tracked: hub.devices.len() as u64,
        max: hub.devices.max() as u64,
        evicted_total: hub.devices.evicted_total(),
        list: hub
            .devices
            .recent(device_limit)
            .into_iter()
            .map(|d| Device {
                last_seen_age_ms: now.saturating_sub(d.last_seen_ms),
                id: d.id,
                last_seen_ms: d.last_seen_ms,
                readings: d.readings,
                source: d.source.to_string(),
            })
            .collect(),
    };
    let data_dir = &st.config.gateway.data_dir;
    let hit_recently = bs
        .disk_reserve_hit
        .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60));
    let disk = ferry_buffer::disk_space(data_dir).map(|space| {
        Disk::new(
            data_dir.display().to_string(),
            space,
            ferry_buffer::disk_reserve(space.1, st.config.buffer.min_free_bytes),
            hit_recently,
        )
    });
    let summary = summarize(&uplinks, &buffer, disk.as_ref(), started_ms, now);
    StatusReport {
        gateway: GatewayInfo {
            id: st.config.gateway.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_ms,
            uptime_secs: hub.uptime().as_secs_f64(),
            now_ms: now,
        },
        summary,
        ready: hub.is_ready() && buffer.writable,
        ingest,
        uplinks,
        dead_letters: DeadLetters {
            count: bs.dead_letters,
            bytes: bs.dead_letter_bytes,
        },
        mqtt: hub.mqtt().map(|m| {
            let b = m.broker();
            MqttInfo {
                connected_clients: m.connected_clients(),
                read_pauses_total: m.read_pauses(),
                retained: b.map_or(0, |b| b.retained_count() as u64),
                sessions: b.map_or(0, |b| b.sessions() as u64),
                delivered_total: b.map_or(0, |b| b.delivered_total()),
                subscriber_drops: b.map_or_else(BTreeMap::new, |b| {
                    b.drops()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect()
                }),
                subscribers: b.map_or_else(Vec::new, |b| {
                    b.subscribers()
                        .into_iter()
                        .map(|s| Subscriber {
                            client: s.client,
                            filters: s.filters,
                            queued: s.queued as u64,
                            dropped: s.dropped,
                            online: s.online,
                        })
                        .collect()
                }),
            }
        }),
        devices,
        disk,
        quarantine: Quarantine {
            flagged: !bs.quarantined.is_empty(),
            files: bs
                .quarantined
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        },
        listeners: hub
            .listeners()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        clock: {
            let c = st.buffer.clock();
            ClockInfo {
                synchronized: c.synchronized,
                source: match st.config.gateway.clock_sync {
                    ferry_config::ClockSync::Assume => "assume".into(),
                    ferry_config::ClockSync::Kernel => "kernel".into(),
                },
                since_boot_ms: c.since_boot_ms,
                synchronized_after_boot_ms: c.synced_at_boottime_ms,
                jumps_total: c.jumps_total,
                last_jump_ms: c.last_jump.map(|j| j.0),
                last_jump_at_ms: c.last_jump.map(|j| j.1),
            }
        },
        buffer,
        losses,
    }
}

/// Query of `GET /api/status`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    /// At most this many devices in `devices.list` (default: all tracked).
    /// An i32 with a minimum of 0, as the document says: anything else is refused (400).
    #[param(minimum = 0)]
    pub devices: Option<i32>,
}

/// The status report.
#[utoipa::path(get, path = "/api/status", tag = "status",
    params(StatusQuery),
    responses(
        (status = 200, description = "The status report.", body = StatusReport),
        (status = 400, description = "The query string is invalid (`devices` is not a non-negative integer); plain text."),
        (status = 401, description = "`status.token` is set and the request has no matching `Authorization: Bearer` header."),
    ))]
// The `status_token` security requirement is added by `StatusApiDoc::for_config`, only when
// `status.token` is set: without it the endpoint needs no header.
pub async fn status(
    axum::extract::State(st): axum::extract::State<StatusState>,
    axum::extract::Query(q): axum::extract::Query<StatusQuery>,
) -> Result<axum::Json<StatusReport>, (axum::http::StatusCode, &'static str)> {
    let limit = match q.devices {
        None => usize::MAX,
        Some(d) => usize::try_from(d).map_err(|_| {
            (
                axum::http::StatusCode::BAD_REQUEST,
                "devices must be a non-negative integer",
            )
        })?,
    };
    Ok(axum::Json(collect(&st, limit).await))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str, state: UplinkState, lag: u64, last_ack: Option<u64>) -> Uplink {
        Uplink {
            name: name.into(),
            kind: "kafka".into(),
            state,
            stalled: false,
            last_error: None,
            last_ack_ms: last_ack,
            last_ack_age_ms: None,
            next_retry_ms: None,
            acked_total: 0,
            skipped_total: 0,
            retried_total: 0,
            throttled_total: 0,
            dead_lettered_total: 0,
            resent_total: 0,
            in_flight_readings: 0,
            lag_readings: lag,
            lag_bytes: lag * 10,
            oldest_unsent_ms: None,
            oldest_unsent_age_ms: (lag > 0).then_some(65_000),
            drain_rate_per_sec: 0.0,
            eta_secs: None,
            downlink: None,
        }
    }

    fn buf(writable: bool, fill: f64) -> BufferInfo {
        BufferInfo {
            readings: 0,
            used_bytes: 0,
            max_bytes: 100,
            fill_ratio: fill,
            when_full: "drop_oldest".into(),
            oldest_reading_ms: None,
            oldest_reading_age_ms: None,
            writable,
            last_error: None,
            file_bytes: None,
            appended_total: 0,
            commit_p99_us: 0,
        }
    }

    #[test]
    fn headline_says_since_when_and_how_much_waits() {
        let now = 10 * 3_600_000 + 5 * 60_000;
        let s = summarize(
            &[up("kafka", UplinkState::Offline, 1234, Some(now - 125_000))],
            &buf(true, 0.1),
            None,
            0,
            now,
        );
        assert_eq!(s.level, Level::Down);
        assert!(!s.data_out);
        assert_eq!(s.not_out_since_ms, Some(now - 125_000));
        assert_eq!(
            s.headline,
            "Data is not getting out to kafka since 10:02:55 UTC (2 min 5 s ago): 1234 readings (12.3 kB) wait, the oldest for 1 min 5 s."
        );

        let ok = summarize(
            &[up("kafka", UplinkState::Connected, 0, Some(now))],
            &buf(true, 0.1),
            None,
            0,
            now,
        );
        assert_eq!(ok.level, Level::Ok);
        assert!(ok.data_out);
        assert!(ok.headline.contains("nothing waits"), "{}", ok.headline);

        let mut stalled = up("kafka", UplinkState::Connected, 5, Some(now - 90_000));
        stalled.stalled = true;
        let s = summarize(&[stalled], &buf(true, 0.1), None, 0, now);
        assert_eq!(s.level, Level::Warn);
        assert!(s.headline.contains("connected but nothing is acknowledged"));

        let s = summarize(&[], &buf(false, 0.0), None, 0, now);
        assert_eq!(s.level, Level::Down);
        assert!(s.headline.starts_with("The buffer cannot write"));
    }

    #[test]
    fn headline_says_when_the_disk_reserve_limits_the_buffer() {
        let now = 10 * 3_600_000;
        let connected = [up("kafka", UplinkState::Connected, 0, Some(now))];
        let disk = |free_bytes| {
            Disk::new(
                "/var/lib/ferry".into(),
                (free_bytes, 1 << 30),
                50_000_000,
                false,
            )
        };
        let s = summarize(&connected, &buf(true, 0.1), Some(&disk(54_000_000)), 0, now);
        assert_eq!(s.level, Level::Warn);
        assert!(
            s.headline.starts_with(
                "The disk is down to the 50.0 MB ferry keeps free (buffer.min_free_bytes): the oldest readings are dropped to make room."
            ),
            "{}",
            s.headline
        );
        let mut reject = buf(true, 0.1);
        reject.when_full = "reject".into();
        let s = summarize(&connected, &reject, Some(&disk(50_000_000)), 0, now);
        assert!(
            s.headline.contains("new readings are refused"),
            "{}",
            s.headline
        );
        // Above the reserve by more than a tenth, or without a reserve: nothing to say, unless
        // the buffer evicted or refused for it in the last minute.
        let s = summarize(&connected, &buf(true, 0.1), Some(&disk(56_000_000)), 0, now);
        assert_eq!(s.level, Level::Ok, "{}", s.headline);
        let hit = Disk::new(
            "/var/lib/ferry".into(),
            (90_000_000, 1 << 30),
            50_000_000,
            true,
        );
        let s = summarize(&connected, &buf(true, 0.1), Some(&hit), 0, now);
        assert_eq!(s.level, Level::Warn, "{}", s.headline);
        let none = Disk::new("/var/lib/ferry".into(), (0, 1 << 30), 0, true);
        let s = summarize(&connected, &buf(true, 0.1), Some(&none), 0, now);
        assert_eq!(s.level, Level::Ok, "{}", s.headline);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_bytes(999), "999 B");
        assert_eq!(fmt_bytes(2_100_000), "2.1 MB");
        assert_eq!(fmt_age(59_999), "59 s");
        assert_eq!(fmt_age(3_725_000), "1 h 2 min");
        assert_eq!(fmt_utc(86_400_000 + 61_000), "00:01:01 UTC");
    }
}
