//! Redemption rules that need no I/O: validated requests, the validity window
//! of a key against its class's current dates, and the use limit.

use chrono::{DateTime, Utc};
use prost::Message as _;
use trainingkeys_proto::time::from_timestamp;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::redeem_key_request::Redeemer;
use trainingkeys_shared::{InvalidField, validate};
use uuid::Uuid;

use crate::error::Error;

/// Longest code accepted as input (custom codes are at most 64).
const MAX_CODE: usize = 100;
/// Longest idempotency key.
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Who redeems.
#[derive(Debug, Clone)]
pub enum Who {
    /// An existing user.
    Existing(Uuid),
    /// A self-registering user (get-or-create by email).
    New(pb::NewUser),
}

impl Who {
    /// The guessing-limit identity of this user.
    pub fn limit_identity(&self) -> String {
        match self {
            Who::Existing(id) => id.to_string(),
            Who::New(n) => format!("{}/{}", n.organization_id, n.email),
        }
    }
}

/// RedeemKey, validated.
#[derive(Debug, Clone)]
pub struct RedeemCommand {
    pub code: String,
    pub who: Who,
    pub idempotency_key: String,
    /// The request as sent, to tell a retry from a reuse of the idempotency key.
    pub request: Vec<u8>,
}

/// A typed code: present and of sane length (its format is key-issuance's).
pub fn code(value: &str) -> Result<String, InvalidField> {
    let value = value.trim();
    if value.is_empty() {
        return Err(InvalidField::new("code", "is required"));
    }
    if value.chars().count() > MAX_CODE {
        return Err(InvalidField::new(
            "code",
            format!("must be at most {MAX_CODE} characters"),
        ));
    }
    Ok(value.to_owned())
}

impl TryFrom<pb::RedeemKeyRequest> for RedeemCommand {
    type Error = InvalidField;
    fn try_from(r: pb::RedeemKeyRequest) -> Result<Self, InvalidField> {
        let request = r.encode_to_vec();
        let who = match r.redeemer {
            Some(Redeemer::UserId(id)) => Who::Existing(validate::id("user_id", &id)?),
            Some(Redeemer::NewUser(n)) => Who::New(pb::NewUser {
                organization_id: validate::organization_id(
                    "new_user.organization_id",
                    &n.organization_id,
                )?,
                email: validate::email("new_user.email", &n.email)?,
                display_name: validate::text("new_user.display_name", &n.display_name, 200, false)?,
            }),
            None => {
                return Err(InvalidField::new(
                    "user_id",
                    "either user_id or new_user is required",
                ));
            }
        };
        let key = r.idempotency_key.trim();
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(InvalidField::new(
                "idempotency_key",
                format!("must be 1-{MAX_IDEMPOTENCY_KEY} characters"),
            ));
        }
        Ok(Self {
            code: code(&r.code)?,
            who,
            idempotency_key: key.to_owned(),
            request,
        })
    }
}

/// The kind of a resolved key.
pub fn kind(key: &pb::Key) -> Result<pb::KeyKind, Error> {
    match pb::KeyKind::try_from(key.kind) {
        Ok(k @ (pb::KeyKind::Subscription | pb::KeyKind::ClassEnrollment | pb::KeyKind::Event)) => {
            Ok(k)
        }
        _ => Err(Error::Internal(format!(
            "key-issuance returned key kind {}",
            key.kind
        ))),
    }
}

/// The end of a key's window now: for class keys from the class's current
/// dates (class end, or lab access end for event keys that allow it); for
/// subscription keys the pool's window.
pub fn valid_until(key: &pb::Key, class: Option<&pb::Class>) -> Option<DateTime<Utc>> {
    match class {
        Some(class) => {
            let end = if key.kind == pb::KeyKind::Event as i32 && key.redeemable_after_class_end {
                class.lab_access_end_time.as_ref()
            } else {
                class.end_time.as_ref()
            };
            end.and_then(from_timestamp)
        }
        None => key.valid_until.as_ref().and_then(from_timestamp),
    }
}

/// Can this key be redeemed at `now`? Revocation, window, then uses.
pub fn check_redeemable(
    resolved: &pb::ResolveKeyResponse,
    class: Option<&pb::Class>,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let key = resolved
        .key
        .as_ref()
        .ok_or_else(|| Error::Internal("ResolveKey without a key".into()))?;
    if resolved.revoked {
        return Err(Error::KeyRevoked);
    }
    if key
        .valid_from
        .as_ref()
        .and_then(from_timestamp)
        .is_some_and(|from| now < from)
    {
        return Err(Error::KeyNotYetValid);
    }
    if valid_until(key, class).is_some_and(|until| now > until) {
        return Err(Error::KeyExpired);
    }
    if key.max_uses > 0 && key.uses >= key.max_uses && !resolved.used_by_user {
        return Err(Error::KeyAlreadyRedeemed);
    }
    Ok(())
}

/// Parses an id another service returned.
pub fn peer_id(what: &str, value: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(value)
        .map_err(|_| Error::Internal(format!("peer returned a bad {what}: {value:?}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::Duration;
    use trainingkeys_proto::time::to_timestamp;

    fn class(end: DateTime<Utc>, lab_days: i64) -> pb::Class {
        pb::Class {
            end_time: Some(to_timestamp(end)),
            lab_access_end_time: Some(to_timestamp(end + Duration::days(lab_days))),
            ..Default::default()
        }
    }

    fn resolved(kind: pb::KeyKind, after_end: bool) -> pb::ResolveKeyResponse {
        pb::ResolveKeyResponse {
            key: Some(pb::Key {
                kind: kind as i32,
                redeemable_after_class_end: after_end,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn event_key_window_follows_the_class() {
        let now = Utc::now();
        let ended = class(now - Duration::hours(1), 3);
        let r = resolved(pb::KeyKind::Event, false);
        assert!(matches!(
            check_redeemable(&r, Some(&ended), now),
            Err(Error::KeyExpired)
        ));
        let r = resolved(pb::KeyKind::Event, true);
        assert!(check_redeemable(&r, Some(&ended), now).is_ok());
        let lab_over = class(now - Duration::days(4), 3);
        assert!(matches!(
            check_redeemable(&r, Some(&lab_over), now),
            Err(Error::KeyExpired)
        ));
        // Class enrollment keys never extend past the class end.
        let r = resolved(pb::KeyKind::ClassEnrollment, true);
        assert!(matches!(
            check_redeemable(&r, Some(&ended), now),
            Err(Error::KeyExpired)
        ));
    }

    #[test]
    fn used_up_keys_are_refused_unless_used_by_this_user() {
        let now = Utc::now();
        let mut r = resolved(pb::KeyKind::Subscription, false);
        r.key.as_mut().unwrap().max_uses = 1;
        r.key.as_mut().unwrap().uses = 1;
        assert!(matches!(
            check_redeemable(&r, None, now),
            Err(Error::KeyAlreadyRedeemed)
        ));
        r.used_by_user = true;
        assert!(check_redeemable(&r, None, now).is_ok());
        r.revoked = true;
        assert!(matches!(
            check_redeemable(&r, None, now),
            Err(Error::KeyRevoked)
        ));
    }
}
