//! KeyIssuanceService over real gRPC against real PostgreSQL and a real
//! enrollment service: every RPC's happy path, every bad input's status and
//! reason, the class key limit and single-use keys under concurrency, windows
//! that follow a rescheduled class, export = list, and no plaintext at rest.

use std::collections::HashSet;

use chrono::{Duration, Utc};
use futures::StreamExt as _;
use futures::future::join_all;
use sqlx::Row as _;
use tonic::Code;
use tonic::transport::Channel;
use trainingkeys_key_issuance::code::{self, Entropy};
use trainingkeys_proto::time::to_timestamp;
use trainingkeys_proto::v1::key_issuance_service_client::KeyIssuanceServiceClient;
use trainingkeys_proto::v1::{self as pb, export_keys_request, get_key_request, list_keys_request};
use trainingkeys_tests::{
    KeyApp, assert_status, error_metadata, fresh_database, invalid_field, spawn_key_issuance,
};

type Client = KeyIssuanceServiceClient<Channel>;

fn org() -> String {
    format!("org-{}", uuid::Uuid::new_v4().simple())
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn create_class(app: &mut KeyApp, max_students: i32) -> pb::Class {
    let start = Utc::now() + Duration::days(1);
    app.enrollment
        .create_class(pb::CreateClassRequest {
            organization_id: org(),
            title: "Rust for services".into(),
            course_id: "RUST-101".into(),
            start_time: Some(to_timestamp(start)),
            end_time: Some(to_timestamp(start + Duration::days(2))),
            max_students,
            lab_access_days: 7,
        })
        .await
        .unwrap()
        .into_inner()
        .class
        .unwrap()
}

async fn create_profile(app: &mut KeyApp) -> pb::SubscriptionProfile {
    app.enrollment
        .create_subscription_profile(pb::CreateSubscriptionProfileRequest {
            organization_id: org(),
            name: "All of Rust".into(),
            course_ids: vec!["RUST-101".into(), "RUST-201".into()],
            duration_days: 365,
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap()
}

async fn generate_pool(
    client: &mut Client,
    profile_id: &str,
    count: i32,
    uses_per_key: i32,
) -> pb::KeyPool {
    let response = client
        .generate_subscription_keys(pb::GenerateSubscriptionKeysRequest {
            profile_id: profile_id.into(),
            count,
            pool_name: "Spring campaign".into(),
            uses_per_key,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.generated, count);
    response.pool.unwrap()
}

fn class_scope(class_id: &str) -> Option<list_keys_request::Scope> {
    Some(list_keys_request::Scope::ClassId(class_id.into()))
}

fn pool_scope(pool_id: &str) -> Option<list_keys_request::Scope> {
    Some(list_keys_request::Scope::PoolId(pool_id.into()))
}

async fn list_all(
    client: &mut Client,
    scope: Option<list_keys_request::Scope>,
    status: pb::KeyStatus,
    page_size: i32,
) -> Vec<pb::Key> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_keys(pb::ListKeysRequest {
                scope: scope.clone(),
                status: status.into(),
                page_size,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.keys.len() <= page_size as usize);
        all.extend(page.keys);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

async fn export(
    client: &mut Client,
    scope: export_keys_request::Scope,
) -> Result<Vec<csv::StringRecord>, tonic::Status> {
    let mut stream = client
        .export_keys(pb::ExportKeysRequest {
            scope: Some(scope),
            status: 0,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend(chunk?.chunk);
    }
    let mut reader = csv::Reader::from_reader(bytes.as_slice());
    let header = reader.headers().unwrap().clone();
    assert_eq!(
        header.iter().collect::<Vec<_>>(),
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
    Ok(reader.records().map(Result::unwrap).collect())
}

async fn get_by_code(client: &mut Client, code: &str) -> Result<pb::Key, tonic::Status> {
    client
        .get_key(pb::GetKeyRequest {
            selector: Some(get_key_request::Selector::Code(code.into())),
        })
        .await
        .map(|r| r.into_inner().key.unwrap())
}

async fn get_by_id(client: &mut Client, key_id: &str) -> Result<pb::Key, tonic::Status> {
    client
        .get_key(pb::GetKeyRequest {
            selector: Some(get_key_request::Selector::KeyId(key_id.into())),
        })
        .await
        .map(|r| r.into_inner().key.unwrap())
}

async fn consume(
    client: &mut Client,
    key_id: &str,
    user_id: &str,
    redemption_id: &str,
) -> Result<pb::ConsumeKeyResponse, tonic::Status> {
    client
        .consume_key(pb::ConsumeKeyRequest {
            key_id: key_id.into(),
            user_id: user_id.into(),
            redemption_id: redemption_id.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn class_keys(
    client: &mut Client,
    class_id: &str,
    count: i32,
) -> Result<Vec<pb::Key>, tonic::Status> {
    client
        .generate_class_enrollment_keys(pb::GenerateClassEnrollmentKeysRequest {
            class_id: class_id.into(),
            count,
        })
        .await
        .map(|r| r.into_inner().keys)
}

async fn set_event_key(
    client: &mut Client,
    class_id: &str,
    custom: &str,
    after_end: bool,
) -> Result<pb::SetEventKeyResponse, tonic::Status> {
    client
        .set_event_key(pb::SetEventKeyRequest {
            class_id: class_id.into(),
            custom_code: custom.into(),
            redeemable_after_class_end: after_end,
        })
        .await
        .map(tonic::Response::into_inner)
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
    let mut app = KeyApp::start().await;
    let profile = create_profile(&mut app).await;
    let pool = generate_pool(&mut app.client, &profile.profile_id, 250, 2).await;
    assert_eq!(
        (pool.key_count, pool.uses_per_key, pool.name.as_str()),
        (250, 2, "Spring campaign")
    );
    assert_eq!(pool.profile_id, profile.profile_id);

    // More keys into the same pool.
    let more = app
        .client
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

    let keys = list_all(
        &mut app.client,
        pool_scope(&pool.pool_id),
        pb::KeyStatus::Unspecified,
        64,
    )
    .await;
    assert_eq!(keys.len(), 300);
    let codes: HashSet<&str> = keys.iter().map(|k| k.code.as_str()).collect();
    assert_eq!(codes.len(), 300, "codes are unique");
    for k in &keys {
        assert!(is_generated_format(&k.code), "{}", k.code);
        assert_eq!(k.kind(), pb::KeyKind::Subscription);
        assert_eq!(k.status(), pb::KeyStatus::Active);
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
    consume(&mut app.client, &used.key_id, &alice, &uuid())
        .await
        .unwrap();
    consume(&mut app.client, &used.key_id, &bob, &uuid())
        .await
        .unwrap();
    let redeemed = list_all(
        &mut app.client,
        pool_scope(&pool.pool_id),
        pb::KeyStatus::Redeemed,
        10,
    )
    .await;
    assert_eq!(redeemed.len(), 1);
    assert_eq!(redeemed[0].key_id, used.key_id);
    let who: HashSet<_> = redeemed[0]
        .redemptions
        .iter()
        .map(|r| r.user_id.clone())
        .collect();
    assert_eq!(who, HashSet::from([alice.clone(), bob.clone()]));
    assert_eq!(
        list_all(
            &mut app.client,
            pool_scope(&pool.pool_id),
            pb::KeyStatus::Active,
            1000
        )
        .await
        .len(),
        299
    );

    // The export equals the list.
    let listed = list_all(
        &mut app.client,
        pool_scope(&pool.pool_id),
        pb::KeyStatus::Unspecified,
        1000,
    )
    .await;
    let rows = export(
        &mut app.client,
        export_keys_request::Scope::PoolId(pool.pool_id.clone()),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), listed.len());
    for (row, key) in rows.iter().zip(&listed) {
        assert_eq!(&row[0], key.code);
        assert_eq!(&row[1], "subscription");
        assert_eq!(&row[2], profile.profile_id);
        assert_eq!(&row[3], pool.pool_id);
        let status = if key.status() == pb::KeyStatus::Redeemed {
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
    assert_eq!(
        get_by_code(&mut app.client, &typed).await.unwrap().key_id,
        k.key_id
    );
    assert_eq!(
        get_by_id(&mut app.client, &k.key_id).await.unwrap().code,
        k.code
    );
}

#[tokio::test]
async fn subscription_key_errors() {
    let mut app = KeyApp::start().await;
    let profile = create_profile(&mut app).await;
    let other = create_profile(&mut app).await;
    let pool = generate_pool(&mut app.client, &profile.profile_id, 1, 0).await;
    assert_eq!(pool.uses_per_key, 1, "0 uses means 1");

    let request = |profile_id: &str| pb::GenerateSubscriptionKeysRequest {
        profile_id: profile_id.into(),
        count: 1,
        ..Default::default()
    };
    let unknown = uuid();
    let s = assert_status(
        app.client
            .generate_subscription_keys(request(&unknown))
            .await,
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
        let s = assert_status(
            app.client.generate_subscription_keys(r).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&s), field);
    }

    let missing_pool = pb::GenerateSubscriptionKeysRequest {
        pool_id: uuid(),
        ..request(&profile.profile_id)
    };
    assert_status(
        app.client.generate_subscription_keys(missing_pool).await,
        Code::NotFound,
        "POOL_NOT_FOUND",
    );
    let mismatch = pb::GenerateSubscriptionKeysRequest {
        pool_id: pool.pool_id.clone(),
        ..request(&other.profile_id)
    };
    assert_status(
        app.client.generate_subscription_keys(mismatch).await,
        Code::FailedPrecondition,
        "POOL_PROFILE_MISMATCH",
    );

    // Nothing was written by the failed calls.
    let keys = list_all(
        &mut app.client,
        pool_scope(&pool.pool_id),
        pb::KeyStatus::Unspecified,
        100,
    )
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
        .client
        .generate_subscription_keys(pb::GenerateSubscriptionKeysRequest {
            valid_from: Some(to_timestamp(Utc::now() - Duration::days(10))),
            valid_until: Some(to_timestamp(Utc::now() - Duration::days(1))),
            count: 3,
            ..request(&profile.profile_id)
        })
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap();
    let keys = list_all(
        &mut app.client,
        pool_scope(&expired.pool_id),
        pb::KeyStatus::Expired,
        100,
    )
    .await;
    assert_eq!(keys.len(), 3);
    assert!(
        list_all(
            &mut app.client,
            pool_scope(&expired.pool_id),
            pb::KeyStatus::Active,
            100
        )
        .await
        .is_empty()
    );
    let rows = export(
        &mut app.client,
        export_keys_request::Scope::PoolId(expired.pool_id.clone()),
    )
    .await
    .unwrap();
    assert!(rows.iter().all(|r| &r[4] == "expired" && !r[5].is_empty()));
}

#[tokio::test]
async fn list_export_get_and_revoke_errors() {
    let mut app = KeyApp::start().await;
    let profile = create_profile(&mut app).await;
    let pool = generate_pool(&mut app.client, &profile.profile_id, 3, 1).await;

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
        let s = assert_status(
            app.client.list_keys(r).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&s), field);
    }
    assert_status(
        app.client.list_keys(list(pool_scope(&uuid()), 0, "")).await,
        Code::NotFound,
        "POOL_NOT_FOUND",
    );
    assert_status(
        app.client
            .list_keys(list(class_scope(&uuid()), 0, ""))
            .await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        export(&mut app.client, export_keys_request::Scope::PoolId(uuid())).await,
        Code::NotFound,
        "POOL_NOT_FOUND",
    );
    assert_status(
        export(&mut app.client, export_keys_request::Scope::ClassId(uuid())).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );

    // GetKey: mistyped codes are refused before any lookup; unknown ones are not found.
    let key = list_all(
        &mut app.client,
        pool_scope(&pool.pool_id),
        pb::KeyStatus::Unspecified,
        10,
    )
    .await
    .remove(0);
    assert_status(
        get_by_code(&mut app.client, &transposed(&key.code)).await,
        Code::InvalidArgument,
        "KEY_MISTYPED",
    );
    assert_status(
        get_by_code(&mut app.client, &unissued_code()).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    assert_status(
        get_by_code(&mut app.client, "no-such-event-code").await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    let s = assert_status(
        get_by_code(&mut app.client, "a!").await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(invalid_field(&s), "code");
    assert_status(
        get_by_id(&mut app.client, &uuid()).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    let s = assert_status(
        get_by_id(&mut app.client, "x").await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(invalid_field(&s), "key_id");
    let s = assert_status(
        app.client
            .get_key(pb::GetKeyRequest { selector: None })
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(invalid_field(&s), "key_id");

    // RevokeKey is idempotent, and a revoked key is still found (as revoked).
    let first = app
        .client
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.already_revoked);
    assert_eq!(first.key.unwrap().status(), pb::KeyStatus::Revoked);
    let again = app
        .client
        .revoke_key(pb::RevokeKeyRequest {
            key_id: key.key_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_revoked);
    assert_eq!(
        get_by_code(&mut app.client, &key.code)
            .await
            .unwrap()
            .status(),
        pb::KeyStatus::Revoked
    );
    assert_status(
        app.client
            .revoke_key(pb::RevokeKeyRequest { key_id: uuid() })
            .await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    assert_eq!(
        list_all(
            &mut app.client,
            pool_scope(&pool.pool_id),
            pb::KeyStatus::Revoked,
            10
        )
        .await
        .len(),
        1
    );
    assert_eq!(
        list_all(
            &mut app.client,
            pool_scope(&pool.pool_id),
            pb::KeyStatus::Active,
            10
        )
        .await
        .len(),
        2
    );
}

#[tokio::test]
async fn class_enrollment_keys_never_exceed_the_maximum() {
    let mut app = KeyApp::start().await;
    let class = create_class(&mut app, 5).await;
    let keys = class_keys(&mut app.client, &class.class_id, 3)
        .await
        .unwrap();
    assert_eq!(keys.len(), 3);
    for k in &keys {
        assert!(is_generated_format(&k.code));
        assert_eq!(k.kind(), pb::KeyKind::ClassEnrollment);
        assert_eq!((k.max_uses, k.status()), (1, pb::KeyStatus::Active));
        assert_eq!(
            k.valid_until, class.end_time,
            "valid through the class's end"
        );
        assert_eq!(k.class_id, class.class_id);
    }
    let s = assert_status(
        class_keys(&mut app.client, &class.class_id, 3).await,
        Code::FailedPrecondition,
        "KEY_LIMIT_REACHED",
    );
    assert_eq!(error_metadata(&s, "max_students"), "5");
    assert_status(
        class_keys(&mut app.client, &class.class_id, 6).await,
        Code::FailedPrecondition,
        "KEY_LIMIT_REACHED",
    );
    // A revoked key frees its place.
    app.client
        .revoke_key(pb::RevokeKeyRequest {
            key_id: keys[0].key_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        class_keys(&mut app.client, &class.class_id, 3)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_status(
        class_keys(&mut app.client, &class.class_id, 1).await,
        Code::FailedPrecondition,
        "KEY_LIMIT_REACHED",
    );

    let listed = list_all(
        &mut app.client,
        class_scope(&class.class_id),
        pb::KeyStatus::Unspecified,
        2,
    )
    .await;
    assert_eq!(listed.len(), 6);
    let rows = export(
        &mut app.client,
        export_keys_request::Scope::ClassId(class.class_id.clone()),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 6);
    assert!(
        rows.iter()
            .all(|r| &r[1] == "class_enrollment" && r[2] == class.class_id && r[3].is_empty())
    );

    assert_status(
        class_keys(&mut app.client, &uuid(), 1).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    for (class_id, count, field) in [
        (class.class_id.as_str(), 0, "count"),
        ("x", 1, "class_id"),
        (class.class_id.as_str(), 10_001, "count"),
    ] {
        let s = assert_status(
            class_keys(&mut app.client, class_id, count).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&s), field);
    }
}

#[tokio::test]
async fn concurrent_class_key_generation_cannot_exceed_the_maximum() {
    let mut app = KeyApp::start().await;
    let class = create_class(&mut app, 10).await;
    let calls = (0..12).map(|_| {
        let mut c = app.client.clone();
        let class_id = class.class_id.clone();
        async move { class_keys(&mut c, &class_id, 3).await }
    });
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
    let listed = list_all(
        &mut app.client,
        class_scope(&class.class_id),
        pb::KeyStatus::Unspecified,
        100,
    )
    .await;
    assert_eq!(listed.len(), 9);
}

#[tokio::test]
async fn event_keys_are_set_replaced_and_disabled() {
    let mut app = KeyApp::start().await;
    let class = create_class(&mut app, 30).await;
    let other = create_class(&mut app, 30).await;

    let first = set_event_key(&mut app.client, &class.class_id, "", false)
        .await
        .unwrap();
    let first_key = first.key.unwrap();
    assert!(first.replaced_key_id.is_empty());
    assert!(is_generated_format(&first_key.code));
    assert_eq!(
        (first_key.kind(), first_key.max_uses),
        (pb::KeyKind::Event, 0)
    );
    assert_eq!(first_key.valid_until, class.end_time);

    // A custom code replaces it at once.
    let second = set_event_key(&mut app.client, &class.class_id, "Rust-Spring-2030", true)
        .await
        .unwrap();
    assert_eq!(second.replaced_key_id, first_key.key_id);
    let second_key = second.key.unwrap();
    assert_eq!(second_key.code, "Rust-Spring-2030");
    assert!(second_key.redeemable_after_class_end);
    assert_eq!(second_key.valid_until, class.lab_access_end_time);
    assert_eq!(
        get_by_id(&mut app.client, &first_key.key_id)
            .await
            .unwrap()
            .status(),
        pb::KeyStatus::Revoked
    );
    // Found however it is typed (case, I/L/O, hyphens).
    assert_eq!(
        get_by_code(&mut app.client, "rust spring 2O3O")
            .await
            .unwrap()
            .key_id,
        second_key.key_id
    );
    assert_eq!(
        get_by_code(&mut app.client, "RUSTSPR1NG2030")
            .await
            .unwrap()
            .key_id,
        second_key.key_id
    );

    // Unique among active keys, case-insensitively.
    let s = assert_status(
        set_event_key(&mut app.client, &other.class_id, "rust-spring-2030", false).await,
        Code::AlreadyExists,
        "CODE_ALREADY_EXISTS",
    );
    assert_eq!(error_metadata(&s, "field"), "custom_code");
    // Setting the same code again on its own class just replaces the key.
    let again = set_event_key(&mut app.client, &class.class_id, "RUST-SPRING-2030", false)
        .await
        .unwrap();
    assert_eq!(again.replaced_key_id, second_key.key_id);

    for bad in [
        "abc",
        "has space",
        "ünïcode",
        "----",
        "ABCD-EFGH-JKMN-PQRS",
        &"a".repeat(65),
    ] {
        let s = assert_status(
            set_event_key(&mut app.client, &class.class_id, bad, false).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&s), "custom_code", "{bad}");
    }
    assert_status(
        set_event_key(&mut app.client, &uuid(), "", false).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );

    // Disable: idempotent; the code can then be taken by another class.
    let disabled = app
        .client
        .disable_event_key(pb::DisableEventKeyRequest {
            class_id: class.class_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let disabled = disabled.key.unwrap();
    assert_eq!(disabled.key_id, again.key.unwrap().key_id);
    assert_eq!(disabled.status(), pb::KeyStatus::Revoked);
    let twice = app
        .client
        .disable_event_key(pb::DisableEventKeyRequest {
            class_id: class.class_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(twice.key.is_none());
    assert_status(
        app.client
            .disable_event_key(pb::DisableEventKeyRequest { class_id: uuid() })
            .await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    set_event_key(&mut app.client, &other.class_id, "rust-spring-2030", false)
        .await
        .unwrap();

    // The class lists its event keys, the retired ones as revoked.
    let listed = list_all(
        &mut app.client,
        class_scope(&class.class_id),
        pb::KeyStatus::Unspecified,
        100,
    )
    .await;
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|k| k.status() == pb::KeyStatus::Revoked));
}

#[tokio::test]
async fn event_key_windows_move_with_the_class() {
    let mut app = KeyApp::start().await;
    let class = create_class(&mut app, 30).await;
    let key = set_event_key(&mut app.client, &class.class_id, "MOVE-ME", false)
        .await
        .unwrap()
        .key
        .unwrap();
    assert_eq!(key.status(), pb::KeyStatus::Active);

    // Reschedule the class into the past: the key's window ends with it.
    let start = Utc::now() - Duration::days(3);
    let end = Utc::now() - Duration::days(1);
    let moved = app
        .enrollment
        .update_class(pb::UpdateClassRequest {
            class_id: class.class_id.clone(),
            start_time: Some(to_timestamp(start)),
            end_time: Some(to_timestamp(end)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .class
        .unwrap();
    let key = get_by_id(&mut app.client, &key.key_id).await.unwrap();
    assert_eq!(key.valid_until, moved.end_time);
    assert_eq!(key.status(), pb::KeyStatus::Expired);
    assert_eq!(
        list_all(
            &mut app.client,
            class_scope(&class.class_id),
            pb::KeyStatus::Expired,
            10
        )
        .await
        .len(),
        1
    );

    // Redeemable after the class: valid through lab access (end + 7 days).
    let key = set_event_key(&mut app.client, &class.class_id, "MOVE-ME", true)
        .await
        .unwrap()
        .key
        .unwrap();
    assert_eq!(key.valid_until, moved.lab_access_end_time);
    assert_eq!(key.status(), pb::KeyStatus::Active);
    let rows = export(
        &mut app.client,
        export_keys_request::Scope::ClassId(class.class_id.clone()),
    )
    .await
    .unwrap();
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
    let mut app = KeyApp::start().await;
    let profile = create_profile(&mut app).await;
    let pool = generate_pool(&mut app.client, &profile.profile_id, 2, 1).await;
    let keys = list_all(
        &mut app.client,
        pool_scope(&pool.pool_id),
        pb::KeyStatus::Unspecified,
        10,
    )
    .await;
    let (key, spare) = (&keys[0], &keys[1]);
    let (user, r1) = (uuid(), uuid());

    let resolved = app
        .client
        .resolve_key(pb::ResolveKeyRequest {
            code: key.code.to_lowercase(),
            user_id: user.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.key.as_ref().unwrap().key_id, key.key_id);
    assert!(!resolved.revoked && !resolved.used_by_user);

    let c = consume(&mut app.client, &key.key_id, &user, &r1)
        .await
        .unwrap();
    assert_eq!((c.uses, c.max_uses, c.already_consumed), (1, 1, false));
    let retry = consume(&mut app.client, &key.key_id, &user, &r1)
        .await
        .unwrap();
    assert_eq!((retry.uses, retry.already_consumed), (1, true));
    assert_status(
        consume(&mut app.client, &key.key_id, &uuid(), &uuid()).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_REDEEMED",
    );
    let resolved = app
        .client
        .resolve_key(pb::ResolveKeyRequest {
            code: key.code.clone(),
            user_id: user.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resolved.used_by_user);
    assert_eq!(resolved.key.unwrap().status(), pb::KeyStatus::Redeemed);
    let fetched = get_by_id(&mut app.client, &key.key_id).await.unwrap();
    assert_eq!(fetched.redemptions.len(), 1);
    assert_eq!(
        (
            fetched.redemptions[0].user_id.as_str(),
            fetched.redemptions[0].redemption_id.as_str()
        ),
        (user.as_str(), r1.as_str())
    );

    // Release gives the use back, once.
    let release = |redemption_id: &str| pb::ReleaseKeyRequest {
        key_id: key.key_id.clone(),
        redemption_id: redemption_id.into(),
        ..Default::default()
    };
    assert!(
        app.client
            .release_key(release(&r1))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert!(
        !app.client
            .release_key(release(&r1))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert_eq!(
        consume(&mut app.client, &key.key_id, &uuid(), &uuid())
            .await
            .unwrap()
            .uses,
        1
    );
    assert_status(
        app.client
            .release_key(pb::ReleaseKeyRequest {
                key_id: uuid(),
                redemption_id: uuid(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );

    // Revoked keys cannot be consumed.
    app.client
        .revoke_key(pb::RevokeKeyRequest {
            key_id: spare.key_id.clone(),
        })
        .await
        .unwrap();
    assert_status(
        consume(&mut app.client, &spare.key_id, &uuid(), &uuid()).await,
        Code::FailedPrecondition,
        "KEY_REVOKED",
    );
    let resolved = app
        .client
        .resolve_key(pb::ResolveKeyRequest {
            code: spare.code.clone(),
            user_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resolved.revoked);

    // Errors.
    assert_status(
        consume(&mut app.client, &uuid(), &uuid(), &uuid()).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    for (k, u, r, field) in [
        ("x", "", "", "key_id"),
        (key.key_id.as_str(), "x", "", "user_id"),
        (key.key_id.as_str(), user.as_str(), "", "redemption_id"),
    ] {
        let s = assert_status(
            consume(&mut app.client, k, u, r).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&s), field);
    }
    let resolve = |code: String| pb::ResolveKeyRequest {
        code,
        user_id: String::new(),
    };
    assert_status(
        app.client.resolve_key(resolve(transposed(&key.code))).await,
        Code::InvalidArgument,
        "KEY_MISTYPED",
    );
    assert_status(
        app.client.resolve_key(resolve(unissued_code())).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );

    // Event keys are never limited; each use is recorded.
    let class = create_class(&mut app, 30).await;
    let event = set_event_key(&mut app.client, &class.class_id, "", false)
        .await
        .unwrap()
        .key
        .unwrap();
    for i in 1..=5 {
        let c = consume(&mut app.client, &event.key_id, &uuid(), &uuid())
            .await
            .unwrap();
        assert_eq!((c.uses, c.max_uses), (i, 0));
    }
    let event = get_by_id(&mut app.client, &event.key_id).await.unwrap();
    assert_eq!(
        (event.uses, event.redemptions.len(), event.status()),
        (5, 5, pb::KeyStatus::Active)
    );
}

#[tokio::test]
async fn fifty_concurrent_consumers_of_a_single_use_key_make_one_winner() {
    let mut app = KeyApp::start().await;
    let class = create_class(&mut app, 5).await;
    let key = class_keys(&mut app.client, &class.class_id, 1)
        .await
        .unwrap()
        .remove(0);
    let calls = (0..50).map(|_| {
        let mut c = app.client.clone();
        let key_id = key.key_id.clone();
        async move { consume(&mut c, &key_id, &uuid(), &uuid()).await }
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
    let key = get_by_id(&mut app.client, &key.key_id).await.unwrap();
    assert_eq!(
        (key.uses, key.redemptions.len(), key.status()),
        (1, 1, pb::KeyStatus::Redeemed)
    );
}

#[tokio::test]
async fn notifications_are_rendered_from_the_event_key() {
    let mut app = KeyApp::start().await;
    let class = create_class(&mut app, 30).await;
    let render = |template: &str| pb::RenderNotificationRequest {
        class_id: class.class_id.clone(),
        template: template.into(),
    };

    assert_status(
        app.client
            .render_notification(render("Key: {{EventTrainingKey}}"))
            .await,
        Code::FailedPrecondition,
        "NO_EVENT_KEY",
    );
    let key = set_event_key(&mut app.client, &class.class_id, "", false)
        .await
        .unwrap()
        .key
        .unwrap();
    let text = app
        .client
        .render_notification(render(
            "Join {{ClassTitle}} ({{ClassStart}} - {{ClassEnd}}) with {{EventTrainingKey}}.",
        ))
        .await
        .unwrap()
        .into_inner()
        .text;
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
        app.client
            .render_notification(render("Hi {{StudentName}}"))
            .await,
        Code::InvalidArgument,
        "UNKNOWN_PLACEHOLDER",
    );
    assert_eq!(error_metadata(&s, "placeholder"), "StudentName");
    let s = assert_status(
        app.client
            .render_notification(render("Hi {{ClassTitle"))
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(invalid_field(&s), "template");
    let other = pb::RenderNotificationRequest {
        class_id: uuid(),
        template: "{{ClassTitle}}".into(),
    };
    assert_status(
        app.client.render_notification(other).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
}

#[tokio::test]
async fn a_dump_of_the_keys_table_holds_no_plaintext_code() {
    let mut app = KeyApp::start().await;
    let profile = create_profile(&mut app).await;
    let pool = generate_pool(&mut app.client, &profile.profile_id, 100, 1).await;
    let class = create_class(&mut app, 10).await;
    class_keys(&mut app.client, &class.class_id, 5)
        .await
        .unwrap();
    set_event_key(&mut app.client, &class.class_id, "Secret-Event-Code", false)
        .await
        .unwrap();

    let mut codes = list_all(
        &mut app.client,
        pool_scope(&pool.pool_id),
        pb::KeyStatus::Unspecified,
        1000,
    )
    .await;
    codes.extend(
        list_all(
            &mut app.client,
            class_scope(&class.class_id),
            pb::KeyStatus::Unspecified,
            1000,
        )
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

#[tokio::test]
async fn an_unreachable_enrollment_service_is_unavailable() {
    let database_url = fresh_database().await;
    // Nothing listens on port 1.
    let service = spawn_key_issuance(&database_url, "http://127.0.0.1:1").await;
    let mut client = Client::new(service.channel().await);
    assert_status(
        class_keys(&mut client, &uuid(), 1).await,
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
