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
use trainingkeys_proto::v1::redeem_key_request::Redeemer;
use trainingkeys_redemption::{FaultAction, FaultPoint};
use trainingkeys_shared::cli::Service;
use trainingkeys_tests::assert_status;
use trainingkeys_tests::system::{
    System, active_rows, as_user, class, class_keys, enrollment, event_key, get_key, idem, org,
    redeem, subscription_pool, users,
};

/// Runs `sql` (a `SELECT … FOR UPDATE` of the row with id `$1`) in a
/// transaction held open for `hold`, as a long transaction or a vacuum stall
/// would; returns once the rows are locked.
async fn lock_rows(sys: &System, sql: &'static str, id: &str, hold: Duration) -> JoinHandle<()> {
    let mut db = sys.db().await;
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

/// RedeemKey retried as clients are told to (UNAVAILABLE and ABORTED, same
/// idempotency key) until it gets an answer, for up to 30 s.
async fn redeem_until_answered(
    sys: &System,
    request: pb::RedeemKeyRequest,
) -> Result<pb::RedeemKeyResponse, tonic::Status> {
    let mut answer = redeem(&mut sys.redeem(0), request.clone()).await;
    for _ in 0..60 {
        match &answer {
            Err(s) if matches!(s.code(), Code::Unavailable | Code::Aborted) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                answer = redeem(&mut sys.redeem(0), request.clone()).await;
            }
            _ => break,
        }
    }
    answer
}

