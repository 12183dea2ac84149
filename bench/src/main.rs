//! `loadgen`: a gRPC load generator for Training Keys, and the `make bench`
//! driver that runs every scenario beside its reference in one run.
//!
//! ```text
//! loadgen noop     --target https://127.0.0.1:50053
//! loadgen validate --target https://127.0.0.1:50053 --code ABCD-...
//! loadgen herd     --target https://127.0.0.1:50053 --students 5000 --max 500
//! loadgen bench    (see scripts/bench.sh)
//! ```

mod cost;
mod load;
mod scenarios;
mod setup;

use std::time::Duration;

use clap::Parser;

use crate::load::Arrival;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generator and benchmark driver for Training Keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How to send the load.
#[derive(clap::Args, Clone)]
pub struct LoadArgs {
    /// Requests to send.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Requests in flight (closed loop).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Open loop instead: spread the requests' start over this many ms.
    #[arg(long)]
    pub window_ms: Option<u64>,
    /// HTTP/2 connections to spread requests over.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
}

impl LoadArgs {
    fn arrival(&self) -> Arrival {
        match self.window_ms {
            Some(ms) => Arrival::Open {
                window: Duration::from_millis(ms),
                max_in_flight: self.concurrency,
            },
            None => Arrival::Closed {
                concurrency: self.concurrency,
            },
        }
    }
}

/// The services to drive.
#[derive(clap::Args, Clone)]
pub struct Targets {
    /// The redemption service (or the load balancer in front of it).
    #[arg(
        long,
        env = "REDEMPTION_URL",
        default_value = "https://127.0.0.1:50053"
    )]
    pub target: String,
    /// The enrollment service (seeding).
    #[arg(
        long,
        env = "ENROLLMENT_URL",
        default_value = "https://127.0.0.1:50051"
    )]
    pub enrollment: String,
    /// The key-issuance service (seeding).
    #[arg(
        long,
        env = "KEY_ISSUANCE_URL",
        default_value = "https://127.0.0.1:50052"
    )]
    pub keys: String,
}

#[derive(clap::Subcommand)]
enum Command {
    /// grpc.health.v1.Health/Check: the cheapest call on the same server stack.
    Noop {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// ValidateKey of one code.
    Validate {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        load: LoadArgs,
        /// The code to validate.
        #[arg(long)]
        code: String,
    },
    /// Distinct students redeem one new event key of a class of `max`.
    Herd {
        #[command(flatten)]
        targets: Targets,
        #[command(flatten)]
        load: LoadArgs,
        /// Seats in the class.
        #[arg(long, default_value_t = 500)]
        max: i32,
    },
    /// Every scenario with its reference, written as a markdown table.
    Bench(scenarios::BenchArgs),
    /// Seed an organization, a class with an event key and a subscription
    /// pool on running services, and print grpcurl calls that redeem them.
    Demo {
        #[command(flatten)]
        targets: Targets,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Noop { targets, load } => {
            let report = scenarios::noop(&targets.target, &load).await?;
            print!("{}", report.summary("noop"));
        }
        Command::Validate {
            targets,
            load,
            code,
        } => {
            let report = scenarios::validate(&targets.target, &load, code).await?;
            print!("{}", report.summary("validate"));
        }
        Command::Herd { targets, load, max } => {
            let admin = setup::Admin::new(&targets.enrollment, &targets.keys)?;
            let herd = scenarios::herd(&admin, &targets.target, &load, max, None).await?;
            print!("{}", herd.report.summary("herd"));
            println!(
                "enrolled {} of {max}; sold out after {:.2?}",
                herd.enrolled, herd.report.last_ok
            );
        }
        Command::Bench(args) => scenarios::bench(args).await?,
        Command::Demo { targets } => setup::demo(&targets).await?,
    }
    Ok(())
}
