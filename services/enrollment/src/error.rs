//! Everything that can go wrong in the enrollment service, and the one place
//! where each failure becomes a gRPC status with a reason.

use tonic::{Code, Status};
use trainingkeys_shared::InvalidField;
use trainingkeys_shared::error::{database, status, status_with_id};
use uuid::Uuid;

/// The enrollment service's failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidField(#[from] InvalidField),
    #[error("user {0} not found")]
    UserNotFound(Uuid),
    #[error("no user with that email in that organization")]
    UserNotFoundByEmail,
    #[error("class {0} not found")]
    ClassNotFound(Uuid),
    #[error("subscription profile {0} not found")]
    ProfileNotFound(Uuid),
    #[error("enrollment {0} not found")]
    EnrollmentNotFound(Uuid),
    /// The user is of another organization than the class or profile
    /// (the message names neither: organization ids are not for every caller).
    #[error("the user belongs to another organization than the class or profile")]
    OrganizationMismatch {
        user_org: String,
        target_org: String,
    },
    /// A field only the redemption service may set (a redemption's id, the
    /// key it used, the id to give a new account).
    #[error("{0} is set only by the redemption service")]
    InternalField(&'static str),
    /// The caller's token does not name the organization it asked to write in.
    #[error("the caller may not act in this organization")]
    OrganizationNotAllowed,
    #[error("class {0} is full")]
    ClassFull(Uuid),
    /// The redemption failed and was voided: nothing may be granted for it.
    #[error("the redemption was voided: nothing can be granted for it")]
    RedemptionVoided(Uuid),
    #[error("cannot lower the maximum to {requested}: {enrolled} students are enrolled")]
    MaxBelowEnrolled { enrolled: i32, requested: i32 },
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

fn not_found(reason: &str, field: &str, id: Uuid, message: String) -> Status {
    status_with_id(Code::NotFound, reason, field, id, message)
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::InvalidField(f) => f.into(),
            Error::UserNotFound(id) => not_found("USER_NOT_FOUND", "user_id", id, message),
            Error::UserNotFoundByEmail => status(Code::NotFound, "USER_NOT_FOUND", message),
            Error::ClassNotFound(id) => not_found("CLASS_NOT_FOUND", "class_id", id, message),
            Error::ProfileNotFound(id) => not_found("PROFILE_NOT_FOUND", "profile_id", id, message),
            Error::EnrollmentNotFound(id) => {
                not_found("ENROLLMENT_NOT_FOUND", "enrollment_id", id, message)
            }
            Error::OrganizationMismatch { .. } => {
                status(Code::FailedPrecondition, "ORGANIZATION_MISMATCH", message)
            }
            Error::InternalField(field) => trainingkeys_shared::error::status_with(
                Code::PermissionDenied,
                "INTERNAL_FIELD",
                message,
                std::collections::HashMap::from([("field".to_owned(), field.to_owned())]),
            ),
            Error::OrganizationNotAllowed => {
                status(Code::PermissionDenied, "ORGANIZATION_NOT_ALLOWED", message)
            }
            Error::ClassFull(id) => status_with_id(
                Code::ResourceExhausted,
                "CLASS_FULL",
                "class_id",
                id,
                message,
            ),
            Error::RedemptionVoided(_) => {
                status(Code::FailedPrecondition, "REDEMPTION_VOIDED", message)
            }
            Error::MaxBelowEnrolled { .. } => {
                status(Code::FailedPrecondition, "MAX_BELOW_ENROLLED", message)
            }
            Error::Database(e) => database(&e),
        }
    }
}
