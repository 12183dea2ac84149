//! The gRPC server bootstrap every service uses: `grpc.health.v1` (service
//! `liveness`: SERVING while the process runs; `readiness`, the empty name and
//! the service's own: SERVING only while the database answers and the
//! migrations asked for are applied), server reflection, a tracing span, a
//! duration and an access line per call, Prometheus metrics on
//! `METRICS_ADDR`, an optional maximum connection age, and graceful shutdown
//! (readiness NOT_SERVING, calls still accepted for the shutdown delay, then
//! in-flight calls drain, bounded by a grace period).

use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::ServingStatus;

use crate::auth::{AuthLayer, Authenticator};
use crate::shed::ShedLayer;
use crate::tls::Tls;

/// What every service's `build` does once its settings are checked
/// ([`security`], peer clients): its pool (its own schema; the URL is checked, nothing
/// is connected yet), its listeners bound, then, only when asked
/// (`MIGRATE_ON_START`, `serve --migrate`), its migrations applied. With the
/// database down the migrations wait: the service starts NOT_SERVING and
/// applies them when the database returns. The port is bound before the
/// first outgoing connection, so none of this process's own connections to
/// PostgreSQL can be holding it (the default ports lie in Linux's ephemeral
/// range).
pub async fn prepare(
    security: Security,
    common: &crate::config::CommonConfig,
    schema: &str,
    migrator: &'static sqlx::migrate::Migrator,
    listen_addr: std::net::SocketAddr,
) -> anyhow::Result<Prepared> {
    let Security { tls, auth } = security;
    let pool = crate::db::connect(
        &common.database_url,
        schema,
        common.database_max_connections,
    )?;
    let listener = TcpListener::bind(listen_addr).await?;
    let health_listener = match common.health_listen_addr {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let metrics_listener = match common.metrics_addr {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let pool_watch = crate::metrics::observe_pool(&pool, schema, common.database_max_connections);
    let mut pending = None;
    if common.migrate_on_start
        && let Err(error) = crate::db::migrate(&pool, schema, migrator).await
    {
        // A database that is down is waited for; any other failure
        // (a migration that does not apply) stops the start.
        if crate::db::is_reachable(&pool).await {
            return Err(error);
        }
        tracing::warn!(
            error = %format_args!("{error:#}"),
            "the database is unreachable: migrations wait for it (NOT_SERVING until then)"
        );
        pending = Some(Migration {
            schema: schema.to_owned(),
            migrator,
        });
    }
    Ok(Prepared {
        pool,
        listener,
        health_listener,
        metrics_listener,
        pending,
        _pool_watch: pool_watch,
        tls,
        auth,
    })
}

/// A service's TLS and verifier of callers, read and checked.
#[derive(Debug)]
pub struct Security {
    /// TLS, for serving and for calling peers; `None` when plaintext was configured.
    pub tls: Option<Tls>,
    /// The verifier of callers.
    pub auth: Authenticator,
}

/// Reads and checks the TLS files and the JWKS: the first step of every
/// service's `build`, so a bad file fails before anything else.
pub fn security(common: &crate::config::CommonConfig) -> anyhow::Result<Security> {
    crate::tls::install_provider();
    Ok(Security {
        tls: common.tls.load()?,
        auth: common.auth.load()?,
    })
}

/// A service's checked settings, pool and bound listener.
#[derive(Debug)]
pub struct Prepared {
    /// The service's pool, on its own schema.
    pub pool: PgPool,
    /// The bound gRPC listener.
    pub listener: TcpListener,
    /// The bound plaintext health-check listener, if configured.
    pub health_listener: Option<TcpListener>,
    /// The bound Prometheus endpoint's listener, if configured.
    pub metrics_listener: Option<TcpListener>,
    /// Migrations asked for that wait for the database.
    pending: Option<Migration>,
    /// The pool in the metrics, while the service lives (dropped with it).
    _pool_watch: crate::metrics::PoolWatch,
    /// TLS, for serving and for calling peers; `None` when plaintext was configured.
    pub tls: Option<Tls>,
    /// The verifier of callers.
    pub auth: Authenticator,
}

/// Migrations to apply once the database answers.
#[derive(Debug)]
struct Migration {
    schema: String,
    migrator: &'static sqlx::migrate::Migrator,
}

impl Prepared {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }
}

/// The health service name that reports the process alone (liveness).
pub const LIVENESS: &str = "liveness";
/// The health service name that reports readiness (as do the empty name
/// and the service's own).
pub const READINESS: &str = "readiness";

/// How often readiness (database reachability) is re-checked.
const READINESS_INTERVAL: Duration = Duration::from_secs(2);
/// About how long a shed call is told to wait before retrying.
const SHED_RETRY_AFTER_MS: u64 = 200;

/// What a service hands to [`serve`].
pub struct ServeOptions {
    /// Fully-qualified gRPC service names, reported by the health service.
    pub service_names: Vec<&'static str>,
    /// The pool (whose reachability decides SERVING / NOT_SERVING), the
    /// listener, TLS and the verifier of callers.
    pub prepared: Prepared,
    /// Longest wait for in-flight calls once shutdown starts.
    pub grace: Duration,
    /// How long calls are still accepted once shutdown starts (readiness
    /// already NOT_SERVING), so load balancers stop sending first.
    pub shutdown_delay: Duration,
    /// Close connections after this age (jittered), so clients re-balance.
    pub max_connection_age: Option<Duration>,
    /// How often the TLS files and the JWKS are re-read.
    pub reload_every: Duration,
    /// Most calls answered at once (beyond: OVERLOADED, retry later).
    pub max_in_flight: usize,
    /// Most concurrent HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// Longest a call may take to be answered (its request read included).
    pub call_timeout: Duration,
}

impl ServeOptions {
    /// Options for one gRPC service, with the grace period and connection
    /// age from the shared configuration.
    pub fn new(
        service_name: &'static str,
        prepared: Prepared,
        common: &crate::config::CommonConfig,
    ) -> Self {
        Self {
            service_names: vec![service_name],
            prepared,
            grace: common.shutdown_grace(),
            shutdown_delay: Duration::from_secs(common.shutdown_delay_seconds),
            max_connection_age: common.max_connection_age(),
            reload_every: Duration::from_secs(common.tls.tls_reload_seconds.max(1)),
            max_in_flight: common.max_in_flight.max(1),
            max_concurrent_streams: common.http2_max_concurrent_streams.max(1),
            call_timeout: Duration::from_secs(common.call_timeout_seconds.max(1)),
        }
    }
}

/// Serves `routes` (plus health and reflection) on the prepared listener,
/// every call authenticated and authorized, until `shutdown` is cancelled;
/// then reports NOT_SERVING, keeps accepting calls for
/// `options.shutdown_delay`, and drains for at most `options.grace`.
pub async fn serve(
    routes: Routes,
    mut options: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl speaks v1, many generated tools
    // (Python's grpcio-reflection among them) still speak v1alpha.
    // List only what this server serves, though the descriptors of the whole
    // contract are there to resolve.
    let reflection = || {
        options.service_names.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(trainingkeys_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health"),
            |builder, name| builder.with_service_name(*name),
        )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Readiness: the empty name, `readiness`, and each service's own.
    let names: Vec<&'static str> = ["", READINESS]
        .into_iter()
        .chain(options.service_names.iter().copied())
        .collect();
    health
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    // Readiness as the HTTP endpoint (`/readyz`) tells it too.
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let set_all = {
        let health = health.clone();
        let names = names.clone();
        let ready = ready.clone();
        move |status: ServingStatus| {
            let health = health.clone();
            let names = names.clone();
            ready.store(
                status == ServingStatus::Serving,
                std::sync::atomic::Ordering::Relaxed,
            );
            async move {
                for name in names {
                    health.set_service_status(name, status).await;
                }
            }
        }
    };
    set_all(ServingStatus::NotServing).await;

    // Readiness follows the database (once the migrations asked for are
    // applied) until shutdown starts. Until they are, calls are refused as
    // UNAVAILABLE `NOT_READY` (no call runs on a schema not yet made).
    let migrated = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
        options.prepared.pending.is_none(),
    ));
    let failed: std::sync::Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let readiness = tokio::spawn({
        let shutdown = shutdown.clone();
        let db = options.prepared.pool.clone();
        let mut pending = options.prepared.pending.take();
        let set_all = set_all.clone();
        let migrated = migrated.clone();
        let failed = failed.clone();
        async move {
            let mut last = None;
            loop {
                if let Some(migration) = &pending {
                    match crate::db::migrate(&db, &migration.schema, migration.migrator).await {
                        Ok(()) => {
                            tracing::info!("the database is back: migrations applied");
                            pending = None;
                            migrated.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        // The database answers, and still the migrations
                        // fail: they never will. Stop, as a start that
                        // migrated at once would have.
                        Err(error) if crate::db::is_reachable(&db).await => {
                            tracing::error!(
                                error = %format_args!("{error:#}"),
                                "the migrations failed with the database up: stopping"
                            );
                            *failed
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                                Some(format!("{error:#}"));
                            shutdown.cancel();
                            break;
                        }
                        Err(error) => tracing::warn!(
                            error = %format_args!("{error:#}"),
                            "migrations still wait for the database"
                        ),
                    }
                }
                let ok = pending.is_none() && crate::db::is_reachable(&db).await;
                if last != Some(ok) {
                    tracing::info!(serving = ok, "readiness changed");
                    set_all(if ok {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    })
                    .await;
                    last = Some(ok);
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(READINESS_INTERVAL) => {}
                }
            }
        }
    });

    let Prepared {
        listener,
        health_listener,
        metrics_listener,
        tls,
        auth,
        ..
    } = options.prepared;
    // Stops accepting calls: the shutdown delay after `shutdown`.
    let stop_accepting = CancellationToken::new();
    if let Some(metrics_listener) = metrics_listener {
        let addr = metrics_listener.local_addr()?;
        crate::metrics::serve(metrics_listener, ready, stop_accepting.clone());
        tracing::info!(%addr, "metrics and probes over HTTP: /metrics, /livez, /readyz");
    }
    if let Some(probe_listener) = health_listener {
        let addr = probe_listener.local_addr()?;
        let probes = Server::builder()
            .add_service(health_service.clone())
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(probe_listener),
                stop_accepting.clone().cancelled_owned(),
            );
        tokio::spawn(async move {
            if let Err(error) = probes.await {
                tracing::error!(%error, "the health port stopped");
            }
        });
        tracing::info!(%addr, "health checks (plaintext, for probes)");
    }
    auth.watch(options.reload_every, shutdown.clone());
    // HTTP/2 limits, set deliberately: a client opens at most
    // `max_concurrent_streams` calls per connection (each buffers at most one
    // small request frame, well inside h2's budget for small DATA frames,
    // half the 1 MiB connection window); h2's defaults against rapid resets
    // stay. A call that is not answered within `call_timeout` (a client that
    // never finishes sending it) ends, and gives its place back.
    let mut builder = Server::builder()
        .max_concurrent_streams(options.max_concurrent_streams)
        .timeout(options.call_timeout);
    if let Some(age) = options.max_connection_age {
        builder = builder.max_connection_age(jitter(age));
    }
    let local_addr = listener.local_addr()?;
    // Authentication first (a refused call never takes a place, and the
    // caller it establishes tells the shedding which calls come from this
    // project's services), then shedding.
    let router = builder
        .layer(crate::rpc::ServerLayer::new(auth.clone()))
        .layer(AuthLayer::new(auth))
        .layer(
            ShedLayer::new(
                options.max_in_flight,
                Duration::from_millis(SHED_RETRY_AFTER_MS),
            )
            .until(migrated),
        )
        .add_routes(
            routes
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha),
        );
    let stop = stop_accepting.clone().cancelled_owned();
    let mut server = match &tls {
        Some(tls) => {
            tls.watch(options.reload_every, shutdown.clone());
            tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener), stop))
        }
        None => tokio::spawn(
            router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop),
        ),
    };
    tracing::info!(%local_addr, "listening");

    tokio::select! {
        result = &mut server => {
            readiness.abort();
            return Ok(result??);
        }
        () = shutdown.cancelled() => {}
    }
    // A readiness check may be waiting (for a connection, or for another
    // replica's migration lock): shutdown does not wait for it.
    readiness.abort();
    let _ = readiness.await;
    set_all(ServingStatus::NotServing).await;
    if !options.shutdown_delay.is_zero() {
        tracing::info!(
            delay = ?options.shutdown_delay,
            "shutting down: NOT_SERVING, still accepting calls until load balancers stop sending"
        );
        tokio::select! {
            result = &mut server => return Ok(result??),
            () = tokio::time::sleep(options.shutdown_delay) => {}
        }
    }
    stop_accepting.cancel();
    tracing::info!(grace = ?options.grace, "shutting down: draining in-flight calls");
    match tokio::time::timeout(options.grace, &mut server).await {
        Ok(result) => result??,
        Err(_) => {
            tracing::warn!("grace period over: dropping the calls still in flight");
            server.abort();
        }
    }
    tracing::info!("stopped");
    match failed
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    {
        Some(error) => anyhow::bail!("migrations failed: {error}"),
        None => Ok(()),
    }
}

