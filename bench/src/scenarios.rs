//! The benchmark scenarios and their references, and the `bench` run that
//! measures them side by side and writes a markdown table.

use std::fmt::Write as _;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use futures::FutureExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use trainingkeys_proto::v1 as pb;
use trainingkeys_proto::v1::redeem_key_request::Redeemer;
use trainingkeys_proto::v1::redemption_service_client::RedemptionServiceClient;

use crate::LoadArgs;
use crate::cost::{Meter, Snapshot, per_answer, top_statements};
use crate::load::{self, Call, Report, failed};
use crate::setup::Admin;

/// Health/Check: the ceiling for any gRPC call on this stack.
pub async fn noop(target: &str, load: &LoadArgs) -> anyhow::Result<Report> {
    let channels = load::channels(target, load.connections)?;
    let call: Call = Arc::new(|_, channel| {
        async move {
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| ())
                .map_err(|s| failed(&s))
        }
        .boxed()
    });
    Ok(load::run(&channels, load.requests, load.arrival(), call).await)
}

/// ValidateKey of one code.
pub async fn validate(target: &str, load: &LoadArgs, code: String) -> anyhow::Result<Report> {
    let channels = load::channels(target, load.connections)?;
    let call: Call = Arc::new(move |_, channel| {
        let request = pb::ValidateKeyRequest {
            code: code.clone(),
            user_id: String::new(),
        };
        async move {
            RedemptionServiceClient::new(channel)
                .validate_key(request)
                .await
                .map(|_| ())
                .map_err(|s| failed(&s))
        }
        .boxed()
    });
    Ok(load::run(&channels, load.requests, load.arrival(), call).await)
}

/// Redemptions where request `i` is made by `users[i % len]` of `codes[i % len]`.
/// Each behaves as a client should: a retryable answer (UNAVAILABLE, with
/// its RetryInfo delay when it has one) or a transport error is retried
/// with the same request and idempotency key, until a definitive answer.
async fn redeem(
    target: &str,
    load: &LoadArgs,
    codes: Vec<String>,
    users: Vec<String>,
) -> anyhow::Result<Report> {
    let channels = load::channels(target, load.connections)?;
    let (codes, users) = (Arc::new(codes), Arc::new(users));
    let retries = Arc::new(AtomicUsize::new(0));
    let resets = Arc::new(AtomicUsize::new(0));
    let counters = (retries.clone(), resets.clone());
    let call: Call = Arc::new(move |i, channel| {
        let request = pb::RedeemKeyRequest {
            code: codes[i % codes.len()].clone(),
            redeemer: Some(Redeemer::UserId(users[i % users.len()].clone())),
            idempotency_key: uuid::Uuid::new_v4().to_string(),
        };
        let (retries, resets) = counters.clone();
        async move {
            let mut client = RedemptionServiceClient::new(channel);
            for attempt in 0.. {
                let status = match client.redeem_key(request.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(status) => status,
                };
                let (code, reason) = failed(&status);
                // No ErrorInfo: not this service's answer but the transport's
                // (a reset or refused stream, a connection going away).
                let transport = reason.is_empty()
                    && matches!(
                        code,
                        tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::Cancelled
                            | tonic::Code::Internal
                    );
                if attempt >= 100 || !(code == tonic::Code::Unavailable || transport) {
                    return Err((code, reason));
                }
                retries.fetch_add(1, Ordering::Relaxed);
                if transport && resets.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("transport error, retried: {status:?}");
                }
                let delay = tonic_types::StatusExt::get_details_retry_info(&status)
                    .and_then(|r| r.retry_delay)
                    .unwrap_or(std::time::Duration::from_millis(100));
                tokio::time::sleep(delay).await;
            }
            unreachable!("the loop returns")
        }
        .boxed()
    });
    let mut report = load::run(&channels, load.requests, load.arrival(), call).await;
    report.retries = retries.load(Ordering::Relaxed);
    report.resets = resets.load(Ordering::Relaxed);
    Ok(report)
}

