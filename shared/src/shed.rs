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
}

impl ShedLayer {
    /// At most `max_in_flight` calls at once; a shed call is told to retry
    /// after about `retry_after` (spread by up to half again, so a shed herd
    /// does not come back as one).
    pub fn new(max_in_flight: usize, retry_after: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            retry_after,
        }
    }

    /// The status a shed call gets.
    fn refusal(&self) -> tonic::Status {
        let spread = self.retry_after.as_millis() as u64 / 2;
        let jitter = if spread == 0 {
            0
        } else {
            rand::random::<u64>() % spread
        };
        let mut details = ErrorDetails::with_error_info(
            OVERLOADED,
            trainingkeys_proto::ERROR_DOMAIN,
            std::collections::HashMap::new(),
        );
        details.set_retry_info(Some(self.retry_after + Duration::from_millis(jitter)));
        tonic::Status::with_error_details(
            Code::Unavailable,
            "this replica is at its limit of calls in flight: retry after the RetryInfo delay, with the same idempotency key",
            details,
        )
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
        if crate::auth::is_open(request.uri().path()) || from_a_service {
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
                let refusal = self.layer.refusal().into_http();
                Box::pin(std::future::ready(Ok(refusal)))
            }
        }
    }
}
