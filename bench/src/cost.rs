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
    /// Commands Redis processed (those run inside scripts included).
    redis: i64,
    /// Scripts Redis ran (`EVALSHA`/`EVAL` calls: one round trip each).
    scripts: i64,
    /// Calls per statement text.
    by_statement: BTreeMap<String, i64>,
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
        // One line per statement: calls, a tab, its text on one line.
        let rows = self
            .psql(
                "SELECT sum(calls)::bigint || E'\t' || regexp_replace(query, '\\s+', ' ', 'g')
                 FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND query NOT LIKE '%pg_stat_statements%'
                 GROUP BY query",
            )
            .unwrap_or_default();
        let by_statement: BTreeMap<String, i64> = rows
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(calls, query)| (query.to_owned(), calls.parse().unwrap_or(0)))
            .collect();
        let (redis, scripts) = self.redis_commands().unwrap_or((0, 0));
        Snapshot {
            cpu: cpu_seconds(),
            statements: by_statement.values().sum(),
            commits: by_statement
                .iter()
                .filter(|(q, _)| q.to_ascii_uppercase().starts_with("COMMIT"))
                .map(|(_, n)| n)
                .sum(),
            redis,
            scripts,
            by_statement,
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

    /// Commands processed, and script calls (round trips that ran a script).
    fn redis_commands(&self) -> anyhow::Result<(i64, i64)> {
        let info = |section: &str| -> anyhow::Result<String> {
            let out = Command::new("redis-cli")
                .args(["-u", &self.redis_url, "INFO", section])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let total = info("stats")?
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no total_commands_processed in INFO stats"))?;
        // cmdstat_evalsha:calls=123,usec=...
        let scripts = info("commandstats")?
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split_once("calls=")?
                    .1
                    .split(',')
                    .next()?
                    .parse::<i64>()
                    .ok()
            })
            .sum();
        Ok((total, scripts))
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
        "CPU ms per answer: {line}total {total:.3}; PostgreSQL statements {:.2}, commits {:.2}; Redis script calls {:.2}, commands {:.2} (inside scripts included)",
        (after.statements - before.statements) as f64 / n,
        (after.commits - before.commits) as f64 / n,
        (after.scripts - before.scripts) as f64 / n,
        (after.redis - before.redis) as f64 / n,
    )
}

/// The statements run most between two snapshots, per answer: where the
/// database time of a scenario goes.
pub fn top_statements(before: &Snapshot, after: &Snapshot, answers: usize, top: usize) -> String {
    let n = answers.max(1) as f64;
    let mut ran: Vec<(i64, &String)> = after
        .by_statement
        .iter()
        .map(|(q, calls)| (calls - before.by_statement.get(q).unwrap_or(&0), q))
        .filter(|(calls, _)| *calls > 0)
        .collect();
    ran.sort_by_key(|r| std::cmp::Reverse(r.0));
    ran.iter()
        .take(top)
        .map(|(calls, q)| {
            let short: String = q.chars().take(90).collect();
            format!("      {:.2} x {short}\n", *calls as f64 / n)
        })
        .collect()
}
