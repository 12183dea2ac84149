//! A replica's life as Kubernetes drives it: it starts without migrating
//! unless told to; liveness is the process alone while readiness follows
//! PostgreSQL, so a database outage takes replicas out of rotation without
//! restarting them, and they come back on their own; a replica told to stop
//! keeps accepting calls for its shutdown delay, then drains, so a rolling
//! restart behind a load balancer fails no call.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trainingkeys_tests::{Spawned, TestApp, as_user, eventually, idem, org};

/// The health of `service` name at `spawned` (`None`: no answer).
async fn health(spawned: &Spawned, service: &str) -> Option<i32> {
    let mut client = HealthClient::new(spawned.channel().await);
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

const SERVING: Option<i32> = Some(ServingStatus::Serving as i32);
const NOT_SERVING: Option<i32> = Some(ServingStatus::NotServing as i32);

/// An enrollment service on `database_url`, migrating on start or not.
async fn enrollment_on(database_url: &str, migrate: bool) -> Spawned {
    let mut config = trainingkeys_enrollment::Config::for_tests(database_url).unwrap();
    trainingkeys_tests::for_tests(&mut config.common, "enrollment");
    config.common.migrate_on_start = migrate;
    trainingkeys_tests::spawn::<trainingkeys_enrollment::Application>(config).await
}

/// Every service of `app`: its redemption replicas and both peers.
fn every_service(app: &TestApp) -> Vec<&Spawned> {
    app.replicas
        .iter()
        .chain([&app.enrollment_service, &app.keys_service])
        .collect()
}

/// Whether `service`'s health for `name` becomes `status` within `within`.
async fn becomes(service: &Spawned, name: &str, status: Option<i32>, within: Duration) -> bool {
    eventually(within, || async { health(service, name).await == status }).await
}

fn loopback() -> SocketAddr {
    let port = trainingkeys_shared::server::unused_port().unwrap();
    ([127, 0, 0, 1], port).into()
}

/// `GET path` over plaintext HTTP at `addr`: the status code.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn serve_migrates_only_when_told_to() {
    let database_url = trainingkeys_tests::fresh_database().await;
    let schema_exists = || async {
        use sqlx::Connection as _;
        let mut db = sqlx::PgConnection::connect(&database_url).await.unwrap();
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'enrollment')",
        )
        .fetch_one(&mut db)
        .await
        .unwrap()
    };
    let mut config = trainingkeys_enrollment::Config::for_tests(&database_url).unwrap();
    trainingkeys_tests::for_tests(&mut config.common, "enrollment");
    config.common.migrate_on_start = false;
    let service =
        trainingkeys_tests::spawn::<trainingkeys_enrollment::Application>(config.clone()).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            health(&service, "liveness").await == SERVING
        })
        .await
    );
    assert!(
        !schema_exists().await,
        "serve migrated without being told to"
    );
    service.stop().await;

    config.common.migrate_on_start = true;
    let service = trainingkeys_tests::spawn::<trainingkeys_enrollment::Application>(config).await;
    assert!(schema_exists().await, "MIGRATE_ON_START did not migrate");
    service.stop().await;
}

