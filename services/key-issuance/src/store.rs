//! All of the key issuance service's SQL. Every write that must be
//! all-or-nothing is one transaction; bulk keys go in with a binary `COPY`;
//! per-class limits are serialised with a transaction-scoped advisory lock on
//! the class id.

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use trainingkeys_shared::page::Cursor;
use uuid::Uuid;

use crate::copy::COPY_SUBSCRIPTION_KEYS;
use crate::domain::{
    ClassInfo, Consumed, KeyRow, KeyUse, Kind, MAX_REDEMPTIONS_SHOWN, NewKey, Pool, PoolChoice,
    Scope, Status, UseOfKey,
};
use crate::error::Error;

/// The columns of a [`KeyRow`]: the key with its pool's profile and window.
const KEY_COLUMNS: &str = "k.key_id, k.kind, k.pool_id, k.class_id, k.code_cipher, k.cipher_key_id, \
     k.max_uses, k.uses, k.redeemable_after_class_end, k.created_at, k.revoked_at, \
     p.profile_id, p.valid_from AS pool_valid_from, p.valid_until AS pool_valid_until";
/// Where [`KEY_COLUMNS`] come from.
const KEY_FROM: &str = "FROM keys k LEFT JOIN key_pools p ON p.pool_id = k.pool_id";

const POOL_COLUMNS: &str =
    "pool_id, profile_id, name, valid_from, valid_until, uses_per_key, key_count, created_at";

/// The status of `k` as SQL, for filters and exports, given the scope's
/// window: `$1` window start (NULL: from creation), `$2` end, `$3` end for
/// event keys redeemable after the class, `$4` now. Mirrors
/// [`KeyRow::status`]; EXPIRED is computed, never stored.
const STATUS_SQL: &str = "(CASE WHEN k.revoked_at IS NOT NULL THEN 3 \
     WHEN k.max_uses > 0 AND k.uses >= k.max_uses THEN 2 \
     WHEN $4::timestamptz < $1::timestamptz THEN 4 \
     WHEN $4::timestamptz >= (CASE WHEN k.redeemable_after_class_end THEN $3::timestamptz ELSE $2::timestamptz END) THEN 4 \
     ELSE 1 END)::smallint";

/// The window of every key in a scope, as [`STATUS_SQL`] takes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScopeWindow {
    /// Window start; `None` for class keys (valid from their creation).
    pub from: Option<DateTime<Utc>>,
    /// Window end.
    pub until: Option<DateTime<Utc>>,
    /// Window end of event keys redeemable after the class ends.
    pub lab_until: Option<DateTime<Utc>>,
}

impl ScopeWindow {
    /// A class's keys: from their creation to the class end (lab access end
    /// for event keys that allow it).
    pub fn of_class(class: &ClassInfo) -> Self {
        Self {
            from: None,
            until: Some(class.end_time),
            lab_until: Some(class.lab_access_end_time),
        }
    }

    /// A pool's keys: the pool's window.
    pub fn of_pool(pool: &Pool) -> Self {
        Self {
            from: pool.valid_from,
            until: pool.valid_until,
            lab_until: None,
        }
    }
}

/// One row of a CSV export.
#[derive(Debug, sqlx::FromRow)]
pub struct ExportRow {
    /// Its id (the associated data of its ciphertext).
    pub key_id: Uuid,
    /// Stored [`Kind`] number.
    pub kind: i16,
    /// Sealed display code.
    pub code_cipher: Vec<u8>,
    /// Encryption key that sealed it.
    pub cipher_key_id: i16,
    /// Uses taken.
    pub uses: i32,
    /// Event keys: valid until lab access ends.
    pub redeemable_after_class_end: bool,
    /// [`Status`] number.
    pub status: i16,
    /// Who used it, oldest first (NULL when unused).
    pub redeemed_by: Option<Vec<Uuid>>,
    /// When, in the same order.
    pub redeemed_at: Option<Vec<DateTime<Utc>>>,
}

/// The key issuance service's tables.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

