//! Logs, traces and metrics. Logs are human-readable or JSON (`LOG_FORMAT`),
//! filtered by `RUST_LOG`. When `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans
//! and metrics (through the global meter provider, exported every
//! `OTEL_METRIC_EXPORT_INTERVAL` ms, 60 s by default) also go to an
//! OpenTelemetry collector over OTLP/gRPC. W3C `traceparent` is read from
//! incoming gRPC metadata and written into outgoing calls, so one redemption
//! is one trace across the three services.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Flushes and stops the trace and metric exporters when dropped (at
/// process exit).
#[must_use = "dropping the guard stops trace and metric export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace exporter shutdown failed: {e}");
        }
        if let Some(meters) = self.meters.take()
            && let Err(e) = meters.shutdown()
        {
            eprintln!("metric exporter shutdown failed: {e}");
        }
    }
}

/// Installs the global subscriber for a process named `service_name`.
/// Call once, from `main`, inside the tokio runtime.
pub fn init(service_name: &'static str, format: LogFormat) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .boxed(),
    };

    let (provider, meters) = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name)
                .build();
            use opentelemetry_otlp::WithTonicConfig as _;
            let tls = otlp_tls(&endpoint)?;
            let mut spans = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            let mut metrics = opentelemetry_otlp::MetricExporter::builder().with_tonic();
            if let Some(tls) = tls {
                spans = spans.with_tls_config(tls.clone());
                metrics = metrics.with_tls_config(tls);
            }
            let spans = spans.build()?;
            let metrics = metrics.build()?;
            let meters = SdkMeterProvider::builder()
                .with_periodic_exporter(metrics)
                .with_resource(resource.clone())
                .build();
            opentelemetry::global::set_meter_provider(meters.clone());
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(spans)
                .with_resource(resource)
                .build();
            (Some(provider), Some(meters))
        }
        _ => (None, None),
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service_name))
            .with_filter(filter())
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter()))
        .with(otel)
        .try_init()?;
    if provider.is_some() {
        tracing::info!("exporting traces and metrics over OTLP");
    }
    Ok(TelemetryGuard { provider, meters })
}

/// TLS for an `https://` OTLP endpoint: the collector is verified against
/// the PEM bundle in `OTEL_EXPORTER_OTLP_CERTIFICATE` (the standard
/// OpenTelemetry variable) when set, else against the public web roots.
fn otlp_tls(endpoint: &str) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    if !endpoint.starts_with("https://") {
        return Ok(None);
    }
    let tls = tonic::transport::ClientTlsConfig::new();
    Ok(Some(
        match std::env::var_os("OTEL_EXPORTER_OTLP_CERTIFICATE") {
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    anyhow::anyhow!(
                        "OTEL_EXPORTER_OTLP_CERTIFICATE {}: {e}",
                        path.to_string_lossy()
                    )
                })?;
                tls.ca_certificate(tonic::transport::Certificate::from_pem(pem))
            }
            None => tls.with_webpki_roots(),
        },
    ))
}

/// Installs a test subscriber that prints only when `TEST_LOG` is set.
pub fn init_for_tests() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
            )
            .with_test_writer()
            .try_init();
    }
}

/// The span of one incoming gRPC call, named `{service}/{method}`. From
/// one of this project's services (`trusted`: proved by its client
/// certificate) the remote span in the call's `traceparent` header is its
/// parent, so a redemption is one trace. From anyone else it is only a
/// link: an untrusted caller cannot graft our spans onto a trace of its
/// choosing (or force them to be sampled).
pub fn server_span(request: &http::Request<()>, trusted: bool) -> tracing::Span {
    use opentelemetry::trace::TraceContextExt as _;
    let path = request.uri().path().trim_start_matches('/');
    let span =
        tracing::info_span!("grpc", otel.name = %path, rpc.system = "grpc", otel.kind = "server");
    let remote = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(request.headers()))
    });
    if trusted {
        let _ = span.set_parent(remote);
    } else {
        let linked = remote.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
    span
}

/// Client interceptor: writes the current span's context into the outgoing
/// call's metadata (`traceparent`).
pub fn inject_trace_context(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
    });
    Ok(request)
}

/// The interceptor type of [`inject_trace_context`], for naming client types.
pub type TraceInterceptor = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}
