//! The redemption service's own metrics, beside the RPC, database and Redis
//! metrics every service has (`trainingkeys_shared::metrics`). They are
//! served on `METRICS_ADDR` and pushed over OTLP when a collector is set.
//! Every degraded mode that logs a warning also counts here, so an alert can
//! watch for it.

use std::sync::LazyLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;

/// The service's instruments, created from the global meter provider on
/// first use (after telemetry installed it).
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// What the gate decided for one admission.
#[derive(Clone, Copy, Debug)]
pub enum GateDecision {
    /// A seat was held for the student.
    Admitted,
    /// The class is full (by the gate's count, or its peek).
    Full,
    /// The class's state was rebuilt from enrollment's roster.
    Rebuilt,
    /// Redis unreachable or too slow: the PostgreSQL guard alone decides.
    Bypassed,
}

/// An event of the guessing limits.
#[derive(Clone, Copy, Debug)]
pub enum LimitEvent {
    /// A failed look-up (unknown or mistyped code) was counted.
    Failure,
    /// An attempt was refused: its identity has too many failures.
    Refused,
    /// An attempt was refused: the service-wide failure budget is spent.
    GlobalRefused,
    /// Redis unreachable: the attempt went unchecked.
    Bypassed,
}

/// An event of recovery.
#[derive(Clone, Copy, Debug)]
pub enum RecoveryEvent {
    /// A stale redemption (its driver gone) was found.
    Found,
    /// Recovery drove one to its end (done or compensated).
    Driven,
    /// Recovery could not finish one yet (it tries again next sweep).
    Failed,
}

/// Counters of what the redemption service did.
pub struct Metrics {
    /// `trainingkeys.redemption.gate.decisions`, by `decision`.
    gate: Counter<u64>,
    /// `trainingkeys.redemption.limits`, by `event`.
    limits: Counter<u64>,
    /// `trainingkeys.redemption.recovery`, by `event`.
    recovery: Counter<u64>,
    /// `trainingkeys.redemption.redeemed`: RedeemKey answers by `outcome`
    /// (`OK`, or the error's reason, e.g. `CLASS_FULL`).
    redeemed: Counter<u64>,
}

impl Metrics {
    fn new() -> Self {
        let meter = trainingkeys_shared::metrics::meter();
        let counter = |name: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_description(description)
                .build()
        };
        Self {
            gate: counter(
                "trainingkeys.redemption.gate.decisions",
                "Gate decisions by decision: admitted, full, rebuilt, bypassed (Redis unreachable: the PostgreSQL guard alone)",
            ),
            limits: counter(
                "trainingkeys.redemption.limits",
                "Guessing limits by event: failure (counted), refused, global_refused, bypassed (Redis unreachable)",
            ),
            recovery: counter(
                "trainingkeys.redemption.recovery",
                "Stale redemptions by event: found, driven (to their end), failed (tried again next sweep)",
            ),
            redeemed: counter(
                "trainingkeys.redemption.redeemed",
                "RedeemKey answers by outcome (OK or the error reason)",
            ),
        }
    }

    /// Counts one gate decision.
    pub fn gate(&self, decision: GateDecision) {
        let decision = match decision {
            GateDecision::Admitted => "admitted",
            GateDecision::Full => "full",
            GateDecision::Rebuilt => "rebuilt",
            GateDecision::Bypassed => "bypassed",
        };
        self.gate.add(1, &[KeyValue::new("decision", decision)]);
    }

    /// Counts one event of the guessing limits.
    pub fn limit(&self, event: LimitEvent) {
        let event = match event {
            LimitEvent::Failure => "failure",
            LimitEvent::Refused => "refused",
            LimitEvent::GlobalRefused => "global_refused",
            LimitEvent::Bypassed => "bypassed",
        };
        self.limits.add(1, &[KeyValue::new("event", event)]);
    }

    /// Counts `n` events of recovery.
    pub fn recovery(&self, event: RecoveryEvent, n: usize) {
        let event = match event {
            RecoveryEvent::Found => "found",
            RecoveryEvent::Driven => "driven",
            RecoveryEvent::Failed => "failed",
        };
        self.recovery
            .add(n as u64, &[KeyValue::new("event", event)]);
    }

    /// Counts one RedeemKey answer.
    pub fn redeemed(&self, outcome: &str) {
        self.redeemed
            .add(1, &[KeyValue::new("outcome", outcome.to_owned())]);
    }
}
