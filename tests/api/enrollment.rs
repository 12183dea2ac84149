//! EnrollmentService over real gRPC against real PostgreSQL: every RPC's happy
//! path, every bad input's status and reason, and the capacity guard under
//! concurrency.

use std::collections::HashSet;

use chrono::{Duration, Utc};
use futures::future::join_all;
use tonic::Code;
use tonic::transport::Channel;
use trainingkeys_proto::time::to_timestamp;
use trainingkeys_proto::v1::{self as pb, enrollment_service_client::EnrollmentServiceClient};
use trainingkeys_tests::{EnrollmentApp, assert_status, invalid_field};

type Client = EnrollmentServiceClient<Channel>;
/// A change that makes a CreateClass request invalid.
type Mutation = Box<dyn Fn(&mut pb::CreateClassRequest)>;

fn org() -> String {
    format!("org-{}", uuid::Uuid::new_v4().simple())
}

fn class_request(organization_id: &str, max_students: i32) -> pb::CreateClassRequest {
    let start = Utc::now() + Duration::days(1);
    pb::CreateClassRequest {
        organization_id: organization_id.into(),
        title: "Rust for services".into(),
        course_id: "RUST-101".into(),
        start_time: Some(to_timestamp(start)),
        end_time: Some(to_timestamp(start + Duration::days(2))),
        max_students,
        lab_access_days: 7,
    }
}

async fn create_class(client: &mut Client, organization_id: &str, max_students: i32) -> pb::Class {
    client
        .create_class(class_request(organization_id, max_students))
        .await
        .unwrap()
        .into_inner()
        .class
        .unwrap()
}

