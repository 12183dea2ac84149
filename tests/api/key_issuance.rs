//! KeyIssuanceService over real gRPC against real PostgreSQL and a real
//! enrollment service: every RPC's happy path, every bad input's status and
//! reason, the class key limit and single-use keys under concurrency, windows
//! that follow a rescheduled class, export = list, and no plaintext at rest.

use std::collections::HashSet;

use chrono::{Duration, Utc};
use futures::future::join_all;
use sqlx::Row as _;
use tonic::Code;
use trainingkeys_key_issuance::code::{self, Entropy};
use trainingkeys_proto::time::to_timestamp;
use trainingkeys_proto::v1::export_keys_request::Scope;
use trainingkeys_proto::v1::key_issuance_service_client::KeyIssuanceServiceClient;
use trainingkeys_proto::v1::{self as pb, KeyStatus};
use trainingkeys_tests::{
    TestApp, assert_invalid_field, assert_status, class_scope, error_metadata, fresh_database,
    invalid_field, org, pool_scope, spawn_key_issuance, uuid,
};

/// The rows of an export, its header checked. The CSV format is an API of
/// its own, so its header is spelled out here.
async fn export_rows(app: &TestApp, scope: Scope) -> Vec<csv::StringRecord> {
    let export = app.export(scope).await.unwrap();
    assert_eq!(
        export.header.iter().collect::<Vec<_>>(),
        [
            "code",
            "kind",
            "target",
            "pool",
            "status",
            "valid_until",
            "uses",
            "redeemed_by",
            "redeemed_at"
        ]
    );
    export.rows
}

fn is_generated_format(code: &str) -> bool {
    code.len() == 19 && code::parse_typed(code) == code::Typed::Code(code.replace('-', ""))
}

/// A key with a valid check symbol that was never issued.
fn unissued_code() -> String {
    code::display(std::str::from_utf8(&Entropy::new().key().unwrap()).unwrap())
}

/// `code` with two adjacent, different symbols swapped.
fn transposed(code: &str) -> String {
    let mut chars: Vec<char> = code.chars().collect();
    let i = (0..chars.len() - 1)
        .find(|&i| chars[i] != '-' && chars[i + 1] != '-' && chars[i] != chars[i + 1])
        .unwrap();
    chars.swap(i, i + 1);
    chars.into_iter().collect()
}

