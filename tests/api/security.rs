//! Who may do what: the policy table against the real services over TLS,
//! every way a bearer token can be wrong, service identities from client
//! certificates, and certificates and signing keys rotated without a
//! restart.

use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::Channel;
use trainingkeys_devtools::{Ca, Claims, Signer};
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use trainingkeys_proto::v1::key_issuance_service_client::KeyIssuanceServiceClient;
use trainingkeys_shared::policy::{Internal, POLICY, Role};
use trainingkeys_tests::pki::{TestAuth, pki};
use trainingkeys_tests::{Spawned, TestApp, assert_status, org};

/// Calls `path` with an empty request over `channel`, with `auth`'s token:
/// the status code of the answer (OK if a message came back). An empty
/// message decodes as any request, so the policy, not the request, decides
/// whether the call gets past authorization.
async fn code_of(channel: Channel, auth: TestAuth, path: &'static str) -> Code {
    let mut grpc = tonic::client::Grpc::new(tonic::service::interceptor::InterceptedService::new(
        channel, auth,
    ));
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = http::uri::PathAndQuery::from_static(path);
    match grpc
        .server_streaming(tonic::Request::new(()), path, codec)
        .await
    {
        Err(status) => status.code(),
        Ok(response) => match response.into_inner().message().await {
            Err(status) => status.code(),
            Ok(_) => Code::Ok,
        },
    }
}

/// The service of the app that serves `path`.
fn server<'a>(app: &'a TestApp, path: &str) -> &'a Spawned {
    if path.contains("EnrollmentService") {
        &app.enrollment_service
    } else if path.contains("KeyIssuanceService") {
        &app.keys_service
    } else {
        &app.replicas[0]
    }
}

fn refused(code: Code) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied)
}

