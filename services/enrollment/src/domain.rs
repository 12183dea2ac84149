//! The enrollment domain: validated commands (built from requests, so every
//! rule on input lives here) and the records the store returns, with their
//! conversion back to the wire types.

use chrono::{DateTime, Duration, Utc};
use trainingkeys_proto::time::{to_timestamp, to_timestamp_opt};
use trainingkeys_proto::v1 as pb;
use trainingkeys_shared::InvalidField;
use trainingkeys_shared::validate;
use uuid::Uuid;

/// Longest title or name.
const MAX_TEXT: usize = 200;
/// Longest course id.
const MAX_COURSE_ID: usize = 128;
/// Most lab access days (about 10 years): keeps date arithmetic in range.
const MAX_LAB_ACCESS_DAYS: i32 = 3650;
/// Most subscription days (about 10 years).
const MAX_DURATION_DAYS: i32 = 3650;
/// Most seats in one class.
const MAX_STUDENTS: i32 = 1_000_000;
/// Most courses in one profile.
const MAX_COURSES: usize = 1000;

/// RegisterUser, validated.
#[derive(Debug)]
pub struct NewUser {
    /// The id to give the user if created (the server picks when `None`).
    pub user_id: Option<Uuid>,
    /// The redemption registering the user, if any.
    pub redemption_id: Option<Uuid>,
    pub organization_id: String,
    pub email: String,
    pub display_name: String,
}

impl TryFrom<pb::RegisterUserRequest> for NewUser {
    type Error = InvalidField;
    fn try_from(r: pb::RegisterUserRequest) -> Result<Self, InvalidField> {
        Ok(Self {
            user_id: validate::optional_id("user_id", &r.user_id)?,
            redemption_id: validate::optional_id("redemption_id", &r.redemption_id)?,
            organization_id: validate::organization_id("organization_id", &r.organization_id)?,
            email: validate::email("email", &r.email)?,
            display_name: validate::text("display_name", &r.display_name, MAX_TEXT, false)?,
        })
    }
}

/// A stored user.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub user_id: Uuid,
    pub organization_id: String,
    pub email: String,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
}

impl From<User> for pb::User {
    fn from(u: User) -> Self {
        Self {
            user_id: u.user_id.to_string(),
            organization_id: u.organization_id,
            email: u.email,
            display_name: u.display_name,
            created_at: Some(to_timestamp(u.created_at)),
        }
    }
}

/// CreateClass, validated.
#[derive(Debug)]
pub struct NewClass {
    pub organization_id: String,
    pub title: String,
    pub course_id: String,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    pub max_students: i32,
    pub lab_access_days: i32,
    pub instructor_ids: Vec<Uuid>,
}

/// Most instructors a class may list.
const MAX_INSTRUCTORS: usize = 50;

/// A list of instructor ids: UUIDs, at most 50, no repeats.
fn instructors(field: &'static str, ids: &[String]) -> Result<Vec<Uuid>, InvalidField> {
    if ids.len() > MAX_INSTRUCTORS {
        return Err(InvalidField::new(
            field,
            format!("at most {MAX_INSTRUCTORS} instructors"),
        ));
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let id = validate::id(field, id)?;
        if out.contains(&id) {
            return Err(InvalidField::new(field, "lists a user twice"));
        }
        out.push(id);
    }
    Ok(out)
}

impl TryFrom<pb::CreateClassRequest> for NewClass {
    type Error = InvalidField;
    fn try_from(r: pb::CreateClassRequest) -> Result<Self, InvalidField> {
        let class = Self {
            organization_id: validate::organization_id("organization_id", &r.organization_id)?,
            title: validate::text("title", &r.title, MAX_TEXT, true)?,
            course_id: validate::text("course_id", &r.course_id, MAX_COURSE_ID, true)?,
            start_time: validate::time("start_time", r.start_time.as_ref())?,
            end_time: validate::time("end_time", r.end_time.as_ref())?,
            max_students: max_students(r.max_students)?,
            lab_access_days: lab_access_days(r.lab_access_days)?,
            instructor_ids: instructors("instructor_ids", &r.instructor_ids)?,
        };
        schedule(class.start_time, class.end_time)?;
        Ok(class)
    }
}

