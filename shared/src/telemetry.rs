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
        LogFormat::Json => json_logs(std::io::stdout).boxed(),
    };

    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .build();
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    let exporting = !endpoint.is_empty();
    // Spans always get ids (the logs carry them), and go out only when a
    // collector is configured.
    let mut tracing = SdkTracerProvider::builder().with_resource(resource.clone());
    let mut metrics_exporter = None;
    if exporting {
        use opentelemetry_otlp::WithTonicConfig as _;
        let tls = otlp_tls(&endpoint)?;
        let mut span_exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        let mut metric_exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic();
        if let Some(tls) = tls {
            span_exporter = span_exporter.with_tls_config(tls.clone());
            metric_exporter = metric_exporter.with_tls_config(tls);
        }
        tracing = tracing.with_batch_exporter(span_exporter.build()?);
        metrics_exporter = Some(metric_exporter.build()?);
    }
    let provider = tracing.build();
    let meters = crate::metrics::install(resource, metrics_exporter)?;
    let tracer = provider.tracer(service_name);
    // OpenTelemetry spans cost every call some CPU: made only when they go
    // somewhere (a collector) or name the JSON log lines (trace ids).
    // PostgreSQL statements are timed either way.
    let traced = exporting || format == LogFormat::Json;
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter()))
        .with(traced.then(|| spans(tracer, exporting, filter())))
        .with((!traced).then(|| Statements.with_filter(statement_events(false))))
        .try_init()?;
    if exporting {
        tracing::info!("exporting traces and metrics over OTLP");
    }
    Ok(TelemetryGuard {
        provider: Some(provider),
        meters,
    })
}

/// JSON log lines to `writer`, each written inside a span carrying that
/// span's `trace_id` and `span_id` first.
pub fn json_logs<S, W>(writer: W) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .event_format(WithTraceIds(
            tracing_subscriber::fmt::format()
                .json()
                .with_current_span(true),
        ))
        .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
        .with_writer(writer)
}

/// Spans: the tracing spans `filter` lets through as OpenTelemetry spans
/// of `tracer`, and PostgreSQL statements timed (and, when `export`, made
/// client spans under the span that ran them).
pub fn spans<S>(
    tracer: opentelemetry_sdk::trace::SdkTracer,
    export: bool,
    filter: EnvFilter,
) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let _ = STATEMENT_TRACER.set((tracer.clone(), export));
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter)
        .and_then(Statements.with_filter(statement_events(export)))
}

/// The tracer of PostgreSQL statements' client spans, and whether spans
/// are exported at all (when not, none are made).
static STATEMENT_TRACER: std::sync::OnceLock<(opentelemetry_sdk::trace::SdkTracer, bool)> =
    std::sync::OnceLock::new();

/// sqlx's statement events (one per statement run, with its duration),
/// and, `with_spans` (statements become client spans), the spans at `info`
/// or above they may run in (a filtered layer sees only the spans its
/// filter lets through: without them a statement would have no parent).
fn statement_events<S>(with_spans: bool) -> impl tracing_subscriber::layer::Filter<S> + Clone
where
    S: tracing::Subscriber,
{
    tracing_subscriber::filter::filter_fn(move |metadata| {
        if metadata.is_span() {
            with_spans && *metadata.level() <= tracing::Level::INFO
        } else {
            metadata.target() == "sqlx::query" && *metadata.level() <= tracing::Level::DEBUG
        }
    })
}

/// Turns each statement sqlx ran (its `sqlx::query` event) into a sample of
/// `db.client.operation.duration` and, when spans are exported, a client
/// span under the span that ran it.
#[derive(Default)]
struct Statements;

/// The process's subscriber, as layers and formatters need it to look up a
/// span's OpenTelemetry context (inside a dispatch, the current one is
/// unreachable). Set when the subscriber is installed.
static DISPATCH: std::sync::OnceLock<tracing::dispatcher::WeakDispatch> =
    std::sync::OnceLock::new();

/// The OpenTelemetry context of span `id`.
fn otel_context(id: &tracing::span::Id) -> Option<opentelemetry::Context> {
    let dispatch = DISPATCH.get()?.upgrade()?;
    tracing_opentelemetry::get_otel_context(id, &dispatch)
}

