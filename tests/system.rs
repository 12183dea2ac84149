//! The whole system for end-to-end tests: enrollment, key-issuance and any
//! number of redemption replicas on one fresh database, sharing a Redis
//! server of their own (so a test can flush, stop or restart it).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;
use trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use trainingkeys_proto::v1::key_issuance_service_client::KeyIssuanceServiceClient;
use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use tonic::Code;
use trainingkeys_proto::time::to_timestamp;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::redeem_key_request::Redeemer;
use trainingkeys_proto::v1::redeem_key_response::Grant;

use crate::{Spawned, fresh_database, spawn_enrollment, spawn_key_issuance};

/// A throwaway `redis-server` on a free port, killed on drop.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    child: std::sync::Mutex<Option<Child>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub async fn start() -> Self {
        let server = Self {
            port: free_port(),
            child: std::sync::Mutex::new(None),
        };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:port/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it with SIGKILL (all state is lost: it never persists).
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the server process.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = self.child.lock().unwrap().as_ref() {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &child.id().to_string()])
                .status();
        }
    }

    /// Starts it again, empty, on the same port.
    /// The file [`snapshot`](Self::snapshot) writes.
    fn snapshot_file(&self) -> String {
        format!("trainingkeys-redis-{}.rdb", self.port)
    }

    /// Saves the data set now (as a replica would hold it).
    pub async fn snapshot(&self) {
        let _: String = self.cmd(&["SAVE"]).await.unwrap();
    }

    /// Kills the server and starts it from the last snapshot: a replica that
    /// missed every write since, promoted in its place.
    pub async fn fail_over_to_stale_replica(&self) {
        self.start_process(true).await;
    }

    /// Starts it again, empty, on the same port.
    pub async fn restart(&self) {
        self.start_process(false).await;
    }

    async fn start_process(&self, from_snapshot: bool) {
        self.kill();
        let dir = std::env::temp_dir();
        if !from_snapshot {
            let _ = std::fs::remove_file(dir.join(self.snapshot_file()));
        }
        let port = self.port.to_string();
        let dir = dir.to_string_lossy().into_owned();
        let file = self.snapshot_file();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", &dir, "--dbfilename", &file])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (make test installs it)");
        *self.child.lock().unwrap() = Some(child);
        let url = self.url();
        let up = crate::eventually(Duration::from_secs(10), || {
            let url = url.clone();
            async move { self::command::<String>(&url, &["PING"]).await.is_ok() }
        })
        .await;
        assert!(up, "redis-server did not start");
    }

    /// Runs one command.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        command(&self.url(), args).await
    }
}

async fn command<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> redis::RedisResult<T> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(std::env::temp_dir().join(self.snapshot_file()));
    }
}

/// haproxy in front of the redemption replicas: HTTP/2 both ways, balanced
/// per request, as in production behind a load balancer. Killed on drop.
pub struct LoadBalancer {
    /// Its port.
    pub port: u16,
    config: std::path::PathBuf,
    child: std::sync::Mutex<Option<Child>>,
}

