//! The throwaway processes a [`TestApp`](crate::TestApp) runs beside the
//! services: a `redis-server` of its own (so a test can flush, stop or
//! restart it) and haproxy in front of the redemption replicas.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process, killed (and reaped) when stopped or replaced.
#[derive(Default)]
struct Process(std::sync::Mutex<Option<Child>>);

impl Process {
    fn kill(&self) {
        if let Some(mut child) = self.0.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn set(&self, child: Child) {
        *self.0.lock().unwrap() = Some(child);
    }

    fn id(&self) -> Option<u32> {
        self.0.lock().unwrap().as_ref().map(Child::id)
    }

    /// Whether the process is still running (one that failed to bind its
    /// port has exited, even if another test's server answers there).
    fn running(&self) -> bool {
        self.0
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }
}

/// A throwaway `redis-server` on a free port, killed on drop.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    /// Serves TLS only (`rediss://`), with the test PKI's `redis` certificate.
    tls: bool,
    process: Process,
}

/// A free port below the ephemeral range (see `unused_port`).
fn free_port() -> u16 {
    trainingkeys_shared::server::unused_port().expect("a free port")
}

/// Attempts at starting a server, each on a newly picked port (parallel
/// tests may pick the same free port at the same moment).
const START_ATTEMPTS: usize = 5;

impl RedisServer {
    /// Starts one and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// Starts one that speaks TLS only, and waits until it answers.
    pub async fn start_tls() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Self {
        for _ in 0..START_ATTEMPTS {
            let server = Self {
                port: free_port(),
                tls,
                process: Process::default(),
            };
            if server.start_process(false).await {
                return server;
            }
        }
        panic!("redis-server did not start");
    }

    /// `redis://127.0.0.1:port/` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// Kills it with SIGKILL (all state is lost: it never persists).
    pub fn kill(&self) {
        self.process.kill();
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the server process.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.process.id() {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// The file [`snapshot`](Self::snapshot) writes.
    fn snapshot_file(&self) -> String {
        format!("trainingkeys-redis-{}.rdb", self.port)
    }

    /// Saves the data set now (as a replica would hold it).
    pub async fn snapshot(&self) {
        let _: String = self.cmd(&["SAVE"]).await.unwrap();
    }

    /// Kills the server and starts it from the last snapshot: a replica that
    /// missed every write since, promoted in its place.
    pub async fn fail_over_to_stale_replica(&self) {
        assert!(self.start_process(true).await, "redis-server did not start");
    }

    /// Starts it again, empty, on the same port.
    pub async fn restart(&self) {
        assert!(
            self.start_process(false).await,
            "redis-server did not start"
        );
    }

    /// Starts the process on this server's port; whether it came up.
    async fn start_process(&self, from_snapshot: bool) -> bool {
        self.kill();
        let dir = std::env::temp_dir();
        if !from_snapshot {
            let _ = std::fs::remove_file(dir.join(self.snapshot_file()));
        }
        let port = self.port.to_string();
        let dir = dir.to_string_lossy().into_owned();
        let file = self.snapshot_file();
        let pki = crate::pki::pki();
        let (cert, key) = pki.files("redis");
        let (cert, key, ca) = (
            cert.display().to_string(),
            key.display().to_string(),
            pki.ca_file().display().to_string(),
        );
        let listen: Vec<&str> = if self.tls {
            vec![
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                "no",
            ]
        } else {
            vec!["--port", &port]
        };
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &dir, "--dbfilename", &file])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (make test installs it)");
        self.process.set(child);
        let url = self.url();
        let answers = crate::eventually(Duration::from_secs(10), || {
            let url = url.clone();
            async move { self::command::<String>(&url, &["PING"]).await.is_ok() }
        })
        .await;
        answers && self.process.running()
    }

    /// Runs one command.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        command(&self.url(), args).await
    }
}

async fn command<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> redis::RedisResult<T> {
    let client = if url.starts_with("rediss://") {
        let ca = std::fs::read(crate::pki::pki().ca_file()).expect("the test CA");
        redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            },
        )?
    } else {
        redis::Client::open(url)?
    };
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(std::env::temp_dir().join(self.snapshot_file()));
    }
}

/// haproxy in front of the redemption replicas: HTTP/2 both ways, balanced
/// per request, as in production behind a load balancer. Killed on drop.
pub struct LoadBalancer {
    /// Its port.
    pub port: u16,
    config: std::path::PathBuf,
    process: Process,
}

impl LoadBalancer {
    /// Starts haproxy over `replicas` and waits until it listens.
    pub async fn start(replicas: &[std::net::SocketAddr]) -> Self {
        Self::start_with(replicas, None).await
    }

    /// Starts haproxy over `replicas`, sending calls only to those whose
    /// readiness (`GET /readyz` on the matching address of `probes`, checked
    /// every 100 ms) says ready, as a load balancer in production does. It
    /// never retries a call on another replica (as Kubernetes' Service
    /// routing does not): a replica that stops listening before it is out
    /// of rotation fails calls.
    pub async fn start_checked(
        replicas: &[std::net::SocketAddr],
        probes: &[std::net::SocketAddr],
    ) -> Self {
        Self::start_with(replicas, Some(probes)).await
    }

    async fn start_with(
        replicas: &[std::net::SocketAddr],
        probes: Option<&[std::net::SocketAddr]>,
    ) -> Self {
        let pki = crate::pki::pki();
        let ca = pki.ca_file().display().to_string();
        let crt = pki
            .dir
            .join("load-balancer-bundle.pem")
            .display()
            .to_string();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let servers: String = replicas
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let check = probes.map_or(String::new(), |probes| {
                        format!(
                            " check no-check-ssl addr {} port {} inter 100ms fall 1 rise 1",
                            probes[i].ip(),
                            probes[i].port()
                        )
                    });
                    format!("  server r{i} {a} ssl verify required ca-file {ca} alpn h2{check}\n")
                })
                .collect();
            let checks = if probes.is_some() {
                "  option httpchk GET /readyz\n  retries 0\n"
            } else {
                ""
            };
            let config = std::env::temp_dir().join(format!("trainingkeys-lb-{port}.cfg"));
            std::fs::write(
                &config,
                format!(
                    "global\n  maxconn 4000\ndefaults\n  mode http\n  option forwardfor\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n\
                     frontend redemption\n  bind 127.0.0.1:{port} ssl crt {crt} alpn h2\n  default_backend replicas\nbackend replicas\n  balance roundrobin\n{checks}{servers}"
                ),
            )
            .unwrap();
            let lb = Self {
                port,
                config,
                process: Process::default(),
            };
            if lb.start_process().await {
                return lb;
            }
        }
        panic!("haproxy did not start");
    }

    /// `https://127.0.0.1:port` (haproxy terminates TLS with the
    /// load-balancer certificate and calls the replicas over TLS).
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Kills it (connections through it break).
    pub fn kill(&self) {
        self.process.kill();
    }

    /// Starts it again on the same port.
    pub async fn restart(&self) {
        assert!(self.start_process().await, "haproxy did not start");
    }

    /// Starts haproxy on this balancer's port; whether it came up.
    async fn start_process(&self) -> bool {
        self.kill();
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&self.config)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy must be installed (make test installs it)");
        self.process.set(child);
        let port = self.port;
        let listens = crate::eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        listens && self.process.running()
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}
