//! The Prometheus endpoint (`METRICS_ADDR`), scraped after real calls: a
//! duration histogram per RPC method and status code, client histograms for
//! peer calls, PostgreSQL statements and Redis commands, the pool's
//! saturation, the gate's decisions and the guessing limits, with the
//! figures the calls must have produced. Degraded modes show there too.
//! (The services under test share this process, hence one registry: the
//! endpoint shows every service's series, told apart by `rpc_service`.)

use std::collections::BTreeMap;

use futures::future::join_all;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use trainingkeys_tests::{TestApp, as_user, idem, org};

/// One scraped series: its name, labels and value.
#[derive(Debug)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Every series the endpoint at `addr` serves.
async fn scrape(addr: std::net::SocketAddr) -> Vec<Series> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain"), "{head}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                    (k.to_owned(), v.trim_end_matches('"').to_owned())
                })
                .collect();
            Series {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("a number"),
            }
        })
        .collect()
}

/// The sum of the series named `name` whose labels include `labels`.
fn sum(scraped: &[Series], name: &str, labels: &[(&str, &str)]) -> f64 {
    scraped
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

const REDEMPTION: &str = "trainingkeys.v1.RedemptionService";

#[tokio::test]
async fn a_scrape_after_real_calls_shows_every_figure() {
    let port = trainingkeys_shared::server::unused_port().unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let app = TestApp::start_with(1, |c| {
        c.common.metrics_addr = Some(addr);
        c.common.database_max_connections = 7;
    })
    .await;
    let org = org();
    let class = app.class(&org, 2).await;
    let key = app.event_key(&class.class_id, false).await;
    let students = app.users(&org, 3).await;
    for student in &students {
        let _ = app.redeem(0, as_user(&key.code, student, &idem())).await;
    }
    // A bad argument: answered at once, from the headers.
    let bad = app.redeem(0, as_user("", &students[0], &idem())).await;
    assert!(bad.is_err());

    // Paths a caller makes up are counted, as `_OTHER`: never a series each.
    for i in 0..3 {
        let mut grpc = tonic::client::Grpc::new(app.replicas[0].channel_as("redemption"));
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::try_from(format!("/made.Up/Method{i}")).unwrap();
        let made_up: Result<tonic::Response<trainingkeys_proto::v1::ValidateKeyResponse>, _> = grpc
            .unary(
                tonic::Request::new(trainingkeys_proto::v1::ValidateKeyRequest::default()),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await;
        assert!(made_up.is_err());
    }

    // A call whose deadline passes before it is answered is counted too
    // (CANCELLED), though no answer of its own ever starts.
    let mut late = tonic::Request::new(as_user(&key.code, &students[0], &idem()));
    late.set_timeout(std::time::Duration::from_millis(1));
    let expired = app.redemption_client(0).redeem_key(late).await;
    assert!(expired.is_err(), "{expired:?}");

    // (The server learns of it a moment after the client gave up.)
    let expired_seen =
        trainingkeys_tests::eventually(std::time::Duration::from_secs(5), || async {
            let scraped = scrape(addr).await;
            sum(
                &scraped,
                "rpc_server_call_duration_seconds_count",
                &[("rpc_method", "RedeemKey"), ("rpc_grpc_status_code", "1")],
            ) == 1.0
        })
        .await;
    assert!(
        expired_seen,
        "the expired call was not counted as CANCELLED"
    );
    let scraped = scrape(addr).await;
    assert!(
        !scraped.iter().any(|s| s
            .labels
            .values()
            .any(|v| v.starts_with("Method") || v == "made.Up")),
        "a made-up path became a series"
    );
    assert_eq!(
        sum(
            &scraped,
            "rpc_server_call_duration_seconds_count",
            &[("rpc_service", "_OTHER"), ("rpc_method", "_OTHER")]
        ),
        3.0
    );
    let calls = |method: &str, code: &str| {
        sum(
            &scraped,
            "rpc_server_call_duration_seconds_count",
            &[
                ("rpc_service", REDEMPTION),
                ("rpc_method", method),
                ("rpc_grpc_status_code", code),
                ("rpc_system", "grpc"),
            ],
        )
    };
    assert_eq!(calls("RedeemKey", "0"), 2.0, "two seats");
    assert_eq!(
        calls("RedeemKey", "8"),
        1.0,
        "one CLASS_FULL (RESOURCE_EXHAUSTED)"
    );
    assert_eq!(calls("RedeemKey", "3"), 1.0, "one INVALID_ARGUMENT");
    // The histogram's buckets: the last one (+Inf) holds every call.
    let inf = sum(
        &scraped,
        "rpc_server_call_duration_seconds_bucket",
        &[("rpc_method", "RedeemKey"), ("le", "+Inf")],
    );
    assert_eq!(inf, 5.0);
    assert!(
        sum(
            &scraped,
            "rpc_server_call_duration_seconds_sum",
            &[("rpc_method", "RedeemKey")]
        ) > 0.0
    );
    // Every service answers: enrollment and key issuance served the set-up
    // and redemption's peer calls.
    // (Resolutions are shared by concurrent and recent attempts: one at least.)
    for (service, method, least) in [
        ("trainingkeys.v1.EnrollmentService", "Enroll", 2.0),
        ("trainingkeys.v1.KeyIssuanceService", "ResolveKey", 1.0),
    ] {
        assert!(
            sum(
                &scraped,
                "rpc_server_call_duration_seconds_count",
                &[("rpc_service", service), ("rpc_method", method)]
            ) >= least,
            "{service}/{method}"
        );
        // ... and redemption's side of those calls is a client histogram.
        assert!(
            sum(
                &scraped,
                "rpc_client_call_duration_seconds_count",
                &[
                    ("rpc_service", service),
                    ("rpc_method", method),
                    ("rpc_grpc_status_code", "0")
                ]
            ) >= least,
            "client {service}/{method}"
        );
    }
    let statements = sum(
        &scraped,
        "db_client_operation_duration_seconds_count",
        &[("db_system_name", "postgresql")],
    );
    assert!(
        statements >= 3.0,
        "PostgreSQL statements: {statements}: {:?}",
        scraped
            .iter()
            .filter(|s| s.name.starts_with("db_"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        sum(
            &scraped,
            "db_client_operation_duration_seconds_count",
            &[
                ("db_system_name", "redis"),
                ("db_operation_name", "gate_admit")
            ]
        ),
        3.0,
        "one gate admission per student"
    );
    assert_eq!(
        sum(
            &scraped,
            "db_client_connection_max",
            &[("db_client_connection_pool_name", "redemption")]
        ),
        7.0
    );
    assert!(
        scraped
            .iter()
            .any(|s| s.name == "db_client_connection_count"
                && s.labels
                    .get("db_client_connection_state")
                    .map(String::as_str)
                    == Some("used")),
        "pool saturation: used connections"
    );
    let gate = |decision: &str| {
        sum(
            &scraped,
            "trainingkeys_redemption_gate_decisions_total",
            &[("decision", decision)],
        )
    };
    assert_eq!(gate("admitted"), 2.0);
    assert_eq!(gate("full"), 1.0);
    assert_eq!(gate("bypassed"), 0.0);
    assert_eq!(
        sum(
            &scraped,
            "trainingkeys_redemption_redeemed_total",
            &[("outcome", "OK")]
        ),
        2.0
    );
}

#[tokio::test]
async fn redis_outage_shows_in_the_metrics() {
    let port = trainingkeys_shared::server::unused_port().unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let app = TestApp::start_with(1, |c| {
        c.redis_url = "redis://127.0.0.1:1/".into();
        c.common.metrics_addr = Some(addr);
    })
    .await;
    let org = org();
    let class = app.class(&org, 2).await;
    let key = app.event_key(&class.class_id, false).await;
    let students = app.users(&org, 3).await;
    join_all(
        students
            .iter()
            .map(|u| app.redeem(0, as_user(&key.code, u, &idem()))),
    )
    .await;

    let scraped = scrape(addr).await;
    assert_eq!(
        sum(
            &scraped,
            "trainingkeys_redemption_gate_decisions_total",
            &[("decision", "bypassed")]
        ),
        3.0,
        "every admission went to the PostgreSQL guard alone"
    );
    assert!(
        sum(
            &scraped,
            "trainingkeys_redemption_limits_total",
            &[("event", "bypassed")]
        ) >= 3.0,
        "the guessing limits were skipped"
    );
    let redeemed = |outcome: &str| {
        sum(
            &scraped,
            "trainingkeys_redemption_redeemed_total",
            &[("outcome", outcome)],
        )
    };
    assert_eq!(redeemed("OK"), 2.0);
    assert_eq!(redeemed("CLASS_FULL"), 1.0);
    assert_eq!(
        sum(
            &scraped,
            "trainingkeys_redemption_gate_decisions_total",
            &[("decision", "rebuilt")]
        ),
        0.0
    );
}

/// A stopped service's pool leaves the gauges (and is not held open by
/// them).
#[tokio::test]
async fn a_stopped_services_pool_leaves_the_metrics() {
    let port = trainingkeys_shared::server::unused_port().unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut app = TestApp::start_with(0, |_| {}).await;
    app.add_replica(|c| c.common.database_max_connections = 7)
        .await;
    app.add_replica(|c| {
        c.common.metrics_addr = Some(addr);
        c.common.database_max_connections = 3;
    })
    .await;
    let max = |scraped: &[Series]| {
        sum(
            scraped,
            "db_client_connection_max",
            &[("db_client_connection_pool_name", "redemption")],
        )
    };
    assert_eq!(max(&scrape(addr).await), 10.0, "both pools");
    app.stop_replica(0).await;
    assert_eq!(
        max(&scrape(addr).await),
        3.0,
        "the stopped one's pool stayed"
    );
}
