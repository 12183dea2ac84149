//! Redis: one multiplexed, self-reconnecting connection with bounded timeouts,
//! so a stalled Redis makes calls fail fast instead of hanging.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Connects to Redis at `url`. Each command gives up after `timeout`.
pub async fn connect(url: &str, timeout: Duration) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    Ok(ConnectionManager::new_with_config(client, config).await?)
}