/// A herd's figures.
pub struct Herd {
    pub report: Report,
    pub enrolled: i32,
    pub code: String,
    /// The cost counters once the class and students were made.
    pub before: Snapshot,
}

/// `load.requests` distinct students redeem the new event key of a class of `max`.
pub async fn herd(
    admin: &Admin,
    target: &str,
    load: &LoadArgs,
    max: i32,
    meter: Option<&Meter>,
) -> anyhow::Result<Herd> {
    let (class_id, code) = admin.class_with_event_key(max).await?;
    let students = admin.students(load.requests).await?;
    let before = meter.map(Meter::snapshot).unwrap_or_default();
    let report = redeem(target, load, vec![code.clone()], students).await?;
    let enrolled = admin.enrolled(&class_id).await?;
    Ok(Herd {
        report,
        enrolled,
        code,
        before,
    })
}

/// Options of the full benchmark run.
#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    targets: crate::Targets,
    /// A redemption replica with the Redis gate switched off (PostgreSQL guard only).
    #[arg(
        long,
        env = "REDEMPTION_NO_GATE_URL",
        default_value = "https://127.0.0.1:50054"
    )]
    no_gate: String,
    /// The database (for the pgbench reference).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Redis (for the redis-benchmark reference).
    #[arg(long, env = "REDIS_URL")]
    redis_url: String,
    /// Where to write the markdown table.
    #[arg(long, default_value = "bench/results.md")]
    out: String,
    /// Students per herd.
    #[arg(long, default_value_t = 5000)]
    students: usize,
    /// Requests per throughput scenario.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Students in the burst bigger than the machine.
    #[arg(long, default_value_t = 50_000)]
    burst: usize,
}

/// One row of the results table.
struct Row {
    scenario: String,
    figures: String,
    reference: String,
    ratio: String,
    target: String,
}

fn pct(r: &Report, q: f64) -> f64 {
    Report::ms(&r.ok_latency, q)
}

fn pct_all(r: &Report, q: f64) -> f64 {
    Report::ms(&r.all_latency, q)
}

