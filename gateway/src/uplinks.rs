//! Starts the enabled uplinks and registers their status handles for the status page.

use crate::app::{Gateway, StartError};
use std::time::Duration;

/// Builds every enabled uplink and registers it with the gateway. An uplink that cannot be
/// built (a bad librdkafka property, say) stops the start-up with a clear error.
pub async fn register(gw: &mut Gateway) -> Result<(), StartError> {
    let config = gw.config.clone();
    // Uplinks get most of the grace period: listeners drain first, the buffer closes last.
    let grace = Duration::from_millis(config.gateway.shutdown_grace_ms * 6 / 10);
    if config.uplink.kafka.enabled {
        let sink = ferry_uplink::kafka::KafkaSink::new(
            &config.uplink.kafka,
            &config.gateway.id,
            gw.buffer.clone(),
        )
        .map_err(|e| StartError::Component {
            component: "uplink.kafka",
            message: e.to_string(),
        })?
        .shutdown_grace(grace);
        gw.add_uplink_status(sink.status());
        gw.add_uplink("kafka", move |shutdown| {
            Box::pin(async move {
                if let Err(e) = sink.run(shutdown).await {
                    tracing::error!(error = %e, "The Kafka uplink stopped with an error; readings stay in the buffer.");
                }
            })
        });
        tracing::info!(brokers = %config.uplink.kafka.brokers, topic = %config.uplink.kafka.topic, "The Kafka uplink is enabled.");
    }
    if config.uplink.mqtt.enabled {
        let sink = ferry_uplink::mqtt::MqttSink::new(
            &config.uplink.mqtt,
            &config.gateway.id,
            &config.uplink_mqtt_client_id(),
            gw.buffer.clone(),
        )
        .map_err(|e| StartError::Component {
            component: "uplink.mqtt",
            message: e.to_string(),
        })?
        .shutdown_grace(grace);
        gw.add_uplink_status(sink.status());
        gw.add_uplink("mqtt", move |shutdown| {
            Box::pin(async move {
                if let Err(e) = sink.run(shutdown).await {
                    tracing::error!(error = %e, "The MQTT uplink stopped with an error; readings stay in the buffer.");
                }
            })
        });
        tracing::info!(url = %config.uplink.mqtt.url, protocol = ?config.uplink.mqtt.protocol, "The MQTT uplink is enabled.");
    }
    Ok(())
}
