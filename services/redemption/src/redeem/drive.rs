//! Taking a recorded redemption to its end, by the one driver holding its
//! lease: the first attempt, a client's retry that took it over, or
//! recovery. Every step may run twice, late, or beside an older driver that
//! has not noticed it lost the lease, so:
//!
//! - the driver renews its lease while it runs; a take-over (only after
//!   `take_over_after` of silence, by PostgreSQL's clock) bumps the
//!   generation, and every write names the driver's generation and is
//!   refused to an older one: the record's completion or failure here,
//!   ConsumeKey and ReleaseKey in key-issuance;
//! - grants name their redemption, so "already enrolled / assigned" tells
//!   this redemption's own earlier grant (keep the key's use) from one the
//!   student had before (give the use back);
//! - a released use stays released (key-issuance refuses a later consume),
//!   and a seat refused for want of room stays refused (enrollment answers a
//!   repeat the same), so a failed redemption leaves no use and no seat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prost::Message as _;
use trainingkeys_proto::prost_types;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::redeem_key_response::Grant;

use uuid::Uuid;

use super::Redeemer;
use crate::error::Error;
use crate::gate::Settle;
use crate::store::{Lease, Record, State};

/// Where to stop a redemption's first driver (fault-injection tests only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultPoint {
    /// Admitted, before the redemption is recorded.
    BeforeRecord,
    /// After the key was consumed (or the seat held), before Enroll.
    AfterConsume,
    /// After Enroll / AssignSubscription committed (or the grant was found
    /// already held), before the reply is recorded.
    AfterCommit,
}

/// What the fault does there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultAction {
    /// Hang forever, as if the process died: nothing after it runs and the
    /// lease is not renewed.
    Hang,
    /// Freeze for a while (a long pause: the lease is not renewed meanwhile,
    /// so it can be taken over), then carry on as the now-stale driver.
    Stall,
    /// Panic in the redemption's task (once per process).
    Panic,
}

/// A test-only fault: where, what, and for how long a stall lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub point: FaultPoint,
    pub action: FaultAction,
    pub stall: Duration,
}

/// Whether the grant existed before this redemption (another redemption's
/// or a direct one), as opposed to made now or by this redemption earlier.
/// A redemption recorded before grants named their redemption (`legacy`,
/// in flight across the upgrade) may find its own grant without its id:
/// one made with its key after it was recorded is taken as its own, so its
/// key use is kept.
fn had_before(existed: bool, grant: Granted<'_>, record: &Record) -> bool {
    if !existed || grant.redemption_id == record.redemption_id.to_string() {
        return false;
    }
    let legacy_own = record.legacy
        && grant.redemption_id.is_empty()
        && grant.source_key_id == record.key_id.to_string()
        && grant
            .granted_at
            .and_then(trainingkeys_proto::time::from_timestamp)
            .is_some_and(|at| at >= record.created_at);
    !legacy_own
}

/// What [`had_before`] reads of a seat or subscription.
#[derive(Clone, Copy)]
struct Granted<'a> {
    redemption_id: &'a str,
    source_key_id: &'a str,
    granted_at: Option<&'a prost_types::Timestamp>,
}

impl<'a> From<&'a pb::Enrollment> for Granted<'a> {
    fn from(e: &'a pb::Enrollment) -> Self {
        Self {
            redemption_id: &e.redemption_id,
            source_key_id: &e.source_key_id,
            granted_at: e.enrolled_at.as_ref(),
        }
    }
}

impl<'a> From<&'a pb::Subscription> for Granted<'a> {
    fn from(s: &'a pb::Subscription) -> Self {
        Self {
            redemption_id: &s.redemption_id,
            source_key_id: &s.source_key_id,
            granted_at: s.starts_at.as_ref(),
        }
    }
}

/// The final error recorded for a redemption, answered again.
pub(super) fn recorded_error(record: &Record) -> Error {
    Error::Replayed {
        code: record.error_code.unwrap_or(tonic::Code::Unknown as i32),
        reason: record.error_reason.clone().unwrap_or_default(),
        message: record.error_message.clone().unwrap_or_default(),
    }
}