/// Runs every scenario and reference, prints them and writes the table.
pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let t = &args.targets;
    let admin = Admin::new(&t.enrollment, &t.keys)?;
    let meter = Meter::new(&args.database_url, &args.redis_url);
    let closed = |requests| LoadArgs {
        requests,
        concurrency: 256,
        window_ms: None,
        connections: 8,
    };
    let open = |requests, max_in_flight, window_ms| LoadArgs {
        requests,
        concurrency: max_in_flight,
        window_ms: Some(window_ms),
        connections: 8,
    };
    let mut rows = Vec::new();
    let mut log = String::new();
    let mut costs = String::new();

    // References first.
    let noop = noop(&t.target, &closed(args.requests)).await?;
    log.push_str(&noop.summary("reference: no-op RPC (Health/Check)"));
    let pg_rate = pgbench_enroll(&args.database_url).unwrap_or_else(|e| {
        eprintln!("pgbench reference failed: {e:#}");
        f64::NAN
    });
    let redis_rate = redis_gate(&args.redis_url).unwrap_or_else(|e| {
        eprintln!("redis-benchmark reference failed: {e:#}");
        f64::NAN
    });
    let _ = writeln!(
        log,
        "reference: pgbench enrollment transaction: {pg_rate:.0} tx/s"
    );
    let _ = writeln!(
        log,
        "reference: redis-benchmark gate script: {redis_rate:.0} calls/s"
    );
    rows.push(Row {
        scenario: "no-op RPC (reference)".into(),
        figures: format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
            noop.rps(),
            pct(&noop, 0.5),
            pct(&noop, 0.99)
        ),
        reference: "-".into(),
        ratio: "-".into(),
        target: "-".into(),
    });

    // The herd: 5,000 students within 100 ms for 500 seats, gate on, then
    // the same with the gate off (the PostgreSQL guard alone).
    let herd_load = open(args.students, args.students, 100);
    let gated = herd(&admin, &t.target, &herd_load, 500, Some(&meter)).await?;
    let name = format!("herd: {} students within 100 ms, 500 seats", args.students);
    log.push_str(&gated.report.summary(&name));
    cost(
        &meter,
        &mut costs,
        &mut log,
        "herd, gate on",
        &gated.before,
        &gated.report,
    );
    let plain = herd(&admin, &args.no_gate, &herd_load, 500, Some(&meter)).await?;
    log.push_str(
        &plain
            .report
            .summary("the same herd, gate off (PostgreSQL guard only)"),
    );
    cost(
        &meter,
        &mut costs,
        &mut log,
        "herd, gate off",
        &plain.before,
        &plain.report,
    );
    let (sold, answered) = (secs(gated.report.last_ok), secs(gated.report.elapsed));
    let (plain_sold, plain_answered) = (secs(plain.report.last_ok), secs(plain.report.elapsed));
    rows.push(Row {
        scenario: name,
        figures: format!(
            "sold out {sold:.2} s, last answer {answered:.2} s; {} seated, {} CLASS_FULL, {} retried",
            gated.enrolled,
            gated.report.count("CLASS_FULL"),
            gated.report.retries
        ),
        reference: format!(
            "gate off: sold out {plain_sold:.2} s, last answer {plain_answered:.2} s; {} seated",
            plain.enrolled
        ),
        ratio: format!(
            "{:.1}x faster to sell out, {:.1}x to answer everyone",
            plain_sold / sold,
            plain_answered / answered
        ),
        target: verdict(
            sold <= 0.5 && answered <= 0.7 && plain_sold / sold >= 3.0 && plain_answered / answered >= 8.0,
            gated.enrolled == 500 && plain.enrolled == 500,
            "sold out <= 0.5 s, answered <= 0.7 s, >= 3x / >= 8x; exactly 500",
        ),
    });

    // The same herd closed-loop (256 in flight) and a small class.
    for (max, load) in [(500, closed(args.students)), (30, herd_load.clone())] {
        let herd = herd(&admin, &t.target, &load, max, None).await?;
        let name = format!(
            "herd: {} students, class of {max}, {}",
            args.students,
            arrival_name(&load)
        );
        log.push_str(&herd.report.summary(&name));
        rows.push(Row {
            scenario: name,
            figures: format!(
                "sold out in {:.3} s; {} seated; all p99 {:.2} ms",
                secs(herd.report.last_ok),
                herd.enrolled,
                pct_all(&herd.report, 0.99)
            ),
            reference: "-".into(),
            ratio: "-".into(),
            target: verdict(true, herd.enrolled == max, "exactly max"),
        });
    }

    // Sold out: latecomers (2,000 students, each trying ~10 times).
    let losers = admin.students(2000).await?;
    let before = meter.snapshot();
    let sold_out = redeem(
        &t.target,
        &closed(args.requests),
        vec![gated.code.clone()],
        losers,
    )
    .await?;
    log.push_str(&sold_out.summary("sold out: rejections after the class is full"));
    let after = meter.snapshot();
    let statements = after.statements_since(&before) as f64 / sold_out.total as f64;
    cost(
        &meter,
        &mut costs,
        &mut log,
        "sold out (CLASS_FULL)",
        &before,
        &sold_out,
    );
    let mut row = ratio_row("sold out (CLASS_FULL)", &sold_out, &noop, 0.6, 2.0);
    let _ = write!(row.figures, "; {statements:.3} PostgreSQL statements each");
    row.target = format!("{}; 0 statements", row.target);
    rows.push(row);
    let before = meter.snapshot();
    let reads = validate(&t.target, &closed(args.requests), gated.code.clone()).await?;
    log.push_str(&reads.summary("reads: ValidateKey"));
    cost(&meter, &mut costs, &mut log, "ValidateKey", &before, &reads);
    rows.push(ratio_row("reads: ValidateKey", &reads, &noop, 0.8, 3.0));

    // Spread: redemptions over 1,000 classes.
    let codes = admin
        .classes_with_event_keys(1000, 1000)
        .await?
        .into_iter()
        .map(|(_, code)| code)
        .collect();
    let students = admin.students(args.requests).await?;
    let before = meter.snapshot();
    let spread = redeem(&t.target, &closed(args.requests), codes, students).await?;
    log.push_str(&spread.summary("spread: redemptions over 1,000 classes"));
    cost(
        &meter,
        &mut costs,
        &mut log,
        "spread, per redemption",
        &before,
        &spread,
    );
    let failed_calls = spread.total - spread.ok();
    rows.push(Row {
        scenario: "spread: 1,000 classes".into(),
        figures: format!(
            "{:.0} redemptions/s, p99 {:.2} ms, {} OK, {failed_calls} failed, {} retried",
            spread.rps(),
            pct(&spread, 0.99),
            spread.ok(),
            spread.retries
        ),
        reference: format!("pgbench enrollment tx: {pg_rate:.0}/s"),
        ratio: format!("{:.2}x", spread.rps() / pg_rate),
        target: verdict(
            spread.rps() / pg_rate >= 0.3,
            failed_calls == 0,
            ">= 0.3x, zero failed calls",
        ),
    });

    // Retry storm: one student, 1,000 identical concurrent redemptions.
    let storm = retry_storm(&admin, &t.target).await?;
    log.push_str(&storm.0);
    rows.push(storm.1);

    // A burst bigger than the machine: 50,000 students within 500 ms for
    // 2,000 seats, all at once over 8 connections.
    let burst_load = open(args.burst, args.burst, 500);
    let burst = herd(&admin, &t.target, &burst_load, 2000, Some(&meter)).await?;
    let name = format!("burst: {} students within 500 ms, 2,000 seats", args.burst);
    log.push_str(&burst.report.summary(&name));
    cost(
        &meter,
        &mut costs,
        &mut log,
        "burst",
        &burst.before,
        &burst.report,
    );
    let definitive = burst.report.ok() + burst.report.count("CLASS_FULL");
    rows.push(Row {
        scenario: name,
        figures: format!(
            "{} told OK, {} seated, {} CLASS_FULL, {} other; {} retried ({} transport errors); last answer {:.2} s",
            burst.report.ok(),
            burst.enrolled,
            burst.report.count("CLASS_FULL"),
            burst.report.total - definitive,
            burst.report.retries,
            burst.report.resets,
            secs(burst.report.elapsed)
        ),
        reference: "-".into(),
        ratio: "-".into(),
        target: verdict(
            burst.report.resets == 0,
            definitive == burst.report.total
                && burst.enrolled == 2000
                && burst.report.ok() == 2000,
            "every seat taken and its student told OK, every call definitive, no connection reset",
        ),
    });

    // Scale: 100,000 students over 10,000 classes of 10.
    let classes = admin.classes_with_event_keys(10_000, 10).await?;
    let students = admin.students(100_000).await?;
    let codes = classes.iter().map(|(_, code)| code.clone()).collect();
    let before = meter.snapshot();
    let wide = redeem(&t.target, &closed(100_000), codes, students).await?;
    log.push_str(&wide.summary("scale: 100,000 students over 10,000 classes"));
    cost(
        &meter,
        &mut costs,
        &mut log,
        "scale: 10,000 classes",
        &before,
        &wide,
    );
    rows.push(Row {
        scenario: "scale: 100,000 students over 10,000 classes of 10".into(),
        figures: format!(
            "{:.0} redemptions/s, p99 {:.2} ms, {} OK; memory {}",
            wide.rps(),
            pct(&wide, 0.99),
            wide.ok(),
            memory()
        ),
        reference: format!("pgbench enrollment tx: {pg_rate:.0}/s"),
        ratio: format!("{:.2}x", wide.rps() / pg_rate),
        target: verdict(true, wide.ok() == 100_000, "every student seated"),
    });

    // A webinar: 40,000 students for 20,000 seats, Redis flushed mid-herd.
    let (class_id, code) = admin.class_with_event_key(20_000).await?;
    let students = admin.students(40_000).await?;
    let flush = {
        let url = args.redis_url.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let _ = Command::new("redis-cli")
                .args(["-u", &url, "FLUSHALL"])
                .output();
        })
    };
    let before = meter.snapshot();
    let webinar = redeem(&t.target, &closed(40_000), vec![code], students).await?;
    let _ = flush.await;
    log.push_str(
        &webinar.summary("webinar: 40,000 students, 20,000 seats, Redis flushed after 2 s"),
    );
    cost(&meter, &mut costs, &mut log, "webinar", &before, &webinar);
    let seated = admin.enrolled(&class_id).await?;
    let class_bytes = redis_class_bytes(&args.redis_url, &class_id);
    rows.push(Row {
        scenario: "webinar: 40,000 students, 20,000 seats, Redis flushed after 2 s".into(),
        figures: format!(
            "sold out {:.2} s, last answer {:.2} s; {seated} seated, {} told OK; Redis {class_bytes} bytes for the class",
            secs(webinar.last_ok),
            secs(webinar.elapsed),
            webinar.ok()
        ),
        reference: "-".into(),
        ratio: "-".into(),
        target: verdict(true, seated == 20_000 && webinar.ok() == 20_000, "exactly 20,000, each told OK"),
    });

    rows.push(Row {
        scenario: "gate script in Redis (reference)".into(),
        figures: format!("{redis_rate:.0} calls/s"),
        reference: "-".into(),
        ratio: "-".into(),
        target: "-".into(),
    });

    let mut table = String::from(
        "| scenario | figures | reference | ratio | target |\n|---|---|---|---|---|\n",
    );
    for r in &rows {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} |",
            r.scenario, r.figures, r.reference, r.ratio, r.target
        );
    }
    let costs = format!("| scenario | cost per answer |\n|---|---|\n{costs}");
    println!("{log}\n{table}\n{costs}");
    let doc = format!(
        "# Benchmark results\n\nMeasured by `make bench` on {} ({} cores).\n\n{table}\n## Cost per answer\n\nCPU milliseconds of each process (`/proc`), PostgreSQL statements and commits (`pg_stat_statements`) and Redis commands (`INFO stats`), read around each scenario and divided by its answers.\n\n{costs}\n## Raw figures\n\n```text\n{log}```\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    std::fs::write(&args.out, doc)?;
    println!("written to {}", args.out);
    Ok(())
}

