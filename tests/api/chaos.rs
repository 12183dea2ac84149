//! Fault injection: a herd redeems one event key through a load balancer
//! (haproxy) in front of three replicas while a fault strikes; every attempt's outcome is recorded per idempotency key
//! and the checker (tests/chaos.rs) verifies the invariants once recovery has
//! settled. `make chaos` runs these with more students and rounds
//! (CHAOS_STUDENTS, CHAOS_ROUNDS); `make test` runs a short form.

use std::time::Duration;

use trainingkeys_redemption::{Config, FaultPoint};
use trainingkeys_tests::chaos::{self, Attempt};
use trainingkeys_tests::system::{System, class, event_key, org, users};

const MAX: i32 = 50;

fn students() -> usize {
    std::env::var("CHAOS_STUDENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn rounds() -> usize {
    std::env::var("CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Test settings for every replica: short holds and quick recovery, so a
/// run settles in seconds.
fn quick(c: &mut Config) {
    c.gate_hold_seconds = 5;
    // Redis is paused for 1.5 s: past this timeout.
    c.redis_timeout_ms = 500;
}

/// A class of MAX with an event key, its students, and the herd under `fault`.
async fn run<F, Fut>(sys: &System, deadline: Duration, fault: F) -> (String, Vec<Attempt>)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let org = org();
    let class = class(sys, &org, MAX, 1, 2, 0).await;
    let key = event_key(sys, &class.class_id, false).await;
    let students = users(sys, &org, students()).await;
    let attempts = chaos::herd(sys, &key.code, &students, deadline, fault).await;
    (class.class_id, attempts)
}

async fn assert_invariants(sys: &System, class_id: &str, attempts: &[Attempt]) {
    let violations = chaos::check(sys, class_id, MAX, attempts, Duration::from_secs(20)).await;
    assert!(
        violations.is_empty(),
        "violations: {violations:#?}\noutcomes: {}",
        chaos::summary(attempts)
    );
}

const DEADLINE: Duration = Duration::from_secs(5);

/// Three replicas of `tweak`ed settings behind haproxy.
async fn behind_lb(tweak: impl Fn(&mut Config)) -> System {
    let mut sys = System::start_with(3, tweak).await;
    sys.behind_load_balancer().await;
    sys
}

#[tokio::test]
async fn chaos_redis_killed_and_restarted_empty() {
    let sys = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (class_id, attempts) = run(&sys, DEADLINE, || async {
            sys.redis.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            sys.redis.restart().await;
        })
        .await;
        assert_invariants(&sys, &class_id, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_redis_paused_past_the_client_timeout() {
    let sys = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (class_id, attempts) = run(&sys, DEADLINE, || async {
            sys.redis.signal("STOP");
            tokio::time::sleep(Duration::from_millis(1500)).await;
            sys.redis.signal("CONT");
        })
        .await;
        assert_invariants(&sys, &class_id, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_redis_replaced_by_a_replica_that_missed_the_last_writes() {
    let sys = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (class_id, attempts) = run(&sys, DEADLINE, || async {
            sys.redis.snapshot().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            sys.redis.fail_over_to_stale_replica().await;
        })
        .await;
        assert_invariants(&sys, &class_id, &attempts).await;
    }
}

/// Two healthy replicas and one that stops every redemption at `point`, as
/// if it died there each time, behind the load balancer.
async fn replica_dies_at(point: FaultPoint) {
    let mut sys = System::start_with(2, quick).await;
    sys.add_replica(|c| {
        quick(c);
        c.fault = Some(point);
    })
    .await;
    sys.behind_load_balancer().await;
    for _ in 0..rounds() {
        let (class_id, attempts) = run(&sys, Duration::from_secs(1), || async {}).await;
        assert_invariants(&sys, &class_id, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_replica_dies_between_admission_and_commit() {
    // After admission, and for keys that are consumed, after ConsumeKey.
    replica_dies_at(FaultPoint::AfterConsume).await;
}

#[tokio::test]
async fn chaos_replica_dies_between_commit_and_reply() {
    replica_dies_at(FaultPoint::AfterCommit).await;
}

#[tokio::test]
async fn chaos_clients_retry_after_deadline_exceeded() {
    let sys = behind_lb(quick).await;
    for _ in 0..rounds() {
        // Deadlines so short that many calls give up mid-way and are retried
        // with the same idempotency key.
        let (class_id, attempts) = run(&sys, Duration::from_millis(40), || async {}).await;
        assert_invariants(&sys, &class_id, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_load_balancer_restarted() {
    let sys = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (class_id, attempts) = run(&sys, DEADLINE, || async {
            let lb = sys.lb.as_ref().expect("behind the load balancer");
            lb.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            lb.restart().await;
        })
        .await;
        assert_invariants(&sys, &class_id, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_postgres_restarted_mid_herd() {
    // `make test` sets TEST_PG_RESTART when PostgreSQL is its own throwaway
    // server; nextest runs this test alone (.config/nextest.toml).
    let restart = std::env::var("TEST_PG_RESTART")
        .expect("TEST_PG_RESTART: run with `make test`, which owns the test PostgreSQL");
    let sys = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (class_id, attempts) = run(&sys, DEADLINE, || async {
            let restart = restart.clone();
            let status = tokio::task::spawn_blocking(move || {
                std::process::Command::new("bash")
                    .arg("-c")
                    .arg(restart)
                    .status()
            })
            .await
            .unwrap();
            assert!(
                status.is_ok_and(|s| s.success()),
                "PostgreSQL restart failed"
            );
        })
        .await;
        assert_invariants(&sys, &class_id, &attempts).await;
    }
}

#[tokio::test]
async fn the_checker_catches_an_oversell() {
    let sys = behind_lb(quick).await;
    let (class_id, attempts) = run(&sys, DEADLINE, || async {}).await;
    assert_invariants(&sys, &class_id, &attempts).await;
    // Sneak one more student in behind the guard's back.
    let outsider = users(&sys, &org(), 1).await.remove(0);
    let mut db = sys.db().await;
    sqlx::query("INSERT INTO enrollment.enrollments (enrollment_id, class_id, user_id) VALUES (gen_random_uuid(), $1::uuid, $2::uuid)")
        .bind(&class_id)
        .bind(&outsider)
        .execute(&mut db)
        .await
        .unwrap();
    let violations = chaos::check(&sys, &class_id, MAX, &attempts, Duration::from_secs(2)).await;
    assert!(
        violations.iter().any(|v| v.starts_with("oversold")),
        "{violations:?}"
    );
}

#[tokio::test]
async fn the_checker_catches_a_gate_whose_rebuild_is_disabled() {
    let sys = behind_lb(|c| {
        quick(c);
        c.gate_rebuild_disabled = true;
    })
    .await;
    let org = org();
    let class = class(&sys, &org, MAX, 1, 2, 0).await;
    let key = event_key(&sys, &class.class_id, false).await;
    let students = users(&sys, &org, students()).await;
    let mut attempts = chaos::herd(&sys, &key.code, &students, DEADLINE, || async {}).await;
    // Redis loses everything; without a rebuild the gate starts from empty.
    let _: String = sys.redis.cmd(&["FLUSHALL"]).await.unwrap();
    let late = users(&sys, &org, 1).await;
    attempts.extend(chaos::herd(&sys, &key.code, &late, DEADLINE, || async {}).await);
    let violations = chaos::check(
        &sys,
        &class.class_id,
        MAX,
        &attempts,
        Duration::from_secs(3),
    )
    .await;
    // PostgreSQL still refuses the oversell; the gate's drift is caught.
    assert!(
        !violations.iter().any(|v| v.starts_with("oversold")),
        "{violations:?}"
    );
    assert!(
        violations.iter().any(|v| v.starts_with("Redis disagrees")),
        "{violations:?}"
    );
}