/// PostgreSQL stopped for a minute: every replica stays up (liveness
/// SERVING, the same process), is out of rotation (readiness NOT_SERVING),
/// a replica started meanwhile waits for the database to migrate, and all
/// of them are ready and redeeming again once it is back, none restarted.
/// Runs alone (.config/nextest.toml): it stops the shared test PostgreSQL.
#[tokio::test]
async fn a_database_outage_of_a_minute_is_ridden_out_without_restarts() {
    let restart = std::env::var("TEST_PG_RESTART")
        .expect("TEST_PG_RESTART: run with `make test`, which owns the test PostgreSQL");
    let mut app = TestApp::start(3).await;
    let org = org();
    let class = app.class(&org, 50).await;
    let key = app.event_key(&class.class_id, false).await;
    let users = app.users(&org, 4).await;
    // Two databases for services started during the outage: a fresh one (its
    // migrations wait), and one whose migration history this binary does not
    // know (its migrations can never apply).
    let fresh = trainingkeys_tests::fresh_database().await;
    let unknown = trainingkeys_tests::fresh_database().await;
    {
        let service = enrollment_on(&unknown, true).await;
        service.stop().await;
        use sqlx::Connection as _;
        let mut db = sqlx::PgConnection::connect(&unknown).await.unwrap();
        sqlx::query(
            "INSERT INTO enrollment._sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (99999, 'from a newer release', true, '\\x00', 0)",
        )
        .execute(&mut db)
        .await
        .unwrap();
    }
    for i in 0..3 {
        assert!(
            eventually(Duration::from_secs(10), || async {
                health(&app.replicas[i], "readiness").await == SERVING
            })
            .await
        );
    }

    // Down for 60 s, then started again (in the background).
    let outage = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("{restart} 60"))
            .status()
    });
    for service in every_service(&app) {
        assert!(
            becomes(service, "readiness", NOT_SERVING, Duration::from_secs(20)).await,
            "{} stayed ready without its database",
            service.addr
        );
        assert_eq!(health(service, "liveness").await, SERVING);
    }
    // A replica that starts now starts (it would crash-loop if it had to
    // migrate first), NOT_SERVING.
    let late = app.add_replica(|_| {}).await;
    assert_eq!(health(&app.replicas[late], "readiness").await, NOT_SERVING);
    assert_eq!(health(&app.replicas[late], "liveness").await, SERVING);
    // Told to migrate, on a database it cannot reach: it starts too, and
    // refuses calls as NOT_READY (none may run on a schema not yet made).
    let waiting = enrollment_on(&fresh, true).await;
    let doomed = enrollment_on(&unknown, true).await;
    assert_eq!(health(&waiting, "liveness").await, SERVING);
    assert_eq!(health(&waiting, "readiness").await, NOT_SERVING);
    let mut client =
        trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient::new(
            waiting.channel().await,
        );
    let refused = client
        .get_class(trainingkeys_proto::v1::GetClassRequest {
            class_id: uuid::Uuid::new_v4().to_string(),
        })
        .await;
    trainingkeys_tests::assert_status(refused, tonic::Code::Unavailable, "NOT_READY");
    // Calls meanwhile fail fast and precisely, not hang.
    let started = tokio::time::Instant::now();
    let during = app.redeem(0, as_user(&key.code, &users[3], &idem())).await;
    assert_eq!(
        during.as_ref().map_err(tonic::Status::code).err(),
        Some(tonic::Code::Unavailable),
        "{during:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    let restarted = outage.await.unwrap();
    assert!(
        restarted.is_ok_and(|s| s.success()),
        "PostgreSQL did not start again"
    );
    for service in every_service(&app) {
        assert!(
            becomes(service, "readiness", SERVING, Duration::from_secs(30)).await,
            "{} did not become ready again",
            service.addr
        );
        assert!(!service.handle.is_finished(), "{} stopped", service.addr);
    }
    // The waiting one migrated and is ready; the one whose migrations can
    // never apply stopped, saying why, instead of waiting for ever.
    assert!(
        eventually(Duration::from_secs(30), || async {
            health(&waiting, "readiness").await == SERVING
        })
        .await,
        "the service started during the outage did not migrate and become ready"
    );
    let stopped = tokio::time::timeout(Duration::from_secs(30), doomed.handle)
        .await
        .expect("a service whose migrations cannot apply kept running")
        .unwrap();
    let error = format!("{:#}", stopped.expect_err("it stopped with an error"));
    assert!(error.contains("migrations failed"), "{error}");
    waiting.stop().await;
    for (i, user) in users.iter().take(4).enumerate() {
        app.redeem(i, as_user(&key.code, user, &idem()))
            .await
            .unwrap_or_else(|e| panic!("replica {i} after the outage: {e:?}"));
    }
}

#[tokio::test]
async fn a_stopping_replica_is_not_ready_but_accepts_calls_for_its_delay() {
    let metrics = loopback();
    let app = TestApp::start_with(1, |c| {
        c.common.shutdown_delay_seconds = 2;
        c.common.metrics_addr = Some(metrics);
    })
    .await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let users = app.users(&org, 2).await;
    let replica = &app.replicas[0];
    assert!(
        eventually(Duration::from_secs(5), || async {
            http_status(metrics, "/readyz").await == Some(200)
        })
        .await
    );
    assert_eq!(http_status(metrics, "/livez").await, Some(200));

    replica.shutdown.cancel();
    assert!(
        eventually(Duration::from_secs(1), || async {
            health(replica, "readiness").await == NOT_SERVING
        })
        .await
    );
    assert_eq!(http_status(metrics, "/readyz").await, Some(503));
    assert_eq!(health(replica, "liveness").await, SERVING);
    // A new connection and a call, inside the delay: served.
    let mut fresh = trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient::new(
        replica.channel().await,
    );
    fresh
        .redeem_key(as_user(&key.code, &users[0], &idem()))
        .await
        .expect("a call inside the shutdown delay is served");
    // After it, the replica stops listening.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        tokio::net::TcpStream::connect(replica.addr).await.is_err(),
        "still listening after the delay"
    );
}

