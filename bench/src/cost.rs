//! What a scenario cost, per answer: CPU milliseconds of every process
//! (from `/proc/<pid>/stat`: the load generator itself, each service,
//! PostgreSQL's backends and Redis), PostgreSQL statements and explicit
//! transactions (`pg_stat_statements` deltas for the database), and Redis
//! commands (`INFO stats`). Read before and after a scenario; the difference
//! divided by its answers is the breakdown `make bench` prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;

/// The processes whose CPU is counted, by their `comm` name.
const PROCESSES: [&str; 6] = [
    "loadgen",
    "redemption",
    "enrollment",
    "key-issuance",
    "postgres",
    "redis-server",
];

/// Counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// CPU seconds (user + system) by process name, summed over its processes.
    cpu: BTreeMap<&'static str, f64>,
    /// Statements run on the database (all schemas).
    statements: i64,
    /// Explicit transactions committed (`COMMIT` statements).
    commits: i64,
    /// Commands Redis processed.
    redis: i64,
}

impl Snapshot {
    /// Statements run since `before`.
    pub fn statements_since(&self, before: &Snapshot) -> i64 {
        self.statements - before.statements
    }
}

/// Where the counters are read from.
pub struct Meter {
    database_url: String,
    redis_url: String,
}

impl Meter {
    /// A meter over the bench's database and Redis; makes sure
    /// `pg_stat_statements` can be read (PostgreSQL must preload it, as
    /// `scripts/env.sh` starts it).
    pub fn new(database_url: &str, redis_url: &str) -> Self {
        let meter = Self {
            database_url: database_url.to_owned(),
            redis_url: redis_url.to_owned(),
        };
        if let Err(e) = meter.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements") {
            eprintln!("pg_stat_statements unavailable, statement counts will read 0: {e:#}");
        }
        meter
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let counts = self
            .psql(
                "SELECT coalesce(sum(calls), 0)::bigint || ' ' ||
                        coalesce(sum(calls) FILTER (WHERE query ILIKE 'COMMIT%'), 0)::bigint
                 FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND query NOT LIKE '%pg_stat_statements%'",
            )
            .unwrap_or_default();
        let mut counts = counts.split_whitespace().map(|n| n.parse().unwrap_or(0));
        Snapshot {
            cpu: cpu_seconds(),
            statements: counts.next().unwrap_or(0),
            commits: counts.next().unwrap_or(0),
            redis: self.redis_commands().unwrap_or(0),
        }
    }

    fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new("psql")
            .args(["-qAtX", "-d", &self.database_url, "-c", sql])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn redis_commands(&self) -> anyhow::Result<i64> {
        let out = Command::new("redis-cli")
            .args(["-u", &self.redis_url, "INFO", "stats"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no total_commands_processed in INFO stats"))
    }
}

/// CPU seconds of the counted processes, by name.
fn cpu_seconds() -> BTreeMap<&'static str, f64> {
    // Clock ticks per second: 100 on every Linux this runs on.
    const TICKS: f64 = 100.0;
    let mut cpu: BTreeMap<&'static str, f64> = PROCESSES.iter().map(|p| (*p, 0.0)).collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return cpu;
    };
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... utime stime: fields 14 and 15, counted after
        // the closing parenthesis (a comm may hold spaces).
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let Some(name) = PROCESSES.iter().find(|p| comm == **p) else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|n| n.parse::<f64>().ok()).sum())
            .unwrap_or(0.0);
        *cpu.entry(name).or_default() += ticks / TICKS;
    }
    cpu
}

/// One line of what a scenario cost per answer: CPU ms by process, and
/// PostgreSQL statements, commits and Redis commands.
pub fn per_answer(before: &Snapshot, after: &Snapshot, answers: usize) -> String {
    let n = answers.max(1) as f64;
    let mut line = String::new();
    let mut total = 0.0;
    for (name, secs) in &after.cpu {
        let ms = (secs - before.cpu.get(name).unwrap_or(&0.0)) * 1000.0 / n;
        total += ms;
        let _ = write!(line, "{name} {ms:.3}, ");
    }
    format!(
        "CPU ms per answer: {line}total {total:.3}; PostgreSQL statements {:.2}, commits {:.2}; Redis commands {:.2}",
        (after.statements - before.statements) as f64 / n,
        (after.commits - before.commits) as f64 / n,
        (after.redis - before.redis) as f64 / n,
    )
}
