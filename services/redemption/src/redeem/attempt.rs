//! The first attempt at a redemption, up to its record. Nothing is written
//! before every check has passed: the key, its window, the organization and
//! the gate decide first; only then is a self-registering student's account
//! created (invariant 9) and the redemption recorded, and from the record on
//! [`drive`](super::drive) takes it to its end.

use chrono::Utc;
use trainingkeys_proto::v1 as pb;
use uuid::Uuid;

use std::sync::atomic::AtomicBool;

use super::{FaultPoint, Redeemer};
use crate::domain::{self, RedeemCommand, Who, peer_id};
use crate::error::Error;
use crate::gate::{Admission, Settle};
use crate::store::{Lease, Record, State};

/// What a key grants a seat in or a subscription of.
struct Target {
    /// The class or the subscription profile.
    id: Uuid,
    /// Its organization: a student of another one is refused before any write.
    organization_id: String,
    /// The class, for class keys (its current dates and seats).
    class: Option<pb::Class>,
}

/// Who redeems, as far as it can be known without writing anything.
struct Identity {
    /// The user's id; for a student not registered yet, the id the account
    /// will get if this redemption is admitted.
    user_id: Uuid,
    /// The user, when already looked up.
    user: Option<pb::User>,
}

impl Redeemer {
    /// The first attempt: checks, admission, the account, the record, then
    /// the drive.
    pub(super) async fn execute(
        &self,
        cmd: &RedeemCommand,
        counters: &[String],
    ) -> Result<pb::RedeemKeyResponse, Error> {
        let resolved = self.resolve(&cmd.code, counters).await?;
        let key = resolved
            .key
            .clone()
            .ok_or_else(|| Error::Internal("ResolveKey without a key".into()))?;
        let kind = domain::kind(&key)?;
        let key_id = peer_id("key_id", &key.key_id)?;
        let target = self.target(kind, &key).await?;
        if cmd
            .orgs
            .as_ref()
            .is_some_and(|orgs| !orgs.contains(&target.organization_id))
        {
            // Another organization's key: as a missing one, counted too.
            self.limiter.record_failure(counters).await;
            return Err(Error::KeyNotFound);
        }
        let mut identity = self.identify(&cmd.who, &target).await?;
        let resolved = match identity.user {
            // A student with no account yet has used nothing.
            None if matches!(cmd.who, Who::New(_)) => resolved,
            _ => {
                self.with_user(resolved, &cmd.code, identity.user_id, counters)
                    .await?
            }
        };
        domain::check_redeemable(&resolved, target.class.as_ref(), Utc::now())?;

        // The redemption's id is the same for every attempt with this
        // idempotency key (whichever records first): an account created for
        // it records it, so voiding the redemption removes the account
        // whichever attempt created it, and no other; and the gate remembers
        // it as let through, so its retries are answered from its record.
        let redemption_id = cmd.redemption_id();
        // An existing user is looked up only once admitted: a full class
        // turns the herd away after one Redis call, without a call each.
        let mut admission = self.admit(&target, identity.user_id, redemption_id).await;
        if admission == Admission::Full {
            return Err(Error::ClassFull);
        }
        let (user, user_created) = match self
            .account(cmd, &target, &mut identity, &mut admission, redemption_id)
            .await
        {
            Ok(account) => account,
            Err(e) => {
                self.release_hold(&target, identity.user_id, redemption_id, admission)
                    .await;
                return Err(e);
            }
        };

        self.fault(FaultPoint::BeforeRecord, None, &AtomicBool::new(false))
            .await;
        let record = Record {
            redemption_id,
            scope: cmd.who.scope(),
            idempotency_key: cmd.idempotency_key.clone(),
            request: cmd.request.clone(),
            state: State::Admitted,
            generation: 1,
            key_id,
            key_kind: kind as i32,
            target_id: target.id,
            user_id: identity.user_id,
            user_created,
            response: None,
            error_code: None,
            error_reason: None,
            error_message: None,
            idle_seconds: 0.0,
            created_at: chrono::Utc::now(),
            legacy: false,
        };
        let inserted = match self.store.insert(&record).await {
            Ok(inserted) => inserted,
            Err(e) => {
                self.release_hold(&target, identity.user_id, redemption_id, admission)
                    .await;
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
                .find(&cmd.idempotency())
                .await?
                .ok_or(Error::InProgress)?;
            let same_seat_in_flight = first.state == State::Admitted
                && first.user_id == identity.user_id
                && first.target_id == target.id;
            if !same_seat_in_flight {
                self.release_hold(&target, identity.user_id, redemption_id, admission)
                    .await;
            }
            return Box::pin(self.replay(first, &cmd.request)).await;
        }
        let lease = Lease {
            redemption_id: record.redemption_id,
            generation: record.generation,
        };
        self.drive(lease, &record, Some(user)).await
    }

    /// The class (class keys) or profile (subscription keys) the key grants.
    async fn target(&self, kind: pb::KeyKind, key: &pb::Key) -> Result<Target, Error> {
        if kind == pb::KeyKind::Subscription {
            let profile = self.profile(&key.profile_id).await?;
            return Ok(Target {
                id: peer_id("profile_id", &profile.profile_id)?,
                organization_id: profile.organization_id,
                class: None,
            });
        }
        let class = self.class(&key.class_id).await?;
        Ok(Target {
            id: peer_id("class_id", &class.class_id)?,
            organization_id: class.organization_id.clone(),
            class: Some(class),
        })
    }

    /// Who redeems, with no write: an existing user's id as given; a
    /// self-registering student's existing account by email, or else the id
    /// their account will get once admitted.
    async fn identify(&self, who: &Who, target: &Target) -> Result<Identity, Error> {
        match who {
            Who::Existing(user_id) => Ok(Identity {
                user_id: *user_id,
                user: None,
            }),
            Who::New(new) => {
                if new.organization_id != target.organization_id {
                    return Err(Error::OrganizationMismatch);
                }
                match self.clients.find_user(new).await? {
                    Some(user) => Ok(Identity {
                        user_id: peer_id("user_id", &user.user_id)?,
                        user: Some(user),
                    }),
                    None => Ok(Identity {
                        user_id: Uuid::now_v7(),
                        user: None,
                    }),
                }
            }
        }
    }

    /// Once admitted: the user, and whether this redemption created the
    /// account. An existing user of another organization is refused here,
    /// before the record. A student registered meanwhile by a concurrent
    /// request keeps that account, and is admitted under its id instead.
    async fn account(
        &self,
        cmd: &RedeemCommand,
        target: &Target,
        identity: &mut Identity,
        admission: &mut Admission,
        redemption_id: Uuid,
    ) -> Result<(pb::User, bool), Error> {
        if let Some(user) = identity.user.take() {
            return Ok((user, false));
        }
        match &cmd.who {
            Who::Existing(user_id) => {
                let user = self.clients.get_user(*user_id).await?;
                // A user of an organization the caller may not act in is
                // answered as a missing one.
                if cmd
                    .orgs
                    .as_ref()
                    .is_some_and(|orgs| !orgs.contains(&user.organization_id))
                {
                    return Err(Error::UserNotFound);
                }
                if user.organization_id != target.organization_id {
                    return Err(Error::OrganizationMismatch);
                }
                Ok((user, false))
            }
            Who::New(new) => {
                let (user, created) = self
                    .clients
                    .register_user(new, identity.user_id, redemption_id)
                    .await?;
                let registered = peer_id("user_id", &user.user_id)?;
                if registered != identity.user_id {
                    self.release_hold(target, identity.user_id, redemption_id, *admission)
                        .await;
                    identity.user_id = registered;
                    *admission = self.admit(target, registered, redemption_id).await;
                    if *admission == Admission::Full {
                        return Err(Error::ClassFull);
                    }
                }
                Ok((user, created))
            }
        }
    }

    /// Admission at the gate (class keys; subscriptions take no seat).
    async fn admit(&self, target: &Target, user_id: Uuid, redemption_id: Uuid) -> Admission {
        match &target.class {
            Some(class) => {
                let roster = || self.roster(target.id);
                self.gate
                    .admit(
                        target.id,
                        user_id,
                        redemption_id,
                        class.max_students,
                        class.enrolled_count,
                        roster,
                    )
                    .await
            }
            None => Admission::Bypassed,
        }
    }

    /// Releases the hold this attempt placed, if it placed one.
    async fn release_hold(
        &self,
        target: &Target,
        user_id: Uuid,
        redemption_id: Uuid,
        admission: Admission,
    ) {
        if admission == Admission::Admitted {
            self.gate
                .settle(target.id, user_id, redemption_id, Settle::Release)
                .await;
        }
    }
}
