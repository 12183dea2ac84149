//! Everything that can go wrong in the key issuance service, and the one
//! place where each failure becomes a gRPC status with a reason. Messages
//! never contain a code: a typed code is a secret.

use std::collections::HashMap;

use tonic::{Code, Status};
use trainingkeys_shared::InvalidField;
use trainingkeys_shared::error::{database, internal, status, status_with, status_with_id};
use uuid::Uuid;

use crate::secrets::DecryptError;

/// The key issuance service's failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed.
    #[error(transparent)]
    InvalidField(#[from] InvalidField),
    /// A key-shaped code whose check symbol fails: a typing mistake.
    #[error("the code is mistyped: its check symbol does not match")]
    KeyMistyped,
    /// No key with this id.
    #[error("key {0} not found")]
    KeyNotFound(Uuid),
    /// No key with this code.
    #[error("no key has this code")]
    CodeNotFound,
    /// Enrollment does not know the class.
    #[error("class {0} not found")]
    ClassNotFound(Uuid),
    /// Enrollment does not know the profile.
    #[error("subscription profile {0} not found")]
    ProfileNotFound(Uuid),
    /// No such key pool.
    #[error("key pool {0} not found")]
    PoolNotFound(Uuid),
    /// The existing pool grants another profile.
    #[error("key pool {pool_id} grants profile {pool_profile}, not {requested}")]
    PoolProfileMismatch {
        /// The pool.
        pool_id: Uuid,
        /// The profile the pool grants.
        pool_profile: Uuid,
        /// The profile the request named.
        requested: Uuid,
    },
    /// More unrevoked class enrollment keys than the class's maximum students.
    #[error(
        "class {class_id} allows {max_students} students and has {existing} unrevoked keys: cannot add {requested}"
    )]
    KeyLimitReached {
        /// The class.
        class_id: Uuid,
        /// Its maximum students.
        max_students: i32,
        /// Its unrevoked class enrollment keys.
        existing: i64,
        /// Keys asked for.
        requested: i32,
    },
    /// A custom code is already the code of an active key.
    #[error("the code is already in use by another key")]
    CodeTaken,
    /// Too many custom codes found taken by this caller lately.
    #[error(
        "too many codes probed (custom codes found taken, look-ups by code that found nothing); try again within the hour"
    )]
    TooManyTakenCodes,
    /// A template names a placeholder this service does not fill.
    #[error("unknown placeholder {{{{{0}}}}}")]
    UnknownPlaceholder(String),
    /// The template uses the event key, and the class has none.
    #[error("class {0} has no event key")]
    NoEventKey(Uuid),
    /// All the key's uses are taken.
    #[error("key {0} is already redeemed")]
    KeyAlreadyRedeemed(Uuid),
    /// The key is revoked or retired.
    #[error("key {0} is revoked")]
    KeyRevoked(Uuid),
    /// This redemption's use of the key was given back: it cannot use it again.
    #[error("this redemption's use of key {0} was released")]
    UseReleased(Uuid),
    /// A redemption driver that lost its lease (a later one has written).
    #[error("generation {sent} is older than {seen}: this redemption has a newer driver")]
    StaleGeneration { seen: i64, sent: i64 },
    /// The enrollment service cannot be reached.
    #[error("enrollment service unavailable")]
    EnrollmentUnavailable(#[source] tonic::Status),
    /// The enrollment service answered something unexpected.
    #[error("unexpected answer from the enrollment service")]
    Enrollment(#[source] tonic::Status),
    /// A stored code does not decrypt (wrong or missing key configuration).
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
    /// The OS random source failed.
    #[error("the OS random source failed")]
    Entropy(#[from] rand::rngs::SysError),
    /// Writing CSV into memory failed (a bug, never the client's fault).
    #[error("CSV writer failed")]
    Csv(#[from] csv::Error),
    /// A background task died.
    #[error("a worker task failed")]
    Task(#[from] tokio::task::JoinError),
    /// A database failure.
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::InvalidField(f) => f.into(),
            Error::KeyMistyped => status(Code::InvalidArgument, "KEY_MISTYPED", message),
            Error::KeyNotFound(id) => {
                status_with_id(Code::NotFound, "KEY_NOT_FOUND", "key_id", id, message)
            }
            Error::CodeNotFound => status(Code::NotFound, "KEY_NOT_FOUND", message),
            Error::ClassNotFound(id) => {
                status_with_id(Code::NotFound, "CLASS_NOT_FOUND", "class_id", id, message)
            }
            Error::ProfileNotFound(id) => status_with_id(
                Code::NotFound,
                "PROFILE_NOT_FOUND",
                "profile_id",
                id,
                message,
            ),
            Error::PoolNotFound(id) => {
                status_with_id(Code::NotFound, "POOL_NOT_FOUND", "pool_id", id, message)
            }
            Error::PoolProfileMismatch { pool_id, .. } => status_with_id(
                Code::FailedPrecondition,
                "POOL_PROFILE_MISMATCH",
                "pool_id",
                pool_id,
                message,
            ),
            Error::KeyLimitReached {
                class_id,
                max_students,
                existing,
                ..
            } => status_with(
                Code::FailedPrecondition,
                "KEY_LIMIT_REACHED",
                message,
                HashMap::from([
                    ("class_id".to_owned(), class_id.to_string()),
                    ("max_students".to_owned(), max_students.to_string()),
                    ("unrevoked_keys".to_owned(), existing.to_string()),
                ]),
            ),
            Error::TooManyTakenCodes => {
                status(Code::ResourceExhausted, "TOO_MANY_ATTEMPTS", message)
            }
            Error::CodeTaken => status_with(
                Code::AlreadyExists,
                "CODE_ALREADY_EXISTS",
                message,
                HashMap::from([("field".to_owned(), "custom_code".to_owned())]),
            ),
            Error::UnknownPlaceholder(name) => status_with(
                Code::InvalidArgument,
                "UNKNOWN_PLACEHOLDER",
                message,
                HashMap::from([("placeholder".to_owned(), name)]),
            ),
            Error::NoEventKey(id) => status_with_id(
                Code::FailedPrecondition,
                "NO_EVENT_KEY",
                "class_id",
                id,
                message,
            ),
            Error::KeyAlreadyRedeemed(id) => status_with_id(
                Code::FailedPrecondition,
                "KEY_ALREADY_REDEEMED",
                "key_id",
                id,
                message,
            ),
            Error::KeyRevoked(id) => status_with_id(
                Code::FailedPrecondition,
                "KEY_REVOKED",
                "key_id",
                id,
                message,
            ),
            Error::UseReleased(id) => status_with_id(
                Code::FailedPrecondition,
                "KEY_USE_RELEASED",
                "key_id",
                id,
                message,
            ),
            Error::StaleGeneration { .. } => status(Code::Aborted, "STALE_GENERATION", message),
            Error::EnrollmentUnavailable(s) => {
                trainingkeys_shared::error::unavailable("enrollment service", &s)
            }
            Error::Enrollment(s) => internal(&s),
            Error::Decrypt(ref d) => internal(d),
            Error::Entropy(ref r) => internal(r),
            Error::Csv(ref c) => internal(c),
            Error::Task(ref t) => internal(t),
            Error::Database(e) => database(&e),
        }
    }
}
