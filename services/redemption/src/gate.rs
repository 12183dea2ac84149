//! The Redis admission gate: per class, seat holds (one per user, expiring)
//! and confirmed seats, checked and changed atomically by Lua scripts. It
//! turns a herd away before it reaches PostgreSQL; PostgreSQL stays the
//! guarantee. Every key carries the hash tag `{class:ID}`, so a class's state
//! lives on one Redis Cluster slot. Missing state is rebuilt from enrollment's
//! roster under a short lock; when Redis is unreachable the gate steps aside.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::Script;
use trainingkeys_shared::redis::Redis;
use uuid::Uuid;

use crate::error::Error;
use crate::metrics::{GateDecision, METRICS};

/// How long the rebuild lock lives if its holder dies.
const REBUILD_LOCK: Duration = Duration::from_secs(3);
/// How long a caller waits for someone else's rebuild before stepping aside.
const REBUILD_WAIT: Duration = Duration::from_secs(2);
/// How long after a rebuild a class's state is not rebuilt again for a
/// cancelled seat: the enrolled counts callers bring may be older than the
/// roster just read (at every sell-out they are).
const FRESH: Duration = Duration::from_secs(1);

/// The gate's answer for one user and class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A hold was placed: go on and enroll, then settle it.
    Admitted,
    /// The user already holds a seat or a hold: the idempotent path.
    AlreadyIn,
    /// Confirmed seats plus holds reached the maximum.
    Full,
    /// The gate is off or Redis is unreachable: the PostgreSQL guard alone decides.
    Bypassed,
}

/// How a seat hold ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The enrollment committed: the hold becomes a confirmed seat.
    Confirm,
    /// The redemption will not take the seat: the hold is released.
    Release,
}

/// The admission gate.
pub struct Gate {
    redis: Arc<Redis>,
    enabled: bool,
    /// Rebuild missing state from enrollment (only tests turn this off).
    rebuild_enabled: bool,
    hold: Duration,
    state_ttl: Duration,
    admit: Script,
    peek: Script,
    settle: Script,
    rebuild: Script,
    /// Admissions that fell back to the PostgreSQL guard (a running count in
    /// the logs; the metric is `trainingkeys.redemption.gate.bypassed`).
    pub bypassed: AtomicU64,
    /// Classes whose Redis state may disagree with PostgreSQL (a settle was
    /// lost): rebuilt by [`repair`](Self::repair).
    dirty: Mutex<HashSet<Uuid>>,
    /// Classes this replica admitted to lately. A Redis failure may mean a
    /// restart or a failover to a replica that missed writes, which can leave
    /// any class's state stale, not just the one in the failed call: all of
    /// them are rebuilt once Redis answers again.
    active: Mutex<HashSet<Uuid>>,
    /// The Redis server's `run_id` at the last repair: a new one means a
    /// restart or a failover (the client reconnects without an error, so
    /// this is how the gate learns its state may be stale).
    run_id: Mutex<Option<String>>,
}

/// Most classes remembered as active; beyond it the memory starts afresh.
const MAX_ACTIVE: usize = 10_000;

fn keys(class_id: Uuid) -> [String; 7] {
    let tag = format!("{{class:{class_id}}}");
    [
        format!("{tag}:holds"),
        format!("{tag}:confirmed"),
        format!("{tag}:ready"),
        format!("{tag}:lock"),
        format!("{tag}:recent"),
        format!("{tag}:fresh"),
        format!("{tag}:seen"),
    ]
}

/// `script` with a class's state keys, in the order the admission and
/// peek scripts read them: holds, confirmed, ready, fresh, seen.
fn with_state_keys<'s>(script: &'s Script, keys: &[String; 7]) -> redis::ScriptInvocation<'s> {
    let [holds, confirmed, ready, _, _, fresh, seen] = keys;
    let mut invocation = script.prepare_invoke();
    invocation
        .key(holds)
        .key(confirmed)
        .key(ready)
        .key(fresh)
        .key(seen);
    invocation
}

