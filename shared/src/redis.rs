//! Redis: one server, a Sentinel-managed primary or a Redis Cluster
//! ([`Topology`], from `REDIS_URL`), through one multiplexed,
//! self-reconnecting connection with bounded timeouts, opened lazily so a
//! service starts (and keeps working in a degraded mode) while Redis is
//! down, plus a short circuit breaker so a dead or paused Redis costs one
//! timeout per second, not one per call.
//!
//! The breaker is hand-written on purpose: `tower` has none, and the crates
//! that do are `tower` layers over a service, while this wraps one
//! multiplexed connection with a rule of its own (a timeout under a herd is
//! overload and must not open it; a lost connection must). It is two atomics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

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

/// Where Redis is, from `REDIS_URL`:
/// - `redis://host:port/db` (`rediss://` for TLS): one server;
/// - `redis+sentinel://host:port,host:port/<primary name>[/db]`
///   (`rediss+sentinel://`): the primary that Sentinel names, found again
///   after a failover;
/// - `redis+cluster://host:port,host:port/` (`rediss+cluster://`): a Redis
///   Cluster, from any of its nodes.
///
/// A `user:password@` before the hosts applies to every node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One server.
    Single(String),
    /// Sentinels (as `redis://` URLs) and the name of the primary they watch.
    Sentinel {
        /// The sentinels' URLs.
        sentinels: Vec<String>,
        /// The name of the primary (Sentinel's "master name").
        primary: String,
        /// The URL of the primary's settings (credentials, database, TLS),
        /// its host a placeholder.
        node: String,
    },
    /// Seed nodes of a cluster, as `redis://` URLs.
    Cluster(Vec<String>),
}

impl Topology {
    /// Reads `url`.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        // Errors show the URL without its credentials.
        let shown = redacted(url);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| anyhow::anyhow!("REDIS_URL {shown:?} has no scheme"))?;
        let (base, kind) = match scheme.split_once('+') {
            Some((base, kind)) => (base, Some(kind)),
            None => (scheme, None),
        };
        anyhow::ensure!(
            matches!(base, "redis" | "rediss"),
            "REDIS_URL: unknown scheme {scheme:?} (redis, rediss, redis+sentinel, redis+cluster)"
        );
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (format!("{userinfo}@"), rest),
            None => (String::new(), rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let hosts: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
        anyhow::ensure!(!hosts.is_empty(), "REDIS_URL {shown:?} names no host");
        let node = |host: &str, path: &str| format!("{base}://{userinfo}{host}/{path}");
        match kind {
            None => Ok(Self::Single(url.to_owned())),
            Some("cluster") => Ok(Self::Cluster(
                hosts.iter().map(|host| node(host, "")).collect(),
            )),
            Some("sentinel") => {
                let (primary, db) = path.split_once('/').unwrap_or((path, ""));
                anyhow::ensure!(
                    !primary.is_empty(),
                    "REDIS_URL {shown:?}: name the primary, redis+sentinel://host:port/<name>"
                );
                Ok(Self::Sentinel {
                    // Sentinels speak plain `redis`, without credentials of
                    // the primary's.
                    sentinels: hosts
                        .iter()
                        .map(|host| format!("{base}://{host}/"))
                        .collect(),
                    primary: primary.to_owned(),
                    node: node("primary", db),
                })
            }
            Some(other) => anyhow::bail!("REDIS_URL: unknown topology {other:?} in {scheme:?}"),
        }
    }
}

/// `url` with any `user:password@` replaced by `***@`.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, hosts))) => format!("{scheme}://***@{hosts}"),
        (None, Some((_, hosts))) => format!("***@{hosts}"),
        _ => url.to_owned(),
    }
}