impl LoadBalancer {
    /// Starts haproxy over `replicas` and waits until it listens.
    pub async fn start(replicas: &[std::net::SocketAddr]) -> Self {
        let port = free_port();
        let servers: String = replicas
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  server r{i} {a} proto h2\n"))
            .collect();
        let config = std::env::temp_dir().join(format!("trainingkeys-lb-{port}.cfg"));
        std::fs::write(
            &config,
            format!(
                "global\n  maxconn 4000\ndefaults\n  mode http\n  option forwardfor\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend redemption\n  bind 127.0.0.1:{port} proto h2\n  default_backend replicas\nbackend replicas\n  balance roundrobin\n{servers}"
            ),
        )
        .unwrap();
        let lb = Self {
            port,
            config,
            child: std::sync::Mutex::new(None),
        };
        lb.restart().await;
        lb
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills it (connections through it break).
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&self) {
        self.kill();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&self.config)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy must be installed (make test installs it)");
        *self.child.lock().unwrap() = Some(child);
        let port = self.port;
        let up = crate::eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "haproxy did not start");
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Test settings for a redemption replica: short timeouts so faults show fast.
pub fn redemption_config(
    database_url: &str,
    enrollment: &str,
    keys: &str,
    redis: &str,
) -> trainingkeys_redemption::Config {
    let mut config =
        trainingkeys_redemption::Config::for_tests(database_url, enrollment, keys, redis).unwrap();
    crate::for_tests(&mut config.common);
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

/// One redemption replica.
pub async fn spawn_redemption(config: trainingkeys_redemption::Config) -> Spawned {
    crate::spawn::<trainingkeys_redemption::Application>(config).await
}

/// Enrollment, key-issuance and redemption replicas, with clients.
pub struct System {
    pub database_url: String,
    pub redis: RedisServer,
    pub enrollment: Spawned,
    pub keys: Spawned,
    pub replicas: Vec<Spawned>,
    pub enrollment_client: EnrollmentServiceClient<Channel>,
    pub keys_client: KeyIssuanceServiceClient<Channel>,
    /// One client per replica (or, behind the load balancer, per connection).
    pub redeem_clients: Vec<RedemptionServiceClient<Channel>>,
    /// The load balancer, once [`behind_load_balancer`](Self::behind_load_balancer) ran.
    pub lb: Option<LoadBalancer>,
}

impl System {
    /// The system with `replicas` redemption replicas of default test settings.
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
        let enrollment = spawn_enrollment(&database_url).await;
        let keys = spawn_key_issuance(&database_url, &enrollment.url()).await;
        let enrollment_client = EnrollmentServiceClient::new(enrollment.channel().await);
        let keys_client = KeyIssuanceServiceClient::new(keys.channel().await);
        let mut system = Self {
            database_url,
            redis,
            enrollment,
            keys,
            replicas: Vec::new(),
            enrollment_client,
            keys_client,
            redeem_clients: Vec::new(),
            lb: None,
        };
        for _ in 0..replicas {
            system.add_replica(&tweak).await;
        }
        system
    }

    /// This system's settings for a new replica.
    pub fn replica_config(&self) -> trainingkeys_redemption::Config {
        redemption_config(
            &self.database_url,
            &self.enrollment.url(),
            &self.keys.url(),
            &self.redis.url(),
        )
    }

    /// Starts one more replica; returns its index.
    pub async fn add_replica(
        &mut self,
        tweak: impl Fn(&mut trainingkeys_redemption::Config),
    ) -> usize {
        let mut config = self.replica_config();
        tweak(&mut config);
        let replica = spawn_redemption(config).await;
        self.redeem_clients
            .push(RedemptionServiceClient::new(replica.channel().await));
        self.replicas.push(replica);
        self.replicas.len() - 1
    }

    /// Puts haproxy in front of the replicas started so far: from now on
    /// clients (three connections) go through it.
    pub async fn behind_load_balancer(&mut self) {
        let addrs: Vec<_> = self.replicas.iter().map(|r| r.addr).collect();
        let lb = LoadBalancer::start(&addrs).await;
        self.redeem_clients = (0..3)
            .map(|_| {
                RedemptionServiceClient::new(Channel::from_shared(lb.url()).unwrap().connect_lazy())
            })
            .collect();
        self.lb = Some(lb);
    }

    /// Stops replica `i` (as far as its clients can tell, it is gone).
    pub async fn stop_replica(&mut self, i: usize) {
        self.redeem_clients.remove(i);
        self.replicas.remove(i).stop().await;
    }

    /// A client of replica `i`.
    pub fn redeem(&self, i: usize) -> RedemptionServiceClient<Channel> {
        self.redeem_clients[i % self.redeem_clients.len()].clone()
    }

    /// A direct database connection, for checks behind the services' backs.
    pub async fn db(&self) -> sqlx::PgConnection {
        use sqlx::Connection as _;
        sqlx::PgConnection::connect(&self.database_url)
            .await
            .unwrap()
    }
}

// Seeding and reading helpers shared by the redemption and chaos tests.

