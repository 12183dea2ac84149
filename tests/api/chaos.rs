//! Fault injection: a herd redeems a class's event key, its class
//! enrollment keys (several students per key) and a pool of subscription
//! keys through a load balancer (haproxy) in front of three replicas while a
//! fault strikes; every attempt's outcome is recorded per idempotency key
//! and the checker (tests/chaos.rs) verifies the invariants, key accounting
//! included, once recovery has settled. `make chaos` runs these with more students and rounds
//! (CHAOS_STUDENTS, CHAOS_ROUNDS); `make test` runs a short form.

use std::time::Duration;

use sqlx::Connection as _;
use trainingkeys_redemption::{Config, FaultAction, FaultPoint};
use trainingkeys_tests::chaos::{self, Attempt, Scenario};
use trainingkeys_tests::servers::{RedisCluster, RedisSentinel};
use trainingkeys_tests::{TestApp, org};

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

/// Class enrollment keys of the class (each wanted by several students).
const CLASS_KEYS: i32 = 10;
/// Subscription keys of the pool (single use, each wanted by several).
const SUBSCRIPTION_KEYS: i32 = 20;

/// A class of MAX with an event key and class enrollment keys, a pool of
/// subscription keys, and students: every fourth redeems a class key, every
/// fourth a subscription key, the rest the event key.
async fn scenario(app: &TestApp) -> (Scenario, Vec<(String, String)>) {
    let org = org();
    let class = app.class(&org, MAX).await;
    let event = app.event_key(&class.class_id, false).await;
    let class_keys = app.class_keys(&class.class_id, CLASS_KEYS).await;
    let (_, pool) = app.subscription_pool(&org, SUBSCRIPTION_KEYS, None).await;
    let students = app.users(&org, students()).await;
    let codes = students
        .into_iter()
        .enumerate()
        .map(|(i, user)| {
            let code = match i % 4 {
                0 => &class_keys[(i / 4) % class_keys.len()].code,
                1 => &pool[(i / 4) % pool.len()].code,
                _ => &event.code,
            };
            (user, code.clone())
        })
        .collect();
    let scenario = Scenario {
        organization_id: org,
        class_id: class.class_id,
        event_code: event.code,
        max: MAX,
        subscription_codes: pool.into_iter().map(|k| k.code).collect(),
    };
    (scenario, codes)
}

/// The scenario's herd under `fault`.
async fn run<F, Fut>(app: &TestApp, deadline: Duration, fault: F) -> (Scenario, Vec<Attempt>)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (scenario, students) = scenario(app).await;
    let attempts = chaos::herd(app, &students, deadline, fault).await;
    (scenario, attempts)
}

async fn assert_invariants(app: &TestApp, scenario: &Scenario, attempts: &[Attempt]) {
    let violations = chaos::check(app, scenario, attempts, Duration::from_secs(20)).await;
    assert!(
        violations.is_empty(),
        "violations: {violations:#?}\noutcomes: {}",
        chaos::summary(attempts)
    );
}

const DEADLINE: Duration = Duration::from_secs(5);

/// Three replicas of `tweak`ed settings behind haproxy.
async fn behind_lb(tweak: impl Fn(&mut Config)) -> TestApp {
    let mut app = TestApp::start_with(3, tweak).await;
    app.behind_load_balancer().await;
    app
}

