//! Exactly once, when steps run twice, late, or beside themselves: a slow
//! database (statements that commit after their caller gave up), a retry
//! racing a live or stalled driver, released uses, refused redemptions that
//! must write nothing, idempotency keys that cannot be squatted, and a
//! panicking task.

use std::time::Duration;

use sqlx::Connection as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use trainingkeys_proto::time::to_timestamp;
use trainingkeys_proto::v1 as pb;
use trainingkeys_redemption::{FaultAction, FaultPoint};
use trainingkeys_shared::cli::Service;
use trainingkeys_tests::{
    TestApp, as_new, as_user, assert_invalid_field, assert_status, class_request, enrollment, idem,
    org, pool_scope, uuid,
};

/// Runs `sql` (a `SELECT … FOR UPDATE` of the row with id `$1`) in a
/// transaction held open for `hold`, as a long transaction or a vacuum stall
/// would; returns once the rows are locked.
async fn lock_rows(app: &TestApp, sql: &'static str, id: &str, hold: Duration) -> JoinHandle<()> {
    let mut db = app.db().await;
    let id = id.to_owned();
    let (locked, is_locked) = oneshot::channel();
    let holder = tokio::spawn(async move {
        let mut tx = db.begin().await.unwrap();
        sqlx::query(sql).bind(&id).execute(&mut *tx).await.unwrap();
        locked.send(()).unwrap();
        tokio::time::sleep(hold).await;
        tx.commit().await.unwrap();
    });
    is_locked.await.unwrap();
    holder
}