/// A fresh organization id.
pub fn org() -> String {
    format!("org-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh idempotency key.
pub fn idem() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A class of `max` students running from `start` to `end` (days from now).
pub async fn class(
    sys: &System,
    org: &str,
    max: i32,
    start_days: i64,
    end_days: i64,
    lab_days: i32,
) -> pb::Class {
    let now = Utc::now();
    sys.enrollment_client
        .clone()
        .create_class(pb::CreateClassRequest {
            organization_id: org.into(),
            title: "Herding cats".into(),
            course_id: "CATS-1".into(),
            start_time: Some(to_timestamp(now + chrono::Duration::days(start_days))),
            end_time: Some(to_timestamp(now + chrono::Duration::days(end_days))),
            max_students: max,
            lab_access_days: lab_days,
        })
        .await
        .unwrap()
        .into_inner()
        .class
        .unwrap()
}

/// A new event key for the class.
pub async fn event_key(sys: &System, class_id: &str, after_end: bool) -> pb::Key {
    sys.keys_client
        .clone()
        .set_event_key(pb::SetEventKeyRequest {
            class_id: class_id.into(),
            custom_code: String::new(),
            redeemable_after_class_end: after_end,
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

/// `count` new class enrollment keys of a class.
pub async fn class_keys(sys: &System, class_id: &str, count: i32) -> Vec<pb::Key> {
    sys.keys_client
        .clone()
        .generate_class_enrollment_keys(pb::GenerateClassEnrollmentKeysRequest {
            class_id: class_id.into(),
            count,
        })
        .await
        .unwrap()
        .into_inner()
        .keys
}

/// `n` registered students of `org`; their ids.
pub async fn users(sys: &System, org: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let batch = join_all(chunk.iter().map(|i| {
            let mut c = sys.enrollment_client.clone();
            let org = org.to_owned();
            async move {
                c.register_user(pb::RegisterUserRequest {
                    organization_id: org,
                    email: format!("student{i}@example.com"),
                    display_name: format!("Student {i}"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .user
                .unwrap()
                .user_id
            }
        }))
        .await;
        ids.extend(batch);
    }
    ids
}

/// RedeemKey of `code` by an existing user.
pub fn as_user(code: &str, user_id: &str, idempotency_key: &str) -> pb::RedeemKeyRequest {
    pb::RedeemKeyRequest {
        code: code.into(),
        redeemer: Some(Redeemer::UserId(user_id.into())),
        idempotency_key: idempotency_key.into(),
    }
}

/// Active roster rows of a class, counted in PostgreSQL.
pub async fn active_rows(sys: &System, class_id: &str) -> i64 {
    let mut db = sys.db().await;
    sqlx::query_scalar("SELECT count(*) FROM enrollment.enrollments WHERE class_id = $1::uuid AND cancelled_at IS NULL")
        .bind(class_id)
        .fetch_one(&mut db)
        .await
        .unwrap()
}

// Calls the redemption tests share.

/// A redemption client.
pub type Redeem = RedemptionServiceClient<Channel>;

pub async fn redeem(
    client: &mut Redeem,
    request: pb::RedeemKeyRequest,
) -> Result<pb::RedeemKeyResponse, tonic::Status> {
    client
        .redeem_key(request)
        .await
        .map(tonic::Response::into_inner)
}

/// RedeemKey as a client is told to call it: an outage (UNAVAILABLE,
/// ABORTED, INTERNAL) is retried with the same request and idempotency key.
pub async fn redeem_retrying(
    client: &mut Redeem,
    request: pb::RedeemKeyRequest,
) -> Result<pb::RedeemKeyResponse, tonic::Status> {
    let mut result = redeem(client, request.clone()).await;
    for _ in 0..20 {
        match &result {
            Err(s) if matches!(s.code(), Code::Unavailable | Code::Aborted | Code::Internal) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                result = redeem(client, request.clone()).await;
            }
            _ => break,
        }
    }
    result
}

pub async fn get_class(sys: &System, class_id: &str) -> pb::Class {
    sys.enrollment_client
        .clone()
        .get_class(pb::GetClassRequest {
            class_id: class_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .class
        .unwrap()
}

pub async fn get_key(sys: &System, key_id: &str) -> pb::Key {
    sys.keys_client
        .clone()
        .get_key(pb::GetKeyRequest {
            selector: Some(pb::get_key_request::Selector::KeyId(key_id.into())),
        })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

/// The enrollment a redemption granted.
pub fn enrollment(r: &pb::RedeemKeyResponse) -> &pb::Enrollment {
    match r.grant.as_ref() {
        Some(Grant::Enrollment(e)) => e,
        other => panic!("expected an enrollment, got {other:?}"),
    }
}

pub async fn subscription_pool(
    sys: &System,
    org: &str,
    count: i32,
    from: Option<DateTime<Utc>>,
) -> (pb::KeyPool, Vec<pb::Key>) {
    let profile = sys
        .enrollment_client
        .clone()
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
        .unwrap();
    let pool = sys
        .keys_client
        .clone()
        .generate_subscription_keys(pb::GenerateSubscriptionKeysRequest {
            profile_id: profile.profile_id,
            count,
            valid_from: from.map(to_timestamp),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap();
    let keys = sys
        .keys_client
        .clone()
        .list_keys(pb::ListKeysRequest {
            scope: Some(pb::list_keys_request::Scope::PoolId(pool.pool_id.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    (pool, keys)
}