fn max_students(n: i32) -> Result<i32, InvalidField> {
    if (1..=MAX_STUDENTS).contains(&n) {
        Ok(n)
    } else {
        Err(InvalidField::new(
            "max_students",
            format!("must be 1-{MAX_STUDENTS}"),
        ))
    }
}

fn lab_access_days(n: i32) -> Result<i32, InvalidField> {
    if (0..=MAX_LAB_ACCESS_DAYS).contains(&n) {
        Ok(n)
    } else {
        Err(InvalidField::new(
            "lab_access_days",
            format!("must be 0-{MAX_LAB_ACCESS_DAYS}"),
        ))
    }
}

/// The latest class end: with the longest lab access after it, the lab
/// access end still fits a `google.protobuf.Timestamp` (year 9999).
fn latest_end() -> DateTime<Utc> {
    DateTime::<Utc>::MAX_UTC
        .min(DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC))
        - Duration::days(i64::from(MAX_LAB_ACCESS_DAYS))
}

/// The end must come after the start, and early enough that the lab access
/// end can be computed and sent.
pub fn schedule(start: DateTime<Utc>, end: DateTime<Utc>) -> Result<(), InvalidField> {
    if end <= start {
        return Err(InvalidField::new("end_time", "must be after start_time"));
    }
    if end > latest_end() {
        return Err(InvalidField::new(
            "end_time",
            format!("must be at most {}", latest_end().to_rfc3339()),
        ));
    }
    Ok(())
}

/// UpdateClass, validated field by field; the schedule is checked against the
/// stored class by [`ClassChange::apply`].
#[derive(Debug)]
pub struct ClassChange {
    pub class_id: Uuid,
    pub title: Option<String>,
    pub course_id: Option<String>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub max_students: Option<i32>,
    pub lab_access_days: Option<i32>,
    pub instructor_ids: Option<Vec<Uuid>>,
}

impl TryFrom<pb::UpdateClassRequest> for ClassChange {
    type Error = InvalidField;
    fn try_from(r: pb::UpdateClassRequest) -> Result<Self, InvalidField> {
        Ok(Self {
            class_id: validate::id("class_id", &r.class_id)?,
            title: r
                .title
                .map(|t| validate::text("title", &t, MAX_TEXT, true))
                .transpose()?,
            course_id: r
                .course_id
                .map(|c| validate::text("course_id", &c, MAX_COURSE_ID, true))
                .transpose()?,
            start_time: validate::optional_time("start_time", r.start_time.as_ref())?,
            end_time: validate::optional_time("end_time", r.end_time.as_ref())?,
            max_students: r.max_students.map(max_students).transpose()?,
            lab_access_days: r.lab_access_days.map(lab_access_days).transpose()?,
            instructor_ids: r
                .instructors
                .map(|i| instructors("instructors.user_ids", &i.user_ids))
                .transpose()?,
        })
    }
}

impl ClassChange {
    /// The class after this change, or why the change is not allowed.
    pub fn apply(self, mut class: Class) -> Result<Class, crate::error::Error> {
        if let Some(t) = self.title {
            class.title = t;
        }
        if let Some(c) = self.course_id {
            class.course_id = c;
        }
        class.start_time = self.start_time.unwrap_or(class.start_time);
        class.end_time = self.end_time.unwrap_or(class.end_time);
        schedule(class.start_time, class.end_time)?;
        if let Some(d) = self.lab_access_days {
            class.lab_access_days = d;
        }
        if let Some(ids) = self.instructor_ids {
            class.instructor_ids = ids;
        }
        if let Some(max) = self.max_students {
            if max < class.enrolled_count {
                return Err(crate::error::Error::MaxBelowEnrolled {
                    enrolled: class.enrolled_count,
                    requested: max,
                });
            }
            class.max_students = max;
        }
        Ok(class)
    }
}