/// Notes what a scenario cost per answer, from counters read around it.
fn cost(
    meter: &Meter,
    costs: &mut String,
    log: &mut String,
    name: &str,
    before: &Snapshot,
    report: &Report,
) {
    let after = meter.snapshot();
    let line = per_answer(before, &after, report.total);
    let _ = writeln!(costs, "| {name} | {line} |");
    let _ = writeln!(log, "    cost: {line}");
    log.push_str("    statements per answer, most run first:\n");
    log.push_str(&top_statements(before, &after, report.total, 8));
}

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// A row's verdict: the correctness condition first, then the speed target.
fn verdict(fast: bool, correct: bool, target: &str) -> String {
    match (correct, fast) {
        (false, _) => format!("{target}: INCORRECT"),
        (true, true) => format!("{target}: met"),
        (true, false) => format!("{target}: correct, speed target missed"),
    }
}

/// Resident memory of each service process (VmRSS), e.g. "redemption 41 MB".
fn memory() -> String {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let path = entry.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let comm = comm.trim();
            if !["enrollment", "key-issuance", "redemption"].contains(&comm) {
                continue;
            }
            let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
            if let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
            {
                found.push(format!("{comm} {} MB", kb / 1024));
            }
        }
    }
    found.sort();
    found.join(", ")
}

