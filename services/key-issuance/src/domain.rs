//! The key issuance domain: validated commands (built from requests, so every
//! rule on input lives here), the records the store returns, the validity
//! window and status rules, and the conversion back to the wire types.

use chrono::{DateTime, Utc};
use trainingkeys_proto::time::{to_timestamp, to_timestamp_opt};
use trainingkeys_proto::v1 as pb;
use trainingkeys_shared::{InvalidField, validate};
use uuid::Uuid;

use crate::code::{self, Typed};
use crate::error::Error;
use crate::secrets::HMAC_LEN;

/// Most subscription keys one call generates.
pub const MAX_SUBSCRIPTION_KEYS: i32 = 1_000_000;
/// Most class enrollment keys one call generates: their codes come back in
/// the response, which must stay well under the gRPC message size limit.
pub const MAX_CLASS_KEYS_PER_CALL: i32 = 10_000;
/// Most uses of one subscription key.
pub const MAX_USES_PER_KEY: i32 = 1_000_000;
/// Longest pool name.
const MAX_POOL_NAME: usize = 200;
/// Longest notification template, in characters.
pub const MAX_TEMPLATE: usize = 100_000;
/// Most redemptions shown on one key.
pub const MAX_REDEMPTIONS_SHOWN: i64 = 100;

/// What a key grants (the `KeyKind` numbers, stored as `smallint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Grants a subscription profile; lives in a pool.
    Subscription = 1,
    /// One seat in a class; single use.
    ClassEnrollment = 2,
    /// The shared key of a class; unlimited uses.
    Event = 3,
}

impl Kind {
    /// The stored number.
    pub fn code(self) -> i16 {
        self as i16
    }

    /// The kind of a stored number (the table's CHECK allows only these).
    pub fn from_code(code: i16) -> Self {
        match code {
            1 => Self::Subscription,
            2 => Self::ClassEnrollment,
            _ => Self::Event,
        }
    }

    /// The name in CSV exports.
    pub fn csv_name(self) -> &'static str {
        match self {
            Self::Subscription => "subscription",
            Self::ClassEnrollment => "class_enrollment",
            Self::Event => "event",
        }
    }

    fn to_pb(self) -> pb::KeyKind {
        match self {
            Self::Subscription => pb::KeyKind::Subscription,
            Self::ClassEnrollment => pb::KeyKind::ClassEnrollment,
            Self::Event => pb::KeyKind::Event,
        }
    }
}

/// A key's state now (the `KeyStatus` numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Redeemable now.
    Active = 1,
    /// All uses taken.
    Redeemed = 2,
    /// Revoked or retired.
    Revoked = 3,
    /// Outside its validity window.
    Expired = 4,
}

impl Status {
    /// The number used in SQL filters and results.
    pub fn code(self) -> i16 {
        self as i16
    }

    /// The status of a number computed by SQL.
    pub fn from_code(code: i16) -> Self {
        match code {
            1 => Self::Active,
            2 => Self::Redeemed,
            3 => Self::Revoked,
            _ => Self::Expired,
        }
    }

    /// The name in CSV exports.
    pub fn csv_name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Redeemed => "redeemed",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
        }
    }

    fn to_pb(self) -> pb::KeyStatus {
        match self {
            Self::Active => pb::KeyStatus::Active,
            Self::Redeemed => pb::KeyStatus::Redeemed,
            Self::Revoked => pb::KeyStatus::Revoked,
            Self::Expired => pb::KeyStatus::Expired,
        }
    }
}

/// A status filter: UNSPECIFIED = none; unknown numbers are rejected.
pub fn status_filter(value: i32) -> Result<Option<Status>, InvalidField> {
    match pb::KeyStatus::try_from(value) {
        Ok(pb::KeyStatus::Unspecified) => Ok(None),
        Ok(pb::KeyStatus::Active) => Ok(Some(Status::Active)),
        Ok(pb::KeyStatus::Redeemed) => Ok(Some(Status::Redeemed)),
        Ok(pb::KeyStatus::Revoked) => Ok(Some(Status::Revoked)),
        Ok(pb::KeyStatus::Expired) => Ok(Some(Status::Expired)),
        Err(_) => Err(InvalidField::new("status", "is not a KeyStatus")),
    }
}

/// A code as typed by a person, checked and normalised; a failed check symbol
/// is [`Error::KeyMistyped`], before any lookup.
pub fn typed_code(field: &'static str, value: &str) -> Result<String, Error> {
    match code::parse_typed(value) {
        Typed::Code(normalized) => Ok(normalized),
        Typed::Mistyped => Err(Error::KeyMistyped),
        Typed::Malformed if value.trim().is_empty() => Err(InvalidField::new(field, "is required").into()),
        Typed::Malformed => Err(InvalidField::new(
            field,
            "is not a training key: 16 symbols like XXXX-XXXX-XXXX-XXXX, or a 4-64 character event code",
        )
        .into()),
    }
}

