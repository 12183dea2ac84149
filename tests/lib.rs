//! The test harness: fresh databases on the PostgreSQL server named by
//! `DATABASE_URL` (started by `make test`), and the real services spawned on
//! ephemeral ports, called over real gRPC. `TEST_LOG=1` prints service logs.
//! Tests start a [`TestApp`] and assert with [`assert_status`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod app;
pub mod chaos;
pub mod pki;
pub mod servers;

pub use app::{
    TestApp, as_new, as_user, class_request, class_scope, enrollment, idem, org, pool_scope,
    statements_run, uuid,
};

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use trainingkeys_shared::cli::Service;
use trainingkeys_shared::config::CommonConfig;

/// The server `make test` started, from `DATABASE_URL`.
pub fn server_database_url() -> String {
    std::env::var("DATABASE_URL").expect("DATABASE_URL must be set: run the tests with `make test`")
}

/// A new, empty database on the test server; returns its URL.
pub async fn fresh_database() -> String {
    let server = server_database_url();
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = PgConnection::connect(&server)
        .await
        .expect("connect to the test PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (base, _) = server
        .rsplit_once('/')
        .expect("DATABASE_URL has a database name");
    format!("{base}/{name}")
}

/// A service running in this process on an ephemeral port.
pub struct Spawned {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Cancel to shut it down.
    pub shutdown: CancellationToken,
    /// Its serve loop; finishes after shutdown.
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl Spawned {
    /// `https://addr`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A fresh TLS channel to the service whose calls carry the harness's
    /// operator token.
    pub async fn channel(&self) -> pki::Authed {
        pki::operator(&self.url())
    }

    /// A fresh TLS channel presenting `identity`'s certificate, without a token.
    pub fn channel_as(&self, identity: &str) -> Channel {
        pki::channel(&self.url(), identity)
    }

    /// Shuts the service down and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }
}

/// What every service under test shares: a short shutdown grace, its
/// migrations applied on start, and TLS
/// with `name`'s certificate and the test JWKS.
pub fn for_tests(common: &mut CommonConfig, name: &str) {
    common.shutdown_grace_seconds = 2;
    common.migrate_on_start = true;
    pki::pki().configure(common, name);
}

/// The enrollment service on `database_url`.
pub async fn spawn_enrollment(database_url: &str) -> Spawned {
    trainingkeys_shared::telemetry::init_for_tests();
    let mut config = trainingkeys_enrollment::Config::for_tests(database_url).unwrap();
    for_tests(&mut config.common, "enrollment");
    spawn::<trainingkeys_enrollment::Application>(config).await
}

/// Builds service `S` (connect, migrate, bind) and serves it on this runtime
/// until its `shutdown` is cancelled.
pub async fn spawn<S>(config: S::Config) -> Spawned
where
    S: Service + Send + 'static,
{
    let app = S::build(config)
        .await
        .unwrap_or_else(|e| panic!("build {}: {e:#}", S::NAME));
    let addr = app.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run(shutdown.clone()));
    Spawned {
        addr,
        shutdown,
        handle,
    }
}

/// The HMAC secret key issuance uses in tests (hex, 32 bytes).
pub const TEST_HMAC_SECRET: &str =
    "6b65792d69737375616e63652d746573742d686d61632d7365637265742d3332";
/// The encryption key key issuance uses in tests (hex, 32 bytes).
pub const TEST_ENCRYPTION_KEY: &str =
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// The key issuance service on `database_url`, asking the enrollment service
/// at `enrollment_url`.
pub async fn spawn_key_issuance(database_url: &str, enrollment_url: &str) -> Spawned {
    trainingkeys_shared::telemetry::init_for_tests();
    let mut config = trainingkeys_key_issuance::Config::for_tests(
        database_url,
        enrollment_url,
        TEST_HMAC_SECRET,
        TEST_ENCRYPTION_KEY,
    )
    .unwrap();
    for_tests(&mut config.common, "key-issuance");
    spawn::<trainingkeys_key_issuance::Application>(config).await
}

/// The ErrorInfo reason of a status.
pub fn reason(status: &tonic::Status) -> String {
    trainingkeys_shared::error::reason(status).unwrap_or_default()
}

/// Asserts a call failed with `code` and `reason`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    reason_: &str,
) -> tonic::Status {
    let status = result.expect_err("expected an error status");
    assert_eq!(status.code(), code, "wrong code: {status:?}");
    assert_eq!(reason(&status), reason_, "wrong reason: {status:?}");
    status
}

/// One metadata entry of a status's ErrorInfo.
pub fn error_metadata(status: &tonic::Status, key: &str) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .and_then(|i| i.metadata.get(key).cloned())
        .unwrap_or_default()
}

/// The field an INVALID_FIELD status names.
pub fn invalid_field(status: &tonic::Status) -> String {
    error_metadata(status, "field")
}

/// Asserts a call was refused as INVALID_ARGUMENT / INVALID_FIELD naming `field`.
#[track_caller]
pub fn assert_invalid_field<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    field: &str,
) -> tonic::Status {
    let status = assert_status(result, tonic::Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(invalid_field(&status), field, "wrong field: {status:?}");
    status
}

/// Spawns every call at once and runs `fault` once `after` of them have
/// finished; their results, in order. (A herd with a fault striking mid-way.)
pub async fn spawn_with_fault<T, C, F, Fut>(
    calls: impl IntoIterator<Item = C>,
    after: usize,
    fault: F,
) -> Vec<T>
where
    T: Send + 'static,
    C: std::future::Future<Output = T> + Send + 'static,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handles: Vec<_> = calls
        .into_iter()
        .map(|call| {
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = call.await;
                let _ = tx.send(());
                result
            })
        })
        .collect();
    drop(tx);
    for _ in 0..after {
        rx.recv().await;
    }
    fault().await;
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(h.await.expect("a call's task"));
    }
    results
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