/// The scenario: the class row is locked past the peer and
/// redemption timeouts, student A redeems a single-use key and retries with
/// the same idempotency key until answered. The key must end with one use,
/// and student B must be refused it.
#[tokio::test]
async fn a_slow_database_cannot_refund_a_class_enrollment_key() {
    let sys = System::start_with(1, |c| c.peer_timeout_ms = 1000).await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let key = class_keys(&sys, &class.class_id, 1).await.remove(0);
    let ids = users(&sys, &org, 2).await;
    let sql = "SELECT 1 FROM enrollment.classes WHERE class_id = $1::uuid FOR UPDATE";
    let lock = lock_rows(&sys, sql, &class.class_id, Duration::from_secs(8)).await;

    let a = redeem_until_answered(&sys, as_user(&key.code, &ids[0], &idem())).await;
    lock.await.unwrap();
    assert_eq!(enrollment(&a.unwrap()).user_id, ids[0]);
    assert_eq!(
        get_key(&sys, &key.key_id).await.uses,
        1,
        "the use was refunded"
    );
    assert_status(
        redeem(&mut sys.redeem(0), as_user(&key.code, &ids[1], &idem())).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
    assert_eq!(active_rows(&sys, &class.class_id).await, 1);
}

/// The same with a single-use subscription key, the user's row locked.
#[tokio::test]
async fn a_slow_database_cannot_refund_a_subscription_key() {
    let sys = System::start_with(1, |c| c.peer_timeout_ms = 1000).await;
    let org = org();
    let (_, keys) = subscription_pool(&sys, &org, 1, None).await;
    let ids = users(&sys, &org, 2).await;
    let sql = "SELECT 1 FROM enrollment.users WHERE user_id = $1::uuid FOR UPDATE";
    let lock = lock_rows(&sys, sql, &ids[0], Duration::from_secs(8)).await;

    let a = redeem_until_answered(&sys, as_user(&keys[0].code, &ids[0], &idem())).await;
    lock.await.unwrap();
    assert!(a.is_ok(), "{a:?}");
    assert_eq!(
        get_key(&sys, &keys[0].key_id).await.uses,
        1,
        "the use was refunded"
    );
    assert_status(
        redeem(&mut sys.redeem(0), as_user(&keys[0].code, &ids[1], &idem())).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
    let mut db = sys.db().await;
    let granted: i64 = sqlx::query_scalar("SELECT count(*) FROM enrollment.subscriptions")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(granted, 1);
}

/// A driver that freezes after consuming (its lease unrenewed) is taken over
/// by the client's retry; when it wakes, every write it tries is fenced off.
#[tokio::test]
async fn a_stalled_driver_is_taken_over_and_fenced() {
    let sys = System::start_with(1, |c| {
        c.fault = Some(FaultPoint::AfterConsume);
        c.fault_action = FaultAction::Stall;
        c.fault_stall_ms = 7000;
        c.recovery_interval_seconds = 3600;
    })
    .await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let key = class_keys(&sys, &class.class_id, 1).await.remove(0);
    let ids = users(&sys, &org, 2).await;
    let attempt = idem();
    let answer = redeem_until_answered(&sys, as_user(&key.code, &ids[0], &attempt)).await;
    assert_eq!(enrollment(&answer.unwrap()).user_id, ids[0]);
    // The stalled first driver wakes (7 s) and carries on, stale.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(get_key(&sys, &key.key_id).await.uses, 1);
    assert_eq!(active_rows(&sys, &class.class_id).await, 1);
    let mut db = sys.db().await;
    let (state, generation): (String, i64) = sqlx::query_as(
        "SELECT state, generation FROM redemption.redemptions WHERE idempotency_key = $1",
    )
    .bind(&attempt)
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!((state.as_str(), generation), ("completed", 2));
    assert_status(
        redeem(&mut sys.redeem(0), as_user(&key.code, &ids[1], &idem())).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
}

/// A retry may take over only after RECOVERY_AFTER_SECONDS, which must
/// exceed the redemption timeout: the service refuses to start otherwise.
#[tokio::test]
async fn recovery_after_must_exceed_the_redemption_timeout() {
    let sys = System::start(0).await;
    let mut config = sys.replica_config();
    config.redemption_timeout_seconds = 5;
    config.recovery_after_seconds = 5;
    match <trainingkeys_redemption::Application as Service>::build(config).await {
        Ok(_) => panic!("started with RECOVERY_AFTER_SECONDS = REDEMPTION_TIMEOUT_SECONDS"),
        Err(e) => assert!(e.to_string().contains("RECOVERY_AFTER_SECONDS"), "{e:#}"),
    }
}

fn consume(key_id: &str, rid: &str, generation: i64) -> pb::ConsumeKeyRequest {
    pb::ConsumeKeyRequest {
        key_id: key_id.into(),
        user_id: uuid::Uuid::new_v4().to_string(),
        redemption_id: rid.into(),
        generation,
    }
}

fn release(key_id: &str, rid: &str, generation: i64) -> pb::ReleaseKeyRequest {
    pb::ReleaseKeyRequest {
        key_id: key_id.into(),
        redemption_id: rid.into(),
        generation,
    }
}

/// A use given back stays given back, a release that comes first refuses
/// the consume that follows, and an older generation cannot write.
#[tokio::test]
async fn released_uses_stay_released_and_old_drivers_cannot_write() {
    let sys = System::start(0).await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let keys = class_keys(&sys, &class.class_id, 3).await;
    let mut k = sys.keys_client.clone();

    let r1 = idem();
    k.consume_key(consume(&keys[0].key_id, &r1, 1))
        .await
        .unwrap();
    let released = k
        .release_key(release(&keys[0].key_id, &r1, 1))
        .await
        .unwrap();
    assert!(released.into_inner().released);
    assert_status(
        k.consume_key(consume(&keys[0].key_id, &r1, 1)).await,
        Code::FailedPrecondition,
        "KEY_USE_RELEASED",
    );
    assert_eq!(get_key(&sys, &keys[0].key_id).await.uses, 0);

    let r2 = idem();
    let marker = k
        .release_key(release(&keys[1].key_id, &r2, 1))
        .await
        .unwrap();
    assert!(!marker.into_inner().released);
    assert_status(
        k.consume_key(consume(&keys[1].key_id, &r2, 1)).await,
        Code::FailedPrecondition,
        "KEY_USE_RELEASED",
    );
    assert_eq!(get_key(&sys, &keys[1].key_id).await.uses, 0);

    let r3 = idem();
    k.consume_key(consume(&keys[2].key_id, &r3, 2))
        .await
        .unwrap();
    assert_status(
        k.consume_key(consume(&keys[2].key_id, &r3, 1)).await,
        Code::Aborted,
        "STALE_GENERATION",
    );
    assert_status(
        k.release_key(release(&keys[2].key_id, &r3, 1)).await,
        Code::Aborted,
        "STALE_GENERATION",
    );
    assert_eq!(get_key(&sys, &keys[2].key_id).await.uses, 1);
    let released = k
        .release_key(release(&keys[2].key_id, &r3, 2))
        .await
        .unwrap();
    assert!(released.into_inner().released);
}

fn as_new(code: &str, org: &str, email: &str, name: &str) -> pb::RedeemKeyRequest {
    pb::RedeemKeyRequest {
        code: code.into(),
        redeemer: Some(Redeemer::NewUser(pb::NewUser {
            organization_id: org.into(),
            email: email.into(),
            display_name: name.into(),
        })),
        idempotency_key: idem(),
    }
}

async fn account(sys: &System, org: &str, email: &str) -> Option<pb::User> {
    let found = sys
        .enrollment_client
        .clone()
        .get_user(pb::GetUserRequest {
            organization_id: org.into(),
            email: email.into(),
            ..Default::default()
        })
        .await;
    match found {
        Ok(r) => r.into_inner().user,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => panic!("{s:?}"),
    }
}

/// A refused self-registration creates no account, and a redemption never
/// renames an existing one.
#[tokio::test]
async fn a_refused_redemption_writes_nothing() {
    let sys = System::start(1).await;
    let org = org();
    let mut r = sys.redeem(0);

    let full = class(&sys, &org, 1, 1, 2, 0).await;
    let full_key = event_key(&sys, &full.class_id, false).await;
    let seated = users(&sys, &org, 1).await.remove(0);
    redeem(&mut r, as_user(&full_key.code, &seated, &idem()))
        .await
        .unwrap();
    let turned_away = as_new(&full_key.code, &org, "late@example.com", "Late");
    assert_status(
        redeem(&mut r, turned_away).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    assert!(account(&sys, &org, "late@example.com").await.is_none());

    let ended = class(&sys, &org, 5, -3, -1, 0).await;
    let ended_key = event_key(&sys, &ended.class_id, false).await;
    let expired = as_new(&ended_key.code, &org, "expired@example.com", "Late");
    assert_status(
        redeem(&mut r, expired).await,
        Code::FailedPrecondition,
        "KEY_EXPIRED",
    );
    assert!(account(&sys, &org, "expired@example.com").await.is_none());

    let open = class(&sys, &org, 5, 1, 2, 0).await;
    let open_key = event_key(&sys, &open.class_id, false).await;
    let elsewhere = org_other();
    let stranger = as_new(&open_key.code, &elsewhere, "stranger@example.com", "S");
    assert_status(
        redeem(&mut r, stranger).await,
        Code::FailedPrecondition,
        "ORGANIZATION_MISMATCH",
    );
    assert!(
        account(&sys, &elsewhere, "stranger@example.com")
            .await
            .is_none()
    );

    let revoked = class_keys(&sys, &open.class_id, 1).await.remove(0);
    sys.keys_client
        .clone()
        .revoke_key(pb::RevokeKeyRequest {
            key_id: revoked.key_id.clone(),
        })
        .await
        .unwrap();
    let refused = as_new(&revoked.code, &org, "revoked@example.com", "R");
    assert_status(
        redeem(&mut r, refused).await,
        Code::FailedPrecondition,
        "KEY_REVOKED",
    );
    assert!(account(&sys, &org, "revoked@example.com").await.is_none());

    // An existing account redeemed for under another name keeps its own.
    let mut e = sys.enrollment_client.clone();
    e.register_user(pb::RegisterUserRequest {
        organization_id: org.clone(),
        email: "ada@example.com".into(),
        display_name: "Ada".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let renamed = as_new(&open_key.code, &org, "ADA@example.com", "Mallory");
    let answer = redeem(&mut r, renamed).await.unwrap();
    assert!(!answer.user_created);
    let ada = account(&sys, &org, "ada@example.com").await.unwrap();
    assert_eq!(ada.display_name, "Ada");

    // An admitted self-registration creates the account under the id it was
    // admitted with.
    let fresh = redeem(
        &mut r,
        as_new(&open_key.code, &org, "new@example.com", "New"),
    )
    .await
    .unwrap();
    assert!(fresh.user_created);
    let created = account(&sys, &org, "new@example.com").await.unwrap();
    assert_eq!(enrollment(&fresh).user_id, created.user_id);
}

fn org_other() -> String {
    org()
}

/// Idempotency keys are scoped to who redeems (another student's use of the
/// same key is theirs), and a retry is recognised by its meaning.
#[tokio::test]
async fn idempotency_keys_are_scoped_and_compared_by_meaning() {
    let sys = System::start(1).await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let key = event_key(&sys, &class.class_id, false).await;
    let ids = users(&sys, &org, 2).await;
    let mut r = sys.redeem(0);
    let shared = idem();

    let a = redeem(&mut r, as_user(&key.code, &ids[0], &shared))
        .await
        .unwrap();
    let b = redeem(&mut r, as_user(&key.code, &ids[1], &shared))
        .await
        .unwrap();
    assert_eq!(enrollment(&a).user_id, ids[0]);
    assert_eq!(enrollment(&b).user_id, ids[1], "B got A's answer");

    let respelled = as_user(
        &key.code.to_lowercase().replace('-', " "),
        &ids[0].to_uppercase(),
        &shared,
    );
    let again = redeem(&mut r, respelled).await.unwrap();
    assert_eq!(again, a, "the same request written differently is a retry");
}

/// A redemption task that panics must not leave its idempotency key joined
/// to a dead outcome: the retry is decided afresh.
#[tokio::test]
async fn a_panicking_redemption_does_not_poison_its_idempotency_key() {
    let sys = System::start_with(1, |c| {
        c.fault = Some(FaultPoint::BeforeRecord);
        c.fault_action = FaultAction::Panic;
    })
    .await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let key = event_key(&sys, &class.class_id, false).await;
    let user = users(&sys, &org, 1).await.remove(0);
    let request = as_user(&key.code, &user, &idem());
    assert_status(
        redeem(&mut sys.redeem(0), request.clone()).await,
        Code::Internal,
        "INTERNAL",
    );
    let retried = redeem(&mut sys.redeem(0), request).await.unwrap();
    assert_eq!(enrollment(&retried).user_id, user);
}

/// DisableEventKey racing SetEventKey: whichever goes first, the answer
/// matches what is live afterwards (never "no key" with a new key live).
#[tokio::test]
async fn disable_racing_set_reports_what_it_retired() {
    let sys = System::start(0).await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    for _ in 0..25 {
        let old = event_key(&sys, &class.class_id, false).await;
        let (mut k1, mut k2) = (sys.keys_client.clone(), sys.keys_client.clone());
        let set = k1.set_event_key(pb::SetEventKeyRequest {
            class_id: class.class_id.clone(),
            ..Default::default()
        });
        let disable = k2.disable_event_key(pb::DisableEventKeyRequest {
            class_id: class.class_id.clone(),
        });
        let (set, disabled) = tokio::join!(set, disable);
        let new = set.unwrap().into_inner().key.unwrap();
        let retired = disabled.unwrap().into_inner().key;
        let retired = retired.expect("a key was live throughout, yet disable found none");
        let mut db = sys.db().await;
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
    let sys = System::start(0).await;
    let org = org();
    let start = chrono::Utc::now();
    let created = sys
        .enrollment_client
        .clone()
        .create_class(pb::CreateClassRequest {
            organization_id: org.clone(),
            title: "Forever".into(),
            course_id: "F-1".into(),
            start_time: Some(to_timestamp(start)),
            end_time: Some(to_timestamp(
                chrono::DateTime::<chrono::Utc>::MAX_UTC - chrono::Duration::days(1),
            )),
            max_students: 5,
            lab_access_days: 30,
        })
        .await;
    let status = assert_status(created, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(trainingkeys_tests::invalid_field(&status), "end_time");
    let mut db = sys.db().await;
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
    let sys = System::start(0).await;
    let org = org();
    let class = class(&sys, &org, 500, 1, 2, 0).await;
    let key = event_key(&sys, &class.class_id, false).await;
    let mut k = sys.keys_client.clone();
    for _ in 0..130 {
        k.consume_key(consume(&key.key_id, &idem(), 1))
            .await
            .unwrap();
    }
    let mut stream = k
        .export_keys(pb::ExportKeysRequest {
            scope: Some(pb::export_keys_request::Scope::ClassId(
                class.class_id.clone(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut csv = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        csv.extend(chunk.chunk);
    }
    let mut reader = csv::Reader::from_reader(csv.as_slice());
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(&rows[0][6], "130");
    assert_eq!(rows[0][7].split(';').count(), 100);
    assert!(rows[0].as_slice().len() < 8 * 1024, "a row stays small");
}

fn enroll_for(class_id: &str, user_id: &str, rid: &str) -> pb::EnrollRequest {
    pb::EnrollRequest {
        class_id: class_id.into(),
        user_id: user_id.into(),
        redemption_id: rid.into(),
        ..Default::default()
    }
}

/// Enroll is idempotent per redemption, refusals included: a repeat gets
/// the seat the redemption took, or the same CLASS_FULL even after a seat
/// frees up (a late twin of a refused redemption cannot take it).
#[tokio::test]
async fn enroll_answers_a_redemption_the_same_every_time() {
    let sys = System::start(0).await;
    let org = org();
    let class = class(&sys, &org, 1, 1, 2, 0).await;
    let ids = users(&sys, &org, 3).await;
    let mut e = sys.enrollment_client.clone();
    let (r1, r2) = (idem(), idem());

    let first = e
        .enroll(enroll_for(&class.class_id, &ids[0], &r1))
        .await
        .unwrap();
    let first = first.into_inner();
    assert!(!first.already_enrolled);
    let again = e
        .enroll(enroll_for(&class.class_id, &ids[0], &r1))
        .await
        .unwrap();
    let again = again.into_inner();
    assert!(again.already_enrolled);
    assert_eq!(again.enrollment.as_ref().unwrap().redemption_id, r1);
    assert_eq!(again.enrollment, first.enrollment);

    assert_status(
        e.enroll(enroll_for(&class.class_id, &ids[1], &r2)).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    e.cancel_enrollment(pb::CancelEnrollmentRequest {
        enrollment_id: first.enrollment.unwrap().enrollment_id,
    })
    .await
    .unwrap();
    assert_status(
        e.enroll(enroll_for(&class.class_id, &ids[1], &r2)).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    let fresh = e
        .enroll(enroll_for(&class.class_id, &ids[2], &idem()))
        .await;
    assert!(fresh.is_ok(), "the freed seat goes to a new redemption");
}

/// VoidRedemption takes a failed redemption's grant back and refuses any
/// later one, however late it comes.
#[tokio::test]
async fn a_voided_redemption_keeps_nothing_and_gets_nothing() {
    let sys = System::start(0).await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let ids = users(&sys, &org, 2).await;
    let profile = sys
        .enrollment_client
        .clone()
        .create_subscription_profile(pb::CreateSubscriptionProfileRequest {
            organization_id: org.clone(),
            name: "All".into(),
            course_ids: vec!["A".into()],
            duration_days: 30,
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    let mut e = sys.enrollment_client.clone();
    let void = |rid: &str| pb::VoidRedemptionRequest {
        redemption_id: rid.into(),
        ..Default::default()
    };

    // A seat taken, then voided: freed, and not taken again.
    let seated = idem();
    e.enroll(enroll_for(&class.class_id, &ids[0], &seated))
        .await
        .unwrap();
    assert!(
        e.void_redemption(void(&seated))
            .await
            .unwrap()
            .into_inner()
            .taken_back
    );
    assert_eq!(active_rows(&sys, &class.class_id).await, 0);
    assert_status(
        e.enroll(enroll_for(&class.class_id, &ids[0], &seated))
            .await,
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
        e.enroll(enroll_for(&class.class_id, &ids[1], &early)).await,
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
    let sys = System::start_with(1, |c| {
        c.fault = Some(FaultPoint::AfterConsume);
        c.fault_action = FaultAction::Stall;
        c.fault_stall_ms = 7000;
        c.recovery_interval_seconds = 3600;
    })
    .await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let key = class_keys(&sys, &class.class_id, 1).await.remove(0);
    let user = users(&sys, &org, 1).await.remove(0);
    let mut e = sys.enrollment_client.clone();
    let direct = e
        .enroll(pb::EnrollRequest {
            class_id: class.class_id.clone(),
            user_id: user.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .enrollment
        .unwrap();

    let answer = redeem_until_answered(&sys, as_user(&key.code, &user, &idem()))
        .await
        .unwrap();
    assert!(answer.already_held);
    e.cancel_enrollment(pb::CancelEnrollmentRequest {
        enrollment_id: direct.enrollment_id,
    })
    .await
    .unwrap();
    // The first driver wakes at 7 s and tries to enroll.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(active_rows(&sys, &class.class_id).await, 0);
    assert_eq!(get_key(&sys, &key.key_id).await.uses, 0);
    let mut db = sys.db().await;
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
    let sys = System::start_with(1, |c| c.gate_enabled = false).await;
    let org = org();
    let mut r = sys.redeem(0);
    let full = class(&sys, &org, 1, 1, 2, 0).await;
    let key = event_key(&sys, &full.class_id, false).await;
    let seated = users(&sys, &org, 1).await.remove(0);
    redeem(&mut r, as_user(&key.code, &seated, &idem()))
        .await
        .unwrap();
    assert_status(
        redeem(&mut r, as_new(&key.code, &org, "late@example.com", "Late")).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );
    assert!(account(&sys, &org, "late@example.com").await.is_none());

    let (_, pool) = subscription_pool(&sys, &org, 1, None).await;
    let racers = (0..6).map(|i| {
        let mut r = sys.redeem(0);
        let request = as_new(&pool[0].code, &org, &format!("racer{i}@example.com"), "R");
        async move { redeem(&mut r, request).await }
    });
    let answers = futures::future::join_all(racers).await;
    let won = answers.iter().filter(|a| a.is_ok()).count();
    assert_eq!(won, 1, "{answers:?}");
    let mut accounts = 0;
    for i in 0..6 {
        accounts += usize::from(
            account(&sys, &org, &format!("racer{i}@example.com"))
                .await
                .is_some(),
        );
    }
    assert_eq!(accounts, 1, "only the winner keeps an account");
}

/// Records from before requests were stored by meaning hold the bytes as
/// sent: a retry written another way still gets the first answer.
#[tokio::test]
async fn records_from_before_canonical_requests_still_replay() {
    use prost::Message as _;
    let sys = System::start(1).await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let key = event_key(&sys, &class.class_id, false).await;
    let user = users(&sys, &org, 1).await.remove(0);
    let attempt = idem();
    let as_sent = as_user(&key.code.to_lowercase(), &user.to_uppercase(), &attempt);
    let answer = pb::RedeemKeyResponse {
        redemption_id: idem(),
        key_id: key.key_id.clone(),
        ..Default::default()
    };
    let mut db = sys.db().await;
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
    let replayed = redeem(&mut sys.redeem(0), as_user(&key.code, &user, &attempt))
        .await
        .unwrap();
    assert_eq!(replayed, answer);
}

/// An idempotency key with a control character is refused as a bad field
/// (a NUL would fail the batched look-up of every request beside it).
#[tokio::test]
async fn idempotency_keys_with_control_characters_are_refused() {
    let sys = System::start(1).await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let key = event_key(&sys, &class.class_id, false).await;
    let user = users(&sys, &org, 1).await.remove(0);
    let status = assert_status(
        redeem(&mut sys.redeem(0), as_user(&key.code, &user, "a\u{0}b")).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(
        trainingkeys_tests::invalid_field(&status),
        "idempotency_key"
    );
}

/// A redemption in flight across the upgrade (its seat taken with the key
/// but not naming it, the record never renewed) is finished by recovery
/// without giving its key's use back; a failed one from before, still
/// holding a use, is audited and the use given back.
#[tokio::test]
async fn redemptions_from_before_the_upgrade_are_finished_and_audited() {
    let sys = System::start(1).await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let keys = class_keys(&sys, &class.class_id, 2).await;
    let ids = users(&sys, &org, 2).await;
    let mut e = sys.enrollment_client.clone();
    let mut k = sys.keys_client.clone();
    let mut db = sys.db().await;
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
    k.consume_key(pb::ConsumeKeyRequest {
        key_id: keys[0].key_id.clone(),
        user_id: ids[0].clone(),
        redemption_id: r1.clone(),
        generation: 0,
    })
    .await
    .unwrap();
    e.enroll(pb::EnrollRequest {
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
    k.consume_key(pb::ConsumeKeyRequest {
        key_id: keys[1].key_id.clone(),
        user_id: ids[1].clone(),
        redemption_id: r2.clone(),
        generation: 0,
    })
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(legacy(
        &r2, &ids[1], &keys[1], "failed",
    )))
    .execute(&mut db)
    .await
    .unwrap();

    let settled = trainingkeys_tests::eventually(Duration::from_secs(10), || async {
        let mut db = sys.db().await;
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
        get_key(&sys, &keys[0].key_id).await.uses,
        1,
        "the in-flight use was refunded"
    );
    assert_eq!(
        get_key(&sys, &keys[1].key_id).await.uses,
        0,
        "the failed use was kept"
    );
    assert_eq!(active_rows(&sys, &class.class_id).await, 1);
}

/// A failed redemption from before the upgrade whose twin completed with a
/// seat (the old two-driver bug: the seat names the key but no redemption)
/// keeps that seat's use when audited, so the key is not freed for another.
#[tokio::test]
async fn the_audit_keeps_the_use_of_a_seat_an_old_twin_took() {
    let sys = System::start(1).await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let key = class_keys(&sys, &class.class_id, 1).await.remove(0);
    let ids = users(&sys, &org, 2).await;
    let rid = idem();
    sys.keys_client
        .clone()
        .consume_key(pb::ConsumeKeyRequest {
            key_id: key.key_id.clone(),
            user_id: ids[0].clone(),
            redemption_id: rid.clone(),
            generation: 0,
        })
        .await
        .unwrap();
    sys.enrollment_client
        .clone()
        .enroll(pb::EnrollRequest {
            class_id: class.class_id.clone(),
            user_id: ids[0].clone(),
            source_key_id: key.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut db = sys.db().await;
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
        let mut db = sys.db().await;
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
    assert_eq!(get_key(&sys, &key.key_id).await.uses, 1);
    assert_status(
        redeem(&mut sys.redeem(0), as_user(&key.code, &ids[1], &idem())).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
}

/// VoidRedemption removes only the account RegisterUser created for that
/// very redemption, and only while it holds nothing else.
#[tokio::test]
async fn a_void_removes_only_the_account_its_redemption_created() {
    let sys = System::start(0).await;
    let org = org();
    let mut e = sys.enrollment_client.clone();
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
    assert!(account(&sys, &org, "direct@example.com").await.is_some());
    // Registered by a redemption, but holding a seat of its own since.
    let rid = idem();
    let busy = e
        .register_user(register("busy@example.com", &rid))
        .await
        .unwrap();
    let busy = busy.into_inner().user.unwrap();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    e.enroll(pb::EnrollRequest {
        class_id: class.class_id.clone(),
        user_id: busy.user_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    e.void_redemption(void(&rid, &busy.user_id)).await.unwrap();
    assert!(account(&sys, &org, "busy@example.com").await.is_some());
    assert_eq!(active_rows(&sys, &class.class_id).await, 1);
    // Registered by the redemption and holding nothing: removed.
    let rid = idem();
    let idle = e
        .register_user(register("idle@example.com", &rid))
        .await
        .unwrap();
    let idle = idle.into_inner().user.unwrap();
    e.void_redemption(void(&rid, &idle.user_id)).await.unwrap();
    assert!(account(&sys, &org, "idle@example.com").await.is_none());
}

/// A redemption taken over after its student's account went away cannot
/// complete: it is failed and its key use given back, not left admitted.
#[tokio::test]
async fn a_take_over_whose_student_is_gone_fails_and_gives_the_use_back() {
    let sys = System::start_with(1, |c| {
        c.fault = Some(FaultPoint::AfterConsume);
        c.fault_action = FaultAction::Hang;
    })
    .await;
    let org = org();
    let class = class(&sys, &org, 5, 1, 2, 0).await;
    let key = class_keys(&sys, &class.class_id, 1).await.remove(0);
    let created_by = idem();
    let user = sys
        .enrollment_client
        .clone()
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
        sys.redeem(0).redeem_key(call).await.is_err(),
        "hangs after consuming"
    );
    sys.enrollment_client
        .clone()
        .void_redemption(pb::VoidRedemptionRequest {
            redemption_id: created_by,
            created_user_id: user.user_id.clone(),
        })
        .await
        .unwrap();
    let failed = trainingkeys_tests::eventually(Duration::from_secs(15), || async {
        let mut db = sys.db().await;
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
    assert_eq!(get_key(&sys, &key.key_id).await.uses, 0);
}

/// A subscription assigned directly with a key's id, before any redemption,
/// is one the student already held: redeeming that key takes no use.
#[tokio::test]
async fn a_direct_grant_naming_the_key_is_held_before_not_taken() {
    let sys = System::start(1).await;
    let org = org();
    let profile = sys
        .enrollment_client
        .clone()
        .create_subscription_profile(pb::CreateSubscriptionProfileRequest {
            organization_id: org.clone(),
            name: "All".into(),
            course_ids: vec!["A".into()],
            duration_days: 30,
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    let mut k = sys.keys_client.clone();
    let pool = k
        .generate_subscription_keys(pb::GenerateSubscriptionKeysRequest {
            profile_id: profile.profile_id.clone(),
            count: 1,
            uses_per_key: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap();
    let key = k
        .list_keys(pb::ListKeysRequest {
            scope: Some(pb::list_keys_request::Scope::PoolId(pool.pool_id)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .keys
        .remove(0);
    let user = users(&sys, &org, 1).await.remove(0);
    sys.enrollment_client
        .clone()
        .assign_subscription(pb::AssignSubscriptionRequest {
            profile_id: profile.profile_id,
            user_id: user.clone(),
            source_key_id: key.key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let answer = redeem(&mut sys.redeem(0), as_user(&key.code, &user, &idem()))
            .await
            .unwrap();
        assert!(answer.already_held);
    }
    assert_eq!(get_key(&sys, &key.key_id).await.uses, 0);
}

/// The redemption log holds no column that nothing writes or reads (the
/// old `seat_held` described logic that did not exist).
#[tokio::test]
async fn the_redemption_log_has_no_dead_seat_held_column() {
    let sys = System::start(1).await;
    let mut db = sys.db().await;
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
