//! Logging setup: tracing to stderr, as text (colours only when stderr is a terminal) or
//! JSON; or, under systemd when stderr is the journal, to journald's native socket.
//!
//! **journald.** systemd sets `JOURNAL_STREAM` to the device and inode of the stream it
//! connects to a service's stdout and stderr. When that is ferry's stderr (the variable alone
//! is not enough: a child of a service inherits it with other output) and
//! `gateway.journald` is on, events go through journald's native protocol (tracing-journald):
//! the message as `MESSAGE`, the level as `PRIORITY` (error 3, warn 4, info 6, debug and
//! trace 7), every field of the event as a journal field of its upper-cased name (`UPLINK`,
//! `ERROR`, `READINGS`, …), `SYSLOG_IDENTIFIER=ferry`, and `TARGET`, `CODE_FILE`,
//! `CODE_LINE`. If the journal socket cannot be reached, ferry logs to stderr as usual and
//! says so once.

use ferry_config::{GatewaySettings, LogFormat};
use std::io::IsTerminal as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The log filter of `directives`: a default level and per-target levels, comma-separated
/// (`"info"`, `"warn,ferry_uplink=debug"`). `tracing_subscriber`'s `Targets`, which needs no
/// regular expressions: `EnvFilter`'s span and field filters cost the Pi binary 220 KiB of
/// regex code.
fn filter(directives: &str) -> Option<Targets> {
    directives.parse().ok()
}

/// Installs the global subscriber. `FERRY_LOG` (the same syntax) overrides
/// `gateway.log_level`; one that does not parse is ignored. Safe to call more than once;
/// later calls do nothing.
pub fn init(gw: &GatewaySettings) {
    let filter = std::env::var("FERRY_LOG")
        .ok()
        .and_then(|f| filter(&f))
        .or_else(|| filter(&gw.log_level))
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let mut journal_error = None;
    if gw.journald && stderr_is_the_journal() {
        match journald_layer() {
            Ok(layer) => {
                let _ = tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => journal_error = Some(e),
        }
    }
    // Colour only for a person at a terminal: a file, a pipe or journald gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match gw.log_format {
        LogFormat::Json => registry.with(fmt.json()).try_init(),
        LogFormat::Text => registry.with(fmt).try_init(),
    };
    if let Some(error) = journal_error {
        tracing::warn!(%error, "stderr is the journal but journald's socket cannot be reached; logging to stderr.");
    }
}

fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    Ok(tracing_journald::layer()?
        .with_field_prefix(None)
        .with_syslog_identifier("ferry".into())
        .with_priority_mappings(PriorityMappings {
            error: Priority::Error,
            warn: Priority::Warning,
            info: Priority::Informational,
            debug: Priority::Debug,
            trace: Priority::Debug,
        }))
}

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`, set by systemd) names this process's stderr.
fn stderr_is_the_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse().ok() == Some(st.st_dev) && ino.parse().ok() == Some(st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing_subscriber::filter::LevelFilter;

    #[test]
    fn directives_set_a_default_and_per_target_levels() {
        let f = filter("warn,ferry_uplink=debug").unwrap();
        assert!(f.would_enable("ferry_uplink::kafka", &Level::DEBUG));
        assert!(!f.would_enable("ferry_uplink::kafka", &Level::TRACE));
        assert!(f.would_enable("ferry_gateway", &Level::WARN));
        assert!(!f.would_enable("ferry_gateway", &Level::INFO));
        assert_eq!(
            filter("info").unwrap().default_level(),
            Some(LevelFilter::INFO)
        );
        assert!(filter("off").is_some());
        assert!(
            filter("ferry=loud").is_none(),
            "an unknown level does not parse"
        );
    }
}
