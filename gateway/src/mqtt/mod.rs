//! MQTT ingest listener (being built: see issue 3).

use crate::app::{Gateway, StartError};

/// Binds the MQTT listener(s) if enabled and registers them with the gateway.
pub async fn register(_gw: &mut Gateway) -> Result<(), StartError> {
    Ok(())
}
