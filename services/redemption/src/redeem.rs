//! The redemption flow (DESIGN.md "Redemption of an event key, step by
//! step"), for all three kinds of key, and ValidateKey.
//!
//! Live path: guessing limit → idempotency lookup → resolve the key → identify
//! the user → check the window against the class's current dates → admission
//! at the gate (a full class is refused here, before any write) → record the
//! redemption (`admitted`) → consume the key (class enrollment and
//! subscription keys) → enroll / assign → confirm the seat → record the
//! response (`completed`). A final failure after the record compensates
//! (ReleaseKey, release the hold) and is recorded (`failed`); an outage leaves
//! the record `admitted` for a retry or the recovery loop to drive on. Every
//! step after the record is idempotent, so driving a record again is safe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use prost::Message as _;
use tracing::Instrument as _;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::redeem_key_response::Grant;
use uuid::Uuid;

use crate::FaultPoint;
use crate::clients::Clients;
use crate::coalesce::Coalesce;
use crate::domain::{self, RedeemCommand, Who, peer_id};
use crate::error::Error;
use crate::gate::{Admission, Gate};
use crate::limiter::{Limiter, caller_key, user_key};
use crate::store::{Record, Store};

/// How long an event key's ResolveKey answer is reused.
const EVENT_KEY_KEEP: Duration = Duration::from_secs(1);

/// Tunables of the flow.
pub struct Settings {
    /// Longest a client waits for its redemption (which carries on regardless).
    pub timeout: Duration,
    /// Test-only: where to hang as if the process died.
    pub fault: Option<FaultPoint>,
}

type SharedOutcome = Shared<BoxFuture<'static, Result<pb::RedeemKeyResponse, Error>>>;

/// A redemption running in this process, joined by identical retries.
struct InFlight {
    request: Vec<u8>,
    outcome: SharedOutcome,
}

/// Validates and redeems keys.
pub struct Redeemer {
    store: Store,
    clients: Clients,
    gate: Gate,
    limiter: Limiter,
    settings: Settings,
    in_flight: Mutex<HashMap<String, InFlight>>,
    /// ResolveKey answers by code (event keys kept briefly).
    resolved: Coalesce<String, pb::ResolveKeyResponse>,
    /// GetClass answers by class id (in-flight calls shared).
    classes: Coalesce<String, pb::Class>,
}

impl Redeemer {
    /// A redeemer over its collaborators.
    pub fn new(
        store: Store,
        clients: Clients,
        gate: Gate,
        limiter: Limiter,
        settings: Settings,
    ) -> Self {
        Self {
            store,
            clients,
            gate,
            limiter,
            settings,
            in_flight: Mutex::new(HashMap::new()),
            resolved: Coalesce::new(EVENT_KEY_KEEP),
            classes: Coalesce::new(Duration::ZERO),
        }
    }

    /// Notes which Redis server the gate talks to (at start-up).
    pub async fn observe_redis(&self) {
        self.gate.notice_new_server().await;
    }

    /// Rebuilds drifted gate state from enrollment (for recovery).
    pub async fn repair_gate(&self) -> usize {
        self.gate
            .repair(|class_id| self.clients.roster(class_id))
            .await
    }

