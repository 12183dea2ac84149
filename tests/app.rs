//! [`TestApp`], the one harness every test uses: enrollment, key-issuance and
//! any number of redemption replicas on a fresh database, with a Redis
//! server of their own, and typed helpers that answer with the message
//! itself.
//!
//! The helpers follow one rule. Those that set a test up or read a result
//! (an organization, a class, users, keys, a pool, GetClass, GetKey) return
//! the thing and panic if the call fails: the test is broken, not the rule
//! under test. Calls a test may expect to fail (redeem, enroll, consume,
//! revoke, ...) return their `Result`, for [`assert_status`](crate::assert_status);
//! so do the `try_` forms of a few seeding and reading helpers.
//!
//! A test of a new rule is then about ten lines:
//!
//! ```ignore
//! #[tokio::test]
//! async fn a_full_class_turns_the_next_student_away() {
//!     let app = TestApp::start(1).await;
//!     let org = org();
//!     let class = app.class(&org, 1).await;
//!     let key = app.event_key(&class.class_id, false).await;
//!     let ids = app.users(&org, 2).await;
//!     app.redeem(0, as_user(&key.code, &ids[0], &idem())).await.unwrap();
//!     let late = app.redeem(0, as_user(&key.code, &ids[1], &idem())).await;
//!     assert_status(late, Code::ResourceExhausted, "CLASS_FULL");
//! }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use tonic::transport::Channel;

use crate::pki::Authed;
use tonic::{Code, Status};
use trainingkeys_proto::time::to_timestamp;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use trainingkeys_proto::v1::key_issuance_service_client::KeyIssuanceServiceClient;
use trainingkeys_proto::v1::redeem_key_request::Redeemer;
use trainingkeys_proto::v1::redeem_key_response::Grant;
use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;
use trainingkeys_proto::v1::{export_keys_request, get_key_request, list_keys_request};

use crate::servers::{LoadBalancer, RedisServer};
use crate::{Spawned, fresh_database, spawn_enrollment, spawn_key_issuance};

/// A redemption client.
pub type Redeem = RedemptionServiceClient<Authed>;

/// Enrollment, key-issuance and redemption replicas on one fresh database.
pub struct TestApp {
    /// The database every service uses (each in its own schema).
    pub database_url: String,
    /// The gate's Redis, this app's own: a test may flush, stop or restart it.
    pub redis: RedisServer,
    /// The Redis the replicas use: `redis`, unless a test gave them another
    /// (a Cluster, Sentinel's primary).
    pub redis_url: String,
    /// The enrollment service, for tests of its serving and shutdown.
    pub enrollment_service: Spawned,
    /// The key-issuance service; replicas are pointed at it.
    pub keys_service: Spawned,
    /// The redemption replicas, by index; a test may stop one.
    pub replicas: Vec<Spawned>,
    /// The load balancer, once [`behind_load_balancer`](Self::behind_load_balancer) ran.
    pub lb: Option<LoadBalancer>,
    /// Cloned for each call (a clone shares the connection).
    enrollment_client: EnrollmentServiceClient<Authed>,
    /// Cloned for each call.
    keys_client: KeyIssuanceServiceClient<Authed>,
    /// One client per replica (or, behind the load balancer, per connection).
    redemption_clients: Vec<Redeem>,
}

impl TestApp {
    /// The app with `replicas` redemption replicas of default test settings
    /// (0 for tests of enrollment and key-issuance alone).
    pub async fn start(replicas: usize) -> Self {
        Self::start_with(replicas, |_| {}).await
    }

