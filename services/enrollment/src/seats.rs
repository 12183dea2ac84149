//! Group commit of seats: concurrent `Enroll` calls for one class are taken
//! together, by one statement that locks the class row once, takes as many
//! seats as are free and inserts their rows. While a class's statement runs,
//! the calls that arrive for it wait, and the next statement takes them all:
//! a herd's 500 seats are a handful of commits, not 500 commits queued on
//! one row, and a lone call goes at once (nothing waits for a batch to fill).
//!
//! Only the common case is decided here: a free seat for a user of the
//! class's organization who holds none and whose redemption has no answer
//! yet. Everyone else (class full, already seated, another organization, a
//! redemption answered before, two calls for one user in a batch, any
//! error) is told "not here" and takes the one-call path in
//! [`Store::enroll`](crate::store::Store::enroll), which says why. The
//! guards stay PostgreSQL's own: the class row's lock and count, the
//! `enrolled_count <= max_students` CHECK, and the unique indexes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::domain::Enrollment;

/// Most seats one statement asks for.
const MAX_BATCH: usize = 1000;

/// One call's wish for a seat.
pub struct Wanted {
    pub user_id: Uuid,
    pub source_key_id: Option<Uuid>,
    pub redemption_id: Option<Uuid>,
}

type Waiting = (Wanted, oneshot::Sender<Option<Enrollment>>);

/// The seat batches of every class.
#[derive(Clone)]
pub struct Seats {
    pool: PgPool,
    /// Per class with a statement running: the calls waiting for the next.
    queues: Arc<Mutex<HashMap<Uuid, Vec<Waiting>>>>,
}

impl Seats {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            queues: Arc::default(),
        }
    }

    /// Takes a seat in `class_id` with the next statement for the class:
    /// the enrollment made, or `None` when this path does not decide.
    pub async fn take(&self, class_id: Uuid, wanted: Wanted) -> Option<Enrollment> {
        let (answer, answered) = oneshot::channel();
        let first = {
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            match queues.get_mut(&class_id) {
                Some(queue) => {
                    queue.push((wanted, answer));
                    None
                }
                None => {
                    queues.insert(class_id, Vec::new());
                    Some(vec![(wanted, answer)])
                }
            }
        };
        if let Some(batch) = first {
            // The class's statements run in their own task: a caller that
            // hangs up does not strand the calls waiting behind it.
            tokio::spawn(self.clone().drain(class_id, batch));
        }
        answered.await.ok().flatten()
    }

    /// Runs the class's statements until no call waits.
    async fn drain(self, class_id: Uuid, mut batch: Vec<Waiting>) {
        // If this task dies (a panic), the class's queue goes with it: the
        // calls waiting in it are told "not here" (their senders dropped)
        // and the next call starts afresh, rather than joining a queue that
        // no task drains.
        let mut guard = Abandoned {
            queues: &self.queues,
            class_id,
            armed: true,
        };
        loop {
            let rest = batch.split_off(batch.len().min(MAX_BATCH));
            self.run(class_id, batch).await;
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(queue) = queues.get_mut(&class_id) else {
                guard.armed = false;
                return;
            };
            batch = rest;
            batch.append(queue);
            if batch.is_empty() {
                queues.remove(&class_id);
                guard.armed = false;
                return;
            }
        }
    }

    /// One statement for a batch; every caller is answered.
    async fn run(&self, class_id: Uuid, batch: Vec<Waiting>) {
        let mut seated = match self.statement(class_id, &batch).await {
            Ok(seated) => seated,
            Err(e) => {
                // A redemption answered meanwhile (its row's key), or an
                // outage: each call finds out on its own path.
                tracing::debug!(%class_id, error = %e, "a seat batch was not taken");
                HashMap::new()
            }
        };
        for (wanted, answer) in batch {
            let _ = answer.send(seated.remove(&wanted.user_id));
        }
    }

    async fn statement(
        &self,
        class_id: Uuid,
        batch: &[Waiting],
    ) -> Result<HashMap<Uuid, Enrollment>, sqlx::Error> {
        let users: Vec<Uuid> = batch.iter().map(|(w, _)| w.user_id).collect();
        let ids: Vec<Uuid> = batch.iter().map(|_| Uuid::now_v7()).collect();
        let keys: Vec<Option<Uuid>> = batch.iter().map(|(w, _)| w.source_key_id).collect();
        let redemptions: Vec<Option<Uuid>> = batch.iter().map(|(w, _)| w.redemption_id).collect();
        // The class row is locked first (FOR UPDATE returns its newest
        // version), so `free` is exact until commit. Rows that conflict on a
        // unique index (a seat taken meanwhile) are skipped and not counted;
        // a redemption answered meanwhile fails the statement (its key), and
        // every call then takes the one-call path.
        let seated: Vec<Enrollment> = sqlx::query_as(
            "WITH class AS (
                 SELECT organization_id, max_students - enrolled_count AS free
                 FROM classes WHERE class_id = $1 FOR UPDATE),
             wanted AS (
                 SELECT * FROM unnest($2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[])
                     WITH ORDINALITY AS w(user_id, enrollment_id, source_key_id, redemption_id, ord)),
             eligible AS (
                 SELECT w.* FROM wanted w
                 JOIN users u ON u.user_id = w.user_id
                 JOIN class c ON c.organization_id = u.organization_id
                 WHERE w.ord = (SELECT min(o.ord) FROM wanted o WHERE o.user_id = w.user_id)
                   AND NOT EXISTS (SELECT 1 FROM enrollments e WHERE e.class_id = $1
                                   AND e.user_id = w.user_id AND e.cancelled_at IS NULL)
                   AND NOT EXISTS (SELECT 1 FROM redemptions r
                                   WHERE r.redemption_id = w.redemption_id)
                 ORDER BY w.ord
                 LIMIT (SELECT greatest(free, 0) FROM class)),
             seated AS (
                 INSERT INTO enrollments (enrollment_id, class_id, user_id, source_key_id, redemption_id)
                 SELECT enrollment_id, $1, user_id, source_key_id, redemption_id FROM eligible
                 ON CONFLICT DO NOTHING
                 RETURNING enrollment_id, class_id, user_id, source_key_id, enrolled_at,
                           cancelled_at, redemption_id),
             outcome AS (
                 INSERT INTO redemptions (redemption_id)
                 SELECT redemption_id FROM seated WHERE redemption_id IS NOT NULL),
             counted AS (
                 UPDATE classes SET enrolled_count = enrolled_count + (SELECT count(*) FROM seated)
                 WHERE class_id = $1)
             SELECT * FROM seated",
        )
        .bind(class_id)
        .bind(&users)
        .bind(&ids)
        .bind(&keys)
        .bind(&redemptions)
        .fetch_all(&self.pool)
        .await?;
        Ok(seated.into_iter().map(|e| (e.user_id, e)).collect())
    }
}

/// Removes a class's queue when its draining task ends without doing so.
struct Abandoned<'a> {
    queues: &'a Mutex<HashMap<Uuid, Vec<Waiting>>>,
    class_id: Uuid,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.queues
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.class_id);
        }
    }
}
