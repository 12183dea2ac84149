//! Configuration shared by every service, read from environment variables
//! (or flags) with clap. Each service flattens [`CommonConfig`] into its own.

use std::time::Duration;

/// Output format of the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Settings every service shares.
#[derive(Clone, Debug, clap::Args)]
pub struct CommonConfig {
    /// PostgreSQL connection URL. Each service keeps its tables in its own
    /// schema. `?sslmode=verify-full&sslrootcert=<CA file>` for TLS. Its
    /// value (credentials included) is never shown by `--help`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Most PostgreSQL connections this process opens.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 20)]
    pub database_max_connections: u32,

    /// Log format: `text` or `json`. The level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Apply this service's migrations when `serve` starts (`serve
    /// --migrate` does the same). Off by default: in production a
    /// migration Job (`<service> migrate`) runs them, once, before the
    /// rollout. With the database down the service starts anyway, NOT_SERVING,
    /// and applies them when it returns.
    #[arg(long = "migrate-on-start", env = "MIGRATE_ON_START", default_value_t = false, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    /// Serve Prometheus metrics (`GET /metrics`), and liveness (`GET
    /// /livez`) and readiness (`GET /readyz`: 200 or 503) for HTTP probes
    /// and load balancers, in plaintext on this address, e.g.
    /// `0.0.0.0:9464`. Off when unset.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Seconds a replica keeps accepting calls after SIGTERM / Ctrl-C while
    /// its readiness already says NOT_SERVING, so load balancers and
    /// endpoint lists stop sending to it before it stops listening. Then
    /// in-flight calls drain within `SHUTDOWN_GRACE_SECONDS`.
    #[arg(long, env = "SHUTDOWN_DELAY_SECONDS", default_value_t = 0)]
    pub shutdown_delay_seconds: u64,

    /// Seconds in-flight calls get to finish after SIGTERM / Ctrl-C.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 10)]
    pub shutdown_grace_seconds: u64,

    /// Close each client connection after this many seconds (plus up to 10 %
    /// jitter) so long-lived HTTP/2 clients re-balance; 0 = never.
    #[arg(long, env = "MAX_CONNECTION_AGE_SECONDS", default_value_t = 0)]
    pub max_connection_age_seconds: u64,

    /// Most calls this process handles at once (a call counts until its
    /// answer starts: an export's streamed rows do not); beyond it a call
    /// is refused at once with UNAVAILABLE `OVERLOADED` and a RetryInfo
    /// delay, before any work, rather than queued until it times out.
    /// Health checks, and calls from this project's services (a service
    /// certificate), are never refused.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,

    /// Longest a call may take to be answered, reading its request
    /// included; past it the call ends with CANCELLED. Bounds how long a
    /// client that opens a call and never finishes sending it can hold one
    /// of the `MAX_IN_FLIGHT` places. (A streamed answer, an export's rows,
    /// is not bounded by it once it has started.)
    #[arg(long, env = "CALL_TIMEOUT_SECONDS", default_value_t = 30)]
    pub call_timeout_seconds: u64,

    /// Most concurrent HTTP/2 streams (calls) one client connection may
    /// open; a client queues the rest on its side. Bounds what one
    /// connection can make this process buffer, so a burst over a few
    /// connections never trips HTTP/2's flood protections (which drop the
    /// whole connection with every call on it).
    #[arg(long, env = "HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub http2_max_concurrent_streams: u32,

    /// Also serve `grpc.health.v1.Health` alone, without TLS, on this
    /// address: for Kubernetes gRPC probes, which cannot speak TLS. It
    /// answers health checks and nothing else.
    #[arg(long, env = "HEALTH_LISTEN_ADDR")]
    pub health_listen_addr: Option<std::net::SocketAddr>,

    /// TLS for gRPC, served and called.
    #[command(flatten)]
    pub tls: crate::tls::TlsConfig,

    /// Caller authentication (bearer tokens, service identities).
    #[command(flatten)]
    pub auth: crate::auth::AuthConfig,
}

/// A configuration as its binary reads it from these flags, ignoring the
/// environment: the one way tests and tools configure a service. Every
/// default comes from the clap definitions, so none is restated.
pub fn from_flags<C: clap::Args + clap::FromArgMatches>(flags: &[&str]) -> anyhow::Result<C> {
    let command = C::augment_args(clap::Command::new("config"))
        .mut_args(|arg| arg.env(None::<&str>))
        .no_binary_name(true);
    let matches = command.try_get_matches_from(flags)?;
    Ok(C::from_arg_matches(&matches)?)
}

impl CommonConfig {
    /// The bounded wait for in-flight calls on shutdown.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }

    /// The maximum connection age, if any.
    pub fn max_connection_age(&self) -> Option<Duration> {
        (self.max_connection_age_seconds > 0)
            .then(|| Duration::from_secs(self.max_connection_age_seconds))
    }
}