    /// Like [`start`](Self::start), with each replica's config adjusted by `tweak`.
    pub async fn start_with(
        replicas: usize,
        tweak: impl Fn(&mut trainingkeys_redemption::Config),
    ) -> Self {
        let database_url = fresh_database().await;
        let redis = RedisServer::start().await;
        let enrollment_service = spawn_enrollment(&database_url).await;
        let keys_service = spawn_key_issuance(&database_url, &enrollment_service.url()).await;
        let enrollment_client = EnrollmentServiceClient::new(enrollment_service.channel().await);
        let keys_client = KeyIssuanceServiceClient::new(keys_service.channel().await);
        let mut app = Self {
            database_url,
            redis_url: redis.url(),
            redis,
            enrollment_service,
            keys_service,
            replicas: Vec::new(),
            lb: None,
            enrollment_client,
            keys_client,
            redemption_clients: Vec::new(),
        };
        for _ in 0..replicas {
            app.add_replica(&tweak).await;
        }
        app
    }

    /// Test settings for a new replica of this app: short timeouts so faults
    /// show fast.
    pub fn replica_config(&self) -> trainingkeys_redemption::Config {
        let mut config = trainingkeys_redemption::Config::for_tests(
            &self.database_url,
            &self.enrollment_service.url(),
            &self.keys_service.url(),
            &self.redis.url(),
        )
        .unwrap();
        crate::for_tests(&mut config.common, "redemption");
        config.redemption_timeout_seconds = 3;
        config.recovery_after_seconds = 4;
        config.recovery_interval_seconds = 1;
        // Short holds, so a lost settle clears within a test's patience; gate
        // state that outlives any test, so only faults make it go missing.
        config.gate_hold_seconds = 10;
        config.gate_state_ttl_seconds = 600;
        config.common.database_max_connections = 30;
        config
    }

    /// Starts one more replica; returns its index.
    pub async fn add_replica(
        &mut self,
        tweak: impl Fn(&mut trainingkeys_redemption::Config),
    ) -> usize {
        let mut config = self.replica_config();
        tweak(&mut config);
        self.redis_url = config.redis_url.clone();
        let replica = crate::spawn::<trainingkeys_redemption::Application>(config).await;
        self.redemption_clients
            .push(RedemptionServiceClient::new(replica.channel().await));
        self.replicas.push(replica);
        self.replicas.len() - 1
    }

    /// Puts haproxy in front of the replicas started so far: from now on
    /// clients (three connections) go through it.
    pub async fn behind_load_balancer(&mut self) {
        let addrs: Vec<_> = self.replicas.iter().map(|r| r.addr).collect();
        let lb = LoadBalancer::start(&addrs).await;
        self.redemption_clients = (0..3)
            .map(|_| RedemptionServiceClient::new(crate::pki::operator(&lb.url())))
            .collect();
        self.lb = Some(lb);
    }

    /// Puts haproxy in front of the replicas started so far, sending calls
    /// only to the ready ones (their `/readyz` at `probes`, in order): from
    /// now on clients (three connections) go through it.
    pub async fn behind_checked_load_balancer(&mut self, probes: &[std::net::SocketAddr]) {
        let addrs: Vec<_> = self.replicas.iter().map(|r| r.addr).collect();
        let lb = LoadBalancer::start_checked(&addrs, probes).await;
        self.redemption_clients = (0..3)
            .map(|_| RedemptionServiceClient::new(crate::pki::operator(&lb.url())))
            .collect();
        self.lb = Some(lb);
    }

    /// Restarts replica `i` as a rollout does: shuts it down (what SIGTERM
    /// does: NOT_SERVING, the shutdown delay, the drain), then starts a new
    /// one with `tweak`ed settings (the same addresses, for the load
    /// balancer). Clients through the load balancer keep their connections.
    pub async fn restart_replica(
        &mut self,
        i: usize,
        tweak: impl Fn(&mut trainingkeys_redemption::Config),
    ) {
        self.replicas.remove(i).stop().await;
        let mut config = self.replica_config();
        tweak(&mut config);
        let replica = crate::spawn::<trainingkeys_redemption::Application>(config).await;
        self.replicas.insert(i, replica);
    }

    /// Stops replica `i` (as far as its clients can tell, it is gone).
    pub async fn stop_replica(&mut self, i: usize) {
        self.redemption_clients.remove(i);
        self.replicas.remove(i).stop().await;
    }

