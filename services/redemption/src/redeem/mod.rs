//! RedeemKey and ValidateKey (docs/architecture.md, "A redemption, step by
//! step"), for all three kinds of key. A reader comes here for one of three
//! things, and each has its file:
//!
//! - [`attempt`]: the first attempt: guessing limit → idempotency look-up →
//!   resolve the key → the class or profile → who redeems (no write yet) →
//!   the window → admission at the gate → only then the account (a new
//!   user's) → record the redemption (`admitted`, lease generation 1);
//! - [`drive`]: taking a recorded redemption to its end under its lease
//!   (consume, enroll / assign, confirm, record the answer; compensate a
//!   final failure), which a client's retry and recovery reuse;
//! - [`validate`]: ValidateKey, which writes nothing.
//!
//! This file holds the [`Redeemer`], the entry point with its in-process
//! sharing of identical concurrent retries, and the look-ups every part uses.

mod attempt;
mod drive;
mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use tracing::Instrument as _;
use trainingkeys_proto::v1 as pb;

pub use drive::{Fault, FaultAction, FaultPoint};

use crate::clients::Clients;
use crate::coalesce::Coalesce;
use crate::domain::RedeemCommand;
use crate::domain::Who;
use crate::error::Error;
use crate::gate::{Gate, Roster};
use crate::limiter::{Limiter, caller_key, user_key};
use crate::store::{IdempotencyKey, Store};

/// Tunables of the flow.
pub struct Settings {
    /// How long an event key's ResolveKey answer is reused, and how long a
    /// class's facts may be used to turn a student away from a full class
    /// by Redis alone (FACTS_KEEP_MS: a revocation, or a raised maximum,
    /// counts within it).
    pub facts_keep: Duration,
    /// Longest a client waits for its redemption (which carries on regardless).
    pub timeout: Duration,
    /// How long a redemption's lease must go unrenewed before a retry or
    /// recovery takes it over (RECOVERY_AFTER_SECONDS, > `timeout`).
    pub take_over_after: Duration,
    /// Test-only: where a redemption's first driver stops, and how.
    pub fault: Option<Fault>,
}

impl Settings {
    /// How often a driver renews its lease: well inside `take_over_after`.
    fn renew_every(&self) -> Duration {
        (self.take_over_after / 4).max(Duration::from_millis(100))
    }
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
    in_flight: Mutex<HashMap<IdempotencyKey, InFlight>>,
    /// ResolveKey answers by code (event keys kept briefly).
    resolved: Coalesce<String, pb::ResolveKeyResponse>,
    /// GetClass answers by class id: in-flight calls shared; the last
    /// answer kept a moment for [`Self::full_for_sure`] alone.
    classes: Coalesce<String, pb::Class>,
    /// GetSubscriptionProfile answers by profile id (in-flight calls shared).
    profiles: Coalesce<String, pb::SubscriptionProfile>,
    /// Test-only: a panic fault has fired (it fires once per process).
    panicked: std::sync::atomic::AtomicBool,
}

