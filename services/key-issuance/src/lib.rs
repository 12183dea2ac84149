//! The key issuance service: training keys and key pools, their generation
//! (OS CSPRNG, check symbol), validity windows, listing, CSV export,
//! notification text, and the resolve / consume / release calls redemption
//! makes. It asks the enrollment service over gRPC about classes and
//! profiles and never reads enrollment's tables. Codes are stored as an HMAC
//! and a ciphertext, never plain.

pub mod code;
pub mod copy;
pub mod domain;
pub mod enrollment;
pub mod error;
pub mod export;
pub mod generate;
pub mod grpc;
pub mod render;
pub mod secrets;
pub mod service;
pub mod store;
pub mod tenancy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trainingkeys_proto::v1::key_issuance_service_server::{KeyIssuanceServiceServer, SERVICE_NAME};
use trainingkeys_shared::config::CommonConfig;
use trainingkeys_shared::server::{self, Prepared, ServeOptions};

pub use secrets::SecretString;

/// The PostgreSQL schema this service owns.
pub const SCHEMA: &str = "key_issuance";

/// This service's migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Largest gRPC message accepted or sent. Requests are small and exports are
/// streamed in 64 KiB chunks; class key responses (≤ 10,000 keys) stay under it.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Configuration of the key issuance service.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Address to listen on for gRPC.
    #[arg(
        long,
        env = "KEY_ISSUANCE_LISTEN_ADDR",
        default_value = "0.0.0.0:50052"
    )]
    pub listen_addr: SocketAddr,

    /// URL of the enrollment service, asked about classes and profiles.
    #[arg(
        long,
        env = "ENROLLMENT_URL",
        default_value = "https://127.0.0.1:50051"
    )]
    pub enrollment_url: String,

    /// Seconds a call to the enrollment service may take.
    #[arg(long, env = "ENROLLMENT_TIMEOUT_SECONDS", default_value_t = 5)]
    pub enrollment_timeout_seconds: u64,

    /// Secret keying the HMAC-SHA256 that finds codes: at least 32 bytes,
    /// raw or as 64+ hex characters. Required.
    #[arg(long, env = "KEY_HMAC_SECRET", hide_env_values = true)]
    pub key_hmac_secret: SecretString,

    /// Retired HMAC secrets, comma-separated, still tried on lookup so keys
    /// stored under them keep working after a rotation.
    #[arg(
        long,
        env = "KEY_HMAC_OLD_SECRETS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub key_hmac_old_secrets: SecretString,

    /// AES-256-GCM key sealing codes for display: 32 bytes as 64 hex characters. Required.
    #[arg(long, env = "KEY_ENCRYPTION_KEY", hide_env_values = true)]
    pub key_encryption_key: SecretString,

    /// Id stored with every code sealed by `KEY_ENCRYPTION_KEY` (change it when rotating).
    #[arg(long, env = "KEY_ENCRYPTION_KEY_ID", default_value_t = 1)]
    pub key_encryption_key_id: i16,

    /// Retired encryption keys still needed to read older rows: `id:hex,id:hex`.
    #[arg(
        long,
        env = "KEY_ENCRYPTION_OLD_KEYS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub key_encryption_old_keys: SecretString,

    /// Settings shared by every service.
    #[command(flatten)]
    pub common: CommonConfig,
}

impl Config {
    /// The parsed code secrets; fails (without echoing them) when malformed.
    pub fn keyring(&self) -> Result<secrets::Keyring, secrets::ConfigError> {
        secrets::Keyring::new(
            self.key_hmac_secret.expose(),
            self.key_hmac_old_secrets.expose(),
            self.key_encryption_key.expose(),
            self.key_encryption_key_id,
            self.key_encryption_old_keys.expose(),
        )
    }
}

impl Config {
    /// Defaults (as the binary has them) on the given database and
    /// enrollment service, with these secrets, on a free port.
    pub fn for_tests(
        database_url: &str,
        enrollment_url: &str,
        hmac_secret: &str,
        encryption_key: &str,
    ) -> anyhow::Result<Self> {
        trainingkeys_shared::config::from_flags(&[
            "--database-url",
            database_url,
            "--listen-addr",
            "127.0.0.1:0",
            "--enrollment-url",
            enrollment_url,
            "--key-hmac-secret",
            hmac_secret,
            "--key-encryption-key",
            encryption_key,
        ])
    }
}

/// A migrated key issuance service bound to its port, ready to run.
pub struct Application {
    prepared: Prepared,
    service: service::KeyService,
    config: Config,
}

impl trainingkeys_shared::cli::Service for Application {
    type Config = Config;
    const NAME: &'static str = "key-issuance";
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

    /// Checks the secrets and the enrollment URL, then connects to
    /// PostgreSQL, applies migrations and binds the listener (port 0 picks a
    /// free port): a bad setting fails before the port is bound. The
    /// enrollment client connects lazily.
    async fn build(config: Config) -> anyhow::Result<Self> {
        let keyring = Arc::new(config.keyring()?);
        let security = server::security(&config.common)?;
        let enrollment = enrollment::Enrollment::connect(
            &config.enrollment_url,
            Duration::from_secs(config.enrollment_timeout_seconds),
            security.tls.as_ref(),
        )?;
        let prepared = server::prepare(
            security,
            &config.common,
            SCHEMA,
            &MIGRATOR,
            config.listen_addr,
        )
        .await?;
        let service = service::KeyService::new(
            store::Store::new(prepared.pool.clone()),
            enrollment,
            keyring,
        );
        Ok(Self {
            prepared,
            service,
            config,
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.prepared.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains in-flight calls.
    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let service = KeyIssuanceServiceServer::new(grpc::KeyIssuanceGrpc::new(self.service))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let routes = tonic::service::Routes::new(service);
        let options = ServeOptions::new(SERVICE_NAME, self.prepared, &self.config.common);
        server::serve(routes, options, shutdown).await
    }
}