/// What a class's state is rebuilt from: enrollment's seat holders, and the
/// redemptions recorded for the class (whose retries must be answered from
/// their record, never turned away by [`Gate::full_for_sure`]).
#[derive(Debug, Default)]
pub struct Roster {
    /// User ids holding a seat.
    pub seated: Vec<String>,
    /// Redemption ids recorded for the class.
    pub redemptions: Vec<String>,
}

impl Gate {
    /// A gate on `redis`; `enabled = false` bypasses it entirely.
    pub fn new(
        redis: Arc<Redis>,
        enabled: bool,
        hold: Duration,
        state_ttl: Duration,
        rebuild: bool,
    ) -> Self {
        Self {
            redis,
            enabled,
            rebuild_enabled: rebuild,
            hold,
            state_ttl,
            admit: Script::new(include_str!("lua/gate_admit.lua")),
            peek: Script::new(include_str!("lua/gate_peek.lua")),
            settle: Script::new(include_str!("lua/gate_settle.lua")),
            rebuild: Script::new(include_str!("lua/gate_rebuild.lua")),
            bypassed: AtomicU64::new(0),
            dirty: Mutex::new(HashSet::new()),
            active: Mutex::new(HashSet::new()),
            run_id: Mutex::new(None),
        }
    }

    /// Whether the class is full for `user_id`, decided by Redis alone (one
    /// read-only script call): true only when admission would answer
    /// [`Admission::Full`] and the redemption `redemption_id` (the one its
    /// idempotency key names) was never let through here, so it has no
    /// recorded answer to replay. False means "ask": the full path decides.
    /// `max_students` and `enrolled` may be a moment old: a raised maximum
    /// counts once they are read again.
    pub async fn full_for_sure(
        &self,
        class_id: Uuid,
        user_id: Uuid,
        redemption_id: Uuid,
        max_students: i32,
        enrolled: i32,
    ) -> bool {
        if !self.enabled {
            return false;
        }
        let keys = &keys(class_id);
        let answer = self
            .redis
            .run("gate_peek", |mut c| async move {
                with_state_keys(&self.peek, keys)
                    .arg(user_id.to_string())
                    .arg(max_students)
                    .arg(enrolled)
                    .arg(redemption_id.to_string())
                    .invoke_async::<String>(&mut c)
                    .await
            })
            .await;
        // Unreachable: the full path decides (and bypasses the gate).
        let full = matches!(answer.as_deref(), Ok("FULL"));
        if full {
            METRICS.gate(GateDecision::Full);
        }
        full
    }