/// Steady redemptions through haproxy over three replicas while each is
/// restarted in turn, as a rollout does: not one call fails.
#[tokio::test]
async fn a_rolling_restart_behind_the_load_balancer_fails_no_call() {
    let addrs: Vec<(SocketAddr, SocketAddr)> = (0..3).map(|_| (loopback(), loopback())).collect();
    let at = |i: usize| {
        let (grpc, http) = addrs[i];
        move |c: &mut trainingkeys_redemption::Config| {
            c.listen_addr = grpc;
            c.common.metrics_addr = Some(http);
            c.common.shutdown_delay_seconds = 1;
        }
    };
    let mut app = TestApp::start(0).await;
    for i in 0..3 {
        app.add_replica(at(i)).await;
    }
    let probes: Vec<SocketAddr> = addrs.iter().map(|(_, http)| *http).collect();
    app.behind_checked_load_balancer(&probes).await;
    let org = org();
    let class = app.class(&org, 100_000).await;
    let key = app.event_key(&class.class_id, false).await;
    let users = Arc::new(app.users(&org, 3000).await);

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let call = app.redemption_client(w);
            let (users, next, done, code) =
                (users.clone(), next.clone(), done.clone(), key.code.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut ok = 0;
                while !done.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(user) = users.get(n) else { break };
                    let mut client = call.clone();
                    match client.redeem_key(as_user(&code, user, &idem())).await {
                        Ok(_) => ok += 1,
                        Err(status) => failures.push(format!("{status:?}")),
                    }
                }
                (ok, failures)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, probe) in probes.iter().enumerate() {
        let before = next.load(Ordering::Relaxed);
        app.restart_replica(i, at(i)).await;
        assert!(
            eventually(Duration::from_secs(10), || async {
                http_status(*probe, "/readyz").await == Some(200)
            })
            .await,
            "replica {i} did not come back"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            next.load(Ordering::Relaxed) > before,
            "no load while replica {i} restarted"
        );
    }
    let served_during = next.load(Ordering::Relaxed);
    assert!(
        served_during < users.len(),
        "the load ran out before the rollout ended"
    );
    done.store(true, Ordering::Relaxed);
    let mut ok = 0;
    let mut failures = Vec::new();
    for worker in workers {
        let (n, f) = worker.await.unwrap();
        ok += n;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} calls failed: {failures:?}",
        failures.len()
    );
    assert!(ok > 100, "only {ok} calls");
}

/// Peers named by a host name (a headless Service in Kubernetes) are
/// resolved, dialed at their addresses and checked by their name: the
/// whole redemption works over them. A name that does not resolve makes
/// calls fail as an outage within the peer timeout, never hang.
#[tokio::test]
async fn peers_named_by_host_are_resolved_and_balanced_over() {
    let app = TestApp::start(0).await;
    let by_name = |url: String| url.replace("127.0.0.1", "localhost");
    let mut app = app;
    let (enrollment, keys) = (
        by_name(app.enrollment_service.url()),
        by_name(app.keys_service.url()),
    );
    app.add_replica(|c| {
        c.enrollment_url = enrollment.clone();
        c.key_issuance_url = keys.clone();
    })
    .await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let users = app.users(&org, 2).await;
    app.redeem(0, as_user(&key.code, &users[0], &idem()))
        .await
        .expect("a redemption over peers named by host");

    let unresolvable = app
        .add_replica(|c| {
            c.key_issuance_url = "https://no-such-peer.invalid:50052".into();
            c.peer_timeout_ms = 500;
        })
        .await;
    let started = tokio::time::Instant::now();
    let status = app
        .redeem(unresolvable, as_user(&key.code, &users[1], &idem()))
        .await
        .expect_err("no key issuance to ask");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

/// A balanced peer with one live replica and one whose port refuses
/// connections: calls go to the live one (the dead one, though it fails
/// fastest, is set aside after a failure), and every call succeeds within
/// `peer::call`'s retries.
#[tokio::test]
async fn a_balanced_peer_avoids_a_replica_that_refuses_connections() {
    use tower::discover::Change;
    use trainingkeys_shared::rpc::{Client, Replica};
    let app = TestApp::start(0).await;
    let live = app.enrollment_service.addr;
    let dead: SocketAddr = loopback(); // nothing listens there
    let replica = |addr: SocketAddr| {
        Replica::new(trainingkeys_tests::pki::channel(
            &format!("https://{addr}"),
            "redemption",
        ))
    };
    use futures::StreamExt as _;
    let discovered = futures::stream::iter([
        Ok::<_, std::convert::Infallible>(Change::Insert(dead, replica(dead))),
        Ok(Change::Insert(live, replica(live))),
    ])
    .chain(futures::stream::pending());
    let client = Client::balanced(Box::pin(discovered), Duration::from_secs(3));
    let calls = (0..50).map(|_| {
        let client = client.clone();
        async move {
            trainingkeys_shared::peer::call(|| {
                let mut health = HealthClient::new(client.clone());
                async move {
                    health
                        .check(HealthCheckRequest {
                            service: "liveness".into(),
                        })
                        .await
                }
            })
            .await
        }
    });
    let answers = futures::future::join_all(calls).await;
    let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 50 failed: {:?}",
        failed.len(),
        failed.first()
    );
}
