//! Every service's `build` makes everything that can fail (pools, clients,
//! Redis, secrets) before it binds: a bad setting fails there, naming the
//! setting, even when the port it would bind is taken.

use trainingkeys_shared::cli::Service;
use trainingkeys_tests::{TEST_ENCRYPTION_KEY, TEST_HMAC_SECRET, for_tests, fresh_database};

/// Builds `S` with its port held by someone else: the error must be about
/// the bad setting (`expected` in its message), not the port.
async fn fails_before_binding<S: Service>(
    mut config: S::Config,
    set_port: impl Fn(&mut S::Config, std::net::SocketAddr),
    expected: &str,
) {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    set_port(&mut config, held.local_addr().unwrap());
    match S::build(config).await {
        Ok(_) => panic!("{} started with a bad setting", S::NAME),
        Err(e) => {
            let message = format!("{e:#}");
            assert!(message.contains(expected), "{}: {message}", S::NAME);
            assert!(
                !message.contains("in use"),
                "{} bound first: {message}",
                S::NAME
            );
        }
    }
}

#[tokio::test]
async fn enrollment_refuses_a_bad_database_url() {
    let mut config =
        trainingkeys_enrollment::Config::for_tests("postgres://nobody@/x?sslmode=bogus").unwrap();
    for_tests(&mut config.common, "enrollment");
    fails_before_binding::<trainingkeys_enrollment::Application>(
        config,
        |c, a| c.listen_addr = a,
        "host",
    )
    .await;
}

#[tokio::test]
async fn key_issuance_refuses_bad_secrets_and_urls() {
    use trainingkeys_key_issuance::{Application, Config};
    let db = fresh_database().await;
    let config = |enrollment: &str, secret: &str| {
        let mut config = Config::for_tests(&db, enrollment, secret, TEST_ENCRYPTION_KEY).unwrap();
        for_tests(&mut config.common, "key-issuance");
        config
    };
    let short = config("https://127.0.0.1:1", "short");
    fails_before_binding::<Application>(short, |c, a| c.listen_addr = a, "KEY_HMAC_SECRET").await;
    let url = config("not a url", TEST_HMAC_SECRET);
    fails_before_binding::<Application>(url, |c, a| c.listen_addr = a, "invalid").await;
    // TLS is configured: a plaintext URL would silently drop it.
    let plain = config("http://127.0.0.1:1", TEST_HMAC_SECRET);
    fails_before_binding::<Application>(plain, |c, a| c.listen_addr = a, "https://").await;
}

#[tokio::test]
async fn redemption_refuses_bad_urls() {
    use trainingkeys_redemption::{Application, Config};
    let db = fresh_database().await;
    let ok = "https://127.0.0.1:1";
    let config = |peer: &str, redis: &str| {
        let mut config = Config::for_tests(&db, peer, ok, redis).unwrap();
        for_tests(&mut config.common, "redemption");
        config
    };
    let redis = config(ok, "not-a-redis-url");
    fails_before_binding::<Application>(redis, |c, a| c.listen_addr = a, "REDIS_URL").await;
    let peer = config("not a url", "redis://127.0.0.1:1/");
    fails_before_binding::<Application>(peer, |c, a| c.listen_addr = a, "invalid").await;
}

/// Without TLS files, without PLAINTEXT=true, or without a JWKS, a service
/// refuses to start, naming the setting; with bad files too.
#[tokio::test]
async fn a_service_refuses_to_start_without_tls_or_a_jwks() {
    use trainingkeys_enrollment::{Application, Config};
    let db = fresh_database().await;
    let bare = Config::for_tests(&db).unwrap();
    fails_before_binding::<Application>(bare.clone(), |c, a| c.listen_addr = a, "TLS_CERT_FILE")
        .await;

    let mut no_jwks = bare.clone();
    for_tests(&mut no_jwks.common, "enrollment");
    no_jwks.common.auth.jwks_file = None;
    fails_before_binding::<Application>(no_jwks, |c, a| c.listen_addr = a, "JWKS_FILE").await;

    let mut swapped = bare.clone();
    for_tests(&mut swapped.common, "enrollment");
    swapped.common.tls.tls_key_file = swapped.common.tls.tls_cert_file.clone();
    fails_before_binding::<Application>(swapped, |c, a| c.listen_addr = a, "TLS_KEY_FILE").await;

    let mut both = bare;
    for_tests(&mut both.common, "enrollment");
    both.common.tls.plaintext = true;
    fails_before_binding::<Application>(both, |c, a| c.listen_addr = a, "choose one").await;
}

