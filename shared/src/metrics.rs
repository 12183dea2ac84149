//! Metrics: one OpenTelemetry meter provider per process, read by a
//! Prometheus endpoint (`METRICS_ADDR`, `GET /metrics`) and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, pushed over OTLP too. Names follow
//! the OpenTelemetry semantic conventions (`rpc.server.call.duration`,
//! `db.client.operation.duration`, ...), which Prometheus shows with dots
//! as underscores and the unit as a suffix
//! (`rpc_server_call_duration_seconds_bucket`).

use std::sync::{LazyLock, OnceLock};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Histogram, Meter};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The registry the Prometheus endpoint reads.
static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// Buckets of every duration histogram, in seconds: 0.5 ms to 10 s.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process's meter provider, once installed.
static PROVIDER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// Installs the process's meter provider (once; later calls return `None`
/// and drop `otlp`): read by the Prometheus endpoint, and pushed over OTLP
/// with `otlp`.
pub fn install(
    resource: opentelemetry_sdk::Resource,
    otlp: Option<opentelemetry_otlp::MetricExporter>,
) -> anyhow::Result<Option<SdkMeterProvider>> {
    let mut installed = None;
    let mut failed = None;
    PROVIDER.get_or_init(|| {
        let registry = prometheus::Registry::new();
        let mut builder = SdkMeterProvider::builder().with_resource(resource);
        match opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
        {
            Ok(reader) => {
                let _ = REGISTRY.set(registry);
                builder = builder.with_reader(reader);
            }
            Err(error) => failed = Some(error),
        }
        if let Some(otlp) = otlp {
            builder = builder.with_periodic_exporter(otlp);
        }
        let provider = builder.build();
        opentelemetry::global::set_meter_provider(provider.clone());
        installed = Some(provider.clone());
        provider
    });
    match failed {
        Some(error) => Err(error.into()),
        None => Ok(installed),
    }
}

/// The metrics in Prometheus' text format.
pub fn render() -> String {
    use prometheus::Encoder as _;
    let Some(registry) = REGISTRY.get() else {
        return String::new();
    };
    let mut out = Vec::new();
    if let Err(error) = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(%error, "metrics could not be encoded");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Serves, in plaintext HTTP on `listener` until `shutdown`: `GET /metrics`
/// (Prometheus text), `GET /livez` (200 while the process runs) and `GET
/// /readyz` (200 while `ready`, else 503), for load balancers and probes
/// that speak HTTP rather than gRPC health.
pub fn serve(
    listener: TcpListener,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(),
                )
            }),
        )
        .route("/livez", get(|| async { "live\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(std::sync::atomic::Ordering::Relaxed) {
                    (http::StatusCode::OK, "ready\n")
                } else {
                    (http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        );
    tokio::spawn(async move {
        let stopped = shutdown.cancelled_owned();
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(%error, "the metrics endpoint stopped");
        }
    });
}

/// The meter of this project's instruments. An instrument made before the
/// provider is installed would count into nothing for ever, so the first
/// use installs one (Prometheus only) if `telemetry` has not yet.
pub fn meter() -> Meter {
    if PROVIDER.get().is_none() {
        let resource = opentelemetry_sdk::Resource::builder().build();
        if let Err(error) = install(resource, None) {
            tracing::warn!(%error, "metrics could not be set up");
        }
    }
    opentelemetry::global::meter("trainingkeys")
}

fn seconds(name: &'static str, description: &'static str) -> Histogram<f64> {
    meter()
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(SECONDS.to_vec())
        .build()
}

/// `rpc.server.call.duration`: every call a service answered, by
/// `rpc.service`, `rpc.method` and `rpc.grpc.status_code` (its count is
/// the request count).
pub static RPC_SERVER: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    seconds(
        "rpc.server.call.duration",
        "Calls answered, from the request to the last byte of the answer",
    )
});

/// `rpc.client.call.duration`: every call made to a peer service.
pub static RPC_CLIENT: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    seconds(
        "rpc.client.call.duration",
        "Calls made to another service of this project",
    )
});

/// `db.client.operation.duration`: PostgreSQL statements and Redis
/// commands, by `db.system.name` and `db.operation.name`.
pub static DB_CLIENT: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    seconds(
        "db.client.operation.duration",
        "PostgreSQL statements and Redis commands",
    )
});

/// The pools being reported, by watch id: the gauges' one callback reads
/// them, and a pool leaves when its service stops (its [`PoolWatch`] drops).
static POOLS: std::sync::Mutex<Vec<(u64, String, u32, PgPool)>> = std::sync::Mutex::new(Vec::new());

/// Registers the pool gauges' callbacks, once.
static POOL_GAUGES: LazyLock<()> = LazyLock::new(|| {
    // (used, idle, max) by pool name: pools of one name (two replicas in
    // one process, as in tests) add up.
    let by_name = || {
        let mut totals: std::collections::BTreeMap<String, (u64, u64, u64)> = Default::default();
        for (_, name, max, pool) in POOLS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            let idle = pool.num_idle() as u64;
            let total = totals.entry(name.clone()).or_default();
            total.0 += u64::from(pool.size()).saturating_sub(idle);
            total.1 += idle;
            total.2 += u64::from(*max);
        }
        totals
    };
    meter()
        .u64_observable_gauge("db.client.connection.count")
        .with_description("Connections of the PostgreSQL pool, by state")
        .with_callback(move |observer| {
            for (name, (used, idle, _)) in by_name() {
                let name = KeyValue::new("db.client.connection.pool.name", name);
                observer.observe(
                    idle,
                    &[
                        name.clone(),
                        KeyValue::new("db.client.connection.state", "idle"),
                    ],
                );
                observer.observe(
                    used,
                    &[name, KeyValue::new("db.client.connection.state", "used")],
                );
            }
        })
        .build();
    meter()
        .u64_observable_gauge("db.client.connection.max")
        .with_description("Most connections the PostgreSQL pool opens")
        .with_callback(move |observer| {
            for (name, (_, _, max)) in by_name() {
                observer.observe(
                    max,
                    &[KeyValue::new("db.client.connection.pool.name", name)],
                );
            }
        })
        .build();
});

/// Reports `pool`'s connections as `db.client.connection.count` (by
/// `db.client.connection.state`: `idle` or `used`) and
/// `db.client.connection.max`, named `name` (its schema): saturation is
/// used / max. Until the returned watch is dropped.
pub fn observe_pool(pool: &PgPool, name: &str, max: u32) -> PoolWatch {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    LazyLock::force(&POOL_GAUGES);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    POOLS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((id, name.to_owned(), max, pool.clone()));
    PoolWatch(id)
}

/// Keeps a pool in the gauges; dropped, the pool leaves them (and is no
/// longer held open by them).
#[derive(Debug)]
pub struct PoolWatch(u64);

impl Drop for PoolWatch {
    fn drop(&mut self) {
        POOLS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(id, ..)| *id != self.0);
    }
}
