//! Repeating messages (librdkafka reports "all brokers down" several times a second while a
//! site's link is down; a device with a wrong password reconnects in a loop): logged once when
//! they change, then at most once per summary period ([`summary_every`],
//! `status.log_summary_secs`) with how often they came meanwhile. The status page keeps the
//! latest text and the metrics every count, so folding the log loses no figure.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The default summary period (`status.log_summary_secs`).
pub const SUMMARY_EVERY: Duration = Duration::from_secs(300);

static SUMMARY_SECS: AtomicU64 = AtomicU64::new(SUMMARY_EVERY.as_secs());

/// Sets the summary period for the whole process (`status.log_summary_secs`, at start).
pub fn set_summary_every(period: Duration) {
    SUMMARY_SECS.store(period.as_secs().max(1), Ordering::Relaxed);
}

/// A message that keeps coming is logged again at most this often, with its count.
pub fn summary_every() -> Duration {
    Duration::from_secs(SUMMARY_SECS.load(Ordering::Relaxed))
}

/// What to log for a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say {
    /// A new message (not the same as the last one): log it.
    New,
    /// The same message again after the summary period: log it with how often it came since
    /// it was last logged.
    Again(u64),
    /// The same message again: count it, log nothing.
    Quiet,
}

/// How often one message came since it was last logged.
#[derive(Debug)]
struct Seen {
    repeats: u64,
    logged_at: Instant,
}

/// Most distinct messages remembered; the one logged longest ago is forgotten first.
const REMEMBERED: usize = 32;

/// Folds the messages of one source. Messages are compared with their digits folded, since
/// counts and times inside them vary ("1/1 brokers are down", "0/1 brokers are down").
#[derive(Debug, Default)]
pub struct Fold(Mutex<std::collections::HashMap<String, Seen>>);

/// `text` with each run of digits replaced by one `#`.
fn key_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

impl Fold {
    /// Notes `text` at `now` and says what to log.
    pub fn note(&self, text: &str, now: Instant) -> Say {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = key_of(text);
        let Some(s) = seen.get_mut(&key) else {
            if seen.len() >= REMEMBERED
                && let Some(oldest) = seen
                    .iter()
                    .min_by_key(|(_, s)| s.logged_at)
                    .map(|(k, _)| k.clone())
            {
                seen.remove(&oldest);
            }
            seen.insert(
                key,
                Seen {
                    repeats: 0,
                    logged_at: now,
                },
            );
            return Say::New;
        };
        s.repeats += 1;
        if now.saturating_duration_since(s.logged_at) >= summary_every() {
            let n = s.repeats;
            s.repeats = 0;
            s.logged_at = now;
            Say::Again(n)
        } else {
            Say::Quiet
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeating_messages_are_logged_once_then_summarised() {
        let f = Fold::default();
        let t0 = Instant::now();
        let down = |n: u32| format!("{n}/1 brokers are down");
        let refused = |n: u32| {
            format!("Connect failed: Connection refused ({n} identical error(s) suppressed)")
        };
        assert_eq!(f.note(&down(1), t0), Say::New);
        assert_eq!(f.note(&refused(0), t0), Say::New);
        // Both, alternating, eight a second for a minute: nothing more is logged.
        for i in 1..480u32 {
            let at = t0 + Duration::from_millis(125 * u64::from(i));
            assert_eq!(f.note(&down(i % 2), at), Say::Quiet, "message {i}");
            assert_eq!(f.note(&refused(i), at), Say::Quiet, "message {i}");
        }
        // After the summary period, each once, with its count since.
        let later = t0 + SUMMARY_EVERY;
        assert_eq!(f.note(&down(0), later), Say::Again(480));
        assert_eq!(f.note(&down(0), later), Say::Quiet);
        assert_eq!(f.note(&refused(7), later), Say::Again(480));
        // Another message is logged at once.
        assert_eq!(
            f.note("Broker: Not enough in-sync replicas", later),
            Say::New
        );
    }

    #[test]
    fn the_oldest_message_is_forgotten_first() {
        let f = Fold::default();
        let t0 = Instant::now();
        for i in 0..REMEMBERED {
            let at = t0 + Duration::from_secs(i as u64);
            assert_eq!(f.note(&format!("message {}", "x".repeat(i)), at), Say::New);
        }
        let at = t0 + Duration::from_secs(100);
        assert_eq!(f.note("one more", at), Say::New);
        // "message " (logged first) was forgotten; the others are remembered.
        assert_eq!(f.note("message ", at), Say::New);
        assert_eq!(f.note("message xx", at), Say::Quiet);
    }
}