/// Forgets a redemption's in-flight entry when its task ends, however it
/// ends: a task that panicked must not leave its idempotency key joined to
/// a dead outcome for the life of the process.
struct Forget {
    redeemer: Arc<Redeemer>,
    key: IdempotencyKey,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.redeemer
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
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
        let facts_keep = settings.facts_keep;
        Self {
            store,
            clients,
            gate,
            limiter,
            settings,
            in_flight: Mutex::new(HashMap::new()),
            resolved: Coalesce::new(facts_keep),
            classes: Coalesce::kept_for_peeks(facts_keep),
            profiles: Coalesce::new(Duration::ZERO),
            panicked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Notes which Redis server the gate talks to (at start-up).
    pub async fn observe_redis(&self) {
        self.gate.notice_new_server().await;
    }

    /// Rebuilds drifted gate state from enrollment (for recovery).
    pub async fn repair_gate(&self) -> usize {
        self.gate.repair(|class_id| self.roster(class_id)).await
    }

    /// What the gate rebuilds a class from: enrollment's seat holders and
    /// the redemptions recorded here for the class.
    async fn roster(&self, class_id: uuid::Uuid) -> Result<Roster, Error> {
        Ok(Roster {
            seated: self.clients.roster(class_id).await?,
            redemptions: self.store.redemptions_for(class_id).await?,
        })
    }

    /// The redemption log (for recovery).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How long a lease must go unrenewed before it is taken over.
    pub fn take_over_after(&self) -> Duration {
        self.settings.take_over_after
    }

    /// RedeemKey. `caller` identifies the client for the guessing limits.
    pub async fn redeem(
        self: &Arc<Self>,
        cmd: RedeemCommand,
        caller: &str,
    ) -> Result<pb::RedeemKeyResponse, Error> {
        let user = format!("{}{}", cmd.counted_as, cmd.who.scope());
        let counters = [caller_key(caller), user_key(&user)];
        self.limiter.check(&counters).await?;
        if self.full_for_sure(&cmd).await {
            return Err(Error::ClassFull);
        }
        // Identical retries share a reservation; another code with the same
        // key is another guess.
        let attempt = format!(
            "{}\n{}",
            cmd.idempotency_key,
            trainingkeys_shared::validate::normalize_code(&cmd.code)
        );
        let reserved = self.reserve(&counters[1], attempt).await?;
        self.redeem_reserved(cmd, &counters, reserved).await
    }

    /// Reserves an attempt of a user with the guessing limits; the
    /// reservation ends when the guard is dropped. A new execution takes the
    /// guard into its task, so it ends when the look-up can no longer
    /// happen, not when the client hangs up.
    async fn reserve(self: &Arc<Self>, user_key: &str, attempt: String) -> Result<Reserved, Error> {
        let made = self.limiter.reserve(user_key, &attempt).await?;
        Ok(Reserved {
            redeemer: self.clone(),
            user_key: user_key.to_owned(),
            attempt,
            owned: made == crate::limiter::Reservation::Made,
        })
    }

    /// RedeemKey, once its attempt is reserved with the guessing limits.
    async fn redeem_reserved(
        self: &Arc<Self>,
        cmd: RedeemCommand,
        counters: &[String; 2],
        reserved: Reserved,
    ) -> Result<pb::RedeemKeyResponse, Error> {
        let orgs = cmd.orgs.clone();
        let answer = if let Some(record) = self.store.find(&cmd.idempotency()).await? {
            self.replay(record, &cmd.request).await
        } else {
            let outcome = self.join_or_start(cmd, counters.clone(), reserved)?;
            match tokio::time::timeout(self.settings.timeout, outcome).await {
                Ok(result) => result,
                Err(_) => Err(Error::Unavailable(
                    "redemption (still running: retry with the same idempotency key)",
                )),
            }
        };
        // A recorded or shared answer is for its own caller: one of another
        // organization (a replay by someone who knows the user and the
        // idempotency key) is answered as a missing key.
        match (&answer, &orgs) {
            (Ok(response), Some(orgs))
                if !response
                    .user
                    .as_ref()
                    .is_some_and(|u| orgs.contains(&u.organization_id)) =>
            {
                self.limiter.record_failure(counters).await;
                Err(Error::KeyNotFound)
            }
            _ => answer,
        }
    }

    /// Identical concurrent requests in this process share one execution,
    /// which runs in its own task so a client hanging up cannot cut it short.
    fn join_or_start(
        self: &Arc<Self>,
        cmd: RedeemCommand,
        counters: [String; 2],
        reserved: Reserved,
    ) -> Result<SharedOutcome, Error> {
        let key = cmd.idempotency();
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = in_flight.get(&key) {
            if running.request != cmd.request {
                return Err(Error::IdempotencyKeyReused);
            }
            return Ok(running.outcome.clone());
        }
        let request = cmd.request.clone();
        let forget = Forget {
            redeemer: self.clone(),
            key: key.clone(),
        };
        let this = self.clone();
        // The task carries the caller's span, so its calls to the other
        // services stay in the caller's trace.
        let task = tokio::spawn(
            async move {
                let _forget = forget;
                let _reserved = reserved;
                this.execute(&cmd, &counters).await
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

    /// The herd's fast answer: CLASS_FULL decided by Redis alone, with no
    /// PostgreSQL statement, no call to another service and no idempotency
    /// look-up. Only when every fact the full path would check first is at
    /// hand from a moment ago (the key's resolution, the class) and gives
    /// the same answer: a known student, a redeemable key of their
    /// organization, a class the gate counts full, and no earlier attempt
    /// with this idempotency key let through (its recorded answer is
    /// replayed by the full path). Anything else, or Redis away: false, and
    /// the full path decides.
    async fn full_for_sure(&self, cmd: &RedeemCommand) -> bool {
        let Who::Existing(user_id) = cmd.who else {
            // A self-registering student's account (and seat) is found by
            // email, in PostgreSQL.
            return false;
        };
        let Some(resolved) = self.resolved.kept(&cmd.code) else {
            return false;
        };
        let Some(key) = resolved.key.as_ref() else {
            return false;
        };
        let Some(class) = self.classes.kept(&key.class_id) else {
            return false;
        };
        let used_up = key.max_uses > 0 && key.uses >= key.max_uses;
        let outside = cmd
            .orgs
            .as_ref()
            .is_some_and(|orgs| !orgs.contains(&class.organization_id));
        if used_up
            || outside
            || crate::domain::check_redeemable(&resolved, Some(&class), chrono::Utc::now()).is_err()
        {
            return false;
        }
        let Ok(class_id) = class.class_id.parse() else {
            return false;
        };
        self.gate
            .full_for_sure(
                class_id,
                user_id,
                cmd.redemption_id(),
                class.max_students,
                class.enrolled_count,
            )
            .await
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
        let answer = self.resolved.get(code.to_owned(), fetch, is_event).await;
        self.count_failure(answer, counters).await
    }

    /// Whether this user used the key matters only once it is used up: then
    /// ask again, for this user.
    async fn with_user(
        &self,
        resolved: pb::ResolveKeyResponse,
        code: &str,
        user_id: uuid::Uuid,
        counters: &[String],
    ) -> Result<pb::ResolveKeyResponse, Error> {
        match &resolved.key {
            Some(k) if k.max_uses > 0 && k.uses >= k.max_uses => {
                let answer = self.clients.resolve_key(code, Some(user_id)).await;
                self.count_failure(answer, counters).await
            }
            _ => Ok(resolved),
        }
    }

    /// Unknown and mistyped codes count against the guessing limits.
    async fn count_failure<T>(
        &self,
        answer: Result<T, Error>,
        counters: &[String],
    ) -> Result<T, Error> {
        if let Err(Error::KeyMistyped | Error::KeyNotFound) = &answer {
            self.limiter.record_failure(counters).await;
        }
        answer
    }

    /// GetClass; concurrent look-ups of one class share a call (the answer
    /// is kept only for [`Self::full_for_sure`]: here a changed maximum or
    /// schedule counts at once).
    async fn class(&self, class_id: &str) -> Result<pb::Class, Error> {
        let clients = self.clients.clone();
        let owned = class_id.to_owned();
        self.classes
            .get(
                class_id.to_owned(),
                async move { clients.get_class(&owned).await },
                |_| true,
            )
            .await
    }

    /// GetSubscriptionProfile; concurrent look-ups of one profile share a call.
    async fn profile(&self, profile_id: &str) -> Result<pb::SubscriptionProfile, Error> {
        let clients = self.clients.clone();
        let owned = profile_id.to_owned();
        self.profiles
            .get(
                profile_id.to_owned(),
                async move { clients.get_profile(&owned).await },
                |_| false,
            )
            .await
    }
}

/// An attempt reserved with the guessing limits, released on drop by the
/// one that made the reservation (an identical retry joins it).
struct Reserved {
    redeemer: Arc<Redeemer>,
    user_key: String,
    attempt: String,
    owned: bool,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let redeemer = self.redeemer.clone();
        let user_key = std::mem::take(&mut self.user_key);
        let attempt = std::mem::take(&mut self.attempt);
        tokio::spawn(async move { redeemer.limiter.release(&user_key, &attempt).await });
    }
}
