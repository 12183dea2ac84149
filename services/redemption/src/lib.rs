//! The redemption service: the public entry point that validates and redeems
//! training keys by orchestrating key-issuance and enrollment. It owns the
//! redemption log (also the idempotency record), the Redis admission gate,
//! the guessing limits, and the recovery loop that finishes or compensates
//! redemptions a crash left half-way.

pub mod clients;
pub mod coalesce;
pub mod domain;
pub mod error;
pub mod gate;
pub mod grpc;
pub mod limiter;
pub mod metrics;
pub mod recovery;
pub mod redeem;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trainingkeys_proto::v1::redemption_service_server::{RedemptionServiceServer, SERVICE_NAME};
use trainingkeys_shared::config::CommonConfig;
use trainingkeys_shared::server::{self, Prepared, ServeOptions};

/// The PostgreSQL schema this service owns.
pub const SCHEMA: &str = "redemption";

/// This service's migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub use redeem::{FaultAction, FaultPoint};

/// Configuration of the redemption service.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Address to listen on for gRPC.
    #[arg(long, env = "REDEMPTION_LISTEN_ADDR", default_value = "0.0.0.0:50053")]
    pub listen_addr: SocketAddr,

    /// The enrollment service.
    #[arg(
        long,
        env = "ENROLLMENT_URL",
        default_value = "https://127.0.0.1:50051"
    )]
    pub enrollment_url: String,

    /// The key-issuance service.
    #[arg(
        long,
        env = "KEY_ISSUANCE_URL",
        default_value = "https://127.0.0.1:50052"
    )]
    pub key_issuance_url: String,

    /// Redis for the admission gate and the guessing limits. Redemption keeps
    /// working (PostgreSQL guard only) while it is unreachable.
    /// `rediss://` for TLS. Its value (a password included) is never shown
    /// by `--help`.
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379/",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// PEM CA bundle verifying a `rediss://` server (default: the public
    /// web roots).
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// Milliseconds before a Redis command gives up. It counts from when the
    /// call is queued in this process, so under a herd the process's own CPU
    /// queue is part of it: too short, and a burst bypasses the gate just
    /// when it is needed (at 500 ms, a 5,000-student burst on 2 cores did).
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 2000)]
    pub redis_timeout_ms: u64,

    /// Use the Redis admission gate (false: PostgreSQL guard only, for comparison).
    #[arg(long, env = "GATE_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub gate_enabled: bool,

    /// Seconds a seat hold lives in the gate if its redemption never settles.
    #[arg(long, env = "GATE_HOLD_SECONDS", default_value_t = 30)]
    pub gate_hold_seconds: u64,

    /// Seconds a class's gate state is trusted before it is rebuilt from
    /// enrollment anyway (a safety net: a cancelled seat is noticed within a second).
    #[arg(long, env = "GATE_STATE_TTL_SECONDS", default_value_t = 60)]
    pub gate_state_ttl_seconds: u64,

    /// Milliseconds an event key's resolution is reused, and a class's facts
    /// (its maximum, dates, organization) may be used to turn a student away
    /// from a full class by Redis alone, with no PostgreSQL statement. A
    /// revoked or disabled event key, a raised maximum, a cancelled seat or
    /// a changed date counts within this (at most 10,000).
    #[arg(long, env = "FACTS_KEEP_MS", default_value_t = 1000)]
    pub facts_keep_ms: u64,

    /// Failed attempts (unknown or mistyped codes) a caller or user may make
    /// per window before being locked out.
    #[arg(long, env = "GUESS_LIMIT", default_value_t = 10)]
    pub guess_limit: u32,

    /// Addresses (IPs or CIDR blocks, comma-separated) of the proxies whose
    /// `x-forwarded-for` is believed: the caller is the right-most address
    /// in it that is not one of them. Empty (the default): the header is
    /// ignored and the caller is the connection's peer.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,

    /// Failed attempts per window across the whole service: once spent,
    /// any caller or user with a failure of its own in the window is
    /// refused (students with a clean record go on), so rotating
    /// identities does not buy unlimited guesses. A metric counts the
    /// refusals.
    #[arg(long, env = "GUESS_GLOBAL_LIMIT", default_value_t = 1000)]
    pub guess_global_limit: u32,

    /// Seconds of the failed-attempt window; the lock-out doubles with each
    /// further failure.
    #[arg(long, env = "GUESS_WINDOW_SECONDS", default_value_t = 60)]
    pub guess_window_seconds: u64,

    /// Longest lock-out, in seconds.
    #[arg(long, env = "GUESS_MAX_LOCKOUT_SECONDS", default_value_t = 3600)]
    pub guess_max_lockout_seconds: u64,

    /// Seconds a redemption may take before the client gets UNAVAILABLE
    /// (it is then finished by recovery).
    #[arg(long, env = "REDEMPTION_TIMEOUT_SECONDS", default_value_t = 10)]
    pub redemption_timeout_seconds: u64,

    /// Seconds a redemption's driver may go without renewing its lease
    /// before a retry or recovery takes the redemption over. Must exceed
    /// REDEMPTION_TIMEOUT_SECONDS (the service refuses to start otherwise).
    #[arg(long, env = "RECOVERY_AFTER_SECONDS", default_value_t = 30)]
    pub recovery_after_seconds: u64,

    /// Seconds between recovery sweeps.
    #[arg(long, env = "RECOVERY_INTERVAL_SECONDS", default_value_t = 5)]
    pub recovery_interval_seconds: u64,

    /// Test-only: never rebuild a class's gate state from enrollment (missing
    /// state is taken as empty), to show that the chaos checker catches a gate
    /// that disagrees with PostgreSQL.
    #[arg(
        long,
        env = "GATE_REBUILD_DISABLED",
        hide = true,
        default_value_t = false
    )]
    pub gate_rebuild_disabled: bool,

    /// Milliseconds before a call to enrollment or key-issuance gives up
    /// (an outage: retried, then the redemption is left for a retry or
    /// recovery to drive on).
    #[arg(long, env = "PEER_TIMEOUT_MS", default_value_t = 5000)]
    pub peer_timeout_ms: u64,

    /// Test-only fault injection: where a redemption's first driver stops.
    #[arg(long, env = "REDEMPTION_FAULT", hide = true)]
    pub fault: Option<FaultPoint>,

    /// Test-only: what the fault does (hang, stall, panic).
    #[arg(
        long,
        env = "REDEMPTION_FAULT_ACTION",
        hide = true,
        default_value = "hang"
    )]
    pub fault_action: FaultAction,

    /// Test-only: milliseconds a `stall` fault lasts.
    #[arg(
        long,
        env = "REDEMPTION_FAULT_STALL_MS",
        hide = true,
        default_value_t = 0
    )]
    pub fault_stall_ms: u64,

    /// Settings shared by every service.
    #[command(flatten)]
    pub common: CommonConfig,
}