/// The scenario: the class row is locked past the peer and
/// redemption timeouts, student A redeems a single-use key and retries with
/// the same idempotency key until answered. The key must end with one use,
/// and student B must be refused it.
#[tokio::test]
async fn a_slow_database_cannot_refund_a_class_enrollment_key() {
    let app = TestApp::start_with(1, |c| c.peer_timeout_ms = 1000).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.class_keys(&class.class_id, 1).await.remove(0);
    let ids = app.users(&org, 2).await;
    let sql = "SELECT 1 FROM enrollment.classes WHERE class_id = $1::uuid FOR UPDATE";
    let lock = lock_rows(&app, sql, &class.class_id, Duration::from_secs(8)).await;

    let a = app
        .redeem_until_answered(as_user(&key.code, &ids[0], &idem()))
        .await;
    lock.await.unwrap();
    assert_eq!(enrollment(&a.unwrap()).user_id, ids[0]);
    assert_eq!(
        app.get_key(&key.key_id).await.uses,
        1,
        "the use was refunded"
    );
    assert_status(
        app.redeem(0, as_user(&key.code, &ids[1], &idem())).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
    assert_eq!(app.active_rows(&class.class_id).await, 1);
}

/// The same with a single-use subscription key, the user's row locked.
#[tokio::test]
async fn a_slow_database_cannot_refund_a_subscription_key() {
    let app = TestApp::start_with(1, |c| c.peer_timeout_ms = 1000).await;
    let org = org();
    let (_, keys) = app.subscription_pool(&org, 1, None).await;
    let ids = app.users(&org, 2).await;
    let sql = "SELECT 1 FROM enrollment.users WHERE user_id = $1::uuid FOR UPDATE";
    let lock = lock_rows(&app, sql, &ids[0], Duration::from_secs(8)).await;

    let a = app
        .redeem_until_answered(as_user(&keys[0].code, &ids[0], &idem()))
        .await;
    lock.await.unwrap();
    assert!(a.is_ok(), "{a:?}");
    assert_eq!(
        app.get_key(&keys[0].key_id).await.uses,
        1,
        "the use was refunded"
    );
    assert_status(
        app.redeem(0, as_user(&keys[0].code, &ids[1], &idem()))
            .await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
    let mut db = app.db().await;
    let granted: i64 = sqlx::query_scalar("SELECT count(*) FROM enrollment.subscriptions")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(granted, 1);
}

/// A replica whose first driver of each redemption freezes for 7 s after
/// consuming the key, then carries on; no recovery loop to take over.
fn stalls_after_consume(c: &mut trainingkeys_redemption::Config) {
    c.fault = Some(FaultPoint::AfterConsume);
    c.fault_action = FaultAction::Stall;
    c.fault_stall_ms = 7000;
    c.recovery_interval_seconds = 3600;
}

/// A driver that freezes after consuming (its lease unrenewed) is taken over
/// by the client's retry; when it wakes, every write it tries is fenced off.
#[tokio::test]
async fn a_stalled_driver_is_taken_over_and_fenced() {
    let app = TestApp::start_with(1, stalls_after_consume).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.class_keys(&class.class_id, 1).await.remove(0);
    let ids = app.users(&org, 2).await;
    let attempt = idem();
    let answer = app
        .redeem_until_answered(as_user(&key.code, &ids[0], &attempt))
        .await;
    assert_eq!(enrollment(&answer.unwrap()).user_id, ids[0]);
    // The stalled first driver wakes (7 s) and carries on, stale.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(app.get_key(&key.key_id).await.uses, 1);
    assert_eq!(app.active_rows(&class.class_id).await, 1);
    let mut db = app.db().await;
    let (state, generation): (String, i64) = sqlx::query_as(
        "SELECT state, generation FROM redemption.redemptions WHERE idempotency_key = $1",
    )
    .bind(&attempt)
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!((state.as_str(), generation), ("completed", 2));
    assert_status(
        app.redeem(0, as_user(&key.code, &ids[1], &idem())).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
}

/// A retry may take over only after RECOVERY_AFTER_SECONDS, which must
/// exceed the redemption timeout: the service refuses to start otherwise.
#[tokio::test]
async fn recovery_after_must_exceed_the_redemption_timeout() {
    let app = TestApp::start(0).await;
    let mut config = app.replica_config();
    config.redemption_timeout_seconds = 5;
    config.recovery_after_seconds = 5;
    match <trainingkeys_redemption::Application as Service>::build(config).await {
        Ok(_) => panic!("started with RECOVERY_AFTER_SECONDS = REDEMPTION_TIMEOUT_SECONDS"),
        Err(e) => assert!(e.to_string().contains("RECOVERY_AFTER_SECONDS"), "{e:#}"),
    }
}

/// A use given back stays given back, a release that comes first refuses
/// the consume that follows, and an older generation cannot write.
#[tokio::test]
async fn released_uses_stay_released_and_old_drivers_cannot_write() {
    let app = TestApp::start(0).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let keys = app.class_keys(&class.class_id, 3).await;

    let (k0, r1) = (&keys[0].key_id, idem());
    app.consume(k0, &uuid(), &r1, 1).await.unwrap();
    assert!(app.release(k0, &r1, 1).await.unwrap().released);
    assert_status(
        app.consume(k0, &uuid(), &r1, 1).await,
        Code::FailedPrecondition,
        "KEY_USE_RELEASED",
    );
    assert_eq!(app.get_key(k0).await.uses, 0);

    let (k1, r2) = (&keys[1].key_id, idem());
    let marker = app.release(k1, &r2, 1).await.unwrap();
    assert!(!marker.released);
    assert_status(
        app.consume(k1, &uuid(), &r2, 1).await,
        Code::FailedPrecondition,
        "KEY_USE_RELEASED",
    );
    assert_eq!(app.get_key(k1).await.uses, 0);

    let (k2, r3) = (&keys[2].key_id, idem());
    app.consume(k2, &uuid(), &r3, 2).await.unwrap();
    assert_status(
        app.consume(k2, &uuid(), &r3, 1).await,
        Code::Aborted,
        "STALE_GENERATION",
    );
    assert_status(
        app.release(k2, &r3, 1).await,
        Code::Aborted,
        "STALE_GENERATION",
    );
    assert_eq!(app.get_key(k2).await.uses, 1);
    assert!(app.release(k2, &r3, 2).await.unwrap().released);
}

/// A refused self-registration creates no account, and a redemption never
/// renames an existing one.
#[tokio::test]
async fn a_refused_redemption_writes_nothing() {
    let app = TestApp::start(1).await;
    let org = org();

    let full = app.class(&org, 1).await;
    let full_key = app.event_key(&full.class_id, false).await;
    let seated = app.users(&org, 1).await.remove(0);
    app.redeem(0, as_user(&full_key.code, &seated, &idem()))
        .await
        .unwrap();
    let turned_away = as_new(&full_key.code, &org, "late@example.com", "Late");
    assert_status(
        app.redeem(0, turned_away).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    assert!(app.find_user(&org, "late@example.com").await.is_none());

    let ended = app.class_at(&org, 5, -3..-1, 0).await;
    let ended_key = app.event_key(&ended.class_id, false).await;
    let expired = as_new(&ended_key.code, &org, "expired@example.com", "Late");
    assert_status(
        app.redeem(0, expired).await,
        Code::FailedPrecondition,
        "KEY_EXPIRED",
    );
    assert!(app.find_user(&org, "expired@example.com").await.is_none());

    let open = app.class(&org, 5).await;
    let open_key = app.event_key(&open.class_id, false).await;
    let elsewhere = self::org();
    let stranger = as_new(&open_key.code, &elsewhere, "stranger@example.com", "S");
    assert_status(
        app.redeem(0, stranger).await,
        Code::FailedPrecondition,
        "ORGANIZATION_MISMATCH",
    );
    assert!(
        app.find_user(&elsewhere, "stranger@example.com")
            .await
            .is_none()
    );

    let revoked = app.class_keys(&open.class_id, 1).await.remove(0);
    app.revoke(&revoked.key_id).await.unwrap();
    let refused = as_new(&revoked.code, &org, "revoked@example.com", "R");
    assert_status(
        app.redeem(0, refused).await,
        Code::FailedPrecondition,
        "KEY_REVOKED",
    );
    assert!(app.find_user(&org, "revoked@example.com").await.is_none());

    // An existing account redeemed for under another name keeps its own.
    app.enrollment_client()
        .register_user(pb::RegisterUserRequest {
            organization_id: org.clone(),
            email: "ada@example.com".into(),
            display_name: "Ada".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let renamed = as_new(&open_key.code, &org, "ADA@example.com", "Mallory");
    let answer = app.redeem(0, renamed).await.unwrap();
    assert!(!answer.user_created);
    let ada = app.find_user(&org, "ada@example.com").await.unwrap();
    assert_eq!(ada.display_name, "Ada");

    // An admitted self-registration creates the account under the id it was
    // admitted with.
    let new = as_new(&open_key.code, &org, "new@example.com", "New");
    let fresh = app.redeem(0, new).await.unwrap();
    assert!(fresh.user_created);
    let created = app.find_user(&org, "new@example.com").await.unwrap();
    assert_eq!(enrollment(&fresh).user_id, created.user_id);
}

/// Idempotency keys are scoped to who redeems (another student's use of the
/// same key is theirs), and a retry is recognised by its meaning.
#[tokio::test]
async fn idempotency_keys_are_scoped_and_compared_by_meaning() {
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let ids = app.users(&org, 2).await;
    let shared = idem();

    let a = app
        .redeem(0, as_user(&key.code, &ids[0], &shared))
        .await
        .unwrap();
    let b = app
        .redeem(0, as_user(&key.code, &ids[1], &shared))
        .await
        .unwrap();
    assert_eq!(enrollment(&a).user_id, ids[0]);
    assert_eq!(enrollment(&b).user_id, ids[1], "B got A's answer");

    let respelled = as_user(
        &key.code.to_lowercase().replace('-', " "),
        &ids[0].to_uppercase(),
        &shared,
    );
    let again = app.redeem(0, respelled).await.unwrap();
    assert_eq!(again, a, "the same request written differently is a retry");
}

/// A redemption task that panics must not leave its idempotency key joined
/// to a dead outcome: the retry is decided afresh.
#[tokio::test]
async fn a_panicking_redemption_does_not_poison_its_idempotency_key() {
    let app = TestApp::start_with(1, |c| {
        c.fault = Some(FaultPoint::BeforeRecord);
        c.fault_action = FaultAction::Panic;
    })
    .await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let user = app.users(&org, 1).await.remove(0);
    let request = as_user(&key.code, &user, &idem());
    assert_status(
        app.redeem(0, request.clone()).await,
        Code::Internal,
        "INTERNAL",
    );
    let retried = app.redeem(0, request).await.unwrap();
    assert_eq!(enrollment(&retried).user_id, user);
}

/// DisableEventKey racing SetEventKey: whichever goes first, the answer
/// matches what is live afterwards (never "no key" with a new key live).
#[tokio::test]
async fn disable_racing_set_reports_what_it_retired() {
    let app = TestApp::start(0).await;
    let org = org();
    let class = app.class(&org, 5).await;
    for _ in 0..25 {
        let old = app.event_key(&class.class_id, false).await;
        let (set, disabled) = tokio::join!(
            app.set_event_key(&class.class_id, "", false),
            app.disable_event_key(&class.class_id)
        );
        let new = set.unwrap().key.unwrap();
        let retired = disabled.unwrap().key;
        let retired = retired.expect("a key was live throughout, yet disable found none");
        let mut db = app.db().await;
        let live: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT key_id FROM key_issuance.keys WHERE class_id = $1::uuid AND kind = 3 AND revoked_at IS NULL",
        )
        .bind(&class.class_id)
        .fetch_all(&mut db)
        .await
        .unwrap();
        if retired.key_id == old.key_id {
            assert_eq!(
                live,
                vec![new.key_id.parse::<uuid::Uuid>().unwrap()],
                "disable first: the new key lives"
            );
        } else {
            assert_eq!(retired.key_id, new.key_id);
            assert!(live.is_empty(), "set first: disable retired the new key");
        }
    }
}

/// A class ending too late for its lab access end to be represented is
/// refused, and nothing is created (it used to panic after the insert).
#[tokio::test]
async fn a_class_ending_at_the_end_of_time_is_refused() {
    let app = TestApp::start(0).await;
    let org = org();
    let end_of_time = chrono::DateTime::<chrono::Utc>::MAX_UTC - chrono::Duration::days(1);
    let forever = pb::CreateClassRequest {
        end_time: Some(to_timestamp(end_of_time)),
        lab_access_days: 30,
        ..class_request(&org, 5)
    };
    assert_invalid_field(
        app.enrollment_client().create_class(forever).await,
        "end_time",
    );
    let mut db = app.db().await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM enrollment.classes WHERE organization_id = $1")
            .bind(&org)
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(rows, 0);
}

/// An event key used more times than a row lists is exported as one row of
/// bounded size: its use count in full, its first 100 uses listed.
#[tokio::test]
async fn an_event_key_with_many_uses_exports_as_one_bounded_row() {
    let app = TestApp::start(0).await;
    let org = org();
    let class = app.class(&org, 500).await;
    let key = app.event_key(&class.class_id, false).await;
    for _ in 0..130 {
        app.consume(&key.key_id, &uuid(), &idem(), 1).await.unwrap();
    }
    let scope = pb::export_keys_request::Scope::ClassId(class.class_id.clone());
    let rows = app.export(scope).await.unwrap().rows;
    assert_eq!(rows.len(), 1);
    assert_eq!(&rows[0][6], "130");
    assert_eq!(rows[0][7].split(';').count(), 100);
    assert!(rows[0].as_slice().len() < 8 * 1024, "a row stays small");
}

/// Enroll is idempotent per redemption, refusals included: a repeat gets
/// the seat the redemption took, or the same CLASS_FULL even after a seat
/// frees up (a late twin of a refused redemption cannot take it).
#[tokio::test]
async fn enroll_answers_a_redemption_the_same_every_time() {
    let app = TestApp::start(0).await;
    let org = org();
    let class = app.class(&org, 1).await;
    let ids = app.users(&org, 3).await;
    let (r1, r2) = (idem(), idem());

    let first = app.enroll_for(&class.class_id, &ids[0], &r1).await.unwrap();
    assert!(!first.already_enrolled);
    let again = app.enroll_for(&class.class_id, &ids[0], &r1).await.unwrap();
    assert!(again.already_enrolled);
    assert_eq!(again.enrollment.as_ref().unwrap().redemption_id, r1);
    assert_eq!(again.enrollment, first.enrollment);

    assert_status(
        app.enroll_for(&class.class_id, &ids[1], &r2).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    app.cancel(&first.enrollment.unwrap().enrollment_id)
        .await
        .unwrap();
    assert_status(
        app.enroll_for(&class.class_id, &ids[1], &r2).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    let fresh = app.enroll_for(&class.class_id, &ids[2], &idem()).await;
    assert!(fresh.is_ok(), "the freed seat goes to a new redemption");
}

/// VoidRedemption takes a failed redemption's grant back and refuses any
/// later one, however late it comes.
#[tokio::test]
async fn a_voided_redemption_keeps_nothing_and_gets_nothing() {
    let app = TestApp::start(0).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let ids = app.users(&org, 2).await;
    let profile = app.profile(&org).await;
    let mut e = app.internal_enrollment_client();
    let void = |rid: &str| pb::VoidRedemptionRequest {
        redemption_id: rid.into(),
        ..Default::default()
    };

    // A seat taken, then voided: freed, and not taken again.
    let seated = idem();
    app.enroll_for(&class.class_id, &ids[0], &seated)
        .await
        .unwrap();
    assert!(
        e.void_redemption(void(&seated))
            .await
            .unwrap()
            .into_inner()
            .taken_back
    );
    assert_eq!(app.active_rows(&class.class_id).await, 0);
    assert_status(
        app.enroll_for(&class.class_id, &ids[0], &seated).await,
        Code::FailedPrecondition,
        "REDEMPTION_VOIDED",
    );
    assert!(
        !e.void_redemption(void(&seated))
            .await
            .unwrap()
            .into_inner()
            .taken_back
    );

    // Voided before anything was granted: nothing is, ever.
    let early = idem();
    e.void_redemption(void(&early)).await.unwrap();
    assert_status(
        app.enroll_for(&class.class_id, &ids[1], &early).await,
        Code::FailedPrecondition,
        "REDEMPTION_VOIDED",
    );
    let assign = |rid: &str| pb::AssignSubscriptionRequest {
        profile_id: profile.profile_id.clone(),
        user_id: ids[1].clone(),
        redemption_id: rid.into(),
        ..Default::default()
    };
    assert_status(
        e.assign_subscription(assign(&early)).await,
        Code::FailedPrecondition,
        "REDEMPTION_VOIDED",
    );

    // A subscription granted, then voided: it ends now.
    let granted = idem();
    e.assign_subscription(assign(&granted)).await.unwrap();
    assert!(
        e.void_redemption(void(&granted))
            .await
            .unwrap()
            .into_inner()
            .taken_back
    );
    let subs = e
        .list_subscriptions(pb::ListSubscriptionsRequest {
            user_id: ids[1].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .subscriptions;
    assert!(subs.iter().all(|s| !s.active), "{subs:?}");
    assert_status(
        e.assign_subscription(assign(&granted)).await,
        Code::FailedPrecondition,
        "REDEMPTION_VOIDED",
    );
}

/// A redemption that found the seat already held, completed by a take-over
/// while its first driver was frozen: when that driver wakes (after the
/// student's other seat was cancelled), it gets the recorded answer, not a
/// seat of its own on a key whose use was given back.
#[tokio::test]
async fn a_stale_driver_cannot_seat_a_student_the_redemption_found_already_seated() {
    let app = TestApp::start_with(1, stalls_after_consume).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.class_keys(&class.class_id, 1).await.remove(0);
    let user = app.users(&org, 1).await.remove(0);
    let direct = app.enroll(&class.class_id, &user).await.unwrap();

    let answer = app
        .redeem_until_answered(as_user(&key.code, &user, &idem()))
        .await
        .unwrap();
    assert!(answer.already_held);
    app.cancel(&direct.enrollment.unwrap().enrollment_id)
        .await
        .unwrap();
    // The first driver wakes at 7 s and tries to enroll.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(app.active_rows(&class.class_id).await, 0);
    assert_eq!(app.get_key(&key.key_id).await.uses, 0);
    let mut db = app.db().await;
    assert_eq!(
        trainingkeys_tests::chaos::keys_accounted_for(&mut db).await,
        Vec::<String>::new()
    );
}

/// A self-registering student turned away after the account was made (the
/// gate off, so PostgreSQL's guard refuses; or another student's consume
/// won the single-use key) keeps no account.
#[tokio::test]
async fn a_student_turned_away_after_registering_keeps_no_account() {
    let app = TestApp::start_with(1, |c| c.gate_enabled = false).await;
    let org = org();
    let full = app.class(&org, 1).await;
    let key = app.event_key(&full.class_id, false).await;
    let seated = app.users(&org, 1).await.remove(0);
    app.redeem(0, as_user(&key.code, &seated, &idem()))
        .await
        .unwrap();
    assert_status(
        app.redeem(0, as_new(&key.code, &org, "late@example.com", "Late"))
            .await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    assert!(app.find_user(&org, "late@example.com").await.is_none());

    let (_, pool) = app.subscription_pool(&org, 1, None).await;
    let racers = (0..6).map(|i| {
        let email = format!("racer{i}@example.com");
        app.redeem(0, as_new(&pool[0].code, &org, &email, "R"))
    });
    let answers = futures::future::join_all(racers).await;
    let won = answers.iter().filter(|a| a.is_ok()).count();
    assert_eq!(won, 1, "{answers:?}");
    let mut accounts = 0;
    for i in 0..6 {
        let email = format!("racer{i}@example.com");
        accounts += usize::from(app.find_user(&org, &email).await.is_some());
    }
    assert_eq!(accounts, 1, "only the winner keeps an account");
}

/// Records from before requests were stored by meaning hold the bytes as
/// sent: a retry written another way still gets the first answer.
#[tokio::test]
async fn records_from_before_canonical_requests_still_replay() {
    use prost::Message as _;
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let user = app.users(&org, 1).await.remove(0);
    let attempt = idem();
    let as_sent = as_user(&key.code.to_lowercase(), &user.to_uppercase(), &attempt);
    // As every recorded answer, it names the user (and so the organization
    // it may be replayed to).
    let answer = pb::RedeemKeyResponse {
        redemption_id: idem(),
        key_id: key.key_id.clone(),
        user: Some(pb::User {
            user_id: user.clone(),
            organization_id: org.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut db = app.db().await;
    sqlx::query(
        "INSERT INTO redemption.redemptions (redemption_id, scope, idempotency_key, request, state,
             key_id, key_kind, target_id, user_id, response)
         VALUES ($1::uuid, $2, $3, $4, 'completed', $5::uuid, 3, $6::uuid, $7::uuid, $8)",
    )
    .bind(&answer.redemption_id)
    .bind(format!("user:{user}"))
    .bind(&attempt)
    .bind(as_sent.encode_to_vec())
    .bind(&key.key_id)
    .bind(&class.class_id)
    .bind(&user)
    .bind(answer.encode_to_vec())
    .execute(&mut db)
    .await
    .unwrap();
    let replayed = app
        .redeem(0, as_user(&key.code, &user, &attempt))
        .await
        .unwrap();
    assert_eq!(replayed, answer);
}

/// An idempotency key with a control character is refused as a bad field
/// (a NUL would fail the batched look-up of every request beside it).
#[tokio::test]
async fn idempotency_keys_with_control_characters_are_refused() {
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let user = app.users(&org, 1).await.remove(0);
    let request = as_user(&key.code, &user, "a\u{0}b");
    assert_invalid_field(app.redeem(0, request).await, "idempotency_key");
}

/// A redemption in flight across the upgrade (its seat taken with the key
/// but not naming it, the record never renewed) is finished by recovery
/// without giving its key's use back; a failed one from before, still
/// holding a use, is audited and the use given back.
#[tokio::test]
async fn redemptions_from_before_the_upgrade_are_finished_and_audited() {
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let keys = app.class_keys(&class.class_id, 2).await;
    let ids = app.users(&org, 2).await;
    let mut db = app.db().await;
    let legacy = |rid: &str, user: &str, key: &pb::Key, state: &str| {
        format!(
            "INSERT INTO redemption.redemptions (redemption_id, scope, idempotency_key, request, state,
                 key_id, key_kind, target_id, user_id, updated_at, error_code, error_reason, error_message,
                 legacy, created_at)
             VALUES ('{rid}', 'user:{user}', '{rid}', '', '{state}', '{}', 2, '{}', '{user}',
                     now() - interval '1 hour', 9, 'CLASS_FULL', 'full', true, now() - interval '1 hour')",
            key.key_id, class.class_id
        )
    };

    // In flight: consumed and enrolled by the old code, not yet completed.
    let (r1, r2) = (idem(), idem());
    app.consume(&keys[0].key_id, &ids[0], &r1, 0).await.unwrap();
    app.internal_enrollment_client()
        .enroll(pb::EnrollRequest {
            class_id: class.class_id.clone(),
            user_id: ids[0].clone(),
            source_key_id: keys[0].key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(legacy(
        &r1, &ids[0], &keys[0], "admitted",
    )))
    .execute(&mut db)
    .await
    .unwrap();
    // Failed by the old code with its use left behind.
    app.consume(&keys[1].key_id, &ids[1], &r2, 0).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(legacy(
        &r2, &ids[1], &keys[1], "failed",
    )))
    .execute(&mut db)
    .await
    .unwrap();

    let settled = trainingkeys_tests::eventually(Duration::from_secs(10), || async {
        let mut db = app.db().await;
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM redemption.redemptions
             WHERE state = 'admitted' OR (state = 'failed' AND audited_at IS NULL)",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        open == 0
    })
    .await;
    assert!(settled, "recovery did not finish and audit");
    assert_eq!(
        app.get_key(&keys[0].key_id).await.uses,
        1,
        "the in-flight use was refunded"
    );
    assert_eq!(
        app.get_key(&keys[1].key_id).await.uses,
        0,
        "the failed use was kept"
    );
    assert_eq!(app.active_rows(&class.class_id).await, 1);
}

/// A failed redemption from before the upgrade whose twin completed with a
/// seat (the old two-driver bug: the seat names the key but no redemption)
/// keeps that seat's use when audited, so the key is not freed for another.
#[tokio::test]
async fn the_audit_keeps_the_use_of_a_seat_an_old_twin_took() {
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.class_keys(&class.class_id, 1).await.remove(0);
    let ids = app.users(&org, 2).await;
    let rid = idem();
    app.internal_keys_client()
        .consume_key(pb::ConsumeKeyRequest {
            key_id: key.key_id.clone(),
            user_id: ids[0].clone(),
            redemption_id: rid.clone(),
            generation: 0,
        })
        .await
        .unwrap();
    app.internal_enrollment_client()
        .enroll(pb::EnrollRequest {
            class_id: class.class_id.clone(),
            user_id: ids[0].clone(),
            source_key_id: key.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut db = app.db().await;
    sqlx::query(
        "INSERT INTO redemption.redemptions (redemption_id, scope, idempotency_key, request, state,
             key_id, key_kind, target_id, user_id, error_code, error_reason, error_message, legacy)
         VALUES ($1::uuid, 'user:x', $1, '', 'failed', $2::uuid, 2, $3::uuid, $4::uuid, 9, 'CLASS_FULL', 'full', true)",
    )
    .bind(&rid)
    .bind(&key.key_id)
    .bind(&class.class_id)
    .bind(&ids[0])
    .execute(&mut db)
    .await
    .unwrap();
    let audited = trainingkeys_tests::eventually(Duration::from_secs(10), || async {
        let mut db = app.db().await;
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM redemption.redemptions WHERE audited_at IS NULL",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        open == 0
    })
    .await;
    assert!(audited);
    assert_eq!(app.get_key(&key.key_id).await.uses, 1);
    assert_status(
        app.redeem(0, as_user(&key.code, &ids[1], &idem())).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
}

/// VoidRedemption removes only the account RegisterUser created for that
/// very redemption, and only while it holds nothing else.
#[tokio::test]
async fn a_void_removes_only_the_account_its_redemption_created() {
    let app = TestApp::start(0).await;
    let org = org();
    let mut e = app.internal_enrollment_client();
    let register = |email: &str, rid: &str| pb::RegisterUserRequest {
        organization_id: org.clone(),
        email: email.into(),
        display_name: "S".into(),
        redemption_id: rid.into(),
        ..Default::default()
    };
    let void = |rid: &str, user: &str| pb::VoidRedemptionRequest {
        redemption_id: rid.into(),
        created_user_id: user.into(),
    };
    // Registered directly: a void naming it changes nothing.
    let direct = e
        .register_user(register("direct@example.com", ""))
        .await
        .unwrap();
    let direct = direct.into_inner().user.unwrap();
    e.void_redemption(void(&idem(), &direct.user_id))
        .await
        .unwrap();
    assert!(app.find_user(&org, "direct@example.com").await.is_some());
    // Registered by a redemption, but holding a seat of its own since.
    let rid = idem();
    let busy = e
        .register_user(register("busy@example.com", &rid))
        .await
        .unwrap();
    let busy = busy.into_inner().user.unwrap();
    let class = app.class(&org, 5).await;
    e.enroll(pb::EnrollRequest {
        class_id: class.class_id.clone(),
        user_id: busy.user_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    e.void_redemption(void(&rid, &busy.user_id)).await.unwrap();
    assert!(app.find_user(&org, "busy@example.com").await.is_some());
    assert_eq!(app.active_rows(&class.class_id).await, 1);
    // Registered by the redemption and holding nothing: removed.
    let rid = idem();
    let idle = e
        .register_user(register("idle@example.com", &rid))
        .await
        .unwrap();
    let idle = idle.into_inner().user.unwrap();
    e.void_redemption(void(&rid, &idle.user_id)).await.unwrap();
    assert!(app.find_user(&org, "idle@example.com").await.is_none());
}

/// A redemption taken over after its student's account went away cannot
/// complete: it is failed and its key use given back, not left admitted.
#[tokio::test]
async fn a_take_over_whose_student_is_gone_fails_and_gives_the_use_back() {
    let app = TestApp::start_with(1, |c| {
        c.fault = Some(FaultPoint::AfterConsume);
        c.fault_action = FaultAction::Hang;
    })
    .await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.class_keys(&class.class_id, 1).await.remove(0);
    let created_by = idem();
    let user = app
        .internal_enrollment_client()
        .register_user(pb::RegisterUserRequest {
            organization_id: org.clone(),
            email: "gone@example.com".into(),
            display_name: "Gone".into(),
            redemption_id: created_by.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let attempt = idem();
    let mut call = tonic::Request::new(as_user(&key.code, &user.user_id, &attempt));
    call.set_timeout(Duration::from_secs(5));
    assert!(
        app.redemption_client(0).redeem_key(call).await.is_err(),
        "hangs after consuming"
    );
    app.internal_enrollment_client()
        .void_redemption(pb::VoidRedemptionRequest {
            redemption_id: created_by,
            created_user_id: user.user_id.clone(),
        })
        .await
        .unwrap();
    let failed = trainingkeys_tests::eventually(Duration::from_secs(15), || async {
        let mut db = app.db().await;
        let state: String = sqlx::query_scalar(
            "SELECT state FROM redemption.redemptions WHERE idempotency_key = $1",
        )
        .bind(&attempt)
        .fetch_one(&mut db)
        .await
        .unwrap();
        state == "failed"
    })
    .await;
    assert!(failed, "the redemption was left unfinished");
    assert_eq!(app.get_key(&key.key_id).await.uses, 0);
}

/// A subscription assigned directly with a key's id, before any redemption,
/// is one the student already held: redeeming that key takes no use.
#[tokio::test]
async fn a_direct_grant_naming_the_key_is_held_before_not_taken() {
    let app = TestApp::start(1).await;
    let org = org();
    let profile = app.profile(&org).await;
    let pool = app.pool(&profile.profile_id, 1, 3).await;
    let key = app
        .list_keys(pool_scope(&pool.pool_id), pb::KeyStatus::Unspecified, 1)
        .await
        .remove(0);
    let user = app.users(&org, 1).await.remove(0);
    app.internal_enrollment_client()
        .assign_subscription(pb::AssignSubscriptionRequest {
            profile_id: profile.profile_id,
            user_id: user.clone(),
            source_key_id: key.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let answer = app
            .redeem(0, as_user(&key.code, &user, &idem()))
            .await
            .unwrap();
        assert!(answer.already_held);
    }
    assert_eq!(app.get_key(&key.key_id).await.uses, 0);
}

/// The redemption log holds no column that nothing writes or reads (the
/// old `seat_held` described logic that did not exist).
#[tokio::test]
async fn the_redemption_log_has_no_dead_seat_held_column() {
    let app = TestApp::start(1).await;
    let mut db = app.db().await;
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns
         WHERE table_schema = 'redemption' AND table_name = 'redemptions'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert!(columns.iter().any(|c| c == "generation"), "{columns:?}");
    assert!(!columns.iter().any(|c| c == "seat_held"), "{columns:?}");
}