/// Where new subscription keys go.
#[derive(Debug, Clone)]
pub enum PoolChoice {
    /// An existing pool (its profile must match).
    Existing(Uuid),
    /// A new pool with these settings.
    New {
        /// Name shown to administrators.
        name: String,
        /// Optional start of the window.
        valid_from: Option<DateTime<Utc>>,
        /// Optional end of the window.
        valid_until: Option<DateTime<Utc>>,
        /// Uses of each key.
        uses_per_key: i32,
    },
}

/// GenerateSubscriptionKeys, validated.
#[derive(Debug, Clone)]
pub struct GenerateSubscription {
    /// The profile the keys grant.
    pub profile_id: Uuid,
    /// Keys to generate.
    pub count: i32,
    /// The pool they go into.
    pub pool: PoolChoice,
}

impl TryFrom<pb::GenerateSubscriptionKeysRequest> for GenerateSubscription {
    type Error = InvalidField;
    fn try_from(r: pb::GenerateSubscriptionKeysRequest) -> Result<Self, InvalidField> {
        let profile_id = validate::id("profile_id", &r.profile_id)?;
        if !(1..=MAX_SUBSCRIPTION_KEYS).contains(&r.count) {
            return Err(InvalidField::new(
                "count",
                format!("must be 1-{MAX_SUBSCRIPTION_KEYS}"),
            ));
        }
        let pool = match validate::optional_id("pool_id", &r.pool_id)? {
            Some(pool_id) => {
                // The settings of an existing pool are fixed: say so rather
                // than silently ignore them.
                let only_new = |field: &'static str| {
                    InvalidField::new(field, "applies only to a new pool (pool_id empty)")
                };
                if !r.pool_name.is_empty() {
                    return Err(only_new("pool_name"));
                }
                if r.valid_from.is_some() {
                    return Err(only_new("valid_from"));
                }
                if r.valid_until.is_some() {
                    return Err(only_new("valid_until"));
                }
                if r.uses_per_key != 0 {
                    return Err(only_new("uses_per_key"));
                }
                PoolChoice::Existing(pool_id)
            }
            None => {
                let valid_from = validate::optional_time("valid_from", r.valid_from.as_ref())?;
                let valid_until = validate::optional_time("valid_until", r.valid_until.as_ref())?;
                if let (Some(from), Some(until)) = (valid_from, valid_until)
                    && until <= from
                {
                    return Err(InvalidField::new("valid_until", "must be after valid_from"));
                }
                let uses_per_key = match r.uses_per_key {
                    0 => 1,
                    n @ 1..=MAX_USES_PER_KEY => n,
                    _ => {
                        return Err(InvalidField::new(
                            "uses_per_key",
                            format!("must be 0-{MAX_USES_PER_KEY}"),
                        ));
                    }
                };
                PoolChoice::New {
                    name: validate::text("pool_name", &r.pool_name, MAX_POOL_NAME, false)?,
                    valid_from,
                    valid_until,
                    uses_per_key,
                }
            }
        };
        Ok(Self {
            profile_id,
            count: r.count,
            pool,
        })
    }
}

/// GenerateClassEnrollmentKeys, validated.
#[derive(Debug, Clone, Copy)]
pub struct GenerateClassKeys {
    /// The class.
    pub class_id: Uuid,
    /// Keys to generate.
    pub count: i32,
}

impl TryFrom<pb::GenerateClassEnrollmentKeysRequest> for GenerateClassKeys {
    type Error = InvalidField;
    fn try_from(r: pb::GenerateClassEnrollmentKeysRequest) -> Result<Self, InvalidField> {
        let class_id = validate::id("class_id", &r.class_id)?;
        if !(1..=MAX_CLASS_KEYS_PER_CALL).contains(&r.count) {
            return Err(InvalidField::new(
                "count",
                format!("must be 1-{MAX_CLASS_KEYS_PER_CALL}"),
            ));
        }
        Ok(Self {
            class_id,
            count: r.count,
        })
    }
}

/// A custom event code: as typed (shown) and normalised (looked up).
#[derive(Debug, Clone)]
pub struct CustomCode {
    /// As the administrator typed it.
    pub display: String,
    /// Normalised, for the HMAC.
    pub normalized: String,
}

