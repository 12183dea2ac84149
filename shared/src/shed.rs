//! Load shedding: a replica answers at most `MAX_IN_FLIGHT` calls at once.
//! A call beyond that is refused at once with `UNAVAILABLE`, reason
//! `OVERLOADED` and a `google.rpc.RetryInfo` delay, before any work, so a
//! burst bigger than the machine gets fast, retryable answers (a client
//! retries with the same idempotency key) instead of queueing until calls
//! time out, Redis calls queued behind the burst time out with them, and
//! connections are dropped. Health checks and reflection are never shed,
//! and neither are calls from this project's own services (a client
//! certificate naming one, as the authentication layer in front of this one
//! found): load is shed at the edge, where a call can be retried whole,
//! never half-way through a redemption already admitted.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::metrics::Counter;
use tokio::sync::Semaphore;
use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt as _};

/// `trainingkeys.server.shed`: calls refused as OVERLOADED.
static SHED: LazyLock<Counter<u64>> = LazyLock::new(|| {
    crate::metrics::meter()
        .u64_counter("trainingkeys.server.shed")
        .with_description("calls refused as OVERLOADED (too many in flight in one replica)")
        .build()
});

/// The ErrorInfo reason of a shed call.
pub const OVERLOADED: &str = "OVERLOADED";

/// The tower layer that sheds calls beyond a replica's bound.
#[derive(Clone, Debug)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    retry_after: Duration,
    /// While false, every call but health and reflection is refused as
    /// `NOT_READY` (the replica's migrations are not applied yet).
    ready: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// The ErrorInfo reason of a call refused because the replica is starting.
pub const NOT_READY: &str = "NOT_READY";

/// How long a caller refused as `NOT_READY` is told to wait.
const NOT_READY_RETRY: Duration = Duration::from_secs(1);

impl ShedLayer {
    /// At most `max_in_flight` calls at once; a shed call is told to retry
    /// after about `retry_after` (spread by up to half again, so a shed herd
    /// does not come back as one).
    pub fn new(max_in_flight: usize, retry_after: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            retry_after,
            ready: None,
        }
    }

    /// Also refuses every call (health and reflection aside) as UNAVAILABLE
    /// `NOT_READY` while `ready` is false.
    pub fn until(mut self, ready: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.ready = Some(ready);
        self
    }

    /// The status a call refused before it starts gets.
    fn refusal(&self, reason: &str, message: &str, retry_after: Duration) -> tonic::Status {
        let spread = retry_after.as_millis() as u64 / 2;
        let jitter = if spread == 0 {
            0
        } else {
            rand::random::<u64>() % spread
        };
        let mut details = ErrorDetails::with_error_info(
            reason,
            trainingkeys_proto::ERROR_DOMAIN,
            std::collections::HashMap::new(),
        );
        details.set_retry_info(Some(retry_after + Duration::from_millis(jitter)));
        tonic::Status::with_error_details(Code::Unavailable, message, details)
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`ShedLayer`] makes.
#[derive(Clone, Debug)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

type Answer<E> = Result<http::Response<tonic::body::Body>, E>;

impl<S, B> tower::Service<http::Request<B>> for Shed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Answer<S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let from_a_service = request
            .extensions()
            .get::<crate::auth::Caller>()
            .is_some_and(|caller| caller.service.is_some());
        if crate::auth::is_open(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        if self
            .layer
            .ready
            .as_ref()
            .is_some_and(|ready| !ready.load(std::sync::atomic::Ordering::Relaxed))
        {
            let refusal = self.layer.refusal(
                NOT_READY,
                "this replica is starting (its database migrations are not applied yet): retry after the RetryInfo delay, with the same idempotency key",
                NOT_READY_RETRY,
            );
            return Box::pin(std::future::ready(Ok(refusal.into_http())));
        }
        if from_a_service {
            return Box::pin(self.inner.call(request));
        }
        match self.layer.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let answer = self.inner.call(request);
                Box::pin(async move {
                    let answer = answer.await;
                    drop(permit);
                    answer
                })
            }
            Err(_) => {
                SHED.add(1, &[]);
                tracing::debug!("a call was shed: too many in flight");
                let refusal = self
                    .layer
                    .refusal(
                        OVERLOADED,
                        "this replica is at its limit of calls in flight: retry after the RetryInfo delay, with the same idempotency key",
                        self.layer.retry_after,
                    )
                    .into_http();
                Box::pin(std::future::ready(Ok(refusal)))
            }
        }
    }
}
