//! Guessing limits: failed attempts (unknown or mistyped codes) are counted
//! per caller and per user in Redis; past the limit every attempt is refused
//! with TOO_MANY_ATTEMPTS (whatever the key), and each further failure doubles
//! the lock-out. When Redis is unreachable the limiter fails open, loudly.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use trainingkeys_shared::redis::Redis;

use crate::error::Error;
use crate::metrics::METRICS;

/// The failed-attempt limiter.
pub struct Limiter {
    redis: Arc<Redis>,
    limit: u32,
    window: Duration,
    max_lockout: Duration,
    fail: Script,
}

/// Who is attempting: counters are kept for each identity separately.
pub fn caller_key(caller: &str) -> String {
    format!("attempts:caller:{caller}")
}

/// The counter of one user (by id, or by organization and email for a new one).
pub fn user_key(user: &str) -> String {
    format!("attempts:user:{user}")
}

impl Limiter {
    /// A limiter allowing `limit` failures per `window`, locking out for at
    /// most `max_lockout`.
    pub fn new(redis: Arc<Redis>, limit: u32, window: Duration, max_lockout: Duration) -> Self {
        Self {
            redis,
            limit,
            window,
            max_lockout,
            fail: Script::new(include_str!("lua/limiter_fail.lua")),
        }
    }

    /// Refuses when any of `counters` is locked out. One round trip for all
    /// of them: a pipeline of plain reads (`GET` and `PTTL` per counter,
    /// each touching one key, so each goes to its own Redis Cluster slot).
    pub async fn check(&self, counters: &[String]) -> Result<(), Error> {
        let mut pipe = redis::pipe();
        for counter in counters {
            pipe.get(counter).cmd("PTTL").arg(counter);
        }
        let result = self
            .redis
            .run(|mut c| async move { pipe.query_async::<Vec<(Option<u32>, i64)>>(&mut c).await })
            .await;
        let counts = match result {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, "guessing limits unavailable: allowing the attempt");
                METRICS.limits_bypassed.add(1, &[]);
                return Ok(());
            }
        };
        let wait = counts
            .into_iter()
            .filter(|(failures, _)| failures.unwrap_or(0) >= self.limit)
            .map(|(_, ttl_ms)| ttl_ms)
            .max()
            .unwrap_or(0);
        if wait > 0 {
            return Err(Error::TooManyAttempts {
                retry_after: Duration::from_millis(wait as u64),
            });
        }
        Ok(())
    }

    /// Counts a failed attempt against each of `counters`.
    pub async fn record_failure(&self, counters: &[String]) {
        for counter in counters {
            let result = self
                .redis
                .run(|mut c| async move {
                    self.fail
                        .key(counter)
                        .arg(self.limit)
                        .arg(self.window.as_millis() as u64)
                        .arg(self.max_lockout.as_millis() as u64)
                        .invoke_async::<i64>(&mut c)
                        .await
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "could not count a failed attempt");
            }
        }
    }
}
