//! Every gRPC call, answered or made, observed the same way: a duration in
//! `rpc.server.call.duration` or `rpc.client.call.duration` by service,
//! method and status code; its span marked with the code (and as an error
//! when the call failed); and, for a call answered, one access log line.
//!
//! A gRPC call's status is known only at its end: in the answer's headers
//! when it failed at once, else in the trailers after the last message. So
//! the observation rides on the answer's body and is recorded when the
//! trailers pass, or when the body is dropped unfinished (the other side went
//! away: CANCELLED).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::Frame;
use opentelemetry::KeyValue;
use tonic::Code;
use tonic::body::Body;
use tonic::transport::Channel;

/// Which side of a call this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// One call being observed.
struct Call {
    side: Side,
    service: &'static str,
    method: &'static str,
    started: Instant,
    span: tracing::Span,
}

/// The open methods every server has besides the policy table's.
const OPEN_METHODS: &[&str] = &[
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// A call's service and method, as metrics and logs name them: the path's,
/// when it is a method this project serves, else `_OTHER` for both (a
/// caller choosing the path must not mint a new series per call, as the
/// OpenTelemetry conventions advise).
pub fn method_of(path: &str) -> (&'static str, &'static str) {
    let known: Option<&'static str> = crate::policy::rule(path)
        .map(|rule| rule.path)
        .or_else(|| OPEN_METHODS.iter().copied().find(|open| *open == path));
    known
        .and_then(|path| path.trim_start_matches('/').split_once('/'))
        .unwrap_or(("_OTHER", "_OTHER"))
}

impl Call {
    /// A call to `(service, method)` (from [`method_of`]), in `span`.
    fn new(
        side: Side,
        (service, method): (&'static str, &'static str),
        span: tracing::Span,
    ) -> Self {
        Self {
            side,
            service,
            method,
            started: Instant::now(),
            span,
        }
    }

    /// Records the call's end with `status` (its code and details).
    fn finish(self, code: Code, status: Option<&http::HeaderMap>) {
        let elapsed = self.started.elapsed();
        let histogram = match self.side {
            Side::Server => &*crate::metrics::RPC_SERVER,
            Side::Client => &*crate::metrics::RPC_CLIENT,
        };
        histogram.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", self.service),
                KeyValue::new("rpc.method", self.method),
                KeyValue::new("rpc.grpc.status_code", code as i64),
            ],
        );
        // Decoded only for the access line, and only when it is written.
        let logged =
            self.side == Side::Server && tracing::enabled!(target: "access", tracing::Level::INFO);
        let reason = match (code, status) {
            (Code::Ok, _) | (_, None) => None,
            (_, Some(_)) if !logged => None,
            (_, Some(headers)) => tonic::Status::from_header_map(headers)
                .and_then(|status| crate::error::reason(&status)),
        };
        self.span.record("rpc.grpc.status_code", code as i64);
        if is_error(self.side, code) {
            self.span.record("otel.status_code", "ERROR");
        }
        if logged {
            let duration_ms = elapsed.as_secs_f64() * 1000.0;
            self.span.in_scope(|| {
                tracing::info!(
                    target: "access",
                    service = %self.service,
                    method = %self.method,
                    status = ?code,
                    reason = reason.as_deref().unwrap_or(""),
                    duration_ms,
                    "call answered"
                );
            });
        }
    }
}

/// Whether a call that ended with `code` failed, as the OpenTelemetry RPC
/// conventions mark spans: every non-OK code on the client; on the server
/// only the codes that are the server's fault (the rest are the caller's:
/// a bad argument, a full class).
fn is_error(side: Side, code: Code) -> bool {
    match side {
        Side::Client => code != Code::Ok,
        Side::Server => matches!(
            code,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        ),
    }
}

/// The `grpc-status` in `headers`, if any.
fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// An answer's body that records its call when the status passes.
struct Observed {
    inner: Body,
    call: Option<Call>,
}

/// A call whose answer has not started: dropped so (the caller gave up, or
/// the call's deadline passed), it is recorded as CANCELLED.
struct Pending(Option<Call>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(call) = self.0.take() {
            call.finish(Code::Cancelled, None);
        }
    }
}

impl Observed {
    /// Wraps `response`'s body; a status already in its headers (a call
    /// that failed at once) is recorded now.
    fn wrap<B>(response: http::Response<B>, mut pending: Pending) -> http::Response<Body>
    where
        B: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        B::Error: Into<tonic::codegen::StdError>,
    {
        let (parts, body) = response.into_parts();
        let call = match (pending.0.take(), status_in(&parts.headers)) {
            (Some(call), Some(code)) => {
                call.finish(code, Some(&parts.headers));
                None
            }
            (call, _) => call,
        };
        let body = Body::new(body);
        let body = match call {
            Some(call) => Body::new(Observed {
                inner: body,
                call: Some(call),
            }),
            None => body,
        };
        http::Response::from_parts(parts, body)
    }
}

