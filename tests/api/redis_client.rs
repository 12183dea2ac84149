//! The Redis client's circuit breaker against real servers: a lone timeout
//! under load is overload, not an outage; callers queued behind a failed
//! connection attempt do not each try again; a black-holed Redis costs a
//! redemption one short wait at most.

use std::time::Duration;

use trainingkeys_shared::redis::{Redis, RedisUnavailable};
use trainingkeys_tests::servers::RedisServer;
use trainingkeys_tests::{TestApp, as_user, idem, org};

async fn ping(redis: &Redis) -> Result<String, RedisUnavailable> {
    redis
        .run("ping", |mut c| async move {
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
}

#[tokio::test]
async fn a_timeout_while_calls_succeed_does_not_open_the_circuit() {
    let server = RedisServer::start().await;
    let redis = Redis::new(&server.url(), Duration::from_millis(300), None).unwrap();
    ping(&redis).await.expect("Redis answers");
    let timed_out = redis
        .run("slow", |_| async {
            Err::<(), _>(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        })
        .await;
    assert!(timed_out.is_err());
    assert!(
        ping(&redis).await.is_ok(),
        "one timeout among successes opened the circuit"
    );
}

/// Redis accepts connections and never answers: every redemption still
/// answers soon (the PostgreSQL guard alone admits), instead of queueing for
/// a connection attempt each.
#[tokio::test]
async fn a_black_holed_redis_costs_a_herd_one_short_wait() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hole.local_addr().unwrap();
    // Accepts, holds, never replies.
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            open.push(socket);
        }
    });
    let app = TestApp::start_with(1, |c| {
        c.redis_url = format!("redis://{addr}/");
        c.redis_timeout_ms = 300;
    })
    .await;
    let org = org();
    let class = app.class(&org, 100).await;
    let key = app.event_key(&class.class_id, false).await;
    let users = app.users(&org, 30).await;
    let started = tokio::time::Instant::now();
    let answers = futures::future::join_all(
        users
            .iter()
            .map(|u| app.redeem(0, as_user(&key.code, u, &idem()))),
    )
    .await;
    let took = started.elapsed();
    let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(took < Duration::from_secs(5), "the herd took {took:?}");
    held.abort();
}
