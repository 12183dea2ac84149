//! The enrollment service: the system of record for users, classes,
//! subscription profiles, the roster and subscription assignments. Its
//! PostgreSQL transaction is the final guard on every class's capacity.

pub mod domain;
pub mod error;
pub mod grpc;
pub mod seats;
pub mod store;

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use trainingkeys_proto::v1::enrollment_service_server::{EnrollmentServiceServer, SERVICE_NAME};
use trainingkeys_shared::config::CommonConfig;
use trainingkeys_shared::server::{self, Prepared, ServeOptions};

/// The PostgreSQL schema this service owns.
pub const SCHEMA: &str = "enrollment";

/// This service's migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Configuration of the enrollment service.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Address to listen on for gRPC.
    #[arg(long, env = "ENROLLMENT_LISTEN_ADDR", default_value = "0.0.0.0:50051")]
    pub listen_addr: SocketAddr,

    /// Settings shared by every service.
    #[command(flatten)]
    pub common: CommonConfig,
}

impl Config {
    /// Defaults (as the binary has them) on the given database, on a free port.
    pub fn for_tests(database_url: &str) -> anyhow::Result<Self> {
        trainingkeys_shared::config::from_flags(&[
            "--database-url",
            database_url,
            "--listen-addr",
            "127.0.0.1:0",
        ])
    }
}

/// A migrated enrollment service bound to its port, ready to run.
pub struct Application {
    prepared: Prepared,
    store: store::Store,
    config: Config,
}

impl trainingkeys_shared::cli::Service for Application {
    type Config = Config;
    const NAME: &'static str = "enrollment";
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

    /// Connects to PostgreSQL, applies migrations and binds the listener
    /// (port 0 picks a free port; see `local_addr`).
    async fn build(config: Config) -> anyhow::Result<Self> {
        let security = server::security(&config.common)?;
        let prepared = server::prepare(
            security,
            &config.common,
            SCHEMA,
            &MIGRATOR,
            config.listen_addr,
        )
        .await?;
        Ok(Self {
            store: store::Store::new(prepared.pool.clone()),
            prepared,
            config,
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.prepared.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains in-flight calls.
    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let service = grpc::EnrollmentGrpc::new(self.store);
        let routes = tonic::service::Routes::new(EnrollmentServiceServer::new(service));
        let options = ServeOptions::new(SERVICE_NAME, self.prepared, &self.config.common);
        server::serve(routes, options, shutdown).await
    }
}
