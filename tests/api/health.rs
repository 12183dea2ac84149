//! grpc.health.v1 and server reflection: SERVING once the database answers,
//! NOT_SERVING as soon as shutdown starts, and a bounded drain.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use trainingkeys_tests::{TestApp, eventually};

#[tokio::test]
async fn health_is_serving_then_flips_on_shutdown() {
    let app = TestApp::start(0).await;
    let mut health = HealthClient::new(app.enrollment_service.channel().await);
    for service in ["", "trainingkeys.v1.EnrollmentService"] {
        let serving = eventually(Duration::from_secs(5), || {
            let mut health = health.clone();
            async move {
                health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .map(|r| r.into_inner().status == ServingStatus::Serving as i32)
                    .unwrap_or(false)
            }
        })
        .await;
        assert!(serving, "{service:?} never became SERVING");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.Such".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

    // An open Watch stream is an in-flight call: it sees the flip to
    // NOT_SERVING, and the drain is bounded by the grace period (2 s here).
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let started = tokio::time::Instant::now();
    app.enrollment_service.shutdown.cancel();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("no update after shutdown");
    assert_eq!(
        next.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    let result = tokio::time::timeout(Duration::from_secs(10), app.enrollment_service.handle)
        .await
        .expect("drain not bounded");
    assert!(result.unwrap().is_ok());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "drain took {:?}",
        started.elapsed()
    );
}

/// HEALTH_LISTEN_ADDR serves health checks in plaintext for Kubernetes
/// probes (which cannot speak TLS), and nothing else: the service's own
/// methods are not there.
#[tokio::test]
async fn the_plaintext_health_port_answers_health_checks_only() {
    let database_url = trainingkeys_tests::fresh_database().await;
    let port = trainingkeys_shared::server::unused_port().unwrap();
    let mut config = trainingkeys_enrollment::Config::for_tests(&database_url).unwrap();
    trainingkeys_tests::for_tests(&mut config.common, "enrollment");
    config.common.health_listen_addr = Some(([127, 0, 0, 1], port).into());
    let service = trainingkeys_tests::spawn::<trainingkeys_enrollment::Application>(config).await;
    let url = format!("http://127.0.0.1:{port}");
    let channel = tonic::transport::Channel::from_shared(url).unwrap();
    let channel = channel.connect().await.unwrap();
    let serving = eventually(Duration::from_secs(5), || {
        let mut health = HealthClient::new(channel.clone());
        async move {
            health
                .check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status == ServingStatus::Serving as i32)
                .unwrap_or(false)
        }
    })
    .await;
    assert!(serving, "the probe port never answered SERVING");
    let other =
        trainingkeys_proto::v1::enrollment_service_client::EnrollmentServiceClient::new(channel)
            .get_class(trainingkeys_proto::v1::GetClassRequest::default())
            .await;
    assert_eq!(other.unwrap_err().code(), tonic::Code::Unimplemented);
    service.stop().await;
}
