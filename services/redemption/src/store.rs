//! The redemption log in PostgreSQL: one row per idempotency key, moving from
//! `admitted` to `completed` (with the encoded response) or `failed` (with the
//! final error). Transitions are conditional, so a live request and recovery
//! racing on one row cannot both finish it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::Error;

/// One redemption.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Record {
    pub redemption_id: Uuid,
    pub idempotency_key: String,
    pub request: Vec<u8>,
    pub state: String,
    pub key_id: Uuid,
    pub key_kind: i32,
    pub target_id: Uuid,
    pub user_id: Uuid,
    pub user_created: bool,
    pub response: Option<Vec<u8>>,
    pub error_code: Option<i32>,
    pub error_reason: Option<String>,
    pub error_message: Option<String>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "redemption_id, idempotency_key, request, state, key_id, key_kind, target_id, user_id, \
     user_created, response, error_code, error_reason, error_message, updated_at";

/// The redemption log.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// A store over `pool` (search path: this service's schema).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The redemption recorded under an idempotency key, if any.
    pub async fn find(&self, idempotency_key: &str) -> Result<Option<Record>, Error> {
        let sql = format!("SELECT {COLUMNS} FROM redemptions WHERE idempotency_key = $1");
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(idempotency_key)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Records an admitted redemption. False when the idempotency key is
    /// already taken (a concurrent duplicate won).
    pub async fn insert(&self, r: &Record) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO redemptions (redemption_id, idempotency_key, request, state, key_id, key_kind, target_id, user_id, user_created)
             VALUES ($1, $2, $3, 'admitted', $4, $5, $6, $7, $8)
             ON CONFLICT ON CONSTRAINT redemptions_idempotency_key_unique DO NOTHING",
        )
        .bind(r.redemption_id)
        .bind(&r.idempotency_key)
        .bind(&r.request)
        .bind(r.key_id)
        .bind(r.key_kind)
        .bind(r.target_id)
        .bind(r.user_id)
        .bind(r.user_created)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a redemption completed with its encoded response. False when it
    /// was already finished (by recovery or the live request).
    pub async fn complete(&self, redemption_id: Uuid, response: &[u8]) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE redemptions SET state = 'completed', response = $2, updated_at = now()
             WHERE redemption_id = $1 AND state = 'admitted'",
        )
        .bind(redemption_id)
        .bind(response)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a redemption failed for good. False when already finished.
    pub async fn fail(&self, redemption_id: Uuid, error: &Error) -> Result<bool, Error> {
        let (code, reason) = error.code_and_reason();
        let done = sqlx::query(
            "UPDATE redemptions SET state = 'failed', error_code = $2, error_reason = $3, error_message = $4, updated_at = now()
             WHERE redemption_id = $1 AND state = 'admitted'",
        )
        .bind(redemption_id)
        .bind(code as i32)
        .bind(reason)
        .bind(error.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// One redemption by id.
    pub async fn get(&self, redemption_id: Uuid) -> Result<Record, Error> {
        let sql = format!("SELECT {COLUMNS} FROM redemptions WHERE redemption_id = $1");
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(redemption_id)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Unfinished redemptions untouched for longer than `age`, oldest first.
    pub async fn stale(&self, age: std::time::Duration, limit: i64) -> Result<Vec<Record>, Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM redemptions
             WHERE state = 'admitted' AND updated_at < now() - make_interval(secs => $1)
             ORDER BY updated_at LIMIT $2"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(age.as_secs_f64())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Claims a stale redemption for recovery: only one replica's claim wins
    /// (the one that moves `updated_at` from the value it saw).
    pub async fn claim(&self, record: &Record) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE redemptions SET updated_at = now()
             WHERE redemption_id = $1 AND state = 'admitted' AND updated_at = $2",
        )
        .bind(record.redemption_id)
        .bind(record.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