/// A connection to whichever topology `REDIS_URL` names. Scripts and
/// commands run on it alike: on a cluster each goes to the node that holds
/// its keys' slot (all of a class's keys share one hash tag; every other
/// script or command touches one key).
#[derive(Clone)]
pub enum Connection {
    /// One server (or Sentinel's current primary), reconnecting itself.
    Single(ConnectionManager),
    /// A cluster, following its slots and failovers itself.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// A lazily connected Redis with a circuit breaker.
pub struct Redis {
    topology: Topology,
    /// The CA that verifies a `rediss` server (else the public web roots).
    ca_pem: Option<Vec<u8>>,
    timeout: Duration,
    config: ConnectionManagerConfig,
    conn: arc_swap::ArcSwapOption<Connection>,
    /// Held while connecting, so callers wait for one connection attempt.
    connecting: tokio::sync::Mutex<()>,
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
    /// A handle to Redis at `url` (see [`Topology`]); nothing is connected
    /// yet. Each command gives up after `timeout`. A `rediss` URL speaks
    /// TLS, verifying the servers against `ca_pem` (a PEM bundle) when
    /// given, else against the public web roots.
    pub fn new(url: &str, timeout: Duration, ca_pem: Option<Vec<u8>>) -> anyhow::Result<Self> {
        let topology = Topology::parse(url)?;
        // Every URL must be one the client accepts, now rather than at the
        // first call.
        match &topology {
            Topology::Single(url) => drop(redis::Client::open(url.as_str())?),
            Topology::Cluster(nodes) => {
                for node in nodes {
                    drop(redis::Client::open(node.as_str())?);
                }
            }
            Topology::Sentinel {
                sentinels, node, ..
            } => {
                for url in sentinels.iter().chain([node]) {
                    drop(redis::Client::open(url.as_str())?);
                }
            }
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        Ok(Self {
            topology,
            ca_pem,
            timeout,
            config,
            conn: arc_swap::ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            open_until_ms: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            timeout_ms: timeout.as_millis() as u64,
            open_ms: OPEN_CIRCUIT.max(timeout).as_millis() as u64,
        })
    }

    /// A client of one server at `url`, with the CA when there is one.
    fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match (&self.ca_pem, url.starts_with("rediss://")) {
            (Some(root_cert), true) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert.clone()),
                },
            ),
            _ => redis::Client::open(url),
        }
    }

    /// Connects to the topology.
    async fn connect(&self) -> redis::RedisResult<Connection> {
        match &self.topology {
            Topology::Single(url) => Ok(Connection::Single(
                ConnectionManager::new_with_config(self.client(url)?, self.config.clone()).await?,
            )),
            Topology::Cluster(nodes) => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .retries(2);
                if let Some(root_cert) = &self.ca_pem {
                    builder = builder.certs(redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert.clone()),
                    });
                }
                Ok(Connection::Cluster(
                    builder.build()?.get_async_connection().await?,
                ))
            }
            Topology::Sentinel {
                sentinels,
                primary,
                node,
            } => {
                // Asked anew at each connection: after a failover Sentinel
                // names the new primary.
                let mut sentinel = redis::sentinel::Sentinel::build(sentinels.clone())?;
                let info = redis::IntoConnectionInfo::into_connection_info(node.as_str())?;
                let settings = redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(info.redis_settings().clone());
                let settings = if node.starts_with("rediss://") {
                    settings.set_tls_mode(redis::TlsMode::Secure)
                } else {
                    settings
                };
                let found = tokio::time::timeout(
                    self.timeout,
                    sentinel.async_master_for(primary, Some(&settings)),
                )
                .await
                .map_err(|_| {
                    redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no sentinel answered in time",
                    ))
                })??;
                Ok(Connection::Single(
                    ConnectionManager::new_with_config(found, self.config.clone()).await?,
                ))
            }
        }
    }

    /// The connection, unless Redis failed in the last second.
    pub async fn connection(&self) -> Result<Connection, RedisUnavailable> {
        Ok((*self.shared_connection().await?).clone())
    }

    /// The shared connection itself (to tell, after a failure, whether it
    /// is still the current one).
    async fn shared_connection(&self) -> Result<std::sync::Arc<Connection>, RedisUnavailable> {
        let open = || now_ms() < self.open_until_ms.load(Ordering::Relaxed);
        if open() {
            return Err(RedisUnavailable::CircuitOpen);
        }
        if let Some(conn) = self.conn.load_full() {
            return Ok(conn);
        }
        let _connecting = self.connecting.lock().await;
        // Those who waited for a connection attempt that failed do not try
        // again one after another: the circuit it opened holds for them too.
        if open() {
            return Err(RedisUnavailable::CircuitOpen);
        }
        if let Some(conn) = self.conn.load_full() {
            return Ok(conn);
        }
        let conn = std::sync::Arc::new(self.connect().await.inspect_err(|_| self.trip())?);
        self.conn.store(Some(conn.clone()));
        Ok(conn)
    }

    /// Runs `f` on the connection; a failure opens the circuit. The call,
    /// named `operation` (the script or command), is a client span and a
    /// sample of `db.client.operation.duration`.
    pub async fn run<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, RedisUnavailable>
    where
        F: FnOnce(Connection) -> Fut,
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
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let shared = self.shared_connection().await?;
        match f((*shared).clone()).await {
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
                // (A response timeout is an I/O error too: it is judged
                // as a timeout.)
                let lost = !e.is_timeout()
                    && (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal());
                if lost || (e.is_timeout() && silent) {
                    self.trip();
                }
                // Sentinel's primary gone, or demoted to a replica (writes
                // refused as READONLY): ask Sentinel again next time, unless
                // a newer connection has replaced this one already (late
                // failures on the old one must not throw the new one away).
                if matches!(self.topology, Topology::Sentinel { .. })
                    && (lost
                        || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly))
                {
                    self.conn.compare_and_swap(&shared, None);
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

#[cfg(test)]
mod tests {
    use super::Topology;

    #[test]
    fn redis_urls_name_their_topology() {
        assert_eq!(
            Topology::parse("redis://127.0.0.1:6379/0").unwrap(),
            Topology::Single("redis://127.0.0.1:6379/0".into())
        );
        assert_eq!(
            Topology::parse("rediss+cluster://u:p@a:7000,b:7001/").unwrap(),
            Topology::Cluster(vec![
                "rediss://u:p@a:7000/".into(),
                "rediss://u:p@b:7001/".into()
            ])
        );
        assert_eq!(
            Topology::parse("redis+sentinel://:secret@s1:26379,s2:26379/gate/2").unwrap(),
            Topology::Sentinel {
                sentinels: vec!["redis://s1:26379/".into(), "redis://s2:26379/".into()],
                primary: "gate".into(),
                node: "redis://:secret@primary/2".into(),
            }
        );
        let error = Topology::parse("redis+sentinel://:hunter2@s1:26379/")
            .unwrap_err()
            .to_string();
        assert!(!error.contains("hunter2"), "{error}");
        for bad in [
            "127.0.0.1:6379",
            "http://a/",
            "redis+sentinel://s1:26379/",
            "redis+ring://a/",
            "redis+cluster:///",
        ] {
            assert!(Topology::parse(bad).is_err(), "{bad}");
        }
    }
}
