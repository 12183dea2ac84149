//! Everything that can go wrong in a redemption, and the one place where each
//! failure becomes a gRPC status with a reason.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use trainingkeys_proto::ERROR_DOMAIN;
use trainingkeys_shared::InvalidField;
use trainingkeys_shared::error::{self as statuses, status};

/// The redemption service's failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidField(#[from] InvalidField),
    #[error("the code is mistyped: its check symbol does not match")]
    KeyMistyped,
    #[error("no such key")]
    KeyNotFound,
    #[error("the key has been revoked")]
    KeyRevoked,
    #[error("the key is not valid yet")]
    KeyNotYetValid,
    #[error("the key has expired")]
    KeyExpired,
    #[error("the key has already been redeemed")]
    KeyAlreadyRedeemed,
    /// This redemption's use of the key was given back (it decided the
    /// student already held the grant, or failed): it cannot use it again.
    #[error(
        "this redemption gave its use of the key back; redeem again with a new idempotency key"
    )]
    KeyUseReleased,
    /// Another driver took this redemption over: this one must stop writing.
    #[error("another driver took this redemption over")]
    LeaseLost,
    #[error("the class is full")]
    ClassFull,
    #[error("too many failed attempts; retry in {} s", .retry_after.as_secs().max(1))]
    TooManyAttempts { retry_after: Duration },
    #[error("this idempotency key was used for a different request")]
    IdempotencyKeyReused,
    #[error("a redemption with this idempotency key is still in progress; retry shortly")]
    InProgress,
    #[error("user not found")]
    UserNotFound,
    /// A student's token redeems and validates only for its own subject.
    #[error("a student may redeem and validate only as themselves (user_id = the token's subject)")]
    OwnSubjectOnly,
    #[error("the user belongs to another organization than the key's class or profile")]
    OrganizationMismatch,
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
    #[error("{service} failed: {message}")]
    Upstream {
        service: &'static str,
        message: String,
    },
    #[error("database error: {0}")]
    Database(String),
    #[error("{0}")]
    Internal(String),
    /// A final failure recorded earlier, replayed for the same idempotency key.
    #[error("{message}")]
    Replayed {
        code: i32,
        reason: String,
        message: String,
    },
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if trainingkeys_shared::error::is_connection_error(&e) {
            Error::Unavailable("database")
        } else {
            Error::Database(trainingkeys_shared::error::ErrorChain(&e).to_string())
        }
    }
}

impl Error {
    /// The gRPC code and ErrorInfo reason of this failure.
    pub fn code_and_reason(&self) -> (Code, &str) {
        match self {
            Error::InvalidField(_) => (Code::InvalidArgument, statuses::INVALID_FIELD),
            Error::KeyMistyped => (Code::InvalidArgument, "KEY_MISTYPED"),
            Error::KeyNotFound => (Code::NotFound, "KEY_NOT_FOUND"),
            Error::KeyRevoked => (Code::FailedPrecondition, "KEY_REVOKED"),
            Error::KeyNotYetValid => (Code::FailedPrecondition, "KEY_NOT_YET_VALID"),
            Error::KeyExpired => (Code::FailedPrecondition, "KEY_EXPIRED"),
            Error::KeyAlreadyRedeemed => (Code::FailedPrecondition, "KEY_ALREADY_REDEEMED"),
            Error::KeyUseReleased => (Code::FailedPrecondition, "KEY_USE_RELEASED"),
            Error::LeaseLost => (Code::Aborted, "REDEMPTION_IN_PROGRESS"),
            Error::ClassFull => (Code::ResourceExhausted, "CLASS_FULL"),
            Error::TooManyAttempts { .. } => (Code::ResourceExhausted, "TOO_MANY_ATTEMPTS"),
            Error::IdempotencyKeyReused => (Code::InvalidArgument, "IDEMPOTENCY_KEY_REUSED"),
            Error::InProgress => (Code::Aborted, "REDEMPTION_IN_PROGRESS"),
            Error::UserNotFound => (Code::NotFound, "USER_NOT_FOUND"),
            Error::OwnSubjectOnly => (Code::PermissionDenied, "OWN_SUBJECT_ONLY"),
            Error::OrganizationMismatch => (Code::FailedPrecondition, "ORGANIZATION_MISMATCH"),
            Error::Unavailable(_) => (Code::Unavailable, statuses::UNAVAILABLE),
            Error::Upstream { .. } | Error::Database(_) | Error::Internal(_) => {
                (Code::Internal, statuses::INTERNAL)
            }
            Error::Replayed { code, reason, .. } => (Code::from_i32(*code), reason.as_str()),
        }
    }

    /// The reason string ValidateKey reports for a key that cannot be redeemed.
    pub fn reason(&self) -> &str {
        self.code_and_reason().1
    }

    /// True for a final answer about the request (worth recording for
    /// replays); false for an outage or a bug, where a retry may succeed.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Error::Unavailable(_)
                | Error::Upstream { .. }
                | Error::Database(_)
                | Error::Internal(_)
                | Error::InProgress
                | Error::LeaseLost
                | Error::TooManyAttempts { .. }
        )
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let (code, reason) = e.code_and_reason();
        let reason = reason.to_owned();
        match e {
            Error::InvalidField(f) => f.into(),
            Error::TooManyAttempts { retry_after } => {
                let mut details = ErrorDetails::with_error_info(
                    reason,
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                );
                details.set_retry_info(Some(retry_after));
                Status::with_error_details(code, e.to_string(), details)
            }
            Error::Upstream { .. } | Error::Database(_) | Error::Internal(_) => {
                tracing::error!(error = %e, "internal error");
                status(code, &reason, "internal error")
            }
            Error::Unavailable(what) => {
                tracing::warn!("{what} unavailable");
                status(code, &reason, e.to_string())
            }
            Error::KeyMistyped
            | Error::KeyNotFound
            | Error::KeyRevoked
            | Error::KeyNotYetValid
            | Error::KeyExpired
            | Error::KeyAlreadyRedeemed
            | Error::KeyUseReleased
            | Error::LeaseLost
            | Error::ClassFull
            | Error::IdempotencyKeyReused
            | Error::InProgress
            | Error::UserNotFound
            | Error::OwnSubjectOnly
            | Error::OrganizationMismatch
            | Error::Replayed { .. } => status(code, &reason, e.to_string()),
        }
    }
}
