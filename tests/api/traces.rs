//! One trace per redemption: the W3C trace context travels in gRPC metadata
//! from redemption to key-issuance and enrollment, so an OpenTelemetry
//! backend shows redeem → resolve → consume → enroll as one trace. The spans
//! are recorded in memory by a test exporter.

use std::sync::{Arc, Mutex};

use opentelemetry::trace::{TraceId, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt as _;
use trainingkeys_tests::{TestApp, as_user, idem, org};

/// A finished span: its name, its trace, and the traces it links to.
type Finished = (String, TraceId, Vec<TraceId>);

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Finished>>>);

impl SpanExporter for Recorder {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch.into_iter().map(|s| {
            let links = s.links.iter().map(|l| l.span_context.trace_id()).collect();
            (s.name.to_string(), s.span_context.trace_id(), links)
        }));
        std::future::ready(Ok(()))
    }
}

/// Records this test process's spans (its only subscriber) and propagates
/// W3C trace context.
fn record_spans() -> (Recorder, SdkTracerProvider) {
    let recorder = Recorder::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(recorder.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("tests")));
    tracing::subscriber::set_global_default(subscriber)
        .expect("the test process's only subscriber");
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    (recorder, provider)
}

#[tokio::test]
async fn a_redemption_is_one_trace_across_the_three_services() {
    let (recorder, provider) = record_spans();

    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let keys = app.class_keys(&class.class_id, 1).await;
    let user = app.users(&org, 1).await.remove(0);
    app.redeem(0, as_user(&keys[0].code, &user, &idem()))
        .await
        .unwrap();
    let _ = provider.force_flush();

    let spans = recorder.0.lock().unwrap().clone();
    let trace_of = |name: &str| {
        spans
            .iter()
            .filter(|(n, _, _)| n.ends_with(name))
            .map(|(_, t, _)| *t)
            .collect::<Vec<_>>()
    };
    let redeem = trace_of("RedemptionService/RedeemKey");
    assert_eq!(redeem.len(), 1, "spans: {spans:?}");
    for step in [
        "KeyIssuanceService/ResolveKey",
        "KeyIssuanceService/ConsumeKey",
        "EnrollmentService/Enroll",
    ] {
        assert!(
            trace_of(step).contains(&redeem[0]),
            "{step} is not in the redemption's trace: {spans:?}"
        );
    }
}

/// A `traceparent` from an untrusted caller (a bearer token, no service
/// certificate) is not the parent of our spans, only a link: the server
/// span starts a trace of its own.
#[tokio::test]
async fn an_outside_traceparent_is_linked_not_adopted() {
    let (recorder, provider) = record_spans();
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let key = app.event_key(&class.class_id, false).await;
    let user = app.users(&org, 1).await.remove(0);
    let outside = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(as_user(&key.code, &user, &idem()));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{outside}-b7ad6b7169203331-01").parse().unwrap(),
    );
    app.redemption_client(0).redeem_key(request).await.unwrap();
    let _ = provider.force_flush();
    let outside = TraceId::from_hex(outside).unwrap();
    let spans = recorder.0.lock().unwrap().clone();
    let redeem = spans
        .iter()
        .find(|(name, _, _)| name.ends_with("RedeemKey"))
        .expect("a RedeemKey span");
    assert_ne!(redeem.1, outside, "the outside trace was adopted");
    assert_eq!(redeem.2, vec![outside], "the outside trace is not linked");
    // Inside, the trace still spans the services (redemption is trusted).
    assert!(
        spans
            .iter()
            .any(|(name, trace, _)| name.ends_with("ResolveKey") && *trace == redeem.1),
        "key-issuance's span is not in the redemption's trace"
    );
}
