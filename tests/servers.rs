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

/// Runs one command on the Redis at `url`, any topology (a single server,
/// Sentinel's primary, a Cluster: `trainingkeys_shared::redis::Topology`).
pub async fn command<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> redis::RedisResult<T> {
    let ca = url
        .starts_with("rediss")
        .then(|| std::fs::read(crate::pki::pki().ca_file()).expect("the test CA"));
    let redis =
        trainingkeys_shared::redis::Redis::new(url, Duration::from_secs(2), ca).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "bad URL",
                e.to_string(),
            ))
        })?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    redis
        .run("test", |mut c| async move { cmd.query_async(&mut c).await })
        .await
        .map_err(|e| match e {
            trainingkeys_shared::redis::RedisUnavailable::Failed(e) => e,
            other => redis::RedisError::from(std::io::Error::other(other.to_string())),
        })
}

/// Starts `redis-server` with `args` (plus loopback, no persistence, in the
/// temporary directory); the process.
fn redis_process(args: &[String]) -> Child {
    // Never a data file another server left: a node must start empty.
    static NODE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let node = NODE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = format!("trainingkeys-node-{}-{node}.rdb", std::process::id());
    let _ = std::fs::remove_file(std::env::temp_dir().join(&file));
    Command::new("redis-server")
        .args(args)
        .args(["--dbfilename", &file])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (make test installs it)")
}

/// The cluster state file of the node on `port`, fresh: this process's own
/// (a file left by an earlier run would make the node "not empty").
fn cluster_file(port: u16) -> String {
    let name = format!("trainingkeys-cluster-{}-{port}.conf", std::process::id());
    let _ = std::fs::remove_file(std::env::temp_dir().join(&name));
    name
}

/// A Redis Cluster of three primaries, each with a replica, from
/// `redis-server --cluster-enabled yes` processes on loopback, killed on drop.
pub struct RedisCluster {
    /// Every node's port.
    pub ports: Vec<u16>,
    processes: Vec<Process>,
}