    /// Asks to admit `user_id` to a class of `max_students`, of which
    /// PostgreSQL last counted `enrolled`, for the redemption
    /// `redemption_id`. `roster` fetches enrollment's authoritative seat
    /// holders (and the class's recorded redemptions) when the class's
    /// state is missing (flush, restart, failover, expiry) or counts a seat
    /// that was cancelled since.
    pub async fn admit<R, Fut>(
        &self,
        class_id: Uuid,
        user_id: Uuid,
        redemption_id: Uuid,
        max_students: i32,
        enrolled: i32,
        roster: R,
    ) -> Admission
    where
        R: FnOnce() -> Fut,
        Fut: Future<Output = Result<Roster, Error>>,
    {
        if !self.enabled {
            return Admission::Bypassed;
        }
        self.mark_active(class_id);
        let keys = &keys(class_id);
        let mut roster = Some(roster);
        let deadline = tokio::time::Instant::now() + REBUILD_WAIT;
        loop {
            // Checked against PostgreSQL's count until one rebuild was done.
            let enrolled = if roster.is_some() { enrolled } else { -1 };
            let answer = self
                .redis
                .run("gate_admit", |mut c| async move {
                    with_state_keys(&self.admit, keys)
                        .arg(user_id.to_string())
                        .arg(self.hold.as_millis() as u64)
                        .arg(max_students)
                        .arg(enrolled)
                        .arg(redemption_id.to_string())
                        .arg(self.state_ttl.as_millis() as u64)
                        .invoke_async::<String>(&mut c)
                        .await
                })
                .await;
            let answer = match answer {
                Ok(a) => a,
                Err(e) => return self.bypass(class_id, &e),
            };
            match answer.as_str() {
                "ADMITTED" => {
                    METRICS.gate(GateDecision::Admitted);
                    return Admission::Admitted;
                }
                "CONFIRMED" | "HELD" => return Admission::AlreadyIn,
                "FULL" => {
                    METRICS.gate(GateDecision::Full);
                    return Admission::Full;
                }
                _missing_or_stale => {}
            }
            if let Some(fetch) = roster.take() {
                let rebuilt = if self.rebuild_enabled {
                    self.try_rebuild(class_id, fetch).await
                } else {
                    self.try_rebuild(class_id, || async { Ok(Roster::default()) })
                        .await
                };
                match rebuilt {
                    Ok(_) => continue,
                    Err(e) => return self.bypass(class_id, &e),
                }
            }
            if tokio::time::Instant::now() > deadline {
                return self.bypass(class_id, &"gate state was not rebuilt in time");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rebuilds a class's confirmed seats if this caller wins the lock.
    /// Returns whether it rebuilt (false: someone else is rebuilding, or the
    /// lock ran out before the roster was read).
    async fn try_rebuild<R, Fut>(
        &self,
        class_id: Uuid,
        roster: R,
    ) -> Result<bool, Box<dyn std::fmt::Display + Send>>
    where
        R: FnOnce() -> Fut,
        Fut: Future<Output = Result<Roster, Error>>,
    {
        let [holds, confirmed, ready, lock, recent, fresh, seen] = keys(class_id);
        let token = Uuid::new_v4().to_string();
        let locked: Option<String> = self
            .redis
            .run("gate_rebuild_lock", |mut c| {
                let (lock, token) = (lock.clone(), token.clone());
                async move {
                    redis::cmd("SET")
                        .arg(&lock)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(REBUILD_LOCK.as_millis() as u64)
                        .query_async(&mut c)
                        .await
                }
            })
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::fmt::Display + Send>)?;
        if locked.is_none() {
            return Ok(false);
        }
        let roster = roster()
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::fmt::Display + Send>)?;
        let seats = roster.seated.len();
        let rebuilt = self
            .redis
            .run("gate_rebuild", |mut c| async move {
                let mut invocation = self.rebuild.key(&confirmed);
                invocation
                    .key(&ready)
                    .key(&lock)
                    .key(&recent)
                    .key(&holds)
                    .key(&fresh)
                    .key(&seen)
                    .arg(self.state_ttl.as_millis() as u64)
                    .arg(&token)
                    .arg(FRESH.as_millis() as u64)
                    .arg(seats);
                for id in roster.seated.iter().chain(&roster.redemptions) {
                    invocation.arg(id);
                }
                invocation.invoke_async::<i64>(&mut c).await
            })
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::fmt::Display + Send>)?;
        // 0: the lock expired (or was flushed) while the roster was read, so
        // this roster may be stale: not applied, and not counted as rebuilt.
        if rebuilt == 1 {
            tracing::info!(%class_id, seats, "rebuilt the gate state of a class from enrollment");
            METRICS.gate(GateDecision::Rebuilt);
        }
        Ok(rebuilt == 1)
    }

    fn bypass(&self, class_id: Uuid, why: &dyn std::fmt::Display) -> Admission {
        self.mark_dirty(class_id);
        let n = self.bypassed.fetch_add(1, Ordering::Relaxed) + 1;
        METRICS.gate(GateDecision::Bypassed);
        tracing::warn!(%class_id, gate_bypassed_total = n, "admission gate unavailable ({why}): PostgreSQL guard only");
        Admission::Bypassed
    }