/// A stored class with its seat count.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Class {
    pub class_id: Uuid,
    pub organization_id: String,
    pub title: String,
    pub course_id: String,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    pub max_students: i32,
    pub lab_access_days: i32,
    pub enrolled_count: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub instructor_ids: Vec<Uuid>,
}

impl Class {
    /// Whether `subject` (a token's `sub`) teaches this class.
    pub fn taught_by(&self, subject: Option<&str>) -> bool {
        subject
            .and_then(|s| Uuid::parse_str(s).ok())
            .is_some_and(|id| self.instructor_ids.contains(&id))
    }
}

impl From<Class> for pb::Class {
    fn from(c: Class) -> Self {
        // Saturating: a stored end is never that late (see `schedule`), but a
        // conversion must not panic whatever the row holds.
        let lab_access_end = c
            .end_time
            .checked_add_signed(Duration::days(i64::from(c.lab_access_days)))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        Self {
            class_id: c.class_id.to_string(),
            organization_id: c.organization_id,
            title: c.title,
            course_id: c.course_id,
            start_time: Some(to_timestamp(c.start_time)),
            end_time: Some(to_timestamp(c.end_time)),
            max_students: c.max_students,
            lab_access_days: c.lab_access_days,
            enrolled_count: c.enrolled_count,
            seats_left: (c.max_students - c.enrolled_count).max(0),
            lab_access_end_time: Some(to_timestamp(lab_access_end)),
            created_at: Some(to_timestamp(c.created_at)),
            updated_at: Some(to_timestamp(c.updated_at)),
            instructor_ids: c.instructor_ids.iter().map(Uuid::to_string).collect(),
        }
    }
}

/// CreateSubscriptionProfile, validated.
#[derive(Debug)]
pub struct NewProfile {
    pub organization_id: String,
    pub name: String,
    pub course_ids: Vec<String>,
    pub duration_days: i32,
}

impl TryFrom<pb::CreateSubscriptionProfileRequest> for NewProfile {
    type Error = InvalidField;
    fn try_from(r: pb::CreateSubscriptionProfileRequest) -> Result<Self, InvalidField> {
        let mut course_ids = Vec::with_capacity(r.course_ids.len());
        for c in &r.course_ids {
            let c = validate::text("course_ids", c, MAX_COURSE_ID, true)?;
            if !course_ids.contains(&c) {
                course_ids.push(c);
            }
        }
        if course_ids.is_empty() || course_ids.len() > MAX_COURSES {
            return Err(InvalidField::new(
                "course_ids",
                format!("must hold 1-{MAX_COURSES} course ids"),
            ));
        }
        if !(1..=MAX_DURATION_DAYS).contains(&r.duration_days) {
            return Err(InvalidField::new(
                "duration_days",
                format!("must be 1-{MAX_DURATION_DAYS}"),
            ));
        }
        Ok(Self {
            organization_id: validate::organization_id("organization_id", &r.organization_id)?,
            name: validate::text("name", &r.name, MAX_TEXT, true)?,
            course_ids,
            duration_days: r.duration_days,
        })
    }
}

/// A stored subscription profile.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Profile {
    pub profile_id: Uuid,
    pub organization_id: String,
    pub name: String,
    pub course_ids: Vec<String>,
    pub duration_days: i32,
    pub created_at: DateTime<Utc>,
}

impl From<Profile> for pb::SubscriptionProfile {
    fn from(p: Profile) -> Self {
        Self {
            profile_id: p.profile_id.to_string(),
            organization_id: p.organization_id,
            name: p.name,
            course_ids: p.course_ids,
            duration_days: p.duration_days,
            created_at: Some(to_timestamp(p.created_at)),
        }
    }
}