impl RedisCluster {
    /// Starts the six nodes, joins them (`redis-cli --cluster create`), and
    /// waits until every node says the cluster is ok. Parallel tests may
    /// take a chosen port first: then it starts again on other ports.
    pub async fn start() -> Self {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start().await {
                Ok(cluster) => return cluster,
                Err(why) => failures.push(why),
            }
        }
        panic!("the Redis Cluster did not start: {failures:#?}");
    }

    async fn try_start() -> Result<Self, String> {
        let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
        let processes: Vec<Process> = ports
            .iter()
            .map(|port| {
                let process = Process::default();
                process.set(redis_process(&[
                    "--port".into(),
                    port.to_string(),
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-port".into(),
                    free_port().to_string(),
                    "--cluster-config-file".into(),
                    cluster_file(*port),
                    "--cluster-node-timeout".into(),
                    "1000".into(),
                ]));
                process
            })
            .collect();
        // Dropped on failure: the nodes are killed.
        let cluster = Self { ports, processes };
        for (i, port) in cluster.ports.iter().enumerate() {
            let url = format!("redis://127.0.0.1:{port}/");
            let up = crate::eventually(Duration::from_secs(10), || {
                let url = url.clone();
                async move { command::<String>(&url, &["PING"]).await.is_ok() }
            })
            .await;
            if !up || !cluster.processes[i].running() {
                return Err(format!("node {port} did not start"));
            }
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed");
        if !created.status.success() {
            return Err(format!(
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&created.stdout),
                String::from_utf8_lossy(&created.stderr)
            ));
        }
        cluster.wait_ok().await;
        Ok(cluster)
    }

    /// `redis+cluster://` over every node.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}/", nodes.join(","))
    }

    /// Waits until every live node reports `cluster_state:ok` and agrees on
    /// three primaries with their slots.
    pub async fn wait_ok(&self) {
        let ok = crate::eventually(Duration::from_secs(30), || async {
            for (i, port) in self.ports.iter().enumerate() {
                if !self.processes[i].running() {
                    continue;
                }
                let info: String =
                    command(&format!("redis://127.0.0.1:{port}/"), &["CLUSTER", "INFO"])
                        .await
                        .unwrap_or_default();
                if !info.contains("cluster_state:ok") {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(ok, "the cluster did not become ok");
    }

    /// The port of the primary that serves `key`'s slot, and its replicas'.
    pub async fn owner_of(&self, key: &str) -> (u16, Vec<u16>) {
        let (i, port) = self
            .ports
            .iter()
            .enumerate()
            .find(|(i, _)| self.processes[*i].running())
            .expect("a live node");
        let _ = i;
        let url = format!("redis://127.0.0.1:{port}/");
        let slot: i64 = command(&url, &["CLUSTER", "KEYSLOT", key]).await.unwrap();
        let nodes: String = command(&url, &["CLUSTER", "NODES"]).await.unwrap();
        // <id> <ip:port@bus> <flags> <primary id> ... <slots...>
        let lines: Vec<Vec<&str>> = nodes.lines().map(|l| l.split(' ').collect()).collect();
        let port_of = |fields: &Vec<&str>| -> u16 {
            fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        };
        let owner = lines
            .iter()
            .find(|f| {
                f[2].contains("master")
                    && !f[2].contains("fail")
                    && f[8..].iter().any(|range| {
                        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                        match (lo.parse::<i64>(), hi.parse::<i64>()) {
                            (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                            _ => false,
                        }
                    })
            })
            .expect("a primary serves every slot");
        let replicas = lines
            .iter()
            .filter(|f| f[3] == owner[0] && !f[2].contains("fail"))
            .map(port_of)
            .collect();
        (port_of(owner), replicas)
    }

    /// `CLUSTER FAILOVER` on `replica`: it takes its primary's place, in an
    /// orderly way.
    pub async fn fail_over_to(&self, replica: u16) {
        let _: String = command(
            &format!("redis://127.0.0.1:{replica}/"),
            &["CLUSTER", "FAILOVER"],
        )
        .await
        .unwrap();
    }

    /// Kills the node on `port` (SIGKILL): its replica is elected in its place.
    pub fn kill(&self, port: u16) {
        if let Some(i) = self.ports.iter().position(|p| *p == port) {
            self.processes[i].kill();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (process, port) in self.processes.iter().zip(&self.ports) {
            process.kill();
            let _ = std::fs::remove_file(std::env::temp_dir().join(cluster_file(*port)));
        }
    }
}

/// A primary, its replica and three Sentinels watching them (quorum two),
/// on loopback, killed on drop.
pub struct RedisSentinel {
    /// The first primary's port.
    pub primary: u16,
    /// The replica's port.
    pub replica: u16,
    sentinels: Vec<u16>,
    processes: Vec<Process>,
    configs: Vec<std::path::PathBuf>,
}

/// The name the Sentinels know the primary by.
pub const SENTINEL_PRIMARY: &str = "gate";

impl RedisSentinel {
    /// Starts them and waits until every Sentinel knows the primary and its
    /// replica.
    pub async fn start() -> Self {
        let (primary, replica) = (free_port(), free_port());
        let sentinels: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let processes = vec![Process::default(), Process::default()];
        processes[0].set(redis_process(&["--port".into(), primary.to_string()]));
        processes[1].set(redis_process(&[
            "--port".into(),
            replica.to_string(),
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.to_string(),
        ]));
        let mut this = Self {
            primary,
            replica,
            sentinels: sentinels.clone(),
            processes,
            configs: Vec::new(),
        };
        for port in &sentinels {
            let config = std::env::temp_dir().join(format!("trainingkeys-sentinel-{port}.conf"));
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\nsentinel monitor {SENTINEL_PRIMARY} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_PRIMARY} 1000\n\
                     sentinel failover-timeout {SENTINEL_PRIMARY} 4000\n"
                ),
            )
            .unwrap();
            let process = Process::default();
            process.set(
                Command::new("redis-server")
                    .arg(&config)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server must be installed"),
            );
            this.processes.push(process);
            this.configs.push(config);
        }
        let replica_url = format!("redis://127.0.0.1:{replica}/");
        let synced = crate::eventually(Duration::from_secs(20), || async {
            let info: String = command(&replica_url, &["INFO", "replication"])
                .await
                .unwrap_or_default();
            if !info.contains("master_link_status:up") {
                return false;
            }
            for port in &this.sentinels {
                let url = format!("redis://127.0.0.1:{port}/");
                let replicas: redis::Value =
                    match command(&url, &["SENTINEL", "REPLICAS", SENTINEL_PRIMARY]).await {
                        Ok(v) => v,
                        Err(_) => return false,
                    };
                if !matches!(&replicas, redis::Value::Array(a) if !a.is_empty()) {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(
            synced,
            "the Sentinels never saw the primary and its replica"
        );
        this
    }

    /// `redis+sentinel://` over the three Sentinels.
    pub fn url(&self) -> String {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!(
            "redis+sentinel://{}/{SENTINEL_PRIMARY}",
            sentinels.join(",")
        )
    }

    /// Kills the first primary (SIGKILL): the Sentinels promote the
    /// replica. Whether it was still running.
    pub fn kill_primary(&self) -> bool {
        let running = self.processes[0].running();
        self.processes[0].kill();
        running
    }

    /// Waits until the Sentinels name the replica as the primary.
    pub async fn wait_promoted(&self) -> bool {
        let url = format!("redis://127.0.0.1:{}/", self.sentinels[0]);
        let replica = self.replica.to_string();
        crate::eventually(Duration::from_secs(30), || async {
            let addr: Vec<String> = command(
                &url,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_PRIMARY],
            )
            .await
            .unwrap_or_default();
            addr.get(1) == Some(&replica)
        })
        .await
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for process in &self.processes {
            process.kill();
        }
        for config in &self.configs {
            let _ = std::fs::remove_file(config);
        }
    }
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
