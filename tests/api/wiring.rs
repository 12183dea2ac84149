//! Every service's `build` makes everything that can fail (pools, clients,
//! Redis, secrets) before it binds: a bad setting fails there, naming the
//! setting, even when the port it would bind is taken.

use trainingkeys_shared::cli::Service;
use trainingkeys_tests::{TEST_ENCRYPTION_KEY, TEST_HMAC_SECRET, fresh_database};

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
    let config =
        trainingkeys_enrollment::Config::for_tests("postgres://nobody@/x?sslmode=bogus").unwrap();
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
    let short = Config::for_tests(&db, "http://127.0.0.1:1", "short", TEST_ENCRYPTION_KEY).unwrap();
    fails_before_binding::<Application>(short, |c, a| c.listen_addr = a, "KEY_HMAC_SECRET").await;
    let url = Config::for_tests(&db, "not a url", TEST_HMAC_SECRET, TEST_ENCRYPTION_KEY).unwrap();
    fails_before_binding::<Application>(url, |c, a| c.listen_addr = a, "invalid").await;
}

#[tokio::test]
async fn redemption_refuses_bad_urls() {
    use trainingkeys_redemption::{Application, Config};
    let db = fresh_database().await;
    let ok = "http://127.0.0.1:1";
    let redis = Config::for_tests(&db, ok, ok, "not-a-redis-url").unwrap();
    fails_before_binding::<Application>(redis, |c, a| c.listen_addr = a, "Redis URL").await;
    let peer = Config::for_tests(&db, "not a url", ok, "redis://127.0.0.1:1/").unwrap();
    fails_before_binding::<Application>(peer, |c, a| c.listen_addr = a, "invalid").await;
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
