//! The one `main` every service binary shares: parse the configuration from
//! flags and environment, start telemetry, then either serve until SIGTERM /
//! Ctrl-C or apply the migrations and exit.

use std::future::Future;

use clap::{CommandFactory as _, FromArgMatches as _};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

use crate::config::CommonConfig;

/// What a service binary provides to [`main`].
pub trait Service: Sized {
    /// The service's configuration (its own settings plus [`CommonConfig`]).
    type Config: clap::Args + Send + 'static;
    /// Process name, used in logs and traces.
    const NAME: &'static str;
    /// The PostgreSQL schema it owns.
    const SCHEMA: &'static str;
    /// Its migrations.
    fn migrator() -> &'static Migrator;
    /// The shared part of its configuration.
    fn common(config: &Self::Config) -> &CommonConfig;
    /// The shared part of its configuration, to change.
    fn common_mut(config: &mut Self::Config) -> &mut CommonConfig;
    /// Connects, migrates and binds.
    fn build(config: Self::Config) -> impl Future<Output = anyhow::Result<Self>> + Send;
    /// The address it is bound to (after [`build`](Self::build)).
    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr>;
    /// Serves until `shutdown` is cancelled.
    fn run(self, shutdown: CancellationToken) -> impl Future<Output = anyhow::Result<()>> + Send;
}

#[derive(clap::Parser)]
struct Cli<C: clap::Args> {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: C,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve {
        /// Apply the migrations first (as `MIGRATE_ON_START=true` does).
        #[arg(long)]
        migrate: bool,
    },
    /// Apply database migrations and exit.
    Migrate,
}

/// Runs service `S` as a process: `S::NAME [serve|migrate] [flags]`.
pub async fn main<S: Service>() -> anyhow::Result<()> {
    let command = Cli::<S::Config>::command()
        .name(S::NAME)
        .about(format!("Training Keys {} service", S::NAME))
        .version(env!("CARGO_PKG_VERSION"));
    let mut cli = Cli::<S::Config>::from_arg_matches(&command.get_matches())?;
    let _telemetry = crate::telemetry::init(S::NAME, S::common(&cli.config).log_format)?;
    match cli.command.unwrap_or(Command::Serve { migrate: false }) {
        Command::Migrate => {
            let common = S::common(&cli.config);
            let pool = crate::db::connect(&common.database_url, S::SCHEMA, 2)?;
            crate::db::migrate(&pool, S::SCHEMA, S::migrator()).await?;
            tracing::info!(schema = S::SCHEMA, "migrations applied");
        }
        Command::Serve { migrate } => {
            if migrate {
                S::common_mut(&mut cli.config).migrate_on_start = true;
            }
            let service = S::build(cli.config).await?;
            let shutdown = CancellationToken::new();
            crate::server::cancel_on_signal(shutdown.clone());
            service.run(shutdown).await?;
        }
    }
    Ok(())
}