/// Tests and tools get the binaries' own defaults, whatever the environment
/// holds.
#[test]
fn configs_for_tests_take_the_binaries_defaults() {
    let config = trainingkeys_redemption::Config::for_tests(
        "postgres://x@127.0.0.1/db",
        "http://e",
        "http://k",
        "redis://r/",
    )
    .unwrap();
    assert_eq!(config.redemption_timeout_seconds, 10);
    assert_eq!(config.recovery_after_seconds, 30);
    assert_eq!(config.common.database_max_connections, 20);
    assert_eq!(config.listen_addr.port(), 0);
}

/// `--help` never prints the values of settings that carry credentials
/// (it prints the environment's value of other settings).
#[test]
fn help_never_shows_credential_values() {
    use clap::Args as _;
    let redemption =
        trainingkeys_redemption::Config::augment_args(clap::Command::new("redemption"));
    let keys = trainingkeys_key_issuance::Config::augment_args(clap::Command::new("key-issuance"));
    let secret = [
        (&redemption, "database_url"),
        (&redemption, "redis_url"),
        (&keys, "database_url"),
        (&keys, "key_hmac_secret"),
        (&keys, "key_hmac_old_secrets"),
        (&keys, "key_encryption_key"),
        (&keys, "key_encryption_old_keys"),
    ];
    for (command, id) in secret {
        let arg = command
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("no setting {id}"));
        assert!(
            arg.is_hide_env_values_set(),
            "--help would print {id}'s value"
        );
    }
}

/// The services reach PostgreSQL over TLS when `DATABASE_URL` asks for it
/// (`sslmode=verify-full` with the server's CA): the pool's connections are
/// encrypted (pg_stat_ssl), and a CA that did not sign the server's
/// certificate is refused. `make test`'s PostgreSQL serves TLS; an external
/// one (no TEST_PG_CA) is not ours to check.
#[tokio::test]
async fn the_services_reach_postgresql_over_verified_tls() {
    use sqlx::Connection as _;
    let Ok(ca) = std::env::var("TEST_PG_CA") else {
        eprintln!("skipped: DATABASE_URL is not make test's own PostgreSQL");
        return;
    };
    let plain = fresh_database().await;
    let tls = format!("{plain}?sslmode=verify-full&sslrootcert={ca}");
    let mut config = trainingkeys_enrollment::Config::for_tests(&tls).unwrap();
    for_tests(&mut config.common, "enrollment");
    let service = trainingkeys_tests::spawn::<trainingkeys_enrollment::Application>(config).await;
    let org = trainingkeys_tests::org();
    trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient::new(
        service.channel().await,
    )
    .create_class(trainingkeys_tests::class_request(&org, 3))
    .await
    .expect("a class created over the TLS pool");
    let mut check = sqlx::PgConnection::connect(&plain).await.unwrap();
    let encrypted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'enrollment' AND a.datname = current_database() AND s.ssl",
    )
    .fetch_one(&mut check)
    .await
    .unwrap();
    assert!(encrypted >= 1, "no TLS connection from the service");
    let wrong_ca = trainingkeys_tests::pki::pki().ca_file();
    let wrong = format!(
        "{plain}?sslmode=verify-full&sslrootcert={}",
        wrong_ca.display()
    );
    assert!(
        sqlx::PgConnection::connect(&wrong).await.is_err(),
        "a server certificate another CA signed was accepted"
    );
    service.stop().await;
}

/// The gate and the guessing limits reach Redis over TLS (`rediss://`,
/// verified against REDIS_CA_FILE): a redemption leaves its class's gate
/// state in the TLS-only server, and without the CA the server is not
/// trusted, so Redis is skipped (the PostgreSQL guard still answers).
#[tokio::test]
async fn redemption_reaches_redis_over_verified_tls() {
    use trainingkeys_tests::servers::RedisServer;
    let tls_redis = RedisServer::start_tls().await;
    let url = tls_redis.url();
    assert!(url.starts_with("rediss://"));
    let ca = trainingkeys_tests::pki::pki().ca_file();
    let app = trainingkeys_tests::TestApp::start_with(1, |c| {
        c.redis_url = url.clone();
        c.redis_ca_file = Some(ca.clone());
    })
    .await;
    let org = trainingkeys_tests::org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let user = app.users(&org, 1).await.remove(0);
    app.redeem(
        0,
        trainingkeys_tests::as_user(&key.code, &user, &trainingkeys_tests::idem()),
    )
    .await
    .unwrap();
    let keys: i64 = tls_redis.cmd(&["DBSIZE"]).await.unwrap();
    assert!(keys > 0, "nothing reached the TLS Redis");

    // Without the CA, the server's certificate is not trusted.
    let untrusted =
        trainingkeys_shared::redis::Redis::new(&url, std::time::Duration::from_secs(2), None)
            .unwrap();
    assert!(
        untrusted.connection().await.is_err(),
        "an unverified server was trusted"
    );
}
