//! RedemptionService end to end: the real three services over real gRPC,
//! real PostgreSQL and a real Redis of the test's own. Every flow and reason,
//! the herd against the class maximum (also with Redis flushed or stopped
//! half-way), retries, idempotent replays and crash recovery.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use prost::Message as _;
use tonic::Code;
use trainingkeys_proto::time::to_timestamp;
use trainingkeys_proto::v1::redeem_key_response::Grant;
use trainingkeys_proto::v1::{self as pb};
use trainingkeys_redemption::FaultPoint;
use trainingkeys_tests::chaos::gate_agrees;
use trainingkeys_tests::{
    TestApp, as_new, as_user, assert_invalid_field, assert_status, enrollment, eventually, idem,
    org, reason, spawn_with_fault, statements_run, uuid,
};

#[tokio::test]
async fn event_key_with_self_registration() {
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 3).await;
    let key = app.event_key(&class.class_id, false).await;

    let grace = |code: &str, name: &str| as_new(code, &org, "Grace@Example.com", name);
    let first = app
        .redeem(0, grace(&key.code.to_lowercase(), "Grace"))
        .await
        .unwrap();
    assert!(first.user_created && !first.already_held);
    assert_eq!(first.kind, pb::KeyKind::Event as i32);
    let user = first.user.clone().unwrap();
    assert_eq!(user.email, "grace@example.com");
    assert_eq!(enrollment(&first).source_key_id, key.key_id);

    // The same email again: the same user, the same seat, no second seat.
    let again = app.redeem(0, grace(&key.code, "Grace H.")).await.unwrap();
    assert!(!again.user_created && again.already_held);
    assert_eq!(again.user.as_ref().unwrap().user_id, user.user_id);
    assert_eq!(
        enrollment(&again).enrollment_id,
        enrollment(&first).enrollment_id
    );
    assert_eq!(app.get_class(&class.class_id).await.enrolled_count, 1);

    let v = app.validate(0, &key.code, &user.user_id).await;
    assert!(v.redeemable && v.already_held_by_user, "{v:?}");
    match v.grant {
        Some(pb::validate_key_response::Grant::Class(c)) => {
            assert_eq!(
                (c.class_id.as_str(), c.seats_left, c.max_students),
                (class.class_id.as_str(), 2, 3)
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn class_enrollment_keys_are_single_use() {
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let keys = app.class_keys(&class.class_id, 2).await;
    let ids = app.users(&org, 2).await;

    let ok = app
        .redeem(0, as_user(&keys[0].code, &ids[0], &idem()))
        .await
        .unwrap();
    assert!(!ok.already_held);
    assert_eq!(app.get_key(&keys[0].key_id).await.uses, 1);

    assert_status(
        app.redeem(0, as_user(&keys[0].code, &ids[1], &idem()))
            .await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
    let v = app.validate(0, &keys[0].code, &ids[1]).await;
    assert_eq!(
        (v.redeemable, v.reason.as_str()),
        (false, "KEY_ALREADY_REDEEMED")
    );

    // Its owner gets the seat back, marked, with no second seat.
    let back = app
        .redeem(0, as_user(&keys[0].code, &ids[0], &idem()))
        .await
        .unwrap();
    assert!(back.already_held);
    // A second key for a user who already has the seat is not used up.
    let spare = app
        .redeem(0, as_user(&keys[1].code, &ids[0], &idem()))
        .await
        .unwrap();
    assert!(spare.already_held);
    assert_eq!(app.get_key(&keys[1].key_id).await.uses, 0);
    assert_eq!(app.get_class(&class.class_id).await.enrolled_count, 1);
}

#[tokio::test]
async fn subscription_keys_grant_a_subscription_once() {
    let app = TestApp::start(1).await;
    let org = org();
    let (_, keys) = app.subscription_pool(&org, 2, None).await;
    let ids = app.users(&org, 2).await;

    let v = app.validate(0, &keys[0].code, &ids[0]).await;
    assert!(v.redeemable && !v.already_held_by_user);
    let r = app
        .redeem(0, as_user(&keys[0].code, &ids[0], &idem()))
        .await
        .unwrap();
    let Some(Grant::Subscription(sub)) = r.grant else {
        panic!("{r:?}")
    };
    assert!(sub.active);
    assert_eq!(sub.course_ids, vec!["A", "B"]);
    assert_status(
        app.redeem(0, as_user(&keys[0].code, &ids[1], &idem()))
            .await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );

    // The same user with the pool's second key: already subscribed, key kept.
    let again = app
        .redeem(0, as_user(&keys[1].code, &ids[0], &idem()))
        .await
        .unwrap();
    assert!(again.already_held);
    assert_eq!(app.get_key(&keys[1].key_id).await.uses, 0);
    assert!(
        app.validate(0, &keys[1].code, &ids[0])
            .await
            .already_held_by_user
    );
}

#[tokio::test]
async fn every_reason_code() {
    let app = TestApp::start(1).await;
    let org = org();
    let ids = app.users(&org, 3).await;

    // Input checks.
    for (request, field) in [
        (as_user("", &ids[0], &idem()), "code"),
        (as_user("ABCD", "nope", &idem()), "user_id"),
        (as_user("ABCD", &ids[0], ""), "idempotency_key"),
        (
            pb::RedeemKeyRequest {
                code: "ABCD".into(),
                redeemer: None,
                idempotency_key: idem(),
            },
            "user_id",
        ),
        (as_new("ABCD", &org, "nope", ""), "new_user.email"),
    ] {
        assert_invalid_field(app.redeem(0, request).await, field);
    }

    // Mistyped: a valid key with one symbol changed.
    let open = app.class(&org, 1).await;
    let key = app.event_key(&open.class_id, false).await;
    let mut typo: Vec<char> = key.code.chars().collect();
    typo[0] = if typo[0] == 'A' { 'B' } else { 'A' };
    let typo: String = typo.into_iter().collect();
    assert_status(
        app.redeem(0, as_user(&typo, &ids[0], &idem())).await,
        Code::InvalidArgument,
        "KEY_MISTYPED",
    );
    assert_eq!(app.validate(0, &typo, "").await.reason, "KEY_MISTYPED");
    assert_status(
        app.redeem(0, as_user("NO-SUCH-KEY", &ids[0], &idem()))
            .await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );

    // Unknown user.
    assert_status(
        app.redeem(0, as_user(&key.code, &uuid(), &idem())).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );

    // Full.
    app.redeem(0, as_user(&key.code, &ids[0], &idem()))
        .await
        .unwrap();
    assert_status(
        app.redeem(0, as_user(&key.code, &ids[1], &idem())).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    assert_eq!(
        app.validate(0, &key.code, &ids[1]).await.reason,
        "CLASS_FULL"
    );

    // Revoked.
    let other = app.class(&org, 5).await;
    let revoked = app.event_key(&other.class_id, false).await;
    app.revoke(&revoked.key_id).await.unwrap();
    assert_status(
        app.redeem(0, as_user(&revoked.code, &ids[0], &idem()))
            .await,
        Code::FailedPrecondition,
        "KEY_REVOKED",
    );

    // Not yet valid: a pool whose window opens tomorrow.
    let tomorrow = Utc::now() + chrono::Duration::days(1);
    let (_, later) = app.subscription_pool(&org, 1, Some(tomorrow)).await;
    assert_status(
        app.redeem(0, as_user(&later[0].code, &ids[0], &idem()))
            .await,
        Code::FailedPrecondition,
        "KEY_NOT_YET_VALID",
    );

    // Idempotency key reused for another request.
    let key_a = idem();
    let (_, pool_keys) = app.subscription_pool(&org, 1, None).await;
    app.redeem(0, as_user(&pool_keys[0].code, &ids[2], &key_a))
        .await
        .unwrap();
    assert_status(
        app.redeem(0, as_user(&later[0].code, &ids[2], &key_a))
            .await,
        Code::InvalidArgument,
        "IDEMPOTENCY_KEY_REUSED",
    );
}

#[tokio::test]
async fn event_key_windows_follow_the_class() {
    let app = TestApp::start(1).await;
    let org = org();
    let ids = app.users(&org, 2).await;

    // Ended yesterday, 3 days of lab access.
    let ended = app.class_at(&org, 5, -3..-1, 3).await;
    let strict = app.event_key(&ended.class_id, false).await;
    assert_status(
        app.redeem(0, as_user(&strict.code, &ids[0], &idem())).await,
        Code::FailedPrecondition,
        "KEY_EXPIRED",
    );
    let lab = app.event_key(&ended.class_id, true).await;
    app.redeem(0, as_user(&lab.code, &ids[0], &idem()))
        .await
        .unwrap();

    // Lab access over too: expired even with redeemable_after_class_end.
    let long_ago = app.class_at(&org, 5, -30..-20, 3).await;
    let late = app.event_key(&long_ago.class_id, true).await;
    assert_status(
        app.redeem(0, as_user(&late.code, &ids[1], &idem())).await,
        Code::FailedPrecondition,
        "KEY_EXPIRED",
    );

    // Rescheduling moves the window: the same key works once the class ends later.
    let now = Utc::now();
    app.update_class(pb::UpdateClassRequest {
        class_id: long_ago.class_id.clone(),
        start_time: Some(to_timestamp(now + chrono::Duration::days(1))),
        end_time: Some(to_timestamp(now + chrono::Duration::days(2))),
        ..Default::default()
    })
    .await
    .unwrap();
    app.redeem(0, as_user(&late.code, &ids[1], &idem()))
        .await
        .unwrap();
}

#[tokio::test]
async fn guessing_is_limited_and_indistinguishable() {
    guessing_is_limited_on(None).await;
}

/// The limits hold on a Redis Cluster too: a student's counters and the
/// service-wide budget live in different slots, and are read together.
#[tokio::test]
async fn guessing_is_limited_on_a_redis_cluster() {
    let cluster = trainingkeys_tests::servers::RedisCluster::start().await;
    guessing_is_limited_on(Some(cluster.url())).await;
}

async fn guessing_is_limited_on(redis_url: Option<String>) {
    // A Redis call that times out lets an attempt through uncounted: give
    // a loaded machine room.
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 3;
        c.redis_timeout_ms = 5000;
        if let Some(url) = &redis_url {
            c.redis_url = url.clone();
        }
    })
    .await;
    let org = org();
    let ids = app.users(&org, 1).await;
    let open = app.class(&org, 5).await;
    let key = app.event_key(&open.class_id, false).await;
    for i in 0..3 {
        assert_status(
            app.redeem(0, as_user(&format!("GUESS-{i}"), &ids[0], &idem()))
                .await,
            Code::NotFound,
            "KEY_NOT_FOUND",
        );
    }
    // Over the limit, even a good key gets the same answer as a bad one.
    for code in [key.code.as_str(), "GUESS-X"] {
        let status = assert_status(
            app.redeem(0, as_user(code, &ids[0], &idem())).await,
            Code::ResourceExhausted,
            "TOO_MANY_ATTEMPTS",
        );
        use tonic_types::StatusExt as _;
        let retry = status
            .get_details_retry_info()
            .expect("RetryInfo")
            .retry_delay
            .expect("a delay");
        assert!(retry > Duration::ZERO && retry <= Duration::from_secs(3600));
    }
    let status = app
        .redemption_client(0)
        .validate_key(pb::ValidateKeyRequest {
            code: key.code.clone(),
            user_id: String::new(),
        })
        .await;
    assert_status(status, Code::ResourceExhausted, "TOO_MANY_ATTEMPTS");
}

/// A raised maximum counts at the gate within FACTS_KEEP_MS (a second by
/// default): that long a full class may turn students away from the class's
/// facts as last read, with no PostgreSQL statement.
#[tokio::test]
async fn raising_the_maximum_takes_effect_at_the_gate_within_a_second() {
    let app = TestApp::start(1).await;
    let org = org();
    let ids = app.users(&org, 2).await;
    let open = app.class(&org, 1).await;
    let key = app.event_key(&open.class_id, false).await;
    app.redeem(0, as_user(&key.code, &ids[0], &idem()))
        .await
        .unwrap();
    assert_status(
        app.redeem(0, as_user(&key.code, &ids[1], &idem())).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    app.update_class(pb::UpdateClassRequest {
        class_id: open.class_id.clone(),
        max_students: Some(2),
        ..Default::default()
    })
    .await
    .unwrap();
    let raised = std::time::Instant::now();
    let attempt = as_user(&key.code, &ids[1], &idem());
    while let Err(s) = app.redeem(0, attempt.clone()).await {
        assert!(
            reason(&s) == "CLASS_FULL" && raised.elapsed() < Duration::from_millis(1500),
            "the raised maximum did not count within a second: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a herd did.
struct HerdOutcome {
    ok: usize,
    full: usize,
    other: Vec<tonic::Status>,
}

/// `users` redeem `code` at once, spread over all replicas, each retrying
/// outages as a client is told to; `midway` runs once half of the answers
/// are in.
async fn herd_one_code<F, Fut>(
    app: &TestApp,
    code: &str,
    users: &[String],
    midway: F,
) -> HerdOutcome
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let calls = users
        .iter()
        .enumerate()
        .map(|(i, user)| app.redeem_retrying(i, as_user(code, user, &idem())));
    let mut outcome = HerdOutcome {
        ok: 0,
        full: 0,
        other: Vec::new(),
    };
    for result in spawn_with_fault(calls, users.len() / 2, midway).await {
        match result {
            Ok(_) => outcome.ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted && reason(&s) == "CLASS_FULL" => {
                outcome.full += 1
            }
            Err(s) => outcome.other.push(s),
        }
    }
    outcome
}

async fn assert_sold_exactly(
    app: &TestApp,
    class_id: &str,
    max: i32,
    outcome: &HerdOutcome,
    students: usize,
) {
    assert!(
        outcome.other.is_empty(),
        "unexpected answers: {:?}",
        &outcome.other[..outcome.other.len().min(3)]
    );
    assert_eq!(
        (outcome.ok, outcome.full),
        (max as usize, students - max as usize)
    );
    let class = app.get_class(class_id).await;
    assert_eq!(class.enrolled_count, max);
    assert_eq!(
        app.active_rows(class_id).await,
        i64::from(max),
        "PostgreSQL rows equal the seat count"
    );
    // After settling, no live hold is left and Redis agrees with PostgreSQL.
    let roster = app.seated(class_id).await;
    let enrolled: HashSet<&str> = roster.iter().map(String::as_str).collect();
    if let Err(e) = gate_agrees(app, class_id, &enrolled, Duration::from_secs(20)).await {
        panic!("{e}");
    }
}

#[tokio::test]
async fn herd_of_2000_on_a_class_of_100_through_3_replicas() {
    let app = TestApp::start(3).await;
    let org = org();
    let class = app.class(&org, 100).await;
    let key = app.event_key(&class.class_id, false).await;
    let students = app.users(&org, 2000).await;
    let outcome = herd_one_code(&app, &key.code, &students, || async {}).await;
    assert_sold_exactly(&app, &class.class_id, 100, &outcome, 2000).await;
}

#[tokio::test]
async fn herd_with_redis_flushed_half_way() {
    let app = TestApp::start(3).await;
    let org = org();
    let class = app.class(&org, 100).await;
    let key = app.event_key(&class.class_id, false).await;
    let students = app.users(&org, 1000).await;
    let outcome = herd_one_code(&app, &key.code, &students, || async {
        let _: String = app.redis.cmd(&["FLUSHALL"]).await.unwrap();
    })
    .await;
    assert_sold_exactly(&app, &class.class_id, 100, &outcome, 1000).await;
}

/// Redis loses a class's state while a seat is between commit and settle, and
/// no admission comes afterwards to rebuild it: the late settle has the
/// repair sweep rebuild the class, so the gate is whole before the next herd.
#[tokio::test]
async fn the_gate_heals_after_a_flush_with_a_seat_in_flight() {
    // Recovery waits long enough for the flush to come first.
    let mut app = TestApp::start_with(1, |c| c.recovery_after_seconds = 8).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let students = app.users(&org, 3).await;
    for user in &students[..2] {
        app.redeem(0, as_user(&key.code, user, &idem()))
            .await
            .unwrap();
    }
    // The third seat commits on a replica that dies before it settles.
    let faulty = app
        .add_replica(|c| {
            c.fault = Some(FaultPoint::AfterCommit);
            c.recovery_interval_seconds = 3600;
        })
        .await;
    // It answers UNAVAILABLE after its own redemption timeout.
    let request = as_user(&key.code, &students[2], &idem());
    let lost = app.redeem_within(faulty, request, Duration::from_secs(10));
    assert!(lost.await.is_err());
    let committed = eventually(Duration::from_secs(10), || async {
        app.active_rows(&class.class_id).await == 3
    })
    .await;
    assert!(committed, "the third seat never committed");
    let _: String = app.redis.cmd(&["FLUSHALL"]).await.unwrap();
    app.stop_replica(faulty).await;

    // The healthy replica's recovery finishes the redemption (its settle
    // finds the state gone) and rebuilds the class from the roster.
    let enrolled: HashSet<&str> = students.iter().map(String::as_str).collect();
    if let Err(e) = gate_agrees(&app, &class.class_id, &enrolled, Duration::from_secs(20)).await {
        panic!("the gate was not rebuilt: {e}");
    }
}

#[tokio::test]
async fn herd_with_redis_stopped_half_way() {
    let app = TestApp::start(3).await;
    let org = org();
    let class = app.class(&org, 100).await;
    let key = app.event_key(&class.class_id, false).await;
    let students = app.users(&org, 1000).await;
    let redis_port = app.redis.port;
    let outcome = herd_one_code(&app, &key.code, &students, || async move {
        // Stop the server: every gate call now fails (fast, once the circuit opens).
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &redis_port.to_string(), "shutdown", "nosave"])
            .status();
    })
    .await;
    assert!(
        outcome.other.is_empty(),
        "{:?}",
        &outcome.other[..outcome.other.len().min(3)]
    );
    assert_eq!((outcome.ok, outcome.full), (100, 900));
    assert_eq!(app.get_class(&class.class_id).await.enrolled_count, 100);
    assert_eq!(app.active_rows(&class.class_id).await, 100);
    // With Redis back (empty), the gate rebuilds from enrollment and agrees.
    app.redis.restart().await;
    // (Once the replicas' circuit breakers close again, within about a second.)
    let late = &students[0];
    let confirmed_key = format!("{{class:{}}}:confirmed", class.class_id);
    let agrees = eventually(Duration::from_secs(30), || async {
        let answer = app.redeem(0, as_user(&key.code, late, &idem())).await;
        let confirmed: i64 = app
            .redis
            .cmd(&["SCARD", &confirmed_key])
            .await
            .unwrap_or(-1);
        let settled = answer
            .as_ref()
            .map_or_else(|s| reason(s) == "CLASS_FULL", |r| r.already_held);
        settled && confirmed == 100
    })
    .await;
    assert!(agrees, "the gate was not rebuilt from enrollment");
    assert_eq!(app.get_class(&class.class_id).await.enrolled_count, 100);
}

#[tokio::test]
async fn one_user_redeeming_20_times_concurrently_takes_one_seat() {
    let app = TestApp::start(2).await;
    let org = org();
    let class = app.class(&org, 10).await;
    let key = app.event_key(&class.class_id, false).await;
    let user = app.users(&org, 1).await.remove(0);

    // Twenty different attempts (idempotency keys) at once.
    let results = join_all((0..20).map(|i| {
        let call = app.redeem_retrying(i, as_user(&key.code, &user, &idem()));
        async move { call.await.unwrap() }
    }))
    .await;
    let seats: HashSet<_> = results
        .iter()
        .map(|r| enrollment(r).enrollment_id.clone())
        .collect();
    assert_eq!(seats.len(), 1);
    assert_eq!(app.get_class(&class.class_id).await.enrolled_count, 1);
    assert_eq!(app.active_rows(&class.class_id).await, 1);

    // One attempt retried 50 times at once: one answer, byte for byte.
    let same = as_user(&key.code, &user, &idem());
    let replies = join_all((0..50).map(|i| {
        let call = app.redeem_retrying(i, same.clone());
        async move { call.await.unwrap().encode_to_vec() }
    }))
    .await;
    let distinct: HashSet<_> = replies.iter().collect();
    assert_eq!(distinct.len(), 1, "every caller got the same answer");
}

#[tokio::test]
async fn idempotent_replays_are_byte_identical() {
    let app = TestApp::start(2).await;
    let org = org();
    let class = app.class(&org, 1).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 2).await;
    let request = as_user(&key.code, &ids[0], &idem());
    let first = app.redeem(0, request.clone()).await.unwrap();
    let replay = app.redeem(1, request.clone()).await.unwrap();
    assert_eq!(first.encode_to_vec(), replay.encode_to_vec());

    // A recorded final failure replays too.
    let loser = as_user(&key.code, &ids[1], &idem());
    assert_status(
        app.redeem(0, loser.clone()).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    assert_status(
        app.redeem(1, loser).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
}

/// A seat cancelled in enrollment is free at the gate within a second (not
/// when the class's gate state expires): the gate counts more seats than
/// PostgreSQL and nothing is in flight, so it rebuilds instead of turning
/// the next student away. (Within a second of a rebuild it trusts the roster
/// it just read.)
#[tokio::test]
async fn a_cancelled_seat_is_free_at_the_gate_within_a_second() {
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 2).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 4).await;
    let first = app
        .redeem(0, as_user(&key.code, &ids[0], &idem()))
        .await
        .unwrap();
    app.redeem(0, as_user(&key.code, &ids[1], &idem()))
        .await
        .unwrap();
    assert_status(
        app.redeem(0, as_user(&key.code, &ids[2], &idem())).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    app.cancel(&enrollment(&first).enrollment_id).await.unwrap();
    let started = std::time::Instant::now();
    let attempt = as_user(&key.code, &ids[2], &idem());
    let seated = loop {
        match app.redeem(0, attempt.clone()).await {
            Ok(seated) => break seated,
            // Not recorded: the same attempt is decided afresh.
            Err(s) if reason(&s) == "CLASS_FULL" && started.elapsed() < Duration::from_secs(3) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("the freed seat was not offered: {s:?}"),
        }
    };
    assert_eq!(enrollment(&seated).user_id, ids[2]);
    assert_status(
        app.redeem(0, as_user(&key.code, &ids[3], &idem())).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    let enrolled: HashSet<&str> = [ids[1].as_str(), ids[2].as_str()].into();
    if let Err(e) = gate_agrees(&app, &class.class_id, &enrolled, Duration::from_secs(10)).await {
        panic!("{e}");
    }
}

async fn redemption_state(app: &TestApp, idempotency_key: &str) -> Option<String> {
    let mut db = app.db().await;
    sqlx::query_scalar("SELECT state FROM redemption.redemptions WHERE idempotency_key = $1")
        .bind(idempotency_key)
        .fetch_optional(&mut db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_replica_killed_after_consume_is_finished_by_recovery() {
    let mut app = TestApp::start_with(1, |c| {
        c.fault = Some(FaultPoint::AfterConsume);
        c.recovery_interval_seconds = 3600;
    })
    .await;
    let org = org();
    let class = app.class(&org, 5).await;
    let keys = app.class_keys(&class.class_id, 1).await;
    let user = app.users(&org, 1).await.remove(0);
    let attempt = idem();
    // It gives up after its own redemption timeout (UNAVAILABLE).
    let request = as_user(&keys[0].code, &user, &attempt);
    let lost = app.redeem_within(0, request, Duration::from_secs(10)).await;
    assert!(lost.is_err(), "the faulty replica never answers");
    let consumed = eventually(Duration::from_secs(10), || async {
        app.get_key(&keys[0].key_id).await.uses == 1
    })
    .await;
    assert!(consumed, "the key was consumed");
    assert_eq!(
        redemption_state(&app, &attempt).await.as_deref(),
        Some("admitted")
    );
    app.stop_replica(0).await;

    // A healthy replica's recovery loop finishes the redemption.
    app.add_replica(|_| {}).await;
    let done = eventually(Duration::from_secs(20), || async {
        redemption_state(&app, &attempt).await.as_deref() != Some("admitted")
    })
    .await;
    assert!(done, "recovery did not finish the redemption");
    let key = app.get_key(&keys[0].key_id).await;
    let seats = app.active_rows(&class.class_id).await;
    assert!(
        key.uses == 1 && seats == 1 || key.uses == 0 && seats == 0,
        "consumed without enrollment: uses {} seats {seats}",
        key.uses
    );
    // The client's retry gets the recovered answer.
    let retry = app
        .redeem(0, as_user(&keys[0].code, &user, &attempt))
        .await
        .unwrap();
    assert_eq!(enrollment(&retry).user_id, user);
}

#[tokio::test]
async fn a_crash_between_commit_and_reply_is_replayed_to_the_retry() {
    let mut app = TestApp::start_with(1, |c| c.fault = Some(FaultPoint::AfterCommit)).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let user = app.users(&org, 1).await.remove(0);
    let attempt = idem();
    let request = as_user(&key.code, &user, &attempt);
    let lost = app.redeem_within(0, request, Duration::from_secs(10));
    assert!(lost.await.is_err());
    let committed = eventually(Duration::from_secs(10), || async {
        app.active_rows(&class.class_id).await == 1
    })
    .await;
    assert!(committed, "committed before the crash");
    app.stop_replica(0).await;
    app.add_replica(|_| {}).await;

    // The client retries with the same idempotency key until it is answered.
    let mut answer = None;
    for _ in 0..40 {
        match app.redeem(0, as_user(&key.code, &user, &attempt)).await {
            Ok(r) => {
                answer = Some(r);
                break;
            }
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Aborted | Code::Unavailable),
                    "{s:?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    let answer = answer.expect("the retry was never answered");
    assert_eq!(enrollment(&answer).user_id, user);
    let again = app
        .redeem(0, as_user(&key.code, &user, &attempt))
        .await
        .unwrap();
    assert_eq!(answer.encode_to_vec(), again.encode_to_vec());
    assert_eq!(app.get_class(&class.class_id).await.enrolled_count, 1);
}

#[tokio::test]
async fn redemption_works_without_redis() {
    let app = TestApp::start_with(1, |c| c.redis_url = "redis://127.0.0.1:1/".into()).await;
    let org = org();
    let class = app.class(&org, 2).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 3).await;
    let results = join_all(
        ids.iter()
            .map(|u| app.redeem(0, as_user(&key.code, u, &idem()))),
    )
    .await;
    let by_reason: HashMap<String, usize> = results.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.as_ref().map(|_| "OK".to_owned()).unwrap_or_else(reason))
            .or_default() += 1;
        m
    });
    assert_eq!(
        by_reason,
        HashMap::from([("OK".to_owned(), 2), ("CLASS_FULL".to_owned(), 1)])
    );
    // Which two of the three won is up to the race: ask about each.
    for (user, result) in ids.iter().zip(&results) {
        assert_eq!(
            app.validate(0, &key.code, user).await.already_held_by_user,
            result.is_ok(),
            "ValidateKey tells a seat holder from the one turned away"
        );
    }
}

/// A full class turns a herd away by Redis alone: once the key's resolution
/// and the class's facts are at hand, a rejection runs no PostgreSQL
/// statement at all (no idempotency look-up, no GetClass), counted by
/// `pg_stat_statements`. A student who holds or held a seat there still
/// gets their recorded answer, also after the gate's state was lost and
/// rebuilt.
#[tokio::test]
async fn a_full_class_turns_students_away_without_a_postgresql_statement() {
    let app = TestApp::start_with(1, |c| {
        // Facts kept for the whole test (the longest allowed), and no
        // recovery sweep reading the database meanwhile: every statement
        // counted is a rejection's.
        c.facts_keep_ms = 10_000;
        c.recovery_interval_seconds = 3600;
    })
    .await;
    let org = org();
    let class = app.class(&org, 2).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 43).await;
    let first = as_user(&key.code, &ids[0], &idem());
    let seated = app.redeem(0, first.clone()).await.unwrap();
    app.redeem(0, as_user(&key.code, &ids[1], &idem()))
        .await
        .unwrap();
    // The first rejection reads what the next ones reuse.
    assert_status(
        app.redeem(0, as_user(&key.code, &ids[2], &idem())).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );

    let before = app.statements().await;
    let herd = (3..43).map(|i| app.redeem(0, as_user(&key.code, &ids[i], &idem())));
    for answer in join_all(herd).await {
        assert_status(answer, Code::ResourceExhausted, "CLASS_FULL");
    }
    let ran = statements_run(&before, &app.statements().await);
    assert!(
        ran.is_empty(),
        "40 rejections ran PostgreSQL statements: {ran:#?}"
    );
    // A seated student's retry is not turned away: it gets its record.
    let replay = app.redeem(0, first).await.unwrap();
    assert_eq!(replay.encode_to_vec(), seated.encode_to_vec());
}

/// A student who held a seat in a full class (cancelled since) gets the
/// answer recorded for their idempotency key, not a CLASS_FULL decided by
/// the gate alone; so do they after the gate's state was lost and rebuilt
/// from PostgreSQL.
#[tokio::test]
async fn a_retry_of_a_student_who_held_a_seat_in_a_full_class_gets_the_recorded_answer() {
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 2).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 4).await;
    let first = as_user(&key.code, &ids[0], &idem());
    let seated = app.redeem(0, first.clone()).await.unwrap();
    app.redeem(0, as_user(&key.code, &ids[1], &idem()))
        .await
        .unwrap();
    app.cancel(&enrollment(&seated).enrollment_id)
        .await
        .unwrap();
    // The freed seat is offered again within a moment, and taken.
    let refill = as_user(&key.code, &ids[2], &idem());
    let started = std::time::Instant::now();
    while let Err(s) = app.redeem(0, refill.clone()).await {
        assert!(
            reason(&s) == "CLASS_FULL" && started.elapsed() < Duration::from_secs(5),
            "the freed seat was not offered: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let turned_away = || app.redeem(0, as_user(&key.code, &ids[3], &idem()));
    assert_status(turned_away().await, Code::ResourceExhausted, "CLASS_FULL");
    let replay = app.redeem(0, first.clone()).await.unwrap();
    assert_eq!(replay.encode_to_vec(), seated.encode_to_vec());

    app.redis.cmd::<()>(&["FLUSHALL"]).await.unwrap();
    assert_status(turned_away().await, Code::ResourceExhausted, "CLASS_FULL");
    assert_status(turned_away().await, Code::ResourceExhausted, "CLASS_FULL");
    let replay = app.redeem(0, first).await.unwrap();
    assert_eq!(replay.encode_to_vec(), seated.encode_to_vec());
}

/// A burst bigger than a replica's bound of calls in flight is shed at
/// once: every call gets a definitive answer (OK, CLASS_FULL) or UNAVAILABLE
/// `OVERLOADED` with a RetryInfo delay, never a dropped connection; after
/// the clients retry with the same idempotency key, the class holds exactly
/// its maximum and every seated student was told OK. Health checks are
/// never shed.
#[tokio::test]
async fn a_burst_beyond_a_replicas_bound_is_shed_with_retry_info_and_settles_exactly() {
    let app = TestApp::start_with(1, |c| c.common.max_in_flight = 3).await;
    let org = org();
    let class = app.class(&org, 10).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 80).await;
    let mut waiting: Vec<pb::RedeemKeyRequest> = ids
        .iter()
        .map(|id| as_user(&key.code, id, &idem()))
        .collect();
    let (mut told_ok, mut full, mut shed) = (HashSet::new(), 0, 0);
    for _round in 0..100 {
        if waiting.is_empty() {
            break;
        }
        let answers = join_all(waiting.iter().map(|r| app.redeem(0, r.clone()))).await;
        let mut again = Vec::new();
        for (request, answer) in waiting.into_iter().zip(answers) {
            match answer {
                Ok(seated) => {
                    told_ok.insert(enrollment(&seated).user_id.clone());
                }
                Err(s) if reason(&s) == "CLASS_FULL" => full += 1,
                Err(s) if s.code() == Code::Unavailable && reason(&s) == "OVERLOADED" => {
                    let delay = tonic_types::StatusExt::get_details_retry_info(&s)
                        .and_then(|r| r.retry_delay)
                        .expect("a shed call says when to retry");
                    assert!(delay >= Duration::from_millis(100), "{delay:?}");
                    shed += 1;
                    again.push(request);
                }
                Err(s) => panic!("not a definitive or retryable answer: {s:?}"),
            }
        }
        waiting = again;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        waiting.is_empty(),
        "{} calls were still shed",
        waiting.len()
    );
    assert!(shed > 0, "a bound of 3 calls in flight shed nothing of 80");
    let seated: HashSet<String> = app.seated(&class.class_id).await.into_iter().collect();
    assert_eq!((seated.len(), full), (10, 70));
    assert_eq!(told_ok, seated, "every seated student was told OK");
    // Probes go through while calls are shed.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(app.replicas[0].channel().await);
    let probes = (0..20).map(|_| {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
        }
    });
    let busy = join_all((0..40).map(|i| app.redeem(0, as_user(&key.code, &ids[i], &idem()))));
    let (probed, _) = tokio::join!(join_all(probes), busy);
    assert!(probed.iter().all(Result::is_ok), "{probed:?}");
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
}

/// The fast CLASS_FULL never answers a retry whose redemption is recorded
/// but was lost from the gate's memory (a flush between its admission and
/// its record, a bypass): it counts confirmed seats only, never holds in
/// flight, so while the recorded attempt may still take a seat the retry
/// goes the full way and gets that attempt's answer.
#[tokio::test]
async fn a_retry_whose_admission_the_gate_lost_is_not_turned_away_by_the_gate_alone() {
    let app = TestApp::start_with(1, |c| {
        c.facts_keep_ms = 10_000;
        c.fault = Some(FaultPoint::AfterConsume);
        c.fault_action = trainingkeys_redemption::FaultAction::Stall;
        c.fault_stall_ms = 2000;
    })
    .await;
    let org = org();
    let class = app.class(&org, 2).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 3).await;
    app.redeem_until_answered(as_user(&key.code, &ids[0], &idem()))
        .await
        .unwrap();
    // A is recorded and stalls before it enrolls.
    let idempotency_key = idem();
    let attempt = as_user(&key.code, &ids[1], &idempotency_key);
    let first = tokio::spawn(app.redeem(0, attempt.clone()));
    let recorded = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT redemption_id::text FROM redemption.redemptions WHERE idempotency_key = $1",
        )
        .bind(&idempotency_key)
        .fetch_optional(&mut app.db().await)
        .await
        .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            recorded().await.is_some()
        })
        .await
    );
    let rid = recorded().await.unwrap();
    // The gate loses A (its id and its hold), and a herd's hold fills the class.
    let tag = format!("{{class:{}}}", class.class_id);
    let far = (chrono::Utc::now().timestamp_millis() + 60_000).to_string();
    app.redis
        .cmd::<()>(&["SREM", &format!("{tag}:seen"), &rid])
        .await
        .unwrap();
    app.redis
        .cmd::<()>(&["ZREM", &format!("{tag}:holds"), &ids[1]])
        .await
        .unwrap();
    app.redis
        .cmd::<()>(&["ZADD", &format!("{tag}:holds"), &far, &ids[2]])
        .await
        .unwrap();
    let retry = app.redeem_until_answered(attempt).await;
    let first = first.await.unwrap();
    let seated = app.seated(&class.class_id).await;
    assert!(seated.contains(&ids[1]), "A was seated: {seated:?}");
    assert_eq!(
        retry
            .map(|r| enrollment(&r).user_id.clone())
            .map_err(|s| reason(&s)),
        Ok(ids[1].clone()),
        "the retry got the recorded answer (A was seated); A's own call: {first:?}"
    );
}

