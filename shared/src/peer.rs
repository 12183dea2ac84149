//! Calls to another service of this project: what a failed call means, and
//! retrying the ones worth retrying. A failure is classified by the error
//! types behind it (a `tonic::transport::Error`, an `h2::Error`, an I/O
//! error in its source chain), never by the words of its message.
//! Retries use `backon` (exponential back-off with jitter), so a herd of
//! callers that saw the same outage does not come back in lock-step.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use tonic::{Code, Status};

/// What a peer's failure status means to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The peer could not be reached or did not answer in time (a broken or
    /// refused connection, a reset stream, a deadline): worth retrying with
    /// back-off, and an outage if it persists.
    Outage,
    /// The peer asked to be called again (ABORTED, or RESOURCE_EXHAUSTED
    /// without a reason: a refused stream, a full queue): worth retrying.
    Retry,
    /// The peer answered: a final answer, mapped by its ErrorInfo reason.
    Answer,
}

/// Classifies a status returned by a call to a peer.
pub fn classify(status: &Status) -> Failure {
    if from_transport(status) {
        return Failure::Outage;
    }
    let has_reason = crate::error::reason(status).is_some();
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Failure::Outage,
        Code::Aborted | Code::ResourceExhausted if !has_reason => Failure::Retry,
        _ => Failure::Answer,
    }
}

/// True when the status was made from a transport failure, whatever its code
/// (tonic turns an HTTP/2 reset into INTERNAL or UNKNOWN).
fn from_transport(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::transport::Error>()
            || error.is::<h2::Error>()
            || error.is::<std::io::Error>()
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// Calls a peer, retrying outages and retry answers: 3 attempts in all,
/// 20 ms then 40 ms apart (with jitter), or as long as a shed peer's
/// RetryInfo asks (up to a second). Every call a service makes through this
/// must be idempotent.
pub async fn call<T, F, Fut>(send: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_times(2)
        .with_jitter();
    send.retry(backoff)
        .when(|status: &Status| classify(status) != Failure::Answer)
        // A peer that says when to come back (RetryInfo: OVERLOADED) is
        // called again no sooner.
        .adjust(|status: &Status, next: Option<Duration>| {
            next.map(|backoff| retry_after(status).map_or(backoff, |asked| asked.max(backoff)))
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The delay a status's `google.rpc.RetryInfo` asks for, if any (capped at
/// a second: a peer call's whole budget is a few seconds).
fn retry_after(status: &Status) -> Option<Duration> {
    use tonic_types::StatusExt as _;
    status
        .get_details_retry_info()?
        .retry_delay
        .map(|d| d.min(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_by_type_and_reason_not_by_message() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let mut reset = Status::internal("anything at all");
        reset.set_source(std::sync::Arc::new(io));
        assert_eq!(classify(&reset), Failure::Outage);
        // The words of a transport error, without one behind them, are an answer.
        let bug = Status::internal("h2 protocol error: http2 error");
        assert_eq!(classify(&bug), Failure::Answer);
        assert_eq!(classify(&Status::unavailable("down")), Failure::Outage);
        assert_eq!(
            classify(&Status::resource_exhausted("refused")),
            Failure::Retry
        );
        let full = crate::error::status(Code::ResourceExhausted, "CLASS_FULL", "full");
        assert_eq!(classify(&full), Failure::Answer);
    }

    #[tokio::test]
    async fn a_shed_peer_is_called_again_no_sooner_than_it_asked() {
        let shed = || {
            let mut details = tonic_types::ErrorDetails::with_error_info(
                crate::shed::OVERLOADED,
                trainingkeys_proto::ERROR_DOMAIN,
                std::collections::HashMap::new(),
            );
            details.set_retry_info(Some(Duration::from_millis(150)));
            <Status as tonic_types::StatusExt>::with_error_details(
                Code::Unavailable,
                "busy",
                details,
            )
        };
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let started = std::time::Instant::now();
        let answer = call(|| {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(shed())
                } else {
                    Ok(tonic::Response::new(7))
                }
            }
        })
        .await;
        assert_eq!(answer.unwrap(), 7);
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
}