impl<S> Layer<S> for Statements
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = DISPATCH.set(subscriber.downgrade());
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut statement = Statement::default();
        event.record(&mut statement);
        let Some(elapsed) = statement.elapsed else {
            return;
        };
        let operation = statement
            .summary
            .split_whitespace()
            .next()
            .unwrap_or("unknown")
            .to_ascii_uppercase();
        crate::metrics::DB_CLIENT.record(
            elapsed,
            &[
                opentelemetry::KeyValue::new("db.system.name", "postgresql"),
                opentelemetry::KeyValue::new("db.operation.name", operation.clone()),
            ],
        );
        let Some((tracer, true)) = STATEMENT_TRACER.get() else {
            return;
        };
        let Some(parent) = ctx.event_span(event).map(|span| span.id()) else {
            return;
        };
        let Some(parent) = otel_context(&parent) else {
            return;
        };
        use opentelemetry::trace::{Span as _, Tracer as _};
        let ended = std::time::SystemTime::now();
        let started = ended - std::time::Duration::from_secs_f64(elapsed);
        let mut span = tracer
            .span_builder(operation.clone())
            .with_kind(opentelemetry::trace::SpanKind::Client)
            .with_start_time(started)
            .with_attributes([
                opentelemetry::KeyValue::new("db.system.name", "postgresql"),
                opentelemetry::KeyValue::new("db.operation.name", operation),
                opentelemetry::KeyValue::new("db.query.summary", statement.summary),
            ])
            .start_with_context(tracer, &parent);
        span.end_with_timestamp(ended);
    }
}

/// The fields of one sqlx statement event.
#[derive(Default)]
struct Statement {
    summary: String,
    elapsed: Option<f64>,
}

impl tracing::field::Visit for Statement {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.elapsed = Some(value);
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "summary" {
            value.clone_into(&mut self.summary);
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "summary" {
            self.summary = format!("{value:?}");
        }
    }
}

/// The JSON log format, with the OpenTelemetry `trace_id` and `span_id`
/// of the span each line was written in (first in the object), so a log
/// line leads to its trace.
struct WithTraceIds<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        let ids = ctx.lookup_current().and_then(|span| {
            let id = span.id();
            drop(span);
            let context = otel_context(&id)?;
            use opentelemetry::trace::TraceContextExt as _;
            let span = context.span();
            let ids = span.span_context();
            ids.is_valid()
                .then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
        });
        match (ids, line.strip_prefix('{')) {
            (Some((trace_id, span_id)), Some(rest)) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            _ => writer.write_str(&line),
        }
    }
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

/// Installs a test subscriber that prints only when `TEST_LOG` is set and
/// times PostgreSQL statements, and the metrics (read by the `METRICS_ADDR` endpoint of the services under
/// test: one provider for the process).
pub fn init_for_tests() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = crate::metrics::install(
        opentelemetry_sdk::Resource::builder()
            .with_service_name("tests")
            .build(),
        None,
    );
    let logs = std::env::var_os("TEST_LOG").map(|_| {
        tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
            )
    });
    // A test that installed its own subscriber first keeps it.
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(Statements.with_filter(statement_events(false)))
        .try_init();
}

/// The span of one incoming gRPC call, named `{service}/{method}`. From
/// one of this project's services (`trusted`: proved by its client
/// certificate) the remote span in the call's `traceparent` header is its
/// parent, so a redemption is one trace. From anyone else it is only a
/// link: an untrusted caller cannot graft our spans onto a trace of its
/// choosing (or force them to be sampled).
pub fn server_span<B>(
    request: &http::Request<B>,
    names: (&'static str, &'static str),
    trusted: bool,
) -> tracing::Span {
    use opentelemetry::trace::TraceContextExt as _;
    let span = rpc_span("server", names);
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

/// The span of one gRPC call to `(service, method)` (`rpc::method_of`), answered (`kind` "server") or made
/// ("client"): named `{service}/{method}`, with `rpc.service`, `rpc.method`
/// and, when it ends, `rpc.grpc.status_code` (and `otel.status_code` ERROR
/// when it failed).
pub fn rpc_span(
    kind: &'static str,
    (service, method): (&'static str, &'static str),
) -> tracing::Span {
    tracing::info_span!(
        "grpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = kind,
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
    )
}

/// Writes `span`'s trace context into an outgoing call's headers
/// (`traceparent`), so the callee's span is its child.
pub fn inject_into(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut HeaderInjector(headers));
    });
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}
