//! Redis: one multiplexed, self-reconnecting connection with bounded timeouts,
//! opened lazily so a service starts (and keeps working in a degraded mode)
//! while Redis is down, plus a short circuit breaker so a dead or paused
//! Redis costs one timeout per second, not one per call.
//!
//! The breaker is hand-written on purpose: `tower` has none, and the crates
//! that do are `tower` layers over a service, while this wraps one
//! multiplexed connection with a rule of its own (a timeout under a herd is
//! overload and must not open it; a lost connection must). It is two atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

/// How long Redis is skipped after a failure, at least (and never shorter
/// than one timeout, so a paused Redis costs each caller one wait at most
/// per period, not most of them).
const OPEN_CIRCUIT: Duration = Duration::from_secs(1);

/// Why Redis could not be used for a call.
#[derive(Debug, thiserror::Error)]
pub enum RedisUnavailable {
    /// A recent failure opened the circuit; not tried.
    #[error("redis skipped after a recent failure")]
    CircuitOpen,
    /// The call failed (connection refused, timeout, ...).
    #[error("redis error: {0}")]
    Failed(#[from] redis::RedisError),
}

/// A lazily connected Redis with a circuit breaker.
pub struct Redis {
    client: redis::Client,
    config: ConnectionManagerConfig,
    conn: OnceCell<ConnectionManager>,
    /// Unix ms until which calls skip Redis.
    open_until_ms: AtomicU64,
    /// Unix ms of the last successful call: a timeout while others succeed
    /// is overload, not an outage, and does not open the circuit.
    last_ok_ms: AtomicU64,
    timeout_ms: u64,
    /// How long the circuit stays open: the longer of a second and a timeout.
    open_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Redis {
    /// A handle to Redis at `url`; nothing is connected yet. Each command
    /// gives up after `timeout`. A `rediss://` URL speaks TLS, verifying
    /// the server against `ca_pem` (a PEM bundle) when given, else against
    /// the public web roots.
    pub fn new(url: &str, timeout: Duration, ca_pem: Option<Vec<u8>>) -> anyhow::Result<Self> {
        let client = match ca_pem {
            Some(root_cert) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?,
            None => redis::Client::open(url)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        Ok(Self {
            client,
            config,
            conn: OnceCell::new(),
            open_until_ms: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            timeout_ms: timeout.as_millis() as u64,
            open_ms: OPEN_CIRCUIT.max(timeout).as_millis() as u64,
        })
    }

    /// The connection, unless Redis failed in the last second.
    pub async fn connection(&self) -> Result<ConnectionManager, RedisUnavailable> {
        if now_ms() < self.open_until_ms.load(Ordering::Relaxed) {
            return Err(RedisUnavailable::CircuitOpen);
        }
        let conn = self
            .conn
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(self.client.clone(), self.config.clone())
            })
            .await
            .inspect_err(|_| self.trip())?;
        Ok(conn.clone())
    }

    /// Runs `f` on the connection; a failure opens the circuit. The call,
    /// named `operation` (the script or command), is a client span and a
    /// sample of `db.client.operation.duration`.
    pub async fn run<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, RedisUnavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "redis",
            otel.name = operation,
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            db.system.name = "redis",
            db.operation.name = operation,
        );
        let started = std::time::Instant::now();
        let answer = self.run_untimed(f).instrument(span.clone()).await;
        crate::metrics::DB_CLIENT.record(
            started.elapsed().as_secs_f64(),
            &[
                opentelemetry::KeyValue::new("db.system.name", "redis"),
                opentelemetry::KeyValue::new("db.operation.name", operation),
            ],
        );
        if answer.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        answer
    }

    async fn run_untimed<T, F, Fut>(&self, f: F) -> Result<T, RedisUnavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.connection().await?;
        match f(conn).await {
            Ok(value) => {
                self.last_ok_ms.store(now_ms(), Ordering::Relaxed);
                Ok(value)
            }
            Err(e) => {
                // A script error is a bug, not an outage; a lost connection
                // is; a timeout is only when nothing succeeded lately either
                // (otherwise it is overload, and Redis is still the gate).
                let silent = now_ms().saturating_sub(self.last_ok_ms.load(Ordering::Relaxed))
                    > self.timeout_ms;
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || (e.is_timeout() && silent)
                {
                    self.trip();
                }
                Err(RedisUnavailable::Failed(e))
            }
        }
    }

    fn trip(&self) {
        let until = now_ms() + self.open_ms;
        if self.open_until_ms.swap(until, Ordering::Relaxed) < now_ms() {
            tracing::warn!("redis unavailable: skipping it for {} ms", self.open_ms);
        }
    }
}
