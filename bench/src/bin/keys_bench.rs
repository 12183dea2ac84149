//! `keys-bench` (`make bench`), a benchmark, not part of the service: starts the release `enrollment` and
//! `key-issuance` binaries (found next to this one) as child processes
//! against a fresh database on `DATABASE_URL`'s server, generates
//! `BENCH_KEYS` (default 1,000,000) subscription keys in one call, exports
//! them with ExportKeys, checks the row count, and samples the key issuance
//! process's resident memory during the export. Prints the figures.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use rand::TryRng as _;
use sqlx::{Connection, PgConnection};
use trainingkeys_devtools::{Authed, DevClient};
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use trainingkeys_proto::v1::export_keys_request::Scope;
use trainingkeys_proto::v1::key_issuance_service_client::KeyIssuanceServiceClient;

/// Kills a child process when dropped, so a failed bench leaves nothing running.
struct Service {
    name: &'static str,
    child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped {}", self.name);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(trainingkeys_shared::server::unused_port()?)
}

fn secret_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| anyhow::anyhow!("OS random source: {e}"))?;
    Ok(hex::encode(bytes))
}

fn start(
    name: &'static str,
    bin_dir: &std::path::Path,
    env: &[(&str, String)],
) -> anyhow::Result<Service> {
    let mut command = Command::new(bin_dir.join(name));
    command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .env("RUST_LOG", "warn")
        // A fresh database: each service makes its schema as it starts.
        .env("MIGRATE_ON_START", "true");
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command
        .spawn()
        .with_context(|| format!("start {} (run `make bench`)", bin_dir.join(name).display()))?;
    Ok(Service { name, child })
}