impl Config {
    /// Defaults (as the binary has them) on the given database, services
    /// and Redis, on a free port.
    pub fn for_tests(
        database_url: &str,
        enrollment_url: &str,
        key_issuance_url: &str,
        redis_url: &str,
    ) -> anyhow::Result<Self> {
        trainingkeys_shared::config::from_flags(&[
            "--database-url",
            database_url,
            "--listen-addr",
            "127.0.0.1:0",
            "--enrollment-url",
            enrollment_url,
            "--key-issuance-url",
            key_issuance_url,
            "--redis-url",
            redis_url,
        ])
    }
}

/// Longest FACTS_KEEP_MS.
const MAX_FACTS_KEEP_MS: u64 = 10_000;

/// A bound, migrated redemption service with every collaborator built,
/// ready to [`run`](Self::run).
pub struct Application {
    prepared: Prepared,
    redeemer: Arc<redeem::Redeemer>,
    trusted_proxies: Vec<ipnet::IpNet>,
    config: Config,
}

impl trainingkeys_shared::cli::Service for Application {
    type Config = Config;
    const NAME: &'static str = "redemption";
    const SCHEMA: &'static str = SCHEMA;

    fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }

    fn common(config: &Config) -> &CommonConfig {
        &config.common
    }

    fn common_mut(config: &mut Config) -> &mut CommonConfig {
        &mut config.common
    }

    /// Checks the settings, connects, migrates, builds the clients, Redis,
    /// gate, limiter and flow, and binds (port 0 picks a free port): a bad
    /// setting fails here, before the port is bound.
    async fn build(config: Config) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config.recovery_after_seconds > config.redemption_timeout_seconds,
            "RECOVERY_AFTER_SECONDS ({}) must be greater than REDEMPTION_TIMEOUT_SECONDS ({}): \
             a redemption may not be taken over while a client can still be waiting on its driver",
            config.recovery_after_seconds,
            config.redemption_timeout_seconds
        );
        anyhow::ensure!(
            config.facts_keep_ms <= MAX_FACTS_KEEP_MS,
            "FACTS_KEEP_MS ({}) must be at most {MAX_FACTS_KEEP_MS}: that long a revoked event \
             key, a raised maximum or a cancelled seat may go unnoticed",
            config.facts_keep_ms
        );
        let trusted_proxies = grpc::trusted_proxies(&config.trusted_proxies)?;
        let security = server::security(&config.common)?;
        let clients = clients::Clients::new(
            &config.enrollment_url,
            &config.key_issuance_url,
            Duration::from_millis(config.peer_timeout_ms),
            security.tls.as_ref(),
        )?;
        let redis_ca = match &config.redis_ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("REDIS_CA_FILE {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let redis = Arc::new(trainingkeys_shared::redis::Redis::new(
            &config.redis_url,
            Duration::from_millis(config.redis_timeout_ms),
            redis_ca,
        )?);
        let gate = gate::Gate::new(
            redis.clone(),
            config.gate_enabled,
            Duration::from_secs(config.gate_hold_seconds),
            Duration::from_secs(config.gate_state_ttl_seconds),
            !config.gate_rebuild_disabled,
        );
        let limiter = limiter::Limiter::new(
            redis,
            config.guess_limit,
            Duration::from_secs(config.guess_window_seconds),
            Duration::from_secs(config.guess_max_lockout_seconds),
            config.guess_global_limit,
            // An attempt in flight lapses once no driver can still be on it.
            Duration::from_secs(config.recovery_after_seconds),
        );
        let prepared = server::prepare(
            security,
            &config.common,
            SCHEMA,
            &MIGRATOR,
            config.listen_addr,
        )
        .await?;
        let redeemer = Arc::new(redeem::Redeemer::new(
            store::Store::new(prepared.pool.clone()),
            clients,
            gate,
            limiter,
            redeem::Settings {
                facts_keep: Duration::from_millis(config.facts_keep_ms),
                timeout: Duration::from_secs(config.redemption_timeout_seconds),
                take_over_after: Duration::from_secs(config.recovery_after_seconds),
                fault: config.fault.map(|point| redeem::Fault {
                    point,
                    action: config.fault_action,
                    stall: Duration::from_millis(config.fault_stall_ms),
                }),
            },
        ));
        Ok(Self {
            prepared,
            redeemer,
            trusted_proxies,
            config,
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.prepared.local_addr()
    }

    /// Serves (and runs recovery) until `shutdown` is cancelled.
    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let redeemer = self.redeemer;
        redeemer.observe_redis().await;
        let recovery = tokio::spawn(recovery::run(
            redeemer.clone(),
            Duration::from_secs(self.config.recovery_interval_seconds),
            shutdown.clone(),
        ));
        let routes = tonic::service::Routes::new(RedemptionServiceServer::new(
            grpc::RedemptionGrpc::new(redeemer, self.trusted_proxies),
        ));
        let options = ServeOptions::new(SERVICE_NAME, self.prepared, &self.config.common);
        let served = server::serve(routes, options, shutdown).await;
        recovery.abort();
        served
    }
}