/// The name of the constraint a database error violated, if any.
fn violated(e: &sqlx::Error) -> Option<&str> {
    match e {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

/// A lock id for a class: any collision only serialises two classes a little.
fn class_lock(class_id: Uuid) -> i64 {
    let (hi, lo) = class_id.as_u64_pair();
    (hi ^ lo) as i64
}

impl Store {
    /// A store over `pool` (whose search path is this service's schema).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// One pool.
    pub async fn pool(&self, pool_id: Uuid) -> Result<Pool, Error> {
        let sql = format!("SELECT {POOL_COLUMNS} FROM key_pools WHERE pool_id = $1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(pool_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::PoolNotFound(pool_id))
    }

    /// Opens the transaction of a subscription key generation: creates the
    /// pool, or locks the existing one (checking its profile).
    pub async fn begin_generation(
        &self,
        profile_id: Uuid,
        choice: &PoolChoice,
    ) -> Result<(Transaction<'static, Postgres>, Pool), Error> {
        let mut tx = self.pool.begin().await?;
        let pool: Pool = match choice {
            PoolChoice::Existing(pool_id) => {
                let sql =
                    format!("SELECT {POOL_COLUMNS} FROM key_pools WHERE pool_id = $1 FOR UPDATE");
                let pool: Pool = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(pool_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or(Error::PoolNotFound(*pool_id))?;
                if pool.profile_id != profile_id {
                    return Err(Error::PoolProfileMismatch {
                        pool_id: *pool_id,
                        pool_profile: pool.profile_id,
                        requested: profile_id,
                    });
                }
                pool
            }
            PoolChoice::New {
                name,
                valid_from,
                valid_until,
                uses_per_key,
            } => {
                let sql = format!(
                    "INSERT INTO key_pools (pool_id, profile_id, name, valid_from, valid_until, uses_per_key)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING {POOL_COLUMNS}"
                );
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .bind(Uuid::now_v7())
                    .bind(profile_id)
                    .bind(name)
                    .bind(valid_from)
                    .bind(valid_until)
                    .bind(uses_per_key)
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        Ok((tx, pool))
    }

    /// Streams binary `COPY` data (from [`copy_header`], [`copy_row`] and
    /// [`copy_trailer`]) into the keys table; returns the rows written.
    pub async fn copy_keys(
        conn: &mut PgConnection,
        mut chunks: tokio::sync::mpsc::Receiver<Result<Vec<u8>, Error>>,
    ) -> Result<u64, Error> {
        let mut copy = conn.copy_in_raw(COPY_SUBSCRIPTION_KEYS).await?;
        while let Some(chunk) = chunks.recv().await {
            match chunk {
                Ok(bytes) => {
                    copy.send(bytes).await?;
                }
                Err(e) => {
                    copy.abort("key generation failed").await?;
                    return Err(e);
                }
            }
        }
        Ok(copy.finish().await?)
    }

    /// Adds `added` keys to the pool's count and commits the generation.
    pub async fn finish_generation(
        mut tx: Transaction<'static, Postgres>,
        pool_id: Uuid,
        added: i64,
    ) -> Result<Pool, Error> {
        let sql = format!(
            "UPDATE key_pools SET key_count = key_count + $2 WHERE pool_id = $1 RETURNING {POOL_COLUMNS}"
        );
        let pool = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(pool_id)
            .bind(added)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(pool)
    }

    /// Inserts class enrollment keys unless the class's unrevoked ones would
    /// exceed `max_students`. The advisory lock on the class serialises
    /// concurrent calls, so two of them cannot both pass the count.
    pub async fn insert_class_keys(
        &self,
        class_id: Uuid,
        max_students: i32,
        keys: &[NewKey],
        cipher_key_id: i16,
    ) -> Result<Vec<KeyRow>, Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(class_lock(class_id))
            .execute(&mut *tx)
            .await?;
        let existing: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM keys WHERE class_id = $1 AND kind = $2 AND revoked_at IS NULL",
        )
        .bind(class_id)
        .bind(Kind::ClassEnrollment.code())
        .fetch_one(&mut *tx)
        .await?;
        let requested = keys.len() as i64;
        if existing + requested > i64::from(max_students) {
            return Err(Error::KeyLimitReached {
                class_id,
                max_students,
                existing,
                requested: keys.len() as i32,
            });
        }
        let ids: Vec<Uuid> = keys.iter().map(|k| k.key_id).collect();
        let hmacs: Vec<&[u8]> = keys.iter().map(|k| k.code_hmac.as_slice()).collect();
        let ciphers: Vec<&[u8]> = keys.iter().map(|k| k.code_cipher.as_slice()).collect();
        sqlx::query(
            "INSERT INTO keys (key_id, kind, class_id, code_hmac, code_cipher, cipher_key_id, max_uses, created_at)
             SELECT id, $2, $3, h, c, $4, 1, now() FROM UNNEST($1::uuid[], $5::bytea[], $6::bytea[]) AS t(id, h, c)",
        )
        .bind(&ids)
        .bind(Kind::ClassEnrollment.code())
        .bind(class_id)
        .bind(cipher_key_id)
        .bind(&hmacs)
        .bind(&ciphers)
        .execute(&mut *tx)
        .await?;
        let sql = format!(
            "SELECT {KEY_COLUMNS} {KEY_FROM} WHERE k.key_id = ANY($1) ORDER BY k.created_at, k.key_id"
        );
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Sets a class's event key, retiring the current one in the same
    /// transaction. `lookup_hashes` are the code's HMACs under every
    /// configured secret: a custom code must not match any unrevoked key
    /// (other than the one being retired). Returns the new key and the id
    /// of the one it replaced.
    pub async fn set_event_key(
        &self,
        class_id: Uuid,
        key: &NewKey,
        cipher_key_id: i16,
        redeemable_after_class_end: bool,
        lookup_hashes: Option<&[Vec<u8>]>,
    ) -> Result<(KeyRow, Option<Uuid>), Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(class_lock(class_id))
            .execute(&mut *tx)
            .await?;
        let replaced: Option<Uuid> = sqlx::query_scalar(
            "UPDATE keys SET revoked_at = now() WHERE class_id = $1 AND kind = $2 AND revoked_at IS NULL RETURNING key_id",
        )
        .bind(class_id)
        .bind(Kind::Event.code())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(hashes) = lookup_hashes {
            let taken: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM keys WHERE code_hmac = ANY($1) AND revoked_at IS NULL)",
            )
            .bind(hashes)
            .fetch_one(&mut *tx)
            .await?;
            if taken {
                return Err(Error::CodeTaken);
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO keys (key_id, kind, class_id, code_hmac, code_cipher, cipher_key_id, max_uses,
                               redeemable_after_class_end, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7, now())",
        )
        .bind(key.key_id)
        .bind(Kind::Event.code())
        .bind(class_id)
        .bind(key.code_hmac.as_slice())
        .bind(&key.code_cipher)
        .bind(cipher_key_id)
        .bind(redeemable_after_class_end)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if violated(&e) == Some("keys_code_unrevoked") => return Err(Error::CodeTaken),
            other => other?,
        };
        let row = Self::key_in(&mut tx, key.key_id).await?;
        tx.commit().await?;
        Ok((row, replaced))
    }

    /// Retires a class's event key; `None` when it had none.
    pub async fn disable_event_key(&self, class_id: Uuid) -> Result<Option<KeyRow>, Error> {
        // Under SetEventKey's lock: without it, a disable racing a set waits
        // on the old key's row, finds it retired by the set, cannot see the
        // new key in its snapshot, and answers "no key" while the new one
        // stays live.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(class_lock(class_id))
            .execute(&mut *tx)
            .await?;
        let retired: Option<Uuid> = sqlx::query_scalar(
            "UPDATE keys SET revoked_at = now() WHERE class_id = $1 AND kind = $2 AND revoked_at IS NULL RETURNING key_id",
        )
        .bind(class_id)
        .bind(Kind::Event.code())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        match retired {
            Some(id) => Ok(Some(self.key(id).await?)),
            None => Ok(None),
        }
    }

    /// The class's live event key, if any.
    pub async fn event_key(&self, class_id: Uuid) -> Result<Option<KeyRow>, Error> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} {KEY_FROM} WHERE k.class_id = $1 AND k.kind = $2 AND k.revoked_at IS NULL"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(class_id)
            .bind(Kind::Event.code())
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn key_in(conn: &mut PgConnection, key_id: Uuid) -> Result<KeyRow, Error> {
        let sql = format!("SELECT {KEY_COLUMNS} {KEY_FROM} WHERE k.key_id = $1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(key_id)
            .fetch_optional(conn)
            .await?
            .ok_or(Error::KeyNotFound(key_id))
    }

    /// One key by id.
    pub async fn key(&self, key_id: Uuid) -> Result<KeyRow, Error> {
        let mut conn = self.pool.acquire().await?;
        Self::key_in(&mut conn, key_id).await
    }

    /// The key whose code has one of these HMACs: the unrevoked one if there
    /// is one, else the most recently revoked.
    pub async fn key_by_code(&self, hashes: &[Vec<u8>]) -> Result<KeyRow, Error> {
        // Two branches so each can use its partial index.
        let sql = format!(
            "SELECT * FROM (
                 (SELECT {KEY_COLUMNS}, 0 AS rank {KEY_FROM} WHERE k.code_hmac = ANY($1) AND k.revoked_at IS NULL)
                 UNION ALL
                 (SELECT {KEY_COLUMNS}, 1 AS rank {KEY_FROM} WHERE k.code_hmac = ANY($1) AND k.revoked_at IS NOT NULL)
             ) found ORDER BY rank, revoked_at DESC LIMIT 1"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(hashes)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::CodeNotFound)
    }

    /// A page of a scope's keys in (created_at, key_id) order, optionally
    /// only those with `status` at `now` within `window`.
    pub async fn list(
        &self,
        scope: Scope,
        window: ScopeWindow,
        status: Option<Status>,
        now: DateTime<Utc>,
        after: Option<Cursor>,
        limit: i64,
    ) -> Result<Vec<KeyRow>, Error> {
        let (column, id) = match scope {
            Scope::Class(id) => ("class_id", id),
            Scope::Pool(id) => ("pool_id", id),
        };
        let sql = format!(
            "SELECT {KEY_COLUMNS} {KEY_FROM}
             WHERE k.{column} = $5
               AND ($6::timestamptz IS NULL OR (k.created_at, k.key_id) > ($6, $7))
               AND ($8::smallint IS NULL OR {STATUS_SQL} = $8)
             ORDER BY k.created_at, k.key_id
             LIMIT $9"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(window.from)
            .bind(window.until)
            .bind(window.lab_until)
            .bind(now)
            .bind(id)
            .bind(after.map(|c| c.time))
            .bind(after.map(|c| c.id))
            .bind(status.map(Status::code))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The most recent uses (at most 100 per key) of these keys, newest first.
    pub async fn uses_of(&self, key_ids: &[Uuid]) -> Result<Vec<KeyUse>, Error> {
        if key_ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as(
            "SELECT key_id, user_id, redemption_id, used_at FROM (
                 SELECT u.*, row_number() OVER (PARTITION BY key_id ORDER BY used_at DESC, redemption_id DESC) AS n
                 FROM key_uses u WHERE key_id = ANY($1) AND released_at IS NULL
             ) recent
             WHERE n <= $2
             ORDER BY key_id, used_at DESC, redemption_id DESC",
        )
        .bind(key_ids)
        .bind(MAX_REDEMPTIONS_SHOWN)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Counts one attempt at a custom code by `subject`, and how many of
    /// its attempts in the last hour found the code taken (the ones not
    /// forgotten by [`forget_code_attempt`](Self::forget_code_attempt)),
    /// this one included.
    pub async fn count_code_attempt(&self, subject: &str, attempt: Uuid) -> Result<i64, Error> {
        sqlx::query("DELETE FROM custom_code_attempts WHERE at < now() - interval '1 hour'")
            .execute(&self.pool)
            .await?;
        Ok(sqlx::query_scalar(
            "WITH counted AS (INSERT INTO custom_code_attempts (attempt_id, subject) VALUES ($1, $2))
             SELECT 1 + count(*) FROM custom_code_attempts
             WHERE subject = $2 AND at > now() - interval '1 hour'",
        )
        .bind(attempt)
        .bind(subject)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Forgets an attempt whose code was not taken.
    pub async fn forget_code_attempt(&self, attempt: Uuid) -> Result<(), Error> {
        sqlx::query("DELETE FROM custom_code_attempts WHERE attempt_id = $1")
            .bind(attempt)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every key of a scope (but those of kind `hidden`, one the caller may
    /// not see), in list order, as a stream straight from the database (rows
    /// arrive as the consumer reads them: memory stays flat).
    pub fn export_rows(
        &self,
        scope: Scope,
        window: ScopeWindow,
        status: Option<Status>,
        hidden: Option<Kind>,
        now: DateTime<Utc>,
    ) -> BoxStream<'_, Result<ExportRow, sqlx::Error>> {
        let (column, id) = match scope {
            Scope::Class(id) => ("class_id", id),
            Scope::Pool(id) => ("pool_id", id),
        };
        // The uses are looked up only for used keys: most of a big pool is
        // not. A row lists at most the first MAX_REDEMPTIONS_SHOWN uses (the
        // `uses` column counts them all), so an event key used 100,000 times
        // is still one row of a few KiB, not one bigger than a chunk.
        let uses = "FROM (SELECT user_id, used_at, redemption_id FROM key_uses u
                          WHERE u.key_id = k.key_id AND u.released_at IS NULL
                          ORDER BY u.used_at, u.redemption_id LIMIT $7) first";
        let sql = format!(
            "SELECT k.key_id, k.kind, k.code_cipher, k.cipher_key_id, k.uses, k.redeemable_after_class_end,
                    {STATUS_SQL} AS status,
                    CASE WHEN k.uses > 0 THEN (SELECT array_agg(user_id ORDER BY used_at, redemption_id)
                                               {uses}) END AS redeemed_by,
                    CASE WHEN k.uses > 0 THEN (SELECT array_agg(used_at ORDER BY used_at, redemption_id)
                                               {uses}) END AS redeemed_at
             FROM keys k
             WHERE k.{column} = $5 AND ($6::smallint IS NULL OR {STATUS_SQL} = $6)
               AND ($8::smallint IS NULL OR k.kind <> $8)
             ORDER BY k.created_at, k.key_id"
        );
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(window.from)
            .bind(window.until)
            .bind(window.lab_until)
            .bind(now)
            .bind(id)
            .bind(status.map(Status::code))
            .bind(MAX_REDEMPTIONS_SHOWN)
            .bind(hidden.map(Kind::code))
            .fetch(&self.pool)
    }

    /// Revokes a key; true when it was already revoked.
    pub async fn revoke(&self, key_id: Uuid) -> Result<(KeyRow, bool), Error> {
        let revoked = sqlx::query(
            "UPDATE keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
        )
        .bind(key_id)
        .execute(&self.pool)
        .await?;
        let row = self.key(key_id).await?;
        Ok((row, revoked.rows_affected() == 0))
    }

    /// True when `user_id` holds a use of the key.
    pub async fn used_by(&self, key_id: Uuid, user_id: Uuid) -> Result<bool, Error> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM key_uses
                            WHERE key_id = $1 AND user_id = $2 AND released_at IS NULL)",
        )
        .bind(key_id)
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Uses a key once for a redemption, in one short transaction. The use
    /// row goes in first: a concurrent retry of the same redemption waits on
    /// its primary key and then finds it. The conditional UPDATE takes the
    /// key's row lock, so concurrent redemptions are serialised on it and at
    /// most `max_uses` of them succeed. A use given back (or a release that
    /// came first) refuses the redemption for good; a lower generation than
    /// the use has seen is a driver that lost its lease.
    pub async fn consume(&self, u: UseOfKey) -> Result<Consumed, Error> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO key_uses (key_id, redemption_id, user_id, generation) VALUES ($1, $2, $3, $4)
             ON CONFLICT (key_id, redemption_id) DO NOTHING",
        )
        .bind(u.key_id)
        .bind(u.redemption_id)
        .bind(u.user_id)
        .bind(u.generation)
        .execute(&mut *tx)
        .await;
        let inserted = match inserted {
            Err(e) if violated(&e) == Some("key_uses_key_id_fkey") => {
                return Err(Error::KeyNotFound(u.key_id));
            }
            other => other?,
        };
        if inserted.rows_affected() == 0 {
            self.fence(&mut tx, u).await?;
            tx.commit().await?;
            let key = self.key(u.key_id).await?;
            return Ok(Consumed {
                uses: key.uses,
                max_uses: key.max_uses,
                already_consumed: true,
            });
        }
        let bumped: Option<(i32, i32)> = sqlx::query_as(
            "UPDATE keys SET uses = uses + 1
             WHERE key_id = $1 AND revoked_at IS NULL AND (max_uses = 0 OR uses < max_uses)
             RETURNING uses, max_uses",
        )
        .bind(u.key_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((uses, max_uses)) = bumped else {
            tx.rollback().await?;
            let key = self.key(u.key_id).await?;
            return Err(if key.revoked_at.is_some() {
                Error::KeyRevoked(u.key_id)
            } else {
                Error::KeyAlreadyRedeemed(u.key_id)
            });
        };
        tx.commit().await?;
        Ok(Consumed {
            uses,
            max_uses,
            already_consumed: false,
        })
    }

    /// Checks an existing use row of this redemption under its row lock:
    /// refused if released or seen by a later generation; else records this
    /// generation as the latest.
    async fn fence(&self, tx: &mut sqlx::PgConnection, u: UseOfKey) -> Result<(), Error> {
        let (generation, released): (i64, bool) = sqlx::query_as(
            "SELECT generation, released_at IS NOT NULL FROM key_uses
             WHERE key_id = $1 AND redemption_id = $2 FOR UPDATE",
        )
        .bind(u.key_id)
        .bind(u.redemption_id)
        .fetch_one(&mut *tx)
        .await?;
        if generation > u.generation {
            return Err(Error::StaleGeneration {
                seen: generation,
                sent: u.generation,
            });
        }
        if released {
            return Err(Error::UseReleased(u.key_id));
        }
        sqlx::query("UPDATE key_uses SET generation = $3 WHERE key_id = $1 AND redemption_id = $2")
            .bind(u.key_id)
            .bind(u.redemption_id)
            .bind(u.generation)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Gives back the use a redemption took; false when it had none. The row
    /// stays, marked released, so the redemption can never consume again;
    /// with no use yet, a released marker is left for the same reason.
    pub async fn release(&self, u: UseOfKey) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await?;
        let marker = sqlx::query(
            "INSERT INTO key_uses (key_id, redemption_id, user_id, generation, released_at)
             VALUES ($1, $2, NULL, $3, clock_timestamp())
             ON CONFLICT (key_id, redemption_id) DO NOTHING",
        )
        .bind(u.key_id)
        .bind(u.redemption_id)
        .bind(u.generation)
        .execute(&mut *tx)
        .await;
        let marker = match marker {
            Err(e) if violated(&e) == Some("key_uses_key_id_fkey") => {
                return Err(Error::KeyNotFound(u.key_id));
            }
            other => other?,
        };
        if marker.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(false);
        }
        match self.fence(&mut tx, u).await {
            Ok(()) => {}
            Err(Error::UseReleased(_)) => {
                tx.rollback().await?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        sqlx::query(
            "UPDATE key_uses SET released_at = clock_timestamp() WHERE key_id = $1 AND redemption_id = $2",
        )
        .bind(u.key_id)
        .bind(u.redemption_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE keys SET uses = uses - 1 WHERE key_id = $1")
            .bind(u.key_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }
}