    /// Ends a hold: confirmed after the enrollment committed, else released.
    /// Best effort: a lost settle only leaves a hold to expire.
    /// `redemption_id` is the recorded redemption the hold was for.
    pub async fn settle(&self, class_id: Uuid, user_id: Uuid, redemption_id: Uuid, how: Settle) {
        if !self.enabled {
            return;
        }
        let [holds, confirmed, ready, lock, recent, _, seen] = keys(class_id);
        let result = self
            .redis
            .run("gate_settle", |mut c| async move {
                self.settle
                    .key(&holds)
                    .key(&confirmed)
                    .key(&lock)
                    .key(&recent)
                    .key(&ready)
                    .key(&seen)
                    .arg(user_id.to_string())
                    .arg(match how {
                        Settle::Confirm => "1",
                        Settle::Release => "0",
                    })
                    .arg(redemption_id.to_string())
                    .arg(self.state_ttl.as_millis() as u64)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        match result {
            Ok(1) => {}
            // The state was lost (flush, restart, expiry) while this seat was
            // on its way: no later admission may come to rebuild it, so the
            // repair sweep does.
            Ok(_) => self.mark_rebuild(class_id),
            Err(e) => {
                tracing::warn!(%class_id, error = %e, ?how, "could not settle a seat hold; the class will be rebuilt");
                self.mark_dirty(class_id);
            }
        }
    }

    /// Marks every class admitted to lately for a rebuild when Redis is not
    /// the server it was at the last look (restarted, or failed over). Called
    /// once at start-up for a baseline, then by every repair sweep.
    pub async fn notice_new_server(&self) {
        let info = self
            .redis
            .run("info_server", |mut c| async move {
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<redis::Value>(&mut c)
                    .await
            })
            .await;
        let Ok(info) = info else { return };
        // One server's INFO, or (a Cluster) every primary's: the run ids,
        // together, change when any primary restarts or is failed over.
        let mut run_ids = Vec::new();
        collect_run_ids(&info, &mut run_ids);
        if run_ids.is_empty() {
            return;
        }
        run_ids.sort();
        let run_id = run_ids.join(",");
        let previous = self
            .run_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(run_id.clone());
        if previous.is_some_and(|p| p != run_id) {
            tracing::warn!(
                "redis restarted or failed over: rebuilding the gate state of every active class"
            );
            self.mark_all_active();
        }
    }

    /// Marks `class_id` alone for a rebuild.
    fn mark_rebuild(&self, class_id: Uuid) {
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(class_id);
    }

    /// Marks `class_id` and every class admitted to lately for a rebuild.
    fn mark_dirty(&self, class_id: Uuid) {
        self.mark_rebuild(class_id);
        self.mark_all_active();
    }

    /// Marks every class admitted to lately for a rebuild.
    fn mark_all_active(&self) {
        let active: Vec<Uuid> = self
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(active);
    }

    fn mark_active(&self, class_id: Uuid) {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if active.len() >= MAX_ACTIVE {
            active.clear();
        }
        active.insert(class_id);
    }

    /// Rebuilds every class whose state may have drifted from PostgreSQL
    /// (a lost settle, an admission that bypassed Redis), so the gate and
    /// PostgreSQL agree again once Redis is back. `roster` fetches a class's
    /// seat holders. Returns how many classes were repaired.
    pub async fn repair<R, Fut>(&self, roster: R) -> usize
    where
        R: Fn(Uuid) -> Fut,
        Fut: Future<Output = Result<Roster, Error>>,
    {
        if !self.enabled || !self.rebuild_enabled {
            return 0;
        }
        self.notice_new_server().await;
        let dirty: Vec<Uuid> = self
            .dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        let mut repaired = 0;
        for class_id in dirty {
            match self.try_rebuild(class_id, || roster(class_id)).await {
                Ok(true) => repaired += 1,
                // Someone else holds the rebuild lock, or Redis is still
                // away: try again on the next sweep.
                Ok(false) | Err(_) => self.mark_rebuild(class_id),
            }
        }
        repaired
    }
}

/// The `run_id`s in an INFO answer: one server's text, or a map of each
/// node's.
fn collect_run_ids(info: &redis::Value, into: &mut Vec<String>) {
    match info {
        redis::Value::BulkString(bytes) => into.extend(
            String::from_utf8_lossy(bytes)
                .lines()
                .filter_map(|l| l.strip_prefix("run_id:"))
                .map(|r| r.trim().to_owned()),
        ),
        redis::Value::VerbatimString { text, .. } | redis::Value::SimpleString(text) => into
            .extend(
                text.lines()
                    .filter_map(|l| l.strip_prefix("run_id:"))
                    .map(|r| r.trim().to_owned()),
            ),
        redis::Value::Map(pairs) => {
            for (_, value) in pairs {
                collect_run_ids(value, into);
            }
        }
        redis::Value::Array(values) => {
            for value in values {
                collect_run_ids(value, into);
            }
        }
        _ => {}
    }
}