impl Redeemer {
    /// Takes a recorded redemption to its end under `lease`: completed, or
    /// failed (decided, compensated, failed). An outage leaves it where it
    /// was, to be taken over later; a lost lease hands the answer to
    /// whoever holds it now. `user` is needed only for an `admitted` record.
    pub(super) async fn drive(
        &self,
        lease: Lease,
        record: &Record,
        user: Option<pb::User>,
    ) -> Result<pb::RedeemKeyResponse, Error> {
        let paused = AtomicBool::new(false);
        let outcome = tokio::select! {
            outcome = self.finish(lease, record, user, &paused) => outcome,
            () = self.keep_lease(lease, &paused) => Err(Error::LeaseLost),
        };
        match outcome {
            Err(Error::LeaseLost) => self.answer_of(record).await,
            other => other,
        }
    }

    /// Renews the lease until it is lost (then returns). A paused driver
    /// (a test's stall) does not renew.
    async fn keep_lease(&self, lease: Lease, paused: &AtomicBool) {
        loop {
            tokio::time::sleep(self.settings.renew_every()).await;
            if paused.load(Ordering::Relaxed) {
                continue;
            }
            match self.store.renew(lease).await {
                Ok(true) => {}
                Ok(false) => return,
                // The fence protects the writes; renewal retries next tick.
                Err(e) => {
                    tracing::warn!(redemption_id = %lease.redemption_id, error = %e, "could not renew a redemption's lease")
                }
            }
        }
    }

    async fn finish(
        &self,
        lease: Lease,
        record: &Record,
        user: Option<pb::User>,
        paused: &AtomicBool,
    ) -> Result<pb::RedeemKeyResponse, Error> {
        let user = match (record.state, user) {
            (State::Admitted, Some(user)) => user,
            (State::Failing, _) => {
                self.compensate_and_fail(lease, record).await?;
                return Err(recorded_error(record));
            }
            (state, _) => {
                return Err(Error::Internal(format!(
                    "cannot drive a {state:?} redemption"
                )));
            }
        };
        match self.apply(lease, record, user, paused).await {
            Ok(response) => {
                if self
                    .store
                    .complete(lease, &response.encode_to_vec())
                    .await?
                {
                    Ok(response)
                } else {
                    Err(Error::LeaseLost)
                }
            }
            Err(error) if error.is_final() => {
                // Decided first, under the lease: from here on the
                // redemption can only fail, so compensating is safe, and a
                // driver stopping half-way leaves it for the next to finish.
                if !self.store.decide_failure(lease, &error).await? {
                    return Err(Error::LeaseLost);
                }
                self.compensate_and_fail(lease, record).await?;
                Err(error)
            }
            Err(outage) => Err(outage),
        }
    }