/// SetEventKey, validated.
#[derive(Debug, Clone)]
pub struct SetEventKey {
    /// The class.
    pub class_id: Uuid,
    /// The custom code, if any; none generates a key.
    pub custom: Option<CustomCode>,
    /// Redeemable until post-class lab access ends.
    pub redeemable_after_class_end: bool,
}

impl TryFrom<pb::SetEventKeyRequest> for SetEventKey {
    type Error = InvalidField;
    fn try_from(r: pb::SetEventKeyRequest) -> Result<Self, InvalidField> {
        let class_id = validate::id("class_id", &r.class_id)?;
        let custom = if r.custom_code.is_empty() {
            None
        } else {
            let normalized = code::custom(&r.custom_code)
                .map_err(|e| InvalidField::new("custom_code", e.message()))?;
            Some(CustomCode {
                display: r.custom_code,
                normalized,
            })
        };
        Ok(Self {
            class_id,
            custom,
            redeemable_after_class_end: r.redeemable_after_class_end,
        })
    }
}

/// Whose keys a list or export covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A class's enrollment and event keys.
    Class(Uuid),
    /// A pool's subscription keys.
    Pool(Uuid),
}

impl Scope {
    /// The scope of a ListKeys / ExportKeys oneof.
    pub fn from_ids(class_id: Option<&str>, pool_id: Option<&str>) -> Result<Self, InvalidField> {
        match (class_id, pool_id) {
            (Some(c), _) => validate::id("class_id", c).map(Self::Class),
            (None, Some(p)) => validate::id("pool_id", p).map(Self::Pool),
            (None, None) => Err(InvalidField::new(
                "class_id",
                "class_id or pool_id is required",
            )),
        }
    }
}

/// A stored key pool.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pool {
    /// Its id.
    pub pool_id: Uuid,
    /// The profile its keys grant.
    pub profile_id: Uuid,
    /// Its name.
    pub name: String,
    /// Optional window start.
    pub valid_from: Option<DateTime<Utc>>,
    /// Optional window end.
    pub valid_until: Option<DateTime<Utc>>,
    /// Uses per key.
    pub uses_per_key: i32,
    /// Keys in the pool.
    pub key_count: i64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

impl From<Pool> for pb::KeyPool {
    fn from(p: Pool) -> Self {
        Self {
            pool_id: p.pool_id.to_string(),
            profile_id: p.profile_id.to_string(),
            name: p.name,
            valid_from: to_timestamp_opt(p.valid_from),
            valid_until: to_timestamp_opt(p.valid_until),
            uses_per_key: p.uses_per_key,
            key_count: p.key_count,
            created_at: Some(to_timestamp(p.created_at)),
        }
    }
}

/// A stored key, with its pool's profile and window when it has a pool.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    /// Its id.
    pub key_id: Uuid,
    /// Stored [`Kind`] number.
    pub kind: i16,
    /// Subscription keys: the pool.
    pub pool_id: Option<Uuid>,
    /// Class keys: the class.
    pub class_id: Option<Uuid>,
    /// Sealed display code.
    pub code_cipher: Vec<u8>,
    /// Encryption key that sealed it.
    pub cipher_key_id: i16,
    /// 0 = unlimited.
    pub max_uses: i32,
    /// Uses taken.
    pub uses: i32,
    /// Event keys: valid until lab access ends.
    pub redeemable_after_class_end: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When revoked or retired.
    pub revoked_at: Option<DateTime<Utc>>,
    /// The pool's profile.
    pub profile_id: Option<Uuid>,
    /// The pool's window start.
    pub pool_valid_from: Option<DateTime<Utc>>,
    /// The pool's window end.
    pub pool_valid_until: Option<DateTime<Utc>>,
}

/// A validity window; `None` bounds are open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    /// Valid from this instant.
    pub from: Option<DateTime<Utc>>,
    /// Valid before this instant.
    pub until: Option<DateTime<Utc>>,
}

impl KeyRow {
    /// What the key grants.
    pub fn kind(&self) -> Kind {
        Kind::from_code(self.kind)
    }

    /// The key's window: the pool's, or from creation through the class's end
    /// (event keys redeemable after the class: through lab access). Without
    /// the class, a class key's end is left open for the caller to check.
    pub fn window(&self, class: Option<&ClassInfo>) -> Window {
        match self.kind() {
            Kind::Subscription => Window {
                from: self.pool_valid_from,
                until: self.pool_valid_until,
            },
            Kind::ClassEnrollment | Kind::Event => Window {
                from: Some(self.created_at),
                until: class.map(|c| class_key_end(c, self.redeemable_after_class_end)),
            },
        }
    }