/// A stored enrollment (active or cancelled).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Enrollment {
    pub enrollment_id: Uuid,
    pub class_id: Uuid,
    pub user_id: Uuid,
    pub source_key_id: Option<Uuid>,
    pub enrolled_at: DateTime<Utc>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub redemption_id: Option<Uuid>,
}

impl From<Enrollment> for pb::Enrollment {
    fn from(e: Enrollment) -> Self {
        let status = if e.cancelled_at.is_some() {
            pb::EnrollmentStatus::Cancelled
        } else {
            pb::EnrollmentStatus::Active
        };
        Self {
            enrollment_id: e.enrollment_id.to_string(),
            class_id: e.class_id.to_string(),
            user_id: e.user_id.to_string(),
            source_key_id: e.source_key_id.map(|k| k.to_string()).unwrap_or_default(),
            enrolled_at: Some(to_timestamp(e.enrolled_at)),
            status: status.into(),
            cancelled_at: to_timestamp_opt(e.cancelled_at),
            redemption_id: e.redemption_id.map(|r| r.to_string()).unwrap_or_default(),
        }
    }
}

/// A stored subscription.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Subscription {
    pub subscription_id: Uuid,
    pub profile_id: Uuid,
    pub user_id: Uuid,
    pub source_key_id: Option<Uuid>,
    pub starts_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub course_ids: Vec<String>,
    pub redemption_id: Option<Uuid>,
}

impl From<Subscription> for pb::Subscription {
    fn from(s: Subscription) -> Self {
        Self {
            subscription_id: s.subscription_id.to_string(),
            profile_id: s.profile_id.to_string(),
            user_id: s.user_id.to_string(),
            source_key_id: s.source_key_id.map(|k| k.to_string()).unwrap_or_default(),
            starts_at: Some(to_timestamp(s.starts_at)),
            expires_at: Some(to_timestamp(s.expires_at)),
            course_ids: s.course_ids,
            active: Utc::now() < s.expires_at,
            redemption_id: s.redemption_id.map(|r| r.to_string()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Enrollment's requests of any content convert or name their
        /// field, never panic, and what converts is within its limits.
        #[test]
        fn any_request_converts_or_names_its_field(
            org in ".{0,140}", text in "\\PC{0,250}|.{0,60}", max in proptest::num::i32::ANY,
            days in proptest::num::i32::ANY, s in proptest::num::i64::ANY, n in proptest::num::i32::ANY,
        ) {
            let ts = Some(trainingkeys_proto::prost_types::Timestamp { seconds: s, nanos: n });
            let class = NewClass::try_from(pb::CreateClassRequest {
                organization_id: org.clone(), title: text.clone(), course_id: text.clone(),
                start_time: ts, end_time: ts, max_students: max, lab_access_days: days,
                instructor_ids: vec![text.clone()],
            });
            match class {
                Ok(c) => proptest::prop_assert!(c.max_students > 0 && c.end_time > c.start_time),
                Err(e) => proptest::prop_assert!(
                    ["organization_id", "title", "course_id", "start_time", "end_time",
                     "max_students", "lab_access_days", "instructor_ids"].contains(&e.field), "{e:?}"),
            }
            let user = NewUser::try_from(pb::RegisterUserRequest {
                organization_id: org.clone(), email: text.clone(), display_name: text.clone(), ..Default::default()
            });
            if let Err(e) = user {
                proptest::prop_assert!(["organization_id", "email", "display_name", "user_id", "redemption_id"].contains(&e.field), "{e:?}");
            }
            let profile = NewProfile::try_from(pb::CreateSubscriptionProfileRequest {
                organization_id: org, name: text.clone(), course_ids: vec![text], duration_days: days,
            });
            if let Err(e) = profile {
                proptest::prop_assert!(["organization_id", "name", "course_ids", "duration_days"].contains(&e.field), "{e:?}");
            }
        }
    }
}
