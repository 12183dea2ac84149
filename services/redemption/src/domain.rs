//! Redemption rules that need no I/O: validated requests, the validity window
//! of a key against its class's current dates, and the use limit.

use chrono::{DateTime, Utc};
use prost::Message as _;
use trainingkeys_proto::time::from_timestamp;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::redeem_key_request::Redeemer;
use trainingkeys_shared::{InvalidField, validate, window};
use uuid::Uuid;

use crate::error::Error;
use crate::store::IdempotencyKey;

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
    /// Who redeems, as one string: the scope of their idempotency keys and
    /// the identity the guessing limits count.
    pub fn scope(&self) -> String {
        match self {
            Who::Existing(id) => format!("user:{id}"),
            Who::New(n) => format!("new:{}/{}", n.organization_id, n.email),
        }
    }
}

/// RedeemKey, validated.
#[derive(Debug, Clone)]
pub struct RedeemCommand {
    pub code: String,
    pub who: Who,
    pub idempotency_key: String,
    /// The request's meaning, canonically encoded (normalised code, parsed
    /// ids, validated user details): a retry written differently, say a
    /// UUID in capitals, is the same request; anything else is a reuse of
    /// the idempotency key.
    pub request: Vec<u8>,
    /// The organizations whose keys the caller may redeem (its token's);
    /// `None` for no restriction. Another organization's key answers
    /// KEY_NOT_FOUND, exactly as a missing one.
    pub orgs: Option<std::collections::BTreeSet<String>>,
    /// Who the guessing limits count this user's failures for: empty for
    /// the student themselves, `front:<subject>/` for a redemption front
    /// naming them (so one front's failures never lock a student out of
    /// another's).
    pub counted_as: String,
}

/// Namespace of redemption ids derived from idempotency keys.
const REDEMPTION_NAMESPACE: Uuid = Uuid::from_u128(0x6f0c_1d2e_8a4b_4c1f_9e3d_2b7a_5c60_f1a8);

impl RedeemCommand {
    /// The redemption's id: derived from who redeems and their idempotency
    /// key, so every attempt with that key names the same redemption.
    pub fn redemption_id(&self) -> Uuid {
        let name = format!("{}\n{}", self.who.scope(), self.idempotency_key);
        Uuid::new_v5(&REDEMPTION_NAMESPACE, name.as_bytes())
    }

    /// The idempotency key within its scope.
    pub fn idempotency(&self) -> IdempotencyKey {
        IdempotencyKey {
            scope: self.who.scope(),
            key: self.idempotency_key.clone(),
        }
    }
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
        if key.chars().any(char::is_control) {
            return Err(InvalidField::new(
                "idempotency_key",
                "must not contain control characters",
            ));
        }
        let code = code(&r.code)?;
        let meaning = pb::RedeemKeyRequest {
            code: validate::normalize_code(&code),
            idempotency_key: key.to_owned(),
            redeemer: Some(match &who {
                Who::Existing(id) => Redeemer::UserId(id.to_string()),
                Who::New(n) => Redeemer::NewUser(n.clone()),
            }),
        };
        Ok(Self {
            code,
            who,
            idempotency_key: key.to_owned(),
            request: meaning.encode_to_vec(),
            orgs: None,
            counted_as: String::new(),
        })
    }
}

/// Whether a stored request means what `canonical` (a command's `request`)
/// means. Records from before requests were stored canonically hold the
/// bytes as sent: those are read and canonicalised first.
pub fn same_meaning(stored: &[u8], canonical: &[u8]) -> bool {
    stored == canonical
        || pb::RedeemKeyRequest::decode(stored)
            .ok()
            .and_then(|r| RedeemCommand::try_from(r).ok())
            .is_some_and(|c| c.request == canonical)
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
    if window::not_yet_open(now, key.valid_from.as_ref().and_then(from_timestamp)) {
        return Err(Error::KeyNotYetValid);
    }
    if window::ended(now, valid_until(key, class)) {
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

    fn ts(seconds: i64, nanos: i32) -> trainingkeys_proto::prost_types::Timestamp {
        trainingkeys_proto::prost_types::Timestamp { seconds, nanos }
    }

    proptest::proptest! {
        /// RedeemKey requests of any content convert to a command or to a
        /// precise InvalidField, never a panic; a converted command's code,
        /// key and ids are within their limits.
        #[test]
        fn any_redeem_request_converts_or_names_its_field(
            code in ".{0,200}", key in ".{0,300}", user in ".{0,60}", org in ".{0,140}",
            email in ".{0,80}", name in ".{0,250}", new in proptest::bool::ANY,
            s in proptest::num::i64::ANY, n in proptest::num::i32::ANY,
        ) {
            let redeemer = if new {
                Redeemer::NewUser(pb::NewUser { organization_id: org, email, display_name: name })
            } else {
                Redeemer::UserId(user)
            };
            let request = pb::RedeemKeyRequest { code: code.clone(), redeemer: Some(redeemer), idempotency_key: key };
            match RedeemCommand::try_from(request) {
                Ok(cmd) => {
                    proptest::prop_assert!(!cmd.code.is_empty());
                    proptest::prop_assert!(!cmd.idempotency_key.chars().any(char::is_control));
                }
                Err(e) => proptest::prop_assert!(
                    ["code", "idempotency_key", "user_id", "new_user.organization_id",
                     "new_user.email", "new_user.display_name"].contains(&e.field),
                    "{e:?}"
                ),
            }
            let _ = ts(s, n);
        }
    }
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
        // The end instant itself is outside the window (as in key-issuance).
        let r = resolved(pb::KeyKind::Event, false);
        let ends_now = class(now, 3);
        assert!(matches!(
            check_redeemable(&r, Some(&ends_now), now),
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
