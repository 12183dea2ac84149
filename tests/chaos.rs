//! The fault-injection harness: a herd of redemptions through the system
//! while a fault strikes, every attempt's outcome recorded per idempotency
//! key (ok / failed with a reason / unknown after retries), and a checker of
//! the invariants (docs/architecture.md) over PostgreSQL and Redis once
//! things settle: seats, acknowledged answers, the gate, and every key's
//! accounting (its uses equal its live use rows and the grants naming it, and
//! no failed or unfinished redemption holds a use or a grant).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use tonic::Code;
use trainingkeys_proto::v1 as pb;

use crate::{TestApp, as_user, idem};

/// How one redemption attempt ended, as its client saw it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Acknowledged: the seat must be in PostgreSQL.
    Ok(Box<pb::RedeemKeyResponse>),
    /// A final answer (e.g. CLASS_FULL): nothing may be left taken.
    Failed(Code, String),
    /// No final answer, even after retries with the same idempotency key.
    Unknown(String),
}

/// One student's attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub user_id: String,
    /// The code redeemed.
    pub code: String,
    pub idempotency_key: String,
    pub outcome: Outcome,
}

/// What a herd redeemed: the class its class keys seat students in, and
/// which codes grant subscriptions instead.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    pub organization_id: String,
    pub class_id: String,
    /// The class's event key.
    pub event_code: String,
    pub max: i32,
    pub subscription_codes: HashSet<String>,
}

/// Answers a client retries with the same idempotency key.
fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
    )
}

/// Every (user, code) pair is redeemed once (one idempotency key each),
/// retrying outages on the next replica; `fault` runs when a third of the
/// answers are in. `deadline` bounds each call, like a real client's.
pub async fn herd<F, Fut>(
    app: &TestApp,
    students: &[(String, String)],
    deadline: Duration,
    fault: F,
) -> Vec<Attempt>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let attempts = students.iter().enumerate().map(|(i, (user, code))| {
        let clients: Vec<_> = (0..app.redemption_clients())
            .map(|r| app.redemption_client(i + r))
            .collect();
        let key = idem();
        let request = as_user(code, user, &key);
        let (user, code) = (user.clone(), code.clone());
        async move {
            let mut last = String::new();
            let mut outcome = None;
            for attempt in 0..40 {
                let mut client = clients[attempt % clients.len()].clone();
                let mut call = tonic::Request::new(request.clone());
                call.set_timeout(deadline);
                match client.redeem_key(call).await {
                    Ok(r) => {
                        outcome = Some(Outcome::Ok(Box::new(r.into_inner())));
                        break;
                    }
                    Err(s) if retryable(&s) => {
                        last = format!("{:?} {}", s.code(), s.message());
                        tokio::time::sleep(Duration::from_millis(100 + 50 * attempt as u64)).await;
                    }
                    Err(s) => {
                        outcome = Some(Outcome::Failed(s.code(), crate::reason(&s)));
                        break;
                    }
                }
            }
            Attempt {
                user_id: user,
                code,
                idempotency_key: key,
                outcome: outcome.unwrap_or(Outcome::Unknown(last)),
            }
        }
    });
    crate::spawn_with_fault(attempts, students.len() / 3, fault).await
}

