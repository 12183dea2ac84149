//! The whole system for end-to-end tests: enrollment, key-issuance and any
//! number of redemption replicas on one fresh database, sharing a Redis
//! server of their own (so a test can flush, stop or restart it).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use trainingkeys_proto::v1::key_issuance_service_client::KeyIssuanceServiceClient;
use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;

use crate::{Spawned, common_config, fresh_database, spawn_enrollment, spawn_key_issuance};

/// A throwaway `redis-server` on a free port, killed on drop.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    child: Option<Child>,
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
        let mut server = Self {
            port: free_port(),
            child: None,
        };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:port/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it with SIGKILL (all state is lost: it never persists).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (make test installs it)");
        self.child = Some(child);
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
    }
}

/// Test settings for a redemption replica: short timeouts so faults show fast.
pub fn redemption_config(
    database_url: &str,
    enrollment: &str,
    keys: &str,
    redis: &str,
) -> trainingkeys_redemption::Config {
    let mut config = trainingkeys_redemption::Config::new(
        common_config(database_url),
        enrollment.to_owned(),
        keys.to_owned(),
        redis.to_owned(),
    );
    config.redemption_timeout_seconds = 3;
    config.recovery_after_seconds = 4;
    config.recovery_interval_seconds = 1;
    config.common.database_max_connections = 30;
    config
}

/// One redemption replica.
pub async fn spawn_redemption(config: trainingkeys_redemption::Config) -> Spawned {
    let app = trainingkeys_redemption::Application::build(config)
        .await
        .expect("build redemption");
    let addr = app.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run(shutdown.clone()));
    Spawned {
        addr,
        shutdown,
        handle,
    }
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
    /// One client per replica.
    pub redeem_clients: Vec<RedemptionServiceClient<Channel>>,
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
