//! ValidateKey: what a key grants and whether it can be redeemed now, for
//! this user if one is named. It writes nothing (only a failed look-up of an
//! unknown or mistyped code counts against the guessing limits).

use chrono::Utc;
use trainingkeys_proto::v1 as pb;
use uuid::Uuid;

use super::Redeemer;
use crate::domain;
use crate::domain::Who;
use crate::error::Error;
use crate::limiter::{caller_key, user_key};

impl Redeemer {
    /// ValidateKey: what the key grants and whether it can be redeemed now.
    pub async fn validate(
        self: &std::sync::Arc<Self>,
        code: &str,
        user_id: Option<Uuid>,
        caller: &str,
        orgs: &std::collections::BTreeSet<String>,
        counted_as: &str,
    ) -> Result<pb::ValidateKeyResponse, Error> {
        let mut counters = vec![caller_key(caller)];
        counters.extend(
            user_id.map(|u| user_key(&format!("{counted_as}{}", Who::Existing(u).scope()))),
        );
        self.limiter.check(&counters).await?;
        let looked_up = match user_id {
            Some(user) => {
                // The look-up is the guess: reserved for this user first.
                let attempt = Uuid::new_v4().to_string();
                let _reserved = self.reserve(&counters[1], attempt).await?;
                match self.resolve(code, &counters).await {
                    Ok(r) => self.with_user(r, code, user, &counters).await,
                    Err(e) => Err(e),
                }
            }
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
        // Another organization's key answers as a missing one.
        let not_found = || pb::ValidateKeyResponse {
            reason: Error::KeyNotFound.reason().to_owned(),
            ..Default::default()
        };
        let (class, seats_left) = if kind == pb::KeyKind::Subscription {
            let profile = self.profile(&key.profile_id).await?;
            if !orgs.contains(&profile.organization_id) {
                self.limiter.record_failure(&counters).await;
                return Ok(not_found());
            }
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
                    .subscription(&profile.profile_id, user)
                    .await?
                    .is_some();
            }
            (None, None)
        } else {
            let class = self.class(&key.class_id).await?;
            if !orgs.contains(&class.organization_id) {
                self.limiter.record_failure(&counters).await;
                return Ok(not_found());
            }
            if let Some(user) = user_id {
                response.already_held_by_user =
                    self.clients.seat(&class.class_id, user).await?.is_some();
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