    /// The redemption log (for recovery).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// RedeemKey. `caller` identifies the client for the guessing limits.
    pub async fn redeem(
        self: &Arc<Self>,
        cmd: RedeemCommand,
        caller: &str,
    ) -> Result<pb::RedeemKeyResponse, Error> {
        let counters = [caller_key(caller), user_key(&cmd.who.limit_identity())];
        self.limiter.check(&counters).await?;
        if let Some(record) = self.store.find(&cmd.idempotency_key).await? {
            return self.replay(record, &cmd.request).await;
        }
        let outcome = self.join_or_start(cmd, counters)?;
        match tokio::time::timeout(self.settings.timeout, outcome).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(
                "redemption (still running: retry with the same idempotency key)",
            )),
        }
    }

    /// Identical concurrent requests in this process share one execution,
    /// which runs in its own task so a client hanging up cannot cut it short.
    fn join_or_start(
        self: &Arc<Self>,
        cmd: RedeemCommand,
        counters: [String; 2],
    ) -> Result<SharedOutcome, Error> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = in_flight.get(&cmd.idempotency_key) {
            if running.request != cmd.request {
                return Err(Error::IdempotencyKeyReused);
            }
            return Ok(running.outcome.clone());
        }
        let key = cmd.idempotency_key.clone();
        let request = cmd.request.clone();
        let this = self.clone();
        // The task carries the caller's span, so its calls to the other
        // services stay in the caller's trace.
        let task = tokio::spawn(
            async move {
                let result = this.execute(&cmd, &counters).await;
                this.in_flight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&cmd.idempotency_key);
                result
            }
            .instrument(tracing::Span::current()),
        );
        let outcome = task
            .map(|joined| {
                joined.unwrap_or_else(|e| {
                    Err(Error::Internal(format!("redemption task failed: {e}")))
                })
            })
            .boxed()
            .shared();
        in_flight.insert(
            key,
            InFlight {
                request,
                outcome: outcome.clone(),
            },
        );
        Ok(outcome)
    }

    async fn execute(
        &self,
        cmd: &RedeemCommand,
        counters: &[String],
    ) -> Result<pb::RedeemKeyResponse, Error> {
        let resolved = self.resolve(&cmd.code, counters).await?;
        // An existing user is looked up only once admitted: a full class turns
        // the herd away after one Redis call, without a call for each user.
        let (user, user_id, user_created) = match &cmd.who {
            Who::Existing(id) => (None, *id, false),
            Who::New(new) => {
                let (user, created) = self.clients.register_user(new).await?;
                let id = peer_id("user_id", &user.user_id)?;
                (Some(user), id, created)
            }
        };
        let resolved = self
            .with_user(resolved, &cmd.code, user_id, counters)
            .await?;
        let key = resolved
            .key
            .clone()
            .ok_or_else(|| Error::Internal("ResolveKey without a key".into()))?;
        let kind = domain::kind(&key)?;
        let key_id = peer_id("key_id", &key.key_id)?;

        let (target_id, class) = match kind {
            pb::KeyKind::Subscription => (peer_id("profile_id", &key.profile_id)?, None),
            _ => {
                let class = self.class(&key.class_id).await?;
                (peer_id("class_id", &class.class_id)?, Some(class))
            }
        };
        domain::check_redeemable(&resolved, class.as_ref(), Utc::now())?;

        let admission = match &class {
            Some(class) => {
                let roster = || self.clients.roster(target_id);
                self.gate
                    .admit(
                        target_id,
                        user_id,
                        class.max_students,
                        class.enrolled_count,
                        roster,
                    )
                    .await
            }
            None => Admission::Bypassed,
        };
        if admission == Admission::Full {
            return Err(Error::ClassFull);
        }
        let user = match user {
            Some(user) => user,
            None => match self.clients.get_user(user_id).await {
                Ok(user) => user,
                Err(e) => {
                    if admission == Admission::Admitted {
                        self.gate.settle(target_id, user_id, false).await;
                    }
                    return Err(e);
                }
            },
        };

        let record = Record {
            redemption_id: Uuid::now_v7(),
            idempotency_key: cmd.idempotency_key.clone(),
            request: cmd.request.clone(),
            state: "admitted".into(),
            key_id,
            key_kind: kind as i32,
            target_id,
            user_id,
            user_created,
            response: None,
            error_code: None,
            error_reason: None,
            error_message: None,
            updated_at: Utc::now(),
        };
        let inserted = match self.store.insert(&record).await {
            Ok(inserted) => inserted,
            Err(e) => {
                if admission == Admission::Admitted {
                    self.gate.settle(target_id, user_id, false).await;
                }
                return Err(e);
            }
        };
        if !inserted {
            // Another attempt took this idempotency key first: its answer is
            // ours. The hold this attempt placed is released, unless that
            // attempt is still on its way for the same seat: holds are per
            // student, so its seat may rest on this hold, and its settle
            // ends it.
            let first = self
                .store
                .find(&cmd.idempotency_key)
                .await?
                .ok_or(Error::InProgress)?;
            let same_seat_in_flight = first.state == "admitted"
                && first.user_id == user_id
                && first.target_id == target_id;
            if admission == Admission::Admitted && !same_seat_in_flight {
                self.gate.settle(target_id, user_id, false).await;
            }
            return Box::pin(self.replay(first, &cmd.request)).await;
        }
        self.drive(&record, user).await
    }

    /// ResolveKey; unknown and mistyped codes count as failed attempts.
    /// Concurrent look-ups of one code share a call, and an event key's
    /// answer is kept for a second (the hot key of a herd; a revocation
    /// takes effect within that second).
    async fn resolve(
        &self,
        code: &str,
        counters: &[String],
    ) -> Result<pb::ResolveKeyResponse, Error> {
        let clients = self.clients.clone();
        let owned = code.to_owned();
        let fetch = async move { clients.resolve_key(&owned, None).await };
        let is_event = |r: &pb::ResolveKeyResponse| {
            r.key
                .as_ref()
                .is_some_and(|k| k.kind == pb::KeyKind::Event as i32)
        };
        match self.resolved.get(code.to_owned(), fetch, is_event).await {
            Err(e @ (Error::KeyMistyped | Error::KeyNotFound)) => {
                self.limiter.record_failure(counters).await;
                Err(e)
            }
            other => other,
        }
    }

    /// Whether this user used the key matters only once it is used up: then
    /// ask again, for this user.
    async fn with_user(
        &self,
        resolved: pb::ResolveKeyResponse,
        code: &str,
        user_id: Uuid,
        counters: &[String],
    ) -> Result<pb::ResolveKeyResponse, Error> {
        match &resolved.key {
            Some(k) if k.max_uses > 0 && k.uses >= k.max_uses => {
                match self.clients.resolve_key(code, Some(user_id)).await {
                    Err(e @ (Error::KeyMistyped | Error::KeyNotFound)) => {
                        self.limiter.record_failure(counters).await;
                        Err(e)
                    }
                    other => other,
                }
            }
            _ => Ok(resolved),
        }
    }

    /// GetClass; concurrent look-ups of one class share a call (nothing is
    /// kept, so a changed maximum or schedule counts at once).
    async fn class(&self, class_id: &str) -> Result<pb::Class, Error> {
        let clients = self.clients.clone();
        let owned = class_id.to_owned();
        self.classes
            .get(
                class_id.to_owned(),
                async move { clients.get_class(&owned).await },
                |_| false,
            )
            .await
    }

    /// Takes a recorded redemption to its end: completed, or compensated and
    /// failed. An outage leaves it `admitted`, to be driven again later.
    pub async fn drive(
        &self,
        record: &Record,
        user: pb::User,
    ) -> Result<pb::RedeemKeyResponse, Error> {
        match self.apply(record, user).await {
            Ok(response) => {
                if self
                    .store
                    .complete(record.redemption_id, &response.encode_to_vec())
                    .await?
                {
                    Ok(response)
                } else {
                    self.finished(record).await
                }
            }
            Err(error) if error.is_final() => {
                self.compensate(record).await?;
                if self.store.fail(record.redemption_id, &error).await? {
                    Err(error)
                } else {
                    self.finished(record).await
                }
            }
            Err(outage) => Err(outage),
        }
    }

    /// Whoever finished the record first decides the answer.
    async fn finished(&self, record: &Record) -> Result<pb::RedeemKeyResponse, Error> {
        let stored = self.store.get(record.redemption_id).await?;
        Box::pin(self.replay(stored, &record.request)).await
    }

    /// The irreversible steps; each is idempotent for this redemption.
    async fn apply(&self, record: &Record, user: pb::User) -> Result<pb::RedeemKeyResponse, Error> {
        let (rid, key, target, user_id) = (
            record.redemption_id,
            record.key_id,
            record.target_id,
            record.user_id,
        );
        let kind = pb::KeyKind::try_from(record.key_kind).unwrap_or(pb::KeyKind::Unspecified);
        let (grant, already_held) = match kind {
            pb::KeyKind::Event | pb::KeyKind::ClassEnrollment => {
                let consumed = kind == pb::KeyKind::ClassEnrollment
                    && self
                        .consume(
                            key,
                            user_id,
                            rid,
                            self.clients.is_enrolled(&target.to_string(), user_id),
                        )
                        .await?;
                self.fault(FaultPoint::AfterConsume).await;
                let (enrollment, already) = self.clients.enroll(target, user_id, key).await?;
                self.fault(FaultPoint::AfterCommit).await;
                if already && consumed {
                    // The user had the seat already: do not use up a key on it.
                    self.clients.release_key(key, rid).await?;
                }
                self.gate.settle(target, user_id, true).await;
                (Grant::Enrollment(enrollment), already)
            }
            pb::KeyKind::Subscription => {
                let consumed = self
                    .consume(
                        key,
                        user_id,
                        rid,
                        self.clients.has_subscription(&target.to_string(), user_id),
                    )
                    .await?;
                self.fault(FaultPoint::AfterConsume).await;
                let (subscription, already) = self
                    .clients
                    .assign_subscription(target, user_id, key)
                    .await?;
                self.fault(FaultPoint::AfterCommit).await;
                if already && consumed {
                    self.clients.release_key(key, rid).await?;
                }
                (Grant::Subscription(subscription), already)
            }
            pb::KeyKind::Unspecified => {
                return Err(Error::Internal(format!("bad key kind {}", record.key_kind)));
            }
        };
        Ok(pb::RedeemKeyResponse {
            redemption_id: rid.to_string(),
            kind: record.key_kind,
            key_id: key.to_string(),
            user: Some(user),
            user_created: record.user_created,
            grant: Some(grant),
            already_held,
        })
    }

    /// ConsumeKey. A used-up key is still fine for a user who already holds
    /// what it grants (`holds`): they get it back without a use. Returns
    /// whether a use was taken.
    async fn consume(
        &self,
        key: Uuid,
        user: Uuid,
        rid: Uuid,
        holds: impl Future<Output = Result<bool, Error>>,
    ) -> Result<bool, Error> {
        match self.clients.consume_key(key, user, rid).await {
            Ok(()) => Ok(true),
            Err(Error::KeyAlreadyRedeemed) if holds.await? => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Undoes what a failed redemption may have taken: the key's use and the seat hold.
    async fn compensate(&self, record: &Record) -> Result<(), Error> {
        if record.key_kind != pb::KeyKind::Event as i32 {
            self.clients
                .release_key(record.key_id, record.redemption_id)
                .await?;
        }
        if record.key_kind != pb::KeyKind::Subscription as i32 {
            self.gate
                .settle(record.target_id, record.user_id, false)
                .await;
        }
        Ok(())
    }

    /// The answer recorded for an idempotency key: the stored response, the
    /// stored final error, or — while unfinished — wait, then drive it on.
    async fn replay(&self, record: Record, request: &[u8]) -> Result<pb::RedeemKeyResponse, Error> {
        if record.request != request {
            return Err(Error::IdempotencyKeyReused);
        }
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let mut record = record;
        loop {
            match record.state.as_str() {
                "completed" => {
                    let bytes = record.response.as_deref().unwrap_or_default();
                    return pb::RedeemKeyResponse::decode(bytes)
                        .map_err(|e| Error::Internal(e.to_string()));
                }
                "failed" => {
                    return Err(Error::Replayed {
                        code: record.error_code.unwrap_or(tonic::Code::Unknown as i32),
                        reason: record.error_reason.unwrap_or_default(),
                        message: record.error_message.unwrap_or_default(),
                    });
                }
                _ => {}
            }
            // Unfinished and idle for longer than a live request may run:
            // its driver is gone, so this retry drives it on.
            let idle = Utc::now() - record.updated_at;
            if idle.to_std().unwrap_or_default() > self.settings.timeout {
                return self.take_over(record).await;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::InProgress);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            record = self.store.get(record.redemption_id).await?;
        }
    }

    /// Claims an abandoned redemption and drives it to its end.
    pub async fn take_over(&self, record: Record) -> Result<pb::RedeemKeyResponse, Error> {
        if !self.store.claim(&record).await? {
            return Err(Error::InProgress);
        }
        tracing::info!(redemption_id = %record.redemption_id, "driving an abandoned redemption on");
        let user = self.clients.get_user(record.user_id).await?;
        self.drive(&record, user).await
    }

    async fn fault(&self, point: FaultPoint) {
        if self.settings.fault == Some(point) {
            tracing::warn!(
                ?point,
                "fault injected: this redemption stops here, as if the process died"
            );
            std::future::pending::<()>().await;
        }
    }

    /// ValidateKey: what the key grants and whether it can be redeemed now.
    pub async fn validate(
        &self,
        code: &str,
        user_id: Option<Uuid>,
        caller: &str,
    ) -> Result<pb::ValidateKeyResponse, Error> {
        let mut counters = vec![caller_key(caller)];
        counters.extend(user_id.map(|u| user_key(&u.to_string())));
        self.limiter.check(&counters).await?;
        let looked_up = match user_id {
            Some(user) => match self.resolve(code, &counters).await {
                Ok(r) => self.with_user(r, code, user, &counters).await,
                Err(e) => Err(e),
            },
            None => self.resolve(code, &counters).await,
        };
        let resolved = match looked_up {
            Ok(r) => r,
            Err(e @ (Error::KeyMistyped | Error::KeyNotFound)) => {
                return Ok(pb::ValidateKeyResponse {
                    reason: e.reason().to_owned(),
                    ..Default::default()
                });
            }
            Err(e) => return Err(e),
        };
        let key = resolved
            .key
            .clone()
            .ok_or_else(|| Error::Internal("ResolveKey without a key".into()))?;
        let kind = domain::kind(&key)?;
        let mut response = pb::ValidateKeyResponse {
            kind: kind as i32,
            key_id: key.key_id.clone(),
            ..Default::default()
        };
        let (class, seats_left) = if kind == pb::KeyKind::Subscription {
            let profile = self.clients.get_profile(&key.profile_id).await?;
            response.grant = Some(pb::validate_key_response::Grant::Subscription(
                pb::SubscriptionGrant {
                    profile_id: profile.profile_id.clone(),
                    name: profile.name,
                    course_ids: profile.course_ids,
                    duration_days: profile.duration_days,
                },
            ));
            if let Some(user) = user_id {
                response.already_held_by_user = self
                    .clients
                    .has_subscription(&profile.profile_id, user)
                    .await?;
            }
            (None, None)
        } else {
            let class = self.class(&key.class_id).await?;
            if let Some(user) = user_id {
                response.already_held_by_user =
                    self.clients.is_enrolled(&class.class_id, user).await?;
            }
            response.grant = Some(pb::validate_key_response::Grant::Class(pb::ClassGrant {
                class_id: class.class_id.clone(),
                title: class.title.clone(),
                course_id: class.course_id.clone(),
                start_time: class.start_time,
                end_time: class.end_time,
                lab_access_end_time: class.lab_access_end_time,
                max_students: class.max_students,
                seats_left: class.seats_left,
            }));
            let seats_left = class.seats_left;
            (Some(class), Some(seats_left))
        };
        response.valid_until =
            domain::valid_until(&key, class.as_ref()).map(trainingkeys_proto::time::to_timestamp);
        let verdict =
            domain::check_redeemable(&resolved, class.as_ref(), Utc::now()).and_then(|()| {
                if seats_left == Some(0) && !response.already_held_by_user {
                    Err(Error::ClassFull)
                } else {
                    Ok(())
                }
            });
        match verdict {
            Ok(()) => response.redeemable = true,
            Err(e) if e.is_final() => response.reason = e.reason().to_owned(),
            Err(e) => return Err(e),
        }
        Ok(response)
    }
}
