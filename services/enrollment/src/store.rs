//! All of the enrollment service's SQL. Every write that must be all-or-nothing
//! is one transaction; the seat count moves only together with a roster row.

use chrono::{Duration, Utc};
use sqlx::PgPool;
use trainingkeys_shared::page::Cursor;
use uuid::Uuid;

use crate::domain::{
    Class, ClassChange, Enrollment, NewClass, NewProfile, NewUser, Profile, Subscription, User,
};
use crate::error::Error;
use crate::seats::{Seats, Wanted};

const CLASS_COLUMNS: &str = "class_id, organization_id, title, course_id, start_time, end_time, \
     max_students, lab_access_days, enrolled_count, created_at, updated_at, instructor_ids";
const ENROLLMENT_COLUMNS: &str =
    "enrollment_id, class_id, user_id, source_key_id, enrolled_at, cancelled_at, redemption_id";
const SUBSCRIPTION_COLUMNS: &str = "subscription_id, profile_id, user_id, source_key_id, starts_at, \
     expires_at, course_ids, redemption_id";

/// The enrollment service's tables.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// Concurrent seats of a class, taken together.
    seats: Seats,
}

/// What the enrollment guard learns about a (class, user) pair in one query.
#[derive(sqlx::FromRow)]
struct EnrollCheck {
    class_org: Option<String>,
    user_org: Option<String>,
    /// No seat left (None when the class is unknown).
    full: Option<bool>,
    enrollment_id: Option<Uuid>,
}

impl Store {
    /// A store over `pool` (whose search path is this service's schema).
    pub fn new(pool: PgPool) -> Self {
        Self {
            seats: Seats::new(pool.clone()),
            pool,
        }
    }

    /// Get-or-create by (organization, normalised email). Safe under
    /// concurrent calls: the unique key decides, the loser reads the winner.
    pub async fn register_user(&self, new: NewUser) -> Result<(User, bool), Error> {
        let proposed = new.user_id.unwrap_or_else(Uuid::now_v7);
        let inserted: Option<User> = sqlx::query_as(
            "INSERT INTO users (user_id, organization_id, email, display_name, created_by_redemption)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING
             RETURNING user_id, organization_id, email, display_name, created_at",
        )
        .bind(proposed)
        .bind(&new.organization_id)
        .bind(&new.email)
        .bind(&new.display_name)
        .bind(new.redemption_id)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(user) = inserted {
            return Ok((user, true));
        }
        match self.find_user(&new.organization_id, &new.email).await? {
            Some(user) => Ok((user, false)),
            // The insert lost on the user id, not the email: a proposed id
            // taken by another user.
            None => Err(Error::InvalidField(trainingkeys_shared::InvalidField::new(
                "user_id",
                "is taken by another user",
            ))),
        }
    }