/// `age` plus up to 10 % random jitter, so connections made together do not
/// all close together.
fn jitter(age: Duration) -> Duration {
    let extra = age.as_millis() as u64 / 10;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    age + Duration::from_millis(if extra == 0 { 0 } else { nanos % extra })
}

/// A future that completes on Ctrl-C or SIGTERM, cancelling `token`.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("Ctrl-C received"),
            () = term => tracing::info!("SIGTERM received"),
        }
        token.cancel();
    });
}

/// A lazily-connecting channel to another service at `url`, with bounded
/// connect and call timeouts: `https://enrollment:50051` over `tls` (the
/// server's certificate must hold the URL's host name, and this process's
/// certificate is its client identity), or `http://...` when `tls` is
/// `None` (plaintext was configured). A scheme that disagrees with the
/// configuration is refused, so a typo never silently drops TLS.
pub fn channel(url: &str, call_timeout: Duration, tls: Option<&Tls>) -> anyhow::Result<Channel> {
    channel_at(url, None, call_timeout, tls)
}

/// [`channel`], dialing `at` (one of the URL host's addresses) when given;
/// the server is still checked by the URL's host name.
fn channel_at(
    url: &str,
    at: Option<std::net::SocketAddr>,
    call_timeout: Duration,
    tls: Option<&Tls>,
) -> anyhow::Result<Channel> {
    let origin: http::Uri = url.parse()?;
    let scheme = origin.scheme_str().unwrap_or_default();
    let host = origin.host().unwrap_or_default().to_owned();
    // What is dialed: the address, or the URL as given.
    let dialed = |scheme: &str| match at {
        Some(addr) => format!("{scheme}://{addr}"),
        None => url.replacen("https://", &format!("{scheme}://"), 1),
    };
    let endpoint = |url: String| -> anyhow::Result<Endpoint> {
        Ok(Endpoint::from_shared(url)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(call_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30)))
    };
    match tls {
        Some(tls) => {
            anyhow::ensure!(
                scheme == "https",
                "{url}: TLS is configured, so the URL must start with https://"
            );
            // The connector does the TLS. Tonic's own TLS would refuse an
            // https endpoint it was not configured for, so the endpoint it
            // dials is http, and the calls name the https origin.
            let dialed = endpoint(dialed("http"))?.origin(origin);
            let tls = tls.clone();
            let name = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            Ok(
                dialed.connect_with_connector_lazy(tower::service_fn(move |uri| {
                    let (tls, name) = (tls.clone(), name.clone());
                    async move { tls.connect(uri, Some(&name)).await }
                })),
            )
        }
        None => {
            anyhow::ensure!(
                scheme == "http",
                "{url}: PLAINTEXT=true, so the URL must start with http://"
            );
            Ok(endpoint(dialed("http"))?.connect_lazy())
        }
    }
}

