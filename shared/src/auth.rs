//! Who is calling, and whether the policy lets them call this method.
//!
//! Every call except health and reflection passes through [`AuthLayer`]:
//!
//! 1. A client certificate verified in the TLS handshake that holds the DNS
//!    name of one of this project's services (`redemption`,
//!    `key-issuance`) makes the caller that service ([`Internal`]).
//! 2. An `authorization: Bearer <JWT>` header is verified locally against
//!    the JWKS in `JWKS_FILE` (RS256/384/512, ES256/384; `iss`, `aud`,
//!    `exp` and `nbf` checked with at most `JWT_LEEWAY_SECONDS` of skew).
//!    Its claims name the subject, the organizations and the roles.
//! 3. The method's entry in [`POLICY`](crate::policy::POLICY) decides:
//!    no valid credential gives UNAUTHENTICATED, credentials the entry does
//!    not allow give PERMISSION_DENIED. A method of this project with no
//!    entry is refused (fail closed).
//!
//! The [`Caller`] is then in the request's extensions, for the checks only
//! a service can make (the resource's organization, the student's own
//! subject).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::policy::{Internal, Role};

/// Longest clock skew `JWT_LEEWAY_SECONDS` may allow.
const MAX_LEEWAY_SECONDS: u64 = 300;

/// Algorithms a token may be signed with. Symmetric ones are never
/// accepted: a verifier's key must not be able to mint tokens.
const ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Caller-authentication settings, shared by every service.
#[derive(Clone, Debug, clap::Args)]
pub struct AuthConfig {
    /// JSON Web Key Set (a file) whose public keys verify bearer tokens;
    /// re-read when it changes, so signing keys rotate without a restart.
    #[arg(long, env = "JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// The `iss` every token must carry.
    #[arg(long, env = "JWT_ISSUER", default_value = "trainingkeys-dev")]
    pub jwt_issuer: String,

    /// The `aud` every token must name.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "trainingkeys")]
    pub jwt_audience: String,

    /// Seconds of clock skew allowed on `exp` and `nbf` (at most 300).
    #[arg(long, env = "JWT_LEEWAY_SECONDS", default_value_t = 30)]
    pub jwt_leeway_seconds: u64,

    /// DNS name in the client certificate of the redemption service.
    #[arg(long, env = "REDEMPTION_IDENTITY", default_value = "redemption")]
    pub redemption_identity: String,

    /// DNS name in the client certificate of the key-issuance service.
    #[arg(long, env = "KEY_ISSUANCE_IDENTITY", default_value = "key-issuance")]
    pub key_issuance_identity: String,
}

/// The claims of a bearer token (beside `iss`, `aud`, `exp`, `nbf`, which
/// the verifier checks).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// Who the token speaks for: a user id for end users and staff, a
    /// service name for platform services.
    pub sub: String,
    /// The organizations the caller acts in.
    #[serde(default)]
    pub orgs: Vec<String>,
    /// The caller's roles, by their policy names (`site_administrator`, ...).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// Who made a call, as the server established it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// The service proved by the client certificate, if any.
    pub service: Option<Internal>,
    /// The token's subject, if a token was presented.
    pub subject: Option<String>,
    /// The token's organizations.
    pub orgs: BTreeSet<String>,
    /// The token's roles this project knows (unknown names are ignored).
    pub roles: BTreeSet<Role>,
}

impl Caller {
    /// The caller of `request` (none, if the layer did not run: fails closed).
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default()
    }

    /// A call from one of this project's services, trusted for any organization.
    pub fn is_internal(&self) -> bool {
        self.service.is_some()
    }

    /// Whether the caller holds `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// What the caller's roles may reach through the method at `path`
    /// (the policy's scopes of its roles there).
    pub fn reaches(&self, path: &str) -> Vec<crate::policy::Scope> {
        let Some(rule) = crate::policy::rule(path) else {
            return Vec::new();
        };
        self.roles
            .iter()
            .filter_map(|role| rule.scope(*role))
            .collect()
    }

    /// Whether the caller may act in `organization`: an internal service
    /// always, anyone else only in the organizations its token names.
    pub fn in_org(&self, organization: &str) -> bool {
        self.is_internal() || self.orgs.contains(organization)
    }
}

/// The verifier of bearer tokens and service identities.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

