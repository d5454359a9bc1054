//! `loadtest`: drive tollgate proxies and keep the books (see `loadtest --help`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tollgate_loadtest::{HostSpec, Mode, Plan, scenario};

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Load generator for tollgate with its own record of every request and its price"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load running proxies; prints a JSON report (requests/s, latency percentiles, statuses,
    /// errors by kind, and the expected request cost per account).
    Run {
        /// Proxy node IP:PORT (repeatable: requests go round-robin).
        #[arg(long = "target", required = true)]
        targets: Vec<SocketAddr>,
        /// HOST or HOST=ACCOUNT (repeatable): hostnames to spread requests over.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value = "/")]
        path: String,
        /// Connections (closed loop, unless --rate is given).
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Open loop: requests per second in total.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup_seconds: f64,
        /// Price of one request in pico-dollars (default $0.50 per million).
        #[arg(long, default_value_t = 500_000)]
        price: i64,
    },
    /// Start a stack on loopback (redis-server, an upstream, proxy nodes) and run a scenario.
    Scenario {
        #[command(subcommand)]
        which: ScenarioCmd,
    },
}

#[derive(Subcommand)]
enum ScenarioCmd {
    /// N services × M accounts across 2 proxy nodes sharing one Redis; then every account's
    /// ledger debits must equal this generator's record exactly (exit 1 if not).
    Reconcile {
        #[arg(long, default_value_t = 20)]
        services: usize,
        #[arg(long, default_value_t = 5)]
        accounts: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Serve from real workerd deployments and reconcile their CPU too.
        #[arg(long)]
        runtime: bool,
        /// On a Redis Cluster (3 masters, 3 replicas) instead of one redis-server.
        #[arg(long)]
        cluster: bool,
    },
    /// Metering on vs off on the same node in the same run (interleaved reps).
    Overhead {
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Suspension seen by a second node after the last credit is spent, and resumption after
    /// a top-up, over many rounds.
    DrainTopUp {
        #[arg(long, default_value_t = 200)]
        rounds: usize,
    },
    /// Deployments on `tollgate runtime` host processes behind a metered proxy node: deploy
    /// latency, spread and memory per host, the busiest host SIGKILLed (time until each of its
    /// deployments answers again), another host SIGTERMed (failed requests during its hand-over).
    Hosts {
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        #[arg(long, default_value_t = 30)]
        deployments: usize,
        /// The hosts' `host.lease_ms`.
        #[arg(long, default_value_t = 3000)]
        lease_ms: u64,
        /// The tollgate binary (default: target/release/tollgate, else target/debug/tollgate).
        #[arg(long)]
        tollgate: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run {
            targets,
            hosts,
            path,
            concurrency,
            rate,
            seconds,
            warmup_seconds,
            price,
        } => {
            let hosts = hosts
                .iter()
                .map(|h| match h.split_once('=') {
                    Some((host, account)) => HostSpec {
                        host: host.to_owned(),
                        account: Some(account.to_owned()),
                    },
                    None => HostSpec {
                        host: h.clone(),
                        account: None,
                    },
                })
                .collect();
            let mode = match rate {
                Some(rate) => Mode::Open { rate, concurrency },
                None => Mode::Closed { concurrency },
            };
            let report = tollgate_loadtest::run(&Plan {
                targets,
                hosts,
                path,
                mode,
                duration: Duration::from_secs_f64(seconds),
                warmup: Duration::from_secs_f64(warmup_seconds),
                price_per_request: price,
            })
            .await?;
            println!("{}", scenario::to_json(&report));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Scenario { which } => match which {
            ScenarioCmd::Reconcile {
                services,
                accounts,
                concurrency,
                seconds,
                runtime,
                cluster,
            } => {
                let r = scenario::reconcile(
                    services,
                    accounts,
                    Mode::Closed { concurrency },
                    Duration::from_secs_f64(seconds),
                    runtime,
                    cluster,
                )
                .await?;
                println!("{}", scenario::to_json(&r));
                Ok(if r.all_exact {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
            ScenarioCmd::Overhead {
                concurrency,
                seconds,
                reps,
            } => {
                let r =
                    scenario::overhead(concurrency, Duration::from_secs_f64(seconds), reps).await?;
                println!("{}", scenario::to_json(&r));
                Ok(ExitCode::SUCCESS)
            }
            ScenarioCmd::Hosts {
                hosts,
                deployments,
                lease_ms,
                tollgate,
            } => {
                let bin = tollgate_loadtest::hosts::find_tollgate(tollgate)?;
                let r = tollgate_loadtest::hosts::hosts(bin, hosts, deployments, lease_ms).await?;
                println!("{}", scenario::to_json(&r));
                Ok(if r.killed.others_failed == 0 && r.stopped.failed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
            ScenarioCmd::DrainTopUp { rounds } => {
                let r = scenario::drain_top_up(rounds).await?;
                println!("{}", scenario::to_json(&r));
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}