#[tokio::test]
async fn subscription_keys_fill_pools_list_and_export() {
    let app = TestApp::start(0).await;
    let profile = app.profile(&org()).await;
    let pool = app.pool(&profile.profile_id, 250, 2).await;
    assert_eq!(
        (pool.key_count, pool.uses_per_key, pool.name.as_str()),
        (250, 2, "Spring campaign")
    );
    assert_eq!(pool.profile_id, profile.profile_id);

    // More keys into the same pool.
    let more = app
        .keys_client()
        .generate_subscription_keys(pb::GenerateSubscriptionKeysRequest {
            profile_id: profile.profile_id.clone(),
            count: 50,
            pool_id: pool.pool_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((more.generated, more.pool.unwrap().key_count), (50, 300));

    let in_pool = || pool_scope(&pool.pool_id);
    let keys = app.list_keys(in_pool(), KeyStatus::Unspecified, 64).await;
    assert_eq!(keys.len(), 300);
    let codes: HashSet<&str> = keys.iter().map(|k| k.code.as_str()).collect();
    assert_eq!(codes.len(), 300, "codes are unique");
    for k in &keys {
        assert!(is_generated_format(&k.code), "{}", k.code);
        assert_eq!(k.kind(), pb::KeyKind::Subscription);
        assert_eq!(k.status(), KeyStatus::Active);
        assert_eq!((k.max_uses, k.uses), (2, 0));
        assert_eq!(k.profile_id, profile.profile_id);
        assert_eq!(k.pool_id, pool.pool_id);
    }
    // Stable order: creation time, then id.
    let order: Vec<_> = keys
        .iter()
        .map(|k| {
            (
                k.created_at.unwrap().seconds,
                k.created_at.unwrap().nanos,
                k.key_id.clone(),
            )
        })
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);

    // A used-up key shows who redeemed it, in the list and in the export.
    let used = &keys[7];
    let (alice, bob) = (uuid(), uuid());
    app.consume(&used.key_id, &alice, &uuid(), 0).await.unwrap();
    app.consume(&used.key_id, &bob, &uuid(), 0).await.unwrap();
    let redeemed = app.list_keys(in_pool(), KeyStatus::Redeemed, 10).await;
    assert_eq!(redeemed.len(), 1);
    assert_eq!(redeemed[0].key_id, used.key_id);
    let who: HashSet<_> = redeemed[0]
        .redemptions
        .iter()
        .map(|r| r.user_id.clone())
        .collect();
    assert_eq!(who, HashSet::from([alice.clone(), bob.clone()]));
    let active = app.list_keys(in_pool(), KeyStatus::Active, 1000).await;
    assert_eq!(active.len(), 299);

    // The export equals the list.
    let listed = app.list_keys(in_pool(), KeyStatus::Unspecified, 1000).await;
    let rows = export_rows(&app, Scope::PoolId(pool.pool_id.clone())).await;
    assert_eq!(rows.len(), listed.len());
    for (row, key) in rows.iter().zip(&listed) {
        assert_eq!(&row[0], key.code);
        assert_eq!(&row[1], "subscription");
        assert_eq!(&row[2], profile.profile_id);
        assert_eq!(&row[3], pool.pool_id);
        let status = if key.status() == KeyStatus::Redeemed {
            "redeemed"
        } else {
            "active"
        };
        assert_eq!(&row[4], status);
        assert_eq!(&row[5], "");
        assert_eq!(row[6].parse::<i32>().unwrap(), key.uses);
        let by: HashSet<String> = row[7]
            .split(';')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        let listed_by: HashSet<String> =
            key.redemptions.iter().map(|r| r.user_id.clone()).collect();
        assert_eq!(by, listed_by);
        assert_eq!(
            row[8].split(';').filter(|s| !s.is_empty()).count(),
            key.redemptions.len()
        );
    }

    // Every key is found by its code, typed loosely.
    let k = &keys[3];
    let typed = k.code.to_lowercase().replace('-', " ");
    assert_eq!(app.key_by_code(&typed).await.unwrap().key_id, k.key_id);
    assert_eq!(app.get_key(&k.key_id).await.code, k.code);
}

#[tokio::test]
async fn subscription_key_errors() {
    let app = TestApp::start(0).await;
    let profile = app.profile(&org()).await;
    let other = app.profile(&org()).await;
    let pool = app.pool(&profile.profile_id, 1, 0).await;
    assert_eq!(pool.uses_per_key, 1, "0 uses means 1");

    let request = |profile_id: &str| pb::GenerateSubscriptionKeysRequest {
        profile_id: profile_id.into(),
        count: 1,
        ..Default::default()
    };
    let generate = |r| {
        let mut client = app.keys_client();
        async move { client.generate_subscription_keys(r).await }
    };
    let unknown = uuid();
    let s = assert_status(
        generate(request(&unknown)).await,
        Code::NotFound,
        "PROFILE_NOT_FOUND",
    );
    assert_eq!(error_metadata(&s, "profile_id"), unknown);

    for (r, field) in [
        (
            pb::GenerateSubscriptionKeysRequest {
                count: 0,
                ..request(&profile.profile_id)
            },
            "count",
        ),
        (
            pb::GenerateSubscriptionKeysRequest {
                count: 1_000_001,
                ..request(&profile.profile_id)
            },
            "count",
        ),
        (request("not-a-uuid"), "profile_id"),
        (
            pb::GenerateSubscriptionKeysRequest {
                uses_per_key: -1,
                ..request(&profile.profile_id)
            },
            "uses_per_key",
        ),
        (
            pb::GenerateSubscriptionKeysRequest {
                pool_name: "x".repeat(201),
                ..request(&profile.profile_id)
            },
            "pool_name",
        ),
        (
            pb::GenerateSubscriptionKeysRequest {
                valid_from: Some(to_timestamp(Utc::now())),
                valid_until: Some(to_timestamp(Utc::now() - Duration::days(1))),
                ..request(&profile.profile_id)
            },
            "valid_until",
        ),
        (
            pb::GenerateSubscriptionKeysRequest {
                pool_id: pool.pool_id.clone(),
                pool_name: "again".into(),
                ..request(&profile.profile_id)
            },
            "pool_name",
        ),
    ] {
        assert_invalid_field(generate(r).await, field);
    }

    let missing_pool = pb::GenerateSubscriptionKeysRequest {
        pool_id: uuid(),
        ..request(&profile.profile_id)
    };
    assert_status(
        generate(missing_pool).await,
        Code::NotFound,
        "POOL_NOT_FOUND",
    );
    let mismatch = pb::GenerateSubscriptionKeysRequest {
        pool_id: pool.pool_id.clone(),
        ..request(&other.profile_id)
    };
    assert_status(
        generate(mismatch).await,
        Code::FailedPrecondition,
        "POOL_PROFILE_MISMATCH",
    );

    // Nothing was written by the failed calls.
    let keys = app
        .list_keys(pool_scope(&pool.pool_id), KeyStatus::Unspecified, 100)
        .await;
    assert_eq!(keys.len(), 1);
    let mut db = app.db().await;
    let pools: i64 = sqlx::query_scalar("SELECT count(*) FROM key_issuance.key_pools")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(pools, 1);

    // A pool whose window is over: its keys are expired (computed, not stored).
    let expired = app
        .generate_pool(pb::GenerateSubscriptionKeysRequest {
            valid_from: Some(to_timestamp(Utc::now() - Duration::days(10))),
            valid_until: Some(to_timestamp(Utc::now() - Duration::days(1))),
            count: 3,
            ..request(&profile.profile_id)
        })
        .await;
    let in_pool = || pool_scope(&expired.pool_id);
    let keys = app.list_keys(in_pool(), KeyStatus::Expired, 100).await;
    assert_eq!(keys.len(), 3);
    let active = app.list_keys(in_pool(), KeyStatus::Active, 100).await;
    assert!(active.is_empty());
    let rows = export_rows(&app, Scope::PoolId(expired.pool_id.clone())).await;
    assert!(rows.iter().all(|r| &r[4] == "expired" && !r[5].is_empty()));
}

#[tokio::test]
async fn list_export_get_and_revoke_errors() {
    let app = TestApp::start(0).await;
    let profile = app.profile(&org()).await;
    let pool = app.pool(&profile.profile_id, 3, 1).await;

    let list = |scope, page_size, page_token: &str| pb::ListKeysRequest {
        scope,
        status: 0,
        page_size,
        page_token: page_token.into(),
    };
    for (r, field) in [
        (list(None, 0, ""), "class_id"),
        (list(pool_scope("nope"), 0, ""), "pool_id"),
        (list(pool_scope(&pool.pool_id), 1001, ""), "page_size"),
        (list(pool_scope(&pool.pool_id), 10, "garbage"), "page_token"),
        (
            pb::ListKeysRequest {
                status: 99,
                ..list(pool_scope(&pool.pool_id), 0, "")
            },
            "status",
        ),
    ] {
        assert_invalid_field(app.keys_client().list_keys(r).await, field);
    }
    assert_status(
        app.keys_client()
            .list_keys(list(pool_scope(&uuid()), 0, ""))
            .await,
        Code::NotFound,
        "POOL_NOT_FOUND",
    );
    assert_status(
        app.keys_client()
            .list_keys(list(class_scope(&uuid()), 0, ""))
            .await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        app.export(Scope::PoolId(uuid())).await,
        Code::NotFound,
        "POOL_NOT_FOUND",
    );
    assert_status(
        app.export(Scope::ClassId(uuid())).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );

    // GetKey: mistyped codes are refused before any lookup; unknown ones are not found.
    let key = app
        .list_keys(pool_scope(&pool.pool_id), KeyStatus::Unspecified, 10)
        .await
        .remove(0);
    assert_status(
        app.key_by_code(&transposed(&key.code)).await,
        Code::InvalidArgument,
        "KEY_MISTYPED",
    );
    assert_status(
        app.key_by_code(&unissued_code()).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    assert_status(
        app.key_by_code("no-such-event-code").await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    assert_invalid_field(app.key_by_code("a!").await, "code");
    assert_status(
        app.try_get_key(&uuid()).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    assert_invalid_field(app.try_get_key("x").await, "key_id");
    let no_selector = pb::GetKeyRequest { selector: None };
    assert_invalid_field(app.keys_client().get_key(no_selector).await, "key_id");

    // RevokeKey is idempotent, and a revoked key is still found (as revoked).
    let first = app.revoke(&key.key_id).await.unwrap();
    assert!(!first.already_revoked);
    assert_eq!(first.key.unwrap().status(), KeyStatus::Revoked);
    let again = app.revoke(&key.key_id).await.unwrap();
    assert!(again.already_revoked);
    assert_eq!(
        app.key_by_code(&key.code).await.unwrap().status(),
        KeyStatus::Revoked
    );
    assert_status(app.revoke(&uuid()).await, Code::NotFound, "KEY_NOT_FOUND");
    let in_pool = || pool_scope(&pool.pool_id);
    let revoked = app.list_keys(in_pool(), KeyStatus::Revoked, 10).await;
    assert_eq!(revoked.len(), 1);
    let active = app.list_keys(in_pool(), KeyStatus::Active, 10).await;
    assert_eq!(active.len(), 2);
}

#[tokio::test]
async fn class_enrollment_keys_never_exceed_the_maximum() {
    let app = TestApp::start(0).await;
    let class = app.class(&org(), 5).await;
    let keys = app.class_keys(&class.class_id, 3).await;
    assert_eq!(keys.len(), 3);
    for k in &keys {
        assert!(is_generated_format(&k.code));
        assert_eq!(k.kind(), pb::KeyKind::ClassEnrollment);
        assert_eq!((k.max_uses, k.status()), (1, KeyStatus::Active));
        assert_eq!(
            k.valid_until, class.end_time,
            "valid through the class's end"
        );
        assert_eq!(k.class_id, class.class_id);
    }
    let s = assert_status(
        app.try_class_keys(&class.class_id, 3).await,
        Code::FailedPrecondition,
        "KEY_LIMIT_REACHED",
    );
    assert_eq!(error_metadata(&s, "max_students"), "5");
    assert_status(
        app.try_class_keys(&class.class_id, 6).await,
        Code::FailedPrecondition,
        "KEY_LIMIT_REACHED",
    );
    // A revoked key frees its place.
    app.revoke(&keys[0].key_id).await.unwrap();
    assert_eq!(app.class_keys(&class.class_id, 3).await.len(), 3);
    assert_status(
        app.try_class_keys(&class.class_id, 1).await,
        Code::FailedPrecondition,
        "KEY_LIMIT_REACHED",
    );

    let listed = app
        .list_keys(class_scope(&class.class_id), KeyStatus::Unspecified, 2)
        .await;
    assert_eq!(listed.len(), 6);
    let rows = export_rows(&app, Scope::ClassId(class.class_id.clone())).await;
    assert_eq!(rows.len(), 6);
    assert!(
        rows.iter()
            .all(|r| &r[1] == "class_enrollment" && r[2] == class.class_id && r[3].is_empty())
    );

    assert_status(
        app.try_class_keys(&uuid(), 1).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    for (class_id, count, field) in [
        (class.class_id.as_str(), 0, "count"),
        ("x", 1, "class_id"),
        (class.class_id.as_str(), 10_001, "count"),
    ] {
        assert_invalid_field(app.try_class_keys(class_id, count).await, field);
    }
}

#[tokio::test]
async fn concurrent_class_key_generation_cannot_exceed_the_maximum() {
    let app = TestApp::start(0).await;
    let class = app.class(&org(), 10).await;
    let calls = (0..12).map(|_| app.try_class_keys(&class.class_id, 3));
    let results = join_all(calls).await;
    let won: usize = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(Vec::len)
        .sum();
    assert_eq!(won, 9, "three calls of three fit under ten");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(trainingkeys_tests::reason(r), "KEY_LIMIT_REACHED");
    }
    let listed = app
        .list_keys(class_scope(&class.class_id), KeyStatus::Unspecified, 100)
        .await;
    assert_eq!(listed.len(), 9);
}

#[tokio::test]
async fn event_keys_are_set_replaced_and_disabled() {
    let app = TestApp::start(0).await;
    let class = app.class(&org(), 30).await;
    let other = app.class(&org(), 30).await;

    let first = app.set_event_key(&class.class_id, "", false).await.unwrap();
    let first_key = first.key.unwrap();
    assert!(first.replaced_key_id.is_empty());
    assert!(is_generated_format(&first_key.code));
    assert_eq!(
        (first_key.kind(), first_key.max_uses),
        (pb::KeyKind::Event, 0)
    );
    assert_eq!(first_key.valid_until, class.end_time);

    // A custom code replaces it at once.
    let second = app
        .set_event_key(&class.class_id, "Rust-Spring-2030", true)
        .await
        .unwrap();
    assert_eq!(second.replaced_key_id, first_key.key_id);
    let second_key = second.key.unwrap();
    assert_eq!(second_key.code, "Rust-Spring-2030");
    assert!(second_key.redeemable_after_class_end);
    assert_eq!(second_key.valid_until, class.lab_access_end_time);
    assert_eq!(
        app.get_key(&first_key.key_id).await.status(),
        KeyStatus::Revoked
    );
    // Found however it is typed (case, I/L/O, hyphens).
    for typed in ["rust spring 2O3O", "RUSTSPR1NG2030"] {
        let found = app.key_by_code(typed).await.unwrap();
        assert_eq!(found.key_id, second_key.key_id);
    }

    // Unique among active keys, case-insensitively.
    let s = assert_status(
        app.set_event_key(&other.class_id, "rust-spring-2030", false)
            .await,
        Code::AlreadyExists,
        "CODE_ALREADY_EXISTS",
    );
    assert_eq!(error_metadata(&s, "field"), "custom_code");
    // Setting the same code again on its own class just replaces the key.
    let again = app
        .set_event_key(&class.class_id, "RUST-SPRING-2030", false)
        .await
        .unwrap();
    assert_eq!(again.replaced_key_id, second_key.key_id);

    // Fewer than 6 symbols: guessable (see the README's guessing math).
    for bad in [
        "abc",
        "ABCD",
        "AB-CDE",
        "has space",
        "ünïcode",
        "----",
        "ABCD-EFGH-JKMN-PQRS",
        &"a".repeat(65),
    ] {
        let s = assert_status(
            app.set_event_key(&class.class_id, bad, false).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&s), "custom_code", "{bad}");
    }
    assert_status(
        app.set_event_key(&uuid(), "", false).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );

    // Disable: idempotent; the code can then be taken by another class.
    let disabled = app.disable_event_key(&class.class_id).await.unwrap();
    let disabled = disabled.key.unwrap();
    assert_eq!(disabled.key_id, again.key.unwrap().key_id);
    assert_eq!(disabled.status(), KeyStatus::Revoked);
    let twice = app.disable_event_key(&class.class_id).await.unwrap();
    assert!(twice.key.is_none());
    assert_status(
        app.disable_event_key(&uuid()).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    app.set_event_key(&other.class_id, "rust-spring-2030", false)
        .await
        .unwrap();

    // The class lists its event keys, the retired ones as revoked.
    let listed = app
        .list_keys(class_scope(&class.class_id), KeyStatus::Unspecified, 100)
        .await;
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|k| k.status() == KeyStatus::Revoked));
}

#[tokio::test]
async fn event_key_windows_move_with_the_class() {
    let app = TestApp::start(0).await;
    let class = app.class(&org(), 30).await;
    let key = app.set_event_key(&class.class_id, "MOVE-ME", false).await;
    let key = key.unwrap().key.unwrap();
    assert_eq!(key.status(), KeyStatus::Active);

    // Reschedule the class into the past: the key's window ends with it.
    let start = Utc::now() - Duration::days(3);
    let end = Utc::now() - Duration::days(1);
    let moved = app
        .update_class(pb::UpdateClassRequest {
            class_id: class.class_id.clone(),
            start_time: Some(to_timestamp(start)),
            end_time: Some(to_timestamp(end)),
            ..Default::default()
        })
        .await
        .unwrap();
    let key = app.get_key(&key.key_id).await;
    assert_eq!(key.valid_until, moved.end_time);
    assert_eq!(key.status(), KeyStatus::Expired);
    let expired = app
        .list_keys(class_scope(&class.class_id), KeyStatus::Expired, 10)
        .await;
    assert_eq!(expired.len(), 1);

    // Redeemable after the class: valid through lab access (end + 7 days).
    let key = app.set_event_key(&class.class_id, "MOVE-ME", true).await;
    let key = key.unwrap().key.unwrap();
    assert_eq!(key.valid_until, moved.lab_access_end_time);
    assert_eq!(key.status(), KeyStatus::Active);
    let rows = export_rows(&app, Scope::ClassId(class.class_id.clone())).await;
    let row = rows
        .iter()
        .find(|r| &r[0] == "MOVE-ME" && &r[4] == "active")
        .unwrap();
    assert_eq!(&row[1], "event");
    assert!(
        row[5].starts_with(
            &moved
                .lab_access_end_time
                .map(|t| chrono::DateTime::from_timestamp(t.seconds, 0)
                    .unwrap()
                    .format("%Y-%m-%dT%H:%M:%S")
                    .to_string())
                .unwrap()
        )
    );
}

#[tokio::test]
async fn consume_and_release_keep_uses_exact() {
    let app = TestApp::start(0).await;
    let profile = app.profile(&org()).await;
    let pool = app.pool(&profile.profile_id, 2, 1).await;
    let keys = app
        .list_keys(pool_scope(&pool.pool_id), KeyStatus::Unspecified, 10)
        .await;
    let (key, spare) = (&keys[0], &keys[1]);
    let (user, r1) = (uuid(), uuid());

    let resolved = app.resolve(&key.code.to_lowercase(), &user).await.unwrap();
    assert_eq!(resolved.key.as_ref().unwrap().key_id, key.key_id);
    assert!(!resolved.revoked && !resolved.used_by_user);

    let c = app.consume(&key.key_id, &user, &r1, 0).await.unwrap();
    assert_eq!((c.uses, c.max_uses, c.already_consumed), (1, 1, false));
    let retry = app.consume(&key.key_id, &user, &r1, 0).await.unwrap();
    assert_eq!((retry.uses, retry.already_consumed), (1, true));
    assert_status(
        app.consume(&key.key_id, &uuid(), &uuid(), 0).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
    let resolved = app.resolve(&key.code, &user).await.unwrap();
    assert!(resolved.used_by_user);
    assert_eq!(resolved.key.unwrap().status(), KeyStatus::Redeemed);
    let fetched = app.get_key(&key.key_id).await;
    assert_eq!(fetched.redemptions.len(), 1);
    assert_eq!(
        (
            fetched.redemptions[0].user_id.as_str(),
            fetched.redemptions[0].redemption_id.as_str()
        ),
        (user.as_str(), r1.as_str())
    );

    // Release gives the use back, once.
    assert!(app.release(&key.key_id, &r1, 0).await.unwrap().released);
    assert!(!app.release(&key.key_id, &r1, 0).await.unwrap().released);
    let reused = app.consume(&key.key_id, &uuid(), &uuid(), 0).await;
    assert_eq!(reused.unwrap().uses, 1);
    assert_status(
        app.release(&uuid(), &uuid(), 0).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );

    // Revoked keys cannot be consumed.
    app.revoke(&spare.key_id).await.unwrap();
    assert_status(
        app.consume(&spare.key_id, &uuid(), &uuid(), 0).await,
        Code::FailedPrecondition,
        "KEY_REVOKED",
    );
    assert!(app.resolve(&spare.code, "").await.unwrap().revoked);

    // Errors.
    assert_status(
        app.consume(&uuid(), &uuid(), &uuid(), 0).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    for (k, u, r, field) in [
        ("x", "", "", "key_id"),
        (key.key_id.as_str(), "x", "", "user_id"),
        (key.key_id.as_str(), user.as_str(), "", "redemption_id"),
    ] {
        assert_invalid_field(app.consume(k, u, r, 0).await, field);
    }
    assert_status(
        app.resolve(&transposed(&key.code), "").await,
        Code::InvalidArgument,
        "KEY_MISTYPED",
    );
    assert_status(
        app.resolve(&unissued_code(), "").await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );

    // Event keys are never limited; each use is recorded.
    let class = app.class(&org(), 30).await;
    let event = app.event_key(&class.class_id, false).await;
    for i in 1..=5 {
        let c = app
            .consume(&event.key_id, &uuid(), &uuid(), 0)
            .await
            .unwrap();
        assert_eq!((c.uses, c.max_uses), (i, 0));
    }
    let event = app.get_key(&event.key_id).await;
    assert_eq!(
        (event.uses, event.redemptions.len(), event.status()),
        (5, 5, KeyStatus::Active)
    );
}

#[tokio::test]
async fn fifty_concurrent_consumers_of_a_single_use_key_make_one_winner() {
    let app = TestApp::start(0).await;
    let class = app.class(&org(), 5).await;
    let key = app.class_keys(&class.class_id, 1).await.remove(0);
    let calls = (0..50).map(|_| {
        let (user, redemption) = (uuid(), uuid());
        let app = &app;
        let key_id = &key.key_id;
        async move { app.consume(key_id, &user, &redemption, 0).await }
    });
    let results = join_all(calls).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(
            trainingkeys_tests::reason(r),
            "KEY_ALREADY_REDEEMED",
            "{r:?}"
        );
    }
    let key = app.get_key(&key.key_id).await;
    assert_eq!(
        (key.uses, key.redemptions.len(), key.status()),
        (1, 1, KeyStatus::Redeemed)
    );
}

#[tokio::test]
async fn notifications_are_rendered_from_the_event_key() {
    let app = TestApp::start(0).await;
    let class = app.class(&org(), 30).await;
    let render = |template: &'static str| app.render(&class.class_id, template);

    assert_status(
        render("Key: {{EventTrainingKey}}").await,
        Code::FailedPrecondition,
        "NO_EVENT_KEY",
    );
    let key = app.event_key(&class.class_id, false).await;
    let text =
        render("Join {{ClassTitle}} ({{ClassStart}} - {{ClassEnd}}) with {{EventTrainingKey}}.")
            .await
            .unwrap();
    let start = chrono::DateTime::from_timestamp(class.start_time.unwrap().seconds, 0)
        .unwrap()
        .format("%Y-%m-%d %H:%M UTC");
    let end = chrono::DateTime::from_timestamp(class.end_time.unwrap().seconds, 0)
        .unwrap()
        .format("%Y-%m-%d %H:%M UTC");
    assert_eq!(
        text,
        format!(
            "Join Rust for services ({start} - {end}) with {}.",
            key.code
        )
    );

    let s = assert_status(
        render("Hi {{StudentName}}").await,
        Code::InvalidArgument,
        "UNKNOWN_PLACEHOLDER",
    );
    assert_eq!(error_metadata(&s, "placeholder"), "StudentName");
    assert_invalid_field(render("Hi {{ClassTitle").await, "template");
    assert_status(
        app.render(&uuid(), "{{ClassTitle}}").await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
}

#[tokio::test]
async fn a_dump_of_the_keys_table_holds_no_plaintext_code() {
    let app = TestApp::start(0).await;
    let profile = app.profile(&org()).await;
    let pool = app.pool(&profile.profile_id, 100, 1).await;
    let class = app.class(&org(), 10).await;
    app.class_keys(&class.class_id, 5).await;
    app.set_event_key(&class.class_id, "Secret-Event-Code", false)
        .await
        .unwrap();

    let mut codes = app
        .list_keys(pool_scope(&pool.pool_id), KeyStatus::Unspecified, 1000)
        .await;
    codes.extend(
        app.list_keys(class_scope(&class.class_id), KeyStatus::Unspecified, 1000)
            .await,
    );
    assert_eq!(codes.len(), 106);

    let mut db = app.db().await;
    let dump: Vec<String> = sqlx::query("SELECT t::text FROM key_issuance.keys t UNION ALL SELECT p::text FROM key_issuance.key_pools p")
        .fetch_all(&mut db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>(0))
        .collect();
    let dump = dump.join("\n").to_uppercase();
    for key in &codes {
        let normalized = code::normalize(&key.code);
        for needle in [
            key.code.to_uppercase(),
            normalized.clone(),
            hex::encode_upper(&key.code),
            hex::encode_upper(&normalized),
        ] {
            assert!(
                !dump.contains(&needle),
                "plaintext {needle} found in the dump"
            );
        }
    }
}

/// Key-issuance alone, its enrollment service never there: not a
/// [`TestApp`], which always has one.
#[tokio::test]
async fn an_unreachable_enrollment_service_is_unavailable() {
    let database_url = fresh_database().await;
    // Nothing listens on port 1.
    let service = spawn_key_issuance(&database_url, "https://127.0.0.1:1").await;
    let mut client = KeyIssuanceServiceClient::new(service.channel().await);
    let class_keys = pb::GenerateClassEnrollmentKeysRequest {
        class_id: uuid(),
        count: 1,
    };
    assert_status(
        client.generate_class_enrollment_keys(class_keys).await,
        Code::Unavailable,
        "UNAVAILABLE",
    );
    let profile_missing = pb::GenerateSubscriptionKeysRequest {
        profile_id: uuid(),
        count: 1,
        ..Default::default()
    };
    assert_status(
        client.generate_subscription_keys(profile_missing).await,
        Code::Unavailable,
        "UNAVAILABLE",
    );
    service.stop().await;
}