/// Checks the invariants after the herd, once recovery has had time to
/// settle: returns every violation found (empty = all hold).
pub async fn check(
    app: &TestApp,
    scenario: &Scenario,
    attempts: &[Attempt],
    settle: Duration,
) -> Vec<String> {
    let (class_id, max) = (scenario.class_id.as_str(), scenario.max);
    let mut violations = Vec::new();
    let mut db = app.db().await;

    // Unfinished redemptions are finished or compensated by recovery.
    let settled = crate::eventually(settle, || async {
        let mut db = app.db().await;
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM redemption.redemptions WHERE state = 'admitted'",
        )
        .fetch_one(&mut db)
        .await
        .unwrap_or(-1);
        open == 0
    })
    .await;
    if !settled {
        violations.push("redemptions left half-way after settling".to_owned());
    }

    let roster: Vec<String> = sqlx::query_scalar(
        "SELECT user_id::text FROM enrollment.enrollments WHERE class_id = $1::uuid AND cancelled_at IS NULL",
    )
    .bind(class_id)
    .fetch_all(&mut db)
    .await
    .unwrap_or_default();
    let seat_count: i32 = sqlx::query_scalar(
        "SELECT enrolled_count FROM enrollment.classes WHERE class_id = $1::uuid",
    )
    .bind(class_id)
    .fetch_one(&mut db)
    .await
    .unwrap_or(-1);
    let enrolled: HashSet<&str> = roster.iter().map(String::as_str).collect();

    // 1. Never more than the maximum.
    if roster.len() > max as usize || seat_count > max {
        violations.push(format!(
            "oversold: {} roster rows, seat count {seat_count}, maximum {max}",
            roster.len()
        ));
    }
    if seat_count != roster.len() as i32 {
        violations.push(format!(
            "seat count {seat_count} differs from {} roster rows",
            roster.len()
        ));
    }
    // 2. At most once per student.
    if enrolled.len() != roster.len() {
        violations.push(format!(
            "{} students hold two seats",
            roster.len() - enrolled.len()
        ));
    }
    // 3. Every acknowledged redemption is committed; 4. no final failure
    // left a seat or a subscription.
    let subscribed: HashSet<String> = sqlx::query_scalar(
        "SELECT user_id::text FROM enrollment.subscriptions WHERE expires_at > now()",
    )
    .fetch_all(&mut db)
    .await
    .unwrap_or_default()
    .into_iter()
    .collect();
    for a in attempts {
        let holds = if scenario.subscription_codes.contains(&a.code) {
            subscribed.contains(&a.user_id)
        } else {
            enrolled.contains(a.user_id.as_str())
        };
        match &a.outcome {
            Outcome::Ok(_) if !holds => {
                violations.push(format!(
                    "acknowledged redemption {} is not in PostgreSQL",
                    a.idempotency_key
                ));
            }
            Outcome::Failed(code, reason) if holds => {
                violations.push(format!(
                    "failed redemption ({code:?} {reason}) left a grant for {}",
                    a.user_id
                ));
            }
            _ => {}
        }
    }
    violations.extend(keys_accounted_for(&mut db).await);
    // A sold-out class sells every seat, unless answers were lost.
    let ok = attempts
        .iter()
        .filter(|a| {
            matches!(a.outcome, Outcome::Ok(_)) && !scenario.subscription_codes.contains(&a.code)
        })
        .count();
    if ok > max as usize {
        violations.push(format!("{ok} acknowledged redemptions for {max} seats"));
    }

    // 5. After settling, Redis agrees with PostgreSQL.
    if let Err(e) = gate_agrees(app, class_id, &enrolled, settle).await {
        violations.push(e);
    }
    violations
}