    /// The status at `now` within `window`.
    pub fn status(&self, window: Window, now: DateTime<Utc>) -> Status {
        if self.revoked_at.is_some() {
            Status::Revoked
        } else if self.max_uses > 0 && self.uses >= self.max_uses {
            Status::Redeemed
        } else if trainingkeys_shared::window::not_yet_open(now, window.from)
            || trainingkeys_shared::window::ended(now, window.until)
        {
            Status::Expired
        } else {
            Status::Active
        }
    }

    /// The wire form, with its decrypted `code` and recent `uses`.
    pub fn to_pb(
        &self,
        code: String,
        class: Option<&ClassInfo>,
        uses: Vec<KeyUse>,
        now: DateTime<Utc>,
    ) -> pb::Key {
        let window = self.window(class);
        pb::Key {
            key_id: self.key_id.to_string(),
            code,
            kind: self.kind().to_pb().into(),
            class_id: self.class_id.map(|c| c.to_string()).unwrap_or_default(),
            pool_id: self.pool_id.map(|p| p.to_string()).unwrap_or_default(),
            profile_id: self.profile_id.map(|p| p.to_string()).unwrap_or_default(),
            status: self.status(window, now).to_pb().into(),
            valid_from: to_timestamp_opt(window.from),
            valid_until: to_timestamp_opt(window.until),
            max_uses: self.max_uses,
            uses: self.uses,
            redemptions: uses.into_iter().map(Into::into).collect(),
            redeemable_after_class_end: self.redeemable_after_class_end,
            created_at: Some(to_timestamp(self.created_at)),
            revoked_at: to_timestamp_opt(self.revoked_at),
        }
    }
}

/// The end of a class key's window from the class's current dates.
pub fn class_key_end(class: &ClassInfo, redeemable_after_class_end: bool) -> DateTime<Utc> {
    if redeemable_after_class_end {
        class.lab_access_end_time
    } else {
        class.end_time
    }
}

/// One use of a key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyUse {
    /// The key.
    pub key_id: Uuid,
    /// Who used it.
    pub user_id: Uuid,
    /// Through which redemption.
    pub redemption_id: Uuid,
    /// When.
    pub used_at: DateTime<Utc>,
}

impl From<KeyUse> for pb::KeyRedemption {
    fn from(u: KeyUse) -> Self {
        Self {
            user_id: u.user_id.to_string(),
            redemption_id: u.redemption_id.to_string(),
            redeemed_at: Some(to_timestamp(u.used_at)),
        }
    }
}

/// A class as key issuance needs it.
#[derive(Debug, Clone)]
pub struct ClassInfo {
    /// The class.
    pub class_id: Uuid,
    /// The organization it belongs to (and so do its keys).
    pub organization_id: String,
    /// The users (ids) who teach it.
    pub instructor_ids: Vec<String>,
    /// Title, for notifications.
    pub title: String,
    /// Start, for notifications.
    pub start_time: DateTime<Utc>,
    /// End: class keys and default event keys are valid until then.
    pub end_time: DateTime<Utc>,
    /// End of post-class lab access: event keys redeemable after the class
    /// end are valid until then.
    pub lab_access_end_time: DateTime<Utc>,
    /// Cap on unrevoked class enrollment keys.
    pub max_students: i32,
}

/// A key ready to be inserted: id, lookup HMAC and sealed code.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Its id.
    pub key_id: Uuid,
    /// HMAC of the normalised code under the current secret.
    pub code_hmac: [u8; HMAC_LEN],
    /// Sealed display code.
    pub code_cipher: Vec<u8>,
}

/// ConsumeKey / ReleaseKey, validated.
#[derive(Debug, Clone, Copy)]
pub struct UseOfKey {
    /// The key.
    pub key_id: Uuid,
    /// The user (ConsumeKey only; nil for ReleaseKey).
    pub user_id: Uuid,
    /// The redemption.
    pub redemption_id: Uuid,
    /// The redemption driver's fencing token (0: none).
    pub generation: i64,
}

impl TryFrom<pb::ConsumeKeyRequest> for UseOfKey {
    type Error = InvalidField;
    fn try_from(r: pb::ConsumeKeyRequest) -> Result<Self, InvalidField> {
        Ok(Self {
            key_id: validate::id("key_id", &r.key_id)?,
            user_id: validate::id("user_id", &r.user_id)?,
            redemption_id: validate::id("redemption_id", &r.redemption_id)?,
            generation: generation(r.generation)?,
        })
    }
}

impl TryFrom<pb::ReleaseKeyRequest> for UseOfKey {
    type Error = InvalidField;
    fn try_from(r: pb::ReleaseKeyRequest) -> Result<Self, InvalidField> {
        Ok(Self {
            key_id: validate::id("key_id", &r.key_id)?,
            user_id: Uuid::nil(),
            redemption_id: validate::id("redemption_id", &r.redemption_id)?,
            generation: generation(r.generation)?,
        })
    }
}

