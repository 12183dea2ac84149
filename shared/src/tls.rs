//! TLS for every gRPC server and client of this project, with rustls (ring).
//!
//! - A process presents one certificate (`TLS_CERT_FILE`, `TLS_KEY_FILE`):
//!   as a server to its callers, and as a client to the services it calls,
//!   so its peers know which service is calling (mutual TLS).
//! - `TLS_CA_FILE` verifies both directions: the servers this process calls,
//!   and the client certificates its callers present. A client certificate
//!   is optional (a platform service may authenticate with a bearer token
//!   alone); when one is presented it must verify, and its DNS names are the
//!   caller's service identity (`auth::Authenticator::service_of`).
//! - The three files are re-read every `TLS_RELOAD_SECONDS`; a change takes
//!   effect for new connections without a restart, and a bad file keeps the
//!   previous certificates (and logs why).
//! - Plaintext is possible only when `PLAINTEXT=true` is set explicitly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_util::sync::CancellationToken;

/// How long a connection may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings, shared by every service.
#[derive(Clone, Debug, clap::Args)]
pub struct TlsConfig {
    /// PEM certificate chain this process presents, as a server and as a
    /// client of the other services. Required unless PLAINTEXT=true.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// PEM CA bundle that verifies the services this process calls and the
    /// client certificates its callers present.
    #[arg(long, env = "TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,

    /// Seconds between checks of the three files; a change applies to new
    /// connections without a restart.
    #[arg(long, env = "TLS_RELOAD_SECONDS", default_value_t = 10)]
    pub tls_reload_seconds: u64,

    /// Serve and call gRPC without TLS. Only when set explicitly, for a
    /// service mesh that terminates TLS itself or local experiments.
    #[arg(long, env = "PLAINTEXT", default_value_t = false, action = clap::ArgAction::Set)]
    pub plaintext: bool,
}

/// The live TLS configuration of a process: cheap to clone, reloaded in
/// place by [`watch`](Self::watch).
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    server: ArcSwap<rustls::ServerConfig>,
    client: ArcSwap<rustls::ClientConfig>,
    /// The files' contents the configs were built from.
    loaded: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.inner.cert)
            .field("ca", &self.inner.ca)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// The TLS of this configuration, or `None` when plaintext was asked for.
    /// Fails, naming the missing setting, when neither is configured.
    pub fn load(&self) -> anyhow::Result<Option<Tls>> {
        if self.plaintext {
            anyhow::ensure!(
                self.tls_cert_file.is_none(),
                "PLAINTEXT=true and TLS_CERT_FILE are both set: choose one"
            );
            return Ok(None);
        }
        let (Some(cert), Some(key), Some(ca)) = (
            self.tls_cert_file.clone(),
            self.tls_key_file.clone(),
            self.tls_ca_file.clone(),
        ) else {
            anyhow::bail!(
                "TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE are required \
                 (or PLAINTEXT=true to run without TLS)"
            );
        };
        Tls::from_files(cert, key, ca).map(Some)
    }
}

impl Tls {
    /// Reads and checks the three files.
    pub fn from_files(cert: PathBuf, key: PathBuf, ca: PathBuf) -> anyhow::Result<Self> {
        let contents = read_all(&[&cert, &key, &ca])?;
        let (server, client) = build(&contents)?;
        Ok(Self {
            inner: Arc::new(Inner {
                cert,
                key,
                ca,
                server: ArcSwap::from_pointee(server),
                client: ArcSwap::from_pointee(client),
                loaded: std::sync::Mutex::new(contents),
            }),
        })
    }

    /// Re-reads the files every `every` until `stop`, swapping in new
    /// configurations when they change.
    pub fn watch(&self, every: Duration, stop: CancellationToken) {
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                if let Err(error) = tls.reload() {
                    tracing::warn!(error = %format!("{error:#}"), "TLS files not reloaded; keeping the previous ones");
                }
            }
        });
    }

    /// Re-reads the files now; true when they had changed and were applied.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let inner = &self.inner;
        let contents = read_all(&[&inner.cert, &inner.key, &inner.ca])?;
        let mut loaded = inner
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *loaded == contents {
            return Ok(false);
        }
        let (server, client) = build(&contents)?;
        inner.server.store(Arc::new(server));
        inner.client.store(Arc::new(client));
        *loaded = contents;
        tracing::info!(cert = %inner.cert.display(), "TLS certificates reloaded");
        Ok(true)
    }

    /// The current client configuration (for tools and tests that dial).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.inner.client.load_full()
    }

    /// Accepts TCP connections on `listener` and hands on those that finish
    /// a TLS handshake, each with the configuration current when it
    /// connected. Handshakes run concurrently, so a slow one delays no
    /// other. Stops (closing the listener) when the stream is dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(256);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = sender.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, remote) = match accepted {
                    Ok(connection) => connection,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.inner.server.load_full());
                let sender = sender.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = sender.send(Ok(stream)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%remote, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(receiver)
    }

    /// Dials `uri` over TLS with the current client configuration,
    /// verifying the server's name against `name`, or else the URI's host
    /// (a peer dialed at one of its addresses is still checked by its name).
    pub async fn connect(
        &self,
        uri: http::Uri,
        name: Option<&str>,
    ) -> std::io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
        let host = uri
            .host()
            .ok_or_else(|| invalid(format!("{uri} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let tcp = TcpStream::connect((host.as_str(), port)).await?;
        tcp.set_nodelay(true)?;
        let name = name.map_or(host, str::to_owned);
        let name = ServerName::try_from(name).map_err(|e| invalid(e.to_string()))?;
        let stream = TlsConnector::from(self.client_config())
            .connect(name, tcp)
            .await?;
        Ok(hyper_util::rt::TokioIo::new(stream))
    }
}

/// Installs ring as the process's rustls provider (for the PostgreSQL,
/// Redis and OTLP clients, which use the process default). Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_all(paths: &[&PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    paths
        .iter()
        .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
        .collect()
}

/// The server and client configurations from (cert, key, CA) contents.
fn build(contents: &[Vec<u8>]) -> anyhow::Result<(rustls::ServerConfig, rustls::ClientConfig)> {
    let [cert, key, ca] = contents else {
        anyhow::bail!("three files expected");
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .context("TLS_CERT_FILE is not a PEM certificate chain")?;
    anyhow::ensure!(!chain.is_empty(), "TLS_CERT_FILE holds no certificate");
    let key =
        PrivateKeyDer::from_pem_slice(key).context("TLS_KEY_FILE is not a PEM private key")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca) {
        roots
            .add(ca.context("TLS_CA_FILE is not a PEM certificate bundle")?)
            .context("TLS_CA_FILE holds an unusable certificate")?;
    }
    anyhow::ensure!(!roots.is_empty(), "TLS_CA_FILE holds no certificate");
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("building the client-certificate verifier")?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .context("TLS_KEY_FILE does not match TLS_CERT_FILE")?;
    server.alpn_protocols = vec![b"h2".to_vec()];

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("TLS_KEY_FILE does not match TLS_CERT_FILE")?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok((server, client))
}