/// Bytes Redis holds for one class's gate state (`MEMORY USAGE` of its keys).
fn redis_class_bytes(redis_url: &str, class_id: &str) -> u64 {
    let cli = |args: &[&str]| {
        Command::new("redis-cli")
            .args(["-u", redis_url])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    ["holds", "confirmed", "ready", "seen", "fresh"]
        .iter()
        .map(|k| {
            cli(&["MEMORY", "USAGE", &format!("{{class:{class_id}}}:{k}")])
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

fn arrival_name(load: &LoadArgs) -> String {
    match load.window_ms {
        Some(ms) => format!("arriving within {ms} ms"),
        None => format!("{} in flight", load.concurrency),
    }
}

fn ratio_row(name: &str, r: &Report, noop: &Report, min_rate: f64, max_p99: f64) -> Row {
    let rate = r.rps() / noop.rps();
    let p99 = pct_all(r, 0.99) / pct(noop, 0.99);
    Row {
        scenario: name.into(),
        figures: format!(
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
            r.rps(),
            pct_all(r, 0.5),
            pct_all(r, 0.99)
        ),
        reference: format!(
            "no-op: {:.0} req/s, p99 {:.2} ms",
            noop.rps(),
            pct(noop, 0.99)
        ),
        ratio: format!("{rate:.2}x rate, {p99:.2}x p99"),
        target: format!(">= {min_rate}x rate, <= {max_p99}x p99"),
    }
}

async fn retry_storm(admin: &Admin, target: &str) -> anyhow::Result<(String, Row)> {
    use prost::Message as _;
    let (class_id, code) = admin.class_with_event_key(10).await?;
    let student = admin.students(1).await?.remove(0);
    let request = pb::RedeemKeyRequest {
        code,
        redeemer: Some(Redeemer::UserId(student)),
        idempotency_key: uuid::Uuid::new_v4().to_string(),
    };
    let channels = load::channels(target, 8)?;
    let started = Instant::now();
    let answers = futures::future::join_all((0..1000).map(|i| {
        let mut client = RedemptionServiceClient::new(channels[i % channels.len()].clone());
        let request = request.clone();
        async move {
            match client.redeem_key(request).await {
                Ok(r) => r.into_inner().encode_to_vec(),
                Err(s) => format!("{:?}", failed(&s)).into_bytes(),
            }
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let distinct: std::collections::HashSet<_> = answers.iter().collect();
    let enrolled = admin.enrolled(&class_id).await?;
    let line = format!(
        "retry storm: 1000 identical redemptions in {elapsed:.2?}: {} distinct answers, {enrolled} enrolled\n",
        distinct.len()
    );
    let row = Row {
        scenario: "retry storm: 1 student x 1,000 identical".into(),
        figures: format!(
            "{:.0} ms; {} distinct answer(s); {enrolled} enrollment(s)",
            elapsed.as_secs_f64() * 1000.0,
            distinct.len()
        ),
        reference: "-".into(),
        ratio: "-".into(),
        target: if distinct.len() == 1 && enrolled == 1 {
            "one answer, one seat: yes".into()
        } else {
            "FAILED".into()
        },
    };
    Ok((line, row))
}

/// pgbench running enrollment's own statement (organization check, seat
/// guard and roster insert in one) over 1,000 roomy classes and 100,000
/// users: the ceiling for committed enrollments.
fn pgbench_enroll(database_url: &str) -> anyhow::Result<f64> {
    let psql = |sql: &str| -> anyhow::Result<()> {
        let status = Command::new("psql")
            .args(["-q", "-v", "ON_ERROR_STOP=1", database_url, "-c", sql])
            .status()?;
        anyhow::ensure!(status.success(), "psql failed");
        Ok(())
    };
    psql(
        "DROP SCHEMA IF EXISTS bench_ref CASCADE; CREATE SCHEMA bench_ref;
         CREATE TABLE bench_ref.classes (LIKE enrollment.classes INCLUDING ALL);
         CREATE TABLE bench_ref.enrollments (LIKE enrollment.enrollments INCLUDING ALL);
         CREATE TABLE bench_ref.users (LIKE enrollment.users INCLUDING ALL);
         CREATE TABLE bench_ref.redemptions (LIKE enrollment.redemptions INCLUDING ALL);
         INSERT INTO bench_ref.users (user_id, organization_id, email, display_name)
           SELECT ('00000000-0000-0000-0001-' || lpad(n::text, 12, '0'))::uuid, 'bench', 'u' || n || '@bench', 'u'
           FROM generate_series(1, 100000) n;
         INSERT INTO bench_ref.classes (class_id, organization_id, title, course_id, start_time, end_time, max_students, lab_access_days)
           SELECT ('00000000-0000-0000-0000-' || lpad(n::text, 12, '0'))::uuid, 'bench', 't', 'c', now(), now() + interval '1 day', 1000000, 0
           FROM generate_series(1, 1000) n;",
    )?;
    let script = std::env::temp_dir().join("trainingkeys-pgbench.sql");
    std::fs::write(
        &script,
        "\\set c random(1, 1000)\n\
         \\set u random(1, 100000)\n\
         \\set r random(1, 1000000000)\n\
         WITH seat AS (UPDATE bench_ref.classes SET enrolled_count = enrolled_count + 1 \
           WHERE class_id = ('00000000-0000-0000-0000-' || lpad(:c::text, 12, '0'))::uuid AND enrolled_count < max_students \
           AND organization_id = (SELECT organization_id FROM bench_ref.users WHERE user_id = ('00000000-0000-0000-0001-' || lpad(:u::text, 12, '0'))::uuid) \
           AND NOT EXISTS (SELECT 1 FROM bench_ref.enrollments WHERE class_id = ('00000000-0000-0000-0000-' || lpad(:c::text, 12, '0'))::uuid \
             AND user_id = ('00000000-0000-0000-0001-' || lpad(:u::text, 12, '0'))::uuid AND cancelled_at IS NULL) \
           AND NOT EXISTS (SELECT 1 FROM bench_ref.redemptions WHERE redemption_id = md5(:r::text || :u::text)::uuid) \
           RETURNING class_id), \
         outcome AS (INSERT INTO bench_ref.redemptions (redemption_id) SELECT md5(:r::text || :u::text)::uuid FROM seat) \
         INSERT INTO bench_ref.enrollments (enrollment_id, class_id, user_id, redemption_id) \
         SELECT gen_random_uuid(), class_id, ('00000000-0000-0000-0001-' || lpad(:u::text, 12, '0'))::uuid, md5(:r::text || :u::text)::uuid FROM seat;\n",
    )?;
    let out = Command::new("pgbench")
        .args([
            "-n", "-M", "prepared", "-c", "32", "-j", "2", "-T", "10", "-f",
        ])
        .arg(&script)
        .arg(database_url)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps ="))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no tps in pgbench output: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let _ = psql("DROP SCHEMA bench_ref CASCADE");
    Ok(tps)
}

/// redis-benchmark running the gate's own admission script (random users on
/// a roomy class): the ceiling for admission.
fn redis_gate(redis_url: &str) -> anyhow::Result<f64> {
    let (host, port) = redis_url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("cannot read host:port from {redis_url}"))?;
    let cli = |args: &[&str]| {
        Command::new("redis-cli")
            .args(["-h", host, "-p", port])
            .args(args)
            .output()
    };
    let script = include_str!("../../services/redemption/src/lua/gate_admit.lua");
    let sha = String::from_utf8_lossy(&cli(&["SCRIPT", "LOAD", script])?.stdout)
        .trim()
        .to_owned();
    cli(&["SET", "{class:bench}:ready", "1"])?;
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            host,
            "-p",
            port,
            "-n",
            "200000",
            "-c",
            "64",
            "-r",
            "100000000",
            "-q",
        ])
        .args([
            "EVALSHA",
            &sha,
            "5",
            "{class:bench}:holds",
            "{class:bench}:confirmed",
            "{class:bench}:ready",
            "{class:bench}:fresh",
            "{class:bench}:seen",
            "user:__rand_int__",
            "100",
            "1000000000",
            "0",
            "redemption:__rand_int__",
            "60000",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    cli(&[
        "DEL",
        "{class:bench}:holds",
        "{class:bench}:confirmed",
        "{class:bench}:ready",
        "{class:bench}:seen",
    ])?;
    // "EVALSHA ...: 51234.56 requests per second, p50=..."
    text.split("requests per second")
        .next()
        .and_then(|s| s.rsplit(' ').find(|w| !w.is_empty()))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no rate in redis-benchmark output: {text}"))
}