async fn register(client: &mut Client, organization_id: &str, email: &str) -> pb::User {
    client
        .register_user(pb::RegisterUserRequest {
            organization_id: organization_id.into(),
            email: email.into(),
            display_name: "Student".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

async fn enroll(
    client: &mut Client,
    class_id: &str,
    user_id: &str,
) -> Result<pb::EnrollResponse, tonic::Status> {
    client
        .enroll(pb::EnrollRequest {
            class_id: class_id.into(),
            user_id: user_id.into(),
            source_key_id: String::new(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn roster(client: &mut Client, class_id: &str, page_size: i32) -> Vec<pb::Enrollment> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_enrollments(pb::ListEnrollmentsRequest {
                class_id: class_id.into(),
                page_size,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.enrollments);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn users_are_get_or_create_by_case_insensitive_email() {
    let mut app = EnrollmentApp::start().await;
    let org = org();
    let first = app
        .client
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

    let again = app
        .client
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
    let other = register(&mut app.client, &self::org(), "ada.lovelace@example.com").await;
    assert_ne!(other.user_id, user.user_id);

    let fetched = app
        .client
        .get_user(pb::GetUserRequest {
            user_id: user.user_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(fetched.into_inner().user.unwrap(), user);

    // Concurrent registrations of one new email make one user.
    let email = "herd@example.com";
    let calls = (0..20).map(|_| {
        let mut c = app.client.clone();
        let org = org.clone();
        async move { register(&mut c, &org, email).await.user_id }
    });
    let ids: HashSet<String> = join_all(calls).await.into_iter().collect();
    assert_eq!(ids.len(), 1);
}

#[tokio::test]
async fn classes_are_created_read_and_updated() {
    let mut app = EnrollmentApp::start().await;
    let org = org();
    let class = create_class(&mut app.client, &org, 3).await;
    assert_eq!(
        (class.max_students, class.enrolled_count, class.seats_left),
        (3, 0, 3)
    );
    let end = class.end_time.unwrap();
    assert_eq!(
        class.lab_access_end_time.unwrap().seconds,
        end.seconds + 7 * 86_400
    );

    let fetched = app
        .client
        .get_class(pb::GetClassRequest {
            class_id: class.class_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(fetched.into_inner().class.unwrap(), class);

    let user = register(&mut app.client, &org, "a@example.com").await;
    enroll(&mut app.client, &class.class_id, &user.user_id)
        .await
        .unwrap();
    let new_start = Utc::now() + Duration::days(10);
    let updated = app
        .client
        .update_class(pb::UpdateClassRequest {
            class_id: class.class_id.clone(),
            title: Some("Advanced Rust".into()),
            start_time: Some(to_timestamp(new_start)),
            end_time: Some(to_timestamp(new_start + Duration::days(1))),
            max_students: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .class
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
    let mut app = EnrollmentApp::start().await;
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
        let status = assert_status(
            app.client.create_class(request).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&status), field);
    }

    let class = create_class(&mut app.client, &org, 2).await;
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
        let status = assert_status(
            app.client.update_class(r).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&status), field);
    }
    let missing = uuid::Uuid::new_v4().to_string();
    assert_status(
        app.client
            .update_class(pb::UpdateClassRequest {
                class_id: missing.clone(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        app.client
            .get_class(pb::GetClassRequest { class_id: missing })
            .await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        app.client
            .get_class(pb::GetClassRequest {
                class_id: "123".into(),
            })
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );

    // Lowering the maximum below the enrolled count is refused and changes nothing.
    for i in 0..2 {
        let u = register(&mut app.client, &org, &format!("s{i}@example.com")).await;
        enroll(&mut app.client, &class.class_id, &u.user_id)
            .await
            .unwrap();
    }
    assert_status(
        app.client
            .update_class(pb::UpdateClassRequest {
                class_id: class.class_id.clone(),
                title: Some("renamed".into()),
                max_students: Some(1),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "MAX_BELOW_ENROLLED",
    );
    let after = app
        .client
        .get_class(pb::GetClassRequest {
            class_id: class.class_id,
        })
        .await
        .unwrap()
        .into_inner()
        .class
        .unwrap();
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
    let mut app = EnrollmentApp::start().await;
    for (email, org, field) in [
        ("not-an-email", "acme", "email"),
        ("", "acme", "email"),
        ("a@b", "acme", "email"),
        ("a@example.com", "", "organization_id"),
    ] {
        let status = assert_status(
            app.client
                .register_user(pb::RegisterUserRequest {
                    organization_id: org.into(),
                    email: email.into(),
                    display_name: String::new(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&status), field);
    }
    assert_status(
        app.client
            .get_user(pb::GetUserRequest {
                user_id: String::new(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_status(
        app.client
            .get_user(pb::GetUserRequest {
                user_id: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
}

#[tokio::test]
async fn enroll_cancel_and_roster() {
    let mut app = EnrollmentApp::start().await;
    let org = org();
    let class = create_class(&mut app.client, &org, 1).await;
    let ada = register(&mut app.client, &org, "ada@example.com").await;
    let bob = register(&mut app.client, &org, "bob@example.com").await;
    let key_id = uuid::Uuid::new_v4().to_string();

    let first = app
        .client
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

    let again = enroll(&mut app.client, &class.class_id, &ada.user_id)
        .await
        .unwrap();
    assert!(again.already_enrolled);
    assert_eq!(
        again.enrollment.unwrap().enrollment_id,
        enrollment.enrollment_id
    );

    assert_status(
        enroll(&mut app.client, &class.class_id, &bob.user_id).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );

    let cancelled = app
        .client
        .cancel_enrollment(pb::CancelEnrollmentRequest {
            enrollment_id: enrollment.enrollment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!cancelled.already_cancelled);
    assert_eq!(
        cancelled.enrollment.unwrap().status,
        pb::EnrollmentStatus::Cancelled as i32
    );
    let twice = app
        .client
        .cancel_enrollment(pb::CancelEnrollmentRequest {
            enrollment_id: enrollment.enrollment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(twice.already_cancelled, "cancelling again changes nothing");

    // The freed seat goes to the next student, and only one seat was freed.
    let bobs = enroll(&mut app.client, &class.class_id, &bob.user_id)
        .await
        .unwrap();
    assert!(!bobs.already_enrolled);
    assert_status(
        enroll(&mut app.client, &class.class_id, &ada.user_id).await,
        Code::ResourceExhausted,
        "CLASS_FULL",
    );

    let active = roster(&mut app.client, &class.class_id, 10).await;
    assert_eq!(
        active
            .iter()
            .map(|e| e.user_id.as_str())
            .collect::<Vec<_>>(),
        vec![bob.user_id.as_str()]
    );
    let everything = app
        .client
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
    let only_bob = app
        .client
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
    let mut app = EnrollmentApp::start().await;
    let org = org();
    let class = create_class(&mut app.client, &org, 5).await;
    let user = register(&mut app.client, &org, "u@example.com").await;
    let outsider = register(&mut app.client, &self::org(), "u@example.com").await;
    let unknown = uuid::Uuid::new_v4().to_string();

    assert_status(
        enroll(&mut app.client, &unknown, &user.user_id).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        enroll(&mut app.client, &class.class_id, &unknown).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert_status(
        enroll(&mut app.client, "", &user.user_id).await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_status(
        enroll(&mut app.client, &class.class_id, "x").await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    let status = assert_status(
        app.client
            .enroll(pb::EnrollRequest {
                class_id: class.class_id.clone(),
                user_id: user.user_id.clone(),
                source_key_id: "k".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_FIELD",
    );
    assert_eq!(invalid_field(&status), "source_key_id");
    assert_status(
        enroll(&mut app.client, &class.class_id, &outsider.user_id).await,
        Code::FailedPrecondition,
        "ORGANIZATION_MISMATCH",
    );
    assert_status(
        app.client
            .cancel_enrollment(pb::CancelEnrollmentRequest {
                enrollment_id: unknown.clone(),
            })
            .await,
        Code::NotFound,
        "ENROLLMENT_NOT_FOUND",
    );
    for (page_size, page_token, field) in [
        (-1, "", "page_size"),
        (1001, "", "page_size"),
        (10, "zz", "page_token"),
    ] {
        let status = assert_status(
            app.client
                .list_enrollments(pb::ListEnrollmentsRequest {
                    class_id: class.class_id.clone(),
                    page_size,
                    page_token: page_token.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&status), field);
    }
    assert_status(
        app.client
            .list_enrollments(pb::ListEnrollmentsRequest {
                class_id: unknown,
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    // None of the failures wrote anything.
    let class = app
        .client
        .get_class(pb::GetClassRequest {
            class_id: class.class_id,
        })
        .await
        .unwrap()
        .into_inner()
        .class
        .unwrap();
    assert_eq!(class.enrolled_count, 0);
}

#[tokio::test]
async fn roster_pages_are_stable_and_complete() {
    let mut app = EnrollmentApp::start().await;
    let org = org();
    let class = create_class(&mut app.client, &org, 10).await;
    for i in 0..7 {
        let u = register(&mut app.client, &org, &format!("p{i}@example.com")).await;
        enroll(&mut app.client, &class.class_id, &u.user_id)
            .await
            .unwrap();
    }
    let paged = roster(&mut app.client, &class.class_id, 3).await;
    let whole = roster(&mut app.client, &class.class_id, 100).await;
    assert_eq!(paged.len(), 7);
    assert_eq!(paged, whole);
}

#[tokio::test]
async fn capacity_guard_holds_under_200_concurrent_enrollments() {
    let mut app = EnrollmentApp::start().await;
    let org = org();
    let class = create_class(&mut app.client, &org, 50).await;
    let users = join_all((0..200).map(|i| {
        let mut c = app.client.clone();
        let org = org.clone();
        async move {
            register(&mut c, &org, &format!("student{i}@example.com"))
                .await
                .user_id
        }
    }))
    .await;

    let results = join_all(users.iter().map(|user_id| {
        let mut c = app.client.clone();
        let class_id = class.class_id.clone();
        let user_id = user_id.clone();
        async move { enroll(&mut c, &class_id, &user_id).await }
    }))
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let full = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted && trainingkeys_tests::reason(s) == "CLASS_FULL"))
        .count();
    assert_eq!(
        (ok, full),
        (50, 150),
        "{:?}",
        results.iter().find(|r| r
            .as_ref()
            .is_err_and(|s| s.code() != Code::ResourceExhausted))
    );

    let class = app
        .client
        .get_class(pb::GetClassRequest {
            class_id: class.class_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .class
        .unwrap();
    assert_eq!((class.enrolled_count, class.seats_left), (50, 0));
    let mut db = app.db().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM enrollment.enrollments WHERE class_id = $1::uuid AND cancelled_at IS NULL")
        .bind(&class.class_id)
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(rows, 50, "seat count equals the roster");
    assert_eq!(roster(&mut app.client, &class.class_id, 7).await.len(), 50);
}

#[tokio::test]
async fn one_user_enrolling_20_times_concurrently_takes_one_seat() {
    let mut app = EnrollmentApp::start().await;
    let org = org();
    let class = create_class(&mut app.client, &org, 5).await;
    let user = register(&mut app.client, &org, "eager@example.com").await;
    let results = join_all((0..20).map(|_| {
        let mut c = app.client.clone();
        let (class_id, user_id) = (class.class_id.clone(), user.user_id.clone());
        async move { enroll(&mut c, &class_id, &user_id).await.unwrap() }
    }))
    .await;
    assert_eq!(results.iter().filter(|r| !r.already_enrolled).count(), 1);
    let ids: HashSet<_> = results
        .iter()
        .map(|r| r.enrollment.as_ref().unwrap().enrollment_id.clone())
        .collect();
    assert_eq!(ids.len(), 1);
    let class = app
        .client
        .get_class(pb::GetClassRequest {
            class_id: class.class_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .class
        .unwrap();
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
    let mut app = EnrollmentApp::start().await;
    let org = org();
    let profile = app
        .client
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
    let fetched = app
        .client
        .get_subscription_profile(pb::GetSubscriptionProfileRequest {
            profile_id: profile.profile_id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(fetched.into_inner().profile.unwrap(), profile);

    let user = register(&mut app.client, &org, "sub@example.com").await;
    let assign = |key: &str| pb::AssignSubscriptionRequest {
        profile_id: profile.profile_id.clone(),
        user_id: user.user_id.clone(),
        source_key_id: key.into(),
        ..Default::default()
    };
    let key = uuid::Uuid::new_v4().to_string();
    let first = app
        .client
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
        let mut c = app.client.clone();
        let r = assign("");
        async move { c.assign_subscription(r).await.unwrap().into_inner() }
    }))
    .await;
    assert!(
        again
            .iter()
            .all(|r| r.already_assigned && r.subscription.as_ref() == Some(&sub))
    );
    let listed = app
        .client
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
        let status = assert_status(
            app.client.create_subscription_profile(r).await,
            Code::InvalidArgument,
            "INVALID_FIELD",
        );
        assert_eq!(invalid_field(&status), field);
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_status(
        app.client
            .get_subscription_profile(pb::GetSubscriptionProfileRequest {
                profile_id: unknown.clone(),
            })
            .await,
        Code::NotFound,
        "PROFILE_NOT_FOUND",
    );
    assert_status(
        app.client
            .assign_subscription(pb::AssignSubscriptionRequest {
                profile_id: unknown.clone(),
                user_id: user.user_id.clone(),
                source_key_id: String::new(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "PROFILE_NOT_FOUND",
    );
    assert_status(
        app.client
            .assign_subscription(pb::AssignSubscriptionRequest {
                profile_id: profile.profile_id.clone(),
                user_id: unknown.clone(),
                source_key_id: String::new(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    let outsider = register(&mut app.client, &self::org(), "x@example.com").await;
    assert_status(
        app.client
            .assign_subscription(pb::AssignSubscriptionRequest {
                profile_id: profile.profile_id.clone(),
                user_id: outsider.user_id,
                source_key_id: String::new(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "ORGANIZATION_MISMATCH",
    );
    assert_status(
        app.client
            .list_subscriptions(pb::ListSubscriptionsRequest {
                user_id: unknown,
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
}
