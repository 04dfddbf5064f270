//! Logging setup: tracing to stderr, as text or JSON (journald picks either up).

use ferry_config::{GatewaySettings, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `FERRY_LOG` (an `EnvFilter` directive) overrides
/// `gateway.log_level`. Safe to call more than once; later calls do nothing.
pub fn init(gw: &GatewaySettings) {
    let filter = std::env::var("FERRY_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&gw.log_level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match gw.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
