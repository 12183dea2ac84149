//! PostgreSQL: a pool whose connections see only their service's schema, and
//! that schema's migrations.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// Opens a lazy pool whose connections use `schema` as their search path, so a
/// service's unqualified table names (and sqlx's migration table) live in it.
/// Lazy: the process starts (and reports NOT_SERVING) while PostgreSQL is down.
pub fn connect(database_url: &str, schema: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = database_url.parse()?;
    let options = options
        .options([("search_path", schema)])
        .application_name(schema);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// Creates the schema if needed and applies the service's migrations. Safe to
/// run from many replicas at once: the schema is created under an advisory
/// lock, and sqlx serialises migrations with its own lock.
pub async fn migrate(pool: &PgPool, schema: &str, migrator: &Migrator) -> anyhow::Result<()> {
    anyhow::ensure!(
        !schema.is_empty() && schema.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "schema name {schema:?} must be lower-case letters and underscores"
    );
    // A schema made beforehand (owned by the service's own role, which need
    // not be allowed to create schemas) is used as it is.
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(pool)
            .await?;
    if exists {
        migrator.run(pool).await?;
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    // One lock id for all schema creation; held until commit.
    sqlx::query("SELECT pg_advisory_xact_lock(7261873)")
        .execute(&mut *tx)
        .await?;
    // Checked above to be a plain identifier.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
    )))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    migrator.run(pool).await?;
    Ok(())
}

/// True when the database answers a trivial query.
pub async fn is_reachable(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}