/// Every method, for every role, for each service identity, and for a
/// caller with no credential: allowed callers get past authorization (the
/// empty request then fails on its own merits), everyone else gets
/// PERMISSION_DENIED, and no credential at all gets UNAUTHENTICATED.
#[tokio::test]
async fn every_method_answers_every_caller_as_the_policy_table_says() {
    let started = Instant::now();
    let app = TestApp::start(1).await;
    let org = org();
    let mut checked = 0;
    for rule in POLICY {
        let service = server(&app, rule.path);
        for role in Role::ALL {
            let auth = TestAuth::as_role("someone", &[role], &[&org]);
            let code = code_of(service.channel_as("test-client"), auth, rule.path).await;
            if rule.scope(role).is_some() {
                assert!(!refused(code), "{} as {role:?}: {code:?}", rule.path);
            } else {
                assert_eq!(code, Code::PermissionDenied, "{} as {role:?}", rule.path);
            }
            checked += 1;
        }
        for (identity, internal) in [
            ("redemption", Internal::Redemption),
            ("key-issuance", Internal::KeyIssuance),
        ] {
            let code = code_of(service.channel_as(identity), TestAuth::none(), rule.path).await;
            if rule.services.contains(&internal) {
                assert!(!refused(code), "{} as {identity}: {code:?}", rule.path);
            } else {
                assert_eq!(code, Code::PermissionDenied, "{} as {identity}", rule.path);
            }
            checked += 1;
        }
        let anonymous = code_of(
            service.channel_as("test-client"),
            TestAuth::none(),
            rule.path,
        )
        .await;
        assert_eq!(anonymous, Code::Unauthenticated, "{} anonymous", rule.path);
        checked += 1;
    }
    println!(
        "policy matrix: {checked} calls over {} methods in {:.1} s",
        POLICY.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The table covers every method the contract defines, and nothing else:
/// a method added to a proto without a policy entry fails here (and is
/// refused by the servers meanwhile).
#[test]
fn the_policy_table_covers_the_whole_contract() {
    use prost::Message as _;
    let set =
        prost_types::FileDescriptorSet::decode(trainingkeys_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut contract: Vec<String> = set
        .file
        .iter()
        .filter(|f| f.package() == "trainingkeys.v1")
        .flat_map(|f| {
            f.service.iter().flat_map(|s| {
                s.method
                    .iter()
                    .map(move |m| format!("/trainingkeys.v1.{}/{}", s.name(), m.name()))
            })
        })
        .collect();
    let mut table: Vec<String> = POLICY.iter().map(|r| r.path.to_owned()).collect();
    contract.sort();
    table.sort();
    assert_eq!(contract, table);
}

/// The README renders the table as `tk-dev policy` prints it.
#[test]
fn the_readme_shows_the_policy_table() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    assert!(
        readme.contains(&trainingkeys_shared::policy::markdown()),
        "README.md's roles table differs from `tk-dev policy`"
    );
}

fn claims(sub: &str, orgs: &[&str], roles: &[Role]) -> Claims {
    let now = trainingkeys_devtools::now();
    Claims {
        sub: sub.into(),
        orgs: orgs.iter().map(|o| (*o).into()).collect(),
        roles: roles.iter().map(|r| r.name().into()).collect(),
        iss: trainingkeys_devtools::ISSUER.into(),
        aud: trainingkeys_devtools::AUDIENCE.into(),
        exp: now + 600,
        nbf: Some(now - 1),
    }
}

/// Every way a token can be wrong gets UNAUTHENTICATED with the reason
/// UNAUTHENTICATED; the right token, and one inside the clock-skew
/// allowance, pass.
#[tokio::test]
async fn tokens_are_verified_signature_issuer_audience_and_times() {
    let app = TestApp::start(0).await;
    let org = org();
    let signer = &pki().signer;
    let get = |auth: TestAuth| {
        let channel = app.enrollment_service.channel_as("test-client");
        async move {
            let mut client = EnrollmentServiceClient::with_interceptor(channel, auth);
            client
                .get_class(pb::GetClassRequest {
                    class_id: trainingkeys_tests::uuid(),
                })
                .await
        }
    };
    let good = claims("p", &[&org], &[Role::ProvisioningService]);
    let token = |c: &Claims| TestAuth::token(&signer.sign(c).unwrap());
    // The right token reaches the service: the class is simply missing.
    assert_status(get(token(&good)).await, Code::NotFound, "CLASS_NOT_FOUND");
    let now = trainingkeys_devtools::now();
    let skewed = Claims {
        exp: now - 10,
        ..good.clone()
    };
    assert_status(get(token(&skewed)).await, Code::NotFound, "CLASS_NOT_FOUND");

    let other_key = Signer::generate().unwrap();
    let wrong: Vec<(&str, TestAuth)> = vec![
        ("no token", TestAuth::none()),
        ("not a JWT", TestAuth::token("hello")),
        (
            "expired",
            token(&Claims {
                exp: now - 120,
                ..good.clone()
            }),
        ),
        (
            "not yet valid",
            token(&Claims {
                nbf: Some(now + 120),
                ..good.clone()
            }),
        ),
        (
            "another issuer",
            token(&Claims {
                iss: "someone-else".into(),
                ..good.clone()
            }),
        ),
        (
            "another audience",
            token(&Claims {
                aud: "another-service".into(),
                ..good.clone()
            }),
        ),
        (
            "signed by a key not in the JWKS",
            TestAuth::token(&other_key.sign(&good).unwrap()),
        ),
        ("alg none", TestAuth::token(&unsigned(&good))),
        (
            "tampered claims",
            TestAuth::token(&tampered(&signer.sign(&good).unwrap())),
        ),
    ];
    for (what, auth) in wrong {
        let answer = get(auth).await;
        assert!(
            matches!(&answer, Err(s) if s.code() == Code::Unauthenticated),
            "{what}: {answer:?}"
        );
        assert_status(answer, Code::Unauthenticated, "UNAUTHENTICATED");
    }
}

fn b64(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    // base64url without padding, by hand: a test must not trust the library it tests.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            let _ = out.write_char(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A token with `alg: none` and no signature.
fn unsigned(claims: &Claims) -> String {
    format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(&serde_json::to_vec(claims).unwrap())
    )
}

/// `token` with its claims replaced (more roles), the signature kept.
fn tampered(token: &str) -> String {
    let mut parts = token.split('.');
    let header = parts.next().unwrap();
    let _claims = parts.next().unwrap();
    let signature = parts.next().unwrap();
    let mut forged = claims("p", &["any"], &Role::ALL);
    forged.exp += 1;
    format!(
        "{header}.{}.{signature}",
        b64(&serde_json::to_vec(&forged).unwrap())
    )
}

/// A service whose JWKS file is this test's own, re-read every second.
async fn enrollment_with_jwks(jwks: &str) -> (Spawned, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tk-jwks-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("jwks.json");
    std::fs::write(&file, jwks).unwrap();
    let database_url = trainingkeys_tests::fresh_database().await;
    let mut config = trainingkeys_enrollment::Config::for_tests(&database_url).unwrap();
    trainingkeys_tests::for_tests(&mut config.common, "enrollment");
    config.common.auth.jwks_file = Some(file.clone());
    config.common.tls.tls_reload_seconds = 1;
    (
        trainingkeys_tests::spawn::<trainingkeys_enrollment::Application>(config).await,
        file,
    )
}

/// RS256 and ES256 keys both verify; a signing key added to the JWKS file
/// is trusted within seconds, and one removed is no longer, without a
/// restart (the rotation the README describes).
#[tokio::test]
async fn signing_keys_rotate_through_the_jwks_file_without_a_restart() {
    let rsa_pem = include_str!("../fixtures/rsa-test-signing-key.pem");
    let rsa = Signer::from_pem(rsa_pem, jsonwebtoken::Algorithm::RS256).unwrap();
    let ec = Signer::generate().unwrap();
    let (service, file) = enrollment_with_jwks(&ec.jwks(&[]).unwrap()).await;
    let org = org();
    let good = claims("p", &[&org], &[Role::ProvisioningService]);
    let call = |signer: &Signer| {
        let auth = TestAuth::token(&signer.sign(&good).unwrap());
        let channel = service.channel_as("test-client");
        async move {
            EnrollmentServiceClient::with_interceptor(channel, auth)
                .get_class(pb::GetClassRequest {
                    class_id: trainingkeys_tests::uuid(),
                })
                .await
                .map_err(|s| s.code())
                .err()
        }
    };
    assert_eq!(call(&ec).await, Some(Code::NotFound));
    assert_eq!(call(&rsa).await, Some(Code::Unauthenticated));

    // Rotate in: both keys.
    std::fs::write(&file, ec.jwks(&[&rsa]).unwrap()).unwrap();
    assert!(
        trainingkeys_tests::eventually(Duration::from_secs(10), || async {
            call(&rsa).await == Some(Code::NotFound)
        })
        .await,
        "the RS256 key added to the JWKS was never trusted"
    );
    assert_eq!(call(&ec).await, Some(Code::NotFound));

    // Rotate out: the old EC key is gone. A malformed file meanwhile
    // changes nothing.
    std::fs::write(&file, "not json").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(call(&ec).await, Some(Code::NotFound));
    std::fs::write(&file, rsa.jwks(&[]).unwrap()).unwrap();
    assert!(
        trainingkeys_tests::eventually(Duration::from_secs(10), || async {
            call(&ec).await == Some(Code::Unauthenticated)
        })
        .await,
        "the EC key removed from the JWKS was still trusted"
    );
    assert_eq!(call(&rsa).await, Some(Code::NotFound));

    // An empty set revokes every signing key at once.
    std::fs::write(&file, r#"{"keys":[]}"#).unwrap();
    assert!(
        trainingkeys_tests::eventually(Duration::from_secs(10), || async {
            call(&rsa).await == Some(Code::Unauthenticated)
        })
        .await,
        "an empty JWKS left a key trusted"
    );
    service.stop().await;
}

/// Replacing a service's certificate files (a new CA, as in a rotation)
/// takes effect for new connections within seconds, without a restart: a
/// client that trusts only the new CA is refused before and served after.
#[tokio::test]
async fn certificates_are_reloaded_from_their_files_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("tk-certs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = pki().files("enrollment");
    let (live_cert, live_key, live_ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    std::fs::copy(pki().ca_file(), &live_ca).unwrap();
    let database_url = trainingkeys_tests::fresh_database().await;
    let mut config = trainingkeys_enrollment::Config::for_tests(&database_url).unwrap();
    trainingkeys_tests::for_tests(&mut config.common, "enrollment");
    config.common.tls.tls_cert_file = Some(live_cert.clone());
    config.common.tls.tls_key_file = Some(live_key.clone());
    config.common.tls.tls_ca_file = Some(live_ca.clone());
    config.common.tls.tls_reload_seconds = 1;
    let service = trainingkeys_tests::spawn::<trainingkeys_enrollment::Application>(config).await;

    // A new CA, and a client that trusts only it.
    let new_ca = Ca::new("rotated CA").unwrap();
    let leaf = new_ca.service("enrollment").unwrap();
    let client_leaf = new_ca.service("new-client").unwrap();
    let client_dir = dir.join("client");
    std::fs::create_dir_all(&client_dir).unwrap();
    std::fs::write(client_dir.join("cert.pem"), &client_leaf.cert_pem).unwrap();
    std::fs::write(client_dir.join("key.pem"), &client_leaf.key_pem).unwrap();
    std::fs::write(client_dir.join("ca.pem"), new_ca.cert_pem()).unwrap();
    let client_tls = trainingkeys_shared::tls::Tls::from_files(
        client_dir.join("cert.pem"),
        client_dir.join("key.pem"),
        client_dir.join("ca.pem"),
    )
    .unwrap();
    let health = || {
        let channel = trainingkeys_shared::server::channel(
            &service.url(),
            Duration::from_secs(5),
            Some(&client_tls),
        )
        .unwrap();
        async move {
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .is_ok()
        }
    };
    assert!(!health().await, "a client of another CA was served");

    std::fs::write(&live_key, &leaf.key_pem).unwrap();
    std::fs::write(&live_cert, &leaf.cert_pem).unwrap();
    std::fs::write(&live_ca, new_ca.cert_pem()).unwrap();
    assert!(
        trainingkeys_tests::eventually(Duration::from_secs(10), health).await,
        "the new certificate was never served"
    );
    service.stop().await;
}

/// The attack from the review: a caller who read a (key, redemption) pair
/// from ListKeys calls ReleaseKey to make a redeemed single-use key usable
/// again. Only the redemption service's certificate may; an operator's
/// token, another service's certificate and no credential are refused, and
/// the key stays redeemed.
#[tokio::test]
async fn only_the_redemption_service_may_release_a_key_use() {
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.class_keys(&class.class_id, 1).await.remove(0);
    let user = app.users(&org, 1).await.remove(0);
    app.redeem(
        0,
        trainingkeys_tests::as_user(&key.code, &user, &trainingkeys_tests::idem()),
    )
    .await
    .unwrap();
    let used = app.get_key(&key.key_id).await;
    let redemption_id = used.redemptions[0].redemption_id.clone();
    let release = pb::ReleaseKeyRequest {
        key_id: key.key_id.clone(),
        redemption_id: redemption_id.clone(),
        generation: 0,
    };
    assert_status(
        app.keys_client().release_key(release.clone()).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    let as_keys = KeyIssuanceServiceClient::new(app.keys_service.channel_as("key-issuance"))
        .release_key(release.clone())
        .await;
    assert_status(as_keys, Code::PermissionDenied, "PERMISSION_DENIED");
    let anonymous = KeyIssuanceServiceClient::new(app.keys_service.channel_as("test-client"))
        .release_key(release)
        .await;
    assert_status(anonymous, Code::Unauthenticated, "UNAUTHENTICATED");
    assert_eq!(
        app.get_key(&key.key_id).await.uses,
        1,
        "the use was released"
    );
}

/// A client certificate from another CA proves nothing: its connection is
/// refused in the handshake.
#[tokio::test]
async fn a_client_certificate_of_another_ca_is_refused() {
    let app = TestApp::start(0).await;
    let rogue = Ca::new("rogue").unwrap();
    let leaf = rogue.service("redemption").unwrap();
    let dir = std::env::temp_dir().join(format!("tk-rogue-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    // It trusts the real CA, so only the server can refuse it.
    let tls = trainingkeys_shared::tls::Tls::from_files(
        dir.join("cert.pem"),
        dir.join("key.pem"),
        pki().ca_file(),
    )
    .unwrap();
    let channel = trainingkeys_shared::server::channel(
        &app.keys_service.url(),
        Duration::from_secs(5),
        Some(&tls),
    )
    .unwrap();
    let answer = KeyIssuanceServiceClient::new(channel)
        .release_key(pb::ReleaseKeyRequest::default())
        .await;
    // Refused in the handshake: a transport failure, never an answer of the
    // service (which would carry an ErrorInfo reason).
    let status = answer.expect_err("a rogue certificate got through");
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown)
            && trainingkeys_shared::error::reason(&status).is_none(),
        "{status:?}"
    );
}

/// Org A's resources, seeded by the harness.
struct Seeded {
    org: String,
    /// Teaches the class.
    instructor: String,
    class_id: String,
    user_id: String,
    profile_id: String,
    pool_id: String,
    enrollment_id: String,
    subscription_key: pb::Key,
    class_key: pb::Key,
    event_key: pb::Key,
}

async fn seed(app: &TestApp) -> Seeded {
    let org = org();
    let users = app.users(&org, 3).await;
    let class = app
        .create_class(pb::CreateClassRequest {
            instructor_ids: vec![users[2].clone()],
            ..trainingkeys_tests::class_request(&org, 50)
        })
        .await;
    let enrollment = app.enroll(&class.class_id, &users[1]).await.unwrap();
    let (pool, keys) = app.subscription_pool(&org, 3, None).await;
    let class_key = app.class_keys(&class.class_id, 3).await.remove(0);
    let event_key = app.event_key(&class.class_id, false).await;
    Seeded {
        profile_id: pool.profile_id.clone(),
        pool_id: pool.pool_id.clone(),
        enrollment_id: enrollment.enrollment.unwrap().enrollment_id,
        subscription_key: keys[0].clone(),
        class_key,
        event_key,
        class_id: class.class_id,
        user_id: users[0].clone(),
        instructor: users[2].clone(),
        org,
    }
}

/// The answer to `method` for a caller with `role` in `orgs`, on org A's
/// resources `s`: OK, or the status code and reason.
async fn call_as(
    app: &TestApp,
    s: &Seeded,
    method: &str,
    role: Role,
    orgs: &[&str],
) -> Result<(), (Code, String)> {
    use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;
    // A student's subject is org A's user, an instructor's the class's
    // instructor; everyone else's a name.
    let sub = match role {
        Role::Student => s.user_id.as_str(),
        Role::Instructor => s.instructor.as_str(),
        _ => "staff",
    };
    let auth = TestAuth::as_role(sub, &[role], orgs);
    let mut e = EnrollmentServiceClient::with_interceptor(
        app.enrollment_service.channel_as("test-client"),
        auth.clone(),
    );
    let mut k = KeyIssuanceServiceClient::with_interceptor(
        app.keys_service.channel_as("test-client"),
        auth.clone(),
    );
    let mut r =
        RedemptionServiceClient::with_interceptor(app.replicas[0].channel_as("test-client"), auth);
    let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    // The key of a kind this role sees (for GetKey, RevokeKey).
    let key_for_role = match role {
        Role::OperationsManager => &s.class_key,
        Role::Instructor => &s.event_key,
        _ => &s.subscription_key,
    };
    let scope_for_role = match role {
        Role::SiteAdministrator => pb::list_keys_request::Scope::PoolId(s.pool_id.clone()),
        _ => pb::list_keys_request::Scope::ClassId(s.class_id.clone()),
    };
    let status = |r: Result<(), tonic::Status>| {
        r.map_err(|s| {
            let reason = trainingkeys_shared::error::reason(&s).unwrap_or_default();
            (s.code(), reason)
        })
    };
    let answer = match method {
        "RegisterUser" => e
            .register_user(pb::RegisterUserRequest {
                organization_id: s.org.clone(),
                email,
                display_name: "N".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "GetUser" => e
            .get_user(pb::GetUserRequest {
                user_id: s.user_id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "CreateClass" => e
            .create_class(trainingkeys_tests::class_request(&s.org, 3))
            .await
            .map(|_| ()),
        "GetClass" => e
            .get_class(pb::GetClassRequest {
                class_id: s.class_id.clone(),
            })
            .await
            .map(|_| ()),
        "UpdateClass" => e
            .update_class(pb::UpdateClassRequest {
                class_id: s.class_id.clone(),
                title: Some("Renamed".into()),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "CreateSubscriptionProfile" => e
            .create_subscription_profile(pb::CreateSubscriptionProfileRequest {
                organization_id: s.org.clone(),
                name: "P".into(),
                course_ids: vec!["C".into()],
                duration_days: 5,
            })
            .await
            .map(|_| ()),
        "GetSubscriptionProfile" => e
            .get_subscription_profile(pb::GetSubscriptionProfileRequest {
                profile_id: s.profile_id.clone(),
            })
            .await
            .map(|_| ()),
        "Enroll" => e
            .enroll(pb::EnrollRequest {
                class_id: s.class_id.clone(),
                user_id: s.user_id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "CancelEnrollment" => e
            .cancel_enrollment(pb::CancelEnrollmentRequest {
                enrollment_id: s.enrollment_id.clone(),
            })
            .await
            .map(|_| ()),
        "ListEnrollments" => e
            .list_enrollments(pb::ListEnrollmentsRequest {
                class_id: s.class_id.clone(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "AssignSubscription" => e
            .assign_subscription(pb::AssignSubscriptionRequest {
                profile_id: s.profile_id.clone(),
                user_id: s.user_id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "ListSubscriptions" => e
            .list_subscriptions(pb::ListSubscriptionsRequest {
                user_id: s.user_id.clone(),
                page_size: 10,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "GenerateSubscriptionKeys" => k
            .generate_subscription_keys(pb::GenerateSubscriptionKeysRequest {
                profile_id: s.profile_id.clone(),
                count: 1,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "GenerateClassEnrollmentKeys" => k
            .generate_class_enrollment_keys(pb::GenerateClassEnrollmentKeysRequest {
                class_id: s.class_id.clone(),
                count: 1,
            })
            .await
            .map(|_| ()),
        "SetEventKey" => k
            .set_event_key(pb::SetEventKeyRequest {
                class_id: s.class_id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "DisableEventKey" => k
            .disable_event_key(pb::DisableEventKeyRequest {
                class_id: s.class_id.clone(),
            })
            .await
            .map(|_| ()),
        "GetKey" => k
            .get_key(pb::GetKeyRequest {
                selector: Some(pb::get_key_request::Selector::KeyId(
                    key_for_role.key_id.clone(),
                )),
            })
            .await
            .map(|_| ()),
        "ListKeys" => k
            .list_keys(pb::ListKeysRequest {
                scope: Some(scope_for_role),
                page_size: 10,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        "ExportKeys" => {
            let scope = match role {
                Role::SiteAdministrator => {
                    pb::export_keys_request::Scope::PoolId(s.pool_id.clone())
                }
                _ => pb::export_keys_request::Scope::ClassId(s.class_id.clone()),
            };
            match k
                .export_keys(pb::ExportKeysRequest {
                    scope: Some(scope),
                    ..Default::default()
                })
                .await
            {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    let mut result = Ok(());
                    while let Some(chunk) = stream.message().await.transpose() {
                        if let Err(e) = chunk {
                            result = Err(e);
                            break;
                        }
                    }
                    result
                }
                Err(e) => Err(e),
            }
        }
        "RevokeKey" => k
            .revoke_key(pb::RevokeKeyRequest {
                key_id: key_for_role.key_id.clone(),
            })
            .await
            .map(|_| ()),
        "RenderNotification" => k
            .render_notification(pb::RenderNotificationRequest {
                class_id: s.class_id.clone(),
                template: "{{ClassTitle}}".into(),
            })
            .await
            .map(|_| ()),
        "ValidateKey" => {
            let answer = r
                .validate_key(pb::ValidateKeyRequest {
                    code: s.event_key.code.clone(),
                    user_id: s.user_id.clone(),
                })
                .await;
            // Validation answers with a reason rather than a status.
            match answer {
                Ok(v) if v.get_ref().reason == "KEY_NOT_FOUND" => {
                    Err(trainingkeys_shared::error::status(
                        Code::NotFound,
                        "KEY_NOT_FOUND",
                        "no such key",
                    ))
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        }
        "RedeemKey" => r
            .redeem_key(trainingkeys_tests::as_user(
                &s.event_key.code,
                &s.user_id,
                &trainingkeys_tests::idem(),
            ))
            .await
            .map(|_| ()),
        other => panic!("no request for {other}"),
    };
    status(answer)
}

/// Every method, for every role it allows, against a resource of the
/// caller's own organization (served) and of another (NOT_FOUND exactly as
/// a missing resource, or PERMISSION_DENIED for a write into an
/// organization the token does not name).
#[tokio::test]
async fn another_organizations_resources_answer_as_missing_ones() {
    let started = Instant::now();
    let app = TestApp::start(1).await;
    let other = org();
    let mut calls = 0;
    for rule in POLICY.iter().filter(|r| !r.is_internal()) {
        for (role, _) in rule.roles {
            // Fresh resources per call: revocations, disables and the like
            // must not change the next call's answer.
            let s = seed(&app).await;
            let own = call_as(&app, &s, rule.method(), *role, &[&s.org]).await;
            assert!(
                own.is_ok(),
                "{} as {role:?} in its own organization: {own:?}",
                rule.method()
            );
            let foreign = call_as(&app, &s, rule.method(), *role, &[&other]).await;
            let (code, reason) = foreign.expect_err(&format!(
                "{} as {role:?} from another organization was served",
                rule.method()
            ));
            let creates = matches!(
                rule.method(),
                "RegisterUser" | "CreateClass" | "CreateSubscriptionProfile"
            );
            if creates {
                assert_eq!(
                    (code, reason.as_str()),
                    (Code::PermissionDenied, "ORGANIZATION_NOT_ALLOWED"),
                    "{}",
                    rule.method()
                );
            } else {
                assert_eq!(
                    code,
                    Code::NotFound,
                    "{} as {role:?} from another organization: {reason}",
                    rule.method()
                );
                assert!(
                    reason.ends_with("_NOT_FOUND"),
                    "{}: {reason}",
                    rule.method()
                );
            }
            calls += 2;
        }
    }
    println!(
        "tenant matrix: {calls} calls in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Class enrollment keys are visible to operations managers only; site
/// administrators see subscription and event keys; instructors event keys.
/// A key of a kind the role may not see answers KEY_NOT_FOUND, and a
/// class's list shows each role only its kinds.
#[tokio::test]
async fn each_role_sees_only_its_kinds_of_key() {
    let app = TestApp::start(0).await;
    let s = seed(&app).await;
    let client = |role: Role| {
        KeyIssuanceServiceClient::with_interceptor(
            app.keys_service.channel_as("test-client"),
            TestAuth::as_role(&s.instructor, &[role], &[&s.org]),
        )
    };
    let get = |role: Role, key: &pb::Key| {
        let mut client = client(role);
        let key_id = key.key_id.clone();
        async move {
            client
                .get_key(pb::GetKeyRequest {
                    selector: Some(pb::get_key_request::Selector::KeyId(key_id)),
                })
                .await
                .map(|_| ())
        }
    };
    let cases = [
        (Role::SiteAdministrator, &s.subscription_key, true),
        (Role::SiteAdministrator, &s.event_key, true),
        (Role::SiteAdministrator, &s.class_key, false),
        (Role::OperationsManager, &s.class_key, true),
        (Role::OperationsManager, &s.event_key, false),
        (Role::OperationsManager, &s.subscription_key, false),
        (Role::Instructor, &s.event_key, true),
        (Role::Instructor, &s.class_key, false),
        (Role::Instructor, &s.subscription_key, false),
    ];
    for (role, key, sees) in cases {
        let answer = get(role, key).await;
        if sees {
            assert!(answer.is_ok(), "{role:?} {:?}: {answer:?}", key.kind());
        } else {
            assert_status(answer, Code::NotFound, "KEY_NOT_FOUND");
        }
    }
    for (role, kinds) in [
        (Role::OperationsManager, vec![pb::KeyKind::ClassEnrollment]),
        (Role::Instructor, vec![pb::KeyKind::Event]),
        (Role::SiteAdministrator, vec![pb::KeyKind::Event]),
    ] {
        let listed = client(role)
            .list_keys(pb::ListKeysRequest {
                scope: Some(pb::list_keys_request::Scope::ClassId(s.class_id.clone())),
                page_size: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .keys;
        let mut seen: Vec<_> = listed.iter().map(|k| k.kind()).collect();
        seen.dedup();
        assert_eq!(seen, kinds, "{role:?}");
    }
    // A site administrator cannot export a class's enrollment keys.
    let export = client(Role::SiteAdministrator)
        .export_keys(pb::ExportKeysRequest {
            scope: Some(pb::export_keys_request::Scope::ClassId(s.class_id.clone())),
            ..Default::default()
        })
        .await
        .map(|_| ());
    assert_status(export, Code::NotFound, "CLASS_NOT_FOUND");
}

/// A student redeems and validates only as themselves: another user's id,
/// or a new account, is refused with OWN_SUBJECT_ONLY.
#[tokio::test]
async fn a_student_redeems_only_as_themselves() {
    use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;
    let app = TestApp::start(1).await;
    let s = seed(&app).await;
    let mut student = RedemptionServiceClient::with_interceptor(
        app.replicas[0].channel_as("test-client"),
        TestAuth::as_role(&s.user_id, &[Role::Student], &[&s.org]),
    );
    // users() registers student0, student1, ...: the seed made the first two.
    let other = app.users(&s.org, 3).await.remove(2);
    assert_ne!(other, s.user_id);
    let as_other =
        trainingkeys_tests::as_user(&s.event_key.code, &other, &trainingkeys_tests::idem());
    assert_status(
        student.redeem_key(as_other).await,
        Code::PermissionDenied,
        "OWN_SUBJECT_ONLY",
    );
    let as_new = trainingkeys_tests::as_new(&s.event_key.code, &s.org, "x@example.com", "X");
    assert_status(
        student.redeem_key(as_new).await,
        Code::PermissionDenied,
        "OWN_SUBJECT_ONLY",
    );
    let validate_other = student
        .validate_key(pb::ValidateKeyRequest {
            code: s.event_key.code.clone(),
            user_id: other.clone(),
        })
        .await;
    assert_status(validate_other, Code::PermissionDenied, "OWN_SUBJECT_ONLY");
    let own =
        trainingkeys_tests::as_user(&s.event_key.code, &s.user_id, &trainingkeys_tests::idem());
    student.redeem_key(own).await.unwrap();
    assert_eq!(app.get_class(&s.class_id).await.enrolled_count, 2);
}

/// `x-forwarded-for` is believed only from a trusted proxy (none by
/// default): an attacker who rotates it, and the user it names, from one
/// address is still one caller, and is stopped at the limit.
#[tokio::test]
async fn a_rotated_forwarded_for_header_buys_no_guesses() {
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 3;
        c.redis_timeout_ms = 5000;
    })
    .await;
    let org = org();
    let users = app.users(&org, 12).await;
    let mut refused = 0;
    for (i, user) in users.iter().enumerate() {
        let mut request = tonic::Request::new(trainingkeys_tests::as_user(
            &format!("GUESS-{i}"),
            user,
            &trainingkeys_tests::idem(),
        ));
        request
            .metadata_mut()
            .insert("x-forwarded-for", format!("203.0.113.{i}").parse().unwrap());
        match app.redemption_client(0).redeem_key(request).await {
            Err(s) if s.code() == Code::ResourceExhausted => refused += 1,
            Err(s) if s.code() == Code::NotFound => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(refused, 12 - 3, "rotating the header bought guesses");
}

/// Behind a trusted proxy, the right-most address it did not add is the
/// caller: two students behind one proxy are limited separately, and an
/// address a client prepended itself is ignored.
#[tokio::test]
async fn behind_a_trusted_proxy_the_right_most_untrusted_hop_is_the_caller() {
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 2;
        c.redis_timeout_ms = 5000;
        c.trusted_proxies = "127.0.0.1/32".into();
    })
    .await;
    let org = org();
    let users = app.users(&org, 8).await;
    let guess = |user: &str, i: usize, forwarded: &str| {
        let mut request = tonic::Request::new(trainingkeys_tests::as_user(
            &format!("GUESS-{i}"),
            user,
            &trainingkeys_tests::idem(),
        ));
        request
            .metadata_mut()
            .insert("x-forwarded-for", forwarded.parse().unwrap());
        let mut client = app.redemption_client(0);
        async move { client.redeem_key(request).await.unwrap_err().code() }
    };
    // Student A (198.51.100.1) uses up its two guesses, whatever it claims
    // to the left of what the proxy saw.
    assert_eq!(
        guess(&users[0], 0, "10.9.9.1, 198.51.100.1").await,
        Code::NotFound
    );
    assert_eq!(
        guess(&users[1], 1, "10.9.9.2, 198.51.100.1").await,
        Code::NotFound
    );
    assert_eq!(
        guess(&users[2], 2, "10.9.9.3, 198.51.100.1").await,
        Code::ResourceExhausted
    );
    // Student B, another address behind the same proxy, is not held back.
    assert_eq!(guess(&users[3], 3, "198.51.100.2").await, Code::NotFound);
}

/// Nobody can lock a student out by failing in their name: a caller with
/// no token is refused before anything is counted, and a student's token
/// names only its own subject, so ten bad codes "as the victim" count
/// against no one; the victim then redeems at once.
#[tokio::test]
async fn no_one_can_lock_a_victim_out() {
    use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 3;
        c.redis_timeout_ms = 5000;
    })
    .await;
    let org = org();
    let users = app.users(&org, 2).await;
    let (victim, attacker) = (&users[0], &users[1]);
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let client = |auth: TestAuth| {
        RedemptionServiceClient::with_interceptor(app.replicas[0].channel_as("test-client"), auth)
    };
    let mut anonymous = client(TestAuth::none());
    let mut other_student = client(TestAuth::as_role(attacker, &[Role::Student], &[&org]));
    for i in 0..10 {
        let guess =
            trainingkeys_tests::as_user(&format!("GUESS-{i}"), victim, &trainingkeys_tests::idem());
        assert_status(
            anonymous.redeem_key(guess.clone()).await,
            Code::Unauthenticated,
            "UNAUTHENTICATED",
        );
        assert_status(
            other_student.redeem_key(guess).await,
            Code::PermissionDenied,
            "OWN_SUBJECT_ONLY",
        );
    }
    let mut me = client(TestAuth::as_role(victim, &[Role::Student], &[&org]));
    me.redeem_key(trainingkeys_tests::as_user(
        &key.code,
        victim,
        &trainingkeys_tests::idem(),
    ))
    .await
    .expect("the victim was locked out");
}

/// An instructor sees the classes they teach (listed as an instructor),
/// their rosters and event keys, and nothing of another class of the same
/// organization: NOT_FOUND, as if it did not exist.
#[tokio::test]
async fn instructors_see_only_the_classes_they_teach() {
    let app = TestApp::start(0).await;
    let taught = seed(&app).await;
    let other = app.class(&taught.org, 5).await;
    let other_key = app.event_key(&other.class_id, false).await;
    let auth = TestAuth::as_role(&taught.instructor, &[Role::Instructor], &[&taught.org]);
    let mut e = EnrollmentServiceClient::with_interceptor(
        app.enrollment_service.channel_as("test-client"),
        auth.clone(),
    );
    let mut k = KeyIssuanceServiceClient::with_interceptor(
        app.keys_service.channel_as("test-client"),
        auth,
    );
    let get_class = |id: &str| pb::GetClassRequest {
        class_id: id.into(),
    };
    let roster = |id: &str| pb::ListEnrollmentsRequest {
        class_id: id.into(),
        page_size: 10,
        ..Default::default()
    };
    let key = |id: &str| pb::GetKeyRequest {
        selector: Some(pb::get_key_request::Selector::KeyId(id.into())),
    };
    let shown = e
        .get_class(get_class(&taught.class_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shown.class.unwrap().instructor_ids,
        vec![taught.instructor.clone()]
    );
    e.list_enrollments(roster(&taught.class_id)).await.unwrap();
    k.get_key(key(&taught.event_key.key_id)).await.unwrap();

    assert_status(
        e.get_class(get_class(&other.class_id)).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        e.list_enrollments(roster(&other.class_id)).await,
        Code::NotFound,
        "CLASS_NOT_FOUND",
    );
    assert_status(
        k.get_key(key(&other_key.key_id)).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    let render = k
        .render_notification(pb::RenderNotificationRequest {
            class_id: other.class_id.clone(),
            template: "{{EventTrainingKey}}".into(),
        })
        .await;
    assert_status(render, Code::NotFound, "CLASS_NOT_FOUND");

    // Replacing the instructors takes effect at once.
    app.enrollment_client()
        .update_class(pb::UpdateClassRequest {
            class_id: other.class_id.clone(),
            instructors: Some(pb::Instructors {
                user_ids: vec![taught.instructor.clone()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    k.get_key(key(&other_key.key_id)).await.unwrap();
}

/// Review finding: a redemption's id is derived from who redeems and an
/// idempotency key, so a caller that could pass one to Enroll,
/// AssignSubscription or RegisterUser could read or pre-empt another's
/// redemption. Only the redemption service may set those fields.
#[tokio::test]
async fn only_the_redemption_service_names_redemptions() {
    let app = TestApp::start(1).await;
    let s = seed(&app).await;
    let mut e = EnrollmentServiceClient::with_interceptor(
        app.enrollment_service.channel_as("test-client"),
        TestAuth::as_role("provisioner", &[Role::ProvisioningService], &[&s.org]),
    );
    let rid = trainingkeys_tests::uuid();
    let field_of = |status: &tonic::Status| {
        tonic_types::StatusExt::get_details_error_info(status)
            .and_then(|i| i.metadata.get("field").cloned())
            .unwrap_or_default()
    };
    let enroll = e
        .enroll(pb::EnrollRequest {
            class_id: s.class_id.clone(),
            user_id: s.user_id.clone(),
            redemption_id: rid.clone(),
            ..Default::default()
        })
        .await;
    let status = assert_status(enroll, Code::PermissionDenied, "INTERNAL_FIELD");
    assert_eq!(field_of(&status), "redemption_id");
    let assign = e
        .assign_subscription(pb::AssignSubscriptionRequest {
            profile_id: s.profile_id.clone(),
            user_id: s.user_id.clone(),
            source_key_id: s.subscription_key.key_id.clone(),
            ..Default::default()
        })
        .await;
    let status = assert_status(assign, Code::PermissionDenied, "INTERNAL_FIELD");
    assert_eq!(field_of(&status), "source_key_id");
    let register = e
        .register_user(pb::RegisterUserRequest {
            organization_id: s.org.clone(),
            email: "new@example.com".into(),
            display_name: "New".into(),
            user_id: trainingkeys_tests::uuid(),
            ..Default::default()
        })
        .await;
    let status = assert_status(register, Code::PermissionDenied, "INTERNAL_FIELD");
    assert_eq!(field_of(&status), "user_id");
}

/// Review finding: a recorded answer is replayed only to a caller of its
/// organization. Another organization's redemption front repeating a
/// request it learned (user and idempotency key) gets KEY_NOT_FOUND, and
/// naming another organization's user gets USER_NOT_FOUND, as if missing.
#[tokio::test]
async fn another_organizations_redemptions_are_not_replayed() {
    use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;
    let app = TestApp::start(1).await;
    let a = seed(&app).await;
    let b = seed(&app).await;
    let front = |org: &str| {
        RedemptionServiceClient::with_interceptor(
            app.replicas[0].channel_as("test-client"),
            TestAuth::as_role("front", &[Role::RedemptionFront], &[org]),
        )
    };
    let request =
        trainingkeys_tests::as_user(&a.event_key.code, &a.user_id, &trainingkeys_tests::idem());
    front(&a.org).redeem_key(request.clone()).await.unwrap();
    assert_status(
        front(&b.org).redeem_key(request).await,
        Code::NotFound,
        "KEY_NOT_FOUND",
    );
    // Org B's own key, for org A's user.
    let cross =
        trainingkeys_tests::as_user(&b.event_key.code, &a.user_id, &trainingkeys_tests::idem());
    assert_status(
        front(&b.org).redeem_key(cross).await,
        Code::NotFound,
        "USER_NOT_FOUND",
    );
}

/// Review finding: a service certificate counts only where the policy
/// lists that service. Key-issuance's certificate with another
/// organization's administrator token is scoped like the token alone.
#[tokio::test]
async fn a_service_certificate_does_not_widen_a_token() {
    let app = TestApp::start(0).await;
    let a = seed(&app).await;
    let other = org();
    let mut k = KeyIssuanceServiceClient::with_interceptor(
        app.keys_service.channel_as("key-issuance"),
        TestAuth::as_role("admin", &[Role::SiteAdministrator], &[&other]),
    );
    let get = k
        .get_key(pb::GetKeyRequest {
            selector: Some(pb::get_key_request::Selector::KeyId(
                a.subscription_key.key_id.clone(),
            )),
        })
        .await;
    assert_status(get, Code::NotFound, "KEY_NOT_FOUND");
}

/// Review finding: an operations manager's export of a class holds its
/// class enrollment keys only, never its event key.
#[tokio::test]
async fn a_class_export_holds_no_event_key() {
    let app = TestApp::start(0).await;
    let s = seed(&app).await;
    let mut k = KeyIssuanceServiceClient::with_interceptor(
        app.keys_service.channel_as("test-client"),
        TestAuth::as_role("ops", &[Role::OperationsManager], &[&s.org]),
    );
    let mut stream = k
        .export_keys(pb::ExportKeysRequest {
            scope: Some(pb::export_keys_request::Scope::ClassId(s.class_id.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut csv = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        csv.extend(chunk.chunk);
    }
    let csv = String::from_utf8(csv).unwrap();
    assert!(csv.contains(&s.class_key.code), "{csv}");
    assert!(
        !csv.contains(&s.event_key.code),
        "the event key was exported: {csv}"
    );
}

/// Counting and checking are one atomic step for a user: a burst of
/// concurrent wrong guesses in one student's name (each its own attempt)
/// cannot all be looked up before one is counted. With a limit of 5, at
/// most 5 of 40 are looked up; the rest wait for those in flight (ABORTED,
/// retry) or are locked out.
#[tokio::test]
async fn a_burst_of_concurrent_guesses_cannot_all_pass() {
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 5;
        c.redis_timeout_ms = 5000;
    })
    .await;
    let org = org();
    let user = app.users(&org, 1).await.remove(0);
    let answers = futures::future::join_all((0..40).map(|i| {
        let mut client = app.redemption_client(0);
        let request =
            trainingkeys_tests::as_user(&format!("GUESS-{i}"), &user, &trainingkeys_tests::idem());
        async move { client.redeem_key(request).await }
    }))
    .await;
    let count = |code: Code| {
        answers
            .iter()
            .filter(|a| matches!(a, Err(s) if s.code() == code))
            .count()
    };
    let looked_up = count(Code::NotFound);
    assert!(
        looked_up <= 5,
        "{looked_up} guesses were looked up, limit 5"
    );
    assert_eq!(
        looked_up + count(Code::Aborted) + count(Code::ResourceExhausted),
        40
    );
}

/// The service-wide failure budget: once spent, an identity that has
/// failed in the window is refused whatever user it names next, while a
/// student with a clean record (another address, another user) still
/// redeems. (An attacker who rotates both address and user gets at most one
/// failure per fresh pair while the budget is spent; the metric
/// `trainingkeys.redemption.limits.global_refused` is there to alert on.)
#[tokio::test]
async fn a_spent_global_budget_stops_rotating_users_not_students() {
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 10;
        c.guess_global_limit = 5;
        c.redis_timeout_ms = 5000;
        c.trusted_proxies = "127.0.0.1/32".into();
    })
    .await;
    let org = org();
    let users = app.users(&org, 8).await;
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let from = |address: &str, code: &str, user: &str| {
        let mut request = tonic::Request::new(trainingkeys_tests::as_user(
            code,
            user,
            &trainingkeys_tests::idem(),
        ));
        request
            .metadata_mut()
            .insert("x-forwarded-for", address.parse().unwrap());
        let mut client = app.redemption_client(0);
        async move { client.redeem_key(request).await }
    };
    // One address fails once for each of five users: the budget is spent.
    for (i, user) in users[..5].iter().enumerate() {
        let answer = from("203.0.113.1", &format!("GUESS-{i}"), user).await;
        assert_status(answer, Code::NotFound, "KEY_NOT_FOUND");
    }
    // That address is refused, whichever fresh user it names.
    let next = from("203.0.113.1", "GUESS-X", &users[5]).await;
    assert_status(next, Code::ResourceExhausted, "TOO_MANY_ATTEMPTS");
    // A student with a clean record redeems.
    from("198.51.100.7", &key.code, &users[6])
        .await
        .expect("a clean student was refused");
    // The budget never locks out past its window.
    let ttl: i64 = app.redis.cmd(&["PTTL", "attempts:global"]).await.unwrap();
    assert!(ttl <= 60_000, "the global budget locks out for {ttl} ms");
}

/// Review finding: custom event codes are unique across organizations, so
/// SetEventKey told anyone which codes were live. A caller who finds ten
/// codes taken within the hour may not choose custom codes for a while
/// (generated keys still work); codes that were free do not count.
#[tokio::test]
async fn set_event_key_is_no_oracle_for_live_codes() {
    let app = TestApp::start(0).await;
    let a = seed(&app).await;
    let b = seed(&app).await;
    let live = "SPRING-KICKOFF";
    let admin_a = KeyIssuanceServiceClient::with_interceptor(
        app.keys_service.channel_as("test-client"),
        TestAuth::as_role("admin-a", &[Role::SiteAdministrator], &[&a.org]),
    );
    let mut admin_b = KeyIssuanceServiceClient::with_interceptor(
        app.keys_service.channel_as("test-client"),
        TestAuth::as_role("admin-b", &[Role::SiteAdministrator], &[&b.org]),
    );
    let set = |class: &str, code: &str| pb::SetEventKeyRequest {
        class_id: class.into(),
        custom_code: code.into(),
        ..Default::default()
    };
    admin_a
        .clone()
        .set_event_key(set(&a.class_id, live))
        .await
        .unwrap();
    // Free codes never count.
    for i in 0..12 {
        admin_b
            .set_event_key(set(&b.class_id, &format!("FREE-CODE-{i}")))
            .await
            .unwrap();
    }
    for _ in 0..10 {
        let taken = admin_b.set_event_key(set(&b.class_id, live)).await;
        assert_status(taken, Code::AlreadyExists, "CODE_ALREADY_EXISTS");
    }
    let probe = admin_b.set_event_key(set(&b.class_id, live)).await;
    assert_status(probe, Code::ResourceExhausted, "TOO_MANY_ATTEMPTS");
    let fresh = admin_b
        .set_event_key(set(&b.class_id, "NEVER-USED-1"))
        .await;
    assert_status(fresh, Code::ResourceExhausted, "TOO_MANY_ATTEMPTS");
    admin_b
        .set_event_key(set(&b.class_id, ""))
        .await
        .expect("a generated key is still allowed");
}

/// Review finding: naming another organization's pool when adding keys
/// answers POOL_NOT_FOUND (it used to compare profiles and name theirs).
#[tokio::test]
async fn another_organizations_pool_answers_as_missing() {
    let app = TestApp::start(0).await;
    let a = seed(&app).await;
    let b = seed(&app).await;
    let mut admin_b = KeyIssuanceServiceClient::with_interceptor(
        app.keys_service.channel_as("test-client"),
        TestAuth::as_role("admin-b", &[Role::SiteAdministrator], &[&b.org]),
    );
    let answer = admin_b
        .generate_subscription_keys(pb::GenerateSubscriptionKeysRequest {
            profile_id: b.profile_id.clone(),
            pool_id: a.pool_id.clone(),
            count: 1,
            ..Default::default()
        })
        .await;
    assert_status(answer, Code::NotFound, "POOL_NOT_FOUND");
}

/// A reservation lasts as long as its look-up can still happen: a client
/// that hangs up at once does not free its slot while its redemption runs
/// on (that would let cancelled guesses through without limit), and a
/// duplicate of a running attempt never frees another's slot. With a limit
/// of 3, twenty bad guesses each cancelled after 5 ms cost at most 3
/// look-ups.
#[tokio::test]
async fn cancelled_guesses_do_not_free_their_slots_early() {
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 3;
        c.redis_timeout_ms = 5000;
    })
    .await;
    let org = org();
    let user = app.users(&org, 1).await.remove(0);
    for i in 0..20 {
        let mut request = tonic::Request::new(trainingkeys_tests::as_user(
            &format!("GUESS-{i}"),
            &user,
            &trainingkeys_tests::idem(),
        ));
        request.set_timeout(Duration::from_millis(5));
        let _ = app.redemption_client(0).redeem_key(request).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The harness calls as a redemption front: its tally of this user.
    let counter = format!("attempts:user:{{front:test-operator/user:{user}}}");
    let failures: Option<i64> = app.redis.cmd(&["GET", &counter]).await.unwrap();
    assert!(failures.unwrap_or(0) <= 3, "{failures:?} look-ups, limit 3");
}

/// A redemption front's failures in a student's name are its own tally of
/// that student: another organization's front sending ten bad codes for
/// the student locks only itself out, and the student redeems at once.
#[tokio::test]
async fn another_front_cannot_lock_a_student_out() {
    use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 3;
        c.redis_timeout_ms = 5000;
        // Each caller at its own address, as behind a load balancer.
        c.trusted_proxies = "127.0.0.1/32".into();
    })
    .await;
    let a = seed(&app).await;
    let b = seed(&app).await;
    let from = |address: &str, request: pb::RedeemKeyRequest| {
        let mut request = tonic::Request::new(request);
        request
            .metadata_mut()
            .insert("x-forwarded-for", address.parse().unwrap());
        request
    };
    let mut front_b = RedemptionServiceClient::with_interceptor(
        app.replicas[0].channel_as("test-client"),
        TestAuth::as_role("front-b", &[Role::RedemptionFront], &[&b.org]),
    );
    for i in 0..10 {
        let guess = trainingkeys_tests::as_user(
            &format!("GUESS-{i}"),
            &a.user_id,
            &trainingkeys_tests::idem(),
        );
        let _ = front_b.redeem_key(from("203.0.113.9", guess)).await;
    }
    let mut student = RedemptionServiceClient::with_interceptor(
        app.replicas[0].channel_as("test-client"),
        TestAuth::as_role(&a.user_id, &[Role::Student], &[&a.org]),
    );
    let own =
        trainingkeys_tests::as_user(&a.event_key.code, &a.user_id, &trainingkeys_tests::idem());
    student
        .redeem_key(from("198.51.100.3", own))
        .await
        .expect("the student was locked out by another organization's front");
}

/// ValidateKey counts like RedeemKey: another organization's real code is
/// a failed guess (so the limit cannot tell it from a missing one), and a
/// student validating without naming a user is counted in their own name.
#[tokio::test]
async fn validation_guesses_are_counted_and_limited() {
    use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 3;
        c.redis_timeout_ms = 5000;
    })
    .await;
    let a = seed(&app).await;
    let b = seed(&app).await;
    let mut student_b = RedemptionServiceClient::with_interceptor(
        app.replicas[0].channel_as("test-client"),
        TestAuth::as_role(&b.user_id, &[Role::Student], &[&b.org]),
    );
    let mut refused = 0;
    for _ in 0..6 {
        let answer = student_b
            .validate_key(pb::ValidateKeyRequest {
                code: a.event_key.code.clone(),
                user_id: String::new(),
            })
            .await;
        match answer {
            Ok(v) => assert_eq!(v.into_inner().reason, "KEY_NOT_FOUND"),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 3, "another organization's code was not counted");
}

/// Look-ups by code are probes of the code space: a caller whose look-ups
/// found nothing it may see ten times within the hour is refused for a
/// while (another organization's code answers, and counts, as missing).
#[tokio::test]
async fn get_key_by_code_is_no_oracle_for_live_codes() {
    let app = TestApp::start(0).await;
    let a = seed(&app).await;
    let b = seed(&app).await;
    let mut admin_b = KeyIssuanceServiceClient::with_interceptor(
        app.keys_service.channel_as("test-client"),
        TestAuth::as_role("admin-b", &[Role::SiteAdministrator], &[&b.org]),
    );
    let by_code = |code: &str| pb::GetKeyRequest {
        selector: Some(pb::get_key_request::Selector::Code(code.into())),
    };
    // Its own keys never count.
    for _ in 0..12 {
        admin_b
            .get_key(by_code(&b.subscription_key.code))
            .await
            .unwrap();
    }
    for _ in 0..10 {
        let miss = admin_b.get_key(by_code(&a.subscription_key.code)).await;
        assert_status(miss, Code::NotFound, "KEY_NOT_FOUND");
    }
    let probe = admin_b.get_key(by_code(&a.subscription_key.code)).await;
    assert_status(probe, Code::ResourceExhausted, "TOO_MANY_ATTEMPTS");
}

/// Identical retries of one attempt share its reservation: a storm of 200
/// at once for one student (limit 5) gets one answer, byte for byte, and
/// no "in progress" refusals.
#[tokio::test]
async fn identical_retries_share_one_reservation() {
    let app = TestApp::start_with(1, |c| {
        c.guess_limit = 5;
        c.redis_timeout_ms = 5000;
    })
    .await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let user = app.users(&org, 1).await.remove(0);
    let same = trainingkeys_tests::as_user(&key.code, &user, &trainingkeys_tests::idem());
    let answers = futures::future::join_all((0..200).map(|i| {
        let mut client = app.redemption_client(i);
        let request = same.clone();
        async move { client.redeem_key(request).await.map(|r| r.into_inner()) }
    }))
    .await;
    let first = answers[0].as_ref().expect("the first answer").clone();
    for answer in &answers {
        assert_eq!(answer.as_ref().ok(), Some(&first), "{answer:?}");
    }
}
