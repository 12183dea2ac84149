//! `key-issuance`: runs the key issuance service, or applies its migrations.

use clap::Parser;
use tokio_util::sync::CancellationToken;
use trainingkeys_key_issuance::{Application, Config, MIGRATOR, SCHEMA};

#[derive(Parser)]
#[command(version, about = "Training Keys key issuance service")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry =
        trainingkeys_shared::telemetry::init("key-issuance", cli.config.common.log_format)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            let common = &cli.config.common;
            let pool = trainingkeys_shared::db::connect(&common.database_url, SCHEMA, 2)?;
            trainingkeys_shared::db::migrate(&pool, SCHEMA, &MIGRATOR).await?;
            tracing::info!("migrations applied");
        }
        Command::Serve => {
            let app = Application::build(cli.config).await?;
            let shutdown = CancellationToken::new();
            trainingkeys_shared::server::cancel_on_signal(shutdown.clone());
            app.run(shutdown).await?;
        }
    }
    Ok(())
}
