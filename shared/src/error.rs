//! Building `tonic::Status` values with a machine-readable reason
//! (`google.rpc.ErrorInfo`, domain `trainingkeys.v1`), and reading the reason
//! back from a status another service returned.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use trainingkeys_proto::ERROR_DOMAIN;

/// Reason of every INVALID_ARGUMENT caused by one malformed request field.
pub const INVALID_FIELD: &str = "INVALID_FIELD";
/// Reason of every unexpected server-side failure.
pub const INTERNAL: &str = "INTERNAL";
/// Reason when a dependency (database, another service) cannot be reached.
pub const UNAVAILABLE: &str = "UNAVAILABLE";

/// A request field that failed validation. Every service error enum wraps it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidField {
    /// The request field, as named in the .proto file.
    pub field: &'static str,
    /// What is wrong with it, for people.
    pub message: String,
}

impl InvalidField {
    /// An invalid `field` because of `message`.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

impl From<InvalidField> for Status {
    fn from(e: InvalidField) -> Self {
        let mut details = ErrorDetails::with_error_info(
            INVALID_FIELD,
            ERROR_DOMAIN,
            HashMap::from([("field".to_owned(), e.field.to_owned())]),
        );
        details.add_bad_request_violation(e.field, e.message.clone());
        Status::with_error_details(Code::InvalidArgument, e.to_string(), details)
    }
}

/// A status with `code`, a `reason` in its ErrorInfo, and a message for people.
pub fn status(code: Code, reason: &str, message: impl Into<String>) -> Status {
    status_with(code, reason, message, HashMap::new())
}

/// Like [`status`], with ErrorInfo metadata (e.g. the id that was not found).
pub fn status_with(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: HashMap<String, String>,
) -> Status {
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// Like [`status`], naming the id the status is about in the ErrorInfo
/// metadata under `field` (e.g. `class_id` for a class that was not found).
pub fn status_with_id(
    code: Code,
    reason: &str,
    field: &str,
    id: impl std::fmt::Display,
    message: impl Into<String>,
) -> Status {
    status_with(
        code,
        reason,
        message,
        HashMap::from([(field.to_owned(), id.to_string())]),
    )
}

/// An unexpected failure: the whole error chain goes to the log, the client
/// gets a fixed message that leaks nothing.
pub fn internal(error: &(dyn std::error::Error + 'static)) -> Status {
    tracing::error!(error = %ErrorChain(error), "internal error");
    status(Code::Internal, INTERNAL, "internal error")
}

/// A dependency is down: retryable by the client.
pub fn unavailable(what: &str, error: &(dyn std::error::Error + 'static)) -> Status {
    tracing::warn!(error = %ErrorChain(error), "{what} unavailable");
    status(
        Code::Unavailable,
        UNAVAILABLE,
        format!("{what} is unavailable, retry later"),
    )
}

/// The ErrorInfo reason of a status, if it carries one.
pub fn reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// Displays an error with all its sources: `outer: inner: root`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// True when a sqlx error means the database could not be reached (as opposed
/// to a query that failed), so the caller can answer UNAVAILABLE.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
    )
}

/// Maps a database error: connection trouble → UNAVAILABLE, anything else → INTERNAL.
pub fn database(e: &sqlx::Error) -> Status {
    if is_connection_error(e) {
        unavailable("database", e)
    } else {
        internal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_round_trips() {
        let s = status(Code::ResourceExhausted, "CLASS_FULL", "full");
        assert_eq!(reason(&s).as_deref(), Some("CLASS_FULL"));
        let s: Status = InvalidField::new("email", "bad").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(reason(&s).as_deref(), Some(INVALID_FIELD));
    }
}