/// Most verified tokens kept (a caller reuses its token for many calls; a
/// signature check costs far more than the call). Full: forgotten at once.
const VERIFIED_CACHE: usize = 10_000;

struct Inner {
    /// Tokens already verified, with their claims, until they expire. Emptied
    /// whenever the JWKS changes, so a key taken out stops working at once.
    verified: std::sync::Mutex<std::collections::HashMap<String, Claims>>,
    jwks_file: PathBuf,
    jwks: ArcSwap<(Vec<u8>, JwkSet)>,
    issuer: String,
    audience: String,
    leeway: u64,
    identities: Vec<(String, Internal)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwks_file", &self.inner.jwks_file)
            .field("issuer", &self.inner.issuer)
            .finish_non_exhaustive()
    }
}

/// Why a call is refused before it reaches the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No valid credential (UNAUTHENTICATED); the text says what was wrong.
    Unauthenticated(String),
    /// Valid credentials the policy does not allow here (PERMISSION_DENIED).
    Denied,
}

impl Refusal {
    /// The gRPC status of the refusal, with its ErrorInfo reason.
    pub fn status(&self) -> tonic::Status {
        match self {
            Refusal::Unauthenticated(why) => {
                crate::error::status(Code::Unauthenticated, "UNAUTHENTICATED", why.clone())
            }
            Refusal::Denied => crate::error::status(
                Code::PermissionDenied,
                "PERMISSION_DENIED",
                "the caller's roles do not allow this method",
            ),
        }
    }
}

impl AuthConfig {
    /// The authenticator these settings describe; fails when the JWKS is
    /// missing or unreadable.
    pub fn load(&self) -> anyhow::Result<Authenticator> {
        let Some(jwks_file) = self.jwks_file.clone() else {
            anyhow::bail!("JWKS_FILE is required: the keys that verify callers' bearer tokens");
        };
        anyhow::ensure!(
            self.jwt_leeway_seconds <= MAX_LEEWAY_SECONDS,
            "JWT_LEEWAY_SECONDS may be at most {MAX_LEEWAY_SECONDS}"
        );
        let jwks = read_jwks(&jwks_file)?;
        Ok(Authenticator {
            inner: Arc::new(Inner {
                verified: std::sync::Mutex::new(std::collections::HashMap::new()),
                jwks_file,
                jwks: ArcSwap::from_pointee(jwks),
                issuer: self.jwt_issuer.clone(),
                audience: self.jwt_audience.clone(),
                leeway: self.jwt_leeway_seconds,
                identities: vec![
                    (self.redemption_identity.clone(), Internal::Redemption),
                    (self.key_issuance_identity.clone(), Internal::KeyIssuance),
                ],
            }),
        })
    }
}

fn read_jwks(path: &PathBuf) -> anyhow::Result<(Vec<u8>, JwkSet)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let set: JwkSet = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a JSON Web Key Set", path.display()))?;
    if set.keys.is_empty() {
        // A legitimate way to revoke every signing key at once.
        tracing::warn!(path = %path.display(), "the JWKS holds no key: no bearer token is valid");
    }
    Ok((bytes, set))
}