/// How often a peer's DNS name is resolved again: about the TTL Kubernetes'
/// DNS gives a headless Service's records.
const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// A client of another service at `url` (see [`channel`]), every call
/// observed ([`crate::rpc::Client`]). When the URL names a host (a headless
/// Service: one DNS record per replica), its addresses are resolved every
/// few seconds and the calls are balanced over them one by one (the
/// replica with the fewest calls pending of two picked at random), so a
/// replica that joins gets calls at once and one that leaves gets none;
/// an IP address is called directly.
pub fn peer(
    url: &str,
    call_timeout: Duration,
    tls: Option<&Tls>,
) -> anyhow::Result<crate::rpc::Client> {
    let origin: http::Uri = url.parse()?;
    let host = origin
        .host()
        .ok_or_else(|| anyhow::anyhow!("{url} names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = origin
        .port_u16()
        .ok_or_else(|| anyhow::anyhow!("{url} names no port"))?;
    // Checked now, whatever the host.
    let direct = channel(url, call_timeout, tls)?;
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(crate::rpc::Client::new(direct));
    }
    let (changes, discovered) = tokio::sync::mpsc::channel(16);
    let url = url.to_owned();
    let tls = tls.cloned();
    tokio::spawn(resolve(host, port, changes, move |addr| {
        channel_at(&url, Some(addr), call_timeout, tls.as_ref())
    }));
    Ok(crate::rpc::Client::balanced(
        tokio_stream::wrappers::ReceiverStream::new(discovered),
        call_timeout,
    ))
}

/// A change to the set of a peer's addresses.
type Change = tower::discover::Change<std::net::SocketAddr, crate::rpc::Replica>;

/// Resolves `host:port` every [`RESOLVE_EVERY`] and sends the changes to
/// its addresses, until the balancer is gone. A failed or empty look-up
/// keeps the addresses known (a DNS hiccup must not empty the set).
async fn resolve(
    host: String,
    port: u16,
    changes: tokio::sync::mpsc::Sender<Result<Change, std::convert::Infallible>>,
    make: impl Fn(std::net::SocketAddr) -> anyhow::Result<Channel>,
) {
    let mut known = std::collections::BTreeSet::new();
    loop {
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(found) => {
                let found: std::collections::BTreeSet<_> = found.collect();
                for change in address_changes(&known, &found) {
                    let change = match change {
                        AddressChange::Add(addr) => match make(addr) {
                            Ok(channel) => tower::discover::Change::Insert(
                                addr,
                                crate::rpc::Replica::new(channel),
                            ),
                            Err(error) => {
                                tracing::warn!(%addr, error = %format_args!("{error:#}"), "a peer address could not be used");
                                continue;
                            }
                        },
                        AddressChange::Remove(addr) => tower::discover::Change::Remove(addr),
                    };
                    if changes.send(Ok(change)).await.is_err() {
                        return;
                    }
                }
                if !found.is_empty() {
                    known = found;
                }
            }
            Err(error) => {
                tracing::warn!(%host, %error, "a peer's name did not resolve; keeping its known addresses")
            }
        }
        tokio::select! {
            () = changes.closed() => return,
            () = tokio::time::sleep(RESOLVE_EVERY) => {}
        }
    }
}

