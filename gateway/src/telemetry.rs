//! Logging setup: tracing to stderr, as text (colours only when stderr is a terminal) or
//! JSON (journald picks either up).

use ferry_config::{GatewaySettings, LogFormat};
use std::io::IsTerminal as _;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `FERRY_LOG` (an `EnvFilter` directive) overrides
/// `gateway.log_level`. Safe to call more than once; later calls do nothing.
pub fn init(gw: &GatewaySettings) {
    let filter = std::env::var("FERRY_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&gw.log_level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colour only for a person at a terminal: a file, a pipe or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match gw.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