/// Invariant 8 for every class enrollment and subscription key of the
/// database: its recorded uses equal its live use rows and the grants that
/// name it (voided grants, taken back, excepted), and no redemption that did
/// not complete holds a live use or a grant.
pub async fn keys_accounted_for(db: &mut sqlx::PgConnection) -> Vec<String> {
    let mut violations = Vec::new();
    let rows: Vec<(String, i32, i64, i64)> = sqlx::query_as(
        "SELECT k.key_id::text, k.uses,
                (SELECT count(*) FROM key_issuance.key_uses u
                 WHERE u.key_id = k.key_id AND u.released_at IS NULL),
                (SELECT count(*) FROM enrollment.enrollments e
                 WHERE e.source_key_id = k.key_id AND e.redemption_id IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM enrollment.redemptions r
                                   WHERE r.redemption_id = e.redemption_id AND r.refused_reason = 'VOIDED'))
              + (SELECT count(*) FROM enrollment.subscriptions s
                 WHERE s.source_key_id = k.key_id AND s.redemption_id IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM enrollment.redemptions r
                                   WHERE r.redemption_id = s.redemption_id AND r.refused_reason = 'VOIDED'))
         FROM key_issuance.keys k WHERE k.kind IN (1, 2)",
    )
    .fetch_all(&mut *db)
    .await
    .expect("key accounting query");
    for (key_id, uses, live, grants) in rows {
        if i64::from(uses) != live || live != grants {
            violations.push(format!(
                "key {key_id}: {uses} uses recorded, {live} live use rows, {grants} grants naming it"
            ));
        }
    }
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM key_issuance.key_uses u
         JOIN redemption.redemptions r ON r.redemption_id = u.redemption_id
         WHERE u.released_at IS NULL AND r.state <> 'completed'",
    )
    .fetch_one(&mut *db)
    .await
    .expect("held uses query");
    if held != 0 {
        violations.push(format!(
            "{held} key uses held by failed or unfinished redemptions"
        ));
    }
    let granted: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM enrollment.enrollments e
                 JOIN redemption.redemptions r ON r.redemption_id = e.redemption_id
                 WHERE e.cancelled_at IS NULL AND r.state <> 'completed')
              + (SELECT count(*) FROM enrollment.subscriptions s
                 JOIN redemption.redemptions r ON r.redemption_id = s.redemption_id
                 WHERE s.expires_at > now() AND r.state <> 'completed')",
    )
    .fetch_one(&mut *db)
    .await
    .expect("held grants query");
    if granted != 0 {
        violations.push(format!(
            "{granted} grants held by failed or unfinished redemptions"
        ));
    }
    violations
}

/// Waits up to `within` for a class's gate state in Redis to agree with the
/// roster in PostgreSQL: the state is there and trusted (rebuilt if a fault
/// lost it), its confirmed seats are exactly `enrolled`, and no unexpired
/// hold is left. Says how they differ if they never agree.
pub async fn gate_agrees(
    app: &TestApp,
    class_id: &str,
    enrolled: &HashSet<&str>,
    within: Duration,
) -> Result<(), String> {
    let key = |k: &str| format!("{{class:{class_id}}}:{k}");
    let (confirmed_key, holds_key, ready_key) = (key("confirmed"), key("holds"), key("ready"));
    let look = || async {
        let ready: i64 = crate::servers::command(&app.redis_url, &["EXISTS", &ready_key])
            .await
            .unwrap_or(0);
        let confirmed: HashSet<String> =
            crate::servers::command(&app.redis_url, &["SMEMBERS", &confirmed_key])
                .await
                .unwrap_or_default();
        let now: Vec<String> = crate::servers::command(&app.redis_url, &["TIME"])
            .await
            .unwrap_or_default();
        let now_ms = now.first().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) * 1000;
        let live_holds: i64 = crate::servers::command(
            &app.redis_url,
            &["ZCOUNT", &holds_key, &format!("({now_ms}"), "+inf"],
        )
        .await
        .unwrap_or(-1);
        (ready == 1, confirmed, live_holds)
    };
    let agrees = crate::eventually(within, || async {
        let (ready, confirmed, live_holds) = look().await;
        let confirmed: HashSet<&str> = confirmed.iter().map(String::as_str).collect();
        ready && confirmed == *enrolled && live_holds == 0
    })
    .await;
    if agrees {
        return Ok(());
    }
    let (ready, confirmed, live_holds) = look().await;
    Err(format!(
        "Redis disagrees with PostgreSQL after settling: {} confirmed in Redis ({}), {} enrolled, {live_holds} live holds",
        confirmed.len(),
        if ready {
            "trusted"
        } else {
            "state not rebuilt"
        },
        enrolled.len()
    ))
}

/// A one-line summary of the outcomes, for failure messages and logs.
pub fn summary(attempts: &[Attempt]) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for a in attempts {
        let key = match &a.outcome {
            Outcome::Ok(_) => "ok".to_owned(),
            Outcome::Failed(code, reason) => format!("{code:?} {reason}"),
            Outcome::Unknown(last) => format!("unknown ({last})"),
        };
        *counts.entry(key).or_default() += 1;
    }
    let mut parts: Vec<_> = counts
        .into_iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    parts.sort();
    parts.join(", ")
}