impl http_body::Body for Observed {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = self.call.take()
                {
                    let code = status_in(trailers).unwrap_or(Code::Unknown);
                    call.finish(code, Some(trailers));
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(call) = self.call.take() {
                    call.finish(status.code(), None);
                }
            }
            Poll::Ready(None) => {
                // Ended without trailers: not a complete gRPC answer.
                if let Some(call) = self.call.take() {
                    call.finish(Code::Unknown, None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // Dropped before its status: the other side went away.
        if let Some(call) = self.call.take() {
            call.finish(Code::Cancelled, None);
        }
    }
}

/// The tower layer that observes every call a server answers: it opens the
/// call's span (`telemetry::server_span`; the caller's trace is adopted only
/// from this project's services, which `auth` recognizes) and runs the call
/// in it. Outermost, so calls refused by authentication or shedding are
/// counted too.
#[derive(Clone, Debug)]
pub struct ServerLayer {
    auth: crate::auth::Authenticator,
}

impl ServerLayer {
    /// Observes calls, trusting the trace context of the services `auth`
    /// recognizes.
    pub fn new(auth: crate::auth::Authenticator) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for ServerLayer {
    type Service = Server<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Server {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service [`ServerLayer`] makes.
#[derive(Clone, Debug)]
pub struct Server<S> {
    inner: S,
    auth: crate::auth::Authenticator,
}

type BoxAnswer<E> = Pin<Box<dyn Future<Output = Result<http::Response<Body>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Server<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxAnswer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use tracing::Instrument as _;
        let trusted = self.auth.service_of(&request).is_some();
        let names = method_of(request.uri().path());
        let span = crate::telemetry::server_span(&request, names, trusted);
        let pending = Pending(Some(Call::new(Side::Server, names, span.clone())));
        let answer = span.in_scope(|| self.inner.call(request));
        Box::pin(async move { Ok(Observed::wrap(answer.await?, pending)) }.instrument(span))
    }
}

/// A client of a peer service whose calls are observed: each gets a client
/// span (its trace context sent along in `traceparent`, so the peer's span
/// is its child) and a duration in `rpc.client.call.duration`. Over one
/// channel, or balanced call by call over a changing set of them
/// ([`crate::server::peer`]).
#[derive(Clone)]
pub struct Client {
    inner: tower::util::BoxCloneSyncService<
        http::Request<Body>,
        http::Response<Body>,
        tonic::codegen::StdError,
    >,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("rpc::Client")
    }
}

/// Most calls waiting for a balanced peer at once, per client.
const BALANCED_QUEUE: usize = 4096;

impl Client {
    /// Observes the calls made over `channel`.
    pub fn new(channel: Channel) -> Self {
        use tower::ServiceExt as _;
        Self {
            inner: tower::util::BoxCloneSyncService::new(channel.map_err(Into::into)),
        }
    }

    /// Balances calls over the channels `discovered` adds and removes: of
    /// two picked at random, the one with fewer calls pending. A call that
    /// finds no channel within `timeout` fails as UNAVAILABLE (an I/O time
    /// out, so callers retry it as an outage).
    pub fn balanced<D>(discovered: D, timeout: std::time::Duration) -> Self
    where
        D: tower::discover::Discover<Key = std::net::SocketAddr, Service = Replica>
            + Send
            + Unpin
            + 'static,
        D::Error: Into<tonic::codegen::StdError>,
    {
        use tower::ServiceExt as _;
        let loaded = tower::load::PendingRequestsDiscover::new(
            discovered,
            tower::load::CompleteOnResponse::default(),
        );
        let balanced = tower::balance::p2c::Balance::new(loaded);
        let shared = tower::buffer::Buffer::new(balanced, BALANCED_QUEUE);
        let bounded = tower::ServiceBuilder::new()
            .map_err(|error: tonic::codegen::StdError| {
                if error.is::<tower::timeout::error::Elapsed>() {
                    Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no replica of the peer answered in time",
                    )) as tonic::codegen::StdError
                } else {
                    error
                }
            })
            .timeout(timeout)
            .service(shared);
        Self {
            inner: tower::util::BoxCloneSyncService::new(bounded.map_err(Into::into)),
        }
    }
}

/// How long a replica whose connection failed is left out of the balance.
const SET_ASIDE: std::time::Duration = std::time::Duration::from_secs(1);

/// One replica of a peer, in a balanced [`Client`]: after a call fails to
/// reach it (connection refused or broken) it is set aside for a second,
/// not ready, so the balancer sends calls to the others meanwhile. (A lazy
/// channel is always ready, and a dead replica answers fastest: without
/// this the balancer would prefer it.)
pub struct Replica {
    channel: Channel,
    aside_until: std::sync::Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Replica {
    /// The replica reached over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            channel,
            aside_until: Default::default(),
            waiting: None,
        }
    }
}

impl tower::Service<http::Request<Body>> for Replica {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = BoxAnswer<Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let until = *self
            .aside_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(until) = until.filter(|until| *until > tokio::time::Instant::now()) {
            let waiting = self
                .waiting
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if waiting.deadline() != until {
                waiting.as_mut().reset(until);
            }
            if waiting.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.waiting = None;
        self.channel.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let aside_until = self.aside_until.clone();
        let answer = self.channel.call(request);
        Box::pin(async move {
            let answer = answer.await;
            if answer.is_err() {
                *aside_until
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(tokio::time::Instant::now() + SET_ASIDE);
            }
            answer
        })
    }
}

impl tower::Service<http::Request<Body>> for Client {
    type Response = http::Response<Body>;
    type Error = tonic::codegen::StdError;
    type Future = BoxAnswer<Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let names = method_of(request.uri().path());
        let span = crate::telemetry::rpc_span("client", names);
        crate::telemetry::inject_into(&span, request.headers_mut());
        let mut pending = Pending(Some(Call::new(Side::Client, names, span)));
        let answer = self.inner.call(request);
        Box::pin(async move {
            match answer.await {
                Ok(response) => Ok(Observed::wrap(response, pending)),
                Err(error) => {
                    if let Some(call) = pending.0.take() {
                        call.finish(Code::Unavailable, None);
                    }
                    Err(error)
                }
            }
        })
    }
}