/// A client that opens calls and never finishes sending them holds places
/// among a replica's MAX_IN_FLIGHT only until CALL_TIMEOUT_SECONDS: other
/// callers are shed meanwhile (a fast, retryable refusal), then served.
#[tokio::test]
async fn calls_that_never_finish_sending_give_their_place_back() {
    let app = TestApp::start_with(1, |c| {
        c.common.max_in_flight = 2;
        c.common.call_timeout_seconds = 2;
    })
    .await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 1).await;
    for _ in 0..2 {
        let channel = app.replicas[0].channel().await;
        tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let path = http::uri::PathAndQuery::from_static(
                "/trainingkeys.v1.RedemptionService/RedeemKey",
            );
            let codec =
                tonic_prost::ProstCodec::<pb::RedeemKeyRequest, pb::RedeemKeyResponse>::default();
            let never = futures::stream::pending::<pb::RedeemKeyRequest>();
            let _ = grpc
                .client_streaming(tonic::Request::new(never), path, codec)
                .await;
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attempt = as_user(&key.code, &ids[0], &idem());
    let shed = app.redeem(0, attempt.clone()).await;
    assert_status(shed, Code::Unavailable, "OVERLOADED");
    let started = std::time::Instant::now();
    let seated = loop {
        match app.redeem(0, attempt.clone()).await {
            Ok(seated) => break seated,
            Err(s) if reason(&s) == "OVERLOADED" && started.elapsed() < Duration::from_secs(6) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("the stalled calls kept their places: {s:?}"),
        }
    };
    assert_eq!(enrollment(&seated).user_id, ids[0]);
}

