//! One trace per redemption: the W3C trace context travels in gRPC metadata
//! from redemption to key-issuance and enrollment, so an OpenTelemetry
//! backend shows redeem → resolve → consume → enroll as one trace. The spans
//! are recorded in memory by a test exporter.

use std::sync::{Arc, Mutex};

use opentelemetry::trace::{SpanKind, TraceId, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use trainingkeys_tests::{TestApp, as_user, idem, org};

/// A finished span: its name, its trace, the traces it links to, its kind
/// and attributes.
#[derive(Debug, Clone)]
struct Finished {
    name: String,
    trace: TraceId,
    links: Vec<TraceId>,
    kind: opentelemetry::trace::SpanKind,
    attributes: std::collections::HashMap<String, String>,
}

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Finished>>>);

impl SpanExporter for Recorder {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        self.0.lock().unwrap().extend(batch.into_iter().map(|s| {
            Finished {
                name: s.name.to_string(),
                trace: s.span_context.trace_id(),
                links: s.links.iter().map(|l| l.span_context.trace_id()).collect(),
                kind: s.span_kind.clone(),
                attributes: s
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                    .collect(),
            }
        }));
        std::future::ready(Ok(()))
    }
}

/// The JSON log lines this test process wrote.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn parsed(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

/// Records this test process's spans and JSON logs with the services' own
/// layers (its only subscriber), and propagates W3C trace context.
fn record_spans() -> (Recorder, SdkTracerProvider, Lines) {
    let recorder = Recorder::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(recorder.clone())
        .build();
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::registry()
        .with(
            trainingkeys_shared::telemetry::json_logs(move || writer.clone())
                .with_filter(tracing_subscriber::EnvFilter::new("info")),
        )
        .with(trainingkeys_shared::telemetry::spans(
            provider.tracer("tests"),
            true,
            tracing_subscriber::EnvFilter::new("info"),
        ));
    tracing::subscriber::set_global_default(subscriber)
        .expect("the test process's only subscriber");
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    (recorder, provider, lines)
}

#[tokio::test]
async fn a_redemption_is_one_trace_across_the_three_services() {
    let (recorder, provider, lines) = record_spans();

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
    let in_trace = |name: &str, kind: SpanKind| {
        spans
            .iter()
            .filter(|s| s.name.ends_with(name) && s.kind == kind)
            .map(|s| s.trace)
            .collect::<Vec<_>>()
    };
    let redeem = in_trace("RedemptionService/RedeemKey", SpanKind::Server);
    assert_eq!(redeem.len(), 1, "spans: {spans:?}");
    let trace = redeem[0];
    for step in [
        "KeyIssuanceService/ResolveKey",
        "KeyIssuanceService/ConsumeKey",
        "EnrollmentService/Enroll",
    ] {
        // The peer's server span, and redemption's client span of the call.
        for kind in [SpanKind::Server, SpanKind::Client] {
            assert!(
                in_trace(step, kind.clone()).contains(&trace),
                "{step} ({kind:?}) is not in the redemption's trace: {spans:?}"
            );
        }
    }
    let server = spans
        .iter()
        .find(|s| s.name.ends_with("RedeemKey"))
        .unwrap();
    for (key, value) in [
        ("rpc.service", "trainingkeys.v1.RedemptionService"),
        ("rpc.method", "RedeemKey"),
        ("rpc.grpc.status_code", "0"),
    ] {
        assert_eq!(
            server.attributes.get(key).map(String::as_str),
            Some(value),
            "{server:?}"
        );
    }
    // Client spans for PostgreSQL statements and Redis calls, in the trace.
    for system in ["postgresql", "redis"] {
        assert!(
            spans.iter().any(|s| s.trace == trace
                && s.kind == SpanKind::Client
                && s.attributes.get("db.system.name").map(String::as_str) == Some(system)),
            "no {system} span in the redemption's trace: {:?}",
            spans
                .iter()
                .filter(|s| s.kind == SpanKind::Client)
                .map(|s| (&s.name, s.trace == trace))
                .collect::<Vec<_>>()
        );
    }

    // Its log lines carry its trace; the access line says how it ended.
    let lines = lines.parsed();
    let access = lines
        .iter()
        .find(|l| l["target"] == "access" && l["fields"]["method"] == "RedeemKey")
        .unwrap_or_else(|| panic!("no access line for RedeemKey: {lines:?}"));
    assert_eq!(access["trace_id"], trace.to_string(), "{access}");
    assert_eq!(
        access["span_id"].as_str().map(str::len),
        Some(16),
        "{access}"
    );
    assert_eq!(access["fields"]["status"], "Ok", "{access}");
    assert_eq!(
        access["fields"]["service"],
        "trainingkeys.v1.RedemptionService"
    );
    assert!(
        access["fields"]["duration_ms"].as_f64().is_some(),
        "{access}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.get("span").is_some())
            .all(|l| l["trace_id"].as_str().map(str::len) == Some(32)),
        "a line written inside a span without its trace id: {:?}",
        lines
            .iter()
            .find(|l| l.get("span").is_some() && l.get("trace_id").is_none())
    );
}

/// A refused call's span is marked as an error only for the server's own
/// faults, and its access line names the reason.
#[tokio::test]
async fn a_failed_call_has_its_status_on_its_span_and_its_reason_in_its_access_line() {
    let (recorder, provider, lines) = record_spans();
    let app = TestApp::start(1).await;
    let org = org();
    let class = app.class(&org, 5).await;
    let user = app.users(&org, 1).await.remove(0);
    let _ = class;
    let refused = app.redeem(0, as_user("NO-SUCH-KEY", &user, &idem())).await;
    assert!(refused.is_err());
    let _ = provider.force_flush();
    let spans = recorder.0.lock().unwrap().clone();
    let server = spans
        .iter()
        .find(|s| s.name.ends_with("RedeemKey") && s.kind == SpanKind::Server)
        .expect("a RedeemKey span");
    assert_eq!(
        server
            .attributes
            .get("rpc.grpc.status_code")
            .map(String::as_str),
        Some("5"),
        "NOT_FOUND: {server:?}"
    );
    let lines = lines.parsed();
    let access = lines
        .iter()
        .find(|l| l["target"] == "access" && l["fields"]["method"] == "RedeemKey")
        .expect("an access line");
    assert_eq!(access["fields"]["status"], "NotFound", "{access}");
    assert_eq!(access["fields"]["reason"], "KEY_NOT_FOUND", "{access}");
}

/// A `traceparent` from an untrusted caller (a bearer token, no service
/// certificate) is not the parent of our spans, only a link: the server
/// span starts a trace of its own.
#[tokio::test]
async fn an_outside_traceparent_is_linked_not_adopted() {
    let (recorder, provider, _) = record_spans();
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
        .find(|s| s.name.ends_with("RedeemKey") && s.kind == SpanKind::Server)
        .expect("a RedeemKey span");
    assert_ne!(redeem.trace, outside, "the outside trace was adopted");
    assert_eq!(
        redeem.links,
        vec![outside],
        "the outside trace is not linked"
    );
    // Inside, the trace still spans the services (redemption is trusted).
    assert!(
        spans
            .iter()
            .any(|s| s.name.ends_with("ResolveKey") && s.trace == redeem.trace),
        "key-issuance's span is not in the redemption's trace"
    );
}
