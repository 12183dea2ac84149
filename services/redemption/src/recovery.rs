//! The recovery loop: redemptions left `admitted` or `failing` whose driver stopped
//! renewing its lease (a crash, a lost database connection, an outage
//! mid-way) are taken over by one replica (the generation bump fences the
//! old driver out) and driven to their end — completed, or compensated (ReleaseKey, release the hold) and
//! failed — so no key stays consumed without its enrollment and no seat stays
//! held. It audits failed redemptions from before that rule (a use or a
//! grant they hold is given back), and rebuilds the gate state of classes where a Redis outage
//! made the gate and PostgreSQL disagree.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::{METRICS, RecoveryEvent};
use crate::redeem::Redeemer;

/// Redemptions handled per sweep.
const BATCH: i64 = 100;

/// Sweeps every `interval` for redemptions whose lease went unrenewed for
/// the take-over time, until `shutdown`.
pub async fn run(redeemer: Arc<Redeemer>, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let repaired = redeemer.repair_gate().await;
        if repaired > 0 {
            tracing::info!(
                classes = repaired,
                "rebuilt drifted gate state from enrollment"
            );
        }
        match sweep(&redeemer).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(redemptions = n, "recovery finished abandoned redemptions"),
            Err(e) => tracing::warn!(error = %e, "recovery sweep failed; retrying next interval"),
        }
        match audit(&redeemer).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(redemptions = n, "audited failed redemptions"),
            Err(e) => {
                tracing::warn!(error = %e, "audit of failed redemptions failed; retrying next interval")
            }
        }
    }
}

/// One sweep: returns how many redemptions it finished.
pub async fn sweep(redeemer: &Redeemer) -> Result<usize, crate::error::Error> {
    let stale = redeemer
        .store()
        .stale(redeemer.take_over_after(), BATCH)
        .await?;
    METRICS.recovery(RecoveryEvent::Found, stale.len());
    let mut finished = 0;
    for record in stale {
        let id = record.redemption_id;
        match redeemer.take_over(record).await {
            Ok(_) => finished += 1,
            Err(e) if e.is_final() => {
                tracing::info!(redemption_id = %id, reason = e.reason(), "recovery compensated a redemption");
                finished += 1;
            }
            Err(e) => {
                METRICS.recovery(RecoveryEvent::Failed, 1);
                tracing::warn!(redemption_id = %id, error = %e, "recovery could not finish a redemption yet")
            }
        }
    }
    METRICS.recovery(RecoveryEvent::Driven, finished);
    Ok(finished)
}

/// Failed redemptions never audited (failed before redemptions were
/// decided, compensated and failed under a lease, when a failure could leave
/// a key use or a grant behind) are audited once (`Redeemer::audit`).
/// Returns how many; one that cannot be audited yet is logged and tried
/// again next sweep.
pub async fn audit(redeemer: &Redeemer) -> Result<usize, crate::error::Error> {
    let failed = redeemer.store().unaudited(BATCH).await?;
    let mut audited = 0;
    for record in &failed {
        match redeemer.audit(record).await {
            Ok(()) => audited += 1,
            Err(e) => {
                tracing::warn!(redemption_id = %record.redemption_id, error = %e, "could not audit a failed redemption yet")
            }
        }
    }
    Ok(audited)
}
