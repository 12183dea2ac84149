//! Guessing limits: failed attempts (unknown or mistyped codes) are counted
//! per caller and per user in Redis; past the limit every attempt is refused
//! with TOO_MANY_ATTEMPTS (whatever the key), and each further failure doubles
//! the lock-out. When Redis is unreachable the limiter fails open, loudly.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use trainingkeys_shared::redis::Redis;

use crate::error::Error;
use crate::metrics::{LimitEvent, METRICS};

/// The failed-attempt limiter.
pub struct Limiter {
    redis: Arc<Redis>,
    limit: u32,
    window: Duration,
    max_lockout: Duration,
    /// Failures per window across the whole service before identities with
    /// a failure of their own are refused.
    global_limit: u32,
    /// Longest an attempt counts as in flight (a crashed process's
    /// reservation lapses after it).
    in_flight_for: Duration,
    fail: Script,
    reserve: Script,
}

/// What [`Limiter::reserve`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Reserved a slot: its maker releases it.
    Made,
    /// The same attempt was already in flight (or Redis is down): nothing
    /// to release.
    Joined,
}

/// The service-wide failure counter: the budget that rotating identities
/// cannot multiply.
const GLOBAL_KEY: &str = "attempts:global";

/// Who is attempting: counters are kept for each identity separately.
pub fn caller_key(caller: &str) -> String {
    format!("attempts:caller:{caller}")
}

/// The counter of one user (by id, or by organization and email for a new
/// one). Hash-tagged: its set of attempts in flight shares its slot.
pub fn user_key(user: &str) -> String {
    format!("attempts:user:{{{user}}}")
}

/// The attempts in flight of the user whose counter is `user_key`.
fn in_flight_key(user_key: &str) -> String {
    format!("{user_key}:in-flight")
}

impl Limiter {
    /// A limiter allowing `limit` failures per `window`, locking out for at
    /// most `max_lockout`.
    pub fn new(
        redis: Arc<Redis>,
        limit: u32,
        window: Duration,
        max_lockout: Duration,
        global_limit: u32,
        in_flight_for: Duration,
    ) -> Self {
        Self {
            redis,
            limit,
            window,
            max_lockout,
            global_limit,
            in_flight_for,
            fail: Script::new(include_str!("lua/limiter_fail.lua")),
            reserve: Script::new(include_str!("lua/limiter_reserve.lua")),
        }
    }

    /// Reserves `attempt` (an idempotency key) of the user whose counter is
    /// `user_key`, atomically: its failures plus its attempts in flight stay
    /// below the limit, so a burst of concurrent guesses for one user cannot
    /// all be looked up before one is counted. Refused with
    /// TOO_MANY_ATTEMPTS when locked out, and with REDEMPTION_IN_PROGRESS
    /// (retry shortly) while the limit is taken by attempts in flight.
    /// Every reservation is [`release`](Self::release)d when its attempt ends.
    pub async fn reserve(&self, user_key: &str, attempt: &str) -> Result<Reservation, Error> {
        let in_flight = in_flight_key(user_key);
        let result = self
            .redis
            .run("limiter_reserve", |mut c| {
                let in_flight = in_flight.clone();
                async move {
                    self.reserve
                        .key(user_key)
                        .key(in_flight)
                        .arg(self.limit)
                        .arg(attempt)
                        .arg(self.in_flight_for.as_millis() as u64)
                        .invoke_async::<i64>(&mut c)
                        .await
                }
            })
            .await;
        match result {
            Ok(1) => Ok(Reservation::Made),
            Ok(2) => Ok(Reservation::Joined),
            Ok(0) => Err(Error::InProgress),
            Ok(wait) => Err(Error::TooManyAttempts {
                retry_after: Duration::from_millis(wait.unsigned_abs()),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "guessing limits unavailable: allowing the attempt");
                METRICS.limit(LimitEvent::Bypassed);
                Ok(Reservation::Joined)
            }
        }
    }

    /// Ends a reservation (its failure, if it failed, is already counted).
    pub async fn release(&self, user_key: &str, attempt: &str) {
        let in_flight = in_flight_key(user_key);
        let result = self
            .redis
            .run("limiter_release", |mut c| {
                let in_flight = in_flight.clone();
                async move {
                    redis::cmd("ZREM")
                        .arg(in_flight)
                        .arg(attempt)
                        .query_async::<i64>(&mut c)
                        .await
                }
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not end an attempt's reservation");
        }
    }

    /// Refuses when any of `counters` is locked out, or when the
    /// service-wide failure budget is spent and one of them has failed in
    /// this window (so identities rotated by an attacker get one failure
    /// each at most, while students with a clean record go on). One round
    /// trip for all of them: plain reads (`GET` and `PTTL` per counter, each
    /// pair touching one key, so each goes to its own Redis Cluster slot),
    /// sent together.
    pub async fn check(&self, counters: &[String]) -> Result<(), Error> {
        let result = self
            .redis
            .run("limiter_check", |c| async move {
                // One small pipeline per counter, all sent at once: on a
                // Cluster the counters live in different slots, and a
                // pipeline must stay within one.
                let reads =
                    counters
                        .iter()
                        .map(String::as_str)
                        .chain([GLOBAL_KEY])
                        .map(|counter| {
                            let mut c = c.clone();
                            async move {
                                redis::pipe()
                                    .get(counter)
                                    .cmd("PTTL")
                                    .arg(counter)
                                    .query_async::<(Option<u32>, i64)>(&mut c)
                                    .await
                            }
                        });
                futures::future::try_join_all(reads).await
            })
            .await;
        let mut counts = match result {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, "guessing limits unavailable: allowing the attempt");
                METRICS.limit(LimitEvent::Bypassed);
                return Ok(());
            }
        };
        let (global, global_ttl) = counts.pop().unwrap_or((None, 0));
        let has_failed = counts.iter().any(|(failures, _)| failures.unwrap_or(0) > 0);
        if global.unwrap_or(0) >= self.global_limit && has_failed {
            METRICS.limit(LimitEvent::GlobalRefused);
            return Err(Error::TooManyAttempts {
                retry_after: Duration::from_millis(global_ttl.max(1000) as u64),
            });
        }
        let wait = counts
            .into_iter()
            .filter(|(failures, _)| failures.unwrap_or(0) >= self.limit)
            .map(|(_, ttl_ms)| ttl_ms)
            .max()
            .unwrap_or(0);
        if wait > 0 {
            METRICS.limit(LimitEvent::Refused);
            return Err(Error::TooManyAttempts {
                retry_after: Duration::from_millis(wait as u64),
            });
        }
        Ok(())
    }

    /// Counts a failed attempt against each of `counters`, and against
    /// the service-wide budget.
    pub async fn record_failure(&self, counters: &[String]) {
        METRICS.limit(LimitEvent::Failure);
        // The global budget never locks out for longer than its window: it
        // must not become a switch that shuts everyone out for an hour.
        let per_identity = counters
            .iter()
            .map(|c| (c.as_str(), self.limit, self.max_lockout));
        let global = (GLOBAL_KEY, self.global_limit, self.window);
        for (counter, limit, longest) in per_identity.chain([global]) {
            let result = self
                .redis
                .run("limiter_fail", |mut c| async move {
                    self.fail
                        .key(counter)
                        .arg(limit)
                        .arg(self.window.as_millis() as u64)
                        .arg(longest.as_millis() as u64)
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