    /// A direct database connection, for checks behind the services' backs.
    pub async fn db(&self) -> sqlx::PgConnection {
        use sqlx::Connection as _;
        sqlx::PgConnection::connect(&self.database_url)
            .await
            .unwrap()
    }

    // Clients, for calls no helper makes. A clone shares the connection.

    pub fn enrollment_client(&self) -> EnrollmentServiceClient<Authed> {
        self.enrollment_client.clone()
    }

    pub fn keys_client(&self) -> KeyIssuanceServiceClient<Authed> {
        self.keys_client.clone()
    }

    /// A key-issuance client that is the redemption service (its client
    /// certificate, no token): the one caller of the internal methods.
    pub fn internal_keys_client(&self) -> KeyIssuanceServiceClient<Channel> {
        KeyIssuanceServiceClient::new(self.keys_service.channel_as("redemption"))
    }

    /// An enrollment client that is the redemption service.
    pub fn internal_enrollment_client(&self) -> EnrollmentServiceClient<Channel> {
        EnrollmentServiceClient::new(self.enrollment_service.channel_as("redemption"))
    }

    /// A client of replica `i` (any `i`: it wraps around).
    pub fn redemption_client(&self, i: usize) -> Redeem {
        self.redemption_clients[i % self.redemption_clients.len()].clone()
    }

    /// How many redemption clients there are to spread calls over.
    pub fn redemption_clients(&self) -> usize {
        self.redemption_clients.len()
    }

    // Enrollment.

    /// A class of `org` for `max` students, from tomorrow for two days, with
    /// seven days of lab access ([`class_request`]).
    pub async fn class(&self, org: &str, max: i32) -> pb::Class {
        self.create_class(class_request(org, max)).await
    }

    /// A class of `org` for `max` students running over `days` (from now:
    /// `-3..-1` ended yesterday), with `lab_days` of lab access after it.
    pub async fn class_at(
        &self,
        org: &str,
        max: i32,
        days: Range<i64>,
        lab_days: i32,
    ) -> pb::Class {
        let now = Utc::now();
        self.create_class(pb::CreateClassRequest {
            start_time: Some(to_timestamp(now + chrono::Duration::days(days.start))),
            end_time: Some(to_timestamp(now + chrono::Duration::days(days.end))),
            lab_access_days: lab_days,
            ..class_request(org, max)
        })
        .await
    }

    pub async fn create_class(&self, request: pb::CreateClassRequest) -> pb::Class {
        self.enrollment_client()
            .create_class(request)
            .await
            .unwrap()
            .into_inner()
            .class
            .unwrap()
    }

    /// GetClass.
    pub async fn get_class(&self, class_id: &str) -> pb::Class {
        self.try_get_class(class_id).await.unwrap()
    }

    pub async fn try_get_class(&self, class_id: &str) -> Result<pb::Class, Status> {
        self.enrollment_client()
            .get_class(pb::GetClassRequest {
                class_id: class_id.into(),
            })
            .await
            .map(|r| r.into_inner().class.unwrap())
    }

    /// UpdateClass.
    pub async fn update_class(&self, request: pb::UpdateClassRequest) -> Result<pb::Class, Status> {
        self.enrollment_client()
            .update_class(request)
            .await
            .map(|r| r.into_inner().class.unwrap())
    }