/// A TLS channel to `url` with an operator's token for organization
/// `bench`, once the service answers.
async fn connect(dev: &DevClient, url: &str) -> anyhow::Result<Authed> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let bearer = dev.operator(&["bench"])?;
    loop {
        let mut channel = dev.authed(url, Duration::from_secs(600), &bearer)?;
        let ready = tonic_health::pb::health_client::HealthClient::new(&mut channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(|_| ());
        match ready {
            Ok(()) => return Ok(channel),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!("connect to {url}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// (VmRSS, VmHWM) of a process in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: i32 = std::env::var("BENCH_KEYS")
        .ok()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let server_url = std::env::var("DATABASE_URL")
        .context("DATABASE_URL must be set (make bench sources .run/env)")?;
    let bin_dir: PathBuf = std::env::current_exe()?
        .parent()
        .context("no binary directory")?
        .to_path_buf();

    // A fresh database, dropped at the end.
    let db_name = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&server_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .execute(&mut admin)
        .await?;
    let (base, _) = server_url
        .rsplit_once('/')
        .context("DATABASE_URL has no database name")?;
    let database_url = format!("{base}/{db_name}");

    let result = run(count, &bin_dir, &database_url).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    result
}

async fn run(count: i32, bin_dir: &std::path::Path, database_url: &str) -> anyhow::Result<()> {
    // TLS and tokens from make run's development CA and signing key.
    let dev_dir = PathBuf::from(std::env::var("TK_DEV_DIR").unwrap_or_else(|_| ".run/dev".into()));
    trainingkeys_devtools::init(&dev_dir)?;
    let dev = DevClient::open(&dev_dir)?;
    let file = |name: &str| dev_dir.join(name).display().to_string();
    let security = |service: &str| {
        [
            ("TLS_CERT_FILE", file(&format!("{service}.pem"))),
            ("TLS_KEY_FILE", file(&format!("{service}-key.pem"))),
            ("TLS_CA_FILE", file("ca.pem")),
            ("JWKS_FILE", file("jwks.json")),
        ]
    };
    let enrollment_addr = format!("127.0.0.1:{}", free_port()?);
    let keys_addr = format!("127.0.0.1:{}", free_port()?);
    let _enrollment = start(
        "enrollment",
        bin_dir,
        &[
            ("DATABASE_URL", database_url.to_owned()),
            ("ENROLLMENT_LISTEN_ADDR", enrollment_addr.clone()),
        ]
        .into_iter()
        .chain(security("enrollment"))
        .collect::<Vec<_>>(),
    )?;
    let keys = start(
        "key-issuance",
        bin_dir,
        &[
            ("DATABASE_URL", database_url.to_owned()),
            ("KEY_ISSUANCE_LISTEN_ADDR", keys_addr.clone()),
            ("ENROLLMENT_URL", format!("https://{enrollment_addr}")),
            ("KEY_HMAC_SECRET", secret_hex()?),
            ("KEY_ENCRYPTION_KEY", secret_hex()?),
        ]
        .into_iter()
        .chain(security("key-issuance"))
        .collect::<Vec<_>>(),
    )?;
    let pid = keys.child.id();

    let mut enrollment =
        EnrollmentServiceClient::new(connect(&dev, &format!("https://{enrollment_addr}")).await?);
    let mut client =
        KeyIssuanceServiceClient::new(connect(&dev, &format!("https://{keys_addr}")).await?);
    let profile = enrollment
        .create_subscription_profile(pb::CreateSubscriptionProfileRequest {
            organization_id: "bench".into(),
            name: "Bench profile".into(),
            course_ids: vec!["BENCH-1".into()],
            duration_days: 30,
        })
        .await?
        .into_inner()
        .profile
        .context("no profile")?;
    let before = memory_kib(pid).unwrap_or_default();
    println!(
        "key-issuance pid {pid}: resident {:.1} MiB before generation",
        mib(before.0)
    );

    let started = Instant::now();
    let response = client
        .generate_subscription_keys(pb::GenerateSubscriptionKeysRequest {
            profile_id: profile.profile_id.clone(),
            count,
            pool_name: "Bench pool".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let elapsed = started.elapsed();
    let pool = response.pool.context("no pool")?;
    anyhow::ensure!(
        response.generated == count && pool.key_count == i64::from(count),
        "generated {} keys, pool holds {}",
        response.generated,
        pool.key_count
    );
    let after_generation = memory_kib(pid).unwrap_or_default();
    println!(
        "generate: {count} keys in one call in {:.2} s = {:.0} keys/s (resident {:.1} MiB, peak so far {:.1} MiB)",
        elapsed.as_secs_f64(),
        f64::from(count) / elapsed.as_secs_f64(),
        mib(after_generation.0),
        mib(after_generation.1),
    );

    // Sample resident memory while the export runs.
    let exporting = Arc::new(AtomicBool::new(true));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let exporting = Arc::clone(&exporting);
        let peak_rss = Arc::clone(&peak_rss);
        async move {
            while exporting.load(Ordering::Relaxed) {
                if let Some((rss, _)) = memory_kib(pid) {
                    peak_rss.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let started = Instant::now();
    let mut stream = client
        .export_keys(pb::ExportKeysRequest {
            scope: Some(Scope::PoolId(pool.pool_id.clone())),
            status: 0,
        })
        .await?
        .into_inner();
    let (mut bytes, mut lines, mut chunks) = (0usize, 0usize, 0usize);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?.chunk;
        bytes += chunk.len();
        chunks += 1;
        // Codes, ids and times hold no newline or quote: one line per row.
        lines += chunk.iter().filter(|&&b| b == b'\n').count();
    }
    let elapsed = started.elapsed();
    exporting.store(false, Ordering::Relaxed);
    sampler.await?;
    let rows = lines.saturating_sub(1);
    anyhow::ensure!(
        rows == count as usize,
        "exported {rows} rows, expected {count}"
    );
    let end = memory_kib(pid).unwrap_or_default();
    println!(
        "export: {rows} rows, {:.1} MB in {chunks} chunks in {:.2} s = {:.1} MB/s, {:.0} rows/s (row count verified)",
        bytes as f64 / 1e6,
        elapsed.as_secs_f64(),
        bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64(),
    );
    println!(
        "key-issuance memory: peak resident during export {:.1} MiB (VmRSS sampled every 10 ms); VmHWM over its life {:.1} MiB",
        mib(peak_rss.load(Ordering::Relaxed)),
        mib(end.1),
    );
    Ok(())
}
