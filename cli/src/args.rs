//! The command line of `rlhf`: the subcommands and where each is handled. Each subcommand group
//! lives in its own module.

use clap::{Parser, Subcommand};

use rlhf_coordinator::plot;

use crate::{bench, chaos, cluster, model, reward, run, security, worker};

use rlhf_proto::logging::LogFormat;

/// Where child processes find the log format.
pub const LOG_FORMAT_ENV: &str = "RLHF_LOG_FORMAT";

/// Align Llama-family language models with online RL against several rewards at once.
#[derive(Debug, Parser)]
#[command(name = "rlhf", version, about)]
pub struct Cli {
    /// Log line format on stderr (`text` or `json`). Processes started by this one (the
    /// launchers' workers) inherit it.
    #[arg(long, global = true, default_value = "text", env = LOG_FORMAT_ENV)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub security: security::SecurityArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect and run a model folder (Hugging Face layout).
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
    /// Serve reward objectives, or train a reward model.
    Reward {
        #[command(subcommand)]
        command: reward::RewardCommand,
    },
    /// Supervised fine-tuning on prompt/response pairs (loss on response tokens only).
    Sft(rlhf_learner::sft::SftOptions),
    /// Run a whole job on this machine (local workers, live progress; Ctrl-C stops cleanly).
    Run(run::RunArgs),
    /// Run a job twice on a cluster of processes on this machine, clean and while seeded
    /// faults kill or pause its processes, and compare: steps lost or applied twice, time to
    /// recover, weight difference (docs/reliability.md).
    Chaos(chaos::ChaosArgs),
    /// Check a job file and list every problem.
    Validate {
        /// The job file.
        job: std::path::PathBuf,
    },
    /// Run one service process (what the launchers start).
    Worker(worker::WorkerArgs),
    /// A long-running coordinator: the job API, the state store, and (once elected) the
    /// scheduler that runs submitted jobs.
    Coordinator(cluster::CoordinatorArgs),
    /// Submit a job file to a coordinator; prints the job id.
    Submit {
        job: std::path::PathBuf,
        #[command(flatten)]
        target: cluster::Target,
    },
    /// A coordinator's jobs, newest first.
    Jobs {
        #[command(flatten)]
        target: cluster::Target,
    },
    /// One job: state, step, history, last rewards and KL.
    Status {
        job: String,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: cluster::Target,
    },
    /// A job's logs: the controller's and every worker's, each line prefixed with its source.
    Logs {
        /// A job id on the coordinator, or the output folder of an `rlhf run` (a folder with
        /// `job.json`), read directly.
        job: String,
        /// Keep printing new lines until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (N ≥ 1) of each source, then new ones with `-f`.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        tail: Option<u32>,
        /// Print JSON log lines (`--log-format json` workers) as they are, not made readable.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        target: cluster::Target,
    },
    /// The workers registered with a coordinator and what each runs.
    Workers {
        /// One JSON array on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: cluster::Target,
    },
    /// Cancel a job (a running one checkpoints and stops; its workers exit).
    Cancel {
        job: String,
        #[command(flatten)]
        target: cluster::Target,
    },
    /// Make a cluster's CA (once) and a certificate signed by it (docs/security.md).
    Certs(security::CertsArgs),
    /// Make a coordinator's token table and one token file per role (docs/security.md).
    Tokens(security::TokensArgs),
    /// Benchmarks through the real services.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Chart a run's metrics: rewards per objective (raw and transformed), KL and β, losses,
    /// evaluations, against the step.
    Plot {
        /// A job's output folder, or its `metrics.jsonl`.
        run: std::path::PathBuf,
        /// The chart (`.png` or `.svg`).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

/// Runs a parsed command line.
impl Command {
    /// A long-running service (the coordinator, a worker) rather than a command.
    pub fn is_service(&self) -> bool {
        matches!(self, Command::Coordinator(_) | Command::Worker(_))
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model { command } => model::run(command),
        Command::Reward { command } => reward::run(command),
        Command::Run(args) => run::run(args),
        Command::Validate { job } => run::validate(&job),
        Command::Chaos(args) => chaos::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Bench { command } => bench::run(command),
        Command::Certs(args) => security::certs(args),
        Command::Tokens(args) => security::tokens(args),
        Command::Coordinator(args) => cluster::coordinator(args),
        Command::Submit { job, target } => cluster::submit(target, job),
        Command::Jobs { target } => cluster::jobs(target),
        Command::Status { job, json, target } => cluster::status(target, job, json),
        Command::Logs {
            job,
            follow,
            tail,
            raw,
            target,
        } => cluster::logs(
            target,
            job,
            cluster::LogsOptions {
                follow,
                tail: tail.unwrap_or(0),
                raw,
            },
        ),
        Command::Cancel { job, target } => cluster::cancel(target, job),
        Command::Workers { json, target } => cluster::workers(target, json),
        Command::Plot { run, out } => {
            let file = if run.is_dir() {
                run.join("metrics.jsonl")
            } else {
                run
            };
            let panels = plot::metric_panels(&plot::read_metrics(&file)?);
            if panels.is_empty() {
                anyhow::bail!("{}: no metrics to plot", file.display());
            }
            plot::draw(&panels, 2, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        Command::Sft(opts) => {
            let report = rlhf_learner::sft::train_sft(&opts)?;
            if let Some(last) = report.last() {
                let eval = last
                    .eval_nll
                    .map_or("n/a".to_string(), |v| format!("{v:.4}"));
                eprintln!(
                    "SFT done: train NLL {:.4}, held-out NLL {eval}; saved to {}",
                    last.train_nll,
                    opts.out.display()
                );
            }
            Ok(())
        }
    }
}
