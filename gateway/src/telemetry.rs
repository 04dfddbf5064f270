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
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Installs the global subscriber. `FERRY_LOG` (an `EnvFilter` directive) overrides
/// `gateway.log_level`. Safe to call more than once; later calls do nothing.
pub fn init(gw: &GatewaySettings) {
    let filter = std::env::var("FERRY_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&gw.log_level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match gw.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
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
