//! The load engine: sends requests over several HTTP/2 connections, either
//! closed-loop (a fixed number in flight) or open-loop (requests start on a
//! schedule, whatever the answers), and reports ghz-style figures: total,
//! requests/s over all answers, latency percentiles over OK answers (HDR
//! histogram) and a count per status code and reason.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use trainingkeys_devtools::Authed;

/// How requests arrive.
#[derive(Debug, Clone, Copy)]
pub enum Arrival {
    /// Keep this many requests in flight.
    Closed { concurrency: usize },
    /// Start all requests evenly spread over this window (open loop), with at
    /// most `max_in_flight` outstanding.
    Open {
        window: Duration,
        max_in_flight: usize,
    },
}

/// One request's outcome: Ok, or the status code and ErrorInfo reason.
pub type Outcome = Result<(), (tonic::Code, String)>;

/// Makes request number `i` on `channel`.
pub type Call = Arc<dyn Fn(usize, Authed) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// Figures of one run.
#[derive(Debug)]
pub struct Report {
    /// Requests sent.
    pub total: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Latency of OK answers, in microseconds.
    pub ok_latency: Histogram<u64>,
    /// Latency of every answer, in microseconds.
    pub all_latency: Histogram<u64>,
    /// Answers per outcome ("OK", or "CODE REASON").
    pub outcomes: BTreeMap<String, usize>,
    /// Time from the start until the last OK answer.
    pub last_ok: Duration,
    /// Calls retried with the same request (a retryable refusal, or a
    /// transport error), not counted in `total`.
    pub retries: usize,
    /// Of those, the calls that failed in transport (no gRPC status from
    /// the server: a connection reset or refused).
    pub resets: usize,
}

impl Report {
    /// Answers per second, all outcomes.
    pub fn rps(&self) -> f64 {
        self.total as f64 / self.elapsed.as_secs_f64()
    }

    /// OK answers.
    pub fn ok(&self) -> usize {
        self.outcomes.get("OK").copied().unwrap_or(0)
    }

    /// Answers with this reason.
    pub fn count(&self, reason: &str) -> usize {
        self.outcomes
            .iter()
            .filter(|(k, _)| k.ends_with(reason))
            .map(|(_, v)| *v)
            .sum()
    }

    /// A latency percentile of `hist` in milliseconds.
    pub fn ms(hist: &Histogram<u64>, q: f64) -> f64 {
        hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// ghz-style summary lines.
    pub fn summary(&self, name: &str) -> String {
        let mut s = format!(
            "{name}: total {} in {:.2?}, {:.0} req/s; OK latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n",
            self.total,
            self.elapsed,
            self.rps(),
            Self::ms(&self.ok_latency, 0.5),
            Self::ms(&self.ok_latency, 0.9),
            Self::ms(&self.ok_latency, 0.99),
            self.ok_latency.max() as f64 / 1000.0,
        );
        for (outcome, n) in &self.outcomes {
            s.push_str(&format!("    {outcome}: {n}\n"));
        }
        if self.retries > 0 {
            s.push_str(&format!(
                "    retried with the same idempotency key: {} ({} transport errors)\n",
                self.retries, self.resets
            ));
        }
        s
    }
}

/// `connections` lazily connected channels to `url`.
pub fn channels(url: &str, connections: usize) -> anyhow::Result<Vec<Authed>> {
    let (dev, bearer) = crate::setup::credentials()?;
    (0..connections.max(1))
        .map(|_| dev.authed(url, Duration::from_secs(30), bearer))
        .collect()
}

/// Sends `total` requests made by `call` over `channels`.
pub async fn run(channels: &[Authed], total: usize, arrival: Arrival, call: Call) -> Report {
    let limit = match arrival {
        Arrival::Closed { concurrency } => concurrency,
        Arrival::Open { max_in_flight, .. } => max_in_flight,
    };
    let permits = Arc::new(Semaphore::new(limit.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        if let Arrival::Open { window, .. } = arrival {
            let at = start + window.mul_f64(i as f64 / total.max(1) as f64);
            tokio::time::sleep_until(at.into()).await;
        }
        let permit = permits.clone().acquire_owned().await;
        let channel = channels[i % channels.len()].clone();
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let sent = Instant::now();
            let outcome = call(i, channel).await;
            (outcome, sent.elapsed(), start.elapsed())
        }));
    }
    let new_hist = || {
        Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)
            .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
    };
    let mut report = Report {
        total,
        elapsed: Duration::ZERO,
        ok_latency: new_hist(),
        all_latency: new_hist(),
        outcomes: BTreeMap::new(),
        last_ok: Duration::ZERO,
        retries: 0,
        resets: 0,
    };
    for task in tasks {
        let (outcome, latency, at) = match task.await {
            Ok(done) => done,
            Err(e) => (
                Err((tonic::Code::Internal, format!("task failed: {e}"))),
                Duration::ZERO,
                start.elapsed(),
            ),
        };
        let micros = (latency.as_micros() as u64).max(1);
        let _ = report.all_latency.record(micros);
        let key = match outcome {
            Ok(()) => {
                let _ = report.ok_latency.record(micros);
                report.last_ok = report.last_ok.max(at);
                "OK".to_owned()
            }
            Err((code, reason)) => format!("{code:?} {reason}"),
        };
        *report.outcomes.entry(key).or_default() += 1;
    }
    report.elapsed = start.elapsed();
    report
}

/// A status as an outcome: its code and ErrorInfo reason.
pub fn failed(status: &tonic::Status) -> (tonic::Code, String) {
    use tonic_types::StatusExt as _;
    let reason = status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default();
    (status.code(), reason)
}