    /// A user by organization and normalised email.
    pub async fn find_user(
        &self,
        organization_id: &str,
        email: &str,
    ) -> Result<Option<User>, Error> {
        Ok(sqlx::query_as(
            "SELECT user_id, organization_id, email, display_name, created_at FROM users
             WHERE organization_id = $1 AND email = $2",
        )
        .bind(organization_id)
        .bind(email)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// One user.
    pub async fn get_user(&self, user_id: Uuid) -> Result<User, Error> {
        sqlx::query_as("SELECT user_id, organization_id, email, display_name, created_at FROM users WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::UserNotFound(user_id))
    }

    /// A new class with no students.
    pub async fn create_class(&self, new: NewClass) -> Result<Class, Error> {
        let sql = format!(
            "INSERT INTO classes (class_id, organization_id, title, course_id, start_time, end_time, max_students, lab_access_days, instructor_ids)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {CLASS_COLUMNS}"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(Uuid::now_v7())
            .bind(new.organization_id)
            .bind(new.title)
            .bind(new.course_id)
            .bind(new.start_time)
            .bind(new.end_time)
            .bind(new.max_students)
            .bind(new.lab_access_days)
            .bind(new.instructor_ids)
            .fetch_one(&self.pool)
            .await?)
    }

    /// One class with its seat count.
    pub async fn get_class(&self, class_id: Uuid) -> Result<Class, Error> {
        let sql = format!("SELECT {CLASS_COLUMNS} FROM classes WHERE class_id = $1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(class_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::ClassNotFound(class_id))
    }

    /// Applies a change under the class's row lock, so a concurrent Enroll
    /// cannot slip a student in between the check and the new maximum.
    pub async fn update_class(&self, change: ClassChange) -> Result<Class, Error> {
        let mut tx = self.pool.begin().await?;
        let sql = format!("SELECT {CLASS_COLUMNS} FROM classes WHERE class_id = $1 FOR UPDATE");
        let current: Class = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(change.class_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(Error::ClassNotFound(change.class_id))?;
        let next = change.apply(current)?;
        let sql = format!(
            "UPDATE classes SET title = $2, course_id = $3, start_time = $4, end_time = $5,
                 max_students = $6, lab_access_days = $7, instructor_ids = $8, updated_at = now()
             WHERE class_id = $1 RETURNING {CLASS_COLUMNS}"
        );
        let updated: Class = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(next.class_id)
            .bind(next.title)
            .bind(next.course_id)
            .bind(next.start_time)
            .bind(next.end_time)
            .bind(next.max_students)
            .bind(next.lab_access_days)
            .bind(next.instructor_ids)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(updated)
    }

    /// A new subscription profile.
    pub async fn create_profile(&self, new: NewProfile) -> Result<Profile, Error> {
        Ok(sqlx::query_as(
            "INSERT INTO subscription_profiles (profile_id, organization_id, name, course_ids, duration_days)
             VALUES ($1, $2, $3, $4, $5)
             RETURNING profile_id, organization_id, name, course_ids, duration_days, created_at",
        )
        .bind(Uuid::now_v7())
        .bind(new.organization_id)
        .bind(new.name)
        .bind(new.course_ids)
        .bind(new.duration_days)
        .fetch_one(&self.pool)
        .await?)
    }

    /// One subscription profile.
    pub async fn get_profile(&self, profile_id: Uuid) -> Result<Profile, Error> {
        sqlx::query_as(
            "SELECT profile_id, organization_id, name, course_ids, duration_days, created_at
             FROM subscription_profiles WHERE profile_id = $1",
        )
        .bind(profile_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::ProfileNotFound(profile_id))
    }

    /// Takes a seat. The capacity guard is the conditional UPDATE: PostgreSQL
    /// serialises it on the class row, so two statements can never both take
    /// the last seat. The partial unique index makes a concurrent duplicate of
    /// the same (class, user) fail its insert, which undoes its seat.
    ///
    /// With a redemption id the call is idempotent per redemption: the seat
    /// and the redemption's row in `redemptions` go in together, a repeat
    /// gets the seat this redemption took (even if cancelled since), and a
    /// refusal for want of a seat is recorded and answered again.
    pub async fn enroll(
        &self,
        class_id: Uuid,
        user_id: Uuid,
        source_key_id: Option<Uuid>,
        redemption_id: Option<Uuid>,
    ) -> Result<(Enrollment, bool), Error> {
        // The common case, taken together with the class's concurrent calls.
        let wanted = Wanted {
            user_id,
            source_key_id,
            redemption_id,
        };
        if let Some(seated) = self.seats.take(class_id, wanted).await {
            return Ok((seated, false));
        }
        // The same for this call alone (one round trip, and the class row
        // is locked only for that statement): take a seat if there is one,
        // the user belongs to the class's organization and holds no seat yet,
        // and insert the enrollment (and the redemption's outcome); else say
        // why.
        let sql = format!(
            "WITH seat AS (
                 UPDATE classes SET enrolled_count = enrolled_count + 1
                 WHERE class_id = $1 AND enrolled_count < max_students
                   AND organization_id = (SELECT organization_id FROM users WHERE user_id = $2)
                   AND NOT EXISTS (SELECT 1 FROM enrollments
                                   WHERE class_id = $1 AND user_id = $2 AND cancelled_at IS NULL)
                   AND NOT EXISTS (SELECT 1 FROM redemptions WHERE redemption_id = $5)
                 RETURNING class_id),
             outcome AS (
                 INSERT INTO redemptions (redemption_id) SELECT $5 FROM seat WHERE $5::uuid IS NOT NULL)
             INSERT INTO enrollments (enrollment_id, class_id, user_id, source_key_id, redemption_id)
             SELECT $3, class_id, $2, $4, $5 FROM seat
             RETURNING {ENROLLMENT_COLUMNS}"
        );
        // A seat freed between the statement and the diagnosis below is
        // tried for again, a few times.
        for _ in 0..3 {
            let taken: Result<Option<Enrollment>, sqlx::Error> =
                sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
                    .bind(class_id)
                    .bind(user_id)
                    .bind(Uuid::now_v7())
                    .bind(source_key_id)
                    .bind(redemption_id)
                    .fetch_optional(&self.pool)
                    .await;
            match taken {
                Ok(Some(enrollment)) => return Ok((enrollment, false)),
                // No seat taken: say why (or find the seat already held).
                Ok(None) => {}
                Err(e) if is_unique_violation(&e) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(rid) = redemption_id
                && let Some(answered) = self.redemption_outcome(&self.pool, rid).await?
            {
                return self.enrollment_answer(answered, rid, class_id).await;
            }
            let check: EnrollCheck = sqlx::query_as(
                "SELECT c.organization_id AS class_org, u.organization_id AS user_org,
                        c.enrolled_count >= c.max_students AS full, e.enrollment_id
                 FROM (SELECT 1) AS one
                 LEFT JOIN classes c ON c.class_id = $1
                 LEFT JOIN users u ON u.user_id = $2
                 LEFT JOIN enrollments e ON e.class_id = $1 AND e.user_id = $2 AND e.cancelled_at IS NULL",
            )
            .bind(class_id)
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?;
            let class_org = check.class_org.ok_or(Error::ClassNotFound(class_id))?;
            let user_org = check.user_org.ok_or(Error::UserNotFound(user_id))?;
            if class_org != user_org {
                return Err(Error::OrganizationMismatch {
                    user_org,
                    target_org: class_org,
                });
            }
            if let Some(id) = check.enrollment_id {
                let Some(rid) = redemption_id else {
                    return Ok((self.enrollment(id).await?, true));
                };
                match self.seat_held_before(class_id, user_id, rid).await? {
                    Some(held) => return Ok((held, true)),
                    // The seat went meanwhile, or the redemption was answered.
                    None => continue,
                }
            }
            if check.full == Some(true) {
                return match redemption_id {
                    Some(rid) if !self.refuse_for_want_of_a_seat(rid).await? => {
                        // The redemption was answered meanwhile (its twin
                        // took a seat or was refused): that answer is ours.
                        continue;
                    }
                    _ => Err(Error::ClassFull(class_id)),
                };
            }
        }
        if let Some(rid) = redemption_id
            && !self.refuse_for_want_of_a_seat(rid).await?
            && let Some(answered) = self.redemption_outcome(&self.pool, rid).await?
        {
            return self.enrollment_answer(answered, rid, class_id).await;
        }
        Err(Error::ClassFull(class_id))
    }

    /// Enroll's answer to a redemption it answered before: the same.
    async fn enrollment_answer(
        &self,
        answered: Outcome,
        rid: Uuid,
        class_id: Uuid,
    ) -> Result<(Enrollment, bool), Error> {
        match answered {
            Outcome {
                refused_reason: Some(reason),
                ..
            } => Err(refusal(&reason, rid, class_id)),
            Outcome {
                held_before: Some(held),
                ..
            } => Ok((self.enrollment(held).await?, true)),
            Outcome { .. } => Ok((self.enrollment_of_redemption(rid).await?, true)),
        }
    }

    /// VoidRedemption: a failed redemption's grant is taken back and any
    /// later grant for it refused. The outcome row is written first (or
    /// turned into a refusal): a grant racing this call conflicts on its key,
    /// so either the grant is refused or it committed first and is taken back
    /// here. Returns whether a grant was taken back.
    pub async fn void_redemption(
        &self,
        rid: Uuid,
        created_user: Option<Uuid>,
    ) -> Result<bool, Error> {
        let mut tx = self.pool.begin().await?;
        // The account this redemption created, locked first: a concurrent
        // grant for it (its foreign key check) waits until this is decided,
        // so "it holds nothing else" cannot change between the check and the
        // removal. An account not created by this redemption is left alone.
        let ours: Option<Uuid> = match created_user {
            Some(user) => {
                sqlx::query_scalar(
                    "SELECT user_id FROM users
                     WHERE user_id = $1 AND created_by_redemption = $2 FOR UPDATE",
                )
                .bind(user)
                .bind(rid)
                .fetch_optional(&mut *tx)
                .await?
            }
            None => None,
        };
        sqlx::query(
            "INSERT INTO redemptions (redemption_id, refused_reason) VALUES ($1, $2)
             ON CONFLICT (redemption_id) DO UPDATE SET refused_reason = EXCLUDED.refused_reason",
        )
        .bind(rid)
        .bind(VOIDED)
        .execute(&mut *tx)
        .await?;
        lock_class_of(&mut tx, EnrollmentBy::Redemption, rid).await?;
        let seat = sqlx::query(
            "WITH gone AS (
                 UPDATE enrollments SET cancelled_at = now()
                 WHERE redemption_id = $1 AND cancelled_at IS NULL RETURNING class_id)
             UPDATE classes SET enrolled_count = enrolled_count - 1
             WHERE class_id IN (SELECT class_id FROM gone)",
        )
        .bind(rid)
        .execute(&mut *tx)
        .await?;
        let subscription = sqlx::query(
            "UPDATE subscriptions SET expires_at = GREATEST(now(), starts_at + interval '1 microsecond')
             WHERE redemption_id = $1 AND expires_at > now()",
        )
        .bind(rid)
        .execute(&mut *tx)
        .await?;
        if let Some(user) = ours {
            let others: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM enrollments
                                WHERE user_id = $1 AND redemption_id IS DISTINCT FROM $2)
                     OR EXISTS (SELECT 1 FROM subscriptions
                                WHERE user_id = $1 AND redemption_id IS DISTINCT FROM $2)",
            )
            .bind(user)
            .bind(rid)
            .fetch_one(&mut *tx)
            .await?;
            if !others {
                for sql in [
                    "DELETE FROM enrollments WHERE user_id = $1",
                    "DELETE FROM subscriptions WHERE user_id = $1",
                    "DELETE FROM users WHERE user_id = $1",
                ] {
                    sqlx::query(sql).bind(user).execute(&mut *tx).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(seat.rows_affected() + subscription.rows_affected() > 0)
    }

    /// How enrollment answered a redemption, if it ever did.
    async fn redemption_outcome(
        &self,
        conn: impl sqlx::PgExecutor<'_>,
        rid: Uuid,
    ) -> Result<Option<Outcome>, Error> {
        Ok(sqlx::query_as(
            "SELECT refused_reason, held_before FROM redemptions WHERE redemption_id = $1",
        )
        .bind(rid)
        .fetch_optional(conn)
        .await?)
    }

    /// Records that a redemption found the student already seated, under
    /// the class row's lock (which CancelEnrollment takes first), so the
    /// seat recorded is still active when recorded. `None` when the seat is
    /// gone or the redemption already has an answer.
    async fn seat_held_before(
        &self,
        class_id: Uuid,
        user_id: Uuid,
        rid: Uuid,
    ) -> Result<Option<Enrollment>, Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM classes WHERE class_id = $1 FOR UPDATE")
            .bind(class_id)
            .execute(&mut *tx)
            .await?;
        let sql = format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM enrollments
             WHERE class_id = $1 AND user_id = $2 AND cancelled_at IS NULL"
        );
        let seat: Option<Enrollment> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(class_id)
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(seat) = seat else {
            tx.rollback().await?;
            return Ok(None);
        };
        if !self
            .record_held_before(&mut *tx, rid, seat.enrollment_id)
            .await?
        {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(seat))
    }

    /// Records that a redemption found the grant `held` already there;
    /// false when it already had an answer.
    async fn record_held_before(
        &self,
        conn: impl sqlx::PgExecutor<'_>,
        rid: Uuid,
        held: Uuid,
    ) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO redemptions (redemption_id, held_before) VALUES ($1, $2)
             ON CONFLICT (redemption_id) DO NOTHING",
        )
        .bind(rid)
        .bind(held)
        .execute(conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that a redemption was refused for want of a seat; false when
    /// it already had an answer.
    async fn refuse_for_want_of_a_seat(&self, rid: Uuid) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO redemptions (redemption_id, refused_reason) VALUES ($1, 'CLASS_FULL')
             ON CONFLICT (redemption_id) DO NOTHING",
        )
        .bind(rid)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn enrollment_of_redemption(&self, rid: Uuid) -> Result<Enrollment, Error> {
        let sql = format!("SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE redemption_id = $1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(rid)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::Database(sqlx::Error::RowNotFound))
    }

    async fn enrollment(&self, enrollment_id: Uuid) -> Result<Enrollment, Error> {
        let sql = format!("SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE enrollment_id = $1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(enrollment_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(Error::EnrollmentNotFound(enrollment_id))
    }

    /// Cancels an enrollment and frees its seat in one transaction. Only the
    /// call that flips `cancelled_at` frees a seat, so repeats change nothing.
    /// The organization of the class an enrollment is in.
    pub async fn enrollment_organization(&self, enrollment_id: Uuid) -> Result<String, Error> {
        sqlx::query_scalar(
            "SELECT c.organization_id FROM enrollments e JOIN classes c USING (class_id)
             WHERE e.enrollment_id = $1",
        )
        .bind(enrollment_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(Error::EnrollmentNotFound(enrollment_id))
    }

    pub async fn cancel_enrollment(
        &self,
        enrollment_id: Uuid,
    ) -> Result<(Enrollment, bool), Error> {
        let mut tx = self.pool.begin().await?;
        lock_class_of(&mut tx, EnrollmentBy::Id, enrollment_id).await?;
        let sql = format!(
            "UPDATE enrollments SET cancelled_at = now()
             WHERE enrollment_id = $1 AND cancelled_at IS NULL RETURNING {ENROLLMENT_COLUMNS}"
        );
        let cancelled: Option<Enrollment> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(enrollment_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(cancelled) = cancelled else {
            tx.rollback().await?;
            return Ok((self.enrollment(enrollment_id).await?, true));
        };
        sqlx::query("UPDATE classes SET enrolled_count = enrolled_count - 1 WHERE class_id = $1")
            .bind(cancelled.class_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((cancelled, false))
    }

    /// A page of a class's roster in (enrolled_at, enrollment_id) order.
    pub async fn list_enrollments(
        &self,
        class_id: Uuid,
        user_id: Option<Uuid>,
        include_cancelled: bool,
        after: Option<Cursor>,
        limit: i64,
    ) -> Result<Vec<Enrollment>, Error> {
        self.get_class(class_id).await?;
        let sql = format!(
            "SELECT {ENROLLMENT_COLUMNS} FROM enrollments
             WHERE class_id = $1
               AND ($2::uuid IS NULL OR user_id = $2)
               AND ($3 OR cancelled_at IS NULL)
               AND ($4::timestamptz IS NULL OR (enrolled_at, enrollment_id) > ($4, $5))
             ORDER BY enrolled_at, enrollment_id
             LIMIT $6"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(class_id)
            .bind(user_id)
            .bind(include_cancelled)
            .bind(after.map(|c| c.time))
            .bind(after.map(|c| c.id))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Assigns a subscription under the user's row lock, so concurrent calls
    /// for the same user cannot both create one. An unexpired subscription of
    /// the same profile is returned unchanged instead, and so is the one this
    /// redemption granted before (idempotent per redemption id).
    pub async fn assign_subscription(
        &self,
        profile_id: Uuid,
        user_id: Uuid,
        source_key_id: Option<Uuid>,
        redemption_id: Option<Uuid>,
    ) -> Result<(Subscription, bool), Error> {
        let profile = self.get_profile(profile_id).await?;
        let mut tx = self.pool.begin().await?;
        let user_org: String =
            sqlx::query_scalar("SELECT organization_id FROM users WHERE user_id = $1 FOR UPDATE")
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(Error::UserNotFound(user_id))?;
        if user_org != profile.organization_id {
            return Err(Error::OrganizationMismatch {
                user_org,
                target_org: profile.organization_id,
            });
        }
        if let Some(rid) = redemption_id {
            match self.redemption_outcome(&mut *tx, rid).await? {
                Some(Outcome {
                    refused_reason: Some(_),
                    ..
                }) => {
                    tx.rollback().await?;
                    return Err(Error::RedemptionVoided(rid));
                }
                Some(Outcome {
                    held_before: Some(held),
                    ..
                }) => {
                    tx.rollback().await?;
                    return Ok((self.subscription(held).await?, true));
                }
                _ => {}
            }
        }
        // This redemption's own grant first (even if expired since), then
        // an unexpired one the user had.
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions
             WHERE redemption_id = $3
                OR (user_id = $1 AND profile_id = $2 AND expires_at > now())
             ORDER BY (redemption_id IS NOT DISTINCT FROM $3) DESC, expires_at DESC LIMIT 1"
        );
        let existing: Option<Subscription> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(user_id)
            .bind(profile_id)
            .bind(redemption_id)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(existing) = existing {
            if let Some(rid) = redemption_id
                && existing.redemption_id != Some(rid)
                && !self
                    .record_held_before(&mut *tx, rid, existing.subscription_id)
                    .await?
            {
                // A void of this redemption came first.
                tx.rollback().await?;
                return Err(Error::RedemptionVoided(rid));
            }
            tx.commit().await?;
            return Ok((existing, true));
        }
        if let Some(rid) = redemption_id {
            // The redemption's outcome row, in the key space VoidRedemption
            // writes: a void that came first refuses this grant.
            let recorded = sqlx::query(
                "INSERT INTO redemptions (redemption_id) VALUES ($1) ON CONFLICT (redemption_id) DO NOTHING",
            )
            .bind(rid)
            .execute(&mut *tx)
            .await?;
            if recorded.rows_affected() == 0 {
                tx.rollback().await?;
                return Err(Error::RedemptionVoided(rid));
            }
        }
        let starts_at = Utc::now();
        let expires_at = starts_at + Duration::days(i64::from(profile.duration_days));
        let sql = format!(
            "INSERT INTO subscriptions ({SUBSCRIPTION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             RETURNING {SUBSCRIPTION_COLUMNS}"
        );
        let created: Subscription = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(Uuid::now_v7())
            .bind(profile_id)
            .bind(user_id)
            .bind(source_key_id)
            .bind(starts_at)
            .bind(expires_at)
            .bind(profile.course_ids)
            .bind(redemption_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((created, false))
    }

    async fn subscription(&self, subscription_id: Uuid) -> Result<Subscription, Error> {
        let sql =
            format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE subscription_id = $1");
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(subscription_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::Database(sqlx::Error::RowNotFound))
    }

    /// A page of a user's subscriptions, newest first.
    pub async fn list_subscriptions(
        &self,
        user_id: Uuid,
        before: Option<Cursor>,
        limit: i64,
    ) -> Result<Vec<Subscription>, Error> {
        self.get_user(user_id).await?;
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions
             WHERE user_id = $1
               AND ($2::timestamptz IS NULL OR (starts_at, subscription_id) < ($2, $3))
             ORDER BY starts_at DESC, subscription_id DESC
             LIMIT $4"
        );
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(user_id)
            .bind(before.map(|c| c.time))
            .bind(before.map(|c| c.id))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }
}

/// Which column names the enrollment whose class [`lock_class_of`] locks.
#[derive(Clone, Copy)]
enum EnrollmentBy {
    Id,
    Redemption,
}

/// Locks the class row of an enrollment first, in the order Enroll takes
/// its locks, so a cancel or a void and an enroll cannot deadlock.
async fn lock_class_of(
    tx: &mut sqlx::PgConnection,
    by: EnrollmentBy,
    id: Uuid,
) -> Result<(), Error> {
    let column = match by {
        EnrollmentBy::Id => "enrollment_id",
        EnrollmentBy::Redemption => "redemption_id",
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM classes
         WHERE class_id = (SELECT class_id FROM enrollments WHERE {column} = $1)
         FOR UPDATE"
    )))
    .bind(id)
    .execute(tx)
    .await?;
    Ok(())
}

/// How enrollment answered a redemption (a row of `redemptions`): granted
/// (neither field), refused, or found the grant held before.
#[derive(sqlx::FromRow)]
struct Outcome {
    refused_reason: Option<String>,
    held_before: Option<Uuid>,
}

/// The refusal reason VoidRedemption records.
const VOIDED: &str = "VOIDED";

/// The error a recorded refusal answers with.
fn refusal(reason: &str, rid: Uuid, class_id: Uuid) -> Error {
    if reason == VOIDED {
        Error::RedemptionVoided(rid)
    } else {
        Error::ClassFull(class_id)
    }
}

/// Whether a statement failed on a unique index.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}