impl Authenticator {
    /// Re-reads the JWKS every `every` until `stop`, keeping the previous
    /// set when the file is unreadable or malformed.
    pub fn watch(&self, every: Duration, stop: CancellationToken) {
        let auth = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                match read_jwks(&auth.inner.jwks_file) {
                    Ok(jwks) if jwks.0 != auth.inner.jwks.load().0 => {
                        auth.inner.jwks.store(Arc::new(jwks));
                        auth.cache().clear();
                        tracing::info!("JWKS reloaded");
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(error = %format!("{error:#}"), "JWKS not reloaded; keeping the previous keys")
                    }
                }
            }
        });
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Claims>> {
        self.inner
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Verifies a bearer token: signature by a key of the JWKS (chosen by
    /// `kid`), algorithm matching that key, `iss`, `aud`, `exp`, `nbf`. A
    /// token verified before is answered from memory until it expires.
    pub fn verify(&self, token: &str) -> Result<Claims, Refusal> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Some(claims) = self.cache().get(token)
            && claims.exp + self.inner.leeway > now
        {
            return Ok(claims.clone());
        }
        let claims = self.verify_signature(token)?;
        let mut cache = self.cache();
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }

    fn verify_signature(&self, token: &str) -> Result<Claims, Refusal> {
        let bad = |why: &str| Refusal::Unauthenticated(format!("invalid bearer token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| bad("malformed"))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(bad("algorithm not accepted"));
        }
        let jwks = self.inner.jwks.load();
        let jwk = match &header.kid {
            Some(kid) => jwks.1.find(kid),
            None if jwks.1.keys.len() == 1 => jwks.1.keys.first(),
            None => None,
        }
        .ok_or_else(|| bad("unknown signing key"))?;
        if let Some(alg) = jwk.common.key_algorithm
            && alg.to_string() != format!("{:?}", header.alg)
        {
            return Err(bad("algorithm does not match the signing key"));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|_| bad("unusable signing key"))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.inner.issuer]);
        validation.set_audience(&[&self.inner.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.inner.leeway;
        jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map(|data| data.claims)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                bad(match error.kind() {
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not valid yet",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::InvalidAudience => "wrong audience",
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
                    _ => "rejected",
                })
            })
    }

    /// Establishes the caller of an HTTP/2 request (its client certificate
    /// and its bearer token), and decides whether `path` allows it.
    pub fn authorize<B>(&self, request: &http::Request<B>) -> Result<Caller, Refusal> {
        let path = request.uri().path();
        let mut caller = Caller {
            service: self.service_of(request),
            ..Caller::default()
        };
        let token = match request.headers().get(http::header::AUTHORIZATION) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .ok_or_else(|| {
                        Refusal::Unauthenticated(
                            "the authorization header must be `Bearer <token>`".into(),
                        )
                    })?,
            ),
        };
        if let Some(token) = token {
            let claims = self.verify(token)?;
            caller.subject = Some(claims.sub);
            caller.orgs = claims.orgs.into_iter().collect();
            caller.roles = claims.roles.iter().filter_map(|r| Role::parse(r)).collect();
        }
        let Some(rule) = crate::policy::rule(path) else {
            return Err(Refusal::Denied);
        };
        if caller.service.is_none() && caller.subject.is_none() {
            return Err(Refusal::Unauthenticated(
                "a bearer token is required (authorization: Bearer <JWT>)".into(),
            ));
        }
        let as_service = caller.service.is_some_and(|s| rule.services.contains(&s));
        let as_role = rule
            .roles
            .iter()
            .any(|(role, _)| caller.roles.contains(role));
        if !as_service {
            // A service certificate counts only where the policy lists that
            // service: elsewhere the call is its token's, scoped like any other.
            caller.service = None;
        }
        if as_service || as_role {
            Ok(caller)
        } else {
            Err(Refusal::Denied)
        }
    }

    /// The service of this project a request's client certificate proves, if any.
    pub fn service_of<B>(&self, request: &http::Request<B>) -> Option<Internal> {
        let info =
            request
                .extensions()
                .get::<tonic::transport::server::TlsConnectInfo<
                    tonic::transport::server::TcpConnectInfo,
                >>()?;
        let certs = info.peer_certs()?;
        let leaf = certs.first()?;
        let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
        self.inner.identities.iter().find_map(|(name, service)| {
            let name = rustls::pki_types::ServerName::try_from(name.as_str()).ok()?;
            cert.verify_is_valid_for_subject_name(&name)
                .is_ok()
                .then_some(*service)
        })
    }
}

/// Paths that need no credentials: health checks and reflection.
pub(crate) fn is_open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The tower layer that authenticates and authorizes every call.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    auth: Authenticator,
}

impl AuthLayer {
    /// The layer over `auth`.
    pub fn new(auth: Authenticator) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    auth: Authenticator,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        std::future::Ready<Result<http::Response<tonic::body::Body>, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if is_open(request.uri().path()) {
            return futures::future::Either::Left(self.inner.call(request));
        }
        match self.auth.authorize(&request) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                futures::future::Either::Left(self.inner.call(request))
            }
            Err(refusal) => {
                tracing::info!(path = request.uri().path(), ?refusal, "call refused");
                futures::future::Either::Right(std::future::ready(Ok(refusal.status().into_http())))
            }
        }
    }
}

/// A client-side interceptor that adds `authorization: Bearer <token>` to
/// every call (for Rust clients: tools, benchmarks, other services' tests).
#[derive(Clone, Debug)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    /// The interceptor for `token`; fails if the token is not a valid header value.
    pub fn new(token: &str) -> anyhow::Result<Self> {
        Ok(Self(format!("Bearer {token}").parse()?))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}