    async fn compensate_and_fail(&self, lease: Lease, record: &Record) -> Result<(), Error> {
        self.compensate(lease, record, Some(record.user_id)).await?;
        if self.store.fail(lease).await? {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }

    /// The answer someone else recorded (or is still working on).
    async fn answer_of(&self, record: &Record) -> Result<pb::RedeemKeyResponse, Error> {
        let stored = self.store.get(record.redemption_id).await?;
        Box::pin(self.replay(stored, &record.request)).await
    }

    /// The irreversible steps; each is idempotent for this redemption.
    async fn apply(
        &self,
        lease: Lease,
        record: &Record,
        user: pb::User,
        paused: &AtomicBool,
    ) -> Result<pb::RedeemKeyResponse, Error> {
        let (rid, key, target, user_id) = (
            record.redemption_id,
            record.key_id,
            record.target_id,
            record.user_id,
        );
        let kind = pb::KeyKind::try_from(record.key_kind).unwrap_or(pb::KeyKind::Unspecified);
        let target_text = target.to_string();
        let (grant, already_held) = match kind {
            pb::KeyKind::Event | pb::KeyKind::ClassEnrollment => {
                if kind == pb::KeyKind::ClassEnrollment {
                    let held = || self.clients.seat(&target_text, user_id);
                    if let Some(seat) = self.consume(lease, record, held).await? {
                        self.fault(FaultPoint::AfterCommit, Some(lease), paused)
                            .await;
                        self.gate
                            .settle(target, user_id, rid, Settle::Confirm)
                            .await;
                        return Ok(response(record, user, Grant::Enrollment(seat), true));
                    }
                }
                self.fault(FaultPoint::AfterConsume, Some(lease), paused)
                    .await;
                let (enrollment, existed) = self.clients.enroll(target, user_id, key, rid).await?;
                self.fault(FaultPoint::AfterCommit, Some(lease), paused)
                    .await;
                let before = had_before(existed, (&enrollment).into(), record);
                if before && kind == pb::KeyKind::ClassEnrollment {
                    // The student had the seat already: no use for it.
                    self.clients.release_key(key, rid, lease.generation).await?;
                }
                self.gate
                    .settle(target, user_id, rid, Settle::Confirm)
                    .await;
                (Grant::Enrollment(enrollment), before)
            }
            pb::KeyKind::Subscription => {
                let held = || self.clients.subscription(&target_text, user_id);
                if let Some(held) = self.consume(lease, record, held).await? {
                    self.fault(FaultPoint::AfterCommit, Some(lease), paused)
                        .await;
                    return Ok(response(record, user, Grant::Subscription(held), true));
                }
                self.fault(FaultPoint::AfterConsume, Some(lease), paused)
                    .await;
                let (subscription, existed) = self
                    .clients
                    .assign_subscription(target, user_id, key, rid)
                    .await?;
                self.fault(FaultPoint::AfterCommit, Some(lease), paused)
                    .await;
                let before = had_before(existed, (&subscription).into(), record);
                if before {
                    self.clients.release_key(key, rid, lease.generation).await?;
                }
                (Grant::Subscription(subscription), before)
            }
            pb::KeyKind::Unspecified => {
                return Err(Error::Internal(format!("bad key kind {}", record.key_kind)));
            }
        };
        Ok(response(record, user, grant, already_held))
    }

    /// ConsumeKey for this redemption. When it cannot take a use — the key
    /// is used up, or this redemption gave its use back earlier (it found
    /// the grant already held) — the grant the student holds is the answer
    /// (`Some`), with no use taken; with none held, the refusal stands. It
    /// never goes on to take a grant without a use.
    async fn consume<G, F>(
        &self,
        lease: Lease,
        record: &Record,
        held: impl FnOnce() -> F,
    ) -> Result<Option<G>, Error>
    where
        F: Future<Output = Result<Option<G>, Error>>,
    {
        let consumed = self
            .clients
            .consume_key(
                record.key_id,
                record.user_id,
                lease.redemption_id,
                lease.generation,
            )
            .await;
        match consumed {
            Ok(()) => Ok(None),
            Err(e @ (Error::KeyAlreadyRedeemed | Error::KeyUseReleased)) => match held().await? {
                Some(grant) => {
                    // No use is ever this redemption's: a released marker
                    // makes a stale driver's later consume of it refused
                    // (it would otherwise find no row to be fenced by).
                    self.clients
                        .release_key(record.key_id, lease.redemption_id, lease.generation)
                        .await?;
                    Ok(Some(grant))
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Undoes what a failed redemption may hold: the key's use (a marker is
    /// left if it had none, so a late consume is refused), anything granted
    /// for it (enrollment refuses any later grant; a stale driver's consume
    /// may have slipped in before the release, its Enroll may still come),
    /// the account it created for a student now turned away, and the seat
    /// hold. Only ever for a redemption whose failure is decided, so it never
    /// undoes what a successor completed. Every step is idempotent.
    /// `account` is the account offered for removal: the record's user when
    /// a redemption fails (enrollment removes it only if it was created for
    /// this very redemption id; a concurrent attempt with the same
    /// idempotency key may have created it, not the one recorded), none in an
    /// audit.
    async fn compensate(
        &self,
        lease: Lease,
        record: &Record,
        account: Option<Uuid>,
    ) -> Result<(), Error> {
        if record.key_kind != pb::KeyKind::Event as i32 {
            self.clients
                .release_key(record.key_id, record.redemption_id, lease.generation)
                .await?;
        }
        self.clients
            .void_redemption(record.redemption_id, account)
            .await?;
        if record.key_kind != pb::KeyKind::Subscription as i32 {
            self.gate
                .settle(
                    record.target_id,
                    record.user_id,
                    record.redemption_id,
                    Settle::Release,
                )
                .await;
        }
        Ok(())
    }

    /// The answer recorded for an idempotency key: the stored response, the
    /// stored final error, or, while unfinished, wait; a redemption whose
    /// lease has gone unrenewed for `take_over_after` is taken over.
    pub(super) async fn replay(
        &self,
        record: Record,
        request: &[u8],
    ) -> Result<pb::RedeemKeyResponse, Error> {
        if !crate::domain::same_meaning(&record.request, request) {
            return Err(Error::IdempotencyKeyReused);
        }
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let mut record = record;
        loop {
            match record.state {
                State::Completed => {
                    let bytes = record.response.as_deref().unwrap_or_default();
                    return pb::RedeemKeyResponse::decode(bytes)
                        .map_err(|e| Error::Internal(e.to_string()));
                }
                // Decided: the compensation of a failing one is its
                // driver's (or a take-over's) to finish.
                State::Failing | State::Failed => return Err(recorded_error(&record)),
                State::Admitted => {}
            }
            if record.idle_seconds > self.settings.take_over_after.as_secs_f64() {
                match self.take_over(record.clone()).await {
                    // Someone else moved it on meanwhile: look again.
                    Err(Error::InProgress) => {}
                    other => return other,
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::InProgress);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            record = self.store.get(record.redemption_id).await?;
        }
    }

    /// Takes over a redemption whose driver went silent and drives it to its
    /// end (a client's retry, or recovery). `InProgress` when it is not
    /// idle after all (its driver is alive, or another take-over won).
    pub async fn take_over(&self, record: Record) -> Result<pb::RedeemKeyResponse, Error> {
        let Some(lease) = self
            .store
            .take_over(&record, self.settings.take_over_after)
            .await?
        else {
            return Err(Error::InProgress);
        };
        tracing::info!(redemption_id = %record.redemption_id, generation = lease.generation, "took an abandoned redemption over");
        let user = match record.state {
            State::Admitted => match self.clients.get_user(record.user_id).await {
                Ok(user) => Some(user),
                // The student is gone: the redemption cannot complete, and
                // what it holds is given back under the new lease.
                Err(error) if error.is_final() => {
                    if self.store.decide_failure(lease, &error).await? {
                        let record = Record {
                            state: State::Failing,
                            ..record
                        };
                        self.compensate_and_fail(lease, &record).await?;
                    }
                    return Err(error);
                }
                Err(outage) => return Err(outage),
            },
            State::Failing | State::Completed | State::Failed => None,
        };
        self.drive(lease, &record, user).await
    }

    /// Audits a failed redemption recorded before redemptions were decided,
    /// compensated and failed under a lease: gives back a key use or grant
    /// it still holds (every step idempotent; a failed redemption never
    /// completes, so nothing a successor did is undone). A grant without a
    /// redemption id, made with its key for its student, may be the one its
    /// twin completed with, so its use stays; accounts are never removed
    /// here (old code created them before any check).
    pub async fn audit(&self, record: &Record) -> Result<(), Error> {
        let target = record.target_id.to_string();
        let key = record.key_id.to_string();
        let legacy_grant = if record.key_kind == pb::KeyKind::Subscription as i32 {
            self.clients
                .subscription(&target, record.user_id)
                .await?
                .is_some_and(|s| s.redemption_id.is_empty() && s.source_key_id == key)
        } else {
            self.clients
                .seat(&target, record.user_id)
                .await?
                .is_some_and(|e| e.redemption_id.is_empty() && e.source_key_id == key)
        };
        if !legacy_grant {
            let lease = Lease {
                redemption_id: record.redemption_id,
                generation: record.generation,
            };
            self.compensate(lease, record, None).await?;
        }
        self.store.audited(record.redemption_id).await
    }

    /// A test-only fault, for the first driver only (a take-over is the
    /// recovery the fault tests watch for).
    pub(super) async fn fault(&self, point: FaultPoint, lease: Option<Lease>, paused: &AtomicBool) {
        let Some(fault) = self.settings.fault else {
            return;
        };
        if fault.point != point || lease.is_some_and(|l| l.generation != 1) {
            return;
        }
        if fault.action == FaultAction::Panic && self.panicked.swap(true, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(?fault, "fault injected");
        paused.store(true, Ordering::Relaxed);
        match fault.action {
            FaultAction::Hang => std::future::pending::<()>().await,
            FaultAction::Stall => {
                tokio::time::sleep(fault.stall).await;
                paused.store(false, Ordering::Relaxed);
            }
            FaultAction::Panic => panic!("fault injected at {point:?}"),
        }
    }
}

/// The answer to a redemption.
fn response(
    record: &Record,
    user: pb::User,
    grant: Grant,
    already_held: bool,
) -> pb::RedeemKeyResponse {
    pb::RedeemKeyResponse {
        redemption_id: record.redemption_id.to_string(),
        kind: record.key_kind,
        key_id: record.key_id.to_string(),
        user: Some(user),
        user_created: record.user_created,
        grant: Some(grant),
        already_held,
    }
}
