//! The redemption log in PostgreSQL: one row per (scope, idempotency key),
//! moving from `admitted` to `completed` (with the encoded response), or to
//! `failing` (the final error decided and stored, compensation under way)
//! and then `failed`. The row is also the lease of the one
//! driver taking the redemption on: transitions name the driver's generation,
//! so a driver that lost its lease cannot finish the row, and idleness is
//! measured by PostgreSQL's clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};
use uuid::Uuid;

use crate::error::Error;

/// Most idempotency keys looked up by one query.
const MAX_BATCH: usize = 512;
/// Batched look-ups in flight at once; while they run, the next batch grows.
/// One measured best on 2 cores: 12,000 sold-out rejections/s against
/// 11,000 with four (batches of ~21 keys instead of ~6).
const CONCURRENT_BATCHES: usize = 1;

/// Who redeems and the idempotency key they chose.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// Who redeems (see `RedeemCommand::scope`).
    pub scope: String,
    /// The client's key, unique within the scope.
    pub key: String,
}

/// One caller waiting for the record of an idempotency key.
type Find = (
    IdempotencyKey,
    oneshot::Sender<Result<Option<Record>, Error>>,
);

/// Where a redemption is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Admitted and recorded; its driver is taking it to its end.
    Admitted,
    /// Its final error is decided and stored; its compensation is under way.
    Failing,
    /// Answered with the stored response.
    Completed,
    /// Answered with the stored final error, and compensated.
    Failed,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Admitted => "admitted",
            State::Failing => "failing",
            State::Completed => "completed",
            State::Failed => "failed",
        }
    }
}

impl TryFrom<String> for State {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "admitted" => Ok(State::Admitted),
            "failing" => Ok(State::Failing),
            "completed" => Ok(State::Completed),
            "failed" => Ok(State::Failed),
            _ => Err(format!("unknown redemption state {s:?}")),
        }
    }
}

/// One redemption.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Record {
    pub redemption_id: Uuid,
    pub scope: String,
    pub idempotency_key: String,
    /// The request's meaning, canonically encoded (see `RedeemCommand`).
    pub request: Vec<u8>,
    #[sqlx(try_from = "String")]
    pub state: State,
    /// The generation of the driver holding the lease.
    pub generation: i64,
    pub key_id: Uuid,
    pub key_kind: i32,
    pub target_id: Uuid,
    pub user_id: Uuid,
    pub user_created: bool,
    pub response: Option<Vec<u8>>,
    pub error_code: Option<i32>,
    pub error_reason: Option<String>,
    pub error_message: Option<String>,
    /// Seconds since the lease was last renewed, by PostgreSQL's clock.
    pub idle_seconds: f64,
    /// When the redemption was recorded (PostgreSQL's clock).
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Recorded before grants named their redemption (by the migration).
    pub legacy: bool,
}

const COLUMNS: &str = "redemption_id, scope, idempotency_key, request, state, generation, key_id, key_kind, \
     target_id, user_id, user_created, response, error_code, error_reason, error_message, \
     EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float8 AS idle_seconds, created_at, legacy";

/// The redemption log.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    finds: mpsc::UnboundedSender<Find>,
}

impl Store {
    /// A store over `pool` (search path: this service's schema). Starts the
    /// task that batches idempotency look-ups (it ends with the last clone).
    pub fn new(pool: PgPool) -> Self {
        let (finds, queue) = mpsc::unbounded_channel();
        tokio::spawn(batch_finds(pool.clone(), queue));
        Self { pool, finds }
    }

    /// The redemption recorded under an idempotency key, if any. Every
    /// request starts with this look-up, so concurrent ones share a query:
    /// a herd costs PostgreSQL a few hundred statements, not one per student.
    pub async fn find(&self, key: &IdempotencyKey) -> Result<Option<Record>, Error> {
        let (answer, answered) = oneshot::channel();
        self.finds
            .send((key.clone(), answer))
            .map_err(|_| Error::Unavailable("database"))?;
        answered
            .await
            .map_err(|_| Error::Internal("idempotency look-up dropped".into()))?
    }

