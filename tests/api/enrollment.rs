//! EnrollmentService over real gRPC against real PostgreSQL: every RPC's happy
//! path, every bad input's status and reason, and the capacity guard under
//! concurrency.

use std::collections::HashSet;

use chrono::{Duration, Utc};
use futures::future::join_all;
use tonic::Code;
use trainingkeys_proto::time::to_timestamp;
use trainingkeys_proto::v1 as pb;
use trainingkeys_tests::{
    TestApp, assert_invalid_field, assert_status, class_request, org, reason, uuid,
};

/// A change that makes a CreateClass request invalid.
type Mutation = Box<dyn Fn(&mut pb::CreateClassRequest)>;

#[tokio::test]
async fn users_are_get_or_create_by_case_insensitive_email() {
    let app = TestApp::start(0).await;
    let mut e = app.enrollment_client();
    let org = org();
    let first = e
        .register_user(pb::RegisterUserRequest {
            organization_id: org.clone(),
            email: "  Ada.Lovelace@Example.COM ".into(),
            display_name: "Ada".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let user = first.user.unwrap();
    assert_eq!(user.email, "ada.lovelace@example.com");

    let again = e
        .register_user(pb::RegisterUserRequest {
            organization_id: org.clone(),
            email: "ADA.LOVELACE@example.com".into(),
            display_name: "Someone else".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.user.as_ref().unwrap().user_id, user.user_id);
    assert_eq!(again.user.unwrap().display_name, "Ada");

    // Same email in another organization is another user.
    let other = app.user(&self::org(), "ada.lovelace@example.com").await;
    assert_ne!(other.user_id, user.user_id);

    let fetched = e
        .get_user(pb::GetUserRequest {
            user_id: user.user_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(fetched.into_inner().user.unwrap(), user);

    // Concurrent registrations of one new email make one user.
    let calls = (0..20).map(|_| async { app.user(&org, "herd@example.com").await.user_id });
    let ids: HashSet<String> = join_all(calls).await.into_iter().collect();
    assert_eq!(ids.len(), 1);
}

#[tokio::test]
async fn classes_are_created_read_and_updated() {
    let app = TestApp::start(0).await;
    let org = org();
    let class = app.class(&org, 3).await;
    assert_eq!(
        (class.max_students, class.enrolled_count, class.seats_left),
        (3, 0, 3)
    );
    let end = class.end_time.unwrap();
    assert_eq!(
        class.lab_access_end_time.unwrap().seconds,
        end.seconds + 7 * 86_400
    );
    assert_eq!(app.get_class(&class.class_id).await, class);

    let user = app.user(&org, "a@example.com").await;
    app.enroll(&class.class_id, &user.user_id).await.unwrap();
    let new_start = Utc::now() + Duration::days(10);
    let updated = app
        .update_class(pb::UpdateClassRequest {
            class_id: class.class_id.clone(),
            title: Some("Advanced Rust".into()),
            start_time: Some(to_timestamp(new_start)),
            end_time: Some(to_timestamp(new_start + Duration::days(1))),
            max_students: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(updated.title, "Advanced Rust");
    assert_eq!(updated.course_id, class.course_id, "unset fields stay");
    assert_eq!(
        (
            updated.max_students,
            updated.enrolled_count,
            updated.seats_left
        ),
        (1, 1, 0)
    );
    assert_eq!(updated.start_time.unwrap().seconds, new_start.timestamp());
}

#[tokio::test]
async fn class_input_is_checked() {
    let app = TestApp::start(0).await;
    let org = org();
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "organization_id",
            Box::new(|r| r.organization_id = "bad org!".into()),
        ),
        ("title", Box::new(|r| r.title = "   ".into())),
        ("title", Box::new(|r| r.title = "x".repeat(201))),
        ("course_id", Box::new(|r| r.course_id.clear())),
        ("start_time", Box::new(|r| r.start_time = None)),
        ("end_time", Box::new(|r| r.end_time = None)),
        ("end_time", Box::new(|r| r.end_time = r.start_time)),
        ("max_students", Box::new(|r| r.max_students = 0)),
        ("max_students", Box::new(|r| r.max_students = -5)),
        ("lab_access_days", Box::new(|r| r.lab_access_days = -1)),
        (
            "start_time",
            Box::new(|r| r.start_time.as_mut().unwrap().nanos = -1),
        ),
    ];
    for (field, mutate) in cases {
        let mut request = class_request(&org, 10);
        mutate(&mut request);
        assert_invalid_field(app.enrollment_client().create_class(request).await, field);
    }

    let class = app.class(&org, 2).await;
    for (r, field) in [
        (
            pb::UpdateClassRequest {
                class_id: "nope".into(),
                ..Default::default()
            },
            "class_id",
        ),
        (
            pb::UpdateClassRequest {
                class_id: class.class_id.clone(),
                max_students: Some(0),
                ..Default::default()
            },
            "max_students",
        ),
        (
            pb::UpdateClassRequest {
                class_id: class.class_id.clone(),
                end_time: class.start_time,
                ..Default::default()
            },
            "end_time",
        ),
        (
            pb::UpdateClassRequest {
                class_id: class.class_id.clone(),
                title: Some(String::new()),
                ..Default::default()
            },
            "title",
        ),
    ] {
        assert_invalid_field(app.update_class(r).await, field);
    }
    let missing = uuid();
    assert_status(
        app.update_class(pb::UpdateClassRequest {
            class_id: missing.clone(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        app.try_get_class(&missing).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        app.try_get_class("123").await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );

    // Lowering the maximum below the enrolled count is refused and changes nothing.
    for i in 0..2 {
        let u = app.user(&org, &format!("s{i}@example.com")).await;
        app.enroll(&class.class_id, &u.user_id).await.unwrap();
    }
    assert_status(
        app.update_class(pb::UpdateClassRequest {
            class_id: class.class_id.clone(),
            title: Some("renamed".into()),
            max_students: Some(1),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "MAX_BELOW_ENROLLED",
    );
    let after = app.get_class(&class.class_id).await;
    assert_eq!(
        (
            after.title.as_str(),
            after.max_students,
            after.enrolled_count
        ),
        ("Rust for services", 2, 2)
    );
}

#[tokio::test]
async fn user_input_is_checked() {
    let app = TestApp::start(0).await;
    let mut e = app.enrollment_client();
    for (email, org, field) in [
        ("not-an-email", "acme", "email"),
        ("", "acme", "email"),
        ("a@b", "acme", "email"),
        ("a@example.com", "", "organization_id"),
    ] {
        let request = pb::RegisterUserRequest {
            organization_id: org.into(),
            email: email.into(),
            display_name: String::new(),
            ..Default::default()
        };
        assert_invalid_field(e.register_user(request).await, field);
    }
    assert_status(
        e.get_user(pb::GetUserRequest {
            user_id: String::new(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_status(
        e.get_user(pb::GetUserRequest {
            user_id: uuid(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
}

#[tokio::test]
async fn enroll_cancel_and_roster() {
    let app = TestApp::start(0).await;
    let mut e = app.enrollment_client();
    let org = org();
    let class = app.class(&org, 1).await;
    let ada = app.user(&org, "ada@example.com").await;
    let bob = app.user(&org, "bob@example.com").await;
    let key_id = uuid();

    // Grants naming a key are the redemption service's.
    let first = app
        .internal_enrollment_client()
        .enroll(pb::EnrollRequest {
            class_id: class.class_id.clone(),
            user_id: ada.user_id.clone(),
            source_key_id: key_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.already_enrolled);
    let enrollment = first.enrollment.unwrap();
    assert_eq!(enrollment.source_key_id, key_id);
    assert_eq!(enrollment.status, pb::EnrollmentStatus::Active as i32);

    let again = app.enroll(&class.class_id, &ada.user_id).await.unwrap();
    assert!(again.already_enrolled);
    assert_eq!(
        again.enrollment.unwrap().enrollment_id,
        enrollment.enrollment_id
    );

    assert_status(
        app.enroll(&class.class_id, &bob.user_id).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );

    let cancelled = app.cancel(&enrollment.enrollment_id).await.unwrap();
    assert!(!cancelled.already_cancelled);
    assert_eq!(
        cancelled.enrollment.unwrap().status,
        pb::EnrollmentStatus::Cancelled as i32
    );
    let twice = app.cancel(&enrollment.enrollment_id).await.unwrap();
    assert!(twice.already_cancelled, "cancelling again changes nothing");

    // The freed seat goes to the next student, and only one seat was freed.
    let bobs = app.enroll(&class.class_id, &bob.user_id).await.unwrap();
    assert!(!bobs.already_enrolled);
    assert_status(
        app.enroll(&class.class_id, &ada.user_id).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );

    let active = app.roster(&class.class_id, 10).await;
    assert_eq!(
        active
            .iter()
            .map(|e| e.user_id.as_str())
            .collect::<Vec<_>>(),
        vec![bob.user_id.as_str()]
    );
    let everything = e
        .list_enrollments(pb::ListEnrollmentsRequest {
            class_id: class.class_id.clone(),
            include_cancelled: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .enrollments;
    assert_eq!(everything.len(), 2);
    assert_eq!(everything[0].user_id, ada.user_id, "oldest first");
    let only_bob = e
        .list_enrollments(pb::ListEnrollmentsRequest {
            class_id: class.class_id.clone(),
            user_id: bob.user_id.clone(),
            include_cancelled: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .enrollments;
    assert_eq!(only_bob.len(), 1);
}

#[tokio::test]
async fn enroll_input_is_checked() {
    let app = TestApp::start(0).await;
    let mut e = app.enrollment_client();
    let org = org();
    let class = app.class(&org, 5).await;
    let user = app.user(&org, "u@example.com").await;
    let outsider = app.user(&self::org(), "u@example.com").await;
    let unknown = uuid();

    assert_status(
        app.enroll(&unknown, &user.user_id).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        app.enroll(&class.class_id, &unknown).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert_status(
        app.enroll("", &user.user_id).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_status(
        app.enroll(&class.class_id, "x").await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    let bad_key = pb::EnrollRequest {
        class_id: class.class_id.clone(),
        user_id: user.user_id.clone(),
        source_key_id: "k".into(),
        ..Default::default()
    };
    assert_invalid_field(e.enroll(bad_key).await, "source_key_id");
    assert_status(
        app.enroll(&class.class_id, &outsider.user_id).await,
        Code::FailedPrecondition,
        "ORGANIZATION_MISMATCH",
    );
    assert_status(
        app.cancel(&unknown).await,
        Code::NotFound,
        "ENROLLMENT_NOT_FOUND",
    );
    for (page_size, page_token, field) in [
        (-1, "", "page_size"),
        (1001, "", "page_size"),
        (10, "zz", "page_token"),
    ] {
        let request = pb::ListEnrollmentsRequest {
            class_id: class.class_id.clone(),
            page_size,
            page_token: page_token.into(),
            ..Default::default()
        };
        assert_invalid_field(e.list_enrollments(request).await, field);
    }
    assert_status(
        e.list_enrollments(pb::ListEnrollmentsRequest {
            class_id: unknown,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    // None of the failures wrote anything.
    assert_eq!(app.get_class(&class.class_id).await.enrolled_count, 0);
}

#[tokio::test]
async fn roster_pages_are_stable_and_complete() {
    let app = TestApp::start(0).await;
    let org = org();
    let class = app.class(&org, 10).await;
    for i in 0..7 {
        let u = app.user(&org, &format!("p{i}@example.com")).await;
        app.enroll(&class.class_id, &u.user_id).await.unwrap();
    }
    let paged = app.roster(&class.class_id, 3).await;
    let whole = app.roster(&class.class_id, 100).await;
    assert_eq!(paged.len(), 7);
    assert_eq!(paged, whole);
}

#[tokio::test]
async fn capacity_guard_holds_under_200_concurrent_enrollments() {
    let app = TestApp::start(0).await;
    let org = org();
    let class = app.class(&org, 50).await;
    let users = app.users(&org, 200).await;
    app.statements().await;

    let results = join_all(users.iter().map(|u| app.enroll(&class.class_id, u))).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let full = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted && reason(s) == "CLASS_FULL"))
        .count();
    assert_eq!(
        (ok, full),
        (50, 150),
        "{:?}",
        results.iter().find(|r| r
            .as_ref()
            .is_err_and(|s| s.code() != Code::ResourceExhausted))
    );

    let class = app.get_class(&class.class_id).await;
    assert_eq!((class.enrolled_count, class.seats_left), (50, 0));
    assert_eq!(
        app.active_rows(&class.class_id).await,
        50,
        "seat count equals the roster"
    );
    assert_eq!(app.roster(&class.class_id, 7).await.len(), 50);

    // Concurrent seats are taken together: a few statements (commits), not
    // one each queued on the class row.
    let (calls, rows): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(calls), 0)::bigint, coalesce(sum(rows), 0)::bigint
         FROM public.pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND query LIKE 'WITH class AS%'",
    )
    .fetch_one(&mut app.db().await)
    .await
    .unwrap();
    assert_eq!(rows, 50, "every seat was taken by a group statement");
    assert!(calls < 25, "50 seats took {calls} group statements");
}

#[tokio::test]
async fn one_user_enrolling_20_times_concurrently_takes_one_seat() {
    let app = TestApp::start(0).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let user = app.user(&org, "eager@example.com").await;
    let results = join_all(
        (0..20).map(|_| async { app.enroll(&class.class_id, &user.user_id).await.unwrap() }),
    )
    .await;
    assert_eq!(results.iter().filter(|r| !r.already_enrolled).count(), 1);
    let ids: HashSet<_> = results
        .iter()
        .map(|r| r.enrollment.as_ref().unwrap().enrollment_id.clone())
        .collect();
    assert_eq!(ids.len(), 1);
    let class = app.get_class(&class.class_id).await;
    assert_eq!(class.enrolled_count, 1);
    let mut db = app.db().await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM enrollment.enrollments WHERE class_id = $1::uuid")
            .bind(&class.class_id)
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn profiles_and_subscriptions() {
    let app = TestApp::start(0).await;
    let mut e = app.enrollment_client();
    let org = org();
    let profile = e
        .create_subscription_profile(pb::CreateSubscriptionProfileRequest {
            organization_id: org.clone(),
            name: "All access".into(),
            course_ids: vec!["A".into(), "B".into(), "A".into()],
            duration_days: 30,
        })
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(profile.course_ids, vec!["A", "B"]);
    let fetched = e
        .get_subscription_profile(pb::GetSubscriptionProfileRequest {
            profile_id: profile.profile_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(fetched.into_inner().profile.unwrap(), profile);

    let user = app.user(&org, "sub@example.com").await;
    let assign = |key: &str| pb::AssignSubscriptionRequest {
        profile_id: profile.profile_id.clone(),
        user_id: user.user_id.clone(),
        source_key_id: key.into(),
        ..Default::default()
    };
    let key = uuid();
    let first = app
        .internal_enrollment_client()
        .assign_subscription(assign(&key))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.already_assigned);
    let sub = first.subscription.unwrap();
    assert!(sub.active);
    assert_eq!(sub.source_key_id, key);
    assert_eq!(
        sub.expires_at.unwrap().seconds - sub.starts_at.unwrap().seconds,
        30 * 86_400
    );

    // Assigning the same profile again while it runs returns it unchanged,
    // also under concurrency: no second subscription, no extension.
    let again = join_all((0..10).map(|_| {
        let mut c = app.enrollment_client();
        let r = assign("");
        async move { c.assign_subscription(r).await.unwrap().into_inner() }
    }))
    .await;
    assert!(
        again
            .iter()
            .all(|r| r.already_assigned && r.subscription.as_ref() == Some(&sub))
    );
    let listed = e
        .list_subscriptions(pb::ListSubscriptionsRequest {
            user_id: user.user_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.subscriptions, vec![sub]);
    assert!(listed.next_page_token.is_empty());

    // Errors.
    for (r, field) in [
        (
            pb::CreateSubscriptionProfileRequest {
                organization_id: org.clone(),
                name: "n".into(),
                course_ids: vec![],
                duration_days: 1,
            },
            "course_ids",
        ),
        (
            pb::CreateSubscriptionProfileRequest {
                organization_id: org.clone(),
                name: "n".into(),
                course_ids: vec![String::new()],
                duration_days: 1,
            },
            "course_ids",
        ),
        (
            pb::CreateSubscriptionProfileRequest {
                organization_id: org.clone(),
                name: "n".into(),
                course_ids: vec!["A".into()],
                duration_days: 0,
            },
            "duration_days",
        ),
        (
            pb::CreateSubscriptionProfileRequest {
                organization_id: org.clone(),
                name: String::new(),
                course_ids: vec!["A".into()],
                duration_days: 1,
            },
            "name",
        ),
    ] {
        assert_invalid_field(e.create_subscription_profile(r).await, field);
    }
    let unknown = uuid();
    assert_status(
        e.get_subscription_profile(pb::GetSubscriptionProfileRequest {
            profile_id: unknown.clone(),
        })
        .await,
        Code::NotFound,
        "PROFILE_NOT_FOUND",
    );
    let assign_to = |profile_id: &str, user_id: &str| pb::AssignSubscriptionRequest {
        profile_id: profile_id.into(),
        user_id: user_id.into(),
        ..Default::default()
    };
    assert_status(
        e.assign_subscription(assign_to(&unknown, &user.user_id))
            .await,
        Code::NotFound,
        "PROFILE_NOT_FOUND",
    );
    assert_status(
        e.assign_subscription(assign_to(&profile.profile_id, &unknown))
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    let outsider = app.user(&self::org(), "x@example.com").await;
    assert_status(
        e.assign_subscription(assign_to(&profile.profile_id, &outsider.user_id))
            .await,
        Code::FailedPrecondition,
        "ORGANIZATION_MISMATCH",
    );
    assert_status(
        e.list_subscriptions(pb::ListSubscriptionsRequest {
            user_id: unknown,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
}