/// One change between two sets of a peer's addresses.
#[derive(Debug, PartialEq, Eq)]
enum AddressChange {
    Add(std::net::SocketAddr),
    Remove(std::net::SocketAddr),
}

/// What turns `known` into `found`; nothing when `found` is empty (a
/// failed look-up is not a peer with no replicas).
fn address_changes(
    known: &std::collections::BTreeSet<std::net::SocketAddr>,
    found: &std::collections::BTreeSet<std::net::SocketAddr>,
) -> Vec<AddressChange> {
    if found.is_empty() {
        return Vec::new();
    }
    let added = found.difference(known).copied().map(AddressChange::Add);
    let removed = known.difference(found).copied().map(AddressChange::Remove);
    added.chain(removed).collect()
}

/// A free TCP port on 127.0.0.1 for a process a tool or test starts and
/// tells where to listen. Chosen below Linux's ephemeral range (32768 on),
/// so no outgoing connection can be holding it or take it meanwhile;
/// checked free by binding it. Another tool may still pick the same one
/// first, so a caller whose server fails to start picks again.
pub fn unused_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    let spread = std::process::id().wrapping_mul(7919);
    for _ in 0..COUNT {
        let offset = spread.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT;
        let Ok(port) = u16::try_from(FIRST + offset) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port below the ephemeral range",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_addresses_change_one_by_one_and_never_to_none() {
        let set = |ports: &[u16]| -> std::collections::BTreeSet<std::net::SocketAddr> {
            ports.iter().map(|p| ([10, 0, 0, 1], *p).into()).collect()
        };
        let addr = |p: u16| std::net::SocketAddr::from(([10, 0, 0, 1], p));
        assert_eq!(
            address_changes(&set(&[]), &set(&[1, 2])),
            vec![AddressChange::Add(addr(1)), AddressChange::Add(addr(2))]
        );
        assert_eq!(
            address_changes(&set(&[1, 2]), &set(&[2, 3])),
            vec![AddressChange::Add(addr(3)), AddressChange::Remove(addr(1))]
        );
        assert_eq!(address_changes(&set(&[1, 2]), &set(&[1, 2])), vec![]);
        assert_eq!(address_changes(&set(&[1, 2]), &set(&[])), vec![]);
    }
}
