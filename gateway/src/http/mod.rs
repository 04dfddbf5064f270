//! HTTP ingest listener (being built: see issue 4).

use crate::app::{Gateway, StartError};

/// Binds the HTTP listener if enabled and registers it with the gateway.
pub async fn register(_gw: &mut Gateway) -> Result<(), StartError> {
    Ok(())
}