    /// A student of `org` with this email (registered, or found if there).
    pub async fn user(&self, org: &str, email: &str) -> pb::User {
        self.enrollment_client()
            .register_user(pb::RegisterUserRequest {
                organization_id: org.into(),
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

    /// `n` students of `org` (`student{i}@example.com`); their ids.
    pub async fn users(&self, org: &str, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            let batch = join_all(chunk.iter().map(|i| async move {
                self.user(org, &format!("student{i}@example.com"))
                    .await
                    .user_id
            }))
            .await;
            ids.extend(batch);
        }
        ids
    }

    /// The account of `email` in `org`, if there is one.
    pub async fn find_user(&self, org: &str, email: &str) -> Option<pb::User> {
        let found = self
            .enrollment_client()
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

    /// Enroll, as an administrator does (no key, no redemption).
    pub async fn enroll(
        &self,
        class_id: &str,
        user_id: &str,
    ) -> Result<pb::EnrollResponse, Status> {
        self.enroll_for(class_id, user_id, "").await
    }

    /// Enroll on behalf of redemption `redemption_id`.
    pub async fn enroll_for(
        &self,
        class_id: &str,
        user_id: &str,
        redemption_id: &str,
    ) -> Result<pb::EnrollResponse, Status> {
        // Only the redemption service names a redemption.
        let mut client = if redemption_id.is_empty() {
            EnrollmentServiceClient::new(self.enrollment_service.channel().await)
        } else {
            EnrollmentServiceClient::with_interceptor(
                self.enrollment_service.channel_as("redemption"),
                crate::pki::TestAuth::none(),
            )
        };
        client
            .enroll(pb::EnrollRequest {
                class_id: class_id.into(),
                user_id: user_id.into(),
                redemption_id: redemption_id.into(),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// CancelEnrollment.
    pub async fn cancel(
        &self,
        enrollment_id: &str,
    ) -> Result<pb::CancelEnrollmentResponse, Status> {
        self.enrollment_client()
            .cancel_enrollment(pb::CancelEnrollmentRequest {
                enrollment_id: enrollment_id.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// A class's active enrollments through ListEnrollments, `page_size` a page.
    pub async fn roster(&self, class_id: &str, page_size: i32) -> Vec<pb::Enrollment> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .enrollment_client()
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

    /// A subscription profile of `org`: courses A and B for 90 days.
    pub async fn profile(&self, org: &str) -> pb::SubscriptionProfile {
        self.enrollment_client()
            .create_subscription_profile(pb::CreateSubscriptionProfileRequest {
                organization_id: org.into(),
                name: "Everything".into(),
                course_ids: vec!["A".into(), "B".into()],
                duration_days: 90,
            })
            .await
            .unwrap()
            .into_inner()
            .profile
            .unwrap()
    }

    // Key issuance.

    /// A new event key for the class, with a generated code.
    pub async fn event_key(&self, class_id: &str, after_end: bool) -> pb::Key {
        self.set_event_key(class_id, "", after_end)
            .await
            .unwrap()
            .key
            .unwrap()
    }

    /// SetEventKey; `custom` empty for a generated code.
    pub async fn set_event_key(
        &self,
        class_id: &str,
        custom: &str,
        after_end: bool,
    ) -> Result<pb::SetEventKeyResponse, Status> {
        self.keys_client()
            .set_event_key(pb::SetEventKeyRequest {
                class_id: class_id.into(),
                custom_code: custom.into(),
                redeemable_after_class_end: after_end,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// DisableEventKey.
    pub async fn disable_event_key(
        &self,
        class_id: &str,
    ) -> Result<pb::DisableEventKeyResponse, Status> {
        self.keys_client()
            .disable_event_key(pb::DisableEventKeyRequest {
                class_id: class_id.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// `count` new class enrollment keys of a class.
    pub async fn class_keys(&self, class_id: &str, count: i32) -> Vec<pb::Key> {
        self.try_class_keys(class_id, count).await.unwrap()
    }

    pub async fn try_class_keys(&self, class_id: &str, count: i32) -> Result<Vec<pb::Key>, Status> {
        self.keys_client()
            .generate_class_enrollment_keys(pb::GenerateClassEnrollmentKeysRequest {
                class_id: class_id.into(),
                count,
            })
            .await
            .map(|r| r.into_inner().keys)
    }

    /// A new pool named "Spring campaign" of `count` keys of `uses_per_key`
    /// uses for the profile.
    pub async fn pool(&self, profile_id: &str, count: i32, uses_per_key: i32) -> pb::KeyPool {
        self.generate_pool(pb::GenerateSubscriptionKeysRequest {
            profile_id: profile_id.into(),
            count,
            pool_name: "Spring campaign".into(),
            uses_per_key,
            ..Default::default()
        })
        .await
    }

    /// GenerateSubscriptionKeys, which must make all `count` keys asked for.
    pub async fn generate_pool(&self, request: pb::GenerateSubscriptionKeysRequest) -> pb::KeyPool {
        let count = request.count;
        let response = self
            .keys_client()
            .generate_subscription_keys(request)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.generated, count);
        response.pool.unwrap()
    }

    /// A pool of `count` single-use keys of a new [`profile`](Self::profile)
    /// of `org`, valid from `from` (now if `None`): the pool and its keys.
    pub async fn subscription_pool(
        &self,
        org: &str,
        count: i32,
        from: Option<DateTime<Utc>>,
    ) -> (pb::KeyPool, Vec<pb::Key>) {
        let profile = self.profile(org).await;
        let pool = self
            .generate_pool(pb::GenerateSubscriptionKeysRequest {
                profile_id: profile.profile_id,
                count,
                valid_from: from.map(to_timestamp),
                ..Default::default()
            })
            .await;
        let keys = self
            .list_keys(pool_scope(&pool.pool_id), pb::KeyStatus::Unspecified, 1000)
            .await;
        (pool, keys)
    }

    /// GetKey by id.
    pub async fn get_key(&self, key_id: &str) -> pb::Key {
        self.try_get_key(key_id).await.unwrap()
    }

    pub async fn try_get_key(&self, key_id: &str) -> Result<pb::Key, Status> {
        self.get_key_by(get_key_request::Selector::KeyId(key_id.into()))
            .await
    }

    /// GetKey by a code as a person typed it.
    pub async fn key_by_code(&self, code: &str) -> Result<pb::Key, Status> {
        self.get_key_by(get_key_request::Selector::Code(code.into()))
            .await
    }

    async fn get_key_by(&self, selector: get_key_request::Selector) -> Result<pb::Key, Status> {
        self.keys_client()
            .get_key(pb::GetKeyRequest {
                selector: Some(selector),
            })
            .await
            .map(|r| r.into_inner().key.unwrap())
    }

    /// Every key in `scope` of `status`, through ListKeys `page_size` a page
    /// (each page no longer than that).
    pub async fn list_keys(
        &self,
        scope: Option<list_keys_request::Scope>,
        status: pb::KeyStatus,
        page_size: i32,
    ) -> Vec<pb::Key> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .keys_client()
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

    /// ExportKeys of every key in `scope`, the stream read to its end and
    /// parsed.
    pub async fn export(&self, scope: export_keys_request::Scope) -> Result<Export, Status> {
        let mut stream = self
            .keys_client()
            .export_keys(pb::ExportKeysRequest {
                scope: Some(scope),
                status: 0,
            })
            .await?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await? {
            bytes.extend(chunk.chunk);
        }
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        Ok(Export {
            header: reader.headers().unwrap().clone(),
            rows: reader.records().map(Result::unwrap).collect(),
        })
    }

    /// ConsumeKey.
    pub async fn consume(
        &self,
        key_id: &str,
        user_id: &str,
        redemption_id: &str,
        generation: i64,
    ) -> Result<pb::ConsumeKeyResponse, Status> {
        self.internal_keys_client()
            .consume_key(pb::ConsumeKeyRequest {
                key_id: key_id.into(),
                user_id: user_id.into(),
                redemption_id: redemption_id.into(),
                generation,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// ReleaseKey.
    pub async fn release(
        &self,
        key_id: &str,
        redemption_id: &str,
        generation: i64,
    ) -> Result<pb::ReleaseKeyResponse, Status> {
        self.internal_keys_client()
            .release_key(pb::ReleaseKeyRequest {
                key_id: key_id.into(),
                redemption_id: redemption_id.into(),
                generation,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// RevokeKey.
    pub async fn revoke(&self, key_id: &str) -> Result<pb::RevokeKeyResponse, Status> {
        self.keys_client()
            .revoke_key(pb::RevokeKeyRequest {
                key_id: key_id.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// ResolveKey.
    pub async fn resolve(
        &self,
        code: &str,
        user_id: &str,
    ) -> Result<pb::ResolveKeyResponse, Status> {
        self.internal_keys_client()
            .resolve_key(pb::ResolveKeyRequest {
                code: code.into(),
                user_id: user_id.into(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// RenderNotification of `template` for the class: the text.
    pub async fn render(&self, class_id: &str, template: &str) -> Result<String, Status> {
        self.keys_client()
            .render_notification(pb::RenderNotificationRequest {
                class_id: class_id.into(),
                template: template.into(),
            })
            .await
            .map(|r| r.into_inner().text)
    }

    // Redemption. These return futures that own their client, so a test may
    // spawn them.

    /// RedeemKey on replica `i`.
    pub fn redeem(
        &self,
        i: usize,
        request: pb::RedeemKeyRequest,
    ) -> impl Future<Output = Result<pb::RedeemKeyResponse, Status>> + use<> {
        call_redeem(self.redemption_client(i), request)
    }

    /// RedeemKey on replica `i`, given up by the client after `deadline`.
    pub fn redeem_within(
        &self,
        i: usize,
        request: pb::RedeemKeyRequest,
        deadline: Duration,
    ) -> impl Future<Output = Result<pb::RedeemKeyResponse, Status>> + use<> {
        let mut client = self.redemption_client(i);
        let mut request = tonic::Request::new(request);
        request.set_timeout(deadline);
        async move {
            client
                .redeem_key(request)
                .await
                .map(tonic::Response::into_inner)
        }
    }

    /// RedeemKey on replica `i` as a client is told to call it: an outage
    /// (UNAVAILABLE, ABORTED, INTERNAL) is retried with the same request and
    /// idempotency key, up to 20 times 200 ms apart.
    pub fn redeem_retrying(
        &self,
        i: usize,
        request: pb::RedeemKeyRequest,
    ) -> impl Future<Output = Result<pb::RedeemKeyResponse, Status>> + use<> {
        let outage = &[Code::Unavailable, Code::Aborted, Code::Internal];
        retry_redeem(self.redemption_client(i), request, outage, 20, 200)
    }

    /// RedeemKey on replica 0, retried on UNAVAILABLE and ABORTED (same
    /// idempotency key) until it gets an answer, for up to 30 s. INTERNAL is
    /// an answer here: a test waiting out a slow step must see it.
    pub fn redeem_until_answered(
        &self,
        request: pb::RedeemKeyRequest,
    ) -> impl Future<Output = Result<pb::RedeemKeyResponse, Status>> + use<> {
        let waiting = &[Code::Unavailable, Code::Aborted];
        retry_redeem(self.redemption_client(0), request, waiting, 60, 500)
    }

    /// ValidateKey on replica `i`.
    pub async fn validate(&self, i: usize, code: &str, user_id: &str) -> pb::ValidateKeyResponse {
        self.redemption_client(i)
            .validate_key(pb::ValidateKeyRequest {
                code: code.into(),
                user_id: user_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    // Behind the services' backs.

    /// The users holding an active seat in a class, read from PostgreSQL.
    pub async fn seated(&self, class_id: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT user_id::text FROM enrollment.enrollments WHERE class_id = $1::uuid AND cancelled_at IS NULL",
        )
        .bind(class_id)
        .fetch_all(&mut self.db().await)
        .await
        .unwrap()
    }

    /// Statements run on this app's database so far, by text, as
    /// `pg_stat_statements` counts them. Compare two with [`statements_run`].
    pub async fn statements(&self) -> HashMap<String, i64> {
        let mut db = self.db().await;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public")
            .execute(&mut db)
            .await
            .expect("pg_stat_statements must be preloaded (scripts/env.sh starts PostgreSQL so)");
        sqlx::query_as(
            "SELECT query, sum(calls)::bigint FROM public.pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
             GROUP BY query",
        )
        .fetch_all(&mut db)
        .await
        .unwrap()
        .into_iter()
        .collect()
    }

    /// Active roster rows of a class, counted in PostgreSQL.
    pub async fn active_rows(&self, class_id: &str) -> i64 {
        self.seated(class_id).await.len() as i64
    }
}

async fn call_redeem(
    mut client: Redeem,
    request: pb::RedeemKeyRequest,
) -> Result<pb::RedeemKeyResponse, Status> {
    client
        .redeem_key(request)
        .await
        .map(tonic::Response::into_inner)
}

/// RedeemKey, called again with the same request while it answers one of
/// `codes`, at most `times` more times, `pause_ms` apart.
async fn retry_redeem(
    client: Redeem,
    request: pb::RedeemKeyRequest,
    codes: &'static [Code],
    times: usize,
    pause_ms: u64,
) -> Result<pb::RedeemKeyResponse, Status> {
    let mut result = call_redeem(client.clone(), request.clone()).await;
    for _ in 0..times {
        match &result {
            Err(s) if codes.contains(&s.code()) => {
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                result = call_redeem(client.clone(), request.clone()).await;
            }
            _ => break,
        }
    }
    result
}

/// The statements run between two [`TestApp::statements`] snapshots, with
/// how often, leaving out the snapshots' own (their connection's set-up and
/// the extension's look-ups).
pub fn statements_run(
    before: &HashMap<String, i64>,
    after: &HashMap<String, i64>,
) -> Vec<(String, i64)> {
    let own = ["pg_stat_statements", "current_database()"];
    let mut ran: Vec<(String, i64)> = after
        .iter()
        .filter(|(query, _)| !own.iter().any(|o| query.contains(o)))
        .map(|(query, calls)| (query.clone(), calls - before.get(query).unwrap_or(&0)))
        .filter(|(_, calls)| *calls > 0)
        .collect();
    ran.sort();
    ran
}

/// An ExportKeys stream, parsed.
#[derive(Debug)]
pub struct Export {
    pub header: csv::StringRecord,
    pub rows: Vec<csv::StringRecord>,
}

/// A fresh organization id.
pub fn org() -> String {
    let org = format!("org-{}", uuid::Uuid::new_v4().simple());
    crate::pki::register_org(&org);
    org
}

/// A fresh UUID: an id nothing has.
pub fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A fresh idempotency key.
pub fn idem() -> String {
    uuid()
}

/// CreateClass of `org` for `max` students, from tomorrow for two days, with
/// seven days of lab access.
pub fn class_request(org: &str, max: i32) -> pb::CreateClassRequest {
    let start = Utc::now() + chrono::Duration::days(1);
    pb::CreateClassRequest {
        organization_id: org.into(),
        title: "Rust for services".into(),
        course_id: "RUST-101".into(),
        start_time: Some(to_timestamp(start)),
        end_time: Some(to_timestamp(start + chrono::Duration::days(2))),
        max_students: max,
        lab_access_days: 7,
        instructor_ids: Vec::new(),
    }
}

/// RedeemKey of `code` by an existing user.
pub fn as_user(code: &str, user_id: &str, idempotency_key: &str) -> pb::RedeemKeyRequest {
    pb::RedeemKeyRequest {
        code: code.into(),
        redeemer: Some(Redeemer::UserId(user_id.into())),
        idempotency_key: idempotency_key.into(),
    }
}

/// RedeemKey of `code` by someone registering as they redeem (a fresh
/// idempotency key).
pub fn as_new(code: &str, org: &str, email: &str, name: &str) -> pb::RedeemKeyRequest {
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

/// The enrollment a redemption granted.
pub fn enrollment(r: &pb::RedeemKeyResponse) -> &pb::Enrollment {
    match r.grant.as_ref() {
        Some(Grant::Enrollment(e)) => e,
        other => panic!("expected an enrollment, got {other:?}"),
    }
}

/// ListKeys of a class's keys.
pub fn class_scope(class_id: &str) -> Option<list_keys_request::Scope> {
    Some(list_keys_request::Scope::ClassId(class_id.into()))
}

/// ListKeys of a pool's keys.
pub fn pool_scope(pool_id: &str) -> Option<list_keys_request::Scope> {
    Some(list_keys_request::Scope::PoolId(pool_id.into()))
}