#[tokio::test]
async fn chaos_redis_killed_and_restarted_empty() {
    let app = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (scenario, attempts) = run(&app, DEADLINE, || async {
            app.redis.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            app.redis.restart().await;
        })
        .await;
        assert_invariants(&app, &scenario, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_redis_paused_past_the_client_timeout() {
    let app = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (scenario, attempts) = run(&app, DEADLINE, || async {
            app.redis.signal("STOP");
            tokio::time::sleep(Duration::from_millis(1500)).await;
            app.redis.signal("CONT");
        })
        .await;
        assert_invariants(&app, &scenario, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_redis_replaced_by_a_replica_that_missed_the_last_writes() {
    let app = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (scenario, attempts) = run(&app, DEADLINE, || async {
            app.redis.snapshot().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            app.redis.fail_over_to_stale_replica().await;
        })
        .await;
        assert_invariants(&app, &scenario, &attempts).await;
    }
}

/// Two healthy replicas and one that stops every redemption at `point`, as
/// if it died there each time, behind the load balancer.
async fn replica_dies_at(point: FaultPoint) {
    let mut app = TestApp::start_with(2, quick).await;
    app.add_replica(|c| {
        quick(c);
        c.fault = Some(point);
    })
    .await;
    app.behind_load_balancer().await;
    for _ in 0..rounds() {
        let (scenario, attempts) = run(&app, Duration::from_secs(1), || async {}).await;
        assert_invariants(&app, &scenario, &attempts).await;
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
async fn chaos_replica_dies_between_admission_and_record() {
    replica_dies_at(FaultPoint::BeforeRecord).await;
}

/// One healthy replica and two whose first drivers freeze (after consuming,
/// after committing) past the take-over time and then carry on, stale: the
/// clients' retries and recovery take their redemptions over while they
/// live, and every write they make on waking is fenced off.
#[tokio::test]
async fn chaos_stalled_drivers_are_taken_over_while_alive() {
    let mut app = TestApp::start_with(1, quick).await;
    for point in [FaultPoint::AfterConsume, FaultPoint::AfterCommit] {
        app.add_replica(|c| {
            quick(c);
            c.fault = Some(point);
            c.fault_action = FaultAction::Stall;
            c.fault_stall_ms = 6000;
        })
        .await;
    }
    app.behind_load_balancer().await;
    for _ in 0..rounds() {
        let (scenario, attempts) = run(&app, Duration::from_secs(1), || async {}).await;
        // Let the stalled drivers wake and try their stale writes.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_invariants(&app, &scenario, &attempts).await;
    }
}

/// The class row is locked (a long transaction, a vacuum stall) past the
/// peer and redemption timeouts while the herd runs: Enroll statements pile
/// up, callers give up on them, and they commit later.
#[tokio::test]
async fn chaos_class_rows_locked_past_the_timeouts() {
    let app = behind_lb(|c| {
        quick(c);
        c.peer_timeout_ms = 1000;
    })
    .await;
    for _ in 0..rounds() {
        let (scenario, students) = scenario(&app).await;
        let class_id = scenario.class_id.clone();
        let attempts = chaos::herd(&app, &students, DEADLINE, || async {
            let mut db = app.db().await;
            let mut tx = db.begin().await.unwrap();
            sqlx::query("SELECT 1 FROM enrollment.classes WHERE class_id = $1::uuid FOR UPDATE")
                .bind(&class_id)
                .execute(&mut *tx)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(6)).await;
            tx.commit().await.unwrap();
        })
        .await;
        assert_invariants(&app, &scenario, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_clients_retry_after_deadline_exceeded() {
    let app = behind_lb(quick).await;
    for _ in 0..rounds() {
        // Deadlines so short that many calls give up mid-way and are retried
        // with the same idempotency key.
        let (scenario, attempts) = run(&app, Duration::from_millis(40), || async {}).await;
        assert_invariants(&app, &scenario, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_load_balancer_restarted() {
    let app = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (scenario, attempts) = run(&app, DEADLINE, || async {
            let lb = app.lb.as_ref().expect("behind the load balancer");
            lb.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            lb.restart().await;
        })
        .await;
        assert_invariants(&app, &scenario, &attempts).await;
    }
}

#[tokio::test]
async fn chaos_postgres_restarted_mid_herd() {
    // `make test` sets TEST_PG_RESTART when PostgreSQL is its own throwaway
    // server; nextest runs this test alone (.config/nextest.toml).
    let restart = std::env::var("TEST_PG_RESTART")
        .expect("TEST_PG_RESTART: run with `make test`, which owns the test PostgreSQL");
    let app = behind_lb(quick).await;
    for _ in 0..rounds() {
        let (scenario, attempts) = run(&app, DEADLINE, || async {
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
        assert_invariants(&app, &scenario, &attempts).await;
    }
}

#[tokio::test]
async fn the_checker_catches_an_oversell() {
    let app = behind_lb(quick).await;
    let (scenario, attempts) = run(&app, DEADLINE, || async {}).await;
    assert_invariants(&app, &scenario, &attempts).await;
    // Sneak students in behind the guard's back, one past the maximum.
    let seated = app.active_rows(&scenario.class_id).await;
    let outsiders = app
        .users(&org(), (i64::from(MAX) - seated + 1) as usize)
        .await;
    let mut db = app.db().await;
    for outsider in outsiders {
        sqlx::query("INSERT INTO enrollment.enrollments (enrollment_id, class_id, user_id) VALUES (gen_random_uuid(), $1::uuid, $2::uuid)")
            .bind(&scenario.class_id)
            .bind(&outsider)
            .execute(&mut db)
            .await
            .unwrap();
    }
    let violations = chaos::check(&app, &scenario, &attempts, Duration::from_secs(2)).await;
    assert!(
        violations.iter().any(|v| v.starts_with("oversold")),
        "{violations:?}"
    );
}

#[tokio::test]
async fn the_checker_catches_a_gate_whose_rebuild_is_disabled() {
    let app = behind_lb(|c| {
        quick(c);
        c.gate_rebuild_disabled = true;
    })
    .await;
    let (scenario, students) = scenario(&app).await;
    let mut attempts = chaos::herd(&app, &students, DEADLINE, || async {}).await;
    // Redis loses everything; without a rebuild the gate starts from empty.
    let _: String = app.redis.cmd(&["FLUSHALL"]).await.unwrap();
    let late = app.users(&scenario.organization_id, 1).await.remove(0);
    let late = [(late, scenario.event_code.clone())];
    attempts.extend(chaos::herd(&app, &late, DEADLINE, || async {}).await);
    let violations = chaos::check(&app, &scenario, &attempts, Duration::from_secs(3)).await;
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

#[tokio::test]
async fn the_checker_catches_a_refunded_key_use() {
    let app = behind_lb(quick).await;
    let (scenario, attempts) = run(&app, DEADLINE, || async {}).await;
    assert_invariants(&app, &scenario, &attempts).await;
    // Give one completed redemption's use back, as the old refund did.
    let mut db = app.db().await;
    let refunded: Option<uuid::Uuid> = sqlx::query_scalar(
        "WITH one AS (SELECT key_id, redemption_id FROM key_issuance.key_uses
                      WHERE released_at IS NULL LIMIT 1),
              gone AS (UPDATE key_issuance.key_uses u SET released_at = now() FROM one
                       WHERE u.key_id = one.key_id AND u.redemption_id = one.redemption_id
                       RETURNING u.key_id)
         UPDATE key_issuance.keys k SET uses = uses - 1 FROM gone
         WHERE k.key_id = gone.key_id RETURNING k.key_id",
    )
    .fetch_optional(&mut db)
    .await
    .unwrap();
    assert!(refunded.is_some(), "the herd used no key");
    let violations = chaos::check(&app, &scenario, &attempts, Duration::from_secs(2)).await;
    assert!(
        violations.iter().any(|v| v.starts_with("key ")),
        "{violations:?}"
    );
}

/// The gate on a Redis Cluster of three primaries with a replica each: mid
/// herd, the primary serving the class's slot is failed over (`CLUSTER
/// FAILOVER`), and then the new primary is killed, so the old one is
/// elected back. The invariants hold, and afterwards the gate's state in
/// the cluster agrees with PostgreSQL.
#[tokio::test]
async fn chaos_redis_cluster_primary_failed_over_and_killed_mid_herd() {
    let cluster = RedisCluster::start().await;
    let url = cluster.url();
    let app = behind_lb(|c| {
        quick(c);
        c.redis_url = url.clone();
    })
    .await;
    let (scenario, students) = scenario(&app).await;
    let (primary, replicas) = cluster
        .owner_of(&format!("{{class:{}}}", scenario.class_id))
        .await;
    let replica = replicas[0];
    let attempts = chaos::herd(&app, &students, DEADLINE, || async {
        cluster.fail_over_to(replica).await;
        let promoted = trainingkeys_tests::eventually(Duration::from_secs(10), || async {
            let (owner, _) = cluster
                .owner_of(&format!("{{class:{}}}", scenario.class_id))
                .await;
            owner == replica
        })
        .await;
        assert!(promoted, "CLUSTER FAILOVER did not promote {replica}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.kill(replica);
    })
    .await;
    assert_invariants(&app, &scenario, &attempts).await;
    let (owner, _) = cluster
        .owner_of(&format!("{{class:{}}}", scenario.class_id))
        .await;
    assert_eq!(owner, primary, "the old primary was not elected back");
}

/// The gate on a Sentinel-managed primary: mid herd the primary is killed,
/// the Sentinels promote its replica, and the replicas find it through
/// them. The invariants hold, and afterwards the gate's state on the new
/// primary agrees with PostgreSQL.
#[tokio::test]
async fn chaos_redis_sentinel_primary_killed_mid_herd() {
    let sentinel = RedisSentinel::start().await;
    let url = sentinel.url();
    let app = behind_lb(|c| {
        quick(c);
        c.redis_url = url.clone();
    })
    .await;
    for _ in 0..rounds() {
        let (scenario, students) = scenario(&app).await;
        let attempts = chaos::herd(&app, &students, DEADLINE, || async {
            if sentinel.kill_primary() {
                assert!(
                    sentinel.wait_promoted().await,
                    "the replica was not promoted"
                );
            }
        })
        .await;
        assert_invariants(&app, &scenario, &attempts).await;
    }
}