/// Load is shed at the edge, never half-way through a redemption: calls
/// from this project's own services (a service certificate) are never
/// refused as OVERLOADED, so a redemption admitted by a replica is not cut
/// short by its peers' limits. Any other caller of that peer is.
#[tokio::test]
async fn calls_between_the_services_are_never_shed() {
    let app = TestApp::start(0).await;
    let mut tight = trainingkeys_enrollment::Config::for_tests(&app.database_url).unwrap();
    trainingkeys_tests::for_tests(&mut tight.common, "enrollment");
    tight.common.max_in_flight = 1;
    let tight = trainingkeys_tests::spawn::<trainingkeys_enrollment::Application>(tight).await;
    let mut config = app.replica_config();
    config.enrollment_url = tight.url();
    let replica = trainingkeys_tests::spawn::<trainingkeys_redemption::Application>(config).await;
    let client =
        pb::redemption_service_client::RedemptionServiceClient::new(replica.channel().await);

    let org = org();
    let class = app.class(&org, 10).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 50).await;
    let answers = join_all(ids.iter().map(|id| {
        let mut client = client.clone();
        let request = as_user(&key.code, id, &idem());
        async move { client.redeem_key(request).await }
    }))
    .await;
    let mut ok = 0;
    for answer in answers {
        match answer {
            Ok(_) => ok += 1,
            Err(s) if reason(&s) == "CLASS_FULL" => {}
            Err(s) => panic!("a redemption was cut short by its peer: {s:?}"),
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(app.seated(&class.class_id).await.len(), 10);

    // An outside caller of that enrollment is shed.
    let outside =
        pb::enrollment_service_client::EnrollmentServiceClient::new(tight.channel().await);
    let reads = join_all((0..30).map(|_| {
        let mut outside = outside.clone();
        let request = pb::GetClassRequest {
            class_id: class.class_id.clone(),
        };
        async move { outside.get_class(request).await }
    }))
    .await;
    assert!(
        reads
            .iter()
            .any(|r| matches!(r, Err(s) if reason(s) == "OVERLOADED")),
        "30 concurrent outside calls to a bound of 1 were all served"
    );
}