    /// Records an admitted redemption, its lease at generation 1. False
    /// when the idempotency key is already taken (a concurrent duplicate won).
    pub async fn insert(&self, r: &Record) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO redemptions (redemption_id, scope, idempotency_key, request, state, generation,
                                      key_id, key_kind, target_id, user_id, user_created)
             VALUES ($1, $2, $3, $4, 'admitted', 1, $5, $6, $7, $8, $9)
             ON CONFLICT ON CONSTRAINT redemptions_idempotency_key_unique DO NOTHING",
        )
        .bind(r.redemption_id)
        .bind(&r.scope)
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

    /// Marks a redemption completed with its encoded response. False when
    /// the driver of `generation` no longer holds it (finished, or taken over).
    pub async fn complete(&self, lease: Lease, response: &[u8]) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE redemptions SET state = $3, response = $4, updated_at = now()
             WHERE redemption_id = $1 AND generation = $2 AND state = 'admitted'",
        )
        .bind(lease.redemption_id)
        .bind(lease.generation)
        .bind(State::Completed.as_str())
        .bind(response)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Decides a redemption's final error: stored, and the redemption is
    /// `failing` until its compensation is done. False when the driver of
    /// `generation` no longer holds it.
    pub async fn decide_failure(&self, lease: Lease, error: &Error) -> Result<bool, Error> {
        let (code, reason) = error.code_and_reason();
        let done = sqlx::query(
            "UPDATE redemptions SET state = $3, error_code = $4, error_reason = $5, error_message = $6,
                 updated_at = now()
             WHERE redemption_id = $1 AND generation = $2 AND state = 'admitted'",
        )
        .bind(lease.redemption_id)
        .bind(lease.generation)
        .bind(State::Failing.as_str())
        .bind(code as i32)
        .bind(reason)
        .bind(error.to_string())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a compensated redemption failed for good. False when the
    /// driver of `generation` no longer holds it.
    pub async fn fail(&self, lease: Lease) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE redemptions SET state = $3, updated_at = now(), audited_at = now()
             WHERE redemption_id = $1 AND generation = $2 AND state = 'failing'",
        )
        .bind(lease.redemption_id)
        .bind(lease.generation)
        .bind(State::Failed.as_str())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Failed redemptions never audited (failed before audits existed).
    pub async fn unaudited(&self, limit: i64) -> Result<Vec<Record>, Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM redemptions
             WHERE state = 'failed' AND audited_at IS NULL ORDER BY created_at LIMIT $1"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Notes that a failed redemption was audited.
    pub async fn audited(&self, redemption_id: Uuid) -> Result<(), Error> {
        sqlx::query("UPDATE redemptions SET audited_at = now() WHERE redemption_id = $1")
            .bind(redemption_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Renews the lease. False when it is lost (finished, or taken over).
    pub async fn renew(&self, lease: Lease) -> Result<bool, Error> {
        let done = sqlx::query(
            "UPDATE redemptions SET updated_at = now()
             WHERE redemption_id = $1 AND generation = $2 AND state IN ('admitted', 'failing')",
        )
        .bind(lease.redemption_id)
        .bind(lease.generation)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The ids of the redemptions recorded for a class or profile whose
    /// retries must be answered from their record, not by the gate alone
    /// (the gate's rebuild). Those refused for a full class are left out:
    /// the gate's answer to them is the same, and a herd that bypassed the
    /// gate would otherwise make every rebuild carry all of its losers.
    pub async fn redemptions_for(&self, target_id: Uuid) -> Result<Vec<String>, Error> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT redemption_id FROM redemptions
             WHERE target_id = $1 AND error_reason IS DISTINCT FROM 'CLASS_FULL'",
        )
        .bind(target_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.iter().map(Uuid::to_string).collect())
    }

    /// One redemption by id.
    pub async fn get(&self, redemption_id: Uuid) -> Result<Record, Error> {
        let sql = format!("SELECT {COLUMNS} FROM redemptions WHERE redemption_id = $1");
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(redemption_id)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Unfinished redemptions whose lease has not been renewed for `idle`,
    /// oldest first.
    pub async fn stale(&self, idle: Duration, limit: i64) -> Result<Vec<Record>, Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM redemptions
             WHERE state IN ('admitted', 'failing') AND updated_at < now() - make_interval(secs => $1)
             ORDER BY updated_at LIMIT $2"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(idle.as_secs_f64())
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Takes over a redemption whose driver has been silent for `idle`:
    /// bumps the generation, so the old driver's writes are refused from
    /// now on. `None` when it is not (or no longer) idle at that generation:
    /// its driver is alive, or another take-over won.
    pub async fn take_over(&self, record: &Record, idle: Duration) -> Result<Option<Lease>, Error> {
        let generation: Option<i64> = sqlx::query_scalar(
            "UPDATE redemptions SET generation = generation + 1, updated_at = now()
             WHERE redemption_id = $1 AND state IN ('admitted', 'failing') AND generation = $2
               AND updated_at < now() - make_interval(secs => $3)
             RETURNING generation",
        )
        .bind(record.redemption_id)
        .bind(record.generation)
        .bind(idle.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        Ok(generation.map(|generation| Lease {
            redemption_id: record.redemption_id,
            generation,
        }))
    }
}

/// The right to drive one redemption: its id and the driver's generation,
/// which every write names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub redemption_id: Uuid,
    pub generation: i64,
}

/// Answers queued look-ups in batches: a batch is whatever queued while the
/// previous batches ran (one look-up alone when the service is quiet).
async fn batch_finds(pool: PgPool, mut queue: mpsc::UnboundedReceiver<Find>) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_BATCHES));
    let sql = format!(
        "SELECT {COLUMNS} FROM redemptions
         WHERE (scope, idempotency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
    );
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(find) => batch.push(find),
                Err(_) => break,
            }
        }
        let (pool, sql) = (pool.clone(), sql.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let scopes: Vec<&str> = batch.iter().map(|(k, _)| k.scope.as_str()).collect();
            let keys: Vec<&str> = batch.iter().map(|(k, _)| k.key.as_str()).collect();
            let found: Result<Vec<Record>, sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(scopes)
                .bind(keys)
                .fetch_all(&pool)
                .await;
            match found {
                Ok(records) => {
                    let by_key: HashMap<(&str, &str), &Record> = records
                        .iter()
                        .map(|r| ((r.scope.as_str(), r.idempotency_key.as_str()), r))
                        .collect();
                    for (k, answer) in batch {
                        let found = by_key.get(&(k.scope.as_str(), k.key.as_str()));
                        let _ = answer.send(Ok(found.map(|r| (*r).clone())));
                    }
                }
                Err(e) => {
                    let e = Error::from(e);
                    for (_, answer) in batch {
                        let _ = answer.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