fn generation(g: i64) -> Result<i64, InvalidField> {
    if g < 0 {
        return Err(InvalidField::new("generation", "must not be negative"));
    }
    Ok(g)
}

/// What ConsumeKey did.
#[derive(Debug, Clone, Copy)]
pub struct Consumed {
    /// Uses after the call.
    pub uses: i32,
    /// The key's maximum.
    pub max_uses: i32,
    /// True when this redemption had already used the key.
    pub already_consumed: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::Duration;

    use super::*;

    proptest::proptest! {
        /// Key-issuance requests of any content convert or name their field.
        #[test]
        fn any_request_converts_or_names_its_field(
            id in ".{0,50}", custom in ".{0,80}", count in proptest::num::i32::ANY,
            generation in proptest::num::i64::ANY, typed in ".{0,100}",
        ) {
            let field = |e: &InvalidField| e.field;
            let g = GenerateSubscription::try_from(pb::GenerateSubscriptionKeysRequest {
                profile_id: id.clone(), count, pool_id: id.clone(), ..Default::default()
            });
            if let Err(e) = g { proptest::prop_assert!(["profile_id", "count", "pool_id", "pool_name", "valid_from", "valid_until", "max_uses"].contains(&field(&e)), "{e:?}"); }
            let c = GenerateClassKeys::try_from(pb::GenerateClassEnrollmentKeysRequest { class_id: id.clone(), count });
            if let Err(e) = c { proptest::prop_assert!(["class_id", "count"].contains(&field(&e)), "{e:?}"); }
            let s = SetEventKey::try_from(pb::SetEventKeyRequest { class_id: id.clone(), custom_code: custom, ..Default::default() });
            if let Err(e) = s { proptest::prop_assert!(["class_id", "custom_code"].contains(&field(&e)), "{e:?}"); }
            let u = UseOfKey::try_from(pb::ConsumeKeyRequest { key_id: id.clone(), user_id: id.clone(), redemption_id: id, generation });
            if let Err(e) = u { proptest::prop_assert!(["key_id", "user_id", "redemption_id", "generation"].contains(&field(&e)), "{e:?}"); }
            let _ = typed_code("code", &typed);
        }
    }

    fn row(kind: Kind) -> KeyRow {
        KeyRow {
            key_id: Uuid::now_v7(),
            kind: kind.code(),
            pool_id: None,
            class_id: None,
            code_cipher: Vec::new(),
            cipher_key_id: 1,
            max_uses: 1,
            uses: 0,
            redeemable_after_class_end: false,
            created_at: Utc::now() - Duration::hours(1),
            revoked_at: None,
            profile_id: None,
            pool_valid_from: None,
            pool_valid_until: None,
        }
    }

    #[test]
    fn status_precedence() {
        let now = Utc::now();
        let mut k = row(Kind::Subscription);
        assert_eq!(k.status(k.window(None), now), Status::Active);
        k.pool_valid_until = Some(now - Duration::seconds(1));
        assert_eq!(k.status(k.window(None), now), Status::Expired);
        k.uses = 1;
        assert_eq!(k.status(k.window(None), now), Status::Redeemed);
        k.revoked_at = Some(now);
        assert_eq!(k.status(k.window(None), now), Status::Revoked);
    }

    #[test]
    fn event_windows_follow_the_class() {
        let now = Utc::now();
        let class = ClassInfo {
            class_id: Uuid::now_v7(),
            organization_id: "org".into(),
            instructor_ids: Vec::new(),
            title: "t".into(),
            start_time: now - Duration::days(3),
            end_time: now - Duration::days(1),
            lab_access_end_time: now + Duration::days(6),
            max_students: 3,
        };
        let mut k = row(Kind::Event);
        k.max_uses = 0;
        k.uses = 10;
        assert_eq!(k.status(k.window(Some(&class)), now), Status::Expired);
        k.redeemable_after_class_end = true;
        assert_eq!(k.status(k.window(Some(&class)), now), Status::Active);
    }

    #[test]
    fn existing_pools_take_no_settings() {
        let r = pb::GenerateSubscriptionKeysRequest {
            profile_id: Uuid::now_v7().to_string(),
            count: 1,
            pool_id: Uuid::now_v7().to_string(),
            pool_name: "x".into(),
            ..Default::default()
        };
        assert_eq!(
            GenerateSubscription::try_from(r).unwrap_err().field,
            "pool_name"
        );
    }
}
