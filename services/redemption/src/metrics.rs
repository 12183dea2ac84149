//! The redemption service's metrics. They go to the OpenTelemetry collector
//! with the traces when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see
//! `trainingkeys_shared::telemetry`); without one they cost next to nothing.
//! Every degraded mode that logs a warning also counts here, so an alert can
//! watch for it.

use std::sync::LazyLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;

/// The service's instruments, created from the global meter provider on
/// first use (after `telemetry::init` installed it).
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Counters of what the redemption service did.
pub struct Metrics {
    /// `trainingkeys.redemption.gate.bypassed`: admissions decided by the
    /// PostgreSQL guard alone because Redis was unreachable or too slow.
    pub gate_bypassed: Counter<u64>,
    /// `trainingkeys.redemption.gate.rebuilt`: classes whose gate state was
    /// rebuilt from enrollment's roster (missing, stale or drifted state).
    pub gate_rebuilt: Counter<u64>,
    /// `trainingkeys.redemption.limits.bypassed`: attempts let through
    /// unchecked because the guessing limits' Redis was unreachable.
    pub limits_bypassed: Counter<u64>,
    /// `trainingkeys.redemption.limits.failures`: failed look-ups (unknown or
    /// mistyped codes) counted against the guessing limits.
    pub limit_failures: Counter<u64>,
    /// `trainingkeys.redemption.limits.global_refused`: attempts refused
    /// because the service-wide failure budget is spent.
    pub limit_global_refused: Counter<u64>,
    /// `trainingkeys.redemption.redeemed`: RedeemKey answers by `outcome`
    /// (`OK`, or the error's reason, e.g. `CLASS_FULL`).
    redeemed: Counter<u64>,
}

impl Metrics {
    fn new() -> Self {
        let meter = opentelemetry::global::meter("trainingkeys-redemption");
        let counter = |name: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_description(description)
                .build()
        };
        Self {
            gate_bypassed: counter(
                "trainingkeys.redemption.gate.bypassed",
                "Admissions decided by the PostgreSQL guard alone (Redis unreachable)",
            ),
            gate_rebuilt: counter(
                "trainingkeys.redemption.gate.rebuilt",
                "Classes whose gate state was rebuilt from enrollment",
            ),
            limits_bypassed: counter(
                "trainingkeys.redemption.limits.bypassed",
                "Attempts not checked against the guessing limits (Redis unreachable)",
            ),
            limit_failures: counter(
                "trainingkeys.redemption.limits.failures",
                "Failed look-ups (unknown or mistyped codes) counted against the guessing limits",
            ),
            limit_global_refused: counter(
                "trainingkeys.redemption.limits.global_refused",
                "Attempts refused because the service-wide failure budget is spent",
            ),
            redeemed: counter(
                "trainingkeys.redemption.redeemed",
                "RedeemKey answers by outcome (OK or the error reason)",
            ),
        }
    }

    /// Counts one RedeemKey answer.
    pub fn redeemed(&self, outcome: &str) {
        self.redeemed
            .add(1, &[KeyValue::new("outcome", outcome.to_owned())]);
    }
}
