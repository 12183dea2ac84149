//! Degraded modes show in the metrics, not only in the logs: with Redis
//! unreachable, redemption still works through the PostgreSQL guard and
//! counts every admission it decided without the gate, and every answer by
//! outcome. The metrics are read by a test exporter in this process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{SdkMeterProvider, Temporality};
use trainingkeys_tests::{TestApp, as_user, idem, org};

/// Keeps the latest cumulative value of every u64 counter, by
/// (name, `outcome` attribute or "").
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<HashMap<(String, String), u64>>>);

impl PushMetricExporter for Recorder {
    fn export(&self, metrics: &ResourceMetrics) -> impl Future<Output = OTelSdkResult> + Send {
        let mut seen = self.0.lock().unwrap();
        for metric in metrics.scope_metrics().flat_map(|s| s.metrics()) {
            if let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric.data() {
                for point in sum.data_points() {
                    let outcome = point
                        .attributes()
                        .find(|kv| kv.key.as_str() == "outcome")
                        .map(|kv| kv.value.to_string())
                        .unwrap_or_default();
                    seen.insert((metric.name().to_owned(), outcome), point.value());
                }
            }
        }
        std::future::ready(Ok(()))
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

#[tokio::test]
async fn redis_outage_shows_in_the_metrics() {
    // Installed before any service starts: they take their instruments from it.
    let recorder = Recorder::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(recorder.clone())
        .build();
    opentelemetry::global::set_meter_provider(provider.clone());

    let app = TestApp::start_with(1, |c| c.redis_url = "redis://127.0.0.1:1/".into()).await;
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
    provider.force_flush().unwrap();

    let seen = recorder.0.lock().unwrap().clone();
    let value = |name: &str, outcome: &str| {
        seen.get(&(name.to_owned(), outcome.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(
        value("trainingkeys.redemption.gate.bypassed", ""),
        3,
        "every admission went to the PostgreSQL guard alone: {seen:?}"
    );
    assert!(
        value("trainingkeys.redemption.limits.bypassed", "") >= 3,
        "the guessing limits were skipped: {seen:?}"
    );
    assert_eq!(
        value("trainingkeys.redemption.redeemed", "OK"),
        2,
        "{seen:?}"
    );
    assert_eq!(
        value("trainingkeys.redemption.redeemed", "CLASS_FULL"),
        1,
        "{seen:?}"
    );
    assert_eq!(value("trainingkeys.redemption.gate.rebuilt", ""), 0);
}
